/**
 * The Peer on both sides of a real unix socket: calls and replies, download and upload streams
 * with holes, finish/abort handshakes, keepalive, and libvirt 9.0's quirks (docs/libvirt-quirks.md: download-past-end-fails, hole-errors-as-reply).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { nativeSyscallsAvailable, socketOutq } from '../src/io/sys.js';
import { busyPollState } from '../src/io/busy-poll.js';
import type { Peer } from '../src/rpc/peer.js';
import { fileRef } from '../src/io/file.js';
import { peerPair, serveDownloads, startDownload } from './helpers/peers.js';
import { MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, type Message } from '../src/rpc/message.js';
import { encodeRemoteError } from '../src/rpc/structs.js';
import { P } from '../src/protocol/remote.js';
import { Stream } from '../src/stream/index.js';
import { connect } from '../src/index.js';
import { remoteErrorFields, type RemoteError, SparsevirtError } from '../src/errors.js';
import type { Chunk } from '../src/chunk.js';

interface Pair { client: Peer; server: Peer; cleanup: () => void }

async function pair(opts: { keepalive?: number; count?: number; busyPoll?: number } = {}): Promise<Pair> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'sv-peer-'));
  const ka = { keepaliveInterval: opts.keepalive, keepaliveCount: opts.count };
  const { client, server, close } = await peerPair(dir, { server: ka, client: { ...ka, busyPoll: opts.busyPoll } });
  return {
    client, server,
    cleanup: () => {
      close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

const vol = { pool: 'p', name: 'v', key: '/p/v' };
const data = (n: number, seed: number) => Buffer.alloc(n, seed);

async function collect(s: AsyncIterable<Chunk>): Promise<Chunk[]> {
  const out: Chunk[] = [];
  for await (const c of s) out.push(c.kind === 'data' ? { kind: 'data', bytes: Buffer.from(c.bytes) } : c);
  return out;
}

/** Serve one download on the server peer: reply OK, then send `chunks` and finish. */
function serveDownload(server: Peer, chunks: Chunk[], onDone?: (err?: Error) => void): void {
  serveDownloads(server, (s, _name, sparse) => {
    (async () => {
      for (const c of chunks) await s.sendChunk(sparse || c.kind === 'data' ? c : { kind: 'data', bytes: Buffer.alloc(c.length) });
      await s.finish();
    })().then(() => onDone?.(), (e) => onDone?.(e));
  });
}

async function openDownload(client: Peer, sparse: boolean): Promise<Stream> {
  const { stream, called } = startDownload(client, 'v', sparse);
  await called;
  return stream;
}

test('call/reply: values decode; errors keep libvirt fields; serials match out of order', async () => {
  const { client, server, cleanup } = await pair();
  try {
    server.on('call', (m: Message) => {
      if (m.proc === P.CONNECT_GET_HOSTNAME.num) setTimeout(() => server.reply(m, P.CONNECT_GET_HOSTNAME.ret, { hostname: 'h1' }), 20);
      else if (m.proc === P.CONNECT_GET_TYPE.num) server.reply(m, P.CONNECT_GET_TYPE.ret, { type: 'T' });
      else server.replyError(m, remoteErrorFields(49, 18, "Storage pool not found: no storage pool with matching name 'x'"));
    });
    const [h, t] = await Promise.all([client.call(P.CONNECT_GET_HOSTNAME, undefined), client.call(P.CONNECT_GET_TYPE, undefined)]);
    assert.equal(h.hostname, 'h1');
    assert.equal(t.type, 'T');
    await assert.rejects(client.call(P.STORAGE_POOL_LOOKUP_BY_NAME, { name: 'x' }), (e: RemoteError) => {
      assert.equal(e.code, 'VIR_ERR_NO_STORAGE_POOL');
      assert.equal(e.virCode, 49);
      assert.equal(e.domain, 18);
      assert.match(e.message, /no storage pool with matching name 'x'/);
      return true;
    });
  } finally {
    cleanup();
  }
});

