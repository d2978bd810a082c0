/**
 * Types shared by the merge methods: the registry entry, the per-tensor context a method receives
 * and the result it returns.
 */
import type { Rng } from '../tensor/rng.js';

/** A scalar parameter value after resolution (YAML numbers and booleans). */
export type ParamValue = number | boolean;

/** How a parameter is declared by a method. */
export interface ParamSpec {
  type: 'number' | 'integer' | 'boolean';
  /** Value used when neither the model nor the global block sets it. */
  default?: ParamValue;
  /** The merge cannot run without a value. */
  required?: boolean;
  /** One line for `--help` and error messages. */
  description?: string;
}

/** Parameters after defaults and the per-model → global fallback have been applied. */
export interface ResolvedParams {
  global: Readonly<Record<string, ParamValue | undefined>>;
  /** Keyed by model name; present for every model the method weights (see `weightedModels`). */
  perModel: Readonly<Record<string, Readonly<Record<string, ParamValue | undefined>>>>;
}

/** One input tensor of a merge, row-major float32. */
export interface MergeInput {
  model: string;
  data: Float32Array;
  shape: readonly number[];
}

/** What a merge method returns for one output tensor. */
export interface MergeOutput {
  data: Float32Array;
  shape: number[];
}

/** One draw of a keep-mask for a model's task vector. */
export interface MaskRequest {
  tensorName: string;
  model: string;
  numel: number;
  /** Keep probability: one value for the whole tensor, or one per element. */
  probability: number | Float32Array;
}

/**
 * Where the random sparsifiers (DARE, DELLA) get their Bernoulli keep-masks from. The default
 * draws from a seeded `Rng`; tests inject stored masks.
 */
export interface MaskSource {
  /** Returns a 0/1 mask of `numel` elements (1 = keep). */
  draw(request: MaskRequest): Uint8Array;
}

/** Everything a method needs to merge one tensor. */
export interface MergeContext {
  /** Name of the output tensor (used in every error message). */
  tensorName: string;
  /** The tensor is an embedding (`embed_tokens`, `lm_head`): the common-submatrix rule applies. */
  isEmbed: boolean;
  /**
   * The tensor is optional in the architecture (e.g. a tied `lm_head`): `model_stock` drops it
   * instead of failing when too few models have it.
   */
  isOptional?: boolean;
  /** Input tensors in model order, the base included. */
  inputs: readonly MergeInput[];
  /** Model name of the base among `inputs`, or null when the merge has no base model. */
  base: string | null;
  params: ResolvedParams;
  /** Source of randomness for randomized methods. */
  rng?: Rng;
  /** Overrides the masks drawn from `rng` (randomized methods only). */
  masks?: MaskSource;
  /** Receives non-fatal warnings (e.g. a task vector zeroed because density·numel < 1). */
  warn?: (message: string) => void;
}

/** Context given to parameter validation: which models take part, before any tensor is read. */
export interface ValidateContext {
  tensorName: string;
  /** All input models, the base included, in order. */
  models: readonly string[];
  base: string | null;
}

export type BaseRequirement = 'required' | 'optional' | 'none';

/** A merge method: a pure per-tensor function behind a registry entry. */
export interface MergeMethod {
  name: string;
  /** Human-readable name for model cards. */
  prettyName: string;
  /** Reference linked from the model card, if any. */
  reference?: string;
  globalParams: Readonly<Record<string, ParamSpec>>;
  perModelParams: Readonly<Record<string, ParamSpec>>;
  /**
   * `required`: a base model must be configured and plays a special role. `optional`: it may be
   * given and then plays a special role. `none`: a configured base is an ordinary input.
   */
  needsBase: BaseRequirement;
  /** Draws random masks: results depend on the seed. */
  randomized: boolean;
  /** Checks resolved parameters and model counts; throws AmalgamError naming the tensor. */
  validate?(params: ResolvedParams, ctx: ValidateContext): void;
  /**
   * Merges one tensor. Returns null only when the tensor must be left out of the output
   * (`model_stock` on an optional tensor that too few models have).
   */
  merge(ctx: MergeContext): MergeOutput | null;
  /**
   * Optionally, the same merge block by block from the stored values (`chunked.ts`), with no
   * float32 copy of a whole input: the same values, warnings and errors as `merge`. Returns
   * false, having done nothing, where it does not apply (the executor then calls `merge`).
   */
  mergeChunked?(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean;
}

/** One input of `mergeChunked`: its values, read block by block. */
export interface ChunkedInput {
  model: string;
  shape: readonly number[];
  /** Number of values. */
  length: number;
  /** Writes values [start, start + dst.length) as float32 (decoded exactly, rounded to the merge's dtype) into `dst`. */
  read(start: number, dst: Float32Array): void;
  /**
   * Where `read` only decodes (no rounding): the stored dtype, and `view`, which gives values
   * [start, start + len) as stored (valid until the next `read` or `view`), for kernels that
   * decode them on their own.
   */
  stored?: { dtype: StoredArray['dtype']; view(start: number, len: number): StoredArray };
}

/** Values as stored: float32, or the bits of BF16 or F16. */
export type StoredArray = { dtype: 'F32'; data: Float32Array } | { dtype: 'BF16' | 'F16'; data: Uint16Array };

/** Receives a chunked merge's result block by block, encoding it in the output dtype. */
export interface ChunkWriter {
  length: number;
  write(start: number, src: Float32Array): void;
  /** The output's stored values, which `write` encodes into. */
  stored: StoredArray;
}
