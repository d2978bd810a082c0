/**
 * Numeric conversions (formats.md §1), checked against an independent reference that works on
 * values with float64 arithmetic (nearest, ties to even) rather than on bit patterns.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { AmalgamError } from '../src/errors.js';
import {
  SAFETENSORS_DTYPES,
  bf16ToF32,
  bf16ToF32Scalar,
  byteSize,
  decodeToF32,
  dtypeAlignment,
  dtypeBits,
  encodeFromF32,
  f16BitsToF32Bits,
  f16ToF32,
  f16ToF32Scalar,
  f32BitsToBf16Bits,
  f32BitsToF16Bits,
  f32ToBf16,
  f32ToBf16Scalar,
  f32ToF16,
  f32ToF16Scalar,
  isDType,
  isFloatDType,
  numel,
  parseFloatDType,
  type DType,
} from '../src/tensor/dtype.js';

// ---------------------------------------------------------------------------------------------
// Reference implementation (values, float64)

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The exact value of a float32 bit pattern, as a float64. */
function f32Value(bits: number): number {
  u32[0] = bits >>> 0;
  return f32[0]!;
}
function f32Bits(v: number): number {
  f32[0] = v;
  return u32[0]!;
}
function isNaNBits32(bits: number): boolean {
  return ((bits >>> 0) & 0x7fffffff) > 0x7f800000;
}
function isNaNBits16(h: number): boolean {
  return (h & 0x7fff) > 0x7c00;
}
function isNaNBitsBf16(h: number): boolean {
  return (h & 0x7fff) > 0x7f80;
}

/** Round a non-negative float64 holding at most 53 significant bits to the nearest integer, ties to even. */
function roundHalfEven(q: number): number {
  const fl = Math.floor(q);
  const frac = q - fl;
  if (frac > 0.5) return fl + 1;
  if (frac < 0.5) return fl;
  return fl % 2 === 0 ? fl : fl + 1;
}

/** floor(log2(a)) for a positive finite float64, exactly. */
function exponentOf(a: number): number {
  let e = Math.floor(Math.log2(a));
  while (2 ** e > a) e--;
  while (2 ** (e + 1) <= a) e++;
  return e;
}

/**
 * Nearest binary format value to `v`, as bits, for a format with `mantBits` stored mantissa bits
 * and exponent bias `bias` (normal exponents 1..2*bias). NaN handling is left to the caller.
 */
function refNarrow(v: number, mantBits: number, bias: number): number {
  const signBit = 1 << (mantBits + (bias === 127 ? 8 : 5));
  const expMask = (bias * 2 + 1) << mantBits; // all-ones exponent = Inf
  const neg = v < 0 || Object.is(v, -0);
  const sign = neg ? signBit : 0;
  const a = Math.abs(v);
  if (a === Infinity) return sign | expMask;
  if (a === 0) return sign;
  const minNormalExp = 1 - bias;
  const e = exponentOf(a);
  let bits: number;
  if (e < minNormalExp) {
    // subnormal range: units of 2^(minNormalExp - mantBits); rounding may carry into the smallest normal
    bits = roundHalfEven(a / 2 ** (minNormalExp - mantBits));
  } else {
    const q = roundHalfEven(a / 2 ** (e - mantBits)); // in [2^mantBits, 2^(mantBits+1)]
    bits = (e + bias) * 2 ** mantBits + q - 2 ** mantBits; // q = 2^(mantBits+1) carries into the exponent
  }
  if (bits >= expMask) bits = expMask; // overflow -> Inf
  return sign | bits;
}

