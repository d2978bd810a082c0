/**
 * The DAM objective (dam.md §2): one term per source on a batch of that source's own data, plus
 * regularisers on the raw coefficients.
 *
 * Per-source terms, each a weighted mean over the real (non-padding) positions of the batch:
 * - 'kl' (default): T² · KL(softmax(z_i/T) ‖ softmax(z_merged/T)), T = 2, over the full
 *   vocabulary or over the teacher's cached top-k entries (both softmaxes over those k only);
 * - 'mse': λ_mse · mean over the vocabulary (or the top-k) of (z_merged − z_i)², λ_mse = 1;
 * - 'entropy': λ_ent · T² · H(softmax(z_merged/T)), λ_ent = 0.1 (no teacher).
 *
 * Regularisers, summed over the tensors with coefficients (weight coefficients only, not the
 * scalar bias coefficients), on the raw coefficients cᵢ:
 * - cosine: λ_sim · mean over pairs a < b of cos(c_a, c_b), λ_sim = 0.01;
 * - L1 / L2: λ₁ Σᵢ ‖cᵢ‖₁ + λ₂ Σᵢ ‖cᵢ‖₂ (unsquared), off by default (1e-6 each when on);
 * - overlap: λ_ov · mean over pairs of Σⱼ min(|c_a[j]|, |c_b[j]|), off by default (1e-5 when on).
 */
import { AmalgamError } from '../errors.js';
import { klDivLoss, realTokenWeights } from '../nn/losses.js';
import type { Parameter } from '../nn/params.js';
import type { DamModel } from './model.js';

export type DamObjective = 'kl' | 'mse' | 'entropy';

export interface DamLossOptions {
  /** Default 'kl'. */
  objective?: DamObjective;
  /** Softening temperature T (default 2). */
  temperature?: number;
  /** λ of the cosine-similarity term (default 0.01; 0 disables). */
  cosine?: number;
  /** λ₁ of the L1 term (default 0). */
  l1?: number;
  /** λ₂ of the unsquared L2 term (default 0). */
  l2?: number;
  /** λ of the overlap term (default 0). */
  overlap?: number;
  /** λ of the MSE objective (default 1). */
  mseWeight?: number;
  /** λ of the entropy objective (default 0.1). */
  entropyWeight?: number;
}

export const DAM_LOSS_DEFAULTS: Required<DamLossOptions> = {
  objective: 'kl',
  temperature: 2,
  cosine: 0.01,
  l1: 0,
  l2: 0,
  overlap: 0,
  mseWeight: 1,
  entropyWeight: 0.1,
};

export function resolveLossOptions(o: DamLossOptions = {}): Required<DamLossOptions> {
  const r = { ...DAM_LOSS_DEFAULTS, ...Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) } as Required<DamLossOptions>;
  if (!['kl', 'mse', 'entropy'].includes(r.objective)) throw new AmalgamError('E_USAGE', `unknown DAM objective '${String(r.objective)}'`, { hint: 'use kl, mse or entropy' });
  if (!(r.temperature > 0) || !Number.isFinite(r.temperature)) throw new AmalgamError('E_USAGE', `temperature must be positive, got ${r.temperature}`);
  for (const k of ['cosine', 'l1', 'l2', 'overlap', 'mseWeight', 'entropyWeight'] as const) {
    if (!(r[k] >= 0) || !Number.isFinite(r[k])) throw new AmalgamError('E_USAGE', `${k} must be a non-negative number, got ${r[k]}`);
  }
  return r;
}

/** A teacher's top-k logits per row: indices and values [rows·k], largest first. */
export interface TopKLogits {
  k: number;
  rows: number;
  indices: Int32Array;
  values: Float32Array;
}

