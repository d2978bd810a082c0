/**
 * The per-tensor computation of a merge, and the worker-thread entry that runs it. The executor
 * calls `computeTensor` directly when it runs inline (`jobs: 1`) and through worker threads
 * otherwise, so both paths share one code path. Input arrays arrive transferred (not copied) and
 * the encoded result is transferred back.
 */
import { closeSync, constants, openSync, readSync } from 'node:fs';
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { AmalgamError, type ErrorCode } from '../errors.js';
import { directFlag } from '../io/aligned.js';
import { ioError } from '../io/source.js';
import { bf16ToF32, byteSize, decodeToF32, encodeFromF32, f16ToF32, f32ToBf16, f32ToF16, numel, type DType, type FloatDType } from '../tensor/dtype.js';
import type { MemoryValues, Preloaded, StoredValues } from './fused-common.js';
import { fusedApplies, fusedMerge, gtaVariantOf, type StoredInput } from './gta.js';
import { InputPrefetcher, type PrefetchAreas } from './prefetch.js';
import { getMergeMethod, mergeTensor } from './registry.js';
import { tensorRng } from './sparsify.js';
import { chunkedFileInput, chunkedInput, chunkWriter } from './chunked.js';
import type { ChunkedInput, MergeContext, MergeInput, MergeMethod, ResolvedParams } from './types.js';
import type { Rng } from '../tensor/rng.js';

/** Marks worker threads started by the executor. */
export const WORKER_MARK = 'amalgam-merge-worker';

/** One input: its values as float32 (`data`), or as stored (`raw` bytes of `dtype`). */
export interface ComputeInput {
  model: string;
  shape: number[];
  data?: Float32Array;
  /** The stored bytes, at a 4-byte-aligned offset; the task owns their buffer. */
  raw?: Uint8Array;
  /** Or where they are: read chunk by chunk while merging (with `dtype`). */
  file?: { path: string; offset: number; direct?: boolean };
  /** The dtype of `raw` or `file`, or the stored dtype `data` was decoded from exactly. */
  dtype?: DType;
}

export interface ComputeTask {
  id: number;
  tensorName: string;
  method: string;
  isEmbed: boolean;
  isOptional: boolean;
  base: string | null;
  params: ResolvedParams;
  inputs: ComputeInput[];
  /** Inputs are rounded to this dtype first (the configuration's `dtype`), unless null. */
  computeDtype: FloatDType | null;
  outDtype: DType;
  outShape: number[];
  /** Seed of randomized methods: the tensor's stream is derived from it and the tensor name. */
  seed: number | null;
  /**
   * Memory for the encoded result (at least its size), used where the method writes it directly:
   * transferred (ArrayBuffer) or shared (SharedArrayBuffer, then the result is a view of it).
   */
  outBuffer?: ArrayBuffer | SharedArrayBuffer;
  /** Memory the fused kernel may hold to read file-backed inputs once, whole (default 0). */
  residentBytes?: number;
  /**
   * In a worker thread: the areas of kernel memory where the worker reads the inputs of its next
   * tensors while it merges the current one (`InputPrefetcher`).
   */
  prefetch?: PrefetchAreas;
  /**
   * Byte offset of the result in `outBuffer` (default 0; a multiple of the output's element
   * size), chosen so the result lines up with its position in the output file for direct writes.
   */
  outOffset?: number;
  /**
   * Bytes of float32 arrays the worker may keep after this task for the next tasks' decoded
   * inputs (`spareArrays`); none without it. The executor sets this memory aside from its budget.
   */
  spareBytes?: number;
}

export interface ComputeResult {
  id: number;
  /** The merged tensor encoded in `outDtype`, at offset 0 of an ArrayBuffer of its own. */
  bytes: Uint8Array;
  warnings: string[];
  /** Buffers of the task (raw inputs, an unused `outBuffer`) handed back for reuse. */
  buffers?: (ArrayBuffer | SharedArrayBuffer)[];
}

