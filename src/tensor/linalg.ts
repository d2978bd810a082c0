/**
 * Dense linear algebra in float64 on row-major matrices: symmetric eigendecomposition
 * (Householder tridiagonalisation + implicit QL), thin SVD (one-sided Jacobi, after a Householder
 * QR when the matrix is tall), randomised truncated SVD, Householder QR and orthonormal bases.
 *
 * Conventions: an m×n matrix is a Float64Array (or Float32Array for inputs) of length m·n, element
 * (i, j) at i·n + j. Inputs are never modified.
 */
import { AmalgamError } from '../errors.js';
import { tridiagonalizeWasm } from './linalg-wasm.js';
import { Rng } from './rng.js';

/** A row-major matrix given as input (read only). */
export type MatrixInput = Float64Array | Float32Array;

export interface EighResult {
  /** Eigenvalues, ascending. */
  values: Float64Array;
  /** n×n row-major; column j (elements j, n + j, 2n + j, ...) is the unit eigenvector of values[j]. */
  vectors: Float64Array;
}

export interface SvdResult {
  /** Number of singular triplets. */
  k: number;
  /** m×k row-major, orthonormal columns. */
  U: Float64Array;
  /** k singular values, descending, ≥ 0. */
  S: Float64Array;
  /** k×n row-major, orthonormal rows (row j is the right singular vector of S[j]). */
  Vt: Float64Array;
}

export interface QrResult {
  /** m×k row-major with orthonormal columns, k = min(m, n). */
  Q: Float64Array;
  /** k×n row-major, upper triangular. */
  R: Float64Array;
  k: number;
}

export interface RandomizedSvdOptions {
  /** Extra random directions beyond k (default 10). */
  oversample?: number;
  /** Power (subspace) iterations (default 2). */
  powerIters?: number;
  /** Seed of the Gaussian test matrix (default 0). */
  seed?: number;
  /**
   * Float32 products for the large steps (the sketch A·Ω, the power iterations' Aᵀ·Q and A·Z, and
   * Qᵀ·A): out[M×N] = op(X)·Y with op(X) = Xᵀ under `transA` (X stored K×M), e.g. a compute
   * backend's `matmul`. The orthonormalisations and the small SVD stay float64. Default: every
   * product in float64 here.
   */
  matmul32?: Matmul32;
}

/** out[M×N] = op(x)·y, float32; op(x) = xᵀ (x stored K×M) with `transA`, else x is stored M×K. */
export type Matmul32 = (x: Float32Array, y: Float32Array, out: Float32Array, M: number, K: number, N: number, opts?: { transA?: boolean }) => void;

const EPS = Number.EPSILON;

function checkDims(a: MatrixInput, m: number, n: number, what: string): void {
  if (!Number.isSafeInteger(m) || !Number.isSafeInteger(n) || m < 0 || n < 0) {
    throw new AmalgamError('E_USAGE', `${what}: dimensions must be non-negative integers, got ${m}×${n}`);
  }
  if (a.length !== m * n) throw new AmalgamError('E_SHAPE', `${what}: expected ${m}×${n} = ${m * n} values, got ${a.length}`);
}

function hypot2(a: number, b: number): number {
  const x = Math.abs(a);
  const y = Math.abs(b);
  if (x > y) {
    const r = y / x;
    return x * Math.sqrt(1 + r * r);
  }
  if (y === 0) return 0;
  const r = x / y;
  return y * Math.sqrt(1 + r * r);
}

/** Aᵀ of an m×n matrix (n×m, float64). */
export function transpose(a: MatrixInput, m: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    const row = i * n;
    for (let j = 0; j < n; j++) out[j * m + i] = a[row + j]!;
  }
  return out;
}

/** A·B for A m×k and B k×n (m×n, float64). */
export function matmul(a: MatrixInput, b: MatrixInput, m: number, k: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    const o = i * n;
    for (let p = 0; p < k; p++) {
      const v = a[i * k + p]!;
      if (v === 0) continue;
      const r = p * n;
      for (let j = 0; j < n; j++) out[o + j] += v * b[r + j]!;
    }
  }
  return out;
}

/** Aᵀ·B for A k×m and B k×n (m×n, float64). */
export function matmulTN(a: MatrixInput, b: MatrixInput, k: number, m: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let p = 0; p < k; p++) {
    const ar = p * m;
    const br = p * n;
    for (let i = 0; i < m; i++) {
      const v = a[ar + i]!;
      if (v === 0) continue;
      const o = i * n;
      for (let j = 0; j < n; j++) out[o + j] += v * b[br + j]!;
    }
  }
  return out;
}

/** A·Bᵀ for A m×k and B n×k (m×n, float64). */
export function matmulNT(a: MatrixInput, b: MatrixInput, m: number, k: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    const ar = i * k;
    for (let j = 0; j < n; j++) {
      const br = j * k;
      let s = 0;
      for (let p = 0; p < k; p++) s += a[ar + p]! * b[br + p]!;
      out[i * n + j] = s;
    }
  }
  return out;
}

