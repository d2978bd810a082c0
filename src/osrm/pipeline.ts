/**
 * The OSRM experiment (`amalgam osrm run`): per task, train one LoRA adapter (plus its own
 * classification head) for each requested initialisation with the same seed, steps, learning
 * rate and batch order; evaluate each alone; merge the dense task vectors ΔW_t = s·B_t·A_t of
 * every initialisation with each merge method over a λ grid (heads stay per task); evaluate every
 * task on every merge; repeat over seeds; report per-task, average, mean ± spread over seeds,
 * best λ and the selectivity diagnostic ‖M_s h_t‖ / ‖M_s h_s‖ for A and ΔW.
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { AmalgamError } from '../errors.js';
import { convertToHf } from '../convert/to-hf.js';
import { refuseReplacingInputs } from '../io/atomic-dir.js';
import { encodeExamples, permutation, type EncodedExample } from '../data/batching.js';
import { readDataset, type ReadDatasetOptions } from '../data/datasets.js';
import { loadTokenizer, type TextTokenizer } from '../data/tokenizer.js';
import { writePeftAdapter, type LoraFactors } from '../lora/peft-write.js';
import { getMergeMethod, mergeTensor, prepareParams } from '../merge/registry.js';
import { evaluateAccuracy } from '../nn/eval.js';
import { SCORE_WEIGHT, type SequenceClassificationHead } from '../nn/heads.js';
import { detachLora, loraModules, type LoraInitContext } from '../nn/lora.js';
import type { LlamaModel } from '../nn/model.js';
import { Rng } from '../tensor/rng.js';
import { labelMetadata, loadModel } from '../train/checkpoint.js';
import { trainModel } from '../train/trainer.js';
import { loraInitHook, orthonormalityError, orthonormalControlInit, osrmInit, othersSecondMoment, rayleighQuotients, type TaskInit } from './init.js';
import { osrmInitParallel } from './parallel.js';
import { assertDistinctSeeds, mergeGridParams, SAFE_NAME, SAFE_NAME_RULE, type RecipeInit, type RecipeMerge, type ResolvedOsrmRecipe } from './recipe.js';
import { formatOsrmMarkdown, summarize, type OsrmReport, type RunRecord, type MergeRecord, type SelectivityRecord, type InitCheck } from './report.js';
import { collectFeatureStats, featureGroups, featureSecondMoment, statsFloats, type FeatureGroup, type TaskFeatureStats } from './stats.js';

export interface PipelineTask {
  name: string;
  numLabels: number;
  /** Class names in id order (`LABEL_i` where the data names none), recorded in each adapter. */
  labelNames: string[];
  train: EncodedExample[];
  eval: EncodedExample[];
  /** The evaluation examples with their labels, for accuracy. */
  evalLabelled: { ids: Int32Array; label: number }[];
  maxLength: number;
  truncation: 'left' | 'right';
}

export interface OsrmRunOptions {
  /** Progress lines (default: none). */
  log?: (line: string) => void;
  /** Training progress bars on stderr (default false). */
  progress?: boolean;
  /** Write results.json / results.md (and adapters when the recipe asks) to the output folder (default true). */
  write?: boolean;
}

/** One trained adapter kept for merging: ΔW per module and the task's head. */
interface TrainedTask {
  task: string;
  head: SequenceClassificationHead;
  modules: { name: string; group: string; A0: Float32Array; A: Float32Array; B: Float32Array; scaling: number; rank: number; delta: Float32Array }[];
}

const now = () => performance.now() / 1000;

/** The folder under the output folder that a GGUF / llama2.c model is converted into. */
export const BASE_MODEL_DIR = 'base-model';

/**
 * The recipe's model as a Hugging Face folder, as an absolute path: a folder is used as is, a
 * GGUF / llama2.c file is converted once into `<out>/base-model`.
 */
