/**
 * safetensors: a strict, lazy reader (header parsed and validated up front, one tensor read at a
 * time with positional reads) and a writer (single file or sharded with an index, 8-byte header
 * padding, reference tensor order, temporary names renamed only when complete).
 *
 * Validation follows formats.md §2.2, the rules of the reference implementation.
 */
import { constants } from 'node:fs';
import { open, rename, rm, stat, writeFile, readFile, type FileHandle } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, normalize, resolve, sep } from 'node:path';
import { randomBytes } from 'node:crypto';
import { AmalgamError } from '../errors.js';
import { bf16ToF32, byteSize, decodeToF32, dtypeAlignment, dtypeBits, encodeFromF32, f16ToF32, isDType, numel, type DType } from '../tensor/dtype.js';
import { DIRECT_ALIGN, directFlag, directIoEnabled, isPageAligned, splitForDirect } from './aligned.js';
import { FileByteReader, ioError, MemoryByteReader, type ByteReader, type TensorInfo, type TensorSource } from './source.js';
import { keysInOrder, parseStrictJson, StrictJsonError, type JsonValue } from './strict-json.js';

/** The reference reader's cap on the header length. */
export const MAX_HEADER_BYTES = 100_000_000;
/** Rank above which a shape is considered absurd. */
const MAX_RANK = 64;

export interface SafetensorsEntry extends TensorInfo {
  /** Byte offsets relative to the start of the data buffer, end exclusive. */
  begin: number;
  end: number;
}

export interface SafetensorsHeader {
  /** Header length N (without the 8-byte prefix). */
  headerLength: number;
  /** Start of the data buffer in the file (8 + N). */
  dataStart: number;
  metadata: Record<string, string>;
  /** Entries in header order. */
  entries: SafetensorsEntry[];
}

// ignoreBOM keeps a leading U+FEFF in the text (the default strips it), so such a header is rejected.
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Validate and parse the 8-byte length prefix. Returns N.
 */
export function parseHeaderLength(prefix: Uint8Array, fileSize: number, file: string): number {
  if (fileSize < 8) {
    throw new AmalgamError('E_HEADER', `file is ${fileSize} bytes, too short for a safetensors header (needs at least 8)`, { file });
  }
  const dv = new DataView(prefix.buffer, prefix.byteOffset, 8);
  const n = dv.getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_BYTES)) {
    throw new AmalgamError('E_HEADER', `header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte limit`, {
      file,
      hint: 'the file is corrupt or not a safetensors file',
    });
  }
  const len = Number(n);
  if (8 + len > fileSize) {
    throw new AmalgamError('E_HEADER', `header length ${len} runs past the end of the file (${fileSize} bytes)`, {
      file,
      hint: 'the file is truncated or not a safetensors file',
    });
  }
  return len;
}

/**
 * Validate a header (the N bytes after the prefix) against the file size and return its entries.
 * Every rule of formats.md §2.2 is checked; the error names the file and the offending key.
 */
export function parseHeaderBytes(headerBytes: Uint8Array, fileSize: number, file: string): SafetensorsHeader {
  const headerLength = headerBytes.length;
  const dataStart = 8 + headerLength;
  let text: string;
  try {
    text = utf8.decode(headerBytes);
  } catch {
    throw new AmalgamError('E_HEADER', 'header is not valid UTF-8', { file });
  }
  if (text.charCodeAt(0) !== 0x7b /* { */) {
    throw new AmalgamError('E_HEADER', 'header does not start with "{"', { file, hint: 'not a safetensors file' });
  }
  let json: JsonValue;
  try {
    json = parseStrictJson(text, { maxDepth: 8, integersOnly: true });
  } catch (e) {
    if (e instanceof StrictJsonError) {
      if (e.key !== undefined) {
        // Name the tensor (or __metadata__ key) whose entry repeats a key, not just the repeated key.
        const [top, ...inner] = e.path;
        if (top === undefined) throw new AmalgamError('E_DUPLICATE', `header lists "${e.key}" more than once`, { file, key: e.key });
        if (top === '__metadata__') throw new AmalgamError('E_DUPLICATE', `__metadata__ lists "${e.key}" more than once`, { file, key: `__metadata__.${e.key}` });
        throw new AmalgamError('E_DUPLICATE', `tensor entry lists "${[...inner, e.key].join('.')}" more than once`, { file, key: top });
      }
      const [top, field] = e.path;
      if (top !== undefined && /is not an integer/.test(e.message)) {
        // Shapes and offsets are unsigned integers; 1.0, 1e3 or -0 are not (the reference rejects them).
        const code = field === 'data_offsets' ? 'E_OFFSETS' : 'E_SHAPE';
        throw new AmalgamError(code, field === 'data_offsets' ? `data_offsets holds a number that is not a non-negative integer, expected [begin, end] (${e.message})` : `${field ?? 'value'} holds a number that is not a non-negative integer (${e.message})`, { file, key: top });
      }
      throw new AmalgamError('E_HEADER', `header is not valid JSON: ${e.message}`, { file });
    }
    throw e;
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new AmalgamError('E_HEADER', 'header JSON is not an object', { file });
  }

  const metadata: Record<string, string> = Object.create(null);
  const entries: SafetensorsEntry[] = [];
  const dataSize = fileSize - dataStart;

  for (const key of keysInOrder(json)) {
    const v = json[key]!;
    if (key === '__metadata__') {
      if (v === null || typeof v !== 'object' || Array.isArray(v)) {
        throw new AmalgamError('E_METADATA', '__metadata__ is not an object of strings', { file, key });
      }
      for (const mk of keysInOrder(v)) {
        const mv = (v as Record<string, JsonValue>)[mk];
        if (typeof mv !== 'string') {
          throw new AmalgamError('E_METADATA', `__metadata__ value for "${mk}" is ${describe(mv)}, not a string`, { file, key: `__metadata__.${mk}` });
        }
        metadata[mk] = mv;
      }
      continue;
    }
    entries.push(parseEntry(key, v, file, dataSize));
  }

  // Full coverage: sorted by offsets, the entries tile [0, lastEnd) without holes or overlaps.
  const sorted = entries.slice().sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = 0;
  for (const e of sorted) {
    if (e.begin < cursor) {
      throw new AmalgamError('E_OFFSETS', `data_offsets [${e.begin}, ${e.end}] overlap the previous tensor (which ends at ${cursor})`, { file, key: e.name });
    }
    if (e.begin > cursor) {
      throw new AmalgamError('E_OFFSETS', `data_offsets [${e.begin}, ${e.end}] leave a hole: bytes ${cursor}..${e.begin} belong to no tensor`, { file, key: e.name });
    }
    cursor = e.end;
  }
  if (dataStart + cursor !== fileSize) {
    throw new AmalgamError(
      'E_OFFSETS',
      `tensors end at byte ${dataStart + cursor} of the file but the file is ${fileSize} bytes (8 + header ${headerLength} + data ${cursor} must equal the file size)`,
      { file, hint: fileSize < dataStart + cursor ? 'the file is truncated' : 'the file has trailing bytes that belong to no tensor' },
    );
  }
  return { headerLength, dataStart, metadata, entries };
}

