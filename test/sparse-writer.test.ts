import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { describe, it } from 'node:test';
import type { Chunk } from '../src/chunk.js';
import { SparseWriter, writeChunks } from '../src/sparse/index.js';
import { allocatedBytes, makeFilledFile, randomBytes, scratchFiles, sha256, sha256File } from './helpers/images.js';

const K = 4096;
const MiB = 1 << 20;

async function* chunksOf(...chunks: Chunk[]): AsyncGenerator<Chunk> {
  yield* chunks;
}
const data = (bytes: Buffer): Chunk => ({ kind: 'data', bytes });
const hole = (length: number): Chunk => ({ kind: 'hole', length });

for (const base of ['/tmp', '/dev/shm']) {
  describe(`writeChunks on ${base}`, () => {
    const { dir, target } = scratchFiles(base);

    it('creates the target and writes data and holes, holes unallocated', async () => {
      const file = target();
      const a = randomBytes(1, 5000);
      const b = randomBytes(2, 3 * K);
      const r = await writeChunks(file, chunksOf(data(a), hole(MiB), data(b), hole(2 * MiB)));
      assert.deepEqual(r, { dataBytes: 5000 + 3 * K, holeBytes: 3 * MiB });
      assert.equal((await fs.stat(file)).size, 5000 + 3 * K + 3 * MiB, 'the trailing hole sets the size');
      assert.equal(await sha256File(file), sha256(a, Buffer.alloc(MiB), b, Buffer.alloc(2 * MiB)));
      // 5000 bytes at 0 touch 2 blocks; 12 KiB at 1 MiB + 5000 touch 4.
      assert.ok(await allocatedBytes(file) <= 6 * K + K, `allocated ${await allocatedBytes(file)}`);
    });

    it('creates the target with mode 0644 less the umask', async () => {
      const file = target();
      const old = process.umask(0o027);
      try {
        await writeChunks(file, chunksOf(data(Buffer.from('x'))));
      } finally {
        process.umask(old);
      }
      assert.equal((await fs.stat(file)).mode & 0o777, 0o640);
    });

    it('a hole over old data reads as zeros and is deallocated', async () => {
      const file = target();
      await makeFilledFile(file, 4 * MiB, 9);
      const before = await allocatedBytes(file);
      const head = randomBytes(3, 100);
      await writeChunks(file, chunksOf(data(head), hole(3 * MiB - 100)));
      const old = await fs.readFile(file);
      assert.equal(old.length, 4 * MiB, 'not shrunk');
      assert.equal(sha256(old.subarray(0, 3 * MiB)), sha256(head, Buffer.alloc(3 * MiB - 100)));
      assert.equal(sha256(old.subarray(3 * MiB)), sha256(randomBytes(9, 4 * MiB).subarray(3 * MiB)), 'the rest is untouched');
      const now = await allocatedBytes(file);
      assert.ok(before - now >= 3 * MiB - K, `the hole released its blocks (${before} → ${now})`);
    });

    it('never shrinks a longer target; truncate: true does', async () => {
      const file = target();
      await makeFilledFile(file, 3 * MiB, 4);
      await writeChunks(file, chunksOf(data(randomBytes(5, 10)), hole(20)));
      assert.equal((await fs.stat(file)).size, 3 * MiB);
      const r = await writeChunks(file, chunksOf(data(randomBytes(5, 10)), hole(K + 20)), { truncate: true });
      assert.deepEqual(r, { dataBytes: 10, holeBytes: K + 20 });
      assert.equal((await fs.stat(file)).size, K + 30);
      assert.equal(await sha256File(file), sha256(randomBytes(5, 10), Buffer.alloc(K + 20)));
      assert.ok(await allocatedBytes(file) <= K, 'truncate left nothing of the old data allocated');
    });

    it('writes at an offset, leaving what is around it untouched', async () => {
      const file = target();
      await makeFilledFile(file, 64 * K, 6);
      const old = randomBytes(6, 64 * K);
      const mid = randomBytes(7, 3 * K + 1);
      await writeChunks(file, chunksOf(data(mid), hole(2 * K), data(mid)), { offset: 10 * K + 3 });
      const end = 10 * K + 3 + 2 * mid.length + 2 * K;
      assert.equal(await sha256File(file), sha256(old.subarray(0, 10 * K + 3), mid, Buffer.alloc(2 * K), mid, old.subarray(end)));
      // Past the end of the target the size grows to cover a trailing hole.
      await writeChunks(file, chunksOf(hole(5)), { offset: 64 * K + 10 });
      assert.equal((await fs.stat(file)).size, 64 * K + 15);
    });

    it('coalesces many small chunks, across the batch limit', async () => {
      const file = target();
      const pieces = Array.from({ length: 3000 }, (_, i) => randomBytes(i + 1, 1 + (i % 1000)));
      const r = await writeChunks(file, chunksOf(...pieces.map(data)));
      assert.equal(r.dataBytes, pieces.reduce((s, p) => s + p.length, 0));
      assert.equal(await sha256File(file), sha256(...pieces));
    });

    it('SparseWriter: write, position, close; no writes after close', async () => {
      const file = target();
      const w = await SparseWriter.open(file, { offset: 7, sync: true });
      await w.write(data(Buffer.from('abc')));
      await w.write(hole(4));
      await w.write(data(Buffer.alloc(0)));
      assert.equal(w.position, 14);
      assert.deepEqual(await w.close(), { dataBytes: 3, holeBytes: 4 });
      assert.deepEqual(await fs.readFile(file), Buffer.from('\0\0\0\0\0\0\0abc\0\0\0\0'));
      await assert.rejects(w.write(hole(1)), { code: 'ERR_STREAM_STATE' });
    });

    it('wraps I/O errors as ERR_IO with the path', async () => {
      await assert.rejects(writeChunks(path.join(dir(), 'no', 'such', 'dir'), chunksOf()), (err: { code?: string; message: string }) =>
        err.code === 'ERR_IO' && err.message.includes('no/such/dir'));
      await assert.rejects(writeChunks(dir(), chunksOf()), { code: 'ERR_IO' });
      await assert.rejects(writeChunks(target(), chunksOf(hole(-1))), { code: 'ERR_INVALID_ARG' });
    });

    it('an abort stops a stalled source, returns it, and rejects with ERR_ABORTED', async () => {
      const file = target();
      const ac = new AbortController();
      let returned = false;
      const stalled: AsyncIterable<Chunk> = {
        [Symbol.asyncIterator]: () => {
          let first = true;
          return {
            next: () => {
              if (first) {
                first = false;
                return Promise.resolve({ done: false, value: data(Buffer.from('x')) });
              }
              setTimeout(() => ac.abort(new Error('stop')), 10);
              return new Promise<IteratorResult<Chunk>>(() => undefined);
            },
            return: () => {
              returned = true;
              return Promise.resolve({ done: true, value: undefined });
            },
          };
        },
      };
      await assert.rejects(writeChunks(file, stalled, { signal: ac.signal }), { code: 'ERR_ABORTED' });
      assert.ok(returned, 'the source was returned');
    });

    it('abort() writes the data it holds (and not what it was never given); the size is left as is', async () => {
      const file = target();
      const a = randomBytes(3, 3000);
      const b = randomBytes(4, 5000);
      const w = await SparseWriter.open(file);
      await w.write(data(a));
      await w.write(hole(K));
      await w.write(data(b));
      // a hole ends a batch (a is written); b, small, waits in the batch until more comes or the end
      assert.equal((await fs.stat(file)).size, 3000);
      await w.abort();
      assert.deepEqual(await fs.readFile(file), Buffer.concat([a, Buffer.alloc(K), b]));
      await assert.rejects(w.write(hole(1)), { code: 'ERR_STREAM_STATE' });
    });

    it('a failing source is passed through and the fd released', async () => {
      const fdsBefore = (await fs.readdir('/proc/self/fd')).length;
      async function* failing(): AsyncGenerator<Chunk> {
        yield data(Buffer.from('x'));
        throw new Error('source broke');
      }
      await assert.rejects(writeChunks(target(), failing()), { message: 'source broke' });
      assert.equal((await fs.readdir('/proc/self/fd')).length, fdsBefore);
    });
  });
}
