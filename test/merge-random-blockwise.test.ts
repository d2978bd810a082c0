/**
 * The block-by-block paths of the random sparsifiers (DARE, DELLA) and of the task-vector
 * combine: the same float32 values, bit for bit, as the plain pipeline taskVector → sparsify →
 * combineTaskVectors in TypeScript, with the WebAssembly combine and without it, for seeded and
 * given masks, every density class, both rescale settings and inputs holding NaN, ±Inf and −0.
 * Also: the loop that draws keep-masks gives the same draws as one `nextU32` per element.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Rng } from '../src/tensor/rng.js';
import { mergeTensor, prepareParams, type MaskSource, type MergeInput } from '../src/merge/registry.js';
import { dellaProbabilities, givenMaskSource, rngMaskSource, sparsify, tensorRng } from '../src/merge/sparsify.js';
import { combineTaskVectors } from '../src/merge/gta.js';
import { subtract } from '../src/merge/tensor-ops.js';
import { useWasmKernels, wasmKernelsAvailable } from '../src/merge/fused-wasm.js';

const T = 'model.layers.1.mlp.up_proj.weight';

/** The index of the first value whose bit pattern differs (NaN payloads and signs included), or -1. */
function firstDifference(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < a.length; i++) {
    if (ua[i] !== ub[i]) return i;
  }
  return -1;
}

function inputs(seed: number, shape: number[], models: number, specials: boolean): MergeInput[] {
  const rng = new Rng(seed);
  const n = shape.reduce((a, b) => a * b, 1);
  const base = rng.fillNormal(new Float32Array(n), 0.02);
  const out: MergeInput[] = [{ model: 'base', data: base, shape }];
  for (let k = 0; k < models; k++) {
    const x = base.map((b) => b + (rng.next() < 0.1 ? 0 : rng.normal() * 0.003));
    if (specials) {
      x[rng.int(n)] = NaN;
      x[rng.int(n)] = Infinity;
      x[rng.int(n)] = -Infinity;
      x[rng.int(n)] = -0;
      x[rng.int(n)] = 3e38;
    }
    out.push({ model: `m${k}`, data: x, shape });
  }
  return out;
}

interface Case {
  method: 'dare_ties' | 'dare_linear' | 'della' | 'della_linear';
  shape: number[];
  densities: number[];
  weights: number[];
  rescale: boolean;
  normalize: boolean;
  lambda: number;
  specials: boolean;
  given: boolean;
  seed: number;
}

/** The plain pipeline: whole task vectors, `sparsify`, then the TypeScript combine. */
function reference(c: Case, ins: MergeInput[], masks: MaskSource): Float32Array {
  const base = ins[0]!;
  const deltas: Float32Array[] = [];
  const della = c.method.startsWith('della');
  ins.slice(1).forEach((x, k) => {
    deltas.push(
      sparsify(subtract(x.data, base.data), {
        method: della ? 'della_magprune' : 'random',
        density: c.densities[k]!,
        epsilon: della ? 0.1 : undefined,
        rescale: c.rescale,
        shape: c.shape,
        tensorName: T,
        model: x.model,
        masks,
      }),
    );
  });
  useWasmKernels(false);
  try {
    return combineTaskVectors(base.data, deltas, c.weights, c.method.endsWith('_linear') ? null : 'sum', c.normalize, c.lambda);
  } finally {
    useWasmKernels(true);
  }
}

function viaMethod(c: Case, ins: MergeInput[], masks: MaskSource | undefined, rng: Rng | undefined): Float32Array {
  const models = ins.map((t) => t.model);
  const perModel: Record<string, Record<string, unknown>> = {};
  ins.slice(1).forEach((x, k) => {
    perModel[x.model] = { weight: c.weights[k], density: c.densities[k], ...(c.method.startsWith('della') ? { epsilon: 0.1 } : {}) };
  });
  const global = { rescale: c.rescale, normalize: c.normalize, lambda: c.lambda };
  const params = prepareParams(c.method, { tensorName: T, models, base: 'base' }, { global, perModel });
  const out = mergeTensor(c.method, { tensorName: T, isEmbed: false, inputs: ins, base: 'base', params, ...(masks ? { masks } : {}), ...(rng ? { rng } : {}) });
  assert.ok(out);
  return out.data;
}

function givenMasks(c: Case, n: number): Record<string, Uint8Array> {
  const rng = new Rng(c.seed + 1000);
  const m: Record<string, Uint8Array> = {};
  for (let k = 0; k < c.densities.length; k++) m[`m${k}`] = Uint8Array.from({ length: n }, () => (rng.next() < 0.5 ? 1 : 0));
  return m;
}

