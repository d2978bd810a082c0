import { dirname } from 'node:path';
import type { Command } from 'commander';
import { parseAdaMergeRecipe } from '../adamerge/recipe.js';
import { runAdaMerge, type RunAdaMergeResult } from '../adamerge/run.js';
import { fixed, markdownTable, secondsText, tokensText } from '../evolve/report.js';
import { parseInteger } from '../train/options.js';
import { createProgress, etaText, type Progress } from './dam.js';
import { readRecipeFile, scoresTable } from './evolve.js';

interface AdaMergeCliOptions {
  out?: string;
  steps?: number;
  overwrite?: boolean;
  json?: boolean;
  quiet?: boolean;
}

export function formatAdaMergeReport(r: RunAdaMergeResult): string {
  const first = r.perSource[0] ?? [];
  const last = r.perSource[r.perSource.length - 1] ?? [];
  const lines = [
    `coefficients (${r.granularity}-wise, ${r.coefficientCount}), mean per model:`,
    markdownTable(['model', 'mean λ', 'min λ', 'max λ'], r.models.map((m, k) => {
      const own = r.lambdas.filter((x) => x.model === m).map((x) => x.lambda);
      return [m, fixed(r.meanLambda[k]), fixed(Math.min(...own)), fixed(Math.max(...own))];
    })),
    '',
    markdownTable(['data source', 'entropy first step', 'entropy last step'], first.map((v, i) => [r.data[i] ?? `source ${i}`, fixed(v, 4), fixed(last[i], 4)])),
  ];
  if (r.test) lines.push('', 'test data:', scoresTable([{ label: 'start', scores: r.test.start }, { label: 'end', scores: r.test.end }]));
  lines.push('', `${r.steps} steps, ${tokensText(r.tokens)} tokens (${tokensText(r.forwardTokens)} forward-equivalent), ${secondsText(r.seconds)} (${Math.round(r.tokens / Math.max(r.seconds, 1e-9))} tokens/s)`);
  lines.push(r.outDir ? `wrote ${r.outDir}` : 'not written (pass --out DIR to write the merge)');
  return lines.join('\n');
}

export function registerAdaMerge(program: Command): void {
  program
    .command('adamerge')
    .description('AdaMerging: layer-wise (or task-wise) task-vector coefficients trained by entropy minimisation of the merged model\'s predictions on unlabelled data.')
    .argument('<recipe>', 'AdaMerging recipe YAML (docs/dam.md; examples/adamerge-experts.yml); relative paths are resolved against its folder')
    .option('--out <dir>', 'write the merge here (a model folder with adamerge.json)')
    .option('--steps <n>', 'optimiser steps (overrides train.steps)', (v) => parseInteger(v, '--steps', 1))
    .option('--overwrite', 'replace a non-empty output folder')
    .option('--json', 'print the result as one JSON object')
    .option('-q, --quiet', 'no progress display')
    .action(async (path: string, o: AdaMergeCliOptions) => {
      const { file, text } = await readRecipeFile(path, 'AdaMerging');
      const recipe = parseAdaMergeRecipe(text, dirname(file), file);
      let progress: Progress | null = null;
      const r = await runAdaMerge(recipe, {
        outDir: o.out,
        overwrite: o.overwrite,
        recipeYaml: text,
        recipeFile: file,
        steps: o.steps,
        log: o.quiet || o.json ? undefined : (l) => process.stderr.write(`${l}\n`),
        onStep: (s) => {
          progress ??= createProgress({
            label: 'adamerge',
            total: s.steps,
            unit: 'steps',
            fields: ['loss', 'lam', 'tps'],
            quiet: o.quiet || o.json,
            line: (done, f) => `step ${done}/${s.steps}: ${f.loss} | ${f.lam} | ${f.tps} | ETA ${f.eta}`,
          });
          progress.update(s.step, {
            loss: `entropy ${s.perSource.map((v) => v.toFixed(3)).join('/')}`,
            lam: `mean λ ${s.meanLambda.map((v) => v.toFixed(3)).join('/')}`,
            tps: `${Math.round(s.tokens / Math.max(s.elapsedSeconds, 1e-9))} tok/s`,
            eta: etaText(s.elapsedSeconds, s.step, s.steps),
          });
        },
      });
      (progress as Progress | null)?.stop();
      process.stdout.write(o.json ? JSON.stringify(r) + '\n' : formatAdaMergeReport(r) + '\n');
    });
}
