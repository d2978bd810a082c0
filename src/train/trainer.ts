/**
 * Training loop for causal language modelling and sequence classification, full fine-tuning or
 * LoRA, on CPU:
 *
 *   for each step: zero grads; for each micro-batch: forward, summed loss, backward (gradients
 *   accumulate); scale by 1 / (tokens or examples of the whole batch); clip to the global norm;
 *   AdamW at the scheduled learning rate.
 *
 * Everything random (data order, LoRA and head initialisation) is drawn from the seed, and the
 * compute backends give the same bits whatever the thread count, so a run is reproducible.
 *
 * `trainModel` works on a loaded model and encoded examples; `runTraining` does the whole job
 * from a model folder and a dataset file to an output folder (the `amalgam train` command).
 */
import { resolve } from 'node:path';
import { SingleBar } from 'cli-progress';
import { AmalgamError } from '../errors.js';
import { classificationLoss } from '../nn/losses.js';
import { SequenceClassificationHead } from '../nn/heads.js';
import { attachLora, detachLora, type LoraFreeze, type LoraOptions } from '../nn/lora.js';
import type { LlamaModel } from '../nn/model.js';
import type { Parameter } from '../nn/params.js';
import { evaluateAccuracy, evaluateNll } from '../nn/eval.js';
import { BatchSampler, encodeExamples, packWindows, padClassBatch, padLmBatch, windowBatch, type EncodedExample, type LmBatch } from '../data/batching.js';
import { readDataset, splitTail, type ReadDatasetOptions, type TextDataset } from '../data/datasets.js';
import { withModelFolder } from '../convert/model-input.js';
import { checkOutputFolder } from '../io/atomic-dir.js';
import { loadTokenizer, type TextTokenizer } from '../data/tokenizer.js';
import type { FloatDType } from '../tensor/dtype.js';
import { AdamW, clipGradNorm, GradAccumulator, gradNorm, type OptimParam } from './optimizer.js';
import { makeSchedule, type ScheduleKind } from './schedule.js';
import { labelNamesDiffer, loadModel, saveAdapterFolder, saveModelFolder } from './checkpoint.js';

export type TrainTask = 'lm' | 'classify';

export interface LoraSpec {
  /** Rank r. */
  r: number;
  /** α (scaling α/r). */
  alpha: number;
  /** Module names, PEFT `target_modules` style (e.g. ['q_proj', 'v_proj']). */
  targets: string[];
  /** Keep A or B frozen (default: train both). */
  freeze?: LoraFreeze;
  rslora?: boolean;
  /** Overwrites the initial A and B of each module after PEFT's default initialisation. */
  init?: LoraOptions['init'];
}

export interface TrainOptions {
  task?: TrainTask;
  /** Optimizer steps. */
  steps: number;
  /** Sequences per optimizer step (default 16). */
  batchSize?: number;
  /** Sequences per forward/backward (default: batchSize); batchSize must be a multiple. */
  microBatch?: number;
  /** LM: window length with packing, longest sequence without (default 128). */
  seqLen?: number;
  /**
   * LM: pack the sequences end to end into windows of seqLen tokens (default true), or pad
   * each sequence (truncated to seqLen) with a mask.
   */
  packing?: boolean;
  /** Peak learning rate (default 1e-3 for full fine-tuning, 1e-2 for LoRA). */
  lr?: number;
  /** Default 'cosine'. */
  schedule?: ScheduleKind;
  /** Warm-up steps, or a fraction of the steps when below 1 (default 0.06). */
  warmup?: number;
  /** Final learning rate as a fraction of the peak (default 0.1 for cosine, 0 otherwise). */
  minLrRatio?: number;
  /** Decoupled weight decay on matrices (default 0); norms, biases and 1-D tensors are never decayed. */
  weightDecay?: number;
  betas?: [number, number];
  eps?: number;
  /** Clip gradients to this global norm (default 1; 0 disables). */
  clip?: number;
  lora?: LoraSpec;
  /**
   * Without LoRA: train the model's own parameters (default true). False freezes them, so that
   * classification trains the head alone (a linear probe).
   */
  trainBase?: boolean;
  /** Seed of data order and initialisation (default 0). */
  seed?: number;
  /** Evaluate on the held-out data every this many steps (default 0: before and after only). */
  evalEvery?: number;
  /** Sequences per evaluation forward (default 16). */
  evalBatchSize?: number;
  /** Skip the evaluation before training. */
  skipInitialEval?: boolean;
  /** Show a progress bar on stderr: true, false, or 'auto' (default: only when stderr is a TTY). */
  progress?: boolean | 'auto';
  onStep?: (s: StepInfo) => void;
  onEval?: (e: EvalInfo) => void;
}

