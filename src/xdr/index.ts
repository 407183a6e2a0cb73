/**
 * XDR (RFC 4506) cursors and codec combinators: the subset libvirt's remote protocol uses.
 * Sans-I/O: a reader walks a Buffer, a writer fills a growable one. Decoders enforce the
 * declared maxima (string, opaque and array lengths) so that a hostile length can never
 * cause an unbounded allocation: every length is also checked against the bytes left.
 */
import { SparsevirtError } from '../errors.js';

export class XdrError extends SparsevirtError {
  /**
   * `code` is ERR_PROTOCOL when decoding bytes from the peer, ERR_INVALID_ARG when a value
   * handed to an encoder does not fit its XDR type (out of range, over its maximum).
   */
  constructor(message: string, code: 'ERR_PROTOCOL' | 'ERR_INVALID_ARG' = 'ERR_PROTOCOL') {
    super(code, `XDR: ${message}`);
    this.name = 'XdrError';
  }
}

/** An encoder was handed a value its XDR type cannot carry. */
function badValue(message: string): XdrError {
  return new XdrError(message, 'ERR_INVALID_ARG');
}

const INT_MIN = -0x80000000;
const INT_MAX = 0x7fffffff;
const UINT_MAX = 0xffffffff;
const HYPER_MIN = -(1n << 63n);
const HYPER_MAX = (1n << 63n) - 1n;
const UHYPER_MAX = (1n << 64n) - 1n;

/** A 64-bit value as bigint; a `number` must be a safe integer (never round silently). */
function toBig64(v: bigint | number, what: string, min: bigint, max: bigint): bigint {
  let b: bigint;
  if (typeof v === 'bigint') b = v;
  else if (Number.isSafeInteger(v)) b = BigInt(v);
  else throw badValue(`${what} must be an integer below 2^53 when given as a number (use a bigint), got ${v}`);
  if (b < min || b > max) throw badValue(`${what} out of range: ${b}`);
  return b;
}

const pad4 = (n: number): number => (4 - (n & 3)) & 3;

