/**
 * The reference backend: every op as a plain loop, accumulating in float64, written to be read
 * rather than to be fast. The tests check the fast backends against it.
 */
import { composedAttention, composedAttentionBackward } from './attention.js';
import {
  type AttentionOptions,
  type Backend,
  type BatchedMatmulOptions,
  type CrossEntropyOptions,
  type MatmulOptions,
  type SoftmaxOptions,
  checkCrossEntropy,
  checkDims,
  checkEmbedding,
  checkLength,
  checkRope,
  planAttention,
  planMatmul,
  planSoftmax,
} from './backend.js';

function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

export class ReferenceBackend implements Backend {
  readonly name = 'reference';

  matmul(
    a: Float32Array,
    b: Float32Array,
    out: Float32Array,
    M: number,
    K: number,
    N: number,
    opts?: MatmulOptions,
  ): void {
    this.matmulBatched(a, b, out, 1, M, K, N, opts);
  }

  matmulBatched(
    a: Float32Array,
    b: Float32Array,
    out: Float32Array,
    batch: number,
    M: number,
    K: number,
    N: number,
    opts?: BatchedMatmulOptions,
  ): void {
    const p = planMatmul('matmul', a, b, out, batch, M, K, N, opts);
    for (let t = 0; t < batch; t++) {
      const a0 = t * p.strideA;
      const b0 = t * p.strideB;
      const c0 = t * p.strideC;
      for (let i = 0; i < M; i++) {
        for (let j = 0; j < N; j++) {
          let s = 0;
          for (let k = 0; k < K; k++) {
            s += a[a0 + i * p.sai + k * p.sak]! * b[b0 + k * p.sbk + j * p.sbj]!;
          }
          const c = c0 + i * p.ldc + j;
          out[c] = p.alpha * s + (p.accumulate ? out[c]! : 0);
        }
      }
    }
  }

  add(a: Float32Array, b: Float32Array, out: Float32Array, n: number): void {
    checkElementwise('add', n, a, b, out);
    for (let i = 0; i < n; i++) out[i] = a[i]! + b[i]!;
  }

  mul(a: Float32Array, b: Float32Array, out: Float32Array, n: number): void {
    checkElementwise('mul', n, a, b, out);
    for (let i = 0; i < n; i++) out[i] = a[i]! * b[i]!;
  }

  scale(x: Float32Array, alpha: number, out: Float32Array, n: number): void {
    checkElementwise('scale', n, x, out);
    for (let i = 0; i < n; i++) out[i] = alpha * x[i]!;
  }

  axpy(alpha: number, x: Float32Array, y: Float32Array, n: number): void {
    checkElementwise('axpy', n, x, y);
    for (let i = 0; i < n; i++) y[i] = y[i]! + alpha * x[i]!;
  }

  rmsnorm(
    x: Float32Array,
    weight: Float32Array,
    out: Float32Array,
    rows: number,
    dim: number,
    eps: number,
    invRms?: Float32Array,
  ): void {
    checkRmsnorm('rmsnorm', x, weight, out, rows, dim);
    if (invRms) checkLength('rmsnorm', 'invRms', invRms, rows);
    for (let r = 0; r < rows; r++) {
      const inv = referenceInvRms(x, r * dim, dim, eps);
      if (invRms) invRms[r] = inv;
      for (let j = 0; j < dim; j++) out[r * dim + j] = x[r * dim + j]! * inv * weight[j]!;
    }
  }

  rmsnormBackward(
    x: Float32Array,
    weight: Float32Array,
    invRms: Float32Array | null,
    dOut: Float32Array,
    dx: Float32Array,
    dWeight: Float32Array | null,
    rows: number,
    dim: number,
    eps: number,
  ): void {
    checkRmsnorm('rmsnormBackward', x, weight, dx, rows, dim);
    checkLength('rmsnormBackward', 'dOut', dOut, rows * dim);
    if (invRms) checkLength('rmsnormBackward', 'invRms', invRms, rows);
    if (dWeight) checkLength('rmsnormBackward', 'dWeight', dWeight, dim);
    const g = new Float64Array(dim);
    for (let r = 0; r < rows; r++) {
      const o = r * dim;
      const inv = invRms ? invRms[r]! : referenceInvRms(x, o, dim, eps);
      // y_j = w_j x_j r with r = (mean(x²) + eps)^(-1/2), so dr/dx_k = −r³ x_k / dim.
      let dot = 0;
      for (let j = 0; j < dim; j++) {
        g[j] = dOut[o + j]! * weight[j]!;
        dot += g[j]! * x[o + j]!;
      }
      if (dWeight) {
        for (let j = 0; j < dim; j++) dWeight[j] = dWeight[j]! + dOut[o + j]! * x[o + j]! * inv;
      }
      const c = (inv * inv * inv * dot) / dim;
      for (let j = 0; j < dim; j++) dx[o + j] = inv * g[j]! - c * x[o + j]!;
    }
  }

