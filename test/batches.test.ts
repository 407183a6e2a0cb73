// Batches: the chunk pipeline with one promise per batch instead of one per chunk.
// fileSendBatches → Stream.sendBatch → WireStream.send on one side, Stream.recvBatch /
// batchesInPlace → SparseWriter.writeBatch on the other; each checked against the per-chunk path.
import assert from 'node:assert/strict';
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { chunkLength, readFileRange, type Chunk, type FileRange, type WrittenRange } from '../src/chunk.js';
import { SparsevirtError } from '../src/errors.js';
import { ChunkReader, SparseWriter, fileRef, fileSendBatches, fileSendChunks, writeChunks } from '../src/sparse/index.js';
import { kDeliver, kDeliverEnd, Stream, type StreamChannel } from '../src/stream/index.js';
import { code, hasSettled } from './helpers/asserts.js';
import { allocatedBytes, extentMap, makeFilledFile, makeImage, randomBytes, scratchDir, scratchFiles, sha256, sha256File, type Layout } from './helpers/images.js';
import { peerPair, serveDownloads, startDownload } from './helpers/peers.js';

const K = 4096;
const MiB = 1 << 20;

type Item = Chunk | FileRange;

/** The bytes and holes a sequence of items stands for, as one comparable list (adjacent holes merged). */
function shape(items: Iterable<Item | WrittenRange>): Array<[string, number, string?]> {
  const out: Array<[string, number, string?]> = [];
  for (const c of items) {
    if (c.kind === 'hole') {
      const last = out[out.length - 1];
      if (last?.[0] === 'hole') last[1] += c.length;
      else out.push(['hole', c.length]);
    } else {
      const bytes = c.kind === 'data' ? c.bytes : readFileRange(c);
      out.push(['data', bytes.length, sha256(bytes)]);
    }
  }
  return out;
}

/** Many small extents: `n` × 4 KiB of data, each after a 8 KiB hole, and a trailing hole. */
function fragmented(n: number): Layout {
  const layout: Layout = [];
  for (let i = 0; i < n; i++) layout.push({ kind: 'hole', length: 2 * K }, { kind: 'data', length: K });
  layout.push({ kind: 'hole', length: MiB });
  return layout;
}

/** SHA-256 of the data extents of `map` in `file`. */
async function dataDigest(file: string, map: Array<{ kind: string; offset: number; length: number }>): Promise<string> {
  const fh = await fs.open(file, 'r');
  try {
    const parts: Buffer[] = [];
    for (const e of map) {
      if (e.kind !== 'data') continue;
      const buf = Buffer.alloc(e.length);
      await fh.read(buf, 0, e.length, e.offset);
      parts.push(buf);
    }
    return sha256(...parts);
  } finally {
    await fh.close();
  }
}