/** The k largest logits of each row of [rows, vocab] (ties: the lower index first). */
export function teacherTopK(logits: Float32Array, rows: number, vocab: number, k: number): TopKLogits {
  if (!Number.isSafeInteger(k) || k < 1 || k > vocab) throw new AmalgamError('E_USAGE', `top-k needs 1 ≤ k ≤ ${vocab}, got ${k}`);
  const indices = new Int32Array(rows * k);
  const values = new Float32Array(rows * k);
  const heap = new Int32Array(k);
  for (let r = 0; r < rows; r++) {
    const o = r * vocab;
    // Min-heap of the k best so far; "worse" = smaller value, or equal value and larger index.
    const worse = (a: number, b: number) => logits[o + a]! < logits[o + b]! || (logits[o + a] === logits[o + b] && a > b);
    let size = 0;
    const down = (i: number) => {
      for (;;) {
        const l = 2 * i + 1;
        const rr = l + 1;
        let m = i;
        if (l < size && worse(heap[l]!, heap[m]!)) m = l;
        if (rr < size && worse(heap[rr]!, heap[m]!)) m = rr;
        if (m === i) return;
        const t = heap[i]!;
        heap[i] = heap[m]!;
        heap[m] = t;
        i = m;
      }
    };
    for (let j = 0; j < vocab; j++) {
      if (size < k) {
        let i = size++;
        heap[i] = j;
        while (i > 0) {
          const p = (i - 1) >> 1;
          if (!worse(heap[i]!, heap[p]!)) break;
          const t = heap[i]!;
          heap[i] = heap[p]!;
          heap[p] = t;
          i = p;
        }
      } else if (worse(heap[0]!, j)) {
        heap[0] = j;
        down(0);
      }
    }
    const best = Array.from(heap.subarray(0, k)).sort((a, b) => (worse(a, b) ? 1 : worse(b, a) ? -1 : 0));
    for (let q = 0; q < k; q++) {
      indices[r * k + q] = best[q]!;
      values[r * k + q] = logits[o + best[q]!]!;
    }
  }
  return { k, rows, indices, values };
}

export interface SourceLossOptions {
  /** Per-row weights: 1 at real positions, 0 at padding (default all 1). */
  weights?: ArrayLike<number>;
  /** Gradient output [rows, vocab] (may be the logits themselves), or null. */
  dLogits?: Float32Array | null;
  /** Multiplies the gradient (not the returned value): a per-source weight. Default 1. */
  scale?: number;
}

/** log softmax(x[0…n) / temp) into out, in float64. */
function logSoftmax64(x: Float64Array, n: number, temp: number, out: Float64Array): void {
  let max = -Infinity;
  for (let j = 0; j < n; j++) max = Math.max(max, x[j]! / temp);
  let sum = 0;
  for (let j = 0; j < n; j++) sum += Math.exp(x[j]! / temp - max);
  const lse = max + Math.log(sum);
  for (let j = 0; j < n; j++) out[j] = x[j]! / temp - lse;
}

/**
 * One source's term over [rows, vocab] student logits: the objective's weighted mean over the
 * rows (see the module comment). `teacher` is the teacher's full logits, its top-k, or null
 * (entropy). Writes the gradient (times `scale`) when `dLogits` is given.
 */
