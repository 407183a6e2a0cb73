/**
 * Buffers lent to the wire (`lendToWire`, io/pools.ts): the outbox hands a lent payload back once
 * it copied it into its output batch, or once the socket's write of it completed, never while a
 * write still holds it; a connection that goes drops its writes and hands them back; bytes handed
 * back twice never free a buffer. Over a real unix socket whose reader reads only when told.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { isLent, lendToWire, payloadSent } from '../src/io/pools.js';
import { newDataPathStats, RawSocket } from '../src/io/socket.js';
import { SocketWriter } from '../src/io/socket-writer.js';
import { Outbox } from '../src/rpc/outbox.js';
import { FRAME_OVERHEAD, MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, type Header } from '../src/rpc/message.js';
import { scratchDir } from './helpers/images.js';

const MiB = 1 << 20;
const HEAD: Header = { prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: 209, type: MessageType.STREAM, serial: 7, status: Status.CONTINUE };

/** A connected pair: our outbox on one end, a paused reader on the other. */
async function pair(): Promise<{ outbox: Outbox; sock: net.Socket; peer: net.Socket; close: () => void }> {
  const dir = await scratchDir('/dev/shm', 'svd-loans-');
  const sockPath = path.join(dir, 's');
  const srv = net.createServer();
  const accepted = new Promise<net.Socket>((resolve) => srv.once('connection', resolve));
  await new Promise<void>((r) => srv.listen(sockPath, r));
  const sock = net.createConnection(sockPath);
  await new Promise<void>((r) => sock.once('connect', () => r()));
  const peer = await accepted;
  peer.pause();
  const stats = newDataPathStats();
  const outbox = new Outbox(new SocketWriter(new RawSocket(sock), stats), stats);
  return { outbox, sock, peer, close: () => { sock.destroy(); peer.destroy(); srv.close(); void fs.rm(dir, { recursive: true, force: true }); } };
}

/** Reads `n` bytes from the paused `peer`. */
async function readAll(peer: net.Socket, n: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let got = 0;
  peer.resume();
  await new Promise<void>((resolve) => {
    const onData = (b: Buffer): void => {
      parts.push(b);
      got += b.length;
      if (got >= n) {
        peer.off('data', onData);
        peer.pause();
        resolve();
      }
    };
    peer.on('data', onData);
  });
  return Buffer.concat(parts);
}

const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 20));

test('a lent buffer comes back once every frame of it is written, not before; the bytes arrive as they were', async () => {
  const { outbox, peer, close } = await pair();
  try {
    const buf = Buffer.allocUnsafeSlow(8 * MiB);
    const want = randomBytes(8 * MiB);
    want.copy(buf);
    let back = 0;
    lendToWire(buf, buf.length, (b) => {
      assert.equal(b, buf);
      back++;
    });
    assert.ok(isLent(buf.subarray(5, 10)));
    const max = 262_120;
    let frames = 0;
    for (let at = 0; at < buf.length; at += max) {
      outbox.sendFrame(HEAD, buf.subarray(at, Math.min(buf.length, at + max)));
      frames++;
    }
    await tick();
    // the reader has not read: most writes wait in Node's queue, the buffer is not back
    assert.equal(back, 0);
    const got = await readAll(peer, buf.length + frames * FRAME_OVERHEAD);
    await tick();
    assert.equal(back, 1, 'back once all is written');
    assert.ok(!isLent(buf));
    // frames as they were sent: header, then the payload
    let pos = 0;
    const payload: Buffer[] = [];
    while (pos < got.length) {
      const len = got.readUInt32BE(pos);
      payload.push(got.subarray(pos + FRAME_OVERHEAD, pos + len));
      pos += len;
    }
    assert.ok(Buffer.concat(payload).equals(want));
  } finally {
    close();
  }
});

test('small lent payloads come back once copied into the batch; unrelated buffers and an over-return are ignored', async () => {
  const { outbox, close } = await pair();
  try {
    const buf = Buffer.allocUnsafeSlow(64 * 1024);
    let back = 0;
    lendToWire(buf, 16 * 1024, () => back++);
    outbox.sendFrame(HEAD, buf.subarray(0, 8 * 1024));
    assert.equal(back, 0);
    outbox.sendFrame(HEAD, buf.subarray(8 * 1024, 16 * 1024));
    assert.equal(back, 1, 'copied: back at once');
    payloadSent(Buffer.alloc(100));
    // more bytes back than were lent: never given back (the accounting is off)
    const other = Buffer.allocUnsafeSlow(1024);
    let otherBack = 0;
    lendToWire(other, 100, () => otherBack++);
    payloadSent(other.subarray(0, 200));
    assert.equal(otherBack, 0);
    assert.ok(!isLent(other));
    // nothing lent: back at once
    let none = 0;
    lendToWire(Buffer.allocUnsafeSlow(16), 0, () => none++);
    assert.equal(none, 1);
  } finally {
    close();
  }
});

test('a connection that goes hands back the writes it dropped', async () => {
  const { outbox, sock, close } = await pair();
  try {
    const buf = Buffer.allocUnsafeSlow(4 * MiB);
    let back = 0;
    lendToWire(buf, buf.length, () => back++);
    for (let at = 0; at < buf.length; at += MiB) outbox.sendFrame(HEAD, buf.subarray(at, at + MiB));
    await tick();
    assert.equal(back, 0);
    outbox.destroy(new Error('gone'));
    sock.destroy();
    await tick();
    assert.equal(back, 1);
    // after the end, a payload is not queued: back at once
    const late = Buffer.allocUnsafeSlow(MiB);
    let lateBack = 0;
    lendToWire(late, MiB, () => lateBack++);
    outbox.sendFrame(HEAD, late);
    assert.equal(lateBack, 1);
  } finally {
    close();
  }
});