function cases(): Case[] {
  const out: Case[] = [];
  const rng = new Rng(77);
  const methods: Case['method'][] = ['dare_ties', 'dare_linear', 'della', 'della_linear'];
  const densityChoices = [0, 0.3, 0.7, 1];
  // Sizes: one block, several blocks of the WebAssembly combine (16384) with a tail that is not
  // a multiple of 4, and rows for DELLA's ranking.
  const shapes = [[40, 50], [7, 2861], [33000]];
  for (let i = 0; i < 24; i++) {
    const models = 1 + rng.int(3);
    out.push({
      method: methods[i % 4]!,
      shape: shapes[i % 3]!,
      densities: Array.from({ length: models }, () => densityChoices[rng.int(4)]!),
      weights: Array.from({ length: models }, () => Math.round((rng.next() * 2 - 0.5) * 100) / 100),
      rescale: rng.next() < 0.7,
      normalize: rng.next() < 0.6,
      lambda: rng.next() < 0.5 ? 1 : 0.6,
      specials: i % 5 === 2,
      given: i % 6 === 1,
      seed: 100 + i,
    });
  }
  // Every model keeping about half, the common case.
  out.push({ method: 'dare_ties', shape: [33000], densities: [0.5, 0.5, 0.5], weights: [1, 0.8, 0.6], rescale: true, normalize: true, lambda: 1, specials: false, given: false, seed: 9 });
  return out;
}

test('DARE and DELLA merged block by block equal the plain pipeline bit for bit, with and without the WebAssembly combine', () => {
  const kinds = wasmKernelsAvailable() ? [true, false] : [false];
  let checked = 0;
  for (const c of cases()) {
    const ins = inputs(c.seed, c.shape, c.densities.length, c.specials);
    const n = ins[0]!.data.length;
    const given = c.given ? givenMasks(c, n) : undefined;
    const want = reference(c, ins, given ? givenMaskSource(given) : rngMaskSource(tensorRng(c.seed, T)));
    for (const wasmOn of kinds) {
      useWasmKernels(wasmOn);
      try {
        const got = given ? viaMethod(c, ins, givenMaskSource(given), undefined) : viaMethod(c, ins, undefined, tensorRng(c.seed, T));
        const at = firstDifference(got, want);
        assert.equal(at, -1, `${JSON.stringify(c)} wasm ${wasmOn}: value ${at} is ${got[at]}, the pipeline gives ${want[at]}`);
        checked++;
      } finally {
        useWasmKernels(true);
      }
    }
  }
  assert.ok(checked >= 25);
});

test('a mixed result holds the sparsified task vectors it was made from (not just equal to itself)', () => {
  // dare_linear with one model, density 1, normalize off: base + w·(x − base) exactly.
  const ins = inputs(5, [33000], 1, false);
  const c: Case = { method: 'dare_linear', shape: [33000], densities: [1], weights: [0.5], rescale: true, normalize: false, lambda: 1, specials: false, given: false, seed: 5 };
  const got = viaMethod(c, ins, undefined, tensorRng(5, T));
  const b = ins[0]!.data;
  const x = ins[1]!.data;
  for (const i of [0, 1, 16383, 16384, 32999]) assert.equal(got[i], Math.fround(b[i]! + Math.fround(0.5 * Math.fround(x[i]! - b[i]!))));
});

test('the WebAssembly combine of whole task vectors equals the TypeScript one, NaN blocks included', { skip: !wasmKernelsAvailable() && 'WebAssembly kernels not built' }, () => {
  const rng = new Rng(3);
  const n = 40000;
  const base = rng.fillNormal(new Float32Array(n), 0.02);
  const deltas = [0, 1, 2].map(() => Float32Array.from({ length: n }, () => (rng.next() < 0.4 ? 0 : rng.normal() * 0.001)));
  deltas[0]![10] = NaN;
  deltas[1]![20000] = Infinity;
  deltas[2]![20000] = -Infinity;
  deltas[0]![30000] = -0;
  for (const [consensus, normalize, lambda] of [['sum', true, 1], ['sum', false, 0.7], [null, true, 1], [null, false, 1.3]] as const) {
    const fast = combineTaskVectors(base, deltas, [1, -0.8, 0.6], consensus, normalize, lambda);
    useWasmKernels(false);
    const plain = combineTaskVectors(base, deltas, [1, -0.8, 0.6], consensus, normalize, lambda);
    useWasmKernels(true);
    assert.equal(firstDifference(fast, plain), -1, `${consensus} ${normalize} ${lambda}`);
    assert.ok(Number.isNaN(fast[10]));
  }
});

