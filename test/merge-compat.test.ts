/**
 * mergekit configurations that amalgam must read and merge as mergekit does, or better where
 * mergekit has a defect: `torch.`-prefixed dtypes, one model folder written several ways, and
 * slice stacks whose embeddings and tied output head come from different models.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../src/config/issues.js';
import { parseMergeConfig } from '../src/config/parse.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { openSafetensors } from '../src/io/safetensors.js';
import { planMerge, type MergePlan, type PlanOptions } from '../src/merge/plan.js';
import { runMerge, type RunMergeOptions } from '../src/merge/run.js';

let dir: string;
const SMALL: SyntheticLlamaOptions = { hiddenSize: 16, intermediateSize: 24, numHeads: 4, numKvHeads: 2, vocabSize: 12, numLayers: 4, dtype: 'F32' };
const EMBED = 'model.embed_tokens.weight';
const HEAD = 'lm_head.weight';
const NORM = 'model.norm.weight';

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-compat-'));
  const make = (name: string, o: SyntheticLlamaOptions) => writeSyntheticLlama(join(dir, name), { ...SMALL, ...o });
  await make('base', { seed: 1 });
  await make('x', { seed: 2 });
  await make('y', { seed: 3 });
  await make('tied', { seed: 4, tieWordEmbeddings: true });
  await make('tied2', { seed: 5, tieWordEmbeddings: true });
  // One WordLevel vocabulary of 12 tokens for base and x.
  const vocab = Object.fromEntries(Array.from({ length: 12 }, (_, i) => [`t${i}`, i]));
  const tok = { version: '1.0', truncation: null, padding: null, added_tokens: [], normalizer: null, pre_tokenizer: { type: 'WhitespaceSplit' }, post_processor: null, decoder: null, model: { type: 'WordLevel', vocab, unk_token: 't0' } };
  for (const m of ['base', 'x']) await writeFile(join(dir, m, 'tokenizer.json'), JSON.stringify(tok));
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function plan(yaml: string, opts: PlanOptions = {}): Promise<MergePlan> {
  return planMerge(parseMergeConfig(yaml), { baseDir: dir, ...opts });
}

async function merge(yaml: string, out: string, opts: RunMergeOptions = {}) {
  return runMerge(parseMergeConfig(yaml), join(dir, out), { baseDir: dir, configYaml: yaml, jobs: 1, ...opts });
}

async function read(folder: string, name: string): Promise<Float32Array> {
  const src = await openSafetensors(join(dir, folder));
  try {
    return await src.readF32(name);
  } finally {
    await src.close();
  }
}

async function names(folder: string): Promise<string[]> {
  const src = await openSafetensors(join(dir, folder));
  try {
    return src.tensors().map((t) => t.name);
  } finally {
    await src.close();
  }
}

async function readJson(path: string): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>;
}

/** Σ wᵢ·xᵢ / Σ wᵢ in float64, rounded once, as `linear` computes it. */
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

function assertSame(got: Float32Array, want: Float32Array, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < got.length; i++) {
    if (got[i] !== want[i]) assert.fail(`${what}[${i}]: ${got[i]} != ${want[i]}`);
  }
}

// ---------------------------------------------------------------------------------------------
// dtype spellings

test('dtype and out_dtype accept the torch. prefix mergekit strips; bf16 is still refused with a suggestion', async () => {
  const cfg = parseMergeConfig('merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: torch.bfloat16\nout_dtype: torch.float16\n');
  assert.equal(cfg.dtype, 'bfloat16');
  assert.equal(cfg.out_dtype, 'float16');

  const p = await plan('merge_method: linear\nmodels:\n  - {model: base, parameters: {weight: 1}}\n  - {model: x, parameters: {weight: 1}}\nout_dtype: torch.float16\n');
  assert.equal(p.outDtype, 'F16');
  assert.equal(p.outputConfig.torch_dtype, 'float16');
  assert.ok(p.tensors.every((t) => t.dtype === 'F16'));

  for (const bad of ['bf16', 'torch.bf16']) {
    assert.throws(
      () => parseMergeConfig(`merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: ${bad}\n`),
      (e: unknown) => e instanceof ConfigError && /dtype must be one of `bfloat16`, `float16`, `float32`/.test(e.message) && /did you mean `bfloat16`/.test(e.message),
    );
  }
});

// ---------------------------------------------------------------------------------------------
// One model folder, several spellings

test('a base model listed under another spelling of its folder is one input, not two', async () => {
  // mergekit compares the strings: `./base` is added as a third input beside `base/`, so the base
  // would count twice in the average.
  const yaml = `merge_method: linear
base_model: ./base
models:
  - model: base/
  - model: x
parameters: {weight: 1}
`;
  const warnings: string[] = [];
  const r = await merge(yaml, 'out-spelling', { onWarning: (w) => warnings.push(w) });
  assert.deepEqual(r.plan.models.map((m) => m.id), ['./base', 'x']);
  assert.deepEqual(r.plan.tensors.find((t) => t.name === EMBED)!.inputs.map((i) => i.model), ['./base', 'x']);
  assert.ok(warnings.some((w) => w.includes('`base/` and `./base` name the same model folder')), warnings.join('\n'));
  for (const name of [EMBED, 'model.layers.2.mlp.up_proj.weight', HEAD]) {
    const want = linearOf([await read('base', name), await read('x', name)], [1, 1]);
    assertSame(await read('out-spelling', name), want, name);
  }
});

