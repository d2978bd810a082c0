/**
 * Reading a worker's next tensors while it merges the current one.
 *
 * A merge worker holds two areas of its kernel memory (`kernelMemory`), each large enough for the
 * inputs of one streamed tensor. While the kernel works on the tensor in one area, the inputs of
 * the next are read into the other by asynchronous reads (Node's thread pool), so reading and
 * merging overlap instead of taking turns. Each input is read once, whole, in the layout the
 * kernel reads in place (`Preloaded`): the base first, then the other models in task order, one
 * slot each, followed by a zero pad. Files marked `direct` are read with O_DIRECT in whole pages
 * to the slot's page-aligned start, then moved to the common offset where their page offset
 * differs from the base's; any refusal falls back to ordinary reads.
 */
import { constants, open, read } from 'node:fs';
import { AmalgamError } from '../errors.js';
import { DIRECT_ALIGN, directFlag } from '../io/aligned.js';
import { ioError } from '../io/source.js';
import { numel } from '../tensor/dtype.js';
import type { Preloaded } from './fused-common.js';
import { kernelMemory, slotBytes } from './fused-wasm.js';
import type { ComputeTask } from './worker.js';

/**
 * Where the areas are: two of `bytes` from byte `base` of the kernel memory, then, where `big` is
 * given, a third of `big` bytes for tensors too large for the others (page multiples). The memory
 * is taken only when first used.
 */
export interface PrefetchAreas {
  base: number;
  bytes: number;
  big?: number;
}

/** Reads below this size go through the page cache even from files marked direct. */
const DIRECT_MIN = 1 << 18;
/** Largest single read: big inputs are read in pieces, in parallel. */
const PIECE = 8 << 20;

function openAsync(path: string, flags: number): Promise<number> {
  return new Promise((resolve, reject) => open(path, flags, (e, fd) => (e ? reject(e) : resolve(fd))));
}

function readAsync(fd: number, buf: Buffer, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buf, offset, length, position, (e, n) => (e ? reject(e) : resolve(n))));
}

/** Bytes per value of a dtype the fused kernel reads from files (BF16 or F32), else undefined. */
function valueSize(dtype: string | undefined): number | undefined {
  return dtype === 'BF16' ? 2 : dtype === 'F32' ? 4 : undefined;
}

/**
 * The reader of one worker. Files stay open for the worker's life (one merge); Node closes the
 * descriptors a worker opened when it exits.
 */
export class InputPrefetcher {
  private readonly fds = new Map<string, Promise<number>>();
  private readonly directFds = new Map<string, Promise<number | undefined>>();
  private readonly busy = [false, false, false];

  constructor(private readonly areas: PrefetchAreas) {}

  /** Which area a task's inputs go to (0 or 1: either; 2: the big one), with their slot layout. */
  private layout(task: ComputeTask): { order: number[]; n: number; size: number; stride: number; big: boolean } | undefined {
    const base = task.inputs.findIndex((i) => i.model === task.base);
    if (base < 0 || task.inputs.length < 2 || !task.inputs.every((i) => i.file)) return undefined;
    const size = valueSize(task.inputs[0]!.dtype);
    if (size === undefined || !task.inputs.every((i) => valueSize(i.dtype) === size)) return undefined;
    const n = numel(task.outShape);
    if (!task.inputs.every((i) => numel(i.shape) === n)) return undefined;
    const stride = slotBytes(n * size);
    const need = task.inputs.length * stride;
    const big = need > this.areas.bytes;
    if (big && need > (this.areas.big ?? 0)) return undefined;
    const order = [base, ...task.inputs.map((_, k) => k).filter((k) => k !== base)];
    return { order, n, size, stride, big };
  }

  /** Whether the task's inputs are read by `start` (all in files, fitting one area). */
  eligible(task: ComputeTask): boolean {
    return this.layout(task) !== undefined;
  }

