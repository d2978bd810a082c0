/**
 * Causal attention composed from the general ops (batched matmul over strided heads, masked
 * softmax): what the reference backend runs, and the fallback of the fast backends.
 */
import type { AttentionPlan, Backend } from './backend.js';

/** probs = causal softmax(scale · q·kᵀ) per head, out = probs·v (see Backend.attention). */
export function composedAttention(
  be: Backend,
  p: AttentionPlan,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  probs: Float32Array,
  out: Float32Array,
): void {
  const { B, T, Tk, H, Hkv, hd, scale, offset, kvStride } = p;
  if (B === 0 || T === 0 || H === 0) return;
  const qd = H * hd;
  const kvd = Hkv * hd;
  const g = H / Hkv;
  // scores[b, h] = q[b, :, h] · k[b, :, h/g]ᵀ · scale, the g heads of a group in one batched call.
  for (let b = 0; b < B; b++) {
    for (let j = 0; j < Hkv; j++) {
      be.matmulBatched(q.subarray(b * T * qd + j * g * hd), k.subarray(b * kvStride + j * hd), probs.subarray((b * H + j * g) * T * Tk), g, T, hd, Tk, {
        transB: true,
        lda: qd,
        ldb: kvd,
        strideA: hd,
        strideB: 0,
        strideC: T * Tk,
        alpha: scale,
      });
    }
  }
  be.softmax(probs, probs, B * H * T, Tk, { causal: true, queryLen: T, queryOffset: offset });
  // out[b, :, h] = probs[b, h] · v[b, :, h/g].
  for (let b = 0; b < B; b++) {
    for (let j = 0; j < Hkv; j++) {
      be.matmulBatched(probs.subarray((b * H + j * g) * T * Tk), v.subarray(b * kvStride + j * hd), out.subarray(b * T * qd + j * g * hd), g, T, Tk, hd, {
        ldb: kvd,
        ldc: qd,
        strideA: T * Tk,
        strideB: 0,
        strideC: hd,
      });
    }
  }
}

/** Gradients of composedAttention (keys = queries, offset 0); see Backend.attentionBackward. */
export function composedAttentionBackward(
  be: Backend,
  p: AttentionPlan,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  probs: Float32Array,
  dOut: Float32Array,
  dq: Float32Array,
  dk: Float32Array,
  dv: Float32Array,
): void {
  const { B, T, H, Hkv, hd, scale, kvStride } = p;
  const qd = H * hd;
  const kvd = Hkv * hd;
  if (B === 0 || T === 0 || H === 0) return;
  const g = H / Hkv;
  const n = B * H * T * T;
  const dprobs = p.workspace && p.workspace.length >= n ? p.workspace : new Float32Array(n);
  // dprobs[b, h] = dOut[b, :, h] · v[b, :, h/g]ᵀ;  dv[b, :, j] = Σ_{h in group j} probs[b, h]ᵀ · dOut[b, :, h].
  for (let b = 0; b < B; b++) {
    for (let j = 0; j < Hkv; j++) {
      be.matmulBatched(dOut.subarray(b * T * qd + j * g * hd), v.subarray(b * kvStride + j * hd), dprobs.subarray((b * H + j * g) * T * T), g, T, hd, T, {
        transB: true,
        lda: qd,
        ldb: kvd,
        strideA: hd,
        strideB: 0,
        strideC: T * T,
      });
      for (let i = 0; i < g; i++) {
        const h = j * g + i;
        be.matmul(probs.subarray((b * H + h) * T * T), dOut.subarray(b * T * qd + h * hd), dv.subarray(b * kvStride + j * hd), T, T, hd, {
          transA: true,
          ldb: qd,
          ldc: kvd,
          accumulate: i > 0,
        });
      }
    }
  }
  // Through the softmax (masked entries have probability 0, so their gradient is 0).
  be.softmaxBackward(probs, dprobs, dprobs, B * H * T, T);
  // dq[b, :, h] = dscores[b, h] · k[b, :, h/g] · scale;  dk[b, :, j] = Σ_h dscores[b, h]ᵀ · q[b, :, h] · scale.
  for (let b = 0; b < B; b++) {
    for (let j = 0; j < Hkv; j++) {
      be.matmulBatched(dprobs.subarray((b * H + j * g) * T * T), k.subarray(b * kvStride + j * hd), dq.subarray(b * T * qd + j * g * hd), g, T, T, hd, {
        ldb: kvd,
        ldc: qd,
        strideA: T * T,
        strideB: 0,
        strideC: hd,
        alpha: scale,
      });
      for (let i = 0; i < g; i++) {
        const h = j * g + i;
        be.matmul(dprobs.subarray((b * H + h) * T * T), q.subarray(b * T * qd + h * hd), dk.subarray(b * kvStride + j * hd), T, T, hd, {
          transA: true,
          ldb: qd,
          ldc: kvd,
          alpha: scale,
          accumulate: i > 0,
        });
      }
    }
  }
}
