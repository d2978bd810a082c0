/**
 * Applying PEFT LoRA adapters to base weights (formats.md §4.4): W' = W + s·B·A per targeted
 * tensor (transposed for fan_in_fan_out layers and embeddings), and `modules_to_save` tensors
 * replacing the base tensor. Adapters are checked against the base model's headers before any
 * tensor data is read.
 *
 * - `AdaptedTensorSource` wraps a model's TensorSource and applies an adapter to each targeted
 *   tensor when it is read (used for `model+adapter` references in merges; no cache folder).
 * - `bakeAdapter` writes a full model folder with the adapter merged in, streaming one tensor at
 *   a time.
 *
 * Arithmetic: Σₖ B[o,k]·A[k,i] is accumulated in float64, scaled by s, added to W in float64 and
 * rounded once to float32, then to the base tensor's stored dtype. Reading an adapted tensor
 * therefore gives exactly the values a baked model stores.
 */
import { readdir } from 'node:fs/promises';
import { isAbsolute, join, resolve } from 'node:path';
import { AmalgamError } from '../errors.js';
import { loraAddWasm } from '../merge/blocks-wasm.js';
import { copyFileWritable, withStagingDir } from '../io/atomic-dir.js';
import { CONFIG_FILE, HF_EXTRA_FILES, readJsonObject, requireFolder } from '../io/hf.js';
import { readPeftAdapter, targetsModule, type LoraModule, type PeftAdapter, type SavedModuleTensor } from '../io/peft.js';
import { INDEX_FILE, openSafetensors, ShardedSafetensorsWriter, type RawIntoSource, type TensorLocation } from '../io/safetensors.js';
import type { TensorInfo, TensorSource } from '../io/source.js';
import { decodeToF32, encodeFromF32, isFloatDType, numel } from '../tensor/dtype.js';

/** What an adapter does to one base tensor. */
export type AdapterAction = { kind: 'lora'; module: LoraModule } | { kind: 'replace'; saved: SavedModuleTensor };

const shapeText = (s: readonly number[]) => JSON.stringify(s);

/** PEFT's `target_modules` shorthand for every linear layer (but the output layer). */
const ALL_LINEAR = 'all-linear';

/**
 * Checks that the adapter's config selects every module it holds LoRA factors for, as PEFT does
 * when it injects an adapter: `target_modules` (names matched against the end of the module path,
 * a regex matched against the whole path, or `all-linear`) minus `exclude_modules`, restricted
 * to `layers_to_transform` (layer indices found with `layers_pattern`). PEFT would not load
 * factors of other modules. Without `target_modules` (PEFT picks defaults per
 * architecture) only `exclude_modules` is checked.
 */
export function checkTargetModules(adapter: PeftAdapter): void {
  const { target_modules: targets, exclude_modules: excluded } = adapter.config;
  const selects = (spec: string | string[], path: string) => targetsModule({ ...adapter.config, target_modules: spec, exclude_modules: null }, path);
  for (const m of adapter.modules) {
    let why: [string, string] | undefined;
    if (excluded !== null && excluded !== undefined && selects(excluded, m.path)) {
      why = [`exclude_modules ${JSON.stringify(excluded)} excludes it`, 'remove it from exclude_modules'];
    } else if (targets !== null && targets !== undefined) {
      const targeted = typeof targets === 'string' && targets.toLowerCase() === ALL_LINEAR ? m.kind === 'linear' : selects(targets, m.path);
      if (!targeted) why = [`target_modules ${JSON.stringify(targets)} does not select it`, 'add it to target_modules'];
    }
    if (why === undefined) why = layerNotTransformed(adapter.config, m.path);
    if (why !== undefined) {
      throw new AmalgamError('E_CONFIG', `the adapter holds LoRA factors for ${m.path}, but ${why[0]}`, {
        file: adapter.weightsPath,
        key: m.aName,
        hint: `PEFT loads only the modules its config selects, so these factors would be ignored: ${why[1]} in ${adapter.configPath}, or remove the module's factors from the adapter`,
      });
    }
  }
}

/**
 * PEFT's `layers_to_transform` rule: a module is adapted only if its path holds a layer index
 * (`.<layers_pattern>.<i>.`, or any `.<name>.<i>.` without a pattern; the last one counts) in the
 * list. Returns why a module is not, or undefined when it is (or no list is given).
 */
