/**
 * Conversion on the fly, the demo's options and output folder, and the messages for paths of the
 * wrong kind: temporary conversions are removed even when the process is interrupted, errors
 * name the user's file, options are validated, and misplaced files are recognised.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { REPO_ROOT, fixture, haveFixtures } from './helpers/fixtures.js';
import { AmalgamError } from '../src/errors.js';
import { withModelFolder } from '../src/convert/model-input.js';
import { convertToHf } from '../src/convert/to-hf.js';
import { runDemo, DEMO_CONFIG } from '../src/demo/demo.js';
import { inspectPath } from '../src/inspect.js';
import { evaluateFile } from '../src/train/evaluate.js';
import { generateText } from '../src/train/generate-text.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const BIN = 'models/stories260K/stories260K.bin';
const TOK = 'models/stories260K/tok512.bin';

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-convert-demo-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

function amalgam(...args: string[]) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), ...args], { cwd: REPO_ROOT, encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

async function rejectsWith(p: Promise<unknown>, code: string, re: RegExp): Promise<AmalgamError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof AmalgamError, `expected an AmalgamError, got ${(e as Error)?.stack ?? String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, re);
    return e;
  }
  assert.fail(`expected an error matching ${re}`);
}

async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return cond();
}

/**
 * Runs withModelFolder on `model` in a child process whose callback prints the folder and then
 * computes synchronously for a minute (as eval and generate do), sends it `signal`, and returns
 * the folder, how the child ended and how long the signal took to stop it.
 */
async function interruptConversion(model: string, signal: NodeJS.Signals): Promise<{ folder: string; code: number | null; signal: NodeJS.Signals | null; stopMs: number }> {
  const script = join(dir, `interrupt-${signal}.mjs`);
  const moduleUrl = pathToFileURL(join(REPO_ROOT, 'src/convert/model-input.ts')).href;
  await writeFile(
    script,
    `import { withModelFolder } from ${JSON.stringify(moduleUrl)};
await withModelFolder(process.argv[2], async (folder) => {
  process.stdout.write(folder + '\\n');
  const end = Date.now() + 60000;
  while (Date.now() < end) {}
});
`,
  );
  const child = spawn(process.execPath, ['--import', 'tsx', script, model], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr.on('data', (b: Buffer) => (err += b.toString()));
  const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => child.on('exit', (code, sig) => res({ code, signal: sig })));
  assert.ok(await waitFor(() => out.includes('\n'), 60_000), `the conversion did not start: ${err}`);
  const folder = out.split('\n')[0]!;
  assert.ok(existsSync(join(folder, 'config.json')), `the converted folder exists while in use: ${folder}`);
  const t0 = Date.now();
  child.kill(signal);
  const how = await ended;
  return { folder, ...how, stopMs: Date.now() - t0 };
}

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  test(`${signal} during a long computation on a converted model stops at once and removes the temporary folder`, async (t) => {
    if (!haveFixtures(t, GGUF)) return;
    const r = await interruptConversion(fixture(GGUF), signal);
    // The signal keeps its default effect: the process ends by it (status 128 + n in a shell).
    assert.equal(r.signal, signal);
    assert.equal(r.code, null);
    assert.ok(r.stopMs < 10_000, `stopped after ${r.stopMs} ms`);
    const tmp = dirname(r.folder);
    assert.match(tmp, /amalgam-model-/);
    assert.ok(await waitFor(() => !existsSync(tmp), 10_000), `${tmp} is left behind`);
  });
}

