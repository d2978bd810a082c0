import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import { datasetFormat, detectTsvHeader, labelCounts, parseJsonl, parseTsv, parseTxt, readDataset, splitTail } from '../src/data/datasets.js';
import { buildDomainTask, readDomainSources, toJsonl } from '../src/data/domain.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'amalgam-data-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('.txt', () => {
  test('one example per non-empty line; whitespace-only lines and CR are dropped', () => {
    const ds = parseTxt('first line\r\n\n   \nsecond  \n\nthird');
    assert.deepEqual(
      ds.examples.map((e) => e.text),
      ['first line', 'second  ', 'third'],
    );
    assert.equal(ds.numClasses, 0);
  });

  test('blocks mode joins the lines of blank-line-separated blocks', () => {
    const ds = parseTxt('A:\nhello\nthere\n\n\nB:\nbye\n', { txtMode: 'blocks' });
    assert.deepEqual(
      ds.examples.map((e) => e.text),
      ['A:\nhello\nthere', 'B:\nbye'],
    );
  });

  test('TinyStories val.txt has 4,356 paragraphs', async (t) => {
    if (!haveFixtures(t, 'datasets/tinystories/val.txt')) return;
    const ds = await readDataset(fixture('datasets/tinystories/val.txt'));
    assert.equal(ds.examples.length, 4356);
    assert.ok(ds.examples[0]!.text.startsWith('Spot. Spot saw the shiny car'));
  });

  test('labels are refused for .txt', () => {
    assert.throws(() => parseTxt('a', { requireLabels: true }), AmalgamError);
  });
});

describe('.jsonl', () => {
  test('text and integer labels', () => {
    const ds = parseJsonl('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n');
    assert.deepEqual(ds.examples, [
      { text: 'a', label: 1 },
      { text: 'b', label: 0 },
    ]);
    assert.equal(ds.numClasses, 2);
    assert.equal(ds.labelNames, undefined);
  });

  test('chosen fields are joined; string labels map to sorted names or to given names', () => {
    const text = '{"q": "Q1", "a": "A1", "y": "pos"}\n{"q": "Q2", "a": "A2", "y": "neg"}\n';
    const ds = parseJsonl(text, { textFields: ['q', 'a'], labelField: 'y' });
    assert.deepEqual(
      ds.examples.map((e) => e.text),
      ['Q1\nA1', 'Q2\nA2'],
    );
    assert.deepEqual(ds.labelNames, ['neg', 'pos']);
    assert.deepEqual(
      ds.examples.map((e) => e.label),
      [1, 0],
    );
    const named = parseJsonl(text, { textFields: ['q'], labelField: 'y', labelNames: ['pos', 'neg'] });
    assert.deepEqual(
      named.examples.map((e) => e.label),
      [0, 1],
    );
    const nolab = parseJsonl(text, { textFields: ['q'], labelField: null });
    assert.equal(nolab.examples[0]!.label, undefined);
  });

  test('errors name the line and the field', () => {
    assert.throws(() => parseJsonl('{"text": "a"}\n{"body": "b"}', {}, 'f.jsonl'), (e: AmalgamError) => e.code === 'E_FORMAT' && /line 2/.test(e.message) && /body/.test(e.message));
    assert.throws(() => parseJsonl('{"text": "a"}\nnot json'), /line 2 is not valid JSON/);
    assert.throws(() => parseJsonl('{"text": "a"}', { requireLabels: true }), /no label field/);
    assert.throws(() => parseJsonl('{"text": "a", "label": "x"}', { labelNames: ['y'] }), /not one of/);
  });

  test('GSM8K questions', async (t) => {
    if (!haveFixtures(t, 'datasets/gsm8k/test.jsonl')) return;
    const ds = await readDataset(fixture('datasets/gsm8k/test.jsonl'), { textFields: ['question'] });
    assert.equal(ds.examples.length, 1319);
  });
});

