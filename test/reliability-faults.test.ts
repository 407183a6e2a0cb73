/**
 * Faults. sparsevirtd runs as a child process here, so that it can be killed, stopped
 * and looked at through /proc/<pid>/fd:
 *  - a client killed (SIGKILL) mid-upload and mid-download: the daemon frees the stream and its
 *    file descriptor, and other transfers in flight finish correctly;
 *  - the daemon stopped (SIGSTOP) or killed mid-transfer: the client reports a clear error
 *    within the keepalive window; an upload's target outside the written range is untouched;
 *  - disk full during an upload (a pool on an 8 MiB tmpfs): a STREAM/ERROR with the reason, the
 *    daemon keeps serving, nothing left outside the volume;
 *  - the daemon killed with SIGKILL again and again while it defines pools: the state always
 *    loads, and every pool and volume acknowledged before is there.
 */
import assert from 'node:assert/strict';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Chunk } from '../src/chunk.js';
import { connect, type Connection, type StoragePool } from '../src/client/index.js';
import { RemoteError, SparsevirtError } from '../src/errors.js';
import { allocatedBytes, makeFilledFile, makeImage, scratchDir, sha256File } from './helpers/images.js';
import { MiB, isRoot, mountTmpfs, sleep, spawnDaemon, startWorker, umount, waitUntil, type ChildDaemon } from './long/harness.js';

async function definePool(conn: Connection, name: string, dir: string): Promise<StoragePool> {
  const pool = await conn.storagePoolDefineDir(name, dir);
  await pool.build();
  await pool.create();
  return pool;
}

const fdsOn = (d: ChildDaemon, file: string) => d.fds().filter((f) => f === file).length;

