/**
 * CMA-ES: the (μ/μ_w, λ) covariance matrix adaptation evolution strategy with cumulative
 * step-size adaptation, rank-one and rank-μ covariance updates (Hansen, "The CMA Evolution
 * Strategy: A Tutorial", arXiv 1604.00772, default parameters of its Table 1 with positive
 * recombination weights only). Minimises. Every draw comes from a seeded `Rng`.
 *
 * Box constraints: a candidate outside [lower, upper] is drawn again ('resample', up to
 * `maxResample` times, then clipped) or clipped at once ('clip'). The update uses the step
 * (x − m)/σ of the candidate as evaluated, so clipped candidates are told as they were scored.
 */
import { AmalgamError } from '../errors.js';
import { Rng } from '../tensor/rng.js';

export interface CmaEsOptions {
  /** Initial step size σ₀ (default 0.3). */
  sigma0?: number;
  /** Offspring per generation λ (default 4 + ⌊3 ln n⌋). */
  popsize?: number;
  /** Parents μ (default ⌊λ/2⌋). */
  mu?: number;
  seed?: number;
  /** Lower bound, one value or one per coordinate (default −∞). */
  lower?: number | ArrayLike<number>;
  /** Upper bound, one value or one per coordinate (default +∞). */
  upper?: number | ArrayLike<number>;
  /** What to do with a candidate outside the box (default 'resample'). */
  boundary?: 'clip' | 'resample';
  /** Draws per candidate before 'resample' clips (default 100). */
  maxResample?: number;
}

export interface CmaEsState {
  generation: number;
  sigma: number;
  mean: number[];
  /** Smallest and largest standard deviation along the principal axes (σ·√eigenvalue). */
  axisStd: [number, number];
  /** Condition number of C. */
  condition: number;
}

function bounds(v: number | ArrayLike<number> | undefined, n: number, fill: number, what: string): Float64Array {
  const out = new Float64Array(n).fill(fill);
  if (v === undefined) return out;
  if (typeof v === 'number') return out.fill(v);
  if (v.length !== n) throw new AmalgamError('E_USAGE', `CMA-ES ${what} bound has ${v.length} values for ${n} dimensions`);
  for (let i = 0; i < n; i++) out[i] = v[i]!;
  return out;
}

