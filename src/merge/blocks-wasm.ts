/**
 * WebAssembly SIMD block kernels of the chunked merges (assembly/blocks.ts, built into
 * block-kernels.wasm by `npm run build:wasm`): linear's weighted sum and slerp's two passes over
 * BF16 or F32 values. Each block of the stored inputs is copied into this thread's kernel memory,
 * computed there and copied out in the output dtype. The kernels do the float64 arithmetic of
 * the TypeScript methods value for value; a block with a NaN result is redone in TypeScript, so
 * the bytes are the same as without them.
 */
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { wasmSimdSupported } from '../backend/wasm/module.js';
import { type WasmMemory, wasm } from '../backend/wasm/wasm-api.js';
import type { Rng } from '../tensor/rng.js';
import type { ChunkedInput, StoredArray } from './types.js';

type Stored = NonNullable<ChunkedInput['stored']>;

interface BlockExports {
  linearBlock(pin: number, stride: number, m: number, n: number, pw: number, divisor: number, flags: number, pout: number): number;
  lerpBlock(p0: number, p1: number, n: number, a: number, b: number, flags: number, pout: number): number;
  sumsBlock(p0: number, p1: number, n: number, psums: number, flags: number): void;
  bernoulliFill(pstate: number, pout: number, n: number, threshold: number): void;
  bernoulliEach(pstate: number, pprob: number, pout: number, n: number): void;
  l1Masked(px: number, pb: number, pmask: number, n: number, psums: number, flags: number): void;
  maskedDelta(px: number, pb: number, pmask: number, n: number, scale: number, flags: number, pout: number): number;
  loraRows(pa: number, pb: number, pw: number, prow: number, r: number, inF: number, rows: number, scale: number): void;
}

interface BlockState {
  memory: WasmMemory;
  exports: BlockExports;
}

const WASM_FILE = 'block-kernels.wasm';
/** Values per block (a multiple of 4). */
export const WASM_BLOCK = 16384;
const PAGE = 65536;
/** Start of the data: below it the module's stack and statics. */
const BASE = PAGE;

let state: BlockState | null | undefined;
let enabled = true;

/** Turns the block kernels off (or back on) in this thread; for tests comparing the two paths. */
export function useBlockKernels(on: boolean): void {
  enabled = on;
}

function wasmPath(): string | undefined {
  return [new URL(`./${WASM_FILE}`, import.meta.url), new URL(`../../dist/merge/${WASM_FILE}`, import.meta.url)]
    .map((u) => fileURLToPath(u))
    .find((p) => existsSync(p));
}

/** Whether the block kernels are built and this runtime supports them. */
export function blockKernelsAvailable(): boolean {
  return blockWasm() !== null;
}

function blockWasm(): BlockState | null {
  if (!enabled) return null;
  if (state !== undefined) return state;
  state = null;
  try {
    const path = wasmPath();
    if (path && wasmSimdSupported()) {
      const memory = new wasm.Memory({ initial: 4, maximum: 65536, shared: true });
      const instance = new wasm.Instance(new wasm.Module(readFileSync(path)), { env: { memory } });
      state = { memory, exports: instance.exports as unknown as BlockExports };
    }
  } catch {
    state = null;
  }
  return state;
}

/** The memory, grown to `bytes`, or null. */
function memoryFor(s: BlockState, bytes: number): ArrayBuffer | null {
  const have = s.memory.buffer.byteLength;
  try {
    if (bytes > have) s.memory.grow(Math.ceil((bytes - have) / PAGE));
  } catch {
    return null;
  }
  return s.memory.buffer as unknown as ArrayBuffer;
}

/** One dtype the kernels read (BF16 or F32) shared by every input, and an output they write. */
function dtypesFit(inputs: readonly (Stored | undefined)[], out: StoredArray): inputs is readonly Stored[] {
  const d = inputs[0]?.dtype;
  return (d === 'BF16' || d === 'F32') && (out.dtype === 'BF16' || out.dtype === 'F32') && inputs.every((x) => x !== undefined && x.dtype === d);
}

