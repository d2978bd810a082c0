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
 * one tensor at a time; it writes the same weight bytes as baking the trained model. It first
 * checks that the folders are the recorded sources in the recorded order: by their real paths,
 * and by a fingerprint of their weights (`weightsFingerprint`) where one is recorded or the
 * recorded folder can still be read.
 */
import { createHash } from 'node:crypto';
import { stat, writeFile } from 'node:fs/promises';
import { basename, isAbsolute, join, resolve } from 'node:path';
import { stringify as stringifyYaml } from 'yaml';
import { AmalgamError } from '../errors.js';
import { checkOutputFolder, copyFileWritable, realOrResolved, withStagingDir } from '../io/atomic-dir.js';
import { getConfigDtype, HF_EXTRA_FILES, readHfConfig, setConfigDtype } from '../io/hf.js';
import { canReadRawInto, openSafetensors, ShardedSafetensorsWriter, writeSafetensorsFile, type TensorData } from '../io/safetensors.js';
import { FileByteReader, ioError, type TensorSource } from '../io/source.js';
import { AMALGAM_VERSION } from '../merge/output.js';
import { removeStaleStaging } from '../merge/run.js';
import { llamaConfigToHf, parseLlamaConfig, type LlamaConfig } from '../nn/config.js';
import { encodeFromF32, type FloatDType } from '../tensor/dtype.js';
import { averageInto, damActivation, damMergeForward, DAM_NON_LINEARITIES, type DamNonLinearity } from './layer.js';
import { checkSameArchitecture, planDamTensors, type DamInit, type DamModel, type DamTensorSpec } from './model.js';

export const MERGERS_FILE = 'mergers.safetensors';
/** The recipe of the run, in the output folder. */
export const DAM_CONFIG = 'dam_config.yml';

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
  /** The run configuration, written as `dam_config.yml` (and shown in the model card). */
  recipeYaml?: string;
  /** Files the run read besides the source folders (recipe, data): the output may not be or hold one. */
  inputs?: readonly string[];
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

/** Metadata key of the sources' weight fingerprints (a JSON list, one per source). */
export const FINGERPRINTS_KEY = 'model_fingerprints';

/** Stored bytes hashed from the start, the middle and the end of each tensor. */
const SAMPLE_BYTES = 64;

function sampleRanges(length: number): [number, number][] {
  if (length <= 3 * SAMPLE_BYTES) return [[0, length]];
  return [
    [0, SAMPLE_BYTES],
    [Math.floor((length - SAMPLE_BYTES) / 2), SAMPLE_BYTES],
    [length - SAMPLE_BYTES, SAMPLE_BYTES],
  ];
}

/**
 * A cheap fingerprint of a model's weights: SHA-256 (hex) over every tensor's name, dtype and
 * shape, in name order, and 64 stored bytes from its start, middle and end. Fine-tunes of one
 * base have identical safetensors headers; their sampled bytes differ. Sharding does not change
 * the fingerprint; converting the dtype does.
 */
export async function weightsFingerprint(src: TensorSource): Promise<string> {
  const hash = createHash('sha256');
  const readers = new Map<string, FileByteReader>();
  try {
    const infos = src.tensors().sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const t of infos) {
      hash.update(`${t.name}\0${t.dtype}\0${t.shape.join(',')}\0`);
      const loc = canReadRawInto(src) ? src.locate(t.name) : undefined;
      if (!loc) {
        const raw = await src.readRaw(t.name);
        for (const [o, l] of sampleRanges(raw.length)) hash.update(raw.subarray(o, o + l));
        continue;
      }
      let r = readers.get(loc.path);
      if (!r) {
        r = await FileByteReader.open(loc.path);
        readers.set(loc.path, r);
      }
      for (const [o, l] of sampleRanges(loc.length)) hash.update(await r.read(loc.offset + o, l));
    }
  } finally {
    await Promise.all([...readers.values()].map((r) => r.close().catch(() => {})));
  }
  return hash.digest('hex');
}

