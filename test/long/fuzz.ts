/**
 * Frame and XDR fuzzing of sparsevirtd.
 *
 * The corpus is the client side of every libvirt 9.0 capture in test/fixtures/libvirt-9.0 (paths
 * rewritten into a sandbox) plus one well-formed CALL of every procedure sparsevirtd knows. Each
 * connection sends a pipelined batch of those frames, about half of them mutated: header fields
 * (prog, vers, proc, type, serial, status), the length word (consistent, lying, or out of range),
 * XDR fields found by decoding the frame with a tracing reader (string and opaque sizes, array
 * counts, optional discriminants, ints/flags, hypers such as offsets, lengths and capacities,
 * UUIDs, string contents such as `..`, `/`, NUL), stream packets (hole lengths and flags, data
 * turned into holes and back), raw bytes (flips, truncation, extension, random payloads), and the
 * sequence (dropped, duplicated and injected frames, a second CALL on a stream's serial). A small
 * share of connections send nothing but random bytes.
 *
 * The oracle: the fuzzer models the daemon's framing (length word in [28, 33554436]) byte by
 * byte. A batch whose framing stays intact ends with a sentinel CALL that must be answered; a
 * batch that breaks framing must get its connection dropped, and only that one. Meanwhile the
 * daemon must not exit, must not log an error or a stray rejection, and its memory is measured.
 * Afterwards a normal `virsh vol-download --sparse` must be served correctly.
 *
 * Run (long form): `node dist/test/long/fuzz.js [--frames N] [--connections C] [--seed S] [--client-runs K] [--json]`
 * (N counts mutated frames, default 1,000,000; then K client runs against hostile servers,
 * default 1000, 0 to skip). The CI short form is test/reliability-fuzz.test.ts.
 * As root the daemon runs as `nobody`, with RLIMIT_FSIZE, and its pools on a small tmpfs.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Chunk } from '../../src/chunk.js';
import { connect } from '../../src/client/index.js';
import { kPeer } from '../../src/client/connection.js';
import { FRAME_MAX, KEEPALIVE_PROGRAM, MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, buildFrame, type Header, type Message } from '../../src/rpc/message.js';
import { FrameParser } from '../../src/rpc/parser.js';
import { decodeRemoteError, remoteErrorCodec } from '../../src/rpc/structs.js';
import { P, PROCEDURES_BY_NUM, type Procedure } from '../../src/protocol/remote.js';
import { XdrReader, XdrWriter, encode, type Codec } from '../../src/xdr/index.js';
import { extentMap, makeImage, scratchDir, sha256File, type Layout } from '../helpers/images.js';
import { FIXTURES, MiB, chownTree, isRoot, mountTmpfs, spawnDaemon, umount, type ChildDaemon, type MemStatus } from './harness.js';

export const ANCHOR_UUID = 'f2e3f50a-b527-4232-a2ca-999fc53420f8';
export const PROTOPOOL_UUID = '7e7df71c-1001-4f89-9cc2-b950fe1c8c48';
const uuidBytes = (u: string) => Buffer.from(u.replace(/-/g, ''), 'hex');

// ------------------------------------------------------------------ seeded randomness

/** xorshift128+ over two 32-bit halves: fast, seedable, good enough for fuzzing. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;
  constructor(seed: number) {
    this.a = seed | 0 || 0x9e3779b9;
    this.b = 0x243f6a88 ^ seed;
    this.c = 0xb7e15162;
    this.d = 0xdeadbeef ^ (seed * 31);
    for (let i = 0; i < 16; i++) this.u32();
  }
  u32(): number {
    let t = this.d;
    const s = this.a;
    this.d = this.c;
    this.c = this.b;
    this.b = s;
    t ^= t << 11;
    t ^= t >>> 8;
    this.a = (t ^ s ^ (s >>> 19)) >>> 0;
    return this.a;
  }
  /** [0, n) */
  int(n: number): number {
    return n <= 1 ? 0 : Math.floor((this.u32() / 4294967296) * n);
  }
  chance(p: number): boolean {
    return this.u32() / 4294967296 < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i += 4) {
      const v = this.u32();
      b[i] = v & 255;
      if (i + 1 < n) b[i + 1] = (v >>> 8) & 255;
      if (i + 2 < n) b[i + 2] = (v >>> 16) & 255;
      if (i + 3 < n) b[i + 3] = v >>> 24;
    }
    return b;
  }
}

// ------------------------------------------------------------------ XDR tracing

export type MarkKind = 'len' | 'count' | 'u32' | 'i32' | 'u64' | 'i64' | 'fixed' | 'strdata';
export interface Mark {
  pos: number;
  kind: MarkKind;
  /** Bytes of a fixed opaque / string content. */
  n?: number;
}

/** An XdrReader that records where each field it decodes lies, and what it is. */
class TracingReader extends XdrReader {
  readonly marks: Mark[] = [];
  private tag: MarkKind | null = null;
  uint(): number {
    this.marks.push({ pos: this.pos, kind: this.tag ?? 'u32' });
    this.tag = null;
    return super.uint();
  }
  int(): number {
    this.marks.push({ pos: this.pos, kind: 'i32' });
    return super.int();
  }
  hyper(): bigint {
    this.marks.push({ pos: this.pos, kind: 'i64' });
    return super.hyper();
  }
  uhyper(): bigint {
    this.marks.push({ pos: this.pos, kind: 'u64' });
    return super.uhyper();
  }
  fixedOpaque(n: number): Buffer {
    if (this.tag === null) this.marks.push({ pos: this.pos, kind: 'fixed', n });
    return super.fixedOpaque(n);
  }
  string(max: number): string {
    const at = this.pos;
    this.tag = 'len';
    const s = super.string(max);
    this.marks.push({ pos: at + 4, kind: 'strdata', n: this.buf.readUInt32BE(at) });
    return s;
  }
  opaque(max: number): Buffer {
    this.tag = 'len';
    const v = super.opaque(max);
    return v;
  }
  count(max: number, minElemSize?: number): number {
    this.tag = 'count';
    return super.count(max, minElemSize);
  }
}

export function traceFields(codec: Codec<unknown>, payload: Buffer): Mark[] {
  const r = new TracingReader(payload);
  try {
    codec.dec(r);
  } catch {
    // a payload that does not decode: what was traced so far still helps
  }
  return r.marks;
}

// ------------------------------------------------------------------ corpus

export interface Frame {
  h: Header;
  payload: Buffer;
  /** Traced XDR fields of the payload (CALL args, hole records). */
  marks: Mark[];
}

/** A sequence of client frames that belong together (one capture, or one synthesized call). */
export interface Exchange {
  name: string;
  frames: Frame[];
}

const HANDSHAKE_PROCS = new Set([66, 1, 2, 360, 361]);

function parseBin(file: string): Message[] {
  const out: Message[] = [];
  new FrameParser().push(fs.readFileSync(file), (m) => out.push({ ...m, payload: Buffer.from(m.payload) }));
  return out;
}

function mapStrings(v: unknown, f: (s: string) => string): unknown {
  if (typeof v === 'string') return f(v);
  if (Buffer.isBuffer(v) || v === null || typeof v !== 'object') return v;
  if (Array.isArray(v)) return v.map((x) => mapStrings(x, f));
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, mapStrings(x, f)]));
}

function marksOf(h: Header, payload: Buffer): Mark[] {
  if (h.type === MessageType.CALL && (h.prog >>> 0) === REMOTE_PROGRAM) {
    const proc = PROCEDURES_BY_NUM.get(h.proc);
    if (proc) return traceFields(proc.args as Codec<unknown>, payload);
  }
  if (h.type === MessageType.STREAM_HOLE) return [{ pos: 0, kind: 'i64' }, { pos: 8, kind: 'u32' }];
  return [];
}

function toFrame(m: Header & { payload: Buffer }, subst: (s: string) => string): Frame {
  const h: Header = { prog: m.prog, vers: m.vers, proc: m.proc, type: m.type, serial: m.serial, status: m.status };
  let payload = m.payload;
  if (h.type === MessageType.CALL && (h.prog >>> 0) === REMOTE_PROGRAM && payload.length > 0) {
    const proc = PROCEDURES_BY_NUM.get(h.proc);
    if (proc) {
      try {
        const w = new XdrWriter(256);
        proc.args.enc(w, mapStrings(proc.args.dec(new XdrReader(payload)), subst));
        payload = Buffer.from(w.view());
      } catch {
        // a deliberately bad payload of a raw capture: keep it as it is
      }
    }
  }
  return { h, payload, marks: marksOf(h, payload) };
}

/** The client frames of every capture, paths rewritten with `subst`, keepalive and handshake removed. */
export function capturedExchanges(subst: (s: string) => string): Exchange[] {
  const out: Exchange[] = [];
  for (const f of fs.readdirSync(FIXTURES).filter((x) => x.endsWith('.client-to-server.bin')).sort()) {
    const frames = parseBin(path.join(FIXTURES, f))
      .filter((m) => (m.prog >>> 0) !== KEEPALIVE_PROGRAM && !((m.prog >>> 0) === REMOTE_PROGRAM && m.type === MessageType.CALL && HANDSHAKE_PROCS.has(m.proc)))
      .map((m) => toFrame(m, subst));
    if (frames.length > 0) out.push({ name: f.replace('.client-to-server.bin', ''), frames });
  }
  return out;
}

