/**
 * Gradient checks of the runtime's hand-written backward passes against finite differences.
 *
 * Each check runs the layer (or loss, or the whole model) forward and backward on the float32
 * path with the reference backend, and compares every parameter and input gradient with central
 * differences (h = 1e-5) of an independent float64 re-implementation of the same forward,
 * written here with plain loops, evaluated at the same (float32-representable) values.
 *
 * Relative error of a tensor: max over its coordinates of |g − ĝ| / max(|g|, |ĝ|, 1e-3·scale),
 * where g is the analytic gradient, ĝ the finite difference and scale = max |ĝ| over the tensor
 * (the floor keeps coordinates that are almost zero from dividing by nothing). Bound: 1e-3.
 * Layer checks use the scalar Σ dy ⊙ layer(x) with a fixed random dy.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { ReferenceBackend } from '../src/backend/reference.js';
import { Rng } from '../src/tensor/rng.js';
import { type LlamaConfig, makeLlamaConfig } from '../src/nn/config.js';
import { Parameter } from '../src/nn/params.js';
import { Linear, type LinearLayer } from '../src/nn/layers/linear.js';
import { embeddingBackward, embeddingForward } from '../src/nn/layers/embedding.js';
import { createRmsNormCache, rmsnormBackward, rmsnormForward } from '../src/nn/layers/rmsnorm.js';
import { RopeTables } from '../src/nn/layers/rope.js';
import { type Attention, attentionBackward, attentionForward, createAttentionCache, createAttentionScratch } from '../src/nn/layers/attention.js';
import { type Mlp, createMlpCache, createMlpScratch, mlpBackward, mlpForward } from '../src/nn/layers/mlp.js';
import { LoraLinear, attachLora } from '../src/nn/lora.js';
import { causalLmLoss, classificationLoss, klDivLoss, realTokenWeights } from '../src/nn/losses.js';
import { SequenceClassificationHead } from '../src/nn/heads.js';
import { LlamaModel } from '../src/nn/model.js';

const be = new ReferenceBackend();
const TOL = 1e-3;
const H_FD = 1e-5;

type F64 = Float64Array;

// ---------------------------------------------------------------------------------------------
// Finite differences

interface Checked {
  name: string;
  /** Analytic gradient from the float32 backward. */
  grad: Float32Array | null;
  /** The float64 values the reference forward reads (perturbed in place). */
  value: F64;
}

function relError(g: ArrayLike<number>, num: ArrayLike<number>): number {
  let scale = 0;
  for (let i = 0; i < num.length; i++) scale = Math.max(scale, Math.abs(num[i]!));
  let worst = 0;
  for (let i = 0; i < num.length; i++) {
    const denom = Math.max(Math.abs(g[i]!), Math.abs(num[i]!), 1e-3 * scale, 1e-30);
    worst = Math.max(worst, Math.abs(g[i]! - num[i]!) / denom);
  }
  return worst;
}

/** Forward agreement: max |a − b| / max |b|. */
function fwdError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < b.length; i++) {
    diff = Math.max(diff, Math.abs(a[i]! - b[i]!));
    scale = Math.max(scale, Math.abs(b[i]!));
  }
  return diff / scale;
}

/** Checks every listed gradient against central differences of f; returns the worst error. */
function checkGradients(t: TestContext, label: string, list: Checked[], f: () => number): number {
  let worst = 0;
  for (const c of list) {
    assert.ok(c.grad, `${label}: ${c.name} has no gradient`);
    const num = new Float64Array(c.value.length);
    for (let i = 0; i < c.value.length; i++) {
      const v = c.value[i]!;
      c.value[i] = v + H_FD;
      const fp = f();
      c.value[i] = v - H_FD;
      const fm = f();
      c.value[i] = v;
      num[i] = (fp - fm) / (2 * H_FD);
    }
    let any = false;
    for (const x of num) if (x !== 0) any = true;
    assert.ok(any, `${label}: ${c.name}: the finite differences are all zero, so the check proves nothing`);
    const err = relError(c.grad!, num);
    assert.ok(err <= TOL, `${label}: ${c.name}: relative error ${err.toExponential(2)} > ${TOL}`);
    worst = Math.max(worst, err);
  }
  t.diagnostic(`${label}: ${list.length} tensors, max relative error ${worst.toExponential(2)}`);
  return worst;
}

