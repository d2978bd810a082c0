/**
 * LoRA (formats.md §4): a frozen linear layer W plus a trainable low-rank update,
 *
 *   y = x·Wᵀ (+ b) + s · (x·Aᵀ)·Bᵀ,   A [r, in], B [out, r],   s = α/r (or α/√r with rsLoRA),
 *
 * so that the merged weight is W + s·B·A. Names and initialisation follow PEFT: parameters are
 * `<module>.lora_A.weight` / `.lora_B.weight`; A is kaiming-uniform (a = √5, i.e. U(±1/√in)) and
 * B is zero, unless the caller sets them.
 */
import type { Backend } from '../backend/backend.js';
import { AmalgamError } from '../errors.js';
import { PEFT_PREFIX, loraScaling } from '../io/peft.js';
import { Rng } from '../tensor/rng.js';
import { Linear, type LinearCache, type LinearLayer } from './layers/linear.js';
import type { LlamaModel } from './model.js';
import { Parameter } from './params.js';

export type LoraFreeze = 'none' | 'A' | 'B';

export class LoraLinear implements LinearLayer {
  readonly name: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly A: Parameter;
  readonly B: Parameter;
  readonly scaling: number;

  constructor(
    readonly base: Linear,
    readonly rank: number,
    readonly alpha: number,
    readonly rslora = false,
  ) {
    if (!Number.isSafeInteger(rank) || rank < 1) throw new AmalgamError('E_USAGE', `LoRA rank must be a positive integer, got ${rank}`, { key: base.name });
    if (!Number.isFinite(alpha)) throw new AmalgamError('E_USAGE', `LoRA alpha must be a number, got ${alpha}`, { key: base.name });
    this.name = base.name;
    this.inFeatures = base.inFeatures;
    this.outFeatures = base.outFeatures;
    this.A = new Parameter(`${base.name}.lora_A.weight`, [rank, base.inFeatures], new Float32Array(rank * base.inFeatures));
    this.B = new Parameter(`${base.name}.lora_B.weight`, [base.outFeatures, rank], new Float32Array(base.outFeatures * rank));
    this.scaling = loraScaling(alpha, rank, rslora);
  }

  /** x·Aᵀ and its gradient, rank floats each. */
  get savedPerRow(): number {
    return 2 * this.rank;
  }

  /** PEFT's default: A ~ kaiming_uniform(a = √5) = U(−1/√in, 1/√in), B = 0. */
  resetParameters(rng: Rng): void {
    const bound = 1 / Math.sqrt(this.inFeatures);
    const a = this.A.data;
    for (let i = 0; i < a.length; i++) a[i] = (2 * rng.next() - 1) * bound;
    this.B.data.fill(0);
  }

  /** saved[0] = x·Aᵀ [rows, r]; saved[1] is backward scratch for d(x·Aᵀ) [rows, r]. */
  createCache(maxRows: number): LinearCache {
    return { x: new Float32Array(0), saved: [new Float32Array(maxRows * this.rank), new Float32Array(maxRows * this.rank)] };
  }

  forward(be: Backend, x: Float32Array, y: Float32Array, rows: number, cache: LinearCache): void {
    this.base.forward(be, x, y, rows, cache);
    const u = cache.saved[0]!;
    be.matmul(x, this.A.data, u, rows, this.inFeatures, this.rank, { transB: true });
    be.matmul(u, this.B.data, y, rows, this.rank, this.outFeatures, { transB: true, alpha: this.scaling, accumulate: true });
  }

  backward(be: Backend, dy: Float32Array, dx: Float32Array | null, rows: number, cache: LinearCache, accumulateDx = false): void {
    const [u, du] = cache.saved as [Float32Array, Float32Array];
    const r = this.rank;
    this.base.backward(be, dy, dx, rows, cache, accumulateDx);
    // dB += s·dyᵀ·u;  du = s·dy·B;  dA += duᵀ·x;  dx += du·A.
    if (this.B.grad) be.matmul(dy, u, this.B.grad, this.outFeatures, rows, r, { transA: true, alpha: this.scaling, accumulate: true });
    if (!this.A.grad && !dx) return;
    be.matmul(dy, this.B.data, du, rows, this.outFeatures, r, { alpha: this.scaling });
    if (this.A.grad) be.matmul(du, cache.x, this.A.grad, r, rows, this.inFeatures, { transA: true, accumulate: true });
    if (dx) be.matmul(du, this.A.data, dx, rows, r, this.inFeatures, { accumulate: true });
  }

