/**
 * A download from an RBD pool lends its read buffers to the wire (`lendToWire`): each comes back
 * once the connection wrote all of it to its socket, and is read into again. Here against an
 * in-process daemon (its reads are watched through `RbdImage.prototype.read`): a dense download
 * uses a bounded set of read buffers, none per read, and the bytes arrive whole (a buffer given
 * back while a socket write still held it would be overwritten by the next read: the hash would
 * differ), with a client that reads slowly (the socket is full, writes wait in Node's queue) and
 * with virsh; a download the client aborts leaves the next one whole. Skipped without the cluster
 * of scripts/setup-ceph.sh locally, failed in CI.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, test, type TestContext } from 'node:test';
import type { Chunk } from '../src/chunk.js';
import { connect, type Connection } from '../src/client/index.js';
import { RbdImage, RbdPool, rbdWriteChunks } from '../src/daemon/rbd/index.js';
import { zeroBytes } from '../src/stream/zeros.js';
import { imageName, requireCeph, type CephCluster } from './helpers/ceph.js';
import { startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { scratchDir, sha256File } from './helpers/images.js';
import { virsh, virshOk } from './helpers/libvirt.js';

const MiB = 1 << 20;
const POOL = 'reuse';
const SECRET_UUID = '5ec7e700-0000-4000-8000-0000000ec0de';
/** 224 MiB of random data, then 32 MiB of hole: 224 dense reads of 1 MiB (56 of 4 MiB). */
const SIZE = 256 * MiB;
const DATA = 224 * MiB;

interface Setup {
  ceph: CephCluster;
  d: TestDaemon;
  conn: Connection;
  name: string;
  want: string;
}

let s: Setup | null = null;
let dir = '';

async function setup(t: TestContext): Promise<Setup | null> {
  if (s) return s;
  const ceph = await requireCeph(t);
  if (!ceph) return null;
  dir = await scratchDir('/dev/shm', 'svd-rbd-reuse-');
  const d = await startTestDaemon({ dir });
  const conn = await connect(d.uri);
  const uri = d.virshUri;
  await fsp.writeFile(path.join(dir, 'secret.xml'), `<secret ephemeral='no' private='yes'><uuid>${SECRET_UUID}</uuid><usage type='ceph'><name>reuse</name></usage></secret>`);
  await fsp.writeFile(path.join(dir, 'key'), ceph.libvirt.key);
  await virshOk(['secret-define', path.join(dir, 'secret.xml')], { uri });
  await virshOk(['secret-set-value', SECRET_UUID, '--file', path.join(dir, 'key')], { uri });
  const hosts = ceph.monitors.map((m) => `<host name='${m.host}' port='${m.port}'/>`).join('');
  await fsp.writeFile(path.join(dir, 'pool.xml'), `<pool type='rbd'><name>${POOL}</name><source>${hosts}<name>${ceph.pool}</name><auth type='ceph' username='${ceph.libvirt.user}'><secret uuid='${SECRET_UUID}'/></auth></source></pool>`);
  await virshOk(['pool-define', path.join(dir, 'pool.xml')], { uri });
  await virshOk(['pool-start', POOL], { uri });
  // the image, written directly
  const name = imageName('reuse');
  const data = randomBytes(DATA);
  const pool = await RbdPool.connect({ monitors: ceph.monitors, pool: ceph.pool, auth: { username: ceph.libvirt.user, key: ceph.libvirt.key }, timeout: 20 });
  try {
    await pool.create(name, SIZE);
    const image = await pool.open(name);
    try {
      async function* chunks(): AsyncGenerator<Chunk> {
        for (let at = 0; at < DATA; at += 4 * MiB) yield { kind: 'data', bytes: data.subarray(at, at + 4 * MiB) };
        yield { kind: 'hole', length: SIZE - DATA };
      }
      await rbdWriteChunks(image, chunks(), { zeroed: true, release: null });
    } finally {
      await image.close();
    }
  } finally {
    await pool.close();
  }
  const h = createHash('sha256').update(data);
  for (let left = SIZE - DATA; left > 0; left -= MiB) h.update(zeroBytes(MiB));
  s = { ceph, d, conn, name, want: h.digest('hex') };
  return s;
}

after(async () => {
  if (!s) return;
  await virsh(['vol-delete', '--pool', POOL, s.name], { uri: s.d.virshUri });
  await virsh(['pool-destroy', POOL], { uri: s.d.virshUri });
  await s.conn.close().catch(() => undefined);
  await s.d.stop();
  await fsp.rm(dir, { recursive: true, force: true });
});

