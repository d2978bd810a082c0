/** Evolutionary merging: CMA-ES over per-layer-group merge parameters, merged in memory. */
export { CmaEs, type CmaEsOptions, type CmaEsState, cmaesMinimize, type MinimizeOptions, type MinimizeResult, symmetricEigen } from './cma-es.js';
export { loadTextSequences, readTextDocuments, resolveTextData, textDataName, textDataSchema, type TextDataSpec, textDataYaml } from './data.js';
export { type DomainScores, type EvalSet, scoreDomains, scoreSequences, type ScoreOptions, type SequenceScore } from './fitness.js';
export { EVOLVE_METHOD_PARAMS, EVOLVE_METHODS, type EvolveMethod, type GenomeEntry, GroupedMerge, type GroupedMergeOptions } from './merge.js';
export { loadAnyModel, loadMergeModels, type LoadedMergeModels, modelIds } from './models.js';
export { EVOLVE_CONFIG, type EvolveEvalInfo, evolveMerge, type EvolveOptions, type EvolveResult, loadEvalSets, runEvolve, type RunEvolveOptions, type RunEvolveResult } from './evolve.js';
export { type EvolveRecipe, evolveRecipeAsRun, evolveRecipeYaml, loadEvolveRecipe, type ModelRef, parseEvolveRecipe, resolveEvolveRecipe } from './recipe.js';
export { fixed, markdownTable, secondsText, tokensText } from './report.js';