/** The three frames of virsh's handshake (AUTH_LIST, keepalive feature, CONNECT_OPEN). */
export function handshakeFrames(): Frame[] {
  const call = (proc: Procedure<any, any>, args: unknown, serial: number): Frame => {
    const h: Header = { prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: proc.num, type: MessageType.CALL, serial, status: Status.OK };
    const payload = encode(proc.args as Codec<unknown>, args);
    return { h, payload, marks: marksOf(h, payload) };
  };
  return [call(P.AUTH_LIST, undefined, 0), call(P.CONNECT_SUPPORTS_FEATURE, { feature: 10 }, 1), call(P.CONNECT_OPEN, { name: 'qemu:///system', flags: 0 }, 2)];
}

/** One well-formed CALL of every procedure, on the sandbox's pools and volumes. */
export function synthesizedExchanges(dirs: { anchor: string; proto: string }): Exchange[] {
  const anchor = { name: 'anchor', uuid: uuidBytes(ANCHOR_UUID) };
  const proto = { name: 'protopool', uuid: uuidBytes(PROTOPOOL_UUID) };
  const vol = (name: string) => ({ pool: 'anchor', name, key: `${dirs.anchor}/${name}` });
  const calls: Array<[Procedure<any, any>, unknown]> = [
    [P.CONNECT_GET_TYPE, undefined], [P.CONNECT_GET_VERSION, undefined], [P.CONNECT_GET_HOSTNAME, undefined],
    [P.CONNECT_GET_URI, undefined], [P.CONNECT_GET_LIB_VERSION, undefined], [P.CONNECT_SUPPORTS_FEATURE, { feature: 14 }],
    [P.CONNECT_LIST_ALL_STORAGE_POOLS, { needResults: 1, flags: 0 }], [P.STORAGE_POOL_LOOKUP_BY_NAME, { name: 'anchor' }],
    [P.STORAGE_POOL_LOOKUP_BY_UUID, { uuid: anchor.uuid }], [P.STORAGE_POOL_LOOKUP_BY_VOLUME, { vol: vol('proto-sparse.img') }],
    [P.STORAGE_POOL_GET_INFO, { pool: anchor }], [P.STORAGE_POOL_GET_XML_DESC, { pool: anchor, flags: 0 }],
    [P.STORAGE_POOL_GET_AUTOSTART, { pool: anchor }], [P.STORAGE_POOL_IS_ACTIVE, { pool: proto }],
    [P.STORAGE_POOL_IS_PERSISTENT, { pool: anchor }], [P.STORAGE_POOL_NUM_OF_VOLUMES, { pool: anchor }],
    [P.STORAGE_POOL_LIST_ALL_VOLUMES, { pool: anchor, needResults: 1, flags: 0 }], [P.STORAGE_POOL_REFRESH, { pool: anchor, flags: 0 }],
    [P.STORAGE_POOL_SET_AUTOSTART, { pool: proto, autostart: 1 }], [P.STORAGE_POOL_BUILD, { pool: proto, flags: 0 }],
    [P.STORAGE_POOL_CREATE, { pool: proto, flags: 1 }], [P.STORAGE_POOL_DESTROY, { pool: proto }],
    [P.STORAGE_POOL_DELETE, { pool: proto, flags: 0 }], [P.STORAGE_POOL_UNDEFINE, { pool: proto }],
    [P.STORAGE_VOL_CREATE_XML, { pool: anchor, xml: "<volume><name>fz.img</name><capacity unit='KiB'>64</capacity><allocation>4096</allocation></volume>", flags: 0 }],
    [P.STORAGE_VOL_LOOKUP_BY_NAME, { pool: anchor, name: 'proto-up2.img' }], [P.STORAGE_VOL_LOOKUP_BY_KEY, { key: `${dirs.anchor}/proto-up2.img` }],
    [P.STORAGE_VOL_LOOKUP_BY_PATH, { path: `${dirs.anchor}/proto-up3.img` }], [P.STORAGE_VOL_GET_INFO, { vol: vol('proto-up3.img') }],
    [P.STORAGE_VOL_GET_INFO_FLAGS, { vol: vol('proto-sparse.img'), flags: 1 }], [P.STORAGE_VOL_GET_XML_DESC, { vol: vol('proto-up2.img'), flags: 0 }],
    [P.STORAGE_VOL_GET_PATH, { vol: vol('fz.img') }], [P.STORAGE_VOL_RESIZE, { vol: vol('fz.img'), capacity: 131072n, flags: 0 }],
    [P.STORAGE_VOL_WIPE, { vol: vol('fz.img'), flags: 0 }], [P.STORAGE_VOL_WIPE_PATTERN, { vol: vol('fz.img'), algorithm: 8, flags: 0 }],
    [P.STORAGE_VOL_DELETE, { vol: vol('fz.img'), flags: 0 }],
    [P.STORAGE_VOL_DOWNLOAD, { vol: vol('proto-sparse.img'), offset: 0n, length: 0n, flags: 1 }],
    [P.STORAGE_VOL_UPLOAD, { vol: vol('proto-up3.img'), offset: 4096n, length: 0n, flags: 1 }],
  ];
  return calls.map(([proc, args], i) => {
    const h: Header = { prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: proc.num, type: MessageType.CALL, serial: 10 + i, status: Status.OK };
    const payload = encode(proc.args as Codec<unknown>, args);
    const frames: Frame[] = [{ h, payload, marks: marksOf(h, payload) }];
    if (proc === P.STORAGE_VOL_UPLOAD) {
      // a small sparse upload: data, hole, data, finish
      const hole = Buffer.from(new XdrWriter(12).hyper(8192n).uint(0).view());
      const sh = (type: number, status: number): Header => ({ ...h, type, status });
      frames.push({ h: sh(MessageType.STREAM, Status.CONTINUE), payload: Buffer.alloc(5000, 7), marks: [] });
      frames.push({ h: sh(MessageType.STREAM_HOLE, Status.CONTINUE), payload: hole, marks: marksOf(sh(MessageType.STREAM_HOLE, 2), hole) });
      frames.push({ h: sh(MessageType.STREAM, Status.CONTINUE), payload: Buffer.alloc(300, 9), marks: [] });
      frames.push({ h: sh(MessageType.STREAM, Status.OK), payload: Buffer.alloc(0), marks: [] });
    }
    if (proc === P.STORAGE_VOL_DOWNLOAD) frames.push({ h: { ...h, type: MessageType.STREAM, status: Status.OK }, payload: Buffer.alloc(0), marks: [] });
    return { name: `synth-${proc.name}`, frames };
  });
}

// ------------------------------------------------------------------ mutation

const I32 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 0x7f, 0x80, 0xff, 0x100, 0xfff, 0x1000, 0xffff, 0x10000, 0x3ffe8, 0x3ffff, 0x40000,
  0x3fffff, 0x400000, 0x400001, 0x1000000, 0x1ffffe4, 0x2000000, 0x2000001, 0x7ffffffe, 0x7fffffff, 0x80000000, 0x80000001, 0xfffffffe, 0xffffffff];
const U64: bigint[] = [0n, 1n, 2n, 511n, 4095n, 4096n, 4097n, 262120n, 1n << 20n, 4194303n, 4194304n, 4194305n, 1n << 31n, (1n << 32n) - 1n, 1n << 32n,
  (1n << 53n) - 1n, 1n << 53n, (1n << 53n) + 1n, 1n << 62n, (1n << 63n) - 1n, 1n << 63n, (1n << 64n) - 1n, (1n << 64n) - 4096n];
const NASTY_STRINGS = ['', '.', '..', '/', '../../../etc/passwd', 'a/b', 'a\u0000b', '\u0000', 'x'.repeat(300), '%s%n%x', '\uffff\ud800', 'proto-sparse.img/..',
  '<volume><name>', "<pool type='dir'><name>p</name><target><path>/</path></target></pool>", 'default', 'anchor', '/proc/self/mem'];
const PROGS = [REMOTE_PROGRAM, REMOTE_PROGRAM, KEEPALIVE_PROGRAM, 0x20008087, 0, 0xffffffff, 0x4c585243 /* lxc */, 0x20008087];
const PROCS = [...PROCEDURES_BY_NUM.keys(), 0, -1, 5, 61, 65, 92, 101, 206, 207, 210, 211, 399, 0x7fffffff, -0x80000000];

/** A frame to send: header, payload, and optionally a declared length that differs from the real one. */
export interface OutFrame {
  h: Header;
  payload: Buffer;
  declaredLength?: number;
  /** What was done to it, for statistics and reports. */
  how: string[];
}

export function serialize(f: OutFrame): Buffer {
  const buf = buildFrame({
    prog: f.h.prog >>> 0, vers: f.h.vers >>> 0, proc: f.h.proc | 0, type: f.h.type | 0, serial: f.h.serial >>> 0, status: f.h.status | 0,
  }, f.payload);
  if (f.declaredLength !== undefined) buf.writeUInt32BE(f.declaredLength >>> 0, 0);
  return buf;
}

