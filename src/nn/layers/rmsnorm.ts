/** RMSNorm: out = weight ⊙ x / √(mean(x²) + eps), per row of length dim. */
import type { Backend } from '../../backend/backend.js';
import type { Parameter } from '../params.js';

export interface RmsNormCache {
  /** The input of the last forward (the caller's buffer, by reference). */
  x: Float32Array;
  /** 1/√(mean(x²) + eps) of each row [rows]. */
  invRms: Float32Array;
}

/** `alloc` provides the buffers (e.g. a backend's `allocate`); default plain arrays. */
export function createRmsNormCache(maxRows: number, alloc: (n: number) => Float32Array = (n) => new Float32Array(n)): RmsNormCache {
  return { x: new Float32Array(0), invRms: alloc(maxRows) };
}

export function rmsnormForward(
  be: Backend,
  weight: Parameter,
  x: Float32Array,
  out: Float32Array,
  rows: number,
  dim: number,
  eps: number,
  cache: RmsNormCache,
): void {
  cache.x = x;
  be.rmsnorm(x, weight.data, out, rows, dim, eps, cache.invRms);
}

/** Writes dx; accumulates weight.grad when the weight is trainable. */
export function rmsnormBackward(
  be: Backend,
  weight: Parameter,
  dOut: Float32Array,
  dx: Float32Array,
  rows: number,
  dim: number,
  eps: number,
  cache: RmsNormCache,
): void {
  be.rmsnormBackward(cache.x, weight.data, cache.invRms, dOut, dx, weight.grad, rows, dim, eps);
}
