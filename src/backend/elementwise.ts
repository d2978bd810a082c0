/**
 * The elementwise, normalisation and loss ops of the fast backends, in TypeScript. These are
 * memory-bound, so copying their operands into WebAssembly memory would cost more than it could
 * win; they run on the calling thread over the caller's arrays.
 */
import {
  type CrossEntropyOptions,
  type SoftmaxOptions,
  checkCrossEntropy,
  checkDims,
  checkEmbedding,
  checkLength,
  checkRope,
  planSoftmax,
} from './backend.js';

function checkN(op: string, n: number, a: Float32Array, b: Float32Array, c?: Float32Array): void {
  checkDims(op, { n });
  checkLength(op, 'first argument', a, n);
  checkLength(op, 'second argument', b, n);
  if (c) checkLength(op, 'third argument', c, n);
}

function checkRows(op: string, x: Float32Array, out: Float32Array, rows: number, dim: number): void {
  checkDims(op, { rows, dim });
  checkLength(op, 'input', x, rows * dim);
  checkLength(op, 'output', out, rows * dim);
}

/** 2^(i/64), i < 64. */
const EXP_FRAC = Float64Array.from({ length: 64 }, (_, i) => Math.pow(2, i / 64));
/** 2^k for k = −160 … 160, at k + 160. */
const EXP_INT = Float64Array.from({ length: 321 }, (_, i) => Math.pow(2, i - 160));

/**
 * e^x to about 1e-15 relative error over the range that matters in float32: 2^(k/64) from two
 * tables times a degree-4 polynomial for the remainder. Below −104 (where the float32 result is
 * 0) it returns 0; above 88.72 (float32 overflow) Infinity; NaN stays NaN.
 */
export function fastExp(x: number): number {
  if (!(x <= 88.72)) return x > 88.72 ? Infinity : NaN;
  if (x < -104) return 0;
  const y = x * 92.33248261689366; // 64 / ln 2
  const k = Math.floor(y);
  const f = (y - k) * 0.010830424696249145; // ln 2 / 64
  const p = 1 + f * (1 + f * (0.5 + f * (0.16666666666666666 + f * 0.041666666666666664)));
  return p * EXP_FRAC[k & 63]! * EXP_INT[(k >> 6) + 160]!;
}

function invRmsOf(x: Float32Array, o: number, dim: number, eps: number): number {
  let ss = 0;
  for (let j = o, end = o + dim; j < end; j++) {
    const v = x[j]!;
    ss += v * v;
  }
  return 1 / Math.sqrt(ss / dim + eps);
}

export class ElementwiseOps {
  add(a: Float32Array, b: Float32Array, out: Float32Array, n: number): void {
    checkN('add', n, a, b, out);
    for (let i = 0; i < n; i++) out[i] = a[i]! + b[i]!;
  }

  mul(a: Float32Array, b: Float32Array, out: Float32Array, n: number): void {
    checkN('mul', n, a, b, out);
    for (let i = 0; i < n; i++) out[i] = a[i]! * b[i]!;
  }

  scale(x: Float32Array, alpha: number, out: Float32Array, n: number): void {
    checkN('scale', n, x, out);
    for (let i = 0; i < n; i++) out[i] = alpha * x[i]!;
  }

