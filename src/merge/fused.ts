/**
 * The fused kernel of generalized task arithmetic with a magnitude, magnitude-outliers or no
 * sparsifier.
 *
 * Task vectors, the magnitude top-k, the weighting and the combine, streamed in chunks straight
 * from the stored values (float32, or the bits of BF16 / F16; in memory, or read from a file
 * chunk by chunk), with no task vector, key or mask array per model. Element by element it does
 * the same float32 arithmetic as `taskVector`, `sparsify` ('magnitude' or 'magnitude_outliers',
 * without rescale) and `combineTaskVectors`, in the same order, so the results are identical.
 * The chunk passes run in WebAssembly SIMD (assembly/merge.ts, built by `npm run build:wasm`)
 * where the module is built and the dtypes suit it, in TypeScript otherwise.
 *
 * The top-k keep rule of one model is a threshold key `thr` and an index cut `cut`: element j is
 * kept when key(j) > thr, or key(j) = thr and j < cut (ties by lower flat index, as `topKMask`).
 * Breadcrumbs keeps descending ranks [n_top, k) (`descendingRangeMask`): the top-k keep rule and
 * the top-n_top rule as an exclusion rule (the elements it selects are dropped), both found by
 * the same passes over the model's keys. Each rule comes from an exact selection over the keys:
 * - large tensors: a sample of the keys brackets the threshold; one pass counts the keys above
 *   the bracket and lists those inside it, and the selection finishes on that list. When the
 *   bracket misses (or the list overflows), the model falls back to the histogram selection;
 * - otherwise: a histogram of the upper 16 key bits finds the threshold's bucket, a second pass
 *   lists (or histograms, then scans for the cut) the keys in that bucket.
 */
import { readSync } from 'node:fs';
import { AmalgamError } from '../errors.js';
import { selectKth, selectKths } from './tensor-ops.js';
import {
  CHUNK,
  FLT_MAX,
  KeyList,
  scalarDivisorOf,
  storedLength,
  type CombineSettings,
  type FusedGtaModel,
  type FusedGtaOptions,
  type Kernel,
  type KeepRule,
  type MemoryValues,
  type StoredValues,
} from './fused-common.js';
import { JsKernel } from './fused-js.js';
import { mergeWasm, wasmDtypesFit, WasmKernel } from './fused-wasm.js';

/** Tensors at least this large bracket the threshold from a sample. */
const SAMPLE_MIN = 1 << 20;
const SAMPLE_RUNS = 128;
const SAMPLE_RUN = 512;
/** Bracket half-width in standard deviations of the sample rank. */
const SAMPLE_SIGMAS = 6;

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

/**
 * Keys of every listed model at SAMPLE_RUNS evenly spread runs of SAMPLE_RUN values. The chunk
 * loops live in small functions of their own so that V8 optimizes them once, not the whole
 * selection again at every tensor.
 */
function sampleKeys(kernel: Kernel, n: number, models: readonly number[]): Uint32Array[] {
  const S = SAMPLE_RUNS * SAMPLE_RUN;
  const samples = models.map(() => new Uint32Array(S));
  const step = (n - SAMPLE_RUN) / (SAMPLE_RUNS - 1);
  for (let r = 0; r < SAMPLE_RUNS; r++) {
    kernel.load(Math.floor(r * step), SAMPLE_RUN, models, false);
    for (let t = 0; t < models.length; t++) {
      kernel.keys(models[t]!, SAMPLE_RUN);
      const out = samples[t]!;
      for (let j = 0; j < SAMPLE_RUN; j++) out[r * SAMPLE_RUN + j] = kernel.key(j);
    }
  }
  return samples;
}

/**
 * One pass over every chunk: per model, the keys above its bracket, the keys at either end per
 * chunk, and the keys strictly inside listed. Stops early once every list has overflowed;
 * `complete` says whether every chunk was seen.
 */
