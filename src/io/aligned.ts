/**
 * Page-aligned shared memory and direct (page-cache bypassing) writes.
 *
 * Writing a large output through the page cache costs one kernel copy per byte plus the page
 * cache's own memory; on virtual machines that hand freed memory back to the host, filling fresh
 * page cache costs several seconds of system time per GB. A write with `O_DIRECT` goes from the
 * process's memory to the device instead. Linux requires its buffer address, file offset and
 * length to be multiples of the device's logical block size, which JavaScript cannot see for an
 * ordinary ArrayBuffer; a WebAssembly memory is always mapped at a page boundary, so its buffer
 * is the aligned memory used here.
 */
import { closeSync, constants, fstatSync, openSync, readSync } from 'node:fs';
import { wasm } from '../backend/wasm/wasm-api.js';

/** Alignment of direct writes: buffer address, file offset and length (a page). */
export const DIRECT_ALIGN = 4096;

const WASM_PAGE = 65536;
/** Largest memory a WebAssembly memory can give (65,536 pages of 64 KiB). */
const MAX_ALIGNED_BYTES = 65536 * WASM_PAGE;

const pageAligned = new WeakSet<ArrayBufferLike>();

/**
 * A SharedArrayBuffer of at least `bytes` whose first byte sits on a page boundary (the buffer of
 * a shared WebAssembly memory, rounded up to 64 KiB), or a plain SharedArrayBuffer when that is
 * too large or unavailable.
 */
export function allocAlignedShared(bytes: number): SharedArrayBuffer {
  const pages = Math.max(1, Math.ceil(bytes / WASM_PAGE));
  if (pages * WASM_PAGE <= MAX_ALIGNED_BYTES) {
    try {
      const buf = new wasm.Memory({ initial: pages, maximum: pages, shared: true }).buffer as SharedArrayBuffer;
      pageAligned.add(buf);
      return buf;
    } catch {
      // Out of address space for another memory: an ordinary buffer still works (buffered writes).
    }
  }
  return new SharedArrayBuffer(bytes);
}

/** True when `buf` came from `allocAlignedShared` with a page-aligned start. */
export function isPageAligned(buf: ArrayBufferLike): boolean {
  return pageAligned.has(buf);
}

/** The `O_DIRECT` open flag, or undefined where the platform has none (macOS, Windows). */
export function directFlag(): number | undefined {
  const flag = (constants as Record<string, number | undefined>).O_DIRECT;
  return flag && process.platform === 'linux' ? flag : undefined;
}

/** Whether direct reads and writes are allowed: `AMALGAM_DIRECT_IO=0` turns them off. */
export function directIoEnabled(): boolean {
  const v = process.env.AMALGAM_DIRECT_IO;
  return directFlag() !== undefined && !(v !== undefined && /^(0|false|no|off)$/i.test(v.trim()));
}

/**
 * Splits a write of `length` bytes at file position `position`, from `data` whose first byte is at
 * `byteOffset` in a page-aligned buffer, into a head, an aligned middle and a tail. The middle is
 * empty unless the memory and file positions agree modulo the page size and a whole page fits.
 */
export function splitForDirect(position: number, byteOffset: number, length: number): { head: number; middle: number; tail: number } {
  const none = { head: length, middle: 0, tail: 0 };
  if ((byteOffset - position) % DIRECT_ALIGN !== 0) return none;
  const start = Math.ceil(position / DIRECT_ALIGN) * DIRECT_ALIGN;
  const end = Math.floor((position + length) / DIRECT_ALIGN) * DIRECT_ALIGN;
  if (end <= start) return none;
  return { head: start - position, middle: end - start, tail: position + length - end };
}

/** A positional read slower than this (microseconds) went to the device, not the page cache. */
const CACHED_READ_US = 30;

/**
 * Whether most of a file seems to be out of the page cache: the median time of one-byte reads at
 * `samples` pages spread over it is above what a page-cache hit takes. JavaScript cannot ask the
 * kernel (mincore), so this times it; a read that misses brings in only the pages around it.
 * False when the file cannot be read or is smaller than a page per sample.
 */
export function looksUncached(path: string, samples = 9): boolean {
  let fd: number | undefined;
  try {
    fd = openSync(path, 'r');
    const size = fstatSync(fd).size;
    if (size < samples * DIRECT_ALIGN * 2) return false;
    const one = Buffer.alloc(1);
    readSync(fd, one, 0, 1, 0); // the header, just parsed: warms the call path
    const times: number[] = [];
    for (let i = 0; i < samples; i++) {
      const position = Math.floor((((i + 0.5) / samples) * size) / DIRECT_ALIGN) * DIRECT_ALIGN;
      const t0 = process.hrtime.bigint();
      readSync(fd, one, 0, 1, position);
      times.push(Number(process.hrtime.bigint() - t0) / 1000);
    }
    times.sort((a, b) => a - b);
    return times[samples >> 1]! > CACHED_READ_US;
  } catch {
    return false;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}
