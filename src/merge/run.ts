/**
 * `runMerge`: the library form of `amalgam merge` — read the configuration, plan, and (unless it
 * is a dry run) execute. Also the text summaries the command line and the demo print.
 */
import { readdir, readFile, rm, stat } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';
import { AmalgamError } from '../errors.js';
import { loadMergeConfig } from '../config/parse.js';
import type { ConfigWarning, MergeConfig } from '../config/types.js';
import { byteSize, numel } from '../tensor/dtype.js';
import { refuseReplacingInputs } from '../io/atomic-dir.js';
import { executeMerge, planInputs, type ExecuteOptions, type ExecuteResult } from './execute.js';
import { planMerge, type MergePlan, type PlannedTensor, type PlanOptions } from './plan.js';

export interface RunMergeOptions extends Omit<PlanOptions, 'onWarning'>, ExecuteOptions {
  /** Plan only: nothing is read beyond headers and nothing is written. */
  dryRun?: boolean;
}

export interface RunMergeResult {
  plan: MergePlan;
  dryRun: boolean;
  /** Absolute output path. */
  outDir: string;
  /** Set unless `dryRun`. */
  execution?: ExecuteResult;
  /** Configuration and planning warnings, then merge warnings. */
  warnings: string[];
}

/**
 * Merges the models a configuration names into `outDir`. `config` is a path to a YAML file or
 * an already parsed configuration (`parseMergeConfig` / `validateMergeConfig`). Relative model
 * paths are resolved against `opts.baseDir` (default: the working folder, as in mergekit).
 */
export async function runMerge(config: string | MergeConfig, outDir: string, opts: RunMergeOptions = {}): Promise<RunMergeResult> {
  const warnings: string[] = [];
  const warn = (m: string) => {
    warnings.push(m);
    opts.onWarning?.(m);
  };
  let parsed: MergeConfig;
  let configYaml = opts.configYaml;
  if (typeof config === 'string') {
    parsed = await loadMergeConfig(config, { onWarning: (w: ConfigWarning) => warn(`${config}: '${w.path}': ${w.message}`) });
    configYaml ??= await readFile(config, 'utf8');
  } else {
    parsed = config;
  }
  const target = resolve(outDir);
  if (!opts.dryRun && !opts.overwrite) await refuseNonEmpty(target);
  const plan = await planMerge(parsed, { ...opts, ...(configYaml !== undefined ? { configYaml } : {}), onWarning: warn });
  await refuseReplacingInputs(target, [...planInputs(plan), ...(typeof config === 'string' ? [config] : [])]);
  if (opts.dryRun) return { plan, dryRun: true, outDir: target, warnings };
  await removeStaleStaging(target);
  const execution = await executeMerge(plan, target, { ...opts, onWarning: warn });
  return { plan, dryRun: false, outDir: target, execution, warnings };
}

/** Fails early (before planning) when the output path is a non-empty folder or a file. */
async function refuseNonEmpty(target: string): Promise<void> {
  let st;
  try {
    st = await stat(target);
  } catch {
    return;
  }
  if (!st.isDirectory()) {
    throw new AmalgamError('E_IO', 'output path exists and is not a folder', { file: target, hint: 'choose another output path' });
  }
  if ((await readdir(target)).length > 0) {
    throw new AmalgamError('E_IO', 'output folder exists and is not empty', { file: target, hint: 'choose another output path or pass --overwrite' });
  }
}

/**
 * Removes staging folders (`.<name>.partial-<pid>-<hex>`) that an earlier run beside `target`
 * left behind when it was killed: only those whose process no longer exists.
 */