export async function resolveModelFolder(model: string, outDir: string): Promise<string> {
  let st;
  try {
    st = await stat(model);
  } catch (e) {
    throw new AmalgamError('E_IO', `cannot read the model: ${(e as Error).message}`, { file: model, cause: e });
  }
  if (st.isDirectory()) return resolve(model);
  const dir = resolve(outDir, BASE_MODEL_DIR);
  if (existsSync(join(dir, 'config.json'))) return dir;
  await mkdir(outDir, { recursive: true });
  await convertToHf(model, dir);
  return dir;
}

/** Reads and encodes the recipe's tasks (BOS + text, truncated as each task says). */
export async function loadPipelineTasks(recipe: ResolvedOsrmRecipe, tok: TextTokenizer): Promise<PipelineTask[]> {
  const out: PipelineTask[] = [];
  for (const t of recipe.tasks) {
    const opts: ReadDatasetOptions = { requireLabels: true };
    if (t.text_field !== undefined) opts.textFields = Array.isArray(t.text_field) ? t.text_field : [t.text_field];
    if (t.label_field !== undefined) opts.labelField = t.label_field;
    const train = await readDataset(t.train, opts);
    const ev = await readDataset(t.eval, { ...opts, labelNames: train.labelNames });
    const enc = (ex: typeof train.examples, limit?: number) =>
      encodeExamples(tok, limit === undefined ? ex : ex.slice(0, limit), { bos: true, maxLength: t.max_length, truncationSide: t.truncation });
    const numLabels = t.num_labels ?? Math.max(train.numClasses, ev.numClasses);
    const evalSet = enc(ev.examples, t.eval_limit);
    out.push({
      name: t.name,
      numLabels,
      labelNames: train.labelNames && train.labelNames.length === numLabels ? train.labelNames : Array.from({ length: numLabels }, (_, i) => `LABEL_${i}`),
      train: enc(train.examples, t.train_limit),
      eval: evalSet,
      evalLabelled: evalSet.map((e) => ({ ids: e.ids, label: e.label ?? -1 })),
      maxLength: t.max_length,
      truncation: t.truncation,
    });
  }
  return out;
}

/** `count` examples drawn by a seeded shuffle (all when fewer). */
function sampleExamples(examples: readonly EncodedExample[], count: number, seed: number): EncodedExample[] {
  return permutation(examples.length, seed)
    .slice(0, count)
    .map((i) => examples[i]!);
}

/** Feature statistics of every task over the recipe's OSRM samples. */
export function collectTaskStats(
  model: LlamaModel,
  tasks: readonly PipelineTask[],
  recipe: ResolvedOsrmRecipe,
  which: 'train' | 'eval',
  padId: number,
  samples: number,
): TaskFeatureStats[] {
  const o = recipe.osrm;
  return tasks.map((t) =>
    collectFeatureStats(model, sampleExamples(which === 'train' ? t.train : t.eval, samples, o.shuffle_seed), {
      targets: recipe.lora.targets,
      batchSize: o.batch_size,
      pooling: o.pooling,
      padTo: o.pooling === 'all-positions' ? t.maxLength : undefined,
      padId,
      secondMoment: true,
      task: t.name,
    }),
  );
}

/** Per-task initial A for one variant and seed, or null for PEFT's default. */
export function variantInits(variant: RecipeInit, stats: readonly TaskFeatureStats[], groups: readonly FeatureGroup[], recipe: ResolvedOsrmRecipe, seed: number): TaskInit[] | null {
  const r = recipe.lora.r;
  switch (variant.init) {
    case 'standard':
      return null;
    case 'orthonormal-control':
    case 'orthonormal-control-per-task':
      return orthonormalControlInit(
        stats.map((s) => s.task),
        groups,
        r,
        seed,
        variant.init === 'orthonormal-control-per-task',
      );
    case 'osrm-mean':
      return osrmInit(stats, { mode: 'mean', rank: r, seed, divisor: recipe.osrm.divisor });
    case 'osrm-covariance':
      return osrmInit(stats, { mode: 'covariance', rank: r, seed, center: recipe.osrm.center });
  }
}

