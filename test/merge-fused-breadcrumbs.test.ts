/**
 * breadcrumbs and breadcrumbs_ties through the fused kernel (keep rule of the top k, exclusion
 * rule of the top n_top) equal the unfused pipeline taskVector → sparsify('magnitude_outliers')
 * → combineTaskVectors byte for byte: in WebAssembly and in TypeScript, for F32 / BF16 / F16
 * inputs (rounded to the merge dtype or not) and outputs, tie-heavy data, NaN, ±Inf and −0,
 * every density and gamma class (n_top = 0, density 0, ranges reaching either end), tensors
 * above 2^20 values (sampled bracket) and below (histograms), and the bracket-miss and list
 * overflow fallbacks. Also the warnings and errors, and rescale staying on the unfused path.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { MemoryValues } from '../src/merge/fused-common.js';
import { selectionCounts } from '../src/merge/fused.js';
import { useWasmKernels, wasmKernelsAvailable } from '../src/merge/fused-wasm.js';
import { combineTaskVectors, fusedApplies, fusedMerge, gtaVariantOf, type StoredInput } from '../src/merge/gta.js';
import { getMergeMethod, mergeTensor, prepareParams } from '../src/merge/registry.js';
import { sparsify } from '../src/merge/sparsify.js';
import { subtract } from '../src/merge/tensor-ops.js';
import type { ResolvedParams } from '../src/merge/types.js';
import { bf16ToF32, encodeFromF32, f16ToF32, f32ToBf16, f32ToF16 } from '../src/tensor/dtype.js';
import { Rng } from '../src/tensor/rng.js';

const T = 'model.layers.0.mlp.down_proj.weight';
type Method = 'breadcrumbs' | 'breadcrumbs_ties';
type Dtype = 'F32' | 'BF16' | 'F16';
type Kind = 'normal' | 'ints' | 'sparse' | 'steps' | 'specials';

const WASM = wasmKernelsAvailable() ? [true, false] : [false];

interface Case {
  method: Method;
  n: number;
  kind: Kind;
  densities: number[];
  gammas: number[];
  weights: number[];
  normalize: boolean;
  lambda: number;
  stored: Dtype;
  round?: 'BF16' | 'F16';
  out: Dtype;
}

/** Base and fine-tunes as float32 values of the case's kind. */
function values(rng: Rng, n: number, models: number, kind: Kind): Float32Array[] {
  const base = rng.fillNormal(new Float32Array(n), 0.02);
  const out = [base];
  for (let k = 0; k < models; k++) {
    const x = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      const b = base[i]!;
      x[i] =
        kind === 'ints'
          ? b + (rng.int(7) - 3)
          : kind === 'sparse'
            ? rng.next() < 0.7
              ? b
              : b + rng.normal() * 0.01
            : kind === 'steps'
              ? b * (1 + (rng.int(9) - 4) / 128)
              : b + rng.normal() * 0.003;
    }
    if (kind === 'specials' && n > 0) {
      for (const v of [NaN, Infinity, -Infinity, -0, 0, 3e38, -3e38]) x[rng.int(n)] = v;
      if (k === 0) base[rng.int(n)] = rng.next() < 0.5 ? NaN : -Infinity;
    }
    out.push(x);
  }
  return out;
}

function stored(a: Float32Array, dtype: Dtype, round: 'BF16' | 'F16' | undefined): MemoryValues {
  const r = round ? { round } : {};
  if (dtype === 'F32') return { dtype, data: a, ...r };
  return { dtype, data: dtype === 'BF16' ? f32ToBf16(a) : f32ToF16(a), ...r };
}

/** The float32 values the merge computes on: decoded, then rounded to the merge dtype. */
function decoded(v: MemoryValues): Float32Array {
  let f = v.dtype === 'F32' ? v.data.slice() : v.dtype === 'BF16' ? bf16ToF32(v.data) : f16ToF32(v.data);
  if (v.round === 'BF16') f = bf16ToF32(f32ToBf16(f));
  else if (v.round === 'F16') f = f16ToF32(f32ToF16(f));
  return f;
}

