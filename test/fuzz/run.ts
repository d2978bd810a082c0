/**
 * Long fuzz run over the safetensors and GGUF readers (`npm run fuzz`).
 *
 *   node --import tsx test/fuzz/run.ts [--runs N] [--seed S] [--target safetensors|gguf|gguf-fixture|all]
 *                                      [--path P] [--timeout MS]
 *
 * Defaults: 100,000 cases in total (60% safetensors, 25% generated GGUF, 15% mutations of the
 * stories260K GGUF fixture, or 40% generated GGUF without it), a random seed that is printed.
 * A failure prints the target, seed and counterexample path; rerun a single case with
 * `--target T --seed S --path P`. The exit status is non-zero on any failure.
 */
import fc from 'fast-check';
import { ggufFixture, ggufFixtureProperty, ggufProperty, safetensorsProperty, type Tally, type TargetName } from './targets.js';

interface Args {
  runs: number;
  seed: number;
  target: TargetName | 'all';
  path?: string;
  timeout: number;
}

function usage(msg?: string): never {
  if (msg) console.error(msg);
  console.error('usage: run.ts [--runs N] [--seed S] [--target safetensors|gguf|gguf-fixture|all] [--path P] [--timeout MS]');
  process.exit(2);
}

function parseArgs(argv: string[]): Args {
  const args: Args = { runs: 100_000, seed: (Date.now() ^ (Math.random() * 0x7fffffff)) | 0, target: 'all', timeout: 10_000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const [flag, inline] = a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const value = () => inline ?? argv[++i] ?? usage(`${flag} needs a value`);
    switch (flag) {
      case '--runs':
      case '-n': {
        const n = Number(value().replace(/_/g, ''));
        if (!Number.isSafeInteger(n) || n < 1) usage(`bad --runs`);
        args.runs = n;
        break;
      }
      case '--seed': {
        const s = Number(value());
        if (!Number.isSafeInteger(s)) usage('bad --seed');
        args.seed = s | 0;
        break;
      }
      case '--target': {
        const t = value();
        if (t !== 'safetensors' && t !== 'gguf' && t !== 'gguf-fixture' && t !== 'all') usage(`unknown target ${t}`);
        args.target = t;
        break;
      }
      case '--path':
        args.path = value();
        break;
      case '--timeout': {
        const t = Number(value());
        if (!(t > 0)) usage('bad --timeout');
        args.timeout = t;
        break;
      }
      case '--help':
      case '-h':
        usage();
      default:
        usage(`unknown argument ${a}`);
    }
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));

const haveFixture = ggufFixture() !== undefined;
const plan: [TargetName, number][] =
  args.target !== 'all'
    ? [[args.target, args.runs]]
    : haveFixture
      ? [['safetensors', Math.ceil(args.runs * 0.6)], ['gguf', Math.ceil(args.runs * 0.25)], ['gguf-fixture', Math.ceil(args.runs * 0.15)]]
      : [['safetensors', Math.ceil(args.runs * 0.6)], ['gguf', Math.ceil(args.runs * 0.4)]];
if (!haveFixture) console.log('note: the stories260K GGUF fixture was not found (set AMALGAM_FIXTURES); its target is skipped');

console.log(`fuzz: seed ${args.seed}, ${plan.reduce((s, [, n]) => s + n, 0)} cases`);
let failed = false;
let total = 0;
const t0 = performance.now();
for (const [target, runs] of plan) {
  const tally: Tally = new Map();
  // the three properties have different value types; fc.check only needs one at a time
  const prop = (target === 'safetensors' ? safetensorsProperty(tally) : target === 'gguf' ? ggufProperty(tally) : ggufFixtureProperty(tally)) as
    | fc.IAsyncPropertyWithHooks<[unknown, ...unknown[]]>
    | undefined;
  if (!prop) {
    console.log(`${target}: skipped (fixture missing)`);
    if (args.target === target) failed = true;
    continue;
  }
  const start = performance.now();
  const details = await fc.check(prop, { numRuns: runs, seed: args.seed, path: args.path, timeout: args.timeout, endOnFailure: false });
  const secs = (performance.now() - start) / 1000;
  total += details.numRuns;
  const outcomes = [...tally].sort((a, b) => b[1] - a[1]).map(([o, n]) => `${o} ${n}`).join(', ');
  console.log(`${target}: ${details.numRuns} cases in ${secs.toFixed(1)} s (${Math.round(details.numRuns / secs)} cases/s); outcomes: ${outcomes}`);
  if (details.failed) {
    failed = true;
    console.error(`\n${target}: FAILED after ${details.numRuns} cases (seed ${details.seed}, path ${details.counterexamplePath})`);
    console.error(`  replay: node --import tsx test/fuzz/run.ts --target ${target} --seed ${details.seed} --path "${details.counterexamplePath}"`);
    console.error(`  counterexample: ${fc.stringify(details.counterexample).slice(0, 4000)}`);
    const err = details.errorInstance;
    console.error(`  error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  }
}
const secs = (performance.now() - t0) / 1000;
console.log(`total: ${total} cases in ${secs.toFixed(1)} s (${Math.round(total / secs)} cases/s), ${failed ? 'FAILED' : 'no failures'}`);
process.exit(failed ? 1 : 0);