/** The init-bar figures of one OSRM / control initialisation (A as written, in float32). */
export function checkInit(inits: readonly TaskInit[], stats: readonly TaskFeatureStats[], center = false, only?: number): InitCheck {
  let orth = 0;
  let residual = 0;
  let rayleigh = 0;
  for (const [t, init] of inits.entries()) {
    if (only !== undefined && t !== only) continue;
    init.groups.forEach((g, gi) => {
      const d = g.group.dim;
      const a32 = Float32Array.from(g.A);
      orth = Math.max(orth, orthonormalityError(a32, init.rank, d));
      if (init.kind === 'osrm-mean') {
        let res = 0;
        let xn = 0;
        stats.forEach((s, j) => {
          if (j === t) return;
          const gs = s.groups[gi]!;
          const mu = gs.sum.map((v) => v / gs.count);
          for (let i = 0; i < init.rank; i++) {
            let dot = 0;
            for (let k = 0; k < d; k++) dot += a32[i * d + k]! * mu[k]!;
            res += dot * dot;
          }
          for (const v of mu) xn += v * v;
        });
        residual = Math.max(residual, Math.sqrt(res / xn));
      }
      if (init.kind === 'osrm-covariance' && g.eigenvalues) {
        const C = othersSecondMoment(stats, t, gi, center);
        const q = rayleighQuotients(a32, C, init.rank, d);
        for (let i = 0; i < init.rank; i++) {
          const lam = g.eigenvalues[i]!;
          const scale = Math.max(Math.abs(lam), 1e-12 * Math.abs(g.maxEigenvalue ?? 1));
          rayleigh = Math.max(rayleigh, Math.abs(q[i]! - lam) / scale);
        }
      }
    });
  }
  return { kind: inits[0]?.kind ?? 'standard', orthonormality: orth, meanResidual: inits[0]?.kind === 'osrm-mean' ? residual : undefined, rayleighRelative: inits[0]?.kind === 'osrm-covariance' ? rayleigh : undefined };
}

/** tr(M·C·Mᵀ) for M = A (r × d), or s·B·A (out × d) when B is given. */
function energy(A: Float32Array, C: Float64Array, r: number, d: number, B?: Float32Array, out = 0, s = 1): number {
  // K = A·C·Aᵀ (r × r).
  const AC = new Float64Array(r * d);
  for (let i = 0; i < r; i++) {
    for (let p = 0; p < d; p++) {
      const a = A[i * d + p]!;
      if (a === 0) continue;
      for (let q = 0; q < d; q++) AC[i * d + q] += a * C[p * d + q]!;
    }
  }
  const K = new Float64Array(r * r);
  for (let i = 0; i < r; i++) for (let j = 0; j < r; j++) {
    let v = 0;
    for (let q = 0; q < d; q++) v += AC[i * d + q]! * A[j * d + q]!;
    K[i * r + j] = v;
  }
  if (!B) {
    let tr = 0;
    for (let i = 0; i < r; i++) tr += K[i * r + i]!;
    return tr;
  }
  // tr(Bᵀ·B·K)·s².
  let tr = 0;
  for (let i = 0; i < r; i++) for (let j = 0; j < r; j++) {
    let g = 0;
    for (let o = 0; o < out; o++) g += B[o * r + i]! * B[o * r + j]!;
    tr += g * K[j * r + i]!;
  }
  return s * s * tr;
}

/**
 * Selectivity of task s's matrices: sqrt( mean_{t≠s} E_t‖M h‖² / E_s‖M h‖² ), the energies summed
 * over the adapted modules, for the initial A, the trained A and ΔW = s·B·A. Lower is more selective.
 */
