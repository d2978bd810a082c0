/**
 * PEFT adapters as inputs: write → read round trip, baking W + s·B·A (linear, fan_in_fan_out,
 * embedding, modules_to_save), validation against the base model, and `model+adapter` references
 * in merge configurations (equal to baking first).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import { parseMergeConfig } from '../src/config/parse.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { openModelFolder, type OpenModelFolderOptions } from '../src/io/hf.js';
import { readPeftAdapter } from '../src/io/peft.js';
import { openSafetensors } from '../src/io/safetensors.js';
import type { TensorSource } from '../src/io/source.js';
import { AdaptedTensorSource, bakeAdapter } from '../src/lora/apply.js';
import { writeLoraAdapter, type AdapterModuleFactors } from '../src/lora/combine.js';
import { writePeftAdapter, type LoraFactors } from '../src/lora/peft-write.js';
import { planMerge } from '../src/merge/plan.js';
import { runMerge } from '../src/merge/run.js';
import { Rng } from '../src/tensor/rng.js';

const SMALL: SyntheticLlamaOptions = { hiddenSize: 32, intermediateSize: 48, numHeads: 4, numKvHeads: 2, vocabSize: 64, numLayers: 2 };
const H = 32;
const I = 48;
let dir: string;

function factors(path: string, rank: number, inF: number, outF: number, seed: number): LoraFactors {
  const rng = new Rng(seed);
  return { path, rank, inFeatures: inF, outFeatures: outF, a: rng.fillNormal(new Float32Array(rank * inF), 0.3), b: rng.fillNormal(new Float32Array(outF * rank), 0.3) };
}

/** fround(W + s·Σₖ B[o,k]·A[k,i]), written out independently; `transposed` stores [in, out]. */
function expectedBake(w: Float32Array, f: LoraFactors, s: number, transposed: boolean): Float32Array {
  const out = new Float32Array(w.length);
  for (let o = 0; o < f.outFeatures; o++) {
    for (let i = 0; i < f.inFeatures; i++) {
      let acc = 0;
      for (let k = 0; k < f.rank; k++) acc += f.b[o * f.rank + k]! * f.a[k * f.inFeatures + i]!;
      const idx = transposed ? i * f.outFeatures + o : o * f.inFeatures + i;
      out[idx] = w[idx]! + s * acc;
    }
  }
  return out;
}

async function withSource<T>(path: string, fn: (s: TensorSource) => Promise<T>): Promise<T> {
  const s = await openSafetensors(path);
  try {
    return await fn(s);
  } finally {
    await s.close();
  }
}

