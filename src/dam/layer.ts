/**
 * The DAM merge of one tensor (dam.md §1): N source tensors of one shape [rows, cols] and one raw
 * coefficient vector cᵢ [cols] per source, combined column by column through a non-linearity f:
 *
 *   merged[o, j] = Σᵢ f(cᵢ[j]) · Wᵢ[o, j]
 *
 * A linear weight [out, in] has one coefficient per input column, an embedding [vocab, hidden]
 * one per hidden dimension, an RMSNorm weight (seen as [1, d]) one per element, and a bias (seen
 * as [out, 1]) one scalar per source. Given G = ∂L/∂merged,
 *
 *   ∂L/∂cᵢ[j] = f′(cᵢ[j]) · Σₒ G[o, j] · Wᵢ[o, j].
 *
 * `DamLinear` is the same layer in input-gating form, y = Σᵢ (f(cᵢ) ⊙ x)·Wᵢᵀ, a `LinearLayer`
 * that never stores the merged weight (N matmuls per call instead of one).
 */
import type { Backend } from '../backend/backend.js';
import { AmalgamError } from '../errors.js';
import type { LinearCache, LinearLayer } from '../nn/layers/linear.js';
import type { Parameter } from '../nn/params.js';

export type DamNonLinearity = 'tanh' | 'sigmoid' | 'identity';

export const DAM_NON_LINEARITIES: readonly DamNonLinearity[] = ['tanh', 'sigmoid', 'identity'];

export interface Activation {
  readonly name: DamNonLinearity;
  f(c: number): number;
  /** f′(c). */
  df(c: number): number;
  /** f⁻¹(s): the raw coefficient whose f is s (NaN outside the range of f). */
  inverse(s: number): number;
}

const sigmoid = (c: number): number => (c >= 0 ? 1 / (1 + Math.exp(-c)) : Math.exp(c) / (1 + Math.exp(c)));

const ACTIVATIONS: Record<DamNonLinearity, Activation> = {
  tanh: {
    name: 'tanh',
    f: Math.tanh,
    df: (c) => {
      const t = Math.tanh(c);
      return 1 - t * t;
    },
    inverse: (s) => (s > -1 && s < 1 ? Math.atanh(s) : NaN),
  },
  sigmoid: {
    name: 'sigmoid',
    f: sigmoid,
    df: (c) => {
      const s = sigmoid(c);
      return s * (1 - s);
    },
    inverse: (s) => (s > 0 && s < 1 ? Math.log(s / (1 - s)) : NaN),
  },
  identity: { name: 'identity', f: (c) => c, df: () => 1, inverse: (s) => s },
};

/** The non-linearity by name ('none' is accepted for identity, as the reference spells it). */
export function damActivation(name: DamNonLinearity | 'none'): Activation {
  const a = ACTIVATIONS[name === 'none' ? 'identity' : name];
  if (!a) throw new AmalgamError('E_USAGE', `unknown non-linearity '${String(name)}'`, { hint: `use ${DAM_NON_LINEARITIES.join(', ')}` });
  return a;
}

function checkOperands(op: string, sources: readonly Float32Array[], coeffs: readonly Float32Array[], rows: number, cols: number): void {
  if (sources.length === 0 || sources.length !== coeffs.length) {
    throw new AmalgamError('E_SHAPE', `${op}: ${sources.length} source tensors but ${coeffs.length} coefficient vectors`);
  }
  for (let i = 0; i < sources.length; i++) {
    if (sources[i]!.length !== rows * cols) throw new AmalgamError('E_SHAPE', `${op}: source ${i} has ${sources[i]!.length} values, expected ${rows}×${cols}`);
    if (coeffs[i]!.length !== cols) throw new AmalgamError('E_SHAPE', `${op}: coefficients ${i} have ${coeffs[i]!.length} values, expected ${cols}`);
  }
}

