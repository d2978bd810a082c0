import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { Rng } from '../src/tensor/rng.js';
import {
  eigh,
  eighLowest,
  frobeniusNorm,
  matmul,
  matmulNT,
  matmulTN,
  orthogonalityError,
  orthonormalBasis,
  qr,
  randomizedSvd,
  reconstructSvd,
  svd,
  transpose,
} from '../src/tensor/linalg.js';
import { linalgWasmAvailable, useLinalgWasm } from '../src/tensor/linalg-wasm.js';
import { createBackend, ReferenceBackend, wasmSimdSupported } from '../src/backend/index.js';

function randn(m: number, n: number, seed: number): Float64Array {
  const rng = new Rng(seed);
  const a = new Float64Array(m * n);
  for (let i = 0; i < a.length; i++) a[i] = rng.normal();
  return a;
}

function relErr(a: Float64Array, b: Float64Array): number {
  const d = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) d[i] = a[i]! - b[i]!;
  const nb = frobeniusNorm(b);
  return nb === 0 ? frobeniusNorm(d) : frobeniusNorm(d) / nb;
}

/** Q·diag(λ)·Qᵀ with a random orthogonal Q. */
function withSpectrum(lambda: number[], seed: number): Float64Array {
  const n = lambda.length;
  const q = qr(randn(n, n, seed), n, n).Q;
  const ql = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) ql[i * n + j] = q[i * n + j]! * lambda[j]!;
  return matmulNT(ql, q, n, n, n);
}

/** m×n matrix of rank r with singular values sv. */
function withSingularValues(m: number, n: number, sv: number[], seed: number): Float64Array {
  const r = sv.length;
  const u = orthonormalBasis(randn(m, r, seed), m, r);
  const v = orthonormalBasis(randn(n, r, seed + 1), n, r);
  const us = new Float64Array(m * r);
  for (let i = 0; i < m; i++) for (let j = 0; j < r; j++) us[i * r + j] = u[i * r + j]! * sv[j]!;
  return matmulNT(us, v, m, r, n);
}

function checkEigh(a: Float64Array, n: number, tol = 1e-12): Float64Array {
  const { values, vectors } = eigh(a, n);
  for (let i = 1; i < n; i++) assert.ok(values[i - 1]! <= values[i]!, 'ascending');
  assert.ok(orthogonalityError(vectors, n, n) < tol, `orthogonality ${orthogonalityError(vectors, n, n)}`);
  const vl = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) vl[i * n + j] = vectors[i * n + j]! * values[j]!;
  const rec = matmulNT(vl, vectors, n, n, n);
  const scale = Math.max(frobeniusNorm(a), 1);
  const d = new Float64Array(n * n);
  for (let i = 0; i < d.length; i++) d[i] = rec[i]! - a[i]!;
  assert.ok(frobeniusNorm(d) / scale < tol, `reconstruction ${frobeniusNorm(d) / scale}`);
  return values;
}

function checkSvd(a: Float64Array, m: number, n: number, tol = 1e-12) {
  const r = svd(a, m, n);
  const k = Math.min(m, n);
  assert.equal(r.k, k);
  assert.equal(r.U.length, m * k);
  assert.equal(r.Vt.length, k * n);
  for (let i = 1; i < k; i++) assert.ok(r.S[i - 1]! >= r.S[i]!, 'descending');
  for (let i = 0; i < k; i++) assert.ok(r.S[i]! >= 0);
  assert.ok(orthogonalityError(r.U, m, k) < tol, `U orthogonality ${orthogonalityError(r.U, m, k)}`);
  const v = transpose(r.Vt, k, n);
  assert.ok(orthogonalityError(v, n, k) < tol, `V orthogonality ${orthogonalityError(v, n, k)}`);
  const rec = reconstructSvd(r, m, n);
  const scale = Math.max(frobeniusNorm(a), 1e-300);
  const d = new Float64Array(m * n);
  for (let i = 0; i < d.length; i++) d[i] = rec[i]! - a[i]!;
  assert.ok(frobeniusNorm(d) / scale < tol, `reconstruction ${frobeniusNorm(d) / scale}`);
  return r;
}