  axpy(alpha: number, x: Float32Array, y: Float32Array, n: number): void {
    checkN('axpy', n, x, y);
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
    checkRows('rmsnorm', x, out, rows, dim);
    checkLength('rmsnorm', 'weight', weight, dim);
    if (invRms) checkLength('rmsnorm', 'invRms', invRms, rows);
    for (let r = 0, o = 0; r < rows; r++, o += dim) {
      const inv = invRmsOf(x, o, dim, eps);
      if (invRms) invRms[r] = inv;
      for (let j = 0; j < dim; j++) out[o + j] = x[o + j]! * inv * weight[j]!;
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
    const op = 'rmsnormBackward';
    checkRows(op, x, dx, rows, dim);
    checkLength(op, 'weight', weight, dim);
    checkLength(op, 'dOut', dOut, rows * dim);
    if (invRms) checkLength(op, 'invRms', invRms, rows);
    if (dWeight) checkLength(op, 'dWeight', dWeight, dim);
    for (let r = 0, o = 0; r < rows; r++, o += dim) {
      const inv = invRms ? invRms[r]! : invRmsOf(x, o, dim, eps);
      let dot = 0;
      for (let j = 0; j < dim; j++) dot += dOut[o + j]! * weight[j]! * x[o + j]!;
      if (dWeight) {
        for (let j = 0; j < dim; j++) dWeight[j] = dWeight[j]! + dOut[o + j]! * x[o + j]! * inv;
      }
      const c = (inv * inv * inv * dot) / dim;
      for (let j = 0; j < dim; j++) dx[o + j] = inv * dOut[o + j]! * weight[j]! - c * x[o + j]!;
    }
  }

  softmax(x: Float32Array, out: Float32Array, rows: number, cols: number, opts?: SoftmaxOptions): void {
    const s = planSoftmax(x, out, rows, cols, opts);
    for (let r = 0, o = 0; r < rows; r++, o += cols) {
      const limit = s.causal ? Math.max(0, Math.min(cols, s.queryOffset + (r % s.queryLen) + 1)) : cols;
      let max = -Infinity;
      for (let j = 0; j < limit; j++) {
        const v = x[o + j]!;
        if (v > max) max = v;
      }
      let sum = 0;
      for (let j = 0; j < limit; j++) {
        const e = fastExp(x[o + j]! - max);
        out[o + j] = e;
        sum += e;
      }
      const inv = 1 / sum;
      for (let j = 0; j < limit; j++) out[o + j] = out[o + j]! * inv;
      out.fill(0, o + limit, o + cols);
    }
  }

  softmaxBackward(y: Float32Array, dOut: Float32Array, dx: Float32Array, rows: number, cols: number): void {
    checkDims('softmaxBackward', { rows, cols });
    checkN('softmaxBackward', rows * cols, y, dOut, dx);
    for (let r = 0, o = 0; r < rows; r++, o += cols) {
      let dot = 0;
      for (let j = o, end = o + cols; j < end; j++) dot += y[j]! * dOut[j]!;
      for (let j = o, end = o + cols; j < end; j++) dx[j] = y[j]! * (dOut[j]! - dot);
    }
  }

  silu(x: Float32Array, out: Float32Array, n: number): void {
    checkN('silu', n, x, out);
    for (let i = 0; i < n; i++) {
      const v = x[i]!;
      out[i] = v / (1 + fastExp(-v));
    }
  }

  siluBackward(x: Float32Array, dOut: Float32Array, dx: Float32Array, n: number): void {
    checkN('siluBackward', n, x, dOut, dx);
    for (let i = 0; i < n; i++) {
      const v = x[i]!;
      const s = 1 / (1 + fastExp(-v));
      dx[i] = dOut[i]! * s * (1 + v * (1 - s));
    }
  }

  swiglu(gate: Float32Array, up: Float32Array, out: Float32Array, n: number): void {
    checkN('swiglu', n, gate, up, out);
    for (let i = 0; i < n; i++) {
      const g = gate[i]!;
      out[i] = (g / (1 + fastExp(-g))) * up[i]!;
    }
  }

  swigluBackward(
    gate: Float32Array,
    up: Float32Array,
    dOut: Float32Array,
    dGate: Float32Array,
    dUp: Float32Array,
    n: number,
  ): void {
    checkN('swigluBackward', n, gate, up, dOut);
    checkLength('swigluBackward', 'dGate', dGate, n);
    checkLength('swigluBackward', 'dUp', dUp, n);
    for (let i = 0; i < n; i++) {
      const g = gate[i]!;
      const u = up[i]!;
      const d = dOut[i]!;
      const s = 1 / (1 + fastExp(-g));
      const gs = g * s;
      dGate[i] = d * u * (s + gs * (1 - s));
      dUp[i] = d * gs;
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
    rotate(x, out, cos, sin, tokens, heads, headDim, half, positions, false);
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
    rotate(dOut, dx, cos, sin, tokens, heads, headDim, half, positions, true);
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
    const weights = opts.weights;
    let total = 0;
    for (let r = 0; r < rows; r++) if (targets[r]! >= 0) total += weights ? weights[r]! : 1;
    const denom = (opts.reduction ?? 'mean') === 'mean' ? total : 1;
    let loss = 0;
    for (let r = 0, o = 0; r < rows; r++, o += vocab) {
      const t = targets[r]!;
      const w = t < 0 || denom === 0 ? 0 : (weights ? weights[r]! : 1) / denom;
      if (w === 0) {
        if (dLogits) dLogits.fill(0, o, o + vocab);
        continue;
      }
      let max = -Infinity;
      for (let j = o, end = o + vocab; j < end; j++) {
        const v = logits[j]!;
        if (v > max) max = v;
      }
      const target = logits[o + t]!;
      let sum = 0;
      if (dLogits) {
        // One pass of exponentials into dLogits (which may be logits), then the scaling.
        for (let j = o, end = o + vocab; j < end; j++) {
          const e = fastExp(logits[j]! - max);
          dLogits[j] = e;
          sum += e;
        }
        const f = w / sum;
        for (let j = o, end = o + vocab; j < end; j++) dLogits[j] = f * dLogits[j]!;
        dLogits[o + t] = dLogits[o + t]! - w;
      } else {
        for (let j = o, end = o + vocab; j < end; j++) sum += fastExp(logits[j]! - max);
      }
      loss += w * (max + Math.log(sum) - target);
    }
    return loss;
  }

  embedding(table: Float32Array, ids: Int32Array, out: Float32Array, dim: number): void {
    checkEmbedding('embedding', table, ids, out, dim);
    for (let t = 0; t < ids.length; t++) {
      const o = ids[t]! * dim;
      out.set(table.subarray(o, o + dim), t * dim);
    }
  }

  embeddingBackward(dOut: Float32Array, ids: Int32Array, dTable: Float32Array, dim: number): void {
    checkEmbedding('embeddingBackward', dTable, ids, dOut, dim);
    for (let t = 0; t < ids.length; t++) {
      const o = ids[t]! * dim;
      const s = t * dim;
      for (let j = 0; j < dim; j++) dTable[o + j] = dTable[o + j]! + dOut[s + j]!;
    }
  }
}

function rotate(
  x: Float32Array,
  out: Float32Array,
  cos: Float32Array,
  sin: Float32Array,
  tokens: number,
  heads: number,
  headDim: number,
  half: number,
  positions: Int32Array | undefined,
  inverse: boolean,
): void {
  const sign = inverse ? -1 : 1;
  for (let t = 0; t < tokens; t++) {
    const tab = (positions ? positions[t]! : t) * half;
    for (let h = 0, o = t * heads * headDim; h < heads; h++, o += headDim) {
      for (let i = 0; i < half; i++) {
        const c = cos[tab + i]!;
        const s = sign * sin[tab + i]!;
        const x1 = x[o + i]!;
        const x2 = x[o + i + half]!;
        out[o + i] = x1 * c - x2 * s;
        out[o + i + half] = x2 * c + x1 * s;
      }
    }
  }
}
