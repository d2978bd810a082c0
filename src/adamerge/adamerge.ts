/**
 * AdaMerging (Yang et al., ICLR 2024; spec dam.md §10.1): task-vector merging with learned
 * coefficients, θ = θ_base + Σ_k λ_k τ_k with τ_k = θ_k − θ_base, trained by minimising the
 * Shannon entropy of the merged model's predictions on unlabelled sequences.
 *
 * - Layer-wise (default): one λ_{k,l} per model k and parameter tensor l. Task-wise: one λ_k.
 * - Coefficients start at the prior 0.3 and are clamped to [0, 1] after every step; the base
 *   model's coefficient is fixed at 1.
 * - Gradient: the runtime's backward leaves G_l = ∂L/∂θ_l in the merged model's parameters, and
 *   ∂L/∂λ_{k,l} = Σ_j G_l[j]·τ_{k,l}[j] (summed over l for task-wise).
 * - Each step draws a batch from every data source; the loss is the sum over sources of the mean
 *   per-token entropy of that source's batch (the reference sums per-task entropies). Adam.
 */
import type { Backend } from '../backend/backend.js';
import { AmalgamError } from '../errors.js';
import { BatchSampler } from '../data/batching.js';
import type { LlamaConfig } from '../nn/config.js';
import { LlamaModel } from '../nn/model.js';
import { llamaParameterShapes, Parameter } from '../nn/params.js';
import { Rng } from '../tensor/rng.js';
import { checkSameArchitecture } from '../dam/model.js';

export type AdaMergeGranularity = 'layer' | 'task';

export interface AdaMergeOptions {
  /** 'layer' (default): one coefficient per model and tensor; 'task': one per model. */
  granularity?: AdaMergeGranularity;
  /** Initial coefficient (default 0.3, the reference's prior). */
  init?: number;
  /** Coefficients are clamped to this range after every step (default [0, 1]). */
  clamp?: [number, number];
  /** Backend of the merged model (default: the base's). */
  backend?: Backend;
}

interface AdaTensor {
  name: string;
  base: Float32Array;
  /** τ_k = θ_k − θ_base, one per model. */
  tau: Float32Array[];
  target: Parameter;
  /** Index of this tensor's coefficient row. */
  row: number;
}

/** Mean per-row Shannon entropy of softmax(logits) over the rows with weight ≠ 0, and its gradient. */
export function entropyLoss(logits: Float32Array, rows: number, vocab: number, opts: { weights?: ArrayLike<number>; dLogits?: Float32Array | null } = {}): { loss: number; count: number } {
  let count = 0;
  for (let r = 0; r < rows; r++) if (!opts.weights || opts.weights[r] !== 0) count++;
  const dLogits = opts.dLogits ?? null;
  const lp = new Float64Array(vocab);
  let total = 0;
  for (let r = 0; r < rows; r++) {
    const o = r * vocab;
    if (count === 0 || (opts.weights && opts.weights[r] === 0)) {
      if (dLogits) dLogits.fill(0, o, o + vocab);
      continue;
    }
    let max = -Infinity;
    for (let j = 0; j < vocab; j++) max = Math.max(max, logits[o + j]!);
    let sum = 0;
    for (let j = 0; j < vocab; j++) sum += Math.exp(logits[o + j]! - max);
    const lse = max + Math.log(sum);
    let h = 0;
    for (let j = 0; j < vocab; j++) {
      lp[j] = logits[o + j]! - lse;
      h -= Math.exp(lp[j]!) * lp[j]!;
    }
    total += h;
    if (dLogits) {
      for (let j = 0; j < vocab; j++) {
        const p = Math.exp(lp[j]!);
        dLogits[o + j] = (-p * (lp[j]! + h)) / count;
      }
    }
  }
  return { loss: count ? total / count : 0, count };
}

export class AdaMergeModel {
  /** The merged model; its parameters receive G = ∂L/∂θ during training. */
  readonly model: LlamaModel;
  readonly config: LlamaConfig;
  readonly granularity: AdaMergeGranularity;
  readonly clamp: [number, number];
  /** Coefficient rows: tensor names (layer-wise) or ['all'] (task-wise). */
  readonly rows: string[];
  /** λ[row·K + k]. */
  readonly lambdas: Float64Array;
  readonly grads: Float64Array;
  private readonly tensors: AdaTensor[];
  private stale = true;

