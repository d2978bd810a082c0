// Block kernels of the merges that work from stored values block by block (src/merge/chunked.ts):
// linear and slerp. All pointers are byte addresses in linear memory. Inputs are BF16 (u16 bits)
// or F32 values, `stride` bytes apart per input; the output is BF16 or F32. Blocks are padded by
// the caller to a multiple of 4 values.
//
// The arithmetic is the TypeScript methods', value for value: float64 products and sums in model
// order from +0, one rounding to float32 (as a Float32Array store), then BF16 rounding to nearest
// even. A NaN result is not written with certainty of the same bits, so the kernels return 1 when
// any result is NaN and the caller redoes that block in TypeScript.

// @ts-ignore: decorator
@inline const ABS: i32 = 0x7fffffff;

// @ts-ignore: decorator
@inline function load4(p: usize, i: i32, bf16: bool): v128 {
  if (bf16) return i32x4.shl(v128.load16x4_u(p + (<usize>i << 1)), 16);
  return v128.load(p + (<usize>i << 2));
}

// @ts-ignore: decorator
@inline function value(p: usize, i: i32, bf16: bool): f32 {
  return bf16 ? reinterpret<f32>(<i32>load<u16>(p + (<usize>i << 1)) << 16) : load<f32>(p + (<usize>i << 2));
}

/** Stores four float32 results as BF16 or F32; returns a lane mask of NaN results. */
// @ts-ignore: decorator
@inline function store4(pout: usize, i: i32, o: v128, outBf16: bool): v128 {
  const isNan = i32x4.gt_u(v128.and(o, i32x4.splat(ABS)), i32x4.splat(0x7f800000));
  if (outBf16) {
    const rounded = i32x4.shr_u(i32x4.add(i32x4.add(o, i32x4.splat(0x7fff)), v128.and(i32x4.shr_u(o, 16), i32x4.splat(1))), 16);
    v128.store64_lane(pout + (<usize>i << 1), i16x8.narrow_i32x4_u(rounded, rounded), 0);
  } else {
    v128.store(pout + (<usize>i << 2), o);
  }
  return isNan;
}

/** Four float64 values (two pairs) rounded to float32, as one f32x4. */
// @ts-ignore: decorator
@inline function demote4(lo: v128, hi: v128): v128 {
  return i32x4.shuffle(f32x4.demote_f64x2_zero(lo), f32x4.demote_f64x2_zero(hi), 0, 1, 4, 5);
}

// @ts-ignore: decorator
@inline function linearImpl(pin: usize, stride: usize, m: i32, n: i32, pw: usize, divisor: f64, pout: usize, bf16: bool, outBf16: bool): i32 {
  const zero = f64x2.splat(0.0);
  const div = f64x2.splat(divisor);
  const scale = divisor != 1.0;
  let nan = i32x4.splat(0);
  for (let i = 0; i < n; i += 4) {
    let lo = zero;
    let hi = zero;
    let px = pin;
    for (let k = 0; k < m; k++) {
      const x = load4(px, i, bf16);
      const w = v128.load64_splat(pw + (<usize>k << 3));
      lo = f64x2.add(lo, f64x2.mul(w, f64x2.promote_low_f32x4(x)));
      hi = f64x2.add(hi, f64x2.mul(w, f64x2.promote_low_f32x4(i32x4.shuffle(x, x, 2, 3, 2, 3))));
      px += stride;
    }
    if (scale) {
      lo = f64x2.div(lo, div);
      hi = f64x2.div(hi, div);
    }
    nan = v128.or(nan, store4(pout, i, demote4(lo, hi), outBf16));
  }
  return v128.any_true(nan) ? 1 : 0;
}

/**
 * Σₖ wₖ·xₖ / divisor for `n` values of `m` inputs (the float64 weights at `pw`). flags: 1 BF16
 * inputs (else F32), 2 BF16 output (else F32). Returns 1 if a result is NaN.
 */
export function linearBlock(pin: usize, stride: usize, m: i32, n: i32, pw: usize, divisor: f64, flags: i32, pout: usize): i32 {
  const bf16 = (flags & 1) != 0;
  const outBf16 = (flags & 2) != 0;
  if (bf16) {
    if (outBf16) return linearImpl(pin, stride, m, n, pw, divisor, pout, true, true);
    return linearImpl(pin, stride, m, n, pw, divisor, pout, true, false);
  }
  if (outBf16) return linearImpl(pin, stride, m, n, pw, divisor, pout, false, true);
  return linearImpl(pin, stride, m, n, pw, divisor, pout, false, false);
}

