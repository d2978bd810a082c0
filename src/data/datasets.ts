/**
 * Text datasets for training and evaluation:
 * - `.txt`: one example per non-empty line (lines holding only whitespace are skipped), or with
 *   `txtMode: 'blocks'` one example per blank-line-separated block;
 * - `.jsonl`: one JSON object per line, text from chosen fields (joined), optional label field;
 * - `.tsv`: text and label columns, with or without a header row (detected by default).
 *
 * Labels become class indices: integers are kept; strings are mapped through `labelNames` when
 * given, otherwise through their sorted distinct values. A negative integer label marks an
 * unlabelled example (as the classification loss ignores negative labels): it is left out where
 * labels are required and read without a label otherwise. Empty labels (where labels are
 * required), non-integer numbers, and integer labels mixed with names are errors that name the
 * line.
 */
import { readFile } from 'node:fs/promises';
import { extname } from 'node:path';
import { AmalgamError } from '../errors.js';

export interface TextExample {
  text: string;
  /** Class index (classification datasets). */
  label?: number;
}

export interface TextDataset {
  /** File the examples come from. */
  source: string;
  examples: TextExample[];
  /** Names of the classes, index = label, when the labels were strings or names were given. */
  labelNames?: string[];
  /** Number of classes (max label + 1, or labelNames.length); 0 when unlabelled. */
  numClasses: number;
  /**
   * Lines (1-based) whose label is a negative integer: unlabelled examples, left out when labels
   * are required and read without a label otherwise.
   */
  negativeLabelLines?: number[];
}

export type DatasetFormat = 'txt' | 'jsonl' | 'tsv';

export interface ReadDatasetOptions {
  /** File format; default from the extension (.txt, .jsonl/.json, .tsv). */
  format?: DatasetFormat;
  /** `.txt`: 'lines' (default) or 'blocks' separated by blank lines. */
  txtMode?: 'lines' | 'blocks';
  /**
   * `.jsonl`: fields whose values make the text (default 'text'); `.tsv`: column names (with a
   * header) or 0-based indices. Several are joined with `textSeparator`.
   */
  textFields?: (string | number)[];
  /** Joins several text fields (default '\n'). */
  textSeparator?: string;
  /**
   * Label field or column. Default: 'label' when present (jsonl, or tsv with a header), the last
   * column of a header-less tsv. `null` reads no labels.
   */
  labelField?: string | number | null;
  /** Labels must be present (classification). */
  requireLabels?: boolean;
  /** `.tsv`: whether the first row is a header; default 'auto'. */
  header?: boolean | 'auto';
  /** Class names in label order; string labels are looked up here. */
  labelNames?: string[];
  /**
   * What `labelNames` are the classes of, for errors about integer labels out of range (e.g.
   * "the model's 2-class head"); default: "the N label names given".
   */
  labelNamesOf?: string;
}

/** Format of a dataset file from its extension. */
export function datasetFormat(path: string): DatasetFormat {
  const ext = extname(path).toLowerCase();
  if (ext === '.txt' || ext === '.text') return 'txt';
  if (ext === '.jsonl' || ext === '.json' || ext === '.ndjson') return 'jsonl';
  if (ext === '.tsv') return 'tsv';
  throw new AmalgamError('E_USAGE', `cannot tell the dataset format from the extension '${ext}'`, {
    file: path,
    hint: 'use a .txt, .jsonl or .tsv file, or give the format explicitly',
  });
}

/** Read a dataset file. */
export async function readDataset(path: string, opts: ReadDatasetOptions = {}): Promise<TextDataset> {
  const format = opts.format ?? datasetFormat(path);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new AmalgamError('E_IO', `cannot read the dataset: ${(e as Error).message}`, { file: path, cause: e });
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const ds = format === 'txt' ? parseTxt(text, opts, path) : format === 'jsonl' ? parseJsonl(text, opts, path) : parseTsv(text, opts, path);
  if (ds.examples.length === 0) {
    const neg = ds.negativeLabelLines?.length;
    throw new AmalgamError('E_FORMAT', neg ? `the dataset holds no labelled examples: all ${neg} have a negative (unlabelled) label` : 'the dataset holds no examples', { file: path });
  }
  return ds;
}

