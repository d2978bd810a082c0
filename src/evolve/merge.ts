/**
 * A merge whose parameters vary by layer group, computed in memory into an ordinary
 * `LlamaModel`: the genome of `mergekit-evolve` (per layer group, per model: weight, and density
 * for the sparsifying methods). Applying a genome merges every tensor with the registry's
 * `mergeTensor` straight into the model's parameter arrays; nothing is written to disk.
 *
 * Groups: `layerGranularity` consecutive decoder layers form one group (0: all layers one
 * group). The tensors outside the layers (embedding, final norm, lm_head) form a group of their
 * own ('separate', the default), or join the first (embedding) and last (norm, lm_head) layer
 * group ('edges').
 *
 * Genome layout: genome[(g·N + i)·P + p] for group g, model i and parameter p (weight first,
 * then density). Values are mapped as mergekit-evolve maps them: weights → |w| (unless negative
 * weights are allowed), densities → clamp(|d|, 0, 1).
 */
import type { Backend } from '../backend/backend.js';
import { AmalgamError } from '../errors.js';
import { mergeTensor, prepareParams, tensorRng, type RawParams } from '../merge/index.js';
import type { LlamaConfig } from '../nn/config.js';
import { LlamaModel } from '../nn/model.js';
import { llamaParameterShapes, Parameter } from '../nn/params.js';
import { checkSameArchitecture } from '../dam/model.js';

export const EVOLVE_METHODS = ['linear', 'task_arithmetic', 'ties', 'dare_ties'] as const;
export type EvolveMethod = (typeof EVOLVE_METHODS)[number];

/** The genome's parameters of each method, as mergekit-evolve's METHOD_PARAM_MAPS. */
export const EVOLVE_METHOD_PARAMS: Readonly<Record<EvolveMethod, readonly ('weight' | 'density')[]>> = {
  linear: ['weight'],
  task_arithmetic: ['weight'],
  ties: ['weight', 'density'],
  dare_ties: ['weight', 'density'],
};

export interface GroupedMergeOptions {
  method: EvolveMethod;
  /** Decoder layers per group (default 1; 0: one group for all layers). */
  layerGranularity?: number;
  /** Where the embedding, final norm and lm_head take their parameters from (default 'separate'). */
  nonLayer?: 'separate' | 'edges';
  /** The method's normalize (default: true for linear, ties and dare_ties, false for task_arithmetic). */
  normalize?: boolean;
  /** The task-vector scale λ of the task-vector methods (default 1). */
  lambda?: number;
  /** Keep the sign of weights (default false: |w|). */
  allowNegativeWeights?: boolean;
  /** Seed of DARE's masks, per tensor (default 0). */
  seed?: number;
  /** Backend of the merged model (default: the first model's). */
  backend?: Backend;
}

/** One merged tensor and where its inputs are. */
interface GroupedTensor {
  name: string;
  shape: number[];
  group: number;
  isEmbed: boolean;
  base: Float32Array | null;
  inputs: Float32Array[];
  target: Parameter;
}

/** Decoded value of one genome entry. */
export interface GenomeEntry {
  group: string;
  model: string;
  weight: number;
  density?: number;
}

export class GroupedMerge {
  /** The merged model (its own parameter arrays). */
  readonly model: LlamaModel;
  readonly config: LlamaConfig;
  readonly method: EvolveMethod;
  readonly params: readonly ('weight' | 'density')[];
  /** Group labels, in genome order. */
  readonly groups: string[];
  readonly modelIds: string[];
  readonly baseId: string | null;
  readonly normalize: boolean;
  readonly lambda: number;
  readonly allowNegativeWeights: boolean;
  readonly seed: number;
  private readonly tensors: GroupedTensor[];

