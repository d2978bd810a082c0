/**
 * Text data for learned merges (evolutionary merging, AdaMerging and the DAM benchmark): a dataset
 * file, an optional slice of its documents, text clean-up, and the documents' token stream cut
 * into consecutive windows.
 *
 * Each document is encoded with BOS, the documents are concatenated in order and the stream is
 * cut into consecutive windows of `window + 1` tokens (no padding; the incomplete tail is
 * dropped), as the expert fixtures' README defines its splits. Without `window`, each document is
 * one sequence (cut to `max_length`).
 */
import { resolve } from 'node:path';
import { z } from 'zod';
import { AmalgamError } from '../errors.js';
import { readDataset, type TextExample } from '../data/datasets.js';
import type { TextTokenizer } from '../data/tokenizer.js';

/** One data source, as resolved from a recipe (camelCase). */
export interface TextDataSpec {
  path: string;
  format?: 'txt' | 'jsonl' | 'tsv';
  txtMode?: 'lines' | 'blocks';
  textFields?: (string | number)[];
  textSeparator?: string;
  header?: boolean | 'auto';
  /** Literal replacements applied in order to every document. */
  replace?: [string, string][];
  /** Replace every run of whitespace by one space. */
  collapseWhitespace?: boolean;
  /** Trim every document (default true); documents that end up empty are dropped. */
  strip?: boolean;
  /** Documents [start, end) in file order; negative values count from the end, null is open. */
  rows?: [number | null, number | null];
  /** Documents [⌊a·n⌋, ⌊b·n⌋) of the n documents (after `rows`). */
  fraction?: [number, number];
  /** Inputs per window: windows of window + 1 tokens from the packed stream (null: one sequence per document). */
  window?: number | null;
  /** Keep only the first this many sequences (null: all). */
  count?: number | null;
  /** Without `window`: longest sequence kept, BOS included. */
  maxLength?: number;
  /** A name for tables and messages (default: the file name). */
  name?: string;
}

const num = z.number().refine(Number.isFinite, 'must be a finite number');
const bound = z.union([z.number().int(), z.null()]);

/** The YAML form of a data source (snake_case keys); a plain string is a path. */
export const textDataSchema = z.union([
  z.string().min(1),
  z.strictObject({
    path: z.string().min(1),
    format: z.enum(['txt', 'jsonl', 'tsv']).optional(),
    txt_mode: z.enum(['lines', 'blocks']).optional(),
    text_fields: z.array(z.union([z.string(), z.number().int().nonnegative()])).min(1).optional(),
    text_separator: z.string().optional(),
    header: z.union([z.boolean(), z.literal('auto')]).optional(),
    replace: z.array(z.tuple([z.string().min(1), z.string()])).optional(),
    collapse_whitespace: z.boolean().optional(),
    strip: z.boolean().optional(),
    rows: z.tuple([bound, bound]).optional(),
    fraction: z
      .tuple([num, num])
      .refine(([a, b]) => a >= 0 && b <= 1 && a <= b, 'must be [a, b] with 0 ≤ a ≤ b ≤ 1')
      .optional(),
    window: z.union([z.number().int().min(1), z.null()]).optional(),
    count: z.union([z.number().int().positive(), z.null()]).optional(),
    max_length: z.number().int().min(2).optional(),
    name: z.string().min(1).optional(),
  }),
]);

export type TextDataInput = z.input<typeof textDataSchema>;

/** Converts a parsed YAML data entry to a spec, resolving a relative path against `baseDir`. */
export function resolveTextData(v: z.output<typeof textDataSchema>, baseDir?: string): TextDataSpec {
  const abs = (p: string) => (baseDir === undefined ? p : resolve(baseDir, p));
  if (typeof v === 'string') return { path: abs(v) };
  const out: TextDataSpec = { path: abs(v.path) };
  if (v.format !== undefined) out.format = v.format;
  if (v.txt_mode !== undefined) out.txtMode = v.txt_mode;
  if (v.text_fields !== undefined) out.textFields = v.text_fields;
  if (v.text_separator !== undefined) out.textSeparator = v.text_separator;
  if (v.header !== undefined) out.header = v.header;
  if (v.replace !== undefined) out.replace = v.replace.map(([a, b]) => [a, b]);
  if (v.collapse_whitespace !== undefined) out.collapseWhitespace = v.collapse_whitespace;
  if (v.strip !== undefined) out.strip = v.strip;
  if (v.rows !== undefined) out.rows = [v.rows[0], v.rows[1]];
  if (v.fraction !== undefined) out.fraction = [v.fraction[0], v.fraction[1]];
  if (v.window !== undefined) out.window = v.window;
  if (v.count !== undefined) out.count = v.count;
  if (v.max_length !== undefined) out.maxLength = v.max_length;
  if (v.name !== undefined) out.name = v.name;
  return out;
}

