/** The Llama MLP: y = down_proj(silu(gate_proj x) ⊙ up_proj x). */
import type { Backend } from '../../backend/backend.js';
import type { Parameter } from '../params.js';
import type { LinearCache, LinearLayer } from './linear.js';

export interface Mlp {
  gate: LinearLayer;
  up: LinearLayer;
  down: LinearLayer;
}

export interface MlpCache {
  /** gate_proj x [N, inter]. */
  gate: Float32Array;
  /** up_proj x [N, inter]. */
  up: Float32Array;
  /** silu(gate) ⊙ up, the input of down_proj [N, inter]. */
  act: Float32Array;
  gc: LinearCache;
  uc: LinearCache;
  dc: LinearCache;
  rows: number;
}

/** Gradient buffers of the MLP's backward; shared by all layers. */
export interface MlpScratch {
  dgate: Float32Array;
  dup: Float32Array;
  dact: Float32Array;
}

/** `alloc` provides the buffers (e.g. a backend's `allocate`); default plain arrays. */
export function createMlpCache(mlp: Mlp, maxRows: number, alloc: (n: number) => Float32Array = (n) => new Float32Array(n)): MlpCache {
  const f = mlp.gate.outFeatures;
  return {
    gate: alloc(maxRows * f),
    up: alloc(maxRows * f),
    act: alloc(maxRows * f),
    gc: mlp.gate.createCache(maxRows),
    uc: mlp.up.createCache(maxRows),
    dc: mlp.down.createCache(maxRows),
    rows: 0,
  };
}

export function createMlpScratch(intermediate: number, maxRows: number, alloc: (n: number) => Float32Array = (n) => new Float32Array(n)): MlpScratch {
  const f = intermediate;
  return { dgate: alloc(maxRows * f), dup: alloc(maxRows * f), dact: alloc(maxRows * f) };
}

export function mlpForward(be: Backend, mlp: Mlp, x: Float32Array, y: Float32Array, rows: number, cache: MlpCache): void {
  const n = rows * mlp.gate.outFeatures;
  cache.rows = rows;
  mlp.gate.forward(be, x, cache.gate, rows, cache.gc);
  mlp.up.forward(be, x, cache.up, rows, cache.uc);
  be.swiglu(cache.gate, cache.up, cache.act, n);
  mlp.down.forward(be, cache.act, y, rows, cache.dc);
}

/** From dy[N, hidden]: writes dx[N, hidden] and accumulates the projections' gradients. */
export function mlpBackward(be: Backend, mlp: Mlp, dy: Float32Array, dx: Float32Array, cache: MlpCache, s: MlpScratch): void {
  const rows = cache.rows;
  const n = rows * mlp.gate.outFeatures;
  mlp.down.backward(be, dy, s.dact, rows, cache.dc);
  be.swigluBackward(cache.gate, cache.up, s.dact, s.dgate, s.dup, n);
  mlp.gate.backward(be, s.dgate, dx, rows, cache.gc);
  mlp.up.backward(be, s.dup, dx, rows, cache.uc, true);
}

export function mlpParameters(mlp: Mlp): Parameter[] {
  return [...mlp.gate.parameters(), ...mlp.up.parameters(), ...mlp.down.parameters()];
}