function flagsOf(inDtype: string, out: StoredArray): number {
  return (inDtype === 'BF16' ? 1 : 0) | (out.dtype === 'BF16' ? 2 : 0);
}

/** Copies values [start, start + len) of `x` to byte `at` of the memory, padded with zeros to a multiple of 4. */
function copyIn(mem: ArrayBuffer, at: number, x: Stored, start: number, len: number): void {
  const padded = (len + 3) & ~3;
  const v = x.view(start, len);
  const dst = v.dtype === 'F32' ? new Float32Array(mem, at, padded) : new Uint16Array(mem, at, padded);
  dst.set(v.data);
  dst.fill(0, len);
}

/** Copies `len` results from byte `at` of the memory to values [start, start + len) of `out`. */
function copyOut(mem: ArrayBuffer, at: number, out: StoredArray, start: number, len: number): void {
  if (out.dtype === 'F32') out.data.set(new Float32Array(mem, at, len), start);
  else out.data.set(new Uint16Array(mem, at, len), start);
}

/**
 * Σₖ wₖ·xₖ / divisor of the stored inputs into `out`, block by block; blocks with a NaN result go
 * to `jsBlock(start, len)`. False, having done nothing, where the kernels are not available or
 * the dtypes do not suit them.
 */
export function linearWasm(
  inputs: readonly (Stored | undefined)[],
  weights: readonly number[],
  divisor: number,
  out: StoredArray,
  jsBlock: (start: number, len: number) => void,
): boolean {
  const s = blockWasm();
  if (!s || inputs.length === 0 || !dtypesFit(inputs, out)) return false;
  const m = inputs.length;
  const stride = WASM_BLOCK * 4;
  const pw = BASE;
  const pin = BASE + Math.ceil((8 * m) / 16) * 16;
  const pout = pin + m * stride;
  const mem = memoryFor(s, pout + stride);
  if (!mem) return false;
  new Float64Array(mem, pw, m).set(weights);
  const flags = flagsOf(inputs[0]!.dtype, out);
  const n = out.data.length;
  for (let start = 0; start < n; start += WASM_BLOCK) {
    const len = Math.min(WASM_BLOCK, n - start);
    for (let k = 0; k < m; k++) copyIn(mem, pin + k * stride, inputs[k]!, start, len);
    if (s.exports.linearBlock(pin, stride, m, (len + 3) & ~3, pw, divisor, flags, pout)) jsBlock(start, len);
    else copyOut(mem, pout, out, start, len);
  }
  return true;
}

/**
 * Slerp's passes over two stored inputs: `sums` receives Σx0², Σx1² and Σx0·x1 (each in index
 * order), then `factors` gives a and b, and out = a·x0 + b·x1; blocks with a NaN result go to
 * `jsBlock`. False, having done nothing, where the kernels do not apply.
 */
export function slerpWasm(
  x0: Stored | undefined,
  x1: Stored | undefined,
  out: StoredArray,
  factors: (n0sq: number, n1sq: number, dot01: number) => { a: number; b: number },
  jsBlock: (start: number, len: number, a: number, b: number) => void,
): boolean {
  const s = blockWasm();
  const inputs = [x0, x1];
  if (!s || !dtypesFit(inputs, out)) return false;
  const stride = WASM_BLOCK * 4;
  const psums = BASE;
  const p0 = BASE + 32;
  const p1 = p0 + stride;
  const pout = p1 + stride;
  const mem = memoryFor(s, pout + stride);
  if (!mem) return false;
  const flags = flagsOf(inputs[0]!.dtype, out);
  const n = out.data.length;
  const sums = new Float64Array(mem, psums, 3);
  sums.fill(0);
  for (let start = 0; start < n; start += WASM_BLOCK) {
    const len = Math.min(WASM_BLOCK, n - start);
    copyIn(mem, p0, inputs[0]!, start, len);
    copyIn(mem, p1, inputs[1]!, start, len);
    s.exports.sumsBlock(p0, p1, len, psums, flags);
  }
  const { a, b } = factors(sums[0]!, sums[1]!, sums[2]!);
  for (let start = 0; start < n; start += WASM_BLOCK) {
    const len = Math.min(WASM_BLOCK, n - start);
    copyIn(mem, p0, inputs[0]!, start, len);
    copyIn(mem, p1, inputs[1]!, start, len);
    if (s.exports.lerpBlock(p0, p1, (len + 3) & ~3, a, b, flags, pout)) jsBlock(start, len, a, b);
    else copyOut(mem, pout, out, start, len);
  }
  return true;
}

