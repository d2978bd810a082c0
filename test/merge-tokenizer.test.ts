/**
 * End-to-end merges of models with different vocabularies (merge-methods.md §5, §6.7, §6.8,
 * §7.5): output vocabularies built with `tokenizer_source` / `tokenizer:`, embedding and lm_head
 * rows checked against the rules, the written tokenizer loaded and used, the truncation rule's
 * `vocab_size`, chat templates on both output paths, and invalid configurations refused before
 * any tensor data is read.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { AmalgamError } from '../src/errors.js';
import { parseMergeConfig } from '../src/config/parse.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { openModelFolder, type HfModelFolder, type OpenModelFolderOptions } from '../src/io/hf.js';
import { openSafetensors } from '../src/io/safetensors.js';
import { mergeTensor, prepareParams } from '../src/merge/registry.js';
import { formatPlanSummary, runMerge, type RunMergeOptions } from '../src/merge/run.js';
import { builtinChatTemplate } from '../src/tokenizer/merge.js';

type Json = Record<string, unknown>;

let dir: string;
const SMALL: SyntheticLlamaOptions = { hiddenSize: 16, intermediateSize: 24, numHeads: 4, numKvHeads: 2, numLayers: 2, dtype: 'F32' };
const WIDTH = 16;
const EMBED = 'model.embed_tokens.weight';
const HEAD = 'lm_head.weight';

const T1 = "{%- for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{%- endfor %}";
const T2 = "{%- for message in messages %}{{ '<' + message['role'] + '>' + message['content'] }}{%- endfor %}";
const LITERAL = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}";

// ---------------------------------------------------------------------------------------------
// Tokenizers

const special = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
const SPECIALS = [special(0, '<unk>'), special(1, '<s>'), special(2, '</s>')];
const SPECIAL_IDS = { '<unk>': 0, '<s>': 1, '</s>': 2 };

function wordLevel(vocab: Record<string, number>, added: Json[]): Json {
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: { type: 'WhitespaceSplit' },
    post_processor: null,
    decoder: null,
    model: { type: 'WordLevel', vocab, unk_token: '<unk>' },
  };
}

function bpe(vocab: Record<string, number>, merges: string[], added: Json[]): Json {
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

const BASE_TOK = wordLevel({ ...SPECIAL_IDS, a: 3, b: 4, c: 5, d: 6, e: 7 }, SPECIALS);
const X_TOK = wordLevel({ ...SPECIAL_IDS, a: 3, b: 4, f: 5, g: 6, c: 7 }, [...SPECIALS, special(8, '<tool>')]);
const Y_TOK = bpe({ ...SPECIAL_IDS, a: 3, b: 4, h: 5, ab: 6 }, ['a b'], [...SPECIALS, special(7, '<tool>')]);
const TIED_TOK = wordLevel({ ...SPECIAL_IDS, a: 3, b: 4, c: 5, d: 6, e: 7, q: 8 }, SPECIALS);
const SPECIAL_MAP = '{\n  "bos_token": "<s>",\n  "eos_token": "</s>",\n  "unk_token": "<unk>"\n}\n';

async function putJson(path: string, v: unknown): Promise<void> {
  await writeFile(path, JSON.stringify(v, null, 2) + '\n');
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-tok-'));
  const make = (name: string, o: SyntheticLlamaOptions) => writeSyntheticLlama(join(dir, name), { ...SMALL, ...o });
  await make('base', { seed: 1, vocabSize: 8 });
  await make('x', { seed: 2, vocabSize: 10 });
  await make('y', { seed: 3, vocabSize: 8 });
  await make('tiedm', { seed: 4, vocabSize: 9, tieWordEmbeddings: true });
  await make('notok', { seed: 5, vocabSize: 8 });
  await make('wide', { seed: 6, vocabSize: 8, hiddenSize: 32 });

  await putJson(join(dir, 'base', 'tokenizer.json'), BASE_TOK);
  await putJson(join(dir, 'base', 'tokenizer_config.json'), { model_max_length: 512, bos_token: '<s>', chat_template: T1 });
  await writeFile(join(dir, 'base', 'special_tokens_map.json'), SPECIAL_MAP);
  await putJson(join(dir, 'base', 'generation_config.json'), { bos_token_id: 1, eos_token_id: 2 });
  await putJson(join(dir, 'x', 'tokenizer.json'), X_TOK);
  await putJson(join(dir, 'x', 'tokenizer_config.json'), { model_max_length: 256, name: 'x' });
  await writeFile(join(dir, 'x', 'chat_template.jinja'), T1 + '\n');
  await putJson(join(dir, 'y', 'tokenizer.json'), Y_TOK);
  await putJson(join(dir, 'y', 'tokenizer_config.json'), { chat_template: T2 });
  await putJson(join(dir, 'tiedm', 'tokenizer.json'), TIED_TOK);
  await putJson(join(dir, 'wide', 'tokenizer.json'), BASE_TOK);
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function merge(yaml: string, out: string, opts: RunMergeOptions = {}) {
  return runMerge(parseMergeConfig(yaml), join(dir, out), { baseDir: dir, configYaml: yaml, ...opts });
}

/** The tensors of a model folder, by name, as float32. */
async function tensorsOf(folder: string, names: string[]): Promise<Map<string, Float32Array>> {
  const src = await openSafetensors(join(dir, folder));
  try {
    const out = new Map<string, Float32Array>();
    for (const n of names) out.set(n, await src.readF32(n));
    return out;
  } finally {
    await src.close();
  }
}

