// Kernels of the fused generalized-task-arithmetic merge (src/merge/gta.ts) for WebAssembly SIMD.
//
// All pointers are byte addresses in linear memory. A chunk of an input holds values as BF16 (u16
// bits) or F32. The base chunk is at `pbase` and model k's at `pbase + (k + 1) * stride`; chunks
// are readable up to a multiple of 4 values (the caller pads). The arithmetic is the same, value
// for value and in the same order, as the TypeScript kernel: float32 throughout (task vectors,
// weighting, sums over models, division, lambda, base + mixed), so the results are identical.

// @ts-ignore: decorator
@inline const ABS: i32 = 0x7fffffff;

/** Bytes per model in the parameter block of `combine`: thr (i32), cut (i32), weight (f32), 4 unused. */
// @ts-ignore: decorator
@inline const PARAM_BYTES: usize = 16;

let nanSeen: i32 = 0;

/** 1 when a kernel has read a NaN input value or made a NaN result since `clearNaN` (only where asked to track them). */
export function sawNaN(): i32 {
  return nanSeen;
}

export function clearNaN(): void {
  nanSeen = 0;
}

// @ts-ignore: decorator
@inline function load4(p: usize, i: i32, bf16: bool): v128 {
  if (bf16) return i32x4.shl(v128.load16x4_u(p + (<usize>i << 1)), 16);
  return v128.load(p + (<usize>i << 2));
}

/** Running maximum of the magnitudes' bit patterns: above 0x7f800000 means a NaN was seen. */
// @ts-ignore: decorator
@inline function maxMagnitude(mx: v128, bits: v128): v128 {
  return i32x4.max_u(mx, v128.and(bits, i32x4.splat(ABS)));
}

// @ts-ignore: decorator
@inline function noteNaN(mx: v128): void {
  if (v128.any_true(i32x4.gt_u(mx, i32x4.splat(0x7f800000)))) nanSeen = 1;
}

// @ts-ignore: decorator
@inline function keysImpl(pb: usize, px: usize, n: i32, pkeys: usize, bf16: bool): void {
  const abs = i32x4.splat(ABS);
  for (let i = 0; i < n; i += 4) {
    const b = load4(pb, i, bf16);
    const x = load4(px, i, bf16);
    v128.store(pkeys + (<usize>i << 2), v128.and(f32x4.sub(x, b), abs));
  }
}

/** Magnitude keys |x − base| (float32 bits without the sign) of `n` values (a multiple of 4) into `pkeys` (i32). */
export function tauKeys(pb: usize, px: usize, n: i32, pkeys: usize, bf16: i32): void {
  if (bf16) keysImpl(pb, px, n, pkeys, true);
  else keysImpl(pb, px, n, pkeys, false);
}

/** Lists the lanes set in `mask` of 4 keys (j0 = chunk-relative index of lane 0). */
// @ts-ignore: decorator
@inline function appendLanes(keys: v128, mask: i32, index: i32, plist: usize, m: i32, tmp: usize): i32 {
  v128.store(tmp, keys);
  while (mask != 0) {
    const l = ctz(mask);
    const p = plist + (<usize>m << 3);
    store<i32>(p, index + l);
    store<i32>(p, load<i32>(tmp + (<usize>l << 2)), 4);
    m++;
    mask &= mask - 1;
  }
  return m;
}

// @ts-ignore: decorator
@inline function sum4(v: v128): i32 {
  return i32x4.extract_lane(v, 0) + i32x4.extract_lane(v, 1) + i32x4.extract_lane(v, 2) + i32x4.extract_lane(v, 3);
}

// @ts-ignore: decorator
@inline function maxLane(mx: v128): i32 {
  let m = i32x4.extract_lane(mx, 0);
  if (<u32>i32x4.extract_lane(mx, 1) > <u32>m) m = i32x4.extract_lane(mx, 1);
  if (<u32>i32x4.extract_lane(mx, 2) > <u32>m) m = i32x4.extract_lane(mx, 2);
  if (<u32>i32x4.extract_lane(mx, 3) > <u32>m) m = i32x4.extract_lane(mx, 3);
  return m;
}

