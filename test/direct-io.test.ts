/**
 * Direct (O_DIRECT) writes of safetensors data: the page split, the aligned memory, and files
 * written through the direct path byte-identical to the ordinary writer's.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { allocAlignedShared, DIRECT_ALIGN, directFlag, isPageAligned, splitForDirect } from '../src/io/aligned.js';
import { SafetensorsFileWriter, serializeSafetensors, type TensorData } from '../src/io/safetensors.js';
import { Rng } from '../src/tensor/rng.js';

// Inside the repository (a disk-backed file system) rather than the OS temp folder, which may be
// tmpfs, where direct I/O is refused and only the fallback would run.
const root = await mkdtemp(join(process.cwd(), '.direct-io-test-'));
after(() => rm(root, { recursive: true, force: true }));

test('splitForDirect: head, whole pages, tail; nothing direct when the phases differ or no page fits', () => {
  const P = DIRECT_ALIGN;
  assert.deepEqual(splitForDirect(100, 100, 3 * P), { head: P - 100, middle: 2 * P, tail: 100 });
  assert.deepEqual(splitForDirect(P, 0, 2 * P), { head: 0, middle: 2 * P, tail: 0 });
  assert.deepEqual(splitForDirect(P + 8, 8 + 5 * P, 2 * P - 8), { head: P - 8, middle: P, tail: 0 });
  assert.deepEqual(splitForDirect(100, 101, 3 * P), { head: 3 * P, middle: 0, tail: 0 });
  assert.deepEqual(splitForDirect(100, 100, P), { head: P, middle: 0, tail: 0 });
  assert.deepEqual(splitForDirect(0, 0, P - 2), { head: P - 2, middle: 0, tail: 0 });
  // Every split covers the range exactly and its middle is page-aligned in file and memory.
  const rng = new Rng(3);
  for (let k = 0; k < 500; k++) {
    const pos = Math.floor(rng.next() * 5 * P);
    const len = Math.floor(rng.next() * 4 * P);
    const off = rng.next() < 0.5 ? pos % P : Math.floor(rng.next() * 2 * P);
    const s = splitForDirect(pos, off, len);
    assert.equal(s.head + s.middle + s.tail, len);
    if (s.middle) {
      assert.equal((pos + s.head) % P, 0);
      assert.equal((off + s.head) % P, 0);
      assert.equal(s.middle % P, 0);
      assert.ok(s.head < P && s.tail < P);
    }
  }
});

test('allocAlignedShared: shared, large enough, marked page-aligned; other buffers are not', () => {
  const b = allocAlignedShared(100_000);
  assert.ok(b instanceof SharedArrayBuffer);
  assert.ok(b.byteLength >= 100_000);
  assert.equal(isPageAligned(b), true);
  assert.equal(isPageAligned(new SharedArrayBuffer(100_000)), false);
  assert.equal(isPageAligned(new ArrayBuffer(100_000)), false);
});

/**
 * Tensors of 1 byte to a few pages (U8, F16, F32), their bytes in page-aligned memory at their file
 * phase (direct middle), at another phase, or in an ordinary buffer, written concurrently in a
 * shuffled order.
 */
async function writeMixed(path: string, directWrites: boolean, seed: number): Promise<{ file: Uint8Array; expected: Uint8Array; direct: boolean }> {
  const rng = new Rng(seed);
  const tensors: TensorData[] = [];
  for (let i = 0; i < 40; i++) {
    const dtype = (['U8', 'F16', 'F32'] as const)[i % 3]!;
    const el = dtype === 'U8' ? 1 : dtype === 'F16' ? 2 : 4;
    const big = rng.next() < 0.3;
    const n = 1 + Math.floor(rng.next() * (big ? (5 * DIRECT_ALIGN) / el : 300));
    const data = new Uint8Array(n * el);
    for (let j = 0; j < data.length; j++) data[j] = Math.floor(rng.next() * 256);
    tensors.push({ name: `t${i}`, dtype, shape: [n], data });
  }
  const w = await SafetensorsFileWriter.create(path, tensors, { format: 'pt' }, { directWrites });
  const order = tensors.map((_, i) => i).sort(() => rng.next() - 0.5);
  await Promise.all(
    order.map(async (i, k) => {
      const t = tensors[i]!;
      const pos = w.positionOf(t.name);
      let view: Uint8Array;
      if (k % 3 === 2) {
        view = t.data.slice();
      } else {
        const phase = k % 3 === 0 ? pos % DIRECT_ALIGN : (pos + 2) % DIRECT_ALIGN;
        view = new Uint8Array(allocAlignedShared(phase + t.data.length), phase, t.data.length);
        view.set(t.data);
      }
      await w.write(t.name, view);
    }),
  );
  const direct = w.writesDirect;
  await w.finish();
  return { file: new Uint8Array(await readFile(path)), expected: serializeSafetensors(tensors, { format: 'pt' }), direct };
}

test('SafetensorsFileWriter with direct writes: the file is byte-identical to the serialized tensors', async (t) => {
  for (const seed of [1, 2, 3]) {
    const direct = await writeMixed(join(root, `direct-${seed}.safetensors`), true, seed);
    assert.equal(direct.file.length, direct.expected.length);
    assert.ok(Buffer.from(direct.file).equals(Buffer.from(direct.expected)), `seed ${seed}: the directly written file differs`);
    const buffered = await writeMixed(join(root, `buffered-${seed}.safetensors`), false, seed);
    assert.equal(buffered.direct, false);
    assert.ok(Buffer.from(buffered.file).equals(Buffer.from(direct.file)), `seed ${seed}: direct and buffered files differ`);
    if (seed === 1 && !direct.direct) t.diagnostic(`direct I/O is not available here (${directFlag() === undefined ? 'platform' : 'file system'}): only the fallback ran`);
  }
});

test('AMALGAM_DIRECT_IO=0 turns direct writes off', async () => {
  const saved = process.env.AMALGAM_DIRECT_IO;
  process.env.AMALGAM_DIRECT_IO = '0';
  try {
    const r = await writeMixed(join(root, 'off.safetensors'), true, 4);
    assert.equal(r.direct, false);
    assert.ok(Buffer.from(r.file).equals(Buffer.from(r.expected)));
  } finally {
    if (saved === undefined) delete process.env.AMALGAM_DIRECT_IO;
    else process.env.AMALGAM_DIRECT_IO = saved;
  }
});
