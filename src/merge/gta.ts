/**
 * Generalized task arithmetic (merge-methods.md §3): the pipeline shared by task_arithmetic,
 * ties, dare_*, breadcrumbs*, della*. Task vectors → sparsify → weight → sign consensus or plain
 * sum → normalise → λ → base + mixed.
 */
import { AmalgamError } from '../errors.js';
import { copyOf, maskSourceOf, output, splitBase } from './common.js';
import { globalBool, globalNumber, modelNumber, resolvedModelNumber } from './params.js';
import { checkDellaEpsilon, dellaProbabilities, outliersCounts, RESCALE_EPS, sparsify, zeroedWarning, type SparsifyMethod } from './sparsify.js';
import { cutSubmatrix, sameShape, shapeString, subtract } from './tensor-ops.js';
import type { MaskSource, MergeContext, MergeInput, MergeMethod, MergeOutput, ParamSpec, ResolvedParams, ValidateContext } from './types.js';
import { fusedGta } from './fused.js';
import { combineDeltas } from './fused-wasm.js';
import {
  scalarDivisorOf,
  storedLength,
  type ConsensusMethod,
  type FusedGtaModel,
  type MemoryValues,
  type Preloaded,
  type StoredValues,
} from './fused-common.js';

export { scalarDivisorOf, type ConsensusMethod };


const COMBINE_BLOCK = 4096;

export interface GtaVariant {
  name: string;
  prettyName: string;
  reference?: string;
  sparsification: SparsifyMethod | null;
  consensus: ConsensusMethod | null;
  defaultNormalize: boolean;
  defaultRescale: boolean;
}

/**
 * The task vector x − base of one model. Embeddings larger than the base are cut to the base's
 * shape; a smaller embedding or any other shape mismatch is an error (mergekit fails late or
 * silently skips the model).
 */
export function taskVector(ctx: MergeContext, method: string, base: MergeInput, x: MergeInput): Float32Array {
  if (x.data.length !== base.data.length || !sameShape(x.shape, base.shape)) {
    if (ctx.isEmbed && x.shape.length === 2 && base.shape.length === 2) {
      const [rows, cols] = base.shape;
      if (x.shape[0] < rows || x.shape[1] < cols) {
        throw new AmalgamError(
          'E_SHAPE',
          `${method}: embedding of model ${x.model} ${shapeString(x.shape)} is smaller than the base model's ${shapeString(base.shape)}`,
          { key: ctx.tensorName, hint: 'set tokenizer_source (or tokenizer:) to merge models with different vocabularies' },
        );
      }
      ctx.warn?.(`${ctx.tensorName}: using the ${shapeString(base.shape)} submatrix of model ${x.model}'s ${shapeString(x.shape)} embedding`);
      return subtract(cutSubmatrix(x.data, x.shape, rows, cols), base.data);
    }
    throw new AmalgamError(
      'E_SHAPE',
      `${method}: model ${x.model} has shape ${shapeString(x.shape)} but the base model ${base.model} has ${shapeString(base.shape)}`,
      { key: ctx.tensorName, hint: 'every model must have the base model\'s shape for this tensor' },
    );
  }
  return subtract(x.data, base.data);
}

/** Checks a per-model density (finite, in [0, 1]). */
export function checkDensity(density: number, tensorName: string, model: string): void {
  if (!(density >= 0 && density <= 1)) {
    throw new AmalgamError('E_CONFIG', `model ${model}: density must be in [0, 1], got ${density}`, { key: tensorName });
  }
}

/**
 * Combines weighted, sparsified task vectors onto the base (steps 3–6 of §3.1). `weights[m]`
 * pairs with `deltas[m]`. Every operation is float32, element by element in mergekit's order:
 * v = w·τ, the sums over models in model order from +0, the division, λ and base + mixed.
 */
export function combineTaskVectors(
  base: Float32Array,
  deltas: readonly Float32Array[],
  weights: readonly number[],
  consensus: ConsensusMethod | null,
  normalize: boolean,
  lambda: number,
): Float32Array {
  const fill: DeltaFill = (k, start, len, dst) => {
    const src = deltas[k]!.subarray(start, start + len);
    dst.set(src);
    // A task vector shorter than the base reads as NaN past its end (as indexing it did), never
    // as whatever the block held before.
    if (src.length < len) dst.fill(NaN, src.length);
  };
  return combineFilled(base, deltas.length, fill, weights, consensus, normalize, lambda);
}

