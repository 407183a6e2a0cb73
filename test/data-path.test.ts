/**
 * The zero-copy data path. Data of a file in memory (tmpfs) leaves by `sendfile(2)`; a direct
 * frame that finds the socket full holds every later frame back until it is out, so a slow
 * reader still gets every stream intact and in order. Then the same through the daemon: a tmpfs
 * volume downloaded and uploaded by our client and by the real virsh — same SHA-256, same
 * sparseness, and the daemon's log shows the bytes went by sendfile.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { busyPollState } from '../src/io/busy-poll.js';
import type { Peer } from '../src/rpc/peer.js';
import { kPeer } from '../src/client/connection.js';
import { peerPair, serveDownloads, startDownload } from './helpers/peers.js';
import { Stream } from '../src/stream/index.js';
import { fileRef, fileSendChunks } from '../src/sparse/index.js';
import { setNativeSyscalls } from '../src/io/sys.js';
import { readFileRange, type Chunk } from '../src/chunk.js';
import { allocatedBytes, expectedAllocation, extentMap, makeImage, scratchDir, sha256File, type Layout } from './helpers/images.js';
import { withShmDaemon, type TestDaemon } from './helpers/daemon.js';
import { RawClient, errorOf } from './helpers/raw-client.js';
import { P, SPARSE_STREAM } from '../src/protocol/remote.js';
import { buildFrameHead, MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status } from '../src/rpc/message.js';
import { virsh } from './helpers/libvirt.js';
import { PACE_US } from '../src/daemon/transfer.js';
import { cliRaw, show } from './cli-support.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Big extents (sendfile), small ones (read into the output batch), holes everywhere. */
const LAYOUT: Layout = [
  { kind: 'hole', length: 1 * MiB },
  { kind: 'data', length: 5 * MiB + 12345 },
  { kind: 'hole', length: 64 * KiB },
  { kind: 'data', length: 8 * KiB },
  { kind: 'hole', length: 4 * KiB },
  { kind: 'data', length: 300 * KiB },
  { kind: 'hole', length: 2 * MiB },
  { kind: 'data', length: 4 * KiB },
  { kind: 'data', length: 3 * MiB },
  { kind: 'hole', length: 7 * MiB },
];

/** The server sends the file named by the download's volume name, via `fileSendChunks`. */
function serveFiles(server: Peer, dir: string): void {
  serveDownloads(server, (s, name, sparse) => void s.sendChunks(fileSendChunks(path.join(dir, name), { sparse })).catch(() => undefined));
}

/** Downloads `name` and rebuilds its bytes (holes as zeros). */
async function download(client: Peer, name: string, size: number): Promise<{ bytes: Buffer; holes: number }> {
  const { stream: s, called } = startDownload(client, name, true);
  await called;
  const bytes = Buffer.alloc(size);
  let pos = 0;
  let holes = 0;
  for await (const c of s as AsyncIterable<Chunk>) {
    if (c.kind === 'data') c.bytes.copy(bytes, pos);
    else holes++;
    pos += c.kind === 'data' ? c.bytes.length : c.length;
  }
  assert.equal(pos, size, 'stream length');
  return { bytes, holes };
}

