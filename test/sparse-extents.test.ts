import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { readExtents, type Extent } from '../src/sparse/index.js';
import { emptyDir, layoutArb, layoutSize, scratchImages } from './helpers/images.js';

const K = 4096;
const hole = (length: number): { kind: 'hole'; length: number } => ({ kind: 'hole', length });
const data = (length: number): { kind: 'data'; length: number } => ({ kind: 'data', length });
const zero = (length: number): { kind: 'zero'; length: number } => ({ kind: 'zero', length });

/** The invariants every map holds: ordered, contiguous, alternating, exactly covering [start, end). */
function assertWellFormed(extents: Extent[], start: number, end: number): void {
  let pos = start;
  for (const [i, e] of extents.entries()) {
    assert.equal(e.offset, pos, `extent ${i} starts where the last ended`);
    assert.ok(e.length > 0, `extent ${i} is not empty`);
    if (i > 0) assert.notEqual(e.kind, extents[i - 1]!.kind, `extents ${i - 1} and ${i} are merged`);
    pos += e.length;
  }
  assert.equal(pos, Math.max(start, end), 'the map covers the window exactly');
}

for (const base of ['/tmp', '/dev/shm']) {
  describe(`readExtents on ${base}`, () => {
    const { dir, image } = scratchImages(base);

    it('maps aligned data and holes exactly, the trailing hole from ENXIO included', async () => {
      const file = await image([hole(2 * K), data(K), hole(3 * K), data(2 * K), hole(5 * K)]);
      assert.deepEqual(await readExtents(file), [
        { offset: 0, length: 2 * K, kind: 'hole' },
        { offset: 2 * K, length: K, kind: 'data' },
        { offset: 3 * K, length: 3 * K, kind: 'hole' },
        { offset: 6 * K, length: 2 * K, kind: 'data' },
        { offset: 8 * K, length: 5 * K, kind: 'hole' },
      ]);
    });

    it('maps a hole-only file as one hole, an empty file as nothing', async () => {
      assert.deepEqual(await readExtents(await image([hole(10 * K + 5)])), [{ offset: 0, length: 10 * K + 5, kind: 'hole' }]);
      assert.deepEqual(await readExtents(await image([])), []);
    });

    it('maps a data-only file as one data extent', async () => {
      assert.deepEqual(await readExtents(await image([data(K + 1), data(3)])), [{ offset: 0, length: K + 4, kind: 'data' }]);
    });

    it('rounds data to whole filesystem blocks', async () => {
      // One byte at 5000 makes its whole block [4096, 8192) data; the file ends at 9000.
      const file = await image([hole(5000), data(1), hole(3999)]);
      assert.deepEqual(await readExtents(file), [
        { offset: 0, length: K, kind: 'hole' },
        { offset: K, length: K, kind: 'data' },
        { offset: 2 * K, length: 9000 - 2 * K, kind: 'hole' },
      ]);
    });

    it('clips to the window, and to the file size', async () => {
      const file = await image([hole(2 * K), data(K), hole(3 * K)]);
      assert.deepEqual(await readExtents(file, { offset: K + 7, length: 2 * K }), [
        { offset: K + 7, length: K - 7, kind: 'hole' },
        { offset: 2 * K, length: K, kind: 'data' },
        { offset: 3 * K, length: 7, kind: 'hole' },
      ]);
      assert.deepEqual(await readExtents(file, { offset: 2 * K + 1, length: 10 }), [{ offset: 2 * K + 1, length: 10, kind: 'data' }]);
      assert.deepEqual(await readExtents(file, { offset: 5 * K, length: 1 << 30 }), [{ offset: 5 * K, length: K, kind: 'hole' }]);
      assert.deepEqual(await readExtents(file, { offset: 100 * K }), []);
      assert.deepEqual(await readExtents(file, { offset: K, length: 0 }), []);
    });

    it('with detectZeroes, turns allocated zero blocks into holes', async () => {
      const file = await image([data(K), zero(3 * K), data(K), zero(K), hole(2 * K), zero(K)]);
      assert.deepEqual(await readExtents(file), [{ offset: 0, length: 6 * K, kind: 'data' }, { offset: 6 * K, length: 2 * K, kind: 'hole' }, { offset: 8 * K, length: K, kind: 'data' }]);
      assert.deepEqual(await readExtents(file, { detectZeroes: true }), [
        { offset: 0, length: K, kind: 'data' },
        { offset: K, length: 3 * K, kind: 'hole' },
        { offset: 4 * K, length: K, kind: 'data' },
        { offset: 5 * K, length: 4 * K, kind: 'hole' },
      ]);
    });

    it('with detectZeroes, only whole zero pieces of minRun bytes (aligned to the file) become holes', async () => {
      const file = await image([data(2 * K), zero(2 * K), data(K)]);
      assert.deepEqual(await readExtents(file, { detectZeroes: { minRun: 4 * K } }), [{ offset: 0, length: 5 * K, kind: 'data' }]);
      assert.deepEqual(await readExtents(file, { detectZeroes: { minRun: 2 * K } }), [
        { offset: 0, length: 2 * K, kind: 'data' },
        { offset: 2 * K, length: 2 * K, kind: 'hole' },
        { offset: 4 * K, length: K, kind: 'data' },
      ]);
      // Two zero blocks, but straddling two 8 KiB pieces: no piece is all zero.
      const unaligned = await image([data(K), zero(2 * K), data(K)]);
      assert.deepEqual(await readExtents(unaligned, { detectZeroes: { minRun: 2 * K } }), [{ offset: 0, length: 4 * K, kind: 'data' }]);
      await assert.rejects(readExtents(file, { detectZeroes: { minRun: 0 } }), { code: 'ERR_INVALID_ARG' });
    });

    it('rejects bad windows and missing files with stable codes', async () => {
      await assert.rejects(readExtents(path.join(dir(), 'missing')), { code: 'ERR_IO' });
      await assert.rejects(readExtents(dir()), { code: 'ERR_UNSUPPORTED' });
      const file = await image([data(1)]);
      await assert.rejects(readExtents(file, { offset: -1 }), { code: 'ERR_INVALID_ARG' });
      await assert.rejects(readExtents(file, { length: 2 ** 53 }), { code: 'ERR_INVALID_ARG' });
    });

    it('reads from a caller-owned fd without closing it', async () => {
      const file = await image([hole(K), data(K)]);
      const fh = await fs.open(file, 'r');
      try {
        assert.deepEqual(await readExtents({ fd: fh.fd }), [{ offset: 0, length: K, kind: 'hole' }, { offset: K, length: K, kind: 'data' }]);
        assert.equal((await fh.stat()).size, 2 * K, 'the fd is still open');
      } finally {
        await fh.close();
      }
    });

    it('property: any layout and window gives a well-formed map with every data byte in data', async () => {
      await fc.assert(
        fc.asyncProperty(layoutArb(), fc.nat(), fc.nat(), fc.boolean(), async (layout, a, b, detect) => {
          const file = await image(layout);
          const size = layoutSize(layout);
          const offset = size ? a % (size + 1) : 0;
          const length = b % (size - offset + 2);
          const extents = await readExtents(file, { offset, length, detectZeroes: detect });
          assertWellFormed(extents, offset, Math.min(size, offset + length));
          let pos = 0;
          for (const part of layout) {
            // A byte of a data run must lie in a data extent (zero runs may be either).
            for (const at of part.kind === 'data' ? [pos, pos + part.length - 1] : []) {
              if (at < offset || at >= offset + length) continue;
              const e = extents.find((x) => x.offset <= at && at < x.offset + x.length);
              assert.equal(e?.kind, 'data', `byte ${at} of a data run is in data`);
            }
            pos += part.length;
          }
        }).afterEach(() => emptyDir(dir())),
        { numRuns: 40 },
      );
    });
  });
}
