/**
 * The built-in default job: generate a small Llama-shaped base model and three "fine-tuned"
 * variants from a seed (no downloads), merge them with TIES through the bundled configuration
 * (`examples/demo-ties.yml`), and look at the result.
 *
 * The variants are the base plus seeded changes: `ft-math` and `ft-code` share one dense
 * direction (a skill both learned) and each adds sparse changes of its own; `ft-chat` has only
 * its own sparse changes. A good merge keeps the shared direction and most of each model's own
 * changes, which the analysis measures with cosines.
 */
import { mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { AmalgamError } from '../errors.js';
import { withStagingDir } from '../io/atomic-dir.js';
import { openSafetensors, ShardedSafetensorsWriter } from '../io/safetensors.js';
import { ioError, type TensorSource } from '../io/source.js';
import { inspectPath, type InspectReport } from '../inspect.js';
import { parseMergeConfig } from '../config/parse.js';
import { runMerge, type RunMergeResult } from '../merge/run.js';
import { Rng } from '../tensor/rng.js';
import { writeSyntheticLlama } from './synthetic.js';

/** The demo's merge configuration; `examples/demo-ties.yml` holds the same text. */
export const DEMO_CONFIG = `# TIES merge of three fine-tunes of one base model.
# \`amalgam demo\` generates the models (seeded, no downloads) next to a copy of this file and
# runs it; model paths are relative to that folder.
merge_method: ties
base_model: base
models:
  - model: ft-math
    parameters:
      weight: 1.0
      density: 0.5
  - model: ft-code
    parameters:
      weight: 0.8
      density: [0.7, 0.3]   # a gradient: 0.7 at the first layer, 0.3 at the last
  - model: ft-chat
    parameters:
      weight:               # 0.6 for MLP weights, 0.3 for everything else
        - filter: mlp
          value: 0.6
        - value: 0.3
      density: 0.4
parameters:
  normalize: true
dtype: bfloat16
`;

export const DEMO_CONFIG_FILE = 'demo-ties.yml';

interface VariantSpec {
  name: string;
  description: string;
  /** Multiple of the shared direction added. */
  shared: number;
  /** Fraction of elements the model changes on its own, and the size of those changes (× the tensor's scale). */
  own: number;
  ownScale: number;
}

const VARIANTS: VariantSpec[] = [
  { name: 'ft-math', description: 'shared direction + 10% own changes', shared: 1.0, own: 0.1, ownScale: 0.3 },
  { name: 'ft-code', description: '0.8 x shared direction + 10% own changes', shared: 0.8, own: 0.1, ownScale: 0.3 },
  { name: 'ft-chat', description: '15% own changes only', shared: 0, own: 0.15, ownScale: 0.3 },
];

/** Size of the shared direction (× the tensor's scale). */
const SHARED_SCALE = 0.08;

export interface DemoOptions {
  seed?: number;
  /** Worker threads of the merge (default: the number of cores). */
  jobs?: number;
}

export interface DemoModel {
  name: string;
  dir: string;
  description: string;
}

export interface DemoAnalysis {
  /** Cosine between (merged − base) and each variant's change, over all weights. */
  cosines: { model: string; cosine: number }[];
  /** Cosine between (merged − base) and the direction ft-math and ft-code share. */
  sharedCosine: number;
  /** ‖merged − base‖ / ‖base‖ over all weights. */
  relativeChange: number;
}

export interface DemoResult {
  dir: string;
  seed: number;
  models: DemoModel[];
  configPath: string;
  merge: RunMergeResult;
  /** The merged model folder. */
  output: string;
  /** `inspect` of the merged model. */
  report: InspectReport;
  analysis: DemoAnalysis;
  elapsedMs: { generate: number; merge: number; total: number };
}

/** 32-bit FNV-1a, to give every tensor its own seeded stream. */
function hash(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** Typical magnitude of a tensor's entries: the init scale of a matrix, the spread of a norm. */
function scaleOf(shape: readonly number[]): number {
  return shape.length >= 2 ? 1 / Math.sqrt(shape[1]!) : 0.05;
}

function sharedDirection(seed: number, name: string, n: number, scale: number): Float32Array {
  return new Rng((Math.imul(seed + 1, 0x9e3779b1) ^ hash(`shared:${name}`)) >>> 0).fillNormal(new Float32Array(n), SHARED_SCALE * scale);
}

async function writeVariant(base: TensorSource, baseConfig: string, dir: string, v: VariantSpec, seed: number): Promise<void> {
  const specs = base.tensors().map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape }));
  await withStagingDir(
    dir,
    async (stage) => {
      await writeFile(stage.file('config.json'), baseConfig);
      const writer = await ShardedSafetensorsWriter.create(stage.path, specs, {
        metadata: { format: 'pt', source: `amalgam demo ${v.name}, seed ${seed}` },
      });
      try {
        for (const s of specs) {
          const x = await base.readF32(s.name);
          const scale = scaleOf(s.shape);
          if (v.shared !== 0) {
            const u = sharedDirection(seed, s.name, x.length, scale);
            for (let i = 0; i < x.length; i++) x[i] += v.shared * u[i]!;
          }
          const rng = new Rng((Math.imul(seed + 7, 0x85ebca6b) ^ hash(`${v.name}:${s.name}`)) >>> 0);
          for (let i = 0; i < x.length; i++) {
            if (rng.next() < v.own) x[i] += v.ownScale * scale * rng.normal();
          }
          await writer.writeF32(s.name, x);
        }
        await writer.finish();
      } catch (e) {
        await writer.abort();
        throw e;
      }
    },
    { overwrite: true },
  );
}

