/**
 * Model Stock: interpolates between the base and the average of the models with a ratio derived
 * from the mean pairwise cosine of their task vectors (over the whole tensor, or per row).
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, output, splitBase } from '../common.js';
import { globalBool } from '../params.js';
import { CHUNK_VALUES, sameLayout, splitChunked } from '../chunked.js';
import { rectifyEmbedShapes, subtract } from '../tensor-ops.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

/** Denominators 1 + (N − 1)·cos θ closer to zero than this use t = 0 (the base). */
const ZERO_DENOMINATOR = 1e-6;

export const modelStock: MergeMethod = {
  name: 'model_stock',
  prettyName: 'Model Stock',
  reference: 'https://arxiv.org/abs/2403.19522',
  globalParams: {
    filter_wise: { type: 'boolean', default: false, description: 'compute the ratio per row instead of per tensor' },
  },
  perModelParams: {},
  needsBase: 'required',
  randomized: false,

  validate(_params: ResolvedParams, vctx: ValidateContext): void {
    if (vctx.base === null) {
      throw new AmalgamError('E_CONFIG', 'model_stock needs a base model', { key: vctx.tensorName, hint: 'set base_model:' });
    }
  },

  merge(ctx: MergeContext): MergeOutput | null {
    const { base, others } = splitBase(ctx, 'model_stock', true);
    if (others.length === 0) return copyOf(base!);
    if (others.length < 2) {
      if (ctx.isOptional) {
        ctx.warn?.(`${ctx.tensorName}: optional tensor present in fewer than 3 models; model_stock leaves it out`);
        return null;
      }
      throw new AmalgamError('E_CONFIG', `model_stock needs the base model plus at least two others, got ${ctx.inputs.length} models with this tensor`, {
        key: ctx.tensorName,
      });
    }
    const rect = rectifyEmbedShapes([base!, ...others], ctx.tensorName, ctx.isEmbed, 'model_stock', ctx.warn);
    const b = rect[0].data;
    const ws = rect.slice(1).map((t) => t.data);
    const shape = rect[0].shape;
    const n = b.length;
    const N = ws.length;
    const offsets = ws.map((w) => subtract(w, b));
    const filterWise = globalBool(ctx, 'filter_wise');
    const rowLen = filterWise && shape.length >= 1 ? (shape.length === 1 ? n : shape[shape.length - 1]) : n;
    const rows = rowLen === 0 ? 0 : n / rowLen;
    const out = new Float32Array(n);
    const norms = new Float64Array(N);
    let warned = false;
    for (let r = 0; r < rows; r++) {
      const start = r * rowLen;
      const end = start + rowLen;
      for (let k = 0; k < N; k++) {
        let s = 0;
        const o = offsets[k];
        for (let i = start; i < end; i++) s += o[i] * o[i];
        norms[k] = Math.sqrt(s);
      }
      let cosSum = 0;
      let pairs = 0;
      for (let i = 0; i < N; i++) {
        for (let j = i + 1; j < N; j++) {
          const oi = offsets[i];
          const oj = offsets[j];
          let d = 0;
          for (let e = start; e < end; e++) d += oi[e] * oj[e];
          const c = d / Math.max(norms[i] * norms[j], 1e-6);
          cosSum += Math.min(1, Math.max(-1, c));
          pairs++;
        }
      }
      const cos = cosSum / pairs;
      const den = 1 + (N - 1) * cos;
      let t: number;
      if (Math.abs(den) < ZERO_DENOMINATOR) {
        t = 0;
        if (!warned) ctx.warn?.(`${ctx.tensorName}: model_stock ratio has a zero denominator (mean cosine ${cos}); using the base model`);
        warned = true;
      } else {
        t = (N * cos) / den;
      }
      for (let i = start; i < end; i++) {
        let avg = 0;
        for (let k = 0; k < N; k++) avg += ws[k][i];
        avg /= N;
        out[i] = t * avg + (1 - t) * b[i];
      }
    }
    return output(out, shape);
  },

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    const split = splitChunked(ctx.base, inputs);
    if (!split || split.others.length < 2 || !sameLayout(inputs, out.length)) return false;
    const shape = split.base.shape;
    const n = out.length;
    const filterWise = globalBool({ ...ctx, inputs: [] }, 'filter_wise');
    const rowLen = filterWise && shape.length >= 1 ? (shape.length === 1 ? n : shape[shape.length - 1]!) : n;
    if (rowLen === 0) return true;
    const stock = new ChunkedStock(split.base, split.others, out, (cos) => ctx.warn?.(`${ctx.tensorName}: model_stock ratio has a zero denominator (mean cosine ${cos}); using the base model`));
    const rowsPerBlock = Math.floor(CHUNK_VALUES / rowLen);
    if (rowsPerBlock >= 1) {
      // Whole rows per block: each row's sums, then its result, from the same block.
      for (let start = 0; start < n; start += rowsPerBlock * rowLen) {
        const len = Math.min(rowsPerBlock * rowLen, n - start);
        stock.load(start, len);
        for (let r = 0; r < len; r += rowLen) {
          stock.sums.fill(0);
          stock.accumulate(r, rowLen);
          stock.combine(r, rowLen, stock.ratio());
        }
        stock.store(start, len);
      }
    } else {
      // Rows longer than a block (the whole tensor by default): one pass for the sums, one for the result.
      for (let row = 0; row < n; row += rowLen) {
        stock.sums.fill(0);
        for (let start = row; start < row + rowLen; start += CHUNK_VALUES) {
          const len = Math.min(CHUNK_VALUES, row + rowLen - start);
          stock.load(start, len);
          stock.accumulate(0, len);
        }
        const t = stock.ratio();
        for (let start = row; start < row + rowLen; start += CHUNK_VALUES) {
          const len = Math.min(CHUNK_VALUES, row + rowLen - start);
          stock.load(start, len);
          stock.combine(0, len, t);
          stock.store(start, len);
        }
      }
    }
    return true;
  },
};

