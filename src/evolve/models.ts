/**
 * Loading the models of a learned merge: a base model (a Hugging Face folder, or a GGUF /
 * llama2.c file converted on the way in) and the fine-tuned models, on one backend, with unique
 * short ids for tables and merge parameters.
 */
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import type { Backend } from '../backend/backend.js';
import { convertToHf } from '../convert/to-hf.js';
import { AmalgamError } from '../errors.js';
import { defaultBackend, LlamaModel } from '../nn/model.js';

async function isDirectory(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isDirectory();
  } catch (e) {
    const code = (e as NodeJS.ErrnoException)?.code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new AmalgamError('E_IO', 'the model does not exist', { file: p, hint: 'give a Hugging Face model folder, or a GGUF or llama2.c file', cause: e });
    }
    throw new AmalgamError('E_IO', `cannot read the model: ${(e as Error).message}`, { file: p, cause: e });
  }
}

/** A model folder, or a GGUF / llama2.c checkpoint converted in a temporary folder first. */
export async function loadAnyModel(path: string, backend: Backend): Promise<LlamaModel> {
  if (await isDirectory(path)) return LlamaModel.fromFolder(path, { backend });
  const dir = await mkdtemp(join(tmpdir(), 'amalgam-base-'));
  try {
    const out = join(dir, 'model');
    await convertToHf(path, out);
    return await LlamaModel.fromFolder(out, { backend });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Short unique ids from paths (folder or file names, suffixed when they repeat). */
export function modelIds(paths: readonly string[], names?: readonly (string | undefined)[]): string[] {
  const ids: string[] = [];
  paths.forEach((p, i) => {
    const want = names?.[i] ?? (basename(p.replace(/[\\/]+$/, '')).replace(/\.(gguf|bin)$/, '') || `model_${i}`);
    let id = want;
    for (let k = 2; ids.includes(id); k++) id = `${want}_${k}`;
    ids.push(id);
  });
  return ids;
}

export interface LoadedMergeModels {
  backend: Backend;
  base: LlamaModel | null;
  models: LlamaModel[];
  baseId: string | null;
  ids: string[];
  dispose(): void;
}

/** Loads the base (optional) and the models on one new backend, once every path is known to exist. */
export async function loadMergeModels(basePath: string | null, paths: readonly string[], names?: readonly (string | undefined)[]): Promise<LoadedMergeModels> {
  for (const p of basePath ? [basePath, ...paths] : paths) await isDirectory(p);
  const backend = defaultBackend();
  const loaded: LlamaModel[] = [];
  try {
    const base = basePath ? await loadAnyModel(basePath, backend) : null;
    if (base) loaded.push(base);
    const models: LlamaModel[] = [];
    for (const p of paths) {
      const m = await loadAnyModel(p, backend);
      loaded.push(m);
      models.push(m);
    }
    const ids = modelIds(paths, names);
    let baseId: string | null = null;
    if (basePath) {
      baseId = modelIds([basePath])[0]!;
      while (ids.includes(baseId)) baseId = `${baseId}_base`;
    }
    return {
      backend,
      base,
      models,
      baseId,
      ids,
      dispose() {
        for (const m of loaded) m.dispose();
        backend.dispose();
      },
    };
  } catch (e) {
    for (const m of loaded) m.dispose();
    backend.dispose();
    throw e;
  }
}