function refF32ToF16(bits: number): number {
  if (isNaNBits32(bits)) return -1;
  return refNarrow(f32Value(bits), 10, 15);
}
function refF32ToBf16(bits: number): number {
  if (isNaNBits32(bits)) return -1;
  return refNarrow(f32Value(bits), 7, 127);
}
/** Exact value of a binary16 bit pattern. */
function refF16Value(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0x1f) return m ? NaN : s * Infinity;
  if (e === 0) return s * m * 2 ** -24;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** Deterministic pseudo-random 32-bit integers (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

const hex = (x: number, w = 8) => '0x' + (x >>> 0).toString(16).padStart(w, '0');

function checkF16(bits: number): void {
  const got = f32BitsToF16Bits(bits);
  const ref = refF32ToF16(bits);
  if (ref === -1) {
    assert.ok(isNaNBits16(got), `F32 ${hex(bits)} is NaN, F16 ${hex(got, 4)} is not`);
    assert.equal(got & 0x8000, (bits >>> 16) & 0x8000, `NaN sign lost for ${hex(bits)}`);
  } else {
    assert.equal(got, ref, `F32 ${hex(bits)} (${f32Value(bits)}) -> F16 ${hex(got, 4)}, expected ${hex(ref, 4)}`);
  }
}
function checkBf16(bits: number): void {
  const got = f32BitsToBf16Bits(bits);
  const ref = refF32ToBf16(bits);
  if (ref === -1) {
    assert.equal(got, ((bits >>> 16) & 0x8000) | 0x7fc0, `F32 NaN ${hex(bits)} -> BF16 ${hex(got, 4)}, expected the quiet NaN with its sign`);
  } else {
    assert.equal(got, ref, `F32 ${hex(bits)} (${f32Value(bits)}) -> BF16 ${hex(got, 4)}, expected ${hex(ref, 4)}`);
  }
}

// ---------------------------------------------------------------------------------------------
// The reference itself, on a few hand-computed values

test('reference narrowing agrees with hand-computed values', () => {
  assert.equal(refF32ToF16(f32Bits(1)), 0x3c00);
  assert.equal(refF32ToF16(f32Bits(-2)), 0xc000);
  assert.equal(refF32ToF16(f32Bits(65504)), 0x7bff);
  assert.equal(refF32ToF16(f32Bits(2 ** -24)), 0x0001);
  assert.equal(refF32ToF16(f32Bits(2 ** -14)), 0x0400);
  assert.equal(refF32ToBf16(f32Bits(1)), 0x3f80);
  assert.equal(refF32ToBf16(f32Bits(-0)), 0x8000);
  assert.equal(refF32ToBf16(0x7f7fffff), 0x7f80);
  assert.equal(refF16Value(0x7bff), 65504);
  assert.equal(refF16Value(0x0001), 2 ** -24);
});

// ---------------------------------------------------------------------------------------------
// F16 <-> F32

test('every F16 bit pattern widens exactly and narrows back to itself', () => {
  const all = new Uint16Array(65536);
  for (let h = 0; h < 65536; h++) all[h] = h;
  const wide = f16ToF32(all);
  const wideBits = new Uint32Array(wide.buffer);
  const back = f32ToF16(wide);
  for (let h = 0; h < 65536; h++) {
    const scalarBits = f16BitsToF32Bits(h);
    assert.equal(wideBits[h], scalarBits, `array and scalar F16 -> F32 differ for ${hex(h, 4)}`);
    const ref = refF16Value(h);
    if (Number.isNaN(ref)) {
      assert.ok(isNaNBits32(scalarBits), `F16 NaN ${hex(h, 4)} widened to non-NaN ${hex(scalarBits)}`);
      assert.equal(scalarBits >>> 31, h >>> 15, `F16 NaN ${hex(h, 4)} lost its sign`);
      assert.ok(isNaNBits16(back[h]!), `F16 NaN ${hex(h, 4)} came back as ${hex(back[h]!, 4)}`);
      assert.equal(back[h]! & 0x8000, h & 0x8000);
      if (h & 0x0200) assert.equal(back[h], h, `quiet NaN ${hex(h, 4)} lost its payload`);
      assert.ok(Number.isNaN(f16ToF32Scalar(h)));
    } else {
      assert.ok(Object.is(f32Value(scalarBits), ref), `F16 ${hex(h, 4)} widened to ${f32Value(scalarBits)}, expected ${ref}`);
      assert.ok(Object.is(f16ToF32Scalar(h), ref));
      assert.equal(back[h], h, `F16 ${hex(h, 4)} -> F32 -> F16 gave ${hex(back[h]!, 4)}`);
      assert.equal(f32BitsToF16Bits(scalarBits), h);
      assert.equal(f32ToF16Scalar(ref), h);
    }
  }
});

test('F32 -> F16 on edge values matches the float64 reference', () => {
  const edges: number[] = [
    0x00000000, 0x80000000, // ±0
    0x7f800000, 0xff800000, // ±Inf
    0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7f801fff, 0x7fbfffff, 0x7fffffff, // NaNs, payload in low bits
    f32Bits(65504), f32Bits(-65504), // max normal
    f32Bits(65519), f32Bits(65519.99609375), f32Bits(65520), f32Bits(65536), f32Bits(1e10), f32Bits(-70000), // overflow boundary
    0x7f7fffff, 0xff7fffff, // F32 max
    f32Bits(1), f32Bits(-1), f32Bits(1 + 2 ** -11), f32Bits(1 + 3 * 2 ** -11), f32Bits(1 + 2 ** -11 + 2 ** -23), // halfway cases
    f32Bits(2048 + 1), f32Bits(2048 + 3), f32Bits(2048 + 1.5), // halfway at larger magnitude
    f32Bits(2 ** -14), f32Bits(-(2 ** -14)), f32Bits(2 ** -14 - 2 ** -25), f32Bits(2 ** -14 - 2 ** -24), // normal/subnormal boundary
    f32Bits(2 ** -24), f32Bits(2 ** -25), f32Bits(2 ** -25 + 2 ** -40), f32Bits(2 ** -26), f32Bits(3 * 2 ** -25), f32Bits(-(2 ** -25)), // smallest subnormal
    f32Bits(1023 * 2 ** -24), f32Bits(1023.5 * 2 ** -24), f32Bits(1.5 * 2 ** -24), f32Bits(2.5 * 2 ** -24),
    0x00000001, 0x80000001, 0x007fffff, 0x00800000, // F32 subnormals -> ±0
    f32Bits(0.1), f32Bits(1 / 3), f32Bits(Math.PI), f32Bits(-Math.E),
  ];
  for (let e = 0; e < 256; e++) {
    for (const m of [0, 1, 0xfff, 0x1000, 0x1001, 0x2000, 0x3000, 0x7fffff, 0x400000]) {
      edges.push((e << 23) | m, ((e << 23) | m | 0x80000000) >>> 0);
    }
  }
  for (const b of edges) checkF16(b >>> 0);
});

test('F32 -> F16 on random bit patterns matches the float64 reference (array and scalar paths agree)', () => {
  const next = rng(0xf16);
  const n = 200_000;
  const src = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const r = next();
    // half fully random, half concentrated on the F16 exponent range, where rounding matters
    src[i] = i & 1 ? r : (r & 0x807fffff) | ((103 + (r % 40)) << 23);
  }
  const out = f32ToF16(new Float32Array(src.buffer));
  for (let i = 0; i < n; i++) {
    checkF16(src[i]!);
    assert.equal(out[i], f32BitsToF16Bits(src[i]!), `array and scalar paths differ for ${hex(src[i]!)}`);
    if (!isNaNBits32(src[i]!)) assert.equal(f32ToF16Scalar(f32Value(src[i]!)), out[i]);
  }
});

