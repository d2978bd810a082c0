/**
 * Loading a model folder for training, evaluation or generation (optionally with a PEFT LoRA
 * adapter and a classification head), and writing the results: a full Hugging Face checkpoint
 * (config.json, model.safetensors, the tokenizer files) or a PEFT adapter folder.
 */
import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { AmalgamError } from '../errors.js';
import { copyFileWritable, withStagingDir } from '../io/atomic-dir.js';
import { HF_EXTRA_FILES, readJsonObject, setConfigDtype } from '../io/hf.js';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, readPeftAdapter } from '../io/peft.js';
import { openSafetensors, ShardedSafetensorsWriter } from '../io/safetensors.js';
import type { FloatDType } from '../tensor/dtype.js';
import { addLoraDelta } from '../lora/apply.js';
import { writePeftAdapter, type FullTensor, type LoraFactors } from '../lora/peft-write.js';
import { SCORE_WEIGHT, SequenceClassificationHead } from '../nn/heads.js';
import { attachLora, loraModules } from '../nn/lora.js';
import { LlamaModel, type ModelOptions } from '../nn/model.js';
import { Parameter } from '../nn/params.js';

async function isFile(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isFile();
  } catch {
    return false;
  }
}

export interface LoadedModel {
  model: LlamaModel;
  /** The folder's config.json as stored. */
  hfConfig: Record<string, unknown>;
  /** Classification head from the folder's or the adapter's `score.weight`, if any. */
  head: SequenceClassificationHead | null;
  /**
   * Class names of `head`, in id order: from the adapter's `id2label` when the adapter brings the
   * head, else from config.json `id2label`, when present.
   */
  labelNames?: string[];
  /** The file `labelNames` come from (config.json, or the adapter's weights or adapter_config.json). */
  labelNamesFile?: string;
  /** Whether `head` comes from the adapter (rather than the folder's own score.weight). */
  headFromAdapter?: boolean;
}

export interface LoadModelOptions extends ModelOptions {
  /** A PEFT LoRA adapter folder to apply (unmerged: its modules are attached as LoRA layers). */
  adapter?: string;
}

/** Class names from a config's id2label, in id order. */
export function labelNamesFromConfig(cfg: Record<string, unknown>): string[] | undefined {
  const m = cfg['id2label'];
  if (!m || typeof m !== 'object' || Array.isArray(m)) return undefined;
  const entries = Object.entries(m as Record<string, unknown>).filter(([k, v]) => /^\d+$/.test(k) && typeof v === 'string');
  if (entries.length === 0) return undefined;
  const out: string[] = [];
  for (const [k, v] of entries) out[Number(k)] = v as string;
  return out.every((v) => v !== undefined) && out.length === entries.length ? out : undefined;
}

/** Whether the names are the defaults written for unnamed classes: LABEL_0, LABEL_1, … */
export function isDefaultLabelNames(names: readonly string[]): boolean {
  return names.every((n, i) => n === `LABEL_${i}`);
}

/**
 * Whether class names read for the data (`--labels`, or the data's own sorted names) contradict
 * the names recorded with a head: a different order or other names. The defaults LABEL_0,
 * LABEL_1, … record no names and contradict nothing.
 */
export function labelNamesDiffer(used: readonly string[], recorded: readonly string[] | undefined): boolean {
  if (!recorded || isDefaultLabelNames(recorded)) return false;
  return used.length !== recorded.length || used.some((n, i) => n !== recorded[i]);
}

/**
 * The class names a classification adapter records: `id2label` (JSON) in the safetensors
 * metadata of its weights, where amalgam writes it (PEFT reads no unknown adapter_config.json
 * keys in older versions), or `id2label` in adapter_config.json. Undefined when neither has them.
 */
export async function adapterLabelNames(dir: string): Promise<{ names: string[]; file: string } | undefined> {
  const weights = join(dir, ADAPTER_WEIGHTS_FILE);
  const src = await openSafetensors(weights);
  let raw: string | undefined;
  try {
    raw = src.metadata['id2label'];
  } finally {
    await src.close();
  }
  if (raw !== undefined) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(raw);
    } catch {
      throw new AmalgamError('E_FORMAT', 'the id2label metadata is not JSON', { file: weights, key: '__metadata__.id2label' });
    }
    const names = labelNamesFromConfig({ id2label: parsed });
    if (names) return { names, file: weights };
  }
  const configFile = join(dir, ADAPTER_CONFIG_FILE);
  const names = labelNamesFromConfig(await readJsonObject(configFile));
  return names ? { names, file: configFile } : undefined;
}

