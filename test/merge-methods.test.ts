/**
 * Merge methods: properties and edge cases beyond the golden set — endpoints, equivalences
 * between methods, validation errors that name the tensor, corrected mergekit defects, seeded
 * determinism of the random sparsifiers, and the selection helpers.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { AmalgamError } from '../src/errors.js';
import { Rng } from '../src/tensor/rng.js';
import {
  MERGE_METHODS,
  getMergeMethod,
  mergeMethodNames,
  mergeTensor,
  prepareParams,
  resolveParams,
  validateMerge,
  type MergeInput,
  type MergeOutput,
} from '../src/merge/registry.js';
import {
  applyMask,
  dellaProbabilities,
  givenMaskSource,
  magnitudeOutliersMask,
  rngMaskSource,
  sparsify,
  tensorRng,
} from '../src/merge/sparsify.js';
import { descendingRangeMask, magnitudeKeys, magnitudeRanks, orderStatistics, selectKth, selectKths, sortableKeys, topKMask } from '../src/merge/tensor-ops.js';
import { combineTaskVectors } from '../src/merge/gta.js';

const T = 'model.layers.3.mlp.down_proj.weight';

function randn(seed: number, n: number, std = 1): Float32Array {
  return new Rng(seed).fillNormal(new Float32Array(n), std);
}

function input(model: string, data: Float32Array | number[], shape: number[] = [data.length]): MergeInput {
  return { model, data: data instanceof Float32Array ? data : Float32Array.from(data), shape };
}

interface RunOptions {
  base?: string | null;
  global?: Record<string, unknown>;
  perModel?: Record<string, Record<string, unknown>>;
  isEmbed?: boolean;
  isOptional?: boolean;
  seed?: number;
  warn?: (m: string) => void;
  tensorName?: string;
}

function run(method: string, inputs: MergeInput[], o: RunOptions = {}): MergeOutput | null {
  const tensorName = o.tensorName ?? T;
  const base = o.base ?? null;
  const vctx = { tensorName, models: inputs.map((t) => t.model), base };
  const params = prepareParams(method, vctx, { global: o.global, perModel: o.perModel });
  return mergeTensor(method, {
    tensorName,
    isEmbed: o.isEmbed ?? false,
    isOptional: o.isOptional,
    inputs,
    base,
    params,
    rng: o.seed !== undefined ? tensorRng(o.seed, tensorName) : undefined,
    warn: o.warn,
  });
}

function runOut(method: string, inputs: MergeInput[], o: RunOptions = {}): Float32Array {
  const out = run(method, inputs, o);
  assert.ok(out, `${method} returned no tensor`);
  return out.data;
}

function close(a: ArrayLike<number>, b: ArrayLike<number>, tol = 1e-6, what = ''): void {
  assert.equal(a.length, b.length, `${what} length`);
  for (let i = 0; i < a.length; i++) {
    assert.ok(Math.abs(a[i] - b[i]) <= tol * (1 + Math.abs(b[i])), `${what}[${i}]: ${a[i]} vs ${b[i]}`);
  }
}

/** Asserts an AmalgamError whose message names the tensor (and contains `fragment`). */
function throwsNaming(fn: () => unknown, fragment: string | RegExp, tensorName = T): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof AmalgamError, `expected AmalgamError, got ${String(e)}`);
    assert.ok(e.message.includes(tensorName), `message does not name the tensor: ${e.message}`);
    if (typeof fragment === 'string') assert.ok(e.message.includes(fragment), `message lacks '${fragment}': ${e.message}`);
    else assert.match(e.message, fragment);
    return true;
  });
}

// ---------------------------------------------------------------------------------------------
// Registry and parameters

test('registry holds every method once, with sound declarations', () => {
  const names = mergeMethodNames();
  assert.equal(new Set(names).size, names.length);
  for (const n of [
    'linear', 'slerp', 'nuslerp', 'multislerp', 'karcher', 'task_arithmetic', 'ties', 'dare_linear', 'dare_ties',
    'breadcrumbs', 'breadcrumbs_ties', 'della', 'della_linear', 'sce', 'model_stock', 'nearswap', 'arcee_fusion', 'passthrough',
    'ram', 'ramplus_tl',
  ]) {
    assert.ok(names.includes(n), n);
  }
  for (const m of MERGE_METHODS) {
    for (const spec of [...Object.values(m.globalParams), ...Object.values(m.perModelParams)]) {
      if (spec.default !== undefined) assert.equal(typeof spec.default, spec.type === 'boolean' ? 'boolean' : 'number');
      assert.ok(!(spec.required && spec.default !== undefined));
    }
  }
  assert.deepEqual(
    MERGE_METHODS.filter((m) => m.randomized).map((m) => m.name).sort(),
    ['dare_linear', 'dare_ties', 'della', 'della_linear'],
  );
  assert.throws(() => getMergeMethod('consensus_ties'), (e: unknown) => e instanceof AmalgamError && /one of: linear/.test(e.message));
});

