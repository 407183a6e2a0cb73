/**
 * The client library against the real libvirtd 9.0 (installed and started by .ci/run): a
 * multi-GiB sparse image with ~1 GiB of data up and down with the sparse flag, plain transfers,
 * aborts that reach libvirtd (seen on the wire) and leave the connection usable, and libvirt's
 * error codes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import diagnostics from 'node:diagnostics_channel';
import path from 'node:path';
import { rm } from 'node:fs/promises';
import { connect, type RemoteError, type SparsevirtError } from '../src/index.js';
import { Feature, P } from '../src/protocol/remote.js';
import { busyPollState } from '../src/io/busy-poll.js';
import { kPeer } from '../src/client/connection.js';
import { MessageType, Status, type Header } from '../src/rpc/message.js';
import { LIBVIRTD_URI, LIBVIRTD_TCP_URI, LIBVIRTD_TLS_URI, createVolume, requireLibvirt, requireLibvirtListeners, withScratchPool } from './helpers/libvirt.js';
import { allocatedBytes, extentMap, makeImage, scratchDir, sha256File, type Layout } from './helpers/images.js';

const MiB = 1 << 20;

function bigLayout(): Layout {
  // 2.5 GiB: a leading hole, 64 data extents of 16 MiB (1 GiB) with 24 MiB holes, a trailing hole.
  const l: Layout = [{ kind: 'hole', length: 8 * MiB }];
  for (let i = 0; i < 64; i++) {
    l.push({ kind: 'data', length: 16 * MiB - (i === 7 ? 4096 : 0) });
    l.push({ kind: 'hole', length: 24 * MiB + (i === 7 ? 4096 : 0) });
  }
  l.push({ kind: 'hole', length: 40 * MiB });
  return l;
}

test('a 2.5 GiB image with 1 GiB of data: sparse upload and download through libvirtd keep bytes and extents', { timeout: 240_000 }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  const dir = await scratchDir('/dev/shm', 'sv-interop-');
  try {
    await withScratchPool('interop', async (pool) => {
      const src = path.join(dir, 'src.img');
      const layout = bigLayout();
      const dataBytes = layout.reduce((n, p) => n + (p.kind === 'data' ? p.length : 0), 0);
      const size = await makeImage(src, layout, 11);
      const srcHash = await sha256File(src);
      const srcMap = await extentMap(src);
      const volPath = await createVolume(pool, 'big.img', size);
      const conn = await connect(LIBVIRTD_URI);
      try {
        const vol = await (await conn.storagePoolLookupByName(pool.name)).volLookupByName('big.img');
        const st0 = { ...conn[kPeer].stats };
        const up = await vol.uploadFile(src, { sparse: true });
        // tmpfs source: every large packet goes by sendfile, also those that find the socket or
        // Node's queue busy behind libvirtd's slower reads (they wait; none is read into a buffer
        // whole); only each extent's short tail (< 64 KiB) and, while a packet is stalled, the
        // 16 KiB pieces that say the socket has room again are copies
        const st = conn[kPeer].stats;
        const direct = st.directBytes - st0.directBytes;
        const copied = st.copiedBytes - st0.copiedBytes;
        assert.equal(st.bufferedFrames - st0.bufferedFrames, 0, 'no large packet read into a buffer whole');
        assert.ok(direct + copied >= dataBytes - 64 * 64 * 1024 && direct + copied <= dataBytes, `sendfile moved ${direct}, pieces ${copied}, of ${dataBytes} bytes`);
        assert.ok(copied <= (st.directStalls - st0.directStalls) * 16 * 1024 * 64, `${copied} bytes in stall pieces`);
        assert.equal(up.sparse, true);
        assert.equal(up.dataBytes, dataBytes);
        assert.equal(up.dataBytes + up.holeBytes, size);
        assert.equal(await sha256File(volPath), srcHash, 'volume content = source');
        assert.deepEqual(await extentMap(volPath), srcMap, 'volume extent map = source');

        const out = path.join(dir, 'out.img');
        const spliced0 = conn[kPeer].stats.splicedBytes;
        const down = await vol.downloadFile(out, { sparse: true });
        assert.equal(down.dataBytes, dataBytes);
        // from libvirtd too, large packets go into the file in place (socket → pipe → file)
        const spliced = conn[kPeer].stats.splicedBytes - spliced0;
        assert.ok(spliced >= dataBytes / 2 && spliced <= dataBytes, `${spliced} of ${dataBytes} bytes received in place from libvirtd`);
        assert.equal(await sha256File(out), srcHash, 'download content = source');
        assert.deepEqual(await extentMap(out), srcMap, 'download extent map = source');
        const [a, b] = [await allocatedBytes(out), await allocatedBytes(volPath)];
        assert.ok(Math.abs(a - b) <= 64 * 4096, `download allocation ${a} vs volume ${b}`);
        await rm(out);
      } finally {
        await conn.close();
      }
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('3,000 small extents from libvirtd: busy polling while its packets come (and not without it), both copies identical and sparse', { timeout: 120_000 }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  const dir = await scratchDir('/dev/shm', 'sv-interop-');
  try {
    await withScratchPool('interop-small', async (pool) => {
      const layout: Layout = [];
      for (let i = 0; i < 3000; i++) layout.push({ kind: 'data', length: 4096 }, { kind: 'hole', length: 12288 + (i % 3) * 4096 });
      const src = path.join(dir, 'small.img');
      const size = await makeImage(src, layout, 5);
      const volPath = await createVolume(pool, 'small.img', size);
      const [srcHash, srcMap] = [await sha256File(src), await extentMap(src)];
      for (const busyPoll of [undefined, 0]) {
        const conn = await connect(LIBVIRTD_URI, { busyPoll });
        try {
          await new Promise((r) => setTimeout(r, 50)); // the feature's answer (not awaited by connect)
          assert.equal(conn[kPeer].busyPoll, busyPoll ?? 1, 'on by default with libvirtd (1 ms)');
          const vol = await (await conn.storagePoolLookupByName(pool.name)).volLookupByName('small.img');
          if (busyPoll === undefined) {
            await vol.uploadFile(src, { sparse: true });
            assert.equal(await sha256File(volPath), srcHash);
          }
          const out = path.join(dir, `out-${busyPoll ?? 'default'}.img`);
          const before = busyPollState().turns;
          const down = await vol.downloadFile(out, { sparse: true });
          const turns = busyPollState().turns - before;
          if (busyPoll === undefined) assert.ok(turns > 0, `the loop turned ${turns} times during the download`);
          else assert.equal(turns, 0, 'busyPoll: 0 turns it off');
          assert.equal(down.dataBytes, 3000 * 4096);
          assert.equal(await sha256File(out), srcHash, 'download content = source');
          assert.deepEqual(await extentMap(out), srcMap, 'download extent map = source');
          await new Promise((r) => setTimeout(r, 20));
          await new Promise((r) => setImmediate(r));
          await new Promise((r) => setImmediate(r));
          assert.equal(busyPollState().polling, false, 'polling stopped with the stream');
        } finally {
          await conn.close();
        }
      }
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('plain (non-sparse) transfers through libvirtd give identical bytes', { timeout: 120_000 }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  const dir = await scratchDir('/dev/shm', 'sv-interop-');
  try {
    await withScratchPool('interop-plain', async (pool) => {
      const layout: Layout = [{ kind: 'data', length: 3 * MiB + 17 }, { kind: 'hole', length: 5 * MiB }, { kind: 'data', length: 700_001 }];
      const src = path.join(dir, 'plain.img');
      const size = await makeImage(src, layout, 3);
      await createVolume(pool, 'plain.img', size);
      const conn = await connect(LIBVIRTD_URI);
      try {
        const vol = await (await conn.storagePoolLookupByName(pool.name)).volLookupByName('plain.img');
        const up = await vol.uploadFile(src, { sparse: false });
        assert.equal(up.holeBytes, 0, 'no hole packets without the sparse flag');
        const out = path.join(dir, 'plain.out');
        const down = await vol.downloadFile(out, { sparse: false });
        assert.equal(down.holeBytes, 0);
        assert.equal(await sha256File(out), await sha256File(src));
      } finally {
        await conn.close();
      }
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

interface WireFrame {
  at: number;
  dir: 'in' | 'out';
  type: number;
  status: number;
  serial: number;
  proc: number;
  length: number;
}

/** Every frame our Peers send and receive while `fn` runs (the `sparsevirt:rpc:frame` channel). */
async function recordFrames<T>(fn: (frames: WireFrame[]) => Promise<T>): Promise<T> {
  const frames: WireFrame[] = [];
  const onFrame = (m: unknown) => {
    const { dir, header: h, length } = m as { dir: 'in' | 'out'; header: Header; length: number };
    frames.push({ at: performance.now(), dir, type: h.type, status: h.status, serial: h.serial, proc: h.proc, length });
  };
  diagnostics.subscribe('sparsevirt:rpc:frame', onFrame);
  try {
    return await fn(frames);
  } finally {
    diagnostics.unsubscribe('sparsevirt:rpc:frame', onFrame);
  }
}

