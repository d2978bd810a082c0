import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { weightedSum } from '../src/merge/methods/linear.js';

/** The element-by-element definition: float64 accumulation in model order, one rounding. */
function naive(xs: readonly Float32Array[], weights: readonly number[], divisor: number): Float32Array {
  const n = xs[0]!.length;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let acc = 0;
    for (let k = 0; k < xs.length; k++) acc += weights[k]! * xs[k]![i]!;
    out[i] = divisor === 1 ? acc : acc / divisor;
  }
  return out;
}

const bits = (a: Float32Array) => Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length));

test('weightedSum equals the element-by-element float64 sum bit for bit', () => {
  const value = fc.oneof(
    fc.float({ noNaN: false }),
    fc.constantFrom(0, -0, Infinity, -Infinity, 1e-40, 3.4e38),
  );
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 4 }),
      fc.integer({ min: 1, max: 9000 }),
      fc.array(fc.double({ min: -3, max: 3, noNaN: true }), { minLength: 4, maxLength: 4 }),
      fc.constantFrom(1, 2.4, 0.3, -1.7),
      fc.array(value, { minLength: 64, maxLength: 64 }),
      (m, n, weights, divisor, pool) => {
        const xs = Array.from({ length: m }, (_, k) => Float32Array.from({ length: n }, (_, i) => pool[(i * 7 + k * 13) % 64]!));
        const got = weightedSum(xs, weights.slice(0, m), divisor);
        const want = naive(xs, weights.slice(0, m), divisor);
        // NaNs may differ in payload; compare them as NaN.
        for (let i = 0; i < n; i++) {
          if (Number.isNaN(want[i])) assert.ok(Number.isNaN(got[i]), `index ${i}`);
        }
        const g = bits(got).map((b, i) => (Number.isNaN(got[i]) ? 0 : b));
        const w = bits(want).map((b, i) => (Number.isNaN(want[i]) ? 0 : b));
        assert.deepEqual(g, w);
      },
    ),
    { numRuns: 60, seed: 7 },
  );
});

test('weightedSum reads a shorter input as NaN past its end', () => {
  const out = weightedSum([new Float32Array([1, 2, 3, 4, 5]), new Float32Array([1, 1])], [0.5, 0.5], 1);
  assert.deepEqual(Array.from(out.subarray(0, 2)), [1, 1.5]);
  for (const v of out.subarray(2)) assert.ok(Number.isNaN(v));
});
