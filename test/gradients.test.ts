/**
 * Parameter resolution (gradients, filters, precedence) against the reference values of
 * golden/GRADIENTS.md, which were computed by executing mergekit's own config code.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { TestContext } from 'node:test';
import { REPO_ROOT } from './helpers/fixtures.js';
import {
  evaluateSetting,
  gradientPosition,
  parseMergeConfig,
  ParameterResolver,
  resolveParameter,
} from '../src/config/index.js';
import type { MergeConfig, ParameterQuery, ParameterSetting } from '../src/config/index.js';

const GOLDEN = resolve(process.env.AMALGAM_GOLDEN ?? join(REPO_ROOT, '..', 'shared', 'golden'));

/** The table values are printed with 6 decimals. */
const EPS = 5e-7;

function close(actual: unknown, expected: number, what: string): void {
  assert.equal(typeof actual, 'number', `${what}: expected a number, got ${String(actual)}`);
  assert.ok(Math.abs((actual as number) - expected) <= EPS, `${what}: got ${String(actual)}, expected ${expected}`);
}

// Configurations of the worked examples (GRADIENTS.md §5), written out as YAML.
const CONFIGS: Record<string, string> = {
  global_gradient: `
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters: {t: [0.2, 0.5, 0.9]}
`,
  per_model_gradient: `
merge_method: linear
models:
  - {model: a, parameters: {weight: [0.2, 0.8]}}
  - {model: b, parameters: {weight: 1.0}}
`,
  five_point_gradient: `
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters: {t: [0, 0.5, 0.3, 0.7, 1]}
`,
  filtered_t: `
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters:
  t: [{filter: self_attn, value: [0, 1]}, {filter: mlp, value: [1, 0]}, {value: 0.5}]
`,
  substring_filters: `
merge_method: linear
models:
  - model: a
    parameters:
      weight: [{filter: layers.1, value: 0.9}, {filter: layers.10, value: 0.1}, {value: 0.5}]
  - {model: b, parameters: {weight: 1.0}}
`,
  norm_filter: `
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters:
  t: [{filter: norm, value: 0.0}, {value: 1.0}]
`,
  precedence: `
merge_method: linear
parameters: {weight: 0.3}
models:
  - {model: a, parameters: {weight: 0.8}}
  - model: b
  - {model: c, parameters: {weight: [{filter: self_attn, value: 0.1}]}}
`,
  slices: `
merge_method: ties
base_model: base
parameters: {weight: 5}
slices:
  - sources: [{model: a, layer_range: [0, 4]}]
    parameters: {weight: [0, 1]}
  - sources:
      - model: a
        layer_range: [8, 12]
        parameters:
          density: [{filter: 'layers.8.', value: 0.25}, {value: 0.75}]
    parameters: {weight: [0, 1]}
  - sources: [{model: a, layer_range: [20, 21]}]
    parameters: {weight: [0, 1]}
`,
};

const parsed = new Map<string, MergeConfig>();
function config(name: string): MergeConfig {
  let c = parsed.get(name);
  if (!c) {
    c = parseMergeConfig(CONFIGS[name], { file: `${name}.yml` });
    parsed.set(name, c);
  }
  return c;
}

interface Row {
  id: number;
  config: string;
  query: ParameterQuery;
  /** t column of the table. */
  t: number;
  /** resolved column of the table. */
  expected: number;
}

const q = (name: string, tensor: string, rest: Omit<ParameterQuery, 'name' | 'tensor'>): ParameterQuery => ({ name, tensor, ...rest });

/**
 * Transcribed from golden/GRADIENTS.md §5 ("Worked examples"), rows #1 to #25: the id, the
 * parameter, model, tensor and layer position, the t column and the resolved column.
 */
