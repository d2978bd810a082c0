/**
 * A worker keeps the float32 arrays of a finished tensor (its decoded inputs and its result) for
 * the next tensors' inputs when the task allows it (`spareBytes`). Tensors merged one after
 * another that way, with shapes that shrink, grow and repeat, a method whose result is one of its
 * inputs, and inputs rounded in place, give the same bytes as each merged on its own.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { computeTensor, type ComputeTask } from '../src/merge/worker.js';
import { prepareParams } from '../src/merge/registry.js';
import { encodeFromF32, type DType, type FloatDType } from '../src/tensor/dtype.js';
import { Rng } from '../src/tensor/rng.js';

function task(id: number, method: string, shape: number[], models: number, dtype: 'BF16' | 'F16', o: { computeDtype?: FloatDType; weights?: number[] } = {}): ComputeTask {
  const rng = new Rng(id * 31 + 7);
  const n = shape.reduce((a, b) => a * b, 1);
  const names = Array.from({ length: models }, (_, k) => (k === 0 ? 'base' : `m${k}`));
  const base = rng.fillNormal(new Float32Array(n), 0.05);
  const inputs = names.map((model, k) => {
    const values = k === 0 ? base : base.map((b) => b + rng.normal() * 0.01);
    return { model, shape, raw: encodeFromF32(dtype, values).slice(), dtype: dtype as DType };
  });
  const perModel: Record<string, Record<string, unknown>> = {};
  names.forEach((m, k) => {
    if (method === 'linear') perModel[m] = { weight: o.weights?.[k] ?? 1 };
    else if (k > 0) perModel[m] = { weight: o.weights?.[k] ?? 0.7, density: 0.5 };
  });
  const baseModel = method === 'linear' || method === 'passthrough' ? null : 'base';
  const params = prepareParams(method, { tensorName: `t${id}`, models: names, base: baseModel }, { perModel });
  const outBytes = n * 2;
  return {
    id,
    tensorName: `model.layers.${id}.mlp.up_proj.weight`,
    method,
    isEmbed: false,
    isOptional: false,
    base: baseModel,
    params,
    inputs,
    computeDtype: o.computeDtype ?? null,
    outDtype: dtype,
    outShape: shape,
    seed: 5,
    outBuffer: new ArrayBuffer(outBytes),
  };
}

/** The tasks in a list, each built twice (a task's buffers are its own). */
function tasks(): (() => ComputeTask)[] {
  return [
    () => task(1, 'dare_ties', [40, 70], 4, 'BF16'),
    () => task(2, 'linear', [20, 30], 3, 'BF16'),
    () => task(3, 'passthrough', [50, 70], 1, 'BF16'),
    () => task(4, 'dare_linear', [60, 70], 3, 'F16', { computeDtype: 'BF16' }),
    () => task(5, 'linear', [40, 70], 4, 'BF16', { weights: [1, 0, 0, 0] }),
    () => task(6, 'dare_ties', [40, 70], 4, 'BF16'),
    () => task(7, 'della', [30, 70], 3, 'BF16'),
  ];
}

test('tensors merged with kept arrays give the bytes of each merged on its own', () => {
  const alone = tasks().map((make) => Buffer.from(computeTensor(make()).bytes));
  for (const spareBytes of [4 * 40 * 70 * 4, 4 * 70 * 70 * 4 * 2, 1 << 20]) {
    const seq = tasks().map((make) => Buffer.from(computeTensor({ ...make(), spareBytes }).bytes));
    seq.forEach((b, k) => assert.ok(b.equals(alone[k]!), `task ${k + 1} with spareBytes ${spareBytes}`));
    // Again in reverse order: the kept arrays are now of other shapes.
    const rev = tasks().reverse().map((make) => Buffer.from(computeTensor({ ...make(), spareBytes }).bytes)).reverse();
    rev.forEach((b, k) => assert.ok(b.equals(alone[k]!), `task ${k + 1} in reverse with spareBytes ${spareBytes}`));
  }
  // The results are real merges: passthrough returns its input, linear with weights 1,0,0,0 the base.
  const t3 = task(3, 'passthrough', [50, 70], 1, 'BF16');
  assert.ok(Buffer.from(t3.inputs[0]!.raw!).equals(alone[2]!));
  const t5 = task(5, 'linear', [40, 70], 4, 'BF16', { weights: [1, 0, 0, 0] });
  assert.ok(Buffer.from(t5.inputs[0]!.raw!).equals(alone[4]!));
  assert.ok(!alone[0]!.equals(Buffer.from(task(1, 'dare_ties', [40, 70], 4, 'BF16').inputs[0]!.raw!)));
});
