/**
 * GGUF (versions 2 and 3): a strict, lazy reader and a small serializer (formats.md §5).
 *
 * The header is parsed incrementally with bounded positional reads: every count and length in
 * the file is checked against the bytes that remain before anything is allocated, so a corrupt
 * or hostile file cannot make the reader allocate more than the file's size. Every error names
 * the file and the metadata key or tensor concerned.
 *
 * The TensorSource view lists tensors under their GGUF names with row-major shapes (the GGUF
 * dimensions reversed). F32, F16 and BF16 tensors appear with that dtype and read as stored.
 * Q8_0 tensors appear as dtype 'F32': `readRaw` returns their dequantised float32 bytes, and
 * `readF32` the dequantised values. `ggmlTensors()` gives the native view (ggml type, GGUF
 * dimensions, offsets, stored byte sizes).
 */
import { AmalgamError } from '../errors.js';
import { decodeToF32, f16ToF32Scalar, f32ToBf16, f32ToF16, f32ToF16Scalar, type DType } from '../tensor/dtype.js';
import { allocBytes, FileByteReader, MemoryByteReader, type ByteReader, type TensorInfo, type TensorSource } from './source.js';

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
export const GGUF_DEFAULT_ALIGNMENT = 32;
/** Longest metadata key (formats.md §5.2). */
export const GGUF_MAX_KEY_BYTES = 65535;
/** Longest tensor name (formats.md §5.4). */
export const GGUF_MAX_TENSOR_NAME_BYTES = 64;
/** Largest tensor rank (formats.md §5.4). */
export const GGUF_MAX_DIMS = 4;
/** Deepest nesting of arrays inside arrays that the reader accepts. */
export const GGUF_MAX_ARRAY_DEPTH = 8;

// ---------------------------------------------------------------------------------------------
// Metadata value types

export const GGUF_TYPE = {
  UINT8: 0,
  INT8: 1,
  UINT16: 2,
  INT16: 3,
  UINT32: 4,
  INT32: 5,
  FLOAT32: 6,
  BOOL: 7,
  STRING: 8,
  ARRAY: 9,
  UINT64: 10,
  INT64: 11,
  FLOAT64: 12,
} as const;
export type GgufValueType = (typeof GGUF_TYPE)[keyof typeof GGUF_TYPE];

export const GGUF_TYPE_NAMES: readonly string[] = [
  'UINT8', 'INT8', 'UINT16', 'INT16', 'UINT32', 'INT32', 'FLOAT32', 'BOOL', 'STRING', 'ARRAY', 'UINT64', 'INT64', 'FLOAT64',
];

/** Smallest encoded size of one value of each type (strings: the length; arrays: type + count). */
const MIN_VALUE_BYTES = [1, 1, 2, 2, 4, 4, 4, 1, 8, 12, 8, 8, 8];

/** An array value: its element type and elements (nested arrays are GgufArray values too). */
export interface GgufArray {
  elementType: GgufValueType;
  values: GgufValue[];
}

/**
 * A metadata value. Integers of up to 32 bits and floats are numbers; 64-bit integers are
 * numbers when they are safe integers and bigints otherwise.
 */
export type GgufValue = number | bigint | boolean | string | GgufArray;

export interface GgufKv {
  key: string;
  type: GgufValueType;
  value: GgufValue;
}

function isIntegerType(t: number): boolean {
  return t === 0 || t === 1 || t === 2 || t === 3 || t === 4 || t === 5 || t === 10 || t === 11;
}

// ---------------------------------------------------------------------------------------------
// ggml tensor types

export interface GgmlTypeInfo {
  id: number;
  name: string;
  /** Elements per block. */
  blockSize: number;
  /** Bytes per block. */
  typeSize: number;
  /** Whether amalgam reads this type. */
  supported: boolean;
}

const GGML_TYPE_LIST: GgmlTypeInfo[] = [
  { id: 0, name: 'F32', blockSize: 1, typeSize: 4, supported: true },
  { id: 1, name: 'F16', blockSize: 1, typeSize: 2, supported: true },
  { id: 2, name: 'Q4_0', blockSize: 32, typeSize: 18, supported: false },
  { id: 3, name: 'Q4_1', blockSize: 32, typeSize: 20, supported: false },
  { id: 6, name: 'Q5_0', blockSize: 32, typeSize: 22, supported: false },
  { id: 7, name: 'Q5_1', blockSize: 32, typeSize: 24, supported: false },
  { id: 8, name: 'Q8_0', blockSize: 32, typeSize: 34, supported: true },
  { id: 9, name: 'Q8_1', blockSize: 32, typeSize: 36, supported: false },
  { id: 10, name: 'Q2_K', blockSize: 256, typeSize: 84, supported: false },
  { id: 11, name: 'Q3_K', blockSize: 256, typeSize: 110, supported: false },
  { id: 12, name: 'Q4_K', blockSize: 256, typeSize: 144, supported: false },
  { id: 13, name: 'Q5_K', blockSize: 256, typeSize: 176, supported: false },
  { id: 14, name: 'Q6_K', blockSize: 256, typeSize: 210, supported: false },
  { id: 15, name: 'Q8_K', blockSize: 256, typeSize: 292, supported: false },
  { id: 16, name: 'IQ2_XXS', blockSize: 256, typeSize: 66, supported: false },
  { id: 17, name: 'IQ2_XS', blockSize: 256, typeSize: 74, supported: false },
  { id: 18, name: 'IQ3_XXS', blockSize: 256, typeSize: 98, supported: false },
  { id: 19, name: 'IQ1_S', blockSize: 256, typeSize: 50, supported: false },
  { id: 20, name: 'IQ4_NL', blockSize: 32, typeSize: 18, supported: false },
  { id: 21, name: 'IQ3_S', blockSize: 256, typeSize: 110, supported: false },
  { id: 22, name: 'IQ2_S', blockSize: 256, typeSize: 82, supported: false },
  { id: 23, name: 'IQ4_XS', blockSize: 256, typeSize: 136, supported: false },
  { id: 24, name: 'I8', blockSize: 1, typeSize: 1, supported: false },
  { id: 25, name: 'I16', blockSize: 1, typeSize: 2, supported: false },
  { id: 26, name: 'I32', blockSize: 1, typeSize: 4, supported: false },
  { id: 27, name: 'I64', blockSize: 1, typeSize: 8, supported: false },
  { id: 28, name: 'F64', blockSize: 1, typeSize: 8, supported: false },
  { id: 29, name: 'IQ1_M', blockSize: 256, typeSize: 56, supported: false },
  { id: 30, name: 'BF16', blockSize: 1, typeSize: 2, supported: true },
  { id: 34, name: 'TQ1_0', blockSize: 256, typeSize: 54, supported: false },
  { id: 35, name: 'TQ2_0', blockSize: 256, typeSize: 66, supported: false },
  { id: 39, name: 'MXFP4', blockSize: 32, typeSize: 17, supported: false },
];

