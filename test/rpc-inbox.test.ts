/**
 * The Inbox on a socket read through its hook, with the kernel played by the test: each read
 * gets the bytes the inbox's target can take (or a random part of them). Frames must come out
 * whole, in order and untouched later (payloads are views of the read buffers), however the
 * reads cut them; and a small frame cut by a read must not cost a read of its own.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import { ReadHook, setReadHook } from '../src/io/read-hook.js';
import { newDataPathStats, RawSocket } from '../src/io/socket.js';
import { Inbox } from '../src/rpc/inbox.js';
import { FrameParser } from '../src/rpc/parser.js';
import { buildFrame, FRAME_MAX, MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, type Header, type Message } from '../src/rpc/message.js';
import { rng } from './protocol-support.js';

const head = (type: number, serial: number): Header => ({ prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: 209, type, serial, status: Status.CONTINUE });

function holeFrame(serial: number, length: number): Buffer {
  const p = Buffer.alloc(12);
  p.writeUInt32BE(Math.floor(length / 2 ** 32), 0);
  p.writeUInt32BE(length >>> 0, 4);
  return buildFrame(head(MessageType.STREAM_HOLE, serial), p);
}

function dataFrame(serial: number, n: number, seed: number): Buffer {
  const p = Buffer.alloc(n);
  for (let i = 0; i < n; i += 4) p.writeUInt32BE((seed * 2654435761 + i) >>> 0, i);
  return buildFrame(head(MessageType.STREAM, serial), p);
}

interface Run {
  got: Message[];
  reads: number;
}

/**
 * Feed `wire` to an Inbox through its read hook: each read takes what the target can hold, at
 * most `cap(target length)` bytes.
 */
function feed(wire: Buffer, cap: (room: number) => number): Run {
  const hook = new ReadHook();
  const socket = new EventEmitter() as unknown as Duplex;
  setReadHook(socket, hook);
  const stats = newDataPathStats();
  const got: Message[] = [];
  const inbox = new Inbox(socket, new RawSocket(socket), stats, {
    message: (m) => got.push(m),
    fail: (err) => assert.fail(err),
    received: () => undefined,
    receiver: () => undefined,
  }, FRAME_MAX);
  let pos = 0;
  while (pos < wire.length) {
    const target = hook.onread.buffer();
    assert.ok(target.length > 0, 'a read target with room');
    const n = Math.min(wire.length - pos, target.length, Math.max(1, cap(target.length)));
    wire.copy(target, 0, pos, pos + n);
    pos += n;
    hook.onread.callback(n, target);
  }
  inbox.destroy();
  return { got, reads: stats.reads };
}

/** Every frame of `frames` came out, in order, with its header and payload bytes (checked at the end: views must stay intact). */
function checkFrames(got: Message[], frames: Buffer[]): void {
  assert.equal(got.length, frames.length, 'frames delivered');
  for (let i = 0; i < frames.length; i++) {
    const f = frames[i]!;
    const m = got[i]!;
    const want = f.subarray(28);
    if (m.type !== f.readInt32BE(16) || m.serial !== f.readUInt32BE(20) || !m.payload.equals(want)) {
      assert.fail(`frame #${i} differs (type ${m.type}, ${m.payload.length} bytes, expected ${want.length})`);
    }
  }
}

test('4 KiB extents (a hole frame and a 4 KiB data frame each): a frame cut by a read comes with the next read, not alone; about one read per 128 KiB', () => {
  const frames: Buffer[] = [];
  for (let i = 0; i < 2000; i++) frames.push(holeFrame(1, 40960), dataFrame(1, 4096, i));
  const wire = Buffer.concat(frames);
  const { got, reads } = feed(wire, (room) => room);
  checkFrames(got, frames);
  // a read for the rest of each cut frame alone would double the reads (~130 here)
  assert.ok(reads <= Math.ceil(wire.length / (96 * 1024)), `${reads} reads for ${wire.length} bytes`);
});

test('reads cut anywhere (random sizes, single bytes, length words split), small and large frames mixed: every frame whole, in order, and its payload never overwritten', () => {
  for (const seed of [1, 2, 3, 4, 5, 6]) {
    const r = rng(seed);
    const frames: Buffer[] = [];
    for (let i = 0; i < 400; i++) {
      const k = r();
      if (k < 0.4) frames.push(holeFrame(2, 1 + Math.floor(r() * 2 ** 40)));
      else if (k < 0.8) frames.push(dataFrame(2, 4 * (1 + Math.floor(r() * 2048)), i));
      else if (k < 0.9) frames.push(dataFrame(2, 4 * (8192 + Math.floor(r() * 57338)), i)); // 32 KiB to the packet maximum
      else frames.push(buildFrame({ ...head(MessageType.REPLY, 3), proc: 1 }));
    }
    const wire = Buffer.concat(frames);
    const caps = [(room: number) => room, () => 1, () => 1 + Math.floor(r() * 7), (room: number) => 1 + Math.floor(r() * room), () => 1 + Math.floor(r() * 40000)];
    for (const cap of caps) checkFrames(feed(wire, cap).got, frames);
  }
});

test('frame heads: every header field round-trips at its extremes (signed and unsigned words), as Buffer reads them', () => {
  const r = rng(7);
  const words = [0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 0x20008086];
  const ints = [0, 1, -1, 0x7fffffff, -0x80000000, 209];
  for (let i = 0; i < 500; i++) {
    const pick = <T>(a: T[]): T => (i < 36 ? a[i % a.length]! : a[Math.floor(r() * a.length)]!);
    const h: Header = { prog: pick(words), vers: pick(words), proc: pick(ints), type: pick(ints), serial: pick(words), status: pick(ints) };
    const payload = Buffer.alloc(Math.floor(r() * 64), i);
    const frame = buildFrame(h, payload);
    assert.deepEqual(
      [frame.readUInt32BE(0), frame.readUInt32BE(4), frame.readUInt32BE(8), frame.readInt32BE(12), frame.readInt32BE(16), frame.readUInt32BE(20), frame.readInt32BE(24)],
      [frame.length, h.prog, h.vers, h.proc, h.type, h.serial, h.status],
    );
    const got: Message[] = [];
    new FrameParser().push(frame, (m) => got.push(m));
    assert.equal(got.length, 1);
    const m = got[0]!;
    assert.deepEqual({ prog: m.prog, vers: m.vers, proc: m.proc, type: m.type, serial: m.serial, status: m.status }, h);
    assert.ok(m.payload.equals(payload));
  }
});