const ROWS: Row[] = [
  { id: 1, config: 'global_gradient', query: q('t', 'model.layers.0.self_attn.q_proj.weight', { layer: 0, layerCount: 8 }), t: 0, expected: 0.2 },
  { id: 2, config: 'global_gradient', query: q('t', 'model.layers.3.self_attn.q_proj.weight', { layer: 3, layerCount: 8 }), t: 0.428571, expected: 0.457143 },
  { id: 3, config: 'global_gradient', query: q('t', 'model.layers.7.self_attn.q_proj.weight', { layer: 7, layerCount: 8 }), t: 1, expected: 0.9 },
  { id: 4, config: 'global_gradient', query: q('t', 'model.embed_tokens.weight', { position: 'pre' }), t: 0, expected: 0.2 },
  { id: 5, config: 'global_gradient', query: q('t', 'model.norm.weight', { position: 'post' }), t: 0, expected: 0.2 },
  { id: 6, config: 'global_gradient', query: q('t', 'lm_head.weight', { position: 'post' }), t: 0, expected: 0.2 },
  { id: 7, config: 'per_model_gradient', query: q('weight', 'model.layers.1.mlp.up_proj.weight', { layer: 1, layerCount: 5, model: 'a' }), t: 0.25, expected: 0.35 },
  { id: 8, config: 'five_point_gradient', query: q('t', 'model.layers.10.mlp.down_proj.weight', { layer: 10, layerCount: 32 }), t: 0.322581, expected: 0.441935 },
  { id: 9, config: 'filtered_t', query: q('t', 'model.layers.1.self_attn.o_proj.weight', { layer: 1, layerCount: 5 }), t: 0.25, expected: 0.25 },
  { id: 10, config: 'filtered_t', query: q('t', 'model.layers.1.mlp.gate_proj.weight', { layer: 1, layerCount: 5 }), t: 0.25, expected: 0.75 },
  { id: 11, config: 'filtered_t', query: q('t', 'model.layers.1.input_layernorm.weight', { layer: 1, layerCount: 5 }), t: 0.25, expected: 0.5 },
  { id: 12, config: 'filtered_t', query: q('t', 'model.embed_tokens.weight', { position: 'pre' }), t: 0, expected: 0.5 },
  { id: 13, config: 'substring_filters', query: q('weight', 'model.layers.10.mlp.up_proj.weight', { layer: 10, layerCount: 12, model: 'a' }), t: 0.909091, expected: 0.9 },
  { id: 14, config: 'substring_filters', query: q('weight', 'model.layers.2.mlp.up_proj.weight', { layer: 2, layerCount: 12, model: 'a' }), t: 0.181818, expected: 0.5 },
  { id: 15, config: 'norm_filter', query: q('t', 'model.layers.3.input_layernorm.weight', { layer: 3, layerCount: 4 }), t: 1, expected: 0 },
  { id: 16, config: 'norm_filter', query: q('t', 'model.norm.weight', { position: 'post' }), t: 0, expected: 0 },
  { id: 17, config: 'precedence', query: q('weight', 'model.layers.2.mlp.up_proj.weight', { layer: 2, layerCount: 4, model: 'a' }), t: 0.666667, expected: 0.8 },
  { id: 18, config: 'precedence', query: q('weight', 'model.layers.2.mlp.up_proj.weight', { layer: 2, layerCount: 4, model: 'b' }), t: 0.666667, expected: 0.3 },
  { id: 19, config: 'precedence', query: q('weight', 'model.layers.2.mlp.up_proj.weight', { layer: 2, layerCount: 4, model: 'c' }), t: 0.666667, expected: 0.3 },
  { id: 20, config: 'precedence', query: q('weight', 'model.layers.2.self_attn.k_proj.weight', { layer: 2, layerCount: 4, model: 'c' }), t: 0.666667, expected: 0.1 },
  {
    id: 21,
    config: 'slices',
    query: q('weight', 'model.layers.3.mlp.up_proj.weight', { layer: 3, model: 'a', inputTensor: 'model.layers.3.mlp.up_proj.weight' }),
    t: 1,
    expected: 1,
  },
  {
    id: 22,
    config: 'slices',
    query: q('weight', 'model.layers.4.mlp.up_proj.weight', { layer: 4, model: 'a', inputTensor: 'model.layers.8.mlp.up_proj.weight' }),
    t: 0,
    expected: 0,
  },
  {
    id: 23,
    config: 'slices',
    query: q('weight', 'model.layers.8.mlp.up_proj.weight', { layer: 8, model: 'a', inputTensor: 'model.layers.20.mlp.up_proj.weight' }),
    t: 1,
    expected: 1,
  },
  {
    id: 24,
    config: 'slices',
    query: q('density', 'model.layers.4.mlp.up_proj.weight', { layer: 4, model: 'a', inputTensor: 'model.layers.8.mlp.up_proj.weight' }),
    t: 0,
    expected: 0.25,
  },
  {
    id: 25,
    config: 'slices',
    query: q('density', 'model.layers.5.mlp.up_proj.weight', { layer: 5, model: 'a', inputTensor: 'model.layers.9.mlp.up_proj.weight' }),
    t: 0.333333,
    expected: 0.75,
  },
];