function bracketPass(
  kernel: Kernel,
  n: number,
  models: readonly number[],
  lo: readonly number[],
  hi: readonly number[],
  lists: KeyList[],
): { above: number[]; atHi: Float64Array[]; atLo: Float64Array[]; complete: boolean } {
  const chunks = Math.ceil(n / CHUNK);
  const above = models.map(() => 0);
  const atHi = models.map(() => new Float64Array(chunks));
  const atLo = models.map(() => new Float64Array(chunks));
  let complete = false;
  for (let start = 0, c = 0; start < n; start += CHUNK, c++) {
    const len = Math.min(CHUNK, n - start);
    kernel.load(start, len, models, true);
    const counts = kernel.window(len, models, lo, hi, start, lists);
    for (let t = 0; t < models.length; t++) {
      above[t] += counts[t]!.above;
      atHi[t]![c] = counts[t]!.atHi;
      atLo[t]![c] = counts[t]!.atLo;
    }
    if (lists.every((l) => l.overflow)) break;
    complete = start + CHUNK >= n;
  }
  return { above, atHi, atLo, complete };
}

/** One top-k selection: the keep rule of model `model`'s `k` largest keys (1 ≤ k < n). */
export interface RankRequest {
  model: number;
  k: number;
}

const tally = { bracket: 0, histogram: 0, rescan: 0 };

/**
 * How many keep rules this thread's selections have found so far by each way: from the sampled
 * bracket's pass, from the histograms, and of those the ones whose cut took a scan in index order.
 */
export function selectionCounts(): { bracket: number; histogram: number; rescan: number } {
  return { ...tally };
}

/**
 * The keep rules of `requests` (in that order). A model may have several requests (breadcrumbs:
 * two ranks); each pass over the data reads its keys once for all of them.
 */
