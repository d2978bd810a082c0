/**
 * The evolutionary-merge recipe: the models, the merge method whose per-layer-group parameters are
 * searched, the fitness data and metric, and the CMA-ES settings. Relative paths are resolved
 * against the recipe's folder.
 *
 * ```yaml
 * base_model: ../models/stories260K/stories260K.gguf   # HF folder, or GGUF / llama2.c file
 * models: [experts/a, experts/b, {model: experts/c, name: c}]
 * merge_method: task_arithmetic      # linear | task_arithmetic | ties | dare_ties
 * layer_granularity: 1               # layers per group (0: all layers one group)
 * non_layer: separate                # embedding / final norm / lm_head: own group, or 'edges'
 * normalize: null                    # default: true except task_arithmetic
 * lambda: 1
 * allow_negative_weights: false
 * bounds: {weight: [0, 1], density: [0, 1]}
 * fitness: nll                       # or accuracy (next-token top-1)
 * data: [ ... ]                      # fitness data, one entry per domain (see data.ts)
 * test: [ ... ]                      # optional: reported, never searched on
 * cma: {evaluations: 100, sigma0: 0.1667, popsize: null, boundary: resample, seed: 0}
 * eval_batch_size: 16
 * output: {dtype: float32}
 * ```
 */
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { z } from 'zod';
import { AmalgamError } from '../errors.js';
import { parseFloatDType, type FloatDType } from '../tensor/dtype.js';
import { resolveTextData, textDataSchema, textDataYaml, type TextDataSpec } from './data.js';
import { EVOLVE_METHODS, type EvolveMethod } from './merge.js';

export interface ModelRef {
  path: string;
  name?: string;
}

export interface EvolveRecipe {
  baseModel: string | null;
  models: ModelRef[];
  method: EvolveMethod;
  layerGranularity: number;
  nonLayer: 'separate' | 'edges';
  normalize?: boolean;
  lambda: number;
  allowNegativeWeights: boolean;
  bounds: { weight: [number, number]; density: [number, number] };
  fitness: 'nll' | 'accuracy';
  data: TextDataSpec[];
  test: TextDataSpec[];
  cma: { evaluations: number; sigma0: number; popsize?: number; boundary: 'clip' | 'resample'; seed: number };
  evalBatchSize: number;
  output: { dtype?: FloatDType };
}

const num = z.number().refine(Number.isFinite, 'must be a finite number');
const range = z.tuple([num, num]).refine(([a, b]) => a < b, 'must be [low, high] with low < high');

export const modelRefSchema = z.union([z.string().min(1), z.strictObject({ model: z.string().min(1), name: z.string().min(1).optional() })]);

export function resolveModelRef(v: z.output<typeof modelRefSchema>, baseDir: string): ModelRef {
  if (typeof v === 'string') return { path: resolve(baseDir, v) };
  return { path: resolve(baseDir, v.model), ...(v.name !== undefined ? { name: v.name } : {}) };
}

/** Formats zod issues as `path: message` lines in an E_CONFIG error. */
export function recipeError(what: string, issues: readonly { path: PropertyKey[]; message: string }[], file?: string): AmalgamError {
  const lines = issues.map((i) => `${i.path.length ? i.path.map(String).join('.') : '(top level)'}: ${i.message}`);
  return new AmalgamError('E_CONFIG', `invalid ${what} recipe:\n  ${lines.join('\n  ')}`, { file });
}

export function parseDtypeKey(v: string | undefined, key: string, file?: string): FloatDType | undefined {
  if (v === undefined) return undefined;
  const d = parseFloatDType(v.replace(/^torch\./, ''));
  if (!d) throw new AmalgamError('E_CONFIG', `${key}: unknown dtype '${v}'`, { file, hint: 'use float32, bfloat16 or float16' });
  return d;
}

