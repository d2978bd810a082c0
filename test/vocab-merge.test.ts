/** Tokenizer merges: output vocabularies, permuted embeddings and chat templates (merge-methods.md §5, §6.7, §6.8). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { AmalgamError } from '../src/errors.js';
import { effectiveTokenizer, parseMergeConfig, parseModelReference, referencedModels } from '../src/config/index.js';
import type { TokenEmbeddingConfig, TokenizerConfig } from '../src/config/types.js';
import {
  buildMergedVocabulary,
  builtinChatTemplate,
  CHAT_TEMPLATE_NAMES,
  chatTemplateOf,
  loadModelTokenizer,
  mergedTokenizerFiles,
  readHfVocabulary,
  resolveChatTemplate,
  stripHfTokenizer,
  type HfAddedToken,
  type MergedVocabulary,
  type ModelTokenizer,
} from '../src/tokenizer/merge.js';
import {
  buildPermutedEmbedding,
  buildPermutedEmbeddings,
  checkEmbeddingWidths,
  embedShapeRule,
  planEmbeddingPermutation,
  plannedEmbedShape,
  permutedEmbeddingSources,
  type EmbeddingMatrix,
} from '../src/merge/embed.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

type Json = Record<string, unknown>;
const ref = (id: string) => parseModelReference(id);

// ---------------------------------------------------------------------------------------------
// Hand-made tokenizers

const SPECIAL = (id: number, content: string, extra: Partial<HfAddedToken> = {}): HfAddedToken => ({
  id,
  content,
  single_word: false,
  lstrip: false,
  rstrip: false,
  normalized: false,
  special: true,
  ...extra,
});

/** A whitespace-split BPE tokenizer over `vocab` (token → id) with `merges`. */
function bpe(vocab: Record<string, number>, merges: string[], added: HfAddedToken[]): Json {
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: { type: 'WhitespaceSplit' },
    post_processor: null,
    decoder: null,
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: '<unk>',
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
}

const SPECIALS = [SPECIAL(0, '<unk>'), SPECIAL(1, '<s>'), SPECIAL(2, '</s>')];

/** A: base. */
const TOK_A = bpe({ '<unk>': 0, '<s>': 1, '</s>': 2, a: 3, b: 4, c: 5, ab: 6, abc: 7 }, ['a b', 'ab c'], SPECIALS);
/** B: A plus `d` and the special `<tool>`. */
const TOK_B = bpe({ '<unk>': 0, '<s>': 1, '</s>': 2, a: 3, b: 4, c: 5, ab: 6, abc: 7, d: 8 }, ['a b', 'ab c'], [
  ...SPECIALS,
  SPECIAL(9, '<tool>'),
]);
/** C: another order, no `ab`/`abc`, with `d`, `e`, and `<tool>` added with other settings. */
const TOK_C = bpe({ '<unk>': 0, '<s>': 1, '</s>': 2, c: 3, b: 4, a: 5, d: 6, e: 7 }, [], [...SPECIALS, SPECIAL(8, '<tool>', { lstrip: true })]);

const CFG_A: Json = { tokenizer_class: 'PreTrainedTokenizerFast', bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>', chat_template: '{{ chatml-ish }} template A' };

function tokenizers(extra: Record<string, ModelTokenizer | null> = {}): Record<string, ModelTokenizer | null> {
  return {
    A: { tokenizer: TOK_A, tokenizerConfig: CFG_A, vocabSize: 8 },
    B: { tokenizer: TOK_B, vocabSize: 10 },
    C: { tokenizer: TOK_C, vocabSize: 9 },
    ...extra,
  };
}

function build(tokenizer: Partial<TokenizerConfig> = {}, opts: { base?: string | null; models?: string[]; extra?: Record<string, ModelTokenizer | null> } = {}): MergedVocabulary {
  const models = opts.models ?? ['A', 'B', 'C'];
  return buildMergedVocabulary({
    tokenizer: { source: 'union', ...tokenizer },
    ...(opts.base === null ? {} : { baseModel: ref(opts.base ?? 'A') }),
    models: models.map(ref),
    tokenizers: tokenizers(opts.extra),
  });
}

// Embedding matrices of width 3 with recognisable rows.
const W = 3;
function matrix(rows: number, row: (i: number) => number[]): EmbeddingMatrix {
  const data = new Float32Array(rows * W);
  for (let i = 0; i < rows; i++) data.set(row(i), i * W);
  return { data, shape: [rows, W] };
}
const rowA = (i: number) => [i, 2 * i, 1];
const rowB = (i: number) => [10 + i, 20, 2 * i];
const rowC = (i: number) => [100 + i, -i, 3];
const MATRICES = new Map<string, EmbeddingMatrix>([
  ['A', matrix(8, rowA)],
  ['B', matrix(10, rowB)],
  ['C', matrix(9, rowC)],
]);

function rowOf(out: Float32Array, r: number): number[] {
  return Array.from(out.subarray(r * W, (r + 1) * W));
}
const mean = (...rows: number[][]) => rows[0].map((_, j) => rows.reduce((s, r) => s + r[j], 0) / rows.length);

function tokens(entries: Record<string, TokenEmbeddingConfig>): Record<string, TokenEmbeddingConfig> {
  return entries;
}

function amalgamError(fn: () => unknown, code: string, re: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof AmalgamError, `expected AmalgamError, got ${e}`);
    assert.equal(e.code, code);
    assert.match(e.message, re);
    return true;
  });
}

