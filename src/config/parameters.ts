/**
 * Per-tensor parameter resolution, as mergekit does it (golden/GRADIENTS.md):
 * - a setting is evaluated at a position t in [0, 1] within its output slice (gradients are
 *   interpolated piecewise-linearly, step lists are indexed, condition lists take the first entry
 *   whose filter is absent, `*` or a substring of the tensor name);
 * - the first level that yields a value wins: the model's source entry, the output slice, the
 *   module, the top-level `parameters`; then the method's default.
 */
import { AmalgamError } from '../errors.js';
import { configContainer } from './layout.js';
import { parseModelReference, sameModel } from './model-ref.js';
import { methodParameters } from './methods.js';
import type { ParameterSpec } from './methods.js';
import type {
  ConditionalParameter,
  MergeConfig,
  ModelReference,
  ParameterMap,
  ParameterSetting,
  ScalarValue,
} from './types.js';

/**
 * Gradient position of layer `index` (0-based) of an output slice of `length` layers:
 * `index / (length - 1)`, and 1 for a slice of one layer.
 */
export function gradientPosition(index: number, length: number): number {
  if (!Number.isInteger(length) || length < 1 || !Number.isInteger(index) || index < 0 || index >= length) {
    throw new RangeError(`layer ${index} is not within a slice of ${length} layer(s)`);
  }
  return length > 1 ? index / (length - 1) : 1;
}

function conditionMatches(c: ConditionalParameter, tensorName: string | undefined): boolean {
  if (c.filter === undefined || c.filter === '*') return true;
  return tensorName !== undefined && tensorName.length > 0 && tensorName.includes(c.filter);
}

const isCondition = (v: unknown): v is ConditionalParameter => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * Value of a setting for a tensor at position `t`, or undefined when it is a condition list and
 * no entry matches (resolution then falls through to the next level).
 */
export function evaluateSetting(setting: ParameterSetting, tensorName: string | undefined, t: number): ScalarValue | undefined {
  if (Array.isArray(setting)) {
    const n = setting.length;
    if (n === 0) return undefined;
    if (setting.every((e) => typeof e === 'number')) {
      const v = setting as number[];
      const scaled = t * (n - 1);
      const i0 = Math.trunc(scaled);
      const i1 = Math.min(n - 1, i0 + 1);
      const frac = scaled - i0;
      return (1 - frac) * v[i0] + frac * v[i1];
    }
    if (setting.every((e) => !isCondition(e))) {
      return (setting as ScalarValue[])[Math.trunc(t * (n - 1))];
    }
    for (const c of setting) {
      if (isCondition(c) && conditionMatches(c, tensorName)) return evaluateSetting(c.value, tensorName, t);
    }
    return undefined;
  }
  if (isCondition(setting)) {
    return conditionMatches(setting, tensorName) ? evaluateSetting(setting.value, tensorName, t) : undefined;
  }
  return setting;
}

/** Where a tensor sits; give one of `position`, `layer` or `t`. */
export interface TensorPosition {
  /** Module name, for `modules:` configurations. */
  module?: string;
  /**
   * Weights before the first layer (`pre`: embeddings) or after the last (`post`: final norm,
   * `lm_head`): evaluated at t = 0 with the first / last output slice.
   */
  position?: 'pre' | 'post';
  /** Output layer index; its slice and t are derived from the configuration. */
  layer?: number;
  /** With `layer` and the `models:` form: the models' layer count (the single slice's length). */
  layerCount?: number;
  /** Output slice index, with an explicit `t` (default 0). */
  slice?: number;
  /** Explicit gradient position in [0, 1]. */
  t?: number;
}

export interface ParameterQuery extends TensorPosition {
  /** Parameter name, e.g. `weight`, `density`, `t`. */
  name: string;
  /** Output tensor name; filters of global parameters are matched against it. */
  tensor: string;
  /** For a per-model parameter: the model. */
  model?: ModelReference | string;
  /** For a per-model parameter: index of the source in its slice (or of the entry in `models:`). */
  source?: number;
  /**
   * For a per-model parameter: the model's input tensor name, which its filters are matched
   * against at every level (defaults to `tensor`; differs when a slice takes other layers).
   */
  inputTensor?: string;
}

