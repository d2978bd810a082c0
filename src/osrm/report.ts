/**
 * Results of an OSRM experiment: the records, their aggregation over seeds (mean and sample
 * standard deviation; best λ by merged average accuracy per seed) and the Markdown tables.
 */
import type { LoraInitKind } from './init.js';

/** One training run: an initialisation, a task and a seed. */
export interface RunRecord {
  seed: number;
  init: string;
  task: string;
  /** Accuracy on the task's evaluation set, adapter and head applied alone. */
  accuracy: number;
  finalLoss: number;
  /** Mean over modules of ‖A_final − A_init‖ / ‖A_init‖. */
  aDrift: number;
  trainSeconds: number;
  evalSeconds: number;
  tokensPerSecond: number;
  adapterDir?: string;
}

/** One merge (method, λ) of one initialisation's task vectors, every task evaluated with its head. */
export interface MergeRecord {
  seed: number;
  init: string;
  merge: string;
  method: string;
  lambda: number;
  accuracies: Record<string, number>;
  average: number;
}

/** sqrt(mean_{t≠s} E_t‖M h‖² / E_s‖M h‖²) for task s's initial A, trained A and ΔW. */
export interface SelectivityRecord {
  seed: number;
  init: string;
  task: string;
  initialA: number;
  A: number;
  deltaW: number;
}

/** Figures of the init bars for one initialisation (A as written, float32). */
export interface InitCheck {
  kind: LoraInitKind;
  /** max |A·Aᵀ − I|. */
  orthonormality: number;
  /** Mean mode: max over tasks and groups of ‖A·Xᵀ‖ / ‖X‖. */
  meanResidual?: number;
  /** Covariance mode: max |a_iᵀ C a_i − λ_i| / |λ_i|. */
  rayleighRelative?: number;
}

export interface Spread {
  mean: number;
  /** Sample standard deviation over seeds (0 for one seed). */
  sd: number;
  perSeed: number[];
}

/** One initialisation × merge method, over seeds. */
export interface SummaryRow {
  init: string;
  merge: string;
  singleAverage: Spread;
  mergedBest: Spread;
  bestLambda: number[];
  /** Per task, mean over seeds: alone, and merged at each seed's best λ. */
  singlePerTask: Record<string, number>;
  mergedPerTask: Record<string, number>;
  selectivity: { initialA: number; A: number; deltaW: number };
  aDrift: number;
}

export interface OsrmReport {
  model: string;
  tasks: { name: string; numLabels: number; train: number; eval: number; maxLength: number; truncation: string }[];
  recipe: Record<string, unknown>;
  statistics: {
    pooling: string;
    samples: { task: string; samples: number; rows: number }[];
    groups: { name: string; modules: string[]; dim: number }[];
    floatsPerTask: number;
    deviations: string[];
  };
  initChecks: (InitCheck & { seed: number; init: string })[];
  runs: RunRecord[];
  merges: MergeRecord[];
  selectivity: SelectivityRecord[];
  summary: SummaryRow[];
  timings: {
    prepare: number;
    statistics: number;
    init: number;
    training: number;
    singleEval: number;
    merging: number;
    mergedEval: number;
    diagnostics: number;
    total: number;
    /** Training seconds of each run, in order. */
    perRun: number[];
  };
}

const mean = (xs: readonly number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN);

export function spread(xs: readonly number[]): Spread {
  const m = mean(xs);
  const sd = xs.length > 1 ? Math.sqrt(xs.reduce((s, x) => s + (x - m) ** 2, 0) / (xs.length - 1)) : 0;
  return { mean: m, sd, perSeed: [...xs] };
}

function unique<T>(xs: readonly T[]): T[] {
  return [...new Set(xs)];
}

