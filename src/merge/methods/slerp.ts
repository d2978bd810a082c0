/**
 * Spherical linear interpolation between the base (t = 0) and one other model (t = 1), over the
 * whole flattened tensor.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, noInputs, output, wrongCount } from '../common.js';
import { globalNumber } from '../params.js';
import { slerpWasm } from '../blocks-wasm.js';
import { CHUNK_VALUES } from '../chunked.js';
import { dot, l2Norm, rectifyEmbedShapes, sameShape } from '../tensor-ops.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

/** Above this |cos θ| the inputs count as colinear and are lerped. */
export const SLERP_DOT_THRESHOLD = 0.9995;
const NORM_EPS = 1e-8;

/** Slerp of two flat vectors; `v0` at t = 0. */
export function slerpVectors(t: number, v0: Float32Array, v1: Float32Array): Float32Array {
  const { a, b } = slerpFactors(t, l2Norm(v0), l2Norm(v1), dot(v0, v1));
  const out = new Float32Array(v0.length);
  for (let i = 0; i < out.length; i++) out[i] = a * v0[i] + b * v1[i];
  return out;
}

/** The factors a, b of out = a·v0 + b·v1, from the norms of v0 and v1 and their dot product. */
function slerpFactors(t: number, n0: number, n1: number, dot01: number): { a: number; b: number } {
  const s0n = n0 > NORM_EPS ? 1 / n0 : 1;
  const s1n = n1 > NORM_EPS ? 1 / n1 : 1;
  const d = dot01 * s0n * s1n;
  if (Math.abs(d) > SLERP_DOT_THRESHOLD) return { a: 1 - t, b: t };
  const theta = Math.acos(d);
  const sinTheta = Math.sin(theta);
  return { a: Math.sin(theta - theta * t) / sinTheta, b: Math.sin(theta * t) / sinTheta };
}

/**
 * `slerpVectors` from stored values block by block: one pass for the sums of squares and the dot
 * product (each summed in index order, as `l2Norm` and `dot`), one for the result.
 */
function slerpChunked(t: number, v0: ChunkedInput, v1: ChunkedInput, out: ChunkWriter): void {
  const n = out.length;
  const B = Math.min(CHUNK_VALUES, n);
  const x0 = new Float32Array(B);
  const x1 = new Float32Array(B);
  const res = new Float32Array(B);
  const lerp = (from: number, count: number, a: number, b: number): void => {
    for (let start = from; start < from + count; start += B) {
      const len = Math.min(B, from + count - start);
      v0.read(start, x0.subarray(0, len));
      v1.read(start, x1.subarray(0, len));
      for (let j = 0; j < len; j++) res[j] = a * x0[j]! + b * x1[j]!;
      out.write(start, res.subarray(0, len));
    }
  };
  const factors = (n0sq: number, n1sq: number, dot01: number) => slerpFactors(t, Math.sqrt(n0sq), Math.sqrt(n1sq), dot01);
  if (slerpWasm(v0.stored, v1.stored, out.stored, factors, lerp)) return;
  const sums = new Float64Array(3);
  for (let start = 0; start < n; start += B) {
    const len = Math.min(B, n - start);
    v0.read(start, x0.subarray(0, len));
    v1.read(start, x1.subarray(0, len));
    sumsOf(x0, x1, len, sums);
  }
  const { a, b } = factors(sums[0]!, sums[1]!, sums[2]!);
  lerp(0, n, a, b);
}

/** Adds Σx0², Σx1² and Σx0·x1 over the block to `sums`, in index order. */
function sumsOf(x0: Float32Array, x1: Float32Array, len: number, sums: Float64Array): void {
  let s0 = sums[0]!;
  let s1 = sums[1]!;
  let s01 = sums[2]!;
  for (let j = 0; j < len; j++) {
    const a = x0[j]!;
    const b = x1[j]!;
    s0 += a * a;
    s1 += b * b;
    s01 += a * b;
  }
  sums[0] = s0;
  sums[1] = s1;
  sums[2] = s01;
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

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    // Two inputs of one shape, one of them the base; everything else goes through `merge`.
    if (inputs.length !== 2) return false;
    const baseIdx = inputs.findIndex((x) => x.model === ctx.base);
    if (baseIdx < 0) return false;
    const [v0, v1] = [inputs[baseIdx]!, inputs[1 - baseIdx]!];
    if (v0.length !== out.length || v1.length !== out.length || !sameShape(v0.shape, v1.shape)) return false;
    slerpChunked(globalNumber({ ...ctx, inputs: [] }, 't'), v0, v1, out);
    return true;
  },
};
