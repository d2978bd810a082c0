/**
 * Glue shared by the method implementations: finding the base among the inputs and packaging
 * results.
 */
import { AmalgamError } from '../errors.js';
import { rngMaskSource } from './sparsify.js';
import type { MaskSource, MergeContext, MergeInput, MergeOutput } from './types.js';

export interface SplitInputs {
  base: MergeInput | null;
  others: MergeInput[];
}

/**
 * Separates the base tensor from the other inputs. With `requireBase`, a merge without a base
 * model, or whose base model lacks this tensor, is an error naming the tensor.
 */
export function splitBase(ctx: MergeContext, method: string, requireBase: boolean): SplitInputs {
  let base: MergeInput | null = null;
  const others: MergeInput[] = [];
  for (const t of ctx.inputs) {
    if (ctx.base !== null && t.model === ctx.base) base = t;
    else others.push(t);
  }
  if (requireBase && base === null) {
    if (ctx.base === null) {
      throw new AmalgamError('E_CONFIG', `${method} needs a base model`, { key: ctx.tensorName, hint: 'set base_model:' });
    }
    throw new AmalgamError('E_MISSING', `${method}: the base model ${ctx.base} has no such tensor`, { key: ctx.tensorName });
  }
  return { base, others };
}

export function output(data: Float32Array, shape: readonly number[]): MergeOutput {
  return { data, shape: shape.slice() };
}

/** A copy of one input as the result. */
export function copyOf(t: MergeInput): MergeOutput {
  return { data: t.data.slice(), shape: t.shape.slice() };
}

/** The mask source of a randomized merge: injected masks first, else the context's RNG. */
export function maskSourceOf(ctx: MergeContext): MaskSource | undefined {
  if (ctx.masks) return ctx.masks;
  if (ctx.rng) return rngMaskSource(ctx.rng);
  return undefined;
}

export function noInputs(ctx: MergeContext, method: string): never {
  throw new AmalgamError('E_MISSING', `${method}: no input has this tensor`, { key: ctx.tensorName });
}

export function wrongCount(ctx: MergeContext, method: string, what: string, got: readonly MergeInput[]): never {
  throw new AmalgamError('E_CONFIG', `${method} ${what}, got ${got.length} (${got.map((t) => t.model).join(', ') || 'none'})`, {
    key: ctx.tensorName,
  });
}
