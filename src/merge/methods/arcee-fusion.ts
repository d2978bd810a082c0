/**
 * Arcee Fusion: takes the other model's value only where its importance (|Δ| times the row's KL
 * divergence between softmaxes) is an outlier: at or above median + 1.5·IQR.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, output, splitBase } from '../common.js';
import { CHUNK_VALUES, sameLayout, splitChunked, WINDOW_VALUES } from '../chunked.js';
import { orderStatistics, rectifyEmbedShapes } from '../tensor-ops.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

const SOFTMAX_EPS = 1e-8;

/**
 * Importance |b − a| ⊙ KL(row), as float32: KL = Σ p·log(p/q) over the last dimension, with
 * p = softmax(b) + 1e-8 and q = softmax(a) + 1e-8.
 */
export function fusionImportance(a: Float32Array, b: Float32Array, shape: readonly number[]): Float32Array {
  const n = a.length;
  const len = shape.length === 0 ? n : shape[shape.length - 1];
  const imp = new Float32Array(n);
  importanceRows(a, b, n, len, imp, new Float64Array(len), new Float64Array(len));
  return imp;
}

/**
 * The importance of `count` values (whole rows of `len`) of a and b into `imp`; `ea` and `eb`
 * hold `len` values of scratch.
 */
function importanceRows(a: Float32Array, b: Float32Array, count: number, len: number, imp: Float32Array, ea: Float64Array, eb: Float64Array): void {
  const rows = len === 0 ? 0 : count / len;
  for (let r = 0; r < rows; r++) {
    const start = r * len;
    let maxA = -Infinity;
    let maxB = -Infinity;
    for (let j = 0; j < len; j++) {
      if (a[start + j] > maxA) maxA = a[start + j];
      if (b[start + j] > maxB) maxB = b[start + j];
    }
    let sumA = 0;
    let sumB = 0;
    for (let j = 0; j < len; j++) {
      sumA += ea[j] = Math.exp(a[start + j] - maxA);
      sumB += eb[j] = Math.exp(b[start + j] - maxB);
    }
    let kl = 0;
    for (let j = 0; j < len; j++) {
      const p = eb[j] / sumB + SOFTMAX_EPS;
      const q = ea[j] / sumA + SOFTMAX_EPS;
      kl += p * Math.log(p / q);
    }
    for (let j = start; j < start + len; j++) imp[j] = Math.abs(b[j] - a[j]) * kl;
  }
}

/** median + 1.5·(q3 − q1), with exact quantiles at ⌊q·(n − 1)⌋ of the ascending order. */
export function fusionThreshold(importance: Float32Array): number {
  const n = importance.length;
  const idx = [0.25, 0.5, 0.75].map((q) => Math.trunc(q * (n - 1)));
  const [q1, median, q3] = orderStatistics(importance, idx);
  return median + 1.5 * (q3 - q1);
}

export const arceeFusion: MergeMethod = {
  name: 'arcee_fusion',
  prettyName: 'Arcee Fusion',
  reference: 'https://arcee.ai',
  globalParams: {},
  perModelParams: {},
  needsBase: 'required',
  randomized: false,

  validate(_params: ResolvedParams, vctx: ValidateContext): void {
    if (vctx.base === null) {
      throw new AmalgamError('E_CONFIG', 'arcee_fusion needs a base model', { key: vctx.tensorName, hint: 'set base_model:' });
    }
    const others = vctx.models.filter((m) => m !== vctx.base);
    if (others.length > 1) {
      throw new AmalgamError('E_CONFIG', `arcee_fusion merges the base model with exactly one other model, got ${others.join(', ')}`, {
        key: vctx.tensorName,
      });
    }
  },

  merge(ctx: MergeContext): MergeOutput {
    if (ctx.inputs.length === 1) return copyOf(ctx.inputs[0]);
    const { base, others } = splitBase(ctx, 'arcee_fusion', true);
    if (others.length !== 1) {
      throw new AmalgamError('E_CONFIG', `arcee_fusion merges the base model with exactly one other model, got ${others.length}`, {
        key: ctx.tensorName,
      });
    }
    const [ra, rb] = rectifyEmbedShapes([base!, others[0]], ctx.tensorName, ctx.isEmbed, 'arcee_fusion', ctx.warn);
    const a = ra.data;
    const b = rb.data;
    const n = a.length;
    if (n === 0) return output(new Float32Array(0), ra.shape);
    const importance = fusionImportance(a, b, ra.shape);
    const threshold = Math.fround(fusionThreshold(importance));
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = importance[i] >= threshold ? b[i] : a[i];
    return output(out, ra.shape);
  },

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    const split = splitChunked(ctx.base, inputs);
    if (!split || split.others.length !== 1 || !sameLayout(inputs, out.length)) return false;
    const n = out.length;
    const shape = split.base.shape;
    const len = shape.length === 0 ? n : shape[shape.length - 1]!;
    // Rows (the softmax's extent) are read whole, a block of them at a time.
    if (n === 0 || len === 0 || len > WINDOW_VALUES) return false;
    const step = Math.max(1, Math.floor(CHUNK_VALUES / len)) * len;
    const B = Math.min(step, n);
    const a = new Float32Array(B);
    const b = new Float32Array(B);
    const load = (start: number, count: number): void => {
      split.base.read(start, a.subarray(0, count));
      split.others[0]!.read(start, b.subarray(0, count));
    };
    const importance = new Float32Array(n);
    const ea = new Float64Array(len);
    const eb = new Float64Array(len);
    for (let start = 0; start < n; start += step) {
      const count = Math.min(step, n - start);
      load(start, count);
      importanceRows(a, b, count, len, importance.subarray(start, start + count), ea, eb);
    }
    const threshold = Math.fround(fusionThreshold(importance));
    const res = new Float32Array(B);
    for (let start = 0; start < n; start += step) {
      const count = Math.min(step, n - start);
      load(start, count);
      for (let i = 0; i < count; i++) res[i] = importance[start + i]! >= threshold ? b[i]! : a[i]!;
      out.write(start, res.subarray(0, count));
    }
    return true;
  },
};
