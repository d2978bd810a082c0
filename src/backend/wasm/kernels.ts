/**
 * SIMD kernels beside the GEMM: fused causal attention (forward and backward), softmax
 * cross-entropy rows, swiglu (forward and backward), add, rmsnorm (forward and backward) and
 * rope. The module is generated at run time with ./emit.ts, imports the backend's shared
 * memory, and exports one entry point:
 *
 *   job(kind, index, desc, thread)
 *
 * which runs job `index` of the operation described at byte address `desc` (i32 slots, see
 * ATTN, XENT, SWIGLU, ADD, NORM, ROPE), using the scratch area of `thread`. The jobs of one
 * call write disjoint outputs and each computes its elements in a fixed order, so any thread may
 * run any job and results do not depend on the thread count (rmsnorm's weight gradient comes
 * back as per-job partial sums over a fixed number of rows, added up by the caller in order).
 *
 * Attention jobs are (sequence b, key/value head): the job handles the query heads of that
 * group one after another, four query rows at a time, over keys 0 … (last row's position):
 *   forward   S = scale·Q·Kᵀ (K transposed once per job), row softmax with the causal limit,
 *             probabilities stored, O = P·V;
 *   backward  dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = scale·dS·K, and per job
 *             dK = scale·Σ dSᵀ·Q, dV = Σ Pᵀ·dO over the group's heads.
 */
import {
  type Code,
  Fn,
  block,
  br,
  brIf,
  buildModule,
  call,
  f32,
  f32c,
  f32t,
  f32x4,
  f64,
  f64c,
  f64t,
  f64x2,
  forRange,
  get,
  highHalf,
  i32,
  i32c,
  i32t,
  i32x4,
  if_,
  loop,
  memory,
  seq,
  set,
  splatConst,
  v128,
  v128t,
} from './emit.js';
import { type WasmModule, wasm } from './wasm-api.js';

export const KIND_ATTENTION_FORWARD = 0;
export const KIND_ATTENTION_BACKWARD = 1;
export const KIND_CROSS_ENTROPY = 2;
export const KIND_SWIGLU = 3;
export const KIND_SWIGLU_BACKWARD = 4;
export const KIND_ADD = 5;
export const KIND_RMSNORM = 6;
export const KIND_RMSNORM_BACKWARD = 7;
export const KIND_ROPE = 8;

/** Descriptor of an attention call: i32 slots (scale is an f32); pointers are byte addresses. */
export const ATTN = {
  B: 0,
  T: 1,
  Tk: 2,
  H: 3,
  Hkv: 4,
  hd: 5,
  offset: 6,
  q: 7,
  ldq: 8,
  k: 9,
  v: 10,
  ldk: 11,
  kvStride: 12,
  probs: 13,
  out: 14,
  ldo: 15,
  scale: 16,
  scratch: 17,
  scratchStride: 18,
  TkPad: 19,
  dOut: 20,
  dq: 21,
  dk: 22,
  dv: 23,
  SLOTS: 24,
} as const;

/**
 * Descriptor of a cross-entropy call over rows×vocab logits at x (in place). Job i covers rows
 * [i·rowsPerJob, …). weights: f32 per row (already divided by the reduction's denominator);
 * stats: f64 (max, Σ e^(x−max)) per row; grad ≠ 0 turns each row into w·softmax.
 */
export const XENT = {
  x: 0,
  rows: 1,
  vocab: 2,
  weights: 3,
  stats: 4,
  grad: 5,
  rowsPerJob: 6,
  SLOTS: 8,
} as const;

/**
 * Descriptor of a swiglu call over n elements, job i covering [i·perJob, …): forward
 * out = silu(gate)·up; backward out = dGate, dUp from dOut.
 */
export const SWIGLU = {
  gate: 0,
  up: 1,
  dOut: 2,
  out: 3,
  dUp: 4,
  n: 5,
  perJob: 6,
  SLOTS: 8,
} as const;

/** Descriptor of add: out = a + b over n elements, job i covering [i·perJob, …). */
export const ADD = { a: 0, b: 1, out: 2, n: 3, perJob: 4, SLOTS: 8 } as const;

/**
 * Descriptor of rmsnorm (forward: out, invRms when nonzero; backward: dx, and the partial sums
 * of dWeight of job i at partial + i·dimPad floats when partial is nonzero). eps is an f32.
 */
export const NORM = {
  x: 0,
  w: 1,
  out: 2,
  invRms: 3,
  dOut: 4,
  partial: 5,
  rows: 6,
  dim: 7,
  eps: 8,
  rowsPerJob: 9,
  dimPad: 10,
  SLOTS: 12,
} as const;

/** Descriptor of rope over [tokens, heads, hd]; pos 0 means position = token index; sign is an f32 (−1: inverse). */
export const ROPE = {
  x: 0,
  out: 1,
  cos: 2,
  sin: 3,
  pos: 4,
  tokens: 5,
  heads: 6,
  hd: 7,
  sign: 8,
  tokensPerJob: 9,
  SLOTS: 12,
} as const;

/** Keys padded to a whole number of score tiles. */
export function padKeys(Tk: number): number {
  return (Tk + 7) & ~7;
}

/** Bytes of per-thread attention scratch for a head dimension and padded key count. */
export function attentionScratchBytes(hd: number, TkPad: number): number {
  return ((8 + hd) * TkPad + 16) * 4;
}

/** Bytes read past the end of an operand by partial vector loads: leave this much slack. */
export const SLACK_BYTES = 64;

const LOG2E = 1.4426950408889634;
const ROUND_MAGIC = 12582912; // 1.5 · 2^23
/** 2^f on [−½, ½], degree 5, fitted for relative error (about 2.4e-7 in float32 arithmetic). */
const EXP2_POLY = [1.0000001192092896, 0.6931469440460205, 0.24022118747234344, 0.055507078766822815, 0.009675555862486362, 0.0013278163969516754];

const c4 = (x: number): Code => i32c(x);
/** a·4 (bytes of a floats). */
const x4 = (a: Code): Code => i32.shl(a, i32c(2));
const add = (...xs: Code[]): Code => xs.reduce((s, x) => i32.add(s, x));
const mul = (a: Code, b: Code): Code => i32.mul(a, b);

/** Temporaries of the vector exp. */
interface ExpTmp {
  t: number;
  n: number;
  f: number;
}

function expTmp(fn: Fn): ExpTmp {
  return { t: fn.local(v128t), n: fn.local(v128t), f: fn.local(v128t) };
}

/**
 * e^x per lane as 2^t, t = x·log₂e clamped to [−126, 127]: 2^round(t) from the exponent bits
 * times a polynomial for 2^(t − round(t)). Relative error about 2.4e-7 + 4e-8·|t| (the rounding
 * of t), so a few 1e-6 only where e^x is below 1e-30; results saturate at 2^−126 and 2^127.
 * NaN stays NaN.
 */
