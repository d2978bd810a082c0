/**
 * LoRA extraction (formats.md §4.4, like `mergekit-extract-lora`): for each weight matrix that
 * differs between a base and a fine-tuned model, ΔW = W_ft − W_base is approximated by its
 * truncated SVD and written as a PEFT adapter: `lora_B` = U_k·S_k, `lora_A` = V_kᵀ,
 * `lora_alpha` = r (scaling 1). Each matrix gets rank min(r, rows, cols); the adapter's `r` is
 * the largest rank used and `rank_pattern` holds the smaller ones. Embedding matrices become PEFT
 * embedding factors (`lora_embedding_A/B`, which hold ΔWᵀ), or are saved in full or skipped as
 * `embeddings` says. Large matrices use the randomised SVD. The energy captured,
 * Σ_{j<k} σⱼ² / ‖ΔW‖², is reported per tensor.
 *
 * Tensors that are bitwise identical are skipped. Other tensors that differ (1-D norms and
 * biases, or matrices not named `*.weight`) are saved in full as `modules_to_save`, or only
 * reported with `saveFull: false`.
 */
import { join, resolve } from 'node:path';
import { AmalgamError } from '../errors.js';
import { CONFIG_FILE, readJsonObject, requireFolder } from '../io/hf.js';
import { openSafetensors } from '../io/safetensors.js';
import type { TensorInfo, TensorSource } from '../io/source.js';
import { decodeToF32, isFloatDType, type FloatDType } from '../tensor/dtype.js';
import { factorize, svdProducts, writeLoraAdapter, type AdapterModuleFactors } from './combine.js';
import type { FullTensor } from './peft-write.js';

export interface ExtractOptions {
  /** Target rank r (each matrix gets min(r, rows, cols)). */
  rank: number;
  /** Use the randomised SVD when min(rows, cols) exceeds this (default 512). */
  randomizedAbove?: number;
  /** Randomised SVD: extra sketch columns (default 10), power iterations (default 2), seed (default 0). */
  oversample?: number;
  powerIters?: number;
  seed?: number;
  /** Embedding matrices: PEFT embedding LoRA factors (default), saved in full, or skipped (whatever `saveFull` says). */
  embeddings?: 'lora' | 'full' | 'skip';
  /**
   * Save differing tensors that cannot be factorised (norms, biases) in full (default true);
   * otherwise they are only reported. Embeddings follow `embeddings`.
   */
  saveFull?: boolean;
  /** Data type of the written tensors (default F32). */
  dtype?: FloatDType;
  overwrite?: boolean;
  onProgress?: (p: { done: number; total: number; tensor: ExtractedTensor }) => void;
  onWarning?: (message: string) => void;
}

export interface ExtractedTensor {
  /** Base-model tensor name. */
  name: string;
  /**
   * `lora` / `embedding`: factorised; `full`: saved in full; `identical`: skipped (bitwise equal);
   * `skipped`: differs but was left out (reported).
   */
  kind: 'lora' | 'embedding' | 'full' | 'identical' | 'skipped';
  shape: number[];
  rank?: number;
  /** Σ_{j<k} σⱼ² / ‖ΔW‖² for factorised tensors. */
  energy?: number;
  /** ‖ΔW‖_F / ‖W_base‖_F. */
  relativeDelta?: number;
  randomized?: boolean;
  reason?: string;
}

export interface ExtractResult {
  dir: string;
  /** The largest rank of a factorised module: `r` and `lora_alpha` of the adapter (others are in `rank_pattern`). */
  rank: number;
  /** The rank asked for; larger than `rank` when no matrix has that many rows and columns. */
  requestedRank: number;
  tensors: ExtractedTensor[];
  /** Modules written as LoRA factors. */
  loraModules: number;
  /** Tensors saved in full. */
  fullTensors: number;
  config: Record<string, unknown>;
  warnings: string[];
}

const EMBEDDING = /(^|\.)(embed_tokens|wte|embed_in|word_embeddings|tok_embeddings)\.weight$/;

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

function norm(a: Float32Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * a[i]!;
  return Math.sqrt(s);
}

async function openModel(dir: string): Promise<TensorSource> {
  await readJsonObject(join(dir, CONFIG_FILE));
  return openSafetensors(dir);
}

/**
 * Extracts a LoRA adapter from the difference between `ftDir` and `baseDir` into `outDir` (a PEFT
 * folder). Both models must have the same tensor names and shapes for the tensors compared.
 */