const row = (m: Float32Array, r: number) => Array.from(m.subarray(r * WIDTH, (r + 1) * WIDTH));

/** A row as the rules make it: one model's row, the mean of several (float64, rounded once), or zeros. */
type RowRule = { from: [string, number][] } | 'zero';
const own = (model: string, r: number): RowRule => ({ from: [[model, r]] });
const mean = (...from: [string, number][]): RowRule => ({ from });

/**
 * A model's permuted matrix from per-token rules; rows from `rules.length` to `rowCount` are the
 * mean of the token rows (float64, rounded to float32).
 */
function permuted(rules: RowRule[], matrices: Map<string, Float32Array>, rowCount: number): Float32Array {
  const out = new Float32Array(rowCount * WIDTH);
  rules.forEach((rule, t) => {
    if (rule === 'zero') return;
    for (let j = 0; j < WIDTH; j++) {
      let acc = 0;
      for (const [m, r] of rule.from) acc += matrices.get(m)![r * WIDTH + j]!;
      out[t * WIDTH + j] = acc / rule.from.length;
    }
  });
  for (let j = 0; j < WIDTH; j++) {
    let acc = 0;
    for (let t = 0; t < rules.length; t++) acc += out[t * WIDTH + j]!;
    for (let t = rules.length; t < rowCount; t++) out[t * WIDTH + j] = acc / rules.length;
  }
  return out;
}

/** Linear merge with normalisation, accumulated in float64 in input order as `linear` does. */
function linearOf(inputs: Float32Array[], weights: number[]): Float32Array {
  const sum = weights.reduce((a, b) => a + b, 0);
  const out = new Float32Array(inputs[0]!.length);
  for (let i = 0; i < out.length; i++) {
    let acc = 0;
    for (let k = 0; k < inputs.length; k++) acc += weights[k]! * inputs[k]![i]!;
    out[i] = acc / sum;
  }
  return out;
}

function assertSameRows(got: Float32Array, want: Float32Array, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < got.length; i++) {
    if (got[i] !== want[i]) assert.fail(`${what}: row ${Math.floor(i / WIDTH)}, column ${i % WIDTH}: ${got[i]} != ${want[i]}`);
  }
}

async function readJson(path: string): Promise<Json> {
  return JSON.parse(await readFile(path, 'utf8')) as Json;
}

// ---------------------------------------------------------------------------------------------
// tokenizer_source: union

const UNION_YAML = `merge_method: linear
base_model: base
models:
  - {model: base, parameters: {weight: 0.5}}
  - {model: x, parameters: {weight: 0.3}}
  - {model: y, parameters: {weight: 0.2}}
tokenizer:
  source: union
  pad_to_multiple_of: 8
`;

/** Output ids of the union: the base's 8 tokens, then f g (x), h ab (y), then the added <tool>. */
function unionRules(): Record<string, RowRule[]> {
  const shared = (m: string) => [0, 1, 2, 3, 4].map((r) => own(m, r));
  const tail = [own('x', 5), own('x', 6), own('y', 5), own('y', 6)];
  return {
    // c: base and x have it, the base among them: y takes the base's row. d, e: only the base.
    base: [...shared('base'), own('base', 5), own('base', 6), own('base', 7), ...tail, mean(['x', 8], ['y', 7])],
    x: [...shared('x'), own('x', 7), own('base', 6), own('base', 7), ...tail, own('x', 8)],
    y: [...shared('y'), own('base', 5), own('base', 6), own('base', 7), ...tail, own('y', 7)],
  };
}

