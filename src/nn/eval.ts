/**
 * Evaluation: mean negative log-likelihood (and perplexity) of token sequences, teacher-forced;
 * accuracy of a classification head.
 */
import { AmalgamError } from '../errors.js';
import type { SequenceClassificationHead } from './heads.js';
import { causalLmLoss, classificationLoss } from './losses.js';
import type { LlamaModel } from './model.js';

export interface NllOptions {
  /** Sequences per forward (default 8); sequences are grouped by length to limit padding. */
  batchSize?: number;
  /** Keep only the first maxLength tokens of each sequence. */
  maxLength?: number;
  /** Called after each batch with the tokens scored so far. */
  onProgress?: (doneSequences: number, totalSequences: number) => void;
}

export interface NllResult {
  /** Mean NLL per predicted token, in nats. */
  meanNll: number;
  perplexity: number;
  /** Predicted tokens (every token after the first of each sequence). */
  tokens: number;
  totalNll: number;
  sequences: number;
}

/** Teacher-forced NLL of every token after the first of each sequence, in natural log. */
export function evaluateNll(model: LlamaModel, sequences: readonly ArrayLike<number>[], opts: NllOptions = {}): NllResult {
  const batchSize = opts.batchSize ?? 8;
  if (!Number.isSafeInteger(batchSize) || batchSize < 1) throw new AmalgamError('E_USAGE', `batch size must be a positive integer, got ${batchSize}`);
  const maxLength = opts.maxLength ?? Infinity;
  const seqs = sequences.map((s) => Array.from(s).slice(0, maxLength)).filter((s) => s.length >= 2);
  const order = seqs.map((_, i) => i).sort((a, b) => seqs[a]!.length - seqs[b]!.length || a - b);
  const V = model.config.vocabSize;
  let totalNll = 0;
  let tokens = 0;
  for (let start = 0; start < order.length; start += batchSize) {
    const batch = order.slice(start, start + batchSize).map((i) => seqs[i]!);
    const B = batch.length;
    const T = Math.max(...batch.map((s) => s.length));
    const ids = new Int32Array(B * T);
    const lengths = new Int32Array(B);
    batch.forEach((s, b) => {
      ids.set(s, b * T);
      lengths[b] = s.length;
    });
    const logits = model.forward(ids, B, T);
    const r = causalLmLoss(model.backend, logits, ids, B, T, V, { lengths, reduction: 'sum' });
    totalNll += r.loss;
    tokens += r.count;
    opts.onProgress?.(Math.min(start + batchSize, order.length), order.length);
  }
  const meanNll = tokens ? totalNll / tokens : NaN;
  return { meanNll, perplexity: Math.exp(meanNll), tokens, totalNll, sequences: seqs.length };
}

export interface ClassificationExample {
  ids: ArrayLike<number>;
  label: number;
}

export interface AccuracyResult {
  accuracy: number;
  correct: number;
  total: number;
  /** Mean cross-entropy of the head's logits. */
  meanLoss: number;
  /** Predicted label of each example, in input order. */
  predictions: number[];
}

/** Accuracy of model + head over labelled sequences (batched, right-padded). */
export function evaluateAccuracy(
  model: LlamaModel,
  head: SequenceClassificationHead,
  examples: readonly ClassificationExample[],
  opts: { batchSize?: number; maxLength?: number } = {},
): AccuracyResult {
  const batchSize = opts.batchSize ?? 8;
  const maxLength = opts.maxLength ?? Infinity;
  const predictions: number[] = new Array(examples.length).fill(-1);
  let correct = 0;
  let lossSum = 0;
  for (let start = 0; start < examples.length; start += batchSize) {
    const batch = examples.slice(start, start + batchSize).map((e) => ({ ids: Array.from(e.ids).slice(0, maxLength), label: e.label }));
    const B = batch.length;
    const T = Math.max(1, ...batch.map((e) => e.ids.length));
    const ids = new Int32Array(B * T);
    const lengths = new Int32Array(B);
    batch.forEach((e, b) => {
      if (e.ids.length === 0) throw new AmalgamError('E_USAGE', `example ${start + b} has no tokens`);
      ids.set(e.ids, b * T);
      lengths[b] = e.ids.length;
    });
    const hidden = model.forward(ids, B, T, { output: 'hidden' });
    const logits = head.forward(model.backend, hidden, B, T, lengths);
    const L = head.numLabels;
    for (let b = 0; b < B; b++) {
      let best = 0;
      for (let j = 1; j < L; j++) if (logits[b * L + j]! > logits[b * L + best]!) best = j;
      predictions[start + b] = best;
      if (best === batch[b]!.label) correct++;
    }
    lossSum += classificationLoss(model.backend, logits, batch.map((e) => e.label), B, L, { reduction: 'sum' }).loss;
  }
  const total = examples.length;
  return { accuracy: total ? correct / total : NaN, correct, total, meanLoss: total ? lossSum / total : NaN, predictions };
}
