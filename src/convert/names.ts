/**
 * Tensor names of the llama architecture in GGUF, HF and llama2.c (formats.md §5.6).
 */

/** How a tensor's rows are permuted on the way to HF. */
export type QkRole = 'q' | 'k' | undefined;

interface LayerName {
  gguf: string;
  hf: string;
  llama2c: string;
  role?: QkRole;
}

const LAYER_NAMES: LayerName[] = [
  { gguf: 'attn_norm.weight', hf: 'input_layernorm.weight', llama2c: 'rms_att_weight' },
  { gguf: 'attn_q.weight', hf: 'self_attn.q_proj.weight', llama2c: 'wq', role: 'q' },
  { gguf: 'attn_k.weight', hf: 'self_attn.k_proj.weight', llama2c: 'wk', role: 'k' },
  { gguf: 'attn_v.weight', hf: 'self_attn.v_proj.weight', llama2c: 'wv' },
  { gguf: 'attn_output.weight', hf: 'self_attn.o_proj.weight', llama2c: 'wo' },
  { gguf: 'ffn_norm.weight', hf: 'post_attention_layernorm.weight', llama2c: 'rms_ffn_weight' },
  { gguf: 'ffn_gate.weight', hf: 'mlp.gate_proj.weight', llama2c: 'w1' },
  { gguf: 'ffn_up.weight', hf: 'mlp.up_proj.weight', llama2c: 'w3' },
  { gguf: 'ffn_down.weight', hf: 'mlp.down_proj.weight', llama2c: 'w2' },
];

const GLOBAL_NAMES: LayerName[] = [
  { gguf: 'token_embd.weight', hf: 'model.embed_tokens.weight', llama2c: 'token_embedding_table' },
  { gguf: 'output_norm.weight', hf: 'model.norm.weight', llama2c: 'rms_final_weight' },
  { gguf: 'output.weight', hf: 'lm_head.weight', llama2c: 'wcls' },
];

export interface NameMapping {
  /** The name in the target convention. */
  name: string;
  /** 'q' or 'k' when the rows are permuted between conventions. */
  role: QkRole;
}

/** HF name (and Q/K role) of a GGUF llama tensor name, or undefined if it is not one. */
export function ggufNameToHf(name: string): NameMapping | undefined {
  const g = GLOBAL_NAMES.find((n) => n.gguf === name);
  if (g) return { name: g.hf, role: undefined };
  const m = /^blk\.(0|[1-9]\d*)\.(.+)$/.exec(name);
  if (!m) return undefined;
  const l = LAYER_NAMES.find((n) => n.gguf === m[2]);
  return l ? { name: `model.layers.${Number(m[1])}.${l.hf}`, role: l.role } : undefined;
}

/** GGUF name of an HF llama tensor name, or undefined if it is not one. */
export function hfNameToGguf(name: string): NameMapping | undefined {
  const g = GLOBAL_NAMES.find((n) => n.hf === name);
  if (g) return { name: g.gguf, role: undefined };
  const m = /^model\.layers\.(0|[1-9]\d*)\.(.+)$/.exec(name);
  if (!m) return undefined;
  const l = LAYER_NAMES.find((n) => n.hf === m[2]);
  return l ? { name: `blk.${Number(m[1])}.${l.gguf}`, role: l.role } : undefined;
}

/** HF name (and Q/K role) of a llama2.c tensor name, or undefined if it is not one. */
export function llama2cNameToHf(name: string): NameMapping | undefined {
  const g = GLOBAL_NAMES.find((n) => n.llama2c === name);
  if (g) return { name: g.hf, role: undefined };
  const m = /^(.+)\.(0|[1-9]\d*)$/.exec(name);
  if (!m) return undefined;
  const l = LAYER_NAMES.find((n) => n.llama2c === m[1]);
  return l ? { name: `model.layers.${Number(m[2])}.${l.hf}`, role: l.role } : undefined;
}
