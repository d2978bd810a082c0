/**
 * AdaMerging on tiny synthetic models: the entropy gradient and the coefficient gradient against
 * central differences, the merge θ_base + Σ λτ, training lowers the entropy and keeps λ in its
 * range, seeded determinism, task-wise granularity, recipe defaults and errors.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ReferenceBackend } from '../src/backend/reference.js';
import { AdaMergeModel, entropyLoss, trainAdaMerge } from '../src/adamerge/adamerge.js';
import { parseAdaMergeRecipe } from '../src/adamerge/recipe.js';
import { isAmalgamError } from '../src/errors.js';
import { makeLlamaConfig } from '../src/nn/config.js';
import { LlamaModel } from '../src/nn/model.js';
import { Rng } from '../src/tensor/rng.js';

const be = new ReferenceBackend();
const C = makeLlamaConfig({ vocabSize: 32, hiddenSize: 16, intermediateSize: 32, numLayers: 2, numHeads: 4, numKvHeads: 2 });

function models(n = 3): { base: LlamaModel; experts: LlamaModel[] } {
  const base = LlamaModel.random(C, 1, { backend: be, std: 0.3 });
  const bp = base.namedParameters();
  const experts = Array.from({ length: n }, (_, i) => {
    const m = LlamaModel.random(C, 1, { backend: be, std: 0.3 });
    const rng = new Rng(100 + i);
    for (const p of m.parameters()) {
      const noise = rng.fillNormal(new Float32Array(p.size), p.shape.length === 1 ? 0.1 : 0.4);
      for (let j = 0; j < p.size; j++) p.data[j] = bp.get(p.name)!.data[j]! + noise[j]!;
    }
    return m;
  });
  return { base, experts };
}

function data(n = 3, count = 6, len = 10): { sequences: Int32Array[] }[] {
  return Array.from({ length: n }, (_, i) => {
    const rng = new Rng(300 + i);
    return { sequences: Array.from({ length: count }, () => Int32Array.from({ length: len }, () => 8 * i + rng.int(10))) };
  });
}

test('entropy gradient matches central differences', () => {
  const rng = new Rng(1);
  const V = 7;
  const rows = 3;
  const z = rng.fillNormal(new Float32Array(rows * V), 2);
  const weights = [1, 0, 1];
  const d = new Float32Array(rows * V);
  const { loss, count } = entropyLoss(z, rows, V, { weights, dLogits: d });
  assert.equal(count, 2);
  assert.ok(loss > 0 && loss < Math.log(V));
  const h = 1e-3;
  for (let i = 0; i < z.length; i++) {
    const zp = Float32Array.from(z);
    const zm = Float32Array.from(z);
    zp[i] = zp[i]! + h;
    zm[i] = zm[i]! - h;
    const fd = (entropyLoss(zp, rows, V, { weights }).loss - entropyLoss(zm, rows, V, { weights }).loss) / (2 * h);
    assert.ok(Math.abs(fd - d[i]!) < 2e-3, `logit ${i}: ${d[i]} vs ${fd}`);
  }
  const u = new Float32Array(V);
  assert.ok(Math.abs(entropyLoss(u, 1, V).loss - Math.log(V)) < 1e-12);
});

test('the merge is θ_base + Σ_k λ_k τ_k, and the coefficient gradient matches central differences', () => {
  const { base, experts } = models(2);
  const am = new AdaMergeModel(base, experts, { init: 0.3 }, ['a', 'b']);
  assert.equal(am.lambdas.length, am.rows.length * 2);
  am.materialise();
  const bp = base.namedParameters();
  const ep = experts.map((m) => m.namedParameters());
  for (const p of am.model.parameters()) {
    for (let j = 0; j < p.size; j += 5) {
      const b = bp.get(p.name)!.data[j]!;
      const want = b + 0.3 * (ep[0]!.get(p.name)!.data[j]! - b) + 0.3 * (ep[1]!.get(p.name)!.data[j]! - b);
      assert.ok(Math.abs(p.data[j]! - want) < 1e-5);
    }
  }
  const rng = new Rng(5);
  for (let i = 0; i < am.lambdas.length; i++) am.lambdas[i] = 0.2 + 0.6 * rng.next();
  am.lambdasChanged();
  const B = 2;
  const T = 6;
  const ids = Int32Array.from({ length: B * T }, () => rng.int(32));
  const V = C.vocabSize;
  const lossAt = (): number => {
    const logits = am.forward(ids, B, T);
    return entropyLoss(logits, B * T, V).loss;
  };
  am.zeroGrad();
  const logits = am.forward(ids, B, T);
  entropyLoss(logits, B * T, V, { dLogits: logits });
  am.backward(logits);
  am.collectGradients();
  const g = Float64Array.from(am.grads);
  const h = 3e-3;
  let worst = 0;
  const scale = Math.max(...Array.from(g, Math.abs));
  for (let i = 0; i < am.lambdas.length; i++) {
    const v = am.lambdas[i]!;
    am.lambdas[i] = v + h;
    am.lambdasChanged();
    const lp = lossAt();
    am.lambdas[i] = v - h;
    am.lambdasChanged();
    const lm = lossAt();
    am.lambdas[i] = v;
    am.lambdasChanged();
    const fd = (lp - lm) / (2 * h);
    worst = Math.max(worst, Math.abs(fd - g[i]!) / Math.max(Math.abs(fd), Math.abs(g[i]!), 1e-2 * scale));
  }
  assert.ok(worst < 2e-2, `worst relative error ${worst}`);
  am.dispose();
});

test('training lowers the entropy, keeps λ in range, and is deterministic per seed', async () => {
  const run = async (seed: number, granularity: 'layer' | 'task' = 'layer') => {
    const { base, experts } = models();
    const am = new AdaMergeModel(base, experts, { granularity, clamp: [0, 0.6] });
    const d = data();
    const fixed = () => d.reduce((s, src) => {
      const ids = Int32Array.from(src.sequences.flatMap((q) => Array.from(q)));
      const logits = am.forward(ids, src.sequences.length, 10);
      return s + entropyLoss(logits, ids.length, C.vocabSize).loss;
    }, 0);
    const before = fixed();
    const steps: number[] = [];
    const r = await trainAdaMerge(am, d, { steps: 12, batchSize: 2, lr: 0.05, seed, onStep: (s) => steps.push(s.step) });
    const after = fixed();
    const lambdas = Array.from(am.lambdas);
    const table = am.table();
    am.dispose();
    return { before, after, r, lambdas, steps, table };
  };
  const a = await run(0);
  assert.ok(a.after < a.before - 0.05, `entropy ${a.before} → ${a.after}`);
  for (const v of a.lambdas) assert.ok(v >= 0 && v <= 0.6);
  assert.deepEqual(a.steps, Array.from({ length: 12 }, (_, i) => i + 1));
  assert.equal(a.r.tokens, 12 * 3 * 2 * 10);
  assert.equal(a.r.forwardTokens, 3 * a.r.tokens);
  assert.equal(a.table.length, a.lambdas.length);
  const b = await run(0);
  assert.deepEqual(b.lambdas, a.lambdas);
  assert.deepEqual(b.r.losses, a.r.losses);
  const c = await run(1);
  assert.notDeepEqual(c.r.losses, a.r.losses);
  const t = await run(0, 'task');
  assert.equal(t.lambdas.length, 3);
  assert.deepEqual(t.table.map((x) => x.row), ['all', 'all', 'all']);
});

test('errors: bad options and data', async () => {
  const { base, experts } = models(2);
  assert.throws(() => new AdaMergeModel(base, experts, { granularity: 'column' as 'layer' }), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  assert.throws(() => new AdaMergeModel(base, experts, { clamp: [1, 0] }), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  assert.throws(() => new AdaMergeModel(base, []), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  const other = LlamaModel.random(makeLlamaConfig({ ...C, vocabSize: 40 }), 1, { backend: be });
  assert.throws(() => new AdaMergeModel(base, [other]), (e) => isAmalgamError(e) && e.code === 'E_ARCH');
  const am = new AdaMergeModel(base, experts);
  await assert.rejects(trainAdaMerge(am, []), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  await assert.rejects(trainAdaMerge(am, [{ sequences: [] }]), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  await assert.rejects(trainAdaMerge(am, data(1), { steps: 0 }), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  am.dispose();
});

test('AdaMerging recipes: defaults, path resolution and errors', () => {
  const r = parseAdaMergeRecipe('base_model: base\nmodels: [a, b]\ndata: [u.txt]\n', '/r');
  assert.equal(r.baseModel, '/r/base');
  assert.deepEqual(r.models, [{ path: '/r/a' }, { path: '/r/b' }]);
  assert.equal(r.granularity, 'layer');
  assert.equal(r.init, 0.3);
  assert.deepEqual(r.clamp, [0, 1]);
  assert.deepEqual(r.train, { lr: 1e-3, steps: 500, batchSize: 16, betas: [0.9, 0.999], eps: 1e-8, seed: 0, maxLength: 2048 });
  const bad = [
    'models: [a]\ndata: [u.txt]\n',
    'base_model: x\nmodels: []\ndata: [u.txt]\n',
    'base_model: x\nmodels: [a]\n',
    'base_model: x\nmodels: [a]\ndata: [u.txt]\ninit: 2\n',
    'base_model: x\nmodels: [a]\ndata: [u.txt]\ngranularity: column\n',
    'base_model: x\nmodels: [a]\ndata: [u.txt]\ntrain: {steps: 0}\n',
    'base_model: x\nmodels: [a]\ndata: [u.txt]\noutput: {dtype: int8}\n',
  ];
  for (const text of bad) assert.throws(() => parseAdaMergeRecipe(text), (e) => isAmalgamError(e) && e.code === 'E_CONFIG', text);
});