/** out[o, j] = Σᵢ f(cᵢ[j]) · Wᵢ[o, j] over a [rows, cols] tensor (sums in float64). */
export function damMergeForward(
  out: Float32Array,
  sources: readonly Float32Array[],
  coeffs: readonly Float32Array[],
  rows: number,
  cols: number,
  act: Activation,
): void {
  checkOperands('damMergeForward', sources, coeffs, rows, cols);
  const n = sources.length;
  const s = coeffs.map((c) => Float64Array.from(c, (v) => act.f(v)));
  for (let o = 0; o < rows; o++) {
    const base = o * cols;
    for (let j = 0; j < cols; j++) {
      let acc = 0;
      for (let i = 0; i < n; i++) acc += s[i]![j]! * sources[i]![base + j]!;
      out[base + j] = acc;
    }
  }
}

/** grads[i][j] += f′(cᵢ[j]) · Σₒ G[o, j] · Wᵢ[o, j], for the G = ∂L/∂merged of a [rows, cols] tensor. */
export function damMergeBackward(
  dMerged: Float32Array,
  sources: readonly Float32Array[],
  coeffs: readonly Float32Array[],
  grads: readonly (Float32Array | null)[],
  rows: number,
  cols: number,
  act: Activation,
): void {
  checkOperands('damMergeBackward', sources, coeffs, rows, cols);
  const acc = new Float64Array(cols);
  for (let i = 0; i < sources.length; i++) {
    const g = grads[i];
    if (!g) continue;
    const w = sources[i]!;
    acc.fill(0);
    for (let o = 0; o < rows; o++) {
      const base = o * cols;
      for (let j = 0; j < cols; j++) acc[j] += dMerged[base + j]! * w[base + j]!;
    }
    const c = coeffs[i]!;
    for (let j = 0; j < cols; j++) g[j] += act.df(c[j]!) * acc[j]!;
  }
}

/** out = (Σᵢ Wᵢ) / N, the uniform average of tensors without coefficients (sums in float64). */
export function averageInto(out: Float32Array, sources: readonly Float32Array[]): void {
  const n = sources.length;
  if (n === 0) throw new AmalgamError('E_SHAPE', 'averageInto: no source tensors');
  for (const s of sources) if (s.length !== out.length) throw new AmalgamError('E_SHAPE', `averageInto: a source has ${s.length} values, expected ${out.length}`);
  for (let k = 0; k < out.length; k++) {
    let acc = 0;
    for (let i = 0; i < n; i++) acc += sources[i]![k]!;
    out[k] = acc / n;
  }
}

/** One source of a DamLinear: its weight [out, in] and optional bias [out]. */
export interface DamLinearSource {
  weight: Float32Array;
  bias: Float32Array | null;
}

/**
 * The DAM linear layer in input-gating form, y = Σᵢ (sᵢ ⊙ x)·Wᵢᵀ + Σᵢ f(βᵢ)·bᵢ with sᵢ = f(cᵢ):
 *
 *   uᵢ = dy·Wᵢ,   dx = Σᵢ sᵢ ⊙ uᵢ,   ∂L/∂cᵢ[j] = f′(cᵢ[j]) Σ_rows x[·, j] uᵢ[·, j],
 *   ∂L/∂βᵢ = f′(βᵢ) Σ_rows dy·bᵢ.
 *
 * Its parameters are the coefficient vectors (and scalar bias coefficients), which backward
 * accumulates into when trainable. The cache holds one [rows, in] scratch array.
 */
export class DamLinear implements LinearLayer {
  readonly inFeatures: number;
  readonly outFeatures: number;

  constructor(
    readonly name: string,
    readonly sources: readonly DamLinearSource[],
    readonly coeffs: readonly Parameter[],
    readonly biasCoeffs: readonly Parameter[] | null,
    readonly act: Activation,
    outFeatures: number,
    inFeatures: number,
  ) {
    this.outFeatures = outFeatures;
    this.inFeatures = inFeatures;
    if (sources.length === 0 || coeffs.length !== sources.length) {
      throw new AmalgamError('E_SHAPE', `${sources.length} sources but ${coeffs.length} coefficient vectors`, { key: name });
    }
    for (const [i, s] of sources.entries()) {
      if (s.weight.length !== outFeatures * inFeatures) throw new AmalgamError('E_SHAPE', `source ${i} weight has ${s.weight.length} values, expected ${outFeatures}×${inFeatures}`, { key: name });
      if (coeffs[i]!.size !== inFeatures) throw new AmalgamError('E_SHAPE', `coefficients of source ${i} have ${coeffs[i]!.size} values, expected ${inFeatures}`, { key: name });
      if ((s.bias === null) !== (sources[0]!.bias === null)) throw new AmalgamError('E_SHAPE', 'some sources have a bias and others not', { key: name });
      if (s.bias && s.bias.length !== outFeatures) throw new AmalgamError('E_SHAPE', `source ${i} bias has ${s.bias.length} values, expected ${outFeatures}`, { key: name });
    }
    if (sources[0]!.bias && (!biasCoeffs || biasCoeffs.length !== sources.length)) {
      throw new AmalgamError('E_SHAPE', 'a layer with biases needs one bias coefficient per source', { key: name });
    }
  }

