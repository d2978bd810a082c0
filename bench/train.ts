/**
 * Training-step throughput: forward + backward + AdamW tokens/s of a randomly initialised
 * Llama-family model, full fine-tuning, batch 8 × 256 tokens, for two shapes:
 *
 *   260k  the stories260K shape: dim 64, hidden 172, 5 layers, 8 heads, 4 KV heads, vocab 512
 *   15m   the stories15M shape: dim 288, hidden 768, 6 layers, 6 heads, 6 KV heads, vocab 32000
 *
 * plus the 1024³ matmul GFLOP/s of the WebAssembly backend on 1 and on 2 threads. Ours runs on
 * all threads and on 1 (or on --threads only). When `/usr/bin/python3` can import torch and the
 * reference script is found, an equivalent PyTorch model runs the same shapes in the same run
 * (interleaved with ours, round by round), with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed
 * from its environment, on 1 and on 2 threads. Each side's faster setting and best round is
 * compared.
 *
 *   npm run bench -- train [--only 260k,15m] [--rounds R] [--steps N] [--warmup W]
 *                          [--threads T] [--no-torch] [--no-matmul] [--json]
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { MatmulOptions } from '../src/backend/backend.js';
import { WasmBackend } from '../src/backend/wasm/backend.js';
import { makeLlamaConfig, type LlamaConfig } from '../src/nn/config.js';
import { causalLmLoss } from '../src/nn/losses.js';
import { LlamaModel } from '../src/nn/model.js';
import { Rng } from '../src/tensor/rng.js';
import { AdamW } from '../src/train/optimizer.js';

const USAGE = `usage: npm run bench -- train [options]

  --only LIST     shapes, comma-separated: 260k, 15m (default: both)
  --rounds R      measurement rounds, ours and PyTorch interleaved; best reported (default 3)
  --steps N       timed steps per round (default: 10 for 260k, 3 for 15m)
  --warmup W      untimed steps before the first round (default 2)
  --threads T     threads of our backend (default: both all, ${availableParallelism()} here, and 1)
  --batch B       sequences per step (default 8)
  --seq S         tokens per sequence (default 256)
  --no-torch      skip the PyTorch comparison
  --no-matmul     skip the 1024³ matmul measurement
  --json          print the figures as one JSON object`;

interface Shape {
  key: string;
  label: string;
  dim: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  vocab: number;
  /** Bar: ours / PyTorch tokens/s. */
  bar: number;
  steps: number;
}

const SHAPES: Shape[] = [
  { key: '260k', label: 'stories260K shape', dim: 64, hidden: 172, layers: 5, heads: 8, kvHeads: 4, vocab: 512, bar: 1.0, steps: 10 },
  { key: '15m', label: 'stories15M shape', dim: 288, hidden: 768, layers: 6, heads: 6, kvHeads: 6, vocab: 32000, bar: 0.35, steps: 3 },
];

const MATMUL_BAR = 60;
const MATMUL_N = 1024;
const SEED = 0;

const TORCH_PYTHON = '/usr/bin/python3';

function usageError(message: string): Error {
  return Object.assign(new Error(message), { usage: true });
}

function torchScript(): string {
  const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..');
  return resolve(process.env.AMALGAM_TORCH_BENCH ?? join(repo, '..', 'shared', 'tools', 'torch_llama_bench.py'));
}

/** Why PyTorch cannot be compared here, or null when it can. */
function torchUnavailable(script: string): string | null {
  if (!existsSync(TORCH_PYTHON)) return `${TORCH_PYTHON} not found`;
  if (!existsSync(script)) return `reference script ${script} not found (set AMALGAM_TORCH_BENCH)`;
  const r = spawnSync(TORCH_PYTHON, ['-c', 'import torch'], { env: torchEnv(1), encoding: 'utf8', timeout: 120_000 });
  if (r.status !== 0) return `${TORCH_PYTHON} cannot import torch (Debian: apt-get install python3-torch libopenblas0-pthread)`;
  return null;
}