test('parameter resolution: per-model value, then global value, then default', () => {
  const ties = getMergeMethod('ties');
  const p = resolveParams(ties, T, ['a', 'b', 'base'], 'base', {
    global: { density: 0.4, lambda: 2 },
    perModel: { a: { weight: 1, density: 0.9 }, b: { weight: 0.5 } },
  });
  assert.equal(p.global.normalize, true);
  assert.equal(p.global.rescale, false);
  assert.equal(p.global.lambda, 2);
  assert.deepEqual(p.perModel.a, { weight: 1, density: 0.9 });
  assert.deepEqual(p.perModel.b, { weight: 0.5, density: 0.4 });
  assert.equal(p.perModel.base, undefined, 'the base model takes no per-model parameters');
  const lin = resolveParams(getMergeMethod('linear'), T, ['a', 'base'], 'base', { perModel: { a: { weight: 1 }, base: { weight: 2 } } });
  assert.deepEqual(lin.perModel.base, { weight: 2 }, 'linear weights the base like any input');
});

test('parameter errors name the tensor', () => {
  throwsNaming(() => prepareParams('ties', { tensorName: T, models: ['a', 'base'], base: 'base' }, { perModel: { a: {} } }), "'weight' for model a");
  throwsNaming(() => prepareParams('slerp', { tensorName: T, models: ['a', 'base'], base: 'base' }, {}), "'t'");
  throwsNaming(
    () => prepareParams('ties', { tensorName: T, models: ['a', 'base'], base: 'base' }, { perModel: { a: { weight: 'x' } } }),
    'finite number',
  );
  throwsNaming(
    () => prepareParams('ties', { tensorName: T, models: ['a', 'base'], base: 'base' }, { global: { normalize: 1 }, perModel: { a: { weight: 1 } } }),
    'true or false',
  );
  throwsNaming(
    () => prepareParams('karcher', { tensorName: T, models: ['a', 'b'], base: null }, { global: { max_iter: 2.5 } }),
    'integer',
  );
  throwsNaming(
    () => prepareParams('ties', { tensorName: T, models: ['a', 'base'], base: 'base' }, { perModel: { a: { weight: 1, density: 1.5 } } }),
    'density must be in [0, 1]',
  );
  throwsNaming(
    () => prepareParams('breadcrumbs', { tensorName: T, models: ['a', 'base'], base: 'base' }, { perModel: { a: { weight: 1, density: 0.5, gamma: -0.1 } } }),
    'gamma',
  );
  throwsNaming(() => prepareParams('ties', { tensorName: T, models: ['a', 'b'], base: null }, { perModel: { a: { weight: 1 }, b: { weight: 1 } } }), 'base model');
});

test('della: epsilon must keep density ± epsilon inside (0, 1)', () => {
  const vctx = { tensorName: T, models: ['a', 'base'], base: 'base' };
  throwsNaming(() => prepareParams('della', vctx, { perModel: { a: { weight: 1, density: 0.9, epsilon: 0.1 } } }), 'epsilon');
  throwsNaming(() => prepareParams('della_linear', vctx, { perModel: { a: { weight: 1, density: 0.1, epsilon: 0.1 } } }), 'epsilon');
  prepareParams('della', vctx, { perModel: { a: { weight: 1, density: 0.5, epsilon: 0.2 } } });
  prepareParams('della', vctx, { perModel: { a: { weight: 1, density: 1, epsilon: 0.5 } } });
});

// ---------------------------------------------------------------------------------------------
// linear

