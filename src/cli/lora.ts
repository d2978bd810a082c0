import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { AmalgamError } from '../errors.js';
import { bakeAdapter } from '../lora/apply.js';
import { checkCombineParams, COMBINE_MERGE_METHODS, combineAdapters, type CombineMergeMethod, type CombineMethod } from '../lora/combine.js';
import { extractLora, type ExtractedTensor } from '../lora/extract.js';
import { parseSize } from '../merge/run.js';
import type { ParamValue } from '../merge/types.js';
import { parseFloatDType, type FloatDType } from '../tensor/dtype.js';

function integer(name: string, min: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!/^\s*\d+\s*$/.test(v) || !Number.isSafeInteger(n) || n < min) throw new AmalgamError('E_USAGE', `${name} must be an integer >= ${min}, got "${v}"`);
    return n;
  };
}

function finite(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n)) throw new AmalgamError('E_USAGE', `${name} must be a number, got "${v}"`);
    return n;
  };
}

function fraction(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !(n >= 0 && n <= 1)) throw new AmalgamError('E_USAGE', `${name} must be a number in [0, 1] (the fraction of each update kept), got "${v}"`);
    return n;
  };
}

function dtypeOption(v: string): FloatDType {
  const d = parseFloatDType(v);
  if (!d) throw new AmalgamError('E_USAGE', `unknown dtype "${v}"`, { hint: 'one of: float32, float16, bfloat16 (or F32, F16, BF16)' });
  return d;
}

function collect(v: string, prev: string[] = []): string[] {
  return [...prev, v];
}

/** `key=value` merge parameters: numbers, true or false. */
function parseParams(list: string[]): Record<string, ParamValue> {
  const out: Record<string, ParamValue> = {};
  for (const item of list) {
    const eq = item.indexOf('=');
    if (eq <= 0) throw new AmalgamError('E_USAGE', `--param expects key=value, got "${item}"`);
    const key = item.slice(0, eq).trim();
    const raw = item.slice(eq + 1).trim();
    if (raw === 'true' || raw === 'false') out[key] = raw === 'true';
    else {
      const n = Number(raw);
      if (raw === '' || !Number.isFinite(n)) throw new AmalgamError('E_USAGE', `--param ${key}: value must be a number, true or false, got "${raw}"`);
      out[key] = n;
    }
  }
  return out;
}

function bar(label: string, quiet: boolean | undefined): { update(done: number, total: number, what: string): void; stop(): void } {
  if (quiet || !process.stderr.isTTY) return { update() {}, stop() {} };
  const b = new cliProgress.SingleBar(
    { format: `${label} |{bar}| {value}/{total} {what}`, hideCursor: true, clearOnComplete: true, stream: process.stderr, fps: 5 },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    update(done, total, what) {
      if (!started) {
        b.start(total, 0, { what: '' });
        started = true;
      }
      b.update(done, { what });
    },
    stop() {
      if (started) b.stop();
    },
  };
}

const pct = (x: number | undefined) => (x === undefined ? '' : `${(100 * x).toFixed(x >= 0.9999 ? 4 : 2)}%`);

function extractTable(tensors: ExtractedTensor[]): string {
  const shown = tensors.filter((t) => t.kind !== 'identical');
  const width = Math.max(6, ...shown.map((t) => t.name.length));
  const lines = [`  ${'tensor'.padEnd(width)}  kind       rank  energy     |ΔW|/|W|`];
  for (const t of shown) {
    lines.push(
      `  ${t.name.padEnd(width)}  ${t.kind.padEnd(9)}  ${String(t.rank ?? '').padStart(4)}  ${pct(t.energy).padStart(9)}  ${t.relativeDelta === undefined ? '' : t.relativeDelta.toExponential(2)}${t.randomized ? '  (randomised SVD)' : ''}`,
    );
  }
  return lines.join('\n');
}