// The bracket pass of entries k and k + 1: two brackets over the same model's keys (computed
// once), each with its counts and list. (`windowImpl` is the one-bracket form.)
// @ts-ignore: decorator
@inline function windowTwo(
  pbase: usize,
  stride: usize,
  k: i32,
  len: i32,
  prm: usize,
  plists: usize,
  listStride: usize,
  pcounts: usize,
  index0: i32,
  tmp: usize,
  bf16: bool,
): void {
  const abs = i32x4.splat(ABS);
  const full = len & ~3;
  const tail = len - full;
  const pp = prm + (<usize>k << 4);
  const lo = i32x4.splat(load<i32>(pp));
  const hi = i32x4.splat(load<i32>(pp, 4));
  const lo2 = i32x4.splat(load<i32>(pp, 16));
  const hi2 = i32x4.splat(load<i32>(pp, 20));
  const px = pbase + <usize>load<i32>(pp, 8) * stride;
  const plist = plists + <usize>k * listStride;
  const plist2 = plist + listStride;
  let nGt = i32x4.splat(0);
  let nHi = i32x4.splat(0);
  let nLo = i32x4.splat(0);
  let nGt2 = i32x4.splat(0);
  let nHi2 = i32x4.splat(0);
  let nLo2 = i32x4.splat(0);
  let mx = i32x4.splat(0);
  let listed: i32 = 0;
  let listed2: i32 = 0;
  for (let i = 0; i < full; i += 4) {
    const b = load4(pbase, i, bf16);
    const x = load4(px, i, bf16);
    mx = maxMagnitude(maxMagnitude(mx, b), x);
    const key = v128.and(f32x4.sub(x, b), abs);
    const gtHi = i32x4.gt_s(key, hi);
    const eqHi = i32x4.eq(key, hi);
    nGt = i32x4.sub(nGt, gtHi);
    nHi = i32x4.sub(nHi, eqHi);
    nLo = i32x4.sub(nLo, i32x4.eq(key, lo));
    const inner = v128.andnot(i32x4.gt_s(key, lo), v128.or(gtHi, eqHi));
    if (v128.any_true(inner)) listed = appendLanes(key, i32x4.bitmask(inner), index0 + i, plist, listed, tmp);
    const gtHi2 = i32x4.gt_s(key, hi2);
    const eqHi2 = i32x4.eq(key, hi2);
    nGt2 = i32x4.sub(nGt2, gtHi2);
    nHi2 = i32x4.sub(nHi2, eqHi2);
    nLo2 = i32x4.sub(nLo2, i32x4.eq(key, lo2));
    const inner2 = v128.andnot(i32x4.gt_s(key, lo2), v128.or(gtHi2, eqHi2));
    if (v128.any_true(inner2)) listed2 = appendLanes(key, i32x4.bitmask(inner2), index0 + i, plist2, listed2, tmp);
  }
  if (tail) {
    const valid = i32x4.lt_s(i32x4(0, 1, 2, 3), i32x4.splat(tail));
    const b = v128.and(load4(pbase, full, bf16), valid);
    const x = v128.and(load4(px, full, bf16), valid);
    mx = maxMagnitude(maxMagnitude(mx, b), x);
    const key = v128.and(f32x4.sub(x, b), abs);
    const gtHi = v128.and(i32x4.gt_s(key, hi), valid);
    const eqHi = v128.and(i32x4.eq(key, hi), valid);
    nGt = i32x4.sub(nGt, gtHi);
    nHi = i32x4.sub(nHi, eqHi);
    nLo = i32x4.sub(nLo, v128.and(i32x4.eq(key, lo), valid));
    const inner = v128.and(v128.andnot(i32x4.gt_s(key, lo), v128.or(gtHi, eqHi)), valid);
    if (v128.any_true(inner)) listed = appendLanes(key, i32x4.bitmask(inner), index0 + full, plist, listed, tmp);
    const gtHi2 = v128.and(i32x4.gt_s(key, hi2), valid);
    const eqHi2 = v128.and(i32x4.eq(key, hi2), valid);
    nGt2 = i32x4.sub(nGt2, gtHi2);
    nHi2 = i32x4.sub(nHi2, eqHi2);
    nLo2 = i32x4.sub(nLo2, v128.and(i32x4.eq(key, lo2), valid));
    const inner2 = v128.and(v128.andnot(i32x4.gt_s(key, lo2), v128.or(gtHi2, eqHi2)), valid);
    if (v128.any_true(inner2)) listed2 = appendLanes(key, i32x4.bitmask(inner2), index0 + full, plist2, listed2, tmp);
  }
  const m = maxLane(mx);
  const pc = pcounts + (<usize>k << 5);
  store<i32>(pc, sum4(nGt));
  store<i32>(pc, sum4(nHi), 4);
  store<i32>(pc, sum4(nLo), 8);
  store<i32>(pc, listed, 12);
  store<i32>(pc, m, 16);
  store<i32>(pc, sum4(nGt2), 32);
  store<i32>(pc, sum4(nHi2), 36);
  store<i32>(pc, sum4(nLo2), 40);
  store<i32>(pc, listed2, 44);
  store<i32>(pc, m, 48);
  if (<u32>m > 0x7f800000) nanSeen = 1;
}

