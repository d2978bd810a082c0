/**
 * Batching: token sequences padded into [batch, seqLen] arrays with masks, or packed into fixed
 * windows; classification batches with labels; deterministic seeded shuffling and an endless
 * epoch sampler.
 *
 * Language-model batches hold inputs and next-token targets at the same positions: position t of
 * row b predicts targets[b·T + t] from ids[b·T … b·T + t]. Targets of −100 are not scored.
 */
import { AmalgamError } from '../errors.js';
import { Rng } from '../tensor/rng.js';
import type { TextTokenizer } from './tokenizer.js';
import type { TextExample } from './datasets.js';

/** Target value of positions that are not scored. */
export const IGNORE_INDEX = -100;

export interface LmBatch {
  batch: number;
  seqLen: number;
  /** Input ids [batch·seqLen]; padding holds the pad id. */
  ids: Int32Array;
  /** Next-token targets [batch·seqLen]; IGNORE_INDEX where nothing is predicted. */
  targets: Int32Array;
  /** 1 at real tokens, 0 at padding [batch·seqLen]. */
  mask: Float32Array;
  /** Real tokens per row. */
  lengths: Int32Array;
  /** Number of scored targets. */
  tokens: number;
}

export interface ClassBatch {
  batch: number;
  seqLen: number;
  ids: Int32Array;
  mask: Float32Array;
  /** Real tokens per row (the classifier reads the hidden state at lengths[b] − 1). */
  lengths: Int32Array;
  /** Class index per row. */
  labels: Int32Array;
}

export interface EncodedExample {
  ids: Int32Array;
  label?: number;
}

export interface EncodeExamplesOptions {
  /** Prepend BOS (default true). */
  bos?: boolean;
  /** Longest sequence kept, BOS included (default: no limit). */
  maxLength?: number;
  /**
   * Which side is cut when too long: 'right' (default) keeps the first tokens; 'left' keeps BOS
   * and the last maxLength − 1 tokens.
   */
  truncationSide?: 'left' | 'right';
}

/** Tokenise examples (BOS + text by default), truncated to maxLength. */
export function encodeExamples(tok: TextTokenizer, examples: readonly TextExample[], opts: EncodeExamplesOptions = {}): EncodedExample[] {
  const bos = opts.bos ?? true;
  const max = opts.maxLength;
  if (max !== undefined && (!Number.isSafeInteger(max) || max < 2)) {
    throw new AmalgamError('E_USAGE', `maxLength must be an integer ≥ 2, got ${max}`);
  }
  return examples.map((e) => {
    let ids = tok.encode(e.text, { bos });
    if (max !== undefined && ids.length > max) {
      if ((opts.truncationSide ?? 'right') === 'right') ids = ids.slice(0, max);
      else {
        const keepBos = bos && tok.bosId !== undefined ? 1 : 0;
        ids = [...ids.slice(0, keepBos), ...ids.slice(ids.length - (max - keepBos))];
      }
    }
    const out: EncodedExample = { ids: Int32Array.from(ids) };
    if (e.label !== undefined) out.label = e.label;
    return out;
  });
}

function checkPadTo(padTo: number | undefined, longest: number): number {
  if (padTo === undefined) return longest;
  if (!Number.isSafeInteger(padTo) || padTo < longest) {
    throw new AmalgamError('E_USAGE', `padTo ${padTo} is shorter than the longest sequence (${longest})`);
  }
  return padTo;
}

/** Pad token sequences into an LM batch: each row predicts its own next tokens. */
export function padLmBatch(seqs: readonly ArrayLike<number>[], padId: number, padTo?: number): LmBatch {
  const B = seqs.length;
  const T = checkPadTo(padTo, Math.max(1, ...seqs.map((s) => s.length)));
  const ids = new Int32Array(B * T).fill(padId);
  const targets = new Int32Array(B * T).fill(IGNORE_INDEX);
  const mask = new Float32Array(B * T);
  const lengths = new Int32Array(B);
  let tokens = 0;
  for (let b = 0; b < B; b++) {
    const s = seqs[b]!;
    const n = s.length;
    lengths[b] = n;
    const o = b * T;
    for (let t = 0; t < n; t++) {
      ids[o + t] = s[t]!;
      mask[o + t] = 1;
      if (t + 1 < n) targets[o + t] = s[t + 1]!;
    }
    tokens += Math.max(0, n - 1);
  }
  return { batch: B, seqLen: T, ids, targets, mask, lengths, tokens };
}

