/**
 * The architecture registry: built-in definitions plus any registered at run time. Definitions
 * are validated and frozen when registered.
 */
import { AmalgamError } from '../errors.js';
import { BUILTIN_ARCHITECTURES } from './definitions.js';
import { expandTemplate, isLayerTemplate, unknownPlaceholders } from './templates.js';
import type { ArchitectureDef, WeightDef } from './types.js';

const registry = new Map<string, ArchitectureDef>();

function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o as object)) deepFreeze(v);
  }
  return o;
}

function copyWeight(w: WeightDef): WeightDef {
  const out: WeightDef = { name: w.name };
  if (w.isEmbed) out.isEmbed = true;
  if (w.optional) out.optional = true;
  if (w.aliases?.length) out.aliases = [...w.aliases];
  if (w.tiedNames?.length) out.tiedNames = [...w.tiedNames];
  if (w.vocabSizeKey !== undefined) out.vocabSizeKey = w.vocabSizeKey;
  return out;
}

function copyDefinition(def: ArchitectureDef): ArchitectureDef {
  const out: ArchitectureDef = {
    name: def.name,
    modelTypes: [...def.modelTypes],
    architectures: [...def.architectures],
    numLayersKey: def.numLayersKey,
    pre: def.pre.map(copyWeight),
    layer: def.layer.map(copyWeight),
    post: def.post.map(copyWeight),
  };
  if (def.vocabSizeKey !== undefined) out.vocabSizeKey = def.vocabSizeKey;
  if (def.ignore?.length) out.ignore = [...def.ignore];
  return out;
}

/**
 * Check a definition: non-empty name, layer templates that use `${layer_index}`, pre/post names
 * that do not, known placeholders only, no name claimed twice, valid ignore patterns.
 */
export function validateArchitecture(def: ArchitectureDef): void {
  const where = { file: `architecture '${def?.name ?? '?'}'` };
  const fail = (msg: string, key?: string): never => {
    throw new AmalgamError('E_ARCH', msg, { ...where, key, hint: 'fix the architecture definition' });
  };
  if (!def || typeof def.name !== 'string' || def.name.trim() === '') fail('definition has no name', 'name');
  if (!Array.isArray(def.modelTypes) || !Array.isArray(def.architectures)) fail('modelTypes and architectures must be arrays', 'architectures');
  if (typeof def.numLayersKey !== 'string' || def.numLayersKey === '') fail('numLayersKey must name a config key', 'numLayersKey');
  for (const section of ['pre', 'layer', 'post'] as const) {
    if (!Array.isArray(def[section])) fail(`${section} must be an array of weights`, section);
    for (const w of def[section]) {
      if (!w || typeof w.name !== 'string' || w.name === '') fail(`${section} has a weight without a name`, section);
      for (const n of [w.name, ...(w.aliases ?? []), ...(w.tiedNames ?? [])]) {
        const bad = unknownPlaceholders(n);
        if (bad.length) fail(`unknown placeholder ${bad[0]} (use \${layer_index} or \${num_layers})`, w.name);
      }
      const layered = isLayerTemplate(w.name);
      if (section === 'layer' && !layered) fail('layer weight does not contain ${layer_index}', w.name);
      if (section !== 'layer' && layered) fail(`${section} weight must not contain \${layer_index}`, w.name);
      for (const a of w.aliases ?? []) {
        if (isLayerTemplate(a) !== layered) fail(`alias '${a}' and the weight name disagree about \${layer_index}`, w.name);
      }
    }
  }
  for (const p of def.ignore ?? []) {
    try {
      new RegExp(p);
    } catch (e) {
      fail(`ignore pattern is not a valid regular expression: ${(e as Error).message}`, p);
    }
  }
  // No concrete name may belong to two weights (checked for a two-layer model).
  const seen = new Map<string, string>();
  const claim = (n: string, owner: string) => {
    const prev = seen.get(n);
    if (prev !== undefined && prev !== owner) fail(`name '${n}' is claimed by two weights ('${prev}' and '${owner}')`, n);
    if (prev === owner) fail(`name '${n}' is listed twice for the same weight`, n);
    seen.set(n, owner);
  };
  for (const w of [...def.pre, ...def.post]) {
    for (const n of [w.name, ...(w.aliases ?? [])]) claim(expandTemplate(n, undefined, 2), expandTemplate(w.name, undefined, 2));
  }
  for (let i = 0; i < 2; i++) {
    for (const w of def.layer) {
      const owner = expandTemplate(w.name, i, 2);
      for (const n of [w.name, ...(w.aliases ?? [])]) claim(expandTemplate(n, i, 2), owner);
    }
  }
}

/** Add a definition (validated, copied and frozen). Replacing a registered name needs `replace`. */
export function registerArchitecture(def: ArchitectureDef, opts: { replace?: boolean } = {}): ArchitectureDef {
  validateArchitecture(def);
  if (registry.has(def.name) && !opts.replace) {
    throw new AmalgamError('E_ARCH', 'an architecture with this name is already registered', {
      key: def.name,
      hint: 'choose another name, or pass { replace: true } to replace it',
    });
  }
  const frozen = deepFreeze(copyDefinition(def));
  registry.set(def.name, frozen);
  return frozen;
}

/** Remove a registered definition; returns whether it existed. */
export function unregisterArchitecture(name: string): boolean {
  return registry.delete(name);
}

/** Every registered definition, in registration order. */
export function listArchitectures(): ArchitectureDef[] {
  return [...registry.values()];
}

/**
 * A definition by registry name (case-insensitive), or else by a `config.json` class name
 * (`LlamaForCausalLM`) or `model_type`. Undefined when nothing matches.
 */
export function getArchitecture(name: string): ArchitectureDef | undefined {
  const exact = registry.get(name);
  if (exact) return exact;
  const lower = name.toLowerCase();
  const defs = listArchitectures();
  return (
    defs.find((d) => d.name.toLowerCase() === lower) ??
    defs.find((d) => d.architectures.includes(name)) ??
    defs.find((d) => d.modelTypes.includes(name))
  );
}

for (const def of BUILTIN_ARCHITECTURES) registerArchitecture(def);
