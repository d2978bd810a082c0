/**
 * PEFT LoRA adapter folders (formats.md §4): `adapter_config.json` validated with zod, and
 * `adapter_model.safetensors` paired into per-module LoRA factors with their scaling. Reading and
 * validation only; applying adapters is done elsewhere.
 */
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { AmalgamError } from '../errors.js';
import { isFloatDType } from '../tensor/dtype.js';
import { readJsonObject } from './hf.js';
import { SafetensorsFile } from './safetensors.js';
import type { TensorInfo, TensorSource } from './source.js';

export const ADAPTER_CONFIG_FILE = 'adapter_config.json';
export const ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors';
export const ADAPTER_LEGACY_WEIGHTS_FILE = 'adapter_model.bin';
/** Prefix PEFT puts before module paths in saved tensor names. */
export const PEFT_PREFIX = 'base_model.model.';

const nullableBool = z.boolean().nullish().transform((v) => v ?? false);
const stringOrList = z.union([z.array(z.string()), z.string()]).nullish();

/** `adapter_config.json` of a LoRA adapter. Unknown keys are kept (PEFT writes many). */
export const loraConfigSchema = z
  .object({
    peft_type: z.string(),
    r: z.number().int().positive().default(8),
    lora_alpha: z.number().finite().default(8),
    target_modules: stringOrList,
    exclude_modules: stringOrList,
    use_rslora: nullableBool,
    fan_in_fan_out: nullableBool,
    modules_to_save: z.array(z.string()).nullish(),
    bias: z.enum(['none', 'all', 'lora_only']).nullish().transform((v) => v ?? 'none'),
    rank_pattern: z
      .record(z.string(), z.number().int().positive())
      .nullish()
      .transform((v) => ({ ...(v ?? {}) })),
    alpha_pattern: z
      .record(z.string(), z.number().finite())
      .nullish()
      .transform((v) => ({ ...(v ?? {}) })),
    task_type: z.string().nullish(),
    base_model_name_or_path: z.string().nullish(),
    revision: z.string().nullish(),
    use_dora: nullableBool,
    lora_bias: nullableBool,
    inference_mode: z.boolean().nullish(),
    layers_to_transform: z.union([z.number().int(), z.array(z.number().int())]).nullish(),
    layers_pattern: z.union([z.string(), z.array(z.string())]).nullish(),
    target_parameters: z.array(z.string()).nullish(),
  })
  .loose();

export type LoraAdapterConfig = z.output<typeof loraConfigSchema>;

export interface LoraModule {
  /** Module path in the base model, e.g. `model.layers.0.self_attn.q_proj`. */
  path: string;
  /** Base-model tensor the update applies to (`<path>.weight`). */
  target: string;
  kind: 'linear' | 'embedding';
  /** Tensor names in the adapter. */
  aName: string;
  bName: string;
  /** Rank, from the tensor shapes (checked against `r` / `rank_pattern`). */
  rank: number;
  /** Linear: input features (A is [r, in]); embedding: number of embeddings (A is [r, num]). */
  inFeatures: number;
  /** Linear: output features (B is [out, r]); embedding: embedding width (B is [dim, r]). */
  outFeatures: number;
  /** α for this module (`alpha_pattern` or `lora_alpha`). */
  alpha: number;
  /** s = α/r, or α/√r with `use_rslora`. */
  scaling: number;
  /** The base weight is stored [in, out] (GPT-2 Conv1D): ΔW is transposed. */
  fanInFanOut: boolean;
  /** Shape of ΔW as the base tensor stores it. */
  deltaShape: [number, number];
  /**
   * Adapter tensor holding the weight the update is added to, when the adapter saves it in full:
   * PEFT saves targeted embedding layers (`embed_tokens`, `lm_head`) as `<module>.base_layer.weight`
   * (`<module>.weight` before PEFT 0.7) and loads it into the base layer. Absent: the base model's.
   */
  baseName?: string;
}

