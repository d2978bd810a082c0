/**
 * DARE and DELLA (the `random` and `della_magprune` sparsifiers: dare_ties, dare_linear, della,
 * della_linear) from stored values block by block
 * (`mergeChunked`, see chunked.ts). The masks are drawn whole, model by model, from the same
 * random stream as the plain path; the L1 norms of each task vector before and after masking
 * are summed in index order over the blocks; then each block's masked, rescaled task vectors are
 * combined by `combineTaskVectors`. Element by element that is the plain path's float arithmetic,
 * so the bytes are the same, without a float32 copy of any input.
 */
import { AmalgamError } from '../errors.js';
import { fillBernoulliEachWasm, fillBernoulliWasm, maskedDeltaWasm, maskedL1Wasm } from './blocks-wasm.js';
import { maskSourceOf } from './common.js';
import { CHUNK_VALUES, sameLayout, splitChunked, WINDOW_VALUES } from './chunked.js';
import { checkDensity, combineTaskVectors, gtaVariantOf } from './gta.js';
import { globalBool, globalNumber, modelNumber } from './params.js';
import { checkDellaEpsilon, dellaProbabilities, RESCALE_EPS } from './sparsify.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod } from './types.js';

/** Values per block of the combine (at most a file window). */
const BLOCK = 16 * CHUNK_VALUES;

type Keep = 'all' | 'none' | { mask: Uint8Array; scale: number | undefined };

/** Gives a GTA method with the `random` or `della_magprune` sparsifier its `mergeChunked`; returns the same object. */
export function withChunkedRandom(method: MergeMethod): MergeMethod {
  method.mergeChunked = (ctx, inputs, out) => randomChunked(method, ctx, inputs, out);
  return method;
}

function randomChunked(method: MergeMethod, ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
  const v = gtaVariantOf(method);
  if (!v || (v.sparsification !== 'random' && v.sparsification !== 'della_magprune')) return false;
  const della = v.sparsification === 'della_magprune';
  const split = splitChunked(ctx.base, inputs);
  // Nothing to merge, or embeddings of other shapes: the plain path.
  if (!split || split.others.length === 0 || !sameLayout(inputs, out.length)) return false;
  const { base, others } = split;
  const c: MergeContext = { ...ctx, inputs: [] };
  const n = out.length;
  // DELLA ranks within rows of dim 1 (a 1-D tensor is one row): contiguous rows of at most a
  // window here; strided ones (3-D and more) go through the plain path.
  const shape = base.shape;
  const rowLen = shape.length < 2 ? n : shape[1]!;
  if (della && (shape.length > 2 || n === 0 || rowLen === 0 || rowLen > WINDOW_VALUES)) return false;
  const normalize = globalBool(c, 'normalize');
  const rescale = globalBool(c, 'rescale');
  const lambda = globalNumber(c, 'lambda');
  const masks = maskSourceOf(c);
  const draw = (model: string, probability: number | Float32Array): Uint8Array => {
    // The RNG's own masks (no given ones) are drawn by the WebAssembly kernel where it is built.
    if (!c.masks && c.rng) {
      const mask = new Uint8Array(n);
      const drawn =
        typeof probability === 'number' ? fillBernoulliWasm(c.rng, mask, probability * 4294967296) : fillBernoulliEachWasm(c.rng, mask, probability);
      if (drawn) return mask;
    }
    return masks!.draw({ tensorName: ctx.tensorName, model, numel: n, probability });
  };
  const keep: Keep[] = [];
  const weights: number[] = [];
  for (const x of others) {
    const density = modelNumber(c, x.model, 'density');
    checkDensity(density, ctx.tensorName, x.model);
    // As the plain path: epsilon is read for every model, and checked before the random source.
    const epsilon = della ? modelNumber(c, x.model, 'epsilon') : 0;
    if (density >= 1 || density <= 0) {
      keep.push(density >= 1 ? 'all' : 'none');
      weights.push(modelNumber(c, x.model, 'weight'));
      continue;
    }
    if (della) checkDellaEpsilon(density, epsilon, ctx.tensorName, x.model);
    if (!masks) throw new AmalgamError('E_USAGE', `${v.sparsification} sparsification needs a random source`, { key: ctx.tensorName });
    const mask = draw(x.model, della ? dellaChunked(base, x, shape, rowLen, density, epsilon) : density);
    let scale: number | undefined;
    if (rescale) {
      const { before, after } = maskedL1Wasm(x.stored, base.stored, mask) ?? maskedL1(base, x, mask, n);
      if (before >= RESCALE_EPS && after >= RESCALE_EPS) scale = before / after;
    }
    keep.push({ mask, scale });
    weights.push(modelNumber(c, x.model, 'weight'));
  }
  const B = Math.min(BLOCK, n);
  const b = new Float32Array(B);
  const xs = new Float32Array(B);
  const deltas = others.map(() => new Float32Array(B));
  for (let start = 0; start < n; start += B) {
    const len = Math.min(B, n - start);
    const bb = b.subarray(0, len);
    base.read(start, bb);
    const ds = deltas.map((d) => d.subarray(0, len));
    others.forEach((x, k) => {
      const kk = keep[k]!;
      if (kk === 'none') {
        ds[k]!.fill(0);
        return;
      }
      if (kk !== 'all' && maskedDeltaWasm(x.stored, base.stored, kk.mask, start, kk.scale, ds[k]!)) return;
      const xb = xs.subarray(0, len);
      x.read(start, xb);
      if (kk === 'all') difference(xb, bb, ds[k]!, len);
      else masked(xb, bb, kk.mask, start, kk.scale, ds[k]!, len);
    });
    out.write(start, combineTaskVectors(bb, ds, weights, v.consensus, normalize, lambda));
  }
  return true;
}

