/**
 * Conversion of GGUF (llama architecture) and llama2.c checkpoints to a Hugging Face Llama folder
 * (formats.md §8.4): config.json, model.safetensors (F32, HF names, Q/K rows permuted to the
 * rotate_half layout, lm_head written explicitly), tokenizer.json, tokenizer_config.json and
 * generation_config.json. The folder appears only when complete.
 */
import { writeFile, stat } from 'node:fs/promises';
import { basename, dirname, extname, join } from 'node:path';
import { AmalgamError } from '../errors.js';
import { numel } from '../tensor/dtype.js';
import { withStagingDir } from '../io/atomic-dir.js';
import { FileByteReader, type TensorSource } from '../io/source.js';
import { SafetensorsFileWriter, type TensorSpec } from '../io/safetensors.js';
import { GGUF_MAGIC, GGUF_TYPE, GgufFile, shortestF32 } from '../io/gguf.js';
import { LLAMA2C_MAGIC, Llama2cCheckpoint, readLlama2cTokenizer } from '../io/llama2c.js';
import { vocabFromGguf, vocabFromLlama2c, type SpVocab } from '../tokenizer/vocab.js';
import { buildHfTokenizer } from '../tokenizer/hf.js';
import { ggufNameToHf, llama2cNameToHf, type QkRole } from './names.js';
import { permuteQkGgufToHf } from './permute.js';

export type ModelFileFormat = 'gguf' | 'llama2c';

export interface ConvertOptions {
  /** llama2.c tokenizer file (default: `tok<vocab>.bin` or `tokenizer.bin` beside the model). */
  tokenizer?: string;
  /** `max_position_embeddings` (default: llama2.c seq_len, or the GGUF `llama.context_length`). */
  maxPositionEmbeddings?: number;
  /** Replace an existing output folder. */
  overwrite?: boolean;
  /** The `source` entry of the safetensors metadata (default: names the input file). */
  source?: string;
}

/** The config.json written for a converted model (formats.md §8.4). */
export interface HfLlamaConfig {
  architectures: string[];
  model_type: string;
  vocab_size: number;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  max_position_embeddings: number;
  rms_norm_eps: number;
  rope_theta: number;
  hidden_act: string;
  tie_word_embeddings: boolean;
  bos_token_id: number;
  eos_token_id: number;
  torch_dtype: string;
  dtype: string;
}

export interface ConvertResult {
  input: string;
  format: ModelFileFormat;
  outDir: string;
  files: {
    config: string;
    weights: string;
    tokenizer: string;
    tokenizerConfig: string;
    generationConfig: string;
  };
  /** Tokenizer the vocabulary came from (the GGUF itself, or the llama2.c tokenizer file). */
  tokenizerSource: string;
  tensorCount: number;
  /** Elements written over all tensors (lm_head counted even when it copies the embedding). */
  parameterCount: number;
  config: HfLlamaConfig;
}

/** Detect GGUF or llama2.c by magic (a `.bin` without the "ak42" magic is a legacy llama2.c file). */
export async function detectModelFormat(path: string): Promise<ModelFileFormat> {
  const reader = await FileByteReader.open(path);
  try {
    if (reader.size >= 4) {
      const head = await reader.read(0, 4);
      const magic = new DataView(head.buffer, head.byteOffset, 4).getUint32(0, true);
      if (magic === GGUF_MAGIC) return 'gguf';
      if (magic === LLAMA2C_MAGIC) return 'llama2c';
    }
    const ext = extname(path).toLowerCase();
    if (ext === '.bin') return 'llama2c';
    if (ext === '.gguf') return 'gguf'; // opening it reports the bad magic
    throw new AmalgamError('E_FORMAT', 'cannot tell the model format: no GGUF or llama2.c magic, and the extension is neither .gguf nor .bin', {
      file: path,
      hint: 'convert reads GGUF files and llama2.c .bin checkpoints',
    });
  } finally {
    await reader.close();
  }
}

interface PlanItem {
  /** Output (HF) name. */
  hf: string;
  /** Source tensor name. */
  src: string;
  role: QkRole;
  shape: number[];
}

interface Plan {
  format: ModelFileFormat;
  source: TensorSource;
  vocab: SpVocab;
  tokenizerSource: string;
  nHeads: number;
  nKvHeads: number;
  config: HfLlamaConfig;
  items: PlanItem[];
  sourceLabel: string;
}

