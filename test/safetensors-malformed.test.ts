/**
 * Malformed safetensors files and shard indexes (formats.md §2.2): one crafted file on disk per
 * class of problem. Each must fail with a typed error naming the file and, where there is one,
 * the tensor or key, with a message that says what is wrong, and without asking the reader for
 * more bytes than the file holds.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError, type ErrorCode } from '../src/errors.js';
import { INDEX_FILE, MAX_HEADER_BYTES, SafetensorsFile, openSafetensors, serializeSafetensors } from '../src/io/safetensors.js';
import { FileByteReader } from '../src/io/source.js';
import { CountingReader } from './fuzz/targets.js';

const root = await mkdtemp(join(tmpdir(), 'amalgam-bad-'));
after(() => rm(root, { recursive: true, force: true }));
let count = 0;

/** 8-byte little-endian length prefix + header bytes + data. */
function craft(header: string | Uint8Array, data: Uint8Array | number = 0, n?: bigint): Uint8Array {
  const h = typeof header === 'string' ? Buffer.from(header, 'utf8') : header;
  const d = typeof data === 'number' ? new Uint8Array(data) : data;
  const out = new Uint8Array(8 + h.length + d.length);
  new DataView(out.buffer).setBigUint64(0, n ?? BigInt(h.length), true);
  out.set(h, 8);
  out.set(d, 8 + h.length);
  return out;
}

/** A header from entries: `[name, dtype, shape, [begin, end]]`. */
function entries(...es: [string, string, unknown, unknown][]): string {
  return JSON.stringify(Object.fromEntries(es.map(([name, dtype, shape, offs]) => [name, { dtype, shape, data_offsets: offs }])));
}

async function onDisk(bytes: Uint8Array, name = `case${count++}.safetensors`, dir = root): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, bytes);
  return path;
}

interface Expect {
  key?: string;
  message: RegExp;
}

function check(e: unknown, code: ErrorCode, file: string, exp: Expect): true {
  assert.ok(e instanceof AmalgamError, `expected an AmalgamError, got ${e instanceof Error ? e.stack : String(e)}`);
  assert.equal(e.code, code, e.message);
  assert.equal(e.file, file, `error names the file: ${e.message}`);
  assert.ok(e.message.includes(file), e.message);
  if (exp.key !== undefined) {
    assert.equal(e.key, exp.key, `error names the key: ${e.message}`);
    assert.ok(e.message.includes(`'${exp.key}'`), e.message);
  }
  assert.match(e.message, exp.message);
  return true;
}

/** Write `bytes` to disk, open it both ways and expect the error; the reader stays within the file. */
async function expectBad(bytes: Uint8Array, code: ErrorCode, exp: Expect): Promise<void> {
  const path = await onDisk(bytes);
  await assert.rejects(SafetensorsFile.open(path), (e) => check(e, code, path, exp));
  await assert.rejects(openSafetensors(path), (e) => check(e, code, path, exp));
  const reader = new CountingReader(await FileByteReader.open(path));
  try {
    await assert.rejects(SafetensorsFile.fromReader(reader), (e) => check(e, code, path, exp));
    assert.equal(reader.bad, undefined, `invalid read: ${reader.bad}`);
    assert.ok(reader.requested <= bytes.length, `the reader was asked for ${reader.requested} bytes of a ${bytes.length}-byte file`);
  } finally {
    await reader.close();
  }
}

const F32x2 = (offs: unknown = [0, 8]): [string, string, unknown, unknown] => ['w', 'F32', [2], offs];

// ---------------------------------------------------------------------------------------------
// Length prefix

test('a file shorter than 8 bytes', async () => {
  await expectBad(new Uint8Array(0), 'E_HEADER', { message: /0 bytes, too short/ });
  await expectBad(Uint8Array.from([2, 0, 0, 0, 0]), 'E_HEADER', { message: /5 bytes, too short/ });
});

test('a header length over the 100 MB cap', async () => {
  await expectBad(craft('{}', 0, BigInt(MAX_HEADER_BYTES) + 1n), 'E_HEADER', { message: /header length 100000001 exceeds the 100000000-byte limit/ });
  await expectBad(craft('{}', 0, 2n ** 64n - 1n), 'E_HEADER', { message: /header length 18446744073709551615 exceeds/ });
  // exactly at the cap it is the file size that is wrong
  await expectBad(craft('{}', 0, BigInt(MAX_HEADER_BYTES)), 'E_HEADER', { message: /header length 100000000 runs past the end of the file/ });
});

