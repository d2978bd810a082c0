/**
 * The compute backend: every numeric kernel the runtime (forward, backward, training) needs,
 * over float32 data in `Float32Array`s, row-major, with every dimension passed explicitly.
 *
 * Model code calls these ops and never loops over elements itself, so a backend can be swapped
 * (reference TypeScript, WebAssembly SIMD on all cores, later WebGPU) without touching it.
 * Exact semantics of every op are in docs/backend.md.
 *
 * Conventions shared by all ops:
 * - Outputs are written, not accumulated, unless the op says otherwise. Parameter gradients
 *   (`dWeight` of rmsnorm, `dTable` of embedding) are accumulated (`+=`), since they are summed
 *   over tokens and micro-batches.
 * - An output may be the very same array as an input of the same shape (in place), except for
 *   matmul, whose output must not overlap either input. Partial overlaps are never allowed.
 * - Arrays may be longer than needed; only the leading elements are read or written.
 * - Bad dimensions or too-short arrays throw an `AmalgamError` with code `E_SHAPE`.
 */
import { AmalgamError } from '../errors.js';

/** Options of `matmul`: out = alpha · op(A) · op(B) (+ out). */
export interface MatmulOptions {
  /** A is stored as K×M (op(A) = Aᵀ). Default false: A is stored as M×K. */
  transA?: boolean;
  /** B is stored as N×K (op(B) = Bᵀ). Default false: B is stored as K×N. */
  transB?: boolean;
  /** Scale of the product. Default 1. */
  alpha?: number;
  /** Add the product to `out` instead of overwriting it. Default false. */
  accumulate?: boolean;
  /** Row stride of A as stored, in elements. Default: its stored width (K, or M when transA). */
  lda?: number;
  /** Row stride of B as stored, in elements. Default: its stored width (N, or K when transB). */
  ldb?: number;
  /** Row stride of out, in elements. Default N. */
  ldc?: number;
}

/** Options of `matmulBatched`: `matmul` applied to `batch` matrices spaced by the strides. */
export interface BatchedMatmulOptions extends MatmulOptions {
  /** Elements from one A matrix to the next. Default: stored rows × lda. 0 reuses one A. */
  strideA?: number;
  /** Elements from one B matrix to the next. Default: stored rows × ldb. 0 reuses one B. */
  strideB?: number;
  /** Elements from one output matrix to the next. Default M × ldc. Outputs must not overlap. */
  strideC?: number;
}

/** Options of `softmax`. */
export interface SoftmaxOptions {
  /**
   * Causal mask for attention scores: the rows form consecutive query×key matrices of
   * `queryLen` rows each; row r is query position q = queryOffset + (r mod queryLen) and keeps
   * only the columns j ≤ q. Masked entries come out as exactly 0.
   */
  causal?: boolean;
  /** Rows per attention matrix. Default: cols (square score matrices). */
  queryLen?: number;
  /** Key position of the first query row. Default cols − queryLen (queries are the last keys). */
  queryOffset?: number;
}

/** Options of `crossEntropy`. */
export interface CrossEntropyOptions {
  /** Per-row weights (a 0/1 mask, or any non-negative weights). Default: all 1. */
  weights?: Float32Array;
  /** 'mean' divides by the total weight of the counted rows; 'sum' does not. Default 'mean'. */
  reduction?: 'mean' | 'sum';
}

/**
 * Shapes of a causal multi-head attention call. Queries, outputs and their gradients are
 * [batch, queries, heads, headDim] (rows of heads·headDim); keys and values are rows of
 * kvHeads·headDim, `kvStride` elements from one sequence to the next; probabilities are
 * [batch, heads, queries, keys]. Query head h reads key/value head ⌊h / (heads / kvHeads)⌋.
 */
export interface AttentionOptions {
  batch: number;
  /** Query rows per sequence. */
  queries: number;
  /** Keys per sequence (default: queries). */
  keys?: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  /** Multiplies the scores (default 1/√headDim). */
  scale?: number;
  /** Key position of the first query (default keys − queries); query t keeps keys j ≤ offset + t. */
  queryOffset?: number;
  /** Elements from one sequence's keys (and values) to the next (default keys·kvHeads·headDim). */
  kvStride?: number;
  /**
   * Backward only: a buffer of at least batch·heads·queries² floats that a backend composing
   * attention from matmuls may use for the probabilities' gradient (else it allocates one).
   */
  workspace?: Float32Array;
}