// ---------------------------------------------------------------------------------------------
// F32 <-> BF16

test('F32 -> BF16 on edge values matches the float64 reference', () => {
  const edges: number[] = [
    0x00000000, 0x80000000, 0x7f800000, 0xff800000,
    0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7f807fff, 0x7f80ffff, 0xff80ffff, 0x7fffffff, 0x7f810000,
    0x7f7fffff, 0xff7fffff, 0x7f7f7fff, 0x7f7f8000, 0x7f7e8000, 0x7f7effff, // max normal, overflow to Inf
    0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff, // ties to even and neighbours
    0x00000001, 0x00008000, 0x00018000, 0x00007fff, 0x007f8000, 0x007fffff, 0x00800000, 0x807fffff, // subnormals
    f32Bits(1), f32Bits(-1), f32Bits(0.1), f32Bits(Math.PI), f32Bits(-1e-40), f32Bits(3e38),
  ];
  for (let e = 0; e < 256; e++) {
    for (const m of [0, 1, 0x7fff, 0x8000, 0x8001, 0x10000, 0x18000, 0x7fffff, 0x7f8000]) {
      edges.push((e << 23) | m, ((e << 23) | m | 0x80000000) >>> 0);
    }
  }
  for (const b of edges) checkBf16(b >>> 0);
});

