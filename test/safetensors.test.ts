/**
 * safetensors writer -> reader round trips (formats.md §2): every dtype bit-exact, 0-d and empty
 * tensors, metadata, awkward names, the reference layout, sharded output read back through its
 * index, and the writers' atomicity and misuse errors.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import {
  INDEX_FILE,
  SafetensorsFile,
  SafetensorsFileWriter,
  ShardedSafetensors,
  ShardedSafetensorsWriter,
  layoutSafetensors,
  openSafetensors,
  parseHeaderBytes,
  parseHeaderLength,
  serializeSafetensors,
  writeSafetensorsFile,
  type TensorData,
  type TensorSpec,
} from '../src/io/safetensors.js';
import { byteSize, dtypeAlignment, f16BitsToF32Bits, f16ToF32Scalar, bf16ToF32Scalar, numel, type DType } from '../src/tensor/dtype.js';

const root = await mkdtemp(join(tmpdir(), 'amalgam-st-'));
after(() => rm(root, { recursive: true, force: true }));
let dirCount = 0;
async function freshDir(): Promise<string> {
  const d = join(root, `d${dirCount++}`);
  await mkdir(d);
  return d;
}

/** Deterministic pseudo-random bytes. */
function randomBytesSeeded(n: number, seed: number): Uint8Array {
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

function makeTensor(name: string, dtype: DType, shape: number[], seed: number): TensorData {
  const n = byteSize(dtype, numel(shape));
  assert.ok(n !== undefined, `${dtype} ${JSON.stringify(shape)}`);
  const data = randomBytesSeeded(n, seed);
  if (dtype === 'BOOL') for (let i = 0; i < data.length; i++) data[i]! &= 1;
  return { name, dtype, shape, data };
}

function isCode(code: string, extra?: (e: AmalgamError) => boolean) {
  return (e: unknown) => {
    assert.ok(e instanceof AmalgamError, `expected an AmalgamError, got ${e}`);
    assert.equal(e.code, code, e.message);
    if (extra) assert.ok(extra(e), `unexpected error details: ${e.message} (key ${e.key}, file ${e.file})`);
    return true;
  };
}

/**
 * An independent check of formats.md §2.1-2.3 on written bytes (JSON.parse, no amalgam code):
 * returns the header's keys in file order and the parsed header.
 */
function independentCheck(bytes: Uint8Array): { keys: string[]; header: Record<string, any> } {
  assert.ok(bytes.length >= 8);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(dv.getBigUint64(0, true));
  assert.equal(n % 8, 0, 'header length is a multiple of 8');
  assert.ok(8 + n <= bytes.length);
  const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, 8 + n));
  assert.equal(text[0], '{');
  const trimmed = text.replace(/ +$/, '');
  assert.ok(text.length - trimmed.length < 8, 'padding is shorter than 8 spaces');
  assert.ok(!/\s/.test(trimmed.replace(/"(?:[^"\\]|\\.)*"/g, '""')), 'the JSON is compact');
  const header = JSON.parse(trimmed) as Record<string, any>;
  // File order of top-level keys: a key followed by ':' at depth 1.
  const keys: string[] = [];
  let depth = 0;
  const re = /"(?:[^"\\]|\\.)*"|[{}[\]]/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(trimmed))) {
    const tok = m[0];
    if (tok === '{' || tok === '[') depth++;
    else if (tok === '}' || tok === ']') depth--;
    else if (depth === 1 && trimmed[re.lastIndex] === ':') keys.push(JSON.parse(tok));
  }
  const tensors = keys.filter((k) => k !== '__metadata__').map((k) => ({ name: k, ...header[k] }));
  let cursor = 0;
  for (const t of [...tensors].sort((a, b) => a.data_offsets[0] - b.data_offsets[0] || a.data_offsets[1] - b.data_offsets[1])) {
    assert.equal(t.data_offsets[0], cursor, `${t.name} starts where the previous tensor ends`);
    assert.equal(t.data_offsets[1] - t.data_offsets[0], byteSize(t.dtype, numel(t.shape)));
    cursor = t.data_offsets[1];
  }
  assert.equal(8 + n + cursor, bytes.length, '8 + N + data == file size');
  return { keys, header };
}

