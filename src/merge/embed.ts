/**
 * Embeddings of models with different vocabularies (merge-methods.md §5).
 *
 * With a tokenizer configuration, every model's `embed_tokens` / `lm_head` matrix is permuted
 * onto the output vocabulary built by `buildMergedVocabulary` before the merge method sees it:
 * - `planEmbeddingPermutation` (before any tensor data is read) decides, for each model and each
 *   output row, whether the row is the model's own row or the token's default row, and how each
 *   default row is made;
 * - `buildPermutedEmbedding(s)` (per embedding tensor) applies the plan to the matrices.
 *
 * Without one, `plannedEmbedShape` gives the shape rule of the merge method for embeddings whose
 * shapes differ (common top-left submatrix, the base's shape, or an error).
 */
import { AmalgamError } from '../errors.js';
import type { ModelReference, TokenEmbeddingConfig } from '../config/types.js';
import type { MergedVocabulary } from '../tokenizer/merge.js';

// ---------------------------------------------------------------------------------------------
// Plan

/** One row of one model's original embedding. */
export interface EmbeddingRowRef {
  model: string;
  row: number;
}

/**
 * The default row of an output token: the mean of `from` (one entry: that row; none: zeros).
 * `rule` says which rule chose it:
 * - `configured`: the token's `tokens:` entry (`source`);
 * - `single`: exactly one model has the token;
 * - `none`: no model has it (zeros);
 * - `base`: several models have it, the base among them;
 * - `mean`: several models have it and the base does not.
 */
export interface DefaultRow {
  rule: 'configured' | 'single' | 'none' | 'base' | 'mean';
  from: readonly EmbeddingRowRef[];
}

export interface EmbeddingPermutation {
  /** Tensor the plan is for (in messages). */
  tensorName?: string;
  /** Models whose permuted matrices are built: the tensor's inputs and the base. */
  models: readonly string[];
  /** The base model of the tensor (the count rule's base), or null. */
  base: string | null;
  /** Output token ids 0 … tokenCount − 1 are tokens (or ids no token has). */
  tokenCount: number;
  /** Output rows; rows from tokenCount on are padding. */
  rowCount: number;
  /** Output token by row (undefined where no token has the id). */
  tokens: readonly (string | undefined)[];
  /**
   * Per model, for each output token row: the model's own row, or −1 to take the default row
   * (the model lacks the token, or the token is configured with `force: true`).
   */
  rows: ReadonlyMap<string, Int32Array>;
  /** Default rows, by output token row, for every row some model takes the default of. */
  defaults: ReadonlyMap<number, DefaultRow>;
  warnings: readonly string[];
}

export interface EmbeddingPermutationOptions {
  /** The tensor's input models (with `models:`, every model and the base). The base is added when missing. */
  models: readonly (ModelReference | string)[];
  /** The tensor's base model (slice `base_model`, else `base_model`); null or absent without one. */
  base?: ModelReference | string | null;
  /** `tokenizer.tokens`. */
  tokens?: Readonly<Record<string, TokenEmbeddingConfig>>;
  /** Rows of each model's matrix, when known from the headers: row references are checked up front. */
  rowCounts?: ReadonlyMap<string, number> | Readonly<Record<string, number>>;
  tensorName?: string;
  warn?: (message: string) => void;
}

function idOf(m: ModelReference | string): string {
  return typeof m === 'string' ? m : m.id;
}

function getCount(counts: EmbeddingPermutationOptions['rowCounts'], model: string): number | undefined {
  if (!counts) return undefined;
  if (counts instanceof Map) return counts.get(model);
  const rec = counts as Readonly<Record<string, number>>;
  return Object.prototype.hasOwnProperty.call(rec, model) ? rec[model] : undefined;
}

function tokenKey(token: string): string {
  return `tokenizer.tokens[${JSON.stringify(token)}].source`;
}

