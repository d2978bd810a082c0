/**
 * Fuzz targets shared by the test suite (`test/fuzz.test.ts`) and the long runner
 * (`test/fuzz/run.ts`): generators of valid safetensors and GGUF files, structure-aware
 * mutators, and the property every input must satisfy:
 *
 * - parsing either succeeds, and then every tensor reads (readRaw, and readF32 or a typed
 *   dtype error), or it throws an AmalgamError; anything else (TypeError, RangeError, a stack
 *   overflow, ...) is a failure;
 * - the bytes the reader is asked for never exceed the input size: in total while parsing, in
 *   total while reading every tensor once, and in any single read.
 */
import { readFileSync, existsSync } from 'node:fs';
import fc from 'fast-check';
import { AmalgamError, type ErrorCode } from '../../src/errors.js';
import { SafetensorsFile, serializeSafetensors, type TensorData } from '../../src/io/safetensors.js';
import { GgufFile, serializeGguf, GGUF_TYPE, type GgufKv, type GgufTensorInput, type GgufValue, type GgmlSupportedType } from '../../src/io/gguf.js';
import { MemoryByteReader, type ByteReader } from '../../src/io/source.js';
import { SAFETENSORS_DTYPES, byteSize, numel, type DType } from '../../src/tensor/dtype.js';
import { fixture } from '../helpers/fixtures.js';

// ---------------------------------------------------------------------------------------------
// Counting reader and the property

/** Wraps a ByteReader and records what it was asked to read (before delegating). */
export class CountingReader implements ByteReader {
  requested = 0;
  reads = 0;
  largest = 0;
  /** Set when a read asked for a negative, non-integer or oversized length or position. */
  bad: string | undefined;

  constructor(private readonly inner: ByteReader) {}

  get path(): string {
    return this.inner.path;
  }
  get size(): number {
    return this.inner.size;
  }
  resetCount(): void {
    this.requested = 0;
  }
  private record(position: number, length: number): void {
    this.reads++;
    if (!Number.isSafeInteger(length) || length < 0 || !Number.isSafeInteger(position) || position < 0 || position + length > this.inner.size) {
      this.bad ??= `read(${position}, ${length}) on ${this.inner.size} bytes`;
    }
    if (Number.isFinite(length)) {
      this.requested += length;
      this.largest = Math.max(this.largest, length);
    } else {
      this.requested = Infinity;
    }
  }
  async read(position: number, length: number): Promise<Uint8Array> {
    this.record(position, length);
    return this.inner.read(position, length);
  }
  async readInto(position: number, dst: Uint8Array): Promise<void> {
    this.record(position, dst.length);
    if (this.inner.readInto) return this.inner.readInto(position, dst);
    dst.set(await this.inner.read(position, dst.length));
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** A broken property: the message says what went wrong with which input. */
export class FuzzFailure extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'FuzzFailure';
  }
}

export type Outcome = 'ok' | ErrorCode;

function describeError(e: unknown): string {
  if (e instanceof Error) return `${e.constructor.name}: ${e.message}\n${e.stack ?? ''}`;
  return String(e);
}

function checkBudget(r: CountingReader, phase: string): void {
  if (r.bad) throw new FuzzFailure(`${phase}: the reader was asked for an invalid range: ${r.bad}`);
  if (r.requested > r.size) throw new FuzzFailure(`${phase}: the reader was asked for ${r.requested} bytes of a ${r.size}-byte input`);
}

/** Run `fn`; an AmalgamError is returned, anything else becomes a FuzzFailure. */
async function typed<T>(phase: string, fn: () => Promise<T> | T): Promise<T | AmalgamError> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof AmalgamError) {
      if (typeof e.code !== 'string' || typeof e.message !== 'string' || e.message.length === 0) {
        throw new FuzzFailure(`${phase}: AmalgamError without a code or message`, { cause: e });
      }
      return e;
    }
    throw new FuzzFailure(`${phase}: threw a non-AmalgamError: ${describeError(e)}`, { cause: e });
  }
}

const PATH = '<fuzz>';

/**
 * The property for safetensors input. Returns the outcome; throws FuzzFailure when broken.
 * `expect`, when given, is the tensor list of an unmutated input: it must parse and read back
 * bit-exact.
 */
