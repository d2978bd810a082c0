/**
 * SentencePiece-style vocabularies (pieces with `▁` for space, scores, token types), read from a
 * GGUF file's `tokenizer.ggml.*` metadata or from a llama2.c tokenizer file.
 */
import { AmalgamError } from '../errors.js';
import type { GgufFile } from '../io/gguf.js';
import type { Llama2cTokenizer } from '../io/llama2c.js';

/** SentencePiece / GGUF token types (formats.md §5.3). */
export const TOKEN_TYPE = {
  NORMAL: 1,
  UNKNOWN: 2,
  CONTROL: 3,
  USER_DEFINED: 4,
  UNUSED: 5,
  BYTE: 6,
} as const;

/** U+2581, the SentencePiece stand-in for a space. */
export const SPACE_PIECE = '\u2581';

const BYTE_PIECE = /^<0x[0-9A-F]{2}>$/;

export function isBytePiece(piece: string): boolean {
  return BYTE_PIECE.test(piece);
}

export interface SpVocab {
  /** Pieces by id, `▁` for space. */
  tokens: string[];
  scores: number[];
  /** TOKEN_TYPE by id. */
  types: number[];
  bosId: number;
  eosId: number;
  unkId: number;
  /** File the vocabulary came from (for messages). */
  source: string;
}

const NONE = 0xffffffff;

function checkVocab(v: SpVocab, key: string): SpVocab {
  const seen = new Map<string, number>();
  v.tokens.forEach((t, id) => {
    const prev = seen.get(t);
    if (prev !== undefined) {
      throw new AmalgamError('E_DUPLICATE', `token ${id} has the same text ${JSON.stringify(t)} as token ${prev}`, {
        file: v.source,
        key,
        hint: 'a tokenizer vocabulary needs distinct pieces',
      });
    }
    seen.set(t, id);
  });
  for (const [name, id] of [['bos', v.bosId], ['eos', v.eosId], ['unknown', v.unkId]] as const) {
    if (!Number.isInteger(id) || id < 0 || id >= v.tokens.length) {
      throw new AmalgamError('E_METADATA', `${name} token id ${id} is outside the vocabulary (${v.tokens.length} tokens)`, { file: v.source, key });
    }
  }
  return v;
}

/** The vocabulary of a GGUF file (`tokenizer.ggml.model` must be `llama`, SentencePiece-style). */
export function vocabFromGguf(g: GgufFile): SpVocab {
  const file = g.path;
  const model = g.getString('tokenizer.ggml.model');
  if (model === undefined) {
    throw new AmalgamError('E_MISSING', 'the file has no tokenizer', { file, key: 'tokenizer.ggml.model' });
  }
  if (model !== 'llama') {
    throw new AmalgamError('E_UNSUPPORTED', `tokenizer model "${model}" is not supported`, {
      file,
      key: 'tokenizer.ggml.model',
      hint: 'amalgam converts SentencePiece-style ("llama") GGUF vocabularies',
    });
  }
  const tokens = g.getStringArray('tokenizer.ggml.tokens');
  if (!tokens) throw new AmalgamError('E_MISSING', 'the file has no token list', { file, key: 'tokenizer.ggml.tokens' });
  const n = tokens.length;
  const scores = g.getNumberArray('tokenizer.ggml.scores') ?? new Array<number>(n).fill(0);
  if (scores.length !== n) {
    throw new AmalgamError('E_METADATA', `${scores.length} scores for ${n} tokens`, { file, key: 'tokenizer.ggml.scores' });
  }
  let types = g.getNumberArray('tokenizer.ggml.token_type');
  if (types && types.length !== n) {
    throw new AmalgamError('E_METADATA', `${types.length} token types for ${n} tokens`, { file, key: 'tokenizer.ggml.token_type' });
  }
  const special = (key: string, dflt: number): number => {
    const v = g.getInteger(key);
    return v === undefined || v === NONE ? dflt : v;
  };
  const unkId = special('tokenizer.ggml.unknown_token_id', 0);
  const bosId = special('tokenizer.ggml.bos_token_id', 1);
  const eosId = special('tokenizer.ggml.eos_token_id', 2);
  if (!types) types = inferTypes(tokens, unkId, bosId, eosId);
  return checkVocab({ tokens: tokens.slice(), scores: scores.slice(), types: types.slice(), bosId, eosId, unkId, source: file }, 'tokenizer.ggml.tokens');
}

function inferTypes(tokens: string[], unkId: number, bosId: number, eosId: number): number[] {
  return tokens.map((t, id) =>
    id === unkId ? TOKEN_TYPE.UNKNOWN : id === bosId || id === eosId ? TOKEN_TYPE.CONTROL : isBytePiece(t) ? TOKEN_TYPE.BYTE : TOKEN_TYPE.NORMAL,
  );
}

/**
 * The vocabulary of a llama2.c tokenizer: spaces become `▁`, ids 0/1/2 become `<unk>`, `<s>`,
 * `</s>` (stored as `"\n<s>\n"` and `"\n</s>\n"` by llama2.c), and `<0xHH>` pieces are byte tokens.
 */
export function vocabFromLlama2c(tok: Llama2cTokenizer): SpVocab {
  if (tok.pieces.length < 3) {
    throw new AmalgamError('E_FORMAT', `vocabulary has ${tok.pieces.length} tokens; at least <unk>, <s> and </s> are needed`, { file: tok.path });
  }
  const tokens = tok.pieces.map((p, id) => (id === 0 ? '<unk>' : id === 1 ? '<s>' : id === 2 ? '</s>' : p.replaceAll(' ', SPACE_PIECE)));
  return checkVocab(
    { tokens, scores: tok.scores.slice(), types: inferTypes(tokens, 0, 1, 2), bosId: 1, eosId: 2, unkId: 0, source: tok.path },
    'pieces',
  );
}
