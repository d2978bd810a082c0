/**
 * Evaluating a model folder (optionally with a LoRA adapter) on a dataset file: mean NLL per
 * predicted token and perplexity for language modelling, accuracy of the classification head.
 */
import { AmalgamError } from '../errors.js';
import { encodeExamples } from '../data/batching.js';
import { labelCounts, readDataset, type ReadDatasetOptions } from '../data/datasets.js';
import { withModelFolder } from '../convert/model-input.js';
import { loadTokenizer } from '../data/tokenizer.js';
import { evaluateAccuracy, evaluateNll } from '../nn/eval.js';
import { labelNamesDiffer, loadModel } from './checkpoint.js';

export interface LmEvalReport {
  task: 'lm';
  model: string;
  data: string;
  /** Mean NLL per predicted token, nats. */
  nll: number;
  perplexity: number;
  tokens: number;
  sequences: number;
}

export interface ClassifyEvalReport {
  task: 'classify';
  model: string;
  data: string;
  accuracy: number;
  correct: number;
  total: number;
  /** Mean cross-entropy. */
  loss: number;
  labels?: string[];
  /** Examples per class in the data. */
  support: number[];
  /** Accuracy per class. */
  perClassAccuracy: number[];
}

export type EvalReport = LmEvalReport | ClassifyEvalReport;

export interface EvaluateFileOptions {
  task?: 'lm' | 'classify';
  maxLength?: number;
  /** Sequences per forward (default 16, fewer for long sequences with a large vocabulary). */
  batchSize?: number;
  adapter?: string;
  truncationSide?: 'left' | 'right';
  dataset?: ReadDatasetOptions;
  onProgress?: (done: number, total: number) => void;
  /** Called with each warning (e.g. `--labels` that contradict the head's recorded class names). */
  onWarning?: (message: string) => void;
}

/**
 * Evaluate a model (a Hugging Face folder, or a GGUF / llama2.c file, converted on the fly) on a
 * dataset file. LM: every example is BOS + text, truncated to
 * maxLength (default: the model's max_position_embeddings); the result is the mean NLL per
 * predicted token. Classify: BOS + text truncated to maxLength (default 64), accuracy of the
 * folder's (or adapter's) score head.
 */
export async function evaluateFile(model: string, dataPath: string, opts: EvaluateFileOptions = {}): Promise<EvalReport> {
  const report = await withModelFolder(model, (dir) => evaluateFolder(dir, dataPath, opts));
  return { ...report, model };
}