function sample(list: readonly string[], n = 8): string {
  const shown = list.slice(0, n).map((t) => JSON.stringify(t)).join(', ');
  return list.length > n ? `${shown}, … (${list.length} in all)` : shown;
}

/**
 * Plans the permutation of one embedding tensor (merge-methods.md §5 steps 2–4). For each output
 * token t the default row is, when `tokens:` configures t with a `source`:
 * - a model: that model's row for t (an error if the model lacks t);
 * - `{kind: model_token, model, token | token_id}`: that row of the model's original vocabulary;
 * - `{kind: zero}`: zeros;
 * otherwise, by the number of models (inputs and base) that have t: one → its row; none → zeros
 * (warning); several, the base among them → the base's row; several without the base → the mean
 * of their rows. Each model keeps its own row for the tokens it has unless the token is configured
 * with `force: true`.
 *
 * Errors (E_CONFIG, naming the token, model and key): a configured model that is not an input of
 * the tensor or lacks the token, a `model_token` token the model's vocabulary lacks, or (with
 * `rowCounts`) a row beyond the model's matrix.
 */
export function planEmbeddingPermutation(vocab: MergedVocabulary, opts: EmbeddingPermutationOptions): EmbeddingPermutation {
  const warnings: string[] = [];
  const warn = (m: string) => {
    warnings.push(m);
    opts.warn?.(m);
  };
  const where = opts.tensorName ? `${opts.tensorName}: ` : '';
  const base = opts.base === undefined || opts.base === null ? null : idOf(opts.base);
  const models: string[] = [];
  for (const m of opts.models) if (!models.includes(idOf(m))) models.push(idOf(m));
  if (base !== null && !models.includes(base)) models.push(base);
  if (models.length === 0) throw new AmalgamError('E_CONFIG', `${where}an embedding permutation needs at least one model`, { key: opts.tensorName });
  for (const m of models) {
    if (!vocab.models.has(m)) {
      throw new AmalgamError('E_CONFIG', `${where}model ${m} is not one of the models the output vocabulary was built from`, {
        key: opts.tensorName,
        hint: 'pass every model of the merge to buildMergedVocabulary',
      });
    }
  }

  const n = vocab.tokenCount;
  const rows = new Map<string, Int32Array>();
  for (const m of models) {
    const own = vocab.models.get(m)!.rows;
    const r = new Int32Array(n).fill(-1);
    for (let t = 0; t < n; t++) {
      const tok = vocab.tokens[t];
      if (tok === undefined) continue;
      const row = own.get(tok);
      if (row !== undefined) r[t] = row;
    }
    rows.set(m, r);
  }

  const checkRow = (model: string, row: number, token: string) => {
    const count = getCount(opts.rowCounts, model);
    if (count !== undefined && row >= count) {
      throw new AmalgamError('E_CONFIG', `${where}token ${JSON.stringify(token)}: row ${row} is out of range for model ${model}, whose embedding has ${count} rows`, {
        key: tokenKey(token),
      });
    }
  };
  const inputOf = (ref: ModelReference, token: string): string => {
    if (!models.includes(ref.id)) {
      throw new AmalgamError('E_CONFIG', `${where}token ${JSON.stringify(token)}: model ${ref.id} is not an input of this tensor`, {
        key: tokenKey(token),
        hint: `use one of: ${models.join(', ')}`,
      });
    }
    return ref.id;
  };

  // Configured tokens.
  const configured = new Map<number, { def?: DefaultRow; force: boolean }>();
  for (const [token, cfg] of Object.entries(opts.tokens ?? {})) {
    const t = vocab.ids.get(token);
    if (t === undefined || t >= n) {
      throw new AmalgamError('E_CONFIG', `${where}token ${JSON.stringify(token)} is not in the output vocabulary`, { key: `tokenizer.tokens[${JSON.stringify(token)}]` });
    }
    const src = cfg.source;
    let def: DefaultRow | undefined;
    if (src === undefined) {
      def = undefined;
    } else if ('kind' in src && src.kind === 'zero') {
      def = { rule: 'configured', from: [] };
    } else if ('kind' in src && src.kind === 'model_token') {
      const m = inputOf(src.model, token);
      let row: number;
      if (src.token_id !== undefined) {
        row = src.token_id;
      } else {
        const found = vocab.models.get(m)!.original.get(src.token ?? '');
        if (found === undefined) {
          throw new AmalgamError('E_CONFIG', `${where}token ${JSON.stringify(token)}: model ${m} has no token ${JSON.stringify(src.token)}`, {
            key: tokenKey(token),
          });
        }
        row = found;
      }
      checkRow(m, row, token);
      def = { rule: 'configured', from: [{ model: m, row }] };
    } else {
      const m = inputOf(src as ModelReference, token);
      const row = rows.get(m)![t];
      if (row < 0) {
        throw new AmalgamError('E_CONFIG', `${where}token ${JSON.stringify(token)}: model ${m} does not have this token`, {
          key: tokenKey(token),
          hint: 'name a model that has the token, or use {kind: model_token, model, token} or {kind: zero}',
        });
      }
      def = { rule: 'configured', from: [{ model: m, row }] };
    }
    configured.set(t, { ...(def ? { def } : {}), force: cfg.force });
  }

  // Default rows where some model needs one; forced tokens.
  const defaults = new Map<number, DefaultRow>();
  const missing: string[] = [];
  const rowArrays = models.map((m) => rows.get(m)!);
  for (let t = 0; t < n; t++) {
    const tok = vocab.tokens[t];
    if (tok === undefined) continue;
    const conf = configured.get(t);
    if (conf?.force) for (const r of rowArrays) r[t] = -1;
    let needed = false;
    for (const r of rowArrays) if (r[t] < 0) needed = true;
    if (!needed && !conf?.def) continue;
    let def = conf?.def;
    if (!def) {
      const having: EmbeddingRowRef[] = [];
      for (const m of models) {
        const row = vocab.models.get(m)!.rows.get(tok);
        if (row !== undefined) having.push({ model: m, row });
      }
      if (having.length === 1) def = { rule: 'single', from: having };
      else if (having.length === 0) {
        def = { rule: 'none', from: [] };
        missing.push(tok);
      } else {
        const b = base !== null ? having.find((h) => h.model === base) : undefined;
        def = b ? { rule: 'base', from: [b] } : { rule: 'mean', from: having };
      }
    }
    defaults.set(t, def);
  }
  if (missing.length) warn(`${where}${missing.length} token(s) are in none of the models; their rows are zeros: ${sample(missing)}`);

  if (opts.rowCounts) {
    for (const m of models) {
      const count = getCount(opts.rowCounts, m);
      if (count === undefined) continue;
      const r = rows.get(m)!;
      for (let t = 0; t < n; t++) {
        if (r[t] >= count) {
          throw new AmalgamError('E_SHAPE', `${where}model ${m}: token ${JSON.stringify(vocab.tokens[t])} is row ${r[t]} of its vocabulary, but its embedding has ${count} rows`, {
            key: opts.tensorName,
            hint: "check the model's vocab_size in config.json",
          });
        }
      }
    }
  }

  return {
    ...(opts.tensorName ? { tensorName: opts.tensorName } : {}),
    models,
    base,
    tokenCount: n,
    rowCount: vocab.rowCount,
    tokens: vocab.tokens,
    rows,
    defaults,
    warnings,
  };
}

