// Stream primitives against a recording fake channel: what the stream hands to the channel,
// and how it reacts to what the channel delivers.
import assert from 'node:assert/strict';
import diagnostics_channel from 'node:diagnostics_channel';
import { getEventListeners } from 'node:events';
import { describe, test } from 'node:test';
import type { Chunk } from '../src/chunk.js';
import { SparsevirtError } from '../src/errors.js';
import { kDeliver, kDeliverEnd, kDeliverError, Stream, type StreamChannel, type StreamOptions, ZERO_CHUNK_SIZE } from '../src/stream/index.js';
import { code, hasSettled } from './helpers/asserts.js';

/** Records every call; writes/finish/abort resolve at once unless a gate is set. */
class RecordingChannel implements StreamChannel {
  readonly log: string[] = [];
  readonly writes: Chunk[] = [];
  readonly abortReasons: Error[] = [];
  /** While set, every write returns this promise (a channel that cannot take more). */
  writeGate: Promise<void> | undefined;
  finishResult: () => Promise<void> = () => Promise.resolve();
  abortResult: () => Promise<void> = () => Promise.resolve();

  write(chunk: Chunk): Promise<void> {
    this.writes.push(chunk);
    this.log.push(chunk.kind === 'data' ? `data:${chunk.bytes.length}` : `hole:${chunk.length}`);
    return this.writeGate ?? Promise.resolve();
  }
  finish(): Promise<void> {
    this.log.push('finish');
    return this.finishResult();
  }
  abort(reason: Error): Promise<void> {
    this.log.push('abort');
    this.abortReasons.push(reason);
    return this.abortResult();
  }
  pauseIncoming(): void {
    this.log.push('pause');
  }
  resumeIncoming(): void {
    this.log.push('resume');
  }
  count(entry: string): number {
    return this.log.filter((e) => e === entry).length;
  }
}

function setup(options: Partial<StreamOptions> = {}): { ch: RecordingChannel; s: Stream } {
  const ch = new RecordingChannel();
  return { ch, s: new Stream(ch, { sparse: true, ...options }) };
}

function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void; reject: (e: unknown) => void } {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}



const data = (s: string): Chunk => ({ kind: 'data', bytes: Buffer.from(s) });
const hole = (length: number): Chunk => ({ kind: 'hole', length });

