/**
 * Training on the CPU with stories260K (converted from the GGUF fixture), the acceptance recipes:
 *
 *   lm-full   full fine-tuning on the first 9/10 of the lines of Tiny Shakespeare, 300 steps of
 *             16 windows of 128 tokens, AdamW lr 1e-3, cosine to 10 %, 6 % warm-up, clip 1;
 *             mean NLL per predicted token on the last 1/10 (each non-empty line BOS + text)
 *             must fall by ≥ 40 %
 *   lm-lora   the same with LoRA r = 8, α = 16 on q_proj, v_proj, lr 1e-2; ≥ 30 %
 *   domain    3-class domain identification (TinyStories paragraph / Shakespeare passage /
 *             GSM8K question; 3,000 training and 450 balanced held-out examples from disjoint
 *             parts of the files), LoRA r = 8 on q, v plus the score head, 250 steps of 32,
 *             lr 1e-2 with 6 % warm-up then linear decay, 64 tokens; ≥ 90 % accuracy. The
 *             linear probe (frozen base, head only, same recipe) is reported for comparison.
 *   sst2      the same recipe on SST-2 train, scored on the 872 dev sentences
 *
 *   npm run bench -- finetune [--only lm-full,lm-lora,domain,sst2] [--steps N] [--seed S]
 *                          [--repeat] [--json]
 *
 * --repeat runs each recipe twice and checks that the trained weights are bitwise identical.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { convertToHf } from '../src/convert/to-hf.js';
import { encodeExamples, type EncodedExample } from '../src/data/batching.js';
import { parseTxt, readDataset } from '../src/data/datasets.js';
import { buildDomainTask, readDomainSources } from '../src/data/domain.js';
import { loadTokenizer, type TextTokenizer } from '../src/data/tokenizer.js';
import { loadModel } from '../src/train/checkpoint.js';
import { trainModel, type LoraSpec, type TrainOptions, type TrainResult } from '../src/train/trainer.js';

const USAGE = `usage: npm run bench -- finetune [options]

  --only LIST   recipes to run, comma-separated: lm-full, lm-lora, domain, sst2 (default: all)
  --steps N     override the number of steps of every recipe (the bars assume the defaults)
  --seed S      seed (default 0)
  --repeat      run each recipe twice and check the weights are bitwise identical
  --json        print one JSON object per recipe`;

const RECIPES = ['lm-full', 'lm-lora', 'domain', 'sst2'] as const;
type Recipe = (typeof RECIPES)[number];

const LORA: LoraSpec = { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'] };

function fixturesDir(): string {
  const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..');
  return resolve(process.env.AMALGAM_FIXTURES ?? join(repo, '..', 'shared', 'fixtures'));
}

interface RecipeReport {
  recipe: Recipe;
  steps: number;
  seconds: number;
  tokensPerSecond: number;
  trainExamples: number;
  evalExamples: number;
  before: number;
  after: number;
  /** LM: relative NLL drop in %; classification: accuracy in %. */
  figure: number;
  bar: number;
  pass: boolean;
  probeAccuracy?: number;
  identicalOnRepeat?: boolean;
  weightsSha256: string;
}

async function trainOnce(modelDir: string, train: EncodedExample[], evalSet: EncodedExample[], opts: TrainOptions, numLabels?: number): Promise<{ r: TrainResult; sha: string }> {
  const { model } = await loadModel(modelDir);
  try {
    const r = await trainModel(model, { train, eval: evalSet, numLabels }, opts);
    const h = createHash('sha256');
    for (const p of model.parameters()) h.update(new Uint8Array(p.data.buffer, p.data.byteOffset, p.data.byteLength));
    if (r.head) h.update(new Uint8Array(r.head.score.weight.data.buffer));
    return { r, sha: h.digest('hex') };
  } finally {
    model.dispose();
  }
}

async function lmData(tok: TextTokenizer, fx: string): Promise<{ train: EncodedExample[]; evalSet: EncodedExample[] }> {
  const lines = (await readFile(join(fx, 'datasets/tinyshakespeare/input.txt'), 'utf8')).split('\n');
  const cut = Math.floor(lines.length * 0.9);
  return {
    train: encodeExamples(tok, parseTxt(lines.slice(0, cut).join('\n')).examples),
    evalSet: encodeExamples(tok, parseTxt(lines.slice(cut).join('\n')).examples),
  };
}

