/**
 * SCE (select, calculate, erase): keep the highest-variance elements across task vectors, erase
 * minority signs, and weight each model by the mean square of its task vector.
 */
import { copyOf, output, splitBase } from '../common.js';
import { globalNumber } from '../params.js';
import { sameLayout, splitChunked } from '../chunked.js';
import { magnitudeKeys, requireSameShape, subtract, topKMask } from '../tensor-ops.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod, MergeOutput } from '../types.js';

const BLOCK = 4096;

/**
 * Elements kept by the variance selection: the ⌊count_nonzero(var)·topk⌋ largest population
 * variances across the task vectors (ties by lower flat index).
 */
export function sceSelectMask(deltas: readonly Float32Array[], topk: number): Uint8Array {
  const n = deltas[0].length;
  if (topk <= 0) return new Uint8Array(n);
  if (topk >= 1) return new Uint8Array(n).fill(1);
  const variance = new Float32Array(n);
  const scratch = varianceScratch(Math.min(n, BLOCK));
  let nonzero = 0;
  for (let start = 0; start < n; start += BLOCK) {
    const len = Math.min(BLOCK, n - start);
    nonzero += varianceBlock(
      deltas.map((d) => d.subarray(start, start + len)),
      len,
      variance.subarray(start, start + len),
      scratch,
    );
  }
  return topKMask(magnitudeKeys(variance), Math.trunc(nonzero * topk));
}

function varianceScratch(len: number): { mean: Float64Array; acc: Float64Array } {
  return { mean: new Float64Array(len), acc: new Float64Array(len) };
}

/**
 * Population variances across the task vectors' `len` values (float64 mean and sums, stored as
 * float32) into `out`; returns how many are non-zero.
 */
function varianceBlock(deltas: readonly Float32Array[], len: number, out: Float32Array, s: { mean: Float64Array; acc: Float64Array }): number {
  const m = deltas.length;
  const { mean, acc } = s;
  mean.fill(0);
  acc.fill(0);
  for (const d of deltas) for (let j = 0; j < len; j++) mean[j] += d[j];
  for (let j = 0; j < len; j++) mean[j] /= m;
  for (const d of deltas) {
    for (let j = 0; j < len; j++) {
      const e = d[j] - mean[j];
      acc[j] += e * e;
    }
  }
  let nonzero = 0;
  for (let j = 0; j < len; j++) {
    const v = (out[j] = acc[j] / m);
    if (v !== 0) nonzero++;
  }
  return nonzero;
}

/** Scratch of `eraseBlock` for blocks of up to `len` values. */
function eraseScratch(len: number): { total: Float64Array; mixed: Float64Array; divisor: Float64Array } {
  return { total: new Float64Array(len), mixed: new Float64Array(len), divisor: new Float64Array(len) };
}

/**
 * The erase and weighted average of `len` values: signs elected on the sum of the (selected) task
 * vectors, then b + Σ wᵢ·mᵢ·τᵢ / max(Σ wᵢ·mᵢ, 1e-6) per value, in float64, into `out`.
 */
function eraseBlock(
  deltas: readonly Float32Array[],
  weights: readonly number[],
  b: Float32Array,
  len: number,
  out: Float32Array,
  s: { total: Float64Array; mixed: Float64Array; divisor: Float64Array },
): void {
  const { total, mixed, divisor } = s;
  total.fill(0);
  mixed.fill(0);
  divisor.fill(0);
  for (const d of deltas) for (let j = 0; j < len; j++) total[j] += d[j];
  for (let j = 0; j < len; j++) total[j] = total[j] >= 0 ? 1 : -1;
  for (let k = 0; k < deltas.length; k++) {
    const d = deltas[k];
    const w = weights[k];
    for (let j = 0; j < len; j++) {
      const v = d[j];
      const agree = +(v * total[j] > 0);
      mixed[j] += v * w * agree;
      divisor[j] += w * agree;
    }
  }
  for (let j = 0; j < len; j++) out[j] = b[j] + mixed[j] / Math.max(divisor[j], 1e-6);
}