export function registerLora(program: Command): void {
  const lora = program.command('lora').description('PEFT LoRA adapters: merge one into its base model, combine several, or extract one from a fine-tune.');

  lora
    .command('merge')
    .description('Bake a PEFT LoRA adapter into its base model: W + s·B·A for every targeted tensor, streamed tensor by tensor. The adapter is checked against the base before any data is read.')
    .argument('<base>', 'base model folder (config.json + safetensors)')
    .argument('<adapter>', 'PEFT adapter folder (adapter_config.json + adapter_model.safetensors)')
    .argument('<out-dir>', 'output model folder (must not exist or be empty unless --overwrite)')
    .option('--out-shard-size <size>', 'shard size limit in bytes: 5000000000, 500M, 5B (= 5e9); 0 for one file', '5B')
    .option('--overwrite', 'replace the output folder if it exists')
    .option('--json', 'print the result as JSON')
    .option('-q, --quiet', 'print only errors and the output path')
    .action(async (base: string, adapter: string, outDir: string, opts: { outShardSize: string; overwrite?: boolean; json?: boolean; quiet?: boolean }) => {
      const progress = bar('merging', opts.quiet || opts.json);
      let r;
      try {
        r = await bakeAdapter(base, adapter, outDir, {
          overwrite: !!opts.overwrite,
          maxShardBytes: parseSize(opts.outShardSize),
          onProgress: (p) => progress.update(p.done, p.total, p.tensor),
        });
      } finally {
        progress.stop();
      }
      if (opts.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n');
      else if (opts.quiet) process.stdout.write(r.outDir + '\n');
      else {
        process.stdout.write(
          [
            `Merged ${adapter} into ${base} -> ${r.outDir}`,
            `  tensors:  ${r.tensors} (${r.loraModules} updated with W + s·B·A, ${r.replaced} replaced from modules_to_save, ${r.tensors - r.loraModules - r.replaced} copied)`,
            `  files:    ${[...r.weightFiles, ...r.copiedFiles].join(', ')}`,
            `  time:     ${(r.elapsedMs / 1000).toFixed(1)} s`,
          ].join('\n') + '\n',
        );
      }
    });

  lora
    .command('combine')
    .description(
      "Combine PEFT LoRA adapters into one. cat: exact Σ wᵢ·sᵢ·BᵢAᵢ at rank Σrᵢ. svd: merge the dense updates (task_arithmetic, ties, dare_ties, dare_linear) and re-factorise to --rank by SVD, reporting the energy kept. linear: PEFT's A/B-separate combination, for compatibility only (it adds cross terms between adapters).",
    )
    .argument('<out-dir>', 'output adapter folder')
    .argument('<adapters...>', 'adapter folders')
    .option('-m, --method <method>', 'cat, svd or linear', 'cat')
    .option('-w, --weights <list>', 'comma-separated weights wᵢ, one per adapter (default: 1 each)')
    .option('-r, --rank <r>', 'svd: target rank (default: the largest input rank of each module)', integer('--rank', 1))
    .option('--merge-method <name>', 'svd: task_arithmetic (default), ties, dare_ties or dare_linear')
    .option('--density <d>', 'svd with ties/dare_*: fraction of each update kept, in [0, 1]', fraction('--density'))
    .option('--param <key=value>', 'svd: a global parameter of the merge method (repeatable), e.g. lambda=1, normalize=false', collect, [])
    .option('--seed <n>', 'seed of dare_* masks and the randomised SVD (default 0)', integer('--seed', 0))
    .option('--randomized-above <n>', 'svd: use the randomised SVD for matrices whose smaller side exceeds n (default 512)', integer('--randomized-above', 1))
    .option('--dtype <dtype>', 'dtype of the written factors (default float32)', dtypeOption)
    .option('--overwrite', 'replace the output folder if it exists')
    .option('--json', 'print the result as JSON')
    .option('-q, --quiet', 'print only errors and the output path')
    .action(
      async (
        outDir: string,
        adapters: string[],
        opts: {
          method: string;
          weights?: string;
          rank?: number;
          mergeMethod?: string;
          density?: number;
          param: string[];
          seed?: number;
          randomizedAbove?: number;
          dtype?: FloatDType;
          overwrite?: boolean;
          json?: boolean;
          quiet?: boolean;
        },
      ) => {
        const weights = opts.weights === undefined ? adapters.map(() => 1) : opts.weights.split(',').map((w) => finite('--weights')(w));
        if (weights.length !== adapters.length) {
          throw new AmalgamError('E_USAGE', `--weights has ${weights.length} values for ${adapters.length} adapters`);
        }
        const mergeParams = parseParams(opts.param);
        if (opts.density !== undefined) {
          if ('density' in mergeParams) throw new AmalgamError('E_USAGE', '--density and --param density both set the density', { hint: 'give one of them' });
          mergeParams['density'] = opts.density;
        }
        if (opts.method !== 'svd' && Object.keys(mergeParams).length) {
          throw new AmalgamError('E_USAGE', `--density and --param apply to --method svd only`);
        }
        const mergeMethod = (opts.mergeMethod ?? 'task_arithmetic') as CombineMergeMethod;
        if (opts.method === 'svd' && COMBINE_MERGE_METHODS.includes(mergeMethod)) {
          checkCombineParams(mergeMethod, mergeParams, (name) => (name === 'density' && opts.density !== undefined ? '--density' : `--param ${name}`));
        }
        const progress = bar('combining', opts.quiet || opts.json);
        let r;
        try {
          r = await combineAdapters(
            adapters.map((dir, i) => ({ dir, weight: weights[i]! })),
            outDir,
            {
              method: opts.method as CombineMethod,
              ...(opts.rank !== undefined ? { rank: opts.rank } : {}),
              ...(opts.mergeMethod !== undefined ? { mergeMethod: opts.mergeMethod as CombineMergeMethod } : {}),
              mergeParams,
              ...(opts.seed !== undefined ? { seed: opts.seed } : {}),
              ...(opts.randomizedAbove !== undefined ? { randomizedAbove: opts.randomizedAbove } : {}),
              ...(opts.dtype !== undefined ? { dtype: opts.dtype } : {}),
              overwrite: !!opts.overwrite,
              onProgress: (p) => progress.update(p.done, p.total, p.module),
              onWarning: (m) => {
                if (!opts.quiet && !opts.json) process.stderr.write(`amalgam: warning: ${m}\n`);
              },
            },
          );
        } finally {
          progress.stop();
        }
        if (opts.json) {
          process.stdout.write(JSON.stringify(r, null, 2) + '\n');
          return;
        }
        if (opts.quiet) {
          process.stdout.write(r.dir + '\n');
          return;
        }
        const ranks = [...new Set(r.modules.map((m) => m.rank))].sort((a, b) => a - b);
        const lines = [
          `Combined ${adapters.length} adapter(s) with ${r.method}${r.mergeMethod ? ` (${r.mergeMethod})` : ''} -> ${r.dir}`,
          `  modules:  ${r.modules.length}, rank ${ranks.join('/')}, scaling 1 (lora_alpha = rank)`,
        ];
        if (r.savedTensors.length) lines.push(`  saved:    ${r.savedTensors.join(', ')}`);
        if (r.method === 'svd') {
          // Modules whose merged update is zero kept no energy to speak of: they are listed as such.
          const nonzero = r.modules.filter((m) => !m.zeroUpdate);
          const zeros = r.modules.length - nonzero.length;
          if (nonzero.length === 0) {
            lines.push(`  energy kept: none, every merged update is zero (the adapter changes nothing)`);
          } else {
            const energies = nonzero.map((m) => m.energy ?? 1);
            const min = Math.min(...energies);
            const mean = energies.reduce((a, b) => a + b, 0) / energies.length;
            const zeroNote = zeros ? `; ${zeros} merged update(s) are zero` : '';
            lines.push(`  energy kept: mean ${pct(mean)}, lowest ${pct(min)} (${nonzero.find((m) => (m.energy ?? 1) === min)?.path ?? ''})${zeroNote}`);
          }
          const width = Math.max(6, ...r.modules.map((m) => m.path.length));
          for (const m of r.modules) lines.push(`    ${m.path.padEnd(width)}  rank ${String(m.rank).padStart(4)}  ${(m.zeroUpdate ? 'zero' : pct(m.energy)).padStart(9)}`);
        }
        process.stdout.write(lines.join('\n') + '\n');
      },
    );

  lora
    .command('extract')
    .description('Extract a PEFT LoRA adapter from a fine-tuned model: truncated SVD of each ΔW = W_ft − W_base (randomised SVD for large matrices), with the energy captured per tensor.')
    .argument('<base>', 'base model folder')
    .argument('<finetuned>', 'fine-tuned model folder (same architecture and shapes)')
    .argument('<out-dir>', 'output adapter folder')
    .requiredOption('-r, --rank <r>', 'LoRA rank', integer('--rank', 1))
    .option('--randomized-above <n>', 'use the randomised SVD for matrices whose smaller side exceeds n (default 512)', integer('--randomized-above', 1))
    .option('--power-iters <n>', 'randomised SVD: power iterations (default 2)', integer('--power-iters', 0))
    .option('--oversample <n>', 'randomised SVD: extra sketch columns (default 10)', integer('--oversample', 0))
    .option('--seed <n>', 'randomised SVD seed (default 0)', integer('--seed', 0))
    .option('--embeddings <mode>', 'embedding matrices: lora (default), full or skip (whatever --no-save-full says)')
    .option('--no-save-full', 'leave out differing tensors that are not factorised (norms, biases) instead of saving them in full; embeddings follow --embeddings')
    .option('--dtype <dtype>', 'dtype of the written tensors (default float32)', dtypeOption)
    .option('--overwrite', 'replace the output folder if it exists')
    .option('--json', 'print the result as JSON')
    .option('-q, --quiet', 'print only errors and the output path')
    .action(
      async (
        base: string,
        finetuned: string,
        outDir: string,
        opts: {
          rank: number;
          randomizedAbove?: number;
          powerIters?: number;
          oversample?: number;
          seed?: number;
          embeddings?: string;
          saveFull: boolean;
          dtype?: FloatDType;
          overwrite?: boolean;
          json?: boolean;
          quiet?: boolean;
        },
      ) => {
        const progress = bar('extracting', opts.quiet || opts.json);
        let r;
        try {
          r = await extractLora(base, finetuned, outDir, {
            rank: opts.rank,
            ...(opts.randomizedAbove !== undefined ? { randomizedAbove: opts.randomizedAbove } : {}),
            ...(opts.powerIters !== undefined ? { powerIters: opts.powerIters } : {}),
            ...(opts.oversample !== undefined ? { oversample: opts.oversample } : {}),
            ...(opts.seed !== undefined ? { seed: opts.seed } : {}),
            ...(opts.embeddings !== undefined ? { embeddings: opts.embeddings as 'lora' | 'full' | 'skip' } : {}),
            saveFull: opts.saveFull,
            ...(opts.dtype !== undefined ? { dtype: opts.dtype } : {}),
            overwrite: !!opts.overwrite,
            onProgress: (p) => progress.update(p.done, p.total, p.tensor.name),
            onWarning: (m) => {
              if (!opts.quiet && !opts.json) process.stderr.write(`amalgam: warning: ${m}\n`);
            },
          });
        } finally {
          progress.stop();
        }
        if (opts.json) {
          process.stdout.write(JSON.stringify(r, null, 2) + '\n');
          return;
        }
        if (opts.quiet) {
          process.stdout.write(r.dir + '\n');
          return;
        }
        const factored = r.tensors.filter((t) => t.energy !== undefined);
        const identical = r.tensors.filter((t) => t.kind === 'identical').length;
        const mean = factored.reduce((s, t) => s + t.energy!, 0) / Math.max(1, factored.length);
        process.stdout.write(
          [
            `Extracted a rank-${r.rank} LoRA adapter from ${finetuned} (base ${base}) -> ${r.dir}`,
            ...(r.loraModules > 0 && r.rank < r.requestedRank
              ? [`  rank:    --rank ${r.requestedRank} clamped to ${r.rank}, the largest min(rows, cols) of the factorised matrices`]
              : []),
            `  tensors: ${r.loraModules} factorised, ${r.fullTensors} saved in full, ${identical} identical (skipped)`,
            `  energy captured: mean ${pct(mean)} over ${factored.length} matrices`,
            extractTable(r.tensors),
          ].join('\n') + '\n',
        );
      },
    );
}