test('a header length past the end of the file', async () => {
  const good = serializeSafetensors([{ name: 'w', dtype: 'F32', shape: [2], data: new Uint8Array(8) }]);
  const bytes = good.slice();
  new DataView(bytes.buffer).setBigUint64(0, BigInt(bytes.length - 7), true);
  await expectBad(bytes, 'E_HEADER', { message: new RegExp(`header length ${bytes.length - 7} runs past the end of the file \\(${bytes.length} bytes\\)`) });
  await expectBad(craft('', 0, 1n), 'E_HEADER', { message: /runs past the end/ });
});

// ---------------------------------------------------------------------------------------------
// Header text

test('a header that is not UTF-8', async () => {
  const h = Buffer.concat([Buffer.from('{"w\u0000'.slice(0, 3)), Buffer.from([0xff, 0xfe]), Buffer.from('":{}}')]);
  await expectBad(craft(h), 'E_HEADER', { message: /not valid UTF-8/ });
  await expectBad(craft(Buffer.from([0x7b, 0xed, 0xa0, 0x80, 0x7d])), 'E_HEADER', { message: /not valid UTF-8/ }); // an encoded surrogate
});

test('a header that does not start with "{" (including JSON arrays and empty headers)', async () => {
  await expectBad(craft(' {}'), 'E_HEADER', { message: /does not start with "\{"/ });
  await expectBad(craft('[{"w":1}]'), 'E_HEADER', { message: /does not start with "\{"/ });
  await expectBad(craft('"str"'), 'E_HEADER', { message: /does not start with "\{"/ });
  await expectBad(craft('\ufeff{}'), 'E_HEADER', { message: /does not start with "\{"/ });
  await expectBad(craft(''), 'E_HEADER', { message: /does not start with "\{"/ });
});

test('a header that is not valid JSON', async () => {
  await expectBad(craft('{"w":}'), 'E_HEADER', { message: /not valid JSON/ });
  await expectBad(craft('{"w":{"dtype":"F32",}}'), 'E_HEADER', { message: /not valid JSON/ });
  await expectBad(craft("{'w':1}"), 'E_HEADER', { message: /not valid JSON: expected a string key/ });
  await expectBad(craft('{"w":NaN}'), 'E_HEADER', { message: /not valid JSON: bad number/ });
  await expectBad(craft('{"w'), 'E_HEADER', { message: /not valid JSON: unterminated string/ });
});

test('garbage after the JSON object', async () => {
  await expectBad(craft('{}x'), 'E_HEADER', { message: /not valid JSON: unexpected data after the JSON value/ });
  await expectBad(craft('{} {}'), 'E_HEADER', { message: /unexpected data after the JSON value/ });
  await expectBad(craft('{}\u0000\u0000'), 'E_HEADER', { message: /unexpected data after the JSON value/ });
  // trailing spaces are padding, and fine
  const ok = await SafetensorsFile.open(await onDisk(craft('{}      ')));
  assert.deepEqual(ok.tensors(), []);
  await ok.close();
});

test('nesting deep enough to exhaust a recursive parser', async () => {
  await expectBad(craft('{"w":' + '['.repeat(100_000) + ']'.repeat(100_000) + '}'), 'E_HEADER', { message: /not valid JSON: nesting deeper than \d+/ });
  await expectBad(craft('{"__metadata__":' + '{"a":'.repeat(50_000) + '"x"' + '}'.repeat(50_001)), 'E_HEADER', { message: /nesting deeper/ });
});

// ---------------------------------------------------------------------------------------------
// Tensor entries

test('an unknown or missing dtype', async () => {
  await expectBad(craft(entries(['w', 'F128', [2], [0, 8]]), 8), 'E_DTYPE', { key: 'w', message: /unknown dtype "F128"/ });
  await expectBad(craft(entries(['w', 'f32', [2], [0, 8]]), 8), 'E_DTYPE', { key: 'w', message: /unknown dtype "f32"/ });
  await expectBad(craft('{"w":{"shape":[2],"data_offsets":[0,8]}}', 8), 'E_DTYPE', { key: 'w', message: /unknown dtype undefined/ });
  await expectBad(craft('{"w":{"dtype":32,"shape":[2],"data_offsets":[0,8]}}', 8), 'E_DTYPE', { key: 'w', message: /unknown dtype 32/ });
});

