/**
 * Baking a DAM merge (dam.md §4) into a plain Hugging Face checkpoint of the sources'
 * architecture and size, through the same output path as `amalgam merge`: a staging folder renamed
 * into place when complete, the sharded safetensors writer (shards + index above the shard size,
 * `amalgam_version` in the index), config.json and the tokenizer files of the first source, and a
 * model card. Beside the weights, `mergers.safetensors` holds the raw coefficients (before f)
 * under the reference's names, `{module}.mergers.{i}` and `{module}.bias_mergers.{i}`, with f, N,
 * the source ids, the loss and the training settings in its `__metadata__`.
 *
 * `bakeFromMergers` re-bakes from `mergers.safetensors` and the source folders alone, streaming
 * one tensor at a time; it writes the same weight bytes as baking the trained model.
 */
import { stat, writeFile } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { stringify as stringifyYaml } from 'yaml';
import { AmalgamError } from '../errors.js';
import { copyFileWritable, withStagingDir } from '../io/atomic-dir.js';
import { getConfigDtype, HF_EXTRA_FILES, readHfConfig, setConfigDtype } from '../io/hf.js';
import { openSafetensors, ShardedSafetensorsWriter, writeSafetensorsFile, type TensorData } from '../io/safetensors.js';
import { ioError, type TensorSource } from '../io/source.js';
import { AMALGAM_VERSION } from '../merge/output.js';
import { removeStaleStaging } from '../merge/run.js';
import { llamaConfigToHf, parseLlamaConfig, type LlamaConfig } from '../nn/config.js';
import { encodeFromF32, type FloatDType } from '../tensor/dtype.js';
import { averageInto, damActivation, damMergeForward, DAM_NON_LINEARITIES, type DamNonLinearity } from './layer.js';
import { checkSameArchitecture, planDamTensors, type DamInit, type DamModel, type DamTensorSpec } from './model.js';

export const MERGERS_FILE = 'mergers.safetensors';

/** What the card and the mergers metadata record about the run. */
export interface DamRunInfo {
  /** Names of the sources (default: their folders, or the ids they were given). */
  models?: string[];
  /** What each source was distilled on, in source order. */
  data?: string[];
  /** The loss settings (objective, temperature, λs, normalisation, top-k). */
  loss?: Record<string, unknown>;
  /** Optimiser settings (kind, lr, weight decay, α, β, …). */
  optimizer?: Record<string, unknown>;
  steps?: number;
  batchSize?: number;
  seed?: number;
  /** Real tokens seen per source. */
  tokens?: number[];
  /** Initial coefficients as configured. */
  init?: DamInit;
}

export interface DamBakeOptions {
  /** Weight dtype (default: the first source's config dtype, else F32). */
  dtype?: FloatDType;
  /** Shard size limit in bytes (default 5e9); 0 or less writes one file. */
  outShardSize?: number;
  overwrite?: boolean;
  /** Write README.md (default true). */
  writeModelCard?: boolean;
  /** Title of the card (default: the output folder's name). */
  name?: string;
  /** Folder whose config.json and tokenizer files are used (default: the first source's folder). */
  configFrom?: string;
  /** The run configuration, written as `dam_config.yml`. */
  recipeYaml?: string;
  info?: DamRunInfo;
}

export interface DamBakeResult {
  outDir: string;
  /** Files written, weights first. */
  files: string[];
  weightFiles: string[];
  tensors: number;
  bytesWritten: number;
  elapsedMs: number;
}

/** One output tensor and how to compute it. */
interface DamBakeTensor {
  spec: DamTensorSpec;
  values: () => Promise<Float32Array>;
}

async function isFile(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isFile();
  } catch {
    return false;
  }
}

const HUB_ID = /^[A-Za-z0-9][\w.-]*\/[\w.-]+$/;

/** Hub ids the sources' config.json files record (`_name_or_path`), for the card's `base_model`. */
async function hubIds(folders: readonly string[] | null): Promise<string[]> {
  const out: string[] = [];
  for (const f of folders ?? []) {
    try {
      const v = (await readHfConfig(f))['_name_or_path'];
      if (typeof v === 'string' && HUB_ID.test(v) && !out.includes(v)) out.push(v);
    } catch {
      // A folder without a readable config contributes no id.
    }
  }
  return out;
}

