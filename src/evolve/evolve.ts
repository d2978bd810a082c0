/**
 * Evolutionary merging (spec dam.md §10.2; mergekit-evolve's parameter-space search): CMA-ES over
 * the per-layer-group parameters of a merge method, each candidate merged in memory and scored on
 * the fitness data (mean over domains of the validation NLL, or of the next-token accuracy),
 * within a budget of fitness evaluations. Compute is counted in forward-equivalent tokens.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { AmalgamError } from '../errors.js';
import { loadTokenizer } from '../data/tokenizer.js';
import { saveModelFolder } from '../train/checkpoint.js';
import { cmaesMinimize, type CmaEsOptions } from './cma-es.js';
import { loadTextSequences, textDataName, type TextDataSpec } from './data.js';
import { scoreDomains, type DomainScores, type EvalSet } from './fitness.js';
import { GroupedMerge, type GenomeEntry } from './merge.js';
import { loadMergeModels } from './models.js';
import { evolveRecipeAsRun, type EvolveRecipe } from './recipe.js';
import { checkOutputFolder } from '../io/atomic-dir.js';

export interface EvolveOptions {
  /** 'nll' (default): minimise the mean validation NLL; 'accuracy': maximise the mean next-token accuracy. */
  fitness?: 'nll' | 'accuracy';
  /** Budget in fitness evaluations (default 100, as mergekit-evolve's --max-fevals). */
  evaluations?: number;
  /** Initial step size (default 1/6, as mergekit-evolve's --sigma0). */
  sigma0?: number;
  popsize?: number;
  boundary?: CmaEsOptions['boundary'];
  /** Seed of CMA-ES (default 0). */
  seed?: number;
  /** Bounds per parameter (default weight [0, 1], density [0, 1]). */
  bounds?: { weight?: [number, number]; density?: [number, number] };
  /** Start genome (default: the merge's initial genome, weight 1/N and density 1). */
  start?: ArrayLike<number>;
  /** Sequences per forward when scoring (default 16). */
  batchSize?: number;
  onEval?: (e: EvolveEvalInfo) => void;
}

export interface EvolveEvalInfo {
  evaluation: number;
  evaluations: number;
  generation: number;
  /** This candidate's fitness and the best so far (lower is better; accuracy is negated). */
  fitness: number;
  best: number;
  forwardTokens: number;
  elapsedSeconds: number;
}

export interface EvolveResult {
  /** The best genome found (raw) and its decoded parameters. */
  genome: number[];
  parameters: GenomeEntry[];
  fitness: number;
  /** The best candidate's scores on the fitness data. */
  scores: DomainScores;
  evaluations: number;
  generations: number;
  stop: string;
  /** Best fitness after each evaluation. */
  bestHistory: number[];
  /** Forward-equivalent tokens of the whole search. */
  forwardTokens: number;
  seconds: number;
  dimension: number;
  popsize: number;
}

/** Searches the merge's genome with CMA-ES; the merged model holds the best candidate afterwards. */
export async function evolveMerge(merge: GroupedMerge, data: readonly EvalSet[], opts: EvolveOptions = {}): Promise<EvolveResult> {
  const fitnessKind = opts.fitness ?? 'nll';
  if (fitnessKind !== 'nll' && fitnessKind !== 'accuracy') throw new AmalgamError('E_USAGE', `unknown fitness '${String(fitnessKind)}'`, { hint: 'use nll or accuracy' });
  const evaluations = opts.evaluations ?? 100;
  const { lower, upper } = merge.genomeBounds({ weight: opts.bounds?.weight ?? [0, 1], density: opts.bounds?.density ?? [0, 1] });
  const x0 = opts.start ? Float64Array.from(opts.start) : merge.initialGenome();
  let forwardTokens = 0;
  const bestRef: { fitness: number; scores: DomainScores | null } = { fitness: Infinity, scores: null };
  const t0 = performance.now();
  const fitnessOf = (s: DomainScores) => (fitnessKind === 'nll' ? s.meanNll : -s.meanAccuracy);
  const r = await cmaesMinimize(
    async (x) => {
      merge.apply(x);
      const s = scoreDomains(merge.model, data, { batchSize: opts.batchSize });
      forwardTokens += s.forwardTokens;
      const f = fitnessOf(s);
      const v = Number.isFinite(f) ? f : Infinity;
      if (bestRef.scores === null || v < bestRef.fitness) {
        bestRef.fitness = v;
        bestRef.scores = s;
      }
      return v;
    },
    x0,
    {
      sigma0: opts.sigma0 ?? 1 / 6,
      popsize: opts.popsize,
      seed: opts.seed ?? 0,
      lower,
      upper,
      boundary: opts.boundary,
      maxEvals: evaluations,
      onEval: async (e) => {
        opts.onEval?.({
          evaluation: e.evaluation,
          evaluations,
          generation: e.generation,
          fitness: e.fitness,
          best: e.best,
          forwardTokens,
          elapsedSeconds: (performance.now() - t0) / 1000,
        });
        await new Promise<void>((res) => setImmediate(res));
      },
    },
  );
  if (!bestRef.scores) throw new AmalgamError('E_USAGE', 'no candidate was evaluated');
  merge.apply(r.x);
  return {
    genome: Array.from(r.x),
    parameters: merge.decode(r.x),
    fitness: r.fitness,
    scores: bestRef.scores,
    evaluations: r.evaluations,
    generations: r.generations,
    stop: r.stop,
    bestHistory: r.bestHistory,
    forwardTokens,
    seconds: (performance.now() - t0) / 1000,
    dimension: merge.dimension,
    popsize: r.es.lambda,
  };
}

