/**
 * The `amalgam osrm run` recipe: a YAML file validated with zod. Relative input paths (model,
 * data) are resolved against the recipe's folder, the output folder against the working
 * directory. docs/osrm.md lists every key.
 */
import { readFile } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { assertKnownParameters } from '../config/validate.js';
import { methodParameters } from '../config/methods.js';
import { AmalgamError, isAmalgamError, type ErrorCode } from '../errors.js';
import { getMergeMethod, hasMergeMethod, mergeMethodNames, prepareParams, type RawParams } from '../merge/registry.js';
import { LORA_INIT_KINDS, type LoraInitKind } from './init.js';

const positiveInt = z.number().int().positive();

/**
 * Names used as one component of an output path (tasks, initialisation variants): letters,
 * digits, `_`, `.` and `-`, not starting with `.` or `-` (so never `.`, `..` or a hidden folder).
 */
export const SAFE_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/;
export const SAFE_NAME_RULE = 'letters, digits, _ . and - only, starting with a letter, digit or _';

const taskSchema = z.strictObject({
  name: z.string().regex(SAFE_NAME, `task names may hold ${SAFE_NAME_RULE}`),
  train: z.string(),
  eval: z.string(),
  num_labels: positiveInt.min(2).optional(),
  max_length: positiveInt.min(2).default(64),
  /** right: keep the first tokens; left: BOS and the last tokens. */
  truncation: z.enum(['right', 'left']).default('right'),
  text_field: z.union([z.string(), z.array(z.string())]).optional(),
  label_field: z.string().optional(),
  /** Use only the first N training examples of the file. */
  train_limit: positiveInt.optional(),
  /** Use only the first N evaluation examples of the file. */
  eval_limit: positiveInt.optional(),
});

const loraSchema = z.strictObject({
  r: positiveInt.default(8),
  alpha: z.number().finite().default(16),
  targets: z.array(z.string()).min(1).default(['q_proj', 'v_proj']),
  rslora: z.boolean().default(false),
});

const osrmSchema = z.strictObject({
  /** Training samples per task streamed for the statistics (reference: 100). */
  samples: positiveInt.default(100),
  /** Seed of the shuffle that picks them (reference: 42). */
  shuffle_seed: z.number().int().nonnegative().default(42),
  /** real-tokens (default) or all-positions (every position up to the task's max_length, padding included: the reference code). */
  pooling: z.enum(['real-tokens', 'all-positions']).default('real-tokens'),
  /** Covariance mode on centred features. */
  center: z.boolean().default(false),
  /** Mean mode: divide sums by n or n − 1 (reference). */
  divisor: z.enum(['n', 'n-1']).default('n'),
  batch_size: positiveInt.default(16),
});

const trainSchema = z.strictObject({
  steps: positiveInt.default(250),
  batch_size: positiveInt.default(32),
  micro_batch: positiveInt.optional(),
  lr: z.number().positive().default(1e-2),
  schedule: z.enum(['cosine', 'linear', 'constant']).default('linear'),
  warmup: z.number().nonnegative().default(0.06),
  min_lr_ratio: z.number().min(0).max(1).default(0),
  clip: z.number().nonnegative().default(0),
  weight_decay: z.number().nonnegative().default(0),
});

const initSchema = z.strictObject({
  /** Also the adapters' folder name under adapters/seed-S/. */
  name: z.string().regex(SAFE_NAME, `variant names may hold ${SAFE_NAME_RULE}`).optional(),
  init: z.enum(LORA_INIT_KINDS as [LoraInitKind, ...LoraInitKind[]]),
  freeze: z.enum(['none', 'A', 'B']).default('none'),
});

const mergeSchema = z.strictObject({
  name: z.string().optional(),
  method: z.string().refine((m) => hasMergeMethod(m), { message: `unknown merge method; one of: ${mergeMethodNames().join(', ')}` }),
  /** Scales λ tried; the best one (highest average merged accuracy) is reported. */
  lambdas: z.array(z.number().finite()).min(1).default([0.3, 0.5, 0.7, 1.0]),
  /** Further parameters of the method (global, e.g. density, normalize). */
  parameters: z.record(z.string(), z.union([z.number(), z.boolean()])).default({}),
});

