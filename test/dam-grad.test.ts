/**
 * Gradient checks of DAM against float64 central differences (h = 1e-5).
 *
 * The analytic gradients come from the float32 path (reference backend): the merge and its
 * backward (`damMergeForward` / `damMergeBackward`) behind the runtime's dense layer, the gated
 * `DamLinear`, and the whole DAM loss through `damLossStep` (teachers on the fly, merged model
 * forward and backward, coefficient gradients, regularisers). The finite differences come from an
 * independent float64 re-implementation written here with plain loops: the merge, a Llama
 * forward, each objective and each regulariser, evaluated at the same float32-representable
 * coefficients.
 *
 * Relative error of a tensor (one coefficient vector, or an input): max over its entries of
 * |g − ĝ| / max(|g|, |ĝ|, 1e-3·scale), g analytic, ĝ the finite difference, scale = max |ĝ| over
 * the tensor (the floor keeps entries whose gradient is almost zero from dividing by nothing).
 * Bound: 1e-3.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { ReferenceBackend } from '../src/backend/reference.js';
import { Rng } from '../src/tensor/rng.js';
import { type LlamaConfig, makeLlamaConfig } from '../src/nn/config.js';
import { Parameter } from '../src/nn/params.js';
import { Linear } from '../src/nn/layers/linear.js';
import { LlamaModel } from '../src/nn/model.js';
import { damActivation, damMergeBackward, damMergeForward, DamLinear, type DamNonLinearity } from '../src/dam/layer.js';
import { DamModel, type DamOptions } from '../src/dam/model.js';
import { damLossStep, damRegularisers, regularisedGroups, resolveLossOptions, teacherTopK, type DamBatch, type DamLossOptions, type TopKLogits } from '../src/dam/loss.js';

const be = new ReferenceBackend();
const TOL = 1e-3;
const H_FD = 1e-5;
type F64 = Float64Array;

function relError(g: ArrayLike<number>, num: ArrayLike<number>, scale: number): number {
  let worst = 0;
  for (let i = 0; i < num.length; i++) {
    const denom = Math.max(Math.abs(g[i]!), Math.abs(num[i]!), 1e-3 * scale, 1e-30);
    worst = Math.max(worst, Math.abs(g[i]! - num[i]!) / denom);
  }
  return worst;
}

interface Checked {
  name: string;
  grad: ArrayLike<number>;
  /** The float64 values the reference reads (perturbed in place). */
  value: F64;
}

/** Central differences of f over every listed value; asserts the relative error bound. */
function checkGradients(t: TestContext, label: string, list: Checked[], f: () => number): number {
  const nums = list.map((c) => {
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
    return num;
  });
  let worst = 0;
  list.forEach((c, k) => {
    const num = nums[k]!;
    let scale = 0;
    for (const x of num) scale = Math.max(scale, Math.abs(x));
    assert.ok(scale > 0, `${label}: ${c.name}: the finite differences are all zero, so the check proves nothing`);
    const err = relError(c.grad, num, scale);
    assert.ok(err <= TOL, `${label}: ${c.name}: relative error ${err.toExponential(2)} > ${TOL}`);
    worst = Math.max(worst, err);
  });
  t.diagnostic(`${label}: ${list.length} tensors, ${list.reduce((s, c) => s + c.value.length, 0)} values, max relative error ${worst.toExponential(2)}`);
  return worst;
}

function randn(rng: Rng, n: number, std = 1, mean = 0): Float32Array {
  return rng.fillNormal(new Float32Array(n), std, mean);
}

const F64_ACT: Record<DamNonLinearity, { f: (c: number) => number }> = {
  tanh: { f: Math.tanh },
  sigmoid: { f: (c) => 1 / (1 + Math.exp(-c)) },
  identity: { f: (c) => c },
};

