/**
 * Re-baking and re-running learned merges: `bakeFromMergers` checks the source folders against
 * the models and weight fingerprints the mergers file records (wrong order, other models, moved
 * folders, files without fingerprints); a file that is not a mergers file, and one that does not
 * record f; the recipes written into the output folders of dam train / evolve / adamerge re-run
 * from another folder with the same paths and the command-line overrides; missing model folders
 * in recipes.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { cp, mkdir, mkdtemp, readFile, realpath, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ReferenceBackend } from '../src/backend/reference.js';
import { parseAdaMergeRecipe } from '../src/adamerge/recipe.js';
import { ADAMERGE_CONFIG, runAdaMerge } from '../src/adamerge/run.js';
import { bakeDam, bakeFromMergers, DAM_CONFIG, FINGERPRINTS_KEY, MERGERS_FILE, weightsFingerprint } from '../src/dam/bake.js';
import { DamModel } from '../src/dam/model.js';
import { parseDamRecipe } from '../src/dam/recipe.js';
import { runDam } from '../src/dam/train.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { isAmalgamError } from '../src/errors.js';
import { EVOLVE_CONFIG, runEvolve } from '../src/evolve/evolve.js';
import { loadMergeModels } from '../src/evolve/models.js';
import { evolveRecipeAsRun, parseEvolveRecipe } from '../src/evolve/recipe.js';
import { openSafetensors, writeSafetensorsFile, type TensorData } from '../src/io/safetensors.js';
import { Rng } from '../src/tensor/rng.js';
import { REPO_ROOT, fixture, haveFixtures } from './helpers/fixtures.js';

const be = new ReferenceBackend();
const SMALL: SyntheticLlamaOptions = { hiddenSize: 32, intermediateSize: 48, numHeads: 4, numKvHeads: 2, vocabSize: 64, numLayers: 2, dtype: 'F32' };
const EXPERTS = ['stories260K-shakespeare', 'stories260K-gsm8k', 'stories260K-agnews'];
const NEEDED = [...EXPERTS.map((e) => `experts/${e}/model.safetensors`), 'models/stories260K/stories260K.gguf'];

let dir = '';
const src = (...names: string[]) => names.map((n) => join(dir, n));

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-dam-fixes-'));
  for (const [i, n] of ['a', 'b', 'c', 'other'].entries()) await writeSyntheticLlama(join(dir, n), { ...SMALL, seed: 31 + i });
});

after(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** Trains nothing: random coefficients over the folders, baked into `out`. */
async function bakeRandom(folders: string[], out: string): Promise<void> {
  const dam = await DamModel.fromFolders(folders, { backend: be });
  const rng = new Rng(5);
  for (const p of dam.coefficients()) rng.fillNormal(p.data, 0.3, 0.4);
  dam.coefficientsChanged();
  await bakeDam(dam, out, { writeModelCard: false });
  dam.dispose();
}

/** A copy of a mergers file with its metadata changed by `edit` (files of older versions, of the reference code). */
async function rewriteMergers(from: string, to: string, edit: (md: Record<string, string>) => void): Promise<void> {
  const f = await openSafetensors(from);
  const tensors: TensorData[] = [];
  for (const t of f.tensors()) tensors.push({ name: t.name, dtype: t.dtype, shape: t.shape, data: await f.readRaw(t.name) });
  const md = { ...f.metadata };
  await f.close();
  edit(md);
  await writeSafetensorsFile(to, tensors, md);
}

async function rejectsWith(p: Promise<unknown>, code: string, pattern: RegExp): Promise<string> {
  let message = '';
  await assert.rejects(p, (e) => {
    assert.ok(isAmalgamError(e), String(e));
    assert.equal(e.code, code, e.message);
    assert.match(e.message, pattern);
    message = e.message;
    return true;
  });
  return message;
}

