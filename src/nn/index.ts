/** The runtime: Llama-family model, layers, heads, losses, LoRA, generation and evaluation. */
export { type LlamaConfig, llamaConfigToHf, makeLlamaConfig, parseLlamaConfig } from './config.js';
export { Parameter, initLlamaParameters, llamaParameterShapes, loadLlamaParameters, type LoadParametersOptions } from './params.js';
export { Linear, type LinearCache, type LinearLayer, linearBackward, linearForward } from './layers/linear.js';
export { RopeTables } from './layers/rope.js';
export {
  type Block,
  type ForwardOptions,
  type ForwardOutput,
  type FromFolderOptions,
  KvCache,
  type LinearSlot,
  LlamaModel,
  type ModelOptions,
  defaultBackend,
} from './model.js';
export {
  type CausalLmLossOptions,
  type KlLossOptions,
  type LossResult,
  causalLmLoss,
  causalTargets,
  classificationLoss,
  klDivLoss,
  realTokenWeights,
} from './losses.js';
export { SCORE_WEIGHT, SequenceClassificationHead } from './heads.js';
export {
  type LoraFreeze,
  type LoraInitContext,
  LoraLinear,
  type LoraOptions,
  attachLora,
  detachLora,
  loraAdapterConfig,
  loraModules,
  loraStateDict,
  mergedLoraWeights,
} from './lora.js';
export { type GenerateOptions, type GenerateResult, argmax, generate, sample } from './generate.js';
export {
  type AccuracyResult,
  type ClassificationExample,
  type NllOptions,
  type NllResult,
  evaluateAccuracy,
  evaluateNll,
} from './eval.js';
