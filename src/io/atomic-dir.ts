/**
 * Output folders that appear under their final name only when complete: everything is written
 * into a hidden staging folder beside the target, which `commit()` renames into place.
 */
import { chmod, copyFile, mkdir, realpath, rename, rm, stat, readdir } from 'node:fs/promises';
import { basename, dirname, join, relative, resolve, isAbsolute } from 'node:path';
import { randomBytes } from 'node:crypto';
import { AmalgamError } from '../errors.js';

export interface StagingDirOptions {
  /** Replace an existing target folder (default: refuse unless it is empty). */
  overwrite?: boolean;
  /**
   * Files and folders the job reads. The target may not be one of them or hold one: replacing
   * it would delete an input (checked through symbolic links).
   */
  inputs?: readonly string[];
}

/** The real path of `p` (links resolved), or its absolute path where it does not exist. */
export async function realOrResolved(p: string): Promise<string> {
  try {
    return await realpath(p);
  } catch {
    return resolve(p);
  }
}

/** Whether path `p` is `folder` or inside it (both absolute or both relative to one folder). */
export function isWithin(folder: string, p: string): boolean {
  const rel = relative(folder, p);
  return rel === '' || (!rel.startsWith('..') && !isAbsolute(rel));
}

/**
 * Refuses an output folder that is one of the inputs or holds one (after resolving symbolic
 * links), since writing it would replace or delete that input.
 */
export async function refuseReplacingInputs(target: string, inputs: readonly string[]): Promise<void> {
  const out = await realOrResolved(target);
  for (const input of inputs) {
    const real = await realOrResolved(input);
    if (isWithin(out, real)) {
      throw new AmalgamError('E_USAGE', real === out ? `the output folder is the input ${input}` : `the output folder holds the input ${input}: writing it would delete that input`, {
        file: resolve(target),
        hint: 'write the output to a folder that holds none of the inputs',
      });
    }
  }
}

export class StagingDir {
  private done = false;
  private constructor(
    readonly target: string,
    readonly path: string,
    private readonly overwrite: boolean,
    private readonly inputs: readonly string[],
  ) {}

  /** Create the staging folder. Fails early if the target exists and may not be replaced. */
  static async create(target: string, opts: StagingDirOptions = {}): Promise<StagingDir> {
    const abs = resolve(target);
    await refuseReplacingInputs(abs, opts.inputs ?? []);
    await checkTarget(abs, !!opts.overwrite);
    const parent = dirname(abs);
    const path = join(parent, `.${basename(abs)}.partial-${process.pid}-${randomBytes(4).toString('hex')}`);
    try {
      await mkdir(parent, { recursive: true });
      await mkdir(path);
    } catch (e) {
      throw cannotCreate(abs, e);
    }
    return new StagingDir(abs, path, !!opts.overwrite, opts.inputs ?? []);
  }

  /** Path of a file inside the staging folder. */
  file(name: string): string {
    return join(this.path, name);
  }

  /** Move the finished folder to its final name. */
  async commit(): Promise<string> {
    if (this.done) throw new AmalgamError('E_USAGE', 'staging folder already committed or aborted', { file: this.target });
    await refuseReplacingInputs(this.target, this.inputs);
    await checkTarget(this.target, this.overwrite);
    let backup: string | undefined;
    if (await exists(this.target)) {
      backup = join(dirname(this.target), `.${basename(this.target)}.old-${process.pid}-${randomBytes(4).toString('hex')}`);
      await rename(this.target, backup);
    }
    await rename(this.path, this.target);
    if (backup) await rm(backup, { recursive: true, force: true });
    this.done = true;
    return this.target;
  }

  /** Remove the staging folder and everything in it. */
  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    await rm(this.path, { recursive: true, force: true });
  }
}

/** Why an output folder cannot be made, naming the folder asked for (not the staging folder). */
function cannotCreate(target: string, e: unknown): AmalgamError {
  const code = (e as NodeJS.ErrnoException)?.code;
  const why =
    code === 'EACCES' || code === 'EPERM'
      ? 'permission denied: the output folder cannot be created there'
      : code === 'ENOTDIR' || code === 'EEXIST'
        ? 'the output folder cannot be created: a part of its path is a file, not a folder'
        : code === 'EROFS'
          ? 'the output folder cannot be created: the file system is read-only'
          : code === 'ENOSPC'
            ? 'the output folder cannot be created: no space left on the device'
            : `the output folder cannot be created: ${(e as Error)?.message ?? String(e)}`;
  return new AmalgamError('E_IO', why, { file: target, hint: 'choose an output path in a folder you can write', cause: e });
}

/**
 * Checks, before a long job, that its output folder can be written as `withStagingDir` will:
 * the same checks (inputs, existing folder), and a staging folder made and removed again.
 */
export async function checkOutputFolder(target: string, opts: StagingDirOptions = {}): Promise<void> {
  await (await StagingDir.create(target, opts)).abort();
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

async function checkTarget(target: string, overwrite: boolean): Promise<void> {
  let st;
  try {
    st = await stat(target);
  } catch {
    return;
  }
  if (!st.isDirectory()) {
    throw new AmalgamError('E_IO', 'output path exists and is not a folder', { file: target, hint: 'choose another output path' });
  }
  if (!overwrite && (await readdir(target)).length > 0) {
    throw new AmalgamError('E_IO', 'output folder exists and is not empty', { file: target, hint: 'choose another output path or pass --overwrite' });
  }
}

/**
 * Copies a file into an output folder, writable by its owner even where the source is read-only
 * (files copied from a read-only model folder stay editable, as the files written fresh are).
 */
export async function copyFileWritable(src: string, dst: string): Promise<void> {
  await copyFile(src, dst);
  const mode = (await stat(dst)).mode & 0o777;
  if (!(mode & 0o200)) await chmod(dst, mode | 0o200);
}

/** Run `fn` with a staging folder; commit on success, remove everything on failure. */
export async function withStagingDir<T>(target: string, fn: (dir: StagingDir) => Promise<T>, opts: StagingDirOptions = {}): Promise<T> {
  const dir = await StagingDir.create(target, opts);
  try {
    const out = await fn(dir);
    await dir.commit();
    return out;
  } catch (e) {
    await dir.abort();
    throw e;
  }
}