const f64 = (a: ArrayLike<number>): F64 => Float64Array.from(a);

function randn(rng: Rng, n: number, std = 1, mean = 0): Float32Array {
  return rng.fillNormal(new Float32Array(n), std, mean);
}

function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
}

// ---------------------------------------------------------------------------------------------
// The float64 reference forward

function lin64(x: F64, rows: number, inF: number, outF: number, W: F64, b: F64 | null): F64 {
  const y = new Float64Array(rows * outF);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outF; o++) {
      let s = b ? b[o]! : 0;
      for (let i = 0; i < inF; i++) s += x[r * inF + i]! * W[o * inF + i]!;
      y[r * outF + o] = s;
    }
  }
  return y;
}

interface Lin64 {
  W: F64;
  b: F64 | null;
  lora?: { A: F64; B: F64; rank: number; s: number };
}

function linear64(x: F64, rows: number, inF: number, outF: number, l: Lin64): F64 {
  const y = lin64(x, rows, inF, outF, l.W, l.b);
  if (l.lora) {
    const u = lin64(x, rows, inF, l.lora.rank, l.lora.A, null);
    const d = lin64(u, rows, l.lora.rank, outF, l.lora.B, null);
    for (let i = 0; i < y.length; i++) y[i] += l.lora.s * d[i]!;
  }
  return y;
}

function rms64(x: F64, rows: number, d: number, w: F64, eps: number): F64 {
  const y = new Float64Array(rows * d);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let j = 0; j < d; j++) ss += x[r * d + j]! ** 2;
    const inv = 1 / Math.sqrt(ss / d + eps);
    for (let j = 0; j < d; j++) y[r * d + j] = x[r * d + j]! * inv * w[j]!;
  }
  return y;
}

/** rotate_half rope on [N, heads, hd] at the given positions. */
function rope64(x: F64, N: number, heads: number, hd: number, pos: (n: number) => number, theta: number): F64 {
  const y = new Float64Array(x.length);
  const h = hd / 2;
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < heads; k++) {
      const o = (n * heads + k) * hd;
      for (let i = 0; i < h; i++) {
        const ang = pos(n) * Math.pow(theta, (-2 * i) / hd);
        const c = Math.cos(ang);
        const s = Math.sin(ang);
        y[o + i] = x[o + i]! * c - x[o + i + h]! * s;
        y[o + i + h] = x[o + i + h]! * c + x[o + i]! * s;
      }
    }
  }
  return y;
}

interface Attn64 {
  q: Lin64;
  k: Lin64;
  v: Lin64;
  o: Lin64;
  H: number;
  Hkv: number;
  hd: number;
  d: number;
  theta: number;
}

function attention64(x: F64, B: number, T: number, p: Attn64): F64 {
  const { H, Hkv, hd, d } = p;
  const N = B * T;
  const qd = H * hd;
  const kvd = Hkv * hd;
  const pos = (n: number) => n % T;
  const q = rope64(linear64(x, N, d, qd, p.q), N, H, hd, pos, p.theta);
  const k = rope64(linear64(x, N, d, kvd, p.k), N, Hkv, hd, pos, p.theta);
  const v = linear64(x, N, d, kvd, p.v);
  const ctx = new Float64Array(N * qd);
  const g = H / Hkv;
  const sc = new Float64Array(T);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < H; h++) {
      const j = Math.floor(h / g);
      for (let t = 0; t < T; t++) {
        let max = -Infinity;
        for (let u = 0; u <= t; u++) {
          let s = 0;
          for (let i = 0; i < hd; i++) s += q[(b * T + t) * qd + h * hd + i]! * k[(b * T + u) * kvd + j * hd + i]!;
          sc[u] = s / Math.sqrt(hd);
          max = Math.max(max, sc[u]!);
        }
        let z = 0;
        for (let u = 0; u <= t; u++) z += Math.exp(sc[u]! - max);
        for (let u = 0; u <= t; u++) {
          const pr = Math.exp(sc[u]! - max) / z;
          for (let i = 0; i < hd; i++) ctx[(b * T + t) * qd + h * hd + i] += pr * v[(b * T + u) * kvd + j * hd + i]!;
        }
      }
    }
  }
  return linear64(ctx, N, qd, d, p.o);
}