/** The safetensors metadata that records class names with an adapter (see `adapterLabelNames`). */
export function labelMetadata(names: readonly string[]): Record<string, string> {
  return { id2label: JSON.stringify(labelMaps(names).id2label) };
}

/** `id2label` and `label2id` entries for class names in id order. */
export function labelMaps(names: readonly string[]): { id2label: Record<string, string>; label2id: Record<string, number> } {
  return { id2label: Object.fromEntries(names.map((n, i) => [String(i), n])), label2id: Object.fromEntries(names.map((n, i) => [n, i])) };
}

/** Load a model folder, its classification head (if stored) and optionally a LoRA adapter. */
export async function loadModel(dir: string, opts: LoadModelOptions = {}): Promise<LoadedModel> {
  const configFile = join(dir, 'config.json');
  const hfConfig = await readJsonObject(configFile);
  const model = await LlamaModel.fromFolder(dir, { backend: opts.backend });
  try {
    let head: SequenceClassificationHead | null = null;
    const src = await openSafetensors(dir);
    try {
      if (src.has(SCORE_WEIGHT)) {
        const shape = src.info(SCORE_WEIGHT).shape;
        head = await SequenceClassificationHead.fromSource(src, model.config.hiddenSize, shape[0]!);
      }
    } finally {
      await src.close();
    }
    let labelNames = labelNamesFromConfig(hfConfig);
    let labelNamesFile = labelNames ? configFile : undefined;
    let headFromAdapter = false;
    if (opts.adapter) {
      const adapterHead = await applyAdapter(model, opts.adapter);
      if (adapterHead) {
        // The folder's id2label, if any, names the classes of another head.
        head = adapterHead;
        headFromAdapter = true;
        const recorded = await adapterLabelNames(opts.adapter);
        labelNames = recorded?.names;
        labelNamesFile = recorded?.file;
      }
    }
    return { model, hfConfig, head, labelNames, labelNamesFile, headFromAdapter };
  } catch (e) {
    model.dispose();
    throw e;
  }
}

/**
 * Attach the LoRA modules of a PEFT adapter folder to the model (with their own rank, α and
 * scaling) and copy in full tensors it saves. Embedding LoRA modules (and linear ones stored
 * fan_in_fan_out) have no runtime module here: their update s·(B·A)ᵀ is added into the weight,
 * exactly as `lora merge` bakes it. Returns the classification head when the adapter saves
 * `score.weight`. For inference: the attached factors are frozen.
 */
