/**
 * llama2.c model checkpoints (`.bin`) and tokenizer files (formats.md §6, §7).
 *
 * Model files: the legacy version 0 layout (7 × int32 header; a negative vocab_size means an
 * unshared classifier follows at the end) and version 1 ("ak42" magic, 256-byte header). Version
 * 2 (grouped int8) and unknown versions are rejected. The header must account for the file size
 * exactly. Tensors are read on demand with positional reads.
 *
 * Tensor names: `token_embedding_table`, per layer N `rms_att_weight.N`, `wq.N`, `wk.N`, `wv.N`,
 * `wo.N`, `rms_ffn_weight.N`, `w1.N` (gate), `w2.N` (down), `w3.N` (up), then
 * `rms_final_weight` and, for an unshared classifier, `wcls`. Matrices are [out, in] float32 with
 * Q and K in the interleaved rotary layout; norms are 1-D. The legacy rotary tables are skipped.
 */
import { AmalgamError } from '../errors.js';
import { decodeToF32 } from '../tensor/dtype.js';
import { FileByteReader, MemoryByteReader, type ByteReader, type TensorInfo, type TensorSource } from './source.js';

export const LLAMA2C_MAGIC = 0x616b3432; // "ak42"
const LEGACY_HEADER_BYTES = 28;
const VERSIONED_HEADER_BYTES = 256;

export interface Llama2cConfig {
  dim: number;
  hiddenDim: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  /** Vocabulary size (always positive; see sharedClassifier). */
  vocabSize: number;
  seqLen: number;
  /** True when the output classifier is the token embedding (no `wcls`). */
  sharedClassifier: boolean;
  /** 0 for the legacy layout, 1 for the "ak42" version 1 layout. */
  version: number;
  /** dim / nHeads. */
  headSize: number;
  /** nKvHeads · headSize. */
  kvDim: number;
}

interface Entry {
  name: string;
  shape: number[];
  /** Byte offset in the file. */
  offset: number;
  bytes: number;
}

function header(message: string, file: string, key?: string, hint?: string): AmalgamError {
  return new AmalgamError('E_HEADER', message, { file, key, hint });
}

function checkConfig(c: Llama2cConfig, file: string): void {
  const fields: [keyof Llama2cConfig, string][] = [
    ['dim', 'dim'], ['hiddenDim', 'hidden_dim'], ['nLayers', 'n_layers'], ['nHeads', 'n_heads'],
    ['nKvHeads', 'n_kv_heads'], ['vocabSize', 'vocab_size'], ['seqLen', 'seq_len'],
  ];
  for (const [k, label] of fields) {
    const v = c[k] as number;
    if (!(v > 0)) throw header(`${label} is ${v}; it must be positive`, file, label, 'the file is corrupt or not a llama2.c checkpoint');
  }
  if (c.dim % c.nHeads !== 0) {
    throw header(`dim ${c.dim} is not divisible by n_heads ${c.nHeads}`, file, 'n_heads', 'the file is corrupt or not a llama2.c checkpoint');
  }
  if (c.nKvHeads > c.nHeads || c.nHeads % c.nKvHeads !== 0) {
    throw header(`n_heads ${c.nHeads} is not a multiple of n_kv_heads ${c.nKvHeads}`, file, 'n_kv_heads', 'the file is corrupt or not a llama2.c checkpoint');
  }
  if (c.headSize % 2 !== 0) {
    throw header(`head size ${c.headSize} (dim / n_heads) is odd; rotary embeddings need pairs`, file, 'n_heads');
  }
}

/** Layout of the tensors in the file, and the total size the header implies. */
function layout(c: Llama2cConfig): { entries: Entry[]; expectedSize: number; floats: number } {
  const { dim, hiddenDim: hid, nLayers: L, vocabSize: V, kvDim, headSize, seqLen } = c;
  const entries: Entry[] = [];
  let pos = c.version === 0 ? LEGACY_HEADER_BYTES : VERSIONED_HEADER_BYTES;
  const start = pos;
  const add = (name: string, shape: number[]) => {
    const bytes = 4 * shape.reduce((a, b) => a * b, 1);
    entries.push({ name, shape, offset: pos, bytes });
    pos += bytes;
  };
  const perLayer = (name: string, shape: number[]) => {
    for (let l = 0; l < L; l++) add(`${name}.${l}`, shape);
  };
  const matrices = () => {
    perLayer('wq', [dim, dim]);
    perLayer('wk', [kvDim, dim]);
    perLayer('wv', [kvDim, dim]);
    perLayer('wo', [dim, dim]);
  };
  if (c.version === 0) {
    add('token_embedding_table', [V, dim]);
    perLayer('rms_att_weight', [dim]);
    matrices();
    perLayer('rms_ffn_weight', [dim]);
    perLayer('w1', [hid, dim]);
    perLayer('w2', [dim, hid]);
    perLayer('w3', [hid, dim]);
    add('rms_final_weight', [dim]);
    pos += 2 * 4 * seqLen * (headSize / 2); // freq_cis_real, freq_cis_imag (unused)
    if (!c.sharedClassifier) add('wcls', [V, dim]);
  } else {
    perLayer('rms_att_weight', [dim]);
    perLayer('rms_ffn_weight', [dim]);
    add('rms_final_weight', [dim]);
    add('token_embedding_table', [V, dim]);
    matrices();
    perLayer('w1', [hid, dim]);
    perLayer('w2', [dim, hid]);
    perLayer('w3', [hid, dim]);
    if (!c.sharedClassifier) add('wcls', [V, dim]);
  }
  return { entries, expectedSize: pos, floats: (pos - start) / 4 };
}

