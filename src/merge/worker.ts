/**
 * The per-tensor computation of a merge, and the worker-thread entry that runs it. The executor
 * calls `computeTensor` directly when it runs inline (`jobs: 1`) and through worker threads
 * otherwise, so both paths share one code path. Input arrays arrive transferred (not copied) and
 * the encoded result is transferred back.
 */
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { AmalgamError, type ErrorCode } from '../errors.js';
import { bf16ToF32, encodeFromF32, f16ToF32, f32ToBf16, f32ToF16, type DType, type FloatDType } from '../tensor/dtype.js';
import { getMergeMethod, mergeTensor } from './registry.js';
import { tensorRng } from './sparsify.js';
import type { MergeInput, ResolvedParams } from './types.js';

/** Marks worker threads started by the executor. */
export const WORKER_MARK = 'amalgam-merge-worker';

export interface ComputeInput {
  model: string;
  shape: number[];
  data: Float32Array;
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
}

export interface ComputeResult {
  id: number;
  /** The merged tensor encoded in `outDtype`, on an ArrayBuffer of its own. */
  bytes: Uint8Array;
  warnings: string[];
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

/** Merges one tensor and encodes it in the output dtype. */
export function computeTensor(task: ComputeTask): ComputeResult {
  const warnings: string[] = [];
  const method = getMergeMethod(task.method);
  const inputs: MergeInput[] = task.inputs.map((i) => {
    if (task.computeDtype === 'BF16' || task.computeDtype === 'F16') roundInPlace(i.data, task.computeDtype);
    return { model: i.model, data: i.data, shape: i.shape };
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
  if (method.randomized) {
    if (task.seed === null) throw new AmalgamError('E_USAGE', `${method.name} draws random masks and needs a seed`, { key: task.tensorName });
    ctx.rng = tensorRng(task.seed, task.tensorName);
  }
  const out = mergeTensor(method, ctx);
  if (!out) {
    throw new AmalgamError('E_MISSING', `${method.name} left the tensor out, but the plan writes it`, { key: task.tensorName });
  }
  if (out.shape.length !== task.outShape.length || out.shape.some((d, i) => d !== task.outShape[i])) {
    throw new AmalgamError('E_SHAPE', `${method.name} produced shape [${out.shape.join(', ')}], the plan expects [${task.outShape.join(', ')}]`, {
      key: task.tensorName,
    });
  }
  let bytes = encodeFromF32(task.outDtype, out.data);
  if (bytes.byteOffset !== 0 || bytes.byteLength !== bytes.buffer.byteLength) bytes = bytes.slice();
  return { id: task.id, bytes, warnings };
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
  port.on('message', (task: ComputeTask) => {
    let msg: WorkerMessage;
    try {
      msg = { ok: true, result: computeTensor(task) };
    } catch (e) {
      msg = { ok: false, id: task.id, error: serializeError(e) };
    }
    port.postMessage(msg, msg.ok ? [msg.result.bytes.buffer as ArrayBuffer] : []);
  });
}