function interesting32(rng: Rng, around?: number): number {
  if (around !== undefined && rng.chance(0.3)) return (around + rng.int(9) - 4) >>> 0;
  return rng.chance(0.85) ? rng.pick(I32) : rng.u32();
}

function interesting64(rng: Rng): bigint {
  if (rng.chance(0.8)) return rng.pick(U64);
  return (BigInt(rng.u32()) << 32n) | BigInt(rng.u32());
}

function withWord(payload: Buffer, pos: number, v: number): Buffer {
  if (pos + 4 > payload.length) return payload;
  const b = Buffer.from(payload);
  b.writeUInt32BE(v >>> 0, pos);
  return b;
}

function withHyper(payload: Buffer, pos: number, v: bigint): Buffer {
  if (pos + 8 > payload.length) return payload;
  const b = Buffer.from(payload);
  b.writeBigUInt64BE(BigInt.asUintN(64, v), pos);
  return b;
}

/** Replace the string whose content starts at `mark.pos` by `s` (length word and padding fixed). */
function withString(payload: Buffer, mark: Mark, s: string): Buffer {
  const n = mark.n ?? 0;
  const start = mark.pos - 4;
  const end = mark.pos + n + ((4 - (n & 3)) & 3);
  if (start < 0 || end > payload.length) return payload;
  const body = Buffer.from(s, 'utf8');
  const pad = Buffer.alloc((4 - (body.length & 3)) & 3);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(body.length);
  return Buffer.concat([payload.subarray(0, start), len, body, pad, payload.subarray(end)]);
}

type Mutator = (f: OutFrame, src: Frame, rng: Rng) => void;

const MUTATORS: Array<[string, number, Mutator]> = [
  ['prog', 3, (f, _s, r) => { f.h.prog = r.pick(PROGS); }],
  ['vers', 2, (f, _s, r) => { f.h.vers = r.pick([0, 2, 0xffffffff, r.u32()]); }],
  ['proc', 5, (f, _s, r) => { f.h.proc = r.chance(0.7) ? r.pick(PROCS) : r.u32() | 0; }],
  ['type', 6, (f, _s, r) => { f.h.type = r.chance(0.85) ? r.int(8) : r.u32() | 0; }],
  ['serial', 5, (f, _s, r) => { f.h.serial = r.chance(0.5) ? (f.h.serial + r.int(5) - 2) >>> 0 : r.pick([0, 1, 0xffffffff, r.u32()]); }],
  ['status', 5, (f, _s, r) => { f.h.status = r.chance(0.85) ? r.int(4) : r.u32() | 0; }],
  ['xdr-len', 8, (f, s, r) => mutateMark(f, s, r, ['len'])],
  ['xdr-count', 4, (f, s, r) => mutateMark(f, s, r, ['count'])],
  ['xdr-int', 6, (f, s, r) => mutateMark(f, s, r, ['u32', 'i32'])],
  ['xdr-hyper', 6, (f, s, r) => mutateMark(f, s, r, ['u64', 'i64'])],
  ['xdr-uuid', 2, (f, s, r) => mutateMark(f, s, r, ['fixed'])],
  ['xdr-string', 6, (f, s, r) => mutateMark(f, s, r, ['strdata'])],
  ['bitflip', 4, (f, _s, r) => {
    if (f.payload.length === 0) return;
    f.payload = Buffer.from(f.payload);
    for (let i = 1 + r.int(3); i > 0; i--) {
      const at = r.int(f.payload.length);
      f.payload[at]! ^= 1 << r.int(8);
    }
  }],
  ['word', 4, (f, _s, r) => {
    if (f.payload.length < 4) return;
    f.payload = withWord(f.payload, r.int(f.payload.length >> 2) << 2, interesting32(r, f.payload.length));
  }],
  ['truncate', 4, (f, _s, r) => { f.payload = f.payload.subarray(0, r.int(f.payload.length + 1)); }],
  ['extend', 3, (f, _s, r) => { f.payload = Buffer.concat([f.payload, r.bytes(r.pick([1, 3, 4, 8, 100, 4096, r.int(70000)]))]); }],
  ['empty', 2, (f) => { f.payload = Buffer.alloc(0); }],
  ['random-payload', 2, (f, _s, r) => { f.payload = r.bytes(r.int(600)); }],
  ['hole', 6, (f, _s, r) => {
    // turn the frame into a stream hole, or mutate the hole it is
    f.h.type = MessageType.STREAM_HOLE;
    if (r.chance(0.85)) f.h.status = Status.CONTINUE;
    const w = new XdrWriter(12);
    w.uhyper(BigInt.asUintN(64, r.chance(0.6) ? interesting64(r) : BigInt(1 + r.int(1 << 22))));
    w.uint(r.chance(0.7) ? 0 : interesting32(r));
    f.payload = Buffer.from(w.view());
    if (r.chance(0.1)) f.payload = f.payload.subarray(0, r.int(12));
    if (r.chance(0.05)) f.payload = Buffer.concat([f.payload, r.bytes(4)]);
  }],
  ['hole-to-data', 2, (f, _s, r) => {
    if (f.h.type === MessageType.STREAM_HOLE) f.h.type = MessageType.STREAM;
    else f.h.type = r.pick([MessageType.STREAM, MessageType.STREAM_HOLE]);
  }],
  ['len-lie', 0.25, (f, _s, r) => {
    const real = 28 + f.payload.length;
    const delta = r.chance(0.5) ? 1 + r.int(16) : 1 + r.int(70000);
    f.declaredLength = Math.max(28, r.chance(0.5) ? real - delta : real + delta);
  }],
  ['len-break', 0.08, (f, _s, r) => { f.declaredLength = r.pick([0, 1, 27, FRAME_MAX + 1, 0xffffffff, 0x80000000, 0x40000000 + r.int(1 << 20)]); }],
];

const TOTAL_WEIGHT = MUTATORS.reduce((n, [, w]) => n + w, 0);

function mutateMark(f: OutFrame, src: Frame, rng: Rng, kinds: MarkKind[]): void {
  const marks = src.marks.filter((m) => kinds.includes(m.kind));
  if (marks.length === 0) {
    // no such field in this frame: hit a random aligned word instead
    if (f.payload.length >= 4) f.payload = withWord(f.payload, rng.int(f.payload.length >> 2) << 2, interesting32(rng));
    return;
  }
  const m = rng.pick(marks);
  switch (m.kind) {
    case 'len':
    case 'count':
      f.payload = withWord(f.payload, m.pos, interesting32(rng, f.payload.length - m.pos - 4));
      return;
    case 'u32':
    case 'i32':
      f.payload = withWord(f.payload, m.pos, interesting32(rng));
      return;
    case 'u64':
    case 'i64':
      f.payload = withHyper(f.payload, m.pos, interesting64(rng));
      return;
    case 'fixed': {
      if (m.pos + (m.n ?? 0) > f.payload.length) return;
      f.payload = Buffer.from(f.payload);
      rng.bytes(m.n ?? 0).copy(f.payload, m.pos);
      return;
    }
    case 'strdata': {
      const pick = rng.int(4);
      let s: string;
      if (pick === 0) s = rng.pick(NASTY_STRINGS);
      else {
        const old = f.payload.toString('latin1', m.pos, m.pos + (m.n ?? 0));
        if (pick === 1) s = old + rng.pick(NASTY_STRINGS);
        else if (pick === 2) s = rng.pick(NASTY_STRINGS) + old.slice(rng.int(old.length + 1));
        else s = old.slice(0, rng.int(old.length + 1));
      }
      f.payload = withString(f.payload, m, s);
      return;
    }
  }
}

/** A random frame: random header fields (mostly plausible) and a random payload. */
export function randomFrame(rng: Rng): OutFrame {
  return {
    h: {
      prog: rng.pick(PROGS), vers: rng.chance(0.8) ? 1 : rng.u32(), proc: rng.chance(0.8) ? rng.pick(PROCS) : rng.u32() | 0,
      type: rng.chance(0.9) ? rng.int(8) : rng.u32() | 0, serial: rng.u32(), status: rng.chance(0.9) ? rng.int(4) : rng.u32() | 0,
    },
    payload: rng.bytes(rng.chance(0.5) ? rng.int(64) : rng.int(2048)),
    how: ['random-frame'],
  };
}

/**
 * The frames to send for one corpus frame: usually itself (mutated with probability `p`), or
 * nothing (dropped), or it twice, or it plus an injected random or stream frame.
 */