function selectivity(trained: readonly TrainedTask[], diag: readonly TaskFeatureStats[]): { initialA: number; A: number; deltaW: number }[] {
  const moments = diag.map((s) => new Map(s.groups.map((g) => [g.group.name, featureSecondMoment(g)])));
  return trained.map((tt, s) => {
    const sums = { initialA: [0, 0], A: [0, 0], deltaW: [0, 0] };
    for (const m of tt.modules) {
      const d = m.A.length / m.rank;
      const out = m.B.length / m.rank;
      diag.forEach((_, t) => {
        const C = moments[t]!.get(m.group)!;
        const e0 = energy(m.A0, C, m.rank, d);
        const e1 = energy(m.A, C, m.rank, d);
        const e2 = energy(m.A, C, m.rank, d, m.B, out, m.scaling);
        const slot = t === s ? 1 : 0;
        const w = t === s ? 1 : 1 / (diag.length - 1);
        sums.initialA[slot] += w * e0;
        sums.A[slot] += w * e1;
        sums.deltaW[slot] += w * e2;
      });
    }
    const ratio = ([other, own]: number[]) => (own! > 0 ? Math.sqrt(other! / own!) : NaN);
    return { initialA: ratio(sums.initialA), A: ratio(sums.A), deltaW: ratio(sums.deltaW) };
  });
}

function relChange(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (b[i]! - a[i]!) ** 2;
    den += a[i]! ** 2;
  }
  return den > 0 ? Math.sqrt(num / den) : NaN;
}

/** What `amalgam_init` records of the statistics behind an OSRM initialisation (nothing for the others). */
function initSettings(kind: RecipeInit['init'], o: ResolvedOsrmRecipe['osrm']): Record<string, unknown> {
  if (kind === 'osrm-covariance') return { samples: o.samples, shuffle_seed: o.shuffle_seed, pooling: o.pooling, center: o.center };
  if (kind === 'osrm-mean') return { samples: o.samples, shuffle_seed: o.shuffle_seed, pooling: o.pooling, divisor: o.divisor };
  return {};
}

/** Merged ΔW per module for one method and λ; the base of the merge is zero. */
export function mergeTaskVectors(
  merge: RecipeMerge,
  lambda: number,
  trained: readonly TrainedTask[],
  seed: number,
): Map<string, Float32Array> {
  const method = getMergeMethod(merge.method);
  const grid = mergeGridParams(merge.method, merge.parameters, lambda, trained.map((t) => t.task));
  const base = grid.base;
  const out = new Map<string, Float32Array>();
  const rng = new Rng(seed);
  const modules = trained[0]!.modules;
  for (const [mi, mod] of modules.entries()) {
    const shape = [mod.B.length / mod.rank, mod.A.length / mod.rank];
    const inputs = trained.map((t) => ({ model: t.task, data: t.modules[mi]!.delta, shape }));
    const allInputs = base !== null ? [{ model: base, data: new Float32Array(mod.delta.length), shape }, ...inputs] : inputs;
    const params = prepareParams(method, { tensorName: mod.name, models: grid.models, base }, grid.raw);
    const r = mergeTensor(method, { tensorName: mod.name, isEmbed: false, inputs: allInputs, base, params, rng });
    if (!r) throw new AmalgamError('E_USAGE', `${merge.method} left ${mod.name} out of the merge`);
    out.set(mod.name, r.data);
  }
  return out;
}