function parseEntry(name: string, v: JsonValue, file: string, dataSize: number): SafetensorsEntry {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw new AmalgamError('E_HEADER', `tensor entry is ${describe(v)}, expected {dtype, shape, data_offsets}`, { file, key: name });
  }
  const o = v as Record<string, JsonValue>;
  const dtype = o['dtype'];
  if (!isDType(dtype)) {
    throw new AmalgamError('E_DTYPE', `unknown dtype ${JSON.stringify(dtype)}`, {
      file,
      key: name,
      hint: 'safetensors dtypes are BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, C64, F8_*, F6_*, F4',
    });
  }
  const shape = o['shape'];
  if (!Array.isArray(shape)) {
    throw new AmalgamError('E_SHAPE', `shape is ${describe(shape)}, expected an array of non-negative integers`, { file, key: name });
  }
  if (shape.length > MAX_RANK) {
    throw new AmalgamError('E_SHAPE', `shape has ${shape.length} dimensions (more than ${MAX_RANK})`, { file, key: name });
  }
  let count = 1;
  let hasZero = false;
  for (const d of shape) {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) {
      throw new AmalgamError('E_SHAPE', `shape ${JSON.stringify(shape)} has a dimension that is not a non-negative integer`, { file, key: name });
    }
    if (d === 0) hasZero = true;
    else {
      count *= d;
      if (!Number.isSafeInteger(count)) {
        throw new AmalgamError('E_SHAPE', `shape ${JSON.stringify(shape)} has an absurd number of elements`, { file, key: name });
      }
    }
  }
  if (hasZero) count = 0;
  const offs = o['data_offsets'];
  if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((x) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0)) {
    throw new AmalgamError('E_OFFSETS', `data_offsets is ${JSON.stringify(offs)}, expected [begin, end] with non-negative integers`, { file, key: name });
  }
  const begin = offs[0] as number;
  const end = offs[1] as number;
  if (begin > end) {
    throw new AmalgamError('E_OFFSETS', `data_offsets [${begin}, ${end}] end before they begin`, { file, key: name });
  }
  const bytes = byteSize(dtype, count);
  if (bytes === undefined) {
    const what = Number.isSafeInteger(count * dtypeBits(dtype)) ? 'is not a whole number of bytes' : 'has an absurd byte size';
    throw new AmalgamError('E_SHAPE', `shape ${JSON.stringify(shape)} of ${dtype} ${what}`, { file, key: name });
  }
  if (end - begin !== bytes) {
    throw new AmalgamError('E_SHAPE', `shape ${JSON.stringify(shape)} of ${dtype} needs ${bytes} bytes but data_offsets [${begin}, ${end}] span ${end - begin}`, { file, key: name });
  }
  if (end > dataSize) {
    throw new AmalgamError('E_OFFSETS', `data_offsets [${begin}, ${end}] run past the end of the data (${Math.max(0, dataSize)} bytes)`, { file, key: name });
  }
  return { name, dtype, shape: shape as number[], begin, end };
}

function describe(v: JsonValue | undefined): string {
  if (v === undefined) return 'missing';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object') return 'an object';
  return `a ${typeof v}`;
}

