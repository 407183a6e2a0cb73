/**
 * Sparse test images: build a file from a layout of data runs and holes with deterministic
 * contents, and measure files (hash, allocation, extent map, block size).
 *
 * ```ts
 * const dir = await scratchDir('/dev/shm');          // tmpfs; '/tmp' for ext4
 * const img = path.join(dir, 'a.img');
 * await makeImage(img, [{ kind: 'hole', length: 1 << 20 }, { kind: 'data', length: 5000 }], 7);
 * await sha256File(img);                              // hex digest of the whole file
 * await rm(dir, { recursive: true });
 * ```
 *
 * Data runs are random bytes 1..255 (never zero, so every block they touch is really allocated
 * and zero detection never fires on them); `zero` runs are written zeros: allocated, but reading
 * as zero. Holes are never written: they cost no space, so a 1 TiB image is fine on tmpfs.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import path from 'node:path';
import { after, before } from 'node:test';
import fc from 'fast-check';
import type { Chunk } from '../../src/chunk.js';
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

/** A fresh temporary directory under `base` (e.g. `/tmp` for ext4, `/dev/shm` for tmpfs). */
export function scratchDir(base: string, prefix = 'sparsevirt-'): Promise<string> {
  return mkdtemp(path.join(base, prefix));
}

/**
 * Removes everything inside `dir`. Use as a property's `afterEach`, so runs that fail (and
 * fast-check's shrinking after them) do not pile up images: on tmpfs they are RAM.
 */
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

export async function emptyDir(dir: string): Promise<void> {
  for (const name of await fs.promises.readdir(dir)) await fs.promises.rm(path.join(dir, name), { recursive: true, force: true });
}

/** `n` deterministic bytes in 1..255 from `seed` (xorshift32): the same seed, the same bytes. */
export function randomBytes(seed: number, n: number): Buffer {
  const buf = Buffer.allocUnsafe(n);
  let x = (seed | 0) || 0x9e3779b9;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf[i] = ((x >>> 0) % 255) + 1;
  }
  return buf;
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
      if (part.kind !== 'hole' && part.length > 0) {
        const bytes = part.kind === 'data' ? randomBytes(seed * 7919 + i, part.length) : Buffer.alloc(part.length);
        await fh.write(bytes, 0, bytes.length, pos);
      }
      pos += part.length;
    }
    await fh.truncate(pos);
    return pos;
  } finally {
    await fh.close();
  }
}

/** Creates (or replaces) `file` with `size` random bytes from `seed`: a target full of old data. */
export async function makeFilledFile(file: string, size: number, seed = 2): Promise<void> {
  await fs.promises.writeFile(file, randomBytes(seed, size));
}

/** SHA-256 (hex) of `[offset, offset + length)` of a file, clipped to its size (default: all of it). */
export async function sha256File(file: string, offset = 0, length = Number.MAX_SAFE_INTEGER): Promise<string> {
  const hash = createHash('sha256');
  const size = (await fs.promises.stat(file)).size;
  const end = Math.min(size, offset + length);
  if (end > offset) {
    for await (const piece of fs.createReadStream(file, { start: offset, end: end - 1, highWaterMark: 1 << 20 })) {
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

/** Bytes the filesystem has allocated to a file (`st_blocks × 512`). */
export async function allocatedBytes(file: string): Promise<number> {
  return (await fs.promises.stat(file)).blocks * 512;
}

/** The allocation unit of the filesystem holding `file` (4096 on ext4 and tmpfs here). */
export async function fsBlockSize(file: string): Promise<number> {
  return (await fs.promises.statfs(file)).bsize;
}

/** The extent map of a file (`readExtents`), for assertions and messages. */
export function extentMap(file: string, opts?: { offset?: number; length?: number }): Promise<Extent[]> {
  return readExtents(file, opts);
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
