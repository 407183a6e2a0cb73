/**
 * The transfer module (`src/transfer/`): a file paired with a stream in each direction, with
 * its options (window, limits, progress, pacing, in-place receiving, abort, finish). Files on
 * tmpfs; streams of an in-memory pair, and a real socket between two `Peer`s where the kernel's
 * paths (sendfile, splice) are at stake.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Chunk, WrittenRange } from '../src/chunk.js';
import { createStreamPair } from '../src/stream/index.js';
import { nativeSyscallsAvailable } from '../src/io/sys.js';
import { Pacer, PACE_US, receiveTo, sendFrom, type TransferCounts, type TransferSink } from '../src/transfer/index.js';
import { allocatedBytes, extentMap, makeFilledFile, makeImage, randomBytes, scratchDir, sha256, sha256File, type Layout } from './helpers/images.js';
import { code } from './helpers/asserts.js';
import { withShmDaemon } from './helpers/daemon.js';
import { kPeer } from '../src/client/connection.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const PAGE = 4096;

/** Data at both ends and in the middle, holes between them and at the end; runs not page-aligned. */
const LAYOUT: Layout = [
  { kind: 'data', length: 300 * KiB + 7 },
  { kind: 'hole', length: MiB },
  { kind: 'data', length: 8 * KiB },
  { kind: 'hole', length: 2 * MiB + 100 },
  { kind: 'data', length: MiB + 5 },
  { kind: 'hole', length: 700 * KiB },
];
const sizeOf = (l: Layout): number => l.reduce((n, p) => n + p.length, 0);
const dataOf = (l: Layout): number => l.reduce((n, p) => n + (p.kind === 'data' ? p.length : 0), 0);
const SIZE = sizeOf(LAYOUT);
const DATA = dataOf(LAYOUT);

/** What a sparse read of `file` finds: data and holes as its extent map says (tmpfs maps whole pages). */
async function mapped(file: string, offset = 0, length?: number): Promise<TransferCounts> {
  const counts = { dataBytes: 0, holeBytes: 0 };
  for (const e of await extentMap(file, { offset, length })) {
    if (e.kind === 'data') counts.dataBytes += e.length;
    else counts.holeBytes += e.length;
  }
  return counts;
}

/** Every run of data touches at most one page more at each end than its length. */
function assertAllocatedNear(actual: number, data: number, what: string): void {
  assert.ok(actual >= data && actual <= data + 2 * PAGE * LAYOUT.length, `${what}: ${actual} bytes allocated for ${data} of data`);
}

/** A promise that rejects if `p` takes longer than `ms`: an abort must not wait for anything. */
function within<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`still pending after ${ms} ms`)), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/** A source that never yields: a pipe nobody writes to. */
function stalled(): AsyncIterable<Chunk> {
  return { [Symbol.asyncIterator]: () => ({ next: () => new Promise<IteratorResult<Chunk>>(() => undefined), return: async () => ({ done: true, value: undefined }) }) };
}

let dir = '';
before(async () => {
  dir = await scratchDir('/dev/shm', 'sv-transfer-');
});
after(() => fs.rm(dir, { recursive: true, force: true }));
let n = 0;
const file = (name: string): string => path.join(dir, `${n++}-${name}`);

/** `src` → sender → receiver → `dst`, both ends by the module. */
async function copyThrough(src: string, dst: string, sparse: boolean, send: Parameters<typeof sendFrom>[2] = {}, recv: Parameters<typeof receiveTo>[2] = {}) {
  const { sender, receiver } = createStreamPair({ sparse });
  const [sent, received] = await Promise.all([
    sendFrom(sender, src, { finish: true, ...send }),
    receiveTo(receiver, dst, { finish: true, truncate: true, ...recv }),
  ]);
  return { sent, received, sender, receiver };
}

