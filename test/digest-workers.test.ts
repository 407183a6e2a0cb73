/**
 * The content digest on worker threads (`ParallelContentDigest`, and the daemon's
 * `readerContentDigest` on it) gives the serial `ContentDigest`'s digest (itself checked against
 * the definition in digest.test.ts) for any content: holes, pages cut at the range's ends or by
 * pieces, ranges off block boundaries, dense and sparse, bytes in memory and bytes the workers
 * read from a file themselves (at another file offset than the volume position), any task size.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, rmSync, writeSync, ftruncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import type { Chunk, FileRange, FileRef } from '../src/chunk.js';
import { ContentDigest, DIGEST_BLOCK, DIGEST_PAGE } from '../src/digest.js';
import { DigestWorkers, ParallelContentDigest } from '../src/digest-workers.js';
import { readerContentDigest } from '../src/daemon/digest.js';
import { fileRef } from '../src/io/file.js';

const workers = new DigestWorkers(3);
const dir = mkdtempSync(join(process.env.SPARSEVIRT_TEST_TMP ?? tmpdir(), 'sv-digest-workers-'));
after(async () => {
  await workers.close();
  rmSync(dir, { recursive: true, force: true });
});

function serial(content: Buffer, offset: number): string {
  const d = new ContentDigest(offset, content.length);
  d.data(content);
  return d.digest();
}

/** Content with zero runs and data runs at random places, up to ~3.6 MiB. */
const contentArb = fc.array(fc.record({ zero: fc.boolean(), len: fc.integer({ min: 1, max: 300_000 }), seed: fc.integer({ min: 1, max: 255 }) }), { minLength: 1, maxLength: 12 })
  .map((runs) => Buffer.concat(runs.map((r) => (r.zero ? Buffer.alloc(r.len) : Buffer.alloc(r.len, r.seed)))));

/** `content` cut at `cuts` into pieces: each a hole (when all zero and `holes` says so) or data. */
function pieces(content: Buffer, cuts: number[], holes: boolean[]): Array<{ at: number; len: number; hole: boolean }> {
  const points = [...new Set([0, ...cuts.map((c) => c % (content.length + 1)), content.length])].sort((a, b) => a - b);
  const out: Array<{ at: number; len: number; hole: boolean }> = [];
  for (let i = 0; i + 1 < points.length; i++) {
    const at = points[i]!;
    const len = points[i + 1]! - at;
    if (len === 0) continue;
    out.push({ at, len, hole: (holes[i % holes.length] ?? false) && content.subarray(at, at + len).every((x) => x === 0) });
  }
  return out;
}

/** A file holding `content` at file offset `shift` (what lies before it is garbage: never read). */
function fileWith(content: Buffer, shift: number): { fd: number; path: string } {
  const path = join(dir, `f-${process.hrtime.bigint()}`);
  const fd = openSync(path, 'w+');
  if (shift > 0) writeSync(fd, Buffer.alloc(shift, 0xee), 0, shift, 0);
  ftruncateSync(fd, shift + content.length);
  // data runs only: zero runs stay holes in the file
  for (let at = 0; at < content.length;) {
    let end = at;
    while (end < content.length && content[end] !== 0) end++;
    if (end > at) writeSync(fd, content, at, end - at, shift + at);
    at = Math.max(end, at + 1);
  }
  return { fd, path };
}

test('the parallel digest equals the serial one: bytes and file pieces, holes, any cuts, offsets and task sizes', async () => {
  await fc.assert(fc.asyncProperty(
    contentArb,
    fc.array(fc.nat(), { maxLength: 30 }),
    fc.array(fc.boolean(), { minLength: 1, maxLength: 5 }),
    fc.array(fc.boolean(), { minLength: 1, maxLength: 4 }),
    fc.integer({ min: 0, max: 3 * DIGEST_BLOCK }),
    fc.integer({ min: 0, max: 9000 }),
    fc.constantFrom(1, DIGEST_PAGE, DIGEST_BLOCK, 3 * DIGEST_BLOCK),
    fc.integer({ min: 1, max: 4 }),
    async (content, cuts, holes, fromFile, offset, shift, taskBytes, maxInFlight) => {
      const want = serial(content, offset);
      const f = fileWith(content, shift);
      try {
        const d = new ParallelContentDigest(offset, content.length, { workers, taskBytes, maxInFlight });
        let i = 0;
        for (const p of pieces(content, cuts, holes)) {
          if (p.hole) d.zeros(p.len);
          else if (fromFile[i++ % fromFile.length]) await d.addFile(offset + p.at, p.len, f.fd, shift + p.at);
          else await d.addBytes(offset + p.at, Buffer.from(content.subarray(p.at, p.at + p.len)));
        }
        assert.equal(await d.digest(), want);
      } finally {
        closeSync(f.fd);
        rmSync(f.path);
      }
    },
  ), { numRuns: 60 });
});