test('linear: normalize false is the plain weighted sum; normalize true divides by Σw', () => {
  const a = randn(1, 30);
  const b = randn(2, 30);
  const raw = runOut('linear', [input('a', a), input('b', b)], { global: { normalize: false }, perModel: { a: { weight: 0.6 }, b: { weight: 0.25 } } });
  const norm = runOut('linear', [input('a', a), input('b', b)], { perModel: { a: { weight: 0.6 }, b: { weight: 0.25 } } });
  for (let i = 0; i < 30; i++) {
    assert.equal(raw[i], Math.fround(0.6 * a[i] + 0.25 * b[i]));
    assert.equal(norm[i], Math.fround((0.6 * a[i] + 0.25 * b[i]) / 0.85));
  }
});

test('linear: a model merged with itself is bit-identical', () => {
  const a = randn(3, 64);
  const out = runOut('linear', [input('a', a), input('b', a.slice())], { perModel: { a: { weight: 0.3 }, b: { weight: 0.7 } } });
  assert.deepEqual(out, a);
});

test('linear: weights summing to zero are refused naming the tensor', () => {
  const inputs = [input('a', [1, 2]), input('b', [3, 4])];
  throwsNaming(() => run('linear', inputs, { perModel: { a: { weight: 1 }, b: { weight: -1 } } }), 'sum to 0');
  const out = runOut('linear', inputs, { global: { normalize: false }, perModel: { a: { weight: 1 }, b: { weight: -1 } } });
  assert.deepEqual([...out], [-2, -2]);
});

test('linear: embeddings are cut to the common submatrix; other shape mismatches are errors', () => {
  const a = input('a', randn(4, 12), [4, 3]);
  const b = input('b', randn(5, 10), [5, 2]);
  const warnings: string[] = [];
  const out = run('linear', [a, b], { isEmbed: true, perModel: { a: { weight: 1 }, b: { weight: 1 } }, warn: (m) => warnings.push(m) });
  assert.ok(out);
  assert.deepEqual(out.shape, [4, 2]);
  assert.equal(out.data[2 * 2 + 1], Math.fround((a.data[2 * 3 + 1] + b.data[2 * 2 + 1]) / 2));
  assert.equal(warnings.length, 1);
  throwsNaming(() => run('linear', [a, b], { perModel: { a: { weight: 1 }, b: { weight: 1 } } }), 'different shapes');
});

// ---------------------------------------------------------------------------------------------
// slerp family

test('slerp: t = 0 and t = 1 return the endpoints; the base is v0 wherever it is listed', () => {
  const base = randn(5, 40);
  const other = randn(6, 40);
  for (const order of [['base', 'x'], ['x', 'base']]) {
    const inputs = order.map((m) => input(m, m === 'base' ? base : other));
    assert.deepEqual(runOut('slerp', inputs, { base: 'base', global: { t: 0 } }), base);
    assert.deepEqual(runOut('slerp', inputs, { base: 'base', global: { t: 1 } }), other);
  }
});

test('slerp: midpoint of orthogonal unit vectors lies on the sphere', () => {
  const out = runOut('slerp', [input('base', [1, 0]), input('x', [0, 1])], { base: 'base', global: { t: 0.5 } });
  close(out, [Math.SQRT1_2, Math.SQRT1_2]);
});

test('slerp: needs a base and exactly two models', () => {
  throwsNaming(() => run('slerp', [input('a', [1]), input('b', [2])], { global: { t: 0.5 } }), 'base model');
  throwsNaming(
    () => run('slerp', [input('a', [1]), input('b', [2]), input('base', [3])], { base: 'base', global: { t: 0.5 } }),
    'exactly two models',
  );
  assert.deepEqual([...runOut('slerp', [input('a', [7, 8])], { base: 'base', global: { t: 0.5 } })], [7, 8], 'a tensor only one model has is copied');
});

test('nuslerp: equal weights of opposite sign fall back to t = 0.5; base must not be one of the two', () => {
  const a = randn(7, 16);
  const b = randn(8, 16);
  const half = runOut('nuslerp', [input('a', a), input('b', b)], { perModel: { a: { weight: 1 }, b: { weight: 1 } } });
  const zero = runOut('nuslerp', [input('a', a), input('b', b)], { perModel: { a: { weight: 1 }, b: { weight: -1 } } });
  assert.deepEqual(zero, half);
  throwsNaming(
    () => run('nuslerp', [input('a', a), input('base', b)], { base: 'base', perModel: { a: { weight: 1 } } }),
    'exactly two models',
  );
});

