/**
 * The WebAssembly backend: matmul runs in the SIMD GEMM kernel of assembly/gemm.ts on every
 * core (worker threads over one shared WebAssembly.Memory); fused attention and softmax
 * cross-entropy run in the SIMD kernels of ./kernels.ts on the same threads; the other
 * memory-bound ops run in TypeScript on the calling thread (ElementwiseOps).
 *
 * Each op copies its operands into the shared memory, runs, and copies the results back.
 * Results are bitwise identical whatever the thread count: each output element is computed in
 * the same order however the work is split between threads.
 */
import { availableParallelism } from 'node:os';
import { AmalgamError } from '../../errors.js';
import { composedAttention, composedAttentionBackward } from '../attention.js';
import {
  type AttentionOptions,
  type AttentionPlan,
  type Backend,
  type BatchedMatmulOptions,
  type CrossEntropyOptions,
  type MatmulOptions,
  type MatmulPlan,
  checkCrossEntropy,
  checkDims,
  checkLength,
  checkRope,
  planAttention,
  planMatmul,
} from '../backend.js';
import { ElementwiseOps } from '../elementwise.js';
import {
  ADD,
  ATTN,
  KIND_ADD,
  KIND_ATTENTION_BACKWARD,
  KIND_ATTENTION_FORWARD,
  KIND_CROSS_ENTROPY,
  KIND_RMSNORM,
  KIND_RMSNORM_BACKWARD,
  KIND_ROPE,
  KIND_SWIGLU,
  KIND_SWIGLU_BACKWARD,
  NORM,
  ROPE,
  SLACK_BYTES,
  SWIGLU,
  XENT,
  attentionScratchBytes,
  kernelModule,
  padKeys,
} from './kernels.js';
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
/** Large jobs get up to this many chunks per thread, of at least CHUNK_FLOPS each, so that a thread descheduled by another process holds back little. */
const MAX_CHUNKS_PER_THREAD = 16;
const CHUNK_FLOPS = 5e7;
/** Output columns per kernel call (wider packed panels of B fall out of L2). */
const MAX_COLUMNS = 512;

function align64(n: number): number {
  return Math.ceil(n / 64) * 64;
}

/** Elementwise ops shorter than this stay in TypeScript (the copies and the wake-up would cost more). */
const ELEMENTWISE_MIN = 4096;

/** Rows per job of rmsnormBackward: fixed, so that its partial sums do not depend on the thread count. */
const NORM_BACKWARD_ROWS = 32;

function normRowsPerJob(rows: number, dim: number): number {
  return Math.max(1, Math.ceil(ELEMENTWISE_MIN / Math.max(1, dim)), Math.ceil(rows / 0xffff));
}

function checkElementwise(op: string, n: number, arrays: Float32Array[]): void {
  checkDims(op, { n });
  for (const a of arrays) checkLength(op, 'argument', a, n);
}

/** Resident buffers may take up to this much of the 4 GiB memory; beyond it `allocate` hands out plain arrays. */
const RESIDENT_LIMIT = 2 ** 31;

/** Space of one call's staged operands, above the resident buffers. */
class Staging {
  constructor(public at: number) {}

  /** Byte address of `bytes` more (plus slack for partial vector reads). */
  take(bytes: number): number {
    const off = this.at;
    this.at = align64(off + bytes + SLACK_BYTES);
    return off;
  }
}

