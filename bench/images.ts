/**
 * Benchmark images: deterministic layouts and contents, built fast (positional writes into a
 * file truncated to its size, so holes are never materialised), and a content digest that
 * verifies copies without reading holes.
 */
import { createCipheriv, createHash } from 'node:crypto';
import {
  closeSync,
  existsSync,
  fstatSync,
  ftruncateSync,
  openSync,
  readFileSync,
  read,
  readSync,
  statSync,
  unlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { dataSegments } from './extents.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

export interface ImageSpec {
  /** Short id used in volume and file names: 'a'…'d'. */
  id: string;
  /** File / volume name, e.g. `sv-a-sparse.raw`. */
  file: string;
  title: string;
  size: number;
  /** Data extents [offset, length], sorted, 4 KiB aligned, non-overlapping. */
  extents: Array<[number, number]>;
  seed: string;
  /** Whether "plain" (non-sparse) transfers are timed for this image too. */
  plain: boolean;
}

/** Small deterministic PRNG for layouts (mulberry32). Contents use AES-CTR, see below. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function seedNumber(seed: string): number {
  return createHash('sha256').update(seed).digest().readUInt32LE(0);
}

const align = (n: number, a: number): number => Math.floor(n / a) * a;

/** `count` extents of random lengths averaging `dataTotal / count`, one per equal slot. */
function scatteredExtents(size: number, count: number, dataTotal: number, seed: string): Array<[number, number]> {
  const rnd = mulberry32(seedNumber(seed));
  const slot = align(size / count, 4 * KiB);
  const avg = dataTotal / count;
  const out: Array<[number, number]> = [];
  for (let i = 0; i < count; i++) {
    let len = Math.max(4 * KiB, align(avg * (0.5 + rnd()), 4 * KiB));
    len = Math.min(len, slot - 4 * KiB); // leave a hole in every slot
    // First extent at offset 0 (data first); the last slot always ends in a hole.
    const slack = slot - len - 4 * KiB;
    const off = i * slot + (i === 0 ? 0 : align(rnd() * slack, 4 * KiB));
    out.push([off, len]);
  }
  return out;
}

/** `count` extents of `len` bytes spread evenly over `size`. */
function evenExtents(size: number, count: number, len: number): Array<[number, number]> {
  const blocks = size / (4 * KiB);
  const out: Array<[number, number]> = [];
  for (let i = 0; i < count; i++) {
    out.push([Math.floor((i * blocks) / count) * 4 * KiB, len]);
  }
  return out;
}

export function imageSpecs(quick: boolean): ImageSpec[] {
  if (quick) {
    return [
      {
        id: 'a', file: 'sv-a-sparse.raw', title: '1 GiB, 64 MiB data in 256 extents',
        size: 1 * GiB, extents: scatteredExtents(1 * GiB, 256, 64 * MiB, 'a-quick'), seed: 'a-quick', plain: false,
      },
      {
        id: 'b', file: 'sv-b-dense.raw', title: '128 MiB dense random',
        size: 128 * MiB, extents: [[0, 128 * MiB]], seed: 'b-quick', plain: true,
      },
      {
        id: 'c', file: 'sv-c-fragmented.raw', title: '1 GiB, 10,000 × 4 KiB extents',
        size: 1 * GiB, extents: evenExtents(1 * GiB, 10_000, 4 * KiB), seed: 'c-quick', plain: false,
      },
      {
        id: 'd', file: 'sv-d-hole.raw', title: '64 GiB, all hole',
        size: 64 * GiB, extents: [], seed: 'd', plain: false,
      },
    ];
  }
  return [
    {
      id: 'a', file: 'sv-a-sparse.raw', title: '16 GiB, ~1.08 GiB data in 256 extents',
      size: 16 * GiB, extents: scatteredExtents(16 * GiB, 256, 1.08 * GiB, 'a'), seed: 'a', plain: false,
    },
    {
      id: 'b', file: 'sv-b-dense.raw', title: '2 GiB dense random',
      size: 2 * GiB, extents: [[0, 2 * GiB]], seed: 'b', plain: true,
    },
    {
      id: 'c', file: 'sv-c-fragmented.raw', title: '4 GiB, 100,000 × 4 KiB extents',
      size: 4 * GiB, extents: evenExtents(4 * GiB, 100_000, 4 * KiB), seed: 'c', plain: false,
    },
    {
      id: 'd', file: 'sv-d-hole.raw', title: '64 GiB, all hole',
      size: 64 * GiB, extents: [], seed: 'd', plain: false,
    },
    {
      id: 'e', file: 'sv-e-fragmented.raw', title: '1 GiB, 25,000 × 4 KiB extents',
      size: 1 * GiB, extents: evenExtents(1 * GiB, 25_000, 4 * KiB), seed: 'e', plain: false,
    },
  ];
}

export const dataBytes = (spec: ImageSpec): number => spec.extents.reduce((s, [, l]) => s + l, 0);

/** What a built image is, with the digest every copy is compared to. */
export interface BuiltImage {
  spec: ImageSpec;
  path: string;
  digest: string;
  allocated: number;
  dataBytes: number;
  reused: boolean;
  buildSeconds: number;
}

/**
 * Contents, built at write speed: one 9 MiB pool per seed (the AES-128-CTR keystream of key
 * sha256(seed): incompressible), and every 1 MiB piece of data is the pool slice starting at a
 * 4 KiB-aligned position mixed from (seed, offset), written straight from the pool with pwrite.
 * Pieces thus differ from their neighbours (a misplaced piece is caught), without generating
 * random bytes per image byte. Nothing in the measured paths deduplicates or compresses.
 */
const POOL = 8 * MiB;
const PIECE = 1 * MiB;

function randomPool(seed: string): Buffer {
  const key = createHash('sha256').update(`sparsevirt-bench:${seed}`).digest().subarray(0, 16);
  return createCipheriv('aes-128-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(POOL + PIECE));
}

/** 4 KiB-aligned start in the pool for the piece at `offset` (murmur3-style finaliser). */
function pieceStart(seed: number, offset: number): number {
  const block = offset / (4 * KiB);
  let h = (seed ^ Math.imul(block >>> 0, 0x9e3779b1) ^ Math.imul(Math.floor(block / 2 ** 32), 0x85ebca6b)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  h = (h ^ (h >>> 16)) >>> 0;
  return (h % (POOL / (4 * KiB))) * 4 * KiB;
}

function writeImage(spec: ImageSpec, path: string): void {
  const pool = randomPool(spec.seed);
  const seed = seedNumber(spec.seed);
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, spec.size);
    for (const [off, len] of spec.extents) {
      for (let p = 0; p < len; p += PIECE) {
        const n = Math.min(PIECE, len - p);
        const start = pieceStart(seed, off + p);
        let w = 0;
        while (w < n) w += writeSync(fd, pool, start + w, n - w, off + p + w);
      }
    }
  } finally {
    closeSync(fd);
  }
}

function specHash(spec: ImageSpec): string {
  return createHash('sha256').update(JSON.stringify(spec)).digest('hex').slice(0, 16);
}

interface ManifestEntry {
  specHash: string;
  size: number;
  blocks: number;
  mtimeMs: number;
  digest: string;
}

/** Builds (or reuses, when unchanged since the last run) every image in `dir`. */
export async function buildImages(
  specs: ImageSpec[],
  dir: string,
  log: (msg: string) => void,
): Promise<BuiltImage[]> {
  const manifestPath = join(dir, '.manifest.json');
  let manifest: Record<string, ManifestEntry> = {};
  try {
    manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as Record<string, ManifestEntry>;
  } catch {
    /* first run */
  }
  const built: BuiltImage[] = [];
  for (const spec of specs) {
    const path = join(dir, spec.file);
    const t0 = performance.now();
    const m = manifest[spec.file];
    const h = specHash(spec);
    let reused = false;
    let digest: string;
    if (m && m.specHash === h && existsSync(path)) {
      const st = statSync(path);
      reused = st.size === m.size && st.blocks === m.blocks && st.mtimeMs === m.mtimeMs;
    }
    if (reused) {
      digest = m!.digest;
    } else {
      if (existsSync(path)) unlinkSync(path);
      writeImage(spec, path);
      digest = (await contentDigest(path)).digest;
      const st = statSync(path);
      manifest[spec.file] = { specHash: h, size: st.size, blocks: st.blocks, mtimeMs: st.mtimeMs, digest };
      writeFileSync(manifestPath, JSON.stringify(manifest, null, 2));
    }
    const st = statSync(path);
    const img: BuiltImage = {
      spec, path, digest, allocated: st.blocks * 512, dataBytes: dataBytes(spec), reused,
      buildSeconds: (performance.now() - t0) / 1000,
    };
    log(
      `${reused ? 'reused' : 'built '} ${spec.file.padEnd(20)} ${spec.title.padEnd(40)} ` +
        `allocated ${fmtBytes(img.allocated).padStart(9)}  ${img.buildSeconds.toFixed(1)} s`,
    );
    built.push(img);
  }
  return built;
}

const ZERO_BLOCK = Buffer.alloc(4 * KiB);
const WINDOW = 8 * MiB;

export interface Digest {
  /** SHA-256 (hex) over the non-zero 4 KiB blocks, see contentDigest. */
  digest: string;
  size: number;
  allocated: number;
  /** Bytes actually read (data segments). */
  readBytes: number;
}

/**
 * A SHA-256 of the logical contents that does not read holes.
 *
 * The file is cut into 8 MiB windows and 4 KiB blocks at fixed offsets; every maximal run of
 * non-zero blocks inside a window is hashed as (offset u64 BE, length u64 BE, bytes); the size
 * ends the stream. Two files get the same digest iff they read the same (up to SHA-256
 * collisions), whatever their allocation: zeros written as data and holes hash alike. Holes are
 * skipped via SEEK_DATA, so a 64 GiB hole costs nothing while a plain `sha256sum` would hash
 * 64 GiB of zeros (~30 s here).
 */
export async function contentDigest(path: string): Promise<Digest> {
  const fd = openSync(path, 'r');
  try {
    const st = fstatSync(fd);
    const size = st.size;
    const hash = createHash('sha256');
    const header = Buffer.alloc(16);
    // Two buffers: while one is hashed, the next big window is read on the thread pool.
    const bufs = [Buffer.allocUnsafeSlow(WINDOW), Buffer.allocUnsafeSlow(WINDOW)];
    const views = bufs.map((b) => new Uint32Array(b.buffer, b.byteOffset, WINDOW / 4));
    let readBytes = 0;
    // 4 KiB-aligned covered ranges, merged when they touch, cut at the fixed 8 MiB windows.
    const tasks: Array<[number, number]> = [];
    let lastEnd = -1;
    for (const [s, e] of dataSegments(fd, size)) {
      let a = align(s, 4 * KiB);
      const b = Math.min(size, Math.ceil(e / (4 * KiB)) * 4 * KiB);
      if (a < lastEnd) a = lastEnd;
      if (a >= b) continue;
      if (a === lastEnd && tasks.length) {
        // touches the previous range: extend its last task up to the window boundary
        const t = tasks[tasks.length - 1]!;
        const wEnd = (Math.floor(t[0] / WINDOW) + 1) * WINDOW;
        const grow = Math.min(b, wEnd) - (t[0] + t[1]);
        if (grow > 0) {
          t[1] += grow;
          a += grow;
        }
      }
      for (let pos = a; pos < b; ) {
        const end = Math.min(b, (Math.floor(pos / WINDOW) + 1) * WINDOW);
        tasks.push([pos, end - pos]);
        pos = end;
      }
      lastEnd = b;
    }
    const readInto = (buf: Buffer, pos: number, n: number): number => {
      let got = 0;
      while (got < n) {
        const r = readSync(fd, buf, got, n - got, pos + got);
        if (r === 0) break;
        got += r;
      }
      return got;
    };
    const readIntoAsync = (buf: Buffer, pos: number, n: number): Promise<number> =>
      new Promise((resolve, reject) => {
        let got = 0;
        const step = (): void => {
          read(fd, buf, got, n - got, pos + got, (err, r) => {
            if (err) return reject(err);
            got += r;
            if (r === 0 || got >= n) resolve(got);
            else step();
          });
        };
        step();
      });
    const PREFETCH_MIN = 1 * MiB; // small reads: synchronously (async costs more than it saves)
    let prefetched: Promise<number> | null = null;
    for (let i = 0; i < tasks.length; i++) {
      const [pos, n] = tasks[i]!;
      const buf = bufs[i & 1]!;
      const words = views[i & 1]!;
      const got = prefetched ? await prefetched : readInto(buf, pos, n);
      prefetched = null;
      const next = tasks[i + 1];
      if (next && next[1] >= PREFETCH_MIN) prefetched = readIntoAsync(bufs[(i + 1) & 1]!, next[0], next[1]);
      readBytes += got;
      if (isAllZero(buf, got)) continue;
      const emit = (from: number, to: number): void => {
        header.writeBigUInt64BE(BigInt(pos + from), 0);
        header.writeBigUInt64BE(BigInt(to - from), 8);
        hash.update(header);
        hash.update(buf.subarray(from, to));
      };
      let runStart = -1;
      for (let o = 0; o < got; o += 4 * KiB) {
        const bl = Math.min(4 * KiB, got - o);
        // Fast path: a non-zero word in the first 16 bytes decides (random data: always).
        const w = o >>> 2;
        if ((bl === 4 * KiB && (words[w]! | words[w + 1]! | words[w + 2]! | words[w + 3]!) !== 0) ||
            buf.compare(ZERO_BLOCK, 0, bl, o, o + bl) !== 0) {
          if (runStart < 0) runStart = o;
        } else if (runStart >= 0) {
          emit(runStart, o);
          runStart = -1;
        }
      }
      if (runStart >= 0) emit(runStart, got);
    }
    if (prefetched) await prefetched;
    header.writeBigUInt64BE(BigInt(size), 0);
    hash.update(header.subarray(0, 8));
    return { digest: hash.digest('hex'), size, allocated: st.blocks * 512, readBytes };
  } finally {
    closeSync(fd);
  }
}

/**
 * Plain SHA-256 of all bytes (what `sha256sum` prints), holes fed as zeros: slow on big sparse
 * files, offered as `--verify full`.
 */
export function fullSha256(path: string): string {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    const hash = createHash('sha256');
    const buf = Buffer.allocUnsafe(WINDOW);
    const zeros = Buffer.alloc(WINDOW);
    let pos = 0;
    for (const [s, e] of dataSegments(fd, size)) {
      while (pos < s) {
        const n = Math.min(WINDOW, s - pos);
        hash.update(zeros.subarray(0, n));
        pos += n;
      }
      while (pos < e) {
        const r = readSync(fd, buf, 0, Math.min(WINDOW, e - pos), pos);
        if (r === 0) break;
        hash.update(buf.subarray(0, r));
        pos += r;
      }
    }
    while (pos < size) {
      const n = Math.min(WINDOW, size - pos);
      hash.update(zeros.subarray(0, n));
      pos += n;
    }
    return hash.digest('hex');
  } finally {
    closeSync(fd);
  }
}

const BIG_ZERO = Buffer.alloc(WINDOW);
function isAllZero(buf: Buffer, n: number): boolean {
  return buf.compare(BIG_ZERO, 0, n, 0, n) === 0;
}

export function fmtBytes(n: number): string {
  if (n >= GiB) return `${(n / GiB).toFixed(2)} GiB`;
  if (n >= MiB) return `${(n / MiB).toFixed(1)} MiB`;
  if (n >= KiB) return `${(n / KiB).toFixed(0)} KiB`;
  return `${n} B`;
}