test('nuslerp: per-row interpolation treats each row independently', () => {
  const a = randn(9, 24);
  const b = randn(10, 24);
  const full = runOut('nuslerp', [input('a', a, [4, 6]), input('b', b, [4, 6])], {
    global: { nuslerp_flatten: false },
    perModel: { a: { weight: 1 }, b: { weight: 2 } },
  });
  const row2 = runOut('nuslerp', [input('a', a.slice(12, 18)), input('b', b.slice(12, 18))], { perModel: { a: { weight: 1 }, b: { weight: 2 } } });
  assert.deepEqual(full.slice(12, 18), row2);
});

test('multislerp: two antipodal inputs with equal weights lerp; three balanced inputs are an error', () => {
  const v = [1, 2, 3];
  const w = [-1, -2, -3];
  const out = runOut('multislerp', [input('a', v), input('b', w)], { perModel: { a: { weight: 1 }, b: { weight: 1 } } });
  close(out, [0, 0, 0]);
  throwsNaming(
    () =>
      run('multislerp', [input('a', [1, 0]), input('b', [-1, 0]), input('c', [0, 0])], {
        perModel: { a: { weight: 1 }, b: { weight: 1 }, c: { weight: 1 } },
      }),
    'zero',
  );
});

test('multislerp equals the formula with whole task vectors held, bit for bit, over several blocks', () => {
  // The method recomputes the task vectors block by block to bound its memory; this is the
  // plain form: x_k = fround(input − base), norms, weighted mean direction, tangent, result.
  const reference = (xsIn: Float32Array[], base: Float32Array | undefined, weights: number[], eps: number): Float32Array => {
    const xs = xsIn.map((t) => (base ? t.map((v, i) => v - base[i]!) : t));
    const n = xs[0]!.length;
    const norm = (a: ArrayLike<number>) => {
      let s = 0;
      for (let i = 0; i < a.length; i++) s += a[i]! * a[i]!;
      return Math.sqrt(s);
    };
    const norms = xs.map(norm);
    const inv = norms.map((v) => 1 / (v + eps));
    const mean = new Float64Array(n);
    xs.forEach((x, k) => x.forEach((v, i) => (mean[i] += weights[k]! * inv[k]! * v)));
    const mn = norm(mean);
    for (let i = 0; i < n; i++) mean[i] /= mn;
    const tangent = new Float64Array(n);
    xs.forEach((x, k) => {
      let d = 0;
      for (let i = 0; i < n; i++) d += x[i]! * mean[i]!;
      d *= inv[k]!;
      for (let i = 0; i < n; i++) tangent[i] += weights[k]! * inv[k]! * x[i]! - weights[k]! * d * mean[i]!;
    });
    const rho = norm(tangent) + eps;
    const scale = norms.reduce((s, v, k) => s + v * weights[k]!, 0);
    return Float32Array.from({ length: n }, (_, i) => {
      const v = (mean[i]! * Math.cos(rho) + tangent[i]! * (Math.sin(rho) / rho)) * scale;
      return base ? base[i]! + v : v;
    });
  };
  const n = 10007;
  const base = randn(90, n, 0.05);
  const models = [91, 92, 93].map((seed) => base.map((b, i) => b + randn(seed, n, 0.01)[i]!));
  const weights = [1, 0.8, 0.6];
  const sum = weights.reduce((a, b) => a + b, 0);
  const perModel = { a: { weight: 1 }, b: { weight: 0.8 }, c: { weight: 0.6 } };
  const inputs = [input('a', models[0]!), input('b', models[1]!), input('c', models[2]!)];
  const withBase = runOut('multislerp', [input('base', base), ...inputs], { base: 'base', perModel });
  const want = reference(models, base, weights.map((w) => w / sum), 1e-8);
  assert.deepEqual(new Uint32Array(withBase.buffer), new Uint32Array(want.buffer));
  const plain = runOut('multislerp', inputs, { perModel });
  assert.deepEqual(new Uint32Array(plain.buffer), new Uint32Array(reference(models, undefined, weights.map((w) => w / sum), 1e-8).buffer));
  assert.ok(!plain.every((v, i) => v === withBase[i]));
});

test('multislerp and karcher of identical inputs return the input', () => {
  const a = randn(11, 20);
  close(runOut('multislerp', [input('a', a), input('b', a.slice()), input('c', a.slice())], {
    perModel: { a: { weight: 1 }, b: { weight: 2 }, c: { weight: 3 } },
  }), a, 1e-6);
  close(runOut('karcher', [input('a', a), input('b', a.slice())]), a, 1e-6);
});

