/**
 * A strict JSON parser for untrusted file headers. Unlike JSON.parse it rejects duplicate
 * object keys (which JSON.parse silently resolves to the last one) and bounds nesting depth,
 * so no input can exhaust the stack. Objects are ordinary objects; a key such as `__proto__` is
 * stored as an own data property, never as the prototype.
 */
export class StrictJsonError extends Error {
  constructor(
    message: string,
    readonly position: number,
    readonly key?: string,
    /** Keys of the object members that enclose the error, outermost first. */
    readonly path: readonly string[] = [],
  ) {
    super(message);
  }
}

export type JsonValue = null | boolean | number | string | JsonValue[] | { [k: string]: JsonValue };

export interface StrictJsonOptions {
  maxDepth?: number;
  /** Characters allowed after the top-level value (default: JSON whitespace). */
  allowTrailing?: (code: number) => boolean;
  /**
   * Accept only integer literals (no fraction, exponent or `-0`), as a reader that deserialises
   * numbers into integer types does.
   */
  integersOnly?: boolean;
}

const isWs = (c: number) => c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d;

/** Key order of every object the parser built (the engine lists integer-like keys first). */
const KEY_ORDER = new WeakMap<object, string[]>();

/**
 * Keys of an object in the order they appear in the JSON text. `Object.keys` puts keys that look
 * like array indices ("0", "10") first in numeric order, which loses the file's order.
 */
export function keysInOrder(obj: object): string[] {
  return KEY_ORDER.get(obj) ?? Object.keys(obj);
}

export function parseStrictJson(text: string, opts: StrictJsonOptions = {}): JsonValue {
  const maxDepth = opts.maxDepth ?? 64;
  const trailingOk = opts.allowTrailing ?? isWs;
  let i = 0;
  const n = text.length;
  const keyPath: string[] = [];

  const fail = (msg: string, key?: string): never => {
    throw new StrictJsonError(`${msg} at character ${i}`, i, key, keyPath.slice());
  };
  const skipWs = () => {
    while (i < n && isWs(text.charCodeAt(i))) i++;
  };

  const parseString = (): string => {
    // text[i] === '"'
    i++;
    let out = '';
    let start = i;
    for (;;) {
      if (i >= n) fail('unterminated string');
      const c = text.charCodeAt(i);
      if (c === 0x22) {
        out += text.slice(start, i);
        i++;
        return out;
      }
      if (c < 0x20) fail('control character in string');
      if (c === 0x5c) {
        out += text.slice(start, i);
        i++;
        if (i >= n) fail('unterminated escape');
        const e = text[i]!;
        i++;
        switch (e) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          case 'u': {
            const hex = text.slice(i, i + 4);
            if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail('bad \\u escape');
            out += String.fromCharCode(parseInt(hex, 16));
            i += 4;
            break;
          }
          default:
            fail(`bad escape \\${e}`);
        }
        start = i;
      } else {
        i++;
      }
    }
  };

  const NUM = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
  const parseNumber = (): number => {
    NUM.lastIndex = i;
    const m = NUM.exec(text);
    if (!m || m[0].length === 0 || m[0] === '-') fail('bad number');
    const lit = m![0];
    if (opts.integersOnly && (/[.eE]/.test(lit) || lit === '-0')) fail(`number ${lit} is not an integer`);
    i += lit.length;
    return Number(lit);
  };

  const parseValue = (depth: number): JsonValue => {
    if (depth > maxDepth) fail(`nesting deeper than ${maxDepth}`);
    skipWs();
    if (i >= n) fail('unexpected end of JSON');
    const c = text[i]!;
    if (c === '{') {
      i++;
      const obj: { [k: string]: JsonValue } = {};
      const seen = new Set<string>();
      KEY_ORDER.set(obj, []);
      skipWs();
      if (text[i] === '}') {
        i++;
        return obj;
      }
      for (;;) {
        skipWs();
        if (text[i] !== '"') fail('expected a string key');
        const key = parseString();
        if (seen.has(key)) fail(`duplicate key "${key}"`, key);
        seen.add(key);
        skipWs();
        if (text[i] !== ':') fail('expected ":"');
        i++;
        keyPath.push(key);
        const value = parseValue(depth + 1);
        keyPath.pop();
        if (key === '__proto__') Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
        else obj[key] = value;
        skipWs();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i] === '}') {
          i++;
          KEY_ORDER.set(obj, [...seen]);
          return obj;
        }
        fail('expected "," or "}"');
      }
    }
    if (c === '[') {
      i++;
      const arr: JsonValue[] = [];
      skipWs();
      if (text[i] === ']') {
        i++;
        return arr;
      }
      for (;;) {
        arr.push(parseValue(depth + 1));
        skipWs();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i] === ']') {
          i++;
          return arr;
        }
        fail('expected "," or "]"');
      }
    }
    if (c === '"') return parseString();
    if (c === 't' && text.startsWith('true', i)) {
      i += 4;
      return true;
    }
    if (c === 'f' && text.startsWith('false', i)) {
      i += 5;
      return false;
    }
    if (c === 'n' && text.startsWith('null', i)) {
      i += 4;
      return null;
    }
    return parseNumber();
  };

  const value = parseValue(0);
  while (i < n) {
    if (!trailingOk(text.charCodeAt(i))) fail('unexpected data after the JSON value');
    i++;
  }
  return value;
}
