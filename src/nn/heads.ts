/**
 * Sequence classification (HF `LlamaForSequenceClassification`): the final hidden state of each
 * sequence's last real token goes through `score.weight` [numLabels, hidden] (no bias).
 */
import type { Backend } from '../backend/backend.js';
import { AmalgamError } from '../errors.js';
import { openModelFolder } from '../io/hf.js';
import type { TensorSource } from '../io/source.js';
import { Rng } from '../tensor/rng.js';
import { parseLlamaConfig } from './config.js';
import { Linear, type LinearCache } from './layers/linear.js';
import { Parameter } from './params.js';

export const SCORE_WEIGHT = 'score.weight';

interface HeadCache {
  rows: number;
  /** Hidden state of each sequence's last real token [B, hidden]. */
  pooled: Float32Array;
  /** [B, numLabels]. */
  logits: Float32Array;
  /** Gradient of the pooled states [B, hidden]. */
  dPooled: Float32Array;
  /** Gradient of all hidden states [B·T, hidden], zero except at the pooled rows. */
  dHidden: Float32Array;
  /** Row of hidden that each sequence pooled. */
  index: Int32Array;
  linear: LinearCache;
  B: number;
  T: number;
}

export class SequenceClassificationHead {
  readonly score: Linear;
  private cache: HeadCache | null = null;

  constructor(
    readonly hiddenSize: number,
    readonly numLabels: number,
    weight?: Parameter,
  ) {
    const w = weight ?? new Parameter(SCORE_WEIGHT, [numLabels, hiddenSize], new Float32Array(numLabels * hiddenSize));
    if (w.shape[0] !== numLabels || w.shape[1] !== hiddenSize) {
      throw new AmalgamError('E_SHAPE', `score weight is [${w.shape.join(', ')}], expected [${numLabels}, ${hiddenSize}]`, { key: w.name });
    }
    this.score = new Linear('score', w);
    this.score.weight.setRequiresGrad(true);
  }

  /** A new head with score.weight ~ N(0, std²) (transformers' initializer_range, default 0.02). */
  static random(hiddenSize: number, numLabels: number, seed: number, std = 0.02): SequenceClassificationHead {
    const head = new SequenceClassificationHead(hiddenSize, numLabels);
    new Rng(seed).fillNormal(head.score.weight.data, std);
    return head;
  }

  /** Reads `score.weight` from a TensorSource. */
  static async fromSource(source: TensorSource, hiddenSize: number, numLabels: number): Promise<SequenceClassificationHead> {
    const info = source.info(SCORE_WEIGHT);
    if (info.shape.length !== 2 || info.shape[0] !== numLabels || info.shape[1] !== hiddenSize) {
      throw new AmalgamError('E_SHAPE', `stored shape [${info.shape.join(', ')}] differs from [${numLabels}, ${hiddenSize}]`, { file: source.path, key: SCORE_WEIGHT });
    }
    const w = new Parameter(SCORE_WEIGHT, [numLabels, hiddenSize], await source.readF32(SCORE_WEIGHT));
    return new SequenceClassificationHead(hiddenSize, numLabels, w);
  }

  /** Reads the head of a `LlamaForSequenceClassification` folder (num_labels from config.json). */
  static async fromFolder(dir: string): Promise<SequenceClassificationHead> {
    const folder = await openModelFolder(dir, { allowUnmatched: true });
    try {
      const c = parseLlamaConfig(folder.config, folder.configPath);
      const info = folder.source.info(SCORE_WEIGHT);
      return await SequenceClassificationHead.fromSource(folder.source, c.hiddenSize, c.numLabels ?? info.shape[0]!);
    } finally {
      await folder.close();
    }
  }

  parameters(): Parameter[] {
    return this.score.parameters();
  }

  /**
   * hidden [B·T, hiddenSize] (the model's final hidden states) → logits [B, numLabels], pooling
   * row b·T + lengths[b] − 1 (the last real token; all rows T long without lengths).
   */
  forward(be: Backend, hidden: Float32Array, B: number, T: number, lengths?: ArrayLike<number>): Float32Array {
    const d = this.hiddenSize;
    const c = this.ensureCache(B, T);
    c.B = B;
    c.T = T;
    for (let b = 0; b < B; b++) {
      const len = lengths ? lengths[b]! : T;
      if (!Number.isSafeInteger(len) || len < 1 || len > T) throw new AmalgamError('E_SHAPE', `lengths[${b}] = ${len} is not in 1…${T}`);
      const row = b * T + len - 1;
      c.index[b] = row;
      c.pooled.set(hidden.subarray(row * d, (row + 1) * d), b * d);
    }
    this.score.forward(be, c.pooled, c.logits, B, c.linear);
    return c.logits.subarray(0, B * this.numLabels);
  }

  /** From dLogits [B, numLabels]: accumulates score.weight.grad, returns dHidden [B·T, hiddenSize]. */
  backward(be: Backend, dLogits: Float32Array): Float32Array {
    const c = this.cache;
    if (!c || c.B === 0) throw new AmalgamError('E_USAGE', 'backward needs a forward first');
    const d = this.hiddenSize;
    const { B, T } = c;
    this.score.backward(be, dLogits, c.dPooled, B, c.linear);
    const dHidden = c.dHidden.subarray(0, B * T * d);
    dHidden.fill(0);
    for (let b = 0; b < B; b++) dHidden.set(c.dPooled.subarray(b * d, (b + 1) * d), c.index[b]! * d);
    return dHidden;
  }

  private ensureCache(B: number, T: number): HeadCache {
    const c = this.cache;
    if (c && B <= c.rows && B * T * this.hiddenSize <= c.dHidden.length) return c;
    const d = this.hiddenSize;
    const rows = Math.max(B, c?.rows ?? 0);
    this.cache = {
      rows,
      pooled: new Float32Array(rows * d),
      logits: new Float32Array(rows * this.numLabels),
      dPooled: new Float32Array(rows * d),
      dHidden: new Float32Array(Math.max(B * T * d, c?.dHidden.length ?? 0)),
      index: new Int32Array(rows),
      linear: this.score.createCache(),
      B: 0,
      T: 0,
    };
    return this.cache;
  }
}
