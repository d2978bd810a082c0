/**
 * Compute backends: the WebAssembly backend against the reference backend on random shapes
 * (tiny, odd, larger; every matmul layout, batched, strided, accumulating), and every backward
 * op of the reference backend against central finite differences of its forward op.
 *
 * Error measure (fast vs reference): for each output array, max|fast − ref| / max|ref|, which
 * must be ≤ 1e-5 (an output that is all zeros must match exactly). Finite differences use the
 * same measure against the analytic gradient, with a bound of 1e-3.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import { Rng } from '../src/tensor/rng.js';
import type { Backend, BatchedMatmulOptions } from '../src/backend/backend.js';
import { ReferenceBackend } from '../src/backend/reference.js';
import { WasmBackend } from '../src/backend/wasm/backend.js';
import { gemmWasmPath } from '../src/backend/wasm/module.js';
import { REPO_ROOT } from './helpers/fixtures.js';

const TOL = 1e-5;
const FD_TOL = 1e-3;

/** Builds the WebAssembly kernels when they are missing or older than their source. */
function ensureWasmBuilt(): void {
  const built = gemmWasmPath();
  const source = join(REPO_ROOT, 'assembly', 'gemm.ts');
  if (built && existsSync(source) && statSync(built).mtimeMs >= statSync(source).mtimeMs) return;
  execSync('npm run build:wasm', { cwd: REPO_ROOT, stdio: 'pipe' });
}

const ref = new ReferenceBackend();
let fast: WasmBackend;
/** Splits even tiny matmuls across three threads (more threads than this machine may have). */
let split3: WasmBackend;
let single: WasmBackend;

before(() => {
  ensureWasmBuilt();
  fast = new WasmBackend();
  split3 = new WasmBackend({ threads: 3, parallelThreshold: 0 });
  single = new WasmBackend({ threads: 1 });
});

after(() => {
  fast.dispose();
  split3.dispose();
  single.dispose();
});

function rand(rng: Rng, n: number, std = 1): Float32Array {
  return rng.fillNormal(new Float32Array(n), std);
}

/** max|x − y| / max|y| over the first n elements. */
function relErr(x: ArrayLike<number>, y: ArrayLike<number>, n = y.length): number {
  let err = 0;
  let mag = 0;
  for (let i = 0; i < n; i++) {
    const d = Math.abs(x[i]! - y[i]!);
    if (!(d <= err)) err = d; // NaN propagates
    mag = Math.max(mag, Math.abs(y[i]!));
  }
  return mag === 0 ? err : err / mag;
}

function assertClose(x: ArrayLike<number>, y: ArrayLike<number>, what: string, tol = TOL): void {
  const e = relErr(x, y);
  assert.ok(e <= tol, `${what}: relative error ${e} > ${tol}`);
}

// ---------------------------------------------------------------------------------------------
// matmul

const LAYOUTS = [
  { transA: false, transB: false, name: 'A·B' },
  { transA: false, transB: true, name: 'A·Bᵀ' },
  { transA: true, transB: false, name: 'Aᵀ·B' },
  { transA: true, transB: true, name: 'Aᵀ·Bᵀ' },
];

function checkMatmul(
  backends: Backend[],
  rng: Rng,
  batch: number,
  M: number,
  K: number,
  N: number,
  opts: BatchedMatmulOptions,
  label: string,
): void {
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const lda = opts.lda ?? (transA ? M : K);
  const ldb = opts.ldb ?? (transB ? K : N);
  const ldc = opts.ldc ?? N;
  const sA = opts.strideA ?? (transA ? K : M) * lda;
  const sB = opts.strideB ?? (transB ? N : K) * ldb;
  const sC = opts.strideC ?? M * ldc;
  const a = rand(rng, Math.max(1, (batch - 1) * sA + (transA ? K : M) * lda));
  const b = rand(rng, Math.max(1, (batch - 1) * sB + (transB ? N : K) * ldb));
  const c0 = rand(rng, Math.max(1, (batch - 1) * sC + M * ldc));
  const want = c0.slice();
  ref.matmulBatched(a, b, want, batch, M, K, N, opts);
  for (const be of backends) {
    const got = c0.slice();
    be.matmulBatched(a, b, got, batch, M, K, N, opts);
    assertClose(got, want, `${be.name} ${label}`);
  }
}

