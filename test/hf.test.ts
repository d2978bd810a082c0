import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import { ShardedSafetensorsWriter, writeSafetensorsFile, type TensorSpec } from '../src/io/safetensors.js';
import {
  HF_EXTRA_FILES,
  getConfigDtype,
  getConfigDtypeName,
  getNumHiddenLayers,
  getTieWordEmbeddings,
  getVocabSize,
  openModelFolder,
  readHfConfig,
  setConfigDtype,
} from '../src/io/hf.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'amalgam-hf-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

let counter = 0;
async function newDir(name: string): Promise<string> {
  const d = join(root, `${name}-${counter++}`);
  await mkdir(d);
  return d;
}

const H = 8;
const V = 32;
const LAYER = ['input_layernorm.weight', 'self_attn.q_proj.weight', 'self_attn.k_proj.weight', 'self_attn.v_proj.weight', 'self_attn.o_proj.weight', 'post_attention_layernorm.weight', 'mlp.gate_proj.weight', 'mlp.up_proj.weight', 'mlp.down_proj.weight'];

function llamaSpecs(layers: number, tied = false): TensorSpec[] {
  const specs: TensorSpec[] = [{ name: 'model.embed_tokens.weight', dtype: 'F32', shape: [V, H] }];
  for (let i = 0; i < layers; i++) {
    for (const s of LAYER) specs.push({ name: `model.layers.${i}.${s}`, dtype: 'F32', shape: s.includes('norm') ? [H] : [H, H] });
  }
  specs.push({ name: 'model.norm.weight', dtype: 'F32', shape: [H] });
  if (!tied) specs.push({ name: 'lm_head.weight', dtype: 'F32', shape: [V, H] });
  return specs;
}

/** Value of element j of the tensor at position k: distinct per tensor and element. */
function values(k: number, n: number): Float32Array {
  const out = new Float32Array(n);
  for (let j = 0; j < n; j++) out[j] = k + j / 1024;
  return out;
}

async function writeWeights(dir: string, specs: TensorSpec[], maxShardBytes?: number): Promise<string[]> {
  const w = await ShardedSafetensorsWriter.create(dir, specs, { maxShardBytes });
  for (const [k, s] of specs.entries()) await w.writeF32(s.name, values(k, s.shape.reduce((a, b) => a * b, 1)));
  return (await w.finish()).files;
}

function llamaConfig(layers: number, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { architectures: ['LlamaForCausalLM'], model_type: 'llama', num_hidden_layers: layers, vocab_size: V, hidden_size: H, torch_dtype: 'float32', ...extra };
}

async function writeJson(path: string, v: unknown): Promise<void> {
  await writeFile(path, JSON.stringify(v, null, 2));
}