test('ties: the listed base under another spelling needs no weight; an absolute path of a listed model is a duplicate', async () => {
  const p = await plan(`merge_method: ties
base_model: base
models:
  - model: ${join(dir, 'base')}
  - model: ./x/
    parameters: {weight: 1, density: 0.5}
`);
  const t = p.tensors.find((x) => x.name === 'model.layers.0.self_attn.q_proj.weight')!;
  assert.equal(t.base, 'base');
  assert.deepEqual(t.inputs.map((i) => i.model), ['base', './x/']);
  assert.equal(t.params.perModel['./x/']!.weight, 1);

  await assert.rejects(
    plan(`merge_method: linear\nmodels:\n  - {model: x, parameters: {weight: 1}}\n  - {model: ${join(dir, 'x')}, parameters: {weight: 1}}\n`),
    (e: unknown) => e instanceof Error && /model x is listed twice/.test(e.message),
  );
});

test('slice sources and slice base models written with other spellings resolve to the same model', async () => {
  const p = await plan(`merge_method: slerp
base_model: base
slices:
  - sources:
      - {model: ./base, layer_range: [0, 4]}
      - {model: x, layer_range: [0, 4]}
    base_model: base/
parameters: {t: 0.25}
`);
  const t = p.tensors.find((x) => x.name === 'model.layers.1.mlp.down_proj.weight')!;
  assert.equal(t.base, 'base');
  assert.deepEqual(t.inputs.map((i) => i.model), ['base', 'x']);
  assert.equal(p.slices[0]!.base, 'base');
});

test('a tokenizer.tokens source written with another spelling of an input folder is that input', async () => {
  const yaml = `merge_method: linear
base_model: base
models:
  - {model: base, parameters: {weight: 1}}
  - {model: x, parameters: {weight: 1}}
tokenizer:
  source: base
  tokens:
    t5: {source: ./x/, force: true}
`;
  const r = await merge(yaml, 'out-token-spelling');
  const width = SMALL.hiddenSize!;
  for (const name of [EMBED, HEAD]) {
    const got = await read('out-token-spelling', name);
    const b = await read('base', name);
    const x = await read('x', name);
    // Row 5 is x's in both permuted matrices; the other rows are the plain average.
    assertSame(got.subarray(5 * width, 6 * width), x.subarray(5 * width, 6 * width), `${name} row 5`);
    const want = linearOf([b, x], [1, 1]);
    assertSame(got.subarray(0, 5 * width), want.subarray(0, 5 * width), `${name} rows 0-4`);
  }
  assert.equal((await readJson(join(r.outDir, 'config.json'))).vocab_size, 12);
});

// ---------------------------------------------------------------------------------------------
// Tied output heads in slice stacks

test('a stack of an untied model then a tied one writes the last slice model\'s tied head', async () => {
  // The final norm and lm_head come from the last slice. mergekit skips lm_head here (no input
  // stores one) and keeps the donor's tie_word_embeddings: false, so the head would be missing.
  const yaml = `merge_method: passthrough
slices:
  - sources: [{model: x, layer_range: [0, 2]}]
  - sources: [{model: tied, layer_range: [2, 4]}]
`;
  const warnings: string[] = [];
  const r = await merge(yaml, 'out-tied-last', { onWarning: (w) => warnings.push(w) });
  const head = r.plan.tensors.find((t) => t.name === HEAD);
  assert.ok(head, 'lm_head is written');
  assert.deepEqual(head.inputs.map((i) => [i.model, i.tensor, i.tiedFor]), [['tied', EMBED, HEAD]]);
  const cfg = await readJson(join(r.outDir, 'config.json'));
  assert.equal(cfg.tie_word_embeddings, false);
  assert.equal(cfg.num_hidden_layers, 4);
  assertSame(await read('out-tied-last', HEAD), await read('tied', EMBED), HEAD);
  assertSame(await read('out-tied-last', EMBED), await read('x', EMBED), EMBED);
  assertSame(await read('out-tied-last', NORM), await read('tied', NORM), NORM);
  assertSame(await read('out-tied-last', 'model.layers.3.self_attn.o_proj.weight'), await read('tied', 'model.layers.3.self_attn.o_proj.weight'), 'layer 3');
  assert.ok(warnings.some((w) => w.includes('the head is written') && w.includes("tied's model.embed_tokens.weight")), warnings.join('\n'));
});

test('stacks and merges of tied models stay tied, as in mergekit', async () => {
  const r = await merge(
    `merge_method: passthrough
slices:
  - sources: [{model: tied, layer_range: [0, 2]}]
  - sources: [{model: tied2, layer_range: [2, 4]}]
`,
    'out-both-tied',
  );
  assert.equal((await names('out-both-tied')).includes(HEAD), false);
  assert.equal((await readJson(join(r.outDir, 'config.json'))).tie_word_embeddings, true);

  const q = await plan('merge_method: linear\nmodels:\n  - {model: tied, parameters: {weight: 1}}\n  - {model: tied2, parameters: {weight: 1}}\n');
  assert.equal(q.tensors.some((t) => t.name === HEAD), false);
  assert.equal(q.outputConfig.tie_word_embeddings, true);

  // Untied first, then the same untied model: the head is its own, nothing tied is involved.
  const s = await plan('merge_method: passthrough\nslices:\n  - sources: [{model: x, layer_range: [0, 2]}]\n  - sources: [{model: x, layer_range: [1, 3]}]\n');
  assert.deepEqual(s.tensors.find((t) => t.name === HEAD)!.inputs.map((i) => [i.model, i.tensor, i.tiedFor]), [['x', HEAD, undefined]]);
});
