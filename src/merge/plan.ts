/**
 * Planning a merge (merge-methods.md §6.10, §9.2): from a validated configuration and the input
 * models' headers, the complete list of output tensors, each with the input tensors it reads,
 * its output shape and dtype, and its fully resolved parameters. Everything that can be wrong
 * with a configuration is found here, before any tensor data is read. The plan is plain data
 * (JSON-serialisable); `executeMerge` carries it out.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { isAbsolute, join, resolve } from 'node:path';
import { stringify as stringifyYaml } from 'yaml';
import { AmalgamError } from '../errors.js';
import { expandTemplate, configValue } from '../arch/templates.js';
import type { ArchitectureDef, ResolvedArchitecture, ResolvedWeight, WeightDef, WeightSection } from '../arch/types.js';
import { formatPath, type PathSegment } from '../config/issues.js';
import { configContainer, effectiveOutDtype, effectiveTokenizer, referencedModels, sliceLayout, type ConfigContainer, type LayoutSlice } from '../config/layout.js';
import { sameModel } from '../config/model-ref.js';
import { ParameterResolver, type TensorPosition } from '../config/parameters.js';
import type { MergeConfig, ModelReference, TokenizerConfig } from '../config/types.js';
import { getConfigDtype, openModelFolder, setConfigDtype, type HfConfig, type HfModelFolder, type OpenModelFolderOptions } from '../io/hf.js';
import { byteSize, isFloatDType, numel, parseFloatDType, type DType, type FloatDType } from '../tensor/dtype.js';
import {
  buildMergedVocabulary,
  readHfVocabulary,
  tokensById,
  loadModelTokenizer,
  mergedTokenizerFiles,
  resolveChatTemplate,
  withChatTemplate,
  type MergedVocabulary,
  type ModelTokenizer,
} from '../tokenizer/merge.js';
import {
  checkEmbeddingWidths,
  planEmbeddingPermutation,
  plannedEmbedShape,
  type DefaultRow,
  type EmbeddingPermutation,
  type EmbeddingRowRef,
} from './embed.js';
import { checkAdapterForModel } from '../lora/apply.js';
import { parseLlamaConfig } from '../nn/config.js';
import { llamaParameterShapes } from '../nn/params.js';
import { getMergeMethod, prepareParams } from './registry.js';
import type { MergeMethod, ResolvedParams } from './types.js';

/** A model folder the merge reads. */
export interface PlannedModel {
  /** The model reference as written in the configuration (canonical form); inputs refer to it. */
  id: string;
  /** Absolute path of the model folder. */
  path: string;
  /** Resolved architecture definition name. */
  architecture: string;
  /** `architectures[0]` of its config.json, where present. */
  configArchitecture?: string;
  numLayers: number;
  /** Distinct stored dtypes of its tensors. */
  dtypes: DType[];
  tensorCount: number;
  /** Bytes of tensor data in the folder. */
  bytes: number;
  /** Hugging Face id the model's config.json records (`_name_or_path`), when it is an `org/name` id. */
  hubId?: string;
  /** Absolute path of the PEFT LoRA adapter applied to each tensor as it is read (`model+adapter`). */
  adapter?: string;
}

/** One input tensor of an output tensor. */
export interface PlannedInput {
  /** Model id (see PlannedModel.id). */
  model: string;
  /** Name the tensor is stored under in that model (a tied stand-in where `tiedFor` is set). */
  tensor: string;
  /** The weight's own input name (the name per-model parameter filters saw). */
  weight: string;
  /** Set when the model lacks the weight and contributes the tensor it is tied to. */
  tiedFor?: string;
  dtype: DType;
  shape: number[];
}

/** One output tensor. */
export interface PlannedTensor {
  /** Position in the plan (and in the output layout). */
  index: number;
  name: string;
  dtype: DType;
  shape: number[];
  /** `merge`: read as float32 and merged; `copy`: a non-float tensor copied byte for byte from the first input. */
  kind: 'merge' | 'copy';
  section: WeightSection;
  /** Output layer index of a layer weight. */
  layer?: number;
  /** Output slice it belongs to (pre weights: the first, post weights: the last). */
  slice: number;
  /** Gradient position used for its parameters. */
  t: number;
  isEmbed: boolean;
  isOptional: boolean;
  /** Model id of the base model among the inputs, or null. */
  base: string | null;
  /** In merge order: the slice's sources in configuration order. */
  inputs: PlannedInput[];
  /** Resolved and validated parameters (defaults applied). */
  params: ResolvedParams;
  /**
   * Set for an embedding merged on a built output vocabulary: each input is permuted onto it
   * (`shape` is then [output rows, width]; the inputs keep their own shapes).
   */
  permutation?: PlannedPermutation;
}

/** The permutation of one embedding tensor onto the output vocabulary, as plain data (see `merge/embed.ts`). */
export interface PlannedPermutation {
  /** The models whose rows are used: the tensor's inputs. */
  models: string[];
  /** The base model of the default-row rule, or null. */
  base: string | null;
  /** Output token ids 0 … tokenCount − 1; rows from tokenCount on are padding. */
  tokenCount: number;
  /** Rows of every permuted matrix. */
  rowCount: number;
  /** Per model: for each output token id, the model's own row, or −1 for the token's default row. */
  rows: { model: string; rows: number[] }[];
  /** Default rows, by output token id: the mean of `from` (none: zeros). */
  defaults: { id: number; rule: DefaultRow['rule']; from: EmbeddingRowRef[] }[];
}

/** The output vocabulary built for `tokenizer` / `tokenizer_source`. */
export interface PlannedTokenizer {
  /** `base`, `union`, or the id of the model whose tokenizer is used. */
  source: string;
  /** The model the vocabulary starts from: `base_model`, else the first model. */
  base: string;
  /** Output token by id (null where no token has the id). */
  tokens: (string | null)[];
  tokenCount: number;
  /** Rows of the output embeddings: the output `vocab_size`. */
  rowCount: number;
  /** Tokens appended to the donor tokenizer, in id order. */
  appended: string[];
}

export interface PlannedSlice {
  index: number;
  outputStart: number;
  length: number;
  base: string | null;
  sources: { model: string; start: number }[];
}

export interface PlanStats {
  tensors: number;
  /** Values written. */
  parameters: number;
  /** Bytes of tensor data read from the inputs. */
  readBytes: number;
  /** Bytes of tensor data written. */
  writeBytes: number;
  /** The largest tensor (input or output) as float32. */
  largestTensor: { name: string; f32Bytes: number };
  /** Most inputs of any one tensor. */
  maxInputs: number;
  /**
   * The executor's default memory bound for tensor buffers: (inputs + 3) × float32 size, maximised
   * over the tensors (merge-methods.md §9.5).
   */
  memoryBound: number;
}

