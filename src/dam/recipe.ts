/**
 * The DAM recipe: a YAML file naming the source models, each with the data it is distilled on,
 * and the merge, loss, training and output settings. Defaults are the reference's (dam.md §3, §6).
 *
 * ```yaml
 * models:                      # N ≥ 2 models of one architecture, each with its own data
 *   - model: experts/shakespeare
 *     data: data/shakespeare.txt          # or {path, format, txt_mode, text_fields, text_separator, header, description}
 *   - model: experts/gsm8k
 *     data: {path: data/gsm8k.jsonl, text_fields: [question, answer]}
 * merge:   {targets: all-linear, embeddings: false, norms: false, non_linearity: tanh, init: reference, form: materialise}
 * data:    {max_length: 2048, packing: false, examples: 1729}
 * loss:    {objective: kl, temperature: 2, similarity: 0.01, l1: 0, l2: 0, overlap: 0,
 *           mse_weight: 1, entropy_weight: 0.1, normalize_kl: false, top_k: null}
 * train:   {optimizer: mofo, lr: 1e-3, mofo_alpha: 0.3, betas: [0.9, 0.999], eps: 1e-8,
 *           batch_size: 1, epochs: 1, max_grad_norm: 1, seed: 0}   # weight_decay: 1e-2 (mofo/adamw), steps
 * output:  {dtype: float32, shard_size: 5B}
 * ```
 */
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { AmalgamError } from '../errors.js';
import { recipeAsRun, setIn } from '../evolve/recipe.js';
import { parseSize } from '../merge/run.js';
import { parseFloatDType, type FloatDType } from '../tensor/dtype.js';
import type { DamNonLinearity } from './layer.js';
import type { DamObjective } from './loss.js';
import type { DamInit } from './model.js';
import type { DamOptimizerKind } from './optim.js';

export interface DamDataSpec {
  path: string;
  format?: 'txt' | 'jsonl' | 'tsv';
  txtMode?: 'lines' | 'blocks';
  textFields?: (string | number)[];
  textSeparator?: string;
  header?: boolean | 'auto';
  /** How the data is described in the model card (default: the path). */
  description?: string;
}

export interface DamRecipe {
  models: { model: string; data: DamDataSpec }[];
  merge: {
    targets: 'all-linear' | string[];
    embeddings: boolean;
    norms: boolean;
    nonLinearity: DamNonLinearity;
    init: DamInit;
    form: 'materialise' | 'gate';
  };
  data: {
    /** Truncation limit of an example, or the window length with packing. */
    maxLength: number;
    /** Pack each source's token stream into windows of maxLength inputs (else one sequence per example). */
    packing: boolean;
    /** Sequences used per source, the first ones in file order (null: all). */
    examples: number | null;
  };
  loss: {
    objective: DamObjective;
    temperature: number;
    cosine: number;
    l1: number;
    l2: number;
    overlap: number;
    mseWeight: number;
    entropyWeight: number;
    /** Divide each source's term by its value at the first step. */
    normalizeKl: boolean;
    /** Cache each teacher's top-k logits instead of running it on the full vocabulary every step. */
    topK: number | null;
  };
  train: {
    optimizer: DamOptimizerKind;
    lr: number;
    /** Default: 1e-2 for mofo and adamw, 0 for adam. */
    weightDecay?: number;
    mofoAlpha: number;
    betas: [number, number];
    eps: number;
    /** Sequences per source per step. */
    batchSize: number;
    epochs: number;
    /** Default: epochs × ⌈examples / batch_size⌉ (fewest examples of any source). */
    steps?: number;
    /** Global gradient-norm clip (0 disables). */
    maxGradNorm: number;
    seed: number;
  };
  output: { dtype?: FloatDType; shardSize?: number };
}

const num = z.number().refine(Number.isFinite, 'must be a finite number');
const nonNeg = num.refine((v) => v >= 0, 'must be ≥ 0');
const posInt = z.number().int().positive();

