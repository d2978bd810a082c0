/**
 * Inferring a layout from tensor names alone (merge-methods.md §10.4), for models without a
 * registered definition:
 * - the layer index is the first `.N.` segment of a name (regex `\.(\d+)\.`); the layer stack is
 *   the prefix before it with the most tensors, and the layer count is the highest index + 1;
 * - a layer template present in only some layers is optional;
 * - every other tensor is a single weight: input-side ones (embeddings, position tables) go
 *   before the layers, the rest (final norms, heads) after;
 * - a tensor is an embedding if its first dimension equals the config's vocabulary size (by name
 *   when shapes or the vocabulary size are unknown);
 * - the output embedding is tied when there is no head tensor, or `tie_word_embeddings` is true.
 */
import { AmalgamError } from '../errors.js';
import { buildLayout } from './layout.js';
import { configValue, listNames } from './templates.js';
import type { ArchitectureDef, ResolvedArchitecture, TensorLike, WeightDef } from './types.js';

export interface InferOptions {
  /** File or folder named in messages. */
  file?: string;
  /** Why inference is used (recorded in the result's `reason`). */
  reason?: string;
  /** Config key (dotted) of the vocabulary size; default `vocab_size`, then `text_config.vocab_size`. */
  vocabSizeKey?: string;
  /** Passed to the layout check (inferred layouts claim every tensor, so rarely needed). */
  allowUnmatched?: boolean;
}

const LAYER_INDEX = /\.(\d+)\./;
/** Stored buffers that are not parameters. */
const BUFFER_PATTERNS = ['\\.rotary_emb\\.inv_freq$', '\\.attn\\.masked_bias$'];
/** Config keys that commonly hold the layer count. */
const LAYER_COUNT_KEYS = ['num_hidden_layers', 'n_layer', 'num_layers', 'n_layers', 'text_config.num_hidden_layers'];

const HEAD_NAME = /(^|\.)(lm_head|embed_out|output|head|heads|classifier|score)(\.|$)/;
const INPUT_NAME = /embed|(^|\.)(wte|wpe)(\.|$)|(^|\.)tok_|pos_emb|position/;
const EMBED_NAME = /embed|(^|\.)(wte|lm_head)(\.|$)|(^|\.)output\.weight$/;

function identity(config: unknown): string | undefined {
  const archs = configValue(config, 'architectures');
  if (Array.isArray(archs) && typeof archs[0] === 'string') return archs[0];
  const mt = configValue(config, 'model_type');
  return typeof mt === 'string' && mt !== '' ? mt : undefined;
}

function positiveInt(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isSafeInteger(v) && v > 0 ? v : undefined;
}

