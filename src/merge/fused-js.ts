/**
 * The fused kernel's chunk passes in TypeScript: used where the WebAssembly module is not built,
 * for dtypes it does not take (F16, mixed, F32 rounded to BF16), and to redo a run that met a NaN.
 */
import { narrowBf16Block, narrowF16Block, roundBitsBlock, widenBf16Block, widenF16Block } from '../tensor/dtype.js';
import { CHUNK, type BracketCounts, type CombineSettings, type Kernel, type KeyList, type MemoryValues } from './fused-common.js';

/** Reads chunks of stored values as float32 bit patterns. */
class BlockReader {
  private readonly f32: Int32Array | null;
  private readonly u16: Uint16Array | null;
  private readonly words: Int32Array | null;
  private readonly bf16: boolean;
  private readonly round: 'BF16' | 'F16' | undefined;
  private readonly from: 'F32' | 'BF16' | 'F16';

  constructor(v: MemoryValues) {
    this.round = v.round;
    this.from = v.dtype;
    if (v.dtype === 'F32') {
      this.f32 = new Int32Array(v.data.buffer, v.data.byteOffset, v.data.length);
      this.u16 = null;
      this.words = null;
      this.bf16 = false;
    } else {
      this.f32 = null;
      this.u16 = v.data;
      this.bf16 = v.dtype === 'BF16';
      this.words = this.bf16 && (v.data.byteOffset & 3) === 0 ? new Int32Array(v.data.buffer, v.data.byteOffset, v.data.length >>> 1) : null;
    }
  }

  /** Values [start, start + count) into dst[0, count). */
  read(start: number, count: number, dst: Int32Array): void {
    const f = this.f32;
    if (f !== null) copyFrom(f, start, dst, count);
    else if (this.bf16) widenBf16Block(this.u16!, this.words, start, count, dst);
    else widenF16Block(this.u16!, start, count, dst);
    if (this.round !== undefined) roundBitsBlock(this.round, dst, count, this.from);
  }
}

/** A float32 chunk and its bit view. */
function f32Chunk(n: number): { f: Float32Array; i: Int32Array } {
  const f = new Float32Array(n);
  return { f, i: new Int32Array(f.buffer) };
}

// The chunk loops, each a small function of typed arrays so that it is optimised on its own.

function copyFrom(src: Int32Array, start: number, dst: Int32Array, len: number): void {
  for (let j = 0; j < len; j++) dst[j] = src[start + j]!;
}

function copyTo(src: Int32Array, dst: Int32Array, start: number, len: number): void {
  for (let j = 0; j < len; j++) dst[start + j] = src[j]!;
}

/** tau = x − base (float32) and its magnitude keys (bit patterns without the sign) in `keys`, which views `tau`. */
function magnitudeKeysOf(x: Float32Array, base: Float32Array, tau: Float32Array, keys: Int32Array, len: number): void {
  for (let j = 0; j < len; j++) {
    tau[j] = x[j]! - base[j]!;
    keys[j] = keys[j]! & 0x7fffffff;
  }
}

function windowOf(keys: Int32Array, len: number, lo: number, hi: number, index0: number, list: KeyList): BracketCounts {
  let above = 0;
  let atHi = 0;
  let atLo = 0;
  for (let j = 0; j < len; j++) {
    const k = keys[j]!;
    above += +(k > hi);
    atHi += +(k === hi);
    atLo += +(k === lo);
    if (k > lo && k < hi) list.push(index0 + j, k);
  }
  return { above, atHi, atLo };
}

function histHighOf(keys: Int32Array, len: number, h: Uint32Array): void {
  for (let j = 0; j < len; j++) h[keys[j]! >>> 16]++;
}

function bucketOf(keys: Int32Array, len: number, b: number, low: Uint32Array, index0: number, list: KeyList): void {
  for (let j = 0; j < len; j++) {
    const k = keys[j]!;
    if (k >>> 16 === b) {
      low[k & 0xffff]++;
      list.push(index0 + j, k);
    }
  }
}

