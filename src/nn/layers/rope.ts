/**
 * Rotary position embedding tables in the rotate_half layout (formats.md §3.3): for position p
 * and pair i < headDim/2, angle = p · θ^(−2i/headDim). The table grows on demand.
 */
export class RopeTables {
  cos = new Float32Array(0);
  sin = new Float32Array(0);
  /** Positions the tables cover. */
  positions = 0;
  readonly half: number;

  constructor(
    readonly headDim: number,
    readonly theta: number,
    initialPositions = 0,
  ) {
    this.half = headDim / 2;
    this.ensure(initialPositions);
  }

  /** Makes the tables cover positions [0, n). */
  ensure(n: number): void {
    if (n <= this.positions) return;
    const size = Math.max(n, 2 * this.positions);
    const h = this.half;
    const cos = new Float32Array(size * h);
    const sin = new Float32Array(size * h);
    for (let i = 0; i < h; i++) {
      const invFreq = Math.pow(this.theta, (-2 * i) / this.headDim);
      for (let p = 0; p < size; p++) {
        cos[p * h + i] = Math.cos(p * invFreq);
        sin[p * h + i] = Math.sin(p * invFreq);
      }
    }
    this.cos = cos;
    this.sin = sin;
    this.positions = size;
  }
}
