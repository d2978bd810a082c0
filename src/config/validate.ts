/**
 * Checks of a schema-valid configuration that span several keys or depend on the merge method:
 * exclusivity rules, slice lengths, parameter names and parameter value types. Checks that need
 * the models themselves (layer counts, shapes, input counts) belong to planning.
 */
import { AmalgamError } from '../errors.js';
import type { ConfigIssue, PathSegment } from './issues.js';
import { isKnownMergeMethod, mergeMethodNames, methodParameters, REMOVED_METHODS } from './methods.js';
import type { ParameterSpec } from './methods.js';
import { closestMatches } from './suggest.js';
import type {
  ConfigWarning,
  InputModelDefinition,
  MergeConfig,
  OutputSliceDefinition,
  ParameterMap,
  ParameterSetting,
  ScalarValue,
} from './types.js';

export interface SemanticCheckResult {
  issues: ConfigIssue[];
  warnings: (Omit<ConfigWarning, 'path'> & { path: PathSegment[] })[];
}

const isCondition = (v: unknown): v is { filter?: string; value: ParameterSetting } =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

function describe(v: ScalarValue): string {
  return typeof v === 'string' ? `the string ${JSON.stringify(v)}` : `${typeof v} ${String(v)}`;
}

const TYPE_WORDS: Record<ParameterSpec['type'], string> = {
  number: 'numbers',
  integer: 'integers',
  boolean: 'true or false',
};

function leafMatches(spec: ParameterSpec, v: ScalarValue): boolean {
  switch (spec.type) {
    case 'boolean':
      return typeof v === 'boolean';
    case 'integer':
      return typeof v === 'number' && Number.isInteger(v);
    case 'number':
      return typeof v === 'number';
  }
}

function checkLeaves(spec: ParameterSpec, setting: ParameterSetting, path: PathSegment[], out: ConfigIssue[]): void {
  const leaf = (v: ScalarValue, p: PathSegment[]) => {
    if (!leafMatches(spec, v)) {
      const hint =
        spec.type === 'boolean' && typeof v !== 'boolean'
          ? 'write true or false'
          : typeof v === 'string' && spec.type !== 'boolean' && v.trim() !== '' && Number.isFinite(Number(v))
            ? 'remove the quotes'
            : undefined;
      out.push({ path: p, message: `\`${spec.name}\` takes ${TYPE_WORDS[spec.type]}, got ${describe(v)}`, hint });
    }
  };
  if (Array.isArray(setting)) {
    setting.forEach((e, i) => {
      if (isCondition(e)) checkLeaves(spec, e.value, [...path, i, 'value'], out);
      else leaf(e, [...path, i]);
    });
  } else if (isCondition(setting)) {
    checkLeaves(spec, setting.value, [...path, 'value'], out);
  } else {
    leaf(setting, path);
  }
}

/** Why a method does not read a parameter users commonly set. */
const NOT_READ: Record<string, Record<string, string>> = {
  karcher: { weight: 'karcher weights are fixed at 1/N' },
  model_stock: { weight: 'model_stock computes its interpolation factor from the models' },
  slerp: { weight: 'slerp interpolates with the global `t`' },
};

/** Why `name` is not a parameter of `method`, with a suggestion; undefined when it is one. */
function unknownParameterHint(method: string, name: string): string | undefined {
  const specs = methodParameters(method);
  if (!specs || specs.some((s) => s.name === name)) return undefined;
  const names = specs.map((s) => s.name);
  const close = closestMatches(name, names, 1);
  return close.length
    ? `did you mean \`${close[0]}\`?`
    : NOT_READ[method]?.[name] ?? (names.length ? `\`${method}\` reads: ${names.join(', ')}` : `\`${method}\` takes no parameters`);
}

/**
 * Throws for the first name that is not a parameter of merge method `method` (outside YAML
 * configurations: command-line options, recipes), naming it as `where(name)` says, with the same
 * suggestion a configuration gets.
 */
export function assertKnownParameters(method: string, names: Iterable<string>, where: (name: string) => string): void {
  for (const name of names) {
    const hint = unknownParameterHint(method, name);
    if (hint !== undefined) throw new AmalgamError('E_CONFIG', `${where(name)}: unknown parameter \`${name}\` for merge method \`${method}\``, { hint });
  }
}

