/**
 * OSRM feature statistics (osrm.md §2–3): the inputs of the targeted linear layers of the base
 * model, accumulated per task in float64 while the samples stream through the model.
 *
 * Targeted modules that read the same tensor form one feature group (q, k and v read the
 * `input_layernorm` output of their block; gate and up the `post_attention_layernorm` output), so
 * each group is captured once. Per group the accumulators are the number of counted rows, the
 * sum of the rows (d) and, unless only means are asked for, the sum of their outer products
 * (d × d). Memory depends on d and the number of groups only, never on the number of samples.
 */
import type { Backend } from '../backend/backend.js';
import { AmalgamError } from '../errors.js';
import type { LinearCache, LinearLayer } from '../nn/layers/linear.js';
import type { LlamaModel } from '../nn/model.js';
import type { Parameter } from '../nn/params.js';
import type { EncodedExample } from '../data/batching.js';

/** Which rows of a batch are counted. */
export type FeaturePooling = 'real-tokens' | 'all-positions';

/** The linear modules that read one input tensor, and where that tensor comes from. */
export interface FeatureGroup {
  /** The tensor the modules read, e.g. `model.layers.3.input_layernorm` (its output). */
  name: string;
  /** Block index, or null for lm_head. */
  layer: number | null;
  /** Targeted module paths reading it, in model order. */
  modules: string[];
  /** Width of the input. */
  dim: number;
}

/** Accumulated statistics of one feature group for one task. */
export interface GroupStats {
  group: FeatureGroup;
  /** Rows counted. */
  count: number;
  /** Σ h over the counted rows [d]. */
  sum: Float64Array;
  /** Σ h hᵀ over the counted rows [d, d], row-major and symmetric; null when only means were collected. */
  outer: Float64Array | null;
}

/** Statistics of one task: every feature group of the targeted modules. */
export interface TaskFeatureStats {
  task: string;
  /** Sequences streamed. */
  samples: number;
  /** Rows counted per group (real tokens, or every position with `all-positions`). */
  rows: number;
  pooling: FeaturePooling;
  groups: GroupStats[];
}

/** PEFT `target_modules` matching: a name equal to the path or ending it after a dot; a RegExp over the whole path. */
export function matchesTarget(targets: readonly string[] | RegExp, path: string): boolean {
  if (targets instanceof RegExp) {
    const m = path.match(targets);
    return m !== null && m.index === 0 && m[0].length === path.length;
  }
  return targets.some((t) => path === t || path.endsWith(`.${t}`));
}