/** Σᵢ f(cᵢ[j]) Wᵢ[o, j] in float64. */
function merge64(sources: readonly ArrayLike<number>[], coeffs: readonly F64[], rows: number, cols: number, f: DamNonLinearity): F64 {
  const out = new Float64Array(rows * cols);
  sources.forEach((w, i) => {
    for (let o = 0; o < rows; o++) for (let j = 0; j < cols; j++) out[o * cols + j] += F64_ACT[f].f(coeffs[i]![j]!) * w[o * cols + j]!;
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// float64 Llama forward

function lin64(x: F64, rows: number, inF: number, outF: number, W: ArrayLike<number>, b: ArrayLike<number> | null): F64 {
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

function rms64(x: F64, rows: number, d: number, w: ArrayLike<number>, eps: number): F64 {
  const y = new Float64Array(rows * d);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let j = 0; j < d; j++) ss += x[r * d + j]! ** 2;
    const inv = 1 / Math.sqrt(ss / d + eps);
    for (let j = 0; j < d; j++) y[r * d + j] = x[r * d + j]! * inv * w[j]!;
  }
  return y;
}

function rope64(x: F64, N: number, T: number, heads: number, hd: number, theta: number): F64 {
  const y = new Float64Array(x.length);
  const h = hd / 2;
  for (let n = 0; n < N; n++) {
    const p = n % T;
    for (let k = 0; k < heads; k++) {
      const o = (n * heads + k) * hd;
      for (let i = 0; i < h; i++) {
        const ang = p * Math.pow(theta, (-2 * i) / hd);
        y[o + i] = x[o + i]! * Math.cos(ang) - x[o + i + h]! * Math.sin(ang);
        y[o + i + h] = x[o + i + h]! * Math.cos(ang) + x[o + i]! * Math.sin(ang);
      }
    }
  }
  return y;
}

type P64 = Map<string, ArrayLike<number>>;

function model64(c: LlamaConfig, P: P64, ids: ArrayLike<number>, B: number, T: number): F64 {
  const d = c.hiddenSize;
  const N = B * T;
  const H = c.numHeads;
  const Hkv = c.numKvHeads;
  const hd = c.headDim;
  const qd = H * hd;
  const kvd = Hkv * hd;
  const f = c.intermediateSize;
  const lin = (x: F64, path: string, inF: number, outF: number) => lin64(x, N, inF, outF, P.get(`${path}.weight`)!, P.get(`${path}.bias`) ?? null);
  const E = P.get('model.embed_tokens.weight')!;
  let x = new Float64Array(N * d);
  for (let n = 0; n < N; n++) for (let j = 0; j < d; j++) x[n * d + j] = E[ids[n]! * d + j]!;
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}`;
    const h1 = rms64(x, N, d, P.get(`${p}.input_layernorm.weight`)!, c.rmsNormEps);
    const q = rope64(lin(h1, `${p}.self_attn.q_proj`, d, qd), N, T, H, hd, c.ropeTheta);
    const k = rope64(lin(h1, `${p}.self_attn.k_proj`, d, kvd), N, T, Hkv, hd, c.ropeTheta);
    const v = lin(h1, `${p}.self_attn.v_proj`, d, kvd);
    const ctx = new Float64Array(N * qd);
    const sc = new Float64Array(T);
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        const g = Math.floor(h / (H / Hkv));
        for (let t = 0; t < T; t++) {
          let max = -Infinity;
          for (let u = 0; u <= t; u++) {
            let s = 0;
            for (let i = 0; i < hd; i++) s += q[(b * T + t) * qd + h * hd + i]! * k[(b * T + u) * kvd + g * hd + i]!;
            sc[u] = s / Math.sqrt(hd);
            max = Math.max(max, sc[u]!);
          }
          let z = 0;
          for (let u = 0; u <= t; u++) z += Math.exp(sc[u]! - max);
          for (let u = 0; u <= t; u++) {
            const pr = Math.exp(sc[u]! - max) / z;
            for (let i = 0; i < hd; i++) ctx[(b * T + t) * qd + h * hd + i] += pr * v[(b * T + u) * kvd + g * hd + i]!;
          }
        }
      }
    }
    const a = lin(ctx, `${p}.self_attn.o_proj`, qd, d);
    const xm = x.map((val, j) => val + a[j]!);
    const h2 = rms64(xm, N, d, P.get(`${p}.post_attention_layernorm.weight`)!, c.rmsNormEps);
    const gt = lin(h2, `${p}.mlp.gate_proj`, d, f);
    const up = lin(h2, `${p}.mlp.up_proj`, d, f);
    const act = gt.map((val, j) => (val / (1 + Math.exp(-val))) * up[j]!);
    const m = lin(act, `${p}.mlp.down_proj`, f, d);
    x = xm.map((val, j) => val + m[j]!);
  }
  const hidden = rms64(x, N, d, P.get('model.norm.weight')!, c.rmsNormEps);
  return lin64(hidden, N, d, c.vocabSize, c.tieWordEmbeddings ? E : P.get('lm_head.weight')!, null);
}

// ---------------------------------------------------------------------------------------------
// float64 objectives and regularisers

function logSoftmax(z: ArrayLike<number>, temp: number): F64 {
  let max = -Infinity;
  for (let j = 0; j < z.length; j++) max = Math.max(max, z[j]! / temp);
  let s = 0;
  for (let j = 0; j < z.length; j++) s += Math.exp(z[j]! / temp - max);
  const lse = max + Math.log(s);
  return Float64Array.from(z, (v) => v / temp - lse);
}

interface Obj64 {
  objective: 'kl' | 'mse' | 'entropy';
  temperature: number;
  mseWeight: number;
  entropyWeight: number;
}

/** Mean over real rows of the objective of one source. */
function sourceTerm64(o: Obj64, zs: F64, teacher: ArrayLike<number> | TopKLogits | null, B: number, T: number, lengths: number[], V: number): number {
  let sum = 0;
  let count = 0;
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < lengths[b]!; t++) {
      const r = b * T + t;
      count++;
      let s: F64;
      let tz: F64 | null = null;
      if (teacher && 'indices' in teacher) {
        const k = teacher.k;
        s = Float64Array.from({ length: k }, (_, q) => zs[r * V + teacher.indices[r * k + q]!]!);
        tz = Float64Array.from(teacher.values.subarray(r * k, (r + 1) * k));
      } else {
        s = zs.slice(r * V, (r + 1) * V);
        if (teacher) tz = Float64Array.from({ length: V }, (_, j) => teacher[r * V + j]!);
      }
      const K = s.length;
      const T2 = o.temperature * o.temperature;
      if (o.objective === 'kl') {
        const ls = logSoftmax(s, o.temperature);
        const lt = logSoftmax(tz!, o.temperature);
        let kl = 0;
        for (let j = 0; j < K; j++) kl += Math.exp(lt[j]!) * (lt[j]! - ls[j]!);
        sum += T2 * kl;
      } else if (o.objective === 'mse') {
        let m = 0;
        for (let j = 0; j < K; j++) m += (s[j]! - tz![j]!) ** 2;
        sum += (o.mseWeight * m) / K;
      } else {
        const ls = logSoftmax(s, o.temperature);
        let h = 0;
        for (let j = 0; j < K; j++) h -= Math.exp(ls[j]!) * ls[j]!;
        sum += o.entropyWeight * T2 * h;
      }
    }
  }
  return sum / count;
}

function regs64(groups: F64[][], l: { cosine: number; l1: number; l2: number; overlap: number }): number {
  let total = 0;
  for (const g of groups) {
    const n = g.length;
    const pairs = (n * (n - 1)) / 2;
    const norm = (v: F64) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
    for (let a = 0; a < n; a++) {
      for (let b = a + 1; b < n; b++) {
        let dot = 0;
        let ov = 0;
        for (let j = 0; j < g[a]!.length; j++) {
          dot += g[a]![j]! * g[b]![j]!;
          ov += Math.min(Math.abs(g[a]![j]!), Math.abs(g[b]![j]!));
        }
        total += (l.cosine / pairs) * (dot / (norm(g[a]!) * norm(g[b]!)));
        total += (l.overlap / pairs) * ov;
      }
    }
    for (const v of g) total += l.l1 * v.reduce((s, x) => s + Math.abs(x), 0) + l.l2 * norm(v);
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// The DAM layer

const ACTS: DamNonLinearity[] = ['tanh', 'sigmoid', 'identity'];

for (const f of ACTS) {
  test(`DAM layer (${f}): materialised and gated forms agree with float64 finite differences`, (t) => {
    const rng = new Rng(ACTS.indexOf(f) + 1);
    const N = 3;
    const rows = 5;
    const inF = 6;
    const outF = 4;
    const act = damActivation(f);
    const W = Array.from({ length: N }, () => randn(rng, outF * inF, 0.5));
    const bias = Array.from({ length: N }, () => randn(rng, outF, 0.5));
    const coeffs = Array.from({ length: N }, (_, i) => new Parameter(`l.mergers.${i}`, [inF], randn(rng, inF, 0.4, 1 / N)));
    const biasCoeffs = Array.from({ length: N }, (_, i) => new Parameter(`l.bias_mergers.${i}`, [1], randn(rng, 1, 0.4, 1 / N)));
    const x = randn(rng, rows * inF);
    const dy = randn(rng, rows * outF);

    // Materialised: merged weight and bias behind the runtime's dense layer.
    const wP = new Parameter('l.weight', [outF, inF], new Float32Array(outF * inF));
    const bP = new Parameter('l.bias', [outF], new Float32Array(outF));
    const cData = coeffs.map((c) => c.data);
    const bcData = biasCoeffs.map((c) => c.data);
    damMergeForward(wP.data, W, cData, outF, inF, act);
    damMergeForward(bP.data, bias, bcData, outF, 1, act);
    wP.setRequiresGrad(true);
    bP.setRequiresGrad(true);
    const dense = new Linear('l', wP, bP);
    const cache = dense.createCache();
    const y1 = new Float32Array(rows * outF);
    dense.forward(be, x, y1, rows, cache);
    const dx1 = new Float32Array(rows * inF);
    dense.backward(be, dy, dx1, rows, cache);
    const g1 = coeffs.map(() => new Float32Array(inF));
    const gb1 = biasCoeffs.map(() => new Float32Array(1));
    damMergeBackward(wP.grad!, W, cData, g1, outF, inF, act);
    damMergeBackward(bP.grad!, bias, bcData, gb1, outF, 1, act);

    // Gated.
    for (const p of [...coeffs, ...biasCoeffs]) p.setRequiresGrad(true);
    const gated = new DamLinear('l', W.map((w, i) => ({ weight: w, bias: bias[i]! })), coeffs, biasCoeffs, act, outF, inF);
    const gc = gated.createCache(rows);
    const y2 = new Float32Array(rows * outF);
    gated.forward(be, x, y2, rows, gc);
    const dx2 = new Float32Array(rows * inF);
    gated.backward(be, dy, dx2, rows, gc);

    let maxY = 0;
    let diffY = 0;
    for (let i = 0; i < y1.length; i++) {
      maxY = Math.max(maxY, Math.abs(y1[i]!));
      diffY = Math.max(diffY, Math.abs(y1[i]! - y2[i]!));
    }
    assert.ok(diffY / maxY < 1e-6, `gated and materialised outputs differ by ${diffY / maxY}`);

    // float64 reference: L = Σ dy ⊙ (x·W(c)ᵀ + b(c)).
    const c64 = coeffs.map((c) => Float64Array.from(c.data));
    const bc64 = biasCoeffs.map((c) => Float64Array.from(c.data));
    const x64 = Float64Array.from(x);
    const L = () => {
      const w = merge64(W, c64, outF, inF, f);
      const b = merge64(bias, bc64, outF, 1, f);
      const y = lin64(x64, rows, inF, outF, w, b);
      let s = 0;
      for (let i = 0; i < y.length; i++) s += dy[i]! * y[i]!;
      return s;
    };
    const list = (g: Float32Array[], gb: Float32Array[], dx: Float32Array): Checked[] => [
      ...coeffs.map((c, i) => ({ name: c.name, grad: g[i]!, value: c64[i]! })),
      ...biasCoeffs.map((c, i) => ({ name: c.name, grad: gb[i]!, value: bc64[i]! })),
      { name: 'x', grad: dx, value: x64 },
    ];
    checkGradients(t, `materialised ${f}`, list(g1, gb1, dx1), L);
    checkGradients(
      t,
      `gated ${f}`,
      list(
        coeffs.map((c) => c.grad!),
        biasCoeffs.map((c) => c.grad!),
        dx2,
      ),
      L,
    );
  });
}

// ---------------------------------------------------------------------------------------------
// The whole DAM loss

const TINY = makeLlamaConfig({ vocabSize: 11, hiddenSize: 8, intermediateSize: 12, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 4, ropeTheta: 500 });

function source(c: LlamaConfig, seed: number): LlamaModel {
  const m = LlamaModel.random(c, seed, { backend: be, std: 0.4 });
  const rng = new Rng(seed + 100);
  for (const p of m.parameters()) {
    if (p.name.endsWith('norm.weight')) p.set(randn(rng, p.size, 0.2, 1));
    if (p.name.endsWith('.bias')) p.set(randn(rng, p.size, 0.3));
  }
  return m;
}

interface Case {
  label: string;
  config: LlamaConfig;
  n: number;
  dam: DamOptions;
  loss: DamLossOptions;
  scales?: number[];
  topK?: number;
}

const CASES: Case[] = [
  {
    label: 'KL T=2, tanh, every linear + embeddings + norms, biases, padding, cosine + L1 + L2, per-source scales',
    config: { ...TINY, qkvBias: true, oBias: true, mlpBias: true },
    n: 3,
    dam: { embeddings: true, norms: true, nonLinearity: 'tanh' },
    loss: { objective: 'kl', temperature: 2, cosine: 0.05, l1: 1e-3, l2: 1e-3 },
    scales: [0.5, 2, 1],
  },
  {
    label: 'KL T=2 on cached top-5 teacher logits, sigmoid, gated form, tied embeddings with coefficients, overlap',
    config: { ...TINY, tieWordEmbeddings: true, numKvHeads: 1 },
    n: 2,
    dam: { embeddings: true, nonLinearity: 'sigmoid', form: 'gate' },
    loss: { objective: 'kl', temperature: 2, cosine: 0.05, overlap: 1e-2 },
    topK: 5,
  },
  {
    label: 'MSE on logits, identity, q/v/lm_head only',
    config: TINY,
    n: 3,
    dam: { targets: ['q_proj', 'v_proj', 'lm_head'], nonLinearity: 'identity' },
    loss: { objective: 'mse', cosine: 0.01 },
  },
  {
    label: 'entropy of the merge, tanh, gated form',
    config: TINY,
    n: 2,
    dam: { form: 'gate' },
    loss: { objective: 'entropy', temperature: 2, cosine: 0.01 },
  },
];

for (const cs of CASES) {
  test(`whole DAM loss: ${cs.label}`, (t) => {
    const c = cs.config;
    const sources = Array.from({ length: cs.n }, (_, i) => source(c, 10 * (i + 1)));
    const dam = DamModel.fromModels(sources, { ...cs.dam, backend: be });
    const rng = new Rng(7);
    for (const p of dam.coefficients()) p.set(randn(rng, p.size, 0.3, 1 / cs.n));
    dam.coefficientsChanged();
    const B = 2;
    const T = 4;
    const lengths = [4, 3];
    const batches: DamBatch[] = sources.map(() => ({
      ids: Int32Array.from({ length: B * T }, () => rng.int(c.vocabSize)),
      batch: B,
      seqLen: T,
      lengths,
    }));
    const loss = resolveLossOptions(cs.loss);
    const V = c.vocabSize;
    const teachers: TopKLogits[] | undefined = cs.topK
      ? batches.map((b, i) => teacherTopK(Float32Array.from(sources[i]!.forward(b.ids, B, T)), B * T, V, cs.topK!))
      : undefined;
    dam.zeroGrad();
    const value = damLossStep(dam, batches, loss, { scales: cs.scales, teachers });

    // float64: teachers once, then the loss as a function of the float64 coefficients.
    const srcParams = sources.map((s) => s.namedParameters());
    const teacher64 = batches.map((b, i) => {
      const P: P64 = new Map([...srcParams[i]!].map(([k, p]) => [k, p.data]));
      return model64(c, P, b.ids, B, T);
    });
    const coeff64 = new Map(dam.coefficients().map((p) => [p.name, Float64Array.from(p.data)]));
    const f = dam.act.name;
    const L = () => {
      const P: P64 = new Map();
      for (const tn of dam.tensors) {
        const srcs = tn.sources;
        if (tn.coefficientNames) P.set(tn.name, merge64(srcs, tn.coefficientNames.map((x) => coeff64.get(x)!), tn.rows, tn.cols, f));
        else P.set(tn.name, merge64(srcs, srcs.map(() => new Float64Array(tn.cols).fill(1 / cs.n)), tn.rows, tn.cols, 'identity'));
      }
      let total = 0;
      batches.forEach((b, i) => {
        const zs = model64(c, P, b.ids, B, T);
        const teacher = cs.topK ? teachers![i]! : loss.objective === 'entropy' ? null : teacher64[i]!;
        total += (cs.scales?.[i] ?? 1) * sourceTerm64(loss, zs, teacher, B, T, lengths, V);
      });
      const groups = regularisedGroups(dam).map((g) => g.map((p) => coeff64.get(p.name)!));
      return total + regs64(groups, loss);
    };
    const ref = L();
    assert.ok(Math.abs(value.total - ref) <= 1e-5 * Math.max(1, Math.abs(ref)), `loss ${value.total} differs from the float64 loss ${ref}`);
    const list: Checked[] = dam.coefficients().map((p) => ({ name: p.name, grad: p.grad!, value: coeff64.get(p.name)! }));
    assert.ok(list.length > 0);
    checkGradients(t, cs.label.split(',')[0]!, list, L);
    dam.dispose();
  });
}

test('gated and materialised DAM models give the same logits and coefficient gradients', () => {
  const c = { ...TINY, qkvBias: true };
  const sources = [source(c, 1), source(c, 2), source(c, 3)];
  const make = (form: 'gate' | 'materialise') => {
    const dam = DamModel.fromModels(sources, { form, backend: be });
    const rng = new Rng(5);
    for (const p of dam.coefficients()) p.set(randn(rng, p.size, 0.3, 0.3));
    dam.coefficientsChanged();
    return dam;
  };
  const a = make('materialise');
  const b = make('gate');
  const rng = new Rng(9);
  const batches: DamBatch[] = sources.map(() => ({ ids: Int32Array.from({ length: 12 }, () => rng.int(c.vocabSize)), batch: 2, seqLen: 6, lengths: [6, 4] }));
  const la = Float32Array.from(a.forward(batches[0]!.ids, 2, 6));
  const lb = Float32Array.from(b.forward(batches[0]!.ids, 2, 6));
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < la.length; i++) {
    diff = Math.max(diff, Math.abs(la[i]! - lb[i]!));
    scale = Math.max(scale, Math.abs(la[i]!));
  }
  assert.ok(diff / scale < 1e-5, `logits differ by ${diff / scale}`);
  const loss = resolveLossOptions({});
  a.zeroGrad();
  b.zeroGrad();
  const va = damLossStep(a, batches, loss);
  const vb = damLossStep(b, batches, loss);
  assert.ok(Math.abs(va.total - vb.total) < 1e-5 * va.total);
  const gb = new Map(b.coefficients().map((p) => [p.name, p.grad!]));
  let gmax = 0;
  for (const p of a.coefficients()) for (const v of p.grad!) gmax = Math.max(gmax, Math.abs(v));
  for (const p of a.coefficients()) {
    const g = gb.get(p.name)!;
    for (let j = 0; j < p.size; j++) assert.ok(Math.abs(p.grad![j]! - g[j]!) <= 1e-4 * gmax, `${p.name}[${j}]: ${p.grad![j]} vs ${g[j]}`);
  }
  a.dispose();
  b.dispose();
});

test('the cosine term is 1 per layer with zero gradient at equal coefficients', () => {
  const groups = [0, 1, 2].map((k) => Array.from({ length: 3 }, (_, i) => new Parameter(`m${k}.mergers.${i}`, [5], new Float32Array(5).fill(1 / 3))));
  for (const g of groups) for (const p of g) p.setRequiresGrad(true);
  const v = damRegularisers(groups, { cosine: 0.01, l1: 0, l2: 0, overlap: 0 });
  assert.ok(Math.abs(v.cosine - 0.03) < 1e-12, `cosine term ${v.cosine}`);
  for (const g of groups) for (const p of g) for (const x of p.grad!) assert.ok(Math.abs(x) < 1e-12, `gradient ${x}`);
});

test('identical sources with the exact-soup start reproduce the source model', () => {
  const c = TINY;
  const m = source(c, 4);
  const copy = source(c, 4);
  const dam = DamModel.fromModels([m, copy, source(c, 4)], { init: 'soup', embeddings: true, norms: true, backend: be });
  const ids = Int32Array.from([1, 5, 2, 9, 3, 7]);
  const want = Float32Array.from(m.forward(ids, 1, 6));
  const got = dam.forward(ids, 1, 6);
  for (let i = 0; i < want.length; i++) assert.ok(Math.abs(want[i]! - got[i]!) <= 1e-5 * Math.max(1, Math.abs(want[i]!)), `logit ${i}: ${got[i]} vs ${want[i]}`);
  const kl = damLossStep(dam, [0, 1, 2].map(() => ({ ids, batch: 1, seqLen: 6 })), resolveLossOptions({ cosine: 0 }), { backward: false });
  for (const v of kl.perSource) assert.ok(v < 1e-9, `KL ${v}`);
  dam.dispose();
});
