/**
 * Merge planning: every invalid configuration is refused before any tensor data is read (reads
 * are counted through the `openModel` hook), with a message naming the key or tensor and the fix;
 * slices renumber layers and update the layer count; tied heads; and per-tensor parameters as
 * mergekit resolves them (shared/golden/GRADIENTS.md).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import { parseMergeConfig } from '../src/config/parse.js';
import { openModelFolder, type HfModelFolder, type OpenModelFolderOptions } from '../src/io/hf.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { planMerge, type MergePlan, type PlanOptions, type PlannedTensor } from '../src/merge/plan.js';
import { runMerge } from '../src/merge/run.js';

let dir: string;
const SMALL: SyntheticLlamaOptions = { hiddenSize: 16, intermediateSize: 24, numHeads: 4, numKvHeads: 2, vocabSize: 32, numLayers: 4, dtype: 'BF16' };

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-plan-'));
  const make = (name: string, o: SyntheticLlamaOptions) => writeSyntheticLlama(join(dir, name), { ...SMALL, ...o });
  await make('base', { seed: 1 });
  await make('a', { seed: 2 });
  await make('b', { seed: 3 });
  await make('c', { seed: 4 });
  await make('wide', { seed: 5, hiddenSize: 32 });
  await make('bigvocab', { seed: 6, vocabSize: 40 });
  await make('smallvocab', { seed: 7, vocabSize: 24 });
  await make('short', { seed: 8, numLayers: 2 });
  await make('tied', { seed: 9, tieWordEmbeddings: true });
  await make('tied2', { seed: 10, tieWordEmbeddings: true });
  await make('mistral', { seed: 11 });
  const cfgPath = join(dir, 'mistral', 'config.json');
  const cfg = JSON.parse(await readFile(cfgPath, 'utf8'));
  cfg.architectures = ['MistralForCausalLM'];
  cfg.model_type = 'mistral';
  await writeFile(cfgPath, JSON.stringify(cfg));
  await writeFile(join(dir, 'base', 'tokenizer.json'), '{"version": "1.0"}\n');
  await writeFile(join(dir, 'base', 'tokenizer_config.json'), '{}\n');
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** An `openModel` hook that counts tensor data reads (readRaw / readF32) on every source. */
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

async function plan(yaml: string, opts: PlanOptions = {}): Promise<MergePlan> {
  return planMerge(parseMergeConfig(yaml), { baseDir: dir, ...opts });
}

/** Plans `yaml`, expecting an AmalgamError; checks no tensor data was read. */
async function refused(yaml: string, opts: PlanOptions = {}): Promise<AmalgamError> {
  const { counter, openModel } = countingOpen();
  let err: unknown;
  try {
    await plan(yaml, { ...opts, openModel });
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof AmalgamError, `expected an AmalgamError, got ${String(err)}`);
  assert.equal(counter.reads, 0, 'no tensor data may be read before the error');
  return err;
}

function tensor(p: MergePlan, name: string): PlannedTensor {
  const t = p.tensors.find((x) => x.name === name);
  assert.ok(t, `plan has no ${name}`);
  return t;
}

const near = (a: unknown, b: number) => assert.ok(typeof a === 'number' && Math.abs(a - b) < 1e-12, `${String(a)} != ${b}`);

// -------------------------------------------------------------------------------------------
// Refusals

test('different architectures are refused unless crimes are allowed', async () => {
  const yaml = 'merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: mistral, parameters: {weight: 1}}\n';
  const e = await refused(yaml);
  assert.equal(e.code, 'E_ARCH');
  assert.match(e.message, /different architectures.*MistralForCausalLM/);
  assert.match(e.message, /--allow-crimes/);
  const warnings: string[] = [];
  const p = await plan(yaml, { allowCrimes: true, onWarning: (w) => warnings.push(w) });
  assert.equal(p.tensors.length, 1 + 4 * 9 + 2);
  assert.ok(warnings.some((w) => w.includes('crimes')));
});

