/**
 * `inspect`: what a checkpoint file or folder holds, without reading tensor data.
 */
import { stat, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { AmalgamError } from './errors.js';
import { byteSize, numel } from './tensor/dtype.js';
import { FileByteReader, ioError, type TensorInfo, type TensorSource } from './io/source.js';
import { openSafetensors, SafetensorsFile, ShardedSafetensors } from './io/safetensors.js';

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

function tensorRows(source: TensorSource): InspectTensor[] {
  return source.tensors().map((t) => {
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
  if (ascii === 'GGUF') return inspectGguf(path);
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
  const source = await openSafetensors(dir);
  const report = await inspectSource(dir, 'hf-model', source, []);
  report.files = entries.sort();
  return report;
}

async function inspectGguf(path: string): Promise<InspectReport> {
  throw new AmalgamError('E_UNSUPPORTED', 'GGUF inspection is not available', { file: path });
}
async function inspectLlama2c(path: string): Promise<InspectReport> {
  throw new AmalgamError('E_UNSUPPORTED', 'llama2.c inspection is not available', { file: path });
}
async function inspectPeft(dir: string): Promise<InspectReport> {
  throw new AmalgamError('E_UNSUPPORTED', 'PEFT inspection is not available', { file: join(dir, 'adapter_config.json') });
}
