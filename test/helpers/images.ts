/**
 * Sparse test images and the measures of files: build a file from a layout of data runs and
 * holes with deterministic contents; hash it, map its extents, count its allocation; and the
 * temporary directories the tests work in. One definition of each, for every test.
 *
 * ```ts
 * const dir = await scratchDir('/dev/shm');          // tmpfs; '/tmp' for ext4
 * const img = path.join(dir, 'a.img');
 * await makeImage(img, [{ kind: 'hole', length: 1 << 20 }, { kind: 'data', length: 5000 }], 7);
 * await sha256File(img);                              // hex digest of the whole file
 * await layoutOf(img);                                // [{ kind: 'hole', … }, { kind: 'data', … }]
 * await rm(dir, { recursive: true });
 * ```
 *
 * Data runs are random bytes 1..255 (never zero, so every block they touch is really allocated
 * and zero detection never fires on them); `zero` runs are written zeros: allocated, but reading
 * as zero. Holes are never written: they cost no space, so a 1 TiB image is fine on tmpfs.
 * Files are written and read 1 MiB at a time: memory stays bounded whatever the size.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before } from 'node:test';
import fc from 'fast-check';
import { zeroBytes, type Chunk } from '../../src/chunk.js';
import { ContentDigest } from '../../src/digest.js';
import { readExtents, type Extent } from '../../src/sparse/index.js';

/** One run of a layout: `data` (random non-zero bytes), `zero` (written zeros) or `hole`. */
export interface LayoutPart {
  kind: 'data' | 'zero' | 'hole';
  length: number;
}
export type Layout = LayoutPart[];

export function layoutSize(layout: Layout): number {
  return layout.reduce((n, p) => n + p.length, 0);
}

/** The layout of libvirt's capture source `sparse-source.img` (4 MiB, 424 KiB of data). */
export const CAPTURE_LAYOUT: Layout = [
  { kind: 'data', length: 4096 }, { kind: 'hole', length: 61440 },
  { kind: 'data', length: 16384 }, { kind: 'hole', length: 966656 },
  { kind: 'data', length: 65536 }, { kind: 'hole', length: 458752 },
  { kind: 'data', length: 8192 }, { kind: 'hole', length: 524288 },
  { kind: 'data', length: 12288 }, { kind: 'hole', length: 1028096 },
  { kind: 'data', length: 327680 }, { kind: 'hole', length: 720896 },
];

/** Bytes written or read at once. */
const PIECE = 1 << 20;

// ------------------------------------------------------------------ temporary directories

/**
 * A fresh temporary directory under `base` (`/tmp` for ext4, `/dev/shm` for tmpfs; both do
 * SEEK_HOLE and punching), by default the OS's temporary directory.
 */
export function scratchDir(base: string = os.tmpdir(), prefix = 'sparsevirt-'): Promise<string> {
  return mkdtemp(path.join(base, prefix));
}

/** `fn` with a fresh directory under `base`, removed afterwards whatever happens. */
export async function withScratchDir<T>(base: string, prefix: string, fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await scratchDir(base, prefix);
  try {
    return await fn(dir);
  } finally {
    await fs.promises.rm(dir, { recursive: true, force: true });
  }
}

/**
 * For the enclosing `describe`: a scratch directory under `base`, made before its tests and
 * removed after them, and fresh file names in it (`t0`, `t1`, …).
 */
export function scratchFiles(base: string): { dir: () => string; target: () => string } {
  let dir = '';
  let n = 0;
  before(async () => {
    dir = await scratchDir(base);
  });
  after(() => fs.promises.rm(dir, { recursive: true, force: true }));
  return { dir: () => dir, target: () => path.join(dir, `t${n++}`) };
}

/**
 * For the enclosing `describe`: `scratchFiles`, and `image(layout)` making a fresh image of the
 * layout there (each with a seed of its own).
 */
export function scratchImages(base: string): { dir: () => string; image: (layout: Layout) => Promise<string> } {
  const files = scratchFiles(base);
  let seed = 0;
  return {
    dir: files.dir,
    async image(layout) {
      const file = files.target();
      await makeImage(file, layout, ++seed);
      return file;
    },
  };
}

/**
 * Removes everything inside `dir`. Use as a property's `afterEach`, so runs that fail (and
 * fast-check's shrinking after them) do not pile up images: on tmpfs they are RAM.
 */
