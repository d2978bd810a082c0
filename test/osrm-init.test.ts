import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ReferenceBackend } from '../src/backend/reference.js';
import { makeLlamaConfig } from '../src/nn/config.js';
import { LlamaModel } from '../src/nn/model.js';
import { AmalgamError } from '../src/errors.js';
import { Rng } from '../src/tensor/rng.js';
import { eigh } from '../src/tensor/linalg.js';
import {
  collectFeatureStats,
  covarianceModeBasis,
  featureGroups,
  featureMean,
  featureSecondMoment,
  meanModeBasis,
  orthonormalControlInit,
  orthonormalityError,
  osrmInit,
  osrmInitParallel,
  othersSecondMoment,
  randomOrthonormalBasis,
  rayleighQuotients,
  statsFloats,
  type GroupStats,
  type TaskFeatureStats,
} from '../src/osrm/index.js';

/** Eigenvalues of a symmetric matrix by cyclic Jacobi rotations (independent of src/tensor/linalg). */
function jacobiEigenvalues(c: Float64Array, d: number): number[] {
  const a = Float64Array.from(c);
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    for (let p = 0; p < d; p++) for (let q = p + 1; q < d; q++) off += a[p * d + q]! ** 2;
    if (off < 1e-30) break;
    for (let p = 0; p < d; p++) {
      for (let q = p + 1; q < d; q++) {
        const apq = a[p * d + q]!;
        if (Math.abs(apq) < 1e-300) continue;
        const theta = (a[q * d + q]! - a[p * d + p]!) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const cs = 1 / Math.sqrt(t * t + 1);
        const sn = t * cs;
        for (let k = 0; k < d; k++) {
          const akp = a[k * d + p]!;
          const akq = a[k * d + q]!;
          a[k * d + p] = cs * akp - sn * akq;
          a[k * d + q] = sn * akp + cs * akq;
        }
        for (let k = 0; k < d; k++) {
          const apk = a[p * d + k]!;
          const aqk = a[q * d + k]!;
          a[p * d + k] = cs * apk - sn * aqk;
          a[q * d + k] = sn * apk + cs * aqk;
        }
      }
    }
  }
  return Array.from({ length: d }, (_, i) => a[i * d + i]!).sort((x, y) => x - y);
}

/** Statistics of synthetic samples, as collectFeatureStats would accumulate them. */
function statsOf(task: string, samples: Float64Array[], d: number): TaskFeatureStats {
  const g: GroupStats = { group: { name: 'g', layer: 0, modules: ['model.layers.0.self_attn.q_proj'], dim: d }, count: 0, sum: new Float64Array(d), outer: new Float64Array(d * d) };
  for (const h of samples) {
    g.count++;
    for (let i = 0; i < d; i++) {
      g.sum[i] += h[i]!;
      for (let j = 0; j < d; j++) g.outer![i * d + j] += h[i]! * h[j]!;
    }
  }
  return { task, samples: samples.length, rows: samples.length, pooling: 'real-tokens', groups: [g] };
}

/**
 * d = 64, 7 tasks: a strong direction shared by all, a mean direction per task, and noise whose
 * scale varies by coordinate (the same for every task).
 */
function syntheticTasks(seed: number, d = 64, tasks = 7, n = 150): Float64Array[][] {
  const rng = new Rng(seed);
  const unit = () => {
    const v = Float64Array.from({ length: d }, () => rng.normal());
    const s = Math.hypot(...v);
    return v.map((x) => x / s);
  };
  const common = unit();
  const noiseScale = Float64Array.from({ length: d }, (_, i) => 0.1 + (1.9 * i) / (d - 1));
  return Array.from({ length: tasks }, () => {
    const own = unit();
    return Array.from({ length: n }, () => Float64Array.from({ length: d }, (_, i) => 30 * common[i]! + 3 * own[i]! + noiseScale[i]! * rng.normal()));
  });
}

