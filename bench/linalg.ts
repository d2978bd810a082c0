/**
 * Symmetric eigensolvers at the widths OSRM's covariance mode meets: `eigh` (the full
 * decomposition) against `eighLowest` (tridiagonal reduction, then only the r lowest eigenvectors)
 * on d × d second-moment matrices of Gaussian features with graded scales. Reports the time of
 * each (best of the repeats), the speed-up, and checks that both give the same r smallest
 * eigenvalues and that eighLowest's vectors are orthonormal eigenvectors.
 *
 *   npm run bench -- linalg [--sizes 512,1024,2048] [--rank 8] [--reps 1] [--json]
 */
import { parseArgs } from 'node:util';
import { eigh, eighLowest } from '../src/tensor/linalg.js';
import { Rng } from '../src/tensor/rng.js';

const USAGE = `usage: npm run bench -- linalg [options]

  --sizes LIST   matrix sizes, comma-separated (default 512,1024,2048)
  --rank R       eigenvectors eighLowest computes (default 8)
  --reps R       timed repeats per solver, best reported (default 1)
  --json         print the figures as one JSON object`;

/** C = Σ h·hᵀ over 2·d feature rows, feature i scaled by 1 + (i mod 7). */
function secondMoment(d: number, seed: number): Float64Array {
  const rng = new Rng(seed);
  const rows = 2 * d;
  const h = new Float64Array(rows * d);
  for (let r = 0; r < rows; r++) for (let i = 0; i < d; i++) h[r * d + i] = rng.normal() * (1 + (i % 7));
  const c = new Float64Array(d * d);
  for (let i = 0; i < d; i++) {
    for (let j = 0; j <= i; j++) {
      let s = 0;
      for (let r = 0; r < rows; r++) s += h[r * d + i]! * h[r * d + j]!;
      c[i * d + j] = s;
      c[j * d + i] = s;
    }
  }
  return c;
}

function best(reps: number, f: () => void): number {
  let t = Infinity;
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    f();
    t = Math.min(t, performance.now() - t0);
  }
  return t / 1000;
}

export function run(args: string[]): void {
  const { values } = parseArgs({
    args,
    options: {
      sizes: { type: 'string', default: '512,1024,2048' },
      rank: { type: 'string', default: '8' },
      reps: { type: 'string', default: '1' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const sizes = values.sizes!.split(',').map(Number);
  const rank = Number(values.rank);
  const reps = Number(values.reps);
  if (sizes.some((n) => !Number.isSafeInteger(n) || n < 2) || !Number.isSafeInteger(rank) || rank < 1 || !Number.isSafeInteger(reps) || reps < 1) {
    throw Object.assign(new Error('--sizes must list integers >= 2; --rank and --reps must be positive integers'), { usage: true });
  }
  const rows: { n: number; eighSeconds: number; eighLowestSeconds: number; speedup: number; maxValueError: number; maxResidual: number; orthogonality: number }[] = [];
  for (const n of sizes) {
    const k = Math.min(rank, n);
    const c = secondMoment(n, n);
    let full!: ReturnType<typeof eigh>;
    let low!: ReturnType<typeof eighLowest>;
    const te = best(reps, () => (full = eigh(c, n)));
    const tl = best(reps, () => (low = eighLowest(c, n, () => k)));
    const scale = full.values[n - 1]!;
    let maxValueError = 0;
    for (let j = 0; j < k; j++) maxValueError = Math.max(maxValueError, Math.abs(low.values[j]! - full.values[j]!) / scale);
    let maxResidual = 0;
    let orthogonality = 0;
    for (let j = 0; j < k; j++) {
      const v = low.vectors.subarray(j * n, (j + 1) * n);
      for (let i = 0; i < n; i++) {
        let s = 0;
        for (let q = 0; q < n; q++) s += c[i * n + q]! * v[q]!;
        maxResidual = Math.max(maxResidual, Math.abs(s - low.values[j]! * v[i]!) / scale);
      }
      for (let q = 0; q <= j; q++) {
        let s = 0;
        for (let i = 0; i < n; i++) s += low.vectors[q * n + i]! * v[i]!;
        orthogonality = Math.max(orthogonality, Math.abs(s - (q === j ? 1 : 0)));
      }
    }
    const row = { n, eighSeconds: te, eighLowestSeconds: tl, speedup: te / tl, maxValueError, maxResidual, orthogonality };
    rows.push(row);
    if (!values.json) {
      console.log(
        `n ${String(n).padStart(5)}: eigh ${te.toFixed(2)} s, eighLowest (${k} vectors) ${tl.toFixed(2)} s, ×${row.speedup.toFixed(1)}; ` +
          `|Δλ|/λmax ${maxValueError.toExponential(1)}, residual ${maxResidual.toExponential(1)}, orthogonality ${orthogonality.toExponential(1)}`,
      );
    }
  }
  if (values.json) console.log(JSON.stringify({ benchmark: 'linalg', rank, reps, rows }, null, 2));
}