export interface SerializedError {
  code?: ErrorCode;
  message: string;
  key?: string;
  hint?: string;
  file?: string;
  stack?: string;
}

/** Rounds float32 values in place to the nearest value of a 16-bit float dtype. */
export function roundInPlace(data: Float32Array, dtype: FloatDType): void {
  const CHUNK = 1 << 16;
  const tmp = new Uint16Array(Math.min(CHUNK, data.length));
  for (let a = 0; a < data.length; a += CHUNK) {
    const part = data.subarray(a, Math.min(data.length, a + CHUNK));
    const bits = tmp.subarray(0, part.length);
    if (dtype === 'BF16') bf16ToF32(f32ToBf16(part, bits), part);
    else if (dtype === 'F16') f16ToF32(f32ToF16(part, bits), part);
  }
}

type StoredDType = 'F32' | 'BF16' | 'F16';

function isStoredDType(d: DType | undefined): d is StoredDType {
  return d === 'F32' || d === 'BF16' || d === 'F16';
}

/**
 * Whether a tensor with these settings is merged by the fused GTA kernel straight from its stored
 * bytes (`fusedMerge`): a GTA variant it computes, float inputs of the output's shape and an
 * output dtype it writes. The executor then reads the inputs as stored.
 */
export function storedInputsFit(
  methodName: string,
  t: { params: ResolvedParams; base: string | null; inputs: readonly { shape: readonly number[]; dtype: DType }[]; shape: readonly number[]; dtype: DType },
): boolean {
  const method = getMergeMethod(methodName);
  const v = gtaVariantOf(method);
  if (method.mergeChunked) {
    if (t.inputs.length === 0) return false;
  } else if (!v || !fusedApplies(v, t.params.global['rescale']) || t.base === null || t.inputs.length < 2) return false;
  if (!isStoredDType(t.dtype)) return false;
  const n = numel(t.shape);
  return t.inputs.every((i) => isStoredDType(i.dtype) && numel(i.shape) === n && i.shape.length === t.shape.length && i.shape.every((d, k) => d === t.shape[k]));
}

function storedView(raw: Uint8Array, dtype: StoredDType, round: 'BF16' | 'F16' | undefined): StoredValues | undefined {
  if (dtype === 'F32') {
    if (raw.byteOffset % 4 !== 0 || raw.byteLength % 4 !== 0) return undefined;
    return { dtype, data: new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), ...(round ? { round } : {}) };
  }
  if (raw.byteOffset % 2 !== 0 || raw.byteLength % 2 !== 0) return undefined;
  return { dtype, data: new Uint16Array(raw.buffer, raw.byteOffset, raw.byteLength / 2), ...(round ? { round } : {}) };
}

function openFd(path: string, fds: Map<string, number>): number {
  let fd = fds.get(path);
  if (fd === undefined) {
    try {
      fd = openSync(path, 'r');
    } catch (e) {
      throw ioError(path, e);
    }
    fds.set(path, fd);
  }
  return fd;
}

/** The file opened with `O_DIRECT` as well, or undefined where that is refused. */
function openDirectFd(path: string, fds: Map<string, number>): number | undefined {
  const key = `direct:${path}`;
  let fd = fds.get(key);
  if (fd === undefined) {
    const flag = directFlag();
    if (flag === undefined) return undefined;
    try {
      fd = openSync(path, constants.O_RDONLY | flag);
    } catch {
      return undefined;
    }
    fds.set(key, fd);
  }
  return fd;
}

/**
 * The fused path for stored inputs (in memory, or read from their files while merging);
 * undefined (nothing done) where it does not apply.
 */
function computeStored(task: ComputeTask, warnings: string[], preloaded?: Preloaded): Uint8Array | undefined {
  const fds = new Map<string, number>();
  try {
    return computeStoredWith(task, warnings, fds, preloaded);
  } finally {
    for (const fd of fds.values()) closeSync(fd);
  }
}