test('sparse download: data split into <=262120-byte packets, holes kept, EOF, finish confirmed', async () => {
  const { client, server, cleanup } = await pair();
  try {
    const frames: number[] = [];
    client.socket.on('data', () => {});
    const chunks: Chunk[] = [{ kind: 'hole', length: 4096 }, { kind: 'data', bytes: data(600000, 7) }, { kind: 'hole', length: 1 << 30 }];
    let serverDone!: (e?: Error) => void;
    const done = new Promise<Error | undefined>((r) => (serverDone = r));
    serveDownload(server, chunks, serverDone);
    const s = await openDownload(client, true);
    const got = await collect(s);
    assert.equal(await done, undefined);
    void frames;
    assert.deepEqual(got.filter((c) => c.kind === 'hole'), [{ kind: 'hole', length: 4096 }, { kind: 'hole', length: 1 << 30 }]);
    const bytes = Buffer.concat(got.filter((c): c is Extract<Chunk, { kind: 'data' }> => c.kind === 'data').map((c) => c.bytes));
    assert.ok(bytes.equals(data(600000, 7)));
    assert.ok(got.every((c) => c.kind === 'hole' || c.bytes.length <= 262120));
    assert.equal(client.openStreams, 0);
    assert.equal(server.openStreams, 0);
  } finally {
    cleanup();
  }
});

test('non-sparse stream: the sender cannot send a hole, and a hole from the peer is refused with STREAM/ERROR', async () => {
  const { client, server, cleanup } = await pair();
  try {
    // client uploads without the sparse flag but forges a hole packet
    const got = new Promise<{ err: Error }>((resolve) => {
      server.on('call', (m: Message) => {
        const wire = server.openStream(m.proc, m.serial, { sparse: false, sending: false });
        const s = new Stream(wire, { sparse: false });
        wire.attach(s);
        server.reply(m, P.STORAGE_VOL_UPLOAD.ret, undefined);
        collect(s).then(() => resolve({ err: new Error('no error') }), (err) => resolve({ err }));
      });
    });
    const serial = client.nextSerial();
    const wire = client.openStream(P.STORAGE_VOL_UPLOAD.num, serial, { sparse: false, sending: true });
    const s = new Stream(wire, { sparse: false });
    wire.attach(s);
    await client.call(P.STORAGE_VOL_UPLOAD, { vol, offset: 0n, length: 0n, flags: 0 }, { serial });
    await assert.rejects(s.sendHole(10), (e: SparsevirtError) => e.code === 'ERR_STREAM_NOT_SPARSE');
    // forge it on the wire
    const hole = Buffer.alloc(12);
    hole.writeBigInt64BE(4096n, 0);
    client.sendFrame({ prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: P.STORAGE_VOL_UPLOAD.num, type: MessageType.STREAM_HOLE, serial, status: Status.CONTINUE }, hole);
    const { err } = await got;
    assert.equal((err as SparsevirtError).code, 'ERR_STREAM_NOT_SPARSE');
    // the client sees a STREAM/ERROR with a real message, and the connection still works
    await assert.rejects(s.send(data(10, 1)).then(() => s.finish()), /not opened with the sparse flag/);
    server.removeAllListeners('call');
    server.on('call', (m: Message) => server.reply(m, P.CONNECT_GET_TYPE.ret, { type: 'ok' }));
    assert.equal((await client.call(P.CONNECT_GET_TYPE, undefined)).type, 'ok');
  } finally {
    cleanup();
  }
});

