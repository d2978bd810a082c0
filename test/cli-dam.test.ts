/**
 * The dam / evolve / adamerge commands in a child process, on the expert fixtures with tiny data
 * and budgets: dam train bakes a checkpoint that dam bake reproduces byte for byte from
 * mergers.safetensors; evolve and adamerge write a loadable merge and report; progress lines and
 * final tables appear; a bad recipe is an error naming the key.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LlamaModel } from '../src/nn/model.js';
import { REPO_ROOT, fixture, haveFixtures } from './helpers/fixtures.js';

const EXPERTS = ['stories260K-shakespeare', 'stories260K-gsm8k', 'stories260K-agnews'];
const NEEDED = [...EXPERTS.map((e) => `experts/${e}/model.safetensors`), 'models/stories260K/stories260K.gguf'];

const RUNNER = `
const { Command, CommanderError } = await import('commander');
const { registerDam } = await import('./src/cli/dam.ts');
const { registerEvolve } = await import('./src/cli/evolve.ts');
const { registerAdaMerge } = await import('./src/cli/adamerge.ts');
const program = new Command().name('amalgam').exitOverride();
registerDam(program);
registerEvolve(program);
registerAdaMerge(program);
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

let dir = '';

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-cli-dam-'));
  await writeFile(join(dir, 'a.txt'), 'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n');
  const rows = [
    { question: 'Tom has 3 apples and buys 2 more. How many apples does he have?', answer: 'He has 3 + 2 = 5 apples.\n#### 5' },
    { question: 'A box holds 4 pens. How many pens are in 3 boxes?', answer: 'There are 3 * 4 = 12 pens.\n#### 12' },
    { question: 'Sam reads 10 pages a day. How many pages in a week?', answer: 'He reads 7 * 10 = 70 pages.\n#### 70' },
  ];
  await writeFile(join(dir, 'b.jsonl'), rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  await writeFile(join(dir, 'c.tsv'), 'Toshiba Corp. announced Tuesday a 80 gigabyte, 1.8-inch hard drive.\tSci/Tech\nStocks rallied on Wall Street as oil prices fell for a third day.\tBusiness\nThe team won its third straight game on Sunday night.\tSports\n');
  const models = EXPERTS.map((e) => fixture(`experts/${e}`));
  await writeFile(
    join(dir, 'dam.yml'),
    [
      'models:',
      `  - {model: ${models[0]}, data: {path: a.txt, txt_mode: blocks}}`,
      `  - {model: ${models[1]}, data: {path: b.jsonl, text_fields: [question, answer]}}`,
      `  - {model: ${models[2]}, data: {path: c.tsv, text_fields: [0], header: false}}`,
      'data: {max_length: 16, packing: true, examples: 4}',
      'train: {optimizer: adam, lr: 1.0e-2, batch_size: 2, steps: 3, seed: 0}',
    ].join('\n') + '\n',
  );
  const data = ['  - {name: A, path: a.txt, txt_mode: blocks, window: 16}', '  - {name: B, path: b.jsonl, text_fields: [question, answer], window: 16}', '  - {name: C, path: c.tsv, text_fields: [0], header: false, window: 16}'];
  const head = [`base_model: ${fixture('models/stories260K/stories260K.gguf')}`, 'models:', ...models.map((m) => `  - ${m}`)];
  await writeFile(join(dir, 'evolve.yml'), [...head, 'data:', ...data, 'test:', ...data, 'cma: {evaluations: 50, seed: 1}'].join('\n') + '\n');
  await writeFile(join(dir, 'adamerge.yml'), [...head, 'data:', ...data, 'test:', ...data, 'train: {steps: 50, batch_size: 2, lr: 1.0e-2}'].join('\n') + '\n');
  await writeFile(join(dir, 'bad.yml'), [...head, 'data:', ...data, 'cma: {evaluations: 5, sigma: 2}'].join('\n') + '\n');
});

after(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

test('dam train bakes a checkpoint with a report; dam bake reproduces it from mergers.safetensors', async (t) => {
  if (!haveFixtures(t, ...NEEDED)) return;
  const out = join(dir, 'dam-out');
  const r = amalgam('dam', 'train', join(dir, 'dam.yml'), '--out', out);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /\| source +\| KL first step \| KL last step \|/);
  assert.match(r.stdout, /3 steps, [\d,]+ coefficients, loss .* student tokens\/s/);
  assert.match(r.stderr, /step 3\/3: loss \d\.\d{4} \| KL [\d.]+\/[\d.]+\/[\d.]+ \| \d+ tok\/s/);
  for (const f of ['model.safetensors', 'mergers.safetensors', 'config.json', 'dam_config.yml']) assert.ok(existsSync(join(out, f)), f);
  const again = join(dir, 'dam-rebaked');
  const b = amalgam('dam', 'bake', ...EXPERTS.map((e) => fixture(`experts/${e}`)), '--mergers', join(out, 'mergers.safetensors'), '--out', again, '--json');
  assert.equal(b.code, 0, b.stderr);
  assert.equal(JSON.parse(b.stdout).tensors, 48);
  assert.ok((await readFile(join(out, 'model.safetensors'))).equals(await readFile(join(again, 'model.safetensors'))));
  const j = amalgam('dam', 'train', join(dir, 'dam.yml'), '--steps', '1', '--json');
  assert.equal(j.code, 0, j.stderr);
  const rep = JSON.parse(j.stdout);
  assert.equal(rep.steps, 1);
  assert.equal(rep.outDir, null);
  assert.equal(rep.perSource[0].length, 3);
});

test('evolve: progress, final table, and a loadable best merge with evolve.json', async (t) => {
  if (!haveFixtures(t, ...NEEDED)) return;
  const out = join(dir, 'evolve-out');
  const r = amalgam('evolve', join(dir, 'evolve.yml'), '--evaluations', '14', '--out', out);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /evaluation 14\/14: gen \d+ \| fitness \d+\.\d{4} \| best \d+\.\d{4}/);
  assert.match(r.stdout, /best task_arithmetic parameters/);
  assert.match(r.stdout, /\| embed\/norm\/head \|/);
  assert.match(r.stdout, /14 evaluations \(1 generation of 12, 18 dimensions, stop: budget\)/);
  const info = JSON.parse(await readFile(join(out, 'evolve.json'), 'utf8'));
  assert.equal(info.evaluations, 14);
  assert.equal(info.parameters.length, 18);
  assert.ok(info.test.best.meanNll <= info.test.start.meanNll + 1, 'test scores present');
  const m = await LlamaModel.fromFolder(out);
  m.dispose();
});

test('adamerge: JSON report with coefficients and test scores', async (t) => {
  if (!haveFixtures(t, ...NEEDED)) return;
  const r = amalgam('adamerge', join(dir, 'adamerge.yml'), '--steps', '3', '--json');
  assert.equal(r.code, 0, r.stderr);
  const rep = JSON.parse(r.stdout);
  assert.equal(rep.steps, 3);
  assert.equal(rep.meanLambda.length, 3);
  assert.equal(rep.lambdas.length, 48 * 3);
  assert.equal(rep.granularity, 'layer');
  assert.deepEqual(rep.data, ['A', 'B', 'C']);
  assert.ok(rep.test.end.perDomain.length === 3);
  for (const l of rep.lambdas) assert.ok(l.lambda >= 0 && l.lambda <= 1);
});

test('a bad recipe is an E_CONFIG error naming the key', async (t) => {
  if (!haveFixtures(t, ...NEEDED)) return;
  const r = amalgam('evolve', join(dir, 'bad.yml'));
  assert.equal(r.code, 1);
  assert.match(r.stderr, /E_CONFIG/);
  assert.match(r.stderr, /cma/);
  const m = amalgam('dam', 'train', join(dir, 'missing.yml'));
  assert.equal(m.code, 1);
  assert.match(m.stderr, /E_IO/);
});
