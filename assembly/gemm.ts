// Single-precision GEMM for WebAssembly SIMD (f32x4).
//
// All pointers are byte addresses in linear memory; all strides are in elements.
// C = alpha * op(A) * op(B) (+ C when accumulating), where op(A) is M x K and op(B) is K x N.
// Element (i, k) of op(A) lives at a + (i * sai + k * sak) * 4 and element (k, j) of op(B) at
// b + (k * sbk + j * sbj) * 4, so every storage order (plain or transposed) is a pair of strides.
//
// The driver follows the usual Goto/BLIS structure: B is packed into KC x NR panels, A into
// MR x KC panels, and a 2 x 16 register-blocked micro-kernel runs over the packed panels.
// Each output element is accumulated in the same order (k ascending, split at the same KC
// boundaries) whatever sub-block of C a call covers, so results do not depend on how the work
// is split between threads.

// @ts-ignore: decorator
@inline const MR: i32 = 2;
// @ts-ignore: decorator
@inline const NR: i32 = 16;
// @ts-ignore: decorator
@inline const KC: i32 = 256;
// @ts-ignore: decorator
@inline const MC: i32 = 128;
// @ts-ignore: decorator
@inline const NC: i32 = 1024;

/** Bytes of scratch space one concurrent caller of `gemm` needs. */
export function gemmScratchBytes(): i32 {
  return (MC * KC + KC * NC + MR * NR) * 4;
}

/** 2 x 16 micro-kernel: C[0..mr, 0..nr] (+)= alpha * sum_k pa[k, 0..2] x pb[k, 0..16]. */
function kernel(
  kc: i32,
  pa: usize,
  pb: usize,
  c: usize,
  ldc: usize,
  alpha: f32,
  keep: bool,
  mr: i32,
  nr: i32,
  tile: usize,
): void {
  let c00 = f32x4.splat(0);
  let c01 = f32x4.splat(0);
  let c02 = f32x4.splat(0);
  let c03 = f32x4.splat(0);
  let c10 = f32x4.splat(0);
  let c11 = f32x4.splat(0);
  let c12 = f32x4.splat(0);
  let c13 = f32x4.splat(0);
  for (let k = 0; k < kc; k++) {
    const a0 = v128.load32_splat(pa, 0);
    const a1 = v128.load32_splat(pa, 4);
    const b0 = v128.load(pb, 0);
    c00 = f32x4.add(c00, f32x4.mul(a0, b0));
    c10 = f32x4.add(c10, f32x4.mul(a1, b0));
    const b1 = v128.load(pb, 16);
    c01 = f32x4.add(c01, f32x4.mul(a0, b1));
    c11 = f32x4.add(c11, f32x4.mul(a1, b1));
    const b2 = v128.load(pb, 32);
    c02 = f32x4.add(c02, f32x4.mul(a0, b2));
    c12 = f32x4.add(c12, f32x4.mul(a1, b2));
    const b3 = v128.load(pb, 48);
    c03 = f32x4.add(c03, f32x4.mul(a0, b3));
    c13 = f32x4.add(c13, f32x4.mul(a1, b3));
    pa += 8;
    pb += 64;
  }
  const va = f32x4.splat(alpha);
  c00 = f32x4.mul(va, c00);
  c01 = f32x4.mul(va, c01);
  c02 = f32x4.mul(va, c02);
  c03 = f32x4.mul(va, c03);
  c10 = f32x4.mul(va, c10);
  c11 = f32x4.mul(va, c11);
  c12 = f32x4.mul(va, c12);
  c13 = f32x4.mul(va, c13);
  if (mr == MR && nr == NR) {
    const d = c + ldc;
    if (keep) {
      v128.store(c, f32x4.add(v128.load(c, 0), c00), 0);
      v128.store(c, f32x4.add(v128.load(c, 16), c01), 16);
      v128.store(c, f32x4.add(v128.load(c, 32), c02), 32);
      v128.store(c, f32x4.add(v128.load(c, 48), c03), 48);
      v128.store(d, f32x4.add(v128.load(d, 0), c10), 0);
      v128.store(d, f32x4.add(v128.load(d, 16), c11), 16);
      v128.store(d, f32x4.add(v128.load(d, 32), c12), 32);
      v128.store(d, f32x4.add(v128.load(d, 48), c13), 48);
    } else {
      v128.store(c, c00, 0);
      v128.store(c, c01, 16);
      v128.store(c, c02, 32);
      v128.store(c, c03, 48);
      v128.store(d, c10, 0);
      v128.store(d, c11, 16);
      v128.store(d, c12, 32);
      v128.store(d, c13, 48);
    }
    return;
  }
  v128.store(tile, c00, 0);
  v128.store(tile, c01, 16);
  v128.store(tile, c02, 32);
  v128.store(tile, c03, 48);
  v128.store(tile, c10, 64);
  v128.store(tile, c11, 80);
  v128.store(tile, c12, 96);
  v128.store(tile, c13, 112);
  for (let i = 0; i < mr; i++) {
    const row = c + <usize>i * ldc;
    const t = tile + <usize>(i * NR * 4);
    for (let j = 0; j < nr; j++) {
      const p = row + (<usize>j << 2);
      const v = load<f32>(t + (<usize>j << 2));
      store<f32>(p, keep ? load<f32>(p) + v : v);
    }
  }
}