/** Draws per call of the WebAssembly mask kernel. */
const DRAW_BLOCK = 1 << 20;

/**
 * `rng.fillBernoulli(out, threshold)` in WebAssembly: the same draws and marks, and `rng` left at
 * the same state. False, having drawn nothing, where the kernels are not available.
 */
export function fillBernoulliWasm(rng: Rng, out: Uint8Array, threshold: number): boolean {
  const s = blockWasm();
  if (!s) return false;
  const pstate = BASE;
  const pout = BASE + 16;
  const mem = memoryFor(s, pout + Math.min(DRAW_BLOCK, out.length));
  if (!mem) return false;
  const state = new Uint32Array(mem, pstate, 4);
  rng.saveState(state);
  // As fillBernoulli: 0 ≤ threshold ≤ 2³² (NaN marks nothing).
  const t = threshold < 0 ? 0 : threshold > 4294967296 ? 4294967296 : threshold;
  for (let start = 0; start < out.length; start += DRAW_BLOCK) {
    const len = Math.min(DRAW_BLOCK, out.length - start);
    s.exports.bernoulliFill(pstate, pout, len, t);
    out.set(new Uint8Array(mem, pout, len), start);
  }
  rng.loadState(state);
  return true;
}

/**
 * `rng.fillBernoulliEach(out, probability)` in WebAssembly: the same draws and marks, and `rng`
 * left at the same state. False, having drawn nothing, where the kernels are not available.
 */
export function fillBernoulliEachWasm(rng: Rng, out: Uint8Array, probability: Float32Array): boolean {
  const s = blockWasm();
  if (!s || probability.length !== out.length) return false;
  const pstate = BASE;
  const pprob = BASE + 16;
  const block = Math.min(DRAW_BLOCK, out.length);
  const pout = pprob + block * 4;
  const mem = memoryFor(s, pout + block);
  if (!mem) return false;
  const state = new Uint32Array(mem, pstate, 4);
  rng.saveState(state);
  for (let start = 0; start < out.length; start += DRAW_BLOCK) {
    const len = Math.min(DRAW_BLOCK, out.length - start);
    new Float32Array(mem, pprob, len).set(probability.subarray(start, start + len));
    s.exports.bernoulliEach(pstate, pprob, pout, len);
    out.set(new Uint8Array(mem, pout, len), start);
  }
  rng.loadState(state);
  return true;
}

/** Layout of the DARE kernels' memory for blocks of at most WASM_BLOCK values. */
function dareLayout(s: BlockState): { mem: ArrayBuffer; psums: number; px: number; pb: number; pmask: number; pout: number } | null {
  const psums = BASE;
  const px = BASE + 16;
  const pb = px + WASM_BLOCK * 4;
  const pmask = pb + WASM_BLOCK * 4;
  const pout = pmask + WASM_BLOCK;
  const mem = memoryFor(s, pout + WASM_BLOCK * 4);
  return mem ? { mem, psums, px, pb, pmask, pout } : null;
}

/**
 * DARE's ‖x − b‖₁ and ‖(x − b) ⊙ mask‖₁ over all values (float64 sums in index order, as the
 * TypeScript), or null where the kernels do not apply (then nothing was read).
 */