test('union: vocab_size, embedding and lm_head rows by the rules, and the written tokenizer', async () => {
  const r = await merge(UNION_YAML, 'union', { jobs: 1 });
  const cfg = await readJson(join(r.outDir, 'config.json'));
  assert.equal(cfg.vocab_size, 16);
  assert.deepEqual(r.plan.tokenizer?.appended, ['f', 'g', 'h', 'ab', '<tool>']);
  assert.equal(r.plan.tokenizer?.tokenCount, 13);
  assert.deepEqual(r.plan.tensors.find((t) => t.name === EMBED)!.shape, [16, WIDTH]);
  assert.ok(r.plan.tensors.find((t) => t.name === HEAD)!.permutation);
  // The permutation is plain data.
  const perm = r.plan.tensors.find((t) => t.name === EMBED)!.permutation!;
  assert.deepEqual(JSON.parse(JSON.stringify(perm)), perm);

  const rules = unionRules();
  for (const name of [EMBED, HEAD]) {
    const mats = new Map<string, Float32Array>();
    for (const m of ['base', 'x', 'y']) mats.set(m, (await tensorsOf(m, [name])).get(name)!);
    const want = linearOf(
      ['base', 'x', 'y'].map((m) => permuted(rules[m]!, mats, 16)),
      [0.5, 0.3, 0.2],
    );
    const got = (await tensorsOf('union', [name])).get(name)!;
    assertSameRows(got, want, name);
    // Spot checks, by rule: f is x's row in every model, so the merge is x's row.
    assert.deepEqual(row(got, 8), row(linearOf([mats.get('x')!, mats.get('x')!, mats.get('x')!], [0.5, 0.3, 0.2]), 5));
  }
  // Other tensors are the plain linear merge.
  const norm = 'model.layers.1.mlp.down_proj.weight';
  const ins = await Promise.all(['base', 'x', 'y'].map(async (m) => (await tensorsOf(m, [norm])).get(norm)!));
  assertSameRows((await tensorsOf('union', [norm])).get(norm)!, linearOf(ins, [0.5, 0.3, 0.2]), norm);

  // Files: the built tokenizer, the donor's special tokens map and generation config; no copy of the base's tokenizer.json.
  const files = (await readdir(r.outDir)).sort();
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json']) assert.ok(files.includes(f), f);
  assert.equal(await readFile(join(r.outDir, 'special_tokens_map.json'), 'utf8'), SPECIAL_MAP);
  const tokJson = await readJson(join(r.outDir, 'tokenizer.json'));
  const tokCfg = await readJson(join(r.outDir, 'tokenizer_config.json'));
  assert.equal(tokCfg.model_max_length, 512);
  assert.equal(tokCfg.chat_template, T1, "the base's template stays when chat_template is not set");
  assert.deepEqual(Object.keys(tokCfg.added_tokens_decoder as Json), ['0', '1', '2', '8', '9', '10', '11', '12']);
  const tok = new Tokenizer(tokJson, tokCfg);
  assert.deepEqual(tok.encode('a f <tool> h c').ids, [3, 8, 12, 10, 5]);
  assert.equal(tok.token_to_id('<tool>'), 12);
  assert.equal(tok.token_to_id('ab'), 11);

  // jobs: 2 (worker threads) writes the same bytes.
  const r2 = await merge(UNION_YAML, 'union-jobs2', { jobs: 2 });
  for (const f of await readdir(r.outDir)) {
    if (f === 'README.md') continue;
    assert.ok((await readFile(join(r.outDir, f))).equals(await readFile(join(r2.outDir, f))), `${f} differs between jobs 1 and 2`);
  }

  // The dry-run summary names the vocabulary.
  const summary = formatPlanSummary(r.plan);
  assert.match(summary, /tokenizer: +union \(from base\): 13 tokens, 5 appended; vocab_size 16/);
  assert.match(summary, /written files: .*tokenizer\.json/);
});

// ---------------------------------------------------------------------------------------------
// tokenizer_source: base, with another method

