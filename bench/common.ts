/**
 * Pieces the I/O and merge benchmarks share: the TinyLlama-1.1B-shaped BF16 checkpoint layout,
 * a name hash for content seeds, `cat` timing, and option and size formatting.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import type { TensorSpec } from '../src/io/safetensors.js';
import { numel } from '../src/tensor/dtype.js';

// Layout: TinyLlama-1.1B shapes (hidden 2048, MLP 5632, 32 query / 4 KV heads of 64, vocabulary
// 32000, untied lm_head), with enough layers for the size asked for.

const HIDDEN = 2048;
const INTERMEDIATE = 5632;
const HEADS = 32;
const KV_HEADS = 4;
const KV_DIM = KV_HEADS * (HIDDEN / HEADS);
const VOCAB = 32000;

export function layerSpecs(i: number): TensorSpec[] {
  const p = `model.layers.${i}`;
  return [
    { name: `${p}.input_layernorm.weight`, dtype: 'BF16', shape: [HIDDEN] },
    { name: `${p}.self_attn.q_proj.weight`, dtype: 'BF16', shape: [HIDDEN, HIDDEN] },
    { name: `${p}.self_attn.k_proj.weight`, dtype: 'BF16', shape: [KV_DIM, HIDDEN] },
    { name: `${p}.self_attn.v_proj.weight`, dtype: 'BF16', shape: [KV_DIM, HIDDEN] },
    { name: `${p}.self_attn.o_proj.weight`, dtype: 'BF16', shape: [HIDDEN, HIDDEN] },
    { name: `${p}.post_attention_layernorm.weight`, dtype: 'BF16', shape: [HIDDEN] },
    { name: `${p}.mlp.gate_proj.weight`, dtype: 'BF16', shape: [INTERMEDIATE, HIDDEN] },
    { name: `${p}.mlp.up_proj.weight`, dtype: 'BF16', shape: [INTERMEDIATE, HIDDEN] },
    { name: `${p}.mlp.down_proj.weight`, dtype: 'BF16', shape: [HIDDEN, INTERMEDIATE] },
  ];
}

export function specBytes(specs: readonly TensorSpec[]): number {
  return specs.reduce((s, t) => s + numel(t.shape) * 2, 0);
}

/** Llama-shaped BF16 tensors in checkpoint order, with enough layers for `minBytes` of data. */
export function llamaSpecs(minBytes: number): { specs: TensorSpec[]; layers: number } {
  const outer: TensorSpec[] = [
    { name: 'model.embed_tokens.weight', dtype: 'BF16', shape: [VOCAB, HIDDEN] },
    { name: 'model.norm.weight', dtype: 'BF16', shape: [HIDDEN] },
    { name: 'lm_head.weight', dtype: 'BF16', shape: [VOCAB, HIDDEN] },
  ];
  const perLayer = specBytes(layerSpecs(0));
  const layers = Math.max(1, Math.ceil((minBytes - specBytes(outer)) / perLayer));
  const specs: TensorSpec[] = [outer[0]!];
  for (let i = 0; i < layers; i++) specs.push(...layerSpecs(i));
  specs.push(outer[1]!, outer[2]!);
  return { specs, layers };
}

/** config.json of a checkpoint with this layout. */
export function hfConfig(layers: number): Record<string, unknown> {
  return {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    vocab_size: VOCAB,
    hidden_size: HIDDEN,
    intermediate_size: INTERMEDIATE,
    num_hidden_layers: layers,
    num_attention_heads: HEADS,
    num_key_value_heads: KV_HEADS,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    hidden_act: 'silu',
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: 'bfloat16',
  };
}

/** FNV-1a hash of a string (content seeds from tensor names). */
export function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** Wall time of `cat files... > /dev/null`, in seconds (process start-up included). */
export function timeCat(files: string[]): Promise<number> {
  return new Promise((resolvePromise, reject) => {
    const devnull = openSync('/dev/null', 'w');
    const t0 = process.hrtime.bigint();
    const p = spawn('cat', files, { stdio: ['ignore', devnull, 'inherit'] });
    p.on('error', (e) => {
      closeSync(devnull);
      reject(e);
    });
    p.on('exit', (code, signal) => {
      const dt = Number(process.hrtime.bigint() - t0) / 1e9;
      closeSync(devnull);
      if (code === 0) resolvePromise(dt);
      else reject(new Error(`cat exited with ${code ?? signal}`));
    });
  });
}

/** Bytes as GB / MB / B. */
export function fmtBytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(3)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  return `${n} B`;
}

/** A positive number (or integer) option; `dflt` when absent; a usage error otherwise. */
export function positive(name: string, v: string | undefined, dflt: number, integer = false): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0 || (integer && !Number.isInteger(n))) {
    throw Object.assign(new Error(`--${name} must be a positive ${integer ? 'integer' : 'number'}, got "${v}"`), { usage: true });
  }
  return n;
}