test('dense and sparse ranges off block boundaries, partial pages at both ends: the same digest with 1 or 3 workers', async () => {
  const size = 9 * DIGEST_BLOCK + 3 * DIGEST_PAGE + 17;
  const dense = Buffer.alloc(size);
  for (let i = 0; i < size; i++) dense[i] = (i * 2654435761) >>> 24 || 1;
  const sparse = Buffer.alloc(size);
  sparse.fill(5, 10, 20); // inside the first page
  sparse.fill(6, 2 * DIGEST_BLOCK - 100, 2 * DIGEST_BLOCK + 100); // across a block boundary
  sparse.fill(7, size - 3, size); // the last, partial page
  const one = new DigestWorkers(1);
  try {
    for (const content of [dense, sparse]) {
      const f = fileWith(content, 0);
      try {
        for (const [o, n] of [[0, size], [DIGEST_PAGE + 1, size - DIGEST_PAGE - 7], [DIGEST_BLOCK - 5, 5 * DIGEST_BLOCK + 11], [size - 2, 2]] as const) {
          const want = serial(content.subarray(o, o + n), o);
          for (const w of [one, workers]) {
            const d = new ParallelContentDigest(o, n, { workers: w, taskBytes: 2 * DIGEST_BLOCK });
            await d.addFile(o, n, f.fd, o);
            assert.equal(await d.digest(), want, `${o}+${n}, ${w.size} workers`);
          }
        }
      } finally {
        closeSync(f.fd);
        rmSync(f.path);
      }
    }
    // all holes, and an empty range
    const d = new ParallelContentDigest(DIGEST_BLOCK + 3, 10 * DIGEST_BLOCK, { workers: one });
    d.zeros(10 * DIGEST_BLOCK);
    assert.equal(await d.digest(), serial(Buffer.alloc(10 * DIGEST_BLOCK), DIGEST_BLOCK + 3));
    assert.equal(await new ParallelContentDigest(7, 0, { workers: one }).digest(), new ContentDigest(7, 0).digest());
  } finally {
    await one.close();
  }
});

test('a changed byte changes the parallel digest', async () => {
  const size = 6 * DIGEST_BLOCK;
  const a = Buffer.alloc(size, 1);
  const digest = async (b: Buffer) => {
    const d = new ParallelContentDigest(0, size, { workers, taskBytes: DIGEST_BLOCK });
    await d.addBytes(0, b);
    return d.digest();
  };
  const base = await digest(a);
  assert.equal(base, serial(a, 0));
  for (const at of [0, DIGEST_BLOCK + 4095, 4 * DIGEST_BLOCK, size - 1]) {
    const b = Buffer.from(a);
    b[at] = 2;
    assert.notEqual(await digest(b), base, `byte ${at}`);
  }
});