export function maskedL1Wasm(x: Stored | undefined, b: Stored | undefined, mask: Uint8Array): { before: number; after: number } | null {
  const s = blockWasm();
  if (!s || !x || !b || x.dtype !== b.dtype || (x.dtype !== 'BF16' && x.dtype !== 'F32')) return null;
  const m = dareLayout(s);
  if (!m) return null;
  const sums = new Float64Array(m.mem, m.psums, 2);
  sums.fill(0);
  const flags = x.dtype === 'BF16' ? 1 : 0;
  const n = mask.length;
  for (let start = 0; start < n; start += WASM_BLOCK) {
    const len = Math.min(WASM_BLOCK, n - start);
    copyIn(m.mem, m.px, x, start, len);
    copyIn(m.mem, m.pb, b, start, len);
    new Uint8Array(m.mem, m.pmask, len).set(mask.subarray(start, start + len));
    s.exports.l1Masked(m.px, m.pb, m.pmask, len, m.psums, flags);
  }
  return { before: sums[0]!, after: sums[1]! };
}

/**
 * DARE's masked (and rescaled) task vector for values [start, start + dst.length) into `dst`,
 * as the TypeScript rounds it; false (dst unspecified) where the kernels do not apply or a value
 * of the block is NaN, and the caller computes the block itself.
 */
export function maskedDeltaWasm(x: Stored | undefined, b: Stored | undefined, mask: Uint8Array, start: number, scale: number | undefined, dst: Float32Array): boolean {
  const s = blockWasm();
  if (!s || !x || !b || x.dtype !== b.dtype || (x.dtype !== 'BF16' && x.dtype !== 'F32')) return false;
  const m = dareLayout(s);
  if (!m) return false;
  const flags = (x.dtype === 'BF16' ? 1 : 0) | (scale === undefined ? 0 : 4);
  for (let from = 0; from < dst.length; from += WASM_BLOCK) {
    const len = Math.min(WASM_BLOCK, dst.length - from);
    const padded = (len + 3) & ~3;
    copyIn(m.mem, m.px, x, start + from, len);
    copyIn(m.mem, m.pb, b, start + from, len);
    const mk = new Uint8Array(m.mem, m.pmask, padded);
    mk.set(mask.subarray(start + from, start + from + len));
    mk.fill(0, len);
    if (s.exports.maskedDelta(m.px, m.pb, m.pmask, padded, scale ?? 1, flags, m.pout)) return false;
    dst.set(new Float32Array(m.mem, m.pout, len), from);
  }
  return true;
}

/** Bytes of W per call of the LoRA kernel. */
const LORA_BLOCK_BYTES = 1 << 22;

/**
 * LoRA's W += s·B·A for W [outF, inF] row-major (`addLoraDelta`'s untransposed case) in
 * WebAssembly, rows a block at a time; `jsRows(o0, o1)` computes rows whose results hold a NaN
 * (the bits of a NaN may differ). False, having changed nothing, where the kernels are not
 * available or inF is odd.
 */
export function loraAddWasm(
  w: Float32Array,
  a: Float32Array,
  b: Float32Array,
  r: number,
  inF: number,
  outF: number,
  scale: number,
  jsRows: (o0: number, o1: number) => void,
): boolean {
  const s = blockWasm();
  if (!s || inF % 2 !== 0 || inF === 0) return false;
  const rowsPer = Math.max(1, Math.floor(LORA_BLOCK_BYTES / (4 * inF)));
  const pa = BASE;
  const pb = pa + Math.ceil((4 * r * inF) / 16) * 16;
  const prow = pb + Math.ceil((4 * r * rowsPer) / 16) * 16;
  const pw = prow + 8 * inF;
  const mem = memoryFor(s, pw + 4 * inF * rowsPer);
  if (!mem) return false;
  new Float32Array(mem, pa, r * inF).set(a);
  for (let o0 = 0; o0 < outF; o0 += rowsPer) {
    const rows = Math.min(rowsPer, outF - o0);
    new Float32Array(mem, pb, rows * r).set(b.subarray(o0 * r, (o0 + rows) * r));
    const wv = new Float32Array(mem, pw, rows * inF);
    wv.set(w.subarray(o0 * inF, (o0 + rows) * inF));
    s.exports.loraRows(pa, pb, pw, prow, r, inF, rows, scale);
    let nan = false;
    for (let i = 0; i < wv.length; i++) {
      if (wv[i] !== wv[i]) {
        nan = true;
        break;
      }
    }
    if (nan) jsRows(o0, o0 + rows);
    else w.set(wv, o0 * inF);
  }
  return true;
}