const dataSchema = z.union([
  z.string().min(1),
  z.strictObject({
    path: z.string().min(1),
    format: z.enum(['txt', 'jsonl', 'tsv']).optional(),
    txt_mode: z.enum(['lines', 'blocks']).optional(),
    text_fields: z.array(z.union([z.string(), z.number().int().nonnegative()])).min(1).optional(),
    text_separator: z.string().optional(),
    header: z.union([z.boolean(), z.literal('auto')]).optional(),
    description: z.string().optional(),
  }),
]);

const schema = z.strictObject({
  models: z.array(z.strictObject({ model: z.string().min(1), data: dataSchema })).min(2, 'DAM needs at least 2 models'),
  merge: z
    .strictObject({
      targets: z.union([z.literal('all-linear'), z.array(z.string().min(1)).min(1)]).default('all-linear'),
      embeddings: z.boolean().default(false),
      norms: z.boolean().default(false),
      non_linearity: z.enum(['tanh', 'sigmoid', 'identity', 'none']).default('tanh'),
      init: z.union([z.enum(['reference', 'soup', 'random']), num, z.array(num).min(2)]).default('reference'),
      form: z.enum(['materialise', 'gate']).default('materialise'),
    })
    .prefault({}),
  data: z
    .strictObject({
      max_length: z.number().int().min(2).default(2048),
      packing: z.boolean().default(false),
      examples: z.union([posInt, z.null()]).default(1729),
    })
    .prefault({}),
  loss: z
    .strictObject({
      objective: z.enum(['kl', 'mse', 'entropy']).default('kl'),
      temperature: num.refine((v) => v > 0, 'must be positive').default(2),
      similarity: nonNeg.default(0.01),
      l1: nonNeg.default(0),
      l2: nonNeg.default(0),
      overlap: nonNeg.default(0),
      mse_weight: nonNeg.default(1),
      entropy_weight: nonNeg.default(0.1),
      normalize_kl: z.boolean().default(false),
      top_k: z.union([posInt, z.null()]).default(null),
    })
    .prefault({}),
  train: z
    .strictObject({
      optimizer: z.enum(['mofo', 'adam', 'adamw']).default('mofo'),
      lr: nonNeg.default(1e-3),
      weight_decay: nonNeg.optional(),
      mofo_alpha: num.refine((v) => v > 0 && v <= 1, 'must be in (0, 1]').default(0.3),
      betas: z.tuple([num, num]).default([0.9, 0.999]),
      eps: nonNeg.default(1e-8),
      batch_size: posInt.default(1),
      epochs: posInt.default(1),
      steps: posInt.optional(),
      max_grad_norm: nonNeg.default(1),
      seed: z.number().int().nonnegative().default(0),
    })
    .prefault({}),
  output: z
    .strictObject({
      dtype: z.string().optional(),
      shard_size: z.union([z.string(), posInt]).optional(),
    })
    .prefault({}),
});