/** Everything the executor needs, as plain data. */
export interface MergePlan {
  formatVersion: 1;
  method: string;
  methodPrettyName: string;
  methodReference?: string;
  randomized: boolean;
  /** Seed of randomized methods; each tensor derives its own stream from it and its name. */
  randomSeed: number | null;
  /** `dtype`: inputs are rounded to it when read (null: no rounding). */
  computeDtype: FloatDType | null;
  /** `out_dtype`, else `dtype` (null: each tensor keeps its base dtype). */
  outDtype: FloatDType | null;
  config: MergeConfig;
  /** The configuration as YAML (copied into the output folder and the model card). */
  configYaml: string;
  baseModel: string | null;
  models: PlannedModel[];
  /** Model whose config.json (and tokenizer) the output takes. */
  donor: string;
  architecture: string;
  /** Output layer count. */
  numLayers: number;
  slices: PlannedSlice[];
  outputConfig: HfConfig;
  tensors: PlannedTensor[];
  /** Files copied from the donor (tokenizer, generation config); empty when not copying. */
  tokenizerFiles: { from: string; files: string[] };
  /** Set when an output vocabulary was built (`tokenizer` / `tokenizer_source`). */
  tokenizer: PlannedTokenizer | null;
  /** The chat template written to the output (`chat_template`), or null. */
  chatTemplate: string | null;
  /**
   * Tokenizer files written by amalgam, name → contents: the built tokenizer, or the donor's
   * tokenizer_config.json with the chat template set. They replace copied files of the same name.
   */
  generatedFiles: Record<string, string>;
  warnings: string[];
  stats: PlanStats;
}

export interface PlanOptions {
  /** Allow inputs of different architectures (mergekit's `--allow-crimes`). */
  allowCrimes?: boolean;
  /** Folder relative model paths are resolved against (default: the working folder). */
  baseDir?: string;
  /** Seed for randomized methods (default 0). */
  randomSeed?: number;
  /** Copy the tokenizer files of the donor model (default true). */
  copyTokenizer?: boolean;
  /** The configuration's YAML text, kept verbatim in the output (default: the parsed configuration re-serialised). */
  configYaml?: string;
  /** Receives non-fatal remarks as they are found (they are also listed in `plan.warnings`). */
  onWarning?: (message: string) => void;
  /**
   * Opens a model folder (default `openModelFolder`). A hook for tests and for other sources:
   * planning only lists tensors, so a wrapped source can prove that no tensor data is read.
   */
  openModel?: (dir: string, opts: OpenModelFolderOptions) => Promise<HfModelFolder>;
}

/** Methods whose sparsifier keeps ⌊density·numel⌋ elements (k = 0 is reported up front). */
const MAGNITUDE_TOPK = new Set(['ties']);

const shapeStr = (s: readonly number[]) => `[${s.join(', ')}]`;
const sameShape = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((d, i) => d === b[i]);

function configErr(message: string, key: string, hint?: string): AmalgamError {
  return new AmalgamError('E_CONFIG', message, { key, ...(hint ? { hint } : {}) });
}

// ---------------------------------------------------------------------------------------------
// Checks that need no model

/**
 * The module a `modules:` configuration merges. amalgam's architectures have one module, named
 * `default` as mergekit names the module of a single-module model; undefined without `modules:`.
 */
function moduleOf(config: MergeConfig): string | undefined {
  return config.modules === undefined ? undefined : DEFAULT_MODULE;
}

const DEFAULT_MODULE = 'default';

function checkUnsupported(config: MergeConfig): void {
  if (config.modules !== undefined) {
    const names = Object.keys(config.modules);
    if (names.length !== 1 || names[0] !== DEFAULT_MODULE) {
      throw new AmalgamError(
        'E_UNSUPPORTED',
        `\`modules:\` names ${names.map((n) => `\`${n}\``).join(', ')}; amalgam's architectures have a single module, \`${DEFAULT_MODULE}\` (multi-module models such as VLMs are not supported yet)`,
        { key: 'modules', hint: `put the models or slices under \`modules: {${DEFAULT_MODULE}: ...}\`, or at the top level` },
      );
    }
  }
  for (const ref of referencedModels(config)) {
    if (ref.adapterRevision !== undefined) {
      throw new AmalgamError('E_UNSUPPORTED', `model \`${ref.id}\` names an adapter revision (@${ref.adapterRevision}); amalgam reads local adapter folders only`, {
        key: ref.id,
        hint: 'download that revision of the adapter into a folder and reference the folder',
      });
    }
    if (ref.revision !== undefined) {
      throw new AmalgamError('E_UNSUPPORTED', `model \`${ref.id}\` names a revision (@${ref.revision}); amalgam reads local model folders only`, {
        key: ref.id,
        hint: 'download that revision into a folder and reference the folder',
      });
    }
  }
}

function looksLikeHubId(path: string): boolean {
  return /^[A-Za-z0-9][\w.-]*\/[\w.-]+$/.test(path) && !path.startsWith('.');
}

async function modelDir(ref: ModelReference, baseDir: string): Promise<string> {
  const dir = isAbsolute(ref.model) ? ref.model : resolve(baseDir, ref.model);
  try {
    await stat(dir);
  } catch {
    if (looksLikeHubId(ref.model)) {
      throw new AmalgamError('E_IO', `model \`${ref.model}\` is not a local folder (${dir} does not exist); amalgam does not download models`, {
        key: ref.id,
        hint: `download it first, e.g. \`huggingface-cli download ${ref.model} --local-dir <folder>\`, and reference that folder`,
      });
    }
    throw new AmalgamError('E_IO', `model folder ${dir} does not exist`, {
      key: ref.id,
      hint: `relative model paths are resolved against ${baseDir}`,
    });
  }
  return dir;
}

/** Resolves and checks (headers only) the adapter of a `model+adapter` reference; returns its path. */
async function checkModelAdapter(ref: ModelReference, adapter: string, folder: HfModelFolder, baseDir: string): Promise<string> {
  const dir = isAbsolute(adapter) ? adapter : resolve(baseDir, adapter);
  try {
    await stat(dir);
  } catch {
    throw new AmalgamError('E_IO', `LoRA adapter folder ${dir} does not exist${looksLikeHubId(adapter) ? '; amalgam does not download adapters' : ''}`, {
      key: ref.id,
      hint: looksLikeHubId(adapter) ? `download it first, e.g. \`huggingface-cli download ${adapter} --local-dir <folder>\`, and reference that folder` : `relative adapter paths are resolved against ${baseDir}`,
    });
  }
  await checkAdapterForModel(folder.source, dir, { baseLabel: ref.id });
  return dir;
}

// ---------------------------------------------------------------------------------------------
// Model references

const isModelRef = (v: unknown): v is ModelReference =>
  v !== null && typeof v === 'object' && !Array.isArray(v) && typeof (v as ModelReference).id === 'string' && typeof (v as ModelReference).model === 'string';