/** The models whose matrices `buildPermutedEmbedding(plan, model, …)` reads: the model and its default rows' sources. */
export function permutedEmbeddingSources(plan: EmbeddingPermutation, model: string): string[] {
  const r = plan.rows.get(model);
  if (!r) throw unknownModel(plan, model);
  const used = new Set<string>([model]);
  for (let t = 0; t < plan.tokenCount; t++) {
    if (r[t] >= 0) continue;
    const def = plan.defaults.get(t);
    if (def) for (const f of def.from) used.add(f.model);
  }
  return plan.models.filter((m) => used.has(m));
}

// ---------------------------------------------------------------------------------------------
// Apply

/** A row-major 2-D embedding matrix `[rows, width]`. */
export interface EmbeddingMatrix {
  data: Float32Array;
  shape: readonly number[];
}

/** The embedding matrices of the models, by model id (a map or a lookup function). */
export type EmbeddingMatrices = ReadonlyMap<string, EmbeddingMatrix> | ((model: string) => EmbeddingMatrix | undefined);

function unknownModel(plan: EmbeddingPermutation, model: string): AmalgamError {
  return new AmalgamError('E_CONFIG', `${plan.tensorName ? `${plan.tensorName}: ` : ''}model ${model} is not part of this embedding permutation`, {
    key: plan.tensorName,
    hint: `models: ${plan.models.join(', ')}`,
  });
}

