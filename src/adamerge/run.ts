/**
 * `runAdaMerge`: the whole AdaMerging job of a recipe: load the base and the models, tokenise the
 * unlabelled data and the test data, train the coefficients, score, and write the merge.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { scoreDomains, type DomainScores } from '../evolve/fitness.js';
import { loadEvalSets } from '../evolve/evolve.js';
import { loadMergeModels } from '../evolve/models.js';
import { saveModelFolder } from '../train/checkpoint.js';
import { AdaMergeModel, trainAdaMerge, type AdaMergeStepInfo, type AdaMergeTrainResult } from './adamerge.js';
import { adaMergeRecipeAsRun, type AdaMergeRecipe } from './recipe.js';
import { checkOutputFolder } from '../io/atomic-dir.js';

/** The recipe as run, in the output folder. */
export const ADAMERGE_CONFIG = 'adamerge_config.yml';

export interface RunAdaMergeOptions {
  /** Write the merge here (a Hugging Face folder plus adamerge.json). */
  outDir?: string;
  overwrite?: boolean;
  /** The recipe text, written into the output as adamerge_config.yml with absolute paths and `steps` applied. */
  recipeYaml?: string;
  /** The recipe's file, named in adamerge_config.yml. */
  recipeFile?: string;
  /** Override the recipe's steps. */
  steps?: number;
  onStep?: (s: AdaMergeStepInfo) => void;
  log?: (line: string) => void;
}

export interface RunAdaMergeResult extends AdaMergeTrainResult {
  models: string[];
  /** Names of the unlabelled data sources, in order. */
  data: string[];
  granularity: string;
  /** Mean coefficient of each model, and every coefficient. */
  meanLambda: number[];
  lambdas: { row: string; model: string; lambda: number }[];
  /** Test scores at the initial coefficients and after training (when the recipe has test data). */
  test?: { start: DomainScores; end: DomainScores };
  outDir?: string;
}

export async function runAdaMerge(recipe: AdaMergeRecipe, opts: RunAdaMergeOptions = {}): Promise<RunAdaMergeResult> {
  const log = opts.log ?? (() => {});
  // Everything the run reads: the output may not be or hold any of it.
  const inputs = [...[recipe.baseModel, ...recipe.models.map((m) => m.path)], ...recipe.data.map((d) => d.path), ...recipe.test.map((d) => d.path), ...(opts.recipeFile ? [opts.recipeFile] : [])];
  if (opts.outDir) await checkOutputFolder(opts.outDir, { overwrite: opts.overwrite, inputs });
  const loaded = await loadMergeModels(
    recipe.baseModel,
    recipe.models.map((m) => m.path),
    recipe.models.map((m) => m.name),
  );
  try {
    const tokDir = recipe.models[0]!.path;
    const data = await loadEvalSets(recipe.data, tokDir);
    const test = recipe.test.length ? await loadEvalSets(recipe.test, tokDir) : [];
    log(`unlabelled data: ${data.map((d) => `${d.name} (${d.sequences.length})`).join(', ')}`);
    const am = new AdaMergeModel(loaded.base!, loaded.models, { granularity: recipe.granularity, init: recipe.init, clamp: recipe.clamp, backend: loaded.backend }, loaded.ids);
    try {
      let start: DomainScores | undefined;
      if (test.length) {
        am.materialise();
        start = scoreDomains(am.model, test, { batchSize: recipe.evalBatchSize });
      }
      const r = await trainAdaMerge(am, data, {
        steps: opts.steps ?? recipe.train.steps,
        batchSize: recipe.train.batchSize,
        lr: recipe.train.lr,
        betas: recipe.train.betas,
        eps: recipe.train.eps,
        seed: recipe.train.seed,
        maxLength: recipe.train.maxLength,
        onStep: opts.onStep,
      });
      am.materialise();
      const result: RunAdaMergeResult = { ...r, models: [...loaded.ids], data: data.map((d) => d.name), granularity: am.granularity, meanLambda: am.meanPerModel(), lambdas: am.table() };
      if (start) result.test = { start, end: scoreDomains(am.model, test, { batchSize: recipe.evalBatchSize }) };
      if (opts.outDir) {
        am.model.setTrainable(() => false);
        result.outDir = await saveModelFolder(am.model, tokDir, opts.outDir, { dtype: recipe.output.dtype, overwrite: opts.overwrite, inputs });
        await writeFile(join(result.outDir, 'adamerge.json'), JSON.stringify(result, null, 2) + '\n');
        await writeFile(join(result.outDir, ADAMERGE_CONFIG), adaMergeRecipeAsRun(recipe, { text: opts.recipeYaml, from: opts.recipeFile, steps: opts.steps, file: ADAMERGE_CONFIG }));
      }
      return result;
    } finally {
      am.dispose();
    }
  } finally {
    loaded.dispose();
  }
}
