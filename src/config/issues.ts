/** Configuration problems: key paths, source positions, and the error that reports them. */
import { AmalgamError } from '../errors.js';

export type PathSegment = string | number;

/** One problem found in a configuration. */
export interface ConfigIssue {
  /** Key path as segments, e.g. `['slices', 0, 'sources', 1, 'layer_rnage']`. */
  path: PathSegment[];
  message: string;
  hint?: string;
  /** 1-based source position, when the configuration came from YAML text. */
  line?: number;
  column?: number;
}

const IDENT = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** `slices[0].sources[1].layer_range`; keys that are not identifiers are quoted: `tokens["<|im_end|>"]`. */
export function formatPath(path: readonly PathSegment[]): string {
  let s = '';
  for (const seg of path) {
    if (typeof seg === 'number') s += `[${seg}]`;
    else if (IDENT.test(seg)) s += s.length ? `.${seg}` : seg;
    else s += `[${JSON.stringify(seg)}]`;
  }
  return s;
}

function location(file: string | undefined, issue: ConfigIssue): string | undefined {
  if (issue.line === undefined) return file;
  const pos = `${issue.line}:${issue.column ?? 1}`;
  return file ? `${file}:${pos}` : `line ${pos}`;
}

function formatIssue(file: string | undefined, issue: ConfigIssue): string {
  const where = location(file, issue);
  const key = formatPath(issue.path);
  const parts: string[] = [];
  if (where) parts.push(where);
  if (key) parts.push(`'${key}'`);
  return `${parts.length ? `${parts.join(': ')}: ` : ''}${issue.message}${issue.hint ? ` (${issue.hint})` : ''}`;
}

/**
 * An invalid merge configuration (code `E_CONFIG`). `file`, `key` and `hint` describe the first
 * problem (`file` carries `:line:column` when known); the message lists every problem found.
 */
export class ConfigError extends AmalgamError {
  readonly issues: ConfigIssue[];
  /** The configuration file, without position. */
  readonly sourceFile?: string;
  readonly line?: number;
  readonly column?: number;

  constructor(issues: ConfigIssue[], file?: string) {
    if (issues.length === 0) throw new Error('ConfigError needs at least one issue');
    const first = issues[0];
    const key = formatPath(first.path);
    super('E_CONFIG', first.message, {
      file: location(file, first),
      key: key.length ? key : undefined,
      hint: first.hint,
    });
    this.name = 'ConfigError';
    this.issues = issues;
    this.sourceFile = file;
    this.line = first.line;
    this.column = first.column;
    if (issues.length > 1) {
      this.message += `\n${issues
        .slice(1)
        .map((i) => `  ${formatIssue(file, i)}`)
        .join('\n')}`;
    }
  }
}

export function isConfigError(e: unknown): e is ConfigError {
  return e instanceof ConfigError;
}