  /**
   * Starts reading a task's inputs into a free area. Returns the area and a promise of the layout,
   * or undefined where no area is free or the task does not fit one.
   */
  start(task: ComputeTask): { area: number; ready: Promise<Preloaded> } | undefined {
    const l = this.layout(task);
    if (!l) return undefined;
    const area = l.big ? (this.busy[2] ? -1 : 2) : this.busy.slice(0, 2).indexOf(false);
    if (area < 0) return undefined;
    const mem = kernelMemory(this.areas.base + 2 * this.areas.bytes + (l.big ? this.areas.big! : 0));
    if (!mem) return undefined;
    this.busy[area] = true;
    const start = this.areas.base + area * this.areas.bytes;
    const first = task.inputs[l.order[0]!]!.file!;
    const at = first.direct ? first.offset % DIRECT_ALIGN : 0;
    const bytes = l.n * l.size;
    // Every read settles before the promise does, failed or not: the area is released only then.
    const ready = Promise.allSettled(
      l.order.map(async (k, slot) => {
        const file = task.inputs[k]!.file!;
        const slotStart = start + slot * l.stride;
        await this.readInput(mem, file, slotStart, at, bytes, task.tensorName);
        mem.fill(0, slotStart + at + bytes, slotStart + at + bytes + 16);
      }),
    ).then((results) => {
      const failed = results.find((r) => r.status === 'rejected');
      if (failed) throw failed.reason;
      return { pIn: start + at, stride: l.stride };
    });
    return { area, ready };
  }

  release(area: number): void {
    this.busy[area] = false;
  }

  private fd(path: string): Promise<number> {
    let fd = this.fds.get(path);
    if (!fd) {
      fd = openAsync(path, constants.O_RDONLY).catch((e) => {
        this.fds.delete(path);
        throw ioError(path, e);
      });
      this.fds.set(path, fd);
    }
    return fd;
  }

  private directFd(path: string): Promise<number | undefined> {
    let fd = this.directFds.get(path);
    if (!fd) {
      const flag = directFlag();
      fd = flag === undefined ? Promise.resolve(undefined) : openAsync(path, constants.O_RDONLY | flag).catch(() => undefined);
      this.directFds.set(path, fd);
    }
    return fd;
  }

  /** One input's `bytes` at `file.offset` to `slotStart + at` of `mem`. */
  private async readInput(
    mem: Buffer,
    file: { path: string; offset: number; direct?: boolean },
    slotStart: number,
    at: number,
    bytes: number,
    tensorName: string,
  ): Promise<void> {
    if (file.direct && bytes >= DIRECT_MIN) {
      const dfd = await this.directFd(file.path);
      const skip = file.offset % DIRECT_ALIGN;
      if (dfd !== undefined && (await this.readDirect(dfd, mem, slotStart, file.offset - skip, skip + bytes))) {
        if (skip !== at) mem.copy(mem, slotStart + at, slotStart + skip, slotStart + skip + bytes);
        return;
      }
      this.directFds.set(file.path, Promise.resolve(undefined));
    }
    const fd = await this.fd(file.path);
    await settleAll(
      pieces(bytes, PIECE).map(async ([from, len]) => {
        let done = 0;
        while (done < len) {
          const r = await readAsync(fd, mem, slotStart + at + from + done, len - done, file.offset + from + done).catch((e) => {
            throw ioError(file.path, e);
          });
          if (r === 0) throw new AmalgamError('E_IO', `file ended while reading a tensor (at byte ${file.offset + from + done})`, { file: file.path, key: tensorName });
          done += r;
        }
      }),
    );
  }

  /** Whole pages covering `length` bytes from aligned `position` to aligned `dst`; false if refused or short. */
  private async readDirect(fd: number, mem: Buffer, dst: number, position: number, length: number): Promise<boolean> {
    const want = Math.ceil(length / DIRECT_ALIGN) * DIRECT_ALIGN;
    try {
      const got = await settleAll(
        pieces(want, PIECE).map(async ([from, len]) => {
          const r = await readAsync(fd, mem, dst + from, len, position + from);
          // A short read is the end of the file, fine only past the values wanted.
          return r === len || from + r >= length;
        }),
      );
      return got.every(Boolean);
    } catch {
      return false;
    }
  }

}

/** Like Promise.all, but settles only once every promise has: no read is left writing memory. */
async function settleAll<T>(promises: Promise<T>[]): Promise<T[]> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r) => r.status === 'rejected');
  if (failed) throw (failed as PromiseRejectedResult).reason;
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}

/** [offset, length] pieces of at most `piece` bytes (a multiple of the page) covering `total`. */
function pieces(total: number, piece: number): [number, number][] {
  const out: [number, number][] = [];
  for (let from = 0; from < total; from += piece) out.push([from, Math.min(piece, total - from)]);
  return out;
}