async function analyse(dir: string, seed: number, merged: string): Promise<DemoAnalysis> {
  const open = (p: string) => openSafetensors(p);
  const base = await open(join(dir, 'base'));
  const out = await open(merged);
  const variants = await Promise.all(VARIANTS.map((v) => open(join(dir, v.name))));
  try {
    const dots = VARIANTS.map(() => ({ dot: 0, norm: 0 }));
    let mm = 0;
    let bb = 0;
    let sharedDot = 0;
    let sharedNorm = 0;
    for (const t of base.tensors()) {
      const b = await base.readF32(t.name);
      const m = await out.readF32(t.name);
      const u = sharedDirection(seed, t.name, b.length, scaleOf(t.shape));
      for (let i = 0; i < b.length; i++) {
        const d = m[i]! - b[i]!;
        mm += d * d;
        bb += b[i]! * b[i]!;
        sharedDot += d * u[i]!;
        sharedNorm += u[i]! * u[i]!;
      }
      for (let k = 0; k < VARIANTS.length; k++) {
        const x = await variants[k]!.readF32(t.name);
        for (let i = 0; i < b.length; i++) {
          const tau = x[i]! - b[i]!;
          dots[k]!.dot += (m[i]! - b[i]!) * tau;
          dots[k]!.norm += tau * tau;
        }
      }
    }
    const cos = (dot: number, n: number) => (mm > 0 && n > 0 ? dot / Math.sqrt(mm * n) : 0);
    return {
      cosines: VARIANTS.map((v, k) => ({ model: v.name, cosine: cos(dots[k]!.dot, dots[k]!.norm) })),
      sharedCosine: cos(sharedDot, sharedNorm),
      relativeChange: bb > 0 ? Math.sqrt(mm / bb) : 0,
    };
  } finally {
    await Promise.all([base, out, ...variants].map((s) => s.close()));
  }
}

/** What a demo writes into its folder: the models, the merged model and the configuration. */
const DEMO_ENTRIES = new Set(['base', ...VARIANTS.map((v) => v.name), 'merged', DEMO_CONFIG_FILE]);

/** Staging leftovers of an interrupted demo (`.base.partial-…`, `.merged.old-…`). */
const DEMO_STAGING = new RegExp(`^\\.(${['base', ...VARIANTS.map((v) => v.name), 'merged'].join('|')})\\.(partial|old)-`);

/**
 * The demo writes into a folder that does not exist, is empty, or holds an earlier demo's output
 * (its configuration file, written first, and nothing but the demo's own files), which it
 * replaces. Anything else is refused, so that no unrelated file is replaced or mixed in.
 */
