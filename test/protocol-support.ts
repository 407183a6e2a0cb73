/**
 * Shared helpers for the protocol tests: the libvirt 9.0 captures in test/fixtures/libvirt-9.0
 * (see the README there), a seeded PRNG, and the normaliser that maps our decoded values onto
 * the JSON the capture tool wrote (`decoded` in NAME.frames.json).
 */
import { readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { FrameParser } from '../src/rpc/parser.js';
import type { Message } from '../src/rpc/message.js';

/** Compiled to dist/test/; the fixtures stay in the source tree. */
export const FIXTURE_DIR = fileURLToPath(new URL('../../test/fixtures/libvirt-9.0/', import.meta.url));

export type Direction = 'client-to-server' | 'server-to-client';
export const DIRECTIONS: readonly Direction[] = ['client-to-server', 'server-to-client'];

export interface FixtureFrame {
  index: number;
  direction: Direction;
  file_offset: number;
  length_word: number;
  prog: number;
  vers: number;
  proc: number;
  proc_name: string;
  type: number;
  type_name: string;
  serial: number;
  status: number;
  status_name: string;
  payload_length: number;
  decoded?: any;
}

export interface Capture {
  name: string;
  frames: FixtureFrame[];
  /** Each direction's bytes, in a Buffer that owns its whole ArrayBuffer (never a pool slice). */
  bin: Record<Direction, Buffer>;
}

export function captureNames(): string[] {
  return readdirSync(FIXTURE_DIR)
    .filter((f) => f.endsWith('.frames.json'))
    .map((f) => f.slice(0, -'.frames.json'.length))
    .sort();
}

function ownBuffer(b: Buffer): Buffer {
  const own = Buffer.from(new ArrayBuffer(b.length));
  b.copy(own);
  return own;
}

const cache = new Map<string, Capture>();
export function loadCapture(name: string): Capture {
  let c = cache.get(name);
  if (!c) {
    const json = JSON.parse(readFileSync(FIXTURE_DIR + name + '.frames.json', 'utf8'));
    const bin = {} as Record<Direction, Buffer>;
    for (const d of DIRECTIONS) bin[d] = ownBuffer(readFileSync(`${FIXTURE_DIR}${name}.${d}.bin`));
    c = { name, frames: json.frames as FixtureFrame[], bin };
    cache.set(name, c);
  }
  return c;
}

export function framesOf(c: Capture, d: Direction): FixtureFrame[] {
  return c.frames.filter((f) => f.direction === d);
}

/** The payload bytes of a fixture frame (a view of the capture). */
export function payloadOf(c: Capture, f: FixtureFrame): Buffer {
  const start = f.file_offset + 28;
  return c.bin[f.direction].subarray(start, start + f.payload_length);
}

/** Feed pieces to a fresh parser and collect what it emits. */
export function parseAll(pieces: Iterable<Buffer>, parser = new FrameParser()): Message[] {
  const out: Message[] = [];
  for (const p of pieces) parser.push(p, (m) => out.push(m));
  if (!parser.idle) throw new Error('parser not idle at the end of the capture');
  return out;
}

// ---------------------------------------------------------------------------------------
// Seeded PRNG (mulberry32) so sampled split points are reproducible. Override with
// SPARSEVIRT_TEST_SEED=<int>.

export const SEED = Number(process.env.SPARSEVIRT_TEST_SEED ?? 0x5eed1e55) >>> 0;

export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A stable per-name seed, so each capture gets its own split points. */
export function seedFor(name: string): number {
  let h = SEED;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

// ---------------------------------------------------------------------------------------
// Normaliser: our decoded values → the capture tool's JSON shapes.

const snake = (k: string): string => k.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase());

export function uuidString(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * camelCase → snake_case keys (needResults → need_results, hvVer → hv_ver, libVer → lib_ver),
 * bigint → number (exact: refuses values past 2^53, which JSON could not have carried),
 * 16-byte Buffers (uuids) → the 8-4-4-4-12 string, other Buffers → hex.
 */
export function normaliseOurs(v: unknown): unknown {
  if (typeof v === 'bigint') {
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw new Error(`bigint ${v} cannot be compared with a JSON number`);
    }
    return Number(v);
  }
  if (Buffer.isBuffer(v)) return v.length === 16 ? uuidString(v) : v.toString('hex');
  if (Array.isArray(v)) return v.map(normaliseOurs);
  if (v !== null && typeof v === 'object') {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [snake(k), normaliseOurs(x)]));
  }
  return v;
}

/**
 * The capture tool wrote `xml` strings JSON-encoded a second time ("\"<pool …>\\n\""); undo
 * that so the text compares with the wire bytes.
 */
export function normaliseTheirs(v: unknown, key = ''): unknown {
  if (typeof v === 'string' && key === 'xml' && v.length >= 2 && v.startsWith('"') && v.endsWith('"')) {
    return JSON.parse(v);
  }
  if (Array.isArray(v)) return v.map((x) => normaliseTheirs(x));
  if (v !== null && typeof v === 'object') {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, normaliseTheirs(x, k)]));
  }
  return v;
}

/** Record sizes of Buffer allocations of at least `min` bytes made while `fn` runs. */
export function spyAllocations<T>(fn: () => T, min = 4096): { result?: T; error?: unknown; sizes: number[] } {
  const sizes: number[] = [];
  const B = Buffer as any;
  const orig = { alloc: B.alloc, allocUnsafe: B.allocUnsafe, allocUnsafeSlow: B.allocUnsafeSlow };
  for (const k of Object.keys(orig) as (keyof typeof orig)[]) {
    B[k] = (n: number, ...rest: unknown[]) => {
      if (n >= min) sizes.push(n);
      return orig[k].call(Buffer, n, ...rest);
    };
  }
  try {
    return { result: fn(), sizes };
  } catch (error) {
    return { error, sizes };
  } finally {
    Object.assign(B, orig);
  }
}
