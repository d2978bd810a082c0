/**
 * Crash safety of `amalgam merge`: the command is killed (SIGKILL) at seeded random points while
 * it merges; the output path must never hold a folder (a partial merge lives only in a hidden
 * staging folder beside it). SIGTERM stops it cleanly. A final run completes, cleans up what the
 * killed runs left, and its bytes equal an uninterrupted run.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { writeSyntheticLlama } from '../src/demo/synthetic.js';
import { Rng } from '../src/tensor/rng.js';
import { REPO_ROOT } from './helpers/fixtures.js';

let dir: string;
let config: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-crash-'));
  const o = { hiddenSize: 256, intermediateSize: 704, numLayers: 12, numHeads: 8, numKvHeads: 4, vocabSize: 4096, dtype: 'BF16' as const };
  await Promise.all(
    (
      [
        ['base', 1],
        ['a', 2],
        ['b', 3],
      ] as const
    ).map(([name, seed]) => writeSyntheticLlama(join(dir, name), { ...o, seed })),
  );
  config = join(dir, 'merge.yml');
  await writeFile(
    config,
    'merge_method: dare_ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1.0, density: 0.5}}\n  - {model: b, parameters: {weight: [0.3, 0.9], density: 0.6}}\ndtype: bfloat16\n',
  );
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  /** ms from spawn until the staging folder appeared (undefined if never seen). */
  stagingAt?: number;
  /** Whether the staging folder existed when the signal was sent. */
  stagingAtKill?: boolean;
  ms: number;
}

/** Whether the staging folder of process `pid` exists in `parent`. */
async function hasStaging(parent: string, pid: number | undefined): Promise<boolean> {
  return (await readdir(parent)).some((n) => n.startsWith(`.merged.partial-${pid}-`));
}

/**
 * Runs `amalgam merge` into `<parent>/merged`. With `kill`, waits for the staging folder, then
 * `kill.after` more ms, and sends `kill.signal`.
 */
async function runMergeCli(parent: string, kill?: { after: number; signal: NodeJS.Signals }): Promise<Run> {
  const start = Date.now();
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'merge', config, join(parent, 'merged'), '--model-dir', dir, '--random-seed', '7', '--out-shard-size', '6M', '-j', '2'],
    { cwd: REPO_ROOT, stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal })),
  );
  let finished = false;
  void exited.then(() => (finished = true));
  const run: Partial<Run> = {};
  while (!finished && run.stagingAt === undefined) {
    if (await hasStaging(parent, child.pid)) run.stagingAt = Date.now() - start;
    else await sleep(5);
  }
  if (kill && !finished) {
    await sleep(kill.after);
    if (!finished) {
      run.stagingAtKill = await hasStaging(parent, child.pid);
      child.kill(kill.signal);
    }
  }
  const { code, signal } = await exited;
  return { ...run, code, signal, stderr, ms: Date.now() - start };
}

async function folderBytes(d: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const f of (await readdir(d)).sort()) out.set(f, await readFile(join(d, f)));
  return out;
}

test('killing amalgam merge never leaves a folder at the output path; a re-run equals an uninterrupted run', async (t) => {
  const refParent = join(dir, 'ref');
  await mkdir(refParent);
  const ref = await runMergeCli(refParent);
  assert.equal(ref.code, 0, ref.stderr);
  assert.ok(ref.stagingAt !== undefined, 'the staging folder was seen');
  const reference = await folderBytes(join(refParent, 'merged'));
  assert.ok([...reference.keys()].filter((f) => f.endsWith('.safetensors')).length > 2, 'several shards');
  const mergeMs = ref.ms - ref.stagingAt!;
  t.diagnostic(`uninterrupted run: ${ref.ms} ms, merging for ${mergeMs} ms`);

  const parent = join(dir, 'crash');
  await mkdir(parent);
  const out = join(parent, 'merged');
  const rng = new Rng(2024);
  let midMerge = 0;
  for (let i = 0; i < 5; i++) {
    const run = await runMergeCli(parent, { after: Math.floor(rng.next() * mergeMs), signal: 'SIGKILL' });
    t.diagnostic(`kill ${i}: ${run.signal ?? `exit ${run.code}`} after ${run.ms} ms${run.stagingAtKill ? ' (mid-merge)' : ''}`);
    if (run.signal === 'SIGKILL') {
      if (run.stagingAtKill) midMerge++;
      assert.equal(existsSync(out), false, `kill ${i} after ${run.ms} ms left a folder at the output path`);
    } else {
      // The run finished before the kill landed: its output must be complete.
      assert.equal(run.code, 0, run.stderr);
      assert.deepEqual(await folderBytes(out), reference);
      await rm(out, { recursive: true });
    }
  }
  assert.ok(midMerge >= 2, `only ${midMerge} kills landed while merging`);

  // SIGTERM: a clean stop, no output and no staging folder of its own.
  const before = (await readdir(parent)).filter((n) => n.startsWith('.merged.partial-'));
  const term = await runMergeCli(parent, { after: Math.floor(mergeMs / 3), signal: 'SIGTERM' });
  if (term.signal === null && term.code === 0) {
    await rm(out, { recursive: true });
  } else {
    assert.equal(term.code, 143, term.stderr);
    assert.match(term.stderr, /SIGTERM received/);
    assert.equal(existsSync(out), false);
    const afterTerm = (await readdir(parent)).filter((n) => n.startsWith('.merged.partial-'));
    // Its own staging folder is gone (and those of the killed runs were cleaned up when it started).
    assert.deepEqual(afterTerm.filter((n) => !before.includes(n)), [], 'the stopped run removed its staging folder');
  }

  // A complete run: cleans the staging folders the killed runs left, and equals the reference.
  const fin = await runMergeCli(parent);
  assert.equal(fin.code, 0, fin.stderr);
  assert.deepEqual(await folderBytes(out), reference);
  assert.deepEqual(await readdir(parent), ['merged']);
});