/** Frobenius norm. */
export function frobeniusNorm(a: MatrixInput): number {
  let scale = 0;
  for (let i = 0; i < a.length; i++) scale = Math.max(scale, Math.abs(a[i]!));
  if (scale === 0 || !Number.isFinite(scale)) return scale;
  let s = 0;
  for (let i = 0; i < a.length; i++) {
    const v = a[i]! / scale;
    s += v * v;
  }
  return scale * Math.sqrt(s);
}

/** (A + Aᵀ)/2 of the n×n A as a new array, after checking its size and that it is finite. */
function symmetricPart(a: MatrixInput, n: number, what: string): Float64Array {
  checkDims(a, n, n, what);
  for (let i = 0; i < a.length; i++) {
    if (!Number.isFinite(a[i]!)) throw new AmalgamError('E_USAGE', `${what}: matrix holds a non-finite value`);
  }
  const w = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    w[i * n + i] = a[i * n + i]!;
    for (let j = 0; j < i; j++) {
      const v = 0.5 * (a[i * n + j]! + a[j * n + i]!);
      w[i * n + j] = v;
      w[j * n + i] = v;
    }
  }
  return w;
}

/**
 * Symmetric eigendecomposition A = V·diag(values)·Vᵀ. A is n×n and assumed symmetric; (A + Aᵀ)/2
 * is decomposed. Householder tridiagonalisation followed by the implicit QL method.
 */
export function eigh(a: MatrixInput, n: number): EighResult {
  // W holds Vᵀ of the classic formulation (row j = column j of V), so inner loops are contiguous.
  const w = symmetricPart(a, n, 'eigh');
  const d = new Float64Array(n);
  const e = new Float64Array(n);
  if (n > 0) {
    tridiagonalize(w, d, e, n);
    implicitQl(w, d, e, n);
  }
  const vectors = new Float64Array(n * n);
  for (let j = 0; j < n; j++) {
    const row = j * n;
    for (let r = 0; r < n; r++) vectors[r * n + j] = w[row + r]!;
  }
  return { values: d, vectors };
}

export interface EighLowestResult {
  /** All n eigenvalues, ascending. */
  values: Float64Array;
  /** count×n row-major: row j is the unit eigenvector of values[j]. */
  vectors: Float64Array;
  /** Number of eigenvectors returned. */
  count: number;
}

/**
 * The lowest eigenpairs of a symmetric matrix: every eigenvalue, and the eigenvectors of the
 * `count(values)` smallest (`count` sees all eigenvalues, ascending, so that a caller can extend a
 * selection to a whole cluster). Householder tridiagonalisation without forming Q, eigenvalues by
 * implicit QL, eigenvectors by inverse iteration on the tridiagonal matrix (re-orthogonalised
 * within clusters of close eigenvalues, from seeded start vectors) and the reflectors applied
 * back. It costs about (2/3)·n³ multiply-adds plus O(n²) per eigenvector; for a few
 * eigenvectors of a large matrix it is several times faster than `eigh` (at n = 2048, 18× with
 * the WebAssembly reduction, 5× without).
 * Eigenvectors of repeated eigenvalues are an orthonormal basis of their eigenspace, not the one
 * `eigh` returns.
 */
export function eighLowest(a: MatrixInput, n: number, count: (values: Float64Array) => number): EighLowestResult {
  let w = symmetricPart(a, n, 'eighLowest');
  // The reduction in WebAssembly SIMD where it is built (the same arithmetic), else here.
  const simd = tridiagonalizeWasm(w, n);
  if (simd) w = simd.w;
  const { d, e, taus } = simd ?? householderTridiagonal(w, n);
  // Eigenvalues: implicit QL without vectors on a copy (e in the layout implicitQl expects).
  const values = Float64Array.from(d);
  const eq = new Float64Array(n);
  for (let i = 1; i < n; i++) eq[i] = e[i - 1]!;
  if (n > 0) implicitQl(null, values, eq, n);
  const k = Math.max(0, Math.min(n, Math.floor(count(values))));
  const vectors = new Float64Array(k * n);
  if (k > 0) {
    tridiagonalInverseIteration(d, e, values, k, n, vectors);
    // Back to the original basis: y = H_0 H_1 … H_{n−3} z.
    for (let j = 0; j < k; j++) {
      const o = j * n;
      for (let s = n - 3; s >= 0; s--) {
        const tau = taus[s]!;
        if (tau === 0) continue;
        const vo = s * n; // reflector s: entries s+1 … n−1 of row s of w
        let dot = 0;
        for (let i = s + 1; i < n; i++) dot += w[vo + i]! * vectors[o + i]!;
        const f = tau * dot;
        if (f !== 0) for (let i = s + 1; i < n; i++) vectors[o + i] -= f * w[vo + i]!;
      }
    }
  }
  return { values, vectors, count: k };
}

