/**
 * stories260K end to end (MANIFEST.md "Known-good behaviour"): the model converted from the
 * GGUF fixture generates the manifest's greedy ids from BOS, scores 1.416 ± 0.005 nats/token on
 * the NLL protocol (5,903 tokens), and the GGUF- and .bin-converted models agree exactly.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ReferenceBackend } from '../src/backend/reference.js';
import { convertToHf } from '../src/convert/to-hf.js';
import { LlamaModel } from '../src/nn/model.js';
import { generate } from '../src/nn/generate.js';
import { evaluateNll } from '../src/nn/eval.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';
import { llama2cEncode, loadRefTokenizer } from './helpers/llama2c-encode.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const BIN = 'models/stories260K/stories260K.bin';
const TOK = 'models/stories260K/tok512.bin';
const VAL = 'datasets/tinystories/val.txt';

const GREEDY = [
  1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322,
  265, 282, 295, 433, 426,
];

/** llama2.c decoding: pieces as bytes, <0xNN> as that byte, the leading space dropped. */
function decode(vocab: string[], ids: number[]): string {
  const bytes: number[] = [];
  for (const id of ids) {
    const piece = vocab[id]!;
    const m = /^<0x([0-9A-F]{2})>$/.exec(piece);
    if (m) bytes.push(parseInt(m[1]!, 16));
    else for (let i = 0; i < piece.length; i++) bytes.push(piece.charCodeAt(i));
  }
  return Buffer.from(bytes).toString('utf8').replace(/^ /, '');
}

const be = new ReferenceBackend();
let dir = '';
let ggufModel: LlamaModel | undefined;

function ready(): boolean {
  return [GGUF, BIN, TOK, VAL].every((f) => existsSync(fixture(f)));
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-nn-stories-'));
  if (!ready()) return;
  await convertToHf(fixture(GGUF), join(dir, 'gguf'));
  ggufModel = await LlamaModel.fromFolder(join(dir, 'gguf'), { backend: be });
});

after(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

test('greedy generation from BOS gives the manifest ids', (t) => {
  if (!haveFixtures(t, GGUF, TOK, VAL, BIN)) return;
  const model = ggufModel!;
  const out = generate(model, [1], { maxNewTokens: GREEDY.length - 1, stopTokens: [1, 2] });
  assert.deepEqual(out.tokens, GREEDY);

  // 200 tokens continue as llama2.c's doc/stories260K.md temperature-0 sample does.
  const start = performance.now();
  const long = generate(model, [1], { maxNewTokens: 200, stopTokens: [1, 2] });
  const ms = performance.now() - start;
  assert.deepEqual(long.tokens.slice(0, GREEDY.length), GREEDY);
  assert.equal(long.generated.length, 200);
  const text = decode(loadRefTokenizer(fixture(TOK), 512).vocab, long.generated);
  assert.ok(
    text.startsWith(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said,",
    ),
    text,
  );
  t.diagnostic(`200 greedy tokens in ${ms.toFixed(0)} ms (reference backend, KV cache)`);
});

test('NLL protocol: 1.416 ± 0.005 nats/token over 5,903 tokens', (t) => {
  if (!haveFixtures(t, GGUF, TOK, VAL, BIN)) return;
  const tok = loadRefTokenizer(fixture(TOK), 512);
  const lines = readFileSync(fixture(VAL), 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .slice(0, 60);
  const seqs = lines.map((l) => llama2cEncode(tok, l).slice(0, 256));
  const start = performance.now();
  const r = evaluateNll(ggufModel!, seqs, { batchSize: 8 });
  t.diagnostic(`mean NLL ${r.meanNll.toFixed(5)} over ${r.tokens} tokens (ppl ${r.perplexity.toFixed(3)}) in ${(performance.now() - start).toFixed(0)} ms`);
  assert.equal(r.tokens, 5903);
  assert.ok(Math.abs(r.meanNll - 1.416) <= 0.005, `mean NLL ${r.meanNll}`);

  // Batch size changes padding and grouping, not the result.
  const one = evaluateNll(ggufModel!, seqs.slice(0, 10), { batchSize: 1 });
  const many = evaluateNll(ggufModel!, seqs.slice(0, 10), { batchSize: 10 });
  assert.equal(one.tokens, many.tokens);
  assert.ok(Math.abs(one.meanNll - many.meanNll) < 1e-5, `${one.meanNll} vs ${many.meanNll}`);
});

test('GGUF- and .bin-converted models give identical logits', async (t) => {
  if (!haveFixtures(t, GGUF, TOK, VAL, BIN)) return;
  await convertToHf(fixture(BIN), join(dir, 'bin'), { tokenizer: fixture(TOK) });
  const binModel = await LlamaModel.fromFolder(join(dir, 'bin'), { backend: be });
  const ids = GREEDY.slice(0, 24);
  const a = Float32Array.from(ggufModel!.forward(ids, 1, ids.length));
  const b = binModel.forward(ids, 1, ids.length);
  assert.equal(a.length, b.length);
  assert.ok(a.every((v, i) => v === b[i]), 'logits differ');
});