function matrixOf(plan: EmbeddingPermutation, matrices: EmbeddingMatrices, model: string): EmbeddingMatrix {
  const m = typeof matrices === 'function' ? matrices(model) : matrices.get(model);
  const where = plan.tensorName ? `${plan.tensorName}: ` : '';
  if (!m) throw new AmalgamError('E_MISSING', `${where}no embedding matrix for model ${model}`, { key: plan.tensorName });
  if (m.shape.length !== 2 || m.data.length !== m.shape[0] * m.shape[1]) {
    throw new AmalgamError('E_SHAPE', `${where}embedding of model ${model} must be a 2-D matrix, got shape [${m.shape.join(', ')}] with ${m.data.length} values`, {
      key: plan.tensorName,
    });
  }
  return m;
}

/**
 * Checks that every model's embedding has the same width (from the headers, before reading data)
 * and returns it.
 */
export function checkEmbeddingWidths(plan: EmbeddingPermutation, shapes: ReadonlyMap<string, readonly number[]> | Readonly<Record<string, readonly number[]>>): number {
  const get = (m: string) => (shapes instanceof Map ? shapes.get(m) : (shapes as Readonly<Record<string, readonly number[]>>)[m]);
  const widths = plan.models.map((m) => {
    const s = get(m);
    if (!s || s.length !== 2) {
      throw new AmalgamError('E_SHAPE', `${plan.tensorName ? `${plan.tensorName}: ` : ''}embedding of model ${m} must be 2-D, got ${s ? `[${s.join(', ')}]` : 'nothing'}`, {
        key: plan.tensorName,
      });
    }
    return { model: m, width: s[1] };
  });
  if (widths.some((w) => w.width !== widths[0].width)) {
    throw new AmalgamError('E_SHAPE', `${plan.tensorName ? `${plan.tensorName}: ` : ''}embedding widths differ (${widths.map((w) => `${w.model}: ${w.width}`).join(', ')})`, {
      key: plan.tensorName,
      hint: 'models with different hidden sizes cannot be merged',
    });
  }
  return widths[0].width;
}

function checkRowIndex(plan: EmbeddingPermutation, src: EmbeddingMatrix, srcModel: string, row: number, outRow: number): void {
  if (row >= src.shape[0]) {
    const tok = plan.tokens[outRow];
    throw new AmalgamError(
      'E_SHAPE',
      `${plan.tensorName ? `${plan.tensorName}: ` : ''}token ${JSON.stringify(tok)} needs row ${row} of model ${srcModel}, whose embedding has ${src.shape[0]} rows`,
      { key: plan.tensorName },
    );
  }
}

function copyRow(plan: EmbeddingPermutation, src: EmbeddingMatrix, srcModel: string, row: number, out: Float32Array, outRow: number, width: number): void {
  checkRowIndex(plan, src, srcModel, row, outRow);
  out.set(src.data.subarray(row * width, (row + 1) * width), outRow * width);
}

