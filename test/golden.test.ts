/**
 * Golden cases (shared/golden): every merge method against mergekit's own outputs. Exact cases
 * compare element by element with the case's tolerance; given-mask cases inject mergekit's
 * Bernoulli draws and check DELLA's probabilities; statistical cases run the random methods on a
 * generated 1000×1000 tensor with a seeded RNG and evaluate the case's checks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { TestContext } from 'node:test';
import { AmalgamError } from '../src/errors.js';
import { SafetensorsFile } from '../src/io/safetensors.js';
import { getMergeMethod, mergeTensor, prepareParams, type MaskSource, type MergeInput } from '../src/merge/registry.js';
import { givenMaskSource, magnitudeMask, magnitudeOutliersMask, applyMask, tensorRng } from '../src/merge/sparsify.js';
import { magnitudeRanks } from '../src/merge/tensor-ops.js';
import { REPO_ROOT } from './helpers/fixtures.js';

const GOLDEN_DIR = resolve(process.env.AMALGAM_GOLDEN ?? join(REPO_ROOT, '..', 'shared', 'golden'));
const CASES_FILE = join(GOLDEN_DIR, 'cases.json');
const TENSORS_FILE = join(GOLDEN_DIR, 'tensors.safetensors');

interface Check {
  name: string;
  definition: string;
  expected?: number;
  abs_tol?: number;
  rel_tol?: number;
  max?: number;
}

interface GeneratorInput {
  kind: 'zeros' | 'hash';
  A?: number;
  C?: number;
  abs?: boolean;
  mul?: number;
  add?: number;
}

interface GoldenCase {
  id: string;
  kind: 'exact' | 'given_mask' | 'statistical';
  method: string;
  params: Record<string, unknown>;
  per_model: Record<string, Record<string, unknown>>;
  base: string | null;
  inputs: string[];
  input_keys?: Record<string, string>;
  input_shapes?: Record<string, number[]>;
  expected: string | null;
  expected_shape?: number[];
  weight_name: string | null;
  is_embed: boolean;
  tolerance?: { rtol: number; atol: number };
  notes?: string;
  mergekit_defect?: string;
  expected_corrected?: string;
  expected_error?: boolean;
  masks?: Record<string, string>;
  probs?: Record<string, string>;
  rng?: { draw_order?: string[] };
  generator?: { numel: number; shape: number[]; inputs: Record<string, GeneratorInput> };
  checks?: Check[];
}

function haveGolden(t: TestContext): boolean {
  const missing = [CASES_FILE, TENSORS_FILE].filter((p) => !existsSync(p));
  if (missing.length === 0) return true;
  const msg = `golden data missing: ${missing.join(', ')} (set AMALGAM_GOLDEN to the shared golden folder)`;
  if (process.env.CI === 'true') throw new Error(msg);
  t.skip(msg);
  return false;
}

const cases: GoldenCase[] = existsSync(CASES_FILE) ? (JSON.parse(readFileSync(CASES_FILE, 'utf8')) as GoldenCase[]) : [];

let tensorsPromise: Promise<SafetensorsFile> | undefined;
function tensors(): Promise<SafetensorsFile> {
  tensorsPromise ??= SafetensorsFile.open(TENSORS_FILE);
  return tensorsPromise;
}

/** Compares with the case's rule; returns the worst |got − expected| / (atol + rtol·|expected|). */
function assertClose(got: Float32Array, expected: Float32Array, tol: { rtol: number; atol: number }, what: string): number {
  assert.equal(got.length, expected.length, `${what}: length`);
  let worst = 0;
  for (let i = 0; i < got.length; i++) {
    const g = got[i];
    const e = expected[i];
    if (Number.isNaN(e)) {
      assert.ok(Number.isNaN(g), `${what}[${i}]: expected NaN, got ${g}`);
      continue;
    }
    if (!Number.isFinite(e)) {
      assert.equal(g, e, `${what}[${i}]: expected ${e}, got ${g}`);
      continue;
    }
    const bound = tol.atol + tol.rtol * Math.abs(e);
    const err = Math.abs(g - e);
    assert.ok(err <= bound, `${what}[${i}]: got ${g}, expected ${e} (|diff| ${err} > ${bound})`);
    worst = Math.max(worst, err / bound);
  }
  return worst;
}

async function loadInputs(c: GoldenCase): Promise<MergeInput[]> {
  const st = await tensors();
  return Promise.all(
    c.inputs.map(async (model) => ({
      model,
      data: await st.readF32(c.input_keys![model]),
      shape: c.input_shapes![model],
    })),
  );
}

/** Wraps a mask source and records the probabilities it was asked for. */
function recording(inner: MaskSource, seen: Map<string, number | Float32Array>): MaskSource {
  return {
    draw(req) {
      seen.set(req.model, req.probability);
      return inner.draw(req);
    },
  };
}

