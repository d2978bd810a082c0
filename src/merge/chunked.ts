/**
 * Stored values read and written block by block, for the methods with `mergeChunked` (linear,
 * slerp): the worker hands them the inputs as stored (BF16, F16 or F32; in memory, or read from
 * their files a window at a time into a reused buffer) and the output buffer, and they work
 * through small float32 blocks. No whole input is decoded into a float32 array or read into
 * fresh memory, and the result is encoded straight into the output, so a tensor costs its output
 * and a few windows instead of (inputs + 1) float32 copies.
 *
 * Each block is decoded, rounded and encoded with the same element-wise functions as the whole
 * arrays of the plain path (`bf16ToF32`, `roundInPlace`, `f32ToBf16`, ...), so the bytes are the
 * same.
 */
import { readSync } from 'node:fs';
import { AmalgamError } from '../errors.js';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from '../tensor/dtype.js';
import type { MemoryValues } from './fused-common.js';
import type { ChunkedInput, ChunkWriter, StoredArray } from './types.js';

/** Values per block of the chunked merges. */
export const CHUNK_VALUES = 4096;
/** Values per read of a file-backed input. */
export const WINDOW_VALUES = 1 << 18;

/** Rounds float32 values in place to BF16 or F16 precision (as `roundInPlace` in worker.ts). */
function roundBlock(data: Float32Array, dtype: 'BF16' | 'F16', bits: Uint16Array): void {
  const b = bits.subarray(0, data.length);
  if (dtype === 'BF16') bf16ToF32(f32ToBf16(data, b), data);
  else f16ToF32(f32ToF16(data, b), data);
}

/** `read` and `stored` of a ChunkedInput over a function giving stored values by range. */
function inputOver(
  model: string,
  shape: readonly number[],
  length: number,
  dtype: StoredArray['dtype'],
  roundTo: 'BF16' | 'F16' | undefined,
  view: (start: number, len: number) => StoredArray,
): ChunkedInput {
  const round = roundTo !== undefined && roundTo !== dtype ? roundTo : undefined;
  const bits = round ? new Uint16Array(CHUNK_VALUES) : undefined;
  const read = (start: number, dst: Float32Array): void => {
    const v = view(start, dst.length);
    if (v.dtype === 'F32') dst.set(v.data);
    else if (v.dtype === 'BF16') bf16ToF32(v.data, dst);
    else f16ToF32(v.data, dst);
    if (round) {
      for (let a = 0; a < dst.length; a += CHUNK_VALUES) roundBlock(dst.subarray(a, Math.min(dst.length, a + CHUNK_VALUES)), round, bits!);
    }
  };
  return { model, shape, length, read, ...(round ? {} : { stored: { dtype, view } }) };
}

/**
 * An input in memory. `round` (the merge's dtype) rounds values of another dtype to it, as the
 * plain path rounds the decoded float32 arrays; values stored in that dtype are exact.
 */
export function chunkedInput(model: string, shape: readonly number[], values: MemoryValues): ChunkedInput {
  const view = (start: number, len: number): StoredArray =>
    values.dtype === 'F32' ? { dtype: 'F32', data: values.data.subarray(start, start + len) } : { dtype: values.dtype, data: values.data.subarray(start, start + len) };
  return inputOver(model, shape, values.data.length, values.dtype, values.round, view);
}

/**
 * An input read from an open file (`length` values of `dtype` from byte `offset`), a window of
 * values at a time into one reused buffer: a range outside the current window starts a new one
 * at its start. Ranges are at most WINDOW_VALUES long, and cheapest in increasing order.
 */
export function chunkedFileInput(
  model: string,
  shape: readonly number[],
  file: { fd: number; path: string; offset: number; length: number; dtype: StoredArray['dtype']; round?: 'BF16' | 'F16' },
  what: string,
): ChunkedInput {
  const size = file.dtype === 'F32' ? 4 : 2;
  const windowValues = Math.min(WINDOW_VALUES, file.length);
  const buf = new ArrayBuffer(Math.max(4, Math.ceil((windowValues * size) / 4) * 4));
  const bytes = new Uint8Array(buf);
  const f32 = new Float32Array(buf);
  const u16 = new Uint16Array(buf);
  let from = -1;
  let count = 0;
  const load = (start: number): void => {
    from = start;
    count = Math.min(windowValues, file.length - from);
    const want = count * size;
    let done = 0;
    while (done < want) {
      const r = readSync(file.fd, bytes, done, want - done, file.offset + from * size + done);
      if (r === 0) throw new AmalgamError('E_IO', `file ended while reading a tensor (at byte ${file.offset + from * size + done})`, { file: file.path, key: what });
      done += r;
    }
  };
  const view = (start: number, len: number): StoredArray => {
    if (from < 0 || start < from || start + len > from + count) load(start);
    if (start + len > from + count) throw new RangeError(`chunked input: values [${start}, ${start + len}) are past the end or longer than a window`);
    const a = start - from;
    return file.dtype === 'F32' ? { dtype: 'F32', data: f32.subarray(a, a + len) } : { dtype: file.dtype, data: u16.subarray(a, a + len) };
  };
  return inputOver(model, shape, file.length, file.dtype, file.round, view);
}

/** A writer encoding float32 blocks into stored values (F32, BF16 or F16), as `encodeInto` does. */
export function chunkWriter(out: MemoryValues): ChunkWriter {
  const write = (start: number, src: Float32Array): void => {
    if (out.dtype === 'F32') out.data.set(src, start);
    else if (out.dtype === 'BF16') f32ToBf16(src, out.data.subarray(start, start + src.length));
    else f32ToF16(src, out.data.subarray(start, start + src.length));
  };
  return { length: out.data.length, write, stored: out };
}

/**
 * The base among chunked inputs (by model name) and the others, in order; undefined where the
 * merge names no base or no input is the base (the method's `merge` then gives its error).
 */
export function splitChunked(base: string | null, inputs: readonly ChunkedInput[]): { base: ChunkedInput; others: ChunkedInput[] } | undefined {
  const b = base === null ? undefined : inputs.find((x) => x.model === base);
  return b ? { base: b, others: inputs.filter((x) => x !== b) } : undefined;
}

/** Whether every input has `n` values and one shape (the merge of one tensor, nothing to cut). */
export function sameLayout(inputs: readonly ChunkedInput[], n: number): boolean {
  const shape = inputs[0]?.shape;
  return inputs.every((x) => x.length === n && shape !== undefined && x.shape.length === shape.length && x.shape.every((d, k) => d === shape[k]));
}
