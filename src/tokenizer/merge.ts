/**
 * Output vocabularies for merges with `tokenizer:` / `tokenizer_source:` (merge-methods.md §5,
 * §6.7, §6.8, §7.5): reading a model's vocabulary from its `tokenizer.json`, building the output
 * tokenizer (`base`, `union` or one model's), and choosing the chat template.
 *
 * Everything here works on parsed JSON and does no I/O, except `loadModelTokenizer`, which reads
 * a model folder's tokenizer files. The permuted embedding matrices are built in
 * `merge/embed.ts` from the `MergedVocabulary` returned here.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { AmalgamError } from '../errors.js';
import { readJsonObject } from '../io/hf.js';
import type { ModelReference, TokenizerConfig } from '../config/types.js';

type Json = Record<string, unknown>;

// ---------------------------------------------------------------------------------------------
// Reading a vocabulary

/** An entry of `added_tokens` in tokenizer.json (and, without `id`, of `added_tokens_decoder`). */
export interface HfAddedToken {
  id: number;
  content: string;
  single_word: boolean;
  lstrip: boolean;
  rstrip: boolean;
  normalized: boolean;
  special: boolean;
}

/** The vocabulary of a `tokenizer.json`: the model's vocabulary plus the added tokens. */
export interface HfVocabulary {
  /** `model.type` (`BPE`, `WordPiece`, `WordLevel`, `Unigram`, ...). */
  modelType: string;
  /** Token string → id, model vocabulary and added tokens together (an added token wins). */
  ids: ReadonlyMap<string, number>;
  /** Added tokens, by increasing id. */
  added: readonly HfAddedToken[];
  /** Largest id + 1 (0 for an empty vocabulary). */
  size: number;
}