test('keep-mask draws equal one nextU32 per element, for a threshold and for per-element probabilities', () => {
  const n = 5000;
  for (const p of [0, 1e-9, 0.25, 0.5, 0.999999, 1]) {
    const a = new Rng(11);
    const b = new Rng(11);
    const mask = new Uint8Array(n);
    a.fillBernoulli(mask, p * 4294967296);
    for (let i = 0; i < n; i++) assert.equal(mask[i], b.nextU32() < p * 4294967296 ? 1 : 0, `p ${p}, element ${i}`);
    assert.equal(a.nextU32(), b.nextU32(), 'the streams go on in step');
  }
  const probs = Float32Array.from({ length: n }, (_, i) => [0, 1, NaN, 1e-12, 0.5, 0.3333333][i % 6]! * ((i % 7) + 1) / 7);
  const a = new Rng(12);
  const b = new Rng(12);
  const mask = new Uint8Array(n);
  a.fillBernoulliEach(mask, probs);
  let ones = 0;
  for (let i = 0; i < n; i++) {
    assert.equal(mask[i], b.nextU32() < probs[i]! * 4294967296 ? 1 : 0, `element ${i}`);
    ones += mask[i]!;
  }
  assert.ok(ones > 500 && ones < n - 500, `${ones} kept`);
  assert.equal(a.nextU32(), b.nextU32());
});

test('a task vector shorter than the base reads as NaN past its end, not as an earlier block', () => {
  const base = new Float32Array(20000).fill(1);
  combineTaskVectors(base, [new Float32Array(20000).fill(7)], [1], null, false, 1);
  const out = combineTaskVectors(base, [new Float32Array(19990).fill(2)], [1], null, false, 1);
  assert.equal(out[0], 3);
  assert.ok(Number.isNaN(out[19995]!), `${out[19995]}`);
});

test('DELLA checks epsilon before asking for a random source, as the plain pipeline does', () => {
  const ins = inputs(8, [40, 50], 1, false);
  const params = prepareParams('della', { tensorName: T, models: ['base', 'm0'], base: 'base' }, { perModel: { m0: { weight: 1, density: 0.5, epsilon: 0.2 } } });
  (params.perModel as Record<string, Record<string, unknown>>)['m0']!['epsilon'] = 0.6;
  assert.throws(() => mergeTensor('della', { tensorName: T, isEmbed: false, inputs: ins, base: 'base', params }), /della needs 0 < density - epsilon/);
});

test('keep-mask probabilities outside [0, 1] mark 0 or 1 only', () => {
  const mask = new Uint8Array(64);
  new Rng(1).fillBernoulli(mask, -5);
  assert.ok(mask.every((v) => v === 0));
  new Rng(1).fillBernoulli(mask, 2 * 4294967296);
  assert.ok(mask.every((v) => v === 1));
  new Rng(1).fillBernoulliEach(mask, Float32Array.from({ length: 64 }, (_, i) => (i % 2 ? -0.5 : 1.5)));
  assert.ok(mask.every((v, i) => v === (i % 2 ? 0 : 1)));
});

test('DELLA keep probabilities from the WebAssembly ranking equal the TypeScript ones', { skip: !wasmKernelsAvailable() && 'WebAssembly kernels not built' }, () => {
  const rng = new Rng(21);
  for (const [shape, ties] of [[[64, 300], false], [[3, 70000], false], [[200, 1], false], [[1, 1], false], [[50, 128], true], [[4000], true], [[6, 5, 4], false]] as const) {
    const n = (shape as readonly number[]).reduce((a, b) => a * b, 1);
    // With ties: few distinct magnitudes, zeros and both signs, so ranks follow the index order.
    const delta = Float32Array.from({ length: n }, () => (ties ? (rng.int(5) - 2) * 0.25 : rng.normal() * 0.01));
    if (!ties && n > 10) {
      delta[3] = -0;
      delta[7] = 0;
      delta[9] = NaN;
    }
    const fast = dellaProbabilities(delta, shape, 0.5, 0.15);
    useWasmKernels(false);
    const plain = dellaProbabilities(delta, shape, 0.5, 0.15);
    useWasmKernels(true);
    assert.equal(firstDifference(fast, plain), -1, JSON.stringify(shape));
    const rowLength = shape.length < 2 ? n : shape[1]!;
    if (rowLength > 1) assert.ok(fast.some((p) => p > 0.6) && fast.some((p) => p < 0.4), 'probabilities spread around the density');
    else assert.ok(fast.every((p) => p === 0.5), 'a one-value row keeps the density');
  }
});