/** Each model's mean square, normalised to sum 1 (uniform where the sum is below 1e-6). */
function normalizedWeights(sumsOfSquares: readonly number[], n: number): number[] {
  const m = sumsOfSquares.length;
  const weights = sumsOfSquares.map((s) => (n > 0 ? s / n : 0));
  const wsum = weights.reduce((a, c) => a + c, 0);
  return Math.abs(wsum) < 1e-6 ? weights.map(() => 1 / m) : weights.map((w) => w / wsum);
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
    const weights = normalizedWeights(
      deltas.map((d) => {
        let s = 0;
        for (let i = 0; i < n; i++) s += d[i] * d[i];
        return s;
      }),
      n,
    );

    // Erase minority signs (elected on the sum of the selected task vectors), then average
    // the agreeing ones with the coefficients.
    const out = new Float32Array(n);
    const scratch = eraseScratch(Math.min(n, BLOCK));
    for (let start = 0; start < n; start += BLOCK) {
      const len = Math.min(BLOCK, n - start);
      eraseBlock(
        deltas.map((d) => d.subarray(start, start + len)),
        weights,
        b.subarray(start, start + len),
        len,
        out.subarray(start, start + len),
        scratch,
      );
    }
    return output(out, base!.shape);
  },

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    const split = splitChunked(ctx.base, inputs);
    if (!split || split.others.length === 0 || !sameLayout(inputs, out.length)) return false;
    const { base, others } = split;
    const n = out.length;
    const topk = globalNumber({ ...ctx, inputs: [] }, 'select_topk');
    const b = new Float32Array(BLOCK);
    const x = new Float32Array(BLOCK);
    const deltas = others.map(() => new Float32Array(BLOCK));
    let keep: Uint8Array | undefined;
    /** The (selected) task vectors of values [start, start + len) into `deltas`. */
    const load = (start: number, len: number): Float32Array[] => {
      const bb = b.subarray(0, len);
      base.read(start, bb);
      return others.map((o, k) => {
        const d = deltas[k]!.subarray(0, len);
        o.read(start, x.subarray(0, len));
        taskVectorBlock(x, bb, d, keep, start);
        return d;
      });
    };
    if (topk < 1) {
      if (topk <= 0) keep = new Uint8Array(n);
      else {
        const variance = new Float32Array(n);
        const scratch = varianceScratch(Math.min(n, BLOCK));
        let nonzero = 0;
        for (let start = 0; start < n; start += BLOCK) {
          const len = Math.min(BLOCK, n - start);
          nonzero += varianceBlock(load(start, len), len, variance.subarray(start, start + len), scratch);
        }
        keep = topKMask(magnitudeKeys(variance), Math.trunc(nonzero * topk));
      }
    }
    const sums = others.map(() => 0);
    for (let start = 0; start < n; start += BLOCK) {
      const len = Math.min(BLOCK, n - start);
      load(start, len).forEach((d, k) => (sums[k] = sumOfSquares(sums[k]!, d)));
    }
    const weights = normalizedWeights(sums, n);
    const scratch = eraseScratch(Math.min(n, BLOCK));
    const res = new Float32Array(BLOCK);
    for (let start = 0; start < n; start += BLOCK) {
      const len = Math.min(BLOCK, n - start);
      const ds = load(start, len);
      eraseBlock(ds, weights, b, len, res, scratch);
      out.write(start, res.subarray(0, len));
    }
    return true;
  },
};

/** x − b rounded to float32, zeroed where `keep` (from value `start`) is 0. */
function taskVectorBlock(x: Float32Array, b: Float32Array, d: Float32Array, keep: Uint8Array | undefined, start: number): void {
  const len = d.length;
  for (let j = 0; j < len; j++) d[j] = x[j]! - b[j]!;
  if (keep) for (let j = 0; j < len; j++) if (!keep[start + j]) d[j] = 0;
}

/** s + Σ d², in index order. */
function sumOfSquares(s: number, d: Float32Array): number {
  for (let j = 0; j < d.length; j++) s += d[j]! * d[j]!;
  return s;
}
