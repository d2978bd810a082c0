/**
 * Reference tokenizer: llama2.c `run.c` `encode`, step by step on bytes, with its own reader of
 * the tokenizer file (independent of src/). Used to check the converted HF tokenizer.
 */
import { readFileSync } from 'node:fs';

export interface RefTokenizer {
  /** Piece bytes by id, as latin1 strings (one char per byte). */
  vocab: string[];
  scores: Float32Array;
  lookup: Map<string, number>;
  maxTokenLength: number;
}

export function loadRefTokenizer(path: string, vocabSize: number): RefTokenizer {
  const b = readFileSync(path);
  const maxTokenLength = b.readInt32LE(0);
  const vocab: string[] = [];
  const scores = new Float32Array(vocabSize);
  const lookup = new Map<string, number>();
  let o = 4;
  for (let i = 0; i < vocabSize; i++) {
    scores[i] = b.readFloatLE(o);
    const len = b.readInt32LE(o + 4);
    o += 8;
    const piece = b.subarray(o, o + len).toString('latin1');
    o += len;
    vocab.push(piece);
    if (!lookup.has(piece)) lookup.set(piece, i);
  }
  return { vocab, scores, lookup, maxTokenLength };
}

/** llama2.c encode(): BOS, dummy-prefix space, code points or byte fallback (+3), best merges. */
export function llama2cEncode(t: RefTokenizer, text: string, bos = true, eos = false): number[] {
  const bytes = Buffer.from(text, 'utf8');
  const tokens: number[] = [];
  if (bos) tokens.push(1);
  if (bytes.length > 0) {
    tokens.push(t.lookup.get(' ') ?? -1);
  }
  let buf: number[] = [];
  for (let c = 0; c < bytes.length; c++) {
    const byte = bytes[c]!;
    if ((byte & 0xc0) !== 0x80) buf = [];
    buf.push(byte);
    const next = c + 1 < bytes.length ? bytes[c + 1]! : 0;
    if ((next & 0xc0) === 0x80 && buf.length < 4) continue;
    const id = t.lookup.get(Buffer.from(buf).toString('latin1'));
    if (id !== undefined) tokens.push(id);
    else for (const x of buf) tokens.push(x + 3);
    buf = [];
  }
  for (;;) {
    let bestScore = -1e10;
    let bestId = -1;
    let bestIdx = -1;
    for (let i = 0; i < tokens.length - 1; i++) {
      const id = t.lookup.get(t.vocab[tokens[i]!]! + t.vocab[tokens[i + 1]!]!);
      if (id !== undefined && t.scores[id]! > bestScore) {
        bestScore = t.scores[id]!;
        bestId = id;
        bestIdx = i;
      }
    }
    if (bestIdx === -1) break;
    tokens[bestIdx] = bestId;
    tokens.splice(bestIdx + 1, 1);
  }
  if (eos) tokens.push(2);
  return tokens;
}