/**
 * Householder reduction of the symmetric W (lower triangle used, overwritten) to tridiagonal
 * (`assembly/linalg.ts` does the same, value for value, in WebAssembly SIMD)
 * T = Qᵀ·W·Q: diagonal d, sub-diagonal e (e[i] = T[i+1][i]). Reflector s (I − τ_s·v·vᵀ, v zero
 * above s + 1) is left in the upper part of row s of W, entries s+1 … n−1.
 */
function householderTridiagonal(w: Float64Array, n: number): { d: Float64Array; e: Float64Array; taus: Float64Array } {
  const d = new Float64Array(n);
  const e = new Float64Array(Math.max(0, n - 1));
  const taus = new Float64Array(Math.max(0, n - 2));
  const p = new Float64Array(n);
  for (let s = 0; s < n - 2; s++) {
    const so = s * n;
    d[s] = w[so + s]!;
    // x = W[s+1 …, s] (column s, below the diagonal), copied into row s as v.
    let scale = 0;
    for (let i = s + 1; i < n; i++) {
      const v = w[i * n + s]!;
      w[so + i] = v;
      scale = Math.max(scale, Math.abs(v));
    }
    let tail = 0;
    if (scale > 0) {
      for (let i = s + 2; i < n; i++) {
        const t = w[so + i]! / scale;
        tail += t * t;
      }
    }
    if (scale === 0 || tail === 0) {
      e[s] = w[so + s + 1]!;
      taus[s] = 0;
      continue;
    }
    const x0 = w[so + s + 1]! / scale;
    const norm = Math.sqrt(x0 * x0 + tail);
    const alpha = x0 > 0 ? -norm : norm;
    // v = x/scale − alpha·e1; τ = 2 / vᵀv.
    for (let i = s + 1; i < n; i++) w[so + i] = w[so + i]! / scale;
    w[so + s + 1] = x0 - alpha;
    const tau = 2 / ((x0 - alpha) * (x0 - alpha) + tail);
    taus[s] = tau;
    e[s] = alpha * scale;
    // Trailing block B = W[s+1 …, s+1 …] (lower triangle): p = τ·B·v,
    // q = p − (τ/2)(pᵀv)·v, B −= v·qᵀ + q·vᵀ.
    for (let i = s + 1; i < n; i++) p[i] = 0;
    for (let i = s + 1; i < n; i++) {
      const io = i * n;
      const vi = w[so + i]!;
      // Two partial sums, so that consecutive additions do not wait on each other.
      let acc0 = w[io + i]! * vi;
      let acc1 = 0;
      let j = s + 1;
      for (; j + 1 < i; j += 2) {
        const b0 = w[io + j]!;
        const b1 = w[io + j + 1]!;
        acc0 += b0 * w[so + j]!;
        acc1 += b1 * w[so + j + 1]!;
        p[j] = p[j]! + b0 * vi;
        p[j + 1] = p[j + 1]! + b1 * vi;
      }
      if (j < i) {
        const b = w[io + j]!;
        acc0 += b * w[so + j]!;
        p[j] = p[j]! + b * vi;
      }
      p[i] = p[i]! + (acc0 + acc1);
    }
    let pv = 0;
    for (let i = s + 1; i < n; i++) {
      p[i] = tau * p[i]!;
      pv += p[i]! * w[so + i]!;
    }
    const half = 0.5 * tau * pv;
    for (let i = s + 1; i < n; i++) p[i] = p[i]! - half * w[so + i]!;
    for (let i = s + 1; i < n; i++) {
      const io = i * n;
      const vi = w[so + i]!;
      const qi = p[i]!;
      let j = s + 1;
      for (; j + 1 <= i; j += 2) {
        w[io + j] = w[io + j]! - vi * p[j]! - qi * w[so + j]!;
        w[io + j + 1] = w[io + j + 1]! - vi * p[j + 1]! - qi * w[so + j + 1]!;
      }
      if (j <= i) w[io + j] = w[io + j]! - vi * p[j]! - qi * w[so + j]!;
    }
  }
  if (n >= 2) {
    d[n - 2] = w[(n - 2) * n + n - 2]!;
    e[n - 2] = w[(n - 1) * n + n - 2]!;
  }
  if (n >= 1) d[n - 1] = w[(n - 1) * n + n - 1]!;
  return { d, e, taus };
}

/**
 * Eigenvectors of the symmetric tridiagonal (d, e) for values[0 … k−1] by inverse iteration:
 * LU of T − σI with partial pivoting, seeded start vectors, four iterations, each iterate
 * re-orthogonalised against the earlier vectors of its cluster (eigenvalues closer than
 * 1e-3·‖T‖₁, as LAPACK's dstein). Repeated eigenvalues are shifted apart by 10·ε·‖T‖₁.
 */
