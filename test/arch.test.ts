import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { AmalgamError } from '../src/errors.js';
import {
  expandTemplate,
  getArchitecture,
  inferArchitecture,
  listArchitectures,
  registerArchitecture,
  resolveArchitecture,
  unregisterArchitecture,
  type ResolvedArchitecture,
  type TensorLike,
} from '../src/arch/index.js';

const LLAMA_LAYER = [
  'input_layernorm.weight',
  'self_attn.q_proj.weight',
  'self_attn.k_proj.weight',
  'self_attn.v_proj.weight',
  'self_attn.o_proj.weight',
  'post_attention_layernorm.weight',
  'mlp.gate_proj.weight',
  'mlp.up_proj.weight',
  'mlp.down_proj.weight',
];

/** model.embed_tokens, model.layers.N.<suffix> for N < n, model.norm, and lm_head unless tied. */
function decoderNames(n: number, layer: string[], opts: { lmHead?: boolean } = {}): string[] {
  const names = ['model.embed_tokens.weight'];
  for (let i = 0; i < n; i++) for (const s of layer) names.push(`model.layers.${i}.${s}`);
  names.push('model.norm.weight');
  if (opts.lmHead ?? true) names.push('lm_head.weight');
  return names;
}

function expectArchError(fn: () => unknown, code: string, ...needles: string[]): AmalgamError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof AmalgamError, `expected an AmalgamError, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  for (const n of needles) assert.ok(caught.message.includes(n), `message lacks "${n}": ${caught.message}`);
  return caught;
}

function layerNames(r: ResolvedArchitecture, i: number): string[] {
  return r.layers[i]!.map((w) => w.name);
}

describe('registry', () => {
  test('lists the built-in architectures', () => {
    const names = listArchitectures().map((d) => d.name);
    for (const n of ['llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2', 'phi3', 'gpt2']) assert.ok(names.includes(n), n);
  });

  test('finds definitions by name, class name and model_type', () => {
    assert.equal(getArchitecture('llama')?.name, 'llama');
    assert.equal(getArchitecture('Qwen2ForCausalLM')?.name, 'qwen2');
    assert.equal(getArchitecture('gemma2')?.name, 'gemma2');
    assert.equal(getArchitecture('GPT2LMHeadModel')?.name, 'gpt2');
    assert.equal(getArchitecture('NoSuchForCausalLM'), undefined);
  });

  test('definitions are frozen', () => {
    const def = getArchitecture('llama')!;
    assert.throws(() => {
      (def.layer as unknown[]).push({ name: 'x' });
    }, TypeError);
  });

  test('registers, validates and removes custom definitions', () => {
    const def = registerArchitecture({
      name: 'toy',
      modelTypes: ['toy'],
      architectures: ['ToyForCausalLM'],
      numLayersKey: 'depth',
      pre: [{ name: 'tok.weight', isEmbed: true }],
      layer: [{ name: 'blocks.${layer_index}.w' }, { name: 'blocks.${layer_index}.skip_from_${layer_index+1}', optional: true }],
      post: [{ name: 'final.${num_layers}.w' }],
    });
    try {
      const r = resolveArchitecture({ architectures: ['ToyForCausalLM'], depth: 2 }, ['tok.weight', 'blocks.0.w', 'blocks.1.w', 'blocks.0.skip_from_1', 'final.2.w']);
      assert.equal(r.name, 'toy');
      assert.equal(r.numLayers, 2);
      assert.deepEqual(layerNames(r, 1), ['blocks.1.w', 'blocks.1.skip_from_2']);
      assert.deepEqual(r.absent, ['blocks.1.skip_from_2']);
      assert.deepEqual(r.post.map((w) => w.name), ['final.2.w']);
      assert.equal(r.layerOf('blocks.0.skip_from_1'), 0);
      expectArchError(() => registerArchitecture(def), 'E_ARCH', 'already registered');
    } finally {
      assert.equal(unregisterArchitecture('toy'), true);
    }
    assert.equal(getArchitecture('toy'), undefined);
  });

  test('rejects invalid definitions', () => {
    const base = { modelTypes: [], architectures: [], numLayersKey: 'n', pre: [], post: [] };
    expectArchError(() => registerArchitecture({ ...base, name: 'bad1', layer: [{ name: 'blocks.w' }] }), 'E_ARCH', 'blocks.w', 'does not contain ${layer_index}');
    expectArchError(
      () => registerArchitecture({ ...base, name: 'bad2', layer: [{ name: 'b.${layer_index}.w' }], pre: [{ name: 'x.${layer_index}' }] }),
      'E_ARCH',
      'must not contain',
    );
    expectArchError(
      () => registerArchitecture({ ...base, name: 'bad3', layer: [{ name: 'b.${layer_index}.w' }, { name: 'b.${layer_index}.v', aliases: ['b.${layer_index}.w'] }] }),
      'E_ARCH',
      "'b.0.w' is claimed by two weights",
    );
    expectArchError(() => registerArchitecture({ ...base, name: 'bad4', layer: [{ name: 'b.${layer}.w' }] }), 'E_ARCH', 'unknown placeholder ${layer}');
    assert.equal(getArchitecture('bad1'), undefined);
  });

  test('expands templates with offsets and the layer count', () => {
    assert.equal(expandTemplate('a.${layer_index}.b.${layer_index+1}.c${layer_index-1}', 3, 8), 'a.3.b.4.c2');
    assert.equal(expandTemplate('x.${num_layers}', undefined, 8), 'x.8');
  });
});

describe('resolution of the registered architectures', () => {
  test('llama with an untied lm_head', () => {
    const names = decoderNames(3, LLAMA_LAYER);
    const r = resolveArchitecture({ architectures: ['LlamaForCausalLM'], model_type: 'llama', num_hidden_layers: 3, vocab_size: 32, tie_word_embeddings: false }, names);
    assert.equal(r.name, 'llama');
    assert.equal(r.inferred, false);
    assert.match(r.reason, /architectures\[0\] is "LlamaForCausalLM"/);
    assert.equal(r.numLayers, 3);
    assert.equal(r.vocabSize, 32);
    assert.deepEqual(r.pre.map((w) => w.name), ['model.embed_tokens.weight']);
    assert.deepEqual(layerNames(r, 2), LLAMA_LAYER.map((s) => `model.layers.2.${s}`));
    assert.deepEqual(r.post.map((w) => w.name), ['model.norm.weight', 'lm_head.weight']);
    assert.deepEqual(r.embeddings, ['model.embed_tokens.weight', 'lm_head.weight']);
    assert.deepEqual(r.tied, []);
    assert.equal(r.tieWordEmbeddings, false);
    assert.equal(r.weight('lm_head.weight')?.storedName, 'lm_head.weight');
    assert.equal(r.weight('lm_head.weight')?.vocabSizeKey, 'vocab_size');
    assert.equal(r.weights().length, 1 + 3 * 9 + 2);
    assert.equal(r.layerOf('model.layers.2.mlp.down_proj.weight'), 2);
    assert.equal(r.layerOf('model.embed_tokens.weight'), undefined);
    assert.equal(r.layerOf('not.a.tensor'), undefined);
    assert.deepEqual(r.warnings, []);
  });

  test('llama with lm_head tied to the embedding', () => {
    const names = decoderNames(2, LLAMA_LAYER, { lmHead: false });
    const r = resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 2, tie_word_embeddings: true }, names);
    const head = r.weight('lm_head.weight')!;
    assert.equal(head.present, false);
    assert.equal(head.tiedTo, 'model.embed_tokens.weight');
    assert.deepEqual(r.tied, ['lm_head.weight']);
    assert.deepEqual(r.embeddings, ['model.embed_tokens.weight']);
    assert.equal(r.tieWordEmbeddings, true);
    assert.deepEqual(r.warnings, []);
  });

  test('an absent lm_head with tie_word_embeddings false is tied, with a warning', () => {
    const names = decoderNames(1, LLAMA_LAYER, { lmHead: false });
    const r = resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 1, tie_word_embeddings: false }, names);
    assert.equal(r.tieWordEmbeddings, true);
    assert.equal(r.warnings.length, 1);
    assert.match(r.warnings[0]!, /tie_word_embeddings to false, but lm_head\.weight is absent/);
  });

  test('lm_head stored under its alias', () => {
    const names = decoderNames(1, LLAMA_LAYER, { lmHead: false }).concat('model.lm_head.weight');
    const r = resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 1 }, names);
    assert.equal(r.weight('lm_head.weight')?.storedName, 'model.lm_head.weight');
    assert.equal(r.weight('model.lm_head.weight')?.name, 'lm_head.weight');
    assert.deepEqual(r.tied, []);
  });

  test('cached rotary frequencies are ignored', () => {
    const names = decoderNames(2, LLAMA_LAYER).concat('model.layers.0.self_attn.rotary_emb.inv_freq', 'model.layers.1.self_attn.rotary_emb.inv_freq');
    const r = resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 2 }, names);
    assert.deepEqual(r.ignored, ['model.layers.0.self_attn.rotary_emb.inv_freq', 'model.layers.1.self_attn.rotary_emb.inv_freq']);
  });

  test('mistral chosen by model_type alone', () => {
    const r = resolveArchitecture({ model_type: 'mistral', num_hidden_layers: 2 }, decoderNames(2, LLAMA_LAYER));
    assert.equal(r.name, 'mistral');
    assert.match(r.reason, /model_type is "mistral"/);
  });

  test('architectures[0] wins over model_type', () => {
    const r = resolveArchitecture({ architectures: ['MistralForCausalLM'], model_type: 'llama', num_hidden_layers: 1 }, decoderNames(1, LLAMA_LAYER));
    assert.equal(r.name, 'mistral');
  });

  test('qwen2 has q/k/v biases', () => {
    const layer = [...LLAMA_LAYER, 'self_attn.q_proj.bias', 'self_attn.k_proj.bias', 'self_attn.v_proj.bias'];
    const r = resolveArchitecture({ architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2', num_hidden_layers: 2, tie_word_embeddings: true }, decoderNames(2, layer, { lmHead: false }));
    assert.equal(r.name, 'qwen2');
    assert.equal(r.layers[1]!.length, 12);
    for (const p of ['q', 'k', 'v']) assert.ok(layerNames(r, 1).includes(`model.layers.1.self_attn.${p}_proj.bias`), p);
    assert.equal(r.weight('lm_head.weight')?.tiedTo, 'model.embed_tokens.weight');
    // Without the biases the checkpoint is not a qwen2 model.
    expectArchError(
      () => resolveArchitecture({ architectures: ['Qwen2ForCausalLM'], num_hidden_layers: 2 }, decoderNames(2, LLAMA_LAYER)),
      'E_ARCH',
      "6 required tensor(s) of the 'qwen2' architecture are missing",
      'model.layers.0.self_attn.q_proj.bias',
    );
  });

  test('qwen3 has q_norm and k_norm', () => {
    const layer = [...LLAMA_LAYER, 'self_attn.q_norm.weight', 'self_attn.k_norm.weight'];
    const r = resolveArchitecture({ architectures: ['Qwen3ForCausalLM'], num_hidden_layers: 2 }, decoderNames(2, layer));
    assert.equal(r.name, 'qwen3');
    assert.ok(layerNames(r, 0).includes('model.layers.0.self_attn.q_norm.weight'));
    assert.ok(layerNames(r, 1).includes('model.layers.1.self_attn.k_norm.weight'));
    assert.equal(r.layers[0]!.length, 11);
  });

  test('gemma (tied) and gemma2 (extra feed-forward norms)', () => {
    const g = resolveArchitecture({ architectures: ['GemmaForCausalLM'], num_hidden_layers: 2 }, decoderNames(2, LLAMA_LAYER, { lmHead: false }));
    assert.equal(g.name, 'gemma');
    assert.equal(g.tieWordEmbeddings, true);
    const layer2 = [...LLAMA_LAYER, 'pre_feedforward_layernorm.weight', 'post_feedforward_layernorm.weight'];
    const g2 = resolveArchitecture({ architectures: ['Gemma2ForCausalLM'], num_hidden_layers: 3 }, decoderNames(3, layer2, { lmHead: false }));
    assert.equal(g2.name, 'gemma2');
    assert.equal(g2.layers[2]!.length, 11);
    assert.ok(layerNames(g2, 2).includes('model.layers.2.pre_feedforward_layernorm.weight'));
    assert.ok(layerNames(g2, 2).includes('model.layers.2.post_feedforward_layernorm.weight'));
    expectArchError(
      () => resolveArchitecture({ architectures: ['Gemma2ForCausalLM'], num_hidden_layers: 3 }, decoderNames(3, LLAMA_LAYER)),
      'E_ARCH',
      'model.layers.0.pre_feedforward_layernorm.weight',
    );
  });

  test('phi3 has fused qkv_proj and gate_up_proj', () => {
    const layer = ['input_layernorm.weight', 'self_attn.qkv_proj.weight', 'self_attn.o_proj.weight', 'post_attention_layernorm.weight', 'mlp.gate_up_proj.weight', 'mlp.down_proj.weight'];
    const r = resolveArchitecture({ architectures: ['Phi3ForCausalLM'], num_hidden_layers: 2, tie_word_embeddings: false }, decoderNames(2, layer));
    assert.equal(r.name, 'phi3');
    assert.deepEqual(layerNames(r, 1), layer.map((s) => `model.layers.1.${s}`));
    // A llama checkpoint is not a phi3 one: the separate projections are unknown tensors.
    expectArchError(
      () => resolveArchitecture({ architectures: ['Phi3ForCausalLM'], num_hidden_layers: 2 }, decoderNames(2, LLAMA_LAYER)),
      'E_ARCH',
      "tensor(s) do not belong to the 'phi3' architecture",
      'model.layers.0.mlp.gate_proj.weight',
    );
  });

  const GPT2_LAYER = ['ln_1.weight', 'ln_1.bias', 'attn.c_attn.weight', 'attn.c_attn.bias', 'attn.c_proj.weight', 'attn.c_proj.bias', 'ln_2.weight', 'ln_2.bias', 'mlp.c_fc.weight', 'mlp.c_fc.bias', 'mlp.c_proj.weight', 'mlp.c_proj.bias'];
  function gpt2Names(n: number, prefix: string): string[] {
    const names = [`${prefix}wte.weight`, `${prefix}wpe.weight`];
    for (let i = 0; i < n; i++) for (const s of GPT2_LAYER) names.push(`${prefix}h.${i}.${s}`);
    names.push(`${prefix}ln_f.weight`, `${prefix}ln_f.bias`);
    return names;
  }

  test('gpt2 saved without the transformer. prefix, with mask buffers and no lm_head', () => {
    const names = gpt2Names(2, '').concat('h.0.attn.bias', 'h.1.attn.bias', 'h.0.attn.masked_bias');
    const r = resolveArchitecture({ architectures: ['GPT2LMHeadModel'], model_type: 'gpt2', n_layer: 2, vocab_size: 50257 }, names);
    assert.equal(r.name, 'gpt2');
    assert.equal(r.numLayers, 2);
    assert.equal(r.vocabSize, 50257);
    const cattn = r.weight('h.1.attn.c_attn.weight')!;
    assert.equal(cattn.name, 'transformer.h.1.attn.c_attn.weight');
    assert.equal(cattn.storedName, 'h.1.attn.c_attn.weight');
    assert.equal(r.layerOf('h.1.mlp.c_fc.bias'), 1);
    assert.equal(r.layerOf('transformer.h.1.mlp.c_fc.bias'), 1);
    assert.equal(r.weight('lm_head.weight')?.tiedTo, 'wte.weight');
    assert.deepEqual(r.embeddings, ['transformer.wte.weight']);
    assert.deepEqual(r.ignored.sort(), ['h.0.attn.bias', 'h.0.attn.masked_bias', 'h.1.attn.bias']);
    assert.equal(r.tieWordEmbeddings, true);
  });

  test('gpt2 saved from GPT2LMHeadModel with an lm_head', () => {
    const names = gpt2Names(3, 'transformer.').concat('lm_head.weight');
    const r = resolveArchitecture({ architectures: ['GPT2LMHeadModel'], n_layer: 3, tie_word_embeddings: false }, names);
    assert.equal(r.weight('transformer.wte.weight')?.storedName, 'transformer.wte.weight');
    assert.equal(r.weight('lm_head.weight')?.present, true);
    assert.deepEqual(layerNames(r, 2), GPT2_LAYER.map((s) => `transformer.h.2.${s}`));
    assert.deepEqual(r.tied, []);
  });

  test('without tensors: the layout comes from the config alone', () => {
    const r = resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 4 });
    assert.equal(r.numLayers, 4);
    assert.equal(r.layers.length, 4);
    assert.equal(r.weight('lm_head.weight')?.present, undefined);
    assert.deepEqual(r.embeddings, ['model.embed_tokens.weight', 'lm_head.weight']);
    expectArchError(() => resolveArchitecture({ architectures: ['LlamaForCausalLM'] }), 'E_CONFIG', 'num_hidden_layers');
    const fromTensors = resolveArchitecture({ architectures: ['LlamaForCausalLM'] }, decoderNames(2, LLAMA_LAYER));
    assert.equal(fromTensors.numLayers, 2);
    assert.deepEqual(fromTensors.warnings, ['config.json has no "num_hidden_layers"; the tensor names show 2 layer(s)']);
  });

  test('a requested architecture overrides the config', () => {
    const r = resolveArchitecture({ architectures: ['SomethingElse'], num_hidden_layers: 1 }, decoderNames(1, LLAMA_LAYER), { architecture: 'mistral' });
    assert.equal(r.name, 'mistral');
    expectArchError(() => resolveArchitecture({}, [], { architecture: 'nope' }), 'E_ARCH', 'no registered architecture is called "nope"');
  });
});

describe('resolution errors', () => {
  test('unmatched tensors are listed (first five and a count)', () => {
    const extra = ['score.weight', 'extra.a', 'extra.b', 'extra.c', 'extra.d', 'extra.e', 'extra.f'];
    const e = expectArchError(
      () => resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 2 }, decoderNames(2, LLAMA_LAYER).concat(extra), { file: '/m' }),
      'E_ARCH',
      "7 tensor(s) do not belong to the 'llama' architecture: score.weight, extra.a, extra.b, extra.c, extra.d and 2 more",
      'LlamaForCausalLM',
    );
    assert.equal(e.file, '/m');
    assert.equal(e.key, 'score.weight');
  });

  test('allowUnmatched reports them instead', () => {
    const r = resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 1 }, decoderNames(1, LLAMA_LAYER).concat('score.weight'), { allowUnmatched: true });
    assert.deepEqual(r.unmatched, ['score.weight']);
  });

  test('missing required tensors are named', () => {
    const names = decoderNames(2, LLAMA_LAYER).filter((n) => n !== 'model.layers.1.self_attn.k_proj.weight');
    const e = expectArchError(
      () => resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 2 }, names),
      'E_ARCH',
      "1 required tensor(s) of the 'llama' architecture are missing: model.layers.1.self_attn.k_proj.weight",
    );
    assert.equal(e.key, 'model.layers.1.self_attn.k_proj.weight');
  });

  test('layer count differs from the config', () => {
    const fewer = expectArchError(
      () => resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 4 }, decoderNames(3, LLAMA_LAYER)),
      'E_ARCH',
      'config says 4 layers but the checkpoint has tensors for layers 0..2 (3 layers)',
    );
    assert.equal(fewer.key, 'num_hidden_layers');
    expectArchError(
      () => resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 2 }, decoderNames(3, LLAMA_LAYER)),
      'E_ARCH',
      'config says 2 layers',
      'set "num_hidden_layers" to 3',
    );
    expectArchError(() => resolveArchitecture({ architectures: ['LlamaForCausalLM'], num_hidden_layers: 'two' }, []), 'E_CONFIG', '"two"');
  });

  test('a weight stored under two names', () => {
    const names = gpt2Like().concat('wte.weight');
    expectArchError(() => resolveArchitecture({ architectures: ['GPT2LMHeadModel'], n_layer: 1 }, names), 'E_ARCH', 'transformer.wte.weight (transformer.wte.weight and wte.weight)');
  });

  test('an unregistered architecture without tensors', () => {
    expectArchError(() => resolveArchitecture({ architectures: ['MambaForCausalLM'], model_type: 'mamba' }), 'E_ARCH', 'architectures[0] "MambaForCausalLM"', 'no tensor list');
    expectArchError(() => resolveArchitecture([1, 2]), 'E_CONFIG', 'not a JSON object');
  });
});

function gpt2Like(): string[] {
  const names = ['transformer.wte.weight', 'transformer.wpe.weight'];
  for (const s of ['ln_1.weight', 'ln_1.bias', 'attn.c_attn.weight', 'attn.c_attn.bias', 'attn.c_proj.weight', 'attn.c_proj.bias', 'ln_2.weight', 'ln_2.bias', 'mlp.c_fc.weight', 'mlp.c_fc.bias', 'mlp.c_proj.weight', 'mlp.c_proj.bias']) {
    names.push(`transformer.h.0.${s}`);
  }
  names.push('transformer.ln_f.weight', 'transformer.ln_f.bias');
  return names;
}

describe('inference of unknown layouts', () => {
  const V = 100;
  const D = 16;
  function blockNet(n: number, opts: { head?: boolean; extraInLast?: boolean } = {}): TensorLike[] {
    const t: TensorLike[] = [
      { name: 'encoder.blocks.0.attn.qkv.weight', shape: [3 * D, D] }, // deliberately before the embedding
      { name: 'encoder.embed.weight', shape: [V, D] },
      { name: 'encoder.pos_embed', shape: [1, 8, D] },
    ];
    for (let i = 0; i < n; i++) {
      if (i > 0) t.push({ name: `encoder.blocks.${i}.attn.qkv.weight`, shape: [3 * D, D] });
      t.push({ name: `encoder.blocks.${i}.norm.weight`, shape: [D] }, { name: `encoder.blocks.${i}.mlp.fc1.weight`, shape: [4 * D, D] }, { name: `encoder.blocks.${i}.mlp.fc2.weight`, shape: [D, 4 * D] });
    }
    if (opts.extraInLast) t.push({ name: `encoder.blocks.${n - 1}.adapter.weight`, shape: [D, D] });
    t.push({ name: 'encoder.final_norm.weight', shape: [D] });
    if (opts.head ?? true) t.push({ name: 'head.weight', shape: [V, D] });
    return t;
  }

  test('a made-up encoder.blocks.N model', () => {
    const r = inferArchitecture(blockNet(3, { extraInLast: true }), { architectures: ['BlockNetForLM'], vocab_size: V });
    assert.equal(r.inferred, true);
    assert.equal(r.name, 'BlockNetForLM');
    assert.equal(r.numLayers, 3);
    assert.deepEqual(r.definition.layer.map((w) => w.name), [
      'encoder.blocks.${layer_index}.attn.qkv.weight',
      'encoder.blocks.${layer_index}.norm.weight',
      'encoder.blocks.${layer_index}.mlp.fc1.weight',
      'encoder.blocks.${layer_index}.mlp.fc2.weight',
      'encoder.blocks.${layer_index}.adapter.weight',
    ]);
    assert.deepEqual(layerNames(r, 1).slice(0, 4), ['encoder.blocks.1.attn.qkv.weight', 'encoder.blocks.1.norm.weight', 'encoder.blocks.1.mlp.fc1.weight', 'encoder.blocks.1.mlp.fc2.weight']);
    assert.deepEqual(r.absent, ['encoder.blocks.0.adapter.weight', 'encoder.blocks.1.adapter.weight']);
    assert.equal(r.weight('encoder.blocks.2.adapter.weight')?.present, true);
    assert.deepEqual(r.pre.map((w) => w.name), ['encoder.embed.weight', 'encoder.pos_embed']);
    assert.deepEqual(r.post.map((w) => w.name), ['encoder.final_norm.weight', 'head.weight']);
    assert.deepEqual(r.embeddings, ['encoder.embed.weight', 'head.weight']);
    assert.equal(r.tieWordEmbeddings, false);
    assert.equal(r.layerOf('encoder.blocks.2.mlp.fc1.weight'), 2);
    assert.equal(r.layerOf('encoder.embed.weight'), undefined);
    assert.ok(r.warnings.some((w) => w.includes('only some layers')));
  });

  test('through resolveArchitecture when the config names an unregistered class', () => {
    const r = resolveArchitecture({ architectures: ['BlockNetForLM'], model_type: 'blocknet', vocab_size: V, num_hidden_layers: 2 }, blockNet(2));
    assert.equal(r.inferred, true);
    assert.match(r.reason, /architectures\[0\] "BlockNetForLM", model_type "blocknet", which has no registered definition; the layout was inferred/);
    assert.equal(r.numLayers, 2);
    assert.deepEqual(r.warnings, []);
  });

  test('an absent head means tied embeddings; tie_word_embeddings ties a present one', () => {
    const noHead = inferArchitecture(blockNet(2, { head: false }), { vocab_size: V });
    assert.equal(noHead.name, 'inferred');
    assert.equal(noHead.tieWordEmbeddings, true);
    assert.deepEqual(noHead.embeddings, ['encoder.embed.weight']);
    const tied = inferArchitecture(blockNet(2), { vocab_size: V, tie_word_embeddings: true });
    const head = tied.weight('head.weight')!;
    assert.equal(head.optional, true);
    assert.deepEqual(head.tiedNames, ['encoder.embed.weight']);
    assert.equal(tied.tieWordEmbeddings, true);
  });

  test('embeddings by first dimension, not by name', () => {
    const r = inferArchitecture(
      [
        { name: 'tok.table', shape: [V, D] },
        { name: 'net.layers.0.w', shape: [D, D] },
        { name: 'net.layers.1.w', shape: [D, D] },
        { name: 'net.out_norm', shape: [D] },
        { name: 'lm_head.weight', shape: [V, D] },
      ],
      { vocab_size: V },
    );
    assert.deepEqual(r.embeddings, ['tok.table', 'lm_head.weight']);
    assert.deepEqual(r.pre.map((w) => w.name), ['tok.table']);
    assert.deepEqual(r.post.map((w) => w.name), ['net.out_norm', 'lm_head.weight']);
  });

  test('a llama checkpoint infers the llama templates', () => {
    const names = decoderNames(2, LLAMA_LAYER).map((name) => ({ name, shape: name.includes('embed') || name.startsWith('lm_head') ? [32, 8] : [8, 8] }));
    const r = inferArchitecture(names, { vocab_size: 32 });
    assert.deepEqual(r.definition.layer.map((w) => w.name), LLAMA_LAYER.map((s) => `model.layers.\${layer_index}.${s}`));
    assert.deepEqual(r.pre.map((w) => w.name), ['model.embed_tokens.weight']);
    assert.deepEqual(r.post.map((w) => w.name), ['model.norm.weight', 'lm_head.weight']);
  });

  test('a second numbered stack becomes individual weights, with a warning', () => {
    const t = blockNet(3).concat({ name: 'vision.layers.0.w', shape: [D, D] }, { name: 'vision.layers.1.w', shape: [D, D] });
    const r = inferArchitecture(t, { vocab_size: V });
    assert.equal(r.numLayers, 3);
    assert.ok(r.post.some((w) => w.name === 'vision.layers.1.w'));
    assert.equal(r.layerOf('vision.layers.1.w'), undefined);
    assert.ok(r.warnings.some((w) => w.includes("'vision.layers.N'")));
  });

  test('config layer count that disagrees is a warning', () => {
    const r = inferArchitecture(blockNet(2), { vocab_size: V, num_hidden_layers: 5 });
    assert.ok(r.warnings.some((w) => w.includes('"num_hidden_layers" is 5, but the tensor names show 2 layer(s)')));
  });

  test('a gap in the layer indices is an error naming the layer', () => {
    const t = blockNet(4).filter((x) => !x.name.startsWith('encoder.blocks.2.'));
    const e = expectArchError(() => inferArchitecture(t, { vocab_size: V }), 'E_ARCH', "layer 2 of 'encoder.blocks' has no tensors");
    assert.equal(e.key, 'encoder.blocks.2');
  });

  test('no tensors at all', () => {
    expectArchError(() => inferArchitecture([], {}), 'E_ARCH', 'no tensors');
  });
});
