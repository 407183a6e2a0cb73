import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import type { Chunk } from '../src/chunk.js';
import { ChunkReader, fileChunks, readExtents } from '../src/sparse/index.js';
import { emptyDir, layoutArb, layoutSize, scratchImages, sha256, sha256File } from './helpers/images.js';

const K = 4096;

async function collect(source: AsyncIterable<Chunk>): Promise<Chunk[]> {
  const out: Chunk[] = [];
  for await (const c of source) out.push(c);
  return out;
}

/** The bytes a chunk sequence stands for (holes as zeros). */
function flatten(chunks: Chunk[]): Buffer {
  return Buffer.concat(chunks.map((c) => (c.kind === 'data' ? c.bytes : Buffer.alloc(c.length))));
}

async function openFds(): Promise<number> {
  return (await fs.readdir('/proc/self/fd')).length;
}

for (const base of ['/tmp', '/dev/shm']) {
  describe(`fileChunks on ${base}`, () => {
    const { dir, image } = scratchImages(base);

    it('splits data at chunkSize and extent edges, one hole chunk per hole', async () => {
      const file = await image([{ kind: 'data', length: 10 * K }, { kind: 'hole', length: 8 * K }, { kind: 'data', length: K }, { kind: 'hole', length: 100 }]);
      const chunks = await collect(fileChunks(file, { chunkSize: 3 * K }));
      assert.deepEqual(chunks.map((c) => [c.kind, c.kind === 'data' ? c.bytes.length : c.length]), [
        ['data', 3 * K], ['data', 3 * K], ['data', 3 * K], ['data', K],
        ['hole', 8 * K],
        ['data', K],
        ['hole', 100],
      ]);
      assert.equal(sha256(flatten(chunks)), await sha256File(file));
    });

    it('property: chunks are valid, merged, and read back as the window', async () => {
      await fc.assert(
        fc.asyncProperty(layoutArb(), fc.nat(), fc.nat(), fc.constantFrom(512, 4097, 65536, 262120), fc.boolean(), async (layout, a, b, chunkSize, detectZeroes) => {
          const file = await image(layout);
          const size = layoutSize(layout);
          const offset = size ? a % (size + 1) : 0;
          const length = b % (size - offset + 2);
          const chunks = await collect(fileChunks(file, { offset, length, chunkSize, detectZeroes }));
          const extents = await readExtents(file, { offset, length, detectZeroes });
          for (const [i, c] of chunks.entries()) {
            if (c.kind === 'data') {
              assert.ok(c.bytes.length > 0 && c.bytes.length <= chunkSize, `data chunk ${i} of ${c.bytes.length} bytes`);
            } else {
              assert.ok(c.length > 0, `hole chunk ${i} is not empty`);
              assert.notEqual(chunks[i + 1]?.kind, 'hole', `hole chunk ${i} is merged with the next`);
            }
          }
          // One hole chunk per hole extent, of the same length.
          assert.deepEqual(
            chunks.flatMap((c) => (c.kind === 'hole' ? [c.length] : [])),
            extents.flatMap((e) => (e.kind === 'hole' ? [e.length] : [])),
          );
          assert.equal(sha256(flatten(chunks)), await sha256File(file, offset, length));
        }).afterEach(() => emptyDir(dir())),
        { numRuns: 40 },
      );
    });

    it('sparse: false materialises holes as zero data chunks, one shared buffer', async () => {
      const file = await image([{ kind: 'hole', length: 3 * K + 5 }, { kind: 'data', length: 10 }, { kind: 'hole', length: 2 * K }]);
      const chunks = await collect(fileChunks(file, { sparse: false, chunkSize: K }));
      assert.ok(chunks.every((c) => c.kind === 'data' && c.bytes.length > 0 && c.bytes.length <= K));
      assert.equal(sha256(flatten(chunks)), await sha256File(file));
      const zeroChunks = chunks.filter((c): c is Extract<Chunk, { kind: 'data' }> => c.kind === 'data' && c.bytes.every((x) => x === 0));
      assert.ok(zeroChunks.length >= 4);
      assert.ok(zeroChunks.every((c) => c.bytes.buffer === zeroChunks[0]!.bytes.buffer), 'no allocation per zero chunk');
    });

    it('detectZeroes reports written zeros as holes, merged with real holes', async () => {
      const file = await image([{ kind: 'data', length: K }, { kind: 'zero', length: 2 * K }, { kind: 'hole', length: 2 * K }, { kind: 'zero', length: K }, { kind: 'data', length: K }]);
      const chunks = await collect(fileChunks(file, { detectZeroes: true }));
      assert.deepEqual(chunks.map((c) => [c.kind, c.kind === 'data' ? c.bytes.length : c.length]), [['data', K], ['hole', 5 * K], ['data', K]]);
    });

    it('a ChunkReader knows its window before iterating, and is iterated once', async () => {
      const file = await image([{ kind: 'data', length: 100 }, { kind: 'hole', length: 900 }]);
      const reader = await ChunkReader.open(file, { offset: 50, length: 10_000 });
      assert.equal(reader.offset, 50);
      assert.equal(reader.end, 1000);
      assert.equal(reader.file.size, 1000);
      // The file's one block is data: its tail past byte 100 reads as written zeros.
      assert.deepEqual((await collect(reader)).map((c) => c.kind === 'data' && c.bytes.length), [950]);
      assert.throws(() => reader[Symbol.asyncIterator](), { code: 'ERR_STREAM_STATE' });
    });

    it('closes its fd at the end, on break and on an unused reader', async () => {
      const file = await image([{ kind: 'data', length: 20 * K }, { kind: 'hole', length: K }]);
      const before = await openFds();
      await collect(fileChunks(file, { chunkSize: K }));
      assert.equal(await openFds(), before, 'after the end');
      for await (const c of fileChunks(file, { chunkSize: K })) {
        assert.equal(c.kind, 'data');
        break;
      }
      assert.equal(await openFds(), before, 'after break');
      await (await ChunkReader.open(file)).close();
      assert.equal(await openFds(), before, 'after close()');
      // Never iterated: never opened.
      fileChunks(file)[Symbol.asyncIterator]();
      assert.equal(await openFds(), before, 'an unstarted iterator holds nothing');
    });

    it('stops with ERR_ABORTED when its signal fires', async () => {
      const file = await image([{ kind: 'data', length: 20 * K }]);
      const ac = new AbortController();
      const seen: Chunk[] = [];
      await assert.rejects(
        (async () => {
          for await (const c of fileChunks(file, { chunkSize: K, signal: ac.signal })) {
            seen.push(c);
            ac.abort(new Error('user'));
          }
        })(),
        (err: { code?: string; cause?: Error }) => err.code === 'ERR_ABORTED' && err.cause?.message === 'user',
      );
      assert.equal(seen.length, 1);
      await assert.rejects(collect(fileChunks(file, { signal: ac.signal })), { code: 'ERR_ABORTED' });
    });

    it('rejects bad options with ERR_INVALID_ARG', async () => {
      const file = await image([{ kind: 'data', length: 1 }]);
      await assert.rejects(collect(fileChunks(file, { chunkSize: 0 })), { code: 'ERR_INVALID_ARG' });
      await assert.rejects(collect(fileChunks(file, { offset: 1.5 })), { code: 'ERR_INVALID_ARG' });
      await assert.rejects(collect(fileChunks(file, { readAheadBytes: -1 })), { code: 'ERR_INVALID_ARG' });
    });
  });
}