// ---------------------------------------------------------------------------------------------
// Reading vocabularies

test('readHfVocabulary: object and Unigram vocabularies, added tokens and their flags', () => {
  const v = readHfVocabulary(TOK_C);
  assert.equal(v.modelType, 'BPE');
  assert.equal(v.size, 9);
  assert.equal(v.ids.get('a'), 5);
  assert.equal(v.ids.get('<tool>'), 8);
  assert.deepEqual(
    v.added.map((a) => [a.id, a.content, a.special, a.lstrip]),
    [
      [0, '<unk>', true, false],
      [1, '<s>', true, false],
      [2, '</s>', true, false],
      [8, '<tool>', true, true],
    ],
  );
  const uni = readHfVocabulary({ model: { type: 'Unigram', vocab: [['<unk>', 0], ['▁x', -1.5], ['y', -2]] }, added_tokens: [{ id: 3, content: '<pad>' }] });
  assert.equal(uni.modelType, 'Unigram');
  assert.deepEqual([...uni.ids], [['<unk>', 0], ['▁x', 1], ['y', 2], ['<pad>', 3]]);
  // Without `special`, an added token is normalized.
  assert.equal(uni.added[0].normalized, true);
  assert.equal(uni.added[0].special, false);
  amalgamError(() => readHfVocabulary({ model: {} }, { file: 'x/tokenizer.json' }), 'E_FORMAT', /x\/tokenizer\.json.*model\.vocab/);
  amalgamError(() => readHfVocabulary({ model: { vocab: { a: -1 } } }), 'E_FORMAT', /"a" has id -1/);
});

test('stripHfTokenizer removes tokens with id ≥ vocab_size, their added entries and merges', () => {
  const { tokenizer, removed } = stripHfTokenizer(TOK_B, 8);
  assert.deepEqual(removed.sort(), ['<tool>', 'd']);
  const v = readHfVocabulary(tokenizer);
  assert.equal(v.size, 8);
  assert.equal(v.ids.has('d'), false);
  const cut = stripHfTokenizer(TOK_A, 7).tokenizer;
  assert.deepEqual((cut.model as Json).merges, ['a b']);
  assert.equal(stripHfTokenizer(TOK_A, 8).tokenizer, TOK_A);
});

// ---------------------------------------------------------------------------------------------
// Output vocabularies

