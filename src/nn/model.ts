/**
 * A Llama-family decoder (HF `LlamaForCausalLM`; Mistral and Qwen2 too), forward and backward.
 *
 *   x = embed(ids)
 *   for each block:  x = x + attn(rmsnorm(x));  x = x + mlp(rmsnorm(x))
 *   hidden = rmsnorm(x);  logits = lm_head(hidden)
 *
 * Tokens are rows: a batch [B, T] of ids (right-padded) gives N = B·T rows. Every activation the
 * backward needs is kept in buffers sized from B and T (see `activationFloats`), allocated on the
 * first call and reused while later calls fit. docs/runtime.md describes the layout.
 */
import type { Backend } from '../backend/backend.js';
import { createBackend } from '../backend/index.js';
import { ReferenceBackend } from '../backend/reference.js';
import { AmalgamError, isAmalgamError } from '../errors.js';
import { openModelFolder } from '../io/hf.js';
import { Rng } from '../tensor/rng.js';
import { parseLlamaConfig, type LlamaConfig } from './config.js';
import {
  type Attention,
  type AttentionCache,
  type AttentionScratch,
  attentionBackward,
  attentionCacheFloats,
  attentionForward,
  attentionParameters,
  createAttentionCache,
  createAttentionScratch,
} from './layers/attention.js';
import { embeddingBackward, embeddingForward } from './layers/embedding.js';
import { Linear, type LinearCache, type LinearLayer } from './layers/linear.js';
import { type Mlp, type MlpCache, type MlpScratch, createMlpCache, createMlpScratch, mlpBackward, mlpForward, mlpParameters } from './layers/mlp.js';
import { type RmsNormCache, createRmsNormCache, rmsnormBackward, rmsnormForward } from './layers/rmsnorm.js';
import { RopeTables } from './layers/rope.js';
import { initLlamaParameters, loadLlamaParameters, type Parameter } from './params.js';

export interface Block {
  inputNorm: Parameter;
  attn: Attention;
  postNorm: Parameter;
  mlp: Mlp;
}

interface BlockCache {
  n1: RmsNormCache;
  /** rmsnorm(x) feeding attention [N, d]. */
  xn1: Float32Array;
  attn: AttentionCache;
  /** x + attention, the residual stream between the two halves [N, d]. */
  xMid: Float32Array;
  n2: RmsNormCache;
  /** rmsnorm(xMid) feeding the MLP [N, d]. */
  xn2: Float32Array;
  mlp: MlpCache;
}

/** Buffers of backward, shared by all blocks; allocated on the first backward. */
interface GradScratch {
  /** Gradient of the residual stream [N, d]. */
  dResid: Float32Array;
  /** Gradient of a normalised input [N, d]. */
  dNormed: Float32Array;
  /** Gradient of the final hidden states [N, d]. */
  dHidden: Float32Array;
  attn: AttentionScratch;
  mlp: MlpScratch;
}

interface Activations {
  /** Row capacity (B·T) and probability capacity (B·H·T·Tk) the buffers were sized for. */
  rows: number;
  probs: number;
  /** The linear layers the caches were made for (a swapped layer needs a new cache). */
  linears: LinearLayer[];
  ids: Int32Array;
  /** Residual stream at the input of block i (xs[L] is the input of the final norm) [N, d]. */
  xs: Float32Array[];
  blocks: BlockCache[];
  normF: RmsNormCache;
  /** Final hidden states, rmsnorm(xs[L]) [N, d]. */
  hidden: Float32Array;
  /** [N, vocab]. */
  logits: Float32Array;
  headCache: LinearCache;
  /** Output of attention or the MLP before the residual add [N, d]. */
  tmp: Float32Array;
  grad: GradScratch | null;
}

export type ForwardOutput = 'logits' | 'hidden';

export interface ForwardOptions {
  /** 'logits' (default) returns [B·T, vocab]; 'hidden' stops after the final norm: [B·T, hidden]. */
  output?: ForwardOutput;
  /** Continue the sequences in this cache (inference only: no backward afterwards). */
  kv?: KvCache;
}

/** Keys and values of every layer for incremental decoding, [B, capacity, Hkv·hd] each. */
export class KvCache {
  readonly k: Float32Array[] = [];
  readonly v: Float32Array[] = [];
  /** Positions filled so far. */
  length = 0;

  constructor(
    config: LlamaConfig,
    readonly batch: number,
    readonly capacity: number,
  ) {
    const n = batch * capacity * config.numKvHeads * config.headDim;
    for (let i = 0; i < config.numLayers; i++) {
      this.k.push(new Float32Array(n));
      this.v.push(new Float32Array(n));
    }
  }