test('F32 -> BF16 on random bit patterns matches the float64 reference (array and scalar paths agree)', () => {
  const next = rng(0xbf16);
  const n = 200_000;
  const src = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const r = next();
    // every other pattern has its low 16 bits forced to the halfway point
    src[i] = i % 3 === 0 ? ((r & 0xffff0000) | 0x8000) >>> 0 : r;
  }
  const out = f32ToBf16(new Float32Array(src.buffer));
  for (let i = 0; i < n; i++) {
    checkBf16(src[i]!);
    assert.equal(out[i], f32BitsToBf16Bits(src[i]!), `array and scalar paths differ for ${hex(src[i]!)}`);
    if (!isNaNBits32(src[i]!)) assert.equal(f32ToBf16Scalar(f32Value(src[i]!)), out[i]);
  }
});

test('F32 -> BF16: a NaN with payload only in the low 16 bits stays NaN (array and scalar)', () => {
  const nans = [0x7f800001, 0x7f808000, 0x7f80ffff, 0xff800001, 0xff80ffff];
  const out = f32ToBf16(new Float32Array(new Uint32Array(nans).buffer));
  nans.forEach((b, i) => {
    assert.ok(isNaNBitsBf16(out[i]!), `${hex(b)} -> ${hex(out[i]!, 4)}`);
    assert.equal(out[i], ((b >>> 16) & 0x8000) | 0x7fc0);
    assert.equal(f32BitsToBf16Bits(b), out[i]);
  });
  assert.ok(Number.isNaN(bf16ToF32Scalar(f32ToBf16Scalar(NaN))));
});

test('BF16 -> F32 is exact for all 65,536 patterns and narrows back to itself', () => {
  const all = new Uint16Array(65536);
  for (let h = 0; h < 65536; h++) all[h] = h;
  const wide = bf16ToF32(all);
  const wideBits = new Uint32Array(wide.buffer);
  const back = f32ToBf16(wide);
  for (let h = 0; h < 65536; h++) {
    assert.equal(wideBits[h], (h << 16) >>> 0, `BF16 ${hex(h, 4)} widened to ${hex(wideBits[h]!)}`);
    if (isNaNBitsBf16(h)) {
      assert.ok(isNaNBitsBf16(back[h]!));
      assert.ok(Number.isNaN(bf16ToF32Scalar(h)));
    } else {
      assert.equal(back[h], h);
      assert.ok(Object.is(bf16ToF32Scalar(h), f32Value(h << 16)));
      assert.equal(f32ToBf16Scalar(bf16ToF32Scalar(h)), h);
    }
  }
});

test('array conversions honour an offset destination and source views', () => {
  const buf = new ArrayBuffer(64);
  const src = new Float32Array(buf, 16, 4);
  src.set([1, -2.5, 65504, 1e-8]);
  const dst16 = new Uint16Array(new ArrayBuffer(32), 8, 4);
  f32ToF16(src, dst16);
  assert.deepEqual([...dst16], [0x3c00, 0xc100, 0x7bff, 0x0000]);
  const dstB = new Uint16Array(new ArrayBuffer(32), 4, 4);
  f32ToBf16(src, dstB);
  assert.deepEqual([...dstB], [...src].map((v) => f32ToBf16Scalar(v)));
  const back = new Float32Array(new ArrayBuffer(64), 32, 4);
  f16ToF32(dst16, back);
  assert.deepEqual([...back], [1, -2.5, 65504, 0]);
  bf16ToF32(dstB, back);
  assert.deepEqual([...back], [...dstB].map((h) => bf16ToF32Scalar(h)));
});