/** Packs a kc x nc block of op(B) into NR-wide panels (k-major inside a panel), zero-padded. */
function packB(kc: i32, nc: i32, src: usize, sbk: usize, sbj: usize, dst: usize): void {
  for (let j0 = 0; j0 < nc; j0 += NR) {
    const w = min(NR, nc - j0);
    const s = src + <usize>j0 * sbj;
    if (w == NR && sbj == 4) {
      let p = s;
      for (let k = 0; k < kc; k++) {
        v128.store(dst, v128.load(p, 0), 0);
        v128.store(dst, v128.load(p, 16), 16);
        v128.store(dst, v128.load(p, 32), 32);
        v128.store(dst, v128.load(p, 48), 48);
        p += sbk;
        dst += 64;
      }
    } else if (w == NR && sbk == 4) {
      // op(B) column j is a contiguous row of the stored matrix: transpose 4 x 4 blocks.
      const k4 = kc & ~3;
      for (let jj = 0; jj < NR; jj += 4) {
        const r0 = s + <usize>jj * sbj;
        const r1 = r0 + sbj;
        const r2 = r1 + sbj;
        const r3 = r2 + sbj;
        let o = dst + (<usize>jj << 2);
        for (let k = 0; k < k4; k += 4) {
          const off = <usize>k << 2;
          const x0 = v128.load(r0 + off);
          const x1 = v128.load(r1 + off);
          const x2 = v128.load(r2 + off);
          const x3 = v128.load(r3 + off);
          const t0 = i32x4.shuffle(x0, x1, 0, 4, 1, 5);
          const t1 = i32x4.shuffle(x0, x1, 2, 6, 3, 7);
          const t2 = i32x4.shuffle(x2, x3, 0, 4, 1, 5);
          const t3 = i32x4.shuffle(x2, x3, 2, 6, 3, 7);
          v128.store(o, i64x2.shuffle(t0, t2, 0, 2), 0);
          v128.store(o, i64x2.shuffle(t0, t2, 1, 3), 64);
          v128.store(o, i64x2.shuffle(t1, t3, 0, 2), 128);
          v128.store(o, i64x2.shuffle(t1, t3, 1, 3), 192);
          o += 256;
        }
        for (let k = k4; k < kc; k++) {
          const off = <usize>k << 2;
          store<f32>(o, load<f32>(r0 + off), 0);
          store<f32>(o, load<f32>(r1 + off), 4);
          store<f32>(o, load<f32>(r2 + off), 8);
          store<f32>(o, load<f32>(r3 + off), 12);
          o += 64;
        }
      }
      dst += <usize>(kc * NR * 4);
    } else {
      for (let k = 0; k < kc; k++) {
        const p = s + <usize>k * sbk;
        let j = 0;
        for (; j < w; j++) store<f32>(dst + (<usize>j << 2), load<f32>(p + <usize>j * sbj));
        for (; j < NR; j++) store<f32>(dst + (<usize>j << 2), 0);
        dst += 64;
      }
    }
  }
}

/**
 * packA for op(A) = transpose of the stored matrix (element (i, k) at src + i * 4 + k * sak).
 * Works through 8 values of k at a time so that each panel receives whole cache lines and the
 * 8 source rows being read stay in L1 (they are often 4 KiB apart and share a cache set).
 */
function packATransposed(mc: i32, kc: i32, src: usize, sak: usize, dst: usize): void {
  const panels = mc >> 1;
  const odd = mc & 1;
  const panelBytes = <usize>(kc * MR * 4);
  let k0 = 0;
  for (; k0 + 8 <= kc; k0 += 8) {
    const s = src + <usize>k0 * sak;
    let d = dst + (<usize>k0 << 3);
    for (let p = 0; p < panels; p++) {
      const q = s + (<usize>p << 3);
      store<u64>(d, load<u64>(q), 0);
      store<u64>(d, load<u64>(q + sak), 8);
      store<u64>(d, load<u64>(q + 2 * sak), 16);
      store<u64>(d, load<u64>(q + 3 * sak), 24);
      store<u64>(d, load<u64>(q + 4 * sak), 32);
      store<u64>(d, load<u64>(q + 5 * sak), 40);
      store<u64>(d, load<u64>(q + 6 * sak), 48);
      store<u64>(d, load<u64>(q + 7 * sak), 56);
      d += panelBytes;
    }
  }
  for (; k0 < kc; k0++) {
    const s = src + <usize>k0 * sak;
    let d = dst + (<usize>k0 << 3);
    for (let p = 0; p < panels; p++) {
      store<u64>(d, load<u64>(s + (<usize>p << 3)));
      d += panelBytes;
    }
  }
  if (odd) {
    let d = dst + <usize>panels * panelBytes;
    let s = src + (<usize>panels << 3);
    for (let k = 0; k < kc; k++) {
      store<f32>(d, load<f32>(s), 0);
      store<f32>(d, 0, 4);
      s += sak;
      d += 8;
    }
  }
}

