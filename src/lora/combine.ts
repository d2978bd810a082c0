/**
 * Combining LoRA adapters into one PEFT adapter (osrm.md §8.1).
 *
 * - `cat`: A = vstack(wᵢsᵢAᵢ), B = hstack(Bᵢ), rank Σrᵢ, scaling 1: B·A = Σ wᵢsᵢBᵢAᵢ exactly up
 *   to the float32 rounding of wᵢsᵢAᵢ (none when wᵢsᵢ is a power of two).
 * - `svd`: the dense updates ΔWᵢ = sᵢBᵢAᵢ are merged with a merge method (task_arithmetic, ties,
 *   dare_ties, dare_linear; per-model `weight` wᵢ, computed as task vectors over a zero base),
 *   then re-factorised by truncated SVD: B = U_k·S_k, A = V_kᵀ, scaling 1. The energy kept
 *   (Σ_{j<k} σⱼ² / ‖ΔW‖²) is reported per module.
 * - `linear`: PEFT's `add_weighted_adapter(combination_type="linear")`, for compatibility only.
 *   A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ and B = Σ √|cᵢ|·Bᵢ with cᵢ = wᵢsᵢ (equal ranks required), so B·A
 *   holds the cross terms √|cᵢcⱼ|·BᵢAⱼ (i ≠ j) and is not Σ cᵢBᵢAᵢ (peft issue #3004).
 *
 * Every output module has lora_alpha equal to its rank (scaling 1, `alpha_pattern` where the rank
 * differs from `r`).
 */
import { writeFile } from 'node:fs/promises';
import { parameterSpec } from '../config/methods.js';
import { assertKnownParameters } from '../config/validate.js';
import { AmalgamError } from '../errors.js';
import { withStagingDir } from '../io/atomic-dir.js';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_PREFIX, readPeftAdapter, type LoraModule, type PeftAdapter } from '../io/peft.js';
import { writeSafetensorsFile, type TensorData } from '../io/safetensors.js';
import { mergeTensor, prepareParams } from '../merge/registry.js';
import { tensorRng } from '../merge/sparsify.js';
import type { ParamValue } from '../merge/types.js';
import { encodeFromF32, type FloatDType } from '../tensor/dtype.js';
import { frobeniusNorm, randomizedSvd, svd, truncateSvd, type Matmul32, type SvdResult } from '../tensor/linalg.js';
import { createBackend, ReferenceBackend, wasmSimdSupported, type Backend } from '../backend/index.js';
import { buildAdapterConfig, loraTensorName, savedTensorName, type FullTensor, type LoraFactors, type PeftAdapterSpec, type WritePeftAdapterOptions } from './peft-write.js';
import { checkTargetModules, loraDelta } from './apply.js';

// ---------------------------------------------------------------------------------------------
// Writing adapters with linear and embedding modules

/** LoRA factors of a linear or an embedding module. */
export interface AdapterModuleFactors extends LoraFactors {
  /** 'embedding': saved as `lora_embedding_A` [r, num_embeddings] / `lora_embedding_B` [dim, r]. */
  kind: 'linear' | 'embedding';
}

export interface WriteLoraAdapterOptions extends WritePeftAdapterOptions {
  /** Set α = rank for every module (scaling 1), with `alpha_pattern` entries where needed. */
  unitScaling?: boolean;
}

/** The most frequent rank (ties: the largest). */
function commonRank(modules: readonly { rank: number }[]): number {
  const count = new Map<number, number>();
  for (const m of modules) count.set(m.rank, (count.get(m.rank) ?? 0) + 1);
  let best = 0;
  let bestCount = -1;
  for (const [r, c] of count) if (c > bestCount || (c === bestCount && r > best)) [best, bestCount] = [r, c];
  return best || 1;
}

/**
 * Writes a PEFT adapter folder whose modules may be linear or embedding layers (the layout of
 * `writePeftAdapter`, plus PEFT's `lora_embedding_A/B` names for embeddings). With `unitScaling`,
 * `r` and `lora_alpha` are the most common rank and every module's α equals its rank.
 */