export interface SavedModuleTensor {
  /** Name in the adapter file. */
  name: string;
  /** Base-model tensor it replaces (PEFT prefix and `modules_to_save.<adapter>` removed). */
  target: string;
  /** Why it is saved in full. */
  kind: 'modules_to_save' | 'bias' | 'embedding' | 'other';
}

export interface PeftAdapter {
  dir: string;
  configPath: string;
  weightsPath: string;
  config: LoraAdapterConfig;
  source: TensorSource;
  /** LoRA factor pairs, in the order their A tensors are stored. */
  modules: LoraModule[];
  /** Tensors saved in full (modules_to_save, biases, resized embeddings). */
  savedModules: SavedModuleTensor[];
  close(): Promise<void>;
}

async function statOrNull(path: string) {
  try {
    return await stat(path);
  } catch {
    return null;
  }
}

/** True when `dir` is a folder holding `adapter_config.json`. */
export async function isPeftAdapterFolder(dir: string): Promise<boolean> {
  const st = await statOrNull(dir);
  if (!st?.isDirectory()) return false;
  return (await statOrNull(join(dir, ADAPTER_CONFIG_FILE)))?.isFile() ?? false;
}

/** Validate a parsed `adapter_config.json` object. `file` is named in errors. */
export function parseLoraConfig(json: unknown, file?: string): LoraAdapterConfig {
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new AmalgamError('E_CONFIG', 'adapter config is not a JSON object', { file });
  }
  const o = json as Record<string, unknown>;
  const pt = o['peft_type'];
  if (pt === undefined) {
    throw new AmalgamError('E_CONFIG', 'missing "peft_type"', { file, key: 'peft_type', hint: 'LoRA adapters have "peft_type": "LORA"' });
  }
  if (pt !== 'LORA') {
    throw new AmalgamError('E_UNSUPPORTED', `peft_type is ${JSON.stringify(pt)}; only LoRA adapters ("LORA") are supported`, { file, key: 'peft_type' });
  }
  const r = loraConfigSchema.safeParse(o);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    const key = issue.path.map(String).join('.');
    const got = issue.path.reduce<unknown>((v, k) => (v !== null && typeof v === 'object' ? (v as Record<string, unknown>)[k as string] : undefined), o);
    throw new AmalgamError('E_CONFIG', `invalid value ${JSON.stringify(got)}: ${issue.message}`, { file, key: key || undefined });
  }
  const cfg = r.data;
  if (cfg.use_dora) {
    throw new AmalgamError('E_UNSUPPORTED', 'DoRA adapters (use_dora: true) are not supported', {
      file,
      key: 'use_dora',
      hint: 'use a plain LoRA adapter, or merge this adapter into its base model with PEFT and use the merged model',
    });
  }
  if (cfg.lora_bias) {
    throw new AmalgamError('E_UNSUPPORTED', 'adapters with LoRA biases (lora_bias: true) are not supported', {
      file,
      key: 'lora_bias',
      hint: 'use a LoRA adapter trained without lora_bias, or merge it into its base model with PEFT first',
    });
  }
  const replication = o['layer_replication'];
  if (replication !== null && replication !== undefined && !(Array.isArray(replication) && replication.length === 0)) {
    throw new AmalgamError('E_UNSUPPORTED', 'layer_replication adapters are not supported: they apply to a model whose layers PEFT duplicates, which the base does not have', {
      file,
      key: 'layer_replication',
      hint: 'merge the adapter with PEFT (merge_and_unload) and use the merged model',
    });
  }
  const init = o['init_lora_weights'];
  if (typeof init === 'string' && /^(pissa|olora|corda|loftq)/i.test(init)) {
    throw new AmalgamError('E_UNSUPPORTED', `init_lora_weights is ${JSON.stringify(init)}: this initialisation changes the base weights, so W + s·B·A on the original base model is not the trained model`, {
      file,
      key: 'init_lora_weights',
      hint: 'save the adapter converted to plain LoRA with PEFT (save_pretrained with path_initial_model_for_weight_conversion), or, if the base you apply it to is the modified base saved with it, set "init_lora_weights": true',
    });
  }
  if (o['trainable_token_indices'] !== null && o['trainable_token_indices'] !== undefined) {
    throw new AmalgamError('E_UNSUPPORTED', 'adapters with trainable tokens (trainable_token_indices) are not supported', {
      file,
      key: 'trainable_token_indices',
      hint: 'merge the adapter with PEFT (merge_and_unload) and use the merged model',
    });
  }
  const alora = o['alora_invocation_tokens'];
  if (alora !== null && alora !== undefined && !(Array.isArray(alora) && alora.length === 0)) {
    throw new AmalgamError('E_UNSUPPORTED', 'activated LoRA adapters (alora_invocation_tokens) apply their update only after the invocation tokens, which a merged weight cannot do', {
      file,
      key: 'alora_invocation_tokens',
      hint: 'use the adapter with PEFT at inference time instead of merging it',
    });
  }
  if (o['use_qalora'] === true) {
    throw new AmalgamError('E_UNSUPPORTED', 'QA-LoRA adapters (use_qalora: true) are not supported: their lora_A acts on pooled input groups', {
      file,
      key: 'use_qalora',
      hint: 'merge the adapter with PEFT and use the merged model',
    });
  }
  if (cfg.target_parameters?.length) {
    throw new AmalgamError('E_UNSUPPORTED', 'adapters on bare parameters (target_parameters) are not supported', { file, key: 'target_parameters' });
  }
  for (const which of ['rank_pattern', 'alpha_pattern'] as const) {
    for (const p of Object.keys(cfg[which])) {
      try {
        patternRegExp(p);
      } catch (e) {
        throw new AmalgamError('E_CONFIG', `pattern is not a valid regular expression: ${(e as Error).message}`, { file, key: `${which}.${p}` });
      }
    }
  }
  for (const p of cfg.layers_pattern === null || cfg.layers_pattern === undefined ? [] : typeof cfg.layers_pattern === 'string' ? [cfg.layers_pattern] : cfg.layers_pattern) {
    try {
      new RegExp(p);
    } catch (e) {
      throw new AmalgamError('E_CONFIG', `layers_pattern is not a valid regular expression: ${(e as Error).message}`, { file, key: 'layers_pattern' });
    }
  }
  if (typeof cfg.target_modules === 'string') {
    try {
      new RegExp(cfg.target_modules);
    } catch (e) {
      throw new AmalgamError('E_CONFIG', `target_modules is not a valid regular expression: ${(e as Error).message}`, { file, key: 'target_modules' });
    }
  }
  return cfg;
}

