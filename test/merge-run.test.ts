/**
 * End-to-end merges of synthetic checkpoints: exact results (linear by hand, TIES through
 * `mergeTensor` on the same inputs, passthrough stacking, tied heads), determinism across jobs
 * and runs, dtype conversion, sharding, the non-weight files, dry runs, failures that leave
 * nothing behind, and the demo.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, cp, mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { parseMergeConfig } from '../src/config/parse.js';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { DEMO_CONFIG, runDemo } from '../src/demo/demo.js';
import { openSafetensors, SafetensorsFile } from '../src/io/safetensors.js';
import type { TensorSource } from '../src/io/source.js';
import { mergeTensor, prepareParams } from '../src/merge/registry.js';
import { runMerge, type RunMergeOptions } from '../src/merge/run.js';
import { tensorRng } from '../src/merge/sparsify.js';
import { f32ToF16, f16ToF32 } from '../src/tensor/dtype.js';
import { REPO_ROOT } from './helpers/fixtures.js';

let dir: string;
const SMALL: SyntheticLlamaOptions = { hiddenSize: 32, intermediateSize: 48, numHeads: 4, numKvHeads: 2, vocabSize: 64, numLayers: 3 };

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-run-'));
  const make = (name: string, o: SyntheticLlamaOptions) => writeSyntheticLlama(join(dir, name), { ...SMALL, ...o });
  await make('base', { seed: 1, dtype: 'BF16' });
  await make('a', { seed: 2, dtype: 'BF16' });
  await make('b', { seed: 3, dtype: 'BF16' });
  await make('f1', { seed: 4, dtype: 'F32' });
  await make('f2', { seed: 5, dtype: 'F32' });
  await make('f3', { seed: 6, dtype: 'F32' });
  await make('tied', { seed: 7, dtype: 'F32', tieWordEmbeddings: true });
  await writeFile(join(dir, 'base', 'tokenizer.json'), '{"version": "1.0", "model": {}}\n');
  await writeFile(join(dir, 'base', 'tokenizer_config.json'), '{"model_max_length": 512}\n');
  await writeFile(join(dir, 'base', 'special_tokens_map.json'), '{}\n');
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function merge(yaml: string, out: string, opts: RunMergeOptions = {}) {
  return runMerge(parseMergeConfig(yaml), join(dir, out), { baseDir: dir, configYaml: yaml, ...opts });
}

async function withSources<T>(paths: string[], fn: (s: TensorSource[]) => Promise<T>): Promise<T> {
  const sources = await Promise.all(paths.map((p) => openSafetensors(p)));
  try {
    return await fn(sources);
  } finally {
    await Promise.all(sources.map((s) => s.close()));
  }
}

async function listFiles(d: string): Promise<string[]> {
  return (await readdir(d)).sort();
}

/**
 * The two folders hold the same files with the same bytes, except that `amalgam_config.yml`,
 * which records the folders the models were read from, may name `xModels` where `y`'s names
 * `yModels`.
 */
async function sameFolders(x: string, y: string, models?: { x: string; y: string }): Promise<void> {
  const fx = await listFiles(x);
  assert.deepEqual(fx, await listFiles(y));
  for (const f of fx) {
    if (models && f === 'amalgam_config.yml') {
      assert.equal((await readFile(join(x, f), 'utf8')).replaceAll(models.x, models.y), await readFile(join(y, f), 'utf8'));
      continue;
    }
    assert.ok((await readFile(join(x, f))).equals(await readFile(join(y, f))), `${f} differs`);
  }
}