export interface StepInfo {
  /** 1-based step just completed. */
  step: number;
  steps: number;
  /** Mean loss of the step's batch (per token for LM, per example for classification). */
  loss: number;
  lr: number;
  /** Global gradient norm before clipping. */
  gradNorm: number;
  /** Real (non-padding) input tokens processed so far. */
  tokens: number;
  tokensPerSecond: number;
  elapsedSeconds: number;
}

export interface EvalResult {
  /** LM: mean NLL per predicted token (nats) and perplexity. */
  nll?: number;
  perplexity?: number;
  tokens?: number;
  /** Classification: accuracy and mean cross-entropy. */
  accuracy?: number;
  loss?: number;
  examples: number;
}

export interface EvalInfo extends EvalResult {
  step: number;
}

export interface TrainData {
  /** LM: token sequences (BOS + text); classification: sequences with labels. */
  train: EncodedExample[];
  /** Held-out examples, same kind. */
  eval?: EncodedExample[];
  /** Classification: number of classes. */
  numLabels?: number;
}

export interface TrainResult {
  steps: number;
  /** Loss of every step. */
  losses: number[];
  evalBefore?: EvalResult;
  evalAfter?: EvalResult;
  evals: EvalInfo[];
  /** Real input tokens processed. */
  tokens: number;
  /** Training time (evaluations excluded). */
  seconds: number;
  tokensPerSecond: number;
  /** Trainable values (LoRA factors and head, or the whole model). */
  trainableParameters: number;
  /** The classification head (classification only). */
  head: SequenceClassificationHead | null;
}

const DEFAULTS = { batchSize: 16, seqLen: 128, warmup: 0.06, clip: 1, evalBatchSize: 16 };

function toOptimParam(p: Parameter): OptimParam {
  if (!p.grad) throw new AmalgamError('E_USAGE', 'parameter is not trainable', { key: p.name });
  return {
    name: p.name,
    get data() {
      return p.data;
    },
    get grad() {
      return p.grad!;
    },
    decay: p.shape.length >= 2,
  };
}

/** Evaluate the model on held-out examples (NLL for LM, accuracy with a head). */
export function evaluateHeldOut(model: LlamaModel, task: TrainTask, examples: readonly EncodedExample[], head: SequenceClassificationHead | null, batchSize = 16): EvalResult {
  if (task === 'lm') {
    const r = evaluateNll(model, examples.map((e) => e.ids), { batchSize });
    return { nll: r.meanNll, perplexity: r.perplexity, tokens: r.tokens, examples: r.sequences };
  }
  if (!head) throw new AmalgamError('E_USAGE', 'classification evaluation needs a head');
  const r = evaluateAccuracy(
    model,
    head,
    examples.map((e) => ({ ids: e.ids, label: e.label ?? -1 })),
    { batchSize },
  );
  return { accuracy: r.accuracy, loss: r.meanLoss, examples: r.total };
}

function checkInt(name: string, v: number, min: number): void {
  if (!Number.isSafeInteger(v) || v < min) throw new AmalgamError('E_USAGE', `${name} must be an integer ≥ ${min}, got ${v}`);
}

/** A LoRA spec the model can take: a positive rank and α, and every target naming a linear layer. */
function checkLoraSpec(model: LlamaModel, spec: LoraSpec): void {
  checkInt('LoRA r', spec.r, 1);
  if (!(Number.isFinite(spec.alpha) && spec.alpha > 0)) {
    throw new AmalgamError('E_USAGE', `LoRA alpha must be a positive number, got ${spec.alpha}`, { hint: 'the update is scaled by alpha / r; the default alpha is 2r' });
  }
  const names = model.linearSlots().map((s) => s.name);
  const unmatched = spec.targets.filter((t) => !names.some((n) => n === t || n.endsWith(`.${t}`)));
  if (unmatched.length) {
    const known = [...new Set(names.map((n) => n.slice(n.lastIndexOf('.') + 1)))];
    throw new AmalgamError('E_USAGE', `LoRA target${unmatched.length > 1 ? 's' : ''} ${unmatched.map((t) => `'${t}'`).join(', ')} match${unmatched.length > 1 ? '' : 'es'} no linear layer of the model`, {
      hint: `the model's linear layers: ${known.join(', ')}`,
    });
  }
}