test('tokenizer_source: base keeps the base vocabulary; the other models take default rows for tokens they lack', async () => {
  const yaml = `merge_method: task_arithmetic
base_model: base
models:
  - {model: x, parameters: {weight: 0.7}}
  - {model: y, parameters: {weight: 0.4}}
tokenizer_source: base
out_dtype: float32
`;
  const r = await merge(yaml, 'tok-base', { jobs: 2 });
  assert.equal((await readJson(join(r.outDir, 'config.json'))).vocab_size, 8);
  assert.deepEqual(r.plan.tokenizer?.appended, []);
  const shared = (m: string) => [0, 1, 2, 3, 4].map((i) => own(m, i));
  const rules: Record<string, RowRule[]> = {
    x: [...shared('x'), own('x', 7), own('base', 6), own('base', 7)],
    y: [...shared('y'), own('base', 5), own('base', 6), own('base', 7)],
    base: [...shared('base'), own('base', 5), own('base', 6), own('base', 7)],
  };
  for (const name of [EMBED, HEAD]) {
    const mats = new Map<string, Float32Array>();
    for (const m of ['base', 'x', 'y']) mats.set(m, (await tensorsOf(m, [name])).get(name)!);
    const inputs = ['x', 'y', 'base'].map((m) => ({ model: m, data: permuted(rules[m]!, mats, 8), shape: [8, WIDTH] }));
    const params = prepareParams('task_arithmetic', { tensorName: name, models: ['x', 'y', 'base'], base: 'base' }, { perModel: { x: { weight: 0.7 }, y: { weight: 0.4 } } });
    const want = mergeTensor('task_arithmetic', { tensorName: name, isEmbed: true, inputs, base: 'base', params })!;
    assertSameRows((await tensorsOf('tok-base', [name])).get(name)!, want.data, name);
  }
  assert.equal(await readFile(join(r.outDir, 'tokenizer.json'), 'utf8'), JSON.stringify(BASE_TOK, null, 2) + '\n');
});

// ---------------------------------------------------------------------------------------------
// A model's tokenizer with `tokens:` entries

test('tokenizer.source a model, with model / model_token / zero sources, force and padding', async () => {
  const yaml = `merge_method: linear
base_model: base
models:
  - {model: base, parameters: {weight: 0.5}}
  - {model: x, parameters: {weight: 0.3}}
  - {model: y, parameters: {weight: 0.2}}
tokenizer:
  source: x
  pad_to_multiple_of: 4
  tokens:
    a: {source: {kind: zero}, force: true}
    f: {source: {kind: model_token, model: base, token: e}}
    g: {source: {kind: model_token, model: y, token_id: 5}, force: true}
    "<tool>": {source: y}
    newtok: {source: {kind: zero}}
`;
  const r = await merge(yaml, 'tok-model', { jobs: 1 });
  // x's tokenizer (ids 0..8) plus newtok at 9: 10 tokens, padded to 12.
  assert.equal((await readJson(join(r.outDir, 'config.json'))).vocab_size, 12);
  assert.deepEqual(r.plan.tokenizer?.appended, ['newtok']);
  assert.equal(r.plan.tokenizer?.source, 'x');

  const ids = (m: string) => [0, 1, 2].map((i) => own(m, i));
  const rules: Record<string, RowRule[]> = {
    // <unk> <s> </s> | a (zero, forced) | b | f | g (y's row 5, forced) | c | <tool> | newtok
    base: [...ids('base'), 'zero', own('base', 4), own('base', 7), own('y', 5), own('base', 5), own('y', 7), 'zero'],
    x: [...ids('x'), 'zero', own('x', 4), own('x', 5), own('y', 5), own('x', 7), own('x', 8), 'zero'],
    y: [...ids('y'), 'zero', own('y', 4), own('base', 7), own('y', 5), own('base', 5), own('y', 7), 'zero'],
  };
  for (const name of [EMBED, HEAD]) {
    const mats = new Map<string, Float32Array>();
    for (const m of ['base', 'x', 'y']) mats.set(m, (await tensorsOf(m, [name])).get(name)!);
    const want = linearOf(
      ['base', 'x', 'y'].map((m) => permuted(rules[m]!, mats, 12)),
      [0.5, 0.3, 0.2],
    );
    const got = (await tensorsOf('tok-model', [name])).get(name)!;
    assertSameRows(got, want, name);
    assert.ok(row(got, 3).every((v) => v === 0), 'a is forced to zeros');
    assert.ok(row(got, 9).every((v) => v === 0), 'newtok is zeros');
  }
  const tokJson = await readJson(join(r.outDir, 'tokenizer.json'));
  const tokCfg = await readJson(join(r.outDir, 'tokenizer_config.json'));
  assert.equal(tokCfg.name, 'x', "the source model's tokenizer_config.json");
  const tok = new Tokenizer(tokJson, tokCfg);
  assert.deepEqual(tok.encode('g newtok <tool> c').ids, [6, 9, 8, 7]);
  // x ships chat_template.jinja: it is kept with its tokenizer.
  assert.equal(await readFile(join(r.outDir, 'chat_template.jinja'), 'utf8'), T1 + '\n');
});

