import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { BatchSampler, chunks, encodeExamples, IGNORE_INDEX, packWindows, padClassBatch, padLmBatch, permutation, windowBatch } from '../src/data/batching.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { AmalgamError } from '../src/errors.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

const MODEL = 'experts/stories260K-shakespeare';
const GOLDEN_TEXT = 'Once upon a time, there was a little girl named Lily. She loved to play outside in the park.';
const GOLDEN_IDS = [
  1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292,
  411, 322, 265, 282, 295, 433, 426,
];

describe('tokenizer', () => {
  test('encodes like llama2.c with and without BOS; decodes back', async (t) => {
    if (!haveFixtures(t, `${MODEL}/tokenizer.json`)) return;
    const tok = await loadTokenizer(fixture(MODEL));
    assert.equal(tok.bosId, 1);
    assert.equal(tok.eosId, 2);
    assert.equal(tok.vocabSize, 512);
    assert.deepEqual(tok.encode(GOLDEN_TEXT), GOLDEN_IDS);
    assert.deepEqual(tok.encode(GOLDEN_TEXT, { bos: false }), GOLDEN_IDS.slice(1));
    assert.deepEqual(tok.encode('Hi', { eos: true }).slice(-1), [2]);
    assert.equal(tok.decode(GOLDEN_IDS), GOLDEN_TEXT);
    assert.equal(tok.decode(tok.encode('naïve — ok')), 'naïve — ok');
    assert.equal(tok.decode([1, 403], { skipSpecial: false }).startsWith('<s>'), true);
  });

  test('a folder without tokenizer.json is an E_MISSING error', async () => {
    await assert.rejects(loadTokenizer('/nonexistent-folder'), (e: AmalgamError) => e.code === 'E_MISSING');
  });

  test('encodeExamples truncates on the chosen side, keeping BOS', async (t) => {
    if (!haveFixtures(t, `${MODEL}/tokenizer.json`)) return;
    const tok = await loadTokenizer(fixture(MODEL));
    const [right] = encodeExamples(tok, [{ text: GOLDEN_TEXT, label: 2 }], { maxLength: 5 });
    assert.deepEqual(Array.from(right!.ids), GOLDEN_IDS.slice(0, 5));
    assert.equal(right!.label, 2);
    const [left] = encodeExamples(tok, [{ text: GOLDEN_TEXT }], { maxLength: 5, truncationSide: 'left' });
    assert.deepEqual(Array.from(left!.ids), [1, ...GOLDEN_IDS.slice(-4)]);
    assert.equal(left!.label, undefined);
  });
});

describe('batches', () => {
  test('padded LM batch: shifted targets, masks, scored token count', () => {
    const b = padLmBatch([[1, 5, 6, 7], [1, 9]], 0);
    assert.equal(b.seqLen, 4);
    assert.deepEqual(Array.from(b.ids), [1, 5, 6, 7, 1, 9, 0, 0]);
    const X = IGNORE_INDEX;
    assert.deepEqual(Array.from(b.targets), [5, 6, 7, X, 9, X, X, X]);
    assert.deepEqual(Array.from(b.mask), [1, 1, 1, 1, 1, 1, 0, 0]);
    assert.deepEqual(Array.from(b.lengths), [4, 2]);
    assert.equal(b.tokens, 4);
    assert.equal(padLmBatch([[1, 2]], 0, 6).seqLen, 6);
    assert.throws(() => padLmBatch([[1, 2, 3]], 0, 2), AmalgamError);
  });

  test('padded classification batch', () => {
    const b = padClassBatch(
      [
        { ids: Int32Array.from([1, 4]), label: 2 },
        { ids: Int32Array.from([1, 5, 6]), label: 0 },
      ],
      3,
    );
    assert.deepEqual(Array.from(b.ids), [1, 4, 3, 1, 5, 6]);
    assert.deepEqual(Array.from(b.mask), [1, 1, 0, 1, 1, 1]);
    assert.deepEqual(Array.from(b.lengths), [2, 3]);
    assert.deepEqual(Array.from(b.labels), [2, 0]);
    assert.throws(() => padClassBatch([{ ids: Int32Array.from([1]) }], 0), /no label/);
  });

  test('packing into windows of L + 1 tokens, tail dropped; window batches', () => {
    const w = packWindows([[1, 2, 3], [1, 4], [1, 5, 6, 7], [1]], 3);
    assert.deepEqual(
      w.map((x) => Array.from(x)),
      [
        [1, 2, 3, 1],
        [4, 1, 5, 6],
      ],
    );
    const b = windowBatch(w);
    assert.equal(b.seqLen, 3);
    assert.deepEqual(Array.from(b.ids), [1, 2, 3, 4, 1, 5]);
    assert.deepEqual(Array.from(b.targets), [2, 3, 1, 1, 5, 6]);
    assert.equal(b.tokens, 6);
    assert.ok(b.mask.every((m) => m === 1));
  });
});

describe('shuffling', () => {
  test('seeded permutations are deterministic and complete', () => {
    const a = permutation(50, 7);
    assert.deepEqual(a, permutation(50, 7));
    assert.notDeepEqual(a, permutation(50, 8));
    assert.deepEqual(
      a.slice().sort((x, y) => x - y),
      Array.from({ length: 50 }, (_, i) => i),
    );
  });

  test('the batch sampler covers every item once per epoch and carries over', () => {
    const s = new BatchSampler(10, 4, { seed: 1 });
    const first = [...s.next(), ...s.next(), ...s.next().slice(0, 2)];
    assert.deepEqual(
      first.slice().sort((x, y) => x - y),
      Array.from({ length: 10 }, (_, i) => i),
    );
    assert.equal(s.epoch, 1);
    // The third batch takes the last 2 items of epoch 0 and the first 2 of epoch 1.
    const epoch1 = new Set(s.next());
    assert.equal(epoch1.size, 4);
  });

  test('the sampler is reproducible and in order without shuffling', () => {
    const a = new BatchSampler(7, 3, { seed: 2 });
    const b = new BatchSampler(7, 3, { seed: 2 });
    for (let i = 0; i < 10; i++) assert.deepEqual(a.next(), b.next());
    const plain = new BatchSampler(5, 2, { shuffle: false });
    assert.deepEqual([plain.next(), plain.next(), plain.next()], [[0, 1], [2, 3], [4, 0]]);
    assert.deepEqual([...chunks(5, 2)], [[0, 1], [2, 3], [4]]);
  });
});