/** AttentionOptions with every default filled in. */
export interface AttentionPlan {
  B: number;
  T: number;
  Tk: number;
  H: number;
  Hkv: number;
  hd: number;
  scale: number;
  offset: number;
  kvStride: number;
  workspace: Float32Array | undefined;
}

export interface Backend {
  /** Short name, e.g. 'reference' or 'wasm'. */
  readonly name: string;

  /**
   * out[M×N] = alpha · op(A) · op(B), or out += … with `accumulate`.
   * op(A) is M×K and op(B) is K×N; see MatmulOptions for the stored layouts.
   */
  matmul(
    a: Float32Array,
    b: Float32Array,
    out: Float32Array,
    M: number,
    K: number,
    N: number,
    opts?: MatmulOptions,
  ): void;

  /** `batch` independent matmuls; matrix t of each operand starts at t × its stride. */
  matmulBatched(
    a: Float32Array,
    b: Float32Array,
    out: Float32Array,
    batch: number,
    M: number,
    K: number,
    N: number,
    opts?: BatchedMatmulOptions,
  ): void;

  /** out[i] = a[i] + b[i], i < n. */
  add(a: Float32Array, b: Float32Array, out: Float32Array, n: number): void;
  /** out[i] = a[i] · b[i], i < n. */
  mul(a: Float32Array, b: Float32Array, out: Float32Array, n: number): void;
  /** out[i] = alpha · x[i], i < n. */
  scale(x: Float32Array, alpha: number, out: Float32Array, n: number): void;
  /** y[i] += alpha · x[i], i < n. */
  axpy(alpha: number, x: Float32Array, y: Float32Array, n: number): void;

  /**
   * RMSNorm over rows of length dim: out = x · r · weight with r = 1/√(mean(x²) + eps).
   * When `invRms` is given, r of each row is stored there (length rows) for the backward.
   */
  rmsnorm(
    x: Float32Array,
    weight: Float32Array,
    out: Float32Array,
    rows: number,
    dim: number,
    eps: number,
    invRms?: Float32Array,
  ): void;

  /**
   * Gradients of rmsnorm: dx is written, dWeight (if not null) is accumulated.
   * `invRms` is what the forward stored; null recomputes it from x and eps.
   */
  rmsnormBackward(
    x: Float32Array,
    weight: Float32Array,
    invRms: Float32Array | null,
    dOut: Float32Array,
    dx: Float32Array,
    dWeight: Float32Array | null,
    rows: number,
    dim: number,
    eps: number,
  ): void;

  /** Row-wise softmax of a rows×cols matrix, optionally with a causal mask. */
  softmax(x: Float32Array, out: Float32Array, rows: number, cols: number, opts?: SoftmaxOptions): void;

  /** dx = y ⊙ (dy − rowsum(dy ⊙ y)) from the softmax output y. */
  softmaxBackward(y: Float32Array, dOut: Float32Array, dx: Float32Array, rows: number, cols: number): void;

  /** out = silu(x) = x · σ(x). */
  silu(x: Float32Array, out: Float32Array, n: number): void;
  /** dx = dOut · silu′(x). */
  siluBackward(x: Float32Array, dOut: Float32Array, dx: Float32Array, n: number): void;

  /** out = silu(gate) · up (the Llama MLP activation). */
  swiglu(gate: Float32Array, up: Float32Array, out: Float32Array, n: number): void;
  /** dGate = dOut · up · silu′(gate), dUp = dOut · silu(gate). */
  swigluBackward(
    gate: Float32Array,
    up: Float32Array,
    dOut: Float32Array,
    dGate: Float32Array,
    dUp: Float32Array,
    n: number,
  ): void;

  /**
   * Rotary position embedding, rotate_half layout, on x of shape [tokens, heads, headDim]:
   * with h = headDim/2, p = positions[t] (default t), c = cos[p·h + i], s = sin[p·h + i]:
   * out[i] = x[i]·c − x[i+h]·s and out[i+h] = x[i+h]·c + x[i]·s for i < h.
   * cos and sin are tables of shape [maxPositions, headDim/2].
   */
  rope(
    x: Float32Array,
    out: Float32Array,
    cos: Float32Array,
    sin: Float32Array,
    tokens: number,
    heads: number,
    headDim: number,
    positions?: Int32Array,
  ): void;