test('errors about the temporary conversion name the model file', async (t) => {
  if (!haveFixtures(t, GGUF)) return;
  const model = fixture(GGUF);
  let tmp = '';
  const e = await rejectsWith(
    withModelFolder(model, async (folder) => {
      tmp = folder;
      throw new AmalgamError('E_FORMAT', 'something is wrong', { file: join(folder, 'config.json'), hint: `look at ${folder}` });
    }),
    'E_FORMAT',
    /something is wrong/,
  );
  assert.equal(e.file, model);
  assert.equal(e.key, 'config.json');
  assert.equal(e.message, `${model}: 'config.json': something is wrong (look at ${model})`);
  assert.ok(!existsSync(dirname(tmp)));
  // An error naming another file is left as it is.
  const other = new AmalgamError('E_IO', 'unrelated', { file: '/elsewhere/data.txt' });
  assert.equal(await withModelFolder(model, async () => Promise.reject(other)).catch((x: unknown) => x), other);

  const data = join(dir, 'cls.tsv');
  await writeFile(data, 'text\tlabel\nhello\t0\nworld\t1\n');
  const head = await rejectsWith(evaluateFile(model, data, { task: 'classify' }), 'E_MISSING', /the model has no classification head/);
  assert.equal(head.file, model);
  assert.ok(head.message.startsWith(`${model}: the model has no classification head`), head.message);
  assert.doesNotMatch(head.message, /amalgam-model-/);
});

test('a PEFT adapter folder or a folder of GGUF / llama2.c files given as the model says so', async () => {
  const adapter = join(dir, 'adapter');
  await mkdir(adapter);
  await writeFile(join(adapter, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: 8, base_model_name_or_path: 'models/base' }));
  await writeFile(join(adapter, 'adapter_model.safetensors'), '');
  const e = await rejectsWith(generateText(adapter, { maxTokens: 1 }), 'E_USAGE', /this is a PEFT adapter folder \(adapter_config\.json\), not a model/);
  assert.equal(e.file, adapter);
  assert.match(e.message, /give the base model \(models\/base\) as the model and this folder with --adapter/);
  assert.doesNotMatch(e.message, /tokenizer\.json/);

  const files = join(dir, 'files');
  await mkdir(files);
  for (const f of ['b.gguf', 'a.bin', 'tok512.bin', 'notes.txt']) await writeFile(join(files, f), '');
  const f = await rejectsWith(generateText(files, { maxTokens: 1 }), 'E_USAGE', /not a Hugging Face model folder \(no config\.json\); it holds the model files a\.bin, b\.gguf \(/);
  assert.match(f.message, new RegExp(`give the file itself as the model .*e\\.g\\. ${join(files, 'a.bin').replace(/[.]/g, '\\.')}`));
  const i = await rejectsWith(inspectPath(files), 'E_MISSING', /no config\.json: not a Hugging Face model folder; it holds the model files a\.bin, b\.gguf/);
  assert.match(i.message, /amalgam inspect .*a\.bin\), or convert it into a model folder \(amalgam convert .*a\.bin <out-dir>\)/);
});

test('inspect recognises an empty .gguf file and a llama2.c tokenizer file', async (t) => {
  const empty = join(dir, 'empty.gguf');
  await writeFile(empty, '');
  const e = await rejectsWith(inspectPath(empty), 'E_FORMAT', /the GGUF file is empty \(0 bytes\)/);
  assert.equal(e.file, empty);
  assert.doesNotMatch(e.message, /safetensors/);
  const upper = join(dir, 'EMPTY.GGUF');
  await writeFile(upper, '');
  await rejectsWith(inspectPath(upper), 'E_FORMAT', /the GGUF file is empty/);

  if (!haveFixtures(t, TOK)) return;
  const tok = await rejectsWith(inspectPath(fixture(TOK)), 'E_FORMAT', /this is a llama2\.c tokenizer file \(512 tokens\), not a model checkpoint/);
  assert.doesNotMatch(tok.message, /hidden_dim/);
  const r = amalgam('inspect', fixture(TOK));
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^amalgam: error: .*tok512\.bin: this is a llama2\.c tokenizer file \(512 tokens\)/);
});