/**
 * One model's weighted, sparsified task vector: v = fround(w · (tau · keep)) with the keep rule
 * (thr, cut) and the float32 weight w; adds v to `total` (float32).
 */
function weightedKept(
  x: Float32Array,
  base: Float32Array,
  tau: Float32Array,
  bits: Int32Array,
  v: Float32Array,
  total: Float32Array,
  w: number,
  thr: number,
  cut: number,
  len: number,
): void {
  for (let j = 0; j < len; j++) {
    tau[j] = x[j]! - base[j]!;
    const key = bits[j]! & 0x7fffffff;
    // key > thr without a branch (both within [-1, 2^31)); ties are rare, so their branch is predictable.
    let keep = (thr - key) >>> 31;
    if (key === thr && j < cut) keep = 1;
    const val = Math.fround(w * (tau[j]! * keep));
    v[j] = val;
    total[j] += val;
  }
}

/**
 * `weightedKept` with an exclusion rule (thrE, cutE) as well: an element is kept when the keep
 * rule takes it and the exclusion rule does not (breadcrumbs' ranks [n_top, k)).
 */
function weightedKeptRange(
  x: Float32Array,
  base: Float32Array,
  tau: Float32Array,
  bits: Int32Array,
  v: Float32Array,
  total: Float32Array,
  w: number,
  thr: number,
  cut: number,
  thrE: number,
  cutE: number,
  len: number,
): void {
  for (let j = 0; j < len; j++) {
    tau[j] = x[j]! - base[j]!;
    const key = bits[j]! & 0x7fffffff;
    let keep = (thr - key) >>> 31;
    if (key === thr && j < cut) keep = 1;
    let drop = (thrE - key) >>> 31;
    if (key === thrE && j < cutE) drop = 1;
    const val = Math.fround(w * (tau[j]! * (keep & (drop ^ 1))));
    v[j] = val;
    total[j] += val;
  }
}

function electSigns(total: Float32Array, len: number): void {
  // +1 where total ≥ 0, else −1 (NaN included).
  for (let j = 0; j < len; j++) total[j] = 2 * +(total[j]! >= 0) - 1;
}

function agreeing(v: Float32Array, sign: Float32Array, mixed: Float32Array, divisor: Float32Array, w: number, len: number): void {
  for (let j = 0; j < len; j++) {
    const val = v[j]!;
    const agree = +(val * sign[j]! > 0);
    mixed[j] += val * agree;
    divisor[j] += w * agree;
  }
}

function finishConsensus(base: Float32Array, mixed: Float32Array, divisor: Float32Array, out: Float32Array, normalize: boolean, lambda: number, len: number): void {
  for (let j = 0; j < len; j++) {
    let val = mixed[j]!;
    // A divisor of ±0 becomes 1: d + (d === 0) is d elsewhere.
    if (normalize) val = Math.fround(val / (divisor[j]! + +(divisor[j] === 0)));
    if (lambda !== 1) val = Math.fround(val * lambda);
    out[j] = base[j]! + val;
  }
}

function finishSum(base: Float32Array, total: Float32Array, out: Float32Array, divisor: number, normalize: boolean, lambda: number, len: number): void {
  for (let j = 0; j < len; j++) {
    let val = total[j]!;
    if (normalize) val = Math.fround(val / divisor);
    if (lambda !== 1) val = Math.fround(val * lambda);
    out[j] = base[j]! + val;
  }
}

export class JsKernel implements Kernel {
  private readonly base: BlockReader;
  private readonly readers: BlockReader[];
  private readonly b = f32Chunk(CHUNK);
  private readonly xs: { f: Float32Array; i: Int32Array }[];
  private readonly tau = f32Chunk(CHUNK);
  private readonly hists: Uint32Array[] = [];
  private readonly lows: Uint32Array[] = [];
  private readonly v: Float32Array[];
  private readonly total = new Float32Array(CHUNK);
  private readonly mixed = new Float32Array(CHUNK);
  private readonly divisor = new Float32Array(CHUNK);
  private readonly outChunk = f32Chunk(CHUNK);
  private readonly outBits: Int32Array | null;

