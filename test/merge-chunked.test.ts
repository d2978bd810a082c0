/**
 * The chunked merges (linear, slerp: `mergeChunked`, src/merge/chunked.ts, with the WebAssembly
 * block kernels on and off) from stored bytes in memory and from files equal the plain path on
 * decoded float32 arrays, byte for byte: every stored dtype in and out, rounding to the merge's
 * dtype, NaN, ±Inf, −0, lengths off the block and window sizes.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, writeSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { blockKernelsAvailable, fillBernoulliEachWasm, fillBernoulliWasm, useBlockKernels } from '../src/merge/blocks-wasm.js';
import { computeTensor, type ComputeInput, type ComputeTask } from '../src/merge/worker.js';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16, type FloatDType } from '../src/tensor/dtype.js';
import { Rng } from '../src/tensor/rng.js';
import { addLoraDelta } from '../src/lora/apply.js';

const root = await mkdtemp(join(tmpdir(), 'amalgam-chunked-'));
after(() => rm(root, { recursive: true, force: true }));

type Stored = 'F32' | 'BF16' | 'F16';

interface Case {
  method: 'linear' | 'slerp' | 'nearswap' | 'model_stock' | 'nuslerp' | 'dare_ties' | 'dare_linear' | 'della' | 'della_linear' | 'sce' | 'ram' | 'ramplus_tl' | 'multislerp' | 'arcee_fusion';
  n: number;
  /** Default [n]. */
  shape?: number[];
  /** The base model's name (default: m0 for slerp, nearswap and model_stock, none otherwise). */
  base?: string | null;
  models: number;
  dtype: Stored;
  outDtype: Stored;
  computeDtype: FloatDType | null;
  specials: boolean;
  params: { global: Record<string, unknown>; perModel: Record<string, Record<string, unknown>> };
  /** slerp: the second model is the first plus this much noise (small: the lerp branch). */
  noise?: number;
}

function encode(a: Float32Array, dtype: Stored): Uint8Array {
  const v = dtype === 'F32' ? a.slice() : dtype === 'BF16' ? f32ToBf16(a) : f32ToF16(a);
  return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
}

function decode(bytes: Uint8Array, dtype: Stored): Float32Array {
  if (dtype === 'F32') return new Float32Array(bytes.slice().buffer);
  const bits = new Uint16Array(bytes.slice().buffer);
  return dtype === 'BF16' ? bf16ToF32(bits) : f16ToF32(bits);
}

function inputsOf(c: Case, seed: number): Uint8Array[] {
  const rng = new Rng(seed);
  const first = new Float32Array(c.n);
  for (let i = 0; i < c.n; i++) first[i] = (rng.next() - 0.5) * 0.2;
  const out: Uint8Array[] = [];
  for (let m = 0; m < c.models; m++) {
    const a = new Float32Array(c.n);
    const noise = c.noise ?? 0.1;
    for (let i = 0; i < c.n; i++) a[i] = m === 0 ? first[i]! : first[i]! + (rng.next() - 0.5) * noise;
    if (c.specials) {
      const special = [NaN, -NaN, Infinity, -Infinity, -0, 0, 1e-40, 3e38];
      for (let k = 0; k < 12; k++) a[Math.floor(rng.next() * c.n)] = special[(k + m) % special.length]!;
    }
    out.push(encode(a, c.dtype));
  }
  return out;
}

function task(c: Case, inputs: ComputeInput[]): ComputeTask {
  return {
    id: 0,
    tensorName: 'model.layers.0.mlp.up_proj.weight',
    method: c.method,
    isEmbed: false,
    isOptional: false,
    base: c.base !== undefined ? c.base : c.method === 'linear' || c.method === 'nuslerp' ? null : 'm0',
    params: c.params as ComputeTask['params'],
    inputs,
    computeDtype: c.computeDtype,
    outDtype: c.outDtype,
    outShape: c.shape ?? [c.n],
    seed: c.method.startsWith('dare') || c.method.startsWith('della') ? 1234 : null,
  };
}

const bytesOf = (r: { bytes: Uint8Array }) => Buffer.from(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength);