// @ts-ignore: decorator
@inline function windowImpl(
  pbase: usize,
  stride: usize,
  models: i32,
  len: i32,
  prm: usize,
  plists: usize,
  listStride: usize,
  pcounts: usize,
  index0: i32,
  bf16: bool,
): void {
  const abs = i32x4.splat(ABS);
  const full = len & ~3;
  const tail = len - full;
  const tmp = pcounts + (<usize>models << 5);
  for (let k = 0; k < models; k++) {
    const pp = prm + (<usize>k << 4);
    const lo = i32x4.splat(load<i32>(pp));
    const hi = i32x4.splat(load<i32>(pp, 4));
    const px = pbase + <usize>load<i32>(pp, 8) * stride;
    const plist = plists + <usize>k * listStride;
    let nGt = i32x4.splat(0);
    let nHi = i32x4.splat(0);
    let nLo = i32x4.splat(0);
    let mx = i32x4.splat(0);
    let listed: i32 = 0;
    for (let i = 0; i < full; i += 4) {
      const b = load4(pbase, i, bf16);
      const x = load4(px, i, bf16);
      mx = maxMagnitude(maxMagnitude(mx, b), x);
      const key = v128.and(f32x4.sub(x, b), abs);
      const gtHi = i32x4.gt_s(key, hi);
      const eqHi = i32x4.eq(key, hi);
      const eqLo = i32x4.eq(key, lo);
      nGt = i32x4.sub(nGt, gtHi);
      nHi = i32x4.sub(nHi, eqHi);
      nLo = i32x4.sub(nLo, eqLo);
      const inner = v128.andnot(i32x4.gt_s(key, lo), v128.or(gtHi, eqHi));
      if (v128.any_true(inner)) listed = appendLanes(key, i32x4.bitmask(inner), index0 + i, plist, listed, tmp);
    }
    if (tail) {
      const valid = i32x4.lt_s(i32x4(0, 1, 2, 3), i32x4.splat(tail));
      const b = v128.and(load4(pbase, full, bf16), valid);
      const x = v128.and(load4(px, full, bf16), valid);
      mx = maxMagnitude(maxMagnitude(mx, b), x);
      const key = v128.and(f32x4.sub(x, b), abs);
      const gtHi = v128.and(i32x4.gt_s(key, hi), valid);
      const eqHi = v128.and(i32x4.eq(key, hi), valid);
      const eqLo = v128.and(i32x4.eq(key, lo), valid);
      nGt = i32x4.sub(nGt, gtHi);
      nHi = i32x4.sub(nHi, eqHi);
      nLo = i32x4.sub(nLo, eqLo);
      const inner = v128.and(v128.andnot(i32x4.gt_s(key, lo), v128.or(gtHi, eqHi)), valid);
      if (v128.any_true(inner)) listed = appendLanes(key, i32x4.bitmask(inner), index0 + full, plist, listed, tmp);
    }
    const pc = pcounts + (<usize>k << 5);
    store<i32>(pc, sum4(nGt));
    store<i32>(pc, sum4(nHi), 4);
    store<i32>(pc, sum4(nLo), 8);
    store<i32>(pc, listed, 12);
    let m = i32x4.extract_lane(mx, 0);
    if (<u32>i32x4.extract_lane(mx, 1) > <u32>m) m = i32x4.extract_lane(mx, 1);
    if (<u32>i32x4.extract_lane(mx, 2) > <u32>m) m = i32x4.extract_lane(mx, 2);
    if (<u32>i32x4.extract_lane(mx, 3) > <u32>m) m = i32x4.extract_lane(mx, 3);
    store<i32>(pc, m, 16);
    if (<u32>m > 0x7f800000) nanSeen = 1;
  }
}

