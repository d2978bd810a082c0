/**
 * Parameter names, kinds and defaults of each merge method (merge-methods.md §2, §3). The config
 * validator uses this table to reject misspelled or misplaced parameter names, and the parameter
 * resolver uses it for defaults and required parameters. A method registry can replace or add
 * entries with `registerMethodParameters`.
 */
import type { ScalarValue } from './types.js';

/** `global`: one value per tensor (G). `model`: one value per input model per tensor (M). */
export type ParameterKind = 'global' | 'model';

/** Value type of a parameter; gradients and condition lists must evaluate to this type. */
export type ParameterValueType = 'number' | 'integer' | 'boolean';

export interface ParameterSpec {
  name: string;
  kind: ParameterKind;
  type: ParameterValueType;
  /** Value used when no level of the configuration sets the parameter. */
  default?: ScalarValue;
  /** A missing value is an error (for per-model parameters: except for the base model). */
  required?: boolean;
  /** With `required`: the base model needs a value too (`linear` weights). */
  requiredForBase?: boolean;
  /** Accepted, but has no effect on the result. */
  ignored?: boolean;
}

const g = (name: string, type: ParameterValueType, def?: ScalarValue, extra: Partial<ParameterSpec> = {}): ParameterSpec => ({
  name,
  kind: 'global',
  type,
  ...(def !== undefined ? { default: def } : {}),
  ...extra,
});
const m = (name: string, type: ParameterValueType, def?: ScalarValue, extra: Partial<ParameterSpec> = {}): ParameterSpec => ({
  name,
  kind: 'model',
  type,
  ...(def !== undefined ? { default: def } : {}),
  ...extra,
});

function gta(normalize: boolean, rescale: boolean, extra: ParameterSpec[] = []): ParameterSpec[] {
  return [
    g('normalize', 'boolean', normalize),
    g('rescale', 'boolean', rescale),
    g('lambda', 'number', 1.0),
    g('int8_mask', 'boolean', false),
    m('weight', 'number', undefined, { required: true }),
    m('density', 'number', 1.0),
    ...extra,
  ];
}

const gamma = () => m('gamma', 'number', 0.01);
const epsilon = () => m('epsilon', 'number', 0.15);

const BUILTIN: Record<string, ParameterSpec[]> = {
  linear: [g('normalize', 'boolean', true), m('weight', 'number', undefined, { required: true, requiredForBase: true })],
  slerp: [g('t', 'number', undefined, { required: true })],
  nuslerp: [
    g('nuslerp_flatten', 'boolean', true),
    g('nuslerp_row_wise', 'boolean', false),
    m('weight', 'number', undefined, { required: true }),
  ],
  multislerp: [
    g('normalize_weights', 'boolean', true),
    g('eps', 'number', 1e-8),
    m('weight', 'number', undefined, { required: true }),
  ],
  karcher: [g('max_iter', 'integer', 10), g('tol', 'number', 1e-5)],
  task_arithmetic: gta(false, false).map((p) => (p.name === 'density' ? { ...p, ignored: true } : p)),
  ties: gta(true, false),
  dare_linear: gta(false, true),
  dare_ties: gta(false, true),
  breadcrumbs: gta(false, false, [gamma()]),
  breadcrumbs_ties: gta(false, false, [gamma()]),
  della: gta(true, true, [epsilon()]),
  della_linear: gta(false, true, [epsilon()]),
  sce: [g('select_topk', 'number', 1.0), g('int8_mask', 'boolean', false), m('weight', 'number', undefined, { ignored: true })],
  model_stock: [g('filter_wise', 'boolean', false)],
  nearswap: [g('t', 'number', undefined, { required: true })],
  arcee_fusion: [],
  passthrough: [m('scale', 'number')],
  ram: [g('epsilon', 'number', 1e-5)],
  ramplus_tl: [g('epsilon', 'number', 1e-5), g('r', 'number', 0.1), g('alpha', 'number', 0.2)],
};

/** Methods that mergekit once had and removed, with what to use instead. */
export const REMOVED_METHODS: Readonly<Record<string, string>> = {
  consensus_ta: 'it was removed from mergekit (commit a2dda31); use `task_arithmetic` or `ties`',
  consensus_ties: 'it was removed from mergekit (commit a2dda31); use `ties`',
};

const registry = new Map<string, ParameterSpec[]>(Object.entries(BUILTIN));

/** Adds or replaces a method's parameter table. */
export function registerMethodParameters(method: string, parameters: ParameterSpec[]): void {
  registry.set(method, parameters.map((p) => ({ ...p })));
}

/** Names of all known merge methods, in catalogue order. */
export function mergeMethodNames(): string[] {
  return [...registry.keys()];
}

export function isKnownMergeMethod(method: string): boolean {
  return registry.has(method);
}

/** The parameter table of a method, or undefined for an unknown method. */
export function methodParameters(method: string): readonly ParameterSpec[] | undefined {
  return registry.get(method);
}

/** Global and per-model parameter names a method reads, or undefined for an unknown method. */
export function knownParameterNames(method: string): { global: string[]; perModel: string[] } | undefined {
  const specs = registry.get(method);
  if (!specs) return undefined;
  return {
    global: specs.filter((p) => p.kind === 'global').map((p) => p.name),
    perModel: specs.filter((p) => p.kind === 'model').map((p) => p.name),
  };
}

/** Spec of one parameter of a method. */
export function parameterSpec(method: string, name: string): ParameterSpec | undefined {
  return registry.get(method)?.find((p) => p.name === name);
}