  constructor(
    base: LlamaModel,
    models: readonly LlamaModel[],
    opts: AdaMergeOptions = {},
    /** Names of the models (for tables). */
    readonly modelIds: string[] = models.map((_, i) => `model_${i}`),
  ) {
    if (models.length < 1) throw new AmalgamError('E_USAGE', 'AdaMerging needs at least one fine-tuned model');
    if (modelIds.length !== models.length) throw new AmalgamError('E_USAGE', `${modelIds.length} ids for ${models.length} models`);
    checkSameArchitecture([base.config, ...models.map((m) => m.config)], ['base', ...modelIds]);
    this.config = base.config;
    this.granularity = opts.granularity ?? 'layer';
    if (this.granularity !== 'layer' && this.granularity !== 'task') throw new AmalgamError('E_USAGE', `unknown AdaMerging granularity '${String(this.granularity)}'`, { hint: "use 'layer' or 'task'" });
    this.clamp = opts.clamp ?? [0, 1];
    if (!(this.clamp[0] <= this.clamp[1])) throw new AmalgamError('E_USAGE', `the clamp range [${this.clamp.join(', ')}] is empty`);
    const init = opts.init ?? 0.3;
    if (!Number.isFinite(init)) throw new AmalgamError('E_USAGE', `the initial coefficient must be finite, got ${init}`);
    const baseNamed = base.namedParameters();
    const named = models.map((m) => m.namedParameters());
    const params = new Map<string, Parameter>();
    const shapes = llamaParameterShapes(this.config);
    this.rows = this.granularity === 'layer' ? shapes.map((s) => s.name) : ['all'];
    this.tensors = shapes.map(({ name, shape }, l) => {
      const b = baseNamed.get(name);
      if (!b) throw new AmalgamError('E_MISSING', 'the base model has no tensor', { key: name });
      const tau = named.map((m, k) => {
        const p = m.get(name);
        if (!p) throw new AmalgamError('E_MISSING', `${modelIds[k]} has no tensor`, { key: name });
        const t = new Float32Array(p.data.length);
        for (let j = 0; j < t.length; j++) t[j] = p.data[j]! - b.data[j]!;
        return t;
      });
      const target = new Parameter(name, shape, new Float32Array(b.data.length));
      params.set(name, target);
      return { name, base: b.data, tau, target, row: this.granularity === 'layer' ? l : 0 };
    });
    this.lambdas = new Float64Array(this.rows.length * models.length).fill(Math.min(this.clamp[1], Math.max(this.clamp[0], init)));
    this.grads = new Float64Array(this.lambdas.length);
    this.model = new LlamaModel(this.config, params, { backend: opts.backend ?? base.backend });
    this.model.setTrainable(() => true);
  }

  get numModels(): number {
    return this.modelIds.length;
  }

  /** Call after changing λ in place: the next forward re-merges. */
  lambdasChanged(): void {
    this.stale = true;
  }

  /** θ_l = θ_base,l + Σ_k λ_{k,l} τ_{k,l} into the merged model. */
  materialise(): void {
    const K = this.numModels;
    for (const t of this.tensors) {
      const out = t.target.data;
      out.set(t.base);
      for (let k = 0; k < K; k++) {
        const lam = this.lambdas[t.row * K + k]!;
        if (lam === 0) continue;
        const tau = t.tau[k]!;
        for (let j = 0; j < out.length; j++) out[j] = out[j]! + lam * tau[j]!;
      }
    }
    this.stale = false;
  }

  forward(ids: ArrayLike<number>, B: number, T: number): Float32Array {
    if (this.stale) this.materialise();
    return this.model.forward(ids, B, T);
  }

  /** Back-propagates d(loss)/d(logits) of the last forward into the merged parameters' gradients. */
  backward(dLogits: Float32Array): void {
    this.model.backward(dLogits);
  }

  /** Turns the accumulated parameter gradients into coefficient gradients (added to `grads`). */
  collectGradients(): void {
    const K = this.numModels;
    for (const t of this.tensors) {
      const g = t.target.grad!;
      for (let k = 0; k < K; k++) {
        const tau = t.tau[k]!;
        let s = 0;
        for (let j = 0; j < g.length; j++) s += g[j]! * tau[j]!;
        this.grads[t.row * K + k] += s;
      }
    }
  }

  zeroGrad(): void {
    this.model.zeroGrad();
    this.grads.fill(0);
  }

  /** Clamps every coefficient to the range. */
  clampLambdas(): void {
    const [lo, hi] = this.clamp;
    for (let i = 0; i < this.lambdas.length; i++) this.lambdas[i] = Math.min(hi, Math.max(lo, this.lambdas[i]!));
    this.stale = true;
  }

  /** The coefficients per row and model. */
  table(): { row: string; model: string; lambda: number }[] {
    const K = this.numModels;
    return this.rows.flatMap((row, r) => this.modelIds.map((model, k) => ({ row, model, lambda: this.lambdas[r * K + k]! })));
  }

  /** Mean coefficient of each model over the rows. */
  meanPerModel(): number[] {
    const K = this.numModels;
    return this.modelIds.map((_, k) => {
      let s = 0;
      for (let r = 0; r < this.rows.length; r++) s += this.lambdas[r * K + k]!;
      return s / this.rows.length;
    });
  }

  dispose(): void {
    this.model.dispose();
  }
}

export interface AdaMergeTrainOptions {
  /** Optimiser steps (default 500, as the reference). */
  steps?: number;
  /** Sequences per source per step (default 16). */
  batchSize?: number;
  /** Adam learning rate (default 1e-3). */
  lr?: number;
  betas?: [number, number];
  eps?: number;
  /** Seed of the data order (default 0). */
  seed?: number;
  /** Longest sequence fed (default 2048). */
  maxLength?: number;
  onStep?: (s: AdaMergeStepInfo) => void;
}

