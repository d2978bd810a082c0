import type { Command } from 'commander';
import { AmalgamError } from '../errors.js';
import { evaluateFile, formatEvalReport } from '../train/evaluate.js';
import { datasetOptions, parseInteger, parseTask, type DatasetCliOptions } from '../train/options.js';

/** The dataset-reading options shared by `eval` and `train`. */
export function addDatasetOptions(cmd: Command): Command {
  return cmd
    .option('--text-field <fields>', '.jsonl: text field(s), comma-separated and joined by newlines (default: text); .tsv: column names or 0-based indices')
    .option('--label-field <field>', 'label field (.jsonl) or column (.tsv); default: label, or the last column of a header-less .tsv')
    .option('--labels <names>', 'class names in label order, comma-separated (string labels are looked up here)')
    .option('--txt-mode <mode>', '.txt: one example per non-empty line (lines, default) or per blank-line-separated block (blocks)')
    .option('--header', '.tsv: the first row is a header (default: detected)')
    .option('--no-header', '.tsv: the first row is data');
}

interface EvalCliOptions extends DatasetCliOptions {
  data: string;
  task: string;
  maxLength?: number;
  batchSize?: number;
  adapter?: string;
  truncationSide?: string;
  json?: boolean;
}

export function registerEval(program: Command): void {
  const cmd = program
    .command('eval')
    .description('Evaluate a model: mean negative log-likelihood per predicted token and perplexity (lm), or accuracy of its classification head (classify).')
    .argument('<model>', 'Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or a GGUF / llama2.c file (converted on the fly)')
    .requiredOption('--data <file>', 'dataset: .txt (one example per non-empty line, each BOS + text), .jsonl or .tsv')
    .option('--task <task>', 'lm or classify', 'lm')
    .option('--max-length <n>', 'keep at most n tokens per example, BOS included (default: max_position_embeddings for lm, 64 for classify)', (v) => parseInteger(v, '--max-length', 2))
    .option('--truncation-side <side>', 'classify: cut long examples on the right (keep the start, default) or the left (keep BOS + the end)')
    .option('--batch-size <n>', 'sequences per forward pass (default 16, fewer for long sequences with a large vocabulary)', (v) => parseInteger(v, '--batch-size', 1))
    .option('--adapter <dir>', 'apply a PEFT LoRA adapter folder (and its score head) to the model')
    .option('--json', 'print one JSON object');
  addDatasetOptions(cmd);
  cmd.action(async (modelDir: string, o: EvalCliOptions) => {
    const side = o.truncationSide;
    if (side !== undefined && side !== 'left' && side !== 'right') throw new AmalgamError('E_USAGE', `--truncation-side must be left or right, got "${side}"`);
    const report = await evaluateFile(modelDir, o.data, {
      task: parseTask(o.task),
      maxLength: o.maxLength,
      batchSize: o.batchSize,
      adapter: o.adapter,
      truncationSide: side,
      dataset: datasetOptions(o),
      onWarning: (m) => process.stderr.write(`amalgam: warning: ${m}\n`),
    });
    process.stdout.write((o.json ? JSON.stringify(report) : formatEvalReport(report)) + '\n');
  });
}
