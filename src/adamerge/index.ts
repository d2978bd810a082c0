/** AdaMerging: task-vector coefficients learned by entropy minimisation on unlabelled data. */
export {
  AdaMergeModel,
  type AdaMergeGranularity,
  type AdaMergeOptions,
  type AdaMergeStepInfo,
  type AdaMergeTrainOptions,
  type AdaMergeTrainResult,
  entropyLoss,
  trainAdaMerge,
} from './adamerge.js';
export { adaMergeRecipeAsRun, adaMergeRecipeYaml, type AdaMergeRecipe, loadAdaMergeRecipe, parseAdaMergeRecipe, resolveAdaMergeRecipe } from './recipe.js';
export { ADAMERGE_CONFIG, runAdaMerge, type RunAdaMergeOptions, type RunAdaMergeResult } from './run.js';