test('file ranges from tmpfs leave by sendfile; a stalled frame holds later frames back, and a slow reader gets two interleaved streams intact', async () => {
  const dir = await scratchDir('/dev/shm', 'sv-datapath-');
  const { client, server, close } = await peerPair(dir);
  try {
    const size = await makeImage(path.join(dir, 'a.img'), LAYOUT, 3);
    // the second stream: 200 extents of 4 KiB, all through the output batch (small frames)
    const small: Layout = [];
    for (let i = 0; i < 200; i++) small.push({ kind: 'data', length: 4 * KiB }, { kind: 'hole', length: 12 * KiB });
    const smallSize = await makeImage(path.join(dir, 'b.img'), small, 4);
    serveFiles(server, dir);

    // The client stops reading for a while: the server's direct frames find the socket full.
    client.socket.pause();
    setTimeout(() => client.socket.resume(), 300);
    const [a, b] = await Promise.all([download(client, 'a.img', size), download(client, 'b.img', smallSize)]);

    assert.ok(a.bytes.equals(fs.readFileSync(path.join(dir, 'a.img'))), 'a.img: bytes identical');
    assert.ok(b.bytes.equals(fs.readFileSync(path.join(dir, 'b.img'))), 'b.img: bytes identical');
    const srcHoles = (await extentMap(path.join(dir, 'a.img'))).filter((e) => e.kind === 'hole').length;
    assert.equal(a.holes, srcHoles, 'a.img: every hole of the source came as a hole');
    assert.equal(b.holes, 200, 'b.img: every hole came as a hole');
    const bigData = LAYOUT.filter((p) => p.kind === 'data' && p.length >= 64 * KiB).reduce((n, p) => n + p.length, 0);
    // (a frame whose header finds the socket full goes through Node's queue instead)
    assert.ok(server.stats.directBytes >= 256 * KiB && server.stats.directBytes <= bigData,
      `extents of 64 KiB and more went by sendfile, nothing else (${server.stats.directBytes} of ${bigData})`);
    assert.ok(server.stats.directStalls > 0, 'the reader was slow enough to stall a direct frame');
  } finally {
    close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('without the native syscalls the same download is read into buffers: identical, nothing by sendfile', async () => {
  const dir = await scratchDir('/dev/shm', 'sv-datapath-');
  assert.equal(setNativeSyscalls(false), false);
  const { client, server, close } = await peerPair(dir);
  try {
    const size = await makeImage(path.join(dir, 'a.img'), LAYOUT, 5);
    serveFiles(server, dir);
    const a = await download(client, 'a.img', size);
    assert.ok(a.bytes.equals(fs.readFileSync(path.join(dir, 'a.img'))));
    assert.equal(server.stats.directBytes, 0);
  } finally {
    setNativeSyscalls(true);
    close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('readFileRange refuses a range past the end of the file (it shrank): a clear error, no short buffer', async () => {
  const dir = await scratchDir('/dev/shm', 'sv-datapath-');
  try {
    const file = path.join(dir, 'f');
    fs.writeFileSync(file, Buffer.alloc(10000, 1));
    const fd = fs.openSync(file, 'r');
    try {
      assert.equal(readFileRange({ kind: 'file', file: fileRef(fd), offset: 5000, length: 5000 }).length, 5000);
      assert.throws(() => readFileRange({ kind: 'file', file: fileRef(fd), offset: 8000, length: 5000 }), /file shrank while reading \(EOF at 10000\)/);
    } finally {
      fs.closeSync(fd);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

/** An assertion that a file reads as `src` (SHA-256, size) and is allocated like it. */
async function sameAs(src: string): Promise<(file: string, what: string) => Promise<void>> {
  const srcSha = await sha256File(src);
  const size = fs.statSync(src).size;
  const want = expectedAllocation(await extentMap(src), 0, 4096);
  return async (file, what) => {
    assert.equal(await sha256File(file), srcSha, `${what}: SHA-256`);
    assert.equal(fs.statSync(file).size, size, `${what}: size`);
    const got = await allocatedBytes(file);
    assert.ok(Math.abs(got - want) <= 4096 * 16, `${what}: allocated ${got}, source-like ${want}`);
  };
}

/** The daemon's last "download ok" log line. */
function lastDownload(d: TestDaemon): { ms: number; pacedWaits?: number; holeBytes: number; dataBytes: number; newBatches: number; sendfileBytes: number } {
  const line = d.logs.filter((l) => /"download ok"/.test(l)).at(-1);
  assert.ok(line, 'the daemon logged the download');
  return JSON.parse(line!);
}

const uploadsLogged = (d: TestDaemon): string[] => d.logs.filter((l) => /"upload ok"/.test(l));

/**
 * The daemon's "upload ok" log line for the upload that ended after `before` others: it is
 * written once the volume is closed, which may come just after the client saw the confirmation.
 */
async function uploadLine(d: TestDaemon, before: number): Promise<{ holeBytes: number; dataBytes: number; splicedBytes: number }> {
  for (let i = 0; i < 100 && uploadsLogged(d).length <= before; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  const line = uploadsLogged(d)[before];
  assert.ok(line, 'the daemon logged the upload');
  return JSON.parse(line!);
}

/** Large packets went from the socket into the file by splice: at least 1 MiB, and no more than the data. */
function splicedSome(spliced: number, data: number, what: string): void {
  assert.ok(spliced >= 1 * MiB && spliced <= data, `${what}: ${spliced} of ${data} data bytes spliced`);
}

test('daemon on tmpfs: our client and virsh download and upload a volume; same SHA-256 and sparseness, data by sendfile both ways and into the file by splice', async () => {
  await withShmDaemon('sv-datapath-d-', async ({ dir, poolDir, d, conn, pool }) => {
    const src = path.join(dir, 'src.img');
    const size = await makeImage(src, LAYOUT, 7);
    const sparseAsSource = await sameAs(src);

    // upload by our client: file → socket by sendfile on the client side
    const vol = await pool.createVol({ name: 'v.img', capacity: size, allocation: 0 });
    const before = conn[kPeer].stats.directBytes;
    const uploads = uploadsLogged(d).length;
    await vol.uploadFile(src, { sparse: true });
    assert.ok(conn[kPeer].stats.directBytes - before >= 1 * MiB, 'the client sent large extents by sendfile');
    await sparseAsSource(path.join(poolDir, 'v.img'), 'uploaded volume');
    const up = await uploadLine(d, uploads);
    splicedSome(up.splicedBytes, up.dataBytes, 'daemon, upload');

    // download by our client: volume → socket by sendfile in the daemon, socket → file by splice here
    const out = path.join(dir, 'out.img');
    const splicedBefore = conn[kPeer].stats.splicedBytes;
    await vol.downloadFile(out, { sparse: true });
    await sparseAsSource(out, 'downloaded file');
    splicedSome(conn[kPeer].stats.splicedBytes - splicedBefore, up.dataBytes, 'client, download');
    const logged = lastDownload(d);
    assert.ok(logged.sendfileBytes >= 1 * MiB && logged.sendfileBytes <= logged.dataBytes, `sendfileBytes ${logged.sendfileBytes} of ${logged.dataBytes}`);

    // the real virsh, both ways
    const vout = path.join(dir, 'virsh-out.img');
    const r1 = await virsh(['vol-download', '--pool', 'shm', 'v.img', vout, '--sparse'], { uri: d.virshUri });
    assert.equal(r1.code, 0, r1.stderr);
    await sparseAsSource(vout, 'virsh download');
    await pool.createVol({ name: 'w.img', capacity: size, allocation: 0 });
    const virshUploads = uploadsLogged(d).length;
    const r2 = await virsh(['vol-upload', '--pool', 'shm', 'w.img', src, '--sparse'], { uri: d.virshUri });
    assert.equal(r2.code, 0, r2.stderr);
    await sparseAsSource(path.join(poolDir, 'w.img'), 'virsh upload');
    const vup = await uploadLine(d, virshUploads);
    splicedSome(vup.splicedBytes, vup.dataBytes, 'daemon, virsh upload');

    // the CLI's download (its own writer set-up) splices too
    const cout = path.join(dir, 'cli-out.img');
    const r3 = await cliRaw(['-c', d.uri, 'vol-download', '--pool', 'shm', 'w.img', cout, '--sparse']);
    assert.equal(r3.code, 0, show(r3));
    await sparseAsSource(cout, 'CLI download');
  });
});

test('small packets: our client says it takes a deep queue and is not paced; virsh is paced (its queue would run away); both copies identical and sparse', async () => {
  await withShmDaemon('sv-datapath-p-', async ({ dir, poolDir, d, conn, pool }) => {
    const EXTENTS = 3000;
    const layout: Layout = [];
    for (let i = 0; i < EXTENTS; i++) layout.push({ kind: 'data', length: 4 * KiB }, { kind: 'hole', length: 12 * KiB });
    const src = path.join(poolDir, 'small.img');
    await makeImage(src, layout, 11);
    await pool.refresh();
    const check = await sameAs(src);
    const packets = 2 * EXTENTS; // a data and a hole packet per extent

    await new Promise((r) => setTimeout(r, 50)); // the feature's answer (not awaited by connect)
    assert.equal(conn.sparsevirtDaemon, true, 'sparsevirtd took the deep-queue feature');
    assert.equal(conn[kPeer].busyPoll, 0, 'no busy polling with a sparsevirtd (it sends in batches)');
    const vol = await pool.volLookupByName('small.img');
    const out = path.join(dir, 'ours.img');
    const turns = busyPollState().turns;
    await vol.downloadFile(out, { sparse: true });
    assert.equal(busyPollState().turns, turns);
    await check(out, 'our download');
    const ours = lastDownload(d);
    assert.equal(ours.pacedWaits, undefined, 'our client is not paced');
    // ~48 batches of 256 KiB went out, from a daemon that never had to wait for the socket:
    // their write callbacks never ran in between, yet the pool (8) was enough
    assert.ok(ours.newBatches <= 8, `${ours.newBatches} output batches allocated`);

    const vout = path.join(dir, 'virsh.img');
    const r = await virsh(['vol-download', '--pool', 'shm', 'small.img', vout, '--sparse'], { uri: d.virshUri });
    assert.equal(r.code, 0, r.stderr);
    await check(vout, 'virsh download');
    const logged = lastDownload(d);
    assert.ok(logged.holeBytes > 0, 'holes went as holes');
    assert.equal(typeof logged.pacedWaits, 'number', 'virsh is paced');
    // every block of 64 small packets takes at least 64 × PACE_US
    const floorMs = Math.floor(packets / 64) * 64 * PACE_US / 1000;
    assert.ok(logged.ms >= floorMs * 0.95, `paced download took ${logged.ms} ms, at least ${floorMs} ms expected`);
  });
});

test('writing into a sized but unallocated target (a new volume): holes are left alone, data lands, nothing else is allocated', async () => {
  const { writeChunks } = await import('../src/sparse/index.js');
  for (const base of ['/dev/shm', '/tmp']) {
    const dir = await scratchDir(base, 'sv-datapath-w-');
    try {
      const src = path.join(dir, 'src.img');
      const size = await makeImage(src, LAYOUT, 9);
      const dst = path.join(dir, 'dst.img');
      fs.writeFileSync(dst, '');
      fs.truncateSync(dst, size); // what vol-create-as --allocation 0 leaves
      assert.equal(fs.statSync(dst).blocks, 0);
      await writeChunks(dst, fileSendChunksAsData(src));
      assert.equal(await sha256File(dst), await sha256File(src), `${base}: SHA-256`);
      const want = expectedAllocation(await extentMap(src), 0, 4096);
      const got = await allocatedBytes(dst);
      assert.ok(Math.abs(got - want) <= 4096 * 16, `${base}: allocated ${got}, source-like ${want}`);
      // and over a target that does hold data, holes are still zeroed (punched)
      fs.writeFileSync(dst, Buffer.alloc(size, 0xaa));
      await writeChunks(dst, fileSendChunksAsData(src));
      assert.equal(await sha256File(dst), await sha256File(src), `${base}: SHA-256 over old data`);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
});

/** The source's chunks with its file ranges read into buffers (what a receiver gets). */
async function* fileSendChunksAsData(file: string): AsyncGenerator<Chunk> {
  for await (const c of fileSendChunks(file)) yield c.kind === 'file' ? { kind: 'data', bytes: readFileRange(c) } : c;
}

/**
 * Two peers whose `side` sends 4 MiB packets, twice what the socket holds (a stall is mid-packet,
 * with megabytes to go), and two 8 MiB files: `a` of 0x11 bytes and `b` of 0x55, whose bytes
 * must never go out.
 */
async function withStallFiles(prefix: string, side: 'client' | 'server', fn: (t: { client: Peer; server: Peer; a: string; b: string }) => Promise<void>): Promise<void> {
  const dir = await scratchDir('/dev/shm', prefix);
  const { client, server, close } = await peerPair(dir, { [side]: { streamPacketMax: 4 * MiB } });
  try {
    const a = path.join(dir, 'a.img');
    const b = path.join(dir, 'b.img');
    fs.writeFileSync(a, Buffer.alloc(8 * MiB, 0x11));
    fs.writeFileSync(b, Buffer.alloc(8 * MiB, 0x55));
    await fn({ client, server, a, b });
  } finally {
    close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('a frame stalled when its stream dies keeps reading its own file: the fd closed and reused meanwhile leaks nothing', async () => {
  await withStallFiles('sv-datapath-fd-', 'server', async ({ client, server, a, b }) => {
    let serverStream!: Stream;
    let sending!: Promise<void>;
    let aFd = -1;
    serveDownloads(server, (stream) => {
      serverStream = stream;
      aFd = fs.openSync(a, 'r');
      sending = serverStream.sendFileRange(fileRef(aFd), 0, 8 * MiB).catch(() => undefined);
    });
    // every byte the client gets, frames and all (its Stream drops data that precedes an error)
    const raw: Buffer[] = [];
    client.socket.on('data', (d: Buffer) => raw.push(Buffer.from(d)));
    client.socket.pause(); // the socket fills: a frame stalls mid-way
    const { stream: s, called } = startDownload(client, 'a.img', true);
    const deadline = Date.now() + 5000;
    while (server.stats.directStalls === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    assert.ok(server.stats.directStalls > 0, 'a frame stalled');
    // the stream dies (daemon shutdown, say): the sender stops and closes its file; the fd number
    // is taken by another file at once
    await serverStream.abort(new Error('stopping'));
    await sending;
    fs.closeSync(aFd);
    const bFd = fs.openSync(b, 'r');
    try {
      client.socket.resume();
      await called;
      const got: Buffer[] = [];
      await assert.rejects((async () => {
        for await (const c of s as AsyncIterable<Chunk>) if (c.kind === 'data') got.push(Buffer.from(c.bytes));
      })());
      await new Promise((r) => setTimeout(r, 100));
      const wireBytes = Buffer.concat(raw);
      assert.ok(wireBytes.length > 2 * MiB, `the frames sent before the abort arrived (${wireBytes.length} bytes)`);
      assert.equal(wireBytes.indexOf(Buffer.alloc(64, 0x55)), -1, 'not one byte of the other file went out');
      assert.ok(Buffer.concat(got).every((x) => x === 0x11));
    } finally {
      fs.closeSync(bFd);
    }
  });
});

test('a client that aborts while a frame of its range is stalled sends nothing more of that range: its fd may be closed and reused', async () => {
  await withStallFiles('sv-datapath-abort-', 'client', async ({ client, server, a, b }) => {
    // the server takes the upload, then stops reading: the client's frame stalls
    const raw: Buffer[] = [];
    server.socket.on('data', (d: Buffer) => raw.push(Buffer.from(d)));
    server.on('call', (m) => {
      if (m.proc !== P.STORAGE_VOL_UPLOAD.num) return;
      const wire = server.openStream(m.proc, m.serial, { sparse: true, sending: false });
      const received = new Stream(wire, { sparse: true });
      wire.attach(received);
      server.reply(m, P.STORAGE_VOL_UPLOAD.ret, undefined);
      server.socket.pause();
      // (what arrives is taken as it comes: the server never holds the client back itself)
      void (async () => {
        for await (const c of received) void c;
      })().catch(() => undefined);
    });
    const serial = client.nextSerial();
    const wire = client.openStream(P.STORAGE_VOL_UPLOAD.num, serial, { sparse: true, sending: true });
    const s = new Stream(wire, { sparse: true });
    wire.attach(s);
    await client.call(P.STORAGE_VOL_UPLOAD, { vol: { pool: 'p', name: 'v', key: '/p/v' }, offset: 0n, length: 0n, flags: SPARSE_STREAM }, { serial });
    const aFd = fs.openSync(a, 'r');
    const sending = s.sendFileRange(fileRef(aFd), 0, 8 * MiB).catch(() => undefined);
    const deadline = Date.now() + 5000;
    while (client.stats.directStalls === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    assert.ok(client.stats.directStalls > 0, 'a frame stalled');
    // Ctrl-C: the stream is aborted, the caller closes its file; another file takes the fd number
    const aborted = s.abort(new Error('interrupted'));
    await sending;
    fs.closeSync(aFd);
    const bFd = fs.openSync(b, 'r');
    try {
      server.socket.resume();
      await aborted;
      await new Promise((r) => setTimeout(r, 200));
      const wireBytes = Buffer.concat(raw);
      assert.ok(wireBytes.length > 2 * MiB, `the stalled frame arrived (${wireBytes.length} bytes)`);
      assert.ok(wireBytes.length < 5 * MiB, `nothing of the range after it (${wireBytes.length} bytes)`);
      assert.equal(wireBytes.indexOf(Buffer.alloc(64, 0x55)), -1, 'not one byte of the other file went out');
    } finally {
      fs.closeSync(bFd);
    }
  });
});

test('a file that shrinks under a stalled frame: the frame is completed with zeros, its stream fails with the reason, the connection and the next download go on', async () => {
  const dir = await scratchDir('/dev/shm', 'sv-datapath-shrink-');
  // 4 MiB packets, twice what the socket holds: the stall is mid-packet, with megabytes to go
  const { client, server, close } = await peerPair(dir, { server: { streamPacketMax: 4 * MiB } });
  try {
    const a = path.join(dir, 'a.img');
    fs.writeFileSync(a, Buffer.alloc(8 * MiB, 0x11));
    fs.writeFileSync(path.join(dir, 'b.img'), Buffer.alloc(1 * MiB, 0x22));
    serveFiles(server, dir);
    client.socket.pause(); // the socket fills: a frame stalls mid-way
    const { stream: s, called } = startDownload(client, 'a.img', true);
    const deadline = Date.now() + 5000;
    while (server.stats.directStalls === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    assert.ok(server.stats.directStalls > 0, 'a frame stalled');
    fs.truncateSync(a, 1 * MiB); // the file shrinks under the frame
    client.socket.resume();
    await called;
    await assert.rejects((async () => {
      for await (const c of s as AsyncIterable<Chunk>) void c;
    })(), (err: Error & { virCode?: number }) => /^cannot read from stream: file shrank while reading/.test(err.message) && err.virCode === 38, 'the stream fails with the reason, as a system error');
    assert.equal(client.closed, false, 'the connection is still open');
    assert.equal(server.closed, false);
    // and it carries the next download
    const b = await download(client, 'b.img', 1 * MiB);
    assert.ok(b.bytes.equals(Buffer.alloc(1 * MiB, 0x22)), 'the next download is intact');
  } finally {
    close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a peer that stops reading while a frame is stalled is still found out by keepalive (held PINGs are not progress)', async () => {
  const dir = await scratchDir('/dev/shm', 'sv-datapath-ka-');
  const { client, server, close } = await peerPair(dir, { server: { streamPacketMax: 4 * MiB, keepaliveInterval: 0.2, keepaliveCount: 2 } });
  try {
    fs.writeFileSync(path.join(dir, 'a.img'), Buffer.alloc(16 * MiB, 0x22));
    serveFiles(server, dir);
    server.startKeepalive();
    const closed = new Promise<Error>((r) => server.once('close', r));
    client.socket.pause(); // and never again
    void startDownload(client, 'a.img', true).called.catch(() => undefined);
    const t0 = Date.now();
    const err = await Promise.race([closed, new Promise<null>((r) => setTimeout(() => r(null), 5000))]);
    assert.ok(err, 'the server gave up on the peer');
    assert.equal((err as { code?: string }).code, 'ERR_KEEPALIVE_TIMEOUT');
    assert.ok(server.stats.directStalls > 0, 'a frame was stalled meanwhile');
    assert.ok(Date.now() - t0 < 3000, `within the keepalive window (${Date.now() - t0} ms)`);
  } finally {
    close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('daemon on tmpfs, upload limits with packets written in place: data past --length fails the upload, what fits is stored, nothing past it; past the end of the volume it grows', async () => {
  await withShmDaemon('sv-datapath-lim-', async ({ poolDir, d, pool }) => {
    const PACKET = 262120;
    const data = Buffer.alloc(6 * PACKET);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    const send = async (vol: string, opts: { offset?: number; length?: number }): Promise<Error | null> => {
      const v = await pool.volLookupByName(vol);
      const s = await v.upload({ ...opts, sparse: true });
      try {
        for (let at = 0; at < data.length; at += PACKET) {
          await s.send(data.subarray(at, at + PACKET));
          // the daemon opens the volume meanwhile: the packets after this one can go in place
          if (at === 0) await new Promise((resolve) => setTimeout(resolve, 200));
        }
        await s.finish();
        return null;
      } catch (err) {
        return err as Error;
      }
    };

    // --length: 4.5 packets; packets 1–4 inside it (3 and 4 in place: the daemon reads 2 into the
    // buffer it picked while reading 1, before its writer saw large data), the 5th crosses it
    await pool.createVol({ name: 'len.img', capacity: 8 * PACKET, allocation: 0 });
    const limit = Math.floor(4.5 * PACKET);
    const e1 = await send('len.img', { offset: 0, length: limit });
    assert.ok(e1 && /No space left on device/.test(e1.message), `length: ${e1?.message}`);
    const got1 = fs.readFileSync(path.join(poolDir, 'len.img'));
    assert.equal(got1.length, 8 * PACKET, 'the volume keeps its size');
    assert.ok(got1.subarray(0, limit).equals(data.subarray(0, limit)), 'the bytes up to the limit');
    assert.ok(got1.subarray(limit).equals(Buffer.alloc(got1.length - limit)), 'nothing past the limit');
    const failedLines = (): string[] => d.logs.filter((l) => /"upload failed"/.test(l));
    for (let i = 0; i < 100 && failedLines().length < 1; i++) await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(failedLines().length, 1, 'the daemon logged the failed upload');
    assert.ok(JSON.parse(failedLines()[0]!).splicedBytes >= 2 * PACKET, 'packets 3 and 4 went in place');

    // past the end of the volume (4.5 packets, 6 sent): it grows to take them all, packets in place too
    await pool.createVol({ name: 'cap.img', capacity: Math.floor(4.5 * PACKET), allocation: 0 });
    const before = uploadsLogged(d).length;
    assert.equal(await send('cap.img', {}), null, 'an upload past the end');
    const got2 = fs.readFileSync(path.join(poolDir, 'cap.img'));
    assert.ok(got2.equals(data), 'the volume holds the whole upload');
    assert.ok((await uploadLine(d, before)).splicedBytes >= 2 * PACKET, 'packets went in place');

    // the same daemon goes on: a whole upload at an offset, packets in place
    await pool.createVol({ name: 'ok.img', capacity: 8 * PACKET, allocation: 0 });
    const uploads = uploadsLogged(d).length;
    assert.equal(await send('ok.img', { offset: PACKET }), null);
    const got3 = fs.readFileSync(path.join(poolDir, 'ok.img'));
    assert.ok(got3.subarray(PACKET, 7 * PACKET).equals(data), 'the bytes at the offset');
    const up = await uploadLine(d, uploads);
    assert.ok(up.splicedBytes >= 3 * PACKET, `spliced ${up.splicedBytes}`);
  });
});

test('daemon on tmpfs: a client that disconnects in the middle of a packet going in place: the upload ends, the volume is closed, what came before is stored, the next upload works', async () => {
  await withShmDaemon('sv-datapath-cut-', async ({ poolDir, d, pool }) => {
    const PACKET = 262120;
    const packet = (seed: number): Buffer => {
      const b = Buffer.alloc(PACKET);
      for (let i = 0; i < PACKET; i += 4) b.writeUInt32LE(((i + seed) * 2654435761) >>> 0, i);
      return b;
    };
    const file = path.join(poolDir, 'cut.img');
    await pool.createVol({ name: 'cut.img', capacity: 4 * PACKET, allocation: 0 });
    const real = fs.realpathSync(file); // what /proc/self/fd links to
    const c = await RawClient.connect(d.socket);
    await c.handshake();
    const serial = c.nextSerial();
    const r = await c.call(P.STORAGE_VOL_UPLOAD, { vol: { pool: 'shm', name: 'cut.img', key: file }, offset: 0n, length: 0n, flags: 1 }, serial);
    assert.equal(r.status, Status.OK, r.status === Status.ERROR ? errorOf(r).message : '');
    const head = { prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: P.STORAGE_VOL_UPLOAD.num, type: MessageType.STREAM, serial, status: Status.CONTINUE };
    const a = packet(1);
    const b = packet(2);
    const cut = packet(3);
    await new Promise((resolve) => setTimeout(resolve, 200)); // the daemon opens the volume for writing meanwhile
    c.write(Buffer.concat([buildFrameHead(head, PACKET), a, buildFrameHead(head, PACKET), b]));
    c.write(Buffer.concat([buildFrameHead(head, PACKET), cut.subarray(0, 1000)]));
    await new Promise((resolve) => setTimeout(resolve, 200));
    const fdsOnVolume = (): number => fs.readdirSync('/proc/self/fd').filter((n) => {
      try {
        return fs.readlinkSync(`/proc/self/fd/${n}`) === real;
      } catch {
        return false;
      }
    }).length;
    assert.ok(fdsOnVolume() >= 2, `the volume is open meanwhile: the writer's fd and the in-place duplicate (${fdsOnVolume()})`);
    c.close();
    for (let i = 0; i < 100 && !(d.logs.some((l) => /"upload ended: connection closed"/.test(l)) && fdsOnVolume() === 0); i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.ok(d.logs.some((l) => /"upload ended: connection closed"/.test(l)), 'the daemon logged the end of the upload');
    assert.equal(fdsOnVolume(), 0, 'the volume is closed (the writer and the in-place duplicate)');
    const got = fs.readFileSync(file);
    assert.ok(got.subarray(0, 2 * PACKET).equals(Buffer.concat([a, b])), 'the whole packets are stored');
    const tail = got.subarray(2 * PACKET);
    // of the cut packet, at most what arrived (its own bytes, at their place); nothing else
    assert.ok(tail.subarray(0, 1000).equals(cut.subarray(0, 1000)) || tail.subarray(0, 1000).equals(Buffer.alloc(1000)), 'the cut packet: its first bytes or nothing');
    assert.ok(tail.subarray(1000).equals(Buffer.alloc(tail.length - 1000)), 'nothing past what arrived');

    // the daemon goes on: a new upload of the same volume, packets in place
    const uploads = uploadsLogged(d).length;
    const v = await pool.volLookupByName('cut.img');
    const s = await v.upload({ sparse: true });
    await s.send(a);
    await new Promise((resolve) => setTimeout(resolve, 200)); // the volume is open by then: b and cut go in place
    await s.send(b);
    await s.send(cut);
    await s.finish();
    assert.ok(fs.readFileSync(file).subarray(0, 3 * PACKET).equals(Buffer.concat([a, b, cut])), 'the next upload is stored');
    assert.ok((await uploadLine(d, uploads)).splicedBytes >= PACKET, 'in place');
  });
});
