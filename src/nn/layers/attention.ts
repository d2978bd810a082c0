/**
 * Grouped-query causal self-attention with rotary embeddings (HF Llama `LlamaAttention`).
 *
 * Layout: tokens are rows, N = B·T; q is [B, T, H, hd], k and v are [B, Tk, Hkv, hd]. Query head
 * h reads key/value head ⌊h / (H / Hkv)⌋. Scores and probabilities are [B, H, T, Tk].
 * Sequences are right-padded: under the causal mask no real token sees a later (padding)
 * position, so padding needs no mask of its own, and a loss that ignores padded rows sends no
 * gradient through them.
 *
 * With a KV cache, the T new tokens sit at positions offset … offset+T−1 and attend to the Tk =
 * offset+T cached keys; without one, offset = 0 and Tk = T. Backward needs the latter.
 */
import type { Backend } from '../../backend/backend.js';
import { AmalgamError } from '../../errors.js';
import type { Parameter } from '../params.js';
import type { LinearCache, LinearLayer } from './linear.js';
import type { RopeTables } from './rope.js';

export interface Attention {
  q: LinearLayer;
  k: LinearLayer;
  v: LinearLayer;
  o: LinearLayer;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
}

export interface AttentionCache {
  /** Queries after rope [N, H·hd]. */
  q: Float32Array;
  /** Keys after rope [N, Hkv·hd] (the new tokens' keys). */
  k: Float32Array;
  /** Values [N, Hkv·hd]. */
  v: Float32Array;
  /** Softmax probabilities [B, H, T, Tk]. */
  probs: Float32Array;
  /** Per-head outputs, the input of o_proj [N, H·hd]. */
  ctx: Float32Array;
  /** Position of every row [N]. */
  positions: Int32Array;
  qc: LinearCache;
  kc: LinearCache;
  vc: LinearCache;
  oc: LinearCache;
  /** Shape of the last forward. */
  B: number;
  T: number;
  Tk: number;
}

/** Gradient buffers of attention's backward; shared by all layers. */
export interface AttentionScratch {
  dq: Float32Array;
  dk: Float32Array;
  dv: Float32Array;
  dctx: Float32Array;
  /** Room for the probabilities' gradient [B, H, T, T], for backends that compose attention. */
  dprobs: Float32Array;
}

/** Keys and values of earlier positions (one layer of a KV cache), [B, capacity, Hkv·hd]. */
export interface PastKeyValues {
  k: Float32Array;
  v: Float32Array;
  capacity: number;
  /** Positions already cached (the first new token's position). */
  offset: number;
}

/** `alloc` provides the float buffers (e.g. a backend's `allocate`); default plain arrays. */
export function createAttentionCache(attn: Attention, maxRows: number, maxProbs: number, alloc: (n: number) => Float32Array = (n) => new Float32Array(n)): AttentionCache {
  const qd = attn.numHeads * attn.headDim;
  const kvd = attn.numKvHeads * attn.headDim;
  return {
    q: alloc(maxRows * qd),
    k: alloc(maxRows * kvd),
    v: alloc(maxRows * kvd),
    probs: alloc(maxProbs),
    ctx: alloc(maxRows * qd),
    positions: new Int32Array(maxRows),
    qc: attn.q.createCache(maxRows),
    kc: attn.k.createCache(maxRows),
    vc: attn.v.createCache(maxRows),
    oc: attn.o.createCache(maxRows),
    B: 0,
    T: 0,
    Tk: 0,
  };
}

export function createAttentionScratch(
  attn: Pick<Attention, 'numHeads' | 'numKvHeads' | 'headDim'>,
  maxRows: number,
  maxProbs: number,
  alloc: (n: number) => Float32Array = (n) => new Float32Array(n),
): AttentionScratch {
  const qd = attn.numHeads * attn.headDim;
  const kvd = attn.numKvHeads * attn.headDim;
  return {
    dq: alloc(maxRows * qd),
    dk: alloc(maxRows * kvd),
    dv: alloc(maxRows * kvd),
    dctx: alloc(maxRows * qd),
    dprobs: alloc(maxProbs),
  };
}

/** Floats createAttentionCache allocates beyond the linear layers' own caches. */
export function attentionCacheFloats(attn: Attention, rows: number, probs: number): number {
  const qd = attn.numHeads * attn.headDim;
  const kvd = attn.numKvHeads * attn.headDim;
  return rows * (2 * qd + 2 * kvd + 1) + probs;
}