function exp4(tmp: ExpTmp, x: Code): Code {
  let y: Code = splatConst(EXP2_POLY[5]!);
  for (let i = 4; i >= 0; i--) y = f32x4.add(f32x4.mul(y, get(tmp.f)), splatConst(EXP2_POLY[i]!));
  // Adding 1.5·2^23 rounds t to an integer held in the low mantissa bits: n = those bits, and
  // (bits + 127) << 23 is the float 2^n (the magic number's own bits shift out).
  return seq(
    set(tmp.t, f32x4.min(f32x4.max(f32x4.mul(x, splatConst(LOG2E)), splatConst(-126)), splatConst(127))),
    set(tmp.n, f32x4.add(get(tmp.t), splatConst(ROUND_MAGIC))),
    set(tmp.f, f32x4.sub(get(tmp.t), f32x4.sub(get(tmp.n), splatConst(ROUND_MAGIC)))),
    f32x4.mul(y, i32x4.shl(i32x4.add(get(tmp.n), i32x4.splat(i32c(127))), i32c(23))),
  );
}

/** Horizontal max of vector local v. */
function hmax(v: number): Code {
  const l = (k: number): Code => f32x4.extractLane(get(v), k);
  return f32.max(f32.max(l(0), l(1)), f32.max(l(2), l(3)));
}

/** acc (f64x2 local) += the four lanes of vector e, widened. */
function addWide(acc: number, e: Code, tmp: number): Code {
  return seq(set(tmp, e), set(acc, f64x2.add(get(acc), f64x2.add(f64x2.promoteLow(get(tmp)), f64x2.promoteLow(highHalf(get(tmp)))))));
}

/** Sum of the two lanes of an f64x2 local. */
function hsum64(acc: number): Code {
  return f64.add(f64x2.extractLane(get(acc), 0), f64x2.extractLane(get(acc), 1));
}

/** Stores the first `n` (an i32 local, 0…4) lanes of vector `v` at `addr`. */
function storeLanes(addr: Code, v: number, n: number): Code {
  return seq(
    if_(i32.gt_s(get(n), c4(0)), f32.store(addr, f32x4.extractLane(get(v), 0))),
    if_(i32.gt_s(get(n), c4(1)), f32.store(addr, f32x4.extractLane(get(v), 1), 4)),
    if_(i32.gt_s(get(n), c4(2)), f32.store(addr, f32x4.extractLane(get(v), 2), 8)),
    if_(i32.gt_s(get(n), c4(3)), f32.store(addr, f32x4.extractLane(get(v), 3), 12)),
  );
}

/**
 * Softmax of the scores of keys [0, lr) (lr ≥ 1) in the scratch row at byte address `row`:
 * writes e^(x − max) / Σ to `dst` [0, lr) and zeros to `dst` [lr, len). The scratch row is left
 * holding the exponentials.
 */
function softmaxRow(fn: Fn, t: ExpTmp, row: number, lr: number, dst: number, len: number): Code {
  const j = fn.local(i32t);
  const n4 = fn.local(i32t);
  const m = fn.local(f32t);
  const mv = fn.local(v128t);
  const e = fn.local(v128t);
  const acc = fn.local(v128t);
  const tmp = fn.local(v128t);
  const rem = fn.local(i32t);
  const at = (base: number, k: number): Code => i32.add(get(base), x4(get(k)));
  return seq(
    set(mv, splatConst(-Infinity)),
    set(n4, i32.and(get(lr), c4(~3))),
    forRange(j, c4(0), get(n4), c4(4), set(mv, f32x4.max(get(mv), v128.load(at(row, j))))),
    set(m, hmax(mv)),
    forRange(j, get(n4), get(lr), c4(1), set(m, f32.max(get(m), f32.load(at(row, j))))),
    // Exponentials of whole vectors, summed per lane; the lanes past lr are masked out.
    set(mv, f32x4.splat(get(m))),
    set(acc, f32x4.zero()),
    forRange(
      j,
      c4(0),
      get(n4),
      c4(4),
      set(e, exp4(t, f32x4.sub(v128.load(at(row, j)), get(mv)))),
      v128.store(at(row, j), get(e)),
      set(acc, f32x4.add(get(acc), get(e))),
    ),
    if_(
      i32.lt_s(get(n4), get(lr)),
      seq(
        set(e, exp4(t, f32x4.sub(v128.load(at(row, n4)), get(mv)))),
        // Keep lanes n4 + k < lr: lane k is kept when k < lr − n4.
        set(e, v128.and(get(e), f32x4.lt(f32x4.fromI32x4(LANES), f32x4.fromI32x4(i32x4.splat(i32.sub(get(lr), get(n4))))))),
        v128.store(at(row, n4), get(e)),
        set(acc, f32x4.add(get(acc), get(e))),
      ),
    ),
    set(tmp, f64x2.add(f64x2.promoteLow(get(acc)), f64x2.promoteLow(highHalf(get(acc))))),
    set(mv, f32x4.splat(f32.fromF64(f64.div(f64c(1), hsum64(tmp))))),
    forRange(j, c4(0), get(n4), c4(4), v128.store(at(dst, j), f32x4.mul(v128.load(at(row, j)), get(mv)))),
    set(rem, i32.sub(get(lr), get(n4))),
    if_(i32.gt_s(get(rem), c4(0)), seq(set(e, f32x4.mul(v128.load(at(row, n4)), get(mv))), storeLanes(at(dst, n4), e, rem))),
    memory.fill(at(dst, lr), c4(0), x4(i32.sub(get(len), get(lr)))),
  );
}

/** i32x4 (0, 1, 2, 3). */
const LANES: Code = [0xfd, 0x0c, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0];

/**
 * Score tiles: for j0 in [0, lim8) step 8, rows r < 4:
 *   dst_r[j0 … j0+8) = scale · Σ_d X_r[d] · YT[d, j0 … j0+8)
 * X_r are row addresses (locals), YT a [hd × TkPad] transposed block (byte row stride TkPad4).
 */
