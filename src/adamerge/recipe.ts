/**
 * The AdaMerging recipe. Relative paths are resolved against the recipe's folder.
 *
 * ```yaml
 * base_model: ../models/stories260K/stories260K.gguf   # HF folder, or GGUF / llama2.c file
 * models: [experts/a, experts/b]
 * data: [ ... ]                  # unlabelled sequences, one entry per source (evolve/data.ts)
 * test: [ ... ]                  # optional: scored before and after
 * granularity: layer             # or task
 * init: 0.3
 * clamp: [0, 1]
 * train: {lr: 1.0e-3, steps: 500, batch_size: 16, betas: [0.9, 0.999], eps: 1.0e-8, seed: 0, max_length: 2048}
 * eval_batch_size: 16
 * output: {dtype: float32}
 * ```
 */
import { dirname, resolve } from 'node:path';
import { stringify as stringifyYaml } from 'yaml';
import { z } from 'zod';
import { AmalgamError } from '../errors.js';
import type { FloatDType } from '../tensor/dtype.js';
import { resolveTextData, textDataSchema, textDataYaml, type TextDataSpec } from '../evolve/data.js';
import { modelRefSchema, modelRefYaml, parseDtypeKey, parseYamlText, readRecipeText, recipeAsRun, recipeError, resolveModelRef, setIn, setListPaths, type ModelRef } from '../evolve/recipe.js';
import type { AdaMergeGranularity } from './adamerge.js';

export interface AdaMergeRecipe {
  baseModel: string;
  models: ModelRef[];
  data: TextDataSpec[];
  test: TextDataSpec[];
  granularity: AdaMergeGranularity;
  init: number;
  clamp: [number, number];
  train: { lr: number; steps: number; batchSize: number; betas: [number, number]; eps: number; seed: number; maxLength: number };
  evalBatchSize: number;
  output: { dtype?: FloatDType };
}

const num = z.number().refine(Number.isFinite, 'must be a finite number');

const schema = z.strictObject({
  base_model: z.string().min(1),
  models: z.array(modelRefSchema).min(1, 'AdaMerging needs at least one model'),
  data: z.array(textDataSchema).min(1, 'AdaMerging needs unlabelled data'),
  test: z.array(textDataSchema).default([]),
  granularity: z.enum(['layer', 'task']).default('layer'),
  init: num.default(0.3),
  clamp: z
    .tuple([num, num])
    .refine(([a, b]) => a <= b, 'must be [low, high] with low ≤ high')
    .default([0, 1]),
  train: z
    .strictObject({
      lr: num.refine((v) => v >= 0, 'must be ≥ 0').default(1e-3),
      steps: z.number().int().positive().default(500),
      batch_size: z.number().int().positive().default(16),
      betas: z.tuple([num, num]).default([0.9, 0.999]),
      eps: num.refine((v) => v >= 0, 'must be ≥ 0').default(1e-8),
      seed: z.number().int().nonnegative().default(0),
      max_length: z.number().int().min(2).default(2048),
    })
    .prefault({}),
  eval_batch_size: z.number().int().positive().default(16),
  output: z.strictObject({ dtype: z.string().optional() }).prefault({}),
});

/** Validates a parsed recipe (snake_case keys) and fills the defaults; paths resolve against `baseDir`. */
export function resolveAdaMergeRecipe(value: unknown, baseDir = '.', file?: string): AdaMergeRecipe {
  const r = schema.safeParse(value);
  if (!r.success) throw recipeError('AdaMerging', r.error.issues, file);
  const v = r.data;
  if (v.init < v.clamp[0] || v.init > v.clamp[1]) {
    throw new AmalgamError('E_CONFIG', `init: ${v.init} lies outside clamp [${v.clamp.join(', ')}]`, { file });
  }
  return {
    baseModel: resolve(baseDir, v.base_model),
    models: v.models.map((m) => resolveModelRef(m, baseDir)),
    data: v.data.map((d) => resolveTextData(d, baseDir)),
    test: v.test.map((d) => resolveTextData(d, baseDir)),
    granularity: v.granularity,
    init: v.init,
    clamp: [v.clamp[0], v.clamp[1]],
    train: { lr: v.train.lr, steps: v.train.steps, batchSize: v.train.batch_size, betas: [v.train.betas[0], v.train.betas[1]], eps: v.train.eps, seed: v.train.seed, maxLength: v.train.max_length },
    evalBatchSize: v.eval_batch_size,
    output: { ...(v.output.dtype !== undefined ? { dtype: parseDtypeKey(v.output.dtype, 'output.dtype', file) } : {}) },
  };
}

export function parseAdaMergeRecipe(text: string, baseDir = '.', file?: string): AdaMergeRecipe {
  return resolveAdaMergeRecipe(parseYamlText(text, file), baseDir, file);
}

/** Reads a recipe file; relative paths resolve against its folder. */
export async function loadAdaMergeRecipe(path: string): Promise<AdaMergeRecipe> {
  return parseAdaMergeRecipe(await readRecipeText(path, 'AdaMerging'), dirname(resolve(path)), path);
}

/** A resolved recipe in its YAML form (snake_case keys), for runs given no recipe text. */
export function adaMergeRecipeYaml(r: AdaMergeRecipe): Record<string, unknown> {
  return {
    base_model: r.baseModel,
    models: r.models.map(modelRefYaml),
    data: r.data.map(textDataYaml),
    test: r.test.map(textDataYaml),
    granularity: r.granularity,
    init: r.init,
    clamp: [...r.clamp],
    train: { lr: r.train.lr, steps: r.train.steps, batch_size: r.train.batchSize, betas: [...r.train.betas], eps: r.train.eps, seed: r.train.seed, max_length: r.train.maxLength },
    eval_batch_size: r.evalBatchSize,
    output: r.output.dtype !== undefined ? { dtype: r.output.dtype } : {},
  };
}

/**
 * `adamerge_config.yml`: the recipe text (or, without one, the resolved recipe) with every model
 * and data path absolute, as resolved for the run, and the steps of the command line.
 */
export function adaMergeRecipeAsRun(recipe: AdaMergeRecipe, opts: { text?: string; from?: string; steps?: number; file: string }): string {
  const text = opts.text ?? stringifyYaml(adaMergeRecipeYaml(recipe));
  return recipeAsRun(
    text,
    (v) => {
      v['base_model'] = recipe.baseModel;
      setListPaths(v, 'models', 'model', recipe.models.map((m) => m.path));
      setListPaths(v, 'data', 'path', recipe.data.map((d) => d.path));
      setListPaths(v, 'test', 'path', recipe.test.map((d) => d.path));
      if (opts.steps !== undefined) setIn(v, 'train', 'steps', opts.steps);
    },
    { command: 'adamerge', file: opts.file, from: opts.from, overrides: opts.steps !== undefined ? [`--steps ${opts.steps}`] : [] },
  );
}