/** Canonical listing order: the legacy file order, whatever the version. */
const ORDER = ['token_embedding_table', 'rms_att_weight', 'wq', 'wk', 'wv', 'wo', 'rms_ffn_weight', 'w1', 'w2', 'w3', 'rms_final_weight', 'wcls'];

function describeHeader(c: Llama2cConfig): string {
  return `dim ${c.dim}, hidden_dim ${c.hiddenDim}, n_layers ${c.nLayers}, n_heads ${c.nHeads}, n_kv_heads ${c.nKvHeads}, vocab_size ${c.sharedClassifier ? '' : '-'}${c.vocabSize}, seq_len ${c.seqLen}`;
}

export class Llama2cCheckpoint implements TensorSource {
  readonly metadata: Record<string, string>;
  private readonly entries: Entry[];
  private readonly byName: Map<string, Entry>;

  private constructor(
    private readonly reader: ByteReader,
    readonly config: Llama2cConfig,
    entries: Entry[],
  ) {
    const rank = (n: string) => ORDER.indexOf(n.replace(/\.\d+$/, ''));
    const layer = (n: string) => Number(/\.(\d+)$/.exec(n)?.[1] ?? 0);
    this.entries = entries.slice().sort((a, b) => rank(a.name) - rank(b.name) || layer(a.name) - layer(b.name));
    this.byName = new Map(entries.map((e) => [e.name, e]));
    this.metadata = {
      format: 'llama2.c',
      version: String(config.version),
      dim: String(config.dim),
      hidden_dim: String(config.hiddenDim),
      n_layers: String(config.nLayers),
      n_heads: String(config.nHeads),
      n_kv_heads: String(config.nKvHeads),
      vocab_size: String(config.vocabSize),
      seq_len: String(config.seqLen),
      shared_classifier: String(config.sharedClassifier),
    };
  }

  static async open(path: string): Promise<Llama2cCheckpoint> {
    const reader = await FileByteReader.open(path);
    try {
      return await Llama2cCheckpoint.fromReader(reader);
    } catch (e) {
      await reader.close();
      throw e;
    }
  }

  static async fromBytes(bytes: Uint8Array, name = '<memory>'): Promise<Llama2cCheckpoint> {
    return Llama2cCheckpoint.fromReader(new MemoryByteReader(bytes, name));
  }

  static async fromReader(reader: ByteReader): Promise<Llama2cCheckpoint> {
    try {
      return await Llama2cCheckpoint.parse(reader);
    } catch (e) {
      // A tokenizer file given where a checkpoint belongs fails the header checks in confusing
      // ways (its first token's score reads as hidden_dim 0): say what the file is instead.
      if (e instanceof AmalgamError && (e.code === 'E_HEADER' || e.code === 'E_FORMAT') && reader.size <= TOKENIZER_SNIFF_BYTES) {
        const tokens = llama2cTokenizerEntries(await reader.read(0, reader.size));
        if (tokens > 0) {
          throw new AmalgamError('E_FORMAT', `this is a llama2.c tokenizer file (${tokens} tokens), not a model checkpoint`, {
            file: reader.path,
            hint: 'give the model .bin file; its tokenizer is found beside it (tok<vocab>.bin or tokenizer.bin) or passed to amalgam convert with --tokenizer',
            cause: e,
          });
        }
      }
      throw e;
    }
  }