/** Runs the whole experiment of a recipe. */
export async function runOsrmPipeline(recipe: ResolvedOsrmRecipe, opts: OsrmRunOptions = {}): Promise<OsrmReport> {
  const log = opts.log ?? (() => {});
  const write = opts.write ?? true;
  const outDir = recipe.output.dir;
  const t0 = now();
  assertDistinctSeeds(recipe.seeds, 'seeds');
  if (write && existsSync(join(outDir, 'results.json')) && !recipe.output.overwrite) {
    throw new AmalgamError('E_USAGE', 'the output folder already holds results', { file: outDir, hint: 'set output.overwrite: true or choose another output.dir' });
  }
  const modelDir = await resolveModelFolder(recipe.model, outDir);
  const tok = await loadTokenizer(modelDir);
  const tasks = await loadPipelineTasks(recipe, tok);
  const { model } = await loadModel(modelDir);
  const timings: OsrmReport['timings'] = { prepare: now() - t0, statistics: 0, init: 0, training: 0, singleEval: 0, merging: 0, mergedEval: 0, diagnostics: 0, total: 0, perRun: [] };
  try {
    // Statistics on the base model: training samples (OSRM) and evaluation samples (diagnostic).
    let ts = now();
    const stats = collectTaskStats(model, tasks, recipe, 'train', tok.padId, recipe.osrm.samples);
    const diag = collectTaskStats(model, tasks, recipe, 'eval', tok.padId, recipe.evaluation.diagnostic_samples);
    timings.statistics = now() - ts;
    const groups = featureGroups(model, recipe.lora.targets);
    log(
      `statistics: ${tasks.length} tasks × ${recipe.osrm.samples} samples, ${groups.length} feature groups (${groups[0]!.modules.join(', ')} share one input), ` +
        `${statsFloats(stats[0]!).toLocaleString('en-US')} float64 per task, ${timings.statistics.toFixed(1)} s`,
    );

    const runs: RunRecord[] = [];
    const merges: MergeRecord[] = [];
    const select: SelectivityRecord[] = [];
    const initChecks: (InitCheck & { seed: number; init: string })[] = [];
    const baseWeights = new Map<string, { data: Float32Array; copy: Float32Array }>();
    const named = model.namedParameters();

    for (const seed of recipe.seeds) {
      for (const variant of recipe.inits) {
        ts = now();
        const inits = variantInits(variant, stats, groups, recipe, seed);
        timings.init += now() - ts;
        if (inits) initChecks.push({ seed, init: variant.name, ...checkInit(inits, stats, recipe.osrm.center) });
        const trained: TrainedTask[] = [];
        for (const [ti, task] of tasks.entries()) {
          const initial = new Map<string, Float32Array>();
          const hook = inits ? loraInitHook(inits[ti]!) : null;
          const init = (ctx: LoraInitContext) => {
            hook?.(ctx);
            initial.set(ctx.name, ctx.A.slice());
          };
          const tr0 = now();
          const res = await trainModel(
            model,
            { train: task.train, eval: task.eval, numLabels: task.numLabels },
            {
              task: 'classify',
              steps: recipe.train.steps,
              batchSize: recipe.train.batch_size,
              microBatch: recipe.train.micro_batch,
              lr: recipe.train.lr,
              schedule: recipe.train.schedule,
              warmup: recipe.train.warmup,
              minLrRatio: recipe.train.min_lr_ratio,
              clip: recipe.train.clip,
              weightDecay: recipe.train.weight_decay,
              seed,
              lora: { r: recipe.lora.r, alpha: recipe.lora.alpha, targets: recipe.lora.targets, rslora: recipe.lora.rslora, freeze: variant.freeze, init },
              evalBatchSize: recipe.evaluation.batch_size,
              skipInitialEval: true,
              progress: opts.progress ?? false,
            },
          );
          const wall = now() - tr0;
          timings.training += res.seconds;
          timings.singleEval += wall - res.seconds;
          const head = res.head!;
          const mods = loraModules(model).map((m) => ({
            name: m.name,
            group: groups.find((g) => g.modules.includes(m.name))!.name,
            A0: initial.get(m.name)!,
            A: m.A.data.slice(),
            B: m.B.data.slice(),
            scaling: m.scaling,
            rank: m.rank,
            delta: m.deltaWeight(model.backend),
          }));
          let adapterDir: string | undefined;
          if (write && recipe.output.save_adapters) {
            const factors: LoraFactors[] = loraModules(model).map((m) => ({ path: m.name, a: m.A.data, b: m.B.data, rank: m.rank, inFeatures: m.inFeatures, outFeatures: m.outFeatures }));
            const w = await writePeftAdapter(
              join(outDir, 'adapters', `seed-${seed}`, variant.name, task.name),
              factors,
              [{ name: SCORE_WEIGHT, shape: [...head.score.weight.shape], data: head.score.weight.data }],
              {
                r: recipe.lora.r,
                alpha: recipe.lora.alpha,
                useRslora: recipe.lora.rslora,
                taskType: 'SEQ_CLS',
                baseModel: modelDir,
                modulesToSave: ['score'],
                extraConfig: { amalgam_init: { kind: variant.init, freeze: variant.freeze, seed, ...initSettings(variant.init, recipe.osrm), tasks: tasks.map((t) => t.name) } },
              },
              { overwrite: recipe.output.overwrite, metadata: labelMetadata(task.labelNames) },
            );
            adapterDir = w.dir;
          }
          detachLora(model, false);
          const aDrift = mods.reduce((s, m) => s + relChange(m.A0, m.A), 0) / mods.length;
          const accuracy = res.evalAfter!.accuracy!;
          runs.push({ seed, init: variant.name, task: task.name, accuracy, finalLoss: res.losses[res.losses.length - 1]!, aDrift, trainSeconds: res.seconds, evalSeconds: wall - res.seconds, tokensPerSecond: res.tokensPerSecond, adapterDir });
          timings.perRun.push(res.seconds);
          log(`seed ${seed} · ${variant.name} · ${task.name}: ${(100 * accuracy).toFixed(1)} % alone (train ${res.seconds.toFixed(1)} s, A moved ${(100 * aDrift).toFixed(0)} %)`);
          trained.push({ task: task.name, head, modules: mods });
        }

        // Merges over the λ grid, each task evaluated with its own head.
        for (const m of trained[0]!.modules) {
          if (!baseWeights.has(m.name)) {
            const p = named.get(`${m.name}.weight`)!;
            baseWeights.set(m.name, { data: p.data, copy: p.data.slice() });
          }
        }
        for (const merge of recipe.merges) {
          for (const lambda of merge.lambdas) {
            ts = now();
            const merged = mergeTaskVectors(merge, lambda, trained, seed);
            for (const [name, delta] of merged) {
              const w = baseWeights.get(name)!;
              for (let i = 0; i < delta.length; i++) w.data[i] = w.copy[i]! + delta[i]!;
            }
            timings.merging += now() - ts;
            ts = now();
            const accuracies: Record<string, number> = {};
            try {
              for (const [ti, task] of tasks.entries()) {
                accuracies[task.name] = evaluateAccuracy(model, trained[ti]!.head, task.evalLabelled, { batchSize: recipe.evaluation.batch_size }).accuracy;
              }
            } finally {
              for (const w of baseWeights.values()) w.data.set(w.copy);
            }
            timings.mergedEval += now() - ts;
            const average = Object.values(accuracies).reduce((a, b) => a + b, 0) / tasks.length;
            merges.push({ seed, init: variant.name, merge: merge.name, method: merge.method, lambda, accuracies, average });
          }
          const best = merges.filter((r) => r.seed === seed && r.init === variant.name && r.merge === merge.name).reduce((a, b) => (b.average > a.average ? b : a));
          log(`seed ${seed} · ${variant.name} · ${merge.name}: best λ ${best.lambda}, merged average ${(100 * best.average).toFixed(1)} %`);
        }

        ts = now();
        const sel = selectivity(trained, diag);
        sel.forEach((s, i) => select.push({ seed, init: variant.name, task: trained[i]!.task, ...s }));
        timings.diagnostics += now() - ts;
      }
    }
    timings.total = now() - t0;
    const report: OsrmReport = {
      model: modelDir,
      tasks: tasks.map((t) => ({ name: t.name, numLabels: t.numLabels, train: t.train.length, eval: t.eval.length, maxLength: t.maxLength, truncation: t.truncation })),
      recipe: {
        lora: recipe.lora,
        osrm: recipe.osrm,
        train: recipe.train,
        inits: recipe.inits,
        merges: recipe.merges,
        seeds: recipe.seeds,
        evaluation: recipe.evaluation,
      },
      statistics: {
        pooling: recipe.osrm.pooling,
        samples: stats.map((s) => ({ task: s.task, samples: s.samples, rows: s.rows })),
        groups: groups.map((g) => ({ name: g.name, modules: g.modules, dim: g.dim })),
        floatsPerTask: statsFloats(stats[0]!),
        deviations: recipe.osrm.pooling === 'real-tokens' ? ['pooling real-tokens: padding excluded (the reference code averages over all padded positions)'] : [],
      },
      initChecks,
      runs,
      merges,
      selectivity: select,
      summary: [],
      timings,
    };
    report.summary = summarize(report);
    if (write) {
      await mkdir(outDir, { recursive: true });
      await writeFile(join(outDir, 'results.json'), JSON.stringify(report, null, 2) + '\n');
      await writeFile(join(outDir, 'results.md'), formatOsrmMarkdown(report));
    }
    return report;
  } finally {
    model.dispose();
  }
}

