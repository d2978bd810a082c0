import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import { writeSafetensorsFile, type TensorData } from '../src/io/safetensors.js';
import { encodeFromF32, type DType } from '../src/tensor/dtype.js';
import { isPeftAdapterFolder, loraModuleParams, parseLoraConfig, readPeftAdapter, targetsModule, type LoraModule } from '../src/io/peft.js';

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'amalgam-peft-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

let counter = 0;
const P = 'base_model.model.';
const H = 16;

function tensor(name: string, shape: number[], fill = 0, dtype: DType = 'F32'): TensorData {
  const n = shape.reduce((a, b) => a * b, 1);
  if (dtype === 'I32') return { name, dtype, shape, data: new Uint8Array(4 * n) };
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = fill + i / 8;
  return { name, dtype, shape, data: encodeFromF32(dtype, v) };
}

/** lora_A [r, in] and lora_B [out, r] for a linear module. */
function linear(path: string, r: number, inF = H, outF = H, rB = r): TensorData[] {
  return [tensor(`${P}${path}.lora_A.weight`, [r, inF], 1), tensor(`${P}${path}.lora_B.weight`, [outF, rB], 2)];
}

function baseConfig(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    base_model_name_or_path: 'toy/llama',
    r: 4,
    lora_alpha: 8,
    target_modules: ['q_proj', 'v_proj'],
    lora_dropout: 0.05,
    bias: 'none',
    fan_in_fan_out: false,
    use_rslora: false,
    modules_to_save: null,
    rank_pattern: {},
    alpha_pattern: {},
    init_lora_weights: true,
    inference_mode: true,
    megatron_config: null,
    some_future_key: { nested: [1, 2, 3] },
    ...extra,
  };
}

