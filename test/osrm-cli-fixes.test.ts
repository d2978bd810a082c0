import assert from 'node:assert/strict';
import { adapterLabelNames } from '../src/train/checkpoint.js';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { isAbsolute, join, relative } from 'node:path';
import { after, before, test } from 'node:test';
import { Command } from 'commander';
import { registerOsrm } from '../src/cli/osrm.js';
import { AmalgamError } from '../src/errors.js';
import { parseOsrmRecipe, readOsrmRecipe, runOsrmInit, runOsrmPipeline } from '../src/osrm/index.js';
import { REPO_ROOT, fixture, haveFixtures } from './helpers/fixtures.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const DOMAIN = 'tasks/domain/train.jsonl';
const PRONOUN = 'tasks/pronoun/train.jsonl';
let work = '';

before(async () => {
  work = await mkdtemp(join(tmpdir(), 'amalgam-osrm-fixes-'));
});
after(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

/**
 * Runs `amalgam osrm …` in process, for the calls that are refused (they print nothing on
 * stdout, which the test runner reads).
 */
async function cli(args: string[]): Promise<void> {
  const program = new Command().exitOverride();
  registerOsrm(program);
  await program.parseAsync(['osrm', ...args], { from: 'user' });
}

/** Runs `amalgam osrm …` as a process in the repository root; fails unless it succeeds. */
function cliProcess(args: string[]): string {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'osrm', ...args], { cwd: REPO_ROOT, encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout;
}

/** An `E_*` AmalgamError whose message matches `re`. */
const fails = (code: string, re: RegExp) => (e: unknown) => {
  assert.ok(e instanceof AmalgamError, String(e));
  assert.equal(e.code, code);
  assert.match(e.message, re);
  return true;
};

const tasks = [
  { name: 'a', train: 't', eval: 'e' },
  { name: 'b', train: 't', eval: 'e' },
];
const withMerge = (merge: Record<string, unknown>) => ({ model: 'm', tasks, merges: [merge] });

test('recipe: merge parameter names and values are checked when the recipe is read', async () => {
  // A misspelt name, with the suggestion, naming the file and the key path.
  const file = join(work, 'typo.yml');
  await writeFile(file, 'model: m\ntasks:\n  - { name: a, train: t, eval: e }\n  - { name: b, train: t, eval: e }\nmerges:\n  - { method: task_arithmetic }\n  - { method: ties, parameters: { densty: 0.5 } }\n');
  await assert.rejects(readOsrmRecipe(file), (e: unknown) => {
    assert.ok(e instanceof AmalgamError);
    assert.equal(e.message, `${file}: merges[1].parameters.densty: unknown parameter \`densty\` for merge method \`ties\` (did you mean \`density\`?)`);
    assert.equal(e.hint, 'did you mean `density`?');
    return true;
  });
  // Values the method refuses: out of range, wrong type, a λ the grid makes zero for linear.
  assert.throws(() => parseOsrmRecipe(withMerge({ method: 'ties', parameters: { density: 1.5 } })), fails('E_CONFIG', /'merges\[0\]': model a: density must be in \[0, 1\], got 1\.5/));
  assert.throws(() => parseOsrmRecipe(withMerge({ method: 'dare_ties', parameters: { density: -0.1 } })), fails('E_CONFIG', /density must be in \[0, 1\], got -0\.1/));
  assert.throws(() => parseOsrmRecipe(withMerge({ method: 'ties', parameters: { normalize: 1 } })), fails('E_CONFIG', /parameter 'normalize' must be true or false, got 1/));
  assert.throws(() => parseOsrmRecipe(withMerge({ method: 'linear', lambdas: [0.5, 0] })), fails('E_CONFIG', /linear: the weights sum to 0, so normalize: true would divide by zero .*\(at λ 0\)$/));
  assert.throws(() => parseOsrmRecipe(withMerge({ method: 'nearswap', parameters: { t: 0.5 } })), fails('E_CONFIG', /nearswap merges the base model with exactly one other model, got a, b/));
  // Parameters the λ grid sets itself, or that the method ignores, would never be read.
  assert.throws(() => parseOsrmRecipe(withMerge({ method: 'ties', parameters: { lambda: 2 } })), fails('E_CONFIG', /merges\[0\]\.parameters\.lambda: set by the λ grid/));
  assert.throws(() => parseOsrmRecipe(withMerge({ method: 'linear', parameters: { weight: 2 } })), fails('E_CONFIG', /merges\[0\]\.parameters\.weight: set by the λ grid/));
  assert.throws(() => parseOsrmRecipe(withMerge({ method: 'task_arithmetic', parameters: { density: 0.5 } })), fails('E_CONFIG', /accepts `density` but ignores it/));
  assert.throws(() => parseOsrmRecipe(withMerge({ method: 'ties', lambdas: [0.5, 1, 0.5] })), fails('E_CONFIG', /merges\[0\]\.lambdas: λ 0\.5 is listed twice/));
  // Valid parameters pass through unchanged.
  const r = parseOsrmRecipe(withMerge({ name: 'ties-0.5', method: 'ties', lambdas: [0.5, 1], parameters: { density: 0.5, normalize: false } }));
  assert.deepEqual(r.merges[0]!.parameters, { density: 0.5, normalize: false });
});

test('recipe: seeds listed twice, center / divisor without the initialisation that reads them, unsafe variant names', () => {
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks, seeds: [0, 1, 1] }, '/x', 'r.yml'), fails('E_CONFIG', /^r\.yml: seeds: seed 1 is listed twice/));
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks, osrm: { center: true }, inits: [{ init: 'osrm-mean' }] }), fails('E_CONFIG', /osrm\.center: applies to osrm-covariance/));
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks, osrm: { divisor: 'n-1' } }), fails('E_CONFIG', /osrm\.divisor: applies to osrm-mean/));
  assert.equal(parseOsrmRecipe({ model: 'm', tasks, osrm: { center: true } }).osrm.center, true);
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks, inits: [{ name: '../x', init: 'standard' }] }), /inits\.0\.name: variant names may hold/);
  assert.throws(() => parseOsrmRecipe({ model: 'm', tasks: [{ name: '..', train: 't', eval: 'e' }, tasks[1]] }), /tasks\.0\.name: task names may hold/);
});

