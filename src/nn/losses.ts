/**
 * Losses over logits, each returning the loss and (when asked) writing d(loss)/d(logits):
 * causal-LM cross-entropy with padding and a loss mask, KL divergence to teacher logits at a
 * temperature, and classification cross-entropy.
 *
 * `dLogits` may be the logits array itself (the gradient overwrites it), a separate buffer, or
 * null for the loss alone.
 */
import type { Backend } from '../backend/backend.js';
import { AmalgamError } from '../errors.js';

export interface LossResult {
  /** Mean over the counted rows (or their sum with reduction 'sum'). */
  loss: number;
  /** Rows (tokens, sequences) that counted. */
  count: number;
}

export interface CausalLmLossOptions {
  /** Real tokens per sequence (right padding); default T for every row. */
  lengths?: ArrayLike<number>;
  /**
   * [B, T], aligned with ids: a nonzero entry makes that token a prediction target (HF `labels`
   * without −100). The first token of a sequence is never a target. Default: every real token.
   */
  lossMask?: ArrayLike<number>;
  /** 'mean' over targets (default) or 'sum'. */
  reduction?: 'mean' | 'sum';
  dLogits?: Float32Array | null;
}

/**
 * Next-token targets for ids [B, T]: row b·T + t predicts ids[b, t+1] when that token is real
 * and in the loss mask, else −1 (ignored).
 */
export function causalTargets(ids: ArrayLike<number>, B: number, T: number, lengths?: ArrayLike<number>, lossMask?: ArrayLike<number>): Int32Array {
  const targets = new Int32Array(B * T).fill(-1);
  for (let b = 0; b < B; b++) {
    const len = lengths ? lengths[b]! : T;
    if (!Number.isSafeInteger(len) || len < 0 || len > T) throw new AmalgamError('E_SHAPE', `lengths[${b}] = ${len} is not in 0…${T}`);
    for (let t = 0; t + 1 < len; t++) {
      const i = b * T + t + 1;
      if (!lossMask || lossMask[i]) targets[b * T + t] = ids[i]!;
    }
  }
  return targets;
}

/** Mean (or summed) next-token cross-entropy of logits [B·T, vocab] over the targets of ids [B, T]. */
export function causalLmLoss(
  be: Backend,
  logits: Float32Array,
  ids: ArrayLike<number>,
  B: number,
  T: number,
  vocab: number,
  opts: CausalLmLossOptions = {},
): LossResult {
  const targets = causalTargets(ids, B, T, opts.lengths, opts.lossMask);
  let count = 0;
  for (let i = 0; i < targets.length; i++) if (targets[i]! >= 0) count++;
  const loss = be.crossEntropy(logits, targets, opts.dLogits ?? null, B * T, vocab, { reduction: opts.reduction ?? 'mean' });
  return { loss, count };
}

/** Row weights [B·T] that are 1 for real tokens (t < lengths[b]) and 0 for padding. */
export function realTokenWeights(B: number, T: number, lengths?: ArrayLike<number>): Float32Array {
  const w = new Float32Array(B * T);
  for (let b = 0; b < B; b++) {
    const len = lengths ? lengths[b]! : T;
    w.fill(1, b * T, b * T + Math.max(0, Math.min(T, len)));
  }
  return w;
}

export interface KlLossOptions {
  /** Softening temperature T > 0 (default 1). */
  temperature?: number;
  /** Per-row weights (e.g. realTokenWeights); default all 1. */
  weights?: ArrayLike<number>;
  dLogits?: Float32Array | null;
}

/**
 * Distillation loss T² · KL(p_teacher ‖ p_student) with p = softmax(logits / T), averaged over
 * the weighted rows:  L = T² Σ_r w_r Σ_v p_t (log p_t − log p_s) / Σ_r w_r.
 * Its gradient is dL/dz_s = T · w_r (p_s − p_t) / Σ w.
 */
export function klDivLoss(
  logits: Float32Array,
  teacherLogits: Float32Array,
  rows: number,
  vocab: number,
  opts: KlLossOptions = {},
): LossResult {
  const temp = opts.temperature ?? 1;
  if (!(temp > 0) || !Number.isFinite(temp)) throw new AmalgamError('E_USAGE', `temperature must be positive, got ${temp}`);
  if (logits.length < rows * vocab || teacherLogits.length < rows * vocab) {
    throw new AmalgamError('E_SHAPE', `KL loss needs ${rows}×${vocab} student and teacher logits`);
  }
  const dLogits = opts.dLogits ?? null;
  let total = 0;
  let count = 0;
  for (let r = 0; r < rows; r++) {
    const w = opts.weights ? opts.weights[r]! : 1;
    total += w;
    if (w !== 0) count++;
  }
  const ls = new Float64Array(vocab);
  const lt = new Float64Array(vocab);
  let loss = 0;
  for (let r = 0; r < rows; r++) {
    const o = r * vocab;
    const w = opts.weights ? opts.weights[r]! : 1;
    if (w === 0 || total === 0) {
      if (dLogits) dLogits.fill(0, o, o + vocab);
      continue;
    }
    logSoftmax(logits, o, vocab, temp, ls);
    logSoftmax(teacherLogits, o, vocab, temp, lt);
    let kl = 0;
    for (let j = 0; j < vocab; j++) {
      const pt = Math.exp(lt[j]!);
      if (pt > 0) kl += pt * (lt[j]! - ls[j]!);
    }
    loss += (w * kl) / total;
    if (dLogits) {
      const f = (temp * w) / total;
      for (let j = 0; j < vocab; j++) dLogits[o + j] = f * (Math.exp(ls[j]!) - Math.exp(lt[j]!));
    }
  }
  return { loss: temp * temp * loss, count };
}

/** out[j] = log softmax(x[o … o+n) / temp)[j], in float64. */
function logSoftmax(x: Float32Array, o: number, n: number, temp: number, out: Float64Array): void {
  let max = -Infinity;
  for (let j = 0; j < n; j++) max = Math.max(max, x[o + j]! / temp);
  let sum = 0;
  for (let j = 0; j < n; j++) sum += Math.exp(x[o + j]! / temp - max);
  const lse = max + Math.log(sum);
  for (let j = 0; j < n; j++) out[j] = x[o + j]! / temp - lse;
}

/** Mean cross-entropy of logits [B, numLabels] against labels (a negative label is ignored). */
export function classificationLoss(
  be: Backend,
  logits: Float32Array,
  labels: ArrayLike<number>,
  B: number,
  numLabels: number,
  opts: { dLogits?: Float32Array | null; reduction?: 'mean' | 'sum' } = {},
): LossResult {
  const targets = Int32Array.from({ length: B }, (_, i) => labels[i]!);
  let count = 0;
  for (const t of targets) {
    if (t >= numLabels) throw new AmalgamError('E_SHAPE', `label ${t} is not below the ${numLabels} labels`);
    if (t >= 0) count++;
  }
  const loss = be.crossEntropy(logits, targets, opts.dLogits ?? null, B, numLabels, { reduction: opts.reduction ?? 'mean' });
  return { loss, count };
}
