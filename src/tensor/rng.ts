/**
 * Seeded pseudo-random numbers. Every random draw in amalgam goes through an Rng built from an
 * explicit seed, so runs are reproducible. xoshiro128** (32-bit state words, fast in JS),
 * seeded through splitmix32.
 */
export class Rng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;
  private spare: number | undefined;

  constructor(seed: number) {
    let x = seed >>> 0;
    const next = () => {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.s0 = next();
    this.s1 = next();
    this.s2 = next();
    this.s3 = next();
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  /** Copies the four state words into `into` (to continue the stream in another kernel). */
  saveState(into: Uint32Array): void {
    into[0] = this.s0;
    into[1] = this.s1;
    into[2] = this.s2;
    into[3] = this.s3;
  }

  /** Continues from four state words saved by `saveState` (and advanced elsewhere). */
  loadState(from: Uint32Array): void {
    this.s0 = from[0]! | 0;
    this.s1 = from[1]! | 0;
    this.s2 = from[2]! | 0;
    this.s3 = from[3]! | 0;
  }

  /** Uniform 32-bit unsigned integer. */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /**
   * Keep-mask draws: `out[i]` = 1 where the i-th draw of `nextU32` is below `threshold`, else 0.
   * The same draws in the same order as calling `nextU32` per element, with the state held in
   * locals for the loop (several times faster).
   */
  fillBernoulli(out: Uint8Array, threshold: number): void {
    // The marks below are 0 or 1 only for 0 ≤ threshold ≤ 2³² (NaN: all 0, as `r < NaN`).
    this.fillMask(out, threshold < 0 ? 0 : threshold > 4294967296 ? 4294967296 : threshold, undefined);
  }

  /** Like `fillBernoulli` with a threshold per element: draw i is compared with `probability[i]` · 2³². */
  fillBernoulliEach(out: Uint8Array, probability: ArrayLike<number>): void {
    this.fillMask(out, 0, probability);
  }

  private fillMask(out: Uint8Array, threshold: number, probability: ArrayLike<number> | undefined): void {
    let s0 = this.s0 | 0;
    let s1 = this.s1 | 0;
    let s2 = this.s2 | 0;
    let s3 = this.s3 | 0;
    const n = out.length;
    // r < T as 1 or 0 without a branch (random outcomes defeat branch prediction): r − T is exact
    // or rounds without changing sign, so ⌊(r − T)·2⁻³²⌋ is −1 exactly when r < T, else 0.
    if (probability === undefined) {
      for (let i = 0; i < n; i++) {
        const x = Math.imul(s1, 5);
        const r = Math.imul((x << 7) | (x >>> 25), 9) >>> 0;
        const t = s1 << 9;
        s2 ^= s0;
        s3 ^= s1;
        s1 ^= s2;
        s0 ^= s3;
        s2 ^= t;
        s3 = (s3 << 11) | (s3 >>> 21);
        out[i] = -Math.floor((r - threshold) * TWO_M32);
      }
    } else {
      for (let i = 0; i < n; i++) {
        const x = Math.imul(s1, 5);
        const r = Math.imul((x << 7) | (x >>> 25), 9) >>> 0;
        const t = s1 << 9;
        s2 ^= s0;
        s3 ^= s1;
        s1 ^= s2;
        s0 ^= s3;
        s2 ^= t;
        s3 = (s3 << 11) | (s3 >>> 21);
        const p = probability[i]! * 4294967296;
        out[i] = -Math.floor((r - (p < 0 ? 0 : p > 4294967296 ? 4294967296 : p)) * TWO_M32);
      }
    }
    this.s0 = s0;
    this.s1 = s1;
    this.s2 = s2;
    this.s3 = s3;
  }

  /** Uniform in [0, 1) with 32 bits of resolution. */
  next(): number {
    return this.nextU32() / 4294967296;
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** Standard normal (Box–Muller, one spare kept). */
  normal(): number {
    if (this.spare !== undefined) {
      const s = this.spare;
      this.spare = undefined;
      return s;
    }
    let u = 0;
    while (u === 0) u = this.next();
    const v = this.next();
    const r = Math.sqrt(-2 * Math.log(u));
    this.spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }

  /** Fill with N(mean, std²) samples. */
  fillNormal(out: Float32Array, std = 1, mean = 0): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = mean + std * this.normal();
    return out;
  }
}

/** 2⁻³². */
const TWO_M32 = 2.3283064365386963e-10;

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