describe('matmul: wasm equals reference', () => {
  const shapes: [number, number, number][] = [
    [1, 1, 1],
    [1, 7, 1],
    [2, 1, 3],
    [3, 5, 7],
    [17, 31, 13],
    [65, 129, 33],
    [16, 256, 16],
    [1, 300, 70],
    [70, 300, 1],
    [256, 512, 384],
  ];
  const rng0 = new Rng(7);
  for (let i = 0; i < 8; i++) shapes.push([1 + rng0.int(90), 1 + rng0.int(300), 1 + rng0.int(90)]);

  for (const [M, K, N] of shapes) {
    test(`M=${M} K=${K} N=${N}, all layouts, plain and accumulate`, () => {
      const rng = new Rng(M * 1_000_003 + K * 1009 + N);
      for (const layout of LAYOUTS) {
        const { transA, transB } = layout;
        checkMatmul([fast, split3], rng, 1, M, K, N, { transA, transB }, `${layout.name} ${M}x${K}x${N}`);
        checkMatmul(
          [fast, split3],
          rng,
          1,
          M,
          K,
          N,
          { transA, transB, accumulate: true, alpha: -0.37 },
          `${layout.name} accumulate ${M}x${K}x${N}`,
        );
      }
    });
  }

  test('batched: default strides, broadcast B, strided views', () => {
    const rng = new Rng(11);
    for (const layout of LAYOUTS) {
      const { transA, transB } = layout;
      checkMatmul([fast, split3], rng, 5, 9, 23, 18, { transA, transB }, `${layout.name} batch 5`);
      checkMatmul([fast, split3], rng, 3, 33, 40, 5, { transA, transB, strideB: 0 }, `${layout.name} shared B`);
      checkMatmul(
        [fast, split3],
        rng,
        4,
        7,
        12,
        10,
        { transA, transB, accumulate: true, alpha: 2, strideA: 0 },
        `${layout.name} shared A, accumulate`,
      );
    }
    // Attention-style views: 4 heads of width 8 interleaved in [T, heads, 8] rows.
    const T = 19;
    const H = 4;
    const D = 8;
    const hd = H * D;
    checkMatmul([fast, split3], rng, H, T, D, T, { transB: true, lda: hd, ldb: hd, strideA: D, strideB: D, alpha: 0.35 }, 'Q·Kᵀ');
    checkMatmul([fast, split3], rng, H, T, T, D, { ldb: hd, ldc: hd, strideB: D, strideC: D }, 'P·V into [T, H, D]');
    checkMatmul(
      [fast, split3],
      rng,
      H,
      T,
      T,
      D,
      { transA: true, lda: T, ldb: hd, ldc: hd, strideA: T * T, strideB: D, strideC: D, accumulate: true },
      'Pᵀ·dO accumulated into [T, H, D]',
    );
    checkMatmul([fast, split3], rng, 2, 130, 70, 90, { transB: true }, 'batch 2, larger');
  });

  test('degenerate sizes: K = 0, M = 0, batch = 0', () => {
    const rng = new Rng(3);
    for (const be of [fast, split3, ref]) {
      const c = rand(rng, 12);
      be.matmul(new Float32Array(0), new Float32Array(0), c, 3, 0, 4);
      assert.deepEqual([...c], new Array(12).fill(0), `${be.name} K=0 overwrites with zeros`);
      const d = rand(rng, 12);
      const d0 = d.slice();
      be.matmul(new Float32Array(0), new Float32Array(0), d, 3, 0, 4, { accumulate: true });
      assert.deepEqual(d, d0, `${be.name} K=0 accumulate leaves out alone`);
      be.matmul(new Float32Array(0), new Float32Array(5), new Float32Array(0), 0, 5, 1);
      be.matmulBatched(new Float32Array(0), new Float32Array(0), new Float32Array(0), 0, 3, 3, 3);
    }
  });

  test('results are bitwise identical for 1, 2 and 3 threads', () => {
    const rng = new Rng(5);
    for (const [M, K, N] of [
      [64, 300, 200],
      [7, 513, 333],
      [300, 64, 9],
    ] as const) {
      for (const layout of LAYOUTS) {
        const a = rand(rng, M * K);
        const b = rand(rng, K * N);
        const outs = [single, fast, split3].map((be) => {
          const c = new Float32Array(M * N);
          be.matmul(a, b, c, M, K, N, { transA: layout.transA, transB: layout.transB });
          return c;
        });
        assert.deepEqual(outs[1], outs[0]);
        assert.deepEqual(outs[2], outs[0]);
      }
    }
  });

  test('memory grows for large operands, workers included', () => {
    const rng = new Rng(9);
    // B alone is 24 MiB, past the initial arena.
    checkMatmul([split3, fast], rng, 1, 5, 1 << 20, 6, { transB: true }, 'K = 2^20');
  });

  test('bad arguments throw E_SHAPE', () => {
    for (const be of [fast, ref]) {
      assert.throws(
        () => be.matmul(new Float32Array(5), new Float32Array(6), new Float32Array(4), 2, 3, 2),
        (e: unknown) => e instanceof AmalgamError && e.code === 'E_SHAPE',
      );
      assert.throws(
        () => be.matmul(new Float32Array(6), new Float32Array(6), new Float32Array(4), 2, 3, 2, { ldc: 1 }),
        (e: unknown) => e instanceof AmalgamError && e.code === 'E_SHAPE',
      );
      assert.throws(
        () => be.matmul(new Float32Array(6), new Float32Array(6), new Float32Array(4), 2, 3.5, 2),
        (e: unknown) => e instanceof AmalgamError && e.code === 'E_SHAPE',
      );
    }
  });
});