function hfConfig(c: {
  vocab: number; hidden: number; ffn: number; layers: number; heads: number; kvHeads: number;
  maxPos: number; eps: number; theta: number; bos: number; eos: number;
}): HfLlamaConfig {
  return {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    vocab_size: c.vocab,
    hidden_size: c.hidden,
    intermediate_size: c.ffn,
    num_hidden_layers: c.layers,
    num_attention_heads: c.heads,
    num_key_value_heads: c.kvHeads,
    max_position_embeddings: c.maxPos,
    rms_norm_eps: c.eps,
    rope_theta: c.theta,
    hidden_act: 'silu',
    tie_word_embeddings: false,
    bos_token_id: c.bos,
    eos_token_id: c.eos,
    torch_dtype: 'float32',
    dtype: 'float32',
  };
}

/** HF tensor names and row-major shapes of a llama model. */
function expectedShapes(c: HfLlamaConfig): Map<string, number[]> {
  const H = c.hidden_size;
  const hd = H / c.num_attention_heads;
  const q = c.num_attention_heads * hd;
  const kv = c.num_key_value_heads * hd;
  const I = c.intermediate_size;
  const m = new Map<string, number[]>();
  m.set('model.embed_tokens.weight', [c.vocab_size, H]);
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const p = `model.layers.${l}.`;
    m.set(`${p}input_layernorm.weight`, [H]);
    m.set(`${p}self_attn.q_proj.weight`, [q, H]);
    m.set(`${p}self_attn.k_proj.weight`, [kv, H]);
    m.set(`${p}self_attn.v_proj.weight`, [kv, H]);
    m.set(`${p}self_attn.o_proj.weight`, [H, q]);
    m.set(`${p}post_attention_layernorm.weight`, [H]);
    m.set(`${p}mlp.gate_proj.weight`, [I, H]);
    m.set(`${p}mlp.up_proj.weight`, [I, H]);
    m.set(`${p}mlp.down_proj.weight`, [H, I]);
  }
  m.set('model.norm.weight', [H]);
  m.set('lm_head.weight', [c.vocab_size, H]);
  return m;
}

function positive(v: number, key: string, file: string): number {
  if (!Number.isSafeInteger(v) || v <= 0) throw new AmalgamError('E_METADATA', `value ${v} must be a positive integer`, { file, key });
  return v;
}

/** Map source tensors to HF names, checking that every tensor is known and has its expected shape. */
function mapTensors(
  source: TensorSource,
  config: HfLlamaConfig,
  toHf: (name: string) => { name: string; role: QkRole } | undefined,
  embedName: string,
): PlanItem[] {
  const expected = expectedShapes(config);
  const items = new Map<string, PlanItem>();
  for (const t of source.tensors()) {
    const m = toHf(t.name);
    const shape = m && expected.get(m.name);
    if (!m || !shape) {
      throw new AmalgamError('E_UNSUPPORTED', 'tensor is not part of the llama architecture described by the metadata', {
        file: source.path,
        key: t.name,
        hint: 'convert handles plain llama models (no rope scaling tables, biases or extra heads)',
      });
    }
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new AmalgamError('E_SHAPE', `shape [${t.shape.join(', ')}] does not match the expected [${shape.join(', ')}] (as ${m.name})`, {
        file: source.path,
        key: t.name,
      });
    }
    items.set(m.name, { hf: m.name, src: t.name, role: m.role, shape });
  }
  if (!items.has('lm_head.weight') && items.has('model.embed_tokens.weight')) {
    items.set('lm_head.weight', { hf: 'lm_head.weight', src: embedName, role: undefined, shape: expected.get('lm_head.weight')! });
  }
  for (const name of expected.keys()) {
    if (!items.has(name)) {
      throw new AmalgamError('E_MISSING', `the model has no tensor for ${name}`, { file: source.path, key: name });
    }
  }
  return [...items.values()].sort((a, b) => (a.hf < b.hf ? -1 : a.hf > b.hf ? 1 : 0));
}