describe('sending', { timeout: 30_000 }, () => {
  test('send passes the caller\'s buffer to the channel as is and returns its length', async () => {
    const { ch, s } = setup();
    const buf = Buffer.from('hello');
    assert.equal(await s.send(buf), 5);
    assert.equal(ch.writes.length, 1);
    const w = ch.writes[0]!;
    assert.equal(w.kind, 'data');
    assert.equal(w.kind === 'data' && w.bytes, buf, 'the very same Buffer, not a copy');
    assert.equal(s.position, 5);
    assert.equal(s.direction, 'send');
  });

  test('an empty send is a no-op returning 0', async () => {
    const { ch, s } = setup();
    assert.equal(await s.send(Buffer.alloc(0)), 0);
    assert.deepEqual(ch.log, []);
  });

  test('adjacent holes are merged and flushed just before the next data and at finish', async () => {
    const { ch, s } = setup();
    await s.sendHole(10);
    await s.sendHole(20);
    assert.deepEqual(ch.log, [], 'a hole stays pending until data or finish');
    await s.send(Buffer.from('abc'));
    await s.sendHole(5);
    await s.sendChunk(hole(5));
    await s.sendHole(1);
    await s.finish();
    assert.deepEqual(ch.log, ['hole:30', 'data:3', 'hole:11', 'finish']);
    assert.equal(s.position, 30 + 3 + 11);
    assert.equal(s.state, 'finished');
  });

  test('sendHole refuses lengths that are not safe integers from 0, and sends nothing; an empty hole is a no-op', async () => {
    const { ch, s } = setup();
    for (const bad of [-1, 1.5, Number.NaN, 2 ** 53, Infinity]) {
      await assert.rejects(s.sendHole(bad), code('ERR_INVALID_ARG'));
    }
    await s.sendHole(0);
    await s.sendChunk(hole(0));
    assert.equal(s.position, 0);
    await s.finish();
    assert.deepEqual(ch.log, ['finish']);
  });

  test('holes past a stream position of 2^53 are refused, not rounded', async () => {
    const { s } = setup();
    await s.sendHole(Number.MAX_SAFE_INTEGER - 10);
    await assert.rejects(s.sendHole(11), code('ERR_INVALID_ARG'));
    await s.sendHole(10);
    assert.equal(s.position, Number.MAX_SAFE_INTEGER);
  });

  test('a non-sparse stream refuses sendHole with ERR_STREAM_NOT_SPARSE and sends nothing', async () => {
    const { ch, s } = setup({ sparse: false });
    await assert.rejects(s.sendHole(4096), (err: unknown) => {
      code('ERR_STREAM_NOT_SPARSE')(err);
      assert.match((err as Error).message, /not opened sparse/);
      return true;
    });
    assert.deepEqual(ch.log, []);
    assert.equal(s.position, 0);
    await s.send(Buffer.from('x')); // still usable
    assert.deepEqual(ch.log, ['data:1']);
  });

  test('sendChunk materialises holes as zeros on a non-sparse stream', async () => {
    const { ch, s } = setup({ sparse: false });
    const length = 2 * ZERO_CHUNK_SIZE + 123;
    await s.sendChunk(data('ab'));
    await s.sendChunk(hole(length));
    await s.finish();
    assert.ok(ch.writes.every((c) => c.kind === 'data'), 'no hole reaches the channel');
    const zeros = ch.writes.slice(1);
    assert.equal(zeros.reduce((n, c) => n + (c.kind === 'data' ? c.bytes.length : 0), 0), length);
    assert.ok(zeros.every((c) => c.kind === 'data' && c.bytes.every((b) => b === 0)));
    assert.equal(s.position, 2 + length);
  });

  test('sendChunk validates its argument', async () => {
    const { s } = setup();
    await assert.rejects(s.sendChunk({ kind: 'data', bytes: 'nope' } as unknown as Chunk), code('ERR_INVALID_ARG'));
    await assert.rejects(s.sendChunk(hole(-1)), code('ERR_INVALID_ARG'));
    await assert.rejects(s.sendChunk(null as unknown as Chunk), code('ERR_INVALID_ARG'));
  });

  test('send resolves only when the channel takes the chunk (backpressure)', async () => {
    const { ch, s } = setup();
    const gate = deferred();
    ch.writeGate = gate.promise;
    const p = s.send(Buffer.from('abc'));
    assert.equal(await hasSettled(p), false);
    gate.resolve();
    assert.equal(await p, 3);
  });

  test('sending calls are sequential: overlapping calls are refused', async () => {
    const { ch, s } = setup();
    const gate = deferred();
    ch.writeGate = gate.promise;
    const first = s.send(Buffer.from('a'));
    await assert.rejects(s.send(Buffer.from('b')), code('ERR_STREAM_STATE'));
    await assert.rejects(s.sendHole(1), code('ERR_STREAM_STATE'));
    await assert.rejects(s.finish(), code('ERR_STREAM_STATE'));
    gate.resolve();
    await first;
    ch.writeGate = undefined;
    await s.send(Buffer.from('c'));
    assert.deepEqual(ch.log, ['data:1', 'data:1']);
  });

  test('calls after finish, and a second finish, are refused with ERR_STREAM_STATE', async () => {
    const { s } = setup();
    await s.send(Buffer.from('a'));
    await s.finish();
    await assert.rejects(s.send(Buffer.from('b')), code('ERR_STREAM_STATE'));
    await assert.rejects(s.sendHole(1), code('ERR_STREAM_STATE'));
    await assert.rejects(s.finish(), code('ERR_STREAM_STATE'));
  });

  test('finish with nothing sent is an empty upload', async () => {
    const { ch, s } = setup();
    await s.finish();
    assert.deepEqual(ch.log, ['finish']);
    assert.equal(s.direction, 'send');
  });

  test('finish waits for the peer\'s confirmation, and a rejected finish fails the stream', async () => {
    const { ch, s } = setup();
    const confirm = deferred();
    ch.finishResult = () => confirm.promise;
    const p = s.finish();
    assert.equal(await hasSettled(p), false);
    assert.equal(s.state, 'finishing');
    const remote = new SparsevirtError('VIR_ERR_SYSTEM_ERROR', 'cannot write to stream: No space left on device');
    confirm.reject(remote);
    await assert.rejects(p, (err) => err === remote);
    assert.equal(s.state, 'failed');
    await assert.rejects(s.send(Buffer.from('x')), (err) => err === remote, 'a dead stream reports its error again');
  });

  test('a rejected write fails the stream with the channel\'s error', async () => {
    const { ch, s } = setup();
    const lost = new SparsevirtError('ERR_CONNECTION_CLOSED', 'connection closed');
    ch.writeGate = Promise.reject(lost);
    await assert.rejects(s.send(Buffer.from('a')), (err) => err === lost);
    assert.equal(s.state, 'failed');
    await assert.rejects(s.finish(), (err) => err === lost);
  });

  test('a sending stream refuses to receive, and vice versa', async () => {
    const { s } = setup();
    await s.send(Buffer.from('a'));
    await assert.rejects(s.recv(10), code('ERR_STREAM_STATE'));
    await assert.rejects(s.recvHole(), code('ERR_STREAM_STATE'));
    assert.throws(() => s[Symbol.asyncIterator](), code('ERR_STREAM_STATE'));

    const { s: r } = setup({ direction: 'recv' });
    await assert.rejects(r.send(Buffer.from('a')), code('ERR_STREAM_STATE'));
    await assert.rejects(r.sendHole(1), code('ERR_STREAM_STATE'));
  });

  test('the receiver finishing early (deliverEnd on a sender) stops the sender', async () => {
    const { ch, s } = setup({ direction: 'send' });
    const gate = deferred();
    ch.writeGate = gate.promise;
    const pending = s.send(Buffer.from('a'));
    s[kDeliverEnd]();
    await assert.rejects(pending, code('ERR_STREAM_STATE'));
    assert.equal(s.finishedByPeer, true);
    assert.equal(s.state, 'finished');
    await assert.rejects(s.send(Buffer.from('b')), code('ERR_STREAM_STATE'));
    await s.finish(); // nothing to confirm any more
    assert.deepEqual(ch.log, ['data:1'], 'neither finish nor abort goes to the channel');
  });

  test('sendChunks resolves when the receiver finishes early', async () => {
    const { ch, s } = setup({ direction: 'send' });
    let finalized = false;
    async function* source(): AsyncGenerator<Chunk> {
      try {
        yield data('a');
        s[kDeliverEnd]();
        yield data('b');
        yield data('c');
      } finally {
        finalized = true;
      }
    }
    await s.sendChunks(source());
    assert.equal(finalized, true);
    assert.deepEqual(ch.log, ['data:1']);
  });
});