const schema = z.strictObject({
  base_model: z.union([z.string().min(1), z.null()]).default(null),
  models: z.array(modelRefSchema).min(2, 'merging needs at least 2 models'),
  merge_method: z.enum(EVOLVE_METHODS).default('task_arithmetic'),
  layer_granularity: z.number().int().nonnegative().default(1),
  non_layer: z.enum(['separate', 'edges']).default('separate'),
  normalize: z.union([z.boolean(), z.null()]).default(null),
  lambda: num.default(1),
  allow_negative_weights: z.boolean().default(false),
  bounds: z
    .strictObject({
      weight: range.default([0, 1]),
      density: range.refine(([a, b]) => a >= 0 && b <= 1, 'must lie in [0, 1]').default([0, 1]),
    })
    .prefault({}),
  fitness: z.enum(['nll', 'accuracy']).default('nll'),
  data: z.array(textDataSchema).min(1, 'the fitness needs data'),
  test: z.array(textDataSchema).default([]),
  cma: z
    .strictObject({
      evaluations: z.number().int().positive().default(100),
      sigma0: num.refine((v) => v > 0, 'must be positive').default(1 / 6),
      popsize: z.union([z.number().int().min(2), z.null()]).default(null),
      boundary: z.enum(['clip', 'resample']).default('resample'),
      seed: z.number().int().nonnegative().default(0),
    })
    .prefault({}),
  eval_batch_size: z.number().int().positive().default(16),
  output: z.strictObject({ dtype: z.string().optional() }).prefault({}),
});

/** Validates a parsed recipe (snake_case keys) and fills the defaults; paths resolve against `baseDir`. */
export function resolveEvolveRecipe(value: unknown, baseDir = '.', file?: string): EvolveRecipe {
  const r = schema.safeParse(value);
  if (!r.success) throw recipeError('evolve', r.error.issues, file);
  const v = r.data;
  if (v.merge_method !== 'linear' && v.base_model === null) {
    throw new AmalgamError('E_CONFIG', `base_model: ${v.merge_method} needs a base model`, { file, hint: 'set base_model, or use merge_method: linear' });
  }
  return {
    baseModel: v.base_model === null ? null : resolve(baseDir, v.base_model),
    models: v.models.map((m) => resolveModelRef(m, baseDir)),
    method: v.merge_method,
    layerGranularity: v.layer_granularity,
    nonLayer: v.non_layer,
    ...(v.normalize !== null ? { normalize: v.normalize } : {}),
    lambda: v.lambda,
    allowNegativeWeights: v.allow_negative_weights,
    bounds: { weight: v.bounds.weight, density: v.bounds.density },
    fitness: v.fitness,
    data: v.data.map((d) => resolveTextData(d, baseDir)),
    test: v.test.map((d) => resolveTextData(d, baseDir)),
    cma: { evaluations: v.cma.evaluations, sigma0: v.cma.sigma0, ...(v.cma.popsize !== null ? { popsize: v.cma.popsize } : {}), boundary: v.cma.boundary, seed: v.cma.seed },
    evalBatchSize: v.eval_batch_size,
    output: { ...(v.output.dtype !== undefined ? { dtype: parseDtypeKey(v.output.dtype, 'output.dtype', file) } : {}) },
  };
}

/** A YAML mapping as a plain object (an empty one for anything else). */
function asObject(v: unknown): Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : {};
}

/**
 * The recipe of a run, as written into its output folder (`*_config.yml`): the recipe text's
 * values with `edit` applied (paths made absolute, command-line overrides set), under a comment
 * that says so. The text's own comments are not kept. `overrides` lists the command-line options
 * applied, e.g. `--steps 10`.
 */
export function recipeAsRun(text: string, edit: (v: Record<string, unknown>) => void, o: { command: string; file: string; from?: string; overrides?: string[] }): string {
  const v = asObject(parseYamlText(text, o.from));
  edit(v);
  const header = [`# The recipe of this run${o.from ? ` (${o.from})` : ''}, with every path made absolute${o.overrides?.length ? '' : '.'}`];
  if (o.overrides?.length) header.push(`# and the command-line options applied: ${o.overrides.join(' ')}.`);
  header.push(`# Run it again from any folder: amalgam ${o.command} path/to/${o.file} --out DIR`);
  return `${header.join('\n')}\n${stringifyYaml(v, { lineWidth: 0 })}`;
}

