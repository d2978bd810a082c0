import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { AmalgamError } from '../src/errors.js';
import { GgufFile, GGUF_TYPE, serializeGguf } from '../src/io/gguf.js';
import { readLlama2cTokenizer } from '../src/io/llama2c.js';
import { TOKEN_TYPE, vocabFromGguf, vocabFromLlama2c, type SpVocab } from '../src/tokenizer/vocab.js';
import { buildHfTokenizer, deriveMerges } from '../src/tokenizer/hf.js';
import { convertToHf } from '../src/convert/to-hf.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';
import { llama2cEncode, loadRefTokenizer } from './helpers/llama2c-encode.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const BIN = 'models/stories260K/stories260K.bin';
const TOK = 'models/stories260K/tok512.bin';
const AID = 'models/aidreams260K/aidreams260K.bin';
const AID_TOK = 'models/aidreams260K/tok512.bin';
const VAL = 'datasets/tinystories/val.txt';
const EXPERT_TOKENIZER = 'experts/stories260K-agnews/tokenizer.json';

const GOLDEN_TEXT = 'Once upon a time, there was a little girl named Lily. She loved to play outside in the park.';
const GOLDEN_IDS = [
  1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292,
  411, 322, 265, 282, 295, 433, 426,
];

async function paragraphs(n: number): Promise<string[]> {
  const text = await readFile(fixture(VAL), 'utf8');
  return text.split('\n').filter((l) => l.trim() !== '').slice(0, n);
}

async function loadTokenizer(dir: string): Promise<Tokenizer> {
  const tj = JSON.parse(await readFile(join(dir, 'tokenizer.json'), 'utf8'));
  const tc = JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8'));
  return new Tokenizer(tj, tc);
}

test('GGUF and llama2.c vocabularies of stories260K agree', async (t) => {
  if (!haveFixtures(t, GGUF, TOK)) return;
  const g = await GgufFile.open(fixture(GGUF));
  const a = vocabFromGguf(g);
  await g.close();
  const b = vocabFromLlama2c(await readLlama2cTokenizer(fixture(TOK), 512));
  assert.deepEqual(b.tokens, a.tokens);
  assert.deepEqual(b.scores, a.scores);
  assert.deepEqual(b.types, a.types);
  assert.deepEqual([a.unkId, a.bosId, a.eosId], [0, 1, 2]);
  assert.equal(a.tokens[259], '\u2581t');
  assert.equal(deriveMerges(a).length, 165);
});

test('the derived tokenizer.json matches the one shipped with the expert fixtures', async (t) => {
  if (!haveFixtures(t, GGUF, EXPERT_TOKENIZER)) return;
  const g = await GgufFile.open(fixture(GGUF));
  const { tokenizer, tokenizerConfig } = buildHfTokenizer(vocabFromGguf(g), { modelMaxLength: 512 });
  await g.close();
  const expected = JSON.parse(await readFile(fixture(EXPERT_TOKENIZER), 'utf8'));
  assert.deepEqual(JSON.parse(JSON.stringify(tokenizer)), expected);
  assert.deepEqual(tokenizerConfig, {
    add_bos_token: true, add_eos_token: false, bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>',
    tokenizer_class: 'LlamaTokenizer', legacy: true, model_max_length: 512, clean_up_tokenization_spaces: false,
  });
});