describe('transfer: both directions', () => {
  test('sparse: file → stream → file keeps the bytes, holes travel as holes and stay unallocated, counts as the layout, both streams finished', { timeout: 30_000 }, async () => {
    const src = file('src');
    await makeImage(src, LAYOUT, 3);
    const dst = file('dst');
    const { sent, received, sender, receiver } = await copyThrough(src, dst, true);
    const expected = await mapped(src);
    assert.ok(expected.holeBytes >= SIZE - DATA - 2 * PAGE * LAYOUT.length, 'the source has its holes');
    assert.deepEqual(sent, expected);
    assert.deepEqual(received, expected);
    assert.equal(await sha256File(dst), await sha256File(src));
    assert.equal((await fs.stat(dst)).size, SIZE, 'the trailing hole sets the size');
    assertAllocatedNear(await allocatedBytes(dst), DATA, 'copy');
    assert.equal(sender.state, 'finished');
    assert.equal(receiver.state, 'finished');
  });

  test('plain stream: holes go as zeros and count as data; the copy is identical and allocated in full', { timeout: 30_000 }, async () => {
    const src = file('src');
    await makeImage(src, LAYOUT, 4);
    const dst = file('dst');
    const { sent, received } = await copyThrough(src, dst, false);
    assert.deepEqual(sent, { dataBytes: SIZE, holeBytes: 0 });
    assert.deepEqual(received, { dataBytes: SIZE, holeBytes: 0 });
    assert.equal(await sha256File(dst), await sha256File(src));
    assert.ok(await allocatedBytes(dst) >= SIZE, 'the zeros were written');
  });

  test('offset and length: the sender reads a window of its file; the receiver writes at an offset and leaves what is before it', { timeout: 30_000 }, async () => {
    const src = file('src');
    await makeImage(src, LAYOUT, 5);
    const offset = 300 * KiB; // 7 bytes of data, then the hole, the 8 KiB, part of the next hole
    const length = MiB + 20 * KiB;
    const dst = file('dst');
    await makeFilledFile(dst, 64 * KiB, 9);
    const at = 50 * KiB;
    const { sent, received } = await copyThrough(src, dst, true, { offset, length }, { offset: at, truncate: false });
    assert.deepEqual(sent, await mapped(src, offset, length));
    assert.ok(sent.dataBytes >= 7 + 8 * KiB && sent.dataBytes < 7 + 8 * KiB + 4 * PAGE, `${sent.dataBytes} bytes of data in the window`);
    assert.deepEqual(received, sent);
    const srcBytes = await fs.readFile(src);
    const dstBytes = await fs.readFile(dst);
    assert.equal(dstBytes.length, at + length);
    assert.equal(sha256(dstBytes.subarray(0, at)), sha256(randomBytes(9, 64 * KiB).subarray(0, at)), 'what was before the offset stays');
    assert.equal(sha256(dstBytes.subarray(at)), sha256(srcBytes.subarray(offset, offset + length)), 'the window lands at the offset');
  });

  test('progress: onProgress per batch with growing counts, the same object as the caller\'s counters; the last call says all of it', { timeout: 30_000 }, async () => {
    const src = file('src');
    // 40 extents of 256 KiB: more than one batch on either side whatever the streams' buffer sizes
    const many: Layout = Array.from({ length: 40 }, (): Layout => [
      { kind: 'data', length: 256 * KiB },
      { kind: 'hole', length: 64 * KiB },
    ]).flat();
    await makeImage(src, many, 6);
    const mine = { dataBytes: 0, holeBytes: 0 };
    const sends: TransferCounts[] = [];
    const recvs: TransferCounts[] = [];
    const { sent, received } = await copyThrough(src, file('dst'), true,
      { counts: mine, onProgress: (c) => { assert.equal(c, mine); sends.push({ ...c }); } },
      { onProgress: (c) => recvs.push({ ...c }) });
    assert.equal(sent, mine, 'the counters passed in are the ones returned');
    for (const [calls, total] of [[sends, sent], [recvs, received]] as const) {
      assert.ok(calls.length >= 2, `${calls.length} progress calls`);
      for (let i = 1; i < calls.length; i++) {
        assert.ok(calls[i]!.dataBytes >= calls[i - 1]!.dataBytes && calls[i]!.holeBytes >= calls[i - 1]!.holeBytes, 'the counts only grow');
      }
      assert.deepEqual(calls.at(-1), total);
      assert.deepEqual(total, await mapped(src));
    }
  });
});