/** Writes model k's task vector values [start, start + len) to `dst` (of length len). */
type DeltaFill = (k: number, start: number, len: number, dst: Float32Array) => void;

/** Tensors at least this large are combined by the WebAssembly kernel where it is available. */
const WASM_COMBINE_MIN = 4096;

/**
 * `combineTaskVectors` of `models` task vectors given block by block by `fill`: in WebAssembly
 * SIMD where available (`combineDeltas`), else (and for blocks with a NaN result) in TypeScript.
 */
function combineFilled(
  base: Float32Array,
  models: number,
  fill: DeltaFill,
  weights: readonly number[],
  consensus: ConsensusMethod | null,
  normalize: boolean,
  lambda: number,
): Float32Array {
  const n = base.length;
  const out = new Float32Array(n);
  const wf = weights.map((w) => Math.fround(w));
  const lam = Math.fround(lambda);
  const scalarDivisor = scalarDivisorOf(weights);
  const B = Math.min(n, COMBINE_BLOCK);
  const blocks: Float32Array[] = [];
  for (let k = 0; k < models; k++) blocks.push(new Float32Array(B));
  const total = new Float32Array(B);
  const mixed = new Float32Array(B);
  const divisor = new Float32Array(B);
  const js = (from: number, count: number): void => {
    for (let start = from; start < from + count; start += B) {
      const len = Math.min(B, from + count - start);
      for (let k = 0; k < models; k++) fill(k, start, len, blocks[k]!.subarray(0, len));
      combineBlock(base, blocks, wf, consensus, normalize, lam, scalarDivisor, out, start, len, total, mixed, divisor);
    }
  };
  const settings = { consensus: consensus === 'sum', normalize, lambda: lam, scalarDivisor };
  if (n >= WASM_COMBINE_MIN && combineDeltas(base, models, fill, wf, settings, out, js)) return out;
  js(0, n);
  return out;
}

/**
 * Values [start, start + len) of `combineTaskVectors`, from the task vectors' values in
 * `deltas[k][0, len)`. Model-major passes keep the inner loops monomorphic. Float32Array stores
 * round each float64 result to float32; for +, ·, / of float32 operands that equals the float32 op.
 */
function combineBlock(
  base: Float32Array,
  deltas: readonly Float32Array[],
  wf: readonly number[],
  consensus: ConsensusMethod | null,
  normalize: boolean,
  lam: number,
  scalarDivisor: number,
  out: Float32Array,
  start: number,
  len: number,
  total: Float32Array,
  mixed: Float32Array,
  divisor: Float32Array,
): void {
  const m = deltas.length;
  total.fill(0, 0, len);
  for (let k = 0; k < m; k++) {
    const d = deltas[k];
    const w = wf[k];
    for (let j = 0; j < len; j++) total[j] += Math.fround(w * d[j]);
  }
  if (consensus === 'sum') {
    // Elected sign: + where the weighted sum is ≥ 0. Zero deltas never agree.
    for (let j = 0; j < len; j++) total[j] = total[j] >= 0 ? 1 : -1;
    mixed.fill(0, 0, len);
    divisor.fill(0, 0, len);
    for (let k = 0; k < m; k++) {
      const d = deltas[k];
      const w = wf[k];
      for (let j = 0; j < len; j++) {
        const v = Math.fround(w * d[j]);
        const agree = +(v * total[j] > 0);
        mixed[j] += v * agree;
        divisor[j] += w * agree;
      }
    }
    for (let j = 0; j < len; j++) {
      let v = mixed[j];
      if (normalize) v = Math.fround(v / (divisor[j] === 0 ? 1 : divisor[j]));
      if (lam !== 1) v = Math.fround(v * lam);
      out[start + j] = base[start + j] + v;
    }
  } else {
    for (let j = 0; j < len; j++) {
      let v = total[j];
      if (normalize) v = Math.fround(v / scalarDivisor);
      if (lam !== 1) v = Math.fround(v * lam);
      out[start + j] = base[start + j] + v;
    }
  }
}

