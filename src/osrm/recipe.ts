/**
 * The `amalgam osrm run` recipe: a YAML file validated with zod. Relative input paths (model,
 * data) are resolved against the recipe's folder, the output folder against the working
 * directory. docs/osrm.md lists every key.
 */
import { readFile } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { AmalgamError } from '../errors.js';
import { hasMergeMethod, mergeMethodNames } from '../merge/registry.js';
import { LORA_INIT_KINDS, type LoraInitKind } from './init.js';

const positiveInt = z.number().int().positive();

const taskSchema = z.strictObject({
  name: z.string().regex(/^[A-Za-z0-9_.-]+$/, 'task names may hold letters, digits, _ . and - only'),
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
  name: z.string().optional(),
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