test('osrm run: --seeds 0,0 and a recipe whose seeds were set twice are refused before any work', async () => {
  const file = join(work, 'seeds.yml');
  const out = join(work, 'seeds-out');
  await writeFile(file, `model: ${join(work, 'no-such-model.gguf')}\ntasks:\n  - { name: a, train: t, eval: e }\n  - { name: b, train: t, eval: e }\noutput: { dir: ${out} }\n`);
  await assert.rejects(cli(['run', file, '--seeds', '0,0']), fails('E_USAGE', /^--seeds: seed 0 is listed twice/));
  await assert.rejects(cli(['run', file, '--seeds', ',']), fails('E_USAGE', /--seeds lists no seed/));
  const recipe = await readOsrmRecipe(file);
  recipe.seeds = [2, 3, 2];
  await assert.rejects(runOsrmPipeline(recipe), fails('E_CONFIG', /^seeds: seed 2 is listed twice/));
  assert.equal(existsSync(out), false);
});

test('osrm init: task names are checked before any work', async (t) => {
  if (!haveFixtures(t, GGUF, DOMAIN, PRONOUN)) return;
  const gguf = fixture(GGUF);
  const out = join(work, 'names');
  const task = (name: string, f = DOMAIN) => ['--task', `${name}=${fixture(f)}`];
  const base = ['init', gguf, '--out', out, '--samples', '4', '-q'];
  await assert.rejects(cli([...base, ...task('a'), ...task('a', PRONOUN)]), fails('E_USAGE', /task name "a" is given twice/));
  await assert.rejects(cli([...base, ...task('base-model'), ...task('b', PRONOUN), '--overwrite']), fails('E_USAGE', /task name "base-model" is reserved/));
  await assert.rejects(cli([...base, ...task('..'), ...task('b', PRONOUN)]), fails('E_USAGE', /task name "\.\." cannot name a folder/));
  await assert.rejects(runOsrmInit(gguf, [{ name: 'x/y', data: fixture(DOMAIN) }, { name: 'b', data: fixture(PRONOUN) }], out), fails('E_USAGE', /task name "x\/y" cannot name a folder/));
  // Nothing was converted or written.
  assert.equal(existsSync(out), false);

  // An existing adapter folder of a later task is found before the first task's adapter is written.
  await mkdir(join(out, 'b'), { recursive: true });
  await writeFile(join(out, 'b', 'keep.txt'), 'x');
  await assert.rejects(cli([...base, ...task('a'), ...task('b', PRONOUN)]), fails('E_IO', /the output folder of task b exists and is not empty/));
  assert.deepEqual(await readdir(out), ['b']);
  // A task folder may not hold an input.
  await assert.rejects(cli([...base, ...task('a'), '--task', `b=${join(out, 'b', 'keep.txt')}`, '--overwrite']), fails('E_USAGE', /the output folder holds the input/));
});