describe('transfer: limits, ends and failures', () => {
  test('receiving with a length: data past it fails with limitError(\'length\') once what fits is written; holes past it are cut off', { timeout: 30_000 }, async () => {
    const bytes = randomBytes(11, 10_000);
    // the sender's chunks: 10,000 bytes of data, then a hole
    const run = async (chunks: Chunk[], length: number) => {
      const { sender, receiver } = createStreamPair({ sparse: true });
      const dst = file('dst');
      const sending = sendFrom(sender, (async function* () { yield* chunks; })(), { finish: true }).catch((e: unknown) => e);
      const got = await receiveTo(receiver, dst, { length, truncate: true, limitError: (l) => new Error(`past ${l}`), finish: true }).catch((e: unknown) => e);
      await sending;
      return { got, dst };
    };
    const past = await run([{ kind: 'data', bytes }, { kind: 'data', bytes: Buffer.from('more') }], 10_002);
    assert.ok(past.got instanceof Error && past.got.message === 'past length', String(past.got));
    assert.equal(sha256(await fs.readFile(past.dst)), sha256(bytes, Buffer.from('mo')), 'what fits is written, nothing past it');

    const holes = await run([{ kind: 'data', bytes }, { kind: 'hole', length: 5 * MiB }], 10_000 + MiB);
    assert.deepEqual(holes.got, { dataBytes: 10_000, holeBytes: 5 * MiB }, 'counted as it came');
    assert.equal((await fs.stat(holes.dst)).size, 10_000 + MiB, 'the hole is cut at the length');
  });

  test('receiving past 2^53: limitError(\'max-offset\') after what fits', { timeout: 30_000 }, async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const written: Array<Chunk | WrittenRange> = [];
    const sink: TransferSink = { write: async (src) => { for await (const b of src) written.push(...b); } };
    const offset = Number.MAX_SAFE_INTEGER - 10;
    const sending = sendFrom(sender, (async function* () { yield { kind: 'data', bytes: Buffer.alloc(16, 1) } as Chunk; })(), { finish: true }).catch(() => undefined);
    await assert.rejects(receiveTo(receiver, sink, { offset, limitError: (l) => new Error(l), finish: true }), /max-offset/);
    await sending;
    assert.deepEqual(written.map((c) => (c.kind === 'data' ? c.bytes.length : -1)), [10]);
  });

  test('endError: at the end of the data the transfer fails with it, after everything before it reached the sink, and nothing is acknowledged', { timeout: 30_000 }, async () => {
    const src = file('src');
    await makeImage(src, LAYOUT, 12);
    const { sender, receiver } = createStreamPair({ sparse: true });
    const refused = new Error('a packet was refused');
    const dst = file('dst');
    const sending = sendFrom(sender, src, { finish: true }).catch((e: unknown) => e);
    await assert.rejects(receiveTo(receiver, dst, { truncate: true, endError: () => refused }), (e) => e === refused);
    assert.equal(await sha256File(dst), await sha256File(src), 'every byte before the end is written');
    assert.equal(receiver.state, 'open', 'the caller decides what the stream gets');
    await receiver.abort(refused);
    await sending;
  });

  test('a sink that fails: its error comes out; with finish the stream is aborted (the sender hears it), without it the stream is left to the caller', { timeout: 30_000 }, async () => {
    const src = file('src');
    await makeImage(src, LAYOUT, 13);
    const failing = (): TransferSink & { batches: number } => {
      const sink = {
        batches: 0,
        write: async (source: AsyncIterable<Array<Chunk | WrittenRange>>) => {
          for await (const _ of source) if (++sink.batches === 2) throw new Error('disk full');
        },
      };
      return sink;
    };
    for (const finish of [true, false]) {
      const { sender, receiver } = createStreamPair({ sparse: true, highWaterMark: 64 * KiB });
      const sending = sendFrom(sender, src, { finish: true }).then(() => null, (e: unknown) => e);
      const sink = failing();
      await assert.rejects(within(receiveTo(receiver, sink, { finish }), 5000), /disk full/);
      assert.equal(sink.batches, 2);
      if (finish) {
        assert.equal(receiver.state, 'aborted');
        const err = await within(sending, 5000);
        assert.ok(err !== null, 'the sender stops');
        assert.equal(sender.state, 'failed');
      } else {
        assert.equal(receiver.state, 'open');
        await receiver.abort(new Error('caller'));
        await within(sending, 5000);
      }
    }
  });

  test('a source that fails: with finish the stream is aborted and the error rethrown', { timeout: 30_000 }, async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const receiving = receiveTo(receiver, file('dst'), { finish: true }).then(() => null, (e: unknown) => e);
    const source = (async function* () {
      yield { kind: 'data', bytes: Buffer.alloc(100, 1) } as Chunk;
      throw new Error('read failed');
    })();
    await assert.rejects(sendFrom(sender, source, { finish: true }), /read failed/);
    assert.equal(sender.state, 'aborted');
    assert.ok(await within(receiving, 5000) !== null, 'the receiver hears of it');
  });

  test('AbortSignal: a stalled source and a stream that brings nothing stop at once with ERR_ABORTED; the streams are aborted; the signal\'s reason is the cause', { timeout: 30_000 }, async () => {
    // sending from a source that never yields
    {
      const { sender, receiver } = createStreamPair({ sparse: true });
      const ac = new AbortController();
      const receiving = receiveTo(receiver, file('dst'), { finish: true }).then(() => null, (e: unknown) => e);
      const sending = sendFrom(sender, stalled(), { signal: ac.signal, finish: true });
      setTimeout(() => ac.abort(new Error('stop')), 50);
      await assert.rejects(within(sending, 2000), (e: unknown) => code('ERR_ABORTED')(e) && (e as Error & { cause?: Error }).cause?.message === 'stop');
      assert.equal(sender.state, 'aborted');
      assert.ok(await within(receiving, 2000) !== null, 'the receiver hears of the abort');
    }
    // receiving from a sender that sends nothing
    {
      const { sender, receiver } = createStreamPair({ sparse: true });
      const ac = new AbortController();
      const dst = file('dst');
      const receiving = receiveTo(receiver, dst, { signal: ac.signal });
      setTimeout(() => ac.abort(new Error('stop')), 50);
      await assert.rejects(within(receiving, 2000), code('ERR_ABORTED'));
      assert.equal(receiver.state, 'aborted');
      await assert.rejects(sender.finish(), 'the sender hears of it');
    }
    // an already aborted signal: nothing is sent
    {
      const { sender, receiver } = createStreamPair({ sparse: true });
      const src = file('src');
      await makeImage(src, LAYOUT, 14);
      const receiving = receiveTo(receiver, file('dst'), { finish: true }).catch(() => undefined);
      const counts = { dataBytes: 0, holeBytes: 0 };
      await assert.rejects(sendFrom(sender, src, { signal: AbortSignal.abort(), counts }), code('ERR_ABORTED'));
      assert.deepEqual(counts, { dataBytes: 0, holeBytes: 0 });
      await receiving;
    }
  });

  test('a reader of batches and a writer (the shape of a pool backend\'s) plug in as files do', { timeout: 30_000 }, async () => {
    const src = file('src');
    await makeImage(src, LAYOUT, 15);
    const { sender, receiver } = createStreamPair({ sparse: true });
    const { fileSendBatches, writeChunks } = await import('../src/sparse/index.js');
    const reader = { batches: () => fileSendBatches(src, { sparse: true }) };
    const dst = file('dst');
    let hooked = false;
    const writer: TransferSink = {
      write: (source, hooks) => {
        hooked = typeof hooks.release === 'function' && typeof hooks.receiveInto === 'function';
        return writeChunks(dst, source, { release: hooks.release }).then(() => undefined);
      },
    };
    const [sent, received] = await Promise.all([sendFrom(sender, reader, { finish: true }), receiveTo(receiver, writer, { finish: true })]);
    assert.deepEqual(sent, received);
    assert.ok(hooked, 'the writer gets the hooks');
    assert.equal(await sha256File(dst), await sha256File(src));
    assertAllocatedNear(await allocatedBytes(dst), DATA, 'copy');
  });

  test('pacing: small packets wait for a Pacer (one per PACE_US on average), none without one', { timeout: 30_000 }, async () => {
    const packets = 6400;
    const chunks: Chunk[] = [];
    for (let i = 0; i < packets; i++) chunks.push(i % 2 ? { kind: 'hole', length: PAGE } : { kind: 'data', bytes: Buffer.alloc(PAGE, 1) });
    const run = async (pacer?: Pacer): Promise<number> => {
      const { sender, receiver } = createStreamPair({ sparse: true, highWaterMark: 64 * MiB });
      const t0 = performance.now();
      await Promise.all([
        sendFrom(sender, (async function* () { yield chunks; })(), { pacer, finish: true }),
        receiveTo(receiver, { write: async (s) => { for await (const _ of s); } }, { finish: true }),
      ]);
      return performance.now() - t0;
    };
    const pacer = new Pacer();
    const paced = await run(pacer);
    const floorMs = Math.floor(packets / 64) * 64 * PACE_US / 1000 * 0.9;
    assert.ok(paced >= floorMs, `${packets} small packets paced in ${paced.toFixed(1)} ms (at least ${floorMs} ms)`);
    assert.ok(pacer.waits > 0, 'the pacer waited');
    const free = await run();
    assert.ok(free < paced, `unpaced ${free.toFixed(1)} ms, paced ${paced.toFixed(1)} ms`);
  });
});