// @ts-ignore: decorator
@inline function lerpImpl(p0: usize, p1: usize, n: i32, a: f64, b: f64, pout: usize, bf16: bool, outBf16: bool): i32 {
  const va = f64x2.splat(a);
  const vb = f64x2.splat(b);
  let nan = i32x4.splat(0);
  for (let i = 0; i < n; i += 4) {
    const x0 = load4(p0, i, bf16);
    const x1 = load4(p1, i, bf16);
    const lo = f64x2.add(f64x2.mul(va, f64x2.promote_low_f32x4(x0)), f64x2.mul(vb, f64x2.promote_low_f32x4(x1)));
    const hi = f64x2.add(
      f64x2.mul(va, f64x2.promote_low_f32x4(i32x4.shuffle(x0, x0, 2, 3, 2, 3))),
      f64x2.mul(vb, f64x2.promote_low_f32x4(i32x4.shuffle(x1, x1, 2, 3, 2, 3))),
    );
    nan = v128.or(nan, store4(pout, i, demote4(lo, hi), outBf16));
  }
  return v128.any_true(nan) ? 1 : 0;
}

/** a·x0 + b·x1 for `n` values (slerp's second pass); flags as `linearBlock`. Returns 1 if a result is NaN. */
export function lerpBlock(p0: usize, p1: usize, n: i32, a: f64, b: f64, flags: i32, pout: usize): i32 {
  const bf16 = (flags & 1) != 0;
  const outBf16 = (flags & 2) != 0;
  if (bf16) {
    if (outBf16) return lerpImpl(p0, p1, n, a, b, pout, true, true);
    return lerpImpl(p0, p1, n, a, b, pout, true, false);
  }
  if (outBf16) return lerpImpl(p0, p1, n, a, b, pout, false, true);
  return lerpImpl(p0, p1, n, a, b, pout, false, false);
}

// @ts-ignore: decorator
@inline function sumsImpl(p0: usize, p1: usize, n: i32, psums: usize, bf16: bool): void {
  let s0 = load<f64>(psums);
  let s1 = load<f64>(psums, 8);
  let s01 = load<f64>(psums, 16);
  for (let i = 0; i < n; i++) {
    const a = <f64>value(p0, i, bf16);
    const b = <f64>value(p1, i, bf16);
    s0 += a * a;
    s1 += b * b;
    s01 += a * b;
  }
  store<f64>(psums, s0);
  store<f64>(psums, s1, 8);
  store<f64>(psums, s01, 16);
}

/**
 * Adds Σx0², Σx1² and Σx0·x1 over `n` values to the three float64 sums at `psums`, each summed in
 * index order (slerp's first pass). flags: 1 BF16 inputs.
 */
export function sumsBlock(p0: usize, p1: usize, n: i32, psums: usize, flags: i32): void {
  if ((flags & 1) != 0) sumsImpl(p0, p1, n, psums, true);
  else sumsImpl(p0, p1, n, psums, false);
}

// @ts-ignore: decorator
@inline function bernoulliImpl(pstate: usize, pprob: usize, pout: usize, n: i32, threshold: f64, each: bool): void {
  let s0 = load<u32>(pstate);
  let s1 = load<u32>(pstate, 4);
  let s2 = load<u32>(pstate, 8);
  let s3 = load<u32>(pstate, 12);
  for (let i = 0; i < n; i++) {
    const r = rotl<u32>(s1 * 5, 7) * 9;
    const t = s1 << 9;
    s2 ^= s0;
    s3 ^= s1;
    s1 ^= s2;
    s0 ^= s3;
    s2 ^= t;
    s3 = rotl<u32>(s3, 11);
    let limit = threshold;
    if (each) {
      const p = <f64>load<f32>(pprob + (<usize>i << 2)) * 4294967296.0;
      limit = p < 0 ? 0 : p > 4294967296.0 ? 4294967296.0 : p;
    }
    store<u8>(pout + <usize>i, <f64>r < limit ? 1 : 0);
  }
  store<u32>(pstate, s0);
  store<u32>(pstate, s1, 4);
  store<u32>(pstate, s2, 8);
  store<u32>(pstate, s3, 12);
}

/**
 * DARE keep-mask draws: xoshiro128** from the four u32 state words at `pstate` (updated), one
 * draw per value; `pout[i]` = 1 where the draw is below `threshold` (a float64 in [0, 2³²], or NaN
 * for none), else 0. The same stream and marks as `Rng.fillBernoulli` (src/tensor/rng.ts).
 */
export function bernoulliFill(pstate: usize, pout: usize, n: i32, threshold: f64): void {
  bernoulliImpl(pstate, 0, pout, n, threshold, false);
}