export async function emptyDir(dir: string): Promise<void> {
  for (const name of await fs.promises.readdir(dir)) await fs.promises.rm(path.join(dir, name), { recursive: true, force: true });
}

// ------------------------------------------------------------------ making files

/** Fills `buf` with xorshift32 bytes in 1..255 from state `x`; returns the state after them. */
function fillXorshift(x: number, buf: Buffer): number {
  for (let i = 0; i < buf.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf[i] = ((x >>> 0) % 255) + 1;
  }
  return x;
}

const seedState = (seed: number): number => (seed | 0) || 0x9e3779b9;

/** `n` deterministic bytes in 1..255 from `seed` (xorshift32): the same seed, the same bytes. */
export function randomBytes(seed: number, n: number): Buffer {
  const buf = Buffer.allocUnsafe(n);
  fillXorshift(seedState(seed), buf);
  return buf;
}

/** Writes `length` bytes at `pos`: `randomBytes(seed, length)`, or zeros when `seed` is null. */
async function writeRun(fh: fs.promises.FileHandle, pos: number, length: number, seed: number | null): Promise<void> {
  let x = seed === null ? 0 : seedState(seed);
  const piece = seed === null ? null : Buffer.allocUnsafe(Math.min(PIECE, length));
  for (let off = 0; off < length; off += PIECE) {
    const n = Math.min(PIECE, length - off);
    let bytes = zeroBytes(n);
    if (piece) {
      bytes = piece.subarray(0, n);
      x = fillXorshift(x, bytes);
    }
    await fh.write(bytes, 0, n, pos + off);
  }
}

/**
 * Creates (or replaces) `file` with `layout`: data runs from `seed`, zero runs written, holes
 * skipped; the size is the layout's total. Returns that size.
 */
export async function makeImage(file: string, layout: Layout, seed = 1): Promise<number> {
  const fh = await fs.promises.open(file, 'w');
  try {
    let pos = 0;
    for (const [i, part] of layout.entries()) {
      if (part.kind !== 'hole' && part.length > 0) await writeRun(fh, pos, part.length, part.kind === 'data' ? seed * 7919 + i : null);
      pos += part.length;
    }
    await fh.truncate(pos);
    return pos;
  } finally {
    await fh.close();
  }
}

