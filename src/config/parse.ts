/** Reading a mergekit YAML configuration into a validated `MergeConfig`. */
import { readFile } from 'node:fs/promises';
import { isAlias, isMap, isScalar, isSeq, LineCounter, parseDocument } from 'yaml';
import type { Document, ScalarTag } from 'yaml';
import type { z } from 'zod';
import { AmalgamError } from '../errors.js';
import { ConfigError, formatPath } from './issues.js';
import type { ConfigIssue, PathSegment } from './issues.js';
import { methodParameters, mergeMethodNames } from './methods.js';
import { configErrorMap, mergeConfigSchema, MISSING_KEY, TOP_LEVEL_KEYS } from './schema.js';
import type { IssueParams } from './schema.js';
import { closestMatches, didYouMean } from './suggest.js';
import { checkMergeConfig } from './validate.js';
import type { ConfigWarning, MergeConfig } from './types.js';

export interface ParseConfigOptions {
  /** File name used in error messages. */
  file?: string;
  /** Receives remarks that do not stop the merge (keys accepted but ignored). */
  onWarning?: (warning: ConfigWarning) => void;
}

/** Source position of a key path: the key itself when the path ends at a mapping key, else the value. */
type Locate = (path: PathSegment[]) => { line: number; column: number } | undefined;

const errorMap = configErrorMap as unknown as z.core.$ZodErrorMap;

/** The parameter name `key` (or a close spelling) denotes, for the method or else for any method. */
function parameterNameLike(key: string, method: unknown): string | undefined {
  const methods = typeof method === 'string' && methodParameters(method) ? [method] : mergeMethodNames();
  const names = methods.flatMap((m) => (methodParameters(m) ?? []).map((p) => p.name));
  return closestMatches(key, names, 1)[0];
}

function fromZod(issues: readonly z.core.$ZodIssue[], method: unknown): ConfigIssue[] {
  const out: (ConfigIssue & { suggested?: string })[] = [];
  for (const iss of issues) {
    const path = iss.path.filter((s): s is PathSegment => typeof s !== 'symbol');
    const params = (iss as { params?: IssueParams }).params;
    const last = path[path.length - 1];
    if (iss.code === 'custom' && params?.unknownKey) {
      const key = String(last);
      const known = params.known ?? [];
      let hint = didYouMean(key, known);
      const suggested = hint ? hint.slice(hint.indexOf('`') + 1, hint.lastIndexOf('`')) : undefined;
      const param = !hint && known.includes('parameters') ? parameterNameLike(key, method) : undefined;
      if (param !== undefined) {
        hint =
          param === key
            ? `\`${key}\` is a parameter: put it under \`parameters:\``
            : `did you mean the parameter \`${param}\`? Parameters go under \`parameters:\``;
      }
      if (!hint && known.length) hint = `allowed here: ${known.map((k) => `\`${k}\``).join(', ')}`;
      out.push({ path, message: `unknown key \`${key}\``, hint, suggested });
    } else if (iss.message === MISSING_KEY) {
      out.push({ path, message: `missing required key \`${String(last)}\`` });
    } else {
      out.push({ path, message: iss.message, ...(params?.hint ? { hint: params.hint } : {}) });
    }
  }
  // A misspelled key also makes the intended key "missing": report the misspelling only.
  const explained = new Set(
    out
      .filter((i) => i.suggested !== undefined)
      .map((i) => formatPath([...i.path.slice(0, -1), i.suggested as string])),
  );
  return out
    .filter((i) => !(i.message.startsWith('missing required key') && explained.has(formatPath(i.path))))
    .map(({ suggested: _s, ...rest }) => rest);
}

function place(issues: ConfigIssue[], locate: Locate | undefined): ConfigIssue[] {
  if (!locate) return issues;
  const placed = issues.map((i) => {
    const pos = locate(i.path);
    return pos ? { ...i, line: pos.line, column: pos.column } : i;
  });
  return placed
    .map((i, k) => ({ i, k }))
    .sort((a, b) => {
      const la = a.i.line ?? Number.MAX_SAFE_INTEGER;
      const lb = b.i.line ?? Number.MAX_SAFE_INTEGER;
      return la - lb || (a.i.column ?? 0) - (b.i.column ?? 0) || a.k - b.k;
    })
    .map((x) => x.i);
}