function tridiagonalInverseIteration(d: Float64Array, e: Float64Array, values: Float64Array, k: number, n: number, out: Float64Array): void {
  let tnorm = 0;
  for (let i = 0; i < n; i++) tnorm = Math.max(tnorm, Math.abs(d[i]!) + (i > 0 ? Math.abs(e[i - 1]!) : 0) + (i < n - 1 ? Math.abs(e[i]!) : 0));
  if (tnorm === 0) tnorm = 1;
  const ortol = 1e-3 * tnorm;
  const pertol = 10 * EPS * tnorm;
  const tiny = EPS * tnorm;
  const u0 = new Float64Array(n);
  const u1 = new Float64Array(n);
  const u2 = new Float64Array(n);
  const l = new Float64Array(n);
  const piv = new Uint8Array(n);
  const x = new Float64Array(n);
  const rng = new Rng(0x5eed);
  let clusterStart = 0;
  let prevSigma = -Infinity;
  for (let j = 0; j < k; j++) {
    if (j > 0 && values[j]! - values[j - 1]! > ortol) clusterStart = j;
    let sigma = values[j]!;
    if (j > clusterStart && sigma - prevSigma < pertol) sigma = prevSigma + pertol;
    prevSigma = sigma;
    // LU of T − σI with partial pivoting; the active row holds (ax at column i, ay at column i+1).
    let ax = d[0]! - sigma;
    let ay = n > 1 ? e[0]! : 0;
    for (let i = 0; i < n - 1; i++) {
      const c = e[i]!;
      const dn = d[i + 1]! - sigma;
      const bn = i + 1 < n - 1 ? e[i + 1]! : 0;
      if (Math.abs(c) > Math.abs(ax)) {
        piv[i] = 1;
        u0[i] = c;
        u1[i] = dn;
        u2[i] = bn;
        const m = ax / c;
        l[i] = m;
        ax = ay - m * dn;
        ay = -m * bn;
      } else {
        piv[i] = 0;
        if (ax === 0) ax = tiny;
        u0[i] = ax;
        u1[i] = ay;
        u2[i] = 0;
        const m = c / ax;
        l[i] = m;
        ax = dn - m * ay;
        ay = bn;
      }
    }
    u0[n - 1] = ax === 0 ? tiny : ax;
    for (let i = 0; i < n; i++) x[i] = rng.next() - 0.5;
    const o = j * n;
    for (let iter = 0; iter < 4; iter++) {
      // Forward: apply the row swaps and multipliers.
      let ra = x[0]!;
      for (let i = 0; i < n - 1; i++) {
        const rn = x[i + 1]!;
        if (piv[i]) {
          x[i] = rn;
          ra = ra - l[i]! * rn;
        } else {
          x[i] = ra;
          ra = rn - l[i]! * ra;
        }
      }
      x[n - 1] = ra;
      // Back substitution with U.
      for (let i = n - 1; i >= 0; i--) {
        let v = x[i]!;
        if (i + 1 < n) v -= u1[i]! * x[i + 1]!;
        if (i + 2 < n) v -= u2[i]! * x[i + 2]!;
        x[i] = v / u0[i]!;
      }
      // Re-orthogonalise within the cluster (twice), then normalise.
      for (let pass = 0; pass < 2; pass++) {
        for (let q = clusterStart; q < j; q++) {
          const qo = q * n;
          let dot = 0;
          for (let i = 0; i < n; i++) dot += out[qo + i]! * x[i]!;
          for (let i = 0; i < n; i++) x[i] = x[i]! - dot * out[qo + i]!;
        }
      }
      let nrm = 0;
      for (let i = 0; i < n; i++) nrm = Math.max(nrm, Math.abs(x[i]!));
      if (nrm === 0) throw new Error('eighLowest: inverse iteration lost its vector');
      let ss = 0;
      for (let i = 0; i < n; i++) {
        x[i] = x[i]! / nrm;
        ss += x[i]! * x[i]!;
      }
      const inv = 1 / Math.sqrt(ss);
      for (let i = 0; i < n; i++) x[i] = x[i]! * inv;
    }
    out.set(x, o);
  }
}