function paramsOf(c: Case): ResolvedParams {
  const perModel: Record<string, Record<string, number>> = {};
  c.densities.forEach((d, k) => (perModel[`m${k}`] = { weight: c.weights[k]!, density: d, gamma: c.gammas[k]! }));
  return { global: { normalize: c.normalize, rescale: false, lambda: c.lambda, int8_mask: false }, perModel };
}

/** The unfused pipeline (TypeScript combine), encoded to the output dtype; and its warnings. */
function reference(c: Case, ins: MemoryValues[], params: ResolvedParams = paramsOf(c)): { bytes: Uint8Array; warnings: string[] } {
  const f = ins.map(decoded);
  const warnings: string[] = [];
  const deltas = f.slice(1).map((x, k) => {
    const p = params.perModel[`m${k}`]!;
    return sparsify(subtract(x, f[0]!), {
      method: 'magnitude_outliers',
      density: p['density'] as number,
      gamma: p['gamma'] as number,
      rescale: false,
      shape: [c.n],
      tensorName: T,
      model: `m${k}`,
      warn: (m) => warnings.push(m),
    });
  });
  const weights = f.slice(1).map((_, k) => params.perModel[`m${k}`]!['weight'] as number);
  useWasmKernels(false);
  try {
    const mixed = combineTaskVectors(f[0]!, deltas, weights, c.method === 'breadcrumbs_ties' ? 'sum' : null, params.global['normalize'] as boolean, params.global['lambda'] as number);
    return { bytes: encodeFromF32(c.out, mixed).slice(), warnings };
  } finally {
    useWasmKernels(true);
  }
}

function fused(c: Case, ins: MemoryValues[], wasmOn: boolean, params: ResolvedParams = paramsOf(c)): { bytes: Uint8Array; warnings: string[] } {
  const v = gtaVariantOf(getMergeMethod(c.method))!;
  const inputs: StoredInput[] = ins.map((values, k) => ({ model: k === 0 ? 'base' : `m${k - 1}`, shape: [c.n], values }));
  const out: MemoryValues = c.out === 'F32' ? { dtype: 'F32', data: new Float32Array(c.n) } : { dtype: c.out, data: new Uint16Array(c.n) };
  const warnings: string[] = [];
  useWasmKernels(wasmOn);
  try {
    assert.equal(fusedMerge(v, { tensorName: T, isEmbed: false, base: 'base', params, warn: (m) => warnings.push(m) }, inputs, out), true);
  } finally {
    useWasmKernels(true);
  }
  return { bytes: new Uint8Array(out.data.buffer, out.data.byteOffset, out.data.byteLength).slice(), warnings };
}