test("generation_config.json: the donor's token ids are moved to a built vocabulary, or the file is left out", async () => {
  // A donor whose tokens c (5) and d (6) are at other ids (c: 7) or absent (d) in x's vocabulary.
  const { cp } = await import('node:fs/promises');
  await cp(join(dir, 'base'), join(dir, 'gbase'), { recursive: true });
  const yaml = (base: string) => `merge_method: linear
base_model: ${base}
models:
  - {model: ${base}, parameters: {weight: 0.5}}
  - {model: x, parameters: {weight: 0.5}}
tokenizer_source: x
`;
  await putJson(join(dir, 'gbase', 'generation_config.json'), { bos_token_id: 1, eos_token_id: [2, 5], temperature: 0.7 });
  const warnings: string[] = [];
  const r = await merge(yaml('gbase'), 'gen-moved', { jobs: 1, onWarning: (w) => warnings.push(w) });
  assert.deepEqual(await readJson(join(r.outDir, 'generation_config.json')), { bos_token_id: 1, eos_token_id: [2, 7], temperature: 0.7 });
  assert.ok(warnings.some((w) => w.includes('generation_config.json: token ids moved')), warnings.join('\n'));

  await putJson(join(dir, 'gbase', 'generation_config.json'), { bos_token_id: 1, eos_token_id: 2, pad_token_id: 6 });
  warnings.length = 0;
  const r2 = await merge(yaml('gbase'), 'gen-dropped', { jobs: 1, onWarning: (w) => warnings.push(w) });
  assert.ok(!existsSync(join(r2.outDir, 'generation_config.json')));
  assert.ok(warnings.some((w) => w.includes('pad_token_id 6') && w.includes('"d"')), warnings.join('\n'));

  // Ids that do not move: the donor's file is copied byte for byte.
  const text = '{"bos_token_id": 1,  "eos_token_id": 2}\n';
  await writeFile(join(dir, 'gbase', 'generation_config.json'), text);
  const r3 = await merge(yaml('gbase'), 'gen-kept', { jobs: 1 });
  assert.equal(await readFile(join(r3.outDir, 'generation_config.json'), 'utf8'), text);
});

// ---------------------------------------------------------------------------------------------
// Tied embeddings

test('a tied model contributes its embedding to the permuted lm_head', async () => {
  const yaml = `merge_method: linear
models:
  - {model: base, parameters: {weight: 1}}
  - {model: tiedm, parameters: {weight: 3}}
tokenizer_source: union
`;
  const r = await merge(yaml, 'tied');
  const cfg = await readJson(join(r.outDir, 'config.json'));
  assert.equal(cfg.vocab_size, 9);
  assert.equal(cfg.tie_word_embeddings, false);
  const head = r.plan.tensors.find((t) => t.name === HEAD)!;
  assert.equal(head.inputs.find((i) => i.model === 'tiedm')?.tiedFor, HEAD);
  assert.deepEqual(head.shape, [9, WIDTH]);
  const baseHead = (await tensorsOf('base', [HEAD])).get(HEAD)!;
  const tiedEmbed = (await tensorsOf('tiedm', [EMBED])).get(EMBED)!;
  const got = (await tensorsOf('tied', [HEAD])).get(HEAD)!;
  // Without base_model, a token both have keeps each model's row; q is only the tied model's.
  const rules = {
    base: [...Array.from({ length: 8 }, (_, i) => own('base', i)), own('tiedm', 8)],
    tiedm: Array.from({ length: 9 }, (_, i) => own('tiedm', i)),
  };
  const mats = new Map([
    ['base', baseHead],
    ['tiedm', tiedEmbed],
  ]);
  assertSameRows(got, linearOf([permuted(rules.base, mats, 9), permuted(rules.tiedm, mats, 9)], [1, 3]), HEAD);
  assert.deepEqual(row(got, 8), row(tiedEmbed, 8));
});

