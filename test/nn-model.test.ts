/**
 * Runtime behaviour other than gradients: config parsing, loading model folders (tied, Qwen2
 * biases, classification heads, errors), KV-cache and padding consistency, activation memory,
 * LoRA attach/merge/export, frozen parameters, generation and evaluation, and the WebAssembly
 * backend against the reference one.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ReferenceBackend } from '../src/backend/reference.js';
import { WasmBackend } from '../src/backend/wasm/backend.js';
import { gemmWasmPath } from '../src/backend/wasm/module.js';
import { AmalgamError } from '../src/errors.js';
import { writeSafetensorsFile } from '../src/io/safetensors.js';
import { Rng } from '../src/tensor/rng.js';
import { type LlamaConfig, llamaConfigToHf, makeLlamaConfig, parseLlamaConfig } from '../src/nn/config.js';
import { LlamaModel } from '../src/nn/model.js';
import { Parameter, initLlamaParameters } from '../src/nn/params.js';
import { LoraLinear, attachLora, detachLora, loraAdapterConfig, loraModules, loraStateDict, mergedLoraWeights } from '../src/nn/lora.js';
import { SequenceClassificationHead } from '../src/nn/heads.js';
import { causalLmLoss } from '../src/nn/losses.js';
import { generate, sample } from '../src/nn/generate.js';
import { evaluateAccuracy, evaluateNll } from '../src/nn/eval.js';

const be = new ReferenceBackend();

const TINY = makeLlamaConfig({ vocabSize: 13, hiddenSize: 8, intermediateSize: 12, numLayers: 2, numHeads: 4, numKvHeads: 2, ropeTheta: 1000 });

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i]! - b[i]!));
  return d;
}

function randomIds(seed: number, n: number, vocab: number): Int32Array {
  const rng = new Rng(seed);
  return Int32Array.from({ length: n }, () => rng.int(vocab));
}

function rejects(fn: () => unknown, code: string, match?: RegExp): void {
  assert.throws(fn, (e: unknown) => e instanceof AmalgamError && e.code === code && (!match || match.test(e.message)));
}

// ---------------------------------------------------------------------------------------------
// Config

test('config: Llama defaults, Qwen2 and attention_bias biases, EOS lists', () => {
  const c = parseLlamaConfig({ model_type: 'llama', vocab_size: 32, hidden_size: 16, intermediate_size: 40, num_hidden_layers: 2, num_attention_heads: 4 });
  assert.equal(c.numKvHeads, 4);
  assert.equal(c.headDim, 4);
  assert.equal(c.ropeTheta, 10000);
  assert.equal(c.tieWordEmbeddings, false);
  assert.deepEqual([c.qkvBias, c.oBias, c.mlpBias], [false, false, false]);
  const q = parseLlamaConfig({ model_type: 'qwen2', vocab_size: 32, hidden_size: 16, intermediate_size: 40, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, eos_token_id: [5, 7], tie_word_embeddings: true });
  assert.deepEqual([q.qkvBias, q.oBias], [true, false]);
  assert.deepEqual(q.eosTokenIds, [5, 7]);
  const b = parseLlamaConfig({ vocab_size: 32, hidden_size: 16, intermediate_size: 40, num_hidden_layers: 1, num_attention_heads: 4, attention_bias: true, mlp_bias: true, head_dim: 8, id2label: { 0: 'a', 1: 'b' } });
  assert.deepEqual([b.qkvBias, b.oBias, b.mlpBias, b.headDim, b.numLabels], [true, true, true, 8, 2]);
  assert.deepEqual(parseLlamaConfig(llamaConfigToHf(b)), { ...b, numLabels: null });
});

test('config: what the runtime cannot run is refused with the key named', () => {
  const base = { vocab_size: 32, hidden_size: 16, intermediate_size: 40, num_hidden_layers: 1, num_attention_heads: 4 };
  rejects(() => parseLlamaConfig({ ...base, rope_scaling: { rope_type: 'llama3', factor: 8 } }), 'E_UNSUPPORTED', /rope_scaling/);
  rejects(() => parseLlamaConfig({ ...base, hidden_act: 'gelu' }), 'E_UNSUPPORTED', /hidden_act/);
  rejects(() => parseLlamaConfig({ ...base, model_type: 'gpt2' }), 'E_UNSUPPORTED', /model_type/);
  rejects(() => parseLlamaConfig({ ...base, num_key_value_heads: 3 }), 'E_CONFIG', /num_key_value_heads/);
  rejects(() => parseLlamaConfig({ ...base, hidden_size: 18 }), 'E_CONFIG', /hidden_size/);
  const { vocab_size: _, ...noVocab } = base;
  rejects(() => parseLlamaConfig(noVocab), 'E_CONFIG', /vocab_size/);
  assert.equal(parseLlamaConfig({ ...base, rope_scaling: null }).ropeTheta, 10000);
});

// ---------------------------------------------------------------------------------------------
// Model folders

async function writeFolder(dir: string, config: Record<string, unknown>, tensors: Map<string, { shape: readonly number[]; data: Float32Array }>): Promise<void> {
  await writeFile(join(dir, 'config.json'), JSON.stringify(config));
  await writeSafetensorsFile(
    join(dir, 'model.safetensors'),
    [...tensors].map(([name, t]) => ({ name, dtype: 'F32', shape: [...t.shape], data: new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength) })),
  );
}

test('loading folders: tied Qwen2 with biases, a classification head, and clear errors', async () => {
  const root = await mkdtemp(join(tmpdir(), 'amalgam-nn-'));
  try {
    const c: LlamaConfig = { ...TINY, modelType: 'qwen2', qkvBias: true, tieWordEmbeddings: true };
    const params = initLlamaParameters(c, new Rng(1), 0.3);
    for (const p of params.values()) if (p.name.endsWith('.bias')) new Rng(2).fillNormal(p.data, 0.3);
    const direct = new LlamaModel(c, params, { backend: be });
    const ids = randomIds(3, 6, c.vocabSize);
    const expected = Float32Array.from(direct.forward(ids, 1, 6));

    const ok = join(root, 'ok');
    await mkdir(ok);
    const tensors = new Map<string, { shape: readonly number[]; data: Float32Array }>([...params].map(([n, p]) => [n, p]));
    const score = new Float32Array(3 * c.hiddenSize).map((_, i) => Math.sin(i));
    tensors.set('score.weight', { shape: [3, c.hiddenSize], data: score });
    await writeFolder(ok, { ...llamaConfigToHf(c), architectures: ['Qwen2ForSequenceClassification'], num_labels: 3 }, tensors);
    const loaded = await LlamaModel.fromFolder(ok, { backend: be });
    assert.equal(loaded.lmHead.parameters()[0], loaded.embed, 'tied lm_head is the embedding');
    assert.equal(loaded.parameters().length, params.size);
    assert.deepEqual(loaded.forward(ids, 1, 6), expected);
    const head = await SequenceClassificationHead.fromFolder(ok);
    assert.equal(head.numLabels, 3);
    assert.deepEqual(head.score.weight.data, score);

    // A bias the config asks for is missing.
    const noBias = join(root, 'nobias');
    await mkdir(noBias);
    const t2 = new Map(tensors);
    t2.delete('model.layers.1.self_attn.k_proj.bias');
    await writeFolder(noBias, llamaConfigToHf(c), t2);
    await assert.rejects(LlamaModel.fromFolder(noBias, { backend: be }), (e: unknown) => e instanceof AmalgamError && e.message.includes('model.layers.1.self_attn.k_proj.bias'));

    // Biases the config does not declare (a Llama config over Qwen2 weights).
    const llamaCfg = join(root, 'llamacfg');
    await mkdir(llamaCfg);
    await writeFolder(llamaCfg, { ...llamaConfigToHf(c), model_type: 'llama', architectures: ['LlamaForCausalLM'] }, tensors);
    await assert.rejects(LlamaModel.fromFolder(llamaCfg, { backend: be }), (e: unknown) => e instanceof AmalgamError && e.code === 'E_ARCH' && /bias/.test(e.message));

    // Untied without lm_head.
    const untied = join(root, 'untied');
    await mkdir(untied);
    await writeFolder(untied, { ...llamaConfigToHf(c), tie_word_embeddings: false }, tensors);
    await assert.rejects(LlamaModel.fromFolder(untied, { backend: be }), (e: unknown) => e instanceof AmalgamError && e.code === 'E_MISSING' && /tie_word_embeddings/.test(e.message));
  } finally {
    await rm(root, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------------------------------------
// Consistency

test('KV-cache decoding gives the logits of a full forward', () => {
  const model = LlamaModel.random(TINY, 4, { backend: be, std: 0.3 });
  const ids = randomIds(5, 9, TINY.vocabSize);
  const V = TINY.vocabSize;
  const full = Float32Array.from(model.forward(ids, 1, 9));
  const kv = model.createKvCache(1, 9);
  const first = Float32Array.from(model.forward(ids.subarray(0, 4), 1, 4, { kv }));
  assert.ok(maxDiff(first, full.subarray(0, 4 * V)) < 1e-6);
  for (let t = 4; t < 9; t++) {
    const step = model.forward(ids.subarray(t, t + 1), 1, 1, { kv });
    assert.ok(maxDiff(step, full.subarray(t * V, (t + 1) * V)) < 1e-5, `position ${t}`);
  }
  assert.equal(kv.length, 9);
  assert.throws(() => model.backward(new Float32Array(V)), /KV cache/);
  assert.throws(() => model.forward(ids.subarray(0, 1), 1, 1, { kv }), /KV cache holds 9/);
});

test('right padding does not change the real rows, and the loss ignores padded ones', () => {
  const model = LlamaModel.random(TINY, 6, { backend: be, std: 0.3 });
  const V = TINY.vocabSize;
  const a = randomIds(7, 6, V);
  const b = randomIds(8, 3, V);
  const batch = new Int32Array(12);
  batch.set(a, 0);
  batch.set(b, 6);
  batch.fill(V - 1, 9);
  const both = Float32Array.from(model.forward(batch, 2, 6));
  const alone = Float32Array.from(model.forward(b, 1, 3));
  assert.ok(maxDiff(both.subarray(6 * V, 9 * V), alone) < 1e-6);
  const lossBoth = causalLmLoss(be, both, batch, 2, 6, V, { lengths: [6, 3], reduction: 'sum' });
  const lossA = causalLmLoss(be, Float32Array.from(model.forward(a, 1, 6)), a, 1, 6, V, { reduction: 'sum' });
  const lossB = causalLmLoss(be, alone, b, 1, 3, V, { reduction: 'sum' });
  assert.equal(lossBoth.count, 7);
  assert.ok(Math.abs(lossBoth.loss - lossA.loss - lossB.loss) < 1e-4);
});

test('activation memory matches activationFloats and is reused across steps', () => {
  const model = LlamaModel.random(TINY, 9, { backend: be });
  attachLora(model, { targets: ['q_proj', 'down_proj'], rank: 3 });
  model.setTrainable();
  const B = 3;
  const T = 7;
  const ids = randomIds(10, B * T, TINY.vocabSize);
  const logits = model.forward(ids, B, T);
  model.backward(new Float32Array(logits.length).fill(0.01));
  const want = model.activationFloats(B, T);
  assert.deepEqual(model.allocatedFloats(), want);
  // The same or a smaller batch reuses the buffers.
  const again = model.forward(ids, B, T);
  assert.equal(again.buffer, logits.buffer);
  assert.equal(model.forward(ids, 2, 5).buffer, logits.buffer);
  assert.deepEqual(model.allocatedFloats(), want);
  // Per layer and token (no LoRA): 4d + 3 + 2·qd + 2·kvd + 3f + H·T floats, as docs/runtime.md states.
  const plain = LlamaModel.random(TINY, 9, { backend: be });
  const { hiddenSize: d, intermediateSize: f, numHeads: H } = TINY;
  const qd = H * TINY.headDim;
  const kvd = TINY.numKvHeads * TINY.headDim;
  const N = B * T;
  const perLayer = N * (4 * d + 3 + 2 * qd + 2 * kvd + 3 * f + H * T);
  const rest = N * (1 + d + 1 + 2 * d + TINY.vocabSize);
  assert.equal(plain.activationFloats(B, T).forward, TINY.numLayers * perLayer + rest);
});

test('backward touches only trainable parameters and stops below the last one', () => {
  const model = LlamaModel.random(TINY, 11, { backend: be });
  const head = SequenceClassificationHead.random(TINY.hiddenSize, 2, 12);
  model.setTrainable(() => false);
  const ids = randomIds(13, 10, TINY.vocabSize);
  const hidden = model.forward(ids, 2, 5, { output: 'hidden' });
  const logits = head.forward(be, hidden, 2, 5, [5, 2]);
  model.backward(head.backward(be, new Float32Array(logits.length).fill(1)));
  assert.ok(model.parameters().every((p) => p.grad === null));
  assert.ok(head.score.weight.grad!.some((v) => v !== 0));
  // Only the last block's MLP trainable: gradients there, nothing allocated elsewhere.
  model.setTrainable((p) => p.name.startsWith('model.layers.1.mlp.'));
  const l2 = model.forward(ids, 2, 5);
  model.backward(new Float32Array(l2.length).fill(0.1));
  const trained = model.trainableParameters();
  assert.deepEqual(
    trained.map((p) => p.name),
    ['gate_proj', 'up_proj', 'down_proj'].map((m) => `model.layers.1.mlp.${m}.weight`),
  );
  assert.ok(trained.every((p) => p.grad!.some((v) => v !== 0)));
  model.zeroGrad();
  assert.ok(trained.every((p) => p.grad!.every((v) => v === 0)));
});

// ---------------------------------------------------------------------------------------------
// LoRA

test('LoRA: PEFT initialisation, init hooks, merge, detach and export', () => {
  const model = LlamaModel.random(TINY, 14, { backend: be, std: 0.3 });
  const ids = randomIds(15, 8, TINY.vocabSize);
  const base = Float32Array.from(model.forward(ids, 1, 8));
  const seen: string[] = [];
  const mods = attachLora(model, {
    targets: ['q_proj', 'v_proj'],
    rank: 4,
    alpha: 8,
    layers: [1],
    seed: 3,
    init: (m) => {
      seen.push(m.name);
      assert.ok(m.A.every((v) => Math.abs(v) <= 1 / Math.sqrt(m.inFeatures)), 'A is U(±1/√in)');
      assert.ok(m.B.every((v) => v === 0), 'B starts at zero');
    },
  });
  assert.deepEqual(seen, ['model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.v_proj']);
  assert.equal(mods[0]!.scaling, 2);
  assert.deepEqual(model.forward(ids, 1, 8), base, 'B = 0 leaves the model unchanged');
  assert.ok(model.parameters().filter((p) => !p.name.includes('lora_')).every((p) => !p.requiresGrad), 'base frozen');

  // Explicit A and B (as OSRM sets them), then the merged weight W + s·B·A.
  const q = mods[0]!;
  const A = new Float32Array(q.A.size).map((_, i) => Math.cos(i));
  const Bm = new Float32Array(q.B.size).map((_, i) => 0.1 * Math.sin(i));
  q.A.set(A);
  q.B.set(Bm);
  const W = q.base.weight.data;
  const merged = q.mergedWeight(be);
  for (const [o, i] of [[0, 0], [3, 5], [q.outFeatures - 1, q.inFeatures - 1]] as const) {
    let s = 0;
    for (let k = 0; k < 4; k++) s += Bm[o * 4 + k]! * A[k * q.inFeatures + i]!;
    assert.ok(Math.abs(merged[o * q.inFeatures + i]! - (W[o * q.inFeatures + i]! + 2 * s)) < 1e-6);
  }
  assert.deepEqual(mergedLoraWeights(model).get('model.layers.1.self_attn.q_proj.weight'), merged);
  const adapted = Float32Array.from(model.forward(ids, 1, 8));
  assert.ok(maxDiff(adapted, base) > 1e-3);

  const sd = loraStateDict(model);
  assert.deepEqual([...sd.keys()], [
    'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight',
    'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight',
    'base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight',
    'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight',
  ]);
  assert.deepEqual(sd.get('base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight')!.shape, [4, TINY.hiddenSize]);
  assert.deepEqual(sd.get('base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight')!.shape, [2 * TINY.headDim, 4]);
  const cfg = loraAdapterConfig(model);
  assert.deepEqual([cfg['r'], cfg['lora_alpha'], cfg['target_modules'], cfg['use_rslora']], [4, 8, ['q_proj', 'v_proj'], false]);

  rejects(() => attachLora(model, { targets: ['q_proj'], rank: 2 }), 'E_USAGE', /already has a LoRA/);
  rejects(() => attachLora(model, { targets: ['qproj'], rank: 2 }), 'E_USAGE', /no linear layer matches/);

  // Detaching without merging restores the base; merging folds the update into W.
  const copy = LlamaModel.random(TINY, 14, { backend: be, std: 0.3 });
  attachLora(copy, { targets: ['q_proj', 'v_proj'], rank: 4, alpha: 8, layers: [1] });
  loraModules(copy).forEach((m, i) => {
    m.A.set(mods[i]!.A.data);
    m.B.set(mods[i]!.B.data);
  });
  detachLora(copy, false);
  assert.deepEqual(copy.forward(ids, 1, 8), base);
  detachLora(model, true);
  assert.equal(loraModules(model).length, 0);
  assert.ok(!(model.blocks[1]!.attn.q instanceof LoraLinear));
  assert.ok(maxDiff(model.forward(ids, 1, 8), adapted) < 1e-5);
});

// ---------------------------------------------------------------------------------------------
// Generation and evaluation

test('generation: greedy, seeded sampling, top-k/top-p, stop tokens', () => {
  const model = LlamaModel.random(TINY, 16, { backend: be, std: 0.5 });
  const greedy = generate(model, [1, 5], { maxNewTokens: 12, stopTokens: [] });
  assert.equal(greedy.generated.length, 12);
  assert.deepEqual(greedy.tokens.slice(0, 2), [1, 5]);
  assert.deepEqual(generate(model, [1, 5], { maxNewTokens: 12, temperature: 0.8, topK: 1, stopTokens: [] }).tokens, greedy.tokens);
  const s1 = generate(model, [1], { maxNewTokens: 20, temperature: 1.5, seed: 7, stopTokens: [] });
  const s2 = generate(model, [1], { maxNewTokens: 20, temperature: 1.5, seed: 7, stopTokens: [] });
  assert.deepEqual(s1.tokens, s2.tokens);
  const stopAt = greedy.generated[3]!;
  const stopped = generate(model, [1, 5], { maxNewTokens: 12, stopTokens: [stopAt] });
  assert.equal(stopped.stop, 'stop-token');
  assert.ok(!stopped.generated.includes(stopAt));

  // top-p keeps the smallest prefix reaching p: with probabilities ≈ (0.64, 0.24, 0.09, 0.03), p = 0.7 keeps two.
  const logits = [Math.log(0.64), Math.log(0.24), Math.log(0.09), Math.log(0.03)];
  const rng = new Rng(1);
  const counts = [0, 0, 0, 0];
  for (let i = 0; i < 4000; i++) counts[sample(logits, 1, 0, 0.7, rng)]!++;
  assert.equal(counts[2]! + counts[3]!, 0);
  assert.ok(Math.abs(counts[0]! / 4000 - 0.64 / 0.88) < 0.03);
});

test('evaluation: NLL is exp-consistent; accuracy counts argmax hits', () => {
  const model = LlamaModel.random(TINY, 17, { backend: be, std: 0.3 });
  const seqs = [randomIds(1, 7, 13), randomIds(2, 3, 13), randomIds(3, 1, 13), randomIds(4, 9, 13)];
  const r = evaluateNll(model, seqs, { batchSize: 2, maxLength: 8 });
  assert.equal(r.sequences, 3);
  assert.equal(r.tokens, 6 + 2 + 7);
  assert.ok(Math.abs(r.perplexity - Math.exp(r.meanNll)) < 1e-9);
  const head = SequenceClassificationHead.random(TINY.hiddenSize, 3, 18, 1);
  const examples = seqs.map((ids, i) => ({ ids, label: i % 3 }));
  const acc = evaluateAccuracy(model, head, examples, { batchSize: 3 });
  assert.equal(acc.total, 4);
  assert.equal(acc.correct, acc.predictions.filter((p, i) => p === examples[i]!.label).length);
  // Batching does not change the predictions.
  assert.deepEqual(evaluateAccuracy(model, head, examples, { batchSize: 1 }).predictions, acc.predictions);
});

test('the WebAssembly backend gives the reference logits and gradients', (t) => {
  if (!gemmWasmPath()) {
    t.skip('WebAssembly kernels not built (npm run build:wasm)');
    return;
  }
  const wasm = new WasmBackend({ threads: 2 });
  try {
    const c = { ...TINY, hiddenSize: 32, intermediateSize: 40, headDim: 8, vocabSize: 50 };
    const params = initLlamaParameters(c, new Rng(19), 0.2);
    const copy = new Map([...params].map(([n, p]) => [n, new Parameter(n, p.shape, Float32Array.from(p.data))]));
    const ref = new LlamaModel(c, params, { backend: be });
    const fast = new LlamaModel(c, copy, { backend: wasm });
    for (const m of [ref, fast]) attachLora(m, { targets: ['v_proj', 'up_proj'], rank: 4, init: (x) => x.B.fill(0.05) });
    const ids = randomIds(20, 3 * 16, c.vocabSize);
    const grads = [ref, fast].map((m) => {
      const logits = m.forward(ids, 3, 16);
      const out = Float32Array.from(logits);
      causalLmLoss(m.backend, logits, ids, 3, 16, c.vocabSize, { lengths: [16, 9, 12], dLogits: logits });
      m.backward(logits);
      return { out, g: m.trainableParameters().map((p) => p.grad!) };
    });
    const rel = (a: Float32Array, b: Float32Array) => maxDiff(a, b) / Math.max(...b.map(Math.abs));
    assert.ok(rel(grads[1]!.out, grads[0]!.out) < 1e-5);
    grads[0]!.g.forEach((g, i) => assert.ok(rel(grads[1]!.g[i]!, g) < 1e-4, `gradient ${i}`));
  } finally {
    wasm.dispose();
  }
});
