/**
 * Shared pieces of the fused kernel of generalized task arithmetic (`fused.ts`): the stored
 * values it reads, its options, the chunk sizes, the key lists of the selection and the
 * interface both kernels (`fused-js.ts`, `fused-wasm.ts`) implement.
 */

/** Sign consensus of the GTA methods that elect signs (ties, dare_ties, ...). */
export type ConsensusMethod = 'sum';

/**
 * mergekit's divisor without sign consensus: the float32 sum of the float32 weights, in model
 * order; 1 where its magnitude is below 1e-8 (compared in float32, as torch does).
 */
export function scalarDivisorOf(weights: readonly number[]): number {
  let sum = 0;
  for (const w of weights) sum = Math.fround(sum + Math.fround(w));
  return Math.abs(sum) < Math.fround(1e-8) ? 1 : sum;
}

type RoundTo = { round?: 'BF16' | 'F16' };

/**
 * One tensor's stored values in memory: float32, or the raw bits of BF16 or F16. As an input,
 * `round` rounds each value to that dtype first (a merge's `dtype`), as `roundInPlace` does.
 */
export type MemoryValues = ({ dtype: 'F32'; data: Float32Array } | { dtype: 'BF16' | 'F16'; data: Uint16Array }) & RoundTo;

/**
 * Stored values read from an open file: `length` values from byte `offset`. `directFd`, where
 * given, is the same file opened with `O_DIRECT`: the WebAssembly kernel then reads whole pages
 * around the values into page-aligned memory, past the page cache.
 */
export type FileValues = { dtype: 'F32' | 'BF16' | 'F16'; fd: number; offset: number; length: number; directFd?: number } & RoundTo;

export type StoredValues = MemoryValues | FileValues;

export function storedLength(v: StoredValues): number {
  return 'data' in v ? v.data.length : v.length;
}

export interface FusedGtaModel {
  values: StoredValues;
  weight: number;
  /**
   * Elements kept by the magnitude top-k: null keeps all (no sparsifier, or density ≥ 1); 0 zeroes
   * the task vector (without `drop`: as `sparsify` 'magnitude' does, the model adds nothing).
   */
  keep: number | null;
  /**
   * Breadcrumbs ('magnitude_outliers'; given for every model of such a merge): the `drop` largest
   * magnitudes are dropped from the kept ones, so that descending ranks [drop, keep) are kept
   * (ties by lower flat index, as `descendingRangeMask`); 0 drops none. With it, a model that
   * keeps nothing still multiplies its task vector by 0 (as `applyMask`: NaN or ±Inf values give
   * NaN), and the WebAssembly combine hands any run that meets a NaN to the TypeScript one.
   */
  drop?: number;
}

export interface FusedGtaOptions {
  base: StoredValues;
  /** The non-base models, in merge order. */
  models: readonly FusedGtaModel[];
  consensus: ConsensusMethod | null;
  normalize: boolean;
  lambda: number;
  /** Receives the result: float32 values, or BF16 / F16 bits. Same length as the inputs. */
  out: MemoryValues;
  /**
   * Memory the WebAssembly kernel may hold for file-backed inputs (default 0). When every input
   * fits, each is read once, whole, and both passes read memory; otherwise the passes read the
   * files region by region (twice).
   */
  residentBytes?: number;
  /** The inputs are already in kernel memory (the base, then every model, in order). */
  preloaded?: Preloaded;
}

/**
 * Inputs already in this thread's kernel memory (see `kernelMemory`): the base's values from byte
 * `pIn`, the models' (all of them, in order) at `pIn + k * stride`, each followed by 16 zero bytes.
 */
export interface Preloaded {
  pIn: number;
  stride: number;
}


/** The largest finite float32. */
export const FLT_MAX = 3.4028234663852886e38;

/** Values per chunk of the passes (a multiple of 4). */
export const CHUNK = 16384;
/** Values per read of the WebAssembly kernel (a multiple of CHUNK). */
export const REGION = 65536;