async function expectError(p: Promise<unknown>, code: string, ...needles: string[]): Promise<AmalgamError> {
  let caught: unknown;
  try {
    await p;
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof AmalgamError, `expected an AmalgamError, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  for (const n of needles) assert.ok(caught.message.includes(n), `message lacks "${n}": ${caught.message}`);
  return caught;
}

describe('openModelFolder', () => {
  test('a sharded checkpoint with tokenizer files', async () => {
    const dir = await newDir('sharded');
    const specs = llamaSpecs(3);
    const files = await writeWeights(dir, specs, 1200);
    assert.ok(files.length > 2, `expected several shards, got ${files.length}`);
    await writeJson(join(dir, 'config.json'), llamaConfig(3));
    for (const f of ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json', 'chat_template.jinja']) await writeFile(join(dir, f), '{}');
    await writeFile(join(dir, 'README.md'), '# model');

    const m = await openModelFolder(dir);
    try {
      assert.equal(m.dir, dir);
      assert.equal(m.configPath, join(dir, 'config.json'));
      assert.equal(m.config['num_hidden_layers'], 3);
      assert.equal(m.architecture.name, 'llama');
      assert.equal(m.architecture.numLayers, 3);
      assert.equal(m.architecture.vocabSize, V);
      assert.equal(m.source.tensors().length, specs.length);
      assert.deepEqual(m.extraFiles, ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json', 'chat_template.jinja']);
      assert.deepEqual(m.weightFiles, ['model.safetensors.index.json', ...files.slice().sort()]);
      assert.deepEqual(
        (await readdir(dir)).filter((f) => f.endsWith('.safetensors')).sort(),
        files.slice().sort(),
      );
      const k = specs.findIndex((s) => s.name === 'model.layers.2.mlp.up_proj.weight');
      const got = await m.source.readF32('model.layers.2.mlp.up_proj.weight');
      assert.deepEqual(got, values(k, H * H));
    } finally {
      await m.close();
    }
  });

  test('a single model.safetensors with a tied embedding', async () => {
    const dir = await newDir('single');
    await writeWeights(dir, llamaSpecs(2, true));
    await writeJson(join(dir, 'config.json'), llamaConfig(2, { tie_word_embeddings: true }));
    await writeFile(join(dir, 'tokenizer.model'), 'x');
    const m = await openModelFolder(dir);
    try {
      assert.deepEqual(m.weightFiles, ['model.safetensors']);
      assert.deepEqual(m.extraFiles, ['tokenizer.model']);
      assert.equal(m.architecture.weight('lm_head.weight')?.tiedTo, 'model.embed_tokens.weight');
      assert.equal(m.architecture.tieWordEmbeddings, true);
      const emb = await m.source.readF32('model.embed_tokens.weight');
      assert.equal(emb[0], 0);
      assert.equal(emb[1], 1 / 1024);
    } finally {
      await m.close();
    }
  });

  test('an unregistered architecture is inferred', async () => {
    const dir = await newDir('inferred');
    const specs: TensorSpec[] = [
      { name: 'net.tok.weight', dtype: 'F32', shape: [V, H] },
      { name: 'net.blocks.0.w', dtype: 'F32', shape: [H, H] },
      { name: 'net.blocks.1.w', dtype: 'F32', shape: [H, H] },
      { name: 'net.final.weight', dtype: 'F32', shape: [H] },
    ];
    await writeWeights(dir, specs);
    await writeJson(join(dir, 'config.json'), { architectures: ['NetForCausalLM'], vocab_size: V });
    const m = await openModelFolder(dir);
    try {
      assert.equal(m.architecture.inferred, true);
      assert.equal(m.architecture.numLayers, 2);
      assert.deepEqual(m.architecture.embeddings, ['net.tok.weight']);
    } finally {
      await m.close();
    }
  });

  test('architecture mismatches name the folder and the tensors', async () => {
    const dir = await newDir('mismatch');
    await writeWeights(dir, llamaSpecs(2).concat({ name: 'score.weight', dtype: 'F32', shape: [2, H] }));
    await writeJson(join(dir, 'config.json'), llamaConfig(2));
    const e = await expectError(openModelFolder(dir), 'E_ARCH', 'score.weight');
    assert.equal(e.file, dir);
    const m = await openModelFolder(dir, { allowUnmatched: true });
    assert.deepEqual(m.architecture.unmatched, ['score.weight']);
    await m.close();
  });

  test('missing folder, file instead of folder', async () => {
    await expectError(openModelFolder(join(root, 'nope')), 'E_IO', 'model folder does not exist');
    const f = join(await newDir('file'), 'model.safetensors');
    await writeSafetensorsFile(f, []);
    await expectError(openModelFolder(f), 'E_IO', 'expected a model folder', 'pass the folder that contains this file');
  });

  test('no config.json', async () => {
    const dir = await newDir('noconfig');
    await writeWeights(dir, llamaSpecs(1));
    const e = await expectError(openModelFolder(dir), 'E_MISSING', 'no config.json', 'copy it from the model');
    assert.equal(e.key, 'config.json');
    await writeJson(join(dir, 'adapter_config.json'), { peft_type: 'LORA' });
    await expectError(openModelFolder(dir), 'E_MISSING', 'PEFT adapter folder');
  });

  test('config.json that is not JSON, not an object, or has a duplicate key', async () => {
    const dir = await newDir('badconfig');
    await writeWeights(dir, llamaSpecs(1));
    await writeFile(join(dir, 'config.json'), '{"architectures": ["LlamaForCausalLM"],');
    const e1 = await expectError(openModelFolder(dir), 'E_CONFIG', 'not valid JSON');
    assert.equal(e1.file, join(dir, 'config.json'));
    await writeFile(join(dir, 'config.json'), '[1, 2]');
    await expectError(openModelFolder(dir), 'E_CONFIG', 'must hold a JSON object, found an array');
    await writeFile(join(dir, 'config.json'), '{"vocab_size": 1, "vocab_size": 2}');
    const e3 = await expectError(openModelFolder(dir), 'E_CONFIG', '"vocab_size" appears more than once');
    assert.equal(e3.key, 'vocab_size');
    await writeFile(join(dir, 'config.json'), '{"rope_theta": Infinity}');
    await expectError(openModelFolder(dir), 'E_CONFIG', 'NaN and Infinity are not JSON');
  });

  test('only legacy pytorch_model*.bin weights', async () => {
    const dir = await newDir('bin');
    await writeJson(join(dir, 'config.json'), llamaConfig(1));
    await writeFile(join(dir, 'pytorch_model-00001-of-00002.bin'), 'x');
    await writeFile(join(dir, 'pytorch_model-00002-of-00002.bin'), 'x');
    await writeJson(join(dir, 'pytorch_model.bin.index.json'), { weight_map: {} });
    const e = await expectError(openModelFolder(dir), 'E_UNSUPPORTED', 'legacy PyTorch pickle', 'pytorch_model-00001-of-00002.bin', 'convert them to safetensors first');
    assert.equal(e.file, dir);
  });

  test('safetensors shards without their index, other names, adapters, no weights', async () => {
    const dir = await newDir('noindex');
    await writeJson(join(dir, 'config.json'), llamaConfig(1));
    await expectError(openModelFolder(dir), 'E_MISSING', 'no weights in the model folder');
    await writeSafetensorsFile(join(dir, 'consolidated.safetensors'), []);
    await expectError(openModelFolder(dir), 'E_MISSING', 'found consolidated.safetensors');
    await writeSafetensorsFile(join(dir, 'model-00001-of-00002.safetensors'), []);
    await expectError(openModelFolder(dir), 'E_MISSING', 'no model.safetensors.index.json', 'copy the index file');
    const ad = await newDir('adapter');
    await writeJson(join(ad, 'config.json'), llamaConfig(1));
    await writeSafetensorsFile(join(ad, 'adapter_model.safetensors'), []);
    await expectError(openModelFolder(ad), 'E_MISSING', 'PEFT adapter');
    const tf = await newDir('tf');
    await writeJson(join(tf, 'config.json'), llamaConfig(1));
    await writeFile(join(tf, 'tf_model.h5'), 'x');
    await expectError(openModelFolder(tf), 'E_UNSUPPORTED', 'TensorFlow/Flax');
  });

  test('the stories260K expert fixtures open as llama models', async (t) => {
    const rel = 'experts/stories260K-agnews';
    if (!haveFixtures(t, `${rel}/config.json`, `${rel}/model.safetensors`)) return;
    const m = await openModelFolder(fixture(rel));
    try {
      assert.equal(m.architecture.name, 'llama');
      assert.equal(m.architecture.inferred, false);
      assert.equal(m.architecture.numLayers, 5);
      assert.equal(m.architecture.vocabSize, 512);
      assert.equal(m.source.tensors().length, 48);
      assert.deepEqual(m.architecture.tied, []);
      assert.deepEqual(m.architecture.embeddings, ['model.embed_tokens.weight', 'lm_head.weight']);
      assert.deepEqual(m.extraFiles, ['tokenizer.json', 'tokenizer_config.json']);
      assert.deepEqual(m.weightFiles, ['model.safetensors']);
      assert.equal(getConfigDtype(m.config), 'F32');
      assert.deepEqual(m.source.info('model.layers.4.mlp.gate_proj.weight').shape, [172, 64]);
    } finally {
      await m.close();
    }
  });

  test('the extra-files list covers tokenizers and generation settings', () => {
    for (const f of ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model', 'vocab.json', 'merges.txt', 'vocab.txt', 'added_tokens.json', 'generation_config.json', 'chat_template.jinja', 'chat_template.json', 'preprocessor_config.json']) {
      assert.ok((HF_EXTRA_FILES as readonly string[]).includes(f), f);
    }
  });
});

describe('config.json helpers', () => {
  test('readHfConfig from a folder or a file', async () => {
    const dir = await newDir('cfg');
    await writeFile(join(dir, 'config.json'), '\ufeff' + JSON.stringify(llamaConfig(7)));
    assert.equal((await readHfConfig(dir))['num_hidden_layers'], 7);
    assert.equal((await readHfConfig(join(dir, 'config.json')))['vocab_size'], V);
    await expectError(readHfConfig(await newDir('empty')), 'E_MISSING', 'no config.json');
    await expectError(readHfConfig(join(root, 'missing')), 'E_IO');
  });

  test('dtype: dtype wins over torch_dtype; writing sets both', () => {
    assert.equal(getConfigDtype({ torch_dtype: 'bfloat16' }), 'BF16');
    assert.equal(getConfigDtype({ dtype: 'float16', torch_dtype: 'float32' }), 'F16');
    assert.equal(getConfigDtypeName({ dtype: 'float16', torch_dtype: 'float32' }), 'float16');
    assert.equal(getConfigDtype({ torch_dtype: 'torch.float32' }), 'F32');
    assert.equal(getConfigDtype({}), undefined);
    const e = (() => {
      try {
        getConfigDtype({ dtype: 'int4' }, { file: 'c.json' });
      } catch (err) {
        return err as AmalgamError;
      }
      return undefined;
    })();
    assert.equal(e?.code, 'E_CONFIG');
    assert.equal(e?.key, 'dtype');
    const cfg: Record<string, unknown> = { torch_dtype: 'float32' };
    setConfigDtype(cfg, 'BF16');
    assert.deepEqual(cfg, { torch_dtype: 'bfloat16', dtype: 'bfloat16' });
    setConfigDtype(cfg, 'float16');
    assert.equal(cfg['dtype'], 'float16');
    assert.equal(cfg['torch_dtype'], 'float16');
    assert.throws(() => setConfigDtype(cfg, 'int8'), (err: unknown) => err instanceof AmalgamError && err.code === 'E_USAGE');
  });

  test('vocab_size, num_hidden_layers, tie_word_embeddings', () => {
    const cfg = llamaConfig(5, { tie_word_embeddings: true });
    assert.equal(getVocabSize(cfg), V);
    assert.equal(getNumHiddenLayers(cfg), 5);
    assert.equal(getTieWordEmbeddings(cfg), true);
    assert.equal(getVocabSize({}), undefined);
    assert.equal(getNumHiddenLayers({ num_hidden_layers: 0 }), 0);
    assert.equal(getTieWordEmbeddings({}), undefined);
    assert.throws(() => getVocabSize({ vocab_size: 0 }, { file: 'c.json' }), (e: unknown) => e instanceof AmalgamError && e.code === 'E_CONFIG' && e.key === 'vocab_size' && e.message.includes('c.json'));
    assert.throws(() => getNumHiddenLayers({ num_hidden_layers: 2.5 }), (e: unknown) => e instanceof AmalgamError && e.key === 'num_hidden_layers');
    assert.throws(() => getTieWordEmbeddings({ tie_word_embeddings: 'yes' }), (e: unknown) => e instanceof AmalgamError && e.key === 'tie_word_embeddings');
  });
});