  /** One [rows, in] scratch array: sᵢ ⊙ x in forward, dy·Wᵢ in backward. */
  get savedPerRow(): number {
    return this.inFeatures;
  }

  createCache(maxRows: number): LinearCache {
    return { x: new Float32Array(0), saved: [new Float32Array(maxRows * this.inFeatures)] };
  }

  private gates(): Float32Array[] {
    return this.coeffs.map((c) => Float32Array.from(c.data, (v) => this.act.f(v)));
  }

  forward(be: Backend, x: Float32Array, y: Float32Array, rows: number, cache: LinearCache): void {
    cache.x = x;
    const inF = this.inFeatures;
    const outF = this.outFeatures;
    const xs = cache.saved[0]!;
    const gates = this.gates();
    this.sources.forEach((src, i) => {
      const s = gates[i]!;
      for (let r = 0; r < rows; r++) {
        const o = r * inF;
        for (let j = 0; j < inF; j++) xs[o + j] = x[o + j]! * s[j]!;
      }
      be.matmul(xs, src.weight, y, rows, inF, outF, { transB: true, accumulate: i > 0 });
    });
    if (this.sources[0]!.bias) {
      const b = new Float64Array(outF);
      this.sources.forEach((src, i) => {
        const g = this.act.f(this.biasCoeffs![i]!.data[0]!);
        for (let o = 0; o < outF; o++) b[o] += g * src.bias![o]!;
      });
      for (let r = 0; r < rows; r++) {
        const o = r * outF;
        for (let k = 0; k < outF; k++) y[o + k] += b[k]!;
      }
    }
  }

  backward(be: Backend, dy: Float32Array, dx: Float32Array | null, rows: number, cache: LinearCache, accumulateDx = false): void {
    const inF = this.inFeatures;
    const outF = this.outFeatures;
    const x = cache.x;
    const u = cache.saved[0]!;
    const gates = this.gates();
    if (dx && !accumulateDx) dx.fill(0, 0, rows * inF);
    const acc = new Float64Array(inF);
    this.sources.forEach((src, i) => {
      const grad = this.coeffs[i]!.grad;
      if (!grad && !dx) return;
      be.matmul(dy, src.weight, u, rows, outF, inF);
      if (dx) {
        const s = gates[i]!;
        for (let r = 0; r < rows; r++) {
          const o = r * inF;
          for (let j = 0; j < inF; j++) dx[o + j] += s[j]! * u[o + j]!;
        }
      }
      if (grad) {
        acc.fill(0);
        for (let r = 0; r < rows; r++) {
          const o = r * inF;
          for (let j = 0; j < inF; j++) acc[j] += x[o + j]! * u[o + j]!;
        }
        const c = this.coeffs[i]!.data;
        for (let j = 0; j < inF; j++) grad[j] += this.act.df(c[j]!) * acc[j]!;
      }
    });
    if (this.sources[0]!.bias) {
      this.sources.forEach((src, i) => {
        const p = this.biasCoeffs![i]!;
        if (!p.grad) return;
        let sum = 0;
        for (let r = 0; r < rows; r++) {
          const o = r * outF;
          for (let k = 0; k < outF; k++) sum += dy[o + k]! * src.bias![k]!;
        }
        p.grad[0] += this.act.df(p.data[0]!) * sum;
      });
    }
  }

  parameters(): Parameter[] {
    return [...this.coeffs, ...(this.biasCoeffs ?? [])];
  }
}
