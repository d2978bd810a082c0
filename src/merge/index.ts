/** The merge engine: method registry, planner, executor, output files and `runMerge`. */
export {
  MERGE_METHODS,
  getMergeMethod,
  hasMergeMethod,
  mergeMethodNames as registeredMergeMethods,
  mergeTensor,
  prepareParams,
  resolveParams,
  validateMerge,
  weightedModels,
} from './registry.js';
export type {
  BaseRequirement,
  MaskRequest,
  MaskSource,
  MergeContext,
  MergeInput,
  MergeMethod,
  MergeOutput,
  ParamSpec,
  ParamValue,
  RawParams,
  ResolvedParams,
  ValidateContext,
} from './registry.js';
export { tensorRng, givenMaskSource, rngMaskSource } from './sparsify.js';
export { planMerge, configToYaml, tensorCost, embeddingPermutation } from './plan.js';
export type { MergePlan, PlannedModel, PlannedInput, PlannedTensor, PlannedSlice, PlanStats, PlanOptions, PlannedPermutation, PlannedTokenizer } from './plan.js';
export { executeMerge, defaultJobs } from './execute.js';
export type { ExecuteOptions, ExecuteResult, MergeProgress } from './execute.js';
export { modelCard, outputConfigJson, writeOutputFiles, AMALGAM_VERSION } from './output.js';
export type { OutputFileOptions } from './output.js';
export { runMerge, parseSize, formatPlanSummary, formatMergeReport, removeStaleStaging } from './run.js';
export type { RunMergeOptions, RunMergeResult } from './run.js';
