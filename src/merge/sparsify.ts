/**
 * Sparsifiers of the generalized task arithmetic family (merge-methods.md §3.2): magnitude top-k
 * (TIES), magnitude outliers (breadcrumbs), Bernoulli (DARE) and rank-based Bernoulli (DELLA),
 * each with the optional L1 rescale. Random keep-masks come from a `MaskSource`, so a seeded RNG
 * or stored masks can be used.
 */
import { AmalgamError } from '../errors.js';
import { Rng } from '../tensor/rng.js';
import { descendingRangeMask, magnitudeKeys, magnitudeRanks, topKMask } from './tensor-ops.js';
import { dellaRowsWasm } from './fused-wasm.js';
import type { MaskRequest, MaskSource } from './types.js';

export type SparsifyMethod = 'magnitude' | 'magnitude_outliers' | 'random' | 'della_magprune';

/** Below this L1 norm (before or after masking) the rescale is skipped. */
export const RESCALE_EPS = 1e-7;

/**
 * `delta ⊙ mask` (mask values 0 or 1), then, when `rescale` is set, multiplied by ‖delta‖₁ / ‖delta ⊙ mask‖₁ (both
 * norms over the whole tensor; skipped when either is below 1e-7). This is mergekit's L1 rescale,
 * not 1/density. Into `out` (default a new array), which may be `delta` itself.
 */
export function applyMask(
  delta: Float32Array,
  mask: Uint8Array | Float32Array,
  rescale: boolean,
  out: Float32Array = new Float32Array(delta.length),
): Float32Array {
  let before = 0;
  let after = 0;
  for (let i = 0; i < delta.length; i++) {
    const d = delta[i];
    const kept = d * mask[i];
    out[i] = kept;
    before += Math.abs(d);
    after += Math.abs(kept);
  }
  if (rescale && before >= RESCALE_EPS && after >= RESCALE_EPS) {
    const s = before / after;
    for (let i = 0; i < out.length; i++) out[i] *= s;
  }
  return out;
}

/**
 * TIES keep-mask: the k = ⌊density·numel⌋ largest |delta| over the whole tensor (ties by lower flat
 * index). Returns null when density ≥ 1 (keep everything).
 */
export function magnitudeMask(delta: Float32Array, density: number): Uint8Array | null {
  if (density >= 1) return null;
  const k = Math.trunc(density * delta.length);
  return topKMask(magnitudeKeys(delta), k);
}

/**
 * Breadcrumbs keep-mask: drop the n_top = ⌊γ·numel⌋ largest and enough of the smallest |delta| to
 * keep ⌊density·numel⌋. With n_top = 0 nothing is dropped at the top (mergekit keeps nothing
 * there; see docs/merge-deviations.md). Returns null when density ≥ 1.
 */
export function magnitudeOutliersMask(delta: Float32Array, density: number, gamma: number): Uint8Array | null {
  if (density >= 1) return null;
  const { nTop, nBot } = outliersCounts(delta.length, density, gamma);
  return descendingRangeMask(magnitudeKeys(delta), nTop, delta.length - nBot);
}

/** Breadcrumbs' n_top (largest magnitudes dropped) and n_bot (smallest dropped) over n values. */
export function outliersCounts(n: number, density: number, gamma: number): { nTop: number; nBot: number } {
  const target = Math.trunc(density * n);
  let nTop = Math.trunc(gamma * n);
  let nBot = n - target - nTop;
  if (nBot < 0) {
    nTop += nBot;
    nBot = 0;
  }
  return { nTop, nBot };
}

/** Row layout DELLA ranks over: dim 1 of the tensor, a 1-D tensor being a single row. */
function dellaLayout(shape: readonly number[], numel: number): { outer: number; n: number; inner: number } {
  if (shape.length < 2) return { outer: 1, n: numel, inner: 1 };
  const outer = shape[0];
  const n = shape[1];
  let inner = 1;
  for (let i = 2; i < shape.length; i++) inner *= shape[i];
  return { outer, n, inner };
}

/**
 * DELLA keep probabilities: within each row, |delta| is ranked ascending and the rank scaled to
 * r ∈ [0, 1]; p = (density − ε) + 2ε·r. A row with a single element gets r = 0.5 (p = density).
 */
export function dellaProbabilities(delta: Float32Array, shape: readonly number[], density: number, epsilon: number): Float32Array {
  const probs = new Float32Array(delta.length);
  const { outer, n, inner } = dellaLayout(shape, delta.length);
  const lo = density - epsilon;
  if (inner === 1 && dellaRowsWasm(delta, outer, n, lo, epsilon, probs)) return probs;
  const ranks = new Uint32Array(n);
  for (let o = 0; o < outer; o++) {
    for (let k = 0; k < inner; k++) {
      const offset = o * n * inner + k;
      magnitudeRanks(delta, offset, inner, n, ranks);
      for (let j = 0; j < n; j++) {
        const r = n > 1 ? ranks[j] / (n - 1) : 0.5;
        probs[offset + j * inner] = lo + r * 2 * epsilon;
      }
    }
  }
  return probs;
}