  constructor(
    base: MemoryValues,
    models: readonly MemoryValues[],
    private readonly out: MemoryValues,
  ) {
    this.base = new BlockReader(base);
    this.readers = models.map((m) => new BlockReader(m));
    this.xs = models.map(() => f32Chunk(CHUNK));
    this.v = models.map(() => new Float32Array(CHUNK));
    this.outBits = out.dtype === 'F32' ? new Int32Array(out.data.buffer, out.data.byteOffset, out.data.length) : null;
  }

  load(start: number, len: number, models: readonly number[]): void {
    this.base.read(start, len, this.b.i);
    for (const m of models) this.readers[m]!.read(start, len, this.xs[m]!.i);
  }

  window(len: number, models: readonly number[], lo: readonly number[], hi: readonly number[], index0: number, lists: readonly KeyList[]): BracketCounts[] {
    return models.map((m, t) => {
      if (t === 0 || models[t - 1] !== m) this.keys(m, len);
      return windowOf(this.tau.i, len, lo[t]!, hi[t]!, index0, lists[t]!);
    });
  }

  keys(m: number, len: number): void {
    magnitudeKeysOf(this.xs[m]!.f, this.b.f, this.tau.f, this.tau.i, len);
  }

  key(j: number): number {
    return this.tau.i[j]!;
  }

  histHigh(len: number, slot: number): void {
    histHighOf(this.tau.i, len, this.histogram(slot));
  }

  histogram(slot: number): Uint32Array {
    return (this.hists[slot] ??= new Uint32Array(32768));
  }

  bucket(len: number, b: number, slot: number, index0: number, list: KeyList): void {
    bucketOf(this.tau.i, len, b, this.lowHistogram(slot), index0, list);
  }

  lowHistogram(slot: number): Uint32Array {
    return (this.lows[slot] ??= new Uint32Array(65536));
  }

  combine(start: number, len: number, s: CombineSettings): void {
    const bf = this.b.f;
    const total = this.total;
    total.fill(0, 0, len);
    for (let m = 0; m < this.xs.length; m++) {
      if (s.exclude) {
        weightedKeptRange(this.xs[m]!.f, bf, this.tau.f, this.tau.i, this.v[m]!, total, s.weights[m]!, s.thr[m]!, s.cut[m]! - start, s.dropThr[m]!, s.dropCut[m]! - start, len);
      } else {
        weightedKept(this.xs[m]!.f, bf, this.tau.f, this.tau.i, this.v[m]!, total, s.weights[m]!, s.thr[m]!, s.cut[m]! - start, len);
      }
    }
    const of = this.outChunk.f;
    if (s.consensus) {
      this.mixed.fill(0, 0, len);
      this.divisor.fill(0, 0, len);
      electSigns(total, len);
      for (let m = 0; m < this.xs.length; m++) agreeing(this.v[m]!, total, this.mixed, this.divisor, s.weights[m]!, len);
      finishConsensus(bf, this.mixed, this.divisor, of, s.normalize, s.lambda, len);
    } else {
      finishSum(bf, total, of, s.scalarDivisor, s.normalize, s.lambda, len);
    }
    if (this.outBits !== null) copyTo(this.outChunk.i, this.outBits, start, len);
    else if (this.out.dtype === 'BF16') narrowBf16Block(this.outChunk.i, len, this.out.data, start);
    else narrowF16Block(this.outChunk.i, len, this.out.data as Uint16Array, start);
  }

  sawNaN(): boolean {
    return false;
  }

  maxInput(): number {
    return Infinity;
  }

  close(): void {}
}