function scoreTiles(fn: Fn, X: number[], dst: number[], YT: number, TkPad4: number, hd4: number, lim8: number, scale: number | null): Code {
  const j0 = fn.local(i32t);
  const yp = fn.local(i32t);
  const xo = fn.local(i32t);
  const acc = fn.localsOf(v128t, 8);
  const b0 = fn.local(v128t);
  const b1 = fn.local(v128t);
  const a = fn.local(v128t);
  const inner: Code[] = [set(b0, v128.load(get(yp))), set(b1, v128.load(get(yp), 16))];
  for (let r = 0; r < 4; r++) {
    inner.push(
      set(a, v128.load32Splat(i32.add(get(X[r]!), get(xo)))),
      set(acc[2 * r]!, f32x4.add(get(acc[2 * r]!), f32x4.mul(get(a), get(b0)))),
      set(acc[2 * r + 1]!, f32x4.add(get(acc[2 * r + 1]!), f32x4.mul(get(a), get(b1)))),
    );
  }
  const stores: Code[] = [];
  for (let r = 0; r < 4; r++) {
    const at = i32.add(get(dst[r]!), x4(get(j0)));
    const sc = (v: number): Code => (scale === null ? get(v) : f32x4.mul(get(v), get(scale)));
    stores.push(v128.store(at, sc(acc[2 * r]!)), v128.store(at, sc(acc[2 * r + 1]!), 16));
  }
  return forRange(
    j0,
    c4(0),
    get(lim8),
    c4(8),
    ...acc.map((v) => set(v, f32x4.zero())),
    set(yp, i32.add(get(YT), x4(get(j0)))),
    set(xo, c4(0)),
    loop(...inner, set(yp, i32.add(get(yp), get(TkPad4))), set(xo, i32.add(get(xo), c4(4))), brIf(0, i32.lt_s(get(xo), get(hd4)))),
    ...stores,
  );
}

/**
 * Runs `pass(width)` over the head dimension in chunks: 8 floats (width 2) while they fit,
 * then 4 (width 1; the last may be partial). `d` receives the chunk's first index.
 */
function chunks(d: number, hd: number, pass: (width: 1 | 2) => Code): Code {
  return seq(
    set(d, c4(0)),
    block(loop(brIf(1, i32.gt_s(i32.add(get(d), c4(8)), get(hd))), pass(2), set(d, i32.add(get(d), c4(8))), br(0))),
    block(loop(brIf(1, i32.ge_s(get(d), get(hd))), pass(1), set(d, i32.add(get(d), c4(4))), br(0))),
  );
}

/**
 * out_r[d-chunk] = Σ_{j < lim} A_r[j] · Y[j, d-chunk] for rows r < R (written, not added).
 * A_r: row addresses of weights (floats); Y: base address of row 0 at chunk 0, byte stride ldy4;
 * out_r: row addresses.
 */
function weightedRows(fn: Fn, A: number[], Y: number, ldy4: number, out: number[], R: number, lim: number, d: number, hd: number): Code {
  const yp = fn.local(i32t);
  const jo = fn.local(i32t);
  const lim4 = fn.local(i32t);
  const rem = fn.local(i32t);
  const acc = fn.localsOf(v128t, 8);
  const ys = fn.localsOf(v128t, 2);
  const a = fn.local(v128t);
  return chunks(d, hd, (w) => {
    const inner: Code[] = [];
    for (let x = 0; x < w; x++) inner.push(set(ys[x]!, v128.load(get(yp), 16 * x)));
    for (let r = 0; r < 4; r++) {
      inner.push(set(a, v128.load32Splat(i32.add(get(A[r]!), get(jo)))));
      for (let x = 0; x < w; x++) inner.push(set(acc[r * w + x]!, f32x4.add(get(acc[r * w + x]!), f32x4.mul(get(a), get(ys[x]!)))));
    }
    const stores: Code[] = [];
    for (let r = 0; r < 4; r++) {
      const at = i32.add(get(out[r]!), x4(get(d)));
      const st =
        w === 2
          ? seq(v128.store(at, get(acc[2 * r]!)), v128.store(at, get(acc[2 * r + 1]!), 16))
          : if_(i32.ge_s(get(rem), c4(4)), v128.store(at, get(acc[r]!)), storeLanes(at, acc[r]!, rem));
      stores.push(if_(i32.lt_s(c4(r), get(R)), st));
    }
    return seq(
      ...acc.slice(0, 4 * w).map((v) => set(v, f32x4.zero())),
      set(rem, i32.sub(get(hd), get(d))),
      set(yp, i32.add(get(Y), x4(get(d)))),
      set(jo, c4(0)),
      set(lim4, x4(get(lim))),
      loop(...inner, set(yp, i32.add(get(yp), get(ldy4))), set(jo, i32.add(get(jo), c4(4))), brIf(0, i32.lt_s(get(jo), get(lim4)))),
      ...stores,
    );
  });
}

/**
 * Y[j, d-chunk] += Σ_{r < 4} A_r[j] · X_r[d-chunk] for j < lim (rows of A beyond the block are
 * zero). Y: base address of row 0, byte stride ldy4; X_r: row addresses.
 */
function accumulateRows(fn: Fn, A: number[], X: number[], Y: number, ldy4: number, lim: number, d: number, hd: number): Code {
  const yp = fn.local(i32t);
  const jo = fn.local(i32t);
  const lim4 = fn.local(i32t);
  const rem = fn.local(i32t);
  const xs = fn.localsOf(v128t, 8);
  const acc = fn.localsOf(v128t, 2);
  const a = fn.local(v128t);
  return chunks(d, hd, (w) => {
    const loads: Code[] = [];
    for (let r = 0; r < 4; r++) for (let x = 0; x < w; x++) loads.push(set(xs[r * w + x]!, v128.load(i32.add(get(X[r]!), x4(get(d))), 16 * x)));
    const inner: Code[] = [];
    for (let x = 0; x < w; x++) inner.push(set(acc[x]!, v128.load(get(yp), 16 * x)));
    for (let r = 0; r < 4; r++) {
      inner.push(set(a, v128.load32Splat(i32.add(get(A[r]!), get(jo)))));
      for (let x = 0; x < w; x++) inner.push(set(acc[x]!, f32x4.add(get(acc[x]!), f32x4.mul(get(a), get(xs[r * w + x]!)))));
    }
    if (w === 2) inner.push(v128.store(get(yp), get(acc[0]!)), v128.store(get(yp), get(acc[1]!), 16));
    else inner.push(if_(i32.ge_s(get(rem), c4(4)), v128.store(get(yp), get(acc[0]!)), storeLanes(get(yp), acc[0]!, rem)));
    return seq(
      ...loads,
      set(rem, i32.sub(get(hd), get(d))),
      set(yp, i32.add(get(Y), x4(get(d)))),
      set(jo, c4(0)),
      set(lim4, x4(get(lim))),
      loop(...inner, set(yp, i32.add(get(yp), get(ldy4))), set(jo, i32.add(get(jo), c4(4))), brIf(0, i32.lt_s(get(jo), get(lim4)))),
    );
  });
}

/** Copies a [rows × hd] block (byte row stride ld4) into YT [hd × TkPad], zero-padding columns. */
function transpose(fn: Fn, src: number, ld4: number, rows: number, hd: number, YT: number, TkPad4: number): Code {
  const j = fn.local(i32t);
  const d = fn.local(i32t);
  return seq(
    forRange(
      j,
      c4(0),
      get(rows),
      c4(1),
      forRange(d, c4(0), get(hd), c4(1), f32.store(add(get(YT), mul(get(d), get(TkPad4)), x4(get(j))), f32.load(add(get(src), mul(get(j), get(ld4)), x4(get(d)))))),
    ),
    forRange(d, c4(0), get(hd), c4(1), memory.fill(add(get(YT), mul(get(d), get(TkPad4)), x4(get(rows))), c4(0), i32.sub(get(TkPad4), x4(get(rows))))),
  );
}

