/**
 * Learned merging on the three domain experts of shared/fixtures/experts (fine-tunes of
 * stories260K on Tiny Shakespeare, GSM8K and AG News), with the splits and windows of that
 * folder's README (129-token windows of BOS-prefixed, concatenated documents):
 *
 *   linear             uniform soup (1/3 each)
 *   task_arithmetic    weight w for every expert, w chosen on the val split
 *   ties               weight 1, density d, λ chosen on the val split (normalize)
 *   dare_ties          weight 1, density d, λ chosen on the val split (seed 0)
 *   cma-es             task-arithmetic weights per layer group (5 layers + embedding/norm/head,
 *                      18 values), CMA-ES from 1/3 with σ₀ 1/6 in [0, 1], 200 fitness
 *                      evaluations of the mean val NLL
 *   adamerging         layer-wise task-vector coefficients from 0.3 in [0, 1], entropy
 *                      minimisation on the unlabelled train windows, Adam lr 1e-3, 4 windows per
 *                      domain per step, 100 steps
 *   dam                per-column coefficients on every linear layer incl. lm_head, tanh, init
 *                      1/3, Σᵢ T²·KL(pᵢ ‖ p_merged) (T = 2) + 0.01 cosine, Adam lr 1e-2, 4 windows
 *                      per domain per step, 400 train windows per domain, 1 epoch (100 steps)
 *
 * Every merge is scored on the test windows (96 per domain): per-domain NLL, mean, KL(p_expert ‖
 * p_merge) on each expert's own domain, TinyStories NLL (96 windows), and compute in
 * forward-equivalent tokens (forward = 1, backward = 2; selection and training only). The table
 * is written as JSON and Markdown to .bench-data/dam/ (or --out).
 *
 *   npm run bench -- dam [--methods a,b] [--evaluations N] [--steps N] [--out DIR] [--json]
 */
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { availableParallelism, cpus } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { AdaMergeModel, trainAdaMerge } from '../src/adamerge/adamerge.js';
import { DamModel } from '../src/dam/model.js';
import { trainDam } from '../src/dam/train.js';
import { loadTokenizer } from '../src/data/tokenizer.js';
import { loadTextSequences, type TextDataSpec } from '../src/evolve/data.js';
import { evolveMerge } from '../src/evolve/evolve.js';
import { scoreDomains, scoreSequences, type EvalSet } from '../src/evolve/fitness.js';
import { GroupedMerge, type EvolveMethod } from '../src/evolve/merge.js';
import { loadMergeModels } from '../src/evolve/models.js';
import { fixed, markdownTable, secondsText, tokensText } from '../src/evolve/report.js';
import type { LlamaModel } from '../src/nn/model.js';

const USAGE = `usage: npm run bench -- dam [options]

  --methods LIST    subset of: linear, task_arithmetic, ties, dare_ties, cma-es, adamerging, dam
  --evaluations N   CMA-ES fitness evaluations (default 200; the bars assume it)
  --steps N         DAM and AdaMerging steps (default 100; the bars assume it)
  --out DIR         results folder (default .bench-data/dam in the repository)
  --json            print the report as one JSON object at the end`;

const METHODS = ['linear', 'task_arithmetic', 'ties', 'dare_ties', 'cma-es', 'adamerging', 'dam'] as const;
type Method = (typeof METHODS)[number];
const CLASSIC: readonly Method[] = ['linear', 'task_arithmetic', 'ties', 'dare_ties'];
const DOMAINS = ['Shakespeare', 'GSM8K', 'AG News'] as const;
const EXPERTS = ['stories260K-shakespeare', 'stories260K-gsm8k', 'stories260K-agnews'];

const TA_GRID = [0.3, 0.35, 0.4, 0.45, 0.5, 0.6];
const SPARSE_GRID = { density: [0.3, 0.5, 0.7], lambda: [0.6, 0.8, 1.0] };

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

function fixturesDir(): string {
  return resolve(process.env.AMALGAM_FIXTURES ?? join(repoRoot, '..', 'shared', 'fixtures'));
}

function usageError(msg: string): Error {
  return Object.assign(new Error(msg), { usage: true });
}

const AG_NEWS_CLEANUP: [string, string][] = [
  ['#39;', "'"],
  ['quot;', '"'],
  ['#36;', '$'],
  ['&lt;', '<'],
  ['&gt;', '>'],
  ['&amp;', '&'],
  ['\\', ' '],
];