// ---------------------------------------------------------------------------------------------
// No tokenizer configuration

test('without a tokenizer configuration, the common-submatrix cut sets vocab_size to the rows written', async () => {
  const warnings: string[] = [];
  const yaml = 'merge_method: linear\nmodels:\n  - {model: x, parameters: {weight: 1}}\n  - {model: base, parameters: {weight: 1}}\n';
  const r = await merge(yaml, 'cut', { onWarning: (w) => warnings.push(w) });
  assert.equal(r.plan.donor, 'x');
  assert.equal(r.plan.tokenizer, null);
  const cfg = await readJson(join(r.outDir, 'config.json'));
  assert.equal(cfg.vocab_size, 8, 'the donor x had 10');
  assert.ok(warnings.some((w) => w.includes('common submatrix [8, 16]') && w.includes('vocab_size')));
  // Said once per cut tensor (when planning), not again by the method nor as a separate summary.
  const cut = r.plan.tensors.filter((t) => t.isEmbed && t.inputs.some((i) => i.shape[0] !== t.shape[0])).map((t) => t.name);
  assert.ok(cut.length > 0);
  assert.deepEqual(warnings.filter((w) => /common submatrix|vocab_size/.test(w)).map((w) => w.slice(0, w.indexOf(':'))).sort(), cut.sort());
  const got = (await tensorsOf('cut', [EMBED])).get(EMBED)!;
  assert.equal(got.length, 8 * WIDTH);
  const x = (await tensorsOf('x', [EMBED])).get(EMBED)!;
  const b = (await tensorsOf('base', [EMBED])).get(EMBED)!;
  assertSameRows(got, linearOf([x.subarray(0, 8 * WIDTH), b], [1, 1]), EMBED);
  // The donor's tokenizer is copied as it is.
  assert.ok((await readFile(join(r.outDir, 'tokenizer.json'))).equals(await readFile(join(dir, 'x', 'tokenizer.json'))));
});

// ---------------------------------------------------------------------------------------------
// Chat templates

test('chat_template: a literal on the copy path replaces the donor template, keeping the rest', async () => {
  const yaml = `merge_method: linear\nmodels:\n  - {model: base, parameters: {weight: 1}}\n  - {model: y, parameters: {weight: 1}}\nchat_template: ${JSON.stringify(LITERAL)}\n`;
  const r = await merge(yaml, 'tpl-literal');
  assert.equal(r.plan.chatTemplate, LITERAL);
  const cfg = await readJson(join(r.outDir, 'tokenizer_config.json'));
  assert.equal(cfg.chat_template, LITERAL);
  assert.equal(cfg.model_max_length, 512);
  assert.equal(await readFile(join(r.outDir, 'chat_template.jinja'), 'utf8'), LITERAL);
  assert.ok((await readFile(join(r.outDir, 'tokenizer.json'))).equals(await readFile(join(dir, 'base', 'tokenizer.json'))));
  assert.equal(await readFile(join(r.outDir, 'special_tokens_map.json'), 'utf8'), SPECIAL_MAP);
});

test('chat_template: auto picks the most common template (tokenizer_config or chat_template.jinja)', async () => {
  const yaml = 'merge_method: linear\nmodels:\n  - {model: y, parameters: {weight: 1}}\n  - {model: base, parameters: {weight: 1}}\n  - {model: x, parameters: {weight: 1}}\nchat_template: auto\n';
  const r = await merge(yaml, 'tpl-auto');
  assert.equal(r.plan.donor, 'y');
  assert.equal((await readJson(join(r.outDir, 'tokenizer_config.json'))).chat_template, T1);
  assert.equal(await readFile(join(r.outDir, 'chat_template.jinja'), 'utf8'), T1);
  assert.ok((await readFile(join(r.outDir, 'tokenizer.json'))).equals(await readFile(join(dir, 'y', 'tokenizer.json'))));
});

test('chat_template: a built-in name with a built tokenizer', async () => {
  const r = await merge(UNION_YAML + 'chat_template: chatml\n', 'tpl-chatml');
  const chatml = builtinChatTemplate('chatml')!;
  assert.equal((await readJson(join(r.outDir, 'tokenizer_config.json'))).chat_template, chatml);
  assert.equal(await readFile(join(r.outDir, 'chat_template.jinja'), 'utf8'), chatml);
  assert.equal((await readJson(join(r.outDir, 'config.json'))).vocab_size, 16);
});

