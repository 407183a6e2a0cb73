/**
 * Receiving in place: a receiving stream whose consumer asked for it (`Stream.receiveInto`)
 * gets large data packets written straight into its file by the rpc layer (splice: socket →
 * pipe → file), and sees them as `WrittenRange`s. The sending side here is a raw socket the
 * test writes frames to, so that a packet can arrive in pieces, and the receiving side is a
 * client Peer on a socket opened as the transport opens it (net's `onread`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Peer } from '../src/rpc/peer.js';
import { ReadHook, setReadHook } from '../src/io/read-hook.js';
import { buildFrameHead, MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, type Header } from '../src/rpc/message.js';
import { XdrWriter } from '../src/xdr/index.js';
import { P } from '../src/protocol/remote.js';
import { Stream } from '../src/stream/index.js';
import { fileRef, writeChunks } from '../src/sparse/index.js';
import { nativeSyscallsAvailable, setNativeSyscalls } from '../src/io/sys.js';
import type { Chunk, WrittenRange } from '../src/chunk.js';
import { allocatedBytes, scratchDir } from './helpers/images.js';

const KiB = 1024;
const PACKET = 262120; // libvirt's full data packet
const PROC = P.STORAGE_VOL_DOWNLOAD.num;
const SERIAL = 7;
const HEAD: Header = { prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: PROC, type: MessageType.STREAM, serial: SERIAL, status: Status.CONTINUE };

function dataFrame(bytes: Buffer): Buffer {
  return Buffer.concat([buildFrameHead(HEAD, bytes.length), bytes]);
}
function holeFrame(length: number): Buffer {
  const w = new XdrWriter(12);
  w.hyper(length).uint(0);
  const payload = w.view();
  return Buffer.concat([buildFrameHead({ ...HEAD, type: MessageType.STREAM_HOLE }, payload.length), payload]);
}
const EOF = buildFrameHead(HEAD, 0);

/**
 * A client Peer reading a socket through net's `onread` (as the transport connects), the raw
 * server end the test writes to, and a receiving sparse stream on (PROC, SERIAL). The raw end
 * confirms the first thing the client sends: its finish.
 */
async function rawPair(dir: string): Promise<{ client: Peer; raw: net.Socket; stream: Stream; close: () => void }> {
  const sockPath = path.join(dir, 'raw.sock');
  const srv = net.createServer();
  const accepted = new Promise<net.Socket>((resolve) => srv.once('connection', resolve));
  await new Promise<void>((r) => srv.listen(sockPath, r));
  const hook = new ReadHook();
  const sock = net.createConnection({ path: sockPath, onread: hook.onread } as unknown as net.NetConnectOpts);
  setReadHook(sock, hook);
  await new Promise<void>((r) => sock.once('connect', () => r()));
  const raw = await accepted;
  // the client's finish (acknowledging EOF) gets the daemon's confirmation
  raw.once('data', () => raw.write(buildFrameHead({ ...HEAD, status: Status.OK }, 0)));
  const client = new Peer(sock, { role: 'client', abortTimeout: 500 });
  const wire = client.openStream(PROC, SERIAL, { sparse: true, sending: false });
  const stream = new Stream(wire, { sparse: true, direction: 'recv' });
  wire.attach(stream);
  return {
    client, raw, stream,
    close: () => {
      client.destroy(new Error('test done'));
      raw.destroy();
      srv.close();
    },
  };
}