export interface ParameterResolveOptions {
  /** Used when no level sets the parameter; defaults to the method's default. */
  default?: ScalarValue;
  /** A missing value is an error; defaults to the method's table (base models exempt unless the table says otherwise). */
  required?: boolean;
}

interface SliceView {
  sources: { model: ModelReference; parameters?: ParameterMap }[];
  parameters?: ParameterMap;
  base_model?: ModelReference;
}

interface Located {
  index: number;
  slice: SliceView;
  moduleParameters?: ParameterMap;
  t: number;
}

function configError(message: string, key?: string, hint?: string): AmalgamError {
  return new AmalgamError('E_CONFIG', message, { ...(key ? { key } : {}), ...(hint ? { hint } : {}) });
}

/** Resolves parameters of one configuration for any tensor, layer and model. */
export class ParameterResolver {
  readonly config: MergeConfig;

  constructor(config: MergeConfig) {
    this.config = config;
  }

  private slices(module?: string): { views: SliceView[]; lengths?: number[]; moduleParameters?: ParameterMap } {
    const c = configContainer(this.config, module);
    const moduleParameters = module !== undefined ? c.parameters : undefined;
    if (c.slices) {
      return {
        views: c.slices.map((s) => ({
          sources: s.sources,
          ...(s.parameters ? { parameters: s.parameters } : {}),
          ...(s.base_model ?? this.config.base_model ? { base_model: s.base_model ?? this.config.base_model } : {}),
        })),
        lengths: c.slices.map((s) => s.sources[0].layer_range[1] - s.sources[0].layer_range[0]),
        moduleParameters,
      };
    }
    const base = this.config.base_model;
    return { views: [{ sources: c.models ?? [], ...(base ? { base_model: base } : {}) }], moduleParameters };
  }

  private locate(q: TensorPosition): Located {
    const { views, lengths, moduleParameters } = this.slices(q.module);
    if (q.position === 'pre' || q.position === 'post') {
      const index = q.position === 'pre' ? 0 : views.length - 1;
      return { index, slice: views[index], moduleParameters, t: 0 };
    }
    if (q.layer !== undefined) {
      if (!Number.isInteger(q.layer) || q.layer < 0) throw new RangeError(`layer must be a non-negative integer, got ${q.layer}`);
      if (lengths) {
        let start = 0;
        for (let i = 0; i < lengths.length; i++) {
          if (q.layer < start + lengths[i]) {
            return { index: i, slice: views[i], moduleParameters, t: gradientPosition(q.layer - start, lengths[i]) };
          }
          start += lengths[i];
        }
        throw new RangeError(`output layer ${q.layer} is past the end: the slices give ${start} layers`);
      }
      if (q.layerCount === undefined) {
        throw new RangeError('with the `models:` form, give layerCount (the models\' number of layers) together with layer');
      }
      return { index: 0, slice: views[0], moduleParameters, t: gradientPosition(q.layer, q.layerCount) };
    }
    const s = q.slice ?? 0;
    if (!Number.isInteger(s) || s < 0 || s >= views.length) {
      throw new RangeError(`slice ${s} does not exist (the configuration has ${views.length})`);
    }
    const t = q.t ?? 0;
    if (!(t >= 0 && t <= 1)) throw new RangeError(`t must be within [0, 1], got ${t}`);
    return { index: s, slice: views[s], moduleParameters, t };
  }

  /** The output slice a tensor position falls in, and its gradient position t. */
  position(q: TensorPosition): { slice: number; t: number } {
    const loc = this.locate(q);
    return { slice: loc.index, t: loc.t };
  }

  private sourcesFor(q: ParameterQuery, slice: SliceView): { model: ModelReference; parameters?: ParameterMap }[] {
    if (q.source !== undefined) {
      const src = slice.sources[q.source];
      if (!src) throw new RangeError(`source ${q.source} does not exist (the slice has ${slice.sources.length})`);
      if (q.model !== undefined && !sameModel(src.model, q.model)) {
        throw new RangeError(`source ${q.source} is ${src.model.id}, not ${typeof q.model === 'string' ? q.model : q.model.id}`);
      }
      return [src];
    }
    const model = q.model as ModelReference | string;
    return slice.sources.filter((s) => sameModel(s.model, model));
  }