  reset(): void {
    this.length = 0;
  }
}

/** A place in the model that holds a linear layer, by its HF module path. */
export interface LinearSlot {
  /** e.g. `model.layers.3.mlp.down_proj`, or `lm_head`. */
  name: string;
  /** Block index, or null for lm_head. */
  layer: number | null;
  get(): LinearLayer;
  set(layer: LinearLayer): void;
}

export interface ModelOptions {
  /** Compute backend (default: WebAssembly SIMD when built, else the reference backend). */
  backend?: Backend;
}

export interface FromFolderOptions extends ModelOptions {
  /** Ignore stored tensors the model does not use (default: an error names them). */
  allowUnused?: boolean;
}

/** The WebAssembly backend when its kernels are built and supported, else the reference one. */
export function defaultBackend(): Backend {
  try {
    return createBackend('wasm');
  } catch (e) {
    if (isAmalgamError(e) && (e.code === 'E_MISSING' || e.code === 'E_UNSUPPORTED')) return new ReferenceBackend();
    throw e;
  }
}

export class LlamaModel {
  readonly backend: Backend;
  readonly embed: Parameter;
  readonly blocks: Block[] = [];
  readonly norm: Parameter;
  /** The output projection; with tied embeddings its weight is `embed` itself. */
  lmHead: LinearLayer;
  readonly rope: RopeTables;
  private readonly ownsBackend: boolean;
  private acts: Activations | null = null;
  /** Buffers of the activations and of the backward scratch, from the backend's allocator. */
  private actsOwned: Float32Array[] = [];
  private gradOwned: Float32Array[] = [];
  private last: { B: number; T: number; output: ForwardOutput; kv: boolean } | null = null;

  constructor(
    readonly config: LlamaConfig,
    params: Map<string, Parameter>,
    opts: ModelOptions = {},
  ) {
    const get = (name: string): Parameter => {
      const p = params.get(name);
      if (!p) throw new AmalgamError('E_MISSING', 'parameter is missing', { key: name });
      return p;
    };
    const opt = (name: string): Parameter | null => params.get(name) ?? null;
    const linear = (path: string): Linear => new Linear(path, get(`${path}.weight`), opt(`${path}.bias`));
    const c = config;
    this.embed = get('model.embed_tokens.weight');
    for (let i = 0; i < c.numLayers; i++) {
      const p = `model.layers.${i}`;
      this.blocks.push({
        inputNorm: get(`${p}.input_layernorm.weight`),
        attn: {
          q: linear(`${p}.self_attn.q_proj`),
          k: linear(`${p}.self_attn.k_proj`),
          v: linear(`${p}.self_attn.v_proj`),
          o: linear(`${p}.self_attn.o_proj`),
          numHeads: c.numHeads,
          numKvHeads: c.numKvHeads,
          headDim: c.headDim,
        },
        postNorm: get(`${p}.post_attention_layernorm.weight`),
        mlp: { gate: linear(`${p}.mlp.gate_proj`), up: linear(`${p}.mlp.up_proj`), down: linear(`${p}.mlp.down_proj`) },
      });
    }
    this.norm = get('model.norm.weight');
    this.lmHead = new Linear('lm_head', c.tieWordEmbeddings ? this.embed : get('lm_head.weight'));
    this.rope = new RopeTables(c.headDim, c.ropeTheta, Math.min(c.maxPositions, 4096));
    this.ownsBackend = opts.backend === undefined;
    this.backend = opts.backend ?? defaultBackend();
  }

  /** Loads a Hugging Face model folder (config.json + safetensors). A `score.weight` is left for the head. */
  static async fromFolder(dir: string, opts: FromFolderOptions = {}): Promise<LlamaModel> {
    const folder = await openModelFolder(dir, { allowUnmatched: true });
    try {
      const config = parseLlamaConfig(folder.config, folder.configPath);
      const params = await loadLlamaParameters(folder.source, config, {
        allowUnused: opts.allowUnused,
        ignore: (n) => n === 'score.weight',
      });
      return new LlamaModel(config, params, opts);
    } finally {
      await folder.close();
    }
  }

  /** A freshly initialised model (transformers' Llama initialisation), from a seed. */
  static random(config: LlamaConfig, seed: number, opts: ModelOptions & { std?: number } = {}): LlamaModel {
    return new LlamaModel(config, initLlamaParameters(config, new Rng(seed), opts.std), opts);
  }