export async function writeLoraAdapter(
  dir: string,
  modules: readonly AdapterModuleFactors[],
  full: readonly FullTensor[],
  spec: Omit<PeftAdapterSpec, 'r' | 'alpha'> & { r?: number; alpha?: number },
  opts: WriteLoraAdapterOptions = {},
): Promise<{ dir: string; config: Record<string, unknown>; tensorNames: string[] }> {
  if (modules.length === 0 && full.length === 0) throw new AmalgamError('E_USAGE', 'an adapter needs at least one LoRA module or saved tensor', { file: dir });
  const r = spec.r ?? commonRank(modules);
  const alpha = spec.alpha ?? r;
  const extra: Record<string, unknown> = { ...(spec.extraConfig ?? {}) };
  if (opts.unitScaling) {
    const alphaPattern: Record<string, number> = {};
    for (const m of modules) if (m.rank !== r) alphaPattern[m.path] = m.rank; // a plain module path, as in rank_pattern
    extra['alpha_pattern'] = alphaPattern;
  }
  const config = buildAdapterConfig(modules, full, { ...spec, r, alpha, extraConfig: extra });
  const dtype = opts.dtype ?? 'F32';
  const tensors: TensorData[] = [];
  const paths = new Set<string>();
  for (const m of modules) {
    const bad = (msg: string) => new AmalgamError('E_SHAPE', msg, { key: m.path });
    if (paths.has(m.path)) throw new AmalgamError('E_DUPLICATE', 'module appears twice', { key: m.path });
    paths.add(m.path);
    if (m.a.length !== m.rank * m.inFeatures) throw bad(`lora_A has ${m.a.length} values, expected ${m.rank}×${m.inFeatures}`);
    if (m.b.length !== m.outFeatures * m.rank) throw bad(`lora_B has ${m.b.length} values, expected ${m.outFeatures}×${m.rank}`);
    const [an, bn] =
      m.kind === 'embedding' ? [`${PEFT_PREFIX}${m.path}.lora_embedding_A`, `${PEFT_PREFIX}${m.path}.lora_embedding_B`] : [loraTensorName(m.path, 'A'), loraTensorName(m.path, 'B')];
    tensors.push({ name: an, dtype, shape: [m.rank, m.inFeatures], data: encodeFromF32(dtype, m.a) });
    tensors.push({ name: bn, dtype, shape: [m.outFeatures, m.rank], data: encodeFromF32(dtype, m.b) });
  }
  for (const t of full) {
    const n = t.shape.reduce((x, y) => x * y, 1);
    if (t.data.length !== n) throw new AmalgamError('E_SHAPE', `has ${t.data.length} values but shape ${JSON.stringify(t.shape)}`, { key: t.name });
    tensors.push({ name: savedTensorName(t.name), dtype, shape: t.shape.slice(), data: encodeFromF32(dtype, t.data) });
  }
  const out = await withStagingDir(
    dir,
    async (stage) => {
      await writeFile(stage.file(ADAPTER_CONFIG_FILE), JSON.stringify(config, null, 2) + '\n');
      await writeSafetensorsFile(stage.file(ADAPTER_WEIGHTS_FILE), tensors, { format: 'pt', ...(opts.metadata ?? {}) });
      return stage.target;
    },
    { overwrite: opts.overwrite, inputs: opts.inputs ?? [] },
  );
  return { dir: out, config, tensorNames: tensors.map((t) => t.name) };
}

// ---------------------------------------------------------------------------------------------
// Combining

export type CombineMethod = 'cat' | 'svd' | 'linear';
export type CombineMergeMethod = 'task_arithmetic' | 'ties' | 'dare_ties' | 'dare_linear';

export interface CombineInput {
  /** PEFT adapter folder. */
  dir: string;
  /** wᵢ (default 1). */
  weight?: number;
  /** Further per-adapter parameters of the merge method (`svd`), e.g. { density: 0.5 }. */
  params?: Record<string, ParamValue>;
}