test('linear with weights equals the hand-computed weighted average, bit for bit in F32', async () => {
  const yaml = 'merge_method: linear\nmodels:\n  - {model: f1, parameters: {weight: 0.5}}\n  - {model: f2, parameters: {weight: 0.3}}\n  - {model: f3, parameters: {weight: [0.1, 0.4]}}\n';
  const r = await merge(yaml, 'linear', { jobs: 2 });
  assert.equal(r.execution!.tensors, 1 + 3 * 9 + 2);
  await withSources([join(dir, 'f1'), join(dir, 'f2'), join(dir, 'f3'), r.outDir], async ([x1, x2, x3, out]) => {
    for (const info of out!.tensors()) {
      assert.equal(info.dtype, 'F32');
      const layer = /layers\.(\d+)\./.exec(info.name);
      const w3 = layer ? 0.1 + 0.3 * (Number(layer[1]) / 2) : 0.1;
      const w = [0.5, 0.3, w3];
      const xs = [await x1!.readF32(info.name), await x2!.readF32(info.name), await x3!.readF32(info.name)];
      const got = await out!.readF32(info.name);
      const sum = w[0]! + w[1]! + w[2]!;
      for (let i = 0; i < got.length; i++) {
        let acc = 0;
        for (let k = 0; k < 3; k++) acc += w[k]! * xs[k]![i]!;
        const want = Math.fround(acc / sum);
        if (got[i] !== want) assert.fail(`${info.name}[${i}]: ${got[i]} != ${want}`);
      }
    }
  });
});

test('ties output equals mergeTensor on the same inputs', async () => {
  const yaml =
    'merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1.0, density: 0.4}}\n  - {model: b, parameters: {weight: 0.6, density: [0.8, 0.3]}}\nout_dtype: float32\n';
  const r = await merge(yaml, 'ties', { jobs: 2 });
  await withSources([join(dir, 'base'), join(dir, 'a'), join(dir, 'b'), r.outDir], async ([base, a, b, out]) => {
    let checked = 0;
    for (const info of out!.tensors()) {
      const layer = /layers\.(\d+)\./.exec(info.name);
      const t = layer ? Number(layer[1]) / 2 : 0;
      const vctx = { tensorName: info.name, models: ['a', 'b', 'base'], base: 'base' };
      const params = prepareParams('ties', vctx, { perModel: { a: { weight: 1.0, density: 0.4 }, b: { weight: 0.6, density: 0.8 - 0.5 * t } } });
      const inputs = [
        { model: 'a', data: await a!.readF32(info.name), shape: info.shape },
        { model: 'b', data: await b!.readF32(info.name), shape: info.shape },
        { model: 'base', data: await base!.readF32(info.name), shape: info.shape },
      ];
      const want = mergeTensor('ties', { tensorName: info.name, isEmbed: false, inputs, base: 'base', params })!;
      const got = await out!.readF32(info.name);
      assert.deepEqual(Buffer.from(got.buffer, got.byteOffset, got.byteLength), Buffer.from(want.data.buffer, want.data.byteOffset, want.data.byteLength), info.name);
      checked++;
    }
    assert.equal(checked, 30);
  });
});

test('results are byte-identical across jobs and repeated runs (dare_ties with a seed)', async () => {
  const yaml =
    'merge_method: dare_ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1.0, density: 0.5}}\n  - {model: b, parameters: {weight: 0.5, density: 0.7}}\ndtype: bfloat16\n';
  const r1 = await merge(yaml, 'det1/out', { jobs: 1, randomSeed: 42 });
  const r2 = await merge(yaml, 'det2/out', { jobs: 2, randomSeed: 42 });
  const r3 = await merge(yaml, 'det3/out', { jobs: 2, randomSeed: 42, memoryBudget: 1 });
  await sameFolders(r1.outDir, r2.outDir);
  await sameFolders(r1.outDir, r3.outDir);
  assert.equal(r3.execution!.peakInFlightBytes <= r3.plan.stats.memoryBound, true);
  const r4 = await merge(yaml, 'det4/out', { jobs: 2, randomSeed: 43 });
  const w1 = await readFile(join(r1.outDir, 'model.safetensors'));
  assert.ok(!w1.equals(await readFile(join(r4.outDir, 'model.safetensors'))), 'another seed gives other masks');
  // The per-tensor stream: reproduce one tensor's masks from the seed and its name.
  await withSources([join(dir, 'base'), join(dir, 'a'), join(dir, 'b'), r1.outDir], async ([base, a, b, out]) => {
    const name = 'model.layers.1.mlp.down_proj.weight';
    const info = out!.info(name);
    const params = prepareParams('dare_ties', { tensorName: name, models: ['a', 'b', 'base'], base: 'base' }, {
      perModel: { a: { weight: 1.0, density: 0.5 }, b: { weight: 0.5, density: 0.7 } },
    });
    const inputs = [
      { model: 'a', data: await a!.readF32(name), shape: info.shape },
      { model: 'b', data: await b!.readF32(name), shape: info.shape },
      { model: 'base', data: await base!.readF32(name), shape: info.shape },
    ];
    const want = mergeTensor('dare_ties', { tensorName: name, isEmbed: false, inputs, base: 'base', params, rng: tensorRng(42, name) })!;
    const got = await out!.readF32(name);
    // Written as bfloat16: compare after the same rounding.
    const wantBf16 = new Float32Array(want.data.length);
    for (let i = 0; i < want.data.length; i++) {
      const u = new Uint32Array(new Float32Array([want.data[i]!]).buffer)[0]!;
      const r = ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) << 16;
      wantBf16[i] = new Float32Array(new Uint32Array([r >>> 0]).buffer)[0]!;
    }
    assert.deepEqual(got, wantBf16);
  });
});