// ---------------------------------------------------------------------------------------------
// other ops: wasm backend (TypeScript kernels) against the reference

describe('elementwise, norm, softmax, rope, loss: wasm equals reference', () => {
  const sizes = [1, 3, 17, 64, 129];

  test('add, mul, scale, axpy', () => {
    const rng = new Rng(21);
    for (const n of [0, ...sizes, 1000]) {
      const a = rand(rng, n);
      const b = rand(rng, n);
      const r = new Float32Array(n);
      const f = new Float32Array(n);
      ref.add(a, b, r, n);
      fast.add(a, b, f, n);
      assertClose(f, r, `add ${n}`);
      ref.mul(a, b, r, n);
      fast.mul(a, b, f, n);
      assertClose(f, r, `mul ${n}`);
      ref.scale(a, -1.7, r, n);
      fast.scale(a, -1.7, f, n);
      assertClose(f, r, `scale ${n}`);
      const yr = b.slice();
      const yf = b.slice();
      ref.axpy(0.3, a, yr, n);
      fast.axpy(0.3, a, yf, n);
      assertClose(yf, yr, `axpy ${n}`);
      // in place
      const ip = a.slice();
      fast.add(ip, b, ip, n);
      ref.add(a, b, r, n);
      assertClose(ip, r, `add in place ${n}`);
    }
  });

  test('rmsnorm forward and backward', () => {
    const rng = new Rng(22);
    for (const rows of [1, 3, 8]) {
      for (const dim of sizes) {
        const x = rand(rng, rows * dim);
        const w = rand(rng, dim);
        const dy = rand(rng, rows * dim);
        const outR = new Float32Array(rows * dim);
        const outF = new Float32Array(rows * dim);
        const invR = new Float32Array(rows);
        const invF = new Float32Array(rows);
        ref.rmsnorm(x, w, outR, rows, dim, 1e-5, invR);
        fast.rmsnorm(x, w, outF, rows, dim, 1e-5, invF);
        assertClose(outF, outR, `rmsnorm ${rows}x${dim}`);
        assertClose(invF, invR, `rmsnorm invRms ${rows}x${dim}`);
        for (const inv of [invR, null]) {
          const dxR = new Float32Array(rows * dim);
          const dxF = new Float32Array(rows * dim);
          const dwR = rand(rng, dim);
          const dwF = dwR.slice();
          ref.rmsnormBackward(x, w, inv, dy, dxR, dwR, rows, dim, 1e-5);
          fast.rmsnormBackward(x, w, inv, dy, dxF, dwF, rows, dim, 1e-5);
          assertClose(dxF, dxR, `rmsnorm dx ${rows}x${dim}`);
          assertClose(dwF, dwR, `rmsnorm dWeight ${rows}x${dim}`);
        }
      }
    }
  });

  test('softmax forward and backward, with and without a causal mask', () => {
    const rng = new Rng(23);
    const cases = [
      { rows: 1, cols: 1 },
      { rows: 5, cols: 7 },
      { rows: 12, cols: 12, opts: { causal: true } },
      { rows: 3 * 6, cols: 6, opts: { causal: true } },
      { rows: 2 * 3, cols: 9, opts: { causal: true, queryLen: 3 } },
      { rows: 4, cols: 10, opts: { causal: true, queryLen: 4, queryOffset: 2 } },
      { rows: 4, cols: 10, opts: { causal: true, queryLen: 4, queryOffset: -2 } },
      { rows: 33, cols: 129 },
    ];
    for (const { rows, cols, opts } of cases) {
      const x = rand(rng, rows * cols, 3);
      const yR = new Float32Array(rows * cols);
      const yF = new Float32Array(rows * cols);
      ref.softmax(x, yR, rows, cols, opts);
      fast.softmax(x, yF, rows, cols, opts);
      assertClose(yF, yR, `softmax ${rows}x${cols} ${JSON.stringify(opts)}`);
      const inPlace = x.slice();
      fast.softmax(inPlace, inPlace, rows, cols, opts);
      assertClose(inPlace, yR, 'softmax in place');
      const dy = rand(rng, rows * cols);
      const dxR = new Float32Array(rows * cols);
      const dxF = new Float32Array(rows * cols);
      ref.softmaxBackward(yR, dy, dxR, rows, cols);
      fast.softmaxBackward(yR, dy, dxF, rows, cols);
      assertClose(dxF, dxR, `softmax backward ${rows}x${cols}`);
    }
    // Causal rows see exactly the keys up to their position.
    const y = new Float32Array(9);
    fast.softmax(new Float32Array(9), y, 3, 3, { causal: true });
    assert.deepEqual([...y], [1, 0, 0, 0.5, 0.5, 0, 1 / 3, 1 / 3, 1 / 3].map(Math.fround));
  });

  test('silu and swiglu forward and backward', () => {
    const rng = new Rng(24);
    for (const n of sizes) {
      const g = rand(rng, n, 3);
      const u = rand(rng, n);
      const d = rand(rng, n);
      const r1 = new Float32Array(n);
      const f1 = new Float32Array(n);
      const r2 = new Float32Array(n);
      const f2 = new Float32Array(n);
      ref.silu(g, r1, n);
      fast.silu(g, f1, n);
      assertClose(f1, r1, `silu ${n}`);
      ref.siluBackward(g, d, r1, n);
      fast.siluBackward(g, d, f1, n);
      assertClose(f1, r1, `silu backward ${n}`);
      ref.swiglu(g, u, r1, n);
      fast.swiglu(g, u, f1, n);
      assertClose(f1, r1, `swiglu ${n}`);
      ref.swigluBackward(g, u, d, r1, r2, n);
      fast.swigluBackward(g, u, d, f1, f2, n);
      assertClose(f1, r1, `swiglu dGate ${n}`);
      assertClose(f2, r2, `swiglu dUp ${n}`);
    }
  });

  test('rope forward and backward', () => {
    const rng = new Rng(25);
    for (const [tokens, heads, headDim] of [
      [1, 1, 2],
      [5, 3, 8],
      [17, 2, 64],
    ] as const) {
      const { cos, sin } = ropeTables(40, headDim);
      const n = tokens * heads * headDim;
      const x = rand(rng, n);
      const positions = Int32Array.from({ length: tokens }, () => rng.int(40));
      for (const pos of [undefined, positions]) {
        const r = new Float32Array(n);
        const f = new Float32Array(n);
        ref.rope(x, r, cos, sin, tokens, heads, headDim, pos);
        fast.rope(x, f, cos, sin, tokens, heads, headDim, pos);
        assertClose(f, r, `rope ${tokens}x${heads}x${headDim}`);
        const ip = x.slice();
        fast.rope(ip, ip, cos, sin, tokens, heads, headDim, pos);
        assertClose(ip, r, 'rope in place');
        ref.ropeBackward(x, r, cos, sin, tokens, heads, headDim, pos);
        fast.ropeBackward(x, f, cos, sin, tokens, heads, headDim, pos);
        assertClose(f, r, `rope backward ${tokens}x${heads}x${headDim}`);
      }
    }
  });

  test('cross-entropy: loss and dLogits, ignored rows, weights, reductions, in place', () => {
    const rng = new Rng(26);
    for (const [rows, vocab] of [
      [1, 1],
      [1, 5],
      [7, 33],
      [16, 300],
    ] as const) {
      const logits = rand(rng, rows * vocab, 4);
      const targets = Int32Array.from({ length: rows }, (_, r) => (r % 3 === 2 ? -100 : rng.int(vocab)));
      const weights = Float32Array.from({ length: rows }, () => rng.next());
      for (const opts of [{}, { reduction: 'sum' as const }, { weights }, { weights, reduction: 'sum' as const }]) {
        const dR = new Float32Array(rows * vocab);
        const dF = new Float32Array(rows * vocab);
        const lR = ref.crossEntropy(logits, targets, dR, rows, vocab, opts);
        const lF = fast.crossEntropy(logits, targets, dF, rows, vocab, opts);
        assertClose([lF], [lR], `loss ${rows}x${vocab}`);
        assertClose(dF, dR, `dLogits ${rows}x${vocab}`);
        assert.equal(fast.crossEntropy(logits, targets, null, rows, vocab, opts), lF);
        const ip = logits.slice();
        assert.equal(fast.crossEntropy(ip, targets, ip, rows, vocab, opts), lF);
        assertClose(ip, dR, 'dLogits in place');
      }
    }
    // Every row ignored: zero loss and zero gradient.
    const d = new Float32Array(6).fill(9);
    assert.equal(fast.crossEntropy(new Float32Array(6), Int32Array.of(-1, -100), d, 2, 3), 0);
    assert.deepEqual([...d], [0, 0, 0, 0, 0, 0]);
    assert.throws(() => fast.crossEntropy(new Float32Array(6), Int32Array.of(0, 3), null, 2, 3), AmalgamError);
  });

  test('embedding forward and backward', () => {
    const rng = new Rng(27);
    const vocab = 11;
    const dim = 6;
    const table = rand(rng, vocab * dim);
    const ids = Int32Array.of(3, 0, 10, 3, 7);
    const r = new Float32Array(ids.length * dim);
    const f = new Float32Array(ids.length * dim);
    ref.embedding(table, ids, r, dim);
    fast.embedding(table, ids, f, dim);
    assert.deepEqual(f, r);
    const dOut = rand(rng, ids.length * dim);
    const gR = rand(rng, vocab * dim);
    const gF = gR.slice();
    ref.embeddingBackward(dOut, ids, gR, dim);
    fast.embeddingBackward(dOut, ids, gF, dim);
    assertClose(gF, gR, 'embedding backward');
    assert.throws(() => fast.embedding(table, Int32Array.of(11), f, dim), AmalgamError);
  });
});