export function mutateFrame(src: Frame, rng: Rng, p: number, streamSerial: number | null): OutFrame[] {
  const f: OutFrame = { h: { ...src.h }, payload: src.payload, how: [] };
  if (!rng.chance(p)) return [f];
  const seq = rng.u32() % 100;
  if (seq < 3) return []; // dropped from the sequence
  const n = rng.chance(0.75) ? 1 : 2 + rng.int(2);
  for (let i = 0; i < n; i++) {
    let x = rng.u32() / 4294967296 * TOTAL_WEIGHT;
    for (const [name, w, fn] of MUTATORS) {
      x -= w;
      if (x < 0) {
        fn(f, src, rng);
        f.how.push(name);
        break;
      }
    }
  }
  const out = [f];
  if (seq < 6) out.push({ h: { ...f.h }, payload: f.payload, declaredLength: f.declaredLength, how: ['dup'] });
  else if (seq < 9) out.push(randomFrame(rng));
  else if (seq < 12) {
    // a stream packet for this run's stream serial (maybe none open) or another serial
    const g = randomFrame(rng);
    g.h.prog = REMOTE_PROGRAM;
    g.h.vers = REMOTE_VERSION;
    g.h.proc = rng.pick([208, 209]);
    g.h.type = rng.pick([MessageType.STREAM, MessageType.STREAM_HOLE]);
    g.h.serial = streamSerial !== null && rng.chance(0.7) ? streamSerial : rng.u32();
    g.how = ['inject-stream'];
    out.push(g);
  }
  return out;
}

// ------------------------------------------------------------------ framing model

/** The daemon's framing, byte by byte: where frames start and whether a length word is refused. */
export class FramingModel {
  private need = 0;
  private lenHave = 0;
  private lenBuf = Buffer.alloc(4);
  broken = false;
  /** Frames the daemon will have seen so far (complete ones). */
  frames = 0;

  push(b: Buffer): boolean {
    if (this.broken) return false;
    let i = 0;
    while (i < b.length) {
      if (this.need > 0) {
        const n = Math.min(this.need, b.length - i);
        this.need -= n;
        i += n;
        if (this.need === 0) this.frames++;
        continue;
      }
      this.lenBuf[this.lenHave++] = b[i++]!;
      if (this.lenHave === 4) {
        this.lenHave = 0;
        const len = this.lenBuf.readUInt32BE(0);
        if (len < 28 || len > FRAME_MAX) {
          this.broken = true;
          return false;
        }
        this.need = len - 4;
      }
    }
    return true;
  }

  /** Bytes still needed to complete the frame in progress; -1 in the middle of a length word. */
  get missing(): number {
    if (this.lenHave > 0) return -1;
    return this.need;
  }
}

// ------------------------------------------------------------------ a fuzzing connection

export class FuzzConn {
  readonly sock: net.Socket;
  private readonly parser = new FrameParser();
  closed = false;
  readonly closedP: Promise<void>;
  replies = 0;
  streamErrors = 0;
  bytesIn = 0;
  /** The daemon sent something our parser refuses (a daemon bug). */
  garbage: string | null = null;
  private readonly replyWaiters = new Map<number, (m: Message | null) => void>();
  private readonly endWaiters = new Map<number, () => void>();
  private readonly onReplyHook: ((m: Message) => void) | null;

  private constructor(sock: net.Socket, onReply: ((m: Message) => void) | null) {
    this.sock = sock;
    this.onReplyHook = onReply;
    this.closedP = new Promise((resolve) => sock.once('close', () => {
      this.closed = true;
      for (const w of this.replyWaiters.values()) w(null);
      this.replyWaiters.clear();
      for (const w of this.endWaiters.values()) w();
      this.endWaiters.clear();
      resolve();
    }));
    sock.on('error', () => undefined);
    sock.on('data', (b: Buffer) => {
      this.bytesIn += b.length;
      if (this.garbage) return;
      try {
        this.parser.push(b, (m) => this.onMessage(m));
      } catch (err) {
        this.garbage = (err as Error).message;
      }
    });
  }

  static open(socketPath: string, onReply: ((m: Message) => void) | null = null): Promise<FuzzConn> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ path: socketPath });
      sock.once('connect', () => resolve(new FuzzConn(sock, onReply)));
      sock.once('error', reject);
    });
  }

  private onMessage(m: Message): void {
    if ((m.prog >>> 0) === KEEPALIVE_PROGRAM) {
      if (m.proc === 1) this.sock.write(buildFrame({ prog: KEEPALIVE_PROGRAM, vers: 1, proc: 2, type: MessageType.MESSAGE, serial: 0, status: Status.OK }));
      return;
    }
    if (m.type === MessageType.REPLY) {
      this.replies++;
      this.onReplyHook?.(m);
      const w = this.replyWaiters.get(m.serial);
      if (w) {
        this.replyWaiters.delete(m.serial);
        w({ ...m, payload: Buffer.from(m.payload) });
      }
      return;
    }
    if (m.type === MessageType.STREAM && m.status !== Status.CONTINUE) {
      if (m.status === Status.ERROR) this.streamErrors++;
    }
    if (m.type === MessageType.STREAM && (m.status !== Status.CONTINUE || m.payload.length === 0)) {
      const w = this.endWaiters.get(m.serial);
      if (w) {
        this.endWaiters.delete(m.serial);
        w();
      }
    }
  }

  /** Write; resolves when the socket took it (or it closed). */
  write(b: Buffer): Promise<void> {
    if (this.closed) return Promise.resolve();
    if (this.sock.write(b)) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        this.sock.off('drain', done);
        resolve();
      };
      this.sock.on('drain', done);
      void this.closedP.then(done);
    });
  }

  /** The REPLY with `serial`, or null on close or after `timeoutMs`. */
  waitReply(serial: number, timeoutMs: number): Promise<Message | null> {
    if (this.closed) return Promise.resolve(null);
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.replyWaiters.delete(serial);
        resolve(null);
      }, timeoutMs);
      this.replyWaiters.set(serial, (m) => {
        clearTimeout(t);
        resolve(m);
      });
    });
  }

  /** The end (EOF, OK or ERROR) of the stream on `serial`, or after `timeoutMs`. */
  waitStreamEnd(serial: number, timeoutMs: number): Promise<void> {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.endWaiters.delete(serial);
        resolve();
      }, timeoutMs);
      this.endWaiters.set(serial, () => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  /** A plain call (setup and maintenance). */
  async call<A>(proc: { num: number; args: Codec<A> }, args: A, serial: number, timeoutMs = 5000): Promise<Message | null> {
    const p = this.waitReply(serial, timeoutMs);
    await this.write(buildFrame({ prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: proc.num, type: MessageType.CALL, serial, status: Status.OK }, encode(proc.args, args)));
    return p;
  }

  close(): void {
    this.sock.destroy();
  }
}

// ------------------------------------------------------------------ the campaign

export interface FuzzStats {
  /** Frames written (mutated or not), mutated ones, and random-frame injections included. */
  frames: number;
  mutated: number;
  connections: number;
  junkConnections: number;
  junkBytes: number;
  /** Batches whose framing stayed intact and whose sentinel was answered. */
  sentinelOk: number;
  /** Batches that broke framing and were dropped, as they must be. */
  droppedAsExpected: number;
  /** Batches that ended inside a frame too long to complete cheaply (closed by us). */
  abandoned: number;
  /** Anomalies: an intact connection dropped, a sentinel never answered, a broken one kept open. */
  unexpectedDrops: number;
  stalls: number;
  notDropped: number;
  daemonGarbage: number;
  replies: number;
  streamErrors: number;
  bytesOut: number;
  bytesIn: number;
  ms: number;
  byMutation: Record<string, number>;
  samples: string[];
}

export interface CampaignOptions {
  socket: string;
  /** Stop once this many mutated frames were sent. */
  mutatedFrames: number;
  connections: number;
  seed: number;
  /** Frames per batch (one connection each): about this many. */
  batchFrames?: number;
  /** Probability that a corpus frame is mutated. */
  mutationRate?: number;
  sentinelTimeoutMs?: number;
  /** Share of connections that send only random bytes. */
  junkShare?: number;
  corpus: Exchange[];
  /** Called every `maintainEvery` batches (restore pools/volumes the fuzz destroyed). */
  maintain?: () => Promise<void>;
  maintainEvery?: number;
  onProgress?: (s: FuzzStats) => void;
  /** Stop early when this returns true (e.g. the daemon died). */
  abort?: () => boolean;
}

