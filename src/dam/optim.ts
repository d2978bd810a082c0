/**
 * Optimisers of the DAM coefficients (dam.md §3): Adam (AdamW with weight decay 0, from
 * ../train/optimizer.ts), AdamW, and MoFO-AdamW, the reference's default.
 *
 * MoFO-AdamW (momentum-filtered AdamW, arXiv 2407.20999, as the reference's `dam/optimizer.py`
 * computes it): each step decays every entry (p ← p·(1 − lr·λ)), updates the moments of every
 * entry as AdamW does, and then applies the Adam update only to the entries of each tensor whose
 * |m| is at least the k-th largest |m| of that tensor, k = ⌊α·size⌋ (at least 1). Defaults:
 * α = 0.3, β = (0.9, 0.999), ε = 1e-8, λ = 1e-2. Moments are float32, as PyTorch keeps them.
 */
import { AmalgamError } from '../errors.js';
import { AdamW, zeroGrads, type AdamWOptions, type OptimParam } from '../train/optimizer.js';

export interface MoFOAdamWOptions extends AdamWOptions {
  /** Fraction of each tensor's entries updated per step (default 0.3). */
  alpha?: number;
}

export class MoFOAdamW {
  readonly params: readonly OptimParam[];
  lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly alpha: number;
  stepCount = 0;
  private readonly m: Float32Array[];
  private readonly v: Float32Array[];
  /** Entries updated by the last step, per parameter. */
  readonly lastUpdated: number[];

  constructor(params: readonly OptimParam[], opts: MoFOAdamWOptions = {}) {
    this.params = params.slice();
    this.lr = opts.lr ?? 1e-3;
    [this.beta1, this.beta2] = opts.betas ?? [0.9, 0.999];
    this.eps = opts.eps ?? 1e-8;
    this.weightDecay = opts.weightDecay ?? 1e-2;
    this.alpha = opts.alpha ?? 0.3;
    check('lr', this.lr, 0, Infinity);
    check('beta1', this.beta1, 0, 1, true);
    check('beta2', this.beta2, 0, 1, true);
    check('eps', this.eps, 0, Infinity);
    check('weightDecay', this.weightDecay, 0, Infinity);
    check('alpha', this.alpha, 0, 1);
    this.m = this.params.map((p, i) => {
      if (p.data.length !== p.grad.length) {
        throw new AmalgamError('E_SHAPE', `parameter has ${p.data.length} values but its gradient has ${p.grad.length}`, { key: p.name ?? `#${i}` });
      }
      return new Float32Array(p.data.length);
    });
    this.v = this.params.map((p) => new Float32Array(p.data.length));
    this.lastUpdated = this.params.map(() => 0);
  }

  step(lr: number = this.lr): void {
    this.stepCount++;
    const t = this.stepCount;
    const b1 = this.beta1;
    const b2 = this.beta2;
    const bc2Sqrt = Math.sqrt(1 - Math.pow(b2, t));
    const stepSize = lr / (1 - Math.pow(b1, t));
    for (let k = 0; k < this.params.length; k++) {
      const p = this.params[k]!;
      const m = this.m[k]!;
      const v = this.v[k]!;
      const data = p.data;
      const grad = p.grad;
      const n = data.length;
      if (n === 0) continue;
      const decay = p.decay === false ? 1 : 1 - lr * this.weightDecay;
      for (let i = 0; i < n; i++) {
        const g = grad[i]!;
        m[i] = Math.fround(b1 * m[i]! + (1 - b1) * g);
        v[i] = Math.fround(b2 * v[i]! + (1 - b2) * g * g);
      }
      const keep = Math.max(1, Math.floor(n * this.alpha));
      const mag = Float32Array.from(m, (x) => Math.abs(x)).sort();
      const threshold = mag[n - keep]!;
      let updated = 0;
      for (let i = 0; i < n; i++) {
        if (Math.abs(m[i]!) >= threshold) {
          data[i] = data[i]! * decay - (stepSize * m[i]!) / (Math.sqrt(v[i]!) / bc2Sqrt + this.eps);
          updated++;
        } else {
          data[i] = data[i]! * decay;
        }
      }
      this.lastUpdated[k] = updated;
    }
  }

  zeroGrad(): void {
    zeroGrads(this.params);
  }

  moments(index: number): { m: Float32Array; v: Float32Array } {
    const m = this.m[index];
    if (!m) throw new AmalgamError('E_USAGE', `no parameter #${index}`);
    return { m, v: this.v[index]! };
  }
}

function check(name: string, v: number, lo: number, hi: number, openHi = false): void {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < lo || (openHi ? v >= hi : v > hi)) {
    throw new AmalgamError('E_USAGE', `MoFO-AdamW ${name} must be in [${lo}, ${hi}${openHi ? ')' : ']'}, got ${v}`);
  }
}

export type DamOptimizerKind = 'mofo' | 'adam' | 'adamw';

export interface DamOptimizerOptions {
  /** Default 'mofo' (the reference's). */
  kind?: DamOptimizerKind;
  lr?: number;
  betas?: [number, number];
  eps?: number;
  /** Default 1e-2 for MoFO-AdamW and AdamW; Adam has none. */
  weightDecay?: number;
  /** MoFO fraction (default 0.3). */
  alpha?: number;
}

/** The step interface trainDam drives. */
export interface DamOptimizer {
  readonly kind: DamOptimizerKind;
  step(lr?: number): void;
  zeroGrad(): void;
  readonly stepCount: number;
}

/** An optimiser over the coefficient parameters. */
export function createDamOptimizer(params: readonly OptimParam[], o: DamOptimizerOptions = {}): DamOptimizer {
  const kind = o.kind ?? 'mofo';
  const base = { lr: o.lr ?? 1e-3, betas: o.betas ?? ([0.9, 0.999] as [number, number]), eps: o.eps ?? 1e-8 };
  if (kind === 'mofo') {
    const opt = new MoFOAdamW(params, { ...base, weightDecay: o.weightDecay ?? 1e-2, alpha: o.alpha ?? 0.3 });
    return wrap(kind, opt);
  }
  if (kind === 'adam' || kind === 'adamw') {
    if (kind === 'adam' && o.weightDecay !== undefined && o.weightDecay !== 0) {
      throw new AmalgamError('E_USAGE', `Adam has no weight decay (got ${o.weightDecay})`, { hint: "use the optimizer 'adamw' for decoupled weight decay" });
    }
    const opt = new AdamW(params, { ...base, weightDecay: kind === 'adam' ? 0 : (o.weightDecay ?? 1e-2) });
    return wrap(kind, opt);
  }
  throw new AmalgamError('E_USAGE', `unknown DAM optimizer '${String(kind)}'`, { hint: 'use mofo, adam or adamw' });
}

function wrap(kind: DamOptimizerKind, opt: AdamW | MoFOAdamW): DamOptimizer {
  return {
    kind,
    step: (lr?: number) => opt.step(lr),
    zeroGrad: () => opt.zeroGrad(),
    get stepCount() {
      return opt.stepCount;
    },
  };
}
