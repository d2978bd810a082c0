/**
 * Training the DAM coefficients: each step draws a batch of every source's own sequences (seeded
 * per-source samplers), computes the whole DAM loss and its gradient (`damLossStep`), clips the
 * global gradient norm and takes one optimiser step on the float32 coefficients; the merged
 * weights are materialised again at the next forward. `runDam` does the whole job from a recipe:
 * load the sources, tokenise each source's data with its own tokenizer, train, bake.
 */
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { AmalgamError } from '../errors.js';
import { BatchSampler, encodeExamples, packWindows } from '../data/batching.js';
import { readDataset } from '../data/datasets.js';
import { loadTokenizer } from '../data/tokenizer.js';
import { readHfConfig } from '../io/hf.js';
import { checkOutputFolder } from '../io/atomic-dir.js';
import { Rng } from '../tensor/rng.js';
import { clipGradNorm, gradNorm, type OptimParam } from '../train/optimizer.js';
import { bakeDam, DAM_CONFIG, type DamBakeResult, type DamRunInfo } from './bake.js';
import { damLossStep, resolveLossOptions, teacherTopK, type DamBatch, type DamLossOptions, type RegulariserValues, type TopKLogits } from './loss.js';
import { DamModel } from './model.js';
import { createDamOptimizer, type DamOptimizerOptions } from './optim.js';
import { damRecipeAsRun, type DamRecipe } from './recipe.js';

/** One source's data: the input sequences it is distilled on. */
export interface DamSourceData {
  /** Token ids fed as they are (windows, or examples padded to the longest in a batch). */
  sequences: readonly ArrayLike<number>[];
  /** What the data is, for the model card. */
  description?: string;
}

export interface DamTrainOptions {
  /** Optimiser steps (default: epochs × ⌈fewest sequences of any source / batchSize⌉). */
  steps?: number;
  /** Default 1. */
  epochs?: number;
  /** Sequences per source per step (default 1). */
  batchSize?: number;
  /** Constant learning rate (default 1e-3). */
  lr?: number;
  /** Default MoFO-AdamW (α 0.3, weight decay 1e-2). */
  optimizer?: Omit<DamOptimizerOptions, 'lr'>;
  /** Global gradient-norm clip (default 1; 0 disables). */
  clip?: number;
  loss?: DamLossOptions;
  /** Divide each source's term by its value on the first step's batch (default false). */
  normalizeKl?: boolean;
  /** Teachers from cached top-k logits (computed once per sequence) instead of the full vocabulary. */
  topK?: number | null;
  /** Longest sequence fed (longer ones are cut; default 2048). */
  maxLength?: number;
  /** Id written into padding (default 0; padded positions are masked). */
  padId?: number;
  /** Seed of the data order (default 0). */
  seed?: number;
  onStep?: (s: DamStepInfo) => void;
}

export interface DamStepInfo {
  step: number;
  steps: number;
  /** The whole loss of the step (scaled terms + regularisers). */
  loss: number;
  /** Each source's term (unscaled), e.g. its KL. */
  perSource: number[];
  regularisers: RegulariserValues;
  gradNorm: number;
  lr: number;
  /** Real tokens through the merged model so far, per source. */
  tokens: number[];
  elapsedSeconds: number;
}

export interface DamTrainResult {
  steps: number;
  losses: number[];
  /** perSource[step][i]. */
  perSource: number[][];
  /** The divisors of normalizeKl (the first step's terms), or null. */
  initialTerms: number[] | null;
  /** Real tokens seen per source. */
  tokens: number[];
  seconds: number;
  coefficientCount: number;
}

function checkInt(name: string, v: number, min: number): void {
  if (!Number.isSafeInteger(v) || v < min) throw new AmalgamError('E_USAGE', `${name} must be an integer ≥ ${min}, got ${v}`);
}

