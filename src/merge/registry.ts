/**
 * The merge method registry: every method by its mergekit name, plus the entry points the
 * planner and executor use (parameter resolution, validation, merging one tensor).
 */
import { AmalgamError } from '../errors.js';
import { numel } from '../tensor/dtype.js';
import { resolveParams, type RawParams } from './params.js';
import { shapeString } from './tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from './types.js';
import { arceeFusion } from './methods/arcee-fusion.js';
import { breadcrumbs } from './methods/breadcrumbs.js';
import { breadcrumbsTies } from './methods/breadcrumbs-ties.js';
import { dareLinear } from './methods/dare-linear.js';
import { dareTies } from './methods/dare-ties.js';
import { della } from './methods/della.js';
import { dellaLinear } from './methods/della-linear.js';
import { karcher } from './methods/karcher.js';
import { linear } from './methods/linear.js';
import { modelStock } from './methods/model-stock.js';
import { multislerp } from './methods/multislerp.js';
import { nearswap } from './methods/nearswap.js';
import { nuslerp } from './methods/nuslerp.js';
import { passthrough } from './methods/passthrough.js';
import { ram } from './methods/ram.js';
import { ramplusTl } from './methods/ramplus-tl.js';
import { sce } from './methods/sce.js';
import { slerp } from './methods/slerp.js';
import { taskArithmetic } from './methods/task-arithmetic.js';
import { ties } from './methods/ties.js';

export type {
  BaseRequirement,
  MaskRequest,
  MaskSource,
  MergeContext,
  MergeInput,
  MergeMethod,
  MergeOutput,
  ParamSpec,
  ParamValue,
  ResolvedParams,
  ValidateContext,
} from './types.js';
export { resolveParams, weightedModels, type RawParams } from './params.js';

/** Every registered method, in catalogue order. */
export const MERGE_METHODS: readonly MergeMethod[] = [
  linear,
  slerp,
  nuslerp,
  multislerp,
  karcher,
  taskArithmetic,
  ties,
  dareLinear,
  dareTies,
  breadcrumbs,
  breadcrumbsTies,
  della,
  dellaLinear,
  sce,
  modelStock,
  nearswap,
  arceeFusion,
  passthrough,
  ram,
  ramplusTl,
];

const BY_NAME: ReadonlyMap<string, MergeMethod> = new Map(MERGE_METHODS.map((m) => [m.name, m]));

export function mergeMethodNames(): string[] {
  return MERGE_METHODS.map((m) => m.name);
}

export function hasMergeMethod(name: string): boolean {
  return BY_NAME.has(name);
}

/** The method registered under `name`; an unknown name is an E_CONFIG error listing the known ones. */
export function getMergeMethod(name: string): MergeMethod {
  const m = BY_NAME.get(name);
  if (m) return m;
  throw new AmalgamError('E_CONFIG', `unknown merge_method '${name}'`, {
    key: 'merge_method',
    hint: `one of: ${mergeMethodNames().join(', ')}`,
  });
}

function methodOf(method: MergeMethod | string): MergeMethod {
  return typeof method === 'string' ? getMergeMethod(method) : method;
}

/**
 * Checks, before any tensor is read, that the models and resolved parameters suit the method:
 * the base model requirement, then the method's own rules. Errors name the tensor.
 */
export function validateMerge(method: MergeMethod | string, params: ResolvedParams, vctx: ValidateContext): void {
  const m = methodOf(method);
  if (m.needsBase === 'required' && vctx.base === null) {
    throw new AmalgamError('E_CONFIG', `${m.name} needs a base model`, { key: vctx.tensorName, hint: 'set base_model:' });
  }
  m.validate?.(params, vctx);
}

/**
 * Resolves parameters (defaults, per-model → global fallback) and validates them for one tensor.
 */
export function prepareParams(
  method: MergeMethod | string,
  vctx: ValidateContext,
  raw: RawParams,
): ResolvedParams {
  const m = methodOf(method);
  const params = resolveParams(m, vctx.tensorName, vctx.models, vctx.base, raw);
  validateMerge(m, params, vctx);
  return params;
}

/**
 * Merges one tensor with `method`. Checks each input's length against its shape and the result's
 * against its shape. Returns null only when the method leaves the tensor out (see MergeMethod).
 */
export function mergeTensor(method: MergeMethod | string, ctx: MergeContext): MergeOutput | null {
  const m = methodOf(method);
  for (const t of ctx.inputs) {
    if (t.data.length !== numel(t.shape)) {
      throw new AmalgamError('E_SHAPE', `input from ${t.model} has ${t.data.length} values but shape ${shapeString(t.shape)}`, {
        key: ctx.tensorName,
      });
    }
  }
  if (ctx.base !== null && m.needsBase === 'none') {
    // The base is an ordinary input for this method.
    ctx = { ...ctx, base: null };
  }
  const out = m.merge(ctx);
  if (out && out.data.length !== numel(out.shape)) {
    throw new AmalgamError('E_SHAPE', `${m.name} produced ${out.data.length} values for shape ${shapeString(out.shape)}`, {
      key: ctx.tensorName,
    });
  }
  return out;
}
