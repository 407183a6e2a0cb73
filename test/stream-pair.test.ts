// The in-memory pair: libvirt's finish/abort handshakes both ways, backpressure, and the
// *All / chunk helpers end to end.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { Chunk } from '../src/chunk.js';
import { LEGACY_PAYLOAD_MAX } from '../src/chunk.js';
import { type Stream, copyChunks, createStreamPair } from '../src/stream/index.js';
import { code, hasSettled } from './helpers/asserts.js';



const data = (s: string): Chunk => ({ kind: 'data', bytes: Buffer.from(s) });
const hole = (length: number): Chunk => ({ kind: 'hole', length });

async function* chunksOf(list: Chunk[]): AsyncGenerator<Chunk> {
  for (const c of list) yield c;
}

async function collect(stream: Stream): Promise<Array<string | number>> {
  const out: Array<string | number> = [];
  for await (const c of stream) out.push(c.kind === 'data' ? c.bytes.toString() : c.length);
  return out;
}

/** A sparse "file": data extents and holes, with a cursor, for the sparseSendAll callbacks. */
class SparseFile {
  private pos = 0;
  constructor(private readonly layout: Chunk[]) {}
  get size(): number {
    return this.layout.reduce((n, c) => n + (c.kind === 'data' ? c.bytes.length : c.length), 0);
  }
  private locate(): { index: number; within: number } | undefined {
    let start = 0;
    for (let index = 0; index < this.layout.length; index++) {
      const c = this.layout[index]!;
      const len = c.kind === 'data' ? c.bytes.length : c.length;
      if (this.pos < start + len) return { index, within: this.pos - start };
      start += len;
    }
    return undefined;
  }
  /** Like virFileInData: the section at the cursor (adjacent holes in the layout stay separate). */
  holeQuery = async (): Promise<{ inData: boolean; length: number }> => {
    const at = this.locate();
    if (at === undefined) return { inData: false, length: 0 };
    const c = this.layout[at.index]!;
    return c.kind === 'data' ? { inData: true, length: c.bytes.length - at.within } : { inData: false, length: c.length - at.within };
  };
  skip = async (length: number): Promise<void> => {
    this.pos += length;
  };
  read = async (max: number): Promise<Buffer | null> => {
    const at = this.locate();
    if (at === undefined) return null;
    const c = this.layout[at.index]!;
    assert.equal(c.kind, 'data', 'reads happen only in data sections');
    const bytes = (c as { bytes: Buffer }).bytes.subarray(at.within, at.within + max);
    this.pos += bytes.length;
    return bytes;
  };
}