/** Common prologue of the attention jobs: loads the descriptor into locals. */
class AttnLocals {
  readonly T: number;
  readonly Tk: number;
  readonly H: number;
  readonly Hkv: number;
  readonly hd: number;
  readonly hd4: number;
  readonly offset: number;
  readonly ldq4: number;
  readonly ldk4: number;
  readonly ldo4: number;
  readonly TkPad4: number;
  readonly b: number;
  readonly jk: number;
  readonly g: number;
  readonly S: number;
  readonly headOff: number;
  readonly scale: number;

  constructor(
    readonly fn: Fn,
    private readonly desc: number,
  ) {
    const I = (): number => fn.local(i32t);
    this.T = I();
    this.Tk = I();
    this.H = I();
    this.Hkv = I();
    this.hd = I();
    this.hd4 = I();
    this.offset = I();
    this.ldq4 = I();
    this.ldk4 = I();
    this.ldo4 = I();
    this.TkPad4 = I();
    this.b = I();
    this.jk = I();
    this.g = I();
    this.S = I();
    this.headOff = I();
    this.scale = fn.local(v128t);
  }

  ld(slot: number): Code {
    return i32.load(get(this.desc), slot * 4);
  }

  prologue(idx: number, tid: number): Code {
    return seq(
      set(this.T, this.ld(ATTN.T)),
      set(this.Tk, this.ld(ATTN.Tk)),
      set(this.H, this.ld(ATTN.H)),
      set(this.Hkv, this.ld(ATTN.Hkv)),
      set(this.hd, this.ld(ATTN.hd)),
      set(this.hd4, x4(get(this.hd))),
      set(this.offset, this.ld(ATTN.offset)),
      set(this.ldq4, x4(this.ld(ATTN.ldq))),
      set(this.ldk4, x4(this.ld(ATTN.ldk))),
      set(this.ldo4, x4(this.ld(ATTN.ldo))),
      set(this.TkPad4, x4(this.ld(ATTN.TkPad))),
      set(this.scale, f32x4.splat(f32.load(get(this.desc), ATTN.scale * 4))),
      set(this.b, i32.div_s(get(idx), get(this.Hkv))),
      set(this.jk, i32.sub(get(idx), mul(get(this.b), get(this.Hkv)))),
      set(this.g, i32.div_s(get(this.H), get(this.Hkv))),
      set(this.S, add(this.ld(ATTN.scratch), mul(get(tid), this.ld(ATTN.scratchStride)))),
      // Byte offset of this job's key/value head within k, v (and dk, dv).
      set(this.headOff, x4(add(mul(get(this.b), this.ld(ATTN.kvStride)), mul(get(this.jk), get(this.hd))))),
    );
  }
}

function attentionForward(): Fn {
  const fn = new Fn('attnForward', [i32t, i32t, i32t]);
  const [IDX, DESC, TID] = [0, 1, 2];
  const L = new AttnLocals(fn, DESC);
  const I = (): number => fn.local(i32t);
  const [KT, kB, vB, hh, h, qB, oB, pB, i0, R, lim, lim8, r, i, lr, row, d, tmp] = Array.from({ length: 18 }, I);
  const Q = [I(), I(), I(), I()];
  const Srow = [I(), I(), I(), I()];
  const O = [I(), I(), I(), I()];
  const P = [I(), I(), I(), I()];
  const rowP4 = I();
  const t = expTmp(fn);
  const { T, Tk, hd, hd4, TkPad4 } = L;
  fn.emit(
    L.prologue(IDX, TID),
    set(KT, i32.add(get(L.S), i32.shl(get(TkPad4), c4(2)))),
    set(kB, i32.add(L.ld(ATTN.k), get(L.headOff))),
    set(vB, i32.add(L.ld(ATTN.v), get(L.headOff))),
    transpose(fn, kB, L.ldk4, Tk, hd, KT, TkPad4),
    set(rowP4, x4(get(Tk))),
    ...Srow.map((s, k) => set(s, add(get(L.S), mul(c4(k), get(TkPad4))))),
    forRange(
      hh,
      c4(0),
      get(L.g),
      c4(1),
      set(h, add(mul(get(L.jk), get(L.g)), get(hh))),
      set(qB, add(L.ld(ATTN.q), mul(mul(get(L.b), get(T)), get(L.ldq4)), mul(get(h), get(hd4)))),
      set(oB, add(L.ld(ATTN.out), mul(mul(get(L.b), get(T)), get(L.ldo4)), mul(get(h), get(hd4)))),
      set(pB, add(L.ld(ATTN.probs), x4(mul(mul(add(mul(get(L.b), get(L.H)), get(h)), get(T)), get(Tk))))),
      forRange(
        i0,
        c4(0),
        get(T),
        c4(4),
        set(R, i32.min_s(c4(4), i32.sub(get(T), get(i0)))),
        set(tmp, add(get(L.offset), get(i0), get(R))),
        set(lim, i32.min_s(get(Tk), get(tmp))),
        set(lim8, i32.and(i32.add(get(lim), c4(7)), c4(~7))),
        ...Q.map((q, k) => set(q, add(get(qB), mul(i32.min_s(add(get(i0), c4(k)), i32.sub(get(T), c4(1))), get(L.ldq4))))),
        ...O.map((o, k) => set(o, add(get(oB), mul(add(get(i0), c4(k)), get(L.ldo4))))),
        scoreTiles(fn, Q, Srow, KT, TkPad4, hd4, lim8, L.scale),
        set(P[0]!, add(get(pB), mul(get(i0), get(rowP4)))),
        forRange(
          r,
          c4(0),
          get(R),
          c4(1),
          set(i, i32.add(get(i0), get(r))),
          set(tmp, add(get(L.offset), get(i), c4(1))),
          set(lr, i32.min_s(get(Tk), get(tmp))),
          set(row, add(get(L.S), mul(get(r), get(TkPad4)))),
          softmaxRow(fn, t, row, lr, P[0]!, Tk),
          set(P[0]!, i32.add(get(P[0]!), get(rowP4))),
        ),
        // Probability rows of the block (rows past the end repeat the last one; they are not stored).
        ...P.map((pr, k) => set(pr, add(get(pB), mul(i32.min_s(add(get(i0), c4(k)), i32.sub(get(T), c4(1))), get(rowP4))))),
        weightedRows(fn, P, vB, L.ldk4, O, R, lim, d, hd),
      ),
    ),
  );
  return fn;
}