describe('receiving', { timeout: 30_000 }, () => {
  test('recv hands out the delivered buffer itself, or views of it, never across chunks', async () => {
    const { s } = setup();
    const a = Buffer.from('abcdefgh');
    const b = Buffer.from('ij');
    s[kDeliver]({ kind: 'data', bytes: a });
    s[kDeliver]({ kind: 'data', bytes: b });
    const first = await s.recv(3);
    assert.ok(Buffer.isBuffer(first));
    assert.equal(first.toString(), 'abc');
    assert.equal(first.buffer, a.buffer, 'a view, not a copy');
    assert.equal(first.byteOffset, a.byteOffset);
    const rest = await s.recv(100);
    assert.ok(Buffer.isBuffer(rest));
    assert.equal(rest.toString(), 'defgh', 'does not run into the next chunk');
    assert.equal(rest.buffer, a.buffer);
    assert.equal(await s.recv(100), b, 'a whole chunk is handed out as is');
    assert.equal(s.position, 10);
    assert.equal(s.queuedBytes, 0);
  });

  test('recv waits for data, and returns null at EOF, every time', async () => {
    const { s } = setup();
    const p = s.recv(10);
    assert.equal(await hasSettled(p), false);
    s[kDeliver](data('xy'));
    assert.equal(String(await p), 'xy');
    const eof = s.recv(10);
    s[kDeliverEnd]();
    assert.equal(await eof, null);
    assert.equal(await s.recv(10), null);
  });

  test('recv validates max', async () => {
    const { s } = setup();
    for (const bad of [0, -1, 1.5, Number.NaN]) await assert.rejects(s.recv(bad), code('ERR_INVALID_ARG'));
  });

  test('stopAtHole reports a hole without consuming it; recvHole consumes it (libvirt -3 then RecvHole)', async () => {
    const { s } = setup();
    s[kDeliver](data('abcd'));
    s[kDeliver](hole(100));
    s[kDeliver](hole(50)); // adjacent holes add up, as libvirt's client does
    s[kDeliver](data('xyz'));
    s[kDeliverEnd]();
    assert.equal(await s.recvHole(), 0, 'not at a hole');
    assert.equal(String(await s.recv(10, { stopAtHole: true })), 'abcd');
    assert.deepEqual(await s.recv(10, { stopAtHole: true }), { hole: 150 });
    assert.deepEqual(await s.recv(10, { stopAtHole: true }), { hole: 150 }, 'still there');
    assert.equal(s.position, 4);
    assert.equal(await s.recvHole(), 150);
    assert.equal(s.position, 154);
    assert.equal(await s.recvHole(), 0);
    assert.equal(String(await s.recv(10, { stopAtHole: true })), 'xyz');
    assert.equal(await s.recv(10, { stopAtHole: true }), null);
  });

  test('without stopAtHole a hole reads as zeros, consumed progressively', async () => {
    const { s } = setup();
    s[kDeliver](hole(150));
    s[kDeliver](data('z'));
    const parts: number[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await s.recv(64);
      assert.ok(Buffer.isBuffer(r));
      assert.ok(r.every((byte) => byte === 0));
      parts.push(r.length);
    }
    assert.deepEqual(parts, [64, 64, 22]);
    assert.equal(String(await s.recv(64)), 'z');
    assert.equal(s.position, 151);
  });

  test('recvHole after a partial zero read returns the rest of the hole', async () => {
    const { s } = setup();
    s[kDeliver](hole(100));
    await s.recv(30);
    assert.deepEqual(await s.recv(30, { stopAtHole: true }), { hole: 70 });
    assert.equal(await s.recvHole(), 70);
    assert.equal(s.position, 100);
  });

  test('zeros for a huge hole come in slices of the shared zero buffer', async () => {
    const { s } = setup();
    s[kDeliver](hole(10 * ZERO_CHUNK_SIZE));
    const r = await s.recv(Number.MAX_SAFE_INTEGER);
    assert.ok(Buffer.isBuffer(r));
    assert.equal(r.length, ZERO_CHUNK_SIZE);
    const again = await s.recv(ZERO_CHUNK_SIZE);
    assert.ok(Buffer.isBuffer(again));
    assert.equal(again.buffer, r.buffer, 'one shared buffer');
  });

  test('recvHole on a non-sparse stream is refused', async () => {
    const { s } = setup({ sparse: false });
    await assert.rejects(s.recvHole(), code('ERR_STREAM_NOT_SPARSE'));
  });

  test('a hole arriving on a non-sparse stream fails it with ERR_STREAM_NOT_SPARSE and aborts the channel', async () => {
    const { ch, s } = setup({ sparse: false });
    s[kDeliver](data('ab'));
    const pending = (async () => { await s.recv(2); return s.recv(2); })();
    s[kDeliver](hole(10));
    await assert.rejects(pending, (err: unknown) => {
      code('ERR_STREAM_NOT_SPARSE')(err);
      assert.match((err as Error).message, /hole.*not opened sparse/);
      return true;
    });
    assert.equal(s.state, 'failed');
    assert.equal(ch.count('abort'), 1, 'the peer is told to stop');
    await assert.rejects(s.recv(1), code('ERR_STREAM_NOT_SPARSE'));
  });

  test('a hole of invalid length is a protocol error; an empty one is nothing', async () => {
    for (const bad of [-5, 1.5, 2 ** 60]) {
      const { s } = setup();
      s[kDeliver](hole(bad));
      await assert.rejects(s.recv(1), code('ERR_PROTOCOL'));
    }
    const { s } = setup();
    s[kDeliver](hole(0));
    s[kDeliver](data('x'));
    s[kDeliverEnd]();
    assert.deepEqual(await s.recv(10, { stopAtHole: true }), Buffer.from('x'));
  });

  test('data after EOF, or data arriving on a sending stream, is a protocol error', async () => {
    const a = setup();
    a.s[kDeliverEnd]();
    a.s[kDeliver](data('late'));
    await assert.rejects(a.s.recv(1), code('ERR_PROTOCOL'));
    const b = setup({ direction: 'send' });
    b.s[kDeliver](data('x'));
    assert.equal(b.s.state, 'failed');
    assert.equal(b.ch.count('abort'), 1);
  });

  test('deliverError wins over queued data: pending and later calls reject with it', async () => {
    const { s } = setup();
    s[kDeliver](data('queued'));
    await s.recv(1);
    const remote = new SparsevirtError('VIR_ERR_SYSTEM_ERROR', 'stream had I/O failure');
    s[kDeliverError](remote);
    await assert.rejects(s.recv(10), (err) => err === remote);
    const { s: t } = setup();
    const pending = t.recv(10);
    t[kDeliverError](remote);
    await assert.rejects(pending, (err) => err === remote);
    assert.equal(t.queuedBytes, 0);
  });

  test('two concurrent recv calls are refused', async () => {
    const { s } = setup();
    const first = s.recv(10);
    await assert.rejects(s.recv(10), code('ERR_STREAM_STATE'));
    await assert.rejects(s.recvHole(), code('ERR_STREAM_STATE'));
    s[kDeliver](data('a'));
    assert.equal(String(await first), 'a');
  });

  test('the queue pauses the channel above the window and resumes it at half', async () => {
    const { ch, s } = setup({ highWaterMark: 100 });
    s[kDeliver]({ kind: 'data', bytes: Buffer.alloc(60) });
    assert.equal(ch.count('pause'), 0);
    s[kDeliver]({ kind: 'data', bytes: Buffer.alloc(60) });
    assert.equal(ch.count('pause'), 1, 'paused once above 100 bytes');
    s[kDeliver]({ kind: 'data', bytes: Buffer.alloc(60) });
    s[kDeliver](hole(1_000_000)); // holes hold no memory
    assert.equal(ch.count('pause'), 1, 'not paused twice');
    assert.equal(s.queuedBytes, 180);
    await s.recv(60);
    await s.recv(60); // 60 left > 50
    assert.equal(ch.count('resume'), 0);
    await s.recv(20); // 40 left <= 50
    assert.equal(ch.count('resume'), 1);
    assert.equal(s.queuedBytes, 40);
  });

  test('finishing before EOF drops the queue and resumes a paused channel', async () => {
    const { ch, s } = setup({ highWaterMark: 10 });
    s[kDeliver]({ kind: 'data', bytes: Buffer.alloc(30) });
    assert.equal(ch.count('pause'), 1);
    const confirm = deferred();
    ch.finishResult = () => confirm.promise;
    const fin = s.finish();
    assert.equal(s.queuedBytes, 0);
    assert.deepEqual(ch.log, ['pause', 'resume', 'finish'], 'the channel must drain what the peer still sends');
    s[kDeliver](data('late')); // discarded, not an error
    assert.equal(s.queuedBytes, 0);
    confirm.resolve();
    await fin;
    assert.equal(s.state, 'finished');
    await assert.rejects(s.recv(1), code('ERR_STREAM_STATE'));
  });

  test('finishing before EOF ends a pending recv with null', async () => {
    const { s } = setup();
    s[kDeliver](data('a'));
    const pending = (async () => [await s.recv(5), await s.recv(5)])();
    await new Promise(setImmediate); // the first recv returned, the second waits
    await s.finish();
    const [first, second] = await pending;
    assert.equal(String(first), 'a');
    assert.equal(second, null);
  });

  test('late packets after an abort are discarded', async () => {
    const { ch, s } = setup();
    s[kDeliver](data('a'));
    await s.abort();
    s[kDeliver](data('b'));
    s[kDeliver](hole(5));
    s[kDeliverEnd]();
    s[kDeliverError](new Error('late'));
    assert.equal(s.state, 'aborted');
    assert.equal(ch.count('abort'), 1);
  });

  test('deliverEnd on a stream with no direction yet is EOF (an empty download)', async () => {
    const { s } = setup();
    s[kDeliverEnd]();
    assert.equal(s.direction, 'recv');
    assert.equal(await s.recv(1), null);
  });

  test('the iterator yields merged holes and views, acknowledges EOF, and iterates once', async () => {
    const { ch, s } = setup();
    const a = Buffer.from('abcdef');
    s[kDeliver]({ kind: 'data', bytes: a });
    s[kDeliver](hole(3));
    s[kDeliver](hole(4));
    s[kDeliver](data('xyz'));
    s[kDeliverEnd]();
    await s.recv(2); // a partly read head comes out as a view of the rest
    const got: Array<string | number> = [];
    for await (const c of s) got.push(c.kind === 'data' ? c.bytes.toString() : c.length);
    assert.deepEqual(got, ['cdef', 7, 'xyz']);
    assert.deepEqual(ch.log, ['finish'], 'EOF acknowledged with finish');
    assert.equal(s.state, 'finished');
    assert.throws(() => s[Symbol.asyncIterator](), code('ERR_STREAM_STATE'));
  });

  test('breaking out of for-await aborts the stream', async () => {
    const { ch, s } = setup();
    s[kDeliver](data('a'));
    s[kDeliver](data('b'));
    for await (const c of s) {
      assert.equal(c.kind, 'data');
      break;
    }
    assert.equal(s.state, 'aborted');
    assert.deepEqual(ch.log, ['abort']);
    assert.equal((ch.abortReasons[0] as SparsevirtError).code, 'ERR_ABORTED');
    await assert.rejects(s.recv(1), code('ERR_STREAM_STATE'));
  });

  test('breaking out after the last chunk, with EOF already in, acknowledges instead', async () => {
    const { ch, s } = setup();
    s[kDeliver](data('a'));
    s[kDeliverEnd]();
    for await (const c of s) {
      assert.equal(c.kind, 'data');
      break;
    }
    assert.deepEqual(ch.log, ['finish']);
    assert.equal(s.state, 'finished');
  });

  test('a failure while iterating is thrown from the loop', async () => {
    const { s } = setup();
    const boom = new SparsevirtError('ERR_CONNECTION_CLOSED', 'connection closed');
    s[kDeliver](data('a'));
    const seen: string[] = [];
    await assert.rejects((async () => {
      for await (const c of s) {
        seen.push(c.kind);
        s[kDeliverError](boom);
      }
    })(), (err) => err === boom);
    assert.deepEqual(seen, ['data']);
  });
});