test('misuse and failures: pieces out of order or past the range, a digest asked early, a file shorter than its piece', async () => {
  const d = new ParallelContentDigest(100, 10_000, { workers });
  await d.addBytes(100, Buffer.alloc(10, 1));
  await assert.rejects(d.addBytes(105, Buffer.alloc(1, 1)), { code: 'ERR_INVALID_ARG' });
  await assert.rejects(d.addBytes(200, Buffer.alloc(20_000, 1)), { code: 'ERR_PROTOCOL' });
  await assert.rejects(d.digest(), { code: 'ERR_STREAM_STATE' });

  const f = fileWith(Buffer.alloc(DIGEST_PAGE, 3), 0);
  try {
    const e = new ParallelContentDigest(0, 4 * DIGEST_BLOCK, { workers });
    await e.addFile(0, 4 * DIGEST_BLOCK, f.fd, 0); // the file holds one page
    await assert.rejects(e.digest(), (err: { code?: string; message?: string }) => err.code === 'ERR_IO' && /shrank/.test(err.message ?? ''));
    // the workers still serve after a failed task
    const ok = new ParallelContentDigest(0, DIGEST_PAGE, { workers });
    await ok.addFile(0, DIGEST_PAGE, f.fd, 0);
    assert.equal(await ok.digest(), serial(Buffer.alloc(DIGEST_PAGE, 3), 0));
  } finally {
    closeSync(f.fd);
    rmSync(f.path);
  }
});

test('the daemon\'s readerContentDigest: file ranges read by the workers, ranges of fd-less files, data and holes; the reader closed after the workers', async () => {
  const size = 7 * DIGEST_BLOCK + 999;
  const content = Buffer.alloc(size);
  content.fill(4, 5000, 3 * DIGEST_BLOCK + 77);
  content.fill(8, 5 * DIGEST_BLOCK - 3, 5 * DIGEST_BLOCK + 12_345);
  content.fill(9, size - 500, size - 100);
  const shift = 3 * DIGEST_PAGE;
  const f = fileWith(content, shift);
  const offset = 12_288 + 5;
  const ref = fileRef(f.fd);
  const noFd: FileRef = { readInto: (o, target) => target.set(content.subarray(o - shift, o - shift + target.length)) };
  // volume positions: data, a file range, a hole, a range of a file without fd, a file range
  const p1 = offset + 1000;
  const p2 = p1 + 3 * DIGEST_BLOCK;
  const p3 = 5 * DIGEST_BLOCK - 77;
  const p4 = p3 + 2 * DIGEST_BLOCK;
  assert.ok(content.subarray(p2, p3).every((x) => x === 0));
  const batches: Array<Array<Chunk | FileRange>> = [
    [{ kind: 'data', bytes: content.subarray(offset, p1) }, { kind: 'file', file: ref, offset: shift + p1, length: p2 - p1 }],
    [{ kind: 'hole', length: p3 - p2 }],
    [{ kind: 'file', file: noFd, offset: shift + p3, length: p4 - p3 }],
    [{ kind: 'file', file: ref, offset: shift + p4, length: size - p4 }],
  ];
  let closed = false;
  const reader = {
    async *batches() {
      for (const b of batches) yield b;
    },
    async close() {
      closed = true;
      closeSync(f.fd);
    },
  };
  try {
    const r = await readerContentDigest(reader, offset, size - offset, { workers });
    assert.equal(r.digest, serial(content.subarray(offset), offset));
    assert.equal(closed, true);
  } finally {
    if (!closed) closeSync(f.fd);
    rmSync(f.path);
  }
});

test('the background pool\'s threads run at nice 10 (Linux), and digest the same', async (t) => {
  if (process.platform !== 'linux') return t.skip('per-thread nice values are read from /proc');
  const { digestWorkers, BACKGROUND_NICE } = await import('../src/digest-workers.js');
  const { readdirSync, readFileSync } = await import('node:fs');
  const niceOf = (tid: string): number => Number(readFileSync(`/proc/self/task/${tid}/stat`, 'utf8').split(') ')[1]!.split(' ')[16]);
  const before = new Set(readdirSync('/proc/self/task'));
  const content = Buffer.alloc(3 * DIGEST_BLOCK, 9);
  const d = new ParallelContentDigest(0, content.length, { workers: digestWorkers({ background: true }), taskBytes: DIGEST_BLOCK });
  await d.addBytes(0, content);
  assert.equal(await d.digest(), serial(content, 0));
  const niced = readdirSync('/proc/self/task').filter((tid) => !before.has(tid) && niceOf(tid) === BACKGROUND_NICE);
  assert.ok(niced.length >= 1, 'a thread at the background nice value');
  assert.equal(niceOf(String(process.pid)), 0, 'the main thread keeps its priority');
});