export const osrmRecipeSchema = z.strictObject({
  /** A Hugging Face model folder, or a GGUF / llama2.c file converted into the output folder. */
  model: z.string(),
  tasks: z.array(taskSchema).min(2),
  lora: loraSchema.default(loraSchema.parse({})),
  osrm: osrmSchema.default(osrmSchema.parse({})),
  train: trainSchema.default(trainSchema.parse({})),
  inits: z
    .array(initSchema)
    .min(1)
    .default([
      { init: 'standard', freeze: 'none' },
      { init: 'orthonormal-control', freeze: 'A' },
      { init: 'osrm-covariance', freeze: 'A' },
    ]),
  merges: z.array(mergeSchema).min(1).default([{ method: 'task_arithmetic', lambdas: [0.3, 0.5, 0.7, 1.0], parameters: {} }]),
  seeds: z.array(z.number().int().nonnegative()).min(1).default([0]),
  evaluation: z
    .strictObject({
      batch_size: positiveInt.default(32),
      /** Evaluation samples per task for the selectivity diagnostic's feature statistics. */
      diagnostic_samples: positiveInt.default(100),
    })
    .default({ batch_size: 32, diagnostic_samples: 100 }),
  output: z
    .strictObject({
      dir: z.string().default('osrm-out'),
      save_adapters: z.boolean().default(true),
      overwrite: z.boolean().default(false),
    })
    .default({ dir: 'osrm-out', save_adapters: true, overwrite: false }),
});

export type OsrmRecipeInput = z.input<typeof osrmRecipeSchema>;
export type OsrmRecipe = z.output<typeof osrmRecipeSchema>;
export type RecipeTask = OsrmRecipe['tasks'][number];
export type RecipeInit = OsrmRecipe['inits'][number] & { name: string };
export type RecipeMerge = OsrmRecipe['merges'][number] & { name: string };

/** Default name of an initialisation variant: the kind, with the frozen factor. */
export function initName(i: { name?: string; init: LoraInitKind; freeze: 'none' | 'A' | 'B' }): string {
  return i.name ?? (i.freeze === 'none' ? i.init : `${i.init}+freeze-${i.freeze}`);
}

/** The name of the merges' base model: the task vectors are differences from the base, so it is zero. */
export const MERGE_BASE = '__base__';

/**
 * What one point of a merge's λ grid passes to the merge method: the recipe's `parameters`, and λ
 * as the method's `lambda` (every task weighted 1) or, for a method without one, as every task's
 * weight. `models` lists the inputs, the base (when the method reads one) first; `setByGrid`, the
 * parameters λ fills in.
 */
export function mergeGridParams(
  method: string,
  parameters: Readonly<Record<string, number | boolean>>,
  lambda: number,
  tasks: readonly string[],
): { models: string[]; base: string | null; raw: RawParams; setByGrid: string[] } {
  const m = getMergeMethod(method);
  const hasLambda = 'lambda' in m.globalParams;
  const base = m.needsBase !== 'none' ? MERGE_BASE : null;
  const perModel: Record<string, Record<string, unknown>> = {};
  for (const t of tasks) perModel[t] = { weight: hasLambda ? 1 : lambda };
  const global: Record<string, unknown> = { ...parameters };
  if (hasLambda) global['lambda'] = lambda;
  return { models: base ? [base, ...tasks] : [...tasks], base, raw: { global, perModel }, setByGrid: hasLambda ? ['lambda', 'weight'] : ['weight'] };
}

/** Throws for a seed listed twice (every seed runs the whole grid once), naming the list as `where`. */
export function assertDistinctSeeds(seeds: readonly number[], where: string, code: ErrorCode = 'E_CONFIG'): void {
  const seen = new Set<number>();
  for (const s of seeds) {
    if (seen.has(s)) throw new AmalgamError(code, `${where}: seed ${s} is listed twice`, { hint: 'every seed trains and merges everything once; list each seed once' });
    seen.add(s);
  }
}

/**
 * Checks merge `i` of a recipe before anything runs: parameter names the method reads, none the λ
 * grid sets itself or the method ignores, no λ twice, and the values the method accepts for these
 * tasks (types, ranges such as density in [0, 1], model counts).
 */
