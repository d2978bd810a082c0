import assert from 'node:assert/strict';
import { readFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { convertToHf } from '../src/convert/to-hf.js';
import { readPeftAdapter } from '../src/io/peft.js';
import { evaluateAccuracy } from '../src/nn/eval.js';
import { loadModel } from '../src/train/checkpoint.js';
import { featureMean, mergeTaskVectors, orthonormalityError, othersSecondMoment, parseOsrmRecipe, rayleighQuotients, runOsrmInit, runOsrmPipeline, type OsrmInitTask } from '../src/osrm/index.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { encodeExamples } from '../src/data/batching.js';
import { readDataset } from '../src/data/datasets.js';
import { eigh } from '../src/tensor/linalg.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const TASKS = ['tasks/domain/train.jsonl', 'tasks/pronoun/train.jsonl', 'tasks/parity/train.jsonl'];
let work = '';
let modelDir = '';

before(async () => {
  work = await mkdtemp(join(tmpdir(), 'amalgam-osrm-test-'));
});
after(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

async function ensureModel(): Promise<string> {
  if (!modelDir) {
    modelDir = join(work, 'stories260K');
    await convertToHf(fixture(GGUF), modelDir);
  }
  return modelDir;
}

const initTasks = (): OsrmInitTask[] => [
  { name: 'domain', data: fixture(TASKS[0]!) },
  { name: 'pronoun', data: fixture(TASKS[1]!) },
  { name: 'parity', data: fixture(TASKS[2]!), maxLength: 96, truncation: 'left' },
];

async function adapterA(dir: string): Promise<Map<string, { A: Float32Array; B: Float32Array; shape: number[] }>> {
  const ad = await readPeftAdapter(dir);
  try {
    const out = new Map<string, { A: Float32Array; B: Float32Array; shape: number[] }>();
    for (const m of ad.modules) out.set(m.path, { A: await ad.source.readF32(m.aName), B: await ad.source.readF32(m.bName), shape: [m.rank, m.inFeatures] });
    return out;
  } finally {
    await ad.close();
  }
}

test('osrm init on stories260K features: the init bars on the written adapters, B = 0, q and v share A, same seed same bytes', async (t) => {
  if (!haveFixtures(t, GGUF, ...TASKS)) return;
  const model = await ensureModel();
  const cov = await runOsrmInit(model, initTasks(), join(work, 'cov'), { mode: 'covariance', samples: 24, seed: 1 });
  const mean = await runOsrmInit(model, initTasks(), join(work, 'mean'), { mode: 'mean', samples: 24, seed: 1 });
  const d = 64;
  for (const [ti, out] of cov.outputs.entries()) {
    const mods = await adapterA(out.dir);
    assert.equal(mods.size, 10);
    for (const [gi, g] of cov.stats[ti]!.groups.entries()) {
      const q = mods.get(g.group.modules[0]!)!;
      const v = mods.get(g.group.modules[1]!)!;
      assert.deepEqual(q.A, v.A);
      assert.ok(q.B.every((x) => x === 0));
      assert.ok(orthonormalityError(q.A, 8, d) <= 1e-6);
      const C = othersSecondMoment(cov.stats, ti, gi);
      const eig = eigh(C, d).values;
      const rq = rayleighQuotients(q.A, C, 8, d);
      for (let i = 0; i < 8; i++) assert.ok(Math.abs(rq[i]! - eig[i]!) <= 1e-6 * Math.abs(eig[i]!), `${g.group.name} row ${i}: ${rq[i]} vs ${eig[i]}`);
    }
    assert.ok(out.check.rayleighRelative! <= 1e-6);
    const cfg = JSON.parse(await readFile(join(out.dir, 'adapter_config.json'), 'utf8')) as Record<string, any>;
    assert.equal(cfg['amalgam_init'].kind, 'osrm-covariance');
    assert.equal(cfg['r'], 8);
    assert.equal(cfg['lora_alpha'], 16);
  }
  for (const [ti, out] of mean.outputs.entries()) {
    const mods = await adapterA(out.dir);
    for (const [gi, g] of mean.stats[ti]!.groups.entries()) {
      const A = mods.get(g.group.modules[0]!)!.A;
      assert.ok(orthonormalityError(A, 8, d) <= 1e-6);
      let res = 0;
      let xn = 0;
      mean.stats.forEach((s, j) => {
        if (j === ti) return;
        const mu = featureMean(s.groups[gi]!);
        xn += mu.reduce((a, x) => a + x * x, 0);
        for (let i = 0; i < 8; i++) res += mu.reduce((a, x, k) => a + x * A[i * d + k]!, 0) ** 2;
      });
      assert.ok(Math.sqrt(res) <= 1e-6 * Math.sqrt(xn));
    }
  }
  const again = await runOsrmInit(model, initTasks(), join(work, 'mean2'), { mode: 'mean', samples: 24, seed: 1 });
  for (const task of ['domain', 'parity']) {
    const a = await readFile(join(work, 'mean', task, 'adapter_model.safetensors'));
    const b = await readFile(join(work, 'mean2', task, 'adapter_model.safetensors'));
    assert.ok(a.equals(b), `${task}: same seed, different bytes`);
  }
});

test('osrm run on stories260K (tiny): frozen A stays, adapters with heads reproduce the single-task accuracy, TA is λ·ΣΔW', async (t) => {
  if (!haveFixtures(t, GGUF, ...TASKS)) return;
  const model = await ensureModel();
  const fx = (p: string) => fixture(`tasks/${p}`);
  const recipe = parseOsrmRecipe({
    model,
    tasks: [
      { name: 'domain', train: fx('domain/train.jsonl'), eval: fx('domain/eval.jsonl'), train_limit: 40, eval_limit: 24, num_labels: 3 },
      { name: 'pronoun', train: fx('pronoun/train.jsonl'), eval: fx('pronoun/eval.jsonl'), train_limit: 40, eval_limit: 24 },
    ],
    train: { steps: 3, batch_size: 8 },
    osrm: { samples: 16 },
    inits: [{ init: 'standard' }, { init: 'osrm-covariance', freeze: 'A' }],
    merges: [{ method: 'task_arithmetic', lambdas: [0.5, 1] }],
    seeds: [0],
    evaluation: { batch_size: 16, diagnostic_samples: 16 },
    output: { dir: join(work, 'run') },
  });
  const report = await runOsrmPipeline(recipe);
  assert.equal(report.runs.length, 4);
  assert.equal(report.merges.length, 4);
  assert.equal(report.summary.length, 2);
  const osrm = report.runs.filter((r) => r.init === 'osrm-covariance+freeze-A');
  for (const r of osrm) assert.equal(r.aDrift, 0);
  for (const r of report.runs.filter((x) => x.init === 'standard')) assert.ok(r.aDrift > 0);
  assert.ok(report.initChecks[0]!.rayleighRelative! <= 1e-6);
  const md = await readFile(join(work, 'run', 'results.md'), 'utf8');
  assert.match(md, /\| osrm-covariance\+freeze-A \|/);
  const json = JSON.parse(await readFile(join(work, 'run', 'results.json'), 'utf8')) as { summary: unknown[] };
  assert.equal(json.summary.length, 2);

  // A saved adapter (LoRA + score head) gives the recorded accuracy.
  const run = osrm.find((r) => r.task === 'pronoun')!;
  const loaded = await loadModel(model, { adapter: run.adapterDir! });
  try {
    const tok = await loadTokenizer(model);
    const ev = encodeExamples(tok, (await readDataset(fx('pronoun/eval.jsonl'), { requireLabels: true })).examples.slice(0, 24), { maxLength: 64 });
    const acc = evaluateAccuracy(loaded.model, loaded.head!, ev.map((e) => ({ ids: e.ids, label: e.label! })), { batchSize: 16 });
    assert.equal(acc.accuracy, run.accuracy);
  } finally {
    loaded.model.dispose();
  }

  // Task arithmetic on the dense task vectors is λ·Σ ΔW_t.
  const mk = (task: string, v: number) => ({ task, head: null as never, modules: [{ name: 'm', group: 'g', A0: new Float32Array(2), A: new Float32Array(2), B: new Float32Array(2), scaling: 1, rank: 1, delta: Float32Array.from([v, -v, 2 * v, 0.5]) }] });
  const merged = mergeTaskVectors({ name: 'ta', method: 'task_arithmetic', lambdas: [0.7], parameters: {} }, 0.7, [mk('a', 1), mk('b', 3)], 0).get('m')!;
  assert.deepEqual(Array.from(merged), [0.7 * 4, -0.7 * 4, 0.7 * 8, 0.7].map(Math.fround));
});

test('amalgam osrm init (command line, in process) writes one adapter per task', async (t) => {
  if (!haveFixtures(t, GGUF, ...TASKS)) return;
  const model = await ensureModel();
  const { Command } = await import('commander');
  const { registerOsrm } = await import('../src/cli/osrm.js');
  const program = new Command().exitOverride();
  registerOsrm(program);
  let out = '';
  const write = process.stdout.write.bind(process.stdout);
  process.stdout.write = ((s: string) => ((out += s), true)) as typeof process.stdout.write;
  try {
    await program.parseAsync(
      ['osrm', 'init', model, '--task', `domain=${fixture(TASKS[0]!)}`, '--task', `parity=${fixture(TASKS[2]!)},max_length=96,truncation=left`, '--out', join(work, 'cli'), '--mode', 'mean', '--samples', '8', '--lora', 'r=4,alpha=8', '--json'],
      { from: 'user' },
    );
  } finally {
    process.stdout.write = write;
  }
  const r = JSON.parse(out) as { outputs: { task: string; dir: string; check: { orthonormality: number; meanResidual: number } }[]; samples: { rows: number }[] };
  assert.deepEqual(r.outputs.map((o) => o.task), ['domain', 'parity']);
  for (const o of r.outputs) {
    assert.ok(o.check.orthonormality <= 1e-6 && o.check.meanResidual <= 1e-6);
    const mods = await adapterA(o.dir);
    assert.deepEqual(mods.get('model.layers.0.self_attn.q_proj')!.shape, [4, 64]);
  }
  assert.ok(r.samples[1]!.rows > r.samples[0]!.rows);
});
