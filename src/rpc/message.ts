/**
 * libvirt RPC framing: a 4-byte big-endian length word (counting itself), a 24-byte header
 * (prog, vers, proc, type, serial, status) and the payload.
 */
import { LEGACY_PAYLOAD_MAX } from '../chunk.js';

export const LEN_SIZE = 4;
export const HEADER_SIZE = 24;
export const FRAME_OVERHEAD = LEN_SIZE + HEADER_SIZE; // 28
/** VIR_NET_MESSAGE_MAX in libvirt 9.0: the largest (length − 4). */
export const MESSAGE_MAX = 33554432;
export const FRAME_MAX = MESSAGE_MAX + LEN_SIZE; // 33554436
/** Largest frame to send to a peer of unknown version (older libvirt used 16 MiB). */
export const LEGACY_FRAME_MAX = 16777216 + LEN_SIZE;
/** Stream data payload libvirt itself sends; we send the same (`LEGACY_PAYLOAD_MAX` of the base). */
export const STREAM_PAYLOAD_MAX = LEGACY_PAYLOAD_MAX;

export const REMOTE_PROGRAM = 0x20008086;
export const REMOTE_VERSION = 1;
export const KEEPALIVE_PROGRAM = 0x6b656570;
export const KEEPALIVE_VERSION = 1;
export const KEEPALIVE_PING = 1;
export const KEEPALIVE_PONG = 2;

export const MessageType = {
  CALL: 0,
  REPLY: 1,
  MESSAGE: 2,
  STREAM: 3,
  CALL_WITH_FDS: 4,
  REPLY_WITH_FDS: 5,
  STREAM_HOLE: 6,
} as const;

export const Status = { OK: 0, ERROR: 1, CONTINUE: 2 } as const;

export interface Header {
  prog: number;
  vers: number;
  proc: number;
  type: number;
  serial: number;
  status: number;
}

export interface Message extends Header {
  /** The payload: a view of a receive buffer that is never reused, so it may be kept. */
  payload: Buffer;
}

const TYPE_NAMES = ['CALL', 'REPLY', 'MESSAGE', 'STREAM', 'CALL_WITH_FDS', 'REPLY_WITH_FDS', 'STREAM_HOLE'];
const STATUS_NAMES = ['OK', 'ERROR', 'CONTINUE'];
export function describeHeader(h: Header): string {
  return `prog=0x${h.prog.toString(16)} vers=${h.vers} proc=${h.proc} type=${TYPE_NAMES[h.type] ?? h.type} serial=${h.serial} status=${STATUS_NAMES[h.status] ?? h.status}`;
}

/** Write the length word and header at `off` (28 bytes, which the caller knows `buf` has there). */
export function writeFrameHead(buf: Buffer, off: number, frameLength: number, h: Header): void {
  if (off < 0 || off + FRAME_OVERHEAD > buf.length) throw new RangeError(`no room for a frame head at ${off} of ${buf.length} bytes`);
  putU32(buf, off, frameLength);
  putU32(buf, off + 4, h.prog);
  putU32(buf, off + 8, h.vers);
  putU32(buf, off + 12, h.proc);
  putU32(buf, off + 16, h.type);
  putU32(buf, off + 20, h.serial);
  putU32(buf, off + 24, h.status);
}

/** Store the low 32 bits of `v` big-endian at `off` (inside `b`), by index: see `u32`. */
export function putU32(b: Uint8Array, off: number, v: number): void {
  b[off] = v >>> 24;
  b[off + 1] = v >>> 16;
  b[off + 2] = v >>> 8;
  b[off + 3] = v;
}

/** A whole frame (header + payload) in one new Buffer. */
export function buildFrame(h: Header, payload?: Uint8Array): Buffer {
  const n = payload ? payload.length : 0;
  const buf = Buffer.allocUnsafe(FRAME_OVERHEAD + n);
  writeFrameHead(buf, 0, FRAME_OVERHEAD + n, h);
  if (payload) buf.set(payload, FRAME_OVERHEAD);
  return buf;
}

/** Only the 28-byte head of a frame whose payload is written beside it (no copy of the payload). */
export function buildFrameHead(h: Header, payloadLength: number): Buffer {
  const buf = Buffer.allocUnsafe(FRAME_OVERHEAD);
  writeFrameHead(buf, 0, FRAME_OVERHEAD + payloadLength, h);
  return buf;
}

/**
 * A big-endian 32-bit word at `off`, which the caller knows to be inside `b`, read by index:
 * on the path of every frame this is a few instructions, where Buffer's readers check their
 * argument and bounds again in calls of their own.
 */
export function u32(b: Uint8Array, off: number): number {
  return ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
}

/** `u32` as a signed word. */
export function i32(b: Uint8Array, off: number): number {
  return (b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!;
}

/** The whole frame in `buf` from `start` (its length word) to `end`: its header, and its payload as a view. */
export function readMessage(buf: Buffer, start: number, end: number): Message {
  const off = start + LEN_SIZE;
  // one object of one shape for every frame (50,000 of them for 25,000 small extents)
  return {
    prog: u32(buf, off),
    vers: u32(buf, off + 4),
    proc: i32(buf, off + 8),
    type: i32(buf, off + 12),
    serial: u32(buf, off + 16),
    status: i32(buf, off + 20),
    payload: buf.subarray(start + FRAME_OVERHEAD, end),
  };
}

export function readHeader(buf: Buffer, off: number): Header {
  return {
    prog: buf.readUInt32BE(off),
    vers: buf.readUInt32BE(off + 4),
    proc: buf.readInt32BE(off + 8),
    type: buf.readInt32BE(off + 12),
    serial: buf.readUInt32BE(off + 16),
    status: buf.readInt32BE(off + 20),
  };
}