/** The fingerprint of a model folder's weights, or null when the folder cannot be read. */
async function folderFingerprint(dir: string): Promise<string | null> {
  let src: TensorSource;
  try {
    src = await openSafetensors(dir);
  } catch {
    return null;
  }
  try {
    return await weightsFingerprint(src);
  } catch {
    return null;
  } finally {
    await src.close().catch(() => {});
  }
}

/** The mergers.safetensors `__metadata__`. */
function mergersMetadata(nonLinearity: DamNonLinearity, models: string[], info: DamRunInfo, fingerprints: string[] | null): Record<string, string> {
  const md: Record<string, string> = {
    format: 'pt',
    amalgam_version: AMALGAM_VERSION,
    non_linearity: nonLinearity,
    num_models: String(models.length),
    models: JSON.stringify(models),
  };
  if (fingerprints) md[FINGERPRINTS_KEY] = JSON.stringify(fingerprints);
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
  /** The sources' weight fingerprints, recorded in mergers.safetensors (null: not known). */
  fingerprints: string[] | null;
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
      await writeSafetensorsFile(stage.file(MERGERS_FILE), a.mergers, mergersMetadata(a.nonLinearity, a.models, info, a.fingerprints));
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
      if (opts.recipeYaml !== undefined) await put(DAM_CONFIG, opts.recipeYaml.endsWith('\n') ? opts.recipeYaml : opts.recipeYaml + '\n');
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
    { overwrite: opts.overwrite, inputs: [...(a.folders ?? []), ...(a.configFrom ? [a.configFrom] : []), ...(opts.inputs ?? [])] },
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
  let fingerprints: string[] | null = null;
  if (dam.folders) {
    const fps = await Promise.all(dam.folders.map(folderFingerprint));
    if (fps.every((f): f is string => f !== null)) fingerprints = fps;
  }
  return writeDamFolder({
    outDir,
    config: dam.config,
    configFrom,
    tensors: dam.tensors.map((t) => ({ spec: t, values: async () => dam.mergedValues(t) })),
    mergers,
    nonLinearity: dam.act.name,
    models: dam.folders ?? dam.sourceIds,
    folders: dam.folders,
    fingerprints,
    opts: { ...opts, info },
  });
}

export interface DamBakeFromMergersOptions extends DamBakeOptions {
  /** f, when the mergers file does not record it (files of the reference code; it trains with tanh). */
  nonLinearity?: DamNonLinearity;
  /** Called with each warning (source folders that moved since training). */
  onWarning?: (message: string) => void;
}

/** A DAM coefficient tensor's name: `{module}.mergers.{i}` or `{module}.bias_mergers.{i}`. */
const COEFFICIENT_NAME = /\.(bias_)?mergers\.\d+$/;

function folderName(p: string): string {
  return basename(p.replace(/[\\/]+$/, ''));
}

/**
 * Checks that the source folders are the models the coefficients were trained on, in the same
 * order, before anything is baked. The mergers file records the sources (`models`: absolute
 * folder paths from `dam train`) and their weight fingerprints (`model_fingerprints`, files
 * written since fingerprints were added). Source i is the recorded source i when its weights
 * have the recorded fingerprint, or, where none is recorded, the fingerprint of the recorded
 * folder if that can still be read, or else when its real path is the recorded one. A folder that
 * is another recorded source (by path, fingerprint or folder name), or whose weights differ, is
 * an error; a moved folder whose weights match, or that cannot be compared, is a warning.
 */
