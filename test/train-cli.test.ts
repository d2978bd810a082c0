/**
 * The train / eval / generate commands, run in-process on stories260K: eval reproduces the
 * fixture NLL protocol, generate reproduces the greedy golden text, train writes a model folder
 * or a PEFT adapter that eval reads back.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { convertToHf } from '../src/convert/to-hf.js';
import { AmalgamError } from '../src/errors.js';
import { parseLoraSpec } from '../src/train/options.js';
import { REPO_ROOT, fixture, haveFixtures } from './helpers/fixtures.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const VAL = 'datasets/tinystories/val.txt';
const SST2_DEV = 'datasets/sst2/dev.tsv';

let root = '';
let base = '';

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'amalgam-train-cli-'));
  if (!existsSync(fixture(GGUF))) return;
  base = join(root, 'stories260K');
  await convertToHf(fixture(GGUF), base);
});

after(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

/**
 * Runs the commands in a child process (the test runner owns this process's stdout), with the
 * same error reporting as the amalgam entry point.
 */
const RUNNER = `
const { Command, CommanderError } = await import('commander');
const { registerTrain } = await import('./src/cli/train.ts');
const { registerEval } = await import('./src/cli/eval.ts');
const { registerGenerate } = await import('./src/cli/generate.ts');
const program = new Command().name('amalgam').exitOverride();
registerTrain(program);
registerEval(program);
registerGenerate(program);
try {
  await program.parseAsync(process.argv.slice(1), { from: 'user' });
} catch (e) {
  if (!(e instanceof CommanderError)) process.stderr.write('amalgam: error: ' + (e.code ? e.code + ': ' : '') + e.message + '\\n');
  process.exitCode = 1;
}
`;

function amalgam(...args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', RUNNER, ...args], { cwd: REPO_ROOT, encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('eval --json reproduces the fixture NLL (1.4159 on 5,903 tokens)', async (t) => {
  if (!haveFixtures(t, GGUF, VAL)) return;
  const lines = (await readFile(fixture(VAL), 'utf8')).split('\n').filter((l) => l.trim() !== '');
  const data = join(root, 'first60.txt');
  await writeFile(data, lines.slice(0, 60).join('\n\n') + '\n');
  const r = amalgam('eval', base, '--data', data, '--max-length', '256', '--json');
  const rep = JSON.parse(r.stdout);
  assert.equal(rep.tokens, 5903);
  assert.equal(rep.sequences, 60);
  assert.ok(Math.abs(rep.nll - 1.4159) < 5e-4, `nll ${rep.nll}`);
  assert.ok(Math.abs(rep.perplexity - Math.exp(rep.nll)) < 1e-9);
});

test('generate: greedy from BOS gives the golden text; sampling is seeded', async (t) => {
  if (!haveFixtures(t, GGUF)) return;
  const r = amalgam('generate', base, '--max-tokens', '31');
  assert.equal(r.stdout, 'Once upon a time, there was a little girl named Lily. She loved to play outside in the park.\n');
  const a = JSON.parse((amalgam('generate', base, '--prompt', 'Tom', '--temperature', '0.9', '--top-k', '20', '--top-p', '0.95', '--seed', '5', '--max-tokens', '20', '--json')).stdout);
  const b = JSON.parse((amalgam('generate', base, '--prompt', 'Tom', '--temperature', '0.9', '--top-k', '20', '--top-p', '0.95', '--seed', '5', '--max-tokens', '20', '--json')).stdout);
  assert.deepEqual(a.tokens, b.tokens);
  assert.ok(a.text.startsWith('Tom'));
  assert.equal(a.tokens[0], 1);
});

