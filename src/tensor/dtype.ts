/**
 * Element types and conversions between them.
 *
 * All multi-byte data is little-endian. Conversions follow formats.md §1:
 * - BF16 -> F32 is exact (shift left by 16);
 * - F32 -> BF16 rounds to nearest, ties to even; any NaN becomes the quiet NaN 0x7FC0 with its sign;
 * - F16 <-> F32 handles subnormals, infinities and NaN, rounding to nearest even when narrowing.
 */
import { AmalgamError } from '../errors.js';

/** Every dtype string the safetensors format defines. */
export const SAFETENSORS_DTYPES = [
  'BOOL', 'F4', 'F6_E2M3', 'F6_E3M2', 'U8', 'I8', 'F8_E5M2', 'F8_E4M3', 'F8_E8M0', 'F8_E4M3FNUZ',
  'F8_E5M2FNUZ', 'I16', 'U16', 'F16', 'BF16', 'I32', 'U32', 'F32', 'C64', 'F64', 'I64', 'U64',
] as const;
export type DType = (typeof SAFETENSORS_DTYPES)[number];

/** The dtypes amalgam computes with (read as float32, written back by conversion). */
export type FloatDType = 'F32' | 'F16' | 'BF16' | 'F64';

const BITS: Record<DType, number> = {
  BOOL: 8, F4: 4, F6_E2M3: 6, F6_E3M2: 6, U8: 8, I8: 8, F8_E5M2: 8, F8_E4M3: 8, F8_E8M0: 8,
  F8_E4M3FNUZ: 8, F8_E5M2FNUZ: 8, I16: 16, U16: 16, F16: 16, BF16: 16, I32: 32, U32: 32, F32: 32,
  C64: 64, F64: 64, I64: 64, U64: 64,
};

const DTYPE_SET: ReadonlySet<string> = new Set(SAFETENSORS_DTYPES);

export function isDType(s: unknown): s is DType {
  return typeof s === 'string' && DTYPE_SET.has(s);
}

/** Size of one element in bits. */
export function dtypeBits(dtype: DType): number {
  return BITS[dtype];
}

/** Alignment of a dtype in bytes (1 for sub-byte types), used to order tensors in a file. */
export function dtypeAlignment(dtype: DType): number {
  return Math.max(1, BITS[dtype] >>> 3);
}

export function isFloatDType(dtype: DType): dtype is FloatDType {
  return dtype === 'F32' || dtype === 'F16' || dtype === 'BF16' || dtype === 'F64';
}

/** Number of elements of a shape (1 for a 0-d tensor). */
export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/**
 * Byte size of `count` elements, or undefined if it is not a whole number of bytes
 * (sub-byte dtypes) or not a safe integer.
 */
export function byteSize(dtype: DType, count: number): number | undefined {
  const bits = count * BITS[dtype];
  if (!Number.isSafeInteger(bits) || bits % 8 !== 0) return undefined;
  return bits / 8;
}

/** dtype names used in HF `config.json` (`torch_dtype` / `dtype`). */
export const TORCH_DTYPE_NAME: Partial<Record<DType, string>> = {
  F32: 'float32', F16: 'float16', BF16: 'bfloat16', F64: 'float64',
};

/** Parse a user-facing dtype name (`bfloat16`, `bf16`, `BF16`, `float16`, `fp32`, ...). */
export function parseFloatDType(name: string): FloatDType | undefined {
  const n = name.trim().toLowerCase();
  switch (n) {
    case 'f32': case 'fp32': case 'float32': case 'float': return 'F32';
    case 'f16': case 'fp16': case 'float16': case 'half': return 'F16';
    case 'bf16': case 'bfloat16': return 'BF16';
    case 'f64': case 'fp64': case 'float64': case 'double': return 'F64';
    default: return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar bit conversions

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** Bits of a float32 -> bits of the nearest bfloat16 (ties to even; NaN -> quiet NaN). */
export function f32BitsToBf16Bits(x: number): number {
  if ((x & 0x7fffffff) > 0x7f800000) return ((x >>> 16) & 0x8000) | 0x7fc0;
  return ((x >>> 0) + 0x7fff + ((x >>> 16) & 1)) >>> 16;
}

/** Bits of a float32 -> bits of the nearest float16 (ties to even; subnormals; NaN stays NaN). */
export function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) {
    // Inf stays Inf; NaN stays NaN (quiet bit set, top payload bits kept).
    return mant === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mant >>> 13);
  }
  const e = exp - 112; // rebias 127 -> 15
  if (e >= 0x1f) return sign | 0x7c00; // overflow -> Inf
  if (e <= 0) {
    if (e < -10) return sign; // below half the smallest subnormal -> signed zero
    const full = mant | 0x800000;
    const shift = 14 - e;
    let h = full >>> shift;
    const rem = full & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1) === 1)) h++;
    return sign | h;
  }
  let h = sign | (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1) === 1)) h++; // carry may roll into Inf: correct
  return h;
}