/**
 * The bracket pass of the top-k selection over `len` values of `models` models. Per model, with
 * (lo, hi, slot) at `prm + 16k` (its chunk at `pbase + slot * stride`): counts the keys above hi,
 * equal to hi and equal to lo, and lists the pairs (index0 + j, key) of the keys strictly between
 * lo and hi at `plists + k * listStride`. Writes at `pcounts + 32k`: those three counts, the list
 * length, and the largest magnitude bit pattern of the inputs read (i32 each). flags: 1 BF16
 * input (else F32).
 */
export function windowPass(
  pbase: usize,
  stride: usize,
  models: i32,
  len: i32,
  prm: usize,
  plists: usize,
  listStride: usize,
  pcounts: usize,
  index0: i32,
  flags: i32,
): void {
  if ((flags & 1) != 0) windowImpl(pbase, stride, models, len, prm, plists, listStride, pcounts, index0, true);
  else windowImpl(pbase, stride, models, len, prm, plists, listStride, pcounts, index0, false);
}

/**
 * `windowPass` for `pairs` pairs of entries: entries 2p and 2p + 1 are two brackets over the same
 * model's keys (the slot of entry 2p), which are computed once for both; each entry has its
 * counts and list as in `windowPass`. flags: 1 BF16 input (else F32).
 */
export function windowPairs(
  pbase: usize,
  stride: usize,
  pairs: i32,
  len: i32,
  prm: usize,
  plists: usize,
  listStride: usize,
  pcounts: usize,
  index0: i32,
  flags: i32,
): void {
  const tmp = pcounts + (<usize>pairs << 6);
  if ((flags & 1) != 0) {
    for (let k = 0; k < 2 * pairs; k += 2) windowTwo(pbase, stride, k, len, prm, plists, listStride, pcounts, index0, tmp, true);
  } else {
    for (let k = 0; k < 2 * pairs; k += 2) windowTwo(pbase, stride, k, len, prm, plists, listStride, pcounts, index0, tmp, false);
  }
}

/** Adds the upper 16 bits of `len` keys to a histogram of 32768 u32 counts. */
export function histHigh(pkeys: usize, len: i32, phist: usize): void {
  for (let i = 0; i < len; i++) {
    const h = phist + (<usize>(load<u32>(pkeys + (<usize>i << 2)) >>> 16) << 2);
    store<u32>(h, load<u32>(h) + 1);
  }
}

/**
 * For the keys whose upper 16 bits are `bucket`: adds their lower 16 bits to a histogram of 65536
 * u32 counts and lists the pairs (index0 + j, key) at `plist`. Returns how many were listed.
 */
export function bucketKeys(pkeys: usize, len: i32, bucket: u32, plow: usize, index0: i32, plist: usize): i32 {
  let m: i32 = 0;
  for (let i = 0; i < len; i++) {
    const key = load<u32>(pkeys + (<usize>i << 2));
    if (key >>> 16 == bucket) {
      const h = plow + (<usize>(key & 0xffff) << 2);
      store<u32>(h, load<u32>(h) + 1);
      const p = plist + (<usize>m << 3);
      store<i32>(p, index0 + i);
      store<u32>(p, key, 4);
      m++;
    }
  }
  return m;
}