test('out_dtype converts on save; config.json carries dtype and torch_dtype', async () => {
  const yaml = 'merge_method: linear\nmodels:\n  - {model: f1, parameters: {weight: 1}}\n  - {model: f2, parameters: {weight: 1}}\nout_dtype: float16\n';
  const r16 = await merge(yaml, 'f16');
  const r32 = await merge(yaml.replace('float16', 'float32'), 'f32');
  const cfg = JSON.parse(await readFile(join(r16.outDir, 'config.json'), 'utf8'));
  assert.equal(cfg.dtype, 'float16');
  assert.equal(cfg.torch_dtype, 'float16');
  await withSources([r16.outDir, r32.outDir], async ([h, f]) => {
    for (const info of h!.tensors()) {
      assert.equal(info.dtype, 'F16');
      const full = await f!.readF32(info.name);
      assert.deepEqual(await h!.readF32(info.name), f16ToF32(f32ToF16(full)));
    }
  });
});

test('sharding: shards, index and weight map; the same values as one file', async () => {
  const yaml = 'merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1, density: 0.5}}\n';
  const one = await merge(yaml, 'shard1');
  const many = await merge(yaml, 'shardN', { outShardSize: 8_000 });
  const files = await listFiles(many.outDir);
  const shards = files.filter((f) => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f));
  assert.ok(shards.length > 3, `${shards.length} shards`);
  assert.ok(shards.every((f) => f.endsWith(`-of-${String(shards.length).padStart(5, '0')}.safetensors`)));
  assert.ok(!files.includes('model.safetensors'));
  const index = JSON.parse(await readFile(join(many.outDir, 'model.safetensors.index.json'), 'utf8'));
  assert.equal(index.metadata.total_size, many.plan.stats.writeBytes);
  assert.equal(typeof index.metadata.amalgam_version, 'string');
  assert.deepEqual(Object.keys(index.weight_map).sort(), many.plan.tensors.map((t) => t.name).sort());
  for (const s of shards) {
    const f = await SafetensorsFile.open(join(many.outDir, s));
    assert.deepEqual({ ...f.metadata }, { format: 'pt' });
    assert.ok(f.size - 8 <= 8_000 + 4096 || f.tensors().length === 1, `${s} is over the limit`);
    await f.close();
  }
  await withSources([one.outDir, many.outDir], async ([x, y]) => {
    for (const info of x!.tensors()) assert.deepEqual(await y!.readRaw(info.name), await x!.readRaw(info.name));
  });
  assert.ok(many.execution!.weightFiles.includes('model.safetensors.index.json'));
});