/**
 * Model `model`'s permuted embedding `[rowCount, width]` (row-major): for each output token row,
 * the model's own row or the token's default row; rows of ids without a token and the padding
 * rows are the mean of the model's token rows. Only the matrices of
 * `permutedEmbeddingSources(plan, model)` are read. Means are accumulated in float64.
 */
export function buildPermutedEmbedding(plan: EmbeddingPermutation, model: string, matrices: EmbeddingMatrices): Float32Array {
  const r = plan.rows.get(model);
  if (!r) throw unknownModel(plan, model);
  const own = matrixOf(plan, matrices, model);
  const width = own.shape[1];
  const cache = new Map<string, EmbeddingMatrix>([[model, own]]);
  const get = (m: string): EmbeddingMatrix => {
    let x = cache.get(m);
    if (!x) {
      x = matrixOf(plan, matrices, m);
      if (x.shape[1] !== width) {
        throw new AmalgamError(
          'E_SHAPE',
          `${plan.tensorName ? `${plan.tensorName}: ` : ''}embedding widths differ (${model}: ${width}, ${m}: ${x.shape[1]})`,
          { key: plan.tensorName, hint: 'models with different hidden sizes cannot be merged' },
        );
      }
      cache.set(m, x);
    }
    return x;
  };

  const out = new Float32Array(plan.rowCount * width);
  const acc = new Float64Array(width);
  const mean = new Float64Array(width);
  let tokenRows = 0;
  for (let t = 0; t < plan.tokenCount; t++) {
    if (plan.tokens[t] === undefined) continue;
    if (r[t] >= 0) {
      copyRow(plan, own, model, r[t], out, t, width);
    } else {
      const def = plan.defaults.get(t);
      if (def && def.from.length === 1) {
        copyRow(plan, get(def.from[0].model), def.from[0].model, def.from[0].row, out, t, width);
      } else if (def && def.from.length > 1) {
        acc.fill(0);
        for (const f of def.from) {
          const src = get(f.model);
          checkRowIndex(plan, src, f.model, f.row, t);
          const off = f.row * width;
          for (let j = 0; j < width; j++) acc[j] += src.data[off + j];
        }
        const k = def.from.length;
        const o = t * width;
        for (let j = 0; j < width; j++) out[o + j] = acc[j] / k;
      }
    }
    tokenRows++;
    const o = t * width;
    for (let j = 0; j < width; j++) mean[j] += out[o + j];
  }

  if (tokenRows < plan.rowCount) {
    const fill = new Float32Array(width);
    if (tokenRows > 0) for (let j = 0; j < width; j++) fill[j] = mean[j] / tokenRows;
    for (let t = 0; t < plan.rowCount; t++) {
      if (t < plan.tokenCount && plan.tokens[t] !== undefined) continue;
      out.set(fill, t * width);
    }
  }
  return out;
}

/**
 * Every model's permuted embedding (`buildPermutedEmbedding` for each of `plan.models`), after
 * checking that all widths agree.
 */