test('union: base tokens first, then other models\' ordinary tokens, then added tokens, in model order', () => {
  const v = build();
  assert.equal(v.source, 'union');
  assert.equal(v.base, 'A');
  assert.equal(v.tokenCount, 11);
  assert.equal(v.rowCount, 11);
  assert.deepEqual(v.tokens, ['<unk>', '<s>', '</s>', 'a', 'b', 'c', 'ab', 'abc', 'd', 'e', '<tool>']);
  assert.deepEqual(
    v.appended.map((a) => [a.id, a.content, a.special, a.normalized, a.lstrip]),
    [
      [8, 'd', false, true, false],
      [9, 'e', false, true, false],
      [10, '<tool>', true, false, false],
    ],
  );
  // The first settings of <tool> (B's, lstrip false) win over C's, with a warning.
  assert.ok(v.warnings.some((w) => w.includes('"<tool>"') && w.includes('different settings')));
  // tokenizer.json keeps the base's entries and appends; tokenizer_config.json is the base's with added_tokens_decoder.
  assert.equal((v.tokenizerJson.added_tokens as unknown[]).length, 6);
  assert.deepEqual((v.tokenizerJson.model as Json).vocab, (TOK_A.model as Json).vocab);
  assert.equal(v.tokenizerConfig.bos_token, '<s>');
  assert.deepEqual(Object.keys(v.tokenizerConfig.added_tokens_decoder as Json), ['0', '1', '2', '8', '9', '10']);
  assert.deepEqual((v.tokenizerConfig.added_tokens_decoder as Json)['10'], {
    content: '<tool>',
    lstrip: false,
    normalized: false,
    rstrip: false,
    single_word: false,
    special: true,
  });
  // Per-model rows.
  assert.equal(v.models.get('C')!.rows.get('a'), 5);
  assert.equal(v.models.get('C')!.rows.has('ab'), false);
});

test('union: model order decides ids; tokens beyond a model\'s vocab_size are ignored', () => {
  const v = build({}, { models: ['A', 'C', 'B'] });
  assert.deepEqual(v.tokens.slice(8), ['d', 'e', '<tool>']);
  // C first now: d and e come from C in C's id order, <tool> with C's settings.
  assert.equal(v.appended[2].lstrip, true);
  // B with vocab_size 9: its <tool> (id 9) is not a real row.
  const w = build({}, { models: ['A', 'B'], extra: { B: { tokenizer: TOK_B, vocabSize: 9 } } });
  assert.deepEqual(w.tokens.slice(8), ['d']);
  assert.equal(w.models.get('B')!.rows.has('<tool>'), false);
  assert.ok(w.warnings.some((m) => m.includes('model B') && m.includes('vocab_size 9')));
});

test('union strips the base to its vocab_size; without base_model the first model is the base', () => {
  const v = build({}, { extra: { A: { tokenizer: TOK_A, vocabSize: 7 } } });
  // abc (id 7) is gone from the base, then comes back from B as an added token.
  assert.deepEqual(v.tokens, ['<unk>', '<s>', '</s>', 'a', 'b', 'c', 'ab', 'abc', 'd', 'e', '<tool>']);
  assert.deepEqual(v.appended.map((a) => a.content), ['abc', 'd', 'e', '<tool>']);
  assert.deepEqual((v.tokenizerJson.model as Json).merges, ['a b']);
  assert.ok(v.warnings.some((m) => m.includes('base model A') && m.includes('"abc"')));

  const nb = build({}, { base: null, models: ['C', 'A', 'B'] });
  assert.equal(nb.base, 'C');
  assert.deepEqual(nb.tokens.slice(0, 9), ['<unk>', '<s>', '</s>', 'c', 'b', 'a', 'd', 'e', '<tool>']);
  assert.deepEqual(nb.tokens.slice(9), ['ab', 'abc']);
});

test('base and model sources; tokens: keys the vocabulary lacks are appended; padding', () => {
  const base = build({ source: 'base', tokens: tokens({ '<new>': { force: false }, a: { force: false } }), pad_to_multiple_of: 4 });
  assert.equal(base.source, 'base');
  assert.deepEqual(base.tokens, ['<unk>', '<s>', '</s>', 'a', 'b', 'c', 'ab', 'abc', '<new>']);
  assert.equal(base.tokenCount, 9);
  assert.equal(base.rowCount, 12);
  assert.deepEqual(base.appended, [{ id: 8, content: '<new>', single_word: false, lstrip: false, rstrip: false, normalized: true, special: false }]);

  const fromC = build({ source: ref('C') });
  assert.equal(fromC.source, 'C');
  assert.deepEqual(fromC.tokens, ['<unk>', '<s>', '</s>', 'c', 'b', 'a', 'd', 'e', '<tool>']);
  assert.equal(fromC.tokenizerJson, TOK_C);
  assert.deepEqual(Object.keys(fromC.tokenizerConfig), ['added_tokens_decoder']);
  assert.equal(fromC.rowCount, 9);
});

