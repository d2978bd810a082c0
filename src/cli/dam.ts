import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import cliProgress from 'cli-progress';
import type { Command } from 'commander';
import { AmalgamError } from '../errors.js';
import { bakeFromMergers, type DamBakeResult } from '../dam/bake.js';
import { DAM_NON_LINEARITIES, type DamNonLinearity } from '../dam/layer.js';
import { parseDamRecipe } from '../dam/recipe.js';
import { runDam, type RunDamResult } from '../dam/train.js';
import { fixed, markdownTable, secondsText, tokensText } from '../evolve/report.js';
import { parseSize } from '../merge/run.js';
import { parseDtypeOption, parseInteger } from '../train/options.js';

/**
 * A progress display: a bar on a TTY, else a line about every tenth of the work (nothing when
 * quiet). `update` takes the units done and the bar's fields; `line` formats a non-TTY line.
 */
export interface Progress {
  update(done: number, fields: Record<string, string>): void;
  stop(): void;
}

export function createProgress(opts: { label: string; total: number; unit: string; fields: string[]; quiet?: boolean; line: (done: number, fields: Record<string, string>) => string }): Progress {
  if (opts.quiet) return { update() {}, stop() {} };
  if (process.stderr.isTTY === true) {
    const bar = new cliProgress.SingleBar(
      {
        format: `${opts.label} |{bar}| {value}/{total} ${opts.unit} | ${opts.fields.map((f) => `{${f}}`).join(' | ')} | ETA {eta_formatted}`,
        barCompleteChar: '█',
        barIncompleteChar: '░',
        hideCursor: true,
        etaBuffer: 20,
        stream: process.stderr,
      },
      cliProgress.Presets.shades_classic,
    );
    bar.start(opts.total, 0, Object.fromEntries(opts.fields.map((f) => [f, '-'])));
    return {
      update: (done, fields) => bar.update(done, fields),
      stop: () => bar.stop(),
    };
  }
  const every = Math.max(1, Math.round(opts.total / 10));
  return {
    update(done, fields) {
      if (done % every === 0 || done === opts.total) process.stderr.write(`${opts.line(done, fields)}\n`);
    },
    stop() {},
  };
}

/** ETA text from the elapsed time and the fraction done. */
export function etaText(elapsed: number, done: number, total: number): string {
  if (done <= 0) return '-';
  return secondsText((elapsed * (total - done)) / done);
}

interface TrainCliOptions {
  out?: string;
  steps?: number;
  overwrite?: boolean;
  json?: boolean;
  quiet?: boolean;
}

interface BakeCliOptions {
  mergers: string;
  out: string;
  nonLinearity?: DamNonLinearity;
  dtype?: string;
  shardSize?: string;
  overwrite?: boolean;
  json?: boolean;
}

/** The final table of a DAM run: each source's first and last KL, tokens; then the totals. */
export function formatDamReport(r: RunDamResult, models: readonly string[]): string {
  const last = r.perSource[r.perSource.length - 1] ?? [];
  const start = r.perSource[0] ?? [];
  const rows = models.map((m, i) => [m, fixed(start[i], 4), fixed(last[i], 4), tokensText(r.tokens[i] ?? 0)]);
  const total = r.tokens.reduce((a, b) => a + b, 0);
  const lines = [
    markdownTable(['source', 'KL first step', 'KL last step', 'tokens'], rows),
    '',
    `${r.steps} steps, ${r.coefficientCount.toLocaleString('en-US')} coefficients, loss ${fixed(r.losses[0], 4)} → ${fixed(r.losses[r.losses.length - 1], 4)}, ${secondsText(r.seconds)} (${Math.round(total / Math.max(r.seconds, 1e-9)).toLocaleString('en-US')} student tokens/s)`,
  ];
  if (r.bake) lines.push(`wrote ${r.bake.outDir} (${r.bake.files.join(', ')})`);
  else lines.push('not baked (pass --out DIR to write the merged checkpoint)');
  return lines.join('\n');
}

function parseNonLinearity(v: string): DamNonLinearity {
  const f = v === 'none' ? 'identity' : v;
  if (!(DAM_NON_LINEARITIES as readonly string[]).includes(f)) {
    throw new AmalgamError('E_USAGE', `--non-linearity: unknown non-linearity '${v}'`, { hint: `use ${DAM_NON_LINEARITIES.join(', ')}` });
  }
  return f as DamNonLinearity;
}

/** How `dam bake` checks the source folders against the mergers file (its --help). */
const BAKE_SOURCES_HELP = `
Source folders: the mergers file records the source folders of \`dam train\` (absolute paths) and a
fingerprint of each one's weights (a hash of every tensor's name, dtype, shape and a few stored
bytes). Before baking, each given folder is compared with the recorded source at its position:
  - same real path or same weights: it is used; a folder that moved but holds the recorded
    weights is a warning;
  - another recorded source (the same folders in another order), or other weights: an error that
    lists the recorded and the given folders; give the recorded folders in the recorded order;
  - a moved folder that cannot be compared (a file without fingerprints, and the recorded folder
    gone): a warning. Files without fingerprints are compared with the recorded folders' weights
    where those folders still exist.
`;