test('mean mode: orthonormal rows in the null space of the other tasks\' means; same seed, same A', () => {
  const d = 64;
  const data = syntheticTasks(1);
  const stats = data.map((s, i) => statsOf(`t${i}`, s, d));
  const inits = osrmInit(stats, { mode: 'mean', rank: 8, seed: 3 });
  for (const [t, init] of inits.entries()) {
    const A = init.groups[0]!.A;
    assert.ok(orthonormalityError(A, 8, d) <= 1e-12);
    const X = stats.filter((_, j) => j !== t).map((s) => featureMean(s.groups[0]!));
    let res = 0;
    let xn = 0;
    for (const x of X) {
      xn += x.reduce((s, v) => s + v * v, 0);
      for (let i = 0; i < 8; i++) res += x.reduce((s, v, k) => s + v * A[i * d + k]!, 0) ** 2;
    }
    assert.ok(Math.sqrt(res) <= 1e-6 * Math.sqrt(xn), `‖A·Xᵀ‖ = ${Math.sqrt(res)}, ‖X‖ = ${Math.sqrt(xn)}`);
    // As written (float32).
    assert.ok(orthonormalityError(Float32Array.from(A), 8, d) <= 1e-6);
    assert.equal(init.groups[0]!.seededDimension, d - 6);
  }
  const again = osrmInit(stats, { mode: 'mean', rank: 8, seed: 3 });
  assert.deepEqual(again[2]!.groups[0]!.A, inits[2]!.groups[0]!.A);
  const other = osrmInit(stats, { mode: 'mean', rank: 8, seed: 4 });
  assert.notDeepEqual(other[2]!.groups[0]!.A, inits[2]!.groups[0]!.A);
});

test('covariance mode: Rayleigh quotients are the r smallest eigenvalues of Σ_{s≠t} E_s[hhᵀ]', () => {
  const d = 64;
  const stats = syntheticTasks(2).map((s, i) => statsOf(`t${i}`, s, d));
  const inits = osrmInit(stats, { mode: 'covariance', rank: 8, seed: 0 });
  for (const [t, init] of inits.entries()) {
    const g = init.groups[0]!;
    const C = othersSecondMoment(stats, t, 0);
    const eig = jacobiEigenvalues(C, d);
    for (const A of [g.A, Float32Array.from(g.A)]) {
      assert.ok(orthonormalityError(A, 8, d) <= 1e-6);
      const q = rayleighQuotients(A, C, 8, d);
      for (let i = 0; i < 8; i++) assert.ok(Math.abs(q[i]! - eig[i]!) <= 1e-6 * Math.abs(eig[i]!), `row ${i}: ${q[i]} vs ${eig[i]}`);
    }
    assert.equal(g.seededDimension, 0);
  }
  assert.deepEqual(osrmInit(stats, { mode: 'covariance', rank: 8, seed: 0 })[4]!.groups[0]!.A, inits[4]!.groups[0]!.A);
});

test('covariance mode: a degenerate smallest eigenspace gets a seeded orthonormal choice inside it', () => {
  const d = 12;
  const rng = new Rng(5);
  // Rank 3: the smallest eigenvalue 0 has multiplicity 9 > r.
  const H = Array.from({ length: 3 }, () => Float64Array.from({ length: d }, () => rng.normal()));
  const C = new Float64Array(d * d);
  for (const h of H) for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) C[i * d + j] += h[i]! * h[j]!;
  const a = covarianceModeBasis(C, d, 4, new Rng(1));
  const b = covarianceModeBasis(C, d, 4, new Rng(1));
  const c = covarianceModeBasis(C, d, 4, new Rng(2));
  assert.equal(a.seededDimension, 9);
  assert.deepEqual(a.A, b.A);
  assert.notDeepEqual(a.A, c.A);
  for (const r of [a, c]) {
    assert.ok(orthonormalityError(r.A, 4, d) <= 1e-12);
    const q = rayleighQuotients(r.A, C, 4, d);
    const scale = Math.max(...jacobiEigenvalues(C, d));
    for (const v of q) assert.ok(Math.abs(v) <= 1e-12 * scale);
  }
});