test('a model whose tokenizer cannot be loaded is assumed to equal the base\'s', () => {
  const v = build({}, { models: ['A', 'B', 'D'], extra: { D: null } });
  assert.deepEqual(v.tokens.slice(8), ['d', '<tool>']);
  const d = v.models.get('D')!;
  assert.equal(d.loaded, false);
  assert.equal(d.rows.get('abc'), 7);
  assert.ok(v.warnings.some((m) => m.includes('model D') && m.includes('assuming')));
  // A malformed tokenizer.json counts as not loadable.
  const bad = build({}, { models: ['A', 'D'], extra: { D: { tokenizer: { model: 3 } } } });
  assert.equal(bad.models.get('D')!.loaded, false);
  // The base and the source model must load.
  amalgamError(() => build({}, { extra: { A: null } }), 'E_MISSING', /base model A has no tokenizer\.json/);
  amalgamError(() => build({ source: ref('Z') }), 'E_MISSING', /tokenizer source model Z/);
});

// ---------------------------------------------------------------------------------------------
// Default rows and permuted embeddings

test('default rows by count: one model, base, mean without base, zeros', () => {
  const v = build({ tokens: tokens({ '<new>': { force: false } }) });
  assert.deepEqual(v.tokens.slice(8), ['d', 'e', '<tool>', '<new>']);
  const plan = planEmbeddingPermutation(v, { models: ['A', 'B', 'C'], base: 'A', tensorName: 'model.embed_tokens.weight' });
  assert.deepEqual(Array.from(plan.rows.get('C')!), [0, 1, 2, 5, 4, 3, -1, -1, 6, 7, 8, -1]);
  assert.deepEqual(Array.from(plan.rows.get('A')!), [0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1]);
  assert.deepEqual(plan.defaults.get(6), { rule: 'base', from: [{ model: 'A', row: 6 }] });
  assert.deepEqual(plan.defaults.get(8), { rule: 'mean', from: [{ model: 'B', row: 8 }, { model: 'C', row: 6 }] });
  assert.deepEqual(plan.defaults.get(9), { rule: 'single', from: [{ model: 'C', row: 7 }] });
  assert.deepEqual(plan.defaults.get(11), { rule: 'none', from: [] });
  assert.equal(plan.defaults.has(3), false);
  assert.ok(plan.warnings.some((w) => w.includes('"<new>"') && w.includes('zeros')));

  const out = buildPermutedEmbeddings(plan, MATRICES);
  const a = out.get('A')!;
  const c = out.get('C')!;
  assert.deepEqual(a.shape, [12, W]);
  assert.deepEqual(rowOf(c.data, 3), rowC(5)); // own row of `a`
  assert.deepEqual(rowOf(c.data, 6), rowA(6)); // ab: A and B have it, base A → A's row
  assert.deepEqual(rowOf(a.data, 8), mean(rowB(8), rowC(6))); // d: B and C, base lacks → mean
  assert.deepEqual(rowOf(out.get('B')!.data, 8), rowB(8)); // B keeps its own d
  assert.deepEqual(rowOf(a.data, 9), rowC(7)); // e: only C
  assert.deepEqual(rowOf(out.get('B')!.data, 9), rowC(7));
  assert.deepEqual(rowOf(a.data, 10), mean(rowB(9), rowC(8))); // <tool>
  assert.deepEqual(rowOf(a.data, 11), [0, 0, 0]); // <new>: nobody
  assert.deepEqual(rowOf(c.data, 11), [0, 0, 0]);

  // Without a base, a token several models have defaults to their mean.
  const nb = planEmbeddingPermutation(v, { models: ['A', 'B', 'C'], base: null });
  assert.deepEqual(nb.defaults.get(6), { rule: 'mean', from: [{ model: 'A', row: 6 }, { model: 'B', row: 6 }] });
  assert.deepEqual(rowOf(buildPermutedEmbedding(nb, 'C', MATRICES), 6), mean(rowA(6), rowB(6)));
});