function layerNotTransformed(config: PeftAdapter['config'], path: string): [string, string] | undefined {
  const list = config.layers_to_transform;
  if (list === null || list === undefined || (Array.isArray(list) && list.length === 0)) return undefined;
  const patterns = config.layers_pattern === null || config.layers_pattern === undefined ? [] : typeof config.layers_pattern === 'string' ? [config.layers_pattern] : config.layers_pattern;
  let index: RegExpExecArray | null = null;
  if (patterns.length === 0) index = /^.*\.[^.]*\.(\d+)\./.exec(path);
  else for (const p of patterns) if ((index = new RegExp(`^.*\\.${p}\\.(\\d+)\\.`).exec(path))) break;
  const allowed = typeof list === 'number' ? [list] : list;
  const what = `layers_to_transform ${JSON.stringify(list)}${patterns.length ? ` with layers_pattern ${JSON.stringify(config.layers_pattern)}` : ''}`;
  if (index === null) return [`${what} selects modules by layer index and its path has none`, 'correct layers_pattern'];
  if (!allowed.includes(Number(index[1]))) return [`${what} does not include its layer ${index[1]}`, 'add the layer to layers_to_transform'];
  return undefined;
}

/**
 * Checks an adapter against its own config (checkTargetModules) and a base model's tensors
 * (headers only) and returns, per base tensor name, what the adapter does to it. Errors name the
 * adapter tensor and the base tensor.
 */
export function checkAdapterAgainstBase(adapter: PeftAdapter, base: TensorSource, opts: { baseLabel?: string } = {}): Map<string, AdapterAction> {
  const label = opts.baseLabel ?? base.path;
  const actions = new Map<string, AdapterAction>();
  const file = adapter.weightsPath;
  checkTargetModules(adapter);
  for (const m of adapter.modules) {
    if (!base.has(m.target)) {
      const tiedHint = /(^|\.)(lm_head|embed_out)\.weight$/.test(m.target) ? '; the base model may tie it to the input embeddings, so it has no tensor of its own' : '';
      throw new AmalgamError('E_MISSING', `the adapter targets ${m.target}, which the base model ${label} does not have`, {
        file,
        key: m.aName,
        hint: `apply the adapter to the model it was trained on${tiedHint}`,
      });
    }
    const info = base.info(m.target);
    if (!isFloatDType(info.dtype)) {
      throw new AmalgamError('E_DTYPE', `the base tensor ${m.target} has dtype ${info.dtype}; LoRA updates need a float tensor`, { file, key: m.aName });
    }
    if (m.baseName !== undefined) {
      const own = adapter.source.info(m.baseName);
      if (own.shape.length !== info.shape.length || own.shape.some((d, i) => d !== info.shape[i])) {
        throw new AmalgamError('E_SHAPE', `the adapter saves the weight of ${m.target} with shape ${shapeText(own.shape)}, but the base model ${label} has ${shapeText(info.shape)}`, {
          file,
          key: m.baseName,
          hint: /embed|lm_head|wte/.test(m.target) ? 'the adapter was trained with a resized vocabulary; resize the base model first' : 'apply the adapter to the model it was trained on',
        });
      }
    }
    if (info.shape.length !== 2 || info.shape[0] !== m.deltaShape[0] || info.shape[1] !== m.deltaShape[1]) {
      const how =
        m.kind === 'embedding'
          ? `lora_embedding_A [r, num_embeddings] and lora_embedding_B [dim, r] give ΔW ${shapeText(m.deltaShape)}`
          : m.fanInFanOut
            ? `with fan_in_fan_out, lora_A [r, in] and lora_B [out, r] give ΔW [in, out] = ${shapeText(m.deltaShape)}`
            : `lora_A [r, in] and lora_B [out, r] give ΔW [out, in] = ${shapeText(m.deltaShape)}`;
      const transposed = info.shape.length === 2 && info.shape[0] === m.deltaShape[1] && info.shape[1] === m.deltaShape[0];
      throw new AmalgamError('E_SHAPE', `the base tensor ${m.target} has shape ${shapeText(info.shape)} in ${label}, but ${how}`, {
        file,
        key: m.aName,
        hint: transposed
          ? `the shapes are transposed: check fan_in_fan_out in ${adapter.configPath}`
          : 'the adapter was trained on a model of another size; apply it to its own base model',
      });
    }
    actions.set(m.target, { kind: 'lora', module: m });
  }
  for (const s of adapter.savedModules) {
    if (!base.has(s.target)) {
      throw new AmalgamError('E_MISSING', `the adapter saves ${s.target} in full (${s.kind}), but the base model ${label} has no such tensor`, {
        file,
        key: s.name,
        hint: 'adapters that add new modules (e.g. a classification head on a causal LM) cannot be applied to this base',
      });
    }
    const info = base.info(s.target);
    const own = adapter.source.info(s.name);
    if (own.shape.length !== info.shape.length || own.shape.some((d, i) => d !== info.shape[i])) {
      throw new AmalgamError('E_SHAPE', `the adapter saves ${s.target} with shape ${shapeText(own.shape)}, but the base model ${label} has ${shapeText(info.shape)}`, {
        file,
        key: s.name,
        hint: /embed|lm_head|wte/.test(s.target) ? 'the adapter was trained with a resized vocabulary; resize the base model first' : 'apply the adapter to the model it was trained on',
      });
    }
    if (own.dtype !== info.dtype && !(isFloatDType(own.dtype) && isFloatDType(info.dtype))) {
      throw new AmalgamError('E_DTYPE', `the adapter saves ${s.target} as ${own.dtype}, but the base model stores it as ${info.dtype}`, { file, key: s.name });
    }
    if (actions.has(s.target)) {
      throw new AmalgamError('E_DUPLICATE', `${s.target} is both a LoRA target and saved in full`, { file, key: s.name });
    }
    actions.set(s.target, { kind: 'replace', saved: s });
  }
  return actions;
}

