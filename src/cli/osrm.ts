import { resolve } from 'node:path';
import type { Command } from 'commander';
import { AmalgamError } from '../errors.js';
import { assertDistinctSeeds, readOsrmRecipe } from '../osrm/recipe.js';
import { runOsrmInit, runOsrmPipeline, type OsrmInitTask } from '../osrm/pipeline.js';
import { formatOsrmMarkdown } from '../osrm/report.js';
import { parseInteger, parseList, parseLoraSpec } from '../train/options.js';

interface InitCliOptions {
  task: string[];
  out: string;
  mode: string;
  lora?: string;
  samples: number;
  shuffleSeed: number;
  pooling: string;
  center?: boolean;
  divisor?: string;
  seed: number;
  maxLength: number;
  truncationSide: string;
  textField?: string;
  batchSize: number;
  jobs?: number;
  overwrite?: boolean;
  json?: boolean;
  quiet?: boolean;
}

interface RunCliOptions {
  out?: string;
  seeds?: string;
  steps?: number;
  overwrite?: boolean;
  json?: boolean;
  quiet?: boolean;
  progress?: boolean;
}

function oneOf<T extends string>(value: string, allowed: readonly T[], name: string): T {
  if ((allowed as readonly string[]).includes(value)) return value as T;
  throw new AmalgamError('E_USAGE', `${name} must be one of ${allowed.join(', ')}, got "${value}"`);
}

/** `NAME=FILE[,max_length=N][,truncation=left|right]`. */
export function parseTaskSpec(spec: string, defaults: { maxLength: number; truncation: 'left' | 'right'; textField?: string[] }): OsrmInitTask {
  const [head, ...rest] = spec.split(',');
  const eq = head!.indexOf('=');
  if (eq <= 0 || eq === head!.length - 1) {
    throw new AmalgamError('E_USAGE', `--task expects NAME=FILE, got "${spec}"`, { hint: 'e.g. --task parity=tasks/parity/train.jsonl,max_length=96,truncation=left' });
  }
  const task: OsrmInitTask = { name: head!.slice(0, eq).trim(), data: head!.slice(eq + 1).trim(), maxLength: defaults.maxLength, truncation: defaults.truncation, textField: defaults.textField };
  for (const item of rest) {
    const [k, v] = item.split('=').map((s) => s.trim());
    if (k === 'max_length' && v !== undefined) task.maxLength = parseInteger(v, 'max_length', 2);
    else if (k === 'truncation' && v !== undefined) task.truncation = oneOf(v, ['left', 'right'] as const, 'truncation');
    else throw new AmalgamError('E_USAGE', `unknown task option "${item}" in --task ${spec}`, { hint: 'known: max_length=N, truncation=left|right' });
  }
  return task;
}

