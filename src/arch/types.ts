/**
 * Architecture definitions: which tensors a model family has, in the spirit of mergekit's JSON
 * definitions (merge-methods.md §10). Names are templates: `${layer_index}` (optionally with an
 * offset, `${layer_index+1}`) and `${num_layers}` are substituted when a layout is resolved.
 */

export interface WeightDef {
  /** Tensor name or template, e.g. `model.layers.${layer_index}.self_attn.q_proj.weight`. */
  name: string;
  /** Vocabulary-sized along its first dimension (embedding, lm_head). */
  isEmbed?: boolean;
  /** May be absent from a checkpoint without making it invalid. */
  optional?: boolean;
  /** Other names the same tensor is stored under in some checkpoints. */
  aliases?: string[];
  /** Tensors this one is tied to: when it is absent, the first present tied tensor stands in. */
  tiedNames?: string[];
  /** Config key (dotted path) of the vocabulary size, where it is not the architecture's. */
  vocabSizeKey?: string;
}

export interface ArchitectureDef {
  /** Registry name, e.g. `llama`. */
  name: string;
  /** `config.json` `model_type` values this definition matches. */
  modelTypes: string[];
  /** `config.json` `architectures` class names this definition matches. */
  architectures: string[];
  /** Config key (dotted path) holding the layer count. */
  numLayersKey: string;
  /** Config key (dotted path) holding the vocabulary size (default `vocab_size`). */
  vocabSizeKey?: string;
  /** Weights before the layer stack. */
  pre: WeightDef[];
  /** Weights of one layer; every name contains `${layer_index}`. */
  layer: WeightDef[];
  /** Weights after the layer stack. */
  post: WeightDef[];
  /**
   * Regular expressions (source text) of stored tensors that are not parameters (e.g. cached
   * rotary frequencies, causal-mask buffers). They are reported in `ignored` and never merged.
   */
  ignore?: string[];
}

export type WeightSection = 'pre' | 'layer' | 'post';

/** One concrete weight of a resolved layout. */
export interface ResolvedWeight {
  /** Canonical concrete name (the definition's name with the layer index substituted). */
  name: string;
  /** The definition's template. */
  template: string;
  section: WeightSection;
  /** Layer index for layer weights. */
  layer?: number;
  isEmbed: boolean;
  optional: boolean;
  /** Concrete alternative names. */
  aliases: string[];
  /** Concrete names of the tensors it is tied to. */
  tiedNames: string[];
  /** Config key of the vocabulary size for embeddings. */
  vocabSizeKey?: string;
  /** Whether the checkpoint holds it (under its name or an alias); unset without a tensor list. */
  present?: boolean;
  /** The name it is stored under in the checkpoint (its name or one of its aliases). */
  storedName?: string;
  /** Absent from the checkpoint and tied: the stored tensor that stands in for it. */
  tiedTo?: string;
}

export interface ResolvedArchitecture {
  /** The definition's name (for inferred layouts, the config's class name or `inferred`). */
  name: string;
  definition: ArchitectureDef;
  /** True when no registered definition matched and the layout was inferred from tensor names. */
  inferred: boolean;
  /** How the definition was chosen, in words (for messages and `--dry-run`). */
  reason: string;
  numLayers: number;
  /** From the config, when present. */
  vocabSize?: number;
  /** The output embedding is tied to the input embedding (config says so, or lm_head is absent). */
  tieWordEmbeddings: boolean;
  pre: ResolvedWeight[];
  /** `layers[i]` holds the weights of layer i. */
  layers: ResolvedWeight[][];
  post: ResolvedWeight[];
  /** Canonical names of vocabulary-sized weights. */
  embeddings: string[];
  /** Canonical names of weights that are absent and stood in for by a tied tensor. */
  tied: string[];
  /** Canonical names of optional weights that are absent (and not tied). */
  absent: string[];
  /** Stored tensors matched by the definition's `ignore` patterns. */
  ignored: string[];
  /** Stored tensors that no weight claims (only with `allowUnmatched`; otherwise an error). */
  unmatched: string[];
  /** Non-fatal observations. */
  warnings: string[];
  /** Every weight: pre, then layer by layer, then post. */
  weights(): ResolvedWeight[];
  /** The weight with this canonical or stored name (or alias). */
  weight(name: string): ResolvedWeight | undefined;
  /** Layer index of a tensor (canonical, stored or alias name); undefined for pre/post or unknown names. */
  layerOf(name: string): number | undefined;
}

/** A tensor name with its shape where known (TensorInfo satisfies this). */
export interface TensorLike {
  name: string;
  shape?: readonly number[];
}