async function runSparsifyCase(c: GoldenCase, x: Float32Array): Promise<Float32Array> {
  const density = c.params.density as number;
  const rescale = c.params.rescale_norm === 'l1';
  if (c.params.rescale_norm !== null && c.params.rescale_norm !== undefined && !rescale) {
    throw new Error(`unsupported rescale_norm ${String(c.params.rescale_norm)}`);
  }
  const mask =
    c.method === 'sparsify.magnitude'
      ? magnitudeMask(x, density)
      : c.method === 'sparsify.magnitude_outliers'
        ? magnitudeOutliersMask(x, density, c.params.gamma as number)
        : undefined;
  if (mask === undefined) throw new Error(`unknown sparsify case ${c.method}`);
  return mask === null ? x : applyMask(x, mask, rescale);
}

// ---------------------------------------------------------------------------------------------
// Statistical cases

function generate(spec: GeneratorInput, count: number): Float32Array {
  const out = new Float32Array(count);
  if (spec.kind === 'zeros') return out;
  const A = spec.A!;
  const C = spec.C!;
  const mul = spec.mul ?? 1;
  const add = spec.add ?? 0;
  for (let i = 0; i < count; i++) {
    const h = (i * A + C) % 4294967296;
    const u = Math.fround((h + 0.5) / 4294967296 - 0.5);
    out[i] = Math.fround(mul * (spec.abs ? Math.abs(u) : u) + add);
  }
  return out;
}

function spread(values: number[]): number {
  let min = Infinity;
  let max = -Infinity;
  let sum = 0;
  for (const v of values) {
    min = Math.min(min, v);
    max = Math.max(max, v);
    sum += v;
  }
  return (max - min) / (sum / values.length);
}

function statistic(name: string, c: GoldenCase, out: Float32Array, inputs: Map<string, Float32Array>, shape: number[]): number {
  const base = inputs.get(c.base!)!;
  const models = c.inputs.filter((m) => m !== c.base);
  const xa = inputs.get(models[0])!;
  const n = out.length;
  const delta = (i: number) => out[i] - base[i];
  const taskA = (i: number) => xa[i] - base[i];
  const param = (p: string, model = models[0]) => (c.per_model[model]?.[p] ?? c.params[p]) as number | undefined;
  switch (name) {
    case 'kept_fraction': {
      let k = 0;
      for (let i = 0; i < n; i++) if (delta(i) !== 0) k++;
      return k / n;
    }
    case 'l1_ratio': {
      let num = 0;
      let den = 0;
      for (let i = 0; i < n; i++) {
        num += Math.abs(delta(i));
        den += Math.abs(taskA(i));
      }
      const method = getMergeMethod(c.method);
      const normalize = (c.params.normalize ?? method.globalParams.normalize?.default) as boolean;
      const m = normalize ? 1 : param('weight')!;
      return num / (m * den);
    }
    case 'scale_spread':
    case 'scale_vs_inv_density': {
      const ratios: number[] = [];
      for (let i = 0; i < n; i++) if (delta(i) !== 0) ratios.push(delta(i) / taskA(i));
      if (name === 'scale_spread') return spread(ratios);
      return (ratios.reduce((a, b) => a + b, 0) / ratios.length) * param('density')!;
    }
    case 'kept_value_error': {
      const w = param('weight')!;
      let worst = 0;
      for (let i = 0; i < n; i++) if (delta(i) !== 0) worst = Math.max(worst, Math.abs(delta(i) - w * taskA(i)));
      return worst;
    }
    case 'frac_positive':
    case 'frac_negative':
    case 'frac_zero': {
      let k = 0;
      for (let i = 0; i < n; i++) {
        const v = out[i];
        if (name === 'frac_positive' ? v > 0 : name === 'frac_negative' ? v < 0 : v === 0) k++;
      }
      return k / n;
    }
    case 'positive_scale_spread': {
      const ratios: number[] = [];
      for (let i = 0; i < n; i++) if (out[i] > 0) ratios.push(out[i] / xa[i]);
      return spread(ratios);
    }
    case 'kept_fraction_bottom_decile':
    case 'kept_fraction_top_decile': {
      const cols = shape[shape.length - 1];
      const rows = n / cols;
      const decile = Math.floor(cols / 10);
      const task = new Float32Array(n);
      for (let i = 0; i < n; i++) task[i] = taskA(i);
      const ranks = new Uint32Array(cols);
      let kept = 0;
      let total = 0;
      for (let r = 0; r < rows; r++) {
        magnitudeRanks(task, r * cols, 1, cols, ranks);
        for (let j = 0; j < cols; j++) {
          const inBand = name === 'kept_fraction_bottom_decile' ? ranks[j] < decile : ranks[j] >= cols - decile;
          if (!inBand) continue;
          total++;
          if (delta(r * cols + j) !== 0) kept++;
        }
      }
      return kept / total;
    }
    default:
      throw new Error(`case ${c.id}: no implementation for check '${name}'`);
  }
}