for (const base of ['/tmp', '/dev/shm']) {
  describe(`fileSendBatches on ${base}`, () => {
    let dir = '';
    before(async () => {
      dir = await scratchDir(base);
    });
    after(() => fs.rm(dir, { recursive: true, force: true }));

    it('the same chunks as fileSendChunks, in batches of at most 1,024', async () => {
      const file = path.join(dir, 'frag.img');
      await makeImage(file, fragmented(3000), 3);
      const batches: Item[][] = [];
      for await (const b of fileSendBatches(file)) {
        assert.ok(b.length > 0 && b.length <= 1024, `batch of ${b.length}`);
        // a batch's ranges are valid until the next next(): read them now
        batches.push(b.map((c) => (c.kind === 'file' ? { kind: 'data', bytes: readFileRange(c) } : c)));
      }
      assert.ok(batches.length >= 6, `${batches.length} batches for 6,001 chunks`);
      const single: Item[] = [];
      for await (const c of fileSendChunks(file)) single.push(c.kind === 'file' ? { kind: 'data', bytes: readFileRange(c) } : c);
      assert.deepEqual(shape(batches.flat()), shape(single));
      assert.equal(single.length, 6001);
      // and what they stand for is the file
      const content = Buffer.concat(batches.flat().map((c) => (c.kind === 'data' ? c.bytes : Buffer.alloc(chunkLength(c)))));
      assert.equal(sha256(content), await sha256File(file));
    });

    it('an empty window gives no batch, also of a file without one block', async () => {
      const file = path.join(dir, 'empty-window.img');
      await makeImage(file, [{ kind: 'hole', length: 1 }], 7);
      for (const opts of [{ length: 0 }, { offset: 1 }]) {
        const got: Item[][] = [];
        for await (const b of fileSendBatches(file, opts)) got.push(b);
        assert.deepEqual(got, [], JSON.stringify(opts));
      }
    });

    it('holds about readAheadBytes of read data per batch, whatever the file', async () => {
      const file = path.join(dir, 'dense.img');
      await makeFilledFile(file, 8 * MiB, 4);
      const reader = await ChunkReader.open(file, { readAheadBytes: MiB });
      const it = reader.batches();
      let total = 0;
      for (let r = await it.next(); !r.done; r = await it.next()) {
        const bytes = r.value.reduce((n, c) => n + chunkLength(c), 0);
        assert.ok(bytes <= MiB + 262120, `a batch of ${bytes} bytes`);
        total += bytes;
      }
      assert.equal(total, 8 * MiB);
    });

    it('a batch of file ranges stands for about readAheadBytes too', async () => {
      const file = path.join(dir, 'dense2.img');
      await makeFilledFile(file, 8 * MiB, 14);
      let total = 0;
      for await (const b of fileSendBatches(file, { readAheadBytes: MiB })) {
        const bytes = b.reduce((n, c) => n + chunkLength(c), 0);
        assert.ok(bytes <= MiB + 262120, `a batch of ${bytes} bytes`);
        total += bytes;
      }
      assert.equal(total, 8 * MiB);
    });

    it('answers overlapping next() calls in order', async () => {
      const file = path.join(dir, 'frag3.img');
      await makeImage(file, fragmented(1500), 15);
      // (ranges are compared by place: their fd is closed once the iteration ended)
      const key = (c: Item): string => (c.kind === 'file' ? `file ${c.offset}+${c.length}` : c.kind === 'hole' ? `hole ${c.length}` : `data ${sha256(c.bytes)}`);
      const seq: string[] = [];
      for await (const c of fileSendChunks(file)) seq.push(key(c));
      const it = fileSendChunks(file)[Symbol.asyncIterator]();
      // all asked for at once: each answer must be the next chunk, none skipped or repeated
      const results = await Promise.all(Array.from({ length: seq.length + 2 }, () => it.next()));
      const got = results.filter((r) => !r.done).map((r) => key(r.value as Item));
      assert.equal(got.length, seq.length);
      assert.equal(results.slice(seq.length).every((r) => r.done), true);
      assert.deepEqual(got, seq);
    });

    it('a hole sent as zeros (sparse: false) fills batches of at most 1,024 chunks', async () => {
      const file = path.join(dir, 'hole.img');
      await makeImage(file, [{ kind: 'data', length: K }, { kind: 'hole', length: 64 * MiB }], 5);
      let chunks = 0;
      let bytes = 0;
      let batches = 0;
      for await (const b of fileSendBatches(file, { sparse: false, chunkSize: K })) {
        assert.ok(b.length <= 1024);
        batches++;
        for (const c of b) {
          assert.notEqual(c.kind, 'hole');
          chunks++;
          bytes += chunkLength(c);
        }
      }
      assert.equal(bytes, K + 64 * MiB);
      assert.equal(chunks, 1 + 16384);
      assert.ok(batches >= 17, `${batches} batches`);
    });

    it('stops with ERR_ABORTED when its signal fires, between batches and between chunks', async () => {
      const file = path.join(dir, 'frag2.img');
      await makeImage(file, fragmented(3000), 6);
      const ac = new AbortController();
      let seen = 0;
      await assert.rejects((async () => {
        for await (const b of fileSendBatches(file, { signal: ac.signal })) {
          seen += b.length;
          ac.abort(new Error('user'));
        }
      })(), (err: { code?: string; cause?: Error }) => err.code === 'ERR_ABORTED' && err.cause?.message === 'user');
      assert.ok(seen > 0 && seen <= 1024);
      const ac2 = new AbortController();
      const single: Item[] = [];
      await assert.rejects((async () => {
        for await (const c of fileSendChunks(file, { signal: ac2.signal })) {
          single.push(c);
          ac2.abort(new Error('user'));
        }
      })(), code('ERR_ABORTED'));
      assert.equal(single.length, 1, 'the flattened iterator stops at the next chunk, inside a batch');
    });
  });
}