let fileNo = 0;
function check(c: Case, seed: number): void {
  const stored = inputsOf(c, seed);
  const names = stored.map((_, k) => `m${k}`);
  // The plain path: float32 arrays decoded exactly from the stored values.
  const plain = computeTensor(task(c, stored.map((b, k) => ({ model: names[k]!, shape: c.shape ?? [c.n], data: decode(b, c.dtype), dtype: c.dtype }))));
  const want = bytesOf(plain);
  // Stored bytes in memory.
  for (const wasmOn of [true, false]) {
    useBlockKernels(wasmOn);
    try {
      const raw = computeTensor(task(c, stored.map((b, k) => ({ model: names[k]!, shape: c.shape ?? [c.n], raw: b.slice(), dtype: c.dtype }))));
      assert.ok(want.equals(bytesOf(raw)), `in memory, block kernels ${wasmOn ? 'on' : 'off'}`);
      assert.deepEqual(raw.warnings, plain.warnings);
      // The same bytes in a file, each input at an odd offset.
      const path = join(root, `inputs-${fileNo++}.bin`);
      const fd = openSync(path, 'w');
      const size = c.dtype === 'F32' ? 4 : 2;
      let pos = 3 * size;
      const files: ComputeInput[] = [];
      stored.forEach((b, k) => {
        writeSync(fd, b, 0, b.length, pos);
        files.push({ model: names[k]!, shape: c.shape ?? [c.n], file: { path, offset: pos }, dtype: c.dtype });
        pos += b.length + 5 * size;
      });
      writeSync(fd, new Uint8Array(7), 0, 7, pos);
      closeSync(fd);
      const fromFile = computeTensor(task(c, files));
      assert.ok(want.equals(bytesOf(fromFile)), `from a file, block kernels ${wasmOn ? 'on' : 'off'}`);
      assert.deepEqual(fromFile.warnings, plain.warnings);
    } finally {
      useBlockKernels(true);
    }
  }
}

const linearParams = (models: number, normalize: boolean) => ({
  global: { normalize },
  perModel: Object.fromEntries(Array.from({ length: models }, (_, k) => [`m${k}`, { weight: [1, 0.8, -0.35, 0.6, 2.5][k % 5] }])),
});
const slerpParams = (t: number) => ({ global: { t }, perModel: { m0: {}, m1: {} } });

const cases: Case[] = [
  { method: 'linear', n: 1, models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: linearParams(2, true) },
  { method: 'linear', n: 4099, models: 4, dtype: 'BF16', outDtype: 'BF16', computeDtype: 'BF16', specials: true, params: linearParams(4, true) },
  { method: 'linear', n: 70_001, models: 3, dtype: 'F32', outDtype: 'F32', computeDtype: null, specials: true, params: linearParams(3, false) },
  { method: 'linear', n: 70_003, models: 3, dtype: 'F32', outDtype: 'BF16', computeDtype: 'BF16', specials: false, params: linearParams(3, true) },
  { method: 'linear', n: 9_001, models: 2, dtype: 'F16', outDtype: 'F16', computeDtype: 'F16', specials: true, params: linearParams(2, true) },
  { method: 'linear', n: 9_002, models: 5, dtype: 'BF16', outDtype: 'F32', computeDtype: 'F16', specials: false, params: linearParams(5, true) },
  // Past one window of file reads (2^18 values).
  { method: 'linear', n: (1 << 18) * 2 + 1001, models: 3, dtype: 'BF16', outDtype: 'BF16', computeDtype: 'BF16', specials: true, params: linearParams(3, true) },
  { method: 'slerp', n: 3, models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: slerpParams(0.5) },
  { method: 'slerp', n: 70_001, models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: 'BF16', specials: false, params: slerpParams(0.3) },
  { method: 'slerp', n: 70_001, models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: slerpParams(0.7), noise: 1e-4 },
  { method: 'slerp', n: 40_000, models: 2, dtype: 'F32', outDtype: 'F32', computeDtype: null, specials: true, params: slerpParams(0.5) },
  { method: 'slerp', n: 5_000, models: 2, dtype: 'F16', outDtype: 'BF16', computeDtype: 'BF16', specials: false, params: slerpParams(1.2) },
  { method: 'slerp', n: (1 << 18) + 77, models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: 'BF16', specials: false, params: slerpParams(0.5) },
];

const nearswapParams = (t: number) => ({ global: { t }, perModel: { m0: {}, m1: {} } });
const stockParams = (models: number, filterWise: boolean) => ({
  global: { filter_wise: filterWise },
  perModel: Object.fromEntries(Array.from({ length: models }, (_, k) => [`m${k}`, {}])),
});
const nuslerpParams = (models: number, flatten: boolean, rowWise: boolean) => ({
  global: { nuslerp_flatten: flatten, nuslerp_row_wise: rowWise },
  perModel: Object.fromEntries(Array.from({ length: models }, (_, k) => [`m${k}`, { weight: [1, 1, 0.4, 1.7][k % 4] }])),
});