export interface CombineOptions {
  method: CombineMethod;
  /** `svd`: target rank (default: the largest input rank of each module). */
  rank?: number;
  /** `svd`: how the dense updates are merged (default task_arithmetic). */
  mergeMethod?: CombineMergeMethod;
  /** `svd`: global parameters of the merge method, e.g. { density: 0.5, lambda: 1 }. */
  mergeParams?: Record<string, ParamValue>;
  /** Seed of dare_* masks and of the randomised SVD (default 0). */
  seed?: number;
  /** `svd`: use the randomised SVD when min(out, in) exceeds this (default 512). */
  randomizedAbove?: number;
  /** Data type of the written factors (default F32). */
  dtype?: FloatDType;
  overwrite?: boolean;
  onProgress?: (p: { done: number; total: number; module: string }) => void;
  onWarning?: (message: string) => void;
}

export interface CombinedModule {
  path: string;
  kind: 'linear' | 'embedding';
  rank: number;
  /** Indices of the inputs that have this module. */
  inputs: number[];
  /** `svd`: Σ_{j<k} σⱼ² / ‖ΔW‖² of the merged update (1 when ΔW = 0). */
  energy?: number;
  /** `svd`: the merged update is zero (e.g. density 0 kept nothing), so the module changes nothing. */
  zeroUpdate?: boolean;
}

export interface CombineResult {
  dir: string;
  method: CombineMethod;
  mergeMethod?: CombineMergeMethod;
  modules: CombinedModule[];
  /** Tensors saved in full (modules_to_save), copied unweighted. */
  savedTensors: string[];
  config: Record<string, unknown>;
  warnings: string[];
}

/** The warning given for the `linear` compatibility mode. */
export const LINEAR_CROSS_TERM_WARNING =
  "method 'linear' combines the A and B factors separately (PEFT's add_weighted_adapter 'linear'): B·A contains cross terms BᵢAⱼ between adapters and is not the weighted sum of their updates; use 'cat' (exact) or 'svd' for the weighted sum";

/** Merge methods of `svd`. */
export const COMBINE_MERGE_METHODS: readonly CombineMergeMethod[] = ['task_arithmetic', 'ties', 'dare_ties', 'dare_linear'];

/**
 * Checks parameters given to `svd`'s merge method before any work: names the method does not
 * have (with a suggestion) or does not read (task_arithmetic's `density`), `weight` (given per
 * adapter), value types, and `density` outside [0, 1]. `perAdapter`: the parameters of one
 * adapter, where global parameters are never read. Errors name each parameter as `where` says.
 */
export function checkCombineParams(method: CombineMergeMethod, params: Record<string, ParamValue>, where: (name: string) => string, perAdapter = false): void {
  assertKnownParameters(method, Object.keys(params), where);
  for (const [name, value] of Object.entries(params)) {
    const spec = parameterSpec(method, name)!;
    if (spec.ignored) {
      throw new AmalgamError('E_USAGE', `${where(name)}: merge method ${method} does not read \`${name}\``, {
        hint: name === 'density' ? 'density is read by ties, dare_ties and dare_linear' : undefined,
      });
    }
    if (name === 'weight') {
      throw new AmalgamError('E_USAGE', `${where(name)}: the weight of each adapter is given per adapter, not as a merge parameter`, { hint: "set each adapter's weight with --weights (CombineInput.weight)" });
    }
    if (perAdapter && spec.kind === 'global') {
      throw new AmalgamError('E_USAGE', `${where(name)}: \`${name}\` is a global parameter of ${method}; a value given for one adapter is never read`, {
        hint: 'give it as a global merge parameter (--param)',
      });
    }
    if (spec.type === 'boolean' ? typeof value !== 'boolean' : typeof value !== 'number' || !Number.isFinite(value)) {
      throw new AmalgamError('E_USAGE', `${where(name)}: \`${name}\` takes ${spec.type === 'boolean' ? 'true or false' : 'a number'}, got ${JSON.stringify(value)}`);
    }
    if (name === 'density' && !((value as number) >= 0 && (value as number) <= 1)) {
      throw new AmalgamError('E_USAGE', `${where(name)}: density must be in [0, 1] (the fraction of each update kept), got ${value}`);
    }
  }
}

