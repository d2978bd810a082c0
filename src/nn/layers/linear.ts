/**
 * The linear layer y = x·Wᵀ + b, with W stored [out, in] as Hugging Face stores it.
 *
 * `LinearLayer` is the unit the attention and MLP blocks call; anything that maps [rows, in] to
 * [rows, out] can stand in for the dense layer (LoRA in ../lora.ts wraps one; a multi-source
 * layer would sum several). A model swaps implementations through `LlamaModel.linearSlots()`.
 */
import type { Backend } from '../../backend/backend.js';
import { AmalgamError } from '../../errors.js';
import type { Parameter } from '../params.js';

/** What a linear layer keeps between its forward and its backward. */
export interface LinearCache {
  /** The input of the last forward: the caller's buffer, kept by reference, not copied. */
  x: Float32Array;
  /** Activations the layer saves for its backward (none for a dense layer), sized at creation. */
  saved: Float32Array[];
}

export interface LinearLayer {
  /** Module path, e.g. `model.layers.0.self_attn.q_proj`. */
  readonly name: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** Floats per row the layer's cache holds (beyond the input it references). */
  readonly savedPerRow: number;
  createCache(maxRows: number): LinearCache;
  /** y[rows, out] = layer(x[rows, in]); records x (and what it saves) in the cache. */
  forward(be: Backend, x: Float32Array, y: Float32Array, rows: number, cache: LinearCache): void;
  /**
   * From dy[rows, out]: accumulates the gradients of the trainable parameters, and writes dx
   * (or adds to it when `accumulateDx`) unless dx is null.
   */
  backward(be: Backend, dy: Float32Array, dx: Float32Array | null, rows: number, cache: LinearCache, accumulateDx?: boolean): void;
  /** Every parameter the layer owns, trainable or not. */
  parameters(): Parameter[];
}

/** y[rows, out] = x[rows, in] · Wᵀ (+ b). */
export function linearForward(
  be: Backend,
  x: Float32Array,
  weight: Float32Array,
  bias: Float32Array | null,
  y: Float32Array,
  rows: number,
  inF: number,
  outF: number,
): void {
  be.matmul(x, weight, y, rows, inF, outF, { transB: true });
  if (bias) {
    for (let r = 0; r < rows; r++) {
      const o = r * outF;
      for (let j = 0; j < outF; j++) y[o + j] += bias[j]!;
    }
  }
}

/** dx = dy·W (or += with accumulateDx), dW += dyᵀ·x, db += Σ_rows dy, each where not null. */
export function linearBackward(
  be: Backend,
  x: Float32Array,
  weight: Float32Array,
  dy: Float32Array,
  dx: Float32Array | null,
  dWeight: Float32Array | null,
  dBias: Float32Array | null,
  rows: number,
  inF: number,
  outF: number,
  accumulateDx = false,
): void {
  if (dx) be.matmul(dy, weight, dx, rows, outF, inF, { accumulate: accumulateDx });
  if (dWeight) be.matmul(dy, x, dWeight, outF, rows, inF, { transA: true, accumulate: true });
  if (dBias) {
    for (let r = 0; r < rows; r++) {
      const o = r * outF;
      for (let j = 0; j < outF; j++) dBias[j] += dy[o + j]!;
    }
  }
}

/** The dense layer over a weight (and optional bias) parameter. */
export class Linear implements LinearLayer {
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly savedPerRow = 0;

  constructor(
    readonly name: string,
    readonly weight: Parameter,
    readonly bias: Parameter | null = null,
  ) {
    if (weight.shape.length !== 2) throw new AmalgamError('E_SHAPE', `a linear weight must be 2-D, got [${weight.shape.join(', ')}]`, { key: weight.name });
    this.outFeatures = weight.shape[0]!;
    this.inFeatures = weight.shape[1]!;
    if (bias && (bias.shape.length !== 1 || bias.shape[0] !== this.outFeatures)) {
      throw new AmalgamError('E_SHAPE', `bias shape [${bias.shape.join(', ')}] does not match ${this.outFeatures} outputs`, { key: bias.name });
    }
  }

  createCache(): LinearCache {
    return { x: new Float32Array(0), saved: [] };
  }

  forward(be: Backend, x: Float32Array, y: Float32Array, rows: number, cache: LinearCache): void {
    cache.x = x;
    linearForward(be, x, this.weight.data, this.bias?.data ?? null, y, rows, this.inFeatures, this.outFeatures);
  }

  backward(be: Backend, dy: Float32Array, dx: Float32Array | null, rows: number, cache: LinearCache, accumulateDx = false): void {
    linearBackward(be, cache.x, this.weight.data, dy, dx, this.weight.grad, this.bias?.grad ?? null, rows, this.inFeatures, this.outFeatures, accumulateDx);
  }

  parameters(): Parameter[] {
    return this.bias ? [this.weight, this.bias] : [this.weight];
  }
}
