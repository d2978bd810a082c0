/**
 * Carrying out a merge plan, tensor by tensor (merge-methods.md §9.5).
 *
 * - Inputs are read lazily: one tensor of one model at a time, with positional reads.
 * - The arithmetic runs on worker threads (`jobs` of them, started at once; `jobs: 1` runs
 *   inline). Input arrays are transferred to the worker and the encoded result is transferred
 *   back, never copied.
 * - Tensors of the task arithmetic family with a magnitude or no sparsifier (ties,
 *   task_arithmetic) skip float32 inputs: the fused kernel (`gta.ts`) reads the stored values.
 *   With the WebAssembly kernels built and the inputs in files (`streamed`), the worker reads
 *   them straight into its kernel memory and writes the result into a shared buffer; otherwise
 *   they are read whole into reused buffers (`stored`). Buffers are pooled by size, so tensors
 *   of recurring shapes reuse memory that is already paged in.
 * - Methods with `mergeChunked` (linear, the slerp family, DARE, DELLA, sce, ram, ...) skip
 *   float32 inputs too: with the inputs in files (`streamed`), the worker reads each a window at
 *   a time into a reused buffer and merges block by block (`chunked.ts`), with no read-ahead
 *   areas or direct reads; otherwise the inputs are read whole into reused buffers (`stored`).
 * - Streamed inputs of the fused kernel (`planStreamedReads`): each worker gets up to three tasks at once and reads
 *   the next ones' inputs, once and whole, into two areas of its kernel memory while it merges
 *   the current one (`prefetch.ts`); tensors too large for an area are read into a third, big
 *   area of the first worker when their files are out of the page cache and the budget allows,
 *   otherwise region by region (twice: once per pass). Files mostly out of the page cache are
 *   read with O_DIRECT. The areas are set aside from the budget.
 * - Memory is bounded by admission control. Each tensor has a cost: (inputs + 3) × its float32
 *   size (the inputs, the result, its encoded form and one scratch array), or what the fused
 *   and chunked paths hold (`storedCost`, `streamedCost`, `chunkedCost`). A tensor starts only when the costs of the tensors
 *   in flight plus its own stay within the budget, or when nothing is in flight; idle pooled
 *   buffers are dropped to keep them within the budget too. Tensors start costliest first, so the
 *   largest ones overlap each other and small ones fill in at the end. The default budget is the
 *   largest (inputs + 3) × float32 cost in the plan. Scratch a method allocates beyond that (the
 *   task vectors of the other task arithmetic methods, one per non-base model) comes on top, for
 *   the tensors being merged only.
 * - Results go straight to their final offsets in the output shards (the layout is fixed by the
 *   plan), inside a staging folder that is renamed to the output path only once complete. On
 *   any error or abort the staging folder is removed.
 * - Randomized methods draw from a stream derived from the seed and the tensor name, so the
 *   result does not depend on scheduling or on `jobs`.
 */
import { availableParallelism } from 'node:os';
import { basename } from 'node:path';
import { Worker } from 'node:worker_threads';
import cliProgress from 'cli-progress';
import { AmalgamError } from '../errors.js';
import { allocAlignedShared, DIRECT_ALIGN, directIoEnabled, looksUncached } from '../io/aligned.js';
import { withStagingDir } from '../io/atomic-dir.js';
import { canReadRawInto, openSafetensors, ShardedSafetensorsWriter, type RawIntoSource } from '../io/safetensors.js';
import type { TensorSource } from '../io/source.js';
import { byteSize, numel, type DType } from '../tensor/dtype.js';
import { openAdaptedSource } from '../lora/apply.js';
import { KERNEL_MEMORY_MAX, kernelRegionEnd, slotBytes, wasmDtypesFit, wasmKernelsAvailable } from './fused-wasm.js';
import type { PrefetchAreas } from './prefetch.js';
import { AMALGAM_VERSION, writeOutputFiles } from './output.js';
import { buildPermutedEmbedding, permutedEmbeddingSources, type EmbeddingMatrix } from './embed.js';
import { embeddingPermutation, tensorCost, type MergePlan, type PlannedTensor } from './plan.js';
import { getMergeMethod } from './registry.js';
import {
  computeTensor,
  deserializeError,
  storedInputsFit,
  WORKER_MARK,
  type ComputeInput,
  type ComputeResult,
  type ComputeTask,
  type SerializedError,
} from './worker.js';

export interface MergeProgress {
  /** Tensors written so far, and in all. */
  done: number;
  total: number;
  /** The tensor just written. */
  tensor: string;
  bytesRead: number;
  bytesWritten: number;
  totalReadBytes: number;
  totalWriteBytes: number;
  elapsedMs: number;
}

export interface ExecuteOptions {
  /**
   * Worker threads for the arithmetic. `1` computes inline. Default: the number of cores, or 1
   * when the inputs hold fewer than 2^24 values in all (see `defaultJobs`).
   */
  jobs?: number;
  /** Shard size limit in bytes (default 5e9, mergekit's `5B`); 0 or less writes one shard. */
  outShardSize?: number;
  /** Replace a non-empty output folder. */
  overwrite?: boolean;
  /** Write README.md (default true). */
  writeModelCard?: boolean;
  /**
   * Bound in bytes on the summed cost of the tensors in flight (see the module comment). Default:
   * the plan's `stats.memoryBound`.
   */
  memoryBudget?: number;
  /** Called after each tensor is written. */
  onProgress?: (p: MergeProgress) => void;
  /** Receives warnings from the methods (also returned, in plan order). */
  onWarning?: (message: string) => void;
  /** Draw a progress bar on stderr (tensors/s, bytes/s, ETA). Default: false. */
  progressBar?: boolean;
  /** Aborts the merge; nothing appears at the output path. */
  signal?: AbortSignal;
  /**
   * How input files are read: `auto` (default) reads files mostly out of the page cache with
   * O_DIRECT, past it (see `looksUncached`); `always` and `never` decide for every file. O_DIRECT
   * is used only on Linux, and never with `AMALGAM_DIRECT_IO=0`; a file system that refuses it
   * gets ordinary reads.
   */
  directReads?: 'auto' | 'always' | 'never';
  /** Opens a model folder's weights (default `openSafetensors`); a hook for tests. */
  openSource?: (path: string) => Promise<TensorSource>;
}

