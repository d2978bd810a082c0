/**
 * The DAM model (dam.md §1): N source models of one architecture merged tensor by tensor with
 * learned per-column coefficients, run by the Llama runtime.
 *
 * The merged model is an ordinary `LlamaModel` whose parameters hold the merged values. With the
 * default `form: 'materialise'`, `forward` first recomputes every merged tensor with coefficients
 * from the current coefficients (once per coefficient update, N·rows·cols multiply-adds), the
 * runtime's backward leaves G = ∂L/∂merged in those parameters' gradients, and `backward`
 * turns G into coefficient gradients (`damMergeBackward`). With `form: 'gate'` the targeted
 * linear layers are replaced through `model.linearSlots()` by `DamLinear` layers in input-gating
 * form instead. Tensors without coefficients hold the uniform average of the sources.
 *
 * The sources stay loaded as `LlamaModel`s that share their weight arrays with the merge, so the
 * teachers run on the fly from the weights already in memory (`teacherForward`).
 */
import type { Backend } from '../backend/backend.js';
import { AmalgamError } from '../errors.js';
import type { LlamaConfig } from '../nn/config.js';
import { defaultBackend, LlamaModel, type ForwardOptions } from '../nn/model.js';
import { llamaParameterShapes, Parameter } from '../nn/params.js';
import { Rng } from '../tensor/rng.js';
import { averageInto, damActivation, damMergeBackward, damMergeForward, DamLinear, type Activation, type DamNonLinearity } from './layer.js';

export type DamTensorKind = 'linear' | 'embedding' | 'norm' | 'bias';

/** The linear modules of a Llama block, and the output head. */
export const DAM_LINEAR_MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'] as const;

/**
 * Initial raw coefficients: 'reference' c = 1/N (the reference start, f(c) ≠ 1/N under tanh);
 * 'soup' c = f⁻¹(1/N), so the initial merge is exactly the uniform average; 'random' one
 * softmax(U(0,1)ᴺ) draw per tensor (each source's vector constant); a number sets every raw
 * coefficient; a list gives each source's raw value.
 */
export type DamInit = 'reference' | 'soup' | 'random' | number | number[];

export interface DamOptions {
  /**
   * Linear modules with coefficients: names matched as PEFT `target_modules` (`q_proj`,
   * `mlp.down_proj`, `lm_head`, or a full module path), or 'all-linear' (default: every linear
   * layer and lm_head).
   */
  targets?: 'all-linear' | string[];
  /** Coefficients for the token embedding, one per hidden dimension (default false: averaged). */
  embeddings?: boolean;
  /** Coefficients for every RMSNorm weight, one per element (default false: averaged). */
  norms?: boolean;
  /** f (default 'tanh'). */
  nonLinearity?: DamNonLinearity;
  /** Default 'reference' (c = 1/N). */
  init?: DamInit;
  /** Seed of the 'random' initialisation (default 0). */
  seed?: number;
  /** 'materialise' (default): one matmul per layer on the merged weight; 'gate': N matmuls, no merged weight. */
  form?: 'materialise' | 'gate';
  /** Backend of the merged model (default: the first source's, or a new default backend for folders). */
  backend?: Backend;
}

/** One output tensor of the merge, as plain data. */
export interface DamTensorSpec {
  /** HF tensor name. */
  name: string;
  /** Module path (`model.layers.0.self_attn.q_proj`, `model.embed_tokens`, `model.norm`, `lm_head`). */
  module: string;
  kind: DamTensorKind;
  /** Stored shape. */
  shape: number[];
  /** The [rows, cols] view the coefficients scale column by column. */
  rows: number;
  cols: number;
  /** Names of the N coefficient vectors (`{module}.mergers.{i}`, `{module}.bias_mergers.{i}`), or null when averaged. */
  coefficientNames: string[] | null;
}

