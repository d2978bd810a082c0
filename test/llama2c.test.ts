import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { AmalgamError } from '../src/errors.js';
import { GgufFile } from '../src/io/gguf.js';
import { Llama2cCheckpoint, parseLlama2cTokenizer, readLlama2cTokenizer } from '../src/io/llama2c.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

const BIN = 'models/stories260K/stories260K.bin';
const TOK = 'models/stories260K/tok512.bin';
const GGUF = 'models/stories260K/stories260K.gguf';
const AID = 'models/aidreams260K/aidreams260K.bin';
const AID_TOK = 'models/aidreams260K/tok512.bin';

async function expectError(p: Promise<unknown> | (() => unknown), code: string, re: RegExp, key?: string): Promise<AmalgamError> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    assert.ok(e instanceof AmalgamError, `expected an AmalgamError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, re);
    assert.ok(e.file !== undefined && e.message.startsWith(e.file), `message names the file: ${e.message}`);
    if (key !== undefined) {
      assert.equal(e.key, key);
      assert.ok(e.message.includes(`'${key}'`), `message names the key: ${e.message}`);
    }
    return e;
  }
  assert.fail(`expected ${code}`);
}

interface Hdr {
  dim: number; hidden: number; layers: number; heads: number; kv: number; vocab: number; seq: number;
}

/** A legacy llama2.c file whose float i (counted from the first float) has the value i. */
function legacyFile(h: Hdr): Uint8Array {
  const hs = h.dim / h.heads;
  const kvDim = h.kv * hs;
  const V = Math.abs(h.vocab);
  let floats = V * h.dim + h.layers * (2 * h.dim + 2 * h.dim * h.dim + 2 * kvDim * h.dim + 3 * h.hidden * h.dim) + h.dim + h.seq * hs;
  if (h.vocab < 0) floats += V * h.dim;
  const b = Buffer.alloc(28 + 4 * floats);
  [h.dim, h.hidden, h.layers, h.heads, h.kv, h.vocab, h.seq].forEach((v, i) => b.writeInt32LE(v, 4 * i));
  for (let i = 0; i < floats; i++) b.writeFloatLE(i, 28 + 4 * i);
  return new Uint8Array(b);
}

/** A version 1 ("ak42") file with the given payload floats. */
function v1File(h: Hdr, shared: boolean, floats: number, version = 1): Uint8Array {
  const b = Buffer.alloc(256 + 4 * floats);
  b.writeUInt32LE(0x616b3432, 0);
  b.writeInt32LE(version, 4);
  [h.dim, h.hidden, h.layers, h.heads, h.kv, h.vocab, h.seq].forEach((v, i) => b.writeInt32LE(v, 8 + 4 * i));
  b.writeUInt8(shared ? 1 : 0, 36);
  for (let i = 0; i < floats; i++) b.writeFloatLE(i, 256 + 4 * i);
  return new Uint8Array(b);
}

const tiny: Hdr = { dim: 8, hidden: 12, layers: 2, heads: 2, kv: 1, vocab: 5, seq: 3 };

test('stories260K.bin: header and tensor facts, bit-identical to the GGUF', async (t) => {
  if (!haveFixtures(t, BIN, GGUF)) return;
  const ck = await Llama2cCheckpoint.open(fixture(BIN));
  assert.deepEqual(ck.config, {
    dim: 64, hiddenDim: 172, nLayers: 5, nHeads: 8, nKvHeads: 4, vocabSize: 512, seqLen: 512,
    sharedClassifier: true, version: 0, headSize: 8, kvDim: 32,
  });
  const ts = ck.tensors();
  assert.equal(ts.length, 1 + 5 * 9 + 1);
  assert.equal(ck.has('wcls'), false);
  assert.deepEqual(ts.slice(0, 3).map((x) => x.name), ['token_embedding_table', 'rms_att_weight.0', 'rms_att_weight.1']);
  assert.equal(ts[ts.length - 1]!.name, 'rms_final_weight');
  assert.deepEqual(ck.info('token_embedding_table').shape, [512, 64]);
  assert.deepEqual(ck.info('wq.4').shape, [64, 64]);
  assert.deepEqual(ck.info('wk.0').shape, [32, 64]);
  assert.deepEqual(ck.info('wv.0').shape, [32, 64]);
  assert.deepEqual(ck.info('w1.0').shape, [172, 64]);
  assert.deepEqual(ck.info('w2.0').shape, [64, 172]);
  assert.deepEqual(ck.info('rms_ffn_weight.2').shape, [64]);
  assert.ok(ts.every((x) => x.dtype === 'F32'));
  assert.equal(ts.reduce((a, x) => a + x.shape.reduce((p, d) => p * d, 1), 0), 260_032);
  assert.equal(ck.offsetOf('token_embedding_table'), 28);
  assert.equal(ck.offsetOf('rms_att_weight.0'), 28 + 4 * 512 * 64);
  assert.equal(ck.metadata['n_kv_heads'], '4');

  const g = await GgufFile.open(fixture(GGUF));
  const pairs: [string, string][] = [['token_embedding_table', 'token_embd.weight'], ['rms_final_weight', 'output_norm.weight']];
  const layer: [string, string][] = [
    ['rms_att_weight', 'attn_norm'], ['wq', 'attn_q'], ['wk', 'attn_k'], ['wv', 'attn_v'], ['wo', 'attn_output'],
    ['rms_ffn_weight', 'ffn_norm'], ['w1', 'ffn_gate'], ['w2', 'ffn_down'], ['w3', 'ffn_up'],
  ];
  for (let l = 0; l < 5; l++) for (const [a, b] of layer) pairs.push([`${a}.${l}`, `blk.${l}.${b}.weight`]);
  for (const [a, b] of pairs) {
    assert.deepEqual(ck.info(a).shape, g.info(b).shape, a);
    assert.deepEqual(await ck.readRaw(a), await g.readRaw(b), `${a} == ${b}`);
  }
  assert.equal(pairs.length, 47);
  const f = await ck.readF32('rms_final_weight');
  assert.equal(f.length, 64);
  await ck.close();
  await g.close();

  const bytes = new Uint8Array(await readFile(fixture(BIN)));
  assert.equal(bytes.length, 1_056_540);
  const e = await expectError(Llama2cCheckpoint.fromBytes(bytes.subarray(0, bytes.length - 4), 'stories260K.bin'), 'E_FORMAT',
    /file is 1056536 bytes, but the header \(dim 64, hidden_dim 172, n_layers 5, n_heads 8, n_kv_heads 4, vocab_size 512, seq_len 512\) implies 28 \+ 4 × 264128 floats = 1056540 bytes/, 'header');
  assert.match(e.hint!, /truncated/);
});

test('aidreams260K.bin: header facts', async (t) => {
  if (!haveFixtures(t, AID)) return;
  const ck = await Llama2cCheckpoint.open(fixture(AID));
  assert.deepEqual(ck.config, {
    dim: 64, hiddenDim: 172, nLayers: 4, nHeads: 4, nKvHeads: 4, vocabSize: 512, seqLen: 128,
    sharedClassifier: true, version: 0, headSize: 16, kvDim: 64,
  });
  const ts = ck.tensors();
  assert.equal(ts.length, 1 + 4 * 9 + 1);
  assert.equal(ts.reduce((a, x) => a + x.shape.reduce((p, d) => p * d, 1), 0), 230_976);
  assert.deepEqual(ck.info('wk.3').shape, [64, 64]);
  assert.equal(ck.has('wq.4'), false);
  await ck.close();
});

test('legacy layout: tensor positions, unshared classifier, skipped rotary tables', async () => {
  const h = { ...tiny, vocab: -5 };
  const ck = await Llama2cCheckpoint.fromBytes(legacyFile(h), 'tiny.bin');
  assert.equal(ck.config.sharedClassifier, false);
  assert.equal(ck.config.vocabSize, 5);
  assert.equal(ck.config.kvDim, 4);
  // Float indices: embedding 40, rms_att 2x8, wq 2x64, wk 2x32, wv 2x32, wo 2x64, rms_ffn 2x8,
  // w1 2x96, w2 2x96, w3 2x96, rms_final 8, freq 2x(3x2), wcls 40.
  const first = async (name: string) => (await ck.readF32(name))[0];
  assert.equal(await first('token_embedding_table'), 0);
  assert.equal(await first('rms_att_weight.1'), 48);
  assert.equal(await first('wq.0'), 56);
  assert.equal(await first('wk.0'), 184);
  assert.equal(await first('wv.1'), 280);
  assert.equal(await first('wo.0'), 312);
  assert.equal(await first('rms_ffn_weight.0'), 440);
  assert.equal(await first('w1.1'), 552);
  assert.equal(await first('w2.0'), 648);
  assert.equal(await first('w3.0'), 840);
  assert.equal(await first('rms_final_weight'), 1032);
  assert.equal(await first('wcls'), 1052);
  const w = await ck.readF32('wcls');
  assert.equal(w.length, 40);
  assert.equal(w[39], 1091);
  assert.deepEqual(ck.info('w2.1').shape, [8, 12]);
  assert.equal(ck.tensors()[ck.tensors().length - 1]!.name, 'wcls');
});

test('version 1 layout is read; version 2 and unknown versions are rejected', async () => {
  const V = 5;
  const n = 2 * 8 * 2 + 8 + V * 8 + 2 * (64 + 32 + 32 + 64) + 3 * 2 * 96;
  const ck = await Llama2cCheckpoint.fromBytes(v1File({ ...tiny, vocab: V }, true, n), 'v1.bin');
  assert.equal(ck.config.version, 1);
  assert.equal(ck.config.sharedClassifier, true);
  const first = async (name: string) => (await ck.readF32(name))[0];
  assert.equal(await first('rms_att_weight.0'), 0);
  assert.equal(await first('rms_att_weight.1'), 8);
  assert.equal(await first('rms_ffn_weight.0'), 16);
  assert.equal(await first('rms_final_weight'), 32);
  assert.equal(await first('token_embedding_table'), 40);
  assert.equal(await first('wq.0'), 80);
  assert.equal(await first('w3.1'), n - 96);
  assert.equal(ck.tensors()[0]!.name, 'token_embedding_table');
  const unshared = await Llama2cCheckpoint.fromBytes(v1File({ ...tiny, vocab: V }, false, n + V * 8), 'v1.bin');
  assert.equal(await (async () => (await unshared.readF32('wcls'))[0])(), n);

  await expectError(Llama2cCheckpoint.fromBytes(v1File({ ...tiny, vocab: V }, true, n, 2), 'v2.bin'), 'E_UNSUPPORTED', /version 2 checkpoints \(Q8_0 grouped int8 weights\) are not supported/, 'version');
  await expectError(Llama2cCheckpoint.fromBytes(v1File({ ...tiny, vocab: V }, true, n, 3), 'v3.bin'), 'E_UNSUPPORTED', /unknown llama2.c checkpoint version 3/, 'version');
});

test('size mismatch and bad headers are reported clearly', async () => {
  const good = legacyFile(tiny);
  await Llama2cCheckpoint.fromBytes(good, 'tiny.bin');
  const e = await expectError(Llama2cCheckpoint.fromBytes(good.subarray(0, good.length - 4), 'tiny.bin'), 'E_FORMAT',
    new RegExp(`file is ${good.length - 4} bytes, but the header \\(dim 8, hidden_dim 12, n_layers 2, n_heads 2, n_kv_heads 1, vocab_size 5, seq_len 3\\) implies 28 \\+ 4 × ${(good.length - 28) / 4} floats = ${good.length} bytes`), 'header');
  assert.match(e.hint!, /truncated/);
  const longer = new Uint8Array(good.length + 8);
  longer.set(good);
  assert.match((await expectError(Llama2cCheckpoint.fromBytes(longer, 'tiny.bin'), 'E_FORMAT', /implies/, 'header')).hint!, /extra bytes/);
  // A shared header on a file that carries a classifier.
  const unshared = legacyFile({ ...tiny, vocab: -5 });
  new DataView(unshared.buffer).setInt32(20, 5, true);
  assert.match((await expectError(Llama2cCheckpoint.fromBytes(unshared, 'tiny.bin'), 'E_FORMAT', /implies/, 'header')).hint!, /unshared classifier/);
  const bad = (i: number, v: number) => {
    const b = good.slice();
    new DataView(b.buffer).setInt32(4 * i, v, true);
    return Llama2cCheckpoint.fromBytes(b, 'tiny.bin');
  };
  await expectError(bad(3, 0), 'E_HEADER', /n_heads is 0; it must be positive/, 'n_heads');
  await expectError(bad(3, 3), 'E_HEADER', /dim 8 is not divisible by n_heads 3/, 'n_heads');
  await expectError(bad(4, 3), 'E_HEADER', /not a multiple of n_kv_heads 3/, 'n_kv_heads');
  await expectError(bad(0, 2 ** 30), 'E_HEADER', /dim 1073741824, .* describes an absurdly large model/, 'header');
  await expectError(bad(0, 2 ** 12), 'E_FORMAT', /implies/, 'header');
  await expectError(Llama2cCheckpoint.fromBytes(good.subarray(0, 20), 'tiny.bin'), 'E_HEADER', /too short for a llama2.c header/);
});

test('llama2.c tokenizers: stories260K and aidreams260K facts', async (t) => {
  if (!haveFixtures(t, TOK, AID_TOK)) return;
  const tok = await readLlama2cTokenizer(fixture(TOK), 512);
  assert.equal(tok.maxTokenLength, 7);
  assert.equal(tok.pieces.length, 512);
  assert.deepEqual(tok.pieces.slice(0, 4), ['<unk>', '\n<s>\n', '\n</s>\n', '<0x00>']);
  assert.equal(tok.pieces[258], '<0xFF>');
  assert.equal(tok.pieces[259], ' t');
  assert.equal(tok.pieces[260], 'he');
  for (let id = 0; id < 512; id++) assert.equal(tok.scores[id], id >= 259 ? -(id - 259) : 0);
  assert.ok(tok.pieces.every((p) => Buffer.byteLength(p) <= 7));
  const aid = await readLlama2cTokenizer(fixture(AID_TOK), 512);
  assert.equal(aid.maxTokenLength, 10);
  assert.equal(aid.pieces[259], 'in');
  assert.equal(aid.pieces[262], ' a');
});

test('llama2.c tokenizer: truncation, wrong vocabulary size and corrupt entries', async (t) => {
  if (!haveFixtures(t, TOK)) return;
  const bytes = new Uint8Array(await readFile(fixture(TOK)));
  // Cut inside the text of the last token, then at many points inside entries.
  await expectError(() => parseLlama2cTokenizer(bytes.subarray(0, bytes.length - 1), 512, 'tok512.bin'), 'E_FORMAT', /file ends inside the text of token 511/, 'token 511');
  for (let cut = 4 + 8 * 512; cut < bytes.length; cut += 97) {
    const e = await expectError(() => parseLlama2cTokenizer(bytes.subarray(0, cut), 512, 'tok512.bin'), 'E_FORMAT', /file ends inside the (entry|text) of token \d+/);
    assert.match(e.key!, /^token \d+$/);
  }
  await expectError(() => parseLlama2cTokenizer(bytes.subarray(0, 100), 512, 'tok512.bin'), 'E_FORMAT', /too short for 512 entries/);
  await expectError(() => parseLlama2cTokenizer(bytes.subarray(0, 2), 512, 'tok512.bin'), 'E_HEADER', /too short/, 'max_token_length');
  await expectError(() => parseLlama2cTokenizer(bytes, 511, 'tok512.bin'), 'E_FORMAT', /bytes follow the 511 entries/);
  await expectError(() => parseLlama2cTokenizer(bytes, 513, 'tok512.bin'), 'E_FORMAT', /file ends inside the entry of token 512/, 'token 512');
  const long = bytes.slice();
  new DataView(long.buffer).setInt32(4 + 4, 8, true); // token 0 claims 8 bytes, above max_token_length 7
  await expectError(() => parseLlama2cTokenizer(long, 512, 'tok512.bin'), 'E_FORMAT', /length 8 is outside 0..max_token_length \(7\)/, 'token 0');
  const notUtf8 = bytes.slice();
  notUtf8[4 + 8] = 0xff; // first byte of "<unk>"
  await expectError(() => parseLlama2cTokenizer(notUtf8, 512, 'tok512.bin'), 'E_FORMAT', /not valid UTF-8/, 'token 0');
});