export async function checkSafetensorsInput(bytes: Uint8Array, expect?: readonly TensorData[]): Promise<Outcome> {
  const reader = new CountingReader(new MemoryByteReader(bytes, PATH));
  const f = await typed('SafetensorsFile.fromReader', () => SafetensorsFile.fromReader(reader));
  checkBudget(reader, 'parse');
  if (f instanceof AmalgamError) {
    if (f.file !== PATH) throw new FuzzFailure(`error does not name the file: ${f.message}`);
    if (expect) throw new FuzzFailure(`a valid file was rejected: ${f.message}`);
    return f.code;
  }
  // Parse + one readRaw of every tensor reads each byte at most once.
  const infos = f.tensors();
  void f.metadata;
  for (const t of infos) {
    const raw = await typed(`readRaw(${JSON.stringify(t.name)})`, () => f.readRaw(t.name));
    if (raw instanceof AmalgamError) throw new FuzzFailure(`readRaw of a tensor that parsed failed: ${raw.message}`);
    const want = byteSize(t.dtype, numel(t.shape));
    if (raw.length !== want) throw new FuzzFailure(`readRaw(${JSON.stringify(t.name)}) gave ${raw.length} bytes, expected ${want}`);
  }
  checkBudget(reader, 'parse + readRaw of every tensor');
  reader.resetCount();
  for (const t of infos) {
    const v = await typed(`readF32(${JSON.stringify(t.name)})`, () => f.readF32(t.name));
    if (v instanceof AmalgamError) {
      if (v.code !== 'E_DTYPE') throw new FuzzFailure(`readF32(${JSON.stringify(t.name)}) of ${t.dtype} failed with ${v.code}: ${v.message}`);
      if (t.dtype === 'F32' || t.dtype === 'F16' || t.dtype === 'BF16' || t.dtype === 'F64') throw new FuzzFailure(`readF32 of a ${t.dtype} tensor was refused`);
    } else if (v.length !== numel(t.shape)) {
      throw new FuzzFailure(`readF32(${JSON.stringify(t.name)}) gave ${v.length} values, expected ${numel(t.shape)}`);
    }
  }
  checkBudget(reader, 'readF32 of every tensor');
  if (expect) {
    if (infos.length !== expect.length) throw new FuzzFailure(`a valid file lists ${infos.length} tensors, expected ${expect.length}`);
    for (const t of expect) {
      const info = f.info(t.name);
      if (info.dtype !== t.dtype || JSON.stringify(info.shape) !== JSON.stringify(t.shape)) throw new FuzzFailure(`${JSON.stringify(t.name)} came back as ${info.dtype} ${JSON.stringify(info.shape)}`);
      const raw = await f.readRaw(t.name);
      if (!Buffer.from(raw).equals(Buffer.from(t.data))) throw new FuzzFailure(`${JSON.stringify(t.name)} did not read back bit-exact`);
    }
  }
  await f.close();
  return 'ok';
}

/** The property for GGUF input (same rules; tensors may also be refused as unsupported). */
export async function checkGgufInput(bytes: Uint8Array, expectValid = false): Promise<Outcome> {
  const reader = new CountingReader(new MemoryByteReader(bytes, PATH));
  const f = await typed('GgufFile.fromReader', () => GgufFile.fromReader(reader));
  checkBudget(reader, 'parse');
  if (f instanceof AmalgamError) {
    if (f.file !== PATH) throw new FuzzFailure(`error does not name the file: ${f.message}`);
    if (expectValid) throw new FuzzFailure(`a valid file was rejected: ${f.message}`);
    return f.code;
  }
  const md = await typed('metadata', () => f.metadata);
  if (md instanceof AmalgamError) throw new FuzzFailure(`metadata of a parsed file failed: ${md.message}`);
  const infos = f.tensors();
  reader.resetCount();
  for (const t of infos) {
    const raw = await typed(`readRaw(${JSON.stringify(t.name)})`, () => f.readRaw(t.name));
    if (raw instanceof AmalgamError) throw new FuzzFailure(`readRaw of a tensor that parsed failed: ${raw.message}`);
    const want = byteSize(t.dtype, numel(t.shape));
    if (raw.length !== want) throw new FuzzFailure(`readRaw(${JSON.stringify(t.name)}) gave ${raw.length} bytes, expected ${want}`);
  }
  checkBudget(reader, 'readRaw of every tensor');
  reader.resetCount();
  for (const t of infos) {
    const v = await typed(`readF32(${JSON.stringify(t.name)})`, () => f.readF32(t.name));
    if (v instanceof AmalgamError) {
      throw new FuzzFailure(`readF32(${JSON.stringify(t.name)}) of a listed tensor failed with ${v.code}: ${v.message}`);
    } else if (v.length !== numel(t.shape)) {
      throw new FuzzFailure(`readF32(${JSON.stringify(t.name)}) gave ${v.length} values, expected ${numel(t.shape)}`);
    }
  }
  checkBudget(reader, 'readF32 of every tensor');
  await f.close();
  return 'ok';
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/** Deterministic pseudo-random bytes (mulberry32). */
export function seededBytes(n: number, seed: number): Uint8Array {
  let a = seed >>> 0;
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = (t ^ (t >>> 14)) & 0xff;
  }
  return out;
}

