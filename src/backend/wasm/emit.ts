/**
 * A small WebAssembly binary writer: enough of the format to build a module of numeric kernels
 * at run time (functions over an imported shared memory, f32/i32 scalar and f32x4 SIMD code).
 *
 * Code is written as nested expressions: every helper returns the bytes of an instruction
 * sequence that leaves its result on the stack, so `f32.add(get(a), get(b))` reads as it
 * computes. Locals are numbered (parameters first) by `Fn.local`.
 */

export type Code = number[];

/** Value types. */
export const i32t = 0x7f;
export const f32t = 0x7d;
export const f64t = 0x7c;
export const v128t = 0x7b;
export type ValType = typeof i32t | typeof f32t | typeof f64t | typeof v128t;

function uleb(n: number): Code {
  const out: Code = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n !== 0) b |= 0x80;
    out.push(b);
  } while (n !== 0);
  return out;
}

function sleb(n: number): Code {
  const out: Code = [];
  for (;;) {
    const b = n & 0x7f;
    n >>= 7;
    if ((n === 0 && (b & 0x40) === 0) || (n === -1 && (b & 0x40) !== 0)) {
      out.push(b);
      return out;
    }
    out.push(b | 0x80);
  }
}

function name(s: string): Code {
  const bytes = [...new TextEncoder().encode(s)];
  return [...uleb(bytes.length), ...bytes];
}

function vec(items: Code[]): Code {
  return [...uleb(items.length), ...items.flat()];
}

function section(id: number, body: Code): Code {
  return [id, ...uleb(body.length), ...body];
}

/** Concatenates code fragments. */
export function seq(...parts: Code[]): Code {
  return parts.flat();
}

// --- locals and constants --------------------------------------------------------------------

export const get = (i: number): Code => [0x20, ...uleb(i)];
export const set = (i: number, v: Code): Code => [...v, 0x21, ...uleb(i)];
export const i32c = (v: number): Code => [0x41, ...sleb(v | 0)];
export function f32c(v: number): Code {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setFloat32(0, v, true);
  return [0x43, ...b];
}
export const select = (a: Code, b: Code, cond: Code): Code => [...a, ...b, ...cond, 0x1b];
export const call = (fn: number, ...args: Code[]): Code => [...args.flat(), 0x10, ...uleb(fn)];

// --- control ---------------------------------------------------------------------------------

export const block = (...body: Code[]): Code => [0x02, 0x40, ...body.flat(), 0x0b];
export const loop = (...body: Code[]): Code => [0x03, 0x40, ...body.flat(), 0x0b];
export const br = (depth: number): Code => [0x0c, ...uleb(depth)];
export const brIf = (depth: number, cond: Code): Code => [...cond, 0x0d, ...uleb(depth)];
export function if_(cond: Code, then: Code, otherwise?: Code): Code {
  return otherwise ? [...cond, 0x04, 0x40, ...then, 0x05, ...otherwise, 0x0b] : [...cond, 0x04, 0x40, ...then, 0x0b];
}

/**
 * for (i = start; i < end; i += step) body — the body must not branch out of the loop itself
 * (its own blocks are fine). `end` is re-evaluated on every iteration, so keep it a local.
 */
export function forRange(i: number, start: Code, end: Code, step: Code, ...body: Code[]): Code {
  return seq(
    set(i, start),
    block(brIf(0, i32.ge_s(get(i), end)), loop(...body, set(i, i32.add(get(i), step)), brIf(0, i32.lt_s(get(i), end)))),
  );
}

// --- scalar ops ------------------------------------------------------------------------------

const bin = (op: number) => (a: Code, b: Code): Code => [...a, ...b, op];
const un = (op: number) => (a: Code): Code => [...a, op];

export const i32 = {
  eqz: un(0x45),
  eq: bin(0x46),
  ne: bin(0x47),
  lt_s: bin(0x48),
  gt_s: bin(0x4a),
  ge_s: bin(0x4e),
  add: bin(0x6a),
  sub: bin(0x6b),
  mul: bin(0x6c),
  div_s: bin(0x6d),
  and: bin(0x71),
  shl: bin(0x74),
  shr_s: bin(0x75),
  /** Smaller of two side-effect-free expressions (each is evaluated twice). */
  min_s: (a: Code, b: Code): Code => select(a, b, i32.lt_s(a, b)),
  load: (addr: Code, offset = 0): Code => [...addr, 0x28, 2, ...uleb(offset)],
  store: (addr: Code, v: Code, offset = 0): Code => [...addr, ...v, 0x36, 2, ...uleb(offset)],
};

export const f32 = {
  eq: bin(0x5b),
  add: bin(0x92),
  sub: bin(0x93),
  mul: bin(0x94),
  max: bin(0x97),
  fromF64: un(0xb6),
  load: (addr: Code, offset = 0): Code => [...addr, 0x2a, 2, ...uleb(offset)],
  store: (addr: Code, v: Code, offset = 0): Code => [...addr, ...v, 0x38, 2, ...uleb(offset)],
};

export function f64c(v: number): Code {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setFloat64(0, v, true);
  return [0x44, ...b];
}

export const f64 = {
  add: bin(0xa0),
  mul: bin(0xa2),
  div: bin(0xa3),
  sqrt: un(0x9f),
  fromF32: un(0xbb),
  fromI32: un(0xb7),
  store: (addr: Code, v: Code, offset = 0): Code => [...addr, ...v, 0x39, 3, ...uleb(offset)],
};

// --- SIMD (f32x4) ----------------------------------------------------------------------------

