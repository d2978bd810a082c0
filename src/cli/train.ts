import type { Command } from 'commander';
import { AmalgamError } from '../errors.js';
import { SCHEDULE_KINDS, type ScheduleKind } from '../train/schedule.js';
import { runTraining, type EvalInfo, type RunTrainingOptions, type RunTrainingResult } from '../train/trainer.js';
import { datasetOptions, parseDtypeOption, parseInteger, parseLoraSpec, parseNumber, parseTask, type DatasetCliOptions } from '../train/options.js';
import { addDatasetOptions } from './eval.js';

interface TrainCliOptions extends DatasetCliOptions {
  data: string;
  out: string;
  task: string;
  lora?: string | true;
  merge?: boolean;
  steps: number;
  batchSize: number;
  microBatch?: number;
  seqLen: number;
  packing: boolean;
  maxLength?: number;
  truncationSide?: string;
  lr?: number;
  schedule: string;
  warmup: number;
  minLrRatio?: number;
  weightDecay: number;
  clip: number;
  seed: number;
  evalData?: string;
  holdout?: number;
  evalEvery: number;
  dtype: string;
  overwrite?: boolean;
  json?: boolean;
  quiet?: boolean;
}

function describeEval(e: EvalInfo): string {
  if (e.nll !== undefined) return `NLL ${e.nll.toFixed(4)} (perplexity ${e.perplexity!.toFixed(2)}, ${e.tokens} tokens)`;
  return `accuracy ${(100 * e.accuracy!).toFixed(2)}% (${e.examples} examples, loss ${e.loss!.toFixed(4)})`;
}

export function formatTrainReport(r: RunTrainingResult): string {
  const lines = [
    `Trained ${r.steps} steps on ${r.trainExamples.toLocaleString('en-US')} examples in ${r.seconds.toFixed(1)} s (${Math.round(r.tokensPerSecond).toLocaleString('en-US')} tokens/s, ${r.trainableParameters.toLocaleString('en-US')} trainable values)`,
    `  loss: first step ${r.losses[0]!.toFixed(4)}, last step ${r.losses[r.losses.length - 1]!.toFixed(4)}`,
  ];
  if (r.evalBefore && r.evalAfter) {
    lines.push(`  held-out (${r.evalExamples.toLocaleString('en-US')} examples):`);
    lines.push(`    before: ${describeEval({ step: 0, ...r.evalBefore })}`);
    lines.push(`    after:  ${describeEval({ step: r.steps, ...r.evalAfter })}`);
  } else if (r.evalAfter) {
    lines.push(`  held-out: ${describeEval({ step: r.steps, ...r.evalAfter })}`);
  }
  lines.push(`  wrote ${r.output === 'adapter' ? 'PEFT adapter' : 'model'} ${r.outDir}`);
  return lines.join('\n');
}

