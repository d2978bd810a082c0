/** Parsing and validation of mergekit YAML configurations (merge-methods.md §6). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  ConfigError,
  closestMatches,
  editDistance,
  effectiveOutDtype,
  effectiveTokenizer,
  knownParameterNames,
  loadMergeConfig,
  mergeMethodNames,
  parseMergeConfig,
  parseModelReference,
  referencedModels,
  sameModel,
  sliceLayout,
  validateMergeConfig,
} from '../src/config/index.js';
import type { ConfigWarning, MergeConfig } from '../src/config/index.js';

const ref = (id: string) => parseModelReference(id);

/** Parses `yaml` expecting a ConfigError; returns it. */
function configError(yaml: string, file = 'merge.yml'): ConfigError {
  try {
    parseMergeConfig(yaml, { file });
  } catch (e) {
    assert.ok(e instanceof ConfigError, `expected ConfigError, got ${String(e)}`);
    assert.equal(e.code, 'E_CONFIG');
    return e;
  }
  assert.fail('expected the configuration to be rejected');
}

/** The issue at `path` (formatted), or a failure listing the issues found. */
function issueAt(e: ConfigError, path: string) {
  const found = e.issues.find((i) => formatted(i.path) === path);
  assert.ok(found, `no issue at ${path}; got:\n${e.message}`);
  return found;
}

function formatted(path: (string | number)[]): string {
  return path.map((s, i) => (typeof s === 'number' ? `[${s}]` : /^[A-Za-z_]\w*$/.test(s) ? `${i ? '.' : ''}${s}` : `[${JSON.stringify(s)}]`)).join('');
}

// ---------------------------------------------------------------------------------------------
// §6.9 illustrative configurations

test('§6.9 gradient SLERP with filters', () => {
  const cfg = parseMergeConfig(`
merge_method: slerp
base_model: org/model-a
slices:
  - sources:
      - {model: org/model-a, layer_range: [0, 40]}
      - {model: org/model-b, layer_range: [0, 40]}
parameters:
  t:
    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
    - value: 0.5
dtype: float16
`);
  const expected: MergeConfig = {
    merge_method: 'slerp',
    base_model: ref('org/model-a'),
    slices: [
      {
        sources: [
          { model: ref('org/model-a'), layer_range: [0, 40] },
          { model: ref('org/model-b'), layer_range: [0, 40] },
        ],
      },
    ],
    parameters: {
      t: [
        { filter: 'self_attn', value: [0, 0.5, 0.3, 0.7, 1] },
        { filter: 'mlp', value: [1, 0.5, 0.7, 0.3, 0] },
        { value: 0.5 },
      ],
    },
    dtype: 'float16',
  };
  assert.deepEqual(cfg, expected);
  assert.equal(effectiveOutDtype(cfg), 'float16');
  assert.deepEqual(sliceLayout(cfg), [
    {
      slice: 0,
      outputStart: 0,
      length: 40,
      sources: [
        { model: ref('org/model-a'), start: 0 },
        { model: ref('org/model-b'), start: 0 },
      ],
      base_model: ref('org/model-a'),
    },
  ]);
});