test('client abort mid-download: server confirms, late packets discarded, connection usable', async () => {
  const { client, server, cleanup } = await pair();
  try {
    let serverErr: Error | undefined;
    const served = new Promise<void>((r) => serveDownload(server, Array.from({ length: 200 }, (_, i) => ({ kind: 'data', bytes: data(262120, i) } as Chunk)), (e) => { serverErr = e; r(); }));
    const s = await openDownload(client, false);
    const first = await s.recv(1000);
    assert.ok(Buffer.isBuffer(first));
    await s.abort(new Error('enough'));
    await served;
    assert.equal((serverErr as SparsevirtError).code, 'ERR_ABORTED');
    server.removeAllListeners('call');
    server.on('call', (m: Message) => server.reply(m, P.CONNECT_GET_TYPE.ret, { type: 'still' }));
    assert.equal((await client.call(P.CONNECT_GET_TYPE, undefined)).type, 'still');
    assert.equal(client.openStreams, 0);
  } finally {
    cleanup();
  }
});

test('hole-errors-as-reply: a REPLY/ERROR on an open stream serial fails that stream; download-past-end-fails: a repeated STREAM/ERROR is ignored', async () => {
  const { client, server, cleanup } = await pair();
  try {
    server.on('call', (m: Message) => {
      server.reply(m, P.STORAGE_VOL_DOWNLOAD.ret, undefined);
      const e1 = encodeRemoteError(remoteErrorFields(1, 7, 'Library function returned error but did not set virError'));
      server.sendFrame({ ...m, type: MessageType.REPLY, status: Status.ERROR }, e1);
      server.sendFrame({ ...m, type: MessageType.STREAM, status: Status.ERROR }, encodeRemoteError(remoteErrorFields(39, 38, 'stream had I/O failure')));
    });
    const s = await openDownload(client, true);
    await assert.rejects(collect(s), /did not set virError/);
    server.removeAllListeners('call');
    server.on('call', (m: Message) => server.reply(m, P.CONNECT_GET_TYPE.ret, { type: 'alive' }));
    assert.equal((await client.call(P.CONNECT_GET_TYPE, undefined)).type, 'alive');
  } finally {
    cleanup();
  }
});

test('upload: server error mid-stream reaches the sender; finish answered by STREAM/ERROR rejects', async () => {
  const { client, server, cleanup } = await pair();
  try {
    server.on('call', (m: Message) => {
      const wire = server.openStream(m.proc, m.serial, { sparse: true, sending: false });
      const s = new Stream(wire, { sparse: true });
      wire.attach(s);
      server.reply(m, P.STORAGE_VOL_UPLOAD.ret, undefined);
      (async () => {
        let n = 0;
        for await (const c of s) {
          n += c.kind === 'data' ? c.bytes.length : c.length;
          if (n > 8192) {
            await s.abort(new SparsevirtError('ERR_IO', 'cannot write to stream: No space left on device', { cause: Object.assign(new Error('ENOSPC'), { errno: 28 }) }));
            return;
          }
        }
      })().catch(() => {});
    });
    const serial = client.nextSerial();
    const wire = client.openStream(P.STORAGE_VOL_UPLOAD.num, serial, { sparse: true, sending: true });
    const s = new Stream(wire, { sparse: true });
    wire.attach(s);
    await client.call(P.STORAGE_VOL_UPLOAD, { vol, offset: 0n, length: 8192n, flags: 1 }, { serial });
    await assert.rejects((async () => {
      for (let i = 0; i < 100; i++) await s.send(data(65536, i));
      await s.finish();
    })(), (e: RemoteError) => {
      assert.equal(e.virCode, 38);
      assert.equal(e.int1, 28);
      assert.match(e.message, /No space left on device/);
      return true;
    });
  } finally {
    cleanup();
  }
});

test('keepalive: PINGs are answered; a silent peer is declared dead within interval*(count+1)', async () => {
  const { client, server, cleanup } = await pair({ keepalive: 0.2, count: 2 });
  try {
    client.startKeepalive();
    server.startKeepalive();
    // both answer each other: still alive after several intervals
    await new Promise((r) => setTimeout(r, 700));
    assert.equal(client.closed, false);
    // the server stops reading (like SIGSTOP): the client must give up
    server.socket.pause();
    server.stopKeepalive();
    const t0 = Date.now();
    const err = await new Promise<Error>((r) => client.once('close', r));
    assert.equal((err as SparsevirtError).code, 'ERR_KEEPALIVE_TIMEOUT');
    assert.ok(Date.now() - t0 < 2000, `gave up after ${Date.now() - t0} ms`);
  } finally {
    cleanup();
  }
});

