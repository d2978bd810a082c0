/**
 * Named parameters: float32 values with a gradient buffer that exists only while the parameter
 * is trainable. Names are the Hugging Face tensor names (formats.md §3.3), so a model's
 * parameters can be written back as a model folder or a PEFT adapter without renaming.
 */
import { AmalgamError } from '../errors.js';
import type { TensorSource } from '../io/source.js';
import type { LlamaConfig } from './config.js';
import type { Rng } from '../tensor/rng.js';

export class Parameter {
  /** d(loss)/d(data), accumulated by backward; null while the parameter is frozen. */
  grad: Float32Array | null = null;

  constructor(
    readonly name: string,
    readonly shape: readonly number[],
    public data: Float32Array,
  ) {
    const n = shape.reduce((a, b) => a * b, 1);
    if (data.length !== n) {
      throw new AmalgamError('E_SHAPE', `has ${data.length} values, shape [${shape.join(', ')}] needs ${n}`, { key: name });
    }
  }

  get size(): number {
    return this.data.length;
  }

  get requiresGrad(): boolean {
    return this.grad !== null;
  }

  /** Allocates (zeroed) or releases the gradient buffer. */
  setRequiresGrad(on: boolean): void {
    if (on && !this.grad) this.grad = new Float32Array(this.data.length);
    if (!on) this.grad = null;
  }

  zeroGrad(): void {
    this.grad?.fill(0);
  }

  /** Replaces the values (same shape), e.g. with an explicit initialisation. */
  set(values: ArrayLike<number>): void {
    if (values.length !== this.data.length) {
      throw new AmalgamError('E_SHAPE', `got ${values.length} values, shape [${this.shape.join(', ')}] needs ${this.data.length}`, { key: this.name });
    }
    this.data.set(values);
  }
}

/** Names of the parameters of a Llama-family model, in HF order. */
export function llamaParameterShapes(c: LlamaConfig): { name: string; shape: number[] }[] {
  const d = c.hiddenSize;
  const qd = c.numHeads * c.headDim;
  const kvd = c.numKvHeads * c.headDim;
  const f = c.intermediateSize;
  const out: { name: string; shape: number[] }[] = [{ name: 'model.embed_tokens.weight', shape: [c.vocabSize, d] }];
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}`;
    out.push({ name: `${p}.input_layernorm.weight`, shape: [d] });
    for (const [m, rows] of [['q_proj', qd], ['k_proj', kvd], ['v_proj', kvd]] as const) {
      out.push({ name: `${p}.self_attn.${m}.weight`, shape: [rows, d] });
      if (c.qkvBias) out.push({ name: `${p}.self_attn.${m}.bias`, shape: [rows] });
    }
    out.push({ name: `${p}.self_attn.o_proj.weight`, shape: [d, qd] });
    if (c.oBias) out.push({ name: `${p}.self_attn.o_proj.bias`, shape: [d] });
    out.push({ name: `${p}.post_attention_layernorm.weight`, shape: [d] });
    for (const [m, shape] of [['gate_proj', [f, d]], ['up_proj', [f, d]], ['down_proj', [d, f]]] as const) {
      out.push({ name: `${p}.mlp.${m}.weight`, shape: [...shape] });
      if (c.mlpBias) out.push({ name: `${p}.mlp.${m}.bias`, shape: [shape[0]] });
    }
  }
  out.push({ name: 'model.norm.weight', shape: [d] });
  if (!c.tieWordEmbeddings) out.push({ name: 'lm_head.weight', shape: [c.vocabSize, d] });
  return out;
}

/** Tensors a checkpoint may hold that are not parameters of the model. */
const NOT_PARAMETERS = /(^|\.)rotary_emb\.inv_freq$/;

export interface LoadParametersOptions {
  /** Tolerate (and ignore) stored tensors the model does not use. Default false. */
  allowUnused?: boolean;
  /** Tensor names a caller reads itself (e.g. a classification head's `score.weight`). */
  ignore?: (name: string) => boolean;
}

/**
 * Reads every parameter of a Llama-family model from a TensorSource as float32. With tied
 * embeddings a stored `lm_head.weight` is ignored, as transformers does. Missing tensors, wrong
 * shapes and (unless allowed) unused tensors are errors naming the tensor and the file.
 */
export async function loadLlamaParameters(
  source: TensorSource,
  c: LlamaConfig,
  opts: LoadParametersOptions = {},
): Promise<Map<string, Parameter>> {
  const params = new Map<string, Parameter>();
  for (const { name, shape } of llamaParameterShapes(c)) {
    if (!source.has(name)) {
      const hint =
        name === 'lm_head.weight'
          ? 'the weights have no lm_head; if the output layer shares the embedding, set "tie_word_embeddings": true in config.json'
          : name.endsWith('.bias')
            ? 'config.json asks for biases (attention_bias / mlp_bias / qwen2) that the weights lack'
            : undefined;
      throw new AmalgamError('E_MISSING', 'tensor is missing from the weights', { file: source.path, key: name, hint });
    }
    const info = source.info(name);
    if (info.shape.length !== shape.length || info.shape.some((v, i) => v !== shape[i])) {
      throw new AmalgamError('E_SHAPE', `stored shape [${info.shape.join(', ')}] differs from [${shape.join(', ')}] that config.json implies`, {
        file: source.path,
        key: name,
      });
    }
    params.set(name, new Parameter(name, shape, await source.readF32(name)));
  }
  if (!opts.allowUnused) {
    const unused = source
      .tensors()
      .map((t) => t.name)
      .filter((n) => !params.has(n) && !NOT_PARAMETERS.test(n) && !(n === 'lm_head.weight' && c.tieWordEmbeddings) && !opts.ignore?.(n));
    if (unused.length) {
      throw new AmalgamError('E_ARCH', `${unused.length} stored tensor(s) are not parameters of this ${c.modelType} model: ${unused.slice(0, 5).join(', ')}${unused.length > 5 ? ', …' : ''}`, {
        file: source.path,
        key: unused[0],
        hint: 'check attention_bias / mlp_bias / model_type in config.json',
      });
    }
  }
  return params;
}

/**
 * Fresh parameters as transformers initialises a Llama: every matrix and the embedding from
 * N(0, std²) (`initializer_range`, default 0.02), norms at 1, biases at 0.
 */
export function initLlamaParameters(c: LlamaConfig, rng: Rng, std = 0.02): Map<string, Parameter> {
  const params = new Map<string, Parameter>();
  for (const { name, shape } of llamaParameterShapes(c)) {
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    if (name.endsWith('norm.weight')) data.fill(1);
    else if (!name.endsWith('.bias')) rng.fillNormal(data, std);
    params.set(name, new Parameter(name, shape, data));
  }
  return params;
}