/** A spec in its YAML form (snake_case keys), the inverse of `resolveTextData`. */
export function textDataYaml(s: TextDataSpec): Record<string, unknown> {
  const out: Record<string, unknown> = { path: s.path };
  if (s.format !== undefined) out['format'] = s.format;
  if (s.txtMode !== undefined) out['txt_mode'] = s.txtMode;
  if (s.textFields !== undefined) out['text_fields'] = [...s.textFields];
  if (s.textSeparator !== undefined) out['text_separator'] = s.textSeparator;
  if (s.header !== undefined) out['header'] = s.header;
  if (s.replace !== undefined) out['replace'] = s.replace.map(([a, b]) => [a, b]);
  if (s.collapseWhitespace !== undefined) out['collapse_whitespace'] = s.collapseWhitespace;
  if (s.strip !== undefined) out['strip'] = s.strip;
  if (s.rows !== undefined) out['rows'] = [s.rows[0], s.rows[1]];
  if (s.fraction !== undefined) out['fraction'] = [s.fraction[0], s.fraction[1]];
  if (s.window !== undefined) out['window'] = s.window;
  if (s.count !== undefined) out['count'] = s.count;
  if (s.maxLength !== undefined) out['max_length'] = s.maxLength;
  if (s.name !== undefined) out['name'] = s.name;
  return out;
}

function sliceIndex(v: number | null, n: number, open: number): number {
  if (v === null) return open;
  return Math.max(0, Math.min(n, v < 0 ? n + v : v));
}

/** The documents of a spec after slicing and clean-up, in file order. */
export async function readTextDocuments(spec: TextDataSpec): Promise<string[]> {
  const ds = await readDataset(spec.path, {
    format: spec.format,
    txtMode: spec.txtMode,
    textFields: spec.textFields,
    textSeparator: spec.textSeparator,
    header: spec.header,
    labelField: null,
  });
  let docs: TextExample[] = ds.examples;
  if (spec.rows) {
    const n = docs.length;
    docs = docs.slice(sliceIndex(spec.rows[0], n, 0), sliceIndex(spec.rows[1], n, n));
  }
  if (spec.fraction) {
    const n = docs.length;
    docs = docs.slice(Math.floor(spec.fraction[0] * n), Math.floor(spec.fraction[1] * n));
  }
  const strip = spec.strip ?? true;
  const out: string[] = [];
  for (const d of docs) {
    let t = d.text;
    for (const [a, b] of spec.replace ?? []) t = t.split(a).join(b);
    if (spec.collapseWhitespace) t = t.replace(/\s+/g, ' ');
    if (strip) t = t.trim();
    if (t !== '') out.push(t);
  }
  return out;
}

/**
 * The token sequences of a spec: windows of window + 1 tokens of the BOS-prefixed, concatenated
 * documents (the default, window 128), or one sequence per document when `window` is null.
 * Encoding stops as soon as `count` sequences exist.
 */
export async function loadTextSequences(spec: TextDataSpec, tok: TextTokenizer): Promise<Int32Array[]> {
  const docs = await readTextDocuments(spec);
  const window = spec.window === undefined ? 128 : spec.window;
  const count = spec.count ?? Infinity;
  const out: Int32Array[] = [];
  if (window === null) {
    const max = spec.maxLength ?? Infinity;
    for (const d of docs) {
      if (out.length >= count) break;
      const ids = tok.encode(d, { bos: true });
      out.push(Int32Array.from(ids.length > max ? ids.slice(0, max) : ids));
    }
  } else {
    const w = window + 1;
    let buf: number[] = [];
    for (const d of docs) {
      if (out.length >= count) break;
      for (const id of tok.encode(d, { bos: true })) buf.push(id);
      let start = 0;
      while (buf.length - start >= w && out.length < count) {
        out.push(Int32Array.from(buf.slice(start, start + w)));
        start += w;
      }
      if (start > 0) buf = buf.slice(start);
    }
  }
  if (out.length === 0) {
    throw new AmalgamError('E_USAGE', `no ${window === null ? 'sequence' : `window of ${window + 1} tokens`} in the data`, { file: spec.path, hint: 'check rows / fraction, or use a shorter window' });
  }
  return out;
}

/** A data source's name for tables: its `name`, else the file name. */
export function textDataName(spec: TextDataSpec): string {
  return spec.name ?? spec.path.split(/[\\/]/).pop()!;
}
