import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readPeftAdapter } from '../src/io/peft.js';
import { loraTensorName, writePeftAdapter, type LoraFactors } from '../src/lora/peft-write.js';
import { AmalgamError } from '../src/errors.js';
import { Rng } from '../src/tensor/rng.js';

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'amalgam-peftw-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

function factors(path: string, rank: number, inF: number, outF: number, seed: number): LoraFactors {
  const rng = new Rng(seed);
  return { path, rank, inFeatures: inF, outFeatures: outF, a: rng.fillNormal(new Float32Array(rank * inF)), b: rng.fillNormal(new Float32Array(outF * rank)) };
}

test('round trip through readPeftAdapter: names, ranks, scaling, modules_to_save head', async () => {
  const mods = [factors('model.layers.0.self_attn.q_proj', 8, 64, 64, 1), factors('model.layers.0.self_attn.v_proj', 8, 64, 32, 2), factors('model.layers.1.self_attn.q_proj', 4, 64, 64, 3)];
  const score = { name: 'score.weight', shape: [3, 64], data: new Rng(9).fillNormal(new Float32Array(192)) };
  const dir = join(root, 'a1');
  const w = await writePeftAdapter(dir, mods, [score], { r: 8, alpha: 16, taskType: 'SEQ_CLS', baseModel: 'stories260K' });
  assert.equal(w.config['target_modules'] instanceof Array, true);
  assert.deepEqual(w.config['target_modules'], ['q_proj', 'v_proj']);
  assert.deepEqual(w.config['modules_to_save'], ['score']);

  const ad = await readPeftAdapter(dir);
  try {
    assert.equal(ad.modules.length, 3);
    const byPath = new Map(ad.modules.map((m) => [m.path, m]));
    const q0 = byPath.get('model.layers.0.self_attn.q_proj')!;
    assert.equal(q0.aName, 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight');
    assert.equal(q0.rank, 8);
    assert.equal(q0.scaling, 2);
    assert.deepEqual(q0.deltaShape, [64, 64]);
    const v0 = byPath.get('model.layers.0.self_attn.v_proj')!;
    assert.deepEqual([v0.inFeatures, v0.outFeatures], [64, 32]);
    const q1 = byPath.get('model.layers.1.self_attn.q_proj')!;
    assert.equal(q1.rank, 4);
    assert.equal(q1.scaling, 4, 'rank_pattern gives α/4');
    assert.deepEqual(ad.savedModules, [{ name: 'base_model.model.score.weight', target: 'score.weight', kind: 'modules_to_save' }]);
    assert.deepEqual(await ad.source.readF32(q0.aName), mods[0]!.a);
    assert.deepEqual(await ad.source.readF32(v0.bName), mods[1]!.b);
    assert.deepEqual(await ad.source.readF32('base_model.model.score.weight'), score.data);
  } finally {
    await ad.close();
  }
  const cfg = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
  assert.equal(cfg.peft_type, 'LORA');
  assert.equal(cfg.task_type, 'SEQ_CLS');
  assert.equal(cfg.base_model_name_or_path, 'stories260K');
});

test('BF16 output; existing folders are refused unless overwrite', async () => {
  const dir = join(root, 'a2');
  const m = factors('model.layers.0.self_attn.q_proj', 2, 4, 4, 5);
  await writePeftAdapter(dir, [m], [], { r: 2, alpha: 2 }, { dtype: 'BF16' });
  const ad = await readPeftAdapter(dir);
  assert.equal(ad.source.tensors()[0]!.dtype, 'BF16');
  const a = await ad.source.readF32(loraTensorName(m.path, 'A'));
  for (let i = 0; i < a.length; i++) assert.ok(Math.abs(a[i]! - m.a[i]!) <= Math.abs(m.a[i]!) / 128);
  await ad.close();
  await assert.rejects(writePeftAdapter(dir, [m], [], { r: 2, alpha: 2 }), (e: AmalgamError) => e.code === 'E_IO');
  await writePeftAdapter(dir, [m], [], { r: 2, alpha: 4 }, { overwrite: true });
  const again = await readPeftAdapter(dir);
  assert.equal(again.modules[0]!.scaling, 2);
  await again.close();
});

test('shape errors', async () => {
  const m = factors('x.q_proj', 2, 4, 4, 5);
  await assert.rejects(writePeftAdapter(join(root, 'a3'), [{ ...m, rank: 3 }], [], { r: 2, alpha: 2 }), (e: AmalgamError) => e.code === 'E_SHAPE');
  await assert.rejects(writePeftAdapter(join(root, 'a4'), [], [], { r: 2, alpha: 2 }), AmalgamError);
  await assert.rejects(writePeftAdapter(join(root, 'a5'), [m, m], [], { r: 2, alpha: 2 }), (e: AmalgamError) => e.code === 'E_DUPLICATE');
});
