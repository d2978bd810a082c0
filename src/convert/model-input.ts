/**
 * Model arguments of the runtime commands: a Hugging Face folder is used as it is; a GGUF or
 * llama2.c file is converted into a temporary folder first (removed afterwards).
 */
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../errors.js';
import { convertToHf } from './to-hf.js';

/**
 * Runs `fn` on a Hugging Face model folder: `path` itself when it is a folder; for a GGUF or
 * llama2.c file, its conversion (`convertToHf`) into a temporary folder, removed when `fn` is done.
 */
export async function withModelFolder<T>(path: string, fn: (dir: string) => Promise<T>): Promise<T> {
  let isDir: boolean;
  try {
    isDir = (await stat(path)).isDirectory();
  } catch (e) {
    throw new AmalgamError('E_IO', 'the model does not exist', {
      file: path,
      hint: 'give a Hugging Face model folder, or a GGUF or llama2.c file',
      cause: e,
    });
  }
  if (isDir) return fn(path);
  const tmp = await mkdtemp(join(tmpdir(), 'amalgam-model-'));
  try {
    const dir = join(tmp, 'model');
    await convertToHf(path, dir);
    return await fn(dir);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