interface Entry {
  input: number;
  module: LoraModule;
}

/** Combines PEFT LoRA adapters into one adapter folder `outDir` (see the module comment). */
export async function combineAdapters(inputs: readonly CombineInput[], outDir: string, opts: CombineOptions): Promise<CombineResult> {
  if (inputs.length === 0) throw new AmalgamError('E_USAGE', 'combine needs at least one adapter');
  if (!['cat', 'svd', 'linear'].includes(opts.method)) {
    throw new AmalgamError('E_USAGE', `unknown combination method '${opts.method}'`, { hint: 'one of: cat, svd, linear' });
  }
  const mergeMethod = opts.mergeMethod ?? 'task_arithmetic';
  if (opts.method === 'svd' && !COMBINE_MERGE_METHODS.includes(mergeMethod)) {
    throw new AmalgamError('E_USAGE', `unknown merge method '${mergeMethod}' for svd`, { hint: `one of: ${COMBINE_MERGE_METHODS.join(', ')}` });
  }
  if (opts.method !== 'svd' && (opts.mergeMethod !== undefined || opts.rank !== undefined)) {
    throw new AmalgamError('E_USAGE', `a target rank and a merge method apply to method 'svd' only (method is '${opts.method}')`);
  }
  if (opts.rank !== undefined && (!Number.isSafeInteger(opts.rank) || opts.rank < 1)) throw new AmalgamError('E_USAGE', `rank must be a positive integer, got ${opts.rank}`);
  const hasParams = Object.keys(opts.mergeParams ?? {}).length > 0 || inputs.some((x) => Object.keys(x.params ?? {}).length > 0);
  if (opts.method !== 'svd' && hasParams) {
    throw new AmalgamError('E_USAGE', `merge parameters apply to method 'svd' only (method is '${opts.method}')`);
  }
  if (opts.method === 'svd') {
    checkCombineParams(mergeMethod, opts.mergeParams ?? {}, (name) => `merge parameter ${name}`);
    inputs.forEach((x, i) => checkCombineParams(mergeMethod, x.params ?? {}, (name) => `parameter ${name} of adapter ${i + 1} (${x.dir})`, true));
  }
  const weights = inputs.map((x, i) => {
    const w = x.weight ?? 1;
    if (!Number.isFinite(w)) throw new AmalgamError('E_USAGE', `weight of adapter ${i + 1} (${x.dir}) must be a finite number, got ${w}`);
    return w;
  });
  const seed = opts.seed ?? 0;
  const warnings: string[] = [];
  const warn = (m: string) => {
    warnings.push(m);
    opts.onWarning?.(m);
  };
  if (opts.method === 'linear') warn(LINEAR_CROSS_TERM_WARNING);

  const adapters: PeftAdapter[] = [];
  try {
    for (const x of inputs) adapters.push(await readPeftAdapter(x.dir));
    for (const a of adapters) checkTargetModules(a);
    const typed = adapters.filter((a) => a.config.task_type);
    const other = typed.find((a) => a.config.task_type !== typed[0]!.config.task_type);
    if (other) {
      const first = typed[0]!;
      throw new AmalgamError('E_CONFIG', `the adapters are for different tasks: task_type ${first.config.task_type} in ${first.dir} but ${other.config.task_type} in ${other.dir}`, {
        file: other.configPath,
        key: 'task_type',
        hint: 'combine adapters made for the same task type (and head) on the same base model',
      });
    }
    const fifo = adapters.map((a) => a.config.fan_in_fan_out);
    if (fifo.some((f) => f !== fifo[0])) {
      throw new AmalgamError('E_CONFIG', 'the adapters disagree on fan_in_fan_out', {
        key: 'fan_in_fan_out',
        hint: 'adapters of one base model have the same fan_in_fan_out; check that they come from the same base',
      });
    }

    // Modules by path, with shape checks, before any tensor data is read.
    const byPath = new Map<string, Entry[]>();
    adapters.forEach((a, i) => {
      for (const m of a.modules) {
        let list = byPath.get(m.path);
        if (!list) byPath.set(m.path, (list = []));
        const first = list[0];
        if (first) {
          const f = first.module;
          if (f.kind !== m.kind || f.inFeatures !== m.inFeatures || f.outFeatures !== m.outFeatures) {
            throw new AmalgamError('E_SHAPE', `module is ${describe(f)} in ${adapters[first.input]!.dir} but ${describe(m)} in ${a.dir}`, {
              key: m.path,
              hint: 'combine adapters trained on the same base model',
            });
          }
          if (opts.method === 'linear' && f.rank !== m.rank) {
            throw new AmalgamError('E_SHAPE', `method 'linear' needs equal ranks: rank ${f.rank} in ${adapters[first.input]!.dir} but ${m.rank} in ${a.dir}`, {
              key: m.path,
              hint: "use 'cat' or 'svd' for adapters of different ranks",
            });
          }
        }
        list.push({ input: i, module: m });
      }
    });

    // Saved tensors: identical copies are kept once.
    const saved = new Map<string, { input: number; name: string }[]>();
    adapters.forEach((a, i) => {
      for (const s of a.savedModules) {
        if (byPath.has(s.target.replace(/\.weight$/, ''))) {
          throw new AmalgamError('E_DUPLICATE', `${s.target} is saved in full by ${a.dir} but is a LoRA module of another adapter`, { key: s.target });
        }
        let list = saved.get(s.target);
        if (!list) saved.set(s.target, (list = []));
        list.push({ input: i, name: s.name });
      }
    });
    const full: FullTensor[] = [];
    for (const [target, list] of saved) {
      const first = list[0]!;
      const src = adapters[first.input]!.source;
      const info = src.info(first.name);
      const data = await src.readF32(first.name);
      for (const other of list.slice(1)) {
        const o = adapters[other.input]!.source;
        const oi = o.info(other.name);
        const od = await o.readF32(other.name);
        if (oi.shape.join(',') !== info.shape.join(',') || od.length !== data.length || od.some((v, k) => !Object.is(v, data[k]))) {
          throw new AmalgamError('E_UNSUPPORTED', `${target} is saved in full by several adapters with different values; full tensors cannot be combined`, {
            key: target,
            hint: 'remove it from all but one adapter (modules_to_save), or merge the full models instead',
          });
        }
      }
      full.push({ name: target, shape: info.shape.slice(), data: data.slice() });
      warn(`${target} is saved in full (modules_to_save) and is copied unweighted from ${adapters[first.input]!.dir}`);
    }

    // Weights saved for LoRA modules (PEFT's `<module>.base_layer.weight` of targeted embedding
    // layers) are what the updates are added to: kept once under the same name, identical copies only.
    const baseLayers: FullTensor[] = [];
    for (const [path, entries] of byPath) {
      const withBase = entries.filter((e) => e.module.baseName !== undefined);
      if (withBase.length === 0) continue;
      const first = withBase[0]!;
      const src = adapters[first.input]!.source;
      const info = src.info(first.module.baseName!);
      const data = (await src.readF32(first.module.baseName!)).slice();
      for (const other of withBase.slice(1)) {
        const o = adapters[other.input]!.source;
        const od = await o.readF32(other.module.baseName!);
        if (o.info(other.module.baseName!).shape.join(',') !== info.shape.join(',') || od.some((v, k) => !Object.is(v, data[k]))) {
          throw new AmalgamError('E_UNSUPPORTED', `the weight of ${path} is saved by several adapters with different values; the adapters were trained on different base weights`, {
            file: adapters[other.input]!.weightsPath,
            key: other.module.baseName,
            hint: 'combine adapters trained on the same base model',
          });
        }
      }
      baseLayers.push({ name: `${path}.base_layer.weight`, shape: info.shape.slice(), data });
      if (withBase.length < entries.length) warn(`the weight of ${path} saved by ${adapters[first.input]!.dir} is kept in the combined adapter, which applies every update to it`);
    }

    const modules: AdapterModuleFactors[] = [];
    const report: CombinedModule[] = [];
    let done = 0;
    const products = opts.method === 'cat' || opts.method === 'linear' ? undefined : svdProducts();
    try {
      for (const [path, entries] of byPath) {
        const factors = await Promise.all(
          entries.map(async (e) => {
            const src = adapters[e.input]!.source;
            return { ...e, a: await src.readF32(e.module.aName), b: await src.readF32(e.module.bName) };
          }),
        );
        const m0 = entries[0]!.module;
        const base = { path, kind: m0.kind, inFeatures: m0.inFeatures, outFeatures: m0.outFeatures };
        let out: AdapterModuleFactors;
        let energy: number | undefined;
        let zeroUpdate = false;
        if (opts.method === 'cat') {
          out = { ...base, ...catFactors(factors.map((f) => ({ a: f.a, b: f.b, rank: f.module.rank, coef: weights[f.input]! * f.module.scaling })), m0.inFeatures, m0.outFeatures) };
        } else if (opts.method === 'linear') {
          out = { ...base, ...linearFactors(factors.map((f) => ({ a: f.a, b: f.b, coef: weights[f.input]! * f.module.scaling })), m0.rank, m0.inFeatures, m0.outFeatures) };
        } else {
          const merged = mergeDense(path, factors, weights, inputs, mergeMethod, opts.mergeParams ?? {}, seed, warn);
          zeroUpdate = merged.every((v) => v === 0);
          const k = Math.min(opts.rank ?? Math.max(...entries.map((e) => e.module.rank)), m0.outFeatures, m0.inFeatures);
          const f = factorize(merged, m0.outFeatures, m0.inFeatures, k, { randomizedAbove: opts.randomizedAbove ?? 512, seed, matmul32: products?.matmul32 });
          energy = f.energy;
          out = { ...base, rank: f.rank, a: f.a, b: f.b };
        }
        modules.push(out);
        report.push({ path, kind: out.kind, rank: out.rank, inputs: entries.map((e) => e.input), ...(energy !== undefined ? { energy } : {}), ...(zeroUpdate ? { zeroUpdate } : {}) });
        opts.onProgress?.({ done: ++done, total: byPath.size, module: path });
      }
    } finally {
      products?.dispose();
    }

    const zeros = report.filter((m) => m.zeroUpdate).length;
    if (zeros > 0) {
      const why = zeroDensityNote(mergeMethod, opts.mergeParams ?? {}, inputs);
      warn(
        zeros === report.length
          ? `every merged update is zero${why}: the combined adapter changes nothing`
          : `${zeros} of ${report.length} merged updates are zero${why}: those modules change nothing`,
      );
    }
    const first = adapters[0]!.config;
    const written = await writeLoraAdapter(
      outDir,
      modules,
      [...full, ...baseLayers],
      {
        taskType: typed[0]?.config.task_type ?? 'CAUSAL_LM',
        ...(first.base_model_name_or_path ? { baseModel: first.base_model_name_or_path } : {}),
        extraConfig: { fan_in_fan_out: fifo[0] ?? false },
      },
      {
        unitScaling: true,
        dtype: opts.dtype,
        overwrite: opts.overwrite,
        inputs: inputs.map((x) => x.dir),
        metadata: { amalgam_combine: opts.method === 'svd' ? `svd/${mergeMethod}` : opts.method },
      },
    );
    return {
      dir: written.dir,
      method: opts.method,
      ...(opts.method === 'svd' ? { mergeMethod } : {}),
      modules: report,
      savedTensors: full.map((t) => t.name),
      config: written.config,
      warnings,
    };
  } finally {
    await Promise.all(adapters.map((a) => a.close().catch(() => {})));
  }
}

