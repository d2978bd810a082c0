/**
 * Matmul throughput of the compute backends: N×N×N float32 products (default 1024³) in each
 * layout (A·B, A·Bᵀ, Aᵀ·B) for the reference TypeScript backend, the WebAssembly backend on
 * one thread and on all threads. Reports GFLOP/s (2·N³ flops per product), best of the repeats.
 *
 *   npm run bench -- kernels [--size N] [--reps R] [--threads T] [--no-reference]
 */
import { availableParallelism } from 'node:os';
import { parseArgs } from 'node:util';
import type { Backend, MatmulOptions } from '../src/backend/backend.js';
import { ReferenceBackend } from '../src/backend/reference.js';
import { WasmBackend } from '../src/backend/wasm/backend.js';
import { Rng } from '../src/tensor/rng.js';

const USAGE = `usage: npm run bench -- kernels [options]

  --size N        matrix size (default 1024)
  --reps R        timed repeats per case, best reported (default 5; 1 for the reference)
  --threads T     threads for the multi-threaded run (default: all, ${availableParallelism()} here)
  --no-reference  skip the (slow) reference backend`;

const LAYOUTS: { name: string; opts: MatmulOptions }[] = [
  { name: 'A·B', opts: {} },
  { name: 'A·Bᵀ', opts: { transB: true } },
  { name: 'Aᵀ·B', opts: { transA: true } },
];

function gflops(n: number, ms: number): number {
  return (2 * n * n * n) / (ms * 1e6);
}

function time(be: Backend, a: Float32Array, b: Float32Array, c: Float32Array, n: number, opts: MatmulOptions, reps: number): number {
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    be.matmul(a, b, c, n, n, n, opts);
    best = Math.min(best, performance.now() - t0);
  }
  return best;
}

export function run(args: string[]): void {
  const { values } = parseArgs({
    args,
    options: {
      size: { type: 'string', default: '1024' },
      reps: { type: 'string', default: '5' },
      threads: { type: 'string' },
      'no-reference': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: false,
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const n = Number(values.size);
  const reps = Number(values.reps);
  const threads = values.threads !== undefined ? Number(values.threads) : availableParallelism();
  if (!Number.isSafeInteger(n) || n < 1 || !Number.isSafeInteger(reps) || reps < 1 || !Number.isSafeInteger(threads) || threads < 1) {
    console.error(USAGE);
    process.exitCode = 2;
    return;
  }

  const rng = new Rng(1);
  const a = rng.fillNormal(new Float32Array(n * n));
  const b = rng.fillNormal(new Float32Array(n * n));
  const c = new Float32Array(n * n);

  const rows: { backend: string; results: number[] }[] = [];
  const measure = (label: string, be: Backend, r: number): void => {
    // One untimed call per layout first (tier-up, memory growth), except for the slow reference.
    if (r > 1) for (const l of LAYOUTS) be.matmul(a, b, c, n, n, n, l.opts);
    rows.push({ backend: label, results: LAYOUTS.map((l) => gflops(n, time(be, a, b, c, n, l.opts, r))) });
  };

  if (!values['no-reference']) measure('reference TypeScript', new ReferenceBackend(), 1);
  const one = new WasmBackend({ threads: 1 });
  measure('wasm SIMD, 1 thread', one, reps);
  one.dispose();
  const all = new WasmBackend({ threads });
  measure(`wasm SIMD, ${all.threads} threads`, all, reps);
  all.dispose();

  const width = Math.max(...rows.map((r) => r.backend.length));
  console.log(`matmul ${n}×${n}×${n} float32, GFLOP/s (best of ${reps}; reference: 1)`);
  console.log(`  ${'backend'.padEnd(width)}  ${LAYOUTS.map((l) => l.name.padStart(7)).join('  ')}`);
  for (const r of rows) {
    console.log(`  ${r.backend.padEnd(width)}  ${r.results.map((g) => g.toFixed(1).padStart(7)).join('  ')}`);
  }
}