test('configured sources: model, model_token by token and by id, zero; force', () => {
  const cfg = tokens({
    a: { source: ref('C'), force: true },
    b: { source: { kind: 'model_token', model: ref('B'), token: 'd' }, force: false },
    ab: { source: { kind: 'model_token', model: ref('C'), token_id: 7 }, force: false },
    abc: { source: { kind: 'zero' }, force: false },
    c: { source: { kind: 'zero' }, force: true },
    e: { force: true },
  });
  const v = build({ tokens: cfg });
  const plan = planEmbeddingPermutation(v, { models: ['A', 'B', 'C'], base: 'A', tokens: cfg });
  assert.deepEqual(plan.defaults.get(3), { rule: 'configured', from: [{ model: 'C', row: 5 }] });
  assert.deepEqual(plan.defaults.get(4), { rule: 'configured', from: [{ model: 'B', row: 8 }] });
  assert.deepEqual(plan.defaults.get(6), { rule: 'configured', from: [{ model: 'C', row: 7 }] });
  assert.deepEqual(plan.defaults.get(7), { rule: 'configured', from: [] });
  // `e` has force but no source: the count rule (only C) gives the default.
  assert.deepEqual(plan.defaults.get(9), { rule: 'single', from: [{ model: 'C', row: 7 }] });
  const out = buildPermutedEmbeddings(plan, MATRICES);
  for (const m of ['A', 'B', 'C']) {
    const x = out.get(m)!.data;
    assert.deepEqual(rowOf(x, 3), rowC(5), `${m}: a is forced to C's row`);
    assert.deepEqual(rowOf(x, 5), [0, 0, 0], `${m}: c is forced to zeros`);
    assert.deepEqual(rowOf(x, 9), rowC(7), `${m}: e is forced to its default`);
  }
  // Without force, models keep their own rows; the configured default fills the others.
  assert.deepEqual(rowOf(out.get('A')!.data, 4), rowA(4));
  assert.deepEqual(rowOf(out.get('C')!.data, 4), rowC(4));
  assert.deepEqual(rowOf(out.get('A')!.data, 6), rowA(6));
  assert.deepEqual(rowOf(out.get('C')!.data, 6), rowC(7));
  assert.deepEqual(rowOf(out.get('C')!.data, 7), [0, 0, 0]);
  assert.deepEqual(rowOf(out.get('B')!.data, 7), rowB(7));
});

test('configuration errors name the token, the model and the key', () => {
  const v = build({ tokens: tokens({ e: { force: false } }) });
  const plan = (t: Record<string, TokenEmbeddingConfig>, rowCounts?: Record<string, number>) =>
    planEmbeddingPermutation(v, { models: ['A', 'B', 'C'], base: 'A', tokens: t, ...(rowCounts ? { rowCounts } : {}) });
  amalgamError(() => plan({ e: { source: ref('A'), force: false } }), 'E_CONFIG', /'tokenizer\.tokens\["e"\]\.source'.*token "e": model A does not have this token/);
  amalgamError(() => plan({ e: { source: ref('X'), force: false } }), 'E_CONFIG', /model X is not an input of this tensor/);
  amalgamError(
    () => plan({ e: { source: { kind: 'model_token', model: ref('B'), token: 'zz' }, force: false } }),
    'E_CONFIG',
    /model B has no token "zz"/,
  );
  amalgamError(
    () => plan({ e: { source: { kind: 'model_token', model: ref('B'), token_id: 10 }, force: false } }, { A: 8, B: 10, C: 9 }),
    'E_CONFIG',
    /row 10 is out of range for model B, whose embedding has 10 rows/,
  );
  amalgamError(() => plan({ zz: { force: true } }), 'E_CONFIG', /"zz" is not in the output vocabulary/);
  amalgamError(() => planEmbeddingPermutation(v, { models: ['A', 'Q'] }), 'E_CONFIG', /model Q is not one of the models/);
  // token_id out of range found when applying, without row counts up front.
  const p = plan({ e: { source: { kind: 'model_token', model: ref('B'), token_id: 10 }, force: false } });
  amalgamError(() => buildPermutedEmbedding(p, 'A', MATRICES), 'E_SHAPE', /token "e" needs row 10 of model B, whose embedding has 10 rows/);
  // A matrix with fewer rows than the vocabulary says.
  amalgamError(() => plan({}, { A: 7, B: 10, C: 9 }), 'E_SHAPE', /model A: token "abc" is row 7 of its vocabulary, but its embedding has 7 rows/);
});

test('embedding widths must match', () => {
  const v = build();
  const plan = planEmbeddingPermutation(v, { models: ['A', 'B', 'C'], base: 'A', tensorName: 'lm_head.weight' });
  amalgamError(() => checkEmbeddingWidths(plan, { A: [8, 3], B: [10, 4], C: [9, 3] }), 'E_SHAPE', /lm_head\.weight.*embedding widths differ \(A: 3, B: 4, C: 3\)/);
  assert.equal(checkEmbeddingWidths(plan, { A: [8, 3], B: [10, 3], C: [9, 3] }), 3);
  const wide = new Map(MATRICES);
  wide.set('B', { data: new Float32Array(40), shape: [10, 4] });
  amalgamError(() => buildPermutedEmbeddings(plan, wide), 'E_SHAPE', /widths differ/);
  amalgamError(() => buildPermutedEmbedding(plan, 'A', wide), 'E_SHAPE', /widths differ \(A: 3, B: 4\)/);
});