/** `p`, or a failure naming `what` once `ms` have passed (the client's own abort wait is 30 s). */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/**
 * The abort on the wire for the stream opened by the last CALL of `proc` in `frames`: exactly one
 * empty STREAM/ERROR from us, never a STREAM/OK (finish) from us, and libvirtd's STREAM/OK after
 * it, which libvirtd sends only once it has taken the abort.
 */
function assertAbortReachedLibvirtd(frames: WireFrame[], proc: number, what: string): { serial: number; abortAt: number; confirmedAt: number } {
  const call = frames.filter((f) => f.dir === 'out' && f.type === MessageType.CALL && f.proc === proc).at(-1);
  assert.ok(call, `${what}: the stream was opened`);
  const mine = frames.filter((f) => f.serial === call.serial && f.proc === proc && f.type === MessageType.STREAM);
  const aborts = mine.filter((f) => f.dir === 'out' && f.status === Status.ERROR);
  assert.equal(aborts.length, 1, `${what}: one abort (STREAM/ERROR) sent`);
  assert.equal(aborts[0]!.length, 0, `${what}: a client's abort carries no error`);
  assert.deepEqual(mine.filter((f) => f.dir === 'out' && f.status === Status.OK), [], `${what}: never finished`);
  const confirm = mine.find((f) => f.dir === 'in' && f.status === Status.OK && f.at >= aborts[0]!.at);
  assert.ok(confirm, `${what}: libvirtd confirmed the abort with STREAM/OK`);
  return { serial: call.serial, abortAt: aborts[0]!.at, confirmedAt: confirm.at };
}

