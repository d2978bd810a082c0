/**
 * Evolutionary merging on tiny synthetic models: the in-memory grouped merge equals the merge
 * methods tensor by tensor (per layer group), scoring agrees with evaluateNll, the CMA-ES search
 * improves the validation NLL over its start and is deterministic per seed; the text-data
 * loader's slicing, clean-up and windows; recipe defaults and errors.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ReferenceBackend } from '../src/backend/reference.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { isAmalgamError } from '../src/errors.js';
import { loadTextSequences, readTextDocuments } from '../src/evolve/data.js';
import { evolveMerge } from '../src/evolve/evolve.js';
import { scoreDomains, scoreSequences, type EvalSet } from '../src/evolve/fitness.js';
import { GroupedMerge } from '../src/evolve/merge.js';
import { parseEvolveRecipe } from '../src/evolve/recipe.js';
import { mergeTensor, prepareParams, tensorRng } from '../src/merge/index.js';
import { makeLlamaConfig } from '../src/nn/config.js';
import { evaluateNll } from '../src/nn/eval.js';
import { generate } from '../src/nn/generate.js';
import { LlamaModel } from '../src/nn/model.js';
import { Rng } from '../src/tensor/rng.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

const be = new ReferenceBackend();
const C = makeLlamaConfig({ vocabSize: 32, hiddenSize: 16, intermediateSize: 32, numLayers: 2, numHeads: 4, numKvHeads: 2 });

/** A random base and experts = base + a different perturbation each. */
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

/** Each expert's own data: sequences it samples. */
function sampled(experts: LlamaModel[], count: number, seed: number): EvalSet[] {
  return experts.map((m, i) => ({
    name: `domain ${i}`,
    sequences: Array.from({ length: count }, (_, k) => Int32Array.from([1, ...generate(m, [1], { maxNewTokens: 15, temperature: 1, seed: seed + 31 * i + k }).tokens])),
  }));
}

test('the grouped merge equals the merge method per tensor, with each layer group\'s parameters', () => {
  const { base, experts } = models();
  const ids = { base: 'base', models: ['a', 'b', 'c'] };
  for (const method of ['task_arithmetic', 'ties', 'dare_ties', 'linear'] as const) {
    const g = new GroupedMerge(base, experts, { method, lambda: 0.9, seed: 5 }, ids);
    assert.deepEqual(g.groups, ['layer 0', 'layer 1', 'embed/norm/head']);
    const P = g.params.length;
    assert.equal(g.dimension, 3 * 3 * P);
    const genome = Array.from({ length: g.dimension }, (_, k) => 0.2 + 0.05 * k);
    g.apply(genome);
    const named = g.model.namedParameters();
    for (const [name, groupIndex] of [
      ['model.layers.0.mlp.up_proj.weight', 0],
      ['model.layers.1.self_attn.q_proj.weight', 1],
      ['model.embed_tokens.weight', 2],
      ['lm_head.weight', 2],
      ['model.norm.weight', 2],
    ] as const) {
      const perModel: Record<string, Record<string, number>> = {};
      ids.models.forEach((id, i) => {
        const k = (groupIndex * 3 + i) * P;
        perModel[id] = { weight: genome[k]!, ...(P > 1 ? { density: Math.min(1, genome[k + 1]!) } : {}) };
      });
      const withBase = method !== 'linear';
      const models = withBase ? ['base', ...ids.models] : ids.models;
      const raw = { global: { normalize: method !== 'task_arithmetic', ...(withBase ? { lambda: 0.9 } : {}) }, perModel };
      const params = prepareParams(method, { tensorName: name, models, base: withBase ? 'base' : null }, raw);
      const src = [...(withBase ? [base] : []), ...experts].map((m) => m.namedParameters().get(name)!);
      const shape = [...src[0]!.shape];
      const want = mergeTensor(method, {
        tensorName: name,
        isEmbed: name === 'model.embed_tokens.weight' || name === 'lm_head.weight',
        inputs: src.map((p, i) => ({ model: models[i]!, data: p.data, shape })),
        base: withBase ? 'base' : null,
        params,
        rng: method === 'dare_ties' ? tensorRng(5, name) : undefined,
      })!;
      assert.deepEqual(Array.from(named.get(name)!.data), Array.from(want.data), `${method} ${name}`);
    }
    g.dispose();
  }
});

