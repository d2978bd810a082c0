import type { Command } from 'commander';
import { resolve } from 'node:path';
import { runDemo } from '../demo/demo.js';
import { printInspectReport } from './inspect.js';

export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('Run the built-in example: generate a small Llama-shaped checkpoint from a seed (no downloads) and inspect it.')
    .option('-o, --out <dir>', 'folder for the generated files (replaced if it exists)', 'amalgam-demo')
    .option('--seed <n>', 'random seed', (v) => parseInt(v, 10), 0)
    .action(async (opts: { out: string; seed: number }) => {
      const out = resolve(opts.out);
      const result = await runDemo(out, { seed: opts.seed });
      process.stdout.write(`Generated a Llama-shaped checkpoint (seed ${opts.seed}) in ${result.checkpoint}\n\n`);
      printInspectReport(result.report, {});
      process.stdout.write(`\nDone. The checkpoint is in ${result.checkpoint}\n`);
    });
}