export interface ExecuteResult {
  outDir: string;
  /** Files of the output folder, weights first. */
  files: string[];
  weightFiles: string[];
  tensors: number;
  bytesRead: number;
  bytesWritten: number;
  elapsedMs: number;
  jobs: number;
  memoryBudget: number;
  /** Largest summed cost of the tensors in flight at any time. */
  peakInFlightBytes: number;
  /** Warnings raised while merging, in plan order. */
  warnings: string[];
  /** How the inputs of tensors merged from their files were read (see `planStreamedReads`). */
  reads: {
    /** Input files read with O_DIRECT. */
    directFiles: number;
    /** Bytes of each worker's two prefetch areas (0 inline or without such tensors). */
    areaBytes: number;
    /** Tensors read whole into the big area, and its size. */
    bigTensors: number;
    bigAreaBytes: number;
    /** Memory of the budget set aside for inputs read whole (areas, or inline one tensor's). */
    setAsideBytes: number;
  };
}

// ---------------------------------------------------------------------------------------------
// Worker pool

interface Pending {
  resolve: (r: ComputeResult) => void;
  reject: (e: Error) => void;
}

type WorkerReply = { ok: true; result: ComputeResult } | { ok: false; id: number; error: SerializedError };

function spawnWorker(): Worker {
  const self = import.meta.url;
  const workerData = { mark: WORKER_MARK };
  if (self.endsWith('.ts')) {
    // Running from TypeScript sources (tests, tsx): the worker registers the same loader first.
    const api = import.meta.resolve('tsx/esm/api');
    const target = new URL('./worker.ts', self).href;
    const code = `import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(target)}); });`;
    return new Worker(code, { eval: true, workerData });
  }
  return new Worker(new URL('./worker.js', self), { workerData });
}

/**
 * Worker threads, each given up to `depth` tasks at once: a worker reads the inputs of the tasks
 * queued behind its current one while it computes (see prefetch.ts). Results come back in the
 * order each worker received its tasks.
 */
class WorkerPool {
  private readonly all: Worker[] = [];
  private readonly queue: { task: ComputeTask; transfer: ArrayBuffer[]; pending: Pending; pin: number | undefined }[] = [];
  private readonly assigned = new Map<Worker, Pending[]>();
  private broken: Error | undefined;

  constructor(
    private readonly size: number,
    private readonly depth = 1,
  ) {}

  /** Runs a task on any worker, or on worker `pin` (an index below `size`). */
  run(task: ComputeTask, transfer: ArrayBuffer[], pin?: number): Promise<ComputeResult> {
    return new Promise<ComputeResult>((resolve, reject) => {
      if (this.broken) return reject(this.broken);
      this.queue.push({ task, transfer, pending: { resolve, reject }, pin });
      this.pump();
    });
  }

  /** The least loaded worker with room for another task (`pin`: that one only). */
  private pick(pin: number | undefined): Worker | undefined {
    while (this.all.length < this.size) this.start();
    const room = (w: Worker) => this.assigned.get(w)!.length < this.depth;
    if (pin !== undefined) return room(this.all[pin]!) ? this.all[pin] : undefined;
    let best: Worker | undefined;
    for (const w of this.all) if (room(w) && (!best || this.assigned.get(w)!.length < this.assigned.get(best)!.length)) best = w;
    return best;
  }

  private pump(): void {
    for (let k = 0; k < this.queue.length; ) {
      const w = this.pick(this.queue[k]!.pin);
      if (!w) {
        k++;
        continue;
      }
      const job = this.queue.splice(k, 1)[0]!;
      this.assigned.get(w)!.push(job.pending);
      w.postMessage(job.task, job.transfer);
    }
  }

  private start(): Worker {
    const w = spawnWorker();
    this.all.push(w);
    this.assigned.set(w, []);
    w.on('message', (msg: WorkerReply) => {
      const p = this.assigned.get(w)!.shift();
      if (p) {
        if (msg.ok) p.resolve(msg.result);
        else p.reject(deserializeError(msg.error));
      }
      this.pump();
    });
    const fail = (e: Error) => {
      this.broken ??= e;
      for (const p of this.assigned.get(w)!.splice(0)) p.reject(e);
      for (const job of this.queue.splice(0)) job.pending.reject(e);
    };
    w.on('error', (e) => fail(e instanceof Error ? e : new Error(String(e))));
    w.on('exit', (code) => {
      if (this.assigned.get(w)!.length) fail(new Error(`a merge worker exited with code ${code}`));
    });
    return w;
  }

  /** Starts every worker now, so that their start-up overlaps the setup of the merge. */
  warm(): void {
    while (!this.broken && this.all.length < this.size) this.start();
  }

  async close(): Promise<void> {
    const ws = this.all.splice(0);
    await Promise.all(ws.map((w) => w.terminate().catch(() => 0)));
  }
}

// ---------------------------------------------------------------------------------------------
// Progress

