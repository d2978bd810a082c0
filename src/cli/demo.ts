import type { Command } from 'commander';
import { isAbsolute, relative, resolve } from 'node:path';
import { runDemo, type DemoResult } from '../demo/demo.js';
import { formatMergeReport, formatPlanSummary } from '../merge/run.js';
import { parseInteger } from '../train/options.js';
import { printInspectReport } from './inspect.js';

function printDemo(r: DemoResult): void {
  const out = (s = '') => process.stdout.write(s + '\n');
  const rel = (p: string) => {
    const r = relative(process.cwd(), p);
    return r === '' ? '.' : r.startsWith('..') || isAbsolute(r) ? p : r;
  };
  out(`amalgam demo (seed ${r.seed}): generated ${r.models.length} models in ${(r.elapsedMs.generate / 1000).toFixed(2)} s, no downloads`);
  for (const m of r.models) out(`  ${m.name.padEnd(8)} ${rel(m.dir)}  (${m.description})`);
  out();
  out(`Merge configuration (${rel(r.configPath)}, also examples/demo-ties.yml):`);
  out(r.merge.plan.configYaml.trimEnd().replace(/^/gm, '  | '));
  out();
  out('Plan:');
  out(formatPlanSummary(r.merge.plan).replace(/^/gm, '  '));
  out();
  out(formatMergeReport(r.merge));
  out();
  out('Merged model:');
  printInspectReport(r.report, { limit: 12 });
  out();
  out('How the merge moved the weights (cosine between merged - base and each change, over all tensors):');
  for (const c of r.analysis.cosines) out(`  ${c.model.padEnd(8)} ${c.cosine.toFixed(3)}`);
  out(`  shared direction of ft-math and ft-code: ${r.analysis.sharedCosine.toFixed(3)}`);
  out(`  size of the change: ${(100 * r.analysis.relativeChange).toFixed(2)} % of the base weights`);
  out();
  out(`Done in ${(r.elapsedMs.total / 1000).toFixed(2)} s. The merged model is in ${r.output}`);
  out(`Run it again yourself: amalgam merge ${rel(r.configPath)} <out-dir> --model-dir ${rel(r.dir)}`);
}

export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description(
      'Run the built-in example: generate a small Llama-shaped base model and three fine-tuned variants from a seed (no downloads), merge them with TIES (examples/demo-ties.yml) and inspect the result.',
    )
    .option(
      '-o, --out <dir>',
      'folder for the generated files: a new or empty folder, or the folder of an earlier demo (whose files are replaced); a folder holding anything else is refused',
      'amalgam-demo',
    )
    .option('--seed <n>', 'random seed (an integer >= 0)', (v) => parseInteger(v, '--seed', 0), 0)
    .option('-j, --jobs <n>', 'worker threads of the merge (default: the number of cores)', (v) => parseInteger(v, '--jobs', 1))
    .action(async (opts: { out: string; seed: number; jobs?: number }) => {
      const result = await runDemo(resolve(opts.out), { seed: opts.seed, ...(opts.jobs !== undefined ? { jobs: opts.jobs } : {}) });
      printDemo(result);
    });
}