  /** Gradient of rope: the inverse rotation applied to dOut. */
  ropeBackward(
    dOut: Float32Array,
    dx: Float32Array,
    cos: Float32Array,
    sin: Float32Array,
    tokens: number,
    heads: number,
    headDim: number,
    positions?: Int32Array,
  ): void;

  /**
   * Softmax cross-entropy of rows×vocab logits against `targets` (one class per row; a negative
   * target, such as −100, ignores the row). Returns the loss; when `dLogits` is given, writes
   * d(loss)/d(logits) there (it may be `logits` itself).
   */
  crossEntropy(
    logits: Float32Array,
    targets: Int32Array,
    dLogits: Float32Array | null,
    rows: number,
    vocab: number,
    opts?: CrossEntropyOptions,
  ): number;

  /**
   * Causal attention: probs[b, h, t, :] = softmax(scale · q[b, t, h] · k[b, :, h/g]ᵀ) over the
   * keys j ≤ offset + t (the others exactly 0), out[b, t, h] = probs[b, h, t, :] · v[b, :, h/g].
   */
  attention(
    q: Float32Array,
    k: Float32Array,
    v: Float32Array,
    probs: Float32Array,
    out: Float32Array,
    opts: AttentionOptions,
  ): void;

  /**
   * Gradients of `attention` (keys = queries, offset 0) from the probabilities it stored and
   * dOut: writes dq, dk and dv (each key/value head summed over the query heads that read it).
   */
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
  ): void;

  /** out[t, :] = table[ids[t], :] for t < ids.length; table is [vocab, dim]. */
  embedding(table: Float32Array, ids: Int32Array, out: Float32Array, dim: number): void;
  /** dTable[ids[t], :] += dOut[t, :] (accumulated). */
  embeddingBackward(dOut: Float32Array, ids: Int32Array, dTable: Float32Array, dim: number): void;

  /**
   * Optional: a zeroed buffer of n floats that this backend's ops use in place, without copying
   * it in or out (the WebAssembly backend places it in its own memory). It is an ordinary
   * Float32Array otherwise. Give it back with `release` when it is no longer needed.
   */
  allocate?(n: number): Float32Array;
  /** Optional: returns a buffer from `allocate`; it must not be used afterwards. Other arrays are ignored. */
  release?(a: Float32Array): void;

  /** Releases threads and memory. The backend must not be used afterwards. */
  dispose(): void;
}

// ---------------------------------------------------------------------------------------------
// Argument checking shared by the backends.

function shapeError(op: string, message: string): AmalgamError {
  return new AmalgamError('E_SHAPE', `${op}: ${message}`);
}

/** Throws unless every value is a non-negative safe integer. */
export function checkDims(op: string, dims: Record<string, number>): void {
  for (const [name, v] of Object.entries(dims)) {
    if (!Number.isSafeInteger(v) || v < 0) {
      throw shapeError(op, `${name} must be a non-negative integer, got ${v}`);
    }
  }
}

/** Throws unless `arr` holds at least `n` elements. */
export function checkLength(op: string, name: string, arr: ArrayLike<number>, n: number): void {
  if (arr.length < n) throw shapeError(op, `${name} has ${arr.length} elements, needs ${n}`);
}

/** A matmul call with every default filled in and every stride in elements. */
export interface MatmulPlan {
  batch: number;
  M: number;
  K: number;
  N: number;
  alpha: number;
  accumulate: boolean;
  /** Element (i, k) of op(A) in matrix t is at t·strideA + i·sai + k·sak. */
  sai: number;
  sak: number;
  strideA: number;
  /** Element (k, j) of op(B) in matrix t is at t·strideB + k·sbk + j·sbj. */
  sbk: number;
  sbj: number;
  strideB: number;
  /** Element (i, j) of out in matrix t is at t·strideC + i·ldc + j. */
  ldc: number;
  strideC: number;
  /** Elements of each array that the call touches (0 when it touches none). */
  extentA: number;
  extentB: number;
  extentC: number;
}

function extent(batch: number, stride: number, rows: number, ld: number, cols: number): number {
  if (batch === 0 || rows === 0 || cols === 0) return 0;
  return (batch - 1) * stride + (rows - 1) * ld + cols;
}