test('karcher: zero inputs give zeros; antipodal inputs are skipped with a warning', () => {
  assert.deepEqual([...runOut('karcher', [input('a', [0, 0]), input('b', [0, 0])])], [0, 0]);
  const warnings: string[] = [];
  const out = runOut('karcher', [input('a', [1, 0]), input('b', [-1, 0]), input('c', [0, 1])], { warn: (m) => warnings.push(m) });
  assert.ok(out.every(Number.isFinite));
  // A fixed-point on the sphere scaled by the mean norm (1).
  close([Math.hypot(out[0], out[1])], [1], 1e-5);
});

// ---------------------------------------------------------------------------------------------
// Task arithmetic family

function gtaInputs(seed: number, n = 60, models = 2): MergeInput[] {
  const base = randn(seed, n);
  const out: MergeInput[] = [];
  for (let k = 0; k < models; k++) {
    const x = randn(seed + 100 + k, n, 0.1);
    for (let i = 0; i < n; i++) x[i] += base[i];
    out.push(input(`m${k}`, x, [6, n / 6]));
  }
  out.push(input('base', base, [6, n / 6]));
  return out;
}

test('task arithmetic family: density 1 disables sparsification', () => {
  const inputs = gtaInputs(20);
  const perModel = { m0: { weight: 0.7, density: 1 }, m1: { weight: 0.4, density: 1 } };
  const ta = runOut('task_arithmetic', inputs, { base: 'base', perModel });
  for (const m of ['dare_linear', 'breadcrumbs', 'della_linear']) {
    assert.deepEqual(runOut(m, inputs, { base: 'base', perModel, seed: 1 }), ta, m);
  }
  const ties = runOut('ties', inputs, { base: 'base', perModel, global: { normalize: false } });
  assert.deepEqual(runOut('dare_ties', inputs, { base: 'base', perModel, seed: 1 }), ties);
  assert.deepEqual(runOut('breadcrumbs_ties', inputs, { base: 'base', perModel }), ties);
});

test('ties: all-zero task vectors return the base', () => {
  const base = randn(21, 24);
  const inputs = [input('a', base.slice()), input('b', base.slice()), input('base', base)];
  for (const m of ['ties', 'dare_ties', 'della', 'breadcrumbs_ties', 'task_arithmetic']) {
    const perModel = { a: { weight: 1, density: 0.5 }, b: { weight: 1, density: 0.5 } };
    assert.deepEqual(runOut(m, inputs, { base: 'base', perModel, seed: 3 }), base, m);
  }
});

test('ties: the elected sign wins and the divisor counts only agreeing weights', () => {
  const base = new Float32Array(4);
  const out = combineTaskVectors(
    base,
    [Float32Array.from([1, 1, -2, 0]), Float32Array.from([-0.5, 2, 1, 0])],
    [1, 0.5],
    'sum',
    true,
    1,
  );
  // e0: +1 vs −0.25 → + wins, only model 0 (w=1) → 1. e1: both + → (1+1)/1.5. e2: −2 vs +0.5 → −2/1. e3: zeros → 0.
  close(out, [1, 2 / 1.5, -2, 0]);
});

test('ties: a density that keeps no element zeroes that task vector with a warning', () => {
  const inputs = gtaInputs(22, 60);
  const warnings: string[] = [];
  const out = runOut('ties', inputs, {
    base: 'base',
    perModel: { m0: { weight: 1, density: 0.01 }, m1: { weight: 1, density: 1 } },
    warn: (m) => warnings.push(m),
  });
  const only = runOut('ties', [inputs[1], inputs[2]], { base: 'base', perModel: { m1: { weight: 1, density: 1 } } });
  assert.deepEqual(out, only);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /m0/);
});

test('task arithmetic family: embeddings larger than the base are cut; smaller ones and other mismatches are errors', () => {
  const base = input('base', randn(30, 12), [4, 3]);
  const big = input('a', randn(31, 20), [5, 4]);
  const out = run('task_arithmetic', [big, base], { base: 'base', isEmbed: true, perModel: { a: { weight: 1 } }, tensorName: 'model.embed_tokens.weight' });
  assert.ok(out);
  assert.deepEqual(out.shape, [4, 3]);
  assert.equal(out.data[1 * 3 + 2], big.data[1 * 4 + 2]);
  const small = input('a', randn(32, 6), [3, 2]);
  throwsNaming(
    () => run('ties', [small, base], { base: 'base', isEmbed: true, perModel: { a: { weight: 1 } }, tensorName: 'model.embed_tokens.weight' }),
    'tokenizer_source',
    'model.embed_tokens.weight',
  );
  throwsNaming(() => run('ties', [big, base], { base: 'base', perModel: { a: { weight: 1 } } }), 'shape');
});