test('an abort of a download and of an upload reaches libvirtd, which confirms it at once; the connection stays usable', { timeout: 30_000 }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  const dir = await scratchDir('/dev/shm', 'sv-interop-');
  try {
    await withScratchPool('interop-abort', async (pool) => {
      // all data: libvirtd would send all of it if the abort did not reach it
      const size = 32 * MiB;
      const src = path.join(dir, 'abort.img');
      await makeImage(src, [{ kind: 'data', length: size }], 9);
      await createVolume(pool, 'abort.img', size);
      const conn = await connect(LIBVIRTD_URI);
      try {
        const vol = await (await conn.storagePoolLookupByName(pool.name)).volLookupByName('abort.img');
        await vol.uploadFile(src, { sparse: false });

        await recordFrames(async (frames) => {
          const s = await vol.download({ sparse: true });
          await within((async () => {
            for await (const c of s) {
              assert.equal(c.kind, 'data');
              break; // leaving the loop aborts the stream
            }
          })(), 5000, 'the download\'s abort');
          assert.equal(s.state, 'aborted');
          const a = assertAbortReachedLibvirtd(frames, P.STORAGE_VOL_DOWNLOAD.num, 'download');
          const received = frames.filter((f) => f.dir === 'in' && f.serial === a.serial && f.type === MessageType.STREAM && f.status === Status.CONTINUE)
            .reduce((n, f) => n + f.length, 0);
          assert.ok(received < size / 2, `libvirtd stopped sending: ${received} of ${size} bytes came`);
          t.diagnostic(`download: abort confirmed ${(a.confirmedAt - a.abortAt).toFixed(1)} ms after it was sent, ${received} bytes came`);
        });

        await recordFrames(async (frames) => {
          const u = await vol.upload({ sparse: true });
          await u.send(Buffer.alloc(65536, 7));
          await within(u.abort(new Error('changed my mind')), 5000, 'the upload\'s abort');
          assert.equal(u.state, 'aborted');
          const a = assertAbortReachedLibvirtd(frames, P.STORAGE_VOL_UPLOAD.num, 'upload');
          t.diagnostic(`upload: abort confirmed ${(a.confirmedAt - a.abortAt).toFixed(1)} ms after it was sent`);
        });

        // the connection still works
        assert.equal((await vol.info()).capacity, size);
      } finally {
        await conn.close();
      }
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('libvirtd errors keep their codes: missing pool and volume, unsupported flags', async (t) => {
  if (!(await requireLibvirt(t))) return;
  const conn = await connect(LIBVIRTD_URI);
  try {
    await assert.rejects(conn.storagePoolLookupByName('no-such-pool-sv'), (e: RemoteError) => {
      assert.equal(e.code, 'VIR_ERR_NO_STORAGE_POOL');
      assert.equal(e.virCode, 49);
      assert.equal(e.domain, 18);
      assert.match(e.message, /no storage pool with matching name 'no-such-pool-sv'/);
      return true;
    });
    await assert.rejects(conn.storageVolLookupByPath('/nonexistent/sv.img'), (e: RemoteError) => e.virCode === 50 && e.code === 'VIR_ERR_NO_STORAGE_VOL');
    await withScratchPool('interop-err', async (pool) => {
      await createVolume(pool, 'v.img', 65536);
      const vol = await (await conn.storagePoolLookupByName(pool.name)).volLookupByName('v.img');
      // flags 2 is not a valid download flag: libvirt says "unsupported flags"
      await assert.rejects(conn.call(P.STORAGE_VOL_DOWNLOAD, { vol: vol.ref, offset: 0n, length: 0n, flags: 2 }), (e: RemoteError) => {
        assert.equal(e.code, 'VIR_ERR_INVALID_ARG');
        assert.match(e.message, /unsupported flags \(0x2\)/);
        return true;
      });
      assert.equal((await vol.info()).capacity, 65536, 'the connection is still usable');
    });
    // sparsevirt's own feature number (asked at connect, not awaited): libvirtd answers 0
    assert.deepEqual(await conn.call(P.CONNECT_SUPPORTS_FEATURE, { feature: Feature.SPARSEVIRT_DEEP_QUEUE }), { supported: 0 });
    assert.equal(conn.sparsevirtDaemon, false, 'libvirtd is not taken for sparsevirtd');
  } finally {
    await conn.close();
  }
});

test('tcp and tls URIs reach libvirtd (libvirt default ports, pkipath=)', async (t) => {
  if (!(await requireLibvirtListeners(t))) return;
  for (const uri of [LIBVIRTD_TCP_URI, LIBVIRTD_TLS_URI]) {
    const conn = await connect(uri);
    try {
      const pools = await conn.listAllStoragePools();
      assert.ok(Array.isArray(pools));
      assert.equal(await conn.getUri(), 'qemu:///system');
    } finally {
      await conn.close();
    }
  }
  // a client certificate from no CA the server trusts: refused, with a clear error
  await assert.rejects(connect('qemu+tls://127.0.0.1:16514/system?pkipath=/nonexistent-pki'), (e: SparsevirtError) => e.code === 'ERR_IO' && /cacert\.pem/.test(e.message));
});
