/**
 * The fused kernel's chunk passes in WebAssembly SIMD (assembly/merge.ts, built into
 * merge-kernels.wasm by `npm run build:wasm`), and the kernel memory of each thread: the inputs
 * are copied in region by region, read in whole (resident), or already there (`Preloaded`,
 * read ahead by a merge worker), from files through the page cache or with O_DIRECT.
 */
import { existsSync, readFileSync, readSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { wasmSimdSupported } from '../backend/wasm/module.js';
import { type WasmMemory, wasm } from '../backend/wasm/wasm-api.js';
import { AmalgamError } from '../errors.js';
import {
  CHUNK,
  REGION,
  storedLength,
  type BracketCounts,
  type CombineSettings,
  type FileValues,
  type Kernel,
  type KeyList,
  type MemoryValues,
  type Preloaded,
  type StoredValues,
} from './fused-common.js';

interface MergeWasmExports {
  sawNaN(): number;
  clearNaN(): void;
  tauKeys(pb: number, px: number, n: number, pkeys: number, bf16: number): void;
  windowPass(pbase: number, stride: number, models: number, len: number, prm: number, plists: number, listStride: number, pcounts: number, index0: number, flags: number): void;
  windowPairs(pbase: number, stride: number, pairs: number, len: number, prm: number, plists: number, listStride: number, pcounts: number, index0: number, flags: number): void;
  histHigh(pkeys: number, len: number, phist: number): void;
  bucketKeys(pkeys: number, len: number, bucket: number, plow: number, index0: number, plist: number): number;
  combine(pbase: number, stride: number, m: number, n: number, prm: number, flags: number, lambda: number, scalarDiv: number, pout: number, pscratch: number): void;
  combineFinite(pbase: number, stride: number, m: number, n: number, prm: number, flags: number, lambda: number, pout: number): void;
  combineExcluding(pbase: number, stride: number, m: number, n: number, prm: number, flags: number, lambda: number, scalarDiv: number, pout: number, pscratch: number): void;
  combineFiniteExcluding(pbase: number, stride: number, m: number, n: number, prm: number, flags: number, lambda: number, pout: number): void;
  dellaRows(pvals: number, rows: number, n: number, lo: number, epsilon: number, pout: number, pscratch: number): void;
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
export function mergeWasm(): WasmState | null {
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
 * End of the kernel's scratch (page-aligned) for a tensor of `inputs` inputs (base included): the
 * keys, a list, counts and parameters per selection (at most two per model), the combine's
 * scratch, the output chunk, a high histogram per model and a low one per selection.
 */
function scratchEnd(inputs: number): number {
  const M = inputs - 1;
  const R = 2 * M;
  const bytes = WASM_BASE + CHUNK * 4 + R * CHUNK * 8 + (R * 32 + 32) + R * 16 + M * 32 + CHUNK * 4 + M * 32768 * 4 + R * 65536 * 4;
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

/** Values per block of `combineDeltas`. */
export const DELTA_BLOCK = 16384;

/**
 * `combineTaskVectors` (gta.ts) in WebAssembly SIMD: the weighting, sign consensus, sums,
 * division, λ and base + mixed of float32 task vectors, block by block through the kernel's
 * scratch memory (below the prefetch areas of a merge worker), into `out`. For each block of at
 * most `DELTA_BLOCK` values, `fill(k, start, len, dst)` writes model k's task vector values
 * [start, start + len) to `dst`. The arithmetic is float32 in the same order, so every value
 * equals the TypeScript one; NaN payloads may differ, so a block with a NaN output is left to
 * `redo` (the TypeScript combine of that block). `weights`, `lambda` and `scalarDivisor` are
 * float32 values. False, having done nothing, where the kernels are not available.
 */
export function combineDeltas(
  base: Float32Array,
  models: number,
  fill: (k: number, start: number, len: number, dst: Float32Array) => void,
  weights: readonly number[],
  s: { consensus: boolean; normalize: boolean; lambda: number; scalarDivisor: number },
  out: Float32Array,
  redo: (start: number, len: number) => void,
): boolean {
  const state = mergeWasm();
  const M = models;
  if (!state || M === 0) return false;
  const n = base.length;
  const stride = DELTA_BLOCK * 4;
  const pIn = WASM_BASE;
  const pParams = pIn + (M + 1) * stride;
  const pScratch = pParams + M * 16;
  const pOut = pScratch + M * 16;
  const end = pOut + stride;
  if (end > kernelRegionEnd(M + 1)) return false;
  const have = state.memory.buffer.byteLength;
  if (end > have) state.memory.grow(Math.ceil((end - have) / PAGE));
  const sab = state.memory.buffer;
  const f32 = new Float32Array(sab);
  const i32 = new Int32Array(sab);
  for (let k = 0; k < M; k++) {
    const p = (pParams >>> 2) + 4 * k;
    i32[p] = -1; // every value kept: no key is below 0
    i32[p + 1] = -1;
    f32[p + 2] = weights[k]!;
  }
  const slots: Float32Array[] = [];
  for (let k = 0; k <= M; k++) slots.push(new Float32Array(sab, pIn + k * stride, DELTA_BLOCK));
  const flags = (s.consensus ? 1 : 0) | (s.normalize ? 2 : 0) | (s.lambda !== 1 ? 4 : 0) | 128;
  for (let start = 0; start < n; start += DELTA_BLOCK) {
    const len = Math.min(DELTA_BLOCK, n - start);
    const len4 = (len + 3) & ~3;
    slots[0]!.set(base.subarray(start, start + len));
    if (len4 > len) slots[0]!.fill(0, len, len4);
    for (let k = 0; k < M; k++) {
      const dst = slots[k + 1]!;
      fill(k, start, len, dst.subarray(0, len));
      if (len4 > len) dst.fill(0, len, len4);
    }
    state.exports.clearNaN();
    state.exports.combine(pIn, stride, M, len4, pParams, flags, s.lambda, s.scalarDivisor, pOut, pScratch);
    if (state.exports.sawNaN()) redo(start, len);
    else out.set(f32.subarray(pOut >>> 2, (pOut >>> 2) + len), start);
  }
  return true;
}

/**
 * DELLA keep probabilities of `rows` contiguous rows of `n` task vector values each
 * (`dellaProbabilities` in sparsify.ts, whose TypeScript loop gives the same float32 values) in
 * WebAssembly, through the kernel's scratch memory (below any prefetch area). False, having done
 * nothing, where the kernels are not available or a row does not fit that memory.
 */
export function dellaRowsWasm(delta: Float32Array, rows: number, n: number, lo: number, epsilon: number, out: Float32Array): boolean {
  const state = mergeWasm();
  if (!state || n < 1) return false;
  const rowBytes = n * 4;
  const block = Math.max(1, Math.floor((1 << 20) / rowBytes));
  const pIn = WASM_BASE;
  const pOut = pIn + block * rowBytes;
  const pScratch = Math.ceil((pOut + block * rowBytes) / 16) * 16;
  const end = pScratch + 4 * rowBytes + 2048 * 4;
  if (end > kernelRegionEnd(2)) return false;
  const have = state.memory.buffer.byteLength;
  if (end > have) state.memory.grow(Math.ceil((end - have) / PAGE));
  const f32 = new Float32Array(state.memory.buffer);
  for (let r0 = 0; r0 < rows; r0 += block) {
    const count = Math.min(block, rows - r0);
    f32.set(delta.subarray(r0 * n, (r0 + count) * n), pIn >>> 2);
    state.exports.dellaRows(pIn, count, n, lo, epsilon, pOut, pScratch);
    out.set(f32.subarray(pOut >>> 2, (pOut >>> 2) + count * n), r0 * n);
  }
  return true;
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

export class WasmKernel implements Kernel {
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
  /** Whether a combine with exclusion rules ran (it notes NaN outputs, see `sawNaN`). */
  private excluded = false;

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
    this.outSize = out.dtype === 'F32' ? 4 : 2;
    this.outBuf = Buffer.from(out.data.buffer, out.data.byteOffset, out.data.byteLength);
    this.valid = inputs.map(() => false);
    const M = inputs.length - 1;
    // Selections (bracket entries, low histograms): at most two per model.
    const R = 2 * M;
    let p = WASM_BASE;
    const take = (bytes: number) => {
      const at = p;
      p += bytes;
      return at;
    };
    this.pKeys = take(CHUNK * 4);
    this.pLists = take(R * CHUNK * 8);
    // Counts per entry, and the bracket pass's 16 bytes of scratch past them.
    this.pCounts = take(R * 32 + 32);
    // Per entry of the bracket pass; the combine's keep rules, then its exclusion rules.
    this.pParams = take(R * 16);
    this.pScratch = take(M * 32);
    this.pOut = take(CHUNK * 4);
    this.pHist = take(M * 32768 * 4);
    this.pLow = take(R * 65536 * 4);
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
    // Two entries of one model (next to each other) share one pass over its keys
    // (`windowPairs`), laid out first; then the others (`windowPass`). at[t]: entry t's place.
    const at = new Array<number>(M);
    const single: number[] = [];
    let placed = 0;
    for (let t = 0; t < M; t++) {
      if (t + 1 < M && models[t] === models[t + 1]) {
        at[t] = placed++;
        at[++t] = placed++;
      } else single.push(t);
    }
    const pairs = placed >>> 1;
    for (const t of single) at[t] = placed++;
    for (let t = 0; t < M; t++) {
      const p = (this.pParams >>> 2) + 4 * at[t]!;
      this.i32[p] = lo[t]!;
      this.i32[p + 1] = hi[t]!;
      this.i32[p + 2] = models[t]! + 1;
    }
    const flags = this.bf16 ? 1 : 0;
    const base = this.pIn + this.off;
    if (pairs) this.k.windowPairs(base, this.stride, pairs, len, this.pParams, this.pLists, CHUNK * 8, this.pCounts, index0, flags);
    if (single.length) {
      const e = 2 * pairs;
      this.k.windowPass(base, this.stride, single.length, len, this.pParams + e * 16, this.pLists + e * CHUNK * 8, CHUNK * 8, this.pCounts + e * 32, index0, flags);
    }
    const counts: BracketCounts[] = [];
    for (let t = 0; t < M; t++) {
      const c = (this.pCounts >>> 2) + 8 * at[t]!;
      counts.push({ above: this.i32[c]!, atHi: this.i32[c + 1]!, atLo: this.i32[c + 2]! });
      this.maxBits = Math.max(this.maxBits, this.i32[c + 4]! >>> 0);
      const listed = this.i32[c + 3]!;
      if (listed) lists[t]!.pushPairs(this.i32, (this.pLists >>> 2) + at[t]! * CHUNK * 2, listed);
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
    // Per model: thr (i32), the chunk-relative cut (i32), the weight (f32), 4 bytes unused; with
    // exclusion rules, theirs (thr, cut) after all of those.
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
      if (s.exclude) {
        // The same for the exclusion rule: its ties are all dropped (thr − 1), none, or up to the cut.
        const e = (this.pParams + (M + m) * 16) >>> 2;
        const thrE = s.dropThr[m]!;
        const cutE = s.dropCut[m]! - start;
        const insideE = cutE > 0 && cutE < len;
        ties ||= insideE;
        this.i32[e] = insideE || cutE <= 0 ? thrE : thrE - 1;
        this.i32[e + 1] = insideE ? cutE : -1;
      }
    }
    const flags =
      (s.consensus ? 1 : 0) |
      (s.normalize ? 2 : 0) |
      (s.lambda !== 1 ? 4 : 0) |
      (this.bf16 ? 8 : 0) |
      (this.outSize === 2 ? 16 : 0) |
      // NaN inputs and results are noted (flag 32), and a tensor that meets one is redone in
      // TypeScript: where NaNs of different signs or payloads meet (or Inf − Inf makes one),
      // WebAssembly and V8 may pick different NaNs; the TypeScript kernel gives the unfused bytes.
      32 |
      (ties ? 64 : 0);
    this.excluded ||= s.exclude;
    const fast = s.finite && s.consensus && !ties && M <= 4;
    const pb = this.pIn + this.off;
    if (s.exclude) {
      if (fast) this.k.combineFiniteExcluding(pb, this.stride, M, len4, this.pParams, flags, s.lambda, this.pOut);
      else this.k.combineExcluding(pb, this.stride, M, len4, this.pParams, flags, s.lambda, s.scalarDivisor, this.pOut, this.pScratch);
    } else if (fast) this.k.combineFinite(pb, this.stride, M, len4, this.pParams, flags, s.lambda, this.pOut);
    else this.k.combine(pb, this.stride, M, len4, this.pParams, flags, s.lambda, s.scalarDivisor, this.pOut, this.pScratch);
    this.mem.copy(this.outBuf, start * this.outSize, this.pOut, this.pOut + len * this.outSize);
  }

  /**
   * Whether the run is to be redone in TypeScript: an input NaN read where rounding would have
   * changed it, or (with exclusion rules) any NaN input or output, whose payload and sign may
   * differ where NaNs of several models meet.
   */
  sawNaN(): boolean {
    return this.k.sawNaN() !== 0;
  }

  maxInput(): number {
    if (this.maxBits >= 0x7f800000) return Infinity;
    this.i32[this.pCounts >>> 2] = this.maxBits;
    return new Float32Array(this.state.memory.buffer, this.pCounts, 1)[0]!;
  }

  close(): void {}
}