test('covariance mode on wide features (the partial eigensolver): the same bars, and degenerate spaces', () => {
  const d = 300;
  const rng = new Rng(8);
  const second = (rows: number) => {
    const C = new Float64Array(d * d);
    const h = new Float64Array(d);
    for (let r = 0; r < rows; r++) {
      for (let i = 0; i < d; i++) h[i] = rng.normal() * (1 + (i % 7));
      for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) C[i * d + j] += h[i]! * h[j]!;
    }
    return C;
  };
  const C = second(400);
  const r = covarianceModeBasis(C, d, 8, new Rng(1));
  // The full decomposition (a different algorithm from the partial one used at this width).
  const eig = eigh(C, d).values;
  assert.equal(r.seededDimension, 0);
  assert.ok(orthonormalityError(r.A, 8, d) <= 1e-12);
  const q = rayleighQuotients(r.A, C, 8, d);
  for (let i = 0; i < 8; i++) assert.ok(Math.abs(q[i]! - eig[i]!) <= 1e-6 * Math.abs(eig[i]!), `row ${i}: ${q[i]} vs ${eig[i]}`);
  assert.ok(Math.abs(r.maxEigenvalue - eig[d - 1]!) <= 1e-9 * eig[d - 1]!);
  assert.deepEqual(covarianceModeBasis(C, d, 8, new Rng(1)).A, r.A);
  // Fewer rows than d: the eigenvalue 0 has multiplicity d − rows > r, and the rows of A are a
  // seeded choice inside that space. 280 rows (a 20-dimensional space) stay on the partial
  // solver; 100 rows (200 dimensions) take the full decomposition.
  for (const rows of [280, 100]) {
    const D = second(rows);
    const a = covarianceModeBasis(D, d, 8, new Rng(1));
    const b = covarianceModeBasis(D, d, 8, new Rng(2));
    assert.equal(a.seededDimension, d - rows);
    assert.deepEqual(covarianceModeBasis(D, d, 8, new Rng(1)).A, a.A);
    assert.notDeepEqual(a.A, b.A);
    const scale = eigh(D, d).values[d - 1]!;
    for (const x of [a, b]) {
      assert.ok(orthonormalityError(x.A, 8, d) <= 1e-12);
      for (const v of rayleighQuotients(x.A, D, 8, d)) assert.ok(Math.abs(v) <= 1e-12 * scale, `${rows} rows: quotient ${v}`);
    }
  }
});

test('osrmInitParallel: worker threads give osrmInit\'s result bit for bit', async () => {
  const d = 300;
  const data = syntheticTasks(11, d, 3, 320);
  const stats = data.map((s, i) => statsOf(`t${i}`, s, d));
  const opts = { mode: 'covariance' as const, rank: 8, seed: 3 };
  const sync = osrmInit(stats, opts);
  assert.deepEqual(await osrmInitParallel(stats, opts, 2), sync);
  assert.deepEqual(await osrmInitParallel(stats, opts, 1), sync);
  // Narrow groups and mean mode run in place.
  const narrow = syntheticTasks(12, 64, 3, 100).map((s, i) => statsOf(`t${i}`, s, 64));
  assert.deepEqual(await osrmInitParallel(narrow, opts, 2), osrmInit(narrow, opts));
  assert.deepEqual(await osrmInitParallel(stats, { ...opts, mode: 'mean' }, 2), osrmInit(stats, { ...opts, mode: 'mean' }));
  // An error inside a worker names the group.
  await assert.rejects(osrmInitParallel(stats, { ...opts, rank: d + 1 }, 2), (e: unknown) => e instanceof AmalgamError && e.key === 'g' && /exceeds the feature width/.test(e.message));
});

test('synthetic sanity check: interference random ≫ mean ≳ covariance', () => {
  const d = 64;
  const data = syntheticTasks(7);
  const stats = data.map((s, i) => statsOf(`t${i}`, s, d));
  const mean = osrmInit(stats, { mode: 'mean', rank: 8, seed: 0 });
  const cov = osrmInit(stats, { mode: 'covariance', rank: 8, seed: 0 });
  const random = data.map((_, t) => randomOrthonormalBasis(d, 8, new Rng(100 + t)));
  const interference = (A: (t: number) => Float64Array) => {
    let sum = 0;
    let n = 0;
    data.forEach((_, t) => {
      data.forEach((samples, s) => {
        if (s === t) return;
        for (const h of samples) {
          let e = 0;
          for (let i = 0; i < 8; i++) {
            let v = 0;
            for (let k = 0; k < d; k++) v += A(t)[i * d + k]! * h[k]!;
            e += v * v;
          }
          sum += Math.sqrt(e);
          n++;
        }
      });
    });
    return sum / n;
  };
  const r = interference((t) => random[t]!);
  const m = interference((t) => mean[t]!.groups[0]!.A);
  const c = interference((t) => cov[t]!.groups[0]!.A);
  assert.ok(r > 2 * m, `random ${r} vs mean ${m}`);
  assert.ok(m >= c, `mean ${m} vs covariance ${c}`);
});