test('osrm init: mode-specific options are refused in the other mode; amalgam_init records them; the base model path is absolute', async (t) => {
  if (!haveFixtures(t, GGUF, DOMAIN, PRONOUN)) return;
  const gguf = fixture(GGUF);
  const tasksArgs = ['--task', `a=${fixture(DOMAIN)}`, '--task', `b=${fixture(PRONOUN)}`, '--samples', '4', '-q'];
  const out = (n: string) => join(work, `modes-${n}`);
  await assert.rejects(cli(['init', gguf, ...tasksArgs, '--out', out('x'), '--mode', 'mean', '--center']), fails('E_USAGE', /--center belongs to --mode covariance/));
  await assert.rejects(cli(['init', gguf, ...tasksArgs, '--out', out('x'), '--divisor', 'n-1']), fails('E_USAGE', /--divisor belongs to --mode mean/));
  await assert.rejects(cli(['init', gguf, ...tasksArgs, '--out', out('x'), '--mode', 'covariance', '--divisor', 'n']), fails('E_USAGE', /--divisor belongs to --mode mean/));
  await assert.rejects(runOsrmInit(gguf, [{ name: 'a', data: fixture(DOMAIN) }, { name: 'b', data: fixture(PRONOUN) }], out('x'), { mode: 'mean', center: true }), fails('E_USAGE', /center applies to covariance mode only/));
  assert.equal(existsSync(out('x')), false);

  const config = async (dir: string) => JSON.parse(await readFile(join(dir, 'a', 'adapter_config.json'), 'utf8')) as { base_model_name_or_path: string; amalgam_init: Record<string, unknown> };
  // A relative --out: the adapters name the converted base model by its absolute path.
  const rel = relative(REPO_ROOT, out('cov'));
  assert.ok(!isAbsolute(rel));
  assert.match(cliProcess(['init', gguf, ...tasksArgs, '--out', rel, '--center']), /OSRM covariance initialisation of 2 tasks/);
  const cov = await config(out('cov'));
  assert.equal(cov.base_model_name_or_path, join(out('cov'), 'base-model'));
  assert.equal(cov.amalgam_init['center'], true);
  assert.equal('divisor' in cov.amalgam_init, false);
  // A model folder given by a relative path is written absolute too.
  assert.match(cliProcess(['init', relative(REPO_ROOT, join(out('cov'), 'base-model')), ...tasksArgs, '--out', out('mean'), '--mode', 'mean', '--divisor', 'n-1']), /OSRM mean initialisation of 2 tasks/);
  const mean = await config(out('mean'));
  assert.equal(mean.base_model_name_or_path, join(out('cov'), 'base-model'));
  assert.equal(mean.amalgam_init['divisor'], 'n-1');
  assert.equal('center' in mean.amalgam_init, false);
});

test('osrm run: the adapters record the statistics settings of OSRM initialisations', async (t) => {
  if (!haveFixtures(t, GGUF, DOMAIN, PRONOUN)) return;
  const fx = (p: string) => fixture(`tasks/${p}`);
  const out = join(work, 'run');
  const recipe = parseOsrmRecipe({
    model: fixture(GGUF),
    tasks: [
      { name: 'domain', train: fx('domain/train.jsonl'), eval: fx('domain/eval.jsonl'), train_limit: 16, eval_limit: 8, num_labels: 3 },
      { name: 'pronoun', train: fx('pronoun/train.jsonl'), eval: fx('pronoun/eval.jsonl'), train_limit: 16, eval_limit: 8 },
    ],
    osrm: { samples: 8, center: true },
    train: { steps: 1, batch_size: 4 },
    inits: [{ init: 'standard' }, { init: 'osrm-covariance', freeze: 'A' }],
    merges: [{ method: 'ties', lambdas: [1], parameters: { density: 0.5 } }],
    evaluation: { batch_size: 8, diagnostic_samples: 8 },
    output: { dir: out },
  });
  const report = await runOsrmPipeline(recipe);
  assert.equal(report.runs.length, 4);
  const cfg = async (variant: string) =>
    JSON.parse(await readFile(join(out, 'adapters', 'seed-0', variant, 'domain', 'adapter_config.json'), 'utf8')) as { base_model_name_or_path: string; amalgam_init: Record<string, unknown> };
  const osrm = await cfg('osrm-covariance+freeze-A');
  assert.deepEqual(osrm.amalgam_init, { kind: 'osrm-covariance', freeze: 'A', seed: 0, samples: 8, shuffle_seed: 42, pooling: 'real-tokens', center: true, tasks: ['domain', 'pronoun'] });
  assert.equal(osrm.base_model_name_or_path, join(out, 'base-model'));
  assert.deepEqual((await cfg('standard')).amalgam_init, { kind: 'standard', freeze: 'none', seed: 0, tasks: ['domain', 'pronoun'] });
  // The domain task's three classes are recorded, as eval --adapter reads them.
  const recorded = await adapterLabelNames(join(out, 'adapters', 'seed-0', 'standard', 'domain'));
  assert.deepEqual(recorded?.names, ['LABEL_0', 'LABEL_1', 'LABEL_2']);
  assert.match(recorded!.file, /adapter_model\.safetensors$/);
  assert.equal('id2label' in (await cfg('standard')), false);
});
