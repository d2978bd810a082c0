/**
 * Benchmark dispatcher.
 *
 *   npm run bench                 list the benchmarks, then run all of them
 *   npm run bench -- io [opts]    run one benchmark (options go to that benchmark)
 *   npm run bench -- --list       list the benchmarks only
 *
 * A benchmark is a module under bench/ exporting `run(args)`; register it in BENCHMARKS below.
 */

export interface BenchModule {
  /** Run the benchmark with its own command-line arguments. */
  run(args: string[]): Promise<void> | void;
}

interface BenchEntry {
  description: string;
  load: () => Promise<BenchModule>;
}

/** name -> benchmark. Modules are loaded only when run. */
export const BENCHMARKS: Record<string, BenchEntry> = {
  io: {
    description: 'read a >= 2 GB sharded BF16 checkpoint from page cache as F32, next to `cat` of the same files',
    load: () => import('./io.js'),
  },
  kernels: {
    description: 'matmul GFLOP/s at 1024³ per layout: reference TS, wasm 1 thread, wasm all threads',
    load: () => import('./kernels.js'),
  },
  finetune: {
    description: 'fine-tune stories260K: full and LoRA LM on Tiny Shakespeare (300 steps), LoRA classification on the domain task and SST-2',
    load: () => import('./finetune.js'),
  },
  train: {
    description: 'forward + backward + AdamW tokens/s for the stories260K and stories15M shapes (batch 8 × 256), 1024³ matmul GFLOP/s, vs PyTorch when available',
    load: () => import('./train.js'),
  },
  merge: {
    description: 'TIES (density 0.5; --method for another merge method) of 3 fine-tunes + base, >= 1 GB BF16 each: wall time vs the I/O floor, and peak RSS vs its bound',
    load: () => import('./merge.js'),
  },
  osrm: {
    description: 'OSRM on stories260K (domain, pronoun, parity): standard vs orthonormal control vs OSRM LoRA, merged by TA/TIES over λ, seeds 0-2',
    load: () => import('./osrm.js'),
  },
  linalg: {
    description: 'symmetric eigensolvers at OSRM widths (512 to 2048): full eigh vs eighLowest (8 lowest eigenvectors), time and accuracy',
    load: () => import('./linalg.js'),
  },
  dam: {
    description: 'learned merging of the 3 stories260K domain experts: linear / TA / TIES / DARE-TIES (val grid), CMA-ES (200 evals), AdaMerging and DAM (100 steps) on the test windows',
    load: () => import('./dam.js'),
  },
};

function listing(): string {
  const names = Object.keys(BENCHMARKS);
  const width = Math.max(...names.map((n) => n.length));
  return names.map((n) => `  ${n.padEnd(width)}  ${BENCHMARKS[n]!.description}`).join('\n');
}

const USAGE = `usage: npm run bench [-- <name> [options]]

With no name every benchmark runs in turn (options, if any, go to each of them).
Each benchmark accepts --help for its own options.

benchmarks:
${listing()}`;

/** Bad command-line options: node:util parseArgs errors, or errors a benchmark marks with `usage: true`. */
function isUsageError(e: unknown): e is Error {
  if (!(e instanceof Error)) return false;
  const { code, usage } = e as Error & { code?: unknown; usage?: unknown };
  return usage === true || (typeof code === 'string' && code.startsWith('ERR_PARSE_ARGS'));
}

async function main(argv: string[]): Promise<number> {
  const [first, ...rest] = argv;
  if (first === '--help' || first === '-h') {
    console.log(USAGE);
    return 0;
  }
  if (first === '--list') {
    console.log(listing());
    return 0;
  }
  if (first === undefined || first.startsWith('-')) {
    const names = Object.keys(BENCHMARKS);
    console.error(`benchmarks: ${names.join(', ')} (running all; \`npm run bench -- <name>\` runs one)\n`);
    for (const name of names) {
      console.error(`=== ${name} ===`);
      const mod = await BENCHMARKS[name]!.load();
      await mod.run(argv);
    }
    return 0;
  }
  const entry = Object.hasOwn(BENCHMARKS, first) ? BENCHMARKS[first] : undefined;
  if (!entry) {
    console.error(`unknown benchmark "${first}"; known benchmarks:\n${listing()}`);
    return 2;
  }
  const mod = await entry.load();
  await mod.run(rest);
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    if (isUsageError(e)) {
      console.error(`error: ${e.message}\n(\`npm run bench -- <name> --help\` lists the options)`);
      process.exitCode = 2;
      return;
    }
    console.error(e instanceof Error ? (e.stack ?? e.message) : String(e));
    process.exitCode = 1;
  },
);