  /** Every linear layer of the model by module path, to read or replace (LoRA, multi-source). */
  linearSlots(): LinearSlot[] {
    const slots: LinearSlot[] = [];
    this.blocks.forEach((blk, i) => {
      const p = `model.layers.${i}`;
      for (const key of ['q', 'k', 'v', 'o'] as const) {
        slots.push({ name: `${p}.self_attn.${key}_proj`, layer: i, get: () => blk.attn[key], set: (l) => (blk.attn[key] = l) });
      }
      for (const key of ['gate', 'up', 'down'] as const) {
        slots.push({ name: `${p}.mlp.${key}_proj`, layer: i, get: () => blk.mlp[key], set: (l) => (blk.mlp[key] = l) });
      }
    });
    slots.push({ name: 'lm_head', layer: null, get: () => this.lmHead, set: (l) => (this.lmHead = l) });
    return slots;
  }

  /** Every parameter once (a tied lm_head is the embedding), in HF order, adapters included. */
  parameters(): Parameter[] {
    const seen = new Set<Parameter>();
    const out: Parameter[] = [];
    const add = (ps: Parameter[]) => {
      for (const p of ps) {
        if (!seen.has(p)) {
          seen.add(p);
          out.push(p);
        }
      }
    };
    add([this.embed]);
    for (const b of this.blocks) add([b.inputNorm, ...attentionParameters(b.attn), b.postNorm, ...mlpParameters(b.mlp)]);
    add([this.norm, ...this.lmHead.parameters()]);
    return out;
  }

  /** Parameters by name. */
  namedParameters(): Map<string, Parameter> {
    return new Map(this.parameters().map((p) => [p.name, p]));
  }

  /** Parameters with a gradient buffer. */
  trainableParameters(): Parameter[] {
    return this.parameters().filter((p) => p.requiresGrad);
  }

  /** Makes exactly the parameters the predicate accepts trainable (all when omitted). */
  setTrainable(pred: (p: Parameter) => boolean = () => true): void {
    for (const p of this.parameters()) p.setRequiresGrad(pred(p));
  }

  zeroGrad(): void {
    for (const p of this.parameters()) p.zeroGrad();
  }

  createKvCache(batch: number, capacity: number): KvCache {
    return new KvCache(this.config, batch, capacity);
  }

  /**
   * Runs the model over ids [B, T] (row-major, right-padded with any valid id). Returns a view
   * of the model's own buffer, valid until the next forward: logits [B·T, vocab], or the final
   * hidden states [B·T, hidden] with `output: 'hidden'`.
   */
  forward(ids: ArrayLike<number>, B: number, T: number, opts: ForwardOptions = {}): Float32Array {
    const c = this.config;
    const be = this.backend;
    const output = opts.output ?? 'logits';
    const kv = opts.kv ?? null;
    if (!Number.isSafeInteger(B) || !Number.isSafeInteger(T) || B < 1 || T < 1) {
      throw new AmalgamError('E_SHAPE', `batch and length must be positive integers, got B=${B}, T=${T}`);
    }
    const N = B * T;
    if (ids.length < N) throw new AmalgamError('E_SHAPE', `${ids.length} ids given for a batch of ${B}×${T}`);
    if (kv && kv.batch !== B) throw new AmalgamError('E_SHAPE', `the KV cache is for a batch of ${kv.batch}, got ${B}`);
    const offset = kv ? kv.length : 0;
    const Tk = offset + T;
    if (c.slidingWindow !== null && Tk > c.slidingWindow) {
      throw new AmalgamError('E_UNSUPPORTED', `sequence of ${Tk} positions exceeds the sliding window of ${c.slidingWindow}, which is not implemented`);
    }
    const a = this.activations(N, B * c.numHeads * T * Tk);
    const d = c.hiddenSize;
    for (let i = 0; i < N; i++) a.ids[i] = ids[i]!;
    const idsN = a.ids.subarray(0, N);

    embeddingForward(be, this.embed, idsN, a.xs[0]!, d);
    this.blocks.forEach((blk, i) => {
      const past = kv ? { k: kv.k[i]!, v: kv.v[i]!, capacity: kv.capacity, offset } : null;
      this.blockForward(blk, a.xs[i]!, a.xs[i + 1]!, B, T, a.blocks[i]!, a.tmp, past);
    });
    rmsnormForward(be, this.norm, a.xs[c.numLayers]!, a.hidden, N, d, c.rmsNormEps, a.normF);
    if (kv) kv.length += T;
    this.last = { B, T, output, kv: kv !== null };
    if (output === 'hidden') return a.hidden.subarray(0, N * d);
    this.lmHead.forward(be, a.hidden, a.logits, N, a.headCache);
    return a.logits.subarray(0, N * c.vocabSize);
  }