test('a llama2.c model without its tokenizer: the hint says what works for generate, eval and train', async (t) => {
  if (!haveFixtures(t, BIN)) return;
  const alone = join(dir, 'alone');
  await mkdir(alone);
  const model = join(alone, 'stories260K.bin');
  await copyFile(fixture(BIN), model);
  const e = await rejectsWith(generateText(model, { maxTokens: 1 }), 'E_MISSING', /no llama2\.c tokenizer beside the model \(looked for tok512\.bin, tokenizer\.bin\)/);
  assert.match(e.message, /put the llama2\.c tokenizer file beside the model as tok512\.bin or tokenizer\.bin, or convert the model with amalgam convert .*stories260K\.bin <out-dir> --tokenizer <file>/);
  assert.doesNotMatch(e.message, /pass the tokenizer file explicitly \(--tokenizer\)/);
});

test('convert --max-position-embeddings takes a positive integer, quoted in the error', async (t) => {
  if (!haveFixtures(t, GGUF)) return;
  for (const bad of ['1.5', 'abc', '0', '1e3']) {
    const out = join(dir, `mpe-${bad}`);
    const r = amalgam('convert', fixture(GGUF), out, '--max-position-embeddings', bad);
    assert.equal(r.code, 1, `${bad}: ${r.stdout}`);
    assert.equal(r.stderr, `amalgam: error: --max-position-embeddings must be an integer ≥ 1, got "${bad}"\n`);
    assert.ok(!existsSync(out));
  }
  await rejectsWith(convertToHf(fixture(GGUF), join(dir, 'mpe-api'), { maxPositionEmbeddings: 1.5 }), 'E_USAGE', /maxPositionEmbeddings \(--max-position-embeddings\) must be a positive integer, got 1\.5/);
  const ok = amalgam('convert', fixture(GGUF), join(dir, 'mpe-ok'), '--max-position-embeddings', '64', '--json');
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(JSON.parse(ok.stdout).config.max_position_embeddings, 64);
});

test('demo --seed and --jobs are validated', () => {
  const cases: [string[], string][] = [
    [['--seed', '-1'], '--seed must be an integer ≥ 0, got "-1"'],
    [['--seed', 'abc'], '--seed must be an integer ≥ 0, got "abc"'],
    [['--seed', '0.5'], '--seed must be an integer ≥ 0, got "0.5"'],
    [['--seed', '1e3'], '--seed must be an integer ≥ 0, got "1e3"'],
    [['-j', 'abc'], '--jobs must be an integer ≥ 1, got "abc"'],
    [['-j', '0'], '--jobs must be an integer ≥ 1, got "0"'],
    [['-j', '-3'], '--jobs must be an integer ≥ 1, got "-3"'],
  ];
  for (const [args, message] of cases) {
    const out = join(dir, 'demo-options');
    const r = amalgam('demo', '--out', out, ...args);
    assert.equal(r.code, 1, `${args.join(' ')}: ${r.stdout}`);
    assert.equal(r.stderr, `amalgam: error: ${message}\n`);
    assert.ok(!existsSync(out), `${args.join(' ')} wrote ${out}`);
  }
});

test('runDemo refuses a seed or jobs value that is not a valid integer', async () => {
  await rejectsWith(runDemo(join(dir, 'demo-api'), { seed: 0.5 }), 'E_USAGE', /seed must be an integer >= 0, got 0\.5/);
  await rejectsWith(runDemo(join(dir, 'demo-api'), { jobs: 0 }), 'E_USAGE', /\(jobs\) must be an integer >= 1, got 0/);
  assert.ok(!existsSync(join(dir, 'demo-api')));
});