/** Validates a (batched) matmul call and resolves its defaults. */
export function planMatmul(
  op: string,
  a: Float32Array,
  b: Float32Array,
  out: Float32Array,
  batch: number,
  M: number,
  K: number,
  N: number,
  opts: BatchedMatmulOptions = {},
): MatmulPlan {
  checkDims(op, { batch, M, K, N });
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const aRows = transA ? K : M;
  const aCols = transA ? M : K;
  const bRows = transB ? N : K;
  const bCols = transB ? K : N;
  const lda = opts.lda ?? aCols;
  const ldb = opts.ldb ?? bCols;
  const ldc = opts.ldc ?? N;
  const strideA = opts.strideA ?? aRows * lda;
  const strideB = opts.strideB ?? bRows * ldb;
  const strideC = opts.strideC ?? M * ldc;
  checkDims(op, { lda, ldb, ldc, strideA, strideB, strideC });
  if (aRows > 1 && lda < aCols) throw shapeError(op, `lda ${lda} is less than the stored width ${aCols} of A`);
  if (bRows > 1 && ldb < bCols) throw shapeError(op, `ldb ${ldb} is less than the stored width ${bCols} of B`);
  if (M > 1 && ldc < N) throw shapeError(op, `ldc ${ldc} is less than N = ${N}`);
  const alpha = opts.alpha ?? 1;
  if (typeof alpha !== 'number') throw shapeError(op, 'alpha must be a number');
  const extentA = extent(batch, strideA, aRows, lda, aCols);
  const extentB = extent(batch, strideB, bRows, ldb, bCols);
  const extentC = extent(batch, strideC, M, ldc, N);
  if (batch > 1 && extentC > 0) {
    // Output matrices must be disjoint: one after another, or interleaved within each row.
    const consecutive = strideC >= (M - 1) * ldc + N;
    const interleaved = strideC >= N && (batch - 1) * strideC + N <= ldc;
    if (!consecutive && !(M > 1 && interleaved)) {
      throw shapeError(op, `strideC ${strideC} with ldc ${ldc} makes output matrices overlap`);
    }
  }
  checkLength(op, 'A', a, M > 0 && N > 0 ? extentA : 0);
  checkLength(op, 'B', b, M > 0 && N > 0 ? extentB : 0);
  checkLength(op, 'out', out, extentC);
  return {
    batch,
    M,
    K,
    N,
    alpha,
    accumulate: opts.accumulate ?? false,
    sai: transA ? 1 : lda,
    sak: transA ? lda : 1,
    strideA,
    sbk: transB ? 1 : ldb,
    sbj: transB ? ldb : 1,
    strideB,
    ldc,
    strideC,
    extentA,
    extentB,
    extentC,
  };
}

/** Validates softmax options and resolves their defaults. */
export function planSoftmax(
  x: Float32Array,
  out: Float32Array,
  rows: number,
  cols: number,
  opts: SoftmaxOptions = {},
): { causal: boolean; queryLen: number; queryOffset: number } {
  checkDims('softmax', { rows, cols });
  checkLength('softmax', 'x', x, rows * cols);
  checkLength('softmax', 'out', out, rows * cols);
  const causal = opts.causal ?? false;
  const queryLen = opts.queryLen ?? cols;
  const queryOffset = opts.queryOffset ?? cols - queryLen;
  if (causal) {
    if (!Number.isSafeInteger(queryLen) || queryLen < 1) {
      throw shapeError('softmax', `queryLen must be a positive integer, got ${queryLen}`);
    }
    if (!Number.isSafeInteger(queryOffset)) {
      throw shapeError('softmax', `queryOffset must be an integer, got ${queryOffset}`);
    }
  }
  return { causal, queryLen, queryOffset };
}

/** Validates a rope call; returns half the head dimension. */
export function checkRope(
  op: string,
  x: Float32Array,
  out: Float32Array,
  cos: Float32Array,
  sin: Float32Array,
  tokens: number,
  heads: number,
  headDim: number,
  positions: Int32Array | undefined,
): number {
  checkDims(op, { tokens, heads, headDim });
  if (headDim % 2 !== 0) throw shapeError(op, `headDim must be even, got ${headDim}`);
  const n = tokens * heads * headDim;
  checkLength(op, 'input', x, n);
  checkLength(op, 'output', out, n);
  const half = headDim / 2;
  if (positions !== undefined) checkLength(op, 'positions', positions, tokens);
  let maxPos = tokens - 1;
  if (positions !== undefined) {
    for (let t = 0; t < tokens; t++) {
      const p = positions[t]!;
      if (p < 0) throw shapeError(op, `positions[${t}] = ${p} is negative`);
      if (p > maxPos) maxPos = p;
    }
  }
  if (tokens > 0) {
    checkLength(op, 'cos', cos, (maxPos + 1) * half);
    checkLength(op, 'sin', sin, (maxPos + 1) * half);
  }
  return half;
}