test('mean mode refuses impossible ranks; the control is shared by the tasks of a seed, or drawn per task', () => {
  const rng = new Rng(0);
  assert.throws(() => meanModeBasis([Float64Array.from({ length: 4 }, () => rng.normal()), Float64Array.from({ length: 4 }, () => rng.normal())], 4, 3, new Rng(0)), /leaving 2 for rank 3/);
  const groups = [{ name: 'g', layer: 0, modules: ['m'], dim: 16 }];
  const shared = orthonormalControlInit(['x', 'y'], groups, 4, 9);
  assert.ok(orthonormalityError(shared[0]!.groups[0]!.A, 4, 16) <= 1e-12);
  assert.deepEqual(shared[0]!.groups[0]!.A, shared[1]!.groups[0]!.A);
  assert.notDeepEqual(orthonormalControlInit(['x', 'y'], groups, 4, 10)[0]!.groups[0]!.A, shared[0]!.groups[0]!.A);
  const a = orthonormalControlInit(['x', 'y'], groups, 4, 9, true);
  assert.equal(a[0]!.kind, 'orthonormal-control-per-task');
  assert.ok(orthonormalityError(a[0]!.groups[0]!.A, 4, 16) <= 1e-12);
  assert.notDeepEqual(a[0]!.groups[0]!.A, a[1]!.groups[0]!.A);
  assert.deepEqual(orthonormalControlInit(['x', 'y'], groups, 4, 9, true)[1]!.groups[0]!.A, a[1]!.groups[0]!.A);
});

const TINY = makeLlamaConfig({ vocabSize: 24, hiddenSize: 16, intermediateSize: 24, numLayers: 2, numHeads: 4, numKvHeads: 2 });

test('statistics: q and v share one group; real tokens only; batching and padding do not change them; memory is fixed', () => {
  const model = LlamaModel.random(TINY, 3, { backend: new ReferenceBackend(), std: 0.3 });
  try {
    const groups = featureGroups(model, ['q_proj', 'v_proj', 'down_proj']);
    assert.deepEqual(
      groups.map((g) => [g.name, g.modules.length]),
      [
        ['model.layers.0.input_layernorm', 2],
        ['model.layers.0.mlp.down_proj', 1],
        ['model.layers.1.input_layernorm', 2],
        ['model.layers.1.mlp.down_proj', 1],
      ],
    );
    const rng = new Rng(4);
    const seqs = Array.from({ length: 7 }, (_, i) => ({ ids: Int32Array.from({ length: 3 + ((i * 5) % 9) }, () => rng.int(24)) }));
    const one = collectFeatureStats(model, seqs, { targets: ['q_proj', 'v_proj'], batchSize: 1 });
    const three = collectFeatureStats(model, seqs, { targets: ['q_proj', 'v_proj'], batchSize: 3, padId: 5 });
    const tokens = seqs.reduce((s, e) => s + e.ids.length, 0);
    assert.equal(one.rows, tokens);
    for (const [gi, g] of one.groups.entries()) {
      const h = three.groups[gi]!;
      assert.equal(g.count, tokens);
      for (let i = 0; i < g.sum.length; i++) assert.ok(Math.abs(g.sum[i]! - h.sum[i]!) <= 1e-9 * (1 + Math.abs(g.sum[i]!)));
      for (let i = 0; i < g.outer!.length; i++) assert.ok(Math.abs(g.outer![i]! - h.outer![i]!) <= 1e-9 * (1 + Math.abs(g.outer![i]!)));
    }
    // Layer 0's input is rmsnorm(embedding) · weight: checked directly.
    const d = TINY.hiddenSize;
    const embed = model.embed.data;
    const w = model.blocks[0]!.inputNorm.data;
    const sum = new Float64Array(d);
    const outer = new Float64Array(d * d);
    for (const s of seqs) {
      for (const id of s.ids) {
        const x = embed.subarray(id * d, (id + 1) * d);
        const inv = 1 / Math.sqrt(x.reduce((a, v) => a + v * v, 0) / d + TINY.rmsNormEps);
        const h = Array.from(x, (v, i) => v * inv * w[i]!);
        for (let i = 0; i < d; i++) {
          sum[i] += h[i]!;
          for (let j = 0; j < d; j++) outer[i * d + j] += h[i]! * h[j]!;
        }
      }
    }
    const g0 = one.groups[0]!;
    for (let i = 0; i < d; i++) assert.ok(Math.abs(g0.sum[i]! - sum[i]!) <= 1e-4 * (1 + Math.abs(sum[i]!)));
    for (let i = 0; i < d * d; i++) assert.ok(Math.abs(g0.outer![i]! - outer[i]!) <= 1e-4 * (1 + Math.abs(outer[i]!)));
    const M = featureSecondMoment(g0);
    assert.ok(Math.abs(M[0]! - outer[0]! / tokens) <= 1e-4);
    // all-positions counts every padded position.
    const all = collectFeatureStats(model, seqs, { targets: ['q_proj'], batchSize: 4, pooling: 'all-positions', padTo: 12 });
    assert.equal(all.rows, 7 * 12);
    // Streaming: a generator of many samples, the same accumulator size.
    function* many() {
      for (let i = 0; i < 60; i++) yield seqs[i % seqs.length]!;
    }
    const big = collectFeatureStats(model, many(), { targets: ['q_proj', 'v_proj'], batchSize: 8 });
    assert.equal(big.samples, 60);
    assert.equal(statsFloats(big), statsFloats(one));
    assert.equal(statsFloats(one), 2 * (d + d * d));
    // The model's layers are restored.
    assert.equal(model.linearSlots()[0]!.get().constructor.name, 'Linear');
  } finally {
    model.dispose();
  }
});

