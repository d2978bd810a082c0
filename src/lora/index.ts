/** LoRA adapters: writing, applying (baking and read-time application), combining and extracting. */
export * from './peft-write.js';
export {
  AdaptedTensorSource,
  addLoraDelta,
  bakeAdapter,
  checkAdapterAgainstBase,
  checkAdapterForModel,
  checkTargetModules,
  loraDelta,
  openAdaptedSource,
  type AdapterAction,
  type BakeOptions,
  type BakeProgress,
  type BakeResult,
} from './apply.js';
export {
  catFactors,
  checkCombineParams,
  combineAdapters,
  COMBINE_MERGE_METHODS,
  factorize,
  linearFactors,
  LINEAR_CROSS_TERM_WARNING,
  writeLoraAdapter,
  type AdapterModuleFactors,
  type CombinedModule,
  type CombineInput,
  type CombineMergeMethod,
  type CombineMethod,
  type CombineOptions,
  type CombineResult,
  type FactorizeResult,
  type WriteLoraAdapterOptions,
} from './combine.js';
export { extractLora, type ExtractedTensor, type ExtractOptions, type ExtractResult } from './extract.js';