describe('eigh', () => {
  test('random symmetric matrices: reconstruction and orthogonality', () => {
    for (const n of [1, 2, 3, 7, 40, 120]) {
      const g = randn(n, n, n);
      const a = new Float64Array(n * n);
      for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) a[i * n + j] = g[i * n + j]! + g[j * n + i]!;
      checkEigh(a, n);
    }
  });

  test('known spectra are recovered to 1e-12 relative', () => {
    const n = 60;
    const lambda = Array.from({ length: n }, (_, i) => (i % 2 ? 1 : -1) * (1 + i * 0.37));
    const values = checkEigh(withSpectrum(lambda, 3), n);
    const sorted = lambda.slice().sort((x, y) => x - y);
    for (let i = 0; i < n; i++) assert.ok(Math.abs(values[i]! - sorted[i]!) <= 1e-12 * Math.abs(sorted[i]!), `λ${i}: ${values[i]} vs ${sorted[i]}`);
  });

  test('degenerate spectra: repeated eigenvalues, identity, zero and rank-deficient matrices', () => {
    const n = 30;
    const rep = Array.from({ length: n }, (_, i) => (i < 10 ? 2 : i < 25 ? -1 : 5));
    const v1 = checkEigh(withSpectrum(rep, 5), n);
    const s1 = rep.slice().sort((x, y) => x - y);
    for (let i = 0; i < n; i++) assert.ok(Math.abs(v1[i]! - s1[i]!) < 1e-12 * 5);
    const id = new Float64Array(n * n);
    for (let i = 0; i < n; i++) id[i * n + i] = 1;
    const v2 = checkEigh(id, n);
    for (const x of v2) assert.equal(x, 1);
    const v3 = checkEigh(new Float64Array(n * n), n);
    for (const x of v3) assert.equal(x, 0);
    const low = Array.from({ length: n }, (_, i) => (i < 4 ? i + 1 : 0));
    const v4 = checkEigh(withSpectrum(low, 9), n);
    for (let i = 0; i < n - 4; i++) assert.ok(Math.abs(v4[i]!) < 1e-13 * 4);
    const diag = new Float64Array(n * n);
    for (let i = 0; i < n; i++) diag[i * n + i] = n - i;
    const v5 = checkEigh(diag, n);
    for (let i = 0; i < n; i++) assert.equal(v5[i], i + 1);
  });

  test('input is not modified and Float32 input is accepted', () => {
    const a = new Float32Array([2, 1, 1, 3]);
    const copy = a.slice();
    const { values } = eigh(a, 2);
    assert.deepEqual(a, copy);
    assert.ok(Math.abs(values[0]! - (5 - Math.sqrt(5)) / 2) < 1e-14);
    assert.ok(Math.abs(values[1]! - (5 + Math.sqrt(5)) / 2) < 1e-14);
  });

  test('a 400×400 matrix decomposes quickly', () => {
    const n = 400;
    const g = randn(n, n, 11);
    const a = new Float64Array(n * n);
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) a[i * n + j] = g[i * n + j]! + g[j * n + i]!;
    const t0 = performance.now();
    checkEigh(a, n, 1e-11);
    assert.ok(performance.now() - t0 < 10_000);
  });

  test('rejects bad input', () => {
    assert.throws(() => eigh(new Float64Array(3), 2), /expected 2×2/);
    assert.throws(() => eigh(new Float64Array([NaN]), 1), /non-finite/);
  });
});

describe('qr and orthonormal bases', () => {
  test('Q·R = A, QᵀQ = I, R upper triangular', () => {
    for (const [m, n] of [
      [10, 4],
      [6, 6],
      [4, 9],
    ] as const) {
      const a = randn(m, n, m * 100 + n);
      const { Q, R, k } = qr(a, m, n);
      assert.equal(k, Math.min(m, n));
      assert.ok(orthogonalityError(Q, m, k) < 1e-14);
      for (let i = 0; i < k; i++) for (let j = 0; j < i; j++) assert.equal(R[i * n + j], 0);
      assert.ok(relErr(matmul(Q, R, m, k, n), a) < 1e-14);
    }
  });

  test('rank-deficient input still gives an orthonormal basis containing the span', () => {
    const m = 12;
    const a = new Float64Array(m * 4);
    const b = randn(m, 1, 4);
    for (let i = 0; i < m; i++) {
      a[i * 4] = b[i]!;
      a[i * 4 + 1] = 2 * b[i]!;
      a[i * 4 + 3] = -b[i]!;
    }
    const q = orthonormalBasis(a, m, 4);
    assert.ok(orthogonalityError(q, m, 4) < 1e-14);
    const proj = matmulTN(q, b, m, 4, 1);
    let s = 0;
    for (const x of proj) s += x * x;
    assert.ok(Math.abs(Math.sqrt(s) - frobeniusNorm(b)) < 1e-12);
  });
});