/** Validates a parsed recipe object (snake_case keys, as in the YAML) and fills the defaults. */
export function resolveDamRecipe(value: unknown, file?: string): DamRecipe {
  const r = schema.safeParse(value);
  if (!r.success) {
    const lines = r.error.issues.map((i) => `${i.path.length ? i.path.join('.') : '(top level)'}: ${i.message}`);
    throw new AmalgamError('E_CONFIG', `invalid DAM recipe:\n  ${lines.join('\n  ')}`, { file });
  }
  const v = r.data;
  if (v.train.optimizer === 'adam' && v.train.weight_decay) {
    throw new AmalgamError('E_CONFIG', 'train.weight_decay: Adam has no weight decay', { file, hint: 'use optimizer: adamw or mofo' });
  }
  if (Array.isArray(v.merge.init) && v.merge.init.length !== v.models.length) {
    throw new AmalgamError('E_CONFIG', `merge.init: ${v.merge.init.length} values for ${v.models.length} models`, { file });
  }
  let dtype: FloatDType | undefined;
  if (v.output.dtype !== undefined) {
    dtype = parseFloatDType(v.output.dtype.replace(/^torch\./, ''));
    if (!dtype) throw new AmalgamError('E_CONFIG', `output.dtype: unknown dtype '${v.output.dtype}'`, { file, hint: 'use float32, bfloat16 or float16' });
  }
  const shardSize = v.output.shard_size === undefined ? undefined : typeof v.output.shard_size === 'number' ? v.output.shard_size : parseSize(v.output.shard_size);
  return {
    models: v.models.map((m) => {
      const d = typeof m.data === 'string' ? { path: m.data } : m.data;
      const data: DamDataSpec = { path: d.path };
      if ('format' in d && d.format !== undefined) data.format = d.format;
      if ('txt_mode' in d && d.txt_mode !== undefined) data.txtMode = d.txt_mode;
      if ('text_fields' in d && d.text_fields !== undefined) data.textFields = d.text_fields;
      if ('text_separator' in d && d.text_separator !== undefined) data.textSeparator = d.text_separator;
      if ('header' in d && d.header !== undefined) data.header = d.header;
      if ('description' in d && d.description !== undefined) data.description = d.description;
      return { model: m.model, data };
    }),
    merge: {
      targets: v.merge.targets,
      embeddings: v.merge.embeddings,
      norms: v.merge.norms,
      nonLinearity: v.merge.non_linearity === 'none' ? 'identity' : v.merge.non_linearity,
      init: v.merge.init,
      form: v.merge.form,
    },
    data: { maxLength: v.data.max_length, packing: v.data.packing, examples: v.data.examples },
    loss: {
      objective: v.loss.objective,
      temperature: v.loss.temperature,
      cosine: v.loss.similarity,
      l1: v.loss.l1,
      l2: v.loss.l2,
      overlap: v.loss.overlap,
      mseWeight: v.loss.mse_weight,
      entropyWeight: v.loss.entropy_weight,
      normalizeKl: v.loss.normalize_kl,
      topK: v.loss.top_k,
    },
    train: {
      optimizer: v.train.optimizer,
      lr: v.train.lr,
      ...(v.train.weight_decay !== undefined ? { weightDecay: v.train.weight_decay } : {}),
      mofoAlpha: v.train.mofo_alpha,
      betas: v.train.betas,
      eps: v.train.eps,
      batchSize: v.train.batch_size,
      epochs: v.train.epochs,
      ...(v.train.steps !== undefined ? { steps: v.train.steps } : {}),
      maxGradNorm: v.train.max_grad_norm,
      seed: v.train.seed,
    },
    output: { ...(dtype ? { dtype } : {}), ...(shardSize !== undefined ? { shardSize } : {}) },
  };
}

/** Parses recipe YAML text. */
export function parseDamRecipe(text: string, file?: string): DamRecipe {
  let value: unknown;
  try {
    value = parseYaml(text);
  } catch (e) {
    throw new AmalgamError('E_CONFIG', `not valid YAML: ${(e as Error).message}`, { file, cause: e });
  }
  return resolveDamRecipe(value, file);
}

/** Reads and parses a recipe file. */
export async function loadDamRecipe(path: string): Promise<DamRecipe> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new AmalgamError('E_IO', `cannot read the DAM recipe: ${(e as Error).message}`, { file: path, cause: e });
  }
  return parseDamRecipe(text, path);
}

/**
 * `dam_config.yml`: the recipe text with every model and data path resolved against `baseDir`
 * (the recipe's folder, as the run resolved them) and the steps of the command line, so that it
 * runs again from any folder.
 */
export function damRecipeAsRun(text: string, baseDir: string, opts: { from?: string; steps?: number; file: string }): string {
  const obj = (v: unknown): Record<string, unknown> | null => (v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : null);
  const abs = (p: unknown) => (typeof p === 'string' ? resolve(baseDir, p) : p);
  return recipeAsRun(
    text,
    (v) => {
      if (Array.isArray(v['models'])) {
        v['models'] = v['models'].map((m: unknown) => {
          const e = obj(m);
          if (!e) return m;
          const d = obj(e['data']);
          return { ...e, model: abs(e['model']), data: d ? { ...d, path: abs(d['path']) } : abs(e['data']) };
        });
      }
      if (opts.steps !== undefined) setIn(v, 'train', 'steps', opts.steps);
    },
    { command: 'dam train', file: opts.file, from: opts.from, overrides: opts.steps !== undefined ? [`--steps ${opts.steps}`] : [] },
  );
}