function formatRate(bytesPerSecond: number): string {
  if (!Number.isFinite(bytesPerSecond)) return '0 B/s';
  if (bytesPerSecond >= 1 << 30) return `${(bytesPerSecond / (1 << 30)).toFixed(2)} GiB/s`;
  if (bytesPerSecond >= 1 << 20) return `${(bytesPerSecond / (1 << 20)).toFixed(1)} MiB/s`;
  if (bytesPerSecond >= 1 << 10) return `${(bytesPerSecond / (1 << 10)).toFixed(1)} KiB/s`;
  return `${bytesPerSecond.toFixed(0)} B/s`;
}

/** A progress bar whose value is bytes moved (read + written), so the ETA weighs large tensors. */
function makeBar(plan: MergePlan): { update(p: MergeProgress): void; stop(): void } {
  const bar = new cliProgress.SingleBar(
    {
      format: 'merging |{bar}| {done}/{tensors} tensors | {tps} tensors/s | {bps} | ETA {eta_formatted}',
      hideCursor: true,
      clearOnComplete: true,
      stream: process.stderr,
      fps: 5,
    },
    cliProgress.Presets.shades_classic,
  );
  const total = Math.max(1, plan.stats.readBytes + plan.stats.writeBytes);
  bar.start(total, 0, { done: 0, tensors: plan.tensors.length, tps: '0.0', bps: '0 B/s' });
  return {
    update(p) {
      const s = Math.max(p.elapsedMs, 1) / 1000;
      const moved = p.bytesRead + p.bytesWritten;
      bar.update(Math.min(moved, total), { done: p.done, tps: (p.done / s).toFixed(1), bps: formatRate(moved / s) });
    },
    stop() {
      bar.stop();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Executor

/** Below this many input values, starting worker threads costs more than it saves. */
const INLINE_VALUES = 2 ** 24;

/** The default `jobs`: one per core, or inline for small merges. */
export function defaultJobs(plan: MergePlan): number {
  let values = 0;
  for (const t of plan.tensors) for (const i of t.inputs) values += numel(i.shape);
  return values < INLINE_VALUES ? 1 : availableParallelism();
}

function abortError(outDir: string): AmalgamError {
  return new AmalgamError('E_IO', 'the merge was interrupted; nothing was written to the output path', { file: outDir });
}

/**
 * Idle buffers kept for reuse, by exact size: ArrayBuffers (transferred to a worker and back) and
 * SharedArrayBuffers (shared with it, never detached, so no allocation per transfer). Tensors of
 * one shape recur in every layer, so their data goes to memory that is already paged in instead of
 * freshly mapped memory (whose page faults cost more than the copy). `trim` drops the least
 * recently returned buffers.
 */
class BufferPool {
  private readonly free = new Map<string, (ArrayBuffer | SharedArrayBuffer)[]>();
  private readonly order: (ArrayBuffer | SharedArrayBuffer)[] = [];
  idleBytes = 0;

  private static key(bytes: number, shared: boolean): string {
    return `${shared ? 's' : 'a'}${bytes}`;
  }

  take(bytes: number): ArrayBuffer {
    const b = this.reuse(bytes, false);
    if (b) return b as ArrayBuffer;
    if (bytes > 0 && bytes <= 2 ** 31) {
      const u = Buffer.allocUnsafeSlow(bytes);
      if (u.byteOffset === 0 && u.buffer.byteLength === bytes) return u.buffer as ArrayBuffer;
    }
    return new ArrayBuffer(bytes);
  }

  /**
   * A SharedArrayBuffer of at least `bytes`: the smallest idle one that is large enough (it is
   * already paged in, and using it adds no memory), else a new one.
   */
  takeShared(bytes: number): SharedArrayBuffer {
    let best: SharedArrayBuffer | undefined;
    for (const b of this.order) if (b instanceof SharedArrayBuffer && b.byteLength >= bytes && (!best || b.byteLength < best.byteLength)) best = b;
    return (best && (this.reuse(best.byteLength, true) as SharedArrayBuffer)) || allocAlignedShared(bytes);
  }

  private reuse(bytes: number, shared: boolean): ArrayBuffer | SharedArrayBuffer | undefined {
    const b = this.free.get(BufferPool.key(bytes, shared))?.pop();
    if (b) {
      this.order.splice(this.order.indexOf(b), 1);
      this.idleBytes -= bytes;
    }
    return b;
  }

  give(b: ArrayBuffer | SharedArrayBuffer): void {
    if (b.byteLength === 0 || this.order.includes(b)) return;
    const key = BufferPool.key(b.byteLength, b instanceof SharedArrayBuffer);
    let list = this.free.get(key);
    if (!list) this.free.set(key, (list = []));
    list.push(b);
    this.order.push(b);
    this.idleBytes += b.byteLength;
  }

  trim(maxIdle: number): void {
    while (this.idleBytes > maxIdle && this.order.length) {
      const b = this.order.shift()!;
      const list = this.free.get(BufferPool.key(b.byteLength, b instanceof SharedArrayBuffer))!;
      list.splice(list.indexOf(b), 1);
      this.idleBytes -= b.byteLength;
    }
  }
}

/**
 * Resident bytes of a tensor merged from its stored bytes (`storedInputsFit`): the inputs and the
 * output as stored, plus the fused kernel's scratch (per model, at most two lists of n/16
 * (index, key) pairs), and never more than `tensorCost`.
 */
function storedCost(t: PlannedTensor): number {
  const n = numel(t.shape);
  let bytes = byteSize(t.dtype, n) ?? 4 * n;
  for (const i of t.inputs) bytes += (byteSize(i.dtype, numel(i.shape)) ?? 4 * n) + n;
  return Math.min(bytes, tensorCost(t));
}

/**
 * Resident bytes of a tensor merged from its files chunk by chunk: the output as stored, plus the
 * fused kernel's lists (as in `storedCost`), never more than `tensorCost`.
 */
function streamedCost(t: PlannedTensor): number {
  const n = numel(t.shape);
  return Math.min((byteSize(t.dtype, n) ?? 4 * n) + (t.inputs.length - 1) * n, tensorCost(t));
}

/**
 * Resident bytes of a tensor of another method read as stored (`raw`): its inputs as stored,
 * beside what the method holds (`tensorCost`).
 */
function rawCost(t: PlannedTensor): number {
  let bytes = tensorCost(t);
  for (const i of t.inputs) bytes += byteSize(i.dtype, numel(i.shape)) ?? 4 * numel(i.shape);
  return bytes;
}

/**
 * Resident bytes of a tensor merged block by block (`mergeChunked`): the output as stored, plus
 * what the methods hold whole: a byte per value and model for DARE's and DELLA's masks, and up
 * to 8 bytes per value besides (multislerp's float64 mean direction, DELLA's probabilities with
 * a mask, sce's variances and selection), never more than `tensorCost`. The read windows and
 * blocks are small and fixed.
 */
function chunkedCost(t: PlannedTensor): number {
  const n = numel(t.shape);
  return Math.min((byteSize(t.dtype, n) ?? 4 * n) + (t.inputs.length + 8) * n, tensorCost(t));
}

/** The stored bytes of a tensor's inputs. */
function inputBytes(t: PlannedTensor): number {
  let bytes = 0;
  for (const i of t.inputs) bytes += byteSize(i.dtype, numel(i.shape)) ?? 4 * numel(i.shape);
  return bytes;
}

/** Bytes of a streamed tensor's inputs read whole, as `InputPrefetcher` lays them out. */
function residentNeed(t: PlannedTensor): number {
  return t.inputs.length * slotBytes(numel(t.shape) * (byteSize(t.inputs[0]!.dtype, 1) ?? 4));
}

/** Whether a streamed tensor's inputs fit one of the two prefetch areas. */
function prefetchable(t: PlannedTensor, areas: PrefetchAreas): boolean {
  return residentNeed(t) <= areas.bytes;
}

interface StreamedReads {
  /** Input files read with O_DIRECT (mostly out of the page cache). */
  direct: Set<string>;
  /** With workers: their prefetch areas. */
  prefetch: PrefetchAreas | undefined;
  /** Inline: memory the kernel may hold for one tensor's inputs read whole. */
  residentBytes: number;
  /** What the tensors in flight may use: the budget less the memory set aside above. */
  flightBudget: number;
  /** Tensors read into the big area of the first worker. */
  big: Set<number>;
}

/**
 * How the streamed tensors' inputs are read, and the memory set aside for it.
 *
 * - Files mostly out of the page cache are read past it (O_DIRECT): filling the page cache costs
 *   more than the disk read on many machines, and each input is read once.
 * - A quarter of the budget holds inputs read whole (once): inline, one tensor's; with `workers`,
 *   two areas per worker, the next tensor's inputs read into one while the current one's are
 *   merged in the other.
 * - Tensors too large for those areas whose files are out of the page cache are read whole into a
 *   third area of the first worker, one at a time, where the budget has room for it on top of the
 *   areas and the costliest tensor in flight; otherwise they are read region by region, twice.
 *   From the page cache, reading twice costs less than holding the memory.
 */
function planStreamedReads(
  plan: MergePlan,
  streamed: ReadonlySet<number>,
  locate: (i: { model: string; tensor: string }) => { path: string },
  budget: number,
  workers: number,
  directReads: 'auto' | 'always' | 'never',
): StreamedReads {
  const direct = new Set<string>();
  const big = new Set<number>();
  const tensors = plan.tensors.filter((t) => streamed.has(t.index));
  if (tensors.length === 0) return { direct, prefetch: undefined, residentBytes: 0, flightBudget: budget, big };
  if (directIoEnabled() && directReads !== 'never') {
    const paths = new Set(tensors.flatMap((t) => t.inputs.map((i) => locate(i).path)));
    for (const p of paths) if (directReads === 'always' || looksUncached(p)) direct.add(p);
  }
  const reserve = Math.floor(budget / 4);
  if (workers === 0) return { direct, prefetch: undefined, residentBytes: reserve, flightBudget: budget - reserve, big };
  // Past the kernel's own memory for any tensor of the plan (streamed or not), so that no merge
  // in the worker can touch an area while the next inputs are read into it.
  const maxInputs = plan.tensors.reduce((m, t) => Math.max(m, t.inputs.length), 2);
  // A worker's kernel addresses at most KERNEL_MEMORY_MAX bytes: its scratch, the areas, the big one.
  const base = kernelRegionEnd(maxInputs);
  const room = KERNEL_MEMORY_MAX - base;
  const areaBytes = Math.floor(Math.min(reserve / (2 * workers), room / 2) / DIRECT_ALIGN) * DIRECT_ALIGN;
  const prefetch: PrefetchAreas = { base, bytes: areaBytes };
  let bigNeed = 0;
  let flightMax = 0;
  const candidates: PlannedTensor[] = [];
  for (const t of tensors) {
    flightMax = Math.max(flightMax, streamedCost(t));
    if (!prefetchable(t, prefetch) && t.inputs.every((i) => direct.has(locate(i).path))) {
      candidates.push(t);
      bigNeed = Math.max(bigNeed, residentNeed(t));
    }
  }
  let bigReserve = 0;
  if (bigNeed && reserve + bigNeed + flightMax <= budget && 2 * areaBytes + bigNeed <= room) {
    bigReserve = Math.ceil(bigNeed / DIRECT_ALIGN) * DIRECT_ALIGN;
    prefetch.big = bigReserve;
    for (const t of candidates) big.add(t.index);
  }
  return { direct, prefetch, residentBytes: 0, flightBudget: budget - reserve - bigReserve, big };
}

/** A Float32Array whose buffer can be transferred: offset 0 and the whole buffer. */
function transferable(a: Float32Array): Float32Array {
  return a.byteOffset === 0 && a.byteLength === a.buffer.byteLength && a.buffer instanceof ArrayBuffer ? a : a.slice();
}

async function openSources(plan: MergePlan, open: (path: string) => Promise<TensorSource>): Promise<Map<string, TensorSource>> {
  const used = new Set(plan.tensors.flatMap((t) => t.inputs.map((i) => i.model)));
  const out = new Map<string, TensorSource>();
  try {
    for (const m of plan.models) if (used.has(m.id)) out.set(m.id, m.adapter !== undefined ? await openAdaptedSource(await open(m.path), m.adapter, { baseLabel: m.id }) : await open(m.path));
  } catch (e) {
    await Promise.all([...out.values()].map((s) => s.close().catch(() => {})));
    throw e;
  }
  return out;
}

/** Checks that each input still has the dtype and shape the plan was made from. */
function checkInputs(plan: MergePlan, sources: Map<string, TensorSource>): void {
  for (const t of plan.tensors) {
    for (const i of t.inputs) {
      const src = sources.get(i.model)!;
      const info = src.has(i.tensor) ? src.info(i.tensor) : undefined;
      if (!info || info.dtype !== i.dtype || info.shape.length !== i.shape.length || info.shape.some((d, k) => d !== i.shape[k])) {
        throw new AmalgamError('E_SHAPE', `model ${i.model} changed since the merge was planned (${i.tensor})`, {
          key: t.name,
          hint: 'plan the merge again',
        });
      }
    }
  }
}

/** How many float16 values (bit patterns) in `bytes` are ±inf or NaN (exponent bits all set). */
export function nonFiniteF16(bytes: Uint8Array): number {
  const v = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >>> 1);
  let n = 0;
  for (let i = 0; i < v.length; i++) if ((v[i]! & 0x7c00) === 0x7c00) n++;
  return n;
}

/** The folders a merge reads: every model and every adapter applied to one. */
export function planInputs(plan: MergePlan): string[] {
  return plan.models.flatMap((m) => (m.adapter !== undefined ? [m.path, m.adapter] : [m.path]));
}

/**
 * Carries out a plan into `outDir`: weights (sharded safetensors plus index), config.json, the
 * model card, the configuration and the donor's tokenizer files. The folder appears under its
 * final name only when complete; an existing non-empty folder is replaced only with `overwrite`.
 */
export async function executeMerge(plan: MergePlan, outDir: string, opts: ExecuteOptions = {}): Promise<ExecuteResult> {
  const started = Date.now();
  const jobs = Math.max(1, Math.floor(opts.jobs ?? defaultJobs(plan)));
  const budget = opts.memoryBudget ?? plan.stats.memoryBound;
  const shardSize = opts.outShardSize === undefined ? 5e9 : opts.outShardSize > 0 ? opts.outShardSize : Number.MAX_SAFE_INTEGER;
  const signal = opts.signal;
  if (signal?.aborted) throw abortError(outDir);

  // Up to three tasks per worker: one computing, the next ones' inputs read meanwhile.
  const depth = 3;
  const pool = jobs > 1 ? new WorkerPool(jobs, depth) : undefined;
  pool?.warm();
  let sources: Map<string, TensorSource>;
  try {
    sources = await openSources(plan, opts.openSource ?? ((p) => openSafetensors(p)));
  } catch (e) {
    await pool?.close();
    throw e;
  }
  const warningsByTensor = new Map<number, string[]>();
  /** Per float16 tensor holding ±inf or NaN: its name and how many. */
  const overflowed = new Map<number, string>();
  let bytesRead = 0;
  let bytesWritten = 0;
  let done = 0;
  let peak = 0;
  let weightFiles: string[] = [];
  let otherFiles: string[] = [];
  const bar = opts.progressBar ? makeBar(plan) : undefined;
  // Tensors merged straight from their stored bytes: read chunk by chunk from their files by the
  // WebAssembly kernel (`streamed`), or read whole into reused buffers (`stored`).
  const stored = new Set<number>();
  const streamed = new Set<number>();
  const chunkedMethod = getMergeMethod(plan.method).mergeChunked !== undefined;
  // The other merged tensors with float inputs: read as stored into reused buffers and decoded by
  // the worker (not on this thread), the result encoded into a page-placed output buffer. The
  // stored copies are held beside the float32 ones, so the largest tensors (a quarter of the
  // budget or more, such as the embeddings) are read as float32 instead.
  const raw = new Set<number>();
  if ([...sources.values()].every(canReadRawInto)) {
    const round = plan.computeDtype === 'BF16' || plan.computeDtype === 'F16' ? plan.computeDtype : undefined;
    // The fused GTA kernel reads located inputs from their files itself (WebAssembly); methods
    // with `mergeChunked` read them a window at a time in any float dtype (chunked.ts).
    const wasmOk = wasmKernelsAvailable();
    for (const t of plan.tensors) {
      if (t.kind !== 'merge' || t.permutation || !storedInputsFit(plan.method, t)) continue;
      const located =
        (chunkedMethod || (wasmOk && wasmDtypesFit(t.inputs.map((i) => ({ dtype: i.dtype, round })), t.dtype))) &&
        t.inputs.every((i) => (sources.get(i.model) as RawIntoSource).locate(i.tensor) !== undefined);
      (located ? streamed : stored).add(t.index);
    }
    const float = (d: DType) => d === 'F32' || d === 'BF16' || d === 'F16';
    for (const t of plan.tensors) {
      if (t.kind !== 'merge' || t.permutation || stored.has(t.index) || streamed.has(t.index)) continue;
      if (float(t.dtype) && t.inputs.every((i) => float(i.dtype)) && rawCost(t) <= budget / 4) raw.add(t.index);
    }
  }
  const cost = (t: PlannedTensor) =>
    streamed.has(t.index)
      ? chunkedMethod
        ? chunkedCost(t)
        : streamedCost(t)
      : stored.has(t.index)
        ? chunkedMethod
          ? Math.min(inputBytes(t) + chunkedCost(t), rawCost(t))
          : storedCost(t)
        : raw.has(t.index)
          ? rawCost(t)
          : tensorCost(t);
  const locate = (i: { model: string; tensor: string }) => (sources.get(i.model) as RawIntoSource).locate(i.tensor)!;
  // Direct reads and read-ahead areas serve the fused kernel only.
  const io = planStreamedReads(plan, chunkedMethod ? new Set() : streamed, locate, budget, pool ? jobs : 0, opts.directReads ?? 'auto');
  const { direct, prefetch, residentBytes, big } = io;
  // Workers keep the float32 arrays of a tensor read as stored for the next one's inputs (see
  // `SpareArrays` in worker.ts): as many as a tensor has inputs, of the largest such tensor, set
  // aside from the budget, where that takes at most a quarter of it.
  let spareBytes = 0;
  if (pool && raw.size) {
    let largest = 0;
    let count = 0;
    for (const t of plan.tensors) {
      if (!raw.has(t.index)) continue;
      count = Math.max(count, t.inputs.length);
      for (const i of t.inputs) largest = Math.max(largest, numel(i.shape) * 4);
    }
    if (count * largest * jobs <= io.flightBudget / 4) spareBytes = count * largest;
  }
  const flightBudget = io.flightBudget - spareBytes * jobs;
  const buffers = new BufferPool();
  let inFlightCost = 0;

  try {
    checkInputs(plan, sources);
    await withStagingDir(
      outDir,
      async (stage) => {
        const writer = await ShardedSafetensorsWriter.create(
          stage.path,
          plan.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape })),
          { maxShardBytes: shardSize, metadata: { format: 'pt' }, indexMetadata: { amalgam_version: AMALGAM_VERSION }, directWrites: true },
        );
        try {
          /** Reads a tensor's inputs as stored into reused buffers; returns the bytes read. */
          const readStoredInputs = async (t: PlannedTensor, out: ComputeInput[]): Promise<number> => {
            let n = 0;
            const read = await Promise.all(
              t.inputs.map(async (i): Promise<ComputeInput> => {
                const bytes = byteSize(i.dtype, numel(i.shape))!;
                const data = new Uint8Array(buffers.take(bytes), 0, bytes);
                await (sources.get(i.model) as RawIntoSource).readRawInto(i.tensor, data);
                n += bytes;
                return { model: i.model, shape: i.shape, raw: data, dtype: i.dtype };
              }),
            );
            out.push(...read);
            return n;
          };
          const compute = async (t: PlannedTensor): Promise<{ bytes: Uint8Array; readBytes: number; reuse: (ArrayBuffer | SharedArrayBuffer)[] }> => {
            if (t.kind === 'copy') {
              const i = t.inputs.find((x) => x.model === t.base) ?? t.inputs[0]!;
              const raw = await sources.get(i.model)!.readRaw(i.tensor);
              return { bytes: raw, readBytes: raw.byteLength, reuse: [] };
            }
            const inputs: ComputeInput[] = [];
            let readBytes = 0;
            let outBuffer: ArrayBuffer | SharedArrayBuffer | undefined;
            let outOffset = 0;
            if (t.permutation) {
              readBytes = await readPermutedInputs(plan, t, sources, inputs);
            } else if (streamed.has(t.index)) {
              for (const i of t.inputs) {
                const loc = locate(i);
                readBytes += loc.length;
                inputs.push({ model: i.model, shape: i.shape, dtype: i.dtype, file: { path: loc.path, offset: loc.offset, ...(direct.has(loc.path) ? { direct: true } : {}) } });
              }
              buffers.trim(Math.max(0, flightBudget - inFlightCost));
              // Place the result at its file position modulo a page, so the writer can send its
              // whole pages straight to the disk.
              const phase = writer.writesDirect ? writer.positionOf(t.name) % DIRECT_ALIGN : 0;
              outOffset = phase % (byteSize(t.dtype, 1) ?? 4) === 0 ? phase : 0;
              outBuffer = buffers.takeShared(byteSize(t.dtype, numel(t.shape))! + outOffset);
            } else if (stored.has(t.index)) {
              buffers.trim(Math.max(0, flightBudget - inFlightCost));
              readBytes += await readStoredInputs(t, inputs);
              outBuffer = buffers.take(byteSize(t.dtype, numel(t.shape))!);
            } else if (raw.has(t.index)) {
              buffers.trim(Math.max(0, flightBudget - inFlightCost));
              readBytes += await readStoredInputs(t, inputs);
              const phase = writer.writesDirect ? writer.positionOf(t.name) % DIRECT_ALIGN : 0;
              outOffset = phase % (byteSize(t.dtype, 1) ?? 4) === 0 ? phase : 0;
              outBuffer = buffers.takeShared(byteSize(t.dtype, numel(t.shape))! + outOffset);
            } else {
              for (const i of t.inputs) {
                const data = transferable(await sources.get(i.model)!.readF32(i.tensor));
                if (data.length !== numel(i.shape)) {
                  throw new AmalgamError('E_SHAPE', `read ${data.length} values from model ${i.model}, expected ${numel(i.shape)}`, { key: t.name });
                }
                readBytes += byteSize(i.dtype, data.length) ?? 0;
                // `dtype`: the values are that dtype's, decoded exactly.
                inputs.push({ model: i.model, shape: i.shape, data, dtype: i.dtype });
              }
            }
            if (signal?.aborted) throw abortError(outDir);
            const task: ComputeTask = {
              id: t.index,
              tensorName: t.name,
              method: plan.method,
              isEmbed: t.isEmbed,
              isOptional: t.isOptional,
              base: t.base,
              params: t.params,
              inputs,
              computeDtype: plan.computeDtype,
              outDtype: t.dtype,
              outShape: t.shape,
              seed: plan.randomSeed,
              ...(outBuffer ? { outBuffer, outOffset } : {}),
              ...(streamed.has(t.index) && residentBytes ? { residentBytes } : {}),
              ...(streamed.has(t.index) && prefetch ? { prefetch } : {}),
              ...(spareBytes ? { spareBytes } : {}),
            };
            const transfer = inputs.flatMap((x) => (x.raw ?? x.data ? [(x.raw ?? x.data!).buffer as ArrayBuffer] : []));
            if (outBuffer instanceof ArrayBuffer) transfer.push(outBuffer);
            const pin = big.has(t.index) ? 0 : undefined;
            const result = pool ? await pool.run(task, transfer, pin) : computeTensor(task);
            if (outBuffer instanceof SharedArrayBuffer && result.bytes.buffer instanceof SharedArrayBuffer && result.bytes.buffer !== outBuffer) {
              // A result in the shared output buffer comes back from a worker as a view of another
              // SharedArrayBuffer object over the same memory: view the pooled (page-aligned) one.
              result.bytes = new Uint8Array(outBuffer, result.bytes.byteOffset, result.bytes.byteLength);
            }
            const overflow = t.dtype === 'F16' ? nonFiniteF16(result.bytes) : 0;
            if (overflow) overflowed.set(t.index, `${t.name} (${overflow} of ${result.bytes.byteLength / 2})`);
            // The plan has already said, with the vocab_size it sets, that an embedding is cut to
            // the common submatrix; the method says it again when it cuts.
            result.warnings = result.warnings.filter((w) => !w.startsWith(`${t.name}: using the common submatrix `));
            if (result.warnings.length) {
              warningsByTensor.set(t.index, result.warnings);
              for (const w of result.warnings) opts.onWarning?.(w);
            }
            const reuse: (ArrayBuffer | SharedArrayBuffer)[] = (result.buffers ?? []).filter((b) => b instanceof ArrayBuffer);
            if (outBuffer instanceof SharedArrayBuffer) reuse.push(outBuffer);
            else if (outBuffer) reuse.push(result.bytes.buffer as ArrayBuffer);
            return { bytes: result.bytes, readBytes, reuse };
          };

          await schedule(plan.tensors, {
            // A tensor stays in flight while it is written: room for the next ones to compute meanwhile.
            concurrency: pool ? (depth + 1) * jobs + 1 : 3,
            // The big area holds one tensor's inputs: one such tensor in flight at a time, so the
            // others do not hold places while they wait for it.
            ...(big.size ? { exclusive: { is: (t: PlannedTensor) => big.has(t.index), max: 1 } } : {}),
            budget: flightBudget,
            cost,
            signal,
            outDir,
            onPeak: (b) => (peak = Math.max(peak, b)),
            run: async (t) => {
              inFlightCost += cost(t);
              let result;
              try {
                result = await compute(t);
                await writer.write(t.name, result.bytes);
              } finally {
                inFlightCost -= cost(t);
              }
              const { bytes, readBytes } = result;
              for (const b of result.reuse) buffers.give(b);
              buffers.trim(Math.max(0, flightBudget - inFlightCost));
              bytesRead += readBytes;
              bytesWritten += bytes.byteLength;
              done++;
              const p: MergeProgress = {
                done,
                total: plan.tensors.length,
                tensor: t.name,
                bytesRead,
                bytesWritten,
                totalReadBytes: plan.stats.readBytes,
                totalWriteBytes: plan.stats.writeBytes,
                elapsedMs: Date.now() - started,
              };
              bar?.update(p);
              opts.onProgress?.(p);
            },
          });
          const res = await writer.finish();
          weightFiles = res.indexFile ? [...res.files, basename(res.indexFile)] : res.files;
        } catch (e) {
          await writer.abort();
          throw e;
        }
        otherFiles = await writeOutputFiles(plan, stage.path, {
          writeModelCard: opts.writeModelCard ?? true,
          name: basename(stage.target),
        });
        if (signal?.aborted) throw abortError(outDir);
      },
      { overwrite: opts.overwrite, inputs: planInputs(plan) },
    );
  } finally {
    bar?.stop();
    await pool?.close();
    await Promise.all([...sources.values()].map((s) => s.close().catch(() => {})));
  }

  const warnings = [...warningsByTensor.entries()].sort((a, b) => a[0] - b[0]).flatMap(([, w]) => w);
  if (overflowed.size) {
    const names = [...overflowed.entries()].sort((a, b) => a[0] - b[0]).map(([, s]) => s);
    const shown = names.slice(0, 5).join(', ') + (names.length > 5 ? ` and ${names.length - 5} more` : '');
    const w = `${names.length} tensor${names.length === 1 ? '' : 's'} hold ±inf or NaN in float16, whose largest finite magnitude is 65504: ${shown}; write bfloat16 or float32 (out_dtype) to keep them finite`;
    warnings.push(w);
    opts.onWarning?.(w);
  }
  return {
    outDir,
    files: [...weightFiles, ...otherFiles],
    weightFiles,
    tensors: plan.tensors.length,
    bytesRead,
    bytesWritten,
    elapsedMs: Date.now() - started,
    jobs,
    memoryBudget: budget,
    peakInFlightBytes: peak,
    warnings,
    reads: { directFiles: direct.size, areaBytes: prefetch?.bytes ?? 0, bigTensors: big.size, bigAreaBytes: prefetch?.big ?? 0, setAsideBytes: budget - flightBudget },
  };
}

