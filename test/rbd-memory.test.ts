/**
 * RBD transfers: how completions come back from librbd, what the streaming primitives hand to
 * librbd and back, and the daemon's peak RSS while it moves a large sparse image through an
 * RBD pool with virsh. Needs the cluster of scripts/setup-ceph.sh (skipped without it locally,
 * failed in CI) and, for the daemon, virsh.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import type { Chunk } from '../src/chunk.js';
import { RbdPool, rbdReadChunks, rbdWriteChunks, type RbdImage, type RbdPoolSource } from '../src/daemon/rbd/index.js';
import { setNativeSyscalls } from '../src/io/sys.js';
import { zeroBytes } from '../src/stream/zeros.js';
import { imageName, rbdCli, rbdDuUsed, rbdExportSha256, requireCeph, type CephCluster } from './helpers/ceph.js';
import { allocatedBytes, scratchDir, sha256File } from './helpers/images.js';
import { virsh, virshOk } from './helpers/libvirt.js';

const KiB = 1024;
const MiB = 1 << 20;
const GiB = 1 << 30;
const OBJECT = 4 * MiB;

function source(ceph: CephCluster): RbdPoolSource {
  return { monitors: ceph.monitors, pool: ceph.pool, auth: { username: ceph.libvirt.user, key: ceph.libvirt.key }, timeout: 20 };
}

/** `count` extents of `len` random bytes spread evenly over `size`, as chunks. */
function scattered(size: number, count: number, len: number): { chunks: () => AsyncGenerator<Chunk>; sha: string; data: Array<[number, Buffer]> } {
  const data: Array<[number, Buffer]> = [];
  for (let i = 0; i < count; i++) data.push([Math.floor((i * (size / len)) / count) * len, randomBytes(len)]);
  const h = createHash('sha256');
  let pos = 0;
  for (const [off, b] of data) {
    for (let left = off - pos; left > 0; left -= Math.min(left, MiB)) h.update(zeroBytes(Math.min(left, MiB)));
    h.update(b);
    pos = off + b.length;
  }
  for (let left = size - pos; left > 0; left -= Math.min(left, MiB)) h.update(zeroBytes(Math.min(left, MiB)));
  return {
    data,
    sha: h.digest('hex'),
    async *chunks() {
      let at = 0;
      for (const [off, b] of data) {
        if (off > at) yield { kind: 'hole', length: off - at };
        yield { kind: 'data', bytes: b };
        at = off + b.length;
      }
      if (size > at) yield { kind: 'hole', length: size - at };
    },
  };
}

async function withImage<T>(ceph: CephCluster, prefix: string, size: number, fn: (pool: RbdPool, image: RbdImage, name: string) => Promise<T>): Promise<T> {
  const pool = await RbdPool.connect(source(ceph));
  const name = imageName(prefix);
  try {
    await pool.create(name, size);
    const image = await pool.open(name);
    try {
      return await fn(pool, image, name);
    } finally {
      await image.close();
    }
  } finally {
    await pool.remove(name).catch(() => undefined);
    await pool.close();
  }
}

test('rbd: aio completions come back through the image event pipe, none by a callback into JS', { timeout: 120_000 }, async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  await withImage(ceph, 'pipe', 64 * MiB, async (_pool, image) => {
    const c = image.native.completions;
    const before = { ...c };
    const layout = scattered(64 * MiB, 2000, 4 * KiB);
    await rbdWriteChunks(image, layout.chunks(), { zeroed: true });
    const back = createHash('sha256');
    for await (const ch of rbdReadChunks(image, { sparse: false })) back.update(ch.kind === 'data' ? ch.bytes : zeroBytes(ch.length));
    assert.equal(back.digest('hex'), layout.sha);
    assert.ok(c.polled - before.polled >= 2000, `${c.polled - before.polled} completions polled for 2,000 writes and the reads`);
    assert.equal(c.calledBack - before.calledBack, 0, 'no completion called back');
  });
});