export const GGML_TYPES: ReadonlyMap<number, GgmlTypeInfo> = new Map(GGML_TYPE_LIST.map((t) => [t.id, t]));
const GGML_TYPE_BY_NAME: ReadonlyMap<string, GgmlTypeInfo> = new Map(GGML_TYPE_LIST.map((t) => [t.name, t]));

/** The types amalgam reads and writes. */
export type GgmlSupportedType = 'F32' | 'F16' | 'BF16' | 'Q8_0';

export const GGML_TYPE_ID: Record<GgmlSupportedType, number> = { F32: 0, F16: 1, BF16: 30, Q8_0: 8 };

/** Name of a ggml type id (`type 4 (unknown)` for ids ggml does not define). */
export function ggmlTypeName(id: number): string {
  return GGML_TYPES.get(id)?.name ?? `type ${id} (unknown)`;
}

const QK8_0 = 32;
const Q8_0_BLOCK_BYTES = 34;

// ---------------------------------------------------------------------------------------------
// Q8_0

function roundHalfAway(x: number): number {
  return x < 0 ? -Math.floor(-x + 0.5) : Math.floor(x + 0.5);
}

/**
 * Quantise float32 values to Q8_0 blocks with ggml's reference quantiser
 * (`quantize_row_q8_0_ref`): per block of 32, d = amax/127 stored as F16, q = round(x/d) with
 * halves rounded away from zero. The arithmetic is done in float32 as in C.
 */
export function quantizeQ8_0(x: Float32Array): Uint8Array {
  if (x.length % QK8_0 !== 0) {
    throw new AmalgamError('E_SHAPE', `Q8_0 needs a multiple of ${QK8_0} values, got ${x.length}`);
  }
  const nb = x.length / QK8_0;
  const out = new Uint8Array(nb * Q8_0_BLOCK_BYTES);
  const dv = new DataView(out.buffer);
  const f = Math.fround;
  for (let b = 0; b < nb; b++) {
    const base = b * QK8_0;
    let amax = 0;
    for (let j = 0; j < QK8_0; j++) {
      const a = Math.abs(x[base + j]!);
      if (a > amax) amax = a;
    }
    const d = f(amax / 127);
    const id = d !== 0 ? f(1 / d) : 0;
    const o = b * Q8_0_BLOCK_BYTES;
    dv.setUint16(o, f32ToF16Scalar(d), true);
    for (let j = 0; j < QK8_0; j++) {
      const q = roundHalfAway(f(x[base + j]! * id));
      dv.setInt8(o + 2 + j, q);
    }
  }
  return out;
}