// @ts-ignore: decorator
@inline function combineImpl(
  pbase: usize,
  stride: usize,
  m: i32,
  n: i32,
  prm: usize,
  flags: i32,
  lambda: f32,
  scalarDiv: f32,
  pout: usize,
  pscratch: usize,
  bf16: bool,
  outBf16: bool,
  ties: bool,
  deltas: bool,
  exclude: bool,
): void {
  const consensus = (flags & 1) != 0;
  const normalize = (flags & 2) != 0;
  const scale = (flags & 4) != 0;
  const track = (flags & 32) != 0;
  const abs = i32x4.splat(ABS);
  const one = f32x4.splat(1.0);
  const minusOne = f32x4.splat(-1.0);
  const zero = f32x4.splat(0.0);
  const vlambda = f32x4.splat(lambda);
  const vdiv = f32x4.splat(scalarDiv);
  let mx = i32x4.splat(0);
  let idx = i32x4(0, 1, 2, 3);
  const four = i32x4.splat(4);
  for (let i = 0; i < n; i += 4) {
    const b = load4(pbase, i, bf16);
    if (track) mx = maxMagnitude(mx, b);
    let t = zero;
    let px = pbase;
    let pp = prm;
    let ps = pscratch;
    for (let k = 0; k < m; k++) {
      px += stride;
      const x = load4(px, i, bf16);
      if (track) mx = maxMagnitude(mx, x);
      const tau = deltas ? x : f32x4.sub(x, b);
      const key = v128.and(tau, abs);
      const thr = v128.load32_splat(pp);
      let keep = i32x4.gt_s(key, thr);
      if (ties) keep = v128.or(keep, v128.and(i32x4.eq(key, thr), i32x4.lt_s(idx, v128.load32_splat(pp, 4))));
      if (exclude) {
        // Dropped: the exclusion rule's own top-k (same form: key above it, or equal and before its cut).
        const pe = pp + <usize>m * PARAM_BYTES;
        const thrE = v128.load32_splat(pe);
        let drop = i32x4.gt_s(key, thrE);
        if (ties) drop = v128.or(drop, v128.and(i32x4.eq(key, thrE), i32x4.lt_s(idx, v128.load32_splat(pe, 4))));
        keep = v128.andnot(keep, drop);
      }
      const kept = f32x4.mul(tau, v128.and(keep, one));
      const v = f32x4.mul(v128.load32_splat(pp, 8), kept);
      v128.store(ps, v);
      t = f32x4.add(t, v);
      pp += PARAM_BYTES;
      ps += 16;
    }
    let val: v128;
    if (consensus) {
      const s = v128.bitselect(one, minusOne, f32x4.ge(t, zero));
      let mixed = zero;
      let div = zero;
      pp = prm;
      ps = pscratch;
      for (let k = 0; k < m; k++) {
        const v = v128.load(ps);
        const a = v128.and(f32x4.gt(f32x4.mul(v, s), zero), one);
        mixed = f32x4.add(mixed, f32x4.mul(v, a));
        div = f32x4.add(div, f32x4.mul(v128.load32_splat(pp, 8), a));
        pp += PARAM_BYTES;
        ps += 16;
      }
      val = mixed;
      if (normalize) val = f32x4.div(val, v128.bitselect(one, div, f32x4.eq(div, zero)));
    } else {
      val = t;
      if (normalize) val = f32x4.div(val, vdiv);
    }
    if (scale) val = f32x4.mul(val, vlambda);
    const o = f32x4.add(b, val);
    // NaN outputs (whose payloads may differ from the TypeScript combine's) are noted.
    if (deltas || exclude || track) mx = maxMagnitude(mx, o);
    if (outBf16) {
      const isNan = i32x4.gt_u(v128.and(o, abs), i32x4.splat(0x7f800000));
      const hi = i32x4.shr_u(o, 16);
      const rounded = i32x4.shr_u(i32x4.add(i32x4.add(o, i32x4.splat(0x7fff)), v128.and(hi, i32x4.splat(1))), 16);
      const quiet = v128.or(v128.and(hi, i32x4.splat(0x8000)), i32x4.splat(0x7fc0));
      const h = v128.bitselect(quiet, rounded, isNan);
      v128.store64_lane(pout + (<usize>i << 1), i16x8.narrow_i32x4_u(h, h), 0);
    } else {
      v128.store(pout + (<usize>i << 2), o);
    }
    if (ties) idx = i32x4.add(idx, four);
  }
  if (track || deltas || exclude) noteNaN(mx);
}

// The combine for at most 4 models, without the ties rule, for chunks whose values are known to
// give finite task vectors and weighted values (checked by the caller from the magnitudes the
// bracket pass saw): then tau · keep and v · agree equal masking with the keep / agree mask (a
// zero of either sign adds nothing to a sum that starts at +0), and v · s > 0 equals
// (v with its sign flipped where s = −1) > 0. The sums may overflow to ±Inf (never NaN), and
// from there on both combines do the same operations.

// @ts-ignore: decorator
@inline function keptOf(px: usize, i: i32, b: v128, thr: v128, thrE: v128, bf16: bool, exclude: bool): v128 {
  const tau = f32x4.sub(load4(px, i, bf16), b);
  const key = v128.and(tau, i32x4.splat(ABS));
  let keep = i32x4.gt_s(key, thr);
  if (exclude) keep = v128.andnot(keep, i32x4.gt_s(key, thrE));
  return v128.and(tau, keep);
}

// @ts-ignore: decorator
@inline function agreeMask(v: v128, flip: v128): v128 {
  return f32x4.gt(v128.xor(v, flip), f32x4.splat(0.0));
}

