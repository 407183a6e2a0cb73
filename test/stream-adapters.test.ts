// Node adapters: toReadable / toWritable with pipeline(), backpressure and teardown.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { describe, test } from 'node:test';
import type { Chunk } from '../src/chunk.js';
import { createStreamPair } from '../src/stream/index.js';
import { code, hasSettled } from './helpers/asserts.js';



function collector(objectMode = false): { sink: Writable; items: unknown[] } {
  const items: unknown[] = [];
  const sink = new Writable({
    objectMode,
    write(chunk, _encoding, callback) {
      items.push(chunk);
      callback();
    },
  });
  return { sink, items };
}

describe('toWritable / toReadable', { timeout: 30_000 }, () => {
  test('bytes through pipeline() on both ends', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true, highWaterMark: 32 * 1024 });
    const input = Array.from({ length: 40 }, (_, i) => Buffer.alloc(10_000 + i, i));
    const { sink, items } = collector();
    await Promise.all([
      pipeline(Readable.from(input), sender.toWritable()),
      pipeline(receiver.toReadable(), sink),
    ]);
    assert.deepEqual(Buffer.concat(items as Buffer[]), Buffer.concat(input));
    assert.equal(sender.state, 'finished');
    assert.equal(receiver.state, 'finished');
  });

  test('objectMode: Chunks in, Chunks out, holes merged', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const input: Array<Chunk | Buffer> = [
      { kind: 'hole', length: 4096 }, { kind: 'hole', length: 100 }, Buffer.from('abc'),
      { kind: 'data', bytes: Buffer.from('def') }, { kind: 'hole', length: 7 },
    ];
    const { sink, items } = collector(true);
    await Promise.all([
      pipeline(Readable.from(input), sender.toWritable({ objectMode: true })),
      pipeline(receiver.toReadable({ holes: 'chunks' }), sink),
    ]);
    const seen = (items as Chunk[]).map((c) => (c.kind === 'data' ? c.bytes.toString() : c.length));
    assert.deepEqual(seen, [4196, 'abc', 'def', 7]);
  });

  test('byte mode reads holes as zeros, in bounded slices', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const holeLength = 5 * 1024 * 1024 + 3;
    const sent = sender.sendChunks((async function* (): AsyncGenerator<Chunk> {
      yield { kind: 'data', bytes: Buffer.from('A') };
      yield { kind: 'hole', length: holeLength };
      yield { kind: 'data', bytes: Buffer.from('Z') };
    })());
    let total = 0;
    let nonZero = '';
    let largest = 0;
    await pipeline(receiver.toReadable(), new Writable({
      write(chunk: Buffer, _encoding, callback) {
        total += chunk.length;
        largest = Math.max(largest, chunk.length);
        for (const b of chunk) if (b !== 0) nonZero += String.fromCharCode(b);
        callback();
      },
    }));
    await sent;
    assert.equal(total, holeLength + 2);
    assert.equal(nonZero, 'AZ');
    assert.ok(largest <= 1024 * 1024, 'a hole is pushed in slices, not as one huge buffer');
  });

  test('the Readable pulls only when read(): the producer stays paused until then', async () => {
    const window = 64 * 1024;
    const piece = 16 * 1024;
    const { sender, receiver } = createStreamPair({ sparse: true, highWaterMark: window });
    // the Readable's own buffer set here: Node's default is 16 KiB up to Node 20, 64 KiB from 22
    const readable = receiver.toReadable({ highWaterMark: piece });
    for (let i = 0; i < 4; i++) await sender.send(Buffer.alloc(piece, i)); // 64 KiB: at the window
    const fifth = sender.send(Buffer.alloc(piece, 4)); // 80 KiB > window: waits
    assert.equal(await hasSettled(fifth), false, 'the producer is paused');
    assert.equal(receiver.queuedBytes, 5 * piece, 'nothing pulled before read()');

    assert.equal(readable.read(), null); // starts pulling, up to the Readable's own buffer
    await once(readable, 'readable');
    assert.ok(readable.readableLength >= readable.readableHighWaterMark);
    assert.ok(readable.readableLength <= readable.readableHighWaterMark + piece);
    assert.equal(receiver.queuedBytes, 5 * piece - readable.readableLength, 'pulled exactly what was buffered');
    assert.equal(await hasSettled(fifth), false, 'still paused: above half the window');

    const { sink, items } = collector();
    const done = pipeline(readable, sink);
    await fifth;
    await sender.finish();
    await done;
    assert.equal(Buffer.concat(items as Buffer[]).length, 5 * piece);
  });

  test('destroying the Readable early aborts the stream', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true, highWaterMark: 1024 });
    const readable = receiver.toReadable();
    const sent = sender.sendChunks((async function* (): AsyncGenerator<Chunk> {
      for (;;) yield { kind: 'data', bytes: Buffer.alloc(512) };
    })());
    readable.once('data', () => readable.destroy());
    await once(readable, 'close');
    assert.equal(receiver.state, 'aborted');
    await assert.rejects(sent, code('ERR_ABORTED'));
  });

  test('a failing destination aborts the stream with its error', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const boom = new Error('EIO');
    const sent = sender.sendChunks((async function* (): AsyncGenerator<Chunk> {
      for (;;) yield { kind: 'data', bytes: Buffer.alloc(512) };
    })());
    await assert.rejects(pipeline(receiver.toReadable(), new Writable({
      write(_chunk, _encoding, callback) {
        callback(boom);
      },
    })), (err) => err === boom);
    assert.equal(receiver.state, 'aborted');
    await assert.rejects(sent, (err: unknown) => {
      code('ERR_ABORTED')(err);
      assert.equal(((err as Error).cause as Error).cause, boom, 'the destination\'s error travels as the reason');
      return true;
    });
  });

  test('a failing source aborts the sending stream through its Writable', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    const boom = new Error('read error');
    const received = (async () => {
      for await (const _ of receiver) { /* drain */ }
    })();
    await assert.rejects(pipeline(Readable.from((async function* () {
      yield Buffer.from('a');
      throw boom;
    })()), sender.toWritable()), (err) => err === boom);
    assert.equal(sender.state, 'aborted');
    await assert.rejects(received, code('ERR_ABORTED'));
  });

  test('destroying the Writable before end() aborts; after finish it does nothing', async () => {
    const a = createStreamPair({ sparse: true });
    const w = a.sender.toWritable();
    w.write(Buffer.from('x'));
    w.destroy();
    await once(w, 'close');
    assert.equal(a.sender.state, 'aborted');
    await assert.rejects(a.receiver.recv(10).then(() => a.receiver.recv(10)), code('ERR_ABORTED'));

    const b = createStreamPair({ sparse: true });
    const drained = b.receiver.recvAll(() => {});
    const w2 = b.sender.toWritable();
    w2.end(Buffer.from('y'));
    await once(w2, 'close'); // 'finish', then autoDestroy: our destroy runs on a finished stream
    await drained;
    assert.equal(b.sender.state, 'finished');
    assert.equal(b.receiver.state, 'finished');
  });

  test('an objectMode Writable rejects values that are neither Buffers nor Chunks', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    void receiver.recvAll(() => {}).catch(() => {});
    const w = sender.toWritable({ objectMode: true });
    const errored = new Promise<unknown>((resolve) => w.once('error', resolve));
    const closed = new Promise((resolve) => w.once('close', resolve)); // emitted right after 'error'
    w.write({ kind: 'bogus' });
    code('ERR_INVALID_ARG')(await errored);
    await closed;
    assert.equal(sender.state, 'aborted');
  });

  test('adapters refuse the wrong direction and bad options', async () => {
    const { sender, receiver } = createStreamPair({ sparse: true });
    assert.throws(() => sender.toReadable(), code('ERR_STREAM_STATE'));
    assert.throws(() => receiver.toReadable({ holes: 'nope' as 'zeros' }), code('ERR_INVALID_ARG'));
    receiver.toReadable().destroy();
    assert.throws(() => receiver.toReadable(), code('ERR_STREAM_STATE'), 'iterate once');
  });
});
