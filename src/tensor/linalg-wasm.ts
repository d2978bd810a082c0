/**
 * The WebAssembly SIMD Householder tridiagonalisation (`assembly/linalg.ts`, built by
 * `npm run build:wasm` into dist/tensor/linalg-kernels.wasm). Without the built module, or where
 * the runtime lacks SIMD, `tridiagonalizeWasm` returns null and the TypeScript version runs.
 */
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { wasmSimdSupported } from '../backend/wasm/module.js';
import { type WasmModule, wasm } from '../backend/wasm/wasm-api.js';

const WASM_FILE = 'linalg-kernels.wasm';
const PAGE = 65536;
let module: WasmModule | null | undefined;
let enabled = true;

/** Turns the WebAssembly reduction off (or back on) in this thread; for tests comparing the two. */
export function useLinalgWasm(on: boolean): void {
  enabled = on;
}

function linalgModule(): WasmModule | null {
  if (module !== undefined) return module;
  module = null;
  try {
    const path = [new URL(`./${WASM_FILE}`, import.meta.url), new URL(`../../dist/tensor/${WASM_FILE}`, import.meta.url)]
      .map((u) => fileURLToPath(u))
      .find((p) => existsSync(p));
    if (path && wasmSimdSupported()) module = new wasm.Module(readFileSync(path));
  } catch {
    module = null;
  }
  return module;
}

/** Whether the WebAssembly reduction is built, supported and switched on. */
export function linalgWasmAvailable(): boolean {
  return enabled && linalgModule() !== null;
}

/**
 * Reduces the symmetric n×n W (row-major; its lower triangle is read) to tridiagonal form in
 * WebAssembly: returns d, e, τ and the reduced matrix (reflector s in the upper part of row s),
 * as `householderTridiagonal` would; null when the module is not available.
 */
export function tridiagonalizeWasm(w: Float64Array, n: number): { w: Float64Array; d: Float64Array; e: Float64Array; taus: Float64Array } | null {
  if (!enabled || n < 3) return null;
  const mod = linalgModule();
  if (!mod) return null;
  const bytes = (n * n + 4 * n + 8) * 8;
  const pages = Math.ceil(bytes / PAGE);
  if (pages > 65536) return null;
  const memory = new wasm.Memory({ initial: pages, maximum: pages, shared: true });
  const exports = new wasm.Instance(mod, { env: { memory } }).exports as unknown as {
    tridiagonalize(pw: number, n: number, pd: number, pe: number, ptau: number, pp: number): void;
  };
  const f64 = new Float64Array(memory.buffer);
  f64.set(w);
  const pd = n * n;
  const pe = pd + n;
  const ptau = pe + n;
  const pp = ptau + n;
  exports.tridiagonalize(0, n, pd * 8, pe * 8, ptau * 8, pp * 8);
  return {
    w: f64.subarray(0, n * n),
    d: f64.slice(pd, pd + n),
    e: f64.slice(pe, pe + n - 1),
    taus: f64.slice(ptau, ptau + n - 2),
  };
}