/**
 * model_stock over blocks of stored values, with the plain path's float arithmetic in the same
 * order: task vectors rounded to float32, float64 sums of squares and pairwise products in index
 * order (one sum each), the mean cosine over pairs in (i, j) order, then t·avg + (1 − t)·base.
 */
class ChunkedStock {
  /** Per row: N sums of squares, then the N(N − 1)/2 pairwise products in (i < j) order. */
  readonly sums: Float64Array;
  private readonly b: Float32Array;
  private readonly ws: Float32Array[];
  /** The loaded block's task vectors, rounded to float32. */
  private readonly tv: Float32Array[];
  private readonly avg: Float64Array;
  private readonly res: Float32Array;
  private warned = false;

  constructor(
    private readonly base: ChunkedInput,
    private readonly others: readonly ChunkedInput[],
    private readonly out: ChunkWriter,
    private readonly warnZero: (cos: number) => void,
  ) {
    const N = others.length;
    this.sums = new Float64Array(N + (N * (N - 1)) / 2);
    this.b = new Float32Array(CHUNK_VALUES);
    this.ws = others.map(() => new Float32Array(CHUNK_VALUES));
    this.tv = others.map(() => new Float32Array(CHUNK_VALUES));
    this.avg = new Float64Array(CHUNK_VALUES);
    this.res = new Float32Array(CHUNK_VALUES);
  }

  load(start: number, len: number): void {
    this.base.read(start, this.b.subarray(0, len));
    this.others.forEach((x, k) => {
      x.read(start, this.ws[k]!.subarray(0, len));
      difference(this.ws[k]!, this.b, this.tv[k]!, len);
    });
  }

  /** Adds values [from, from + len) of the loaded block to the sums (each sum in index order). */
  accumulate(from: number, len: number): void {
    const N = this.others.length;
    const { sums, tv } = this;
    let p = N;
    for (let k = 0; k < N; k++) {
      sums[k] = sumProducts(sums[k]!, tv[k]!, tv[k]!, from, len);
      for (let j = k + 1; j < N; j++) sums[p] = sumProducts(sums[p++]!, tv[k]!, tv[j]!, from, len);
    }
  }

  /** The interpolation ratio t from the sums (warning once on a zero denominator). */
  ratio(): number {
    const N = this.others.length;
    const norms = new Float64Array(N);
    for (let k = 0; k < N; k++) norms[k] = Math.sqrt(this.sums[k]!);
    let cosSum = 0;
    let pairs = 0;
    let p = N;
    for (let i = 0; i < N; i++) {
      for (let j = i + 1; j < N; j++) {
        const c = this.sums[p++]! / Math.max(norms[i]! * norms[j]!, 1e-6);
        cosSum += Math.min(1, Math.max(-1, c));
        pairs++;
      }
    }
    const cos = cosSum / pairs;
    const den = 1 + (N - 1) * cos;
    if (Math.abs(den) < ZERO_DENOMINATOR) {
      if (!this.warned) this.warnZero(cos);
      this.warned = true;
      return 0;
    }
    return (N * cos) / den;
  }

  /** Results [from, from + len) of the loaded block into the result block. */
  combine(from: number, len: number, t: number): void {
    const { b, ws, avg, res } = this;
    avg.fill(0, from, from + len);
    for (const w of ws) addTo(avg, w, from, len);
    interpolate(avg, b, res, ws.length, t, from, len);
  }

  store(start: number, len: number): void {
    this.out.write(start, this.res.subarray(0, len));
  }
}

function difference(w: Float32Array, b: Float32Array, out: Float32Array, len: number): void {
  for (let e = 0; e < len; e++) out[e] = w[e]! - b[e]!;
}

/** s + Σ x[e]·y[e] over [from, from + len), in index order. */
function sumProducts(s: number, x: Float32Array, y: Float32Array, from: number, len: number): number {
  for (let e = from; e < from + len; e++) s += x[e]! * y[e]!;
  return s;
}

function addTo(acc: Float64Array, x: Float32Array, from: number, len: number): void {
  for (let e = from; e < from + len; e++) acc[e] += x[e]!;
}

function interpolate(avg: Float64Array, b: Float32Array, res: Float32Array, N: number, t: number, from: number, len: number): void {
  for (let e = from; e < from + len; e++) res[e] = t * (avg[e]! / N) + (1 - t) * b[e]!;
}