export function registerTrain(program: Command): void {
  const cmd = program
    .command('train')
    .description(
      'Fine-tune a model on the CPU: causal language modelling (lm) or sequence classification with a score head (classify), full or LoRA. Writes a Hugging Face model folder, or a PEFT adapter folder with --lora.',
    )
    .argument('<model>', 'Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or a GGUF / llama2.c file (converted on the fly)')
    .requiredOption('--data <file>', 'training data: .txt (one example per non-empty line), .jsonl or .tsv')
    .requiredOption('--out <dir>', 'output folder (must not exist or be empty unless --overwrite)')
    .option('--task <task>', 'lm or classify', 'lm')
    .option('--lora [spec]', 'train LoRA adapters instead of all weights: r=8,alpha=16,targets=q_proj,v_proj (the default); also freeze=A|B, rslora=true')
    .option('--merge', 'with --lora: write a full model with the adapters merged instead of an adapter folder')
    .option('--steps <n>', 'optimizer steps', (v) => parseInteger(v, '--steps', 1), 300)
    .option('--batch-size <n>', 'sequences per optimizer step', (v) => parseInteger(v, '--batch-size', 1), 16)
    .option('--micro-batch <n>', 'sequences per forward/backward; gradients of batch-size / micro-batch passes are accumulated', (v) => parseInteger(v, '--micro-batch', 1))
    .option('--seq-len <n>', 'lm: tokens per training window', (v) => parseInteger(v, '--seq-len', 2), 128)
    .option('--no-packing', 'lm: pad each example (cut to --seq-len) instead of packing examples into windows')
    .option('--max-length <n>', 'classify: tokens per example, BOS included (default 64)', (v) => parseInteger(v, '--max-length', 2))
    .option('--truncation-side <side>', 'classify: cut long examples on the right (keep the start, default) or the left (keep BOS + the end)')
    .option('--lr <rate>', 'peak learning rate (default 1e-3 full, 1e-2 LoRA)', (v) => parseNumber(v, '--lr', 0))
    .option('--schedule <kind>', `learning-rate schedule: ${SCHEDULE_KINDS.join(', ')}`, 'cosine')
    .option('--warmup <n>', 'warm-up steps, or a fraction of the steps when below 1', (v) => parseNumber(v, '--warmup', 0), 0.06)
    .option('--min-lr-ratio <f>', 'final learning rate as a fraction of the peak (default 0.1 for cosine, 0 otherwise)', (v) => parseNumber(v, '--min-lr-ratio', 0, 1))
    .option('--weight-decay <w>', 'AdamW decoupled weight decay on matrices', (v) => parseNumber(v, '--weight-decay', 0), 0)
    .option('--clip <norm>', 'clip gradients to this global norm (0: off)', (v) => parseNumber(v, '--clip', 0), 1)
    .option('--seed <n>', 'seed of data order and initialisation', (v) => parseInteger(v, '--seed', 0), 0)
    .option('--eval-data <file>', 'held-out data to evaluate before and after training')
    .option('--holdout <fraction>', 'without --eval-data: hold out this last fraction of --data', (v) => parseNumber(v, '--holdout', 0, 0.99))
    .option('--eval-every <n>', 'also evaluate every n steps', (v) => parseInteger(v, '--eval-every', 0), 0)
    .option('--dtype <dtype>', 'data type of the written weights: f32, bf16 or f16', 'f32')
    .option('--overwrite', 'replace the output folder if it exists')
    .option('--json', 'print the result as one JSON object')
    .option('-q, --quiet', 'no progress bar or evaluation lines');
  addDatasetOptions(cmd);
  cmd.action(async (modelDir: string, o: TrainCliOptions) => {
    if (!SCHEDULE_KINDS.includes(o.schedule as ScheduleKind)) {
      throw new AmalgamError('E_USAGE', `--schedule must be one of ${SCHEDULE_KINDS.join(', ')}, got "${o.schedule}"`);
    }
    const side = o.truncationSide;
    if (side !== undefined && side !== 'left' && side !== 'right') throw new AmalgamError('E_USAGE', `--truncation-side must be left or right, got "${side}"`);
    if (o.merge && o.lora === undefined) throw new AmalgamError('E_USAGE', '--merge needs --lora');
    const task = parseTask(o.task);
    const tty = process.stderr.isTTY === true;
    const opts: RunTrainingOptions = {
      task,
      steps: o.steps,
      batchSize: o.batchSize,
      microBatch: o.microBatch,
      seqLen: o.seqLen,
      packing: o.packing,
      maxLength: o.maxLength,
      truncationSide: side,
      lr: o.lr,
      schedule: o.schedule as ScheduleKind,
      warmup: o.warmup,
      minLrRatio: o.minLrRatio,
      weightDecay: o.weightDecay,
      clip: o.clip,
      seed: o.seed,
      lora: o.lora !== undefined ? parseLoraSpec(o.lora) : undefined,
      merge: o.merge,
      evalData: o.evalData,
      holdout: o.holdout,
      evalEvery: o.evalEvery,
      dtype: parseDtypeOption(o.dtype),
      overwrite: o.overwrite,
      dataset: datasetOptions(o),
      // With --json the warnings are part of the printed result.
      onWarning: o.json ? undefined : (m) => process.stderr.write(`amalgam: warning: ${m}\n`),
      progress: !o.quiet && tty,
      onEval: o.quiet
        ? undefined
        : (e) => {
            const line = `step ${e.step}: held-out ${describeEval(e)}`;
            // On a TTY the bar owns the current line; start a fresh one.
            process.stderr.write(tty && e.step > 0 && e.step < o.steps ? `\n${line}\n` : `${line}\n`);
          },
      onStep:
        o.quiet || tty
          ? undefined
          : (s) => {
              const every = Math.max(1, Math.round(s.steps / 10));
              if (s.step % every === 0 || s.step === s.steps) {
                process.stderr.write(`step ${s.step}/${s.steps}: loss ${s.loss.toFixed(4)}, lr ${s.lr.toExponential(2)}, ${Math.round(s.tokensPerSecond)} tokens/s\n`);
              }
            },
    };
    const r = await runTraining(modelDir, o.data, o.out, opts);
    if (o.json) {
      const { head: _head, ...rest } = r;
      void _head;
      process.stdout.write(JSON.stringify(rest) + '\n');
    } else {
      process.stdout.write(formatTrainReport(r) + '\n');
    }
  });
}
