/**
 * Training DAM coefficients: a few seeded steps lower the loss on held-fixed batches (Adam,
 * MoFO-AdamW, cached top-k teachers, per-source normalised KL); the same seed gives the same
 * coefficients bit for bit and another seed does not; MoFO-AdamW updates the top α fraction and
 * equals AdamW at α = 1; recipes parse with the reference defaults and reject mistakes; a recipe
 * runs end to end on the expert fixtures and bakes a loadable checkpoint.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ReferenceBackend } from '../src/backend/reference.js';
import { isAmalgamError } from '../src/errors.js';
import { makeLlamaConfig } from '../src/nn/config.js';
import { LlamaModel } from '../src/nn/model.js';
import { Rng } from '../src/tensor/rng.js';
import { AdamW } from '../src/train/optimizer.js';
import { damLossStep, resolveLossOptions, type DamBatch } from '../src/dam/loss.js';
import { DamModel } from '../src/dam/model.js';
import { MoFOAdamW } from '../src/dam/optim.js';
import { parseDamRecipe } from '../src/dam/recipe.js';
import { damBatch, runDam, trainDam, type DamSourceData, type DamTrainOptions } from '../src/dam/train.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

const be = new ReferenceBackend();
const C = makeLlamaConfig({ vocabSize: 32, hiddenSize: 16, intermediateSize: 32, numLayers: 2, numHeads: 4, numKvHeads: 2 });
const N = 3;

/** Experts: one random base plus a different perturbation each. */
function experts(): LlamaModel[] {
  const base = LlamaModel.random(C, 1, { backend: be, std: 0.3 });
  return Array.from({ length: N }, (_, i) => {
    const m = LlamaModel.random(C, 1, { backend: be, std: 0.3 });
    const rng = new Rng(100 + i);
    for (const p of m.parameters()) {
      const noise = rng.fillNormal(new Float32Array(p.size), p.shape.length === 1 ? 0.1 : 0.3);
      for (let j = 0; j < p.size; j++) p.data[j] = base.namedParameters().get(p.name)!.data[j]! + noise[j]!;
    }
    return m;
  });
}

/** Each source's data: sequences from its own token range. */
function data(): DamSourceData[] {
  return Array.from({ length: N }, (_, i) => {
    const rng = new Rng(200 + i);
    return { sequences: Array.from({ length: 8 }, () => Int32Array.from({ length: 12 }, () => 8 * i + rng.int(12))) };
  });
}

/** The loss on every sequence of every source (no gradient). */
function fullLoss(dam: DamModel, d: DamSourceData[]): number {
  const batches: DamBatch[] = d.map((s) => damBatch(s.sequences, 0, 64));
  return damLossStep(dam, batches, resolveLossOptions({}), { backward: false }).total;
}

async function train(opts: DamTrainOptions, seed = 0): Promise<{ dam: DamModel; before: number; after: number; losses: number[] }> {
  const sources = experts();
  const d = data();
  const dam = DamModel.fromModels(sources, { backend: be });
  const before = fullLoss(dam, d);
  const r = await trainDam(dam, d, { steps: 12, batchSize: 2, seed, ...opts });
  assert.equal(r.losses.length, r.steps);
  assert.equal(r.perSource[0]!.length, N);
  return { dam, before, after: fullLoss(dam, d), losses: r.losses };
}

test('a few seeded Adam steps lower the loss; the same seed gives the same coefficients', async (t) => {
  const a = await train({ lr: 3e-2, optimizer: { kind: 'adam' } }, 5);
  t.diagnostic(`Adam: loss ${a.before.toFixed(5)} -> ${a.after.toFixed(5)}`);
  assert.ok(a.after < 0.9 * a.before, `loss did not go down: ${a.before} -> ${a.after}`);
  const b = await train({ lr: 3e-2, optimizer: { kind: 'adam' } }, 5);
  assert.deepEqual(b.losses, a.losses);
  const cb = new Map(b.dam.coefficients().map((p) => [p.name, p.data]));
  for (const p of a.dam.coefficients()) assert.deepEqual(cb.get(p.name), p.data, `${p.name} differs between runs with one seed`);
  const c = await train({ lr: 3e-2, optimizer: { kind: 'adam' } }, 6);
  assert.notDeepEqual(c.losses, a.losses);
});