/** ' (density 0 keeps no element of …)' when a density of 0 explains zero merged updates. */
function zeroDensityNote(method: CombineMergeMethod, global: Record<string, ParamValue>, inputs: readonly CombineInput[]): string {
  if (method === 'task_arithmetic') return '';
  const zero = inputs.map((x, i) => ((x.params?.['density'] ?? global['density']) === 0 ? i + 1 : 0)).filter((i) => i > 0);
  if (zero.length === 0) return '';
  return zero.length === inputs.length ? ' (density 0 keeps no element of any update)' : ` (density 0 keeps no element of the update of adapter ${zero.join(', ')})`;
}

function describe(m: LoraModule): string {
  return m.kind === 'embedding' ? `an embedding ${m.inFeatures}×${m.outFeatures}` : `a linear layer ${m.inFeatures} → ${m.outFeatures}`;
}

/**
 * `cat`: A = vstack(cᵢ·Aᵢ) rounded to float32, B = hstack(Bᵢ), so B·A = Σ cᵢBᵢAᵢ up to that
 * rounding.
 */
export function catFactors(parts: readonly { a: Float32Array; b: Float32Array; rank: number; coef: number }[], inF: number, outF: number): { rank: number; a: Float32Array; b: Float32Array } {
  const rank = parts.reduce((s, p) => s + p.rank, 0);
  const a = new Float32Array(rank * inF);
  const b = new Float32Array(outF * rank);
  let off = 0;
  for (const p of parts) {
    for (let k = 0; k < p.rank; k++) {
      const src = k * inF;
      const dst = (off + k) * inF;
      for (let i = 0; i < inF; i++) a[dst + i] = p.coef * p.a[src + i]!;
    }
    for (let o = 0; o < outF; o++) for (let k = 0; k < p.rank; k++) b[o * rank + off + k] = p.b[o * p.rank + k]!;
    off += p.rank;
  }
  return { rank, a, b };
}

