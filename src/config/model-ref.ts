/**
 * Model references: `path[@revision][+adapter[@revision]]`, as in mergekit. `path` is a local
 * model folder (Hugging Face layout) or a hub id; `+adapter` applies a PEFT LoRA adapter to it.
 */
import { AmalgamError } from '../errors.js';
import type { ModelReference } from './types.js';

export type ModelReferenceResult = { ok: true; ref: ModelReference } | { ok: false; message: string };

interface PathPart {
  path: string;
  revision?: string;
}

function splitRevision(part: string, what: string, whole: string): PathPart | string {
  const at = part.split('@');
  if (at.length > 2) return `${what} in \`${whole}\` has more than one \`@\``;
  const path = at[0];
  if (path.length === 0) return `${what} in \`${whole}\` is empty`;
  if (at.length === 2) {
    if (at[1].length === 0) return `${what} in \`${whole}\` has an empty revision after \`@\``;
    return { path, revision: at[1] };
  }
  return { path };
}

/** Builds a reference from its parts and computes the canonical `id`. */
export function makeModelReference(
  model: PathPart,
  adapter?: PathPart,
  overrideArchitecture?: string,
): ModelReference {
  const ref: ModelReference = { id: '', model: model.path };
  if (model.revision !== undefined) ref.revision = model.revision;
  if (adapter) {
    ref.adapter = adapter.path;
    if (adapter.revision !== undefined) ref.adapterRevision = adapter.revision;
  }
  if (overrideArchitecture !== undefined) ref.overrideArchitecture = overrideArchitecture;
  ref.id = formatModelReference(ref);
  return ref;
}

/** Parses the string form; never throws. */
export function tryParseModelReference(value: string): ModelReferenceResult {
  if (value.length === 0) return { ok: false, message: 'model reference is empty' };
  if (value.trim() !== value) return { ok: false, message: `model reference \`${value}\` has leading or trailing spaces` };
  const chunks = value.split('+');
  if (chunks.length > 2) {
    return { ok: false, message: `model reference \`${value}\` has more than one \`+\` (expected model+adapter)` };
  }
  const model = splitRevision(chunks[0], 'the model path', value);
  if (typeof model === 'string') return { ok: false, message: model };
  let adapter: PathPart | undefined;
  if (chunks.length === 2) {
    const a = splitRevision(chunks[1], 'the adapter path', value);
    if (typeof a === 'string') return { ok: false, message: a };
    adapter = a;
  }
  return { ok: true, ref: makeModelReference(model, adapter) };
}

/** Parses `path[@revision][+adapter[@revision]]`; throws an E_CONFIG error when malformed. */
export function parseModelReference(value: string): ModelReference {
  const r = tryParseModelReference(value);
  if (!r.ok) throw new AmalgamError('E_CONFIG', r.message, { hint: 'write a model as path, path@revision or path+adapter_path' });
  return r.ref;
}

/** The canonical string form `model[@revision][+adapter[@revision]]`. */
export function formatModelReference(ref: Omit<ModelReference, 'id'>): string {
  let s = ref.model;
  if (ref.revision !== undefined) s += `@${ref.revision}`;
  if (ref.adapter !== undefined) {
    s += `+${ref.adapter}`;
    if (ref.adapterRevision !== undefined) s += `@${ref.adapterRevision}`;
  }
  return s;
}

/** True when two references name the same model (same path, revision, adapter and architecture override). */
export function sameModel(a: ModelReference | string, b: ModelReference | string): boolean {
  const ra = typeof a === 'string' ? parseModelReference(a) : a;
  const rb = typeof b === 'string' ? parseModelReference(b) : b;
  return ra.id === rb.id && ra.overrideArchitecture === rb.overrideArchitecture;
}