function computeStoredWith(task: ComputeTask, warnings: string[], fds: Map<string, number>, preloaded?: Preloaded): Uint8Array | undefined {
  const method = getMergeMethod(task.method);
  if (method.mergeChunked) return computeChunked(task, warnings, fds, method);
  const v = gtaVariantOf(method);
  if (!v || !isStoredDType(task.outDtype)) return undefined;
  const round = task.computeDtype === 'BF16' || task.computeDtype === 'F16' ? task.computeDtype : undefined;
  const inputs: StoredInput[] = [];
  for (const i of task.inputs) {
    if (!isStoredDType(i.dtype)) return undefined;
    if (i.file) {
      const fd = openFd(i.file.path, fds);
      const directFd = i.file.direct ? openDirectFd(i.file.path, fds) : undefined;
      inputs.push({
        model: i.model,
        shape: i.shape,
        values: { dtype: i.dtype, fd, offset: i.file.offset, length: numel(i.shape), ...(directFd !== undefined ? { directFd } : {}), ...(round ? { round } : {}) },
      });
      continue;
    }
    if (!i.raw || byteSize(i.dtype, numel(i.shape)) !== i.raw.byteLength) return undefined;
    const values = storedView(i.raw, i.dtype, round);
    if (!values) return undefined;
    inputs.push({ model: i.model, shape: i.shape, values });
  }
  const { out, buf, at, outBytes } = storedOutput(task, task.outDtype);
  const base = inputs.find((i) => i.model === task.base);
  if (!base || base.shape.length !== task.outShape.length || base.shape.some((d, k) => d !== task.outShape[k])) return undefined;
  const ctx = storedContext(task, warnings);
  // With areas for preloading, the kernel memory past them is not the kernel's to hold inputs in.
  const opts = preloaded ? { preloaded } : task.residentBytes && !task.prefetch ? { residentBytes: task.residentBytes } : {};
  if (!fusedMerge(v, ctx, inputs, out, opts)) return undefined;
  return new Uint8Array(buf, at, outBytes);
}

/** The merge context of a task whose inputs are given as stored (no float32 inputs); warnings go to `warnings`. */
function storedContext(task: ComputeTask, warnings: string[]): Omit<MergeContext, 'inputs'> {
  return {
    tensorName: task.tensorName,
    isEmbed: task.isEmbed,
    isOptional: task.isOptional,
    base: task.base,
    params: task.params,
    warn: (m: string) => warnings.push(m),
  };
}

/** The output's stored values in the task's `outBuffer` (at `outOffset`), else in new memory. */
function storedOutput(task: ComputeTask, dtype: StoredDType): { out: MemoryValues; buf: ArrayBuffer | SharedArrayBuffer; at: number; outBytes: number } {
  const n = numel(task.outShape);
  const outBytes = byteSize(dtype, n)!;
  const given = task.outBuffer !== undefined && task.outBuffer.byteLength >= (task.outOffset ?? 0) + outBytes;
  const buf = given ? task.outBuffer! : new ArrayBuffer(outBytes);
  const at = given ? (task.outOffset ?? 0) : 0;
  const out: MemoryValues = dtype === 'F32' ? { dtype: 'F32', data: new Float32Array(buf, at, n) } : { dtype, data: new Uint16Array(buf, at, n) };
  return { out, buf, at, outBytes };
}

/**
 * A method's `mergeChunked` over inputs given as stored bytes; undefined (nothing done) where
 * an input is not, or the method declines.
 */