function formatValue(v: unknown): string {
  if (typeof v === 'number') return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)));
  if (typeof v === 'string') return v;
  return JSON.stringify(v);
}

/** The model card: sources and their data, the coefficients, the loss and the training run. */
export function damModelCard(o: {
  name: string;
  models: string[];
  hubIds: string[];
  nonLinearity: DamNonLinearity;
  coefficients: number;
  coefficientTensors: string[];
  averagedTensors: number;
  info: DamRunInfo;
  recipeYaml?: string;
}): string {
  const front = stringifyYaml({ base_model: o.hubIds, library_name: 'transformers', tags: ['merge', 'amalgam', 'dam'] }).trimEnd();
  const info = o.info;
  const lines = [
    '---',
    front,
    '---',
    `# ${o.name}`,
    '',
    `This is a merge of ${o.models.length} pre-trained language models created with amalgam ${AMALGAM_VERSION} using DAM, [Differentiable Adaptive Merging](https://arxiv.org/abs/2410.08371): every merged tensor is Σᵢ Wᵢ·diag(f(cᵢ)), with one learned coefficient per input column per model, distilled from each model on its own data.`,
    '',
    '## Models Merged',
    '',
    '| # | model | distilled on |',
    '|---|---|---|',
    ...o.models.map((m, i) => `| ${i} | \`${m}\` | ${info.data?.[i] ?? '—'} |`),
    '',
    '## Coefficients',
    '',
    `* non-linearity f: \`${o.nonLinearity}\``,
    `* initial raw coefficients: ${info.init === undefined ? '—' : `\`${formatValue(info.init)}\``}`,
    `* ${o.coefficients.toLocaleString('en-US')} coefficients on ${o.coefficientTensors.length} tensors; ${o.averagedTensors} tensors are the uniform average of the models`,
    `* raw coefficients (before f): \`${MERGERS_FILE}\`, named \`{module}.mergers.{i}\` (and \`{module}.bias_mergers.{i}\` for biases)`,
    '',
    '## Loss',
    '',
  ];
  if (info.loss) {
    const l = info.loss;
    const obj = String(l['objective'] ?? 'kl');
    const desc =
      obj === 'kl'
        ? `Σᵢ T²·KL(pᵢ ‖ p_merged) on model i's own data, mean over real tokens${l['topK'] ? `, over the teacher's top-${formatValue(l['topK'])} logits` : ', full vocabulary'}`
        : obj === 'mse'
          ? 'Σᵢ λ·mean squared difference of the logits of model i and the merge on model i\'s own data'
          : 'Σᵢ λ·T²·entropy of the merged predictions on model i\'s data';
    lines.push(`* objective: ${desc}`);
    for (const [k, v] of Object.entries(l)) if (k !== 'objective' && v !== undefined && v !== null) lines.push(`* ${k}: ${formatValue(v)}`);
  } else {
    lines.push('* not recorded');
  }
  lines.push('', '## Training', '');
  const train: [string, unknown][] = [
    ['steps', info.steps],
    ['batch per model and step', info.batchSize],
    ['seed', info.seed],
    ['tokens per model', info.tokens],
  ];
  for (const [k, v] of Object.entries(info.optimizer ?? {})) train.push([`optimizer ${k}`, v]);
  const shown = train.filter(([, v]) => v !== undefined);
  if (shown.length) for (const [k, v] of shown) lines.push(`* ${k}: ${formatValue(v)}`);
  else lines.push('* not recorded');
  if (o.recipeYaml) lines.push('', '## Configuration', '', '```yaml', o.recipeYaml.trimEnd(), '```');
  lines.push('');
  return lines.join('\n');
}