function checkRecipeMerge(merge: RecipeMerge, i: number, tasks: readonly string[], file?: string): void {
  const at = `${file ? `${file}: ` : ''}merges[${i}]`;
  const names = Object.keys(merge.parameters);
  assertKnownParameters(merge.method, names, (name) => `${at}.parameters.${name}`);
  const specs = methodParameters(merge.method) ?? [];
  const grid = mergeGridParams(merge.method, merge.parameters, merge.lambdas[0]!, tasks);
  for (const name of names) {
    if (grid.setByGrid.includes(name)) {
      throw new AmalgamError('E_CONFIG', `${at}.parameters.${name}: set by the λ grid, so a value here is never read`, {
        hint: name === 'lambda' ? `list the values under merges[${i}].lambdas` : `every task's weight is ${grid.setByGrid.includes('lambda') ? '1 (λ scales the merge)' : 'λ'}; list the values under merges[${i}].lambdas`,
      });
    }
    if (specs.find((s) => s.name === name)?.ignored) {
      throw new AmalgamError('E_CONFIG', `${at}.parameters.${name}: merge method \`${merge.method}\` accepts \`${name}\` but ignores it`, { hint: 'remove it' });
    }
  }
  const lambdas = new Set<number>();
  for (const lambda of merge.lambdas) {
    if (lambdas.has(lambda)) throw new AmalgamError('E_CONFIG', `${at}.lambdas: λ ${lambda} is listed twice`, { hint: 'list each λ once' });
    lambdas.add(lambda);
    const p = mergeGridParams(merge.method, merge.parameters, lambda, tasks);
    try {
      prepareParams(merge.method, { tensorName: `merges[${i}]`, models: p.models, base: p.base }, p.raw);
    } catch (e) {
      if (isAmalgamError(e)) throw new AmalgamError('E_CONFIG', `${e.message}${lambda !== merge.lambdas[0] ? ` (at λ ${lambda})` : ''}`, { file, cause: e });
      throw e;
    }
  }
}

/**
 * Validates a parsed recipe and fills names; resolves relative input paths against `baseDir`
 * and the output folder against `cwd`.
 */
export function parseOsrmRecipe(raw: unknown, baseDir = process.cwd(), file?: string, cwd = process.cwd()): OsrmRecipe & { inits: RecipeInit[]; merges: RecipeMerge[] } {
  const r = osrmRecipeSchema.safeParse(raw);
  if (!r.success) {
    const lines = r.error.issues.map((i) => `  ${i.path.length ? i.path.join('.') : '(top level)'}: ${i.message}`);
    throw new AmalgamError('E_CONFIG', `invalid OSRM recipe:\n${lines.join('\n')}`, { file });
  }
  const rec = r.data;
  const abs = (p: string) => (isAbsolute(p) ? p : resolve(baseDir, p));
  const names = new Set<string>();
  for (const t of rec.tasks) {
    if (names.has(t.name)) throw new AmalgamError('E_CONFIG', `task ${t.name} is listed twice`, { file });
    names.add(t.name);
  }
  const inits = rec.inits.map((i) => ({ ...i, name: initName(i) }));
  const merges = rec.merges.map((m) => ({ ...m, name: m.name ?? m.method }));
  for (const [what, list] of [['inits', inits], ['merges', merges]] as const) {
    const seen = new Set<string>();
    for (const x of list) {
      if (seen.has(x.name)) throw new AmalgamError('E_CONFIG', `${what}: the name ${x.name} is used twice (set name:)`, { file });
      seen.add(x.name);
    }
  }
  merges.forEach((m, i) => checkRecipeMerge(m, i, rec.tasks.map((t) => t.name), file));
  assertDistinctSeeds(rec.seeds, file ? `${file}: seeds` : 'seeds');
  if (rec.osrm.center && !rec.inits.some((i) => i.init === 'osrm-covariance')) {
    throw new AmalgamError('E_CONFIG', 'osrm.center: applies to osrm-covariance initialisations only, and inits lists none', {
      file,
      hint: 'remove osrm.center, or add { init: osrm-covariance } to inits',
    });
  }
  if (rec.osrm.divisor !== 'n' && !rec.inits.some((i) => i.init === 'osrm-mean')) {
    throw new AmalgamError('E_CONFIG', 'osrm.divisor: applies to osrm-mean initialisations only, and inits lists none', {
      file,
      hint: 'remove osrm.divisor, or add { init: osrm-mean } to inits',
    });
  }
  return {
    ...rec,
    model: abs(rec.model),
    tasks: rec.tasks.map((t) => ({ ...t, train: abs(t.train), eval: abs(t.eval) })),
    inits,
    merges,
    output: { ...rec.output, dir: resolve(cwd, rec.output.dir) },
  };
}

export type ResolvedOsrmRecipe = ReturnType<typeof parseOsrmRecipe>;

/** Reads and validates a recipe YAML file. */
export async function readOsrmRecipe(path: string): Promise<ResolvedOsrmRecipe> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new AmalgamError('E_IO', `cannot read the recipe: ${(e as Error).message}`, { file: path, cause: e });
  }
  let raw: unknown;
  try {
    raw = parseYaml(text);
  } catch (e) {
    throw new AmalgamError('E_CONFIG', `not valid YAML: ${(e as Error).message}`, { file: path, cause: e });
  }
  return parseOsrmRecipe(raw, dirname(resolve(path)), path);
}
