/**
 * Small tensor helpers for the merge methods: shape rules, norms and dot products accumulated in
 * float64, and linear-time selection for top-k masks and quantiles.
 */
import { AmalgamError } from '../errors.js';
import { numel } from '../tensor/dtype.js';
import type { MergeInput } from './types.js';

export function shapeString(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

export function sameShape(a: readonly number[], b: readonly number[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function describeShapes(inputs: readonly MergeInput[]): string {
  return inputs.map((t) => `${t.model} ${shapeString(t.shape)}`).join(', ');
}

/** Throws E_SHAPE naming the tensor unless every input has the same shape. */
export function requireSameShape(inputs: readonly MergeInput[], tensorName: string, method: string): void {
  for (const t of inputs) {
    if (t.data.length !== numel(t.shape)) {
      throw new AmalgamError('E_SHAPE', `${method}: input from ${t.model} has ${t.data.length} values but shape ${shapeString(t.shape)}`, {
        key: tensorName,
      });
    }
  }
  if (inputs.length < 2) return;
  const s0 = inputs[0].shape;
  if (inputs.every((t) => sameShape(t.shape, s0))) return;
  throw new AmalgamError('E_SHAPE', `${method}: inputs have different shapes (${describeShapes(inputs)})`, {
    key: tensorName,
    hint: 'every model must have the same shape for this tensor',
  });
}

/** Copy of the top-left `rows × cols` block of a row-major 2-D tensor. */
export function cutSubmatrix(data: Float32Array, shape: readonly number[], rows: number, cols: number): Float32Array {
  const srcCols = shape[1];
  if (cols === srcCols) return data.slice(0, rows * cols);
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) out.set(data.subarray(r * srcCols, r * srcCols + cols), r * cols);
  return out;
}

/**
 * mergekit's common-submatrix rule for embeddings: when the inputs of an `is_embed` tensor are all
 * 2-D and differ in shape, each is cut to `[min rows, min cols]`. Any other shape mismatch is an
 * error. Returns the inputs unchanged when the shapes already agree.
 */
export function rectifyEmbedShapes(
  inputs: readonly MergeInput[],
  tensorName: string,
  isEmbed: boolean,
  method: string,
  warn?: (message: string) => void,
): readonly MergeInput[] {
  if (inputs.length < 2 || inputs.every((t) => sameShape(t.shape, inputs[0].shape))) {
    requireSameShape(inputs, tensorName, method);
    return inputs;
  }
  if (!isEmbed || !inputs.every((t) => t.shape.length === 2)) {
    requireSameShape(inputs, tensorName, method);
    return inputs;
  }
  let rows = Infinity;
  let cols = Infinity;
  for (const t of inputs) {
    rows = Math.min(rows, t.shape[0]);
    cols = Math.min(cols, t.shape[1]);
  }
  warn?.(`${tensorName}: using the common submatrix [${rows}, ${cols}] of inputs with shapes ${describeShapes(inputs)}`);
  return inputs.map((t) =>
    sameShape(t.shape, [rows, cols]) ? t : { model: t.model, data: cutSubmatrix(t.data, t.shape, rows, cols), shape: [rows, cols] },
  );
}

// ---------------------------------------------------------------------------------------------
// Reductions (float64 accumulation)

export function dot(a: Float32Array | Float64Array, b: Float32Array | Float64Array, start = 0, end = a.length): number {
  let s = 0;
  for (let i = start; i < end; i++) s += a[i] * b[i];
  return s;
}

export function l2Norm(a: Float32Array | Float64Array, start = 0, end = a.length): number {
  let s = 0;
  for (let i = start; i < end; i++) s += a[i] * a[i];
  return Math.sqrt(s);
}

export function l1Norm(a: Float32Array | Float64Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i]);
  return s;
}

/** Elementwise `a - b` rounded to float32 (the task vector, as mergekit computes it). */
export function subtract(a: Float32Array, b: Float32Array): Float32Array {
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i] - b[i];
  return out;
}

// ---------------------------------------------------------------------------------------------
// Selection and ranking

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/**
 * Keys that order like |x|: the float32 bit pattern without the sign bit. Monotonic for
 * magnitudes; NaN sorts above +Infinity.
 */
export function magnitudeKeys(data: Float32Array): Uint32Array {
  const keys = new Uint32Array(data.length);
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  for (let i = 0; i < data.length; i++) keys[i] = bits[i] & 0x7fffffff;
  return keys;
}