/** Pad labelled sequences into a classification batch. */
export function padClassBatch(examples: readonly EncodedExample[], padId: number, padTo?: number): ClassBatch {
  const B = examples.length;
  const T = checkPadTo(padTo, Math.max(1, ...examples.map((e) => e.ids.length)));
  const ids = new Int32Array(B * T).fill(padId);
  const mask = new Float32Array(B * T);
  const lengths = new Int32Array(B);
  const labels = new Int32Array(B);
  for (let b = 0; b < B; b++) {
    const e = examples[b]!;
    if (e.label === undefined) throw new AmalgamError('E_USAGE', `example ${b} of the batch has no label`);
    if (e.ids.length === 0) throw new AmalgamError('E_USAGE', `example ${b} of the batch has no tokens`);
    ids.set(e.ids, b * T);
    mask.fill(1, b * T, b * T + e.ids.length);
    lengths[b] = e.ids.length;
    labels[b] = e.label;
  }
  return { batch: B, seqLen: T, ids, mask, lengths, labels };
}

/**
 * Pack sequences end to end into consecutive windows of windowLen + 1 tokens (windowLen inputs
 * plus the shifted targets); the incomplete tail is dropped. Windows do not overlap.
 */
export function packWindows(seqs: readonly ArrayLike<number>[], windowLen: number): Int32Array[] {
  if (!Number.isSafeInteger(windowLen) || windowLen < 1) throw new AmalgamError('E_USAGE', `window length must be a positive integer, got ${windowLen}`);
  let total = 0;
  for (const s of seqs) total += s.length;
  const stream = new Int32Array(total);
  let o = 0;
  for (const s of seqs) {
    stream.set(s, o);
    o += s.length;
  }
  const w = windowLen + 1;
  const out: Int32Array[] = [];
  for (let start = 0; start + w <= total; start += w) out.push(stream.subarray(start, start + w));
  return out;
}

/** An LM batch from packed windows (every position scored). */
export function windowBatch(windows: readonly Int32Array[]): LmBatch {
  const B = windows.length;
  if (B === 0) throw new AmalgamError('E_USAGE', 'a batch needs at least one window');
  const T = windows[0]!.length - 1;
  const ids = new Int32Array(B * T);
  const targets = new Int32Array(B * T);
  const mask = new Float32Array(B * T).fill(1);
  const lengths = new Int32Array(B).fill(T);
  for (let b = 0; b < B; b++) {
    const w = windows[b]!;
    if (w.length !== T + 1) throw new AmalgamError('E_USAGE', `window ${b} has ${w.length} tokens, expected ${T + 1}`);
    ids.set(w.subarray(0, T), b * T);
    targets.set(w.subarray(1, T + 1), b * T);
  }
  return { batch: B, seqLen: T, ids, targets, mask, lengths, tokens: B * T };
}

/** Fisher–Yates shuffle driven by a seeded Rng. */
export function shuffleInPlace<T>(items: T[], rng: Rng): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    const t = items[i]!;
    items[i] = items[j]!;
    items[j] = t;
  }
  return items;
}

/** A seeded random permutation of 0 … n − 1. */
export function permutation(n: number, seed: number | Rng): number[] {
  const rng = typeof seed === 'number' ? new Rng(seed) : seed;
  return shuffleInPlace(
    Array.from({ length: n }, (_, i) => i),
    rng,
  );
}

export interface SamplerOptions {
  /** Reshuffle every epoch (default true); false walks the items in order. */
  shuffle?: boolean;
  seed?: number;
}

/**
 * Endless batches of indices into n items: each epoch is a fresh seeded permutation, and a batch
 * that runs past the end of an epoch continues into the next, so every batch is full.
 */
export class BatchSampler {
  private order: number[] = [];
  private pos = 0;
  private readonly rng: Rng;
  /** Completed passes over the data. */
  epoch = 0;

  constructor(
    readonly size: number,
    readonly batchSize: number,
    private readonly opts: SamplerOptions = {},
  ) {
    if (!Number.isSafeInteger(size) || size < 1) throw new AmalgamError('E_USAGE', `cannot sample from ${size} items`);
    if (!Number.isSafeInteger(batchSize) || batchSize < 1) throw new AmalgamError('E_USAGE', `batch size must be a positive integer, got ${batchSize}`);
    this.rng = new Rng(opts.seed ?? 0);
    this.refill();
    this.epoch = 0;
  }

  private refill(): void {
    this.order = Array.from({ length: this.size }, (_, i) => i);
    if (this.opts.shuffle ?? true) shuffleInPlace(this.order, this.rng);
    this.pos = 0;
  }

  next(): number[] {
    const out: number[] = [];
    while (out.length < this.batchSize) {
      if (this.pos >= this.size) {
        this.epoch++;
        this.refill();
      }
      out.push(this.order[this.pos++]!);
    }
    return out;
  }
}

/** Consecutive slices of 0 … n − 1 of at most `size` (evaluation in file order). */
export function* chunks(n: number, size: number): Generator<number[]> {
  for (let i = 0; i < n; i += size) yield Array.from({ length: Math.min(size, n - i) }, (_, k) => i + k);
}