test('§6.9 TIES with per-model gradients and a per-model filter', () => {
  const cfg = parseMergeConfig(`
merge_method: ties
base_model: org/base
models:
  - model: org/expert-1
    parameters: {density: [1, 0.7, 0.1], weight: 1.0}
  - model: org/expert-2
    parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}
  - model: org/expert-3
    parameters: {density: 0.33, weight: [{filter: mlp, value: 0.5}, {value: 0}]}
parameters: {normalize: true, int8_mask: true}
dtype: float16
`);
  assert.equal(cfg.merge_method, 'ties');
  assert.deepEqual(cfg.base_model, ref('org/base'));
  assert.equal(cfg.slices, undefined);
  assert.deepEqual(cfg.models, [
    { model: ref('org/expert-1'), parameters: { density: [1, 0.7, 0.1], weight: 1 } },
    { model: ref('org/expert-2'), parameters: { density: 0.5, weight: [0, 0.3, 0.7, 1] } },
    { model: ref('org/expert-3'), parameters: { density: 0.33, weight: [{ filter: 'mlp', value: 0.5 }, { value: 0 }] } },
  ]);
  assert.deepEqual(cfg.parameters, { normalize: true, int8_mask: true });
  // The base model is appended to the implicit slice, without parameters.
  const layout = sliceLayout(cfg, { layerCount: 32 });
  assert.equal(layout.length, 1);
  assert.equal(layout[0].length, 32);
  assert.deepEqual(
    layout[0].sources.map((s) => s.model.id),
    ['org/expert-1', 'org/expert-2', 'org/expert-3', 'org/base'],
  );
  assert.throws(() => sliceLayout(cfg), /layer count/);
  assert.deepEqual(
    referencedModels(cfg).map((m) => m.id),
    ['org/base', 'org/expert-1', 'org/expert-2', 'org/expert-3'],
  );
});

test('§6.9 passthrough layer stacking: 24 + 20 = 44 output layers', () => {
  const cfg = parseMergeConfig(`
merge_method: passthrough
slices:
  - sources: [{model: org/model-a, layer_range: [0, 24]}]
  - sources: [{model: org/model-b, layer_range: [20, 40]}]
dtype: float16
`);
  assert.deepEqual(cfg, {
    merge_method: 'passthrough',
    slices: [
      { sources: [{ model: ref('org/model-a'), layer_range: [0, 24] }] },
      { sources: [{ model: ref('org/model-b'), layer_range: [20, 40] }] },
    ],
    dtype: 'float16',
  });
  const layout = sliceLayout(cfg);
  assert.deepEqual(
    layout.map((s) => [s.outputStart, s.length, s.sources[0].start]),
    [
      [0, 24, 0],
      [24, 20, 20],
    ],
  );
  assert.equal(layout.reduce((n, s) => n + s.length, 0), 44);
});

// ---------------------------------------------------------------------------------------------
// Other accepted forms

test('all top-level keys, slice base_model and residual_weight (warned), chat_template, out_dtype', () => {
  const warnings: ConfigWarning[] = [];
  const cfg = parseMergeConfig(
    `
merge_method: linear
base_model: base@main
dtype: bfloat16
out_dtype: float32
chat_template: chatml
tokenizer_source: union
parameters: {normalize: false, weight: 1}
slices:
  - sources:
      - {model: ./models/a, layer_range: [0, 2]}
      - {model: ./models/b, layer_range: [2, 4], parameters: {weight: 0.5}}
    base_model: other
    residual_weight: 0.3
    parameters: {weight: [0, 1]}
`,
    { onWarning: (w) => warnings.push(w) },
  );
  assert.equal(cfg.out_dtype, 'float32');
  assert.equal(effectiveOutDtype(cfg), 'float32');
  assert.equal(cfg.chat_template, 'chatml');
  assert.equal(cfg.tokenizer_source, 'union');
  assert.deepEqual(effectiveTokenizer(cfg), { source: 'union' });
  assert.deepEqual(cfg.base_model, { id: 'base@main', model: 'base', revision: 'main' });
  assert.deepEqual(cfg.slices?.[0].base_model, ref('other'));
  assert.equal(cfg.slices?.[0].residual_weight, 0.3);
  assert.equal(sliceLayout(cfg)[0].base_model?.id, 'other');
  assert.equal(warnings.length, 1);
  assert.equal(warnings[0].path, 'slices[0].residual_weight');
  assert.equal(warnings[0].line, 14);
});

