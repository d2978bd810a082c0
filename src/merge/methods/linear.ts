/** Linear (model soup): Σ wᵢxᵢ / Σ wᵢ, or Σ wᵢxᵢ without normalisation. */
import { AmalgamError } from '../../errors.js';
import { noInputs, output } from '../common.js';
import { globalBool, modelNumber, resolvedModelNumber } from '../params.js';
import { rectifyEmbedShapes } from '../tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

/** Weight sums closer to zero than this cannot be normalised. */
const ZERO_SUM = 1e-8;

function zeroSum(tensorName: string, sum: number): AmalgamError {
  return new AmalgamError('E_CONFIG', `linear: the weights sum to ${sum}, so normalize: true would divide by zero`, {
    key: tensorName,
    hint: 'change the weights or set normalize: false',
  });
}

export const linear: MergeMethod = {
  name: 'linear',
  prettyName: 'Linear',
  reference: 'https://arxiv.org/abs/2203.05482',
  globalParams: {
    normalize: { type: 'boolean', default: true, description: 'divide by the sum of weights' },
  },
  perModelParams: {
    weight: { type: 'number', required: true, description: 'weight of the model' },
  },
  needsBase: 'none',
  randomized: false,

  validate(params: ResolvedParams, vctx: ValidateContext): void {
    if (params.global.normalize !== true) return;
    let sum = 0;
    for (const m of vctx.models) sum += resolvedModelNumber(params, m, 'weight') ?? 0;
    if (vctx.models.length > 0 && Math.abs(sum) < ZERO_SUM) throw zeroSum(vctx.tensorName, sum);
  },

  merge(ctx: MergeContext): MergeOutput {
    if (ctx.inputs.length === 0) noInputs(ctx, 'linear');
    const inputs = rectifyEmbedShapes(ctx.inputs, ctx.tensorName, ctx.isEmbed, 'linear', ctx.warn);
    const weights = inputs.map((t) => modelNumber(ctx, t.model, 'weight'));
    const normalize = globalBool(ctx, 'normalize');
    let sum = 0;
    for (const w of weights) sum += w;
    if (normalize && Math.abs(sum) < ZERO_SUM) throw zeroSum(ctx.tensorName, sum);
    const out = weightedSum(
      inputs.map((t) => t.data),
      weights,
      normalize ? sum : 1,
    );
    return output(out, inputs[0].shape);
  },
};

/** Values per block of `weightedSum`'s float64 accumulator. */
const BLOCK = 4096;

/**
 * Σₖ wₖ·xₖ / divisor, each element accumulated in float64 from 0 in model order and rounded to
 * float32 once. Block by block and model by model, so every inner loop reads one array.
 */
export function weightedSum(xs: readonly Float32Array[], weights: readonly number[], divisor: number): Float32Array {
  const n = xs[0]!.length;
  const out = new Float32Array(n);
  const acc = new Float64Array(Math.min(BLOCK, n));
  for (let start = 0; start < n; start += BLOCK) {
    const len = Math.min(BLOCK, n - start);
    acc.fill(0, 0, len);
    for (let k = 0; k < xs.length; k++) {
      const x = xs[k]!;
      const w = weights[k]!;
      // A shorter input reads as NaN past its end, as indexing it element by element did.
      const have = Math.max(0, Math.min(len, x.length - start));
      for (let j = 0; j < have; j++) acc[j] += w * x[start + j]!;
      for (let j = have; j < len; j++) acc[j] += NaN;
    }
    if (divisor === 1) for (let j = 0; j < len; j++) out[start + j] = acc[j]!;
    else for (let j = 0; j < len; j++) out[start + j] = acc[j]! / divisor;
  }
  return out;
}
