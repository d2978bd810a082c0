/**
 * NuSLERP: slerp of two models with t = w₂/(w₁ + w₂), over the whole tensor or per vector, and
 * on task vectors when a separate base model is given.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, noInputs, output, splitBase } from '../common.js';
import { globalBool, modelNumber } from '../params.js';
import { rectifyEmbedShapes } from '../tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

const NORM_CLAMP = 1e-7;
const SIN_EPS = 1e-8;

/**
 * Slerps `count` vectors of length `len` in place of `out`: vector v starts at `v * vstride` and
 * its elements are `estride` apart.
 */
function slerpStrided(
  t: number,
  v0: Float32Array | Float64Array,
  v1: Float32Array | Float64Array,
  out: Float64Array,
  count: number,
  len: number,
  vstride: number,
  estride: number,
): void {
  for (let v = 0; v < count; v++) {
    const start = v * vstride;
    let n0 = 0;
    let n1 = 0;
    let d = 0;
    for (let j = 0, i = start; j < len; j++, i += estride) {
      const a = v0[i];
      const b = v1[i];
      n0 += a * a;
      n1 += b * b;
      d += a * b;
    }
    const cos = Math.min(1, Math.max(-1, d / (Math.max(Math.sqrt(n0), NORM_CLAMP) * Math.max(Math.sqrt(n1), NORM_CLAMP))));
    const theta = Math.acos(cos);
    const sinTheta = Math.sin(theta);
    let a: number;
    let b: number;
    if (Math.abs(sinTheta) < SIN_EPS) {
      a = 1 - t;
      b = t;
    } else {
      a = Math.sin((1 - t) * theta) / sinTheta;
      b = Math.sin(t * theta) / sinTheta;
    }
    for (let j = 0, i = start; j < len; j++, i += estride) out[i] = a * v0[i] + b * v1[i];
  }
}

/**
 * nuslerp of two tensors of the same shape. `flatten`: one vector; otherwise vectors along the
 * last dimension, or along dimension 0 with `rowWise`.
 */
export function nuslerpTensors(
  t: number,
  v0: Float32Array | Float64Array,
  v1: Float32Array | Float64Array,
  shape: readonly number[],
  flatten: boolean,
  rowWise: boolean,
): Float64Array {
  const n = v0.length;
  const out = new Float64Array(n);
  if (flatten || shape.length <= 1 || n === 0) {
    slerpStrided(t, v0, v1, out, 1, n, 0, 1);
  } else if (rowWise) {
    const d0 = shape[0];
    const rest = n / d0;
    slerpStrided(t, v0, v1, out, rest, d0, 1, rest);
  } else {
    const last = shape[shape.length - 1];
    slerpStrided(t, v0, v1, out, n / last, last, last, 1);
  }
  return out;
}

export const nuslerp: MergeMethod = {
  name: 'nuslerp',
  prettyName: 'NuSLERP',
  globalParams: {
    nuslerp_flatten: { type: 'boolean', default: true, description: 'treat the whole tensor as one vector' },
    nuslerp_row_wise: { type: 'boolean', default: false, description: 'with nuslerp_flatten: false, interpolate along dimension 0' },
  },
  perModelParams: {
    weight: { type: 'number', required: true, description: 'relative weight; t = w₂/(w₁ + w₂)' },
  },
  needsBase: 'optional',
  randomized: false,

  validate(_params: ResolvedParams, vctx: ValidateContext): void {
    const others = vctx.models.filter((m) => m !== vctx.base);
    if (others.length > 2) {
      throw new AmalgamError('E_CONFIG', `nuslerp merges exactly two models (plus an optional base model), got ${others.join(', ')}`, {
        key: vctx.tensorName,
      });
    }
  },

  merge(ctx: MergeContext): MergeOutput {
    if (ctx.inputs.length === 0) noInputs(ctx, 'nuslerp');
    if (ctx.inputs.length === 1) return copyOf(ctx.inputs[0]);
    const { base, others } = splitBase(ctx, 'nuslerp', ctx.base !== null);
    if (others.length !== 2) {
      throw new AmalgamError(
        'E_CONFIG',
        `nuslerp merges exactly two models (plus an optional base model that is not one of them), got ${ctx.inputs.map((t) => t.model).join(', ')}`,
        { key: ctx.tensorName },
      );
    }
    const w1 = modelNumber(ctx, others[0].model, 'weight');
    const w2 = modelNumber(ctx, others[1].model, 'weight');
    const t = Math.abs(w1 + w2) < 1e-6 ? 0.5 : w2 / (w1 + w2);
    const flatten = globalBool(ctx, 'nuslerp_flatten');
    const rowWise = globalBool(ctx, 'nuslerp_row_wise');
    const rect = rectifyEmbedShapes(base ? [...others, base] : others, ctx.tensorName, ctx.isEmbed, 'nuslerp', ctx.warn);
    const shape = rect[0].shape;
    let a: Float32Array = rect[0].data;
    let b: Float32Array = rect[1].data;
    const baseData = base ? rect[2].data : null;
    if (baseData) {
      const da = new Float32Array(a.length);
      const db = new Float32Array(b.length);
      for (let i = 0; i < a.length; i++) {
        da[i] = a[i] - baseData[i];
        db[i] = b[i] - baseData[i];
      }
      a = da;
      b = db;
    }
    const res = nuslerpTensors(t, a, b, shape, flatten, rowWise);
    const out = new Float32Array(res.length);
    for (let i = 0; i < res.length; i++) out[i] = baseData ? baseData[i] + res[i] : res[i];
    return output(out, shape);
  },
};
