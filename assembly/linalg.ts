// Householder tridiagonalisation of a symmetric n×n float64 matrix in linear memory (row-major at
// `pw`, lower triangle used and overwritten), in f64x2 SIMD. The arithmetic and its order are
// those of `householderTridiagonal` in src/tensor/linalg.ts (two partial sums in the symmetric
// product, even and odd columns), so the results are identical. Outputs: d (n values at `pd`),
// e (n − 1 at `pe`), τ (n − 2 at `ptau`); reflector s is left in the upper part of row s.
// `pp` is scratch for n values.

// @ts-ignore: decorator
@inline function at(base: usize, i: i32): usize {
  return base + (<usize>i << 3);
}

export function tridiagonalize(pw: usize, n: i32, pd: usize, pe: usize, ptau: usize, pp: usize): void {
  for (let s = 0; s < n - 2; s++) {
    const so = pw + (<usize>s * <usize>n << 3);
    store<f64>(at(pd, s), load<f64>(at(so, s)));
    // x = column s below the diagonal, copied into row s.
    let scale: f64 = 0;
    for (let i = s + 1; i < n; i++) {
      const v = load<f64>(pw + ((<usize>i * <usize>n + <usize>s) << 3));
      store<f64>(at(so, i), v);
      scale = Math.max(scale, Math.abs(v));
    }
    let tail: f64 = 0;
    if (scale > 0) {
      for (let i = s + 2; i < n; i++) {
        const t = load<f64>(at(so, i)) / scale;
        tail += t * t;
      }
    }
    if (scale == 0 || tail == 0) {
      store<f64>(at(pe, s), load<f64>(at(so, s + 1)));
      store<f64>(at(ptau, s), 0);
      continue;
    }
    const x0 = load<f64>(at(so, s + 1)) / scale;
    const norm = Math.sqrt(x0 * x0 + tail);
    const alpha = x0 > 0 ? -norm : norm;
    for (let i = s + 1; i < n; i++) store<f64>(at(so, i), load<f64>(at(so, i)) / scale);
    store<f64>(at(so, s + 1), x0 - alpha);
    const tau = 2 / ((x0 - alpha) * (x0 - alpha) + tail);
    store<f64>(at(ptau, s), tau);
    store<f64>(at(pe, s), alpha * scale);
    // p = τ·B·v over the lower triangle of B = W[s+1 …, s+1 …].
    for (let i = s + 1; i < n; i++) store<f64>(at(pp, i), 0);
    for (let i = s + 1; i < n; i++) {
      const io = pw + (<usize>i * <usize>n << 3);
      const vi = load<f64>(at(so, i));
      const vvi = f64x2.splat(vi);
      let acc = f64x2(load<f64>(at(io, i)) * vi, 0);
      let j = s + 1;
      for (; j + 1 < i; j += 2) {
        const b = v128.load(at(io, j));
        acc = f64x2.add(acc, f64x2.mul(b, v128.load(at(so, j))));
        v128.store(at(pp, j), f64x2.add(v128.load(at(pp, j)), f64x2.mul(b, vvi)));
      }
      let acc0 = f64x2.extract_lane(acc, 0);
      const acc1 = f64x2.extract_lane(acc, 1);
      if (j < i) {
        const b = load<f64>(at(io, j));
        acc0 += b * load<f64>(at(so, j));
        store<f64>(at(pp, j), load<f64>(at(pp, j)) + b * vi);
      }
      store<f64>(at(pp, i), load<f64>(at(pp, i)) + (acc0 + acc1));
    }
    let pv: f64 = 0;
    for (let i = s + 1; i < n; i++) {
      const pi = tau * load<f64>(at(pp, i));
      store<f64>(at(pp, i), pi);
      pv += pi * load<f64>(at(so, i));
    }
    const half = 0.5 * tau * pv;
    for (let i = s + 1; i < n; i++) store<f64>(at(pp, i), load<f64>(at(pp, i)) - half * load<f64>(at(so, i)));
    // B −= v·qᵀ + q·vᵀ on the lower triangle.
    for (let i = s + 1; i < n; i++) {
      const io = pw + (<usize>i * <usize>n << 3);
      const vi = load<f64>(at(so, i));
      const qi = load<f64>(at(pp, i));
      const vvi = f64x2.splat(vi);
      const vqi = f64x2.splat(qi);
      let j = s + 1;
      for (; j + 1 <= i; j += 2) {
        const w = v128.load(at(io, j));
        v128.store(at(io, j), f64x2.sub(f64x2.sub(w, f64x2.mul(vvi, v128.load(at(pp, j)))), f64x2.mul(vqi, v128.load(at(so, j)))));
      }
      if (j <= i) store<f64>(at(io, j), load<f64>(at(io, j)) - vi * load<f64>(at(pp, j)) - qi * load<f64>(at(so, j)));
    }
  }
  if (n >= 2) {
    store<f64>(at(pd, n - 2), load<f64>(pw + ((<usize>(n - 2) * <usize>n + <usize>(n - 2)) << 3)));
    store<f64>(at(pe, n - 2), load<f64>(pw + ((<usize>(n - 1) * <usize>n + <usize>(n - 2)) << 3)));
  }
  if (n >= 1) store<f64>(at(pd, n - 1), load<f64>(pw + ((<usize>(n - 1) * <usize>n + <usize>(n - 1)) << 3)));
}
