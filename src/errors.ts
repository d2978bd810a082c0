/**
 * Typed errors. Every error raised for bad input names the file, the tensor or key, what is
 * wrong, and (where one exists) how to fix it. The CLI prints these without stack traces.
 */
export type ErrorCode =
  | 'E_IO'
  | 'E_FORMAT'
  | 'E_HEADER'
  | 'E_DTYPE'
  | 'E_SHAPE'
  | 'E_OFFSETS'
  | 'E_METADATA'
  | 'E_INDEX'
  | 'E_DUPLICATE'
  | 'E_MISSING'
  | 'E_UNSUPPORTED'
  | 'E_CONFIG'
  | 'E_ARCH'
  | 'E_USAGE';

export interface AmalgamErrorDetails {
  /** File the problem was found in. */
  file?: string;
  /** Tensor name or JSON key the problem concerns. */
  key?: string;
  /** What the user can do about it. */
  hint?: string;
  cause?: unknown;
}

export class AmalgamError extends Error {
  readonly code: ErrorCode;
  readonly file?: string;
  readonly key?: string;
  readonly hint?: string;

  constructor(code: ErrorCode, message: string, details: AmalgamErrorDetails = {}) {
    super(formatMessage(message, details), details.cause !== undefined ? { cause: details.cause } : undefined);
    this.name = 'AmalgamError';
    this.code = code;
    this.file = details.file;
    this.key = details.key;
    this.hint = details.hint;
  }
}

function formatMessage(message: string, d: AmalgamErrorDetails): string {
  const where: string[] = [];
  if (d.file) where.push(d.file);
  if (d.key) where.push(`'${d.key}'`);
  const prefix = where.length ? `${where.join(': ')}: ` : '';
  return `${prefix}${message}${d.hint ? ` (${d.hint})` : ''}`;
}

export function isAmalgamError(e: unknown): e is AmalgamError {
  return e instanceof AmalgamError;
}
