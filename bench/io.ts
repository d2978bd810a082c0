/**
 * I/O benchmark: read every tensor of a sharded BF16 checkpoint from page cache, converted to
 * F32, and compare with the raw throughput of `cat <shards> > /dev/null` on the same files.
 *
 * The checkpoint (Llama-shaped tensors, deterministic content) is generated on first use in
 * `.bench-data/` at the repository root and reused while it is still valid.
 */
import { spawn } from 'node:child_process';
import { mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { fmtBytes, fnv1a, llamaSpecs, positive, specBytes, timeCat } from './common.js';
import { INDEX_FILE, ShardedSafetensors, ShardedSafetensorsWriter, openSafetensors, type TensorSpec } from '../src/io/safetensors.js';
import { bf16ToF32, numel } from '../src/tensor/dtype.js';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const META_FILE = 'bench-meta.json';
/** Bumped whenever the generated content or layout changes, so stale folders are regenerated. */
const DATA_VERSION = 1;

const HELP = `usage: npm run bench -- io [options]

  --size-gb <n>     checkpoint size in GB (1e9 bytes), at least (default 2.1)
  --shard-mb <n>    shard size budget in MB (default 500)
  --dir <path>      folder for the generated checkpoint
                    (default .bench-data/llama-bf16-<layers>L-s<seed> in the repository root)
  --seed <n>        content seed (default 1)
  --repeats <n>     timed runs of each measurement; the best is reported (default 3)
  --regen           regenerate the checkpoint even if a valid one exists
  --skip-thp        skip the extra readF32 row measured in a child process with
                    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (Linux only)
  --json            print the results as JSON on stdout (progress goes to stderr)
  --help            this text`;

// ---------------------------------------------------------------------------------------------
// Deterministic content

/**
 * Plausible BF16 weights from a xorshift32 stream, two values per 32-bit word: random sign and
 * mantissa, exponent 120..127 (magnitudes in [2^-7, 2)). The same (name, seed) gives the same bytes.
 */
export function tensorBytes(name: string, count: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(count * 2);
  const words = new Uint32Array(bytes.buffer, 0, count >>> 1);
  let x = (fnv1a(name) ^ Math.imul(seed, 0x9e3779b9)) | 0 || 0x2545f491;
  const n = words.length;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = (x & 0x83ff83ff) | 0x3c003c00;
  }
  if (count & 1) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    const h = (x & 0x83ff) | 0x3c00;
    bytes[count * 2 - 2] = h & 0xff;
    bytes[count * 2 - 1] = h >>> 8;
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

/** Why the folder does not hold the expected checkpoint, or undefined when it does. */
async function checkCheckpoint(dir: string, meta: Meta, specs: readonly TensorSpec[]): Promise<string | undefined> {
  let onDisk: Meta;
  try {
    onDisk = JSON.parse(await readFile(join(dir, META_FILE), 'utf8')) as Meta;
  } catch {
    return 'no checkpoint yet';
  }
  if (!sameMeta(onDisk, meta)) return `parameters differ (${JSON.stringify(onDisk)})`;
  let src;
  try {
    src = await openSafetensors(dir);
  } catch (e) {
    return `does not open: ${(e as Error).message}`;
  }
  try {
    const want = new Map(specs.map((s) => [s.name, s]));
    const have = src.tensors();
    if (have.length !== want.size) return `holds ${have.length} tensors, expected ${want.size}`;
    for (const t of have) {
      const s = want.get(t.name);
      if (!s || s.dtype !== t.dtype || s.shape.join() !== t.shape.join()) return `tensor ${t.name} differs`;
    }
    // Spot-check content: the small tensors of the first layer and the final norm.
    for (const name of ['model.layers.0.input_layernorm.weight', 'model.layers.0.self_attn.k_proj.weight', 'model.norm.weight']) {
      const raw = await src.readRaw(name);
      const expected = tensorBytes(name, numel(want.get(name)!.shape), meta.seed);
      if (Buffer.compare(Buffer.from(raw.buffer, raw.byteOffset, raw.length), Buffer.from(expected.buffer)) !== 0) return `content of ${name} differs`;
    }
  } finally {
    await src.close();
  }
  return undefined;
}

async function generate(dir: string, owned: boolean, meta: Meta, specs: readonly TensorSpec[], log: (s: string) => void): Promise<void> {
  // Only the default folder, a folder this benchmark made, or an empty one is ever cleared.
  let entries: string[] = [];
  try {
    entries = await readdir(dir);
  } catch {
    // does not exist yet
  }
  if (!owned && entries.length > 0 && !entries.includes(META_FILE)) {
    throw Object.assign(new Error(`${dir} is not empty and was not made by this benchmark (no ${META_FILE}); choose another --dir`), { usage: true });
  }
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const t0 = performance.now();
  const w = await ShardedSafetensorsWriter.create(dir, specs, {
    maxShardBytes: meta.shardBytes,
    alwaysIndex: true,
    metadata: { format: 'pt' },
    indexMetadata: { generator: 'amalgam bench io' },
  });
  try {
    let done = 0;
    let lastTenth = 0;
    for (const s of specs) {
      const data = tensorBytes(s.name, numel(s.shape), meta.seed);
      await w.write(s.name, data);
      done += data.length;
      const tenth = Math.floor((10 * done) / meta.dataBytes);
      if (tenth > lastTenth) {
        lastTenth = tenth;
        log(`  generating: ${tenth * 10}%`);
      }
    }
    await w.finish();
  } catch (e) {
    await w.abort();
    throw e;
  }
  await writeFile(join(dir, META_FILE), JSON.stringify(meta, null, 2) + '\n');
  log(`  generated ${fmtBytes(meta.dataBytes)} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}

// ---------------------------------------------------------------------------------------------
// Measurements

function gcFunction(): () => void {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as (() => void) | undefined;
  return typeof gc === 'function' ? gc : () => {};
}

/** Open the folder and read every tensor (raw or as F32) one after the other; seconds and bytes. */
async function timeAmalgam(dir: string, mode: 'raw' | 'f32'): Promise<{ seconds: number; bytes: number; sink: number }> {
  const t0 = process.hrtime.bigint();
  const src = await openSafetensors(dir);
  let bytes = 0;
  let sink = 0;
  for (const t of src.tensors()) {
    if (mode === 'raw') {
      const raw = await src.readRaw(t.name);
      bytes += raw.length;
      sink += raw[raw.length - 1]!;
    } else {
      const a = await src.readF32(t.name);
      bytes += a.length * 2;
      sink += a[a.length - 1]!;
    }
  }
  await src.close();
  return { seconds: Number(process.hrtime.bigint() - t0) / 1e9, bytes, sink };
}

/** readF32 of every tensor equals the exact widening of its raw BF16 bits (a few tensors). */
async function verifyF32(dir: string, names: string[]): Promise<void> {
  const src = await openSafetensors(dir);
  try {
    for (const name of names) {
      const raw = await src.readRaw(name);
      const want = new Uint32Array(bf16ToF32Reference(new Uint16Array(raw.buffer, raw.byteOffset, raw.length >>> 1)));
      const got = await src.readF32(name);
      const gotBits = new Uint32Array(got.buffer, got.byteOffset, got.length);
      if (gotBits.length !== want.length) throw new Error(`readF32(${name}) returned ${gotBits.length} values, expected ${want.length}`);
      for (let i = 0; i < want.length; i++) {
        if (gotBits[i] !== want[i]) throw new Error(`readF32(${name})[${i}] has bits ${gotBits[i]!.toString(16)}, expected ${want[i]!.toString(16)}`);
      }
      // The library's array kernel agrees too.
      const lib = new Uint32Array(bf16ToF32(new Uint16Array(raw.buffer, raw.byteOffset, raw.length >>> 1)).buffer);
      if (Buffer.compare(Buffer.from(lib.buffer), Buffer.from(want.buffer)) !== 0) throw new Error(`bf16ToF32 disagrees on ${name}`);
    }
  } finally {
    await src.close();
  }
}

function bf16ToF32Reference(src: Uint16Array): ArrayBuffer {
  const out = new ArrayBuffer(src.length * 4);
  const dv = new DataView(out);
  for (let i = 0; i < src.length; i++) dv.setUint32(i * 4, src[i]! * 65536, true);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Output

interface Row {
  label: string;
  bytes: number;
  runs: number[];
  best: number;
  gbps: number;
}

function row(label: string, bytes: number, runs: number[]): Row {
  const best = Math.min(...runs);
  return { label, bytes, runs, best, gbps: bytes / best / 1e9 };
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
      repeats: { type: 'string' },
      regen: { type: 'boolean' },
      'skip-thp': { type: 'boolean' },
      'f32-only': { type: 'boolean' },
      json: { type: 'boolean' },
      help: { type: 'boolean' },
    },
  });
  if (values.help) {
    console.log(HELP);
    return;
  }
  const json = values.json === true;
  const log = (s: string) => (json ? console.error(s) : console.log(s));
  const sizeBytes = Math.round(positive('size-gb', values['size-gb'], 2.1) * 1e9);
  const shardBytes = Math.round(positive('shard-mb', values['shard-mb'], 500) * 1e6);
  const seed = positive('seed', values.seed, 1, true);
  const repeats = positive('repeats', values.repeats, 3, true);

  const { specs, layers } = llamaSpecs(sizeBytes);
  const dataBytes = specBytes(specs);
  const dir = resolve(values.dir ?? join(REPO_ROOT, '.bench-data', `llama-bf16-${layers}L-s${seed}`));
  const meta: Meta = { version: DATA_VERSION, seed, layers, shardBytes, dataBytes };

  log(`io: ${specs.length} BF16 tensors (${layers} Llama layers, ${(dataBytes / 2 / 1e9).toFixed(2)} G params) in ${dir}`);
  const problem = values.regen ? 'regeneration requested' : await checkCheckpoint(dir, meta, specs);
  if (problem) {
    log(`  (re)generating: ${problem}`);
    await generate(dir, values.dir === undefined, meta, specs, log);
  } else {
    log('  reusing the existing checkpoint');
  }

  const src = (await openSafetensors(join(dir, INDEX_FILE))) as ShardedSafetensors;
  const files = src.shardFiles().map((f) => join(dir, f));
  await src.close();
  let fileBytes = 0;
  for (const f of files) fileBytes += (await stat(f)).size;

  const gc = gcFunction();
  if (values['f32-only']) {
    // Child mode for the huge-page row: readF32 runs only (after one untimed pass), as JSON.
    await timeCat(files);
    await timeAmalgam(dir, 'f32');
    const runs: number[] = [];
    for (let r = 0; r < repeats; r++) {
      gc();
      runs.push((await timeAmalgam(dir, 'f32')).seconds);
    }
    console.log(JSON.stringify({ runs, bytes: dataBytes }));
    return;
  }
  log('  warming the page cache and checking readF32 against the exact widening');
  await timeCat(files);
  await timeCat(files);
  await verifyF32(dir, ['model.layers.0.self_attn.k_proj.weight', 'model.layers.0.mlp.down_proj.weight', 'model.norm.weight']);
  gc();

  const catRuns: number[] = [];
  const rawRuns: number[] = [];
  const f32Runs: number[] = [];
  let rawBytes = 0;
  let f32Bytes = 0;
  for (let r = 0; r < repeats; r++) {
    catRuns.push(await timeCat(files));
    gc();
    const raw = await timeAmalgam(dir, 'raw');
    rawRuns.push(raw.seconds);
    rawBytes = raw.bytes;
    gc();
    const f32 = await timeAmalgam(dir, 'f32');
    f32Runs.push(f32.seconds);
    f32Bytes = f32.bytes;
    gc();
    log(`  run ${r + 1}/${repeats}: cat ${catRuns[r]!.toFixed(3)} s, readRaw ${raw.seconds.toFixed(3)} s, readF32 ${f32.seconds.toFixed(3)} s`);
  }
  if (rawBytes !== dataBytes || f32Bytes !== dataBytes) throw new Error(`read ${rawBytes} / ${f32Bytes} bytes, expected ${dataBytes}`);

  const tunables = process.env['GLIBC_TUNABLES'];
  const rows = [
    row('cat shards > /dev/null', fileBytes, catRuns),
    row('amalgam readRaw (no conversion)', rawBytes, rawRuns),
    row(`amalgam readF32 (BF16 -> F32)${tunables ? ` [GLIBC_TUNABLES=${tunables}]` : ''}`, f32Bytes, f32Runs),
  ];
  let thpNote: string | undefined;
  if (!values['skip-thp'] && process.platform === 'linux' && !tunables?.includes('hugetlb')) {
    log('  measuring readF32 again in a child process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1');
    const child = await childF32(args, repeats);
    if (typeof child === 'string') thpNote = child;
    else rows.push(row('amalgam readF32, malloc on huge pages (*)', child.bytes, child.runs));
  }
  const cat = rows[0]!;
  const ratio = rows[2]!.gbps / cat.gbps;

  if (json) {
    console.log(
      JSON.stringify(
        {
          benchmark: 'io',
          checkpoint: { dir, files: files.length, tensors: specs.length, layers, fileBytes, dataBytes, dtype: 'BF16' },
          repeats,
          node: process.version,
          loadAverage1m: loadavg()[0],
          glibcTunables: tunables ?? null,
          results: Object.fromEntries(
            (['cat', 'readRaw', 'readF32', 'readF32HugePages'] as const).flatMap((k, i) => {
              const r = rows[i];
              return r ? [[k, { bytes: r.bytes, seconds: r.best, gbps: r.gbps, runs: r.runs, vsCat: r.gbps / cat.gbps }]] : [];
            }),
          ),
          ratio,
          ...(thpNote ? { hugePagesNote: thpNote } : {}),
        },
        null,
        2,
      ),
    );
    return;
  }

  const w = Math.max(...rows.map((r) => r.label.length));
  console.log('');
  console.log(`checkpoint: ${files.length} shards + index, ${specs.length} tensors, ${fmtBytes(fileBytes)} on disk; page cache warm; best of ${repeats}; load average ${loadavg()[0]!.toFixed(2)}`);
  console.log(`${'measurement'.padEnd(w)}  ${'bytes'.padStart(14)}  ${'seconds'.padStart(8)}  ${'GB/s'.padStart(7)}  ${'vs cat'.padStart(6)}`);
  for (const r of rows) {
    console.log(`${r.label.padEnd(w)}  ${r.bytes.toLocaleString('en-US').padStart(14)}  ${r.best.toFixed(3).padStart(8)}  ${r.gbps.toFixed(2).padStart(7)}  ${(r.gbps / cat.gbps).toFixed(2).padStart(6)}`);
  }
  console.log(`ratio amalgam readF32 / cat: ${ratio.toFixed(2)}  (GB/s of BF16 source bytes; the F32 output is twice as large)`);
  if (rows[3]) {
    console.log('(*) same readF32 loop in a child process started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: large');
    console.log('    output arrays are backed by transparent huge pages, so far fewer page faults (see bench/README.md)');
  }
  if (thpNote) console.log(`huge-page row skipped: ${thpNote}`);
}

/** readF32 runs in a child process with glibc's malloc asking for transparent huge pages. */
async function childF32(args: string[], repeats: number): Promise<{ runs: number[]; bytes: number } | string> {
  let mode = '';
  try {
    mode = await readFile('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8');
  } catch {
    return 'no /sys/kernel/mm/transparent_hugepage/enabled';
  }
  if (mode.includes('[never]')) return 'transparent huge pages are disabled on this system';
  const runTs = fileURLToPath(new URL('./run.ts', import.meta.url));
  const childArgs = [...process.execArgv, runTs, 'io', ...args.filter((a) => a !== '--json' && a !== '--regen'), '--f32-only', '--json', '--repeats', String(repeats)];
  const env = { ...process.env, GLIBC_TUNABLES: 'glibc.malloc.hugetlb=1' };
  return new Promise((resolvePromise) => {
    const p = spawn(process.execPath, childArgs, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('error', (e) => resolvePromise(`child process failed: ${e.message}`));
    p.on('exit', (code) => {
      if (code !== 0) return resolvePromise(`child process exited with ${code}: ${err.trim().split('\n').slice(-3).join(' | ')}`);
      try {
        const r = JSON.parse(out) as { runs: number[]; bytes: number };
        resolvePromise(r);
      } catch {
        resolvePromise(`unexpected child output: ${out.slice(0, 200)}`);
      }
    });
  });
}