/** Dequantise `n` values of Q8_0 blocks to float32 (value = F16 d · q, in float32). */
export function dequantizeQ8_0(bytes: Uint8Array, n: number, out: Float32Array = new Float32Array(n)): Float32Array {
  const nb = n / QK8_0;
  if (!Number.isInteger(nb) || bytes.length < nb * Q8_0_BLOCK_BYTES) {
    throw new AmalgamError('E_SHAPE', `${bytes.length} bytes do not hold ${n} Q8_0 values`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let b = 0; b < nb; b++) {
    const o = b * Q8_0_BLOCK_BYTES;
    const d = f16ToF32Scalar(dv.getUint16(o, true));
    const base = b * QK8_0;
    for (let j = 0; j < QK8_0; j++) out[base + j] = dv.getInt8(o + 2 + j) * d;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Header cursor: bounded, incremental positional reads

const HEADER_CHUNK = 1 << 20;
const utf8 = new TextDecoder('utf-8', { fatal: true });

class HeaderCursor {
  pos = 0;
  private buf: Uint8Array = new Uint8Array(0);
  private dv: DataView = new DataView(new ArrayBuffer(0));
  private bufStart = 0;

  constructor(
    private readonly reader: ByteReader,
    readonly file: string,
  ) {}

  get size(): number {
    return this.reader.size;
  }
  get remaining(): number {
    return this.reader.size - this.pos;
  }

  /** Make `n` bytes at the current position available, or fail naming what was being read. */
  async need(n: number, what: string, key?: string): Promise<void> {
    if (n > this.reader.size - this.pos) {
      throw new AmalgamError(
        'E_HEADER',
        `file ends inside ${what}: ${n} bytes needed at offset ${this.pos}, but the file is ${this.reader.size} bytes`,
        { file: this.file, key, hint: 'the file is truncated or not a GGUF file' },
      );
    }
    if (this.has(n)) return;
    const size = this.reader.size;
    const bufEnd = this.bufStart + this.buf.length;
    if (this.pos >= this.bufStart && this.pos < bufEnd) {
      // Keep the unread tail and read on from the end of the buffer, so no byte is read twice.
      const tail = this.buf.subarray(this.pos - this.bufStart);
      const fresh = await this.reader.read(bufEnd, Math.min(Math.max(this.pos + n - bufEnd, HEADER_CHUNK), size - bufEnd));
      const joined = allocBytes(tail.length + fresh.length);
      joined.set(tail);
      joined.set(fresh, tail.length);
      this.buf = joined;
    } else {
      this.buf = await this.reader.read(this.pos, Math.min(Math.max(n, HEADER_CHUNK), size - this.pos));
    }
    this.bufStart = this.pos;
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
  }

  private off(): number {
    return this.pos - this.bufStart;
  }

  async u8(what: string, key?: string): Promise<number> {
    if (!this.has(1)) await this.need(1, what, key);
    const v = this.dv.getUint8(this.off());
    this.pos += 1;
    return v;
  }
  async i8(what: string, key?: string): Promise<number> {
    if (!this.has(1)) await this.need(1, what, key);
    const v = this.dv.getInt8(this.off());
    this.pos += 1;
    return v;
  }
  async u16(what: string, key?: string): Promise<number> {
    if (!this.has(2)) await this.need(2, what, key);
    const v = this.dv.getUint16(this.off(), true);
    this.pos += 2;
    return v;
  }
  async i16(what: string, key?: string): Promise<number> {
    if (!this.has(2)) await this.need(2, what, key);
    const v = this.dv.getInt16(this.off(), true);
    this.pos += 2;
    return v;
  }
  async u32(what: string, key?: string): Promise<number> {
    if (!this.has(4)) await this.need(4, what, key);
    const v = this.dv.getUint32(this.off(), true);
    this.pos += 4;
    return v;
  }
  async i32(what: string, key?: string): Promise<number> {
    if (!this.has(4)) await this.need(4, what, key);
    const v = this.dv.getInt32(this.off(), true);
    this.pos += 4;
    return v;
  }
  async f32(what: string, key?: string): Promise<number> {
    if (!this.has(4)) await this.need(4, what, key);
    const v = this.dv.getFloat32(this.off(), true);
    this.pos += 4;
    return v;
  }
  async u64(what: string, key?: string): Promise<bigint> {
    if (!this.has(8)) await this.need(8, what, key);
    const v = this.dv.getBigUint64(this.off(), true);
    this.pos += 8;
    return v;
  }
  async i64(what: string, key?: string): Promise<bigint> {
    if (!this.has(8)) await this.need(8, what, key);
    const v = this.dv.getBigInt64(this.off(), true);
    this.pos += 8;
    return v;
  }
  async f64(what: string, key?: string): Promise<number> {
    if (!this.has(8)) await this.need(8, what, key);
    const v = this.dv.getFloat64(this.off(), true);
    this.pos += 8;
    return v;
  }
  async bytes(n: number, what: string, key?: string): Promise<Uint8Array> {
    if (!this.has(n)) await this.need(n, what, key);
    const o = this.off();
    this.pos += n;
    return this.buf.subarray(o, o + n);
  }

  private has(n: number): boolean {
    return this.pos >= this.bufStart && this.pos + n <= this.bufStart + this.buf.length;
  }
}

function safeNumber(v: bigint): number | bigint {
  return v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(v) : v;
}

// ---------------------------------------------------------------------------------------------
// Tensor infos

/** A tensor as the GGUF file describes it. */
export interface GgmlTensorInfo {
  name: string;
  /** ggml type id and name. */
  type: number;
  typeName: string;
  /** GGUF dimensions, ne[0] (the contiguous one) first. */
  dims: number[];
  /** Row-major shape (dims reversed). */
  shape: number[];
  numel: number;
  /** Offset relative to the data section. */
  offset: number;
  /** Absolute offset in the file. */
  fileOffset: number;
  /** Stored size in bytes. */
  byteSize: number;
  /** Whether amalgam can read the data. */
  supported: boolean;
}

export interface GgufOpenOptions {
  /**
   * Accept tensors of known ggml types that amalgam cannot read (listed by `ggmlTensors()` for
   * inspection, but not in the TensorSource view). Default: such tensors are an error.
   */
  allowUnsupportedTypes?: boolean;
}

interface ParsedHeader {
  version: number;
  kvs: GgufKv[];
  tensors: GgmlTensorInfo[];
  alignment: number;
  infoEnd: number;
  dataStart: number;
}

async function readString(c: HeaderCursor, what: string, key: string | undefined, maxBytes: number | undefined, code: 'E_METADATA' | 'E_HEADER'): Promise<string> {
  const len = await c.u64(`the length of ${what}`, key);
  if (maxBytes !== undefined && len > BigInt(maxBytes)) {
    throw new AmalgamError(code, `${what} is ${len} bytes long (at most ${maxBytes} allowed)`, { file: c.file, key });
  }
  if (len > BigInt(c.remaining)) {
    throw new AmalgamError('E_HEADER', `${what} claims ${len} bytes but only ${c.remaining} bytes remain in the file`, {
      file: c.file,
      key,
      hint: 'the file is truncated or corrupt',
    });
  }
  const bytes = await c.bytes(Number(len), what, key);
  try {
    return utf8.decode(bytes);
  } catch {
    throw new AmalgamError(code, `${what} is not valid UTF-8`, { file: c.file, key });
  }
}

async function readValue(c: HeaderCursor, type: number, key: string, depth: number): Promise<GgufValue> {
  const what = `the value of ${key}`;
  switch (type) {
    case GGUF_TYPE.UINT8: return c.u8(what, key);
    case GGUF_TYPE.INT8: return c.i8(what, key);
    case GGUF_TYPE.UINT16: return c.u16(what, key);
    case GGUF_TYPE.INT16: return c.i16(what, key);
    case GGUF_TYPE.UINT32: return c.u32(what, key);
    case GGUF_TYPE.INT32: return c.i32(what, key);
    case GGUF_TYPE.FLOAT32: return c.f32(what, key);
    case GGUF_TYPE.UINT64: return safeNumber(await c.u64(what, key));
    case GGUF_TYPE.INT64: return safeNumber(await c.i64(what, key));
    case GGUF_TYPE.FLOAT64: return c.f64(what, key);
    case GGUF_TYPE.BOOL: {
      const b = await c.u8(what, key);
      if (b > 1) throw new AmalgamError('E_METADATA', `bool value is ${b} (must be 0 or 1)`, { file: c.file, key });
      return b === 1;
    }
    case GGUF_TYPE.STRING:
      return readString(c, `the string value of ${key}`, key, undefined, 'E_METADATA');
    case GGUF_TYPE.ARRAY: {
      if (depth >= GGUF_MAX_ARRAY_DEPTH) {
        throw new AmalgamError('E_METADATA', `arrays are nested more than ${GGUF_MAX_ARRAY_DEPTH} deep`, { file: c.file, key });
      }
      const elementType = await c.u32(`the element type of ${key}`, key);
      if (elementType >= GGUF_TYPE_NAMES.length) {
        throw new AmalgamError('E_METADATA', `unknown array element type ${elementType} (GGUF value types are 0-12)`, { file: c.file, key });
      }
      const count = await c.u64(`the element count of ${key}`, key);
      const minBytes = BigInt(MIN_VALUE_BYTES[elementType]!);
      if (count * minBytes > BigInt(c.remaining)) {
        throw new AmalgamError('E_HEADER', `array claims ${count} ${GGUF_TYPE_NAMES[elementType]} elements, more than the remaining ${c.remaining} bytes can hold`, {
          file: c.file,
          key,
          hint: 'the file is truncated or corrupt',
        });
      }
      const n = Number(count);
      const values: GgufValue[] = [];
      for (let i = 0; i < n; i++) values.push(await readValue(c, elementType, `${key}[${i}]`, depth + 1));
      return { elementType: elementType as GgufValueType, values };
    }
    default:
      throw new AmalgamError('E_METADATA', `unknown value type ${type} (GGUF value types are 0-12)`, { file: c.file, key });
  }
}

function align(x: number, a: number): number {
  return x + ((a - (x % a)) % a);
}

async function parseHeader(reader: ByteReader, opts: GgufOpenOptions): Promise<ParsedHeader> {
  const file = reader.path;
  const c = new HeaderCursor(reader, file);
  if (reader.size === 0) {
    throw new AmalgamError('E_FORMAT', 'the GGUF file is empty (0 bytes)', { file, hint: 'the file was truncated or never written: download or export it again' });
  }
  if (reader.size < 4) {
    throw new AmalgamError('E_FORMAT', `file is ${reader.size} bytes, too short to be a GGUF file`, { file, hint: 'the file is truncated: download or export it again' });
  }
  const magic = await c.u32('the magic');
  if (magic !== GGUF_MAGIC) {
    const b = [magic & 0xff, (magic >>> 8) & 0xff, (magic >>> 16) & 0xff, magic >>> 24];
    throw new AmalgamError('E_FORMAT', `bad magic ${b.map((x) => x.toString(16).padStart(2, '0')).join(' ')} (a GGUF file starts with "GGUF", 47 47 55 46)`, {
      file,
      hint: 'not a GGUF file',
    });
  }
  const version = await c.u32('the version');
  if (version === 1) {
    throw new AmalgamError('E_UNSUPPORTED', 'GGUF version 1 is not supported: it used 32-bit counts and lengths, which later versions widened to 64 bits', {
      file,
      key: 'version',
      hint: "re-convert the model with a current llama.cpp (convert_hf_to_gguf.py) to get a version 3 file",
    });
  }
  if (version !== 2 && version !== 3) {
    const swapped = ((version & 0xff) << 24) | ((version >>> 8) & 0xff) << 16 | ((version >>> 16) & 0xff) << 8 | (version >>> 24);
    throw new AmalgamError('E_HEADER', `unknown GGUF version ${version} (amalgam reads versions 2 and 3)`, {
      file,
      key: 'version',
      hint: swapped === 2 || swapped === 3 ? 'this looks like a big-endian GGUF file, which amalgam does not read' : 'the file is corrupt or from a newer GGUF revision',
    });
  }
  const tensorCount = await c.u64('the tensor count');
  const kvCount = await c.u64('the metadata count');
  // Smallest possible entries: a KV is a key length (8), a type (4) and a 1-byte value; a tensor
  // info is a name length (8), n_dims (4), a type (4) and an offset (8).
  if (kvCount * 13n + tensorCount * 24n > BigInt(c.remaining)) {
    throw new AmalgamError('E_HEADER', `header claims ${tensorCount} tensors and ${kvCount} metadata entries, which cannot fit in the remaining ${c.remaining} bytes`, {
      file,
      hint: 'the file is truncated or corrupt',
    });
  }

  const kvs: GgufKv[] = [];
  const seenKeys = new Set<string>();
  for (let i = 0; i < Number(kvCount); i++) {
    const key = await readString(c, `the key of metadata entry #${i}`, `#${i}`, GGUF_MAX_KEY_BYTES, 'E_METADATA');
    if (seenKeys.has(key)) {
      throw new AmalgamError('E_DUPLICATE', 'metadata key appears more than once', { file, key });
    }
    seenKeys.add(key);
    const type = await c.u32(`the value type of ${key}`, key);
    if (type >= GGUF_TYPE_NAMES.length) {
      throw new AmalgamError('E_METADATA', `unknown value type ${type} (GGUF value types are 0-12)`, { file, key });
    }
    const value = await readValue(c, type, key, 0);
    kvs.push({ key, type: type as GgufValueType, value });
  }

  let alignment = GGUF_DEFAULT_ALIGNMENT;
  const alignKv = kvs.find((kv) => kv.key === 'general.alignment');
  if (alignKv) {
    const v = alignKv.value;
    if (!isIntegerType(alignKv.type) || typeof v !== 'number' || v <= 0 || v % 8 !== 0) {
      throw new AmalgamError('E_METADATA', `alignment is ${describeValue(alignKv)}; it must be a positive integer multiple of 8`, { file, key: 'general.alignment' });
    }
    alignment = v;
  }

  const tensors: GgmlTensorInfo[] = [];
  const seenNames = new Set<string>();
  for (let i = 0; i < Number(tensorCount); i++) {
    const name = await readString(c, `the name of tensor #${i}`, `tensor #${i}`, GGUF_MAX_TENSOR_NAME_BYTES, 'E_HEADER');
    if (seenNames.has(name)) {
      throw new AmalgamError('E_DUPLICATE', 'tensor name appears more than once', { file, key: name });
    }
    seenNames.add(name);
    const nDims = await c.u32('n_dims', name);
    if (nDims > GGUF_MAX_DIMS) {
      throw new AmalgamError('E_SHAPE', `tensor has ${nDims} dimensions (GGUF allows at most ${GGUF_MAX_DIMS})`, { file, key: name });
    }
    const dims: number[] = [];
    let numel = 1;
    for (let d = 0; d < nDims; d++) {
      const v = await c.u64(`dimension ${d}`, name);
      if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new AmalgamError('E_SHAPE', `dimension ${d} is ${v}, an absurd size`, { file, key: name });
      }
      dims.push(Number(v));
    }
    for (const d of dims) numel *= d;
    if (!Number.isSafeInteger(numel)) {
      throw new AmalgamError('E_SHAPE', `dimensions [${dims.join(', ')}] overflow: the element count is not representable`, { file, key: name });
    }
    const typeId = await c.u32('the ggml type', name);
    const t = GGML_TYPES.get(typeId);
    if (!t) {
      throw new AmalgamError('E_DTYPE', `unknown ggml type id ${typeId}`, {
        file,
        key: name,
        hint: 'ggml ids 4, 5, 31-33 and 36-38 are removed or reserved; the file is corrupt or from a newer ggml',
      });
    }
    if (!t.supported && !opts.allowUnsupportedTypes) {
      throw new AmalgamError('E_UNSUPPORTED', `tensor type ${t.name} (ggml type ${t.id}) is not supported`, {
        file,
        key: name,
        hint: 'amalgam reads F32, F16, BF16 and Q8_0 GGUF tensors; re-quantise or convert the model to one of these',
      });
    }
    const ne0 = dims.length ? dims[0]! : 1;
    if (t.blockSize > 1 && ne0 % t.blockSize !== 0) {
      throw new AmalgamError('E_SHAPE', `${t.name} needs ne0 to be a multiple of ${t.blockSize}, but the dimensions are [${dims.join(', ')}]`, { file, key: name });
    }
    const byteSize = (numel / t.blockSize) * t.typeSize;
    if (!Number.isSafeInteger(byteSize)) {
      throw new AmalgamError('E_SHAPE', `dimensions [${dims.join(', ')}] overflow: the byte size is not representable`, { file, key: name });
    }
    const off = await c.u64('the data offset', name);
    if (off > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new AmalgamError('E_OFFSETS', `data offset ${off} is beyond any file`, { file, key: name });
    }
    const offset = Number(off);
    if (offset % alignment !== 0) {
      throw new AmalgamError('E_OFFSETS', `data offset ${offset} is not a multiple of the alignment ${alignment}`, { file, key: name });
    }
    tensors.push({
      name,
      type: t.id,
      typeName: t.name,
      dims,
      shape: dims.slice().reverse(),
      numel,
      offset,
      fileOffset: 0,
      byteSize,
      supported: t.supported,
    });
  }

  const infoEnd = c.pos;
  const dataStart = align(infoEnd, alignment);
  if (tensors.length > 0 && dataStart > reader.size) {
    throw new AmalgamError('E_HEADER', `file ends at byte ${reader.size}, before the tensor data section starts (byte ${dataStart})`, {
      file,
      hint: 'the file is truncated',
    });
  }
  const dataSize = reader.size - dataStart;
  for (const t of tensors) {
    t.fileOffset = dataStart + t.offset;
    if (t.offset + t.byteSize > dataSize) {
      throw new AmalgamError('E_OFFSETS', `data [${t.offset}, ${t.offset + t.byteSize}) runs past the end of the data section (${dataSize} bytes)`, {
        file,
        key: t.name,
        hint: 'the file is truncated or corrupt',
      });
    }
  }
  const sorted = tensors.slice().sort((a, b) => a.offset - b.offset || a.byteSize - b.byteSize);
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1]!;
    const cur = sorted[i]!;
    if (cur.offset < prev.offset + prev.byteSize) {
      throw new AmalgamError('E_OFFSETS', `data [${cur.offset}, ${cur.offset + cur.byteSize}) overlaps tensor '${prev.name}' [${prev.offset}, ${prev.offset + prev.byteSize})`, {
        file,
        key: cur.name,
      });
    }
  }
  return { version, kvs, tensors, alignment, infoEnd, dataStart };
}

