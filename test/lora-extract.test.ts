/**
 * LoRA extraction: an exact rank-r difference is recovered (relative error ≤ 1e-4) by the exact
 * and the randomised SVD, energy figures match the singular values, embeddings and 1-D tensors
 * are handled, and the `amalgam lora` commands run end to end.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { pathToFileURL } from 'node:url';
import { REPO_ROOT } from './helpers/fixtures.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { readPeftAdapter } from '../src/io/peft.js';
import { openSafetensors } from '../src/io/safetensors.js';
import type { TensorSource } from '../src/io/source.js';
import { bakeAdapter } from '../src/lora/apply.js';
import { writeLoraAdapter, type AdapterModuleFactors } from '../src/lora/combine.js';
import { extractLora } from '../src/lora/extract.js';
import { svd } from '../src/tensor/linalg.js';
import { Rng } from '../src/tensor/rng.js';

const SMALL: SyntheticLlamaOptions = { hiddenSize: 32, intermediateSize: 48, numHeads: 4, numKvHeads: 2, vocabSize: 64, numLayers: 2 };
const H = 32;
let dir: string;

function factors(path: string, kind: 'linear' | 'embedding', rank: number, inF: number, outF: number, seed: number): AdapterModuleFactors {
  const rng = new Rng(seed);
  return { path, kind, rank, inFeatures: inF, outFeatures: outF, a: rng.fillNormal(new Float32Array(rank * inF), 0.2), b: rng.fillNormal(new Float32Array(outF * rank), 0.2) };
}

const R = 4;
const truth = [
  factors('model.layers.0.self_attn.q_proj', 'linear', R, H, H, 1),
  factors('model.layers.1.mlp.up_proj', 'linear', R, H, 48, 2),
  factors('model.layers.1.mlp.down_proj', 'linear', R, 48, H, 3),
  factors('model.embed_tokens', 'embedding', R, 64, H, 4),
];
const normRng = new Rng(5);
const newNorm = normRng.fillNormal(new Float32Array(H), 0.1, 1);

function sub(a: Float32Array, b: Float32Array): Float64Array {
  return Float64Array.from(a, (v, i) => v - b[i]!);
}

function relErr(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let d = 0;
  let n = 0;
  for (let i = 0; i < want.length; i++) {
    d += (got[i]! - want[i]!) ** 2;
    n += want[i]! ** 2;
  }
  return Math.sqrt(d / n);
}

/** s·B·A in the base tensor's layout (transposed for embeddings). */
function delta(m: { rank: number; inFeatures: number; outFeatures: number; a: Float32Array; b: Float32Array }, s: number, transposed: boolean): Float64Array {
  const out = new Float64Array(m.inFeatures * m.outFeatures);
  for (let o = 0; o < m.outFeatures; o++)
    for (let i = 0; i < m.inFeatures; i++) {
      let acc = 0;
      for (let k = 0; k < m.rank; k++) acc += m.b[o * m.rank + k]! * m.a[k * m.inFeatures + i]!;
      out[transposed ? i * m.outFeatures + o : o * m.inFeatures + i] = s * acc;
    }
  return out;
}

