/**
 * The config validator's parameter table and the method registry describe the same parameters:
 * names, kinds, types, defaults and required flags agree for every method (parameters the config
 * accepts only to ignore them, such as sce's `weight`, are the one allowed difference).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MERGE_METHODS } from '../src/merge/registry.js';
import { methodParameters, mergeMethodNames } from '../src/config/methods.js';

test('every registered method has the same parameter table in the config validator', () => {
  assert.deepEqual([...mergeMethodNames()].sort(), MERGE_METHODS.map((m) => m.name).sort());
  for (const m of MERGE_METHODS) {
    const cfg = methodParameters(m.name);
    assert.ok(cfg, `config table lacks ${m.name}`);
    const fromRegistry = [
      ...Object.entries(m.globalParams).map(([name, s]) => ({ name, kind: 'global', type: s.type, default: s.default, required: !!s.required })),
      ...Object.entries(m.perModelParams).map(([name, s]) => ({ name, kind: 'model', type: s.type, default: s.default, required: !!s.required })),
    ].sort((a, b) => a.name.localeCompare(b.name) || a.kind.localeCompare(b.kind));
    const fromConfig = cfg
      .filter((p) => !(p.ignored && !fromRegistry.some((r) => r.name === p.name && r.kind === p.kind)))
      .map((p) => ({ name: p.name, kind: p.kind, type: p.type, default: p.default, required: !!p.required }))
      .sort((a, b) => a.name.localeCompare(b.name) || a.kind.localeCompare(b.kind));
    assert.deepEqual(fromConfig, fromRegistry, `parameter tables differ for ${m.name}`);
  }
});