/** A growable list of (index, key) pairs, interleaved, with a hard cap. */
export class KeyList {
  pairs: Int32Array;
  length = 0;
  overflow = false;
  constructor(
    initial: number,
    private readonly cap: number,
  ) {
    this.pairs = new Int32Array(2 * initial);
  }
  private room(count: number): boolean {
    const want = this.length + count;
    if (want <= this.pairs.length >>> 1) return true;
    if (want > this.cap) {
      this.overflow = true;
      return false;
    }
    let size = this.pairs.length >>> 1;
    while (size < want) size *= 2;
    const pairs = new Int32Array(2 * Math.min(this.cap, size));
    pairs.set(this.pairs.subarray(0, 2 * this.length));
    this.pairs = pairs;
    return true;
  }
  push(i: number, k: number): void {
    if (this.overflow || !this.room(1)) return;
    this.pairs[2 * this.length] = i;
    this.pairs[2 * this.length++ + 1] = k;
  }
  /** Appends `count` interleaved pairs of `src` from element `offset`. */
  pushPairs(src: Int32Array, offset: number, count: number): void {
    if (this.overflow || !this.room(count)) return;
    this.pairs.set(src.subarray(offset, offset + 2 * count), 2 * this.length);
    this.length += count;
  }
  index(i: number): number {
    return this.pairs[2 * i]!;
  }
  keys(): Uint32Array {
    const out = new Uint32Array(this.length);
    for (let i = 0; i < this.length; i++) out[i] = this.pairs[2 * i + 1]!;
    return out;
  }
}

/** Combine settings, per active model. Weights, lambda and the divisor are float32 values. */
export interface CombineSettings {
  /** The keep rule (thr = −1 keeps every element). */
  thr: Float64Array;
  cut: Float64Array;
  /**
   * Whether the models have exclusion rules (`dropThr`, `dropCut`: the elements they select are
   * dropped; breadcrumbs). The WebAssembly combine then notes NaN outputs too (see `sawNaN`).
   */
  exclude: boolean;
  /** The exclusion rule, read only with `exclude` (thr = 2^31 − 1 and cut = 0 drop nothing). */
  dropThr: Float64Array;
  dropCut: Float64Array;
  weights: readonly number[];
  consensus: boolean;
  normalize: boolean;
  lambda: number;
  /** The divisor without consensus (`scalarDivisorOf` over all models, zeroed ones included). */
  scalarDivisor: number;
  /** Every task vector and weighted value is finite (see `runFused`). */
  finite: boolean;
}

/**
 * The chunk passes over one tensor. `load` brings values [start, start + len) of the base and of
 * some models (indices of the active models) into the kernel; the other calls work on the chunk
 * loaded last.
 */
export interface Kernel {
  load(start: number, len: number, models: readonly number[], readAhead: boolean): void;
  /**
   * The bracket pass over the chunk: per entry t (model `models[t]`), counts the keys above hi[t],
   * equal to hi[t] and equal to lo[t], and lists those strictly between. The entries of one model
   * are next to each other (at most two), and its keys are computed once for them.
   */
  window(len: number, models: readonly number[], lo: readonly number[], hi: readonly number[], index0: number, lists: readonly KeyList[]): BracketCounts[];
  /** Computes model m's keys of the chunk, which `key`, `histHigh` and `bucket` read. */
  keys(m: number, len: number): void;
  key(j: number): number;
  /** Adds the keys' upper 16 bits to histogram `slot` (32768 counts; a slot per model). */
  histHigh(len: number, slot: number): void;
  histogram(slot: number): Uint32Array;
  /**
   * For keys whose upper 16 bits are `bucket`: the lower-16-bit histogram `slot` (a slot per
   * selection, at most two per model) and the list.
   */
  bucket(len: number, bucket: number, slot: number, index0: number, list: KeyList): void;
  lowHistogram(slot: number): Uint32Array;
  /** Values [start, start + len) of the result, from a chunk loaded with every model. */
  combine(start: number, len: number, s: CombineSettings): void;
  /** Whether the run met a NaN that the TypeScript kernel is to redo it for (see `WasmKernel.sawNaN`). */
  sawNaN(): boolean;
  /** The largest input magnitude the bracket passes read (every input of every model they covered), or Infinity if unknown. */
  maxInput(): number;
  close(): void;
}

export interface KeepRule {
  thr: number;
  cut: number;
}

export interface BracketCounts {
  above: number;
  atHi: number;
  atLo: number;
}