export async function extractLora(baseDir: string, ftDir: string, outDir: string, opts: ExtractOptions): Promise<ExtractResult> {
  const rank = opts.rank;
  if (!Number.isSafeInteger(rank) || rank < 1) throw new AmalgamError('E_USAGE', `rank must be a positive integer, got ${rank}`);
  const embeddings = opts.embeddings ?? 'lora';
  if (!['lora', 'full', 'skip'].includes(embeddings)) throw new AmalgamError('E_USAGE', `embeddings must be lora, full or skip, got '${embeddings}'`);
  const saveFull = opts.saveFull ?? true;
  const warnings: string[] = [];
  const warn = (m: string) => {
    warnings.push(m);
    opts.onWarning?.(m);
  };
  const absBase = resolve(baseDir);
  const absFt = resolve(ftDir);
  await requireFolder(absBase);
  await requireFolder(absFt);
  const base = await openModel(absBase);
  let ft: TensorSource | undefined;
  let products: ReturnType<typeof svdProducts> | undefined;
  try {
    ft = await openModel(absFt);
    // Header checks before reading any data.
    const pairs: { b: TensorInfo; f: TensorInfo }[] = [];
    for (const b of base.tensors()) {
      if (!ft.has(b.name)) {
        warn(`${b.name} is in the base model but not in the fine-tuned model; it is left out`);
        continue;
      }
      const f = ft.info(b.name);
      if (!sameShape(b.shape, f.shape)) {
        throw new AmalgamError('E_SHAPE', `shape ${JSON.stringify(f.shape)} in the fine-tuned model ${absFt} differs from ${JSON.stringify(b.shape)} in the base model`, {
          key: b.name,
          hint: /embed|lm_head|wte/.test(b.name)
            ? 'the fine-tuned model has a resized vocabulary; a LoRA adapter cannot change tensor shapes'
            : 'extract from a fine-tune of this base model',
        });
      }
      pairs.push({ b, f });
    }
    for (const f of ft.tensors()) {
      if (!base.has(f.name)) warn(`${f.name} is in the fine-tuned model but not in the base model; it is left out`);
    }

    const modules: AdapterModuleFactors[] = [];
    const full: FullTensor[] = [];
    const report: ExtractedTensor[] = [];
    let done = 0;
    products = svdProducts();
    for (const { b, f } of pairs) {
      const rb = await base.readRaw(b.name);
      const rf = await ft.readRaw(b.name);
      let entry: ExtractedTensor;
      if (b.dtype === f.dtype && bytesEqual(rb, rf)) {
        entry = { name: b.name, kind: 'identical', shape: b.shape.slice() };
      } else if (!isFloatDType(b.dtype) || !isFloatDType(f.dtype)) {
        entry = { name: b.name, kind: 'skipped', shape: b.shape.slice(), reason: `non-float dtype ${b.dtype}/${f.dtype} differs` };
        warn(`${b.name} (${b.dtype}) differs but is not a float tensor; it is left out`);
      } else {
        const wb = decodeToF32(b.dtype, rb, { copy: true, what: b.name });
        const wf = decodeToF32(f.dtype, rf, { what: b.name });
        const delta = new Float32Array(wb.length);
        for (let i = 0; i < delta.length; i++) delta[i] = wf[i]! - wb[i]!;
        const dn = norm(delta);
        const bn = norm(wb);
        const relativeDelta = bn === 0 ? (dn === 0 ? 0 : Infinity) : dn / bn;
        const isEmbedding = EMBEDDING.test(b.name);
        const matrix = b.shape.length === 2 && b.name.endsWith('.weight');
        if (dn === 0) {
          entry = { name: b.name, kind: 'identical', shape: b.shape.slice(), relativeDelta: 0 };
        } else if (matrix && !(isEmbedding && embeddings !== 'lora')) {
          const path = b.name.slice(0, -'.weight'.length);
          const [rows, cols] = b.shape as [number, number];
          const fo = { randomizedAbove: opts.randomizedAbove ?? 512, seed: opts.seed ?? 0, oversample: opts.oversample, powerIters: opts.powerIters, matmul32: products.matmul32 };
          if (isEmbedding) {
            // PEFT embeddings: ΔW [num, dim] = (B·A)ᵀ with A [r, num], B [dim, r].
            const t = new Float32Array(delta.length);
            for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) t[j * rows + i] = delta[i * cols + j]!;
            const fz = factorize(t, cols, rows, rank, fo);
            modules.push({ path, kind: 'embedding', rank: fz.rank, inFeatures: rows, outFeatures: cols, a: fz.a, b: fz.b });
            entry = { name: b.name, kind: 'embedding', shape: b.shape.slice(), rank: fz.rank, energy: fz.energy, relativeDelta, randomized: fz.randomized };
          } else {
            const fz = factorize(delta, rows, cols, rank, fo);
            modules.push({ path, kind: 'linear', rank: fz.rank, inFeatures: cols, outFeatures: rows, a: fz.a, b: fz.b });
            entry = { name: b.name, kind: 'lora', shape: b.shape.slice(), rank: fz.rank, energy: fz.energy, relativeDelta, randomized: fz.randomized };
          }
        } else if (isEmbedding && embeddings !== 'lora' ? embeddings === 'full' : saveFull) {
          // An explicit `embeddings: full` saves embeddings whatever saveFull says.
          full.push({ name: b.name, shape: b.shape.slice(), data: wf.slice() });
          entry = { name: b.name, kind: 'full', shape: b.shape.slice(), relativeDelta };
        } else {
          entry = { name: b.name, kind: 'skipped', shape: b.shape.slice(), relativeDelta, reason: isEmbedding && embeddings === 'skip' ? 'embeddings: skip' : 'saveFull is off' };
          warn(`${b.name} differs (relative change ${relativeDelta.toExponential(2)}) but is left out of the adapter`);
        }
      }
      report.push(entry);
      opts.onProgress?.({ done: ++done, total: pairs.length, tensor: entry });
    }
    if (modules.length === 0 && full.length === 0) {
      throw new AmalgamError('E_USAGE', 'the two models have no differing tensors; there is nothing to extract', { file: absFt });
    }
    // Each matrix gets min(rank, rows, cols): `r` is the largest rank used (the requested rank when
    // only saved tensors differ), the smaller ones go to rank_pattern.
    const r = modules.length ? Math.max(...modules.map((m) => m.rank)) : rank;
    const written = await writeLoraAdapter(
      outDir,
      modules,
      full,
      { r, alpha: r, baseModel: absBase, taskType: 'CAUSAL_LM' },
      { unitScaling: true, dtype: opts.dtype, overwrite: opts.overwrite, inputs: [absBase, absFt], metadata: { amalgam_extract: `rank ${r}` } },
    );
    return { dir: written.dir, rank: r, requestedRank: rank, tensors: report, loraModules: modules.length, fullTensors: full.length, config: written.config, warnings };
  } finally {
    products?.dispose();
    await Promise.all([base.close(), ft?.close()]);
  }
}