export function damSourceLoss(
  student: Float32Array,
  teacher: Float32Array | TopKLogits | null,
  rows: number,
  vocab: number,
  loss: Required<DamLossOptions>,
  opts: SourceLossOptions = {},
): number {
  const temp = loss.temperature;
  const scale = opts.scale ?? 1;
  const dLogits = opts.dLogits ?? null;
  if (student.length < rows * vocab) throw new AmalgamError('E_SHAPE', `DAM loss needs ${rows}×${vocab} student logits`);
  if (loss.objective !== 'entropy' && !teacher) throw new AmalgamError('E_USAGE', `the ${loss.objective} objective needs teacher logits`);
  const topk = teacher && !(teacher instanceof Float32Array) ? teacher : null;
  if (topk && (topk.rows < rows || topk.indices.length < rows * topk.k)) throw new AmalgamError('E_SHAPE', `top-k teacher logits cover ${topk.rows} rows, ${rows} needed`);
  if (loss.objective === 'kl' && !topk) {
    const r = klDivLoss(student, teacher as Float32Array, rows, vocab, { temperature: temp, weights: opts.weights, dLogits });
    if (dLogits && scale !== 1) for (let i = 0; i < rows * vocab; i++) dLogits[i] = dLogits[i]! * scale;
    return r.loss;
  }
  if (teacher instanceof Float32Array && teacher.length < rows * vocab) throw new AmalgamError('E_SHAPE', `DAM loss needs ${rows}×${vocab} teacher logits`);
  let total = 0;
  for (let r = 0; r < rows; r++) total += opts.weights ? opts.weights[r]! : 1;
  const K = topk ? topk.k : vocab;
  const zs = new Float64Array(K);
  const zt = new Float64Array(K);
  const ls = new Float64Array(K);
  const lt = new Float64Array(K);
  const dz = new Float64Array(K);
  let value = 0;
  for (let r = 0; r < rows; r++) {
    const o = r * vocab;
    const w = opts.weights ? opts.weights[r]! : 1;
    if (w === 0 || total === 0) {
      if (dLogits) dLogits.fill(0, o, o + vocab);
      continue;
    }
    const f = w / total;
    for (let q = 0; q < K; q++) {
      const j = topk ? topk.indices[r * K + q]! : q;
      zs[q] = student[o + j]!;
      if (teacher) zt[q] = topk ? topk.values[r * K + q]! : (teacher as Float32Array)[o + j]!;
    }
    if (dLogits) dLogits.fill(0, o, o + vocab);
    let rowValue = 0;
    if (loss.objective === 'kl') {
      logSoftmax64(zs, K, temp, ls);
      logSoftmax64(zt, K, temp, lt);
      for (let q = 0; q < K; q++) {
        const pt = Math.exp(lt[q]!);
        if (pt > 0) rowValue += pt * (lt[q]! - ls[q]!);
        dz[q] = temp * (Math.exp(ls[q]!) - pt);
      }
      rowValue *= temp * temp;
    } else if (loss.objective === 'mse') {
      const lam = loss.mseWeight;
      for (let q = 0; q < K; q++) {
        const d = zs[q]! - zt[q]!;
        rowValue += d * d;
        dz[q] = (2 * lam * d) / K;
      }
      rowValue *= lam / K;
    } else {
      const lam = loss.entropyWeight;
      logSoftmax64(zs, K, temp, ls);
      let h = 0;
      for (let q = 0; q < K; q++) h -= Math.exp(ls[q]!) * ls[q]!;
      for (let q = 0; q < K; q++) dz[q] = -lam * temp * Math.exp(ls[q]!) * (ls[q]! + h);
      rowValue = lam * temp * temp * h;
    }
    value += f * rowValue;
    if (dLogits) {
      for (let q = 0; q < K; q++) {
        const j = topk ? topk.indices[r * K + q]! : q;
        dLogits[o + j] += scale * f * dz[q]!;
      }
    }
  }
  return value;
}

export interface RegulariserValues {
  cosine: number;
  l1: number;
  l2: number;
  overlap: number;
}

/**
 * The coefficient regularisers over the given groups (one group = one tensor's N coefficient
 * vectors), adding their gradients into the vectors' `grad` when `accumulateGrad`.
 */
export function damRegularisers(groups: readonly (readonly Parameter[])[], loss: Pick<Required<DamLossOptions>, 'cosine' | 'l1' | 'l2' | 'overlap'>, accumulateGrad = true): RegulariserValues {
  const out: RegulariserValues = { cosine: 0, l1: 0, l2: 0, overlap: 0 };
  for (const group of groups) {
    const n = group.length;
    const m = group[0]?.size ?? 0;
    const pairs = (n * (n - 1)) / 2;
    const norms = group.map((p) => {
      let s = 0;
      for (const v of p.data) s += v * v;
      return Math.sqrt(s);
    });
    const grads = accumulateGrad ? group.map(() => new Float64Array(m)) : null;
    if (loss.cosine > 0 && pairs > 0) {
      const lam = loss.cosine / pairs;
      for (let a = 0; a < n; a++) {
        for (let b = a + 1; b < n; b++) {
          const ca = group[a]!.data;
          const cb = group[b]!.data;
          let dot = 0;
          for (let j = 0; j < m; j++) dot += ca[j]! * cb[j]!;
          const na = Math.max(norms[a]!, 1e-8);
          const nb = Math.max(norms[b]!, 1e-8);
          const cos = dot / (na * nb);
          out.cosine += lam * cos;
          if (grads) {
            const ga = grads[a]!;
            const gb = grads[b]!;
            for (let j = 0; j < m; j++) {
              ga[j] += lam * (cb[j]! / (na * nb) - (cos * ca[j]!) / (na * na));
              gb[j] += lam * (ca[j]! / (na * nb) - (cos * cb[j]!) / (nb * nb));
            }
          }
        }
      }
    }
    if (loss.l1 > 0) {
      group.forEach((p, i) => {
        for (let j = 0; j < m; j++) {
          const v = p.data[j]!;
          out.l1 += loss.l1 * Math.abs(v);
          if (grads) grads[i]![j] += loss.l1 * Math.sign(v);
        }
      });
    }
    if (loss.l2 > 0) {
      group.forEach((p, i) => {
        out.l2 += loss.l2 * norms[i]!;
        if (grads && norms[i]! > 0) for (let j = 0; j < m; j++) grads[i]![j] += (loss.l2 * p.data[j]!) / norms[i]!;
      });
    }
    if (loss.overlap > 0 && pairs > 0) {
      const lam = loss.overlap / pairs;
      for (let a = 0; a < n; a++) {
        for (let b = a + 1; b < n; b++) {
          const ca = group[a]!.data;
          const cb = group[b]!.data;
          for (let j = 0; j < m; j++) {
            const x = Math.abs(ca[j]!);
            const y = Math.abs(cb[j]!);
            out.overlap += lam * Math.min(x, y);
            if (grads) {
              if (x < y) grads[a]![j] += lam * Math.sign(ca[j]!);
              else if (y < x) grads[b]![j] += lam * Math.sign(cb[j]!);
              else {
                grads[a]![j] += 0.5 * lam * Math.sign(ca[j]!);
                grads[b]![j] += 0.5 * lam * Math.sign(cb[j]!);
              }
            }
          }
        }
      }
    }
    if (grads) {
      group.forEach((p, i) => {
        if (!p.grad) return;
        const g = grads[i]!;
        for (let j = 0; j < m; j++) p.grad[j] += g[j]!;
      });
    }
  }
  return out;
}