function describeValue(kv: GgufKv): string {
  return `${summariseValue(kv.value, kv.type)} (${GGUF_TYPE_NAMES[kv.type]})`;
}

/**
 * A value as a string: scalars printed (FLOAT32 values in the shortest form that reads back as
 * the same float32, e.g. `1e-05`), arrays summarised like `[512 × string]`.
 */
export function summariseValue(v: GgufValue, type?: number): string {
  if (typeof v === 'object') {
    const et = GGUF_TYPE_NAMES[v.elementType]!.toLowerCase();
    return `[${v.values.length} × ${et === 'float32' ? 'f32' : et === 'float64' ? 'f64' : et}]`;
  }
  if (type === GGUF_TYPE.FLOAT32 && typeof v === 'number') return String(shortestF32(v));
  return String(v);
}

/** The shortest decimal number that rounds to the same float32 as `v` (1e-5 for fround(1e-5)). */
export function shortestF32(v: number): number {
  if (!Number.isFinite(v) || v === 0) return v;
  const target = Math.fround(v);
  for (let p = 1; p <= 9; p++) {
    const x = Number(target.toPrecision(p));
    if (Math.fround(x) === target) return x;
  }
  return target;
}

// ---------------------------------------------------------------------------------------------
// Reader

export class GgufFile implements TensorSource {
  readonly version: number;
  /** Metadata in file order. */
  readonly kvs: readonly GgufKv[];
  readonly alignment: number;
  /** End of the tensor infos (the header proper). */
  readonly infoEnd: number;
  /** Start of the tensor data section (infoEnd aligned up). */
  readonly dataStart: number;
  private readonly kvByKey: Map<string, GgufKv>;
  private readonly native: GgmlTensorInfo[];
  private readonly byName: Map<string, GgmlTensorInfo>;
  private metadataCache?: Record<string, string>;