test('padding rows are the mean of the model\'s own output rows; only needed matrices are read', () => {
  const v = build({ pad_to_multiple_of: 8 });
  assert.equal(v.rowCount, 16);
  const plan = planEmbeddingPermutation(v, { models: ['A', 'B', 'C'], base: 'A' });
  const read: string[] = [];
  const reader = (m: string) => {
    read.push(m);
    return MATRICES.get(m);
  };
  const b = buildPermutedEmbedding(plan, 'B', reader);
  assert.deepEqual(permutedEmbeddingSources(plan, 'B'), ['B', 'C']);
  assert.deepEqual(read.sort(), ['B', 'C']);
  const realRows = Array.from({ length: 11 }, (_, t) => rowOf(b, t));
  const padMean = mean(...realRows).map((x) => Math.fround(x));
  for (let t = 11; t < 16; t++) assert.deepEqual(rowOf(b, t), padMean);
  assert.deepEqual(permutedEmbeddingSources(plan, 'A'), ['A', 'B', 'C']);
});

test('ids without a token are filled like padding', () => {
  const holey = bpe({ '<unk>': 0, a: 1, b: 2, d: 4 }, [], [SPECIAL(0, '<unk>')]);
  const v = buildMergedVocabulary({
    tokenizer: { source: ref('H') },
    baseModel: ref('A'),
    models: [ref('A'), ref('H')],
    tokenizers: { A: { tokenizer: TOK_A }, H: { tokenizer: holey } },
  });
  assert.equal(v.tokenCount, 5);
  assert.equal(v.tokens[3], undefined);
  const plan = planEmbeddingPermutation(v, { models: ['A', 'H'], base: 'A' });
  const h = buildPermutedEmbedding(plan, 'H', new Map([['A', matrix(8, rowA)], ['H', matrix(5, rowB)]]));
  const expected = mean(rowB(0), rowB(1), rowB(2), rowB(4)).map((x) => Math.fround(x));
  assert.deepEqual(rowOf(h, 3), expected);
  assert.deepEqual(rowOf(h, 4), rowB(4));
});

test('from a YAML configuration', () => {
  const cfg = parseMergeConfig(
    [
      'merge_method: linear',
      'base_model: A',
      'models:',
      '  - model: A',
      '    parameters: {weight: 1.0}',
      '  - model: B',
      '    parameters: {weight: 1.0}',
      '  - model: C',
      '    parameters: {weight: 1.0}',
      'tokenizer:',
      '  source: union',
      '  pad_to_multiple_of: 4',
      '  tokens:',
      '    e: {source: B, force: true}',
    ].join('\n'),
  );
  const tk = effectiveTokenizer(cfg)!;
  assert.throws(
    () => {
      const v = buildMergedVocabulary({ tokenizer: tk, baseModel: cfg.base_model, models: referencedModels(cfg), tokenizers: tokenizers() });
      planEmbeddingPermutation(v, { models: referencedModels(cfg), base: cfg.base_model, tokens: tk.tokens });
    },
    /model B does not have this token/,
  );
  const ok = { ...tk, tokens: { e: { source: ref('C'), force: true } } };
  const v = buildMergedVocabulary({ tokenizer: ok, baseModel: cfg.base_model, models: referencedModels(cfg), tokenizers: tokenizers() });
  assert.equal(v.rowCount, 12);
  const plan = planEmbeddingPermutation(v, { models: referencedModels(cfg), base: cfg.base_model, tokens: ok.tokens });
  assert.deepEqual(rowOf(buildPermutedEmbedding(plan, 'B', MATRICES), 9), rowC(7));
});

// ---------------------------------------------------------------------------------------------
// The built tokenizer loads and encodes