function seededShuffle<T>(xs: T[], seed: number): T[] {
  const r = seededBytes(xs.length * 4, seed);
  const dv = new DataView(r.buffer);
  const out = xs.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = dv.getUint32(i * 4, true) % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

function concatBytes(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

const u64le = (v: bigint): Uint8Array => {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, v), true);
  return b;
};

// ---------------------------------------------------------------------------------------------
// Valid safetensors files

export interface SafetensorsCase {
  bytes: Uint8Array;
  tensors: TensorData[];
}

const nameArb: fc.Arbitrary<string> = fc
  .oneof(
    { weight: 3, arbitrary: fc.stringMatching(/^[a-z][a-z0-9_.]{0,24}$/) },
    { weight: 2, arbitrary: fc.constantFrom('model.embed_tokens.weight', 'lm_head.weight', '0', '1', '10', '9', '__proto__', 'constructor', 'toString', 'ñ', '模型', '🤖', '', ' ', '"', '\\', 'dtype', 'shape', 'data_offsets') },
    { weight: 1, arbitrary: fc.nat().map(String) },
    { weight: 1, arbitrary: fc.string({ maxLength: 6 }) },
    { weight: 1, arbitrary: fc.string({ unit: 'grapheme', maxLength: 4 }) },
    { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 3 }) },
  )
  .filter((n) => n !== '__metadata__');

const dtypeArb: fc.Arbitrary<DType> = fc.oneof(
  { weight: 3, arbitrary: fc.constantFrom<DType>('F32', 'F16', 'BF16', 'F64') },
  { weight: 2, arbitrary: fc.constantFrom<DType>(...SAFETENSORS_DTYPES) },
);

const shapeArb = fc.oneof({ weight: 4, arbitrary: fc.array(fc.nat(5), { maxLength: 3 }) }, { weight: 1, arbitrary: fc.array(fc.nat(3), { maxLength: 5 }) });

const tensorArb: fc.Arbitrary<TensorData> = fc.record({ name: nameArb, dtype: dtypeArb, shape: shapeArb, seed: fc.nat() }).map(({ name, dtype, shape, seed }) => {
  // sub-byte dtypes need numel × bits to be a multiple of 8
  const s = byteSize(dtype, numel(shape)) === undefined ? [...shape, 8] : shape;
  const data = seededBytes(byteSize(dtype, numel(s))!, seed);
  if (dtype === 'BOOL') for (let i = 0; i < data.length; i++) data[i]! &= 1;
  return { name, dtype, shape: s, data };
});

const metadataArb = fc.option(
  fc.uniqueArray(fc.tuple(fc.oneof(fc.string({ maxLength: 6 }), fc.constantFrom('format', '__proto__', '0')), fc.string({ maxLength: 10 })), { selector: ([k]) => k, maxLength: 4 }).map((kv) => Object.fromEntries(kv) as Record<string, string>),
  { nil: undefined },
);

/**
 * A safetensors file written some other way than amalgam's writer (still valid): any key order,
 * data in any order, pretty-printed or compact JSON, padding that is not a multiple of 8.
 */
function looseSafetensors(tensors: readonly TensorData[], metadata: Record<string, string> | undefined, seed: number): Uint8Array {
  const r = seededBytes(4, seed);
  const dataOrder = seededShuffle(tensors.slice(), seed);
  const offsets = new Map<string, [number, number]>();
  let cursor = 0;
  for (const t of dataOrder) {
    offsets.set(t.name, [cursor, cursor + t.data.length]);
    cursor += t.data.length;
  }
  const ws = r[0]! & 1 ? '' : r[0]! & 2 ? ' ' : '\n  ';
  const members = seededShuffle(tensors.slice(), seed + 1).map(
    (t) => `${JSON.stringify(t.name)}:${ws}{"data_offsets":${ws}[${offsets.get(t.name)!.join(',' + ws)}],${ws}"shape":[${t.shape.join(',')}],"dtype":"${t.dtype}"}`,
  );
  if (metadata) members.splice(r[1]! % (members.length + 1), 0, `"__metadata__":${ws}${JSON.stringify(metadata)}`);
  const json = Buffer.from(`{${ws}${members.join(`,${ws}`)}${ws}}`, 'utf8');
  const pad = r[2]! % 12;
  const header = concatBytes(json, new Uint8Array(pad).fill(0x20));
  const data = concatBytes(...dataOrder.map((t) => t.data));
  return concatBytes(u64le(BigInt(header.length)), header, data);
}

export const validSafetensorsArb: fc.Arbitrary<SafetensorsCase> = fc
  .record({
    tensors: fc.uniqueArray(tensorArb, { selector: (t) => t.name, maxLength: 6 }),
    metadata: metadataArb,
    loose: fc.boolean(),
    seed: fc.nat(),
  })
  .map(({ tensors, metadata, loose, seed }) => ({
    bytes: loose ? looseSafetensors(tensors, metadata, seed) : serializeSafetensors(tensors, metadata),
    tensors,
  }));

