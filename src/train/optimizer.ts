/**
 * Optimisation: AdamW with decoupled weight decay (PyTorch `torch.optim.AdamW` semantics),
 * global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`), and the gradient helpers
 * gradient accumulation needs.
 *
 * Parameters are plain `{ data, grad }` pairs of equal-length Float32Arrays, so the optimizer
 * works for any model whose trainable tensors are exposed that way.
 */
import { AmalgamError } from '../errors.js';

/** A trainable tensor: its values and the gradient accumulated for them. */
export interface OptimParam {
  /** Name, for error messages and state lookup. */
  name?: string;
  data: Float32Array;
  grad: Float32Array;
  /** Whether weight decay applies (default true). Norm weights and biases are usually excluded. */
  decay?: boolean;
}

export interface AdamWOptions {
  /** Learning rate (default 1e-3); a schedule may override it per step. */
  lr?: number;
  /** (β1, β2), default (0.9, 0.999). */
  betas?: [number, number];
  /** Added to √v̂ (default 1e-8). */
  eps?: number;
  /** Decoupled weight decay λ: p ← p − lr·λ·p before the Adam update (default 0.01, as PyTorch). */
  weightDecay?: number;
}

/** Moment buffers of one parameter. */
interface AdamState {
  m: Float32Array;
  v: Float32Array;
}

/**
 * AdamW, step for step as PyTorch computes it (non-amsgrad, non-fused):
 *
 *   p ← p · (1 − lr·λ)
 *   m ← β1·m + (1 − β1)·g
 *   v ← β2·v + (1 − β2)·g²
 *   p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
 *
 * with t the 1-based step count. Moments are kept in float32 like PyTorch's.
 */
export class AdamW {
  readonly params: readonly OptimParam[];
  lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  /** Number of `step()` calls so far. */
  stepCount = 0;
  private readonly state: AdamState[];

  constructor(params: readonly OptimParam[], opts: AdamWOptions = {}) {
    this.params = params.slice();
    this.lr = opts.lr ?? 1e-3;
    [this.beta1, this.beta2] = opts.betas ?? [0.9, 0.999];
    this.eps = opts.eps ?? 1e-8;
    this.weightDecay = opts.weightDecay ?? 0.01;
    checkHyper('lr', this.lr, 0, Infinity);
    checkHyper('beta1', this.beta1, 0, 1, true);
    checkHyper('beta2', this.beta2, 0, 1, true);
    checkHyper('eps', this.eps, 0, Infinity);
    checkHyper('weightDecay', this.weightDecay, 0, Infinity);
    this.state = this.params.map((p, i) => {
      if (p.data.length !== p.grad.length) {
        throw new AmalgamError('E_SHAPE', `parameter has ${p.data.length} values but its gradient has ${p.grad.length}`, {
          key: p.name ?? `#${i}`,
        });
      }
      return { m: new Float32Array(p.data.length), v: new Float32Array(p.data.length) };
    });
  }

  /** Apply one update from the current gradients; `lr` overrides the stored rate for this step. */
  step(lr: number = this.lr): void {
    this.stepCount++;
    const t = this.stepCount;
    const b1 = this.beta1;
    const b2 = this.beta2;
    const bc1 = 1 - Math.pow(b1, t);
    const invBc2Sqrt = 1 / Math.sqrt(1 - Math.pow(b2, t));
    const stepSize = lr / bc1;
    const eps = this.eps;
    const c1 = 1 - b1;
    const c2 = 1 - b2;
    for (let k = 0; k < this.params.length; k++) {
      const p = this.params[k]!;
      const { m, v } = this.state[k]!;
      adamwUpdate(p.data, p.grad, m, v, p.decay === false ? 1 : 1 - lr * this.weightDecay, b1, c1, b2, c2, stepSize, invBc2Sqrt, eps);
    }
  }

  /** Set every gradient to zero. */
  zeroGrad(): void {
    zeroGrads(this.params);
  }

  /** The first and second moments of a parameter (for tests and inspection). */
  moments(index: number): { m: Float32Array; v: Float32Array } {
    const s = this.state[index];
    if (!s) throw new AmalgamError('E_USAGE', `no parameter #${index}`);
    return s;
  }
}

