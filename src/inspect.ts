/**
 * `inspect`: what a checkpoint file or folder holds, without reading tensor data.
 */
import { stat, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { byteSize, numel } from './tensor/dtype.js';
import { FileByteReader, ioError, type TensorInfo, type TensorSource } from './io/source.js';
import { SafetensorsFile, ShardedSafetensors } from './io/safetensors.js';
import { openModelFolder } from './io/hf.js';
import { readPeftAdapter } from './io/peft.js';
import { GgufFile } from './io/gguf.js';
import { Llama2cCheckpoint } from './io/llama2c.js';
import { AmalgamError } from './errors.js';
import { modelFilesIn } from './convert/model-input.js';

export type InspectKind = 'safetensors' | 'sharded-safetensors' | 'hf-model' | 'gguf' | 'llama2c' | 'peft-adapter';

export interface InspectTensor extends TensorInfo {
  parameters: number;
  /** Bytes as stored (quantised formats: the stored size). */
  bytes: number;
  /** Storage type where it differs from dtype (e.g. GGUF Q8_0 read as F32). */
  stored?: string;
}

export interface InspectReport {
  path: string;
  kind: InspectKind;
  architecture?: { name: string; inferred: boolean; numLayers: number };
  config?: Record<string, unknown>;
  tensors: InspectTensor[];
  parameters: { total: number; byDtype: Record<string, number> };
  bytes: number;
  metadata: Record<string, string>;
  files: string[];
  adapter?: Record<string, unknown>;
  notes: string[];
}

async function sniffMagic(path: string): Promise<Uint8Array> {
  const r = await FileByteReader.open(path);
  try {
    return await r.read(0, Math.min(8, r.size));
  } finally {
    await r.close();
  }
}

/** Names in natural order: layer 2 before layer 10. */
const collator = new Intl.Collator('en', { numeric: true });

function tensorRows(source: TensorSource): InspectTensor[] {
  const list = source.tensors().sort((a, b) => collator.compare(a.name, b.name));
  return list.map((t) => {
    const n = numel(t.shape);
    return { ...t, parameters: n, bytes: byteSize(t.dtype, n) ?? 0 };
  });
}

function summarise(rows: InspectTensor[]): { parameters: InspectReport['parameters']; bytes: number } {
  const byDtype: Record<string, number> = {};
  let total = 0;
  let bytes = 0;
  for (const r of rows) {
    byDtype[r.dtype] = (byDtype[r.dtype] ?? 0) + r.parameters;
    total += r.parameters;
    bytes += r.bytes;
  }
  return { parameters: { total, byDtype }, bytes };
}

/** Describe a safetensors file, a model folder, a GGUF or llama2.c file, or a PEFT adapter folder. */
export async function inspectPath(path: string): Promise<InspectReport> {
  let st;
  try {
    st = await stat(path);
  } catch (e) {
    throw ioError(path, e);
  }
  if (st.isDirectory()) return inspectFolder(path);
  const magic = await sniffMagic(path);
  const ascii = Buffer.from(magic.subarray(0, 4)).toString('latin1');
  // A .gguf file without the magic (empty, truncated, another format) gets GGUF's own diagnosis.
  if (ascii === 'GGUF' || /\.gguf$/i.test(path)) return inspectGguf(path);
  if (path.endsWith('.safetensors')) return inspectSafetensorsFile(path);
  if (path.endsWith('.index.json')) return inspectSource(path, 'sharded-safetensors', await ShardedSafetensors.open(path), []);
  if (path.endsWith('.bin')) return inspectLlama2c(path);
  // Unknown extension: try safetensors, whose header check is strict.
  return inspectSafetensorsFile(path);
}

async function inspectSafetensorsFile(path: string): Promise<InspectReport> {
  const f = await SafetensorsFile.open(path);
  return inspectSource(path, 'safetensors', f, []);
}

async function inspectSource(path: string, kind: InspectKind, source: TensorSource, notes: string[]): Promise<InspectReport> {
  try {
    const rows = tensorRows(source);
    const { parameters, bytes } = summarise(rows);
    return { path, kind, tensors: rows, parameters, bytes, metadata: { ...source.metadata }, files: [], notes };
  } finally {
    await source.close();
  }
}

async function inspectFolder(dir: string): Promise<InspectReport> {
  const entries = await readdir(dir);
  if (entries.includes('adapter_config.json')) return inspectPeft(dir);
  const files = entries.includes('config.json') ? [] : modelFilesIn(entries);
  if (files.length) {
    const first = join(dir, files[0]!);
    throw new AmalgamError('E_MISSING', `no config.json: not a Hugging Face model folder; it holds the model file${files.length > 1 ? 's' : ''} ${files.join(', ')}`, {
      file: dir,
      hint: `inspect a file itself (amalgam inspect ${first}), or convert it into a model folder (amalgam convert ${first} <out-dir>)`,
    });
  }
  const model = await openModelFolder(dir, { allowUnmatched: true });
  const arch = model.architecture;
  const notes = [...arch.warnings];
  if (arch.unmatched.length) notes.push(`${arch.unmatched.length} tensor(s) not described by the ${arch.name} architecture: ${arch.unmatched.slice(0, 5).join(', ')}${arch.unmatched.length > 5 ? ', ...' : ''}`);
  if (arch.tied.length) notes.push(`tied (absent, stood in for by the embedding): ${arch.tied.join(', ')}`);
  const report = await inspectSource(dir, 'hf-model', model.source, notes);
  report.architecture = { name: arch.name, inferred: arch.inferred, numLayers: arch.numLayers };
  report.config = model.config;
  report.files = entries.sort(collator.compare);
  return report;
}

async function inspectGguf(path: string): Promise<InspectReport> {
  const g = await GgufFile.open(path, { allowUnsupportedTypes: true });
  try {
    const native = g.ggmlTensors().sort((a, b) => collator.compare(a.name, b.name));
    const rows: InspectTensor[] = native.map((t) => {
      const dtype = t.typeName === 'F16' || t.typeName === 'BF16' ? t.typeName : 'F32';
      const row: InspectTensor = { name: t.name, dtype, shape: t.shape, parameters: t.numel, bytes: t.byteSize };
      if (t.typeName !== dtype) row.stored = t.supported ? t.typeName : `${t.typeName}, not readable`;
      return row;
    });
    const { parameters, bytes } = summarise(rows);
    const notes: string[] = [];
    const unsupported = native.filter((t) => !t.supported);
    if (unsupported.length) notes.push(`${unsupported.length} tensor(s) use quantisation types amalgam cannot read (${[...new Set(unsupported.map((t) => t.typeName))].join(', ')})`);
    const arch = g.metadata['general.architecture'];
    const layers = Number(g.metadata[`${arch}.block_count`]);
    return {
      path,
      kind: 'gguf',
      architecture: arch ? { name: arch, inferred: false, numLayers: Number.isFinite(layers) ? layers : 0 } : undefined,
      tensors: rows,
      parameters,
      bytes,
      metadata: { 'gguf.version': String(g.version), 'gguf.alignment': String(g.alignment), ...g.metadata },
      files: [],
      notes,
    };
  } finally {
    await g.close();
  }
}

async function inspectLlama2c(path: string): Promise<InspectReport> {
  const ck = await Llama2cCheckpoint.open(path);
  const c = ck.config;
  const report = await inspectSource(path, 'llama2c', ck, []);
  report.architecture = { name: 'llama', inferred: false, numLayers: c.nLayers };
  report.config = { ...c };
  report.metadata = {
    version: c.version === 0 ? 'legacy (v0)' : String(c.version),
    dim: String(c.dim),
    hidden_dim: String(c.hiddenDim),
    n_layers: String(c.nLayers),
    n_heads: String(c.nHeads),
    n_kv_heads: String(c.nKvHeads),
    vocab_size: String(c.vocabSize),
    seq_len: String(c.seqLen),
    shared_classifier: String(c.sharedClassifier),
  };
  return report;
}
async function inspectPeft(dir: string): Promise<InspectReport> {
  const adapter = await readPeftAdapter(dir);
  const c = adapter.config;
  const ranks = [...new Set(adapter.modules.map((m) => m.rank))].sort((a, b) => a - b);
  const report = await inspectSource(dir, 'peft-adapter', adapter.source, []);
  report.files = (await readdir(dir)).sort(collator.compare);
  report.adapter = {
    peft_type: c.peft_type,
    task_type: c.task_type ?? null,
    base_model: c.base_model_name_or_path ?? null,
    r: c.r,
    lora_alpha: c.lora_alpha,
    use_rslora: c.use_rslora,
    target_modules: c.target_modules,
    lora_modules: adapter.modules.length,
    ranks,
    saved_modules: adapter.savedModules.map((m) => m.target),
  };
  return report;
}
