/**
 * Multi-SLERP: barycentric interpolation of any number of models on the hypersphere (through the
 * tangent space at the weighted mean direction), on task vectors when a base model is given.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, noInputs, output, splitBase } from '../common.js';
import { globalBool, globalNumber, modelNumber } from '../params.js';
import { l2Norm, requireSameShape, subtract } from '../tensor-ops.js';
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
    const xs = others.map((t) => (base ? subtract(t.data, base.data) : t.data));
    const n = xs[0].length;
    const norms = xs.map((x) => l2Norm(x));
    const inv = norms.map((nrm) => 1 / (nrm + eps));

    const mean = new Float64Array(n);
    for (let k = 0; k < xs.length; k++) {
      const x = xs[k];
      const c = weights[k] * inv[k];
      for (let i = 0; i < n; i++) mean[i] += c * x[i];
    }
    const meanNorm = l2Norm(mean);
    if (meanNorm < eps) {
      if (xs.length === 2) {
        const out = new Float32Array(n);
        for (let i = 0; i < n; i++) {
          const v = xs[0][i] * weights[0] + xs[1][i] * weights[1];
          out[i] = base ? base.data[i] + v : v;
        }
        return output(out, others[0].shape);
      }
      throw new AmalgamError(
        'E_CONFIG',
        'multislerp: the weighted sum of the input directions is zero (antipodal inputs whose weights balance out)',
        { key: ctx.tensorName, hint: 'use different weights' },
      );
    }
    for (let i = 0; i < n; i++) mean[i] /= meanNorm;

    // Tangent vectors uᵢ − (uᵢ·m̂)m̂, summed with the weights.
    const tangent = new Float64Array(n);
    for (let k = 0; k < xs.length; k++) {
      const x = xs[k];
      let d = 0;
      for (let i = 0; i < n; i++) d += x[i] * mean[i];
      d *= inv[k];
      const c = weights[k] * inv[k];
      const cd = weights[k] * d;
      for (let i = 0; i < n; i++) tangent[i] += c * x[i] - cd * mean[i];
    }
    const rho = l2Norm(tangent) + eps;
    const cosR = Math.cos(rho);
    const sinR = Math.sin(rho) / rho;
    let scale = 0;
    for (let k = 0; k < xs.length; k++) scale += norms[k] * weights[k];
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      const v = (mean[i] * cosR + tangent[i] * sinR) * scale;
      out[i] = base ? base.data[i] + v : v;
    }
    return output(out, others[0].shape);
  },
};