const Q = 'model.layers.0.self_attn.q_proj';
const V = 'model.layers.1.self_attn.v_proj';
const DOWN = 'model.layers.0.mlp.down_proj';
const mods = () => [factors(Q, 4, H, H, 11), factors(V, 4, H, 16, 12), factors(DOWN, 2, I, H, 13)];
const norm = () => {
  const rng = new Rng(99);
  return { name: 'model.norm.weight', shape: [H], data: rng.fillNormal(new Float32Array(H), 1, 1) };
};

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-lora-apply-'));
  await writeSyntheticLlama(join(dir, 'base'), { ...SMALL, seed: 1, dtype: 'F32' });
  await writeSyntheticLlama(join(dir, 'ft'), { ...SMALL, seed: 2, dtype: 'F32' });
  await writeSyntheticLlama(join(dir, 'base16'), { ...SMALL, seed: 3, dtype: 'BF16' });
  // r = 4, α = 16: s = 4 (rank-2 module: rank_pattern, s = 8).
  await writePeftAdapter(join(dir, 'ad'), mods(), [norm()], { r: 4, alpha: 16, baseModel: 'toy/base' });
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('PEFT round trip: writePeftAdapter → readPeftAdapter is bit-exact', async () => {
  const ad = await readPeftAdapter(join(dir, 'ad'));
  try {
    const want = mods().sort((x, y) => (x.path < y.path ? -1 : 1));
    assert.deepEqual(
      ad.modules.map((m) => [m.path, m.kind, m.rank, m.inFeatures, m.outFeatures, m.scaling]),
      want.map((m) => [m.path, 'linear', m.rank, m.inFeatures, m.outFeatures, 16 / m.rank]),
    );
    for (const [k, m] of ad.modules.entries()) {
      const a = await ad.source.readF32(m.aName);
      const b = await ad.source.readF32(m.bName);
      assert.deepEqual(new Uint32Array(a.slice().buffer), new Uint32Array(want[k]!.a.buffer));
      assert.deepEqual(new Uint32Array(b.slice().buffer), new Uint32Array(want[k]!.b.buffer));
    }
    assert.deepEqual(ad.savedModules, [{ name: 'base_model.model.model.norm.weight', target: 'model.norm.weight', kind: 'modules_to_save' }]);
    assert.deepEqual(await ad.source.readF32(ad.savedModules[0]!.name), norm().data);
    assert.deepEqual(ad.config.rank_pattern, { 'model.layers.0.mlp.down_proj': 2 });
  } finally {
    await ad.close();
  }
  // Embedding modules written by writeLoraAdapter read back as embedding modules.
  const emb: AdapterModuleFactors = { ...factors('model.embed_tokens', 3, 64, H, 21), kind: 'embedding' };
  await writeLoraAdapter(join(dir, 'ad-emb-rt'), [emb], [], { r: 3, alpha: 6 });
  const ad2 = await readPeftAdapter(join(dir, 'ad-emb-rt'));
  try {
    const m = ad2.modules[0]!;
    assert.equal(m.kind, 'embedding');
    assert.equal(m.aName, 'base_model.model.model.embed_tokens.lora_embedding_A');
    assert.deepEqual(m.deltaShape, [64, H]);
    assert.equal(m.scaling, 2);
    assert.deepEqual(await ad2.source.readF32(m.aName), emb.a);
    assert.deepEqual(await ad2.source.readF32(m.bName), emb.b);
  } finally {
    await ad2.close();
  }
});

test('baking equals W + s·B·A per tensor; modules_to_save replace; the rest is copied', async () => {
  const out = join(dir, 'baked');
  const progress: string[] = [];
  const r = await bakeAdapter(join(dir, 'base'), join(dir, 'ad'), out, { onProgress: (p) => progress.push(`${p.action}:${p.tensor}`) });
  assert.equal(r.loraModules, 3);
  assert.equal(r.replaced, 1);
  assert.equal(r.tensors, progress.length);
  assert.ok(existsSync(join(out, 'config.json')));
  assert.deepEqual(JSON.parse(await readFile(join(out, 'config.json'), 'utf8')), JSON.parse(await readFile(join(dir, 'base', 'config.json'), 'utf8')));
  await withSource(join(dir, 'base'), (base) =>
    withSource(out, async (baked) => {
      assert.deepEqual(baked.tensors(), base.tensors());
      const want = mods();
      for (const f of want) {
        const w = await base.readF32(`${f.path}.weight`);
        const got = await baked.readF32(`${f.path}.weight`);
        assert.deepEqual(got, expectedBake(w, f, 16 / f.rank, false), f.path);
        // and against float64 arithmetic, to float32 rounding
        let maxRel = 0;
        for (let i = 0; i < got.length; i++) maxRel = Math.max(maxRel, Math.abs(got[i]! - expectedBake(w, f, 16 / f.rank, false)[i]!) / (Math.abs(got[i]!) + 1e-30));
        assert.ok(maxRel < 1e-6);
      }
      assert.deepEqual(await baked.readF32('model.norm.weight'), norm().data);
      for (const name of ['model.embed_tokens.weight', 'lm_head.weight', 'model.layers.1.self_attn.q_proj.weight']) {
        assert.deepEqual(await baked.readRaw(name), await base.readRaw(name), name);
      }
    }),
  );
});

