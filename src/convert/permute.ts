/**
 * Row permutation of Q and K projection matrices between the interleaved rotary layout (GGUF,
 * Meta, llama2.c: rows 2i and 2i+1 of a head form a pair) and HF's rotate_half layout (row i pairs
 * with row i + head_dim/2). formats.md §5.7.
 *
 * GGUF -> HF: HF row h·hd + half·(hd/2) + i  <-  GGUF row h·hd + 2i + half.
 * The permutation moves whole rows, so it is exact for any element type.
 */
import { AmalgamError } from '../errors.js';

export type RowArray = Float32Array | Uint16Array | Uint8Array;

function check(len: number, rows: number, heads: number, what?: string): { cols: number; hd: number } {
  if (!(heads > 0) || rows % heads !== 0 || (rows / heads) % 2 !== 0) {
    throw new AmalgamError('E_SHAPE', `${rows} rows cannot be split into ${heads} heads of even size`, { key: what });
  }
  if (len % rows !== 0) {
    throw new AmalgamError('E_SHAPE', `${len} elements do not form ${rows} rows`, { key: what });
  }
  return { cols: len / rows, hd: rows / heads };
}

function permute<T extends RowArray>(w: T, rows: number, heads: number, toHf: boolean, what?: string): T {
  const { cols, hd } = check(w.length, rows, heads, what);
  const out = new (w.constructor as new (n: number) => T)(w.length);
  const half = hd / 2;
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < half; i++) {
      for (let s = 0; s < 2; s++) {
        const gguf = h * hd + 2 * i + s;
        const hf = h * hd + s * half + i;
        const [dst, src] = toHf ? [hf, gguf] : [gguf, hf];
        out.set(w.subarray(src * cols, (src + 1) * cols), dst * cols);
      }
    }
  }
  return out;
}

/**
 * Interleaved (GGUF / llama2.c) -> rotate_half (HF) for a row-major [rows, cols] matrix with
 * `heads` heads (n_heads for Q, n_kv_heads for K).
 */
export function permuteQkGgufToHf<T extends RowArray>(w: T, rows: number, heads: number, what?: string): T {
  return permute(w, rows, heads, true, what);
}

/** rotate_half (HF) -> interleaved (GGUF / llama2.c); the inverse of permuteQkGgufToHf. */
export function permuteQkHfToGguf<T extends RowArray>(w: T, rows: number, heads: number, what?: string): T {
  return permute(w, rows, heads, false, what);
}