/** Throws unless 0 < density − ε and density + ε < 1 (for 0 < density < 1). */
export function checkDellaEpsilon(density: number, epsilon: number, tensorName: string, model: string): void {
  if (density >= 1 || density <= 0) return;
  if (!(density - epsilon > 0 && density + epsilon < 1)) {
    throw new AmalgamError(
      'E_CONFIG',
      `model ${model}: della needs 0 < density - epsilon and density + epsilon < 1, got density ${density}, epsilon ${epsilon}`,
      { key: tensorName, hint: 'lower epsilon or move density away from 0 and 1' },
    );
  }
}

/** Masks drawn from a seeded RNG: element i is kept when a uniform draw is below its probability. */
export function rngMaskSource(rng: Rng): MaskSource {
  return {
    draw({ numel, probability }: MaskRequest): Uint8Array {
      const mask = new Uint8Array(numel);
      if (typeof probability === 'number') rng.fillBernoulli(mask, probability * 4294967296);
      else rng.fillBernoulliEach(mask, probability);
      return mask;
    },
  };
}

/** Masks given up front per model (e.g. stored draws). Any non-zero value keeps the element. */
export function givenMaskSource(masks: Readonly<Record<string, ArrayLike<number>>>): MaskSource {
  return {
    draw({ model, numel, tensorName }: MaskRequest): Uint8Array {
      const m = masks[model];
      if (!m) throw new AmalgamError('E_MISSING', `no keep-mask given for model ${model}`, { key: tensorName });
      if (m.length !== numel) {
        throw new AmalgamError('E_SHAPE', `keep-mask for model ${model} has ${m.length} values, expected ${numel}`, { key: tensorName });
      }
      const out = new Uint8Array(numel);
      for (let i = 0; i < numel; i++) out[i] = m[i] ? 1 : 0;
      return out;
    },
  };
}

/** 32-bit FNV-1a of a string. */
function hashString(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/**
 * An Rng for one tensor, derived from the merge seed and the tensor name, so random merges are
 * reproducible whatever order tensors are processed in.
 */
export function tensorRng(seed: number, tensorName: string): Rng {
  return new Rng((Math.imul(seed >>> 0, 0x9e3779b1) ^ hashString(tensorName)) >>> 0);
}

/** The warning for a magnitude top-k that keeps no element (⌊density·numel⌋ = 0). */
export function zeroedWarning(tensorName: string, model: string, density: number, numel: number): string {
  return `${tensorName}: model ${model}: density ${density} keeps no element of ${numel} (⌊density·numel⌋ = 0); its task vector is zeroed`;
}

export interface SparsifyOptions {
  method: SparsifyMethod;
  density: number;
  /** breadcrumbs: fraction of the largest magnitudes to drop. */
  gamma?: number;
  /** DELLA: half-width of the keep-probability range. */
  epsilon?: number;
  rescale: boolean;
  shape: readonly number[];
  tensorName: string;
  model: string;
  /** Required by `random` and `della_magprune` when density < 1. */
  masks?: MaskSource;
  /** The caller gives `delta` up: the mask is applied to it in place, without a new array. */
  inPlace?: boolean;
  warn?: (message: string) => void;
}

/**
 * Sparsifies one task vector. Returns `delta` itself when nothing is removed (density ≥ 1) or
 * when `inPlace` lets the mask be applied to it, otherwise a new array.
 */
export function sparsify(delta: Float32Array, o: SparsifyOptions): Float32Array {
  if (o.density >= 1) return delta;
  const needMasks = (): MaskSource => {
    if (!o.masks) throw new AmalgamError('E_USAGE', `${o.method} sparsification needs a random source`, { key: o.tensorName });
    return o.masks;
  };
  switch (o.method) {
    case 'magnitude': {
      const k = Math.trunc(o.density * delta.length);
      if (k <= 0) {
        o.warn?.(zeroedWarning(o.tensorName, o.model, o.density, delta.length));
        return new Float32Array(delta.length);
      }
      return applyMask(delta, magnitudeMask(delta, o.density)!, o.rescale, o.inPlace ? delta : undefined);
    }
    case 'magnitude_outliers':
      return applyMask(delta, magnitudeOutliersMask(delta, o.density, o.gamma ?? 0.01)!, o.rescale, o.inPlace ? delta : undefined);
    case 'random': {
      if (o.density <= 0) return new Float32Array(delta.length);
      const mask = needMasks().draw({ tensorName: o.tensorName, model: o.model, numel: delta.length, probability: o.density });
      return applyMask(delta, mask, o.rescale, o.inPlace ? delta : undefined);
    }
    case 'della_magprune': {
      if (o.density <= 0) return new Float32Array(delta.length);
      const epsilon = o.epsilon ?? 0.15;
      checkDellaEpsilon(o.density, epsilon, o.tensorName, o.model);
      const probability = dellaProbabilities(delta, o.shape, o.density, epsilon);
      const mask = needMasks().draw({ tensorName: o.tensorName, model: o.model, numel: delta.length, probability });
      return applyMask(delta, mask, o.rescale, o.inPlace ? delta : undefined);
    }
  }
}