  private constructor(
    private readonly reader: ByteReader,
    h: ParsedHeader,
  ) {
    this.version = h.version;
    this.kvs = h.kvs;
    this.alignment = h.alignment;
    this.infoEnd = h.infoEnd;
    this.dataStart = h.dataStart;
    this.kvByKey = new Map(h.kvs.map((kv) => [kv.key, kv]));
    this.native = h.tensors;
    this.byName = new Map(h.tensors.map((t) => [t.name, t]));
  }

  static async open(path: string, opts: GgufOpenOptions = {}): Promise<GgufFile> {
    const reader = await FileByteReader.open(path);
    try {
      return await GgufFile.fromReader(reader, opts);
    } catch (e) {
      await reader.close();
      throw e;
    }
  }

  static async fromReader(reader: ByteReader, opts: GgufOpenOptions = {}): Promise<GgufFile> {
    return new GgufFile(reader, await parseHeader(reader, opts));
  }

  static async fromBytes(bytes: Uint8Array, name = '<memory>', opts: GgufOpenOptions = {}): Promise<GgufFile> {
    return GgufFile.fromReader(new MemoryByteReader(bytes, name), opts);
  }

  get path(): string {
    return this.reader.path;
  }
  get size(): number {
    return this.reader.size;
  }

  // --- metadata -------------------------------------------------------------------------------