/** Creates (or replaces) `file` with `size` random bytes from `seed` (`randomBytes(seed, size)`): a target full of old data. */
export async function makeFilledFile(file: string, size: number, seed = 2): Promise<void> {
  const fh = await fs.promises.open(file, 'w');
  try {
    await writeRun(fh, 0, size, seed);
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

// ------------------------------------------------------------------ measuring files

/** SHA-256 (hex) of `[offset, offset + length)` of a file, clipped to its size (default: all of it). */
export async function sha256File(file: string, offset = 0, length = Number.MAX_SAFE_INTEGER): Promise<string> {
  const hash = createHash('sha256');
  const size = (await fs.promises.stat(file)).size;
  const end = Math.min(size, offset + length);
  if (end > offset) {
    for await (const piece of fs.createReadStream(file, { start: offset, end: end - 1, highWaterMark: PIECE })) {
      hash.update(piece as Buffer);
    }
  }
  return hash.digest('hex');
}

export function sha256(...buffers: Buffer[]): string {
  const hash = createHash('sha256');
  for (const b of buffers) hash.update(b);
  return hash.digest('hex');
}

/**
 * The content digest (src/digest.ts, what `copyVolume`'s verify compares) of [offset, offset +
 * length) of a file, by default all of it; the range must lie within the file.
 */
export function fileContentDigest(file: string, offset = 0, length?: number): string {
  const fd = fs.openSync(file, 'r');
  try {
    const end = length === undefined ? fs.fstatSync(fd).size : offset + length;
    const d = new ContentDigest(offset, end - offset);
    const buf = Buffer.allocUnsafe(4 * PIECE);
    for (let at = offset; at < end;) {
      const n = fs.readSync(fd, buf, 0, Math.min(buf.length, end - at), at);
      if (n === 0) throw new Error(`${file} ends at ${at}, before ${end}`);
      d.update({ kind: 'data', bytes: buf.subarray(0, n) });
      at += n;
    }
    return d.digest();
  } finally {
    fs.closeSync(fd);
  }
}

/** The byte range [offset, offset + length) of a file (shorter at its end). */
export async function readRange(file: string, offset: number, length: number): Promise<Buffer> {
  const fh = await fs.promises.open(file, 'r');
  try {
    const b = Buffer.alloc(length);
    const { bytesRead } = await fh.read(b, 0, length, offset);
    return b.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** Bytes the filesystem has allocated to a file (`st_blocks × 512`). */
export async function allocatedBytes(file: string): Promise<number> {
  return (await fs.promises.stat(file)).blocks * 512;
}

/** The allocation unit of the filesystem holding `file` (4096 on ext4 and tmpfs here). */
export async function fsBlockSize(file: string): Promise<number> {
  return (await fs.promises.statfs(file)).bsize;
}

/** The extent map of a file (SEEK_DATA/SEEK_HOLE, `readExtents`), for assertions and messages. */
export function extentMap(file: string, opts?: { offset?: number; length?: number }): Promise<Extent[]> {
  return readExtents(file, opts);
}

/** The layout of a file: its extent map without offsets, to compare with the layout it was made from. */
export async function layoutOf(file: string): Promise<Layout> {
  return (await extentMap(file)).map(({ kind, length }) => ({ kind, length }));
}

/**
 * Bytes a copy should allocate: the filesystem blocks that the data extents `extents` (of a
 * source, in source offsets) touch once moved by `shift` bytes (destination = source + shift).
 * A source block that straddles two destination blocks makes both allocated.
 */
export function expectedAllocation(extents: Extent[], shift: number, blockSize: number): number {
  let blocks = 0;
  let lastBlock = -1; // highest destination block counted so far (extents come in order)
  for (const e of extents) {
    if (e.kind !== 'data') continue;
    const first = Math.max(Math.floor((e.offset + shift) / blockSize), lastBlock + 1);
    const last = Math.ceil((e.offset + e.length + shift) / blockSize) - 1;
    if (last >= first) blocks += last - first + 1;
    lastBlock = Math.max(lastBlock, last);
  }
  return blocks * blockSize;
}

/**
 * fast-check layouts that stress sparse code: 1-byte runs, runs around one 4 KiB block, and
 * larger unaligned runs, any mix of kinds (leading/trailing/only holes, only data, empty).
 */
export function layoutArb(opts: { maxParts?: number; maxRun?: number; zeroRuns?: boolean } = {}): fc.Arbitrary<Layout> {
  const maxRun = opts.maxRun ?? 300_000;
  const kinds: Array<LayoutPart['kind']> = opts.zeroRuns === false ? ['data', 'hole'] : ['data', 'hole', 'zero'];
  const length = fc.oneof(
    fc.integer({ min: 1, max: 16 }),
    fc.integer({ min: 4090, max: 4100 }),
    fc.integer({ min: 1, max: 3 }).map((n) => n * 4096),
    fc.integer({ min: 1, max: maxRun }),
  );
  return fc.array(fc.record({ kind: fc.constantFrom(...kinds), length }), { maxLength: opts.maxParts ?? 8 });
}

/**
 * Passes chunks from `source` through a bounded in-memory queue of `capacity` chunks, with the
 * producer running ahead on its own: what a stream between a reader and a writer does.
 */
export async function* boundedPipe(source: AsyncIterable<Chunk>, capacity = 4): AsyncGenerator<Chunk> {
  const queue: Chunk[] = [];
  let done = false;
  let failure: unknown = null;
  let stopped = false;
  let wakeConsumer: (() => void) | null = null;
  let wakeProducer: (() => void) | null = null;
  const wake = (w: (() => void) | null): void => w?.();
  const producer = (async () => {
    try {
      for await (const chunk of source) {
        if (stopped) break;
        queue.push(chunk);
        wake(wakeConsumer);
        while (queue.length >= capacity && !stopped) await new Promise<void>((r) => (wakeProducer = r));
      }
    } catch (err) {
      failure = err;
    } finally {
      done = true;
      wake(wakeConsumer);
    }
  })();
  try {
    for (;;) {
      const chunk = queue.shift();
      if (chunk) {
        wake(wakeProducer);
        yield chunk;
        continue;
      }
      if (done) break;
      await new Promise<void>((r) => (wakeConsumer = r));
    }
    if (failure) throw failure;
  } finally {
    stopped = true;
    wake(wakeProducer);
    await producer;
  }
}
