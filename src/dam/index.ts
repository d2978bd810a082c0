/** DAM, Differentiable Adaptive Merging: the model, its loss, optimisers, training, baking and recipes. */
export {
  type Activation,
  averageInto,
  damActivation,
  DamLinear,
  type DamLinearSource,
  damMergeBackward,
  damMergeForward,
  DAM_NON_LINEARITIES,
  type DamNonLinearity,
} from './layer.js';
export {
  checkSameArchitecture,
  DAM_LINEAR_MODULES,
  type DamInit,
  DamModel,
  type DamOptions,
  type DamTensor,
  type DamTensorKind,
  type DamTensorSpec,
  planDamTensors,
} from './model.js';
export {
  type DamBatch,
  DAM_LOSS_DEFAULTS,
  type DamLossOptions,
  damLossStep,
  type DamLossStepOptions,
  type DamLossValue,
  type DamObjective,
  damRegularisers,
  damSourceLoss,
  regularisedGroups,
  type RegulariserValues,
  resolveLossOptions,
  type SourceLossOptions,
  teacherTopK,
  type TopKLogits,
} from './loss.js';
export { createDamOptimizer, type DamOptimizer, type DamOptimizerKind, type DamOptimizerOptions, MoFOAdamW, type MoFOAdamWOptions } from './optim.js';
export {
  checkDamModelFolders,
  damBatch,
  type DamSourceData,
  type DamStepInfo,
  type DamTrainOptions,
  type DamTrainResult,
  loadDamData,
  runDam,
  type RunDamOptions,
  type RunDamResult,
  trainDam,
} from './train.js';
export {
  bakeDam,
  bakeFromMergers,
  DAM_CONFIG,
  type DamBakeFromMergersOptions,
  type DamBakeOptions,
  type DamBakeResult,
  damModelCard,
  type DamRunInfo,
  FINGERPRINTS_KEY,
  MERGERS_FILE,
  weightsFingerprint,
} from './bake.js';
export { type DamDataSpec, type DamRecipe, damRecipeAsRun, loadDamRecipe, parseDamRecipe, resolveDamRecipe } from './recipe.js';