/** A right-padded batch of sequences (each cut to maxLength). */
export function damBatch(seqs: readonly ArrayLike<number>[], padId: number, maxLength: number): DamBatch {
  const B = seqs.length;
  const lengths = seqs.map((s) => Math.min(s.length, maxLength));
  const T = Math.max(...lengths);
  if (!(T >= 1)) throw new AmalgamError('E_USAGE', 'a DAM batch needs a non-empty sequence');
  const ids = new Int32Array(B * T).fill(padId);
  seqs.forEach((s, b) => {
    for (let t = 0; t < lengths[b]!; t++) ids[b * T + t] = s[t]!;
  });
  return { ids, batch: B, seqLen: T, lengths: Int32Array.from(lengths) };
}

function optimParam(p: { name: string; data: Float32Array; grad: Float32Array | null }): OptimParam {
  if (!p.grad) throw new AmalgamError('E_USAGE', 'coefficient is not trainable', { key: p.name });
  return { name: p.name, data: p.data, grad: p.grad };
}

/** Trains the DAM model's coefficients in place on each source's own data. */
export async function trainDam(dam: DamModel, data: readonly DamSourceData[], opts: DamTrainOptions = {}): Promise<DamTrainResult> {
  const n = dam.numSources;
  if (data.length !== n) throw new AmalgamError('E_USAGE', `${data.length} datasets given for ${n} sources (one per source)`);
  data.forEach((d, i) => {
    if (d.sequences.length === 0) throw new AmalgamError('E_USAGE', `source ${i} (${dam.sourceIds[i]}) has no training sequences`);
  });
  const batchSize = opts.batchSize ?? 1;
  const epochs = opts.epochs ?? 1;
  const maxLength = opts.maxLength ?? 2048;
  const padId = opts.padId ?? 0;
  const seed = opts.seed ?? 0;
  const clip = opts.clip ?? 1;
  const lr = opts.lr ?? 1e-3;
  checkInt('batch size', batchSize, 1);
  checkInt('epochs', epochs, 1);
  checkInt('max length', maxLength, 1);
  const fewest = Math.min(...data.map((d) => d.sequences.length));
  const steps = opts.steps ?? epochs * Math.ceil(fewest / batchSize);
  checkInt('steps', steps, 1);
  const loss = resolveLossOptions(opts.loss);
  const topK = opts.topK ?? null;
  if (topK !== null) checkInt('top-k', topK, 1);

  const coeffs = dam.coefficients();
  if (coeffs.length === 0) throw new AmalgamError('E_USAGE', 'the DAM model has no coefficients to train', { hint: 'target some linear layers, or enable embeddings or norms' });
  const params = coeffs.map(optimParam);
  const optim = createDamOptimizer(params, { ...(opts.optimizer ?? {}), lr });
  const master = new Rng(seed);
  const samplers = data.map((d) => new BatchSampler(d.sequences.length, batchSize, { seed: master.nextU32() }));
  const cache: Map<number, TopKLogits>[] = data.map(() => new Map());
  const V = dam.config.vocabSize;

  /** Cached top-k teacher logits for a batch, computing those of unseen sequences first. */
  const cachedTeacher = (i: number, idx: number[], b: DamBatch): TopKLogits => {
    const c = cache[i]!;
    const T = b.seqLen;
    if (idx.some((k) => !c.has(k))) {
      const logits = dam.teacherForward(i, b.ids, b.batch, T);
      idx.forEach((k, r) => {
        if (c.has(k)) return;
        const len = b.lengths ? b.lengths[r]! : T;
        c.set(k, teacherTopK(logits.subarray(r * T * V, (r * T + len) * V), len, V, topK!));
      });
    }
    const out: TopKLogits = { k: topK!, rows: b.batch * T, indices: new Int32Array(b.batch * T * topK!), values: new Float32Array(b.batch * T * topK!) };
    idx.forEach((k, r) => {
      const e = c.get(k)!;
      out.indices.set(e.indices, r * T * topK!);
      out.values.set(e.values, r * T * topK!);
    });
    return out;
  };

  const losses: number[] = [];
  const perSource: number[][] = [];
  const tokens = data.map(() => 0);
  let initialTerms: number[] | null = null;
  const t0 = performance.now();
  for (let step = 0; step < steps; step++) {
    const picks = samplers.map((s) => s.next());
    const batches = picks.map((idx, i) =>
      damBatch(
        idx.map((k) => data[i]!.sequences[k]!),
        padId,
        maxLength,
      ),
    );
    const teachers = topK !== null && loss.objective !== 'entropy' ? batches.map((b, i) => cachedTeacher(i, picks[i]!, b)) : undefined;
    if (opts.normalizeKl && initialTerms === null) {
      const v = damLossStep(dam, batches, loss, { teachers, backward: false });
      initialTerms = v.perSource;
    }
    const scales = initialTerms ? initialTerms.map((v) => (v > 1e-12 ? 1 / v : 1)) : undefined;
    dam.zeroGrad();
    const v = damLossStep(dam, batches, loss, { teachers, scales });
    v.tokens.forEach((c, i) => (tokens[i]! += c));
    const norm = clip > 0 ? clipGradNorm(params, clip) : gradNorm(params);
    optim.step(lr);
    dam.coefficientsChanged();
    losses.push(v.total);
    perSource.push(v.perSource);
    opts.onStep?.({
      step: step + 1,
      steps,
      loss: v.total,
      perSource: v.perSource,
      regularisers: v.regularisers,
      gradNorm: norm,
      lr,
      tokens: tokens.slice(),
      elapsedSeconds: (performance.now() - t0) / 1000,
    });
    await new Promise<void>((r) => setImmediate(r));
  }
  dam.zeroGrad();
  return { steps, losses, perSource, initialTerms, tokens, seconds: (performance.now() - t0) / 1000, coefficientCount: dam.coefficientCount };
}