// ---------------------------------------------------------------------------------------------
// backward ops against finite differences of the forward ops

function ropeTables(maxPos: number, headDim: number): { cos: Float32Array; sin: Float32Array } {
  const half = headDim / 2;
  const cos = new Float32Array(maxPos * half);
  const sin = new Float32Array(maxPos * half);
  for (let p = 0; p < maxPos; p++) {
    for (let i = 0; i < half; i++) {
      const angle = p / 10000 ** ((2 * i) / headDim);
      cos[p * half + i] = Math.cos(angle);
      sin[p * half + i] = Math.sin(angle);
    }
  }
  return { cos, sin };
}

/**
 * Checks grad ≈ d/dx Σ w ⊙ f(x) by central differences on every element of x.
 * f writes its output (float32); the sum is taken in float64.
 */
function checkGradient(
  x: Float32Array,
  grad: ArrayLike<number>,
  forward: (x: Float32Array) => ArrayLike<number> | number,
  w: Float64Array | null,
  what: string,
  h = 1e-2,
): void {
  const objective = (): number => {
    const y = forward(x);
    if (typeof y === 'number') return y;
    let s = 0;
    for (let i = 0; i < y.length; i++) s += w![i]! * y[i]!;
    return s;
  };
  const fd = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const x0 = x[i]!;
    x[i] = x0 + h;
    const up = objective();
    x[i] = x0 - h;
    const down = objective();
    x[i] = x0;
    // The step actually taken in float32.
    fd[i] = (up - down) / (Math.fround(x0 + h) - Math.fround(x0 - h));
  }
  const e = relErr(grad, fd);
  assert.ok(e <= FD_TOL, `${what}: finite-difference relative error ${e} > ${FD_TOL}`);
}