function splitLines(text: string): string[] {
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) if (lines[i]!.endsWith('\r')) lines[i] = lines[i]!.slice(0, -1);
  return lines;
}

/** `.txt`: non-empty lines, or blank-line-separated blocks (each block's lines joined with '\n'). */
export function parseTxt(text: string, opts: Pick<ReadDatasetOptions, 'txtMode' | 'requireLabels'> = {}, file = '<text>'): TextDataset {
  if (opts.requireLabels) {
    throw new AmalgamError('E_USAGE', 'a .txt dataset has no labels', { file, hint: 'use a .jsonl or .tsv file with a label field for classification' });
  }
  const lines = splitLines(text);
  const examples: TextExample[] = [];
  if ((opts.txtMode ?? 'lines') === 'lines') {
    for (const l of lines) if (l.trim() !== '') examples.push({ text: l });
  } else {
    let cur: string[] = [];
    const flush = () => {
      if (cur.length) examples.push({ text: cur.join('\n') });
      cur = [];
    };
    for (const l of lines) {
      if (l.trim() === '') flush();
      else cur.push(l);
    }
    flush();
  }
  return { source: file, examples, numClasses: 0 };
}

type RawLabel = string | number;

/** How a raw label reads: a class index, a negative integer, another number, or a name. */
type LabelKind = 'index' | 'negative' | 'number' | 'name';

const NUMBER_RE = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i;

function labelKind(v: RawLabel): LabelKind {
  if (typeof v === 'number') return Number.isSafeInteger(v) ? (v >= 0 ? 'index' : 'negative') : 'number';
  const s = v.trim();
  if (/^\d+$/.test(s)) return 'index';
  if (/^-\d+$/.test(s)) return 'negative';
  return NUMBER_RE.test(s) ? 'number' : 'name';
}

function showLabel(v: RawLabel): string {
  return typeof v === 'number' ? String(v) : JSON.stringify(v.trim());
}

/**
 * Turn raw label values into class indices. Negative integer labels give `undefined` and are
 * listed in `negative` (indices into `raw`).
 */