/** The coefficient groups the regularisers act on: each tensor's weight coefficients. */
export function regularisedGroups(dam: DamModel): Parameter[][] {
  return dam.tensors.filter((t) => t.coeffs && t.kind !== 'bias').map((t) => t.coeffs!);
}

/** A batch of one source's data: ids [batch, seqLen], right-padded to `lengths` (default: full). */
export interface DamBatch {
  ids: Int32Array;
  batch: number;
  seqLen: number;
  lengths?: ArrayLike<number>;
}

export interface DamLossStepOptions {
  /** Cached top-k teacher logits per source (null: that teacher runs on the fly). */
  teachers?: readonly (TopKLogits | null)[];
  /** Weight of each source's term (e.g. 1 / its initial KL); default 1. */
  scales?: readonly number[];
  /** Back-propagate into the coefficient gradients (default true). */
  backward?: boolean;
}

export interface DamLossValue {
  /** Σᵢ scaleᵢ · termᵢ + the regularisers. */
  total: number;
  /** Each source's term, unscaled. */
  perSource: number[];
  regularisers: RegulariserValues;
  /** Real positions per source. */
  tokens: number[];
}

/**
 * The whole DAM loss for one batch per source, and (by default) its gradient accumulated into
 * the coefficient gradients: for each source, the teacher's logits (on the fly, or cached
 * top-k), the merged model's forward, the term and its backward; then the regularisers.
 */
export function damLossStep(dam: DamModel, batches: readonly DamBatch[], loss: Required<DamLossOptions>, opts: DamLossStepOptions = {}): DamLossValue {
  const n = dam.numSources;
  if (batches.length !== n) throw new AmalgamError('E_USAGE', `${batches.length} batches given for ${n} sources (one per source)`);
  const V = dam.config.vocabSize;
  const backward = opts.backward ?? true;
  const perSource: number[] = [];
  const tokens: number[] = [];
  let total = 0;
  for (let i = 0; i < n; i++) {
    const b = batches[i]!;
    const rows = b.batch * b.seqLen;
    const weights = realTokenWeights(b.batch, b.seqLen, b.lengths);
    let count = 0;
    for (const w of weights) count += w;
    tokens.push(count);
    const cached = opts.teachers?.[i] ?? null;
    const teacher = loss.objective === 'entropy' ? null : cached ?? dam.teacherForward(i, b.ids, b.batch, b.seqLen);
    const logits = dam.forward(b.ids, b.batch, b.seqLen);
    const scale = opts.scales?.[i] ?? 1;
    const value = damSourceLoss(logits, teacher, rows, V, loss, { weights, dLogits: backward ? logits : null, scale });
    if (backward) dam.backward(logits);
    perSource.push(value);
    total += scale * value;
  }
  const regularisers = damRegularisers(regularisedGroups(dam), loss, backward);
  total += regularisers.cosine + regularisers.l1 + regularisers.l2 + regularisers.overlap;
  return { total, perSource, regularisers, tokens };
}
