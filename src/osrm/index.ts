/** OSRM: orthogonal-subspace LoRA initialisation, its statistics, and the merge experiment. */
export {
  type CollectOptions,
  type FeatureGroup,
  type FeaturePooling,
  type GroupStats,
  type TaskFeatureStats,
  collectFeatureStats,
  featureGroups,
  featureMean,
  featureSecondMoment,
  groupStats,
  inputSourceOf,
  statsFloats,
} from './stats.js';
export {
  type GroupInit,
  type LoraInitKind,
  type OsrmMode,
  type OsrmOptions,
  type TaskInit,
  LORA_INIT_KINDS,
  covarianceModeBasis,
  derivedSeed,
  loraInitHook,
  meanModeBasis,
  moduleMatrices,
  orthonormalControlInit,
  orthonormalityError,
  osrmInit,
  othersSecondMoment,
  randomOrthonormalBasis,
  rayleighQuotients,
  rowSpaceBasis,
  seededOrthonormal,
} from './init.js';
export { type EigenJob, type EigenReply, osrmInitParallel } from './parallel.js';
export { type OsrmRecipe, type OsrmRecipeInput, type ResolvedOsrmRecipe, initName, osrmRecipeSchema, parseOsrmRecipe, readOsrmRecipe } from './recipe.js';
export {
  type OsrmInitOutput,
  type OsrmInitTask,
  type OsrmRunOptions,
  type PipelineTask,
  type RunOsrmInitOptions,
  checkInit,
  collectTaskStats,
  loadPipelineTasks,
  mergeTaskVectors,
  resolveModelFolder,
  runOsrmInit,
  runOsrmPipeline,
  variantInits,
} from './pipeline.js';
export { type InitCheck, type MergeRecord, type OsrmReport, type RunRecord, type SelectivityRecord, type Spread, type SummaryRow, combineReports, formatOsrmMarkdown, spread, summarize } from './report.js';