test('fan_in_fan_out and embedding adapters are applied transposed', async () => {
  // A square q_proj is stored [in, out] for the purpose of the test.
  const fq = factors(Q, 2, H, H, 31);
  await writePeftAdapter(join(dir, 'ad-fifo'), [fq], [], { r: 2, alpha: 2, extraConfig: { fan_in_fan_out: true } });
  const emb: AdapterModuleFactors = { ...factors('model.embed_tokens', 3, 64, H, 32), kind: 'embedding' };
  await writeLoraAdapter(join(dir, 'ad-emb'), [emb], [], { r: 3, alpha: 6 });
  await bakeAdapter(join(dir, 'base'), join(dir, 'ad-fifo'), join(dir, 'baked-fifo'));
  await bakeAdapter(join(dir, 'base'), join(dir, 'ad-emb'), join(dir, 'baked-emb'));
  await withSource(join(dir, 'base'), async (base) => {
    await withSource(join(dir, 'baked-fifo'), async (b) => {
      assert.deepEqual(await b.readF32(`${Q}.weight`), expectedBake(await base.readF32(`${Q}.weight`), fq, 1, true));
    });
    await withSource(join(dir, 'baked-emb'), async (b) => {
      assert.deepEqual(await b.readF32('model.embed_tokens.weight'), expectedBake(await base.readF32('model.embed_tokens.weight'), emb, 2, true));
    });
  });
});

test('adapters that do not fit the base are refused before any data is read, naming the tensor', async () => {
  const refuse = async (name: string, f: LoraFactors[], extra: Record<string, unknown> = {}) => {
    await writePeftAdapter(join(dir, name), f, [], { r: f[0]!.rank, alpha: 1, extraConfig: extra });
    const e = await bakeAdapter(join(dir, 'base'), join(dir, name), join(dir, `${name}-out`)).then(
      () => assert.fail('expected an error'),
      (e: unknown) => e as AmalgamError,
    );
    assert.ok(e instanceof AmalgamError);
    assert.ok(!existsSync(join(dir, `${name}-out`)));
    return e;
  };
  let e = await refuse('bad-missing', [factors('model.layers.7.self_attn.q_proj', 2, H, H, 1)]);
  assert.equal(e.code, 'E_MISSING');
  assert.match(e.message, /targets model\.layers\.7\.self_attn\.q_proj\.weight, which the base model .* does not have/);
  e = await refuse('bad-shape', [factors(DOWN, 2, H, H, 1)]);
  assert.equal(e.code, 'E_SHAPE');
  assert.match(e.message, /down_proj\.weight has shape \[32, ?48\]/);
  assert.equal(e.key, `base_model.model.${DOWN}.lora_A.weight`);
  e = await refuse('bad-fifo', [factors(DOWN, 2, I, H, 1)], { fan_in_fan_out: true });
  assert.match(e.message, /transposed: check fan_in_fan_out/);
});