test('a tensor entry that is not an object', async () => {
  await expectBad(craft('{"w":5}'), 'E_HEADER', { key: 'w', message: /tensor entry is a number/ });
  await expectBad(craft('{"w":[0,8]}'), 'E_HEADER', { key: 'w', message: /tensor entry is an array/ });
});

test('negative, non-integer or missing shapes', async () => {
  await expectBad(craft(entries(['w', 'F32', [-2], [0, 8]]), 8), 'E_SHAPE', { key: 'w', message: /not a non-negative integer/ });
  await expectBad(craft(entries(['w', 'F32', [1.5], [0, 8]]), 8), 'E_SHAPE', { key: 'w', message: /not a non-negative integer/ });
  await expectBad(craft(entries(['w', 'F32', ['2'], [0, 8]]), 8), 'E_SHAPE', { key: 'w', message: /not a non-negative integer/ });
  await expectBad(craft(entries(['w', 'F32', [null], [0, 8]]), 8), 'E_SHAPE', { key: 'w', message: /not a non-negative integer/ });
  await expectBad(craft(entries(['w', 'F32', 2, [0, 8]]), 8), 'E_SHAPE', { key: 'w', message: /shape is a number, expected an array/ });
  await expectBad(craft('{"w":{"dtype":"F32","data_offsets":[0,8]}}', 8), 'E_SHAPE', { key: 'w', message: /shape is missing/ });
});

test('absurd shapes: overflowing element or byte counts, huge dimensions, too many dimensions', async () => {
  await expectBad(craft(entries(['w', 'F32', [4294967296, 4294967296], [0, 8]]), 8), 'E_SHAPE', { key: 'w', message: /absurd number of elements/ });
  await expectBad(craft('{"w":{"dtype":"F32","shape":[1e300],"data_offsets":[0,8]}}', 8), 'E_SHAPE', { key: 'w', message: /not a non-negative integer/ });
  await expectBad(craft('{"w":{"dtype":"F32","shape":[18446744073709551617],"data_offsets":[0,8]}}', 8), 'E_SHAPE', { key: 'w', message: /not a non-negative integer/ });
  await expectBad(craft(entries(['w', 'F64', [2 ** 50], [0, 8]]), 8), 'E_SHAPE', { key: 'w', message: /absurd byte size/ });
  await expectBad(craft(entries(['w', 'F32', new Array(65).fill(1), [0, 4]]), 4), 'E_SHAPE', { key: 'w', message: /65 dimensions/ });
  // a zero dimension makes the tensor empty whatever the other dimensions are, but they must still be sane
  await expectBad(craft(entries(['w', 'F32', [0, 2 ** 60], [0, 0]])), 'E_SHAPE', { key: 'w', message: /not a non-negative integer/ });
});

test('a sub-byte dtype whose size is not a whole number of bytes', async () => {
  await expectBad(craft(entries(['w', 'F4', [3], [0, 2]]), 2), 'E_SHAPE', { key: 'w', message: /not a whole number of bytes/ });
});

test('a byte span that does not match shape × dtype', async () => {
  await expectBad(craft(entries(['w', 'F32', [2], [0, 12]]), 12), 'E_SHAPE', { key: 'w', message: /needs 8 bytes but data_offsets \[0, 12\] span 12/ });
  await expectBad(craft(entries(['w', 'BF16', [], [0, 4]]), 4), 'E_SHAPE', { key: 'w', message: /needs 2 bytes/ });
  await expectBad(craft(entries(['w', 'F32', [0], [0, 4]]), 4), 'E_SHAPE', { key: 'w', message: /needs 0 bytes/ });
});

// ---------------------------------------------------------------------------------------------
// Offsets