/** Aggregates the records: one row per initialisation and merge method. */
export function summarize(r: Pick<OsrmReport, 'runs' | 'merges' | 'selectivity' | 'tasks'>): SummaryRow[] {
  const seeds = unique(r.runs.map((x) => x.seed));
  const inits = unique(r.runs.map((x) => x.init));
  const mergeNames = unique(r.merges.map((x) => x.merge));
  const tasks = r.tasks.map((t) => t.name);
  const rows: SummaryRow[] = [];
  for (const init of inits) {
    const runs = r.runs.filter((x) => x.init === init);
    const single = seeds.map((s) => mean(runs.filter((x) => x.seed === s).map((x) => x.accuracy)));
    const singlePerTask = Object.fromEntries(tasks.map((t) => [t, mean(runs.filter((x) => x.task === t).map((x) => x.accuracy))]));
    const sel = r.selectivity.filter((x) => x.init === init);
    const selectivity = { initialA: mean(sel.map((x) => x.initialA)), A: mean(sel.map((x) => x.A)), deltaW: mean(sel.map((x) => x.deltaW)) };
    for (const merge of mergeNames) {
      const bests = seeds.map((s) => {
        const cands = r.merges.filter((x) => x.init === init && x.merge === merge && x.seed === s);
        return cands.reduce((a, b) => (b.average > a.average ? b : a));
      });
      rows.push({
        init,
        merge,
        singleAverage: spread(single),
        mergedBest: spread(bests.map((b) => b.average)),
        bestLambda: bests.map((b) => b.lambda),
        singlePerTask,
        mergedPerTask: Object.fromEntries(tasks.map((t) => [t, mean(bests.map((b) => b.accuracies[t]!))])),
        selectivity,
        aDrift: mean(runs.map((x) => x.aDrift)),
      });
    }
  }
  return rows;
}

const pct = (x: number) => (100 * x).toFixed(1);
const pm = (s: Spread) => (s.perSeed.length > 1 ? `${pct(s.mean)} ± ${pct(s.sd)}` : pct(s.mean));
const secs = (x: number) => (x >= 120 ? `${(x / 60).toFixed(1)} min` : `${x.toFixed(1)} s`);

function table(header: string[], rows: string[][], align?: ('l' | 'r')[]): string {
  const a = align ?? header.map((_, i) => (i === 0 ? 'l' : 'r'));
  return [
    `| ${header.join(' | ')} |`,
    `|${a.map((x) => (x === 'l' ? '---' : '---:')).join('|')}|`,
    ...rows.map((r) => `| ${r.join(' | ')} |`),
  ].join('\n');
}

