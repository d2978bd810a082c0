/**
 * CMA-ES: convergence on the sphere and Rosenbrock functions within the evaluation counts the
 * strategy is known for, seeded determinism, box constraints (resample and clip), the exact
 * evaluation budget, the eigen-decomposition, and argument errors.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CmaEs, cmaesMinimize, symmetricEigen } from '../src/evolve/cma-es.js';
import { isAmalgamError } from '../src/errors.js';

const sphere = (x: Float64Array) => x.reduce((s, v) => s + v * v, 0);
const rosenbrock = (x: Float64Array) => {
  let s = 0;
  for (let i = 0; i + 1 < x.length; i++) s += 100 * (x[i + 1]! - x[i]! ** 2) ** 2 + (1 - x[i]!) ** 2;
  return s;
};

test('sphere: converges to 1e-10 from far away in a few hundred evaluations per dimension', async () => {
  for (const n of [2, 5, 10]) {
    const r = await cmaesMinimize(sphere, new Array(n).fill(3), { sigma0: 1, maxEvals: 5000, seed: 1, target: 1e-10 });
    assert.equal(r.stop, 'target', `n=${n}: ${r.stop}, f=${r.fitness}`);
    assert.ok(r.evaluations < 300 * n, `n=${n}: ${r.evaluations} evaluations`);
    for (const v of r.x) assert.ok(Math.abs(v) < 1e-4);
  }
});

test('Rosenbrock: reaches the valley floor (1, …, 1)', async () => {
  for (const [n, budget] of [
    [2, 2000],
    [5, 6000],
    [8, 12000],
  ] as const) {
    const r = await cmaesMinimize(rosenbrock, new Array(n).fill(0), { sigma0: 0.5, maxEvals: budget, seed: 3, target: 1e-10 });
    assert.equal(r.stop, 'target', `n=${n}: ${r.stop}, f=${r.fitness} after ${r.evaluations}`);
    for (const v of r.x) assert.ok(Math.abs(v - 1) < 1e-3, `n=${n}: x=${Array.from(r.x)}`);
  }
});

test('the same seed gives identical runs; another seed does not', async () => {
  const run = (seed: number) => cmaesMinimize(rosenbrock, [0.5, -0.5, 0.2, 0.1], { sigma0: 0.3, maxEvals: 300, seed });
  const a = await run(7);
  const b = await run(7);
  const c = await run(8);
  assert.deepEqual(Array.from(a.x), Array.from(b.x));
  assert.deepEqual(a.bestHistory, b.bestHistory);
  assert.notDeepEqual(a.bestHistory, c.bestHistory);
  const e1 = new CmaEs([0, 0, 0], { seed: 4 });
  const e2 = new CmaEs([0, 0, 0], { seed: 4 });
  assert.deepEqual(e1.ask().map((x) => Array.from(x)), e2.ask().map((x) => Array.from(x)));
});

test('box constraints: every candidate lies in the box, and an optimum outside it ends on the boundary', async () => {
  for (const boundary of ['resample', 'clip'] as const) {
    const es = new CmaEs([0.5, 0.5, 0.5, 0.5], { sigma0: 2, lower: [0, 0, 0, -1], upper: [1, 1, 1, 0.25], boundary, seed: 2 });
    for (let g = 0; g < 20; g++) {
      const xs = es.ask();
      for (const x of xs) {
        for (let i = 0; i < 3; i++) assert.ok(x[i]! >= 0 && x[i]! <= 1);
        assert.ok(x[3]! >= -1 && x[3]! <= 0.25);
      }
      es.tell(xs.map(sphere));
    }
    assert.ok(es.outOfBounds > 0);
    const r = await cmaesMinimize((x) => x.reduce((s, v) => s + (v - 2) ** 2, 0), [0.5, 0.5, 0.5], { sigma0: 0.3, maxEvals: 1500, seed: 2, lower: 0, upper: 1, boundary });
    for (const v of r.x) assert.ok(v > 1 - 1e-6 && v <= 1, `${boundary}: ${Array.from(r.x)}`);
    assert.ok(Math.abs(r.fitness - 3) < 1e-5);
  }
});

test('the budget is exact: a last generation that does not fit is evaluated in part', async () => {
  let calls = 0;
  const r = await cmaesMinimize(
    (x) => {
      calls++;
      return sphere(x);
    },
    [1, 1, 1, 1, 1, 1],
    { sigma0: 0.5, maxEvals: 29, seed: 0 },
  );
  const lambda = 4 + Math.floor(3 * Math.log(6));
  assert.equal(calls, 29);
  assert.equal(r.evaluations, 29);
  assert.equal(r.generations, Math.floor(29 / lambda));
  assert.equal(r.bestHistory.length, 29);
  for (let i = 1; i < 29; i++) assert.ok(r.bestHistory[i]! <= r.bestHistory[i - 1]!);
  assert.equal(r.stop, 'budget');
});

test('default strategy parameters follow the tutorial (n = 10)', () => {
  const es = new CmaEs(new Array(10).fill(0));
  assert.equal(es.lambda, 10);
  assert.equal(es.mu, 5);
  assert.ok(Math.abs(es.weights.reduce((a, b) => a + b, 0) - 1) < 1e-12);
  for (let i = 1; i < es.mu; i++) assert.ok(es.weights[i]! < es.weights[i - 1]!);
  assert.ok(Math.abs(es.muEff - 3.1672) < 1e-3, `μ_eff ${es.muEff}`);
  assert.ok(Math.abs(es.chiN - Math.sqrt(10) * (1 - 1 / 40 + 1 / 2100)) < 1e-12);
  assert.ok(es.c1 + es.cMu <= 1);
});

test('symmetricEigen reconstructs the matrix', () => {
  const n = 6;
  const a = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) a[i * n + j] = a[j * n + i] = Math.sin(i * 7 + j * 3) + (i === j ? 3 : 0);
  const { values, vectors } = symmetricEigen(a, n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let k = 0; k < n; k++) s += vectors[i * n + k]! * values[k]! * vectors[j * n + k]!;
      assert.ok(Math.abs(s - a[i * n + j]!) < 1e-10);
    }
  }
});

test('argument errors are E_USAGE', async () => {
  const bad: (() => unknown)[] = [
    () => new CmaEs([], {}),
    () => new CmaEs([0, 0], { sigma0: 0 }),
    () => new CmaEs([0, 0], { lower: 1, upper: 0 }),
    () => new CmaEs([0, 0], { lower: [0, 0, 0] }),
    () => new CmaEs([0, 0], { popsize: 1 }),
    () => new CmaEs([0, Number.NaN]),
    () => new CmaEs([0, 0]).tell([1, 2]),
  ];
  for (const f of bad) assert.throws(f, (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  const es = new CmaEs([0, 0], { popsize: 4 });
  es.ask();
  assert.throws(() => es.tell([1, 2, 3]), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
  await assert.rejects(cmaesMinimize(sphere, [0], { maxEvals: 0 }), (e) => isAmalgamError(e) && e.code === 'E_USAGE');
});
