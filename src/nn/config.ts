/**
 * The model configuration of a Llama-family decoder, read from a Hugging Face `config.json`
 * (formats.md §3.2). Llama, Mistral and Qwen2 share one forward pass; they differ only in which
 * linear layers carry a bias and in the sliding-window setting.
 */
import { AmalgamError } from '../errors.js';

export interface LlamaConfig {
  /** `model_type` as the config states it (llama, mistral, qwen2). */
  modelType: string;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  ropeTheta: number;
  rmsNormEps: number;
  /** `max_position_embeddings` (the training length; the rope table grows past it on demand). */
  maxPositions: number;
  tieWordEmbeddings: boolean;
  /** q_proj, k_proj and v_proj carry a bias (Qwen2, or Llama `attention_bias`). */
  qkvBias: boolean;
  /** o_proj carries a bias (Llama `attention_bias`). */
  oBias: boolean;
  /** gate_proj, up_proj and down_proj carry a bias (Llama `mlp_bias`). */
  mlpBias: boolean;
  /** Attention span limit in tokens (Mistral / Qwen2 sliding window), or null. */
  slidingWindow: number | null;
  bosTokenId: number | null;
  /** End-of-sequence ids (a config may list several). */
  eosTokenIds: number[];
  padTokenId: number | null;
  /** Labels of a sequence-classification model (`num_labels`, or the size of `id2label`). */
  numLabels: number | null;
}

const SUPPORTED_MODEL_TYPES = ['llama', 'mistral', 'qwen2'];

function has(cfg: Record<string, unknown>, key: string): boolean {
  return Object.prototype.hasOwnProperty.call(cfg, key) && cfg[key] !== null && cfg[key] !== undefined;
}

/**
 * Reads a LlamaConfig from a parsed `config.json`. Missing optional keys take the transformers
 * defaults; anything the runtime cannot honour (another activation, rope scaling, odd head
 * sizes) is an `E_CONFIG` / `E_UNSUPPORTED` error naming the key.
 */
export function parseLlamaConfig(cfg: Record<string, unknown>, file?: string): LlamaConfig {
  const int = (key: string, min: number, fallback?: number): number => {
    if (!has(cfg, key)) {
      if (fallback !== undefined) return fallback;
      throw new AmalgamError('E_CONFIG', 'required key is missing', { file, key });
    }
    const v = cfg[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) {
      throw new AmalgamError('E_CONFIG', `${JSON.stringify(v)} is not an integer ≥ ${min}`, { file, key });
    }
    return v;
  };
  const num = (key: string, fallback: number): number => {
    if (!has(cfg, key)) return fallback;
    const v = cfg[key];
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) {
      throw new AmalgamError('E_CONFIG', `${JSON.stringify(v)} is not a positive number`, { file, key });
    }
    return v;
  };
  const bool = (key: string, fallback: boolean): boolean => {
    if (!has(cfg, key)) return fallback;
    const v = cfg[key];
    if (typeof v !== 'boolean') throw new AmalgamError('E_CONFIG', `${JSON.stringify(v)} is not true or false`, { file, key });
    return v;
  };
  const optId = (key: string): number | null => (has(cfg, key) ? int(key, 0) : null);

  const modelType = typeof cfg['model_type'] === 'string' ? (cfg['model_type'] as string) : 'llama';
  if (!SUPPORTED_MODEL_TYPES.includes(modelType)) {
    throw new AmalgamError('E_UNSUPPORTED', `model_type "${modelType}" is not a Llama-family decoder the runtime can run`, {
      file,
      key: 'model_type',
      hint: `supported: ${SUPPORTED_MODEL_TYPES.join(', ')}`,
    });
  }
  const act = has(cfg, 'hidden_act') ? cfg['hidden_act'] : 'silu';
  if (act !== 'silu') {
    throw new AmalgamError('E_UNSUPPORTED', `hidden_act ${JSON.stringify(act)} is not supported (only silu)`, { file, key: 'hidden_act' });
  }
  const scaling = cfg['rope_scaling'] as Record<string, unknown> | null | undefined;
  if (scaling !== undefined && scaling !== null) {
    const type = scaling['rope_type'] ?? scaling['type'];
    if (type !== 'default') {
      throw new AmalgamError('E_UNSUPPORTED', `rope_scaling of type ${JSON.stringify(type)} is not supported`, {
        file,
        key: 'rope_scaling',
        hint: 'only plain rotary embeddings (rope_scaling null) are implemented',
      });
    }
  }

  const hiddenSize = int('hidden_size', 1);
  const numHeads = int('num_attention_heads', 1);
  const numKvHeads = int('num_key_value_heads', 1, numHeads);
  if (numHeads % numKvHeads !== 0) {
    throw new AmalgamError('E_CONFIG', `num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}`, {
      file,
      key: 'num_key_value_heads',
    });
  }
  if (!has(cfg, 'head_dim') && hiddenSize % numHeads !== 0) {
    throw new AmalgamError('E_CONFIG', `hidden_size ${hiddenSize} is not a multiple of num_attention_heads ${numHeads}`, {
      file,
      key: 'hidden_size',
      hint: 'set head_dim explicitly',
    });
  }
  const headDim = int('head_dim', 1, hiddenSize / numHeads);
  if (headDim % 2 !== 0) throw new AmalgamError('E_CONFIG', `head_dim ${headDim} must be even for rotary embeddings`, { file, key: 'head_dim' });

  const attentionBias = bool('attention_bias', false);
  const qwen2 = modelType === 'qwen2';
  let slidingWindow: number | null = null;
  if (modelType === 'mistral' && has(cfg, 'sliding_window')) slidingWindow = int('sliding_window', 1);
  if (qwen2 && bool('use_sliding_window', false) && has(cfg, 'sliding_window')) slidingWindow = int('sliding_window', 1);

  let eosTokenIds: number[] = [];
  const eos = cfg['eos_token_id'];
  if (Array.isArray(eos)) {
    eosTokenIds = eos.map((v, i) => {
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
        throw new AmalgamError('E_CONFIG', `entry ${i} (${JSON.stringify(v)}) is not a token id`, { file, key: 'eos_token_id' });
      }
      return v;
    });
  } else if (has(cfg, 'eos_token_id')) {
    eosTokenIds = [int('eos_token_id', 0)];
  }

  let numLabels: number | null = has(cfg, 'num_labels') ? int('num_labels', 1) : null;
  const id2label = cfg['id2label'];
  if (numLabels === null && id2label && typeof id2label === 'object' && !Array.isArray(id2label)) {
    const n = Object.keys(id2label).length;
    if (n > 0) numLabels = n;
  }

  return {
    modelType,
    vocabSize: int('vocab_size', 1),
    hiddenSize,
    intermediateSize: int('intermediate_size', 1),
    numLayers: int('num_hidden_layers', 0),
    numHeads,
    numKvHeads,
    headDim,
    ropeTheta: num('rope_theta', 10000),
    rmsNormEps: num('rms_norm_eps', 1e-6),
    maxPositions: int('max_position_embeddings', 1, 2048),
    tieWordEmbeddings: bool('tie_word_embeddings', false),
    qkvBias: qwen2 || attentionBias,
    oBias: attentionBias,
    mlpBias: bool('mlp_bias', false),
    slidingWindow,
    bosTokenId: optId('bos_token_id'),
    eosTokenIds,
    padTokenId: optId('pad_token_id'),
    numLabels,
  };
}