  /** Metadata as strings: scalars printed, arrays summarised like `[512 × string]`. */
  get metadata(): Record<string, string> {
    if (!this.metadataCache) {
      const m: Record<string, string> = Object.create(null);
      for (const kv of this.kvs) m[kv.key] = summariseValue(kv.value, kv.type);
      this.metadataCache = m;
    }
    return this.metadataCache;
  }

  kv(key: string): GgufKv | undefined {
    return this.kvByKey.get(key);
  }
  hasKey(key: string): boolean {
    return this.kvByKey.has(key);
  }

  private typeError(kv: GgufKv, expected: string): AmalgamError {
    return new AmalgamError('E_METADATA', `expected ${expected}, found ${describeValue(kv)}`, { file: this.path, key: kv.key });
  }
  private missing(key: string): AmalgamError {
    return new AmalgamError('E_MISSING', 'required metadata key is missing', { file: this.path, key });
  }

  getString(key: string): string | undefined {
    const kv = this.kvByKey.get(key);
    if (!kv) return undefined;
    if (kv.type !== GGUF_TYPE.STRING) throw this.typeError(kv, 'a string');
    return kv.value as string;
  }
  requireString(key: string): string {
    const v = this.getString(key);
    if (v === undefined) throw this.missing(key);
    return v;
  }

  /** An integer of any integer type, as a safe number. */
  getInteger(key: string): number | undefined {
    const kv = this.kvByKey.get(key);
    if (!kv) return undefined;
    if (!isIntegerType(kv.type)) throw this.typeError(kv, 'an integer');
    if (typeof kv.value !== 'number') throw this.typeError(kv, 'an integer of at most 2^53');
    return kv.value;
  }
  requireInteger(key: string): number {
    const v = this.getInteger(key);
    if (v === undefined) throw this.missing(key);
    return v;
  }

  /** A number of any integer or float type. */
  getNumber(key: string): number | undefined {
    const kv = this.kvByKey.get(key);
    if (!kv) return undefined;
    if (kv.type === GGUF_TYPE.FLOAT32 || kv.type === GGUF_TYPE.FLOAT64) return kv.value as number;
    return this.getInteger(key);
  }
  requireNumber(key: string): number {
    const v = this.getNumber(key);
    if (v === undefined) throw this.missing(key);
    return v;
  }

  getArray(key: string): GgufArray | undefined {
    const kv = this.kvByKey.get(key);
    if (!kv) return undefined;
    if (kv.type !== GGUF_TYPE.ARRAY) throw this.typeError(kv, 'an array');
    return kv.value as GgufArray;
  }
  getStringArray(key: string): string[] | undefined {
    const a = this.getArray(key);
    if (!a) return undefined;
    if (a.elementType !== GGUF_TYPE.STRING) throw this.typeError(this.kvByKey.get(key)!, 'an array of strings');
    return a.values as string[];
  }
  /** An array of numbers (any integer or float element type; 64-bit values must be safe). */
  getNumberArray(key: string): number[] | undefined {
    const a = this.getArray(key);
    if (!a) return undefined;
    const kv = this.kvByKey.get(key)!;
    const et = a.elementType;
    if (!(isIntegerType(et) || et === GGUF_TYPE.FLOAT32 || et === GGUF_TYPE.FLOAT64)) throw this.typeError(kv, 'an array of numbers');
    for (const v of a.values) if (typeof v !== 'number') throw this.typeError(kv, 'an array of numbers of at most 2^53');
    return a.values as number[];
  }

  // --- tensors --------------------------------------------------------------------------------

