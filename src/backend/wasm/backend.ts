/**
 * The WebAssembly backend: matmul runs in the SIMD GEMM kernel of assembly/gemm.ts on every
 * core (worker threads over one shared WebAssembly.Memory); the memory-bound ops run in
 * TypeScript on the calling thread (ElementwiseOps).
 *
 * matmul copies its operands into the shared memory, runs, and copies the result back. Results
 * are bitwise identical whatever the thread count: each output element is summed in the same
 * order however the output is split between threads.
 */
import { availableParallelism } from 'node:os';
import { AmalgamError } from '../../errors.js';
import {
  type Backend,
  type BatchedMatmulOptions,
  type MatmulOptions,
  type MatmulPlan,
  planMatmul,
} from '../backend.js';
import { ElementwiseOps } from '../elementwise.js';
import { gemmModule } from './module.js';
import { type GemmArgs, GemmPool } from './pool.js';
import { type WasmMemory, wasm } from './wasm-api.js';

export interface WasmBackendOptions {
  /** Threads for matmul, the calling thread included. Default: os.availableParallelism(). */
  threads?: number;
  /**
   * Matmuls with fewer flops (2·batch·M·N·K) than this run on the calling thread alone.
   * Default 2^21 (about 50 µs of single-thread work, well above the cost of waking workers).
   */
  parallelThreshold?: number;
}

const PAGE = 65536;
const MAX_PAGES = 65536;
/** Byte address of the work descriptor (the bytes below it stay unused). */
const DESC = 64;
/** Register-block sizes of the kernel, used to align the work split. */
const MR = 2;
const NR = 16;
/** Chunks per thread of a split job: more balance the load, fewer pack less. */
const CHUNKS_PER_THREAD = 2;

function align64(n: number): number {
  return Math.ceil(n / 64) * 64;
}

export class WasmBackend extends ElementwiseOps implements Backend {
  readonly name = 'wasm';
  /** Threads matmul uses (fewer than requested if workers could not start). */
  readonly threads: number;
  private readonly memory: WasmMemory;
  private readonly pool: GemmPool;
  private readonly arena: number;
  private readonly parallelThreshold: number;
  private heap: Float32Array;
  private disposed = false;

  constructor(opts: WasmBackendOptions = {}) {
    super();
    const requested = opts.threads ?? availableParallelism();
    if (!Number.isSafeInteger(requested) || requested < 1) {
      throw new AmalgamError('E_USAGE', `threads must be a positive integer, got ${requested}`);
    }
    this.parallelThreshold = opts.parallelThreshold ?? 2 ** 21;
    const module = gemmModule();
    const probe = new wasm.Instance(module, {
      env: { memory: new wasm.Memory({ initial: 1, maximum: 1, shared: true }) },
    });
    const scratchBytes = align64((probe.exports.gemmScratchBytes as () => number)());
    const descBytes = (probe.exports.workDescriptorBytes as () => number)();
    const scratch0 = align64(DESC + descBytes);
    const scratch = Array.from({ length: requested }, (_, t) => scratch0 + t * scratchBytes);
    this.arena = scratch0 + requested * scratchBytes;
    this.memory = new wasm.Memory({
      initial: Math.ceil((this.arena + 16 * 2 ** 20) / PAGE),
      maximum: MAX_PAGES,
      shared: true,
    });
    this.heap = new Float32Array(this.memory.buffer);
    this.pool = new GemmPool(module, this.memory, DESC, scratch);
    this.threads = this.pool.threads;
    // Let the engine tier the kernel up before the first real call.
    this.warmUp();
  }

  matmul(
    a: Float32Array,
    b: Float32Array,
    out: Float32Array,
    M: number,
    K: number,
    N: number,
    opts?: MatmulOptions,
  ): void {
    this.run(planMatmul('matmul', a, b, out, 1, M, K, N, opts), a, b, out);
  }