test('converted tokenizer reproduces llama2.c encode on 300 TinyStories paragraphs', async (t) => {
  if (!haveFixtures(t, BIN, TOK, VAL)) return;
  const out = await mkdtemp(join(tmpdir(), 'amalgam-tok-'));
  try {
    await convertToHf(fixture(BIN), join(out, 'hf'));
    const tok = await loadTokenizer(join(out, 'hf'));
    const ref = loadRefTokenizer(fixture(TOK), 512);

    assert.deepEqual(llama2cEncode(ref, GOLDEN_TEXT), GOLDEN_IDS);
    assert.deepEqual(tok.encode(GOLDEN_TEXT).ids, GOLDEN_IDS);
    assert.equal(tok.decode(GOLDEN_IDS, { skip_special_tokens: true }), GOLDEN_TEXT);

    const lines = await paragraphs(300);
    assert.equal(lines.length, 300);
    assert.ok(lines[0]!.startsWith('Spot. Spot saw the shiny car'));
    let agree = 0;
    let tokens = 0;
    let roundTrips = 0;
    for (const line of lines) {
      const want = llama2cEncode(ref, line);
      const got = tok.encode(line).ids;
      tokens += want.length;
      if (JSON.stringify(got) === JSON.stringify(want)) agree++;
      else assert.deepEqual(got, want, `paragraph: ${line.slice(0, 60)}`);
      if (tok.decode(got, { skip_special_tokens: true }) === line) roundTrips++;
    }
    assert.equal(agree, 300);
    assert.equal(roundTrips, 300);
    assert.ok(tokens > 20_000, `${tokens} tokens compared`);
    t.diagnostic(`300/300 paragraphs agree, ${tokens} tokens compared, 300/300 decode back to the text`);
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});

test('aidreams260K tokenizer converts and matches llama2.c encode', async (t) => {
  if (!haveFixtures(t, AID, AID_TOK, VAL)) return;
  const out = await mkdtemp(join(tmpdir(), 'amalgam-tok-'));
  try {
    await convertToHf(fixture(AID), join(out, 'hf'));
    const tok = await loadTokenizer(join(out, 'hf'));
    const ref = loadRefTokenizer(fixture(AID_TOK), 512);
    const lines = [...(await paragraphs(100)), 'Echoes of vectors unfold, a gentle hum of precision'];
    let tokens = 0;
    for (const line of lines) {
      const want = llama2cEncode(ref, line);
      tokens += want.length;
      assert.deepEqual(tok.encode(line).ids, want, line.slice(0, 60));
      assert.equal(tok.decode(want, { skip_special_tokens: true }), line);
    }
    t.diagnostic(`${lines.length}/${lines.length} texts agree (${tokens} tokens)`);
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});

function synthetic(): SpVocab {
  const tokens = ['<unk>', '<s>', '</s>', '<0x41>', '\u2581', 'a', 'b', 'ab', '\u2581a', '\u2581ab', 'ba', '<user>'];
  const types = tokens.map((tk, i) =>
    i === 0 ? TOKEN_TYPE.UNKNOWN : i < 3 ? TOKEN_TYPE.CONTROL : i === 3 ? TOKEN_TYPE.BYTE : tk === '<user>' ? TOKEN_TYPE.USER_DEFINED : TOKEN_TYPE.NORMAL,
  );
  return { tokens, scores: tokens.map((_, i) => -i), types, bosId: 1, eosId: 2, unkId: 0, source: 'synthetic' };
}

test('merges, added tokens and special tokens of a small vocabulary', () => {
  const v = synthetic();
  assert.deepEqual(deriveMerges(v), [
    ['a', 'b'],
    ['\u2581', 'a'],
    ['\u2581', 'ab'],
    ['\u2581a', 'b'],
    ['b', 'a'],
  ]);
  const { tokenizer } = buildHfTokenizer(v, { modelMaxLength: 64 });
  const tk = tokenizer as { added_tokens: { id: number; content: string; special: boolean }[]; model: { merges: string[] } };
  assert.deepEqual(tk.added_tokens.map((a) => [a.id, a.content, a.special]), [[0, '<unk>', true], [1, '<s>', true], [2, '</s>', true], [11, '<user>', false]]);
  assert.deepEqual(tk.model.merges, ['a b', '\u2581 a', '\u2581 ab', '\u2581a b', 'b a']);
  const hf = new Tokenizer(tokenizer, { add_bos_token: true });
  assert.deepEqual(hf.encode('ab ba').ids, [1, 9, 4, 10]);
  assert.deepEqual(hf.encode('A').ids, [1, 4, 3], 'characters outside the vocabulary fall back to byte tokens');
  assert.equal(hf.decode([1, 9, 4, 10, 3], { skip_special_tokens: true }), 'ab baA');
});

test('vocabularies: unsupported tokenizer models, mismatched lengths, duplicates', async () => {
  const base = [
    { key: 'tokenizer.ggml.tokens', type: GGUF_TYPE.ARRAY, value: { elementType: GGUF_TYPE.STRING, values: ['<unk>', '<s>', '</s>', 'a'] } },
  ] as const;
  const mk = async (extra: { key: string; type: number; value: unknown }[]) =>
    GgufFile.fromBytes(serializeGguf({ kv: [...base, ...extra] as never, tensors: [] }), 'vocab.gguf');
  const err = (f: () => unknown, code: string, key: string) =>
    assert.throws(f, (e: unknown) => e instanceof AmalgamError && e.code === code && e.key === key && e.message.includes(`'${key}'`));
  const noModel = await mk([]);
  err(() => vocabFromGguf(noModel), 'E_MISSING', 'tokenizer.ggml.model');
  const gpt2 = await mk([{ key: 'tokenizer.ggml.model', type: GGUF_TYPE.STRING, value: 'gpt2' }]);
  err(() => vocabFromGguf(gpt2), 'E_UNSUPPORTED', 'tokenizer.ggml.model');
  const scores = await mk([
    { key: 'tokenizer.ggml.model', type: GGUF_TYPE.STRING, value: 'llama' },
    { key: 'tokenizer.ggml.scores', type: GGUF_TYPE.ARRAY, value: { elementType: GGUF_TYPE.FLOAT32, values: [0, 0] } },
  ]);
  err(() => vocabFromGguf(scores), 'E_METADATA', 'tokenizer.ggml.scores');
  const ok = vocabFromGguf(await mk([{ key: 'tokenizer.ggml.model', type: GGUF_TYPE.STRING, value: 'llama' }]));
  assert.deepEqual(ok.types, [TOKEN_TYPE.UNKNOWN, TOKEN_TYPE.CONTROL, TOKEN_TYPE.CONTROL, TOKEN_TYPE.NORMAL], 'types inferred when absent');
  assert.deepEqual(ok.scores, [0, 0, 0, 0]);
  const badBos = await mk([
    { key: 'tokenizer.ggml.model', type: GGUF_TYPE.STRING, value: 'llama' },
    { key: 'tokenizer.ggml.bos_token_id', type: GGUF_TYPE.UINT32, value: 9 },
  ]);
  err(() => vocabFromGguf(badBos), 'E_METADATA', 'tokenizer.ggml.tokens');
  err(
    () => vocabFromLlama2c({ path: 'tok.bin', maxTokenLength: 3, pieces: ['<unk>', 's', 'e', 'a b', 'a\u2581b'], scores: [0, 0, 0, 0, 0] }),
    'E_DUPLICATE',
    'pieces',
  );
});
