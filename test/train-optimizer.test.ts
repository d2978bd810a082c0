import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { AdamW, clipGradNorm, GradAccumulator, gradNorm, scaleGrads, type OptimParam } from '../src/train/optimizer.js';
import { makeSchedule, warmupSteps } from '../src/train/schedule.js';
import { AmalgamError } from '../src/errors.js';

function param(values: number[], name = 'p'): OptimParam {
  return { name, data: Float32Array.from(values), grad: new Float32Array(values.length) };
}

function near(actual: number, expected: number, tol: number, what = ''): void {
  assert.ok(Math.abs(actual - expected) <= tol, `${what}: got ${actual}, expected ${expected} (±${tol})`);
}

describe('AdamW', () => {
  test('first step by hand: decay, then a step of lr against the gradient sign', () => {
    // p = 1, g = 0.5, lr = 0.1, λ = 0.1: p ← 1·(1 − 0.01) = 0.99; m = 0.05, v = 0.00025;
    // m̂ = 0.5, v̂ = 0.25, update = 0.1 · 0.5 / (0.5 + 1e-8) ≈ 0.1 → 0.89.
    const p = param([1]);
    const opt = new AdamW([p], { lr: 0.1, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0.1 });
    p.grad[0] = 0.5;
    opt.step();
    near(p.data[0]!, 0.89, 1e-7, 'p');
    near(opt.moments(0).m[0]!, 0.05, 1e-8, 'm');
    near(opt.moments(0).v[0]!, 0.00025, 1e-10, 'v');
    assert.equal(opt.stepCount, 1);
  });

  test('three steps match the PyTorch formulas evaluated in float64', () => {
    // Reference: p·(1−lr·λ); m, v updates; p −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε).
    const expected = [
      [0.890000002, -1.880000001],
      [0.8544662986878463, -1.8184151424192265],
      [0.8118787219097756, -1.7671581714168092],
    ];
    const grads = [
      [0.5, -1.0],
      [-0.25, 0.3],
      [0.125, 0.0],
    ];
    const p = param([1, -2]);
    const opt = new AdamW([p], { lr: 0.1, weightDecay: 0.1 });
    for (let t = 0; t < 3; t++) {
      p.grad.set(grads[t]!);
      opt.step();
      near(p.data[0]!, expected[t]![0]!, 2e-7, `step ${t + 1} p0`);
      near(p.data[1]!, expected[t]![1]!, 4e-7, `step ${t + 1} p1`);
    }
  });

  test('decay: false skips weight decay; zero gradients with decay only shrink', () => {
    const a = param([2]);
    const b = { ...param([2], 'norm'), decay: false };
    const opt = new AdamW([a, b], { lr: 0.5, weightDecay: 0.2 });
    opt.step();
    // g = 0: m = v = 0, the Adam term is 0/(0+ε) = 0.
    near(a.data[0]!, 2 * (1 - 0.5 * 0.2), 1e-7, 'decayed');
    assert.equal(b.data[0], 2);
  });

  test('step(lr) overrides the stored learning rate', () => {
    const p = param([0]);
    const opt = new AdamW([p], { lr: 1, weightDecay: 0 });
    p.grad[0] = -3;
    opt.step(0.01);
    near(p.data[0]!, 0.01, 1e-7, 'p');
  });

  test('rejects mismatched gradients and bad hyper-parameters', () => {
    assert.throws(() => new AdamW([{ data: new Float32Array(2), grad: new Float32Array(3) }]), AmalgamError);
    assert.throws(() => new AdamW([param([1])], { betas: [1, 0.9] }), AmalgamError);
    assert.throws(() => new AdamW([param([1])], { lr: -1 }), AmalgamError);
  });
});

