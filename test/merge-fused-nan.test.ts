/**
 * The fused TIES / task_arithmetic kernel where NaNs meet or Inf − Inf makes one: WebAssembly and
 * V8 may pick NaNs of different signs or payloads there, so the WebAssembly kernel notes NaN
 * inputs and results and the tensor is redone in TypeScript. The bytes then equal the unfused
 * pipeline's (taskVector → sparsify → combineTaskVectors), with the kernels on and off.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { MemoryValues } from '../src/merge/fused-common.js';
import { useWasmKernels, wasmKernelsAvailable } from '../src/merge/fused-wasm.js';
import { combineTaskVectors, fusedMerge, gtaVariantOf } from '../src/merge/gta.js';
import { getMergeMethod } from '../src/merge/registry.js';
import { sparsify } from '../src/merge/sparsify.js';
import { subtract } from '../src/merge/tensor-ops.js';
import { Rng } from '../src/tensor/rng.js';

const bytes = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

for (const method of ['ties', 'task_arithmetic'] as const) {
  test(`${method}: NaN and Inf inputs give the unfused pipeline's bytes, WebAssembly on and off`, () => {
    const rng = new Rng(5);
    const n = 70_003;
    const base = rng.fillNormal(new Float32Array(n), 0.02);
    const models = [0, 1, 2].map(() => Float32Array.from(base, (b) => b + rng.normal() * 0.01));
    // Where the base is +Inf: one model NaN, one +Inf (Inf − Inf), one -Inf.
    for (let k = 0; k < 40; k++) {
      const i = rng.int(n);
      base[i] = Infinity;
      models[0]![i] = NaN;
      models[1]![i] = Infinity;
      models[2]![i] = -Infinity;
    }
    // NaNs of both signs on their own.
    const negNaN = new Float32Array(new Uint32Array([0xffc00001]).buffer)[0]!;
    for (let k = 0; k < 40; k++) models[k % 3]![rng.int(n)] = k % 2 ? negNaN : NaN;
    const weights = [1, 0.8, -0.6];
    const density = 0.5;
    const v = gtaVariantOf(getMergeMethod(method))!;
    const normalize = method === 'ties';
    const deltas = models.map((x) =>
      method === 'ties'
        ? sparsify(subtract(x, base), { method: 'magnitude', density, rescale: false, shape: [n], tensorName: 't', model: 'm' })
        : subtract(x, base),
    );
    const want = combineTaskVectors(base, deltas, weights, v.consensus, normalize, 1);
    const params = {
      global: { normalize, rescale: false, lambda: 1, int8_mask: false },
      perModel: Object.fromEntries(models.map((_, k) => [`m${k}`, method === 'ties' ? { weight: weights[k]!, density } : { weight: weights[k]! }])),
    };
    for (const wasm of wasmKernelsAvailable() ? [true, false] : [false]) {
      useWasmKernels(wasm);
      try {
        const out: MemoryValues = { dtype: 'F32', data: new Float32Array(n) };
        const inputs = [
          { model: 'base', shape: [n], values: { dtype: 'F32' as const, data: base } },
          ...models.map((x, k) => ({ model: `m${k}`, shape: [n], values: { dtype: 'F32' as const, data: x } })),
        ];
        assert.equal(fusedMerge(v, { tensorName: 't', isEmbed: false, base: 'base', params }, inputs, out), true);
        assert.ok(bytes(want).equals(bytes(out.data as Float32Array)), `WebAssembly ${wasm ? 'on' : 'off'}`);
      } finally {
        useWasmKernels(true);
      }
    }
  });
}