function weightsFor(rng: Rng, n: number): Float64Array {
  return Float64Array.from({ length: n }, () => rng.normal());
}

describe('row-wise kernels on large resident operands: wasm equals reference', () => {
  // The WebAssembly row-wise kernels run only for operands of at least 4096 values that live in
  // the backend's memory (as a model's activations do); smaller or foreign arrays take the
  // TypeScript path tested above. Sizes here are above that, odd where the op allows.

  /** A resident copy of `src` (asserted resident, so that the kernel path is the one tested). */
  function resident(be: WasmBackend, src: Float32Array): Float32Array {
    const a = be.allocate(src.length);
    assert.ok(be.isResident(a), 'allocate returned a buffer outside WebAssembly memory');
    a.set(src);
    return a;
  }

  function backends(): [string, WasmBackend][] {
    return [
      ['2 threads', fast],
      ['1 thread', single],
      ['3 threads', split3],
    ];
  }

  test('add, in place included', () => {
    const rng = new Rng(31);
    for (const n of [4096, 4099, 10007, 65537]) {
      const a = rand(rng, n);
      const b = rand(rng, n);
      const r = new Float32Array(n);
      ref.add(a, b, r, n);
      for (const [name, be] of backends()) {
        const ra = resident(be, a);
        const rb = resident(be, b);
        const out = resident(be, new Float32Array(n));
        be.add(ra, rb, out, n);
        assertClose(out, r, `add ${n} (${name})`);
        be.add(ra, rb, ra, n);
        assertClose(ra, r, `add in place ${n} (${name})`);
        for (const x of [ra, rb, out]) be.release(x);
      }
    }
  });

  test('rmsnorm forward and backward', () => {
    const rng = new Rng(32);
    for (const [rows, dim] of [
      [64, 64],
      [63, 67],
      [9, 1001],
      [300, 17],
    ] as const) {
      const n = rows * dim;
      const x = rand(rng, n, 2);
      const w = rand(rng, dim);
      const dy = rand(rng, n);
      const dw0 = rand(rng, dim);
      const outR = new Float32Array(n);
      const invR = new Float32Array(rows);
      ref.rmsnorm(x, w, outR, rows, dim, 1e-5, invR);
      const dxR = new Float32Array(n);
      const dwR = dw0.slice();
      ref.rmsnormBackward(x, w, invR, dy, dxR, dwR, rows, dim, 1e-5);
      for (const [name, be] of backends()) {
        const rx = resident(be, x);
        const out = resident(be, new Float32Array(n));
        const inv = new Float32Array(rows);
        be.rmsnorm(rx, w, out, rows, dim, 1e-5, inv);
        assertClose(out, outR, `rmsnorm ${rows}x${dim} (${name})`);
        assertClose(inv, invR, `rmsnorm invRms ${rows}x${dim} (${name})`);
        const rdy = resident(be, dy);
        const dx = resident(be, new Float32Array(n));
        const dw = dw0.slice();
        be.rmsnormBackward(rx, w, inv, rdy, dx, dw, rows, dim, 1e-5);
        assertClose(dx, dxR, `rmsnorm dx ${rows}x${dim} (${name})`);
        assertClose(dw, dwR, `rmsnorm dWeight ${rows}x${dim} (${name})`);
        for (const a of [rx, out, rdy, dx]) be.release(a);
      }
    }
  });

  test('rope forward and backward, with and without positions', () => {
    const rng = new Rng(33);
    for (const [tokens, heads, headDim] of [
      [37, 5, 64],
      [171, 3, 8],
      [16, 4, 66],
    ] as const) {
      const { cos, sin } = ropeTables(200, headDim);
      const n = tokens * heads * headDim;
      const x = rand(rng, n);
      const positions = Int32Array.from({ length: tokens }, () => rng.int(200));
      for (const pos of [undefined, positions]) {
        const r = new Float32Array(n);
        ref.rope(x, r, cos, sin, tokens, heads, headDim, pos);
        const rb = new Float32Array(n);
        ref.ropeBackward(x, rb, cos, sin, tokens, heads, headDim, pos);
        for (const [name, be] of backends()) {
          const what = `${tokens}x${heads}x${headDim}${pos ? ' with positions' : ''} (${name})`;
          const rx = resident(be, x);
          const out = resident(be, new Float32Array(n));
          be.rope(rx, out, cos, sin, tokens, heads, headDim, pos);
          assertClose(out, r, `rope ${what}`);
          be.ropeBackward(rx, out, cos, sin, tokens, heads, headDim, pos);
          assertClose(out, rb, `rope backward ${what}`);
          be.rope(rx, rx, cos, sin, tokens, heads, headDim, pos);
          assertClose(rx, r, `rope in place ${what}`);
          for (const a of [rx, out]) be.release(a);
        }
      }
    }
  });

  test('swiglu forward and backward, resident or not', () => {
    const rng = new Rng(34);
    for (const n of [4096, 5003, 40001]) {
      const g = rand(rng, n, 3);
      const u = rand(rng, n);
      const d = rand(rng, n);
      const r1 = new Float32Array(n);
      const r2 = new Float32Array(n);
      ref.swiglu(g, u, r1, n);
      const rd1 = new Float32Array(n);
      ref.swigluBackward(g, u, d, rd1, r2, n);
      for (const [name, be] of backends()) {
        for (const res of [false, true]) {
          const what = `${n}${res ? ' resident' : ''} (${name})`;
          const [rg, ru, rd] = res ? [resident(be, g), resident(be, u), resident(be, d)] : [g, u, d];
          const f1 = res ? resident(be, new Float32Array(n)) : new Float32Array(n);
          const f2 = res ? resident(be, new Float32Array(n)) : new Float32Array(n);
          be.swiglu(rg, ru, f1, n);
          assertClose(f1, r1, `swiglu ${what}`);
          be.swigluBackward(rg, ru, rd, f1, f2, n);
          assertClose(f1, rd1, `swiglu dGate ${what}`);
          assertClose(f2, r2, `swiglu dUp ${what}`);
          if (res) for (const a of [rg, ru, rd, f1, f2]) be.release(a);
        }
      }
    }
  });

  test('cross-entropy on large logits, resident or not', () => {
    const rng = new Rng(35);
    for (const [rows, vocab] of [
      [8, 512],
      [33, 1001],
    ] as const) {
      const logits = rand(rng, rows * vocab, 4);
      const targets = Int32Array.from({ length: rows }, (_, r) => (r % 5 === 4 ? -100 : rng.int(vocab)));
      const dR = new Float32Array(rows * vocab);
      const lR = ref.crossEntropy(logits, targets, dR, rows, vocab);
      for (const [name, be] of backends()) {
        for (const res of [false, true]) {
          const l = res ? resident(be, logits) : logits.slice();
          const dF = res ? resident(be, new Float32Array(rows * vocab)) : new Float32Array(rows * vocab);
          const lF = be.crossEntropy(l, targets, dF, rows, vocab);
          assertClose([lF], [lR], `loss ${rows}x${vocab}${res ? ' resident' : ''} (${name})`);
          assertClose(dF, dR, `dLogits ${rows}x${vocab}${res ? ' resident' : ''} (${name})`);
          if (res) for (const a of [l, dF]) be.release(a);
        }
      }
    }
  });
});