/** PEFT's pattern-key rule: the key matches the whole module path or a dotted suffix of it. */
function patternRegExp(key: string): RegExp {
  return new RegExp(`^(?:.*\\.)?(?:${key})$`);
}

/** The first key of a rank/alpha pattern (in stored order) that matches a module path. */
export function matchPatternKey(pattern: Record<string, unknown>, modulePath: string): string | undefined {
  return Object.keys(pattern).find((k) => patternRegExp(k).test(modulePath));
}

/** Rank, α and scaling a config gives a module (honouring rank_pattern / alpha_pattern / use_rslora). */
export function loraModuleParams(config: LoraAdapterConfig, modulePath: string): { rank: number; alpha: number; scaling: number } {
  const rk = matchPatternKey(config.rank_pattern, modulePath);
  const ak = matchPatternKey(config.alpha_pattern, modulePath);
  const rank = rk !== undefined ? config.rank_pattern[rk]! : config.r;
  const alpha = ak !== undefined ? config.alpha_pattern[ak]! : config.lora_alpha;
  return { rank, alpha, scaling: loraScaling(alpha, rank, config.use_rslora) };
}

/** s = α/r, or α/√r for rank-stabilised LoRA. */
export function loraScaling(alpha: number, rank: number, useRslora: boolean): number {
  return useRslora ? alpha / Math.sqrt(rank) : alpha / rank;
}

