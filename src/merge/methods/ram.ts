/**
 * RAM (reinforced agent merging): a change made by one model is added as is; changes made by
 * several models are averaged over the models that made them.
 */
import { copyOf, output, splitBase } from '../common.js';
import { globalNumber } from '../params.js';
import { requireSameShape, subtract } from '../tensor-ops.js';
import type { MergeContext, MergeInput, MergeMethod, MergeOutput } from '../types.js';

/**
 * Shared core of `ram` and `ramplus_tl`. With `plus`, each model's unique changes are scaled by
 * its λ = 1 + r·clip(shared/unique, 0, α); without, λ = 1.
 */
export function ramMerge(base: MergeInput, others: readonly MergeInput[], epsilon: number, plus: { r: number; alpha: number } | null): Float32Array {
  const b = base.data;
  const n = b.length;
  const m = others.length;
  const deltas = others.map((t) => subtract(t.data, b));
  const counts = new Uint16Array(n);
  for (const d of deltas) for (let i = 0; i < n; i++) if (Math.abs(d[i]) > epsilon) counts[i]++;
  const lambdas = new Float64Array(m).fill(1);
  if (plus) {
    for (let k = 0; k < m; k++) {
      const d = deltas[k];
      let shared = 0;
      let unique = 0;
      for (let i = 0; i < n; i++) {
        if (Math.abs(d[i]) > epsilon) {
          if (counts[i] > 1) shared++;
          else if (counts[i] === 1) unique++;
        }
      }
      const rho = shared / Math.max(unique, epsilon);
      lambdas[k] = 1 + plus.r * Math.min(plus.alpha, Math.max(0, rho));
    }
  }
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const c = counts[i];
    let acc = 0;
    if (c === 1) {
      for (let k = 0; k < m; k++) {
        const d = deltas[k][i];
        if (Math.abs(d) > epsilon) acc += d * lambdas[k];
      }
    } else if (c > 1) {
      for (let k = 0; k < m; k++) {
        const d = deltas[k][i];
        if (Math.abs(d) > epsilon) acc += d / c;
      }
    }
    out[i] = b[i] + acc;
  }
  return out;
}

export const ram: MergeMethod = {
  name: 'ram',
  prettyName: 'Reinforced Agent Merging',
  reference: 'https://arxiv.org/abs/2601.13572',
  globalParams: {
    epsilon: { type: 'number', default: 1e-5, description: 'changes at or below this magnitude are ignored' },
  },
  perModelParams: {},
  needsBase: 'required',
  randomized: false,

  merge(ctx: MergeContext): MergeOutput {
    const { base, others } = splitBase(ctx, 'ram', true);
    if (others.length === 0) return copyOf(base!);
    requireSameShape([base!, ...others], ctx.tensorName, 'ram');
    return output(ramMerge(base!, others, globalNumber(ctx, 'epsilon'), null), base!.shape);
  },
};