/**
 * Adds s·B·A to `w` in place (w in the base tensor's stored layout, `module.deltaShape`). A is
 * [r, in] and B is [out, r] row-major; for fan_in_fan_out layers and embeddings the update is
 * transposed. Each element is rounded once to float32.
 */
export function addLoraDelta(w: Float32Array, module: Pick<LoraModule, 'kind' | 'rank' | 'inFeatures' | 'outFeatures' | 'fanInFanOut'>, a: Float32Array, b: Float32Array, scale: number): Float32Array {
  const r = module.rank;
  const inF = module.inFeatures;
  const outF = module.outFeatures;
  if (a.length !== r * inF || b.length !== outF * r || w.length !== inF * outF) {
    throw new AmalgamError('E_SHAPE', `LoRA factors A (${a.length} values), B (${b.length}) and W (${w.length}) do not fit rank ${r}, ${outF}×${inF}`);
  }
  const transposed = module.kind === 'embedding' || module.fanInFanOut;
  if (!transposed) {
    const row = new Float64Array(inF);
    const rows = (o0: number, o1: number): void => {
      for (let o = o0; o < o1; o++) {
        row.fill(0);
        for (let k = 0; k < r; k++) {
          const bk = b[o * r + k]!;
          if (bk === 0) continue;
          const ar = k * inF;
          for (let i = 0; i < inF; i++) row[i] += bk * a[ar + i]!;
        }
        const wr = o * inF;
        for (let i = 0; i < inF; i++) w[wr + i] = w[wr + i]! + scale * row[i]!;
      }
    };
    // WebAssembly SIMD where built (the same float64 arithmetic; rows with a NaN redone here).
    if (!loraAddWasm(w, a, b, r, inF, outF, scale, rows)) rows(0, outF);
  } else {
    const col = new Float64Array(r);
    for (let i = 0; i < inF; i++) {
      for (let k = 0; k < r; k++) col[k] = a[k * inF + i]!;
      const wr = i * outF;
      for (let o = 0; o < outF; o++) {
        const br = o * r;
        let s = 0;
        for (let k = 0; k < r; k++) s += b[br + k]! * col[k]!;
        w[wr + o] = w[wr + o]! + scale * s;
      }
    }
  }
  return w;
}

/** The dense update s·B·A of a module in the base tensor's layout (float32). */
export function loraDelta(module: Pick<LoraModule, 'kind' | 'rank' | 'inFeatures' | 'outFeatures' | 'fanInFanOut'>, a: Float32Array, b: Float32Array, scale: number): Float32Array {
  return addLoraDelta(new Float32Array(module.inFeatures * module.outFeatures), module, a, b, scale);
}

/** Rounds float32 values to what `dtype` stores (no-op for F32 and F64). */
function roundToStored(dtype: TensorInfo['dtype'], data: Float32Array): Float32Array {
  if (dtype === 'BF16' || dtype === 'F16') return decodeToF32(dtype, encodeFromF32(dtype, data));
  return data;
}