  parameters(): Parameter[] {
    return [...this.base.parameters(), this.A, this.B];
  }

  /** s·B·A [out, in]. */
  deltaWeight(be: Backend): Float32Array {
    const out = new Float32Array(this.outFeatures * this.inFeatures);
    be.matmul(this.B.data, this.A.data, out, this.outFeatures, this.rank, this.inFeatures, { alpha: this.scaling });
    return out;
  }

  /** W + s·B·A [out, in], the weight a merged model stores. */
  mergedWeight(be: Backend): Float32Array {
    const out = this.deltaWeight(be);
    be.add(out, this.base.weight.data, out, out.length);
    return out;
  }
}

/** What an init hook sees for each new module; it may overwrite A and B in place. */
export interface LoraInitContext {
  /** Module path, e.g. `model.layers.0.self_attn.q_proj`. */
  name: string;
  layer: number | null;
  inFeatures: number;
  outFeatures: number;
  rank: number;
  A: Float32Array;
  B: Float32Array;
  module: LoraLinear;
}

export interface LoraOptions {
  /**
   * Modules to adapt, PEFT `target_modules` style: an entry matches a module path equal to it or
   * ending in `.<entry>` (`q_proj`, `self_attn.v_proj`, `lm_head`); a RegExp must match the whole path.
   */
  targets: string[] | RegExp;
  rank: number;
  /** α (default: rank, i.e. s = 1). */
  alpha?: number;
  /** Rank-stabilised scaling α/√r. */
  rslora?: boolean;
  /** Only these block indices (PEFT `layers_to_transform`). */
  layers?: number[];
  /** Keep A or B fixed during training (default: train both). */
  freeze?: LoraFreeze;
  /** Freeze every parameter of the model itself (default true). */
  freezeBase?: boolean;
  /** Seed of the default initialisation (default 0). */
  seed?: number;
  /** Called for each module after the default initialisation, in model order. */
  init?: (ctx: LoraInitContext) => void;
}

function matchesTarget(targets: string[] | RegExp, path: string): boolean {
  if (targets instanceof RegExp) {
    const m = path.match(targets);
    return m !== null && m.index === 0 && m[0].length === path.length;
  }
  return targets.some((t) => path === t || path.endsWith(`.${t}`));
}

/**
 * Wraps every targeted linear layer of the model in a LoraLinear and returns the new modules.
 * Errors when nothing matches, when a target is already adapted, or when it is not a dense layer.
 */
export function attachLora(model: LlamaModel, opts: LoraOptions): LoraLinear[] {
  const alpha = opts.alpha ?? opts.rank;
  const freeze = opts.freeze ?? 'none';
  if (!['none', 'A', 'B'].includes(freeze)) throw new AmalgamError('E_USAGE', `freeze must be 'none', 'A' or 'B', got ${String(freeze)}`);
  const slots = model
    .linearSlots()
    .filter((s) => matchesTarget(opts.targets, s.name) && (opts.layers === undefined || (s.layer !== null && opts.layers.includes(s.layer))));
  if (slots.length === 0) {
    throw new AmalgamError('E_USAGE', `no linear layer matches the LoRA targets ${String(opts.targets)}`, {
      hint: 'use module names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or lm_head',
    });
  }
  if (opts.freezeBase ?? true) model.setTrainable(() => false);
  const rng = new Rng(opts.seed ?? 0);
  const modules: LoraLinear[] = [];
  for (const slot of slots) {
    const base = slot.get();
    if (base instanceof LoraLinear) throw new AmalgamError('E_USAGE', 'already has a LoRA adapter', { key: slot.name });
    if (!(base instanceof Linear)) throw new AmalgamError('E_USAGE', 'LoRA needs a dense linear layer here', { key: slot.name });
    const m = new LoraLinear(base, opts.rank, alpha, opts.rslora ?? false);
    m.resetParameters(rng);
    opts.init?.({ name: slot.name, layer: slot.layer, inFeatures: m.inFeatures, outFeatures: m.outFeatures, rank: m.rank, A: m.A.data, B: m.B.data, module: m });
    m.A.setRequiresGrad(freeze !== 'A');
    m.B.setRequiresGrad(freeze !== 'B');
    slot.set(m);
    modules.push(m);
  }
  return modules;
}