export interface AdaMergeStepInfo {
  step: number;
  steps: number;
  /** Σ over sources of the mean entropy. */
  loss: number;
  perSource: number[];
  /** Real tokens through the merged model so far. */
  tokens: number;
  meanLambda: number[];
  elapsedSeconds: number;
}

export interface AdaMergeTrainResult {
  steps: number;
  losses: number[];
  perSource: number[][];
  tokens: number;
  /** Forward-equivalent tokens (forward + backward = 3 × tokens). */
  forwardTokens: number;
  seconds: number;
  coefficientCount: number;
}

function padBatch(seqs: readonly ArrayLike<number>[], maxLength: number): { ids: Int32Array; B: number; T: number; weights: Float32Array; tokens: number } {
  const B = seqs.length;
  const lengths = seqs.map((s) => Math.min(s.length, maxLength));
  const T = Math.max(1, ...lengths);
  const ids = new Int32Array(B * T);
  const weights = new Float32Array(B * T);
  let tokens = 0;
  seqs.forEach((s, b) => {
    for (let t = 0; t < lengths[b]!; t++) {
      ids[b * T + t] = s[t]!;
      weights[b * T + t] = 1;
    }
    tokens += lengths[b]!;
  });
  return { ids, B, T, weights, tokens };
}

/** Trains the coefficients by entropy minimisation on every source's unlabelled sequences. */
export async function trainAdaMerge(am: AdaMergeModel, data: readonly { sequences: readonly ArrayLike<number>[] }[], opts: AdaMergeTrainOptions = {}): Promise<AdaMergeTrainResult> {
  if (data.length === 0) throw new AmalgamError('E_USAGE', 'AdaMerging needs unlabelled data');
  data.forEach((d, i) => {
    if (d.sequences.length === 0) throw new AmalgamError('E_USAGE', `data source ${i} has no sequences`);
  });
  const steps = opts.steps ?? 500;
  const batchSize = opts.batchSize ?? 16;
  const lr = opts.lr ?? 1e-3;
  const [b1, b2] = opts.betas ?? [0.9, 0.999];
  const eps = opts.eps ?? 1e-8;
  const maxLength = opts.maxLength ?? 2048;
  for (const [name, v] of [['steps', steps], ['batch size', batchSize], ['max length', maxLength]] as const) {
    if (!Number.isSafeInteger(v) || v < 1) throw new AmalgamError('E_USAGE', `${name} must be a positive integer, got ${v}`);
  }
  if (!(lr >= 0) || !Number.isFinite(lr)) throw new AmalgamError('E_USAGE', `the learning rate must be ≥ 0, got ${lr}`);
  const master = new Rng(opts.seed ?? 0);
  const samplers = data.map((d) => new BatchSampler(d.sequences.length, batchSize, { seed: master.nextU32() }));
  const m = new Float64Array(am.lambdas.length);
  const v = new Float64Array(am.lambdas.length);
  const V = am.config.vocabSize;
  const losses: number[] = [];
  const perSource: number[][] = [];
  let tokens = 0;
  const t0 = performance.now();
  am.clampLambdas();
  for (let step = 0; step < steps; step++) {
    am.zeroGrad();
    const terms: number[] = [];
    data.forEach((d, i) => {
      const b = padBatch(
        samplers[i]!.next().map((k) => d.sequences[k]!),
        maxLength,
      );
      const logits = am.forward(b.ids, b.B, b.T);
      const r = entropyLoss(logits, b.B * b.T, V, { weights: b.weights, dLogits: logits });
      am.backward(logits);
      terms.push(r.loss);
      tokens += b.tokens;
    });
    am.collectGradients();
    const t = step + 1;
    const c1 = 1 - b1 ** t;
    const c2 = 1 - b2 ** t;
    for (let j = 0; j < am.lambdas.length; j++) {
      const g = am.grads[j]!;
      m[j] = b1 * m[j]! + (1 - b1) * g;
      v[j] = b2 * v[j]! + (1 - b2) * g * g;
      am.lambdas[j] = am.lambdas[j]! - (lr * (m[j]! / c1)) / (Math.sqrt(v[j]! / c2) + eps);
    }
    am.clampLambdas();
    const loss = terms.reduce((a, x) => a + x, 0);
    losses.push(loss);
    perSource.push(terms);
    opts.onStep?.({ step: t, steps, loss, perSource: terms, tokens, meanLambda: am.meanPerModel(), elapsedSeconds: (performance.now() - t0) / 1000 });
    await new Promise<void>((r) => setImmediate(r));
  }
  am.zeroGrad();
  return { steps, losses, perSource, tokens, forwardTokens: 3 * tokens, seconds: (performance.now() - t0) / 1000, coefficientCount: am.lambdas.length };
}