test('mergers.safetensors records a fingerprint of each source; re-baking checks the folders and their order', async () => {
  const trained = join(dir, 'trained');
  await bakeRandom(src('a', 'b', 'c'), trained);
  const mergers = join(trained, MERGERS_FILE);
  const m = await openSafetensors(mergers);
  const recorded = JSON.parse(m.metadata[FINGERPRINTS_KEY]!) as string[];
  await m.close();
  const want: string[] = [];
  for (const d of src('a', 'b', 'c')) {
    const s = await openSafetensors(d);
    want.push(await weightsFingerprint(s));
    await s.close();
  }
  assert.deepEqual(recorded, want);
  assert.equal(new Set(recorded).size, 3, 'the sources have distinct fingerprints');
  assert.match(recorded[0]!, /^[0-9a-f]{64}$/);

  // The same folders in another order.
  const msg = await rejectsWith(bakeFromMergers(src('b', 'a', 'c'), mergers, join(dir, 'x1')), 'E_USAGE', /do not match the models the coefficients were trained on/);
  assert.match(msg, new RegExp(`source 0 \\(${join(dir, 'b')}\\) is recorded source 1`));
  assert.match(msg, new RegExp(`source 1 \\(${join(dir, 'a')}\\) is recorded source 0`));
  assert.ok(msg.includes(`recorded: ${src('a', 'b', 'c').join(', ')}`), msg);
  assert.ok(msg.includes(`given:    ${src('b', 'a', 'c').join(', ')}`), msg);
  // Another model in place of one source.
  await rejectsWith(bakeFromMergers(src('a', 'b', 'other'), mergers, join(dir, 'x2')), 'E_USAGE', /source 2 \(.*other\) has other weights than recorded source 2/);
  // The same model twice.
  await rejectsWith(bakeFromMergers(src('a', 'a', 'c'), mergers, join(dir, 'x3')), 'E_USAGE', /source 1 \(.*\) is recorded source 0/);

  // A link to a recorded folder is that folder: no warning, the same bytes.
  await symlink(join(dir, 'a'), join(dir, 'a-link'));
  const warnings: string[] = [];
  await bakeFromMergers(src('a-link', 'b', 'c'), mergers, join(dir, 'linked'), { onWarning: (w) => warnings.push(w) });
  assert.deepEqual(warnings, []);
  assert.ok((await readFile(join(dir, 'linked', 'model.safetensors'))).equals(await readFile(join(trained, 'model.safetensors'))));

  // Moved folders with the recorded weights: a warning per folder, the same bytes.
  await mkdir(join(dir, 'moved'));
  for (const n of ['a', 'b', 'c']) await cp(join(dir, n), join(dir, 'moved', n), { recursive: true });
  const movedWarnings: string[] = [];
  await bakeFromMergers(src('moved/a', 'moved/b', 'moved/c'), mergers, join(dir, 'rebaked'), { onWarning: (w) => movedWarnings.push(w) });
  assert.equal(movedWarnings.length, 3);
  assert.match(movedWarnings[1]!, new RegExp(`source 1 was recorded as ${join(dir, 'b')}; ${join(dir, 'moved', 'b')} is used, whose weights match`));
  assert.ok((await readFile(join(dir, 'rebaked', 'model.safetensors'))).equals(await readFile(join(trained, 'model.safetensors'))));
  // ... and in another order: an error.
  await rejectsWith(bakeFromMergers(src('moved/c', 'moved/b', 'moved/a'), mergers, join(dir, 'x4')), 'E_USAGE', /source 0 \(.*moved\/c\) is recorded source 2/);
  // The re-baked file records the folders it was baked from.
  const r = await openSafetensors(join(dir, 'rebaked', MERGERS_FILE));
  assert.deepEqual(JSON.parse(r.metadata['models']!), src('moved/a', 'moved/b', 'moved/c'));
  assert.deepEqual(JSON.parse(r.metadata[FINGERPRINTS_KEY]!), want);
  await r.close();

  // A recorded folder whose weights changed in place.
  await rm(join(dir, 'moved', 'c'), { recursive: true });
  await cp(join(dir, 'other'), join(dir, 'moved', 'c'), { recursive: true });
  await rejectsWith(bakeFromMergers(src('moved/a', 'moved/b', 'moved/c'), join(dir, 'rebaked', MERGERS_FILE), join(dir, 'x5')), 'E_USAGE', /the weights in .*moved\/c have changed since the coefficients were trained/);
});

