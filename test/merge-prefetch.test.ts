/**
 * Merges whose workers read the next tensors' inputs while merging the current one: the prefetch
 * areas, the big area for tensors too large for them, direct and ordinary reads, region-by-region
 * reads for what fits nowhere. Every way gives the same bytes as an inline merge with ordinary
 * reads, and the memory set aside stays within the budget.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { parseMergeConfig } from '../src/config/parse.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { directIoEnabled } from '../src/io/aligned.js';
import { wasmKernelsAvailable } from '../src/merge/fused-wasm.js';
import { formatMergeReport, runMerge, type RunMergeOptions } from '../src/merge/run.js';

// A disk-backed folder inside the repository: the OS temp folder may be tmpfs, which refuses
// O_DIRECT, and then only the fallback would run.
let dir: string;
// A large vocabulary makes the embedding and head the tensors too large for a prefetch area.
const SHAPE: SyntheticLlamaOptions = { hiddenSize: 64, intermediateSize: 96, numHeads: 4, numKvHeads: 2, vocabSize: 4096, numLayers: 2 };
const YAML =
  'merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1.0, density: 0.5}}\n  - {model: b, parameters: {weight: 0.7, density: 0.3}}\n' +
  'parameters: {normalize: true}\ndtype: bfloat16\n';

before(async () => {
  dir = await mkdtemp(join(process.cwd(), '.prefetch-test-'));
  await writeSyntheticLlama(join(dir, 'base'), { ...SHAPE, seed: 11, dtype: 'BF16' });
  await writeSyntheticLlama(join(dir, 'a'), { ...SHAPE, seed: 12, dtype: 'BF16' });
  await writeSyntheticLlama(join(dir, 'b'), { ...SHAPE, seed: 13, dtype: 'BF16' });
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function merge(out: string, opts: RunMergeOptions) {
  return runMerge(parseMergeConfig(YAML), join(dir, out), { baseDir: dir, configYaml: YAML, ...opts });
}

async function sameWeights(x: string, y: string): Promise<void> {
  const files = (await readdir(x)).filter((f) => f.endsWith('.safetensors')).sort();
  assert.ok(files.length > 0);
  assert.deepEqual(files, (await readdir(y)).filter((f) => f.endsWith('.safetensors')).sort());
  for (const f of files) assert.ok((await readFile(join(x, f))).equals(await readFile(join(y, f))), `${f} differs`);
}

const skip = !wasmKernelsAvailable() && 'WebAssembly kernels not built (npm run build:wasm)';

test('prefetching workers, with and without the big area and direct reads, write the inline merge byte for byte', { skip }, async () => {
  const ref = await merge('ref', { jobs: 1, directReads: 'never' });
  assert.equal(ref.execution!.reads.areaBytes, 0);

  // Budget 4 MB: two areas of 256 KiB per worker hold the layer tensors' inputs; the embedding
  // and head (3 inputs of 512 KiB) do not fit them, but fit the big area on top.
  const budget = 4 << 20;
  const big = await merge('big', { jobs: 2, directReads: 'always', memoryBudget: budget });
  const r = big.execution!.reads;
  assert.equal(r.areaBytes, 256 << 10);
  assert.equal(r.bigTensors, directIoEnabled() ? 2 : 0);
  if (directIoEnabled()) assert.ok(r.bigAreaBytes >= 3 * (512 << 10) && r.bigAreaBytes < 3 * (512 << 10) + 3 * 16384);
  assert.equal(r.directFiles, directIoEnabled() ? 3 : 0);
  assert.equal(r.setAsideBytes, budget / 4 + r.bigAreaBytes);
  assert.ok(r.setAsideBytes + big.execution!.peakInFlightBytes <= budget, 'areas, big area and tensors in flight stay within the budget');
  await sameWeights(ref.outDir, big.outDir);

  // Ordinary reads: no big area (reading twice from the page cache costs less than the memory);
  // the embedding and head are read region by region.
  const plain = await merge('plain', { jobs: 2, directReads: 'never', memoryBudget: budget });
  assert.deepEqual(plain.execution!.reads, { directFiles: 0, areaBytes: 256 << 10, bigTensors: 0, bigAreaBytes: 0, setAsideBytes: budget / 4 });
  await sameWeights(ref.outDir, plain.outDir);

  // A budget too small for the big area on top: direct reads, region by region.
  const tight = await merge('tight', { jobs: 2, directReads: 'always', memoryBudget: 2 << 20 });
  assert.equal(tight.execution!.reads.bigTensors, 0);
  await sameWeights(ref.outDir, tight.outDir);

  // Inline with direct reads: one tensor's inputs read whole, no areas.
  const inline = await merge('inline', { jobs: 1, directReads: 'always', memoryBudget: budget });
  assert.equal(inline.execution!.reads.areaBytes, 0);
  assert.equal(inline.execution!.reads.setAsideBytes, budget / 4);
  if (directIoEnabled()) assert.match(formatMergeReport(inline), /3 input files read past the page cache \(O_DIRECT\)/);
  assert.match(formatMergeReport(inline), /bound 4\.00 MiB, less 1\.00 MiB set aside for inputs read whole/);
  await sameWeights(ref.outDir, inline.outDir);

  // More workers than tensors of a kind, and the default budget.
  const many = await merge('many', { jobs: 3, directReads: 'always' });
  await sameWeights(ref.outDir, many.outDir);
});

test('a read error in a prefetch fails the merge naming the file, and leaves nothing at the output path', { skip }, async () => {
  const { truncate, cp } = await import('node:fs/promises');
  const broken = join(dir, 'broken');
  await cp(join(dir, 'a'), broken, { recursive: true });
  const weights = (await readdir(broken)).find((f) => f.endsWith('.safetensors'))!;
  const yaml = YAML.replace('{model: a,', '{model: broken,');
  // Plan first (headers intact), then cut the file short under it: reads past the end fail.
  const out = join(dir, 'broken-out');
  const run = runMerge(parseMergeConfig(yaml), out, {
    baseDir: dir,
    configYaml: yaml,
    jobs: 2,
    directReads: 'always',
    memoryBudget: 4 << 20,
    openSource: async (p) => {
      const { openSafetensors } = await import('../src/io/safetensors.js');
      const src = await openSafetensors(p);
      if (p.endsWith('broken')) await truncate(join(broken, weights), 100_000);
      return src;
    },
  });
  await assert.rejects(run, (e: Error) => e.message.includes(join('broken', weights)) && /file ended while reading a tensor/.test(e.message) && /\.weight/.test(e.message));
  assert.deepEqual((await readdir(dir)).filter((f) => f.startsWith('broken-out')), []);
});

test('amalgam merge --direct-reads: always writes the same bytes; an unknown value is refused with the choices', { skip }, async () => {
  const { spawnSync } = await import('node:child_process');
  const { writeFile } = await import('node:fs/promises');
  const { REPO_ROOT } = await import('./helpers/fixtures.js');
  const cfg = join(dir, 'cli.yml');
  await writeFile(cfg, YAML);
  const cli = (...args: string[]) =>
    spawnSync(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'merge', cfg, ...args, '--model-dir', dir, '--quiet'], { cwd: REPO_ROOT, encoding: 'utf8' });
  const ok = cli(join(dir, 'cli-out'), '--direct-reads', 'always', '--jobs', '2');
  assert.equal(ok.status, 0, ok.stderr);
  const ref = await merge('cli-ref', { jobs: 1, directReads: 'never' });
  await sameWeights(ref.outDir, join(dir, 'cli-out'));
  const bad = cli(join(dir, 'cli-bad'), '--direct-reads', 'sometimes');
  assert.notEqual(bad.status, 0);
  assert.match(bad.stderr, /--direct-reads.*sometimes.*auto, always, never/s);
});