function computeChunked(task: ComputeTask, warnings: string[], fds: Map<string, number>, method: MergeMethod): Uint8Array | undefined {
  if (!isStoredDType(task.outDtype) || !method.mergeChunked) return undefined;
  const round = task.computeDtype === 'BF16' || task.computeDtype === 'F16' ? task.computeDtype : undefined;
  const inputs: ChunkedInput[] = [];
  for (const i of task.inputs) {
    if (!isStoredDType(i.dtype)) return undefined;
    if (i.file) {
      const file = { fd: openFd(i.file.path, fds), path: i.file.path, offset: i.file.offset, length: numel(i.shape), dtype: i.dtype, ...(round ? { round } : {}) };
      inputs.push(chunkedFileInput(i.model, i.shape, file, task.tensorName));
      continue;
    }
    if (!i.raw || byteSize(i.dtype, numel(i.shape)) !== i.raw.byteLength) return undefined;
    const values = storedView(i.raw, i.dtype, round);
    if (!values || !('data' in values)) return undefined;
    inputs.push(chunkedInput(i.model, i.shape, values));
  }
  const { out, buf, at, outBytes } = storedOutput(task, task.outDtype);
  const ctx = storedContext(task, warnings);
  if (method.randomized) ctx.rng = randomSource(task, method.name);
  if (!method.mergeChunked(ctx, inputs, chunkWriter(out))) return undefined;
  return new Uint8Array(buf, at, outBytes);
}

/** The random stream of a randomized method's tensor, derived from the seed and the tensor name. */
function randomSource(task: ComputeTask, methodName: string): Rng {
  if (task.seed === null) throw new AmalgamError('E_USAGE', `${methodName} draws random masks and needs a seed`, { key: task.tensorName });
  return tensorRng(task.seed, task.tensorName);
}

/** The stored bytes of an input given by its file location. */
function readLocated(i: ComputeInput, tensorName: string): Uint8Array {
  const { path, offset } = i.file!;
  const bytes = new Uint8Array(byteSize(i.dtype!, numel(i.shape)) ?? 0);
  const fd = openFd(path, new Map());
  try {
    let done = 0;
    while (done < bytes.length) {
      const r = readSync(fd, bytes, done, bytes.length - done, offset + done);
      if (r === 0) throw new AmalgamError('E_IO', `file ended while reading a tensor (at byte ${offset + done})`, { file: path, key: tensorName });
      done += r;
    }
  } finally {
    closeSync(fd);
  }
  return bytes;
}

/**
 * Merges one tensor and encodes it in the output dtype. `preloaded`: the inputs are already in
 * kernel memory (read by the worker's `InputPrefetcher`).
 */
export function computeTensor(task: ComputeTask, preloaded?: Preloaded): ComputeResult {
  const warnings: string[] = [];
  const method = getMergeMethod(task.method);
  const buffers: (ArrayBuffer | SharedArrayBuffer)[] = [];
  for (const i of task.inputs) if (i.raw) buffers.push(i.raw.buffer as ArrayBuffer);
  if (buffers.length || task.inputs.some((i) => i.file)) {
    const bytes = computeStored(task, warnings, preloaded);
    if (bytes) {
      if (task.outBuffer && task.outBuffer !== bytes.buffer) buffers.push(task.outBuffer);
      return { id: task.id, bytes, warnings, buffers };
    }
    warnings.length = 0;
  }
  const spare = task.spareBytes ? spareArrays : undefined;
  const taken: Float32Array[] = [];
  const inputs: MergeInput[] = task.inputs.map((i) => {
    const data = i.data ?? decodeInput(i, task.tensorName, spare, taken);
    // Values decoded from the compute dtype itself are already rounded to it.
    const exact = i.dtype === task.computeDtype;
    if ((task.computeDtype === 'BF16' || task.computeDtype === 'F16') && !exact) roundInPlace(data, task.computeDtype);
    return { model: i.model, data, shape: i.shape };
  });
  const ctx: Parameters<typeof mergeTensor>[1] = {
    tensorName: task.tensorName,
    isEmbed: task.isEmbed,
    isOptional: task.isOptional,
    inputs,
    base: task.base,
    params: task.params,
    warn: (m) => warnings.push(m),
  };
  if (method.randomized) ctx.rng = randomSource(task, method.name);
  const out = mergeTensor(method, ctx);
  if (!out) {
    throw new AmalgamError('E_MISSING', `${method.name} left the tensor out, but the plan writes it`, { key: task.tensorName });
  }
  if (out.shape.length !== task.outShape.length || out.shape.some((d, i) => d !== task.outShape[i])) {
    throw new AmalgamError('E_SHAPE', `${method.name} produced shape [${out.shape.join(', ')}], the plan expects [${task.outShape.join(', ')}]`, {
      key: task.tensorName,
    });
  }
  const given = encodeInto(task, out.data);
  if (given) {
    if (spare) {
      // The inputs' arrays and the result (encoded into the output buffer) are free now; the
      // result's array is kept only if it is the method's own (not a view of a stored input).
      const own = !buffers.includes(out.data.buffer as ArrayBuffer) && !taken.includes(out.data);
      for (const a of own ? [...taken, out.data] : taken) spare.give(a, task.spareBytes!);
    }
    return { id: task.id, bytes: given, warnings, ...(buffers.length ? { buffers } : {}) };
  }
  if (task.outBuffer) buffers.push(task.outBuffer);
  let bytes = encodeFromF32(task.outDtype, out.data);
  if (bytes.byteOffset !== 0 || bytes.byteLength !== bytes.buffer.byteLength) bytes = bytes.slice();
  return { id: task.id, bytes, warnings, ...(buffers.length ? { buffers } : {}) };
}

