import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AmalgamError } from '../src/errors.js';
import { SafetensorsFile } from '../src/io/safetensors.js';
import { GGUF_TYPE, GgufFile, serializeGguf, type GgufKv, type GgufTensorInput } from '../src/io/gguf.js';
import { convertToHf, detectModelFormat } from '../src/convert/to-hf.js';
import { permuteQkGgufToHf, permuteQkHfToGguf } from '../src/convert/permute.js';
import { ggufNameToHf, hfNameToGguf, llama2cNameToHf } from '../src/convert/names.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const BIN = 'models/stories260K/stories260K.bin';
const TOK = 'models/stories260K/tok512.bin';
const AID = 'models/aidreams260K/aidreams260K.bin';

const CONFIG_KEYS = [
  'architectures', 'model_type', 'vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
  'num_attention_heads', 'num_key_value_heads', 'max_position_embeddings', 'rms_norm_eps', 'rope_theta',
  'hidden_act', 'tie_word_embeddings', 'bos_token_id', 'eos_token_id', 'torch_dtype', 'dtype',
];

async function tmp(): Promise<string> {
  return mkdtemp(join(tmpdir(), 'amalgam-convert-'));
}

async function expectError(p: Promise<unknown>, code: string, re: RegExp, key?: string): Promise<AmalgamError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof AmalgamError, `expected an AmalgamError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, re);
    if (key !== undefined) {
      assert.equal(e.key, key);
      assert.ok(e.message.includes(`'${key}'`), `message names the key: ${e.message}`);
    }
    return e;
  }
  assert.fail(`expected ${code}`);
}

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32 - 0.5;
  };
}

function randomF32(n: number, r: () => number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = r();
  return a;
}

// ---------------------------------------------------------------------------------------------
// Permutation

test('Q/K permutation: row mapping, inverse, and names', () => {
  // 2 heads of head_dim 4, one column holding the row index.
  const w = Float32Array.from({ length: 8 }, (_, i) => i);
  const hf = permuteQkGgufToHf(w, 8, 2);
  // HF row h*hd + half*(hd/2) + i <- GGUF row h*hd + 2i + half.
  assert.deepEqual(Array.from(hf), [0, 2, 1, 3, 4, 6, 5, 7]);
  assert.deepEqual(permuteQkHfToGguf(hf, 8, 2), w);
  // Reshape semantics: W.reshape(H, hd/2, 2, in).transpose(0, 2, 1, 3).
  const H = 3;
  const hd = 6;
  const cols = 5;
  const r = rng(1);
  const m = randomF32(H * hd * cols, r);
  const p = permuteQkGgufToHf(m, H * hd, H);
  for (let h = 0; h < H; h++) {
    for (let a = 0; a < 2; a++) {
      for (let i = 0; i < hd / 2; i++) {
        for (let c = 0; c < cols; c++) {
          assert.equal(p[((h * 2 + a) * (hd / 2) + i) * cols + c], m[((h * (hd / 2) + i) * 2 + a) * cols + c]);
        }
      }
    }
  }
  assert.deepEqual(permuteQkHfToGguf(p, H * hd, H), m);
  const u16 = Uint16Array.from({ length: 16 }, (_, i) => i);
  assert.deepEqual(permuteQkHfToGguf(permuteQkGgufToHf(u16, 4, 1), 4, 1), u16);
  assert.throws(() => permuteQkGgufToHf(new Float32Array(12), 6, 2), (e: AmalgamError) => e.code === 'E_SHAPE');

  assert.deepEqual(ggufNameToHf('blk.3.attn_q.weight'), { name: 'model.layers.3.self_attn.q_proj.weight', role: 'q' });
  assert.deepEqual(ggufNameToHf('blk.0.attn_k.weight'), { name: 'model.layers.0.self_attn.k_proj.weight', role: 'k' });
  assert.deepEqual(ggufNameToHf('blk.1.ffn_down.weight'), { name: 'model.layers.1.mlp.down_proj.weight', role: undefined });
  assert.deepEqual(ggufNameToHf('output.weight'), { name: 'lm_head.weight', role: undefined });
  assert.equal(ggufNameToHf('blk.01.attn_q.weight'), undefined);
  assert.equal(ggufNameToHf('rope_freqs.weight'), undefined);
  assert.deepEqual(hfNameToGguf('model.layers.2.mlp.up_proj.weight'), { name: 'blk.2.ffn_up.weight', role: undefined });
  assert.deepEqual(hfNameToGguf('model.embed_tokens.weight'), { name: 'token_embd.weight', role: undefined });
  assert.deepEqual(llama2cNameToHf('w1.4'), { name: 'model.layers.4.mlp.gate_proj.weight', role: undefined });
  assert.deepEqual(llama2cNameToHf('wk.0'), { name: 'model.layers.0.self_attn.k_proj.weight', role: 'k' });
  assert.deepEqual(llama2cNameToHf('wcls'), { name: 'lm_head.weight', role: undefined });
});

/** Rotary embedding of one head vector, interleaved (pairs 2i, 2i+1) or rotate_half (i, i+hd/2). */
function rope(v: Float64Array, pos: number, interleaved: boolean): Float64Array {
  const hd = v.length;
  const out = new Float64Array(hd);
  for (let i = 0; i < hd / 2; i++) {
    const theta = pos * 10000 ** (-(2 * i) / hd);
    const [a, b] = interleaved ? [2 * i, 2 * i + 1] : [i, i + hd / 2];
    out[a] = v[a]! * Math.cos(theta) - v[b]! * Math.sin(theta);
    out[b] = v[a]! * Math.sin(theta) + v[b]! * Math.cos(theta);
  }
  return out;
}

function matvec(w: Float32Array, x: Float64Array, rows: number): Float64Array {
  const cols = x.length;
  const y = new Float64Array(rows);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) y[r] += w[r * cols + c]! * x[c]!;
  return y;
}

test('rotate_half attention on permuted weights gives the interleaved attention scores', () => {
  const r = rng(7);
  const dim = 32;
  const heads = 4;
  const kvHeads = 2;
  const hd = dim / heads;
  const wq = randomF32(dim * dim, r);
  const wk = randomF32(kvHeads * hd * dim, r);
  const wqHf = permuteQkGgufToHf(wq, dim, heads);
  const wkHf = permuteQkGgufToHf(wk, kvHeads * hd, kvHeads);
  const xs = [0, 1, 2].map(() => Float64Array.from(randomF32(dim, r)));
  const scores = (wQ: Float32Array, wK: Float32Array, interleaved: boolean) => {
    const out: number[] = [];
    for (let qp = 0; qp < 3; qp++) {
      const q = matvec(wQ, xs[qp]!, dim);
      for (let kp = 0; kp <= qp; kp++) {
        const k = matvec(wK, xs[kp]!, kvHeads * hd);
        for (let h = 0; h < heads; h++) {
          const g = Math.floor(h / (heads / kvHeads));
          const qh = rope(q.subarray(h * hd, (h + 1) * hd), qp, interleaved);
          const kh = rope(k.subarray(g * hd, (g + 1) * hd), kp, interleaved);
          out.push(qh.reduce((a, v, i) => a + v * kh[i]!, 0));
        }
      }
    }
    return out;
  };
  const a = scores(wq, wk, true);
  const b = scores(wqHf, wkHf, false);
  assert.equal(a.length, 6 * heads);
  for (let i = 0; i < a.length; i++) assert.ok(Math.abs(a[i]! - b[i]!) < 1e-12 * (1 + Math.abs(a[i]!)), `score ${i}: ${a[i]} vs ${b[i]}`);
  // Without the permutation the scores differ: the check has teeth.
  const c = scores(wq, wk, false);
  assert.ok(a.some((v, i) => Math.abs(v - c[i]!) > 1e-6));
});

// ---------------------------------------------------------------------------------------------
// The fixtures

test('stories260K: GGUF and llama2.c convert to identical HF folders', async (t) => {
  if (!haveFixtures(t, GGUF, BIN, TOK)) return;
  const out = await tmp();
  try {
    const a = await convertToHf(fixture(GGUF), join(out, 'from-gguf'), { maxPositionEmbeddings: 512 });
    const b = await convertToHf(fixture(BIN), join(out, 'from-bin'));
    assert.equal(a.format, 'gguf');
    assert.equal(b.format, 'llama2c');
    assert.equal(b.tokenizerSource, fixture(TOK), 'tok512.bin is found beside the model');
    for (const r of [a, b]) {
      assert.equal(r.tensorCount, 48);
      assert.equal(r.parameterCount, 292_800);
      assert.deepEqual((await readdir(r.outDir)).sort(), ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    }

    const cfgA = JSON.parse(await readFile(a.files.config, 'utf8'));
    const cfgB = JSON.parse(await readFile(b.files.config, 'utf8'));
    assert.deepEqual(Object.keys(cfgB), CONFIG_KEYS);
    assert.deepEqual(cfgB, {
      architectures: ['LlamaForCausalLM'], model_type: 'llama', vocab_size: 512, hidden_size: 64, intermediate_size: 172,
      num_hidden_layers: 5, num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 512,
      rms_norm_eps: 1e-5, rope_theta: 10000, hidden_act: 'silu', tie_word_embeddings: false, bos_token_id: 1, eos_token_id: 2,
      torch_dtype: 'float32', dtype: 'float32',
    });
    assert.deepEqual(cfgA, cfgB);
    assert.deepEqual(a.config, cfgA);
    assert.deepEqual(JSON.parse(await readFile(a.files.generationConfig, 'utf8')), { bos_token_id: 1, eos_token_id: 2 });
    assert.equal(await readFile(a.files.tokenizer, 'utf8'), await readFile(b.files.tokenizer, 'utf8'));
    assert.equal(await readFile(a.files.tokenizerConfig, 'utf8'), await readFile(b.files.tokenizerConfig, 'utf8'));

    const sa = await SafetensorsFile.open(a.files.weights);
    const sb = await SafetensorsFile.open(b.files.weights);
    assert.equal(sa.metadata.format, 'pt');
    assert.match(sa.metadata.source!, /stories260K\.gguf/);
    assert.match(sb.metadata.source!, /stories260K\.bin/);
    const names = sa.tensors().map((x) => x.name);
    assert.equal(names.length, 48);
    assert.deepEqual(names, names.slice().sort(), 'keys are sorted');
    assert.deepEqual(sb.tensors(), sa.tensors());
    assert.ok(sa.tensors().every((x) => x.dtype === 'F32'));
    let bytes = 0;
    for (const n of names) {
      const ra = await sa.readRaw(n);
      const rb = await sb.readRaw(n);
      assert.ok(Buffer.from(ra).equals(Buffer.from(rb)), `${n} is bit-identical`);
      bytes += ra.length;
    }
    assert.equal(bytes, 292_800 * 4);
    assert.deepEqual(sa.info('model.layers.0.self_attn.k_proj.weight').shape, [32, 64]);
    assert.deepEqual(sa.info('model.layers.4.mlp.down_proj.weight').shape, [64, 172]);
    assert.deepEqual(await sa.readRaw('lm_head.weight'), await sa.readRaw('model.embed_tokens.weight'));
    // q_proj really is permuted: HF row 1 is GGUF row 2 of head 0.
    const g = await GgufFile.open(fixture(GGUF));
    const qg = await g.readF32('blk.0.attn_q.weight');
    const qh = await sa.readF32('model.layers.0.self_attn.q_proj.weight');
    assert.deepEqual(qh.subarray(64, 128), qg.subarray(128, 192));
    assert.notDeepEqual(qh.subarray(64, 128), qg.subarray(64, 128));
    await g.close();
    await sa.close();
    await sb.close();

    // Without the override, the GGUF's metadata context length is used.
    const c = await convertToHf(fixture(GGUF), join(out, 'ctx'));
    assert.equal(c.config.max_position_embeddings, 2048);
    assert.equal(JSON.parse(await readFile(join(out, 'ctx', 'tokenizer_config.json'), 'utf8')).model_max_length, 2048);
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});

test('GGUF -> HF -> GGUF is bit-exact for every tensor', async (t) => {
  if (!haveFixtures(t, GGUF)) return;
  const out = await tmp();
  try {
    const r = await convertToHf(fixture(GGUF), join(out, 'hf'));
    const g = await GgufFile.open(fixture(GGUF));
    const hf = await SafetensorsFile.open(r.files.weights);
    const heads = g.requireInteger('llama.attention.head_count');
    const kvHeads = g.requireInteger('llama.attention.head_count_kv');
    let checked = 0;
    for (const ti of hf.tensors()) {
      const m = hfNameToGguf(ti.name)!;
      assert.ok(m, ti.name);
      let data = await hf.readF32(ti.name);
      if (m.role) data = permuteQkHfToGguf(data, ti.shape[0]!, m.role === 'q' ? heads : kvHeads);
      const back = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
      assert.deepEqual(g.info(m.name).shape, ti.shape, m.name);
      assert.ok(Buffer.from(back).equals(Buffer.from(await g.readRaw(m.name))), `${m.name} round-trips`);
      checked++;
    }
    assert.equal(checked, 48);
    await g.close();
    await hf.close();
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});

test('aidreams260K converts with its own tokenizer and shapes', async (t) => {
  if (!haveFixtures(t, AID)) return;
  const out = await tmp();
  try {
    const r = await convertToHf(fixture(AID), join(out, 'hf'));
    assert.deepEqual(
      [r.config.num_hidden_layers, r.config.num_attention_heads, r.config.num_key_value_heads, r.config.max_position_embeddings],
      [4, 4, 4, 128],
    );
    assert.equal(r.tensorCount, 1 + 4 * 9 + 2);
    assert.equal(r.parameterCount, 230_976 + 512 * 64);
    const tj = JSON.parse(await readFile(r.files.tokenizer, 'utf8'));
    assert.equal(tj.model.vocab['\u2581a'], 262);
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------------------------------------
// Synthetic models

const TOKENS = ['<unk>', '<s>', '</s>', '\u2581', 'a', '\u2581a'];

function tinyGgufKv(extra: GgufKv[] = []): GgufKv[] {
  const u32 = (key: string, value: number): GgufKv => ({ key, type: GGUF_TYPE.UINT32, value });
  return [
    { key: 'general.architecture', type: GGUF_TYPE.STRING, value: 'llama' },
    u32('llama.context_length', 16),
    u32('llama.embedding_length', 32),
    u32('llama.feed_forward_length', 64),
    u32('llama.block_count', 1),
    u32('llama.attention.head_count', 4),
    u32('llama.attention.head_count_kv', 2),
    u32('llama.rope.dimension_count', 8),
    { key: 'llama.attention.layer_norm_rms_epsilon', type: GGUF_TYPE.FLOAT32, value: Math.fround(1e-6) },
    { key: 'llama.rope.freq_base', type: GGUF_TYPE.FLOAT32, value: 500000 },
    { key: 'tokenizer.ggml.model', type: GGUF_TYPE.STRING, value: 'llama' },
    { key: 'tokenizer.ggml.tokens', type: GGUF_TYPE.ARRAY, value: { elementType: GGUF_TYPE.STRING, values: TOKENS } },
    { key: 'tokenizer.ggml.scores', type: GGUF_TYPE.ARRAY, value: { elementType: GGUF_TYPE.FLOAT32, values: [0, 0, 0, -2, -1, 0] } },
    ...extra,
  ];
}

function tinyGgufTensors(r: () => number): GgufTensorInput[] {
  const t = (name: string, type: GgufTensorInput['type'], shape: number[]): GgufTensorInput => ({
    name, type, shape, data: randomF32(shape.reduce((a, b) => a * b, 1), r),
  });
  return [
    t('token_embd.weight', 'Q8_0', [6, 32]),
    t('output_norm.weight', 'F32', [32]),
    t('blk.0.attn_q.weight', 'Q8_0', [32, 32]),
    t('blk.0.attn_k.weight', 'F16', [16, 32]),
    t('blk.0.attn_v.weight', 'BF16', [16, 32]),
    t('blk.0.attn_output.weight', 'F32', [32, 32]),
    t('blk.0.attn_norm.weight', 'F32', [32]),
    t('blk.0.ffn_gate.weight', 'Q8_0', [64, 32]),
    t('blk.0.ffn_up.weight', 'F16', [64, 32]),
    t('blk.0.ffn_down.weight', 'Q8_0', [32, 64]),
    t('blk.0.ffn_norm.weight', 'BF16', [32]),
  ];
}

test('a Q8_0 / F16 / BF16 GGUF with a tied classifier converts to F32 HF weights', async () => {
  const out = await tmp();
  try {
    const src = join(out, 'tiny.gguf');
    await writeFile(src, serializeGguf({ kv: tinyGgufKv(), tensors: tinyGgufTensors(rng(3)) }));
    const r = await convertToHf(src, join(out, 'hf'));
    assert.deepEqual(
      [r.config.vocab_size, r.config.hidden_size, r.config.num_key_value_heads, r.config.max_position_embeddings, r.config.rms_norm_eps, r.config.rope_theta],
      [6, 32, 2, 16, 1e-6, 500000],
    );
    assert.equal(r.tensorCount, 12);
    const g = await GgufFile.open(src);
    const hf = await SafetensorsFile.open(r.files.weights);
    for (const ti of g.tensors()) {
      const m = ggufNameToHf(ti.name)!;
      let want = await g.readF32(ti.name);
      if (m.role) want = permuteQkGgufToHf(want, ti.shape[0]!, m.role === 'q' ? 4 : 2);
      assert.equal(hf.info(m.name).dtype, 'F32');
      assert.deepEqual(await hf.readF32(m.name), want, m.name);
    }
    assert.deepEqual(await hf.readF32('lm_head.weight'), await g.readF32('token_embd.weight'), 'lm_head copies the embedding');
    await g.close();
    await hf.close();
    const tc = JSON.parse(await readFile(r.files.tokenizerConfig, 'utf8'));
    assert.equal(tc.model_max_length, 16);
    const tj = JSON.parse(await readFile(r.files.tokenizer, 'utf8'));
    assert.deepEqual(tj.model.merges, ['\u2581 a']);
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});

/** A tiny legacy llama2.c checkpoint (dim 8, 2 heads, 1 layer, vocab 4) and its tokenizer. */
async function tinyLlama2c(dir: string, tokenizerName: string | undefined): Promise<string> {
  const [dim, hidden, layers, heads, kv, vocab, seq] = [8, 8, 1, 2, 2, 4, 2];
  const floats = vocab * dim + layers * (2 * dim + 4 * dim * dim + 3 * hidden * dim) + dim + seq * (dim / heads);
  const b = Buffer.alloc(28 + 4 * floats);
  [dim, hidden, layers, heads, kv, vocab, seq].forEach((v, i) => b.writeInt32LE(v, 4 * i));
  for (let i = 0; i < floats; i++) b.writeFloatLE(i / 100, 28 + 4 * i);
  const model = join(dir, 'tiny.bin');
  await writeFile(model, b);
  if (tokenizerName) {
    const pieces = ['<unk>', '\n<s>\n', '\n</s>\n', ' '];
    const parts: Buffer[] = [Buffer.from(new Int32Array([7]).buffer)];
    for (const p of pieces) {
      const e = Buffer.alloc(8);
      e.writeFloatLE(0, 0);
      e.writeInt32LE(Buffer.byteLength(p), 4);
      parts.push(e, Buffer.from(p));
    }
    await writeFile(join(dir, tokenizerName), Buffer.concat(parts));
  }
  return model;
}

test('llama2.c: tokenizer lookup beside the model, explicit tokenizer, missing tokenizer', async () => {
  const out = await tmp();
  try {
    await mkdir(join(out, 'a'));
    const m1 = await tinyLlama2c(join(out, 'a'), 'tokenizer.bin');
    const r1 = await convertToHf(m1, join(out, 'a-hf'));
    assert.equal(r1.tokenizerSource, join(out, 'a', 'tokenizer.bin'));
    assert.equal(r1.config.max_position_embeddings, 2);
    const hf = await SafetensorsFile.open(r1.files.weights);
    assert.deepEqual(await hf.readRaw('lm_head.weight'), await hf.readRaw('model.embed_tokens.weight'));
    assert.equal((await hf.readF32('model.embed_tokens.weight'))[1], Math.fround(0.01));
    await hf.close();

    await mkdir(join(out, 'b'));
    const m2 = await tinyLlama2c(join(out, 'b'), undefined);
    const e = await expectError(convertToHf(m2, join(out, 'b-hf')), 'E_MISSING', /no llama2.c tokenizer beside the model \(looked for tok4.bin, tokenizer.bin\)/, 'tokenizer');
    assert.match(e.hint!, /--tokenizer/);
    assert.deepEqual(await readdir(out), ['a', 'a-hf', 'b'], 'a failed conversion leaves no output folder');
    const r2 = await convertToHf(m2, join(out, 'b-hf'), { tokenizer: join(out, 'a', 'tokenizer.bin'), maxPositionEmbeddings: 64 });
    assert.equal(r2.config.max_position_embeddings, 64);

    await expectError(convertToHf(m2, join(out, 'b-hf'), { tokenizer: join(out, 'a', 'tokenizer.bin') }), 'E_IO', /output folder exists and is not empty/);
    const r3 = await convertToHf(m2, join(out, 'b-hf'), { tokenizer: join(out, 'a', 'tokenizer.bin'), overwrite: true });
    assert.equal(r3.config.max_position_embeddings, 2);
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});

test('conversion errors: unknown format, architecture, tensors and shapes', async () => {
  const out = await tmp();
  try {
    const txt = join(out, 'model.txt');
    await writeFile(txt, 'hello world');
    await expectError(detectModelFormat(txt), 'E_FORMAT', /cannot tell the model format/);
    const bad = join(out, 'bad.gguf');
    await writeFile(bad, 'GGUX and more bytes');
    await expectError(convertToHf(bad, join(out, 'x')), 'E_FORMAT', /bad magic/);

    const write = async (name: string, kv: GgufKv[], tensors: GgufTensorInput[]) => {
      const p = join(out, name);
      await writeFile(p, serializeGguf({ kv, tensors }));
      return p;
    };
    const tensors = tinyGgufTensors(rng(5));
    const arch = tinyGgufKv().map((kv) => (kv.key === 'general.architecture' ? { ...kv, value: 'gpt2' } : kv));
    await expectError(convertToHf(await write('arch.gguf', arch, tensors), join(out, 'x')), 'E_UNSUPPORTED', /architecture "gpt2" is not supported/, 'general.architecture');
    const extra = [...tensors, { name: 'rope_freqs.weight', type: 'F32' as const, shape: [4], data: new Float32Array(4) }];
    await expectError(convertToHf(await write('extra.gguf', tinyGgufKv(), extra), join(out, 'x')), 'E_UNSUPPORTED', /not part of the llama architecture/, 'rope_freqs.weight');
    const missing = tensors.filter((x) => x.name !== 'blk.0.ffn_up.weight');
    await expectError(convertToHf(await write('missing.gguf', tinyGgufKv(), missing), join(out, 'x')), 'E_MISSING', /no tensor for model.layers.0.mlp.up_proj.weight/);
    const wrong = tensors.map((x) => (x.name === 'blk.0.attn_k.weight' ? { ...x, shape: [32, 32], data: new Float32Array(1024) } : x));
    await expectError(convertToHf(await write('shape.gguf', tinyGgufKv(), wrong), join(out, 'x')), 'E_SHAPE', /\[32, 32\] does not match the expected \[16, 32\]/, 'blk.0.attn_k.weight');
    const partial = tinyGgufKv().map((kv) => (kv.key === 'llama.rope.dimension_count' ? { ...kv, value: 4 } : kv));
    await expectError(convertToHf(await write('rope.gguf', partial, tensors), join(out, 'x')), 'E_UNSUPPORTED', /partial rotary/, 'llama.rope.dimension_count');
    const noEps = tinyGgufKv().filter((kv) => kv.key !== 'llama.attention.layer_norm_rms_epsilon');
    await expectError(convertToHf(await write('eps.gguf', noEps, tensors), join(out, 'x')), 'E_MISSING', /required metadata key is missing/, 'llama.attention.layer_norm_rms_epsilon');
    const fewTokens = tinyGgufKv().map((kv) =>
      kv.key === 'tokenizer.ggml.tokens' ? { ...kv, value: { elementType: GGUF_TYPE.STRING, values: TOKENS.slice(0, 5) } } : kv.key === 'tokenizer.ggml.scores' ? { ...kv, value: { elementType: GGUF_TYPE.FLOAT32, values: [0, 0, 0, 0, 0] } } : kv,
    ) as GgufKv[];
    await expectError(convertToHf(await write('vocab.gguf', fewTokens, tensors), join(out, 'x')), 'E_METADATA', /5 tokens, but the embedding has 6 rows/, 'tokenizer.ggml.tokens');
    await expectError(convertToHf(await write('ok.gguf', tinyGgufKv(), tensors), join(out, 'x'), { maxPositionEmbeddings: 0 }), 'E_USAGE', /positive integer/);
    const left = (await readdir(out)).filter((n) => !n.endsWith('.gguf') && !n.endsWith('.txt'));
    assert.deepEqual(left, [], 'no output folder or staging folder is left behind');
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});