test('the demo writes into a new, empty or earlier demo folder and refuses anything else', async () => {
  // Unrelated files: refused, left as they are, nothing mixed in.
  const old = join(dir, 'dold');
  await mkdir(old);
  await writeFile(join(old, 'notes.txt'), 'mine');
  await rejectsWith(runDemo(old, { jobs: 1 }), 'E_USAGE', /dold: the folder is not empty and holds files the demo did not write \(notes\.txt\)/);
  assert.deepEqual(await readdir(old), ['notes.txt']);
  assert.equal(await readFile(join(old, 'notes.txt'), 'utf8'), 'mine');

  // A model folder.
  const model = join(dir, 'model');
  await mkdir(model);
  for (const f of ['config.json', 'model.safetensors', 'tokenizer.json']) await writeFile(join(model, f), '{}');
  await rejectsWith(runDemo(model, { jobs: 1 }), 'E_USAGE', /holds files the demo did not write \(config\.json, model\.safetensors, tokenizer\.json\)/);
  assert.deepEqual((await readdir(model)).sort(), ['config.json', 'model.safetensors', 'tokenizer.json']);

  // A folder named like a demo's part but without the demo's configuration.
  const lookalike = join(dir, 'lookalike');
  await mkdir(join(lookalike, 'base'), { recursive: true });
  await writeFile(join(lookalike, 'base', 'config.json'), '{}');
  await rejectsWith(runDemo(lookalike, { jobs: 1 }), 'E_USAGE', /is not an earlier demo's output \(no demo-ties\.yml written by amalgam demo\)/);
  assert.deepEqual(await readdir(join(lookalike, 'base')), ['config.json']);

  // A file, and a path through a file.
  const file = join(dir, 'afile');
  await writeFile(file, 'x');
  await rejectsWith(runDemo(file, { jobs: 1 }), 'E_USAGE', /afile: the demo output path exists and is not a folder/);
  await rejectsWith(runDemo(join(file, 'sub'), { jobs: 1 }), 'E_USAGE', /a part of the demo output path is a file, not a folder/);
  const r = amalgam('demo', '--out', file);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `amalgam: error: ${file}: the demo output path exists and is not a folder (choose a new or empty folder with --out)\n`);
  assert.equal(await readFile(file, 'utf8'), 'x');

  // An interrupted earlier demo (its configuration and a staging leftover) is replaced.
  const interrupted = join(dir, 'interrupted');
  await mkdir(interrupted);
  await writeFile(join(interrupted, 'demo-ties.yml'), DEMO_CONFIG);
  await mkdir(join(interrupted, '.base.partial-123-abcd'));
  const d = await runDemo(interrupted, { jobs: 1 });
  assert.equal(d.merge.plan.models.length, 4);
  assert.ok(existsSync(join(interrupted, 'merged', 'model.safetensors')));

  // An empty folder.
  const empty = join(dir, 'empty-demo');
  await mkdir(empty);
  await runDemo(empty, { jobs: 1 });
  assert.deepEqual((await readdir(empty)).sort(), ['base', 'demo-ties.yml', 'ft-chat', 'ft-code', 'ft-math', 'merged']);
  const help = amalgam('demo', '--help');
  assert.doesNotMatch(help.stdout, /replaced if it exists/);
  assert.match(help.stdout.replace(/\s+/g, ' '), /a new or empty folder, or the folder of an earlier demo \(whose files are replaced\); a folder holding anything else is refused/);
});

test('a temporary folder that cannot be made, and a GGUF file given where a model folder is needed, get one-line errors', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'amalgam-tmpdir-'));
  const saved = process.env['TMPDIR'];
  try {
    const file = join(dir, 'model.gguf');
    await writeFile(file, 'GGUF');
    process.env['TMPDIR'] = join(dir, 'missing');
    await assert.rejects(
      withModelFolder(file, async () => 0),
      /cannot make a temporary folder to convert .*model\.gguf into: .*\(set TMPDIR to a folder that exists and can be written/,
    );
    if (saved === undefined) delete process.env['TMPDIR'];
    else process.env['TMPDIR'] = saved;
    const { bakeAdapter } = await import('../src/lora/apply.js');
    await assert.rejects(bakeAdapter(file, join(dir, 'adapter'), join(dir, 'out')), /model\.gguf: expected a model folder, got a file \(.*amalgam convert .*model\.gguf <folder>\)/);
  } finally {
    if (saved === undefined) delete process.env['TMPDIR'];
    else process.env['TMPDIR'] = saved;
    await rm(dir, { recursive: true, force: true });
  }
});