/** Bits of a float16 -> bits of the (exactly equal) float32. */
export function f16BitsToF32Bits(h: number): number {
  const sign = (h & 0x8000) << 16;
  const exp = (h >>> 10) & 0x1f;
  let mant = h & 0x3ff;
  if (exp === 0x1f) return (sign | 0x7f800000 | (mant << 13)) >>> 0;
  if (exp === 0) {
    if (mant === 0) return sign >>> 0;
    // subnormal: normalise
    let e = -1;
    do {
      e++;
      mant <<= 1;
    } while ((mant & 0x400) === 0);
    mant &= 0x3ff;
    return (sign | ((127 - 15 - e) << 23) | (mant << 13)) >>> 0;
  }
  return (sign | ((exp + 112) << 23) | (mant << 13)) >>> 0;
}

let F16_TABLE: Uint32Array | undefined;
function f16Table(): Uint32Array {
  if (!F16_TABLE) {
    F16_TABLE = new Uint32Array(65536);
    for (let i = 0; i < 65536; i++) F16_TABLE[i] = f16BitsToF32Bits(i);
  }
  return F16_TABLE;
}

export function f32ToBf16Scalar(v: number): number {
  f32Scratch[0] = v;
  return f32BitsToBf16Bits(u32Scratch[0]!);
}
export function bf16ToF32Scalar(h: number): number {
  u32Scratch[0] = (h & 0xffff) << 16;
  return f32Scratch[0]!;
}
export function f32ToF16Scalar(v: number): number {
  f32Scratch[0] = v;
  return f32BitsToF16Bits(u32Scratch[0]!);
}
export function f16ToF32Scalar(h: number): number {
  u32Scratch[0] = f16BitsToF32Bits(h & 0xffff);
  return f32Scratch[0]!;
}

// ---------------------------------------------------------------------------------------------
// Array conversions

/**
 * BF16 -> F32 (exact). Converts `src.length` values into the start of `dst`. The loop runs forward,
 * reading each group of values before writing them, so `dst` may share memory with `src` when
 * `dst.byteOffset + 2 * src.length <= src.byteOffset` (in-place widening of data read into the
 * upper half of the output).
 */
export function bf16ToF32(src: Uint16Array, dst: Float32Array = new Float32Array(src.length)): Float32Array {
  const n = src.length;
  const out = new Int32Array(dst.buffer, dst.byteOffset, dst.length);
  let i = 0;
  if ((src.byteOffset & 3) === 0) {
    // Two values per 32-bit load (little-endian: the low half is the first value), four per step.
    const quads = n >>> 2;
    const words = new Int32Array(src.buffer, src.byteOffset, quads * 2);
    for (let q = 0, k = 0; q < quads; q++, k += 2, i += 4) {
      const w = words[k]!;
      const x = words[k + 1]!;
      out[i] = w << 16;
      out[i + 1] = w & -65536;
      out[i + 2] = x << 16;
      out[i + 3] = x & -65536;
    }
  }
  for (; i < n; i++) out[i] = src[i]! << 16;
  return dst;
}

export function f32ToBf16(src: Float32Array, dst: Uint16Array = new Uint16Array(src.length)): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const n = src.length;
  for (let i = 0; i < n; i++) {
    const x = bits[i]!;
    dst[i] = (x & 0x7fffffff) > 0x7f800000 ? ((x >>> 16) & 0x8000) | 0x7fc0 : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return dst;
}

/**
 * F16 -> F32 (exact), through a 65536-entry table. Like `bf16ToF32`, the loop runs forward, so
 * `dst` may share memory with `src` when `dst.byteOffset + 2 * src.length <= src.byteOffset`.
 */
export function f16ToF32(src: Uint16Array, dst: Float32Array = new Float32Array(src.length)): Float32Array {
  const table = f16Table();
  const out = new Uint32Array(dst.buffer, dst.byteOffset, dst.length);
  const n = src.length;
  for (let i = 0; i < n; i++) out[i] = table[src[i]!]!;
  return dst;
}

export function f32ToF16(src: Float32Array, dst: Uint16Array = new Uint16Array(src.length)): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const n = src.length;
  for (let i = 0; i < n; i++) dst[i] = f32BitsToF16Bits(bits[i]!);
  return dst;
}

// ---------------------------------------------------------------------------------------------
// Block conversions on bit patterns, without allocating (for streaming kernels)

/**
 * Widens `count` BF16 values `src[start .. start + count)` to float32 bit patterns in
 * `dst[0 .. count)`. `words` is an Int32Array over the same memory as `src` (same byteOffset,
 * which must then be a multiple of 4), or null; with it and an even `start`, two values are read
 * per 32-bit load.
 */
export function widenBf16Block(src: Uint16Array, words: Int32Array | null, start: number, count: number, dst: Int32Array): void {
  let j = 0;
  if (words !== null && (start & 1) === 0) {
    const pairs = count >>> 1;
    let w0 = start >>> 1;
    for (let q = 0; q < pairs; q++, j += 2) {
      const w = words[w0++]!;
      dst[j] = w << 16;
      dst[j + 1] = w & -65536;
    }
  }
  for (; j < count; j++) dst[j] = src[start + j]! << 16;
}