describe('abort and AbortSignal', { timeout: 30_000 }, () => {
  test('abort rejects pending calls with ERR_ABORTED (cause = reason), later calls with ERR_STREAM_STATE', async () => {
    const { ch, s } = setup();
    const gate = deferred();
    ch.writeGate = gate.promise; // never released: abort must not depend on the channel
    const pending = s.send(Buffer.from('a'));
    const reason = new Error('user cancelled');
    await s.abort(reason);
    await assert.rejects(pending, (err: unknown) => {
      code('ERR_ABORTED')(err);
      assert.equal((err as Error).cause, reason);
      return true;
    });
    await assert.rejects(s.send(Buffer.from('b')), code('ERR_STREAM_STATE'));
    assert.equal(ch.count('abort'), 1);
    assert.equal((ch.abortReasons[0] as SparsevirtError).code, 'ERR_ABORTED');
    assert.equal(ch.abortReasons[0]!.cause, reason);
    await s.abort(); // idempotent
    assert.equal(ch.count('abort'), 1);
  });

  test('abort drops a pending hole and never rejects, even if the channel does', async () => {
    const { ch, s } = setup();
    ch.abortResult = () => Promise.reject(new Error('peer could not abort cleanly'));
    await s.sendHole(100);
    await s.abort();
    assert.deepEqual(ch.log, ['abort']);
  });

  test('abort while finish waits for the peer rejects the finish', async () => {
    const { ch, s } = setup();
    ch.finishResult = () => new Promise<void>(() => {});
    const fin = s.finish();
    void s.abort('stop');
    await assert.rejects(fin, code('ERR_ABORTED'));
    assert.equal(s.state, 'aborted');
  });

  test('abort after finish is a no-op', async () => {
    const { ch, s } = setup();
    await s.finish();
    await s.abort();
    assert.deepEqual(ch.log, ['finish']);
    assert.equal(s.state, 'finished');
  });

  test('the signal aborts the stream: pending recv, send and finish reject with ERR_ABORTED, cause = signal.reason', async () => {
    const reason = new Error('deadline');
    for (const kind of ['recv', 'send', 'finish'] as const) {
      const ac = new AbortController();
      const { ch, s } = setup({ signal: ac.signal });
      assert.equal(getEventListeners(ac.signal, 'abort').length, 1, 'one listener');
      ch.writeGate = new Promise<void>(() => {});
      ch.finishResult = () => new Promise<void>(() => {});
      const pending = kind === 'recv' ? s.recv(1) : kind === 'send' ? s.send(Buffer.from('a')) : s.finish();
      ac.abort(reason);
      await assert.rejects(pending, (err: unknown) => {
        code('ERR_ABORTED')(err);
        assert.equal((err as Error).cause, reason);
        return true;
      }, kind);
      assert.equal(s.state, 'aborted');
      assert.equal(ch.count('abort'), 1);
      assert.equal(getEventListeners(ac.signal, 'abort').length, 0);
    }
  });

  test('the signal listener is removed when the stream ends normally or fails', async () => {
    const ac = new AbortController();
    const a = setup({ signal: ac.signal });
    const b = setup({ signal: ac.signal });
    assert.equal(getEventListeners(ac.signal, 'abort').length, 2);
    await a.s.finish();
    assert.equal(getEventListeners(ac.signal, 'abort').length, 1);
    b.s[kDeliverError](new Error('gone'));
    assert.equal(getEventListeners(ac.signal, 'abort').length, 0);
    ac.abort();
    assert.equal(a.s.state, 'finished');
    assert.equal(a.ch.count('abort'), 0);
  });

  test('an already-aborted signal aborts the stream at once', async () => {
    const reason = new Error('too late');
    const { ch, s } = setup({ signal: AbortSignal.abort(reason) });
    assert.equal(s.state, 'aborted');
    assert.equal(ch.abortReasons[0]!.cause, reason);
    await assert.rejects(s.send(Buffer.from('a')), code('ERR_STREAM_STATE'));
  });
});

