/**
 * Adapters as PEFT writes them: embedding layers saved next to their LoRA factors
 * (`<module>.base_layer.weight`, or `<module>.weight` before the base_layer wrapper), biases of
 * wrapped layers (`<module>.base_layer.bias`), and config keys whose adapters cannot be baked as
 * W + s·B·A (layer_replication, PiSSA / OLoRA / CorDA / LoftQ initialisation, trainable tokens,
 * activated LoRA, QA-LoRA), plus layers_to_transform / layers_pattern.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { PEFT_PREFIX, readPeftAdapter } from '../src/io/peft.js';
import { openSafetensors, writeSafetensorsFile, type TensorData } from '../src/io/safetensors.js';
import type { TensorSource } from '../src/io/source.js';
import { bakeAdapter, checkAdapterForModel } from '../src/lora/apply.js';
import { combineAdapters } from '../src/lora/combine.js';
import { encodeFromF32 } from '../src/tensor/dtype.js';
import { loadModel } from '../src/train/checkpoint.js';
import { Rng } from '../src/tensor/rng.js';

const SMALL: SyntheticLlamaOptions = { hiddenSize: 16, intermediateSize: 24, numHeads: 4, numKvHeads: 2, vocabSize: 32, numLayers: 2 };
const H = 16;
const V = 32;
const P = PEFT_PREFIX;
let root: string;
let base: string;
let counter = 0;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'amalgam-peft-compat-'));
  base = join(root, 'base');
  await writeSyntheticLlama(base, { ...SMALL, seed: 5, dtype: 'F32' });
});

after(async () => {
  await rm(root, { recursive: true, force: true });
});

function randn(n: number, seed: number, scale = 0.5): Float32Array {
  return new Rng(seed).fillNormal(new Float32Array(n), scale);
}

function t(name: string, shape: number[], data: Float32Array): TensorData {
  return { name, dtype: 'F32', shape, data: encodeFromF32('F32', data) };
}

function config(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    base_model_name_or_path: 'toy/llama',
    r: 2,
    lora_alpha: 4,
    target_modules: ['q_proj', 'v_proj'],
    lora_dropout: 0,
    bias: 'none',
    fan_in_fan_out: false,
    use_rslora: false,
    modules_to_save: null,
    rank_pattern: {},
    alpha_pattern: {},
    init_lora_weights: true,
    inference_mode: true,
    layers_to_transform: null,
    layers_pattern: null,
    layer_replication: null,
    use_dora: false,
    ...extra,
  };
}

async function adapter(cfg: Record<string, unknown>, tensors: TensorData[]): Promise<string> {
  const dir = join(root, `adapter-${counter++}`);
  await mkdir(dir);
  await writeFile(join(dir, 'adapter_config.json'), JSON.stringify(cfg, null, 2));
  await writeSafetensorsFile(join(dir, 'adapter_model.safetensors'), tensors, { format: 'pt' });
  return dir;
}

async function readTensor(dir: string, name: string): Promise<Float32Array> {
  const s: TensorSource = await openSafetensors(dir);
  try {
    return (await s.readF32(name)).slice();
  } finally {
    await s.close();
  }
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
  assert.ok(!caught.message.includes('\n'), `one line: ${caught.message}`);
  for (const n of needles) assert.ok(caught.message.includes(n), `message lacks "${n}": ${caught.message}`);
  return caught;
}

/** fround(W + s·(B·A)ᵀ) for an embedding: A [r, num], B [dim, r], W [num, dim]. */
function embeddingBake(w: Float32Array, a: Float32Array, b: Float32Array, r: number, num: number, dim: number, s: number): Float32Array {
  const out = new Float32Array(w.length);
  for (let i = 0; i < num; i++) {
    for (let d = 0; d < dim; d++) {
      let acc = 0;
      for (let k = 0; k < r; k++) acc += b[d * r + k]! * a[k * num + i]!;
      out[i * dim + d] = w[i * dim + d]! + s * acc;
    }
  }
  return out;
}

/** fround(W + s·B·A) for a linear layer: A [r, in], B [out, r], W [out, in]. */
function linearBake(w: Float32Array, a: Float32Array, b: Float32Array, r: number, inF: number, outF: number, s: number): Float32Array {
  const out = new Float32Array(w.length);
  for (let o = 0; o < outF; o++) {
    for (let i = 0; i < inF; i++) {
      let acc = 0;
      for (let k = 0; k < r; k++) acc += b[o * r + k]! * a[k * inF + i]!;
      out[o * inF + i] = w[o * inF + i]! + s * acc;
    }
  }
  return out;
}

