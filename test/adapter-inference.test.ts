/**
 * Adapters applied at load time for inference (`eval --adapter`, `generate --adapter`): every
 * module kind `lora extract` writes, embedding LoRA included, gives the fine-tuned model's logits.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeSyntheticLlama, type SyntheticLlamaOptions } from '../src/demo/synthetic.js';
import { extractLora } from '../src/lora/extract.js';
import { loadModel } from '../src/train/checkpoint.js';

let dir: string;
const SHAPE: SyntheticLlamaOptions = { hiddenSize: 16, intermediateSize: 24, numHeads: 2, numKvHeads: 1, vocabSize: 40, numLayers: 2, dtype: 'F32' };

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'amalgam-adapter-inference-'));
  await writeSyntheticLlama(join(dir, 'base'), { ...SHAPE, seed: 1 });
  await writeSyntheticLlama(join(dir, 'ft'), { ...SHAPE, seed: 2 });
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function logits(model: string, adapter?: string): Promise<Float32Array> {
  const { model: m } = await loadModel(model, adapter ? { adapter } : {});
  try {
    const ids = [1, 5, 9, 3, 17, 33, 2, 8];
    return Float32Array.from(m.forward(ids, 1, ids.length));
  } finally {
    m.dispose();
  }
}

test('an extracted full-rank adapter with embedding LoRA reproduces the fine-tuned logits', async () => {
  const out = join(dir, 'adapter');
  const r = await extractLora(join(dir, 'base'), join(dir, 'ft'), out, { rank: 64 });
  assert.ok(r.tensors.some((t) => t.name === 'model.embed_tokens.weight' && t.kind === 'embedding'), 'the embedding is a LoRA module');
  const want = await logits(join(dir, 'ft'));
  const got = await logits(join(dir, 'base'), out);
  const plain = await logits(join(dir, 'base'));
  let err = 0;
  let moved = 0;
  for (let i = 0; i < want.length; i++) {
    err = Math.max(err, Math.abs(got[i]! - want[i]!));
    moved = Math.max(moved, Math.abs(plain[i]! - want[i]!));
  }
  assert.ok(moved > 0.1, `the two models differ (${moved})`);
  assert.ok(err < 1e-4, `max |logit difference| ${err}`);
});
