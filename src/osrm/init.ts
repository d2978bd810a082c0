/**
 * OSRM initialisation (osrm.md §3): for each task t and each feature group, an r × d matrix A_t
 * with orthonormal rows chosen from the other tasks' statistics.
 *
 * - `mean` (the released code): the rows span part of the null space of X, whose rows are the
 *   other tasks' mean features. An orthonormal basis Q of X's row space is built by modified
 *   Gram–Schmidt; r seeded Gaussian vectors are projected off Q and orthonormalised.
 * - `covariance` (the paper; amalgam's default): the r eigenvectors with the smallest eigenvalues
 *   of C_t = Σ_{s≠t} E_s[h hᵀ] (uncentred unless `center`, each task weighted equally). Where
 *   the r-th eigenvalue is degenerate, the vectors inside its eigenspace are a seeded choice.
 *
 * The random orthonormal control draws seeded Gaussian rows and orthonormalises them: from
 * (seed, group), so that every task of a seed starts from the same A as with PEFT's default, or
 * from (seed, task, group) per task. OSRM's seeded choices derive from (seed, task, group). The
 * same seed gives the same A.
 */
import { AmalgamError } from '../errors.js';
import { Rng } from '../tensor/rng.js';
import { eigh, eighLowest } from '../tensor/linalg.js';
import type { LoraInitContext } from '../nn/lora.js';
import { featureMean, featureSecondMoment, type FeatureGroup, type TaskFeatureStats } from './stats.js';

export type OsrmMode = 'mean' | 'covariance';

/**
 * How a LoRA A is initialised: PEFT's default; a random orthonormal control, drawn from the seed
 * like PEFT's default (the same A for every task of a seed) or separately per task; or OSRM.
 */
export type LoraInitKind = 'standard' | 'orthonormal-control' | 'orthonormal-control-per-task' | 'osrm-mean' | 'osrm-covariance';

export const LORA_INIT_KINDS: readonly LoraInitKind[] = ['standard', 'orthonormal-control', 'orthonormal-control-per-task', 'osrm-mean', 'osrm-covariance'];

export interface OsrmOptions {
  mode: OsrmMode;
  /** Rows of A (LoRA rank). */
  rank: number;
  /** Seed of the basis choice inside a degenerate subspace (default 0). */
  seed?: number;
  /** Covariance mode: subtract each task's mean first (default false). */
  center?: boolean;
  /** Mean mode: divide the sums by n (default) or n − 1 (the reference code). */
  divisor?: 'n' | 'n-1';
}

/** A of one feature group for one task. */
export interface GroupInit {
  group: FeatureGroup;
  /** r × d, row-major, orthonormal rows (float64). */
  A: Float64Array;
  /** Covariance mode: the r smallest eigenvalues of C_t, ascending. */
  eigenvalues?: Float64Array;
  /** Covariance mode: the largest eigenvalue of C_t. */
  maxEigenvalue?: number;
  /** Mean mode: ‖A·Xᵀ‖_F / ‖X‖_F. */
  residual?: number;
  /** Dimension of the subspace the r rows were drawn from with a seed (0 when A is unique up to signs). */
  seededDimension: number;
}

export interface TaskInit {
  task: string;
  kind: LoraInitKind;
  rank: number;
  seed: number;
  /** In feature-group order. */
  groups: GroupInit[];
}

function checkRank(rank: number, d: number, where: string): void {
  if (!Number.isSafeInteger(rank) || rank < 1) throw new AmalgamError('E_USAGE', `rank must be a positive integer, got ${rank}`);
  if (rank > d) throw new AmalgamError('E_USAGE', `rank ${rank} exceeds the feature width ${d}`, { key: where });
}