export async function removeStaleStaging(target: string): Promise<string[]> {
  const parent = dirname(target);
  const prefix = `.${basename(target)}.partial-`;
  let names: string[];
  try {
    names = await readdir(parent);
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const m = /^(\d+)-[0-9a-f]{8}$/.exec(name.slice(prefix.length));
    if (!m) continue;
    const pid = Number(m[1]);
    if (pid === process.pid || processExists(pid)) continue;
    await rm(resolve(parent, name), { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

// ---------------------------------------------------------------------------------------------
// Sizes

/**
 * Parses a size in bytes: a plain integer, or a number with a decimal suffix K = 10³, M = 10⁶,
 * B or G = 10⁹, T = 10¹² (mergekit's `5B`), optionally followed by `B` (`500MB`), or a binary
 * suffix KiB, MiB, GiB.
 */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(k|m|b|g|t|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$/i.exec(text);
  if (!m) {
    throw new AmalgamError('E_USAGE', `cannot read the size "${text}"`, { hint: 'write bytes (5000000000) or use a suffix: 500M, 5B (= 5e9), 2GiB' });
  }
  const unit = (m[2] ?? '').toLowerCase();
  const mult: Record<string, number> = {
    '': 1,
    k: 1e3,
    kb: 1e3,
    m: 1e6,
    mb: 1e6,
    b: 1e9,
    g: 1e9,
    gb: 1e9,
    t: 1e12,
    tb: 1e12,
    kib: 2 ** 10,
    mib: 2 ** 20,
    gib: 2 ** 30,
    tib: 2 ** 40,
  };
  const v = Math.round(Number(m[1]) * mult[unit]!);
  if (!Number.isSafeInteger(v)) throw new AmalgamError('E_USAGE', `size "${text}" is too large`);
  return v;
}

function formatBytes(n: number): string {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(2)} MiB`;
  if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
  return `${n} B`;
}

function formatValue(v: unknown): string {
  if (typeof v === 'number') return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)));
  return String(v);
}

function paramLine(t: PlannedTensor): string {
  const g = Object.entries(t.params.global)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${formatValue(v)}`);
  const per = Object.entries(t.params.perModel)
    .map(([model, ps]) => {
      const vals = Object.entries(ps)
        .filter(([, v]) => v !== undefined)
        .map(([k, v]) => `${k}=${formatValue(v)}`);
      return vals.length ? `${model}: ${vals.join(' ')}` : '';
    })
    .filter(Boolean);
  return [g.length ? g.join(' ') : '', ...per].filter(Boolean).join('; ') || '(no parameters)';
}

/** Tensors whose parameters the summary shows: the first and last layer and the embedding. */
function sampleTensors(plan: MergePlan): PlannedTensor[] {
  const picks: PlannedTensor[] = [];
  const add = (t: PlannedTensor | undefined) => {
    if (t && !picks.includes(t)) picks.push(t);
  };
  const layerTensors = plan.tensors.filter((t) => t.section === 'layer');
  add(layerTensors.find((t) => t.name.includes('mlp')) ?? layerTensors[0]);
  const last = plan.numLayers - 1;
  add(layerTensors.find((t) => t.layer === last && t.name.includes('self_attn')) ?? layerTensors.find((t) => t.layer === last));
  add(plan.tensors.find((t) => t.isEmbed));
  return picks;
}

/** A readable summary of a plan (what `--dry-run` prints). */
export function formatPlanSummary(plan: MergePlan, opts: { outDir?: string; outShardSize?: number; jobs?: number } = {}): string {
  const lines: string[] = [];
  const s = plan.stats;
  lines.push(`method:       ${plan.method} (${plan.methodPrettyName})${plan.baseModel ? `, base model ${plan.baseModel}` : ''}`);
  if (plan.randomized) lines.push(`random seed:  ${plan.randomSeed}`);
  lines.push('inputs:');
  for (const m of plan.models) {
    lines.push(`  ${m.id}  (${m.path}; ${m.architecture}, ${m.numLayers} layers, ${m.dtypes.join('/')}, ${formatBytes(m.bytes)})`);
  }
  const slices = plan.slices
    .map((sl) => `${sl.outputStart}..${sl.outputStart + sl.length - 1} <- ${sl.sources.map((src) => `${src.model}[${src.start}..${src.start + sl.length - 1}]`).join(' + ')}`)
    .join('; ');
  lines.push(`output:       ${plan.architecture}, ${plan.numLayers} layers (${slices})`);
  const dtypes = [...new Set(plan.tensors.map((t) => t.dtype))].join('/');
  lines.push(`tensors:      ${s.tensors} (${s.parameters.toLocaleString('en-US')} values, ${dtypes}${plan.computeDtype ? `; inputs rounded to ${plan.computeDtype}` : ''})`);
  const shard = opts.outShardSize ?? 5e9;
  const shards = shard > 0 ? estimateShards(plan, shard) : 1;
  lines.push(`read/write:   ${formatBytes(s.readBytes)} read, ${formatBytes(s.writeBytes)} written in ${shards} shard${shards === 1 ? '' : 's'}`);
  lines.push(
    `memory:       tensor buffers bounded by ${formatBytes(s.memoryBound)} ((${s.maxInputs} inputs + 3) x largest tensor ${s.largestTensor.name}, ${formatBytes(s.largestTensor.f32Bytes)} as float32)`,
  );
  lines.push('parameters (samples):');
  for (const t of sampleTensors(plan)) lines.push(`  ${t.name} (t=${formatValue(t.t)}): ${paramLine(t)}`);
  const tok = plan.tokenizer;
  if (tok) {
    const appended = tok.appended.length ? `, ${tok.appended.length} appended` : '';
    lines.push(`tokenizer:    ${tok.source} (from ${tok.base}): ${tok.tokenCount} tokens${appended}; vocab_size ${tok.rowCount}`);
    const permuted = plan.tensors.filter((t) => t.permutation).map((t) => t.name);
    if (permuted.length) lines.push(`permuted:     ${permuted.join(', ')} onto the merged vocabulary`);
  }
  if (plan.chatTemplate !== null && plan.chatTemplate !== undefined) {
    const first = plan.chatTemplate.split('\n', 1)[0]!;
    lines.push(`chat template: ${first.length > 60 ? `${first.slice(0, 57)}...` : first}`);
  }
  const generated = Object.keys(plan.generatedFiles ?? {});
  if (generated.length) lines.push(`written files: ${generated.join(', ')}`);
  if (plan.tokenizerFiles.files.length) lines.push(`copied files: ${plan.tokenizerFiles.files.join(', ')} (from ${plan.tokenizerFiles.from})`);
  lines.push(`config.json:  from ${plan.donor}`);
  for (const w of plan.warnings) lines.push(`warning: ${w}`);
  if (opts.outDir) lines.push(`output path:  ${opts.outDir}`);
  return lines.join('\n');
}

function estimateShards(plan: MergePlan, limit: number): number {
  let shards = 1;
  let cur = 0;
  let any = false;
  for (const t of plan.tensors) {
    const bytes = byteSize(t.dtype, numel(t.shape)) ?? 0;
    if (any && cur + bytes > limit) {
      shards++;
      cur = 0;
    }
    cur += bytes;
    any = true;
  }
  return shards;
}

/** What a finished merge did and where its output is. */
/** The memory set aside for reading inputs ahead, as a note to the in-flight bound. */
function readAheadNote(e: ExecuteResult): string {
  return e.reads.setAsideBytes ? `, less ${formatBytes(e.reads.setAsideBytes)} set aside for inputs read whole` : '';
}

export function formatMergeReport(r: RunMergeResult): string {
  const e = r.execution;
  if (!e) return formatPlanSummary(r.plan, { outDir: r.outDir });
  const secs = e.elapsedMs / 1000;
  const lines = [
    `Merged ${r.plan.models.length} models with ${r.plan.method}${r.plan.randomized ? ` (random seed ${r.plan.randomSeed})` : ''} in ${secs.toFixed(2)} s (${e.jobs} job${e.jobs === 1 ? '' : 's'}):`,
    `  ${e.tensors} tensors, ${formatBytes(e.bytesRead)} read, ${formatBytes(e.bytesWritten)} written (${formatBytes((e.bytesRead + e.bytesWritten) / Math.max(secs, 1e-3))}/s)`,
    `  peak tensor buffers in flight: ${formatBytes(e.peakInFlightBytes)} (bound ${formatBytes(e.memoryBudget)}${readAheadNote(e)})`,
    `  files: ${e.files.join(', ')}`,
  ];
  if (e.reads.directFiles) lines.splice(2, 0, `  ${e.reads.directFiles} input file${e.reads.directFiles === 1 ? '' : 's'} read past the page cache (O_DIRECT)`);
  if (r.warnings.length) lines.push(`  ${r.warnings.length} warning${r.warnings.length === 1 ? '' : 's'} (shown above)`);
  lines.push(`Output: ${r.outDir}`);
  return lines.join('\n');
}