test('model references: path, @revision, +adapter, object form', () => {
  assert.deepEqual(parseModelReference('/models/llama'), { id: '/models/llama', model: '/models/llama' });
  assert.deepEqual(parseModelReference('org/m@v1+./lora@abc'), {
    id: 'org/m@v1+./lora@abc',
    model: 'org/m',
    revision: 'v1',
    adapter: './lora',
    adapterRevision: 'abc',
  });
  assert.throws(() => parseModelReference('a+b+c'), /more than one `\+`/);
  assert.throws(() => parseModelReference('a@b@c'), /more than one `@`/);
  assert.throws(() => parseModelReference('+lora'), /empty/);
  assert.ok(sameModel('a+b', parseModelReference('a+b')));
  assert.ok(!sameModel('a+b', 'a'));

  const cfg = parseMergeConfig(`
merge_method: task_arithmetic
base_model: ./base
models:
  - model: ./base+./adapters/math
    parameters: {weight: 1}
  - model: {model: ./base, lora: ./adapters/code@r2, override_architecture: LlamaForCausalLM}
    parameters: {weight: 1}
  - model: {model: {path: ./other, revision: r1}}
    parameters: {weight: 1}
`);
  assert.deepEqual(cfg.models?.[0].model, { id: './base+./adapters/math', model: './base', adapter: './adapters/math' });
  assert.deepEqual(cfg.models?.[1].model, {
    id: './base+./adapters/code@r2',
    model: './base',
    adapter: './adapters/code',
    adapterRevision: 'r2',
    overrideArchitecture: 'LlamaForCausalLM',
  });
  assert.deepEqual(cfg.models?.[2].model, { id: './other@r1', model: './other', revision: 'r1' });
});

test('tokenizer block variants', () => {
  const cfg = parseMergeConfig(`
merge_method: linear
models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]
tokenizer:
  source: base
  pad_to_multiple_of: 64
  tokens:
    <|im_start|>:
      source: a
    <|im_end|>:
      source: {kind: model_token, model: b, token: </s>}
      force: true
    <pad>:
      source: {kind: zero}
    <tool>:
      source: {kind: model_token, model: b+lora, token_id: 7}
    <unk>: {}
`);
  assert.deepEqual(cfg.tokenizer, {
    source: 'base',
    pad_to_multiple_of: 64,
    tokens: {
      '<|im_start|>': { source: ref('a'), force: false },
      '<|im_end|>': { source: { kind: 'model_token', model: ref('b'), token: '</s>' }, force: true },
      '<pad>': { source: { kind: 'zero' }, force: false },
      '<tool>': { source: { kind: 'model_token', model: ref('b+lora'), token_id: 7 }, force: false },
      '<unk>': { force: false },
    },
  });
  assert.equal(effectiveTokenizer(cfg), cfg.tokenizer);

  const defaults = parseMergeConfig('merge_method: linear\nmodels: [{model: a}]\ntokenizer: {}\n');
  assert.deepEqual(defaults.tokenizer, { source: 'union' });
  const byModel = parseMergeConfig('merge_method: linear\nmodels: [{model: a}]\ntokenizer: {source: org/x@r}\n');
  assert.deepEqual(byModel.tokenizer?.source, ref('org/x@r'));
  const shorthand = parseMergeConfig('merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: org/x\n');
  assert.deepEqual(effectiveTokenizer(shorthand), { source: ref('org/x') });
  assert.equal(effectiveTokenizer(parseMergeConfig('merge_method: linear\nmodels: [{model: a}]\n')), undefined);
});