  /**
   * Back-propagates d(loss)/d(output) of the last forward: dLogits [B·T, vocab] or, after
   * `output: 'hidden'`, dHidden [B·T, hidden]. Accumulates into the `grad` of every trainable
   * parameter; stops early once no trainable parameter remains below.
   */
  backward(dOut: Float32Array): void {
    const last = this.last;
    const a = this.acts;
    if (!last || !a) throw new AmalgamError('E_USAGE', 'backward needs a forward first');
    if (last.kv) throw new AmalgamError('E_USAGE', 'backward is not available after a forward with a KV cache');
    const c = this.config;
    const be = this.backend;
    const N = last.B * last.T;
    const d = c.hiddenSize;
    const g = (a.grad ??= this.createGradScratch(a.rows, a.probs));

    let dHidden = dOut;
    if (last.output === 'logits') {
      this.lmHead.backward(be, dOut, g.dHidden, N, a.headCache);
      dHidden = g.dHidden;
    }
    const reach = this.trainableReach();
    if (!reach[c.numLayers] && !this.norm.requiresGrad) return;
    rmsnormBackward(be, this.norm, dHidden, g.dResid, N, d, c.rmsNormEps, a.normF);
    for (let i = c.numLayers - 1; i >= 0; i--) {
      if (!reach[i + 1]) return;
      this.blockBackward(this.blocks[i]!, a.blocks[i]!, N, g, a.tmp);
    }
    embeddingBackward(be, this.embed, a.ids.subarray(0, N), g.dResid, d);
  }

  /**
   * Floats (and int32s) of the activation buffers for a batch [B, T] (Tk keys per query; T
   * without a KV cache), without and with the backward scratch. Bytes are 4× these.
   */
  activationFloats(B: number, T: number, Tk = T): { forward: number; backward: number } {
    const c = this.config;
    const N = B * T;
    const P = B * c.numHeads * T * Tk;
    const d = c.hiddenSize;
    const f = c.intermediateSize;
    let forward = N + (c.numLayers + 1) * N * d + N + 2 * N * d + N * c.vocabSize + N * this.lmHead.savedPerRow;
    for (const blk of this.blocks) {
      forward += 3 * N * d + 2 * N + attentionCacheFloats(blk.attn, N, P) + 3 * N * f;
      for (const l of [blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o, blk.mlp.gate, blk.mlp.up, blk.mlp.down]) forward += N * l.savedPerRow;
    }
    const qd = c.numHeads * c.headDim;
    const kvd = c.numKvHeads * c.headDim;
    const backward = 3 * N * d + N * (2 * qd + 2 * kvd) + P + 3 * N * f;
    return { forward, backward };
  }

  /** Floats held by the current activation buffers (to check activationFloats). */
  allocatedFloats(): { forward: number; backward: number } {
    const a = this.acts;
    if (!a) return { forward: 0, backward: 0 };
    let forward = 0;
    const count = (v: unknown): number => {
      if (v instanceof Float32Array || v instanceof Int32Array) return v.length;
      if (Array.isArray(v)) return v.reduce((s: number, x) => s + count(x), 0);
      if (v && typeof v === 'object') return Object.entries(v).reduce((s, [k, x]) => s + (k === 'x' || k === 'grad' || k === 'linears' ? 0 : count(x)), 0);
      return 0;
    };
    forward = count(a);
    return { forward, backward: a.grad ? count(a.grad) : 0 };
  }

  /** Releases the activation buffers (and the backend when the model created it). */
  dispose(): void {
    this.acts = null;
    this.last = null;
    this.releaseAll(this.actsOwned);
    this.releaseAll(this.gradOwned);
    if (this.ownsBackend) this.backend.dispose();
  }

  // -------------------------------------------------------------------------------------------

  private blockForward(
    blk: Block,
    x: Float32Array,
    out: Float32Array,
    B: number,
    T: number,
    cache: BlockCache,
    tmp: Float32Array,
    past: { k: Float32Array; v: Float32Array; capacity: number; offset: number } | null,
  ): void {
    const c = this.config;
    const be = this.backend;
    const N = B * T;
    const d = c.hiddenSize;
    rmsnormForward(be, blk.inputNorm, x, cache.xn1, N, d, c.rmsNormEps, cache.n1);
    attentionForward(be, blk.attn, cache.xn1, tmp, B, T, this.rope, cache.attn, past);
    be.add(x, tmp, cache.xMid, N * d);
    rmsnormForward(be, blk.postNorm, cache.xMid, cache.xn2, N, d, c.rmsNormEps, cache.n2);
    mlpForward(be, blk.mlp, cache.xn2, tmp, N, cache.mlp);
    be.add(cache.xMid, tmp, out, N * d);
  }