test('the merged tokenizer.json loads and encodes an added token to its new id', () => {
  const v = build();
  const files = mergedTokenizerFiles(v);
  const tok = new Tokenizer(JSON.parse(files['tokenizer.json']), JSON.parse(files['tokenizer_config.json']));
  assert.deepEqual(tok.encode('ab <tool> c').ids, [6, 10, 5]);
  assert.equal(tok.token_to_id('<tool>'), 10);
  assert.equal(tok.id_to_token(9), 'e');
  assert.equal(tok.get_vocab().size, 11);
});

test('stories260K tokenizer: union with a model that adds special tokens', async (t) => {
  const rel = 'experts/stories260K-agnews';
  if (!haveFixtures(t, `${rel}/tokenizer.json`, `${rel}/tokenizer_config.json`, `${rel}/config.json`)) return;
  const base = await loadModelTokenizer(fixture(rel));
  assert.equal(base.vocabSize, 512);
  assert.ok(base.tokenizer && base.tokenizerConfig);
  const baseJson = base.tokenizer!;
  const chat: ModelTokenizer = {
    tokenizer: {
      ...baseJson,
      added_tokens: [
        ...(baseJson.added_tokens as unknown[]),
        SPECIAL(512, '<|im_start|>'),
        SPECIAL(513, '<|im_end|>'),
      ],
    },
    tokenizerConfig: { ...base.tokenizerConfig, chat_template: builtinChatTemplate('chatml') },
    vocabSize: 514,
  };
  const same = buildMergedVocabulary({
    tokenizer: { source: 'union' },
    baseModel: 'base',
    models: ['base', 'other'],
    tokenizers: { base, other: base },
  });
  assert.equal(same.appended.length, 0);
  assert.equal(same.tokenCount, 512);
  assert.equal(same.tokenizerJson, baseJson);

  const v = buildMergedVocabulary({
    tokenizer: { source: 'union', pad_to_multiple_of: 64 },
    baseModel: 'base',
    models: ['base', 'chat'],
    tokenizers: { base, chat },
  });
  assert.equal(v.tokenCount, 514);
  assert.equal(v.rowCount, 576);
  assert.deepEqual(v.appended.map((a) => [a.id, a.content]), [
    [512, '<|im_start|>'],
    [513, '<|im_end|>'],
  ]);
  const template = resolveChatTemplate('auto', [base, chat]);
  assert.equal(template, builtinChatTemplate('chatml')!.trim());
  const files = mergedTokenizerFiles(v, template);
  assert.equal(files['chat_template.jinja'], template);
  const config = JSON.parse(files['tokenizer_config.json']);
  assert.equal(config.chat_template, template);
  assert.equal(config.model_max_length, 512);
  const tok = new Tokenizer(JSON.parse(files['tokenizer.json']), config);
  const ids = tok.encode('<|im_start|>Once upon a time<|im_end|>').ids;
  assert.equal(ids[1], 512);
  assert.equal(ids[ids.length - 1], 513);
  // Ordinary text encodes as the base tokenizer does.
  const ref0 = new Tokenizer(baseJson, base.tokenizerConfig!);
  assert.deepEqual(tok.encode('Once upon a time').ids, ref0.encode('Once upon a time').ids);

  // Embeddings: the base has no rows for the new tokens; the chat model's rows are taken.
  const plan = planEmbeddingPermutation(v, { models: ['base', 'chat'], base: 'base', rowCounts: { base: 512, chat: 514 } });
  assert.deepEqual(plan.defaults.get(512), { rule: 'single', from: [{ model: 'chat', row: 512 }] });
  const mats = new Map([
    ['base', matrix(512, (i) => [i, 0, 0])],
    ['chat', matrix(514, (i) => [i, 1, 0])],
  ]);
  const out = buildPermutedEmbedding(plan, 'base', mats);
  assert.deepEqual(rowOf(out, 100), [100, 0, 0]);
  assert.deepEqual(rowOf(out, 513), [513, 1, 0]);
  const padding = Math.fround(((511 * 512) / 2 + 512 + 513) / 514);
  assert.deepEqual(rowOf(out, 600 - 25), [padding, Math.fround(2 / 514), 0]);
});

