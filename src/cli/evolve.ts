import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import type { Command } from 'commander';
import { AmalgamError } from '../errors.js';
import type { DomainScores } from '../evolve/fitness.js';
import { runEvolve, type RunEvolveResult } from '../evolve/evolve.js';
import { parseEvolveRecipe } from '../evolve/recipe.js';
import { fixed, markdownTable, secondsText, tokensText } from '../evolve/report.js';
import { parseInteger } from '../train/options.js';
import { createProgress, etaText, type Progress } from './dam.js';

interface EvolveCliOptions {
  out?: string;
  evaluations?: number;
  overwrite?: boolean;
  json?: boolean;
  quiet?: boolean;
}

export async function readRecipeFile(path: string, what: string): Promise<{ file: string; text: string }> {
  const file = resolve(path);
  try {
    return { file, text: await readFile(file, 'utf8') };
  } catch (e) {
    throw new AmalgamError('E_IO', `cannot read the ${what} recipe: ${(e as Error).message}`, { file, cause: e });
  }
}

/** Per-domain NLL (and accuracy) of one or two score sets, side by side. */
export function scoresTable(columns: { label: string; scores: DomainScores }[]): string {
  const names = columns[0]!.scores.perDomain.map((d) => d.name);
  const headers = ['data', ...columns.flatMap((c) => [`${c.label} NLL`, `${c.label} acc`])];
  const rows = names.map((n, i) => [n, ...columns.flatMap((c) => [fixed(c.scores.perDomain[i]!.nll), fixed(100 * c.scores.perDomain[i]!.accuracy, 1)])]);
  rows.push(['mean', ...columns.flatMap((c) => [fixed(c.scores.meanNll), fixed(100 * c.scores.meanAccuracy, 1)])]);
  return markdownTable(headers, rows);
}

export function formatEvolveReport(r: RunEvolveResult): string {
  const multi = r.parameters.some((p) => p.density !== undefined);
  const headers = ['group', ...r.models.flatMap((m) => (multi ? [`${m} w`, `${m} d`] : [m]))];
  const rows = r.groups.map((g) => [g, ...r.models.flatMap((m) => {
    const e = r.parameters.find((p) => p.group === g && p.model === m)!;
    return multi ? [fixed(e.weight), fixed(e.density)] : [fixed(e.weight)];
  })]);
  const lines = [
    `best ${r.method} parameters (${multi ? 'weight, density' : 'weight'} per layer group and model):`,
    markdownTable(headers, rows),
    '',
    'fitness data (best candidate):',
    scoresTable([{ label: 'best', scores: r.scores }]),
  ];
  if (r.test) lines.push('', 'test data:', scoresTable([{ label: 'start', scores: r.test.start }, { label: 'best', scores: r.test.best }]));
  lines.push(
    '',
    `${r.evaluations} evaluations (${r.generations} generation${r.generations === 1 ? '' : 's'} of ${r.popsize}, ${r.dimension} dimensions, stop: ${r.stop}), best fitness ${fixed(r.fitness, 4)}, ${tokensText(r.forwardTokens)} forward tokens, ${secondsText(r.seconds)}`,
  );
  lines.push(r.outDir ? `wrote ${r.outDir}` : 'not written (pass --out DIR to write the best merge)');
  return lines.join('\n');
}

export function registerEvolve(program: Command): void {
  program
    .command('evolve')
    .description(
      'Evolutionary merging: CMA-ES over per-layer-group parameters of a merge method (task_arithmetic weights, ties / dare_ties weights and densities, linear weights), each candidate merged in memory and scored on the fitness data (validation NLL or next-token accuracy), within a budget of evaluations.',
    )
    .argument('<recipe>', 'evolve recipe YAML (docs/dam.md; examples/evolve-experts.yml); relative paths are resolved against its folder')
    .option('--out <dir>', 'write the best merge here (a model folder with evolve.json)')
    .option('--evaluations <n>', 'fitness evaluations (overrides cma.evaluations)', (v) => parseInteger(v, '--evaluations', 1))
    .option('--overwrite', 'replace a non-empty output folder')
    .option('--json', 'print the result as one JSON object')
    .option('-q, --quiet', 'no progress display')
    .action(async (path: string, o: EvolveCliOptions) => {
      const { file, text } = await readRecipeFile(path, 'evolve');
      const recipe = parseEvolveRecipe(text, dirname(file), file);
      let progress: Progress | null = null;
      const r = await runEvolve(recipe, {
        outDir: o.out,
        overwrite: o.overwrite,
        recipeYaml: text,
        recipeFile: file,
        evaluations: o.evaluations,
        log: o.quiet || o.json ? undefined : (l) => process.stderr.write(`${l}\n`),
        onEval: (e) => {
          progress ??= createProgress({
            label: 'evolve',
            total: e.evaluations,
            unit: 'evals',
            fields: ['gen', 'fit', 'best', 'tps'],
            quiet: o.quiet || o.json,
            line: (done, f) => `evaluation ${done}/${e.evaluations}: ${f.gen} | ${f.fit} | ${f.best} | ${f.tps} | ETA ${f.eta}`,
          });
          progress.update(e.evaluation, {
            gen: `gen ${e.generation + 1}`,
            fit: `fitness ${e.fitness.toFixed(4)}`,
            best: `best ${e.best.toFixed(4)}`,
            tps: `${Math.round(e.forwardTokens / Math.max(e.elapsedSeconds, 1e-9))} tok/s`,
            eta: etaText(e.elapsedSeconds, e.evaluation, e.evaluations),
          });
        },
      });
      (progress as Progress | null)?.stop();
      process.stdout.write(o.json ? JSON.stringify(r) + '\n' : formatEvolveReport(r) + '\n');
    });
}