test('widening agrees with the scalar path for every length and source alignment', () => {
  const pattern = randomPatterns(64, 0x5eed);
  for (const srcOffset of [0, 2, 4, 6]) {
    for (let n = 0; n <= 19; n++) {
      const src = new Uint16Array(new ArrayBuffer(srcOffset + 2 * n + 8), srcOffset, n);
      for (let i = 0; i < n; i++) src[i] = pattern[i]! & 0xffff;
      for (const dstOffset of [0, 4, 8]) {
        const dst = new Float32Array(new ArrayBuffer(dstOffset + 4 * n + 8), dstOffset, n);
        const bits = new Uint32Array(dst.buffer, dst.byteOffset, n);
        bf16ToF32(src, dst);
        for (let i = 0; i < n; i++) assert.equal(bits[i], (src[i]! << 16) >>> 0, `bf16 n=${n} src+${srcOffset} dst+${dstOffset} i=${i}`);
        f16ToF32(src, dst);
        for (let i = 0; i < n; i++) assert.equal(bits[i], f16BitsToF32Bits(src[i]!), `f16 n=${n} src+${srcOffset} dst+${dstOffset} i=${i}`);
        // the output past n is untouched
        assert.equal(new Uint32Array(dst.buffer, dst.byteOffset + 4 * n, 2).join(), '0,0');
      }
    }
  }
});