test('rbd: where no event pipe can be made, completions call back and the data still arrives whole', { timeout: 120_000 }, async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  await withImage(ceph, 'nopipe', 16 * MiB, async (_pool, image) => {
    const c = image.native.completions;
    const before = { ...c };
    // without native syscalls, the pipe cannot be made (this image has none yet)
    assert.equal(setNativeSyscalls(false), false);
    try {
      const layout = scattered(16 * MiB, 200, 4 * KiB);
      await rbdWriteChunks(image, layout.chunks(), { zeroed: true });
      const back = createHash('sha256');
      for await (const ch of rbdReadChunks(image, { sparse: false })) back.update(ch.kind === 'data' ? ch.bytes : zeroBytes(ch.length));
      assert.equal(back.digest('hex'), layout.sha);
    } finally {
      setNativeSyscalls(true);
    }
    assert.ok(c.calledBack - before.calledBack >= 200, `${c.calledBack - before.calledBack} completions called back`);
  });
});

test('rbdWriteChunks: writes end on object boundaries; every buffer comes back once, after librbd wrote it', { timeout: 120_000 }, async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  await withImage(ceph, 'align', 64 * MiB, async (_pool, image, name) => {
    // dense data in libvirt-sized pieces (262,120 bytes: they straddle object boundaries), then
    // a hole, then more data starting mid-object
    const dense = randomBytes(20 * MiB);
    const tail = randomBytes(3 * MiB + 12345);
    const pieces: Buffer[] = [];
    for (let at = 0; at < dense.length; at += 262_120) pieces.push(Buffer.from(dense.subarray(at, Math.min(dense.length, at + 262_120))));
    const tailAt = 30 * MiB + 4096;
    for (let at = 0; at < tail.length; at += 262_120) pieces.push(Buffer.from(tail.subarray(at, Math.min(tail.length, at + 262_120))));
    async function* chunks(): AsyncGenerator<Chunk> {
      let i = 0;
      for (; i * 262_120 < dense.length; i++) yield { kind: 'data', bytes: pieces[i]! };
      yield { kind: 'hole', length: tailAt - dense.length };
      for (; i < pieces.length; i++) yield { kind: 'data', bytes: pieces[i]! };
      yield { kind: 'hole', length: 64 * MiB - tailAt - tail.length };
    }
    const writes: Array<[number, number]> = [];
    const inFlight = new Set<Buffer>();
    const written = new Set<Buffer>();
    const write = image.write.bind(image);
    image.write = async (offset, bufs, opts) => {
      const list = Buffer.isBuffer(bufs) ? [bufs] : bufs;
      writes.push([offset, list.reduce((n, b) => n + b.length, 0)]);
      for (const b of list) inFlight.add(b);
      await write(offset, list, opts);
      for (const b of list) {
        inFlight.delete(b);
        written.add(b);
      }
    };
    const released: Buffer[] = [];
    await rbdWriteChunks(image, chunks(), {
      zeroed: true,
      release: (bufs) => {
        for (const b of bufs) {
          // a buffer comes back whole, once, after every write of a part of it completed
          assert.ok(pieces.includes(b), 'a buffer that was given comes back, not a part of it');
          // (by the bytes, not the ArrayBuffer alone: pieces under 4 KiB share Node's Buffer pool)
          for (const w of inFlight) {
            const overlaps = w.buffer === b.buffer && w.byteOffset < b.byteOffset + b.length && b.byteOffset < w.byteOffset + w.length;
            assert.ok(!overlaps, 'a part of it is still being written');
          }
          released.push(b);
        }
      },
    });
    for (const [off, len] of writes) {
      assert.equal(Math.floor(off / OBJECT), Math.floor((off + len - 1) / OBJECT), `write ${off}+${len} crosses an object boundary`);
    }
    // 20 MiB from 0: 5 whole objects; 3 MiB + 12,345 from 30 MiB + 4 KiB: 2 writes
    assert.equal(writes.length, 7, JSON.stringify(writes));
    assert.equal(released.length, pieces.length);
    assert.equal(new Set(released).size, pieces.length, 'each buffer comes back once');
    const want = createHash('sha256').update(dense).update(zeroBytes(tailAt - dense.length)).update(tail);
    for (let left = 64 * MiB - tailAt - tail.length; left > 0; left -= Math.min(left, MiB)) want.update(zeroBytes(Math.min(left, MiB)));
    assert.equal(await rbdExportSha256(ceph, name), want.digest('hex'));
  });
});