/** Householder reduction to tridiagonal form; W holds Vᵀ (V[r][c] = w[c·n + r]). */
function tridiagonalize(w: Float64Array, d: Float64Array, e: Float64Array, n: number): void {
  for (let j = 0; j < n; j++) d[j] = w[j * n + n - 1]!;
  for (let i = n - 1; i > 0; i--) {
    let scale = 0;
    let h = 0;
    for (let k = 0; k < i; k++) scale += Math.abs(d[k]!);
    if (scale === 0) {
      e[i] = d[i - 1]!;
      for (let j = 0; j < i; j++) {
        d[j] = w[j * n + i - 1]!;
        w[j * n + i] = 0;
        w[i * n + j] = 0;
      }
    } else {
      for (let k = 0; k < i; k++) {
        d[k] = d[k]! / scale;
        h += d[k]! * d[k]!;
      }
      let f = d[i - 1]!;
      let g = Math.sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (let j = 0; j < i; j++) e[j] = 0;
      for (let j = 0; j < i; j++) {
        f = d[j]!;
        const cj = j * n;
        w[i * n + j] = f;
        g = e[j]! + w[cj + j]! * f;
        for (let k = j + 1; k <= i - 1; k++) {
          const v = w[cj + k]!;
          g += v * d[k]!;
          e[k] = e[k]! + v * f;
        }
        e[j] = g;
      }
      f = 0;
      for (let j = 0; j < i; j++) {
        e[j] = e[j]! / h;
        f += e[j]! * d[j]!;
      }
      const hh = f / (h + h);
      for (let j = 0; j < i; j++) e[j] = e[j]! - hh * d[j]!;
      for (let j = 0; j < i; j++) {
        f = d[j]!;
        g = e[j]!;
        const cj = j * n;
        for (let k = j; k <= i - 1; k++) w[cj + k] = w[cj + k]! - (f * e[k]! + g * d[k]!);
        d[j] = w[cj + i - 1]!;
        w[cj + i] = 0;
      }
    }
    d[i] = h;
  }
  for (let i = 0; i < n - 1; i++) {
    w[i * n + n - 1] = w[i * n + i]!;
    w[i * n + i] = 1;
    const h = d[i + 1]!;
    const c1 = (i + 1) * n;
    if (h !== 0) {
      for (let k = 0; k <= i; k++) d[k] = w[c1 + k]! / h;
      for (let j = 0; j <= i; j++) {
        const cj = j * n;
        let g = 0;
        for (let k = 0; k <= i; k++) g += w[c1 + k]! * w[cj + k]!;
        for (let k = 0; k <= i; k++) w[cj + k] = w[cj + k]! - g * d[k]!;
      }
    }
    for (let k = 0; k <= i; k++) w[c1 + k] = 0;
  }
  for (let j = 0; j < n; j++) {
    d[j] = w[j * n + n - 1]!;
    w[j * n + n - 1] = 0;
  }
  w[(n - 1) * n + n - 1] = 1;
  e[0] = 0;
}

/** Implicit QL iterations on the tridiagonal (d, e), accumulating into W (rows = eigenvectors). */
function implicitQl(w: Float64Array | null, d: Float64Array, e: Float64Array, n: number): void {
  for (let i = 1; i < n; i++) e[i - 1] = e[i]!;
  e[n - 1] = 0;
  let f = 0;
  let tst1 = 0;
  for (let l = 0; l < n; l++) {
    tst1 = Math.max(tst1, Math.abs(d[l]!) + Math.abs(e[l]!));
    let m = l;
    while (m < n) {
      if (Math.abs(e[m]!) <= EPS * tst1) break;
      m++;
    }
    if (m === n) m = n - 1;
    if (m > l) {
      let iter = 0;
      do {
        if (++iter > 100) throw new Error('eigh: the QL iteration did not converge');
        let g = d[l]!;
        let p = (d[l + 1]! - g) / (2 * e[l]!);
        let r = hypot2(p, 1);
        if (p < 0) r = -r;
        d[l] = e[l]! / (p + r);
        d[l + 1] = e[l]! * (p + r);
        const dl1 = d[l + 1]!;
        let h = g - d[l]!;
        for (let i = l + 2; i < n; i++) d[i] = d[i]! - h;
        f += h;
        p = d[m]!;
        let c = 1;
        let c2 = c;
        let c3 = c;
        const el1 = e[l + 1]!;
        let s = 0;
        let s2 = 0;
        for (let i = m - 1; i >= l; i--) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i]!;
          h = c * p;
          r = hypot2(p, e[i]!);
          e[i + 1] = s * r;
          s = e[i]! / r;
          c = p / r;
          p = c * d[i]! - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]!);
          if (w) {
            const ri = i * n;
            const ri1 = ri + n;
            for (let k = 0; k < n; k++) {
              const x = w[ri1 + k]!;
              const y = w[ri + k]!;
              w[ri1 + k] = s * y + c * x;
              w[ri + k] = c * y - s * x;
            }
          }
        }
        p = (-s * s2 * c3 * el1 * e[l]!) / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (Math.abs(e[l]!) > EPS * tst1);
    }
    d[l] = d[l]! + f;
    e[l] = 0;
  }
  for (let i = 0; i < n - 1; i++) {
    let k = i;
    let p = d[i]!;
    for (let j = i + 1; j < n; j++) {
      if (d[j]! < p) {
        k = j;
        p = d[j]!;
      }
    }
    if (k !== i) {
      d[k] = d[i]!;
      d[i] = p;
      if (!w) continue;
      const ri = i * n;
      const rk = k * n;
      for (let t = 0; t < n; t++) {
        const x = w[ri + t]!;
        w[ri + t] = w[rk + t]!;
        w[rk + t] = x;
      }
    }
  }
}

/**
 * Householder reflectors of the columns of A (m×n): `cols` is Aᵀ (row j = column j), overwritten
 * with R's columns; returns the reflectors (row r of `vs`, entries r..m-1) and their τ.
 */