/**
 * DELLA's keep probabilities of model x (`dellaProbabilities` of its task vector), from blocks of
 * whole rows: rows are ranked independently, so each block's probabilities are the same values.
 */
function dellaChunked(base: ChunkedInput, x: ChunkedInput, shape: readonly number[], rowLen: number, density: number, epsilon: number): Float32Array {
  const n = base.length;
  const probs = new Float32Array(n);
  const step = Math.max(1, Math.floor(BLOCK / rowLen)) * rowLen;
  const B = Math.min(step, n);
  const b = new Float32Array(B);
  const xb = new Float32Array(B);
  const d = new Float32Array(B);
  for (let start = 0; start < n; start += step) {
    const len = Math.min(step, n - start);
    base.read(start, b.subarray(0, len));
    x.read(start, xb.subarray(0, len));
    difference(xb, b, d, len);
    const rows = shape.length < 2 ? [len] : [len / rowLen, rowLen];
    probs.set(dellaProbabilities(d.subarray(0, len), rows, density, epsilon), start);
  }
  return probs;
}

/** ‖x − base‖₁ and ‖(x − base) ⊙ mask‖₁, float64 sums in index order (as `maskedL1` in gta.ts). */
function maskedL1(base: ChunkedInput, x: ChunkedInput, mask: Uint8Array, n: number): { before: number; after: number } {
  const B = Math.min(BLOCK, n);
  const b = new Float32Array(B);
  const xb = new Float32Array(B);
  const sums = new Float64Array(2);
  for (let start = 0; start < n; start += B) {
    const len = Math.min(B, n - start);
    base.read(start, b.subarray(0, len));
    x.read(start, xb.subarray(0, len));
    l1Block(xb, b, mask, start, len, sums);
  }
  return { before: sums[0]!, after: sums[1]! };
}

function l1Block(x: Float32Array, b: Float32Array, mask: Uint8Array, start: number, len: number, sums: Float64Array): void {
  let before = sums[0]!;
  let after = sums[1]!;
  for (let i = 0; i < len; i++) {
    const d = Math.fround(x[i]! - b[i]!);
    before += Math.abs(d);
    after += Math.abs(d * mask[start + i]!);
  }
  sums[0] = before;
  sums[1] = after;
}

function difference(x: Float32Array, b: Float32Array, dst: Float32Array, len: number): void {
  for (let j = 0; j < len; j++) dst[j] = x[j]! - b[j]!;
}

/** (x − base) ⊙ mask, times `scale` where given, rounded as `fillMasked` in gta.ts. */
function masked(x: Float32Array, b: Float32Array, mask: Uint8Array, start: number, scale: number | undefined, dst: Float32Array, len: number): void {
  if (scale === undefined) {
    for (let j = 0; j < len; j++) dst[j] = Math.fround(x[j]! - b[j]!) * mask[start + j]!;
  } else {
    for (let j = 0; j < len; j++) dst[j] = Math.fround(Math.fround(x[j]! - b[j]!) * mask[start + j]!) * scale;
  }
}