  softmax(x: Float32Array, out: Float32Array, rows: number, cols: number, opts?: SoftmaxOptions): void {
    const s = planSoftmax(x, out, rows, cols, opts);
    const e = new Float64Array(cols);
    for (let r = 0; r < rows; r++) {
      const o = r * cols;
      const limit = s.causal ? Math.min(cols, s.queryOffset + (r % s.queryLen) + 1) : cols;
      let max = -Infinity;
      for (let j = 0; j < limit; j++) max = Math.max(max, x[o + j]!);
      let sum = 0;
      for (let j = 0; j < limit; j++) {
        e[j] = Math.exp(x[o + j]! - max);
        sum += e[j]!;
      }
      for (let j = 0; j < cols; j++) out[o + j] = j < limit ? e[j]! / sum : 0;
    }
  }

  softmaxBackward(y: Float32Array, dOut: Float32Array, dx: Float32Array, rows: number, cols: number): void {
    checkDims('softmaxBackward', { rows, cols });
    checkElementwise('softmaxBackward', rows * cols, y, dOut, dx);
    for (let r = 0; r < rows; r++) {
      const o = r * cols;
      let dot = 0;
      for (let j = 0; j < cols; j++) dot += y[o + j]! * dOut[o + j]!;
      for (let j = 0; j < cols; j++) dx[o + j] = y[o + j]! * (dOut[o + j]! - dot);
    }
  }

  silu(x: Float32Array, out: Float32Array, n: number): void {
    checkElementwise('silu', n, x, out);
    for (let i = 0; i < n; i++) out[i] = x[i]! * sigmoid(x[i]!);
  }

  siluBackward(x: Float32Array, dOut: Float32Array, dx: Float32Array, n: number): void {
    checkElementwise('siluBackward', n, x, dOut, dx);
    for (let i = 0; i < n; i++) {
      const s = sigmoid(x[i]!);
      dx[i] = dOut[i]! * s * (1 + x[i]! * (1 - s));
    }
  }

  swiglu(gate: Float32Array, up: Float32Array, out: Float32Array, n: number): void {
    checkElementwise('swiglu', n, gate, up, out);
    for (let i = 0; i < n; i++) out[i] = gate[i]! * sigmoid(gate[i]!) * up[i]!;
  }

  swigluBackward(
    gate: Float32Array,
    up: Float32Array,
    dOut: Float32Array,
    dGate: Float32Array,
    dUp: Float32Array,
    n: number,
  ): void {
    checkElementwise('swigluBackward', n, gate, up, dOut, dGate, dUp);
    for (let i = 0; i < n; i++) {
      const g = gate[i]!;
      const u = up[i]!;
      const d = dOut[i]!;
      const s = sigmoid(g);
      dGate[i] = d * u * s * (1 + g * (1 - s));
      dUp[i] = d * g * s;
    }
  }

  rope(
    x: Float32Array,
    out: Float32Array,
    cos: Float32Array,
    sin: Float32Array,
    tokens: number,
    heads: number,
    headDim: number,
    positions?: Int32Array,
  ): void {
    const half = checkRope('rope', x, out, cos, sin, tokens, heads, headDim, positions);
    referenceRotate(x, out, cos, sin, tokens, heads, headDim, half, positions, 1);
  }

  ropeBackward(
    dOut: Float32Array,
    dx: Float32Array,
    cos: Float32Array,
    sin: Float32Array,
    tokens: number,
    heads: number,
    headDim: number,
    positions?: Int32Array,
  ): void {
    const half = checkRope('ropeBackward', dOut, dx, cos, sin, tokens, heads, headDim, positions);
    referenceRotate(dOut, dx, cos, sin, tokens, heads, headDim, half, positions, -1);
  }