describe('svd', () => {
  test('random matrices of every aspect: reconstruction, orthogonality, order', () => {
    for (const [m, n] of [
      [1, 1],
      [1, 5],
      [5, 1],
      [30, 20],
      [20, 30],
      [100, 10],
      [10, 100],
      [64, 64],
    ] as const) {
      checkSvd(randn(m, n, m * 7 + n), m, n);
    }
  });

  test('singular values match the square roots of the Gram eigenvalues', () => {
    const m = 40;
    const n = 25;
    const a = randn(m, n, 21);
    const r = checkSvd(a, m, n);
    const ev = eigh(matmulTN(a, a, m, n, n), n).values;
    for (let j = 0; j < n; j++) {
      const s = Math.sqrt(ev[n - 1 - j]!);
      assert.ok(Math.abs(r.S[j]! - s) < 1e-12 * r.S[0]!, `σ${j}`);
    }
  });

  test('known singular values, rank-deficient and zero matrices', () => {
    const sv = [10, 5, 2, 1, 0.5];
    const a = withSingularValues(30, 20, sv, 2);
    const r = checkSvd(a, 30, 20);
    for (let j = 0; j < sv.length; j++) assert.ok(Math.abs(r.S[j]! - sv[j]!) < 1e-13 * 10, `σ${j}`);
    for (let j = sv.length; j < 20; j++) assert.ok(r.S[j]! < 1e-13 * 10);
    const b = withSingularValues(15, 40, [3, 3, 3], 4);
    const rb = checkSvd(b, 15, 40);
    for (let j = 0; j < 3; j++) assert.ok(Math.abs(rb.S[j]! - 3) < 1e-13 * 3);
    const z = checkSvd(new Float64Array(8 * 5), 8, 5);
    for (const s of z.S) assert.equal(s, 0);
  });

  test('exactly rank-deficient matrices with spread-out null spaces still give orthonormal U and V', () => {
    for (const n of [16, 64]) {
      const g = randn(n, n, n + 1);
      const p = new Float64Array(n * n);
      for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) p[i * n + j] = (i === j ? 1 : 0) - 1 / n;
      const a = matmul(matmul(p, g, n, n, n), p, n, n, n);
      const r = checkSvd(a, n, n);
      assert.ok(r.S[n - 1]! < 1e-13 * r.S[0]!);
      // A matrix with exact zero columns and rows.
      const z = randn(n + 7, n, n + 2);
      for (let i = 0; i < n + 7; i++) z[i * n + 3] = 0;
      z.fill(0, 0, n);
      const rz = checkSvd(z, n + 7, n);
      assert.equal(rz.S[n - 1], 0);
    }
  });

  test('small singular values keep relative accuracy', () => {
    const sv = [1, 1e-3, 1e-6, 1e-9];
    const a = withSingularValues(12, 8, sv, 6);
    const r = svd(a, 12, 8);
    for (let j = 0; j < sv.length; j++) assert.ok(Math.abs(r.S[j]! - sv[j]!) < 1e-6 * sv[j]!, `σ${j}: ${r.S[j]}`);
  });
});