describe('transfer over a socket', { skip: !nativeSyscallsAvailable() && 'needs the native syscalls' }, () => {
  test('to and from sparsevirtd on tmpfs: sendfile out of the file, splice into it in place (or into buffers with inPlace false); bytes and holes identical', { timeout: 60_000 }, async () => {
    await withShmDaemon('sv-transfer-', async ({ dir, poolDir, conn, pool }) => {
      const src = path.join(dir, 'src.img');
      const layout: Layout = [{ kind: 'hole', length: MiB }, { kind: 'data', length: 4 * MiB + 3 }, { kind: 'hole', length: 3 * MiB }, { kind: 'data', length: MiB }];
      await makeImage(src, layout, 16);
      const expected = await mapped(src);
      const data = expected.dataBytes;
      const stats = conn[kPeer].stats;
      const vol = await pool.createVol({ name: 'v.img', capacity: sizeOf(layout), allocation: 0 });

      const direct0 = stats.directBytes;
      const up = await within(sendFrom(await vol.upload({ sparse: true }), src, { finish: true }), 30_000);
      assert.deepEqual(up, expected);
      // (how much of it depends on how often the socket was full: only that it happened is certain)
      assert.ok(stats.directBytes - direct0 > 0, `${stats.directBytes - direct0} of ${data} bytes left by sendfile`);
      assert.equal(await sha256File(path.join(poolDir, 'v.img')), await sha256File(src));

      for (const inPlace of [true, false]) {
        const spliced0 = stats.splicedBytes;
        const dst = path.join(dir, `dst-${inPlace}`);
        const got = await within(receiveTo(await vol.download({ sparse: true }), dst, { truncate: true, inPlace, finish: true }), 30_000);
        assert.deepEqual(got, expected);
        assert.equal(await sha256File(dst), await sha256File(src));
        assertAllocatedNear(await allocatedBytes(dst), data, 'download');
        const spliced = stats.splicedBytes - spliced0;
        // (packets that arrive several in one read land in buffers: how many go in place depends on timing)
        if (inPlace) assert.ok(spliced > 0 && spliced <= data, `${spliced} of ${data} bytes received in place`);
        else assert.equal(spliced, 0, 'nothing in place');
      }
    });
  });
});