test('connection lost mid-stream: the stream and pending calls fail with ERR_CONNECTION_CLOSED', async () => {
  const { client, server, cleanup } = await pair();
  try {
    server.on('call', (m: Message) => {
      server.reply(m, P.STORAGE_VOL_DOWNLOAD.ret, undefined);
      server.sendFrame({ ...m, type: MessageType.STREAM, status: Status.CONTINUE }, data(100, 3));
      setTimeout(() => server.socket.destroy(), 20);
    });
    const s = await openDownload(client, true);
    await assert.rejects(collect(s), (e: SparsevirtError) => e.code === 'ERR_CONNECTION_CLOSED');
    await assert.rejects(client.call(P.CONNECT_GET_TYPE, undefined), (e: SparsevirtError) => e.code === 'ERR_CONNECTION_CLOSED');
  } finally {
    cleanup();
  }
});

test('connect() to a server that accepts but never answers fails within its timeout', async () => {
  const { connect } = await import('../src/index.js');
  const dir = mkdtempSync(path.join(os.tmpdir(), 'sv-silent-'));
  const sockPath = path.join(dir, 'sock');
  const held: net.Socket[] = [];
  const srv = net.createServer((s) => void held.push(s));
  await new Promise<void>((r) => srv.listen(sockPath, r));
  try {
    const t0 = Date.now();
    await assert.rejects(connect(`x+unix:///system?socket=${sockPath}`, { timeout: 300 }), (e: SparsevirtError) => e.code === 'ERR_TIMEOUT');
    assert.ok(Date.now() - t0 < 2000);
  } finally {
    for (const s of held) s.destroy();
    srv.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an abort the server never confirms still resolves, after the abort timeout', async () => {
  const { client, server, cleanup } = await pair();
  try {
    // the server accepts the download and then ignores everything on the stream
    server.on('call', (m: Message) => server.reply(m, P.STORAGE_VOL_DOWNLOAD.ret, undefined));
    server.removeAllListeners('orphanStreamPacket');
    const s = await openDownload(client, true);
    const t0 = Date.now();
    await s.abort(new Error('stop'));
    const took = Date.now() - t0;
    assert.ok(took >= 1500 && took < 5000, `abort settled after ${took} ms (timeout 2000 ms)`);
    assert.equal(client.openStreams, 0);
  } finally {
    cleanup();
  }
});

/** Two turns of the event loop: a busy-poll turn that was due has run (and stopped, if its window is over). */
const settle = async (): Promise<void> => {
  await new Promise((r) => setImmediate(r));
  await new Promise((r) => setImmediate(r));
};

test('busy polling: the loop keeps turning while packets of an open stream come, never for calls alone, and stops by itself', { timeout: 30_000 }, async () => {
  const { client, server, cleanup } = await pair({ busyPoll: 5 });
  try {
    server.on('call', (m: Message) => {
      if (m.proc === P.CONNECT_GET_TYPE.num) server.reply(m, P.CONNECT_GET_TYPE.ret, { type: 'T' });
    });
    const idle = busyPollState();
    for (let i = 0; i < 20; i++) assert.equal((await client.call(P.CONNECT_GET_TYPE, undefined)).type, 'T');
    assert.equal(busyPollState().turns, idle.turns, 'replies to calls, with no stream open, do not start it');

    // 400 small packets, a few at a time with pauses shorter than the window, then a long pause
    const chunks: Chunk[] = [];
    for (let i = 0; i < 200; i++) chunks.push({ kind: 'data', bytes: data(4096, i & 0xff) }, { kind: 'hole', length: 12288 });
    let pause: { polling: boolean; turns: number } | null = null;
    serveDownloads(server, (s) => {
      (async () => {
        for (let i = 0; i < chunks.length; i++) {
          await s.sendChunk(chunks[i]!);
          if (i % 40 === 39) await new Promise((r) => setTimeout(r, 1));
          if (i === 199) {
            await new Promise((r) => setTimeout(r, 60));
            await settle();
            pause = busyPollState();
          }
        }
        await s.finish();
      })().catch((e: Error) => s.abort(e));
    });
    const before = busyPollState().turns;
    const s = await openDownload(client, true);
    let during = -1;
    let resumed = -1;
    const got: Chunk[] = [];
    for await (const c of s) {
      got.push(c.kind === 'data' ? { kind: 'data', bytes: Buffer.from(c.bytes) } : c);
      if (got.length === 150) during = busyPollState().turns;
      if (got.length === 300) resumed = busyPollState().turns;
    }
    assert.deepEqual(got, chunks, 'every packet, in order');
    assert.ok(during > before, `the loop turned while packets came (${during - before} turns)`);
    // 60 ms without a packet (the stream still open): it had stopped within its 5 ms window
    assert.ok(pause !== null);
    const p = pause as { polling: boolean; turns: number };
    assert.equal(p.polling, false, 'stopped during the pause');
    assert.ok(resumed > p.turns, 'and started again with the next packets');
    await new Promise((r) => setTimeout(r, 30));
    await settle();
    const end = busyPollState();
    assert.equal(end.polling, false, 'it stops once no read comes for the window');
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(busyPollState().turns, end.turns, 'no turn after it stopped');
  } finally {
    cleanup();
  }
});

test('busy polling is off by default: a Peer without the option never turns the loop', async () => {
  const { client, server, cleanup } = await pair();
  try {
    const chunks: Chunk[] = [];
    for (let i = 0; i < 100; i++) chunks.push({ kind: 'data', bytes: data(4096, i) }, { kind: 'hole', length: 4096 });
    serveDownload(server, chunks);
    const before = busyPollState().turns;
    const got = await collect(await openDownload(client, true));
    assert.equal(got.length, chunks.length);
    assert.equal(busyPollState().turns, before);
    assert.equal(client.busyPoll, 0);
  } finally {
    cleanup();
  }
});

test('an upload of small file ranges gets the big send buffer: the kernel holds over 1 MiB for a daemon that is not reading yet', async (t) => {
  if (!nativeSyscallsAvailable()) return t.skip('needs the native syscalls (koffi)');
  // SO_SNDBUF is capped at net.core.wmem_max (4 MiB here; the kernel's default is 208 KiB), then doubled
  const wmemMax = Number(readFileSync('/proc/sys/net/core/wmem_max', 'latin1'));
  if (2 * wmemMax <= 1 << 20) return t.skip(`net.core.wmem_max is ${wmemMax}: no socket may hold 1 MiB`);
  const { client, server, cleanup } = await pair();
  const dir = mkdtempSync(path.join('/dev/shm', 'sv-peer-buf-'));
  const file = path.join(dir, 'src.img');
  writeFileSync(file, randomBytes(4 << 20));
  const fd = openSync(file, 'r');
  try {
    server.on('call', (m: Message) => {
      const wire = server.openStream(m.proc, m.serial, { sparse: true, sending: false });
      wire.attach(new Stream(wire, { sparse: true }));
      server.reply(m, P.STORAGE_VOL_UPLOAD.ret, undefined);
      server.socket.pause(); // the daemon is busy: it reads nothing for now
    });
    const serial = client.nextSerial();
    const wire = client.openStream(P.STORAGE_VOL_UPLOAD.num, serial, { sparse: true, sending: true });
    wire.attach(new Stream(wire, { sparse: true }));
    await client.call(P.STORAGE_VOL_UPLOAD, { vol, offset: 0n, length: 0n, flags: 1 }, { serial });
    // 1,024 ranges of 4 KiB (each read into the output batch, not sent by sendfile), holes between
    for (let i = 0; i < 1024; i++) {
      void wire.send({ kind: 'file', file: fileRef(fd), offset: i * 4096, length: 4096 })?.catch(() => {});
      void wire.send({ kind: 'hole', length: 8192 })?.catch(() => {});
    }
    await new Promise((r) => setTimeout(r, 100));
    const sockFd = (client.socket as unknown as { _handle: { fd: number } })._handle.fd;
    const held = socketOutq(sockFd);
    // the default buffer (net.core.wmem_default, 208 KiB) holds about 0.2-0.3 MiB
    assert.ok(held > 1 << 20, `${held} bytes held by the kernel`);
  } finally {
    closeSync(fd);
    cleanup();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('connect() refuses a busyPoll that is not 0 to 100 ms (Infinity would never stop) before opening a socket', async () => {
  for (const bad of [Infinity, -1, Number.NaN, 101, '1' as unknown as number]) {
    await assert.rejects(connect('qemu+unix:///system?socket=/nonexistent/sv.sock', { busyPoll: bad }), (e: SparsevirtError) => {
      assert.equal(e.code, 'ERR_INVALID_ARG');
      assert.match(e.message, /busyPoll must be a number of ms from 0 to 100/);
      return true;
    });
  }
  // a valid value gets as far as the socket
  await assert.rejects(connect('qemu+unix:///system?socket=/nonexistent/sv.sock', { busyPoll: 100 }), (e: SparsevirtError) => e.code !== 'ERR_INVALID_ARG');
});

test('a call while a stream is open and unread: its reply is read past the full queue, and that reading stays bounded when no reply comes', { timeout: 60_000 }, async () => {
  const { client, server, cleanup } = await pair();
  try {
    const chunk = data(1 << 20, 3);
    let sent = 0;
    let stop = false;
    // The server sends 256 MiB unless stopped; it answers GET_LIB_VERSION only while `answer` is set.
    let answer = true;
    server.on('call', (m: Message) => {
      if (m.proc === P.CONNECT_GET_LIB_VERSION.num && answer) server.reply(m, P.CONNECT_GET_LIB_VERSION.ret, { libVer: 9000000n });
    });
    serveDownloads(server, (s) => {
      void (async () => {
        while (!stop && sent < 256) {
          await s.sendChunk({ kind: 'data', bytes: chunk });
          sent++;
        }
      })().catch(() => undefined);
    });
    const s = await openDownload(client, false);
    await new Promise((r) => setTimeout(r, 300));
    const queuedBefore = s.queuedBytes;
    assert.ok(sent < 32, `the server is held back by the full queue (${sent} MiB sent)`);
    // the reply comes from behind stream packets nobody reads
    const r = await Promise.race([
      client.call(P.CONNECT_GET_LIB_VERSION, undefined),
      new Promise((_, rej) => setTimeout(() => rej(new Error('no reply while the stream is unread')), 10_000)),
    ]);
    assert.deepEqual(r, { libVer: 9000000n });
    // a call that is never answered: reading goes on past the full queue, but not without bound
    answer = false;
    void client.call(P.CONNECT_GET_LIB_VERSION, undefined).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 2000));
    const queued = s.queuedBytes;
    assert.ok(queued > queuedBefore, 'reading went on while the call waited');
    assert.ok(queued <= 64 * 2 ** 20 + 8 * 2 ** 20, `at most 64 MiB past the queue (queued ${queued} bytes)`);
    assert.ok(sent < 100, `the server is held back again (${sent} MiB sent)`);
    stop = true;
  } finally {
    cleanup();
  }
});

test('connect() to a unix URI with an empty socket= fails as libvirt does, never reaching for tcp', async () => {
  await assert.rejects(connect('qemu+unix:///system?socket='), (err: Error) => {
    assert.match(err.message, /Failed to connect socket to '': Connection refused/);
    return true;
  });
});
