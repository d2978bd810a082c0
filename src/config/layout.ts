/** Derived views of a configuration: output slices, base model, effective tokenizer and output dtype. */
import { AmalgamError } from '../errors.js';
import { sameModel } from './model-ref.js';
import type {
  ConfigDtype,
  InputModelDefinition,
  MergeConfig,
  ModelReference,
  OutputSliceDefinition,
  ParameterMap,
  TokenizerConfig,
} from './types.js';

/** The part of a configuration that holds `models` or `slices`: the top level or one module. */
export interface ConfigContainer {
  models?: InputModelDefinition[];
  slices?: OutputSliceDefinition[];
  /** Module parameters (precedence level 3); undefined at the top level. */
  parameters?: ParameterMap;
}

/** The top level, or the named module. */
export function configContainer(config: MergeConfig, module?: string): ConfigContainer {
  if (module === undefined) {
    if (config.modules && !config.models && !config.slices) {
      throw new AmalgamError('E_CONFIG', 'this configuration uses `modules:`; name the module', {
        key: 'modules',
        hint: `modules: ${Object.keys(config.modules).join(', ')}`,
      });
    }
    return { models: config.models, slices: config.slices };
  }
  const mod = config.modules?.[module];
  if (!mod) {
    throw new AmalgamError('E_CONFIG', `no module \`${module}\` in the configuration`, {
      key: 'modules',
      hint: config.modules ? `modules: ${Object.keys(config.modules).join(', ')}` : 'the configuration has no `modules:`',
    });
  }
  return mod;
}

export interface LayoutSource {
  model: ModelReference;
  /** First input layer of this source. */
  start: number;
  parameters?: ParameterMap;
}

export interface LayoutSlice {
  /** Index of the output slice. */
  slice: number;
  /** Output index of the slice's first layer. */
  outputStart: number;
  /** Number of layers in the slice. */
  length: number;
  sources: LayoutSource[];
  parameters?: ParameterMap;
  /** The slice's base model (`slices[].base_model`, else the top-level one). */
  base_model?: ModelReference;
}

/**
 * Output slices as mergekit plans them. With `models:`, one slice covers `[0, layerCount)` of
 * every listed model, and the base model is appended as a source without parameters when it is
 * not listed. Output layer `outputStart + i` reads input layer `source.start + i` of each source.
 */
export function sliceLayout(config: MergeConfig, options: { module?: string; layerCount?: number } = {}): LayoutSlice[] {
  const c = configContainer(config, options.module);
  if (c.slices) {
    let out = 0;
    return c.slices.map((s, i) => {
      const length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0];
      const entry: LayoutSlice = {
        slice: i,
        outputStart: out,
        length,
        sources: s.sources.map((src) => ({
          model: src.model,
          start: src.layer_range[0],
          ...(src.parameters ? { parameters: src.parameters } : {}),
        })),
        ...(s.parameters ? { parameters: s.parameters } : {}),
      };
      const base = s.base_model ?? config.base_model;
      if (base) entry.base_model = base;
      out += length;
      return entry;
    });
  }
  const models = c.models ?? [];
  const n = options.layerCount;
  if (n === undefined || !Number.isInteger(n) || n < 1) {
    throw new AmalgamError('E_CONFIG', 'the `models:` form needs the models\' layer count to lay out its slice', {
      hint: 'pass layerCount (num_hidden_layers of the models)',
    });
  }
  const sources: LayoutSource[] = models.map((m) => ({ model: m.model, start: 0, ...(m.parameters ? { parameters: m.parameters } : {}) }));
  const base = config.base_model;
  if (base && !models.some((m) => sameModel(m.model, base))) sources.push({ model: base, start: 0 });
  return [{ slice: 0, outputStart: 0, length: n, sources, ...(base ? { base_model: base } : {}) }];
}

/** The base model of an output slice: its own `base_model`, else the top-level one. */
export function baseModelFor(config: MergeConfig, options: { module?: string; slice?: number } = {}): ModelReference | undefined {
  const c = configContainer(config, options.module);
  const s = c.slices?.[options.slice ?? 0];
  return s?.base_model ?? config.base_model;
}

/** The tokenizer block in effect: `tokenizer`, or `{source: tokenizer_source}`, or undefined. */
export function effectiveTokenizer(config: MergeConfig): TokenizerConfig | undefined {
  if (config.tokenizer) return config.tokenizer;
  if (config.tokenizer_source !== undefined) return { source: config.tokenizer_source };
  return undefined;
}

/** `out_dtype`, else `dtype`, else undefined (each tensor keeps its base dtype). */
export function effectiveOutDtype(config: MergeConfig): ConfigDtype | undefined {
  return config.out_dtype ?? config.dtype;
}

/** Every model used as a base or an input (tokenizer sources excluded), first mention first. */
export function referencedModels(config: MergeConfig): ModelReference[] {
  const out: ModelReference[] = [];
  const add = (m: ModelReference | undefined) => {
    if (m && !out.some((x) => sameModel(x, m))) out.push(m);
  };
  add(config.base_model);
  const visit = (c: ConfigContainer) => {
    c.models?.forEach((m) => add(m.model));
    c.slices?.forEach((s) => {
      add(s.base_model);
      s.sources.forEach((src) => add(src.model));
    });
  };
  visit(config);
  Object.values(config.modules ?? {}).forEach(visit);
  return out;
}
