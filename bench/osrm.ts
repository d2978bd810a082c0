/**
 * OSRM on stories260K (converted from the GGUF fixture) with the `domain`, `pronoun` and `parity`
 * tasks of shared/fixtures/tasks: LoRA r = 8, α = 16 on q_proj, v_proj; 250 steps of batch 32,
 * AdamW lr 1e-2 with 6 % warm-up then linear decay, no gradient clipping (the fixtures'
 * reference recipe; `--clip 1` gives amalgam's training default); a per-task head.
 * Initialisations:
 *
 *   standard                      PEFT default (Kaiming-uniform A, B = 0), A and B trained
 *   orthonormal-control+freeze-A  random orthonormal A, frozen, drawn from the seed like PEFT's
 *                                 default (the same A for every task of a seed): the control
 *   orthonormal-control-per-task+freeze-A  the same, drawn separately for each task (no bar)
 *   osrm-covariance+freeze-A      OSRM covariance mode, A frozen (amalgam's recipe)
 *   osrm-mean                     OSRM mean mode, A trained (the reference code's recipe)
 *
 * Task vectors ΔW_t = (α/r)·B_t·A_t are merged by task arithmetic and TIES (density 0.5) over
 * λ ∈ {0.3, 0.5, 0.7, 1.0}; every task is scored with its own head; seeds 0, 1, 2.
 *
 * Bars: OSRM covariance + frozen A beats standard and the control by ≥ 5 points of best-λ merged
 * (task arithmetic) average accuracy on every seed and by ≥ 8 on the mean, reaches ≥ 75 %, and
 * its single-task average is at most 2 points below standard's.
 *
 *   npm run bench -- osrm [--seeds 0,1,2] [--steps N] [--clip C] [--inits a,b] [--out DIR] [--json]
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { convertToHf } from '../src/convert/to-hf.js';
import { runOsrmPipeline } from '../src/osrm/pipeline.js';
import { parseOsrmRecipe, type OsrmRecipeInput } from '../src/osrm/recipe.js';
import { combineReports, formatOsrmMarkdown, type OsrmReport } from '../src/osrm/report.js';

const USAGE = `usage: npm run bench -- osrm [options]

  --seeds LIST   seeds, comma-separated (default 0,1,2); each seed runs and prints on its own
  --steps N      training steps per run (default 250; the bars assume it)
  --clip C       clip gradients to this global norm (default 0: off, as the reference recipe)
  --inits LIST   subset of: standard, orthonormal-control+freeze-A, orthonormal-control-per-task+freeze-A,
                 osrm-covariance+freeze-A, osrm-mean
  --out DIR      keep results.json / results.md (per seed and combined) and the adapters there
  --json         print the combined report as JSON at the end`;

const TASKS = ['domain', 'pronoun', 'parity'] as const;
const INITS = [
  { init: 'standard', freeze: 'none' },
  { init: 'orthonormal-control', freeze: 'A' },
  { init: 'orthonormal-control-per-task', freeze: 'A' },
  { init: 'osrm-covariance', freeze: 'A' },
  { init: 'osrm-mean', freeze: 'none' },
] as const;
const OSRM = 'osrm-covariance+freeze-A';
const STANDARD = 'standard';
const CONTROL = 'orthonormal-control+freeze-A';

function fixturesDir(): string {
  const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..');
  return resolve(process.env.AMALGAM_FIXTURES ?? join(repo, '..', 'shared', 'fixtures'));
}

function usageError(msg: string): Error {
  return Object.assign(new Error(msg), { usage: true });
}

interface BarResult {
  name: string;
  value: string;
  pass: boolean;
}

/** The issue's bars on a (combined) report; empty when the needed initialisations are missing. */
export function osrmBars(r: OsrmReport): BarResult[] {
  const row = (init: string) => r.summary.find((x) => x.init === init && x.merge === 'task_arithmetic');
  const o = row(OSRM);
  const s = row(STANDARD);
  const c = row(CONTROL);
  if (!o || !s || !c) return [];
  const seeds = o.mergedBest.perSeed.length;
  const out: BarResult[] = [];
  const d = (a: number, b: number) => 100 * (a - b);
  const perSeedS = o.mergedBest.perSeed.map((v, i) => d(v, s.mergedBest.perSeed[i]!));
  const perSeedC = o.mergedBest.perSeed.map((v, i) => d(v, c.mergedBest.perSeed[i]!));
  out.push({ name: 'merged (TA, best λ) − standard, every seed ≥ 5', value: perSeedS.map((x) => x.toFixed(1)).join(', '), pass: perSeedS.every((x) => x >= 5) });
  out.push({ name: 'merged (TA, best λ) − control, every seed ≥ 5', value: perSeedC.map((x) => x.toFixed(1)).join(', '), pass: perSeedC.every((x) => x >= 5) });
  const ms = d(o.mergedBest.mean, s.mergedBest.mean);
  const mc = d(o.mergedBest.mean, c.mergedBest.mean);
  out.push({ name: `mean over ${seeds} seed(s) − standard ≥ 8`, value: ms.toFixed(1), pass: ms >= 8 });
  out.push({ name: `mean over ${seeds} seed(s) − control ≥ 8`, value: mc.toFixed(1), pass: mc >= 8 });
  out.push({ name: 'OSRM merged average ≥ 75 %', value: (100 * o.mergedBest.mean).toFixed(1), pass: o.mergedBest.mean >= 0.75 });
  const single = d(o.singleAverage.mean, s.singleAverage.mean);
  out.push({ name: 'single-task average − standard ≥ −2', value: single.toFixed(1), pass: single >= -2 });
  return out;
}