test('recipe: defaults, relative paths, names, and errors that name the key', async () => {
  const { parseOsrmRecipe } = await import('../src/osrm/recipe.js');
  const r = parseOsrmRecipe({ model: 'm', tasks: [{ name: 'a', train: 'a/train.jsonl', eval: 'a/eval.jsonl' }, { name: 'b', train: '/x/b.jsonl', eval: '/x/e.jsonl', truncation: 'left', max_length: 96 }] }, '/base');
  assert.equal(r.model, '/base/m');
  assert.equal(r.tasks[0]!.train, '/base/a/train.jsonl');
  assert.equal(r.tasks[1]!.train, '/x/b.jsonl');
  assert.equal(r.tasks[0]!.max_length, 64);
  assert.deepEqual(r.inits.map((i) => i.name), ['standard', 'orthonormal-control+freeze-A', 'osrm-covariance+freeze-A']);
  assert.deepEqual(r.lora, { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'], rslora: false });
  assert.equal(r.train.steps, 250);
  assert.equal(r.osrm.samples, 100);
  assert.equal(r.osrm.shuffle_seed, 42);
  assert.equal(r.merges[0]!.name, 'task_arithmetic');
  const tasks = [{ name: 'a', train: 't', eval: 'e' }, { name: 'b', train: 't', eval: 'e' }];
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks, bogus: 1 }), /bogus/);
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks, merges: [{ method: 'nope' }] }), /merges\.0\.method: unknown merge method/);
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks, inits: [{ init: 'osrm-covariance', freeze: 'C' }] }), /inits\.0\.freeze/);
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks: [tasks[0], tasks[0]] }), /listed twice/);
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks: [tasks[0]] }), /tasks/);
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks, inits: [{ init: 'standard' }, { init: 'standard' }] }), /used twice/);
});

test('the example recipes are valid', async () => {
  const { readdir } = await import('node:fs/promises');
  const { join } = await import('node:path');
  const { readOsrmRecipe } = await import('../src/osrm/recipe.js');
  const { REPO_ROOT } = await import('./helpers/fixtures.js');
  const files = (await readdir(join(REPO_ROOT, 'examples'))).filter((f) => /^osrm-.*\.yml$/.test(f));
  assert.ok(files.length >= 2);
  for (const f of files) {
    const r = await readOsrmRecipe(join(REPO_ROOT, 'examples', f));
    assert.ok(r.tasks.length >= 2, f);
    assert.ok(r.model.endsWith('stories260K.gguf'), f);
  }
});
