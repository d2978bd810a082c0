/**
 * Training on stories260K, shortened: LM full fine-tuning and LoRA on Tiny Shakespeare, LoRA
 * classification on the domain task; loss goes down, a fixed seed gives identical bytes,
 * gradient accumulation matches one big batch, and written checkpoints / adapters load back.
 * The full-length runs (300 steps) are in bench/finetune.ts.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { convertToHf } from '../src/convert/to-hf.js';
import { encodeExamples, type EncodedExample } from '../src/data/batching.js';
import { parseTxt } from '../src/data/datasets.js';
import { buildDomainTask, readDomainSources } from '../src/data/domain.js';
import { loadTokenizer, type TextTokenizer } from '../src/data/tokenizer.js';
import { readPeftAdapter } from '../src/io/peft.js';
import { loadModel, saveAdapterFolder, saveModelFolder } from '../src/train/checkpoint.js';
import { evaluateFile } from '../src/train/evaluate.js';
import { evaluateHeldOut, trainModel } from '../src/train/trainer.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const SHAKES = 'datasets/tinyshakespeare/input.txt';
const DOMAIN = ['datasets/tinystories/val.txt', SHAKES, 'datasets/gsm8k/train.jsonl', 'datasets/gsm8k/test.jsonl'];

let root = '';
let base = '';
let tok: TextTokenizer;
let lmTrain: EncodedExample[] = [];
let lmEval: EncodedExample[] = [];
let heldOutFile = '';

function ready(): boolean {
  return [GGUF, ...DOMAIN].every((f) => existsSync(fixture(f)));
}

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'amalgam-train-'));
  if (!ready()) return;
  base = join(root, 'stories260K');
  await convertToHf(fixture(GGUF), base);
  tok = await loadTokenizer(base);
  const lines = (await readFile(fixture(SHAKES), 'utf8')).split('\n');
  const cut = Math.floor(lines.length * 0.9);
  // A slice of the training part keeps the test quick; evaluation on the first 300 held-out lines.
  lmTrain = encodeExamples(tok, parseTxt(lines.slice(0, 3000).join('\n')).examples);
  const heldOut = lines.slice(cut, cut + 300).join('\n');
  lmEval = encodeExamples(tok, parseTxt(heldOut).examples);
  heldOutFile = join(root, 'heldout.txt');
  await writeFile(heldOutFile, heldOut);
});

after(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

function sha(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

const LM = { steps: 20, batchSize: 8, seqLen: 64, seed: 7, progress: false } as const;

describe('language modelling', () => {
  test('full fine-tuning: loss and held-out NLL go down; same seed gives the same bytes', async (t) => {
    if (!haveFixtures(t, GGUF, SHAKES)) return;
    const hashes: string[] = [];
    for (let run = 0; run < 2; run++) {
      const { model } = await loadModel(base);
      const r = await trainModel(model, { train: lmTrain, eval: lmEval }, { ...LM });
      const out = join(root, `full-${run}`);
      await saveModelFolder(model, base, out);
      model.dispose();
      hashes.push(sha(await readFile(join(out, 'model.safetensors'))));
      if (run === 0) {
        const first = r.losses.slice(0, 3).reduce((a, b) => a + b) / 3;
        const last = r.losses.slice(-3).reduce((a, b) => a + b) / 3;
        t.diagnostic(`loss ${first.toFixed(3)} -> ${last.toFixed(3)}; held-out NLL ${r.evalBefore!.nll!.toFixed(4)} -> ${r.evalAfter!.nll!.toFixed(4)}; ${Math.round(r.tokensPerSecond)} tokens/s`);
        assert.ok(last < first - 0.5, `training loss falls (${first} -> ${last})`);
        assert.ok(r.evalAfter!.nll! < r.evalBefore!.nll! * 0.8, 'held-out NLL falls by more than 20%');
        assert.equal(r.trainableParameters, 292_800);
        // The written folder evaluates to the same NLL as the model in memory.
        const rep = await evaluateFile(out, heldOutFile);
        assert.equal(rep.task, 'lm');
        if (rep.task === 'lm') assert.ok(Math.abs(rep.nll - r.evalAfter!.nll!) < 1e-6, `${rep.nll} vs ${r.evalAfter!.nll}`);
      }
    }
    assert.equal(hashes[0], hashes[1]);
  });

  test('gradient accumulation over micro-batches matches one batch', async (t) => {
    if (!haveFixtures(t, GGUF, SHAKES)) return;
    const params: Float32Array[][] = [];
    for (const microBatch of [8, 2]) {
      const { model } = await loadModel(base);
      await trainModel(model, { train: lmTrain }, { ...LM, steps: 2, microBatch });
      params.push(model.parameters().map((p) => p.data.slice()));
      model.dispose();
    }
    let maxDiff = 0;
    params[0]!.forEach((a, i) => {
      const b = params[1]![i]!;
      for (let j = 0; j < a.length; j++) maxDiff = Math.max(maxDiff, Math.abs(a[j]! - b[j]!));
    });
    t.diagnostic(`largest parameter difference ${maxDiff.toExponential(2)}`);
    assert.ok(maxDiff < 1e-4, `max difference ${maxDiff}`);
  });

  test('LoRA r=8 on q,v: NLL goes down, the adapter round-trips through readPeftAdapter and eval --adapter', async (t) => {
    if (!haveFixtures(t, GGUF, SHAKES)) return;
    const { model } = await loadModel(base);
    const r = await trainModel(model, { train: lmTrain, eval: lmEval }, { ...LM, lora: { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'] } });
    t.diagnostic(`held-out NLL ${r.evalBefore!.nll!.toFixed(4)} -> ${r.evalAfter!.nll!.toFixed(4)}`);
    assert.ok(r.evalAfter!.nll! < r.evalBefore!.nll! * 0.9);
    assert.equal(r.trainableParameters, 5 * (8 * 64 + 64 * 8) + 5 * (8 * 64 + 32 * 8));
    const out = join(root, 'lora');
    await saveAdapterFolder(model, out, { baseModel: base });
    model.dispose();
    const ad = await readPeftAdapter(out);
    assert.equal(ad.modules.length, 10);
    assert.ok(ad.modules.every((m) => m.rank === 8 && m.scaling === 2));
    assert.equal(ad.config.task_type, 'CAUSAL_LM');
    await ad.close();
    const { model: again } = await loadModel(base, { adapter: out });
    const e = evaluateHeldOut(again, 'lm', lmEval, null);
    again.dispose();
    assert.ok(Math.abs(e.nll! - r.evalAfter!.nll!) < 1e-9, `${e.nll} vs ${r.evalAfter!.nll}`);
  });
});

describe('classification', () => {
  test('LoRA + score head on the domain task learns; adapter saves the head under modules_to_save', async (t) => {
    if (!haveFixtures(t, GGUF, ...DOMAIN)) return;
    const src = await readDomainSources({ tinystories: fixture(DOMAIN[0]!), shakespeare: fixture(DOMAIN[1]!), gsm8kTrain: fixture(DOMAIN[2]!), gsm8kTest: fixture(DOMAIN[3]!) });
    const task = buildDomainTask(src, { trainPerClass: 200, evalPerClass: 40, seed: 1 });
    const train = encodeExamples(tok, task.train, { maxLength: 64 });
    const evalSet = encodeExamples(tok, task.eval, { maxLength: 64 });
    const { model } = await loadModel(base);
    const r = await trainModel(model, { train, eval: evalSet, numLabels: 3 }, { task: 'classify', steps: 30, batchSize: 16, lr: 1e-2, schedule: 'linear', seed: 1, progress: false, lora: { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'] } });
    t.diagnostic(`accuracy ${(100 * r.evalBefore!.accuracy!).toFixed(1)}% -> ${(100 * r.evalAfter!.accuracy!).toFixed(1)}%`);
    assert.ok(r.evalAfter!.accuracy! > 0.7, `accuracy ${r.evalAfter!.accuracy}`);
    const out = join(root, 'cls-lora');
    await saveAdapterFolder(model, out, { head: r.head });
    model.dispose();
    const ad = await readPeftAdapter(out);
    assert.equal(ad.config.task_type, 'SEQ_CLS');
    assert.deepEqual(ad.config.modules_to_save, ['score']);
    assert.deepEqual(
      ad.savedModules.map((s) => [s.name, s.kind]),
      [['base_model.model.score.weight', 'modules_to_save']],
    );
    await ad.close();
    const loaded = await loadModel(base, { adapter: out });
    const e = evaluateHeldOut(loaded.model, 'classify', evalSet, loaded.head);
    loaded.model.dispose();
    assert.equal(e.accuracy, r.evalAfter!.accuracy);
  });
});