function torchEnv(threads: number): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, THREADS: String(threads) };
  delete env.OPENBLAS_CORETYPE;
  delete env.OPENBLAS_L2_SIZE;
  return env;
}

/** Runs the reference script once; tokens/s. */
function runTorch(script: string, s: Shape, B: number, T: number, steps: number, threads: number): number {
  const args = [script, s.dim, s.hidden, s.layers, s.heads, s.kvHeads, s.vocab, T, B, steps].map(String);
  const r = spawnSync(TORCH_PYTHON, args, { env: torchEnv(threads), encoding: 'utf8', timeout: 1_800_000 });
  const m = /tokens_per_s=([0-9.]+)/.exec(r.stdout ?? '');
  if (r.status !== 0 || !m) {
    throw new Error(`PyTorch reference failed (status ${r.status}): ${(r.stderr ?? '').trim().split('\n').slice(-3).join(' | ')}`);
  }
  return Number(m[1]);
}

function loadAverage(): string {
  try {
    return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  } catch {
    return 'n/a';
  }
}

function configOf(s: Shape): LlamaConfig {
  return makeLlamaConfig({
    vocabSize: s.vocab,
    hiddenSize: s.dim,
    intermediateSize: s.hidden,
    numLayers: s.layers,
    numHeads: s.heads,
    numKvHeads: s.kvHeads,
    maxPositions: 1024,
    tieWordEmbeddings: false,
  });
}

/** A model of the shape with its optimiser and a fixed batch; `step()` is one full training step. */
class Trainer {
  readonly model: LlamaModel;
  private readonly optim: AdamW;
  private readonly ids: Int32Array;
  lastLoss = NaN;

  constructor(
    readonly shape: Shape,
    be: WasmBackend,
    readonly B: number,
    readonly T: number,
  ) {
    this.model = LlamaModel.random(configOf(shape), SEED, { backend: be });
    this.model.setTrainable();
    const params = this.model.trainableParameters().map((p) => ({ name: p.name, data: p.data, grad: p.grad!, decay: p.shape.length >= 2 }));
    this.optim = new AdamW(params, { lr: 1e-4, weightDecay: 0.01 });
    const rng = new Rng(SEED + 1);
    this.ids = Int32Array.from({ length: B * T }, () => rng.int(shape.vocab));
  }

  step(): void {
    const { B, T } = this;
    const m = this.model;
    m.zeroGrad();
    const logits = m.forward(this.ids, B, T);
    this.lastLoss = causalLmLoss(m.backend, logits, this.ids, B, T, this.shape.vocab, { dLogits: logits }).loss;
    m.backward(logits);
    this.optim.step();
  }

  /** tokens/s over `steps` steps. */
  measure(steps: number): number {
    const t0 = performance.now();
    for (let i = 0; i < steps; i++) this.step();
    return (this.B * this.T * steps) / ((performance.now() - t0) / 1000);
  }
}

const LAYOUTS: { name: string; opts: MatmulOptions }[] = [
  { name: 'A·B', opts: {} },
  { name: 'A·Bᵀ', opts: { transB: true } },
  { name: 'Aᵀ·B', opts: { transA: true } },
];

/** Best GFLOP/s per layout of an n³ product. */
function matmulGflops(threads: number, n: number, reps: number): number[] {
  const be = new WasmBackend({ threads });
  try {
    const rng = new Rng(1);
    const a = rng.fillNormal(new Float32Array(n * n));
    const b = rng.fillNormal(new Float32Array(n * n));
    const c = new Float32Array(n * n);
    for (const l of LAYOUTS) be.matmul(a, b, c, n, n, n, l.opts);
    return LAYOUTS.map((l) => {
      let best = Infinity;
      for (let r = 0; r < reps; r++) {
        const t0 = performance.now();
        be.matmul(a, b, c, n, n, n, l.opts);
        best = Math.min(best, performance.now() - t0);
      }
      return (2 * n * n * n) / (best * 1e6);
    });
  } finally {
    be.dispose();
  }
}