export async function runCampaign(o: CampaignOptions): Promise<FuzzStats> {
  const stats: FuzzStats = {
    frames: 0, mutated: 0, connections: 0, junkConnections: 0, junkBytes: 0, sentinelOk: 0, droppedAsExpected: 0, abandoned: 0,
    unexpectedDrops: 0, stalls: 0, notDropped: 0, daemonGarbage: 0, replies: 0, streamErrors: 0, bytesOut: 0, bytesIn: 0, ms: 0,
    byMutation: {}, samples: [],
  };
  const started = Date.now();
  const hs = handshakeFrames();
  let batchNo = 0;
  let lastMaintain = 0;
  let maintaining: Promise<void> | null = null;
  const note = (s: string) => {
    if (stats.samples.length < 50) stats.samples.push(s);
  };

  const worker = async (): Promise<void> => {
    while (stats.mutated < o.mutatedFrames && !o.abort?.()) {
      const my = ++batchNo;
      const rng = new Rng((o.seed * 1000003 + my) | 0);
      if (o.maintain && my - lastMaintain >= (o.maintainEvery ?? 200)) {
        lastMaintain = my;
        maintaining = o.maintain().catch(() => undefined).finally(() => {
          maintaining = null;
        });
      }
      if (maintaining) await maintaining;
      if (rng.chance(o.junkShare ?? 0.03)) await junkBatch(rng);
      else await batch(rng, my);
      o.onProgress?.(stats);
    }
  };

  async function junkBatch(rng: Rng): Promise<void> {
    let c: FuzzConn;
    try {
      c = await FuzzConn.open(o.socket);
    } catch (err) {
      note(`connect failed: ${(err as Error).message}`);
      await new Promise((r) => setTimeout(r, 50));
      return;
    }
    stats.junkConnections++;
    const model = new FramingModel();
    // random bytes; sometimes behind a plausible length word so that random frames get parsed
    for (let i = 0; i < 20 && !model.broken; i++) {
      let b: Buffer;
      if (rng.chance(0.5)) {
        const n = rng.int(256);
        b = Buffer.concat([Buffer.alloc(4), rng.bytes(24 + n)]);
        b.writeUInt32BE(28 + n, 0);
      } else b = rng.bytes(1 + rng.int(300));
      model.push(b);
      stats.junkBytes += b.length;
      await c.write(b);
    }
    if (model.broken) {
      await Promise.race([c.closedP, new Promise((r) => setTimeout(r, 3000))]);
      if (!c.closed) {
        stats.notDropped++;
        note('junk: framing broken but the connection stayed open');
      }
    }
    stats.bytesIn += c.bytesIn;
    c.close();
  }

  async function batch(rng: Rng, my: number): Promise<void> {
    let c: FuzzConn;
    try {
      c = await FuzzConn.open(o.socket);
    } catch (err) {
      note(`connect failed: ${(err as Error).message}`);
      await new Promise((r) => setTimeout(r, 50));
      return;
    }
    stats.connections++;
    const model = new FramingModel();
    const p = o.mutationRate ?? 0.55;
    const target = o.batchFrames ?? 400;
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    let sent = 0;
    const log: string[] = [];
    const flush = async () => {
      if (pending.length === 0) return;
      const b = pending.length === 1 ? pending[0]! : Buffer.concat(pending);
      pending = [];
      pendingBytes = 0;
      stats.bytesOut += b.length;
      await c.write(b);
    };
    /** Queue one frame; false once framing is broken (the frame was still queued: it breaks it). */
    const queue = (f: OutFrame): boolean => {
      const b = serialize(f);
      const ok = model.push(b);
      pending.push(b);
      pendingBytes += b.length;
      sent++;
      stats.frames++;
      if (f.how.length > 0) {
        stats.mutated++;
        for (const h of f.how) stats.byMutation[h] = (stats.byMutation[h] ?? 0) + 1;
        if (log.length < 400) log.push(`${f.h.proc}/${f.h.type}/${f.h.serial >>> 0}/${f.h.status}:${f.how.join('+')}`);
      }
      return ok;
    };

    let ok = true;
    // handshake, rarely mutated
    for (const f of hs) {
      for (const out of mutateFrame(f, rng, 0.05, null)) ok = ok && queue(out);
      if (!ok) break;
    }
    let serialBase = 1000 + rng.int(1000);
    while (ok && sent < target) {
      if (rng.chance(0.03)) {
        ok = queue(randomFrame(rng));
        continue;
      }
      const s = rng.pick(o.corpus);
      const shift = rng.chance(0.9) ? serialBase : 0;
      serialBase += 100;
      let streamSerial: number | null = null;
      for (const src of s.frames) {
        const shifted: Frame = { ...src, h: { ...src.h, serial: (src.h.serial + shift) >>> 0 } };
        const outs = mutateFrame(shifted, rng, p, streamSerial);
        for (const out of outs) {
          if (!(ok = queue(out))) break;
          const opensStream = out.h.type === MessageType.CALL && (out.h.prog >>> 0) === REMOTE_PROGRAM && (out.h.vers >>> 0) === REMOTE_VERSION
            && (out.h.proc === 208 || out.h.proc === 209) && out.h.status === Status.OK;
          if (opensStream) {
            streamSerial = out.h.serial >>> 0;
            if (model.missing === 0 && rng.chance(0.9)) {
              // causal order, as a real client: stream packets only after the REPLY (and a
              // download's finish only after its end)
              const reply = c.waitReply(streamSerial, 400);
              const end = out.h.proc === 209 ? c.waitStreamEnd(streamSerial, 600) : null;
              await flush();
              const r = await reply;
              if (r && r.status === Status.OK && end) await end;
              if (c.closed) break;
            }
            if (rng.chance(0.03)) {
              // a second CALL on the serial of the stream just opened
              if (!(ok = queue({ h: { ...out.h }, payload: out.payload, how: ['repeat-call'] }))) break;
            }
          }
        }
        if (!ok || c.closed) break;
        if (pendingBytes > 256 * 1024) await flush();
      }
      if (c.closed) break;
    }
    const describe = () => `batch ${my} (seed ${o.seed}): ${log.slice(-12).join(' ')}`;
    if (!ok) {
      await flush();
      await Promise.race([c.closedP, new Promise((r) => setTimeout(r, 3000))]);
      if (c.closed) stats.droppedAsExpected++;
      else {
        stats.notDropped++;
        note(`framing broken but not dropped: ${describe()}`);
      }
    } else if (c.closed) {
      stats.unexpectedDrops++;
      note(`dropped while framing was intact: ${describe()}`);
    } else {
      let missing = model.missing;
      if (missing > 0 && missing <= MiB) {
        pending.push(Buffer.alloc(missing));
        model.push(Buffer.alloc(missing));
        missing = 0;
      }
      if (missing !== 0) {
        await flush();
        stats.abandoned++;
      } else {
        const serial = (0x7e000000 + rng.int(0x1000000)) >>> 0;
        const sentinel = buildFrame({ prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: P.CONNECT_GET_LIB_VERSION.num, type: MessageType.CALL, serial, status: Status.OK });
        pending.push(sentinel);
        const reply = c.waitReply(serial, o.sentinelTimeoutMs ?? 10000);
        await flush();
        const r = await reply;
        if (r) stats.sentinelOk++;
        else if (c.closed) {
          stats.unexpectedDrops++;
          note(`dropped while framing was intact: ${describe()}`);
        } else {
          stats.stalls++;
          note(`sentinel not answered within ${o.sentinelTimeoutMs ?? 10000} ms: ${describe()}`);
        }
      }
    }
    if (c.garbage) {
      stats.daemonGarbage++;
      note(`the daemon sent an unparsable frame: ${c.garbage}`);
    }
    stats.replies += c.replies;
    stats.streamErrors += c.streamErrors;
    stats.bytesIn += c.bytesIn;
    c.close();
  }

  await Promise.all(Array.from({ length: o.connections }, () => worker()));
  stats.ms = Date.now() - started;
  return stats;
}

// ------------------------------------------------------------------ sandbox: daemon, pools, volumes

/** The layout of the capture source image (4 MiB, 424 KiB data). */
export const CAPTURE_LAYOUT: Layout = [
  { kind: 'data', length: 4096 }, { kind: 'hole', length: 61440 }, { kind: 'data', length: 16384 }, { kind: 'hole', length: 966656 },
  { kind: 'data', length: 65536 }, { kind: 'hole', length: 458752 }, { kind: 'zero', length: 8192 }, { kind: 'hole', length: 524288 },
  { kind: 'data', length: 12288 }, { kind: 'hole', length: 1028096 }, { kind: 'data', length: 327680 }, { kind: 'hole', length: 720896 },
];

export interface Sandbox {
  dir: string;
  daemon: ChildDaemon;
  anchorDir: string;
  protoDir: string;
  corpus: Exchange[];
  /** Root of the small tmpfs holding the pools (null when not root). */
  mount: string | null;
  restore(): Promise<void>;
  close(): Promise<void>;
}

/**
 * A daemon to fuzz, as a child process: as root it runs as `nobody`, with every file it writes
 * capped at `fileSizeLimit` and its pools on a `tmpfsSize` tmpfs, so that nothing a mutated
 * frame asks for (resize, allocate, wipe, pools anywhere) can reach beyond the sandbox.
 */