function resolveLabels(
  raw: (RawLabel | undefined)[],
  opts: Pick<ReadDatasetOptions, 'labelNames' | 'labelNamesOf'>,
  file: string,
  where: (i: number) => string,
): { labels: (number | undefined)[]; labelNames?: string[]; numClasses: number; negative: number[] } {
  const labelNames = opts.labelNames;
  const kinds = raw.map((v) => (v === undefined ? undefined : labelKind(v)));
  const negative = kinds.flatMap((k, i) => (k === 'negative' ? [i] : []));
  const present = kinds.flatMap((k, i) => (k !== undefined && k !== 'negative' ? [i] : []));
  if (present.length === 0) return { labels: raw.map(() => undefined), labelNames, numClasses: labelNames?.length ?? 0, negative };
  if (labelNames) {
    const index = new Map(labelNames.map((n, i) => [n, i]));
    const n = labelNames.length;
    const labels = raw.map((v, i) => {
      if (v === undefined || kinds[i] === 'negative') return undefined;
      const named = index.get(typeof v === 'string' ? v.trim() : String(v));
      if (named !== undefined) return named;
      if (kinds[i] === 'index') {
        const k = Number(typeof v === 'string' ? v.trim() : v);
        if (k < n) return k;
        throw new AmalgamError('E_FORMAT', `${where(i)}: label ${k} is out of range for ${opts.labelNamesOf ?? `the ${n} label names given`} (class indices 0 to ${n - 1})`, {
          file,
          hint: labelNames.every((name, j) => name === `LABEL_${j}`) ? 'integer labels are class indices' : `integer labels are class indices; the classes are ${labelNames.join(', ')}`,
        });
      }
      throw new AmalgamError('E_FORMAT', `${where(i)}: label ${showLabel(v)} is not one of ${JSON.stringify(labelNames)}`, { file });
    });
    return { labels, labelNames, numClasses: n, negative };
  }
  const fractional = present.find((i) => kinds[i] === 'number');
  if (fractional !== undefined) {
    throw new AmalgamError('E_FORMAT', `${where(fractional)}: label ${showLabel(raw[fractional]!)} is a number but not an integer class index`, {
      file,
      hint: 'classification labels are class indices (0, 1, …) or class names; to use numbers as names, list them in order with --labels',
    });
  }
  const firstIndex = present.find((i) => kinds[i] === 'index');
  const firstName = present.find((i) => kinds[i] === 'name');
  if (firstName === undefined) {
    const labels = raw.map((v, i) => (v === undefined || kinds[i] === 'negative' ? undefined : Number(typeof v === 'string' ? v.trim() : v)));
    const max = labels.reduce<number>((m, l) => (l === undefined ? m : Math.max(m, l)), -1);
    return { labels, numClasses: max + 1, negative };
  }
  if (firstIndex !== undefined) {
    // Name the later of the two: the first label that breaks the pattern set before it.
    const [a, b] = firstIndex < firstName ? [firstIndex, firstName] : [firstName, firstIndex];
    const what = (i: number) => (kinds[i] === 'index' ? 'an integer class index' : 'a class name');
    throw new AmalgamError('E_FORMAT', `${where(b)}: label ${showLabel(raw[b]!)} is ${what(b)} but ${where(a)} has ${what(a)} (${showLabel(raw[a]!)}); labels cannot mix the two`, {
      file,
      hint: 'make the labels all integers or all names, or list the class names in order with --labels',
    });
  }
  const names = [...new Set(present.map((i) => String(raw[i]).trim()))].sort();
  const index = new Map(names.map((n, i) => [n, i]));
  return { labels: raw.map((v, i) => (v === undefined || kinds[i] === 'negative' ? undefined : index.get(String(v).trim()))), labelNames: names, numClasses: names.length, negative };
}

/** Examples from texts and resolved labels; negative-label examples are left out when labels are required. */
function buildExamples(
  texts: string[],
  resolved: { labels: (number | undefined)[]; negative: number[] },
  lineNos: number[],
  requireLabels: boolean | undefined,
): { examples: TextExample[]; negativeLabelLines?: number[] } {
  const skip = new Set(requireLabels ? resolved.negative : []);
  const examples: TextExample[] = [];
  texts.forEach((t, i) => {
    if (skip.has(i)) return;
    const l = resolved.labels[i];
    examples.push(l === undefined ? { text: t } : { text: t, label: l });
  });
  return resolved.negative.length ? { examples, negativeLabelLines: resolved.negative.map((i) => lineNos[i]!) } : { examples };
}

