/**
 * Hugging Face model folders (formats.md §3): `config.json`, safetensors weights (single file or
 * sharded with an index) and the tokenizer/generation files that travel with a model.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { AmalgamError } from '../errors.js';
import { resolveArchitecture, type ResolveOptions } from '../arch/resolve.js';
import type { ResolvedArchitecture } from '../arch/types.js';
import { parseFloatDType, TORCH_DTYPE_NAME, type FloatDType } from '../tensor/dtype.js';
import { INDEX_FILE, openSafetensors, ShardedSafetensors } from './safetensors.js';
import { ioError, type TensorSource } from './source.js';
import { parseStrictJson, StrictJsonError } from './strict-json.js';

export const CONFIG_FILE = 'config.json';

/** Files other than weights that are carried along with a model (tokenizer, generation, processor). */
export const HF_EXTRA_FILES = [
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'tokenizer.model',
  'spiece.model',
  'sentencepiece.bpe.model',
  'vocab.json',
  'merges.txt',
  'vocab.txt',
  'added_tokens.json',
  'generation_config.json',
  'chat_template.jinja',
  'chat_template.json',
  'preprocessor_config.json',
  'processor_config.json',
] as const;

/** A parsed `config.json` (a JSON object). */
export type HfConfig = Record<string, unknown>;

export interface HfModelFolder {
  dir: string;
  config: HfConfig;
  configPath: string;
  /** The weights (sharded through the index, or `model.safetensors`). */
  source: TensorSource;
  architecture: ResolvedArchitecture;
  /** Names of the present files of HF_EXTRA_FILES, in that order. */
  extraFiles: string[];
  /** Weight files relative to the folder (the index first when sharded). */
  weightFiles: string[];
  close(): Promise<void>;
}

export interface OpenModelFolderOptions {
  /** Use this registered architecture instead of the one config.json names. */
  architecture?: string;
  /** Tolerate tensors the architecture does not know (listed in `architecture.unmatched`). */
  allowUnmatched?: boolean;
}

const PYTORCH_BIN = /^pytorch_model(-\d+-of-\d+)?\.bin$|^pytorch_model\.bin\.index\.json$/;
const SHARD_NAME = /^model-\d+-of-\d+\.safetensors$/;
const OTHER_FRAMEWORKS = /^(tf_model\.h5|flax_model\.msgpack|model\.ckpt\.index)$/;

async function statOrNull(path: string) {
  try {
    return await stat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException)?.code === 'ENOENT' || (e as NodeJS.ErrnoException)?.code === 'ENOTDIR') return null;
    throw ioError(path, e);
  }
}

/** Fails unless `dir` is a folder, with a hint for a file given instead (convert a GGUF / llama2.c file). */
export async function requireFolder(dir: string): Promise<void> {
  const st = await statOrNull(dir);
  if (!st) {
    throw new AmalgamError('E_IO', 'model folder does not exist', { file: dir, hint: 'check the path; a model is a folder with config.json and *.safetensors weights' });
  }
  if (!st.isDirectory()) {
    throw new AmalgamError('E_IO', 'expected a model folder, got a file', {
      file: dir,
      hint: /\.(safetensors|json)$/.test(dir)
        ? 'pass the folder that contains this file'
        : /\.(gguf|bin)$/.test(dir)
          ? `a model is a folder with config.json and *.safetensors weights; a GGUF or llama2.c file converts to one with: amalgam convert ${dir} <folder>`
          : 'a model is a folder with config.json and *.safetensors weights',
    });
  }
}

/** Parse a config-like JSON file into an object, with errors that name the file. */
export async function readJsonObject(path: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw ioError(path, e);
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  let json: unknown;
  try {
    json = parseStrictJson(text, { maxDepth: 64 });
  } catch (e) {
    if (e instanceof StrictJsonError) {
      if (e.key !== undefined) {
        throw new AmalgamError('E_CONFIG', `key "${e.key}" appears more than once`, { file: path, key: e.key, hint: 'keep one entry per key' });
      }
      const nan = /\b(NaN|-?Infinity)\b/.test(text) ? '; NaN and Infinity are not JSON, replace them with numbers or null' : '';
      throw new AmalgamError('E_CONFIG', `not valid JSON: ${e.message}${nan}`, { file: path, cause: e });
    }
    throw e;
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new AmalgamError('E_CONFIG', `must hold a JSON object, found ${json === null ? 'null' : Array.isArray(json) ? 'an array' : `a ${typeof json}`}`, { file: path });
  }
  return json as Record<string, unknown>;
}

