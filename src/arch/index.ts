/** Architecture definitions, the registry, layout resolution and inference. */
export type { ArchitectureDef, WeightDef, WeightSection, ResolvedArchitecture, ResolvedWeight, TensorLike } from './types.js';
export { BUILTIN_ARCHITECTURES } from './definitions.js';
export { registerArchitecture, unregisterArchitecture, validateArchitecture, listArchitectures, getArchitecture } from './registry.js';
export { resolveArchitecture, findArchitecture, configIdentity, type ResolveOptions as ArchitectureResolveOptions, type ArchitectureChoice } from './resolve.js';
export { inferArchitecture, type InferOptions } from './infer.js';
export { expandTemplate, isLayerTemplate, configValue } from './templates.js';