/** `.jsonl`: one object per non-blank line. */
export function parseJsonl(text: string, opts: ReadDatasetOptions = {}, file = '<jsonl>'): TextDataset {
  const lines = splitLines(text);
  const rows: { obj: Record<string, unknown>; line: number }[] = [];
  lines.forEach((l, i) => {
    if (l.trim() === '') return;
    let v: unknown;
    try {
      v = JSON.parse(l);
    } catch (e) {
      throw new AmalgamError('E_FORMAT', `line ${i + 1} is not valid JSON: ${(e as Error).message}`, { file });
    }
    if (v === null || typeof v !== 'object' || Array.isArray(v)) {
      throw new AmalgamError('E_FORMAT', `line ${i + 1} is not a JSON object`, { file });
    }
    rows.push({ obj: v as Record<string, unknown>, line: i + 1 });
  });
  const fields = (opts.textFields ?? ['text']).map(String);
  const sep = opts.textSeparator ?? '\n';
  const labelKey = opts.labelField === null ? null : opts.labelField !== undefined ? String(opts.labelField) : 'label';
  const texts: string[] = [];
  const raw: (RawLabel | undefined)[] = [];
  for (const { obj, line } of rows) {
    const parts: string[] = [];
    for (const f of fields) {
      const v = obj[f];
      if (typeof v !== 'string') {
        const keys = Object.keys(obj).join(', ');
        throw new AmalgamError('E_FORMAT', `line ${line}: field '${f}' is ${v === undefined ? 'missing' : `not a string (${JSON.stringify(v)})`}`, {
          file,
          key: f,
          hint: `the object has the fields ${keys}; choose the text fields (--text-field)`,
        });
      }
      parts.push(v);
    }
    texts.push(parts.join(sep));
    let lab: RawLabel | undefined;
    if (labelKey !== null && labelKey in obj) {
      const v = obj[labelKey];
      if (typeof v === 'boolean') lab = v ? 1 : 0;
      else if (typeof v === 'number') lab = v;
      else if (typeof v === 'string') {
        if (v.trim() === '') {
          if (opts.requireLabels) throw new AmalgamError('E_FORMAT', `line ${line}: the label is empty`, { file, key: labelKey, hint: 'give every example a label, or remove the line' });
        } else lab = v;
      } else if (v !== null) throw new AmalgamError('E_FORMAT', `line ${line}: label ${JSON.stringify(v)} is not a number or string`, { file, key: labelKey });
    }
    if (lab === undefined && opts.requireLabels) {
      const why = labelKey !== null && labelKey in obj ? `label field '${labelKey}' is null` : `no label field '${labelKey ?? ''}'`;
      throw new AmalgamError('E_FORMAT', `line ${line}: ${why}`, { file, key: labelKey ?? undefined, hint: 'choose the label field (--label-field)' });
    }
    raw.push(lab);
  }
  const lines1 = rows.map((r) => r.line);
  const resolved = resolveLabels(raw, opts, file, (i) => `line ${lines1[i]}`);
  const { examples, negativeLabelLines } = buildExamples(texts, resolved, lines1, opts.requireLabels);
  return { source: file, examples, labelNames: resolved.labelNames, numClasses: resolved.numClasses, ...(negativeLabelLines ? { negativeLabelLines } : {}) };
}

const HEADER_NAMES = new Set(['text', 'sentence', 'sentence1', 'sentence2', 'question', 'label', 'labels', 'index', 'idx', 'id', 'premise', 'hypothesis', 'content']);

/** Whether the first TSV row looks like a header. */
export function detectTsvHeader(rows: string[][]): boolean {
  const first = rows[0];
  if (!first) return false;
  if (first.some((c) => HEADER_NAMES.has(c.trim().toLowerCase()))) return true;
  const second = rows[1];
  if (!second || second.length !== first.length) return false;
  // A non-numeric last cell above numeric ones (a named label column over integer labels).
  const isInt = (s: string) => /^\s*-?\d+\s*$/.test(s);
  return !isInt(first[first.length - 1]!) && isInt(second[second.length - 1]!);
}