// @ts-ignore: decorator
@inline function fastImpl(
  M: i32,
  pbase: usize,
  stride: usize,
  n: i32,
  prm: usize,
  flags: i32,
  lambda: f32,
  pout: usize,
  bf16: bool,
  outBf16: bool,
  exclude: bool,
): void {
  const normalize = (flags & 2) != 0;
  const scale = (flags & 4) != 0;
  const one = f32x4.splat(1.0);
  const zero = f32x4.splat(0.0);
  const signBit = i32x4.splat(<i32>0x80000000);
  const vlambda = f32x4.splat(lambda);
  const t0 = v128.load32_splat(prm);
  const w0 = v128.load32_splat(prm, 8);
  const t1 = M > 1 ? v128.load32_splat(prm, 16) : t0;
  const w1 = M > 1 ? v128.load32_splat(prm, 24) : w0;
  const t2 = M > 2 ? v128.load32_splat(prm, 32) : t0;
  const w2 = M > 2 ? v128.load32_splat(prm, 40) : w0;
  const t3 = M > 3 ? v128.load32_splat(prm, 48) : t0;
  const w3 = M > 3 ? v128.load32_splat(prm, 56) : w0;
  const pe = prm + <usize>M * PARAM_BYTES;
  const e0 = exclude ? v128.load32_splat(pe) : t0;
  const e1 = exclude && M > 1 ? v128.load32_splat(pe, 16) : e0;
  const e2 = exclude && M > 2 ? v128.load32_splat(pe, 32) : e0;
  const e3 = exclude && M > 3 ? v128.load32_splat(pe, 48) : e0;
  const p0 = pbase + stride;
  const p1 = p0 + stride;
  const p2 = p1 + stride;
  const p3 = p2 + stride;
  for (let i = 0; i < n; i += 4) {
    const b = load4(pbase, i, bf16);
    // +0 + v0 differs from v0 only for −0, which the sign test reads as ≥ 0 either way.
    const v0 = f32x4.mul(w0, keptOf(p0, i, b, t0, e0, bf16, exclude));
    let t = v0;
    let v1 = zero, v2 = zero, v3 = zero;
    if (M > 1) {
      v1 = f32x4.mul(w1, keptOf(p1, i, b, t1, e1, bf16, exclude));
      t = f32x4.add(t, v1);
    }
    if (M > 2) {
      v2 = f32x4.mul(w2, keptOf(p2, i, b, t2, e2, bf16, exclude));
      t = f32x4.add(t, v2);
    }
    if (M > 3) {
      v3 = f32x4.mul(w3, keptOf(p3, i, b, t3, e3, bf16, exclude));
      t = f32x4.add(t, v3);
    }
    // The elected sign is − where the total is not ≥ 0. An agreeing value is never ±0, and a
    // masked one is +0, so the sums need no +0 to start from.
    const flip = v128.andnot(signBit, f32x4.ge(t, zero));
    let a = agreeMask(v0, flip);
    let mixed = v128.and(v0, a);
    let div = v128.and(w0, a);
    if (M > 1) {
      a = agreeMask(v1, flip);
      mixed = f32x4.add(mixed, v128.and(v1, a));
      div = f32x4.add(div, v128.and(w1, a));
    }
    if (M > 2) {
      a = agreeMask(v2, flip);
      mixed = f32x4.add(mixed, v128.and(v2, a));
      div = f32x4.add(div, v128.and(w2, a));
    }
    if (M > 3) {
      a = agreeMask(v3, flip);
      mixed = f32x4.add(mixed, v128.and(v3, a));
      div = f32x4.add(div, v128.and(w3, a));
    }
    if (normalize) mixed = f32x4.div(mixed, v128.bitselect(one, div, f32x4.eq(div, zero)));
    if (scale) mixed = f32x4.mul(mixed, vlambda);
    const o = f32x4.add(b, mixed);
    if (outBf16) {
      // NaN only from an overflowed sum (Inf / Inf, Inf · 0): quieted with its sign as in `combineImpl`.
      const isNan = i32x4.gt_u(v128.and(o, i32x4.splat(ABS)), i32x4.splat(0x7f800000));
      const hi = i32x4.shr_u(o, 16);
      const rounded = i32x4.shr_u(i32x4.add(i32x4.add(o, i32x4.splat(0x7fff)), v128.and(hi, i32x4.splat(1))), 16);
      const h = v128.bitselect(v128.or(v128.and(hi, i32x4.splat(0x8000)), i32x4.splat(0x7fc0)), rounded, isNan);
      v128.store64_lane(pout + (<usize>i << 1), i16x8.narrow_i32x4_u(h, h), 0);
    } else {
      v128.store(pout + (<usize>i << 2), o);
    }
  }
}