export interface DamTensor extends DamTensorSpec {
  /** Source i's values (shared with source model i). */
  sources: Float32Array[];
  /** The merged model's parameter (for a gated linear, a stand-in the model never reads). */
  target: Parameter;
  /** One coefficient vector per source [cols], or null. */
  coeffs: Parameter[] | null;
  /** Computed by a DamLinear layer rather than materialised. */
  gated: boolean;
}

function matchesTarget(targets: 'all-linear' | readonly string[], module: string): boolean {
  if (targets === 'all-linear') return true;
  return targets.some((t) => module === t || module.endsWith(`.${t}`));
}

/**
 * The tensors of a DAM merge of models with this configuration, in checkpoint order, with the
 * coefficient names of those that are merged with coefficients.
 */
export function planDamTensors(c: LlamaConfig, n: number, opts: Pick<DamOptions, 'targets' | 'embeddings' | 'norms'> = {}): DamTensorSpec[] {
  const targets = opts.targets ?? 'all-linear';
  if (targets !== 'all-linear') {
    if (!Array.isArray(targets) || targets.length === 0) throw new AmalgamError('E_USAGE', "DAM targets must be 'all-linear' or a non-empty list of module names");
  }
  const names = (module: string, what: string) => Array.from({ length: n }, (_, i) => `${module}.${what}.${i}`);
  const specs: DamTensorSpec[] = [];
  const linearModules: string[] = [];
  for (const { name, shape } of llamaParameterShapes(c)) {
    const isBias = name.endsWith('.bias');
    const module = name.slice(0, name.lastIndexOf('.'));
    let kind: DamTensorKind;
    let rows: number;
    let cols: number;
    let trained: boolean;
    if (name === 'model.embed_tokens.weight') {
      kind = 'embedding';
      [rows, cols] = [shape[0]!, shape[1]!];
      trained = opts.embeddings ?? false;
    } else if (shape.length === 1 && !isBias) {
      kind = 'norm';
      [rows, cols] = [1, shape[0]!];
      trained = opts.norms ?? false;
    } else if (isBias) {
      kind = 'bias';
      [rows, cols] = [shape[0]!, 1];
      trained = matchesTarget(targets, module);
    } else {
      kind = 'linear';
      [rows, cols] = [shape[0]!, shape[1]!];
      trained = matchesTarget(targets, module);
      linearModules.push(module);
    }
    specs.push({ name, module, kind, shape: [...shape], rows, cols, coefficientNames: trained ? names(module, kind === 'bias' ? 'bias_mergers' : 'mergers') : null });
  }
  if (targets !== 'all-linear') {
    const modules = c.tieWordEmbeddings ? [...linearModules, 'lm_head'] : linearModules;
    for (const t of targets) {
      if (!modules.some((m) => matchesTarget([t], m))) {
        throw new AmalgamError('E_USAGE', `the DAM target '${t}' matches no linear layer`, { hint: `use module names such as ${DAM_LINEAR_MODULES.join(', ')}` });
      }
    }
  }
  return specs;
}

/** Raw initial value of every coefficient of source i for the tensor (see DamInit). */
function initialValues(init: DamInit, n: number, act: Activation, rng: Rng): number[] {
  if (typeof init === 'number') {
    if (!Number.isFinite(init)) throw new AmalgamError('E_USAGE', `the DAM init must be finite, got ${init}`);
    return Array(n).fill(init);
  }
  if (Array.isArray(init)) {
    if (init.length !== n || init.some((v) => !Number.isFinite(v))) {
      throw new AmalgamError('E_USAGE', `the DAM init list must hold ${n} finite numbers (one per source), got ${JSON.stringify(init)}`);
    }
    return init.slice();
  }
  if (init === 'reference') return Array(n).fill(1 / n);
  if (init === 'soup') {
    const v = act.inverse(1 / n);
    if (!Number.isFinite(v)) throw new AmalgamError('E_USAGE', `no raw coefficient gives ${act.name}(c) = 1/${n}`, { hint: "use init 'reference' or a number" });
    return Array(n).fill(v);
  }
  if (init === 'random') {
    const u = Array.from({ length: n }, () => rng.next());
    const m = Math.max(...u);
    const e = u.map((x) => Math.exp(x - m));
    const s = e.reduce((a, b) => a + b, 0);
    return e.map((x) => x / s);
  }
  throw new AmalgamError('E_USAGE', `unknown DAM init '${String(init)}'`, { hint: "use 'reference', 'soup', 'random', a number or a list" });
}