describe('randomizedSvd', () => {
  test('an exactly low-rank matrix is recovered', () => {
    const m = 300;
    const n = 200;
    const sv = [50, 20, 9, 4, 1];
    const a = withSingularValues(m, n, sv, 8);
    const r = randomizedSvd(a, m, n, 5, { seed: 1 });
    assert.equal(r.k, 5);
    for (let j = 0; j < 5; j++) assert.ok(Math.abs(r.S[j]! - sv[j]!) < 1e-10 * sv[0]!);
    assert.ok(relErr(reconstructSvd(r, m, n), a) < 1e-12);
    assert.ok(orthogonalityError(r.U, m, 5) < 1e-12);
    assert.ok(orthogonalityError(transpose(r.Vt, 5, n), n, 5) < 1e-12);
  });

  test('leading singular values of a full matrix match the exact SVD', () => {
    const m = 120;
    const n = 90;
    const sv = Array.from({ length: 90 }, (_, i) => Math.pow(0.8, i));
    const a = withSingularValues(m, n, sv, 12);
    const r = randomizedSvd(a, m, n, 8, { seed: 3, powerIters: 3 });
    for (let j = 0; j < 8; j++) assert.ok(Math.abs(r.S[j]! - sv[j]!) < 1e-6, `σ${j}: ${r.S[j]} vs ${sv[j]}`);
  });

  test('is deterministic for a seed', () => {
    const a = randn(80, 60, 5);
    const r1 = randomizedSvd(a, 80, 60, 4, { seed: 42, oversample: 4, powerIters: 1 });
    const r2 = randomizedSvd(a, 80, 60, 4, { seed: 42, oversample: 4, powerIters: 1 });
    assert.deepEqual(r1.S, r2.S);
    assert.deepEqual(r1.U, r2.U);
    assert.deepEqual(r1.Vt, r2.Vt);
    const r3 = randomizedSvd(a, 80, 60, 4, { seed: 43, oversample: 4, powerIters: 1 });
    assert.notDeepEqual(r1.U, r3.U);
  });

  test('float32 products (matmul32, as a compute backend gives them) recover a low-rank matrix to float32 accuracy', () => {
    const m = 300;
    const n = 200;
    const sv = [50, 20, 9, 4, 1];
    const a = withSingularValues(m, n, sv, 8);
    const a32 = Float32Array.from(a);
    const backends = [new ReferenceBackend(), ...(wasmSimdSupported() ? (() => { try { return [createBackend('wasm', { threads: 2 })]; } catch { return []; } })() : [])];
    for (const be of backends) {
      let calls = 0;
      const mm = (x: Float32Array, y: Float32Array, out: Float32Array, M: number, K: number, N: number, o?: { transA?: boolean }) => {
        calls++;
        be.matmul(x, y, out, M, K, N, o);
      };
      try {
        const r = randomizedSvd(a32, m, n, 5, { seed: 1, matmul32: mm });
        // The sketch, two power iterations of two products each, and Qᵀ·A.
        assert.equal(calls, 6, be.name);
        for (let j = 0; j < 5; j++) assert.ok(Math.abs(r.S[j]! - sv[j]!) < 1e-5 * sv[0]!, `${be.name} σ${j}: ${r.S[j]}`);
        assert.ok(relErr(reconstructSvd(r, m, n), Float64Array.from(a32)) < 1e-5, be.name);
        assert.ok(orthogonalityError(r.U, m, 5) < 1e-10, be.name);
        const again = randomizedSvd(a32, m, n, 5, { seed: 1, matmul32: mm });
        assert.deepEqual(again.S, r.S, `${be.name}: deterministic`);
      } finally {
        be.dispose?.();
      }
    }
  });

  test('k is clipped to min(m, n)', () => {
    const a = randn(6, 4, 1);
    const r = randomizedSvd(a, 6, 4, 10);
    assert.equal(r.k, 4);
    assert.ok(relErr(reconstructSvd(r, 6, 4), a) < 1e-13);
  });
});