export async function applyAdapter(model: LlamaModel, dir: string): Promise<SequenceClassificationHead | null> {
  const ad = await readPeftAdapter(dir);
  try {
    const named = model.namedParameters();
    for (const m of ad.modules) {
      if (m.baseName !== undefined) {
        // The weight saved with the module (PEFT's `<module>.base_layer.weight` of an adapted
        // embedding) is what PEFT loads into the base layer: the update is added to it.
        const p = named.get(`${m.path}.weight`);
        const info = ad.source.info(m.baseName);
        if (!p || info.shape.length !== p.shape.length || info.shape.some((d, i) => d !== p.shape[i])) {
          throw new AmalgamError('E_SHAPE', `the adapter saves the weight of '${m.path}' with shape [${info.shape.join(', ')}], but the model's is [${p?.shape.join(', ') ?? 'missing'}]`, {
            file: ad.weightsPath,
            key: m.baseName,
          });
        }
        p.set(await ad.source.readF32(m.baseName));
      }
      if (m.kind !== 'linear' || m.fanInFanOut) {
        const p = named.get(`${m.path}.weight`);
        if (!p) throw new AmalgamError('E_MISSING', `the adapter has a LoRA module for '${m.path}', which the model does not have`, { file: ad.weightsPath, key: m.aName });
        if (p.data.length !== m.inFeatures * m.outFeatures) {
          throw new AmalgamError('E_SHAPE', `adapter module is ${m.outFeatures}×${m.inFeatures} but the model's weight has shape [${p.shape.join(', ')}]`, { file: ad.weightsPath, key: m.path });
        }
        addLoraDelta(p.data, m, await ad.source.readF32(m.aName), await ad.source.readF32(m.bName), m.scaling);
        continue;
      }
      const [mod] = attachLora(model, { targets: [m.path], rank: m.rank, alpha: m.alpha, rslora: ad.config.use_rslora, freezeBase: false });
      if (!mod || mod.inFeatures !== m.inFeatures || mod.outFeatures !== m.outFeatures) {
        throw new AmalgamError('E_SHAPE', `adapter module is ${m.outFeatures}×${m.inFeatures} but the model's layer is ${mod?.outFeatures}×${mod?.inFeatures}`, { file: ad.weightsPath, key: m.path });
      }
      mod.A.set(await ad.source.readF32(m.aName));
      mod.B.set(await ad.source.readF32(m.bName));
      mod.A.setRequiresGrad(false);
      mod.B.setRequiresGrad(false);
    }
    let head: SequenceClassificationHead | null = null;
    for (const s of ad.savedModules) {
      if (s.target === SCORE_WEIGHT) {
        const info = ad.source.info(s.name);
        const w = new Parameter(SCORE_WEIGHT, info.shape, await ad.source.readF32(s.name));
        head = new SequenceClassificationHead(model.config.hiddenSize, info.shape[0]!, w);
        continue;
      }
      const p = named.get(s.target);
      if (!p) throw new AmalgamError('E_MISSING', `the adapter saves '${s.target}', which the model does not have`, { file: ad.weightsPath, key: s.name });
      p.set(await ad.source.readF32(s.name));
    }
    return head;
  } finally {
    await ad.close();
  }
}

export interface SaveModelOptions {
  /** Data type of the written weights (default F32). */
  dtype?: FloatDType;
  overwrite?: boolean;
  /** Files and folders the model was made from, besides the source folder: the output may not be or hold one. */
  inputs?: readonly string[];
  /** Classification head to save as `score.weight` (the config then names LlamaForSequenceClassification). */
  head?: SequenceClassificationHead | null;
  labelNames?: string[];
  /** Keys merged into config.json. */
  configUpdates?: Record<string, unknown>;
}

/** Keys of a sequence-classification config.json that describe its score head. */
const CLASSIFIER_CONFIG_KEYS = ['num_labels', 'id2label', 'label2id', 'problem_type'];

/**
 * Write the model as a Hugging Face folder: config.json (the source's, with dtype and, for a
 * classifier, architectures / num_labels / id2label updated), model.safetensors with every base
 * parameter (LoRA modules must be merged or detached first), and the source's tokenizer files.
 * Without a head, a source config that names `…ForSequenceClassification` becomes a causal-LM
 * config (`…ForCausalLM`, without num_labels / id2label / label2id): the folder then holds no
 * score.weight, and the model is the language model with its lm_head.
 */