  /** g.dResid holds d(block output) on entry and d(block input) on exit. */
  private blockBackward(blk: Block, cache: BlockCache, N: number, g: GradScratch, tmp: Float32Array): void {
    const c = this.config;
    const be = this.backend;
    const d = c.hiddenSize;
    mlpBackward(be, blk.mlp, g.dResid, g.dNormed, cache.mlp, g.mlp);
    rmsnormBackward(be, blk.postNorm, g.dNormed, tmp, N, d, c.rmsNormEps, cache.n2);
    be.add(g.dResid, tmp, g.dResid, N * d);
    attentionBackward(be, blk.attn, g.dResid, g.dNormed, this.rope, cache.attn, g.attn);
    rmsnormBackward(be, blk.inputNorm, g.dNormed, tmp, N, d, c.rmsNormEps, cache.n1);
    be.add(g.dResid, tmp, g.dResid, N * d);
  }

  /** reach[i]: some parameter of the embedding or of blocks 0…i−1 is trainable (i = 0…L). */
  private trainableReach(): boolean[] {
    const reach: boolean[] = [this.embed.requiresGrad];
    this.blocks.forEach((blk, i) => {
      const ps = [blk.inputNorm, ...attentionParameters(blk.attn), blk.postNorm, ...mlpParameters(blk.mlp)];
      reach.push(reach[i]! || ps.some((p) => p.requiresGrad));
    });
    return reach;
  }

  /** Allocates through the backend (resident buffers where it has them), recording into `owned`. */
  private allocator(owned: Float32Array[]): (n: number) => Float32Array {
    const be = this.backend;
    return (n) => {
      const a = be.allocate ? be.allocate(n) : new Float32Array(n);
      owned.push(a);
      return a;
    };
  }

  private releaseAll(owned: Float32Array[]): void {
    const be = this.backend;
    if (be.release) for (const a of owned) be.release(a);
    owned.length = 0;
  }

  private currentLinears(): LinearLayer[] {
    return this.linearSlots().map((s) => s.get());
  }

  /** The activation buffers, (re)allocated when the batch outgrows them or a layer was swapped. */
  private activations(rows: number, probs: number): Activations {
    const linears = this.currentLinears();
    const a = this.acts;
    if (a && rows <= a.rows && probs <= a.probs && linears.every((l, i) => l === a.linears[i])) return a;
    const c = this.config;
    const R = Math.max(rows, a?.rows ?? 0);
    const P = Math.max(probs, a?.probs ?? 0);
    const d = c.hiddenSize;
    const keepGrad = a?.grad && a.rows >= R && a.probs >= P ? a.grad : null;
    this.acts = null;
    this.releaseAll(this.actsOwned);
    if (!keepGrad) this.releaseAll(this.gradOwned);
    const alloc = this.allocator(this.actsOwned);
    const acts: Activations = {
      rows: R,
      probs: P,
      linears,
      ids: new Int32Array(R),
      xs: Array.from({ length: c.numLayers + 1 }, () => alloc(R * d)),
      blocks: this.blocks.map((blk) => ({
        n1: createRmsNormCache(R, alloc),
        xn1: alloc(R * d),
        attn: createAttentionCache(blk.attn, R, P, alloc),
        xMid: alloc(R * d),
        n2: createRmsNormCache(R, alloc),
        xn2: alloc(R * d),
        mlp: createMlpCache(blk.mlp, R, alloc),
      })),
      normF: createRmsNormCache(R, alloc),
      hidden: alloc(R * d),
      logits: alloc(R * c.vocabSize),
      headCache: this.lmHead.createCache(R),
      tmp: alloc(R * d),
      grad: keepGrad,
    };
    this.acts = acts;
    return acts;
  }

  private createGradScratch(rows: number, probs: number): GradScratch {
    const c = this.config;
    const d = c.hiddenSize;
    const alloc = this.allocator(this.gradOwned);
    return {
      dResid: alloc(rows * d),
      dNormed: alloc(rows * d),
      dHidden: alloc(rows * d),
      attn: createAttentionScratch(c, rows, probs, alloc),
      mlp: createMlpScratch(c.intermediateSize, rows, alloc),
    };
  }
}
