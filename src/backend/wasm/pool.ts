/**
 * Worker threads that run the GEMM kernel over one shared WebAssembly.Memory.
 *
 * Every worker instantiates the same module on the same shared memory. A job is a work
 * descriptor in that memory (see `gemmWork` in assembly/gemm.ts) split into a few chunks; the
 * calling thread publishes it, wakes the workers through a sequence number in a small control
 * block, and claims chunks itself like any worker. Chunks are claimed dynamically, so a worker
 * that is slow to wake (or busy elsewhere) only means the others run more of them. The caller
 * then blocks (Atomics.wait is allowed on Node's main thread) until every chunk is done, so each
 * op stays synchronous for its caller.
 *
 * Workers are unref'd: an idle pool never keeps the process alive.
 */
import { Worker } from 'node:worker_threads';
import { type WasmMemory, type WasmModule, wasm } from './wasm-api.js';

/** Control block layout (Int32 indices). */
const SEQ = 0;
const QUIT = 1;
const ERRORS = 2;
const READY = 3;
const FAILED = 4;
const CONTROL_INTS = 8;

/** Descriptor layout (byte offsets, see assembly/gemm.ts). */
const D_NEXT = 0;
const D_DONE = 4;
const D_CHUNKS = 8;
const D_BY_ROWS = 12;
const D_TOTAL = 16;
const D_UNIT = 20;
const D_ARGS = 32;

/** Job control block of the kernel module's jobs (Int32 indices). */
const J_NEXT = 0;
const J_COUNT = 1;
const J_DONE = 2;
const J_KIND = 3;
const J_DESC = 4;
const JOB_INTS = 8;

/** Atomics.load polls before a worker or the caller falls back to Atomics.wait. */
const SPIN = 20_000;

/** Milliseconds to wait for workers to start before running without them. */
const START_TIMEOUT_MS = 10_000;

/** Arguments of the exported `gemm` function, without the trailing scratch pointer. */
export type GemmArgs = [
  r0: number,
  r1: number,
  n0: number,
  n1: number,
  M: number,
  N: number,
  K: number,
  a: number,
  sai: number,
  sak: number,
  bsa: number,
  b: number,
  sbk: number,
  sbj: number,
  bsb: number,
  c: number,
  ldc: number,
  bsc: number,
  alpha: number,
  accumulate: number,
];

const ALPHA_INDEX = 18;

/** How a job is cut into chunks: along rows (r0..r1) or columns (n0..n1), in multiples of unit. */
export interface Split {
  byRows: boolean;
  unit: number;
  chunks: number;
}

const WORKER_SOURCE = `
'use strict';
const { workerData } = require('node:worker_threads');
const { module, kernels, memory, control, jobs, desc, scratch, thread } = workerData;
const ctl = new Int32Array(control);
const jc = new Int32Array(jobs);
const mem32 = new Int32Array(memory.buffer, desc, ${D_ARGS >> 2});
let work = null;
let job = null;
try {
  work = new WebAssembly.Instance(module, { env: { memory } }).exports.gemmWork;
  if (kernels) job = new WebAssembly.Instance(kernels, { env: { memory } }).exports.job;
} catch (e) {
  work = null;
  Atomics.add(ctl, ${FAILED}, 1);
}
// Claims and runs kernel jobs published under this tag (none when the tag is another job's).
function runJobs(tag) {
  if (job === null) return;
  for (;;) {
    const v = Atomics.load(jc, ${J_NEXT});
    if ((v & 0xffff0000) !== tag) return;
    const idx = v & 0xffff;
    const count = Atomics.load(jc, ${J_COUNT});
    if (idx >= count) return;
    if (Atomics.compareExchange(jc, ${J_NEXT}, v, v + 1) !== v) continue;
    try {
      job(Atomics.load(jc, ${J_KIND}), idx, Atomics.load(jc, ${J_DESC}), thread);
    } catch (e) {
      Atomics.add(ctl, ${ERRORS}, 1);
    }
    if (Atomics.add(jc, ${J_DONE}, 1) + 1 === count) Atomics.notify(jc, ${J_DONE});
  }
}
Atomics.add(ctl, ${READY}, 1);
Atomics.notify(ctl, ${READY});
let seen = 0;
while (work !== null) {
  let s = Atomics.load(ctl, ${SEQ});
  for (let i = 0; s === seen && i < ${SPIN}; i++) s = Atomics.load(ctl, ${SEQ});
  while (s === seen) {
    Atomics.wait(ctl, ${SEQ}, seen);
    s = Atomics.load(ctl, ${SEQ});
  }
  seen = s;
  if (Atomics.load(ctl, ${QUIT}) !== 0) break;
  const tag = ((s % 0x7fff) + 1) << 16;
  try {
    work(desc, tag, scratch);
  } catch (e) {
    // A trap inside a claimed chunk: count it as done so that the caller wakes, and report it.
    Atomics.add(ctl, ${ERRORS}, 1);
    Atomics.add(mem32, ${D_DONE >> 2}, 1);
    Atomics.notify(mem32, ${D_DONE >> 2});
  }
  runJobs(tag);
}
`;