async function adapterDir(config: Record<string, unknown> | string | undefined, tensors: TensorData[] | undefined): Promise<string> {
  const dir = join(root, `adapter-${counter++}`);
  await mkdir(dir);
  if (config !== undefined) await writeFile(join(dir, 'adapter_config.json'), typeof config === 'string' ? config : JSON.stringify(config, null, 2));
  if (tensors) await writeSafetensorsFile(join(dir, 'adapter_model.safetensors'), tensors);
  return dir;
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

function byPath(mods: LoraModule[], path: string): LoraModule {
  const m = mods.find((x) => x.path === path);
  assert.ok(m, `no module ${path}`);
  return m;
}

describe('readPeftAdapter', () => {
  test('pairs factors, reads shapes and computes s = alpha / r', async () => {
    const tensors = [0, 1].flatMap((i) => [...linear(`model.layers.${i}.self_attn.q_proj`, 4), ...linear(`model.layers.${i}.self_attn.v_proj`, 4, H, 8)]);
    const dir = await adapterDir(baseConfig(), tensors);
    assert.equal(await isPeftAdapterFolder(dir), true);
    const a = await readPeftAdapter(dir);
    try {
      assert.equal(a.config.r, 4);
      assert.equal(a.config.lora_alpha, 8);
      assert.deepEqual(a.config.target_modules, ['q_proj', 'v_proj']);
      assert.equal(a.config.task_type, 'CAUSAL_LM');
      assert.equal(a.config.base_model_name_or_path, 'toy/llama');
      assert.equal(JSON.stringify(a.config['some_future_key']), '{"nested":[1,2,3]}');
      assert.equal(a.modules.length, 4);
      const v1 = byPath(a.modules, 'model.layers.1.self_attn.v_proj');
      assert.deepEqual(v1, {
        path: 'model.layers.1.self_attn.v_proj',
        target: 'model.layers.1.self_attn.v_proj.weight',
        kind: 'linear',
        aName: `${P}model.layers.1.self_attn.v_proj.lora_A.weight`,
        bName: `${P}model.layers.1.self_attn.v_proj.lora_B.weight`,
        rank: 4,
        inFeatures: H,
        outFeatures: 8,
        alpha: 8,
        scaling: 2,
        fanInFanOut: false,
        deltaShape: [8, H],
      });
      assert.deepEqual(a.savedModules, []);
      const aVals = await a.source.readF32(v1.aName);
      assert.equal(aVals.length, 4 * H);
      assert.equal(aVals[3], 1 + 3 / 8);
    } finally {
      await a.close();
    }
  });

  test('rslora: s = alpha / sqrt(r)', async () => {
    const dir = await adapterDir(baseConfig({ r: 16, lora_alpha: 8, use_rslora: true }), linear('model.layers.0.self_attn.q_proj', 16));
    const a = await readPeftAdapter(dir);
    assert.equal(a.modules[0]!.scaling, 2);
    assert.equal(a.modules[0]!.rank, 16);
    await a.close();
  });

  test('rank_pattern and alpha_pattern override r and alpha per module', async () => {
    const cfg = baseConfig({ r: 8, lora_alpha: 16, rank_pattern: { 'layers.1.self_attn.q_proj': 2, down_proj: 4 }, alpha_pattern: { 'v_proj': 32, 'model.layers.1.mlp.down_proj': 2 } });
    const tensors = [
      ...linear('model.layers.0.self_attn.q_proj', 8),
      ...linear('model.layers.1.self_attn.q_proj', 2),
      ...linear('model.layers.0.self_attn.v_proj', 8),
      ...linear('model.layers.0.mlp.down_proj', 4, 32, H),
      ...linear('model.layers.1.mlp.down_proj', 4, 32, H),
    ];
    const a = await readPeftAdapter(await adapterDir(cfg, tensors));
    try {
      const get = (p: string) => byPath(a.modules, p);
      assert.deepEqual([get('model.layers.0.self_attn.q_proj').rank, get('model.layers.0.self_attn.q_proj').scaling], [8, 2]);
      assert.deepEqual([get('model.layers.1.self_attn.q_proj').rank, get('model.layers.1.self_attn.q_proj').scaling], [2, 8]);
      assert.deepEqual([get('model.layers.0.self_attn.v_proj').alpha, get('model.layers.0.self_attn.v_proj').scaling], [32, 4]);
      assert.deepEqual([get('model.layers.0.mlp.down_proj').rank, get('model.layers.0.mlp.down_proj').scaling], [4, 4]);
      assert.deepEqual([get('model.layers.1.mlp.down_proj').alpha, get('model.layers.1.mlp.down_proj').scaling], [2, 0.5]);
      assert.equal(get('model.layers.1.mlp.down_proj').inFeatures, 32);
    } finally {
      await a.close();
    }
    // 'q_proj' must match a whole path segment: 'xq_proj' is not matched.
    const parsed = parseLoraConfig(baseConfig({ rank_pattern: { q_proj: 2 } }));
    assert.equal(loraModuleParams(parsed, 'model.layers.0.attn.xq_proj').rank, 4);
    assert.equal(loraModuleParams(parsed, 'model.layers.0.attn.q_proj').rank, 2);
  });

  test('embedding factors, fan_in_fan_out, modules_to_save and biases', async () => {
    const cfg = baseConfig({ fan_in_fan_out: true, modules_to_save: ['score'], bias: 'lora_only', target_modules: ['c_attn', 'embed_tokens'] });
    const tensors = [
      tensor(`${P}model.embed_tokens.lora_embedding_A`, [4, 50]),
      tensor(`${P}model.embed_tokens.lora_embedding_B`, [H, 4]),
      ...linear('transformer.h.0.attn.c_attn', 4, H, 3 * H),
      tensor(`${P}transformer.h.0.attn.c_attn.bias`, [3 * H]),
      tensor(`${P}score.weight`, [2, H]),
      tensor(`${P}lm_head.weight`, [50, H]),
    ];
    const a = await readPeftAdapter(await adapterDir(cfg, tensors));
    try {
      const emb = byPath(a.modules, 'model.embed_tokens');
      assert.equal(emb.kind, 'embedding');
      assert.equal(emb.target, 'model.embed_tokens.weight');
      assert.deepEqual([emb.inFeatures, emb.outFeatures], [50, H]);
      assert.deepEqual(emb.deltaShape, [50, H]);
      assert.equal(emb.fanInFanOut, false);
      const attn = byPath(a.modules, 'transformer.h.0.attn.c_attn');
      assert.equal(attn.fanInFanOut, true);
      assert.deepEqual(attn.deltaShape, [H, 3 * H]);
      assert.deepEqual(
        a.savedModules.map((s) => [s.target, s.kind]),
        [
          ['lm_head.weight', 'embedding'],
          ['score.weight', 'modules_to_save'],
          ['transformer.h.0.attn.c_attn.bias', 'bias'],
        ],
      );
      assert.equal(a.savedModules[1]!.name, `${P}score.weight`);
    } finally {
      await a.close();
    }
  });

  test('target_modules as a list or a regex', () => {
    const list = parseLoraConfig(baseConfig({ exclude_modules: ['layers.3.self_attn.q_proj'] }));
    assert.equal(targetsModule(list, 'model.layers.0.self_attn.q_proj'), true);
    assert.equal(targetsModule(list, 'model.layers.0.self_attn.k_proj'), false);
    assert.equal(targetsModule(list, 'model.layers.3.self_attn.q_proj'), false);
    const re = parseLoraConfig(baseConfig({ target_modules: '.*\\.(q|v)_proj' }));
    assert.equal(re.target_modules, '.*\\.(q|v)_proj');
    assert.equal(targetsModule(re, 'model.layers.0.self_attn.v_proj'), true);
    assert.equal(targetsModule(re, 'model.layers.0.self_attn.o_proj'), false);
  });

  test('defaults for keys PEFT may omit', () => {
    const c = parseLoraConfig({ peft_type: 'LORA', r: 2, lora_alpha: 4, use_dora: null });
    assert.equal(c.use_rslora, false);
    assert.equal(c.fan_in_fan_out, false);
    assert.equal(c.bias, 'none');
    assert.deepEqual(c.rank_pattern, {});
    assert.deepEqual(c.alpha_pattern, {});
    assert.equal(c.use_dora, false);
  });

  test('isPeftAdapterFolder', async () => {
    assert.equal(await isPeftAdapterFolder(join(root, 'missing')), false);
    assert.equal(await isPeftAdapterFolder(await adapterDir(undefined, [])), false);
  });
});

describe('adapter errors', () => {
  test('missing adapter_config.json', async () => {
    const dir = await adapterDir(undefined, linear('q', 4));
    const e = await expectError(readPeftAdapter(dir), 'E_MISSING', 'no adapter_config.json');
    assert.equal(e.key, 'adapter_config.json');
    await writeFile(join(dir, 'config.json'), '{}');
    await expectError(readPeftAdapter(dir), 'E_MISSING', 'full model folder');
    await expectError(readPeftAdapter(join(root, 'nope')), 'E_IO', 'does not exist');
  });

  test('only adapter_model.bin', async () => {
    const dir = await adapterDir(baseConfig(), undefined);
    await writeFile(join(dir, 'adapter_model.bin'), 'x');
    await expectError(readPeftAdapter(dir), 'E_UNSUPPORTED', 'adapter_model.bin', 'legacy PyTorch pickle', 'convert it to safetensors');
    await rm(join(dir, 'adapter_model.bin'));
    await expectError(readPeftAdapter(dir), 'E_MISSING', 'no adapter_model.safetensors');
  });

  test('config problems name the key', async () => {
    const cases: [Record<string, unknown> | string, string, string, string | undefined][] = [
      [baseConfig({ peft_type: 'IA3' }), 'E_UNSUPPORTED', 'only LoRA adapters', 'peft_type'],
      [baseConfig({ peft_type: undefined }), 'E_CONFIG', 'missing "peft_type"', 'peft_type'],
      [baseConfig({ use_dora: true }), 'E_UNSUPPORTED', 'DoRA', 'use_dora'],
      [baseConfig({ lora_bias: true }), 'E_UNSUPPORTED', 'lora_bias', 'lora_bias'],
      [baseConfig({ r: 'eight' }), 'E_CONFIG', 'invalid value "eight"', 'r'],
      [baseConfig({ r: 0 }), 'E_CONFIG', 'invalid value 0', 'r'],
      [baseConfig({ bias: 'some' }), 'E_CONFIG', 'invalid value "some"', 'bias'],
      [baseConfig({ rank_pattern: { q_proj: -1 } }), 'E_CONFIG', 'invalid value -1', 'rank_pattern.q_proj'],
      [baseConfig({ rank_pattern: { '(q_proj': 2 } }), 'E_CONFIG', 'not a valid regular expression', 'rank_pattern.(q_proj'],
      [baseConfig({ target_modules: 42 }), 'E_CONFIG', 'invalid value 42', 'target_modules'],
      ['{"peft_type": "LORA", "r": 4,', 'E_CONFIG', 'not valid JSON', undefined],
    ];
    for (const [cfg, code, needle, key] of cases) {
      const dir = await adapterDir(cfg, linear('q', 4));
      const e = await expectError(readPeftAdapter(dir), code, needle);
      assert.equal(e.key, key, e.message);
      assert.equal(e.file, join(dir, 'adapter_config.json'));
    }
  });

  test('lora_A without lora_B names both tensors', async () => {
    const dir = await adapterDir(baseConfig(), [tensor(`${P}model.layers.0.self_attn.q_proj.lora_A.weight`, [4, H]), ...linear('model.layers.0.self_attn.v_proj', 4)]);
    const e = await expectError(readPeftAdapter(dir), 'E_MISSING', "lora_A has no partner: 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' is missing");
    assert.equal(e.key, `${P}model.layers.0.self_attn.q_proj.lora_A.weight`);
    const dir2 = await adapterDir(baseConfig(), [tensor(`${P}emb.lora_embedding_B`, [H, 4])]);
    await expectError(readPeftAdapter(dir2), 'E_MISSING', "'base_model.model.emb.lora_embedding_A' is missing");
  });

  test('rank mismatch between A and B', async () => {
    const dir = await adapterDir(baseConfig(), linear('model.layers.0.self_attn.q_proj', 4, H, H, 2));
    const e = await expectError(readPeftAdapter(dir), 'E_SHAPE', 'rank mismatch: lora_B has shape [16,2] (rank 2)', 'has shape [4,16] (rank 4)');
    assert.equal(e.key, `${P}model.layers.0.self_attn.q_proj.lora_B.weight`);
    assert.equal(e.file, join(dir, 'adapter_model.safetensors'));
  });

  test('rank differs from the config', async () => {
    const dir = await adapterDir(baseConfig({ r: 8 }), linear('model.layers.0.self_attn.q_proj', 4));
    const e = await expectError(readPeftAdapter(dir), 'E_SHAPE', 'tensor rank 4 (shape [4,16]) differs from the configured rank 8 ("r")');
    assert.equal(e.key, `${P}model.layers.0.self_attn.q_proj.lora_A.weight`);
    const dir2 = await adapterDir(baseConfig({ rank_pattern: { q_proj: 2 } }), linear('model.layers.0.self_attn.q_proj', 4));
    await expectError(readPeftAdapter(dir2), 'E_SHAPE', 'configured rank 2 (rank_pattern "q_proj")');
  });

  test('DoRA magnitude vectors, non-float factors, conv factors, odd names', async () => {
    const dora = await adapterDir(baseConfig(), [...linear('q', 4), tensor(`${P}q.lora_magnitude_vector`, [H])]);
    await expectError(readPeftAdapter(dora), 'E_UNSUPPORTED', 'DoRA magnitude vectors');
    const ints = await adapterDir(baseConfig(), [tensor(`${P}q.lora_A.weight`, [4, H], 0, 'I32'), tensor(`${P}q.lora_B.weight`, [H, 4])]);
    await expectError(readPeftAdapter(ints), 'E_DTYPE', 'dtype I32');
    const conv = await adapterDir(baseConfig(), [tensor(`${P}c.lora_A.weight`, [4, 3, 1, 1]), tensor(`${P}c.lora_B.weight`, [8, 4, 1, 1])]);
    await expectError(readPeftAdapter(conv), 'E_UNSUPPORTED', 'only 2-D factors');
    const odd = await adapterDir(baseConfig(), [...linear('q', 4), tensor(`${P}q.lora_A.default.weight`, [4, H])]);
    await expectError(readPeftAdapter(odd), 'E_FORMAT', 'unrecognised LoRA tensor name');
    const empty = await adapterDir(baseConfig(), []);
    await expectError(readPeftAdapter(empty), 'E_FORMAT', 'holds no tensors');
  });
});