test('DARE: the same seed gives the same merge, another seed a different one', () => {
  const inputs = gtaInputs(40, 600);
  const perModel = { m0: { weight: 1, density: 0.3 }, m1: { weight: 0.5, density: 0.6 } };
  const a = runOut('dare_ties', inputs, { base: 'base', perModel, seed: 7 });
  const b = runOut('dare_ties', inputs, { base: 'base', perModel, seed: 7 });
  const c = runOut('dare_ties', inputs, { base: 'base', perModel, seed: 8 });
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  throwsNaming(() => mergeTensor('dare_linear', {
    tensorName: T,
    isEmbed: false,
    inputs,
    base: 'base',
    params: prepareParams('dare_linear', { tensorName: T, models: inputs.map((t) => t.model), base: 'base' }, { perModel }),
  }), 'random source');
});

test('DARE: rescale restores the L1 norm exactly; without rescale survivors are unchanged', () => {
  const delta = randn(41, 5000);
  const rng = new Rng(5);
  const masks = rngMaskSource(rng);
  const opts = { method: 'random' as const, density: 0.25, shape: [5000], tensorName: T, model: 'a', masks };
  const scaled = sparsify(delta, { ...opts, rescale: true });
  const l1 = (v: Float32Array) => v.reduce((s, x) => s + Math.abs(x), 0);
  close([l1(scaled)], [l1(delta)], 1e-5);
  const kept = scaled.filter((x) => x !== 0).length / 5000;
  assert.ok(Math.abs(kept - 0.25) < 0.04, `kept ${kept}`);
  const plain = sparsify(delta, { ...opts, rescale: false });
  for (let i = 0; i < delta.length; i++) assert.ok(plain[i] === 0 || plain[i] === delta[i]);
});

test('given masks are applied exactly as supplied', () => {
  const delta = Float32Array.from([1, -2, 3, -4]);
  const masks = givenMaskSource({ a: [1, 0, 0, 1] });
  const out = sparsify(delta, { method: 'random', density: 0.5, rescale: true, shape: [4], tensorName: T, model: 'a', masks });
  close(out, [2, 0, 0, -8]);
  throwsNaming(() => sparsify(delta, { method: 'random', density: 0.5, rescale: true, shape: [4], tensorName: T, model: 'b', masks }), 'model b');
});

test('DELLA probabilities: linear in the within-row rank; single-element rows get p = density', () => {
  const delta = Float32Array.from([0.1, -0.5, 0.3, 2, -0.2, 0.05]);
  const p = dellaProbabilities(delta, [2, 3], 0.5, 0.1);
  close(p, [0.4, 0.6, 0.5, 0.6, 0.5, 0.4], 1e-6);
  close(dellaProbabilities(delta, [6, 1], 0.5, 0.1), [0.5, 0.5, 0.5, 0.5, 0.5, 0.5], 1e-6);
  close(dellaProbabilities(Float32Array.from([3, 1, 2]), [3], 0.4, 0.2), [0.6, 0.2, 0.4], 1e-6);
});

test('breadcrumbs: with n_top = 0 the largest magnitudes are kept (mergekit drops everything)', () => {
  const delta = Float32Array.from([5, -1, 4, 0.5, -3, 2, 0.1, -6]);
  const mask = magnitudeOutliersMask(delta, 0.5, 0.01);
  assert.deepEqual([...mask!], [1, 0, 1, 0, 1, 0, 0, 1]);
  const mask2 = magnitudeOutliersMask(delta, 0.5, 0.25);
  assert.deepEqual([...mask2!], [0, 1, 1, 0, 1, 1, 0, 0]);
});

// ---------------------------------------------------------------------------------------------
// Other methods

test('model_stock: optional tensors in too few models are dropped, required ones refused', () => {
  const inputs = [input('a', [1, 2]), input('base', [0, 0])];
  const warnings: string[] = [];
  assert.equal(run('model_stock', inputs, { base: 'base', isOptional: true, warn: (m) => warnings.push(m) }), null);
  assert.equal(warnings.length, 1);
  throwsNaming(() => run('model_stock', inputs, { base: 'base' }), 'at least two others');
});

