/**
 * Multi-SLERP: barycentric interpolation of any number of models on the hypersphere (through the
 * tangent space at the weighted mean direction), on task vectors when a base model is given.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, noInputs, output, splitBase } from '../common.js';
import { globalBool, globalNumber, modelNumber } from '../params.js';
import { sameLayout } from '../chunked.js';
import { l2Norm, requireSameShape } from '../tensor-ops.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod, MergeOutput } from '../types.js';

export const multislerp: MergeMethod = {
  name: 'multislerp',
  prettyName: 'Multi-SLERP',
  reference: 'https://goddard.blog/posts/multislerp-wow-what-a-cool-idea',
  globalParams: {
    normalize_weights: { type: 'boolean', default: true, description: 'divide the weights by their sum' },
    eps: { type: 'number', default: 1e-8, description: 'numerical stability constant' },
  },
  perModelParams: {
    weight: { type: 'number', required: true, description: 'weight of the model' },
  },
  needsBase: 'optional',
  randomized: false,

  merge(ctx: MergeContext): MergeOutput {
    if (ctx.inputs.length === 0) noInputs(ctx, 'multislerp');
    const { base, others } = splitBase(ctx, 'multislerp', false);
    if (others.length === 0) return copyOf(base!);
    if (others.length === 1) return copyOf(others[0]);
    requireSameShape(base ? [...others, base] : others, ctx.tensorName, 'multislerp');
    const { eps, weights } = settings(ctx, others);
    // The task vectors x_k = fround(input_k − base) are recomputed where needed instead of held:
    // with the float64 mean as the only array besides the result, the merge stays within the
    // memory the executor budgets per tensor (inputs + 3 float32 arrays). Each value is computed
    // with the same operations in the same order as with the vectors held.
    const ins = others.map((t) => t.data);
    const b = base?.data;
    const n = ins[0]!.length;
    const xs = (k: number, start: number, len: number, dst: Float64Array): void => {
      const xk = ins[k]!;
      if (b) for (let j = 0; j < len; j++) dst[j] = Math.fround(xk[start + j]! - b[start + j]!);
      else for (let j = 0; j < len; j++) dst[j] = xk[start + j]!;
    };
    const out = new Float32Array(n);
    const baseBlock = b ? (start: number, dst: Float32Array) => dst.set(b.subarray(start, start + dst.length)) : null;
    multislerpCore(n, weights, eps, xs, baseBlock, (start, res) => out.set(res, start), ctx.tensorName);
    return output(out, others[0].shape);
  },

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    let base: ChunkedInput | undefined;
    let others: readonly ChunkedInput[] = inputs;
    if (ctx.base !== null) {
      base = inputs.find((x) => x.model === ctx.base);
      if (base) others = inputs.filter((x) => x !== base);
    }
    if (others.length < 2 || !sameLayout(inputs, out.length)) return false;
    const { eps, weights } = settings({ ...ctx, inputs: [] }, others);
    const xf = new Float32Array(BLOCK);
    const bf = new Float32Array(BLOCK);
    const xs = (k: number, start: number, len: number, dst: Float64Array): void => {
      const x = xf.subarray(0, len);
      others[k]!.read(start, x);
      if (base) {
        const bb = bf.subarray(0, len);
        base.read(start, bb);
        for (let j = 0; j < len; j++) dst[j] = Math.fround(x[j]! - bb[j]!);
      } else for (let j = 0; j < len; j++) dst[j] = x[j]!;
    };
    const baseBlock = base ? (start: number, dst: Float32Array) => base.read(start, dst) : null;
    multislerpCore(out.length, weights, eps, xs, baseBlock, (start, res) => out.write(start, res), ctx.tensorName);
    return true;
  },
};

/** Values per block. */
const BLOCK = 4096;

/** `eps` and the models' weights (normalised with `normalize_weights`), or the zero-sum error. */
function settings(ctx: MergeContext, others: readonly { model: string }[]): { eps: number; weights: number[] } {
  const eps = globalNumber(ctx, 'eps');
  let weights = others.map((t) => modelNumber(ctx, t.model, 'weight'));
  if (globalBool(ctx, 'normalize_weights')) {
    const sum = weights.reduce((a, b) => a + b, 0);
    if (sum === 0) {
      throw new AmalgamError('E_CONFIG', 'multislerp: the weights sum to 0 and cannot be normalised', {
        key: ctx.tensorName,
        hint: 'change the weights or set normalize_weights: false',
      });
    }
    weights = weights.map((w) => w / sum);
  }
  return { eps, weights };
}