/** Eigen-decomposition of a symmetric n×n matrix (row-major) by cyclic Jacobi rotations. */
export function symmetricEigen(a: Float64Array, n: number): { values: Float64Array; vectors: Float64Array } {
  const A = Float64Array.from(a);
  const V = new Float64Array(n * n);
  for (let i = 0; i < n; i++) V[i * n + i] = 1;
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    let diag = 0;
    for (let i = 0; i < n; i++) {
      diag += A[i * n + i]! * A[i * n + i]!;
      for (let j = i + 1; j < n; j++) off += A[i * n + j]! * A[i * n + j]!;
    }
    if (off <= 1e-30 * diag || off === 0) break;
    for (let p = 0; p < n; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = A[p * n + q]!;
        if (apq === 0) continue;
        const app = A[p * n + p]!;
        const aqq = A[q * n + q]!;
        const theta = (aqq - app) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        for (let k = 0; k < n; k++) {
          const akp = A[k * n + p]!;
          const akq = A[k * n + q]!;
          A[k * n + p] = c * akp - s * akq;
          A[k * n + q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {
          const apk = A[p * n + k]!;
          const aqk = A[q * n + k]!;
          A[p * n + k] = c * apk - s * aqk;
          A[q * n + k] = s * apk + c * aqk;
        }
        for (let k = 0; k < n; k++) {
          const vkp = V[k * n + p]!;
          const vkq = V[k * n + q]!;
          V[k * n + p] = c * vkp - s * vkq;
          V[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  const values = new Float64Array(n);
  for (let i = 0; i < n; i++) values[i] = A[i * n + i]!;
  return { values, vectors: V };
}

export class CmaEs {
  readonly dim: number;
  readonly lambda: number;
  readonly mu: number;
  readonly weights: Float64Array;
  readonly muEff: number;
  readonly cSigma: number;
  readonly dSigma: number;
  readonly cc: number;
  readonly c1: number;
  readonly cMu: number;
  /** E‖N(0, I)‖. */
  readonly chiN: number;
  readonly lower: Float64Array;
  readonly upper: Float64Array;
  readonly boundary: 'clip' | 'resample';
  readonly maxResample: number;

  mean: Float64Array;
  sigma: number;
  generation = 0;
  /** Candidates drawn that fell outside the box (resampled or clipped). */
  outOfBounds = 0;
  private readonly C: Float64Array;
  private B: Float64Array;
  private D: Float64Array;
  private readonly pc: Float64Array;
  private readonly ps: Float64Array;
  private readonly rng: Rng;
  private eigenGeneration = 0;
  private readonly eigenEvery: number;
  private pending: Float64Array[] | null = null;

  constructor(x0: ArrayLike<number>, opts: CmaEsOptions = {}) {
    const n = x0.length;
    if (n < 1) throw new AmalgamError('E_USAGE', 'CMA-ES needs at least one dimension');
    for (let i = 0; i < n; i++) if (!Number.isFinite(x0[i]!)) throw new AmalgamError('E_USAGE', `CMA-ES start point has a non-finite value at ${i}`);
    const sigma0 = opts.sigma0 ?? 0.3;
    if (!(sigma0 > 0) || !Number.isFinite(sigma0)) throw new AmalgamError('E_USAGE', `CMA-ES sigma0 must be positive, got ${sigma0}`);
    this.dim = n;
    this.lambda = opts.popsize ?? 4 + Math.floor(3 * Math.log(n));
    if (!Number.isSafeInteger(this.lambda) || this.lambda < 2) throw new AmalgamError('E_USAGE', `CMA-ES population size must be an integer ≥ 2, got ${this.lambda}`);
    this.mu = opts.mu ?? Math.floor(this.lambda / 2);
    if (!Number.isSafeInteger(this.mu) || this.mu < 1 || this.mu > this.lambda) throw new AmalgamError('E_USAGE', `CMA-ES μ must be an integer in 1…λ, got ${this.mu}`);
    const w = new Float64Array(this.mu);
    for (let i = 0; i < this.mu; i++) w[i] = Math.log((this.lambda + 1) / 2) - Math.log(i + 1);
    if (w[this.mu - 1]! <= 0) for (let i = 0; i < this.mu; i++) w[i] = this.mu - i;
    let sw = 0;
    for (const v of w) sw += v;
    let sw2 = 0;
    for (let i = 0; i < this.mu; i++) {
      w[i] = w[i]! / sw;
      sw2 += w[i]! * w[i]!;
    }
    this.weights = w;
    this.muEff = 1 / sw2;
    const me = this.muEff;
    this.cSigma = (me + 2) / (n + me + 5);
    this.dSigma = 1 + 2 * Math.max(0, Math.sqrt((me - 1) / (n + 1)) - 1) + this.cSigma;
    this.cc = (4 + me / n) / (n + 4 + (2 * me) / n);
    this.c1 = 2 / ((n + 1.3) ** 2 + me);
    this.cMu = Math.min(1 - this.c1, (2 * (me - 2 + 1 / me)) / ((n + 2) ** 2 + me));
    this.chiN = Math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n));
    this.eigenEvery = Math.max(1, Math.floor(1 / ((this.c1 + this.cMu) * n * 10)));
    this.lower = bounds(opts.lower, n, -Infinity, 'lower');
    this.upper = bounds(opts.upper, n, Infinity, 'upper');
    for (let i = 0; i < n; i++) {
      if (!(this.lower[i]! < this.upper[i]!)) throw new AmalgamError('E_USAGE', `CMA-ES bounds are empty at coordinate ${i}: [${this.lower[i]}, ${this.upper[i]}]`);
    }
    this.boundary = opts.boundary ?? 'resample';
    if (this.boundary !== 'clip' && this.boundary !== 'resample') throw new AmalgamError('E_USAGE', `unknown CMA-ES boundary handling '${String(this.boundary)}'`, { hint: "use 'clip' or 'resample'" });
    this.maxResample = opts.maxResample ?? 100;
    this.mean = Float64Array.from(x0);
    for (let i = 0; i < n; i++) this.mean[i] = Math.min(this.upper[i]!, Math.max(this.lower[i]!, this.mean[i]!));
    this.sigma = sigma0;
    this.C = new Float64Array(n * n);
    this.B = new Float64Array(n * n);
    this.D = new Float64Array(n).fill(1);
    for (let i = 0; i < n; i++) {
      this.C[i * n + i] = 1;
      this.B[i * n + i] = 1;
    }
    this.pc = new Float64Array(n);
    this.ps = new Float64Array(n);
    this.rng = new Rng(opts.seed ?? 0);
  }

  private inside(x: Float64Array): boolean {
    for (let i = 0; i < this.dim; i++) if (x[i]! < this.lower[i]! || x[i]! > this.upper[i]!) return false;
    return true;
  }

  private draw(): Float64Array {
    const n = this.dim;
    const z = new Float64Array(n);
    for (let i = 0; i < n; i++) z[i] = this.D[i]! * this.rng.normal();
    const x = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let j = 0; j < n; j++) s += this.B[i * n + j]! * z[j]!;
      x[i] = this.mean[i]! + this.sigma * s;
    }
    return x;
  }

  /** λ new candidates inside the box. Call `tell` with their fitness before asking again. */
  ask(): Float64Array[] {
    const out: Float64Array[] = [];
    for (let k = 0; k < this.lambda; k++) {
      let x = this.draw();
      if (!this.inside(x)) {
        this.outOfBounds++;
        if (this.boundary === 'resample') {
          for (let t = 1; t < this.maxResample && !this.inside(x); t++) x = this.draw();
        }
        for (let i = 0; i < this.dim; i++) x[i] = Math.min(this.upper[i]!, Math.max(this.lower[i]!, x[i]!));
      }
      out.push(x);
    }
    this.pending = out;
    return out.map((x) => Float64Array.from(x));
  }

  /** Updates the distribution from the fitness (lower is better) of the last `ask`'s candidates, in order. */
  tell(fitness: readonly number[]): void {
    const xs = this.pending;
    if (!xs) throw new AmalgamError('E_USAGE', 'CMA-ES tell() needs a preceding ask()');
    if (fitness.length !== xs.length) throw new AmalgamError('E_USAGE', `CMA-ES tell() got ${fitness.length} fitness values for ${xs.length} candidates`);
    this.pending = null;
    const n = this.dim;
    const order = xs.map((_, i) => i).sort((a, b) => {
      const fa = Number.isNaN(fitness[a]!) ? Infinity : fitness[a]!;
      const fb = Number.isNaN(fitness[b]!) ? Infinity : fitness[b]!;
      return fa - fb || a - b;
    });
    const old = this.mean;
    const ys = order.slice(0, this.mu).map((k) => {
      const y = new Float64Array(n);
      for (let i = 0; i < n; i++) y[i] = (xs[k]![i]! - old[i]!) / this.sigma;
      return y;
    });
    const yw = new Float64Array(n);
    for (let r = 0; r < this.mu; r++) for (let i = 0; i < n; i++) yw[i] += this.weights[r]! * ys[r]![i]!;
    const mean = new Float64Array(n);
    for (let i = 0; i < n; i++) mean[i] = old[i]! + this.sigma * yw[i]!;
    this.mean = mean;

    // C^{-1/2} y_w = B D^{-1} Bᵀ y_w
    const bty = new Float64Array(n);
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let i = 0; i < n; i++) s += this.B[i * n + j]! * yw[i]!;
      bty[j] = s / this.D[j]!;
    }
    const cs = Math.sqrt(this.cSigma * (2 - this.cSigma) * this.muEff);
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let j = 0; j < n; j++) s += this.B[i * n + j]! * bty[j]!;
      this.ps[i] = (1 - this.cSigma) * this.ps[i]! + cs * s;
    }
    let psNorm = 0;
    for (const v of this.ps) psNorm += v * v;
    psNorm = Math.sqrt(psNorm);
    const g = this.generation + 1;
    const hSigma = psNorm / Math.sqrt(1 - (1 - this.cSigma) ** (2 * g)) < (1.4 + 2 / (n + 1)) * this.chiN ? 1 : 0;
    const ccs = Math.sqrt(this.cc * (2 - this.cc) * this.muEff);
    for (let i = 0; i < n; i++) this.pc[i] = (1 - this.cc) * this.pc[i]! + hSigma * ccs * yw[i]!;

    const keep = 1 - this.c1 - this.cMu + (1 - hSigma) * this.c1 * this.cc * (2 - this.cc);
    for (let i = 0; i < n; i++) {
      for (let j = 0; j <= i; j++) {
        let rankMu = 0;
        for (let r = 0; r < this.mu; r++) rankMu += this.weights[r]! * ys[r]![i]! * ys[r]![j]!;
        const v = keep * this.C[i * n + j]! + this.c1 * this.pc[i]! * this.pc[j]! + this.cMu * rankMu;
        this.C[i * n + j] = v;
        this.C[j * n + i] = v;
      }
    }
    this.sigma *= Math.exp((this.cSigma / this.dSigma) * (psNorm / this.chiN - 1));
    this.generation = g;
    if (g - this.eigenGeneration >= this.eigenEvery) this.updateEigen();
  }

  private updateEigen(): void {
    const n = this.dim;
    const { values, vectors } = symmetricEigen(this.C, n);
    let max = 0;
    for (const v of values) max = Math.max(max, v);
    for (let i = 0; i < n; i++) this.D[i] = Math.sqrt(Math.max(values[i]!, max * 1e-20, 1e-300));
    this.B = vectors;
    this.eigenGeneration = this.generation;
  }

  /** A summary of the current distribution. */
  state(): CmaEsState {
    let lo = Infinity;
    let hi = 0;
    for (const d of this.D) {
      lo = Math.min(lo, d);
      hi = Math.max(hi, d);
    }
    return { generation: this.generation, sigma: this.sigma, mean: Array.from(this.mean), axisStd: [this.sigma * lo, this.sigma * hi], condition: (hi / lo) ** 2 };
  }

  /** Why the search cannot make progress any more, or null: σ too small, or C ill-conditioned. */
  stopReason(tolX = 1e-12): string | null {
    const s = this.state();
    if (!Number.isFinite(this.sigma)) return 'step size is not finite';
    if (s.axisStd[1] < tolX) return `step size below ${tolX}`;
    if (s.condition > 1e14) return 'covariance matrix is ill-conditioned';
    return null;
  }
}

