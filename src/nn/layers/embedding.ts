/** Token embedding: out[t] = table[ids[t]], table [vocab, dim]. */
import type { Backend } from '../../backend/backend.js';
import type { Parameter } from '../params.js';

/** out[N, dim] = rows of the table; ids has exactly N entries. */
export function embeddingForward(be: Backend, table: Parameter, ids: Int32Array, out: Float32Array, dim: number): void {
  be.embedding(table.data, ids, out, dim);
}

/** table.grad[ids[t]] += dOut[t] (nothing when the table is frozen). */
export function embeddingBackward(be: Backend, table: Parameter, ids: Int32Array, dOut: Float32Array, dim: number): void {
  if (table.grad) be.embeddingBackward(dOut, ids, table.grad, dim);
}