/**
 * The merge of K ≥ 2 task vectors (or models) of `n` values, given block by block by `xs` (task
 * vector k's values [start, start + len), float32 values in float64), the base's values by
 * `baseBlock` (none without a base); the result goes to `write` block by block.
 */
function multislerpCore(
  n: number,
  weights: readonly number[],
  eps: number,
  xs: (k: number, start: number, len: number, dst: Float64Array) => void,
  baseBlock: ((start: number, dst: Float32Array) => void) | null,
  write: (start: number, res: Float32Array) => void,
  tensorName: string,
): void {
  const K = weights.length;
  const B = Math.min(n, BLOCK);
  const xb = new Float64Array(B);
  const tb = new Float64Array(B);
  const bb = new Float32Array(B);
  const res = new Float32Array(B);
  const norms: number[] = [];
  for (let k = 0; k < K; k++) {
    let s2 = 0;
    for (let start = 0; start < n; start += B) {
      const len = Math.min(B, n - start);
      xs(k, start, len, xb);
      for (let j = 0; j < len; j++) s2 += xb[j]! * xb[j]!;
    }
    norms.push(Math.sqrt(s2));
  }
  const inv = norms.map((nrm) => 1 / (nrm + eps));
  const c = weights.map((w, k) => w * inv[k]!);
  /** The result block: v plus the base's value where there is a base. */
  const emit = (start: number, len: number, v: (j: number) => number): void => {
    if (baseBlock) baseBlock(start, bb.subarray(0, len));
    for (let j = 0; j < len; j++) res[j] = baseBlock ? bb[j]! + v(j) : v(j);
    write(start, res.subarray(0, len));
  };

  const mean = new Float64Array(n);
  for (let k = 0; k < K; k++) {
    const ck = c[k]!;
    for (let start = 0; start < n; start += B) {
      const len = Math.min(B, n - start);
      xs(k, start, len, xb);
      for (let j = 0; j < len; j++) mean[start + j] += ck * xb[j]!;
    }
  }
  const meanNorm = l2Norm(mean);
  if (meanNorm < eps) {
    if (K === 2) {
      const x1 = new Float64Array(B);
      for (let start = 0; start < n; start += B) {
        const len = Math.min(B, n - start);
        xs(0, start, len, xb);
        xs(1, start, len, x1);
        emit(start, len, (j) => xb[j]! * weights[0]! + x1[j]! * weights[1]!);
      }
      return;
    }
    throw new AmalgamError(
      'E_CONFIG',
      'multislerp: the weighted sum of the input directions is zero (antipodal inputs whose weights balance out)',
      { key: tensorName, hint: 'use different weights' },
    );
  }
  for (let i = 0; i < n; i++) mean[i] /= meanNorm;

  // Tangent vectors uᵢ − (uᵢ·m̂)m̂, summed with the weights (models in order for each value):
  // computed block by block, once for their norm and again for the result.
  const cd: number[] = [];
  for (let k = 0; k < K; k++) {
    let d = 0;
    for (let start = 0; start < n; start += B) {
      const len = Math.min(B, n - start);
      xs(k, start, len, xb);
      for (let j = 0; j < len; j++) d += xb[j]! * mean[start + j]!;
    }
    d *= inv[k]!;
    cd.push(weights[k]! * d);
  }
  const tangent = (start: number, len: number): void => {
    tb.fill(0, 0, len);
    for (let k = 0; k < K; k++) {
      const ck = c[k]!;
      const cdk = cd[k]!;
      xs(k, start, len, xb);
      for (let j = 0; j < len; j++) tb[j] += ck * xb[j]! - cdk * mean[start + j]!;
    }
  };
  let t2 = 0;
  for (let start = 0; start < n; start += B) {
    const len = Math.min(B, n - start);
    tangent(start, len);
    for (let j = 0; j < len; j++) t2 += tb[j]! * tb[j]!;
  }
  const rho = Math.sqrt(t2) + eps;
  const cosR = Math.cos(rho);
  const sinR = Math.sin(rho) / rho;
  let scale = 0;
  for (let k = 0; k < K; k++) scale += norms[k]! * weights[k]!;
  for (let start = 0; start < n; start += B) {
    const len = Math.min(B, n - start);
    tangent(start, len);
    emit(start, len, (j) => (mean[start + j]! * cosR + tb[j]! * sinR) * scale);
  }
}