test('MoFO-AdamW (the default), cached top-k teachers and normalised KL also lower the loss', async (t) => {
  const mofo = await train({ lr: 3e-2 });
  t.diagnostic(`MoFO-AdamW: loss ${mofo.before.toFixed(5)} -> ${mofo.after.toFixed(5)}`);
  assert.ok(mofo.after < mofo.before, `MoFO: ${mofo.before} -> ${mofo.after}`);
  const topk = await train({ lr: 3e-2, optimizer: { kind: 'adam' }, topK: 8 });
  t.diagnostic(`Adam, top-8 teachers: loss ${topk.before.toFixed(5)} -> ${topk.after.toFixed(5)}`);
  assert.ok(topk.after < 0.9 * topk.before);
  const sources = experts();
  const dam = DamModel.fromModels(sources, { backend: be });
  const r = await trainDam(dam, data(), { steps: 3, batchSize: 2, lr: 3e-2, optimizer: { kind: 'adam' }, normalizeKl: true });
  assert.equal(r.initialTerms!.length, N);
  const reg = resolveLossOptions({}).cosine * dam.tensors.filter((x) => x.coeffs).length;
  assert.ok(Math.abs(r.losses[0]! - (N + reg)) < 1e-6, `the first normalised loss is ${r.losses[0]}, expected N + cosine terms`);
});

test('MoFO-AdamW updates the top α fraction by |m| and equals AdamW at α = 1', () => {
  const rng = new Rng(3);
  const make = () => ({ name: 'p', data: rng.fillNormal(new Float32Array(20)), grad: new Float32Array(20) });
  const p = make();
  const start = Float32Array.from(p.data);
  for (let i = 0; i < 20; i++) p.grad[i] = i - 9.5;
  const opt = new MoFOAdamW([p], { lr: 0.1, weightDecay: 0, alpha: 0.3 });
  opt.step();
  const changed = [...p.data].map((v, i) => (v !== start[i] ? i : -1)).filter((i) => i >= 0);
  assert.deepEqual(changed, [0, 1, 2, 17, 18, 19]);
  assert.equal(opt.lastUpdated[0], 6);

  const q1 = { name: 'q', data: Float32Array.from(start), grad: Float32Array.from(p.grad) };
  const q2 = { name: 'q', data: Float32Array.from(start), grad: Float32Array.from(p.grad) };
  const mofo = new MoFOAdamW([q1], { lr: 0.01, alpha: 1, weightDecay: 0.01 });
  const adamw = new AdamW([q2], { lr: 0.01, weightDecay: 0.01 });
  for (let s = 0; s < 3; s++) {
    mofo.step();
    adamw.step();
  }
  assert.deepEqual(q1.data, q2.data);
});