/**
 * Checks that every source of the recipe is a model folder with config.json, before anything is
 * read, with errors that name the folder and the recipe key.
 */
export async function checkDamModelFolders(recipe: DamRecipe, baseDir = '.'): Promise<void> {
  for (const [i, m] of recipe.models.entries()) {
    const dir = resolve(baseDir, m.model);
    const key = `models.${i}.model`;
    let isDir: boolean;
    try {
      isDir = (await stat(dir)).isDirectory();
    } catch (e) {
      throw new AmalgamError('E_IO', 'the model does not exist', {
        file: dir,
        key,
        hint: `give a Hugging Face model folder, with config.json and *.safetensors weights; relative paths are resolved against the recipe's folder, ${resolve(baseDir)}`,
        cause: e,
      });
    }
    if (!isDir) throw new AmalgamError('E_IO', 'expected a model folder, got a file', { file: dir, key, hint: 'give a Hugging Face model folder; `amalgam convert` turns GGUF and llama2.c files into one' });
    await readHfConfig(dir);
  }
}

/** Reads and tokenises each recipe source's data with that source's tokenizer. */
export async function loadDamData(recipe: DamRecipe, baseDir = '.'): Promise<DamSourceData[]> {
  await checkDamModelFolders(recipe, baseDir);
  const out: DamSourceData[] = [];
  for (const m of recipe.models) {
    const modelDir = resolve(baseDir, m.model);
    const path = resolve(baseDir, m.data.path);
    const tok = await loadTokenizer(modelDir);
    const ds = await readDataset(path, {
      format: m.data.format,
      txtMode: m.data.txtMode,
      textFields: m.data.textFields,
      textSeparator: m.data.textSeparator,
      header: m.data.header,
      labelField: null,
    });
    const L = recipe.data.maxLength;
    let seqs: Int32Array[];
    if (recipe.data.packing) {
      seqs = packWindows(
        encodeExamples(tok, ds.examples, { bos: true }).map((e) => e.ids),
        L,
      ).map((w) => w.subarray(0, L));
    } else {
      seqs = encodeExamples(tok, ds.examples, { bos: true, maxLength: Math.max(2, L) })
        .map((e) => e.ids)
        .filter((s) => s.length >= 1);
    }
    if (recipe.data.examples !== null) seqs = seqs.slice(0, recipe.data.examples);
    if (seqs.length === 0) throw new AmalgamError('E_USAGE', `no training sequence from the data of ${m.model}`, { file: path, hint: recipe.data.packing ? `the data holds fewer than ${L + 1} tokens` : undefined });
    out.push({ sequences: seqs, description: `${m.data.description ?? path} (${seqs.length} ${recipe.data.packing ? `windows of ${L} tokens` : 'sequences'})` });
  }
  return out;
}