function evaluateCheck(check: Check, value: number, caseId: string): void {
  const what = `${caseId}: ${check.name} = ${value}`;
  if (check.max !== undefined) assert.ok(value <= check.max, `${what} exceeds ${check.max} (${check.definition})`);
  if (check.expected !== undefined) {
    if (check.abs_tol !== undefined) {
      assert.ok(Math.abs(value - check.expected) <= check.abs_tol, `${what}, expected ${check.expected} ± ${check.abs_tol} (${check.definition})`);
    } else if (check.rel_tol !== undefined) {
      assert.ok(
        Math.abs(value - check.expected) <= check.rel_tol * Math.abs(check.expected),
        `${what}, expected ${check.expected} within ${check.rel_tol} relative (${check.definition})`,
      );
    } else {
      throw new Error(`${caseId}: check ${check.name} has neither abs_tol nor rel_tol`);
    }
  }
}

// ---------------------------------------------------------------------------------------------

function raw(c: GoldenCase) {
  return { global: c.params, perModel: c.per_model };
}

if (cases.length === 0) {
  test('golden cases', (t) => {
    haveGolden(t);
  });
}

test('golden set has 49 cases', (t) => {
  if (!haveGolden(t)) return;
  assert.equal(cases.length, 49);
});

for (const c of cases) {
  test(`golden ${c.kind} ${c.id} (${c.method})`, async (t) => {
    if (!haveGolden(t)) return;
    const tensorName = c.weight_name ?? c.id;

    if (c.kind === 'statistical') {
      const g = c.generator!;
      const data = new Map<string, Float32Array>();
      for (const m of c.inputs) data.set(m, generate(g.inputs[m], g.numel));
      const method = getMergeMethod(c.method);
      const vctx = { tensorName, models: c.inputs, base: c.base };
      const out = mergeTensor(method, {
        tensorName,
        isEmbed: c.is_embed,
        inputs: c.inputs.map((m) => ({ model: m, data: data.get(m)!, shape: g.shape })),
        base: c.base,
        params: prepareParams(method, vctx, raw(c)),
        rng: tensorRng(20240501, c.id),
      });
      assert.ok(out);
      const results: string[] = [];
      for (const check of c.checks!) {
        const value = statistic(check.name, c, out.data, data, g.shape);
        results.push(`${check.name}=${value.toPrecision(6)}`);
        evaluateCheck(check, value, c.id);
      }
      t.diagnostic(results.join(' '));
      return;
    }

    const st = await tensors();
    const inputs = await loadInputs(c);
    const tol = c.tolerance!;

    if (c.method.startsWith('sparsify.')) {
      const got = await runSparsifyCase(c, inputs[0].data);
      const worst = assertClose(got, await st.readF32(c.expected!), tol, c.id);
      t.diagnostic(`worst error / tolerance: ${worst.toExponential(3)}`);
      return;
    }

    const method = getMergeMethod(c.method);
    const vctx = { tensorName, models: c.inputs, base: c.base };

    if (c.expected_error) {
      // mergekit's output is a defect; the merge must be refused, naming the tensor, both when
      // validating the configuration and when merging.
      assert.throws(
        () => prepareParams(method, vctx, raw(c)),
        (e: unknown) => e instanceof AmalgamError && e.message.includes(tensorName),
      );
      const params = { global: { normalize: true }, perModel: c.per_model as Record<string, Record<string, number>> };
      assert.throws(
        () => mergeTensor(method, { tensorName, isEmbed: c.is_embed, inputs, base: c.base, params }),
        (e: unknown) => e instanceof AmalgamError && e.message.includes(tensorName),
      );
      return;
    }

    const params = prepareParams(method, vctx, raw(c));
    let masks: MaskSource | undefined;
    const seenProbs = new Map<string, number | Float32Array>();
    if (c.kind === 'given_mask') {
      const stored: Record<string, Float32Array> = {};
      for (const [m, key] of Object.entries(c.masks!)) stored[m] = await st.readF32(key);
      masks = recording(givenMaskSource(stored), seenProbs);
    }
    const out = mergeTensor(method, { tensorName, isEmbed: c.is_embed, inputs, base: c.base, params, masks });
    assert.ok(out, 'merge returned no tensor');
    assert.deepEqual(out.shape, c.expected_shape);
    const expectedKey = c.mergekit_defect && c.expected_corrected ? c.expected_corrected : c.expected!;
    const worst = assertClose(out.data, await st.readF32(expectedKey), tol, c.id);
    const notes: string[] = [`worst error / tolerance: ${worst.toExponential(3)}`];

    if (c.kind === 'given_mask') {
      const order = c.rng?.draw_order ?? Object.keys(c.masks!);
      assert.deepEqual([...seenProbs.keys()], order, 'one mask draw per non-base model, in draw order');
      if (c.probs) {
        for (const [m, key] of Object.entries(c.probs)) {
          const p = seenProbs.get(m);
          assert.ok(p instanceof Float32Array, `${c.id}: DELLA probabilities for ${m}`);
          const w = assertClose(p, await st.readF32(key), { rtol: 1e-6, atol: 1e-6 }, `${c.id} probs ${m}`);
          notes.push(`probs ${m}: ${w.toExponential(3)}`);
        }
      }
    }
    t.diagnostic(notes.join('; '));
  });
}