// ---------------------------------------------------------------------------------------------
// Safetensors mutators

export interface Mutation {
  kind: number;
  a: number;
  b: number;
  c: number;
}

export const mutationArb: fc.Arbitrary<Mutation> = fc.record({ kind: fc.nat(), a: fc.nat(), b: fc.nat(), c: fc.nat() });

const INTERESTING_BYTES = [0x00, 0xff, 0x7b, 0x7d, 0x22, 0x2c, 0x3a, 0x5b, 0x5d, 0x2d, 0x30, 0x39, 0x65, 0x20, 0x80, 0xc0, 0x5c, 0x0a];

const INTERESTING_U64: bigint[] = [
  0n, 1n, 2n, 7n, 8n, 0xffn, 0x100n, 0xffffn, 100_000_000n, 100_000_001n, 0x7fffffffn, 0x80000000n, 0xffffffffn, 0x100000000n,
  2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n - 1n, 2n ** 63n, 2n ** 64n - 1n,
];

const NUMBER_REPLACEMENTS = [
  '-1', '-0', '0', '1', '2', '1.5', '0.5', '1e3', '1E400', '-1e400', '9007199254740991', '9007199254740992', '9007199254740993',
  '18446744073709551615', '18446744073709551616', '1e308', '-9999999999', '100000000', '4294967296', '2147483648', '0.0', '01',
  '+1', 'NaN', 'Infinity', 'null', '"1"', '[]', '{}', 'true', '99999999999999999999999999999999', '1e-400', '4294967295', '65536',
];

const STRING_REPLACEMENTS = [
  ...SAFETENSORS_DTYPES.map((d) => `"${d}"`),
  '"F128"', '"f32"', '""', '"__metadata__"', '"dtype"', '"shape"', '"data_offsets"', '"__proto__"', '"a"', '"\\u0000"', '"\\ud800"',
  '1', 'null', '{}', '[]', 'true', '"\\x"', '"\\u12"', '"unterminated', '"tab\tin string"',
];

const INVALID_UTF8: number[][] = [[0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xe2, 0x82], [0xf4, 0x90, 0x80, 0x80], [0x80], [0xf8, 0x88, 0x80, 0x80, 0x80]];

/** A token of JSON-ish text: a string (with escapes) or a number-like run. */
interface Span {
  start: number;
  end: number;
}

function scanTokens(text: string): { strings: Span[]; numbers: Span[]; structural: number[] } {
  const strings: Span[] = [];
  const numbers: Span[] = [];
  const structural: number[] = [];
  let i = 0;
  while (i < text.length) {
    const ch = text[i]!;
    if (ch === '"') {
      const start = i++;
      while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
      i = Math.min(i + 1, text.length);
      strings.push({ start, end: i });
    } else if (/[-0-9]/.test(ch)) {
      const start = i;
      while (i < text.length && /[-+0-9.eE]/.test(text[i]!)) i++;
      numbers.push({ start, end: i });
    } else {
      if ('{}[],:'.includes(ch)) structural.push(i);
      i++;
    }
  }
  return { strings, numbers, structural };
}

/** `"key": value` members of objects in JSON text (end excludes the separator). */
function scanMembers(text: string): Span[] {
  const out: Span[] = [];
  const { strings } = scanTokens(text);
  for (const s of strings) {
    let j = s.end;
    while (j < text.length && /\s/.test(text[j]!)) j++;
    if (text[j] !== ':') continue;
    // find the end of the value: depth back to 0 at ',' or a closing bracket
    let depth = 0;
    let k = j + 1;
    while (k < text.length) {
      const ch = text[k]!;
      if (ch === '"') {
        k++;
        while (k < text.length && text[k] !== '"') k += text[k] === '\\' ? 2 : 1;
        k++;
        continue;
      }
      if (ch === '{' || ch === '[') depth++;
      else if (ch === '}' || ch === ']') {
        if (depth === 0) break;
        depth--;
      } else if (ch === ',' && depth === 0) break;
      k++;
    }
    out.push({ start: s.start, end: Math.min(k, text.length) });
  }
  return out;
}

/** Header text as latin1 (one char per byte, so edits keep every other byte intact). */
function splitHeader(bytes: Uint8Array): { n: number; text: string } | undefined {
  if (bytes.length < 8) return undefined;
  const n = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(bytes.length - 8)) return undefined;
  return { n: Number(n), text: Buffer.from(bytes.subarray(8, 8 + Number(n))).toString('latin1') };
}

/** Replace the header with `text` (latin1), rewriting N unless `keepLength`. */
function joinHeader(bytes: Uint8Array, n: number, text: string, keepLength: boolean): Uint8Array {
  const header = Buffer.from(text, 'latin1');
  const prefix = keepLength ? bytes.subarray(0, 8) : u64le(BigInt(header.length));
  return concatBytes(prefix, header, bytes.subarray(8 + n));
}