/** Transcribed from golden/GRADIENTS.md §5, "Direct `evaluate_setting` spot checks". */
const SPOT_CHECKS: { setting: ParameterSetting; t: number; expected: number }[] = [
  { setting: [0.0, 0.5, 1.0], t: 0.428571, expected: 0.428571 },
  { setting: [1.0, 2.0], t: 0, expected: 1 },
  { setting: [1.0, 2.0], t: 1, expected: 2 },
  { setting: 0.42, t: 0.9, expected: 0.42 },
  { setting: [7.0], t: 0.5, expected: 7 },
];

for (const row of ROWS) {
  test(`GRADIENTS.md #${row.id}: ${row.query.name}${row.query.model ? ` / ${String(row.query.model)}` : ''} on ${row.query.tensor} = ${row.expected}`, () => {
    const cfg = config(row.config);
    const resolver = new ParameterResolver(cfg);
    close(resolver.position(row.query).t, row.t, 't');
    close(resolver.value(row.query), row.expected, 'value');
    close(resolveParameter(cfg, row.query), row.expected, 'resolveParameter');
  });
}

test('GRADIENTS.md spot checks of evaluate_setting', () => {
  for (const s of SPOT_CHECKS) close(evaluateSetting(s.setting, 'model.layers.0.mlp.up_proj.weight', s.t), s.expected, JSON.stringify(s));
});

test('#8 reproduces the documented arithmetic exactly', () => {
  const t = gradientPosition(10, 32);
  const scaled = t * 4;
  const frac = scaled - 1;
  assert.equal(evaluateSetting([0, 0.5, 0.3, 0.7, 1], 'x', t), (1 - frac) * 0.5 + frac * 0.3);
});

test('gradient position: idx/(n-1), and 1 for a single-layer slice', () => {
  assert.equal(gradientPosition(0, 8), 0);
  assert.equal(gradientPosition(7, 8), 1);
  assert.equal(gradientPosition(0, 1), 1);
  assert.throws(() => gradientPosition(8, 8), RangeError);
  assert.throws(() => gradientPosition(0, 0), RangeError);
});

test('step lists of non-numbers are indexed, not interpolated', () => {
  assert.equal(evaluateSetting([true, false], 'x', 0.4), true);
  assert.equal(evaluateSetting([true, false], 'x', 1), false);
  assert.equal(evaluateSetting(['a', 'b', 'c'], 'x', 0.99), 'b');
  assert.equal(evaluateSetting([1, 'b'], 'x', 0.5), 1);
});