/** The LoRA modules currently in the model. */
export function loraModules(model: LlamaModel): LoraLinear[] {
  return model
    .linearSlots()
    .map((s) => s.get())
    .filter((l): l is LoraLinear => l instanceof LoraLinear);
}

/** The adapter tensors under PEFT names (`base_model.model.<module>.lora_A.weight`, …), A then B per module. */
export function loraStateDict(model: LlamaModel): Map<string, { shape: number[]; data: Float32Array }> {
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const m of loraModules(model)) {
    out.set(PEFT_PREFIX + m.A.name, { shape: [...m.A.shape], data: m.A.data });
    out.set(PEFT_PREFIX + m.B.name, { shape: [...m.B.shape], data: m.B.data });
  }
  return out;
}

/**
 * An `adapter_config.json` object for the model's adapters (one rank and α for all modules;
 * `target_modules` lists the module names adapted).
 */
export function loraAdapterConfig(model: LlamaModel, extra: { baseModel?: string; taskType?: string } = {}): Record<string, unknown> {
  const mods = loraModules(model);
  if (mods.length === 0) throw new AmalgamError('E_USAGE', 'the model has no LoRA modules');
  const first = mods[0]!;
  if (mods.some((m) => m.rank !== first.rank || m.alpha !== first.alpha || m.rslora !== first.rslora)) {
    throw new AmalgamError('E_UNSUPPORTED', 'LoRA modules with different ranks or alphas need rank_pattern/alpha_pattern, which this export does not write');
  }
  const names = [...new Set(mods.map((m) => m.name.split('.').pop()!))].sort();
  return {
    peft_type: 'LORA',
    task_type: extra.taskType ?? 'CAUSAL_LM',
    base_model_name_or_path: extra.baseModel ?? null,
    r: first.rank,
    lora_alpha: first.alpha,
    use_rslora: first.rslora,
    target_modules: names,
    lora_dropout: 0,
    bias: 'none',
    fan_in_fan_out: false,
    init_lora_weights: true,
    inference_mode: true,
  };
}

/** Merged weights W + s·B·A of every adapted module, by base tensor name (`<module>.weight`). */
export function mergedLoraWeights(model: LlamaModel): Map<string, Float32Array> {
  return new Map(loraModules(model).map((m) => [m.base.weight.name, m.mergedWeight(model.backend)]));
}

/**
 * Removes the adapters from the model. With `merge` (default true) each base weight becomes
 * W + s·B·A first; otherwise the base layers come back unchanged. Merging into an lm_head tied
 * to the embedding is refused, since it would change the input embedding as well.
 */
export function detachLora(model: LlamaModel, merge = true): void {
  for (const slot of model.linearSlots()) {
    const l = slot.get();
    if (!(l instanceof LoraLinear)) continue;
    if (merge && l.base.weight === model.embed) {
      throw new AmalgamError('E_UNSUPPORTED', 'cannot merge a LoRA update into an lm_head tied to the input embedding', {
        key: slot.name,
        hint: 'export the adapter instead, or untie the embeddings first',
      });
    }
  }
  for (const slot of model.linearSlots()) {
    const l = slot.get();
    if (!(l instanceof LoraLinear)) continue;
    if (merge) l.base.weight.data.set(l.mergedWeight(model.backend));
    slot.set(l.base);
  }
}