/**
 * DELLA keep-mask draws: as `bernoulliFill` with a threshold per value, the float32 probability at
 * `pprob` times 2³² clamped to [0, 2³²] (NaN: not kept), as `Rng.fillBernoulliEach`.
 */
export function bernoulliEach(pstate: usize, pprob: usize, pout: usize, n: i32): void {
  bernoulliImpl(pstate, pprob, pout, n, 0, true);
}

/**
 * DARE's L1 norms: adds ‖x − b‖₁ and ‖(x − b) ⊙ mask‖₁ over `n` values to the two float64 sums
 * at `psums`, each in index order, with x − b rounded to float32 (as `maskedL1`). flags: 1 BF16.
 */
export function l1Masked(px: usize, pb: usize, pmask: usize, n: i32, psums: usize, flags: i32): void {
  const bf16 = (flags & 1) != 0;
  let before = load<f64>(psums);
  let after = load<f64>(psums, 8);
  for (let i = 0; i < n; i++) {
    const d = <f64>Mathf.abs(value(px, i, bf16) - value(pb, i, bf16));
    before += d;
    after += d * <f64>load<u8>(pmask + <usize>i);
  }
  store<f64>(psums, before);
  store<f64>(psums, after, 8);
}

/**
 * DARE's masked task vector of `n` values (a multiple of 4) as float32 at `pout`: (x − b) ⊙ mask,
 * times `scale` (float64, then rounded) with flag 4. flags: 1 BF16 inputs. Returns 1 if any
 * x − b is NaN (the caller redoes the block).
 */
export function maskedDelta(px: usize, pb: usize, pmask: usize, n: i32, scale: f64, flags: i32, pout: usize): i32 {
  const bf16 = (flags & 1) != 0;
  const scaled = (flags & 4) != 0;
  const vscale = f64x2.splat(scale);
  let nan = i32x4.splat(0);
  for (let i = 0; i < n; i += 4) {
    const d = f32x4.sub(load4(px, i, bf16), load4(pb, i, bf16));
    nan = v128.or(nan, f32x4.ne(d, d));
    const m = f32x4.convert_i32x4_u(i32x4.extend_low_i16x8_u(i16x8.extend_low_i8x16_u(v128.load32_zero(pmask + <usize>i))));
    let v = f32x4.mul(d, m);
    if (scaled) {
      const lo = f64x2.mul(f64x2.promote_low_f32x4(v), vscale);
      const hi = f64x2.mul(f64x2.promote_low_f32x4(i32x4.shuffle(v, v, 2, 3, 2, 3)), vscale);
      v = demote4(lo, hi);
    }
    v128.store(pout + (<usize>i << 2), v);
  }
  return v128.any_true(nan) ? 1 : 0;
}

/**
 * LoRA's update added to `rows` rows of W in place (`addLoraDelta`, src/lora/apply.ts): per row o,
 * row = Σₖ B[o, k]·A[k, :] in float64 over k in order (skipping B[o, k] = 0), then
 * W[o, :] = float32(W[o, :] + scale·row). A is [r, inF] and B [rows, r] float32, W [rows, inF]
 * float32; `prow` holds inF float64 values of scratch (inF a multiple of 2 here).
 */
export function loraRows(pa: usize, pb: usize, pw: usize, prow: usize, r: i32, inF: i32, rows: i32, scale: f64): void {
  const vscale = f64x2.splat(scale);
  for (let o = 0; o < rows; o++) {
    memory.fill(prow, 0, <usize>inF << 3);
    for (let k = 0; k < r; k++) {
      const bk = <f64>load<f32>(pb + ((<usize>o * <usize>r + <usize>k) << 2));
      if (bk == 0) continue;
      const vb = f64x2.splat(bk);
      const pak = pa + ((<usize>k * <usize>inF) << 2);
      for (let i = 0; i < inF; i += 2) {
        const pr = prow + (<usize>i << 3);
        v128.store(pr, f64x2.add(v128.load(pr), f64x2.mul(vb, f64x2.promote_low_f32x4(v128.load64_zero(pak + (<usize>i << 2))))));
      }
    }
    const pwo = pw + ((<usize>o * <usize>inF) << 2);
    for (let i = 0; i < inF; i += 2) {
      const w = f64x2.promote_low_f32x4(v128.load64_zero(pwo + (<usize>i << 2)));
      const v = f64x2.add(w, f64x2.mul(vscale, v128.load(prow + (<usize>i << 3))));
      v128.store64_lane(pwo + (<usize>i << 2), f32x4.demote_f64x2_zero(v), 0);
    }
  }
}
