/**
 * Scoring a model on token sequences: teacher-forced NLL of every token after the first,
 * next-token top-1 accuracy, and optionally KL(p_teacher ‖ p_model) at the same positions, in
 * one forward per batch. Also the count of tokens run through forward, the unit of compute of the
 * learned-merge benchmark (forward-equivalent tokens; a backward counts as two forwards).
 */
import { AmalgamError } from '../errors.js';
import { causalLmLoss, causalTargets, klDivLoss } from '../nn/losses.js';
import type { LlamaModel } from '../nn/model.js';

export interface SequenceScore {
  /** Mean NLL per predicted token (nats). */
  nll: number;
  /** Fraction of predicted tokens that are the model's argmax. */
  accuracy: number;
  /** Mean KL(teacher ‖ model) per predicted token (with a teacher). */
  kl?: number;
  /** Predicted tokens. */
  tokens: number;
  /** Tokens run through the model's forward (the teacher's are counted in teacherForwardTokens). */
  forwardTokens: number;
  teacherForwardTokens: number;
}

export interface ScoreOptions {
  /** Sequences per forward (default 16). */
  batchSize?: number;
  /** Also compute KL(p_teacher ‖ p_model) at the scored positions. */
  teacher?: LlamaModel;
}

/** Scores a model on sequences (grouped by length, right-padded). */
export function scoreSequences(model: LlamaModel, sequences: readonly ArrayLike<number>[], opts: ScoreOptions = {}): SequenceScore {
  const batchSize = opts.batchSize ?? 16;
  if (!Number.isSafeInteger(batchSize) || batchSize < 1) throw new AmalgamError('E_USAGE', `batch size must be a positive integer, got ${batchSize}`);
  const seqs = sequences.filter((s) => s.length >= 2);
  const order = seqs.map((_, i) => i).sort((a, b) => seqs[a]!.length - seqs[b]!.length || a - b);
  const V = model.config.vocabSize;
  let nll = 0;
  let correct = 0;
  let klSum = 0;
  let tokens = 0;
  let forwardTokens = 0;
  let teacherForwardTokens = 0;
  for (let start = 0; start < order.length; start += batchSize) {
    const batch = order.slice(start, start + batchSize).map((i) => seqs[i]!);
    const B = batch.length;
    const T = Math.max(...batch.map((s) => s.length));
    const ids = new Int32Array(B * T);
    const lengths = new Int32Array(B);
    batch.forEach((s, b) => {
      ids.set(Array.from(s), b * T);
      lengths[b] = s.length;
    });
    const targets = causalTargets(ids, B, T, lengths);
    let teacherLogits: Float32Array | null = null;
    if (opts.teacher) {
      teacherLogits = Float32Array.from(opts.teacher.forward(ids, B, T));
      teacherForwardTokens += B * T;
    }
    const logits = model.forward(ids, B, T);
    forwardTokens += B * T;
    let count = 0;
    for (let r = 0; r < B * T; r++) {
      const y = targets[r]!;
      if (y < 0) continue;
      count++;
      const o = r * V;
      let best = 0;
      let bv = logits[o]!;
      for (let j = 1; j < V; j++) {
        const v = logits[o + j]!;
        if (v > bv) {
          bv = v;
          best = j;
        }
      }
      if (best === y) correct++;
    }
    if (teacherLogits) {
      const weights = new Float32Array(B * T);
      for (let r = 0; r < B * T; r++) weights[r] = targets[r]! >= 0 ? 1 : 0;
      klSum += klDivLoss(logits, teacherLogits, B * T, V, { temperature: 1, weights }).loss * count;
    }
    nll += causalLmLoss(model.backend, logits, ids, B, T, V, { lengths, reduction: 'sum' }).loss;
    tokens += count;
  }
  const out: SequenceScore = { nll: tokens ? nll / tokens : NaN, accuracy: tokens ? correct / tokens : NaN, tokens, forwardTokens, teacherForwardTokens };
  if (opts.teacher) out.kl = tokens ? klSum / tokens : NaN;
  return out;
}

/** One evaluation set (a domain). */
export interface EvalSet {
  name: string;
  sequences: readonly ArrayLike<number>[];
}

export interface DomainScores {
  perDomain: ({ name: string } & SequenceScore)[];
  /** Unweighted mean over domains of the per-domain mean NLL. */
  meanNll: number;
  /** Unweighted mean over domains of the per-domain accuracy. */
  meanAccuracy: number;
  forwardTokens: number;
}

/** Scores every domain; `teachers[i]` (optional) is the teacher of domain i for the KL. */
export function scoreDomains(model: LlamaModel, sets: readonly EvalSet[], opts: { batchSize?: number; teachers?: readonly (LlamaModel | null)[] } = {}): DomainScores {
  if (sets.length === 0) throw new AmalgamError('E_USAGE', 'no evaluation data');
  const perDomain = sets.map((s, i) => {
    const teacher = opts.teachers?.[i] ?? undefined;
    return { name: s.name, ...scoreSequences(model, s.sequences, { batchSize: opts.batchSize, teacher }) };
  });
  const mean = (f: (d: SequenceScore) => number) => perDomain.reduce((a, d) => a + f(d), 0) / perDomain.length;
  return {
    perDomain,
    meanNll: mean((d) => d.nll),
    meanAccuracy: mean((d) => d.accuracy),
    forwardTokens: perDomain.reduce((a, d) => a + d.forwardTokens + d.teacherForwardTokens, 0),
  };
}