test('loadModelTokenizer: a folder without tokenizer.json', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'amalgam-vocab-'));
  try {
    const t = await loadModelTokenizer(dir);
    assert.equal(t.tokenizer, null);
    assert.equal(t.vocabSize, undefined);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------------------------------------
// Chat templates

test('chat_template: auto, built-in names, literal templates', () => {
  const t1 = '{% for m in messages %}{{ m.content }}{% endfor %}';
  const t2 = '{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}';
  const inputs: (ModelTokenizer | null)[] = [
    { tokenizer: null, tokenizerConfig: { chat_template: t1 } },
    { tokenizer: null, chatTemplate: t2 + '\n' },
    null,
    { tokenizer: null, tokenizerConfig: { chat_template: [{ name: 'default', template: t2 }, { name: 'tool_use', template: t1 }] } },
  ];
  assert.equal(resolveChatTemplate('auto', inputs), t2);
  // A tie goes to the earliest.
  assert.equal(resolveChatTemplate('auto', inputs.slice(0, 2)), t1);
  const warnings: string[] = [];
  assert.equal(resolveChatTemplate('auto', [null, { tokenizer: null }], (m) => warnings.push(m)), undefined);
  assert.equal(warnings.length, 1);
  assert.equal(chatTemplateOf({ tokenizer: null, tokenizerConfig: { chat_template: { default: t1 } } }), t1);

  for (const name of CHAT_TEMPLATE_NAMES) {
    const tpl = resolveChatTemplate(name, []);
    assert.ok(tpl && tpl.includes('{%') && tpl.includes('messages'), name);
  }
  assert.match(builtinChatTemplate('chatml')!, /<\|im_start\|>/);
  assert.match(builtinChatTemplate('llama3')!, /<\|start_header_id\|>/);
  assert.match(builtinChatTemplate('mistral')!, /\[INST\]/);
  assert.match(builtinChatTemplate('alpaca')!, /### Instruction:/);
  assert.match(builtinChatTemplate('exaone')!, /\[\|endofturn\|\]/);
  assert.equal(resolveChatTemplate(t2, []), t2);
  assert.equal(resolveChatTemplate(undefined, inputs), undefined);
  amalgamError(() => resolveChatTemplate('chatml2', []), 'E_CONFIG', /'chat_template'.*neither a known template name/);
  amalgamError(() => resolveChatTemplate('{{ short }}', []), 'E_CONFIG', /neither/);
});

// ---------------------------------------------------------------------------------------------
// Without a tokenizer configuration

test('embedding shapes without a tokenizer configuration', () => {
  assert.equal(embedShapeRule('linear'), 'common_submatrix');
  assert.equal(embedShapeRule('arcee_fusion'), 'common_submatrix');
  assert.equal(embedShapeRule('ties'), 'base_shape');
  assert.equal(embedShapeRule('della_linear'), 'base_shape');
  assert.equal(embedShapeRule('multislerp'), 'exact');
  assert.equal(embedShapeRule('sce'), 'exact');

  const shapes = [
    { model: 'A', shape: [32000, 64] },
    { model: 'B', shape: [32064, 64] },
  ];
  assert.deepEqual(plannedEmbedShape('linear', [shapes[0], shapes[0]], null, 'e'), { shape: [32000, 64], truncated: false, vocabSize: 32000 });
  const common = plannedEmbedShape('slerp', shapes, 'A', 'model.embed_tokens.weight');
  assert.deepEqual(common.shape, [32000, 64]);
  assert.equal(common.vocabSize, 32000);
  assert.match(common.warning!, /common submatrix \[32000, 64\].*vocab_size is set to 32000/);
  const gta = plannedEmbedShape('task_arithmetic', shapes, 'A', 'e');
  assert.deepEqual(gta.shape, [32000, 64]);
  amalgamError(() => plannedEmbedShape('ties', shapes, 'B', 'e'), 'E_SHAPE', /model A \[32000, 64\] is smaller than the base model's \[32064, 64\].*tokenizer_source/);
  amalgamError(() => plannedEmbedShape('ties', shapes, null, 'e'), 'E_CONFIG', /needs the base model/);
  amalgamError(() => plannedEmbedShape('nearswap', shapes, 'A', 'e'), 'E_SHAPE', /different shapes \(A \[32000, 64\], B \[32064, 64\]\)/);
});

test('files of a built tokenizer without a chat template', () => {
  const v = build({ source: 'base' });
  const files = mergedTokenizerFiles(v);
  assert.deepEqual(Object.keys(files).sort(), ['tokenizer.json', 'tokenizer_config.json']);
  // The donor's chat_template is kept as it is.
  assert.equal(JSON.parse(files['tokenizer_config.json']).chat_template, CFG_A.chat_template);
  assert.ok(files['tokenizer.json'].endsWith('\n'));
});