/** The tensor a linear module of a Llama-family model reads. */
export function inputSourceOf(module: string): string {
  const m = /^(model\.layers\.\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$/.exec(module);
  if (!m) return module === 'lm_head' ? 'model.norm' : module;
  const [, block, , key] = m;
  if (key === 'q' || key === 'k' || key === 'v') return `${block}.input_layernorm`;
  if (key === 'gate' || key === 'up') return `${block}.post_attention_layernorm`;
  return `${block}.${m[2]}.${key}_proj`;
}

/** The feature groups of the targeted modules (optionally only in some blocks), in model order. */
export function featureGroups(model: LlamaModel, targets: readonly string[] | RegExp, layers?: readonly number[]): FeatureGroup[] {
  const groups = new Map<string, FeatureGroup>();
  for (const slot of model.linearSlots()) {
    if (!matchesTarget(targets, slot.name)) continue;
    if (layers !== undefined && (slot.layer === null || !layers.includes(slot.layer))) continue;
    const src = inputSourceOf(slot.name);
    const g = groups.get(src);
    if (g) g.modules.push(slot.name);
    else groups.set(src, { name: src, layer: slot.layer, modules: [slot.name], dim: slot.get().inFeatures });
  }
  if (groups.size === 0) {
    throw new AmalgamError('E_USAGE', `no linear layer matches the targets ${String(targets)}`, {
      hint: 'use module names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj',
    });
  }
  return [...groups.values()];
}

/** Adds Σ_rows x xᵀ (upper triangle only) of the selected rows to `outer`, in float64. */
function addOuter(outer: Float64Array, x: Float32Array, rows: readonly number[], d: number, scratch: Float64Array): void {
  const k = rows.length;
  // Columns of the chunk, contiguous: xt[i·k + j] = x[rows[j], i].
  for (let j = 0; j < k; j++) {
    const o = rows[j]! * d;
    for (let i = 0; i < d; i++) scratch[i * k + j] = x[o + i]!;
  }
  for (let i = 0; i < d; i++) {
    const oi = i * k;
    const orow = i * d;
    for (let j = i; j < d; j++) {
      const oj = j * k;
      let s = 0;
      for (let t = 0; t < k; t++) s += scratch[oi + t]! * scratch[oj + t]!;
      outer[orow + j] += s;
    }
  }
}

/** Mirrors the upper triangle into the lower one. */
function symmetrize(a: Float64Array, d: number): void {
  for (let i = 0; i < d; i++) for (let j = i + 1; j < d; j++) a[j * d + i] = a[i * d + j]!;
}

/** Records the statistics of the rows its wrapped layer sees while a batch mask is set. */
class FeatureTap implements LinearLayer {
  readonly name: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly savedPerRow: number;
  /** Rows of the current batch to count; null: the tap only forwards. */
  rows: number[] | null = null;
  private scratch: Float64Array;

  constructor(
    readonly inner: LinearLayer,
    readonly stats: GroupStats,
    private readonly chunk: number,
  ) {
    this.name = inner.name;
    this.inFeatures = inner.inFeatures;
    this.outFeatures = inner.outFeatures;
    this.savedPerRow = inner.savedPerRow;
    this.scratch = stats.outer ? new Float64Array(inner.inFeatures * chunk) : new Float64Array(0);
  }

  createCache(maxRows: number): LinearCache {
    return this.inner.createCache(maxRows);
  }

  forward(be: Backend, x: Float32Array, y: Float32Array, rows: number, cache: LinearCache): void {
    this.inner.forward(be, x, y, rows, cache);
    const sel = this.rows;
    if (!sel) return;
    const s = this.stats;
    const d = this.inFeatures;
    for (const r of sel) {
      if (r >= rows) throw new AmalgamError('E_SHAPE', `row ${r} is outside the batch of ${rows} rows`, { key: this.name });
      const o = r * d;
      for (let i = 0; i < d; i++) s.sum[i] += x[o + i]!;
    }
    s.count += sel.length;
    if (s.outer) for (let c = 0; c < sel.length; c += this.chunk) addOuter(s.outer, x, sel.slice(c, c + this.chunk), d, this.scratch);
  }

  backward(be: Backend, dy: Float32Array, dx: Float32Array | null, rows: number, cache: LinearCache, accumulateDx?: boolean): void {
    this.inner.backward(be, dy, dx, rows, cache, accumulateDx);
  }

  parameters(): Parameter[] {
    return this.inner.parameters();
  }
}

export interface CollectOptions {
  /** Targeted modules (PEFT `target_modules` style). */
  targets: readonly string[] | RegExp;
  /** Only these blocks. */
  layers?: readonly number[];
  /** Sequences per forward (default 16). */
  batchSize?: number;
  /** 'real-tokens' (default) counts each sequence's real tokens; 'all-positions' pads every sequence to `padTo` and counts every position (the reference's pooling). */
  pooling?: FeaturePooling;
  /** With 'all-positions': the padded length (default: the longest sequence). */
  padTo?: number;
  /** Id written at padded positions (default 0). */
  padId?: number;
  /** Accumulate Σ h hᵀ as well as Σ h (default true). */
  secondMoment?: boolean;
  /** Task name recorded in the result. */
  task?: string;
}

/**
 * Streams labelled or unlabelled sequences through the model (forward only, final hidden state;
 * no gradients) and accumulates the statistics of the targeted modules' inputs. The model's
 * layers are restored afterwards.
 */
export function collectFeatureStats(model: LlamaModel, examples: Iterable<Pick<EncodedExample, 'ids'>>, opts: CollectOptions): TaskFeatureStats {
  const batchSize = opts.batchSize ?? 16;
  if (!Number.isSafeInteger(batchSize) || batchSize < 1) throw new AmalgamError('E_USAGE', `batch size must be a positive integer, got ${batchSize}`);
  const pooling = opts.pooling ?? 'real-tokens';
  const padId = opts.padId ?? 0;
  const second = opts.secondMoment ?? true;
  const groups = featureGroups(model, opts.targets, opts.layers);
  const stats: GroupStats[] = groups.map((g) => ({ group: g, count: 0, sum: new Float64Array(g.dim), outer: second ? new Float64Array(g.dim * g.dim) : null }));
  const slots = new Map(model.linearSlots().map((s) => [s.name, s]));
  const taps: { tap: FeatureTap; restore: () => void }[] = [];
  let samples = 0;
  let counted = 0;
  try {
    for (const [i, g] of groups.entries()) {
      const slot = slots.get(g.modules[0]!)!;
      const inner = slot.get();
      const tap = new FeatureTap(inner, stats[i]!, 64);
      slot.set(tap);
      taps.push({ tap, restore: () => slot.set(inner) });
    }
    const flush = (batch: Int32Array[]) => {
      if (batch.length === 0) return;
      const B = batch.length;
      const longest = Math.max(...batch.map((s) => s.length));
      let T = longest;
      if (pooling === 'all-positions' && opts.padTo !== undefined) {
        if (!Number.isSafeInteger(opts.padTo) || opts.padTo < longest) throw new AmalgamError('E_USAGE', `padTo ${opts.padTo} is shorter than a sequence of ${longest} tokens`);
        T = opts.padTo;
      }
      const ids = new Int32Array(B * T).fill(padId);
      const rows: number[] = [];
      batch.forEach((s, b) => {
        ids.set(s, b * T);
        const n = pooling === 'all-positions' ? T : s.length;
        for (let t = 0; t < n; t++) rows.push(b * T + t);
      });
      for (const { tap } of taps) tap.rows = rows;
      model.forward(ids, B, T, { output: 'hidden' });
      for (const { tap } of taps) tap.rows = null;
      samples += B;
      counted += rows.length;
    };
    let batch: Int32Array[] = [];
    for (const e of examples) {
      if (e.ids.length === 0) throw new AmalgamError('E_USAGE', `sample ${samples + batch.length} has no tokens`);
      batch.push(e.ids instanceof Int32Array ? e.ids : Int32Array.from(e.ids));
      if (batch.length === batchSize) {
        flush(batch);
        batch = [];
      }
    }
    flush(batch);
  } finally {
    for (const { restore } of taps.reverse()) restore();
  }
  for (const s of stats) if (s.outer) symmetrize(s.outer, s.group.dim);
  return { task: opts.task ?? '', samples, rows: counted, pooling, groups: stats };
}

/** The statistics of one group by name. */
export function groupStats(stats: TaskFeatureStats, group: string): GroupStats {
  const g = stats.groups.find((s) => s.group.name === group);
  if (!g) throw new AmalgamError('E_MISSING', `task ${stats.task} has no statistics for ${group}`, { key: group });
  return g;
}

/**
 * Mean feature vector Σ h / n. `divisor: 'n-1'` divides by n − 1 instead (the reference code's
 * off-by-one; it scales the vector and leaves its null space unchanged).
 */
export function featureMean(s: GroupStats, divisor: 'n' | 'n-1' = 'n'): Float64Array {
  const n = divisor === 'n' ? s.count : s.count - 1;
  if (n <= 0) throw new AmalgamError('E_USAGE', `no features were collected for ${s.group.name}`, { key: s.group.name });
  return s.sum.map((v) => v / n);
}

/** Uncentred second moment E[h hᵀ] (or, with `center`, the covariance E[h hᵀ] − μμᵀ) [d, d]. */
export function featureSecondMoment(s: GroupStats, center = false): Float64Array {
  if (!s.outer) throw new AmalgamError('E_USAGE', `only means were collected for ${s.group.name}`, { key: s.group.name, hint: 'collect with secondMoment: true' });
  if (s.count <= 0) throw new AmalgamError('E_USAGE', `no features were collected for ${s.group.name}`, { key: s.group.name });
  const d = s.group.dim;
  const out = s.outer.map((v) => v / s.count);
  if (center) {
    const mu = featureMean(s);
    for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) out[i * d + j] -= mu[i]! * mu[j]!;
  }
  return out;
}

/** Float64 values held by the accumulators (independent of the number of samples). */
export function statsFloats(stats: TaskFeatureStats): number {
  return stats.groups.reduce((n, s) => n + s.sum.length + (s.outer?.length ?? 0), 0);
}