test('passthrough stacking copies the right layers and sets the layer count', async () => {
  const yaml = 'merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n  - sources: [{model: b, layer_range: [1, 3], parameters: {scale: [{filter: o_proj, value: 0}, {value: 1}]}}]\n';
  const r = await merge(yaml, 'stack');
  const cfg = JSON.parse(await readFile(join(r.outDir, 'config.json'), 'utf8'));
  assert.equal(cfg.num_hidden_layers, 4);
  await withSources([join(dir, 'a'), join(dir, 'b'), r.outDir], async ([a, b, out]) => {
    assert.deepEqual(await out!.readRaw('model.layers.1.mlp.up_proj.weight'), await a!.readRaw('model.layers.1.mlp.up_proj.weight'));
    assert.deepEqual(await out!.readRaw('model.layers.2.mlp.up_proj.weight'), await b!.readRaw('model.layers.1.mlp.up_proj.weight'));
    assert.deepEqual(await out!.readRaw('model.layers.3.self_attn.q_proj.weight'), await b!.readRaw('model.layers.2.self_attn.q_proj.weight'));
    assert.ok((await out!.readF32('model.layers.3.self_attn.o_proj.weight')).every((v) => v === 0), 'scale 0 zeroes o_proj');
    assert.deepEqual(await out!.readRaw('model.embed_tokens.weight'), await a!.readRaw('model.embed_tokens.weight'));
    assert.deepEqual(await out!.readRaw('lm_head.weight'), await b!.readRaw('lm_head.weight'));
  });
});

test('a tied model contributes its embedding to the merged head', async () => {
  const r = await merge('merge_method: linear\nmodels:\n  - {model: tied, parameters: {weight: 1}}\n  - {model: f1, parameters: {weight: 1}}\n', 'tiedhead');
  const cfg = JSON.parse(await readFile(join(r.outDir, 'config.json'), 'utf8'));
  assert.equal(cfg.tie_word_embeddings, false);
  await withSources([join(dir, 'tied'), join(dir, 'f1'), r.outDir], async ([t, f, out]) => {
    const e = await t!.readF32('model.embed_tokens.weight');
    const h = await f!.readF32('lm_head.weight');
    const got = await out!.readF32('lm_head.weight');
    for (let i = 0; i < got.length; i++) assert.equal(got[i], Math.fround((e[i]! + h[i]!) / 2));
  });
});