describe('gradient clipping and accumulation', () => {
  test('clipGradNorm scales to the max norm and returns the norm before', () => {
    const a = param([0, 0]);
    const b = param([0]);
    a.grad.set([3, 0]);
    b.grad.set([4]);
    const n = clipGradNorm([a, b], 1);
    near(n, 5, 1e-12, 'norm');
    near(gradNorm([a, b]), 1, 1e-6, 'clipped norm');
    near(a.grad[0]!, 0.6, 1e-6, 'a');
    near(b.grad[0]!, 0.8, 1e-6, 'b');
    // Below the threshold nothing changes.
    const before = Array.from(a.grad);
    clipGradNorm([a, b], 10);
    assert.deepEqual(Array.from(a.grad), before);
  });

  test('accumulating micro-batches gives the gradient of the whole batch', () => {
    // Loss Σ_i (w·x_i − y_i)² over 4 items, as one batch of 4 or as micro-batches of 1 and 3.
    const xs = [1, 2, -1, 0.5];
    const ys = [0.5, 1, 2, -1];
    const w = 0.7;
    const full = param([w]);
    for (let i = 0; i < 4; i++) full.grad[0]! += 2 * (w * xs[i]! - ys[i]!) * xs[i]!;
    scaleGrads([full], 1 / 4);

    const acc = param([w]);
    const ga = new GradAccumulator([acc]);
    ga.begin();
    for (const part of [[0], [1, 2, 3]]) {
      let loss = 0;
      for (const i of part) {
        acc.grad[0]! += 2 * (w * xs[i]! - ys[i]!) * xs[i]!;
        loss += (w * xs[i]! - ys[i]!) ** 2;
      }
      ga.add(loss, part.length);
    }
    const mean = ga.finish();
    near(acc.grad[0]!, full.grad[0]!, 1e-6, 'grad');
    near(mean, xs.reduce((s, x, i) => s + (w * x - ys[i]!) ** 2, 0) / 4, 1e-12, 'loss');
    assert.equal(ga.microBatches, 2);
  });
});

describe('schedules', () => {
  test('constant, with and without warm-up', () => {
    const c = makeSchedule({ kind: 'constant', lr: 0.1, totalSteps: 10 });
    assert.deepEqual([0, 5, 9, 20].map(c), [0.1, 0.1, 0.1, 0.1]);
    const w = makeSchedule({ kind: 'constant', lr: 0.1, totalSteps: 10, warmup: 4 });
    [0.025, 0.05, 0.075, 0.1, 0.1].forEach((v, s) => near(w(s), v, 1e-15, `step ${s}`));
  });

  test('linear warm-up then linear decay', () => {
    // T = 10, W = 2, peak 1: warm-up 0.5, 1; decay over 8 steps: 1 − (s−2)/8.
    const f = makeSchedule({ kind: 'linear', lr: 1, totalSteps: 10, warmup: 2 });
    const expected = [0.5, 1, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0];
    expected.forEach((v, s) => near(f(s), v, 1e-15, `step ${s}`));
    near(f(50), 0, 0, 'after the end');
    const g = makeSchedule({ kind: 'linear', lr: 2, totalSteps: 6, minLrRatio: 0.5 });
    // p = s/6: 2·(1 − 0.5·p).
    [2, 2 - 1 / 6, 2 - 2 / 6, 1.5, 2 - 4 / 6, 2 - 5 / 6, 1].forEach((v, s) => near(g(s), v, 1e-15, `g step ${s}`));
  });

  test('cosine with warm-up and a floor', () => {
    // T = 12, W = 2, floor 0.1: s = 2 → peak; s = 7 (p = 0.5) → 0.55; s = 12 → 0.1.
    const f = makeSchedule({ kind: 'cosine', lr: 1, totalSteps: 12, warmup: 2, minLrRatio: 0.1 });
    near(f(0), 0.5, 1e-15, 's0');
    near(f(1), 1, 1e-15, 's1');
    near(f(2), 1, 1e-15, 's2');
    near(f(7), 0.55, 1e-15, 's7');
    near(f(4.5), 0.1 + 0.9 * 0.5 * (1 + Math.cos(Math.PI / 4)), 1e-15, 's4.5');
    near(f(12), 0.1, 1e-15, 's12');
    for (let s = 2; s < 12; s++) assert.ok(f(s + 1) <= f(s), `monotone at ${s}`);
  });

  test('fractional warm-up and argument checks', () => {
    assert.equal(warmupSteps(0.06, 250), 15);
    assert.equal(warmupSteps(30, 250), 30);
    assert.throws(() => makeSchedule({ kind: 'cosine', lr: 1, totalSteps: 0 }), AmalgamError);
    assert.throws(() => makeSchedule({ kind: 'step' as never, lr: 1, totalSteps: 5 }), AmalgamError);
    assert.throws(() => makeSchedule({ kind: 'linear', lr: 1, totalSteps: 5, minLrRatio: 2 }), AmalgamError);
  });
});