/** Reference order: alignment descending, then name (code-unit order). */
function referenceOrder(specs: readonly TensorSpec[]): string[] {
  return specs
    .slice()
    .sort((a, b) => dtypeAlignment(b.dtype) - dtypeAlignment(a.dtype) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    .map((t) => t.name);
}

async function assertSameTensors(src: { readRaw(n: string): Promise<Uint8Array>; info(n: string): { dtype: DType; shape: number[] } }, tensors: readonly TensorData[]): Promise<void> {
  for (const t of tensors) {
    const info = src.info(t.name);
    assert.equal(info.dtype, t.dtype, t.name);
    assert.deepEqual(info.shape, t.shape, t.name);
    const raw = await src.readRaw(t.name);
    assert.equal(raw.length, t.data.length, t.name);
    assert.ok(Buffer.from(raw).equals(Buffer.from(t.data)), `bytes of ${t.name} differ`);
  }
}

// ---------------------------------------------------------------------------------------------
// Round trips

const ALL_DTYPES: DType[] = ['F64', 'F32', 'F16', 'BF16', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL', 'U16', 'U32', 'U64', 'C64', 'F8_E4M3', 'F8_E5M2', 'F4'];

test('write -> read is bit-exact for every dtype, 0-d and empty tensors', async () => {
  const dir = await freshDir();
  const tensors: TensorData[] = [];
  let seed = 1;
  for (const dt of ALL_DTYPES) {
    const shapes = dt === 'F4' ? [[6], [2, 4], [0]] : [[], [0], [3, 0, 2], [7], [2, 3, 5]];
    for (const shape of shapes) tensors.push(makeTensor(`${dt.toLowerCase()}.${shape.join('x') || 'scalar'}`, dt, shape, seed++));
  }
  const path = join(dir, 'all.safetensors');
  const metadata = { format: 'pt', note: 'héllo "quoted" \\ back', '': 'empty key', empty: '' };
  await writeSafetensorsFile(path, tensors, metadata);
  const bytes = new Uint8Array(await readFile(path));
  independentCheck(bytes);
  assert.ok(Buffer.from(bytes).equals(Buffer.from(serializeSafetensors(tensors, metadata))), 'file and in-memory serialisation agree');

  const f = await SafetensorsFile.open(path);
  try {
    assert.deepEqual({ ...f.metadata }, metadata);
    assert.equal(f.tensors().length, tensors.length);
    assert.deepEqual(new Set(f.tensors().map((t) => t.name)), new Set(tensors.map((t) => t.name)));
    await assertSameTensors(f, tensors);
    for (const t of tensors) {
      assert.ok(f.has(t.name));
      if (t.shape.length === 0) assert.equal((await f.readRaw(t.name)).length, byteSize(t.dtype, 1));
      if (numel(t.shape) === 0) assert.equal((await f.readRaw(t.name)).length, 0);
    }
    assert.equal(f.has('nope'), false);
    assert.throws(() => f.info('nope'), isCode('E_MISSING', (e) => e.key === 'nope' && e.file === path));
    await assert.rejects(f.readRaw('nope'), isCode('E_MISSING'));
  } finally {
    await f.close();
  }

  // The same bytes through memory.
  const m = await SafetensorsFile.fromBytes(bytes, 'mem');
  await assertSameTensors(m, tensors);
});

test('an empty file (no tensors) round-trips', async () => {
  const dir = await freshDir();
  const path = join(dir, 'empty.safetensors');
  await writeSafetensorsFile(path, []);
  const bytes = new Uint8Array(await readFile(path));
  independentCheck(bytes);
  const f = await SafetensorsFile.open(path);
  assert.deepEqual(f.tensors(), []);
  assert.deepEqual({ ...f.metadata }, { format: 'pt' });
  await f.close();
  const noMeta = serializeSafetensors([]);
  assert.equal(new TextDecoder().decode(noMeta.subarray(8)).trim(), '{}');
  assert.equal((await SafetensorsFile.fromBytes(noMeta)).tensors().length, 0);
});

test('readF32 converts F32/F16/BF16/F64 and rejects other dtypes with E_DTYPE', async () => {
  const values = Float32Array.from([0, -0, 1, -2.5, 0.1, 65504, 1e-6, Infinity, -Infinity, NaN, 3.0e38]);
  const dir = await freshDir();
  const path = join(dir, 'f.safetensors');
  const specs: TensorSpec[] = (['F32', 'F16', 'BF16', 'F64'] as const).map((dt) => ({ name: dt, dtype: dt, shape: [values.length] }));
  specs.push({ name: 'int', dtype: 'I32', shape: [2] });
  const w = await SafetensorsFileWriter.create(path, specs);
  for (const dt of ['F32', 'F16', 'BF16', 'F64']) await w.writeF32(dt, values);
  await w.write('int', new Uint8Array(8));
  await assert.rejects(w.writeF32('int', new Float32Array(2)), isCode('E_DTYPE'));
  await w.finish();
  const f = await SafetensorsFile.open(path);
  try {
    assert.deepEqual([...(await f.readF32('F32'))], [...values]);
    assert.deepEqual([...(await f.readF32('F64'))], [...values]);
    const f16 = await f.readF32('F16');
    const bf16 = await f.readF32('BF16');
    const raw16 = await f.readRaw('F16');
    const rawB = await f.readRaw('BF16');
    const d16 = new DataView(raw16.buffer, raw16.byteOffset);
    const dB = new DataView(rawB.buffer, rawB.byteOffset);
    for (let i = 0; i < values.length; i++) {
      assert.ok(Object.is(f16[i], f16ToF32Scalar(d16.getUint16(i * 2, true))));
      assert.ok(Object.is(bf16[i], bf16ToF32Scalar(dB.getUint16(i * 2, true))));
    }
    assert.deepEqual([...f16].slice(0, 6), [0, -0, 1, -2.5, f16ToF32Scalar(0x2e66), 65504]);
    assert.equal(bf16[2], 1);
    assert.ok(Number.isNaN(f16[9]) && Number.isNaN(bf16[9]));
    assert.equal(f16[10], Infinity, 'F16 overflow gives Inf');
    await assert.rejects(f.readF32('int'), isCode('E_DTYPE', (e) => e.key === 'int' && e.message.includes('I32')));
  } finally {
    await f.close();
  }
});

test('readF32 of large F16/BF16 tensors (several read chunks, odd lengths) matches element-wise conversion', async () => {
  const dir = await freshDir();
  const path = join(dir, 'big.safetensors');
  const tensors = [
    makeTensor('bf16', 'BF16', [1_300_001], 11),
    makeTensor('f16', 'F16', [3, 433_333], 12),
    makeTensor('pad', 'U8', [3], 13), // shifts nothing (sorted last) but keeps the file irregular
    makeTensor('one', 'BF16', [], 14),
  ];
  await writeSafetensorsFile(path, tensors);
  for (const src of [await SafetensorsFile.open(path), await SafetensorsFile.fromBytes(new Uint8Array(await readFile(path)))]) {
    try {
      for (const t of tensors.filter((x) => x.dtype !== 'U8')) {
        const got = await src.readF32(t.name);
        const n = numel(t.shape);
        assert.equal(got.length, n);
        const bits = new Uint32Array(got.buffer, got.byteOffset, n);
        const dv = new DataView(t.data.buffer, t.data.byteOffset, t.data.byteLength);
        for (let i = 0; i < n; i++) {
          const h = dv.getUint16(i * 2, true);
          const want = t.dtype === 'BF16' ? (h << 16) >>> 0 : f16BitsToF32Bits(h);
          if (bits[i] !== want) assert.fail(`${t.name}[${i}]: got ${bits[i]!.toString(16)}, expected ${want.toString(16)}`);
        }
      }
    } finally {
      await src.close();
    }
  }
});

test('the reference layout: padded header, alignment-desc then name order, offsets tile the buffer', () => {
  const tensors: TensorData[] = [
    makeTensor('b', 'U8', [3], 1),
    makeTensor('a', 'BF16', [5], 2),
    makeTensor('z', 'F64', [1], 3),
    makeTensor('c', 'F32', [], 4),
    makeTensor('e', 'BOOL', [2], 5),
    makeTensor('d', 'I64', [0], 6),
    makeTensor('m', 'F16', [2, 2], 7),
    makeTensor('k', 'I32', [3], 8),
    makeTensor('f', 'F4', [2], 9),
  ];
  const metadatas: (Record<string, string> | undefined)[] = [undefined, { format: 'pt' }, { format: 'pt', x: 'yz' }];
  for (const metadata of metadatas) {
    const bytes = serializeSafetensors(tensors, metadata);
    const { keys, header } = independentCheck(bytes);
    if (metadata) {
      assert.equal(keys[0], '__metadata__', 'metadata comes first');
      assert.deepEqual(header['__metadata__'], metadata);
    } else {
      assert.ok(!keys.includes('__metadata__'));
    }
    const order = keys.filter((k) => k !== '__metadata__');
    assert.deepEqual(order, ['d', 'z', 'c', 'k', 'a', 'm', 'b', 'e', 'f']);
    assert.deepEqual(order, referenceOrder(tensors));
    // offsets increase in file order and every tensor is aligned to its element size
    let cursor = 0;
    const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    for (const name of order) {
      const [b, e] = header[name].data_offsets as [number, number];
      assert.equal(b, cursor);
      const t = tensors.find((x) => x.name === name)!;
      assert.equal((8 + n + b) % dtypeAlignment(t.dtype), 0, `${name} is aligned`);
      assert.ok(Buffer.from(bytes.subarray(8 + n + b, 8 + n + e)).equals(Buffer.from(t.data)));
      cursor = e;
    }
  }
  // header lengths for every padding remainder
  for (let len = 1; len <= 16; len++) {
    const bytes = serializeSafetensors([makeTensor('x'.repeat(len), 'U8', [1], len)]);
    const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    assert.equal(n % 8, 0);
    assert.equal(parseHeaderLength(bytes.subarray(0, 8), bytes.length, 'x'), n);
    parseHeaderBytes(bytes.subarray(8, 8 + n), bytes.length, 'x');
  }
});

test('names that look like integers keep file order; unicode names round-trip', async () => {
  const names = ['10', '9', '2', '0', '100', '01', '-1', '1e3', '4294967295', '4294967294', 'a', '__proto__', 'constructor', 'toString', 'ñ', '模型.权重', 'emoji 🤖', 'tab\tquote"back\\slash', '\u0000nul', '\ud83e', ''];
  const tensors = names.map((n, i) => makeTensor(n, 'U8', [2], 100 + i));
  const expected = referenceOrder(tensors);
  assert.deepEqual(expected, names.slice().sort());
  assert.deepEqual(expected.slice(0, 10), ['', '\u0000nul', '-1', '0', '01', '10', '100', '1e3', '2', '4294967294'], 'string order, not numeric order');

  const dir = await freshDir();
  const path = join(dir, 'names.safetensors');
  await writeSafetensorsFile(path, tensors, { format: 'pt', '1': 'one', '0': 'zero', z: 'last' });
  const bytes = new Uint8Array(await readFile(path));
  const { keys } = independentCheck(bytes);
  assert.deepEqual(keys.slice(1), expected);

  const f = await SafetensorsFile.open(path);
  try {
    assert.deepEqual(f.tensors().map((t) => t.name), expected, 'tensors() lists the header order');
    assert.deepEqual(f.header.entries.map((e) => e.name), expected);
    assert.deepEqual(Object.keys(f.metadata).sort(), ['0', '1', 'format', 'z']);
    assert.equal(f.metadata['0'], 'zero');
    await assertSameTensors(f, tensors);
    assert.equal(f.has('__proto__'), true);
    assert.equal(f.has('hasOwnProperty'), false);
  } finally {
    await f.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Sharded output

test('sharded output: several shards, sorted index with total_size, oversize tensor alone, read back bit-exact', async () => {
  const dir = await freshDir();
  const tensors: TensorData[] = [
    makeTensor('model.embed_tokens.weight', 'BF16', [16, 8], 1), // 256 bytes
    makeTensor('model.layers.0.mlp.weight', 'F32', [10], 2), // 40
    makeTensor('model.layers.0.norm.weight', 'F16', [8], 3), // 16
    makeTensor('huge', 'F32', [100], 4), // 400: bigger than the budget
    makeTensor('model.layers.1.mlp.weight', 'F32', [10], 5), // 40
    makeTensor('10', 'U8', [3], 6),
    makeTensor('9', 'I64', [], 7),
    makeTensor('scalar', 'F64', [], 8),
    makeTensor('empty', 'F32', [0, 4], 9),
    makeTensor('model.norm.weight', 'BF16', [8], 10),
  ];
  const budget = 64;
  const w = await ShardedSafetensorsWriter.create(dir, tensors, { maxShardBytes: budget, indexMetadata: { amalgam_version: '0.1.0' } });
  // nothing under a final name yet
  assert.ok((await readdir(dir)).every((f) => f.startsWith('.')));
  // write in reverse order, some through writeF32
  for (const t of [...tensors].reverse()) {
    if (t.dtype === 'F32') await w.writeF32(t.name, new Float32Array(t.data.slice().buffer));
    else await w.write(t.name, t.data);
  }
  assert.ok((await readdir(dir)).every((f) => f.startsWith('.')), 'no final name before finish()');
  const res = await w.finish();
  const total = tensors.reduce((s, t) => s + t.data.length, 0);
  assert.equal(res.totalSize, total);
  assert.ok(res.files.length >= 4, `expected several shards, got ${res.files.length}`);
  res.files.forEach((f, i) => assert.equal(f, `model-${String(i + 1).padStart(5, '0')}-of-${String(res.files.length).padStart(5, '0')}.safetensors`));
  assert.equal(res.indexFile, join(dir, INDEX_FILE));
  assert.deepEqual((await readdir(dir)).sort(), [...res.files, INDEX_FILE].sort(), 'no temporary files left');

  const indexText = await readFile(res.indexFile!, 'utf8');
  const index = JSON.parse(indexText);
  assert.equal(index.metadata.total_size, total);
  assert.equal(index.metadata.amalgam_version, '0.1.0');
  const wmText = indexText.slice(indexText.indexOf('"weight_map"'));
  const wmKeys = [...wmText.matchAll(/^ {4}("(?:[^"\\]|\\.)*"):/gm)].map((m) => JSON.parse(m[1]!));
  assert.deepEqual(wmKeys, tensors.map((t) => t.name).sort(), 'weight_map is sorted by name in the file');
  assert.deepEqual(Object.keys(index.weight_map).sort(), wmKeys);

  // every shard passes the full validation and holds exactly what the index says
  let shardBytes = 0;
  for (const file of res.files) {
    const bytes = new Uint8Array(await readFile(join(dir, file)));
    independentCheck(bytes);
    const f = await SafetensorsFile.open(join(dir, file));
    try {
      assert.deepEqual({ ...f.metadata }, { format: 'pt' });
      const names = f.tensors().map((t) => t.name);
      assert.deepEqual(names.slice().sort(), wmKeys.filter((k) => index.weight_map[k] === file));
      const data = tensors.filter((t) => names.includes(t.name)).reduce((s, t) => s + t.data.length, 0);
      assert.ok(data <= budget || names.length === 1, `${file} exceeds the budget with ${names.length} tensors`);
      shardBytes += data;
    } finally {
      await f.close();
    }
  }
  assert.equal(shardBytes, total);
  assert.deepEqual(Object.entries(index.weight_map).filter(([, s]) => s === index.weight_map['huge']).map(([k]) => k), ['huge'], 'the oversize tensor is alone in its shard');

  for (const path of [dir, res.indexFile!]) {
    const src = await openSafetensors(path);
    try {
      assert.ok(src instanceof ShardedSafetensors);
      assert.deepEqual(src.tensors().map((t) => t.name), tensors.map((t) => t.name).sort());
      assert.equal(src.metadata['total_size'], String(total));
      await assertSameTensors(src, tensors);
      assert.deepEqual([...(await src.readF32('model.layers.0.mlp.weight'))], [...new Float32Array(tensors[1]!.data.slice().buffer)]);
      assert.throws(() => src.info('missing'), isCode('E_MISSING', (e) => e.key === 'missing'));
    } finally {
      await src.close();
    }
  }
});

test('sharded output that fits one shard: model.safetensors, no index unless asked', async () => {
  const tensors = [makeTensor('a', 'F32', [4], 1), makeTensor('b', 'BF16', [3], 2)];
  const dir = await freshDir();
  const w = await ShardedSafetensorsWriter.create(dir, tensors);
  for (const t of tensors) await w.write(t.name, t.data);
  const res = await w.finish();
  assert.deepEqual(res.files, ['model.safetensors']);
  assert.equal(res.indexFile, undefined);
  assert.deepEqual(await readdir(dir), ['model.safetensors']);
  const src = await openSafetensors(dir);
  assert.ok(src instanceof SafetensorsFile);
  await assertSameTensors(src, tensors);
  await src.close();
  await assert.rejects(w.finish(), isCode('E_USAGE'));

  const dir2 = await freshDir();
  const w2 = await ShardedSafetensorsWriter.create(dir2, tensors, { alwaysIndex: true, prefix: 'out' });
  for (const t of tensors) await w2.write(t.name, t.data);
  const res2 = await w2.finish();
  assert.deepEqual(res2.files, ['out.safetensors']);
  assert.equal(res2.indexFile, join(dir2, 'out.safetensors.index.json'));
  const src2 = await openSafetensors(res2.indexFile!);
  await assertSameTensors(src2, tensors);
  await src2.close();

  // an output with no tensors at all
  const dir3 = await freshDir();
  const w3 = await ShardedSafetensorsWriter.create(dir3, [], { alwaysIndex: true });
  const res3 = await w3.finish();
  assert.equal(res3.totalSize, 0);
  const idx = JSON.parse(await readFile(res3.indexFile!, 'utf8'));
  assert.deepEqual(idx, { metadata: { total_size: 0 }, weight_map: {} });
});

test('openSafetensors on a folder with neither index nor model.safetensors is E_MISSING', async () => {
  const dir = await freshDir();
  await assert.rejects(openSafetensors(dir), isCode('E_MISSING', (e) => e.file === dir));
  await assert.rejects(openSafetensors(join(dir, 'nope.safetensors')), isCode('E_IO', (e) => e.file === join(dir, 'nope.safetensors')));
});

// ---------------------------------------------------------------------------------------------
// Atomicity and misuse

test('SafetensorsFileWriter: no final file before finish(), abort() leaves nothing, misuse is an error', async () => {
  const dir = await freshDir();
  const path = join(dir, 'out.safetensors');
  const specs: TensorSpec[] = [
    { name: 'a', dtype: 'F32', shape: [2] },
    { name: 'b', dtype: 'U8', shape: [3] },
  ];
  const w = await SafetensorsFileWriter.create(path, specs);
  assert.equal(w.totalBytes, layoutSafetensors(specs, { format: 'pt' }).header.length + 11);
  const before = await readdir(dir);
  assert.equal(before.length, 1);
  assert.ok(before[0]!.startsWith('.out.safetensors.tmp-'), before[0]);
  await w.write('a', new Uint8Array(8));
  await assert.rejects(w.write('a', new Uint8Array(8)), isCode('E_DUPLICATE', (e) => e.key === 'a' && e.file === path));
  await assert.rejects(w.write('b', new Uint8Array(4)), isCode('E_SHAPE', (e) => e.key === 'b' && /4 bytes/.test(e.message)));
  await assert.rejects(w.write('c', new Uint8Array(1)), isCode('E_USAGE', (e) => e.key === 'c'));
  await assert.rejects(w.finish(), isCode('E_MISSING', (e) => e.message.includes('b') && e.file === path));
  assert.deepEqual(await readdir(dir), before, 'no final name after a failed finish');
  await w.abort();
  assert.deepEqual(await readdir(dir), [], 'abort removes the temporary file');
  await w.abort(); // idempotent

  // a complete write, then abort() after finish() keeps the file
  const w2 = await SafetensorsFileWriter.create(path, specs);
  await w2.write('b', Uint8Array.from([1, 2, 3]));
  await w2.write('a', new Uint8Array(8));
  await w2.finish();
  await w2.finish(); // second finish is a no-op
  await w2.abort();
  assert.deepEqual(await readdir(dir), ['out.safetensors']);
  const f = await SafetensorsFile.open(path);
  assert.deepEqual([...(await f.readRaw('b'))], [1, 2, 3]);
  await f.close();
});

test('writeSafetensorsFile: bad data leaves nothing behind', async () => {
  const dir = await freshDir();
  const path = join(dir, 'bad.safetensors');
  await assert.rejects(
    writeSafetensorsFile(path, [{ name: 'w', dtype: 'F32', shape: [4], data: new Uint8Array(15) }]),
    isCode('E_SHAPE', (e) => e.key === 'w' && e.file === path),
  );
  assert.deepEqual(await readdir(dir), []);
  assert.throws(() => serializeSafetensors([{ name: 'w', dtype: 'F32', shape: [4], data: new Uint8Array(17) }]), isCode('E_SHAPE'));
});

test('layoutSafetensors rejects duplicate names, __metadata__ as a name and bad shapes', () => {
  assert.throws(() => layoutSafetensors([{ name: 'x', dtype: 'F32', shape: [1] }, { name: 'x', dtype: 'U8', shape: [1] }], undefined), isCode('E_DUPLICATE', (e) => e.key === 'x'));
  assert.throws(() => layoutSafetensors([{ name: '__metadata__', dtype: 'F32', shape: [1] }], undefined), isCode('E_USAGE'));
  for (const shape of [[-1], [1.5], [NaN], [Infinity], [2 ** 60]]) {
    assert.throws(() => layoutSafetensors([{ name: 's', dtype: 'F32', shape }], undefined), isCode('E_SHAPE', (e) => e.key === 's'), JSON.stringify(shape));
  }
  assert.throws(() => layoutSafetensors([{ name: 'f4', dtype: 'F4', shape: [3] }], undefined), isCode('E_SHAPE'));
});

test('ShardedSafetensorsWriter: abort() leaves nothing, failed finish() renames nothing, misuse is an error', async () => {
  const dir = await freshDir();
  const specs: TensorSpec[] = [
    { name: 'a', dtype: 'F32', shape: [4] },
    { name: 'b', dtype: 'F32', shape: [4] },
    { name: 'c', dtype: 'F32', shape: [4] },
  ];
  const w = await ShardedSafetensorsWriter.create(dir, specs, { maxShardBytes: 16 });
  assert.equal((await readdir(dir)).length, 3);
  assert.ok((await readdir(dir)).every((f) => f.startsWith('.')));
  await w.write('a', new Uint8Array(16));
  await w.write('b', new Uint8Array(16));
  await assert.rejects(w.write('a', new Uint8Array(16)), isCode('E_DUPLICATE', (e) => e.key === 'a'));
  await assert.rejects(w.write('c', new Uint8Array(12)), isCode('E_SHAPE', (e) => e.key === 'c'));
  await assert.rejects(w.write('zz', new Uint8Array(16)), isCode('E_USAGE', (e) => e.key === 'zz'));
  await assert.rejects(w.finish(), isCode('E_MISSING', (e) => e.message.includes('c')));
  assert.ok((await readdir(dir)).every((f) => f.startsWith('.')), 'a failed finish() leaves no final-named shard');
  await w.abort();
  assert.deepEqual(await readdir(dir), []);

  await assert.rejects(ShardedSafetensorsWriter.create(dir, [...specs, { name: 'a', dtype: 'U8', shape: [1] }], { maxShardBytes: 16 }), isCode('E_DUPLICATE', (e) => e.key === 'a'));
  await assert.rejects(ShardedSafetensorsWriter.create(dir, specs, { maxShardBytes: 0 }), isCode('E_USAGE'));
  await assert.rejects(ShardedSafetensorsWriter.create(dir, [{ name: 'f4', dtype: 'F4', shape: [1] }]), isCode('E_SHAPE', (e) => e.key === 'f4'));
  assert.deepEqual(await readdir(dir), []);
  await assert.rejects(ShardedSafetensorsWriter.create(join(dir, 'no', 'such'), specs), isCode('E_IO'));
});

test('a shard index written by hand with extra metadata round-trips through ShardedSafetensors', async () => {
  const dir = await freshDir();
  const a = [makeTensor('x', 'F32', [2], 1)];
  const b = [makeTensor('y', 'BF16', [3], 2), makeTensor('0', 'U8', [], 3)];
  await writeSafetensorsFile(join(dir, 'part-a.safetensors'), a);
  await mkdir(join(dir, 'sub'));
  await writeSafetensorsFile(join(dir, 'sub', 'part-b.safetensors'), b);
  await writeFile(
    join(dir, INDEX_FILE),
    JSON.stringify({ metadata: { total_size: 15, n: 2 }, weight_map: { x: 'part-a.safetensors', y: 'sub/part-b.safetensors', '0': 'sub/part-b.safetensors' } }),
  );
  const src = await openSafetensors(dir);
  assert.ok(src instanceof ShardedSafetensors);
  assert.deepEqual(src.shardFiles().sort(), ['part-a.safetensors', 'sub/part-b.safetensors']);
  assert.deepEqual(src.tensors().map((t) => t.name), ['0', 'x', 'y']);
  assert.deepEqual(src.metadata, Object.assign(Object.create(null), { total_size: '15', n: '2' }));
  await assertSameTensors(src, [...a, ...b]);
  await src.close();
});