/** Sets each entry of the list `v[key]` to its resolved path: a plain string, or the mapping's `field`. */
export function setListPaths(v: Record<string, unknown>, key: string, field: string, paths: readonly string[]): void {
  const list = v[key];
  if (!Array.isArray(list)) return;
  v[key] = list.map((e, i) => (i >= paths.length ? e : typeof e === 'string' ? paths[i] : { ...asObject(e), [field]: paths[i] }));
}

/** Sets `v[section][key]`, creating the section. */
export function setIn(v: Record<string, unknown>, section: string, key: string, value: unknown): void {
  v[section] = { ...asObject(v[section]), [key]: value };
}

/**
 * `evolve_config.yml`: the recipe text (or, without one, the resolved recipe) with every model and
 * data path absolute, as resolved for the run, and the evaluation budget of the command line.
 */
export function evolveRecipeAsRun(recipe: EvolveRecipe, opts: { text?: string; from?: string; evaluations?: number; file: string }): string {
  const text = opts.text ?? stringifyYaml(evolveRecipeYaml(recipe));
  return recipeAsRun(
    text,
    (v) => {
      if (typeof v['base_model'] === 'string' && recipe.baseModel !== null) v['base_model'] = recipe.baseModel;
      setListPaths(v, 'models', 'model', recipe.models.map((m) => m.path));
      setListPaths(v, 'data', 'path', recipe.data.map((d) => d.path));
      setListPaths(v, 'test', 'path', recipe.test.map((d) => d.path));
      if (opts.evaluations !== undefined) setIn(v, 'cma', 'evaluations', opts.evaluations);
    },
    { command: 'evolve', file: opts.file, from: opts.from, overrides: opts.evaluations !== undefined ? [`--evaluations ${opts.evaluations}`] : [] },
  );
}

/** A resolved recipe in its YAML form (snake_case keys), for runs given no recipe text. */
export function evolveRecipeYaml(r: EvolveRecipe): Record<string, unknown> {
  return {
    base_model: r.baseModel,
    models: r.models.map(modelRefYaml),
    merge_method: r.method,
    layer_granularity: r.layerGranularity,
    non_layer: r.nonLayer,
    normalize: r.normalize ?? null,
    lambda: r.lambda,
    allow_negative_weights: r.allowNegativeWeights,
    bounds: { weight: [...r.bounds.weight], density: [...r.bounds.density] },
    fitness: r.fitness,
    data: r.data.map(textDataYaml),
    test: r.test.map(textDataYaml),
    cma: { evaluations: r.cma.evaluations, sigma0: r.cma.sigma0, popsize: r.cma.popsize ?? null, boundary: r.cma.boundary, seed: r.cma.seed },
    eval_batch_size: r.evalBatchSize,
    output: r.output.dtype !== undefined ? { dtype: r.output.dtype } : {},
  };
}

/** A model reference in its YAML form: the path, or `{model, name}`. */
export function modelRefYaml(m: ModelRef): string | { model: string; name: string } {
  return m.name !== undefined ? { model: m.path, name: m.name } : m.path;
}

export function parseYamlText(text: string, file?: string): unknown {
  try {
    return parseYaml(text);
  } catch (e) {
    throw new AmalgamError('E_CONFIG', `not valid YAML: ${(e as Error).message}`, { file, cause: e });
  }
}

export async function readRecipeText(path: string, what: string): Promise<string> {
  try {
    return await readFile(path, 'utf8');
  } catch (e) {
    throw new AmalgamError('E_IO', `cannot read the ${what} recipe: ${(e as Error).message}`, { file: path, cause: e });
  }
}

/** Parses recipe YAML text; relative paths resolve against `baseDir`. */
export function parseEvolveRecipe(text: string, baseDir = '.', file?: string): EvolveRecipe {
  return resolveEvolveRecipe(parseYamlText(text, file), baseDir, file);
}

/** Reads a recipe file; relative paths resolve against its folder. */
export async function loadEvolveRecipe(path: string): Promise<EvolveRecipe> {
  return parseEvolveRecipe(await readRecipeText(path, 'evolve'), dirname(resolve(path)), path);
}