  constructor(base: LlamaModel | null, models: readonly LlamaModel[], opts: GroupedMergeOptions, ids?: { base?: string; models?: string[] }) {
    if (!EVOLVE_METHODS.includes(opts.method)) {
      throw new AmalgamError('E_USAGE', `evolutionary merging does not support '${String(opts.method)}'`, { hint: `use one of ${EVOLVE_METHODS.join(', ')}` });
    }
    if (models.length < 2) throw new AmalgamError('E_USAGE', `merging needs at least 2 models, got ${models.length}`);
    const needsBase = opts.method !== 'linear';
    if (needsBase && !base) throw new AmalgamError('E_USAGE', `${opts.method} needs a base model`);
    this.method = opts.method;
    this.params = EVOLVE_METHOD_PARAMS[opts.method];
    this.modelIds = ids?.models ?? models.map((_, i) => `model_${i}`);
    if (this.modelIds.length !== models.length || new Set(this.modelIds).size !== models.length) throw new AmalgamError('E_USAGE', 'model ids must be unique, one per model');
    this.baseId = needsBase ? (ids?.base ?? 'base') : null;
    if (this.baseId !== null && this.modelIds.includes(this.baseId)) throw new AmalgamError('E_USAGE', `the base id '${this.baseId}' is also a model id`);
    const all = needsBase ? [base!, ...models] : [...models];
    checkSameArchitecture(
      all.map((m) => m.config),
      needsBase ? [this.baseId!, ...this.modelIds] : this.modelIds,
    );
    this.config = models[0]!.config;
    const L = this.config.numLayers;
    const g = opts.layerGranularity ?? 1;
    if (!Number.isSafeInteger(g) || g < 0) throw new AmalgamError('E_USAGE', `layer granularity must be an integer ≥ 0, got ${g}`);
    const per = g === 0 ? L : Math.min(g, L);
    const layerGroups = Math.ceil(L / per);
    const nonLayer = opts.nonLayer ?? 'separate';
    if (nonLayer !== 'separate' && nonLayer !== 'edges') throw new AmalgamError('E_USAGE', `unknown non-layer grouping '${String(nonLayer)}'`, { hint: "use 'separate' or 'edges'" });
    this.groups = Array.from({ length: layerGroups }, (_, k) => {
      const a = k * per;
      const b = Math.min(L, a + per) - 1;
      return a === b ? `layer ${a}` : `layers ${a}-${b}`;
    });
    if (nonLayer === 'separate') this.groups.push('embed/norm/head');
    this.normalize = opts.normalize ?? opts.method !== 'task_arithmetic';
    this.lambda = opts.lambda ?? 1;
    this.allowNegativeWeights = opts.allowNegativeWeights ?? false;
    this.seed = opts.seed ?? 0;

    const named = models.map((m) => m.namedParameters());
    const baseNamed = base && needsBase ? base.namedParameters() : null;
    const params = new Map<string, Parameter>();
    this.tensors = llamaParameterShapes(this.config).map(({ name, shape }) => {
      const m = /^model\.layers\.(\d+)\./.exec(name);
      let group: number;
      if (m) group = Math.floor(Number(m[1]) / per);
      else if (nonLayer === 'separate') group = layerGroups;
      else group = name === 'model.embed_tokens.weight' ? 0 : layerGroups - 1;
      const get = (p: Map<string, Parameter>, who: string) => {
        const v = p.get(name);
        if (!v) throw new AmalgamError('E_MISSING', `${who} has no tensor`, { key: name });
        return v.data;
      };
      const inputs = named.map((p, i) => get(p, this.modelIds[i]!));
      const baseData = baseNamed ? get(baseNamed, this.baseId!) : null;
      const target = new Parameter(name, shape, Float32Array.from(baseData ?? inputs[0]!));
      params.set(name, target);
      return { name, shape, group, isEmbed: name === 'model.embed_tokens.weight' || name === 'lm_head.weight', base: baseData, inputs, target };
    });
    this.model = new LlamaModel(this.config, params, { backend: opts.backend ?? models[0]!.backend });
    this.model.setTrainable(() => false);
  }

  get numModels(): number {
    return this.modelIds.length;
  }

  /** Genome length: groups × models × parameters. */
  get dimension(): number {
    return this.groups.length * this.numModels * this.params.length;
  }

  private index(g: number, i: number, p: number): number {
    return (g * this.numModels + i) * this.params.length + p;
  }

  /** mergekit-evolve's start: weight 1/N, density 1. */
  initialGenome(): Float64Array {
    const x = new Float64Array(this.dimension);
    for (let g = 0; g < this.groups.length; g++) {
      for (let i = 0; i < this.numModels; i++) {
        x[this.index(g, i, 0)] = 1 / this.numModels;
        if (this.params.length > 1) x[this.index(g, i, 1)] = 1;
      }
    }
    return x;
  }