/**
 * Reads the inputs of an embedding merged on a built vocabulary and appends each one's matrix,
 * permuted onto the output vocabulary (merge-methods.md §5), to `out`. A model's matrix is read
 * when first needed and dropped after its last use. Returns the bytes read.
 */
async function readPermutedInputs(plan: MergePlan, t: PlannedTensor, sources: Map<string, TensorSource>, out: ComputeInput[]): Promise<number> {
  if (!plan.tokenizer) {
    throw new AmalgamError('E_CONFIG', 'the plan permutes this embedding but has no output vocabulary', { key: t.name, hint: 'plan the merge again' });
  }
  const perm = embeddingPermutation(t, plan.tokenizer.tokens);
  const byModel = new Map(t.inputs.map((i) => [i.model, i] as const));
  const needs = t.inputs.map((i) => permutedEmbeddingSources(perm, i.model));
  const lastUse = new Map<string, number>();
  needs.forEach((models, k) => models.forEach((m) => lastUse.set(m, k)));
  const matrices = new Map<string, EmbeddingMatrix>();
  let readBytes = 0;
  for (const [k, i] of t.inputs.entries()) {
    for (const m of needs[k]!) {
      if (matrices.has(m)) continue;
      const src = byModel.get(m);
      if (!src) throw new AmalgamError('E_MISSING', `the permutation takes rows of model ${m}, which is not an input of this tensor`, { key: t.name });
      const data = await sources.get(m)!.readF32(src.tensor);
      if (data.length !== numel(src.shape)) {
        throw new AmalgamError('E_SHAPE', `read ${data.length} values from model ${m}, expected ${numel(src.shape)}`, { key: t.name });
      }
      readBytes += byteSize(src.dtype, data.length) ?? 0;
      matrices.set(m, { data, shape: src.shape });
    }
    out.push({ model: i.model, shape: t.shape.slice(), data: transferable(buildPermutedEmbedding(perm, i.model, matrices)) });
    for (const m of needs[k]!) if (lastUse.get(m) === k) matrices.delete(m);
  }
  return readBytes;
}