/** `rawPair` in a fresh directory on tmpfs, for `fn`; everything closed and removed after. */
async function withRawPair(fn: (ctx: { dir: string; client: Peer; raw: net.Socket; stream: Stream }) => Promise<void>): Promise<void> {
  const dir = await scratchDir('/dev/shm', 'sv-inplace-');
  const { close, ...ctx } = await rawPair(dir);
  try {
    await fn({ dir, ...ctx });
  } finally {
    close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Write `buf` to the raw socket in `pieces`, pausing between them so that each is read apart. */
async function trickle(raw: net.Socket, buf: Buffer, cuts: number[]): Promise<void> {
  let at = 0;
  for (const cut of [...cuts, buf.length]) {
    raw.write(buf.subarray(at, cut));
    at = cut;
    await sleep(30);
  }
}

const native = nativeSyscallsAvailable();

test('in place: large packets go from the socket into the file by splice, also one that arrives in pieces; holes, small data and EOF as usual; bytes identical, holes unallocated', { skip: !native && 'needs the native syscalls' }, async () => {
  await withRawPair(async ({ client, raw, stream, dir }) => {
    const a = randomBytes(PACKET);
    const a2 = randomBytes(PACKET);
    const b = randomBytes(PACKET);
    const c = randomBytes(PACKET);
    const small = randomBytes(1000);
    const out = path.join(dir, 'out.img');
    const ranges: WrittenRange[] = [];
    const source = stream.chunksInPlace();
    const seen = (async function* () {
      for await (const chunk of source) {
        if (chunk.kind === 'written') ranges.push(chunk);
        yield chunk;
      }
    })();
    let opened!: () => void;
    const inPlace = new Promise<void>((resolve) => (opened = resolve));
    const writing = writeChunks(out, seen, {
      truncate: true,
      receiveInto: (t) => {
        if (t) opened();
        return stream.receiveInto(t);
      },
    });
    // The first large packet is read as usual: it tells the Peer that data flows, and the writer
    // that large data comes (it asks for in place then). The second is read as usual too: its
    // buffer was picked when the first was read (Node asks for the next read's buffer at once).
    // The third comes in three pieces: its header and a part, then the rest in two reads.
    raw.write(dataFrame(a));
    await inPlace;
    raw.write(dataFrame(a2));
    await sleep(30);
    await trickle(raw, dataFrame(b), [28 + 1000, 28 + 100 * KiB]);
    raw.write(Buffer.concat([holeFrame(1 << 20), dataFrame(c), dataFrame(small), EOF]));
    const result = await writing;
    assert.equal(result.dataBytes, 4 * PACKET + 1000);
    assert.equal(result.holeBytes, 1 << 20);
    const expected = Buffer.concat([a, a2, b, Buffer.alloc(1 << 20), c, small]);
    assert.ok(fs.readFileSync(out).equals(expected), 'the file holds the stream');
    assert.ok(await allocatedBytes(out) <= 4 * PACKET + 1000 + 8 * KiB + 8 * KiB, 'the hole is not allocated');
    // b and c were written in place, at their offsets; a and a2 came as data
    assert.deepEqual(ranges.map((r) => [r.offset, r.length, r.error]), [[2 * PACKET, PACKET, undefined], [3 * PACKET + (1 << 20), PACKET, undefined]]);
    assert.equal(client.stats.splicedFrames, 2);
    assert.ok(client.stats.splicedBytes > PACKET, `spliced ${client.stats.splicedBytes} bytes (the pieces read apart are written from a buffer)`);
  });
});

test('in place: byte reads (recv, the plain iterator) get a written range read back from the file', { skip: !native && 'needs the native syscalls' }, async () => {
  await withRawPair(async ({ raw, stream, dir }) => {
    const fd = fs.openSync(path.join(dir, 'f.img'), 'w+');
    assert.equal(stream.receiveInto({ file: fileRef(fd), base: 0 }), true, 'a Peer stream takes data in place');
    const a = randomBytes(PACKET);
    const b = randomBytes(PACKET);
    raw.write(dataFrame(a));
    await sleep(30);
    raw.write(Buffer.concat([dataFrame(b), EOF]));
    const got: Buffer[] = [];
    for await (const chunk of stream as AsyncIterable<Chunk>) {
      assert.equal(chunk.kind, 'data');
      if (chunk.kind === 'data') got.push(Buffer.from(chunk.bytes));
    }
    assert.ok(Buffer.concat(got).equals(Buffer.concat([a, b])), 'the bytes, in order');
    // the second packet went into the file, at its stream position
    assert.ok(fs.readFileSync(path.join(dir, 'f.img')).subarray(PACKET).equals(b));
    fs.closeSync(fd);
  });
});

test('in place: a file that refuses the write fails only that packet (its error reaches the consumer); the connection stays in step', { skip: !native && 'needs the native syscalls' }, async () => {
  await withRawPair(async ({ client, raw, stream, dir }) => {
    const file = path.join(dir, 'ro.img');
    fs.writeFileSync(file, '');
    const fd = fs.openSync(file, 'r'); // read-only: splice into it fails (EBADF)
    assert.equal(stream.receiveInto({ file: fileRef(fd), base: 0 }), true);
    const a = randomBytes(PACKET);
    const b = randomBytes(PACKET);
    const small = randomBytes(300);
    raw.write(dataFrame(a));
    await sleep(30);
    raw.write(Buffer.concat([dataFrame(b), dataFrame(small), EOF]));
    const first = await stream.recvChunk();
    assert.equal(first?.kind, 'data');
    const second = await stream.recvChunk();
    assert.equal(second?.kind, 'written');
    assert.ok(second?.kind === 'written' && second.error, 'the range carries the write error');
    assert.equal((second as WrittenRange).length, PACKET);
    // the frames after it are parsed as before: the payload was drained off the socket
    const third = await stream.recvChunk();
    assert.ok(third?.kind === 'data' && third.bytes.equals(small), 'the next packet is intact');
    assert.equal(await stream.recvChunk(), null);
    assert.equal(fs.statSync(file).size, 0, 'nothing was written');
    // and the connection is still open
    assert.equal(client.closed, false);
    fs.closeSync(fd);
  });
});

test('in place: a consumer that stops in the middle of a packet gets that packet as an error, and nothing more is written', { skip: !native && 'needs the native syscalls' }, async () => {
  await withRawPair(async ({ client, raw, stream, dir }) => {
    const file = path.join(dir, 'f.img');
    const fd = fs.openSync(file, 'w+');
    assert.equal(stream.receiveInto({ file: fileRef(fd), base: 0 }), true);
    const a = randomBytes(PACKET);
    const b = randomBytes(PACKET);
    raw.write(dataFrame(a));
    await sleep(30);
    const framed = dataFrame(b);
    raw.write(framed.subarray(0, 28 + 1000));
    for (let i = 0; i < 200 && client.stats.splicedBytes < 1000; i++) await sleep(10);
    assert.equal(client.stats.splicedBytes, 1000, 'the first part of the packet went in place');
    stream.receiveInto(null); // stop: the packet is half in
    raw.write(Buffer.concat([framed.subarray(28 + 1000), EOF]));
    assert.equal((await stream.recvChunk())?.kind, 'data');
    const second = await stream.recvChunk();
    assert.ok(second?.kind === 'written' && second.error, 'the half-written packet is an error, not data');
    assert.equal(second.error.message.includes('stopped taking data in place'), true, second.error.message);
    assert.equal(await stream.recvChunk(), null);
    assert.equal(fs.statSync(file).size, PACKET + 1000, 'only the part before the stop was written');
    fs.closeSync(fd);
  });
});

test('in place: not on an in-memory pair or a sending stream (receiveInto answers false), nor without the native syscalls', async () => {
  const { createStreamPair } = await import('../src/stream/index.js');
  const { sender: a, receiver: b } = createStreamPair({ sparse: true });
  const fd = fs.openSync('/dev/null', 'w');
  try {
    assert.equal(b.receiveInto({ file: fileRef(fd), base: 0 }), false, 'the pair has no socket to splice from');
    await a.send(Buffer.from('x'));
    assert.equal(a.receiveInto({ file: fileRef(fd), base: 0 }), false, 'a sending stream');
  } finally {
    fs.closeSync(fd);
    await a.abort();
    await b.abort();
  }
  await withRawPair(async ({ stream, dir }) => {
    const was = nativeSyscallsAvailable();
    try {
      setNativeSyscalls(false);
      const fd2 = fs.openSync(path.join(dir, 'f.img'), 'w');
      assert.equal(stream.receiveInto({ file: fileRef(fd2), base: 0 }), false, 'without the native syscalls');
      fs.closeSync(fd2);
    } finally {
      setNativeSyscalls(was);
    }
  });
});

test('SparseWriter and written ranges: one at the position counts as data written, one elsewhere is refused, one with an error fails the writer with it', async () => {
  const { SparseWriter } = await import('../src/sparse/index.js');
  const dir = await scratchDir('/dev/shm', 'sv-inplace-w-');
  try {
    const file = path.join(dir, 'w.img');
    const w = await SparseWriter.open(file, { truncate: true });
    await w.write({ kind: 'data', bytes: Buffer.alloc(1000, 1) });
    // the range is in the file already (as a stream would have put it)
    fs.writeFileSync(file, Buffer.alloc(5000, 2), { flag: 'r+' });
    await w.write({ kind: 'written', file: fileRef(0), offset: 1000, length: 4000 });
    assert.equal(w.position, 5000);
    await assert.rejects(w.write({ kind: 'written', file: fileRef(0), offset: 9999, length: 10 }), (e: Error & { code?: string }) => e.code === 'ERR_STREAM_STATE');
    const result = await w.close();
    assert.deepEqual(result, { dataBytes: 5000, holeBytes: 0 });
    const got = fs.readFileSync(file);
    assert.ok(got.subarray(0, 1000).equals(Buffer.alloc(1000, 1)), 'the data written before the range landed at 0 (flushed before it)');
    assert.ok(got.subarray(1000).equals(Buffer.alloc(4000, 2)));

    const w2 = await SparseWriter.open(path.join(dir, 'w2.img'));
    const cause = Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
    await assert.rejects(w2.write({ kind: 'written', file: fileRef(0), offset: 0, length: 10, error: cause }), (e: Error & { code?: string; cause?: unknown }) => e.code === 'ERR_IO' && /cannot write/.test(e.message));
    await assert.rejects(w2.write({ kind: 'data', bytes: Buffer.alloc(1) }), (e: Error & { code?: string }) => e.code === 'ERR_IO', 'the writer stays failed');
    await w2.abort();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('an error reply for a stream that already ended (libvirtd answering an abort late) is dropped: the connection lives on', async () => {
  const { encodeRemoteError } = await import('../src/rpc/structs.js');
  const { remoteErrorFields, VIR_DOMAIN, VIR_ERR_CODE } = await import('../src/errors.js');
  await withRawPair(async ({ client, raw, stream }) => {
    await stream.abort(new Error('stop')); // the raw end confirms it (rawPair)
    assert.equal(stream.state, 'aborted');
    const fields = remoteErrorFields(VIR_ERR_CODE.INTERNAL_ERROR, VIR_DOMAIN.STREAMS, 'too late');
    raw.write(Buffer.concat([buildFrameHead({ ...HEAD, type: MessageType.REPLY, status: Status.ERROR }, encodeRemoteError(fields).length), encodeRemoteError(fields)]));
    await sleep(100);
    assert.equal(client.closed, false, 'not taken for a lost conversation');
    // the same reply on a serial that never was a stream still ends the connection
    const closed = new Promise<Error>((resolve) => client.once('close', resolve));
    raw.write(Buffer.concat([buildFrameHead({ ...HEAD, serial: 999, type: MessageType.REPLY, status: Status.ERROR }, encodeRemoteError(fields).length), encodeRemoteError(fields)]));
    assert.match((await closed).message, /reply without a pending call/);
  });
});