/** Loads every data spec's sequences with one tokenizer, as named evaluation sets. */
export async function loadEvalSets(specs: readonly TextDataSpec[], tokenizerDir: string): Promise<EvalSet[]> {
  const tok = await loadTokenizer(tokenizerDir);
  const out: EvalSet[] = [];
  for (const s of specs) out.push({ name: textDataName(s), sequences: await loadTextSequences(s, tok) });
  return out;
}

/** The recipe as run, in the output folder. */
export const EVOLVE_CONFIG = 'evolve_config.yml';

export interface RunEvolveOptions {
  /** Write the best merge here (a Hugging Face folder plus evolve.json). */
  outDir?: string;
  overwrite?: boolean;
  /** The recipe text, written into the output as evolve_config.yml with absolute paths and `evaluations` applied. */
  recipeYaml?: string;
  /** The recipe's file, named in evolve_config.yml. */
  recipeFile?: string;
  /** Override the recipe's budget. */
  evaluations?: number;
  onEval?: (e: EvolveEvalInfo) => void;
  /** Progress lines (loading, scoring). */
  log?: (line: string) => void;
}

export interface RunEvolveResult extends EvolveResult {
  method: string;
  groups: string[];
  models: string[];
  /** Scores of the start genome and the best genome on the test data (when the recipe has some). */
  test?: { start: DomainScores; best: DomainScores };
  outDir?: string;
}

/** The whole evolutionary merge of a recipe: load, search, score on the test data, write. */
export async function runEvolve(recipe: EvolveRecipe, opts: RunEvolveOptions = {}): Promise<RunEvolveResult> {
  const log = opts.log ?? (() => {});
  // Everything the run reads: the output may not be or hold any of it.
  const inputs = [...[...(recipe.baseModel ? [recipe.baseModel] : []), ...recipe.models.map((m) => m.path)], ...recipe.data.map((d) => d.path), ...recipe.test.map((d) => d.path), ...(opts.recipeFile ? [opts.recipeFile] : [])];
  if (opts.outDir) await checkOutputFolder(opts.outDir, { overwrite: opts.overwrite, inputs });
  const loaded = await loadMergeModels(
    recipe.method === 'linear' ? null : recipe.baseModel,
    recipe.models.map((m) => m.path),
    recipe.models.map((m) => m.name),
  );
  try {
    const tokDir = recipe.models[0]!.path;
    const data = await loadEvalSets(recipe.data, tokDir);
    const test = recipe.test.length ? await loadEvalSets(recipe.test, tokDir) : [];
    log(`fitness data: ${data.map((d) => `${d.name} (${d.sequences.length})`).join(', ')}`);
    const merge = new GroupedMerge(
      loaded.base,
      loaded.models,
      {
        method: recipe.method,
        layerGranularity: recipe.layerGranularity,
        nonLayer: recipe.nonLayer,
        normalize: recipe.normalize,
        lambda: recipe.lambda,
        allowNegativeWeights: recipe.allowNegativeWeights,
        seed: recipe.cma.seed,
        backend: loaded.backend,
      },
      { base: loaded.baseId ?? undefined, models: loaded.ids },
    );
    try {
      let startTest: DomainScores | undefined;
      if (test.length) {
        merge.apply(merge.initialGenome());
        startTest = scoreDomains(merge.model, test, { batchSize: recipe.evalBatchSize });
      }
      const r = await evolveMerge(merge, data, {
        fitness: recipe.fitness,
        evaluations: opts.evaluations ?? recipe.cma.evaluations,
        sigma0: recipe.cma.sigma0,
        popsize: recipe.cma.popsize,
        boundary: recipe.cma.boundary,
        seed: recipe.cma.seed,
        bounds: recipe.bounds,
        batchSize: recipe.evalBatchSize,
        onEval: opts.onEval,
      });
      const result: RunEvolveResult = { ...r, method: recipe.method, groups: [...merge.groups], models: [...loaded.ids] };
      if (startTest) result.test = { start: startTest, best: scoreDomains(merge.model, test, { batchSize: recipe.evalBatchSize }) };
      if (opts.outDir) {
        result.outDir = await saveModelFolder(merge.model, tokDir, opts.outDir, { dtype: recipe.output.dtype, overwrite: opts.overwrite, inputs });
        await writeFile(join(result.outDir, 'evolve.json'), JSON.stringify(result, null, 2) + '\n');
        await writeFile(join(result.outDir, EVOLVE_CONFIG), evolveRecipeAsRun(recipe, { text: opts.recipeYaml, from: opts.recipeFile, evaluations: opts.evaluations, file: EVOLVE_CONFIG }));
      }
      return result;
    } finally {
      merge.dispose();
    }
  } finally {
    loaded.dispose();
  }
}