type GemmFn = (...args: [...GemmArgs, number]) => void;
type WorkFn = (desc: number, tag: number, scratch: number) => number;
/** The kernel module's entry point: job(kind, index, desc, thread). */
export type JobFn = (kind: number, index: number, desc: number, thread: number) => void;

export class GemmPool {
  /** Threads that can take part in a job, the calling thread included. */
  readonly threads: number;
  private readonly workers: Worker[] = [];
  private readonly ctl: Int32Array;
  private readonly gemm: GemmFn;
  private readonly work: WorkFn;
  private readonly desc: number;
  private readonly scratch0: number;
  private readonly descI32: Int32Array;
  private readonly descF32: Float32Array;
  private readonly jc: Int32Array;
  private readonly job: JobFn | null;
  private seq = 0;
  private disposed = false;

  /**
   * Starts `scratch.length − 1` workers (falling back to none if they cannot start).
   * `desc` is the byte address of the work descriptor; `scratch[t]` that of thread t's scratch.
   * With `kernels` (the module of ./kernels.ts), `runJobs` runs its jobs on the same threads.
   */
  constructor(module: WasmModule, memory: WasmMemory, desc: number, scratch: number[], kernels: WasmModule | null = null) {
    const instance = new wasm.Instance(module, { env: { memory } });
    this.gemm = instance.exports.gemm as GemmFn;
    this.work = instance.exports.gemmWork as WorkFn;
    this.job = kernels ? (new wasm.Instance(kernels, { env: { memory } }).exports.job as JobFn) : null;
    const jobs = new SharedArrayBuffer(JOB_INTS * 4);
    this.jc = new Int32Array(jobs);
    this.desc = desc;
    this.scratch0 = scratch[0]!;
    this.descI32 = new Int32Array(memory.buffer, desc, 32);
    this.descF32 = new Float32Array(memory.buffer, desc, 32);
    const control = new SharedArrayBuffer(CONTROL_INTS * 4);
    this.ctl = new Int32Array(control);
    const threads = scratch.length;
    let started = 1;
    if (threads > 1) {
      try {
        for (let w = 1; w < threads; w++) {
          const worker = new Worker(WORKER_SOURCE, {
            eval: true,
            execArgv: [],
            workerData: { module, kernels, memory, control, jobs, desc, scratch: scratch[w], thread: w },
          });
          worker.unref();
          // A failing worker shows up as FAILED (at start) or ERRORS (in a job).
          worker.on('error', () => {});
          this.workers.push(worker);
        }
        const deadline = Date.now() + START_TIMEOUT_MS;
        let ready = Atomics.load(this.ctl, READY);
        while (ready < this.workers.length && Date.now() < deadline) {
          Atomics.wait(this.ctl, READY, ready, 50);
          ready = Atomics.load(this.ctl, READY);
        }
        if (ready === this.workers.length && Atomics.load(this.ctl, FAILED) === 0) started = threads;
      } catch {
        started = 1;
      }
      if (started === 1) this.stopWorkers();
    }
    this.threads = started;
  }

  /** Runs the whole job on the calling thread. */
  runHere(args: GemmArgs): void {
    this.checkLive();
    this.gemm(...args, this.scratch0);
  }

