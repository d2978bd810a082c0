/**
 * Hugging Face `tokenizer.json` and `tokenizer_config.json` for a SentencePiece-style vocabulary
 * (formats.md §8.4): a Llama-style BPE with byte fallback whose merges are derived from the
 * vocabulary, so that encoding reproduces llama2.c `encode` (prepend a space, pieces or byte
 * tokens, highest-score merges, BOS).
 */
import { SPACE_PIECE, TOKEN_TYPE, isBytePiece, type SpVocab } from './vocab.js';

export interface HfTokenizerOptions {
  /** `model_max_length` of tokenizer_config.json (the model's context length). */
  modelMaxLength: number;
}

export interface HfTokenizerFiles {
  /** Contents of tokenizer.json. */
  tokenizer: Record<string, unknown>;
  /** Contents of tokenizer_config.json. */
  tokenizerConfig: Record<string, unknown>;
}

/**
 * BPE merges derived from a vocabulary: for every normal token of at least two characters, in id
 * order, every split into two parts that are both in the vocabulary. The splits of one token are
 * ordered by the ids of the left part, then the right part (as Hugging Face's SentencePiece
 * extractor orders them).
 */
export function deriveMerges(vocab: SpVocab): [string, string][] {
  const ids = new Map<string, number>();
  vocab.tokens.forEach((t, i) => ids.set(t, i));
  const merges: [string, string][] = [];
  vocab.tokens.forEach((token, id) => {
    if (vocab.types[id] !== TOKEN_TYPE.NORMAL || isBytePiece(token)) return;
    const chars = Array.from(token);
    if (chars.length < 2) return;
    const local: [string, string][] = [];
    for (let k = 1; k < chars.length; k++) {
      const left = chars.slice(0, k).join('');
      const right = chars.slice(k).join('');
      if (ids.has(left) && ids.has(right)) local.push([left, right]);
    }
    local.sort((a, b) => ids.get(a[0])! - ids.get(b[0])! || ids.get(a[1])! - ids.get(b[1])!);
    merges.push(...local);
  });
  return merges;
}

function addedToken(id: number, content: string, special: boolean): Record<string, unknown> {
  return { id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special };
}

/** Build tokenizer.json and tokenizer_config.json for a vocabulary. */
export function buildHfTokenizer(vocab: SpVocab, opts: HfTokenizerOptions): HfTokenizerFiles {
  const bos = vocab.tokens[vocab.bosId]!;
  const eos = vocab.tokens[vocab.eosId]!;
  const unk = vocab.tokens[vocab.unkId]!;
  const added: Record<string, unknown>[] = [];
  vocab.tokens.forEach((t, id) => {
    const type = vocab.types[id];
    if (type === TOKEN_TYPE.UNKNOWN || type === TOKEN_TYPE.CONTROL) added.push(addedToken(id, t, true));
    else if (type === TOKEN_TYPE.USER_DEFINED) added.push(addedToken(id, t, false));
  });
  const vocabMap: Record<string, number> = Object.create(null);
  vocab.tokens.forEach((t, id) => {
    vocabMap[t] = id;
  });
  const pairs = deriveMerges(vocab);
  // The "a b" form cannot hold parts that contain a space; use the pair form then.
  const merges = pairs.some(([a, b]) => a.includes(' ') || b.includes(' ')) ? pairs : pairs.map(([a, b]) => `${a} ${b}`);

  const tokenizer = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: {
      type: 'Sequence',
      normalizers: [
        { type: 'Prepend', prepend: SPACE_PIECE },
        { type: 'Replace', pattern: { String: ' ' }, content: SPACE_PIECE },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: bos, type_id: 0 } },
        { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: bos, type_id: 1 } },
        { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { [bos]: { id: bos, ids: [vocab.bosId], tokens: [bos] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: SPACE_PIECE }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: unk,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab: vocabMap,
      merges,
    },
  };
  const tokenizerConfig = {
    add_bos_token: true,
    add_eos_token: false,
    bos_token: bos,
    eos_token: eos,
    unk_token: unk,
    tokenizer_class: 'LlamaTokenizer',
    legacy: true,
    model_max_length: opts.modelMaxLength,
    clean_up_tokenization_spaces: false,
  };
  return { tokenizer, tokenizerConfig };
}
