/**
 * A byte builder for crafting GGUF headers by hand, including malformed ones.
 */
export class Bytes {
  private parts: number[] = [];

  u8(v: number): this {
    this.parts.push(v & 0xff);
    return this;
  }
  u32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v >>> 0);
    return this.raw(b);
  }
  i32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeInt32LE(v);
    return this.raw(b);
  }
  f32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeFloatLE(v);
    return this.raw(b);
  }
  u64(v: number | bigint): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    return this.raw(b);
  }
  /** A GGUF string: u64 byte length, then the bytes. */
  str(s: string | Uint8Array): this {
    const b = typeof s === 'string' ? Buffer.from(s, 'utf8') : s;
    return this.u64(b.length).raw(b);
  }
  raw(b: Uint8Array | number[]): this {
    for (const x of b) this.parts.push(x);
    return this;
  }
  zeros(n: number): this {
    for (let i = 0; i < n; i++) this.parts.push(0);
    return this;
  }
  get length(): number {
    return this.parts.length;
  }
  /** Pad with zeros to a multiple of `a`. */
  align(a: number): this {
    return this.zeros((a - (this.parts.length % a)) % a);
  }
  bytes(): Uint8Array {
    return Uint8Array.from(this.parts);
  }
}

/** GGUF header start: magic, version, tensor count, KV count. */
export function ggufStart(tensorCount: number | bigint, kvCount: number | bigint, version = 3): Bytes {
  return new Bytes().raw([0x47, 0x47, 0x55, 0x46]).u32(version).u64(tensorCount).u64(kvCount);
}

/** One tensor info: name, dims (ne0 first), ggml type, offset. */
export function tensorInfo(b: Bytes, name: string, dims: (number | bigint)[], type: number, offset: number | bigint): Bytes {
  b.str(name).u32(dims.length);
  for (const d of dims) b.u64(d);
  return b.u32(type).u64(offset);
}