export async function openSandbox(opts: { tmpfsSize?: string; fileSizeLimit?: number; base?: string } = {}): Promise<Sandbox> {
  const dir = await scratchDir(opts.base ?? '/tmp', 'svfuzz-');
  let mount: string | null = null;
  let poolsRoot = path.join(dir, 'pools');
  if (isRoot()) {
    mount = path.join(dir, 'fs');
    mountTmpfs(mount, opts.tmpfsSize ?? '64m', '0755');
    poolsRoot = mount;
  } else {
    await fsp.mkdir(poolsRoot);
  }
  const anchorDir = path.join(poolsRoot, 'vpools');
  const protoDir = path.join(poolsRoot, 'pooldir');
  await fsp.mkdir(anchorDir);
  const subst = (s: string) => s.replaceAll('/srv/vpools', anchorDir).replaceAll('/var/lib/sv-capture/pooldir', protoDir).replaceAll('/var/lib/sv-capture', poolsRoot);
  const corpus = [...capturedExchanges(subst), ...synthesizedExchanges({ anchor: anchorDir, proto: protoDir })];
  if (mount) chownTree(mount, 65534, 65534);
  let daemon: ChildDaemon;
  try {
    daemon = await spawnDaemon({ dir, asNobody: true, fileSizeLimit: opts.fileSizeLimit ?? 16 * MiB, logLevel: 'warn' });
  } catch (err) {
    if (mount) umount(mount);
    await fsp.rm(dir, { recursive: true, force: true });
    throw err;
  }
  const restore = async () => {
    // volumes the captures expect, restored when the fuzz deleted, resized or wiped them
    const want: Array<[string, () => Promise<unknown>, number]> = [
      ['proto-sparse.img', () => makeImage(path.join(anchorDir, 'proto-sparse.img'), CAPTURE_LAYOUT, 5), 4 * MiB],
      ['proto-up2.img', () => makeImage(path.join(anchorDir, 'proto-up2.img'), [{ kind: 'hole', length: MiB }]), MiB],
      ['proto-up3.img', () => makeImage(path.join(anchorDir, 'proto-up3.img'), [{ kind: 'hole', length: 4 * MiB }]), 4 * MiB],
    ];
    for (const [name, make, size] of want) {
      const st = await fsp.lstat(path.join(anchorDir, name)).catch(() => null);
      if (!st?.isFile() || st.size !== size) {
        await fsp.rm(path.join(anchorDir, name), { recursive: true, force: true }).catch(() => undefined);
        await make().catch(() => undefined);
        if (isRoot()) await fsp.chown(path.join(anchorDir, name), 65534, 65534).catch(() => undefined);
      }
    }
    const c = await FuzzConn.open(daemon.socket);
    try {
      let s = 1;
      const open = c.waitReply(2, 5000);
      for (const f of handshakeFrames()) await c.write(serialize({ ...f, how: [] }));
      await open;
      for (const [name, uuid, target] of [['anchor', ANCHOR_UUID, anchorDir], ['protopool', PROTOPOOL_UUID, protoDir]] as const) {
        const xml = `<pool type='dir'><name>${name}</name><uuid>${uuid}</uuid><target><path>${target}</path></target></pool>`;
        await c.call(P.STORAGE_POOL_DEFINE_XML, { xml, flags: 0 }, 100 + s++);
      }
      await c.call(P.STORAGE_POOL_CREATE, { pool: { name: 'anchor', uuid: uuidBytes(ANCHOR_UUID) }, flags: 1 }, 100 + s++);
    } finally {
      c.close();
    }
  };
  await restore();
  return {
    dir, daemon, anchorDir, protoDir, corpus, mount, restore,
    async close() {
      await daemon.stop();
      if (mount) umount(mount);
      await fsp.rm(dir, { recursive: true, force: true });
    },
  };
}

export interface VirshCheck {
  ok: boolean;
  detail: string;
  ms: number;
}

/**
 * A normal `virsh vol-download --sparse` from the daemon: a fresh pool and volume (outside the
 * fuzzed pools), the download compared by SHA-256 and extent map with the source.
 */
export async function virshDownloadCheck(sb: Sandbox, name = 'verify'): Promise<VirshCheck> {
  const t0 = Date.now();
  const poolDir = path.join(sb.dir, name);
  await fsp.mkdir(poolDir, { recursive: true });
  const layout: Layout = [{ kind: 'data', length: 300000 }, { kind: 'hole', length: 2 * MiB }, { kind: 'data', length: 70000 }, { kind: 'hole', length: 1 << 19 }, { kind: 'data', length: 4096 }, { kind: 'hole', length: MiB }];
  const vol = path.join(poolDir, 'v.img');
  await makeImage(vol, layout, 42);
  if (isRoot()) chownTree(poolDir, 65534, 65534);
  const c = await FuzzConn.open(sb.daemon.socket);
  try {
    const opened = c.waitReply(2, 5000);
    for (const f of handshakeFrames()) await c.write(serialize({ ...f, how: [] }));
    const open = await opened;
    if (!open || open.status !== Status.OK) return { ok: false, detail: 'handshake failed', ms: Date.now() - t0 };
    const def = await c.call(P.STORAGE_POOL_DEFINE_XML, { xml: `<pool type='dir'><name>${name}</name><target><path>${poolDir}</path></target></pool>`, flags: 0 }, 10);
    if (!def || def.status !== Status.OK) return { ok: false, detail: `define: ${def ? decodeRemoteError(def.payload).message : 'no reply'}`, ms: Date.now() - t0 };
    const ref = P.STORAGE_POOL_DEFINE_XML.ret.dec(new XdrReader(def.payload)).pool;
    const start = await c.call(P.STORAGE_POOL_CREATE, { pool: ref, flags: 0 }, 11);
    if (!start || start.status !== Status.OK) return { ok: false, detail: `start: ${start ? decodeRemoteError(start.payload).message : 'no reply'}`, ms: Date.now() - t0 };
  } finally {
    c.close();
  }
  const out = path.join(sb.dir, `${name}.out`);
  await fsp.rm(out, { force: true });
  const r = await new Promise<{ code: number; stderr: string }>((resolve) => {
    execFile('virsh', ['-q', '-c', sb.daemon.virshUri, 'vol-download', '--pool', name, 'v.img', out, '--sparse'], { timeout: 60000 }, (err, _o, stderr) => {
      resolve({ code: err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0, stderr: String(stderr) });
    });
  });
  if (r.code !== 0) return { ok: false, detail: `virsh exit ${r.code}: ${r.stderr.trim()}`, ms: Date.now() - t0 };
  const [a, b] = await Promise.all([sha256File(vol), sha256File(out)]);
  if (a !== b) return { ok: false, detail: `sha256 differs: ${a} vs ${b}`, ms: Date.now() - t0 };
  const [ea, eb] = await Promise.all([extentMap(vol), extentMap(out)]);
  if (JSON.stringify(ea) !== JSON.stringify(eb)) return { ok: false, detail: `extent maps differ: ${JSON.stringify(ea)} vs ${JSON.stringify(eb)}`, ms: Date.now() - t0 };
  return { ok: true, detail: `sha256 ${a.slice(0, 16)}…, ${ea.length} extents`, ms: Date.now() - t0 };
}

export function virshAvailable(): Promise<boolean> {
  return new Promise((resolve) => execFile('virsh', ['--version'], (err) => resolve(!err)));
}

export interface FuzzReport {
  seed: number;
  stats: FuzzStats;
  framesPerSecond: number;
  rssBefore: MemStatus;
  rssAfter: MemStatus | null;
  daemonAlive: boolean;
  daemonErrors: string[];
  virsh: VirshCheck | null;
}

/** The whole thing: sandbox, campaign, checks. */
export async function fuzzDaemon(o: {
  mutatedFrames: number; connections?: number; seed?: number; batchFrames?: number; tmpfsSize?: string; virsh?: boolean;
  onProgress?: (s: FuzzStats, mem: MemStatus | null) => void;
}): Promise<FuzzReport> {
  const seed = o.seed ?? (Date.now() & 0x7fffffff);
  const sb = await openSandbox({ tmpfsSize: o.tmpfsSize });
  try {
    await new Promise((r) => setTimeout(r, 200));
    const rssBefore = sb.daemon.mem();
    let lastProgress = 0;
    const stats = await runCampaign({
      socket: sb.daemon.socket,
      mutatedFrames: o.mutatedFrames,
      connections: o.connections ?? 4,
      seed,
      batchFrames: o.batchFrames,
      corpus: sb.corpus,
      maintain: () => sb.restore(),
      maintainEvery: 100,
      abort: () => !sb.daemon.alive(),
      onProgress: (s) => {
        if (o.onProgress && Date.now() - lastProgress > 2000) {
          lastProgress = Date.now();
          o.onProgress(s, sb.daemon.alive() ? sb.daemon.mem() : null);
        }
      },
    });
    const daemonAlive = sb.daemon.alive();
    const rssAfter = daemonAlive ? sb.daemon.mem() : null;
    let virsh: VirshCheck | null = null;
    if (daemonAlive && o.virsh !== false) virsh = await virshDownloadCheck(sb);
    return {
      seed, stats, framesPerSecond: Math.round(stats.frames / (stats.ms / 1000)), rssBefore, rssAfter,
      daemonAlive: sb.daemon.alive(), daemonErrors: sb.daemon.errors().slice(0, 20), virsh,
    };
  } finally {
    await sb.close();
  }
}

// ------------------------------------------------------------------ the client against a hostile server

/** What a hostile server does once it has sent its first mutated frame. */
export type HostileMode = 'continue' | 'silent' | 'close' | 'stop-reading';
const HOSTILE_MODES: HostileMode[] = ['continue', 'silent', 'close', 'stop-reading'];

export interface HostileStats {
  connections: number;
  framesOut: number;
  mutatedOut: number;
  byMode: Record<string, number>;
}

/** The layout a hostile server streams on a download: data, hole, a data run over one packet, hole. */
const HOSTILE_DOWNLOAD: Array<['data' | 'hole', number]> = [['data', 5000], ['hole', 60000], ['data', 262120], ['data', 40000], ['hole', 100000], ['data', 12]];