/** Keys that order like the signed float32 values (NaN with the sign bit clear sorts last). */
export function sortableKeys(data: Float32Array): Uint32Array {
  const keys = new Uint32Array(data.length);
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  for (let i = 0; i < data.length; i++) {
    const b = bits[i];
    keys[i] = b & 0x80000000 ? ~b >>> 0 : (b | 0x80000000) >>> 0;
  }
  return keys;
}

/** Inverse of `sortableKeys` for one key. */
export function sortableKeyToFloat(key: number): number {
  u32[0] = key & 0x80000000 ? key & 0x7fffffff : ~key >>> 0;
  return f32[0];
}

interface Selection {
  /** The k-th smallest key. */
  value: number;
  /** How many keys are smaller than `value`. */
  less: number;
  /** How many keys equal `value`. */
  equal: number;
}

/** Histogram scratch of the radix selections (one per thread; the selections do not nest). */
const selHist = new Uint32Array(65536);

/** The bucket of `hist` holding rank `rank`: [bucket, rank within it, count below it]. */
function bucketOfRank(hist: Uint32Array, rank: number): [number, number, number] {
  let b = 0;
  let below = 0;
  while (rank >= hist[b]!) {
    rank -= hist[b]!;
    below += hist[b++]!;
  }
  return [b, rank, below];
}

/** Histogram of the keys' high 16 bits (a small function of its own: V8 optimizes it once). */
function histogramHigh(keys: Uint32Array, hist: Uint32Array): void {
  hist.fill(0);
  for (let i = 0; i < keys.length; i++) hist[keys[i]! >>> 16]++;
}

/** Histogram of the low 16 bits of the keys whose high 16 bits are `hi`. */
function histogramLow(keys: Uint32Array, hi: number, hist: Uint32Array): void {
  hist.fill(0);
  for (let i = 0; i < keys.length; i++) {
    const v = keys[i]!;
    if (v >>> 16 === hi) hist[v & 0xffff]++;
  }
}

/**
 * Radix selection on the 16-bit halves: a histogram of the high halves finds the bucket holding
 * rank k, a second histogram of the low halves within that bucket finds the value. Two linear
 * passes; `keys` is not modified.
 */
function radixSelect(keys: Uint32Array, k: number): Selection {
  return radixSelectRanks(keys, [k])[0]!;
}

/**
 * `radixSelect` for several ranks with one pass over the high halves, and one pass over the low
 * halves per distinct high bucket among the ranks.
 */
function radixSelectRanks(keys: Uint32Array, ks: readonly number[]): Selection[] {
  const n = keys.length;
  for (const k of ks) if (!(k >= 0 && k < n)) throw new RangeError(`selection: k=${k} out of range for ${n} values`);
  const hist = selHist;
  histogramHigh(keys, hist);
  const high = ks.map((k) => bucketOfRank(hist, k));
  const out: Selection[] = new Array(ks.length);
  for (let q = 0; q < ks.length; q++) {
    if (out[q]) continue;
    const hi = high[q]![0];
    histogramLow(keys, hi, hist);
    for (let r = q; r < ks.length; r++) {
      if (high[r]![0] !== hi) continue;
      const [lo, , belowLow] = bucketOfRank(hist, high[r]![1]);
      out[r] = { value: ((hi << 16) | lo) >>> 0, less: high[r]![2] + belowLow, equal: hist[lo]! };
    }
  }
  return out;
}

/** The `ks[i]`-th smallest (0-based) of `keys` for each i, sharing the passes. `keys` is not modified. */
export function selectKths(keys: Uint32Array, ks: readonly number[]): number[] {
  return radixSelectRanks(keys, ks).map((s) => s.value);
}

/** The k-th smallest (0-based) of `keys`, in linear time. `keys` is not modified. */
export function selectKth(keys: Uint32Array, k: number): number {
  return radixSelect(keys, k).value;
}

/** 2⁻³². */
const TWO_M32 = 2.3283064365386963e-10;

/**
 * Marks the `k` largest keys. Ties at the threshold are broken by lower flat index, so the
 * result is deterministic.
 */
export function topKMask(keys: Uint32Array, k: number): Uint8Array {
  return descendingRangeMask(keys, 0, k);
}

/** The top-k rule of a selection: keys above `thr`, and the first `ties` keys equal to it. */
interface TopRule {
  thr: number;
  ties: number;
}

/** The rule marking the `k` largest keys (0 < k < n). */
function topRule(sel: Selection, n: number, k: number): TopRule {
  return { thr: sel.value, ties: k - (n - sel.less - sel.equal) };
}

/**
 * Marks the keys at positions `[start, end)` of the descending order (largest first, ties by
 * lower flat index). One pass over the keys finds both thresholds; the marks are set without
 * branches on the keys (random outcomes defeat branch prediction), then corrected for the keys
 * equal to a threshold where only some of them are taken.
 */