export async function saveModelFolder(model: LlamaModel, srcDir: string, outDir: string, opts: SaveModelOptions = {}): Promise<string> {
  if (loraModules(model).length) {
    throw new AmalgamError('E_USAGE', 'the model still has LoRA modules; merge them (detachLora) or save an adapter instead');
  }
  const dtype = opts.dtype ?? 'F32';
  const cfg = { ...(await readJsonObject(join(srcDir, 'config.json'))) };
  const head = opts.head ?? null;
  const tensors: { name: string; shape: number[]; data: Float32Array }[] = model.parameters().map((p) => ({ name: p.name, shape: [...p.shape], data: p.data }));
  if (head) {
    const w = head.score.weight;
    tensors.push({ name: SCORE_WEIGHT, shape: [...w.shape], data: w.data });
    const arch = Array.isArray(cfg['architectures']) && typeof cfg['architectures'][0] === 'string' ? (cfg['architectures'][0] as string) : 'LlamaForCausalLM';
    cfg['architectures'] = [arch.replace(/ForCausalLM$/, 'ForSequenceClassification')];
    cfg['num_labels'] = head.numLabels;
    const names = headLabelNames(head, opts.labelNames);
    Object.assign(cfg, labelMaps(names));
    if (cfg['pad_token_id'] === undefined && typeof cfg['eos_token_id'] === 'number') cfg['pad_token_id'] = cfg['eos_token_id'];
  } else {
    const archs = cfg['architectures'];
    if (Array.isArray(archs) && archs.some((a) => typeof a === 'string' && a.endsWith('ForSequenceClassification'))) {
      cfg['architectures'] = archs.map((a) => (typeof a === 'string' ? a.replace(/ForSequenceClassification$/, 'ForCausalLM') : a));
      for (const k of CLASSIFIER_CONFIG_KEYS) delete cfg[k];
    }
  }
  Object.assign(cfg, opts.configUpdates ?? {});
  const config = setConfigDtype(cfg, dtype);
  return withStagingDir(
    outDir,
    async (stage) => {
      const w = await ShardedSafetensorsWriter.create(stage.path, tensors.map((t) => ({ name: t.name, dtype, shape: t.shape })));
      try {
        for (const t of tensors) await w.writeF32(t.name, t.data);
        await w.finish();
      } catch (e) {
        await w.abort();
        throw e;
      }
      await writeFile(stage.file('config.json'), JSON.stringify(config, null, 2) + '\n');
      for (const f of HF_EXTRA_FILES) {
        if (await isFile(join(srcDir, f))) await copyFileWritable(join(srcDir, f), stage.file(f));
      }
      return stage.target;
    },
    { overwrite: opts.overwrite, inputs: [srcDir, ...(opts.inputs ?? [])] },
  );
}

/** The head's class names: the given ones (one per class) or LABEL_0, LABEL_1, … */
function headLabelNames(head: SequenceClassificationHead, names: string[] | undefined): string[] {
  if (names && names.length !== head.numLabels) {
    throw new AmalgamError('E_USAGE', `${names.length} label names given for a ${head.numLabels}-class head`, { hint: `give one name per class: ${head.numLabels}` });
  }
  return names ?? Array.from({ length: head.numLabels }, (_, i) => `LABEL_${i}`);
}

export interface SaveAdapterOptions {
  dtype?: FloatDType;
  overwrite?: boolean;
  head?: SequenceClassificationHead | null;
  /**
   * Class names of the head, in id order, recorded as `id2label` / `label2id` in
   * adapter_config.json as a classifier's config.json records them (default LABEL_0, LABEL_1, …).
   */
  labelNames?: string[];
  /** `base_model_name_or_path`. */
  baseModel?: string;
  /** `lora_dropout` recorded in the config. */
  dropout?: number;
}

/** Write the model's LoRA modules (and a classification head under modules_to_save) as a PEFT adapter folder. */
export async function saveAdapterFolder(model: LlamaModel, outDir: string, opts: SaveAdapterOptions = {}): Promise<string> {
  const mods = loraModules(model);
  if (mods.length === 0) throw new AmalgamError('E_USAGE', 'the model has no LoRA modules to save');
  const first = mods[0]!;
  if (mods.some((m) => m.rank !== first.rank || m.alpha !== first.alpha || m.rslora !== first.rslora)) {
    throw new AmalgamError('E_UNSUPPORTED', 'LoRA modules with different ranks or alphas cannot be written with one r and lora_alpha');
  }
  const factors: LoraFactors[] = mods.map((m) => ({ path: m.name, a: m.A.data, b: m.B.data, rank: m.rank, inFeatures: m.inFeatures, outFeatures: m.outFeatures }));
  const full: FullTensor[] = [];
  if (opts.head) full.push({ name: SCORE_WEIGHT, shape: [...opts.head.score.weight.shape], data: opts.head.score.weight.data });
  const w = await writePeftAdapter(
    outDir,
    factors,
    full,
    {
      r: first.rank,
      alpha: first.alpha,
      useRslora: first.rslora,
      taskType: opts.head ? 'SEQ_CLS' : 'CAUSAL_LM',
      baseModel: opts.baseModel,
      modulesToSave: opts.head ? ['score'] : undefined,
      dropout: opts.dropout,
    },
    { dtype: opts.dtype, overwrite: opts.overwrite, ...(opts.head ? { metadata: labelMetadata(headLabelNames(opts.head, opts.labelNames)) } : {}) },
  );
  return w.dir;
}