export class WasmBackend extends ElementwiseOps implements Backend {
  readonly name = 'wasm';
  /** Threads matmul uses (fewer than requested if workers could not start). */
  readonly threads: number;
  private readonly memory: WasmMemory;
  private readonly pool: GemmPool;
  /** First byte after the descriptors and the per-thread GEMM scratch. */
  private readonly base: number;
  private readonly parallelThreshold: number;
  private heap: Float32Array;
  private heapI32: Int32Array;
  private heapF64: Float64Array;
  /** Every buffer object the memory has had (a grown shared memory hands out a new one). */
  private readonly buffers = new Set<ArrayBufferLike>();
  /** Resident buffers: byte address → bytes, the free gaps between them, and their end. */
  private readonly blocks = new Map<number, number>();
  private free: { off: number; bytes: number }[] = [];
  private residentTop: number;
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
    this.base = scratch0 + requested * scratchBytes;
    this.residentTop = this.base;
    this.memory = new wasm.Memory({
      initial: Math.ceil((this.base + 16 * 2 ** 20) / PAGE),
      maximum: MAX_PAGES,
      shared: true,
    });
    this.heap = new Float32Array(this.memory.buffer);
    this.heapI32 = new Int32Array(this.memory.buffer);
    this.heapF64 = new Float64Array(this.memory.buffer);
    this.buffers.add(this.memory.buffer);
    let kernels = null;
    try {
      kernels = kernelModule();
    } catch {
      kernels = null;
    }
    this.pool = new GemmPool(module, this.memory, DESC, scratch, kernels);
    this.threads = this.pool.threads;
    // Let the engine tier the kernel up before the first real call.
    this.warmUp();
  }

  /**
   * A zeroed buffer of n floats inside the WebAssembly memory: ops read and write it in place
   * instead of copying it in and out. Past the resident limit it is an ordinary array.
   */
  allocate(n: number): Float32Array {
    this.checkLive();
    checkDims('allocate', { n });
    const bytes = align64(n * 4 + SLACK_BYTES);
    let off = -1;
    const i = this.free.findIndex((f) => f.bytes >= bytes);
    if (i >= 0) {
      const f = this.free[i]!;
      off = f.off;
      if (f.bytes === bytes) this.free.splice(i, 1);
      else {
        f.off += bytes;
        f.bytes -= bytes;
      }
    } else {
      if (this.residentTop + bytes > RESIDENT_LIMIT) return new Float32Array(n);
      off = this.residentTop;
      this.ensure(off + bytes);
      this.residentTop = off + bytes;
    }
    this.blocks.set(off, bytes);
    const view = new Float32Array(this.memory.buffer, off, n);
    view.fill(0);
    return view;
  }

  /** Whether `a` lies in this backend's WebAssembly memory (from `allocate`), so that ops can use it in place. */
  isResident(a: Float32Array): boolean {
    return this.addressOf(a) >= 0;
  }

  /** Gives back a buffer from `allocate` (anything else is ignored); it must not be used afterwards. */
  release(a: Float32Array): void {
    if (this.addressOf(a) < 0) return;
    const off = a.byteOffset;
    const bytes = this.blocks.get(off);
    if (bytes === undefined) return;
    this.blocks.delete(off);
    const free = this.free;
    let i = 0;
    while (i < free.length && free[i]!.off < off) i++;
    free.splice(i, 0, { off, bytes });
    // Merge with the following and the preceding gap.
    if (i + 1 < free.length && free[i]!.off + free[i]!.bytes === free[i + 1]!.off) {
      free[i]!.bytes += free[i + 1]!.bytes;
      free.splice(i + 1, 1);
    }
    if (i > 0 && free[i - 1]!.off + free[i - 1]!.bytes === free[i]!.off) {
      free[i - 1]!.bytes += free[i]!.bytes;
      free.splice(i, 1);
      i--;
    }
    const last = free[free.length - 1];
    if (last && last.off + last.bytes === this.residentTop) {
      this.residentTop = last.off;
      free.pop();
    }
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

  attention(q: Float32Array, k: Float32Array, v: Float32Array, probs: Float32Array, out: Float32Array, opts: AttentionOptions): void {
    const p = planAttention('attention', opts, { q, k, v, probs, rowsOut: [out] });
    this.checkLive();
    if (!this.pool.hasKernels || p.B * p.Hkv >= 0x10000) {
      composedAttention(this, p, q, k, v, probs, out);
      return;
    }
    if (p.B * p.T * p.H === 0) return;
    const n = attentionSizes(p);
    const st = new Staging(this.stagingBase());
    const desc = st.take(ATTN.SLOTS * 4);
    const ops = [
      this.operand(st, q, n.q, true, false),
      this.operand(st, k, n.kv, true, false),
      this.operand(st, v, n.kv, true, false),
      this.operand(st, probs, n.probs, false, true),
      this.operand(st, out, n.q, false, true),
    ];
    const scratch = st.take(this.threads * n.scratchStride);
    this.ensure(st.at);
    this.copyIn(ops);
    const [aq, ak, av, ap, ao] = ops.map((o) => o.addr) as [number, number, number, number, number];
    this.writeAttention(desc, p, n, { q: aq, k: ak, v: av, probs: ap, out: ao, dOut: 0, dq: 0, dk: 0, dv: 0, scratch });
    this.pool.runJobs(KIND_ATTENTION_FORWARD, p.B * p.Hkv, desc);
    this.copyOut(ops);
  }

  attentionBackward(
    q: Float32Array,
    k: Float32Array,
    v: Float32Array,
    probs: Float32Array,
    dOut: Float32Array,
    dq: Float32Array,
    dk: Float32Array,
    dv: Float32Array,
    opts: AttentionOptions,
  ): void {
    const p = planAttention('attentionBackward', opts, { q, k, v, probs, rowsOut: [dOut, dq], kvOut: [dk, dv] }, true);
    this.checkLive();
    if (!this.pool.hasKernels || p.B * p.Hkv >= 0x10000) {
      composedAttentionBackward(this, p, q, k, v, probs, dOut, dq, dk, dv);
      return;
    }
    if (p.B * p.T * p.H === 0) return;
    const n = attentionSizes(p);
    // With sequences spaced by kvStride, staged dk and dv start as copies so that the gaps survive.
    const gaps = n.kv !== p.B * p.T * p.Hkv * p.hd;
    const st = new Staging(this.stagingBase());
    const desc = st.take(ATTN.SLOTS * 4);
    const ops = [
      this.operand(st, q, n.q, true, false),
      this.operand(st, k, n.kv, true, false),
      this.operand(st, v, n.kv, true, false),
      this.operand(st, probs, n.probs, true, false),
      this.operand(st, dOut, n.q, true, false),
      this.operand(st, dq, n.q, false, true),
      this.operand(st, dk, n.kv, gaps, true),
      this.operand(st, dv, n.kv, gaps, true),
    ];
    const scratch = st.take(this.threads * n.scratchStride);
    this.ensure(st.at);
    this.copyIn(ops);
    const [aq, ak, av, ap, ado, adq, adk, adv] = ops.map((o) => o.addr) as number[] as [number, number, number, number, number, number, number, number];
    this.writeAttention(desc, p, n, { q: aq, k: ak, v: av, probs: ap, out: 0, dOut: ado, dq: adq, dk: adk, dv: adv, scratch });
    this.pool.runJobs(KIND_ATTENTION_BACKWARD, p.B * p.Hkv, desc);
    this.copyOut(ops);
  }

  override crossEntropy(
    logits: Float32Array,
    targets: Int32Array,
    dLogits: Float32Array | null,
    rows: number,
    vocab: number,
    opts: CrossEntropyOptions = {},
  ): number {
    checkCrossEntropy(logits, targets, dLogits, rows, vocab, opts);
    this.checkLive();
    if (!this.pool.hasKernels || rows * vocab < ELEMENTWISE_MIN) return super.crossEntropy(logits, targets, dLogits, rows, vocab, opts);
    const weights = opts.weights;
    let total = 0;
    for (let r = 0; r < rows; r++) if (targets[r]! >= 0) total += weights ? weights[r]! : 1;
    const denom = (opts.reduction ?? 'mean') === 'mean' ? total : 1;
    const w = new Float32Array(rows);
    const picked = new Float64Array(rows);
    for (let r = 0; r < rows; r++) {
      const t = targets[r]!;
      w[r] = t < 0 || denom === 0 ? 0 : (weights ? weights[r]! : 1) / denom;
      if (w[r] !== 0) picked[r] = logits[r * vocab + t]!;
    }
    const n = rows * vocab;
    // The kernel turns the logits into the gradient in place: in dLogits when asked, else it only reads.
    const st = new Staging(this.stagingBase());
    const desc = st.take(XENT.SLOTS * 4);
    const wAt = st.take(rows * 4);
    const stats = st.take(rows * 16);
    const work = dLogits ?? logits;
    const op = this.operand(st, work, n, work === logits, dLogits !== null);
    this.ensure(st.at);
    if (work !== logits) {
      if (op.staged) this.heap.set(logits.subarray(0, n), op.addr >>> 2);
      else work.set(logits.subarray(0, n));
    } else {
      this.copyIn([op]);
    }
    this.heap.set(w, wAt >>> 2);
    const rowsPerJob = Math.max(1, Math.ceil(rows / (8 * this.threads)), Math.ceil(rows / 0xffff));
    const d = this.heapI32;
    const at = desc >>> 2;
    d[at + XENT.x] = op.addr;
    d[at + XENT.rows] = rows;
    d[at + XENT.vocab] = vocab;
    d[at + XENT.weights] = wAt;
    d[at + XENT.stats] = stats;
    d[at + XENT.grad] = dLogits ? 1 : 0;
    d[at + XENT.rowsPerJob] = rowsPerJob;
    this.pool.runJobs(KIND_CROSS_ENTROPY, Math.ceil(rows / rowsPerJob), desc);
    const sf = this.heapF64;
    let loss = 0;
    for (let r = 0; r < rows; r++) {
      const wr = w[r]!;
      if (wr === 0) continue;
      const s = (stats >>> 3) + 2 * r;
      loss += wr * (sf[s]! + Math.log(sf[s + 1]!) - picked[r]!);
    }
    if (dLogits) {
      this.copyOut([op]);
      for (let r = 0; r < rows; r++) {
        const wr = w[r]!;
        if (wr !== 0) dLogits[r * vocab + targets[r]!]! -= wr;
      }
    }
    return loss;
  }

  override swiglu(gate: Float32Array, up: Float32Array, out: Float32Array, n: number): void {
    if (!this.pool.hasKernels || n < ELEMENTWISE_MIN) {
      super.swiglu(gate, up, out, n);
      return;
    }
    checkElementwise('swiglu', n, [gate, up, out]);
    this.elementwise(KIND_SWIGLU, n, [gate, up], [out]);
  }

  override swigluBackward(gate: Float32Array, up: Float32Array, dOut: Float32Array, dGate: Float32Array, dUp: Float32Array, n: number): void {
    if (!this.pool.hasKernels || n < ELEMENTWISE_MIN) {
      super.swigluBackward(gate, up, dOut, dGate, dUp, n);
      return;
    }
    checkElementwise('swigluBackward', n, [gate, up, dOut, dGate, dUp]);
    this.elementwise(KIND_SWIGLU_BACKWARD, n, [gate, up, dOut], [dGate, dUp]);
  }

  override add(a: Float32Array, b: Float32Array, out: Float32Array, n: number): void {
    if (!this.residentOp(n, [a, b, out])) {
      super.add(a, b, out, n);
      return;
    }
    checkElementwise('add', n, [a, b, out]);
    const st = new Staging(this.stagingBase());
    const desc = st.take(ADD.SLOTS * 4);
    this.ensure(st.at);
    const perJob = Math.max(ELEMENTWISE_MIN, Math.ceil(n / (4 * this.threads) / 4) * 4);
    this.writeSlots(desc, [
      [ADD.a, a.byteOffset],
      [ADD.b, b.byteOffset],
      [ADD.out, out.byteOffset],
      [ADD.n, n],
      [ADD.perJob, perJob],
    ]);
    this.pool.runJobs(KIND_ADD, Math.ceil(n / perJob), desc);
  }

  override rmsnorm(
    x: Float32Array,
    weight: Float32Array,
    out: Float32Array,
    rows: number,
    dim: number,
    eps: number,
    invRms?: Float32Array,
  ): void {
    if (!this.residentOp(rows * dim, [x, out]) || dim === 0) {
      super.rmsnorm(x, weight, out, rows, dim, eps, invRms);
      return;
    }
    checkDims('rmsnorm', { rows, dim });
    checkElementwise('rmsnorm', rows * dim, [x, out]);
    checkLength('rmsnorm', 'weight', weight, dim);
    if (invRms) checkLength('rmsnorm', 'invRms', invRms, rows);
    const st = new Staging(this.stagingBase());
    const desc = st.take(NORM.SLOTS * 4);
    const w = this.operand(st, weight, dim, true, false);
    const inv = invRms ? this.operand(st, invRms, rows, false, true) : null;
    this.ensure(st.at);
    this.copyIn([w]);
    const rowsPerJob = normRowsPerJob(rows, dim);
    this.writeSlots(desc, [
      [NORM.x, x.byteOffset],
      [NORM.w, w.addr],
      [NORM.out, out.byteOffset],
      [NORM.invRms, inv ? inv.addr : 0],
      [NORM.rows, rows],
      [NORM.dim, dim],
      [NORM.rowsPerJob, rowsPerJob],
    ]);
    this.heap[(desc >>> 2) + NORM.eps] = eps;
    this.pool.runJobs(KIND_RMSNORM, Math.ceil(rows / rowsPerJob), desc);
    if (inv) this.copyOut([inv]);
  }

  override rmsnormBackward(
    x: Float32Array,
    weight: Float32Array,
    invRms: Float32Array | null,
    dOut: Float32Array,
    dx: Float32Array,
    dWeight: Float32Array | null,
    rows: number,
    dim: number,
    eps: number,
  ): void {
    if (!invRms || !this.residentOp(rows * dim, [x, dOut, dx]) || dim === 0) {
      super.rmsnormBackward(x, weight, invRms, dOut, dx, dWeight, rows, dim, eps);
      return;
    }
    const op = 'rmsnormBackward';
    checkDims(op, { rows, dim });
    checkElementwise(op, rows * dim, [x, dOut, dx]);
    checkLength(op, 'weight', weight, dim);
    checkLength(op, 'invRms', invRms, rows);
    if (dWeight) checkLength(op, 'dWeight', dWeight, dim);
    const rowsPerJob = Math.max(NORM_BACKWARD_ROWS, Math.ceil(rows / 0xffff));
    const jobs = Math.ceil(rows / rowsPerJob);
    const dimPad = (dim + 3) & ~3;
    const st = new Staging(this.stagingBase());
    const desc = st.take(NORM.SLOTS * 4);
    const w = this.operand(st, weight, dim, true, false);
    const inv = this.operand(st, invRms, rows, true, false);
    const partial = dWeight ? st.take(jobs * dimPad * 4) : 0;
    this.ensure(st.at);
    this.copyIn([w, inv]);
    this.writeSlots(desc, [
      [NORM.x, x.byteOffset],
      [NORM.w, w.addr],
      [NORM.out, dx.byteOffset],
      [NORM.invRms, inv.addr],
      [NORM.dOut, dOut.byteOffset],
      [NORM.partial, partial],
      [NORM.rows, rows],
      [NORM.dim, dim],
      [NORM.rowsPerJob, rowsPerJob],
      [NORM.dimPad, dimPad],
    ]);
    this.pool.runJobs(KIND_RMSNORM_BACKWARD, jobs, desc);
    if (dWeight) {
      // The jobs' partial sums, added in job order (the same whatever thread ran which job).
      const heap = this.heap;
      const p0 = partial >>> 2;
      for (let j = 0; j < dim; j++) {
        let sum = 0;
        for (let t = 0; t < jobs; t++) sum += heap[p0 + t * dimPad + j]!;
        dWeight[j] = dWeight[j]! + sum;
      }
    }
  }

  override rope(
    x: Float32Array,
    out: Float32Array,
    cos: Float32Array,
    sin: Float32Array,
    tokens: number,
    heads: number,
    headDim: number,
    positions?: Int32Array,
  ): void {
    if (!this.residentOp(tokens * heads * headDim, [x, out])) {
      super.rope(x, out, cos, sin, tokens, heads, headDim, positions);
      return;
    }
    checkRope('rope', x, out, cos, sin, tokens, heads, headDim, positions);
    this.rotate(x, out, cos, sin, tokens, heads, headDim, positions, 1);
  }

  override ropeBackward(
    dOut: Float32Array,
    dx: Float32Array,
    cos: Float32Array,
    sin: Float32Array,
    tokens: number,
    heads: number,
    headDim: number,
    positions?: Int32Array,
  ): void {
    if (!this.residentOp(tokens * heads * headDim, [dOut, dx])) {
      super.ropeBackward(dOut, dx, cos, sin, tokens, heads, headDim, positions);
      return;
    }
    checkRope('ropeBackward', dOut, dx, cos, sin, tokens, heads, headDim, positions);
    this.rotate(dOut, dx, cos, sin, tokens, heads, headDim, positions, -1);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.pool.dispose();
  }

  // -------------------------------------------------------------------------------------------

  /** Whether a memory-bound op of n elements should run in the kernels: large, and on resident arrays only. */
  private residentOp(n: number, arrays: Float32Array[]): boolean {
    if (!this.pool.hasKernels || !(n >= ELEMENTWISE_MIN) || this.disposed) return false;
    return arrays.every((a) => this.addressOf(a) >= 0 && a.length >= n);
  }

  private writeSlots(desc: number, slots: [number, number][]): void {
    const d = this.heapI32;
    const at = desc >>> 2;
    for (const [slot, value] of slots) d[at + slot] = value;
  }

  private rotate(
    x: Float32Array,
    out: Float32Array,
    cos: Float32Array,
    sin: Float32Array,
    tokens: number,
    heads: number,
    headDim: number,
    positions: Int32Array | undefined,
    sign: number,
  ): void {
    const half = headDim / 2;
    let maxPos = tokens - 1;
    if (positions) for (let t = 0; t < tokens; t++) maxPos = Math.max(maxPos, positions[t]!);
    const tab = (maxPos + 1) * half;
    const st = new Staging(this.stagingBase());
    const desc = st.take(ROPE.SLOTS * 4);
    const c = this.operand(st, cos, tab, true, false);
    const s = this.operand(st, sin, tab, true, false);
    const pos = positions ? st.take(tokens * 4) : 0;
    this.ensure(st.at);
    this.copyIn([c, s]);
    if (positions) this.heapI32.set(positions.subarray(0, tokens), pos >>> 2);
    const tokensPerJob = Math.max(1, Math.ceil(ELEMENTWISE_MIN / (heads * headDim)), Math.ceil(tokens / (4 * this.threads)));
    this.writeSlots(desc, [
      [ROPE.x, x.byteOffset],
      [ROPE.out, out.byteOffset],
      [ROPE.cos, c.addr],
      [ROPE.sin, s.addr],
      [ROPE.pos, pos],
      [ROPE.tokens, tokens],
      [ROPE.heads, heads],
      [ROPE.hd, headDim],
      [ROPE.tokensPerJob, tokensPerJob],
    ]);
    this.heap[(desc >>> 2) + ROPE.sign] = sign;
    this.pool.runJobs(KIND_ROPE, Math.ceil(tokens / tokensPerJob), desc);
  }

  private checkLive(): void {
    if (this.disposed) throw new AmalgamError('E_USAGE', 'WasmBackend used after dispose()');
  }

  /** Byte address of `a` when it lives in this backend's memory, else −1. */
  private addressOf(a: Float32Array): number {
    if (this.buffers.has(a.buffer)) return a.byteOffset;
    // A shared memory may hand out a new buffer object for the same memory (after a grow seen
    // from another thread, for instance); views of it are resident too.
    if (a.buffer === this.memory.buffer) {
      this.buffers.add(a.buffer);
      return a.byteOffset;
    }
    return -1;
  }

  /** Where a call's staged operands start: above every resident buffer. */
  private stagingBase(): number {
    return align64(Math.max(this.base, this.residentTop));
  }

  /** An operand of n floats: resident in place, or staged (copied in and/or out around the call). */
  private operand(st: Staging, a: Float32Array, n: number, copyIn: boolean, copyOut: boolean): Operand {
    const addr = this.addressOf(a);
    if (addr >= 0) return { a, n, addr, staged: false, copyIn, copyOut };
    return { a, n, addr: st.take(n * 4), staged: true, copyIn, copyOut };
  }

  private copyIn(ops: Operand[]): void {
    const heap = this.heap;
    for (const o of ops) if (o.staged && o.copyIn && o.n > 0) heap.set(o.a.subarray(0, o.n), o.addr >>> 2);
  }

  private copyOut(ops: Operand[]): void {
    const heap = this.heap;
    for (const o of ops) if (o.staged && o.copyOut && o.n > 0) o.a.set(heap.subarray(o.addr >>> 2, (o.addr >>> 2) + o.n));
  }

  /** Runs an elementwise kernel: inputs gate, up(, dOut); outputs out(, dUp). */
  private elementwise(kind: number, n: number, inputs: Float32Array[], outputs: Float32Array[]): void {
    this.checkLive();
    const st = new Staging(this.stagingBase());
    const desc = st.take(SWIGLU.SLOTS * 4);
    const ins = inputs.map((a) => this.operand(st, a, n, true, false));
    const outs = outputs.map((a) => this.operand(st, a, n, false, true));
    this.ensure(st.at);
    this.copyIn(ins);
    const d = this.heapI32;
    const at = desc >>> 2;
    [SWIGLU.gate, SWIGLU.up, SWIGLU.dOut].forEach((slot, i) => (d[at + slot] = ins[i]?.addr ?? 0));
    [SWIGLU.out, SWIGLU.dUp].forEach((slot, i) => (d[at + slot] = outs[i]?.addr ?? 0));
    const perJob = Math.max(ELEMENTWISE_MIN, Math.ceil(n / (4 * this.threads) / 4) * 4);
    d[at + SWIGLU.n] = n;
    d[at + SWIGLU.perJob] = perJob;
    this.pool.runJobs(kind, Math.ceil(n / perJob), desc);
    this.copyOut(outs);
  }

  private writeAttention(desc: number, p: AttentionPlan, n: AttentionSizes, addr: Record<'q' | 'k' | 'v' | 'probs' | 'out' | 'dOut' | 'dq' | 'dk' | 'dv' | 'scratch', number>): void {
    const qd = p.H * p.hd;
    const slots: [number, number][] = [
      [ATTN.B, p.B],
      [ATTN.T, p.T],
      [ATTN.Tk, p.Tk],
      [ATTN.H, p.H],
      [ATTN.Hkv, p.Hkv],
      [ATTN.hd, p.hd],
      [ATTN.offset, p.offset],
      [ATTN.q, addr.q],
      [ATTN.ldq, qd],
      [ATTN.k, addr.k],
      [ATTN.v, addr.v],
      [ATTN.ldk, p.Hkv * p.hd],
      [ATTN.kvStride, p.kvStride],
      [ATTN.probs, addr.probs],
      [ATTN.out, addr.out],
      [ATTN.ldo, qd],
      [ATTN.scratch, addr.scratch],
      [ATTN.scratchStride, n.scratchStride],
      [ATTN.TkPad, n.TkPad],
      [ATTN.dOut, addr.dOut],
      [ATTN.dq, addr.dq],
      [ATTN.dk, addr.dk],
      [ATTN.dv, addr.dv],
    ];
    const d = this.heapI32;
    const at = desc >>> 2;
    for (const [slot, value] of slots) d[at + slot] = value;
    this.heap[at + ATTN.scale] = p.scale;
  }

  private run(p: MatmulPlan, a: Float32Array, b: Float32Array, out: Float32Array): void {
    this.checkLive();
    const { batch, M, N, K } = p;
    if (batch === 0 || M === 0 || N === 0) return;
    if (K === 0) {
      if (!p.accumulate) forEachOutputRow(p, (o) => out.fill(0, o, o + N));
      return;
    }
    const st = new Staging(this.stagingBase());
    const A = this.operand(st, a, p.extentA, true, false);
    const B = this.operand(st, b, p.extentB, true, false);
    const denseC = p.extentC === batch * M * N;
    // A staged output that is not dense is copied back row by row below.
    const C = this.operand(st, out, p.extentC, p.accumulate, denseC);
    this.ensure(st.at);
    this.copyIn([A, B, C]);

    const args: GemmArgs = [
      0, batch * M, 0, N, M, N, K,
      A.addr, p.sai, p.sak, p.strideA,
      B.addr, p.sbk, p.sbj, p.strideB,
      C.addr, p.ldc, p.strideC,
      p.alpha, p.accumulate ? 1 : 0,
    ];
    // Wide outputs go in column blocks of at most MAX_COLUMNS, so that the kernel's packed panel
    // of B stays in L2. Columns are independent, so the blocking does not change any result.
    const rows = batch * M;
    const colBlocks = Math.ceil(N / MAX_COLUMNS);
    const width = Math.ceil(N / colBlocks / NR) * NR;
    const flops = 2 * batch * M * N * K;
    const chunks = Math.max(this.threads * CHUNKS_PER_THREAD, Math.min(this.threads * MAX_CHUNKS_PER_THREAD, Math.floor(flops / CHUNK_FLOPS)));
    if (this.threads === 1 || flops < this.parallelThreshold) {
      for (let n0 = 0; n0 < N; n0 += width) {
        args[2] = n0;
        args[3] = Math.min(N, n0 + width);
        this.pool.runHere(args);
      }
    } else if (colBlocks >= this.threads * CHUNKS_PER_THREAD || rows < N) {
      // Column chunks, each at most one block wide.
      const units = Math.ceil(N / NR);
      this.pool.runSplit(args, { byRows: false, unit: NR, chunks: Math.min(units, Math.max(colBlocks, chunks)) });
    } else {
      // Row chunks, one split job per column block.
      const units = Math.ceil(rows / MR);
      const perBlock = Math.max(this.threads * CHUNKS_PER_THREAD, Math.ceil(chunks / colBlocks));
      for (let n0 = 0; n0 < N; n0 += width) {
        args[2] = n0;
        args[3] = Math.min(N, n0 + width);
        this.pool.runSplit(args, { byRows: true, unit: MR, chunks: Math.min(units, perBlock) });
      }
    }

    if (C.staged) {
      if (denseC) this.copyOut([C]);
      else {
        const heap = this.heap;
        const c0 = C.addr >>> 2;
        forEachOutputRow(p, (o) => out.set(heap.subarray(c0 + o, c0 + o + N), o));
      }
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
        throw new AmalgamError('E_UNSUPPORTED', `an operation needs ${bytes} bytes of WebAssembly memory, over the 4 GiB limit`, {
          hint: 'split the operation into smaller batches',
        });
      }
      this.memory.grow(pages);
    }
    if (this.heap.buffer !== this.memory.buffer) {
      this.heap = new Float32Array(this.memory.buffer);
      this.heapI32 = new Int32Array(this.memory.buffer);
      this.heapF64 = new Float64Array(this.memory.buffer);
      this.buffers.add(this.memory.buffer);
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

interface Operand {
  a: Float32Array;
  n: number;
  /** Byte address the kernel uses. */
  addr: number;
  /** Copied into the arena (not resident). */
  staged: boolean;
  copyIn: boolean;
  copyOut: boolean;
}

interface AttentionSizes {
  q: number;
  kv: number;
  probs: number;
  TkPad: number;
  scratchStride: number;
}

function attentionSizes(p: AttentionPlan): AttentionSizes {
  const TkPad = padKeys(p.Tk);
  return {
    q: p.B * p.T * p.H * p.hd,
    kv: (p.B - 1) * p.kvStride + p.Tk * p.Hkv * p.hd,
    probs: p.B * p.H * p.T * p.Tk,
    TkPad,
    scratchStride: align64(attentionScratchBytes(p.hd, TkPad)),
  };
}

/** Calls f with the offset of every output row in `out`. */
function forEachOutputRow(p: MatmulPlan, f: (offset: number) => void): void {
  for (let t = 0; t < p.batch; t++) {
    for (let i = 0; i < p.M; i++) f(t * p.strideC + i * p.ldc);
  }
}