// ---------------------------------------------------------------------------------------------
// Refusals before any read

/** An `openModel` hook that counts tensor data reads. */
function countingOpen() {
  const counter = { reads: 0 };
  const openModel = async (d: string, o: OpenModelFolderOptions): Promise<HfModelFolder> => {
    const f = await openModelFolder(d, o);
    const source = new Proxy(f.source, {
      get(target, prop) {
        if (prop === 'readRaw' || prop === 'readF32') {
          return (name: string) => {
            counter.reads++;
            return target[prop](name);
          };
        }
        const v = Reflect.get(target, prop, target) as unknown;
        return typeof v === 'function' ? v.bind(target) : v;
      },
    });
    return { ...f, source };
  };
  return { counter, openModel };
}

async function refused(yaml: string, name: string): Promise<AmalgamError> {
  const { counter, openModel } = countingOpen();
  let err: unknown;
  try {
    await merge(yaml, name, { openModel, openSource: () => Promise.reject(new Error('no tensor source may be opened')) });
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof AmalgamError, `expected an AmalgamError, got ${String(err)}`);
  assert.equal(counter.reads, 0, 'no tensor data may be read before the error');
  assert.equal(existsSync(join(dir, name)), false);
  return err;
}

test('invalid tokenizer configurations are refused before any tensor data is read', async () => {
  const head = 'merge_method: linear\nbase_model: base\nmodels:\n  - {model: base, parameters: {weight: 1}}\n  - {model: x, parameters: {weight: 1}}\n  - {model: y, parameters: {weight: 1}}\n';

  let e = await refused(head + 'tokenizer:\n  source: union\n  tokens:\n    c: {source: y}\n', 'bad1');
  assert.equal(e.code, 'E_CONFIG');
  assert.equal(e.key, 'tokenizer.tokens["c"].source');
  assert.match(e.message, /model y does not have this token/);

  e = await refused(head + 'tokenizer:\n  source: union\n  tokens:\n    f: {source: {kind: model_token, model: x, token: zzz}}\n', 'bad2');
  assert.match(e.message, /model x has no token "zzz"/);

  e = await refused(head + 'tokenizer:\n  source: union\n  tokens:\n    f: {source: {kind: model_token, model: y, token_id: 99}}\n', 'bad3');
  assert.match(e.message, /row 99 is out of range for model y, whose embedding has 8 rows/);

  e = await refused(head + 'tokenizer:\n  source: union\n  tokens:\n    f: {source: tiedm}\n', 'bad4');
  assert.match(e.message, /model tiedm is not an input of this tensor/);

  e = await refused(head + 'tokenizer_source: notok\n', 'bad5');
  assert.equal(e.code, 'E_MISSING');
  assert.match(e.message, /tokenizer source model notok has no tokenizer\.json/);

  e = await refused('merge_method: linear\nbase_model: notok\nmodels:\n  - {model: notok, parameters: {weight: 1}}\n  - {model: x, parameters: {weight: 1}}\ntokenizer_source: union\n', 'bad6');
  assert.equal(e.code, 'E_MISSING');
  assert.match(e.message, /base model notok has no tokenizer\.json/);

  e = await refused(head + 'tokenizer_source: union\nchat_template: nonsense\n', 'bad7');
  assert.equal(e.key, 'chat_template');

  e = await refused('merge_method: linear\nmodels:\n  - {model: base, parameters: {weight: 1}}\n  - {model: wide, parameters: {weight: 1}}\ntokenizer_source: union\n', 'bad8');
  assert.equal(e.code, 'E_SHAPE');
  assert.match(e.message, /embedding widths differ \(base: 16, wide: 32\)/);

  e = await refused(head + 'tokenizer_source: ./nowhere\n', 'bad9');
  assert.equal(e.code, 'E_IO');

  // Without a tokenizer configuration, methods that need equal shapes refuse different vocabularies.
  e = await refused('merge_method: ties\nbase_model: x\nmodels:\n  - {model: base, parameters: {weight: 1, density: 0.5}}\n', 'bad10');
  assert.equal(e.code, 'E_SHAPE');
  assert.match(e.message, /smaller than the base model's \[10, 16\].*tokenizer_source/);
});