/** Configuration fields that must agree between sources (their HF names for messages). */
const SAME_CONFIG: [keyof LlamaConfig, string][] = [
  ['vocabSize', 'vocab_size'],
  ['hiddenSize', 'hidden_size'],
  ['intermediateSize', 'intermediate_size'],
  ['numLayers', 'num_hidden_layers'],
  ['numHeads', 'num_attention_heads'],
  ['numKvHeads', 'num_key_value_heads'],
  ['headDim', 'head_dim'],
  ['ropeTheta', 'rope_theta'],
  ['rmsNormEps', 'rms_norm_eps'],
  ['tieWordEmbeddings', 'tie_word_embeddings'],
  ['qkvBias', 'attention_bias (q/k/v)'],
  ['oBias', 'attention_bias (o)'],
  ['mlpBias', 'mlp_bias'],
  ['slidingWindow', 'sliding_window'],
];

/** Throws E_ARCH naming the first difference between the sources' configurations. */
export function checkSameArchitecture(configs: readonly LlamaConfig[], ids: readonly string[]): void {
  const first = configs[0]!;
  for (let i = 1; i < configs.length; i++) {
    const c = configs[i]!;
    for (const [key, hf] of SAME_CONFIG) {
      if (c[key] !== first[key]) {
        throw new AmalgamError('E_ARCH', `DAM needs sources of one architecture: ${hf} is ${JSON.stringify(c[key])} in ${ids[i]} but ${JSON.stringify(first[key])} in ${ids[0]}`, {
          hint: 'every source must have the same tensor shapes (truncate or pad vocabularies first)',
        });
      }
    }
  }
}

export class DamModel {
  /** The merged model. */
  readonly model: LlamaModel;
  readonly config: LlamaConfig;
  readonly act: Activation;
  readonly tensors: DamTensor[];
  readonly form: 'materialise' | 'gate';
  private stale = true;
  /** The sources' model folders, when loaded from folders. */
  readonly folders: string[] | null;
  private readonly ownsSources: boolean;
  private readonly ownedBackend: Backend | null;