describe('finish and abort handshakes', { timeout: 30_000 }, () => {
  test('sender.finish resolves only once the receiver acknowledged EOF', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    await sender.send(Buffer.from('abc'));
    await sender.sendHole(10);
    const fin = sender.finish();
    assert.equal(sender.state, 'finishing');
    assert.equal(String(await receiver.recv(100)), 'abc');
    assert.deepEqual(await receiver.recv(100, { stopAtHole: true }), { hole: 10 }, 'the trailing hole travels before EOF');
    assert.equal(await receiver.recvHole(), 10);
    assert.equal(await receiver.recv(100), null);
    assert.equal(await hasSettled(fin), false, 'EOF seen but not acknowledged yet');
    await receiver.finish();
    await fin;
    assert.equal(sender.state, 'finished');
    assert.equal(receiver.state, 'finished');
    assert.equal(sender.position, 13);
    assert.equal(receiver.position, 13);
  });

  test('the iterator acknowledges EOF, which completes the sender\'s finish', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const sent = sender.sendChunks(chunksOf([hole(5), hole(6), data('a'), hole(1), data('b'), hole(2), hole(3)]));
    assert.deepEqual(await collect(receiver), [11, 'a', 1, 'b', 5]);
    await sent;
    assert.equal(sender.state, 'finished');
  });

  test('receiver.abort makes the sender\'s pending and later calls reject with ERR_ABORTED', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true, highWaterMark: 8 });
    await sender.send(Buffer.from('12345'));
    const pending = sender.send(Buffer.from('6789')); // 9 > 8 queued: this write waits
    assert.equal(await hasSettled(pending), false);
    const reason = new Error('disk full');
    await receiver.abort(reason);
    await assert.rejects(pending, (err: unknown) => {
      code('ERR_ABORTED')(err);
      assert.equal(((err as Error).cause as Error).cause, reason, 'the receiver\'s reason is reachable');
      return true;
    });
    await assert.rejects(sender.send(Buffer.from('7')), code('ERR_ABORTED'));
    await assert.rejects(sender.finish(), code('ERR_ABORTED'));
    assert.equal(sender.state, 'failed');
    assert.equal(receiver.state, 'aborted');
  });

  test('receiver.abort while the sender waits in finish rejects the finish', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    await sender.send(Buffer.from('a'));
    const fin = sender.finish();
    await receiver.abort();
    await assert.rejects(fin, code('ERR_ABORTED'));
  });

  test('sender.abort makes the receiver\'s pending and later calls reject with ERR_ABORTED', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const pending = receiver.recv(10);
    const reason = new Error('source unreadable');
    await sender.abort(reason);
    await assert.rejects(pending, code('ERR_ABORTED'));
    await assert.rejects(receiver.recv(10), code('ERR_ABORTED'));
    assert.equal(receiver.state, 'failed');
    assert.equal(sender.state, 'aborted');
  });

  test('the receiver may finish early: the sender stops, its helpers resolve', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    let produced = 0;
    let sourceClosed = false;
    async function* endless(): AsyncGenerator<Chunk> {
      try {
        for (;;) {
          produced++;
          yield data('x'.repeat(100));
        }
      } finally {
        sourceClosed = true;
      }
    }
    const sent = sender.sendChunks(endless());
    assert.equal((await receiver.recv(1000) as Buffer).length, 100);
    await receiver.finish();
    await sent;
    assert.equal(sourceClosed, true);
    assert.equal(sender.finishedByPeer, true);
    assert.equal(sender.state, 'finished');
    assert.ok(produced < 10);
    await assert.rejects(sender.send(Buffer.from('more')), code('ERR_STREAM_STATE'));
  });

  test('a signal given to the pair aborts both ends', async () => {
    const ac = new AbortController();
    const { sender, receiver } = createStreamPair({ sparse: true, signal: ac.signal });
    const r = receiver.recv(1);
    ac.abort(new Error('shutdown'));
    await assert.rejects(r, code('ERR_ABORTED'));
    // Whichever end sees the signal first aborts; the other is then failed by its peer's abort.
    const dead = ['aborted', 'failed'];
    assert.ok(dead.includes(sender.state) && dead.includes(receiver.state), `${sender.state}/${receiver.state}`);
    await assert.rejects(sender.send(Buffer.from('a')));
    const pre = createStreamPair({ sparse: true, signal: AbortSignal.abort() });
    assert.ok(dead.includes(pre.sender.state) && dead.includes(pre.receiver.state));
  });
});

describe('backpressure', { timeout: 30_000 }, () => {
  test('the sender waits while the receiver is over its window, until it drained to half', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true, highWaterMark: 4096 });
    await sender.send(Buffer.alloc(3000)); // 3000 <= 4096: not paused
    const second = sender.send(Buffer.alloc(3000)); // delivered (6000 queued), then waits
    assert.equal(receiver.queuedBytes, 6000);
    assert.equal(await hasSettled(second), false, 'the producer is paused');
    await receiver.recv(3000); // 3000 left, above half the window
    assert.equal(await hasSettled(second), false, 'still paused above half the window');
    await receiver.recv(1000); // 2000 left <= 2048
    await second;
    assert.equal(receiver.queuedBytes, 2000);
  });

  test('a slow consumer pauses the producer; queued bytes never exceed window + one chunk', async () => {
    const window = 64 * 1024;
    const chunkSize = 24 * 1024;
    const count = 60;
    const { sender, receiver } = createStreamPair({ sparse: true, highWaterMark: window });
    let maxQueued = 0;
    const observe = (): void => {
      maxQueued = Math.max(maxQueued, receiver.queuedBytes);
    };
    async function* producer(): AsyncGenerator<Chunk> {
      for (let i = 0; i < count; i++) {
        observe();
        yield { kind: 'data', bytes: Buffer.alloc(chunkSize, i) };
        if (i % 7 === 0) yield hole(1 << 30); // holes cost no window
      }
    }
    const sent = sender.sendChunks(producer());
    let total = 0;
    for await (const c of receiver) {
      observe();
      if (c.kind === 'data') total += c.bytes.length;
      await new Promise(setImmediate); // a slow consumer: one chunk per event-loop turn
    }
    await sent;
    assert.equal(total, count * chunkSize);
    assert.ok(maxQueued > window, `the window was reached (max ${maxQueued}), so the producer had to stop`);
    assert.ok(maxQueued <= window + chunkSize, `queued ${maxQueued} > window + one chunk`);
  });
});