/** The index of the first differing output byte, or -1. */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  assert.equal(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

function check(c: Case, ins: MemoryValues[]): void {
  const want = reference(c, ins);
  for (const wasmOn of WASM) {
    const got = fused(c, ins, wasmOn);
    const at = firstDifference(got.bytes, want.bytes);
    assert.equal(at, -1, `${JSON.stringify(c)} wasm ${wasmOn}: output byte ${at} is ${got.bytes[at]}, the unfused pipeline gives ${want.bytes[at]}`);
    assert.deepEqual(got.warnings, want.warnings);
  }
}

function randomCase(rng: Rng, i: number, sizes: readonly number[], kinds: readonly Kind[]): { c: Case; ins: MemoryValues[] } {
  const pick = <T>(a: readonly T[]): T => a[rng.int(a.length)]!;
  const M = 1 + (i % 4);
  const n = pick(sizes);
  const kind = pick(kinds);
  const storedDtype = pick(['F32', 'BF16', 'BF16', 'F16'] as const);
  const round = rng.next() < 0.3 ? pick(['BF16', 'F16'] as const) : undefined;
  const c: Case = {
    method: i % 2 ? 'breadcrumbs_ties' : 'breadcrumbs',
    n,
    kind,
    densities: Array.from({ length: M }, () => pick([0, 1e-7, 0.003, 0.05, 0.3, 0.5, 0.5, 0.9, 0.999, 1, rng.next()])),
    gammas: Array.from({ length: M }, () => pick([0, 1e-9, 0.01, 0.01, 0.05, 0.2, 0.5, 0.6, 1, rng.next() * 0.2])),
    weights: Array.from({ length: M }, () => pick([1, 0.8, 0.6, -0.5, 0, 2.5, rng.normal()])),
    normalize: rng.next() < 0.6,
    lambda: pick([1, 1, 0.5, 1.7]),
    stored: storedDtype,
    ...(round ? { round } : {}),
    out: pick(['F32', 'BF16', 'BF16', 'F16'] as const),
  };
  const ins = values(rng, n, M, kind).map((a) => stored(a, c.stored, c.round));
  return { c, ins };
}

test('breadcrumbs and breadcrumbs_ties fused equal the unfused pipeline byte for byte (small and mid-sized tensors)', () => {
  const rng = new Rng(2024);
  const before = selectionCounts();
  for (let i = 0; i < 90; i++) {
    const { c, ins } = randomCase(rng, i, [1, 2, 3, 5, 8, 33, 100, 1000, 4097, 20000, 70001], ['normal', 'ints', 'sparse', 'steps', 'specials']);
    check(c, ins);
  }
  const after = selectionCounts();
  assert.ok(after.histogram > before.histogram, 'the histogram selection ran');
});

test('breadcrumbs fused equals the unfused pipeline on tensors above 2^20 values (sampled bracket)', () => {
  const rng = new Rng(77);
  const before = selectionCounts();
  const sizes = [(1 << 20) + 3, 3 * (1 << 20) + 17];
  const kinds: Kind[] = ['normal', 'steps', 'ints', 'specials', 'normal', 'sparse'];
  for (let i = 0; i < kinds.length; i++) {
    const M = 1 + (i % 3);
    const c: Case = {
      method: i % 2 ? 'breadcrumbs_ties' : 'breadcrumbs',
      n: sizes[i % 2]!,
      kind: kinds[i]!,
      densities: [0.5, 0.3, 0.9].slice(0, M),
      gammas: [0.01, 0.1, i === 4 ? 0 : 0.02].slice(0, M),
      weights: [1, -0.8, 0.6].slice(0, M),
      normalize: i % 3 !== 1,
      lambda: i === 3 ? 0.5 : 1,
      stored: i % 3 === 2 ? 'F32' : 'BF16',
      out: i % 2 ? 'BF16' : 'F32',
    };
    const ins = values(rng, c.n, M, c.kind).map((a) => stored(a, c.stored, undefined));
    check(c, ins);
  }
  const after = selectionCounts();
  assert.ok(after.bracket > before.bracket, 'the sampled bracket found rules');
});

test('a sample that misses the threshold falls back to the histograms; overflowing bucket lists to a scan for the cut', () => {
  // Magnitudes inside the sampled runs are tiny, elsewhere large: the bracket from the sample
  // misses every rank (n > 2^20).
  const n = (1 << 20) + 4099;
  const SAMPLE_RUNS = 128;
  const SAMPLE_RUN = 512;
  const sampled = new Uint8Array(n);
  const step = (n - SAMPLE_RUN) / (SAMPLE_RUNS - 1);
  for (let r = 0; r < SAMPLE_RUNS; r++) sampled.fill(1, Math.floor(r * step), Math.floor(r * step) + SAMPLE_RUN);
  const rng = new Rng(5);
  const base = rng.fillNormal(new Float32Array(n), 0.02);
  const xs = [0, 1].map(() => base.map((b, i) => b + (sampled[i] ? 1e-4 : 1) * rng.normal()));
  let before = selectionCounts();
  for (const method of ['breadcrumbs', 'breadcrumbs_ties'] as const) {
    const c: Case = { method, n, kind: 'normal', densities: [0.5, 0.2], gammas: [0.05, 0.01], weights: [1, 0.7], normalize: true, lambda: 1, stored: 'F32', out: 'BF16' };
    check(c, [base, ...xs].map((a) => stored(a, 'F32', undefined)));
  }
  let after = selectionCounts();
  assert.ok(after.histogram > before.histogram, 'the histogram fallback ran');

  // Few distinct magnitude buckets (integer steps): the threshold's bucket holds more keys than
  // a list may (n < 2^20, so the histograms run directly).
  before = selectionCounts();
  const m = 900_001;
  const r2 = new Rng(6);
  for (const method of ['breadcrumbs', 'breadcrumbs_ties'] as const) {
    const c: Case = { method, n: m, kind: 'ints', densities: [0.5, 0.4], gammas: [0.1, 0.02], weights: [1, -0.6], normalize: false, lambda: 1, stored: 'BF16', out: 'F32' };
    check(c, values(r2, m, 2, 'ints').map((a) => stored(a, 'BF16', undefined)));
  }
  after = selectionCounts();
  assert.ok(after.rescan > before.rescan, 'the cut was found by a scan');
});

test('breadcrumbs by hand: ranks [n_top, k) of the magnitudes, ties by lower index, n_top = 0 keeping the top k', () => {
  const delta = [5, -1, 4, 0.5, -3, 2, 0.1, -6, 4, -4];
  const n = delta.length;
  const ins: MemoryValues[] = [{ dtype: 'F32', data: new Float32Array(n) }, { dtype: 'F32', data: Float32Array.from(delta) }];
  const run = (density: number, gamma: number) => {
    const c: Case = { method: 'breadcrumbs', n, kind: 'normal', densities: [density], gammas: [gamma], weights: [1], normalize: false, lambda: 1, stored: 'F32', out: 'F32' };
    const outs = WASM.map((w) => Array.from(new Float32Array(fused(c, ins, w).bytes.buffer)));
    for (const o of outs) assert.deepEqual(o, outs[0]);
    return outs[0]!;
  };
  // Descending: -6 (7), 5 (0), 4 (2), 4 (8), -4 (9), -3 (4), 2 (5), -1 (1), 0.5 (3), 0.1 (6).
  // density 0.5, gamma 0.2: n_top = 2, k = 7: ranks [2, 7).
  assert.deepEqual(run(0.5, 0.2), [0, 0, 4, 0, -3, 2, 0, 0, 4, -4]);
  // gamma 0.3: n_top = 3 splits the tied 4s at the top (index 2 dropped, 8 and 9 kept): ranks [3, 8).
  assert.deepEqual(run(0.5, 0.3), [0, -1, 0, 0, -3, 2, 0, 0, 4, -4]);
  // density 0.3, gamma 0.1: k = 3 splits them at the bottom (2 and 8 kept, 9 not): ranks [1, 4).
  assert.deepEqual(run(0.3, 0.1), [5, 0, 4, 0, 0, 0, 0, 0, 4, 0]);
  // n_top = 0: the top k.
  assert.deepEqual(run(0.3, 0.05), [5, 0, 4, 0, 0, 0, 0, -6, 0, 0]);
  // gamma past 1 − density: n_top = n − k, so the smallest k are kept.
  assert.deepEqual(run(0.2, 0.9), [0, 0, 0, 0.5, 0, 0, Math.fround(0.1), 0, 0, 0]);
});

test('a breadcrumbs model keeping nothing still turns its NaN and ±Inf task vector values into NaN (as the mask product does)', () => {
  const n = 5000;
  const rng = new Rng(9);
  const [base, x0, x1] = values(rng, n, 2, 'normal');
  x1![10] = Infinity;
  x1![20] = NaN;
  for (const out of ['F32', 'BF16'] as const) {
    const c: Case = { method: 'breadcrumbs_ties', n, kind: 'normal', densities: [0.5, 0.0001], gammas: [0.01, 0.01], weights: [1, 1], normalize: true, lambda: 1, stored: 'F32', out };
    const ins = [base!, x0!, x1!].map((a) => stored(a, 'F32', undefined));
    check(c, ins);
    const got = fused(c, ins, WASM[0]!);
    const f = out === 'F32' ? new Float32Array(got.bytes.buffer) : bf16ToF32(new Uint16Array(got.bytes.buffer));
    assert.ok(Number.isNaN(f[10]!) && Number.isNaN(f[20]!), `${f[10]} ${f[20]}`);
    assert.ok(!Number.isNaN(f[11]!));
  }
});

test('densities and gammas past the validated ranges still give the unfused masks (NaN gamma keeps all)', () => {
  const rng = new Rng(12);
  for (const n of [1000, 20000]) {
    for (const gamma of [NaN, -0.5, Infinity, -Infinity, 2, 0.999999]) {
      for (const density of [0, 1e-9, 0.4, 0.999999, 1]) {
        const c: Case = { method: 'breadcrumbs', n, kind: 'normal', densities: [density, 0.5], gammas: [gamma, 0.1], weights: [1, 0.5], normalize: false, lambda: 1, stored: 'BF16', out: 'F32' };
        check(c, values(rng, n, 2, 'normal').map((a) => stored(a, 'BF16', undefined)));
      }
    }
  }
});

test('breadcrumbs through the method: fused for rescale false, the unfused pipeline (L1 rescale) for rescale true', () => {
  const n = 30000;
  const rng = new Rng(31);
  const f = values(rng, n, 3, 'specials');
  const ins = f.map((data, k) => ({ model: k === 0 ? 'base' : `m${k - 1}`, data, shape: [n] }));
  const models = ins.map((t) => t.model);
  const perModel = { m0: { weight: 1, density: 0.5, gamma: 0.01 }, m1: { weight: 0.8, density: 0.3 }, m2: { weight: -0.4, density: 0, gamma: 0.2 } };
  for (const method of ['breadcrumbs', 'breadcrumbs_ties'] as const) {
    const v = gtaVariantOf(getMergeMethod(method))!;
    assert.equal(fusedApplies(v, false), true);
    assert.equal(fusedApplies(v, true), false);
    for (const rescale of [false, true]) {
      const params = prepareParams(method, { tensorName: T, models, base: 'base' }, { global: { rescale, normalize: true }, perModel });
      const got = mergeTensor(method, { tensorName: T, isEmbed: false, inputs: ins, base: 'base', params })!.data;
      const deltas = f.slice(1).map((x, k) => {
        const p = params.perModel[`m${k}`]!;
        return sparsify(subtract(x, f[0]!), { method: 'magnitude_outliers', density: p['density'] as number, gamma: p['gamma'] as number, rescale, shape: [n], tensorName: T, model: `m${k}` });
      });
      const want = combineTaskVectors(f[0]!, deltas, [1, 0.8, -0.4], method === 'breadcrumbs_ties' ? 'sum' : null, true, 1);
      const at = firstDifference(new Uint8Array(got.buffer), new Uint8Array(want.buffer));
      assert.equal(at, -1, `${method} rescale ${rescale}: byte ${at}`);
      const asStored: StoredInput[] = ins.map((t) => ({ model: t.model, shape: t.shape, values: { dtype: 'F32', data: t.data } }));
      const out: MemoryValues = { dtype: 'F32', data: new Float32Array(n) };
      assert.equal(fusedMerge(v, { tensorName: T, isEmbed: false, base: 'base', params }, asStored, out), !rescale);
    }
  }
});

test('missing or invalid parameters give the unfused pipeline\'s error, in its order', () => {
  const n = 100;
  const rng = new Rng(41);
  const f = values(rng, n, 2, 'normal');
  const ins = f.map((data, k) => ({ model: k === 0 ? 'base' : `m${k - 1}`, data, shape: [n] }));
  const broken: Record<string, Record<string, number>>[] = [
    { m0: { weight: 1, density: 0.5 }, m1: { weight: 1, density: 0.5, gamma: 0.1 } },
    { m0: { weight: 1, density: 1.5 }, m1: { weight: 1, density: 0.5 } },
    { m0: { density: 0.5, gamma: 0.1 }, m1: { weight: 1, density: 2, gamma: 0.1 } },
    { m0: { weight: 1, gamma: 0.1 }, m1: { weight: 1, density: 0.5, gamma: 0.1 } },
    { m0: { weight: 1, density: 1, gamma: 0.1 }, m1: { weight: 1, density: 0.5 } },
    { m0: { weight: 1, density: -1 }, m1: { density: 0.5, gamma: 0.1 } },
  ];
  for (const method of ['breadcrumbs', 'breadcrumbs_ties'] as const) {
    for (const perModel of broken) {
      const errorOf = (rescale: boolean): string => {
        const params: ResolvedParams = { global: { normalize: true, rescale, lambda: 1, int8_mask: false }, perModel };
        try {
          mergeTensor(method, { tensorName: T, isEmbed: false, inputs: ins, base: 'base', params });
        } catch (e) {
          return (e as Error).message;
        }
        return 'no error';
      };
      const unfused = errorOf(true);
      assert.notEqual(unfused, 'no error');
      assert.equal(errorOf(false), unfused, `${method} ${JSON.stringify(perModel)}`);
    }
  }
});