  private static async parse(reader: ByteReader): Promise<Llama2cCheckpoint> {
    const file = reader.path;
    const size = reader.size;
    if (size < LEGACY_HEADER_BYTES) {
      throw header(`file is ${size} bytes, too short for a llama2.c header (28 bytes)`, file, undefined, 'the file is truncated or not a llama2.c checkpoint');
    }
    const head = await reader.read(0, Math.min(size, VERSIONED_HEADER_BYTES));
    const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
    let config: Llama2cConfig;
    if (dv.getUint32(0, true) === LLAMA2C_MAGIC) {
      if (size < 8) throw header('file ends inside the version field', file, 'version');
      const version = dv.getInt32(4, true);
      if (version === 2) {
        throw new AmalgamError('E_UNSUPPORTED', 'llama2.c version 2 checkpoints (Q8_0 grouped int8 weights) are not supported', {
          file,
          key: 'version',
          hint: 'export the model as version 0 (legacy) or 1 (float32) with llama2.c export.py',
        });
      }
      if (version !== 1) {
        throw new AmalgamError('E_UNSUPPORTED', `unknown llama2.c checkpoint version ${version} (amalgam reads the legacy layout and version 1)`, { file, key: 'version' });
      }
      if (size < VERSIONED_HEADER_BYTES) {
        throw header(`file is ${size} bytes, too short for a version 1 header (256 bytes)`, file, undefined, 'the file is truncated');
      }
      const p = (i: number) => dv.getInt32(8 + 4 * i, true);
      const shared = dv.getUint8(36);
      if (shared > 1) throw header(`shared_classifier flag is ${shared} (must be 0 or 1)`, file, 'shared_classifier');
      config = {
        dim: p(0), hiddenDim: p(1), nLayers: p(2), nHeads: p(3), nKvHeads: p(4), vocabSize: p(5), seqLen: p(6),
        sharedClassifier: shared === 1, version: 1, headSize: 0, kvDim: 0,
      };
    } else {
      const p = (i: number) => dv.getInt32(4 * i, true);
      const v = p(5);
      config = {
        dim: p(0), hiddenDim: p(1), nLayers: p(2), nHeads: p(3), nKvHeads: p(4), vocabSize: Math.abs(v), seqLen: p(6),
        sharedClassifier: v > 0, version: 0, headSize: 0, kvDim: 0,
      };
    }
    config.headSize = config.nHeads > 0 ? config.dim / config.nHeads : 0;
    config.kvDim = config.nKvHeads * config.headSize;
    checkConfig(config, file);
    const { entries, expectedSize, floats } = layout(config);
    if (!Number.isSafeInteger(expectedSize)) {
      throw header(`header (${describeHeader(config)}) describes an absurdly large model`, file, 'header', 'the file is corrupt or not a llama2.c checkpoint');
    }
    if (expectedSize !== size) {
      const headerBytes = config.version === 0 ? LEGACY_HEADER_BYTES : VERSIONED_HEADER_BYTES;
      const cls = 4 * config.vocabSize * config.dim;
      let hint: string;
      if (config.sharedClassifier && size === expectedSize + cls) hint = 'the size fits an unshared classifier, but vocab_size is positive (shared)';
      else if (!config.sharedClassifier && size === expectedSize - cls) hint = 'the size fits a shared classifier, but vocab_size is negative (unshared)';
      else if (size < expectedSize) hint = 'the file is truncated, or the header does not describe this file';
      else hint = 'the file has extra bytes: it may be a different llama2.c format or a different model';
      throw new AmalgamError(
        'E_FORMAT',
        `file is ${size} bytes, but the header (${describeHeader(config)}) implies ${headerBytes} + 4 × ${floats} floats = ${expectedSize} bytes`,
        { file, key: 'header', hint },
      );
    }
    return new Llama2cCheckpoint(reader, config, entries);
  }

  get path(): string {
    return this.reader.path;
  }

