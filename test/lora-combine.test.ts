/**
 * Combining adapters: `cat` reproduces Σ wᵢsᵢBᵢAᵢ to float32 rounding; `svd` at full rank equals
 * it and reports the energy kept; ties/dare go through the merge registry on the dense updates;
 * PEFT's `linear` has the documented cross terms.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import { readPeftAdapter, type PeftAdapter } from '../src/io/peft.js';
import { combineAdapters, LINEAR_CROSS_TERM_WARNING } from '../src/lora/combine.js';
import { writePeftAdapter, type LoraFactors } from '../src/lora/peft-write.js';
import { mergeTensor, prepareParams } from '../src/merge/registry.js';
import { tensorRng } from '../src/merge/sparsify.js';
import { Rng } from '../src/tensor/rng.js';

let dir: string;
const Q = 'model.layers.0.self_attn.q_proj';
const D = 'model.layers.0.mlp.down_proj';
const E = 'model.layers.1.self_attn.o_proj';

function factors(path: string, rank: number, inF: number, outF: number, seed: number): LoraFactors {
  const rng = new Rng(seed);
  return { path, rank, inFeatures: inF, outFeatures: outF, a: rng.fillNormal(new Float32Array(rank * inF), 0.5), b: rng.fillNormal(new Float32Array(outF * rank), 0.5) };
}

/** Σ_k B[o,k]A[k,i] in float64, [out, in]. */
function ba(f: { a: Float32Array; b: Float32Array; rank: number; inFeatures: number; outFeatures: number }): Float64Array {
  const out = new Float64Array(f.outFeatures * f.inFeatures);
  for (let o = 0; o < f.outFeatures; o++)
    for (let k = 0; k < f.rank; k++) {
      const bk = f.b[o * f.rank + k]!;
      for (let i = 0; i < f.inFeatures; i++) out[o * f.inFeatures + i] += bk * f.a[k * f.inFeatures + i]!;
    }
  return out;
}

function relErr(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let d = 0;
  let n = 0;
  for (let i = 0; i < want.length; i++) {
    d += (got[i]! - want[i]!) ** 2;
    n += want[i]! ** 2;
  }
  return Math.sqrt(d / n);
}

/** s·B·A of every module of an adapter folder, by path. */
async function deltas(path: string): Promise<{ ad: PeftAdapter; byPath: Map<string, Float64Array> }> {
  const ad = await readPeftAdapter(path);
  const byPath = new Map<string, Float64Array>();
  for (const m of ad.modules) {
    const d = ba({ a: await ad.source.readF32(m.aName), b: await ad.source.readF32(m.bName), rank: m.rank, inFeatures: m.inFeatures, outFeatures: m.outFeatures });
    for (let i = 0; i < d.length; i++) d[i]! *= m.scaling;
    byPath.set(m.path, d);
  }
  return { ad, byPath };
}

// Adapter 1: r = 4, α = 8 (s = 2); adapter 2: r = 2, α = 6 (s = 3), with a rank_pattern module; adapter 3: r = 4, α = 4.
const one = () => [factors(Q, 4, 16, 16, 1), factors(D, 4, 24, 16, 2)];
const two = () => [factors(Q, 2, 16, 16, 3), factors(D, 2, 24, 16, 4), factors(E, 3, 16, 16, 5)];
const three = () => [factors(Q, 4, 16, 16, 6), factors(D, 4, 24, 16, 7)];
const S1 = 2;
const S2 = 3;
const W = [0.7, -0.45];