test('tokenizer errors: both forms, token and token_id, unknown kind, pad_to_multiple_of', () => {
  const both = configError('merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: base\ntokenizer: {source: union}\n');
  assert.match(issueAt(both, 'tokenizer').message, /either `tokenizer_source` or `tokenizer`/);

  const neither = configError(`merge_method: linear
models: [{model: a}]
tokenizer: {tokens: {x: {source: {kind: model_token, model: a}}}}
`);
  assert.match(issueAt(neither, 'tokenizer.tokens.x.source').message, /needs `token` or `token_id`/);

  const twice = configError(`merge_method: linear
models: [{model: a}]
tokenizer: {tokens: {x: {source: {kind: model_token, model: a, token: y, token_id: 3}}}}
`);
  assert.match(issueAt(twice, 'tokenizer.tokens.x.source').message, /only one of `token` and `token_id`/);

  const kind = configError(`merge_method: linear
models: [{model: a}]
tokenizer: {tokens: {x: {source: {kind: zeros}}}}
`);
  const k = issueAt(kind, 'tokenizer.tokens.x.source');
  assert.match(k.message, /kind must be `model_token` or `zero`/);
  assert.equal(k.hint, 'did you mean `zero`?');

  const pad = configError('merge_method: linear\nmodels: [{model: a}]\ntokenizer: {pad_to_multiple_of: 0}\n');
  assert.match(issueAt(pad, 'tokenizer.pad_to_multiple_of').message, />= 1/);

  const forced = configError('merge_method: linear\nmodels: [{model: a}]\ntokenizer: {tokens: {x: {forse: true}}}\n');
  assert.equal(issueAt(forced, 'tokenizer.tokens.x.forse').hint, 'did you mean `force`?');

  const src = configError('merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: 3\n');
  assert.match(issueAt(src, 'tokenizer_source').message, /`union`, `base` or a model reference/);
});

test('modules: each module takes models or slices, plus parameters', () => {
  const cfg = parseMergeConfig(`
merge_method: linear
parameters: {weight: 1}
modules:
  text_decoder:
    slices:
      - sources: [{model: a, layer_range: [0, 4]}, {model: b, layer_range: [0, 4]}]
  vision_tower:
    models: [{model: a}, {model: b}]
    parameters: {weight: 0.5}
`);
  assert.deepEqual(Object.keys(cfg.modules ?? {}), ['text_decoder', 'vision_tower']);
  assert.deepEqual(cfg.modules?.vision_tower.parameters, { weight: 0.5 });
  assert.equal(sliceLayout(cfg, { module: 'text_decoder' })[0].length, 4);
  assert.throws(() => sliceLayout(cfg, { module: 'audio' }), /no module `audio`/);

  const bad = configError(`
merge_method: linear
modules:
  text: {models: [{model: a}], slices: [{sources: [{model: a, layer_range: [0, 1]}]}]}
  vision: {parameters: {weight: 1}}
`);
  assert.match(issueAt(bad, 'modules.text.slices').message, /only one of `models` or `slices`/);
  assert.match(issueAt(bad, 'modules.vision').message, /one of `models` or `slices` is required/);
});

test('PyYAML booleans (yes/no/on/off) and YAML 1.2 numbers', () => {
  const cfg = parseMergeConfig(`
merge_method: ties
base_model: y
models: [{model: n, parameters: {weight: 1, density: 5e-1}}]
parameters: {normalize: no, int8_mask: on, lambda: 1e-1}
`);
  assert.deepEqual(cfg.parameters, { normalize: false, int8_mask: true, lambda: 0.1 });
  assert.equal(cfg.base_model?.id, 'y');
  assert.equal(cfg.models?.[0].model.id, 'n');
  assert.equal(cfg.models?.[0].parameters?.density, 0.5);
});

test('value ranges are not checked here: density 1.5 and negative weights parse', () => {
  const cfg = parseMergeConfig('merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: 1.5, weight: -2}}]\n');
  assert.deepEqual(cfg.models?.[0].parameters, { density: 1.5, weight: -2 });
});