test('model_stock: a zero denominator falls back to the base', () => {
  const warnings: string[] = [];
  // Antiparallel task vectors: cos θ = −1, so 1 + (N − 1)·cos θ = 0 for N = 2.
  const out = runOut('model_stock', [input('a', [1.5, 1]), input('b', [-0.5, 0]), input('base', [0.5, 0.5])], {
    base: 'base',
    warn: (m) => warnings.push(m),
  });
  assert.deepEqual([...out], [0.5, 0.5]);
  assert.equal(warnings.length, 1);
});

test('model_stock: parallel task vectors give t = 1 (the average)', () => {
  const out = runOut('model_stock', [input('a', [2, 2]), input('b', [3, 3]), input('base', [1, 1])], { base: 'base' });
  close(out, [2.5, 2.5]);
});

test('sce: select_topk 0 keeps nothing, so the result is the base', () => {
  const inputs = gtaInputs(50, 60);
  const base = inputs[2].data;
  assert.deepEqual(runOut('sce', inputs, { base: 'base', global: { select_topk: 0 } }), base);
});

test('nearswap: close elements take the other model, distant ones stay near the base', () => {
  const out = runOut('nearswap', [input('x', [1.01, 3]), input('base', [1, 1])], { base: 'base', global: { t: 0.05 } });
  // |3 − 1| = 2 → ω = 0.05 / 2.
  close(out, [1.01, 0.025 * 3 + 0.975 * 1], 1e-6);
  throwsNaming(() => run('nearswap', [input('x', [1, 2]), input('y', [1, 2]), input('base', [1, 1])], { base: 'base', global: { t: 0.1 } }), 'exactly one');
});

test('arcee_fusion: identical models return the base; outlier importance takes the other model', () => {
  const base = randn(60, 64);
  assert.deepEqual(runOut('arcee_fusion', [input('base', base, [8, 8]), input('x', base.slice(), [8, 8])], { base: 'base' }), base);
  const x = base.slice();
  x[10] += 5;
  const out = runOut('arcee_fusion', [input('base', base, [8, 8]), input('x', x, [8, 8])], { base: 'base' });
  assert.equal(out[10], x[10]);
});

test('passthrough: copies or scales the single input; several inputs are an error', () => {
  assert.deepEqual([...runOut('passthrough', [input('a', [1, -2])])], [1, -2]);
  assert.deepEqual([...runOut('passthrough', [input('a', [1, -2])], { perModel: { a: { scale: 0 } } })], [0, -0]);
  throwsNaming(() => run('passthrough', [input('a', [1]), input('b', [2])]), 'exactly one model');
});

test('ram: unique changes are added, shared ones averaged', () => {
  const out = runOut('ram', [input('a', [1, 1, 0]), input('b', [0, 3, 0]), input('base', [0, 0, 0])], { base: 'base' });
  close(out, [1, 2, 0]);
  const plus = runOut('ramplus_tl', [input('a', [1, 1, 0]), input('b', [0, 3, 0]), input('base', [0, 0, 0])], { base: 'base' });
  // model a: 1 shared, 1 unique → ρ = 1, λ = 1 + 0.1·min(1, 0.2) = 1.02.
  close(plus, [1.02, 2, 0]);
});

test('methods that need a base refuse a merge without one, naming the tensor', () => {
  for (const m of MERGE_METHODS.filter((x) => x.needsBase === 'required')) {
    throwsNaming(() => validateMerge(m, { global: {}, perModel: {} }, { tensorName: T, models: ['a', 'b'], base: null }), 'base model');
  }
});

// ---------------------------------------------------------------------------------------------
// Selection helpers

test('selection agrees with sorting (duplicates and full 32-bit range included)', () => {
  fc.assert(
    fc.property(
      fc.array(fc.oneof(fc.integer({ min: 0, max: 20 }), fc.integer({ min: 0, max: 0xffffffff })), { minLength: 1, maxLength: 200 }),
      fc.nat(),
      (values, kSeed) => {
        const a = Uint32Array.from(values);
        const k = kSeed % a.length;
        const sorted = Array.from(a).sort((x, y) => x - y);
        assert.equal(selectKth(a, k), sorted[k]);
      },
    ),
  );
});