/**
 * A server that speaks enough of the protocol for a client run (handshake, lookups, info,
 * sparse download and upload) and, from a random frame of each connection on, mutates what it
 * sends; after its first mutated frame it goes on normally, goes silent (no PONG either), closes,
 * or stops reading.
 */
export function startHostileServer(socketPath: string, seed: number, fixedMode?: HostileMode): Promise<{ server: net.Server; stats: HostileStats; close(): Promise<void> }> {
  const stats: HostileStats = { connections: 0, framesOut: 0, mutatedOut: 0, byMode: {} };
  const poolRef = { name: 'hp', uuid: uuidBytes(ANCHOR_UUID) };
  const volRef = { pool: 'hp', name: 'v.img', key: '/hostile/hp/v.img' };
  const sockets = new Set<net.Socket>();
  let n = 0;
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => undefined);
    const rng = new Rng((seed * 7919 + ++n) | 0);
    stats.connections++;
    const mutateFrom = rng.int(16);
    const mode = fixedMode ?? rng.pick(HOSTILE_MODES);
    stats.byMode[mode] = (stats.byMode[mode] ?? 0) + 1;
    let outCount = 0;
    let mutatedYet = false;
    let silent = false;
    const parser = new FrameParser();
    const send = (h: Header, payload: Buffer = Buffer.alloc(0), codec: Codec<unknown> | null = null) => {
      if (silent || sock.destroyed) return;
      const i = outCount++;
      stats.framesOut++;
      let outs: OutFrame[] = [{ h, payload, how: [] }];
      if (i >= mutateFrom && (i === mutateFrom || rng.chance(0.3))) {
        const marks = codec ? traceFields(codec, payload) : h.type === MessageType.STREAM_HOLE ? [{ pos: 0, kind: 'i64' as const }, { pos: 8, kind: 'u32' as const }] : [];
        outs = mutateFrame({ h, payload, marks }, rng, 1, h.type === MessageType.STREAM || h.type === MessageType.STREAM_HOLE ? h.serial : null);
        if (outs.length === 0 || outs.some((o) => o.how.length > 0)) {
          stats.mutatedOut++;
          mutatedYet = true;
        }
      }
      for (const o of outs) sock.write(serialize(o));
      if (mutatedYet) {
        if (mode === 'silent') silent = true;
        else if (mode === 'close') sock.destroy();
        else if (mode === 'stop-reading') {
          silent = true;
          sock.pause();
        }
      }
    };
    const reply = <R>(m: Message, ret: Codec<R>, v: R) => send({ ...headerOf(m), type: MessageType.REPLY, status: Status.OK }, encode(ret, v), ret as Codec<unknown>);
    const download = async (m: Message) => {
      const h: Header = { ...headerOf(m), type: MessageType.STREAM, status: Status.CONTINUE };
      for (const [kind, len] of HOSTILE_DOWNLOAD) {
        if (silent || sock.destroyed) return;
        if (kind === 'data') send(h, rng.bytes(len));
        else send({ ...h, type: MessageType.STREAM_HOLE }, Buffer.from(new XdrWriter(12).hyper(BigInt(len)).uint(0).view()));
        await new Promise((r) => setImmediate(r));
      }
      send(h); // EOF
    };
    sock.on('data', (b: Buffer) => {
      if (silent) return;
      try {
        parser.push(b, (m) => {
          if (silent) return;
          if ((m.prog >>> 0) === KEEPALIVE_PROGRAM) {
            if (m.proc === 1) send({ prog: KEEPALIVE_PROGRAM, vers: 1, proc: 2, type: MessageType.MESSAGE, serial: 0, status: Status.OK });
            return;
          }
          if (m.type === MessageType.STREAM) {
            // the client's finish (upload, or acknowledging a download's EOF) or abort: confirm
            if (m.status === Status.OK || m.status === Status.ERROR) send({ ...headerOf(m), status: Status.OK });
            return;
          }
          if (m.type !== MessageType.CALL) return;
          switch (m.proc) {
            case 66: return reply(m, P.AUTH_LIST.ret, { types: [0] });
            case 60: return reply(m, P.CONNECT_SUPPORTS_FEATURE.ret, { supported: 1 });
            case 1: case 2: case 360: case 361: return reply(m, P.CONNECT_CLOSE.ret, undefined);
            case 157: return reply(m, P.CONNECT_GET_LIB_VERSION.ret, { libVer: 9000000n });
            case 281: return reply(m, P.CONNECT_LIST_ALL_STORAGE_POOLS.ret, { pools: [poolRef, poolRef], ret: 2 });
            case 84: return reply(m, P.STORAGE_POOL_LOOKUP_BY_NAME.ret, { pool: poolRef });
            case 95: return reply(m, P.STORAGE_VOL_LOOKUP_BY_NAME.ret, { vol: volRef });
            case 98: return reply(m, P.STORAGE_VOL_GET_INFO.ret, { type: 0, capacity: 4194304n, allocation: 409600n });
            case 208: return reply(m, P.STORAGE_VOL_UPLOAD.ret, undefined);
            case 209:
              reply(m, P.STORAGE_VOL_DOWNLOAD.ret, undefined);
              void download(m);
              return;
            default: {
              const e = { code: 39, domain: 7, message: `unknown procedure: ${m.proc}`, level: 2, str1: '%s', str2: null, str3: null, int1: -1, int2: -1 };
              send({ ...headerOf(m), type: MessageType.REPLY, status: Status.ERROR }, encode(remoteErrorCodec, e), remoteErrorCodec as Codec<unknown>);
            }
          }
        });
      } catch {
        sock.destroy();
      }
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => resolve({
      server, stats,
      close: () => new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
    }));
  });
}

function headerOf(m: Header): Header {
  return { prog: m.prog, vers: m.vers, proc: m.proc, type: m.type, serial: m.serial, status: m.status };
}

export interface ClientOpRecord {
  op: string;
  mode: string;
  ok: boolean;
  ms: number;
  code?: string;
  error?: string;
}

export interface ClientFuzzStats {
  runs: number;
  ops: number;
  ok: number;
  errorsByCode: Record<string, number>;
  /** Operations that outlived their bound (keepalive window, or the caller's timeout). */
  hangs: ClientOpRecord[];
  /** Errors without a stable `code` (a TypeError, a RangeError…: a bug, not a clear error). */
  unclear: ClientOpRecord[];
  maxMs: Record<string, number>;
  unhandled: string[];
  /** A few errors as reported, for reading. */
  samples: string[];
  server: HostileStats;
  ms: number;
}

/**
 * Runs `runs` client runs (`parallel` at a time) against a hostile server: connect (with a
 * timeout: keepalive only starts after the handshake), then calls, a sparse download and a sparse
 * upload, each bounded by `opTimeoutMs`, on a connection with a short keepalive. Every operation
 * must settle within its bound, and fail, when it fails, with a coded error.
 */