test('filters: absent, null and "*" match everything; an empty tensor name matches only those', () => {
  const s: ParameterSetting = [{ filter: 'mlp', value: 1 }, { filter: '*', value: 2 }];
  assert.equal(evaluateSetting(s, 'model.layers.0.mlp.up_proj.weight', 0), 1);
  assert.equal(evaluateSetting(s, 'model.norm.weight', 0), 2);
  assert.equal(evaluateSetting([{ filter: 'mlp', value: 1 }], '', 0), undefined);
  assert.equal(evaluateSetting({ filter: 'mlp', value: [0, 1] }, 'mlp', 0.5), 0.5);
  assert.equal(evaluateSetting({ filter: 'attn', value: 3 }, 'mlp', 0.5), undefined);
  const cfg = parseMergeConfig('merge_method: slerp\nmodels: [{model: a}]\nparameters: {t: [{filter: ~, value: 0.7}]}\n');
  assert.equal(resolveParameter(cfg, { name: 't', tensor: 'x', t: 0 }), 0.7);
});

test('merge-methods.md §12: TIES worked example on model.layers.10.mlp.up_proj.weight of 32 layers', () => {
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
  const r = new ParameterResolver(cfg);
  const at = { tensor: 'model.layers.10.mlp.up_proj.weight', layer: 10, layerCount: 32 };
  close(r.position(at).t, 10 / 31, 't');
  const e1 = r.modelParameters({ ...at, model: 'org/expert-1' });
  close(e1.density, 1 - 0.645161 * 0.3, 'expert-1 density');
  assert.equal(e1.weight, 1);
  const e2 = r.modelParameters({ ...at, model: 'org/expert-2' });
  assert.equal(e2.density, 0.5);
  close(e2.weight, 0.967742 * 0.3, 'expert-2 weight');
  assert.deepEqual(r.modelParameters({ ...at, model: 'org/expert-3' }), { weight: 0.5, density: 0.33 });
  assert.deepEqual(r.globalParameters(at), { normalize: true, rescale: false, lambda: 1, int8_mask: true });
  // The base model is added as a source without parameters: weight is not required for it.
  assert.deepEqual(r.modelParameters({ ...at, model: 'org/base' }), { density: 1 });
});

test('required parameters: missing weight is an error naming model and tensor; linear requires it for the base too', () => {
  const ties = parseMergeConfig('merge_method: ties\nbase_model: base\nmodels: [{model: a}, {model: b, parameters: {weight: 1}}]\n');
  const r = new ParameterResolver(ties);
  assert.throws(
    () => r.resolve({ name: 'weight', tensor: 'model.layers.0.mlp.up_proj.weight', layer: 0, layerCount: 2, model: 'a' }),
    (e: Error & { code?: string }) => e.code === 'E_CONFIG' && /weight/.test(e.message) && /model a/.test(e.message) && /model\.layers\.0\.mlp/.test(e.message),
  );
  assert.equal(r.resolve({ name: 'weight', tensor: 'x', layer: 0, layerCount: 2, model: 'base' }), undefined);
  const linear = parseMergeConfig('merge_method: linear\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}]\n');
  assert.throws(() => resolveParameter(linear, { name: 'weight', tensor: 'x', layer: 0, layerCount: 2, model: 'base' }), /missing required parameter `weight`/);
  const slerp = parseMergeConfig('merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n');
  assert.throws(() => resolveParameter(slerp, { name: 't', tensor: 'lm_head.weight', position: 'post' }), /missing required parameter `t`/);
});

