#!/usr/bin/env node
/**
 * The `amalgam` command line: a thin layer over the library. Each command parses its
 * arguments, calls one library function and prints the result.
 */
import { Command, CommanderError } from 'commander';
import { createRequire } from 'node:module';
import { isAmalgamError } from '../errors.js';
import { registerInspect } from './inspect.js';
import { registerConvert } from './convert.js';
import { registerDemo } from './demo.js';
import { registerTrain } from './train.js';
import { registerEval } from './eval.js';
import { registerGenerate } from './generate.js';
import { registerLora } from './lora.js';
import { registerDam } from './dam.js';
import { registerEvolve } from './evolve.js';
import { registerAdaMerge } from './adamerge.js';
import { registerOsrm } from './osrm.js';
import { registerMerge } from './merge.js';

const require = createRequire(import.meta.url);
const pkg = require('../../package.json') as { version: string };

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('amalgam')
    .description('Merge fine-tuned language models: mergekit-compatible merges, LoRA, OSRM and DAM, in TypeScript.')
    .version(pkg.version)
    .showHelpAfterError('(run with --help for usage)');
  registerDemo(program);
  registerMerge(program);
  registerInspect(program);
  registerConvert(program);
  registerGenerate(program);
  registerEval(program);
  registerTrain(program);
  registerLora(program);
  registerDam(program);
  registerEvolve(program);
  registerAdaMerge(program);
  registerOsrm(program);
  return program;
}

/**
 * A reader that stops early (`amalgam inspect m --json | head`) closes the pipe: stop quietly, as
 * command-line tools do, instead of failing on the write.
 */
function quietOnClosedPipe(): void {
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(0);
    throw e;
  });
}

export async function main(argv: string[]): Promise<number> {
  quietOnClosedPipe();
  const program = buildProgram();
  program.exitOverride();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode;
    if (isAmalgamError(e)) {
      process.stderr.write(`amalgam: error: ${e.message}\n`);
      return 1;
    }
    process.stderr.write(`amalgam: unexpected error: ${(e as Error)?.stack ?? String(e)}\n`);
    return 2;
  }
}

main(process.argv).then((code) => {
  process.exitCode = code;
});