const simd = (op: number): Code => [0xfd, ...uleb(op)];
const vbin = (op: number) => (a: Code, b: Code): Code => [...a, ...b, ...simd(op)];
const vun = (op: number) => (a: Code): Code => [...a, ...simd(op)];

export const v128 = {
  load: (addr: Code, offset = 0): Code => [...addr, ...simd(0x00), 4, ...uleb(offset)],
  store: (addr: Code, v: Code, offset = 0): Code => [...addr, ...v, ...simd(0x0b), 4, ...uleb(offset)],
  /** One float from memory in every lane. */
  load32Splat: (addr: Code, offset = 0): Code => [...addr, ...simd(0x09), 2, ...uleb(offset)],
  and: vbin(0x4e),
};

export const f32x4 = {
  splat: vun(0x13),
  extractLane: (v: Code, lane: number): Code => [...v, ...simd(0x1f), lane],
  lt: vbin(0x43),
  add: vbin(0xe4),
  sub: vbin(0xe5),
  mul: vbin(0xe6),
  div: vbin(0xe7),
  min: vbin(0xe8),
  max: vbin(0xe9),
  /** Lanes as signed integers converted to float. */
  fromI32x4: vun(0xfa),
  zero: (): Code => f32x4.splat(f32c(0)),
};

export const f64x2 = {
  /** The two lower float lanes of an f32x4, widened. */
  promoteLow: vun(0x5f),
  add: vbin(0xf0),
  extractLane: (v: Code, lane: number): Code => [...v, ...simd(0x21), lane],
  zero: (): Code => [...simd(0x0c), ...new Array(16).fill(0)],
};

/** The upper two lanes of an f32x4 moved to the bottom (i8x16.shuffle). */
export function highHalf(v: Code): Code {
  return [...v, ...v, ...simd(0x0d), 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15];
}

/** v128.const with the same float in every lane. */
export function splatConst(x: number): Code {
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  for (let i = 0; i < 4; i++) dv.setFloat32(i * 4, x, true);
  return [...simd(0x0c), ...b];
}

export const i32x4 = {
  splat: vun(0x11),
  shl: vbin(0xab),
  add: vbin(0xae),
};

// --- bulk memory -----------------------------------------------------------------------------

export const memory = {
  copy: (dst: Code, src: Code, bytes: Code): Code => [...dst, ...src, ...bytes, 0xfc, ...uleb(10), 0, 0],
  fill: (dst: Code, byte: Code, bytes: Code): Code => [...dst, ...byte, ...bytes, 0xfc, ...uleb(11), 0],
};

// --- functions and modules -------------------------------------------------------------------

export class Fn {
  readonly locals: ValType[] = [];
  body: Code = [];

  constructor(
    readonly name: string,
    readonly params: ValType[],
    readonly results: ValType[] = [],
  ) {}

  /** A new local of type t; returns its index. */
  local(t: ValType): number {
    this.locals.push(t);
    return this.params.length + this.locals.length - 1;
  }

  /** Several new locals of one type. */
  localsOf(t: ValType, n: number): number[] {
    return Array.from({ length: n }, () => this.local(t));
  }

  emit(...code: Code[]): void {
    for (const c of code) for (const b of c) this.body.push(b);
  }

  /** The function's entry in the code section. */
  encode(): Code {
    const groups: Code[] = [];
    for (let i = 0; i < this.locals.length; ) {
      let j = i;
      while (j < this.locals.length && this.locals[j] === this.locals[i]) j++;
      groups.push([...uleb(j - i), this.locals[i]!]);
      i = j;
    }
    const body = [...vec(groups), ...this.body, 0x0b];
    return [...uleb(body.length), ...body];
  }
}

export interface ImportedFn {
  module: string;
  name: string;
  params: ValType[];
  results: ValType[];
}

/**
 * A module importing `env.memory` (shared, up to `maxPages`), optionally some functions, and
 * defining `fns`; exported functions are those named in `exports`. Function indices: imports
 * first, then `fns` in order.
 */
export function buildModule(opts: { imports?: ImportedFn[]; fns: Fn[]; exports: string[]; maxPages: number }): Uint8Array {
  const imports = opts.imports ?? [];
  const sigs: Code[] = [];
  const sigIndex = (params: ValType[], results: ValType[]): number => {
    const s = [0x60, ...vec(params.map((p) => [p])), ...vec(results.map((r) => [r]))];
    const key = s.join(',');
    const found = sigs.findIndex((x) => x.join(',') === key);
    if (found >= 0) return found;
    sigs.push(s);
    return sigs.length - 1;
  };
  const importEntries: Code[] = imports.map((f) => [...name(f.module), ...name(f.name), 0x00, ...uleb(sigIndex(f.params, f.results))]);
  importEntries.push([...name('env'), ...name('memory'), 0x02, 0x03, ...uleb(1), ...uleb(opts.maxPages)]);
  const funcSigs = opts.fns.map((f) => uleb(sigIndex(f.params, f.results)));
  const exportEntries = opts.exports.map((n) => {
    const i = opts.fns.findIndex((f) => f.name === n);
    if (i < 0) throw new Error(`export of unknown function ${n}`);
    return [...name(n), 0x00, ...uleb(imports.length + i)];
  });
  const bytes = [
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, vec(sigs)),
    ...section(2, vec(importEntries)),
    ...section(3, vec(funcSigs)),
    ...section(7, vec(exportEntries)),
    ...section(10, vec(opts.fns.map((f) => f.encode()))),
  ];
  return Uint8Array.from(bytes);
}