describe('.tsv', () => {
  test('header detection', () => {
    assert.equal(detectTsvHeader([['sentence', 'label'], ['x', '1']]), true);
    assert.equal(detectTsvHeader([['index', 'sentence1', 'sentence2', 'label'], ['1', 'a', 'b', 'entailment']]), true);
    assert.equal(detectTsvHeader([['some text', 'Business'], ['other', 'World']]), false);
    assert.equal(detectTsvHeader([['some text', '1'], ['other', '0']]), false);
    assert.equal(detectTsvHeader([['txt', 'polarity'], ['other', '0']]), true);
  });

  test('SST-2 style: header, trimmed sentence, integer labels', () => {
    const ds = parseTsv('sentence\tlabel\nit \'s charming . \t1\nbleak \t0\n');
    assert.deepEqual(ds.examples, [
      { text: "it 's charming .", label: 1 },
      { text: 'bleak', label: 0 },
    ]);
    assert.equal(ds.numClasses, 2);
  });

  test('AG News style: no header, last column is a string label', () => {
    const ds = parseTsv('a story\tBusiness\nanother\tWorld\nthird\tBusiness\n');
    assert.deepEqual(ds.labelNames, ['Business', 'World']);
    assert.deepEqual(
      ds.examples.map((e) => [e.text, e.label]),
      [
        ['a story', 0],
        ['another', 1],
        ['third', 0],
      ],
    );
    const named = parseTsv('a story\tBusiness\n', { labelNames: ['World', 'Sports', 'Business', 'Sci/Tech'] });
    assert.equal(named.examples[0]!.label, 2);
  });

  test('RTE style: sentence pairs joined, index column skipped; explicit columns', () => {
    const text = 'index\tsentence1\tsentence2\tlabel\n1\tP one.\tH one.\tentailment\n2\tP two.\tH two.\tnot_entailment\n';
    const ds = parseTsv(text);
    assert.deepEqual(
      ds.examples.map((e) => e.text),
      ['P one.\nH one.', 'P two.\nH two.'],
    );
    assert.deepEqual(ds.labelNames, ['entailment', 'not_entailment']);
    const one = parseTsv(text, { textFields: ['sentence2'], textSeparator: ' ' });
    assert.equal(one.examples[1]!.text, 'H two.');
    const byIndex = parseTsv(text, { textFields: [1, 2], labelField: 3, textSeparator: ' | ' });
    assert.equal(byIndex.examples[0]!.text, 'P one. | H one.');
    assert.throws(() => parseTsv(text, { textFields: ['premise'] }), /no text column named 'premise'/);
    assert.throws(() => parseTsv('a\t1\nb\n', { header: false }), /line 2 has 1 columns/);
  });

  test('SST-2 dev fixture: 872 rows, 428 negative, 444 positive', async (t) => {
    if (!haveFixtures(t, 'datasets/sst2/dev.tsv')) return;
    const ds = await readDataset(fixture('datasets/sst2/dev.tsv'), { requireLabels: true });
    assert.equal(ds.examples.length, 872);
    assert.deepEqual(labelCounts(ds.examples, ds.numClasses), [428, 444]);
    assert.ok(!ds.examples[0]!.text.endsWith(' '));
  });
});

describe('files and splits', () => {
  test('format from the extension; readDataset reads files; empty files are errors', async () => {
    assert.equal(datasetFormat('a/b.TXT'), 'txt');
    assert.equal(datasetFormat('x.jsonl'), 'jsonl');
    assert.equal(datasetFormat('x.tsv'), 'tsv');
    assert.throws(() => datasetFormat('x.csv'), AmalgamError);
    const p = join(root, 'd.jsonl');
    await writeFile(p, '\ufeff{"text": "hi", "label": 3}\n');
    const ds = await readDataset(p);
    assert.deepEqual(ds.examples, [{ text: 'hi', label: 3 }]);
    assert.equal(ds.numClasses, 4);
    const empty = join(root, 'e.txt');
    await writeFile(empty, '\n \n');
    await assert.rejects(readDataset(empty), /no examples/);
    await assert.rejects(readDataset(join(root, 'missing.txt')), (e: AmalgamError) => e.code === 'E_IO');
  });

  test('splitTail keeps file order', () => {
    const { head, tail } = splitTail([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.1);
    assert.deepEqual(head, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert.deepEqual(tail, [10]);
  });
});

describe('domain task', () => {
  const files = ['datasets/tinystories/val.txt', 'datasets/tinyshakespeare/input.txt', 'datasets/gsm8k/train.jsonl', 'datasets/gsm8k/test.jsonl'];

  test('deterministic, balanced held-out set, disjoint from training', async (t) => {
    if (!haveFixtures(t, ...files)) return;
    const src = await readDomainSources({
      tinystories: fixture(files[0]!),
      shakespeare: fixture(files[1]!),
      gsm8kTrain: fixture(files[2]!),
      gsm8kTest: fixture(files[3]!),
    });
    const a = buildDomainTask(src, { seed: 3 });
    const b = buildDomainTask(src, { seed: 3 });
    assert.equal(toJsonl(a.train), toJsonl(b.train));
    assert.equal(toJsonl(a.eval), toJsonl(b.eval));
    assert.equal(a.train.length, 3000);
    assert.equal(a.eval.length, 450);
    assert.deepEqual(labelCounts(a.train, 3), [1000, 1000, 1000]);
    assert.deepEqual(labelCounts(a.eval, 3), [150, 150, 150]);
    const trainTexts = new Set(a.train.map((e) => e.text));
    assert.ok(a.eval.every((e) => !trainTexts.has(e.text)), 'held-out texts do not occur in training');
    assert.ok(a.train.filter((e) => e.label === 1).every((e) => e.text.length > 80));
    const c = buildDomainTask(src, { seed: 4 });
    assert.notEqual(toJsonl(c.train), toJsonl(a.train));
  });
});