describe('libvirt helpers', { timeout: 30_000 }, () => {
  test('sendAll with a reader function (null = EOF) and recvAll (holes as zeros)', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const asked: number[] = [];
    const pieces = [Buffer.from('ab'), Buffer.from('cde')];
    const sent = sender.sendAll(async (max) => {
      asked.push(max);
      return pieces.shift() ?? null;
    });
    const got: Buffer[] = [];
    await receiver.recvAll((b) => { got.push(Buffer.from(b)); });
    await sent;
    assert.equal(Buffer.concat(got).toString(), 'abcde');
    assert.ok(asked.every((m) => m === LEGACY_PAYLOAD_MAX), 'reads of at most 262120 bytes, as virsh');
    assert.equal(sender.state, 'finished');
    assert.equal(receiver.state, 'finished');
  });

  test('sendAll takes an async iterable; an empty buffer from a reader is EOF too', async () => {
    const a = createStreamPair({ sparse: false });
    async function* bufs(): AsyncGenerator<Buffer> {
      yield Buffer.from('x');
      yield Buffer.alloc(0);
      yield Buffer.from('y');
    }
    const sentA = a.sender.sendAll(bufs());
    const gotA: string[] = [];
    await a.receiver.recvAll(async (b) => { gotA.push(b.toString()); });
    await sentA;
    assert.deepEqual(gotA, ['x', 'y']);

    const b = createStreamPair({ sparse: false });
    const list = [Buffer.from('1'), Buffer.alloc(0), Buffer.from('never')];
    const sentB = b.sender.sendAll(async () => list.shift() ?? null);
    assert.deepEqual(await collect(b.receiver), ['1']);
    await sentB;
  });

  test('recvAll delivers holes as zeros', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const sent = sender.sendChunks(chunksOf([data('a'), hole(3 * 1024 * 1024 + 5), data('b')]));
    const got: Buffer[] = [];
    await receiver.recvAll((b) => { got.push(Buffer.from(b)); });
    await sent;
    const all = Buffer.concat(got);
    assert.equal(all.length, 3 * 1024 * 1024 + 7);
    assert.equal(all[0], 'a'.charCodeAt(0));
    assert.equal(all.at(-1), 'b'.charCodeAt(0));
    assert.ok(all.subarray(1, -1).every((x) => x === 0));
  });

  test('sparseSendAll follows libvirt\'s loop and sparseRecvAll rebuilds the same layout', async () => {
    const big = Buffer.alloc(327680, 7); // one extent bigger than a packet: 262120 + 65560, as virsh
    const file = new SparseFile([hole(61440), data('abcd'), hole(1000), hole(24), { kind: 'data', bytes: big }, hole(720896)]);
    const { sender, receiver } = createStreamPair({ sparse: true });
    const sent = sender.sparseSendAll(file.read, file.holeQuery, file.skip);
    const events: Array<string | number> = [];
    await receiver.sparseRecvAll((b) => { events.push(`data:${b.length}`); }, (n) => { events.push(n); });
    await sent;
    assert.deepEqual(events, [61440, 'data:4', 1024, 'data:262120', 'data:65560', 720896]);
    assert.equal(receiver.position, file.size);
    assert.equal(sender.position, file.size);
  });

  test('sparseSendAll on a non-sparse stream fails as libvirt does, and aborts', async () => {
    const { sender, receiver } = createStreamPair({ sparse: false });
    const file = new SparseFile([hole(10), data('a')]);
    const received = receiver.recvAll(() => {});
    await assert.rejects(sender.sparseSendAll(file.read, file.holeQuery, file.skip), code('ERR_STREAM_NOT_SPARSE'));
    assert.equal(sender.state, 'aborted');
    await assert.rejects(received, code('ERR_ABORTED'));
  });

  test('sparseSendAll refuses a bad holeQuery length and a source that returns too much', async () => {
    const a = createStreamPair({ sparse: true });
    void a.receiver.recvAll(() => {}).catch(() => {});
    await assert.rejects(a.sender.sparseSendAll(async () => null, async () => ({ inData: true, length: -1 }), async () => {}), code('ERR_INVALID_ARG'));
    const b = createStreamPair({ sparse: true });
    void b.receiver.recvAll(() => {}).catch(() => {});
    await assert.rejects(b.sender.sparseSendAll(async () => Buffer.alloc(10), async () => ({ inData: true, length: 5 }), async () => {}), code('ERR_INVALID_ARG'));
    assert.equal(b.sender.state, 'aborted');
  });

  test('a failing source aborts the stream and its own error is rethrown', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const boom = new Error('EIO reading the local file');
    async function* failing(): AsyncGenerator<Chunk> {
      yield data('a');
      throw boom;
    }
    const received = collect(receiver);
    await assert.rejects(sender.sendChunks(failing()), (err) => err === boom);
    assert.equal(sender.state, 'aborted');
    await assert.rejects(received, code('ERR_ABORTED'));
  });

  test('a failing sink aborts the stream and its own error is rethrown; the sender stops', async () => {
    for (const helper of ['recvAll', 'sparseRecvAll'] as const) {
      const { sender, receiver } = createStreamPair({ sparse: true, highWaterMark: 16 });
      const boom = new Error('ENOSPC');
      async function* endless(): AsyncGenerator<Chunk> {
        for (;;) yield data('0123456789');
      }
      const sent = sender.sendChunks(endless());
      const sink = (): void => { throw boom; };
      const received = helper === 'recvAll' ? receiver.recvAll(sink) : receiver.sparseRecvAll(sink, () => {});
      await assert.rejects(received, (err) => err === boom, helper);
      assert.equal(receiver.state, 'aborted');
      await assert.rejects(sent, code('ERR_ABORTED'));
    }
  });

  test('a failing hole handler aborts sparseRecvAll', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const boom = new Error('cannot seek');
    const sent = sender.sendChunks(chunksOf([data('a'), hole(5), data('b')]));
    await assert.rejects(receiver.sparseRecvAll(() => {}, async () => { throw boom; }), (err) => err === boom);
    await assert.rejects(sent, code('ERR_ABORTED'));
  });

  test('breaking out of for-await aborts the sender cleanly', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const sent = sender.sendChunks(chunksOf([data('a'), data('b'), data('c')]));
    for await (const c of receiver) {
      assert.equal(c.kind, 'data');
      break;
    }
    assert.equal(receiver.state, 'aborted');
    await assert.rejects(sent, code('ERR_ABORTED'));
  });

  test('a non-sparse pair carries holes as zeros only', async () => {
    const { sender, receiver } = createStreamPair({ sparse: false });
    const sent = sender.sendChunks(chunksOf([data('a'), hole(5), data('b')]));
    const got: Chunk[] = [];
    for await (const c of receiver) got.push(c);
    await sent;
    assert.ok(got.every((c) => c.kind === 'data'));
    assert.deepEqual(Buffer.concat(got.map((c) => (c as { bytes: Buffer }).bytes)), Buffer.from('a\0\0\0\0\0b'));
  });
});