async function evaluateFolder(modelDir: string, dataPath: string, opts: EvaluateFileOptions): Promise<EvalReport> {
  const task = opts.task ?? 'lm';
  const tok = await loadTokenizer(modelDir);
  const loaded = await loadModel(modelDir, { adapter: opts.adapter });
  const { model } = loaded;
  try {
    // Default: 16 sequences per forward, fewer when their logits would exceed 2^26 floats.
    const batchFor = (longest: number) => opts.batchSize ?? Math.max(1, Math.min(16, Math.floor(2 ** 26 / (Math.max(1, longest) * model.config.vocabSize))));
    if (task === 'lm') {
      const ds = await readDataset(dataPath, { ...(opts.dataset ?? {}), labelField: null });
      const seqs = encodeExamples(tok, ds.examples, { bos: true, maxLength: opts.maxLength ?? model.config.maxPositions }).map((e) => e.ids);
      const r = evaluateNll(model, seqs, { batchSize: batchFor(seqs.reduce((m, s) => Math.max(m, s.length), 0)), onProgress: opts.onProgress });
      return { task, model: modelDir, data: dataPath, nll: r.meanNll, perplexity: r.perplexity, tokens: r.tokens, sequences: r.sequences };
    }
    const head = loaded.head;
    if (!head) {
      throw new AmalgamError('E_MISSING', 'the model has no classification head (score.weight)', {
        file: modelDir,
        hint: 'use a model written by amalgam train --task classify, or pass a classification adapter with --adapter',
      });
    }
    const recorded = loaded.labelNames;
    const whose = loaded.headFromAdapter ? "the adapter's" : "the model's";
    const given = opts.dataset?.labelNames;
    if (recorded && recorded.length !== head.numLabels && !given) {
      throw new AmalgamError('E_CONFIG', `id2label names ${recorded.length} classes but the score head (score.weight) predicts ${head.numLabels}`, {
        file: loaded.labelNamesFile,
        key: 'id2label',
        hint: 'make id2label name one class per row of score.weight, or give the class names with --labels',
      });
    }
    if (given && labelNamesDiffer(given, recorded)) {
      opts.onWarning?.(
        `--labels ${given.join(',')} differ from the class names recorded with ${whose} head (${recorded!.join(', ')}, in ${loaded.labelNamesFile}); ` +
          'the data is read with --labels, so the classes may be renumbered',
      );
    }
    const labelNames = given ?? recorded;
    const ds = await readDataset(dataPath, {
      ...(opts.dataset ?? {}),
      requireLabels: true,
      labelNames,
      labelNamesOf: given ? `the ${given.length} names of --labels` : `${whose} ${head.numLabels}-class head`,
    });
    const neg = ds.negativeLabelLines;
    if (neg?.length) {
      opts.onWarning?.(`${dataPath}: ${neg.length} example${neg.length > 1 ? 's have' : ' has'} a negative label (unlabelled) and ${neg.length > 1 ? 'are' : 'is'} left out`);
    }
    if (!labelNames && ds.labelNames) {
      opts.onWarning?.(
        `${whose} head records no class names (id2label): the labels of ${dataPath} are numbered in sorted order (${ds.labelNames.join(', ')}), which may not be the order it was trained with; give the class names in order with --labels`,
      );
    }
    if (ds.numClasses > head.numLabels) {
      const max = ds.examples.reduce((m, e) => Math.max(m, e.label ?? -1), -1);
      throw new AmalgamError('E_USAGE', ds.labelNames ? `the data has ${ds.numClasses} classes but the head predicts ${head.numLabels}` : `label ${max} is out of range for ${whose} ${head.numLabels}-class head (class indices 0 to ${head.numLabels - 1})`, {
        file: dataPath,
      });
    }
    const examples = encodeExamples(tok, ds.examples, { bos: true, maxLength: opts.maxLength ?? 64, truncationSide: opts.truncationSide });
    const r = evaluateAccuracy(
      model,
      head,
      examples.map((e) => ({ ids: e.ids, label: e.label! })),
      { batchSize: batchFor(examples.reduce((m, e) => Math.max(m, e.ids.length), 0)) },
    );
    const support = labelCounts(ds.examples, head.numLabels);
    const hits = new Array<number>(head.numLabels).fill(0);
    examples.forEach((e, i) => {
      if (r.predictions[i] === e.label) hits[e.label!]!++;
    });
    return {
      task,
      model: modelDir,
      data: dataPath,
      accuracy: r.accuracy,
      correct: r.correct,
      total: r.total,
      loss: r.meanLoss,
      labels: ds.labelNames ?? loaded.labelNames,
      support,
      perClassAccuracy: hits.map((h, c) => (support[c] ? h / support[c]! : NaN)),
    };
  } finally {
    model.dispose();
  }
}

export function formatEvalReport(r: EvalReport): string {
  if (r.task === 'lm') {
    return `NLL ${r.nll.toFixed(4)} nats/token (perplexity ${r.perplexity.toFixed(3)}) over ${r.tokens.toLocaleString('en-US')} predicted tokens in ${r.sequences.toLocaleString('en-US')} sequences`;
  }
  const lines = [`accuracy ${(100 * r.accuracy).toFixed(2)}% (${r.correct}/${r.total}), mean cross-entropy ${r.loss.toFixed(4)}`];
  r.support.forEach((n, c) => {
    const name = r.labels?.[c] ?? String(c);
    lines.push(`  ${name}: ${n ? `${(100 * r.perClassAccuracy[c]!).toFixed(1)}% of ${n}` : 'no examples'}`);
  });
  return lines.join('\n');
}