/** Whether the config's target_modules / exclude_modules select a module path (PEFT's rules). */
export function targetsModule(config: LoraAdapterConfig, modulePath: string): boolean {
  const matches = (spec: string | string[] | null | undefined): boolean => {
    if (spec === null || spec === undefined) return false;
    if (typeof spec === 'string') return new RegExp(`^(?:${spec})$`).test(modulePath);
    return spec.some((k) => modulePath === k || modulePath.endsWith(`.${k}`));
  };
  if (matches(config.exclude_modules)) return false;
  return matches(config.target_modules);
}

const LORA_LINEAR = /^(.*)\.lora_([AB])\.weight$/;
const LORA_EMBEDDING = /^(.*)\.lora_embedding_([AB])$/;
const DORA = /\.lora_magnitude_vector(\.|$)/;
const LORA_BIAS = /\.lora_B\.bias$/;

function stripPrefix(name: string): string {
  return name.startsWith(PEFT_PREFIX) ? name.slice(PEFT_PREFIX.length) : name;
}

function shapeText(t: TensorInfo): string {
  return JSON.stringify(t.shape);
}

interface Pair {
  path: string;
  kind: 'linear' | 'embedding';
  a?: TensorInfo;
  b?: TensorInfo;
}

/** Pair and check the LoRA tensors of an adapter file against its config. */
export function analyseAdapterTensors(
  tensors: readonly TensorInfo[],
  config: LoraAdapterConfig,
  file?: string,
): { modules: LoraModule[]; savedModules: SavedModuleTensor[] } {
  const pairs = new Map<string, Pair>();
  const others: TensorInfo[] = [];
  for (const t of tensors) {
    if (DORA.test(t.name)) {
      throw new AmalgamError('E_UNSUPPORTED', 'the adapter holds DoRA magnitude vectors, which are not supported', {
        file,
        key: t.name,
        hint: 'use a plain LoRA adapter, or merge this adapter into its base model with PEFT and use the merged model',
      });
    }
    if (LORA_BIAS.test(t.name)) {
      throw new AmalgamError('E_UNSUPPORTED', 'the adapter holds LoRA biases (lora_bias), which are not supported', { file, key: t.name });
    }
    const lin = LORA_LINEAR.exec(t.name);
    const m = lin ?? LORA_EMBEDDING.exec(t.name);
    if (m) {
      const kind = lin ? 'linear' : 'embedding';
      const path = stripPrefix(m[1]!);
      const key = `${kind}:${path}`;
      let p = pairs.get(key);
      if (!p) pairs.set(key, (p = { path, kind }));
      if (m[2] === 'A') p.a = t;
      else p.b = t;
      continue;
    }
    if (/\.lora_[A-Za-z_]+/.test(t.name)) {
      throw new AmalgamError('E_FORMAT', 'unrecognised LoRA tensor name', {
        file,
        key: t.name,
        hint: 'LoRA tensors are named <module>.lora_A.weight / .lora_B.weight (or .lora_embedding_A / _B for embeddings)',
      });
    }
    others.push(t);
  }

  const modules: LoraModule[] = [];
  const paths = new Set<string>();
  for (const p of pairs.values()) {
    if (!p.a || !p.b) {
      const have = (p.a ?? p.b)!;
      const other = p.a ? have.name.replace(/lora_(embedding_)?A(?=\.weight$|$)/, 'lora_$1B') : have.name.replace(/lora_(embedding_)?B(?=\.weight$|$)/, 'lora_$1A');
      throw new AmalgamError('E_MISSING', `${p.a ? 'lora_A' : 'lora_B'} has no partner: '${other}' is missing`, {
        file,
        key: have.name,
        hint: 'every LoRA module needs both factors; the adapter file is incomplete',
      });
    }
    if (paths.has(p.path)) {
      throw new AmalgamError('E_DUPLICATE', 'module has both linear and embedding LoRA factors', { file, key: p.a.name });
    }
    paths.add(p.path);
    const { a, b } = p;
    for (const t of [a, b]) {
      if (t.shape.length !== 2) {
        throw new AmalgamError(t.shape.length === 4 ? 'E_UNSUPPORTED' : 'E_SHAPE', `LoRA factor has shape ${shapeText(t)}; only 2-D factors (linear and embedding layers) are supported`, {
          file,
          key: t.name,
        });
      }
      if (!isFloatDType(t.dtype)) {
        throw new AmalgamError('E_DTYPE', `LoRA factor has dtype ${t.dtype}, expected a float type`, { file, key: t.name });
      }
    }
    const rankA = a.shape[0]!;
    const rankB = b.shape[1]!;
    if (rankA !== rankB) {
      throw new AmalgamError('E_SHAPE', `rank mismatch: lora_B has shape ${shapeText(b)} (rank ${rankB}) but '${a.name}' has shape ${shapeText(a)} (rank ${rankA})`, {
        file,
        key: b.name,
        hint: 'A is [r, in] and B is [out, r]; the two factors must come from the same module',
      });
    }
    const params = loraModuleParams(config, p.path);
    if (params.rank !== rankA) {
      const rk = matchPatternKey(config.rank_pattern, p.path);
      throw new AmalgamError('E_SHAPE', `tensor rank ${rankA} (shape ${shapeText(a)}) differs from the configured rank ${params.rank} (${rk !== undefined ? `rank_pattern "${rk}"` : '"r"'})`, {
        file,
        key: a.name,
        hint: 'adapter_config.json does not describe these weights: correct "r" or "rank_pattern"',
      });
    }
    if (rankA === 0) throw new AmalgamError('E_SHAPE', 'LoRA factor has rank 0', { file, key: a.name });
    const inFeatures = a.shape[1]!;
    const outFeatures = b.shape[0]!;
    const fanInFanOut = p.kind === 'linear' && config.fan_in_fan_out;
    const deltaShape: [number, number] = p.kind === 'embedding' ? [inFeatures, outFeatures] : fanInFanOut ? [inFeatures, outFeatures] : [outFeatures, inFeatures];
    modules.push({
      path: p.path,
      target: `${p.path}.weight`,
      kind: p.kind,
      aName: a.name,
      bName: b.name,
      rank: rankA,
      inFeatures,
      outFeatures,
      alpha: params.alpha,
      scaling: params.scaling,
      fanInFanOut,
      deltaShape,
    });
  }

  // Tensors saved in full. The weight of a LoRA module itself (`<module>.base_layer.weight`, or
  // `<module>.weight` from PEFT < 0.7) is the weight its update is added to; `.base_layer` is
  // dropped from other names (biases of wrapped layers under bias "all" / "lora_only").
  const byPath = new Map(modules.map((m) => [m.path, m]));
  const saved: SavedModuleTensor[] = [];
  for (const t of others) {
    const plain = stripPrefix(t.name);
    const own = /^(.*?)(\.base_layer)?\.weight$/.exec(plain);
    const m = own ? byPath.get(own[1]!) : undefined;
    if (m) {
      if (m.baseName !== undefined) {
        throw new AmalgamError('E_DUPLICATE', `the adapter saves the weight of LoRA module ${m.path} twice, also as '${m.baseName}'`, {
          file,
          key: t.name,
          hint: 'keep one of the two tensors in the adapter file',
        });
      }
      if (t.shape.length !== 2 || !isFloatDType(t.dtype)) {
        throw new AmalgamError('E_SHAPE', `the saved weight of LoRA module ${m.path} has shape ${shapeText(t)} and dtype ${t.dtype}; expected a 2-D float tensor`, { file, key: t.name });
      }
      m.baseName = t.name;
      continue;
    }
    saved.push(classifySaved(t.name, config));
  }
  return { modules, savedModules: saved };
}

