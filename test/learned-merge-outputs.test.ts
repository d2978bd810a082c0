/**
 * DAM, evolutionary merging and AdaMerging write their output folders only where replacing them
 * deletes none of what the run reads: the recipe, the data, the models, the mergers file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runAdaMerge } from '../src/adamerge/run.js';
import type { AdaMergeRecipe } from '../src/adamerge/recipe.js';
import { bakeFromMergers } from '../src/dam/bake.js';
import type { DamRecipe } from '../src/dam/recipe.js';
import { runDam } from '../src/dam/train.js';
import { runEvolve } from '../src/evolve/evolve.js';
import type { EvolveRecipe } from '../src/evolve/recipe.js';

test('an output folder holding the recipe, the data or the mergers file is refused before any work', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'amalgam-learned-out-'));
  try {
    const out = join(dir, 'run');
    await mkdir(out);
    const recipeFile = join(out, 'recipe.yml');
    const data = join(out, 'data.txt');
    await writeFile(recipeFile, 'x\n');
    await writeFile(data, 'some text\n');
    const models = [join(dir, 'a'), join(dir, 'b')];
    const holds = /the output folder holds the input .*: writing it would delete that input/;

    const dam = { models: models.map((m) => ({ model: m, data: { path: data } })) } as unknown as DamRecipe;
    await assert.rejects(runDam(dam, { outDir: out, overwrite: true, recipeFile }), holds);
    const evolve = { baseModel: null, models: models.map((path) => ({ path })), data: [{ path: data }], test: [] } as unknown as EvolveRecipe;
    await assert.rejects(runEvolve(evolve, { outDir: out, overwrite: true, recipeFile }), holds);
    const ada = { baseModel: models[0], models: models.map((path) => ({ path })), data: [], test: [{ path: data }] } as unknown as AdaMergeRecipe;
    await assert.rejects(runAdaMerge(ada, { outDir: out, overwrite: true, recipeFile }), holds);
    await assert.rejects(bakeFromMergers(models, join(out, 'mergers.safetensors'), out, { overwrite: true }), holds);
    assert.deepEqual((await readdir(out)).sort(), ['data.txt', 'recipe.yml']);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