async function checkDemoFolder(outDir: string): Promise<void> {
  let st;
  try {
    st = await stat(outDir);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException)?.code;
    if (code === 'ENOENT') return;
    if (code === 'ENOTDIR') {
      throw new AmalgamError('E_USAGE', 'a part of the demo output path is a file, not a folder', { file: outDir, hint: 'choose a new or empty folder with --out', cause: e });
    }
    throw ioError(outDir, e);
  }
  if (!st.isDirectory()) {
    throw new AmalgamError('E_USAGE', 'the demo output path exists and is not a folder', { file: outDir, hint: 'choose a new or empty folder with --out' });
  }
  const entries = await readdir(outDir);
  if (entries.length === 0) return;
  const foreign = entries.filter((n) => !DEMO_ENTRIES.has(n) && !DEMO_STAGING.test(n)).sort();
  let marked = false;
  try {
    marked = (await readFile(join(outDir, DEMO_CONFIG_FILE), 'utf8')).includes('amalgam demo');
  } catch {
    marked = false;
  }
  if (marked && foreign.length === 0) return;
  const listed = foreign.slice(0, 5).join(', ') + (foreign.length > 5 ? `, ... (${foreign.length} in all)` : '');
  throw new AmalgamError(
    'E_USAGE',
    foreign.length
      ? `the folder is not empty and holds files the demo did not write (${listed}); the demo replaces only an earlier demo's output`
      : `the folder is not empty and is not an earlier demo's output (no ${DEMO_CONFIG_FILE} written by amalgam demo); the demo replaces only an earlier demo's output`,
    { file: outDir, hint: 'choose a new or empty folder with --out' },
  );
}

/**
 * Generates the demo models in `outDir` (replacing an earlier demo there; see `checkDemoFolder`
 * for the folders it accepts), writes the configuration, merges, inspects and analyses the
 * result. Deterministic for a seed.
 */
export async function runDemo(outDir: string, opts: DemoOptions = {}): Promise<DemoResult> {
  const t0 = Date.now();
  const seed = opts.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0) throw new AmalgamError('E_USAGE', `the demo seed must be an integer >= 0, got ${seed}`);
  if (opts.jobs !== undefined && (!Number.isSafeInteger(opts.jobs) || opts.jobs < 1)) {
    throw new AmalgamError('E_USAGE', `the demo's worker threads (jobs) must be an integer >= 1, got ${opts.jobs}`);
  }
  await checkDemoFolder(outDir);
  try {
    await mkdir(outDir, { recursive: true });
  } catch (e) {
    throw new AmalgamError('E_IO', 'the demo output folder cannot be created', { file: outDir, hint: 'choose an output path in a folder you can write', cause: e });
  }
  // The configuration first: it marks the folder as the demo's, even if the run is interrupted.
  const configPath = join(outDir, DEMO_CONFIG_FILE);
  await writeFile(configPath, DEMO_CONFIG);
  const baseDir = join(outDir, 'base');
  const base = await writeSyntheticLlama(baseDir, { seed, maxShardBytes: 96 * 1024, overwrite: true });
  await writeFile(join(baseDir, 'generation_config.json'), JSON.stringify({ bos_token_id: 1, eos_token_id: 2, _from_model_config: true }, null, 2) + '\n');
  const baseConfig = JSON.stringify(base.config, null, 2) + '\n';
  const source = await openSafetensors(baseDir);
  try {
    for (const v of VARIANTS) await writeVariant(source, baseConfig, join(outDir, v.name), v, seed);
  } finally {
    await source.close();
  }
  const models: DemoModel[] = [
    { name: 'base', dir: baseDir, description: `seeded Llama-shaped model (seed ${seed})` },
    ...VARIANTS.map((v) => ({ name: v.name, dir: join(outDir, v.name), description: `base + ${v.description}` })),
  ];
  const t1 = Date.now();

  const output = join(outDir, 'merged');
  const merge = await runMerge(parseMergeConfig(DEMO_CONFIG, { file: configPath }), output, {
    baseDir: outDir,
    configYaml: DEMO_CONFIG,
    overwrite: true,
    ...(opts.jobs !== undefined ? { jobs: opts.jobs } : {}),
  });
  const t2 = Date.now();
  const report = await inspectPath(output);
  const analysis = await analyse(outDir, seed, output);
  return {
    dir: outDir,
    seed,
    models,
    configPath,
    merge,
    output,
    report,
    analysis,
    elapsedMs: { generate: t1 - t0, merge: t2 - t1, total: Date.now() - t0 },
  };
}