describe('backward ops match finite differences of the forward ops', () => {
  for (const be of [ref, null]) {
    const label = be ? 'reference' : 'wasm';
    const B = (): Backend => be ?? fast;

    test(`${label}: rmsnorm dx and dWeight`, () => {
      const rng = new Rng(31);
      const rows = 3;
      const dim = 7;
      const eps = 1e-3;
      const x = rand(rng, rows * dim);
      const weight = rand(rng, dim);
      const w = weightsFor(rng, rows * dim);
      const dy = Float32Array.from(w);
      const dx = new Float32Array(rows * dim);
      const dW = new Float32Array(dim);
      const y = new Float32Array(rows * dim);
      B().rmsnormBackward(x, weight, null, dy, dx, dW, rows, dim, eps);
      checkGradient(x, dx, (xx) => (B().rmsnorm(xx, weight, y, rows, dim, eps), y), w, 'rmsnorm dx');
      checkGradient(weight, dW, (ww) => (B().rmsnorm(x, ww, y, rows, dim, eps), y), w, 'rmsnorm dWeight');
    });

    test(`${label}: softmax (plain and causal)`, () => {
      const rng = new Rng(32);
      for (const opts of [undefined, { causal: true }]) {
        const rows = 5;
        const cols = 5;
        const x = rand(rng, rows * cols);
        const w = weightsFor(rng, rows * cols);
        const y = new Float32Array(rows * cols);
        B().softmax(x, y, rows, cols, opts);
        const dx = new Float32Array(rows * cols);
        B().softmaxBackward(y, Float32Array.from(w), dx, rows, cols);
        const out = new Float32Array(rows * cols);
        checkGradient(x, dx, (xx) => (B().softmax(xx, out, rows, cols, opts), out), w, `softmax ${JSON.stringify(opts)}`);
      }
    });

    test(`${label}: silu and swiglu`, () => {
      const rng = new Rng(33);
      const n = 9;
      const g = rand(rng, n, 2);
      const u = rand(rng, n);
      const w = weightsFor(rng, n);
      const dOut = Float32Array.from(w);
      const y = new Float32Array(n);
      const dx = new Float32Array(n);
      B().siluBackward(g, dOut, dx, n);
      checkGradient(g, dx, (xx) => (B().silu(xx, y, n), y), w, 'silu');
      const dG = new Float32Array(n);
      const dU = new Float32Array(n);
      B().swigluBackward(g, u, dOut, dG, dU, n);
      checkGradient(g, dG, (xx) => (B().swiglu(xx, u, y, n), y), w, 'swiglu dGate');
      checkGradient(u, dU, (uu) => (B().swiglu(g, uu, y, n), y), w, 'swiglu dUp');
    });

    test(`${label}: rope`, () => {
      const rng = new Rng(34);
      const [tokens, heads, headDim] = [4, 2, 6];
      const { cos, sin } = ropeTables(16, headDim);
      const positions = Int32Array.of(3, 0, 15, 7);
      const n = tokens * heads * headDim;
      const x = rand(rng, n);
      const w = weightsFor(rng, n);
      const dx = new Float32Array(n);
      B().ropeBackward(Float32Array.from(w), dx, cos, sin, tokens, heads, headDim, positions);
      const y = new Float32Array(n);
      checkGradient(x, dx, (xx) => (B().rope(xx, y, cos, sin, tokens, heads, headDim, positions), y), w, 'rope');
    });

    test(`${label}: cross-entropy`, () => {
      const rng = new Rng(35);
      const [rows, vocab] = [4, 6];
      const logits = rand(rng, rows * vocab, 2);
      const targets = Int32Array.of(2, -100, 5, 0);
      const weights = Float32Array.of(1, 1, 0.5, 2);
      for (const opts of [{}, { weights, reduction: 'sum' as const }]) {
        const d = new Float32Array(rows * vocab);
        B().crossEntropy(logits, targets, d, rows, vocab, opts);
        checkGradient(logits, d, (xx) => B().crossEntropy(xx, targets, null, rows, vocab, opts), null, 'cross-entropy');
      }
    });

    test(`${label}: matmul gradients (dA = dC·Bᵀ, dB = Aᵀ·dC)`, () => {
      const rng = new Rng(36);
      const [M, K, N] = [3, 4, 5];
      const a = rand(rng, M * K);
      const b = rand(rng, K * N);
      const w = weightsFor(rng, M * N);
      const dC = Float32Array.from(w);
      const dA = new Float32Array(M * K);
      const dB = new Float32Array(K * N);
      B().matmul(dC, b, dA, M, N, K, { transB: true });
      B().matmul(a, dC, dB, K, M, N, { transA: true });
      const c = new Float32Array(M * N);
      checkGradient(a, dA, (aa) => (B().matmul(aa, b, c, M, K, N), c), w, 'matmul dA');
      checkGradient(b, dB, (bb) => (B().matmul(a, bb, c, M, K, N), c), w, 'matmul dB');
    });

    test(`${label}: embedding`, () => {
      const rng = new Rng(37);
      const [vocab, dim] = [5, 3];
      const table = rand(rng, vocab * dim);
      const ids = Int32Array.of(4, 1, 4);
      const w = weightsFor(rng, ids.length * dim);
      const dT = new Float32Array(vocab * dim);
      B().embeddingBackward(Float32Array.from(w), ids, dT, dim);
      const y = new Float32Array(ids.length * dim);
      checkGradient(table, dT, (tt) => (B().embedding(tt, ids, y, dim), y), w, 'embedding');
    });
  }
});