async function checkRecordedSources(
  dirs: readonly string[],
  givenFps: readonly string[],
  md: Record<string, string>,
  mergersPath: string,
): Promise<string[]> {
  const n = dirs.length;
  const recorded = recordedModels(md);
  const paths = recorded && recorded.length === n && recorded.every((p) => isAbsolute(p)) ? recorded : null;
  const recordedFps = recordedFingerprints(md, n);
  if (!paths && !recordedFps) return [];
  const given = dirs.map((d) => resolve(d));
  const givenReal = await Promise.all(dirs.map(realOrResolved));
  const recordedReal = paths ? await Promise.all(paths.map(realOrResolved)) : null;
  const moved = givenReal.map((g, i) => recordedReal !== null && g !== recordedReal[i]);
  const want: (string | null)[] = [];
  for (let i = 0; i < n; i++) want.push(recordedFps?.[i] ?? (moved[i] ? await folderFingerprint(recordedReal![i]!) : null));
  const label = (i: number) => (paths ? paths[i]! : `source ${i}`);
  /** The other recorded source that source i is, or -1. */
  const otherSource = (i: number): number => {
    for (let j = 0; j < n; j++) {
      if (j === i) continue;
      if (recordedReal && givenReal[i] === recordedReal[j] && recordedReal[j] !== recordedReal[i]) return j;
      if (want[j] !== null && givenFps[i] === want[j]) return j;
    }
    if (paths && want[i] === null && moved[i]) {
      const name = folderName(given[i]!);
      if (name !== folderName(paths[i]!)) {
        const j = paths.findIndex((p, k) => k !== i && folderName(p) === name);
        if (j >= 0) return j;
      }
    }
    return -1;
  };
  const problems: string[] = [];
  const warnings: string[] = [];
  for (let i = 0; i < n; i++) {
    const same = want[i] !== null ? givenFps[i] === want[i] : moved[i] ? null : true;
    if (same === true) {
      if (moved[i]) warnings.push(`source ${i} was recorded as ${label(i)}; ${given[i]} is used, whose weights match the recorded ones`);
      continue;
    }
    const j = otherSource(i);
    if (j >= 0) problems.push(`source ${i} (${given[i]}) is recorded source ${j} (${label(j)}), not ${label(i)}`);
    else if (same === false) problems.push(moved[i] ? `source ${i} (${given[i]}) has other weights than recorded source ${i} (${label(i)})` : `the weights in ${given[i]} have changed since the coefficients were trained`);
    else if (moved[i]) warnings.push(`source ${i} was recorded as ${label(i)}, which cannot be read; ${given[i]} is used, and the file records no fingerprint to check that it is the same model`);
  }
  if (problems.length) {
    throw new AmalgamError(
      'E_USAGE',
      [
        'the source folders do not match the models the coefficients were trained on:',
        ...problems.map((p) => `  ${p}`),
        `  recorded: ${(paths ?? recorded ?? []).join(', ')}`,
        `  given:    ${given.join(', ')}`,
      ].join('\n'),
      { file: mergersPath, hint: 'give the folders of the training run, in the recorded order; the "Models Merged" table of the model card lists them' },
    );
  }
  return warnings;
}

/**
 * Re-bakes a DAM merge from the source folders (in their original order) and a
 * mergers.safetensors, one tensor at a time: a tensor whose coefficient vectors are present is
 * merged with them, every other tensor is the uniform average. The folders must be the recorded
 * sources in the recorded order (`checkRecordedSources`).
 */