cases.push(
  { method: 'nearswap', n: 4099, models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: true, params: nearswapParams(0.01) },
  { method: 'nearswap', n: 70_001, models: 2, dtype: 'F32', outDtype: 'BF16', computeDtype: 'BF16', specials: false, params: nearswapParams(0.0001) },
  { method: 'model_stock', n: 70_001, models: 4, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: stockParams(4, false) },
  { method: 'model_stock', n: 30_000, shape: [30, 1000], models: 3, dtype: 'BF16', outDtype: 'F32', computeDtype: 'BF16', specials: false, params: stockParams(3, true) },
  { method: 'model_stock', n: 3 * 5000, shape: [3, 5000], models: 3, dtype: 'F16', outDtype: 'F16', computeDtype: null, specials: true, params: stockParams(3, true) },
  // Fine-tunes equal to the base: zero task vectors.
  { method: 'model_stock', n: 9_000, models: 3, dtype: 'F32', outDtype: 'F32', computeDtype: null, specials: false, params: stockParams(3, false), noise: 0 },
  { method: 'nuslerp', n: 70_001, models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: nuslerpParams(2, true, false) },
  { method: 'nuslerp', n: 70_001, models: 3, base: 'm2', dtype: 'BF16', outDtype: 'BF16', computeDtype: 'BF16', specials: false, params: nuslerpParams(3, true, false) },
  { method: 'nuslerp', n: 40 * 300, shape: [40, 300], models: 3, base: 'm0', dtype: 'F32', outDtype: 'BF16', computeDtype: null, specials: true, params: nuslerpParams(3, false, false) },
  { method: 'nuslerp', n: 4 * 6000, shape: [4, 6000], models: 2, dtype: 'BF16', outDtype: 'F32', computeDtype: null, specials: false, params: nuslerpParams(2, false, false) },
  // Row-wise vectors are strided: the chunked path declines and the plain one merges.
  { method: 'nuslerp', n: 40 * 300, shape: [40, 300], models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: nuslerpParams(2, false, true) },
);

const dareParams = (models: number, rescale: boolean, normalize: boolean, lambda = 1) => ({
  global: { rescale, normalize, lambda, int8_mask: false },
  perModel: Object.fromEntries(
    Array.from({ length: models }, (_, k) => [`m${k}`, k === 0 ? {} : { weight: [1, 0.8, -0.5, 0.6][k % 4], density: [0.5, 0.3, 1, 0, 0.9][k % 5] }]),
  ),
});
cases.push(
  { method: 'dare_ties', n: 70_001, models: 4, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: dareParams(4, true, false) },
  { method: 'dare_ties', n: 300_001, models: 6, dtype: 'BF16', outDtype: 'BF16', computeDtype: 'BF16', specials: true, params: dareParams(6, true, true, 0.7) },
  { method: 'dare_linear', n: 9_001, models: 3, dtype: 'F32', outDtype: 'F32', computeDtype: null, specials: true, params: dareParams(3, false, false) },
  { method: 'dare_linear', n: 70_003, models: 4, dtype: 'F16', outDtype: 'BF16', computeDtype: 'F16', specials: false, params: dareParams(4, true, true) },
);

const dellaParams = (models: number, rescale: boolean, normalize: boolean) => ({
  global: { rescale, normalize, lambda: 1, int8_mask: false },
  perModel: Object.fromEntries(
    Array.from({ length: models }, (_, k) => [`m${k}`, k === 0 ? {} : { weight: [1, 0.8, -0.5, 0.6][k % 4], density: [0.5, 0.4, 1, 0, 0.6][k % 5], epsilon: 0.1 }]),
  ),
});
cases.push(
  { method: 'della', n: 64 * 1000, shape: [64, 1000], models: 4, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: dellaParams(4, true, true) },
  { method: 'della', n: 3 * 70_001, shape: [3, 70_001], models: 3, dtype: 'BF16', outDtype: 'BF16', computeDtype: 'BF16', specials: true, params: dellaParams(3, true, true) },
  { method: 'della_linear', n: 5_000, models: 3, dtype: 'F32', outDtype: 'F32', computeDtype: null, specials: true, params: dellaParams(3, false, false) },
  { method: 'della_linear', n: 20 * 300, shape: [20, 300], models: 6, dtype: 'F16', outDtype: 'BF16', computeDtype: 'F16', specials: false, params: dellaParams(6, true, false) },
  // Rows of a 3-D tensor are strided: the chunked path declines and the plain one merges.
  { method: 'della', n: 4 * 5 * 6, shape: [4, 5, 6], models: 3, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: dellaParams(3, true, true) },
);