test('model+adapter in a merge YAML equals baking first (F32 and BF16 bases)', async () => {
  await bakeAdapter(join(dir, 'base16'), join(dir, 'ad'), join(dir, 'baked16'));
  for (const [base, baked] of [
    ['base', 'baked'],
    ['base16', 'baked16'],
  ] as const) {
    const yaml = (m: string) => `merge_method: task_arithmetic\nbase_model: ${base}\nmodels:\n  - model: ${m}\n    parameters: {weight: 0.7}\n  - model: ft\n    parameters: {weight: 0.4}\n`;
    const lazy = await runMerge(parseMergeConfig(yaml(`${base}+ad`)), join(dir, `m-lazy-${base}`), { baseDir: dir, jobs: 1 });
    await runMerge(parseMergeConfig(yaml(baked)), join(dir, `m-baked-${base}`), { baseDir: dir, jobs: 1 });
    assert.equal(lazy.plan.models.find((m) => m.id === `${base}+ad`)?.adapter, join(dir, 'ad'));
    // No cache folder: only the two merge outputs were added.
    assert.ok(!(await readdir(dir)).some((f) => f.includes('cache')));
    await withSource(join(dir, `m-lazy-${base}`), (a) =>
      withSource(join(dir, `m-baked-${base}`), async (b) => {
        assert.deepEqual(a.tensors(), b.tensors());
        for (const t of a.tensors()) assert.deepEqual(await a.readRaw(t.name), await b.readRaw(t.name), t.name);
      }),
    );
  }
  // Worker threads give the same bytes.
  const yaml = `merge_method: ties\nbase_model: base\nmodels:\n  - model: base+ad\n    parameters: {weight: 1, density: 0.5}\n  - model: ft\n    parameters: {weight: 1, density: 0.5}\n`;
  await runMerge(parseMergeConfig(yaml), join(dir, 'ties-1'), { baseDir: dir, jobs: 1 });
  await runMerge(parseMergeConfig(yaml), join(dir, 'ties-3'), { baseDir: dir, jobs: 3 });
  await withSource(join(dir, 'ties-1'), (a) =>
    withSource(join(dir, 'ties-3'), async (b) => {
      for (const t of a.tensors()) assert.deepEqual(await a.readRaw(t.name), await b.readRaw(t.name), t.name);
    }),
  );
});

test('model+adapter errors come from planning, before any tensor data is read', async () => {
  await writePeftAdapter(join(dir, 'ad-wrong'), [factors(DOWN, 2, H, H, 1)], [], { r: 2, alpha: 2 });
  let reads = 0;
  const openModel = async (d: string, o: OpenModelFolderOptions) => {
    const f = await openModelFolder(d, o);
    const src = f.source;
    const orig = src.readF32.bind(src);
    src.readF32 = async (n: string) => {
      reads++;
      return orig(n);
    };
    return f;
  };
  const yaml = 'merge_method: linear\nmodels:\n  - model: base+ad-wrong\n    parameters: {weight: 1}\n  - model: ft\n    parameters: {weight: 1}\n';
  await assert.rejects(planMerge(parseMergeConfig(yaml), { baseDir: dir, openModel }), (e: AmalgamError) => e.code === 'E_SHAPE' && /down_proj/.test(e.message));
  await assert.rejects(
    planMerge(parseMergeConfig(yaml.replace('ad-wrong', 'no-such-adapter')), { baseDir: dir, openModel }),
    (e: AmalgamError) => e.code === 'E_IO' && /LoRA adapter folder .* does not exist/.test(e.message),
  );
  await assert.rejects(
    planMerge(parseMergeConfig(yaml.replace('ad-wrong', 'ad@v2')), { baseDir: dir, openModel }),
    (e: AmalgamError) => e.code === 'E_UNSUPPORTED' && /adapter revision/.test(e.message),
  );
  assert.equal(reads, 0);
});

test('AdaptedTensorSource: raw bytes, float32 values and locations agree', async () => {
  const src = await AdaptedTensorSource.open(await openSafetensors(join(dir, 'base16')), join(dir, 'ad'));
  try {
    const name = `${Q}.weight`;
    assert.equal(src.locate(name), undefined);
    assert.notEqual(src.locate('model.layers.1.self_attn.q_proj.weight'), undefined);
    const raw = await src.readRaw(name);
    const into = new Uint8Array(raw.length);
    await src.readRawInto(name, into);
    assert.deepEqual(into, raw);
    const f = await src.readF32(name);
    const back = new Uint16Array(raw.buffer, raw.byteOffset, raw.length / 2);
    for (let i = 0; i < f.length; i++) assert.equal(new Uint32Array(new Float32Array([f[i]!]).buffer)[0]! >>> 16, back[i], `element ${i}`);
  } finally {
    await src.close();
  }
});