/** A 32-bit seed from a run seed and names (FNV-1a), so that each (task, group) draws its own stream. */
export function derivedSeed(seed: number, ...names: string[]): number {
  let h = 0x811c9dc5;
  const text = `${seed}\u0000${names.join('\u0000')}`;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

function dot(a: Float64Array, ao: number, b: Float64Array, bo: number, d: number): number {
  let s = 0;
  for (let i = 0; i < d; i++) s += a[ao + i]! * b[bo + i]!;
  return s;
}

function norm(a: Float64Array, o: number, d: number): number {
  return Math.sqrt(dot(a, o, a, o, d));
}

/** Removes from row `ro` of `rows` its components along the rows of `basis` (twice, for accuracy). */
function projectOff(rows: Float64Array, ro: number, basis: Float64Array, count: number, d: number): void {
  for (let pass = 0; pass < 2; pass++) {
    for (let k = 0; k < count; k++) {
      const c = dot(rows, ro, basis, k * d, d);
      if (c !== 0) for (let i = 0; i < d; i++) rows[ro + i] -= c * basis[k * d + i]!;
    }
  }
}

/**
 * Orthonormal rows spanning the rows of X (k × d) by modified Gram–Schmidt with
 * re-orthogonalisation; rows whose remainder is below `tol` times their norm are dropped.
 * Returns the basis (rank × d) and its rank.
 */
export function rowSpaceBasis(x: Float64Array, k: number, d: number, tol = 1e-10): { basis: Float64Array; rank: number } {
  const basis = new Float64Array(k * d);
  let rank = 0;
  const row = new Float64Array(d);
  for (let j = 0; j < k; j++) {
    row.set(x.subarray(j * d, (j + 1) * d));
    const n0 = norm(row, 0, d);
    if (n0 === 0) continue;
    projectOff(row, 0, basis, rank, d);
    const n1 = norm(row, 0, d);
    if (n1 <= tol * n0) continue;
    for (let i = 0; i < d; i++) basis[rank * d + i] = row[i]! / n1;
    rank++;
  }
  return { basis: basis.slice(0, rank * d), rank };
}

/**
 * r seeded Gaussian vectors made orthonormal and orthogonal to the rows of `exclude` (count × d),
 * or to nothing. When `within` (m × d, orthonormal rows) is given, the vectors are drawn inside
 * its span instead.
 */
export function seededOrthonormal(r: number, d: number, rng: Rng, exclude?: { basis: Float64Array; count: number }, within?: { basis: Float64Array; count: number }): Float64Array {
  const out = new Float64Array(r * d);
  const free = within ? within.count : d - (exclude?.count ?? 0);
  if (r > free) throw new AmalgamError('E_USAGE', `cannot choose ${r} orthonormal directions in a subspace of dimension ${free}`);
  const g = new Float64Array(d);
  for (let j = 0; j < r; j++) {
    for (let attempt = 0; ; attempt++) {
      if (attempt > 20) throw new AmalgamError('E_USAGE', 'could not draw an independent direction');
      if (within) {
        g.fill(0);
        for (let k = 0; k < within.count; k++) {
          const c = rng.normal();
          for (let i = 0; i < d; i++) g[i] += c * within.basis[k * d + i]!;
        }
      } else {
        for (let i = 0; i < d; i++) g[i] = rng.normal();
      }
      const n0 = norm(g, 0, d);
      if (exclude) projectOff(g, 0, exclude.basis, exclude.count, d);
      projectOff(g, 0, out, j, d);
      if (exclude) projectOff(g, 0, exclude.basis, exclude.count, d);
      const n1 = norm(g, 0, d);
      if (n1 <= 1e-6 * n0) continue;
      for (let i = 0; i < d; i++) out[j * d + i] = g[i]! / n1;
      break;
    }
  }
  return out;
}

/** Mean mode for one group: r orthonormal rows with A·Xᵀ = 0, X the stacked means (k × d). */
export function meanModeBasis(means: readonly Float64Array[], d: number, rank: number, rng: Rng): { A: Float64Array; residual: number; nullity: number } {
  checkRank(rank, d, 'mean mode');
  const k = means.length;
  const x = new Float64Array(k * d);
  means.forEach((m, j) => x.set(m, j * d));
  const { basis, rank: q } = rowSpaceBasis(x, k, d);
  const nullity = d - q;
  if (rank > nullity) {
    throw new AmalgamError('E_USAGE', `the other tasks' means span ${q} of ${d} dimensions, leaving ${nullity} for rank ${rank}`, { hint: 'lower the rank or use covariance mode' });
  }
  const A = seededOrthonormal(rank, d, rng, { basis, count: q });
  let res = 0;
  let xn = 0;
  for (let j = 0; j < k; j++) {
    xn += dot(x, j * d, x, j * d, d);
    for (let i = 0; i < rank; i++) res += dot(A, i * d, x, j * d, d) ** 2;
  }
  return { A, residual: xn > 0 ? Math.sqrt(res / xn) : 0, nullity };
}

/** Flips each row so that its largest-magnitude entry (first on ties) is positive. */
function canonicalSigns(A: Float64Array, r: number, d: number): void {
  for (let j = 0; j < r; j++) {
    let best = 0;
    for (let i = 1; i < d; i++) if (Math.abs(A[j * d + i]!) > Math.abs(A[j * d + best]!) * (1 + 1e-12)) best = i;
    if (A[j * d + best]! < 0) for (let i = 0; i < d; i++) A[j * d + i] = -A[j * d + i]!;
  }
}

/**
 * Feature widths up to this use the full eigendecomposition; wider ones compute only the lowest
 * eigenvectors (`eighLowest`, several times faster at the widths of real models).
 */
export const FULL_EIGH_MAX_DIM = 256;

/**
 * Covariance mode for one group: the r eigenvectors of the symmetric C (d × d) with the smallest
 * eigenvalues, as rows. Eigenvalues within `tol`·λ_max of the r-th one form its eigenspace; when
 * that eigenspace reaches past r, the rows taken from it are a seeded orthonormal choice.
 */
export function covarianceModeBasis(C: Float64Array, d: number, rank: number, rng: Rng, tol = 1e-10): { A: Float64Array; eigenvalues: Float64Array; maxEigenvalue: number; seededDimension: number } {
  checkRank(rank, d, 'covariance mode');
  // The eigenvalues that tie with the r-th (within tol·λmax) form its cluster [lo, hi].
  let lo = rank - 1;
  let hi = rank - 1;
  const cluster = (values: Float64Array): number => {
    const eps = tol * Math.max(Math.abs(values[0]!), Math.abs(values[d - 1]!));
    const lr = values[rank - 1]!;
    while (lo > 0 && Math.abs(values[lo - 1]! - lr) <= eps) lo--;
    while (hi + 1 < d && Math.abs(values[hi + 1]! - lr) <= eps) hi++;
    return hi + 1;
  };
  let values: Float64Array;
  let column: (j: number, out: Float64Array, o: number) => void;
  if (d <= FULL_EIGH_MAX_DIM) {
    const r = eigh(C, d);
    values = r.values;
    cluster(values);
    column = (j, out, o) => {
      for (let i = 0; i < d; i++) out[o + i] = r.vectors[i * d + j]!;
    };
  } else {
    // A cluster reaching far past r (fewer feature rows than d leave a large null space) would
    // cost inverse iteration O(count²·d); the full decomposition is cheaper then.
    let needed = 0;
    const r = eighLowest(C, d, (v) => {
      needed = cluster(v);
      return needed <= Math.max(rank, d / 8) ? needed : 0;
    });
    if (r.count >= needed) {
      values = r.values;
      column = (j, out, o) => out.set(r.vectors.subarray(j * d, (j + 1) * d), o);
    } else {
      const f = eigh(C, d);
      values = f.values;
      lo = rank - 1;
      hi = rank - 1;
      cluster(values);
      column = (j, out, o) => {
        for (let i = 0; i < d; i++) out[o + i] = f.vectors[i * d + j]!;
      };
    }
  }
  const A = new Float64Array(rank * d);
  const unique = hi === rank - 1 ? rank : lo;
  for (let j = 0; j < unique; j++) column(j, A, j * d);
  canonicalSigns(A, unique, d);
  let seededDimension = 0;
  if (unique < rank) {
    const m = hi - lo + 1;
    const space = new Float64Array(m * d);
    for (let j = 0; j < m; j++) column(lo + j, space, j * d);
    const pick = seededOrthonormal(rank - lo, d, rng, undefined, { basis: space, count: m });
    A.set(pick, lo * d);
    seededDimension = m;
  }
  return { A, eigenvalues: values.slice(0, rank), maxEigenvalue: values[d - 1]!, seededDimension };
}

/** r × d with orthonormal rows, drawn from the seed (the random orthonormal control). */
export function randomOrthonormalBasis(d: number, rank: number, rng: Rng): Float64Array {
  checkRank(rank, d, 'orthonormal control');
  return seededOrthonormal(rank, d, rng);
}

/** Σ_{s≠t} of each other task's second moment for one group (each task weighted equally). */
export function othersSecondMoment(stats: readonly TaskFeatureStats[], t: number, gi: number, center = false): Float64Array {
  const d = stats[t]!.groups[gi]!.group.dim;
  const C = new Float64Array(d * d);
  stats.forEach((s, j) => {
    if (j === t) return;
    const M = featureSecondMoment(s.groups[gi]!, center);
    for (let i = 0; i < C.length; i++) C[i] += M[i]!;
  });
  return C;
}

/** Two tasks at least, collected over the same feature groups. */
export function checkAligned(stats: readonly TaskFeatureStats[]): void {
  if (stats.length < 2) throw new AmalgamError('E_USAGE', `OSRM needs at least 2 tasks, got ${stats.length}`);
  const ref = stats[0]!.groups.map((g) => g.group.name).join(',');
  for (const s of stats) {
    if (s.groups.map((g) => g.group.name).join(',') !== ref) {
      throw new AmalgamError('E_USAGE', `task ${s.task} was collected over other feature groups than task ${stats[0]!.task}`);
    }
  }
}

/** OSRM A for every task (in order) and feature group from the tasks' statistics. */
export function osrmInit(stats: readonly TaskFeatureStats[], opts: OsrmOptions): TaskInit[] {
  checkAligned(stats);
  const seed = opts.seed ?? 0;
  const kind: LoraInitKind = opts.mode === 'mean' ? 'osrm-mean' : 'osrm-covariance';
  return stats.map((st, t) => ({
    task: st.task,
    kind,
    rank: opts.rank,
    seed,
    groups: st.groups.map((gs, gi) => {
      const group = gs.group;
      const rng = new Rng(derivedSeed(seed, st.task, group.name));
      if (opts.mode === 'mean') {
        const means = stats.filter((_, j) => j !== t).map((s) => featureMean(s.groups[gi]!, opts.divisor ?? 'n'));
        const r = meanModeBasis(means, group.dim, opts.rank, rng);
        return { group, A: r.A, residual: r.residual, seededDimension: r.nullity };
      }
      const C = othersSecondMoment(stats, t, gi, opts.center ?? false);
      const r = covarianceModeBasis(C, group.dim, opts.rank, rng);
      return { group, A: r.A, eigenvalues: r.eigenvalues, maxEigenvalue: r.maxEigenvalue, seededDimension: r.seededDimension };
    }),
  }));
}

/**
 * Random orthonormal A per task and group. By default one draw per group serves every task (as
 * PEFT's default initialisation from one seed does); `perTask` draws separately for each task.
 */
export function orthonormalControlInit(tasks: readonly string[], groups: readonly FeatureGroup[], rank: number, seed = 0, perTask = false): TaskInit[] {
  const kind: LoraInitKind = perTask ? 'orthonormal-control-per-task' : 'orthonormal-control';
  return tasks.map((task) => ({
    task,
    kind,
    rank,
    seed,
    groups: groups.map((group) => {
      const stream = perTask ? derivedSeed(seed, 'control', task, group.name) : derivedSeed(seed, 'control', group.name);
      return { group, A: randomOrthonormalBasis(group.dim, rank, new Rng(stream)), seededDimension: group.dim };
    }),
  }));
}

/** The A of each targeted module (modules sharing an input share it), as float32. */
export function moduleMatrices(init: TaskInit): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const g of init.groups) {
    const a = Float32Array.from(g.A);
    for (const m of g.group.modules) out.set(m, a);
  }
  return out;
}