test('validateMergeConfig accepts an already-parsed object; loadMergeConfig reads a file', async () => {
  const cfg = validateMergeConfig({ merge_method: 'linear', models: [{ model: 'a', parameters: { weight: 1 } }], base_model: null });
  assert.deepEqual(cfg, { merge_method: 'linear', models: [{ model: ref('a'), parameters: { weight: 1 } }] });
  assert.throws(
    () => validateMergeConfig({ merge_method: 'linear', models: [{ modle: 'a' }] }, { file: 'x.json' }),
    (e: ConfigError) => e.key === 'models[0].modle' && e.hint === 'did you mean `model`?' && e.file === 'x.json',
  );

  const dir = mkdtempSync(join(tmpdir(), 'amalgam-config-'));
  try {
    const file = join(dir, 'merge.yml');
    writeFileSync(file, 'merge_method: linear\nmodels:\n  - model: a\n    parameters: {wieght: 1}\n');
    await assert.rejects(loadMergeConfig(file), (e: ConfigError) => e.sourceFile === file && e.file === `${file}:4:18` && e.line === 4);
    writeFileSync(file, 'merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n');
    assert.equal((await loadMergeConfig(file)).merge_method, 'linear');
    await assert.rejects(loadMergeConfig(join(dir, 'missing.yml')), (e: Error & { code?: string }) => e.code === 'E_IO');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------------------------------------
// Errors

test('a misspelled key names its path and line and suggests the right key', () => {
  const e = configError(`merge_method: slerp
base_model: a
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
      - model: b
        layer_rnage: [0, 4]
parameters: {t: 0.5}
`);
  assert.equal(e.issues.length, 1, e.message); // the "missing layer_range" it implies is not reported separately
  assert.equal(e.key, 'slices[0].sources[1].layer_rnage');
  assert.equal(e.hint, 'did you mean `layer_range`?');
  assert.equal(e.line, 8);
  assert.equal(e.column, 9);
  assert.equal(e.file, 'merge.yml:8:9');
  assert.equal(
    e.message,
    "merge.yml:8:9: 'slices[0].sources[1].layer_rnage': unknown key `layer_rnage` (did you mean `layer_range`?)",
  );
});

test('unknown top-level keys, parameters written outside parameters:, several issues at once', () => {
  const e = configError(`merge_metod: ties
models:
  - model: a
    weight: 0.5
  - model: b
    parameters: {weight: 1}
dtyp: float16
`);
  assert.equal(e.issues.length, 3, e.message);
  assert.equal(issueAt(e, 'merge_metod').hint, 'did you mean `merge_method`?');
  assert.equal(issueAt(e, 'models[0].weight').hint, '`weight` is a parameter: put it under `parameters:`');
  assert.equal(issueAt(e, 'dtyp').hint, 'did you mean `dtype`?');
  assert.deepEqual(
    e.issues.map((i) => i.line),
    [1, 4, 7],
  );
  assert.equal(e.message.split('\n').length, 3);
  const noMethod = configError('models: [{model: a}]\n');
  assert.match(issueAt(noMethod, 'merge_method').message, /missing required key `merge_method`/);
});

test('bad layer_range: empty, reversed, negative, wrong length, not integers, not a list', () => {
  const lr = (range: string) => {
    const e = configError(`merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: ${range}}]\n`);
    return issueAt(e, 'slices[0].sources[0].layer_range');
  };
  const empty = lr('[4, 4]');
  assert.match(empty.message, /\[4, 4\] is empty/);
  assert.match(empty.hint ?? '', /exclusive/);
  assert.match(lr('[8, 2]').message, /\[8, 2\] is empty/);
  assert.match(lr('[-1, 2]').message, /start must be >= 0/);
  assert.match(lr('[0, 2, 4]').message, /two integers/);
  assert.match(lr('[0, 2.5]').message, /two integers/);
  assert.match(lr('"0-4"').message, /two integers .*string "0-4"/);
  const missing = configError('merge_method: passthrough\nslices:\n  - sources: [{model: a}]\n');
  assert.match(issueAt(missing, 'slices[0].sources[0].layer_range').message, /missing required key `layer_range`/);
});

test('sources of a slice must cover the same number of layers', () => {
  const e = configError(`merge_method: linear
slices:
  - sources:
      - {model: a, layer_range: [0, 24]}
      - {model: b, layer_range: [0, 23]}
parameters: {weight: 1}
`);
  const i = issueAt(e, 'slices[0].sources[1].layer_range');
  assert.match(i.message, /covers 23 layers but sources\[0\] covers 24/);
  assert.equal(i.line, 5);
  const none = configError('merge_method: linear\nslices:\n  - sources: []\n');
  assert.match(issueAt(none, 'slices[0].sources').message, /at least one source/);
});

test('wrong types are errors', () => {
  const e = configError(`merge_method: linear
base_model: 12
models:
  - model: a
    parameters: [weight, 1]
  - model: b
    parameters: {weight: {value: 1, filtr: mlp}}
  - model: c
    parameters: {weight: null}
  - model: d
    parameters: {weight: [1, {value: 2}]}
chat_template: 3
`);
  assert.match(issueAt(e, 'base_model').message, /expected a model reference.*number 12/);
  assert.equal(issueAt(e, 'base_model').hint, 'quote the name');
  assert.match(issueAt(e, 'models[0].parameters').message, /expected a mapping, got a list/);
  assert.equal(issueAt(e, 'models[1].parameters.weight.filtr').hint, 'did you mean `filter`?');
  assert.match(issueAt(e, 'models[2].parameters.weight').message, /expected a number, .*got null/);
  assert.match(issueAt(e, 'models[3].parameters.weight').message, /mixes \{filter, value\} entries with plain values/);
  assert.match(issueAt(e, 'chat_template').message, /expected a string, got number 3/);

  const top = configError('- merge_method: linear\n');
  assert.match(top.message, /expected a mapping of top-level keys/);
  const empty = configError('\n# nothing\n');
  assert.match(empty.message, /the configuration is empty/);
  const yaml = configError('merge_method: linear\nmerge_method: ties\n');
  assert.match(yaml.message, /invalid YAML: Map keys must be unique/);
  assert.equal(yaml.line, 2);
});

test('parameter value types follow the method: numbers, booleans, integers', () => {
  const e = configError(`merge_method: karcher
models: [{model: a}, {model: b}]
parameters: {max_iter: 2.5, tol: "1e-5"}
`);
  assert.match(issueAt(e, 'parameters.max_iter').message, /takes integers, got number 2.5/);
  const tol = issueAt(e, 'parameters.tol');
  assert.match(tol.message, /takes numbers, got the string "1e-5"/);
  assert.equal(tol.hint, 'remove the quotes');

  const b = configError(`merge_method: ties
base_model: base
models: [{model: a, parameters: {weight: [true, false]}}]
parameters: {normalize: 1, rescale: [true, false], int8_mask: [{filter: mlp, value: 0}]}
`);
  assert.match(issueAt(b, 'models[0].parameters.weight[0]').message, /takes numbers, got boolean true/);
  assert.equal(issueAt(b, 'parameters.normalize').hint, 'write true or false');
  assert.match(issueAt(b, 'parameters.int8_mask[0].value').message, /takes true or false/);
  assert.ok(!b.issues.some((i) => formatted(i.path).startsWith('parameters.rescale')), 'a boolean step list is fine');
});

test('misspelled and misplaced parameter names', () => {
  const e = configError(`merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 1, densty: 0.5, normalize: true}
slices: ~
parameters: {lamda: 0.5, foo: 1}
`);
  const densty = issueAt(e, 'models[0].parameters.densty');
  assert.match(densty.message, /unknown parameter `densty` for merge_method `ties`/);
  assert.equal(densty.hint, 'did you mean `density`?');
  assert.match(issueAt(e, 'models[0].parameters.normalize').message, /global parameter of `ties`/);
  assert.equal(issueAt(e, 'parameters.lamda').hint, 'did you mean `lambda`?');
  assert.match(issueAt(e, 'parameters.foo').hint ?? '', /`ties` reads: normalize, rescale, lambda, int8_mask, weight, density/);

  const k = configError('merge_method: karcher\nmodels: [{model: a, parameters: {weight: 1}}, {model: b}]\n');
  assert.equal(issueAt(k, 'models[0].parameters.weight').hint, 'karcher weights are fixed at 1/N');
  const f = configError('merge_method: arcee_fusion\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: 1}\n');
  assert.equal(issueAt(f, 'parameters.t').hint, '`arcee_fusion` takes no parameters');

  // Per-model parameters may be set at the slice and global levels.
  parseMergeConfig(`merge_method: breadcrumbs_ties
base_model: base
slices:
  - sources: [{model: base, layer_range: [0, 2]}, {model: a, layer_range: [0, 2], parameters: {gamma: 0.02}}]
    parameters: {density: 0.9, normalize: true}
parameters: {weight: 1, gamma: 0.01}
`);
});

test('unknown merge_method lists close matches; removed methods say what to use', () => {
  const e = configError('merge_method: dare_tie\nmodels: [{model: a}]\n');
  const i = issueAt(e, 'merge_method');
  assert.match(i.message, /unknown merge_method `dare_tie`/);
  assert.equal(i.hint, 'did you mean `dare_ties` or `dare_linear`?');
  assert.equal(i.line, 1);
  assert.equal(issueAt(configError('merge_method: Linear\nmodels: [{model: a}]\n'), 'merge_method').hint, 'did you mean `linear`?');
  assert.match(issueAt(configError('merge_method: frobnicate\nmodels: [{model: a}]\n'), 'merge_method').hint ?? '', /known methods: linear, slerp/);
  assert.match(issueAt(configError('merge_method: consensus_ties\nmodels: [{model: a}]\n'), 'merge_method').hint ?? '', /removed .*use `ties`/);
});

test('bad dtype suggests the right name', () => {
  const e = configError('merge_method: linear\nmodels: [{model: a}]\ndtype: bf16\nout_dtype: float64\n');
  const d = issueAt(e, 'dtype');
  assert.match(d.message, /dtype must be one of `bfloat16`, `float16`, `float32`, got the string "bf16"/);
  assert.equal(d.hint, 'did you mean `bfloat16`?');
  assert.equal(issueAt(e, 'out_dtype').hint, 'did you mean `float16`?');
  assert.match(issueAt(configError('merge_method: linear\nmodels: [{model: a}]\ndtype: 16\n'), 'dtype').message, /number 16/);
});

test('exactly one of models, slices, modules', () => {
  const none = configError('merge_method: linear\n');
  assert.match(none.message, /one of `models`, `slices` or `modules` is required/);
  const emptyList = configError('merge_method: linear\nmodels: []\n');
  assert.match(emptyList.message, /is required \(and must not be empty\)/);
  const two = configError(`merge_method: linear
models: [{model: a}]
slices: [{sources: [{model: a, layer_range: [0, 1]}]}]
`);
  assert.match(issueAt(two, 'slices').message, /only one of .*found `models` and `slices`/);
});

// ---------------------------------------------------------------------------------------------
// Method table and suggestions

test('knownParameterNames follows the method catalogue', () => {
  assert.deepEqual(knownParameterNames('ties'), {
    global: ['normalize', 'rescale', 'lambda', 'int8_mask'],
    perModel: ['weight', 'density'],
  });
  assert.deepEqual(knownParameterNames('della')?.perModel, ['weight', 'density', 'epsilon']);
  assert.deepEqual(knownParameterNames('breadcrumbs')?.perModel, ['weight', 'density', 'gamma']);
  assert.deepEqual(knownParameterNames('slerp'), { global: ['t'], perModel: [] });
  assert.deepEqual(knownParameterNames('nuslerp'), { global: ['nuslerp_flatten', 'nuslerp_row_wise'], perModel: ['weight'] });
  assert.deepEqual(knownParameterNames('ramplus_tl'), { global: ['epsilon', 'r', 'alpha'], perModel: [] });
  assert.deepEqual(knownParameterNames('passthrough'), { global: [], perModel: ['scale'] });
  assert.equal(knownParameterNames('nope'), undefined);
  assert.equal(mergeMethodNames().length, 20);
});

test('edit distance and suggestions', () => {
  assert.equal(editDistance('layer_rnage', 'layer_range'), 1);
  assert.equal(editDistance('kitten', 'sitting'), 3);
  assert.equal(editDistance('', 'abc'), 3);
  assert.deepEqual(closestMatches('densty', ['density', 'weight', 'gamma']), ['density']);
  assert.deepEqual(closestMatches('w', ['t']), []);
  assert.deepEqual(closestMatches('zzzzzz', ['density']), []);
});