/**
 * DARE's or DELLA's task vectors (random keep-masks, L1 rescale) combined without a task vector,
 * masked copy or mask application per model held whole: first each model's mask is drawn (DELLA:
 * from the ranks of its task vector, made for that and dropped), in model order as `sparsify`
 * draws them, and ‖τ‖₁ and ‖τ ⊙ mask‖₁ summed in index order; then the
 * combine computes each block's τ = x − base, τ ⊙ mask and the rescale from the inputs. The same
 * float32 values as taskVector → sparsify → combineTaskVectors. Inputs all of the base's shape.
 */
function combineRandomSparsified(
  method: 'random' | 'della_magprune',
  ctx: MergeContext,
  base: MergeInput,
  others: readonly MergeInput[],
  masks: MaskSource | undefined,
  rescale: boolean,
  consensus: ConsensusMethod | null,
  normalize: boolean,
  lambda: number,
): Float32Array {
  const b = base.data;
  const n = b.length;
  // Per model: keep all (density ≥ 1), none (density ≤ 0), or a mask and its rescale factor.
  const keep: ({ mask: Uint8Array; scale: number | undefined } | 'all' | 'none')[] = [];
  const weights: number[] = [];
  for (const x of others) {
    const density = modelNumber(ctx, x.model, 'density');
    checkDensity(density, ctx.tensorName, x.model);
    // As the unfused pipeline: epsilon is read for every model, and checked before the random source.
    const epsilon = method === 'della_magprune' ? modelNumber(ctx, x.model, 'epsilon') : 0;
    if (density >= 1 || density <= 0) {
      keep.push(density >= 1 ? 'all' : 'none');
      weights.push(modelNumber(ctx, x.model, 'weight'));
      continue;
    }
    if (method === 'della_magprune') checkDellaEpsilon(density, epsilon, ctx.tensorName, x.model);
    if (!masks) throw new AmalgamError('E_USAGE', `${method} sparsification needs a random source`, { key: ctx.tensorName });
    let probability: number | Float32Array = density;
    if (method === 'della_magprune') probability = dellaProbabilities(subtract(x.data, b), base.shape, density, epsilon);
    const mask = masks.draw({ tensorName: ctx.tensorName, model: x.model, numel: n, probability });
    let scale: number | undefined;
    if (rescale) {
      const { before, after } = maskedL1(x.data, b, mask);
      if (before >= RESCALE_EPS && after >= RESCALE_EPS) scale = before / after;
    }
    keep.push({ mask, scale });
    weights.push(modelNumber(ctx, x.model, 'weight'));
  }
  const fill: DeltaFill = (k, start, len, dst) => {
    const x = others[k]!.data;
    const kk = keep[k]!;
    if (kk === 'none') dst.fill(0);
    else if (kk === 'all') for (let j = 0; j < len; j++) dst[j] = x[start + j] - b[start + j];
    else fillMasked(x, b, kk.mask, kk.scale, start, len, dst);
  };
  return combineFilled(b, others.length, fill, weights, consensus, normalize, lambda);
}

/** ‖x − base‖₁ and ‖(x − base) ⊙ mask‖₁ of float32 task vector values, summed in index order. */
function maskedL1(x: Float32Array, b: Float32Array, mask: Uint8Array): { before: number; after: number } {
  let before = 0;
  let after = 0;
  for (let i = 0; i < x.length; i++) {
    const d = Math.fround(x[i] - b[i]);
    before += Math.abs(d);
    after += Math.abs(d * mask[i]);
  }
  return { before, after };
}

/** (x − base) ⊙ mask, times `scale` where given, for values [start, start + len), as `applyMask` rounds them. */
function fillMasked(x: Float32Array, b: Float32Array, mask: Uint8Array, scale: number | undefined, start: number, len: number, dst: Float32Array): void {
  if (scale === undefined) {
    for (let j = 0; j < len; j++) dst[j] = Math.fround(x[start + j] - b[start + j]) * mask[start + j];
  } else {
    for (let j = 0; j < len; j++) dst[j] = Math.fround(Math.fround(x[start + j] - b[start + j]) * mask[start + j]) * scale;
  }
}

const VARIANTS = new WeakMap<MergeMethod, GtaVariant>();

/** The GTA variant a method was made from, or undefined for other methods. */
export function gtaVariantOf(method: MergeMethod): GtaVariant | undefined {
  return VARIANTS.get(method);
}