test('files without fingerprints: compared with the recorded folders where they exist, else by path and name', async () => {
  const kept = join(dir, 'kept');
  await mkdir(kept);
  for (const n of ['a', 'b', 'c']) await cp(join(dir, n), join(kept, n), { recursive: true });
  const trained = join(dir, 'trained-old');
  await bakeRandom([join(kept, 'a'), join(kept, 'b'), join(kept, 'c')], trained);
  const old = join(dir, 'old-mergers.safetensors');
  await rewriteMergers(join(trained, MERGERS_FILE), old, (md) => delete md[FINGERPRINTS_KEY]);

  // The recorded folders still exist: their weights are compared with the given ones.
  const warnings: string[] = [];
  await bakeFromMergers(src('a', 'b', 'c'), old, join(dir, 'old-ok'), { onWarning: (w) => warnings.push(w) });
  assert.equal(warnings.length, 3);
  assert.match(warnings[0]!, /whose weights match the recorded ones/);
  assert.ok((await readFile(join(dir, 'old-ok', 'model.safetensors'))).equals(await readFile(join(trained, 'model.safetensors'))));
  await rejectsWith(bakeFromMergers(src('a', 'b', 'other'), old, join(dir, 'x6')), 'E_USAGE', /source 2 \(.*other\) has other weights than recorded source 2/);
  await rejectsWith(bakeFromMergers([join(kept, 'b'), join(kept, 'a'), join(kept, 'c')], old, join(dir, 'x7')), 'E_USAGE', /is recorded source 1/);

  // The recorded folders are gone: a warning, unless the folder names show another order.
  await rm(kept, { recursive: true });
  warnings.length = 0;
  await bakeFromMergers(src('a', 'b', 'c'), old, join(dir, 'old-gone'), { onWarning: (w) => warnings.push(w) });
  assert.equal(warnings.length, 3);
  assert.match(warnings[2]!, new RegExp(`source 2 was recorded as ${join(kept, 'c')}, which cannot be read; ${join(dir, 'c')} is used, and the file records no fingerprint`));
  await rejectsWith(bakeFromMergers(src('b', 'a', 'c'), old, join(dir, 'x8')), 'E_USAGE', /source 0 \(.*\/b\) is recorded source 1/);
});

test('a file that is not a mergers file, and one that does not record f', async () => {
  const trained = join(dir, 'trained-f');
  await bakeRandom(src('a', 'b', 'c'), trained);
  const msg = await rejectsWith(bakeFromMergers(src('a', 'b', 'c'), join(dir, 'a', 'model.safetensors'), join(dir, 'x9')), 'E_FORMAT', /not a mergers file written by `amalgam dam train`: it holds no DAM coefficients/);
  assert.match(msg, /lm_head\.weight|model\.embed_tokens\.weight/);
  assert.doesNotMatch(msg, /non_linearity/);

  const noF = join(dir, 'no-f.safetensors');
  await rewriteMergers(join(trained, MERGERS_FILE), noF, (md) => delete md['non_linearity']);
  await rejectsWith(bakeFromMergers(src('a', 'b', 'c'), noF, join(dir, 'x10')), 'E_METADATA', /does not record non_linearity \(pass .*--non-linearity tanh \| sigmoid \| identity/);
  await bakeFromMergers(src('a', 'b', 'c'), noF, join(dir, 'given-f'), { nonLinearity: 'tanh' });
  assert.ok((await readFile(join(dir, 'given-f', 'model.safetensors'))).equals(await readFile(join(trained, 'model.safetensors'))));
  await rejectsWith(bakeFromMergers(src('a', 'b', 'c'), join(trained, MERGERS_FILE), join(dir, 'x11'), { nonLinearity: 'sigmoid' }), 'E_USAGE', /records non_linearity tanh, but sigmoid was given/);
});

const RUNNER = `
const { Command, CommanderError } = await import('commander');
const { registerDam } = await import('./src/cli/dam.ts');
const program = new Command().name('amalgam').exitOverride();
program.configureOutput({ writeOut: (s) => process.stdout.write(s), writeErr: (s) => process.stderr.write(s) });
registerDam(program);
try {
  await program.parseAsync(process.argv.slice(1), { from: 'user' });
} catch (e) {
  if (!(e instanceof CommanderError)) process.stderr.write('amalgam: error: ' + e.message + '\\n');
  process.exitCode = 1;
}
`;

function amalgam(...args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', RUNNER, ...args], { cwd: REPO_ROOT, encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('dam bake: --non-linearity, the source-folder rule in --help, warnings on stderr', async () => {
  const help = amalgam('dam', 'bake', '--help');
  assert.match(help.stdout, /--non-linearity <f>/);
  assert.match(help.stdout, /the same folders in another order\), or other weights: an error/);
  const trained = join(dir, 'trained-cli');
  await bakeRandom(src('a', 'b', 'c'), trained);
  const noF = join(dir, 'no-f-cli.safetensors');
  await rewriteMergers(join(trained, MERGERS_FILE), noF, (md) => delete md['non_linearity']);
  const bad = amalgam('dam', 'bake', ...src('a', 'b', 'c'), '--mergers', noF, '--out', join(dir, 'x12'), '--non-linearity', 'relu');
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /--non-linearity: unknown non-linearity 'relu'/);
  await cp(join(dir, 'a'), join(dir, 'cli-moved-a'), { recursive: true });
  const ok = amalgam('dam', 'bake', ...src('cli-moved-a', 'b', 'c'), '--mergers', noF, '--out', join(dir, 'cli-f'), '--non-linearity', 'tanh', '--json');
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(JSON.parse(ok.stdout).tensors, 2 * 9 + 3);
  assert.match(ok.stderr, new RegExp(`amalgam: warning: source 0 was recorded as ${join(dir, 'a')}; ${join(dir, 'cli-moved-a')} is used, whose weights match`));
});