function attentionBackward(): Fn {
  const fn = new Fn('attnBackward', [i32t, i32t, i32t]);
  const [IDX, DESC, TID] = [0, 1, 2];
  const L = new AttnLocals(fn, DESC);
  const I = (): number => fn.local(i32t);
  const [VT, kB, vB, dkB, dvB, hh, h, qB, doB, dqB, pB, i0, R, lim, lim8, j, d, tmp, lr] = Array.from({ length: 19 }, I);
  const Q = [I(), I(), I(), I()];
  const DO = [I(), I(), I(), I()];
  const DQ = [I(), I(), I(), I()];
  const Sd = [I(), I(), I(), I()];
  const Sp = [I(), I(), I(), I()];
  const acc = fn.local(v128t);
  const dd = fn.local(f32t);
  const ddv = fn.local(v128t);
  const e = fn.local(v128t);
  const { T, hd, hd4, TkPad4 } = L;
  const rowAt = (base: number, k: number, ld4: number): Code => add(get(base), mul(i32.min_s(add(get(i0), c4(k)), i32.sub(get(T), c4(1))), get(ld4)));
  const perRow: Code[] = [];
  for (let k = 0; k < 4; k++) {
    // P row (zero beyond its causal limit, all zero for rows past the end), D, then dS in place of dP.
    const sp = Sp[k]!;
    const sd = Sd[k]!;
    perRow.push(
      set(lr, i32.add(get(i0), c4(k + 1))),
      if_(
        i32.lt_s(c4(k), get(R)),
        seq(
          memory.copy(get(sp), add(get(pB), x4(mul(add(get(i0), c4(k)), get(T)))), x4(get(lr))),
          memory.fill(add(get(sp), x4(get(lr))), c4(0), x4(i32.sub(get(lim8), get(lr)))),
        ),
        memory.fill(get(sp), c4(0), x4(get(lim8))),
      ),
      set(acc, f64x2.zero()),
      forRange(j, c4(0), get(lim8), c4(4), addWide(acc, f32x4.mul(v128.load(add(get(sp), x4(get(j)))), v128.load(add(get(sd), x4(get(j))))), e)),
      set(dd, f32.fromF64(hsum64(acc))),
      set(ddv, f32x4.splat(get(dd))),
      forRange(
        j,
        c4(0),
        get(lim8),
        c4(4),
        v128.store(
          add(get(sd), x4(get(j))),
          f32x4.mul(f32x4.mul(v128.load(add(get(sp), x4(get(j)))), f32x4.sub(v128.load(add(get(sd), x4(get(j)))), get(ddv))), get(L.scale)),
        ),
      ),
    );
  }
  fn.emit(
    L.prologue(IDX, TID),
    set(VT, i32.add(get(L.S), i32.shl(get(TkPad4), c4(3)))),
    set(kB, i32.add(L.ld(ATTN.k), get(L.headOff))),
    set(vB, i32.add(L.ld(ATTN.v), get(L.headOff))),
    set(dkB, i32.add(L.ld(ATTN.dk), get(L.headOff))),
    set(dvB, i32.add(L.ld(ATTN.dv), get(L.headOff))),
    forRange(
      j,
      c4(0),
      get(T),
      c4(1),
      memory.fill(add(get(dkB), mul(get(j), get(L.ldk4))), c4(0), get(hd4)),
      memory.fill(add(get(dvB), mul(get(j), get(L.ldk4))), c4(0), get(hd4)),
    ),
    transpose(fn, vB, L.ldk4, T, hd, VT, TkPad4),
    ...Sd.map((s, k) => set(s, add(get(L.S), mul(c4(k), get(TkPad4))))),
    ...Sp.map((s, k) => set(s, add(get(L.S), mul(c4(k + 4), get(TkPad4))))),
    forRange(
      hh,
      c4(0),
      get(L.g),
      c4(1),
      set(h, add(mul(get(L.jk), get(L.g)), get(hh))),
      set(tmp, add(mul(mul(get(L.b), get(T)), get(L.ldq4)), mul(get(h), get(hd4)))),
      set(qB, i32.add(L.ld(ATTN.q), get(tmp))),
      set(dqB, i32.add(L.ld(ATTN.dq), get(tmp))),
      set(doB, add(L.ld(ATTN.dOut), mul(mul(get(L.b), get(T)), get(L.ldo4)), mul(get(h), get(hd4)))),
      set(pB, add(L.ld(ATTN.probs), x4(mul(mul(add(mul(get(L.b), get(L.H)), get(h)), get(T)), get(T))))),
      forRange(
        i0,
        c4(0),
        get(T),
        c4(4),
        set(R, i32.min_s(c4(4), i32.sub(get(T), get(i0)))),
        set(lim, i32.add(get(i0), get(R))),
        set(lim8, i32.and(i32.add(get(lim), c4(7)), c4(~7))),
        ...Q.map((q, k) => set(q, rowAt(qB, k, L.ldq4))),
        ...DO.map((o, k) => set(o, rowAt(doB, k, L.ldo4))),
        ...DQ.map((o, k) => set(o, add(get(dqB), mul(add(get(i0), c4(k)), get(L.ldq4))))),
        scoreTiles(fn, DO, Sd, VT, TkPad4, hd4, lim8, null),
        ...perRow,
        weightedRows(fn, Sd, kB, L.ldk4, DQ, R, lim, d, hd),
        accumulateRows(fn, Sd, Q, dkB, L.ldk4, lim, d, hd),
        accumulateRows(fn, Sp, DO, dvB, L.ldk4, lim, d, hd),
      ),
    ),
  );
  return fn;
}