export function registerOsrm(program: Command): void {
  const osrm = program.command('osrm').description('OSRM: LoRA initialisation orthogonal to the other tasks\' features, and the merge experiment (docs/osrm.md)');

  osrm
    .command('init')
    .description(
      'Stream each task\'s samples through the base model, accumulate the targeted layers\' input statistics, and write one initial PEFT adapter per task (A from the other tasks\' statistics, B = 0) under --out/<task>.',
    )
    .argument('<model>', 'Hugging Face model folder, or a GGUF / llama2.c file (converted into --out/base-model)')
    .requiredOption('--task <name=file>', 'a task and its data (.txt, .jsonl or .tsv); repeat for every task; ",max_length=N,truncation=left" sets them per task', (v: string, prev: string[] | undefined) => [...(prev ?? []), v])
    .requiredOption('--out <dir>', 'output folder')
    .option('--mode <mode>', 'covariance (r smallest-eigenvalue eigenvectors of the other tasks\' second moments) or mean (null space of their mean features)', 'covariance')
    .option('--lora <spec>', 'r=8,alpha=16,targets=q_proj,v_proj (the default); rslora=true')
    .option('--samples <n>', 'samples per task', (v) => parseInteger(v, '--samples', 1), 100)
    .option('--shuffle-seed <n>', 'seed of the shuffle that picks the samples', (v) => parseInteger(v, '--shuffle-seed', 0), 42)
    .option('--pooling <p>', 'real-tokens, or all-positions (every position up to --max-length, padding included, as the reference code)', 'real-tokens')
    .option('--center', 'covariance mode: centre each task\'s features first')
    .option('--divisor <d>', 'mean mode: divide the sums by n (default) or n-1 (the reference code)')
    .option('--seed <n>', 'seed of the basis choice inside a degenerate subspace', (v) => parseInteger(v, '--seed', 0), 0)
    .option('--max-length <n>', 'tokens per sample, BOS included, where a --task does not set max_length', (v) => parseInteger(v, '--max-length', 2), 64)
    .option('--truncation-side <side>', 'right (keep the start) or left (keep BOS + the end), where a --task does not set truncation', 'right')
    .option('--text-field <fields>', '.jsonl: text field(s), comma-separated')
    .option('--batch-size <n>', 'sequences per forward', (v) => parseInteger(v, '--batch-size', 1), 16)
    .option('-j, --jobs <n>', 'worker threads for the covariance-mode eigenproblems of layers wider than 256 (default: the number of cores)', (v) => parseInteger(v, '--jobs', 1))
    .option('--overwrite', 'replace existing adapter folders')
    .option('--json', 'print the result as one JSON object')
    .option('-q, --quiet', 'no progress lines')
    .action(async (model: string, o: InitCliOptions) => {
      const mode = oneOf(o.mode, ['covariance', 'mean'] as const, '--mode');
      const pooling = oneOf(o.pooling, ['real-tokens', 'all-positions'] as const, '--pooling');
      if (o.center && mode !== 'covariance') {
        throw new AmalgamError('E_USAGE', `--center belongs to --mode covariance; --mode ${mode} does not read it`, { hint: 'drop --center, or use --mode covariance' });
      }
      if (o.divisor !== undefined && mode !== 'mean') {
        throw new AmalgamError('E_USAGE', `--divisor belongs to --mode mean; --mode ${mode} does not read it`, { hint: 'drop --divisor, or use --mode mean' });
      }
      const divisor = o.divisor === undefined ? undefined : oneOf(o.divisor, ['n', 'n-1'] as const, '--divisor');
      const truncation = oneOf(o.truncationSide, ['left', 'right'] as const, '--truncation-side');
      const lora = parseLoraSpec(o.lora);
      if (lora.freeze !== undefined) throw new AmalgamError('E_USAGE', 'freeze is a training option; osrm init writes initial adapters only');
      const tasks = o.task.map((s) => parseTaskSpec(s, { maxLength: o.maxLength, truncation, textField: o.textField === undefined ? undefined : parseList(o.textField) }));
      const r = await runOsrmInit(model, tasks, o.out, {
        mode,
        rank: lora.r,
        alpha: lora.alpha,
        targets: lora.targets,
        rslora: lora.rslora,
        samples: o.samples,
        shuffleSeed: o.shuffleSeed,
        pooling,
        center: o.center,
        divisor,
        seed: o.seed,
        batchSize: o.batchSize,
        ...(o.jobs === undefined ? {} : { jobs: o.jobs }),
        overwrite: o.overwrite,
        log: o.quiet || o.json ? undefined : (line) => process.stderr.write(line + '\n'),
      });
      if (o.json) {
        process.stdout.write(JSON.stringify({ mode, seconds: r.seconds, outputs: r.outputs, samples: r.stats.map((s) => ({ task: s.task, samples: s.samples, rows: s.rows })) }) + '\n');
        return;
      }
      for (const out of r.outputs) {
        const c = out.check;
        const fig = mode === 'mean' ? `‖A·Xᵀ‖/‖X‖ ${c.meanResidual!.toExponential(1)}` : `Rayleigh rel. error ${c.rayleighRelative!.toExponential(1)}`;
        process.stdout.write(`${out.task}: ${out.dir} (max |A·Aᵀ − I| ${c.orthonormality.toExponential(1)}, ${fig})\n`);
      }
      process.stdout.write(`OSRM ${mode} initialisation of ${r.outputs.length} tasks in ${r.seconds.toFixed(1)} s\n`);
    });

  osrm
    .command('run')
    .description(
      'Run an OSRM experiment from a recipe: train one LoRA adapter per task for each initialisation (standard, orthonormal-control[-per-task], osrm-mean, osrm-covariance; freeze A|B|none), evaluate each alone, merge the task vectors over a λ grid with any merge method, evaluate every task on every merge, repeat over seeds; writes results.json and results.md.',
    )
    .argument('<recipe>', 'recipe YAML (docs/osrm.md; examples/osrm-*.yml)')
    .option('--out <dir>', 'output folder (overrides output.dir)')
    .option('--seeds <list>', 'seeds, comma-separated (overrides seeds)')
    .option('--steps <n>', 'training steps per run (overrides train.steps)', (v) => parseInteger(v, '--steps', 1))
    .option('--overwrite', 'replace earlier results and adapters in the output folder')
    .option('--progress', 'show a progress bar for every training run')
    .option('--json', 'print the report as one JSON object instead of the Markdown tables')
    .option('-q, --quiet', 'no progress lines')
    .action(async (path: string, o: RunCliOptions) => {
      const recipe = await readOsrmRecipe(path);
      if (o.out !== undefined) recipe.output.dir = resolve(o.out);
      if (o.overwrite) recipe.output.overwrite = true;
      if (o.steps !== undefined) recipe.train.steps = o.steps;
      if (o.seeds !== undefined) {
        recipe.seeds = parseList(o.seeds).map((s) => parseInteger(s, '--seeds', 0));
        if (recipe.seeds.length === 0) throw new AmalgamError('E_USAGE', `--seeds lists no seed, got "${o.seeds}"`, { hint: 'e.g. --seeds 0,1,2' });
        assertDistinctSeeds(recipe.seeds, '--seeds', 'E_USAGE');
      }
      const report = await runOsrmPipeline(recipe, {
        log: o.quiet || o.json ? undefined : (line) => process.stderr.write(line + '\n'),
        progress: o.progress === true && process.stderr.isTTY === true,
      });
      process.stdout.write(o.json ? JSON.stringify(report) + '\n' : formatOsrmMarkdown(report));
    });
}