test('malformed data_offsets', async () => {
  await expectBad(craft(entries(F32x2([0])), 8), 'E_OFFSETS', { key: 'w', message: /data_offsets is \[0\], expected \[begin, end\]/ });
  await expectBad(craft(entries(F32x2([-8, 0])), 8), 'E_OFFSETS', { key: 'w', message: /expected \[begin, end\] with non-negative integers/ });
  await expectBad(craft(entries(F32x2([0, '8'])), 8), 'E_OFFSETS', { key: 'w', message: /expected \[begin, end\]/ });
  await expectBad(craft(entries(F32x2([0, 8.5])), 8), 'E_OFFSETS', { key: 'w', message: /expected \[begin, end\]/ });
  await expectBad(craft('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,1e400]}}', 8), 'E_OFFSETS', { key: 'w', message: /expected \[begin, end\]/ });
  await expectBad(craft('{"w":{"dtype":"F32","shape":[2]}}', 8), 'E_OFFSETS', { key: 'w', message: /data_offsets is undefined/ });
});

test('begin > end', async () => {
  await expectBad(craft(entries(F32x2([8, 0])), 8), 'E_OFFSETS', { key: 'w', message: /data_offsets \[8, 0\] end before they begin/ });
});

test('offsets out of range (past the end of the data)', async () => {
  await expectBad(craft(entries(F32x2([0, 8])), 4), 'E_OFFSETS', { key: 'w', message: /data_offsets \[0, 8\] run past the end of the data \(4 bytes\)/ });
  await expectBad(craft(entries(['w', 'U8', [8], [2 ** 52, 2 ** 52 + 8]]), 8), 'E_OFFSETS', { key: 'w', message: /run past the end of the data/ });
});

test('overlapping tensors', async () => {
  await expectBad(craft(entries(['a', 'F32', [2], [0, 8]], ['b', 'F32', [2], [4, 12]]), 12), 'E_OFFSETS', { key: 'b', message: /data_offsets \[4, 12\] overlap the previous tensor \(which ends at 8\)/ });
  await expectBad(craft(entries(['a', 'F32', [2], [0, 8]], ['b', 'F32', [2], [0, 8]]), 8), 'E_OFFSETS', { message: /overlap/ });
  // an empty tensor inside another one overlaps it too
  await expectBad(craft(entries(['a', 'F32', [2], [0, 8]], ['e', 'F32', [0], [4, 4]]), 8), 'E_OFFSETS', { key: 'e', message: /overlap/ });
});

test('holes between or before tensors', async () => {
  await expectBad(craft(entries(['a', 'F32', [1], [0, 4]], ['b', 'F32', [1], [8, 12]]), 12), 'E_OFFSETS', { key: 'b', message: /leave a hole: bytes 4\.\.8 belong to no tensor/ });
  await expectBad(craft(entries(['a', 'F32', [1], [4, 8]]), 8), 'E_OFFSETS', { key: 'a', message: /leave a hole: bytes 0\.\.4/ });
});

test('8 + N + end != file size: trailing bytes after the data', async () => {
  await expectBad(craft(entries(F32x2()), 9), 'E_OFFSETS', { message: /tensors end at byte \d+ of the file but the file is \d+ bytes.*trailing bytes/ });
  await expectBad(craft('{}', 1), 'E_OFFSETS', { message: /trailing bytes/ });
  await expectBad(craft(entries(['e', 'F32', [0], [0, 0]]), 3), 'E_OFFSETS', { message: /trailing bytes/ });
});

// ---------------------------------------------------------------------------------------------
// Duplicates and metadata

test('duplicate tensor names', async () => {
  const h = '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}';
  await expectBad(craft(h, 8), 'E_DUPLICATE', { key: 'w', message: /header lists "w" more than once/ });
  // escapes that spell the same name are the same name
  const h2 = '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"\\u0077":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}';
  await expectBad(craft(h2, 8), 'E_DUPLICATE', { key: 'w', message: /more than once/ });
});

test('a field given twice inside one tensor entry names the tensor', async () => {
  const h = '{"w":{"dtype":"F32","shape":[1],"dtype":"F16","data_offsets":[0,4]}}';
  await expectBad(craft(h, 4), 'E_DUPLICATE', { key: 'w', message: /tensor entry lists "dtype" more than once/ });
});

test('a duplicate __metadata__ entry', async () => {
  await expectBad(craft('{"__metadata__":{"format":"pt"},"__metadata__":{"format":"np"}}'), 'E_DUPLICATE', { key: '__metadata__', message: /"__metadata__" more than once/ });
});