/** The README's splits: train (first windows), val (first 32 windows), test (first 96 windows). */
export function expertSplits(fx: string): { train: TextDataSpec[]; val: TextDataSpec[]; test: TextDataSpec[]; stories: TextDataSpec } {
  const d = (p: string) => join(fx, 'datasets', p);
  const sh = { path: d('tinyshakespeare/input.txt'), txtMode: 'blocks' as const };
  const gsm = { textFields: ['question', 'answer'] };
  const ag = { textFields: [0], header: false, replace: AG_NEWS_CLEANUP, collapseWhitespace: true };
  return {
    train: [
      { ...sh, fraction: [0, 0.88], count: 400, name: 'Shakespeare' },
      { path: d('gsm8k/train.jsonl'), ...gsm, rows: [0, -300], count: 400, name: 'GSM8K' },
      { path: d('agnews/dev.tsv'), ...ag, rows: [0, -400], count: 400, name: 'AG News' },
    ],
    val: [
      { ...sh, fraction: [0.88, 0.9], count: 32, name: 'Shakespeare' },
      { path: d('gsm8k/train.jsonl'), ...gsm, rows: [-300, null], count: 32, name: 'GSM8K' },
      { path: d('agnews/dev.tsv'), ...ag, rows: [-400, null], count: 32, name: 'AG News' },
    ],
    test: [
      { ...sh, fraction: [0.9, 1], count: 96, name: 'Shakespeare' },
      { path: d('gsm8k/test.jsonl'), ...gsm, count: 96, name: 'GSM8K' },
      { path: d('agnews/test.tsv'), ...ag, count: 96, name: 'AG News' },
    ],
    stories: { path: d('tinystories/val.txt'), count: 96, name: 'TinyStories' },
  };
}

export interface DamBenchRow {
  method: string;
  /** The setting used (the val-selected grid point, the search or training run). */
  setting: string;
  test: number[];
  testMean: number;
  /** KL(p_expert_i ‖ p_merge) on domain i's test windows. */
  kl: number[];
  tinyStories: number;
  /** Mean val NLL of the chosen setting. */
  valMean: number | null;
  /** Forward-equivalent tokens of selection / search / training. */
  computeTokens: number;
  seconds: number;
  grid?: { setting: string; valMean: number }[];
  extra?: Record<string, unknown>;
}

export interface DamBenchBar {
  name: string;
  value: string;
  pass: boolean;
}

export interface DamBenchReport {
  machine: string;
  rows: DamBenchRow[];
  reference: DamBenchRow[];
  bars: DamBenchBar[];
  totalSeconds: number;
}

function machineLine(): string {
  const c = cpus();
  return `${c[0]?.model ?? 'unknown CPU'}, ${availableParallelism()} cores, Node ${process.version}`;
}

function log(line: string): void {
  process.stderr.write(`${line}\n`);
}