  tensors(): TensorInfo[] {
    return this.entries.map((e) => ({ name: e.name, dtype: 'F32', shape: e.shape.slice() }));
  }
  has(name: string): boolean {
    return this.byName.has(name);
  }
  private entry(name: string): Entry {
    const e = this.byName.get(name);
    if (!e) throw new AmalgamError('E_MISSING', 'no such tensor', { file: this.path, key: name });
    return e;
  }
  info(name: string): TensorInfo {
    const e = this.entry(name);
    return { name, dtype: 'F32', shape: e.shape.slice() };
  }
  /** Byte offset of a tensor in the file. */
  offsetOf(name: string): number {
    return this.entry(name).offset;
  }
  async readRaw(name: string): Promise<Uint8Array> {
    const e = this.entry(name);
    return this.reader.read(e.offset, e.bytes);
  }
  async readF32(name: string): Promise<Float32Array> {
    return decodeToF32('F32', await this.readRaw(name), { what: name });
  }
  async close(): Promise<void> {
    await this.reader.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

/** Files up to this size are checked for the tokenizer layout when they fail as checkpoints. */
const TOKENIZER_SNIFF_BYTES = 64 << 20;

/**
 * The number of entries when `bytes` has the layout of a llama2.c tokenizer file (a positive
 * max_token_length, then entries of a finite float32 score, a length in 0..max_token_length and
 * that many bytes, ending exactly at the end; at least three entries), else 0.
 */
export function llama2cTokenizerEntries(bytes: Uint8Array): number {
  const size = bytes.length;
  if (size < 12) return 0;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const maxTokenLength = dv.getInt32(0, true);
  if (maxTokenLength <= 0 || maxTokenLength > 1 << 16) return 0;
  let pos = 4;
  let n = 0;
  while (pos + 8 <= size) {
    const score = dv.getFloat32(pos, true);
    const len = dv.getInt32(pos + 4, true);
    if (!Number.isFinite(score) || len < 0 || len > maxTokenLength) return 0;
    pos += 8 + len;
    n++;
  }
  return pos === size && n >= 3 ? n : 0;
}

export interface Llama2cTokenizer {
  path: string;
  maxTokenLength: number;
  /** Token texts by id, as stored (spaces are real spaces; byte tokens are `<0xHH>`). */
  pieces: string[];
  /** Scores by id (float32 values). */
  scores: number[];
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Parse a llama2.c tokenizer file held in memory; `vocabSize` comes from the model header. */
export function parseLlama2cTokenizer(bytes: Uint8Array, vocabSize: number, file = '<memory>'): Llama2cTokenizer {
  if (!Number.isSafeInteger(vocabSize) || vocabSize <= 0) {
    throw new AmalgamError('E_USAGE', `vocabulary size must be a positive integer, got ${vocabSize}`, { file });
  }
  const size = bytes.length;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (size < 4) {
    throw new AmalgamError('E_HEADER', `file is ${size} bytes, too short for a llama2.c tokenizer`, { file, key: 'max_token_length', hint: 'the file is truncated' });
  }
  const maxTokenLength = dv.getInt32(0, true);
  if (maxTokenLength <= 0) {
    throw new AmalgamError('E_HEADER', `max_token_length is ${maxTokenLength}; it must be positive`, { file, key: 'max_token_length', hint: 'not a llama2.c tokenizer file' });
  }
  // Each entry needs at least 8 bytes (score and length).
  if (4 + 8 * vocabSize > size) {
    throw new AmalgamError('E_FORMAT', `file is ${size} bytes, too short for ${vocabSize} entries (at least ${4 + 8 * vocabSize} bytes)`, {
      file,
      hint: 'the file is truncated, or it belongs to a model with a smaller vocabulary',
    });
  }
  const pieces: string[] = [];
  const scores: number[] = [];
  let pos = 4;
  for (let id = 0; id < vocabSize; id++) {
    const key = `token ${id}`;
    if (pos + 8 > size) {
      throw new AmalgamError('E_FORMAT', `file ends inside the entry of token ${id} (at byte ${pos}, file is ${size} bytes)`, { file, key, hint: 'the file is truncated' });
    }
    const score = dv.getFloat32(pos, true);
    const len = dv.getInt32(pos + 4, true);
    pos += 8;
    if (len < 0 || len > maxTokenLength) {
      throw new AmalgamError('E_FORMAT', `length ${len} is outside 0..max_token_length (${maxTokenLength})`, { file, key, hint: 'the file is corrupt' });
    }
    if (pos + len > size) {
      throw new AmalgamError('E_FORMAT', `file ends inside the text of token ${id} (${len} bytes at byte ${pos}, file is ${size} bytes)`, { file, key, hint: 'the file is truncated' });
    }
    let text: string;
    try {
      text = utf8.decode(bytes.subarray(pos, pos + len));
    } catch {
      throw new AmalgamError('E_FORMAT', 'token text is not valid UTF-8', { file, key });
    }
    pos += len;
    pieces.push(text);
    scores.push(score);
  }
  if (pos !== size) {
    throw new AmalgamError('E_FORMAT', `${size - pos} bytes follow the ${vocabSize} entries the model's vocabulary needs`, {
      file,
      hint: 'the tokenizer has more entries than the model: it probably belongs to another model',
    });
  }
  return { path: file, maxTokenLength, pieces, scores };
}

/** Read `tokenizer.bin` / `tok512.bin`; `vocabSize` comes from the model header. */
export async function readLlama2cTokenizer(path: string, vocabSize: number): Promise<Llama2cTokenizer> {
  const reader = await FileByteReader.open(path);
  try {
    const bytes = await reader.read(0, reader.size);
    return parseLlama2cTokenizer(bytes, vocabSize, path);
  } finally {
    await reader.close();
  }
}
