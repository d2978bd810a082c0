/**
 * Deterministic, Llama-shaped checkpoints made from a seed: the built-in default input of the
 * demo and of tests that need a model folder without any download.
 */
import { writeFile } from 'node:fs/promises';
import { withStagingDir } from '../io/atomic-dir.js';
import { ShardedSafetensorsWriter, type TensorSpec } from '../io/safetensors.js';
import { Rng } from '../tensor/rng.js';
import { TORCH_DTYPE_NAME, type FloatDType } from '../tensor/dtype.js';

export interface SyntheticLlamaOptions {
  hiddenSize?: number;
  intermediateSize?: number;
  numLayers?: number;
  numHeads?: number;
  numKvHeads?: number;
  vocabSize?: number;
  dtype?: FloatDType;
  seed?: number;
  tieWordEmbeddings?: boolean;
  /** Shard budget in bytes (default: one shard). */
  maxShardBytes?: number;
  /** Replace an existing output folder. */
  overwrite?: boolean;
}

export interface SyntheticLlama {
  dir: string;
  config: Record<string, unknown>;
  tensors: TensorSpec[];
  files: string[];
}

/** HF Llama tensor names and shapes for a configuration, in checkpoint order. */
export function llamaTensorSpecs(o: Required<Omit<SyntheticLlamaOptions, 'seed' | 'maxShardBytes' | 'overwrite'>>): TensorSpec[] {
  const headDim = o.hiddenSize / o.numHeads;
  const kv = o.numKvHeads * headDim;
  const dtype = o.dtype;
  const specs: TensorSpec[] = [{ name: 'model.embed_tokens.weight', dtype, shape: [o.vocabSize, o.hiddenSize] }];
  for (let i = 0; i < o.numLayers; i++) {
    const p = `model.layers.${i}`;
    specs.push(
      { name: `${p}.input_layernorm.weight`, dtype, shape: [o.hiddenSize] },
      { name: `${p}.self_attn.q_proj.weight`, dtype, shape: [o.hiddenSize, o.hiddenSize] },
      { name: `${p}.self_attn.k_proj.weight`, dtype, shape: [kv, o.hiddenSize] },
      { name: `${p}.self_attn.v_proj.weight`, dtype, shape: [kv, o.hiddenSize] },
      { name: `${p}.self_attn.o_proj.weight`, dtype, shape: [o.hiddenSize, o.hiddenSize] },
      { name: `${p}.post_attention_layernorm.weight`, dtype, shape: [o.hiddenSize] },
      { name: `${p}.mlp.gate_proj.weight`, dtype, shape: [o.intermediateSize, o.hiddenSize] },
      { name: `${p}.mlp.up_proj.weight`, dtype, shape: [o.intermediateSize, o.hiddenSize] },
      { name: `${p}.mlp.down_proj.weight`, dtype, shape: [o.hiddenSize, o.intermediateSize] },
    );
  }
  specs.push({ name: 'model.norm.weight', dtype, shape: [o.hiddenSize] });
  if (!o.tieWordEmbeddings) specs.push({ name: 'lm_head.weight', dtype, shape: [o.vocabSize, o.hiddenSize] });
  return specs;
}

/** Write a seeded random Llama checkpoint (config.json + safetensors) into `dir`. */
export async function writeSyntheticLlama(dir: string, opts: SyntheticLlamaOptions = {}): Promise<SyntheticLlama> {
  const o = {
    hiddenSize: opts.hiddenSize ?? 64,
    intermediateSize: opts.intermediateSize ?? 176,
    numLayers: opts.numLayers ?? 4,
    numHeads: opts.numHeads ?? 8,
    numKvHeads: opts.numKvHeads ?? 4,
    vocabSize: opts.vocabSize ?? 256,
    dtype: opts.dtype ?? 'BF16',
    tieWordEmbeddings: opts.tieWordEmbeddings ?? false,
  };
  const seed = opts.seed ?? 0;
  const specs = llamaTensorSpecs(o);
  const torchDtype = TORCH_DTYPE_NAME[o.dtype]!;
  const config: Record<string, unknown> = {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    vocab_size: o.vocabSize,
    hidden_size: o.hiddenSize,
    intermediate_size: o.intermediateSize,
    num_hidden_layers: o.numLayers,
    num_attention_heads: o.numHeads,
    num_key_value_heads: o.numKvHeads,
    max_position_embeddings: 512,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    hidden_act: 'silu',
    tie_word_embeddings: o.tieWordEmbeddings,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: torchDtype,
    dtype: torchDtype,
  };
  const rng = new Rng(seed);
  const files = await withStagingDir(
    dir,
    async (stage) => {
      await writeFile(stage.file('config.json'), JSON.stringify(config, null, 2) + '\n');
      const writer = await ShardedSafetensorsWriter.create(stage.path, specs, {
        maxShardBytes: opts.maxShardBytes,
        metadata: { format: 'pt', source: `amalgam synthetic llama, seed ${seed}` },
      });
      try {
        for (const s of specs) {
          const n = s.shape.reduce((a, b) => a * b, 1);
          const values = new Float32Array(n);
          if (s.shape.length === 1) {
            for (let i = 0; i < n; i++) values[i] = 1 + 0.05 * rng.normal();
          } else {
            rng.fillNormal(values, 1 / Math.sqrt(s.shape[1]!));
          }
          await writer.writeF32(s.name, values);
        }
        return (await writer.finish()).files;
      } catch (e) {
        await writer.abort();
        throw e;
      }
    },
    { overwrite: opts.overwrite },
  );
  return { dir, config, tensors: specs, files };
}