/** Whether the fused kernel computes this variant with this `rescale` setting. */
export function fusedApplies(v: GtaVariant, rescale: unknown): boolean {
  return v.sparsification === null || ((v.sparsification === 'magnitude' || v.sparsification === 'magnitude_outliers') && rescale === false);
}

/**
 * The fused kernel's keep and drop counts of breadcrumbs for density < 1 (`magnitudeOutliersMask`
 * over n values): ranks [drop, keep) of the magnitudes, in the same arithmetic and with the same
 * comparisons as `descendingRangeMask`, so that any density and gamma (NaN included) give its mask.
 */
function outliersRange(n: number, density: number, gamma: number): { keep: number | null; drop: number } {
  const { nTop, nBot } = outliersCounts(n, density, gamma);
  const from = Math.max(0, nTop);
  const to = Math.min(n, n - nBot);
  if (to <= from) return { keep: 0, drop: 0 };
  return { keep: to < n ? to : null, drop: from > 0 ? from : 0 };
}

/** One input of `fusedMerge`. */
export interface StoredInput {
  model: string;
  shape: readonly number[];
  values: StoredValues;
}

/**
 * Merges stored inputs with a GTA variant through the fused kernel into `out`, with the checks,
 * warnings and errors of the method's `merge`. Returns false, having done nothing, where the
 * kernel does not apply: a random sparsifier, rescale, no base among the inputs, no other model,
 * or inputs whose shapes differ from the base's.
 */
export function fusedMerge(
  v: GtaVariant,
  ctx: Omit<MergeContext, 'inputs'>,
  inputs: readonly StoredInput[],
  out: MemoryValues,
  opts: { residentBytes?: number; preloaded?: Preloaded } = {},
): boolean {
  let base: StoredInput | undefined;
  const others: StoredInput[] = [];
  for (const t of inputs) {
    if (ctx.base !== null && t.model === ctx.base) base = t;
    else others.push(t);
  }
  if (!base || others.length === 0) return false;
  const n = storedLength(base.values);
  if (out.data.length !== n) return false;
  for (const x of others) if (storedLength(x.values) !== n || !sameShape(x.shape, base.shape)) return false;
  const c = { ...ctx, inputs: [] };
  const normalize = globalBool(c, 'normalize');
  const rescale = globalBool(c, 'rescale');
  const lambda = globalNumber(c, 'lambda');
  if (!fusedApplies(v, rescale)) return false;
  const models: FusedGtaModel[] = [];
  for (const x of others) {
    let keep: number | null = null;
    let drop: number | undefined;
    if (v.sparsification) {
      // Read and checked in the unfused pipeline's order: density, gamma, then the weight.
      const density = modelNumber(c, x.model, 'density');
      checkDensity(density, ctx.tensorName, x.model);
      if (v.sparsification === 'magnitude_outliers') {
        const gamma = modelNumber(c, x.model, 'gamma');
        // `sparsify` leaves the task vector as it is at density ≥ 1, whatever gamma.
        drop = 0;
        if (density < 1) ({ keep, drop } = outliersRange(n, density, gamma));
      } else if (density < 1) {
        keep = Math.trunc(density * n);
        if (keep <= 0) {
          ctx.warn?.(zeroedWarning(ctx.tensorName, x.model, density, n));
          keep = 0;
        }
      }
    }
    models.push({ values: x.values, weight: modelNumber(c, x.model, 'weight'), keep, ...(drop !== undefined ? { drop } : {}) });
  }
  fusedGta({
    base: base.values,
    models,
    consensus: v.consensus,
    normalize,
    lambda,
    out,
    ...(opts.residentBytes ? { residentBytes: opts.residentBytes } : {}),
    ...(opts.preloaded ? { preloaded: opts.preloaded } : {}),
  });
  return true;
}