function formatBars(bars: BarResult[]): string {
  if (bars.length === 0) return '(bars need the standard, control and OSRM covariance initialisations)';
  return bars.map((b) => `  ${b.pass ? 'PASS' : 'FAIL'}  ${b.name}: ${b.value}`).join('\n');
}

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      seeds: { type: 'string', default: '0,1,2' },
      steps: { type: 'string' },
      clip: { type: 'string', default: '0' },
      inits: { type: 'string' },
      out: { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const seeds = values.seeds!.split(',').map((s) => Number(s.trim()));
  if (seeds.some((s) => !Number.isSafeInteger(s) || s < 0)) throw usageError(`--seeds must list non-negative integers, got "${values.seeds}"`);
  if (new Set(seeds).size !== seeds.length) throw usageError(`--seeds lists a seed twice: "${values.seeds}"`);
  const steps = values.steps === undefined ? 250 : Number(values.steps);
  if (!Number.isSafeInteger(steps) || steps < 1) throw usageError(`--steps must be a positive integer, got "${values.steps}"`);
  const clip = Number(values.clip);
  if (!Number.isFinite(clip) || clip < 0) throw usageError(`--clip must be a number ≥ 0, got "${values.clip}"`);
  const names = INITS.map((i) => (i.freeze === 'none' ? i.init : `${i.init}+freeze-${i.freeze}`));
  const wanted = values.inits === undefined ? names : values.inits.split(',').map((s) => s.trim());
  for (const w of wanted) if (!names.includes(w)) throw usageError(`unknown initialisation "${w}" (known: ${names.join(', ')})`);
  const inits = INITS.filter((_, i) => wanted.includes(names[i]!));

  const fx = fixturesDir();
  const gguf = join(fx, 'models/stories260K/stories260K.gguf');
  if (!existsSync(gguf) || !existsSync(join(fx, 'tasks/tasks.json'))) {
    console.error(`osrm: fixtures not found under ${fx} (set AMALGAM_FIXTURES); skipped`);
    return;
  }
  const meta = JSON.parse(await readFile(join(fx, 'tasks/tasks.json'), 'utf8')) as Record<string, { n_classes: number; max_len: number; truncation: string }>;
  const work = await mkdtemp(join(tmpdir(), 'amalgam-bench-osrm-'));
  const outRoot = values.out ? resolve(values.out) : join(work, 'out');
  try {
    const t0 = performance.now();
    const modelDir = join(work, 'stories260K');
    await convertToHf(gguf, modelDir);
    console.log(`stories260K on ${availableParallelism()} cores; tasks ${TASKS.join(', ')}; seeds ${seeds.join(', ')}; ${steps} steps of 32 per run, ${clip > 0 ? `clip ${clip}` : 'no clipping'}`);
    const reports: OsrmReport[] = [];
    for (const seed of seeds) {
      const input: OsrmRecipeInput = {
        model: modelDir,
        tasks: TASKS.map((t) => ({
          name: t,
          train: join(fx, 'tasks', t, 'train.jsonl'),
          eval: join(fx, 'tasks', t, 'eval.jsonl'),
          num_labels: meta[t]!.n_classes,
          max_length: meta[t]!.max_len,
          truncation: meta[t]!.truncation.startsWith('right-aligned') ? 'left' : 'right',
        })),
        lora: { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'] },
        osrm: { samples: 100, shuffle_seed: 42, pooling: 'real-tokens' },
        train: { steps, batch_size: 32, lr: 1e-2, schedule: 'linear', warmup: 0.06, min_lr_ratio: 0, clip, weight_decay: 0 },
        inits: inits.map((i) => ({ init: i.init, freeze: i.freeze })),
        merges: [
          { name: 'task_arithmetic', method: 'task_arithmetic', lambdas: [0.3, 0.5, 0.7, 1.0] },
          { name: 'ties', method: 'ties', lambdas: [0.3, 0.5, 0.7, 1.0], parameters: { density: 0.5 } },
        ],
        seeds: [seed],
        evaluation: { batch_size: 32, diagnostic_samples: 100 },
        output: { dir: join(outRoot, `seed-${seed}`), save_adapters: values.out !== undefined, overwrite: true },
      };
      const recipe = parseOsrmRecipe(input);
      const start = performance.now();
      const report = await runOsrmPipeline(recipe, {
        log: (line) => console.error(`[${((performance.now() - t0) / 1000).toFixed(0).padStart(5)} s] ${line}`),
      });
      reports.push(report);
      console.log(`\n=== seed ${seed} (${((performance.now() - start) / 60000).toFixed(1)} min) ===\n`);
      console.log(formatOsrmMarkdown(report));
      console.log(`Bars on seed ${seed} alone:\n${formatBars(osrmBars(report))}\n`);
    }
    const all = combineReports(reports);
    if (seeds.length > 1) {
      console.log(`\n=== all seeds (${((performance.now() - t0) / 60000).toFixed(1)} min) ===\n`);
      console.log(formatOsrmMarkdown(all));
    }
    console.log(`Bars:\n${formatBars(osrmBars(all))}`);
    if (values.out) {
      await writeFile(join(outRoot, 'results.json'), JSON.stringify(all, null, 2) + '\n');
      await writeFile(join(outRoot, 'results.md'), formatOsrmMarkdown(all));
    }
    if (values.json) console.log(JSON.stringify(all));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