// @ts-ignore: decorator
@inline function fastDtypes(M: i32, pbase: usize, stride: usize, n: i32, prm: usize, flags: i32, lambda: f32, pout: usize, exclude: bool): void {
  const bf16 = (flags & 8) != 0;
  const outBf16 = (flags & 16) != 0;
  if (bf16) {
    if (outBf16) fastImpl(M, pbase, stride, n, prm, flags, lambda, pout, true, true, exclude);
    else fastImpl(M, pbase, stride, n, prm, flags, lambda, pout, true, false, exclude);
  } else {
    if (outBf16) fastImpl(M, pbase, stride, n, prm, flags, lambda, pout, false, true, exclude);
    else fastImpl(M, pbase, stride, n, prm, flags, lambda, pout, false, false, exclude);
  }
}

/**
 * `combine` with sign consensus for 1 to 4 models, no ties rule and values known to stay finite
 * (see above); same parameters and flags (1, 32 and 64 are ignored).
 */
export function combineFinite(pbase: usize, stride: usize, m: i32, n: i32, prm: usize, flags: i32, lambda: f32, pout: usize): void {
  if (m == 1) fastDtypes(1, pbase, stride, n, prm, flags, lambda, pout, false);
  else if (m == 2) fastDtypes(2, pbase, stride, n, prm, flags, lambda, pout, false);
  else if (m == 3) fastDtypes(3, pbase, stride, n, prm, flags, lambda, pout, false);
  else fastDtypes(4, pbase, stride, n, prm, flags, lambda, pout, false);
}

/**
 * `combineFinite` with an exclusion rule per model (the thresholds at `prm + 16m + 16k`, no
 * cuts; see `combineExcluding`).
 */
export function combineFiniteExcluding(pbase: usize, stride: usize, m: i32, n: i32, prm: usize, flags: i32, lambda: f32, pout: usize): void {
  if (m == 1) fastDtypes(1, pbase, stride, n, prm, flags, lambda, pout, true);
  else if (m == 2) fastDtypes(2, pbase, stride, n, prm, flags, lambda, pout, true);
  else if (m == 3) fastDtypes(3, pbase, stride, n, prm, flags, lambda, pout, true);
  else fastDtypes(4, pbase, stride, n, prm, flags, lambda, pout, true);
}

/**
 * The weighted, sparsified combine of `m` models onto the base for `n` values (a multiple of 4).
 * Per model, `prm + 16k` holds the keep rule (thr: keys above it are kept; cut: with flag 64, a
 * key equal to thr is kept below this chunk-relative index) and the float32 weight (at +8).
 * flags: 1 sign consensus, 2 normalize, 4 scale by lambda, 8 BF16 input (else F32), 16 BF16
 * output (else F32), 32 note NaN inputs and results, 64 apply the ties rule, 128 the models' chunks hold
 * float32 task vectors already (the unfused pipeline's sparsified ones: no x − base; F32 in and
 * out, no ties rule; NaN outputs are noted). `pscratch` holds 16 bytes per
 * model. All arithmetic is float32 (`lambda` and `scalarDiv` are float32 values).
 */
export function combine(
  pbase: usize,
  stride: usize,
  m: i32,
  n: i32,
  prm: usize,
  flags: i32,
  lambda: f32,
  scalarDiv: f32,
  pout: usize,
  pscratch: usize,
): void {
  const bf16 = (flags & 8) != 0;
  const outBf16 = (flags & 16) != 0;
  const ties = (flags & 64) != 0;
  if ((flags & 128) != 0) {
    combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, false, false, false, true, false);
    return;
  }
  if (ties) {
    if (bf16) {
      if (outBf16) combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, true, true, true, false, false);
      else combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, true, false, true, false, false);
    } else {
      if (outBf16) combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, false, true, true, false, false);
      else combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, false, false, true, false, false);
    }
  } else {
    if (bf16) {
      if (outBf16) combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, true, true, false, false, false);
      else combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, true, false, false, false, false);
    } else {
      if (outBf16) combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, false, true, false, false, false);
      else combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, false, false, false, false, false);
    }
  }
}

/**
 * `combine` (same parameters; flags 128 is not taken) with an exclusion rule per model at
 * `prm + 16m + 16k`: thr (i32) and cut (i32), as the keep rule's (the cut with flag 64). The keys
 * it selects are dropped from those kept: breadcrumbs' ranks [n_top, k) of the magnitudes. NaN
 * outputs are noted (`sawNaN`), as NaN inputs with flag 32.
 */