/** Packs an mc x kc block of op(A) into MR-tall panels (k-major inside a panel), zero-padded. */
function packA(mc: i32, kc: i32, src: usize, sai: usize, sak: usize, dst: usize): void {
  if (sai == 4 && sak != 4) {
    packATransposed(mc, kc, src, sak, dst);
    return;
  }
  for (let i0 = 0; i0 < mc; i0 += MR) {
    const s0 = src + <usize>i0 * sai;
    if (i0 + 1 < mc) {
      const s1 = s0 + sai;
      if (sak == 4) {
        const k4 = kc & ~3;
        for (let k = 0; k < k4; k += 4) {
          const off = <usize>k << 2;
          const x = v128.load(s0 + off);
          const y = v128.load(s1 + off);
          v128.store(dst, i32x4.shuffle(x, y, 0, 4, 1, 5), 0);
          v128.store(dst, i32x4.shuffle(x, y, 2, 6, 3, 7), 16);
          dst += 32;
        }
        for (let k = k4; k < kc; k++) {
          const off = <usize>k << 2;
          store<f32>(dst, load<f32>(s0 + off), 0);
          store<f32>(dst, load<f32>(s1 + off), 4);
          dst += 8;
        }
      } else {
        let p = s0;
        for (let k = 0; k < kc; k++) {
          store<f32>(dst, load<f32>(p), 0);
          store<f32>(dst, load<f32>(p + sai), 4);
          p += sak;
          dst += 8;
        }
      }
    } else {
      let p = s0;
      for (let k = 0; k < kc; k++) {
        store<f32>(dst, load<f32>(p), 0);
        store<f32>(dst, 0, 4);
        p += sak;
        dst += 8;
      }
    }
  }
}

/** One matrix: C[M x N] (+)= alpha * op(A) * op(B), strides in bytes. */
function block(
  M: i32,
  N: i32,
  K: i32,
  a: usize,
  sai: usize,
  sak: usize,
  b: usize,
  sbk: usize,
  sbj: usize,
  c: usize,
  ldc: usize,
  alpha: f32,
  accumulate: bool,
  scratch: usize,
): void {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate) {
      for (let i = 0; i < M; i++) memory.fill(c + <usize>i * ldc, 0, <usize>N << 2);
    }
    return;
  }
  const pa = scratch;
  const pb = scratch + <usize>(MC * KC * 4);
  const tile = pb + <usize>(KC * NC * 4);
  for (let jc = 0; jc < N; jc += NC) {
    const nc = min(NC, N - jc);
    for (let pc = 0; pc < K; pc += KC) {
      const kc = min(KC, K - pc);
      packB(kc, nc, b + <usize>pc * sbk + <usize>jc * sbj, sbk, sbj, pb);
      const keep = accumulate || pc > 0;
      for (let ic = 0; ic < M; ic += MC) {
        const mc = min(MC, M - ic);
        packA(mc, kc, a + <usize>ic * sai + <usize>pc * sak, sai, sak, pa);
        for (let jr = 0; jr < nc; jr += NR) {
          const nr = min(NR, nc - jr);
          const pbj = pb + <usize>(jr * kc * 4);
          const cj = c + <usize>ic * ldc + (<usize>(jc + jr) << 2);
          for (let ir = 0; ir < mc; ir += MR) {
            kernel(
              kc,
              pa + <usize>(ir * kc * 4),
              pbj,
              cj + <usize>ir * ldc,
              ldc,
              alpha,
              keep,
              min(MR, mc - ir),
              nr,
              tile,
            );
          }
        }
      }
    }
  }
}

/**
 * Batched GEMM over a sub-range of the output: rows [r0, r1) of the batch * M rows of all
 * output matrices stacked, and columns [n0, n1). Matrix t of A starts at element t * bsa (same
 * for B and C). Strides are in elements; `scratch` points at gemmScratchBytes() private bytes.
 */
