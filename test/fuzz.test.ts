/**
 * Property-based fuzzing of the safetensors and GGUF readers with a fixed seed: valid files are
 * generated, mutated (bytes, header length, JSON-aware and GGUF-field-aware edits) and parsed
 * through a counting reader. Every input must either parse and read, or fail with an
 * AmalgamError, without asking for more bytes than the input holds. `npm run fuzz` runs the same
 * targets for 100,000 cases.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { AmalgamError } from '../src/errors.js';
import { MemoryByteReader } from '../src/io/source.js';
import { serializeSafetensors } from '../src/io/safetensors.js';
import { haveFixtures } from './helpers/fixtures.js';
import {
  CountingReader,
  GGUF_FIXTURE,
  checkGgufInput,
  checkSafetensorsInput,
  ggufFixture,
  ggufFixtureProperty,
  ggufProperty,
  mutateSafetensors,
  safetensorsProperty,
  validGgufArb,
  validSafetensorsArb,
  type Tally,
} from './fuzz/targets.js';

const SEED = 20240611;
/** Per-case limit: a case that takes longer than this counts as a hang. */
const CASE_TIMEOUT_MS = 5_000;
const TEST_TIMEOUT_MS = 180_000;

const RUNS = { safetensors: 10_000, gguf: 5_000, ggufFixture: 800 };

function summary(tally: Tally): string {
  return [...tally].sort((a, b) => b[1] - a[1]).map(([o, n]) => `${o} ${n}`).join(', ');
}

test('CountingReader records every requested byte, including impossible requests', async () => {
  const r = new CountingReader(new MemoryByteReader(new Uint8Array(16), 'x'));
  await r.read(0, 8);
  await r.read(8, 8);
  assert.equal(r.requested, 16);
  assert.equal(r.bad, undefined);
  await assert.rejects(r.read(4, 100), (e: unknown) => e instanceof AmalgamError);
  assert.equal(r.requested, 116);
  assert.match(r.bad ?? '', /read\(4, 100\)/);
});

test('the generators make valid files, and the property accepts them', async () => {
  await fc.assert(
    fc.asyncProperty(validSafetensorsArb, async (c) => {
      assert.equal(await checkSafetensorsInput(c.bytes, c.tensors), 'ok');
    }),
    { numRuns: 300, seed: SEED },
  );
  await fc.assert(
    fc.asyncProperty(validGgufArb, async (bytes) => {
      assert.equal(await checkGgufInput(bytes, true), 'ok');
    }),
    { numRuns: 300, seed: SEED },
  );
  // a mutation the property must classify as a typed error
  const bytes = serializeSafetensors([{ name: 'w', dtype: 'F32', shape: [2], data: new Uint8Array(8) }]);
  const broken = mutateSafetensors(bytes, { kind: 5, a: 8, b: 0, c: 0 }); // header length 100,000,000
  assert.equal(await checkSafetensorsInput(broken), 'E_HEADER');
});

test(`fuzz safetensors: ${RUNS.safetensors} mutated files`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const tally: Tally = new Map();
  const start = performance.now();
  await fc.assert(safetensorsProperty(tally), { numRuns: RUNS.safetensors, seed: SEED, timeout: CASE_TIMEOUT_MS });
  t.diagnostic(`${RUNS.safetensors} cases in ${((performance.now() - start) / 1000).toFixed(1)} s; outcomes: ${summary(tally)}`);
  // the mutators must reach past the length check into every layer of validation
  const ok = tally.get('ok') ?? 0;
  assert.ok(ok > RUNS.safetensors * 0.1, `only ${ok} inputs parsed`);
  for (const code of ['E_HEADER', 'E_DUPLICATE', 'E_OFFSETS', 'E_SHAPE', 'E_DTYPE', 'E_METADATA'] as const) {
    assert.ok((tally.get(code) ?? 0) > 0, `no input ended in ${code}: ${summary(tally)}`);
  }
});

test(`fuzz GGUF: ${RUNS.gguf} mutated generated files`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const tally: Tally = new Map();
  const start = performance.now();
  await fc.assert(ggufProperty(tally), { numRuns: RUNS.gguf, seed: SEED, timeout: CASE_TIMEOUT_MS });
  t.diagnostic(`${RUNS.gguf} cases in ${((performance.now() - start) / 1000).toFixed(1)} s; outcomes: ${summary(tally)}`);
  const ok = tally.get('ok') ?? 0;
  assert.ok(ok > RUNS.gguf * 0.1, `only ${ok} inputs parsed`);
  assert.ok(tally.size >= 5, `too few distinct outcomes: ${summary(tally)}`);
});

test(`fuzz GGUF: ${RUNS.ggufFixture} mutations of the stories260K fixture`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
  if (!haveFixtures(t, GGUF_FIXTURE)) return;
  const fx = ggufFixture()!;
  assert.equal(await checkGgufInput(fx.bytes, true), 'ok', 'the unmutated fixture parses');
  assert.ok(fx.hints.lengthFields.length > 100, `found only ${fx.hints.lengthFields.length} string length fields`);
  const tally: Tally = new Map();
  const start = performance.now();
  await fc.assert(ggufFixtureProperty(tally)!, { numRuns: RUNS.ggufFixture, seed: SEED, timeout: CASE_TIMEOUT_MS });
  t.diagnostic(`${RUNS.ggufFixture} cases in ${((performance.now() - start) / 1000).toFixed(1)} s; outcomes: ${summary(tally)}`);
  assert.ok(tally.size >= 4, `too few distinct outcomes: ${summary(tally)}`);
});
