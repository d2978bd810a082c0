/**
 * The non-weight files of a merged model folder (merge-methods.md §7.3–§7.5): `config.json`, the
 * model card `README.md`, the configuration (`mergekit_config.yml`, and `amalgam_config.yml`) and
 * the tokenizer files: copied from the donor model, or written from the plan (a built tokenizer,
 * a chat template).
 */
import { writeFile } from 'node:fs/promises';
import { copyFileWritable } from '../io/atomic-dir.js';
import { createRequire } from 'node:module';
import { basename, join } from 'node:path';
import { stringify as stringifyYaml } from 'yaml';
import { ioError } from '../io/source.js';
import type { MergePlan } from './plan.js';

const require = createRequire(import.meta.url);

/** The package version, for the index metadata and the model card. */
export const AMALGAM_VERSION: string = (require('../../package.json') as { version: string }).version;

export interface OutputFileOptions {
  /** Write README.md (default true). */
  writeModelCard?: boolean;
  /** Title of the model card (default: the output folder's name). */
  name?: string;
}

/** The output config.json text. */
export function outputConfigJson(plan: MergePlan): string {
  return JSON.stringify(plan.outputConfig, null, 2) + '\n';
}

/** Hugging Face ids of the inputs, for the card's `base_model` list (local folders have none). */
function hubIds(plan: MergePlan): string[] {
  const out: string[] = [];
  for (const m of plan.models) if (m.hubId !== undefined && !out.includes(m.hubId)) out.push(m.hubId);
  return out;
}

function methodLink(plan: MergePlan): string {
  return plan.methodReference ? `[${plan.methodPrettyName}](${plan.methodReference})` : plan.methodPrettyName;
}

/**
 * The model card: YAML front matter (`base_model`, `library_name`, `tags`), the method with its
 * reference, the models and the configuration, as mergekit writes it.
 */
export function modelCard(plan: MergePlan, opts: { name: string }): string {
  const front = stringifyYaml({
    base_model: hubIds(plan),
    library_name: 'transformers',
    tags: ['merge', 'mergekit', 'amalgam'],
  }).trimEnd();
  // mergekit's card does not call slerp's first model a base.
  const base = plan.method === 'slerp' ? null : plan.baseModel;
  const baseText = base ? ` using \`${base}\` as a base` : '';
  const bullets = plan.models.filter((m) => m.id !== base).map((m) => `* \`${m.id}\``);
  const yamlText = plan.configYaml.trimEnd();
  return [
    '---',
    front,
    '---',
    `# ${opts.name}`,
    '',
    `This is a merge of pre-trained language models created with amalgam ${AMALGAM_VERSION}, which reproduces the merge methods of [mergekit](https://github.com/arcee-ai/mergekit).`,
    '',
    '## Merge Details',
    '### Merge Method',
    '',
    `This model was merged using the ${methodLink(plan)} merge method${baseText}.`,
    ...(plan.randomized ? ['', `The method draws random masks; they were drawn with random seed ${plan.randomSeed} (\`amalgam merge --random-seed ${plan.randomSeed}\` reproduces this model).`] : []),
    '',
    '### Models Merged',
    '',
    'The following models were included in the merge:',
    ...bullets,
    '',
    '### Configuration',
    '',
    'The following YAML configuration was used to produce this model:',
    '',
    '```yaml',
    yamlText,
    '```',
    '',
  ].join('\n');
}

/**
 * Writes config.json, the configuration copies, the model card and the tokenizer files into
 * `dir` (the staging folder). Returns the names written.
 */
/**
 * `amalgam_config.yml`: the configuration as given, after comments that record what else decided
 * the result, so the output folder says how to merge it again: the random seed, and the folder
 * each model reference was read from (relative references depend on where the merge ran).
 */
export function amalgamConfigText(plan: MergePlan, yamlText: string): string {
  const lines = [`# Merged by amalgam ${AMALGAM_VERSION} from the configuration below (also in mergekit_config.yml), with:`];
  if (plan.randomSeed !== null) lines.push(`#   random seed: ${plan.randomSeed} (amalgam merge --random-seed ${plan.randomSeed})`);
  lines.push('#   models read from:');
  for (const m of plan.models) lines.push(`#     ${m.id}: ${m.path}${m.adapter !== undefined ? ` + adapter ${m.adapter}` : ''}`);
  return lines.join('\n') + '\n' + yamlText;
}

export async function writeOutputFiles(
  plan: MergePlan,
  dir: string,
  opts: OutputFileOptions = {},
): Promise<string[]> {
  const files: string[] = [];
  const put = async (name: string, text: string) => {
    const path = join(dir, name);
    try {
      await writeFile(path, text);
    } catch (e) {
      throw ioError(path, e);
    }
    files.push(name);
  };
  await put('config.json', outputConfigJson(plan));
  const yamlText = plan.configYaml.endsWith('\n') ? plan.configYaml : plan.configYaml + '\n';
  await put('mergekit_config.yml', yamlText);
  await put('amalgam_config.yml', amalgamConfigText(plan, yamlText));
  if (opts.writeModelCard ?? true) {
    await put('README.md', modelCard(plan, { name: opts.name ?? basename(dir) }));
  }
  const generated = plan.generatedFiles ?? {};
  const donor = plan.models.find((m) => m.id === plan.tokenizerFiles.from);
  if (donor) {
    for (const f of plan.tokenizerFiles.files) {
      if (Object.prototype.hasOwnProperty.call(generated, f)) continue;
      const src = join(donor.path, f);
      try {
        await copyFileWritable(src, join(dir, f));
      } catch (e) {
        throw ioError(src, e);
      }
      files.push(f);
    }
  }
  for (const [name, text] of Object.entries(generated)) await put(name, text);
  return files;
}