  crossEntropy(
    logits: Float32Array,
    targets: Int32Array,
    dLogits: Float32Array | null,
    rows: number,
    vocab: number,
    opts: CrossEntropyOptions = {},
  ): number {
    checkCrossEntropy(logits, targets, dLogits, rows, vocab, opts);
    const w = (r: number): number => (targets[r]! < 0 ? 0 : opts.weights ? opts.weights[r]! : 1);
    let total = 0;
    for (let r = 0; r < rows; r++) total += w(r);
    const denom = (opts.reduction ?? 'mean') === 'mean' ? total : 1;
    let loss = 0;
    const p = new Float64Array(vocab);
    for (let r = 0; r < rows; r++) {
      const o = r * vocab;
      const wr = w(r);
      let max = -Infinity;
      for (let j = 0; j < vocab; j++) max = Math.max(max, logits[o + j]!);
      let sum = 0;
      for (let j = 0; j < vocab; j++) {
        p[j] = Math.exp(logits[o + j]! - max);
        sum += p[j]!;
      }
      const t = targets[r]!;
      if (wr !== 0 && denom !== 0) loss += (wr * (max + Math.log(sum) - logits[o + t]!)) / denom;
      if (dLogits) {
        const f = wr === 0 || denom === 0 ? 0 : wr / denom;
        for (let j = 0; j < vocab; j++) dLogits[o + j] = f * (p[j]! / sum - (j === t ? 1 : 0));
      }
    }
    return loss;
  }

  attention(q: Float32Array, k: Float32Array, v: Float32Array, probs: Float32Array, out: Float32Array, opts: AttentionOptions): void {
    const p = planAttention('attention', opts, { q, k, v, probs, rowsOut: [out] });
    composedAttention(this, p, q, k, v, probs, out);
  }

  attentionBackward(
    q: Float32Array,
    k: Float32Array,
    v: Float32Array,
    probs: Float32Array,
    dOut: Float32Array,
    dq: Float32Array,
    dk: Float32Array,
    dv: Float32Array,
    opts: AttentionOptions,
  ): void {
    const p = planAttention('attentionBackward', opts, { q, k, v, probs, rowsOut: [dOut, dq], kvOut: [dk, dv] }, true);
    composedAttentionBackward(this, p, q, k, v, probs, dOut, dq, dk, dv);
  }

  embedding(table: Float32Array, ids: Int32Array, out: Float32Array, dim: number): void {
    checkEmbedding('embedding', table, ids, out, dim);
    for (let t = 0; t < ids.length; t++) {
      for (let j = 0; j < dim; j++) out[t * dim + j] = table[ids[t]! * dim + j]!;
    }
  }

  embeddingBackward(dOut: Float32Array, ids: Int32Array, dTable: Float32Array, dim: number): void {
    checkEmbedding('embeddingBackward', dTable, ids, dOut, dim);
    for (let t = 0; t < ids.length; t++) {
      const o = ids[t]! * dim;
      for (let j = 0; j < dim; j++) dTable[o + j] = dTable[o + j]! + dOut[t * dim + j]!;
    }
  }

  dispose(): void {}
}

function checkElementwise(op: string, n: number, ...arrays: Float32Array[]): void {
  checkDims(op, { n });
  arrays.forEach((arr, i) => checkLength(op, `argument ${i + 1}`, arr, n));
}

function checkRmsnorm(
  op: string,
  x: Float32Array,
  weight: Float32Array,
  out: Float32Array,
  rows: number,
  dim: number,
): void {
  checkDims(op, { rows, dim });
  checkLength(op, 'x', x, rows * dim);
  checkLength(op, 'weight', weight, dim);
  checkLength(op, 'output', out, rows * dim);
}

function referenceInvRms(x: Float32Array, o: number, dim: number, eps: number): number {
  let ss = 0;
  for (let j = 0; j < dim; j++) ss += x[o + j]! * x[o + j]!;
  return 1 / Math.sqrt(ss / dim + eps);
}

/** Rotates each (i, i + half) pair by the table angle, or by its negative when sign = −1. */
function referenceRotate(
  x: Float32Array,
  out: Float32Array,
  cos: Float32Array,
  sin: Float32Array,
  tokens: number,
  heads: number,
  headDim: number,
  half: number,
  positions: Int32Array | undefined,
  sign: 1 | -1,
): void {
  for (let t = 0; t < tokens; t++) {
    const p = positions ? positions[t]! : t;
    for (let h = 0; h < heads; h++) {
      const o = (t * heads + h) * headDim;
      for (let i = 0; i < half; i++) {
        const c = cos[p * half + i]!;
        const s = sign * sin[p * half + i]!;
        const x1 = x[o + i]!;
        const x2 = x[o + i + half]!;
        out[o + i] = x1 * c - x2 * s;
        out[o + i + half] = x2 * c + x1 * s;
      }
    }
  }
}
