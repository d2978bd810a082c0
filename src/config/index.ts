/** Merge configuration: YAML parsing and validation, model references, parameter resolution. */
export * from './types.js';
export { ConfigError, isConfigError, formatPath } from './issues.js';
export type { ConfigIssue, PathSegment } from './issues.js';
export { parseMergeConfig, validateMergeConfig, loadMergeConfig } from './parse.js';
export { assertKnownParameters } from './validate.js';
export type { ParseConfigOptions } from './parse.js';
export {
  parseModelReference,
  tryParseModelReference,
  formatModelReference,
  makeModelReference,
  sameModel,
} from './model-ref.js';
export type { ModelReferenceResult } from './model-ref.js';
export {
  knownParameterNames,
  methodParameters,
  parameterSpec,
  mergeMethodNames,
  isKnownMergeMethod,
  registerMethodParameters,
  REMOVED_METHODS,
} from './methods.js';
export type { ParameterSpec, ParameterKind, ParameterValueType } from './methods.js';
export { evaluateSetting, gradientPosition, ParameterResolver, resolveParameter } from './parameters.js';
export type { TensorPosition, ParameterQuery, ParameterResolveOptions } from './parameters.js';
export {
  sliceLayout,
  baseModelFor,
  effectiveTokenizer,
  effectiveOutDtype,
  referencedModels,
  configContainer,
} from './layout.js';
export type { ConfigContainer, LayoutSlice, LayoutSource } from './layout.js';
export { DTYPES } from './schema.js';
export { editDistance, closestMatches, didYouMean } from './suggest.js';