// ---------------------------------------------------------------------------------------------
// Reader

/** One safetensors file, validated on open; tensors are read on demand. */
export class SafetensorsFile implements TensorSource {
  private readonly byName: Map<string, SafetensorsEntry>;

  private constructor(
    private readonly reader: ByteReader,
    readonly header: SafetensorsHeader,
  ) {
    this.byName = new Map(header.entries.map((e) => [e.name, e]));
  }

  get path(): string {
    return this.reader.path;
  }
  get metadata(): Record<string, string> {
    return this.header.metadata;
  }
  get size(): number {
    return this.reader.size;
  }

  static async open(path: string): Promise<SafetensorsFile> {
    const reader = await FileByteReader.open(path);
    try {
      return await SafetensorsFile.fromReader(reader);
    } catch (e) {
      await reader.close();
      throw e;
    }
  }

  /** Parse safetensors bytes held in memory (same validation as files). */
  static async fromBytes(bytes: Uint8Array, name = '<memory>'): Promise<SafetensorsFile> {
    return SafetensorsFile.fromReader(new MemoryByteReader(bytes, name));
  }

  static async fromReader(reader: ByteReader): Promise<SafetensorsFile> {
    const size = reader.size;
    if (size < 8) parseHeaderLength(new Uint8Array(8), size, reader.path);
    const prefix = await reader.read(0, 8);
    const n = parseHeaderLength(prefix, size, reader.path);
    const headerBytes = await reader.read(8, n);
    const header = parseHeaderBytes(headerBytes, size, reader.path);
    return new SafetensorsFile(reader, header);
  }

  tensors(): TensorInfo[] {
    return this.header.entries.map(({ name, dtype, shape }) => ({ name, dtype, shape: shape.slice() }));
  }
  has(name: string): boolean {
    return this.byName.has(name);
  }
  entry(name: string): SafetensorsEntry {
    const e = this.byName.get(name);
    if (!e) throw new AmalgamError('E_MISSING', 'no such tensor', { file: this.path, key: name });
    return e;
  }
  info(name: string): TensorInfo {
    const { dtype, shape } = this.entry(name);
    return { name, dtype, shape: shape.slice() };
  }
  async readRaw(name: string): Promise<Uint8Array> {
    const e = this.entry(name);
    return this.reader.read(this.header.dataStart + e.begin, e.end - e.begin);
  }
  /** Where a tensor's stored bytes are: a file and a byte range (undefined when not read from a file). */
  locate(name: string): TensorLocation | undefined {
    const e = this.entry(name);
    if (!(this.reader instanceof FileByteReader)) return undefined;
    return { path: this.reader.path, offset: this.header.dataStart + e.begin, length: e.end - e.begin };
  }
  /** Reads a tensor's stored bytes into `dst`, which must be exactly their size. */
  async readRawInto(name: string, dst: Uint8Array): Promise<void> {
    const e = this.entry(name);
    if (dst.length !== e.end - e.begin) {
      throw new AmalgamError('E_USAGE', `readRawInto needs ${e.end - e.begin} bytes, got a ${dst.length}-byte array`, { file: this.path, key: name });
    }
    const position = this.header.dataStart + e.begin;
    if (this.reader.readInto) await this.reader.readInto(position, dst);
    else dst.set(await this.reader.read(position, dst.length));
  }
  async readF32(name: string): Promise<Float32Array> {
    const e = this.entry(name);
    const count = (e.end - e.begin) / 2;
    if ((e.dtype === 'BF16' || e.dtype === 'F16') && count > 0 && this.reader.readInto) {
      return readWidened(this.reader, this.header.dataStart + e.begin, count, e.dtype);
    }
    const raw = await this.readRaw(name);
    return decodeToF32(e.dtype, raw, { what: name });
  }
  async close(): Promise<void> {
    await this.reader.close();
  }
}

/** Raw bytes per positional read when widening 16-bit floats to F32. */
const WIDEN_CHUNK_BYTES = 2 << 20;

/**
 * `count` BF16 or F16 values at `position`, widened to a fresh F32 array without an intermediate
 * buffer: each chunk of raw bytes is read into the upper half of the output and converted forward
 * in place (the conversion never overwrites bytes it has not read yet), while the read of the next
 * chunk is in flight.
 */
async function readWidened(reader: ByteReader, position: number, count: number, dtype: 'BF16' | 'F16'): Promise<Float32Array> {
  const out = allocF32(count);
  const buf = out.buffer;
  const srcStart = count * 2;
  const step = WIDEN_CHUNK_BYTES >>> 1;
  const convert = dtype === 'BF16' ? bf16ToF32 : f16ToF32;
  const readChunk = (a: number) => reader.readInto!(position + 2 * a, new Uint8Array(buf, srcStart + 2 * a, 2 * (Math.min(count, a + step) - a)));
  let pending = readChunk(0);
  for (let a = 0; a < count; a += step) {
    const b = Math.min(count, a + step);
    await pending;
    if (b < count) pending = readChunk(b);
    convert(new Uint16Array(buf, srcStart + 2 * a, b - a), out.subarray(a, b));
  }
  return out;
}