/** PEFT's `linear`: A = Σ sign(cᵢ)√|cᵢ|·Aᵢ, B = Σ √|cᵢ|·Bᵢ (accumulated in float64). */
export function linearFactors(parts: readonly { a: Float32Array; b: Float32Array; coef: number }[], rank: number, inF: number, outF: number): { rank: number; a: Float32Array; b: Float32Array } {
  const a = new Float64Array(rank * inF);
  const b = new Float64Array(outF * rank);
  for (const p of parts) {
    const root = Math.sqrt(Math.abs(p.coef));
    const sa = p.coef < 0 ? -root : root;
    for (let j = 0; j < a.length; j++) a[j] += sa * p.a[j]!;
    for (let j = 0; j < b.length; j++) b[j] += root * p.b[j]!;
  }
  return { rank, a: Float32Array.from(a), b: Float32Array.from(b) };
}

/** The merged dense update of one module ([out, in] in B·A orientation), via the merge registry. */
function mergeDense(
  path: string,
  factors: readonly { input: number; module: LoraModule; a: Float32Array; b: Float32Array }[],
  weights: readonly number[],
  inputs: readonly CombineInput[],
  method: CombineMergeMethod,
  mergeParams: Record<string, ParamValue>,
  seed: number,
  warn: (m: string) => void,
): Float32Array {
  const m0 = factors[0]!.module;
  const shape = [m0.outFeatures, m0.inFeatures];
  const tensorName = `${path}.delta`;
  const baseName = '<zero base>';
  const names = factors.map((f) => `adapter${f.input + 1}`);
  const perModel: Record<string, Record<string, unknown>> = {};
  factors.forEach((f, j) => {
    perModel[names[j]!] = { ...(inputs[f.input]!.params ?? {}), weight: weights[f.input]! };
  });
  const params = prepareParams(method, { tensorName, models: [baseName, ...names], base: baseName }, { global: mergeParams, perModel });
  const deltas = factors.map((f) => loraDelta({ kind: 'linear', fanInFanOut: false, rank: f.module.rank, inFeatures: m0.inFeatures, outFeatures: m0.outFeatures }, f.a, f.b, f.module.scaling));
  const out = mergeTensor(method, {
    tensorName,
    isEmbed: false,
    inputs: [{ model: baseName, data: new Float32Array(m0.outFeatures * m0.inFeatures), shape }, ...deltas.map((d, j) => ({ model: names[j]!, data: d, shape }))],
    base: baseName,
    params,
    rng: tensorRng(seed, tensorName),
    warn: (m) => warn(`${path}: ${m}`),
  });
  if (!out) throw new AmalgamError('E_UNSUPPORTED', `${method} left the module out`, { key: path });
  return out.data;
}