function classifySaved(name: string, config: LoraAdapterConfig): SavedModuleTensor {
  const target = stripPrefix(name)
    .replace(/\.modules_to_save\.[^.]+(?=\.)/, '')
    .replace(/\.base_layer(?=\.)/g, '');
  const modulePath = target.includes('.') ? target.slice(0, target.lastIndexOf('.')) : '';
  const mts = config.modules_to_save ?? [];
  if (mts.some((m) => modulePath === m || modulePath.endsWith(`.${m}`))) return { name, target, kind: 'modules_to_save' };
  if (target.endsWith('.bias')) return { name, target, kind: 'bias' };
  if (/(^|\.)(embed_tokens|lm_head|wte|embed_in|embed_out)\.weight$/.test(target)) return { name, target, kind: 'embedding' };
  return { name, target, kind: 'other' };
}

/** Read and validate a PEFT LoRA adapter folder. */
export async function readPeftAdapter(dir: string): Promise<PeftAdapter> {
  const st = await statOrNull(dir);
  if (!st) throw new AmalgamError('E_IO', 'adapter folder does not exist', { file: dir });
  if (!st.isDirectory()) {
    throw new AmalgamError('E_IO', 'expected an adapter folder, got a file', { file: dir, hint: 'pass the folder that holds adapter_config.json' });
  }
  const configPath = join(dir, ADAPTER_CONFIG_FILE);
  if (!(await statOrNull(configPath))) {
    const isModel = !!(await statOrNull(join(dir, 'config.json')));
    // save_pretrained writes adapters not named "default" to <dir>/<adapter name>/.
    const named: string[] = [];
    if (!isModel) {
      for (const e of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
        if (e.isDirectory() && (await statOrNull(join(dir, e.name, ADAPTER_CONFIG_FILE)))?.isFile()) named.push(e.name);
      }
      named.sort();
    }
    throw new AmalgamError('E_MISSING', `no ${ADAPTER_CONFIG_FILE} in the adapter folder`, {
      file: dir,
      key: ADAPTER_CONFIG_FILE,
      hint: isModel
        ? 'this looks like a full model folder (config.json), not a PEFT adapter'
        : named.length
          ? `it holds named adapters (PEFT saves adapters not named "default" in subfolders); pass one of: ${named.map((n) => join(dir, n)).join(', ')}`
          : 'a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors, as written by save_pretrained',
    });
  }
  const json = await readJsonObject(configPath);
  const config = parseLoraConfig(json, configPath);

  const weightsPath = join(dir, ADAPTER_WEIGHTS_FILE);
  if (!(await statOrNull(weightsPath))) {
    if (await statOrNull(join(dir, ADAPTER_LEGACY_WEIGHTS_FILE))) {
      throw new AmalgamError('E_UNSUPPORTED', `the adapter weights are a legacy PyTorch pickle (${ADAPTER_LEGACY_WEIGHTS_FILE}), which amalgam does not read`, {
        file: dir,
        key: ADAPTER_LEGACY_WEIGHTS_FILE,
        hint: "convert it to safetensors first, e.g. in Python: safetensors.torch.save_file(torch.load('adapter_model.bin'), 'adapter_model.safetensors')",
      });
    }
    throw new AmalgamError('E_MISSING', `no ${ADAPTER_WEIGHTS_FILE} in the adapter folder`, { file: dir, key: ADAPTER_WEIGHTS_FILE, hint: 'copy the adapter weights next to adapter_config.json' });
  }
  const source = await SafetensorsFile.open(weightsPath);
  try {
    const tensors = source.tensors();
    const { modules, savedModules } = analyseAdapterTensors(tensors, config, weightsPath);
    if (modules.length === 0 && savedModules.length === 0) {
      throw new AmalgamError('E_FORMAT', 'the adapter file holds no tensors', { file: weightsPath });
    }
    return { dir, configPath, weightsPath, config, source, modules, savedModules, close: () => source.close() };
  } catch (e) {
    await source.close();
    throw e;
  }
}