function crossEntropyRows(): Fn {
  const fn = new Fn('crossEntropy', [i32t, i32t, i32t]);
  const [IDX, DESC] = [0, 1];
  const I = (): number => fn.local(i32t);
  const [x, rows, vocab, weights, stats, grad, r, r1, row, j, n4, rem, tmp] = Array.from({ length: 13 }, I);
  const w = fn.local(f32t);
  const m = fn.local(f32t);
  const sum = fn.local(f64t);
  const mv = fn.local(v128t);
  const acc = fn.local(v128t);
  const e = fn.local(v128t);
  const fv = fn.local(v128t);
  const t = expTmp(fn);
  const ld = (slot: number): Code => i32.load(get(DESC), slot * 4);
  const at = (k: Code): Code => i32.add(get(row), x4(k));
  fn.emit(
    set(x, ld(XENT.x)),
    set(rows, ld(XENT.rows)),
    set(vocab, ld(XENT.vocab)),
    set(weights, ld(XENT.weights)),
    set(stats, ld(XENT.stats)),
    set(grad, ld(XENT.grad)),
    set(r, mul(get(IDX), ld(XENT.rowsPerJob))),
    set(tmp, i32.add(get(r), ld(XENT.rowsPerJob))),
    set(r1, i32.min_s(get(rows), get(tmp))),
    set(n4, i32.and(get(vocab), c4(~3))),
    set(rem, i32.sub(get(vocab), get(n4))),
    block(
      loop(
        brIf(1, i32.ge_s(get(r), get(r1))),
        set(row, i32.add(get(x), x4(mul(get(r), get(vocab))))),
        set(w, f32.load(i32.add(get(weights), x4(get(r))))),
        if_(
          i32.and(i32.ne(get(grad), c4(0)), f32.eq(get(w), f32c(0))),
          seq(memory.fill(get(row), c4(0), x4(get(vocab))), f64.store(i32.add(get(stats), i32.shl(get(r), c4(4))), f64c(0)), f64.store(i32.add(get(stats), i32.shl(get(r), c4(4))), f64c(0), 8)),
          seq(
            set(mv, splatConst(-Infinity)),
            forRange(j, c4(0), get(n4), c4(4), set(mv, f32x4.max(get(mv), v128.load(at(get(j)))))),
            set(m, hmax(mv)),
            forRange(j, get(n4), get(vocab), c4(1), set(m, f32.max(get(m), f32.load(at(get(j)))))),
            set(mv, f32x4.splat(get(m))),
            set(acc, f64x2.zero()),
            if_(
              i32.eqz(get(grad)),
              seq(
                forRange(j, c4(0), get(n4), c4(4), addWide(acc, exp4(t, f32x4.sub(v128.load(at(get(j))), get(mv))), e)),
                set(sum, hsum64(acc)),
                if_(
                  i32.gt_s(get(rem), c4(0)),
                  seq(
                    set(e, exp4(t, f32x4.sub(v128.load(at(get(n4))), get(mv)))),
                    set(sum, f64.add(get(sum), f64.fromF32(f32x4.extractLane(get(e), 0)))),
                    if_(i32.gt_s(get(rem), c4(1)), set(sum, f64.add(get(sum), f64.fromF32(f32x4.extractLane(get(e), 1))))),
                    if_(i32.gt_s(get(rem), c4(2)), set(sum, f64.add(get(sum), f64.fromF32(f32x4.extractLane(get(e), 2))))),
                  ),
                ),
              ),
              seq(
                forRange(j, c4(0), get(n4), c4(4), set(e, exp4(t, f32x4.sub(v128.load(at(get(j))), get(mv)))), v128.store(at(get(j)), get(e)), addWide(acc, get(e), fv)),
                set(sum, hsum64(acc)),
                if_(
                  i32.gt_s(get(rem), c4(0)),
                  seq(
                    set(e, exp4(t, f32x4.sub(v128.load(at(get(n4))), get(mv)))),
                    storeLanes(at(get(n4)), e, rem),
                    forRange(j, get(n4), get(vocab), c4(1), set(sum, f64.add(get(sum), f64.fromF32(f32.load(at(get(j))))))),
                  ),
                ),
                set(fv, f32x4.splat(f32.fromF64(f64.div(f64.fromF32(get(w)), get(sum))))),
                forRange(j, c4(0), get(n4), c4(4), v128.store(at(get(j)), f32x4.mul(v128.load(at(get(j))), get(fv)))),
                forRange(j, get(n4), get(vocab), c4(1), f32.store(at(get(j)), f32.mul(f32.load(at(get(j))), f32x4.extractLane(get(fv), 0)))),
              ),
            ),
            f64.store(i32.add(get(stats), i32.shl(get(r), c4(4))), f64.fromF32(get(m))),
            f64.store(i32.add(get(stats), i32.shl(get(r), c4(4))), get(sum), 8),
          ),
        ),
        set(r, i32.add(get(r), c4(1))),
        br(0),
      ),
    ),
  );
  return fn;
}

/** swiglu (backward: its gradients) over one job's range of elements. */
function swigluJob(backward: boolean): Fn {
  const fn = new Fn(backward ? 'swigluBackward' : 'swiglu', [i32t, i32t, i32t]);
  const [IDX, DESC] = [0, 1];
  const I = (): number => fn.local(i32t);
  const [i, i1, n4, rem, o, tmp] = Array.from({ length: 6 }, I);
  const [g, u, e, s, gs, dv] = fn.localsOf(v128t, 6);
  const res = fn.localsOf(v128t, 2);
  const t = expTmp(fn);
  const ld = (slot: number): Code => i32.load(get(DESC), slot * 4);
  const at = (slot: number): Code => i32.add(ld(slot), get(o));
  const one = splatConst(1);
  // Computes res[0] (and res[1]) for the 4 elements at byte offset o.
  const body = backward
    ? seq(
        set(g, v128.load(at(SWIGLU.gate))),
        set(u, v128.load(at(SWIGLU.up))),
        set(dv, v128.load(at(SWIGLU.dOut))),
        set(e, exp4(t, f32x4.sub(f32x4.zero(), get(g)))),
        set(s, f32x4.div(one, f32x4.add(one, get(e)))),
        set(gs, f32x4.mul(get(g), get(s))),
        set(res[0]!, f32x4.mul(f32x4.mul(get(dv), get(u)), f32x4.add(get(s), f32x4.mul(get(gs), f32x4.sub(one, get(s)))))),
        set(res[1]!, f32x4.mul(get(dv), get(gs))),
      )
    : seq(
        set(g, v128.load(at(SWIGLU.gate))),
        set(e, exp4(t, f32x4.sub(f32x4.zero(), get(g)))),
        set(res[0]!, f32x4.div(f32x4.mul(get(g), v128.load(at(SWIGLU.up))), f32x4.add(one, get(e)))),
      );
  const store = (lanes: boolean): Code =>
    seq(
      lanes ? storeLanes(at(SWIGLU.out), res[0]!, rem) : v128.store(at(SWIGLU.out), get(res[0]!)),
      backward ? (lanes ? storeLanes(at(SWIGLU.dUp), res[1]!, rem) : v128.store(at(SWIGLU.dUp), get(res[1]!))) : [],
    );
  fn.emit(
    set(i, mul(get(IDX), ld(SWIGLU.perJob))),
    set(tmp, i32.add(get(i), ld(SWIGLU.perJob))),
    set(i1, i32.min_s(ld(SWIGLU.n), get(tmp))),
    set(n4, i32.add(get(i), i32.and(i32.sub(get(i1), get(i)), c4(~3)))),
    forRange(i, get(i), get(n4), c4(4), set(o, x4(get(i))), body, store(false)),
    set(rem, i32.sub(get(i1), get(n4))),
    if_(i32.gt_s(get(rem), c4(0)), seq(set(o, x4(get(n4))), body, store(true))),
  );
  return fn;
}