/** One AdamW update of a tensor (one division per element: √v̂ is √v times 1/√(1 − β2ᵗ)). */
function adamwUpdate(
  data: Float32Array,
  grad: Float32Array,
  m: Float32Array,
  v: Float32Array,
  decay: number,
  b1: number,
  c1: number,
  b2: number,
  c2: number,
  stepSize: number,
  invBc2Sqrt: number,
  eps: number,
): void {
  const n = data.length;
  for (let i = 0; i < n; i++) {
    const g = grad[i]!;
    const mi = Math.fround(b1 * m[i]! + c1 * g);
    const vi = Math.fround(b2 * v[i]! + c2 * g * g);
    m[i] = mi;
    v[i] = vi;
    data[i] = data[i]! * decay - (stepSize * mi) / (Math.sqrt(vi) * invBc2Sqrt + eps);
  }
}

function checkHyper(name: string, v: number, lo: number, hi: number, openHi = false): void {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < lo || (openHi ? v >= hi : v > hi)) {
    throw new AmalgamError('E_USAGE', `AdamW ${name} must be in [${lo}, ${hi}${openHi ? ')' : ']'}, got ${v}`);
  }
}

/** Set the gradients of all parameters to zero. */
export function zeroGrads(params: readonly OptimParam[]): void {
  for (const p of params) p.grad.fill(0);
}

/** Multiply every gradient by `s` (e.g. 1 / micro-batches, or 1 / tokens, after accumulation). */
export function scaleGrads(params: readonly OptimParam[], s: number): void {
  if (s === 1) return;
  for (const p of params) {
    const g = p.grad;
    for (let i = 0; i < g.length; i++) g[i] = g[i]! * s;
  }
}

/** L2 norm of all gradients together (accumulated in float64). */
export function gradNorm(params: readonly OptimParam[]): number {
  let sum = 0;
  for (const p of params) {
    const g = p.grad;
    for (let i = 0; i < g.length; i++) sum += g[i]! * g[i]!;
  }
  return Math.sqrt(sum);
}

/**
 * Clip gradients to a global L2 norm of at most `maxNorm`, as `torch.nn.utils.clip_grad_norm_`:
 * when the total norm exceeds it, every gradient is multiplied by maxNorm / (norm + 1e-6).
 * Returns the total norm before clipping. A non-finite norm leaves the gradients untouched.
 */
export function clipGradNorm(params: readonly OptimParam[], maxNorm: number): number {
  if (!(maxNorm > 0)) throw new AmalgamError('E_USAGE', `maxNorm must be positive, got ${maxNorm}`);
  const norm = gradNorm(params);
  if (!Number.isFinite(norm)) return norm;
  const coef = maxNorm / (norm + 1e-6);
  if (coef < 1) scaleGrads(params, coef);
  return norm;
}

/**
 * Gradient accumulation bookkeeping: gradients of several micro-batches are summed into the
 * parameters' `grad` arrays (the backward passes accumulate), each micro-batch reporting the
 * summed loss and the weight (tokens or examples) it covered. `finish()` turns the sums into the
 * mean over the whole batch by scaling every gradient by 1 / total weight.
 */
export class GradAccumulator {
  private lossSum = 0;
  private weightSum = 0;
  private micro = 0;

  constructor(private readonly params: readonly OptimParam[]) {}

  /** Start a new batch: zero the gradients and the running sums. */
  begin(): void {
    zeroGrads(this.params);
    this.lossSum = 0;
    this.weightSum = 0;
    this.micro = 0;
  }

  /** Record a micro-batch whose backward added the gradient of `lossSum` (a sum over `weight` items). */
  add(lossSum: number, weight: number): void {
    this.lossSum += lossSum;
    this.weightSum += weight;
    this.micro++;
  }

  get microBatches(): number {
    return this.micro;
  }

  get weight(): number {
    return this.weightSum;
  }

  /** Scale the summed gradients to the batch mean; returns the batch's mean loss. */
  finish(): number {
    if (this.weightSum <= 0) return NaN;
    scaleGrads(this.params, 1 / this.weightSum);
    return this.lossSum / this.weightSum;
  }
}