/** An uninitialised F32 array on its own ArrayBuffer (every element is written by the caller). */
function allocF32(count: number): Float32Array {
  const bytes = count * 4;
  if (bytes <= 2 ** 31) {
    const b = Buffer.allocUnsafeSlow(bytes);
    return new Float32Array(b.buffer, b.byteOffset, count);
  }
  return new Float32Array(count);
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints

export const INDEX_FILE = 'model.safetensors.index.json';

export interface ShardIndex {
  metadata: Record<string, unknown>;
  weightMap: Record<string, string>;
}

/** Read and validate `model.safetensors.index.json`: shard paths stay inside the folder. */
export async function readShardIndex(indexPath: string): Promise<ShardIndex> {
  let text: string;
  try {
    text = await readFile(indexPath, 'utf8');
  } catch (e) {
    throw ioError(indexPath, e);
  }
  let json: JsonValue;
  try {
    json = parseStrictJson(text, { maxDepth: 16 });
  } catch (e) {
    if (e instanceof StrictJsonError && e.key !== undefined) {
      throw new AmalgamError('E_DUPLICATE', `index lists "${e.key}" more than once`, { file: indexPath, key: e.key });
    }
    throw new AmalgamError('E_INDEX', `index is not valid JSON: ${(e as Error).message}`, { file: indexPath });
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new AmalgamError('E_INDEX', 'index JSON is not an object', { file: indexPath });
  }
  const wm = json['weight_map'];
  if (wm === null || typeof wm !== 'object' || Array.isArray(wm)) {
    throw new AmalgamError('E_INDEX', 'index has no "weight_map" object', { file: indexPath, key: 'weight_map' });
  }
  const weightMap: Record<string, string> = Object.create(null);
  for (const [tensor, shard] of Object.entries(wm)) {
    if (typeof shard !== 'string' || shard.length === 0) {
      throw new AmalgamError('E_INDEX', `weight_map entry is ${describe(shard)}, expected a shard file name`, { file: indexPath, key: tensor });
    }
    checkInsideFolder(shard, indexPath, tensor);
    weightMap[tensor] = shard;
  }
  const md = json['metadata'];
  const metadata = md !== null && typeof md === 'object' && !Array.isArray(md) ? (md as Record<string, unknown>) : {};
  return { metadata, weightMap };
}

function checkInsideFolder(rel: string, indexPath: string, tensor: string): void {
  const bad =
    isAbsolute(rel) ||
    /^[a-zA-Z]:/.test(rel) ||
    rel.includes('\\') ||
    rel.includes('\0') ||
    rel.split('/').some((seg) => seg === '..' || seg === '.' || seg === '');
  if (bad) {
    throw new AmalgamError('E_INDEX', `weight_map points to "${rel}", outside the model folder`, {
      file: indexPath,
      key: tensor,
      hint: 'shard names must be plain relative paths inside the folder that holds the index',
    });
  }
  const root = resolve(dirname(indexPath));
  const full = resolve(root, normalize(rel));
  if (!full.startsWith(root + sep)) {
    throw new AmalgamError('E_INDEX', `weight_map points to "${rel}", outside the model folder`, { file: indexPath, key: tensor });
  }
}

/**
 * Tensors spread over several safetensors shards, located through an index. Every shard is
 * opened and validated up front; a tensor listed in the index must be in its shard, and no tensor
 * may live in two shards.
 */
export class ShardedSafetensors implements TensorSource {
  private constructor(
    readonly path: string,
    readonly index: ShardIndex,
    private readonly shards: Map<string, SafetensorsFile>,
    private readonly owner: Map<string, SafetensorsFile>,
    private readonly order: TensorInfo[],
  ) {}

  get metadata(): Record<string, string> {
    const out: Record<string, string> = Object.create(null);
    for (const [k, v] of Object.entries(this.index.metadata)) out[k] = typeof v === 'string' ? v : JSON.stringify(v);
    return out;
  }

  /** Shard files, relative to the folder. */
  shardFiles(): string[] {
    return [...this.shards.keys()];
  }

  static async open(indexPath: string): Promise<ShardedSafetensors> {
    const index = await readShardIndex(indexPath);
    const dir = dirname(indexPath);
    const shards = new Map<string, SafetensorsFile>();
    const owner = new Map<string, SafetensorsFile>();
    const order: TensorInfo[] = [];
    try {
      const shardNames = [...new Set(Object.values(index.weightMap))].sort();
      for (const s of shardNames) {
        const p = join(dir, s);
        try {
          await stat(p);
        } catch {
          const tensor = Object.keys(index.weightMap).find((t) => index.weightMap[t] === s);
          throw new AmalgamError('E_INDEX', `weight_map points to shard "${s}", which does not exist`, {
            file: indexPath,
            key: tensor,
            hint: 'the checkpoint is incomplete: download or copy the missing shard',
          });
        }
        shards.set(s, await SafetensorsFile.open(p));
      }
      for (const [tensor, s] of Object.entries(index.weightMap)) {
        const f = shards.get(s)!;
        if (!f.has(tensor)) {
          throw new AmalgamError('E_INDEX', `weight_map says the tensor is in "${s}", but that shard does not contain it`, { file: indexPath, key: tensor });
        }
      }
      for (const [s, f] of shards) {
        for (const t of f.tensors()) {
          const prev = owner.get(t.name);
          if (prev) {
            throw new AmalgamError('E_DUPLICATE', `tensor is stored in two shards: "${basename(prev.path)}" and "${s}"`, { file: indexPath, key: t.name });
          }
          owner.set(t.name, f);
          if (index.weightMap[t.name] !== undefined) order.push(t);
        }
      }
    } catch (e) {
      await Promise.all([...shards.values()].map((f) => f.close()));
      throw e;
    }
    order.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    return new ShardedSafetensors(indexPath, index, shards, owner, order);
  }

  tensors(): TensorInfo[] {
    return this.order.map((t) => ({ ...t, shape: t.shape.slice() }));
  }
  has(name: string): boolean {
    return this.index.weightMap[name] !== undefined;
  }
  private file(name: string): SafetensorsFile {
    const f = this.index.weightMap[name] !== undefined ? this.owner.get(name) : undefined;
    if (!f) throw new AmalgamError('E_MISSING', 'no such tensor in the sharded checkpoint', { file: this.path, key: name });
    return f;
  }
  info(name: string): TensorInfo {
    return this.file(name).info(name);
  }
  readRaw(name: string): Promise<Uint8Array> {
    return this.file(name).readRaw(name);
  }
  readRawInto(name: string, dst: Uint8Array): Promise<void> {
    return this.file(name).readRawInto(name, dst);
  }
  locate(name: string): TensorLocation | undefined {
    return this.file(name).locate(name);
  }
  readF32(name: string): Promise<Float32Array> {
    return this.file(name).readF32(name);
  }
  async close(): Promise<void> {
    await Promise.all([...this.shards.values()].map((f) => f.close()));
  }
}

// ---------------------------------------------------------------------------------------------
// Writer

export interface TensorSpec {
  name: string;
  dtype: DType;
  shape: number[];
}

export interface TensorData extends TensorSpec {
  /** Little-endian raw bytes (numel × element size). */
  data: Uint8Array;
}

/** Build the header bytes (length prefix + padded JSON) and assign data offsets. */
export function layoutSafetensors(
  tensors: readonly TensorSpec[],
  metadata: Record<string, string> | undefined,
  file = '<output>',
): { header: Uint8Array; offsets: Map<string, [number, number]>; dataBytes: number } {
  const seen = new Set<string>();
  for (const t of tensors) {
    if (seen.has(t.name)) throw new AmalgamError('E_DUPLICATE', 'tensor is written twice', { file, key: t.name });
    if (t.name === '__metadata__') throw new AmalgamError('E_USAGE', 'a tensor cannot be named __metadata__', { file, key: t.name });
    seen.add(t.name);
  }
  // Reference order: alignment descending, then name.
  const sorted = tensors.slice().sort((a, b) => dtypeAlignment(b.dtype) - dtypeAlignment(a.dtype) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const offsets = new Map<string, [number, number]>();
  const parts: string[] = [];
  if (metadata && Object.keys(metadata).length) {
    const md = Object.entries(metadata).map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(String(v))}`);
    parts.push(`"__metadata__":{${md.join(',')}}`);
  }
  let cursor = 0;
  for (const t of sorted) {
    for (const d of t.shape) {
      if (!Number.isSafeInteger(d) || d < 0) throw new AmalgamError('E_SHAPE', `bad shape ${JSON.stringify(t.shape)}`, { file, key: t.name });
    }
    const bytes = byteSize(t.dtype, numel(t.shape));
    if (bytes === undefined) throw new AmalgamError('E_SHAPE', `shape ${JSON.stringify(t.shape)} of ${t.dtype} is not a whole number of bytes`, { file, key: t.name });
    offsets.set(t.name, [cursor, cursor + bytes]);
    parts.push(`${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(',')}],"data_offsets":[${cursor},${cursor + bytes}]}`);
    cursor += bytes;
  }
  let json = Buffer.from(`{${parts.join(',')}}`, 'utf8');
  const padded = Math.ceil(json.length / 8) * 8;
  const header = new Uint8Array(8 + padded);
  header.fill(0x20, 8);
  header.set(json, 8);
  new DataView(header.buffer).setBigUint64(0, BigInt(padded), true);
  json = Buffer.alloc(0);
  return { header, offsets, dataBytes: cursor };
}

/** Serialise tensors to one safetensors byte array (small data; tests and tools). */
export function serializeSafetensors(tensors: readonly TensorData[], metadata?: Record<string, string>): Uint8Array {
  const { header, offsets, dataBytes } = layoutSafetensors(tensors, metadata);
  const out = new Uint8Array(header.length + dataBytes);
  out.set(header);
  for (const t of tensors) {
    const [b, e] = offsets.get(t.name)!;
    checkDataLength(t, e - b, '<memory>');
    out.set(t.data, header.length + b);
  }
  return out;
}

function checkDataLength(t: TensorSpec & { data: Uint8Array }, expected: number, file: string): void {
  if (t.data.length !== expected) {
    throw new AmalgamError('E_SHAPE', `data is ${t.data.length} bytes but shape ${JSON.stringify(t.shape)} of ${t.dtype} needs ${expected}`, { file, key: t.name });
  }
}

/** A name next to `target` for writing in progress: hidden, unique, same folder (so rename is atomic). */
export function tempPathFor(target: string): string {
  return join(dirname(target), `.${basename(target)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
}

/** Write one safetensors file atomically (temporary name, then rename). */
export async function writeSafetensorsFile(path: string, tensors: readonly TensorData[], metadata: Record<string, string> = { format: 'pt' }): Promise<void> {
  const w = await SafetensorsFileWriter.create(path, tensors, metadata);
  try {
    for (const t of tensors) await w.write(t.name, t.data);
    await w.finish();
  } catch (e) {
    await w.abort();
    throw e;
  }
}

/**
 * Streams tensors into one safetensors file whose layout is fixed up front: tensors may be
 * written in any order, each with positional writes at its precomputed offset. The file appears
 * under its final name only after `finish()` has checked that every tensor was written.
 */
export class SafetensorsFileWriter {
  private readonly pending: Set<string>;
  private finished = false;

  private constructor(
    readonly path: string,
    private readonly tmp: string,
    private fh: FileHandle | undefined,
    private readonly specs: Map<string, TensorSpec>,
    private readonly offsets: Map<string, [number, number]>,
    private readonly dataStart: number,
    readonly totalBytes: number,
    private direct: FileHandle | undefined,
  ) {
    this.pending = new Set(specs.keys());
  }

  /**
   * Lays the file out and opens it under a temporary name. With `directWrites` (Linux, unless
   * `AMALGAM_DIRECT_IO=0`), the whole pages of tensor data given in page-aligned memory
   * (`allocAlignedShared`) at a matching offset are written with `O_DIRECT`, bypassing the page
   * cache; everything else, and everything on a file system without direct I/O, is written
   * through the page cache.
   */
  static async create(
    path: string,
    tensors: readonly TensorSpec[],
    metadata: Record<string, string> = { format: 'pt' },
    opts: { directWrites?: boolean } = {},
  ): Promise<SafetensorsFileWriter> {
    const { header, offsets, dataBytes } = layoutSafetensors(tensors, metadata, path);
    const tmp = tempPathFor(path);
    let fh: FileHandle;
    try {
      fh = await open(tmp, 'w');
    } catch (e) {
      throw ioError(tmp, e);
    }
    let direct: FileHandle | undefined;
    try {
      await writeFully(fh, header, 0);
      if (dataBytes > 0) await fh.truncate(header.length + dataBytes);
      const flag = directFlag();
      if (opts.directWrites && flag !== undefined && directIoEnabled()) {
        // File systems without direct I/O (tmpfs, some network mounts) refuse the flag: then
        // every write goes through the page cache.
        direct = await open(tmp, constants.O_WRONLY | flag).catch(() => undefined);
      }
    } catch (e) {
      await direct?.close().catch(() => {});
      await fh.close();
      await rm(tmp, { force: true });
      throw ioError(tmp, e);
    }
    const specs = new Map(tensors.map((t) => [t.name, { name: t.name, dtype: t.dtype, shape: t.shape.slice() }]));
    return new SafetensorsFileWriter(path, tmp, fh, specs, offsets, header.length, header.length + dataBytes, direct);
  }

  /** Byte position of a tensor's data in the file. */
  positionOf(name: string): number {
    const o = this.offsets.get(name);
    if (!o) throw new AmalgamError('E_USAGE', 'tensor is not part of this file', { file: this.path, key: name });
    return this.dataStart + o[0];
  }

  /** Whether writes may bypass the page cache (see `create`). */
  get writesDirect(): boolean {
    return this.direct !== undefined;
  }

  has(name: string): boolean {
    return this.specs.has(name);
  }

  spec(name: string): TensorSpec {
    const s = this.specs.get(name);
    if (!s) throw new AmalgamError('E_USAGE', 'tensor is not part of this file', { file: this.path, key: name });
    return s;
  }

  async write(name: string, data: Uint8Array): Promise<void> {
    const spec = this.spec(name);
    if (!this.pending.has(name)) throw new AmalgamError('E_DUPLICATE', 'tensor written twice', { file: this.path, key: name });
    const [b, e] = this.offsets.get(name)!;
    checkDataLength({ ...spec, data }, e - b, this.path);
    if (!this.fh) throw new AmalgamError('E_IO', 'writer is closed', { file: this.path });
    this.pending.delete(name);
    const pos = this.dataStart + b;
    const fh = this.fh;
    try {
      const split = this.direct && isPageAligned(data.buffer) ? splitForDirect(pos, data.byteOffset, data.length) : undefined;
      if (!split || split.middle === 0) {
        await writeFully(fh, data, pos);
        return;
      }
      const { head, middle } = split;
      await Promise.all([
        head > 0 ? writeFully(fh, data.subarray(0, head), pos) : undefined,
        head + middle < data.length ? writeFully(fh, data.subarray(head + middle), pos + head + middle) : undefined,
        this.writeDirect(data.subarray(head, head + middle), pos + head),
      ]);
    } catch (e) {
      throw e instanceof AmalgamError ? e : ioError(this.tmp, e);
    }
  }

  /**
   * Whole pages at a page-aligned position from page-aligned memory, bypassing the page cache.
   * If the file system refuses a direct write, that write and every later one go through the
   * page cache instead (a real I/O error then surfaces from there).
   */
  private async writeDirect(data: Uint8Array, position: number): Promise<void> {
    let done = 0;
    while (done < data.length && this.direct) {
      const direct = this.direct;
      let n: number;
      try {
        n = (await direct.write(data, done, Math.min(1 << 30, data.length - done), position + done)).bytesWritten;
      } catch {
        if (this.direct === direct) {
          this.direct = undefined;
          void direct.close().catch(() => {});
        }
        break;
      }
      done += n;
      if (n === 0 || n % DIRECT_ALIGN !== 0) break;
    }
    if (done < data.length) {
      if (!this.fh) throw new AmalgamError('E_IO', 'writer is closed', { file: this.path });
      await writeFully(this.fh, data.subarray(done), position + done);
    }
  }

  /** Convert float32 values to the tensor's dtype and write them. */
  async writeF32(name: string, data: Float32Array): Promise<void> {
    await this.write(name, encodeFromF32(this.spec(name).dtype, data));
  }

  /** Throws E_MISSING when some tensor has not been written yet. */
  assertComplete(): void {
    if (this.finished || !this.pending.size) return;
    const missing = [...this.pending].slice(0, 5).join(', ');
    throw new AmalgamError('E_MISSING', `${this.pending.size} tensor(s) were never written (${missing}${this.pending.size > 5 ? ', ...' : ''})`, { file: this.path });
  }

  async finish(): Promise<void> {
    if (this.finished) return;
    this.assertComplete();
    const fh = this.fh!;
    this.fh = undefined;
    const direct = this.direct;
    this.direct = undefined;
    await fh.sync();
    await direct?.close();
    await fh.close();
    await rename(this.tmp, this.path);
    this.finished = true;
  }

  async abort(): Promise<void> {
    const fh = this.fh;
    this.fh = undefined;
    const direct = this.direct;
    this.direct = undefined;
    if (direct) await direct.close().catch(() => {});
    if (fh) await fh.close().catch(() => {});
    if (!this.finished) await rm(this.tmp, { force: true });
  }
}

async function writeFully(fh: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const n = Math.min(1 << 30, data.length - done);
    const { bytesWritten } = await fh.write(data, done, n, position + done);
    done += bytesWritten;
  }
}