export function buildPermutedEmbeddings(plan: EmbeddingPermutation, matrices: EmbeddingMatrices): Map<string, EmbeddingMatrix> {
  const shapes = new Map(plan.models.map((m) => [m, matrixOf(plan, matrices, m).shape] as const));
  const width = checkEmbeddingWidths(plan, shapes);
  const out = new Map<string, EmbeddingMatrix>();
  for (const m of plan.models) out.set(m, { data: buildPermutedEmbedding(plan, m, matrices), shape: [plan.rowCount, width] });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Without a tokenizer configuration

/**
 * How a merge method treats embeddings of different shapes without a tokenizer configuration:
 * - `common_submatrix` (linear, slerp, nuslerp, karcher, model_stock, arcee_fusion): every input
 *   is cut to the common top-left submatrix [min rows, min columns];
 * - `base_shape` (task_arithmetic, ties, dare_*, breadcrumbs*, della*): the other inputs are cut
 *   to the base's shape, and one smaller than the base is an error;
 * - `exact` (every other method): different shapes are an error.
 */
export type EmbedShapeRule = 'common_submatrix' | 'base_shape' | 'exact';

const COMMON_SUBMATRIX = new Set(['linear', 'slerp', 'nuslerp', 'karcher', 'model_stock', 'arcee_fusion']);
const BASE_SHAPE = new Set(['task_arithmetic', 'ties', 'dare_linear', 'dare_ties', 'breadcrumbs', 'breadcrumbs_ties', 'della', 'della_linear']);

export function embedShapeRule(method: string): EmbedShapeRule {
  if (COMMON_SUBMATRIX.has(method)) return 'common_submatrix';
  if (BASE_SHAPE.has(method)) return 'base_shape';
  return 'exact';
}

export interface PlannedEmbedShape {
  /** Shape of the merged embedding. */
  shape: [number, number];
  /** Some input is cut. */
  truncated: boolean;
  /** The output `vocab_size`: the merged embedding's rows. */
  vocabSize: number;
  /** Set when inputs are cut: says what is cut and that vocab_size is set to the row count. */
  warning?: string;
}

/**
 * The shape of a merged embedding tensor from its inputs' shapes (headers only), by the rule of
 * `method` (see `EmbedShapeRule`). Unlike mergekit, the output `vocab_size` is meant to be set to
 * `vocabSize` (merge-methods.md §13 #10). Throws E_SHAPE for shapes the method cannot merge.
 */
export function plannedEmbedShape(
  method: string,
  inputs: readonly { model: string; shape: readonly number[] }[],
  base: string | null,
  tensorName: string,
): PlannedEmbedShape {
  if (inputs.length === 0) throw new AmalgamError('E_CONFIG', `${method}: no inputs`, { key: tensorName });
  for (const x of inputs) {
    if (x.shape.length !== 2) {
      throw new AmalgamError('E_SHAPE', `${method}: embedding of model ${x.model} must be 2-D, got [${x.shape.join(', ')}]`, { key: tensorName });
    }
  }
  const describe = inputs.map((x) => `${x.model} [${x.shape.join(', ')}]`).join(', ');
  const first = inputs[0].shape;
  if (inputs.every((x) => x.shape[0] === first[0] && x.shape[1] === first[1])) {
    return { shape: [first[0], first[1]], truncated: false, vocabSize: first[0] };
  }
  const hint = 'set tokenizer_source (or tokenizer:) to merge models with different vocabularies';
  const rule = embedShapeRule(method);
  if (rule === 'common_submatrix') {
    const rows = Math.min(...inputs.map((x) => x.shape[0]));
    const cols = Math.min(...inputs.map((x) => x.shape[1]));
    return {
      shape: [rows, cols],
      truncated: true,
      vocabSize: rows,
      warning: `${tensorName}: using the common submatrix [${rows}, ${cols}] of ${describe}; vocab_size is set to ${rows} and the copied tokenizer may not match`,
    };
  }
  if (rule === 'base_shape') {
    const b = base === null ? undefined : inputs.find((x) => x.model === base);
    if (!b) throw new AmalgamError('E_CONFIG', `${method} needs the base model among the inputs of this tensor`, { key: tensorName, hint: 'set base_model:' });
    const [rows, cols] = b.shape;
    for (const x of inputs) {
      if (x.shape[0] < rows || x.shape[1] < cols) {
        throw new AmalgamError('E_SHAPE', `${method}: embedding of model ${x.model} [${x.shape.join(', ')}] is smaller than the base model's [${rows}, ${cols}]`, {
          key: tensorName,
          hint,
        });
      }
    }
    return {
      shape: [rows, cols],
      truncated: true,
      vocabSize: rows,
      warning: `${tensorName}: cutting ${describe} to the base model's shape [${rows}, ${cols}]`,
    };
  }
  throw new AmalgamError('E_SHAPE', `${method}: embeddings have different shapes (${describe})`, { key: tensorName, hint });
}