export function formatDamBenchMarkdown(r: DamBenchReport): string {
  const headers = ['method', 'setting', ...DOMAINS, 'mean', ...DOMAINS.map((d) => `KL ${d}`), 'TinyStories', 'val mean', 'compute (fwd tokens)', 'wall'];
  const line = (x: DamBenchRow) => [
    x.method,
    x.setting,
    ...x.test.map((v) => fixed(v)),
    fixed(x.testMean),
    ...x.kl.map((v) => fixed(v)),
    fixed(x.tinyStories),
    x.valMean === null ? '–' : fixed(x.valMean),
    x.computeTokens ? tokensText(x.computeTokens) : '–',
    x.seconds ? secondsText(x.seconds) : '–',
  ];
  const out = [
    '# Learned merging of the three stories260K experts',
    '',
    `Machine: ${r.machine}. Test NLL in nats/token on the README's test windows (96 per domain); KL(p_expert ‖ p_merge) on each expert's own domain; TinyStories NLL on 96 windows; compute in forward-equivalent tokens (forward 1, backward 2) of selection, search or training.`,
    '',
    markdownTable(headers, r.rows.map(line), [0, 1]),
    '',
    'Reference models:',
    '',
    markdownTable(headers, r.reference.map(line), [0, 1]),
    '',
    '## Bars',
    '',
    markdownTable(['bar', 'value', 'result'], r.bars.map((b) => [b.name, b.value, b.pass ? 'PASS' : 'FAIL']), [0, 1]),
    '',
    `Total wall time ${secondsText(r.totalSeconds)}.`,
    '',
  ];
  return out.join('\n');
}

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      methods: { type: 'string' },
      evaluations: { type: 'string', default: '200' },
      steps: { type: 'string', default: '100' },
      out: { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const evaluations = Number(values.evaluations);
  if (!Number.isSafeInteger(evaluations) || evaluations < 1) throw usageError(`--evaluations must be a positive integer, got "${values.evaluations}"`);
  const steps = Number(values.steps);
  if (!Number.isSafeInteger(steps) || steps < 1) throw usageError(`--steps must be a positive integer, got "${values.steps}"`);
  const methods = values.methods === undefined ? [...METHODS] : values.methods.split(',').map((s) => s.trim());
  for (const m of methods) if (!(METHODS as readonly string[]).includes(m)) throw usageError(`unknown method "${m}" (known: ${METHODS.join(', ')})`);
  const want = (m: Method) => methods.includes(m);
  const fullProtocol = evaluations === 200 && steps === 100;

  const fx = fixturesDir();
  const gguf = join(fx, 'models/stories260K/stories260K.gguf');
  const expertDirs = EXPERTS.map((e) => join(fx, 'experts', e));
  if (!existsSync(gguf) || expertDirs.some((d) => !existsSync(join(d, 'model.safetensors')))) {
    console.error(`dam: fixtures not found under ${fx} (set AMALGAM_FIXTURES); skipped`);
    return;
  }
  const tStart = performance.now();
  const splits = expertSplits(fx);
  const tok = await loadTokenizer(expertDirs[0]!);
  const load = async (specs: TextDataSpec[]): Promise<EvalSet[]> => {
    const out: EvalSet[] = [];
    for (const s of specs) out.push({ name: s.name!, sequences: await loadTextSequences(s, tok) });
    return out;
  };
  const val = await load(splits.val);
  const test = await load(splits.test);
  const stories = (await load([splits.stories]))[0]!;
  const train = (await load(splits.train)).map((s) => ({ name: s.name, sequences: s.sequences.map((w) => (w as Int32Array).subarray(0, 128)) }));
  log(`data: train ${train.map((t) => t.sequences.length).join('/')} windows of 128 inputs, val ${val.map((t) => t.sequences.length).join('/')}, test ${test.map((t) => t.sequences.length).join('/')}, TinyStories ${stories.sequences.length} (${((performance.now() - tStart) / 1000).toFixed(1)} s)`);

  const L = await loadMergeModels(gguf, expertDirs, ['shakespeare', 'gsm8k', 'agnews']);
  const valTokens = val.reduce((a, s) => a + s.sequences.reduce((b, q) => b + q.length, 0), 0);
  const rows: DamBenchRow[] = [];
  const reference: DamBenchRow[] = [];

  const scoreTest = (model: LlamaModel, base: Omit<DamBenchRow, 'test' | 'testMean' | 'kl' | 'tinyStories'>): DamBenchRow => {
    const s = scoreDomains(model, test, { batchSize: 16, teachers: L.models });
    const ts = scoreSequences(model, stories.sequences, { batchSize: 16 });
    return { ...base, test: s.perDomain.map((d) => d.nll), testMean: s.meanNll, kl: s.perDomain.map((d) => d.kl!), tinyStories: ts.nll };
  };
  const valMean = (model: LlamaModel) => scoreDomains(model, val, { batchSize: 16 }).meanNll;
  const report = (r: DamBenchRow) => log(`${r.method}: ${r.setting}: test ${r.test.map((v) => v.toFixed(3)).join('/')} mean ${r.testMean.toFixed(3)}, TinyStories ${r.tinyStories.toFixed(3)}${r.valMean !== null ? `, val ${r.valMean.toFixed(3)}` : ''}, ${tokensText(r.computeTokens)} fwd tokens, ${secondsText(r.seconds)}`);

  try {
    reference.push(scoreTest(L.base!, { method: 'base stories260K', setting: '–', valMean: null, computeTokens: 0, seconds: 0 }));
    L.models.forEach((m, i) => reference.push(scoreTest(m, { method: `expert ${DOMAINS[i]}`, setting: '–', valMean: null, computeTokens: 0, seconds: 0 })));
    log(`reference models scored (${((performance.now() - tStart) / 1000).toFixed(1)} s)`);

    const grouped = (method: EvolveMethod, lambda = 1) => new GroupedMerge(L.base, L.models, { method, lambda, backend: L.backend, seed: 0 }, { base: L.baseId!, models: L.ids });

    const classic = async (name: Method, points: { setting: string; method: EvolveMethod; weight: number; density: number; lambda: number }[]) => {
      const t0 = performance.now();
      let best: { p: (typeof points)[number]; v: number } | null = null;
      const grid: { setting: string; valMean: number }[] = [];
      for (const p of points) {
        const g = grouped(p.method, p.lambda);
        try {
          g.apply(g.uniformGenome(p.weight, p.density));
          const v = valMean(g.model);
          grid.push({ setting: p.setting, valMean: v });
          if (!best || v < best.v) best = { p, v };
        } finally {
          g.dispose();
        }
        await new Promise<void>((r) => setImmediate(r));
      }
      const g = grouped(best!.p.method, best!.p.lambda);
      try {
        g.apply(g.uniformGenome(best!.p.weight, best!.p.density));
        const seconds = (performance.now() - t0) / 1000;
        const row = scoreTest(g.model, { method: name, setting: best!.p.setting, valMean: best!.v, computeTokens: points.length * valTokens, seconds, grid });
        rows.push(row);
        report(row);
      } finally {
        g.dispose();
      }
    };

    if (want('linear')) await classic('linear', [{ setting: 'weights 1/3', method: 'linear', weight: 1 / 3, density: 1, lambda: 1 }]);
    if (want('task_arithmetic')) await classic('task_arithmetic', TA_GRID.map((w) => ({ setting: `weight ${w}`, method: 'task_arithmetic' as const, weight: w, density: 1, lambda: 1 })));
    for (const m of ['ties', 'dare_ties'] as const) {
      if (!want(m)) continue;
      const pts = SPARSE_GRID.density.flatMap((d) => SPARSE_GRID.lambda.map((l) => ({ setting: `density ${d}, λ ${l}`, method: m, weight: 1, density: d, lambda: l })));
      await classic(m, pts);
    }

    if (want('cma-es')) {
      const g = grouped('task_arithmetic');
      try {
        log(`cma-es: ${g.dimension} task-arithmetic weights (${g.groups.join(', ')} × 3 experts), ${evaluations} evaluations`);
        const r = await evolveMerge(g, val, {
          evaluations,
          sigma0: 1 / 6,
          seed: 0,
          bounds: { weight: [0, 1] },
          batchSize: 16,
          onEval: (e) => {
            if (e.evaluation % 25 === 0 || e.evaluation === e.evaluations) log(`  evaluation ${e.evaluation}/${e.evaluations}: best val ${e.best.toFixed(4)} (${secondsText(e.elapsedSeconds)})`);
          },
        });
        const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
        const perExpert = L.ids.map((id) => mean(r.parameters.filter((p) => p.model === id).map((p) => p.weight)));
        const row = scoreTest(g.model, {
          method: 'cma-es',
          setting: `TA per layer group, ${r.evaluations} evals (mean weights ${perExpert.map((w) => w.toFixed(2)).join('/')})`,
          valMean: r.fitness,
          computeTokens: r.forwardTokens,
          seconds: r.seconds,
          extra: { parameters: r.parameters, generations: r.generations, popsize: r.popsize, bestHistory: r.bestHistory },
        });
        rows.push(row);
        report(row);
      } finally {
        g.dispose();
      }
    }

    if (want('adamerging')) {
      const am = new AdaMergeModel(L.base!, L.models, { granularity: 'layer', init: 0.3, clamp: [0, 1], backend: L.backend }, L.ids);
      try {
        const r = await trainAdaMerge(am, train, {
          steps,
          batchSize: 4,
          lr: 1e-3,
          seed: 0,
          onStep: (s) => {
            if (s.step % 25 === 0 || s.step === s.steps) log(`  adamerging step ${s.step}/${s.steps}: entropy ${s.perSource.map((v) => v.toFixed(3)).join('/')}, mean λ ${s.meanLambda.map((v) => v.toFixed(3)).join('/')}`);
          },
        });
        am.materialise();
        const row = scoreTest(am.model, {
          method: 'adamerging',
          setting: `layer-wise, lr 1e-3, ${r.steps} steps (mean λ ${am.meanPerModel().map((v) => v.toFixed(2)).join('/')})`,
          valMean: valMean(am.model),
          computeTokens: r.forwardTokens,
          seconds: r.seconds,
          extra: { entropyFirst: r.perSource[0], entropyLast: r.perSource[r.perSource.length - 1], lambdas: am.table() },
        });
        rows.push(row);
        report(row);
      } finally {
        am.dispose();
      }
    }

    if (want('dam')) {
      const t0 = performance.now();
      const dam = DamModel.fromModels(L.models, { ids: L.ids, init: 'reference', nonLinearity: 'tanh', backend: L.backend });
      try {
        const r = await trainDam(dam, train, {
          steps,
          batchSize: 4,
          lr: 1e-2,
          optimizer: { kind: 'adam' },
          loss: { objective: 'kl', temperature: 2, cosine: 0.01 },
          seed: 0,
          onStep: (s) => {
            if (s.step % 25 === 0 || s.step === s.steps) log(`  dam step ${s.step}/${s.steps}: loss ${s.loss.toFixed(4)}, KL ${s.perSource.map((v) => v.toFixed(3)).join('/')} (${secondsText(s.elapsedSeconds)})`);
          },
        });
        const seconds = (performance.now() - t0) / 1000;
        const student = r.tokens.reduce((a, b) => a + b, 0);
        log(`dam: ${r.steps} steps in ${secondsText(seconds)}, ${Math.round(student / r.seconds).toLocaleString('en-US')} student tokens/s`);
        dam.materialise();
        const row = scoreTest(dam.model, {
          method: 'dam',
          setting: `lr 1e-2, 4 windows/domain/step, ${r.steps} steps (${Math.round(student / r.seconds).toLocaleString('en-US')} student tok/s)`,
          valMean: valMean(dam.model),
          computeTokens: 4 * student,
          seconds,
          extra: { studentTokens: student, studentTokensPerSecond: student / r.seconds, trainSeconds: r.seconds, klFirst: r.perSource[0], klLast: r.perSource[r.perSource.length - 1], coefficients: r.coefficientCount },
        });
        rows.push(row);
        report(row);
      } finally {
        dam.dispose();
      }
    }
  } finally {
    L.dispose();
  }

  const totalSeconds = (performance.now() - tStart) / 1000;
  const bars = damBars(rows, totalSeconds, fullProtocol && methods.length === METHODS.length);
  const rep: DamBenchReport = { machine: machineLine(), rows, reference, bars, totalSeconds };
  const md = formatDamBenchMarkdown(rep);
  const outDir = resolve(values.out ?? join(repoRoot, '.bench-data', 'dam'));
  await mkdir(outDir, { recursive: true });
  await writeFile(join(outDir, 'results.json'), JSON.stringify(rep, null, 2) + '\n');
  await writeFile(join(outDir, 'results.md'), md);
  console.log(values.json ? JSON.stringify(rep) : md);
  log(`wrote ${join(outDir, 'results.json')} and results.md`);
}