function validate(data: unknown, options: ParseConfigOptions, locate?: Locate): MergeConfig {
  const file = options.file;
  if (data === null || data === undefined) {
    throw new ConfigError([{ path: [], message: 'the configuration is empty', hint: 'it needs at least `merge_method` and `models` or `slices`' }], file);
  }
  if (typeof data !== 'object' || Array.isArray(data)) {
    throw new ConfigError(
      [{ path: [], message: `expected a mapping of top-level keys (${TOP_LEVEL_KEYS.join(', ')})` }],
      file,
    );
  }
  const method = (data as Record<string, unknown>).merge_method;
  const r = mergeConfigSchema.safeParse(data, { error: errorMap });
  if (!r.success) {
    throw new ConfigError(place(fromZod(r.error.issues, method), locate), file);
  }
  const sem = checkMergeConfig(r.data);
  if (sem.issues.length) throw new ConfigError(place(sem.issues, locate), file);
  if (options.onWarning) {
    for (const w of sem.warnings) {
      const pos = locate?.(w.path);
      options.onWarning({ path: formatPath(w.path), message: w.message, ...(pos ? { line: pos.line, column: pos.column } : {}) });
    }
  }
  return r.data;
}

function locator(doc: Document, lc: LineCounter): Locate {
  const pos = (offset: number) => {
    const p = lc.linePos(offset);
    return { line: p.line, column: p.col };
  };
  return (path) => {
    let node: unknown = doc.contents;
    let best = (node as { range?: [number, number, number] } | null)?.range?.[0];
    for (let i = 0; i < path.length; i++) {
      if (isAlias(node)) node = node.resolve(doc);
      const seg = path[i];
      if (isMap(node)) {
        const pair = node.items.find((p) => (isScalar(p.key) ? String(p.key.value) : String(p.key)) === String(seg));
        if (!pair) break;
        const keyStart = isScalar(pair.key) ? pair.key.range?.[0] : undefined;
        if (i === path.length - 1 && keyStart !== undefined) return pos(keyStart);
        if (keyStart !== undefined) best = keyStart;
        node = pair.value;
      } else if (isSeq(node) && typeof seg === 'number') {
        node = node.items[seg];
      } else {
        break;
      }
      const start = (node as { range?: [number, number, number] } | null)?.range?.[0];
      if (start === undefined) break;
      best = start;
    }
    return best === undefined ? undefined : pos(best);
  };
}

/**
 * PyYAML (which mergekit uses) also reads `yes`/`no`/`on`/`off` as booleans; `y`/`n` stay strings.
 */
const PYYAML_BOOLEANS: ScalarTag = {
  identify: (v: unknown) => typeof v === 'boolean',
  default: true,
  tag: 'tag:yaml.org,2002:bool',
  test: /^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$/,
  resolve: (s: string) => /^(?:yes|on)$/i.test(s),
};

/**
 * Parses and validates a mergekit YAML configuration. Scalars follow the YAML 1.2 core schema
 * plus PyYAML's `yes`/`no`/`on`/`off` booleans. Throws `ConfigError` (code
 * `E_CONFIG`) listing every problem, each with its key path and line.
 */
export function parseMergeConfig(text: string, options: ParseConfigOptions = {}): MergeConfig {
  const lc = new LineCounter();
  const doc = parseDocument(text, {
    version: '1.2',
    schema: 'core',
    customTags: [PYYAML_BOOLEANS],
    lineCounter: lc,
    prettyErrors: true,
    uniqueKeys: true,
  });
  if (doc.errors.length) {
    const issues: ConfigIssue[] = doc.errors.map((e) => {
      const message = e.message.split('\n')[0].replace(/ at line \d+, column \d+:?$/, '');
      const lp = e.linePos?.[0];
      return { path: [], message: `invalid YAML: ${message}`, ...(lp ? { line: lp.line, column: lp.col } : {}) };
    });
    throw new ConfigError(issues, options.file);
  }
  let data: unknown;
  try {
    data = doc.toJS();
  } catch (e) {
    throw new ConfigError([{ path: [], message: `invalid YAML: ${(e as Error).message}` }], options.file);
  }
  return validate(data, options, locator(doc, lc));
}

/** Validates an already-parsed configuration object (for example from JSON). */
export function validateMergeConfig(data: unknown, options: ParseConfigOptions = {}): MergeConfig {
  return validate(data, options);
}

/** Reads and parses a configuration file. */
export async function loadMergeConfig(
  path: string,
  options: Omit<ParseConfigOptions, 'file'> = {},
): Promise<MergeConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new AmalgamError('E_IO', `cannot read the merge configuration: ${(e as Error).message}`, { file: path, cause: e });
  }
  return parseMergeConfig(text, { ...options, file: path });
}