export interface MinimizeOptions extends CmaEsOptions {
  /** Budget in fitness evaluations (required). A last generation that does not fit is evaluated in part and not told. */
  maxEvals: number;
  /** Stop when the best fitness is at most this. */
  target?: number;
  /** After every evaluation. */
  onEval?: (e: { evaluation: number; fitness: number; best: number; generation: number; x: Float64Array }) => void | Promise<void>;
}

export interface MinimizeResult {
  x: Float64Array;
  fitness: number;
  evaluations: number;
  generations: number;
  /** Why it stopped: 'budget', 'target', or the CmaEs stop reason. */
  stop: string;
  /** Best fitness after each evaluation. */
  bestHistory: number[];
  es: CmaEs;
}

/** Minimises f from x0 with CMA-ES within a budget of evaluations; f may be async. */
export async function cmaesMinimize(f: (x: Float64Array) => number | Promise<number>, x0: ArrayLike<number>, opts: MinimizeOptions): Promise<MinimizeResult> {
  if (!Number.isSafeInteger(opts.maxEvals) || opts.maxEvals < 1) throw new AmalgamError('E_USAGE', `the evaluation budget must be a positive integer, got ${opts.maxEvals}`);
  const es = new CmaEs(x0, opts);
  let best = Infinity;
  let bestX = Float64Array.from(es.mean);
  let evals = 0;
  const bestHistory: number[] = [];
  let stop = 'budget';
  outer: while (evals < opts.maxEvals) {
    const reason = es.stopReason();
    if (reason) {
      stop = reason;
      break;
    }
    const xs = es.ask();
    const fs: number[] = [];
    for (const x of xs) {
      if (evals >= opts.maxEvals) break outer;
      const v = await f(x);
      evals++;
      fs.push(v);
      if (v < best) {
        best = v;
        bestX = Float64Array.from(x);
      }
      bestHistory.push(best);
      await opts.onEval?.({ evaluation: evals, fitness: v, best, generation: es.generation, x });
      if (opts.target !== undefined && best <= opts.target) {
        stop = 'target';
        break outer;
      }
    }
    es.tell(fs);
  }
  return { x: bestX, fitness: best, evaluations: evals, generations: es.generation, stop, bestHistory, es };
}
