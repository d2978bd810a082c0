/**
 * Built-in architecture definitions. Names follow the Hugging Face transformers checkpoints of
 * each family; all matrices are stored [out, in] except GPT-2's Conv1D weights ([in, out]).
 */
import type { ArchitectureDef, WeightDef } from './types.js';

const L = '${layer_index}';

const EMBED = 'model.embed_tokens.weight';
/** Cached rotary frequencies that some older checkpoints store; not parameters. */
const ROTARY_BUFFER = '\\.rotary_emb\\.inv_freq$';

function w(name: string, extra: Omit<WeightDef, 'name'> = {}): WeightDef {
  return { name, ...extra };
}

/** `model.layers.N.<suffix>` for each suffix. */
function layerWeights(suffixes: string[]): WeightDef[] {
  return suffixes.map((s) => w(`model.layers.${L}.${s}`));
}

const PRE_EMBED: WeightDef[] = [w(EMBED, { isEmbed: true })];

/** Final norm and an lm_head that may be absent when tied to the input embedding. */
const POST_NORM_HEAD: WeightDef[] = [
  w('model.norm.weight'),
  w('lm_head.weight', { isEmbed: true, optional: true, aliases: ['model.lm_head.weight'], tiedNames: [EMBED] }),
];

const ATTN_QKVO = ['self_attn.q_proj.weight', 'self_attn.k_proj.weight', 'self_attn.v_proj.weight', 'self_attn.o_proj.weight'];
const MLP_GATED = ['mlp.gate_proj.weight', 'mlp.up_proj.weight', 'mlp.down_proj.weight'];

function llamaLike(name: string, modelTypes: string[], architectures: string[], layer: string[]): ArchitectureDef {
  return {
    name,
    modelTypes,
    architectures,
    numLayersKey: 'num_hidden_layers',
    vocabSizeKey: 'vocab_size',
    pre: PRE_EMBED,
    layer: layerWeights(layer),
    post: POST_NORM_HEAD,
    ignore: [ROTARY_BUFFER],
  };
}

const LLAMA_LAYER = ['input_layernorm.weight', ...ATTN_QKVO, 'post_attention_layernorm.weight', ...MLP_GATED];

export const LLAMA = llamaLike('llama', ['llama'], ['LlamaForCausalLM', 'LLaMAForCausalLM', 'LLaMaForCausalLM'], LLAMA_LAYER);

export const MISTRAL = llamaLike('mistral', ['mistral'], ['MistralForCausalLM'], LLAMA_LAYER);

export const QWEN2 = llamaLike('qwen2', ['qwen2'], ['Qwen2ForCausalLM'], [
  'input_layernorm.weight',
  'self_attn.q_proj.weight',
  'self_attn.q_proj.bias',
  'self_attn.k_proj.weight',
  'self_attn.k_proj.bias',
  'self_attn.v_proj.weight',
  'self_attn.v_proj.bias',
  'self_attn.o_proj.weight',
  'post_attention_layernorm.weight',
  ...MLP_GATED,
]);

export const QWEN3 = llamaLike('qwen3', ['qwen3'], ['Qwen3ForCausalLM'], [
  'input_layernorm.weight',
  'self_attn.q_proj.weight',
  'self_attn.k_proj.weight',
  'self_attn.v_proj.weight',
  'self_attn.o_proj.weight',
  'self_attn.q_norm.weight',
  'self_attn.k_norm.weight',
  'post_attention_layernorm.weight',
  ...MLP_GATED,
]);

export const GEMMA = llamaLike('gemma', ['gemma'], ['GemmaForCausalLM'], LLAMA_LAYER);

export const GEMMA2 = llamaLike('gemma2', ['gemma2'], ['Gemma2ForCausalLM'], [
  'input_layernorm.weight',
  ...ATTN_QKVO,
  'post_attention_layernorm.weight',
  'pre_feedforward_layernorm.weight',
  ...MLP_GATED,
  'post_feedforward_layernorm.weight',
]);

export const PHI3 = llamaLike('phi3', ['phi3'], ['Phi3ForCausalLM'], [
  'input_layernorm.weight',
  'self_attn.qkv_proj.weight',
  'self_attn.o_proj.weight',
  'post_attention_layernorm.weight',
  'mlp.gate_up_proj.weight',
  'mlp.down_proj.weight',
]);

/**
 * GPT-2. Checkpoints saved from `GPT2LMHeadModel` use the `transformer.` prefix; the original
 * OpenAI conversion (`GPT2Model`) does not, so every name has the unprefixed form as an alias.
 */
function gpt2Weight(name: string, extra: Omit<WeightDef, 'name'> = {}): WeightDef {
  return w(`transformer.${name}`, { ...extra, aliases: [name, ...(extra.aliases ?? [])] });
}

export const GPT2: ArchitectureDef = {
  name: 'gpt2',
  modelTypes: ['gpt2'],
  architectures: ['GPT2LMHeadModel', 'GPT2Model'],
  numLayersKey: 'n_layer',
  vocabSizeKey: 'vocab_size',
  pre: [gpt2Weight('wte.weight', { isEmbed: true }), gpt2Weight('wpe.weight')],
  layer: [
    'ln_1.weight',
    'ln_1.bias',
    'attn.c_attn.weight',
    'attn.c_attn.bias',
    'attn.c_proj.weight',
    'attn.c_proj.bias',
    'ln_2.weight',
    'ln_2.bias',
    'mlp.c_fc.weight',
    'mlp.c_fc.bias',
    'mlp.c_proj.weight',
    'mlp.c_proj.bias',
  ].map((s) => gpt2Weight(`h.${L}.${s}`)),
  post: [
    gpt2Weight('ln_f.weight'),
    gpt2Weight('ln_f.bias'),
    w('lm_head.weight', { isEmbed: true, optional: true, tiedNames: ['transformer.wte.weight', 'wte.weight'] }),
  ],
  // Causal-mask buffers stored by older transformers versions.
  ignore: ['(^|\\.)h\\.\\d+\\.attn\\.(masked_)?bias$'],
};

export const BUILTIN_ARCHITECTURES: readonly ArchitectureDef[] = [LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, PHI3, GPT2];