/**
 * A TensorSource that reads a model with a LoRA adapter applied: targeted tensors are computed as
 * W + s·B·A (rounded to the base tensor's dtype) and `modules_to_save` tensors come from the
 * adapter; everything else is read from the base unchanged. Names, dtypes and shapes are the
 * base model's. Closing it closes both the base source and the adapter.
 */
export class AdaptedTensorSource implements RawIntoSource {
  readonly path: string;
  readonly metadata: Record<string, string>;
  private constructor(
    readonly base: TensorSource,
    readonly adapter: PeftAdapter,
    readonly actions: ReadonlyMap<string, AdapterAction>,
  ) {
    this.path = `${base.path}+${adapter.dir}`;
    this.metadata = base.metadata;
  }

  /** Wraps `base`; on any error both `base` and the adapter are closed. */
  static async open(base: TensorSource, adapterDir: string, opts: { baseLabel?: string } = {}): Promise<AdaptedTensorSource> {
    let adapter: PeftAdapter | undefined;
    try {
      adapter = await readPeftAdapter(adapterDir);
      const actions = checkAdapterAgainstBase(adapter, base, opts);
      return new AdaptedTensorSource(base, adapter, actions);
    } catch (e) {
      await adapter?.close().catch(() => {});
      await base.close().catch(() => {});
      throw e;
    }
  }

  /** What the adapter does to a tensor, if anything. */
  action(name: string): AdapterAction | undefined {
    return this.actions.get(name);
  }

  tensors(): TensorInfo[] {
    return this.base.tensors();
  }
  has(name: string): boolean {
    return this.base.has(name);
  }
  info(name: string): TensorInfo {
    return this.base.info(name);
  }

  async readF32(name: string): Promise<Float32Array> {
    const act = this.actions.get(name);
    if (!act) return this.base.readF32(name);
    const info = this.base.info(name);
    if (act.kind === 'replace') return roundToStored(info.dtype, (await this.adapter.source.readF32(act.saved.name)).slice());
    return roundToStored(info.dtype, await this.updated(name, act.module));
  }

  /** W + s·B·A of a LoRA module's tensor in float32, before rounding to the stored dtype. */
  private async updated(name: string, m: LoraModule): Promise<Float32Array> {
    const info = this.base.info(name);
    // PEFT loads a weight the adapter saves for the module into the base layer before adding the update.
    const readW = m.baseName !== undefined ? this.adapter.source.readF32(m.baseName).then((v) => v.slice()) : this.base.readF32(name);
    const [w, a, b] = await Promise.all([readW, this.adapter.source.readF32(m.aName), this.adapter.source.readF32(m.bName)]);
    const out = w.byteOffset === 0 && w.buffer.byteLength === w.byteLength ? w : w.slice();
    if (out.length !== numel(info.shape)) {
      throw new AmalgamError('E_SHAPE', `read ${out.length} values, expected ${numel(info.shape)}`, { file: this.base.path, key: name });
    }
    return addLoraDelta(out, m, a, b, m.scaling);
  }

  async readRaw(name: string): Promise<Uint8Array> {
    const act = this.actions.get(name);
    if (!act) return this.base.readRaw(name);
    const info = this.base.info(name);
    if (act.kind === 'replace' && this.adapter.source.info(act.saved.name).dtype === info.dtype) return this.adapter.source.readRaw(act.saved.name);
    // Encoding rounds to the stored dtype once (rounding first, as readF32 does, gives the same bytes).
    const data = act.kind === 'lora' ? await this.updated(name, act.module) : await this.readF32(name);
    return encodeFromF32(info.dtype, data);
  }

  async readRawInto(name: string, dst: Uint8Array): Promise<void> {
    const base = this.base as Partial<RawIntoSource>;
    if (!this.actions.has(name) && typeof base.readRawInto === 'function') return base.readRawInto.call(this.base, name, dst);
    const raw = await this.readRaw(name);
    if (raw.length !== dst.length) {
      throw new AmalgamError('E_USAGE', `readRawInto needs ${raw.length} bytes, got a ${dst.length}-byte array`, { file: this.path, key: name });
    }
    dst.set(raw);
  }

  /** Where the stored bytes are; undefined for tensors the adapter changes (they are computed). */
  locate(name: string): TensorLocation | undefined {
    if (this.actions.has(name)) return undefined;
    const base = this.base as Partial<RawIntoSource>;
    return typeof base.locate === 'function' ? base.locate.call(this.base, name) : undefined;
  }

  async close(): Promise<void> {
    await Promise.all([this.base.close(), this.adapter.close()]);
  }
}