describe('copyChunks', { timeout: 30_000 }, () => {
  test('returns the sink\'s result, with holes merged', async () => {
    const result = await copyChunks(chunksOf([hole(1), hole(2), data('ab'), data('cd')]), async (chunks) => {
      const seen: Array<string | number> = [];
      for await (const c of chunks) seen.push(c.kind === 'data' ? c.bytes.toString() : c.length);
      return seen;
    });
    assert.deepEqual(result, [3, 'ab', 'cd']);
  });

  test('a sink that returns early stops the source and still succeeds', async () => {
    let sourceClosed = false;
    async function* endless(): AsyncGenerator<Chunk> {
      try {
        for (;;) yield data('x');
      } finally {
        sourceClosed = true;
      }
    }
    const first = await copyChunks(endless(), async (chunks) => {
      const it = chunks[Symbol.asyncIterator]();
      const r = await it.next();
      return r.done === true ? undefined : r.value;
    }, { highWaterMark: 8 });
    assert.deepEqual(first, data('x'));
    assert.equal(sourceClosed, true);
  });

  test('the source\'s error is thrown, not the abort it causes', async () => {
    const boom = new Error('read failed');
    async function* failing(): AsyncGenerator<Chunk> {
      yield data('a');
      throw boom;
    }
    await assert.rejects(copyChunks(failing(), async (chunks) => {
      for await (const _ of chunks) { /* consume */ }
    }), (err) => err === boom);
  });

  test('the sink\'s error is thrown, and the source is stopped', async () => {
    const boom = new Error('write failed');
    let sourceClosed = false;
    async function* endless(): AsyncGenerator<Chunk> {
      try {
        for (;;) yield data('x');
      } finally {
        sourceClosed = true;
      }
    }
    await assert.rejects(copyChunks(endless(), async () => { throw boom; }, { highWaterMark: 8 }), (err) => err === boom);
    assert.equal(sourceClosed, true);
  });
});