function selectRules(kernel: Kernel, n: number, requests: readonly RankRequest[]): { rules: KeepRule[]; bracketed: boolean } {
  const rules: KeepRule[] = new Array(requests.length);
  let bracketed = false;
  // Request indices, those of a model next to each other (the kernels' bracket pass reads them so).
  let pending = requests.map((_, r) => r).sort((a, b) => requests[a]!.model - requests[b]!.model || a - b);
  const modelOf = (r: number) => requests[r]!.model;
  const want = (r: number) => requests[r]!.k;
  // The models of some requests, in order, and their requests.
  const modelsOf = (rs: readonly number[]): number[] => [...new Set(rs.map(modelOf))];
  const byModel = (rs: readonly number[]): Map<number, number[]> => {
    const map = new Map<number, number[]>();
    for (const r of rs) map.get(modelOf(r))?.push(r) ?? map.set(modelOf(r), [r]);
    return map;
  };
  // A model's lists together hold at most n/16 pairs per pass (of the bracket, or of the histogram).
  const perModel = byModel(pending);
  const cap = (r: number) => Math.max(1 << 16, Math.ceil(n / (16 * perModel.get(modelOf(r))!.length)));

  if (n >= SAMPLE_MIN && pending.length) {
    const S = SAMPLE_RUNS * SAMPLE_RUN;
    const models = modelsOf(pending);
    const samples = sampleKeys(kernel, n, models);
    // The bracket [lo, hi] around each threshold's rank; every end of a model's brackets from one
    // selection over its sample.
    const lo: number[] = [];
    const hi: number[] = [];
    models.forEach((m, t) => {
      const rs = perModel.get(m)!;
      const ranks: number[] = [];
      const spans = rs.map((r) => {
        const q = (n - want(r)) / n;
        const w = Math.ceil(SAMPLE_SIGMAS * Math.sqrt(S * q * (1 - q))) + 8;
        const at = Math.floor(q * S);
        ranks.push(at - w <= 0 ? 0 : at - w, at + w >= S - 1 ? 0 : at + w);
        return { low: at - w <= 0, high: at + w >= S - 1 };
      });
      const ends = selectKths(samples[t]!, ranks);
      spans.forEach((sp, i) => {
        lo.push(sp.low ? 0 : ends[2 * i]!);
        hi.push(sp.high ? 0x7fffffff : ends[2 * i + 1]!);
      });
    });
    // `models.flatMap` lists the requests in the order of `pending` (sorted by model).
    const entries = models.flatMap((m) => perModel.get(m)!);
    const lists = entries.map((r) => new KeyList(1 << 14, cap(r)));
    const { above, atHi, atLo, complete } = bracketPass(kernel, n, entries.map(modelOf), lo, hi, lists);
    bracketed = complete;
    const failed: number[] = [];
    entries.forEach((r, t) => {
      const m = modelOf(r);
      const list = lists[t]!;
      const sum = (a: Float64Array) => a.reduce((x, y) => x + y, 0);
      const found = (rule: KeepRule) => {
        rules[r] = rule;
        tally.bracket++;
      };
      let need = want(r) - above[t]!;
      const nHi = sum(atHi[t]!);
      if (list.overflow || need < 1) return failed.push(r);
      if (need <= nHi) return found({ thr: hi[t]!, cut: cutAt(kernel, m, hi[t]!, need, atHi[t]!) });
      if (lo[t] === hi[t]) return failed.push(r);
      need -= nHi;
      if (need <= list.length) return found(ruleFromList(list, need));
      need -= list.length;
      if (need <= sum(atLo[t]!)) return found({ thr: lo[t]!, cut: cutAt(kernel, m, lo[t]!, need, atLo[t]!) });
      failed.push(r);
    });
    pending = failed;
  }
  if (pending.length === 0) return { rules, bracketed };

  // Histogram of the upper 16 bits (one per model), then each threshold's bucket.
  const models = modelsOf(pending);
  const requestsOf = byModel(pending);
  const slot = new Map(models.map((m, i) => [m, i]));
  const lowSlot = new Map(pending.map((r, i) => [r, i]));
  sweep(kernel, n, models, (m, _start, len) => {
    kernel.histHigh(len, slot.get(m)!);
    return true;
  });
  const bucket = new Map<number, number>();
  const lessBucket = new Map<number, number>();
  for (const m of models) {
    const h = kernel.histogram(slot.get(m)!);
    for (const r of requestsOf.get(m)!) {
      let rank = n - want(r);
      let less = 0;
      let b = 0;
      while (rank >= h[b]!) {
        rank -= h[b]!;
        less += h[b++]!;
      }
      bucket.set(r, b);
      lessBucket.set(r, less);
    }
  }
  const lists = new Map(pending.map((r) => [r, new KeyList(1 << 12, cap(r))]));
  sweep(kernel, n, models, (m, start, len) => {
    for (const r of requestsOf.get(m)!) kernel.bucket(len, bucket.get(r)!, lowSlot.get(r)!, start, lists.get(r)!);
    return true;
  });
  const rescan: number[] = [];
  const tiesLeft = new Map<number, number>();
  for (const r of pending) {
    const low = kernel.lowHistogram(lowSlot.get(r)!);
    let rank = n - want(r) - lessBucket.get(r)!;
    let less = lessBucket.get(r)!;
    let l = 0;
    while (rank >= low[l]!) {
      rank -= low[l]!;
      less += low[l++]!;
    }
    const thr = ((bucket.get(r)! << 16) | l) >>> 0;
    const greater = n - less - low[l]!;
    const list = lists.get(r)!;
    tally.histogram++;
    if (!list.overflow) {
      let inListAbove = 0;
      for (let i = 0; i < list.length; i++) if (list.pairs[2 * i + 1]! >>> 0 > thr) inListAbove++;
      rules[r] = ruleFromList(list, want(r) - greater + inListAbove);
    } else {
      rules[r] = { thr, cut: n };
      tiesLeft.set(r, want(r) - greater);
      rescan.push(r);
    }
  }
  if (rescan.length) {
    // The index of the last tie kept, by a scan in index order.
    const rescanOf = byModel(rescan);
    sweep(kernel, n, modelsOf(rescan), (m, start, len) => {
      let more = false;
      for (const r of rescanOf.get(m)!) {
        let left = tiesLeft.get(r)!;
        if (left === 0) continue;
        const rule = rules[r]!;
        for (let j = 0; j < len; j++) {
          if (kernel.key(j) === rule.thr && --left === 0) {
            rule.cut = start + j + 1;
            tally.rescan++;
            break;
          }
        }
        tiesLeft.set(r, left);
        more ||= left > 0;
      }
      return more;
    });
  }
  return { rules, bracketed };
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
 * The merge of generalized task arithmetic with a magnitude, magnitude-outliers or no
 * sparsifier, without rescale, in one streaming kernel (see above). Writes `o.out`; returns
 * nothing.
 */
export function fusedGta(o: FusedGtaOptions): void {
  const n = storedLength(o.base);
  for (const m of o.models) if (storedLength(m.values) !== n) throw new RangeError('fusedGta: inputs differ in length');
  if (o.out.data.length !== n) throw new RangeError('fusedGta: output length differs');
  // Zeroed task vectors add nothing anywhere: +0 + (±0) = +0 and ±0 never agrees with a sign. (A
  // breadcrumbs model keeping nothing is no zeroed task vector: NaN and ±Inf times 0 give NaN.)
  const active = o.models.filter((m) => m.keep !== 0 || m.drop !== undefined);
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

/** A key no magnitude key is above: as a keep rule it keeps nothing, as an exclusion rule it drops nothing. */
const NO_KEY = 0x7fffffff;

function runFused(kernel: Kernel, n: number, active: readonly FusedGtaModel[], o: FusedGtaOptions): void {
  const M = active.length;
  // Keep rules: thr = -1 keeps everything. Exclusion rules: thr = NO_KEY (and cut 0) drops nothing.
  const thr = new Float64Array(M).fill(-1);
  const cut = new Float64Array(M);
  const dropThr = new Float64Array(M).fill(NO_KEY);
  const dropCut = new Float64Array(M);
  const requests: RankRequest[] = [];
  const isDrop: boolean[] = [];
  // Whether every model's inputs are read by the selection (each has a top-k to find).
  let everySelected = true;
  active.forEach((m, i) => {
    const before = requests.length;
    if (m.keep === 0) thr[i] = NO_KEY; // breadcrumbs keeping nothing (cut 0: no tie kept either)
    else if (m.keep !== null) {
      requests.push({ model: i, k: m.keep });
      isDrop.push(false);
    }
    if (m.drop) {
      requests.push({ model: i, k: m.drop });
      isDrop.push(true);
    }
    if (requests.length === before) everySelected = false;
  });
  let bracketed = false;
  if (requests.length) {
    const selected = selectRules(kernel, n, requests);
    bracketed = selected.bracketed;
    selected.rules.forEach((rule, r) => {
      const m = requests[r]!.model;
      if (isDrop[r]) {
        dropThr[m] = rule.thr;
        dropCut[m] = rule.cut;
      } else {
        thr[m] = rule.thr;
        cut[m] = rule.cut;
      }
    });
  }
  // The bracket pass read every input when every model has a top-k: if their magnitudes stay
  // below 2^126, each task vector is below 2^127 (finite), and the weighted values are finite
  // when |w| · 2 · max < FLT_MAX. (Their float32 sums may still overflow to ±Inf, never to NaN;
  // the masked combine computes those exactly as the general one.)
  let maxWeight = 0;
  for (const m of active) maxWeight = Math.max(maxWeight, Math.abs(Math.fround(m.weight)));
  const maxIn = bracketed && everySelected ? kernel.maxInput() : Infinity;
  const finite = maxIn < 2 ** 126 && maxWeight * 2 * maxIn < FLT_MAX;
  const settings: CombineSettings = {
    thr,
    cut,
    exclude: active.some((m) => m.drop !== undefined),
    dropThr,
    dropCut,
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