/** The range [lo, hi) of job IDX over `count` items in blocks of `per` (slots of the descriptor). */
function jobRange(fn: Fn, IDX: number, ld: (slot: number) => Code, perSlot: number, countSlot: number): [number, number] {
  const lo = fn.local(i32t);
  const hi = fn.local(i32t);
  const tmp = fn.local(i32t);
  fn.emit(set(lo, mul(get(IDX), ld(perSlot))), set(tmp, i32.add(get(lo), ld(perSlot))), set(hi, i32.min_s(ld(countSlot), get(tmp))));
  return [lo, hi];
}

function addJob(): Fn {
  const fn = new Fn('add', [i32t, i32t, i32t]);
  const [IDX, DESC] = [0, 1];
  const ld = (slot: number): Code => i32.load(get(DESC), slot * 4);
  const [i0, i1] = jobRange(fn, IDX, ld, ADD.perJob, ADD.n);
  const [i, n4, rem, o] = fn.localsOf(i32t, 4);
  const r = fn.local(v128t);
  const at = (slot: number): Code => i32.add(ld(slot), get(o));
  fn.emit(
    set(n4, i32.add(get(i0), i32.and(i32.sub(get(i1), get(i0)), c4(~3)))),
    forRange(i, get(i0), get(n4), c4(4), set(o, x4(get(i))), v128.store(at(ADD.out), f32x4.add(v128.load(at(ADD.a)), v128.load(at(ADD.b))))),
    set(rem, i32.sub(get(i1), get(n4))),
    set(o, x4(get(n4))),
    if_(i32.gt_s(get(rem), c4(0)), seq(set(r, f32x4.add(v128.load(at(ADD.a)), v128.load(at(ADD.b)))), storeLanes(at(ADD.out), r, rem))),
  );
  return fn;
}

/** Σ over [0, dim) of f(k) where f gives the vector at float offset k (lanes past dim masked), as f64. */
function rowSum(fn: Fn, dim: number, term: (k: number) => Code): Code {
  const k = fn.local(i32t);
  const n4 = fn.local(i32t);
  const acc = fn.local(v128t);
  const last = fn.local(v128t);
  const wide = fn.local(v128t);
  return seq(
    set(acc, f32x4.zero()),
    set(n4, i32.and(get(dim), c4(~3))),
    forRange(k, c4(0), get(n4), c4(4), set(acc, f32x4.add(get(acc), term(k)))),
    if_(
      i32.lt_s(get(n4), get(dim)),
      seq(
        set(k, get(n4)),
        set(last, v128.and(term(k), f32x4.lt(f32x4.fromI32x4(LANES), f32x4.fromI32x4(i32x4.splat(i32.sub(get(dim), get(n4))))))),
        set(acc, f32x4.add(get(acc), get(last))),
      ),
    ),
    set(wide, f64x2.add(f64x2.promoteLow(get(acc)), f64x2.promoteLow(highHalf(get(acc))))),
    hsum64(wide),
  );
}

/** Applies `body(k, rem)` to every vector of a row of dim floats; rem < 4 marks the partial last one. */
function rowVectors(fn: Fn, dim: number, body: (k: number, rem: number | null) => Code): Code {
  const k = fn.local(i32t);
  const n4 = fn.local(i32t);
  const rem = fn.local(i32t);
  return seq(
    set(n4, i32.and(get(dim), c4(~3))),
    forRange(k, c4(0), get(n4), c4(4), body(k, null)),
    set(rem, i32.sub(get(dim), get(n4))),
    if_(i32.gt_s(get(rem), c4(0)), seq(set(k, get(n4)), body(k, rem))),
  );
}

function rmsnormJob(): Fn {
  const fn = new Fn('rmsnorm', [i32t, i32t, i32t]);
  const [IDX, DESC] = [0, 1];
  const ld = (slot: number): Code => i32.load(get(DESC), slot * 4);
  const [r0, r1] = jobRange(fn, IDX, ld, NORM.rowsPerJob, NORM.rows);
  const [r, dim, xr, outr, w, invRms] = fn.localsOf(i32t, 6);
  const inv = fn.local(f32t);
  const iv = fn.local(v128t);
  const v = fn.local(v128t);
  const vec = (base: Code, k: number): Code => v128.load(i32.add(base, x4(get(k))));
  fn.emit(
    set(dim, ld(NORM.dim)),
    set(w, ld(NORM.w)),
    set(invRms, ld(NORM.invRms)),
    forRange(
      r,
      get(r0),
      get(r1),
      c4(1),
      set(xr, i32.add(ld(NORM.x), x4(mul(get(r), get(dim))))),
      set(outr, i32.add(ld(NORM.out), x4(mul(get(r), get(dim))))),
      set(
        inv,
        f32.fromF64(
          f64.div(
            f64c(1),
            f64.sqrt(f64.add(f64.div(rowSum(fn, dim, (k) => seq(set(v, vec(get(xr), k)), f32x4.mul(get(v), get(v)))), f64.fromI32(get(dim))), f64.fromF32(f32.load(get(DESC), NORM.eps * 4)))),
          ),
        ),
      ),
      if_(i32.ne(get(invRms), c4(0)), f32.store(i32.add(get(invRms), x4(get(r))), get(inv))),
      set(iv, f32x4.splat(get(inv))),
      rowVectors(fn, dim, (k, rem) =>
        rem === null
          ? v128.store(i32.add(get(outr), x4(get(k))), f32x4.mul(f32x4.mul(vec(get(xr), k), get(iv)), vec(get(w), k)))
          : seq(set(v, f32x4.mul(f32x4.mul(vec(get(xr), k), get(iv)), vec(get(w), k))), storeLanes(i32.add(get(outr), x4(get(k))), v, rem)),
      ),
    ),
  );
  return fn;
}

