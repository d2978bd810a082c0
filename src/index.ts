/** amalgam: the public API. */
export * from './errors.js';
export * from './tensor/dtype.js';
export * from './io/source.js';
export * from './io/safetensors.js';
export * from './io/atomic-dir.js';
export { parseStrictJson, StrictJsonError } from './io/strict-json.js';
export type { JsonValue } from './io/strict-json.js';
export * from './arch/index.js';
export * from './io/hf.js';
export * from './io/peft.js';
export { Rng } from './tensor/rng.js';
export * from './io/gguf.js';
export * from './io/llama2c.js';
export * from './tokenizer/vocab.js';
export * from './tokenizer/hf.js';
export * from './convert/permute.js';
export * from './convert/names.js';
export * from './convert/to-hf.js';
export * from './convert/model-input.js';
export * from './config/index.js';
export {
  MERGE_METHODS,
  getMergeMethod,
  hasMergeMethod,
  validateMerge,
  prepareParams,
  mergeTensor,
  resolveParams,
  weightedModels,
} from './merge/registry.js';
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
  ResolvedParams,
  ValidateContext,
  RawParams,
} from './merge/registry.js';
export {
  sparsify,
  applyMask,
  magnitudeMask,
  magnitudeOutliersMask,
  dellaProbabilities,
  checkDellaEpsilon,
  rngMaskSource,
  givenMaskSource,
  tensorRng,
  RESCALE_EPS,
  type SparsifyMethod,
  type SparsifyOptions,
} from './merge/sparsify.js';
export { makeGtaMethod, combineTaskVectors, type GtaVariant, type ConsensusMethod } from './merge/gta.js';
export * from './tokenizer/merge.js';
export * from './merge/embed.js';
export * from './nn/index.js';
export * from './merge/index.js';
export * from './backend/index.js';
export * from './train/optimizer.js';
export * from './train/schedule.js';
export * from './train/trainer.js';
export * from './train/checkpoint.js';
export * from './train/evaluate.js';
export * from './train/generate-text.js';
export { parseLoraSpec, DEFAULT_LORA } from './train/options.js';
export * from './data/tokenizer.js';
export * from './data/datasets.js';
export * from './data/batching.js';
export * from './data/domain.js';
export * from './lora/index.js';
export * from './tensor/linalg.js';
export { inspectPath, type InspectReport, type InspectTensor, type InspectKind } from './inspect.js';
export { writeSyntheticLlama, llamaTensorSpecs, type SyntheticLlamaOptions, type SyntheticLlama } from './demo/synthetic.js';
export { runDemo, type DemoResult } from './demo/demo.js';
export * from './dam/index.js';
export * from './evolve/index.js';
export * from './adamerge/index.js';
export * from './osrm/index.js';
