/**
 * Writing PEFT LoRA adapter folders (formats.md §4): `adapter_config.json` with the keys PEFT's
 * `save_pretrained` writes, and `adapter_model.safetensors` with PEFT tensor names:
 * `base_model.model.<module>.lora_A.weight` [r, in], `….lora_B.weight` [out, r], and
 * `modules_to_save` weights (e.g. a classification head) under the plain module path
 * `base_model.model.score.weight`. The folder appears only when complete.
 */
import { writeFile } from 'node:fs/promises';
import { AmalgamError } from '../errors.js';
import { withStagingDir } from '../io/atomic-dir.js';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_PREFIX } from '../io/peft.js';
import { writeSafetensorsFile, type TensorData } from '../io/safetensors.js';
import { encodeFromF32, type FloatDType } from '../tensor/dtype.js';

/** The two factors of one LoRA linear module (ΔW = s · B · A). */
export interface LoraFactors {
  /** Module path in the base model, e.g. `model.layers.0.self_attn.q_proj`. */
  path: string;
  /** A, row-major [rank, inFeatures]. */
  a: Float32Array;
  /** B, row-major [outFeatures, rank]. */
  b: Float32Array;
  rank: number;
  inFeatures: number;
  outFeatures: number;
}

/** A tensor saved in full (a `modules_to_save` module's weight, e.g. `score.weight`). */
export interface FullTensor {
  /** Base-model tensor name, e.g. `score.weight`. */
  name: string;
  shape: number[];
  data: Float32Array;
}

export interface PeftAdapterSpec {
  /** Default rank r (modules of another rank get a `rank_pattern` entry). */
  r: number;
  /** α; the scaling is α/r (α/√r with useRslora). */
  alpha: number;
  /** `target_modules`; default the distinct last path components of the modules, sorted. */
  targetModules?: string[];
  /** `modules_to_save`, e.g. ['score']; default: the modules of the full tensors. */
  modulesToSave?: string[];
  /** `task_type`, e.g. 'CAUSAL_LM' (default) or 'SEQ_CLS'. */
  taskType?: string;
  /** `base_model_name_or_path`. */
  baseModel?: string;
  useRslora?: boolean;
  /** `lora_dropout` recorded in the config (training only; default 0). */
  dropout?: number;
  /** Further keys for adapter_config.json (written after the standard ones). */
  extraConfig?: Record<string, unknown>;
}

export interface WritePeftAdapterOptions {
  /** Data type of the written tensors (default F32). */
  dtype?: FloatDType;
  /** Replace an existing output folder. */
  overwrite?: boolean;
  /** String metadata added to the safetensors header (besides format: pt). */
  metadata?: Record<string, string>;
  /** Folders and files the adapter was made from: the output may not be or hold one of them. */
  inputs?: readonly string[];
}

export interface WrittenPeftAdapter {
  dir: string;
  config: Record<string, unknown>;
  tensorNames: string[];
}

/** PEFT's saved name of a LoRA factor. */
export function loraTensorName(modulePath: string, which: 'A' | 'B'): string {
  return `${PEFT_PREFIX}${modulePath}.lora_${which}.weight`;
}

/** PEFT's saved name of a full tensor (modules_to_save). */
export function savedTensorName(tensorName: string): string {
  return `${PEFT_PREFIX}${tensorName}`;
}

/** The adapter_config.json object for a set of modules. */
export function buildAdapterConfig(modules: readonly LoraFactors[], full: readonly FullTensor[], spec: PeftAdapterSpec): Record<string, unknown> {
  if (!Number.isSafeInteger(spec.r) || spec.r < 1) throw new AmalgamError('E_USAGE', `LoRA rank must be a positive integer, got ${spec.r}`);
  if (!Number.isFinite(spec.alpha)) throw new AmalgamError('E_USAGE', `LoRA alpha must be a number, got ${spec.alpha}`);
  const targets = spec.targetModules ?? [...new Set(modules.map((m) => m.path.slice(m.path.lastIndexOf('.') + 1)))].sort();
  const rankPattern: Record<string, number> = {};
  // Keys are plain module paths, as PEFT's documentation writes them: newer PEFT matches them as a
  // regex on a dotted suffix (a dot then matches itself), older PEFT looks the full path up as is.
  for (const m of modules) if (m.rank !== spec.r) rankPattern[m.path] = m.rank;
  // `<module>.base_layer.weight` is the saved weight of a LoRA module (an embedding layer), not a module to save.
  const mts = spec.modulesToSave ?? [...new Set(full.filter((t) => !t.name.includes('.base_layer.')).map((t) => t.name.slice(0, Math.max(0, t.name.lastIndexOf('.')))))].filter((s) => s).sort();
  return {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: spec.baseModel ?? null,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layers_pattern: null,
    layers_to_transform: null,
    lora_alpha: spec.alpha,
    lora_dropout: spec.dropout ?? 0,
    modules_to_save: mts.length ? mts : null,
    peft_type: 'LORA',
    r: spec.r,
    rank_pattern: rankPattern,
    revision: null,
    target_modules: targets,
    task_type: spec.taskType ?? 'CAUSAL_LM',
    use_dora: false,
    use_rslora: spec.useRslora ?? false,
    ...(spec.extraConfig ?? {}),
  };
}

function checkFactors(m: LoraFactors): void {
  const bad = (msg: string) => new AmalgamError('E_SHAPE', msg, { key: m.path });
  for (const [k, v] of Object.entries({ rank: m.rank, inFeatures: m.inFeatures, outFeatures: m.outFeatures })) {
    if (!Number.isSafeInteger(v) || v < 1) throw bad(`${k} must be a positive integer, got ${v}`);
  }
  if (m.a.length !== m.rank * m.inFeatures) throw bad(`lora_A has ${m.a.length} values, expected ${m.rank}×${m.inFeatures}`);
  if (m.b.length !== m.outFeatures * m.rank) throw bad(`lora_B has ${m.b.length} values, expected ${m.outFeatures}×${m.rank}`);
}

/** Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors). */
export async function writePeftAdapter(
  dir: string,
  modules: readonly LoraFactors[],
  full: readonly FullTensor[],
  spec: PeftAdapterSpec,
  opts: WritePeftAdapterOptions = {},
): Promise<WrittenPeftAdapter> {
  if (modules.length === 0 && full.length === 0) throw new AmalgamError('E_USAGE', 'an adapter needs at least one LoRA module or saved tensor', { file: dir });
  const dtype = opts.dtype ?? 'F32';
  const config = buildAdapterConfig(modules, full, spec);
  const tensors: TensorData[] = [];
  const paths = new Set<string>();
  for (const m of modules) {
    checkFactors(m);
    if (paths.has(m.path)) throw new AmalgamError('E_DUPLICATE', 'module appears twice', { key: m.path });
    paths.add(m.path);
    tensors.push({ name: loraTensorName(m.path, 'A'), dtype, shape: [m.rank, m.inFeatures], data: encodeFromF32(dtype, m.a) });
    tensors.push({ name: loraTensorName(m.path, 'B'), dtype, shape: [m.outFeatures, m.rank], data: encodeFromF32(dtype, m.b) });
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