/** Read `config.json` from a model folder (or from the path of a config file). */
export async function readHfConfig(dirOrFile: string): Promise<HfConfig> {
  const st = await statOrNull(dirOrFile);
  if (!st) throw new AmalgamError('E_IO', 'no such file or folder', { file: dirOrFile });
  const path = st.isDirectory() ? join(dirOrFile, CONFIG_FILE) : dirOrFile;
  if (st.isDirectory() && !(await statOrNull(path))) throw missingConfig(dirOrFile, await listDir(dirOrFile));
  return readJsonObject(path);
}

async function listDir(dir: string): Promise<string[]> {
  try {
    return (await readdir(dir)).sort();
  } catch (e) {
    throw ioError(dir, e);
  }
}

function missingConfig(dir: string, files: string[]): AmalgamError {
  const adapter = files.includes('adapter_config.json');
  return new AmalgamError('E_MISSING', `no ${CONFIG_FILE} in the model folder`, {
    file: dir,
    key: CONFIG_FILE,
    hint: adapter
      ? 'this is a PEFT adapter folder (adapter_config.json); use it as an adapter on top of its base model'
      : `a Hugging Face model folder needs ${CONFIG_FILE} next to the weights; copy it from the model the weights come from`,
  });
}

/** Explain why a folder without model.safetensors / index has no usable weights. */
function noWeightsError(dir: string, files: string[]): AmalgamError {
  const bins = files.filter((f) => PYTORCH_BIN.test(f));
  if (bins.length) {
    return new AmalgamError('E_UNSUPPORTED', `the weights are legacy PyTorch pickle files (${bins.join(', ')}), which amalgam does not read`, {
      file: dir,
      key: bins[0],
      hint: 'convert them to safetensors first, e.g. in Python: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)',
    });
  }
  const shards = files.filter((f) => SHARD_NAME.test(f));
  if (shards.length) {
    return new AmalgamError('E_MISSING', `found ${shards.length} safetensors shard(s) (${shards[0]} ...) but no ${INDEX_FILE}`, {
      file: dir,
      key: INDEX_FILE,
      hint: 'copy the index file from the original model; it maps each tensor to its shard',
    });
  }
  const other = files.filter((f) => f.endsWith('.safetensors') && !f.startsWith('.'));
  if (other.includes('adapter_model.safetensors')) {
    return new AmalgamError('E_MISSING', 'the folder holds a PEFT adapter (adapter_model.safetensors), not model weights', {
      file: dir,
      hint: 'use it as an adapter on top of its base model',
    });
  }
  if (other.length) {
    return new AmalgamError('E_MISSING', `no model.safetensors or ${INDEX_FILE}; found ${other.join(', ')}`, {
      file: dir,
      hint: 'Hugging Face weights are named model.safetensors (or sharded with an index); rename the file if it holds the full model',
    });
  }
  const fw = files.filter((f) => OTHER_FRAMEWORKS.test(f));
  if (fw.length) {
    return new AmalgamError('E_UNSUPPORTED', `the weights are in a TensorFlow/Flax format (${fw.join(', ')}), which amalgam does not read`, {
      file: dir,
      key: fw[0],
      hint: 'convert them to safetensors first (load with transformers and save_pretrained with safe_serialization=True)',
    });
  }
  return new AmalgamError('E_MISSING', 'no weights in the model folder (expected model.safetensors or model-*-of-*.safetensors with an index)', {
    file: dir,
    hint: 'download or copy the *.safetensors files of the model',
  });
}

/**
 * Open a Hugging Face model folder: parse config.json, open the safetensors weights (headers
 * only) and resolve the architecture against the stored tensor names.
 */