test('train --lora --task classify writes an adapter that eval --adapter scores', async (t) => {
  if (!haveFixtures(t, GGUF, SST2_DEV)) return;
  const rows = (await readFile(fixture(SST2_DEV), 'utf8')).split('\n').filter((l) => l.trim() !== '');
  const train = join(root, 'train.tsv');
  const dev = join(root, 'dev.tsv');
  await writeFile(train, rows.slice(0, 401).join('\n') + '\n');
  await writeFile(dev, [rows[0], ...rows.slice(401, 501)].join('\n') + '\n');
  const out = join(root, 'adapter');
  const r = amalgam('train', base, '--task', 'classify', '--data', train, '--eval-data', dev, '--lora', 'r=4,alpha=8,targets=q_proj,v_proj', '--steps', '5', '--batch-size', '8', '--out', out, '--json', '-q');
  const rep = JSON.parse(r.stdout);
  assert.equal(rep.output, 'adapter');
  assert.equal(rep.steps, 5);
  assert.equal(rep.losses.length, 5);
  assert.equal(r.stderr, '');
  const cfg = JSON.parse(await readFile(join(out, 'adapter_config.json'), 'utf8'));
  assert.equal(cfg.r, 4);
  assert.equal(cfg.lora_alpha, 8);
  assert.deepEqual(cfg.modules_to_save, ['score']);
  const ev = JSON.parse((amalgam('eval', base, '--task', 'classify', '--adapter', out, '--data', dev, '--json')).stdout);
  assert.equal(ev.total, 100);
  assert.equal(ev.accuracy, rep.evalAfter.accuracy);
  const missing = amalgam('eval', base, '--task', 'classify', '--data', dev);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /E_MISSING: .*no classification head/);
  // From a GGUF file (converted into a temporary folder), the adapter names the file.
  const fromGguf = join(root, 'adapter-gguf');
  const g = amalgam('train', fixture(GGUF), '--task', 'classify', '--data', train, '--lora', 'r=4,alpha=8,targets=q_proj,v_proj', '--steps', '1', '--batch-size', '8', '--out', fromGguf, '-q');
  assert.equal(g.code, 0, g.stderr);
  assert.equal(JSON.parse(await readFile(join(fromGguf, 'adapter_config.json'), 'utf8')).base_model_name_or_path, fixture(GGUF));
});

test('train (full, lm) writes a model folder; the text report names it', async (t) => {
  if (!haveFixtures(t, GGUF, VAL)) return;
  const lines = (await readFile(fixture(VAL), 'utf8')).split('\n').filter((l) => l.trim() !== '');
  const data = join(root, 'stories.txt');
  await writeFile(data, lines.slice(0, 200).join('\n') + '\n');
  const out = join(root, 'full');
  const r = amalgam('train', base, '--data', data, '--holdout', '0.1', '--steps', '3', '--batch-size', '4', '--seq-len', '32', '--out', out, '-q');
  assert.match(r.stdout, /Trained 3 steps on 180 examples/);
  assert.match(r.stdout, /before: NLL/);
  assert.match(r.stdout, /wrote model /);
  assert.ok(existsSync(join(out, 'model.safetensors')));
  assert.ok(existsSync(join(out, 'tokenizer.json')));
  assert.match(amalgam('train', base, '--data', data, '--steps', '1', '--out', out, '-q').stderr, /E_IO: .*not empty/);
  assert.match(amalgam('train', base, '--data', data, '--merge', '--out', join(root, 'x'), '-q').stderr, /--merge needs --lora/);
});

test('LoRA specs', () => {
  assert.deepEqual(parseLoraSpec(true), { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'] });
  assert.deepEqual(parseLoraSpec('r=8,alpha=16,targets=q_proj,v_proj'), { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'] });
  assert.deepEqual(parseLoraSpec('targets=q_proj,k_proj,v_proj,o_proj,r=4'), { r: 4, alpha: 8, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] });
  assert.deepEqual(parseLoraSpec('r=2,freeze=A,rslora=true'), { r: 2, alpha: 4, targets: ['q_proj', 'v_proj'], freeze: 'A', rslora: true });
  assert.throws(() => parseLoraSpec('rank=0'), AmalgamError);
  assert.throws(() => parseLoraSpec('q_proj'), /has no key/);
  assert.throws(() => parseLoraSpec('r=8,dropout=0.1'), /unknown LoRA option 'dropout'/);
  assert.throws(() => parseLoraSpec('r=8,r=4'), /given twice/);
});
