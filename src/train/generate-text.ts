/**
 * Text in, text out: load a model folder (and optionally a LoRA adapter), encode BOS + prompt,
 * generate, decode. Generation stops at EOS, at BOS (which separates documents in models such
 * as llama2.c's), or after maxTokens.
 */
import { withModelFolder } from '../convert/model-input.js';
import { loadTokenizer } from '../data/tokenizer.js';
import { generate } from '../nn/generate.js';
import { loadModel } from './checkpoint.js';

export interface GenerateTextOptions {
  prompt?: string;
  /** Default 256. */
  maxTokens?: number;
  /** 0 (default) is greedy. */
  temperature?: number;
  topK?: number;
  topP?: number;
  seed?: number;
  adapter?: string;
  /**
   * Called as tokens arrive with the text so far (prompt included). The text only grows: a
   * trailing incomplete UTF-8 character is held back until it is complete.
   */
  onText?: (text: string) => void;
}

export interface GenerateTextResult {
  /** Prompt and continuation, decoded. */
  text: string;
  /** Prompt token ids (BOS first) followed by the generated ids. */
  tokens: number[];
  generatedTokens: number;
  stop: 'stop-token' | 'length';
  seconds: number;
  tokensPerSecond: number;
}

/** Generates from a model: a Hugging Face folder, or a GGUF / llama2.c file (converted on the fly). */
export async function generateText(model: string, opts: GenerateTextOptions = {}): Promise<GenerateTextResult> {
  return withModelFolder(model, (dir) => generateFromFolder(dir, opts));
}

async function generateFromFolder(modelDir: string, opts: GenerateTextOptions): Promise<GenerateTextResult> {
  const tok = await loadTokenizer(modelDir);
  const { model } = await loadModel(modelDir, { adapter: opts.adapter });
  try {
    const prompt = tok.encode(opts.prompt ?? '', { bos: true });
    if (prompt.length === 0) prompt.push(tok.eosId ?? 0);
    const stops = new Set(model.config.eosTokenIds);
    if (tok.eosId !== undefined) stops.add(tok.eosId);
    if (tok.bosId !== undefined) stops.add(tok.bosId);
    const ids = [...prompt];
    let shown = '';
    const emit = (final: boolean) => {
      if (!opts.onText) return;
      let text = tok.decode(ids);
      if (!final) text = text.replace(/\uFFFD+$/, '');
      if (text.length > shown.length && text.startsWith(shown)) {
        shown = text;
        opts.onText(text);
      }
    };
    emit(false);
    const t0 = performance.now();
    const r = generate(model, prompt, {
      maxNewTokens: opts.maxTokens ?? 256,
      temperature: opts.temperature ?? 0,
      topK: opts.topK,
      topP: opts.topP,
      seed: opts.seed,
      stopTokens: [...stops],
      onToken: (id) => {
        ids.push(id);
        emit(false);
      },
    });
    const seconds = (performance.now() - t0) / 1000;
    emit(true);
    return {
      text: tok.decode(r.tokens),
      tokens: r.tokens,
      generatedTokens: r.generated.length,
      stop: r.stop,
      seconds,
      tokensPerSecond: r.generated.length / Math.max(seconds, 1e-9),
    };
  } finally {
    model.dispose();
  }
}
