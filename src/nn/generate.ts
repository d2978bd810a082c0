/**
 * Text generation with a KV cache: the prompt in one forward, then one token per step.
 * Greedy (temperature 0, the default) takes the first maximum; sampling applies temperature,
 * then top-k, then top-p, and draws from a seeded Rng.
 */
import { AmalgamError } from '../errors.js';
import { Rng } from '../tensor/rng.js';
import type { LlamaModel } from './model.js';

export interface GenerateOptions {
  /** Tokens to generate at most. */
  maxNewTokens: number;
  /** 0 (default) is greedy. */
  temperature?: number;
  /** Keep the k most likely tokens (0 or absent: all). */
  topK?: number;
  /** Keep the smallest set of most likely tokens whose probability reaches p (1 or absent: all). */
  topP?: number;
  /** Seed of the sampler (default 0). */
  seed?: number;
  /** Generation stops when one of these is produced; it is not included (default: the config's EOS ids). */
  stopTokens?: number[];
  /** Called with each new token. */
  onToken?: (id: number) => void;
}

export interface GenerateResult {
  /** Prompt followed by the generated tokens. */
  tokens: number[];
  /** The generated tokens. */
  generated: number[];
  /** Why generation ended. */
  stop: 'stop-token' | 'length';
}

export function generate(model: LlamaModel, prompt: readonly number[], opts: GenerateOptions): GenerateResult {
  const max = opts.maxNewTokens;
  if (!Number.isSafeInteger(max) || max < 0) throw new AmalgamError('E_USAGE', `maxNewTokens must be a non-negative integer, got ${max}`);
  if (prompt.length === 0) throw new AmalgamError('E_USAGE', 'generation needs a prompt of at least one token (e.g. BOS)');
  const temperature = opts.temperature ?? 0;
  if (!(temperature >= 0) || !Number.isFinite(temperature)) throw new AmalgamError('E_USAGE', `temperature must be ≥ 0, got ${temperature}`);
  const stop = new Set(opts.stopTokens ?? model.config.eosTokenIds);
  const V = model.config.vocabSize;
  const rng = new Rng(opts.seed ?? 0);
  const kv = model.createKvCache(1, prompt.length + max);
  const tokens = [...prompt];
  const generated: number[] = [];

  let logits = model.forward(prompt, 1, prompt.length, { kv });
  let row = logits.subarray((prompt.length - 1) * V, prompt.length * V);
  for (let step = 0; step < max; step++) {
    const next = temperature === 0 ? argmax(row) : sample(row, temperature, opts.topK ?? 0, opts.topP ?? 1, rng);
    if (stop.has(next)) return { tokens, generated, stop: 'stop-token' };
    tokens.push(next);
    generated.push(next);
    opts.onToken?.(next);
    if (step + 1 === max) break;
    logits = model.forward([next], 1, 1, { kv });
    row = logits.subarray(0, V);
  }
  return { tokens, generated, stop: 'length' };
}

/** Index of the first maximum. */
export function argmax(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[best]!) best = i;
  return best;
}

/** Draws a token from softmax(logits / temperature) restricted by top-k and top-p. */
export function sample(logits: ArrayLike<number>, temperature: number, topK: number, topP: number, rng: Rng): number {
  const n = logits.length;
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => logits[b]! - logits[a]! || a - b);
  const keep = topK > 0 ? Math.min(topK, n) : n;
  const maxLogit = logits[order[0]!]!;
  const probs = new Float64Array(keep);
  let sum = 0;
  for (let i = 0; i < keep; i++) {
    probs[i] = Math.exp((logits[order[i]!]! - maxLogit) / temperature);
    sum += probs[i]!;
  }
  let cut = keep;
  if (topP < 1) {
    let cum = 0;
    for (let i = 0; i < keep; i++) {
      cum += probs[i]! / sum;
      if (cum >= topP) {
        cut = i + 1;
        break;
      }
    }
  }
  let total = 0;
  for (let i = 0; i < cut; i++) total += probs[i]!;
  let u = rng.next() * total;
  for (let i = 0; i < cut; i++) {
    u -= probs[i]!;
    if (u < 0) return order[i]!;
  }
  return order[cut - 1]!;
}
