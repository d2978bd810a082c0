import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { AmalgamError } from '../src/errors.js';
import { MemoryByteReader, type ByteReader } from '../src/io/source.js';
import { f16ToF32Scalar, f32ToBf16, f32ToF16, f32ToF16Scalar, bf16ToF32, f16ToF32 } from '../src/tensor/dtype.js';
import {
  GGUF_TYPE,
  GgufFile,
  dequantizeQ8_0,
  quantizeQ8_0,
  serializeGguf,
  shortestF32,
  type GgufKv,
} from '../src/io/gguf.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';
import { Bytes, ggufStart, tensorInfo } from './helpers/gguf-build.js';

const GGUF = 'models/stories260K/stories260K.gguf';

/** Counts the bytes requested from a reader. */
class CountingReader implements ByteReader {
  requested = 0;
  largest = 0;
  constructor(private readonly inner: ByteReader) {}
  get path(): string {
    return this.inner.path;
  }
  get size(): number {
    return this.inner.size;
  }
  async read(position: number, length: number): Promise<Uint8Array> {
    this.requested += length;
    this.largest = Math.max(this.largest, length);
    return this.inner.read(position, length);
  }
  async close(): Promise<void> {
    await this.inner.close();
  }
}

async function expectError(p: Promise<unknown>, code: string, re?: RegExp, key?: string): Promise<AmalgamError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof AmalgamError, `expected an AmalgamError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    if (re) assert.match(e.message, re);
    if (key !== undefined) {
      assert.equal(e.key, key, e.message);
      assert.ok(e.message.includes(`'${key}'`), `message names the key: ${e.message}`);
    }
    assert.ok(e.message.startsWith('crafted.gguf') || e.file !== undefined, `message names the file: ${e.message}`);
    return e;
  }
  assert.fail(`expected ${code}`);
}

const open = (b: Bytes | Uint8Array) => GgufFile.fromBytes(b instanceof Bytes ? b.bytes() : b, 'crafted.gguf');

/** A valid file: one KV, one F32 tensor of 32 values. */
function minimal(): Bytes {
  const b = ggufStart(1, 1).str('general.architecture').u32(GGUF_TYPE.STRING).str('llama');
  tensorInfo(b, 't', [32], 0, 0);
  return b.align(32).zeros(128);
}

// ---------------------------------------------------------------------------------------------
// The fixture

test('stories260K.gguf: header, metadata and tensor facts', async (t) => {
  if (!haveFixtures(t, GGUF)) return;
  const counting = new CountingReader(new MemoryByteReader(await readFile(fixture(GGUF)), 'stories260K.gguf'));
  const g = await GgufFile.fromReader(counting);
  assert.ok(counting.requested <= g.size, 'header parsing reads no byte twice');
  assert.equal(g.size, 1_185_376);
  assert.equal(g.version, 3);
  assert.equal(g.kvs.length, 19);
  assert.equal(g.alignment, 32);
  assert.equal(g.infoEnd, 14_152);
  assert.equal(g.dataStart, 14_176);

  assert.equal(g.requireString('general.architecture'), 'llama');
  assert.equal(g.requireString('general.name'), 'llama');
  assert.equal(g.requireString('tokenizer.ggml.model'), 'llama');
  const ints: Record<string, number> = {
    'llama.context_length': 2048,
    'llama.embedding_length': 64,
    'llama.feed_forward_length': 172,
    'llama.block_count': 5,
    'llama.attention.head_count': 8,
    'llama.attention.head_count_kv': 4,
    'llama.rope.dimension_count': 8,
    'tokenizer.ggml.unknown_token_id': 0,
    'tokenizer.ggml.bos_token_id': 1,
    'tokenizer.ggml.eos_token_id': 2,
    'tokenizer.ggml.seperator_token_id': 4294967295,
    'tokenizer.ggml.padding_token_id': 4294967295,
  };
  for (const [k, v] of Object.entries(ints)) {
    assert.equal(g.requireInteger(k), v, k);
    assert.equal(g.kv(k)!.type, GGUF_TYPE.UINT32, `${k} is stored as UINT32`);
  }
  assert.equal(g.hasKey('general.alignment'), false);
  assert.equal(g.hasKey('llama.rope.freq_base'), false);
  const eps = g.kv('llama.attention.layer_norm_rms_epsilon')!;
  assert.equal(eps.type, GGUF_TYPE.FLOAT32);
  assert.equal(eps.value, Math.fround(1e-5));
  assert.equal(shortestF32(eps.value as number), 1e-5);

  const tokens = g.getStringArray('tokenizer.ggml.tokens')!;
  const scores = g.getNumberArray('tokenizer.ggml.scores')!;
  const types = g.getNumberArray('tokenizer.ggml.token_type')!;
  assert.equal(tokens.length, 512);
  assert.deepEqual(tokens.slice(0, 4), ['<unk>', '<s>', '</s>', '<0x00>']);
  assert.equal(tokens[258], '<0xFF>');
  assert.equal(tokens[259], '\u2581t');
  assert.equal(tokens[260], 'he');
  assert.equal(g.getArray('tokenizer.ggml.scores')!.elementType, GGUF_TYPE.FLOAT32);
  assert.equal(g.getArray('tokenizer.ggml.token_type')!.elementType, GGUF_TYPE.INT32);
  for (let id = 0; id < 512; id++) assert.equal(scores[id], id >= 259 ? -(id - 259) : 0, `score of ${id}`);
  const counts = new Map<number, number>();
  for (const ty of types) counts.set(ty, (counts.get(ty) ?? 0) + 1);
  assert.deepEqual([...counts.entries()].sort((a, b) => a[0] - b[0]), [[1, 253], [2, 1], [3, 2], [6, 256]]);
  assert.equal(types[0], 2);
  assert.deepEqual([types[1], types[2]], [3, 3]);

  assert.equal(g.metadata['tokenizer.ggml.tokens'], '[512 × string]');
  assert.equal(g.metadata['tokenizer.ggml.scores'], '[512 × f32]');
  assert.equal(g.metadata['llama.block_count'], '5');
  assert.equal(g.metadata['llama.attention.layer_norm_rms_epsilon'], '0.00001');
  assert.equal(Object.keys(g.metadata).length, 19);

  const native = g.ggmlTensors();
  assert.equal(native.length, 48);
  assert.deepEqual(native.slice(0, 12).map((x) => x.name), [
    'token_embd.weight', 'output_norm.weight', 'output.weight',
    'blk.0.attn_q.weight', 'blk.0.attn_k.weight', 'blk.0.attn_v.weight', 'blk.0.attn_output.weight', 'blk.0.attn_norm.weight',
    'blk.0.ffn_gate.weight', 'blk.0.ffn_down.weight', 'blk.0.ffn_up.weight', 'blk.0.ffn_norm.weight',
  ]);
  const byName = new Map(native.map((x) => [x.name, x]));
  assert.deepEqual(byName.get('token_embd.weight')!.dims, [64, 512]);
  assert.deepEqual(byName.get('token_embd.weight')!.shape, [512, 64]);
  assert.equal(byName.get('token_embd.weight')!.offset, 0);
  assert.equal(byName.get('output_norm.weight')!.offset, 131_072);
  assert.equal(byName.get('output.weight')!.offset, 131_328);
  assert.deepEqual(byName.get('blk.3.attn_k.weight')!.dims, [64, 32]);
  assert.deepEqual(byName.get('blk.3.ffn_down.weight')!.dims, [172, 64]);
  assert.deepEqual(byName.get('blk.3.ffn_down.weight')!.shape, [64, 172]);
  assert.ok(native.every((x) => x.typeName === 'F32' && x.type === 0 && x.offset % 32 === 0));
  assert.equal(native.reduce((a, x) => a + x.numel, 0), 292_800);
  const last = native.reduce((a, x) => (x.offset > a.offset ? x : a));
  assert.equal(last.fileOffset + last.byteSize, 1_185_376, 'tensors run to the end of the file');

  const view = g.tensors();
  assert.equal(view.length, 48);
  assert.deepEqual(g.info('blk.0.attn_q.weight'), { name: 'blk.0.attn_q.weight', dtype: 'F32', shape: [64, 64] });
  const raw = await g.readRaw('output_norm.weight');
  const file = await readFile(fixture(GGUF));
  assert.deepEqual(raw, new Uint8Array(file.subarray(14_176 + 131_072, 14_176 + 131_072 + 256)));
  const emb = await g.readRaw('token_embd.weight');
  const out = await g.readRaw('output.weight');
  assert.deepEqual(emb, out, 'output.weight is a bitwise copy of token_embd.weight');
  const norm = await g.readF32('output_norm.weight');
  assert.equal(norm.length, 64);
  assert.equal(norm[0], new DataView(raw.buffer, raw.byteOffset).getFloat32(0, true));
  await expectError(g.readRaw('nope'), 'E_MISSING', /no such tensor/, 'nope');
  await g.close();
});

// ---------------------------------------------------------------------------------------------
// Serializer round trips

test('every metadata value type round-trips through serializeGguf and GgufFile', async () => {
  const arr = (elementType: number, values: GgufKv['value'][]) => ({ elementType: elementType as GgufKv['type'], values });
  const kv: GgufKv[] = [
    { key: 'a.u8', type: GGUF_TYPE.UINT8, value: 255 },
    { key: 'a.i8', type: GGUF_TYPE.INT8, value: -128 },
    { key: 'a.u16', type: GGUF_TYPE.UINT16, value: 65535 },
    { key: 'a.i16', type: GGUF_TYPE.INT16, value: -32768 },
    { key: 'a.u32', type: GGUF_TYPE.UINT32, value: 4294967295 },
    { key: 'a.i32', type: GGUF_TYPE.INT32, value: -2147483648 },
    { key: 'a.f32', type: GGUF_TYPE.FLOAT32, value: Math.fround(0.1) },
    { key: 'a.bool_t', type: GGUF_TYPE.BOOL, value: true },
    { key: 'a.bool_f', type: GGUF_TYPE.BOOL, value: false },
    { key: 'a.str', type: GGUF_TYPE.STRING, value: 'héllo ▁ wörld 🎉' },
    { key: 'a.empty_str', type: GGUF_TYPE.STRING, value: '' },
    { key: 'a.u64_safe', type: GGUF_TYPE.UINT64, value: 2 ** 53 - 1 },
    { key: 'a.u64_big', type: GGUF_TYPE.UINT64, value: 18446744073709551615n },
    { key: 'a.i64_neg', type: GGUF_TYPE.INT64, value: -5 },
    { key: 'a.i64_big', type: GGUF_TYPE.INT64, value: -9223372036854775808n },
    { key: 'a.f64', type: GGUF_TYPE.FLOAT64, value: Math.PI },
    { key: 'arr.u8', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.UINT8, [0, 1, 255]) },
    { key: 'arr.i8', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.INT8, [-1, 127]) },
    { key: 'arr.u16', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.UINT16, [7]) },
    { key: 'arr.i16', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.INT16, [-7]) },
    { key: 'arr.u32', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.UINT32, [1, 2, 3]) },
    { key: 'arr.i32', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.INT32, [-1, 0, 1]) },
    { key: 'arr.f32', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.FLOAT32, [0.5, -2, Math.fround(1e-5)]) },
    { key: 'arr.bool', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.BOOL, [true, false]) },
    { key: 'arr.str', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.STRING, ['a', '', '▁b']) },
    { key: 'arr.u64', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.UINT64, [1, 2n ** 63n]) },
    { key: 'arr.i64', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.INT64, [-1, -(2n ** 62n)]) },
    { key: 'arr.f64', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.FLOAT64, [1e300]) },
    { key: 'arr.empty', type: GGUF_TYPE.ARRAY, value: arr(GGUF_TYPE.STRING, []) },
    {
      key: 'arr.nested',
      type: GGUF_TYPE.ARRAY,
      value: arr(GGUF_TYPE.ARRAY, [arr(GGUF_TYPE.INT32, [1, 2]), arr(GGUF_TYPE.ARRAY, [arr(GGUF_TYPE.STRING, ['deep'])])]),
    },
  ];
  const bytes = serializeGguf({ kv, tensors: [] });
  const g = await GgufFile.fromBytes(bytes, 'roundtrip.gguf');
  assert.equal(g.version, 3);
  assert.deepEqual(g.kvs, kv);
  assert.equal(g.tensors().length, 0);
  assert.equal(g.metadata['arr.nested'], '[2 × array]');
  assert.equal(g.metadata['a.u64_big'], '18446744073709551615');
  assert.equal(g.metadata['a.bool_t'], 'true');
  assert.equal(g.metadata['a.f32'], '0.1');
  assert.equal(g.getNumber('a.f64'), Math.PI);
  assert.throws(() => g.getInteger('a.u64_big'), (e: AmalgamError) => e.code === 'E_METADATA' && e.key === 'a.u64_big');
  assert.throws(() => g.getString('a.u8'), (e: AmalgamError) => e.code === 'E_METADATA' && /expected a string/.test(e.message));
  assert.throws(() => g.requireString('nope'), (e: AmalgamError) => e.code === 'E_MISSING' && e.key === 'nope');
  // Version 2 has the same layout.
  const g2 = await GgufFile.fromBytes(serializeGguf({ kv, tensors: [], version: 2 }));
  assert.equal(g2.version, 2);
  assert.deepEqual(g2.kvs, kv);
});

/** The Q8_0 reference formula, written out independently of the implementation. */
function referenceQ8_0(x: Float32Array): { d: number[]; q: number[]; deq: Float32Array } {
  const d: number[] = [];
  const q: number[] = [];
  const deq = new Float32Array(x.length);
  for (let b = 0; b < x.length / 32; b++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b * 32 + j]!));
    const dd = Math.fround(amax / 127);
    const id = dd === 0 ? 0 : Math.fround(1 / dd);
    const dBits = f32ToF16Scalar(dd);
    d.push(dBits);
    const dStored = f16ToF32Scalar(dBits);
    for (let j = 0; j < 32; j++) {
      const v = Math.fround(x[b * 32 + j]! * id);
      const r = Math.sign(v) * Math.floor(Math.abs(v) + 0.5);
      q.push(r);
      deq[b * 32 + j] = Math.fround(r * dStored);
    }
  }
  return { d, q, deq };
}

test('Q8_0 quantisation and dequantisation follow the reference formula', () => {
  const x = new Float32Array(32 * 4);
  // Block 0: amax 127 makes d = 1, so halves show the rounding: 2.5 -> 3, -2.5 -> -3, 0.5 -> 1.
  x[0] = 127;
  x[1] = 2.5;
  x[2] = -2.5;
  x[3] = 0.5;
  x[4] = -0.5;
  x[5] = -127;
  // Block 1: all zero (d = 0).
  // Blocks 2-3: pseudo-random values of mixed magnitude.
  let s = 12345;
  for (let i = 64; i < 128; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    x[i] = ((s / 2 ** 32) - 0.5) * (i < 96 ? 3 : 0.1);
  }
  const bytes = quantizeQ8_0(x);
  assert.equal(bytes.length, 4 * 34);
  const dv = new DataView(bytes.buffer);
  const ref = referenceQ8_0(x);
  for (let b = 0; b < 4; b++) {
    assert.equal(dv.getUint16(b * 34, true), ref.d[b], `d of block ${b}`);
    for (let j = 0; j < 32; j++) assert.equal(dv.getInt8(b * 34 + 2 + j), ref.q[b * 32 + j], `q[${b * 32 + j}]`);
  }
  assert.deepEqual([1, 2, 3, 4, 5].map((j) => dv.getInt8(2 + j)), [3, -3, 1, -1, -127]);
  assert.equal(dv.getUint16(34, true), 0);
  const deq = dequantizeQ8_0(bytes, x.length);
  assert.deepEqual(deq, ref.deq);
  for (let i = 64; i < 128; i++) {
    const blockMax = Math.max(...Array.from(x.subarray(i < 96 ? 64 : 96, i < 96 ? 96 : 128), Math.abs));
    // Half a step, plus the F16 rounding of d (relative 2^-11) times |q| <= 127.
    assert.ok(Math.abs(deq[i]! - x[i]!) <= (blockMax / 127) * (0.5 + 127 * 2 ** -11), `error of element ${i} is within half a step`);
  }
  assert.throws(() => quantizeQ8_0(new Float32Array(33)), (e: AmalgamError) => e.code === 'E_SHAPE');
});

test('F32, F16, BF16 and Q8_0 tensors round-trip with row-major shapes and alignment', async () => {
  const n = 2 * 64;
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = Math.fround(Math.sin(i) * 3.7);
  const kv: GgufKv[] = [{ key: 'general.alignment', type: GGUF_TYPE.UINT32, value: 64 }];
  const bytes = serializeGguf({
    kv,
    tensors: [
      { name: 'f32', type: 'F32', shape: [2, 64], data: x },
      { name: 'f16', type: 'F16', shape: [2, 64], data: x },
      { name: 'bf16', type: 'BF16', shape: [2, 64], data: x },
      { name: 'q8', type: 'Q8_0', shape: [2, 64], data: x },
      { name: 'vec', type: 'F32', shape: [3], data: new Float32Array([1, 2, 3]) },
    ],
  });
  const g = await GgufFile.fromBytes(bytes, 'types.gguf');
  assert.equal(g.alignment, 64);
  assert.equal(g.dataStart % 64, 0);
  const native = g.ggmlTensors();
  assert.deepEqual(native.map((t) => [t.name, t.typeName, t.dims, t.offset % 64, t.byteSize]), [
    ['f32', 'F32', [64, 2], 0, 512],
    ['f16', 'F16', [64, 2], 0, 256],
    ['bf16', 'BF16', [64, 2], 0, 256],
    ['q8', 'Q8_0', [64, 2], 0, 4 * 34],
    ['vec', 'F32', [3], 0, 12],
  ]);
  assert.deepEqual(g.tensors().map((t) => [t.name, t.dtype, t.shape]), [
    ['f32', 'F32', [2, 64]],
    ['f16', 'F16', [2, 64]],
    ['bf16', 'BF16', [2, 64]],
    ['q8', 'F32', [2, 64]],
    ['vec', 'F32', [3]],
  ]);
  assert.deepEqual(await g.readF32('f32'), x);
  assert.deepEqual(await g.readF32('f16'), f16ToF32(f32ToF16(x)));
  const f16raw = await g.readRaw('f16');
  assert.deepEqual(new Uint16Array(f16raw.buffer, f16raw.byteOffset, n), f32ToF16(x));
  assert.deepEqual(await g.readF32('bf16'), bf16ToF32(f32ToBf16(x)));
  const ref = referenceQ8_0(x);
  assert.deepEqual(await g.readF32('q8'), ref.deq);
  const q8raw = await g.readRaw('q8');
  assert.equal(q8raw.length, n * 4, 'readRaw of a Q8_0 tensor returns dequantised F32 bytes');
  assert.deepEqual(new Float32Array(q8raw.buffer, q8raw.byteOffset, n), ref.deq);
  assert.equal((await g.readStored('q8')).length, 4 * 34);
  assert.deepEqual(await g.readF32('vec'), new Float32Array([1, 2, 3]));
  // Re-serialising what was read gives the same file.
  const again = serializeGguf({
    kv: g.kvs,
    tensors: await Promise.all(
      g.ggmlTensors().map(async (t) => ({ name: t.name, type: t.typeName as 'F32', shape: t.shape, raw: await g.readStored(t.name) })),
    ),
  });
  assert.deepEqual(again, bytes);
});

// ---------------------------------------------------------------------------------------------
// Malformed files

test('minimal crafted file opens', async () => {
  const g = await open(minimal());
  assert.deepEqual(g.tensors(), [{ name: 't', dtype: 'F32', shape: [32] }]);
  assert.equal(g.dataStart % 32, 0);
});

test('bad magic, version 1, unknown and big-endian versions', async () => {
  const bad = minimal().bytes();
  bad[0] = 0x47;
  bad[3] = 0x00;
  await expectError(open(bad), 'E_FORMAT', /bad magic 47 47 55 00/);
  await expectError(open(new Uint8Array([1, 2])), 'E_FORMAT', /too short/);
  const e1 = await expectError(open(ggufStart(0, 0, 1)), 'E_UNSUPPORTED', /version 1 is not supported: it used 32-bit counts/, 'version');
  assert.match(e1.hint!, /version 3/);
  await expectError(open(ggufStart(0, 0, 4)), 'E_HEADER', /unknown GGUF version 4/, 'version');
  const be = await expectError(open(ggufStart(0, 0, 0x03000000)), 'E_HEADER', /unknown GGUF version/, 'version');
  assert.match(be.hint!, /big-endian/);
});

test('truncation anywhere in the header is a typed error, never a crash', async () => {
  const kv: GgufKv[] = [
    { key: 'general.architecture', type: GGUF_TYPE.STRING, value: 'llama' },
    { key: 'x.arr', type: GGUF_TYPE.ARRAY, value: { elementType: GGUF_TYPE.STRING, values: ['ab', 'cd'] } },
    { key: 'x.n', type: GGUF_TYPE.UINT64, value: 7 },
  ];
  const full = serializeGguf({ kv, tensors: [{ name: 'w', type: 'F32', shape: [2, 32], data: new Float32Array(64) }] });
  const g = await GgufFile.fromBytes(full);
  for (let cut = 0; cut < full.length; cut++) {
    const e = await GgufFile.fromBytes(full.subarray(0, cut), 'crafted.gguf').then(
      () => undefined,
      (err: unknown) => err,
    );
    assert.ok(e instanceof AmalgamError, `cut at ${cut}: ${String(e)}`);
    assert.ok(['E_FORMAT', 'E_HEADER', 'E_OFFSETS'].includes(e.code), `cut at ${cut}: ${e.code}`);
    // Past the point where the counts alone rule the file out, errors name the key or tensor.
    if (cut >= 24 + 3 * 13 + 24 && cut < g.infoEnd) assert.ok(e.key !== undefined, `cut at ${cut} names the key or tensor: ${e.message}`);
  }
  // In the middle of a value: the key is named.
  const cutInArray = Buffer.from(full).indexOf('cd');
  await expectError(GgufFile.fromBytes(full.subarray(0, cutInArray + 1), 'crafted.gguf'), 'E_HEADER', /string value of x.arr\[1\] claims 2 bytes but only 1 bytes remain/, 'x.arr[1]');
  // In the tensor data: the tensor is named.
  await expectError(GgufFile.fromBytes(full.subarray(0, full.length - 1), 'crafted.gguf'), 'E_OFFSETS', /runs past the end/, 'w');
});

test('absurd counts and lengths are rejected before anything is allocated', async () => {
  const cases: [string, Bytes, string, RegExp, string | undefined][] = [
    ['tensor count', ggufStart(2n ** 62n, 0), 'E_HEADER', /claims 4611686018427387904 tensors/, undefined],
    ['kv count', ggufStart(0, 2n ** 64n - 1n), 'E_HEADER', /metadata entries, which cannot fit/, undefined],
    ['key length', ggufStart(0, 1).u64(2n ** 50n).zeros(64), 'E_METADATA', /is 1125899906842624 bytes long/, '#0'],
    ['key length in range', ggufStart(0, 1).u64(60_000).zeros(64), 'E_HEADER', /claims 60000 bytes but only 64 bytes remain/, '#0'],
    ['tensor name length', ggufStart(1, 0).u64(2n ** 50n).zeros(64), 'E_HEADER', /is 1125899906842624 bytes long/, 'tensor #0'],
    ['string length', ggufStart(0, 1).str('k').u32(GGUF_TYPE.STRING).u64(10_000_000), 'E_HEADER', /claims 10000000 bytes/, 'k'],
    ['array count', ggufStart(0, 1).str('k').u32(GGUF_TYPE.ARRAY).u32(GGUF_TYPE.UINT64).u64(2n ** 40n), 'E_HEADER', /array claims 1099511627776 UINT64 elements/, 'k'],
    ['string array count', ggufStart(0, 1).str('k').u32(GGUF_TYPE.ARRAY).u32(GGUF_TYPE.STRING).u64(1000).zeros(100), 'E_HEADER', /array claims 1000 STRING elements/, 'k'],
  ];
  for (const [what, b, code, re, key] of cases) {
    const counting = new CountingReader(new MemoryByteReader(b.bytes(), 'crafted.gguf'));
    await expectError(GgufFile.fromReader(counting), code, re, key);
    assert.ok(counting.requested <= counting.size, `${what}: read ${counting.requested} of ${counting.size} bytes`);
  }
});

test('strings that are not UTF-8, bools other than 0/1, unknown value types', async () => {
  const badKey = ggufStart(0, 1).str(new Uint8Array([0x61, 0xff])).u32(GGUF_TYPE.UINT8).u8(0);
  await expectError(open(badKey), 'E_METADATA', /key of metadata entry #0 is not valid UTF-8/, '#0');
  const badVal = ggufStart(0, 1).str('k.s').u32(GGUF_TYPE.STRING).str(new Uint8Array([0xc3, 0x28]));
  await expectError(open(badVal), 'E_METADATA', /not valid UTF-8/, 'k.s');
  const badName = ggufStart(1, 0).str(new Uint8Array([0xe2, 0x82])).u32(1).u64(32).u32(0).u64(0);
  await expectError(open(badName), 'E_HEADER', /name of tensor #0 is not valid UTF-8/, 'tensor #0');
  await expectError(open(ggufStart(0, 1).str('k.b').u32(GGUF_TYPE.BOOL).u8(2)), 'E_METADATA', /bool value is 2/, 'k.b');
  const arrBool = ggufStart(0, 1).str('k.ab').u32(GGUF_TYPE.ARRAY).u32(GGUF_TYPE.BOOL).u64(2).u8(1).u8(7);
  await expectError(open(arrBool), 'E_METADATA', /bool value is 7/, 'k.ab[1]');
  await expectError(open(ggufStart(0, 1).str('k.t').u32(13).u32(0)), 'E_METADATA', /unknown value type 13/, 'k.t');
  const arrType = ggufStart(0, 1).str('k.at').u32(GGUF_TYPE.ARRAY).u32(99).u64(0);
  await expectError(open(arrType), 'E_METADATA', /unknown array element type 99/, 'k.at');
});

test('nesting depth, key and name lengths, alignment', async () => {
  const deep = ggufStart(0, 1).str('k.deep').u32(GGUF_TYPE.ARRAY);
  for (let i = 0; i < 12; i++) deep.u32(GGUF_TYPE.ARRAY).u64(1);
  deep.u32(GGUF_TYPE.UINT8).u64(0).zeros(16);
  await expectError(open(deep), 'E_METADATA', /nested more than 8 deep/);
  const longKey = ggufStart(0, 1).str('k'.repeat(65_536)).u32(GGUF_TYPE.UINT8).u8(0);
  await expectError(open(longKey), 'E_METADATA', /65536 bytes long \(at most 65535/, '#0');
  const longName = ggufStart(1, 0);
  tensorInfo(longName, 'n'.repeat(65), [32], 0, 0);
  await expectError(open(longName.align(32).zeros(128)), 'E_HEADER', /65 bytes long \(at most 64/, 'tensor #0');
  for (const [type, v] of [[GGUF_TYPE.UINT32, 12], [GGUF_TYPE.UINT32, 0]] as const) {
    const b = ggufStart(0, 1).str('general.alignment').u32(type).u32(v);
    await expectError(open(b), 'E_METADATA', /multiple of 8/, 'general.alignment');
  }
  const strAlign = ggufStart(0, 1).str('general.alignment').u32(GGUF_TYPE.STRING).str('64');
  await expectError(open(strAlign), 'E_METADATA', /multiple of 8/, 'general.alignment');
});

test('duplicate keys and tensor names', async () => {
  const dupKey = ggufStart(0, 2).str('a.k').u32(GGUF_TYPE.UINT8).u8(1).str('a.k').u32(GGUF_TYPE.UINT8).u8(2);
  await expectError(open(dupKey), 'E_DUPLICATE', /metadata key appears more than once/, 'a.k');
  const dupName = ggufStart(2, 0);
  tensorInfo(dupName, 'w', [32], 0, 0);
  tensorInfo(dupName, 'w', [32], 0, 128);
  await expectError(open(dupName.align(32).zeros(256)), 'E_DUPLICATE', /tensor name appears more than once/, 'w');
  assert.throws(
    () => serializeGguf({ kv: [], tensors: [{ name: 'a', type: 'F32', shape: [1], data: new Float32Array(1) }, { name: 'a', type: 'F32', shape: [1], data: new Float32Array(1) }] }),
    (e: AmalgamError) => e.code === 'E_DUPLICATE',
  );
});

test('tensor types: unknown ids, unsupported quantisations, Q8_0 block constraint', async () => {
  const withType = (type: number, dims: number[], dataBytes = 4096) => {
    const b = ggufStart(1, 0);
    tensorInfo(b, 'blk.0.w', dims, type, 0);
    return b.align(32).zeros(dataBytes);
  };
  await expectError(open(withType(4, [32])), 'E_DTYPE', /unknown ggml type id 4/, 'blk.0.w');
  await expectError(open(withType(31, [32])), 'E_DTYPE', /unknown ggml type id 31/, 'blk.0.w');
  await expectError(open(withType(200, [32])), 'E_DTYPE', /unknown ggml type id 200/, 'blk.0.w');
  await expectError(open(withType(12, [256])), 'E_UNSUPPORTED', /tensor type Q4_K \(ggml type 12\) is not supported/, 'blk.0.w');
  await expectError(open(withType(2, [32])), 'E_UNSUPPORTED', /Q4_0/, 'blk.0.w');
  await expectError(open(withType(28, [4])), 'E_UNSUPPORTED', /F64/, 'blk.0.w');
  await expectError(open(withType(39, [32])), 'E_UNSUPPORTED', /MXFP4/, 'blk.0.w');
  await expectError(open(withType(8, [48, 2])), 'E_SHAPE', /Q8_0 needs ne0 to be a multiple of 32/, 'blk.0.w');
  // Inspection mode lists unsupported tensors natively, but they cannot be read.
  const g = await GgufFile.fromBytes(withType(12, [256, 2]).bytes(), 'crafted.gguf', { allowUnsupportedTypes: true });
  assert.deepEqual(g.ggmlTensors().map((t) => [t.name, t.typeName, t.byteSize]), [['blk.0.w', 'Q4_K', 288]]);
  assert.deepEqual(g.tensors(), []);
  assert.equal(g.has('blk.0.w'), false);
  await expectError(g.readRaw('blk.0.w'), 'E_UNSUPPORTED', /Q4_K/, 'blk.0.w');
  assert.equal((await g.readStored('blk.0.w')).length, 288);
});

test('dimensions: too many, absurd, overflowing', async () => {
  const b1 = ggufStart(1, 0);
  tensorInfo(b1, 'w5', [1, 1, 1, 1, 1], 0, 0);
  await expectError(open(b1.align(32).zeros(32)), 'E_SHAPE', /5 dimensions \(GGUF allows at most 4\)/, 'w5');
  const b2 = ggufStart(1, 0);
  tensorInfo(b2, 'huge', [2n ** 60n], 0, 0);
  await expectError(open(b2.align(32).zeros(32)), 'E_SHAPE', /dimension 0 is 1152921504606846976, an absurd size/, 'huge');
  const b3 = ggufStart(1, 0);
  tensorInfo(b3, 'product', [2 ** 30, 2 ** 30], 0, 0);
  await expectError(open(b3.align(32).zeros(32)), 'E_SHAPE', /overflow/, 'product');
  const b4 = ggufStart(1, 0);
  tensorInfo(b4, 'big', [2 ** 20, 2 ** 10], 0, 0);
  await expectError(open(b4.align(32).zeros(32)), 'E_OFFSETS', /runs past the end of the data section/, 'big');
});

test('offsets: misaligned, out of range, overlapping', async () => {
  const mk = (offsets: (number | bigint)[], dataBytes: number) => {
    const b = ggufStart(offsets.length, 0);
    offsets.forEach((o, i) => tensorInfo(b, `t${i}`, [32], 0, o));
    return b.align(32).zeros(dataBytes);
  };
  await expectError(open(mk([0, 100], 256)), 'E_OFFSETS', /offset 100 is not a multiple of the alignment 32/, 't1');
  await expectError(open(mk([0, 256], 256)), 'E_OFFSETS', /data \[256, 384\) runs past the end of the data section \(256 bytes\)/, 't1');
  await expectError(open(mk([2n ** 62n], 256)), 'E_OFFSETS', /beyond any file/, 't0');
  await expectError(open(mk([0, 64], 256)), 'E_OFFSETS', /overlaps tensor 't0'/, 't1');
  await expectError(open(mk([128, 64, 0], 256)), 'E_OFFSETS', /data \[64, 192\) overlaps tensor 't2' \[0, 128\)/, 't1');
  const ok = await open(mk([0, 128], 256));
  assert.equal(ok.tensors().length, 2);
});