export function combineExcluding(
  pbase: usize,
  stride: usize,
  m: i32,
  n: i32,
  prm: usize,
  flags: i32,
  lambda: f32,
  scalarDiv: f32,
  pout: usize,
  pscratch: usize,
): void {
  const bf16 = (flags & 8) != 0;
  const outBf16 = (flags & 16) != 0;
  const ties = (flags & 64) != 0;
  if (ties) {
    if (bf16) {
      if (outBf16) combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, true, true, true, false, true);
      else combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, true, false, true, false, true);
    } else {
      if (outBf16) combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, false, true, true, false, true);
      else combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, false, false, true, false, true);
    }
  } else {
    if (bf16) {
      if (outBf16) combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, true, true, false, false, true);
      else combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, true, false, false, false, true);
    } else {
      if (outBf16) combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, false, true, false, false, true);
      else combineImpl(pbase, stride, m, n, prm, flags, lambda, scalarDiv, pout, pscratch, false, false, false, false, true);
    }
  }
}

// DELLA keep probabilities (src/merge/sparsify.ts `dellaProbabilities`) of contiguous rows: per
// row of `n` float32 task vector values, the ascending ranks of |value| (ties by lower index, a
// stable LSD radix sort on the 31 magnitude bits in 11-bit digits, as `magnitudeRanks`), then
// p = lo + (rank / (n − 1)) · 2 · epsilon in float64, stored as float32 (0.5 for the rank ratio
// of a one-value row). `pscratch` holds 4·n u32 plus 2048 u32 of counts.
export function dellaRows(pvals: usize, rows: i32, n: i32, lo: f64, epsilon: f64, pout: usize, pscratch: usize): void {
  const nn = <usize>n;
  let keys = pscratch;
  let keys2 = pscratch + (nn << 2);
  let idx = pscratch + (nn << 3);
  let idx2 = pscratch + nn * 12;
  const count = pscratch + (nn << 4);
  const denom = <f64>(n - 1);
  for (let r = 0; r < rows; r++) {
    const pv = pvals + ((<usize>r * nn) << 2);
    const po = pout + ((<usize>r * nn) << 2);
    keys = pscratch;
    keys2 = pscratch + (nn << 2);
    idx = pscratch + (nn << 3);
    idx2 = pscratch + nn * 12;
    let or: u32 = 0;
    let and: u32 = 0x7fffffff;
    for (let j = 0; j < n; j++) {
      const k = load<u32>(pv + (<usize>j << 2)) & 0x7fffffff;
      store<u32>(keys + (<usize>j << 2), k);
      store<u32>(idx + (<usize>j << 2), <u32>j);
      or |= k;
      and &= k;
    }
    const varying = or ^ and;
    for (let shift: u32 = 0; shift < 31; shift += 11) {
      if (((varying >>> shift) & 0x7ff) == 0) continue;
      memory.fill(count, 0, 2048 << 2);
      for (let j = 0; j < n; j++) {
        const p = count + (<usize>((load<u32>(keys + (<usize>j << 2)) >>> shift) & 0x7ff) << 2);
        store<u32>(p, load<u32>(p) + 1);
      }
      let sum: u32 = 0;
      for (let d = 0; d < 2048; d++) {
        const p = count + (<usize>d << 2);
        const c = load<u32>(p);
        store<u32>(p, sum);
        sum += c;
      }
      for (let j = 0; j < n; j++) {
        const k = load<u32>(keys + (<usize>j << 2));
        const p = count + (<usize>((k >>> shift) & 0x7ff) << 2);
        const pos = load<u32>(p);
        store<u32>(p, pos + 1);
        store<u32>(keys2 + (<usize>pos << 2), k);
        store<u32>(idx2 + (<usize>pos << 2), load<u32>(idx + (<usize>j << 2)));
      }
      let t = keys;
      keys = keys2;
      keys2 = t;
      t = idx;
      idx = idx2;
      idx2 = t;
    }
    for (let s = 0; s < n; s++) {
      const j = <usize>load<u32>(idx + (<usize>s << 2));
      const ratio: f64 = n > 1 ? <f64>s / denom : 0.5;
      store<f32>(po + (j << 2), <f32>(lo + ratio * 2 * epsilon));
    }
  }
}
