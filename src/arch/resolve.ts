/**
 * Resolving a model's layout: choose a definition from `config.json` (architectures[0], then
 * model_type), expand its templates for the configured layer count, and check it against the
 * checkpoint's tensor names when they are given. Without a matching definition the layout is
 * inferred from the tensor names (infer.ts).
 */
import { AmalgamError } from '../errors.js';
import { inferArchitecture } from './infer.js';
import { getArchitecture, listArchitectures } from './registry.js';
import { buildLayout, registeredSummary } from './layout.js';
import { configValue, layerMatcher } from './templates.js';
import type { ArchitectureDef, ResolvedArchitecture, TensorLike } from './types.js';

export interface ResolveOptions {
  /** Use this registered definition (name, class name or model_type) instead of the config's. */
  architecture?: string;
  /** File or folder named in messages (usually the config.json path). */
  file?: string;
  /** Report tensors that no weight claims in `unmatched` instead of failing. */
  allowUnmatched?: boolean;
}

export interface ArchitectureChoice {
  definition: ArchitectureDef | undefined;
  /** How it was chosen, or why none was. */
  reason: string;
}

function asObject(config: unknown, file: string | undefined): Record<string, unknown> {
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    throw new AmalgamError('E_CONFIG', 'the model config is not a JSON object', { file });
  }
  return config as Record<string, unknown>;
}

/** The class name (`architectures[0]`) and `model_type` of a config, where present. */
export function configIdentity(config: unknown): { architecture?: string; modelType?: string } {
  const archs = configValue(config, 'architectures');
  const mt = configValue(config, 'model_type');
  const architecture = Array.isArray(archs) && typeof archs[0] === 'string' ? archs[0] : undefined;
  const modelType = typeof mt === 'string' && mt !== '' ? mt : undefined;
  return { architecture, modelType };
}

/** Choose a registered definition for a config: `architectures[0]` first, then `model_type`. */
export function findArchitecture(config: unknown): ArchitectureChoice {
  const { architecture, modelType } = configIdentity(config);
  const defs = listArchitectures();
  if (architecture !== undefined) {
    const byClass = defs.filter((d) => d.architectures.includes(architecture));
    if (byClass.length) {
      const def = byClass.find((d) => modelType !== undefined && d.modelTypes.includes(modelType)) ?? byClass[0]!;
      return { definition: def, reason: `config.json architectures[0] is "${architecture}"` };
    }
  }
  if (modelType !== undefined) {
    const def = defs.find((d) => d.modelTypes.includes(modelType));
    if (def) return { definition: def, reason: `config.json model_type is "${modelType}"` };
  }
  const named = [architecture && `architectures[0] "${architecture}"`, modelType && `model_type "${modelType}"`].filter(Boolean).join(', ');
  return {
    definition: undefined,
    reason: named ? `config.json names ${named}, which has no registered definition` : 'config.json names no architecture (no "architectures" or "model_type")',
  };
}

function normaliseTensors(tensors: readonly (string | TensorLike)[]): TensorLike[] {
  return tensors.map((t) => (typeof t === 'string' ? { name: t } : t));
}

/**
 * Resolve the layout of a model from its config and, optionally, its tensor names (or infos).
 * With tensors, the layer count is checked against them, every required weight must be present
 * (tied weights may stand in), and every tensor must belong to a weight (unless
 * `allowUnmatched`). When no definition matches, the layout is inferred (`inferred: true`).
 */
export function resolveArchitecture(
  config: unknown,
  tensors?: readonly (string | TensorLike)[],
  opts: ResolveOptions = {},
): ResolvedArchitecture {
  const cfg = asObject(config, opts.file);
  let choice: ArchitectureChoice;
  if (opts.architecture !== undefined) {
    const def = getArchitecture(opts.architecture);
    if (!def) {
      throw new AmalgamError('E_ARCH', `no registered architecture is called "${opts.architecture}"`, {
        file: opts.file,
        key: opts.architecture,
        hint: `registered: ${registeredSummary()}`,
      });
    }
    choice = { definition: def, reason: `architecture "${opts.architecture}" was requested` };
  } else {
    choice = findArchitecture(cfg);
  }
  const list = tensors ? normaliseTensors(tensors) : undefined;
  if (!choice.definition) {
    if (!list) {
      throw new AmalgamError('E_ARCH', `${choice.reason}, and no tensor list was given to infer the layout from`, {
        file: opts.file,
        key: configIdentity(cfg).architecture ? 'architectures' : 'model_type',
        hint: `registered architectures: ${registeredSummary()}; open the model folder so the layout can be inferred from its weights`,
      });
    }
    return inferArchitecture(list, cfg, { file: opts.file, reason: `${choice.reason}; the layout was inferred from the tensor names`, allowUnmatched: opts.allowUnmatched });
  }
  const def = choice.definition;
  const numLayers = numLayersFor(def, cfg, list, opts.file);
  const warnings: string[] = [];
  if (configValue(cfg, def.numLayersKey) === undefined) {
    warnings.push(`config.json has no "${def.numLayersKey}"; the tensor names show ${numLayers} layer(s)`);
  }
  return buildLayout(def, cfg, numLayers, list, {
    file: opts.file,
    inferred: false,
    reason: choice.reason,
    allowUnmatched: opts.allowUnmatched,
    warnings,
  });
}

/** The highest layer index + 1 among the tensors that match a layer template (0 when none do). */
function layersInTensors(def: ArchitectureDef, tensors: readonly TensorLike[], numLayersGuess: number): number {
  const matchers = def.layer.flatMap((w) => [w.name, ...(w.aliases ?? [])].map((t) => layerMatcher(t, numLayersGuess)));
  let max = -1;
  for (const t of tensors) {
    for (const m of matchers) {
      const l = m(t.name);
      if (l !== undefined) {
        if (l > max) max = l;
        break;
      }
    }
  }
  return max + 1;
}

function numLayersFor(def: ArchitectureDef, cfg: Record<string, unknown>, tensors: readonly TensorLike[] | undefined, file: string | undefined): number {
  const key = def.numLayersKey;
  const v = configValue(cfg, key);
  if (v !== undefined && v !== null && !(typeof v === 'number' && Number.isSafeInteger(v) && v >= 0)) {
    throw new AmalgamError('E_CONFIG', `layer count is ${JSON.stringify(v)}, expected a non-negative integer`, { file, key });
  }
  const fromConfig = typeof v === 'number' ? v : undefined;
  if (!tensors) {
    if (fromConfig === undefined) {
      throw new AmalgamError('E_CONFIG', `config has no "${key}" (the layer count of the ${def.name} architecture)`, {
        file,
        key,
        hint: `add "${key}" to config.json`,
      });
    }
    return fromConfig;
  }
  const found = layersInTensors(def, tensors, fromConfig ?? 0);
  if (fromConfig !== undefined && found !== fromConfig) {
    const has = found === 0 ? 'no layer tensors' : `tensors for layers 0..${found - 1} (${found} layer${found === 1 ? '' : 's'})`;
    throw new AmalgamError('E_ARCH', `config says ${fromConfig} layer${fromConfig === 1 ? '' : 's'} but the checkpoint has ${has}`, {
      file,
      key,
      hint: found < fromConfig ? 'the checkpoint is incomplete, or config.json belongs to a larger model' : `set "${key}" to ${found} if the weights are right`,
    });
  }
  return fromConfig ?? found;
}

