/**
 * Locating and compiling the GEMM WebAssembly module, built from assembly/gemm.ts by
 * `npm run build:wasm` into dist/backend/wasm/gemm.wasm.
 */
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { AmalgamError } from '../../errors.js';
import { type WasmModule, wasm } from './wasm-api.js';

const WASM_NAME = 'gemm.wasm';

/** Where the module may be: beside this file (dist), or in dist when running from src. */
function candidates(): string[] {
  return [
    fileURLToPath(new URL(`./${WASM_NAME}`, import.meta.url)),
    fileURLToPath(new URL(`../../../dist/backend/wasm/${WASM_NAME}`, import.meta.url)),
  ];
}

let cached: WasmModule | undefined;

/** Whether this runtime validates WebAssembly SIMD with shared memory (Node 20 does). */
export function wasmSimdSupported(): boolean {
  // (module (memory 1 1 shared) (func (result v128) (v128.const i32x4 0 0 0 0)))
  const probe = new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b, 0x03,
    0x02, 0x01, 0x00, 0x05, 0x04, 0x01, 0x03, 0x01, 0x01, 0x0a, 0x16, 0x01, 0x14, 0x00, 0xfd, 0x0c,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x0b,
  ]);
  try {
    return typeof SharedArrayBuffer === 'function' && typeof wasm === 'object' && wasm.validate(probe);
  } catch {
    return false;
  }
}

/** Path of the built module, or undefined when it has not been built. */
export function gemmWasmPath(): string | undefined {
  return candidates().find((p) => existsSync(p));
}

/** The compiled GEMM module (compiled once per process). */
export function gemmModule(): WasmModule {
  if (cached) return cached;
  const path = gemmWasmPath();
  if (!path) {
    throw new AmalgamError('E_MISSING', `the WebAssembly kernels (${WASM_NAME}) have not been built`, {
      hint: 'run `npm run build:wasm` (or `npm run build`)',
    });
  }
  if (!wasmSimdSupported()) {
    throw new AmalgamError('E_UNSUPPORTED', 'this runtime lacks WebAssembly SIMD or shared memory', {
      hint: 'use Node 20 or later, or the reference backend',
    });
  }
  cached = new wasm.Module(readFileSync(path));
  return cached;
}