/** y[N, hidden] = o_proj(attention(rope(q_proj x), rope(k_proj x), v_proj x)). */
export function attentionForward(
  be: Backend,
  attn: Attention,
  x: Float32Array,
  y: Float32Array,
  B: number,
  T: number,
  rope: RopeTables,
  cache: AttentionCache,
  past: PastKeyValues | null = null,
): void {
  const { numHeads: H, numKvHeads: Hkv, headDim: hd } = attn;
  const N = B * T;
  const kvd = Hkv * hd;
  const offset = past ? past.offset : 0;
  const Tk = offset + T;
  if (past && Tk > past.capacity) {
    throw new AmalgamError('E_USAGE', `the KV cache holds ${past.capacity} positions; ${Tk} are needed`);
  }
  cache.B = B;
  cache.T = T;
  cache.Tk = Tk;

  // Projections, then rotary embeddings on q and k (in place).
  attn.q.forward(be, x, cache.q, N, cache.qc);
  attn.k.forward(be, x, cache.k, N, cache.kc);
  attn.v.forward(be, x, cache.v, N, cache.vc);
  const pos = cache.positions;
  for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) pos[b * T + t] = offset + t;
  rope.ensure(Math.max(Tk, N)); // the backend checks the tables against the row count as well
  const positions = pos.subarray(0, N);
  be.rope(cache.q, cache.q, rope.cos, rope.sin, N, H, hd, positions);
  be.rope(cache.k, cache.k, rope.cos, rope.sin, N, Hkv, hd, positions);

  // Keys and values: this call's own, or appended to the cache.
  let keys = cache.k;
  let values = cache.v;
  let kvStride = T * kvd;
  if (past) {
    for (let b = 0; b < B; b++) {
      const dst = (b * past.capacity + offset) * kvd;
      past.k.set(cache.k.subarray(b * T * kvd, (b + 1) * T * kvd), dst);
      past.v.set(cache.v.subarray(b * T * kvd, (b + 1) * T * kvd), dst);
    }
    keys = past.k;
    values = past.v;
    kvStride = past.capacity * kvd;
  }

  // probs[b, h] = causal softmax(q[b, :, h] · k[b, :, h/g]ᵀ / √hd), ctx[b, :, h] = probs[b, h] · v[b, :, h/g].
  be.attention(cache.q, keys, values, cache.probs, cache.ctx, {
    batch: B,
    queries: T,
    keys: Tk,
    heads: H,
    kvHeads: Hkv,
    headDim: hd,
    scale: 1 / Math.sqrt(hd),
    queryOffset: offset,
    kvStride,
  });
  attn.o.forward(be, cache.ctx, y, N, cache.oc);
}

/**
 * From dy[N, hidden]: writes dx[N, hidden] (the gradient of the input x) and accumulates the
 * projections' parameter gradients. Only after a forward without a KV cache.
 */
export function attentionBackward(
  be: Backend,
  attn: Attention,
  dy: Float32Array,
  dx: Float32Array,
  rope: RopeTables,
  cache: AttentionCache,
  s: AttentionScratch,
): void {
  const { numHeads: H, numKvHeads: Hkv, headDim: hd } = attn;
  const { B, T, Tk } = cache;
  if (Tk !== T) throw new AmalgamError('E_USAGE', 'attention backward needs a forward without a KV cache');
  const N = B * T;
  const { q, k, v, probs } = cache;

  attn.o.backward(be, dy, s.dctx, N, cache.oc);
  be.attentionBackward(q, k, v, probs, s.dctx, s.dq, s.dk, s.dv, {
    batch: B,
    queries: T,
    heads: H,
    kvHeads: Hkv,
    headDim: hd,
    scale: 1 / Math.sqrt(hd),
    workspace: s.dprobs,
  });

  // Undo the rotations, then back through the projections (q, k, v share the input x).
  const positions = cache.positions.subarray(0, N);
  be.ropeBackward(s.dq, s.dq, rope.cos, rope.sin, N, H, hd, positions);
  be.ropeBackward(s.dk, s.dk, rope.cos, rope.sin, N, Hkv, hd, positions);
  attn.q.backward(be, s.dq, dx, N, cache.qc);
  attn.k.backward(be, s.dk, dx, N, cache.kc, true);
  attn.v.backward(be, s.dv, dx, N, cache.vc, true);
}

/** Every parameter of the four projections. */
export function attentionParameters(attn: Attention): Parameter[] {
  return [...attn.q.parameters(), ...attn.k.parameters(), ...attn.v.parameters(), ...attn.o.parameters()];
}
