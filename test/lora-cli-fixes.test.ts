/**
 * `amalgam lora` option and input checks: merge parameters of `combine -m svd` are validated up
 * front (names, the methods that read `density`, its range), zero merged updates are reported as
 * such, `extract` writes the rank it used, `--embeddings full` wins over `--no-save-full`, adapters
 * of different task types are not combined, and adapters holding factors their `target_modules`
 * does not select are refused.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { REPO_ROOT } from './helpers/fixtures.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { AmalgamError } from '../src/errors.js';
import { readPeftAdapter } from '../src/io/peft.js';
import { openSafetensors } from '../src/io/safetensors.js';
import { bakeAdapter, checkAdapterForModel } from '../src/lora/apply.js';
import { combineAdapters, writeLoraAdapter, type AdapterModuleFactors } from '../src/lora/combine.js';
import { extractLora } from '../src/lora/extract.js';
import { writePeftAdapter, type LoraFactors } from '../src/lora/peft-write.js';
import { Rng } from '../src/tensor/rng.js';

const SMALL: SyntheticLlamaOptions = { hiddenSize: 32, intermediateSize: 48, numHeads: 4, numKvHeads: 2, vocabSize: 64, numLayers: 2 };
const H = 32;
const Q = 'model.layers.0.self_attn.q_proj';
const K = 'model.layers.0.self_attn.k_proj';
const DOWN = 'model.layers.1.mlp.down_proj';
let dir: string;

function factors(path: string, kind: 'linear' | 'embedding', rank: number, inF: number, outF: number, seed: number): AdapterModuleFactors {
  const rng = new Rng(seed);
  return { path, kind, rank, inFeatures: inF, outFeatures: outF, a: rng.fillNormal(new Float32Array(rank * inF), 0.2), b: rng.fillNormal(new Float32Array(outF * rank), 0.2) };
}

const linear = (path: string, rank: number, inF: number, outF: number, seed: number): LoraFactors => {
  const { kind: _kind, ...f } = factors(path, 'linear', rank, inF, outF, seed);
  return f;
};

function amalgam(...args: string[]) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'lora', ...args], { cwd: REPO_ROOT, encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

async function rejectsWith(p: Promise<unknown>, code: string, re: RegExp): Promise<AmalgamError> {
  let err: unknown;
  await assert.rejects(p, (e) => ((err = e), true));
  assert.ok(err instanceof AmalgamError, String(err));
  assert.equal(err.code, code, err.message);
  assert.match(err.message, re);
  return err;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-lora-fixes-'));
  await writeSyntheticLlama(join(dir, 'base'), { ...SMALL, seed: 1, dtype: 'F32' });
  // k_proj is [16, 32] (2 kv heads of 8): at most rank 16; the other matrices allow 32.
  const truth = [
    factors(Q, 'linear', 4, H, H, 1),
    factors(K, 'linear', 4, H, 16, 2),
    factors(DOWN, 'linear', 4, 48, H, 3),
    factors('model.embed_tokens', 'embedding', 4, 64, H, 4),
  ];
  const norm = new Rng(5).fillNormal(new Float32Array(H), 0.1, 1);
  await writeLoraAdapter(join(dir, 'truth'), truth, [{ name: 'model.norm.weight', shape: [H], data: norm }], { r: 4, alpha: 8 });
  await bakeAdapter(join(dir, 'base'), join(dir, 'truth'), join(dir, 'ft'));
  await writePeftAdapter(join(dir, 'a1'), [linear(Q, 2, H, H, 11), linear(DOWN, 2, 48, H, 12)], [], { r: 2, alpha: 4 });
  await writePeftAdapter(join(dir, 'a2'), [linear(Q, 2, H, H, 13), linear(DOWN, 2, 48, H, 14)], [], { r: 2, alpha: 2 });
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('combine -m svd: misspelled --param names and --density with task_arithmetic are errors', async () => {
  const a1 = join(dir, 'a1');
  const a2 = join(dir, 'a2');
  let r = amalgam('combine', join(dir, 'p1'), a1, a2, '-m', 'svd', '--param', 'lamda=0.1');
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /--param lamda: unknown parameter `lamda` for merge method `task_arithmetic` \(did you mean `lambda`\?\)/);
  r = amalgam('combine', join(dir, 'p1'), a1, a2, '-m', 'svd', '--merge-method', 'ties', '--param', 'densty=0.5');
  assert.match(r.stderr, /--param densty: unknown parameter `densty` for merge method `ties` \(did you mean `density`\?\)/);
  r = amalgam('combine', join(dir, 'p1'), a1, a2, '-m', 'svd', '--density', '0.5');
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /--density: merge method task_arithmetic does not read `density` \(density is read by ties, dare_ties and dare_linear\)/);
  r = amalgam('combine', join(dir, 'p1'), a1, a2, '-m', 'svd', '--param', 'weight=2');
  assert.match(r.stderr, /--param weight: the weight of each adapter is given per adapter/);
  assert.ok(!existsSync(join(dir, 'p1')));
  // The library checks the same before reading any adapter (these folders do not exist).
  const missing = [{ dir: join(dir, 'nope1') }, { dir: join(dir, 'nope2') }];
  await rejectsWith(combineAdapters(missing, join(dir, 'p2'), { method: 'svd', mergeParams: { lamda: 0.1 } }), 'E_CONFIG', /merge parameter lamda: unknown parameter `lamda`/);
  await rejectsWith(combineAdapters(missing, join(dir, 'p2'), { method: 'svd', mergeParams: { density: 0.5 } }), 'E_USAGE', /merge parameter density: merge method task_arithmetic does not read `density`/);
  await rejectsWith(
    combineAdapters([{ dir: a1, params: { lambda: 2 } }, { dir: a2 }], join(dir, 'p2'), { method: 'svd', mergeMethod: 'ties' }),
    'E_USAGE',
    /parameter lambda of adapter 1 .*: `lambda` is a global parameter of ties/,
  );
  await rejectsWith(combineAdapters(missing, join(dir, 'p2'), { method: 'cat', mergeParams: { lambda: 2 } }), 'E_USAGE', /merge parameters apply to method 'svd' only/);
});

test('combine: --density out of [0, 1] is refused up front, naming --density', async () => {
  const r = amalgam('combine', join(dir, 'd1'), join(dir, 'a1'), join(dir, 'a2'), '-m', 'svd', '--merge-method', 'ties', '--density', '1.5');
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /--density must be a number in \[0, 1\] \(the fraction of each update kept\), got "1\.5"/);
  assert.doesNotMatch(r.stderr, /\.delta|adapter1/);
  const p = amalgam('combine', join(dir, 'd1'), join(dir, 'a1'), join(dir, 'a2'), '-m', 'svd', '--merge-method', 'ties', '--param', 'density=-0.5');
  assert.match(p.stderr, /--param density: density must be in \[0, 1\] \(the fraction of each update kept\), got -0\.5/);
  await rejectsWith(
    combineAdapters([{ dir: join(dir, 'nope1') }, { dir: join(dir, 'nope2') }], join(dir, 'd2'), { method: 'svd', mergeMethod: 'dare_ties', mergeParams: { density: 1.5 } }),
    'E_USAGE',
    /^merge parameter density: density must be in \[0, 1\]/,
  );
  assert.ok(!existsSync(join(dir, 'd1')) && !existsSync(join(dir, 'd2')));
});

test('combine: density 0 reports zero merged updates instead of 100% energy kept', async () => {
  const warnings: string[] = [];
  const res = await combineAdapters([{ dir: join(dir, 'a1') }, { dir: join(dir, 'a2') }], join(dir, 'z1'), {
    method: 'svd',
    mergeMethod: 'dare_ties',
    mergeParams: { density: 0 },
    onWarning: (m) => warnings.push(m),
  });
  assert.deepEqual(
    res.modules.map((m) => [m.path, m.zeroUpdate]),
    [
      [Q, true],
      [DOWN, true],
    ],
  );
  assert.deepEqual(warnings, ['every merged update is zero (density 0 keeps no element of any update): the combined adapter changes nothing']);
  const ad = await readPeftAdapter(join(dir, 'z1'));
  try {
    for (const m of ad.modules) assert.ok((await ad.source.readF32(m.bName)).every((v) => v === 0), m.path);
  } finally {
    await ad.close();
  }
  // A density that keeps something gives no zero update.
  const half = await combineAdapters([{ dir: join(dir, 'a1') }, { dir: join(dir, 'a2') }], join(dir, 'z2'), { method: 'svd', mergeMethod: 'dare_ties', mergeParams: { density: 0.5 } });
  assert.deepEqual(
    half.modules.map((m) => m.zeroUpdate),
    [undefined, undefined],
  );
  const r = amalgam('combine', join(dir, 'z3'), join(dir, 'a1'), join(dir, 'a2'), '-m', 'svd', '--merge-method', 'dare_ties', '--density', '0');
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /energy kept: none, every merged update is zero \(the adapter changes nothing\)/);
  assert.match(r.stdout, new RegExp(`${Q.replace(/\./g, '\\.')}\\s+rank\\s+2\\s+zero`));
  assert.doesNotMatch(r.stdout, /100\.0000%/);
  assert.match(r.stderr, /warning: every merged update is zero/);
});

test('extract: a rank above every matrix is clamped, and r / lora_alpha are the largest rank used', async () => {
  const res = await extractLora(join(dir, 'base'), join(dir, 'ft'), join(dir, 'x1'), { rank: 1000 });
  assert.equal(res.rank, 32);
  assert.equal(res.requestedRank, 1000);
  assert.deepEqual(Object.fromEntries(res.tensors.filter((t) => t.rank !== undefined).map((t) => [t.name, t.rank])), {
    'model.embed_tokens.weight': 32,
    [`${Q}.weight`]: 32,
    [`${K}.weight`]: 16,
    [`${DOWN}.weight`]: 32,
  });
  const ad = await readPeftAdapter(join(dir, 'x1'));
  try {
    assert.equal(ad.config.r, 32);
    assert.equal(ad.config.lora_alpha, 32);
    assert.deepEqual(ad.config.rank_pattern, { 'model.layers.0.self_attn.k_proj': 16 });
    assert.deepEqual(ad.config.alpha_pattern, { 'model.layers.0.self_attn.k_proj': 16 });
    assert.deepEqual(
      ad.modules.map((m) => m.scaling),
      ad.modules.map(() => 1),
    );
  } finally {
    await ad.close();
  }
  const r = amalgam('extract', join(dir, 'base'), join(dir, 'ft'), join(dir, 'x2'), '-r', '1000');
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^Extracted a rank-32 LoRA adapter/);
  assert.match(r.stdout, /\n {2}rank: {4}--rank 1000 clamped to 32, the largest min\(rows, cols\) of the factorised matrices\n/);
  const small = amalgam('extract', join(dir, 'base'), join(dir, 'ft'), join(dir, 'x3'), '-r', '8');
  assert.match(small.stdout, /^Extracted a rank-8 LoRA adapter/);
  assert.doesNotMatch(small.stdout, /clamped/);
});

test('extract: --embeddings full saves the embedding even with --no-save-full', async () => {
  const res = await extractLora(join(dir, 'base'), join(dir, 'ft'), join(dir, 'e1'), { rank: 4, embeddings: 'full', saveFull: false });
  const kinds = Object.fromEntries(res.tensors.filter((t) => t.kind !== 'identical').map((t) => [t.name, t.kind]));
  assert.deepEqual(kinds, { 'model.embed_tokens.weight': 'full', [`${Q}.weight`]: 'lora', [`${K}.weight`]: 'lora', [`${DOWN}.weight`]: 'lora', 'model.norm.weight': 'skipped' });
  assert.equal(res.fullTensors, 1);
  assert.deepEqual(res.config['modules_to_save'], ['model.embed_tokens']);
  const ft = await openSafetensors(join(dir, 'ft'));
  const ad = await readPeftAdapter(join(dir, 'e1'));
  try {
    assert.deepEqual(
      ad.savedModules.map((s) => s.target),
      ['model.embed_tokens.weight'],
    );
    assert.deepEqual(await ad.source.readF32(ad.savedModules[0]!.name), await ft.readF32('model.embed_tokens.weight'));
  } finally {
    await Promise.all([ad.close(), ft.close()]);
  }
  // --embeddings skip still skips them when other tensors are saved in full.
  const skip = await extractLora(join(dir, 'base'), join(dir, 'ft'), join(dir, 'e2'), { rank: 4, embeddings: 'skip' });
  assert.deepEqual(
    skip.tensors.filter((t) => t.kind === 'full' || t.kind === 'skipped').map((t) => [t.name, t.kind, t.reason]),
    [
      ['model.embed_tokens.weight', 'skipped', 'embeddings: skip'],
      ['model.norm.weight', 'full', undefined],
    ],
  );
  const r = amalgam('extract', join(dir, 'base'), join(dir, 'ft'), join(dir, 'e3'), '-r', '4', '--embeddings', 'full', '--no-save-full');
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /3 factorised, 1 saved in full/);
  assert.match(r.stdout, /model\.embed_tokens\.weight\s+full\s/);
  assert.doesNotMatch(r.stderr, /embed_tokens/);
});

test('combine: adapters of different task types are refused, naming both', async () => {
  await writePeftAdapter(join(dir, 'cls'), [linear(Q, 2, H, H, 21)], [{ name: 'score.weight', shape: [3, H], data: new Float32Array(3 * H).fill(0.5) }], {
    r: 2,
    alpha: 2,
    taskType: 'SEQ_CLS',
  });
  const e = await rejectsWith(
    combineAdapters([{ dir: join(dir, 'a1') }, { dir: join(dir, 'cls') }], join(dir, 't1'), { method: 'cat' }),
    'E_CONFIG',
    new RegExp(`task_type CAUSAL_LM in ${join(dir, 'a1')} but SEQ_CLS in ${join(dir, 'cls')}`),
  );
  assert.equal(e.key, 'task_type');
  assert.equal(e.file, join(dir, 'cls', 'adapter_config.json'));
  const r = amalgam('combine', join(dir, 't2'), join(dir, 'a1'), join(dir, 'cls'), '-m', 'svd');
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /the adapters are for different tasks: task_type CAUSAL_LM in .*a1 but SEQ_CLS in .*cls/);
  assert.ok(!existsSync(join(dir, 't1')) && !existsSync(join(dir, 't2')));
});

test('merge: factors of modules that target_modules does not select are refused (PEFT rules)', async () => {
  const mods = () => [linear(Q, 2, H, H, 31), linear(DOWN, 2, 48, H, 32)];
  const write = (name: string, extra: Record<string, unknown>) => writePeftAdapter(join(dir, name), mods(), [], { r: 2, alpha: 2, extraConfig: extra });
  await write('tq', { target_modules: ['q_proj'] });
  const e = await rejectsWith(
    bakeAdapter(join(dir, 'base'), join(dir, 'tq'), join(dir, 'm1')),
    'E_CONFIG',
    /'base_model\.model\.model\.layers\.1\.mlp\.down_proj\.lora_A\.weight': the adapter holds LoRA factors for model\.layers\.1\.mlp\.down_proj, but target_modules \["q_proj"\] does not select it \(/,
  );
  assert.equal(e.file, join(dir, 'tq', 'adapter_model.safetensors'));
  assert.equal(e.key, `base_model.model.${DOWN}.lora_A.weight`);
  assert.match(e.hint ?? '', /add it to target_modules in .*tq\/adapter_config\.json/);
  assert.ok(!existsSync(join(dir, 'm1')));
  // A string is a regex matched against the whole module path.
  await write('tre-part', { target_modules: 'q_proj|down_proj' });
  await rejectsWith(bakeAdapter(join(dir, 'base'), join(dir, 'tre-part'), join(dir, 'm2')), 'E_CONFIG', /factors for model\.layers\.0\.self_attn\.q_proj, but target_modules "q_proj\|down_proj"/);
  await write('tre', { target_modules: '.*\\.(q_proj|down_proj)' });
  await write('tall', { target_modules: 'all-linear' });
  await write('tex', { target_modules: ['q_proj', 'down_proj'], exclude_modules: ['down_proj'] });
  const base = await openSafetensors(join(dir, 'base'));
  try {
    assert.deepEqual(await checkAdapterForModel(base, join(dir, 'tre')), { loraModules: 2, replaced: 0 });
    assert.deepEqual(await checkAdapterForModel(base, join(dir, 'tall')), { loraModules: 2, replaced: 0 });
    await rejectsWith(checkAdapterForModel(base, join(dir, 'tex')), 'E_CONFIG', /down_proj, but exclude_modules \["down_proj"\] excludes it/);
  } finally {
    await base.close();
  }
  const r = amalgam('merge', join(dir, 'base'), join(dir, 'tq'), join(dir, 'm3'));
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /tq\/adapter_model\.safetensors.*down_proj, but target_modules \["q_proj"\] does not select it/);
  // combine refuses it too: its output would target the module.
  await rejectsWith(combineAdapters([{ dir: join(dir, 'tq') }, { dir: join(dir, 'a1') }], join(dir, 'm4'), { method: 'cat' }), 'E_CONFIG', /target_modules \["q_proj"\] does not select it/);
});