describe('faults: clients and the daemon killed or stopped mid-transfer', () => {
  let dir: string;

  before(async () => {
    dir = await scratchDir();
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('a client killed mid-upload and mid-download: the daemon closes the stream and the file; other transfers finish', async (t) => {
    const work = path.join(dir, 'k');
    await fsp.mkdir(work);
    const d = await spawnDaemon({ dir: work });
    try {
      const poolDir = path.join(work, 'pool');
      const conn = await connect(d.uri);
      const pool = await definePool(conn, 'k', poolDir);
      await pool.createVol({ name: 'up.img', capacity: 64 * MiB, allocation: 0 });
      await pool.createVol({ name: 'dl.img', capacity: 6 * MiB, allocation: 0 });
      await makeFilledFile(path.join(poolDir, 'dl.img'), 6 * MiB, 21);
      const srcUp = path.join(work, 'other-up.src');
      await makeImage(srcUp, [{ kind: 'data', length: 3 * MiB }, { kind: 'hole', length: 2 * MiB }, { kind: 'data', length: MiB }], 22);
      const otherUp = await pool.createVol({ name: 'other-up.img', capacity: 6 * MiB, allocation: 0 });
      const otherDl = await pool.createVol({ name: 'other-dl.img', capacity: 6 * MiB, allocation: 0 });
      await makeImage(path.join(poolDir, 'other-dl.img'), [{ kind: 'hole', length: MiB }, { kind: 'data', length: 5 * MiB }], 23);
      const socketsBefore = d.fds().filter((f) => f.startsWith('socket:')).length;

      // two victims in their own processes, each mid-transfer
      const uploader = startWorker({ op: 'trickle-upload', uri: d.uri, pool: 'k', vol: 'up.img', rate: 512 * 1024 });
      const downloader = startWorker({ op: 'slow-download', uri: d.uri, pool: 'k', vol: 'dl.img', rate: 256 * 1024, hwm: 64 * 1024 });
      await uploader.waitLine((l) => Number(l.bytes) >= 256 * 1024, 10000);
      await downloader.waitLine((l) => l.event === 'progress' && Number(l.bytes) > 0, 10000);
      await waitUntil(() => fdsOn(d, path.join(poolDir, 'up.img')) === 1 && fdsOn(d, path.join(poolDir, 'dl.img')) === 1, 5000, 'both volumes open in the daemon');

      // other transfers in flight while the victims die
      const others = Promise.all([
        otherUp.uploadFile(srcUp, { sparse: true }),
        otherDl.downloadFile(path.join(work, 'other-dl.out'), { sparse: true }),
      ]);
      uploader.proc.kill('SIGKILL');
      downloader.proc.kill('SIGKILL');
      await Promise.all([uploader.exited, downloader.exited]);
      const t0 = Date.now();
      await waitUntil(() => fdsOn(d, path.join(poolDir, 'up.img')) === 0 && fdsOn(d, path.join(poolDir, 'dl.img')) === 0, 5000, 'the daemon to close both volumes');
      t.diagnostic(`both files closed ${Date.now() - t0} ms after the kill`);
      await others;
      assert.equal(await sha256File(path.join(poolDir, 'other-up.img')), await sha256File(srcUp), 'the other upload is right');
      assert.equal(await sha256File(path.join(work, 'other-dl.out')), await sha256File(path.join(poolDir, 'other-dl.img')), 'the other download is right');
      await waitUntil(() => /"upload ended: connection closed"/.test(d.stderr()) && /"download ended: connection closed"/.test(d.stderr()), 5000, 'both transfers logged as ended');
      // the volumes are free again: usable by a new transfer at once
      const again = await (await conn.storagePoolLookupByName('k')).volLookupByName('up.img');
      const up = await again.upload({ sparse: true });
      await up.sendChunks((async function* (): AsyncGenerator<Chunk> {
        yield { kind: 'data', bytes: Buffer.alloc(4096, 9) };
      })());
      await conn.close();
      await waitUntil(() => d.fds().filter((f) => f.startsWith('socket:')).length <= socketsBefore - 1, 5000, 'connections released');
      assert.ok(d.alive());
      assert.deepEqual(d.errors(), []);
    } finally {
      await d.stop();
    }
  });

  test('the daemon stopped (SIGSTOP) mid-upload and mid-download: a keepalive error within the window; the target outside the written range is untouched', async (t) => {
    const work = path.join(dir, 's');
    await fsp.mkdir(work);
    const d = await spawnDaemon({ dir: work });
    const ka = { keepaliveInterval: 0.5, keepaliveCount: 2 };
    const windowMs = ka.keepaliveInterval * 1000 * (ka.keepaliveCount + 1);
    try {
      const poolDir = path.join(work, 'pool');
      const setup = await connect(d.uri);
      const pool = await definePool(setup, 's', poolDir);
      await pool.createVol({ name: 'tgt.img', capacity: 16 * MiB, allocation: 0 });
      const tgt = path.join(poolDir, 'tgt.img');
      await makeFilledFile(tgt, 16 * MiB, 31);
      const before = await fsp.readFile(tgt);
      await pool.createVol({ name: 'src.img', capacity: 12 * MiB, allocation: 0 });
      await makeFilledFile(path.join(poolDir, 'src.img'), 12 * MiB, 32);
      await setup.close();

      // upload at 4 MiB, slowly; stop the daemon after 1 MiB
      const conn = await connect(d.uri, ka);
      const vol = await (await conn.storagePoolLookupByName('s')).volLookupByName('tgt.img');
      const stream = await vol.upload({ sparse: true, offset: 4 * MiB });
      let generated = 0;
      let stoppedAt = 0;
      async function* slow(): AsyncGenerator<Chunk> {
        for (let i = 0; ; i++) {
          yield { kind: 'data', bytes: Buffer.alloc(64 * 1024, (i % 200) + 1) };
          generated += 64 * 1024;
          if (generated === MiB) {
            d.signal('SIGSTOP');
            stoppedAt = Date.now();
          }
          await sleep(2);
          if (generated > 8 * MiB) throw new Error('still sending 7 MiB after the daemon stopped');
        }
      }
      const err = await stream.sendChunks(slow()).then(() => null, (e: unknown) => e);
      const tookMs = Date.now() - stoppedAt;
      t.diagnostic(`upload failed ${tookMs} ms after SIGSTOP (window ${windowMs} ms): ${(err as Error)?.message}`);
      assert.ok(err instanceof SparsevirtError, `a coded error, got ${String(err)}`);
      assert.equal(err.code, 'ERR_KEEPALIVE_TIMEOUT', err.message);
      assert.ok(tookMs <= windowMs + 800, `detected after ${tookMs} ms`);
      d.signal('SIGCONT');
      // the daemon resumes, sees the connection gone and closes the volume
      await waitUntil(() => fdsOn(d, tgt) === 0, 5000, 'the daemon to close the target');
      const now = await fsp.readFile(tgt);
      assert.equal(now.length, 16 * MiB, 'size unchanged');
      assert.ok(now.subarray(0, 4 * MiB).equals(before.subarray(0, 4 * MiB)), 'before the offset: untouched');
      assert.ok(now.subarray(4 * MiB + generated).equals(before.subarray(4 * MiB + generated)), 'past what was sent: untouched');
      // within the range: what was written is a prefix of what was sent, the rest is the old bytes
      let written = 0;
      for (let off = 0; off < generated; off += 64 * 1024) {
        const piece = now.subarray(4 * MiB + off, 4 * MiB + off + 64 * 1024);
        const sent = Buffer.alloc(64 * 1024, ((off / (64 * 1024)) % 200) + 1);
        const old = before.subarray(4 * MiB + off, 4 * MiB + off + 64 * 1024);
        if (piece.equals(sent) && written === off) written += 64 * 1024;
        else assert.ok(piece.equals(old), `piece at +${off}: neither the old bytes nor the next piece sent`);
      }
      t.diagnostic(`${written} of ${generated} bytes sent reached the volume before the stop`);
      assert.ok(written > 0 && written <= generated);

      // a download: the reader keeps reading what arrived, then keepalive ends it
      const conn2 = await connect(d.uri, ka);
      const src = await (await conn2.storagePoolLookupByName('s')).volLookupByName('src.img');
      const dl = await src.download({ sparse: true, highWaterMark: 256 * 1024 });
      let got = 0;
      let stopped2 = 0;
      const err2 = await (async () => {
        for await (const c of dl) {
          got += c.kind === 'data' ? c.bytes.length : c.length;
          if (!stopped2 && got >= MiB) {
            d.signal('SIGSTOP');
            stopped2 = Date.now();
          }
        }
      })().then(() => null, (e: unknown) => e);
      const took2 = Date.now() - stopped2;
      t.diagnostic(`download failed ${took2} ms after SIGSTOP, ${got} of ${12 * MiB} bytes received: ${(err2 as Error)?.message}`);
      assert.ok(err2 instanceof SparsevirtError && err2.code === 'ERR_KEEPALIVE_TIMEOUT', String(err2));
      assert.ok(got < 12 * MiB);
      assert.ok(took2 <= windowMs + 800, `detected after ${took2} ms`);
      d.signal('SIGCONT');
      await waitUntil(() => fdsOn(d, path.join(poolDir, 'src.img')) === 0, 5000, 'the daemon to close the source');
      await conn.close();
      await conn2.close();
      assert.deepEqual(d.errors(), []);
    } finally {
      await d.stop();
    }
  });

  test('the daemon killed (SIGKILL) mid-upload: the client fails at once; after a restart everything is there and the target is untouched outside the written range', async (t) => {
    const work = path.join(dir, 'x');
    await fsp.mkdir(work);
    let d = await spawnDaemon({ dir: work });
    try {
      const poolDir = path.join(work, 'pool');
      const setup = await connect(d.uri);
      const pool = await definePool(setup, 'x', poolDir);
      await pool.setAutostart(true);
      await pool.createVol({ name: 'tgt.img', capacity: 8 * MiB, allocation: 0 });
      const tgt = path.join(poolDir, 'tgt.img');
      await makeFilledFile(tgt, 8 * MiB, 41);
      const before = await fsp.readFile(tgt);
      await setup.close();

      const conn = await connect(d.uri, { keepaliveInterval: 0.5, keepaliveCount: 2 });
      const vol = await (await conn.storagePoolLookupByName('x')).volLookupByName('tgt.img');
      const stream = await vol.upload({ sparse: false, offset: 2 * MiB });
      let generated = 0;
      let killedAt = 0;
      async function* slow(): AsyncGenerator<Chunk> {
        for (;;) {
          yield { kind: 'data', bytes: Buffer.alloc(32 * 1024, 0x77) };
          generated += 32 * 1024;
          if (generated === 512 * 1024) {
            d.signal('SIGKILL');
            killedAt = Date.now();
          }
          if (generated > 4 * MiB) throw new Error('still sending long after the daemon died');
          await sleep(2);
        }
      }
      const err = await stream.sendChunks(slow()).then(() => null, (e: unknown) => e);
      t.diagnostic(`upload failed ${Date.now() - killedAt} ms after SIGKILL: ${(err as Error)?.message}`);
      assert.ok(err instanceof SparsevirtError && err.code === 'ERR_CONNECTION_CLOSED', String(err));
      assert.ok(Date.now() - killedAt < 1000);
      await d.exited;
      await conn.close();

      d = await spawnDaemon({ dir: work }); // the stale socket is replaced
      const c2 = await connect(d.uri);
      const p2 = await c2.storagePoolLookupByName('x');
      assert.equal(await p2.isActive(), true);
      assert.deepEqual((await p2.listAllVolumes()).map((v) => v.name), ['tgt.img']);
      const now = await fsp.readFile(tgt);
      assert.equal(now.length, 8 * MiB);
      assert.ok(now.subarray(0, 2 * MiB).equals(before.subarray(0, 2 * MiB)), 'before the offset: untouched');
      assert.ok(now.subarray(2 * MiB + generated).equals(before.subarray(2 * MiB + generated)), 'past what was sent: untouched');
      await c2.close();
    } finally {
      await d.stop();
    }
  });

  test('disk full during an upload: a STREAM/ERROR with the reason; the daemon keeps serving; nothing outside the volume', async (t) => {
    if (!isRoot()) {
      if (process.env.CI) throw new Error('this test mounts a tmpfs: CI runs as root');
      t.skip('needs root to mount a tmpfs');
      return;
    }
    const work = path.join(dir, 'full');
    const small = path.join(work, 'small');
    await fsp.mkdir(work);
    mountTmpfs(small, '8m');
    const d = await spawnDaemon({ dir: work });
    try {
      const conn = await connect(d.uri);
      const tiny = await definePool(conn, 'tiny', path.join(small, 'pool'));
      const roomy = await definePool(conn, 'roomy', path.join(work, 'roomy'));
      const vol = await tiny.createVol({ name: 'fill.img', capacity: 32 * MiB, allocation: 0 });
      const stateBefore = (await fsp.readdir(path.join(work, 'state', 'pools'))).sort();
      const src = path.join(work, 'big.src');
      await makeImage(src, [{ kind: 'data', length: 16 * MiB }], 51);
      const err = await vol.uploadFile(src, { sparse: true }).then(() => null, (e: unknown) => e);
      t.diagnostic(`upload into a full file system: ${(err as Error)?.message}`);
      assert.ok(err instanceof RemoteError, String(err));
      assert.equal(err.virCode, 38);
      assert.equal(err.int1, 28, 'errno ENOSPC');
      assert.match(err.message, /No space left on device/);
      // the daemon keeps serving, on the same connection and elsewhere
      assert.equal((await vol.info()).capacity, 32 * MiB, 'the volume keeps its size');
      const ok = await roomy.createVol({ name: 'ok.img', capacity: 2 * MiB, allocation: 0 });
      const okSrc = path.join(work, 'ok.src');
      await makeImage(okSrc, [{ kind: 'data', length: MiB }, { kind: 'hole', length: MiB }], 52);
      await ok.uploadFile(okSrc, { sparse: true });
      await ok.downloadFile(path.join(work, 'ok.out'), { sparse: true });
      assert.equal(await sha256File(path.join(work, 'ok.out')), await sha256File(okSrc));
      // nothing outside the volume: no temp files, all the used space is the volume's
      assert.deepEqual(await fsp.readdir(path.join(small, 'pool')), ['fill.img']);
      assert.deepEqual((await fsp.readdir(path.join(work, 'state', 'pools'))).sort(), stateBefore);
      const fsStat = await fsp.statfs(small);
      const used = (fsStat.blocks - fsStat.bfree) * fsStat.bsize;
      const alloc = await allocatedBytes(path.join(small, 'pool', 'fill.img'));
      assert.ok(Math.abs(used - alloc) <= 64 * 1024, `used ${used}, volume ${alloc}`);
      // space comes back with the volume
      await vol.delete();
      const again = await tiny.createVol({ name: 'again.img', capacity: 4 * MiB, allocation: 0 });
      await again.uploadFile(okSrc, { sparse: true });
      await conn.close();
      assert.deepEqual(d.errors(), []);
    } finally {
      await d.stop();
      umount(small);
    }
  });

  test('SIGKILL again and again while the daemon defines pools: the state always loads, and every acknowledged pool and volume is there', async (t) => {
    const work = path.join(dir, 'state-loop');
    await fsp.mkdir(work);
    const acked = new Map<string, { active: boolean; autostart: boolean }>();
    let d = await spawnDaemon({ dir: work });
    const first = await connect(d.uri);
    const keep = await definePool(first, 'keep', path.join(work, 'keep'));
    await (await keep.createVol({ name: 'kept.img', capacity: MiB, allocation: 0 })).uploadFile(await (async () => {
      const f = path.join(work, 'kept.src');
      await makeImage(f, [{ kind: 'data', length: 4096 }, { kind: 'hole', length: MiB - 4096 }], 61);
      return f;
    })(), { sparse: true });
    acked.set('keep', { active: true, autostart: false });
    await first.close();
    const rounds = 6;
    let defined = 0;
    try {
      for (let round = 0; round < rounds; round++) {
        const conn = await connect(d.uri);
        const busy = (async () => {
          for (let n = 0; ; n++) {
            const name = `r${round}-${n}`;
            const p = await conn.storagePoolDefineDir(name, path.join(work, 'pools', name));
            acked.set(name, { active: false, autostart: false });
            defined++;
            if (n % 2 === 0) {
              await p.build();
              await p.create();
              acked.get(name)!.active = true;
            }
            if (n % 3 === 0) {
              await p.setAutostart(true);
              acked.get(name)!.autostart = true;
            }
          }
        })().catch((e: unknown) => e);
        await sleep(150 + round * 40);
        d.signal('SIGKILL');
        await d.exited;
        const e = await busy;
        assert.ok(e instanceof SparsevirtError, `the client sees the daemon die: ${String(e)}`);
        await conn.close();
        d = await spawnDaemon({ dir: work });
        const log = d.stderr();
        assert.doesNotMatch(log, /unreadable/, `round ${round}: every state file reads`);
        const files = await fsp.readdir(path.join(work, 'state', 'pools'));
        assert.deepEqual(files.filter((f) => f.includes('.tmp-')), [], 'interrupted writes cleaned up');
        const check = await connect(d.uri);
        const pools = new Map((await check.listAllStoragePools()).map((p) => [p.name, p]));
        for (const [name, want] of acked) {
          const p = pools.get(name);
          assert.ok(p, `round ${round}: pool ${name} was acknowledged, and is there`);
          // what was acknowledged holds; an operation in flight at the kill may have taken effect or not
          if (want.active) assert.equal(await p.isActive(), true, `${name} active`);
          if (want.autostart) assert.equal(await p.autostart(), true, `${name} autostart`);
        }
        await check.close();
      }
      const c = await connect(d.uri);
      const k = await c.storagePoolLookupByName('keep');
      assert.deepEqual((await k.listAllVolumes()).map((v) => v.name), ['kept.img']);
      assert.equal(await sha256File(path.join(work, 'keep', 'kept.img')), await sha256File(path.join(work, 'kept.src')));
      await c.close();
      t.diagnostic(`${rounds} kills, ${defined} pools acknowledged, all found after each restart`);
      assert.ok(defined > rounds, 'pools were being defined when the daemon died');
    } finally {
      await d.stop();
    }
  });
});