test('rbdReadChunks: small data is copied out and read buffers are reused; dense data goes on as views of its reads', { timeout: 180_000 }, async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  await withImage(ceph, 'copyout', 256 * MiB, async (_pool, image, name) => {
    // 4 KiB every 64 KiB in the first 128 MiB (memstore reports whole objects: they are read
    // whole and the zeros found), then 64 MiB of dense data
    const sparse = scattered(128 * MiB, 2048, 4 * KiB);
    const dense = randomBytes(64 * MiB);
    async function* chunks(): AsyncGenerator<Chunk> {
      yield* sparse.chunks();
      yield { kind: 'data', bytes: dense };
      yield { kind: 'hole', length: 64 * MiB };
    }
    await rbdWriteChunks(image, chunks(), { zeroed: true });
    const h = createHash('sha256');
    const readBuffers = new Set<ArrayBufferLike>();
    let smallData = 0;
    let denseData = 0;
    let pos = 0;
    const read = image.read.bind(image);
    image.read = (offset, buf, opts) => {
      readBuffers.add(buf.buffer);
      return read(offset, buf, opts);
    };
    for await (const c of rbdReadChunks(image, { detectZeroes: true, readSize: MiB })) {
      if (c.kind === 'hole') {
        for (let left = c.length; left > 0; left -= Math.min(left, MiB)) h.update(zeroBytes(Math.min(left, MiB)));
        pos += c.length;
        continue;
      }
      h.update(c.bytes);
      if (pos < 128 * MiB) {
        assert.ok(!readBuffers.has(c.bytes.buffer), `small data at ${pos} is a view of a read buffer`);
        smallData += c.bytes.length;
      } else {
        assert.ok(readBuffers.has(c.bytes.buffer), `dense data at ${pos} was copied`);
        denseData += c.bytes.length;
      }
      pos += c.bytes.length;
    }
    assert.equal(pos, 256 * MiB);
    assert.equal(smallData, 2048 * 4 * KiB);
    assert.equal(denseData, 64 * MiB);
    assert.equal(h.digest('hex'), await rbdExportSha256(ceph, name));
    // the first 128 MiB took 128 reads of 1 MiB; their buffers were reused (a few in flight at once)
    assert.ok(readBuffers.size <= 64 + 32 + 2, `${readBuffers.size} read buffers for 192 reads`);
  });
});

// ------------------------------------------------------------------ the daemon's peak RSS

const DAEMON_MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../bin/sparsevirtd.mjs');
const RSS_LIMIT = 192 * MiB;

function status(pid: number, field: 'VmHWM' | 'VmRSS'): number {
  const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * KiB : -1;
}

/** Peak RSS of `pid` while `fn` runs (VmHWM, reset before through clear_refs). */
async function peakRss(pid: number, fn: () => Promise<void>): Promise<number> {
  fs.writeFileSync(`/proc/${pid}/clear_refs`, '5');
  await fn();
  return status(pid, 'VmHWM');
}

/** A sparsevirtd of its own (its RSS is the daemon's alone) with an RBD pool `r`, and a large sparse image. */
interface MemSetup {
  ceph: CephCluster;
  dir: string;
  uri: string;
  child: ChildProcess;
  pid: number;
  /** 8 GiB: 128 extents of 8 MiB of random data, one per 64 MiB. */
  src: string;
  want: string;
  name: string;
  uploaded: boolean;
}

let mem: MemSetup | null = null;

