/**
 * Typed form of a mergekit merge configuration (YAML). Field names of the configuration objects
 * are the YAML keys, so a `MergeConfig` reads like the file it came from. Optional keys that
 * were absent or null in the YAML are `undefined`.
 */

/** Dtypes accepted by `dtype` and `out_dtype`. */
export type ConfigDtype = 'bfloat16' | 'float16' | 'float32';

/** A scalar parameter value. */
export type ScalarValue = number | boolean | string;

/** One entry of a conditional parameter list: applies when `filter` is absent, `*`, or a substring of the tensor name. */
export interface ConditionalParameter {
  filter?: string;
  value: ParameterSetting;
}

/**
 * A parameter value as written in the YAML:
 * - a scalar;
 * - a list of numbers (a gradient, interpolated over the layers of a slice);
 * - a list of scalars that are not all numbers (a step list);
 * - a list of `{filter, value}` entries (or a single such entry); the first matching entry wins.
 */
export type ParameterSetting = ScalarValue | ScalarValue[] | ConditionalParameter | ConditionalParameter[];

/** `parameters:` block: parameter name to setting. */
export type ParameterMap = Record<string, ParameterSetting>;

/**
 * A model reference: `path[@revision][+adapter[@revision]]`. `path` is a local Hugging Face
 * model folder (or a hub id); `adapter` names a PEFT LoRA adapter applied to it.
 */
export interface ModelReference {
  /** Canonical string form, `model[@revision][+adapter[@adapterRevision]]`; equal ids mean the same model. */
  id: string;
  model: string;
  revision?: string;
  adapter?: string;
  adapterRevision?: string;
  /** Replaces `architectures` of the model's config.json (object form of a reference only). */
  overrideArchitecture?: string;
}

/** An entry of `models:`. */
export interface InputModelDefinition {
  model: ModelReference;
  parameters?: ParameterMap;
}

/** A source of an output slice. `layer_range` is `[start, end)`: the end is exclusive. */
export interface InputSliceDefinition {
  model: ModelReference;
  layer_range: [number, number];
  parameters?: ParameterMap;
}

/** An entry of `slices:`. */
export interface OutputSliceDefinition {
  sources: InputSliceDefinition[];
  /** Overrides the top-level `base_model` for this slice. */
  base_model?: ModelReference;
  /** Accepted for compatibility with mergekit's schema; not used by amalgam. */
  residual_weight?: number;
  parameters?: ParameterMap;
}

/** An entry of `modules:`: exactly one of `models` / `slices`. */
export interface OutputModuleDefinition {
  models?: InputModelDefinition[];
  slices?: OutputSliceDefinition[];
  parameters?: ParameterMap;
}

/** Embedding source for one token: `{kind: model_token, model, token | token_id}`. */
export interface ModelTokenEmbedding {
  kind: 'model_token';
  model: ModelReference;
  token?: string;
  token_id?: number;
}

/** Embedding source for one token: all zeros. */
export interface ZeroEmbedding {
  kind: 'zero';
}

/** A model reference (no `kind`), a specific token of a model, or zeros. */
export type TokenEmbeddingSource = ModelReference | ModelTokenEmbedding | ZeroEmbedding;

/** An entry of `tokenizer.tokens`. */
export interface TokenEmbeddingConfig {
  source?: TokenEmbeddingSource;
  force: boolean;
}

/** `union`, `base`, or the model whose tokenizer is used. */
export type TokenizerSource = 'union' | 'base' | ModelReference;

/** The `tokenizer:` block. */
export interface TokenizerConfig {
  source: TokenizerSource;
  tokens?: Record<string, TokenEmbeddingConfig>;
  pad_to_multiple_of?: number;
}

/** A whole merge configuration. Exactly one of `models`, `slices`, `modules` is set. */
export interface MergeConfig {
  merge_method: string;
  models?: InputModelDefinition[];
  slices?: OutputSliceDefinition[];
  modules?: Record<string, OutputModuleDefinition>;
  base_model?: ModelReference;
  dtype?: ConfigDtype;
  out_dtype?: ConfigDtype;
  parameters?: ParameterMap;
  tokenizer_source?: TokenizerSource;
  tokenizer?: TokenizerConfig;
  chat_template?: string;
}

/** A non-fatal remark about a configuration (for example a key that is accepted but ignored). */
export interface ConfigWarning {
  /** Key path, e.g. `slices[0].residual_weight`. */
  path: string;
  message: string;
  line?: number;
  column?: number;
}