async function planGguf(input: string, opts: ConvertOptions): Promise<Plan> {
  const g = await GgufFile.open(input);
  try {
    const file = g.path;
    const arch = g.requireString('general.architecture');
    if (arch !== 'llama') {
      throw new AmalgamError('E_UNSUPPORTED', `architecture "${arch}" is not supported`, {
        file,
        key: 'general.architecture',
        hint: 'convert handles llama-architecture GGUF files',
      });
    }
    const hidden = positive(g.requireInteger('llama.embedding_length'), 'llama.embedding_length', file);
    const layers = positive(g.requireInteger('llama.block_count'), 'llama.block_count', file);
    const ffn = positive(g.requireInteger('llama.feed_forward_length'), 'llama.feed_forward_length', file);
    const heads = positive(g.requireInteger('llama.attention.head_count'), 'llama.attention.head_count', file);
    const kvHeads = positive(g.getInteger('llama.attention.head_count_kv') ?? heads, 'llama.attention.head_count_kv', file);
    if (hidden % heads !== 0 || (hidden / heads) % 2 !== 0) {
      throw new AmalgamError('E_METADATA', `embedding length ${hidden} does not split into ${heads} heads of even size`, { file, key: 'llama.attention.head_count' });
    }
    if (heads % kvHeads !== 0) {
      throw new AmalgamError('E_METADATA', `head count ${heads} is not a multiple of the KV head count ${kvHeads}`, { file, key: 'llama.attention.head_count_kv' });
    }
    const headDim = hidden / heads;
    const ropeDims = g.getInteger('llama.rope.dimension_count');
    if (ropeDims !== undefined && ropeDims !== headDim) {
      throw new AmalgamError('E_UNSUPPORTED', `rotary dimension count ${ropeDims} differs from the head size ${headDim} (partial rotary embeddings)`, {
        file,
        key: 'llama.rope.dimension_count',
      });
    }
    for (const key of ['llama.attention.key_length', 'llama.attention.value_length']) {
      const v = g.getInteger(key);
      if (v !== undefined && v !== headDim) {
        throw new AmalgamError('E_UNSUPPORTED', `head size ${v} differs from embedding length / head count (${headDim})`, { file, key });
      }
    }
    const f32 = (key: string): number | undefined => {
      const v = g.getNumber(key);
      return v !== undefined && g.kv(key)!.type === GGUF_TYPE.FLOAT32 ? shortestF32(v) : v;
    };
    const eps = f32('llama.attention.layer_norm_rms_epsilon');
    if (eps === undefined) throw new AmalgamError('E_MISSING', 'required metadata key is missing', { file, key: 'llama.attention.layer_norm_rms_epsilon' });
    const theta = f32('llama.rope.freq_base') ?? 10000;
    let maxPos = opts.maxPositionEmbeddings;
    if (maxPos === undefined) {
      const ctx = g.getInteger('llama.context_length');
      if (ctx === undefined) {
        throw new AmalgamError('E_MISSING', 'required metadata key is missing', { file, key: 'llama.context_length', hint: 'pass the context length explicitly (maxPositionEmbeddings)' });
      }
      maxPos = positive(ctx, 'llama.context_length', file);
    }
    const vocab = vocabFromGguf(g);
    const embed = g.has('token_embd.weight') ? g.info('token_embd.weight') : undefined;
    if (embed && embed.shape[0] !== vocab.tokens.length) {
      throw new AmalgamError('E_METADATA', `${vocab.tokens.length} tokens, but the embedding has ${embed.shape[0]} rows`, { file, key: 'tokenizer.ggml.tokens' });
    }
    const config = hfConfig({ vocab: vocab.tokens.length, hidden, ffn, layers, heads, kvHeads, maxPos, eps, theta, bos: vocab.bosId, eos: vocab.eosId });
    const items = mapTensors(g, config, ggufNameToHf, 'token_embd.weight');
    return {
      format: 'gguf', source: g, vocab, tokenizerSource: file, nHeads: heads, nKvHeads: kvHeads, config, items,
      sourceLabel: opts.source ?? `converted from ${basename(input)} (GGUF)`,
    };
  } catch (e) {
    await g.close();
    throw e;
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isFile();
  } catch {
    return false;
  }
}