  /** Tensors as the file describes them, in file order. */
  ggmlTensors(): GgmlTensorInfo[] {
    return this.native.map((t) => ({ ...t, dims: t.dims.slice(), shape: t.shape.slice() }));
  }
  ggmlTensor(name: string): GgmlTensorInfo {
    const t = this.byName.get(name);
    if (!t) throw new AmalgamError('E_MISSING', 'no such tensor', { file: this.path, key: name });
    return { ...t, dims: t.dims.slice(), shape: t.shape.slice() };
  }

  private entry(name: string): GgmlTensorInfo {
    const t = this.byName.get(name);
    if (!t) throw new AmalgamError('E_MISSING', 'no such tensor', { file: this.path, key: name });
    if (!t.supported) {
      throw new AmalgamError('E_UNSUPPORTED', `tensor type ${t.typeName} (ggml type ${t.type}) is not supported`, {
        file: this.path,
        key: name,
        hint: 'amalgam reads F32, F16, BF16 and Q8_0 GGUF tensors',
      });
    }
    return t;
  }

  private static viewDType(t: GgmlTensorInfo): DType {
    return t.typeName === 'F16' ? 'F16' : t.typeName === 'BF16' ? 'BF16' : 'F32';
  }

  /** Readable tensors: GGUF names, row-major shapes; Q8_0 shows as F32 (dequantised on read). */
  tensors(): TensorInfo[] {
    return this.native.filter((t) => t.supported).map((t) => ({ name: t.name, dtype: GgufFile.viewDType(t), shape: t.shape.slice() }));
  }
  has(name: string): boolean {
    const t = this.byName.get(name);
    return !!t && t.supported;
  }
  info(name: string): TensorInfo {
    const t = this.entry(name);
    return { name, dtype: GgufFile.viewDType(t), shape: t.shape.slice() };
  }

  /** The stored bytes of a tensor, whatever its type. */
  async readStored(name: string): Promise<Uint8Array> {
    const t = this.byName.get(name);
    if (!t) throw new AmalgamError('E_MISSING', 'no such tensor', { file: this.path, key: name });
    return this.reader.read(t.fileOffset, t.byteSize);
  }

  /** F32/F16/BF16: the bytes as stored. Q8_0: the dequantised float32 values as bytes. */
  async readRaw(name: string): Promise<Uint8Array> {
    const t = this.entry(name);
    const stored = await this.reader.read(t.fileOffset, t.byteSize);
    if (t.typeName !== 'Q8_0') return stored;
    const f = dequantizeQ8_0(stored, t.numel);
    return new Uint8Array(f.buffer, f.byteOffset, f.byteLength);
  }

  async readF32(name: string): Promise<Float32Array> {
    const t = this.entry(name);
    const stored = await this.reader.read(t.fileOffset, t.byteSize);
    if (t.typeName === 'Q8_0') return dequantizeQ8_0(stored, t.numel);
    return decodeToF32(GgufFile.viewDType(t), stored, { what: name });
  }