/** The folder (and adapter folder) a local reference reads, independent of how the path is spelled. */
function referenceKey(ref: ModelReference, baseDir: string): string {
  const abs = (p: string) => (isAbsolute(p) ? resolve(p) : resolve(baseDir, p));
  return JSON.stringify([
    abs(ref.model),
    ref.revision ?? null,
    ref.adapter !== undefined ? abs(ref.adapter) : null,
    ref.adapterRevision ?? null,
    ref.overrideArchitecture ?? null,
  ]);
}

/**
 * Makes every spelling of one model folder (`./models/a`, `models/a/`, an absolute path) the
 * same reference: the first one written (base model first, then the inputs in YAML order).
 * mergekit compares the strings, so a base model listed under another spelling is merged twice.
 * Returns the configuration unchanged when every folder has one spelling.
 */
export function unifyModelReferences(config: MergeConfig, baseDir: string, warn: (m: string) => void = () => {}): MergeConfig {
  const first = new Map<string, ModelReference>();
  const note = (ref: ModelReference) => {
    const key = referenceKey(ref, baseDir);
    if (!first.has(key)) first.set(key, ref);
  };
  referencedModels(config).forEach(note);
  const renamed = new Map<string, string>();
  const walk = (v: unknown): unknown => {
    if (isModelRef(v)) {
      note(v);
      const canon = first.get(referenceKey(v, baseDir))!;
      if (canon.id === v.id) return v;
      renamed.set(v.id, canon.id);
      return canon;
    }
    if (Array.isArray(v)) return v.map(walk);
    if (v !== null && typeof v === 'object') {
      return Object.fromEntries(Object.entries(v as Record<string, unknown>).map(([k, x]) => [k, walk(x)]));
    }
    return v;
  };
  const out = walk(config) as MergeConfig;
  if (!renamed.size) return config;
  for (const [from, to] of renamed) warn(`\`${from}\` and \`${to}\` name the same model folder; both are read as one model, \`${to}\``);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Models

interface OpenedModel {
  ref: ModelReference;
  folder: HfModelFolder;
  arch: ResolvedArchitecture;
  planned: PlannedModel;
}

async function openModels(config: MergeConfig, opts: PlanOptions, warn: (m: string) => void): Promise<OpenedModel[]> {
  const baseDir = resolve(opts.baseDir ?? process.cwd());
  const open = opts.openModel ?? ((dir: string, o: OpenModelFolderOptions) => openModelFolder(dir, o));
  const out: OpenedModel[] = [];
  try {
    for (const ref of referencedModels(config)) {
      const dir = await modelDir(ref, baseDir);
      const o: OpenModelFolderOptions = {};
      if (ref.overrideArchitecture !== undefined) o.architecture = ref.overrideArchitecture;
      let folder: HfModelFolder;
      try {
        folder = await open(dir, o);
      } catch (e) {
        if (e instanceof AmalgamError && e.key === undefined) {
          throw new AmalgamError(e.code, `model \`${ref.id}\`: ${e.message}`, { key: ref.id, cause: e });
        }
        throw e;
      }
      const tensors = folder.source.tensors();
      const dtypes = [...new Set(tensors.map((t) => t.dtype))];
      let bytes = 0;
      for (const t of tensors) bytes += byteSize(t.dtype, numel(t.shape)) ?? 0;
      const archs = configValue(folder.config, 'architectures');
      const planned: PlannedModel = {
        id: ref.id,
        path: dir,
        architecture: folder.architecture.name,
        numLayers: folder.architecture.numLayers,
        dtypes,
        tensorCount: tensors.length,
        bytes,
      };
      if (Array.isArray(archs) && typeof archs[0] === 'string') planned.configArchitecture = archs[0];
      const nameOrPath = folder.config['_name_or_path'];
      if (typeof nameOrPath === 'string' && looksLikeHubId(nameOrPath)) planned.hubId = nameOrPath;
      for (const w of folder.architecture.warnings) warn(`model ${ref.id}: ${w}`);
      out.push({ ref, folder, arch: folder.architecture, planned });
      if (ref.adapter !== undefined) planned.adapter = await checkModelAdapter(ref, ref.adapter, folder, baseDir);
    }
  } catch (e) {
    await Promise.all(out.map((m) => m.folder.close().catch(() => {})));
    throw e;
  }
  return out;
}

function checkArchitectures(models: OpenedModel[], allowCrimes: boolean, warn: (m: string) => void): void {
  const first = models[0]!;
  const label = (m: OpenedModel) => `${m.ref.id} (${m.planned.configArchitecture ?? m.arch.name})`;
  const differing = models.filter(
    (m) => m.arch.name !== first.arch.name || (m.planned.configArchitecture ?? '') !== (first.planned.configArchitecture ?? ''),
  );
  if (!differing.length) return;
  const list = [first, ...differing].map(label).join(', ');
  if (!allowCrimes) {
    throw new AmalgamError('E_ARCH', `the models have different architectures: ${list}`, {
      key: 'architectures',
      hint: 'merge models of one architecture, or pass --allow-crimes (allowCrimes) to merge them anyway by tensor name',
    });
  }
  warn(`merging models of different architectures (${list}) because crimes are allowed`);
}

// ---------------------------------------------------------------------------------------------
// Layout

function modelsFormLayerCount(container: ConfigContainer, baseModel: ModelReference | undefined, at: PathSegment[], byId: Map<string, OpenedModel>): number {
  const entries = (container.models ?? []).map((m) => m.model);
  if (baseModel) entries.push(baseModel);
  const counts = entries.map((r) => ({ id: r.id, n: byId.get(r.id)!.planned.numLayers }));
  const n = counts[0]!.n;
  const odd = counts.filter((c) => c.n !== n);
  if (odd.length) {
    throw configErr(
      `the models have different layer counts (${counts.map((c) => `${c.id}: ${c.n}`).join(', ')}); the \`models:\` form merges every layer of every model`,
      formatPath([...at, 'models']),
      'use `slices:` with explicit `layer_range`s to merge models of different depths',
    );
  }
  return n;
}

function checkLayerRanges(container: ConfigContainer, at: PathSegment[], byId: Map<string, OpenedModel>): void {
  container.slices?.forEach((s, i) => {
    s.sources.forEach((src, j) => {
      const m = byId.get(src.model.id)!;
      const n = m.planned.numLayers;
      const [a, b] = src.layer_range;
      if (a < 0 || b > n || a >= b) {
        throw configErr(
          `layer_range [${a}, ${b}] of model ${src.model.id} is out of bounds: the model has ${n} layers (0..${n - 1})`,
          formatPath([...at, 'slices', i, 'sources', j, 'layer_range']),
          `the end of layer_range is exclusive, so the widest range is [0, ${n}]`,
        );
      }
    });
    const seen = new Set<string>();
    s.sources.forEach((src, j) => {
      if (seen.has(src.model.id)) {
        throw configErr(
          `model ${src.model.id} appears twice among the sources of slice ${i}; each model can give one tensor per output tensor`,
          formatPath([...at, 'slices', i, 'sources', j, 'model']),
          'put the layer ranges into separate slices',
        );
      }
      seen.add(src.model.id);
    });
  });
  if (container.models) {
    const seen = new Set<string>();
    container.models.forEach((m, i) => {
      if (seen.has(m.model.id)) {
        throw configErr(`model ${m.model.id} is listed twice`, formatPath([...at, 'models', i, 'model']), 'list each model once');
      }
      seen.add(m.model.id);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Inputs of one output tensor

interface Found {
  stored: string;
  tiedFor?: string;
}

/** Where a model keeps a weight: its own name or an alias, else a tied stand-in, else nothing. */
function findWeight(m: OpenedModel, name: string, aliases: string[], tiedNames: string[]): Found | null {
  let w: ResolvedWeight | undefined = m.arch.weight(name);
  for (const a of aliases) w ??= m.arch.weight(a);
  if (w) {
    if (w.present && w.storedName !== undefined) return { stored: w.storedName };
    if (w.tiedTo !== undefined) return { stored: w.tiedTo, tiedFor: name };
    return null;
  }
  // A model of another architecture (allowed crimes): look the names up directly.
  for (const n of [name, ...aliases]) if (m.folder.source.has(n)) return { stored: n };
  for (const t of tiedNames) {
    const tw = m.arch.weight(t);
    if (tw?.present && tw.storedName !== undefined) return { stored: tw.storedName, tiedFor: name };
    if (m.folder.source.has(t)) return { stored: t, tiedFor: name };
  }
  return null;
}

interface OutputWeight {
  def: WeightDef;
  section: WeightSection;
  /** Output layer, for layer weights. */
  layer?: number;
  name: string;
}

function outputWeights(def: ArchitectureDef, numLayers: number): OutputWeight[] {
  const out: OutputWeight[] = [];
  for (const w of def.pre) out.push({ def: w, section: 'pre', name: expandTemplate(w.name, undefined, numLayers) });
  for (let l = 0; l < numLayers; l++) {
    for (const w of def.layer) out.push({ def: w, section: 'layer', layer: l, name: expandTemplate(w.name, l, numLayers) });
  }
  for (const w of def.post) out.push({ def: w, section: 'post', name: expandTemplate(w.name, undefined, numLayers) });
  return out;
}

function setDotted(obj: Record<string, unknown>, path: string, value: unknown): void {
  const parts = path.split('.');
  let cur: Record<string, unknown> = obj;
  for (const p of parts.slice(0, -1)) {
    const next = cur[p];
    if (next === null || typeof next !== 'object' || Array.isArray(next)) cur[p] = {};
    cur = cur[p] as Record<string, unknown>;
  }
  cur[parts[parts.length - 1]!] = value;
}

// ---------------------------------------------------------------------------------------------
// Tokenizer files

const TOKENIZER_FILE = [
  /^tokenizer.*\.json$/,
  /^tokenizer\.model$/,
  /^spiece\.model$/,
  /^sentencepiece\.bpe\.model$/,
  /^special_tokens_map\.json$/,
  /^merges\.txt$/,
  /^vocab\.(json|txt)$/,
  /^added_tokens\.json$/,
  /^chat_template\..+$/,
  /^generation_config\.json$/,
  /^(preprocessor|processor)_config\.json$/,
];

async function tokenizerFiles(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true });
  return entries
    .filter((e) => (e.isFile() || e.isSymbolicLink()) && TOKENIZER_FILE.some((re) => re.test(e.name)))
    .map((e) => e.name)
    .sort();
}

/** Donor files still valid beside a built tokenizer. */
const KEPT_WITH_BUILT_TOKENIZER = [/^generation_config\.json$/, /^(preprocessor|processor)_config\.json$/];

const jsonText = (v: unknown) => JSON.stringify(v, null, 2) + '\n';

interface TokenizerStep {
  config: TokenizerConfig | undefined;
  vocab: MergedVocabulary | null;
  /** Tokenizer files by model id (null: unreadable); only loaded with `tokenizer` or `chat_template`. */
  tokenizers: Map<string, ModelTokenizer | null>;
  chatTemplate: string | undefined;
  /** Files written for a built tokenizer. */
  files: Record<string, string>;
}

/**
 * Reads the models' tokenizer files and, with `tokenizer` / `tokenizer_source`, builds the output
 * vocabulary (merge-methods.md §5, §6.7); resolves `chat_template` (§6.8). Headers and JSON only.
 * The base's and the source model's tokenizer files must be readable; another model's that are
 * not are treated as missing (a warning).
 */
async function planTokenizer(config: MergeConfig, models: OpenedModel[], opts: PlanOptions, warn: (m: string) => void): Promise<TokenizerStep> {
  const tokCfg = effectiveTokenizer(config);
  const step: TokenizerStep = { config: tokCfg, vocab: null, tokenizers: new Map(), chatTemplate: undefined, files: {} };
  if (tokCfg === undefined && config.chat_template === undefined) return step;
  const refs = referencedModels(config);
  const baseId = refs[0]!.id;
  const sourceRef = tokCfg !== undefined && typeof tokCfg.source === 'object' ? tokCfg.source : undefined;
  const byId = new Map(models.map((m) => [m.ref.id, m]));
  const load = async (id: string, dir: string, vocabSizeKey: string | undefined, strict: boolean): Promise<ModelTokenizer | null> => {
    try {
      return await loadModelTokenizer(dir, vocabSizeKey !== undefined ? { vocabSizeKey } : {});
    } catch (e) {
      if (strict) {
        if (e instanceof AmalgamError && e.key === undefined) throw new AmalgamError(e.code, `model \`${id}\`: ${e.message}`, { key: id, cause: e });
        throw e;
      }
      warn(`model ${id}: unable to read its tokenizer files (${(e as Error).message})`);
      return null;
    }
  };
  // A named or literal template on the copy path needs the donor's tokenizer_config.json only.
  const needAll = tokCfg !== undefined || config.chat_template === 'auto';
  for (const m of models) {
    if (!needAll && m.ref.id !== baseId) continue;
    const strict = tokCfg !== undefined && (m.ref.id === baseId || m.ref.id === sourceRef?.id);
    step.tokenizers.set(m.ref.id, await load(m.ref.id, m.planned.path, m.arch.definition.vocabSizeKey, strict));
  }
  let donorDir = byId.get(baseId)!.planned.path;
  if (sourceRef !== undefined) {
    const src = byId.get(sourceRef.id);
    if (src) {
      donorDir = src.planned.path;
    } else {
      if (sourceRef.adapter !== undefined || sourceRef.revision !== undefined) {
        throw new AmalgamError('E_UNSUPPORTED', `the tokenizer source \`${sourceRef.id}\` must be a plain local model folder`, {
          key: config.tokenizer ? 'tokenizer.source' : 'tokenizer_source',
        });
      }
      donorDir = await modelDir(sourceRef, resolve(opts.baseDir ?? process.cwd()));
      step.tokenizers.set(sourceRef.id, await load(sourceRef.id, donorDir, byId.get(baseId)!.arch.definition.vocabSizeKey, true));
    }
  }

  step.chatTemplate = resolveChatTemplate(
    config.chat_template,
    refs.map((r) => step.tokenizers.get(r.id)),
    warn,
  );
  if (tokCfg === undefined) return step;

  const vocab = buildMergedVocabulary({ tokenizer: tokCfg, baseModel: config.base_model, models: refs, tokenizers: step.tokenizers, warn });
  step.vocab = vocab;
  step.files = mergedTokenizerFiles(vocab, step.chatTemplate);
  if (step.chatTemplate === undefined) {
    const own = step.tokenizers.get(sourceRef?.id ?? baseId)?.chatTemplate;
    if (own !== undefined && own.trim() !== '') step.files['chat_template.jinja'] = own;
  }
  const specialPath = join(donorDir, 'special_tokens_map.json');
  try {
    step.files['special_tokens_map.json'] = await readFile(specialPath, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new AmalgamError('E_IO', `cannot read ${specialPath}: ${(e as Error).message}`, { file: specialPath });
  }
  return step;
}

/**
 * The tokenizer files of the output: those copied from the donor and those amalgam writes
 * (merge-methods.md §7.5).
 */
async function outputTokenizerFiles(
  step: TokenizerStep,
  donor: OpenedModel,
  copy: boolean,
  warn: (m: string) => void,
): Promise<{ copied: string[]; generated: Record<string, string> }> {
  const available = copy ? await tokenizerFiles(donor.planned.path) : [];
  if (step.vocab) {
    const copied = available.filter((f) => KEPT_WITH_BUILT_TOKENIZER.some((re) => re.test(f)) && !(f in step.files));
    const generated = { ...step.files };
    const k = copied.indexOf(GENERATION_CONFIG);
    if (k >= 0) {
      const file = join(donor.planned.path, GENERATION_CONFIG);
      const moved = await remapGenerationConfig(file, step.tokenizers.get(donor.ref.id), step.vocab, warn);
      if (moved !== undefined) {
        copied.splice(k, 1);
        if (moved !== null) generated[GENERATION_CONFIG] = moved;
      }
    }
    return { copied, generated };
  }
  const tpl = step.chatTemplate;
  if (tpl === undefined) return { copied: available, generated: {} };
  if (!copy) {
    warn('chat_template is not written: the tokenizer files are not copied (no tokenizer is built)');
    return { copied: [], generated: {} };
  }
  if (!available.includes('tokenizer.json') && !available.includes('tokenizer.model')) {
    warn(`chat_template is not written: the donor model ${donor.ref.id} has no tokenizer`);
    return { copied: available, generated: {} };
  }
  const generated: Record<string, string> = {
    'tokenizer_config.json': jsonText(withChatTemplate(step.tokenizers.get(donor.ref.id)?.tokenizerConfig ?? {}, tpl)),
    'chat_template.jinja': tpl,
  };
  return { copied: available.filter((f) => !(f in generated) && !/^chat_template\./.test(f)), generated };
}

const GENERATION_CONFIG = 'generation_config.json';
/** Keys of generation_config.json holding token ids (an id or a list of ids). */
const GENERATION_TOKEN_KEYS = ['bos_token_id', 'eos_token_id', 'pad_token_id', 'decoder_start_token_id'];

/**
 * The donor's generation_config.json with its token ids moved to the built vocabulary, token by
 * token (the donor's id → its token → the token's output id). Undefined where no id moves (the
 * file is copied as it is) or the donor's vocabulary is unknown; null, with a warning, where an id
 * has no token in the donor's vocabulary or its token is not in the output's (the file is left
 * out: ids of another vocabulary would end generation at the wrong token).
 */
async function remapGenerationConfig(
  file: string,
  donor: ModelTokenizer | null | undefined,
  vocab: MergedVocabulary,
  warn: (m: string) => void,
): Promise<string | null | undefined> {
  if (!donor?.tokenizer) return undefined;
  let json: unknown;
  try {
    json = JSON.parse(await readFile(file, 'utf8'));
  } catch (e) {
    warn(`${GENERATION_CONFIG} is not written: ${file} cannot be read as JSON (${(e as Error).message})`);
    return null;
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) return undefined;
  const tokens = tokensById(readHfVocabulary(donor.tokenizer, donor.file ? { file: donor.file } : {}));
  const out: Record<string, unknown> = { ...(json as Record<string, unknown>) };
  let moved = false;
  for (const key of GENERATION_TOKEN_KEYS) {
    const v = out[key];
    const ids = typeof v === 'number' ? [v] : Array.isArray(v) && v.every((x) => typeof x === 'number') ? (v as number[]) : undefined;
    if (ids === undefined) continue;
    const mapped: number[] = [];
    for (const id of ids) {
      const tok = Number.isInteger(id) && id >= 0 ? tokens[id] : undefined;
      const to = tok === undefined ? undefined : vocab.ids.get(tok);
      if (to === undefined) {
        const why = tok === undefined ? `the donor's tokenizer has no token ${id}` : `the merged vocabulary has no token ${JSON.stringify(tok)}`;
        warn(`${GENERATION_CONFIG} is not written: its ${key} ${id} cannot be moved to the merged vocabulary (${why}); write one for the output if it needs it`);
        return null;
      }
      moved ||= to !== id;
      mapped.push(to);
    }
    out[key] = typeof v === 'number' ? mapped[0] : mapped;
  }
  if (!moved) return undefined;
  warn(`${GENERATION_CONFIG}: token ids moved to the merged vocabulary (${GENERATION_TOKEN_KEYS.filter((k) => k in out).map((k) => `${k} ${JSON.stringify(out[k])}`).join(', ')})`);
  return jsonText(out);
}

/** A planned permutation as plain data. */
function plainPermutation(p: EmbeddingPermutation): PlannedPermutation {
  return {
    models: p.models.slice(),
    base: p.base,
    tokenCount: p.tokenCount,
    rowCount: p.rowCount,
    rows: p.models.map((m) => ({ model: m, rows: Array.from(p.rows.get(m)!) })),
    defaults: [...p.defaults].sort((a, b) => a[0] - b[0]).map(([id, d]) => ({ id, rule: d.rule, from: d.from.map((f) => ({ model: f.model, row: f.row })) })),
  };
}

/**
 * The permutation of a planned embedding tensor in the form `buildPermutedEmbedding` takes.
 * `tokens` is `plan.tokenizer.tokens`.
 */
export function embeddingPermutation(t: PlannedTensor, tokens: readonly (string | null | undefined)[]): EmbeddingPermutation {
  const p = t.permutation;
  if (!p) throw new AmalgamError('E_CONFIG', 'the tensor has no embedding permutation', { key: t.name });
  const toks: (string | undefined)[] = new Array(p.tokenCount);
  for (let i = 0; i < p.tokenCount; i++) toks[i] = tokens[i] ?? undefined;
  return {
    tensorName: t.name,
    models: p.models,
    base: p.base,
    tokenCount: p.tokenCount,
    rowCount: p.rowCount,
    tokens: toks,
    rows: new Map(p.rows.map((r) => [r.model, Int32Array.from(r.rows)])),
    defaults: new Map(p.defaults.map((d) => [d.id, { rule: d.rule, from: d.from }] as const)),
    warnings: [],
  };
}

// ---------------------------------------------------------------------------------------------
// The planner

/** A parsed configuration back as YAML, model references in their string form. */
export function configToYaml(config: MergeConfig): string {
  const plain = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(plain);
    if (v !== null && typeof v === 'object') {
      const o = v as Record<string, unknown>;
      if (typeof o.id === 'string' && typeof o.model === 'string' && o.overrideArchitecture === undefined) return o.id;
      if (typeof o.id === 'string' && typeof o.model === 'string') return { model: o.id, override_architecture: o.overrideArchitecture };
      return Object.fromEntries(
        Object.entries(o)
          .filter(([, x]) => x !== undefined)
          .map(([k, x]) => [k, plain(x)]),
      );
    }
    return v;
  };
  return stringifyYaml(plain(config));
}

/**
 * For the Llama-family decoders the runtime knows (llama, mistral, qwen2), the output tensors
 * must have the shapes the output config.json implies, or the merged model cannot be loaded: a
 * passthrough stacking layers of models with other head counts or widths fails here, before any
 * tensor is read. Other architectures are not checked. `allowCrimes` makes it a warning.
 */
function checkShapesAgainstConfig(tensors: readonly PlannedTensor[], outputConfig: HfConfig, donor: string, allowCrimes: boolean, warn: (m: string) => void): void {
  let expected: Map<string, number[]>;
  try {
    expected = new Map(llamaParameterShapes(parseLlamaConfig(outputConfig)).map((p) => [p.name, p.shape]));
  } catch {
    return;
  }
  const wrong = tensors.filter((t) => {
    const want = expected.get(t.name);
    return want !== undefined && (want.length !== t.shape.length || want.some((v, i) => v !== t.shape[i]));
  });
  if (!wrong.length) return;
  const first = wrong[0]!;
  const from = [...new Set(first.inputs.map((i) => i.model))].join(', ');
  const message =
    `${wrong.length} output tensor${wrong.length === 1 ? '' : 's'} do${wrong.length === 1 ? 'es' : ''} not have the shape the output config.json (from ${donor}) implies, ` +
    `e.g. '${first.name}' from ${from} is [${first.shape.join(', ')}], the config implies [${expected.get(first.name)!.join(', ')}]: the merged model could not be loaded`;
  if (allowCrimes) {
    warn(message);
    return;
  }
  throw new AmalgamError('E_SHAPE', message, {
    key: first.name,
    hint: 'merge or stack models with the same hidden size, head counts and MLP width; --allow-crimes writes the model anyway',
  });
}

/**
 * Plans a merge: opens every referenced model (headers only), checks architectures, layer ranges,
 * shapes and parameters, and lists every output tensor with its inputs and resolved parameters.
 * Every error is an AmalgamError naming the key or tensor and the fix, raised before any tensor
 * data is read.
 */
export async function planMerge(config: MergeConfig, opts: PlanOptions = {}): Promise<MergePlan> {
  const warnings: string[] = [];
  const warn = (m: string) => {
    warnings.push(m);
    opts.onWarning?.(m);
  };
  const method: MergeMethod = getMergeMethod(config.merge_method);
  config = unifyModelReferences(config, resolve(opts.baseDir ?? process.cwd()), warn);
  checkUnsupported(config);

  const models = await openModels(config, opts, warn);
  try {
    return await buildPlan(config, method, models, opts, warn, warnings);
  } finally {
    await Promise.all(models.map((m) => m.folder.close().catch(() => {})));
  }
}

async function buildPlan(
  config: MergeConfig,
  method: MergeMethod,
  models: OpenedModel[],
  opts: PlanOptions,
  warn: (m: string) => void,
  warnings: string[],
): Promise<MergePlan> {
  const byId = new Map(models.map((m) => [m.ref.id, m]));
  checkArchitectures(models, !!opts.allowCrimes, warn);
  const module = moduleOf(config);
  const container = configContainer(config, module);
  const at: PathSegment[] = module === undefined ? [] : ['modules', module];
  checkLayerRanges(container, at, byId);

  const modelsForm = !container.slices;
  const layerCount = modelsForm ? modelsFormLayerCount(container, config.base_model, at, byId) : undefined;
  const layout: LayoutSlice[] = sliceLayout(config, { ...(module === undefined ? {} : { module }), ...(modelsForm ? { layerCount } : {}) });
  const outLayers = layout.reduce((n, s) => n + s.length, 0);

  // Base models must take part in the slices they are the base of.
  if (method.needsBase !== 'none') {
    layout.forEach((s) => {
      if (s.base_model && !s.sources.some((src) => sameModel(src.model, s.base_model!))) {
        throw configErr(
          `the base model ${s.base_model.id} is not one of the sources of slice ${s.slice}; ${method.name} reads the base model's tensors`,
          formatPath([...at, 'slices', s.slice, 'sources']),
          `add {model: ${s.base_model.id}, layer_range: [...]} to the slice's sources`,
        );
      }
    });
  }

  const donorRef = config.base_model ?? referencedModels(config)[0]!;
  const donor = byId.get(donorRef.id)!;
  const def = donor.arch.definition;
  const computeDtype = config.dtype ? (parseFloatDType(config.dtype) ?? null) : null;
  const outDtypeName = effectiveOutDtype(config);
  const outDtype = outDtypeName ? (parseFloatDType(outDtypeName) ?? null) : null;
  const resolver = new ParameterResolver(config);
  const tok = await planTokenizer(config, models, opts, warn);
  const vocab = tok.vocab;

  const tensors: PlannedTensor[] = [];
  const kZero: string[] = [];
  /** Rows of the first embedding cut to a common size. */
  let truncatedRows: number | undefined;
  /** Tied weights written because the tensor they would be tied to comes from other inputs. */
  const untiedHeads: string[] = [];
  const donorUntied = configValue(donor.folder.config, 'tie_word_embeddings') === false;

  for (const ow of outputWeights(def, outLayers)) {
    let slice: LayoutSlice;
    let inLayerOffset = 0;
    if (ow.section === 'pre') slice = layout[0]!;
    else if (ow.section === 'post') slice = layout[layout.length - 1]!;
    else {
      slice = layout.find((s) => ow.layer! >= s.outputStart && ow.layer! < s.outputStart + s.length)!;
      inLayerOffset = ow.layer! - slice.outputStart;
    }

    // Inputs, in source order.
    const inputs: PlannedInput[] = [];
    let anyPresent = false;
    const missing: string[] = [];
    for (const src of slice.sources) {
      const m = byId.get(src.model.id)!;
      const inLayer = ow.section === 'layer' ? src.start + inLayerOffset : undefined;
      const n = m.planned.numLayers;
      const name = expandTemplate(ow.def.name, inLayer, n);
      const aliases = (ow.def.aliases ?? []).map((a) => expandTemplate(a, inLayer, n));
      const tied = (ow.def.tiedNames ?? []).map((a) => expandTemplate(a, inLayer, n));
      const found = findWeight(m, name, aliases, tied);
      if (!found) {
        missing.push(m.ref.id);
        continue;
      }
      if (found.tiedFor === undefined) anyPresent = true;
      const info = m.folder.source.info(found.stored);
      const input: PlannedInput = { model: m.ref.id, tensor: found.stored, weight: name, dtype: info.dtype, shape: info.shape };
      if (found.tiedFor !== undefined) input.tiedFor = found.tiedFor;
      inputs.push(input);
    }
    if (ow.def.optional && !anyPresent) {
      // Every input is tied: leave the weight out and tie it in the output. Except where the
      // donor's config.json says the output is untied and the tensor it would be tied to is made
      // from other inputs (a slice stack of an untied model, then a tied one): then the tied
      // tensors of this weight's own inputs are written under its name.
      const tiedTo = (ow.def.tiedNames ?? []).map((n) => expandTemplate(n, undefined, outLayers));
      const target = tensors.find((t) => tiedTo.includes(t.name));
      const same = (a: PlannedInput[], b: PlannedInput[]) => a.length === b.length && a.every((x, i) => x.model === b[i]!.model && x.tensor === b[i]!.tensor);
      if (!inputs.length || !target || !donorUntied || same(target.inputs, inputs)) continue;
      untiedHeads.push(`${ow.name} (from ${inputs.map((i) => `${i.model}'s ${i.tensor}`).join(', ')})`);
    }
    if (missing.length && !ow.def.optional) {
      throw new AmalgamError('E_MISSING', `model(s) ${missing.join(', ')} have no such tensor`, {
        key: ow.name,
        hint: 'every input model needs every required weight of the output architecture; check that the models are of one family',
      });
    }
    if (!inputs.length) continue;

    const baseRef = slice.base_model;
    const baseId = baseRef && inputs.some((i) => i.model === baseRef.id) ? baseRef.id : null;
    if (baseRef && baseId === null && method.needsBase !== 'none') {
      throw new AmalgamError('E_MISSING', `the base model ${baseRef.id} has no such tensor, but ${inputs.map((i) => i.model).join(', ')} have it`, {
        key: ow.name,
        hint: `${method.name} merges differences from the base model, so the base model needs every merged tensor`,
      });
    }

    // Parameters.
    const pos: TensorPosition = {
      ...(module === undefined ? {} : { module }),
      ...(ow.section === 'layer' ? { layer: ow.layer!, ...(modelsForm ? { layerCount: outLayers } : {}) } : { position: ow.section }),
    };
    const raw: { global: Record<string, unknown>; perModel: Record<string, Record<string, unknown>> } = { global: {}, perModel: {} };
    for (const name of Object.keys(method.globalParams)) {
      const v = resolver.value({ name, tensor: ow.name, ...pos });
      if (v !== undefined) raw.global[name] = v;
    }
    for (const input of inputs) {
      const ref = byId.get(input.model)!.ref;
      const values: Record<string, unknown> = {};
      for (const name of Object.keys(method.perModelParams)) {
        const v = resolver.value({ name, tensor: ow.name, model: ref, inputTensor: input.weight, ...pos });
        if (v !== undefined) values[name] = v;
      }
      raw.perModel[input.model] = values;
    }
    const modelIds = inputs.map((i) => i.model);
    const params = prepareParams(method, { tensorName: ow.name, models: modelIds, base: baseId }, raw);
    const { t } = resolver.position(pos);

    // Shapes.
    const isEmbed = !!ow.def.isEmbed;
    const floatInputs = inputs.every((i) => isFloatDType(i.dtype));
    let shape = inputs[0]!.shape;
    let permutation: PlannedPermutation | undefined;
    if (isEmbed && vocab) {
      // Every input is permuted onto the output vocabulary (merge-methods.md §5).
      if (!floatInputs) {
        throw new AmalgamError('E_DTYPE', `an embedding permuted onto the merged vocabulary must be stored as floats (${inputs.map((i) => `${i.model} ${i.dtype}`).join(', ')})`, {
          key: ow.name,
        });
      }
      const perm = planEmbeddingPermutation(vocab, {
        models: modelIds,
        base: baseId,
        ...(tok.config!.tokens ? { tokens: tok.config!.tokens } : {}),
        rowCounts: new Map(inputs.map((i) => [i.model, i.shape[0]!] as const)),
        tensorName: ow.name,
        warn,
      });
      const width = checkEmbeddingWidths(perm, new Map(inputs.map((i) => [i.model, i.shape] as const)));
      shape = [perm.rowCount, width];
      permutation = plainPermutation(perm);
    } else if (inputs.some((i) => !sameShape(i.shape, shape))) {
      const list = inputs.map((i) => `${i.model} ${shapeStr(i.shape)}`).join(', ');
      if (!isEmbed || !inputs.every((i) => i.shape.length === 2)) {
        throw new AmalgamError('E_SHAPE', `the models' tensors have different shapes: ${list}`, {
          key: ow.name,
          hint: isEmbed ? 'embeddings must be 2-D matrices' : 'the models are not of the same size; merge models of one configuration',
        });
      }
      // Without a tokenizer configuration: the method's shape rule (common submatrix, base shape, or an error).
      const cut = plannedEmbedShape(method.name, inputs, baseId, ow.name);
      shape = cut.shape;
      if (cut.warning) warn(cut.warning);
      truncatedRows ??= cut.vocabSize;
    }

    const first = (baseId !== null ? inputs.find((i) => i.model === baseId) : undefined) ?? inputs[0]!;
    const kind: PlannedTensor['kind'] = floatInputs ? 'merge' : 'copy';
    if (!floatInputs) {
      const bad = inputs.filter((i) => i.dtype !== first.dtype || !sameShape(i.shape, first.shape));
      if (bad.length) {
        throw new AmalgamError('E_DTYPE', `non-float tensor differs between models (${inputs.map((i) => `${i.model} ${i.dtype} ${shapeStr(i.shape)}`).join(', ')})`, {
          key: ow.name,
          hint: 'integer and boolean tensors are copied, not merged, so every model must store the same one',
        });
      }
    }
    const dtype: DType = kind === 'copy' ? first.dtype : (outDtype ?? (first.dtype as FloatDType));

    if (MAGNITUDE_TOPK.has(method.name)) {
      const count = numel(shape);
      for (const input of inputs) {
        if (input.model === baseId) continue;
        const d = params.perModel[input.model]?.density;
        if (typeof d === 'number' && d < 1 && Math.trunc(d * count) === 0) kZero.push(`${ow.name} (${input.model}, density ${d})`);
      }
    }

    const planned: PlannedTensor = {
      index: tensors.length,
      name: ow.name,
      dtype,
      shape: shape.slice(),
      kind,
      section: ow.section,
      slice: slice.slice,
      t,
      isEmbed,
      isOptional: !!ow.def.optional,
      base: baseId,
      inputs,
      params,
    };
    if (ow.layer !== undefined) planned.layer = ow.layer;
    if (permutation) planned.permutation = permutation;
    tensors.push(planned);
  }

  if (kZero.length) {
    warn(
      `density keeps no element (⌊density·numel⌋ = 0) of ${kZero.length} task vector(s), which become zeros (mergekit would abort): ${kZero.slice(0, 5).join('; ')}${kZero.length > 5 ? '; ...' : ''}`,
    );
  }
  if (method.name === 'model_stock') {
    for (const t of tensors) {
      const others = t.inputs.filter((i) => i.model !== t.base).length;
      if (others === 1) {
        throw new AmalgamError('E_CONFIG', 'model_stock needs the base model plus at least two other models with this tensor; it has the base and one other', {
          key: t.name,
          hint: 'add more models, or use another method for two models',
        });
      }
    }
  }

  // Output config.json: the donor's, with the layer count, dtype, vocabulary and tie flag updated.
  const outputConfig = structuredClone(donor.folder.config) as HfConfig;
  setDotted(outputConfig, def.numLayersKey, outLayers);
  const written = new Set(tensors.map((t) => t.name));
  const configDtype = outDtype ?? safeConfigDtype(donor.folder.config) ?? dominantDtype(tensors);
  if (configDtype) setConfigDtype(outputConfig, configDtype);
  const vocabKey = def.vocabSizeKey ?? 'vocab_size';
  const donorVocab = configValue(donor.folder.config, vocabKey);
  if (vocab) {
    setDotted(outputConfig, vocabKey, vocab.rowCount);
  } else if (truncatedRows !== undefined && donorVocab !== truncatedRows) {
    // Each cut embedding has said so, with the vocab_size it sets.
    setDotted(outputConfig, vocabKey, truncatedRows);
  }
  if (untiedHeads.length) {
    warn(`the output embeddings and the tied output head come from different models, so the head is written: ${untiedHeads.join('; ')}`);
  }
  const tiedDefs = [...def.pre, ...def.post].filter((w) => w.optional && (w.tiedNames ?? []).length);
  if (tiedDefs.length) {
    const headWritten = tiedDefs.some((w) => written.has(expandTemplate(w.name, undefined, outLayers)));
    const flag = configValue(donor.folder.config, 'tie_word_embeddings');
    if (typeof flag === 'boolean' && flag === headWritten) {
      outputConfig['tie_word_embeddings'] = !headWritten;
      warn(
        headWritten
          ? 'some inputs have an untied output head, so it is written and tie_word_embeddings is set to false'
          : 'no input has an output head, so tie_word_embeddings is set to true',
      );
    }
  }

  checkShapesAgainstConfig(tensors, outputConfig, donor.ref.id, !!opts.allowCrimes, warn);

  const tokOut = await outputTokenizerFiles(tok, donor, opts.copyTokenizer ?? true, warn);

  const randomSeed = method.randomized ? (opts.randomSeed ?? 0) : (opts.randomSeed ?? null);
  if (randomSeed !== null && (!Number.isSafeInteger(randomSeed) || randomSeed < 0)) {
    throw new AmalgamError('E_USAGE', `random seed must be a non-negative integer, got ${randomSeed}`, { key: 'random-seed' });
  }

  // Statistics.
  let readBytes = 0;
  let writeBytes = 0;
  let parameters = 0;
  let largest = { name: '', f32Bytes: 0 };
  let maxInputs = 0;
  let memoryBound = 0;
  for (const t of tensors) {
    const n = numel(t.shape);
    parameters += n;
    writeBytes += byteSize(t.dtype, n) ?? 0;
    let big = n * 4;
    for (const i of t.inputs) {
      const ni = numel(i.shape);
      readBytes += byteSize(i.dtype, ni) ?? 0;
      big = Math.max(big, ni * 4);
    }
    if (big > largest.f32Bytes) largest = { name: t.name, f32Bytes: big };
    maxInputs = Math.max(maxInputs, t.inputs.length);
    memoryBound = Math.max(memoryBound, tensorCost(t));
  }

  const baseModel = config.base_model?.id ?? null;
  return {
    formatVersion: 1,
    method: method.name,
    methodPrettyName: method.prettyName,
    ...(method.reference ? { methodReference: method.reference } : {}),
    randomized: method.randomized,
    randomSeed,
    computeDtype,
    outDtype,
    config,
    configYaml: opts.configYaml ?? configToYaml(config),
    baseModel,
    models: models.map((m) => m.planned),
    donor: donor.ref.id,
    architecture: donor.arch.name,
    numLayers: outLayers,
    slices: layout.map((s) => ({
      index: s.slice,
      outputStart: s.outputStart,
      length: s.length,
      base: s.base_model?.id ?? null,
      sources: s.sources.map((src) => ({ model: src.model.id, start: src.start })),
    })),
    outputConfig,
    tensors,
    tokenizerFiles: { from: donor.ref.id, files: tokOut.copied },
    tokenizer: vocab
      ? {
          source: vocab.source,
          base: vocab.base,
          tokens: vocab.tokens.map((x) => x ?? null),
          tokenCount: vocab.tokenCount,
          rowCount: vocab.rowCount,
          appended: vocab.appended.map((a) => a.content),
        }
      : null,
    chatTemplate: tok.chatTemplate ?? null,
    generatedFiles: tokOut.generated,
    warnings,
    stats: { tensors: tensors.length, parameters, readBytes, writeBytes, largestTensor: largest, maxInputs, memoryBound },
  };
}

/**
 * Estimated resident bytes while a tensor is merged: its inputs as float32 plus three
 * output-sized buffers (the result, its encoded form, one scratch array). A permuted embedding
 * also holds the inputs as read beside their permuted matrices (one output-sized matrix each).
 */
export function tensorCost(t: Pick<PlannedTensor, 'shape' | 'inputs' | 'permutation'>): number {
  if (t.permutation) {
    let read = 0;
    for (const i of t.inputs) read += numel(i.shape) * 4;
    return read + numel(t.shape) * 4 * (t.inputs.length + 3);
  }
  let size = numel(t.shape) * 4;
  for (const i of t.inputs) size = Math.max(size, numel(i.shape) * 4);
  return size * (t.inputs.length + 3);
}

function safeConfigDtype(config: HfConfig): FloatDType | undefined {
  try {
    return getConfigDtype(config);
  } catch {
    return undefined;
  }
}

function dominantDtype(tensors: PlannedTensor[]): FloatDType | undefined {
  const count = new Map<FloatDType, number>();
  for (const t of tensors) if (isFloatDType(t.dtype)) count.set(t.dtype, (count.get(t.dtype) ?? 0) + numel(t.shape));
  let best: FloatDType | undefined;
  for (const [d, n] of count) if (best === undefined || n > count.get(best)!) best = d;
  return best;
}
