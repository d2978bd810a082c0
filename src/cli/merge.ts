import { Option, type Command } from 'commander';
import { availableParallelism } from 'node:os';
import { resolve } from 'node:path';
import { AmalgamError } from '../errors.js';
import { formatMergeReport, formatPlanSummary, parseSize, runMerge } from '../merge/run.js';

interface MergeCliOptions {
  allowCrimes?: boolean;
  outShardSize: string;
  copyTokenizer: boolean;
  writeModelCard: boolean;
  randomSeed?: number;
  dryRun?: boolean;
  jobs?: number;
  overwrite?: boolean;
  json?: boolean;
  quiet?: boolean;
  modelDir?: string;
  directReads?: 'auto' | 'always' | 'never';
  [ignored: string]: unknown;
}

/** mergekit options that have no meaning here: accepted, with a notice. */
const IGNORED_FLAGS: [string, string, string][] = [
  ['--cuda', 'cuda', 'amalgam computes on the CPU'],
  ['--device <device>', 'device', 'amalgam computes on the CPU'],
  ['--gpu-rich', 'gpuRich', 'amalgam computes on the CPU'],
  ['--low-cpu-memory', 'lowCpuMemory', 'amalgam computes on the CPU'],
  ['--read-to-gpu', 'readToGpu', 'amalgam computes on the CPU'],
  ['--multi-gpu', 'multiGpu', 'amalgam computes on the CPU'],
  ['--lazy-unpickle', 'lazyUnpickle', 'amalgam reads safetensors only, always lazily'],
  ['--clone-tensors', 'cloneTensors', 'amalgam always writes each tensor on its own'],
  ['--safe-serialization', 'safeSerialization', 'amalgam always writes safetensors'],
  ['--trust-remote-code', 'trustRemoteCode', 'amalgam runs no model code'],
];

function integer(name: string, min: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!/^\s*\d+\s*$/.test(v) || !Number.isSafeInteger(n) || n < min) {
      throw new AmalgamError('E_USAGE', `${name} must be an integer >= ${min}, got "${v}"`);
    }
    return n;
  };
}

export function registerMerge(program: Command): void {
  const cmd = program
    .command('merge')
    .description(
      'Merge the models a mergekit YAML configuration names (like mergekit-yaml). Everything is checked from configs and headers before any tensor is read; the output folder appears only when complete.',
    )
    .argument('<config>', 'merge configuration (mergekit YAML)')
    .argument('<out-dir>', 'output folder (must not exist or be empty unless --overwrite)')
    .option('--allow-crimes', 'allow merging models of different architectures')
    .option('--out-shard-size <size>', 'shard size limit in bytes: 5000000000, 500M, 5B (= 5e9); 0 for one file', '5B')
    .option('--copy-tokenizer', 'copy the tokenizer files of the base (or first) model', true)
    .option('--no-copy-tokenizer', 'do not copy tokenizer files')
    .option('--write-model-card', 'write README.md with the merge details', true)
    .option('--no-write-model-card', 'do not write README.md')
    .option('--random-seed <n>', 'seed of the random methods (dare_*, della*); default 0, so runs are reproducible', integer('--random-seed', 0))
    .option('--dry-run', 'check the configuration and print the plan; read no tensor data, write nothing')
    .option('--json', 'print the plan (with --dry-run) or the merge report as JSON on stdout')
    .option('-j, --jobs <n>', `worker threads for the arithmetic (default: ${availableParallelism()}, the number of cores; 1 for small merges)`, integer('--jobs', 1))
    .option('--overwrite', 'replace the output folder if it exists')
    .addOption(
      new Option(
        '--direct-reads <when>',
        'read the input files of the fused task_arithmetic / ties / breadcrumbs kernel past the page cache (O_DIRECT, Linux): auto = files mostly not cached; always; never. AMALGAM_DIRECT_IO=0 turns direct I/O off',
      )
        .choices(['auto', 'always', 'never'])
        .default('auto'),
    )
    .option('--model-dir <dir>', 'folder that relative model paths are resolved against (default: the working folder)')
    .option('-q, --quiet', 'print only errors and the output path');
  for (const [flag, , why] of IGNORED_FLAGS) cmd.option(flag, `accepted for mergekit compatibility and ignored (${why})`);
  cmd.action(async (config: string, outDir: string, opts: MergeCliOptions) => {
    const err = (s: string) => process.stderr.write(s + '\n');
    for (const [flag, key, why] of IGNORED_FLAGS) {
      if (opts[key] !== undefined && !opts.quiet) err(`amalgam: note: ${flag.split(' ')[0]} is ignored (${why})`);
    }
    const outShardSize = parseSize(opts.outShardSize);
    const controller = new AbortController();
    let signalled: NodeJS.Signals | undefined;
    const onSignal = (s: NodeJS.Signals) => {
      if (signalled) return;
      signalled = s;
      err(`\namalgam: ${s} received, stopping; nothing will be left at ${resolve(outDir)}`);
      controller.abort();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    try {
      const result = await runMerge(config, outDir, {
        allowCrimes: !!opts.allowCrimes,
        outShardSize,
        copyTokenizer: opts.copyTokenizer,
        writeModelCard: opts.writeModelCard,
        ...(opts.randomSeed !== undefined ? { randomSeed: opts.randomSeed } : {}),
        ...(opts.jobs !== undefined ? { jobs: opts.jobs } : {}),
        ...(opts.modelDir !== undefined ? { baseDir: resolve(opts.modelDir) } : {}),
        ...(opts.directReads !== undefined ? { directReads: opts.directReads } : {}),
        dryRun: !!opts.dryRun,
        overwrite: !!opts.overwrite,
        progressBar: !opts.quiet && !!process.stderr.isTTY,
        signal: controller.signal,
        onWarning: (m) => {
          // A dry run lists its warnings in the summary.
          if (!opts.quiet && !opts.dryRun) err(`amalgam: warning: ${m}`);
        },
      });
      if (result.dryRun) {
        if (opts.json) process.stdout.write(JSON.stringify(result.plan, null, 2) + '\n');
        else {
          process.stdout.write(`Dry run of ${config}: nothing read beyond headers, nothing written.\n`);
          process.stdout.write(formatPlanSummary(result.plan, { outDir: result.outDir, outShardSize }) + '\n');
        }
        return;
      }
      if (opts.json) {
        const { plan, execution, warnings } = result;
        const report = { outDir: result.outDir, method: plan.method, randomSeed: plan.randomSeed, tensors: plan.tensors.length, parameters: plan.stats.parameters, execution, warnings };
        process.stdout.write(JSON.stringify(report, null, 2) + '\n');
      } else if (opts.quiet) process.stdout.write(result.outDir + '\n');
      else process.stdout.write(formatMergeReport(result) + '\n');
    } catch (e) {
      if (signalled) {
        // Everything is cleaned up by now; exit with the conventional status of the signal.
        err(`amalgam: interrupted; ${resolve(outDir)} was not written`);
        process.exit(signalled === 'SIGINT' ? 130 : 143);
      }
      throw e;
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  });
}