export interface FactorizeResult {
  rank: number;
  /** [rank, n] = V_kᵀ */
  a: Float32Array;
  /** [m, rank] = U_k·S_k */
  b: Float32Array;
  /** Σ_{j<k} σⱼ² / ‖M‖² (1 when M = 0). */
  energy: number;
  /** All singular values computed (k of them for the randomised SVD). */
  singularValues: Float64Array;
  randomized: boolean;
}

/**
 * Float32 products on the WebAssembly compute backend (SIMD, all cores) for the randomised SVDs of
 * large matrices, started at the first product; `dispose` releases its threads. Where WebAssembly
 * SIMD is missing the products stay float64 TypeScript (the same results up to float32 rounding,
 * 10 to 15 times slower); where the backend cannot start they run on the reference backend.
 */
export function svdProducts(): { matmul32?: Matmul32; dispose(): void } {
  if (!wasmSimdSupported()) return { dispose: () => {} };
  // Started at the first product, so that runs without a randomised SVD start no threads.
  let be: Backend | undefined;
  return {
    matmul32: (x, y, out, M, K, N, o) => {
      if (!be) {
        try {
          be = createBackend('wasm');
        } catch {
          be = new ReferenceBackend();
        }
      }
      be.matmul(x, y, out, M, K, N, o);
    },
    dispose: () => be?.dispose(),
  };
}