export class XdrReader {
  pos: number;
  readonly end: number;
  constructor(readonly buf: Buffer, start = 0, end = buf.length) {
    this.pos = start;
    this.end = end;
  }
  get remaining(): number {
    return this.end - this.pos;
  }
  private need(n: number, what: string): void {
    if (n > this.end - this.pos) throw new XdrError(`truncated ${what}: need ${n} bytes, have ${this.end - this.pos}`);
  }
  int(): number {
    this.need(4, 'int');
    const v = this.buf.readInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  uint(): number {
    this.need(4, 'unsigned int');
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  bool(): boolean {
    const v = this.int();
    if (v !== 0 && v !== 1) throw new XdrError(`bool out of range: ${v}`);
    return v === 1;
  }
  hyper(): bigint {
    this.need(8, 'hyper');
    const v = this.buf.readBigInt64BE(this.pos);
    this.pos += 8;
    return v;
  }
  uhyper(): bigint {
    this.need(8, 'unsigned hyper');
    const v = this.buf.readBigUInt64BE(this.pos);
    this.pos += 8;
    return v;
  }
  /**
   * A copy, not a view: a decoded value (a pool's UUID, say) may live long, and must not keep
   * the frame's buffer (a shared receive slab) alive with it.
   */
  fixedOpaque(n: number): Buffer {
    this.need(n + pad4(n), 'fixed opaque');
    const v = Buffer.from(this.buf.subarray(this.pos, this.pos + n));
    this.pos += n + pad4(n);
    return v;
  }
  /** Variable-length opaque: a copy (see `fixedOpaque`). */
  opaque(max: number): Buffer {
    const n = this.uint();
    if (n > max) throw new XdrError(`opaque length ${n} exceeds maximum ${max}`);
    return this.fixedOpaque(n);
  }
  string(max: number): string {
    const n = this.uint();
    if (n > max) throw new XdrError(`string length ${n} exceeds maximum ${max}`);
    this.need(n + pad4(n), 'string');
    const v = this.buf.toString('utf8', this.pos, this.pos + n);
    this.pos += n + pad4(n);
    return v;
  }
  /** Array count, bounded by the declared maximum and by the bytes left (each element ≥ minElemSize bytes). */
  count(max: number, minElemSize = 4): number {
    const n = this.uint();
    if (n > max) throw new XdrError(`array count ${n} exceeds maximum ${max}`);
    if (n * minElemSize > this.end - this.pos) throw new XdrError(`array count ${n} larger than the message`);
    return n;
  }
}

export class XdrWriter {
  buf: Buffer;
  pos: number;
  constructor(initial = 256, start = 0) {
    this.buf = Buffer.allocUnsafe(Math.max(initial, start + 16));
    this.pos = start;
  }
  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = Buffer.allocUnsafe(size);
    this.buf.copy(next, 0, 0, this.pos);
    this.buf = next;
  }
  int(v: number): this {
    if (!Number.isInteger(v) || v < INT_MIN || v > INT_MAX) throw badValue(`int out of range: ${v}`);
    this.ensure(4);
    this.buf.writeInt32BE(v, this.pos);
    this.pos += 4;
    return this;
  }
  uint(v: number): this {
    // No silent `>>> 0` wrap: -1 or 2^32 would go out as a different number.
    if (!Number.isInteger(v) || v < 0 || v > UINT_MAX) throw badValue(`unsigned int out of range: ${v}`);
    this.ensure(4);
    this.buf.writeUInt32BE(v, this.pos);
    this.pos += 4;
    return this;
  }
  bool(v: boolean): this {
    return this.int(v ? 1 : 0);
  }
  hyper(v: bigint | number): this {
    const b = toBig64(v, 'hyper', HYPER_MIN, HYPER_MAX);
    this.ensure(8);
    this.buf.writeBigInt64BE(b, this.pos);
    this.pos += 8;
    return this;
  }
  uhyper(v: bigint | number): this {
    const b = toBig64(v, 'unsigned hyper', 0n, UHYPER_MAX);
    this.ensure(8);
    this.buf.writeBigUInt64BE(b, this.pos);
    this.pos += 8;
    return this;
  }
  fixedOpaque(b: Uint8Array): this {
    const p = pad4(b.length);
    this.ensure(b.length + p);
    this.buf.set(b, this.pos);
    this.pos += b.length;
    this.buf.fill(0, this.pos, this.pos + p);
    this.pos += p;
    return this;
  }
  /** Variable-length opaque; `max` is the declared maximum (checked so the peer will not refuse it). */
  opaque(b: Uint8Array, max = UINT_MAX): this {
    if (b.length > max) throw badValue(`opaque length ${b.length} exceeds maximum ${max}`);
    this.uint(b.length);
    return this.fixedOpaque(b);
  }
  /** String as UTF-8; `max` is the declared maximum in bytes. */
  string(s: string, max = UINT_MAX): this {
    const n = Buffer.byteLength(s, 'utf8');
    if (n > max) throw badValue(`string length ${n} exceeds maximum ${max}`);
    const p = pad4(n);
    this.ensure(4 + n + p);
    this.buf.writeUInt32BE(n, this.pos);
    this.pos += 4;
    this.buf.write(s, this.pos, n, 'utf8');
    this.pos += n;
    this.buf.fill(0, this.pos, this.pos + p);
    this.pos += p;
    return this;
  }
  /** The bytes written so far (a view; valid until the next write). */
  view(): Buffer {
    return this.buf.subarray(0, this.pos);
  }
}

// ---------------------------------------------------------------------------------------
// Codec combinators: procedures are declared as data (see protocol/).

export interface Codec<T> {
  enc(w: XdrWriter, v: T): void;
  dec(r: XdrReader): T;
  /** Smallest encoded size in bytes, used to bound array counts. */
  readonly min: number;
}

export const int: Codec<number> = { enc: (w, v) => void w.int(v), dec: (r) => r.int(), min: 4 };
export const uint: Codec<number> = { enc: (w, v) => void w.uint(v), dec: (r) => r.uint(), min: 4 };
export const bool: Codec<boolean> = { enc: (w, v) => void w.bool(v), dec: (r) => r.int() !== 0, min: 4 };
export const hyper: Codec<bigint> = { enc: (w, v) => void w.hyper(v), dec: (r) => r.hyper(), min: 8 };
export const uhyper: Codec<bigint> = { enc: (w, v) => void w.uhyper(v), dec: (r) => r.uhyper(), min: 8 };
export const voidCodec: Codec<void> = { enc: () => {}, dec: () => undefined, min: 0 };

export function string(max: number): Codec<string> {
  return { enc: (w, v) => void w.string(v, max), dec: (r) => r.string(max), min: 4 };
}
export function opaque(max: number): Codec<Buffer> {
  return { enc: (w, v) => void w.opaque(v, max), dec: (r) => r.opaque(max), min: 4 };
}
export function fixedOpaque(n: number): Codec<Buffer> {
  return {
    enc: (w, v) => {
      if (v.length !== n) throw badValue(`fixed opaque must be ${n} bytes, got ${v.length}`);
      w.fixedOpaque(v);
    },
    dec: (r) => r.fixedOpaque(n),
    min: n + pad4(n),
  };
}
export function optional<T>(c: Codec<T>): Codec<T | null> {
  return {
    enc: (w, v) => {
      if (v === null || v === undefined) w.uint(0);
      else {
        w.uint(1);
        c.enc(w, v);
      }
    },
    dec: (r) => {
      const present = r.uint();
      if (present === 0) return null;
      if (present !== 1) throw new XdrError(`optional discriminant out of range: ${present}`);
      return c.dec(r);
    },
    min: 4,
  };
}
/**
 * Variable-length array `T x<max>`. Elements must have a non-zero encoded size (XDR has no
 * empty structs or void elements): the decoder bounds the count by the bytes left, which a
 * zero-size element could not do.
 */
export function array<T>(c: Codec<T>, max: number): Codec<T[]> {
  if (c.min <= 0) throw badValue('array elements must have a non-zero encoded size');
  return {
    enc: (w, v) => {
      if (v.length > max) throw badValue(`array of ${v.length} exceeds maximum ${max}`);
      w.uint(v.length);
      for (const e of v) c.enc(w, e);
    },
    dec: (r) => {
      const n = r.count(max, c.min);
      const out: T[] = new Array(n);
      for (let i = 0; i < n; i++) out[i] = c.dec(r);
      return out;
    },
    min: 4,
  };
}

type CodecMap = Record<string, Codec<any>>;
export type StructOf<M extends CodecMap> = { [K in keyof M]: M[K] extends Codec<infer T> ? T : never };

/** A struct: fields in declaration order (object key order), no extra framing. */
export function struct<M extends CodecMap>(fields: M): Codec<StructOf<M>> {
  const entries = Object.entries(fields);
  return {
    enc: (w, v) => {
      for (const [k, c] of entries) c.enc(w, (v as any)[k]);
    },
    dec: (r) => {
      const out: any = {};
      for (const [k, c] of entries) out[k] = c.dec(r);
      return out;
    },
    min: entries.reduce((s, [, c]) => s + c.min, 0),
  };
}

/** Encode a value with a codec into a fresh Buffer (tests, small messages). */
export function encode<T>(c: Codec<T>, v: T): Buffer {
  const w = new XdrWriter(64);
  c.enc(w, v);
  return Buffer.from(w.view());
}

/** Decode a whole buffer. Trailing bytes are tolerated, as libvirt does (libvirt-quirks trailing-bytes-accepted), unless `strict`. */
export function decode<T>(c: Codec<T>, buf: Buffer, strict = false): T {
  const r = new XdrReader(buf);
  const v = c.dec(r);
  if (strict && r.remaining !== 0) throw new XdrError(`${r.remaining} trailing bytes`);
  return v;
}
