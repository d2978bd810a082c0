/**
 * SCE (select, calculate, erase): keep the highest-variance elements across task vectors, erase
 * minority signs, and weight each model by the mean square of its task vector.
 */
import { copyOf, output, splitBase } from '../common.js';
import { globalNumber } from '../params.js';
import { magnitudeKeys, requireSameShape, subtract, topKMask } from '../tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput } from '../types.js';

const BLOCK = 4096;

/**
 * Elements kept by the variance selection: the ⌊count_nonzero(var)·topk⌋ largest population
 * variances across the task vectors (ties by lower flat index).
 */
export function sceSelectMask(deltas: readonly Float32Array[], topk: number): Uint8Array {
  const n = deltas[0].length;
  if (topk <= 0) return new Uint8Array(n);
  if (topk >= 1) return new Uint8Array(n).fill(1);
  const m = deltas.length;
  const variance = new Float32Array(n);
  const B = Math.min(n, BLOCK);
  const mean = new Float64Array(B);
  const acc = new Float64Array(B);
  let nonzero = 0;
  for (let start = 0; start < n; start += B) {
    const len = Math.min(B, n - start);
    mean.fill(0);
    acc.fill(0);
    for (const d of deltas) for (let j = 0; j < len; j++) mean[j] += d[start + j];
    for (let j = 0; j < len; j++) mean[j] /= m;
    for (const d of deltas) {
      for (let j = 0; j < len; j++) {
        const e = d[start + j] - mean[j];
        acc[j] += e * e;
      }
    }
    for (let j = 0; j < len; j++) {
      const v = (variance[start + j] = acc[j] / m);
      if (v !== 0) nonzero++;
    }
  }
  const k = Math.trunc(nonzero * topk);
  return topKMask(magnitudeKeys(variance), k);
}

export const sce: MergeMethod = {
  name: 'sce',
  prettyName: 'SCE',
  reference: 'https://arxiv.org/abs/2408.07990',
  globalParams: {
    select_topk: { type: 'number', default: 1.0, description: 'fraction of highest-variance elements kept' },
    int8_mask: { type: 'boolean', default: false, description: 'accepted for compatibility; no numerical effect' },
  },
  perModelParams: {},
  needsBase: 'required',
  randomized: false,

  merge(ctx: MergeContext): MergeOutput {
    const { base, others } = splitBase(ctx, 'sce', true);
    if (others.length === 0) return copyOf(base!);
    requireSameShape([base!, ...others], ctx.tensorName, 'sce');
    const b = base!.data;
    const n = b.length;
    const m = others.length;
    const deltas = others.map((t) => subtract(t.data, b));
    const topk = globalNumber(ctx, 'select_topk');
    if (topk < 1) {
      const keep = sceSelectMask(deltas, topk);
      for (const d of deltas) for (let i = 0; i < n; i++) if (!keep[i]) d[i] = 0;
    }
    // Matrix-level coefficients: mean square of each (selected) task vector, normalised.
    let weights = deltas.map((d) => {
      let s = 0;
      for (let i = 0; i < n; i++) s += d[i] * d[i];
      return n > 0 ? s / n : 0;
    });
    const wsum = weights.reduce((a, c) => a + c, 0);
    weights = Math.abs(wsum) < 1e-6 ? weights.map(() => 1 / m) : weights.map((w) => w / wsum);

    // Erase minority signs (elected on the sum of the selected task vectors), then average
    // the agreeing ones with the coefficients.
    const out = new Float32Array(n);
    const B = Math.min(n, BLOCK);
    const total = new Float64Array(B);
    const mixed = new Float64Array(B);
    const divisor = new Float64Array(B);
    for (let start = 0; start < n; start += B) {
      const len = Math.min(B, n - start);
      total.fill(0);
      mixed.fill(0);
      divisor.fill(0);
      for (const d of deltas) for (let j = 0; j < len; j++) total[j] += d[start + j];
      for (let j = 0; j < len; j++) total[j] = total[j] >= 0 ? 1 : -1;
      for (let k = 0; k < m; k++) {
        const d = deltas[k];
        const w = weights[k];
        for (let j = 0; j < len; j++) {
          const v = d[start + j];
          const agree = +(v * total[j] > 0);
          mixed[j] += v * w * agree;
          divisor[j] += w * agree;
        }
      }
      for (let j = 0; j < len; j++) out[start + j] = b[start + j] + mixed[j] / Math.max(divisor[j], 1e-6);
    }
    return output(out, base!.shape);
  },
};