function formatBake(r: DamBakeResult): string {
  return `baked ${r.tensors} tensors into ${r.outDir} in ${(r.elapsedMs / 1000).toFixed(2)} s (${r.files.join(', ')})`;
}

export function registerDam(program: Command): void {
  const dam = program.command('dam').description('DAM, Differentiable Adaptive Merging: learn per-column merge coefficients by distillation, and bake them (docs/dam.md)');

  dam
    .command('train')
    .description('Train the DAM coefficients of a recipe (sources, data per source, loss terms, optimiser, steps) and bake the merge into --out with mergers.safetensors.')
    .argument('<recipe>', 'DAM recipe YAML (docs/dam.md; examples/dam-experts.yml); relative paths are resolved against its folder')
    .option('--out <dir>', 'bake the merged checkpoint here (default: train only)')
    .option('--steps <n>', 'optimiser steps (overrides train.steps)', (v) => parseInteger(v, '--steps', 1))
    .option('--overwrite', 'replace a non-empty output folder')
    .option('--json', 'print the result as one JSON object')
    .option('-q, --quiet', 'no progress display')
    .action(async (path: string, o: TrainCliOptions) => {
      const file = resolve(path);
      let text: string;
      try {
        text = await readFile(file, 'utf8');
      } catch (e) {
        throw new AmalgamError('E_IO', `cannot read the DAM recipe: ${(e as Error).message}`, { file, cause: e });
      }
      const recipe = parseDamRecipe(text, file);
      const models = recipe.models.map((m) => m.model);
      let progress: Progress | null = null;
      const r = await runDam(recipe, {
        baseDir: dirname(file),
        outDir: o.out,
        overwrite: o.overwrite,
        steps: o.steps,
        recipeYaml: text,
        recipeFile: file,
        onStep: (s) => {
          progress ??= createProgress({
            label: 'dam',
            total: s.steps,
            unit: 'steps',
            fields: ['loss', 'kl', 'tps'],
            quiet: o.quiet || o.json,
            line: (done, f) => `step ${done}/${s.steps}: ${f.loss} | ${f.kl} | ${f.tps} | ETA ${f.eta}`,
          });
          const tokens = s.tokens.reduce((a, b) => a + b, 0);
          progress.update(s.step, {
            loss: `loss ${s.loss.toFixed(4)}`,
            kl: `KL ${s.perSource.map((v) => v.toFixed(3)).join('/')}`,
            tps: `${Math.round(tokens / Math.max(s.elapsedSeconds, 1e-9))} tok/s`,
            eta: etaText(s.elapsedSeconds, s.step, s.steps),
          });
        },
      });
      (progress as Progress | null)?.stop();
      if (o.json) {
        process.stdout.write(JSON.stringify({ models, steps: r.steps, losses: r.losses, perSource: r.perSource, tokens: r.tokens, seconds: r.seconds, coefficientCount: r.coefficientCount, outDir: r.bake?.outDir ?? null }) + '\n');
        return;
      }
      process.stdout.write(formatDamReport(r, models) + '\n');
    });

  dam
    .command('bake')
    .description('Re-bake a DAM merge from the source folders (in their training order) and a mergers.safetensors.')
    .argument('<sources...>', 'source model folders, in the order they were trained')
    .requiredOption('--mergers <file>', 'mergers.safetensors of a DAM run (written by `dam train --out`)')
    .requiredOption('--out <dir>', 'output folder')
    .option('--non-linearity <f>', `f of a mergers file that does not record one (files of the reference DAM code, which trains with tanh): ${DAM_NON_LINEARITIES.join(', ')}`, parseNonLinearity)
    .option('--dtype <dtype>', 'data type of the written weights: f32, bf16 or f16 (default: the first source\'s)')
    .option('--shard-size <size>', 'shard size limit, e.g. 5B or 500M (default 5B)')
    .option('--overwrite', 'replace a non-empty output folder')
    .option('--json', 'print the result as one JSON object')
    .addHelpText('after', BAKE_SOURCES_HELP)
    .action(async (sources: string[], o: BakeCliOptions) => {
      const r = await bakeFromMergers(sources, o.mergers, o.out, {
        overwrite: o.overwrite,
        onWarning: (m) => process.stderr.write(`amalgam: warning: ${m}\n`),
        ...(o.nonLinearity !== undefined ? { nonLinearity: o.nonLinearity } : {}),
        ...(o.dtype !== undefined ? { dtype: parseDtypeOption(o.dtype) } : {}),
        ...(o.shardSize !== undefined ? { outShardSize: parseSize(o.shardSize) } : {}),
      });
      process.stdout.write(o.json ? JSON.stringify(r) + '\n' : formatBake(r) + '\n');
    });
}