export function gemm(
  r0: i32,
  r1: i32,
  n0: i32,
  n1: i32,
  M: i32,
  N: i32,
  K: i32,
  a: usize,
  sai: i32,
  sak: i32,
  bsa: i32,
  b: usize,
  sbk: i32,
  sbj: i32,
  bsb: i32,
  c: usize,
  ldc: i32,
  bsc: i32,
  alpha: f32,
  accumulate: i32,
  scratch: usize,
): void {
  if (M <= 0 || n1 <= n0) return;
  let r = r0;
  while (r < r1) {
    const t = r / M;
    const i0 = r - t * M;
    const i1 = min(M, r1 - t * M);
    block(
      i1 - i0,
      n1 - n0,
      K,
      a + ((<usize>t * <usize>bsa + <usize>i0 * <usize>sai + <usize>0) << 2),
      <usize>sai << 2,
      <usize>sak << 2,
      b + ((<usize>t * <usize>bsb + <usize>n0 * <usize>sbj) << 2),
      <usize>sbk << 2,
      <usize>sbj << 2,
      c + ((<usize>t * <usize>bsc + <usize>i0 * <usize>ldc + <usize>n0) << 2),
      <usize>ldc << 2,
      alpha,
      accumulate != 0,
      scratch,
    );
    r = (t + 1) * M;
  }
}

// Shared work descriptor for multi-threaded calls (i32 fields at these byte offsets).
// NEXT holds the job tag in its high 16 bits and the next unclaimed chunk in its low 16 bits.
// @ts-ignore: decorator
@inline const D_NEXT: usize = 0;
// @ts-ignore: decorator
@inline const D_DONE: usize = 4;
// @ts-ignore: decorator
@inline const D_CHUNKS: usize = 8;
// @ts-ignore: decorator
@inline const D_BY_ROWS: usize = 12;
// @ts-ignore: decorator
@inline const D_TOTAL: usize = 16;
// @ts-ignore: decorator
@inline const D_UNIT: usize = 20;
// @ts-ignore: decorator
@inline const D_ARGS: usize = 32;

/** Bytes of a work descriptor. */
export function workDescriptorBytes(): i32 {
  return <i32>D_ARGS + 20 * 4;
}

/**
 * Claims chunks of the job described at `desc` until none is left, runs each with this
 * thread's scratch space, and counts it in DONE (waking a waiter on DONE after the last one).
 * `tag` is the job tag (already shifted into the high 16 bits); a descriptor carrying another
 * tag belongs to another job and is left alone. Returns the number of chunks this call ran.
 *
 * The descriptor holds the arguments of `gemm` from M on (M, N, K, a, sai, sak, bsa, b, sbk,
 * sbj, bsb, c, ldc, bsc, alpha, accumulate) after r0, r1, n0, n1 of the whole job; chunk i
 * covers units [floor(u·i/n), floor(u·(i+1)/n)) of the split dimension (rows or columns),
 * where u is the number of `unit`-sized units and n the number of chunks.
 */
export function gemmWork(desc: usize, tag: i32, scratch: usize): i32 {
  let ran = 0;
  while (true) {
    const v = atomic.load<i32>(desc, D_NEXT);
    if ((v & 0xffff0000) != tag) break;
    const idx = v & 0xffff;
    const chunks = load<i32>(desc, D_CHUNKS);
    if (idx >= chunks) break;
    if (atomic.cmpxchg<i32>(desc + D_NEXT, v, v + 1) != v) continue;
    const total = load<i32>(desc, D_TOTAL);
    const unit = load<i32>(desc, D_UNIT);
    const units = (total + unit - 1) / unit;
    const lo = min(total, <i32>((<i64>units * idx) / chunks) * unit);
    const hi = min(total, <i32>((<i64>units * (idx + 1)) / chunks) * unit);
    const p = desc + D_ARGS;
    let r0 = load<i32>(p, 0);
    let r1 = load<i32>(p, 4);
    let n0 = load<i32>(p, 8);
    let n1 = load<i32>(p, 12);
    if (load<i32>(desc, D_BY_ROWS) != 0) {
      r1 = r0 + hi;
      r0 = r0 + lo;
    } else {
      n1 = n0 + hi;
      n0 = n0 + lo;
    }
    gemm(
      r0,
      r1,
      n0,
      n1,
      load<i32>(p, 16),
      load<i32>(p, 20),
      load<i32>(p, 24),
      load<usize>(p, 28),
      load<i32>(p, 32),
      load<i32>(p, 36),
      load<i32>(p, 40),
      load<usize>(p, 44),
      load<i32>(p, 48),
      load<i32>(p, 52),
      load<i32>(p, 56),
      load<usize>(p, 60),
      load<i32>(p, 64),
      load<i32>(p, 68),
      load<f32>(p, 72),
      load<i32>(p, 76),
      scratch,
    );
    ran++;
    if (atomic.add<i32>(desc, 1, D_DONE) + 1 == chunks) atomic.notify(desc + D_DONE);
  }
  return ran;
}