/** The summary tables (initialisation × merge; selectivity; timing) as Markdown. */
export function formatOsrmMarkdown(r: OsrmReport): string {
  const tasks = r.tasks.map((t) => t.name);
  const seeds = unique(r.runs.map((x) => x.seed));
  const merges = unique(r.summary.map((x) => x.merge));
  const out: string[] = [];
  out.push(`# OSRM experiment`, '');
  out.push(`Model \`${r.model}\`; tasks ${tasks.map((t) => `\`${t}\``).join(', ')}; seeds ${seeds.join(', ')}.`);
  out.push(`Accuracies in %; ± is the sample standard deviation over seeds; best λ is chosen per seed by the merged average.`, '');

  out.push(`## Summary`, '');
  const header = ['initialisation', 'single-task avg', ...merges.flatMap((m) => [`merged ${m} (best λ)`, `best λ ${m}`])];
  const inits = unique(r.summary.map((x) => x.init));
  out.push(
    table(
      header,
      inits.map((init) => {
        const rows = r.summary.filter((x) => x.init === init);
        return [init, pm(rows[0]!.singleAverage), ...merges.flatMap((m) => {
          const row = rows.find((x) => x.merge === m)!;
          return [pm(row.mergedBest), row.bestLambda.join(', ')];
        })];
      }),
    ),
    '',
  );

  out.push(`## Per task (mean over seeds)`, '');
  out.push(
    table(
      ['initialisation', ...tasks.map((t) => `${t} alone`), ...merges.flatMap((m) => tasks.map((t) => `${t} ${m}`))],
      inits.map((init) => {
        const rows = r.summary.filter((x) => x.init === init);
        return [init, ...tasks.map((t) => pct(rows[0]!.singlePerTask[t]!)), ...merges.flatMap((m) => tasks.map((t) => pct(rows.find((x) => x.merge === m)!.mergedPerTask[t]!)))];
      }),
    ),
    '',
  );

  out.push(`## Merged average by λ (mean over seeds)`, '');
  const lambdas = unique(r.merges.map((x) => x.lambda)).sort((a, b) => a - b);
  out.push(
    table(
      ['initialisation', 'merge', ...lambdas.map((l) => `λ = ${l}`)],
      inits.flatMap((init) =>
        merges.map((m) => [
          init,
          m,
          ...lambdas.map((l) => {
            const xs = r.merges.filter((x) => x.init === init && x.merge === m && x.lambda === l).map((x) => x.average);
            return xs.length ? pct(mean(xs)) : '';
          }),
        ]),
      ),
      ['l', 'l', ...lambdas.map(() => 'r' as const)],
    ),
    '',
  );

  out.push(`## Per seed`, '');
  out.push(
    table(
      ['seed', 'initialisation', 'single-task avg', ...merges.map((m) => `${m} best (λ)`)],
      seeds.flatMap((s) =>
        inits.map((init) => {
          const single = mean(r.runs.filter((x) => x.seed === s && x.init === init).map((x) => x.accuracy));
          return [
            String(s),
            init,
            pct(single),
            ...merges.map((m) => {
              const b = r.merges.filter((x) => x.seed === s && x.init === init && x.merge === m).reduce((a, c) => (c.average > a.average ? c : a));
              return `${pct(b.average)} (${b.lambda})`;
            }),
          ];
        }),
      ),
      ['r', 'l', 'r', ...merges.map(() => 'r' as const)],
    ),
    '',
  );

  out.push(`## Selectivity ‖M_s h_t‖ / ‖M_s h_s‖ (RMS over other tasks' inputs vs own; lower is more selective)`, '');
  out.push(
    table(
      ['initialisation', 'initial A', 'trained A', 'ΔW', 'A moved'],
      inits.map((init) => {
        const row = r.summary.find((x) => x.init === init)!;
        return [init, row.selectivity.initialA.toFixed(3), row.selectivity.A.toFixed(3), row.selectivity.deltaW.toFixed(3), `${pct(row.aDrift)} %`];
      }),
    ),
    '',
  );

  if (r.initChecks.length) {
    out.push(`## Initialisation checks (A as written, float32; worst over tasks, layers and seeds)`, '');
    const names = unique(r.initChecks.map((x) => x.init));
    out.push(
      table(
        ['initialisation', 'max \\|A·Aᵀ − I\\|', '‖A·Xᵀ‖/‖X‖ (mean)', 'Rayleigh rel. error (covariance)'],
        names.map((n) => {
          const cs = r.initChecks.filter((x) => x.init === n);
          const mx = (f: (c: InitCheck) => number | undefined) => {
            const v = cs.map(f).filter((x): x is number => x !== undefined);
            return v.length ? Math.max(...v).toExponential(2) : '–';
          };
          return [n, mx((c) => c.orthonormality), mx((c) => c.meanResidual), mx((c) => c.rayleighRelative)];
        }),
      ),
      '',
    );
  }

  const t = r.timings;
  out.push(`## Time`, '');
  out.push(
    table(
      ['part', 'time'],
      [
        ['model and data', secs(t.prepare)],
        ['feature statistics', secs(t.statistics)],
        ['initialisations', secs(t.init)],
        [`training (${t.perRun.length} runs, ${secs(mean(t.perRun))} each)`, secs(t.training)],
        ['single-task evaluation', secs(t.singleEval)],
        ['merging', secs(t.merging)],
        ['merged evaluation', secs(t.mergedEval)],
        ['selectivity diagnostic', secs(t.diagnostics)],
        ['total', secs(t.total)],
      ],
    ),
    '',
  );
  if (r.statistics.deviations.length) out.push(`Deviations from the reference code: ${r.statistics.deviations.join('; ')}.`, '');
  return out.join('\n');
}

/** One report from several (e.g. one per seed) over the same tasks and recipe: records joined, timings added. */
export function combineReports(reports: readonly OsrmReport[]): OsrmReport {
  if (reports.length === 0) throw new Error('no reports to combine');
  const first = reports[0]!;
  const sumOf = (k: keyof Omit<OsrmReport['timings'], 'perRun'>) => reports.reduce((s, r) => s + r.timings[k], 0);
  const out: OsrmReport = {
    ...first,
    recipe: { ...first.recipe, seeds: reports.flatMap((r) => (r.recipe['seeds'] as number[] | undefined) ?? []) },
    initChecks: reports.flatMap((r) => r.initChecks),
    runs: reports.flatMap((r) => r.runs),
    merges: reports.flatMap((r) => r.merges),
    selectivity: reports.flatMap((r) => r.selectivity),
    summary: [],
    timings: {
      prepare: sumOf('prepare'),
      statistics: sumOf('statistics'),
      init: sumOf('init'),
      training: sumOf('training'),
      singleEval: sumOf('singleEval'),
      merging: sumOf('merging'),
      mergedEval: sumOf('mergedEval'),
      diagnostics: sumOf('diagnostics'),
      total: sumOf('total'),
      perRun: reports.flatMap((r) => r.timings.perRun),
    },
  };
  out.summary = summarize(out);
  return out;
}
