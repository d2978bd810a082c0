/**
 * Model arguments of the runtime commands: a Hugging Face folder is used as it is; a GGUF or
 * llama2.c file is converted into a temporary folder first (removed afterwards).
 *
 * The temporary folder goes away however the process ends: `withModelFolder` removes it when its
 * callback settles, and a small watchdog process removes it when this process dies first (Ctrl-C
 * or SIGTERM in the middle of a long synchronous computation, `process.exit`, SIGKILL). Signals
 * keep their default effect, so an interrupted command still stops at once and exits with the
 * signal's status.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { AmalgamError, isAmalgamError } from '../errors.js';
import { isWithin } from '../io/atomic-dir.js';
import { convertToHf } from './to-hf.js';

/**
 * Runs in the watchdog process: waits until its standard input closes (this process ended, or
 * the folder was removed already), then removes the folder named by its argument.
 */
const WATCHDOG = `
const { rmSync } = require('node:fs');
const dir = process.argv[1];
let done = false;
const remove = () => {
  if (done) return;
  done = true;
  try { rmSync(dir, { recursive: true, force: true }); } catch {}
  process.exit(0);
};
process.on('SIGINT', () => {});
process.stdin.on('end', remove);
process.stdin.on('close', remove);
process.stdin.on('error', remove);
process.stdin.resume();
`;

/**
 * Starts the watchdog of a temporary folder: a detached process (so that Ctrl-C at a terminal,
 * which signals the whole foreground process group, leaves it running) holding a pipe from this
 * process. Returns a function that releases it; undefined where it cannot be started.
 */
function watchTemporaryFolder(dir: string): (() => void) | undefined {
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  let child: ChildProcess;
  try {
    child = spawn(process.execPath, ['-e', WATCHDOG, dir], { detached: true, stdio: ['pipe', 'ignore', 'ignore'], env, windowsHide: true });
  } catch {
    return undefined;
  }
  // Without a watchdog the folder is still removed on every ending but a killed process.
  child.on('error', () => {});
  child.stdin?.on('error', () => {});
  child.unref();
  (child.stdin as { unref?: () => void } | null)?.unref?.();
  return () => {
    child.stdin?.end();
  };
}

/** Files a folder holds that `amalgam convert` reads (GGUF, llama2.c checkpoints), by name. */
export function modelFilesIn(entries: readonly string[]): string[] {
  return entries
    .filter((f) => !f.startsWith('.'))
    .filter((f) => /\.gguf$/i.test(f) || (/\.bin$/i.test(f) && !/^pytorch_model/i.test(f) && !/^tok/i.test(f)))
    .sort();
}

/**
 * Why a folder given as a model is not a Hugging Face model folder, where that is clear from its
 * files: a PEFT adapter, or a folder of GGUF / llama2.c files. Undefined otherwise (including
 * every folder with a config.json), leaving the details to the model loader.
 */
async function notAModelFolder(dir: string): Promise<AmalgamError | undefined> {
  let entries: string[];
  try {
    entries = await readdir(dir);
  } catch {
    return undefined;
  }
  if (entries.includes('config.json')) return undefined;
  if (entries.includes('adapter_config.json')) {
    let base: unknown;
    try {
      base = (JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8')) as Record<string, unknown>)?.base_model_name_or_path;
    } catch {
      base = undefined;
    }
    const baseText = typeof base === 'string' && base !== '' ? ` (${base})` : '';
    return new AmalgamError('E_USAGE', 'this is a PEFT adapter folder (adapter_config.json), not a model', {
      file: dir,
      hint: `give the base model${baseText} as the model and this folder with --adapter (generate, eval), or bake it into a full model with amalgam lora merge`,
    });
  }
  const files = modelFilesIn(entries);
  if (files.length) {
    return new AmalgamError('E_USAGE', `not a Hugging Face model folder (no config.json); it holds the model file${files.length > 1 ? 's' : ''} ${files.join(', ')}`, {
      file: dir,
      hint: `give the file itself as the model (GGUF and llama2.c files are converted on the fly), e.g. ${join(dir, files[0]!)}`,
    });
  }
  return undefined;
}

/**
 * An error about the temporary conversion, named after the user's model file instead: the
 * temporary folder is gone by the time the message is read. A file inside the folder becomes the
 * key (`stories.gguf: 'config.json': ...`) unless the error has a key of its own.
 */
function renameTemporary(e: AmalgamError, tmp: string, dir: string, model: string): AmalgamError {
  const file = e.file;
  if (!file || !isWithin(tmp, file)) return e;
  const swap = (s: string) => s.split(dir).join(model).split(tmp).join(model);
  // Undo the formatting of AmalgamError: "<file>: '<key>': <message> (<hint>)".
  const prefix = [file, e.key !== undefined && e.key !== '' ? `'${e.key}'` : undefined].filter((p) => p !== undefined).join(': ') + ': ';
  const suffix = e.hint ? ` (${e.hint})` : '';
  if (!e.message.startsWith(prefix) || !e.message.endsWith(suffix)) return new AmalgamError(e.code, swap(e.message), { cause: e });
  const message = e.message.slice(prefix.length, e.message.length - suffix.length);
  const key = e.key ?? (isWithin(dir, file) && file !== dir ? relative(dir, file) : undefined);
  return new AmalgamError(e.code, swap(message), {
    file: model,
    ...(key !== undefined ? { key } : {}),
    ...(e.hint ? { hint: swap(e.hint) } : {}),
    cause: e,
  });
}

/**
 * Runs `fn` on a Hugging Face model folder: `path` itself when it is a folder; for a GGUF or
 * llama2.c file, its conversion (`convertToHf`) into a temporary folder, removed when `fn` is done
 * (or when the process is interrupted). Errors that name the temporary folder name `path` instead.
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
  if (isDir) {
    const problem = await notAModelFolder(path);
    if (problem) throw problem;
    return fn(path);
  }
  let tmp: string;
  try {
    tmp = await mkdtemp(join(tmpdir(), 'amalgam-model-'));
  } catch (e) {
    throw new AmalgamError('E_IO', `cannot make a temporary folder to convert ${path} into: ${(e as Error).message}`, {
      file: tmpdir(),
      hint: 'set TMPDIR to a folder that exists and can be written, or convert the model once with amalgam convert',
      cause: e,
    });
  }
  const release = watchTemporaryFolder(tmp);
  const dir = join(tmp, 'model');
  try {
    await convertToHf(path, dir);
    return await fn(dir);
  } catch (e) {
    throw isAmalgamError(e) ? renameTemporary(e, tmp, dir, path) : e;
  } finally {
    await rm(tmp, { recursive: true, force: true });
    release?.();
  }
}