/**
 * Float32 arrays a worker keeps between tasks. Decoding a tensor into memory already in use is
 * much cheaper than into fresh pages (each 4 KiB page faulted in costs microseconds on a virtual
 * machine), and consecutive tensors of a model mostly have the same shapes.
 */
class SpareArrays {
  private readonly buffers: ArrayBuffer[] = [];
  private bytes = 0;

  /** A Float32Array of n values, in the smallest kept buffer that holds them, else new. */
  take(n: number): Float32Array {
    let best = -1;
    for (let k = 0; k < this.buffers.length; k++) {
      const b = this.buffers[k]!;
      if (b.byteLength >= 4 * n && (best < 0 || b.byteLength < this.buffers[best]!.byteLength)) best = k;
    }
    if (best < 0) return new Float32Array(n);
    const [b] = this.buffers.splice(best, 1);
    this.bytes -= b!.byteLength;
    return new Float32Array(b!, 0, n);
  }

  /** Keeps the whole buffer of `a`, then drops the smallest kept ones while more than `limit` bytes are kept. */
  give(a: Float32Array, limit: number): void {
    const b = a.buffer;
    if (!(b instanceof ArrayBuffer) || a.byteOffset !== 0 || b.byteLength > limit || this.buffers.includes(b)) return;
    this.buffers.push(b);
    this.bytes += b.byteLength;
    this.buffers.sort((x, y) => y.byteLength - x.byteLength);
    while (this.bytes > limit) this.bytes -= this.buffers.pop()!.byteLength;
  }
}

const spareArrays = new SpareArrays();

/**
 * An input's values as float32: from its stored bytes (given, or read from its file). 16-bit
 * values are widened into an array from `spare` where given (listed in `taken`).
 */
function decodeInput(i: ComputeInput, tensorName: string, spare: SpareArrays | undefined, taken: Float32Array[]): Float32Array {
  const bytes = i.raw ?? readLocated(i, tensorName);
  if (!spare || (i.dtype !== 'BF16' && i.dtype !== 'F16') || bytes.byteOffset % 2 !== 0 || bytes.byteLength % 2 !== 0) {
    return decodeToF32(i.dtype!, bytes, { copy: !i.file, what: tensorName });
  }
  const bits = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
  const out = spare.take(bits.length);
  taken.push(out);
  return i.dtype === 'BF16' ? bf16ToF32(bits, out) : f16ToF32(bits, out);
}

/**
 * Encodes a result into the task's `outBuffer` at `outOffset` (where the executor placed it for
 * direct writes), for float output dtypes; undefined when there is no such buffer or it is too
 * small.
 */