  /** Runs the job split into chunks over the calling thread and the workers. */
  runSplit(args: GemmArgs, split: Split): void {
    this.checkLive();
    if (this.workers.length === 0 || split.chunks <= 1) {
      this.gemm(...args, this.scratch0);
      return;
    }
    const d = this.descI32;
    const total = split.byRows ? args[1] - args[0] : args[3] - args[2];
    // Withdraw the previous job first: a worker still looping on it, which read its tag and then
    // this job's chunk count, must not claim a chunk (and count it done) before this job is set up.
    Atomics.store(d, D_NEXT >> 2, 0);
    d[D_DONE >> 2] = 0;
    Atomics.store(d, D_CHUNKS >> 2, split.chunks);
    d[D_BY_ROWS >> 2] = split.byRows ? 1 : 0;
    d[D_TOTAL >> 2] = total;
    d[D_UNIT >> 2] = split.unit;
    for (let i = 0; i < args.length; i++) {
      if (i === ALPHA_INDEX) this.descF32[(D_ARGS >> 2) + i] = args[i]!;
      else d[(D_ARGS >> 2) + i] = args[i]!;
    }
    this.seq = (this.seq + 1) | 0;
    const tag = ((this.seq % 0x7fff) + 1) << 16;
    // Publishing the tag makes the chunks claimable; the sequence number wakes the workers.
    Atomics.store(d, D_NEXT >> 2, tag);
    Atomics.store(this.ctl, SEQ, this.seq);
    Atomics.notify(this.ctl, SEQ);
    let error: unknown;
    try {
      this.work(this.desc, tag, this.scratch0);
    } catch (e) {
      error = e;
      Atomics.add(d, D_DONE >> 2, 1);
    }
    const chunks = split.chunks;
    let done = Atomics.load(d, D_DONE >> 2);
    for (let i = 0; done < chunks && i < SPIN; i++) done = Atomics.load(d, D_DONE >> 2);
    while (done < chunks) {
      Atomics.wait(d, D_DONE >> 2, done);
      done = Atomics.load(d, D_DONE >> 2);
    }
    if (error !== undefined) throw error;
    const errors = Atomics.exchange(this.ctl, ERRORS, 0);
    if (errors > 0) throw new Error(`GemmPool: ${errors} worker(s) failed a GEMM chunk`);
  }

  /** Whether the kernel module is loaded (runJobs is available). */
  get hasKernels(): boolean {
    return this.job !== null;
  }

  /**
   * Runs jobs 0 … count−1 (count < 65536) of the kernel operation `kind` described at byte
   * address `desc`, on the calling thread and the workers; returns when all are done. With
   * `parallel` false, or no workers, the calling thread runs them all.
   */
  runJobs(kind: number, count: number, desc: number, parallel = true): void {
    this.checkLive();
    const job = this.job;
    if (job === null) throw new Error('GemmPool: no kernel module');
    if (count <= 0) return;
    if (count >= 0x10000) throw new Error(`GemmPool: ${count} jobs in one call`);
    if (this.workers.length === 0 || count === 1 || !parallel) {
      for (let i = 0; i < count; i++) job(kind, i, desc, 0);
      return;
    }
    const jc = this.jc;
    // As in gemm: withdraw the previous jobs before describing these.
    Atomics.store(jc, J_NEXT, 0);
    Atomics.store(jc, J_COUNT, count);
    jc[J_KIND] = kind;
    jc[J_DESC] = desc;
    jc[J_DONE] = 0;
    this.seq = (this.seq + 1) | 0;
    const tag = ((this.seq % 0x7fff) + 1) << 16;
    Atomics.store(jc, J_NEXT, tag);
    Atomics.store(this.ctl, SEQ, this.seq);
    Atomics.notify(this.ctl, SEQ);
    let error: unknown;
    for (;;) {
      const v = Atomics.load(jc, J_NEXT);
      const idx = v & 0xffff;
      if (idx >= count) break;
      if (Atomics.compareExchange(jc, J_NEXT, v, v + 1) !== v) continue;
      try {
        job(kind, idx, desc, 0);
      } catch (e) {
        error ??= e;
      }
      Atomics.add(jc, J_DONE, 1);
    }
    let done = Atomics.load(jc, J_DONE);
    for (let i = 0; done < count && i < SPIN; i++) done = Atomics.load(jc, J_DONE);
    while (done < count) {
      Atomics.wait(jc, J_DONE, done);
      done = Atomics.load(jc, J_DONE);
    }
    if (error !== undefined) throw error;
    const errors = Atomics.exchange(this.ctl, ERRORS, 0);
    if (errors > 0) throw new Error(`GemmPool: ${errors} worker(s) failed a kernel job`);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.stopWorkers();
  }

  private checkLive(): void {
    if (this.disposed) throw new Error('GemmPool: used after dispose()');
  }

  private stopWorkers(): void {
    Atomics.store(this.ctl, QUIT, 1);
    this.seq = (this.seq + 1) | 0;
    Atomics.store(this.ctl, SEQ, this.seq);
    Atomics.notify(this.ctl, SEQ);
    for (const w of this.workers) void w.terminate();
    this.workers.length = 0;
  }
}
