/**
 * Expanding a definition into a concrete layout for a layer count, and checking it against a
 * checkpoint's tensor names.
 */
import { AmalgamError } from '../errors.js';
import { listArchitectures } from './registry.js';
import { configValue, expandTemplate, listNames } from './templates.js';
import type { ArchitectureDef, ResolvedArchitecture, ResolvedWeight, TensorLike, WeightDef, WeightSection } from './types.js';

/** Names of the registered definitions, for hints. */
export function registeredSummary(): string {
  return listArchitectures()
    .map((d) => d.name)
    .join(', ');
}

export interface BuildLayoutOptions {
  file?: string;
  inferred: boolean;
  reason: string;
  allowUnmatched?: boolean;
  warnings?: string[];
  ignored?: string[];
  /** Overrides the tie decision (inferred layouts, whose head may be absent altogether). */
  tieWordEmbeddings?: boolean;
}

function readVocabSize(cfg: Record<string, unknown>, key: string): number | undefined {
  const v = configValue(cfg, key);
  return typeof v === 'number' && Number.isSafeInteger(v) && v > 0 ? v : undefined;
}

/** Expand a definition for `numLayers` layers and check it against the tensors, if given. */
export function buildLayout(
  def: ArchitectureDef,
  cfg: Record<string, unknown>,
  numLayers: number,
  tensors: readonly TensorLike[] | undefined,
  o: BuildLayoutOptions,
): ResolvedArchitecture {
  const archVocabKey = def.vocabSizeKey ?? 'vocab_size';
  const make = (w: WeightDef, section: WeightSection, layer: number | undefined): ResolvedWeight => {
    const rw: ResolvedWeight = {
      name: expandTemplate(w.name, layer, numLayers),
      template: w.name,
      section,
      isEmbed: !!w.isEmbed,
      optional: !!w.optional,
      aliases: (w.aliases ?? []).map((a) => expandTemplate(a, layer, numLayers)),
      tiedNames: (w.tiedNames ?? []).map((a) => expandTemplate(a, layer, numLayers)),
    };
    if (layer !== undefined) rw.layer = layer;
    if (w.isEmbed) rw.vocabSizeKey = w.vocabSizeKey ?? archVocabKey;
    return rw;
  };
  const pre = def.pre.map((w) => make(w, 'pre', undefined));
  const layers: ResolvedWeight[][] = [];
  for (let i = 0; i < numLayers; i++) layers.push(def.layer.map((w) => make(w, 'layer', i)));
  const post = def.post.map((w) => make(w, 'post', undefined));
  const all = [...pre, ...layers.flat(), ...post];

  const byName = new Map<string, ResolvedWeight>();
  for (const w of all) {
    for (const n of [w.name, ...w.aliases]) {
      const prev = byName.get(n);
      if (prev && prev !== w) {
        throw new AmalgamError('E_ARCH', `definition '${def.name}' gives the name to two weights ('${prev.name}' and '${w.name}')`, { file: o.file, key: n });
      }
      byName.set(n, w);
    }
  }

  const warnings = [...(o.warnings ?? [])];
  const ignored = [...(o.ignored ?? [])];
  const unmatched: string[] = [];
  const tied: string[] = [];
  const absent: string[] = [];
  const tieFlag = configValue(cfg, 'tie_word_embeddings');

  if (tensors) {
    const stored = new Set(tensors.map((t) => t.name));
    const claimed = new Set<string>();
    const doubles: string[] = [];
    for (const w of all) {
      const found = [w.name, ...w.aliases].filter((n) => stored.has(n));
      w.present = found.length > 0;
      if (found.length) {
        w.storedName = found[0];
        for (const n of found) claimed.add(n);
        if (found.length > 1) doubles.push(`${w.name} (${found.join(' and ')})`);
      }
    }
    if (doubles.length) {
      throw new AmalgamError('E_ARCH', `${doubles.length} weight(s) are stored twice under different names: ${listNames(doubles)}`, {
        file: o.file,
        key: doubles[0],
        hint: 'keep one name per tensor in the checkpoint',
      });
    }
    // Tied weights: an absent weight is stood in for by the first present tensor it is tied to.
    for (const w of all) {
      if (w.present) continue;
      for (const t of w.tiedNames) {
        const target = byName.get(t);
        const name = target?.present ? target.storedName : stored.has(t) ? t : undefined;
        if (name !== undefined) {
          w.tiedTo = name;
          break;
        }
      }
      if (w.tiedTo !== undefined) tied.push(w.name);
      else if (w.optional) absent.push(w.name);
    }
    const ignoreRes = (def.ignore ?? []).map((p) => new RegExp(p));
    for (const t of tensors) {
      if (claimed.has(t.name)) continue;
      if (ignoreRes.some((re) => re.test(t.name))) ignored.push(t.name);
      else unmatched.push(t.name);
    }
    if (unmatched.length && !o.allowUnmatched) {
      throw new AmalgamError(
        'E_ARCH',
        `${unmatched.length} tensor(s) do not belong to the '${def.name}' architecture: ${listNames(unmatched)}`,
        {
          file: o.file,
          key: unmatched[0],
          hint: o.inferred
            ? 'the tensor names do not follow one layer pattern'
            : `the definition was chosen because ${o.reason}; if the model is another family, correct "architectures"/"model_type" in config.json or register a definition for it (registered: ${registeredSummary()})`,
        },
      );
    }
    const missing = all.filter((w) => !w.present && !w.optional && w.tiedTo === undefined).map((w) => w.name);
    if (missing.length) {
      throw new AmalgamError('E_ARCH', `${missing.length} required tensor(s) of the '${def.name}' architecture are missing: ${listNames(missing)}`, {
        file: o.file,
        key: missing[0],
        hint: `the checkpoint is incomplete or is not a ${def.name} model (the definition was chosen because ${o.reason})`,
      });
    }
    if (tieFlag === false) {
      for (const n of tied) {
        const w = byName.get(n)!;
        warnings.push(`config.json sets tie_word_embeddings to false, but ${n} is absent; ${w.tiedTo} is used in its place`);
      }
    }
  }

  const tieWordEmbeddings = o.tieWordEmbeddings ?? (tieFlag === true || tied.length > 0);
  const embeddings = all.filter((w) => w.isEmbed && w.present !== false).map((w) => w.name);
  const layerIndex = new Map<string, number>();
  for (const w of all) {
    if (w.layer === undefined) continue;
    for (const n of [w.name, ...w.aliases]) layerIndex.set(n, w.layer);
  }
  const vocabSize = readVocabSize(cfg, archVocabKey);

  const resolved: ResolvedArchitecture = {
    name: def.name,
    definition: def,
    inferred: o.inferred,
    reason: o.reason,
    numLayers,
    tieWordEmbeddings,
    pre,
    layers,
    post,
    embeddings,
    tied,
    absent,
    ignored,
    unmatched,
    warnings,
    weights: () => all.slice(),
    weight: (name: string) => byName.get(name),
    layerOf: (name: string) => layerIndex.get(name),
  };
  if (vocabSize !== undefined) resolved.vocabSize = vocabSize;
  return resolved;
}