async function memSetup(t: TestContext): Promise<MemSetup | null> {
  if (mem) return mem;
  const ceph = await requireCeph(t);
  if (!ceph) return null;
  if ((await virsh(['--version'])).code !== 0) {
    if (process.env.CI) assert.fail('virsh is needed');
    t.skip('no virsh');
    return null;
  }
  const dir = await scratchDir('/dev/shm', 'svd-rbd-mem-');
  const sock = path.join(dir, 'sock');
  const uri = `qemu+unix:///system?socket=${sock}`;
  const child = spawn(process.execPath, [DAEMON_MAIN, '--listen', `unix:${sock}`, '--state-dir', path.join(dir, 'state')], { stdio: 'ignore' });
  mem = { ceph, dir, uri, child, pid: child.pid!, src: path.join(dir, 'src.img'), want: '', name: imageName('mem'), uploaded: false };
  for (let i = 0; i < 150 && !fs.existsSync(sock); i++) await new Promise((r) => setTimeout(r, 100));
  const uuid = '5ec7e700-0000-4000-8000-00000000b192';
  await fsp.writeFile(path.join(dir, 'secret.xml'), `<secret ephemeral='no' private='yes'><uuid>${uuid}</uuid><usage type='ceph'><name>mem</name></usage></secret>`);
  await fsp.writeFile(path.join(dir, 'key'), ceph.libvirt.key);
  await virshOk(['secret-define', path.join(dir, 'secret.xml')], { uri });
  await virshOk(['secret-set-value', uuid, '--file', path.join(dir, 'key')], { uri });
  const hosts = ceph.monitors.map((m) => `<host name='${m.host}' port='${m.port}'/>`).join('');
  await fsp.writeFile(path.join(dir, 'pool.xml'), `<pool type='rbd'><name>r</name><source>${hosts}<name>${ceph.pool}</name><auth type='ceph' username='${ceph.libvirt.user}'><secret uuid='${uuid}'/></auth></source></pool>`);
  await virshOk(['pool-define', path.join(dir, 'pool.xml')], { uri });
  await virshOk(['pool-start', 'r'], { uri });
  const fd = fs.openSync(mem.src, 'w');
  for (let i = 0; i < 128; i++) fs.writeSync(fd, randomBytes(8 * MiB), 0, 8 * MiB, i * 64 * MiB + (i % 7) * 1024 * KiB);
  fs.ftruncateSync(fd, 8 * GiB);
  fs.closeSync(fd);
  mem.want = await sha256File(mem.src);
  return mem;
}

after(async () => {
  if (!mem) return;
  const { ceph, child, dir, name } = mem;
  await rbdCli(ceph, ['rm', '--no-progress', `${ceph.pool}/${name}`]).catch(() => undefined);
  if (child.exitCode === null) {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
  }
  await fsp.rm(dir, { recursive: true, force: true });
});

test('sparsevirtd: peak RSS at most 192 MiB during vol-upload --sparse of an 8 GiB image with 1 GiB of data into an RBD pool', { timeout: 600_000 }, async (t) => {
  const s = await memSetup(t);
  if (!s) return;
  await virshOk(['vol-create-as', 'r', s.name, String(8 * GiB)], { uri: s.uri });
  const idle = status(s.pid, 'VmRSS');
  const up = await peakRss(s.pid, () => virshOk(['vol-upload', '--pool', 'r', s.name, s.src, '--sparse'], { uri: s.uri, timeoutMs: 300_000 }).then(() => undefined));
  s.uploaded = true;
  assert.equal(await rbdExportSha256(s.ceph, s.name), s.want, 'rbd export of what arrived');
  const used = await rbdDuUsed(s.ceph, s.name);
  assert.ok(used <= 128 * 3 * OBJECT, `rbd du: ${used / MiB} MiB used for 1 GiB of data in at most 384 objects`);
  t.diagnostic(`sparsevirtd RSS: idle ${(idle / MiB).toFixed(0)} MiB, peak ${(up / MiB).toFixed(0)} MiB uploading`);
  assert.ok(up <= RSS_LIMIT, `peak RSS uploading ${(up / MiB).toFixed(0)} MiB > 192 MiB`);
});

// (the dense reads' buffers are lent to the wire and read into again once the socket wrote them:
// without that, one 1 MiB buffer per read waited for V8 to collect it, 242-252 MiB at the peak)
test('sparsevirtd: peak RSS at most 192 MiB during vol-download --sparse of that image', { timeout: 600_000 }, async (t) => {
  const s = await memSetup(t);
  if (!s) return;
  assert.ok(s.uploaded, 'the upload test ran first');
  const out = path.join(s.dir, 'out.img');
  const down = await peakRss(s.pid, () => virshOk(['vol-download', '--pool', 'r', s.name, out, '--sparse'], { uri: s.uri, timeoutMs: 300_000 }).then(() => undefined));
  assert.equal(await sha256File(out), s.want);
  const allocated = await allocatedBytes(out);
  assert.ok(allocated <= 1.05 * GiB + MiB, `download allocated ${allocated / MiB} MiB`);
  await fsp.rm(out);
  t.diagnostic(`sparsevirtd RSS: peak ${(down / MiB).toFixed(0)} MiB downloading`);
  assert.ok(down <= RSS_LIMIT, `peak RSS downloading ${(down / MiB).toFixed(0)} MiB > 192 MiB`);
});