/**
 * Train a loaded model in place. With `lora`, LoRA modules are attached (the base is frozen) and
 * stay attached; for classification a head is created (or `head` is trained further).
 */
export async function trainModel(model: LlamaModel, data: TrainData, opts: TrainOptions, head: SequenceClassificationHead | null = null): Promise<TrainResult> {
  const task = opts.task ?? 'lm';
  const steps = opts.steps;
  const batchSize = opts.batchSize ?? DEFAULTS.batchSize;
  const micro = opts.microBatch ?? batchSize;
  const seqLen = opts.seqLen ?? DEFAULTS.seqLen;
  const seed = opts.seed ?? 0;
  checkInt('steps', steps, 1);
  checkInt('batch size', batchSize, 1);
  checkInt('micro-batch', micro, 1);
  checkInt('sequence length', seqLen, 2);
  if (batchSize % micro !== 0) throw new AmalgamError('E_USAGE', `batch size ${batchSize} is not a multiple of the micro-batch ${micro}`);
  if (data.train.length === 0) throw new AmalgamError('E_USAGE', 'no training examples');
  const be = model.backend;

  // Trainable parameters.
  if (opts.lora) {
    checkLoraSpec(model, opts.lora);
    attachLora(model, { targets: opts.lora.targets, rank: opts.lora.r, alpha: opts.lora.alpha, rslora: opts.lora.rslora, freeze: opts.lora.freeze, seed, init: opts.lora.init });
  } else {
    const trainBase = opts.trainBase ?? true;
    model.setTrainable(() => trainBase);
  }
  if (task === 'classify') {
    const numLabels = data.numLabels ?? data.train.reduce((m, e) => Math.max(m, e.label ?? -1), -1) + 1;
    if (!(numLabels >= 2)) throw new AmalgamError('E_USAGE', `classification needs at least 2 classes, got ${numLabels}`);
    if (head && head.numLabels !== numLabels) head = null;
    head ??= SequenceClassificationHead.random(model.config.hiddenSize, numLabels, seed + 1);
    head.score.weight.setRequiresGrad(true);
  }
  const params = [...model.trainableParameters(), ...(head ? head.parameters() : [])];
  if (params.length === 0) throw new AmalgamError('E_USAGE', 'nothing to train: the model is frozen and there is no LoRA or head');
  const optParams = params.map(toOptimParam);
  const trainableParameters = params.reduce((s, p) => s + p.size, 0);

  // Data.
  let windows: Int32Array[] | null = null;
  let items: EncodedExample[];
  if (task === 'lm' && (opts.packing ?? true)) {
    windows = packWindows(
      data.train.map((e) => e.ids),
      seqLen,
    );
    items = [];
    if (windows.length === 0) throw new AmalgamError('E_USAGE', `the training data holds fewer than ${seqLen + 1} tokens, not one window`);
  } else if (task === 'lm') {
    items = data.train.map((e) => ({ ids: e.ids.subarray(0, seqLen) })).filter((e) => e.ids.length >= 2);
    if (items.length === 0) throw new AmalgamError('E_USAGE', 'no training sequence has two tokens or more');
  } else {
    items = data.train;
    for (const e of items) if (e.label === undefined) throw new AmalgamError('E_USAGE', 'a classification example has no label');
  }
  const sampler = new BatchSampler(windows ? windows.length : items.length, batchSize, { seed });

  const lrDefault = opts.lora ? 1e-2 : 1e-3;
  const kind = opts.schedule ?? 'cosine';
  const schedule = makeSchedule({
    kind,
    lr: opts.lr ?? lrDefault,
    totalSteps: steps,
    warmup: opts.warmup ?? DEFAULTS.warmup,
    minLrRatio: opts.minLrRatio ?? (kind === 'cosine' ? 0.1 : 0),
  });
  const optim = new AdamW(optParams, { betas: opts.betas ?? [0.9, 0.999], eps: opts.eps ?? 1e-8, weightDecay: opts.weightDecay ?? 0 });
  const acc = new GradAccumulator(optParams);
  const clip = opts.clip ?? DEFAULTS.clip;
  const evalBatch = opts.evalBatchSize ?? DEFAULTS.evalBatchSize;
  const evalSet = data.eval && data.eval.length ? data.eval : null;
  const runEval = () => (evalSet ? evaluateHeldOut(model, task, evalSet, head, evalBatch) : undefined);

  const evals: EvalInfo[] = [];
  let evalBefore: EvalResult | undefined;
  if (evalSet && !opts.skipInitialEval) {
    evalBefore = runEval()!;
    evals.push({ step: 0, ...evalBefore });
    opts.onEval?.({ step: 0, ...evalBefore });
  }

  const showBar = opts.progress === 'auto' || opts.progress === undefined ? process.stderr.isTTY === true : opts.progress;
  const bar = showBar
    ? new SingleBar({
        format: `${task === 'lm' ? 'train' : 'train (classify)'} |{bar}| {value}/{total} steps | loss {loss} | {tps} tok/s | ETA {eta_formatted}`,
        barCompleteChar: '█',
        barIncompleteChar: '░',
        hideCursor: true,
        etaBuffer: 20,
        stream: process.stderr,
      })
    : null;
  bar?.start(steps, 0, { loss: '-', tps: '-' });

  const losses: number[] = [];
  let tokens = 0;
  let evalMs = 0;
  const t0 = performance.now();
  const V = model.config.vocabSize;
  try {
    for (let step = 0; step < steps; step++) {
      const lr = schedule(step);
      acc.begin();
      const idx = sampler.next();
      for (let m = 0; m < batchSize; m += micro) {
        const part = idx.slice(m, m + micro);
        if (task === 'lm') {
          const batch: LmBatch = windows
            ? windowBatch(part.map((i) => windows![i]!))
            : padLmBatch(
                part.map((i) => items[i]!.ids),
                0,
              );
          const logits = model.forward(batch.ids, batch.batch, batch.seqLen);
          const loss = be.crossEntropy(logits, batch.targets, logits, batch.batch * batch.seqLen, V, { reduction: 'sum' });
          model.backward(logits);
          acc.add(loss, batch.tokens);
          for (let b = 0; b < batch.batch; b++) tokens += batch.lengths[b]!;
        } else {
          const batch = padClassBatch(
            part.map((i) => items[i]!),
            0,
          );
          const hidden = model.forward(batch.ids, batch.batch, batch.seqLen, { output: 'hidden' });
          const logits = head!.forward(be, hidden, batch.batch, batch.seqLen, batch.lengths);
          const r = classificationLoss(be, logits, batch.labels, batch.batch, head!.numLabels, { dLogits: logits, reduction: 'sum' });
          const dHidden = head!.backward(be, logits);
          if (model.trainableParameters().length) model.backward(dHidden);
          acc.add(r.loss, batch.batch);
          for (let b = 0; b < batch.batch; b++) tokens += batch.lengths[b]!;
        }
      }
      const loss = acc.finish();
      const norm = clip > 0 ? clipGradNorm(optParams, clip) : gradNorm(optParams);
      optim.step(lr);
      losses.push(loss);
      const elapsed = (performance.now() - t0 - evalMs) / 1000;
      const info: StepInfo = { step: step + 1, steps, loss, lr, gradNorm: norm, tokens, tokensPerSecond: tokens / Math.max(elapsed, 1e-9), elapsedSeconds: elapsed };
      bar?.update(step + 1, { loss: loss.toFixed(4), tps: Math.round(info.tokensPerSecond).toLocaleString('en-US') });
      opts.onStep?.(info);
      if (evalSet && opts.evalEvery && (step + 1) % opts.evalEvery === 0 && step + 1 < steps) {
        const te = performance.now();
        const e = { step: step + 1, ...runEval()! };
        evalMs += performance.now() - te;
        evals.push(e);
        opts.onEval?.(e);
      }
      // Let timers (the progress bar, signals) run between steps.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  } finally {
    bar?.stop();
  }
  const seconds = (performance.now() - t0 - evalMs) / 1000;
  let evalAfter: EvalResult | undefined;
  if (evalSet) {
    evalAfter = runEval()!;
    const e = { step: steps, ...evalAfter };
    evals.push(e);
    opts.onEval?.(e);
  }
  // Gradients are no longer needed: release them.
  for (const p of params) p.setRequiresGrad(false);
  return { steps, losses, evalBefore, evalAfter, evals, tokens, seconds, tokensPerSecond: tokens / seconds, trainableParameters, head };
}

// ---------------------------------------------------------------------------------------------
// From files

export interface RunTrainingOptions extends TrainOptions {
  /** How to read the dataset (fields, columns, labels). */
  dataset?: ReadDatasetOptions;
  /** A held-out dataset file (same reading options). */
  evalData?: string;
  /** Without evalData: hold out this last fraction of the training file (default 0). */
  holdout?: number;
  /** Classification: longest sequence, BOS included (default 64); LM without packing likewise. */
  maxLength?: number;
  /** Classification truncation side (default 'right': keep the first tokens). */
  truncationSide?: 'left' | 'right';
  /** Output data type (default F32). */
  dtype?: FloatDType;
  /** With LoRA: write a full checkpoint with the adapters merged instead of an adapter folder. */
  merge?: boolean;
  overwrite?: boolean;
  /** Called with each warning (they are also returned in `warnings`). */
  onWarning?: (message: string) => void;
}

export interface RunTrainingResult extends TrainResult {
  outDir: string;
  /** 'model' (HF checkpoint) or 'adapter' (PEFT folder). */
  output: 'model' | 'adapter';
  trainExamples: number;
  evalExamples: number;
  labelNames?: string[];
  /** Options or data that had no effect, or were read in a way worth knowing. */
  warnings: string[];
}

function encodeFor(task: TrainTask, tok: TextTokenizer, ds: TextDataset, opts: RunTrainingOptions): EncodedExample[] {
  if (task === 'lm') return encodeExamples(tok, ds.examples, { bos: true, maxLength: opts.maxLength });
  return encodeExamples(tok, ds.examples, { bos: true, maxLength: opts.maxLength ?? 64, truncationSide: opts.truncationSide });
}

/**
 * Train from a model (a Hugging Face folder, or a GGUF / llama2.c file, converted on the fly) and
 * a dataset file; write a model folder or a PEFT adapter to outDir.
 */
export async function runTraining(model: string, dataPath: string, outDir: string, opts: RunTrainingOptions): Promise<RunTrainingResult> {
  const warnings: string[] = [];
  const warn = (m: string) => {
    warnings.push(m);
    opts.onWarning?.(m);
  };
  checkHeldOutOptions(opts, warn);
  // Fail now, not after the training, when the output cannot be written.
  await checkOutputFolder(outDir, { overwrite: opts.overwrite, inputs: [model, dataPath, ...(opts.evalData ? [opts.evalData] : [])] });
  // The adapter names the model as given (absolute): a GGUF / llama2.c file is converted into a
  // temporary folder that is gone afterwards.
  return withModelFolder(model, (dir) => trainFromFolder(dir, dataPath, outDir, opts, resolve(model), warnings, warn));
}

/** Held-out options that contradict each other or would do nothing. */
function checkHeldOutOptions(opts: RunTrainingOptions, warn: (m: string) => void): void {
  if (opts.evalData && opts.holdout) {
    throw new AmalgamError('E_USAGE', `--holdout ${opts.holdout} and --eval-data ${opts.evalData} both choose the held-out data`, {
      hint: 'give --eval-data to evaluate on another file, or --holdout to hold out the end of --data, not both',
    });
  }
  if (opts.evalEvery) {
    if (!opts.evalData && !opts.holdout) {
      throw new AmalgamError('E_USAGE', `--eval-every ${opts.evalEvery} needs held-out data`, { hint: 'give --eval-data <file> or --holdout <fraction>' });
    }
    if (opts.evalEvery >= opts.steps) {
      warn(`--eval-every ${opts.evalEvery} is not below --steps ${opts.steps}: the held-out data is evaluated only before and after training`);
    }
  }
}

/** The lines with negative (unlabelled) labels, left out of classification. */
function warnNegativeLabels(ds: TextDataset, warn: (m: string) => void): void {
  const lines = ds.negativeLabelLines;
  if (!lines?.length) return;
  const shown = lines.slice(0, 5).join(', ') + (lines.length > 5 ? ', …' : '');
  warn(`${ds.source}: ${lines.length} example${lines.length > 1 ? 's have' : ' has'} a negative label (unlabelled) and ${lines.length > 1 ? 'are' : 'is'} left out (line${lines.length > 1 ? 's' : ''} ${shown})`);
}

async function trainFromFolder(
  modelDir: string,
  dataPath: string,
  outDir: string,
  opts: RunTrainingOptions,
  baseModel: string,
  warnings: string[],
  warn: (m: string) => void,
): Promise<RunTrainingResult> {
  const task = opts.task ?? 'lm';
  const tok = await loadTokenizer(modelDir);
  const readOpts: ReadDatasetOptions = { ...(opts.dataset ?? {}), requireLabels: task === 'classify' };
  const ds = await readDataset(dataPath, readOpts);
  if (task === 'classify') warnNegativeLabels(ds, warn);
  let trainDs = ds;
  let evalDs: TextDataset | undefined;
  if (opts.evalData) {
    evalDs = await readDataset(opts.evalData, { ...readOpts, labelNames: readOpts.labelNames ?? ds.labelNames });
    if (task === 'classify') warnNegativeLabels(evalDs, warn);
  } else if (opts.holdout) {
    const { head, tail } = splitTail(ds.examples, opts.holdout);
    if (tail.length === 0) {
      throw new AmalgamError('E_USAGE', `--holdout ${opts.holdout} of ${ds.examples.length} example${ds.examples.length > 1 ? 's' : ''} holds out none`, {
        file: dataPath,
        hint: `use --holdout ${Math.min(0.99, Math.ceil((0.5 / ds.examples.length) * 1000) / 1000)} or more, or --eval-data <file>`,
      });
    }
    trainDs = { ...ds, examples: head };
    evalDs = { ...ds, examples: tail };
  }
  const numLabels = task === 'classify' ? Math.max(ds.numClasses, evalDs?.numClasses ?? 0) : undefined;
  const train = encodeFor(task, tok, trainDs, opts);
  const evalSet = evalDs ? encodeFor(task, tok, evalDs, opts) : undefined;

  const loaded = await loadModel(modelDir);
  const { model } = loaded;
  try {
    if (task === 'classify' && loaded.head && loaded.head.numLabels === numLabels && ds.labelNames && labelNamesDiffer(ds.labelNames, loaded.labelNames)) {
      const from = opts.dataset?.labelNames ? '--labels' : `the labels of ${dataPath}`;
      warn(
        `${from} number the classes ${ds.labelNames.join(', ')}, but the head of ${loaded.labelNamesFile} was trained with ${loaded.labelNames!.join(', ')}; ` +
          `training goes on with the classes renumbered (give --labels ${loaded.labelNames!.join(',')} to keep them)`,
      );
    }
    const result = await trainModel(model, { train, eval: evalSet, numLabels }, opts, task === 'classify' ? loaded.head : null);
    // The folder's class names only describe a head of the same size.
    const labelNames = result.head ? (ds.labelNames ?? (loaded.labelNames?.length === result.head.numLabels ? loaded.labelNames : undefined)) : undefined;
    let output: 'model' | 'adapter';
    let written: string;
    if (opts.lora && !opts.merge) {
      written = await saveAdapterFolder(model, outDir, { dtype: opts.dtype, overwrite: opts.overwrite, head: result.head, labelNames, baseModel });
      output = 'adapter';
    } else {
      if (opts.lora) detachLora(model, true);
      written = await saveModelFolder(model, modelDir, outDir, { dtype: opts.dtype, overwrite: opts.overwrite, head: result.head, labelNames });
      output = 'model';
    }
    return { ...result, outDir: written, output, trainExamples: train.length, evalExamples: evalSet?.length ?? 0, labelNames, warnings };
  } finally {
    model.dispose();
  }
}
