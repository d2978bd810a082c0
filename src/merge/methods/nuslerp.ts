/**
 * NuSLERP: slerp of two models with t = w₂/(w₁ + w₂), over the whole tensor or per vector, and
 * on task vectors when a separate base model is given.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, noInputs, output, splitBase } from '../common.js';
import { globalBool, modelNumber } from '../params.js';
import { CHUNK_VALUES, sameLayout, splitChunked } from '../chunked.js';
import { rectifyEmbedShapes } from '../tensor-ops.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

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

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    let base: ChunkedInput | undefined;
    let others: readonly ChunkedInput[] = inputs;
    if (ctx.base !== null) {
      const split = splitChunked(ctx.base, inputs);
      if (!split) return false;
      ({ base, others } = split);
    }
    if (others.length !== 2 || !sameLayout(inputs, out.length)) return false;
    const c = { ...ctx, inputs: [] };
    const w1 = modelNumber(c, others[0]!.model, 'weight');
    const w2 = modelNumber(c, others[1]!.model, 'weight');
    const t = Math.abs(w1 + w2) < 1e-6 ? 0.5 : w2 / (w1 + w2);
    const flatten = globalBool(c, 'nuslerp_flatten');
    const rowWise = globalBool(c, 'nuslerp_row_wise');
    const shape = others[0]!.shape;
    const n = out.length;
    // Vectors of strided values (row-wise) go through `merge`.
    if (!(flatten || shape.length <= 1 || n === 0) && rowWise) return false;
    const vec = flatten || shape.length <= 1 ? n : shape[shape.length - 1]!;
    if (vec === 0) return true;
    new ChunkedNuslerp(t, others[0]!, others[1]!, base, out).run(n, vec);
    return true;
  },
};

/**
 * nuslerp over blocks of stored values, vector by vector (the whole tensor, or each row), with
 * `slerpStrided`'s arithmetic in the same order: task vectors rounded to float32 where there is a
 * base, float64 sums in index order, a·v0 + b·v1 in float64, plus the base, rounded once.
 */
class ChunkedNuslerp {
  private readonly x0 = new Float32Array(CHUNK_VALUES);
  private readonly x1 = new Float32Array(CHUNK_VALUES);
  private readonly xb = new Float32Array(CHUNK_VALUES);
  private readonly res = new Float32Array(CHUNK_VALUES);
  private n0 = 0;
  private n1 = 0;
  private d = 0;

  constructor(
    private readonly t: number,
    private readonly v0: ChunkedInput,
    private readonly v1: ChunkedInput,
    private readonly base: ChunkedInput | undefined,
    private readonly out: ChunkWriter,
  ) {}

  /** Values [start, start + len) of both task vectors (or models) into x0, x1 (and the base into xb). */
  private load(start: number, len: number): void {
    const { x0, x1, xb } = this;
    this.v0.read(start, x0.subarray(0, len));
    this.v1.read(start, x1.subarray(0, len));
    if (this.base) {
      this.base.read(start, xb.subarray(0, len));
      for (let i = 0; i < len; i++) {
        x0[i] = x0[i]! - xb[i]!;
        x1[i] = x1[i]! - xb[i]!;
      }
    }
  }

  private accumulate(from: number, len: number): void {
    const { x0, x1 } = this;
    let n0 = this.n0;
    let n1 = this.n1;
    let d = this.d;
    for (let i = from; i < from + len; i++) {
      const a = x0[i]!;
      const b = x1[i]!;
      n0 += a * a;
      n1 += b * b;
      d += a * b;
    }
    this.n0 = n0;
    this.n1 = n1;
    this.d = d;
  }

  private factors(): { a: number; b: number } {
    const cos = Math.min(1, Math.max(-1, this.d / (Math.max(Math.sqrt(this.n0), NORM_CLAMP) * Math.max(Math.sqrt(this.n1), NORM_CLAMP))));
    const theta = Math.acos(cos);
    const sinTheta = Math.sin(theta);
    if (Math.abs(sinTheta) < SIN_EPS) return { a: 1 - this.t, b: this.t };
    return { a: Math.sin((1 - this.t) * theta) / sinTheta, b: Math.sin(this.t * theta) / sinTheta };
  }

  private combine(from: number, len: number, a: number, b: number): void {
    const { x0, x1, xb, res } = this;
    if (this.base) for (let i = from; i < from + len; i++) res[i] = xb[i]! + (a * x0[i]! + b * x1[i]!);
    else for (let i = from; i < from + len; i++) res[i] = a * x0[i]! + b * x1[i]!;
  }

  /** The result for `n` values in vectors of `vec` values each. */
  run(n: number, vec: number): void {
    const perBlock = Math.floor(CHUNK_VALUES / vec);
    if (perBlock >= 1) {
      for (let start = 0; start < n; start += perBlock * vec) {
        const len = Math.min(perBlock * vec, n - start);
        this.load(start, len);
        for (let r = 0; r < len; r += vec) {
          this.n0 = this.n1 = this.d = 0;
          this.accumulate(r, vec);
          const { a, b } = this.factors();
          this.combine(r, vec, a, b);
        }
        this.out.write(start, this.res.subarray(0, len));
      }
      return;
    }
    for (let row = 0; row < n; row += vec) {
      this.n0 = this.n1 = this.d = 0;
      for (let start = row; start < row + vec; start += CHUNK_VALUES) {
        const len = Math.min(CHUNK_VALUES, row + vec - start);
        this.load(start, len);
        this.accumulate(0, len);
      }
      const { a, b } = this.factors();
      for (let start = row; start < row + vec; start += CHUNK_VALUES) {
        const len = Math.min(CHUNK_VALUES, row + vec - start);
        this.load(start, len);
        this.combine(0, len, a, b);
        this.out.write(start, this.res.subarray(0, len));
      }
    }
  }
}