export async function bakeFromMergers(sourceDirs: readonly string[], mergersPath: string, outDir: string, opts: DamBakeFromMergersOptions = {}): Promise<DamBakeResult> {
  const n = sourceDirs.length;
  if (n < 2) throw new AmalgamError('E_USAGE', `DAM merges at least 2 models, got ${n}`);
  await checkOutputFolder(outDir, { overwrite: opts.overwrite, inputs: [...sourceDirs, mergersPath, ...(opts.inputs ?? [])] });
  const mergers = await openSafetensors(mergersPath);
  const sources: TensorSource[] = [];
  try {
    const md = mergers.metadata;
    const names = mergers.tensors().map((t) => t.name);
    if (!names.some((x) => COEFFICIENT_NAME.test(x))) {
      throw new AmalgamError('E_FORMAT', `not a mergers file written by \`amalgam dam train\`: it holds no DAM coefficients ({module}.mergers.{i})${names.length ? `, but ${names.slice(0, 2).join(', ')}${names.length > 2 ? ', …' : ''}` : ''}`, {
        file: mergersPath,
        hint: `pass the ${MERGERS_FILE} from the output folder of \`amalgam dam train --out\``,
      });
    }
    const recordedN = md['num_models'] !== undefined ? Number(md['num_models']) : undefined;
    if (recordedN !== undefined && recordedN !== n) {
      throw new AmalgamError('E_USAGE', `the coefficients are for ${recordedN} models, ${n} source folders given`, { file: mergersPath });
    }
    const recordedF = md['non_linearity'] as DamNonLinearity | undefined;
    if (recordedF !== undefined && opts.nonLinearity !== undefined && opts.nonLinearity !== recordedF) {
      throw new AmalgamError('E_USAGE', `the file records non_linearity ${recordedF}, but ${opts.nonLinearity} was given`, { file: mergersPath, hint: 'leave out the non-linearity (--non-linearity): the recorded one is used' });
    }
    const f = recordedF ?? opts.nonLinearity;
    if (!f) {
      throw new AmalgamError('E_METADATA', 'the file does not record non_linearity', {
        file: mergersPath,
        hint: `pass the non-linearity the coefficients were trained with (--non-linearity ${DAM_NON_LINEARITIES.join(' | ')}; the reference DAM code trains with tanh)`,
      });
    }
    if (!DAM_NON_LINEARITIES.includes(f)) throw new AmalgamError('E_METADATA', `unknown non_linearity '${f}'`, { file: mergersPath });
    const act = damActivation(f);
    const configs = await Promise.all(sourceDirs.map(async (d) => parseLlamaConfig(await readHfConfig(d), join(d, 'config.json'))));
    checkSameArchitecture(configs, sourceDirs);
    const config = configs[0]!;
    for (const d of sourceDirs) sources.push(await openSafetensors(d));
    const fingerprints = await Promise.all(sources.map(weightsFingerprint));
    for (const w of await checkRecordedSources(sourceDirs, fingerprints, md, mergersPath)) opts.onWarning?.(w);
    const all = planDamTensors(config, n, { targets: 'all-linear', embeddings: true, norms: true });
    const known = new Set<string>();
    const specs = all.map((s): DamTensorSpec => {
      const coefficients = s.coefficientNames!;
      coefficients.forEach((x) => known.add(x));
      const present = coefficients.filter((x) => mergers.has(x));
      if (present.length > 0 && present.length < n) {
        throw new AmalgamError('E_MISSING', `${n - present.length} of the ${n} coefficient vectors are missing`, { file: mergersPath, key: coefficients.find((x) => !mergers.has(x)) });
      }
      for (const x of present) {
        const shape = mergers.info(x).shape;
        if (shape.length !== 1 || shape[0] !== s.cols) throw new AmalgamError('E_SHAPE', `coefficient vector has shape [${shape.join(', ')}], expected [${s.cols}]`, { file: mergersPath, key: x });
      }
      return { ...s, coefficientNames: present.length ? coefficients : null };
    });
    const unknown = names.filter((x) => !known.has(x));
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
      models: sourceDirs.map((d) => resolve(d)),
      folders: [...sourceDirs],
      fingerprints,
      opts: { ...opts, info, inputs: [mergersPath, ...(opts.inputs ?? [])] },
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

/** The recorded weight fingerprints, one per source (null where unknown), or undefined. */
function recordedFingerprints(md: Record<string, string>, n: number): (string | null)[] | undefined {
  const m = tryJson(md[FINGERPRINTS_KEY]);
  if (!Array.isArray(m) || m.length !== n || !m.every((x) => typeof x === 'string' || x === null)) return undefined;
  return m as (string | null)[];
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