/** The mergers.safetensors `__metadata__`. */
function mergersMetadata(nonLinearity: DamNonLinearity, models: string[], info: DamRunInfo): Record<string, string> {
  const md: Record<string, string> = {
    format: 'pt',
    amalgam_version: AMALGAM_VERSION,
    non_linearity: nonLinearity,
    num_models: String(models.length),
    models: JSON.stringify(models),
  };
  if (info.init !== undefined) md['init'] = JSON.stringify(info.init);
  if (info.loss) md['loss'] = JSON.stringify(info.loss);
  if (info.optimizer) md['optimizer'] = JSON.stringify(info.optimizer);
  if (info.data) md['data'] = JSON.stringify(info.data);
  if (info.steps !== undefined) md['steps'] = String(info.steps);
  if (info.batchSize !== undefined) md['batch_size'] = String(info.batchSize);
  if (info.seed !== undefined) md['seed'] = String(info.seed);
  return md;
}

interface WriteFolderArgs {
  outDir: string;
  config: LlamaConfig;
  /** Folder of config.json and the tokenizer files, or null (config.json from `config`). */
  configFrom: string | null;
  tensors: DamBakeTensor[];
  mergers: TensorData[];
  nonLinearity: DamNonLinearity;
  models: string[];
  folders: string[] | null;
  opts: DamBakeOptions;
}

async function writeDamFolder(a: WriteFolderArgs): Promise<DamBakeResult> {
  const started = Date.now();
  const opts = a.opts;
  const info = opts.info ?? {};
  let hfConfig: Record<string, unknown>;
  if (a.configFrom) hfConfig = { ...(await readHfConfig(a.configFrom)) };
  else hfConfig = llamaConfigToHf(a.config);
  const dtype: FloatDType = opts.dtype ?? getConfigDtype(hfConfig) ?? 'F32';
  setConfigDtype(hfConfig, dtype);
  const shardSize = opts.outShardSize === undefined ? 5e9 : opts.outShardSize > 0 ? opts.outShardSize : Number.MAX_SAFE_INTEGER;
  await removeStaleStaging(resolve(a.outDir));
  let weightFiles: string[] = [];
  const other: string[] = [];
  let bytesWritten = 0;
  const outDir = await withStagingDir(
    a.outDir,
    async (stage) => {
      const writer = await ShardedSafetensorsWriter.create(
        stage.path,
        a.tensors.map((t) => ({ name: t.spec.name, dtype, shape: t.spec.shape })),
        { maxShardBytes: shardSize, metadata: { format: 'pt' }, indexMetadata: { amalgam_version: AMALGAM_VERSION } },
      );
      try {
        for (const t of a.tensors) {
          const bytes = encodeFromF32(dtype, await t.values());
          await writer.write(t.spec.name, bytes);
          bytesWritten += bytes.byteLength;
        }
        const res = await writer.finish();
        weightFiles = res.indexFile ? [...res.files, basename(res.indexFile)] : res.files;
      } catch (e) {
        await writer.abort();
        throw e;
      }
      await writeSafetensorsFile(stage.file(MERGERS_FILE), a.mergers, mergersMetadata(a.nonLinearity, a.models, info));
      other.push(MERGERS_FILE);
      const put = async (name: string, text: string) => {
        const path = stage.file(name);
        try {
          await writeFile(path, text);
        } catch (e) {
          throw ioError(path, e);
        }
        other.push(name);
      };
      await put('config.json', JSON.stringify(hfConfig, null, 2) + '\n');
      if (opts.recipeYaml !== undefined) await put('dam_config.yml', opts.recipeYaml.endsWith('\n') ? opts.recipeYaml : opts.recipeYaml + '\n');
      if (opts.writeModelCard ?? true) {
        const trained = a.tensors.filter((t) => t.spec.coefficientNames);
        await put(
          'README.md',
          damModelCard({
            name: opts.name ?? basename(stage.target),
            models: info.models ?? a.models,
            hubIds: await hubIds(a.folders),
            nonLinearity: a.nonLinearity,
            coefficients: a.mergers.reduce((s, m) => s + m.data.byteLength / 4, 0),
            coefficientTensors: trained.map((t) => t.spec.name),
            averagedTensors: a.tensors.length - trained.length,
            info,
            recipeYaml: opts.recipeYaml,
          }),
        );
      }
      if (a.configFrom) {
        for (const f of HF_EXTRA_FILES) {
          const src = join(a.configFrom, f);
          if (!(await isFile(src))) continue;
          try {
            await copyFileWritable(src, stage.file(f));
          } catch (e) {
            throw ioError(src, e);
          }
          other.push(f);
        }
      }
      return stage.target;
    },
    { overwrite: opts.overwrite, inputs: [...(a.folders ?? []), ...(a.configFrom ? [a.configFrom] : [])] },
  );
  return { outDir, files: [...weightFiles, ...other], weightFiles, tensors: a.tensors.length, bytesWritten, elapsedMs: Date.now() - started };
}

