/**
 * Merge benchmark: TIES (density 0.5) of three fine-tunes onto their base, four Llama-shaped BF16
 * checkpoints of >= 1 GB each, run in a child process so that its peak RSS is its own. The same
 * run times the I/O floor: `cat` of every input file to /dev/null plus writing (and fsyncing) as
 * many bytes as the merge writes, and prints the ratio merge / floor and the memory bound
 * (inputs + 3) x largest tensor in F32 + 300 MB. `--method` times another merge method of the
 * registry on the same checkpoints (without the TIES bar and the reference TIES check).
 *
 * The checkpoints are generated on first use in `.bench-data/merge/` at the repository root and
 * reused while they are still valid.
 */
import { spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { mkdir, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { availableParallelism, loadavg } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { fmtBytes, fnv1a, hfConfig, llamaSpecs, positive, specBytes, timeCat } from './common.js';
import { allocAlignedShared, DIRECT_ALIGN, directFlag } from '../src/io/aligned.js';
import { INDEX_FILE, ShardedSafetensors, ShardedSafetensorsWriter, openSafetensors, type TensorSpec } from '../src/io/safetensors.js';
import type { MemoryValues } from '../src/merge/fused-common.js';
import { useWasmKernels, wasmKernelsAvailable } from '../src/merge/fused-wasm.js';
import { combineTaskVectors, fusedMerge, gtaVariantOf } from '../src/merge/gta.js';
import { methodParameters } from '../src/config/methods.js';
import { assertKnownParameters } from '../src/config/validate.js';
import { getMergeMethod, hasMergeMethod, mergeMethodNames, prepareParams, weightedModels, type ParamValue } from '../src/merge/registry.js';
import { sparsify } from '../src/merge/sparsify.js';
import { subtract } from '../src/merge/tensor-ops.js';
import { bf16ToF32, f32ToBf16 } from '../src/tensor/dtype.js';
import { encodeFromF32, numel } from '../src/tensor/dtype.js';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const META_FILE = 'bench-meta.json';
/** Bumped whenever the generated content or layout changes, so stale folders are regenerated. */
const DATA_VERSION = 1;
const MODELS = ['base', 'ft1', 'ft2', 'ft3'] as const;
/** Weights of ft1..ft3, for every method that reads per-model weights. */
const WEIGHTS = [1.0, 0.8, 0.6];
/** Density of each fine-tune, for every method that reads `density`. */
const DENSITY = 0.5;
/** Weight of the base where a method weights it as an ordinary input (linear). */
const BASE_WEIGHT = 1.0;
/**
 * Global parameters the configuration sets: TIES as its bar was defined, and values for the
 * parameters some methods require. Every other global parameter keeps its default.
 */
const METHOD_GLOBALS: Readonly<Record<string, Readonly<Record<string, ParamValue>>>> = {
  ties: { normalize: true },
  slerp: { t: 0.5 },
  nearswap: { t: 0.0001 },
};
/** Methods of the registry that the benchmark does not run, and why. */
const REFUSED: Readonly<Record<string, string>> = {
  passthrough: 'passthrough copies one model per tensor; there is nothing to merge',
};
/** Fine-tune m perturbs each base value by a uniform integer in [-2^(m+2), 2^(m+2)) BF16 steps. */
const PERTURB_BITS = [0, 4, 5, 6];
const SLACK_BYTES = 300e6;

function help(): string {
  return `usage: npm run bench -- merge [options]

  --method <name>   merge method to time (default ties), configured in <name>.yml: weights
                    1/0.8/0.6 and density 0.5 where the method reads them (ties: normalize: true;
                    linear weights the base 1; slerp t 0.5, nearswap t 0.0001), other parameters
                    at their defaults, random masks from the merge's default seed. Methods of two
                    models merge base and ft1 (nuslerp: base, ft1 and ft2); the I/O floor and the
                    memory bound count their inputs only. The bar (ratio <= 1.5), the PASS/FAIL
                    verdicts and the reference TIES check of the output are for ties only. One of:
                    ${wrap(supportedMethods().join(', '), 20, 100)}
  --size-gb <n>     size of each checkpoint in GB (1e9 bytes), at least (default 1)
  --shard-mb <n>    shard size budget of the inputs in MB (default 500)
  --dir <path>      folder for the generated checkpoints, the configuration and the output
                    (default .bench-data/merge in the repository root)
  --seed <n>        content seed (default 1)
  --jobs <n>        worker threads of the merge (default: the merge's own default)
  --repeats <n>     merges to run, each in a fresh child process; the fastest is reported and the
                    peak RSS is the largest of all runs (default 2)
  --regen           regenerate the checkpoints even if valid ones exist
  --keep-output     keep the merged model (default: removed after the run)
  --settle <s>      seconds to wait before each timed merge and write (and, with a cold cache,
                    each timed cat) after the files of the previous run were deleted or dropped
                    (default 0). On VMs whose host takes freed guest memory back within seconds,
                    filling memory freed a moment ago is cheap and filling it later is not; a
                    settle makes every timed step pay that cost, none makes them all reuse it
  --cache <mode>    warm: inputs in the page cache (read from RAM); cold: every input file is
                    dropped from the page cache before each timed cat and each merge (read from
                    disk; needs Linux and GNU dd); both (default)
  --lib <dist|src>  library the timed merges run: the compiled package in dist/, as the amalgam
                    command runs it, compiled first if a source file is newer (default); or the
                    TypeScript sources under tsx (about a second more CPU for loading)
  --check-kernels <n>  instead of the benchmark: compare the fused merge kernel (WebAssembly and
                    TypeScript) with the unfused pipeline (taskVector, sparsify, combineTaskVectors)
                    on n random cases, bit for bit (--method is ignored)
  --json            print the results as JSON on stdout (progress goes to stderr)
  --help            this text`;
}

/** `text` broken at spaces into lines of at most `width` characters, continued at `indent`. */
function wrap(text: string, indent: number, width: number): string {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(' ')) {
    if (line && indent + line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else {
      line = line ? `${line} ${word}` : word;
    }
  }
  if (line) lines.push(line);
  return lines.join(`\n${' '.repeat(indent)}`);
}

// ---------------------------------------------------------------------------------------------
// Deterministic content

function streamSeed(name: string, seed: number, model: number): number {
  return (fnv1a(name) ^ Math.imul(seed, 0x9e3779b9) ^ Math.imul(model + 1, 0x85ebca6b)) | 0 || 0x2545f491;
}

/**
 * BF16 weights of one tensor of model `model` (0 = base) from xorshift32 streams, two values per
 * 32-bit word. Base values have a random sign and mantissa and exponent 120..127 (magnitudes in
 * [2^-7, 2)). Fine-tune m adds a uniform integer in [-2^(b-1), 2^(b-1)) to each base value's bit
 * pattern (b = 4, 5, 6): a perturbation of a few BF16 steps, zero for 1 value in 2^b, the same
 * step size as the base value. The count is even for every tensor of this layout.
 */
function tensorBytes(name: string, count: number, seed: number, model: number): Uint8Array {
  const bytes = new Uint8Array(count * 2);
  const words = new Uint32Array(bytes.buffer, 0, count >>> 1);
  const n = words.length;
  let x = streamSeed(name, seed, 0);
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = (x & 0x83ff83ff) | 0x3c003c00;
  }
  if (model > 0) {
    const bits = PERTURB_BITS[model]!;
    const mask = (1 << bits) - 1;
    const half = 1 << (bits - 1);
    let y = streamSeed(name, seed, model);
    for (let i = 0; i < n; i++) {
      y ^= y << 13;
      y ^= y >>> 17;
      y ^= y << 5;
      const lo = (y & mask) - half;
      const hi = ((y >>> 16) & mask) - half;
      // Low halves stay within [0x3bc0, 0xc03f]: no carry or borrow crosses into the high half.
      words[i] = (words[i]! + lo + (hi << 16)) >>> 0;
    }
  }
  return bytes;
}

interface Meta {
  version: number;
  seed: number;
  layers: number;
  shardBytes: number;
  dataBytes: number;
}

function sameMeta(a: Meta, b: Meta): boolean {
  return a.version === b.version && a.seed === b.seed && a.layers === b.layers && a.shardBytes === b.shardBytes && a.dataBytes === b.dataBytes;
}

/** Why the folder does not hold the expected checkpoints, or undefined when it does. */
async function checkCheckpoints(dir: string, meta: Meta, specs: readonly TensorSpec[]): Promise<string | undefined> {
  let onDisk: Meta;
  try {
    onDisk = JSON.parse(await readFile(join(dir, META_FILE), 'utf8')) as Meta;
  } catch {
    return 'no checkpoints yet';
  }
  if (!sameMeta(onDisk, meta)) return `parameters differ (${JSON.stringify(onDisk)})`;
  const want = new Map(specs.map((s) => [s.name, s]));
  for (const [m, model] of MODELS.entries()) {
    let src;
    try {
      src = await openSafetensors(join(dir, model));
    } catch (e) {
      return `${model} does not open: ${(e as Error).message}`;
    }
    try {
      const have = src.tensors();
      if (have.length !== want.size) return `${model} holds ${have.length} tensors, expected ${want.size}`;
      for (const t of have) {
        const s = want.get(t.name);
        if (!s || s.dtype !== t.dtype || s.shape.join() !== t.shape.join()) return `${model}: tensor ${t.name} differs`;
      }
      for (const name of ['model.layers.0.input_layernorm.weight', 'model.layers.0.self_attn.k_proj.weight', 'model.norm.weight']) {
        const raw = await src.readRaw(name);
        const expected = tensorBytes(name, numel(want.get(name)!.shape), meta.seed, m);
        if (Buffer.compare(Buffer.from(raw.buffer, raw.byteOffset, raw.length), Buffer.from(expected.buffer)) !== 0) return `${model}: content of ${name} differs`;
      }
    } finally {
      await src.close();
    }
    try {
      await stat(join(dir, model, 'config.json'));
    } catch {
      return `${model} has no config.json`;
    }
  }
  return undefined;
}

async function generate(dir: string, meta: Meta, specs: readonly TensorSpec[], log: (s: string) => void): Promise<void> {
  await rm(join(dir, META_FILE), { force: true });
  const t0 = performance.now();
  for (const [m, model] of MODELS.entries()) {
    const mdir = join(dir, model);
    await rm(mdir, { recursive: true, force: true });
    await mkdir(mdir, { recursive: true });
    await writeFile(join(mdir, 'config.json'), JSON.stringify(hfConfig(meta.layers), null, 2) + '\n');
    const w = await ShardedSafetensorsWriter.create(mdir, specs, {
      maxShardBytes: meta.shardBytes,
      alwaysIndex: true,
      metadata: { format: 'pt' },
      indexMetadata: { generator: 'amalgam bench merge' },
    });
    try {
      for (const s of specs) await w.write(s.name, tensorBytes(s.name, numel(s.shape), meta.seed, m));
      await w.finish();
    } catch (e) {
      await w.abort();
      throw e;
    }
    log(`  generated ${model} (${fmtBytes(meta.dataBytes)}), ${((performance.now() - t0) / 1000).toFixed(1)} s so far`);
  }
  await writeFile(join(dir, META_FILE), JSON.stringify(meta, null, 2) + '\n');
}

// ---------------------------------------------------------------------------------------------
// The merge configuration

/** One method's configuration for the benchmark. */
interface BenchMethod {
  name: string;
  prettyName: string;
  randomized: boolean;
  /** The input models, `base` first. */
  models: string[];
  /** `base_model:` of the configuration; null where the method takes the base as an ordinary input. */
  base: string | null;
  global: Record<string, ParamValue>;
  perModel: Record<string, Record<string, ParamValue>>;
}

/**
 * The configuration of merge method `name`: the base and as many fine-tunes as the method merges
 * (all three, else the first two, else ft1), per-model `weight` and `density` where the method
 * reads them (not parameters it accepts without effect), and the globals of METHOD_GLOBALS. The
 * number of models is the largest that the registry's parameter resolution and validation accept.
 * Throws a usage error for unknown and refused methods.
 */
function benchMethod(name: string): BenchMethod {
  const refused = REFUSED[name];
  if (refused !== undefined) throw Object.assign(new Error(`--method ${name}: ${refused}; supported: ${supportedMethods().join(', ')}`), { usage: true });
  if (!hasMergeMethod(name)) throw Object.assign(new Error(`unknown --method ${JSON.stringify(name)}; supported: ${supportedMethods().join(', ')}`), { usage: true });
  const method = getMergeMethod(name);
  const specs = methodParameters(name) ?? [];
  const reads = (param: string) => specs.some((p) => p.name === param && p.kind === 'model' && !p.ignored);
  const global = { ...METHOD_GLOBALS[name] };
  const base = method.needsBase === 'none' ? null : 'base';
  let problem = '';
  for (let n = MODELS.length; n >= 2; n--) {
    const models: string[] = MODELS.slice(0, n);
    const perModel: Record<string, Record<string, ParamValue>> = {};
    for (const m of weightedModels(method, models, base)) {
      const i = models.indexOf(m);
      const p: Record<string, ParamValue> = {};
      if (reads('weight')) p['weight'] = i === 0 ? BASE_WEIGHT : WEIGHTS[i - 1]!;
      if (reads('density')) p['density'] = DENSITY;
      if (Object.keys(p).length) perModel[m] = p;
    }
    try {
      prepareParams(method, { tensorName: 'model.norm.weight', models, base }, { global, perModel });
    } catch (e) {
      problem = (e as Error).message;
      continue;
    }
    assertKnownParameters(name, Object.keys(global), (p) => `parameters.${p}`);
    for (const [m, p] of Object.entries(perModel)) assertKnownParameters(name, Object.keys(p), (k) => `${m}.parameters.${k}`);
    return { name, prettyName: method.prettyName, randomized: method.randomized, models, base, global, perModel };
  }
  throw new Error(`${name} does not merge base with ft1 (to ft3) as configured: ${problem}`);
}

/** The registry's methods that the benchmark runs, in catalogue order. */
function supportedMethods(): string[] {
  return mergeMethodNames().filter((name) => {
    if (REFUSED[name] !== undefined) return false;
    try {
      benchMethod(name);
      return true;
    } catch {
      return false;
    }
  });
}

function configYaml(c: BenchMethod): string {
  const lines = [`merge_method: ${c.name}`];
  if (c.base) lines.push(`base_model: ${c.base}`);
  lines.push('models:');
  for (const m of c.models) {
    if (m === c.base) continue;
    lines.push(`  - model: ${m}`);
    const params = Object.entries(c.perModel[m] ?? {});
    if (params.length) lines.push('    parameters:', ...params.map(([k, v]) => `      ${k}: ${v}`));
  }
  const global = Object.entries(c.global);
  if (global.length) lines.push('parameters:', ...global.map(([k, v]) => `  ${k}: ${v}`));
  lines.push('dtype: bfloat16', '');
  return lines.join('\n');
}

/** One line for the log: "TIES (density 0.5, weights 1/0.8/0.6, normalize) of 3 fine-tunes + base". */
function describe(c: BenchMethod): string {
  const tunes = c.models.filter((m) => m !== 'base');
  const parts: string[] = [];
  if (tunes.some((m) => c.perModel[m]?.['density'] !== undefined)) parts.push(`density ${DENSITY}`);
  if (tunes.some((m) => c.perModel[m]?.['weight'] !== undefined)) parts.push(`weights ${tunes.map((m) => c.perModel[m]!['weight']).join('/')}`);
  if (c.perModel['base']?.['weight'] !== undefined) parts.push(`base weight ${c.perModel['base']['weight']}`);
  for (const [k, v] of Object.entries(c.global)) parts.push(v === true ? k : v === false ? `no ${k}` : `${k} ${v}`);
  if (c.randomized) parts.push("random masks from the merge's default seed");
  const of = `${tunes.length} fine-tune${tunes.length === 1 ? '' : 's'} + base${c.base === null ? ' as an ordinary input' : ''}`;
  return `${c.prettyName} (${parts.length ? parts.join(', ') : 'default parameters'}) of ${of}`;
}

// ---------------------------------------------------------------------------------------------
// Measurements

function sleep(seconds: number): Promise<void> {
  return seconds > 0 ? new Promise((r) => setTimeout(r, seconds * 1000)) : Promise.resolve();
}

/**
 * Drops the files' pages from the page cache (posix_fadvise DONTNEED through GNU dd's
 * `iflag=nocache`), so that the next read comes from the disk. Resolves false where that is not
 * available.
 */
async function dropFromCache(files: readonly string[]): Promise<boolean> {
  for (const f of files) {
    const ok = await new Promise<boolean>((resolvePromise) => {
      const p = spawn('dd', [`if=${f}`, 'iflag=nocache', 'count=0', 'status=none'], { stdio: 'ignore' });
      p.on('error', () => resolvePromise(false));
      p.on('exit', (code) => resolvePromise(code === 0));
    });
    if (!ok) return false;
  }
  return true;
}

/**
 * Seconds to write `bytes` bytes to a new file at `path` from one reused 8 MiB buffer, fsync it and
 * close it (the merge fsyncs each output shard before renaming it). The file is removed afterwards.
 * `direct`: through an `O_DIRECT` descriptor from page-aligned memory (the last partial page
 * through the page cache), as the merge writes its output where it can; undefined where the
 * platform or file system has no direct I/O.
 */
async function timeWrite(path: string, bytes: number, settleSeconds: number, direct = false): Promise<number | undefined> {
  const flag = directFlag();
  if (direct && flag === undefined) return undefined;
  const buf = direct ? new Uint8Array(allocAlignedShared(8 << 20), 0, 8 << 20).fill(0x5a) : Buffer.alloc(8 << 20, 0x5a);
  await rm(path, { force: true });
  await sleep(settleSeconds);
  const t0 = process.hrtime.bigint();
  const fh = await open(path, 'w');
  const dfh = direct ? await open(path, constants.O_WRONLY | flag!).catch(() => undefined) : undefined;
  if (direct && !dfh) {
    await fh.close();
    await rm(path, { force: true });
    return undefined;
  }
  try {
    let done = 0;
    const aligned = dfh ? bytes - (bytes % DIRECT_ALIGN) : 0;
    while (done < aligned) {
      const n = Math.min(buf.length, aligned - done);
      const { bytesWritten } = await dfh!.write(buf, 0, n, done);
      done += bytesWritten;
    }
    while (done < bytes) {
      const n = Math.min(buf.length, bytes - done);
      const { bytesWritten } = await fh.write(buf, 0, n, done);
      done += bytesWritten;
    }
    await fh.sync();
  } finally {
    await dfh?.close();
    await fh.close();
  }
  const dt = Number(process.hrtime.bigint() - t0) / 1e9;
  await rm(path, { force: true });
  return dt;
}

/** Read requests a block device has completed: how many, and the bytes they moved. */
interface DiskReads {
  requests: number;
  bytes: number;
}

/**
 * The `stat` file of the block device holding `file` (Linux: /sys/dev/block/MAJOR:MINOR/stat, a
 * partition's own where the file is on one), or undefined elsewhere.
 */
async function deviceStatPath(file: string): Promise<string | undefined> {
  const dev = (await stat(file, { bigint: true })).dev;
  const major = Number(((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn));
  const minor = Number((dev & 0xffn) | ((dev >> 12n) & ~0xffn));
  const path = `/sys/dev/block/${major}:${minor}/stat`;
  return (await readFile(path, 'utf8').catch(() => undefined)) === undefined ? undefined : path;
}

async function diskReads(statPath: string | undefined): Promise<DiskReads | undefined> {
  if (!statPath) return undefined;
  const f = (await readFile(statPath, 'utf8').catch(() => '')).trim().split(/\s+/).map(Number);
  // Fields 1 and 3: reads completed, sectors (512 bytes) read.
  return f.length >= 3 && Number.isFinite(f[0]) && Number.isFinite(f[2]) ? { requests: f[0]!, bytes: f[2]! * 512 } : undefined;
}

/** The average read request between two readings of the device's counters, or undefined. */
function averageRequest(before: DiskReads | undefined, after: DiskReads | undefined): number | undefined {
  if (!before || !after || after.requests <= before.requests) return undefined;
  return (after.bytes - before.bytes) / (after.requests - before.requests);
}

interface ChildResult {
  /** runMerge wall time (planning, reading, merging, writing, fsync, rename). */
  seconds: number;
  /** Peak resident set of the child process (VmHWM), bytes. */
  peakRss: number;
  userSeconds: number;
  systemSeconds: number;
  jobs: number;
  bytesRead: number;
  bytesWritten: number;
  memoryBudget: number;
  peakInFlightBytes: number;
  /** Child process lifetime seen by the parent (Node and tsx start-up included). */
  processSeconds?: number;
}

/**
 * The library the timed merges run: the compiled package in dist/ (what `amalgam merge` runs),
 * compiled first when some source file is newer than its output; or the TypeScript sources under
 * tsx (`--lib src`), whose loader and on-the-fly compilation add about a second of CPU.
 */
async function mergeLibrary(from: 'dist' | 'src', log: (s: string) => void): Promise<{ entry: string; execArgv: string[] }> {
  const root = fileURLToPath(new URL('..', import.meta.url));
  if (from === 'src') return { entry: join(root, 'src/merge/run.ts'), execArgv: process.execArgv };
  const stale = await staleOutputs(join(root, 'src'), join(root, 'dist'));
  if (stale) {
    log(`  compiling src/ to dist/ (tsc -p tsconfig.json): ${stale} is newer than its output`);
    await new Promise<void>((ok, fail) => {
      const p = spawn(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', join(root, 'tsconfig.json')], { stdio: 'inherit' });
      p.on('error', fail);
      p.on('exit', (code) => (code === 0 ? ok() : fail(new Error(`tsc exited with ${code}`))));
    });
  }
  return { entry: join(root, 'dist/merge/run.js'), execArgv: [] };
}

/** The first source file whose compiled .js is missing or older, or undefined. */
async function staleOutputs(srcDir: string, distDir: string): Promise<string | undefined> {
  for (const ent of await readdir(srcDir, { withFileTypes: true })) {
    const src = join(srcDir, ent.name);
    if (ent.isDirectory()) {
      const s = await staleOutputs(src, join(distDir, ent.name));
      if (s) return s;
    } else if (ent.name.endsWith('.ts') && !ent.name.endsWith('.d.ts')) {
      const out = join(distDir, ent.name.replace(/\.ts$/, '.js'));
      const [a, b] = await Promise.all([stat(src), stat(out).catch(() => undefined)]);
      if (!b || b.mtimeMs < a.mtimeMs) return src;
    }
  }
  return undefined;
}

function spawnMerge(lib: { entry: string; execArgv: string[] }, configPath: string, outDir: string, jobs: number | undefined): Promise<ChildResult> {
  const child = fileURLToPath(new URL('./merge-child.mjs', import.meta.url));
  const args = [...lib.execArgv, child, lib.entry, configPath, outDir, ...(jobs ? [String(jobs)] : [])];
  return new Promise((resolvePromise, reject) => {
    const t0 = process.hrtime.bigint();
    const p = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('error', reject);
    p.on('exit', (code) => {
      const processSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
      if (code !== 0) return reject(new Error(`merge child exited with ${code}: ${err.trim().split('\n').slice(-8).join('\n')}`));
      try {
        resolvePromise({ ...(JSON.parse(out.trim().split('\n').pop()!) as ChildResult), processSeconds });
      } catch {
        reject(new Error(`unexpected output of the merge child: ${out.slice(0, 300)} ${err.slice(0, 300)}`));
      }
    });
  });
}

/**
 * TIES as mergekit defines it (merge-methods.md §3), written plainly and independently of the
 * library's kernels: task vectors in float32, the top ⌊density·n⌋ magnitudes by a full sort (ties
 * by lower index), then mergekit's float32 arithmetic in its order: v = w·τ, sign election on
 * the sum, the sums of agreeing values and weights, the division and base + mixed, each rounded
 * to float32.
 */
function referenceTies(base: Float32Array, xs: readonly Float32Array[], weights: readonly number[], density: number): Float32Array {
  const n = base.length;
  const f = Math.fround;
  const wf = weights.map(f);
  const deltas = xs.map((x) => {
    const d = new Float32Array(n);
    for (let i = 0; i < n; i++) d[i] = x[i]! - base[i]!;
    const k = Math.trunc(density * n);
    const order = Array.from({ length: n }, (_, i) => i).sort((i, j) => Math.abs(d[j]!) - Math.abs(d[i]!) || i - j);
    const keep = new Uint8Array(n);
    for (let r = 0; r < k; r++) keep[order[r]!] = 1;
    for (let i = 0; i < n; i++) d[i] = d[i]! * keep[i]!;
    return d;
  });
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let total = 0;
    for (let m = 0; m < deltas.length; m++) total = f(total + f(wf[m]! * deltas[m]![i]!));
    const sign = total >= 0 ? 1 : -1;
    let mixed = 0;
    let divisor = 0;
    for (let m = 0; m < deltas.length; m++) {
      const v = f(wf[m]! * deltas[m]![i]!);
      const agree = +(v * sign > 0);
      mixed = f(mixed + v * agree);
      divisor = f(divisor + wf[m]! * agree);
    }
    out[i] = base[i]! + f(mixed / (divisor === 0 ? 1 : divisor));
  }
  return out;
}

/** Checks a few output tensors byte for byte against `referenceTies` on the same inputs. */
async function verifyOutput(dir: string, outDir: string, names: string[]): Promise<void> {
  const sources = await Promise.all(MODELS.map((m) => openSafetensors(join(dir, m))));
  const out = await openSafetensors(outDir);
  try {
    for (const name of names) {
      const [base, ...xs] = await Promise.all(sources.map((s) => s.readF32(name)));
      const want = encodeFromF32('BF16', referenceTies(base!, xs, WEIGHTS, DENSITY));
      const got = await out.readRaw(name);
      if (Buffer.compare(Buffer.from(got.buffer, got.byteOffset, got.length), Buffer.from(want.buffer, want.byteOffset, want.length)) !== 0) {
        throw new Error(`merged ${name} differs from the reference TIES result`);
      }
    }
  } finally {
    await Promise.all([...sources, out].map((s) => s.close()));
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel check

/**
 * The fused kernel against the unfused pipeline on random cases: ties, task_arithmetic,
 * breadcrumbs and breadcrumbs_ties; sizes below and above the sampled-bracket threshold, 1 to 4
 * models, ties, zeros and tie-heavy BF16 data, densities from 0 to 1 and gammas from 0 to 1
 * (n_top = 0 included), negative and large weights, with and without sign consensus,
 * normalisation and lambda; inputs in float32 and in BF16 (rounded to BF16 or not), outputs in
 * BF16 and float32. Returns the number of mismatches.
 */
function checkKernels(cases: number, log: (s: string) => void): number {
  let seed = 0x1234567;
  const rnd = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) / 4294967296;
  };
  const pick = <T>(a: readonly T[]): T => a[Math.floor(rnd() * a.length)]!;
  const normal = () => Math.sqrt(-2 * Math.log(rnd() + 1e-12)) * Math.cos(2 * Math.PI * rnd());
  const data = (n: number, kind: string, base?: Float32Array): Float32Array => {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      const b = base ? base[i]! : 0;
      a[i] =
        kind === 'ints' ? b + Math.floor(rnd() * 7) - 3 : kind === 'sparse' ? (rnd() < 0.7 ? b : b + normal() * 0.01) : kind === 'steps' ? b * (1 + (Math.floor(rnd() * 9) - 4) / 128) : b + normal() * 0.02;
    }
    return kind === 'steps' || !base ? bf16ToF32(f32ToBf16(a)) : a;
  };
  const ties = getMergeMethod('ties');
  const ta = getMergeMethod('task_arithmetic');
  const bc = getMergeMethod('breadcrumbs');
  const bcTies = getMergeMethod('breadcrumbs_ties');
  let failures = 0;
  for (let c = 0; c < cases; c++) {
    const n = c % 5 === 4 ? pick([(1 << 20) + 3, 3 * (1 << 20) + 17]) : pick([1, 3, 8, 100, 4097, 20000, 100_003]);
    const M = 1 + (c % 4);
    const kind = pick(['normal', 'ints', 'sparse', 'steps']);
    const r = rnd();
    const method = r < 0.45 ? ties : r < 0.6 ? ta : r < 0.8 ? bc : bcTies;
    const v = gtaVariantOf(method)!;
    const base = data(n, 'normal');
    const xs = Array.from({ length: M }, () => data(n, kind, base));
    const perModel: Record<string, Record<string, number>> = {};
    for (let k = 0; k < M; k++) {
      perModel[`m${k}`] = { weight: pick([1, 0.8, 0.6, -0.5, 0, 2.5, normal()]), density: pick([0, 1e-7, 0.1, 0.5, 0.5, 0.9, 1, rnd()]) };
      if (v.sparsification === 'magnitude_outliers') perModel[`m${k}`]!['gamma'] = pick([0, 1e-7, 0.01, 0.01, 0.05, 0.2, 0.6, 1, rnd() * 0.2]);
    }
    const global = { normalize: rnd() < 0.7, rescale: false, lambda: pick([1, 1, 0.5]), int8_mask: false };
    const params = { global, perModel };
    for (const stored of ['F32', 'BF16'] as const) {
      const round = stored === 'BF16' && rnd() < 0.5 ? ('BF16' as const) : undefined;
      const values = [base, ...xs].map((a): MemoryValues => (stored === 'F32' ? { dtype: 'F32', data: a } : { dtype: 'BF16', data: f32ToBf16(a), ...(round ? { round } : {}) }));
      const f32 = values.map((x) => (x.dtype === 'F32' ? x.data : bf16ToF32(x.data as Uint16Array)));
      // The unfused pipeline, as the methods ran before the fused kernel.
      const warnOld: string[] = [];
      const deltas = f32.slice(1).map((x, k) => {
        const d = subtract(x, f32[0]!);
        const density = perModel[`m${k}`]!['density']!;
        if (!v.sparsification || density >= 1) return d;
        const gamma = perModel[`m${k}`]!['gamma'];
        return sparsify(d, { method: v.sparsification, density, gamma, rescale: false, shape: [n], tensorName: 't', model: `m${k}`, warn: (m) => warnOld.push(m) });
      });
      const weights = xs.map((_, k) => perModel[`m${k}`]!['weight']!);
      const want = combineTaskVectors(f32[0]!, deltas, weights, v.consensus, global.normalize, global.lambda);
      const inputs = values.map((x, k) => ({ model: k === 0 ? 'base' : `m${k - 1}`, shape: [n], values: x }));
      for (const wasmOn of [true, false]) {
        useWasmKernels(wasmOn);
        for (const od of ['BF16', 'F32'] as const) {
          const out: MemoryValues = od === 'F32' ? { dtype: 'F32', data: new Float32Array(n) } : { dtype: 'BF16', data: new Uint16Array(n) };
          const warnNew: string[] = [];
          fusedMerge(v, { tensorName: 't', isEmbed: false, base: 'base', params, warn: (m) => warnNew.push(m) }, inputs, out);
          const exp = encodeFromF32(od, want);
          const got = new Uint8Array(out.data.buffer, out.data.byteOffset, out.data.byteLength);
          if (Buffer.compare(Buffer.from(exp.buffer, exp.byteOffset, exp.byteLength), Buffer.from(got.buffer, got.byteOffset, got.byteLength)) !== 0 || warnOld.join() !== warnNew.join()) {
            failures++;
            log(`  MISMATCH case ${c}: ${v.name} n=${n} M=${M} ${kind} ${stored}${round ? '(rounded)' : ''} -> ${od}, ${wasmOn ? 'wasm' : 'typescript'} ${JSON.stringify(params)}`);
          }
        }
      }
    }
  }
  useWasmKernels(true);
  return failures;
}

// ---------------------------------------------------------------------------------------------
// Output

async function shardFiles(modelDir: string): Promise<string[]> {
  const src = (await openSafetensors(join(modelDir, INDEX_FILE))) as ShardedSafetensors;
  const files = src.shardFiles().map((f) => join(modelDir, f));
  await src.close();
  return files;
}

async function weightBytes(outDir: string): Promise<number> {
  let total = 0;
  for (const f of await readdir(outDir)) if (f.endsWith('.safetensors')) total += (await stat(join(outDir, f))).size;
  return total;
}

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    strict: true,
    options: {
      'size-gb': { type: 'string' },
      'shard-mb': { type: 'string' },
      dir: { type: 'string' },
      seed: { type: 'string' },
      jobs: { type: 'string' },
      repeats: { type: 'string' },
      regen: { type: 'boolean' },
      'keep-output': { type: 'boolean' },
      cache: { type: 'string' },
      settle: { type: 'string' },
      'check-kernels': { type: 'string' },
      method: { type: 'string' },
      lib: { type: 'string' },
      json: { type: 'boolean' },
      help: { type: 'boolean' },
    },
  });
  if (values.help) {
    console.log(help());
    return;
  }
  const jobs = values.jobs === undefined ? undefined : positive('jobs', values.jobs, 1, true);
  const json = values.json === true;
  const log = (s: string) => (json ? console.error(s) : console.log(s));
  if (values['check-kernels'] !== undefined) {
    const cases = positive('check-kernels', values['check-kernels'], 1, true);
    log(`merge: checking the fused kernel (${wasmKernelsAvailable() ? 'WebAssembly and TypeScript' : 'TypeScript only; WebAssembly not built'}) against the unfused pipeline on ${cases} random cases`);
    const failures = checkKernels(cases, log);
    log(`${failures === 0 ? 'PASS' : 'FAIL'}: ${failures} mismatch${failures === 1 ? '' : 'es'}`);
    if (json) console.log(JSON.stringify({ benchmark: 'merge', check: 'kernels', cases, failures }));
    if (failures) process.exitCode = 1;
    return;
  }
  const sizeBytes = Math.round(positive('size-gb', values['size-gb'], 1) * 1e9);
  const shardBytes = Math.round(positive('shard-mb', values['shard-mb'], 500) * 1e6);
  const seed = positive('seed', values.seed, 1, true);
  const repeats = positive('repeats', values.repeats, 2, true);
  const settle = values.settle === undefined ? 0 : Number(values.settle);
  if (!(settle >= 0 && settle <= 600)) throw Object.assign(new Error(`--settle must be a number of seconds in [0, 600], got ${JSON.stringify(values.settle)}`), { usage: true });
  const cacheMode = values.cache ?? 'both';
  if (cacheMode !== 'warm' && cacheMode !== 'cold' && cacheMode !== 'both') {
    throw Object.assign(new Error(`--cache must be warm, cold or both, got ${JSON.stringify(cacheMode)}`), { usage: true });
  }
  const method = benchMethod(values.method ?? 'ties');
  /** The TIES bar, the PASS/FAIL verdicts and the reference check apply to TIES only. */
  const isTies = method.name === 'ties';

  const { specs, layers } = llamaSpecs(sizeBytes);
  const dataBytes = specBytes(specs);
  const dir = resolve(values.dir ?? join(REPO_ROOT, '.bench-data', 'merge'));
  const meta: Meta = { version: DATA_VERSION, seed, layers, shardBytes, dataBytes };

  log(`merge: ${describe(method)}, ${specs.length} BF16 tensors each (${layers} Llama layers, ${fmtBytes(dataBytes)}) in ${dir}`);
  await mkdir(dir, { recursive: true });
  const problem = values.regen ? 'regeneration requested' : await checkCheckpoints(dir, meta, specs);
  if (problem) {
    log(`  (re)generating: ${problem}`);
    await generate(dir, meta, specs, log);
  } else {
    log('  reusing the existing checkpoints');
  }
  const configPath = join(dir, `${method.name}.yml`);
  await writeFile(configPath, configYaml(method));
  const libFrom = values.lib ?? 'dist';
  if (libFrom !== 'dist' && libFrom !== 'src') throw new Error(`--lib must be dist or src, got ${libFrom}`);
  const lib = await mergeLibrary(libFrom, log);
  log(`  merges run ${libFrom === 'dist' ? 'the compiled library (dist/), as amalgam merge does' : 'the TypeScript sources under tsx'}`);
  const outDir = join(dir, 'out');

  const files: string[] = [];
  for (const m of method.models) files.push(...(await shardFiles(join(dir, m))));
  let inputBytes = 0;
  for (const f of files) inputBytes += (await stat(f)).size;
  let largest = 0;
  for (const s of specs) largest = Math.max(largest, numel(s.shape) * 4);
  const rssBound = (method.models.length + 3) * largest + SLACK_BYTES;
  const statPath = await deviceStatPath(files[0]!);

  interface Scenario {
    cache: 'warm' | 'cold';
    catRuns: number[];
    merges: ChildResult[];
    /** Cold only: average read request on the device, bytes, of the fastest cat and merge. */
    requests: { cat?: number; merge?: number };
  }
  const scenarios: Scenario[] = [];
  const modes: ('warm' | 'cold')[] = cacheMode === 'both' ? ['warm', 'cold'] : [cacheMode];
  let coldSkipped = false;
  for (const cache of modes) {
    const scenario: Scenario = { cache, catRuns: [], merges: [], requests: {} };
    if (cache === 'warm') {
      log('  page cache warm: warming it with two cat runs');
      await timeCat(files);
      await timeCat(files);
    } else if (!(await dropFromCache(files))) {
      log('  page cache cold: cannot drop files from the page cache here (needs Linux and GNU dd); skipped');
      coldSkipped = true;
      continue;
    } else {
      log('  page cache cold: each input file is dropped from the page cache before every timed cat and merge');
    }
    const prepare = async (settleFirst: boolean) => {
      if (cache === 'cold') await dropFromCache(files);
      if (settleFirst) await sleep(settle);
    };
    // Cold: the device's read requests during each timed step, and its average request size.
    const counted = async <T>(step: () => Promise<T>): Promise<{ value: T; request: number | undefined }> => {
      const before = cache === 'cold' ? await diskReads(statPath) : undefined;
      const value = await step();
      return { value, request: averageRequest(before, cache === 'cold' ? await diskReads(statPath) : undefined) };
    };
    const catRequests: (number | undefined)[] = [];
    for (let r = 0; r < 2; r++) {
      await prepare(cache === 'cold');
      const { value, request } = await counted(() => timeCat(files));
      scenario.catRuns.push(value);
      catRequests.push(request);
    }
    scenario.requests.cat = catRequests[scenario.catRuns.indexOf(Math.min(...scenario.catRuns))];
    const mergeRequests: (number | undefined)[] = [];
    for (let r = 0; r < repeats; r++) {
      await rm(outDir, { recursive: true, force: true });
      await prepare(true);
      const { value: res, request } = await counted(() => spawnMerge(lib, configPath, outDir, jobs));
      scenario.merges.push(res);
      mergeRequests.push(request);
      log(`  ${cache} merge ${r + 1}/${repeats}: ${res.seconds.toFixed(2)} s (${res.jobs} jobs, CPU ${(res.userSeconds + res.systemSeconds).toFixed(1)} s), peak RSS ${fmtBytes(res.peakRss)}; cat ${scenario.catRuns.map((c) => c.toFixed(2)).join(', ')} s`);
    }
    scenario.requests.merge = mergeRequests[scenario.merges.indexOf(scenario.merges.reduce((a, b) => (b.seconds < a.seconds ? b : a)))];
    scenarios.push(scenario);
  }
  if (scenarios.length === 0) throw new Error('nothing was measured: the cold page cache is not available here; use --cache warm');
  const outBytes = await weightBytes(outDir);
  // The floor's write is the faster of writing through the page cache and writing with O_DIRECT
  // (what the merge does where it can), best of 2 each.
  const floorPath = join(dir, '.floor-write.tmp');
  const writeRuns: number[] = [];
  for (let r = 0; r < 2; r++) writeRuns.push((await timeWrite(floorPath, outBytes, settle))!);
  const directRuns: number[] = [];
  for (let r = 0; r < 2; r++) {
    const t = await timeWrite(floorPath, outBytes, settle, true);
    if (t !== undefined) directRuns.push(t);
  }
  if (isTies) {
    log('  checking three output tensors against a plain reference TIES');
    await verifyOutput(dir, outDir, ['model.layers.0.self_attn.k_proj.weight', 'model.norm.weight', `model.layers.${layers - 1}.self_attn.v_proj.weight`]);
  } else {
    log(`  output check against the reference TIES: skipped (method ${method.name})`);
  }
  if (!values['keep-output']) await rm(outDir, { recursive: true, force: true });

  const bufferedWrite = Math.min(...writeRuns);
  const directWrite = directRuns.length ? Math.min(...directRuns) : undefined;
  const write = Math.min(bufferedWrite, directWrite ?? Infinity);
  const results = scenarios.map((sc) => {
    const best = sc.merges.reduce((a, b) => (b.seconds < a.seconds ? b : a));
    const cat = Math.min(...sc.catRuns);
    const floor = cat + write;
    const ratio = best.seconds / floor;
    return { ...sc, best, cat, floor, ratio, speedOk: ratio <= 1.5, cpu: best.userSeconds + best.systemSeconds };
  });
  const allMerges = scenarios.flatMap((sc) => sc.merges);
  const peakRss = Math.max(...allMerges.map((m) => m.peakRss));
  const memOk = peakRss <= rssBound;
  const kernels = wasmKernelsAvailable() ? 'WebAssembly SIMD (dist/merge/merge-kernels.wasm)' : 'TypeScript (the WebAssembly kernels are not built: npm run build:wasm)';

  if (json) {
    console.log(
      JSON.stringify(
        {
          benchmark: 'merge',
          method: method.name,
          config: { file: configPath, models: method.models, baseModel: method.base, parameters: method.global, perModel: method.perModel, randomized: method.randomized },
          density: isTies ? DENSITY : undefined,
          weights: isTies ? WEIGHTS : undefined,
          outputChecked: isTies,
          models: { dir, count: method.models.length, layers, tensors: specs.length, dataBytesEach: dataBytes, inputFiles: files.length, inputBytes, dtype: 'BF16' },
          node: process.version,
          kernels: wasmKernelsAvailable() ? 'wasm' : 'typescript',
          library: libFrom,
          cores: availableParallelism(),
          loadAverage1m: loadavg()[0],
          write: { seconds: write, runs: writeRuns, directRuns, bytes: outBytes },
          settleSeconds: settle,
          coldSkipped,
          scenarios: results.map((r) => ({
            cache: r.cache,
            merge: { seconds: r.best.seconds, runs: r.merges.map((m) => m.seconds), processSeconds: r.best.processSeconds, jobs: r.best.jobs, userSeconds: r.best.userSeconds, systemSeconds: r.best.systemSeconds, outBytes },
            floor: { seconds: r.floor, catSeconds: r.cat, catRuns: r.catRuns, writeSeconds: write, writeBytes: outBytes },
            ratio: r.ratio,
            pass: isTies ? r.speedOk : undefined,
            ...(r.cache === 'cold' ? { averageReadRequestBytes: r.requests } : {}),
          })),
          memory: { peakRss, bound: rssBound, largestTensorF32: largest, inputs: method.models.length, slack: SLACK_BYTES, executorBudget: results[0]!.best.memoryBudget, peakInFlightBytes: Math.max(...allMerges.map((m) => m.peakInFlightBytes)) },
          pass: isTies ? { speed: Object.fromEntries(results.map((r) => [r.cache, r.speedOk])), memory: memOk } : undefined,
        },
        null,
        2,
      ),
    );
    return;
  }

  console.log('');
  console.log(`inputs: ${method.models.length} models x ${fmtBytes(dataBytes)} BF16 (${files.length} files, ${fmtBytes(inputBytes)}); ${availableParallelism()} cores; load average ${loadavg()[0]!.toFixed(2)}`);
  console.log(`kernels: ${kernels}`);
  const runsText = (runs: number[]) => runs.map((w) => w.toFixed(2)).join(', ');
  console.log(
    `write floor: ${fmtBytes(outBytes)} written + fsync ${write.toFixed(3)} s (best of: page cache ${runsText(writeRuns)}; ` +
      `${directRuns.length ? `O_DIRECT ${runsText(directRuns)}` : 'no O_DIRECT here'}); ${settle ? `${settle} s settle before each timed merge and write` : 'no settle'}`,
  );
  for (const r of results) {
    const where = r.cache === 'warm' ? 'page cache warm (inputs read from RAM)' : 'page cache cold (inputs read from disk)';
    console.log(`${where}:`);
    console.log(`  merge (runMerge in a child process, ${r.best.jobs} jobs, ${libFrom})   ${r.best.seconds.toFixed(3)} s${repeats > 1 ? ` (best of ${repeats}: ${r.merges.map((m) => m.seconds.toFixed(2)).join(', ')})` : ''}; CPU ${r.cpu.toFixed(1)} s (${(r.cpu / r.best.seconds).toFixed(2)} cores busy)`);
    console.log(`  I/O floor                                  ${r.floor.toFixed(3)} s = cat inputs > /dev/null ${r.cat.toFixed(3)} s + write and fsync ${write.toFixed(3)} s`);
    console.log(`  ratio merge / floor                        ${r.ratio.toFixed(2)}${isTies ? `  (bar <= 1.5: ${r.speedOk ? 'PASS' : 'FAIL'})` : ''}`);
    const req = (b: number | undefined) => (b === undefined ? 'n/a' : `${(b / (1 << 20)).toFixed(2)} MiB`);
    if (r.cache === 'cold' && statPath) console.log(`  average read request on the disk           cat ${req(r.requests.cat)}, merge ${req(r.requests.merge)} (the runs above)`);
  }
  if (coldSkipped) console.log('page cache cold: not measured (cannot drop files from the page cache here)');
  console.log(`peak RSS of the merge process              ${fmtBytes(peakRss)}`);
  console.log(`bound (${method.models.length} inputs + 3) x ${fmtBytes(largest)} + 300 MB     ${fmtBytes(rssBound)}${isTies ? `  (${memOk ? 'PASS' : 'FAIL'})` : ''}`);
  if (!isTies) console.log(`method ${method.name} (${method.name}.yml): the bar (ratio <= 1.5) and the verdicts are defined for TIES only; the reference TIES check of the output was skipped`);
}