/** Infer a layout from tensor names (and shapes, for embeddings) and an optional config. */
export function inferArchitecture(tensors: readonly (string | TensorLike)[], config: unknown = {}, opts: InferOptions = {}): ResolvedArchitecture {
  const cfg = (config !== null && typeof config === 'object' && !Array.isArray(config) ? config : {}) as Record<string, unknown>;
  const list: TensorLike[] = tensors.map((t) => (typeof t === 'string' ? { name: t } : t));
  if (list.length === 0) {
    throw new AmalgamError('E_ARCH', 'the checkpoint has no tensors, so no layout can be inferred', { file: opts.file });
  }
  const bufferRes = BUFFER_PATTERNS.map((p) => new RegExp(p));
  const params = list.filter((t) => !bufferRes.some((re) => re.test(t.name)));
  const warnings: string[] = [];

  // Group layer tensors by the prefix before their first `.N.` segment.
  interface Group {
    count: number;
    maxIndex: number;
    indices: Set<number>;
    templates: Map<string, Set<number>>;
  }
  const groups = new Map<string, Group>();
  for (const t of params) {
    const m = LAYER_INDEX.exec(t.name);
    if (!m) continue;
    const prefix = t.name.slice(0, m.index);
    const index = Number(m[1]);
    if (!Number.isSafeInteger(index)) continue;
    let g = groups.get(prefix);
    if (!g) groups.set(prefix, (g = { count: 0, maxIndex: -1, indices: new Set(), templates: new Map() }));
    g.count++;
    g.maxIndex = Math.max(g.maxIndex, index);
    g.indices.add(index);
    const template = `${prefix}.\${layer_index}.${t.name.slice(m.index + m[0].length)}`;
    let layersOf = g.templates.get(template);
    if (!layersOf) g.templates.set(template, (layersOf = new Set()));
    layersOf.add(index);
  }
  let stack: string | undefined;
  for (const [prefix, g] of groups) {
    if (stack === undefined || g.count > groups.get(stack)!.count) stack = prefix;
  }
  const others = [...groups.keys()].filter((p) => p !== stack);
  if (others.length) {
    warnings.push(
      `the layer stack is taken to be '${stack}.N'; tensors under ${others.map((p) => `'${p}.N'`).join(', ')} are treated as individual weights`,
    );
  }

  const layer: WeightDef[] = [];
  let numLayers = 0;
  if (stack !== undefined) {
    const g = groups.get(stack)!;
    numLayers = g.maxIndex + 1;
    const empty: number[] = [];
    for (let i = 0; i < numLayers; i++) if (!g.indices.has(i)) empty.push(i);
    if (empty.length) {
      throw new AmalgamError('E_ARCH', `layer${empty.length === 1 ? '' : 's'} ${listNames(empty.map(String), 8)} of '${stack}' ha${empty.length === 1 ? 's' : 've'} no tensors, but layer ${g.maxIndex} exists`, {
        file: opts.file,
        key: `${stack}.${empty[0]}`,
        hint: 'the checkpoint looks incomplete (a shard may be missing)',
      });
    }
    for (const [template, layersOf] of g.templates) {
      const w: WeightDef = { name: template };
      if (layersOf.size < numLayers) w.optional = true;
      layer.push(w);
    }
    const partial = layer.filter((w) => w.optional).map((w) => w.name);
    if (partial.length) warnings.push(`${partial.length} layer template(s) appear in only some layers and are optional: ${listNames(partial)}`);
  }

  const layerCountKey = LAYER_COUNT_KEYS.find((k) => positiveInt(configValue(cfg, k)) !== undefined || configValue(cfg, k) === 0);
  if (layerCountKey !== undefined) {
    const n = configValue(cfg, layerCountKey) as number;
    if (n !== numLayers) warnings.push(`config.json "${layerCountKey}" is ${n}, but the tensor names show ${numLayers} layer(s)`);
  }

  // Individual (non-layer) weights.
  const vocabKey = opts.vocabSizeKey ?? (positiveInt(configValue(cfg, 'vocab_size')) === undefined && positiveInt(configValue(cfg, 'text_config.vocab_size')) !== undefined ? 'text_config.vocab_size' : 'vocab_size');
  const vocab = positiveInt(configValue(cfg, vocabKey));
  const pre: WeightDef[] = [];
  const post: WeightDef[] = [];
  for (const t of params) {
    const m = LAYER_INDEX.exec(t.name);
    if (m && t.name.slice(0, m.index) === stack) continue;
    const isEmbed = vocab !== undefined && t.shape !== undefined ? t.shape.length >= 1 && t.shape[0] === vocab : EMBED_NAME.test(t.name);
    const head = HEAD_NAME.test(t.name);
    const w: WeightDef = { name: t.name };
    if (isEmbed) w.isEmbed = true;
    if (!head && (isEmbed || INPUT_NAME.test(t.name))) pre.push(w);
    else post.push(w);
  }

  const inputEmbeds = pre.filter((w) => w.isEmbed).map((w) => w.name);
  const heads = post.filter((w) => w.isEmbed && HEAD_NAME.test(w.name));
  const tieFlag = configValue(cfg, 'tie_word_embeddings');
  if (tieFlag === true && inputEmbeds.length) {
    for (const h of heads) {
      h.optional = true;
      h.tiedNames = inputEmbeds.slice();
    }
  }
  const tieWordEmbeddings = tieFlag === true || (inputEmbeds.length > 0 && heads.length === 0);

  const name = identity(cfg) ?? 'inferred';
  const archs = configValue(cfg, 'architectures');
  const mt = configValue(cfg, 'model_type');
  const def: ArchitectureDef = {
    name,
    modelTypes: typeof mt === 'string' && mt !== '' ? [mt] : [],
    architectures: Array.isArray(archs) ? archs.filter((a): a is string => typeof a === 'string') : [],
    numLayersKey: layerCountKey ?? 'num_hidden_layers',
    vocabSizeKey: vocabKey,
    pre,
    layer,
    post,
    ignore: BUFFER_PATTERNS,
  };
  return buildLayout(def, cfg, numLayers, list, {
    file: opts.file,
    inferred: true,
    reason: opts.reason ?? 'the layout was inferred from the tensor names',
    allowUnmatched: opts.allowUnmatched,
    warnings,
    tieWordEmbeddings,
  });
}