/** The issue's bars, for the methods that ran. */
export function damBars(rows: readonly DamBenchRow[], totalSeconds: number, whole: boolean): DamBenchBar[] {
  const get = (m: string) => rows.find((r) => r.method === m);
  const dam = get('dam');
  const out: DamBenchBar[] = [];
  if (dam) {
    out.push({ name: 'DAM mean test NLL ≤ 2.95', value: fixed(dam.testMean), pass: dam.testMean <= 2.95 });
    const lin = get('linear');
    if (lin) out.push({ name: 'DAM ≤ linear − 0.3', value: `${fixed(dam.testMean)} vs ${fixed(lin.testMean - 0.3)}`, pass: dam.testMean <= lin.testMean - 0.3 });
    const classic = rows.filter((r) => CLASSIC.includes(r.method as Method));
    if (classic.length) {
      const best = classic.reduce((a, b) => (b.testMean < a.testMean ? b : a));
      out.push({ name: 'DAM ≤ best val-selected classic merge − 0.15', value: `${fixed(dam.testMean)} vs ${fixed(best.testMean - 0.15)} (${best.method}, ${best.setting})`, pass: dam.testMean <= best.testMean - 0.15 });
    }
    const cma = get('cma-es');
    if (cma) {
      out.push({ name: 'DAM beats CMA-ES (mean test NLL)', value: `${fixed(dam.testMean)} vs ${fixed(cma.testMean)}`, pass: dam.testMean < cma.testMean });
      const ratio = dam.computeTokens / cma.computeTokens;
      out.push({ name: 'DAM compute ≤ 1/3 of CMA-ES (fwd-equivalent tokens)', value: `${tokensText(dam.computeTokens)} / ${tokensText(cma.computeTokens)} = ${ratio.toFixed(3)}`, pass: ratio <= 1 / 3 });
    }
    out.push({ name: 'DAM run ≤ 3 min', value: secondsText(dam.seconds), pass: dam.seconds <= 180 });
  }
  if (whole) out.push({ name: 'whole benchmark ≤ 30 min', value: secondsText(totalSeconds), pass: totalSeconds <= 1800 });
  return out;
}
