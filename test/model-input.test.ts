/**
 * Model arguments of eval / generate / train: a GGUF or llama2.c file is converted into a
 * temporary Hugging Face folder that is removed afterwards; a missing path is a clear error.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { withModelFolder } from '../src/convert/model-input.js';
import { AmalgamError } from '../src/errors.js';
import { evaluateFile } from '../src/train/evaluate.js';
import { generateText } from '../src/train/generate-text.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const BIN = 'models/stories260K/stories260K.bin';

async function leftovers(): Promise<string[]> {
  return (await readdir(tmpdir())).filter((f) => f.startsWith('amalgam-model-'));
}

test('a missing model path names the path', async () => {
  await assert.rejects(
    withModelFolder('/nonexistent/amalgam/model.gguf', async () => 1),
    (e: unknown) => e instanceof AmalgamError && e.code === 'E_IO' && e.file === '/nonexistent/amalgam/model.gguf' && /does not exist/.test(e.message),
  );
});

test('a folder is used as it is', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'amalgam-input-'));
  try {
    assert.equal(await withModelFolder(dir, async (d) => d), dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('GGUF and llama2.c files are converted on the fly; the temporary folder is removed', async (t) => {
  if (!haveFixtures(t, GGUF, BIN)) return;
  const before = await leftovers();
  const data = join(await mkdtemp(join(tmpdir(), 'amalgam-input-')), 'one.txt');
  await writeFile(data, 'Once upon a time, there was a little girl named Lily.\n');
  try {
    const fromGguf = await evaluateFile(fixture(GGUF), data, { maxLength: 64 });
    const fromBin = await evaluateFile(fixture(BIN), data, { maxLength: 64 });
    assert.equal(fromGguf.model, fixture(GGUF));
    assert.ok(fromGguf.task === 'lm' && fromBin.task === 'lm');
    assert.ok(fromGguf.tokens > 10);
    assert.ok(fromGguf.nll > 0 && fromGguf.nll < 5);
    assert.equal(fromBin.nll, fromGguf.nll);
    const g = await generateText(fixture(BIN), { prompt: 'Once upon a time', maxTokens: 8, temperature: 0 });
    assert.match(g.text, /^Once upon a time/);
    // A failure inside still removes the conversion.
    await assert.rejects(withModelFolder(fixture(GGUF), async () => {
      throw new Error('inside');
    }), /inside/);
    assert.deepEqual(await leftovers(), before);
  } finally {
    await rm(join(data, '..'), { recursive: true, force: true });
  }
});