test('model card, configuration copies and tokenizer files', async () => {
  const yaml = '# my merge\nmerge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 0.5}\n  - model: b\n    parameters: {weight: 1, density: 0.5}\n';
  const r = await merge(yaml, 'card');
  const files = await listFiles(r.outDir);
  assert.deepEqual(files, [
    'README.md',
    'amalgam_config.yml',
    'config.json',
    'mergekit_config.yml',
    'model.safetensors',
    'special_tokens_map.json',
    'tokenizer.json',
    'tokenizer_config.json',
  ]);
  assert.equal(await readFile(join(r.outDir, 'mergekit_config.yml'), 'utf8'), yaml);
  const own = await readFile(join(r.outDir, 'amalgam_config.yml'), 'utf8');
  assert.ok(own.endsWith(yaml), own);
  assert.deepEqual(parseYaml(own), parseYaml(yaml));
  assert.match(own, /^# Merged by amalgam .* with:\n#   models read from:\n#     base: .*\/base\n#     a: .*\/a\n#     b: .*\/b\n# my merge\n/);
  assert.equal(await readFile(join(r.outDir, 'tokenizer.json'), 'utf8'), await readFile(join(dir, 'base', 'tokenizer.json'), 'utf8'));
  const card = await readFile(join(r.outDir, 'README.md'), 'utf8');
  const m = /^---\n([\s\S]*?)\n---\n/.exec(card);
  assert.ok(m, 'front matter');
  const front = parseYaml(m[1]!);
  assert.deepEqual(front.tags, ['merge', 'mergekit', 'amalgam']);
  assert.deepEqual(front.base_model, []);
  assert.equal(front.library_name, 'transformers');
  assert.match(card, /^# card$/m);
  assert.match(card, /\[TIES\]\(https:\/\/arxiv\.org\/abs\/2306\.01708\) merge method using `base` as a base/);
  assert.match(card, /^\* `a`$/m);
  assert.match(card, /^\* `b`$/m);
  assert.ok(card.includes('```yaml\n' + yaml + '```'));
  const cfg = JSON.parse(await readFile(join(r.outDir, 'config.json'), 'utf8'));
  const baseCfg = JSON.parse(await readFile(join(dir, 'base', 'config.json'), 'utf8'));
  assert.deepEqual(cfg, baseCfg);

  const noTok = await merge(yaml, 'card2', { copyTokenizer: false, writeModelCard: false });
  assert.deepEqual(await listFiles(noTok.outDir), ['amalgam_config.yml', 'config.json', 'mergekit_config.yml', 'model.safetensors']);
});

test('an existing output is refused unless overwrite; a failure mid-merge leaves nothing', async () => {
  const yaml = 'merge_method: linear\nmodels:\n  - {model: f1, parameters: {weight: 1}}\n  - {model: f2, parameters: {weight: 1}}\n';
  const r = await merge(yaml, 'exists');
  await assert.rejects(merge(yaml, 'exists'), /output folder exists and is not empty.*--overwrite/);
  const again = await merge(yaml, 'exists', { overwrite: true });
  assert.equal(again.outDir, r.outDir);

  let reads = 0;
  const failing = async (p: string): Promise<TensorSource> => {
    const s = await openSafetensors(p);
    // Every read goes through the source (no file locations), and the 12th fails.
    return new Proxy(s, {
      get(target, prop) {
        if (prop === 'locate') return () => undefined;
        if (prop === 'readF32' || prop === 'readRaw' || prop === 'readRawInto') {
          const read = (Reflect.get(target, prop, target) as (...a: unknown[]) => Promise<unknown>).bind(target);
          return async (...args: unknown[]) => {
            if (++reads === 12) throw new Error('disk on fire');
            return read(...args);
          };
        }
        const v = Reflect.get(target, prop, target) as unknown;
        return typeof v === 'function' ? v.bind(target) : v;
      },
    });
  };
  await mkdir(join(dir, 'failing'), { recursive: true });
  await assert.rejects(merge(yaml, 'failing/out', { openSource: failing, jobs: 2 }), /disk on fire/);
  assert.deepEqual(await readdir(join(dir, 'failing')), [], 'no output and no staging folder');

  const ac = new AbortController();
  await assert.rejects(
    merge(yaml, 'failing/out', { signal: ac.signal, onProgress: (p) => p.done === 3 && ac.abort() }),
    /interrupted/,
  );
  assert.deepEqual(await readdir(join(dir, 'failing')), []);
});

test('an output folder that is, holds or links to an input is refused, even with overwrite', async () => {
  const yaml = (m: string) => `merge_method: linear\nmodels:\n  - {model: ${m}, parameters: {weight: 1}}\n  - {model: f2, parameters: {weight: 1}}\n`;
  // The output folder holds an input model.
  await mkdir(join(dir, 'holder'), { recursive: true });
  await cp(join(dir, 'f1'), join(dir, 'holder', 'm1'), { recursive: true });
  await writeFile(join(dir, 'holder', 'notes.txt'), 'keep\n');
  for (const dryRun of [false, true]) {
    await assert.rejects(merge(yaml('holder/m1'), 'holder', { overwrite: true, dryRun }), /output folder holds the input .*holder\/m1.*writing it would delete/);
  }
  assert.deepEqual((await readdir(join(dir, 'holder'))).sort(), ['m1', 'notes.txt']);
  assert.ok(existsSync(join(dir, 'holder', 'm1', 'model.safetensors')));
  // The input reached through a symbolic link, the output named by the real folder.
  await cp(join(dir, 'f1'), join(dir, 'real1'), { recursive: true });
  await symlink(join(dir, 'real1'), join(dir, 'link1'));
  await assert.rejects(merge(yaml('link1'), 'real1', { overwrite: true }), /output folder is the input/);
  assert.ok(existsSync(join(dir, 'real1', 'model.safetensors')));
  // A sibling whose name starts the same is not held by the output.
  const ok = await merge(yaml('holder/m1'), 'hold', { overwrite: true });
  assert.ok(existsSync(join(ok.outDir, 'model.safetensors')));
});

test('tokenizer files copied from a read-only model folder are writable in the output', async () => {
  await cp(join(dir, 'base'), join(dir, 'ro-base'), { recursive: true });
  await chmod(join(dir, 'ro-base', 'tokenizer_config.json'), 0o444);
  const yaml = 'merge_method: linear\nmodels:\n  - {model: ro-base, parameters: {weight: 1}}\n  - {model: a, parameters: {weight: 1}}\n';
  const r = await merge(yaml, 'ro-out');
  const mode = (await stat(join(r.outDir, 'tokenizer_config.json'))).mode;
  assert.equal(mode & 0o200, 0o200, `mode ${(mode & 0o777).toString(8)}`);
  assert.equal(await readFile(join(r.outDir, 'tokenizer_config.json'), 'utf8'), await readFile(join(dir, 'ro-base', 'tokenizer_config.json'), 'utf8'));
});

test('stacking layers whose shapes differ from the output config fails before reading, unless allow-crimes', async () => {
  // Same width, other key/value head count: k_proj and v_proj are [32, 32] here, [16, 32] in base.
  await writeSyntheticLlama(join(dir, 'kv4'), { ...SMALL, numKvHeads: 4, seed: 8, dtype: 'BF16' });
  const yaml =
    'merge_method: passthrough\nslices:\n  - sources: [{model: base, layer_range: [0, 2]}]\n  - sources: [{model: kv4, layer_range: [2, 3]}]\n';
  let reads = 0;
  const counting = async (p: string): Promise<TensorSource> => {
    const s = await openSafetensors(p);
    return new Proxy(s, {
      get(target, prop) {
        const v = Reflect.get(target, prop, target) as unknown;
        if (typeof v === 'function' && String(prop).startsWith('read')) {
          return (...a: unknown[]) => {
            reads++;
            return (v as (...x: unknown[]) => unknown).apply(target, a);
          };
        }
        return typeof v === 'function' ? v.bind(target) : v;
      },
    });
  };
  for (const dryRun of [true, false]) {
    await assert.rejects(
      merge(yaml, 'stacked', { dryRun, openSource: counting }),
      /2 output tensors do not have the shape the output config.json \(from base\) implies, e.g. 'model.layers.2.self_attn.k_proj.weight' from kv4 is \[32, 32\], the config implies \[16, 32\]/,
    );
  }
  assert.equal(reads, 0);
  assert.ok(!existsSync(join(dir, 'stacked')));
  const warnings: string[] = [];
  const r = await merge(yaml, 'stacked', { allowCrimes: true, onWarning: (w) => warnings.push(w) });
  assert.ok(warnings.some((w) => /do not have the shape the output config.json/.test(w)), warnings.join('\n'));
  assert.ok(existsSync(join(r.outDir, 'model.safetensors')));
});

test('the model card of a randomized merge records its random seed', async () => {
  const yaml = 'merge_method: dare_ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1, density: 0.5}}\n  - {model: b, parameters: {weight: 1, density: 0.5}}\n';
  const r = await merge(yaml, 'dare-card', { randomSeed: 7 });
  const card = await readFile(join(r.outDir, 'README.md'), 'utf8');
  assert.match(card, /drawn with random seed 7 \(`amalgam merge --random-seed 7` reproduces this model\)/);
  assert.match(await readFile(join(r.outDir, 'amalgam_config.yml'), 'utf8'), /^#   random seed: 7 \(amalgam merge --random-seed 7\)$/m);
  const plain = await merge('merge_method: linear\nmodels:\n  - {model: f1, parameters: {weight: 1}}\n  - {model: f2, parameters: {weight: 1}}\n', 'linear-card', { randomSeed: 7 });
  assert.doesNotMatch(await readFile(join(plain.outDir, 'README.md'), 'utf8'), /random seed/);
});

test('float16 outputs that overflow are reported in one warning naming the tensors', async () => {
  const yaml = 'merge_method: task_arithmetic\nbase_model: f1\nmodels:\n  - {model: f2, parameters: {weight: 1}}\nparameters: {lambda: 1.0e+6}\nout_dtype: float16\n';
  const warnings: string[] = [];
  const r = await merge(yaml, 'f16-overflow', { onWarning: (w) => warnings.push(w) });
  const overflow = warnings.filter((w) => /float16/.test(w));
  assert.equal(overflow.length, 1, warnings.join('\n'));
  const m = /^(\d+) tensors hold ±inf or NaN in float16, whose largest finite magnitude is 65504: model\.embed_tokens\.weight \((\d+) of (\d+)\), .* and \d+ more; write bfloat16 or float32 \(out_dtype\) to keep them finite$/.exec(overflow[0]!);
  assert.ok(m, overflow[0]);
  assert.ok(Number(m[1]) > 5);
  assert.deepEqual(r.execution!.warnings.filter((w) => /float16/.test(w)), overflow);
  // The count is the number of values written that are not finite.
  await withSources([r.outDir], async ([out]) => {
    const data = await out!.readF32('model.embed_tokens.weight');
    assert.equal(data.length, Number(m[3]));
    assert.equal(data.filter((x) => !Number.isFinite(x)).length, Number(m[2]));
  });
  const fine = await merge(yaml.replace('1.0e+6', '0.5'), 'f16-fine');
  assert.ok(!fine.execution!.warnings.some((w) => /float16/.test(w)));
});

test('--dry-run prints the plan and writes nothing', () => {
  const cfg = join(dir, 'dry.yml');
  return writeFile(cfg, 'merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1, density: 0.5}}\n').then(async () => {
    await mkdir(join(dir, 'dry'), { recursive: true });
    const out = join(dir, 'dry', 'out');
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'merge', cfg, out, '--dry-run', '--model-dir', dir], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
    });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /Dry run/);
    assert.match(r.stdout, /method: +ties \(TIES\), base model base/);
    assert.match(r.stdout, /tensors: +30 /);
    assert.match(r.stdout, /output: +llama, 3 layers/);
    assert.match(r.stdout, /model\.layers\.0\.mlp\.gate_proj\.weight \(t=0\): normalize=true .* a: weight=1 density=0\.5/);
    assert.match(r.stdout, /read\/write: .* read, .* written in 1 shard/);
    assert.deepEqual(await readdir(join(dir, 'dry')), []);
    const j = spawnSync(process.execPath, ['--import', 'tsx', join(REPO_ROOT, 'src/cli/main.ts'), 'merge', cfg, out, '--dry-run', '--json', '--model-dir', dir], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
    });
    assert.equal(j.status, 0, j.stderr);
    assert.equal(JSON.parse(j.stdout).tensors.length, 30);
    assert.deepEqual(await readdir(join(dir, 'dry')), []);
  });
});

test('the demo merges its generated models deterministically, with the bundled config', async () => {
  assert.equal(await readFile(join(REPO_ROOT, 'examples', 'demo-ties.yml'), 'utf8'), DEMO_CONFIG);
  const d1 = await runDemo(join(dir, 'demo1'), { jobs: 1 });
  const d2 = await runDemo(join(dir, 'demo2'), { jobs: 2 });
  await sameFolders(d1.output, d2.output, { x: d1.dir, y: d2.dir });
  assert.equal(d1.merge.plan.method, 'ties');
  assert.equal(d1.merge.plan.models.length, 4);
  assert.equal(d1.report.architecture?.numLayers, 4);
  assert.ok(existsSync(join(d1.dir, 'base', 'model.safetensors.index.json')));
  for (const c of d1.analysis.cosines) assert.ok(c.cosine > 0.2, `${c.model}: ${c.cosine}`);
  assert.ok(d1.analysis.sharedCosine > 0.2);
});