export async function fuzzClient(o: { runs: number; seed: number; dir: string; parallel?: number; opTimeoutMs?: number; keepaliveInterval?: number; keepaliveCount?: number }): Promise<ClientFuzzStats> {
  const servers = await Promise.all(HOSTILE_MODES.map(async (mode, i) => {
    const socket = path.join(o.dir, `hostile-${o.seed}-${mode}.sock`);
    await fsp.rm(socket, { force: true });
    return { mode, socket, srv: await startHostileServer(socket, o.seed + i, mode) };
  }));
  const T = o.opTimeoutMs ?? 1500;
  const kaI = o.keepaliveInterval ?? 0.2;
  const kaC = o.keepaliveCount ?? 2;
  const stats: ClientFuzzStats = {
    runs: 0, ops: 0, ok: 0, errorsByCode: {}, hangs: [], unclear: [], maxMs: {}, unhandled: [], samples: [],
    server: { connections: 0, framesOut: 0, mutatedOut: 0, byMode: {} }, ms: 0,
  };
  const onUnhandled = (reason: unknown) => {
    stats.unhandled.push(String((reason as Error)?.stack ?? reason));
  };
  process.on('unhandledRejection', onUnhandled);
  process.on('uncaughtException', onUnhandled);
  const started = Date.now();
  // an operation that neither the keepalive, nor a close, nor the caller's signal ended by then hangs
  // (Connection.close() bounds its CONNECT_CLOSE by its own 5 s timeout)
  const boundOf = (op: string) => (op === 'close' ? 5000 : T) + 1000;
  const runOp = async (mode: string, op: string, fn: () => Promise<unknown>): Promise<boolean> => {
    const t0 = Date.now();
    let timer: NodeJS.Timeout | undefined;
    const watchdog = new Promise<'hang'>((r) => {
      timer = setTimeout(() => r('hang'), boundOf(op));
    });
    const rec: ClientOpRecord = { op, mode, ok: false, ms: 0 };
    const res = await Promise.race([fn().then(() => 'ok' as const, (e: unknown) => e), watchdog]);
    clearTimeout(timer);
    rec.ms = Date.now() - t0;
    stats.ops++;
    const key = `${mode}:${op}`;
    stats.maxMs[key] = Math.max(stats.maxMs[key] ?? 0, rec.ms);
    if (res === 'ok') {
      rec.ok = true;
      stats.ok++;
      return true;
    }
    if (res === 'hang') {
      stats.hangs.push(rec);
      return false;
    }
    const e = res as { code?: unknown; message?: unknown; name?: unknown };
    rec.code = typeof e?.code === 'string' ? e.code : undefined;
    rec.error = `${String(e?.name)}: ${String(e?.message)}`;
    if (!rec.code || !String(e?.message ?? '') || e instanceof TypeError || e instanceof RangeError) stats.unclear.push(rec);
    else {
      stats.errorsByCode[rec.code] = (stats.errorsByCode[rec.code] ?? 0) + 1;
      if (stats.samples.length < 40) stats.samples.push(`${mode} ${op} ${rec.ms} ms: ${rec.code} ${rec.error}`);
    }
    return false;
  };
  let next = 0;
  const worker = async () => {
    while (next < o.runs) {
      const { mode, socket } = servers[next % servers.length]!;
      next++;
      stats.runs++;
      let conn: Awaited<ReturnType<typeof connect>> | null = null;
      await runOp(mode, 'connect', async () => {
        conn = await connect(`sparsevirt+unix:///system?socket=${socket}`, { keepaliveInterval: kaI, keepaliveCount: kaC, signal: AbortSignal.timeout(T) });
      });
      const c = conn as Awaited<ReturnType<typeof connect>> | null;
      if (!c) continue;
      const ref = { pool: 'hp', name: 'v.img', key: '/hostile/hp/v.img' };
      try {
        const sig = () => AbortSignal.timeout(T);
        await runOp(mode, 'call', () => c.call(P.CONNECT_GET_LIB_VERSION, undefined, sig()));
        await runOp(mode, 'call', () => c.call(P.CONNECT_LIST_ALL_STORAGE_POOLS, { needResults: 1, flags: 0 }, sig()));
        await runOp(mode, 'call', () => c.call(P.STORAGE_POOL_LOOKUP_BY_NAME, { name: 'hp' }, sig()));
        await runOp(mode, 'call', () => c.call(P.STORAGE_VOL_GET_INFO, { vol: ref }, sig()));
        const vol = c.vol(ref);
        await runOp(mode, 'download', async () => {
          const stream = await vol.download({ sparse: true, signal: sig() });
          let total = 0;
          for await (const ch of stream) total += ch.kind === 'data' ? ch.bytes.length : ch.length;
          return total;
        });
        await runOp(mode, 'upload', async () => {
          const stream = await vol.upload({ sparse: true, signal: sig() });
          async function* src(): AsyncGenerator<Chunk> {
            yield { kind: 'data', bytes: Buffer.alloc(300000, 1) };
            yield { kind: 'hole', length: 1 << 20 };
            yield { kind: 'data', bytes: Buffer.alloc(5000, 2) };
          }
          await stream.sendChunks(src());
        });
        await runOp(mode, 'call', () => c.call(P.CONNECT_GET_LIB_VERSION, undefined, sig()));
        await runOp(mode, 'close', () => c.close());
      } finally {
        c[kPeer].destroy(new Error('run over'));
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: o.parallel ?? 8 }, () => worker()));
    await new Promise((r) => setTimeout(r, 100));
  } finally {
    process.off('unhandledRejection', onUnhandled);
    process.off('uncaughtException', onUnhandled);
    for (const { srv, socket } of servers) {
      const st = srv.stats;
      stats.server.connections += st.connections;
      stats.server.framesOut += st.framesOut;
      stats.server.mutatedOut += st.mutatedOut;
      for (const [k, v] of Object.entries(st.byMode)) stats.server.byMode[k] = (stats.server.byMode[k] ?? 0) + v;
      await srv.close();
      await fsp.rm(socket, { force: true });
    }
  }
  stats.ms = Date.now() - started;
  return stats;
}

// ------------------------------------------------------------------ long form

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : def;
}

async function main(): Promise<void> {
  const mutated = arg('frames', 1_000_000);
  const connections = arg('connections', 4);
  const seed = arg('seed', Date.now() & 0x7fffffff);
  const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;
  process.stderr.write(`fuzz: ${mutated} mutated frames, ${connections} connections, seed ${seed}\n`);
  const hasVirsh = await virshAvailable();
  const report = await fuzzDaemon({
    mutatedFrames: mutated, connections, seed, virsh: hasVirsh, tmpfsSize: '128m',
    onProgress: (s, mem) => process.stderr.write(`  ${s.mutated} mutated / ${s.frames} frames, ${Math.round(s.frames / ((Date.now() - t0) / 1000))} frames/s, daemon rss ${mem ? mib(mem.rss) : 'DEAD'}\n`),
  });
  const s = report.stats;
  const lines = [
    `seed                 ${report.seed}`,
    `frames sent          ${s.frames} (${s.mutated} mutated) in ${(s.ms / 1000).toFixed(1)} s: ${report.framesPerSecond} frames/s`,
    `connections          ${s.connections} frame batches + ${s.junkConnections} random-byte connections (${s.junkBytes} bytes)`,
    `outcomes             ${s.sentinelOk} answered after the batch, ${s.droppedAsExpected} dropped on a framing error, ${s.abandoned} abandoned mid-frame`,
    `anomalies            ${s.unexpectedDrops} unexpected drops, ${s.stalls} stalls, ${s.notDropped} broken-but-kept, ${s.daemonGarbage} unparsable replies`,
    `daemon answers       ${s.replies} replies, ${s.streamErrors} stream errors, ${mib(s.bytesIn)} in / ${mib(s.bytesOut)} out`,
    `daemon rss           before ${mib(report.rssBefore.rss)}, after ${report.rssAfter ? mib(report.rssAfter.rss) : 'n/a'}, peak ${report.rssAfter ? mib(report.rssAfter.hwm) : 'n/a'}`,
    `daemon               ${report.daemonAlive ? 'alive' : 'DEAD'}, ${report.daemonErrors.length} error lines`,
    `virsh vol-download   ${report.virsh ? `${report.virsh.ok ? 'ok' : 'FAILED'}: ${report.virsh.detail}` : 'skipped (no virsh)'}`,
    `mutations            ${Object.entries(s.byMutation).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${v}`).join(', ')}`,
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
  for (const x of s.samples.slice(0, 10)) process.stdout.write(`  sample: ${x}\n`);
  for (const x of report.daemonErrors) process.stdout.write(`  daemon: ${x}\n`);
  let bad = !report.daemonAlive || report.daemonErrors.length > 0 || s.unexpectedDrops + s.stalls + s.notDropped + s.daemonGarbage > 0 || (report.virsh !== null && !report.virsh.ok);

  // the client against hostile servers
  const runs = arg('client-runs', 1000);
  let client: ClientFuzzStats | null = null;
  if (runs > 0) {
    const dir = await scratchDir('/tmp', 'svfuzz-client-');
    try {
      process.stderr.write(`fuzz: ${runs} client runs against hostile servers\n`);
      client = await fuzzClient({ runs, seed, dir, opTimeoutMs: 1000, keepaliveInterval: 0.2, keepaliveCount: 2 });
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
    const window = 200 * 3;
    const slowestDead = Math.max(...['silent', 'stop-reading'].flatMap((m) => ['call', 'download', 'upload'].map((o) => client!.maxMs[`${m}:${o}`] ?? 0)));
    process.stdout.write([
      `client runs          ${client.runs} against hostile servers (${client.server.framesOut} frames sent to it, ${client.server.mutatedOut} mutated), ${client.ops} operations in ${(client.ms / 1000).toFixed(1)} s`,
      `client outcomes      ${client.ok} ok; errors ${Object.entries(client.errorsByCode).map(([k, v]) => `${k} ${v}`).join(', ')}`,
      `client anomalies     ${client.hangs.length} hangs, ${client.unclear.length} uncoded errors, ${client.unhandled.length} unhandled rejections/exceptions`,
      `client bounds        a dead server (silent, not reading) ends every wait within ${slowestDead} ms (keepalive window ${window} ms); other waits end by the caller's timeout (1000 ms)`,
    ].join('\n') + '\n');
    for (const x of [...client.hangs, ...client.unclear].slice(0, 10)) process.stdout.write(`  client: ${JSON.stringify(x)}\n`);
    for (const x of client.unhandled.slice(0, 5)) process.stdout.write(`  client unhandled: ${x}\n`);
    bad ||= client.hangs.length + client.unclear.length + client.unhandled.length > 0 || slowestDead > window + 400;
  }
  if (process.argv.includes('--json')) process.stdout.write(`${JSON.stringify({ report, client })}\n`);
  process.exitCode = bad ? 1 : 0;
}

const t0 = Date.now();
// `node --test dist/test/` also runs this file (it lies under a `test` directory): only run when invoked directly.
if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url && !process.env.NODE_TEST_CONTEXT) {
  main().catch((err) => {
    process.stderr.write(`fuzz: ${(err as Error).stack ?? err}\n`);
    process.exit(2);
  });
}