test('a layer_range past the end is refused with the exclusive-end hint', async () => {
  const e = await refused(
    'merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n  - sources: [{model: short, layer_range: [1, 3]}]\n',
  );
  assert.equal(e.code, 'E_CONFIG');
  assert.equal(e.key, 'slices[1].sources[0].layer_range');
  assert.match(e.message, /out of bounds: the model has 2 layers/);
  assert.match(e.message, /exclusive.*\[0, 2\]/);
});

test('models of different depths in `models:` are refused, suggesting slices', async () => {
  const e = await refused('merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: short, parameters: {weight: 1}}\n');
  assert.equal(e.key, 'models');
  assert.match(e.message, /different layer counts \(a: 4, short: 2\)/);
  assert.match(e.message, /slices/);
});

test('a shape mismatch names the tensor, the models and their shapes', async () => {
  const e = await refused('merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: wide, parameters: {weight: 1}}\n');
  assert.equal(e.code, 'E_SHAPE');
  // The embeddings could be cut to a common submatrix; the first layer's norm cannot.
  assert.equal(e.key, 'model.layers.0.input_layernorm.weight');
  assert.match(e.message, /a \[16\], wide \[32\]/);
  assert.match(e.message, /not of the same size/);
});

test('ties refuses an embedding smaller than the base; linear merges the common rows and updates vocab_size', async () => {
  const e = await refused(
    'merge_method: ties\nbase_model: base\nmodels:\n  - {model: smallvocab, parameters: {weight: 1, density: 0.5}}\n',
  );
  assert.equal(e.code, 'E_SHAPE');
  assert.equal(e.key, 'model.embed_tokens.weight');
  assert.match(e.message, /smaller than the base model's \[32, 16\].*tokenizer_source/);

  const warnings: string[] = [];
  const p = await plan('merge_method: linear\nmodels:\n  - {model: bigvocab, parameters: {weight: 1}}\n  - {model: a, parameters: {weight: 1}}\n', {
    onWarning: (w) => warnings.push(w),
  });
  assert.deepEqual(tensor(p, 'model.embed_tokens.weight').shape, [32, 16]);
  assert.deepEqual(tensor(p, 'lm_head.weight').shape, [32, 16]);
  assert.equal(p.outputConfig.vocab_size, 32, 'vocab_size follows the rows written (donor bigvocab had 40)');
  assert.ok(warnings.some((w) => w.includes('common submatrix [32, 16]')));
  assert.ok(warnings.some((w) => w.includes('vocab_size')));

  // ties with the smallest vocabulary as the base cuts the others to it.
  const q = await plan('merge_method: ties\nbase_model: a\nmodels:\n  - {model: bigvocab, parameters: {weight: 1, density: 0.5}}\n');
  assert.deepEqual(tensor(q, 'model.embed_tokens.weight').shape, [32, 16]);
});

test('missing and out-of-range parameters name the parameter, the model and the fix', async () => {
  let e = await refused('merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {density: 0.5}}\n');
  assert.equal(e.code, 'E_CONFIG');
  assert.match(e.message, /'weight' for model a/);
  assert.match(e.message, /parameters:/);

  e = await refused('merge_method: linear\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1}}\n');
  assert.match(e.message, /'weight' for model base/, 'linear weights the base model like any input');

  e = await refused('merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1, density: [0.5, 1.5]}}\n');
  // The gradient first leaves [0, 1] at layer 2 (t = 2/3: 0.5 + 2/3).
  assert.match(e.message, /model a: density must be in \[0, 1\], got 1\.166/);
  assert.equal(e.key, 'model.layers.2.input_layernorm.weight');

  e = await refused('merge_method: della\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1, density: 0.1, epsilon: 0.2}}\n');
  assert.match(e.message, /della needs 0 < density - epsilon/);
  assert.match(e.message, /lower epsilon/);

  e = await refused('merge_method: slerp\nbase_model: base\nmodels:\n  - {model: a}\n');
  assert.match(e.message, /needs the parameter 't'/);
});

test('input counts and the base model requirement are checked per method', async () => {
  let e = await refused('merge_method: slerp\nbase_model: base\nmodels:\n  - {model: a}\n  - {model: b}\nparameters: {t: 0.5}\n');
  assert.match(e.message, /slerp merges exactly two models/);

  e = await refused('merge_method: ties\nmodels:\n  - {model: a, parameters: {weight: 1}}\n  - {model: b, parameters: {weight: 1}}\n');
  assert.match(e.message, /ties needs a base model/);
  assert.match(e.message, /base_model/);

  e = await refused('merge_method: passthrough\nmodels:\n  - {model: a}\n  - {model: b}\n');
  assert.match(e.message, /passthrough takes exactly one model per tensor/);
  assert.match(e.message, /slices/);

  e = await refused('merge_method: model_stock\nbase_model: base\nmodels:\n  - {model: a}\n');
  assert.match(e.message, /model_stock needs the base model plus at least two other models with this tensor; it has the base and one other/);

  e = await refused(
    'merge_method: ties\nbase_model: base\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4], parameters: {weight: 1}}\n      - {model: b, layer_range: [0, 4], parameters: {weight: 1}}\n',
  );
  assert.equal(e.key, 'slices[0].sources');
  assert.match(e.message, /base model base is not one of the sources of slice 0/);

  e = await refused(
    'merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n      - {model: a, layer_range: [2, 4]}\n',
  );
  assert.match(e.message, /appears twice among the sources of slice 0/);
});

test('adapters, revisions, hub ids, modules and missing folders are refused up front', async () => {
  // Tokenizer merging itself is covered in merge-tokenizer.test.ts; a model without tokenizer.json
  // cannot be the vocabulary donor.
  let e = await refused('merge_method: linear\ntokenizer_source: union\nmodels:\n  - {model: a, parameters: {weight: 1}}\n');
  assert.equal(e.code, 'E_MISSING');
  assert.equal(e.key, 'tokenizer');
  assert.match(e.message, /has no tokenizer\.json/);

  e = await refused('merge_method: linear\nmodels:\n  - {model: a+some/adapter, parameters: {weight: 1}}\n');
  assert.equal(e.code, 'E_IO');
  assert.match(e.message, /LoRA adapter folder .* does not exist/);

  e = await refused('merge_method: linear\nmodels:\n  - {model: a@main, parameters: {weight: 1}}\n');
  assert.match(e.message, /revision/);

  e = await refused('merge_method: linear\nmodels:\n  - {model: meta-llama/Llama-3-8B, parameters: {weight: 1}}\n');
  assert.equal(e.code, 'E_IO');
  assert.match(e.message, /does not download.*huggingface-cli download meta-llama\/Llama-3-8B/);

  e = await refused('merge_method: linear\nmodels:\n  - {model: ./nowhere, parameters: {weight: 1}}\n');
  assert.match(e.message, /does not exist.*resolved against/);

  e = await refused('merge_method: linear\nparameters: {weight: 1}\nmodules:\n  text:\n    models: [{model: a}, {model: b}]\n');
  assert.equal(e.code, 'E_UNSUPPORTED');
  assert.equal(e.key, 'modules');
  assert.match(e.message, /`text`.*single module, `default`/);
});

test('modules: {default: ...} plans exactly like the same models or slices at the top level', async () => {
  const strip = (p: MergePlan) => p.tensors.map((t) => ({ name: t.name, inputs: t.inputs, params: t.params, t: t.t }));
  // models form, with module parameters between per-model and global ones (a module filter list
  // that matches nothing falls through to the global value).
  const flat = await plan(`merge_method: ties
base_model: base
models:
  - {model: a, parameters: {weight: [0.2, 0.8]}}
  - {model: b}
parameters:
  weight: [{filter: mlp, value: 0.6}, {value: 0.3}]
  density: 0.7
  lambda: [{filter: self_attn, value: 1.5}]
`);
  const mod = await plan(`merge_method: ties
base_model: base
modules:
  default:
    models:
      - {model: a, parameters: {weight: [0.2, 0.8]}}
      - {model: b}
    parameters:
      weight: [{filter: mlp, value: 0.6}]
      lambda: [{filter: self_attn, value: 1.5}]
parameters:
  weight: 0.3
  density: 0.7
`);
  assert.deepEqual(strip(mod), strip(flat));
  near(tensor(mod, 'model.layers.1.mlp.up_proj.weight').params.perModel.b!.weight, 0.6);
  near(tensor(mod, 'model.layers.1.self_attn.q_proj.weight').params.perModel.b!.weight, 0.3);
  near(tensor(mod, 'model.layers.1.self_attn.q_proj.weight').params.global.lambda, 1.5);
  assert.equal(mod.numLayers, 4);

  // slices form: layers renumbered and the layer count updated, as at the top level.
  const slices = '  - sources: [{model: a, layer_range: [0, 3]}]\n  - sources: [{model: short, layer_range: [1, 2]}]\n';
  const flatS = await plan(`merge_method: passthrough\nslices:\n${slices}`);
  const modS = await plan(`merge_method: passthrough\nmodules:\n  default:\n    slices:\n${slices.replace(/^/gm, '    ')}`);
  assert.deepEqual(strip(modS), strip(flatS));
  assert.equal(modS.numLayers, 4);
  assert.equal(modS.outputConfig.num_hidden_layers, 4);

  // Errors name the key inside the module.
  const e = await refused('merge_method: passthrough\nmodules:\n  default:\n    slices:\n      - sources: [{model: short, layer_range: [0, 3]}]\n');
  assert.equal(e.key, 'modules.default.slices[0].sources[0].layer_range');
});

test('runMerge refuses before reading data and leaves nothing behind', async () => {
  const { counter, openModel } = countingOpen();
  const out = join(dir, 'never');
  await assert.rejects(
    runMerge(parseMergeConfig('merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {density: 0.5}}\n'), out, {
      baseDir: dir,
      openModel,
    }),
    /'weight' for model a/,
  );
  assert.equal(counter.reads, 0);
  await assert.rejects(readFile(join(out, 'config.json')), /ENOENT/);
});

// -------------------------------------------------------------------------------------------
// Layout

test('slices stack layers: output layers are renumbered and the layer count updated', async () => {
  const p = await plan(
    'merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 3]}]\n  - sources: [{model: b, layer_range: [1, 4]}]\n  - sources: [{model: short, layer_range: [1, 2]}]\n',
  );
  assert.equal(p.numLayers, 7);
  assert.equal(p.outputConfig.num_hidden_layers, 7);
  const layers = [...new Set(p.tensors.filter((t) => t.section === 'layer').map((t) => t.layer))];
  assert.deepEqual(layers, [0, 1, 2, 3, 4, 5, 6]);
  const src = (name: string) => tensor(p, name).inputs.map((i) => `${i.model}:${i.tensor}`);
  assert.deepEqual(src('model.layers.2.mlp.up_proj.weight'), ['a:model.layers.2.mlp.up_proj.weight']);
  assert.deepEqual(src('model.layers.3.mlp.up_proj.weight'), ['b:model.layers.1.mlp.up_proj.weight']);
  assert.deepEqual(src('model.layers.5.self_attn.q_proj.weight'), ['b:model.layers.3.self_attn.q_proj.weight']);
  assert.deepEqual(src('model.layers.6.input_layernorm.weight'), ['short:model.layers.1.input_layernorm.weight']);
  // Embeddings from the first slice, final norm and head from the last.
  assert.deepEqual(src('model.embed_tokens.weight'), ['a:model.embed_tokens.weight']);
  assert.deepEqual(src('model.norm.weight'), ['short:model.norm.weight']);
  assert.deepEqual(src('lm_head.weight'), ['short:lm_head.weight']);
  assert.equal(p.tensors.length, 1 + 7 * 9 + 2);
  assert.equal(p.tensors.at(-1)!.name, 'lm_head.weight');
  // Single-layer slice: t = 1.
  assert.equal(tensor(p, 'model.layers.6.input_layernorm.weight').t, 1);
  assert.equal(tensor(p, 'model.layers.3.mlp.up_proj.weight').t, 0);
});

test('a tied head: written when any input has one, tied inputs contribute their embeddings', async () => {
  const warnings: string[] = [];
  const p = await plan('merge_method: linear\nmodels:\n  - {model: tied, parameters: {weight: 1}}\n  - {model: a, parameters: {weight: 1}}\n', {
    onWarning: (w) => warnings.push(w),
  });
  const head = tensor(p, 'lm_head.weight');
  assert.deepEqual(
    head.inputs.map((i) => [i.model, i.tensor, i.tiedFor]),
    [
      ['tied', 'model.embed_tokens.weight', 'lm_head.weight'],
      ['a', 'lm_head.weight', undefined],
    ],
  );
  assert.equal(p.outputConfig.tie_word_embeddings, false, 'the donor (tied) said true, but a head is written');
  assert.ok(warnings.some((w) => w.includes('tie_word_embeddings')));

  const q = await plan('merge_method: linear\nmodels:\n  - {model: tied, parameters: {weight: 1}}\n  - {model: tied2, parameters: {weight: 1}}\n');
  assert.equal(q.tensors.some((t) => t.name === 'lm_head.weight'), false, 'no input has a head: none is written');
  assert.equal(q.outputConfig.tie_word_embeddings, true);
});

test('dtypes: out_dtype, dtype, and the base tensor dtype by default; config.json gets both keys', async () => {
  let p = await plan('merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\ndtype: float16\n');
  assert.ok(p.tensors.every((t) => t.dtype === 'F16'));
  assert.equal(p.computeDtype, 'F16');
  assert.equal(p.outputConfig.dtype, 'float16');
  assert.equal(p.outputConfig.torch_dtype, 'float16');
  p = await plan('merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\ndtype: bfloat16\nout_dtype: float32\n');
  assert.ok(p.tensors.every((t) => t.dtype === 'F32'));
  assert.equal(p.computeDtype, 'BF16');
  assert.equal(p.outputConfig.torch_dtype, 'float32');
  p = await plan('merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n');
  assert.ok(p.tensors.every((t) => t.dtype === 'BF16'));
  assert.equal(p.computeDtype, null);
  assert.equal(p.outputConfig.dtype, 'bfloat16');
});

test('the donor and copied files: the base model, else the first model in YAML order', async () => {
  let p = await plan('merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1}}\n');
  assert.equal(p.donor, 'base');
  assert.deepEqual(p.tokenizerFiles, { from: 'base', files: ['tokenizer.json', 'tokenizer_config.json'] });
  p = await plan('merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1}}\n', { copyTokenizer: false });
  assert.deepEqual(p.tokenizerFiles.files, []);
  p = await plan('merge_method: linear\nmodels:\n  - {model: b, parameters: {weight: 1}}\n  - {model: base, parameters: {weight: 1}}\n');
  assert.equal(p.donor, 'b');
  assert.deepEqual(p.tokenizerFiles.files, []);
  // JSON round trip: the plan is plain data.
  assert.deepEqual(JSON.parse(JSON.stringify(p)).tensors[5], JSON.parse(JSON.stringify(p.tensors[5])));
});

test('a density keeping no element is a warning, not an abort', async () => {
  const warnings: string[] = [];
  await plan('merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1, density: 0.05}}\n', {
    onWarning: (w) => warnings.push(w),
  });
  // 16-element norms at density 0.05: ⌊0.8⌋ = 0.
  assert.ok(warnings.some((w) => /keeps no element/.test(w) && w.includes('model.layers.0.input_layernorm.weight')), warnings.join('\n'));
});

// -------------------------------------------------------------------------------------------
// Parameters per tensor

test('gradients, filters and per-model overrides resolve per tensor as mergekit does', async () => {
  // models: form, 4 layers: t = layer / 3.
  const p = await plan(`merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0.2, 0.8]
      density: [{filter: self_attn, value: [1, 0.5]}, {value: 0.9}]
  - model: b
  - model: c
    parameters:
      weight: [{filter: self_attn, value: 0.1}]
parameters:
  weight: 0.3
  density: 0.7
  lambda: [1, 2]
  normalize: [{filter: norm, value: false}, {value: true}]
`);
  const at = (name: string) => tensor(p, name).params;
  // Layer 1 of 4: t = 1/3.
  let q = at('model.layers.1.self_attn.q_proj.weight');
  near(q.perModel.a!.weight, 0.2 + 0.6 / 3); // gradient [0.2, 0.8]
  near(q.perModel.a!.density, 1 - 0.5 / 3); // filtered gradient [1, 0.5]
  near(q.perModel.b!.weight, 0.3); // no own value: global
  near(q.perModel.b!.density, 0.7);
  near(q.perModel.c!.weight, 0.1); // own filter matches self_attn
  near(q.global.lambda, 1 + 1 / 3);
  assert.equal(q.global.normalize, true);
  assert.equal(q.perModel.base, undefined, 'the base model has no per-model parameters in ties');

  q = at('model.layers.2.mlp.up_proj.weight'); // t = 2/3
  near(q.perModel.a!.weight, 0.2 + 0.6 * (2 / 3));
  near(q.perModel.a!.density, 0.9); // the unfiltered entry
  near(q.perModel.c!.weight, 0.3); // own filter list matches nothing: falls through to global
  near(q.global.lambda, 1 + 2 / 3);

  q = at('model.layers.3.input_layernorm.weight'); // t = 1
  near(q.perModel.a!.weight, 0.8);
  assert.equal(q.global.normalize, false, '`norm` is a substring of input_layernorm');

  // Embeddings, the final norm and lm_head: t = 0.
  q = at('model.embed_tokens.weight');
  near(q.perModel.a!.weight, 0.2);
  near(q.global.lambda, 1);
  q = at('lm_head.weight');
  near(q.perModel.a!.weight, 0.2);
  q = at('model.norm.weight');
  assert.equal(q.global.normalize, false);
  near(q.global.lambda, 1);
});

test('slices: t restarts per slice, and per-model filters see the input tensor name', async () => {
  const p = await plan(`merge_method: ties
slices:
  - sources:
      - {model: a, layer_range: [0, 1]}
      - {model: base, layer_range: [0, 1]}
    base_model: base
    parameters: {lambda: [2, 3]}
  - sources:
      - model: a
        layer_range: [2, 4]
        parameters:
          weight: [{filter: layers.2., value: 0.25}, {value: 0.75}]
      - {model: base, layer_range: [2, 4]}
    base_model: base
    parameters: {weight: [0, 1]}
parameters: {weight: 5, density: [0.5, 1]}
`);
  assert.equal(p.numLayers, 3);
  const at = (name: string) => tensor(p, name);
  // Slice 0 has one layer: t = 1, so the slice's lambda gradient gives 3; weight from the global level.
  let t = at('model.layers.0.mlp.up_proj.weight');
  assert.equal(t.t, 1);
  near(t.params.global.lambda, 3);
  near(t.params.perModel.a!.weight, 5);
  near(t.params.perModel.a!.density, 1);
  // Output layer 1 reads input layer 2: the filter `layers.2.` matches the input name.
  t = at('model.layers.1.mlp.up_proj.weight');
  assert.equal(t.inputs[0]!.tensor, 'model.layers.2.mlp.up_proj.weight');
  assert.equal(t.t, 0);
  near(t.params.perModel.a!.weight, 0.25);
  near(t.params.perModel.a!.density, 0.5);
  near(t.params.global.lambda, 1);
  // Output layer 2 reads input layer 3.
  t = at('model.layers.2.mlp.up_proj.weight');
  assert.equal(t.t, 1);
  near(t.params.perModel.a!.weight, 0.75);
  near(t.params.perModel.a!.density, 1);
  // The head comes from the last slice at t = 0, where the source's own filter list gives 0.75.
  t = at('lm_head.weight');
  assert.equal(t.slice, 1);
  near(t.params.perModel.a!.weight, 0.75);
  // The embedding comes from the first slice: no own value there, and the slice's parameters have
  // no weight, so the global 5 applies.
  near(at('model.embed_tokens.weight').params.perModel.a!.weight, 5);
});