function householderColumns(cols: Float64Array, m: number, n: number): { vs: Float64Array; taus: Float64Array; k: number } {
  const k = Math.min(m, n);
  const vs = new Float64Array(k * m);
  const taus = new Float64Array(k);
  for (let r = 0; r < k; r++) {
    const cr = r * m;
    let scale = 0;
    for (let i = r; i < m; i++) scale = Math.max(scale, Math.abs(cols[cr + i]!));
    if (scale === 0) continue;
    let ss = 0;
    for (let i = r; i < m; i++) {
      const v = cols[cr + i]! / scale;
      ss += v * v;
    }
    const norm = scale * Math.sqrt(ss);
    const x0 = cols[cr + r]!;
    const alpha = x0 > 0 ? -norm : norm;
    const vr = r * m;
    vs[vr + r] = x0 - alpha;
    for (let i = r + 1; i < m; i++) vs[vr + i] = cols[cr + i]!;
    let vtv = 0;
    for (let i = r; i < m; i++) vtv += vs[vr + i]! * vs[vr + i]!;
    if (vtv === 0) continue;
    const tau = 2 / vtv;
    taus[r] = tau;
    cols[cr + r] = alpha;
    for (let i = r + 1; i < m; i++) cols[cr + i] = 0;
    for (let j = r + 1; j < n; j++) {
      const cj = j * m;
      let dot = 0;
      for (let i = r; i < m; i++) dot += vs[vr + i]! * cols[cj + i]!;
      const f = tau * dot;
      if (f === 0) continue;
      for (let i = r; i < m; i++) cols[cj + i] = cols[cj + i]! - f * vs[vr + i]!;
    }
  }
  return { vs, taus, k };
}

/** Q's first k columns as rows (k×m), from the reflectors. */
function formQRows(vs: Float64Array, taus: Float64Array, m: number, k: number): Float64Array {
  const qt = new Float64Array(k * m);
  for (let j = 0; j < k; j++) qt[j * m + j] = 1;
  for (let r = k - 1; r >= 0; r--) {
    const tau = taus[r]!;
    if (tau === 0) continue;
    const vr = r * m;
    for (let j = 0; j < k; j++) {
      const cj = j * m;
      let dot = 0;
      for (let i = r; i < m; i++) dot += vs[vr + i]! * qt[cj + i]!;
      const f = tau * dot;
      if (f === 0) continue;
      for (let i = r; i < m; i++) qt[cj + i] = qt[cj + i]! - f * vs[vr + i]!;
    }
  }
  return qt;
}

/** Thin Householder QR of an m×n matrix: A = Q·R with Q m×min(m,n), R min(m,n)×n. */
export function qr(a: MatrixInput, m: number, n: number): QrResult {
  checkDims(a, m, n, 'qr');
  const cols = transpose(a, m, n);
  const { vs, taus, k } = householderColumns(cols, m, n);
  const qt = formQRows(vs, taus, m, k);
  const R = new Float64Array(k * n);
  for (let j = 0; j < n; j++) {
    const cj = j * m;
    const top = Math.min(j, k - 1);
    for (let i = 0; i <= top; i++) R[i * n + j] = cols[cj + i]!;
  }
  return { Q: transpose(qt, k, m), R, k };
}

/**
 * An m×n matrix with orthonormal columns spanning the columns of A (m ≥ n). Where A is rank
 * deficient the basis is completed with further orthonormal directions.
 */
export function orthonormalBasis(a: MatrixInput, m: number, n: number): Float64Array {
  checkDims(a, m, n, 'orthonormalBasis');
  if (n > m) throw new AmalgamError('E_SHAPE', `orthonormalBasis: ${n} columns cannot be orthonormal in ${m} dimensions`);
  return qr(a, m, n).Q;
}

/** ‖QᵀQ − I‖_max for an m×k matrix with (supposedly) orthonormal columns. */
export function orthogonalityError(q: MatrixInput, m: number, k: number): number {
  checkDims(q, m, k, 'orthogonalityError');
  const g = matmulTN(q, q, m, k, k);
  let worst = 0;
  for (let i = 0; i < k; i++) for (let j = 0; j < k; j++) worst = Math.max(worst, Math.abs(g[i * k + j]! - (i === j ? 1 : 0)));
  return worst;
}

/**
 * One-sided Jacobi on the rows of X (ncol rows of length len, the columns being orthogonalised).
 * On return the rows of X are mutually orthogonal (X = A·V) and VT holds Vᵀ (ncol×ncol).
 */