/** A config.json object for a LlamaConfig (the keys parseLlamaConfig reads). */
export function llamaConfigToHf(c: LlamaConfig): Record<string, unknown> {
  const out: Record<string, unknown> = {
    architectures: [c.modelType === 'qwen2' ? 'Qwen2ForCausalLM' : c.modelType === 'mistral' ? 'MistralForCausalLM' : 'LlamaForCausalLM'],
    model_type: c.modelType,
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numHeads,
    num_key_value_heads: c.numKvHeads,
    head_dim: c.headDim,
    max_position_embeddings: c.maxPositions,
    rms_norm_eps: c.rmsNormEps,
    rope_theta: c.ropeTheta,
    hidden_act: 'silu',
    tie_word_embeddings: c.tieWordEmbeddings,
    mlp_bias: c.mlpBias,
  };
  if (c.modelType !== 'qwen2') out['attention_bias'] = c.oBias;
  if (c.bosTokenId !== null) out['bos_token_id'] = c.bosTokenId;
  if (c.eosTokenIds.length) out['eos_token_id'] = c.eosTokenIds.length === 1 ? c.eosTokenIds[0] : c.eosTokenIds;
  if (c.padTokenId !== null) out['pad_token_id'] = c.padTokenId;
  return out;
}

/** A config for tests and experiments: every field explicit, the rest at Llama defaults. */
export function makeLlamaConfig(c: Partial<LlamaConfig> & Pick<LlamaConfig, 'vocabSize' | 'hiddenSize' | 'intermediateSize' | 'numLayers' | 'numHeads'>): LlamaConfig {
  const numKvHeads = c.numKvHeads ?? c.numHeads;
  return {
    modelType: 'llama',
    numKvHeads,
    headDim: c.hiddenSize / c.numHeads,
    ropeTheta: 10000,
    rmsNormEps: 1e-5,
    maxPositions: 512,
    tieWordEmbeddings: false,
    qkvBias: false,
    oBias: false,
    mlpBias: false,
    slidingWindow: null,
    bosTokenId: 1,
    eosTokenIds: [2],
    padTokenId: null,
    numLabels: null,
    ...c,
  };
}
