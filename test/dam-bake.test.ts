/**
 * Baking DAM merges: the baked checkpoint computes the DAM model's logits; the exact-soup start
 * (c = atanh(1/N) under tanh) bakes to the linear merge of `amalgam merge`; the reference start
 * (c = 1/N) does not; mergers.safetensors naming and metadata; re-baking from mergers.safetensors
 * and the sources writes the same bytes; the output folder (shards, index, config, card,
 * tokenizer files); errors for sources that do not fit together.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseMergeConfig } from '../src/config/parse.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { isAmalgamError } from '../src/errors.js';
import { openSafetensors, SafetensorsFile } from '../src/io/safetensors.js';
import { runMerge } from '../src/merge/run.js';
import { LlamaModel } from '../src/nn/model.js';
import { ReferenceBackend } from '../src/backend/reference.js';
import { Rng } from '../src/tensor/rng.js';
import { DamModel } from '../src/dam/model.js';
import { bakeDam, bakeFromMergers, MERGERS_FILE } from '../src/dam/bake.js';

const be = new ReferenceBackend();
let dir: string;
const SMALL: SyntheticLlamaOptions = { hiddenSize: 32, intermediateSize: 48, numHeads: 4, numKvHeads: 2, vocabSize: 64, numLayers: 2, dtype: 'F32' };
const srcs = () => ['a', 'b', 'c'].map((n) => join(dir, n));

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-dam-bake-'));
  for (const [i, n] of ['a', 'b', 'c'].entries()) await writeSyntheticLlama(join(dir, n), { ...SMALL, seed: 11 + i });
  await writeSyntheticLlama(join(dir, 'wide'), { ...SMALL, hiddenSize: 48, seed: 20 });
  await writeFile(join(dir, 'a', 'tokenizer.json'), '{"version": "1.0", "model": {}}\n');
  await writeFile(join(dir, 'a', 'tokenizer_config.json'), '{"model_max_length": 512}\n');
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

function randomise(dam: DamModel, seed: number): void {
  const rng = new Rng(seed);
  for (const p of dam.coefficients()) rng.fillNormal(p.data, 0.3, 0.4);
  dam.coefficientsChanged();
}

function relDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < b.length; i++) {
    diff = Math.max(diff, Math.abs(a[i]! - b[i]!));
    scale = Math.max(scale, Math.abs(b[i]!));
  }
  return diff / scale;
}

const IDS = Int32Array.from({ length: 2 * 9 }, (_, i) => (i * 7 + 3) % 64);

test('the baked checkpoint gives the DAM model’s logits; output folder, card and mergers.safetensors', async (t) => {
  const dam = await DamModel.fromFolders(srcs(), { embeddings: true, norms: true, backend: be });
  randomise(dam, 1);
  const want = Float32Array.from(dam.forward(IDS, 2, 9));
  const out = join(dir, 'baked');
  const r = await bakeDam(dam, out, {
    outShardSize: 40_000,
    info: {
      data: ['shakespeare windows', 'gsm8k windows', 'agnews windows'],
      loss: { objective: 'kl', temperature: 2, cosine: 0.01 },
      optimizer: { kind: 'mofo', lr: 1e-3 },
      steps: 17,
      batchSize: 4,
      seed: 3,
    },
  });
  const files = (await readdir(out)).sort();
  assert.ok(r.weightFiles.length > 2 && files.includes('model.safetensors.index.json'), `expected shards and an index, got ${files.join(', ')}`);
  for (const f of [MERGERS_FILE, 'config.json', 'README.md', 'tokenizer.json', 'tokenizer_config.json']) assert.ok(files.includes(f), `${f} missing`);
  const index = JSON.parse(await readFile(join(out, 'model.safetensors.index.json'), 'utf8'));
  assert.equal(typeof index.metadata.amalgam_version, 'string');

  const baked = await LlamaModel.fromFolder(out, { backend: be });
  const got = baked.forward(IDS, 2, 9);
  const err = relDiff(got, want);
  t.diagnostic(`baked vs DAM logits: max relative difference ${err.toExponential(2)}`);
  assert.ok(err <= 1e-4, `baked logits differ from the DAM model's by ${err}`);
  baked.dispose();

  const cfg = JSON.parse(await readFile(join(out, 'config.json'), 'utf8'));
  assert.equal(cfg.torch_dtype, 'float32');
  assert.equal(cfg.hidden_size, 32);

  const card = await readFile(join(out, 'README.md'), 'utf8');
  for (const s of [srcs()[0]!, srcs()[2]!, 'gsm8k windows', 'KL', 'steps: 17', 'tanh', 'mergers.safetensors', 'arxiv.org/abs/2410.08371']) {
    assert.ok(card.includes(s), `model card lacks "${s}"`);
  }

  const m = await SafetensorsFile.open(join(out, MERGERS_FILE));
  try {
    const names = m.tensors().map((x) => x.name);
    assert.equal(names.length, 3 * (2 * 7 + 1 + 1 + 2 * 2 + 1));
    for (const n of ['model.layers.0.self_attn.q_proj.mergers.0', 'model.layers.1.mlp.down_proj.mergers.2', 'lm_head.mergers.1', 'model.embed_tokens.mergers.0', 'model.layers.0.input_layernorm.mergers.2', 'model.norm.mergers.1']) {
      assert.ok(names.includes(n), `${n} missing from ${MERGERS_FILE}`);
    }
    assert.deepEqual(m.info('model.layers.1.mlp.down_proj.mergers.2').shape, [48]);
    assert.equal(m.info('lm_head.mergers.0').dtype, 'F32');
    const coeff = dam.coefficients().find((p) => p.name === 'model.layers.1.mlp.down_proj.mergers.2')!;
    assert.deepEqual(await m.readF32(coeff.name), coeff.data);
    assert.equal(m.metadata['non_linearity'], 'tanh');
    assert.equal(m.metadata['num_models'], '3');
    assert.deepEqual(JSON.parse(m.metadata['models']!), srcs());
    assert.equal(JSON.parse(m.metadata['loss']!).temperature, 2);
  } finally {
    await m.close();
  }

  // Re-baking from mergers.safetensors and the sources alone gives the same weight bytes.
  const again = join(dir, 'rebaked');
  const r2 = await bakeFromMergers(srcs(), join(out, MERGERS_FILE), again, { outShardSize: 40_000 });
  assert.deepEqual(r2.weightFiles, r.weightFiles);
  for (const f of r.weightFiles) assert.ok((await readFile(join(out, f))).equals(await readFile(join(again, f))), `${f} differs after re-baking`);
  const card2 = await readFile(join(again, 'README.md'), 'utf8');
  assert.ok(card2.includes('gsm8k windows') && card2.includes('steps: 17'), 'the re-baked card lost the recorded run');
  dam.dispose();
});

test('the gated form bakes the same bytes as the materialised form', async () => {
  const bake = async (form: 'gate' | 'materialise') => {
    const dam = await DamModel.fromFolders(srcs(), { form, targets: ['q_proj', 'down_proj', 'lm_head'], backend: be });
    randomise(dam, 2);
    const out = join(dir, `form-${form}`);
    await bakeDam(dam, out, { writeModelCard: false });
    dam.dispose();
    return readFile(join(out, 'model.safetensors'));
  };
  assert.ok((await bake('gate')).equals(await bake('materialise')));
});

test('with every coefficient at atanh(1/N) under tanh the bake is the linear merge; at 1/N it is not', async (t) => {
  const yaml = 'merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: b, parameters: {weight: 1}}\n  - {model: c, parameters: {weight: 1}}\ndtype: float32\n';
  const lin = await runMerge(parseMergeConfig(yaml), join(dir, 'linear'), { baseDir: dir, configYaml: yaml, jobs: 1 });
  const dam = await DamModel.fromFolders(srcs(), { init: 'soup', backend: be });
  for (const p of dam.coefficients()) for (const v of p.data) assert.equal(v, Math.fround(Math.atanh(1 / 3)));
  await bakeDam(dam, join(dir, 'soup'));
  dam.dispose();
  const ref = await DamModel.fromFolders(srcs(), { backend: be });
  for (const p of ref.coefficients()) for (const v of p.data) assert.equal(v, Math.fround(1 / 3));
  await bakeDam(ref, join(dir, 'reference-start'));
  ref.dispose();
  const [x, y, z] = await Promise.all([openSafetensors(lin.outDir), openSafetensors(join(dir, 'soup')), openSafetensors(join(dir, 'reference-start'))]);
  try {
    assert.deepEqual(y!.tensors().map((i) => i.name).sort(), x!.tensors().map((i) => i.name).sort());
    let worst = 0;
    for (const info of x!.tensors()) {
      const a = await x!.readF32(info.name);
      const b = await y!.readF32(info.name);
      worst = Math.max(worst, relDiff(b, a));
      if (/layers\.0\.mlp\.up_proj|lm_head/.test(info.name)) {
        const c = await z!.readF32(info.name);
        const ratio = c[5]! / a[5]!;
        assert.ok(Math.abs(ratio - 3 * Math.tanh(1 / 3)) < 1e-5, `${info.name}: the reference start scales the soup by ${ratio}`);
      }
    }
    t.diagnostic(`soup bake vs linear merge: max relative difference ${worst.toExponential(2)}`);
    assert.ok(worst <= 1e-6, `the exact-soup bake differs from the linear merge by ${worst}`);
  } finally {
    await Promise.all([x, y, z].map((s) => s!.close()));
  }
});

test('sources that do not fit together, bad targets and occupied outputs are refused clearly', async () => {
  await assert.rejects(DamModel.fromFolders([srcs()[0]!, join(dir, 'wide')], { backend: be }), (e) => isAmalgamError(e) && e.code === 'E_ARCH' && /hidden_size/.test(e.message) && e.message.includes('wide'));
  await assert.rejects(DamModel.fromFolders([srcs()[0]!], { backend: be }), (e) => isAmalgamError(e) && e.code === 'E_USAGE' && /at least 2/.test(e.message));
  await assert.rejects(DamModel.fromFolders(srcs(), { targets: ['qproj'], backend: be }), (e) => isAmalgamError(e) && e.code === 'E_USAGE' && /qproj/.test(e.message));
  await assert.rejects(DamModel.fromFolders([srcs()[0]!, join(dir, 'missing')], { backend: be }), (e) => isAmalgamError(e) && e.code === 'E_IO');
  const dam = await DamModel.fromFolders(srcs().slice(0, 2), { backend: be });
  const occupied = join(dir, 'occupied');
  await mkdir(occupied);
  await writeFile(join(occupied, 'x'), 'x');
  await assert.rejects(bakeDam(dam, occupied), (e) => isAmalgamError(e) && e.code === 'E_IO' && /not empty/.test(e.message));
  dam.dispose();
  await assert.rejects(bakeFromMergers(srcs().slice(0, 2), join(dir, 'baked', MERGERS_FILE), join(dir, 'x2')), (e) => isAmalgamError(e) && /for 3 models, 2 source folders/.test(e.message));
});