export interface OsrmInitTask {
  name: string;
  /** Dataset file (txt, jsonl or tsv); labels are not needed. */
  data: string;
  /** Longest sequence, BOS included (default 64). */
  maxLength?: number;
  truncation?: 'left' | 'right';
  textField?: string | string[];
}

export interface RunOsrmInitOptions {
  mode?: 'mean' | 'covariance';
  rank?: number;
  alpha?: number;
  targets?: string[];
  rslora?: boolean;
  /** Samples per task (default 100). */
  samples?: number;
  /** Seed of the shuffle picking the samples (default 42). */
  shuffleSeed?: number;
  pooling?: 'real-tokens' | 'all-positions';
  center?: boolean;
  divisor?: 'n' | 'n-1';
  /** Seed of the basis choice (default 0). */
  seed?: number;
  batchSize?: number;
  overwrite?: boolean;
  /** Worker threads for the covariance-mode eigenproblems of wide layers (default: the number of cores). */
  jobs?: number;
  log?: (line: string) => void;
}

export interface OsrmInitOutput {
  task: string;
  dir: string;
  check: InitCheck;
}

/**
 * Checks, before any work, what `osrm init` will write: each task name is one safe path component
 * used once, none is the converted base model's folder, and no `<out>/<task>` is an input or
 * (without overwrite) an existing folder with files in it.
 */