test('task arithmetic with one weight everywhere is base + w·Σ τ; granularity and edges change the groups', () => {
  const { base, experts } = models(2);
  const g = new GroupedMerge(base, experts, { method: 'task_arithmetic' });
  g.apply(g.uniformGenome(0.4));
  const bp = base.namedParameters();
  const ep = experts.map((m) => m.namedParameters());
  for (const p of g.model.parameters()) {
    const b = bp.get(p.name)!.data;
    for (let j = 0; j < p.size; j += 7) {
      const want = b[j]! + 0.4 * (ep[0]!.get(p.name)!.data[j]! - b[j]!) + 0.4 * (ep[1]!.get(p.name)!.data[j]! - b[j]!);
      assert.ok(Math.abs(p.data[j]! - want) < 1e-5);
    }
  }
  assert.deepEqual(new GroupedMerge(base, experts, { method: 'task_arithmetic', layerGranularity: 0 }).groups, ['layers 0-1', 'embed/norm/head']);
  assert.deepEqual(new GroupedMerge(base, experts, { method: 'task_arithmetic', nonLayer: 'edges' }).groups, ['layer 0', 'layer 1']);
  assert.deepEqual(
    g.decode(g.uniformGenome([-0.5, 0.25])).map((e) => e.weight),
    [0.5, 0.25, 0.5, 0.25, 0.5, 0.25],
  );
  assert.throws(() => new GroupedMerge(null, experts, { method: 'ties' }), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  assert.throws(() => g.apply([1, 2]), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
});

test('scoreSequences agrees with evaluateNll; a model\'s KL to itself is 0', () => {
  const { experts } = models(1);
  const m = experts[0]!;
  const rng = new Rng(9);
  const seqs = Array.from({ length: 7 }, (_, i) => Int32Array.from({ length: 5 + i }, () => rng.int(32)));
  const s = scoreSequences(m, seqs, { batchSize: 3, teacher: m });
  const ref = evaluateNll(m, seqs, { batchSize: 3 });
  assert.ok(Math.abs(s.nll - ref.meanNll) < 1e-5);
  assert.equal(s.tokens, ref.tokens);
  assert.ok(Math.abs(s.kl!) < 1e-6);
  assert.ok(s.accuracy >= 0 && s.accuracy <= 1);
  assert.equal(s.forwardTokens, seqs.reduce((a, q) => a + q.length, 0) + padExtra(seqs, 3));
});

/** Padded tokens scored per batch beyond the real ones (sequences grouped by length). */
function padExtra(seqs: Int32Array[], bs: number): number {
  const lens = seqs.map((s) => s.length).sort((a, b) => a - b);
  let extra = 0;
  for (let i = 0; i < lens.length; i += bs) {
    const part = lens.slice(i, i + bs);
    const T = Math.max(...part);
    for (const l of part) extra += T - l;
  }
  return extra;
}

test('CMA-ES search lowers the validation NLL below its start and is deterministic per seed', async () => {
  const { base, experts } = models();
  const val = sampled(experts, 4, 1);
  const run = async (seed: number) => {
    const g = new GroupedMerge(base, experts, { method: 'task_arithmetic' });
    g.apply(g.initialGenome());
    const s0 = scoreDomains(g.model, val);
    const start = s0.meanNll;
    const evals: number[] = [];
    const r = await evolveMerge(g, val, { evaluations: 40, seed, onEval: (e) => evals.push(e.evaluation) });
    const after = scoreDomains(g.model, val).meanNll;
    g.dispose();
    return { start, r, after, evals, tokensPerEval: s0.forwardTokens };
  };
  const a = await run(0);
  assert.ok(a.r.fitness < a.start - 0.05, `best ${a.r.fitness} vs start ${a.start}`);
  assert.ok(Math.abs(a.after - a.r.fitness) < 1e-9, 'the merged model holds the best candidate');
  assert.equal(a.r.evaluations, 40);
  assert.deepEqual(a.evals, Array.from({ length: 40 }, (_, i) => i + 1));
  assert.equal(a.r.forwardTokens, 40 * a.tokensPerEval);
  for (const p of a.r.parameters) assert.ok(p.weight >= 0 && p.weight <= 1);
  const b = await run(0);
  assert.deepEqual(b.r.genome, a.r.genome);
  assert.equal(b.r.fitness, a.r.fitness);
  const c = await run(1);
  assert.notDeepEqual(c.r.genome, a.r.genome);
  const ties = new GroupedMerge(base, experts, { method: 'ties' });
  const acc = await evolveMerge(ties, val, { evaluations: 12, fitness: 'accuracy', bounds: { weight: [0, 1], density: [0.2, 1] } });
  assert.ok(acc.fitness <= 0 && acc.fitness >= -1);
  for (const p of acc.parameters) assert.ok(p.density! >= 0.2 && p.density! <= 1);
  ties.dispose();
});

test('text data: slicing, clean-up, windows of window + 1 tokens, count', async (t) => {
  if (!haveFixtures(t, 'experts/stories260K-shakespeare/tokenizer.json')) return;
  const tok = await loadTokenizer(fixture('experts/stories260K-shakespeare'));
  const dir = await mkdtemp(join(tmpdir(), 'amalgam-evolve-data-'));
  try {
    const tsv = join(dir, 'a.tsv');
    await writeFile(tsv, ['It #39;s  a\\test\tx', 'quot;Hi quot; &amp; #36;5\ty', 'third row here\tz', 'fourth\tw'].join('\n') + '\n');
    const docs = await readTextDocuments({ path: tsv, textFields: [0], header: false, replace: [['#39;', "'"], ['quot;', '"'], ['#36;', '$'], ['&amp;', '&'], ['\\', ' ']], collapseWhitespace: true, rows: [0, -1] });
    assert.deepEqual(docs, ["It 's a test", '"Hi " & $5', 'third row here']);
    assert.deepEqual(await readTextDocuments({ path: tsv, textFields: [0], header: false, rows: [-2, null] }), ['third row here', 'fourth']);
    const txt = join(dir, 'b.txt');
    await writeFile(txt, Array.from({ length: 10 }, (_, i) => `  paragraph number ${i} with some words  `).join('\n\n'));
    const blocks = await readTextDocuments({ path: txt, txtMode: 'blocks', fraction: [0.2, 0.5] });
    assert.deepEqual(blocks, ['paragraph number 2 with some words', 'paragraph number 3 with some words', 'paragraph number 4 with some words']);
    const stream = (await readTextDocuments({ path: txt, txtMode: 'blocks' })).flatMap((d) => tok.encode(d, { bos: true }));
    const w = await loadTextSequences({ path: txt, txtMode: 'blocks', window: 8 }, tok);
    assert.equal(w.length, Math.floor(stream.length / 9));
    w.forEach((s, i) => assert.deepEqual(Array.from(s), stream.slice(9 * i, 9 * i + 9)));
    assert.equal((await loadTextSequences({ path: txt, txtMode: 'blocks', window: 8, count: 2 }, tok)).length, 2);
    const docsAsSeqs = await loadTextSequences({ path: txt, txtMode: 'blocks', window: null, maxLength: 4 }, tok);
    assert.equal(docsAsSeqs.length, 10);
    for (const s of docsAsSeqs) assert.equal(s.length, 4);
    await assert.rejects(loadTextSequences({ path: txt, txtMode: 'blocks', window: 5000 }, tok), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('evolve recipes: defaults, path resolution and errors', () => {
  const r = parseEvolveRecipe('base_model: base\nmodels: [a, {model: b, name: bee}]\ndata: [{path: v.txt, count: 4, window: 16}]\n', '/r');
  assert.equal(r.baseModel, '/r/base');
  assert.deepEqual(r.models, [{ path: '/r/a' }, { path: '/r/b', name: 'bee' }]);
  assert.equal(r.method, 'task_arithmetic');
  assert.equal(r.layerGranularity, 1);
  assert.deepEqual(r.bounds, { weight: [0, 1], density: [0, 1] });
  assert.deepEqual(r.cma, { evaluations: 100, sigma0: 1 / 6, boundary: 'resample', seed: 0 });
  assert.deepEqual(r.data, [{ path: '/r/v.txt', count: 4, window: 16 }]);
  const bad = [
    'models: [a, b]\ndata: [v.txt]\n',
    'base_model: x\nmodels: [a]\ndata: [v.txt]\n',
    'base_model: x\nmodels: [a, b]\ndata: []\n',
    'base_model: x\nmodels: [a, b]\ndata: [v.txt]\nmerge_method: slerp\n',
    'base_model: x\nmodels: [a, b]\ndata: [v.txt]\nbounds: {weight: [1, 0]}\n',
    'base_model: x\nmodels: [a, b]\ndata: [v.txt]\ncma: {evaluations: 0}\n',
    'base_model: x\nmodels: [a, b]\ndata: [{path: v.txt, fraction: [0.5, 0.2]}]\n',
    'base_model: x\nmodels: [a, b]\ndata: [v.txt]\nunknown: 1\n',
    'base_model: [\n',
  ];
  for (const text of bad) assert.throws(() => parseEvolveRecipe(text), (e) => isAmalgamError(e) && e.code === 'E_CONFIG', text);
  assert.equal(parseEvolveRecipe('models: [a, b]\ndata: [v.txt]\nmerge_method: linear\n').baseModel, null);
});