/**
 * An `attachLora` init hook that writes the task's A (B = 0) into every module it covers.
 * A module it does not cover is an error.
 */
export function loraInitHook(init: TaskInit): (ctx: LoraInitContext) => void {
  const mats = moduleMatrices(init);
  return (ctx) => {
    const a = mats.get(ctx.name);
    if (!a) throw new AmalgamError('E_USAGE', `the ${init.kind} initialisation of task ${init.task} has no A for this module`, { key: ctx.name });
    if (ctx.rank !== init.rank || a.length !== ctx.A.length) {
      throw new AmalgamError('E_SHAPE', `initial A is ${init.rank}×${a.length / init.rank}, the module needs ${ctx.rank}×${ctx.inFeatures}`, { key: ctx.name });
    }
    ctx.A.set(a);
    ctx.B.fill(0);
  };
}

/** ‖A·Aᵀ − I‖_max of an r × d matrix. */
export function orthonormalityError(A: ArrayLike<number>, r: number, d: number): number {
  let worst = 0;
  for (let i = 0; i < r; i++) {
    for (let j = 0; j < r; j++) {
      let s = 0;
      for (let k = 0; k < d; k++) s += A[i * d + k]! * A[j * d + k]!;
      worst = Math.max(worst, Math.abs(s - (i === j ? 1 : 0)));
    }
  }
  return worst;
}

/** Rayleigh quotients a_iᵀ C a_i of the rows of A. */
export function rayleighQuotients(A: ArrayLike<number>, C: Float64Array, r: number, d: number): Float64Array {
  const out = new Float64Array(r);
  for (let i = 0; i < r; i++) {
    let s = 0;
    for (let p = 0; p < d; p++) {
      const ap = A[i * d + p]!;
      if (ap === 0) continue;
      let row = 0;
      for (let q = 0; q < d; q++) row += C[p * d + q]! * A[i * d + q]!;
      s += ap * row;
    }
    out[i] = s;
  }
  return out;
}