  private modelOf(q: ParameterQuery, slice: SliceView): ModelReference | undefined {
    if (q.model !== undefined) return typeof q.model === 'string' ? parseModelReference(q.model) : q.model;
    if (q.source !== undefined) return slice.sources[q.source]?.model;
    return undefined;
  }

  /** The configured value, or undefined when no level sets it (no defaults applied). */
  value(q: ParameterQuery): ScalarValue | undefined {
    return this.valueAt(q, this.locate(q));
  }

  private valueAt(q: ParameterQuery, loc: Located): ScalarValue | undefined {
    const perModel = q.model !== undefined || q.source !== undefined;
    const tensor = perModel ? (q.inputTensor ?? q.tensor) : q.tensor;
    const ev = (map: ParameterMap | undefined): ScalarValue | undefined =>
      map && Object.prototype.hasOwnProperty.call(map, q.name) ? evaluateSetting(map[q.name], tensor, loc.t) : undefined;
    if (perModel) {
      for (const src of this.sourcesFor(q, loc.slice)) {
        const v = ev(src.parameters);
        if (v !== undefined) return v;
      }
    }
    for (const map of [loc.slice.parameters, loc.moduleParameters, this.config.parameters]) {
      const v = ev(map);
      if (v !== undefined) return v;
    }
    return undefined;
  }

  /**
   * The value with the method's default applied. A required parameter that is still unset is an
   * E_CONFIG error naming the model and the tensor.
   */
  resolve(q: ParameterQuery, options: ParameterResolveOptions = {}): ScalarValue | undefined {
    const loc = this.locate(q);
    const v = this.valueAt(q, loc);
    if (v !== undefined) return v;
    const spec = methodParameters(this.config.merge_method)?.find((p) => p.name === q.name);
    const def = options.default ?? spec?.default;
    if (def !== undefined) return def;
    const model = this.modelOf(q, loc.slice);
    const isBase = model !== undefined && loc.slice.base_model !== undefined && sameModel(model, loc.slice.base_model);
    const required = options.required ?? (spec?.required === true && (!isBase || spec.requiredForBase === true));
    if (required) {
      const tensor = model ? (q.inputTensor ?? q.tensor) : q.tensor;
      throw configError(
        `missing required parameter \`${q.name}\`${model ? ` for model ${model.id}` : ''} on tensor ${tensor}`,
        q.name,
        model
          ? `set \`${q.name}\` in that model's \`parameters:\`, or for every model in the top-level \`parameters:\``
          : `set \`${q.name}\` in the top-level \`parameters:\``,
      );
    }
    return undefined;
  }

  private specs(kind: ParameterSpec['kind']): ParameterSpec[] {
    const specs = methodParameters(this.config.merge_method);
    if (!specs) throw configError(`unknown merge_method \`${this.config.merge_method}\``, 'merge_method');
    return specs.filter((p) => p.kind === kind);
  }

  /** All global parameters of the method for an output tensor (defaults applied; unset optional ones omitted). */
  globalParameters(q: TensorPosition & { tensor: string }): Record<string, ScalarValue> {
    const out: Record<string, ScalarValue> = {};
    for (const p of this.specs('global')) {
      const v = this.resolve({ ...q, name: p.name, model: undefined, source: undefined });
      if (v !== undefined) out[p.name] = v;
    }
    return out;
  }

  /** All per-model parameters of the method for one model's input to an output tensor. */
  modelParameters(
    q: TensorPosition & { tensor: string; inputTensor?: string } & ({ model: ModelReference | string; source?: number } | { model?: undefined; source: number }),
  ): Record<string, ScalarValue> {
    const out: Record<string, ScalarValue> = {};
    for (const p of this.specs('model')) {
      const v = this.resolve({ ...q, name: p.name });
      if (v !== undefined) out[p.name] = v;
    }
    return out;
  }
}

/** One parameter for one tensor (and model), with the method's default applied. */
export function resolveParameter(config: MergeConfig, query: ParameterQuery, options?: ParameterResolveOptions): ScalarValue | undefined {
  return new ParameterResolver(config).resolve(query, options);
}