/** Wraps a model's source with an adapter (see AdaptedTensorSource); closes `base` on error. */
export function openAdaptedSource(base: TensorSource, adapterDir: string, opts: { baseLabel?: string } = {}): Promise<AdaptedTensorSource> {
  return AdaptedTensorSource.open(base, adapterDir, opts);
}

/**
 * Checks, from headers only, that the adapter folder applies to the model folder; throws the
 * errors `bakeAdapter` and merges would raise. Returns the number of LoRA modules and replaced
 * tensors.
 */
export async function checkAdapterForModel(modelSource: TensorSource, adapterDir: string, opts: { baseLabel?: string } = {}): Promise<{ loraModules: number; replaced: number }> {
  const adapter = await readPeftAdapter(adapterDir);
  try {
    const actions = checkAdapterAgainstBase(adapter, modelSource, opts);
    let lora = 0;
    for (const a of actions.values()) if (a.kind === 'lora') lora++;
    return { loraModules: lora, replaced: actions.size - lora };
  } finally {
    await adapter.close();
  }
}

export interface BakeProgress {
  done: number;
  total: number;
  tensor: string;
  /** 'lora': W + s·B·A was written; 'replace': the adapter's tensor; 'copy': unchanged. */
  action: 'lora' | 'replace' | 'copy';
}

export interface BakeOptions {
  /** Replace a non-empty output folder. */
  overwrite?: boolean;
  /** Shard size limit in bytes (default 5e9); 0 or less writes one file. */
  maxShardBytes?: number;
  onProgress?: (p: BakeProgress) => void;
}

export interface BakeResult {
  outDir: string;
  /** Weight files written (the index last when sharded). */
  weightFiles: string[];
  /** Other files copied from the base (config.json, tokenizer, ...). */
  copiedFiles: string[];
  tensors: number;
  /** Base tensors updated with W + s·B·A. */
  loraModules: number;
  /** Base tensors replaced by the adapter's saved tensors. */
  replaced: number;
  elapsedMs: number;
}

/**
 * Merges a PEFT LoRA adapter into its base model: writes `outDir` with every base tensor, the
 * targeted ones as W + s·B·A in their stored dtype, `modules_to_save` tensors from the adapter,
 * and config.json and the tokenizer files copied. Streams one tensor at a time; the adapter is
 * checked against the base before any tensor data is read. The folder appears only when complete.
 */
export async function bakeAdapter(baseDir: string, adapterDir: string, outDir: string, opts: BakeOptions = {}): Promise<BakeResult> {
  const started = Date.now();
  const absBase = resolve(baseDir);
  await requireFolder(absBase);
  await readJsonObject(join(absBase, CONFIG_FILE));
  const source = await AdaptedTensorSource.open(await openSafetensors(absBase), isAbsolute(adapterDir) ? adapterDir : resolve(adapterDir), { baseLabel: absBase });
  try {
    const infos = source.tensors();
    const files = await readdir(absBase);
    const copied = [CONFIG_FILE, ...HF_EXTRA_FILES.filter((f) => files.includes(f))];
    const shard = opts.maxShardBytes === undefined ? 5e9 : opts.maxShardBytes > 0 ? opts.maxShardBytes : Number.MAX_SAFE_INTEGER;
    let lora = 0;
    let replaced = 0;
    let weightFiles: string[] = [];
    await withStagingDir(
      outDir,
      async (stage) => {
        const writer = await ShardedSafetensorsWriter.create(
          stage.path,
          infos.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape.slice() })),
          { maxShardBytes: shard, metadata: { format: 'pt' } },
        );
        try {
          let done = 0;
          for (const t of infos) {
            const act = source.action(t.name);
            await writer.write(t.name, await source.readRaw(t.name));
            if (act?.kind === 'lora') lora++;
            else if (act?.kind === 'replace') replaced++;
            opts.onProgress?.({ done: ++done, total: infos.length, tensor: t.name, action: act?.kind ?? 'copy' });
          }
          const res = await writer.finish();
          weightFiles = res.indexFile ? [...res.files, INDEX_FILE] : res.files;
        } catch (e) {
          await writer.abort();
          throw e;
        }
        for (const f of copied) await copyFileWritable(join(absBase, f), stage.file(f));
      },
      { overwrite: opts.overwrite, inputs: [absBase, adapterDir] },
    );
    return { outDir: resolve(outDir), weightFiles, copiedFiles: copied, tensors: infos.length, loraModules: lora, replaced, elapsedMs: Date.now() - started };
  } finally {
    await source.close();
  }
}