export function makeGtaMethod(v: GtaVariant): MergeMethod {
  const globalParams: Record<string, ParamSpec> = {
    normalize: { type: 'boolean', default: v.defaultNormalize, description: 'divide by the sum of weights' },
    rescale: { type: 'boolean', default: v.defaultRescale, description: 'restore the L1 norm after sparsification' },
    lambda: { type: 'number', default: 1.0, description: 'scale of the merged task vector' },
    int8_mask: { type: 'boolean', default: false, description: 'accepted for compatibility; no numerical effect' },
  };
  const perModelParams: Record<string, ParamSpec> = {
    weight: { type: 'number', required: true, description: 'weight of the task vector' },
    density: { type: 'number', default: 1.0, description: 'fraction of the task vector kept' },
  };
  if (v.sparsification === 'magnitude_outliers') {
    perModelParams.gamma = { type: 'number', default: 0.01, description: 'fraction of the largest magnitudes dropped' };
  }
  if (v.sparsification === 'della_magprune') {
    perModelParams.epsilon = { type: 'number', default: 0.15, description: 'spread of keep probabilities around density' };
  }

  const method: MergeMethod = {
    name: v.name,
    prettyName: v.prettyName,
    reference: v.reference,
    globalParams,
    perModelParams,
    needsBase: 'required',
    randomized: v.sparsification === 'random' || v.sparsification === 'della_magprune',

    validate(params: ResolvedParams, vctx: ValidateContext): void {
      if (vctx.base === null) {
        throw new AmalgamError('E_CONFIG', `${v.name} needs a base model`, { key: vctx.tensorName, hint: 'set base_model:' });
      }
      for (const model of vctx.models.filter((m) => m !== vctx.base)) {
        const density = resolvedModelNumber(params, model, 'density') ?? 1;
        checkDensity(density, vctx.tensorName, model);
        if (v.sparsification === 'magnitude_outliers') {
          const gamma = resolvedModelNumber(params, model, 'gamma') ?? 0.01;
          if (!(gamma >= 0 && gamma <= 1)) {
            throw new AmalgamError('E_CONFIG', `model ${model}: gamma must be in [0, 1], got ${gamma}`, { key: vctx.tensorName });
          }
        }
        if (v.sparsification === 'della_magprune') {
          checkDellaEpsilon(density, resolvedModelNumber(params, model, 'epsilon') ?? 0.15, vctx.tensorName, model);
        }
      }
    },

    merge(ctx: MergeContext): MergeOutput {
      const { base, others } = splitBase(ctx, v.name, true);
      if (others.length === 0) return copyOf(base!);
      if (others.every((x) => x.data.length === base!.data.length && sameShape(x.shape, base!.shape))) {
        const out = new Float32Array(base!.data.length);
        const stored = ctx.inputs.map((t) => ({ model: t.model, shape: t.shape, values: { dtype: 'F32' as const, data: t.data } }));
        if (fusedMerge(v, ctx, stored, { dtype: 'F32', data: out })) return output(out, base!.shape);
      }
      const normalize = globalBool(ctx, 'normalize');
      const rescale = globalBool(ctx, 'rescale');
      const lambda = globalNumber(ctx, 'lambda');
      const masks = v.sparsification === 'random' || v.sparsification === 'della_magprune' ? maskSourceOf(ctx) : undefined;
      const random = v.sparsification === 'random' || v.sparsification === 'della_magprune' ? v.sparsification : undefined;
      if (random && others.every((x) => x.data.length === base!.data.length && sameShape(x.shape, base!.shape))) {
        return output(combineRandomSparsified(random, ctx, base!, others, masks, rescale, v.consensus, normalize, lambda), base!.shape);
      }
      const deltas: Float32Array[] = [];
      const weights: number[] = [];
      for (const x of others) {
        let delta = taskVector(ctx, v.name, base!, x);
        if (v.sparsification) {
          const density = modelNumber(ctx, x.model, 'density');
          checkDensity(density, ctx.tensorName, x.model);
          delta = sparsify(delta, {
            method: v.sparsification,
            density,
            gamma: v.sparsification === 'magnitude_outliers' ? modelNumber(ctx, x.model, 'gamma') : undefined,
            epsilon: v.sparsification === 'della_magprune' ? modelNumber(ctx, x.model, 'epsilon') : undefined,
            rescale,
            shape: base!.shape,
            tensorName: ctx.tensorName,
            model: x.model,
            masks,
            inPlace: true,
            warn: ctx.warn,
          });
        }
        deltas.push(delta);
        weights.push(modelNumber(ctx, x.model, 'weight'));
      }
      return output(combineTaskVectors(base!.data, deltas, weights, v.consensus, normalize, lambda), base!.shape);
    },
  };
  VARIANTS.set(method, v);
  return method;
}