test('__metadata__ values that are not strings, or __metadata__ that is not an object', async () => {
  await expectBad(craft('{"__metadata__":{"format":"pt","n":1}}'), 'E_METADATA', { key: '__metadata__.n', message: /value for "n" is a number, not a string/ });
  await expectBad(craft('{"__metadata__":{"x":null}}'), 'E_METADATA', { key: '__metadata__.x', message: /is null, not a string/ });
  await expectBad(craft('{"__metadata__":{"x":{"y":"z"}}}'), 'E_METADATA', { key: '__metadata__.x', message: /is an object, not a string/ });
  await expectBad(craft('{"__metadata__":{"x":["a"]}}'), 'E_METADATA', { key: '__metadata__.x', message: /is an array, not a string/ });
  await expectBad(craft('{"__metadata__":{"x":true}}'), 'E_METADATA', { key: '__metadata__.x', message: /is a boolean, not a string/ });
  await expectBad(craft('{"__metadata__":["format","pt"]}'), 'E_METADATA', { key: '__metadata__', message: /__metadata__ is not an object of strings/ });
  await expectBad(craft('{"__metadata__":"pt"}'), 'E_METADATA', { key: '__metadata__', message: /not an object of strings/ });
  await expectBad(craft('{"__metadata__":{"a":"1","a":"2"}}'), 'E_DUPLICATE', { key: '__metadata__.a', message: /__metadata__ lists "a" more than once/ });
});

test('keys that are special in JavaScript objects are plain data', async () => {
  const h = '{"__proto__":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"__metadata__":{"__proto__":"x","constructor":"y"}}';
  const f = await SafetensorsFile.open(await onDisk(craft(h, Uint8Array.from([7]))));
  assert.deepEqual(f.tensors().map((t) => t.name), ['__proto__']);
  assert.deepEqual([...(await f.readRaw('__proto__'))], [7]);
  assert.equal(f.metadata['__proto__'], 'x');
  assert.equal(f.has('constructor'), false);
  await f.close();
});

// ---------------------------------------------------------------------------------------------
// Shard indexes

async function shardedDir(weightMap: Record<string, unknown> | string, shards: Record<string, Uint8Array> = {}): Promise<{ dir: string; index: string }> {
  const dir = join(root, `model${count++}`);
  await mkdir(dir);
  for (const [name, bytes] of Object.entries(shards)) await writeFile(join(dir, name), bytes);
  const index = join(dir, INDEX_FILE);
  await writeFile(index, typeof weightMap === 'string' ? weightMap : JSON.stringify({ metadata: { total_size: 8 }, weight_map: weightMap }));
  return { dir, index };
}

const shardA = () => serializeSafetensors([{ name: 'a', dtype: 'F32', shape: [2], data: new Uint8Array(8) }], { format: 'pt' });
const shardAB = () =>
  serializeSafetensors([
    { name: 'a', dtype: 'F32', shape: [2], data: new Uint8Array(8) },
    { name: 'b', dtype: 'U8', shape: [1], data: new Uint8Array(1) },
  ]);

async function expectBadDir(dir: string, code: ErrorCode, file: string, exp: Expect): Promise<void> {
  await assert.rejects(openSafetensors(dir), (e) => check(e, code, file, exp));
  await assert.rejects(openSafetensors(join(dir, INDEX_FILE)), (e) => check(e, code, file, exp));
}

test('an index whose weight_map points outside the model folder with ../', async () => {
  // the target exists and is a valid file: it must still not be opened
  await writeFile(join(root, 'outside.safetensors'), shardA());
  for (const bad of ['../outside.safetensors', 'sub/../../outside.safetensors', '..', './a.safetensors', 'sub//a.safetensors', '..\\outside.safetensors']) {
    const { dir, index } = await shardedDir({ a: bad }, { 'a.safetensors': shardA() });
    await expectBadDir(dir, 'E_INDEX', index, { key: 'a', message: /weight_map points to ".*", outside the model folder/ });
  }
});

test('an index whose weight_map holds an absolute path', async () => {
  const outside = join(root, 'outside-abs.safetensors');
  await writeFile(outside, shardA());
  for (const bad of [outside, '/etc/passwd', 'C:\\models\\a.safetensors', 'c:a.safetensors', '\\\\server\\share\\a.safetensors']) {
    const { dir, index } = await shardedDir({ a: bad });
    await expectBadDir(dir, 'E_INDEX', index, { key: 'a', message: /outside the model folder/ });
  }
});

