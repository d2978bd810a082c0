/**
 * Parsing of the textual options the train / eval / generate commands share: LoRA specs
 * (`r=8,alpha=16,targets=q_proj,v_proj`), numbers, and dataset reading options.
 */
import { AmalgamError } from '../errors.js';
import type { ReadDatasetOptions } from '../data/datasets.js';
import type { FloatDType } from '../tensor/dtype.js';
import type { LoraSpec } from './trainer.js';

export const DEFAULT_LORA: LoraSpec = { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'] };

/**
 * Parse a LoRA spec: comma-separated `key=value` items, where a bare item extends the list of
 * the preceding key (so `targets=q_proj,v_proj` lists two modules). Keys: r, alpha (default 2r),
 * targets (default q_proj,v_proj), freeze (none|A|B), rslora (true|false). An empty spec gives
 * the defaults r=8, alpha=16, targets=q_proj,v_proj.
 */
export function parseLoraSpec(spec: string | true | undefined): LoraSpec {
  const text = spec === true || spec === undefined ? '' : spec.trim();
  const values = new Map<string, string[]>();
  let key: string | undefined;
  for (const raw of text.split(',')) {
    const item = raw.trim();
    if (item === '') continue;
    const eq = item.indexOf('=');
    if (eq >= 0) {
      key = item.slice(0, eq).trim().toLowerCase();
      if (values.has(key)) throw new AmalgamError('E_USAGE', `LoRA option '${key}' is given twice`);
      values.set(key, [item.slice(eq + 1).trim()].filter((v) => v !== ''));
    } else if (key !== undefined) {
      values.get(key)!.push(item);
    } else {
      throw new AmalgamError('E_USAGE', `LoRA option '${item}' has no key`, { hint: 'write e.g. r=8,alpha=16,targets=q_proj,v_proj' });
    }
  }
  const known = ['r', 'rank', 'alpha', 'lora_alpha', 'targets', 'target_modules', 'freeze', 'rslora'];
  for (const k of values.keys()) {
    if (!known.includes(k)) throw new AmalgamError('E_USAGE', `unknown LoRA option '${k}'`, { hint: 'known: r, alpha, targets, freeze, rslora' });
  }
  const one = (...keys: string[]): string | undefined => {
    for (const k of keys) {
      const v = values.get(k);
      if (v === undefined) continue;
      if (v.length !== 1) throw new AmalgamError('E_USAGE', `LoRA option '${k}' takes one value, got ${v.length}`);
      return v[0];
    }
    return undefined;
  };
  const rText = one('r', 'rank');
  const r = rText === undefined ? DEFAULT_LORA.r : parseInteger(rText, 'LoRA r', 1);
  const aText = one('alpha', 'lora_alpha');
  const alpha = aText === undefined ? 2 * r : parseNumber(aText, 'LoRA alpha');
  if (!(alpha > 0)) throw new AmalgamError('E_USAGE', `LoRA alpha must be a positive number, got "${aText}"`, { hint: 'the update is scaled by alpha / r; the default alpha is 2r' });
  const targets = values.get('targets') ?? values.get('target_modules') ?? DEFAULT_LORA.targets;
  if (targets.length === 0) throw new AmalgamError('E_USAGE', 'LoRA targets are empty');
  const spec2: LoraSpec = { r, alpha, targets: [...targets] };
  const freeze = one('freeze');
  if (freeze !== undefined) {
    if (freeze !== 'none' && freeze !== 'A' && freeze !== 'B') throw new AmalgamError('E_USAGE', `LoRA freeze must be none, A or B, got '${freeze}'`);
    spec2.freeze = freeze;
  }
  const rs = one('rslora');
  if (rs !== undefined) {
    if (rs !== 'true' && rs !== 'false') throw new AmalgamError('E_USAGE', `LoRA rslora must be true or false, got '${rs}'`);
    spec2.rslora = rs === 'true';
  }
  return spec2;
}

/** A finite number. */
export function parseNumber(v: string, name: string, min = -Infinity, max = Infinity): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || n < min || n > max) {
    const range = min > -Infinity && max < Infinity ? ` in [${min}, ${max}]` : min > -Infinity ? ` ≥ ${min}` : '';
    throw new AmalgamError('E_USAGE', `${name} must be a number${range}, got "${v}"`);
  }
  return n;
}

/** An integer ≥ min. */
export function parseInteger(v: string, name: string, min = 0): number {
  const n = Number(v);
  if (!/^\s*-?\d+\s*$/.test(v) || !Number.isSafeInteger(n) || n < min) {
    throw new AmalgamError('E_USAGE', `${name} must be an integer ≥ ${min}, got "${v}"`);
  }
  return n;
}

/** A comma-separated list. */
export function parseList(v: string): string[] {
  return v
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
}

/** f32 / bf16 / f16 (any case, torch names accepted). */
export function parseDtypeOption(v: string): FloatDType {
  const s = v.trim().toLowerCase().replace(/^torch\./, '');
  if (s === 'f32' || s === 'float32' || s === 'fp32') return 'F32';
  if (s === 'bf16' || s === 'bfloat16') return 'BF16';
  if (s === 'f16' || s === 'float16' || s === 'fp16' || s === 'half') return 'F16';
  throw new AmalgamError('E_USAGE', `unknown dtype "${v}"`, { hint: 'use f32, bf16 or f16' });
}

/** Dataset options as the commands take them. */
export interface DatasetCliOptions {
  textField?: string;
  labelField?: string;
  labels?: string;
  txtMode?: string;
  header?: boolean;
}

export function datasetOptions(o: DatasetCliOptions): ReadDatasetOptions {
  const out: ReadDatasetOptions = {};
  if (o.textField !== undefined) out.textFields = parseList(o.textField);
  if (o.labelField !== undefined) out.labelField = o.labelField;
  if (o.labels !== undefined) out.labelNames = parseList(o.labels);
  if (o.txtMode !== undefined) {
    if (o.txtMode !== 'lines' && o.txtMode !== 'blocks') throw new AmalgamError('E_USAGE', `--txt-mode must be lines or blocks, got "${o.txtMode}"`);
    out.txtMode = o.txtMode;
  }
  if (o.header !== undefined) out.header = o.header;
  return out;
}

/** lm or classify. */
export function parseTask(v: string): 'lm' | 'classify' {
  if (v === 'lm' || v === 'classify') return v;
  throw new AmalgamError('E_USAGE', `--task must be lm or classify, got "${v}"`);
}