  private constructor(
    /** The source models (the teachers), in order. */
    readonly sources: LlamaModel[],
    /** How each source is named (folder path or given id). */
    readonly sourceIds: string[],
    readonly options: Readonly<Required<Omit<DamOptions, 'backend'>>>,
    backend: Backend,
    owns: { sources: boolean; backend: Backend | null; folders: string[] | null },
  ) {
    const n = sources.length;
    if (n < 2) throw new AmalgamError('E_USAGE', `DAM merges at least 2 models, got ${n}`);
    checkSameArchitecture(
      sources.map((s) => s.config),
      sourceIds,
    );
    this.config = sources[0]!.config;
    this.act = damActivation(options.nonLinearity);
    this.form = options.form;
    if (this.form !== 'materialise' && this.form !== 'gate') throw new AmalgamError('E_USAGE', `unknown DAM form '${String(this.form)}'`, { hint: "use 'materialise' or 'gate'" });
    this.ownsSources = owns.sources;
    this.folders = owns.folders;
    this.ownedBackend = owns.backend;
    const named = sources.map((s) => s.namedParameters());
    const rng = new Rng(options.seed);
    const specs = planDamTensors(this.config, n, options);
    const gatedModules = new Set<string>();
    if (this.form === 'gate') {
      for (const s of specs) if (s.kind === 'linear' && s.coefficientNames) gatedModules.add(s.module);
    }
    const params = new Map<string, Parameter>();
    this.tensors = specs.map((spec) => {
      const srcs = named.map((m, i) => {
        const p = m.get(spec.name);
        if (!p) throw new AmalgamError('E_MISSING', `source ${sourceIds[i]} has no tensor`, { key: spec.name });
        return p.data;
      });
      const gated = gatedModules.has(spec.module);
      let coeffs: Parameter[] | null = null;
      if (spec.coefficientNames) {
        const init = initialValues(options.init, n, this.act, rng);
        coeffs = spec.coefficientNames.map((cn, i) => {
          const p = new Parameter(cn, [spec.cols], new Float32Array(spec.cols).fill(init[i]!));
          p.setRequiresGrad(true);
          return p;
        });
      }
      const target = new Parameter(spec.name, spec.shape, gated ? srcs[0]! : new Float32Array(spec.rows * spec.cols));
      if (!gated && !coeffs) averageInto(target.data, srcs);
      params.set(spec.name, target);
      return { ...spec, sources: srcs, target, coeffs, gated };
    });
    this.model = new LlamaModel(this.config, params, { backend });
    this.model.setTrainable(() => false);
    for (const t of this.tensors) if (t.coeffs && !t.gated) t.target.setRequiresGrad(true);
    if (this.form === 'gate') {
      const byName = new Map(this.tensors.map((t) => [t.name, t]));
      for (const slot of this.model.linearSlots()) {
        if (!gatedModules.has(slot.name)) continue;
        const w = byName.get(`${slot.name}.weight`)!;
        const b = byName.get(`${slot.name}.bias`) ?? null;
        slot.set(
          new DamLinear(
            slot.name,
            w.sources.map((weight, i) => ({ weight, bias: b ? b.sources[i]! : null })),
            w.coeffs!,
            b ? b.coeffs : null,
            this.act,
            w.rows,
            w.cols,
          ),
        );
      }
    }
  }

  /** Loads N model folders (same architecture) and builds the merge over them. */
  static async fromFolders(dirs: readonly string[], opts: DamOptions = {}): Promise<DamModel> {
    if (dirs.length < 2) throw new AmalgamError('E_USAGE', `DAM merges at least 2 models, got ${dirs.length}`);
    const backend = opts.backend ?? defaultBackend();
    const sources: LlamaModel[] = [];
    try {
      for (const d of dirs) sources.push(await LlamaModel.fromFolder(d, { backend }));
      return new DamModel(sources, [...dirs], resolveOptions(opts), backend, { sources: true, backend: opts.backend ? null : backend, folders: [...dirs] });
    } catch (e) {
      for (const s of sources) s.dispose();
      if (!opts.backend) backend.dispose();
      throw e;
    }
  }

  /** Builds the merge over loaded models (not copied: the merge reads their weight arrays). */
  static fromModels(sources: readonly LlamaModel[], opts: DamOptions & { ids?: string[] } = {}): DamModel {
    if (sources.length === 0) throw new AmalgamError('E_USAGE', 'DAM needs source models');
    const ids = opts.ids ?? sources.map((_, i) => `source ${i}`);
    if (ids.length !== sources.length) throw new AmalgamError('E_USAGE', `${ids.length} ids for ${sources.length} models`);
    return new DamModel([...sources], ids, resolveOptions(opts), opts.backend ?? sources[0]!.backend, { sources: false, backend: null, folders: null });
  }

  get numSources(): number {
    return this.sources.length;
  }

  get backend(): Backend {
    return this.model.backend;
  }

  /** Every coefficient vector (trainable, float32), in tensor order. */
  coefficients(): Parameter[] {
    return this.tensors.flatMap((t) => t.coeffs ?? []);
  }

  /** Number of coefficient values. */
  get coefficientCount(): number {
    return this.coefficients().reduce((s, p) => s + p.size, 0);
  }