function oneSidedJacobi(x: Float64Array, ncol: number, len: number): Float64Array {
  const vt = new Float64Array(ncol * ncol);
  for (let j = 0; j < ncol; j++) vt[j * ncol + j] = 1;
  const norms = new Float64Array(ncol);
  const tol = EPS * Math.max(len, 4);
  const dot = (p: number, q: number): number => {
    let s = 0;
    for (let i = 0; i < len; i++) s += x[p + i]! * x[q + i]!;
    return s;
  };
  for (let sweep = 0; sweep < 80; sweep++) {
    for (let j = 0; j < ncol; j++) norms[j] = dot(j * len, j * len);
    let rotated = false;
    for (let p = 0; p < ncol - 1; p++) {
      for (let q = p + 1; q < ncol; q++) {
        const alpha = norms[p]!;
        const beta = norms[q]!;
        if (alpha === 0 || beta === 0) continue;
        const px = p * len;
        const qx = q * len;
        const gamma = dot(px, qx);
        if (Math.abs(gamma) <= tol * Math.sqrt(alpha) * Math.sqrt(beta)) continue;
        rotated = true;
        const zeta = (beta - alpha) / (2 * gamma);
        const az = Math.abs(zeta);
        const t = az > 1e150 ? 0.5 / zeta : (zeta >= 0 ? 1 : -1) / (az + Math.sqrt(1 + zeta * zeta));
        const c = 1 / Math.sqrt(1 + t * t);
        const s = c * t;
        for (let i = 0; i < len; i++) {
          const xp = x[px + i]!;
          const xq = x[qx + i]!;
          x[px + i] = c * xp - s * xq;
          x[qx + i] = s * xp + c * xq;
        }
        const pv = p * ncol;
        const qv = q * ncol;
        for (let i = 0; i < ncol; i++) {
          const vp = vt[pv + i]!;
          const vq = vt[qv + i]!;
          vt[pv + i] = c * vp - s * vq;
          vt[qv + i] = s * vp + c * vq;
        }
        norms[p] = Math.max(0, alpha - t * gamma);
        norms[q] = Math.max(0, beta + t * gamma);
      }
    }
    if (!rotated) break;
  }
  return vt;
}

/**
 * Normalise the orthogonal rows of X into unit rows, returning their norms. Rows whose norm is
 * negligible are replaced by unit vectors orthogonal to all others.
 */
function normalizeRows(x: Float64Array, ncol: number, len: number): Float64Array {
  const s = new Float64Array(ncol);
  let smax = 0;
  for (let j = 0; j < ncol; j++) {
    s[j] = frobeniusNorm(x.subarray(j * len, (j + 1) * len));
    smax = Math.max(smax, s[j]!);
  }
  const thresh = smax * EPS * Math.max(len, ncol);
  const good: number[] = [];
  const bad: number[] = [];
  for (let j = 0; j < ncol; j++) {
    if (s[j]! > thresh && s[j]! > 0) {
      const r = j * len;
      const inv = 1 / s[j]!;
      for (let i = 0; i < len; i++) x[r + i] = x[r + i]! * inv;
      good.push(j);
    } else {
      bad.push(j);
    }
  }
  if (bad.length) completeRows(x, len, good, bad);
  return s;
}

/**
 * Fill rows `fill` of X with unit vectors orthogonal to rows `keep` and to each other: seeded
 * Gaussian vectors, orthogonalised three times against the rows accepted so far.
 */
function completeRows(x: Float64Array, len: number, keep: number[], fill: number[]): void {
  const basis = keep.slice();
  const rng = new Rng(0x5eed + len);
  for (const j of fill) {
    const r = j * len;
    const row = x.subarray(r, r + len);
    for (let attempt = 0; ; attempt++) {
      if (attempt >= 100) throw new Error('orthonormal completion failed');
      for (let i = 0; i < len; i++) row[i] = rng.normal();
      const n0 = frobeniusNorm(row);
      for (let pass = 0; pass < 3; pass++) {
        for (const b of basis) {
          const br = b * len;
          let d = 0;
          for (let i = 0; i < len; i++) d += x[br + i]! * row[i]!;
          if (d !== 0) for (let i = 0; i < len; i++) row[i] = row[i]! - d * x[br + i]!;
        }
      }
      const n1 = frobeniusNorm(row);
      if (n1 > 1e-3 * n0) {
        for (let i = 0; i < len; i++) row[i] = row[i]! / n1;
        basis.push(j);
        break;
      }
    }
  }
}

/**
 * Thin SVD A = U·diag(S)·Vt of an m×n matrix, k = min(m, n), S descending. One-sided Jacobi
 * (preceded by a Householder QR for tall matrices), accurate to working precision. Cost grows as
 * max(m,n)·min(m,n)²; use `randomizedSvd` for a few leading triplets of large matrices.
 */