test('recipes: reference defaults, explicit settings and clear errors', () => {
  const r = parseDamRecipe('models:\n  - {model: a, data: a.txt}\n  - {model: b, data: {path: b.jsonl, text_fields: [question, answer]}}\n');
  assert.equal(r.models[1]!.data.path, 'b.jsonl');
  assert.deepEqual(r.models[1]!.data.textFields, ['question', 'answer']);
  assert.deepEqual(r.merge, { targets: 'all-linear', embeddings: false, norms: false, nonLinearity: 'tanh', init: 'reference', form: 'materialise' });
  assert.deepEqual(r.data, { maxLength: 2048, packing: false, examples: 1729 });
  assert.equal(r.loss.objective, 'kl');
  assert.equal(r.loss.temperature, 2);
  assert.equal(r.loss.cosine, 0.01);
  assert.equal(r.loss.l1, 0);
  assert.equal(r.loss.topK, null);
  assert.equal(r.train.optimizer, 'mofo');
  assert.equal(r.train.lr, 1e-3);
  assert.equal(r.train.mofoAlpha, 0.3);
  assert.equal(r.train.batchSize, 1);
  assert.equal(r.train.epochs, 1);
  assert.equal(r.train.maxGradNorm, 1);
  assert.equal(r.train.weightDecay, undefined);

  const s = parseDamRecipe(
    [
      'models:',
      '  - {model: a, data: a.txt}',
      '  - {model: b, data: b.txt}',
      'merge: {targets: [q_proj, lm_head], non_linearity: none, init: soup, embeddings: true}',
      'data: {max_length: 128, packing: true, examples: 400}',
      'loss: {objective: mse, l1: 1.0e-6, l2: 1.0e-6, normalize_kl: true, top_k: 128}',
      'train: {optimizer: adamw, lr: 0.01, weight_decay: 0, batch_size: 4, steps: 100, seed: 7}',
      'output: {dtype: bfloat16, shard_size: 2GiB}',
    ].join('\n'),
  );
  assert.deepEqual(s.merge.targets, ['q_proj', 'lm_head']);
  assert.equal(s.merge.nonLinearity, 'identity');
  assert.equal(s.merge.init, 'soup');
  assert.equal(s.loss.objective, 'mse');
  assert.equal(s.loss.normalizeKl, true);
  assert.equal(s.loss.topK, 128);
  assert.equal(s.train.weightDecay, 0);
  assert.equal(s.train.steps, 100);
  assert.equal(s.output.dtype, 'BF16');
  assert.equal(s.output.shardSize, 2 ** 31);

  const bad = (yaml: string, re: RegExp) => assert.throws(() => parseDamRecipe(yaml, 'r.yml'), (e) => isAmalgamError(e) && e.code === 'E_CONFIG' && re.test(e.message), yaml);
  bad('models:\n  - {model: a, data: a.txt}\n', /at least 2 models/);
  bad('models:\n  - {model: a, data: a.txt}\n  - {model: b, data: b.txt}\nloss: {objective: ce}\n', /loss\.objective/);
  bad('models:\n  - {model: a, data: a.txt}\n  - {model: b, data: b.txt}\ntrain: {lr: 1e-3, wd: 0.1}\n', /train.*wd/);
  bad('models:\n  - {model: a, data: a.txt}\n  - {model: b, data: b.txt}\ntrain: {optimizer: adam, weight_decay: 0.1}\n', /Adam has no weight decay/);
  bad('models:\n  - {model: a}\n  - {model: b, data: b.txt}\n', /models\.0\.data/);
});

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-dam-train-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('a recipe runs end to end on the expert fixtures and bakes a loadable checkpoint', async (t) => {
  const names = ['stories260K-shakespeare', 'stories260K-gsm8k', 'stories260K-agnews'];
  if (!haveFixtures(t, ...names.map((n) => `experts/${n}/model.safetensors`))) return;
  await writeFile(join(dir, 'shakespeare.txt'), 'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n');
  const rows = [
    { question: 'Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell?', answer: 'Natalia sold 48/2 = 24 clips in May. She sold 48+24 = 72 clips.\n#### 72' },
    { question: 'Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?', answer: 'Weng earns 12/60 = $0.2 per minute. She earned 0.2 x 50 = $10.\n#### 10' },
  ];
  await writeFile(join(dir, 'gsm8k.jsonl'), rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  await writeFile(join(dir, 'agnews.tsv'), 'Toshiba Corp. announced Tuesday a 80 gigabyte, 1.8-inch hard drive.\tSci/Tech\nStocks rallied on Wall Street as oil prices fell for a third day.\tBusiness\n');
  const yaml = [
    'models:',
    `  - {model: ${fixture(`experts/${names[0]}`)}, data: {path: shakespeare.txt, txt_mode: blocks, description: Tiny Shakespeare}}`,
    `  - {model: ${fixture(`experts/${names[1]}`)}, data: {path: gsm8k.jsonl, text_fields: [question, answer]}}`,
    `  - {model: ${fixture(`experts/${names[2]}`)}, data: {path: agnews.tsv, text_fields: [0], header: false}}`,
    'data: {max_length: 24, packing: true, examples: 4}',
    'train: {optimizer: adam, lr: 0.01, batch_size: 2, steps: 3, seed: 1}',
  ].join('\n');
  const recipe = parseDamRecipe(yaml);
  const out = join(dir, 'dam-out');
  const steps: number[][] = [];
  const r = await runDam(recipe, { baseDir: dir, outDir: out, recipeYaml: yaml, onStep: (s) => steps.push(s.perSource) });
  assert.equal(r.steps, 3);
  assert.equal(steps.length, 3);
  for (const kl of steps[0]!) assert.ok(kl > 0 && Number.isFinite(kl));
  t.diagnostic(`per-source KL, step 1: ${steps[0]!.map((v) => v.toFixed(4)).join(' ')}; step 3: ${steps[2]!.map((v) => v.toFixed(4)).join(' ')}`);
  const files = (await readdir(out)).sort();
  for (const f of ['model.safetensors', 'mergers.safetensors', 'config.json', 'README.md', 'dam_config.yml', 'tokenizer.json', 'tokenizer_config.json']) assert.ok(files.includes(f), `${f} missing`);
  const card = await readFile(join(out, 'README.md'), 'utf8');
  assert.ok(card.includes('Tiny Shakespeare (4 windows of 24 tokens)'), card);
  assert.ok(card.includes('steps: 3'));
  const m = await LlamaModel.fromFolder(out, { backend: be });
  const logits = m.forward([1, 2, 3, 4], 1, 4);
  assert.ok(logits.every(Number.isFinite));
  m.dispose();
});