/** A recipe folder with relative links to the experts and small data files. */
async function recipeFolder(name: string): Promise<string> {
  const r = join(dir, name);
  await mkdir(join(r, 'data'), { recursive: true });
  await symlink(fixture('experts'), join(r, 'experts'));
  await symlink(fixture('models'), join(r, 'models'));
  await writeFile(join(r, 'data', 'a.txt'), 'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n');
  await writeFile(join(r, 'data', 'b.jsonl'), JSON.stringify({ question: 'Tom has 3 apples and buys 2 more. How many apples does he have?', answer: 'He has 5.' }) + '\n');
  await writeFile(join(r, 'data', 'c.txt'), 'Stocks rallied on Wall Street as oil prices fell for a third day.\n'.repeat(12));
  return r;
}

test('dam train writes a dam_config.yml and a card with absolute paths and --steps; it re-runs from another folder', async (t) => {
  if (!haveFixtures(t, ...NEEDED)) return;
  const r = await recipeFolder('dam-recipe');
  const text = [
    '# Paths are relative to this file.',
    'models:',
    '  - {model: experts/stories260K-shakespeare, data: {path: data/a.txt, txt_mode: blocks}}',
    '  - {model: experts/stories260K-gsm8k, data: {path: data/b.jsonl, text_fields: [question, answer]}}',
    '  - {model: experts/stories260K-agnews, data: data/c.txt}',
    'data: {max_length: 8, packing: true, examples: 2}',
    'train: {optimizer: adam, lr: 1.0e-2, steps: 5}',
  ].join('\n');
  const recipe = parseDamRecipe(text);
  const out = join(dir, 'dam-out');
  const first = await runDam(recipe, { baseDir: r, outDir: out, steps: 1, recipeYaml: text, recipeFile: join(r, 'dam.yml') });
  assert.equal(first.steps, 1);
  const written = await readFile(join(out, DAM_CONFIG), 'utf8');
  assert.doesNotMatch(written, /relative to this file/);
  assert.match(written, /--steps 1/);
  const again = parseDamRecipe(written);
  assert.equal(again.train.steps, 1);
  assert.equal(again.train.lr, 1e-2);
  assert.equal(again.models[2]!.data.path, join(r, 'data', 'c.txt'));
  for (const [i, m] of again.models.entries()) {
    assert.equal(m.model, join(r, recipe.models[i]!.model));
    assert.equal(await realpath(m.model), await realpath(fixture(`experts/${EXPERTS[i]}`)));
    assert.equal(m.data.path, join(r, recipe.models[i]!.data.path));
  }
  assert.equal(again.models[0]!.data.txtMode, 'blocks');
  assert.deepEqual(again.models[1]!.data.textFields, ['question', 'answer']);
  const card = await readFile(join(out, 'README.md'), 'utf8');
  for (const e of EXPERTS) assert.ok(card.includes(`| \`${join(r, 'experts', e)}\` |`), `the card lists ${e} by its absolute path`);
  assert.ok(card.includes(`${join(r, 'data', 'b.jsonl')} (`), 'the card names the data by its absolute path');
  assert.doesNotMatch(card, /\| `experts\//);

  // Run from another folder, the written recipe gives the same merge.
  const second = await runDam(again, { baseDir: tmpdir(), outDir: join(dir, 'dam-again') });
  assert.equal(second.steps, 1);
  assert.ok((await readFile(join(out, 'model.safetensors'))).equals(await readFile(join(dir, 'dam-again', 'model.safetensors'))));
});

test('evolve and adamerge write their recipes with absolute paths and the command-line budget', async (t) => {
  if (!haveFixtures(t, ...NEEDED)) return;
  const r = await recipeFolder('learned-recipes');
  const head = ['base_model: models/stories260K/stories260K.gguf', 'models:', '  - {model: experts/stories260K-shakespeare, name: sh}', '  - experts/stories260K-gsm8k'];
  const data = ['data:', '  - {name: A, path: data/a.txt, txt_mode: blocks, window: 8, count: 2}', 'test:', '  - data/c.txt'];
  const evolveText = [...head, ...data, 'cma: {evaluations: 50}'].join('\n');
  const evolve = parseEvolveRecipe(evolveText, r);
  const out = join(dir, 'evolve-out');
  await runEvolve(evolve, { outDir: out, evaluations: 2, recipeYaml: evolveText, recipeFile: join(r, 'evolve.yml') });
  const written = await readFile(join(out, EVOLVE_CONFIG), 'utf8');
  assert.match(written, /--evaluations 2/);
  const again = parseEvolveRecipe(written, tmpdir());
  assert.deepEqual(again, { ...evolve, cma: { ...evolve.cma, evaluations: 2 } });
  assert.equal(again.models[0]!.path, join(r, 'experts', 'stories260K-shakespeare'));
  assert.equal(again.test[0]!.path, join(r, 'data', 'c.txt'));
  // Without the recipe text, the resolved recipe is written in its YAML form.
  assert.deepEqual(parseEvolveRecipe(evolveRecipeAsRun(evolve, { file: EVOLVE_CONFIG }), tmpdir()), evolve);

  const adaText = [...head, ...data, 'train: {steps: 50, batch_size: 1}'].join('\n');
  const ada = parseAdaMergeRecipe(adaText, r);
  const adaOut = join(dir, 'adamerge-out');
  await runAdaMerge(ada, { outDir: adaOut, steps: 1, recipeYaml: adaText, recipeFile: join(r, 'adamerge.yml') });
  const adaAgain = parseAdaMergeRecipe(await readFile(join(adaOut, ADAMERGE_CONFIG), 'utf8'), tmpdir());
  assert.deepEqual(adaAgain, { ...ada, train: { ...ada.train, steps: 1 } });
  assert.equal(adaAgain.baseModel, join(r, 'models', 'stories260K', 'stories260K.gguf'));
  const adaDefault = await runAdaMerge(ada, { outDir: join(dir, 'adamerge-default'), steps: 1 });
  assert.deepEqual(parseAdaMergeRecipe(await readFile(join(adaDefault.outDir!, ADAMERGE_CONFIG), 'utf8'), tmpdir()), { ...ada, train: { ...ada.train, steps: 1 } });
});

test('a recipe naming a model folder that does not exist, or that has no config.json, fails before any data is read', async () => {
  await writeFile(join(dir, 'data.txt'), 'some text to read\n');
  const text = (second: string) => ['models:', `  - {model: a, data: data.txt}`, `  - {model: ${second}, data: data.txt}`].join('\n');
  const missing = await rejectsWith(runDam(parseDamRecipe(text('agnewz')), { baseDir: dir }), 'E_IO', /agnewz: 'models\.1\.model': the model does not exist/);
  assert.match(missing, /give a Hugging Face model folder/);
  assert.match(missing, new RegExp(`resolved against the recipe's folder, ${dir}`));
  assert.doesNotMatch(missing, /tokenizer/);
  await mkdir(join(dir, 'empty'));
  await rejectsWith(runDam(parseDamRecipe(text('empty')), { baseDir: dir }), 'E_MISSING', /empty: 'config\.json': no config\.json in the model folder/);
  await rejectsWith(runDam(parseDamRecipe(text('data.txt')), { baseDir: dir }), 'E_IO', /'models\.1\.model': expected a model folder, got a file/);
  // evolve and adamerge: every model is checked before the first is loaded, in the words of eval.
  await rejectsWith(loadMergeModels(null, src('a', 'agnewz')), 'E_IO', /agnewz: the model does not exist \(give a Hugging Face model folder, or a GGUF or llama2\.c file\)/);
});