const latin1 = (s: string) => Buffer.from(s, 'utf8').toString('latin1');

function pick<T>(xs: readonly T[], k: number): T {
  return xs[k % xs.length]!;
}

function byteMutation(bytes: Uint8Array, m: Mutation, hotEnd: number): Uint8Array {
  const len = bytes.length;
  // positions: mostly inside the "hot" region (the header), sometimes anywhere
  const pos = (x: number) => (m.c % 4 === 0 || hotEnd <= 0 ? x % (len + 1) : x % (Math.min(hotEnd, len) + 1));
  switch (m.kind % 6) {
    case 0: {
      if (!len) return bytes;
      const out = bytes.slice();
      const p = Math.min(pos(m.a), len - 1);
      // mostly the low 7 bits, so ASCII stays ASCII and the JSON parser gets to see the change
      out[p]! ^= 1 << (m.c % 3 === 0 ? m.b % 8 : m.b % 7);
      return out;
    }
    case 1: {
      if (!len) return bytes;
      const out = bytes.slice();
      out[Math.min(pos(m.a), len - 1)] = m.b % 3 === 0 ? m.b & 0xff : pick(INTERESTING_BYTES, m.b);
      return out;
    }
    case 2: {
      const p = pos(m.a);
      const ins = seededBytes(1 + (m.b % 8), m.b);
      if (m.c % 2) for (let i = 0; i < ins.length; i++) ins[i] = 0x20 + (ins[i]! % 0x5f); // printable ASCII
      return concatBytes(bytes.subarray(0, p), ins, bytes.subarray(p));
    }
    case 3: {
      const p = pos(m.a);
      return concatBytes(bytes.subarray(0, p), bytes.subarray(Math.min(len, p + 1 + (m.b % 16))));
    }
    case 4:
      return bytes.subarray(0, m.a % (len + 1)).slice();
    default:
      return concatBytes(bytes, seededBytes(1 + (m.b % 16), m.b));
  }
}

const ST_KINDS = 16;