/** Widens `count` F16 values `src[start .. start + count)` to float32 bit patterns in `dst[0 .. count)`. */
export function widenF16Block(src: Uint16Array, start: number, count: number, dst: Int32Array): void {
  const table = f16Table();
  for (let j = 0; j < count; j++) dst[j] = table[src[start + j]!]! | 0;
}

/** Narrows float32 bit patterns `src[0 .. count)` to BF16 in `dst[dstStart ..]` (as `f32ToBf16`). */
export function narrowBf16Block(src: Int32Array, count: number, dst: Uint16Array, dstStart: number): void {
  for (let j = 0; j < count; j++) {
    const x = src[j]! >>> 0;
    dst[dstStart + j] = (x & 0x7fffffff) > 0x7f800000 ? ((x >>> 16) & 0x8000) | 0x7fc0 : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
}

/** Narrows float32 bit patterns `src[0 .. count)` to F16 in `dst[dstStart ..]` (as `f32ToF16`). */
export function narrowF16Block(src: Int32Array, count: number, dst: Uint16Array, dstStart: number): void {
  for (let j = 0; j < count; j++) dst[dstStart + j] = f32BitsToF16Bits(src[j]! >>> 0);
}

/**
 * Rounds float32 bit patterns `bits[0 .. count)` in place to the nearest BF16 or F16 value (the
 * bits of `bf16ToF32(f32ToBf16(x))`, resp. `f16ToF32(f32ToF16(x))`). `from`: the dtype the values
 * were widened from, when known.
 */
export function roundBitsBlock(dtype: 'BF16' | 'F16', bits: Int32Array, count: number, from?: DType): void {
  if (from === dtype) {
    // The values are already of that dtype: rounding only canonicalises NaNs (BF16: the quiet
    // NaN 0x7FC0 with its sign; F16: the quiet bit set, payload kept).
    for (let j = 0; j < count; j++) {
      const x = bits[j]!;
      if ((x & 0x7fffffff) > 0x7f800000) bits[j] = dtype === 'BF16' ? (x & -0x80000000) | 0x7fc00000 : x | 0x400000;
    }
    return;
  }
  if (dtype === 'BF16') {
    for (let j = 0; j < count; j++) {
      const x = bits[j]! >>> 0;
      bits[j] = ((x & 0x7fffffff) > 0x7f800000 ? ((x >>> 16) & 0x8000) | 0x7fc0 : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16) << 16;
    }
  } else {
    const table = f16Table();
    for (let j = 0; j < count; j++) bits[j] = table[f32BitsToF16Bits(bits[j]! >>> 0)]! | 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Raw bytes <-> float32

/** A Uint8Array whose byteOffset is a multiple of `align` (copying only if needed). */
function aligned(bytes: Uint8Array, align: number): Uint8Array {
  if (bytes.byteOffset % align === 0) return bytes;
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  return copy;
}

/**
 * Decode little-endian raw tensor bytes of a float dtype to float32. For F32 the result may share
 * memory with `bytes` when `bytes` is suitably aligned (pass `copy` to force a fresh array).
 */
export function decodeToF32(dtype: DType, bytes: Uint8Array, opts: { copy?: boolean; what?: string } = {}): Float32Array {
  switch (dtype) {
    case 'F32': {
      const b = aligned(bytes, 4);
      const view = new Float32Array(b.buffer, b.byteOffset, b.byteLength >>> 2);
      return opts.copy && b === bytes ? view.slice() : view;
    }
    case 'BF16': {
      const b = aligned(bytes, 2);
      return bf16ToF32(new Uint16Array(b.buffer, b.byteOffset, b.byteLength >>> 1));
    }
    case 'F16': {
      const b = aligned(bytes, 2);
      return f16ToF32(new Uint16Array(b.buffer, b.byteOffset, b.byteLength >>> 1));
    }
    case 'F64': {
      const b = aligned(bytes, 8);
      return Float32Array.from(new Float64Array(b.buffer, b.byteOffset, b.byteLength >>> 3));
    }
    default:
      throw new AmalgamError('E_DTYPE', `dtype ${dtype} cannot be used for arithmetic`, {
        key: opts.what,
        hint: 'only F32, F16, BF16 and F64 tensors can be converted to float32; other dtypes pass through unchanged',
      });
  }
}

/** Encode float32 values as little-endian raw bytes of a float dtype. */
export function encodeFromF32(dtype: DType, data: Float32Array): Uint8Array {
  switch (dtype) {
    case 'F32':
      return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    case 'BF16': {
      const out = f32ToBf16(data);
      return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
    }
    case 'F16': {
      const out = f32ToF16(data);
      return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
    }
    case 'F64': {
      const out = Float64Array.from(data);
      return new Uint8Array(out.buffer);
    }
    default:
      throw new AmalgamError('E_DTYPE', `cannot write float data as ${dtype}`, {
        hint: 'choose F32, F16, BF16 or F64 as the output dtype',
      });
  }
}
