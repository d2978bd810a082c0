/**
 * Spherical linear interpolation between the base (t = 0) and one other model (t = 1), over the
 * whole flattened tensor.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, noInputs, output, wrongCount } from '../common.js';
import { globalNumber } from '../params.js';
import { dot, l2Norm, rectifyEmbedShapes } from '../tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

/** Above this |cos θ| the inputs count as colinear and are lerped. */
export const SLERP_DOT_THRESHOLD = 0.9995;
const NORM_EPS = 1e-8;

/** Slerp of two flat vectors; `v0` at t = 0. */
export function slerpVectors(t: number, v0: Float32Array, v1: Float32Array): Float32Array {
  const n0 = l2Norm(v0);
  const n1 = l2Norm(v1);
  const s0n = n0 > NORM_EPS ? 1 / n0 : 1;
  const s1n = n1 > NORM_EPS ? 1 / n1 : 1;
  const d = dot(v0, v1) * s0n * s1n;
  const out = new Float32Array(v0.length);
  let a: number;
  let b: number;
  if (Math.abs(d) > SLERP_DOT_THRESHOLD) {
    a = 1 - t;
    b = t;
  } else {
    const theta = Math.acos(d);
    const sinTheta = Math.sin(theta);
    a = Math.sin(theta - theta * t) / sinTheta;
    b = Math.sin(theta * t) / sinTheta;
  }
  for (let i = 0; i < out.length; i++) out[i] = a * v0[i] + b * v1[i];
  return out;
}

export const slerp: MergeMethod = {
  name: 'slerp',
  prettyName: 'SLERP',
  reference: 'https://en.wikipedia.org/wiki/Slerp',
  globalParams: {
    t: { type: 'number', required: true, description: 'interpolation factor: 0 = base model, 1 = the other model' },
  },
  perModelParams: {},
  needsBase: 'required',
  randomized: false,

  validate(_params: ResolvedParams, vctx: ValidateContext): void {
    if (vctx.base === null) {
      throw new AmalgamError('E_CONFIG', 'slerp needs a base model (the t = 0 end)', { key: vctx.tensorName, hint: 'set base_model:' });
    }
    if (vctx.models.length > 2 || (vctx.models.length === 2 && !vctx.models.includes(vctx.base))) {
      throw new AmalgamError(
        'E_CONFIG',
        `slerp merges exactly two models, one of them the base model ${vctx.base}; got ${vctx.models.join(', ')}`,
        { key: vctx.tensorName },
      );
    }
  },

  merge(ctx: MergeContext): MergeOutput {
    if (ctx.inputs.length === 0) noInputs(ctx, 'slerp');
    if (ctx.inputs.length === 1) return copyOf(ctx.inputs[0]);
    if (ctx.inputs.length !== 2) wrongCount(ctx, 'slerp', 'merges exactly two models', ctx.inputs);
    const baseIdx = ctx.inputs.findIndex((t) => t.model === ctx.base);
    if (baseIdx < 0) {
      throw new AmalgamError('E_CONFIG', `slerp: the base model ${ctx.base ?? '(none)'} is not one of the two inputs`, { key: ctx.tensorName });
    }
    const ordered = [ctx.inputs[baseIdx], ctx.inputs[1 - baseIdx]];
    const [v0, v1] = rectifyEmbedShapes(ordered, ctx.tensorName, ctx.isEmbed, 'slerp', ctx.warn);
    const t = globalNumber(ctx, 't');
    return output(slerpVectors(t, v0.data, v1.data), v0.shape);
  },
};