export function descendingRangeMask(keys: Uint32Array, start: number, end: number): Uint8Array {
  const n = keys.length;
  const mask = new Uint8Array(n);
  const from = Math.max(0, start);
  const to = Math.min(n, end);
  if (to <= from) return mask;
  // Position < to: key ≥ hi (and, for key = hi, among the first hiTies); position < from: key > lo
  // or (key = lo and among the first loTies). Ranges that reach an end need no threshold.
  const ranks: number[] = [];
  if (to < n) ranks.push(n - to);
  if (from > 0) ranks.push(n - from);
  const sel = ranks.length ? radixSelectRanks(keys, ranks) : [];
  const upper = to < n ? topRule(sel[0]!, n, to) : undefined;
  const lower = from > 0 ? topRule(sel[sel.length - 1]!, n, from) : undefined;
  // key ≥ hi as ⌊(hi − 1 − key)·2⁻³²⌋ = −1 (exact for 32-bit keys); key ≤ lo likewise.
  const hi = upper ? upper.thr : 0;
  const lo = lower ? lower.thr : 4294967295;
  for (let i = 0; i < n; i++) {
    const key = keys[i]!;
    mask[i] = Math.floor((hi - 1 - key) * TWO_M32) * Math.floor((key - lo - 1) * TWO_M32);
  }
  // Keys equal to a threshold: the marks above took all of them for `hi` and none was excluded
  // for `lo`; keep only those whose rank among the equal keys (in index order) is inside.
  const hiEqual = upper ? sel[0]!.equal : 0;
  const needHi = upper !== undefined && upper.ties < hiEqual;
  const needLo = lower !== undefined && lower.ties > 0;
  if (needHi || needLo) {
    let seenHi = 0;
    let seenLo = 0;
    for (let i = 0; i < n; i++) {
      const key = keys[i]!;
      if (needHi && key === hi && ++seenHi > upper.ties) mask[i] = 0;
      if (needLo && key === lo && ++seenLo <= lower.ties) mask[i] = 0;
    }
  }
  return mask;
}

/** Exact order statistics of float32 values: the values at ascending positions `ks`. */
export function orderStatistics(values: Float32Array, ks: readonly number[]): number[] {
  const keys = sortableKeys(values);
  return ks.map((k) => sortableKeyToFloat(selectKth(keys, k)));
}

/** Scratch buffers for `magnitudeRanks`, reused for rows up to this length. */
const RANK_SCRATCH_MAX = 1 << 20;
let rankScratch: Uint32Array[] = [];
const rankCount = new Uint32Array(2048);

function rankBuffers(n: number): Uint32Array[] {
  if (n > RANK_SCRATCH_MAX) return [0, 1, 2, 3].map(() => new Uint32Array(n));
  if (rankScratch.length === 0 || rankScratch[0].length < n) rankScratch = [0, 1, 2, 3].map(() => new Uint32Array(n));
  return rankScratch;
}

/**
 * Ascending ranks (0-based) of |values[offset + j*stride]| for j < n: rank[j] is the position of
 * element j in the ascending order of magnitude, ties broken by lower index. Stable LSD radix
 * sort on the 31 magnitude bits (11-bit digits).
 */
export function magnitudeRanks(values: Float32Array, offset: number, stride: number, n: number, out: Uint32Array): void {
  let [keys, keys2, idx, idx2] = rankBuffers(n);
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  let or = 0;
  let and = 0x7fffffff;
  for (let j = 0; j < n; j++) {
    const k = bits[offset + j * stride] & 0x7fffffff;
    keys[j] = k;
    idx[j] = j;
    or |= k;
    and &= k;
  }
  const varying = or ^ and;
  for (let shift = 0; shift < 31; shift += 11) {
    if (((varying >>> shift) & 0x7ff) === 0) continue;
    rankCount.fill(0);
    for (let j = 0; j < n; j++) rankCount[(keys[j] >>> shift) & 0x7ff]++;
    let sum = 0;
    for (let d = 0; d < 2048; d++) {
      const c = rankCount[d];
      rankCount[d] = sum;
      sum += c;
    }
    for (let j = 0; j < n; j++) {
      const k = keys[j];
      const pos = rankCount[(k >>> shift) & 0x7ff]++;
      keys2[pos] = k;
      idx2[pos] = idx[j];
    }
    [keys, keys2] = [keys2, keys];
    [idx, idx2] = [idx2, idx];
  }
  for (let s = 0; s < n; s++) out[idx[s]] = s;
}