test('modules: module parameters sit between slice and global parameters', () => {
  const cfg = parseMergeConfig(`
merge_method: linear
parameters: {weight: 0.1, normalize: false}
modules:
  text_decoder:
    slices:
      - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]
        parameters: {weight: [{filter: mlp, value: 0.7}]}
    parameters: {weight: 0.4}
  vision_tower:
    models: [{model: a}, {model: b, parameters: {weight: 0.9}}]
`);
  const r = new ParameterResolver(cfg);
  assert.equal(r.value({ module: 'text_decoder', name: 'weight', tensor: 'x.mlp.y', layer: 0, model: 'a' }), 0.7);
  assert.equal(r.value({ module: 'text_decoder', name: 'weight', tensor: 'x.attn.y', layer: 0, model: 'a' }), 0.4);
  assert.equal(r.value({ module: 'vision_tower', name: 'weight', tensor: 'v', layer: 0, layerCount: 3, model: 'a' }), 0.1);
  assert.equal(r.value({ module: 'vision_tower', name: 'weight', tensor: 'v', layer: 0, layerCount: 3, model: 'b' }), 0.9);
  assert.equal(r.resolve({ module: 'vision_tower', name: 'normalize', tensor: 'v', position: 'pre' }), false);
  assert.throws(() => r.value({ name: 'weight', tensor: 'v', t: 0 }), /name the module/);
});

test('a source index picks one source when a slice uses the same model twice', () => {
  const cfg = parseMergeConfig(`
merge_method: linear
slices:
  - sources:
      - {model: a, layer_range: [0, 2], parameters: {weight: 0.25}}
      - {model: a, layer_range: [2, 4], parameters: {weight: 0.75}}
`);
  const r = new ParameterResolver(cfg);
  assert.equal(r.value({ name: 'weight', tensor: 'x', layer: 1, source: 1 }), 0.75);
  assert.equal(r.value({ name: 'weight', tensor: 'x', layer: 1, model: 'a' }), 0.25);
  assert.throws(() => r.value({ name: 'weight', tensor: 'x', layer: 2 }), /past the end/);
});

// Keeps the transcription above honest when the golden folder is available.
function goldenFile(t: TestContext): string | undefined {
  const file = join(GOLDEN, 'GRADIENTS.md');
  if (existsSync(file)) return readFileSync(file, 'utf8');
  const msg = `golden data missing: ${file} (set AMALGAM_GOLDEN to the shared golden folder)`;
  if (process.env.CI === 'true') throw new Error(msg);
  t.skip(msg);
  return undefined;
}

const num = (cell: string) => Number(cell.replace(/\*/g, '').trim());

test('the transcribed table matches golden/GRADIENTS.md', (t) => {
  const md = goldenFile(t);
  if (md === undefined) return;
  const rows = md
    .split('\n')
    .filter((l) => /^\|\s*\d+\s*\|/.test(l))
    .map((l) => l.split('|').map((c) => c.trim()));
  assert.equal(rows.length, ROWS.length, 'number of worked examples');
  for (const cells of rows) {
    // | # | spec | param / model | tensor | output layer | layers in slice | t | resolved | why |
    const id = Number(cells[1]);
    const row = ROWS.find((r) => r.id === id);
    assert.ok(row, `row #${id} is transcribed`);
    const [param, model] = cells[3].split('/').map((s) => s.trim());
    assert.equal(row.query.name, param, `#${id} parameter`);
    assert.equal(row.query.model, model, `#${id} model`);
    assert.ok(cells[4].includes(row.query.tensor), `#${id} tensor ${cells[4]}`);
    assert.equal(row.t, num(cells[7]), `#${id} t`);
    assert.equal(row.expected, num(cells[8]), `#${id} resolved`);
  }
  const spots = md
    .split('\n')
    .filter((l) => /^\|\s*`[^`]+`\s*\|\s*[\d.]+\s*\|\s*[\d.]+\s*\|$/.test(l))
    .map((l) => l.split('|').map((c) => c.trim()));
  assert.equal(spots.length, SPOT_CHECKS.length, 'number of spot checks');
  spots.forEach((cells, i) => {
    assert.deepEqual(JSON.parse(cells[1].replace(/`/g, '')), SPOT_CHECKS[i].setting);
    assert.equal(num(cells[2]), SPOT_CHECKS[i].t);
    assert.equal(num(cells[3]), SPOT_CHECKS[i].expected);
  });
});