describe('eighLowest', () => {
  /** Checks values against eigh and A·v = λ·v, orthonormality for the k returned vectors. */
  function checkLowest(a: Float64Array, n: number, k: number): ReturnType<typeof eighLowest> {
    const full = eigh(a, n);
    let seen: Float64Array | undefined;
    const r = eighLowest(a, n, (v) => {
      seen = v;
      return k;
    });
    assert.equal(r.count, k);
    assert.ok(seen && seen.length === n, 'count sees every eigenvalue');
    const scale = Math.max(1, ...full.values.map(Math.abs));
    for (let i = 0; i < n; i++) assert.ok(Math.abs(r.values[i]! - full.values[i]!) <= 1e-12 * scale, `value ${i}: ${r.values[i]} vs ${full.values[i]}`);
    assert.ok(orthogonalityError(transpose(r.vectors, k, n), n, k) <= 1e-12, 'orthonormal eigenvectors');
    const av = matmulNT(a, r.vectors, n, n, k); // n×k: column j = A·v_j
    for (let j = 0; j < k; j++) {
      for (let i = 0; i < n; i++) {
        const res = av[i * k + j]! - r.values[j]! * r.vectors[j * n + i]!;
        assert.ok(Math.abs(res) <= 1e-12 * scale, `residual of vector ${j}: ${res}`);
      }
    }
    return r;
  }

  test('matches eigh on random, graded and clustered spectra; separated eigenvectors agree up to sign', () => {
    const n = 40;
    const a = matmulTN(randn(60, n, 71), randn(60, n, 71), 60, n, n);
    const r = checkLowest(a, n, 8);
    const full = eigh(a, n);
    for (let j = 0; j < 8; j++) {
      let dot = 0;
      for (let i = 0; i < n; i++) dot += r.vectors[j * n + i]! * full.vectors[i * n + j]!;
      assert.ok(Math.abs(Math.abs(dot) - 1) <= 1e-10, `vector ${j}: |cos| = ${Math.abs(dot)}`);
    }
    checkLowest(withSpectrum(Array.from({ length: 30 }, (_, i) => 10 ** (-i / 3)), 72), 30, 30);
    // A cluster of four equal eigenvalues at the bottom and a near-tie.
    checkLowest(withSpectrum([1, 1, 1, 1, 1 + 1e-9, 2, 3, 5, 8, 13, 21, 34], 73), 12, 6);
  });

  test('a rank-deficient matrix: an orthonormal basis of the null space', () => {
    const n = 50;
    const h = randn(10, n, 74);
    const a = matmulTN(h, h, 10, n, n); // rank 10: eigenvalue 0 forty times
    const r = checkLowest(a, n, 40);
    // Every returned vector is orthogonal to the rows of h.
    const hv = matmulNT(h, r.vectors, 10, n, 40);
    const scale = Math.max(...h.map(Math.abs));
    for (const x of hv) assert.ok(Math.abs(x) <= 1e-10 * scale * n);
  });

  test('tiny sizes, a diagonal matrix with repeats, none asked, bad input', () => {
    checkLowest(Float64Array.of(5), 1, 1);
    checkLowest(Float64Array.of(2, 1, 1, 2), 2, 2);
    checkLowest(withSpectrum([3, -1, 2], 75), 3, 3);
    const dg = new Float64Array(16 * 16);
    for (let i = 0; i < 16; i++) dg[i * 16 + i] = i % 3;
    checkLowest(dg, 16, 11);
    const none = eighLowest(withSpectrum([1, 2, 3], 76), 3, () => 0);
    assert.equal(none.count, 0);
    assert.deepEqual([...none.values].map((v) => Math.round(v * 1e9) / 1e9), [1, 2, 3]);
    assert.throws(() => eighLowest(new Float64Array(3), 2, () => 1), /expected 2×2/);
    assert.throws(() => eighLowest(Float64Array.of(NaN), 1, () => 1), /non-finite/);
  });
});

test('eighLowest: the WebAssembly reduction gives the TypeScript results bit for bit', (t) => {
  if (!linalgWasmAvailable()) {
    // npm ci builds the module (prepare → build:wasm); a CI run without it is a failure.
    if (process.env.CI === 'true') assert.fail('dist/tensor/linalg-kernels.wasm is not built');
    t.skip('WebAssembly linear algebra not built (npm run build:wasm)');
    return;
  }
  const h = randn(10, 41, 77);
  const cases: [Float64Array, number, number][] = [
    [matmulTN(randn(80, 57, 76), randn(80, 57, 76), 80, 57, 57), 57, 8],
    [matmulTN(h, h, 10, 41, 41), 41, 33],
    [withSpectrum([4, -2, 7], 78), 3, 3],
    [withSpectrum([1, 1, 1, 2, 3, 5, 8, 13], 79), 8, 5],
  ];
  try {
    for (const [a, n, k] of cases) {
      useLinalgWasm(true);
      const fast = eighLowest(a, n, () => k);
      useLinalgWasm(false);
      const plain = eighLowest(a, n, () => k);
      assert.deepEqual(fast.values, plain.values, `values, n = ${n}`);
      assert.deepEqual(fast.vectors, plain.vectors, `vectors, n = ${n}`);
    }
  } finally {
    useLinalgWasm(true);
  }
});