async function planLlama2c(input: string, opts: ConvertOptions): Promise<Plan> {
  const ck = await Llama2cCheckpoint.open(input);
  try {
    const c = ck.config;
    let tokPath = opts.tokenizer;
    if (tokPath === undefined) {
      const candidates = [`tok${c.vocabSize}.bin`, 'tokenizer.bin'].map((n) => join(dirname(input), n));
      for (const cand of candidates) {
        if (await exists(cand)) {
          tokPath = cand;
          break;
        }
      }
      if (tokPath === undefined) {
        throw new AmalgamError('E_MISSING', `no llama2.c tokenizer beside the model (looked for ${candidates.map((p) => basename(p)).join(', ')})`, {
          file: input,
          key: 'tokenizer',
          hint: `put the llama2.c tokenizer file beside the model as ${basename(candidates[0]!)} or tokenizer.bin, or convert the model with amalgam convert ${input} <out-dir> --tokenizer <file>`,
        });
      }
    }
    const vocab = vocabFromLlama2c(await readLlama2cTokenizer(tokPath, c.vocabSize));
    const config = hfConfig({
      vocab: c.vocabSize, hidden: c.dim, ffn: c.hiddenDim, layers: c.nLayers, heads: c.nHeads, kvHeads: c.nKvHeads,
      maxPos: opts.maxPositionEmbeddings ?? c.seqLen, eps: 1e-5, theta: 10000, bos: vocab.bosId, eos: vocab.eosId,
    });
    const items = mapTensors(ck, config, llama2cNameToHf, 'token_embedding_table');
    return {
      format: 'llama2c', source: ck, vocab, tokenizerSource: tokPath, nHeads: c.nHeads, nKvHeads: c.nKvHeads, config, items,
      sourceLabel: opts.source ?? `converted from ${basename(input)} (llama2.c)`,
    };
  } catch (e) {
    await ck.close();
    throw e;
  }
}

/**
 * Convert a GGUF (llama) or llama2.c checkpoint into a Hugging Face Llama folder at `outDir`.
 * The format is detected from the magic (or a `.bin` extension).
 */
export async function convertToHf(input: string, outDir: string, opts: ConvertOptions = {}): Promise<ConvertResult> {
  if (opts.maxPositionEmbeddings !== undefined && !(Number.isSafeInteger(opts.maxPositionEmbeddings) && opts.maxPositionEmbeddings > 0)) {
    throw new AmalgamError('E_USAGE', `maxPositionEmbeddings (--max-position-embeddings) must be a positive integer, got ${opts.maxPositionEmbeddings}`);
  }
  const format = await detectModelFormat(input);
  const plan = format === 'gguf' ? await planGguf(input, opts) : await planLlama2c(input, opts);
  const names = {
    config: 'config.json',
    weights: 'model.safetensors',
    tokenizer: 'tokenizer.json',
    tokenizerConfig: 'tokenizer_config.json',
    generationConfig: 'generation_config.json',
  };
  let parameterCount = 0;
  try {
    const target = await withStagingDir(
      outDir,
      async (dir) => {
        const specs: TensorSpec[] = plan.items.map((it) => ({ name: it.hf, dtype: 'F32', shape: it.shape }));
        const writer = await SafetensorsFileWriter.create(dir.file(names.weights), specs, { format: 'pt', source: plan.sourceLabel });
        try {
          for (const it of plan.items) {
            let data = await plan.source.readF32(it.src);
            if (it.role) data = permuteQkGgufToHf(data, it.shape[0]!, it.role === 'q' ? plan.nHeads : plan.nKvHeads, it.src);
            await writer.writeF32(it.hf, data);
            parameterCount += numel(it.shape);
          }
          await writer.finish();
        } catch (e) {
          await writer.abort();
          throw e;
        }
        const { tokenizer, tokenizerConfig } = buildHfTokenizer(plan.vocab, { modelMaxLength: plan.config.max_position_embeddings });
        const json = (v: unknown) => JSON.stringify(v, null, 2) + '\n';
        await writeFile(dir.file(names.config), json(plan.config));
        await writeFile(dir.file(names.tokenizer), json(tokenizer));
        await writeFile(dir.file(names.tokenizerConfig), json(tokenizerConfig));
        await writeFile(dir.file(names.generationConfig), json({ bos_token_id: plan.config.bos_token_id, eos_token_id: plan.config.eos_token_id }));
        return dir.target;
      },
      { overwrite: opts.overwrite, inputs: [input] },
    );
    return {
      input,
      format,
      outDir: target,
      files: {
        config: join(target, names.config),
        weights: join(target, names.weights),
        tokenizer: join(target, names.tokenizer),
        tokenizerConfig: join(target, names.tokenizerConfig),
        generationConfig: join(target, names.generationConfig),
      },
      tokenizerSource: plan.tokenizerSource,
      tensorCount: plan.items.length,
      parameterCount,
      config: plan.config,
    };
  } finally {
    await plan.source.close();
  }
}