export interface ShardedWriterOptions {
  /** Byte budget per shard (tensor data only); default 5e9 like mergekit's "5B". */
  maxShardBytes?: number;
  /** Header metadata of every shard (default {"format": "pt"}). */
  metadata?: Record<string, string>;
  /** File name stem: `<prefix>.safetensors` or `<prefix>-0000i-of-0000n.safetensors`. */
  prefix?: string;
  /** Write the index even when everything fits in one shard. */
  alwaysIndex?: boolean;
  /** Extra keys for the index's `metadata` object (besides `total_size`). */
  indexMetadata?: Record<string, string | number>;
  /** Write whole pages from page-aligned memory with O_DIRECT (see `SafetensorsFileWriter.create`). */
  directWrites?: boolean;
}

export interface ShardedWriteResult {
  files: string[];
  indexFile?: string;
  totalSize: number;
}

/**
 * Sharded writer: tensors are assigned to shards by a byte budget in the order given (a tensor
 * larger than the budget gets a shard of its own), each shard is laid out up front, and tensors
 * stream in in any order. `finish()` renames every shard and writes the index
 * (`metadata.total_size`, `weight_map`) last.
 */
export class ShardedSafetensorsWriter {
  private readonly shardOf = new Map<string, SafetensorsFileWriter>();
  private finished = false;