function f32Bytes(data: Float32Array): Uint8Array {
  return encodeFromF32('F32', data);
}

/** Writes the DAM model's merge as a Hugging Face folder plus mergers.safetensors. */
export async function bakeDam(dam: DamModel, outDir: string, opts: DamBakeOptions = {}): Promise<DamBakeResult> {
  const configFrom = opts.configFrom ?? dam.folders?.[0] ?? null;
  const mergers: TensorData[] = dam.coefficients().map((p) => ({ name: p.name, dtype: 'F32', shape: [...p.shape], data: f32Bytes(p.data) }));
  const info: DamRunInfo = { init: dam.options.init, ...(opts.info ?? {}) };
  return writeDamFolder({
    outDir,
    config: dam.config,
    configFrom,
    tensors: dam.tensors.map((t) => ({ spec: t, values: async () => dam.mergedValues(t) })),
    mergers,
    nonLinearity: dam.act.name,
    models: dam.folders ?? dam.sourceIds,
    folders: dam.folders,
    opts: { ...opts, info },
  });
}

export interface DamBakeFromMergersOptions extends DamBakeOptions {
  /** f, when the mergers file does not record it. */
  nonLinearity?: DamNonLinearity;
}

/**
 * Re-bakes a DAM merge from the source folders (in their original order) and a
 * mergers.safetensors, one tensor at a time: a tensor whose coefficient vectors are present is
 * merged with them, every other tensor is the uniform average.
 */
