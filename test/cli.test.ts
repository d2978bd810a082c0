import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, existsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { REPO_ROOT, fixture, haveFixtures } from './helpers/fixtures.js';
import { writeSyntheticLlama } from '../src/demo/synthetic.js';

function amalgam(...args: string[]) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), ...args], {
    cwd: REPO_ROOT,
    encoding: 'utf8',
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('demo generates models, merges them with TIES and inspects the result', () => {
  const dir = mkdtempSync(join(tmpdir(), 'amalgam-cli-'));
  try {
    const r = amalgam('demo', '--out', dir);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /Merged 4 models with ties/);
    assert.match(r.stdout, /architecture: {2}llama, 4 layers/);
    assert.match(r.stdout, /parameters: {4}217,664/);
    assert.ok(existsSync(join(dir, 'base', 'model.safetensors.index.json')));
    assert.ok(existsSync(join(dir, 'merged', 'model.safetensors')));
    // Running it again replaces its own output.
    assert.equal(amalgam('demo', '--out', dir).code, 0);
    assert.deepEqual(readdirSync(dir).sort(), ['base', 'demo-ties.yml', 'ft-chat', 'ft-code', 'ft-math', 'merged']);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('inspect --json reports architecture, tensors and parameter counts', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'amalgam-cli-'));
  try {
    const model = join(dir, 'm');
    await writeSyntheticLlama(model, { numLayers: 2, hiddenSize: 32, intermediateSize: 48, numHeads: 4, numKvHeads: 2, vocabSize: 64, dtype: 'F16', tieWordEmbeddings: true });
    const r = amalgam('inspect', model, '--json');
    assert.equal(r.code, 0, r.stderr);
    const rep = JSON.parse(r.stdout);
    assert.equal(rep.kind, 'hf-model');
    assert.deepEqual(rep.architecture, { name: 'llama', inferred: false, numLayers: 2 });
    // embed 64*32 + 2 layers * (2*32 + 32*32*2 + 2*16*32 + 3*48*32) + norm 32
    const expected = 64 * 32 + 2 * (2 * 32 + 2 * 32 * 32 + 2 * 16 * 32 + 3 * 48 * 32) + 32;
    assert.equal(rep.parameters.total, expected);
    assert.deepEqual(rep.parameters.byDtype, { F16: expected });
    assert.equal(rep.tensors.length, 1 + 2 * 9 + 1);
    assert.equal(rep.tensors[1].name, 'model.layers.0.input_layernorm.weight');
    assert.ok(rep.notes.some((n: string) => n.includes('lm_head.weight')), 'tied lm_head is reported');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a reader that closes the pipe early stops the command quietly', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'amalgam-cli-'));
  try {
    // Forty layers make a dry-run plan far larger than a pipe holds.
    for (const [name, seed] of [['a', 1], ['b', 2]] as const) {
      await writeSyntheticLlama(join(dir, name), { numLayers: 40, hiddenSize: 16, intermediateSize: 24, numHeads: 2, numKvHeads: 1, vocabSize: 32, dtype: 'F32', seed });
    }
    writeFileSync(join(dir, 'c.yml'), `merge_method: linear\nmodels:\n  - {model: ${join(dir, 'a')}, parameters: {weight: 1}}\n  - {model: ${join(dir, 'b')}, parameters: {weight: 1}}\n`);
    const cli = join(REPO_ROOT, 'src/cli/main.ts');
    const r = spawnSync('bash', ['-c', `"${process.execPath}" --import tsx "${cli}" merge "${join(dir, 'c.yml')}" "${join(dir, 'out')}" --dry-run --json | head -c 10; echo " status \${PIPESTATUS[0]}"`], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
      env: { ...process.env, NODE_OPTIONS: '' },
    });
    assert.match(r.stdout, /^\{\n {2}"form.* status 0\n$/s);
    assert.doesNotMatch(r.stderr, /EPIPE|Error/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('merge --json prints the merge report as JSON; a GGUF given as a model gets the convert hint', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'amalgam-cli-'));
  try {
    for (const [name, seed] of [['a', 1], ['b', 2]] as const) {
      await writeSyntheticLlama(join(dir, name), { numLayers: 2, hiddenSize: 16, intermediateSize: 24, numHeads: 2, numKvHeads: 1, vocabSize: 32, dtype: 'F32', seed });
    }
    const cfg = join(dir, 'c.yml');
    writeFileSync(cfg, `merge_method: linear\nmodels:\n  - {model: ${join(dir, 'a')}, parameters: {weight: 1}}\n  - {model: ${join(dir, 'b')}, parameters: {weight: 1}}\n`);
    const r = amalgam('merge', cfg, join(dir, 'out'), '--json');
    assert.equal(r.code, 0, r.stderr);
    const rep = JSON.parse(r.stdout);
    assert.equal(rep.outDir, join(dir, 'out'));
    assert.equal(rep.method, 'linear');
    assert.equal(rep.tensors, 2 * 9 + 3);
    assert.equal(rep.execution.tensors, 2 * 9 + 3);
    assert.ok(existsSync(join(dir, 'out', 'model.safetensors')));
    writeFileSync(join(dir, 'm.gguf'), 'GGUF');
    writeFileSync(cfg, `merge_method: linear\nmodels:\n  - {model: ${join(dir, 'm.gguf')}, parameters: {weight: 1}}\n  - {model: ${join(dir, 'b')}, parameters: {weight: 1}}\n`);
    const g = amalgam('merge', cfg, join(dir, 'out2'));
    assert.equal(g.code, 1);
    assert.match(g.stderr, /expected a model folder, got a file.*amalgam convert .*m\.gguf <folder>/s);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('errors name the file and exit with status 1, without a stack trace', () => {
  const r = amalgam('inspect', join(REPO_ROOT, 'no-such-model'));
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^amalgam: error: .*no-such-model: no such file or folder/);
  assert.doesNotMatch(r.stderr, /\n\s+at /);
  for (const bad of ['-1', 'abc']) {
    const l = amalgam('inspect', join(REPO_ROOT, 'no-such-model'), '--limit', bad);
    assert.equal(l.code, 1);
    assert.match(l.stderr, new RegExp(`^amalgam: error: --limit must be an integer ≥ 0, got "${bad}"`));
  }
});

test('convert + inspect on the stories260K fixtures', (t) => {
  if (!haveFixtures(t, 'models/stories260K/stories260K.bin', 'models/stories260K/tok512.bin')) return;
  const dir = mkdtempSync(join(tmpdir(), 'amalgam-cli-'));
  try {
    const out = join(dir, 'hf');
    const r = amalgam('convert', fixture('models/stories260K/stories260K.bin'), out);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /5 layers, hidden 64, ffn 172, heads 8\/4/);
    assert.deepEqual(readdirSync(out).sort(), ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    // Refuses to overwrite a non-empty folder, and leaves it intact.
    const again = amalgam('convert', fixture('models/stories260K/stories260K.bin'), out);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /not empty/);
    const rep = JSON.parse(amalgam('inspect', out, '--json').stdout);
    assert.equal(rep.architecture.numLayers, 5);
    assert.equal(rep.tensors.length, 48);
    const bin = JSON.parse(amalgam('inspect', fixture('models/stories260K/stories260K.bin'), '--json').stdout);
    assert.equal(bin.kind, 'llama2c');
    assert.equal(bin.parameters.total, 260032);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