  private constructor(
    readonly dir: string,
    private readonly writers: SafetensorsFileWriter[],
    private readonly fileNames: string[],
    private readonly weightMap: Record<string, string>,
    readonly totalSize: number,
    private readonly indexName: string | undefined,
    private readonly indexMetadata: Record<string, string | number>,
  ) {
    for (const w of writers) for (const name of Object.keys(weightMap)) if (w.has(name)) this.shardOf.set(name, w);
  }

  static async create(dir: string, tensors: readonly TensorSpec[], opts: ShardedWriterOptions = {}): Promise<ShardedSafetensorsWriter> {
    const budget = opts.maxShardBytes ?? 5e9;
    if (!(budget > 0)) throw new AmalgamError('E_USAGE', `shard size must be positive, got ${budget}`);
    const prefix = opts.prefix ?? 'model';
    const metadata = opts.metadata ?? { format: 'pt' };
    const groups: TensorSpec[][] = [];
    let cur: TensorSpec[] = [];
    let curBytes = 0;
    let total = 0;
    const names = new Set<string>();
    for (const t of tensors) {
      if (names.has(t.name)) throw new AmalgamError('E_DUPLICATE', 'tensor is written twice', { file: dir, key: t.name });
      names.add(t.name);
      const b = byteSize(t.dtype, numel(t.shape));
      if (b === undefined) throw new AmalgamError('E_SHAPE', `shape ${JSON.stringify(t.shape)} of ${t.dtype} is not a whole number of bytes`, { key: t.name });
      if (cur.length && curBytes + b > budget) {
        groups.push(cur);
        cur = [];
        curBytes = 0;
      }
      cur.push(t);
      curBytes += b;
      total += b;
    }
    if (cur.length || groups.length === 0) groups.push(cur);
    const n = groups.length;
    const pad = (i: number) => String(i).padStart(5, '0');
    const fileNames = groups.map((_, i) => (n === 1 ? `${prefix}.safetensors` : `${prefix}-${pad(i + 1)}-of-${pad(n)}.safetensors`));
    const writers: SafetensorsFileWriter[] = [];
    const weightMap: Record<string, string> = Object.create(null);
    try {
      for (let i = 0; i < n; i++) {
        writers.push(await SafetensorsFileWriter.create(join(dir, fileNames[i]!), groups[i]!, metadata, { directWrites: opts.directWrites ?? false }));
        for (const t of groups[i]!) weightMap[t.name] = fileNames[i]!;
      }
    } catch (e) {
      await Promise.all(writers.map((w) => w.abort()));
      throw e;
    }
    const indexName = n > 1 || opts.alwaysIndex ? `${prefix}.safetensors.index.json` : undefined;
    return new ShardedSafetensorsWriter(dir, writers, fileNames, weightMap, total, indexName, opts.indexMetadata ?? {});
  }