async function withSources<T>(paths: string[], fn: (s: TensorSource[]) => Promise<T>): Promise<T> {
  const s = await Promise.all(paths.map((p) => openSafetensors(p)));
  try {
    return await fn(s);
  } finally {
    await Promise.all(s.map((x) => x.close()));
  }
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-lora-extract-'));
  await writeSyntheticLlama(join(dir, 'base'), { ...SMALL, seed: 1, dtype: 'F32' });
  await writeLoraAdapter(join(dir, 'truth'), truth, [{ name: 'model.norm.weight', shape: [H], data: newNorm }], { r: R, alpha: 8 });
  await bakeAdapter(join(dir, 'base'), join(dir, 'truth'), join(dir, 'ft'));
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function checkRecovered(out: string, randomized: boolean) {
  const r = await extractLora(join(dir, 'base'), join(dir, 'ft'), out, { rank: R, ...(randomized ? { randomizedAbove: 8, seed: 3 } : {}) });
  const factored = r.tensors.filter((t) => t.kind === 'lora' || t.kind === 'embedding');
  assert.deepEqual(factored.map((t) => t.name).sort(), truth.map((t) => `${t.path}.weight`).sort());
  assert.deepEqual(
    r.tensors.filter((t) => t.kind === 'full').map((t) => t.name),
    ['model.norm.weight'],
  );
  assert.equal(r.tensors.filter((t) => t.kind === 'identical').length, r.tensors.length - 5);
  for (const t of factored) {
    assert.equal(t.rank, R);
    assert.equal(t.randomized, randomized);
    assert.ok(t.energy! > 1 - 1e-6 && t.energy! <= 1, `${t.name}: ${t.energy}`);
  }
  const ad = await readPeftAdapter(out);
  try {
    assert.equal(ad.config.r, R);
    assert.equal(ad.config.lora_alpha, R);
    await withSources([join(dir, 'base'), join(dir, 'ft')], async ([base, ft]) => {
      for (const m of ad.modules) {
        assert.equal(m.scaling, 1);
        const got = delta({ ...m, a: await ad.source.readF32(m.aName), b: await ad.source.readF32(m.bName) }, 1, m.kind === 'embedding');
        const stored = sub(await ft!.readF32(m.target), await base!.readF32(m.target));
        const t = truth.find((x) => x.path === m.path)!;
        assert.equal(m.kind, t.kind);
        const exact = delta(t, 2, t.kind === 'embedding');
        const e1 = relErr(got, stored);
        const e2 = relErr(got, exact);
        assert.ok(e1 <= 1e-4 && e2 <= 1e-4, `${m.path}: ${e1}, ${e2}`);
      }
    });
    assert.deepEqual(await ad.source.readF32('base_model.model.model.norm.weight'), newNorm);
  } finally {
    await ad.close();
  }
  return r;
}

test('extracting an exact rank-r difference recovers it (exact SVD)', async () => {
  await checkRecovered(join(dir, 'ex'), false);
  // Baking the extracted adapter gives back the fine-tune, to float32 rounding.
  await bakeAdapter(join(dir, 'base'), join(dir, 'ex'), join(dir, 'ft-again'));
  await withSources([join(dir, 'base'), join(dir, 'ft'), join(dir, 'ft-again')], async ([base, ft, again]) => {
    for (const t of truth) {
      const name = `${t.path}.weight`;
      const b = await base!.readF32(name);
      const e = relErr(sub(await again!.readF32(name), b), sub(await ft!.readF32(name), b));
      assert.ok(e <= 1e-4, `${name}: ${e}`);
    }
  });
});

test('extracting an exact rank-r difference recovers it (randomised SVD)', async () => {
  await checkRecovered(join(dir, 'ex-rand'), true);
});

test('lower ranks report the energy captured, Σ top-k σ² / Σ σ²', async () => {
  const r = await extractLora(join(dir, 'base'), join(dir, 'ft'), join(dir, 'ex-2'), { rank: 2, saveFull: false, embeddings: 'skip' });
  assert.equal(r.fullTensors, 0);
  assert.deepEqual(
    r.tensors.filter((t) => t.kind === 'skipped').map((t) => t.name).sort(),
    ['model.embed_tokens.weight', 'model.norm.weight'],
  );
  assert.equal(r.warnings.length, 2);
  await withSources([join(dir, 'base'), join(dir, 'ft')], async ([base, ft]) => {
    for (const t of r.tensors.filter((x) => x.kind === 'lora')) {
      const [m, n] = t.shape as [number, number];
      const d = Float64Array.from(sub(await ft!.readF32(t.name), await base!.readF32(t.name)), (v) => Math.fround(v));
      const s = svd(d, m, n).S;
      let top = 0;
      let all = 0;
      s.forEach((x, j) => {
        all += x * x;
        if (j < 2) top += x * x;
      });
      assert.equal(t.rank, 2);
      assert.ok(Math.abs(t.energy! - top / all) < 1e-9, `${t.name}: ${t.energy} vs ${top / all}`);
      assert.ok(t.energy! < 0.99);
    }
  });
});

test('identical models have nothing to extract', async () => {
  await assert.rejects(extractLora(join(dir, 'base'), join(dir, 'base'), join(dir, 'none'), { rank: 2 }), /nothing to extract/);
  assert.ok(!existsSync(join(dir, 'none')));
});

test('amalgam lora merge | combine | extract run end to end', async () => {
  // A child process, so that the commands' output does not mix with the test reporter's.
  const script = [
    `import { Command } from 'commander';`,
    `import { registerLora } from ${JSON.stringify(pathToFileURL(join(REPO_ROOT, 'src/cli/lora.ts')).href)};`,
    `const program = new Command();`,
    `registerLora(program);`,
    `await program.parseAsync(['lora', ...JSON.parse(process.env.AMALGAM_TEST_ARGS)], { from: 'user' });`,
  ].join('\n');
  const run = async (...args: string[]) => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
      env: { ...process.env, AMALGAM_TEST_ARGS: JSON.stringify(args) },
    });
    assert.equal(r.status, 0, r.stderr);
    return r.stdout;
  };
  let text = await run('extract', join(dir, 'base'), join(dir, 'ft'), join(dir, 'cli-ex'), '--rank', '4');
  assert.match(text, /Extracted a rank-4 LoRA adapter/);
  assert.match(text, /4 factorised, 1 saved in full/);
  assert.match(text, /model\.layers\.1\.mlp\.up_proj\.weight\s+lora\s+4\s+100\.0000%/);
  text = await run('merge', join(dir, 'base'), join(dir, 'cli-ex'), join(dir, 'cli-baked'));
  assert.match(text, /4 updated with W \+ s·B·A, 1 replaced from modules_to_save/);
  text = await run('combine', join(dir, 'cli-comb'), join(dir, 'cli-ex'), join(dir, 'truth'), '--method', 'svd', '--weights', '0.5,0.5', '--rank', '2');
  assert.match(text, /Combined 2 adapter\(s\) with svd \(task_arithmetic\)/);
  assert.match(text, /energy kept: mean/);
  text = await run('combine', join(dir, 'cli-cat'), join(dir, 'cli-ex'), join(dir, 'truth'), '--json');
  assert.equal(JSON.parse(text).method, 'cat');
});