  /** A genome with the same values in every group: weights (and densities) per model or one for all. */
  uniformGenome(weight: number | readonly number[], density: number | readonly number[] = 1): Float64Array {
    const pick = (v: number | readonly number[], i: number) => (typeof v === 'number' ? v : v[i]!);
    const x = new Float64Array(this.dimension);
    for (let g = 0; g < this.groups.length; g++) {
      for (let i = 0; i < this.numModels; i++) {
        x[this.index(g, i, 0)] = pick(weight, i);
        if (this.params.length > 1) x[this.index(g, i, 1)] = pick(density, i);
      }
    }
    return x;
  }

  /** Lower and upper bounds per genome entry from bounds per parameter. */
  genomeBounds(b: { weight?: [number, number]; density?: [number, number] }): { lower: Float64Array; upper: Float64Array } {
    const lower = new Float64Array(this.dimension);
    const upper = new Float64Array(this.dimension);
    for (let k = 0; k < this.dimension; k++) {
      const p = this.params[k % this.params.length]!;
      const [lo, hi] = p === 'weight' ? (b.weight ?? [-Infinity, Infinity]) : (b.density ?? [0, 1]);
      lower[k] = lo;
      upper[k] = hi;
    }
    return { lower, upper };
  }

  private value(genome: ArrayLike<number>, g: number, i: number, p: number): number {
    const v = genome[this.index(g, i, p)]!;
    if (this.params[p] === 'density') return Math.min(1, Math.abs(v));
    return this.allowNegativeWeights ? v : Math.abs(v);
  }

  /** The genome's values as they are used, per group and model. */
  decode(genome: ArrayLike<number>): GenomeEntry[] {
    this.checkGenome(genome);
    const out: GenomeEntry[] = [];
    this.groups.forEach((group, g) => {
      this.modelIds.forEach((model, i) => {
        const e: GenomeEntry = { group, model, weight: this.value(genome, g, i, 0) };
        if (this.params.length > 1) e.density = this.value(genome, g, i, 1);
        out.push(e);
      });
    });
    return out;
  }

  private checkGenome(genome: ArrayLike<number>): void {
    if (genome.length !== this.dimension) throw new AmalgamError('E_USAGE', `the genome has ${genome.length} values, the merge needs ${this.dimension}`);
  }

  /** The merge parameters of one group, as a merge configuration would give them. */
  rawParams(genome: ArrayLike<number>, g: number): RawParams {
    const perModel: Record<string, Record<string, number>> = {};
    this.modelIds.forEach((id, i) => {
      const v: Record<string, number> = { weight: this.value(genome, g, i, 0) };
      if (this.params.length > 1) v.density = this.value(genome, g, i, 1);
      perModel[id] = v;
    });
    const global: Record<string, number | boolean> = { normalize: this.normalize };
    if (this.method !== 'linear') global.lambda = this.lambda;
    return { global, perModel };
  }

  /** Merges every tensor with the genome's parameters into the merged model. */
  apply(genome: ArrayLike<number>): void {
    this.checkGenome(genome);
    const raws = this.groups.map((_, g) => this.rawParams(genome, g));
    const models = this.baseId !== null ? [this.baseId, ...this.modelIds] : this.modelIds;
    for (const t of this.tensors) {
      const params = prepareParams(this.method, { tensorName: t.name, models, base: this.baseId }, raws[t.group]!);
      const inputs = [...(t.base ? [{ model: this.baseId!, data: t.base, shape: t.shape }] : []), ...t.inputs.map((data, i) => ({ model: this.modelIds[i]!, data, shape: t.shape }))];
      const out = mergeTensor(this.method, {
        tensorName: t.name,
        isEmbed: t.isEmbed,
        inputs,
        base: this.baseId,
        params,
        rng: this.method === 'dare_ties' ? tensorRng(this.seed, t.name) : undefined,
      });
      if (!out) throw new AmalgamError('E_MISSING', `${this.method} left the tensor out`, { key: t.name });
      t.target.data.set(out.data);
    }
  }

  /** Releases the merged model's buffers (the inputs belong to the caller). */
  dispose(): void {
    this.model.dispose();
  }
}
