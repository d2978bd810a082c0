/**
 * TensorSource: one interface for every place tensors come from (a safetensors file, a sharded
 * folder, a GGUF or llama2.c file). It lists tensors without reading data and reads one tensor on
 * demand, raw or as float32.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { AmalgamError } from '../errors.js';
import type { DType } from '../tensor/dtype.js';

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
}

export interface TensorSource {
  /** File or folder the tensors come from (for messages). */
  readonly path: string;
  /** String metadata of the container (safetensors `__metadata__`, GGUF scalars, ...). */
  readonly metadata: Record<string, string>;
  /** All tensors, in a stable order. */
  tensors(): TensorInfo[];
  has(name: string): boolean;
  /** Throws E_MISSING naming the tensor and the file when absent. */
  info(name: string): TensorInfo;
  /** Little-endian bytes exactly as stored. */
  readRaw(name: string): Promise<Uint8Array>;
  /** Values converted to float32 (F32/F16/BF16/F64 and dequantised formats). */
  readF32(name: string): Promise<Float32Array>;
  close(): Promise<void>;
}

/** Random access to bytes: a file read with positional reads, or memory. */
export interface ByteReader {
  readonly path: string;
  readonly size: number;
  /** Exactly `length` bytes from `position` into a fresh, 8-byte-aligned array. */
  read(position: number, length: number): Promise<Uint8Array>;
  /**
   * Optional: fill `dst` with exactly `dst.length` bytes from `position` (same checks and errors as
   * `read`). Lets a caller read into memory it already owns, e.g. straight into an output array.
   */
  readInto?(position: number, dst: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

/** Largest single positional read (fs.read limit is 2 GiB - 1). */
const CHUNK = 1 << 30;

export class FileByteReader implements ByteReader {
  private constructor(
    readonly path: string,
    readonly size: number,
    private fh: FileHandle | undefined,
  ) {}

  static async open(path: string): Promise<FileByteReader> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (e) {
      throw ioError(path, e);
    }
    const st = await fh.stat();
    if (!st.isFile()) {
      await fh.close();
      throw new AmalgamError('E_IO', 'not a regular file', { file: path });
    }
    return new FileByteReader(path, st.size, fh);
  }

  async read(position: number, length: number): Promise<Uint8Array> {
    this.check(position, length);
    const out = allocBytes(length);
    await this.fill(position, out);
    return out;
  }

  async readInto(position: number, dst: Uint8Array): Promise<void> {
    this.check(position, dst.length);
    await this.fill(position, dst);
  }

  private check(position: number, length: number): void {
    if (!this.fh) throw new AmalgamError('E_IO', 'file is already closed', { file: this.path });
    if (position < 0 || length < 0 || position + length > this.size) {
      throw new AmalgamError('E_OFFSETS', `read of ${length} bytes at ${position} is beyond the end of the file (${this.size} bytes)`, { file: this.path });
    }
  }

  private async fill(position: number, out: Uint8Array): Promise<void> {
    const length = out.length;
    let done = 0;
    while (done < length) {
      const want = Math.min(CHUNK, length - done);
      const { bytesRead } = await this.fh!.read(out, done, want, position + done);
      if (bytesRead === 0) throw new AmalgamError('E_IO', `file shrank while reading (at byte ${position + done})`, { file: this.path });
      done += bytesRead;
    }
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = undefined;
    if (fh) await fh.close();
  }
}

export class MemoryByteReader implements ByteReader {
  readonly size: number;
  constructor(
    private readonly bytes: Uint8Array,
    readonly path = '<memory>',
  ) {
    this.size = bytes.length;
  }
  async read(position: number, length: number): Promise<Uint8Array> {
    if (position < 0 || length < 0 || position + length > this.size) {
      throw new AmalgamError('E_OFFSETS', `read of ${length} bytes at ${position} is beyond the end of the data (${this.size} bytes)`, { file: this.path });
    }
    const out = allocBytes(length);
    out.set(this.bytes.subarray(position, position + length));
    return out;
  }
  async readInto(position: number, dst: Uint8Array): Promise<void> {
    const length = dst.length;
    if (position < 0 || position + length > this.size) {
      throw new AmalgamError('E_OFFSETS', `read of ${length} bytes at ${position} is beyond the end of the data (${this.size} bytes)`, { file: this.path });
    }
    dst.set(this.bytes.subarray(position, position + length));
  }
  async close(): Promise<void> {}
}

/** A byte array backed by its own ArrayBuffer (offset 0, so any typed view is aligned). */
export function allocBytes(length: number): Uint8Array {
  if (length > 0 && length <= BUFFER_MAX) {
    // Uninitialised memory from its own ArrayBuffer (no pool, offset 0): every byte is
    // overwritten by the caller's read.
    const b = Buffer.allocUnsafeSlow(length);
    return new Uint8Array(b.buffer, b.byteOffset, length);
  }
  return new Uint8Array(new ArrayBuffer(length));
}
const BUFFER_MAX = 2 ** 31;

export function ioError(path: string, e: unknown): AmalgamError {
  const code = (e as NodeJS.ErrnoException)?.code;
  if (code === 'ENOENT') return new AmalgamError('E_IO', 'no such file or folder', { file: path, cause: e });
  if (code === 'EACCES') return new AmalgamError('E_IO', 'permission denied', { file: path, cause: e });
  if (code === 'EISDIR') return new AmalgamError('E_IO', 'is a folder, expected a file', { file: path, cause: e });
  return new AmalgamError('E_IO', (e as Error)?.message ?? String(e), { file: path, cause: e });
}
