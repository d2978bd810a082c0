/**
 * Tokenisation with `@huggingface/tokenizers` from a model folder's `tokenizer.json` (and
 * `tokenizer_config.json` when present). BOS is added explicitly rather than by the tokenizer's
 * post-processor, so "with BOS" and "without BOS" mean the same for every tokenizer.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { AmalgamError } from '../errors.js';
import { readJsonObject } from '../io/hf.js';

export interface EncodeOptions {
  /** Prepend the BOS token (default true; ignored when the tokenizer has none). */
  bos?: boolean;
  /** Append the EOS token (default false). */
  eos?: boolean;
}

export interface DecodeOptions {
  /** Leave BOS/EOS/PAD and other special tokens out (default true). */
  skipSpecial?: boolean;
}

/** A loaded tokenizer with the special ids a trainer needs. */
export class TextTokenizer {
  readonly bosId: number | undefined;
  readonly eosId: number | undefined;
  /** Padding id: pad_token, else EOS, else 0. Padded positions are masked, so any id works. */
  readonly padId: number;
  readonly vocabSize: number;

  constructor(
    readonly tokenizer: Tokenizer,
    specials: { bosId?: number; eosId?: number; padId?: number } = {},
  ) {
    this.bosId = specials.bosId;
    this.eosId = specials.eosId;
    this.padId = specials.padId ?? specials.eosId ?? 0;
    this.vocabSize = tokenizer.get_vocab(true).size;
  }

  /** Build from parsed tokenizer.json / tokenizer_config.json (and config.json for special ids). */
  static fromJson(
    tokenizerJson: Record<string, unknown>,
    tokenizerConfig: Record<string, unknown> = {},
    modelConfig: Record<string, unknown> = {},
  ): TextTokenizer {
    let tok: Tokenizer;
    try {
      tok = new Tokenizer(tokenizerJson, tokenizerConfig);
    } catch (e) {
      throw new AmalgamError('E_FORMAT', `tokenizer.json could not be loaded: ${(e as Error).message}`, { cause: e });
    }
    const special = (key: string, idKey: string): number | undefined => {
      const v = tokenizerConfig[key];
      const content = typeof v === 'string' ? v : v && typeof v === 'object' ? (v as { content?: unknown }).content : undefined;
      if (typeof content === 'string') {
        const id = tok.token_to_id(content);
        if (id !== undefined) return id;
      }
      const id = modelConfig[idKey];
      if (typeof id === 'number' && Number.isSafeInteger(id) && id >= 0) return id;
      if (Array.isArray(id) && typeof id[0] === 'number') return id[0];
      return undefined;
    };
    return new TextTokenizer(tok, {
      bosId: special('bos_token', 'bos_token_id'),
      eosId: special('eos_token', 'eos_token_id'),
      padId: special('pad_token', 'pad_token_id'),
    });
  }

  /** Token ids of `text`. */
  encode(text: string, opts: EncodeOptions = {}): number[] {
    const ids = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    const out: number[] = [];
    if ((opts.bos ?? true) && this.bosId !== undefined) out.push(this.bosId);
    for (const id of ids) out.push(id);
    if (opts.eos && this.eosId !== undefined) out.push(this.eosId);
    return out;
  }

  /** Text of token ids. */
  decode(ids: ArrayLike<number>, opts: DecodeOptions = {}): string {
    return this.tokenizer.decode(Array.from(ids), { skip_special_tokens: opts.skipSpecial ?? true });
  }

  /** String of one token id (undefined outside the vocabulary). */
  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/** Load `tokenizer.json` (+ `tokenizer_config.json`, `config.json` when present) from a model folder. */
export async function loadTokenizer(modelDir: string): Promise<TextTokenizer> {
  const tjPath = join(modelDir, 'tokenizer.json');
  if (!(await exists(tjPath))) {
    throw new AmalgamError('E_MISSING', 'no tokenizer.json in the model folder', {
      file: modelDir,
      key: 'tokenizer.json',
      hint: 'copy tokenizer.json from the model the weights come from (amalgam convert writes one for GGUF and llama2.c models)',
    });
  }
  let tj: Record<string, unknown>;
  try {
    tj = JSON.parse(await readFile(tjPath, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new AmalgamError('E_FORMAT', `not valid JSON: ${(e as Error).message}`, { file: tjPath, cause: e });
  }
  const tcPath = join(modelDir, 'tokenizer_config.json');
  const tc = (await exists(tcPath)) ? await readJsonObject(tcPath) : {};
  const cPath = join(modelDir, 'config.json');
  const cfg = (await exists(cPath)) ? await readJsonObject(cPath) : {};
  try {
    return TextTokenizer.fromJson(tj, tc, cfg);
  } catch (e) {
    if (e instanceof AmalgamError) throw new AmalgamError(e.code, e.message, { file: tjPath, cause: e });
    throw e;
  }
}
