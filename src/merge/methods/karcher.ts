/**
 * Karcher mean: the Riemannian mean direction of the inputs on the unit sphere (equal weights),
 * scaled by the mean of their norms. A base model is an ordinary input.
 */
import { copyOf, noInputs, output } from '../common.js';
import { globalNumber } from '../params.js';
import { l2Norm, rectifyEmbedShapes } from '../tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput } from '../types.js';

/** Terms whose sin θ is below this (θ = π, antipodal inputs) are skipped. */
const ANTIPODAL_SIN = 1e-12;

/**
 * Weighted Karcher mean of flat vectors. `alphas` pairs with `xs`.
 */
export function karcherMean(
  xs: readonly Float32Array[],
  alphas: readonly number[],
  maxIter: number,
  tol: number,
  onAntipodal?: () => void,
): Float32Array {
  const n = xs[0].length;
  const norms = xs.map((x) => l2Norm(x));
  const valid: number[] = [];
  for (let k = 0; k < xs.length; k++) if (norms[k] > tol) valid.push(k);
  if (valid.length === 0) return new Float32Array(n);
  let alphaSum = 0;
  for (const k of valid) alphaSum += alphas[k];
  const abar = valid.map((k) => alphas[k] / alphaSum);

  const u = new Float64Array(n);
  for (let v = 0; v < valid.length; v++) {
    const x = xs[valid[v]];
    const c = abar[v] / norms[valid[v]];
    for (let i = 0; i < n; i++) u[i] += c * x[i];
  }
  const startNorm = l2Norm(u);
  if (startNorm < tol) {
    const x = xs[valid[0]];
    const c = 1 / norms[valid[0]];
    for (let i = 0; i < n; i++) u[i] = x[i] * c;
  } else {
    for (let i = 0; i < n; i++) u[i] /= startNorm;
  }

  const tangent = new Float64Array(n);
  for (let iter = 0; iter < maxIter; iter++) {
    tangent.fill(0);
    for (let v = 0; v < valid.length; v++) {
      const x = xs[valid[v]];
      const inv = 1 / norms[valid[v]];
      let d = 0;
      for (let i = 0; i < n; i++) d += u[i] * x[i];
      const cos = Math.min(1, Math.max(-1, d * inv));
      const theta = Math.acos(cos);
      if (theta < tol) continue;
      const sinTheta = Math.sin(theta);
      if (sinTheta < ANTIPODAL_SIN) {
        onAntipodal?.();
        continue;
      }
      const f = (abar[v] * theta) / sinTheta;
      const fx = f * inv;
      const fu = f * cos;
      for (let i = 0; i < n; i++) tangent[i] += fx * x[i] - fu * u[i];
    }
    const tn = l2Norm(tangent);
    if (tn < tol) break;
    const c = Math.cos(tn);
    const s = Math.sin(tn) / tn;
    for (let i = 0; i < n; i++) u[i] = c * u[i] + s * tangent[i];
    const un = l2Norm(u);
    if (un > tol) for (let i = 0; i < n; i++) u[i] /= un;
  }

  let scale = 0;
  for (let k = 0; k < xs.length; k++) scale += alphas[k] * norms[k];
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = scale * u[i];
  return out;
}

export const karcher: MergeMethod = {
  name: 'karcher',
  prettyName: 'Karcher Mean',
  reference: 'https://en.wikipedia.org/wiki/Karcher_mean',
  globalParams: {
    max_iter: { type: 'integer', default: 10, description: 'maximum number of iterations' },
    tol: { type: 'number', default: 1e-5, description: 'convergence tolerance' },
  },
  perModelParams: {},
  needsBase: 'none',
  randomized: false,

  merge(ctx: MergeContext): MergeOutput {
    if (ctx.inputs.length === 0) noInputs(ctx, 'karcher');
    if (ctx.inputs.length === 1) return copyOf(ctx.inputs[0]);
    const inputs = rectifyEmbedShapes(ctx.inputs, ctx.tensorName, ctx.isEmbed, 'karcher', ctx.warn);
    const alphas = inputs.map(() => 1 / inputs.length);
    let warned = false;
    const data = karcherMean(
      inputs.map((t) => t.data),
      alphas,
      globalNumber(ctx, 'max_iter'),
      globalNumber(ctx, 'tol'),
      () => {
        if (!warned) ctx.warn?.(`${ctx.tensorName}: karcher skipped an antipodal input (angle π to the running mean)`);
        warned = true;
      },
    );
    return output(data, inputs[0].shape);
  },
};