function rmsnormBackwardJob(): Fn {
  const fn = new Fn('rmsnormBackward', [i32t, i32t, i32t]);
  const [IDX, DESC] = [0, 1];
  const ld = (slot: number): Code => i32.load(get(DESC), slot * 4);
  const [r0, r1] = jobRange(fn, IDX, ld, NORM.rowsPerJob, NORM.rows);
  const [r, dim, xr, gr, dxr, w, part] = fn.localsOf(i32t, 7);
  const inv = fn.local(f32t);
  const [iv, cv, v] = fn.localsOf(v128t, 3);
  const vec = (base: Code, k: number): Code => v128.load(i32.add(base, x4(get(k))));
  fn.emit(
    set(dim, ld(NORM.dim)),
    set(w, ld(NORM.w)),
    set(part, ld(NORM.partial)),
    if_(i32.ne(get(part), c4(0)), seq(set(part, i32.add(get(part), x4(mul(get(IDX), ld(NORM.dimPad))))), memory.fill(get(part), c4(0), x4(ld(NORM.dimPad))))),
    forRange(
      r,
      get(r0),
      get(r1),
      c4(1),
      set(xr, i32.add(ld(NORM.x), x4(mul(get(r), get(dim))))),
      set(gr, i32.add(ld(NORM.dOut), x4(mul(get(r), get(dim))))),
      set(dxr, i32.add(ld(NORM.out), x4(mul(get(r), get(dim))))),
      set(inv, f32.load(i32.add(ld(NORM.invRms), x4(get(r))))),
      set(iv, f32x4.splat(get(inv))),
      // c = inv³ · Σ dOut·w·x / dim
      set(
        cv,
        f32x4.splat(
          f32.fromF64(
            f64.div(
              f64.mul(f64.fromF32(f32.mul(f32.mul(get(inv), get(inv)), get(inv))), rowSum(fn, dim, (k) => f32x4.mul(f32x4.mul(vec(get(gr), k), vec(get(w), k)), vec(get(xr), k)))),
              f64.fromI32(get(dim)),
            ),
          ),
        ),
      ),
      rowVectors(fn, dim, (k, rem) => {
        const dx = f32x4.sub(f32x4.mul(f32x4.mul(get(iv), vec(get(gr), k)), vec(get(w), k)), f32x4.mul(get(cv), vec(get(xr), k)));
        const at = i32.add(get(dxr), x4(get(k)));
        const partial = if_(
          i32.ne(get(part), c4(0)),
          v128.store(i32.add(get(part), x4(get(k))), f32x4.add(vec(get(part), k), f32x4.mul(f32x4.mul(vec(get(gr), k), vec(get(xr), k)), get(iv)))),
        );
        return rem === null ? seq(v128.store(at, dx), partial) : seq(set(v, dx), storeLanes(at, v, rem), partial);
      }),
    ),
  );
  return fn;
}

function ropeJob(): Fn {
  const fn = new Fn('rope', [i32t, i32t, i32t]);
  const [IDX, DESC] = [0, 1];
  const ld = (slot: number): Code => i32.load(get(DESC), slot * 4);
  const [t0, t1] = jobRange(fn, IDX, ld, ROPE.tokensPerJob, ROPE.tokens);
  const [t, h, heads, hd, half, half4, cs, sn, xo, oo, pos, i, n4] = fn.localsOf(i32t, 13);
  const [sgn, c, sv, x1, x2] = fn.localsOf(v128t, 5);
  const [cf, sf, a, b] = fn.localsOf(f32t, 4);
  fn.emit(
    set(heads, ld(ROPE.heads)),
    set(hd, ld(ROPE.hd)),
    set(half, i32.shr_s(get(hd), c4(1))),
    set(half4, x4(get(half))),
    set(pos, ld(ROPE.pos)),
    set(sgn, f32x4.splat(f32.load(get(DESC), ROPE.sign * 4))),
    set(n4, i32.and(get(half), c4(~3))),
    forRange(
      t,
      get(t0),
      get(t1),
      c4(1),
      set(i, get(t)),
      if_(i32.ne(get(pos), c4(0)), set(i, i32.load(i32.add(get(pos), x4(get(t)))))),
      set(cs, i32.add(ld(ROPE.cos), mul(get(i), get(half4)))),
      set(sn, i32.add(ld(ROPE.sin), mul(get(i), get(half4)))),
      forRange(
        h,
        c4(0),
        get(heads),
        c4(1),
        set(xo, i32.add(ld(ROPE.x), x4(mul(add(mul(get(t), get(heads)), get(h)), get(hd))))),
        set(oo, i32.add(ld(ROPE.out), x4(mul(add(mul(get(t), get(heads)), get(h)), get(hd))))),
        forRange(
          i,
          c4(0),
          get(n4),
          c4(4),
          set(c, v128.load(i32.add(get(cs), x4(get(i))))),
          set(sv, f32x4.mul(v128.load(i32.add(get(sn), x4(get(i)))), get(sgn))),
          set(x1, v128.load(i32.add(get(xo), x4(get(i))))),
          set(x2, v128.load(i32.add(add(get(xo), get(half4)), x4(get(i))))),
          v128.store(i32.add(get(oo), x4(get(i))), f32x4.sub(f32x4.mul(get(x1), get(c)), f32x4.mul(get(x2), get(sv)))),
          v128.store(i32.add(add(get(oo), get(half4)), x4(get(i))), f32x4.add(f32x4.mul(get(x2), get(c)), f32x4.mul(get(x1), get(sv)))),
        ),
        forRange(
          i,
          get(n4),
          get(half),
          c4(1),
          set(cf, f32.load(i32.add(get(cs), x4(get(i))))),
          set(sf, f32.mul(f32.load(i32.add(get(sn), x4(get(i)))), f32x4.extractLane(get(sgn), 0))),
          set(a, f32.load(i32.add(get(xo), x4(get(i))))),
          set(b, f32.load(i32.add(add(get(xo), get(half4)), x4(get(i))))),
          f32.store(i32.add(get(oo), x4(get(i))), f32.sub(f32.mul(get(a), get(cf)), f32.mul(get(b), get(sf)))),
          f32.store(i32.add(add(get(oo), get(half4)), x4(get(i))), f32.add(f32.mul(get(b), get(cf)), f32.mul(get(a), get(sf)))),
        ),
      ),
    ),
  );
  return fn;
}

function dispatcher(): Fn {
  const fn = new Fn('job', [i32t, i32t, i32t, i32t]);
  const args = [get(1), get(2), get(3)];
  fn.emit(
    if_(i32.eq(get(0), c4(KIND_ATTENTION_FORWARD)), call(0, ...args)),
    if_(i32.eq(get(0), c4(KIND_ATTENTION_BACKWARD)), call(1, ...args)),
    if_(i32.eq(get(0), c4(KIND_CROSS_ENTROPY)), call(2, ...args)),
    if_(i32.eq(get(0), c4(KIND_SWIGLU)), call(3, ...args)),
    if_(i32.eq(get(0), c4(KIND_SWIGLU_BACKWARD)), call(4, ...args)),
    if_(i32.eq(get(0), c4(KIND_ADD)), call(5, ...args)),
    if_(i32.eq(get(0), c4(KIND_RMSNORM)), call(6, ...args)),
    if_(i32.eq(get(0), c4(KIND_RMSNORM_BACKWARD)), call(7, ...args)),
    if_(i32.eq(get(0), c4(KIND_ROPE)), call(8, ...args)),
  );
  return fn;
}

let cached: WasmModule | undefined;

/** The kernel module's bytes (function order fixes the dispatcher's call indices). */
export function kernelModuleBytes(): Uint8Array {
  return buildModule({
    fns: [
      attentionForward(),
      attentionBackward(),
      crossEntropyRows(),
      swigluJob(false),
      swigluJob(true),
      addJob(),
      rmsnormJob(),
      rmsnormBackwardJob(),
      ropeJob(),
      dispatcher(),
    ],
    exports: ['job'],
    maxPages: 65536,
  });
}

/** The compiled kernel module (built once per process). */
export function kernelModule(): WasmModule {
  cached ??= new wasm.Module(kernelModuleBytes());
  return cached;
}