  /** Call after changing coefficient values in place (the optimiser does): the next forward re-materialises. */
  coefficientsChanged(): void {
    this.stale = true;
  }

  /** Sets coefficients by name (`{module}.mergers.{i}`); every coefficient must be given unless `partial`. */
  setCoefficients(values: ReadonlyMap<string, ArrayLike<number>>, opts: { partial?: boolean } = {}): void {
    const all = new Map(this.coefficients().map((p) => [p.name, p]));
    for (const name of values.keys()) {
      if (!all.has(name)) throw new AmalgamError('E_MISSING', 'the DAM model has no such coefficient vector', { key: name });
    }
    for (const [name, p] of all) {
      const v = values.get(name);
      if (!v) {
        if (opts.partial) continue;
        throw new AmalgamError('E_MISSING', 'coefficient vector is missing', { key: name });
      }
      p.set(v);
    }
    this.stale = true;
  }

  /** Recomputes the merged tensors that have coefficients (forward does this when needed). */
  materialise(): void {
    for (const t of this.tensors) {
      if (!t.coeffs || t.gated) continue;
      damMergeForward(
        t.target.data,
        t.sources,
        t.coeffs.map((c) => c.data),
        t.rows,
        t.cols,
        this.act,
      );
    }
    this.stale = false;
  }

  /** The merged model's forward (logits [B·T, vocab] by default); a view valid until the next forward. */
  forward(ids: ArrayLike<number>, B: number, T: number, opts: ForwardOptions = {}): Float32Array {
    if (this.stale) this.materialise();
    return this.model.forward(ids, B, T, opts);
  }

  /**
   * Back-propagates d(loss)/d(logits) of the last forward into the coefficient gradients
   * (accumulated, like every runtime backward).
   */
  backward(dOut: Float32Array): void {
    this.model.backward(dOut);
    for (const t of this.tensors) {
      if (!t.coeffs || t.gated) continue;
      const g = t.target.grad!;
      damMergeBackward(
        g,
        t.sources,
        t.coeffs.map((c) => c.data),
        t.coeffs.map((c) => c.grad),
        t.rows,
        t.cols,
        this.act,
      );
      g.fill(0);
    }
  }

  /** Source i's forward (its own weights): the teacher logits on the fly. */
  teacherForward(i: number, ids: ArrayLike<number>, B: number, T: number): Float32Array {
    const m = this.sources[i];
    if (!m) throw new AmalgamError('E_USAGE', `no source ${i}`);
    return m.forward(ids, B, T);
  }

  /** Zeroes every coefficient gradient. */
  zeroGrad(): void {
    this.model.zeroGrad();
    for (const p of this.coefficients()) p.zeroGrad();
  }

  /** The merged value of a tensor (materialised on demand; a fresh array for a gated linear). */
  mergedValues(t: DamTensor): Float32Array {
    if (t.gated) {
      const out = new Float32Array(t.rows * t.cols);
      damMergeForward(
        out,
        t.sources,
        t.coeffs!.map((c) => c.data),
        t.rows,
        t.cols,
        this.act,
      );
      return out;
    }
    if (this.stale) this.materialise();
    return t.target.data;
  }

  /** Releases the merged model, and the sources and backend when this object loaded them. */
  dispose(): void {
    this.model.dispose();
    if (this.ownsSources) for (const s of this.sources) s.dispose();
    this.ownedBackend?.dispose();
  }
}

function resolveOptions(o: DamOptions): Required<Omit<DamOptions, 'backend'>> {
  return {
    targets: o.targets ?? 'all-linear',
    embeddings: o.embeddings ?? false,
    norms: o.norms ?? false,
    nonLinearity: o.nonLinearity ?? 'tanh',
    init: o.init ?? 'reference',
    seed: o.seed ?? 0,
    form: o.form ?? 'materialise',
  };
}