/** Σ wᵢsᵢBᵢAᵢ over adapters one and two. */
function expectedSum(path: string): Float64Array {
  const parts = [
    { f: one().find((m) => m.path === path), c: W[0]! * S1 },
    { f: two().find((m) => m.path === path), c: W[1]! * (path === E ? 6 / 3 : S2) },
  ];
  let out: Float64Array | undefined;
  for (const p of parts) {
    if (!p.f) continue;
    const d = ba(p.f);
    out ??= new Float64Array(d.length);
    for (let i = 0; i < d.length; i++) out[i] += p.c * d[i]!;
  }
  return out!;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-lora-combine-'));
  await writePeftAdapter(join(dir, 'one'), one(), [], { r: 4, alpha: 8 });
  await writePeftAdapter(join(dir, 'two'), two(), [], { r: 2, alpha: 6 });
  await writePeftAdapter(join(dir, 'three'), three(), [], { r: 4, alpha: 4 });
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

const inputs = () => [
  { dir: join(dir, 'one'), weight: W[0] },
  { dir: join(dir, 'two'), weight: W[1] },
];

test('cat reproduces Σ wᵢ·sᵢ·BᵢAᵢ to float32 rounding, at rank Σrᵢ with scaling 1', async () => {
  const r = await combineAdapters(inputs(), join(dir, 'cat'), { method: 'cat' });
  assert.deepEqual(
    r.modules.map((m) => [m.path, m.rank, m.inputs]),
    [
      [D, 6, [0, 1]],
      [Q, 6, [0, 1]],
      [E, 3, [1]],
    ],
  );
  const { ad, byPath } = await deltas(join(dir, 'cat'));
  try {
    for (const m of ad.modules) assert.equal(m.scaling, 1, m.path);
    assert.equal(ad.config.r, 6);
    assert.equal(ad.config.lora_alpha, 6);
    for (const path of [Q, D, E]) {
      const err = relErr(byPath.get(path)!, expectedSum(path));
      assert.ok(err < 2e-7, `${path}: ${err}`);
    }
  } finally {
    await ad.close();
  }
  // Power-of-two coefficients are exact.
  await combineAdapters([{ dir: join(dir, 'one'), weight: 0.25 }, { dir: join(dir, 'three'), weight: 2 }], join(dir, 'cat-exact'), { method: 'cat' });
  const ex = await deltas(join(dir, 'cat-exact'));
  try {
    const want = ba(one()[0]!).map((v, i) => 0.25 * S1 * v + 2 * ba(three()[0]!)[i]!);
    // The factors are exact; only the float64 summation order of the check differs.
    assert.ok(relErr(ex.byPath.get(Q)!, want) < 1e-15);
  } finally {
    await ex.ad.close();
  }
});

test('svd at full rank equals cat; truncation reports the energy kept', async () => {
  const full = await combineAdapters(inputs(), join(dir, 'svd-full'), { method: 'svd', rank: 6 });
  assert.equal(full.mergeMethod, 'task_arithmetic');
  const cat = await deltas(join(dir, 'cat'));
  const svd = await deltas(join(dir, 'svd-full'));
  try {
    for (const m of svd.ad.modules) assert.equal(m.scaling, 1, m.path);
    for (const path of [Q, D, E]) {
      const err = relErr(svd.byPath.get(path)!, cat.byPath.get(path)!);
      assert.ok(err < 1e-6, `${path}: ${err}`);
    }
    for (const m of full.modules) assert.ok(Math.abs(m.energy! - 1) < 1e-9, `${m.path}: ${m.energy}`);
  } finally {
    await cat.ad.close();
    await svd.ad.close();
  }
  // Rank 2: the best rank-2 approximation; energy = Σ top-2 σ² / ‖ΔW‖², below 1.
  const low = await combineAdapters(inputs(), join(dir, 'svd-2'), { method: 'svd', rank: 2 });
  const lowD = await deltas(join(dir, 'svd-2'));
  try {
    for (const m of low.modules) {
      assert.equal(m.rank, 2);
      assert.ok(m.energy! > 0.3 && m.energy! < 1, `${m.path}: ${m.energy}`);
      const want = expectedSum(m.path);
      // ‖ΔW − ΔW₂‖² / ‖ΔW‖² = 1 − energy (Eckart–Young)
      const err = relErr(lowD.byPath.get(m.path)!, want);
      assert.ok(Math.abs(err * err - (1 - m.energy!)) < 1e-5, `${m.path}: ${err * err} vs ${1 - m.energy!}`);
    }
  } finally {
    await lowD.ad.close();
  }
});

test('svd with ties and dare_ties merges the dense updates through the merge registry', async () => {
  for (const method of ['ties', 'dare_ties'] as const) {
    const r = await combineAdapters(inputs(), join(dir, `svd-${method}`), { method: 'svd', rank: 16, mergeMethod: method, mergeParams: { density: 0.5 }, seed: 5 });
    const got = await deltas(join(dir, `svd-${method}`));
    try {
      const path = Q;
      const d1 = Float32Array.from(ba(one()[0]!), (v) => S1 * v);
      const d2 = Float32Array.from(ba(two()[0]!), (v) => S2 * v);
      const models = ['<zero base>', 'adapter1', 'adapter2'];
      const params = prepareParams(method, { tensorName: `${path}.delta`, models, base: models[0]! }, { global: { density: 0.5 }, perModel: { adapter1: { weight: W[0] }, adapter2: { weight: W[1] } } });
      const shape = [16, 16];
      const want = mergeTensor(method, {
        tensorName: `${path}.delta`,
        isEmbed: false,
        inputs: [
          { model: models[0]!, data: new Float32Array(256), shape },
          { model: 'adapter1', data: d1, shape },
          { model: 'adapter2', data: d2, shape },
        ],
        base: models[0]!,
        params,
        rng: tensorRng(5, `${path}.delta`),
      })!.data;
      const err = relErr(got.byPath.get(path)!, want);
      assert.ok(err < 1e-6, `${method}: ${err}`);
      assert.ok(relErr(want, expectedSum(path)) > 0.05, 'sparsification changed the sum');
      assert.ok(Math.abs(r.modules.find((m) => m.path === path)!.energy! - 1) < 1e-9);
    } finally {
      await got.ad.close();
    }
  }
});

test("linear is PEFT's A/B-separate combination, with its cross terms and a warning", async () => {
  const warnings: string[] = [];
  const w = [0.5, 0.8];
  const r = await combineAdapters(
    [
      { dir: join(dir, 'one'), weight: w[0] },
      { dir: join(dir, 'three'), weight: w[1] },
    ],
    join(dir, 'linear'),
    { method: 'linear', onWarning: (m) => warnings.push(m) },
  );
  assert.deepEqual(warnings, [LINEAR_CROSS_TERM_WARNING]);
  assert.deepEqual(r.warnings, [LINEAR_CROSS_TERM_WARNING]);
  const got = await deltas(join(dir, 'linear'));
  try {
    const f1 = one()[0]!;
    const f3 = three()[0]!;
    const c1 = w[0]! * S1;
    const c3 = w[1]! * 1;
    // (√c1·B1 + √c3·B3)(√c1·A1 + √c3·A3) = c1·B1A1 + c3·B3A3 + √(c1c3)(B1A3 + B3A1)
    const cross13 = ba({ ...f1, a: f3.a });
    const cross31 = ba({ ...f3, a: f1.a });
    const d1 = ba(f1);
    const d3 = ba(f3);
    const want = d1.map((v, i) => c1 * v + c3 * d3[i]! + Math.sqrt(c1 * c3) * (cross13[i]! + cross31[i]!));
    const exact = d1.map((v, i) => c1 * v + c3 * d3[i]!);
    assert.ok(relErr(got.byPath.get(Q)!, want) < 1e-6);
    assert.ok(relErr(got.byPath.get(Q)!, exact) > 0.1, 'the cross terms are present');
  } finally {
    await got.ad.close();
  }
  await assert.rejects(combineAdapters(inputs(), join(dir, 'linear-bad'), { method: 'linear' }), (e: AmalgamError) => e.code === 'E_SHAPE' && /equal ranks/.test(e.message));
});

test('inconsistent adapters are refused', async () => {
  await writePeftAdapter(join(dir, 'other'), [factors(Q, 2, 24, 16, 9)], [], { r: 2, alpha: 2 });
  await assert.rejects(
    combineAdapters([{ dir: join(dir, 'one') }, { dir: join(dir, 'other') }], join(dir, 'bad'), { method: 'cat' }),
    (e: AmalgamError) => e.code === 'E_SHAPE' && e.key === Q,
  );
  await assert.rejects(combineAdapters([], join(dir, 'bad'), { method: 'cat' }), /at least one adapter/);
  await assert.rejects(combineAdapters(inputs(), join(dir, 'bad'), { method: 'cat', rank: 3 }), /apply to method 'svd' only/);
});