  /** Byte position of a tensor's data in its shard. */
  positionOf(name: string): number {
    return this.writer(name).positionOf(name);
  }

  /** Whether some shard writes bypass the page cache. */
  get writesDirect(): boolean {
    return this.writers.some((w) => w.writesDirect);
  }

  private writer(name: string): SafetensorsFileWriter {
    const w = this.shardOf.get(name);
    if (!w) throw new AmalgamError('E_USAGE', 'tensor is not part of this output', { file: this.dir, key: name });
    return w;
  }

  async write(name: string, data: Uint8Array): Promise<void> {
    return this.writer(name).write(name, data);
  }
  async writeF32(name: string, data: Float32Array): Promise<void> {
    return this.writer(name).writeF32(name, data);
  }

  async finish(): Promise<ShardedWriteResult> {
    if (this.finished) throw new AmalgamError('E_USAGE', 'writer already finished', { file: this.dir });
    // Check every shard before renaming any, so a failed finish leaves no final-named file.
    for (const w of this.writers) w.assertComplete();
    for (const w of this.writers) await w.finish();
    let indexFile: string | undefined;
    if (this.indexName) {
      // Written by hand: a JS object would list integer-like tensor names first, unsorted.
      const entries = Object.keys(this.weightMap)
        .sort()
        .map((k) => `    ${JSON.stringify(k)}: ${JSON.stringify(this.weightMap[k])}`);
      const metadata = JSON.stringify({ ...this.indexMetadata, total_size: this.totalSize }, null, 2).replace(/\n/g, '\n  ');
      const weightMap = entries.length ? `{\n${entries.join(',\n')}\n  }` : '{}';
      indexFile = join(this.dir, this.indexName);
      const tmp = tempPathFor(indexFile);
      await writeFile(tmp, `{\n  "metadata": ${metadata},\n  "weight_map": ${weightMap}\n}\n`);
      await rename(tmp, indexFile);
    }
    this.finished = true;
    return { files: this.fileNames.slice(), indexFile, totalSize: this.totalSize };
  }