function encodeInto(task: ComputeTask, data: Float32Array): Uint8Array | undefined {
  const buf = task.outBuffer;
  const at = task.outOffset ?? 0;
  const size = byteSize(task.outDtype, data.length);
  if (!buf || size === undefined || buf.byteLength < at + size || !isStoredDType(task.outDtype)) return undefined;
  if (task.outDtype === 'F32') new Float32Array(buf, at, data.length).set(data);
  else if (task.outDtype === 'BF16') f32ToBf16(data, new Uint16Array(buf, at, data.length));
  else f32ToF16(data, new Uint16Array(buf, at, data.length));
  return new Uint8Array(buf, at, size);
}

export function serializeError(e: unknown): SerializedError {
  if (e instanceof AmalgamError) {
    const s: SerializedError = { code: e.code, message: e.message };
    if (e.key !== undefined) s.key = e.key;
    if (e.hint !== undefined) s.hint = e.hint;
    if (e.file !== undefined) s.file = e.file;
    return s;
  }
  const err = e as Error;
  return { message: err?.message ?? String(e), ...(err?.stack ? { stack: err.stack } : {}) };
}

/** Rebuilds an error sent from a worker: AmalgamErrors keep their code, key, hint and message. */
export function deserializeError(s: SerializedError): Error {
  if (s.code) {
    // The message is already formatted (file, key and hint included).
    const e = new AmalgamError(s.code, s.message);
    Object.assign(e as unknown as Record<string, unknown>, { key: s.key, hint: s.hint, file: s.file });
    return e;
  }
  const e = new Error(s.message);
  if (s.stack) e.stack = s.stack;
  return e;
}

type WorkerMessage = { ok: true; result: ComputeResult } | { ok: false; id: number; error: SerializedError };

if (!isMainThread && parentPort && (workerData as { mark?: string } | undefined)?.mark === WORKER_MARK) {
  const port = parentPort;
  // Tasks in arrival order. A task whose inputs the prefetcher reads gets an area when one is
  // free; the others are computed as they come. Results go back in arrival order.
  interface Entry {
    task: ComputeTask;
    area?: number;
    ready?: Promise<Preloaded | undefined>;
  }
  const queue: Entry[] = [];
  let prefetcher: InputPrefetcher | undefined;
  let running = false;

  const startReads = () => {
    for (const e of queue) {
      if (e.ready) continue;
      if (e.task.prefetch) prefetcher ??= new InputPrefetcher(e.task.prefetch);
      if (!prefetcher || !e.task.prefetch || !prefetcher.eligible(e.task)) {
        e.ready = Promise.resolve(undefined);
        continue;
      }
      const started = prefetcher.start(e.task);
      if (!started) return; // both areas taken: this and later tasks wait, in order
      e.area = started.area;
      e.ready = started.ready;
      e.ready.catch(() => {}); // reported when the task's turn comes
    }
  };

  const run = async () => {
    if (running) return;
    running = true;
    while (queue.length) {
      startReads();
      const e = queue[0]!;
      if (!e.ready) break; // cannot happen: the head always gets an area or none is needed
      let msg: WorkerMessage;
      try {
        const preloaded = await e.ready;
        msg = { ok: true, result: computeTensor(e.task, preloaded) };
      } catch (err) {
        msg = { ok: false, id: e.task.id, error: serializeError(err) };
      }
      queue.shift();
      if (e.area !== undefined) prefetcher!.release(e.area);
      startReads();
      const transfer = msg.ok ? [msg.result.bytes.buffer, ...(msg.result.buffers ?? [])].filter((b): b is ArrayBuffer => b instanceof ArrayBuffer) : [];
      port.postMessage(msg, [...new Set(transfer)]);
    }
    running = false;
  };

  port.on('message', (task: ComputeTask) => {
    queue.push({ task });
    startReads();
    void run();
  });
}