function isObject(v: unknown): v is Json {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function formatError(message: string, file: string | undefined, key?: string): AmalgamError {
  return new AmalgamError('E_FORMAT', message, { file: file ?? 'tokenizer.json', ...(key ? { key } : {}) });
}

function isTokenId(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function readAddedToken(v: unknown, index: number, file: string | undefined): HfAddedToken {
  if (!isObject(v) || typeof v.content !== 'string' || !isTokenId(v.id)) {
    throw formatError('an added token needs a string `content` and a non-negative integer `id`', file, `added_tokens[${index}]`);
  }
  const special = v.special === true;
  return {
    id: v.id,
    content: v.content,
    single_word: v.single_word === true,
    lstrip: v.lstrip === true,
    rstrip: v.rstrip === true,
    normalized: typeof v.normalized === 'boolean' ? v.normalized : !special,
    special,
  };
}

/**
 * The vocabulary of a parsed `tokenizer.json`. `model.vocab` is a token → id object (BPE,
 * WordPiece, WordLevel) or a list of `[token, score]` pairs whose index is the id (Unigram);
 * `added_tokens` are added on top.
 */
export function readHfVocabulary(tokenizerJson: unknown, opts: { file?: string } = {}): HfVocabulary {
  const file = opts.file;
  if (!isObject(tokenizerJson)) throw formatError('a tokenizer.json must hold a JSON object', file);
  const model = tokenizerJson.model;
  if (!isObject(model)) throw formatError('tokenizer.json has no `model` object', file, 'model');
  const vocab = model.vocab;
  const ids = new Map<string, number>();
  let size = 0;
  let modelType = typeof model.type === 'string' ? model.type : '';
  if (Array.isArray(vocab)) {
    if (!modelType) modelType = 'Unigram';
    vocab.forEach((entry, id) => {
      const tok = Array.isArray(entry) ? entry[0] : undefined;
      if (typeof tok !== 'string') throw formatError('a Unigram vocabulary entry must be [token, score]', file, `model.vocab[${id}]`);
      if (!ids.has(tok)) ids.set(tok, id);
    });
    size = vocab.length;
  } else if (isObject(vocab)) {
    for (const [tok, id] of Object.entries(vocab)) {
      if (!isTokenId(id)) throw formatError(`token ${JSON.stringify(tok)} has id ${JSON.stringify(id)}, not a non-negative integer`, file, 'model.vocab');
      ids.set(tok, id);
      if (id + 1 > size) size = id + 1;
    }
  } else {
    throw formatError('tokenizer.json has no `model.vocab`', file, 'model.vocab');
  }
  const rawAdded = tokenizerJson.added_tokens ?? [];
  if (!Array.isArray(rawAdded)) throw formatError('`added_tokens` must be a list', file, 'added_tokens');
  const added = rawAdded.map((a, i) => readAddedToken(a, i, file)).sort((a, b) => a.id - b.id);
  for (const a of added) {
    ids.set(a.content, a.id);
    if (a.id + 1 > size) size = a.id + 1;
  }
  return { modelType, ids, added, size };
}

/**
 * Token by id (length `vocab.size`): the added token where one has that id, else the model's
 * token; `undefined` for an id no token has.
 */
export function tokensById(vocab: HfVocabulary): (string | undefined)[] {
  const out: (string | undefined)[] = new Array(vocab.size);
  for (const [tok, id] of vocab.ids) if (out[id] === undefined) out[id] = tok;
  for (const a of vocab.added) out[a.id] = a.content;
  return out;
}

/**
 * A copy of `tokenizerJson` without the tokens whose id is ≥ `vocabSize` (the rows the model's
 * embedding does not have): model vocabulary entries, added tokens, and BPE merges whose parts or
 * result were removed. Returns the input itself when nothing is removed.
 */
export function stripHfTokenizer(tokenizerJson: Json, vocabSize: number, opts: { file?: string } = {}): { tokenizer: Json; removed: string[] } {
  const before = readHfVocabulary(tokenizerJson, opts);
  if (before.size <= vocabSize) return { tokenizer: tokenizerJson, removed: [] };
  const model = tokenizerJson.model as Json;
  const removed = new Set<string>(entriesById(before.ids).filter(([, id]) => id >= vocabSize).map(([tok]) => tok));
  const newModel: Json = { ...model };
  if (Array.isArray(model.vocab)) {
    newModel.vocab = model.vocab.slice(0, vocabSize);
  } else {
    newModel.vocab = Object.fromEntries(Object.entries(model.vocab as Json).filter(([, id]) => (id as number) < vocabSize));
  }
  const kept = new Set<string>();
  if (Array.isArray(newModel.vocab)) for (const e of newModel.vocab as unknown[][]) kept.add(e[0] as string);
  else for (const k of Object.keys(newModel.vocab as Json)) kept.add(k);
  if (Array.isArray(model.merges)) {
    const prefix = typeof model.continuing_subword_prefix === 'string' ? model.continuing_subword_prefix : '';
    newModel.merges = model.merges.filter((m) => {
      let a: string;
      let b: string;
      if (typeof m === 'string') {
        const sp = m.indexOf(' ');
        if (sp < 0) return true;
        a = m.slice(0, sp);
        b = m.slice(sp + 1);
      } else if (Array.isArray(m) && typeof m[0] === 'string' && typeof m[1] === 'string') {
        a = m[0];
        b = m[1];
      } else {
        return true;
      }
      const joined = a + (prefix && b.startsWith(prefix) ? b.slice(prefix.length) : b);
      const touched = removed.has(a) || removed.has(b) || removed.has(joined);
      return !touched || (kept.has(a) && kept.has(b) && kept.has(joined));
    });
  }
  const added = Array.isArray(tokenizerJson.added_tokens)
    ? tokenizerJson.added_tokens.filter((a) => !(isObject(a) && isTokenId(a.id) && a.id >= vocabSize))
    : tokenizerJson.added_tokens;
  return { tokenizer: { ...tokenizerJson, model: newModel, added_tokens: added }, removed: [...removed] };
}

// ---------------------------------------------------------------------------------------------
// A model's tokenizer files

/** What the vocabulary merge needs of one model. */
export interface ModelTokenizer {
  /** Parsed tokenizer.json; null when the model has none (it is then assumed to equal the base's). */
  tokenizer: Json | null;
  /** Parsed tokenizer_config.json, when present. */
  tokenizerConfig?: Json;
  /** Contents of chat_template.jinja, when present. */
  chatTemplate?: string;
  /** The model's `vocab_size` (config.json), when known: the rows of its embedding that are real. */
  vocabSize?: number;
  /** Path of tokenizer.json, for messages. */
  file?: string;
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

function valueAt(obj: Json, dotted: string): unknown {
  let cur: unknown = obj;
  for (const part of dotted.split('.')) {
    if (!isObject(cur) || !Object.prototype.hasOwnProperty.call(cur, part)) return undefined;
    cur = cur[part];
  }
  return cur;
}

/**
 * Reads the tokenizer files of a Hugging Face model folder: tokenizer.json (null when absent),
 * tokenizer_config.json, chat_template.jinja (or chat_template.json) and the `vocab_size` of
 * config.json (at `vocabSizeKey`, a dotted path, default `vocab_size`). Malformed JSON is an error.
 */
export async function loadModelTokenizer(dir: string, opts: { vocabSizeKey?: string } = {}): Promise<ModelTokenizer> {
  const tokPath = join(dir, 'tokenizer.json');
  const out: ModelTokenizer = { tokenizer: (await exists(tokPath)) ? await readJsonObject(tokPath) : null, file: tokPath };
  const cfgPath = join(dir, 'tokenizer_config.json');
  if (await exists(cfgPath)) out.tokenizerConfig = await readJsonObject(cfgPath);
  const jinja = join(dir, 'chat_template.jinja');
  const jsonTpl = join(dir, 'chat_template.json');
  if (await exists(jinja)) {
    out.chatTemplate = await readFile(jinja, 'utf8');
  } else if (await exists(jsonTpl)) {
    const t = (await readJsonObject(jsonTpl)).chat_template;
    if (typeof t === 'string') out.chatTemplate = t;
  }
  const configPath = join(dir, 'config.json');
  if (await exists(configPath)) {
    const v = valueAt(await readJsonObject(configPath), opts.vocabSizeKey ?? 'vocab_size');
    if (v !== undefined && v !== null) {
      if (!isTokenId(v) || v === 0) {
        throw new AmalgamError('E_CONFIG', `${JSON.stringify(v)} is not a positive integer`, { file: configPath, key: opts.vocabSizeKey ?? 'vocab_size' });
      }
      out.vocabSize = v;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The output vocabulary

/** The vocabulary of one input model as the embedding permutation sees it. */
export interface ModelVocabulary {
  model: string;
  /** False when the model's tokenizer could not be read: it is assumed to equal the base's. */
  loaded: boolean;
  /** config `vocab_size`, else the tokenizer's size. */
  vocabSize: number;
  /** Token → embedding row, for the tokens with id < vocabSize. */
  rows: ReadonlyMap<string, number>;
  /** The whole vocabulary (for `{kind: model_token, token: ...}` lookups). */
  original: ReadonlyMap<string, number>;
}

export interface MergedVocabulary {
  /** `base`, `union`, or the id of the model whose tokenizer is used. */
  source: string;
  /** The model whose tokenizer is the starting point: `base_model`, else the first model. */
  base: string;
  /** Output token by id (length `tokenCount`; undefined where no token has the id). */
  tokens: readonly (string | undefined)[];
  /** Output token → id. */
  ids: ReadonlyMap<string, number>;
  /** Largest output token id + 1. */
  tokenCount: number;
  /** Rows of the output embeddings: `tokenCount` rounded up to `pad_to_multiple_of`. Also the output `vocab_size`. */
  rowCount: number;
  /** Tokens appended to the donor tokenizer (union additions and `tokens:` keys it lacked). */
  appended: readonly HfAddedToken[];
  /** The output tokenizer.json. */
  tokenizerJson: Json;
  /** The output tokenizer_config.json (the donor's, with `added_tokens_decoder` rebuilt). */
  tokenizerConfig: Json;
  /** Per input model (base included), keyed by model id. */
  models: ReadonlyMap<string, ModelVocabulary>;
  warnings: readonly string[];
}

export type ModelTokenizers =
  | ReadonlyMap<string, ModelTokenizer | null | undefined>
  | Readonly<Record<string, ModelTokenizer | null | undefined>>;

export interface MergedVocabularyOptions {
  /** The `tokenizer:` block in effect (`effectiveTokenizer(config)`). */
  tokenizer: TokenizerConfig;
  /** The configuration's `base_model`; without one, the first of `models` is the base. */
  baseModel?: ModelReference | string;
  /** Every model of the merge, in YAML order (`referencedModels(config)`). */
  models: readonly (ModelReference | string)[];
  /**
   * Tokenizer files by model id: every model of `models`, and the `tokenizer.source` model when it
   * is not one of them. A missing entry, null, or `tokenizer: null` means it could not be loaded.
   */
  tokenizers: ModelTokenizers;
  warn?: (message: string) => void;
}

function idOf(m: ModelReference | string): string {
  return typeof m === 'string' ? m : m.id;
}

function lookup(t: ModelTokenizers, id: string): ModelTokenizer | null | undefined {
  if (t instanceof Map) return t.get(id);
  const rec = t as Readonly<Record<string, ModelTokenizer | null | undefined>>;
  return Object.prototype.hasOwnProperty.call(rec, id) ? rec[id] : undefined;
}

function sameSettings(a: HfAddedToken, b: HfAddedToken): boolean {
  return (
    a.content === b.content &&
    a.single_word === b.single_word &&
    a.lstrip === b.lstrip &&
    a.rstrip === b.rstrip &&
    a.normalized === b.normalized &&
    a.special === b.special
  );
}

function sample(list: readonly string[], n = 8): string {
  const shown = list.slice(0, n).map((t) => JSON.stringify(t)).join(', ');
  return list.length > n ? `${shown}, … (${list.length} in all)` : shown;
}

function rowsBelow(ids: ReadonlyMap<string, number>, limit: number): { rows: Map<string, number>; dropped: string[] } {
  const rows = new Map<string, number>();
  const dropped: string[] = [];
  for (const [tok, id] of ids) {
    if (id < limit) rows.set(tok, id);
    else dropped.push(tok);
  }
  return { rows, dropped };
}

function entriesById(ids: ReadonlyMap<string, number>): [string, number][] {
  return [...ids].sort((a, b) => a[1] - b[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
}

/** A plain (normalized, not special) added token, as `add_tokens("...")` creates. */
function plainAddedToken(id: number, content: string): HfAddedToken {
  return { id, content, single_word: false, lstrip: false, rstrip: false, normalized: true, special: false };
}

function addedTokenJson(a: HfAddedToken): Json {
  return {
    id: a.id,
    content: a.content,
    single_word: a.single_word,
    lstrip: a.lstrip,
    rstrip: a.rstrip,
    normalized: a.normalized,
    special: a.special,
  };
}

/** `added_tokens_decoder` of tokenizer_config.json for a vocabulary. */
export function addedTokensDecoder(vocab: HfVocabulary): Json {
  const out: Json = {};
  for (const a of vocab.added) {
    out[String(a.id)] = {
      content: a.content,
      lstrip: a.lstrip,
      normalized: a.normalized,
      rstrip: a.rstrip,
      single_word: a.single_word,
      special: a.special,
    };
  }
  return out;
}

/** `n` rounded up to a multiple of `multiple` (unchanged when `multiple` is absent). */
export function padRowCount(n: number, multiple: number | undefined): number {
  if (!multiple || multiple <= 1 || n % multiple === 0) return n;
  return n + multiple - (n % multiple);
}

/**
 * Builds the output vocabulary (merge-methods.md §5 step 1):
 * - `base`: the base model's tokenizer without its tokens of id ≥ its `vocab_size`;
 * - `union`: that tokenizer extended with the tokens of the other models that it lacks, appended
 *   as added tokens: first the other models' ordinary tokens, then their added tokens, each in
 *   model order and, within a model, in id order. An added token seen with different settings
 *   keeps the first settings (with a warning). Tokens of id ≥ a model's `vocab_size` are ignored;
 * - a model reference: that model's tokenizer as it is.
 * Keys of `tokenizer.tokens` that the result lacks are appended as plain added tokens.
 *
 * A model whose tokenizer cannot be loaded is assumed to have the base's vocabulary (warning);
 * the base's and the source model's tokenizers must load.
 */
export function buildMergedVocabulary(opts: MergedVocabularyOptions): MergedVocabulary {
  const warnings: string[] = [];
  const warn = (m: string) => {
    warnings.push(m);
    opts.warn?.(m);
  };
  const modelIds: string[] = [];
  for (const m of opts.models) if (!modelIds.includes(idOf(m))) modelIds.push(idOf(m));
  const baseId = opts.baseModel !== undefined ? idOf(opts.baseModel) : modelIds[0];
  if (baseId === undefined) throw new AmalgamError('E_CONFIG', 'a tokenizer merge needs at least one model', { key: 'tokenizer' });
  const order = [baseId, ...modelIds.filter((m) => m !== baseId)];

  // The base tokenizer, stripped to the base's real rows.
  const baseFiles = lookup(opts.tokenizers, baseId);
  if (!baseFiles?.tokenizer) {
    throw new AmalgamError('E_MISSING', `the base model ${baseId} has no tokenizer.json; a tokenizer merge starts from it`, {
      key: 'tokenizer',
      hint: opts.baseModel === undefined ? 'without base_model the first model is the base; set base_model to choose another' : 'add tokenizer.json to the base model',
    });
  }
  const baseRaw = readHfVocabulary(baseFiles.tokenizer, { file: baseFiles.file });
  const baseSize = baseFiles.vocabSize ?? baseRaw.size;
  const stripped = stripHfTokenizer(baseFiles.tokenizer, baseSize, { file: baseFiles.file });
  if (stripped.removed.length) {
    warn(`base model ${baseId}: dropped ${stripped.removed.length} tokenizer token(s) with id ≥ vocab_size ${baseSize}: ${sample(stripped.removed)}`);
  }
  const baseVocab = stripped.removed.length ? readHfVocabulary(stripped.tokenizer, { file: baseFiles.file }) : baseRaw;

  // Per-model vocabularies.
  const models = new Map<string, ModelVocabulary>();
  const hfOf = new Map<string, HfVocabulary>();
  for (const m of order) {
    let hv: HfVocabulary | undefined;
    let files: ModelTokenizer | null | undefined;
    if (m === baseId) {
      hv = baseVocab;
      files = baseFiles;
    } else {
      files = lookup(opts.tokenizers, m);
      if (files?.tokenizer) {
        try {
          hv = readHfVocabulary(files.tokenizer, { file: files.file });
        } catch (e) {
          warn(`model ${m}: unable to read its tokenizer (${(e as Error).message}); assuming it is the same as the base model ${baseId}'s`);
        }
      } else {
        warn(`model ${m}: no tokenizer; assuming it is the same as the base model ${baseId}'s`);
      }
    }
    const v = hv ?? baseVocab;
    const vocabSize = files?.vocabSize ?? v.size;
    const { rows, dropped } = rowsBelow(v.ids, vocabSize);
    if (dropped.length && m !== baseId) {
      warn(`model ${m}: ${dropped.length} tokenizer token(s) have id ≥ vocab_size ${vocabSize} and are treated as absent: ${sample(dropped)}`);
    }
    if (hv) hfOf.set(m, hv);
    models.set(m, { model: m, loaded: hv !== undefined, vocabSize, rows, original: v.ids });
  }

  // The donor tokenizer and the tokens appended to it.
  const source = opts.tokenizer.source;
  let donorJson: Json;
  let donorConfig: Json | undefined;
  let donorVocab: HfVocabulary;
  let sourceLabel: string;
  const appended: HfAddedToken[] = [];
  if (source === 'base' || source === 'union') {
    sourceLabel = source;
    donorJson = stripped.tokenizer;
    donorConfig = baseFiles.tokenizerConfig;
    donorVocab = baseVocab;
  } else {
    sourceLabel = source.id;
    const files = lookup(opts.tokenizers, source.id);
    if (!files?.tokenizer) {
      throw new AmalgamError('E_MISSING', `the tokenizer source model ${source.id} has no tokenizer.json`, {
        key: 'tokenizer.source',
        hint: 'name a model folder that has tokenizer.json, or use `base` or `union`',
      });
    }
    donorJson = files.tokenizer;
    donorConfig = files.tokenizerConfig;
    donorVocab = readHfVocabulary(donorJson, { file: files.file });
  }
  let next = donorVocab.size;
  const appendedContents = new Set<string>();
  const append = (a: HfAddedToken) => {
    appended.push(a);
    appendedContents.add(a.content);
  };

  if (source === 'union') {
    const ordinary = new Set<string>();
    const addedSpecs = new Map<string, HfAddedToken>();
    const conflicted = new Set<string>();
    for (const m of order) {
      const hv = hfOf.get(m);
      if (!hv) continue;
      const limit = models.get(m)!.vocabSize;
      const addedHere = new Set(hv.added.map((a) => a.content));
      for (const [tok, id] of entriesById(hv.ids)) {
        if (id < limit && !addedHere.has(tok)) ordinary.add(tok);
      }
      for (const a of hv.added) {
        if (a.id >= limit) continue;
        const first = addedSpecs.get(a.content);
        if (!first) {
          addedSpecs.set(a.content, a);
        } else if (!sameSettings(first, a) && !conflicted.has(a.content)) {
          conflicted.add(a.content);
          warn(`token ${JSON.stringify(a.content)} is added with different settings by several models; using the first (${first.special ? 'special' : 'not special'}, normalized: ${first.normalized})`);
        }
      }
    }
    for (const tok of ordinary) {
      if (!addedSpecs.has(tok) && !donorVocab.ids.has(tok)) append(plainAddedToken(next++, tok));
    }
    for (const a of addedSpecs.values()) {
      if (!donorVocab.ids.has(a.content)) append({ ...a, id: next++ });
    }
  }
  for (const tok of Object.keys(opts.tokenizer.tokens ?? {})) {
    if (!donorVocab.ids.has(tok) && !appendedContents.has(tok)) append(plainAddedToken(next++, tok));
  }

  const tokenizerJson: Json = appended.length
    ? { ...donorJson, added_tokens: [...((donorJson.added_tokens as unknown[] | undefined) ?? []), ...appended.map(addedTokenJson)] }
    : donorJson;
  const outVocab = appended.length ? readHfVocabulary(tokenizerJson) : donorVocab;
  const tokenizerConfig: Json = { ...(donorConfig ?? {}), added_tokens_decoder: addedTokensDecoder(outVocab) };
  const tokenCount = outVocab.size;
  return {
    source: sourceLabel,
    base: baseId,
    tokens: tokensById(outVocab),
    ids: outVocab.ids,
    tokenCount,
    rowCount: padRowCount(tokenCount, opts.tokenizer.pad_to_multiple_of),
    appended,
    tokenizerJson,
    tokenizerConfig,
    models,
    warnings,
  };
}

// ---------------------------------------------------------------------------------------------
// Chat templates

/** Names accepted by `chat_template:` besides `auto` and a literal template. */
export const CHAT_TEMPLATE_NAMES = ['alpaca', 'chatml', 'llama3', 'mistral', 'exaone'] as const;
export type ChatTemplateName = (typeof CHAT_TEMPLATE_NAMES)[number];

const CHATML = [
  "{%- for message in messages %}",
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
  "{%- endfor %}",
  "{%- if add_generation_prompt %}",
  "{{- '<|im_start|>assistant\\n' }}",
  "{%- endif %}",
].join('\n');

const LLAMA3 = [
  "{{- bos_token }}",
  "{%- for message in messages %}",
  "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}",
  "{%- endfor %}",
  "{%- if add_generation_prompt %}",
  "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}",
  "{%- endif %}",
].join('\n');

const ALPACA = [
  "{{- bos_token }}",
  "{%- for message in messages %}",
  "{%- if message['role'] == 'system' %}",
  "{{- message['content'] | trim + '\\n\\n' }}",
  "{%- elif message['role'] == 'user' %}",
  "{{- '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}",
  "{%- elif message['role'] == 'assistant' %}",
  "{{- '### Response:\\n' + message['content'] | trim + eos_token + '\\n\\n' }}",
  "{%- endif %}",
  "{%- endfor %}",
  "{%- if add_generation_prompt %}",
  "{{- '### Response:\\n' }}",
  "{%- endif %}",
].join('\n');

const MISTRAL = [
  "{%- if messages and messages[0]['role'] == 'system' %}",
  "{%- set system_prefix = messages[0]['content'] | trim + '\\n\\n' %}",
  "{%- set turns = messages[1:] %}",
  "{%- else %}",
  "{%- set system_prefix = '' %}",
  "{%- set turns = messages %}",
  "{%- endif %}",
  "{{- bos_token }}",
  "{%- for message in turns %}",
  "{%- if message['role'] == 'user' %}",
  "{%- if loop.first %}",
  "{{- '[INST] ' + system_prefix + message['content'] | trim + ' [/INST]' }}",
  "{%- else %}",
  "{{- '[INST] ' + message['content'] | trim + ' [/INST]' }}",
  "{%- endif %}",
  "{%- elif message['role'] == 'assistant' %}",
  "{{- ' ' + message['content'] | trim + eos_token }}",
  "{%- endif %}",
  "{%- endfor %}",
].join('\n');

const EXAONE = [
  "{%- for message in messages %}",
  "{%- if loop.first and message['role'] != 'system' %}",
  "{{- '[|system|][|endofturn|]\\n' }}",
  "{%- endif %}",
  "{{- '[|' + message['role'] + '|]' + message['content'] }}",
  "{%- if message['role'] == 'user' %}",
  "{{- '\\n' }}",
  "{%- else %}",
  "{{- '[|endofturn|]\\n' }}",
  "{%- endif %}",
  "{%- endfor %}",
  "{%- if add_generation_prompt %}",
  "{{- '[|assistant|]' }}",
  "{%- endif %}",
].join('\n');

const BUILTIN: Readonly<Record<ChatTemplateName, string>> = {
  alpaca: ALPACA,
  chatml: CHATML,
  llama3: LLAMA3,
  mistral: MISTRAL,
  exaone: EXAONE,
};

/** The Jinja text of a built-in chat template, or undefined for another name. */
export function builtinChatTemplate(name: string): string | undefined {
  return Object.prototype.hasOwnProperty.call(BUILTIN, name) ? BUILTIN[name as ChatTemplateName] : undefined;
}

/**
 * The chat template a model ships: chat_template.jinja, else tokenizer_config.json
 * `chat_template` (a string, or the template named `default` of the list or object form).
 */
export function chatTemplateOf(t: ModelTokenizer | null | undefined): string | undefined {
  if (!t) return undefined;
  if (typeof t.chatTemplate === 'string' && t.chatTemplate.trim() !== '') return t.chatTemplate;
  const v = t.tokenizerConfig?.chat_template;
  if (typeof v === 'string') return v.trim() !== '' ? v : undefined;
  if (Array.isArray(v)) {
    const d = v.find((e) => isObject(e) && e.name === 'default');
    return isObject(d) && typeof d.template === 'string' ? d.template : undefined;
  }
  if (isObject(v) && typeof v.default === 'string') return v.default;
  return undefined;
}

/**
 * The template for `chat_template:` (merge-methods.md §6.8):
 * - `auto`: the most common template (compared after trimming) among `inputs`, the earliest on a
 *   tie; undefined when no input has one;
 * - `alpaca`, `chatml`, `llama3`, `mistral`, `exaone`: the built-in template;
 * - otherwise the value itself, which must look like a Jinja template (at least 20 characters
 *   and a `{`).
 * Undefined `setting` gives undefined.
 */
export function resolveChatTemplate(
  setting: string | undefined,
  inputs: readonly (ModelTokenizer | null | undefined)[],
  warn?: (message: string) => void,
): string | undefined {
  if (setting === undefined || setting === '') return undefined;
  if (setting === 'auto') {
    const counts = new Map<string, number>();
    for (const t of inputs) {
      const tpl = chatTemplateOf(t)?.trim();
      if (tpl) counts.set(tpl, (counts.get(tpl) ?? 0) + 1);
    }
    let best: string | undefined;
    let bestCount = 0;
    for (const [tpl, n] of counts) {
      if (n > bestCount) {
        best = tpl;
        bestCount = n;
      }
    }
    if (best === undefined) warn?.('chat_template: auto: no input model has a chat template; none is written');
    return best;
  }
  const builtin = builtinChatTemplate(setting);
  if (builtin !== undefined) return builtin;
  if (setting.length < 20 || !setting.includes('{')) {
    throw new AmalgamError('E_CONFIG', `${JSON.stringify(setting)} is neither a known template name nor a Jinja template`, {
      key: 'chat_template',
      hint: `use auto, ${CHAT_TEMPLATE_NAMES.join(', ')}, or a literal Jinja template`,
    });
  }
  return setting;
}

/** tokenizer_config.json with `chat_template` set (a copy). */
export function withChatTemplate(tokenizerConfig: Json, template: string): Json {
  return { ...tokenizerConfig, chat_template: template };
}

/**
 * The files to write for a built tokenizer (merge-methods.md §7.5): tokenizer.json,
 * tokenizer_config.json and, with a chat template, chat_template.jinja (the template is also set
 * in tokenizer_config.json). File name → contents.
 */
export function mergedTokenizerFiles(vocab: MergedVocabulary, chatTemplate?: string): Record<string, string> {
  const config = chatTemplate !== undefined ? withChatTemplate(vocab.tokenizerConfig, chatTemplate) : vocab.tokenizerConfig;
  const files: Record<string, string> = {
    'tokenizer.json': JSON.stringify(vocab.tokenizerJson, null, 2) + '\n',
    'tokenizer_config.json': JSON.stringify(config, null, 2) + '\n',
  };
  if (chatTemplate !== undefined) files['chat_template.jinja'] = chatTemplate;
  return files;
}
