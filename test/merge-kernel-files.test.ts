/**
 * The fused merge kernel on inputs read from files: region by region or resident (each input read
 * once, whole), through the page cache or with O_DIRECT at any file offset, equals the kernel on
 * the same values in memory, bit for bit.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, constants, openSync, writeSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { directFlag, looksUncached } from '../src/io/aligned.js';
import type { MemoryValues } from '../src/merge/fused-common.js';
import { kernelFileReads, wasmKernelsAvailable } from '../src/merge/fused-wasm.js';
import { fusedMerge, gtaVariantOf, type StoredInput } from '../src/merge/gta.js';
import { getMergeMethod } from '../src/merge/registry.js';
import { bf16ToF32, f32ToBf16 } from '../src/tensor/dtype.js';
import { Rng } from '../src/tensor/rng.js';

// A disk-backed folder (the OS temp folder may be tmpfs, which refuses O_DIRECT).
const root = await mkdtemp(join(process.cwd(), '.kernel-files-test-'));
after(() => rm(root, { recursive: true, force: true }));

interface Case {
  n: number;
  models: number;
  dtype: 'BF16' | 'F32';
  seed: number;
}

/** Base and fine-tunes as stored values, written one after another into a file at odd offsets. */
function makeCase(c: Case, path: string): { memory: MemoryValues[]; offsets: number[] } {
  const rng = new Rng(c.seed);
  const base = new Float32Array(c.n);
  for (let i = 0; i < c.n; i++) base[i] = (rng.next() - 0.5) * 0.1;
  const memory: MemoryValues[] = [];
  for (let m = 0; m <= c.models; m++) {
    const a = new Float32Array(c.n);
    for (let i = 0; i < c.n; i++) a[i] = m === 0 ? base[i]! : base[i]! + (rng.next() - 0.5) * 0.01 * (m + 1);
    memory.push(c.dtype === 'F32' ? { dtype: 'F32', data: a } : { dtype: 'BF16', data: f32ToBf16(a) });
  }
  const fd = openSync(path, 'w');
  const offsets: number[] = [];
  let pos = 8 + 2 * Math.floor(rng.next() * 3000); // neither page- nor 4-byte-aligned for BF16
  if (c.dtype === 'F32') pos = 4 * Math.ceil(pos / 4);
  for (const v of memory) {
    const bytes = new Uint8Array(v.data.buffer, v.data.byteOffset, v.data.byteLength);
    writeSync(fd, bytes, 0, bytes.length, pos);
    offsets.push(pos);
    pos += bytes.length + (c.dtype === 'F32' ? 4 : 2) * (1 + Math.floor(rng.next() * 700));
  }
  writeSync(fd, new Uint8Array(123), 0, 123, pos);
  closeSync(fd);
  return { memory, offsets };
}

function merge(inputs: StoredInput[], n: number, dtype: 'BF16' | 'F32', residentBytes: number): Uint8Array {
  const v = gtaVariantOf(getMergeMethod('ties'))!;
  const out: MemoryValues = dtype === 'F32' ? { dtype: 'F32', data: new Float32Array(n) } : { dtype: 'BF16', data: new Uint16Array(n) };
  const perModel: Record<string, Record<string, number>> = {};
  inputs.slice(1).forEach((x, k) => (perModel[x.model] = { weight: [1, 0.8, 0.6, -0.4][k % 4]!, density: [0.5, 0.3, 0.9, 0.5][k % 4]! }));
  const params = { global: { normalize: true, rescale: false, lambda: 1, int8_mask: false }, perModel };
  assert.equal(fusedMerge(v, { tensorName: 't', isEmbed: false, base: 'base', params }, inputs, out, { residentBytes }), true);
  return new Uint8Array(out.data.buffer, out.data.byteOffset, out.data.byteLength).slice();
}

const cases: Case[] = [
  { n: 1000, models: 2, dtype: 'BF16', seed: 1 },
  { n: 70_001, models: 3, dtype: 'BF16', seed: 2 },
  { n: 300_003, models: 1, dtype: 'F32', seed: 3 },
  // Above the sampling threshold (2^20) and above one region of direct reads.
  { n: (1 << 20) + 4099, models: 3, dtype: 'BF16', seed: 4 },
  { n: 3 * (1 << 20) + 17, models: 2, dtype: 'F32', seed: 5 },
];

for (const c of cases) {
  test(`fused kernel from a file equals it from memory: ${c.dtype}, n=${c.n}, ${c.models} models`, { skip: !wasmKernelsAvailable() && 'WebAssembly kernels not built (npm run build:wasm)' }, () => {
    const path = join(root, `case-${c.seed}.bin`);
    const { memory, offsets } = makeCase(c, path);
    const names = memory.map((_, k) => (k === 0 ? 'base' : `m${k}`));
    const want = merge(
      memory.map((values, k) => ({ model: names[k]!, shape: [c.n], values })),
      c.n,
      c.dtype,
      0,
    );
    // A plain float32 check that the case is not degenerate: some output differs from the base.
    const outF32 = c.dtype === 'F32' ? new Float32Array(want.buffer) : bf16ToF32(new Uint16Array(want.buffer));
    const baseF32 = memory[0]!.dtype === 'F32' ? memory[0]!.data : bf16ToF32(memory[0]!.data as Uint16Array);
    assert.ok(outF32.some((x, i) => x !== baseF32[i]));

    const fd = openSync(path, 'r');
    const flag = directFlag();
    let dfd: number | undefined;
    try {
      dfd = flag === undefined ? undefined : openSync(path, constants.O_RDONLY | flag);
    } catch {
      dfd = undefined;
    }
    try {
      for (const direct of dfd === undefined ? [false] : [false, true]) {
        for (const residentBytes of [0, 1 << 30]) {
          const inputs: StoredInput[] = memory.map((m, k) => ({
            model: names[k]!,
            shape: [c.n],
            values: { dtype: m.dtype, fd, offset: offsets[k]!, length: c.n, ...(direct ? { directFd: dfd! } : {}) },
          }));
          const before = kernelFileReads();
          const got = merge(inputs, c.n, c.dtype, residentBytes);
          const reads = kernelFileReads();
          // Direct reads happen where a read is large enough (and the file system takes them).
          if (direct && c.n * (c.dtype === 'F32' ? 4 : 2) >= 1 << 18) assert.ok(reads.direct > before.direct, 'no direct read was made');
          if (!direct) assert.equal(reads.direct, before.direct);
          assert.equal(Buffer.compare(Buffer.from(got), Buffer.from(want)), 0, `direct=${direct} resident=${residentBytes > 0}`);
        }
      }
    } finally {
      closeSync(fd);
      if (dfd !== undefined) closeSync(dfd);
    }
  });
}

test('looksUncached: false for a file too small to sample and for a missing file', () => {
  const tiny = join(root, 'tiny.bin');
  const t = openSync(tiny, 'w');
  writeSync(t, new Uint8Array(100));
  closeSync(t);
  assert.equal(looksUncached(tiny), false);
  assert.equal(looksUncached(join(root, 'missing.bin')), false);
});