/**
 * Largest matrix (values) whose randomised SVD uses `matmul32`: the WebAssembly backend copies it
 * into its own memory (at most 4 GiB, held until disposed). Larger ones keep the float64 products.
 */
const MATMUL32_MAX_VALUES = 1 << 28;

/**
 * Rank-k factorisation M ≈ B·A of an m×n matrix by truncated SVD: B = U_k·S_k, A = V_kᵀ. Uses the
 * randomised SVD when min(m, n) > randomizedAbove, with `matmul32` for its large products where given.
 */
export function factorize(
  mat: Float32Array | Float64Array,
  m: number,
  n: number,
  k: number,
  opts: { randomizedAbove?: number; seed?: number; oversample?: number; powerIters?: number; matmul32?: Matmul32 } = {},
): FactorizeResult {
  const kk = Math.max(1, Math.min(k, m, n));
  const randomized = Math.min(m, n) > (opts.randomizedAbove ?? 512) && kk < Math.min(m, n);
  let r: SvdResult;
  if (randomized) {
    r = randomizedSvd(mat, m, n, kk, {
      seed: opts.seed ?? 0,
      oversample: opts.oversample ?? 10,
      powerIters: opts.powerIters ?? 2,
      ...(opts.matmul32 && m * n <= MATMUL32_MAX_VALUES ? { matmul32: opts.matmul32 } : {}),
    });
  } else {
    r = truncateSvd(svd(mat, m, n), m, n, kk);
  }
  const total = frobeniusNorm(mat);
  let kept = 0;
  for (let j = 0; j < r.k; j++) kept += r.S[j]! * r.S[j]!;
  const energy = total === 0 ? 1 : Math.min(1, kept / (total * total));
  const a = new Float32Array(r.k * n);
  const b = new Float32Array(m * r.k);
  for (let j = 0; j < a.length; j++) a[j] = r.Vt[j]!;
  for (let i = 0; i < m; i++) for (let j = 0; j < r.k; j++) b[i * r.k + j] = r.U[i * r.k + j]! * r.S[j]!;
  return { rank: r.k, a, b, energy, singularValues: r.S, randomized };
}