function randomPatterns(n: number, seed: number): Uint32Array {
  const next = rng(seed);
  const out = new Uint32Array(n);
  for (let i = 0; i < n; i++) out[i] = next();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Raw bytes <-> F32

function le(values: number[], bytesPer: number, write: (dv: DataView, off: number, v: number) => void, offset = 0): Uint8Array {
  const buf = new Uint8Array(offset + values.length * bytesPer);
  const dv = new DataView(buf.buffer);
  values.forEach((v, i) => write(dv, offset + i * bytesPer, v));
  return buf.subarray(offset);
}

test('decodeToF32 / encodeFromF32 for every float dtype, aligned and unaligned', () => {
  const values = [0, -0, 1, -1.5, 0.1, 65504, -65504, 2 ** -24, Infinity, -Infinity, 3.4e38];
  const asF32 = Float32Array.from(values);
  for (const offset of [0, 1, 3]) {
    // F32
    const f32Bytes = le(values, 4, (dv, o, v) => dv.setFloat32(o, v, true), offset);
    assert.deepEqual([...decodeToF32('F32', f32Bytes)], [...asF32]);
    const copied = decodeToF32('F32', f32Bytes, { copy: true });
    assert.deepEqual([...copied], [...asF32]);
    if (offset === 0) {
      copied[0] = 42;
      assert.equal(new DataView(f32Bytes.buffer).getFloat32(0, true), 0, 'copy: true must not share memory');
    }
    // F64
    const f64Bytes = le(values, 8, (dv, o, v) => dv.setFloat64(o, v, true), offset);
    assert.deepEqual([...decodeToF32('F64', f64Bytes)], [...asF32]);
    // F16
    const halves = [...asF32].map((v) => f32ToF16Scalar(v));
    const f16Bytes = le(halves, 2, (dv, o, v) => dv.setUint16(o, v, true), offset);
    assert.deepEqual([...decodeToF32('F16', f16Bytes)], halves.map((h) => f16ToF32Scalar(h)));
    // BF16
    const brains = [...asF32].map((v) => f32ToBf16Scalar(v));
    const bf16Bytes = le(brains, 2, (dv, o, v) => dv.setUint16(o, v, true), offset);
    assert.deepEqual([...decodeToF32('BF16', bf16Bytes)], brains.map((h) => bf16ToF32Scalar(h)));
  }
  // encode
  const enc32 = encodeFromF32('F32', asF32);
  assert.equal(enc32.length, asF32.length * 4);
  assert.deepEqual([...decodeToF32('F32', enc32)], [...asF32]);
  const enc64 = encodeFromF32('F64', asF32);
  assert.equal(enc64.length, asF32.length * 8);
  assert.deepEqual([...new Float64Array(enc64.buffer.slice(enc64.byteOffset, enc64.byteOffset + enc64.length))], [...asF32]);
  const enc16 = encodeFromF32('F16', asF32);
  const dv16 = new DataView(enc16.buffer, enc16.byteOffset, enc16.byteLength);
  asF32.forEach((v, i) => assert.equal(dv16.getUint16(i * 2, true), f32ToF16Scalar(v)));
  const encB = encodeFromF32('BF16', asF32);
  const dvB = new DataView(encB.buffer, encB.byteOffset, encB.byteLength);
  asF32.forEach((v, i) => assert.equal(dvB.getUint16(i * 2, true), f32ToBf16Scalar(v)));
  // empty
  for (const dt of ['F32', 'F16', 'BF16', 'F64'] as const) {
    assert.equal(encodeFromF32(dt, new Float32Array(0)).length, 0);
    assert.equal(decodeToF32(dt, new Uint8Array(0)).length, 0);
  }
});

test('decodeToF32 / encodeFromF32 reject integer and other non-float dtypes with E_DTYPE', () => {
  for (const dt of SAFETENSORS_DTYPES) {
    if (isFloatDType(dt)) continue;
    assert.throws(
      () => decodeToF32(dt, new Uint8Array(8), { what: 'model.w' }),
      (e: unknown) => e instanceof AmalgamError && e.code === 'E_DTYPE' && e.key === 'model.w' && e.message.includes(dt),
      `decodeToF32(${dt})`,
    );
    assert.throws(
      () => encodeFromF32(dt, new Float32Array(2)),
      (e: unknown) => e instanceof AmalgamError && e.code === 'E_DTYPE' && e.message.includes(dt),
      `encodeFromF32(${dt})`,
    );
  }
});

// ---------------------------------------------------------------------------------------------
// dtype table

test('dtype sizes, alignment, byteSize and name parsing', () => {
  const sizes: Partial<Record<DType, number>> = {
    BOOL: 8, U8: 8, I8: 8, F8_E4M3: 8, F8_E5M2: 8, I16: 16, U16: 16, F16: 16, BF16: 16, I32: 32, U32: 32, F32: 32,
    I64: 64, U64: 64, F64: 64, C64: 64, F4: 4, F6_E2M3: 6, F6_E3M2: 6,
  };
  for (const [dt, bits] of Object.entries(sizes)) assert.equal(dtypeBits(dt as DType), bits, dt);
  assert.equal(dtypeAlignment('F4'), 1);
  assert.equal(dtypeAlignment('F64'), 8);
  assert.equal(dtypeAlignment('BF16'), 2);
  assert.equal(SAFETENSORS_DTYPES.length, 22);
  assert.ok(SAFETENSORS_DTYPES.every((d) => isDType(d)));
  for (const bad of ['f32', 'FLOAT', '', 'F8', 'Q8_0', 1, null, undefined, '__proto__', 'toString']) assert.equal(isDType(bad), false, String(bad));
  assert.equal(numel([]), 1);
  assert.equal(numel([2, 0, 3]), 0);
  assert.equal(numel([2, 3, 4]), 24);
  assert.equal(byteSize('F4', 3), undefined);
  assert.equal(byteSize('F4', 4), 2);
  assert.equal(byteSize('F6_E2M3', 4), 3);
  assert.equal(byteSize('F6_E2M3', 3), undefined);
  assert.equal(byteSize('F64', 2 ** 50), undefined, 'overflowing byte size must be rejected');
  assert.equal(byteSize('BF16', 7), 14);
  assert.equal(parseFloatDType(' BFloat16 '), 'BF16');
  assert.equal(parseFloatDType('fp16'), 'F16');
  assert.equal(parseFloatDType('float'), 'F32');
  assert.equal(parseFloatDType('double'), 'F64');
  assert.equal(parseFloatDType('int8'), undefined);
});
