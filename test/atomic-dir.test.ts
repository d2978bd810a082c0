/**
 * Output folders: the errors when one cannot be made, and the check a long job runs first.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkOutputFolder, withStagingDir } from '../src/io/atomic-dir.js';

test('an output path under a file fails with a message naming the output, not the staging folder', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'amalgam-atomic-'));
  try {
    await writeFile(join(dir, 'afile'), 'x');
    const target = join(dir, 'afile', 'sub');
    for (const attempt of [() => withStagingDir(target, async () => 1), () => checkOutputFolder(target)]) {
      await assert.rejects(attempt(), (e: Error) => {
        assert.match(e.message, new RegExp(`^${target.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: the output folder cannot be created: a part of its path is a file, not a folder`));
        assert.doesNotMatch(e.message, /partial/);
        return true;
      });
    }
    // The check leaves nothing behind where it can write.
    await checkOutputFolder(join(dir, 'out'));
    assert.deepEqual((await readdir(dir)).sort(), ['afile']);
    await writeFile(join(dir, 'notes'), 'y');
    await assert.rejects(checkOutputFolder(dir), /output folder exists and is not empty/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