export interface RunDamOptions {
  /** Folder the recipe's relative paths are resolved against (default: the working folder). */
  baseDir?: string;
  /** Bake the result here (default: train only). */
  outDir?: string;
  overwrite?: boolean;
  /** Optimiser steps (overrides train.steps). */
  steps?: number;
  /** The recipe text, written into the output as dam_config.yml with absolute paths and `steps` applied. */
  recipeYaml?: string;
  /** The recipe's file, named in dam_config.yml. */
  recipeFile?: string;
  onStep?: (s: DamStepInfo) => void;
}

export interface RunDamResult extends DamTrainResult {
  bake?: DamBakeResult;
}

/** The whole DAM job of a recipe: load, tokenise, train, and (with `outDir`) bake. */
export async function runDam(recipe: DamRecipe, opts: RunDamOptions = {}): Promise<RunDamResult> {
  const baseDir = opts.baseDir ?? '.';
  const folders = recipe.models.map((m) => resolve(baseDir, m.model));
  // Everything the run reads: the output may not be or hold any of it.
  const inputs = [...folders, ...recipe.models.map((m) => resolve(baseDir, m.data.path)), ...(opts.recipeFile ? [opts.recipeFile] : [])];
  if (opts.outDir) await checkOutputFolder(opts.outDir, { overwrite: opts.overwrite, inputs });
  const data = await loadDamData(recipe, baseDir);
  const dam = await DamModel.fromFolders(folders, { ...recipe.merge, seed: recipe.train.seed });
  try {
    const optimizer: DamOptimizerOptions = {
      kind: recipe.train.optimizer,
      betas: recipe.train.betas,
      eps: recipe.train.eps,
      alpha: recipe.train.mofoAlpha,
      ...(recipe.train.weightDecay !== undefined ? { weightDecay: recipe.train.weightDecay } : {}),
    };
    const { normalizeKl, topK, ...loss } = recipe.loss;
    const result = await trainDam(dam, data, {
      steps: opts.steps ?? recipe.train.steps,
      epochs: recipe.train.epochs,
      batchSize: recipe.train.batchSize,
      lr: recipe.train.lr,
      optimizer,
      clip: recipe.train.maxGradNorm,
      loss,
      normalizeKl,
      topK,
      maxLength: recipe.data.maxLength,
      seed: recipe.train.seed,
      onStep: opts.onStep,
    });
    if (!opts.outDir) return result;
    const info: DamRunInfo = {
      models: folders,
      data: data.map((d) => d.description ?? ''),
      loss: { ...recipe.loss },
      optimizer: { kind: optimizer.kind, lr: recipe.train.lr, ...optimizer, max_grad_norm: recipe.train.maxGradNorm },
      steps: result.steps,
      batchSize: recipe.train.batchSize,
      seed: recipe.train.seed,
      tokens: result.tokens,
      init: recipe.merge.init,
    };
    const bake = await bakeDam(dam, opts.outDir, {
      overwrite: opts.overwrite,
      inputs,
      dtype: recipe.output.dtype,
      outShardSize: recipe.output.shardSize,
      recipeYaml: opts.recipeYaml === undefined ? undefined : damRecipeAsRun(opts.recipeYaml, baseDir, { from: opts.recipeFile, steps: opts.steps, file: DAM_CONFIG }),
      info,
    });
    return { ...result, bake };
  } finally {
    dam.dispose();
  }
}