interface ShapeReport {
  shape: string;
  label: string;
  dim: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  vocab: number;
  batch: number;
  seq: number;
  params: number;
  steps: number;
  ours: { tokensPerSecond: number; threads: number; rounds: Record<string, number[]>; loss: number };
  torch: { tokensPerSecond: number; threads: number; rounds: Record<string, number[]> } | null;
  ratio: number | null;
  bar: number;
  pass: boolean | null;
}

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      only: { type: 'string' },
      rounds: { type: 'string', default: '3' },
      steps: { type: 'string' },
      warmup: { type: 'string', default: '2' },
      threads: { type: 'string' },
      batch: { type: 'string', default: '8' },
      seq: { type: 'string', default: '256' },
      'no-torch': { type: 'boolean', default: false },
      'no-matmul': { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const int = (name: string, v: string | undefined, min: number): number | undefined => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n < min) throw usageError(`--${name} must be an integer ≥ ${min}, got ${v}`);
    return n;
  };
  const rounds = int('rounds', values.rounds, 1)!;
  const stepsOverride = int('steps', values.steps, 1);
  const warmup = int('warmup', values.warmup, 0)!;
  const forced = int('threads', values.threads, 1);
  const threadCounts = forced !== undefined ? [forced] : [...new Set([availableParallelism(), 1])];
  const B = int('batch', values.batch, 1)!;
  const T = int('seq', values.seq, 2)!;
  let shapes = SHAPES;
  if (values.only !== undefined) {
    const keys = values.only.split(',').map((k) => k.trim().toLowerCase());
    for (const k of keys) if (!SHAPES.some((s) => s.key === k)) throw usageError(`unknown shape '${k}' (known: ${SHAPES.map((s) => s.key).join(', ')})`);
    shapes = SHAPES.filter((s) => keys.includes(s.key));
  }
  const log = (line: string): void => {
    if (!values.json) console.log(line);
    else console.error(line);
  };

  const loadBefore = loadAverage();
  const script = torchScript();
  const torchSkip = values['no-torch'] ? '--no-torch' : torchUnavailable(script);
  log(`train step = forward + backward + AdamW, full fine-tuning, batch ${B} × ${T} tokens, seed ${SEED}; ours on ${threadCounts.join(' and ')} thread(s)`);
  log(`load average before: ${loadBefore}`);
  log(torchSkip ? `PyTorch comparison skipped: ${torchSkip}` : `PyTorch: ${TORCH_PYTHON} ${script} (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE unset; 1 and 2 threads)`);

  const backends = threadCounts.map((threads) => new WasmBackend({ threads }));
  const reports: ShapeReport[] = [];
  try {
    // trainers[k][i]: shape i on backend k.
    const trainers = backends.map((be) => shapes.map((s) => new Trainer(s, be, B, T)));
    for (const row of trainers) for (const tr of row) for (let i = 0; i < warmup; i++) tr.step();
    const ours = shapes.map(() => Object.fromEntries(threadCounts.map((t) => [String(t), [] as number[]])));
    const torch = shapes.map(() => ({ '1': [] as number[], '2': [] as number[] }));
    for (let r = 0; r < rounds; r++) {
      shapes.forEach((s, i) => {
        const steps = stepsOverride ?? s.steps;
        let line = `round ${r + 1}/${rounds} ${s.key}: ours`;
        threadCounts.forEach((t, k) => {
          const tps = trainers[k]![i]!.measure(steps);
          ours[i]![String(t)]!.push(tps);
          line += ` ${t}T ${tps.toFixed(0)}`;
        });
        if (!torchSkip) {
          line += ', PyTorch';
          for (const th of [1, 2] as const) {
            const tps = runTorch(script, s, B, T, steps, th);
            torch[i]![th].push(tps);
            line += ` ${th}T ${tps.toFixed(0)}`;
          }
        }
        log(`${line} tok/s  (load ${loadAverage()})`);
      });
    }
    shapes.forEach((s, i) => {
      const tr = trainers[0]![i]!;
      const best = (runs: Record<string, number[]>): [number, number] =>
        Object.entries(runs).reduce<[number, number]>((acc, [t, xs]) => (Math.max(...xs) > acc[0] ? [Math.max(...xs), Number(t)] : acc), [0, 0]);
      const [oursBest, oursThreads] = best(ours[i]!);
      let torchReport: ShapeReport['torch'] = null;
      if (!torchSkip) {
        const [tps, threads] = best(torch[i]!);
        torchReport = { tokensPerSecond: tps, threads, rounds: torch[i]! };
      }
      const ratio = torchReport ? oursBest / torchReport.tokensPerSecond : null;
      reports.push({
        shape: s.key,
        label: s.label,
        dim: s.dim,
        hidden: s.hidden,
        layers: s.layers,
        heads: s.heads,
        kvHeads: s.kvHeads,
        vocab: s.vocab,
        batch: B,
        seq: T,
        params: tr.model.parameters().reduce((n, p) => n + p.size, 0),
        steps: stepsOverride ?? s.steps,
        ours: { tokensPerSecond: oursBest, threads: oursThreads, rounds: ours[i]!, loss: tr.lastLoss },
        torch: torchReport,
        ratio,
        bar: s.bar,
        pass: ratio === null ? null : ratio >= s.bar,
      });
    });
    for (const row of trainers) for (const tr of row) tr.model.dispose();
  } finally {
    for (const be of backends) be.dispose();
  }

  let matmul: { n: number; layouts: string[]; threads1: number[]; threads2: number[]; bar: number; pass: boolean } | null = null;
  if (!values['no-matmul']) {
    const t1 = matmulGflops(1, MATMUL_N, 5);
    const t2 = matmulGflops(2, MATMUL_N, 5);
    matmul = { n: MATMUL_N, layouts: LAYOUTS.map((l) => l.name), threads1: t1, threads2: t2, bar: MATMUL_BAR, pass: Math.min(...t2) >= MATMUL_BAR };
  }
  const loadAfter = loadAverage();

  if (values.json) {
    console.log(JSON.stringify({ batch: B, seq: T, threads: threadCounts, rounds, warmup, loadAverage: { before: loadBefore, after: loadAfter }, torchSkipped: torchSkip, shapes: reports, matmul }, null, 2));
    return;
  }
  console.log('');
  console.log(`shape               params       ours tok/s (threads)   PyTorch tok/s (threads)   ratio   bar      result`);
  for (const r of reports) {
    const oursCol = `${r.ours.tokensPerSecond.toFixed(0)} (${r.ours.threads})`;
    const torchCol = r.torch ? `${r.torch.tokensPerSecond.toFixed(0)} (${r.torch.threads})` : 'skipped';
    const ratio = r.ratio === null ? '—' : `${r.ratio.toFixed(2)}x`;
    const result = r.pass === null ? 'no comparison' : r.pass ? 'PASS' : 'FAIL';
    console.log(
      `${r.label.padEnd(18)}  ${r.params.toLocaleString('en-US').padStart(10)}  ${oursCol.padStart(20)}   ${torchCol.padStart(23)}   ${ratio.padStart(5)}   ≥ ${r.bar.toFixed(2)}x  ${result}`,
    );
  }
  if (matmul) {
    const fmt = (g: number[]): string => g.map((x, i) => `${matmul.layouts[i]} ${x.toFixed(1)}`).join(', ');
    console.log(`matmul ${MATMUL_N}³ GFLOP/s (best of 5): 1 thread ${fmt(matmul.threads1)}; 2 threads ${fmt(matmul.threads2)}`);
    console.log(`  bar ≥ ${MATMUL_BAR} GFLOP/s on 2 threads (slowest layout ${Math.min(...matmul.threads2).toFixed(1)}): ${matmul.pass ? 'PASS' : 'FAIL'}`);
  }
  if (torchSkip) console.log(`PyTorch comparison skipped: ${torchSkip}`);
  console.log(`load average before ${loadBefore}, after ${loadAfter}`);
}