/** Apply one mutation to safetensors bytes. */
export function mutateSafetensors(bytes: Uint8Array, m: Mutation): Uint8Array {
  const h = splitHeader(bytes);
  const kind = m.kind % ST_KINDS;
  if (kind < 4 || !h) return byteMutation(bytes, kind < 4 ? { ...m, kind } : m, h ? 8 + h.n : 8);
  const { n, text } = h;
  const keep = m.c % 5 === 0; // sometimes leave N stale on purpose
  switch (kind) {
    case 4:
      return byteMutation(bytes, { ...m, kind: 4 }, 0); // truncate
    case 5: {
      // header length rewrite
      const size = BigInt(bytes.length);
      const candidates = [...INTERESTING_U64, BigInt(n) - 1n, BigInt(n) + 1n, BigInt(n) - 8n, BigInt(n) + 8n, size - 8n, size - 7n, size, BigInt(m.b)];
      return concatBytes(u64le(pick(candidates, m.a)), bytes.subarray(8));
    }
    case 6: {
      const { numbers } = scanTokens(text);
      if (!numbers.length) return byteMutation(bytes, m, 8 + n);
      const s = pick(numbers, m.a);
      return joinHeader(bytes, n, text.slice(0, s.start) + pick(NUMBER_REPLACEMENTS, m.b) + text.slice(s.end), keep);
    }
    case 7: {
      const { strings } = scanTokens(text);
      if (!strings.length) return byteMutation(bytes, m, 8 + n);
      const s = pick(strings, m.a);
      return joinHeader(bytes, n, text.slice(0, s.start) + latin1(pick(STRING_REPLACEMENTS, m.b)) + text.slice(s.end), keep);
    }
    case 8: {
      // duplicate a member: duplicate tensor names, duplicate fields, duplicate __metadata__
      const members = scanMembers(text);
      if (!members.length) return byteMutation(bytes, m, 8 + n);
      const s = pick(members, m.a);
      const member = text.slice(s.start, s.end);
      return joinHeader(bytes, n, text.slice(0, s.end) + ',' + member + text.slice(s.end), keep);
    }
    case 9: {
      // remove a member (and one adjacent comma)
      const members = scanMembers(text);
      if (!members.length) return byteMutation(bytes, m, 8 + n);
      const s = pick(members, m.a);
      let { start, end } = s;
      if (text[end] === ',') end++;
      else if (text[start - 1] === ',') start--;
      return joinHeader(bytes, n, text.slice(0, start) + text.slice(end), keep);
    }
    case 10: {
      // delete or duplicate a structural character
      const { structural } = scanTokens(text);
      if (!structural.length) return byteMutation(bytes, m, 8 + n);
      const p = pick(structural, m.a);
      const edited = m.b % 2 ? text.slice(0, p) + text.slice(p + 1) : text.slice(0, p) + text[p] + text.slice(p);
      return joinHeader(bytes, n, edited, keep);
    }
    case 11: {
      // deep nesting in place of a value
      const { numbers } = scanTokens(text);
      const d = m.c % 2 ? 1 + (m.b % 10) : 1 + (m.b % 300); // around the parser's depth limit, or far past it
      const nest = m.b % 2 ? '['.repeat(d) + ']'.repeat(d) : '{"a":'.repeat(d) + '1' + '}'.repeat(d);
      const s = numbers.length ? pick(numbers, m.a) : { start: 1, end: 1 };
      return joinHeader(bytes, n, text.slice(0, s.start) + nest + text.slice(s.end), keep);
    }
    case 12: {
      // invalid UTF-8 inside the header
      const p = 1 + (m.a % Math.max(1, text.length));
      const bad = String.fromCharCode(...pick(INVALID_UTF8, m.b));
      return joinHeader(bytes, n, text.slice(0, p) + bad + text.slice(p), keep);
    }
    case 13: {
      // a __metadata__ entry with a non-string value or of the wrong type
      const md = pick(['{"k":1}', '{"k":null}', '{"k":{}}', '{"k":["v"]}', '[]', '"x"', '{"k":"v","k":"w"}', '{}', '{"0":"a","1":2}'], m.b);
      const existing = scanMembers(text).find((s) => text.startsWith('"__metadata__"', s.start));
      if (existing && m.c % 3 !== 0) {
        const colon = text.indexOf(':', existing.start + 14);
        return joinHeader(bytes, n, text.slice(0, colon + 1) + md + text.slice(existing.end), keep);
      }
      const p = text.indexOf('{');
      if (p < 0) return byteMutation(bytes, m, 8 + n);
      return joinHeader(bytes, n, text.slice(0, p + 1) + `"__metadata__":${md}` + (text.slice(p + 1).trim().startsWith('}') ? '' : ',') + text.slice(p + 1), keep);
    }
    case 14: {
      // swap two numbers (offsets and shapes get out of step)
      const { numbers } = scanTokens(text);
      if (numbers.length < 2) return byteMutation(bytes, m, 8 + n);
      let i = m.a % numbers.length;
      let j = m.b % numbers.length;
      if (i === j) j = (j + 1) % numbers.length;
      if (i > j) [i, j] = [j, i];
      const a = numbers[i]!;
      const b = numbers[j]!;
      const edited = text.slice(0, a.start) + text.slice(b.start, b.end) + text.slice(a.end, b.start) + text.slice(a.start, a.end) + text.slice(b.end);
      return joinHeader(bytes, n, edited, true);
    }
    default: {
      // padding that is not spaces, or bytes after the JSON
      const tail = pick(['\n', '\t', '\r', 'x', '\0', '  ', '}', ',', ' 1', '\u00a0'], m.b);
      return joinHeader(bytes, n, text.replace(/ *$/, '') + tail, keep);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Valid GGUF files

const ggufTypeArb = fc.constantFrom<GgmlSupportedType>('F32', 'F16', 'BF16', 'Q8_0');

const ggufTensorArb: fc.Arbitrary<GgufTensorInput> = fc
  .record({
    name: fc.oneof(fc.stringMatching(/^[a-z][a-z0-9_.]{0,30}$/), fc.constantFrom('token_embd.weight', 'blk.0.attn_q.weight', 'output_norm.weight', 'ñ')),
    type: ggufTypeArb,
    shape: fc.array(fc.integer({ min: 1, max: 4 }), { maxLength: 3 }),
    seed: fc.nat(),
  })
  .map(({ name, type, shape, seed }) => {
    // Q8_0 needs the contiguous (last) dimension to be a multiple of 32
    const s = type === 'Q8_0' ? [...shape, 32] : shape;
    const n = numel(s);
    const raw = seededBytes(n * 4, seed);
    const data = new Float32Array(raw.buffer).map((x, i) => (Number.isFinite(x) ? x : i));
    return { name, type, shape: s, data };
  });

const ggufScalarArb: fc.Arbitrary<{ type: number; value: GgufValue }> = fc.oneof(
  fc.record({ type: fc.constant<number>(GGUF_TYPE.UINT8), value: fc.nat(0xff) }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.INT8), value: fc.integer({ min: -128, max: 127 }) }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.UINT16), value: fc.nat(0xffff) }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.INT16), value: fc.integer({ min: -0x8000, max: 0x7fff }) }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.UINT32), value: fc.nat() }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.INT32), value: fc.integer() }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.FLOAT32), value: fc.float({ noNaN: true }) }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.FLOAT64), value: fc.double() }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.BOOL), value: fc.boolean() }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.STRING), value: fc.string({ maxLength: 12 }) }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.UINT64), value: fc.bigInt(0n, 2n ** 64n - 1n) }),
  fc.record({ type: fc.constant<number>(GGUF_TYPE.INT64), value: fc.bigInt(-(2n ** 63n), 2n ** 63n - 1n) }),
);