test('an index that points to a missing shard', async () => {
  const { dir, index } = await shardedDir({ a: 'model-00001-of-00002.safetensors', b: 'model-00002-of-00002.safetensors' }, { 'model-00001-of-00002.safetensors': shardA() });
  await expectBadDir(dir, 'E_INDEX', index, { key: 'b', message: /shard "model-00002-of-00002.safetensors", which does not exist/ });
});

test('a tensor listed in the index but absent from its shard', async () => {
  const { dir, index } = await shardedDir({ a: 's1.safetensors', zz: 's1.safetensors' }, { 's1.safetensors': shardA() });
  await expectBadDir(dir, 'E_INDEX', index, { key: 'zz', message: /says the tensor is in "s1.safetensors", but that shard does not contain it/ });
});

test('a tensor stored in two shards', async () => {
  const { dir, index } = await shardedDir({ a: 's1.safetensors', b: 's2.safetensors' }, { 's1.safetensors': shardA(), 's2.safetensors': shardAB() });
  await expectBadDir(dir, 'E_DUPLICATE', index, { key: 'a', message: /stored in two shards: "s1.safetensors" and "s2.safetensors"/ });
});

test('an index that is not JSON, not an object, or has no weight_map', async () => {
  let d = await shardedDir('{"weight_map": {"a": "s1.safetensors",}');
  await expectBadDir(d.dir, 'E_INDEX', d.index, { message: /index is not valid JSON/ });
  d = await shardedDir('not json at all');
  await expectBadDir(d.dir, 'E_INDEX', d.index, { message: /index is not valid JSON/ });
  d = await shardedDir('');
  await expectBadDir(d.dir, 'E_INDEX', d.index, { message: /index is not valid JSON/ });
  d = await shardedDir('["weight_map"]');
  await expectBadDir(d.dir, 'E_INDEX', d.index, { message: /index JSON is not an object/ });
  d = await shardedDir('{"metadata":{}}');
  await expectBadDir(d.dir, 'E_INDEX', d.index, { key: 'weight_map', message: /no "weight_map" object/ });
  d = await shardedDir('{"weight_map":["a"]}');
  await expectBadDir(d.dir, 'E_INDEX', d.index, { key: 'weight_map', message: /no "weight_map" object/ });
  d = await shardedDir('{"weight_map":' + '['.repeat(100_000) + ']'.repeat(100_000) + '}');
  await expectBadDir(d.dir, 'E_INDEX', d.index, { message: /nesting deeper/ });
});

test('an index with a weight_map entry that is not a file name, or a key given twice', async () => {
  let d = await shardedDir({ a: 7 });
  await expectBadDir(d.dir, 'E_INDEX', d.index, { key: 'a', message: /weight_map entry is a number, expected a shard file name/ });
  d = await shardedDir({ a: '' });
  await expectBadDir(d.dir, 'E_INDEX', d.index, { key: 'a', message: /weight_map entry is a string, expected a shard file name/ });
  d = await shardedDir('{"weight_map":{"a":"s1.safetensors","a":"s2.safetensors"}}', { 's1.safetensors': shardA() });
  await expectBadDir(d.dir, 'E_DUPLICATE', d.index, { key: 'a', message: /index lists "a" more than once/ });
});

test('a malformed shard is reported under the shard’s own path', async () => {
  const bad = craft(entries(['a', 'F32', [2], [0, 8]]), 4);
  const { dir } = await shardedDir({ a: 's1.safetensors' }, { 's1.safetensors': bad });
  await expectBadDir(dir, 'E_OFFSETS', join(dir, 's1.safetensors'), { key: 'a', message: /run past the end of the data/ });
});

test('a weight_map entry that names a folder', async () => {
  const { dir } = await shardedDir({ a: 'sub' });
  await mkdir(join(dir, 'sub'));
  await expectBadDir(dir, 'E_IO', join(dir, 'sub'), { message: /not a regular file/ });
});

test('shapes and offsets written as 1.0, 1e3 or -0 are not integers', async () => {
  await expectBad(craft('{"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8), 'E_SHAPE', { key: 'w', message: /not a non-negative integer/ });
  await expectBad(craft('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}}', 8), 'E_OFFSETS', { key: 'w', message: /not a non-negative integer/ });
  await expectBad(craft('{"w":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', 0), 'E_SHAPE', { key: 'w', message: /not a non-negative integer/ });
});