/** `.tsv`: tab-separated columns, no quoting (the GLUE convention); cells are trimmed. */
export function parseTsv(text: string, opts: ReadDatasetOptions = {}, file = '<tsv>'): TextDataset {
  const rows: { cells: string[]; line: number }[] = [];
  splitLines(text).forEach((l, i) => {
    if (l.trim() !== '') rows.push({ cells: l.split('\t'), line: i + 1 });
  });
  if (rows.length === 0) return { source: file, examples: [], numClasses: 0 };
  const hasHeader = opts.header === undefined || opts.header === 'auto' ? detectTsvHeader(rows.slice(0, 2).map((r) => r.cells)) : opts.header;
  const header = hasHeader ? rows[0]!.cells.map((c) => c.trim()) : undefined;
  const body = hasHeader ? rows.slice(1) : rows;
  const width = rows[0]!.cells.length;

  const column = (spec: string | number, what: string): number => {
    if (typeof spec === 'number' || /^\d+$/.test(spec)) {
      const i = Number(spec);
      if (i >= width) throw new AmalgamError('E_USAGE', `${what} column ${i} is out of range (the file has ${width} columns)`, { file });
      return i;
    }
    const i = header ? header.indexOf(spec) : -1;
    if (i < 0) {
      throw new AmalgamError('E_USAGE', `no ${what} column named '${spec}'`, {
        file,
        hint: header ? `the header has ${header.join(', ')}` : 'the file has no header row; give column indices (0-based)',
      });
    }
    return i;
  };

  let labelCol: number | null;
  if (opts.labelField === null) labelCol = null;
  else if (opts.labelField !== undefined) labelCol = column(opts.labelField, 'label');
  else if (header) labelCol = header.indexOf('label') >= 0 ? header.indexOf('label') : null;
  else labelCol = width > 1 ? width - 1 : null;
  if (labelCol === null && opts.requireLabels) {
    throw new AmalgamError('E_USAGE', 'no label column', { file, hint: 'choose the label column (--label-field)' });
  }

  let textCols: number[];
  if (opts.textFields?.length) textCols = opts.textFields.map((f) => column(f, 'text'));
  else if (header) {
    const named = ['sentence', 'text'].map((n) => header.indexOf(n)).find((i) => i >= 0);
    if (named !== undefined) textCols = [named];
    else textCols = header.map((_, i) => i).filter((i) => i !== labelCol && !['index', 'idx', 'id'].includes(header[i]!.toLowerCase()));
  } else textCols = Array.from({ length: width }, (_, i) => i).filter((i) => i !== labelCol);
  if (textCols.length === 0) throw new AmalgamError('E_USAGE', 'no text column', { file, hint: 'choose the text columns (--text-field)' });

  const sep = opts.textSeparator ?? '\n';
  const texts: string[] = [];
  const raw: (RawLabel | undefined)[] = [];
  for (const { cells, line } of body) {
    const need = Math.max(...textCols, labelCol ?? 0);
    if (cells.length <= need) {
      throw new AmalgamError('E_FORMAT', `line ${line} has ${cells.length} columns, needs at least ${need + 1}`, { file });
    }
    texts.push(textCols.map((c) => cells[c]!.trim()).join(sep));
    const cell = labelCol === null ? undefined : cells[labelCol]!.trim();
    if (cell === '' && opts.requireLabels) {
      const name = header ? `column '${header[labelCol!]}'` : `column ${labelCol}, 0-based`;
      throw new AmalgamError('E_FORMAT', `line ${line}: the label (${name}) is empty`, { file, hint: 'give every example a label, or remove the line' });
    }
    raw.push(cell === '' ? undefined : cell);
  }
  const lineNos = body.map((r) => r.line);
  const resolved = resolveLabels(raw, opts, file, (i) => `line ${lineNos[i]}`);
  const { examples, negativeLabelLines } = buildExamples(texts, resolved, lineNos, opts.requireLabels);
  return { source: file, examples, labelNames: resolved.labelNames, numClasses: resolved.numClasses, ...(negativeLabelLines ? { negativeLabelLines } : {}) };
}

/** Split off the last `fraction` of the examples (in file order) as a held-out part. */
export function splitTail<T>(items: readonly T[], fraction: number): { head: T[]; tail: T[] } {
  if (!(fraction >= 0 && fraction < 1)) throw new AmalgamError('E_USAGE', `held-out fraction must be in [0, 1), got ${fraction}`);
  const nTail = Math.round(items.length * fraction);
  return { head: items.slice(0, items.length - nTail), tail: items.slice(items.length - nTail) };
}

/** Per-class counts of labelled examples. */
export function labelCounts(examples: readonly TextExample[], numClasses: number): number[] {
  const counts = new Array<number>(numClasses).fill(0);
  for (const e of examples) if (e.label !== undefined && e.label < numClasses) counts[e.label]!++;
  return counts;
}