async function checkInitOutputs(tasks: readonly OsrmInitTask[], outDir: string, overwrite: boolean, inputs: readonly string[]): Promise<void> {
  const seen = new Set<string>();
  for (const t of tasks) {
    if (!SAFE_NAME.test(t.name)) {
      throw new AmalgamError('E_USAGE', `task name "${t.name}" cannot name a folder: task names may hold ${SAFE_NAME_RULE}`, { hint: 'each task is written to <out>/<name>; rename the task' });
    }
    if (seen.has(t.name)) throw new AmalgamError('E_USAGE', `task name "${t.name}" is given twice`, { hint: 'each task is written to <out>/<name>; give every task its own name' });
    seen.add(t.name);
    if (t.name === BASE_MODEL_DIR) {
      throw new AmalgamError('E_USAGE', `task name "${t.name}" is reserved: <out>/${BASE_MODEL_DIR} holds the base model converted from a GGUF / llama2.c file`, { hint: 'rename the task' });
    }
  }
  for (const t of tasks) {
    const target = resolve(outDir, t.name);
    await refuseReplacingInputs(target, inputs);
    let st;
    try {
      st = await stat(target);
    } catch {
      continue;
    }
    if (!st.isDirectory()) throw new AmalgamError('E_IO', `the output path of task ${t.name} exists and is not a folder`, { file: target, hint: 'choose another output folder or task name' });
    if (!overwrite && (await readdir(target)).length > 0) {
      throw new AmalgamError('E_IO', `the output folder of task ${t.name} exists and is not empty`, { file: target, hint: 'choose another output folder or pass --overwrite' });
    }
  }
}

/**
 * `amalgam osrm init`: statistics of every task on the base model, then one initial PEFT adapter
 * per task under `<outDir>/<task>` (A from the other tasks' statistics, B = 0; the choice is
 * recorded in adapter_config.json under `amalgam_init`).
 */
