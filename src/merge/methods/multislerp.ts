/**
 * Multi-SLERP: barycentric interpolation of any number of models on the hypersphere (through the
 * tangent space at the weighted mean direction), on task vectors when a base model is given.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, noInputs, output, splitBase } from '../common.js';
import { globalBool, globalNumber, modelNumber } from '../params.js';
import { l2Norm, requireSameShape } from '../tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput } from '../types.js';

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
    // The task vectors x_k = fround(input_k − base) are recomputed where needed instead of held:
    // with the float64 mean as the only array besides the result, the merge stays within the
    // memory the executor budgets per tensor (inputs + 3 float32 arrays). Each value is computed
    // with the same operations in the same order as with the vectors held.
    const ins = others.map((t) => t.data);
    const b = base?.data;
    const K = ins.length;
    const n = ins[0]!.length;
    /** Task vector k's values [start, start + len) into dst (float32 values). */
    const xs = (k: number, start: number, len: number, dst: Float64Array): void => {
      const xk = ins[k]!;
      if (b) for (let j = 0; j < len; j++) dst[j] = Math.fround(xk[start + j]! - b[start + j]!);
      else for (let j = 0; j < len; j++) dst[j] = xk[start + j]!;
    };
    const B = Math.min(n, 4096);
    const xb = new Float64Array(B);
    const tb = new Float64Array(B);
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
        const out = new Float32Array(n);
        const x1 = new Float64Array(B);
        for (let start = 0; start < n; start += B) {
          const len = Math.min(B, n - start);
          xs(0, start, len, xb);
          xs(1, start, len, x1);
          for (let j = 0; j < len; j++) {
            const v = xb[j]! * weights[0]! + x1[j]! * weights[1]!;
            out[start + j] = b ? b[start + j]! + v : v;
          }
        }
        return output(out, others[0]!.shape);
      }
      throw new AmalgamError(
        'E_CONFIG',
        'multislerp: the weighted sum of the input directions is zero (antipodal inputs whose weights balance out)',
        { key: ctx.tensorName, hint: 'use different weights' },
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
    const out = new Float32Array(n);
    for (let start = 0; start < n; start += B) {
      const len = Math.min(B, n - start);
      tangent(start, len);
      for (let j = 0; j < len; j++) {
        const v = (mean[start + j]! * cosR + tb[j]! * sinR) * scale;
        out[start + j] = b ? b[start + j]! + v : v;
      }
    }
    return output(out, others[0].shape);
  },
};