describe('construction and observability', { timeout: 30_000 }, () => {
  test('options are validated', () => {
    const ch = new RecordingChannel();
    assert.throws(() => new Stream(ch, { sparse: true, highWaterMark: 0 }), code('ERR_INVALID_ARG'));
    assert.throws(() => new Stream(ch, { sparse: true, highWaterMark: 1.5 }), code('ERR_INVALID_ARG'));
    assert.throws(() => new Stream(ch, { sparse: true, direction: 'up' as 'send' }), code('ERR_INVALID_ARG'));
  });

  test('a final state is published on sparsevirt:stream:close', async () => {
    const seen: Array<{ stream: unknown; state: string; error: unknown }> = [];
    const onClose = (msg: unknown): void => {
      seen.push(msg as { stream: unknown; state: string; error: unknown });
    };
    diagnostics_channel.subscribe('sparsevirt:stream:close', onClose);
    try {
      const a = setup();
      await a.s.finish();
      const b = setup();
      await b.s.abort('x');
      assert.equal(seen.length, 2);
      assert.equal(seen[0]!.stream, a.s);
      assert.equal(seen[0]!.state, 'finished');
      assert.equal(seen[1]!.state, 'aborted');
      assert.equal((seen[1]!.error as SparsevirtError).code, 'ERR_ABORTED');
    } finally {
      diagnostics_channel.unsubscribe('sparsevirt:stream:close', onClose);
    }
  });
});