const ggufValueArb: fc.Arbitrary<{ type: number; value: GgufValue }> = fc.oneof(
  { weight: 4, arbitrary: ggufScalarArb },
  {
    weight: 1,
    arbitrary: fc.oneof(
      fc.array(fc.string({ maxLength: 6 }), { maxLength: 6 }).map((values) => ({ type: GGUF_TYPE.ARRAY as number, value: { elementType: GGUF_TYPE.STRING, values } as GgufValue })),
      fc.array(fc.float({ noNaN: true }), { maxLength: 6 }).map((values) => ({ type: GGUF_TYPE.ARRAY as number, value: { elementType: GGUF_TYPE.FLOAT32, values } as GgufValue })),
      fc.array(fc.integer(), { maxLength: 6 }).map((values) => ({ type: GGUF_TYPE.ARRAY as number, value: { elementType: GGUF_TYPE.INT32, values } as GgufValue })),
      fc
        .array(fc.array(fc.nat(0xff), { maxLength: 3 }), { maxLength: 3 })
        .map((vs) => ({ type: GGUF_TYPE.ARRAY as number, value: { elementType: GGUF_TYPE.ARRAY, values: vs.map((values) => ({ elementType: GGUF_TYPE.UINT8, values })) } as GgufValue })),
    ),
  },
);

export const validGgufArb: fc.Arbitrary<Uint8Array> = fc
  .record({
    arch: fc.constantFrom('llama', 'x'),
    alignment: fc.option(fc.constantFrom(8, 16, 32, 64), { nil: undefined }),
    kvs: fc.uniqueArray(fc.record({ key: fc.stringMatching(/^[a-z]{1,8}(\.[a-z_]{1,8}){0,2}$/), v: ggufValueArb }), { selector: (x) => x.key, maxLength: 5 }),
    tensors: fc.uniqueArray(ggufTensorArb, { selector: (t) => t.name, maxLength: 4 }),
    version: fc.constantFrom<2 | 3>(2, 3, 3),
  })
  .map(({ arch, alignment, kvs, tensors, version }) => {
    const kv: GgufKv[] = [{ key: 'general.architecture', type: GGUF_TYPE.STRING, value: arch }];
    if (alignment !== undefined) kv.push({ key: 'general.alignment', type: GGUF_TYPE.UINT32, value: alignment });
    for (const { key, v } of kvs) if (key !== 'general.architecture' && key !== 'general.alignment') kv.push({ key, type: v.type as GgufKv['type'], value: v.value });
    return serializeGguf({ kv, tensors, version });
  });

// ---------------------------------------------------------------------------------------------
// GGUF mutators

export interface GgufHints {
  /** Offsets of u64 string lengths (a length followed by that many printable bytes). */
  lengthFields: number[];
  /** End of the region that holds the header (an estimate; mutations concentrate there). */
  headerEnd: number;
}

/** Find the length fields of the strings in a GGUF header without parsing it. */
export function ggufHints(bytes: Uint8Array, scanLimit = 1 << 16): GgufHints {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const lengthFields: number[] = [];
  let headerEnd = Math.min(bytes.length, 24);
  const limit = Math.min(bytes.length - 8, scanLimit);
  for (let i = 8; i <= limit; i++) {
    const lo = dv.getUint32(i, true);
    if (lo === 0 || lo > 4096 || dv.getUint32(i + 4, true) !== 0 || i + 8 + lo > bytes.length) continue;
    let printable = true;
    for (let j = i + 8; j < i + 8 + lo; j++) {
      const c = bytes[j]!;
      if (c < 0x20 && c !== 0x0a && c !== 0x09) {
        printable = false;
        break;
      }
    }
    if (!printable) continue;
    lengthFields.push(i);
    headerEnd = Math.max(headerEnd, i + 8 + lo + 48);
    i += 7 + lo; // skip the string itself
  }
  return { lengthFields, headerEnd: Math.min(headerEnd, bytes.length) };
}

const INTERESTING_U32 = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 24, 28, 29, 30, 31, 33, 39, 40, 64, 0x7fffffff, 0x80000000, 0xffffffff, 0x47475546];