  async close(): Promise<void> {
    await this.reader.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Serializer

export interface GgufTensorInput {
  name: string;
  type: GgmlSupportedType;
  /** Row-major shape (written to the file reversed, ne[0] first). */
  shape: number[];
  /** Values to encode as `type`, or `raw` bytes already encoded (written as given). */
  data?: Float32Array;
  raw?: Uint8Array;
}

export interface GgufSerializeInput {
  kv: readonly GgufKv[];
  tensors: readonly GgufTensorInput[];
  /** Version field (default 3; 2 has the same layout). */
  version?: 2 | 3;
}

class ByteSink {
  private chunks: Uint8Array[] = [];
  length = 0;
  private scratch = new DataView(new ArrayBuffer(8));
  push(b: Uint8Array): void {
    this.chunks.push(b);
    this.length += b.length;
  }
  private num(n: number, set: (dv: DataView) => void): void {
    set(this.scratch);
    this.push(new Uint8Array(this.scratch.buffer.slice(0, n)));
  }
  u8(v: number): void { this.num(1, (d) => d.setUint8(0, v)); }
  i8(v: number): void { this.num(1, (d) => d.setInt8(0, v)); }
  u16(v: number): void { this.num(2, (d) => d.setUint16(0, v, true)); }
  i16(v: number): void { this.num(2, (d) => d.setInt16(0, v, true)); }
  u32(v: number): void { this.num(4, (d) => d.setUint32(0, v, true)); }
  i32(v: number): void { this.num(4, (d) => d.setInt32(0, v, true)); }
  f32(v: number): void { this.num(4, (d) => d.setFloat32(0, v, true)); }
  f64(v: number): void { this.num(8, (d) => d.setFloat64(0, v, true)); }
  u64(v: number | bigint): void { this.num(8, (d) => d.setBigUint64(0, BigInt(v), true)); }
  i64(v: number | bigint): void { this.num(8, (d) => d.setBigInt64(0, BigInt(v), true)); }
  str(s: string): void {
    const b = new TextEncoder().encode(s);
    this.u64(b.length);
    this.push(b);
  }
  zeros(n: number): void {
    if (n > 0) this.push(new Uint8Array(n));
  }
  concat(): Uint8Array {
    const out = new Uint8Array(this.length);
    let o = 0;
    for (const c of this.chunks) {
      out.set(c, o);
      o += c.length;
    }
    return out;
  }
}

function checkInt(v: GgufValue, lo: number, hi: number, key: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < lo || v > hi) {
    throw new AmalgamError('E_USAGE', `value ${String(v)} does not fit the declared integer type`, { key });
  }
  return v;
}

function checkBig(v: GgufValue, lo: bigint, hi: bigint, key: string): bigint {
  if ((typeof v !== 'number' || !Number.isInteger(v)) && typeof v !== 'bigint') {
    throw new AmalgamError('E_USAGE', `value ${String(v)} is not an integer`, { key });
  }
  const b = BigInt(v);
  if (b < lo || b > hi) throw new AmalgamError('E_USAGE', `value ${b} does not fit the declared integer type`, { key });
  return b;
}

function writeValue(s: ByteSink, type: number, v: GgufValue, key: string): void {
  switch (type) {
    case GGUF_TYPE.UINT8: return s.u8(checkInt(v, 0, 0xff, key));
    case GGUF_TYPE.INT8: return s.i8(checkInt(v, -0x80, 0x7f, key));
    case GGUF_TYPE.UINT16: return s.u16(checkInt(v, 0, 0xffff, key));
    case GGUF_TYPE.INT16: return s.i16(checkInt(v, -0x8000, 0x7fff, key));
    case GGUF_TYPE.UINT32: return s.u32(checkInt(v, 0, 0xffffffff, key));
    case GGUF_TYPE.INT32: return s.i32(checkInt(v, -0x80000000, 0x7fffffff, key));
    case GGUF_TYPE.UINT64: return s.u64(checkBig(v, 0n, 0xffffffffffffffffn, key));
    case GGUF_TYPE.INT64: return s.i64(checkBig(v, -(1n << 63n), (1n << 63n) - 1n, key));
    case GGUF_TYPE.FLOAT32:
    case GGUF_TYPE.FLOAT64:
      if (typeof v !== 'number') throw new AmalgamError('E_USAGE', `value ${String(v)} is not a number`, { key });
      return type === GGUF_TYPE.FLOAT32 ? s.f32(v) : s.f64(v);
    case GGUF_TYPE.BOOL:
      if (typeof v !== 'boolean') throw new AmalgamError('E_USAGE', `value ${String(v)} is not a boolean`, { key });
      return s.u8(v ? 1 : 0);
    case GGUF_TYPE.STRING:
      if (typeof v !== 'string') throw new AmalgamError('E_USAGE', `value ${String(v)} is not a string`, { key });
      return s.str(v);
    case GGUF_TYPE.ARRAY: {
      if (typeof v !== 'object') throw new AmalgamError('E_USAGE', `value ${String(v)} is not an array`, { key });
      s.u32(v.elementType);
      s.u64(v.values.length);
      v.values.forEach((x, i) => writeValue(s, v.elementType, x, `${key}[${i}]`));
      return;
    }
    default:
      throw new AmalgamError('E_USAGE', `unknown value type ${type}`, { key });
  }
}

function encodeTensor(t: GgufTensorInput): Uint8Array {
  const n = t.shape.reduce((a, b) => a * b, 1);
  const info = GGML_TYPE_BY_NAME.get(t.type);
  if (!info || !info.supported) throw new AmalgamError('E_UNSUPPORTED', `cannot write tensor type ${t.type}`, { key: t.name });
  if (info.blockSize > 1 && (t.shape.length ? t.shape[t.shape.length - 1]! : 1) % info.blockSize !== 0) {
    throw new AmalgamError('E_SHAPE', `${t.type} needs the last (contiguous) dimension to be a multiple of ${info.blockSize}, got shape [${t.shape.join(', ')}]`, { key: t.name });
  }
  const bytes = (n / info.blockSize) * info.typeSize;
  if (t.raw) {
    if (t.raw.length !== bytes) throw new AmalgamError('E_SHAPE', `raw data is ${t.raw.length} bytes but shape [${t.shape.join(', ')}] of ${t.type} needs ${bytes}`, { key: t.name });
    return t.raw;
  }
  const d = t.data;
  if (!d || d.length !== n) {
    throw new AmalgamError('E_SHAPE', `data has ${d?.length ?? 0} values but shape [${t.shape.join(', ')}] has ${n}`, { key: t.name });
  }
  switch (t.type) {
    case 'F32':
      return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
    case 'F16': {
      const h = f32ToF16(d);
      return new Uint8Array(h.buffer);
    }
    case 'BF16': {
      const h = f32ToBf16(d);
      return new Uint8Array(h.buffer);
    }
    case 'Q8_0':
      return quantizeQ8_0(d);
  }
}

/**
 * Serialise metadata and tensors to a GGUF file in memory (small data: tests and tools). Tensor
 * data follows in the order given, each tensor aligned to `general.alignment` (default 32).
 */
export function serializeGguf(input: GgufSerializeInput): Uint8Array {
  const s = new ByteSink();
  s.u32(GGUF_MAGIC);
  s.u32(input.version ?? 3);
  s.u64(input.tensors.length);
  s.u64(input.kv.length);
  let alignment = GGUF_DEFAULT_ALIGNMENT;
  const seen = new Set<string>();
  for (const kv of input.kv) {
    if (seen.has(kv.key)) throw new AmalgamError('E_DUPLICATE', 'metadata key given more than once', { key: kv.key });
    seen.add(kv.key);
    s.str(kv.key);
    s.u32(kv.type);
    writeValue(s, kv.type, kv.value, kv.key);
    if (kv.key === 'general.alignment') {
      if (typeof kv.value !== 'number' || kv.value <= 0 || kv.value % 8 !== 0) {
        throw new AmalgamError('E_USAGE', 'alignment must be a positive multiple of 8', { key: kv.key });
      }
      alignment = kv.value;
    }
  }
  const datas = input.tensors.map(encodeTensor);
  let offset = 0;
  const names = new Set<string>();
  input.tensors.forEach((t, i) => {
    if (names.has(t.name)) throw new AmalgamError('E_DUPLICATE', 'tensor given more than once', { key: t.name });
    names.add(t.name);
    s.str(t.name);
    s.u32(t.shape.length);
    for (let d = t.shape.length - 1; d >= 0; d--) s.u64(t.shape[d]!);
    s.u32(GGML_TYPE_ID[t.type]);
    s.u64(offset);
    offset = align(offset + datas[i]!.length, alignment);
  });
  s.zeros(align(s.length, alignment) - s.length);
  datas.forEach((d, i) => {
    s.push(d);
    if (i < datas.length - 1) s.zeros(align(d.length, alignment) - d.length);
  });
  return s.concat();
}