export async function openModelFolder(dir: string, opts: OpenModelFolderOptions = {}): Promise<HfModelFolder> {
  await requireFolder(dir);
  const entries = await readdir(dir, { withFileTypes: true }).catch((e) => {
    throw ioError(dir, e);
  });
  const files = entries.filter((e) => e.isFile() || e.isSymbolicLink()).map((e) => e.name).sort();
  if (!files.includes(CONFIG_FILE)) throw missingConfig(dir, files);
  const configPath = join(dir, CONFIG_FILE);
  const config = await readJsonObject(configPath);

  if (!files.includes(INDEX_FILE) && !files.includes('model.safetensors')) throw noWeightsError(dir, files);
  const source = await openSafetensors(dir);
  try {
    const resolveOpts: ResolveOptions = { file: dir, allowUnmatched: opts.allowUnmatched };
    if (opts.architecture !== undefined) resolveOpts.architecture = opts.architecture;
    const architecture = resolveArchitecture(config, source.tensors(), resolveOpts);
    const extraFiles = HF_EXTRA_FILES.filter((f) => files.includes(f));
    const weightFiles = source instanceof ShardedSafetensors ? [INDEX_FILE, ...source.shardFiles()] : [basename(source.path)];
    return {
      dir,
      config,
      configPath,
      source,
      architecture,
      extraFiles,
      weightFiles,
      close: () => source.close(),
    };
  } catch (e) {
    await source.close();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// config.json keys

export interface ConfigKeyOptions {
  /** File named in errors. */
  file?: string;
}

function getKey(config: HfConfig, key: string): unknown {
  return Object.prototype.hasOwnProperty.call(config, key) ? config[key] : undefined;
}

/** The raw dtype string: `dtype` wins over the older `torch_dtype`. */
export function getConfigDtypeName(config: HfConfig): string | undefined {
  for (const key of ['dtype', 'torch_dtype']) {
    const v = getKey(config, key);
    if (typeof v === 'string' && v !== '') return v;
  }
  return undefined;
}

/**
 * The weights dtype the config declares (`dtype`, else `torch_dtype`), as F32/F16/BF16/F64.
 * Undefined when neither key is set; an unknown name is an error.
 */
export function getConfigDtype(config: HfConfig, opts: ConfigKeyOptions = {}): FloatDType | undefined {
  const key = typeof getKey(config, 'dtype') === 'string' && getKey(config, 'dtype') !== '' ? 'dtype' : 'torch_dtype';
  const raw = getConfigDtypeName(config);
  if (raw === undefined) return undefined;
  const parsed = parseFloatDType(raw.replace(/^torch\./, ''));
  if (!parsed) {
    throw new AmalgamError('E_CONFIG', `unknown dtype "${raw}"`, { file: opts.file, key, hint: 'use "bfloat16", "float16" or "float32"' });
  }
  return parsed;
}

/** Set the dtype: writes both `dtype` and `torch_dtype` with the torch name (e.g. "bfloat16"). */
export function setConfigDtype(config: HfConfig, dtype: FloatDType | string): HfConfig {
  const parsed = parseFloatDType(String(dtype).replace(/^torch\./, ''));
  if (!parsed) throw new AmalgamError('E_USAGE', `unknown dtype "${dtype}"`, { hint: 'use bfloat16, float16 or float32' });
  const name = TORCH_DTYPE_NAME[parsed]!;
  config['dtype'] = name;
  config['torch_dtype'] = name;
  return config;
}

function readInt(config: HfConfig, key: string, min: number, opts: ConfigKeyOptions): number | undefined {
  const v = getKey(config, key);
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) {
    throw new AmalgamError('E_CONFIG', `${JSON.stringify(v)} is not ${min > 0 ? 'a positive' : 'a non-negative'} integer`, { file: opts.file, key });
  }
  return v;
}

/** `vocab_size` (a positive integer), or undefined when absent. */
export function getVocabSize(config: HfConfig, opts: ConfigKeyOptions = {}): number | undefined {
  return readInt(config, 'vocab_size', 1, opts);
}

/** `num_hidden_layers` (a non-negative integer), or undefined when absent. */
export function getNumHiddenLayers(config: HfConfig, opts: ConfigKeyOptions = {}): number | undefined {
  return readInt(config, 'num_hidden_layers', 0, opts);
}

/** `tie_word_embeddings` as stated in the config, or undefined when absent. */
export function getTieWordEmbeddings(config: HfConfig, opts: ConfigKeyOptions = {}): boolean | undefined {
  const v = getKey(config, 'tie_word_embeddings');
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'boolean') throw new AmalgamError('E_CONFIG', `${JSON.stringify(v)} is not true or false`, { file: opts.file, key: 'tie_word_embeddings' });
  return v;
}