export async function runOsrmInit(modelPath: string, tasks: readonly OsrmInitTask[], outDir: string, opts: RunOsrmInitOptions = {}): Promise<{ outputs: OsrmInitOutput[]; seconds: number; stats: TaskFeatureStats[] }> {
  const t0 = now();
  if (tasks.length < 2) throw new AmalgamError('E_USAGE', `OSRM needs at least 2 tasks, got ${tasks.length}`);
  const mode = opts.mode ?? 'covariance';
  if (mode === 'mean' && opts.center) {
    throw new AmalgamError('E_USAGE', 'center applies to covariance mode only; mean mode does not read it', { hint: 'drop --center, or use --mode covariance' });
  }
  if (mode === 'covariance' && opts.divisor !== undefined && opts.divisor !== 'n') {
    throw new AmalgamError('E_USAGE', `divisor ${opts.divisor} applies to mean mode only; covariance mode does not read it`, { hint: 'drop --divisor, or use --mode mean' });
  }
  const inputs = [modelPath, ...tasks.map((t) => t.data)];
  await checkInitOutputs(tasks, outDir, opts.overwrite ?? false, inputs);
  const rank = opts.rank ?? 8;
  const alpha = opts.alpha ?? 2 * rank;
  const targets = opts.targets ?? ['q_proj', 'v_proj'];
  const samples = opts.samples ?? 100;
  const pooling = opts.pooling ?? 'real-tokens';
  const seed = opts.seed ?? 0;
  const modelDir = await resolveModelFolder(modelPath, outDir);
  const tok = await loadTokenizer(modelDir);
  const { model } = await loadModel(modelDir);
  try {
    const stats: TaskFeatureStats[] = [];
    for (const t of tasks) {
      const ds = await readDataset(t.data, t.textField === undefined ? {} : { textFields: Array.isArray(t.textField) ? t.textField : [t.textField] });
      const maxLength = t.maxLength ?? 64;
      const picked = permutation(ds.examples.length, opts.shuffleSeed ?? 42)
        .slice(0, samples)
        .map((i) => ds.examples[i]!);
      const enc = encodeExamples(tok, picked, { bos: true, maxLength, truncationSide: t.truncation ?? 'right' });
      stats.push(
        collectFeatureStats(model, enc, { targets, batchSize: opts.batchSize ?? 16, pooling, padTo: pooling === 'all-positions' ? maxLength : undefined, padId: tok.padId, task: t.name }),
      );
      opts.log?.(`${t.name}: ${stats[stats.length - 1]!.samples} samples, ${stats[stats.length - 1]!.rows} rows per feature group`);
    }
    const inits = await osrmInitParallel(stats, { mode, rank, seed, center: opts.center, divisor: opts.divisor }, opts.jobs);
    const slots = new Map(model.linearSlots().map((s) => [s.name, s.get()]));
    const outputs: OsrmInitOutput[] = [];
    for (const [ti, init] of inits.entries()) {
      const factors: LoraFactors[] = [];
      for (const g of init.groups) {
        const a = Float32Array.from(g.A);
        for (const m of g.group.modules) {
          const l = slots.get(m)!;
          factors.push({ path: m, a, b: new Float32Array(l.outFeatures * rank), rank, inFeatures: l.inFeatures, outFeatures: l.outFeatures });
        }
      }
      const w = await writePeftAdapter(
        join(outDir, init.task),
        factors,
        [],
        {
          r: rank,
          alpha,
          useRslora: opts.rslora ?? false,
          baseModel: modelDir,
          extraConfig: {
            amalgam_init: {
              kind: init.kind,
              mode,
              seed,
              samples,
              shuffle_seed: opts.shuffleSeed ?? 42,
              pooling,
              center: mode === 'covariance' ? (opts.center ?? false) : undefined,
              divisor: mode === 'mean' ? (opts.divisor ?? 'n') : undefined,
              other_tasks: tasks.filter((_, j) => j !== ti).map((t) => t.name),
            },
          },
        },
        { overwrite: opts.overwrite, inputs },
      );
      outputs.push({ task: init.task, dir: w.dir, check: checkInit(inits, stats, opts.center ?? false, ti) });
    }
    return { outputs, seconds: now() - t0, stats };
  } finally {
    model.dispose();
  }
}