const sceParams = (models: number, topk: number) => ({
  global: { select_topk: topk, int8_mask: false },
  perModel: Object.fromEntries(Array.from({ length: models }, (_, k) => [`m${k}`, {}])),
});
cases.push(
  { method: 'sce', n: 70_001, models: 4, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: sceParams(4, 1) },
  { method: 'sce', n: 70_001, models: 4, dtype: 'BF16', outDtype: 'BF16', computeDtype: 'BF16', specials: true, params: sceParams(4, 0.3) },
  { method: 'sce', n: 9_001, models: 3, dtype: 'F32', outDtype: 'F32', computeDtype: null, specials: false, params: sceParams(3, 0) },
  { method: 'sce', n: (1 << 20) + 17, models: 3, dtype: 'F16', outDtype: 'BF16', computeDtype: null, specials: false, params: sceParams(3, 0.5) },
);

const ramParams = (models: number, plus: boolean) => ({
  global: plus ? { epsilon: 0.02, r: 0.1, alpha: 0.2 } : { epsilon: 0.02 },
  perModel: Object.fromEntries(Array.from({ length: models }, (_, k) => [`m${k}`, {}])),
});
cases.push(
  { method: 'ram', n: 70_001, models: 4, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: true, params: ramParams(4, false) },
  { method: 'ramplus_tl', n: 70_001, models: 4, dtype: 'BF16', outDtype: 'BF16', computeDtype: 'BF16', specials: false, params: ramParams(4, true) },
  { method: 'ramplus_tl', n: 9_003, models: 3, dtype: 'F32', outDtype: 'F32', computeDtype: null, specials: true, params: ramParams(3, true) },
);

const multislerpParams = (models: number, normalize: boolean) => ({
  global: { normalize_weights: normalize, eps: 1e-8 },
  perModel: Object.fromEntries(Array.from({ length: models }, (_, k) => [`m${k}`, { weight: [1, 0.8, 0.5, 1.3][k % 4] }])),
});
cases.push(
  { method: 'multislerp', n: 70_001, models: 4, base: 'm0', dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: multislerpParams(4, true) },
  { method: 'multislerp', n: 9_001, models: 3, base: null, dtype: 'F32', outDtype: 'F32', computeDtype: null, specials: false, params: multislerpParams(3, false) },
  { method: 'multislerp', n: 20_000, models: 3, base: 'm2', dtype: 'F16', outDtype: 'BF16', computeDtype: 'BF16', specials: false, params: multislerpParams(3, true) },
);

const noParams = (models: number) => ({ global: {}, perModel: Object.fromEntries(Array.from({ length: models }, (_, k) => [`m${k}`, {}])) });
cases.push(
  { method: 'arcee_fusion', n: 64 * 1000, shape: [64, 1000], models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: noParams(2) },
  { method: 'arcee_fusion', n: 3 * 7000, shape: [3, 7000], models: 2, dtype: 'F32', outDtype: 'BF16', computeDtype: 'BF16', specials: true, params: noParams(2) },
  { method: 'arcee_fusion', n: 999, models: 2, dtype: 'F16', outDtype: 'F16', computeDtype: null, specials: false, params: noParams(2) },
);

cases.forEach((c, k) => {
  test(`${c.method} chunked equals the plain path: ${c.dtype} → ${c.outDtype}, dtype ${c.computeDtype ?? 'none'}, n=${c.n}, ${c.models} models${c.specials ? ', NaN/Inf/−0' : ''}`, () => {
    check(c, 100 + k);
  });
});

test('the chunked path really runs, and its result differs where a weight differs', () => {
  // Guards the comparison above against both sides silently taking the plain path: a file input
  // cannot be decoded by the plain method, so a result from one is the chunked path's.
  const c: Case = { method: 'linear', n: 4097, models: 2, dtype: 'BF16', outDtype: 'BF16', computeDtype: null, specials: false, params: linearParams(2, true) };
  const stored = inputsOf(c, 7);
  const other = { ...c, params: { global: { normalize: true }, perModel: { m0: { weight: 1 }, m1: { weight: 0.5 } } } };
  const a = bytesOf(computeTensor(task(c, stored.map((b, k) => ({ model: `m${k}`, shape: [c.n], raw: b.slice(), dtype: c.dtype })))));
  const b = bytesOf(computeTensor(task(other, stored.map((x, k) => ({ model: `m${k}`, shape: [c.n], raw: x.slice(), dtype: c.dtype })))));
  assert.equal(a.length, 2 * c.n);
  assert.ok(!a.equals(b));
});