  async abort(): Promise<void> {
    await Promise.all(this.writers.map((w) => w.abort()));
  }
}

/** A tensor's stored bytes in a file: `length` bytes from byte `offset`. */
export interface TensorLocation {
  path: string;
  offset: number;
  length: number;
}

/**
 * A source that can read a tensor's stored bytes into memory the caller owns, and tell where in a
 * file they are.
 */
export interface RawIntoSource extends TensorSource {
  readRawInto(name: string, dst: Uint8Array): Promise<void>;
  locate(name: string): TensorLocation | undefined;
}

export function canReadRawInto(src: TensorSource): src is RawIntoSource {
  const s = src as Partial<RawIntoSource>;
  return typeof s.readRawInto === 'function' && typeof s.locate === 'function';
}

/** Open a safetensors file, or a folder (sharded through its index, or a single model.safetensors). */
export async function openSafetensors(path: string): Promise<TensorSource> {
  let st;
  try {
    st = await stat(path);
  } catch (e) {
    throw ioError(path, e);
  }
  if (st.isFile()) {
    if (path.endsWith('.json')) return ShardedSafetensors.open(path);
    return SafetensorsFile.open(path);
  }
  const idx = join(path, INDEX_FILE);
  let hasIndex = true;
  try {
    await stat(idx);
  } catch {
    hasIndex = false;
  }
  if (hasIndex) return ShardedSafetensors.open(idx);
  const single = join(path, 'model.safetensors');
  try {
    await stat(single);
  } catch {
    throw new AmalgamError('E_MISSING', `no ${INDEX_FILE} or model.safetensors in the folder`, {
      file: path,
      hint: 'point at a Hugging Face model folder with safetensors weights (pytorch_model.bin must be converted to safetensors first)',
    });
  }
  return SafetensorsFile.open(single);
}