/** The number of reads of the daemon's images while `fn` runs, and the read buffers (by ArrayBuffer) and their bytes. */
async function watchReads(fn: () => Promise<void>): Promise<{ reads: number; buffers: number; bufferBytes: number }> {
  const seen = new Set<ArrayBufferLike>();
  let reads = 0;
  const read = Object.getOwnPropertyDescriptor(RbdImage.prototype, 'read')!.value as RbdImage['read'];
  RbdImage.prototype.read = function (this: RbdImage, offset, buf, opts) {
    reads++;
    seen.add(buf.buffer);
    return read.call(this, offset, buf, opts);
  };
  try {
    await fn();
  } finally {
    RbdImage.prototype.read = read;
  }
  let bufferBytes = 0;
  for (const b of seen) bufferBytes += b.byteLength;
  return { reads, buffers: seen.size, bufferBytes };
}

/** A download's read buffers come to at most this: 16 MiB of reads in flight, the batch and the wire's share. */
const MAX_BUFFER_BYTES = 48 * MiB;

function assertReused(w: { reads: number; buffers: number; bufferBytes: number }): void {
  assert.ok(w.reads >= DATA / (4 * MiB), `${w.reads} reads`);
  assert.ok(w.buffers * 2 <= w.reads, `${w.buffers} read buffers for ${w.reads} reads`);
  assert.ok(w.bufferBytes <= MAX_BUFFER_BYTES, `${w.bufferBytes / MiB} MiB of read buffers for ${w.reads} reads`);
}

test('rbd download over the wire: a slow client; the read buffers are reused once written, the bytes arrive whole', { timeout: 300_000 }, async (t) => {
  const st = await setup(t);
  if (!st) return;
  const vol = await (await st.conn.storagePoolLookupByName(POOL)).volLookupByName(st.name);
  const h = createHash('sha256');
  let got = 0;
  const w = await watchReads(async () => {
    const stream = await vol.download({ sparse: true, highWaterMark: 256 * 1024 });
    let sinceNap = 0;
    for (;;) {
      const batch = await stream.recvBatch();
      if (batch === null) break;
      for (const c of batch) {
        if (c.kind === 'data') {
          h.update(c.bytes);
          got += c.bytes.length;
          sinceNap += c.bytes.length;
        } else if (c.kind === 'hole') {
          for (let left = c.length; left > 0; left -= Math.min(left, MiB)) h.update(zeroBytes(Math.min(left, MiB)));
          got += c.length;
        } else {
          assert.fail(`unexpected ${c.kind}`);
        }
      }
      // a client slower than the daemon: the socket stays full, the daemon's writes wait in its queue
      if (sinceNap >= MiB) {
        sinceNap = 0;
        await new Promise((r) => setTimeout(r, 3));
      }
    }
    await stream.finish();
  });
  assert.equal(got, SIZE);
  assert.equal(h.digest('hex'), st.want, 'the bytes of a slow download');
  t.diagnostic(`slow client: ${w.reads} reads into ${w.buffers} buffers (${w.bufferBytes / MiB} MiB)`);
  assertReused(w);
});

test('rbd download over the wire: virsh; then a download the client aborts, and one after it', { timeout: 300_000 }, async (t) => {
  const st = await setup(t);
  if (!st) return;
  const out = path.join(dir, 'out.img');
  const w = await watchReads(() => virshOk(['vol-download', '--pool', POOL, st.name, out, '--sparse'], { uri: st.d.virshUri, timeoutMs: 120_000 }).then(() => undefined));
  assert.equal(await sha256File(out), st.want, 'the bytes of virsh vol-download');
  await fsp.rm(out);
  t.diagnostic(`virsh: ${w.reads} reads into ${w.buffers} buffers (${w.bufferBytes / MiB} MiB)`);
  assertReused(w);

  // aborted midway: what the wire holds then never comes back, and nothing breaks
  const vol = await (await st.conn.storagePoolLookupByName(POOL)).volLookupByName(st.name);
  const stream = await vol.download({ sparse: true });
  let got = 0;
  while (got < 40 * MiB) {
    const batch = await stream.recvBatch();
    assert.ok(batch !== null);
    for (const c of batch) got += c.kind === 'data' ? c.bytes.length : 0;
  }
  await stream.abort(new Error('enough'));
  const again = path.join(dir, 'again.img');
  const r = await vol.downloadFile(again, { sparse: true });
  assert.equal(r.dataBytes, DATA);
  assert.equal(await sha256File(again), st.want, 'the bytes of the download after the aborted one');
  await fsp.rm(again);
});
