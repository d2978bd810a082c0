/**
 * Generalized task arithmetic (merge-methods.md §3): the pipeline shared by task_arithmetic,
 * ties, dare_*, breadcrumbs*, della*. Task vectors → sparsify → weight → sign consensus or plain
 * sum → normalise → λ → base + mixed.
 */
import { existsSync, readFileSync, readSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { wasmSimdSupported } from '../backend/wasm/module.js';
import { type WasmMemory, wasm } from '../backend/wasm/wasm-api.js';
import { AmalgamError } from '../errors.js';
import { narrowBf16Block, narrowF16Block, roundBitsBlock, widenBf16Block, widenF16Block } from '../tensor/dtype.js';
import { copyOf, maskSourceOf, output, splitBase } from './common.js';
import { globalBool, globalNumber, modelNumber, resolvedModelNumber } from './params.js';
import { checkDellaEpsilon, sparsify, zeroedWarning, type SparsifyMethod } from './sparsify.js';
import { cutSubmatrix, sameShape, selectKth, selectKths, shapeString, subtract } from './tensor-ops.js';
import type { MergeContext, MergeInput, MergeMethod, MergeOutput, ParamSpec, ResolvedParams, ValidateContext } from './types.js';

export type ConsensusMethod = 'sum';

const COMBINE_BLOCK = 4096;

export interface GtaVariant {
  name: string;
  prettyName: string;
  reference?: string;
  sparsification: SparsifyMethod | null;
  consensus: ConsensusMethod | null;
  defaultNormalize: boolean;
  defaultRescale: boolean;
}

/**
 * The task vector x − base of one model. Embeddings larger than the base are cut to the base's
 * shape; a smaller embedding or any other shape mismatch is an error (mergekit fails late or
 * silently skips the model).
 */
export function taskVector(ctx: MergeContext, method: string, base: MergeInput, x: MergeInput): Float32Array {
  if (x.data.length !== base.data.length || !sameShape(x.shape, base.shape)) {
    if (ctx.isEmbed && x.shape.length === 2 && base.shape.length === 2) {
      const [rows, cols] = base.shape;
      if (x.shape[0] < rows || x.shape[1] < cols) {
        throw new AmalgamError(
          'E_SHAPE',
          `${method}: embedding of model ${x.model} ${shapeString(x.shape)} is smaller than the base model's ${shapeString(base.shape)}`,
          { key: ctx.tensorName, hint: 'set tokenizer_source (or tokenizer:) to merge models with different vocabularies' },
        );
      }
      ctx.warn?.(`${ctx.tensorName}: using the ${shapeString(base.shape)} submatrix of model ${x.model}'s ${shapeString(x.shape)} embedding`);
      return subtract(cutSubmatrix(x.data, x.shape, rows, cols), base.data);
    }
    throw new AmalgamError(
      'E_SHAPE',
      `${method}: model ${x.model} has shape ${shapeString(x.shape)} but the base model ${base.model} has ${shapeString(base.shape)}`,
      { key: ctx.tensorName, hint: 'every model must have the base model\'s shape for this tensor' },
    );
  }
  return subtract(x.data, base.data);
}

/** Checks a per-model density (finite, in [0, 1]). */
export function checkDensity(density: number, tensorName: string, model: string): void {
  if (!(density >= 0 && density <= 1)) {
    throw new AmalgamError('E_CONFIG', `model ${model}: density must be in [0, 1], got ${density}`, { key: tensorName });
  }
}

/**
 * mergekit's divisor without sign consensus: the float32 sum of the float32 weights, in model
 * order; 1 where its magnitude is below 1e-8 (compared in float32, as torch does).
 */
export function scalarDivisorOf(weights: readonly number[]): number {
  let sum = 0;
  for (const w of weights) sum = Math.fround(sum + Math.fround(w));
  return Math.abs(sum) < Math.fround(1e-8) ? 1 : sum;
}

/**
 * Combines weighted, sparsified task vectors onto the base (steps 3–6 of §3.1). `weights[m]`
 * pairs with `deltas[m]`. Every operation is float32, element by element in mergekit's order:
 * v = w·τ, the sums over models in model order from +0, the division, λ and base + mixed.
 */
export function combineTaskVectors(
  base: Float32Array,
  deltas: readonly Float32Array[],
  weights: readonly number[],
  consensus: ConsensusMethod | null,
  normalize: boolean,
  lambda: number,
): Float32Array {
  const n = base.length;
  const m = deltas.length;
  const out = new Float32Array(n);
  const wf = weights.map((w) => Math.fround(w));
  const lam = Math.fround(lambda);
  const scalarDivisor = scalarDivisorOf(weights);
  // Model-major passes over blocks keep the inner loops monomorphic. Float32Array stores round
  // each float64 result to float32; for +, ·, / of float32 operands that equals the float32 op.
  const B = Math.min(n, COMBINE_BLOCK);
  const total = new Float32Array(B);
  const mixed = new Float32Array(B);
  const divisor = new Float32Array(B);
  for (let start = 0; start < n; start += B) {
    const len = Math.min(B, n - start);
    total.fill(0);
    for (let k = 0; k < m; k++) {
      const d = deltas[k];
      const w = wf[k];
      for (let j = 0; j < len; j++) total[j] += Math.fround(w * d[start + j]);
    }
    if (consensus === 'sum') {
      // Elected sign: + where the weighted sum is ≥ 0. Zero deltas never agree.
      for (let j = 0; j < len; j++) total[j] = total[j] >= 0 ? 1 : -1;
      mixed.fill(0);
      divisor.fill(0);
      for (let k = 0; k < m; k++) {
        const d = deltas[k];
        const w = wf[k];
        for (let j = 0; j < len; j++) {
          const v = Math.fround(w * d[start + j]);
          const agree = +(v * total[j] > 0);
          mixed[j] += v * agree;
          divisor[j] += w * agree;
        }
      }
      for (let j = 0; j < len; j++) {
        let v = mixed[j];
        if (normalize) v = Math.fround(v / (divisor[j] === 0 ? 1 : divisor[j]));
        if (lam !== 1) v = Math.fround(v * lam);
        out[start + j] = base[start + j] + v;
      }
    } else {
      for (let j = 0; j < len; j++) {
        let v = total[j];
        if (normalize) v = Math.fround(v / scalarDivisor);
        if (lam !== 1) v = Math.fround(v * lam);
        out[start + j] = base[start + j] + v;
      }
    }
  }
  return out;
}

const VARIANTS = new WeakMap<MergeMethod, GtaVariant>();

/** The GTA variant a method was made from, or undefined for other methods. */
export function gtaVariantOf(method: MergeMethod): GtaVariant | undefined {
  return VARIANTS.get(method);
}

/** Whether the fused kernel computes this variant with this `rescale` setting. */
export function fusedApplies(v: GtaVariant, rescale: unknown): boolean {
  return v.sparsification === null || (v.sparsification === 'magnitude' && rescale === false);
}

/** One input of `fusedMerge`. */
export interface StoredInput {
  model: string;
  shape: readonly number[];
  values: StoredValues;
}

/**
 * Merges stored inputs with a GTA variant through the fused kernel into `out`, with the checks,
 * warnings and errors of the method's `merge`. Returns false, having done nothing, where the
 * kernel does not apply: another sparsifier, rescale, no base among the inputs, no other model,
 * or inputs whose shapes differ from the base's.
 */
export function fusedMerge(
  v: GtaVariant,
  ctx: Omit<MergeContext, 'inputs'>,
  inputs: readonly StoredInput[],
  out: MemoryValues,
  opts: { residentBytes?: number; preloaded?: Preloaded } = {},
): boolean {
  let base: StoredInput | undefined;
  const others: StoredInput[] = [];
  for (const t of inputs) {
    if (ctx.base !== null && t.model === ctx.base) base = t;
    else others.push(t);
  }
  if (!base || others.length === 0) return false;
  const n = storedLength(base.values);
  if (out.data.length !== n) return false;
  for (const x of others) if (storedLength(x.values) !== n || !sameShape(x.shape, base.shape)) return false;
  const c = { ...ctx, inputs: [] };
  const normalize = globalBool(c, 'normalize');
  const rescale = globalBool(c, 'rescale');
  const lambda = globalNumber(c, 'lambda');
  if (!fusedApplies(v, rescale)) return false;
  const models: FusedGtaModel[] = [];
  for (const x of others) {
    let keep: number | null = null;
    if (v.sparsification) {
      const density = modelNumber(c, x.model, 'density');
      checkDensity(density, ctx.tensorName, x.model);
      if (density < 1) {
        keep = Math.trunc(density * n);
        if (keep <= 0) {
          ctx.warn?.(zeroedWarning(ctx.tensorName, x.model, density, n));
          keep = 0;
        }
      }
    }
    models.push({ values: x.values, weight: modelNumber(c, x.model, 'weight'), keep });
  }
  fusedGta({
    base: base.values,
    models,
    consensus: v.consensus,
    normalize,
    lambda,
    out,
    ...(opts.residentBytes ? { residentBytes: opts.residentBytes } : {}),
    ...(opts.preloaded ? { preloaded: opts.preloaded } : {}),
  });
  return true;
}

export function makeGtaMethod(v: GtaVariant): MergeMethod {
  const globalParams: Record<string, ParamSpec> = {
    normalize: { type: 'boolean', default: v.defaultNormalize, description: 'divide by the sum of weights' },
    rescale: { type: 'boolean', default: v.defaultRescale, description: 'restore the L1 norm after sparsification' },
    lambda: { type: 'number', default: 1.0, description: 'scale of the merged task vector' },
    int8_mask: { type: 'boolean', default: false, description: 'accepted for compatibility; no numerical effect' },
  };
  const perModelParams: Record<string, ParamSpec> = {
    weight: { type: 'number', required: true, description: 'weight of the task vector' },
    density: { type: 'number', default: 1.0, description: 'fraction of the task vector kept' },
  };
  if (v.sparsification === 'magnitude_outliers') {
    perModelParams.gamma = { type: 'number', default: 0.01, description: 'fraction of the largest magnitudes dropped' };
  }
  if (v.sparsification === 'della_magprune') {
    perModelParams.epsilon = { type: 'number', default: 0.15, description: 'spread of keep probabilities around density' };
  }

  const method: MergeMethod = {
    name: v.name,
    prettyName: v.prettyName,
    reference: v.reference,
    globalParams,
    perModelParams,
    needsBase: 'required',
    randomized: v.sparsification === 'random' || v.sparsification === 'della_magprune',

    validate(params: ResolvedParams, vctx: ValidateContext): void {
      if (vctx.base === null) {
        throw new AmalgamError('E_CONFIG', `${v.name} needs a base model`, { key: vctx.tensorName, hint: 'set base_model:' });
      }
      for (const model of vctx.models.filter((m) => m !== vctx.base)) {
        const density = resolvedModelNumber(params, model, 'density') ?? 1;
        checkDensity(density, vctx.tensorName, model);
        if (v.sparsification === 'magnitude_outliers') {
          const gamma = resolvedModelNumber(params, model, 'gamma') ?? 0.01;
          if (!(gamma >= 0 && gamma <= 1)) {
            throw new AmalgamError('E_CONFIG', `model ${model}: gamma must be in [0, 1], got ${gamma}`, { key: vctx.tensorName });
          }
        }
        if (v.sparsification === 'della_magprune') {
          checkDellaEpsilon(density, resolvedModelNumber(params, model, 'epsilon') ?? 0.15, vctx.tensorName, model);
        }
      }
    },

    merge(ctx: MergeContext): MergeOutput {
      const { base, others } = splitBase(ctx, v.name, true);
      if (others.length === 0) return copyOf(base!);
      if (others.every((x) => x.data.length === base!.data.length && sameShape(x.shape, base!.shape))) {
        const out = new Float32Array(base!.data.length);
        const stored = ctx.inputs.map((t) => ({ model: t.model, shape: t.shape, values: { dtype: 'F32' as const, data: t.data } }));
        if (fusedMerge(v, ctx, stored, { dtype: 'F32', data: out })) return output(out, base!.shape);
      }
      const normalize = globalBool(ctx, 'normalize');
      const rescale = globalBool(ctx, 'rescale');
      const lambda = globalNumber(ctx, 'lambda');
      const masks = v.sparsification === 'random' || v.sparsification === 'della_magprune' ? maskSourceOf(ctx) : undefined;
      const deltas: Float32Array[] = [];
      const weights: number[] = [];
      for (const x of others) {
        let delta = taskVector(ctx, v.name, base!, x);
        if (v.sparsification) {
          const density = modelNumber(ctx, x.model, 'density');
          checkDensity(density, ctx.tensorName, x.model);
          delta = sparsify(delta, {
            method: v.sparsification,
            density,
            gamma: v.sparsification === 'magnitude_outliers' ? modelNumber(ctx, x.model, 'gamma') : undefined,
            epsilon: v.sparsification === 'della_magprune' ? modelNumber(ctx, x.model, 'epsilon') : undefined,
            rescale,
            shape: base!.shape,
            tensorName: ctx.tensorName,
            model: x.model,
            masks,
            warn: ctx.warn,
          });
        }
        deltas.push(delta);
        weights.push(modelNumber(ctx, x.model, 'weight'));
      }
      return output(combineTaskVectors(base!.data, deltas, weights, v.consensus, normalize, lambda), base!.shape);
    },
  };
  VARIANTS.set(method, v);
  return method;
}

// ---------------------------------------------------------------------------------------------
// Fused kernel
//
// Task vectors, the magnitude top-k, the weighting and the combine, streamed in chunks straight
// from the stored values (float32, or the bits of BF16 / F16; in memory, or read from a file
// chunk by chunk), with no task vector, key or mask array per model. Element by element it does
// the same float32 arithmetic as `taskVector`, `sparsify` ('magnitude' without rescale) and
// `combineTaskVectors`, in the same order, so the results are identical. The chunk passes run
// in WebAssembly SIMD (assembly/merge.ts, built by `npm run build:wasm`) where the module is
// built and the dtypes suit it, in TypeScript otherwise.
//
// The top-k keep rule of one model is a threshold key `thr` and an index cut `cut`: element j is
// kept when key(j) > thr, or key(j) = thr and j < cut (ties by lower flat index, as `topKMask`).
// Both come from an exact selection over the keys:
// - large tensors: a sample of the keys brackets the threshold; one pass counts the keys above
//   the bracket and lists those inside it, and the selection finishes on that list. When the
//   bracket misses (or the list overflows), the model falls back to the histogram selection;
// - otherwise: a histogram of the upper 16 key bits finds the threshold's bucket, a second pass
//   lists (or histograms, then scans for the cut) the keys in that bucket.

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
  /** Elements kept by the magnitude top-k: null keeps all (no sparsifier, or density ≥ 1); 0 zeroes the task vector. */
  keep: number | null;
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

/** The largest finite float32. */
const FLT_MAX = 3.4028234663852886e38;

/** Values per chunk of the passes (a multiple of 4). */
const CHUNK = 16384;
/** Values per read of the WebAssembly kernel (a multiple of CHUNK). */
const REGION = 65536;
/** Tensors at least this large bracket the threshold from a sample. */
const SAMPLE_MIN = 1 << 20;
const SAMPLE_RUNS = 128;
const SAMPLE_RUN = 512;
/** Bracket half-width in standard deviations of the sample rank. */
const SAMPLE_SIGMAS = 6;

/** A growable list of (index, key) pairs, interleaved, with a hard cap. */
class KeyList {
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
interface CombineSettings {
  thr: Float64Array;
  cut: Float64Array;
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
interface Kernel {
  load(start: number, len: number, models: readonly number[], readAhead: boolean): void;
  /**
   * The bracket pass over the chunk: per model t, counts the keys above hi[t], equal to hi[t] and
   * equal to lo[t], and lists those strictly between.
   */
  window(len: number, models: readonly number[], lo: readonly number[], hi: readonly number[], index0: number, lists: readonly KeyList[]): BracketCounts[];
  /** Computes model m's keys of the chunk, which `key`, `histHigh` and `bucket` read. */
  keys(m: number, len: number): void;
  key(j: number): number;
  /** Adds the keys' upper 16 bits to histogram `slot` (32768 counts). */
  histHigh(len: number, slot: number): void;
  histogram(slot: number): Uint32Array;
  /** For keys whose upper 16 bits are `bucket`: the lower-16-bit histogram `slot` and the list. */
  bucket(len: number, bucket: number, slot: number, index0: number, list: KeyList): void;
  lowHistogram(slot: number): Uint32Array;
  /** Values [start, start + len) of the result, from a chunk loaded with every model. */
  combine(start: number, len: number, s: CombineSettings): void;
  /** Whether an input NaN was read where rounding would have changed it. */
  sawNaN(): boolean;
  /** The largest input magnitude the bracket passes read (every input of every model they covered), or Infinity if unknown. */
  maxInput(): number;
  close(): void;
}

interface KeepRule {
  thr: number;
  cut: number;
}

interface BracketCounts {
  above: number;
  atHi: number;
  atLo: number;
}

/**
 * The keep rule that marks the `need` largest keys of a list in index order (ties by lower
 * position), given that every key outside the list is either above all of it or below all of it.
 */
function ruleFromList(list: KeyList, need: number): KeepRule {
  const keys = list.keys();
  const thr = selectKth(keys, list.length - need);
  let greater = 0;
  for (let i = 0; i < list.length; i++) if (keys[i]! > thr) greater++;
  let ties = need - greater;
  for (let i = 0; i < list.length; i++) {
    if (keys[i] === thr && --ties === 0) return { thr, cut: list.index(i) + 1 };
  }
  throw new Error('fused top-k: threshold not found in its list');
}

/**
 * One past the index of the `rank`-th (1-based, in index order) key of model m equal to `key`,
 * given how many there are in each chunk.
 */
function cutAt(kernel: Kernel, m: number, key: number, rank: number, perChunk: Float64Array): number {
  let c = 0;
  while (rank > perChunk[c]!) rank -= perChunk[c++]!;
  const start = c * CHUNK;
  const len = Math.min(CHUNK, perChunk.length * CHUNK - start);
  kernel.load(start, len, [m], false);
  kernel.keys(m, len);
  for (let j = 0; j < len; j++) if (kernel.key(j) === key && --rank === 0) return start + j + 1;
  throw new Error('fused top-k: the cut is not in its chunk');
}

/** Runs `visit` on every chunk of the listed models' keys, in index order, until it returns false. */
function sweep(kernel: Kernel, n: number, models: readonly number[], visit: (m: number, start: number, len: number) => boolean): void {
  const live = models.slice();
  for (let start = 0; start < n && live.length; start += CHUNK) {
    const len = Math.min(CHUNK, n - start);
    kernel.load(start, len, live, true);
    for (let t = 0; t < live.length; ) {
      const m = live[t]!;
      kernel.keys(m, len);
      if (visit(m, start, len)) t++;
      else live.splice(t, 1);
    }
  }
}

/** The keep rules of the models with `kKeep.get(m)` elements kept (1 ≤ kKeep < n). */
function selectRules(kernel: Kernel, n: number, kKeep: ReadonlyMap<number, number>): { rules: Map<number, KeepRule>; bracketed: boolean } {
  const rules = new Map<number, KeepRule>();
  let bracketed = false;
  let pending = [...kKeep.keys()];
  const cap = Math.max(1 << 16, Math.ceil(n / 16));
  const want = (m: number) => kKeep.get(m)!;

  if (n >= SAMPLE_MIN && pending.length) {
    // Keys of every model at SAMPLE_RUNS evenly spread runs of SAMPLE_RUN values.
    const S = SAMPLE_RUNS * SAMPLE_RUN;
    const samples = pending.map(() => new Uint32Array(S));
    const step = (n - SAMPLE_RUN) / (SAMPLE_RUNS - 1);
    for (let r = 0; r < SAMPLE_RUNS; r++) {
      kernel.load(Math.floor(r * step), SAMPLE_RUN, pending, false);
      pending.forEach((m, t) => {
        kernel.keys(m, SAMPLE_RUN);
        const out = samples[t]!;
        for (let j = 0; j < SAMPLE_RUN; j++) out[r * SAMPLE_RUN + j] = kernel.key(j);
      });
    }
    // The bracket [lo, hi] around the threshold's rank, both ends from one selection per model.
    const lo: number[] = [];
    const hi: number[] = [];
    pending.forEach((m, t) => {
      const q = (n - want(m)) / n;
      const w = Math.ceil(SAMPLE_SIGMAS * Math.sqrt(S * q * (1 - q))) + 8;
      const r = Math.floor(q * S);
      const ranks = [r - w <= 0 ? 0 : r - w, r + w >= S - 1 ? 0 : r + w];
      const [a, b] = selectKths(samples[t]!, ranks);
      lo.push(r - w <= 0 ? 0 : a!);
      hi.push(r + w >= S - 1 ? 0x7fffffff : b!);
    });
    const chunks = Math.ceil(n / CHUNK);
    const above = pending.map(() => 0);
    const atHi = pending.map(() => new Float64Array(chunks));
    const atLo = pending.map(() => new Float64Array(chunks));
    const lists = pending.map(() => new KeyList(1 << 14, cap));
    for (let start = 0, c = 0; start < n; start += CHUNK, c++) {
      const len = Math.min(CHUNK, n - start);
      kernel.load(start, len, pending, true);
      const counts = kernel.window(len, pending, lo, hi, start, lists);
      for (let t = 0; t < pending.length; t++) {
        above[t] += counts[t]!.above;
        atHi[t]![c] = counts[t]!.atHi;
        atLo[t]![c] = counts[t]!.atLo;
      }
      if (lists.every((l) => l.overflow)) break;
      bracketed = start + CHUNK >= n;
    }
    const failed: number[] = [];
    pending.forEach((m, t) => {
      const list = lists[t]!;
      const sum = (a: Float64Array) => a.reduce((x, y) => x + y, 0);
      let need = want(m) - above[t]!;
      const nHi = sum(atHi[t]!);
      if (list.overflow || need < 1) return failed.push(m);
      if (need <= nHi) return rules.set(m, { thr: hi[t]!, cut: cutAt(kernel, m, hi[t]!, need, atHi[t]!) });
      if (lo[t] === hi[t]) return failed.push(m);
      need -= nHi;
      if (need <= list.length) return rules.set(m, ruleFromList(list, need));
      need -= list.length;
      if (need <= sum(atLo[t]!)) return rules.set(m, { thr: lo[t]!, cut: cutAt(kernel, m, lo[t]!, need, atLo[t]!) });
      failed.push(m);
    });
    pending = failed;
  }
  if (pending.length === 0) return { rules, bracketed };

  // Histogram of the upper 16 bits, then the threshold's bucket.
  const slot = new Map(pending.map((m, i) => [m, i]));
  sweep(kernel, n, pending, (m, _start, len) => {
    kernel.histHigh(len, slot.get(m)!);
    return true;
  });
  const bucket = new Map<number, number>();
  const lessBucket = new Map<number, number>();
  for (const m of pending) {
    const h = kernel.histogram(slot.get(m)!);
    let rank = n - want(m);
    let less = 0;
    let b = 0;
    while (rank >= h[b]!) {
      rank -= h[b]!;
      less += h[b++]!;
    }
    bucket.set(m, b);
    lessBucket.set(m, less);
  }
  const lists = new Map(pending.map((m) => [m, new KeyList(1 << 12, cap)]));
  sweep(kernel, n, pending, (m, start, len) => {
    kernel.bucket(len, bucket.get(m)!, slot.get(m)!, start, lists.get(m)!);
    return true;
  });
  const rescan: number[] = [];
  const tiesLeft = new Map<number, number>();
  for (const m of pending) {
    const low = kernel.lowHistogram(slot.get(m)!);
    let rank = n - want(m) - lessBucket.get(m)!;
    let less = lessBucket.get(m)!;
    let l = 0;
    while (rank >= low[l]!) {
      rank -= low[l]!;
      less += low[l++]!;
    }
    const thr = ((bucket.get(m)! << 16) | l) >>> 0;
    const greater = n - less - low[l]!;
    const list = lists.get(m)!;
    if (!list.overflow) {
      let inListAbove = 0;
      for (let i = 0; i < list.length; i++) if (list.pairs[2 * i + 1]! >>> 0 > thr) inListAbove++;
      rules.set(m, ruleFromList(list, want(m) - greater + inListAbove));
    } else {
      rules.set(m, { thr, cut: n });
      tiesLeft.set(m, want(m) - greater);
      rescan.push(m);
    }
  }
  if (rescan.length) {
    // The index of the last tie kept, by a scan in index order.
    sweep(kernel, n, rescan, (m, start, len) => {
      let left = tiesLeft.get(m)!;
      const rule = rules.get(m)!;
      for (let j = 0; j < len; j++) {
        if (kernel.key(j) === rule.thr && --left === 0) {
          rule.cut = start + j + 1;
          break;
        }
      }
      tiesLeft.set(m, left);
      return left > 0;
    });
  }
  return { rules, bracketed };
}

// ---- TypeScript kernel

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

class JsKernel implements Kernel {
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
      this.keys(m, len);
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
      weightedKept(this.xs[m]!.f, bf, this.tau.f, this.tau.i, this.v[m]!, total, s.weights[m]!, s.thr[m]!, s.cut[m]! - start, len);
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

// ---- WebAssembly kernel

interface MergeWasmExports {
  sawNaN(): number;
  clearNaN(): void;
  tauKeys(pb: number, px: number, n: number, pkeys: number, bf16: number): void;
  windowPass(pbase: number, stride: number, models: number, len: number, prm: number, plists: number, listStride: number, pcounts: number, index0: number, flags: number): void;
  histHigh(pkeys: number, len: number, phist: number): void;
  bucketKeys(pkeys: number, len: number, bucket: number, plow: number, index0: number, plist: number): number;
  combine(pbase: number, stride: number, m: number, n: number, prm: number, flags: number, lambda: number, scalarDiv: number, pout: number, pscratch: number): void;
  combineFinite(pbase: number, stride: number, m: number, n: number, prm: number, flags: number, lambda: number, pout: number): void;
}

interface WasmState {
  memory: WasmMemory;
  exports: MergeWasmExports;
}

const WASM_FILE = 'merge-kernels.wasm';
let wasmState: WasmState | null | undefined;
let wasmEnabled = true;

/** Turns the WebAssembly kernels off (or back on) in this thread; for tests comparing the two. */
export function useWasmKernels(on: boolean): void {
  wasmEnabled = on;
}

function wasmPath(): string | undefined {
  return [new URL(`./${WASM_FILE}`, import.meta.url), new URL(`../../dist/merge/${WASM_FILE}`, import.meta.url)]
    .map((u) => fileURLToPath(u))
    .find((p) => existsSync(p));
}

/** Whether the WebAssembly kernels are built and this runtime supports them. */
export function wasmKernelsAvailable(): boolean {
  return wasmEnabled && wasmPath() !== undefined && wasmSimdSupported();
}

/** The WebAssembly kernels of this thread, or null where they are not built or not supported. */
function mergeWasm(): WasmState | null {
  if (!wasmEnabled) return null;
  if (wasmState !== undefined) return wasmState;
  wasmState = null;
  try {
    const path = wasmPath();
    if (path && wasmSimdSupported()) {
      const memory = new wasm.Memory({ initial: 64, maximum: 65536, shared: true });
      const instance = new wasm.Instance(new wasm.Module(readFileSync(path)), { env: { memory } });
      wasmState = { memory, exports: instance.exports as unknown as MergeWasmExports };
    }
  } catch {
    wasmState = null;
  }
  return wasmState;
}

/**
 * Whether the WebAssembly kernel computes inputs of these dtypes exactly as the TypeScript one:
 * one dtype for all inputs, BF16 or F32, rounded to nothing or (BF16) to BF16, which only
 * canonicalises NaNs (a run that meets a NaN is then redone in TypeScript); output BF16 or F32.
 */
export function wasmDtypesFit(inputs: readonly { dtype: string; round?: string }[], outDtype: string): boolean {
  const d = inputs[0]?.dtype;
  if (d !== 'BF16' && d !== 'F32') return false;
  if (outDtype !== 'BF16' && outDtype !== 'F32') return false;
  return inputs.every((v) => v.dtype === d && (v.round === undefined || v.round === d));
}

const WASM_BASE = 1 << 16;
const PAGE = 1 << 16;
/** Alignment of direct reads (buffer address, file offset and length). */
const DIRECT_PAGE = 4096;

/** Values per region of the WebAssembly kernel with direct reads (fewer, larger reads). */
const REGION_DIRECT = 1 << 20;
/** Reads smaller than this go through the page cache even where direct reads are possible. */
const DIRECT_MIN = 1 << 18;

/**
 * Inputs already in this thread's kernel memory (see `kernelMemory`): the base's values from byte
 * `pIn`, the models' (all of them, in order) at `pIn + k * stride`, each followed by 16 zero bytes.
 */
export interface Preloaded {
  pIn: number;
  stride: number;
}

/** End of the kernel's scratch (page-aligned) for a tensor of `inputs` inputs (base included). */
function scratchEnd(inputs: number): number {
  const M = inputs - 1;
  const bytes = WASM_BASE + CHUNK * 4 + M * CHUNK * 8 + M * 32 + M * 16 + M * 32 + CHUNK * 4 + M * 32768 * 4 + M * 65536 * 4;
  return Math.ceil(bytes / DIRECT_PAGE) * DIRECT_PAGE;
}

/**
 * The first byte of kernel memory that the kernel itself never uses for tensors of at most
 * `inputs` inputs merged region by region (not resident): where preloaded inputs can live.
 */
export function kernelRegionEnd(inputs: number): number {
  const end = scratchEnd(inputs) + inputs * slotBytes(REGION_DIRECT * 4);
  return Math.ceil(end / PAGE) * PAGE;
}

/**
 * This thread's kernel memory, grown to at least `bytes`, as a Buffer (a view of shared,
 * page-aligned memory); null where the WebAssembly kernels are not available.
 */
export function kernelMemory(bytes: number): Buffer | null {
  const state = mergeWasm();
  if (!state) return null;
  const have = state.memory.buffer.byteLength;
  if (bytes > KERNEL_MEMORY_MAX) return null;
  try {
    if (bytes > have) state.memory.grow(Math.ceil((bytes - have) / PAGE));
  } catch {
    return null; // the address space for it was not there
  }
  return Buffer.from(state.memory.buffer);
}

/** The most memory a thread's kernel can address (a 32-bit WebAssembly memory). */
export const KERNEL_MEMORY_MAX = 65536 * PAGE;

/** Bytes of one input's slot for regions of `bytes`: room to read whole pages around them, and a pad. */
export function slotBytes(bytes: number): number {
  return Math.ceil((bytes + 2 * DIRECT_PAGE + 16) / DIRECT_PAGE) * DIRECT_PAGE;
}

const fileReads = { direct: 0, buffered: 0 };

/** Reads of file-backed inputs made by the WebAssembly kernel in this thread so far, by kind. */
export function kernelFileReads(): { direct: number; buffered: number } {
  return { ...fileReads };
}

/** Reads `length` bytes at `position` of `fd` to `dst` of `mem`, all of them. */
function readFully(fd: number, mem: Buffer, dst: number, length: number, position: number): void {
  fileReads.buffered++;
  let done = 0;
  while (done < length) {
    const r = readSync(fd, mem, dst + done, length - done, position + done);
    if (r === 0) throw new AmalgamError('E_IO', `file ended while reading a tensor (at byte ${position + done})`);
    done += r;
  }
}

/**
 * Reads at least `length` bytes at page-aligned `position` of an `O_DIRECT` descriptor to
 * page-aligned `dst`, in whole pages; false (nothing trusted) when the file system refuses or a
 * read stops short of them.
 */
function readDirect(fd: number, mem: Buffer, dst: number, position: number, length: number): boolean {
  const want = Math.ceil(length / DIRECT_PAGE) * DIRECT_PAGE;
  let done = 0;
  try {
    while (done < length) {
      const r = readSync(fd, mem, dst + done, want - done, position + done);
      if (r <= 0 || (r % DIRECT_PAGE !== 0 && done + r < length)) return false;
      done += r;
    }
  } catch {
    return false;
  }
  fileReads.direct++;
  return true;
}

class WasmKernel implements Kernel {
  private readonly k: MergeWasmExports;
  private readonly bf16: boolean;
  private readonly size: number;
  private readonly n: number;
  private readonly outSize: number;
  private readonly outBuf: Buffer;
  private readonly stride: number;
  private readonly pIn: number;
  /** Whether every input is held whole in memory (see the constructor). */
  private readonly resident: boolean;
  /** Values per region, and the offset of the values in each input's slot. */
  private readonly region: number;
  private readonly at: number;
  /** Inputs whose direct reads failed: read through the page cache from then on. */
  private readonly buffered = new Set<number>();
  private readonly pKeys: number;
  private readonly pLists: number;
  private readonly pCounts: number;
  private readonly pParams: number;
  private readonly pScratch: number;
  private readonly pOut: number;
  private readonly pHist: number;
  private readonly pLow: number;
  private readonly track: boolean;
  private mem!: Buffer;
  private i32!: Int32Array;
  private f32!: Float32Array;
  private readonly hists = new Set<number>();
  private readonly lows = new Set<number>();
  /** The values [rs, re) are in every slot marked valid; `off` is the loaded chunk's byte offset in a slot. */
  private rs = 0;
  private re = 0;
  private readonly valid: boolean[];
  private off = 0;
  /** Largest magnitude bit pattern the bracket passes read. */
  private maxBits = 0;

  constructor(
    private readonly state: WasmState,
    private readonly inputs: readonly StoredValues[],
    out: MemoryValues,
    residentBytes: number,
    preloaded?: Preloaded,
  ) {
    this.k = state.exports;
    this.n = storedLength(inputs[0]!);
    this.bf16 = inputs[0]!.dtype === 'BF16';
    this.size = this.bf16 ? 2 : 4;
    this.track = inputs.some((v) => v.round !== undefined);
    this.outSize = out.dtype === 'F32' ? 4 : 2;
    this.outBuf = Buffer.from(out.data.buffer, out.data.byteOffset, out.data.byteLength);
    this.valid = inputs.map(() => false);
    const M = inputs.length - 1;
    let p = WASM_BASE;
    const take = (bytes: number) => {
      const at = p;
      p += bytes;
      return at;
    };
    this.pKeys = take(CHUNK * 4);
    this.pLists = take(M * CHUNK * 8);
    this.pCounts = take(M * 32);
    this.pParams = take(M * 16);
    this.pScratch = take(M * 32);
    this.pOut = take(CHUNK * 4);
    this.pHist = take(M * 32768 * 4);
    this.pLow = take(M * 65536 * 4);
    p = Math.ceil(p / DIRECT_PAGE) * DIRECT_PAGE;
    if (p !== scratchEnd(M + 1)) throw new Error('fused kernel: scratch layout out of step with scratchEnd');
    // Resident: every input read whole, once, into a slot of its own, which the passes then read
    // in place. Otherwise a region of values per input, refilled as the passes go.
    const files = inputs.every((v) => !('data' in v));
    const direct = files && inputs.some((v) => (v as FileValues).directFd !== undefined);
    const need = (M + 1) * slotBytes(this.n * this.size);
    this.resident = preloaded !== undefined || (files && need <= residentBytes && p + need <= KERNEL_MEMORY_MAX);
    this.region = this.resident ? this.n : direct ? REGION_DIRECT : REGION;
    this.stride = preloaded?.stride ?? slotBytes(this.region * this.size);
    // Values sit at the same offset of every slot: the page offset of the first input's file
    // position (direct reads of it then land in place), 0 without direct reads.
    this.at = direct ? (inputs[0] as FileValues).offset % DIRECT_PAGE : 0;
    const end = preloaded ? p : p + (M + 1) * this.stride;
    const have = state.memory.buffer.byteLength;
    if (end > have) state.memory.grow(Math.ceil((end - have) / PAGE));
    const sab = state.memory.buffer;
    this.mem = Buffer.from(sab);
    this.i32 = new Int32Array(sab);
    this.f32 = new Float32Array(sab);
    this.pIn = preloaded?.pIn ?? p + this.at;
    if (this.resident && !preloaded) {
      for (let slot = 0; slot <= M; slot++) {
        const dst = this.pIn + slot * this.stride;
        this.fill(slot, 0, this.n, dst);
        this.mem.fill(0, dst + this.n * this.size, dst + this.n * this.size + 16);
      }
    }
    state.exports.clearNaN();
  }

  /**
   * Values [from, from + count) of input `slot` to byte `dst` of the memory (`at` bytes past the
   * slot's page-aligned start). Large reads of a file with a direct descriptor read the whole
   * pages around the values to the slot's start, then move the values to `dst` unless they
   * landed there.
   */
  private fill(slot: number, from: number, count: number, dst: number): void {
    const v = this.inputs[slot]!;
    const size = this.size;
    if ('data' in v) {
      Buffer.from(v.data.buffer, v.data.byteOffset, v.data.byteLength).copy(this.mem, dst, from * size, (from + count) * size);
      return;
    }
    const bytes = count * size;
    const position = v.offset + from * size;
    if (v.directFd !== undefined && bytes >= DIRECT_MIN && !this.buffered.has(slot)) {
      const skip = position % DIRECT_PAGE;
      const start = dst - this.at;
      if (readDirect(v.directFd, this.mem, start, position - skip, skip + bytes)) {
        if (skip !== this.at) this.mem.copy(this.mem, dst, start + skip, start + skip + bytes);
        return;
      }
      this.buffered.add(slot);
    }
    readFully(v.fd, this.mem, dst, bytes, position);
  }

  load(start: number, len: number, models: readonly number[], readAhead: boolean): void {
    if (this.resident) {
      this.off = start * this.size;
      return;
    }
    if (!(start >= this.rs && start + len <= this.re)) {
      this.rs = start;
      this.re = Math.min(this.n, start + (readAhead ? this.region : len));
      this.valid.fill(false);
    }
    const count = this.re - this.rs;
    const padded = (count + 3) & ~3;
    const load = (slot: number) => {
      if (this.valid[slot]) return;
      const dst = this.pIn + slot * this.stride;
      this.fill(slot, this.rs, count, dst);
      if (padded > count) this.mem.fill(0, dst + count * this.size, dst + padded * this.size);
      this.valid[slot] = true;
    };
    load(0);
    for (const m of models) load(m + 1);
    this.off = (start - this.rs) * this.size;
  }

  window(len: number, models: readonly number[], lo: readonly number[], hi: readonly number[], index0: number, lists: readonly KeyList[]): BracketCounts[] {
    const M = models.length;
    for (let t = 0; t < M; t++) {
      const p = (this.pParams >>> 2) + 4 * t;
      this.i32[p] = lo[t]!;
      this.i32[p + 1] = hi[t]!;
      this.i32[p + 2] = models[t]! + 1;
    }
    this.k.windowPass(this.pIn + this.off, this.stride, M, len, this.pParams, this.pLists, CHUNK * 8, this.pCounts, index0, this.bf16 ? 1 : 0);
    const counts: BracketCounts[] = [];
    for (let t = 0; t < M; t++) {
      const c = (this.pCounts >>> 2) + 8 * t;
      counts.push({ above: this.i32[c]!, atHi: this.i32[c + 1]!, atLo: this.i32[c + 2]! });
      this.maxBits = Math.max(this.maxBits, this.i32[c + 4]! >>> 0);
      const listed = this.i32[c + 3]!;
      if (listed) lists[t]!.pushPairs(this.i32, (this.pLists >>> 2) + t * CHUNK * 2, listed);
    }
    return counts;
  }

  keys(m: number, len: number): void {
    this.k.tauKeys(this.pIn + this.off, this.pIn + (m + 1) * this.stride + this.off, (len + 3) & ~3, this.pKeys, this.bf16 ? 1 : 0);
  }

  key(j: number): number {
    return this.i32[(this.pKeys >>> 2) + j]!;
  }

  private histPtr(slot: number): number {
    const p = this.pHist + slot * 32768 * 4;
    if (!this.hists.has(slot)) {
      this.mem.fill(0, p, p + 32768 * 4);
      this.hists.add(slot);
    }
    return p;
  }

  private lowPtr(slot: number): number {
    const p = this.pLow + slot * 65536 * 4;
    if (!this.lows.has(slot)) {
      this.mem.fill(0, p, p + 65536 * 4);
      this.lows.add(slot);
    }
    return p;
  }

  histHigh(len: number, slot: number): void {
    this.k.histHigh(this.pKeys, len, this.histPtr(slot));
  }

  histogram(slot: number): Uint32Array {
    return new Uint32Array(this.state.memory.buffer, this.histPtr(slot), 32768).slice();
  }

  bucket(len: number, b: number, slot: number, index0: number, list: KeyList): void {
    const count = this.k.bucketKeys(this.pKeys, len, b, this.lowPtr(slot), index0, this.pLists);
    if (count) list.pushPairs(this.i32, this.pLists >>> 2, count);
  }

  lowHistogram(slot: number): Uint32Array {
    return new Uint32Array(this.state.memory.buffer, this.lowPtr(slot), 65536).slice();
  }

  combine(start: number, len: number, s: CombineSettings): void {
    const M = s.weights.length;
    const len4 = (len + 3) & ~3;
    let ties = false;
    // Per model: thr (i32), the chunk-relative cut (i32), the weight (f32), 4 bytes unused.
    for (let m = 0; m < M; m++) {
      const p = this.pParams + m * 16;
      const thr = s.thr[m]!;
      const cut = s.cut[m]! - start;
      // Only a chunk holding the cut needs the ties rule; elsewhere the ties are all kept (thr − 1) or all dropped.
      const inside = thr >= 0 && cut > 0 && cut < len;
      ties ||= inside;
      this.i32[p >>> 2] = inside || cut <= 0 || thr < 0 ? thr : thr - 1;
      this.i32[(p >>> 2) + 1] = inside ? cut : -1;
      this.f32[(p + 8) >>> 2] = s.weights[m]!;
    }
    const flags =
      (s.consensus ? 1 : 0) |
      (s.normalize ? 2 : 0) |
      (s.lambda !== 1 ? 4 : 0) |
      (this.bf16 ? 8 : 0) |
      (this.outSize === 2 ? 16 : 0) |
      (this.track ? 32 : 0) |
      (ties ? 64 : 0);
    if (s.finite && s.consensus && !ties && M <= 4) this.k.combineFinite(this.pIn + this.off, this.stride, M, len4, this.pParams, flags, s.lambda, this.pOut);
    else this.k.combine(this.pIn + this.off, this.stride, M, len4, this.pParams, flags, s.lambda, s.scalarDivisor, this.pOut, this.pScratch);
    this.mem.copy(this.outBuf, start * this.outSize, this.pOut, this.pOut + len * this.outSize);
  }

  sawNaN(): boolean {
    return this.track && this.k.sawNaN() !== 0;
  }

  maxInput(): number {
    if (this.maxBits >= 0x7f800000) return Infinity;
    this.i32[this.pCounts >>> 2] = this.maxBits;
    return new Float32Array(this.state.memory.buffer, this.pCounts, 1)[0]!;
  }

  close(): void {}
}

/** The whole of file-backed values, read into memory. */
function inMemory(v: StoredValues): MemoryValues {
  if ('data' in v) return v;
  const size = v.dtype === 'F32' ? 4 : 2;
  const buf = new ArrayBuffer(v.length * size);
  const bytes = new Uint8Array(buf);
  let done = 0;
  while (done < bytes.length) {
    const r = readSync(v.fd, bytes, done, bytes.length - done, v.offset + done);
    if (r === 0) throw new AmalgamError('E_IO', `file ended while reading a tensor (at byte ${v.offset + done})`);
    done += r;
  }
  const round = v.round ? { round: v.round } : {};
  return v.dtype === 'F32' ? { dtype: 'F32', data: new Float32Array(buf), ...round } : { dtype: v.dtype, data: new Uint16Array(buf), ...round };
}

/**
 * The merge of generalized task arithmetic with a magnitude or no sparsifier, without rescale,
 * in one streaming kernel (see above). Writes `o.out`; returns nothing.
 */
export function fusedGta(o: FusedGtaOptions): void {
  const n = storedLength(o.base);
  for (const m of o.models) if (storedLength(m.values) !== n) throw new RangeError('fusedGta: inputs differ in length');
  if (o.out.data.length !== n) throw new RangeError('fusedGta: output length differs');
  // Zeroed task vectors add nothing anywhere: +0 + (±0) = +0 and ±0 never agrees with a sign.
  const active = o.models.filter((m) => m.keep !== 0);
  const inputs = [o.base, ...active.map((m) => m.values)];
  const state = n > 0 && wasmDtypesFit(inputs, o.out.dtype) && inputs.every((v) => !('data' in v) || (v.data.byteOffset & 3) === 0) ? mergeWasm() : null;
  if (state) {
    // Preloaded inputs are laid out for every model; a model with nothing kept is left out here.
    const preloaded = o.preloaded && active.length === o.models.length && inputs.every((v) => !('data' in v)) ? o.preloaded : undefined;
    const kernel = new WasmKernel(state, inputs, o.out, o.residentBytes ?? 0, preloaded);
    runFused(kernel, n, active, o);
    if (!kernel.sawNaN()) return;
  }
  const mem = inputs.map(inMemory);
  runFused(new JsKernel(mem[0]!, mem.slice(1), o.out), n, active, o);
}

function runFused(kernel: Kernel, n: number, active: readonly FusedGtaModel[], o: FusedGtaOptions): void {
  const M = active.length;
  // Keep rules: thr = -1 keeps everything.
  const thr = new Float64Array(M).fill(-1);
  const cut = new Float64Array(M);
  const kKeep = new Map<number, number>();
  active.forEach((m, i) => {
    if (m.keep !== null) kKeep.set(i, m.keep);
  });
  let bracketed = false;
  if (kKeep.size) {
    const selected = selectRules(kernel, n, kKeep);
    bracketed = selected.bracketed;
    for (const [m, rule] of selected.rules) {
      thr[m] = rule.thr;
      cut[m] = rule.cut;
    }
  }
  // The bracket pass read every input when every model has a top-k: if their magnitudes stay
  // below 2^126, each task vector is below 2^127 (finite), and the weighted values are finite
  // when |w| · 2 · max < FLT_MAX. (Their float32 sums may still overflow to ±Inf, never to NaN;
  // the masked combine computes those exactly as the general one.)
  let maxWeight = 0;
  for (const m of active) maxWeight = Math.max(maxWeight, Math.abs(Math.fround(m.weight)));
  const maxIn = bracketed && kKeep.size === M ? kernel.maxInput() : Infinity;
  const finite = maxIn < 2 ** 126 && maxWeight * 2 * maxIn < FLT_MAX;
  const settings: CombineSettings = {
    thr,
    cut,
    weights: active.map((m) => Math.fround(m.weight)),
    consensus: o.consensus === 'sum',
    normalize: o.normalize,
    lambda: Math.fround(o.lambda),
    scalarDivisor: scalarDivisorOf(o.models.map((m) => m.weight)),
    finite,
  };
  const all = active.map((_, i) => i);
  for (let start = 0; start < n; start += CHUNK) {
    const len = Math.min(CHUNK, n - start);
    kernel.load(start, len, all, true);
    kernel.combine(start, len, settings);
  }
  kernel.close();
}