/** A channel that records what it gets; `send` (the fast path) is optional. */
class Recorder implements StreamChannel {
  readonly got: Array<Chunk> = [];
  readonly calls: string[] = [];
  gate: (() => Promise<void> | null) | null = null;
  failWith: Error | null = null;
  constructor(fast: boolean) {
    if (!fast) this.send = undefined;
  }
  send?: (item: Item) => Promise<void> | null = (item) => {
    this.calls.push('send');
    if (this.failWith) throw this.failWith;
    this.got.push(item.kind === 'file' ? { kind: 'data', bytes: readFileRange(item) } : item);
    return this.gate?.() ?? null;
  };
  write(chunk: Chunk): Promise<void> {
    this.calls.push('write');
    this.got.push(chunk);
    return Promise.resolve();
  }
  finish(): Promise<void> {
    this.calls.push('finish');
    return Promise.resolve();
  }
  abort(): Promise<void> {
    this.calls.push('abort');
    return Promise.resolve();
  }
  pauseIncoming(): void {}
  resumeIncoming(): void {}
}

describe('Stream.sendBatch', () => {
  let dir = '';
  let file = '';
  let fd: fs.FileHandle;
  before(async () => {
    dir = await scratchDir('/dev/shm');
    file = path.join(dir, 'src');
    await fs.writeFile(file, randomBytes(7, 64 * K));
    fd = await fs.open(file, 'r');
  });
  after(async () => {
    await fd.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  for (const fast of [true, false]) {
    it(`hands over data, ranges and merged holes in order (${fast ? 'send' : 'write'} path)`, async () => {
      const ch = new Recorder(fast);
      const s = new Stream(ch, { sparse: true, direction: 'send' });
      const a = randomBytes(8, 100);
      await s.sendBatch([{ kind: 'hole', length: 10 }, { kind: 'hole', length: 5 }, { kind: 'data', bytes: a }, { kind: 'file', file: fileRef(fd.fd), offset: K, length: 2 * K }]);
      await s.sendBatch([{ kind: 'hole', length: 7 }]);
      await s.sendBatch([{ kind: 'hole', length: 1 }, { kind: 'data', bytes: Buffer.alloc(0) }, { kind: 'data', bytes: a }]);
      await s.finish();
      assert.deepEqual(shape(ch.got), shape([
        { kind: 'hole', length: 15 }, { kind: 'data', bytes: a }, { kind: 'data', bytes: (await fs.readFile(file)).subarray(K, 3 * K) },
        { kind: 'hole', length: 8 }, { kind: 'data', bytes: a },
      ]));
      assert.equal(ch.got.filter((c) => c.kind === 'hole').length, 2, 'holes merged across items and batches');
      assert.equal(ch.calls.includes(fast ? 'write' : 'send'), false);
      assert.equal(s.position, 15 + 100 + 2 * K + 8 + 100);
    });
  }

  it('sends holes as zeros on a stream that is not sparse', async () => {
    const ch = new Recorder(true);
    const s = new Stream(ch, { sparse: false, direction: 'send' });
    await s.sendBatch([{ kind: 'data', bytes: Buffer.from('ab') }, { kind: 'hole', length: 3 * MiB }]);
    assert.equal(ch.got.every((c) => c.kind === 'data'), true);
    const all = Buffer.concat(ch.got.map((c) => (c as { bytes: Buffer }).bytes));
    assert.equal(all.length, 2 + 3 * MiB);
    assert.ok(all.subarray(2).every((b) => b === 0));
  });

  it('awaits only what the channel asks it to', async () => {
    const ch = new Recorder(true);
    let release!: () => void;
    let waits = 0;
    ch.gate = () => (ch.got.length === 2 ? new Promise<void>((r) => { waits++; release = r; }) : null);
    const s = new Stream(ch, { sparse: true, direction: 'send' });
    const items: Item[] = [1, 2, 3, 4].map((i) => ({ kind: 'data', bytes: Buffer.from([i]) }));
    const p = s.sendBatch(items);
    assert.equal(await hasSettled(p), false, 'waits on the second item');
    assert.equal(ch.got.length, 2);
    release();
    await p;
    assert.equal(ch.got.length, 4);
    assert.equal(waits, 1);
  });

  it('a channel that throws fails the stream with its error', async () => {
    const ch = new Recorder(true);
    const lost = new SparsevirtError('ERR_CONNECTION_CLOSED', 'connection closed');
    ch.failWith = lost;
    const s = new Stream(ch, { sparse: true, direction: 'send' });
    await assert.rejects(s.sendBatch([{ kind: 'data', bytes: Buffer.from('a') }]), (e) => e === lost);
    assert.equal(s.state, 'failed');
    await assert.rejects(s.sendBatch([{ kind: 'data', bytes: Buffer.from('b') }]), (e) => e === lost);
    await assert.rejects(s.finish(), (e) => e === lost);
  });

  it('a file range that cannot be read fails the stream (channel without send)', async () => {
    const ch = new Recorder(false);
    const s = new Stream(ch, { sparse: true, direction: 'send' });
    await assert.rejects(s.sendBatch([{ kind: 'file', file: fileRef(2 ** 30), offset: 0, length: 10 }]), (e: NodeJS.ErrnoException) => e.code === 'EBADF');
    assert.equal(s.state, 'failed');
    await assert.rejects(s.sendBatch([{ kind: 'data', bytes: Buffer.from('a') }]), (e: NodeJS.ErrnoException) => e.code === 'EBADF');
  });

  it('sendFileRange refuses a bad file, offset or length, and names it (fileRef a bad fd)', async () => {
    const s = new Stream(new Recorder(true), { sparse: true, direction: 'send' });
    assert.throws(() => fileRef(-1), /fd must be a non-negative integer, got -1/);
    await assert.rejects(s.sendFileRange(3 as unknown as ReturnType<typeof fileRef>, 0, 1), /file must be a file reference/);
    await assert.rejects(s.sendFileRange(fileRef(3), 1.5, 1), /offset must be a non-negative integer, got 1.5/);
    await assert.rejects(s.sendFileRange(fileRef(3), 0, 2 ** 53), /length must be a non-negative integer/);
    assert.equal(s.state, 'open');
  });

  it('refuses what is not an array of chunks and ranges', async () => {
    const s = new Stream(new Recorder(true), { sparse: true, direction: 'send' });
    await assert.rejects(s.sendBatch({ kind: 'hole', length: 1 } as unknown as Chunk[]), code('ERR_INVALID_ARG'));
    await assert.rejects(s.sendBatch([null as unknown as Chunk]), code('ERR_INVALID_ARG'));
    await assert.rejects(s.sendBatch([{ kind: 'hole', length: -1 }]), code('ERR_INVALID_ARG'));
    await assert.rejects(s.sendBatch([{ kind: 'file', file: {} as ReturnType<typeof fileRef>, offset: 0, length: 1 }]), code('ERR_INVALID_ARG'));
    await assert.rejects(s.sendBatch([{ kind: 'data', bytes: 'x' as unknown as Buffer }]), code('ERR_INVALID_ARG'));
  });
});

describe('Stream.recvBatch and batchesInPlace', () => {
  it('recvBatch takes everything queued, holes merged, at most max; null at EOF', async () => {
    const ch = new Recorder(true);
    const s = new Stream(ch, { sparse: true, direction: 'recv' });
    const a = Buffer.from('abc');
    s[kDeliver]({ kind: 'data', bytes: a });
    s[kDeliver]({ kind: 'hole', length: 4 });
    s[kDeliver]({ kind: 'hole', length: 6 });
    s[kDeliver]({ kind: 'data', bytes: a });
    s[kDeliver]({ kind: 'data', bytes: a });
    assert.deepEqual(await s.recvBatch(2), [{ kind: 'data', bytes: a }, { kind: 'hole', length: 10 }]);
    const rest = s.recvBatch();
    assert.deepEqual(await rest, [{ kind: 'data', bytes: a }, { kind: 'data', bytes: a }]);
    const waiting = s.recvBatch();
    assert.equal(await hasSettled(waiting), false, 'waits for something to arrive');
    s[kDeliver]({ kind: 'hole', length: 1 });
    assert.deepEqual(await waiting, [{ kind: 'hole', length: 1 }]);
    s[kDeliverEnd]();
    assert.equal(await s.recvBatch(), null);
    assert.equal(s.position, 3 + 10 + 3 + 3 + 1);
    await assert.rejects(s.recvBatch(0), code('ERR_INVALID_ARG'));
  });

  it('batchesInPlace: a consumer that fails on the last batch aborts the stream, not acknowledges it', async () => {
    const ch = new Recorder(true);
    const s = new Stream(ch, { sparse: true, direction: 'recv' });
    s[kDeliver]({ kind: 'data', bytes: Buffer.from('abc') });
    s[kDeliverEnd]();
    await assert.rejects((async () => {
      for await (const b of s.batchesInPlace()) {
        assert.equal(b.length, 1);
        throw new Error('disk full');
      }
    })(), /disk full/);
    assert.deepEqual(ch.calls, ['abort']);
    assert.equal(s.state, 'aborted');
  });

  it('batchesInPlace yields arrays and acknowledges EOF', async () => {
    const ch = new Recorder(true);
    const s = new Stream(ch, { sparse: true, direction: 'recv' });
    for (let i = 0; i < 3000; i++) s[kDeliver]({ kind: i % 2 ? 'hole' : 'data', ...(i % 2 ? { length: 2 } : { bytes: Buffer.from([i & 0xff]) }) } as Chunk);
    s[kDeliverEnd]();
    const sizes: number[] = [];
    let total = 0;
    for await (const b of s.batchesInPlace()) {
      sizes.push(b.length);
      total += b.reduce((n, c) => n + chunkLength(c), 0);
    }
    assert.deepEqual(sizes, [1024, 1024, 952]);
    assert.equal(total, 1500 + 1500 * 2);
    assert.deepEqual(ch.calls, ['finish']);
    assert.equal(s.state, 'finished');
  });
});

for (const base of ['/tmp', '/dev/shm']) {
  describe(`SparseWriter.writeBatch on ${base}`, () => {
    const { target } = scratchFiles(base);

    it('writes data and punches holes over old data, as write() does', async () => {
      const file = target();
      await makeFilledFile(file, 8 * MiB, 9);
      const a = randomBytes(10, 5000);
      const b = randomBytes(11, 3 * MiB); // more than one write's batch: some go to the thread pool
      const pieces: Chunk[] = [];
      for (let off = 0; off < b.length; off += 64 * K) pieces.push({ kind: 'data', bytes: b.subarray(off, off + 64 * K) });
      const w = await SparseWriter.open(file);
      await w.writeBatch([{ kind: 'data', bytes: a }, { kind: 'hole', length: MiB }, ...pieces]);
      await w.writeBatch([{ kind: 'hole', length: 2 * MiB }]);
      const r = await w.close();
      assert.deepEqual(r, { dataBytes: 5000 + 3 * MiB, holeBytes: 3 * MiB });
      const old = await fs.readFile(file).then((all) => all.subarray(5000 + 6 * MiB));
      assert.equal(await sha256File(file), sha256(a, Buffer.alloc(MiB), b, Buffer.alloc(2 * MiB), old));
      const allocated = await allocatedBytes(file);
      const expected = 8 * MiB - 3 * MiB;
      assert.ok(Math.abs(allocated - expected) <= 3 * K, `allocated ${allocated}, expected about ${expected}`);
    });

    it('keeps at most 2 MiB in flight (or one larger write alone), also when a flush and a large chunk meet', async () => {
      const file = target();
      const pending = randomBytes(16, 600 * 1024);
      const big = randomBytes(17, 4 * MiB);
      let inFlight = 0;
      let most = 0;
      const writev = fsSync.writev;
      (fsSync as { writev: unknown }).writev = (fd: number, bufs: Buffer[], pos: number, cb: (err: Error | null, n: number) => void) => {
        const n = bufs.reduce((a, b) => a + b.length, 0);
        inFlight += n;
        most = Math.max(most, inFlight);
        writev(fd, bufs, pos, (err, w) => setTimeout(() => {
          inFlight -= n;
          cb(err, w);
        }, 5));
      };
      try {
        const w = await SparseWriter.open(file);
        await w.writeBatch([{ kind: 'data', bytes: pending }, { kind: 'data', bytes: big }, { kind: 'data', bytes: pending }]);
        await w.close();
      } finally {
        (fsSync as { writev: unknown }).writev = writev;
      }
      assert.equal(await sha256File(file), sha256(pending, big, pending));
      assert.ok(most > 0, 'large writes went to the thread pool');
      assert.ok(most <= 4 * MiB, `at most ${most} bytes in flight`);
    });

    it('writeChunks takes batches, mixed with single chunks', async () => {
      const file = target();
      const a = randomBytes(12, 3 * K);
      async function* source(): AsyncGenerator<Chunk | Chunk[]> {
        yield [{ kind: 'hole', length: MiB }, { kind: 'data', bytes: a }];
        yield { kind: 'hole', length: K };
        yield [{ kind: 'data', bytes: a }, { kind: 'hole', length: 2 * MiB }];
      }
      const r = await writeChunks(file, source());
      assert.deepEqual(r, { dataBytes: 6 * K, holeBytes: 3 * MiB + K });
      assert.equal(await sha256File(file), sha256(Buffer.alloc(MiB), a, Buffer.alloc(K), a, Buffer.alloc(2 * MiB)));
      assert.ok(await allocatedBytes(file) <= 6 * K + 2 * K, `allocated ${await allocatedBytes(file)}`);
    });

    it('a range written in place must be at the position', async () => {
      const file = target();
      const w = await SparseWriter.open(file);
      await assert.rejects(w.writeBatch([{ kind: 'data', bytes: Buffer.from('x') }, { kind: 'written', file: fileRef(0), offset: 5, length: 1 }]), code('ERR_STREAM_STATE'));
      await w.abort();
    });
  });
}

describe('batches over a real socket (Peer ↔ Peer)', () => {
  let dir = '';
  before(async () => {
    dir = await scratchDir('/dev/shm');
  });
  after(() => fs.rm(dir, { recursive: true, force: true }));

  it('a file of 3,000 extents and a hole past 2^32: sendBatch → frames → recvBatch → file, byte-identical and sparse', async () => {
    const src = path.join(dir, 'src.img');
    await makeImage(src, [...fragmented(3000), { kind: 'hole', length: 5 * 2 ** 32 + 7 * K }, { kind: 'data', length: K }], 13);
    const pair = await peerPair(dir);
    try {
      serveDownloads(pair.server, (stream) => {
        void (async () => {
          for await (const b of fileSendBatches(src)) await stream.sendBatch(b);
          await stream.finish();
        })().catch((err: Error) => stream.abort(err));
      });
      const { stream, called } = startDownload(pair.client, 'v', true);
      await called;
      const dst = path.join(dir, 'dst.img');
      const holes: number[] = [];
      async function* received(): AsyncGenerator<Array<Chunk | WrittenRange>> {
        for (let b = await stream.recvBatch(); b !== null; b = await stream.recvBatch()) {
          for (const c of b) if (c.kind === 'hole') holes.push(c.length);
          yield b;
        }
      }
      await writeChunks(dst, received(), { truncate: true });
      await stream.finish();
      assert.equal(holes.length, 3001);
      assert.equal(holes.at(-1), MiB + 5 * 2 ** 32 + 7 * K, 'the hole past 2^32 (merged with the one before it) keeps its length');
      assert.equal((await fs.stat(dst)).size, (await fs.stat(src)).size);
      // (20 GiB of zeros are not hashed: the same extents, and the same bytes in each)
      const map = await extentMap(src);
      assert.deepEqual(await extentMap(dst), map);
      assert.equal(await dataDigest(dst, map), await dataDigest(src, map));
      const allocated = await allocatedBytes(dst);
      assert.ok(Math.abs(allocated - 3001 * K) <= 16 * K, `allocated ${allocated}, data ${3001 * K}`);
    } finally {
      pair.close();
    }
  });
});