async function classData(recipe: 'domain' | 'sst2', tok: TextTokenizer, fx: string, seed: number): Promise<{ train: EncodedExample[]; evalSet: EncodedExample[]; numLabels: number }> {
  if (recipe === 'domain') {
    const src = await readDomainSources({
      tinystories: join(fx, 'datasets/tinystories/val.txt'),
      shakespeare: join(fx, 'datasets/tinyshakespeare/input.txt'),
      gsm8kTrain: join(fx, 'datasets/gsm8k/train.jsonl'),
      gsm8kTest: join(fx, 'datasets/gsm8k/test.jsonl'),
    });
    const task = buildDomainTask(src, { seed });
    return { train: encodeExamples(tok, task.train, { maxLength: 64 }), evalSet: encodeExamples(tok, task.eval, { maxLength: 64 }), numLabels: 3 };
  }
  const train = await readDataset(join(fx, 'datasets/sst2/train.tsv'), { requireLabels: true });
  const dev = await readDataset(join(fx, 'datasets/sst2/dev.tsv'), { requireLabels: true });
  return { train: encodeExamples(tok, train.examples, { maxLength: 64 }), evalSet: encodeExamples(tok, dev.examples, { maxLength: 64 }), numLabels: 2 };
}

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      only: { type: 'string' },
      steps: { type: 'string' },
      seed: { type: 'string', default: '0' },
      repeat: { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: false,
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const only = typeof values.only === 'string' ? values.only.split(',').map((s) => s.trim()) : [...RECIPES];
  for (const r of only) if (!RECIPES.includes(r as Recipe)) throw new Error(`unknown recipe "${r}" (known: ${RECIPES.join(', ')})`);
  const seed = Number(values.seed);
  const stepsOverride = typeof values.steps === 'string' ? Number(values.steps) : undefined;
  const fx = fixturesDir();
  const gguf = join(fx, 'models/stories260K/stories260K.gguf');
  if (!existsSync(gguf)) {
    console.error(`train: fixtures not found under ${fx} (set AMALGAM_FIXTURES); skipped`);
    return;
  }
  const work = await mkdtemp(join(tmpdir(), 'amalgam-bench-train-'));
  try {
    const modelDir = join(work, 'stories260K');
    await convertToHf(gguf, modelDir);
    const tok = await loadTokenizer(modelDir);
    if (!values.json) console.log(`stories260K on ${availableParallelism()} cores; seed ${seed}`);
    for (const recipe of only as Recipe[]) {
      const isLm = recipe === 'lm-full' || recipe === 'lm-lora';
      const data = isLm ? { ...(await lmData(tok, fx)), numLabels: undefined } : await classData(recipe, tok, fx, seed);
      const opts: TrainOptions = isLm
        ? { task: 'lm', steps: 300, batchSize: 16, seqLen: 128, lr: recipe === 'lm-lora' ? 1e-2 : 1e-3, schedule: 'cosine', warmup: 0.06, minLrRatio: 0.1, clip: 1, seed, lora: recipe === 'lm-lora' ? LORA : undefined, evalBatchSize: 32, progress: 'auto' }
        : { task: 'classify', steps: 250, batchSize: 32, lr: 1e-2, schedule: 'linear', warmup: 0.06, clip: 1, seed, lora: LORA, evalBatchSize: 32, progress: 'auto' };
      if (stepsOverride !== undefined) opts.steps = stepsOverride;
      const first = await trainOnce(modelDir, data.train, data.evalSet, opts, data.numLabels);
      const r = first.r;
      let identicalOnRepeat: boolean | undefined;
      if (values.repeat) identicalOnRepeat = (await trainOnce(modelDir, data.train, data.evalSet, opts, data.numLabels)).sha === first.sha;
      let probeAccuracy: number | undefined;
      if (recipe === 'domain' || recipe === 'sst2') {
        const probe = await trainOnce(modelDir, data.train, data.evalSet, { ...opts, lora: undefined, trainBase: false, skipInitialEval: true, progress: false }, data.numLabels);
        probeAccuracy = probe.r.evalAfter!.accuracy! * 100;
      }
      const before = isLm ? r.evalBefore!.nll! : r.evalBefore!.accuracy! * 100;
      const after = isLm ? r.evalAfter!.nll! : r.evalAfter!.accuracy! * 100;
      const figure = isLm ? 100 * (1 - after / before) : after;
      const bar = recipe === 'lm-full' ? 40 : recipe === 'lm-lora' ? 30 : recipe === 'domain' ? 90 : 0;
      const report: RecipeReport = {
        recipe,
        steps: r.steps,
        seconds: r.seconds,
        tokensPerSecond: r.tokensPerSecond,
        trainExamples: data.train.length,
        evalExamples: data.evalSet.length,
        before,
        after,
        figure,
        bar,
        pass: figure >= bar,
        probeAccuracy,
        identicalOnRepeat,
        weightsSha256: first.sha,
      };
      if (values.json) console.log(JSON.stringify(report));
      else {
        const what = isLm
          ? `held-out NLL ${before.toFixed(4)} -> ${after.toFixed(4)} nats/token: -${figure.toFixed(1)}% (bar ${bar}%)`
          : `held-out accuracy ${after.toFixed(1)}% (${data.evalSet.length} examples${bar ? `, bar ${bar}%` : ''}; linear probe ${probeAccuracy!.toFixed(1)}%)`;
        console.log(
          `${recipe.padEnd(8)} ${what} ${bar ? (report.pass ? 'PASS' : 'FAIL') : ''}\n` +
            `         ${r.steps} steps in ${r.seconds.toFixed(1)} s, ${Math.round(r.tokensPerSecond).toLocaleString('en-US')} tokens/s` +
            (identicalOnRepeat === undefined ? '' : `; repeat ${identicalOnRepeat ? 'bitwise identical' : 'DIFFERS'}`),
        );
      }
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