interface Mlp64 {
  gate: Lin64;
  up: Lin64;
  down: Lin64;
  d: number;
  f: number;
}

function mlp64(x: F64, rows: number, p: Mlp64): F64 {
  const g = linear64(x, rows, p.d, p.f, p.gate);
  const u = linear64(x, rows, p.d, p.f, p.up);
  const a = new Float64Array(g.length);
  for (let i = 0; i < a.length; i++) a[i] = (g[i]! / (1 + Math.exp(-g[i]!))) * u[i]!;
  return linear64(a, rows, p.f, p.d, p.down);
}

/** The whole model in float64 over named float64 parameters; returns hidden or logits. */
function model64(c: LlamaConfig, P: Map<string, F64>, ids: ArrayLike<number>, B: number, T: number, lora: Map<string, { rank: number; s: number }>, output: 'logits' | 'hidden' = 'logits'): F64 {
  const d = c.hiddenSize;
  const N = B * T;
  const lin = (path: string): Lin64 => {
    const l: Lin64 = { W: P.get(`${path}.weight`)!, b: P.get(`${path}.bias`) ?? null };
    const lr = lora.get(path);
    if (lr) l.lora = { A: P.get(`${path}.lora_A.weight`)!, B: P.get(`${path}.lora_B.weight`)!, ...lr };
    return l;
  };
  const E = P.get('model.embed_tokens.weight')!;
  let x = new Float64Array(N * d);
  for (let n = 0; n < N; n++) for (let j = 0; j < d; j++) x[n * d + j] = E[ids[n]! * d + j]!;
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}`;
    const h1 = rms64(x, N, d, P.get(`${p}.input_layernorm.weight`)!, c.rmsNormEps);
    const a = attention64(h1, B, T, {
      q: lin(`${p}.self_attn.q_proj`),
      k: lin(`${p}.self_attn.k_proj`),
      v: lin(`${p}.self_attn.v_proj`),
      o: lin(`${p}.self_attn.o_proj`),
      H: c.numHeads,
      Hkv: c.numKvHeads,
      hd: c.headDim,
      d,
      theta: c.ropeTheta,
    });
    const xm = x.map((v, j) => v + a[j]!);
    const h2 = rms64(xm, N, d, P.get(`${p}.post_attention_layernorm.weight`)!, c.rmsNormEps);
    const m = mlp64(h2, N, { gate: lin(`${p}.mlp.gate_proj`), up: lin(`${p}.mlp.up_proj`), down: lin(`${p}.mlp.down_proj`), d, f: c.intermediateSize });
    x = xm.map((v, j) => v + m[j]!);
  }
  const hidden = rms64(x, N, d, P.get('model.norm.weight')!, c.rmsNormEps);
  if (output === 'hidden') return hidden;
  const head = lin('lm_head');
  if (c.tieWordEmbeddings) head.W = E;
  return linear64(hidden, N, d, c.vocabSize, head);
}

function logSumExp(x: ArrayLike<number>, o: number, n: number, temp = 1): number {
  let max = -Infinity;
  for (let j = 0; j < n; j++) max = Math.max(max, x[o + j]! / temp);
  let s = 0;
  for (let j = 0; j < n; j++) s += Math.exp(x[o + j]! / temp - max);
  return max + Math.log(s);
}

/** Mean cross-entropy over rows whose target is ≥ 0. */
function ce64(logits: F64, targets: ArrayLike<number>, rows: number, V: number): number {
  let s = 0;
  let n = 0;
  for (let r = 0; r < rows; r++) {
    const t = targets[r]!;
    if (t < 0) continue;
    s += logSumExp(logits, r * V, V) - logits[r * V + t]!;
    n++;
  }
  return s / n;
}

function targets64(ids: ArrayLike<number>, B: number, T: number, lengths: number[], mask?: ArrayLike<number>): number[] {
  const out = new Array<number>(B * T).fill(-1);
  for (let b = 0; b < B; b++) for (let t = 0; t + 1 < lengths[b]!; t++) if (!mask || mask[b * T + t + 1]) out[b * T + t] = ids[b * T + t + 1]!;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Layer fixtures

function param(name: string, shape: number[], data: Float32Array, trainable = true): Parameter {
  const p = new Parameter(name, shape, data);
  p.setRequiresGrad(trainable);
  return p;
}

function randLinear(rng: Rng, name: string, inF: number, outF: number, bias: boolean): Linear {
  return new Linear(
    name,
    param(`${name}.weight`, [outF, inF], randn(rng, inF * outF, 1 / Math.sqrt(inF))),
    bias ? param(`${name}.bias`, [outF], randn(rng, outF, 0.2)) : null,
  );
}

/** Float64 views of a linear layer's parameters (and their Checked entries). */
function lin64Of(l: LinearLayer, list: Checked[]): Lin64 {
  const base = l instanceof LoraLinear ? l.base : (l as Linear);
  const W = f64(base.weight.data);
  list.push({ name: base.weight.name, grad: base.weight.grad, value: W });
  let b: F64 | null = null;
  if (base.bias) {
    b = f64(base.bias.data);
    list.push({ name: base.bias.name, grad: base.bias.grad, value: b });
  }
  const out: Lin64 = { W, b };
  if (l instanceof LoraLinear) {
    const A = f64(l.A.data);
    const Bm = f64(l.B.data);
    if (l.A.requiresGrad) list.push({ name: l.A.name, grad: l.A.grad, value: A });
    if (l.B.requiresGrad) list.push({ name: l.B.name, grad: l.B.grad, value: Bm });
    out.lora = { A, B: Bm, rank: l.rank, s: l.scaling };
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Layers

test('embedding', (t) => {
  const rng = new Rng(1);
  const V = 7;
  const d = 5;
  const table = param('emb', [V, d], randn(rng, V * d));
  const ids = Int32Array.from([3, 0, 3, 6, 1, 3]);
  const out = new Float32Array(ids.length * d);
  embeddingForward(be, table, ids, out, d);
  const dy = randn(rng, out.length);
  embeddingBackward(be, table, ids, dy, d);
  const T64 = f64(table.data);
  const err = checkGradients(t, 'embedding', [{ name: 'table', grad: table.grad, value: T64 }], () => {
    let s = 0;
    for (let t = 0; t < ids.length; t++) for (let j = 0; j < d; j++) s += dy[t * d + j]! * T64[ids[t]! * d + j]!;
    return s;
  });
  assert.ok(err <= TOL);
});

test('rmsnorm', (t) => {
  const rng = new Rng(2);
  const rows = 4;
  const d = 6;
  const eps = 1e-5;
  const w = param('w', [d], randn(rng, d, 0.3, 1));
  const x = randn(rng, rows * d);
  const y = new Float32Array(rows * d);
  const cache = createRmsNormCache(rows);
  rmsnormForward(be, w, x, y, rows, d, eps, cache);
  const dy = randn(rng, y.length);
  const dx = new Float32Array(x.length);
  rmsnormBackward(be, w, dy, dx, rows, d, eps, cache);
  const x64 = f64(x);
  const w64 = f64(w.data);
  checkGradients(t, 'rmsnorm',
    [
      { name: 'x', grad: dx, value: x64 },
      { name: 'weight', grad: w.grad, value: w64 },
    ],
    () => dot(dy, rms64(x64, rows, d, w64, eps)),
  );
});

for (const bias of [false, true]) {
  test(`linear${bias ? ' with bias' : ''}`, (t) => {
    const rng = new Rng(3);
    const rows = 5;
    const inF = 6;
    const outF = 4;
    const l = randLinear(rng, 'lin', inF, outF, bias);
    const x = randn(rng, rows * inF);
    const y = new Float32Array(rows * outF);
    const cache = l.createCache();
    l.forward(be, x, y, rows, cache);
    const dy = randn(rng, y.length);
    const dx = new Float32Array(x.length);
    l.backward(be, dy, dx, rows, cache);
    const list: Checked[] = [];
    const L = lin64Of(l, list);
    const x64 = f64(x);
    list.push({ name: 'x', grad: dx, value: x64 });
    checkGradients(t, 'linear', list, () => dot(dy, linear64(x64, rows, inF, outF, L)));
  });
}

for (const [freeze, rslora] of [['none', false], ['A', false], ['B', true]] as const) {
  test(`LoRA linear (freeze ${freeze}${rslora ? ', rsLoRA' : ''})`, (t) => {
    const rng = new Rng(4);
    const rows = 5;
    const inF = 6;
    const outF = 7;
    const r = 3;
    const base = randLinear(rng, 'proj', inF, outF, true);
    const l = new LoraLinear(base, r, 5, rslora);
    l.A.set(randn(rng, r * inF, 0.5));
    l.B.set(randn(rng, outF * r, 0.5));
    l.A.setRequiresGrad(freeze !== 'A');
    l.B.setRequiresGrad(freeze !== 'B');
    assert.equal(l.scaling, rslora ? 5 / Math.sqrt(3) : 5 / 3);
    const x = randn(rng, rows * inF);
    const y = new Float32Array(rows * outF);
    const cache = l.createCache(rows);
    l.forward(be, x, y, rows, cache);
    const dy = randn(rng, y.length);
    const dx = new Float32Array(x.length);
    l.backward(be, dy, dx, rows, cache);
    assert.equal(l.A.grad === null, freeze === 'A');
    assert.equal(l.B.grad === null, freeze === 'B');
    const list: Checked[] = [];
    const L = lin64Of(l, list);
    const x64 = f64(x);
    list.push({ name: 'x', grad: dx, value: x64 });
    checkGradients(t, 'lora', list, () => dot(dy, linear64(x64, rows, inF, outF, L)));
  });
}

test('attention (GQA 4/2, head_dim ≠ hidden/heads, biases, batch of 2)', (t) => {
  const rng = new Rng(5);
  const B = 2;
  const T = 5;
  const d = 6;
  const H = 4;
  const Hkv = 2;
  const hd = 4;
  const theta = 100;
  const attn: Attention = {
    q: randLinear(rng, 'q', d, H * hd, true),
    k: randLinear(rng, 'k', d, Hkv * hd, true),
    v: randLinear(rng, 'v', d, Hkv * hd, true),
    o: randLinear(rng, 'o', H * hd, d, true),
    numHeads: H,
    numKvHeads: Hkv,
    headDim: hd,
  };
  const N = B * T;
  const rope = new RopeTables(hd, theta, T);
  const cache = createAttentionCache(attn, N, B * H * T * T);
  const scratch = createAttentionScratch(attn, N, B * H * T * T);
  const x = randn(rng, N * d);
  const y = new Float32Array(N * d);
  attentionForward(be, attn, x, y, B, T, rope, cache);
  const dy = randn(rng, y.length);
  const dx = new Float32Array(x.length);
  attentionBackward(be, attn, dy, dx, rope, cache, scratch);
  const list: Checked[] = [];
  const p: Attn64 = { q: lin64Of(attn.q, list), k: lin64Of(attn.k, list), v: lin64Of(attn.v, list), o: lin64Of(attn.o, list), H, Hkv, hd, d, theta };
  const x64 = f64(x);
  list.push({ name: 'x', grad: dx, value: x64 });
  const ref = attention64(x64, B, T, p);
  assert.ok(fwdError(y, ref) < 1e-6, 'attention forward differs from the float64 reference');
  checkGradients(t, 'attention', list, () => dot(dy, attention64(x64, B, T, p)));
});

test('mlp (swiglu)', (t) => {
  const rng = new Rng(6);
  const rows = 6;
  const d = 5;
  const f = 8;
  const mlp: Mlp = { gate: randLinear(rng, 'gate', d, f, false), up: randLinear(rng, 'up', d, f, true), down: randLinear(rng, 'down', f, d, false) };
  const cache = createMlpCache(mlp, rows);
  const scratch = createMlpScratch(f, rows);
  const x = randn(rng, rows * d);
  const y = new Float32Array(rows * d);
  mlpForward(be, mlp, x, y, rows, cache);
  const dy = randn(rng, y.length);
  const dx = new Float32Array(x.length);
  mlpBackward(be, mlp, dy, dx, cache, scratch);
  const list: Checked[] = [];
  const p: Mlp64 = { gate: lin64Of(mlp.gate, list), up: lin64Of(mlp.up, list), down: lin64Of(mlp.down, list), d, f };
  const x64 = f64(x);
  list.push({ name: 'x', grad: dx, value: x64 });
  checkGradients(t, 'mlp', list, () => dot(dy, mlp64(x64, rows, p)));
});

// ---------------------------------------------------------------------------------------------
// Losses and the classification head

test('causal LM cross-entropy with padding and a loss mask', (t) => {
  const rng = new Rng(7);
  const B = 2;
  const T = 5;
  const V = 9;
  const ids = Int32Array.from({ length: B * T }, () => rng.int(V));
  const lengths = [5, 3];
  const mask = Uint8Array.from([1, 1, 0, 1, 1, 1, 1, 1, 0, 0]);
  const logits = randn(rng, B * T * V, 2);
  const dLogits = new Float32Array(logits.length);
  const r = causalLmLoss(be, logits, ids, B, T, V, { lengths, lossMask: mask, dLogits });
  const tg = targets64(ids, B, T, lengths, mask);
  assert.equal(r.count, tg.filter((t) => t >= 0).length);
  const l64 = f64(logits);
  assert.ok(Math.abs(r.loss - ce64(l64, tg, B * T, V)) < 1e-6);
  checkGradients(t, 'causal CE', [{ name: 'logits', grad: dLogits, value: l64 }], () => ce64(l64, tg, B * T, V));
});

test('KL divergence to teacher logits at temperature 2 (T² scaling, mean over real tokens)', (t) => {
  const rng = new Rng(8);
  const B = 2;
  const T = 4;
  const V = 7;
  const temp = 2;
  const rows = B * T;
  const student = randn(rng, rows * V, 2);
  const teacher = randn(rng, rows * V, 2);
  const weights = realTokenWeights(B, T, [4, 2]);
  const dLogits = new Float32Array(student.length);
  const r = klDivLoss(student, teacher, rows, V, { temperature: temp, weights, dLogits });
  assert.equal(r.count, 6);
  const s64 = f64(student);
  const kl = (): number => {
    let sum = 0;
    for (let row = 0; row < rows; row++) {
      if (!weights[row]) continue;
      const ls = logSumExp(s64, row * V, V, temp);
      const lt = logSumExp(teacher, row * V, V, temp);
      for (let j = 0; j < V; j++) {
        const lpt = teacher[row * V + j]! / temp - lt;
        sum += Math.exp(lpt) * (lpt - (s64[row * V + j]! / temp - ls));
      }
    }
    return (temp * temp * sum) / 6;
  };
  assert.ok(Math.abs(r.loss - kl()) < 1e-9);
  checkGradients(t, 'KL', [{ name: 'student logits', grad: dLogits, value: s64 }], kl);
  // KL of a distribution with itself is zero.
  assert.ok(Math.abs(klDivLoss(teacher, teacher, rows, V, { temperature: temp }).loss) < 1e-12);
});

test('classification cross-entropy', (t) => {
  const rng = new Rng(9);
  const B = 4;
  const L = 3;
  const logits = randn(rng, B * L, 2);
  const labels = [2, 0, -100, 1];
  const dLogits = new Float32Array(logits.length);
  const r = classificationLoss(be, logits, labels, B, L, { dLogits });
  assert.equal(r.count, 3);
  const l64 = f64(logits);
  checkGradients(t, 'classification CE', [{ name: 'logits', grad: dLogits, value: l64 }], () => ce64(l64, labels, B, L));
});

test('sequence-classification head (last real token pooled)', (t) => {
  const rng = new Rng(10);
  const B = 3;
  const T = 4;
  const d = 5;
  const L = 3;
  const lengths = [4, 1, 2];
  const head = SequenceClassificationHead.random(d, L, 11, 0.5);
  const hidden = randn(rng, B * T * d);
  const logits = head.forward(be, hidden, B, T, lengths);
  const labels = [1, 2, 0];
  const dLogits = new Float32Array(B * L);
  classificationLoss(be, logits, labels, B, L, { dLogits });
  const dHidden = head.backward(be, dLogits);
  const h64 = f64(hidden);
  const W64 = f64(head.score.weight.data);
  const f = (): number => {
    const out = new Float64Array(B * L);
    for (let b = 0; b < B; b++) {
      const row = b * T + lengths[b]! - 1;
      for (let k = 0; k < L; k++) for (let j = 0; j < d; j++) out[b * L + k] += W64[k * d + j]! * h64[row * d + j]!;
    }
    return ce64(out, labels, B, L);
  };
  checkGradients(t, 'classification head',
    [
      { name: 'score.weight', grad: head.score.weight.grad, value: W64 },
      { name: 'hidden', grad: dHidden, value: h64 },
    ],
    f,
  );
});

// ---------------------------------------------------------------------------------------------
// The whole model

const TINY = makeLlamaConfig({ vocabSize: 11, hiddenSize: 8, intermediateSize: 12, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 4, ropeTheta: 500 });

/** Parameters with norm weights away from 1, so their gradients are not special. */
function tinyModel(c: LlamaConfig, seed: number): LlamaModel {
  const m = LlamaModel.random(c, seed, { backend: be, std: 0.4 });
  const rng = new Rng(seed + 1);
  for (const p of m.parameters()) {
    if (p.name.endsWith('norm.weight')) p.set(randn(rng, p.size, 0.2, 1));
    if (p.name.endsWith('.bias')) p.set(randn(rng, p.size, 0.2));
  }
  return m;
}

function loraInfo(m: LlamaModel): Map<string, { rank: number; s: number }> {
  const out = new Map<string, { rank: number; s: number }>();
  for (const s of m.linearSlots()) {
    const l = s.get();
    if (l instanceof LoraLinear) out.set(s.name, { rank: l.rank, s: l.scaling });
  }
  return out;
}

function checkedParameters(m: LlamaModel): { P: Map<string, F64>; list: Checked[] } {
  const P = new Map<string, F64>();
  const list: Checked[] = [];
  for (const p of m.parameters()) {
    const v = f64(p.data);
    P.set(p.name, v);
    if (p.requiresGrad) list.push({ name: p.name, grad: p.grad, value: v });
  }
  return { P, list };
}

for (const variant of ['untied', 'tied, Qwen2/attention_bias/mlp_bias biases'] as const) {
  test(`whole model, causal LM loss (${variant})`, (t) => {
    const c: LlamaConfig =
      variant === 'untied' ? TINY : { ...TINY, tieWordEmbeddings: true, qkvBias: true, oBias: true, mlpBias: true, numKvHeads: 1 };
    const model = tinyModel(c, 20);
    model.setTrainable();
    const B = 2;
    const T = 5;
    const rng = new Rng(21);
    const ids = Int32Array.from({ length: B * T }, () => rng.int(c.vocabSize));
    const lengths = [5, 3];
    const mask = Uint8Array.from([1, 1, 1, 0, 1, 1, 1, 1, 1, 1]);
    const logits = model.forward(ids, B, T);
    const { P, list } = checkedParameters(model);
    const fwdErr = fwdError(logits, model64(c, P, ids, B, T, new Map()));
    assert.ok(fwdErr < 1e-5, `forward differs from the float64 reference: ${fwdErr}`);
    const dLogits = new Float32Array(logits.length);
    causalLmLoss(be, logits, ids, B, T, c.vocabSize, { lengths, lossMask: mask, dLogits });
    model.backward(dLogits);
    assert.equal(list.length, model.parameters().length);
    const tg = targets64(ids, B, T, lengths, mask);
    const worst = checkGradients(t, 'model', list, () => ce64(model64(c, P, ids, B, T, new Map()), tg, B * T, c.vocabSize));
    assert.ok(worst <= TOL);
  });
}

test('whole model with LoRA (base frozen) and a classification head', (t) => {
  const c = TINY;
  const model = tinyModel(c, 30);
  const modules = attachLora(model, {
    targets: ['q_proj', 'v_proj', 'down_proj'],
    rank: 2,
    alpha: 3,
    seed: 31,
    init: (m) => new Rng(32 + (m.layer ?? 9)).fillNormal(m.B, 0.5),
  });
  assert.equal(modules.length, 6);
  const head = SequenceClassificationHead.random(c.hiddenSize, 3, 33, 0.5);
  const B = 2;
  const T = 4;
  const rng = new Rng(34);
  const ids = Int32Array.from({ length: B * T }, () => rng.int(c.vocabSize));
  const lengths = [2, 4];
  const labels = [2, 0];
  const hidden = model.forward(ids, B, T, { output: 'hidden' });
  const logits = head.forward(be, hidden, B, T, lengths);
  const dLogits = new Float32Array(B * 3);
  classificationLoss(be, logits, labels, B, 3, { dLogits });
  model.backward(head.backward(be, dLogits));
  const trainable = model.trainableParameters().map((p) => p.name);
  assert.deepEqual(
    trainable,
    modules.flatMap((m) => [m.A.name, m.B.name]),
  );
  const { P, list } = checkedParameters(model);
  const W64 = f64(head.score.weight.data);
  list.push({ name: 'score.weight', grad: head.score.weight.grad, value: W64 });
  const lora = loraInfo(model);
  checkGradients(t, 'model + LoRA + head', list, () => {
    const h = model64(c, P, ids, B, T, lora, 'hidden');
    const out = new Float64Array(B * 3);
    for (let b = 0; b < B; b++) {
      const row = b * T + lengths[b]! - 1;
      for (let k = 0; k < 3; k++) for (let j = 0; j < c.hiddenSize; j++) out[b * 3 + k] += W64[k * c.hiddenSize + j]! * h[row * c.hiddenSize + j]!;
    }
    return ce64(out, labels, B, 3);
  });
});

test('whole model, KL distillation loss with LoRA on every linear layer', (t) => {
  const c = TINY;
  const model = tinyModel(c, 40);
  attachLora(model, { targets: /.*_proj|lm_head/, rank: 2, alpha: 4, rslora: true, init: (m) => new Rng(41).fillNormal(m.B, 0.3) });
  const B = 1;
  const T = 6;
  const rng = new Rng(42);
  const ids = Int32Array.from({ length: T }, () => rng.int(c.vocabSize));
  const teacher = randn(rng, T * c.vocabSize, 2);
  const logits = model.forward(ids, B, T);
  const dLogits = new Float32Array(logits.length);
  klDivLoss(logits, teacher, T, c.vocabSize, { temperature: 1.5, dLogits });
  model.backward(dLogits);
  const { P, list } = checkedParameters(model);
  assert.equal(list.length, 2 * (7 * c.numLayers + 1));
  const lora = loraInfo(model);
  checkGradients(t, 'model + KL', list, () => {
    const z = model64(c, P, ids, B, T, lora);
    let s = 0;
    for (let r = 0; r < T; r++) {
      const ls = logSumExp(z, r * c.vocabSize, c.vocabSize, 1.5);
      const lt = logSumExp(teacher, r * c.vocabSize, c.vocabSize, 1.5);
      for (let j = 0; j < c.vocabSize; j++) {
        const lpt = teacher[r * c.vocabSize + j]! / 1.5 - lt;
        s += Math.exp(lpt) * (lpt - (z[r * c.vocabSize + j]! / 1.5 - ls));
      }
    }
    return (1.5 * 1.5 * s) / T;
  });
});