test('model_stock chunked: a zero denominator gives the base and the same single warning', () => {
  // Three task vectors 120° apart: mean cosine −1/2, so 1 + (N − 1)·cos is (about) zero.
  const n = 10_000;
  const dirs = [
    [1, 0],
    [-0.5, Math.sqrt(3) / 2],
    [-0.5, -Math.sqrt(3) / 2],
  ];
  const base = new Float32Array(n).fill(0.25);
  const models = dirs.map(([x, y]) => Float32Array.from({ length: n }, (_, i) => 0.25 + (i % 2 === 0 ? x! : y!)));
  const c: Case = { method: 'model_stock', n, models: 4, dtype: 'F32', outDtype: 'F32', computeDtype: null, specials: false, params: stockParams(4, false) };
  const all = [base, ...models];
  const plain = computeTensor(task(c, all.map((a, k) => ({ model: `m${k}`, shape: [n], data: a.slice(), dtype: 'F32' as const }))));
  const chunked = computeTensor(task(c, all.map((a, k) => ({ model: `m${k}`, shape: [n], raw: new Uint8Array(a.slice().buffer), dtype: 'F32' as const }))));
  assert.equal(plain.warnings.length, 1);
  assert.match(plain.warnings[0]!, /zero denominator/);
  assert.deepEqual(chunked.warnings, plain.warnings);
  assert.ok(bytesOf(plain).equals(bytesOf(chunked)));
  assert.equal(new Float32Array(chunked.bytes.slice().buffer)[5], 0.25);
});

test('fillBernoulliEachWasm draws the same marks as Rng.fillBernoulliEach and leaves the same state', { skip: !blockKernelsAvailable() && 'block kernels not built (npm run build:wasm)' }, () => {
  const rng = new Rng(9);
  const n = (1 << 20) + 4321;
  const p = Float32Array.from({ length: n }, (_, i) => [rng.next(), -0.5, 1.5, NaN, 0, 1][i % 6]!);
  const a = new Rng(11);
  const b = new Rng(11);
  const want = new Uint8Array(n);
  const got = new Uint8Array(n);
  a.fillBernoulliEach(want, p);
  assert.equal(fillBernoulliEachWasm(b, got, p), true);
  assert.ok(Buffer.from(want).equals(Buffer.from(got)));
  assert.equal(a.nextU32(), b.nextU32());
});

test('fillBernoulliWasm draws the same marks as Rng.fillBernoulli and leaves the same state', { skip: !blockKernelsAvailable() && 'block kernels not built (npm run build:wasm)' }, () => {
  for (const [seed, n, threshold] of [
    [1, 1, 0.5 * 2 ** 32],
    [2, (1 << 20) + 333, 0.3 * 2 ** 32],
    [3, 5000, -7],
    [4, 5000, 2 ** 33],
    [5, 5000, NaN],
    [6, 70_001, 2 ** 32],
  ] as const) {
    const a = new Rng(seed);
    const b = new Rng(seed);
    const want = new Uint8Array(n);
    const got = new Uint8Array(n);
    a.fillBernoulli(want, threshold);
    assert.equal(fillBernoulliWasm(b, got, threshold), true);
    assert.ok(Buffer.from(want).equals(Buffer.from(got)), `seed ${seed}`);
    assert.equal(a.nextU32(), b.nextU32(), 'the stream continues from the same state');
  }
});

test('addLoraDelta: the WebAssembly kernel gives the TypeScript bytes (zeros in B, NaN and Inf, odd widths)', () => {
  const rng = new Rng(31);
  for (const [r, inF, outF, specials] of [
    [8, 64, 48, false],
    [16, 2048, 300, true],
    [4, 33, 20, false],
    [2, 6000, 700, false],
  ] as const) {
    const a = rng.fillNormal(new Float32Array(r * inF), 0.05);
    const b = rng.fillNormal(new Float32Array(outF * r), 0.05);
    for (let k = 0; k < b.length; k += 7) b[k] = 0;
    const w = rng.fillNormal(new Float32Array(inF * outF), 0.02);
    if (specials) {
      a[5] = Infinity;
      w[inF * 3 + 1] = NaN;
      w[inF * 200] = -Infinity;
    }
    const module = { kind: 'linear' as const, rank: r, inFeatures: inF, outFeatures: outF, fanInFanOut: false };
    const got = addLoraDelta(w.slice(), module, a, b, 2);
    useBlockKernels(false);
    let want: Float32Array;
    try {
      want = addLoraDelta(w.slice(), module, a, b, 2);
    } finally {
      useBlockKernels(true);
    }
    assert.ok(bytesOf({ bytes: new Uint8Array(got.buffer) }).equals(bytesOf({ bytes: new Uint8Array(want.buffer) })), `r=${r} ${outF}×${inF}`);
    assert.notDeepEqual(Array.from(got.subarray(0, 8)), Array.from(w.subarray(0, 8)));
  }
});
