/** The built-in default job: make a checkpoint from a seed and inspect it. */
import { join } from 'node:path';
import { inspectPath, type InspectReport } from '../inspect.js';
import { writeSyntheticLlama } from './synthetic.js';

export interface DemoResult {
  checkpoint: string;
  report: InspectReport;
}

export async function runDemo(outDir: string, opts: { seed?: number } = {}): Promise<DemoResult> {
  const checkpoint = join(outDir, 'base');
  await writeSyntheticLlama(checkpoint, { seed: opts.seed ?? 0, maxShardBytes: 96 * 1024, overwrite: true });
  const report = await inspectPath(checkpoint);
  return { checkpoint, report };
}