/** Validates a cross-entropy call. */
export function checkCrossEntropy(
  logits: Float32Array,
  targets: Int32Array,
  dLogits: Float32Array | null,
  rows: number,
  vocab: number,
  opts: CrossEntropyOptions,
): void {
  const op = 'crossEntropy';
  checkDims(op, { rows, vocab });
  checkLength(op, 'logits', logits, rows * vocab);
  checkLength(op, 'targets', targets, rows);
  if (dLogits) checkLength(op, 'dLogits', dLogits, rows * vocab);
  if (opts.weights) checkLength(op, 'weights', opts.weights, rows);
  const reduction = opts.reduction ?? 'mean';
  if (reduction !== 'mean' && reduction !== 'sum') throw shapeError(op, `unknown reduction '${String(reduction)}'`);
  for (let r = 0; r < rows; r++) {
    const t = targets[r]!;
    if (t >= vocab) throw shapeError(op, `targets[${r}] = ${t} is not below vocab ${vocab}`);
  }
}

/** Validates an embedding (forward or backward) call. */
export function checkEmbedding(
  op: string,
  table: Float32Array,
  ids: Int32Array,
  rowsArr: Float32Array,
  dim: number,
): void {
  checkDims(op, { dim });
  if (dim === 0) return;
  const vocab = Math.floor(table.length / dim);
  checkLength(op, 'rows', rowsArr, ids.length * dim);
  for (let t = 0; t < ids.length; t++) {
    const id = ids[t]!;
    if (id < 0 || id >= vocab) throw shapeError(op, `ids[${t}] = ${id} is outside the table of ${vocab} rows`);
  }
}

/** Validates an attention call (forward, or backward with `backward`) and fills in defaults. */
export function planAttention(
  op: string,
  opts: AttentionOptions,
  arrays: { q: Float32Array; k: Float32Array; v: Float32Array; probs: Float32Array; rowsOut: Float32Array[]; kvOut?: Float32Array[] },
  backward = false,
): AttentionPlan {
  const B = opts.batch;
  const T = opts.queries;
  const Tk = opts.keys ?? T;
  const H = opts.heads;
  const Hkv = opts.kvHeads;
  const hd = opts.headDim;
  checkDims(op, { batch: B, queries: T, keys: Tk, heads: H, kvHeads: Hkv, headDim: hd });
  if (Hkv === 0 || H % Hkv !== 0) throw shapeError(op, `heads ${H} must be a positive multiple of kvHeads ${Hkv}`);
  const offset = opts.queryOffset ?? Tk - T;
  if (!Number.isSafeInteger(offset) || offset < 0) throw shapeError(op, `queryOffset must be a non-negative integer, got ${offset}`);
  if (T > 0 && offset + T > Tk) throw shapeError(op, `queries at ${offset}…${offset + T - 1} go past the ${Tk} keys`);
  const kvd = Hkv * hd;
  const kvStride = opts.kvStride ?? Tk * kvd;
  checkDims(op, { kvStride });
  if (B > 1 && kvStride < Tk * kvd) throw shapeError(op, `kvStride ${kvStride} is less than keys × kvHeads × headDim = ${Tk * kvd}`);
  if (backward && (Tk !== T || offset !== 0)) throw shapeError(op, 'the backward needs keys = queries and offset 0');
  const scale = opts.scale ?? 1 / Math.sqrt(hd);
  if (typeof scale !== 'number' || !Number.isFinite(scale)) throw shapeError(op, 'scale must be a finite number');
  const rows = B * T * H * hd;
  const kvExtent = B === 0 || Tk === 0 ? 0 : (B - 1) * kvStride + Tk * kvd;
  checkLength(op, 'q', arrays.q, rows);
  checkLength(op, 'k', arrays.k, kvExtent);
  checkLength(op, 'v', arrays.v, kvExtent);
  checkLength(op, 'probs', arrays.probs, B * H * T * Tk);
  for (const a of arrays.rowsOut) checkLength(op, 'output', a, rows);
  for (const a of arrays.kvOut ?? []) checkLength(op, 'key/value gradient', a, kvExtent);
  return { B, T, Tk, H, Hkv, hd, scale, offset, kvStride, workspace: opts.workspace };
}
