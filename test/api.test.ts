/** The package entry point exposes the library the README shows, and it works end to end. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as amalgam from '../src/index.js';

test('README library example: open a folder, read every tensor as float32', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'amalgam-api-'));
  try {
    const m = join(dir, 'm');
    const made = await amalgam.writeSyntheticLlama(m, { numLayers: 1, hiddenSize: 16, intermediateSize: 24, numHeads: 2, numKvHeads: 1, vocabSize: 32, dtype: 'BF16', seed: 3 });
    const model = await amalgam.openSafetensors(m);
    let values = 0;
    for (const t of model.tensors()) {
      const v = await model.readF32(t.name);
      assert.equal(v.length, t.shape.reduce((a, b) => a * b, 1));
      values += v.length;
    }
    await model.close();
    assert.equal(values, made.tensors.reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1), 0));
    const rep = await amalgam.inspectPath(m);
    assert.equal(rep.parameters.total, values);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the entry point exports each subsystem', () => {
  for (const name of ['AmalgamError', 'openSafetensors', 'ShardedSafetensorsWriter', 'GgufFile', 'Llama2cCheckpoint', 'convertToHf', 'resolveArchitecture', 'openModelFolder', 'readPeftAdapter', 'parseMergeConfig', 'planMerge', 'runMerge', 'mergeTensor', 'LlamaModel', 'AdamW', 'inspectPath', 'runDemo']) {
    assert.equal(typeof (amalgam as Record<string, unknown>)[name], 'function', name);
  }
  assert.ok(amalgam.MERGE_METHODS.length >= 18);
});