/** Apply one mutation to GGUF bytes. */
export function mutateGguf(bytes: Uint8Array, m: Mutation, hints: GgufHints): Uint8Array {
  const len = bytes.length;
  const kind = m.kind % 10;
  if (kind < 6) return byteMutation(bytes, { ...m, kind }, hints.headerEnd);
  if (len < 8) return byteMutation(bytes, m, len);
  const out = bytes.slice();
  const dv = new DataView(out.buffer);
  const size = BigInt(len);
  // hints describe the unmutated file: keep the fields still inside this one
  const fields = hints.lengthFields.filter((p) => p + 8 <= len);
  const after = (p: number) => p + 8 + Number(dv.getBigUint64(p, true));
  const u64s = [...INTERESTING_U64, size, size - 1n, size / 2n, BigInt(m.b), BigInt(m.b % 64), 2n ** 64n - BigInt(m.b % 16)];
  switch (kind) {
    case 6: {
      // a string length: longer, shorter, huge, zero
      if (!fields.length) return byteMutation(bytes, m, hints.headerEnd);
      const p = pick(fields, m.a);
      const cur = dv.getBigUint64(p, true);
      const vals = [cur + 1n, cur - 1n, cur + 8n, 0n, ...u64s];
      dv.setBigUint64(p, BigInt.asUintN(64, pick(vals, m.b)), true);
      return out;
    }
    case 7: {
      // the counts in the fixed header, or the u64 just after a string (array counts, dims, offsets)
      const spots = [8, 16, ...fields.map((p) => after(p) + 4)].filter((p) => p >= 0 && p + 8 <= len);
      if (!spots.length) return byteMutation(bytes, m, hints.headerEnd);
      dv.setBigUint64(pick(spots, m.a), BigInt.asUintN(64, pick(u64s, m.b)), true);
      return out;
    }
    case 8: {
      // a u32 after a string (value types, n_dims, element types) or the version
      const spots = [4, ...fields.map(after)].filter((p) => p >= 0 && p + 4 <= len);
      if (!spots.length) return byteMutation(bytes, m, hints.headerEnd);
      dv.setUint32(pick(spots, m.a), pick(INTERESTING_U32, m.b), true);
      return out;
    }
    default: {
      // any u32 / u64 in the header region
      const end = Math.max(0, Math.min(hints.headerEnd, len) - 8);
      const p = end ? m.a % end : 0;
      if (m.c % 2) dv.setUint32(p, pick(INTERESTING_U32, m.b), true);
      else dv.setBigUint64(p, BigInt.asUintN(64, pick(u64s, m.b)), true);
      return out;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fixture

export const GGUF_FIXTURE = 'models/stories260K/stories260K.gguf';

let fixtureCache: { bytes: Uint8Array; hints: GgufHints } | null | undefined;

/** The stories260K GGUF fixture and its hints, or undefined when the fixtures are absent. */
export function ggufFixture(): { bytes: Uint8Array; hints: GgufHints } | undefined {
  if (fixtureCache === undefined) {
    const p = fixture(GGUF_FIXTURE);
    if (existsSync(p)) {
      const bytes = new Uint8Array(readFileSync(p));
      fixtureCache = { bytes, hints: ggufHints(bytes) };
    } else {
      fixtureCache = null;
    }
  }
  return fixtureCache ?? undefined;
}

// ---------------------------------------------------------------------------------------------
// Properties

export type TargetName = 'safetensors' | 'gguf' | 'gguf-fixture';

export const mutationsArb = (max: number) => fc.array(mutationArb, { minLength: 0, maxLength: max });

/** Outcome counts of a run, for the summary. */
export type Tally = Map<Outcome, number>;

function count(t: Tally | undefined, o: Outcome): void {
  if (t) t.set(o, (t.get(o) ?? 0) + 1);
}

export function safetensorsProperty(tally?: Tally) {
  return fc.asyncProperty(validSafetensorsArb, mutationsArb(3), async (base, mutations) => {
    let bytes = base.bytes;
    for (const m of mutations) bytes = mutateSafetensors(bytes, m);
    const o = await checkSafetensorsInput(bytes, mutations.length === 0 ? base.tensors : undefined);
    count(tally, o);
  });
}

export function ggufProperty(tally?: Tally) {
  return fc.asyncProperty(validGgufArb, mutationsArb(3), async (base, mutations) => {
    let bytes = base;
    const hints = ggufHints(base);
    for (const m of mutations) bytes = mutateGguf(bytes, m, hints);
    const o = await checkGgufInput(bytes, mutations.length === 0);
    count(tally, o);
  });
}

/** Mutations of the stories260K fixture (undefined when the fixture is absent). */
export function ggufFixtureProperty(tally?: Tally) {
  const fx = ggufFixture();
  if (!fx) return undefined;
  return fc.asyncProperty(mutationsArb(2), async (mutations) => {
    let bytes = fx.bytes;
    for (const m of mutations) bytes = mutateGguf(bytes, m, fx.hints);
    const o = await checkGgufInput(bytes, mutations.length === 0);
    count(tally, o);
  });
}