export async function bakeFromMergers(sourceDirs: readonly string[], mergersPath: string, outDir: string, opts: DamBakeFromMergersOptions = {}): Promise<DamBakeResult> {
  const n = sourceDirs.length;
  if (n < 2) throw new AmalgamError('E_USAGE', `DAM merges at least 2 models, got ${n}`);
  const mergers = await openSafetensors(mergersPath);
  const sources: TensorSource[] = [];
  try {
    const md = mergers.metadata;
    const recordedN = md['num_models'] !== undefined ? Number(md['num_models']) : undefined;
    if (recordedN !== undefined && recordedN !== n) {
      throw new AmalgamError('E_USAGE', `the coefficients are for ${recordedN} models, ${n} source folders given`, { file: mergersPath });
    }
    const f = (opts.nonLinearity ?? md['non_linearity']) as DamNonLinearity | undefined;
    if (!f) throw new AmalgamError('E_METADATA', 'the file does not record non_linearity', { file: mergersPath, hint: 'pass the non-linearity the coefficients were trained with' });
    if (!DAM_NON_LINEARITIES.includes(f)) throw new AmalgamError('E_METADATA', `unknown non_linearity '${f}'`, { file: mergersPath });
    const act = damActivation(f);
    const configs = await Promise.all(sourceDirs.map(async (d) => parseLlamaConfig(await readHfConfig(d), join(d, 'config.json'))));
    checkSameArchitecture(configs, sourceDirs);
    const config = configs[0]!;
    for (const d of sourceDirs) sources.push(await openSafetensors(d));
    const all = planDamTensors(config, n, { targets: 'all-linear', embeddings: true, norms: true });
    const known = new Set<string>();
    const specs = all.map((s): DamTensorSpec => {
      const names = s.coefficientNames!;
      names.forEach((x) => known.add(x));
      const present = names.filter((x) => mergers.has(x));
      if (present.length > 0 && present.length < n) {
        throw new AmalgamError('E_MISSING', `${n - present.length} of the ${n} coefficient vectors are missing`, { file: mergersPath, key: names.find((x) => !mergers.has(x)) });
      }
      for (const x of present) {
        const shape = mergers.info(x).shape;
        if (shape.length !== 1 || shape[0] !== s.cols) throw new AmalgamError('E_SHAPE', `coefficient vector has shape [${shape.join(', ')}], expected [${s.cols}]`, { file: mergersPath, key: x });
      }
      return { ...s, coefficientNames: present.length ? names : null };
    });
    const unknown = mergers
      .tensors()
      .map((t) => t.name)
      .filter((x) => !known.has(x));
    if (unknown.length) throw new AmalgamError('E_FORMAT', `${unknown.length} tensor(s) are not coefficients of this architecture: ${unknown.slice(0, 3).join(', ')}`, { file: mergersPath, key: unknown[0] });
    for (const s of specs) {
      sources.forEach((src, i) => {
        const shape = src.info(s.name).shape;
        if (shape.length !== s.shape.length || shape.some((v, k) => v !== s.shape[k])) {
          throw new AmalgamError('E_SHAPE', `stored shape [${shape.join(', ')}] differs from [${s.shape.join(', ')}]`, { file: sourceDirs[i], key: s.name });
        }
      });
    }
    const coeffData = new Map<string, Float32Array>();
    const mergerTensors: TensorData[] = [];
    for (const s of specs) {
      for (const x of s.coefficientNames ?? []) {
        const v = await mergers.readF32(x);
        coeffData.set(x, v);
        mergerTensors.push({ name: x, dtype: 'F32', shape: [v.length], data: f32Bytes(v) });
      }
    }
    const tensors: DamBakeTensor[] = specs.map((s) => ({
      spec: s,
      values: async () => {
        const srcs: Float32Array[] = [];
        for (const src of sources) srcs.push(await src.readF32(s.name));
        const out = new Float32Array(s.rows * s.cols);
        if (s.coefficientNames) {
          damMergeForward(
            out,
            srcs,
            s.coefficientNames.map((x) => coeffData.get(x)!),
            s.rows,
            s.cols,
            act,
          );
        } else {
          averageInto(out, srcs);
        }
        return out;
      },
    }));
    const info: DamRunInfo = { ...parseRecordedInfo(md), ...(opts.info ?? {}) };
    return await writeDamFolder({
      outDir,
      config,
      configFrom: opts.configFrom ?? sourceDirs[0]!,
      tensors,
      mergers: mergerTensors,
      nonLinearity: f,
      models: recordedModels(md) ?? [...sourceDirs],
      folders: [...sourceDirs],
      opts: { ...opts, info },
    });
  } finally {
    await Promise.all([mergers, ...sources].map((s) => s.close().catch(() => {})));
  }
}

function tryJson(v: string | undefined): unknown {
  if (v === undefined) return undefined;
  try {
    return JSON.parse(v);
  } catch {
    return undefined;
  }
}

function recordedModels(md: Record<string, string>): string[] | undefined {
  const m = tryJson(md['models']);
  return Array.isArray(m) && m.every((x) => typeof x === 'string') ? (m as string[]) : undefined;
}

/** The run information a mergers file records. */
function parseRecordedInfo(md: Record<string, string>): DamRunInfo {
  const info: DamRunInfo = {};
  const obj = (v: unknown) => (v && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined);
  const loss = obj(tryJson(md['loss']));
  if (loss) info.loss = loss;
  const optimizer = obj(tryJson(md['optimizer']));
  if (optimizer) info.optimizer = optimizer;
  const data = tryJson(md['data']);
  if (Array.isArray(data)) info.data = data.map(String);
  const init = tryJson(md['init']);
  if (init !== undefined) info.init = init as DamInit;
  for (const [key, field] of [
    ['steps', 'steps'],
    ['batch_size', 'batchSize'],
    ['seed', 'seed'],
  ] as const) {
    const v = md[key] !== undefined ? Number(md[key]) : NaN;
    if (Number.isFinite(v)) info[field] = v;
  }
  return info;
}
