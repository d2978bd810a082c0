/**
 * Parameter resolution for merge methods: defaults, the per-model → global fallback, type checks,
 * and typed accessors used inside the methods.
 */
import { AmalgamError } from '../errors.js';
import type { MergeContext, MergeMethod, ParamSpec, ParamValue, ResolvedParams } from './types.js';

/** Parameters as configured for one tensor, before defaults (gradients already evaluated). */
export interface RawParams {
  global?: Readonly<Record<string, unknown>>;
  perModel?: Readonly<Record<string, Readonly<Record<string, unknown>> | undefined>>;
}

/**
 * The models whose per-model parameters a method reads: every input for methods where the base
 * is an ordinary input (`needsBase: 'none'`), otherwise every input except the base.
 */
export function weightedModels(method: MergeMethod, models: readonly string[], base: string | null): string[] {
  if (method.needsBase === 'none' || base === null) return models.slice();
  return models.filter((m) => m !== base);
}

function checkValue(value: unknown, spec: ParamSpec, name: string, where: string, tensorName: string): ParamValue {
  if (spec.type === 'boolean') {
    if (typeof value !== 'boolean') {
      throw new AmalgamError('E_CONFIG', `${where}parameter '${name}' must be true or false, got ${JSON.stringify(value)}`, { key: tensorName });
    }
    return value;
  }
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new AmalgamError('E_CONFIG', `${where}parameter '${name}' must be a finite number, got ${JSON.stringify(value)}`, { key: tensorName });
  }
  if (spec.type === 'integer' && !Number.isInteger(value)) {
    throw new AmalgamError('E_CONFIG', `${where}parameter '${name}' must be an integer, got ${value}`, { key: tensorName });
  }
  return value;
}

/**
 * Fills every declared parameter for one tensor. A global parameter takes the global value, else
 * its default. A per-model parameter takes the model's value, else the global value of the same
 * name (mergekit's fallback), else its default. Missing required values and wrong types throw
 * E_CONFIG naming the tensor. Undeclared names are ignored.
 */
export function resolveParams(
  method: MergeMethod,
  tensorName: string,
  models: readonly string[],
  base: string | null,
  raw: RawParams,
): ResolvedParams {
  const g = raw.global ?? {};
  const global: Record<string, ParamValue | undefined> = {};
  for (const [name, spec] of Object.entries(method.globalParams)) {
    const v = g[name];
    if (v !== undefined && v !== null) global[name] = checkValue(v, spec, name, '', tensorName);
    else if (spec.default !== undefined) global[name] = spec.default;
    else if (spec.required) {
      throw new AmalgamError('E_CONFIG', `${method.name} needs the parameter '${name}'`, {
        key: tensorName,
        hint: `set '${name}' under parameters:`,
      });
    }
  }
  const perModel: Record<string, Record<string, ParamValue | undefined>> = {};
  for (const model of weightedModels(method, models, base)) {
    const own = raw.perModel?.[model] ?? {};
    const values: Record<string, ParamValue | undefined> = {};
    for (const [name, spec] of Object.entries(method.perModelParams)) {
      const v = own[name] ?? g[name];
      if (v !== undefined && v !== null) values[name] = checkValue(v, spec, name, `model ${model}: `, tensorName);
      else if (spec.default !== undefined) values[name] = spec.default;
      else if (spec.required) {
        throw new AmalgamError('E_CONFIG', `${method.name} needs the parameter '${name}' for model ${model}`, {
          key: tensorName,
          hint: `set '${name}' in that model's parameters: (or in the global parameters:)`,
        });
      }
    }
    perModel[model] = values;
  }
  return { global, perModel };
}

// ---------------------------------------------------------------------------------------------
// Accessors

function missing(ctx: { tensorName: string }, what: string): never {
  throw new AmalgamError('E_CONFIG', `parameter ${what} is not set`, { key: ctx.tensorName });
}

export function globalNumber(ctx: MergeContext, name: string): number {
  const v = ctx.params.global[name];
  if (typeof v !== 'number') return missing(ctx, `'${name}'`);
  return v;
}

export function globalBool(ctx: MergeContext, name: string): boolean {
  const v = ctx.params.global[name];
  if (typeof v !== 'boolean') return missing(ctx, `'${name}'`);
  return v;
}

export function modelNumber(ctx: MergeContext, model: string, name: string): number {
  const v = ctx.params.perModel[model]?.[name];
  if (typeof v !== 'number') return missing(ctx, `'${name}' for model ${model}`);
  return v;
}

export function modelNumberOrUndefined(ctx: MergeContext, model: string, name: string): number | undefined {
  const v = ctx.params.perModel[model]?.[name];
  return typeof v === 'number' ? v : undefined;
}

/** Per-model numeric parameter read from resolved params (for `validate`). */
export function resolvedModelNumber(params: ResolvedParams, model: string, name: string): number | undefined {
  const v = params.perModel[model]?.[name];
  return typeof v === 'number' ? v : undefined;
}
