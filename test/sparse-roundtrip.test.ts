/**
 * File → fileChunks → (in-memory handoff) → writeChunks → file, over generated layouts, on ext4
 * (/tmp: 4 KiB blocks) and tmpfs (/dev/shm: 4 KiB pages): the copy must hold the same bytes as
 * the source window and allocate what the source allocates there, within a block per extent.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import { fileChunks, readExtents, writeChunks, type Extent } from '../src/sparse/index.js';
import {
  allocatedBytes, boundedPipe, emptyDir, expectedAllocation, fsBlockSize, layoutArb, layoutSize, makeFilledFile, makeImage,
  randomBytes, scratchDir, sha256, sha256File,
} from './helpers/images.js';

const TiB = 2 ** 40;

for (const base of ['/tmp', '/dev/shm']) {
  describe(`sparse copy on ${base}`, () => {
    let dir = '';
    let blockSize = 4096;
    before(async () => {
      dir = await scratchDir(base);
      blockSize = await fsBlockSize(dir);
    });
    after(() => fs.rm(dir, { recursive: true, force: true }));

    it('property: the copy of a window has its bytes and its allocation, into a new or a used target', async () => {
      let run = 0;
      await fc.assert(
        fc.asyncProperty(
          layoutArb({ maxParts: 14 }),
          fc.nat(),
          fc.nat(),
          fc.constantFrom(4096, 65536, 262120),
          fc.option(fc.integer({ min: 1, max: 2_000_000 })),
          fc.boolean(),
          fc.boolean(),
          async (layout, a, b, chunkSize, prefill, truncate, piped) => {
            const src = path.join(dir, `src${run}`);
            const dst = path.join(dir, `dst${run++}`);
            await makeImage(src, layout, run);
            const size = layoutSize(layout);
            const offset = size ? a % (size + 1) : 0;
            const length = Math.min(b % (size - offset + 2), size - offset);
            if (prefill !== null) await makeFilledFile(dst, prefill, run);

            const chunks = fileChunks(src, { offset, length, chunkSize });
            const r = await writeChunks(dst, piped ? boundedPipe(chunks, 3) : chunks, { truncate });
            assert.equal(r.dataBytes + r.holeBytes, length);

            // Bytes: the window, then what is left of a longer old target unless truncated.
            const window = (await fs.readFile(src)).subarray(offset, offset + length);
            const kept = prefill !== null && !truncate && prefill > length ? randomBytes(run, prefill).subarray(length) : Buffer.alloc(0);
            assert.equal(await sha256File(dst), sha256(window, kept), 'the copy reads as the window');

            // Allocation: the blocks the source's data extents touch, moved to offset 0, plus the
            // kept tail. Slack: one block where the old target ended inside a hole (punching part
            // of a block zeroes it but keeps it), and on ext4 the extent-tree blocks a file with
            // more than the inode's 4 extents needs (340 extents each).
            const srcExtents = await readExtents(src, { offset, length });
            const touched: Extent[] = srcExtents.map((e) => ({ ...e, offset: e.offset - offset }));
            if (kept.length > 0) touched.push({ offset: length, length: kept.length, kind: 'data' });
            const expected = expectedAllocation(touched, 0, blockSize);
            const actual = await allocatedBytes(dst);
            const dataExtents = touched.filter((e) => e.kind === 'data').length;
            const slack = blockSize * (1 + (dataExtents > 4 ? Math.ceil(dataExtents / 340) : 0));
            assert.ok(
              Math.abs(actual - expected) <= slack,
              `allocated ${actual}, expected ${expected} ± ${slack}; source extents ${JSON.stringify(srcExtents)}`,
            );
          },
        ).afterEach(() => emptyDir(dir)),
        { numRuns: 60 },
      );
    });

    it('copies a 1 TiB all-hole file in well under a second, still unallocated', async () => {
      const src = path.join(dir, 'tera');
      const dst = path.join(dir, 'tera-copy');
      const fh = await fs.open(src, 'w');
      await fh.truncate(TiB);
      await fh.close();
      const t0 = performance.now();
      const r = await writeChunks(dst, fileChunks(src));
      const elapsed = performance.now() - t0;
      assert.deepEqual(r, { dataBytes: 0, holeBytes: TiB });
      assert.ok(elapsed < 1000, `took ${elapsed} ms`);
      assert.equal((await fs.stat(dst)).size, TiB);
      assert.equal(await allocatedBytes(dst), 0);
      assert.deepEqual(await readExtents(dst), [{ offset: 0, length: TiB, kind: 'hole' }]);
    });

    it('copies a 1 TiB file with data at both ends and in the middle', async () => {
      const src = path.join(dir, 'tera2');
      const dst = path.join(dir, 'tera2-copy');
      const bits = [0, TiB / 2 + 12345, TiB - 3].map((at, i) => ({ at, bytes: randomBytes(i + 40, 3) }));
      const fh = await fs.open(src, 'w');
      for (const { at, bytes } of bits) await fh.write(bytes, 0, bytes.length, at);
      await fh.close();
      const r = await writeChunks(dst, fileChunks(src));
      assert.equal(r.dataBytes + r.holeBytes, TiB);
      assert.ok(r.dataBytes <= 3 * blockSize);
      const out = await fs.open(dst, 'r');
      try {
        for (const { at, bytes } of bits) {
          const back = Buffer.alloc(3);
          await out.read(back, 0, 3, at);
          assert.deepEqual(back, bytes);
        }
      } finally {
        await out.close();
      }
      assert.ok(await allocatedBytes(dst) <= 4 * blockSize);
    });
  });
}