function checkParameters(
  method: string,
  map: ParameterMap | undefined,
  path: PathSegment[],
  perModelOnly: boolean,
  out: ConfigIssue[],
): void {
  if (!map) return;
  const specs = methodParameters(method);
  if (!specs) return;
  for (const [name, setting] of Object.entries(map)) {
    const p = [...path, name];
    const spec = specs.find((s) => s.name === name);
    if (!spec) {
      out.push({ path: p, message: `unknown parameter \`${name}\` for merge_method \`${method}\``, hint: unknownParameterHint(method, name)! });
      continue;
    }
    if (perModelOnly && spec.kind === 'global') {
      out.push({
        path: p,
        message: `\`${name}\` is a global parameter of \`${method}\`; a value given for one model is never read`,
        hint: "move it to the top-level or the slice's `parameters:`",
      });
      continue;
    }
    checkLeaves(spec, setting, p, out);
  }
}

interface Container {
  models?: InputModelDefinition[];
  slices?: OutputSliceDefinition[];
}

function checkExclusive(c: Container & { modules?: unknown }, path: PathSegment[], allowModules: boolean, out: ConfigIssue[]): void {
  const present: string[] = [];
  if (c.models && c.models.length) present.push('models');
  if (c.slices && c.slices.length) present.push('slices');
  if (allowModules && c.modules && Object.keys(c.modules).length) present.push('modules');
  const options = allowModules ? '`models`, `slices` or `modules`' : '`models` or `slices`';
  if (present.length === 0) {
    out.push({ path, message: `one of ${options} is required (and must not be empty)` });
  } else if (present.length > 1) {
    out.push({
      path: [...path, present[1]],
      message: `only one of ${options} may be given, found ${present.map((k) => `\`${k}\``).join(' and ')}`,
    });
  }
}

function checkContainer(
  method: string | undefined,
  c: Container,
  path: PathSegment[],
  res: SemanticCheckResult,
): void {
  c.models?.forEach((m, i) => {
    if (method) checkParameters(method, m.parameters, [...path, 'models', i, 'parameters'], true, res.issues);
  });
  c.slices?.forEach((s, i) => {
    const sp = [...path, 'slices', i];
    const lengths = s.sources.map((src) => src.layer_range[1] - src.layer_range[0]);
    s.sources.forEach((src, j) => {
      if (lengths[j] !== lengths[0]) {
        res.issues.push({
          path: [...sp, 'sources', j, 'layer_range'],
          message: `covers ${lengths[j]} layers but sources[0] covers ${lengths[0]}; all sources of a slice must cover the same number of layers`,
          hint: 'the end of layer_range is exclusive',
        });
      }
      if (method) checkParameters(method, src.parameters, [...sp, 'sources', j, 'parameters'], true, res.issues);
    });
    if (method) checkParameters(method, s.parameters, [...sp, 'parameters'], false, res.issues);
    if (s.residual_weight !== undefined) {
      res.warnings.push({ path: [...sp, 'residual_weight'], message: '`residual_weight` is accepted for compatibility and ignored' });
    }
  });
}

/** Cross-key and method-dependent checks of a configuration that passed the schema. */
export function checkMergeConfig(cfg: MergeConfig): SemanticCheckResult {
  const res: SemanticCheckResult = { issues: [], warnings: [] };
  let method: string | undefined = cfg.merge_method;
  if (!isKnownMergeMethod(cfg.merge_method)) {
    const removed = REMOVED_METHODS[cfg.merge_method];
    const close = closestMatches(cfg.merge_method, mergeMethodNames(), 3);
    res.issues.push({
      path: ['merge_method'],
      message: `unknown merge_method \`${cfg.merge_method}\``,
      hint:
        removed ??
        (close.length
          ? `did you mean ${close.map((c) => `\`${c}\``).join(' or ')}?`
          : `known methods: ${mergeMethodNames().join(', ')}`),
    });
    method = undefined;
  }

  checkExclusive(cfg, [], true, res.issues);
  if (cfg.tokenizer_source !== undefined && cfg.tokenizer !== undefined) {
    res.issues.push({
      path: ['tokenizer'],
      message: 'give either `tokenizer_source` or `tokenizer`, not both',
      hint: '`tokenizer_source: X` is shorthand for `tokenizer: {source: X}`',
    });
  }

  checkContainer(method, cfg, [], res);
  for (const [name, mod] of Object.entries(cfg.modules ?? {})) {
    const mp: PathSegment[] = ['modules', name];
    checkExclusive(mod, mp, false, res.issues);
    checkContainer(method, mod, mp, res);
    if (method) checkParameters(method, mod.parameters, [...mp, 'parameters'], false, res.issues);
  }
  if (method) checkParameters(method, cfg.parameters, ['parameters'], false, res.issues);
  return res;
}