const EMB = 'model.embed_tokens';
const Q0 = 'model.layers.0.self_attn.q_proj';

describe('embedding layers saved with their LoRA factors', () => {
  test('PEFT >= 0.7: <module>.base_layer.weight is the weight the LoRA update is added to', async () => {
    const baseEmb = await readTensor(base, `${EMB}.weight`);
    const savedEmb = baseEmb.map((v, i) => v + (i % 7) / 64);
    const a = randn(2 * V, 1);
    const b = randn(H * 2, 2);
    const qa = randn(2 * H, 3);
    const qb = randn(H * 2, 4);
    const dir = await adapter(config({ target_modules: ['q_proj', 'embed_tokens'] }), [
      t(`${P}${EMB}.base_layer.weight`, [V, H], savedEmb),
      t(`${P}${EMB}.lora_embedding_A`, [2, V], a),
      t(`${P}${EMB}.lora_embedding_B`, [H, 2], b),
      t(`${P}${Q0}.lora_A.weight`, [2, H], qa),
      t(`${P}${Q0}.lora_B.weight`, [H, 2], qb),
    ]);
    const out = join(root, `baked-${counter++}`);
    const r = await bakeAdapter(base, dir, out);
    assert.equal(r.loraModules, 2);
    assert.equal(r.replaced, 0);
    assert.deepEqual(await readTensor(out, `${EMB}.weight`), embeddingBake(savedEmb, a, b, 2, V, H, 2));
    assert.deepEqual(await readTensor(out, `${Q0}.weight`), linearBake(await readTensor(base, `${Q0}.weight`), qa, qb, 2, H, H, 2));
    assert.deepEqual(await readTensor(out, 'lm_head.weight'), await readTensor(base, 'lm_head.weight'));
  });

  test('lm_head targeted: lm_head.base_layer.weight plus s·B·A', async () => {
    const baseHead = await readTensor(base, 'lm_head.weight');
    const a = randn(2 * H, 5);
    const b = randn(V * 2, 6);
    const dir = await adapter(config({ target_modules: ['lm_head'] }), [
      t(`${P}lm_head.base_layer.weight`, [V, H], baseHead),
      t(`${P}lm_head.lora_A.weight`, [2, H], a),
      t(`${P}lm_head.lora_B.weight`, [V, 2], b),
    ]);
    const out = join(root, `baked-${counter++}`);
    await bakeAdapter(base, dir, out);
    assert.deepEqual(await readTensor(out, 'lm_head.weight'), linearBake(baseHead, a, b, 2, H, V, 2));
  });

  test('PEFT < 0.7: the embedding saved under its plain name next to its factors', async () => {
    const baseEmb = await readTensor(base, `${EMB}.weight`);
    const a = randn(2 * V, 7);
    const b = randn(H * 2, 8);
    const dir = await adapter(config({ target_modules: ['embed_tokens'] }), [
      t(`${P}${EMB}.weight`, [V, H], baseEmb),
      t(`${P}${EMB}.lora_embedding_A`, [2, V], a),
      t(`${P}${EMB}.lora_embedding_B`, [H, 2], b),
    ]);
    const ad = await readPeftAdapter(dir);
    try {
      assert.equal(ad.modules.length, 1);
      assert.equal(ad.modules[0]!.baseName, `${P}${EMB}.weight`);
      assert.deepEqual(ad.savedModules, []);
    } finally {
      await ad.close();
    }
    const out = join(root, `baked-${counter++}`);
    await bakeAdapter(base, dir, out);
    assert.deepEqual(await readTensor(out, `${EMB}.weight`), embeddingBake(baseEmb, a, b, 2, V, H, 2));
  });

  test('a saved embedding of another vocabulary size is refused with the resize hint', async () => {
    const dir = await adapter(config({ target_modules: ['embed_tokens'] }), [
      t(`${P}${EMB}.base_layer.weight`, [V + 2, H], randn((V + 2) * H, 9)),
      t(`${P}${EMB}.lora_embedding_A`, [2, V + 2], randn(2 * (V + 2), 10)),
      t(`${P}${EMB}.lora_embedding_B`, [H, 2], randn(H * 2, 11)),
    ]);
    const s = await openSafetensors(base);
    await expectError(checkAdapterForModel(s, dir), 'E_SHAPE', `${EMB}.weight`, 'resize');
    await s.close();
  });

  test('bias "all": biases of wrapped layers (<module>.base_layer.bias) replace the base bias', async () => {
    const dir = await adapter(config({ bias: 'all' }), [
      t(`${P}${Q0}.base_layer.bias`, [H], randn(H, 12)),
      t(`${P}${Q0}.lora_A.weight`, [2, H], randn(2 * H, 13)),
      t(`${P}${Q0}.lora_B.weight`, [H, 2], randn(H * 2, 14)),
    ]);
    const ad = await readPeftAdapter(dir);
    try {
      assert.deepEqual(ad.savedModules, [{ name: `${P}${Q0}.base_layer.bias`, target: `${Q0}.bias`, kind: 'bias' }]);
    } finally {
      await ad.close();
    }
  });

  test('combine keeps the saved base weight of an embedding module, and the result bakes the same', async () => {
    const baseEmb = await readTensor(base, `${EMB}.weight`);
    const a = randn(2 * V, 15);
    const b = randn(H * 2, 16);
    const dir = await adapter(config({ target_modules: ['embed_tokens'] }), [
      t(`${P}${EMB}.base_layer.weight`, [V, H], baseEmb),
      t(`${P}${EMB}.lora_embedding_A`, [2, V], a),
      t(`${P}${EMB}.lora_embedding_B`, [H, 2], b),
    ]);
    const combined = join(root, `combined-${counter++}`);
    const r = await combineAdapters([{ dir, weight: 1 }], combined, { method: 'cat' });
    assert.deepEqual(r.savedTensors, []);
    const cfg = JSON.parse(await readFile(join(combined, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
    assert.equal(cfg['modules_to_save'], null);
    const ad = await readPeftAdapter(combined);
    try {
      assert.equal(ad.modules[0]!.baseName, `${P}${EMB}.base_layer.weight`);
    } finally {
      await ad.close();
    }
    const out1 = join(root, `baked-${counter++}`);
    const out2 = join(root, `baked-${counter++}`);
    await bakeAdapter(base, dir, out1);
    await bakeAdapter(base, combined, out2);
    const w1 = await readTensor(out1, `${EMB}.weight`);
    const w2 = await readTensor(out2, `${EMB}.weight`);
    for (let i = 0; i < w1.length; i++) assert.ok(Math.abs(w1[i]! - w2[i]!) <= 1e-6 * Math.max(1, Math.abs(w1[i]!)), `element ${i}: ${w1[i]} vs ${w2[i]}`);
  });
});

describe('config keys an adapter cannot be baked with', () => {
  const lin = () => [t(`${P}${Q0}.lora_A.weight`, [2, H], randn(2 * H, 20)), t(`${P}${Q0}.lora_B.weight`, [H, 2], randn(H * 2, 21))];

  test('layer_replication', async () => {
    const dir = await adapter(config({ layer_replication: [[0, 2], [1, 2]] }), lin());
    await expectError(bakeAdapter(base, dir, join(root, `out-${counter++}`)), 'E_UNSUPPORTED', 'adapter_config.json', "'layer_replication'", 'merge_and_unload');
  });

  for (const init of ['pissa', 'pissa_niter_4', 'olora', 'corda', 'loftq']) {
    test(`init_lora_weights "${init}"`, async () => {
      const dir = await adapter(config({ init_lora_weights: init }), lin());
      await expectError(readPeftAdapter(dir), 'E_UNSUPPORTED', 'adapter_config.json', "'init_lora_weights'", 'path_initial_model_for_weight_conversion');
    });
  }

  test('initialisations that leave the base weights alone are read', async () => {
    for (const init of [true, false, 'gaussian', 'eva', 'orthogonal']) {
      const ad = await readPeftAdapter(await adapter(config({ init_lora_weights: init }), lin()));
      assert.equal(ad.modules[0]!.scaling, 2);
      await ad.close();
    }
  });

  test('trainable_token_indices, alora_invocation_tokens, use_qalora', async () => {
    const tt = await adapter(config({ trainable_token_indices: [3, 5] }), lin());
    await expectError(readPeftAdapter(tt), 'E_UNSUPPORTED', "'trainable_token_indices'");
    const alora = await adapter(config({ alora_invocation_tokens: [10, 11] }), lin());
    await expectError(readPeftAdapter(alora), 'E_UNSUPPORTED', "'alora_invocation_tokens'");
    const qa = await adapter(config({ use_qalora: true, qalora_group_size: 16 }), lin());
    await expectError(readPeftAdapter(qa), 'E_UNSUPPORTED', "'use_qalora'");
    // Null or empty values, as PEFT writes by default, are fine.
    const plain = await adapter(config({ trainable_token_indices: null, alora_invocation_tokens: null, use_qalora: false, layer_replication: [] }), lin());
    const ad = await readPeftAdapter(plain);
    assert.equal(ad.modules.length, 1);
    await ad.close();
  });
});

describe('layers_to_transform', () => {
  const q = (layer: number, seed: number) => [
    t(`${P}model.layers.${layer}.self_attn.q_proj.lora_A.weight`, [2, H], randn(2 * H, seed)),
    t(`${P}model.layers.${layer}.self_attn.q_proj.lora_B.weight`, [H, 2], randn(H * 2, seed + 1)),
  ];

  test('factors of a layer the list leaves out are refused, as PEFT would not load them', async () => {
    const dir = await adapter(config({ layers_to_transform: [0] }), [...q(0, 30), ...q(1, 32)]);
    await expectError(bakeAdapter(base, dir, join(root, `out-${counter++}`)), 'E_CONFIG', 'model.layers.1.self_attn.q_proj', 'layers_to_transform [0]', 'layer 1');
    const one = await adapter(config({ layers_to_transform: 1, layers_pattern: 'layers' }), q(0, 34));
    await expectError(bakeAdapter(base, one, join(root, `out-${counter++}`)), 'E_CONFIG', 'layers_to_transform 1 with layers_pattern "layers"', 'layer 0');
    const pattern = await adapter(config({ layers_to_transform: [0, 1], layers_pattern: 'blocks' }), q(0, 36));
    await expectError(bakeAdapter(base, pattern, join(root, `out-${counter++}`)), 'E_CONFIG', 'has none');
  });

  test('modules in the listed layers are baked', async () => {
    const dir = await adapter(config({ layers_to_transform: [1], layers_pattern: ['h', 'layers'] }), q(1, 38));
    const out = join(root, `baked-${counter++}`);
    const r = await bakeAdapter(base, dir, out);
    assert.equal(r.loraModules, 1);
    const name = 'model.layers.1.self_attn.q_proj.weight';
    assert.deepEqual(await readTensor(out, name), linearBake(await readTensor(base, name), randn(2 * H, 38), randn(H * 2, 39), 2, H, H, 2));
  });
});

test('a folder of named adapters (save_pretrained of adapters not named "default") names them', async () => {
  const top = join(root, `named-${counter++}`);
  await mkdir(top);
  const lin = [t(`${P}${Q0}.lora_A.weight`, [2, H], randn(2 * H, 40)), t(`${P}${Q0}.lora_B.weight`, [H, 2], randn(H * 2, 41))];
  for (const name of ['math', 'code']) {
    await mkdir(join(top, name));
    await writeFile(join(top, name, 'adapter_config.json'), JSON.stringify(config()));
    await writeSafetensorsFile(join(top, name, 'adapter_model.safetensors'), lin);
  }
  await expectError(readPeftAdapter(top), 'E_MISSING', "'adapter_config.json'", `pass one of: ${join(top, 'code')}, ${join(top, 'math')}`);
  const ad = await readPeftAdapter(join(top, 'math'));
  assert.equal(ad.modules[0]!.path, Q0);
  await ad.close();
});

for (const [what, savedName, shift] of [
  ['a saved embedding equal to the base one (PEFT < 0.7 name)', `${P}${EMB}.weight`, 0],
  ['a saved embedding that differs from the base one (base_layer)', `${P}${EMB}.base_layer.weight`, 1 / 16],
] as const) test(`eval --adapter: ${what} next to its factors gives the baked model's logits`, async () => {
  const baseEmb = (await readTensor(base, `${EMB}.weight`)).map((v, i) => v + shift * ((i % 5) - 2));
  const dir = await adapter(config({ target_modules: ['embed_tokens'] }), [
    t(savedName, [V, H], baseEmb),
    t(`${P}${EMB}.lora_embedding_A`, [2, V], randn(2 * V, 50, 2)),
    t(`${P}${EMB}.lora_embedding_B`, [H, 2], randn(H * 2, 51, 2)),
  ]);
  const baked = join(root, `baked-${counter++}`);
  await bakeAdapter(base, dir, baked);
  const logits = async (model: string, ad?: string) => {
    const { model: m } = await loadModel(model, ad ? { adapter: ad } : {});
    try {
      const ids = [1, 5, 9, 3, 17, 30, 2, 8];
      return Float32Array.from(m.forward(ids, 1, ids.length));
    } finally {
      m.dispose();
    }
  };
  const want = await logits(baked);
  const got = await logits(base, dir);
  const plain = await logits(base);
  let err = 0;
  let moved = 0;
  for (let i = 0; i < want.length; i++) {
    err = Math.max(err, Math.abs(got[i]! - want[i]!));
    moved = Math.max(moved, Math.abs(plain[i]! - want[i]!));
  }
  assert.ok(moved > 1e-3, `the adapter changes the logits (${moved})`);
  assert.ok(err < 1e-5, `max |logit difference| ${err}`);
});