  matmulBatched(
    a: Float32Array,
    b: Float32Array,
    out: Float32Array,
    batch: number,
    M: number,
    K: number,
    N: number,
    opts?: BatchedMatmulOptions,
  ): void {
    this.run(planMatmul('matmulBatched', a, b, out, batch, M, K, N, opts), a, b, out);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.pool.dispose();
  }

  private run(p: MatmulPlan, a: Float32Array, b: Float32Array, out: Float32Array): void {
    if (this.disposed) throw new AmalgamError('E_USAGE', 'WasmBackend used after dispose()');
    const { batch, M, N, K } = p;
    if (batch === 0 || M === 0 || N === 0) return;
    if (K === 0) {
      if (!p.accumulate) forEachOutputRow(p, (o) => out.fill(0, o, o + N));
      return;
    }
    const offA = this.arena;
    const offB = align64(offA + p.extentA * 4);
    const offC = align64(offB + p.extentB * 4);
    this.ensure(offC + p.extentC * 4);
    const heap = this.heap;
    heap.set(a.subarray(0, p.extentA), offA >>> 2);
    heap.set(b.subarray(0, p.extentB), offB >>> 2);
    const denseC = p.extentC === batch * M * N;
    if (p.accumulate) heap.set(out.subarray(0, p.extentC), offC >>> 2);

    const args: GemmArgs = [
      0, batch * M, 0, N, M, N, K,
      offA, p.sai, p.sak, p.strideA,
      offB, p.sbk, p.sbj, p.strideB,
      offC, p.ldc, p.strideC,
      p.alpha, p.accumulate ? 1 : 0,
    ];
    if (this.threads === 1 || 2 * batch * M * N * K < this.parallelThreshold) {
      this.pool.runHere(args);
    } else {
      // Split the larger of the stacked output rows and the columns.
      const rows = batch * M;
      const byRows = rows >= N;
      const unit = byRows ? MR : NR;
      const units = Math.ceil((byRows ? rows : N) / unit);
      this.pool.runSplit(args, { byRows, unit, chunks: Math.min(units, this.threads * CHUNKS_PER_THREAD) });
    }

    if (denseC) {
      out.set(heap.subarray(offC >>> 2, (offC >>> 2) + p.extentC));
    } else {
      const c0 = offC >>> 2;
      forEachOutputRow(p, (o) => out.set(heap.subarray(c0 + o, c0 + o + N), o));
    }
  }

  /** Grows the shared memory to at least `bytes`. */
  private ensure(bytes: number): void {
    const have = this.memory.buffer.byteLength;
    if (bytes > have) {
      // Grow in steps of 16 MiB so that slowly growing operands do not grow it every call.
      const target = Math.min(MAX_PAGES, Math.ceil(bytes / (256 * PAGE)) * 256);
      const pages = Math.max(target - have / PAGE, Math.ceil((bytes - have) / PAGE));
      if (have / PAGE + pages > MAX_PAGES) {
        throw new AmalgamError('E_UNSUPPORTED', `matmul needs ${bytes} bytes of WebAssembly memory, over the 4 GiB limit`, {
          hint: 'split the operation into smaller batches',
        });
      }
      this.memory.grow(pages);
    }
    if (this.heap.buffer.byteLength !== this.memory.buffer.byteLength) {
      this.heap = new Float32Array(this.memory.buffer);
    }
  }

  private warmUp(): void {
    const n = 64;
    const a = new Float32Array(n * n).fill(1);
    const c = new Float32Array(n * n);
    for (let i = 0; i < 40; i++) {
      this.matmul(a, a, c, n, n, n);
      this.matmul(a, a, c, n, n, n, { transA: true });
      this.matmul(a, a, c, n, n, n, { transB: true });
    }
  }
}

/** Calls f with the offset of every output row in `out`. */
function forEachOutputRow(p: MatmulPlan, f: (offset: number) => void): void {
  for (let t = 0; t < p.batch; t++) {
    for (let i = 0; i < p.M; i++) f(t * p.strideC + i * p.ldc);
  }
}