export function svd(a: MatrixInput, m: number, n: number): SvdResult {
  checkDims(a, m, n, 'svd');
  for (let i = 0; i < a.length; i++) {
    if (!Number.isFinite(a[i]!)) throw new AmalgamError('E_USAGE', 'svd: matrix holds a non-finite value');
  }
  if (m < n) {
    const t = svd(transpose(a, m, n), n, m);
    return { k: t.k, U: transpose(t.Vt, t.k, m), S: t.S, Vt: transpose(t.U, n, t.k) };
  }
  const k = n;
  if (k === 0) return { k: 0, U: new Float64Array(0), S: new Float64Array(0), Vt: new Float64Array(0) };
  // Columns of the matrix to orthogonalise, stored as rows.
  let x: Float64Array;
  let len: number;
  let qRows: Float64Array | undefined;
  if (m > n + (n >> 1)) {
    const cols = transpose(a, m, n);
    const h = householderColumns(cols, m, n);
    qRows = formQRows(h.vs, h.taus, m, n);
    len = n;
    x = new Float64Array(n * n);
    for (let j = 0; j < n; j++) for (let i = 0; i <= j; i++) x[j * n + i] = cols[j * m + i]!;
  } else {
    x = transpose(a, m, n);
    len = m;
  }
  const vt = oneSidedJacobi(x, k, len);
  const s = normalizeRows(x, k, len);
  const order = Array.from({ length: k }, (_, j) => j).sort((p, q) => s[q]! - s[p]! || p - q);
  const S = new Float64Array(k);
  const Vt = new Float64Array(k * n);
  const U = new Float64Array(m * k);
  for (let r = 0; r < k; r++) {
    const j = order[r]!;
    S[r] = s[j]!;
    Vt.set(vt.subarray(j * n, (j + 1) * n), r * n);
    const xr = j * len;
    if (qRows) {
      // U[:, r] = Q · x_j
      for (let l = 0; l < len; l++) {
        const c = x[xr + l]!;
        if (c === 0) continue;
        const ql = l * m;
        for (let i = 0; i < m; i++) U[i * k + r] += c * qRows[ql + i]!;
      }
    } else {
      for (let i = 0; i < m; i++) U[i * k + r] = x[xr + i]!;
    }
  }
  return { k, U, S, Vt };
}

/**
 * The leading k singular triplets of an m×n matrix by randomised range finding (Halko, Martinsson
 * & Tropp): a seeded Gaussian sketch of k + oversample columns, `powerIters` subspace iterations
 * with re-orthonormalisation, then an exact SVD of the small projected matrix. Deterministic for a
 * given seed.
 */
export function randomizedSvd(a: MatrixInput, m: number, n: number, k: number, opts: RandomizedSvdOptions = {}): SvdResult {
  checkDims(a, m, n, 'randomizedSvd');
  if (!Number.isSafeInteger(k) || k < 1) throw new AmalgamError('E_USAGE', `randomizedSvd: k must be a positive integer, got ${k}`);
  const kmax = Math.min(m, n);
  const kk = Math.min(k, kmax);
  if (kk === 0) return { k: 0, U: new Float64Array(0), S: new Float64Array(0), Vt: new Float64Array(0) };
  const oversample = opts.oversample ?? 10;
  const powerIters = opts.powerIters ?? 2;
  const l = Math.min(kmax, kk + Math.max(0, oversample));
  if (l === kmax && kmax * Math.max(m, n) <= 1 << 22) return truncateSvd(svd(a, m, n), m, n, kk);
  const rng = new Rng(opts.seed ?? 0);
  const omega = new Float64Array(n * l);
  for (let i = 0; i < omega.length; i++) omega[i] = rng.normal();
  const mm = opts.matmul32;
  const a32 = mm ? (a instanceof Float32Array ? a : Float32Array.from(a)) : undefined;
  /** A·x (x n×l) or, transposed, Aᵀ·x (x m×l). */
  const times = (x: Float64Array, transposed: boolean): Float64Array => {
    if (!mm) return transposed ? matmulTN(a, x, m, n, l) : matmul(a, x, m, n, l);
    const out = new Float32Array((transposed ? n : m) * l);
    if (transposed) mm(a32!, Float32Array.from(x), out, n, m, l, { transA: true });
    else mm(a32!, Float32Array.from(x), out, m, n, l);
    return Float64Array.from(out);
  };
  let q = orthonormalBasis(times(omega, false), m, l);
  for (let it = 0; it < powerIters; it++) {
    const z = orthonormalBasis(times(q, true), n, l);
    q = orthonormalBasis(times(z, false), m, l);
  }
  let b: Float64Array;
  if (mm) {
    const b32 = new Float32Array(l * n);
    mm(Float32Array.from(q), a32!, b32, l, m, n, { transA: true });
    b = Float64Array.from(b32);
  } else {
    b = matmulTN(q, a, m, l, n);
  }
  const small = svd(b, l, n);
  const u = matmul(q, small.U, m, l, small.k);
  return truncateSvd({ k: small.k, U: u, S: small.S, Vt: small.Vt }, m, n, kk);
}

/** The leading k triplets of an SVD. */
export function truncateSvd(r: SvdResult, m: number, n: number, k: number): SvdResult {
  const kk = Math.max(0, Math.min(k, r.k));
  if (kk === r.k) return r;
  const U = new Float64Array(m * kk);
  for (let i = 0; i < m; i++) for (let j = 0; j < kk; j++) U[i * kk + j] = r.U[i * r.k + j]!;
  return { k: kk, U, S: r.S.slice(0, kk), Vt: r.Vt.slice(0, kk * n) };
}

/** U·diag(S)·Vt as an m×n matrix. */
export function reconstructSvd(r: SvdResult, m: number, n: number): Float64Array {
  const us = new Float64Array(m * r.k);
  for (let i = 0; i < m; i++) for (let j = 0; j < r.k; j++) us[i * r.k + j] = r.U[i * r.k + j]! * r.S[j]!;
  return matmul(us, r.Vt, m, r.k, n);
}