test('several ranks selected together agree with sorting (same and different high halves)', () => {
  fc.assert(
    fc.property(
      fc.array(fc.oneof(fc.integer({ min: 0, max: 20 }), fc.integer({ min: 0x10000, max: 0x1ffff }), fc.integer({ min: 0, max: 0xffffffff })), {
        minLength: 1,
        maxLength: 300,
      }),
      fc.array(fc.nat(), { minLength: 1, maxLength: 4 }),
      (values, kSeeds) => {
        const a = Uint32Array.from(values);
        const ks = kSeeds.map((k) => k % a.length);
        const sorted = Array.from(a).sort((x, y) => x - y);
        assert.deepEqual(selectKths(a, ks), ks.map((k) => sorted[k]));
      },
    ),
  );
  assert.throws(() => selectKths(Uint32Array.of(1, 2), [0, 2]), RangeError);
});

test('magnitude ranks match a stable sort by |x|', () => {
  fc.assert(
    fc.property(fc.array(fc.float({ noNaN: true }), { minLength: 1, maxLength: 300 }), (values) => {
      const x = Float32Array.from(values);
      const ranks = new Uint32Array(x.length);
      magnitudeRanks(x, 0, 1, x.length, ranks);
      const order = Array.from(x.keys()).sort((i, j) => Math.abs(x[i]) - Math.abs(x[j]) || i - j);
      const expected = new Uint32Array(x.length);
      order.forEach((i, pos) => (expected[i] = pos));
      assert.deepEqual(ranks, expected);
    }),
  );
});

test('top-k mask keeps exactly k elements, the largest magnitudes, ties by lower index', () => {
  fc.assert(
    fc.property(fc.array(fc.integer({ min: -5, max: 5 }), { minLength: 1, maxLength: 100 }), fc.nat(), (values, kSeed) => {
      const x = Float32Array.from(values);
      const k = kSeed % (x.length + 1);
      const mask = topKMask(magnitudeKeys(x), k);
      const order = Array.from(x.keys()).sort((i, j) => Math.abs(x[j]) - Math.abs(x[i]) || i - j);
      const expected = new Uint8Array(x.length);
      for (const i of order.slice(0, k)) expected[i] = 1;
      assert.deepEqual(mask, expected);
    }),
  );
});

test('descending range mask marks positions [start, end) of the order by magnitude, ties by lower index', () => {
  const naive = (x: Float32Array, start: number, end: number): Uint8Array => {
    const order = Array.from(x.keys()).sort((i, j) => Math.abs(x[j]!) - Math.abs(x[i]!) || i - j);
    const out = new Uint8Array(x.length);
    for (const i of order.slice(Math.max(0, start), Math.max(0, end))) out[i] = 1;
    return out;
  };
  fc.assert(
    fc.property(
      fc.array(fc.integer({ min: -4, max: 4 }), { minLength: 1, maxLength: 120 }),
      fc.integer({ min: -3, max: 130 }),
      fc.integer({ min: -3, max: 130 }),
      (values, a, b) => {
        const x = Float32Array.from(values);
        assert.deepEqual(descendingRangeMask(magnitudeKeys(x), a, b), naive(x, a, b));
      },
    ),
    { numRuns: 400 },
  );
  // Keys across the whole 32-bit range (sortable keys of negative values are above 2³¹).
  const v = randn(71, 3000);
  v[5] = -0;
  v[6] = 0;
  const keys = sortableKeys(v);
  const order = Array.from(v.keys()).sort((i, j) => keys[j]! - keys[i]! || i - j);
  for (const [start, end] of [[0, 1500], [100, 2900], [0, 3000], [2999, 3000], [1, 2]] as const) {
    const want = new Uint8Array(v.length);
    for (const i of order.slice(start, end)) want[i] = 1;
    assert.deepEqual(descendingRangeMask(keys, start, end), want, `[${start}, ${end})`);
  }
});

test('order statistics match sorted positions, negative values included', () => {
  const v = randn(70, 1001);
  const sorted = Array.from(v).sort((a, b) => a - b);
  assert.deepEqual(orderStatistics(v, [0, 250, 500, 750, 1000]), [sorted[0], sorted[250], sorted[500], sorted[750], sorted[1000]]);
});

test('L1 rescale is skipped for (near-)zero tensors', () => {
  const tiny = Float32Array.from([1e-9, -1e-9]);
  close(applyMask(tiny, Uint8Array.from([1, 0]), true), [tiny[0], 0], 0);
});
