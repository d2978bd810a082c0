/** Compute backends: the Backend interface, the reference backend and the WebAssembly one. */
import type { Backend } from './backend.js';
import { ReferenceBackend } from './reference.js';
import { WasmBackend, type WasmBackendOptions } from './wasm/backend.js';

export type {
  AttentionOptions,
  Backend,
  BatchedMatmulOptions,
  CrossEntropyOptions,
  MatmulOptions,
  SoftmaxOptions,
} from './backend.js';
export { ReferenceBackend } from './reference.js';
export { WasmBackend, type WasmBackendOptions } from './wasm/backend.js';
export { wasmSimdSupported } from './wasm/module.js';

export type BackendName = 'wasm' | 'reference';

/** Creates a backend by name (default 'wasm'). */
export function createBackend(name: BackendName = 'wasm', opts: WasmBackendOptions = {}): Backend {
  return name === 'reference' ? new ReferenceBackend() : new WasmBackend(opts);
}