interface ScheduleOptions {
  concurrency: number;
  budget: number;
  cost: (t: PlannedTensor) => number;
  signal: AbortSignal | undefined;
  outDir: string;
  onPeak: (bytes: number) => void;
  run: (t: PlannedTensor) => Promise<void>;
  /**
   * Tensors of which at most `max` may be in flight at once; while that many are, later tensors
   * start ahead of the next such one.
   */
  exclusive?: { is: (t: PlannedTensor) => boolean; max: number };
}

/**
 * Runs tensors with at most `concurrency` in flight and their summed cost within `budget` (a
 * tensor that alone exceeds it runs alone), the costliest first (ties in plan order), so the
 * largest tensors overlap each other and the small ones fill in at the end. The first error stops
 * admission; it is rethrown once everything in flight has settled.
 */
async function schedule(planned: readonly PlannedTensor[], o: ScheduleOptions): Promise<void> {
  const costs = planned.map((t) => o.cost(t));
  const pending = planned.map((t, i) => ({ t, c: costs[i]!, i })).sort((a, b) => b.c - a.c || a.i - b.i).map((x) => x.t);
  let exclusiveInFlight = 0;
  const isExclusive = (t: PlannedTensor) => o.exclusive !== undefined && o.exclusive.is(t);
  /** The first pending tensor allowed to start now: the next one, or the next one not exclusive. */
  const pick = (): number => {
    if (!o.exclusive || exclusiveInFlight < o.exclusive.max) return pending.length ? 0 : -1;
    return pending.findIndex((t) => !isExclusive(t));
  };
  let inFlight = 0;
  let running = 0;
  let failure: unknown;
  let wake: (() => void) | undefined;
  const onAbort = () => {
    failure ??= abortError(o.outDir);
    wake?.();
  };
  o.signal?.addEventListener('abort', onAbort);
  try {
    while (true) {
      if (o.signal?.aborted) failure ??= abortError(o.outDir);
      while (failure === undefined && running < o.concurrency) {
        const k = pick();
        if (k < 0) break;
        const t = pending[k]!;
        const cost = o.cost(t);
        if (running > 0 && inFlight + cost > o.budget) break;
        pending.splice(k, 1);
        const exclusive = isExclusive(t);
        if (exclusive) exclusiveInFlight++;
        running++;
        inFlight += cost;
        o.onPeak(inFlight);
        void o
          .run(t)
          .catch((e) => {
            failure ??= e;
          })
          .finally(() => {
            running--;
            if (exclusive) exclusiveInFlight--;
            inFlight -= cost;
            wake?.();
          });
      }
      if (running === 0 && (failure !== undefined || pending.length === 0)) break;
      await new Promise<void>((r) => (wake = r));
      wake = undefined;
    }
  } finally {
    o.signal?.removeEventListener('abort', onAbort);
  }
  if (failure !== undefined) throw failure;
}
