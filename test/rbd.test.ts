/**
 * Ceph RBD through librados/librbd (src/daemon/rbd): pool and image operations in libvirt's
 * terms, the sparse read and write primitives checked against the `rbd` tool, and bounded,
 * clear failures with the event loop kept responsive. Needs the cluster of
 * scripts/setup-ceph.sh (skipped without it locally, failed in CI).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import type { Chunk } from '../src/chunk.js';
import { SparsevirtError } from '../src/errors.js';
import { RbdPool, rbdReadChunks, rbdWriteChunks, setCephLibraryNames, type RbdImage, type RbdPoolSource } from '../src/daemon/rbd/index.js';
import { nativeSyscallsAvailable } from '../src/io/sys.js';
import { zeroBytes } from '../src/stream/zeros.js';
import { imageName, measureLag, rbdCli, rbdDiff, rbdDuUsed, rbdExportSha256, requireCeph, withOsdPaused, type CephCluster } from './helpers/ceph.js';

const MiB = 1 << 20;
const GiB = 1 << 30;

function source(ceph: CephCluster, over: Partial<RbdPoolSource> = {}): RbdPoolSource {
  return {
    monitors: ceph.monitors,
    pool: ceph.pool,
    auth: { username: ceph.libvirt.user, key: ceph.libvirt.key },
    timeout: 10,
    ...over,
  };
}

/** An image's contents as (offset, bytes) runs; the rest reads as zeros. */
type Layout = Array<{ offset: number; bytes: Buffer }>;

function randomData(n: number): Buffer {
  // random bytes have no all-zero 4 KiB piece (with overwhelming probability)
  return randomBytes(n);
}

/** The layout as chunks over [0, size): holes between, data in pieces of at most `piece` bytes. */
async function* layoutChunks(layout: Layout, size: number, piece = 262_120): AsyncGenerator<Chunk> {
  let pos = 0;
  for (const { offset, bytes } of layout) {
    if (offset > pos) yield { kind: 'hole', length: offset - pos };
    for (let at = 0; at < bytes.length; at += piece) yield { kind: 'data', bytes: bytes.subarray(at, Math.min(bytes.length, at + piece)) };
    pos = offset + bytes.length;
  }
  if (size > pos) yield { kind: 'hole', length: size - pos };
}

/** sha256 of the whole image the layout describes. */
function layoutSha256(layout: Layout, size: number): string {
  const h = createHash('sha256');
  let pos = 0;
  const zeros = (n: number): void => {
    for (let left = n; left > 0; ) {
      const k = Math.min(left, MiB);
      h.update(zeroBytes(k));
      left -= k;
    }
  };
  for (const { offset, bytes } of layout) {
    zeros(offset - pos);
    h.update(bytes);
    pos = offset + bytes.length;
  }
  zeros(size - pos);
  return h.digest('hex');
}

/** Reads the image through rbdReadChunks: sha256 of its contents, data runs, the largest chunk. */
async function readBack(image: RbdImage, opts: Parameters<typeof rbdReadChunks>[1] = {}): Promise<{ sha: string; data: Array<[number, number]>; holes: number; maxChunk: number; total: number }> {
  const h = createHash('sha256');
  const data: Array<[number, number]> = [];
  let pos = opts.offset ?? 0;
  let holes = 0;
  let maxChunk = 0;
  for await (const c of rbdReadChunks(image, opts)) {
    if (c.kind === 'hole') {
      assert.ok(c.length > 0);
      for (let left = c.length; left > 0; ) {
        const k = Math.min(left, MiB);
        h.update(zeroBytes(k));
        left -= k;
      }
      holes++;
      pos += c.length;
    } else {
      assert.ok(c.bytes.length > 0);
      maxChunk = Math.max(maxChunk, c.bytes.length);
      h.update(c.bytes);
      const last = data[data.length - 1];
      if (last && last[1] === pos) last[1] += c.bytes.length;
      else data.push([pos, pos + c.bytes.length]);
      pos += c.bytes.length;
    }
  }
  return { sha: h.digest('hex'), data, holes, maxChunk, total: pos - (opts.offset ?? 0) };
}

async function withPool<T>(ceph: CephCluster, fn: (pool: RbdPool) => Promise<T>, over: Partial<RbdPoolSource> = {}): Promise<T> {
  const pool = await RbdPool.connect(source(ceph, over));
  try {
    return await fn(pool);
  } finally {
    await pool.close();
  }
}

function assertCode(err: unknown, code: string, re?: RegExp): void {
  assert.ok(err instanceof SparsevirtError, `expected a SparsevirtError, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  if (re) assert.match(err.message, re);
}

test('rbd: missing librados/librbd gives ERR_UNSUPPORTED naming the Debian packages; the rest keeps working', async () => {
  setCephLibraryNames({ rados: 'libsparsevirt-no-such-rados.so.2', rbd: 'libsparsevirt-no-such-rbd.so.1' });
  try {
    await assert.rejects(
      RbdPool.connect({ monitors: [{ host: '127.0.0.1', port: 6789 }], pool: 'rbd' }),
      (err: unknown) => {
        assertCode(err, 'ERR_UNSUPPORTED', /librados2/);
        assert.match((err as Error).message, /librbd1/);
        assert.match((err as Error).message, /libsparsevirt-no-such-rados/);
        return true;
      },
    );
  } finally {
    setCephLibraryNames(null);
  }
  // the project's own native bindings are unaffected
  assert.equal(typeof nativeSyscallsAvailable(), 'boolean');
});

test('rbd: pool stats as libvirt computes them; create, list, info, resize, remove', async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  await withPool(ceph, async (pool) => {
    const name = imageName('admin');
    try {
      const stats = await pool.stats();
      const df = JSON.parse(await new Promise<string>((resolve, reject) =>
        execFile('ceph', ['-c', ceph.conf, '--id', 'admin', '--keyring', ceph.admin.keyring, 'df', '--format', 'json'], (err, out) => (err ? reject(err) : resolve(out))),
      )) as { stats: { total_bytes: number } };
      assert.equal(stats.capacity, Number(stats.cluster.kb) * 1024);
      assert.equal(stats.available, Number(stats.cluster.kbAvail) * 1024);
      assert.equal(stats.allocation, Number(stats.pool.numBytes));
      assert.equal(stats.capacity, df.stats.total_bytes);
      assert.ok(stats.available <= stats.capacity);

      await pool.create(name, GiB);
      assert.ok((await pool.list()).includes(name));
      await assert.rejects(pool.create(name, GiB), (err: unknown) => { assertCode(err, 'ERR_EXISTS', /failed to create volume/); return true; });
      await assert.rejects(pool.create(imageName('zero'), 0), (err: unknown) => { assertCode(err, 'ERR_INVALID_ARG', /capacity required/); return true; });

      const info = await pool.info(name);
      assert.equal(info.capacity, GiB);
      assert.equal(info.path, `${ceph.pool}/${name}`);
      assert.equal(info.objectSize, 4 * MiB);
      assert.equal(info.order, 22);
      // libvirt without <refresh>: obj_size × num_objs; with allocation='default' and fast-diff: what exists
      assert.equal(info.allocation, GiB);
      assert.equal((await pool.info(name, { allocationFromDiff: true })).allocation, 0);
      const cli = JSON.parse(await rbdCli(ceph, ['info', '--format', 'json', `${ceph.pool}/${name}`])) as { size: number; features: string[] };
      assert.equal(cli.size, GiB);
      assert.ok(cli.features.includes('layering'));

      await pool.resize(name, 2 * GiB);
      assert.equal((await pool.info(name)).capacity, 2 * GiB);
      await pool.resize(name, 512 * MiB);
      assert.equal((await pool.info(name)).capacity, 512 * MiB);

      assert.equal(await pool.remove(name), true);
      assert.ok(!(await pool.list()).includes(name));
      assert.equal(await pool.remove(name), false);
      await assert.rejects(pool.open(name), (err: unknown) => { assertCode(err, 'ERR_NOT_FOUND', /failed to open the RBD image/); return true; });
    } finally {
      await pool.remove(name).catch(() => undefined);
    }
  });
});

test('rbd: rbdWriteChunks of a 1 GiB image with a few extents matches rbd export and rbd diff; rbdReadChunks reads it back', async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  const size = GiB;
  const layout: Layout = [
    { offset: 0, bytes: randomData(4096) },
    { offset: 10 * MiB, bytes: randomData(MiB) },
    { offset: 100 * MiB + 777, bytes: randomData(3 * MiB + 123) },
    { offset: 512 * MiB, bytes: randomData(8 * MiB) },
    { offset: size - 64 * 1024, bytes: randomData(64 * 1024) },
  ];
  const dataBytes = layout.reduce((n, e) => n + e.bytes.length, 0);
  const expected = layoutSha256(layout, size);
  await withPool(ceph, async (pool) => {
    const name = imageName('big');
    await pool.create(name, size);
    try {
      const image = await pool.open(name);
      try {
        const res = await rbdWriteChunks(image, layoutChunks(layout, size), { zeroed: true, depth: 4 });
        assert.deepEqual(res, { dataBytes, holeBytes: size - dataBytes });
        assert.ok(image.maxInFlight <= 4, `at most 4 operations in flight, saw ${image.maxInFlight}`);
      } finally {
        await image.close();
      }

      assert.equal(await rbdExportSha256(ceph, name), expected);
      // rbd diff: every data extent is reported, and nothing outside the objects written
      const diff = await rbdDiff(ceph, name);
      const objectSize = 4 * MiB;
      const touched = new Set<number>();
      for (const e of layout) for (let o = Math.floor(e.offset / objectSize); o * objectSize < e.offset + e.bytes.length; o++) touched.add(o);
      for (const e of layout) {
        const covered = diff.some((d) => d.exists && d.offset <= e.offset && d.offset + d.length >= e.offset + e.bytes.length) ||
          diff.filter((d) => d.exists && d.offset < e.offset + e.bytes.length && d.offset + d.length > e.offset).reduce((n, d) => n + Math.min(d.offset + d.length, e.offset + e.bytes.length) - Math.max(d.offset, e.offset), 0) === e.bytes.length;
        assert.ok(covered, `extent at ${e.offset} (+${e.bytes.length}) is reported by rbd diff: ${JSON.stringify(diff)}`);
      }
      for (const d of diff) assert.ok(touched.has(Math.floor(d.offset / objectSize)), `rbd diff reports only written objects: ${JSON.stringify(d)}`);
      assert.ok(await rbdDuUsed(ceph, name) <= touched.size * objectSize);

      const image2 = await pool.open(name, { readOnly: true });
      try {
        // as allocated: the data Ceph reports, in chunks of at most 256 KiB
        const plain = await readBack(image2, { depth: 3 });
        assert.equal(plain.sha, expected);
        assert.equal(plain.total, size);
        assert.ok(plain.maxChunk <= 262_120);
        const reported = diff.filter((d) => d.exists).reduce((n, d) => n + d.length, 0);
        assert.equal(plain.data.reduce((n, [a, b]) => n + b - a, 0), reported);
        assert.ok(image2.maxInFlight <= 3, `at most 3 reads in flight, saw ${image2.maxInFlight}`);

        // zero pieces inside reported extents become holes: data is the layout's, widened to 4 KiB pieces
        const tight = await readBack(image2, { detectZeroes: true, chunkSize: 1 << 16, readSize: 2 * MiB, windowSize: 64 * MiB });
        assert.equal(tight.sha, expected);
        assert.ok(tight.maxChunk <= 1 << 16);
        assert.equal(tight.data.length, layout.length);
        for (const [i, [a, b]] of tight.data.entries()) {
          const e = layout[i]!;
          assert.equal(a, Math.floor(e.offset / 4096) * 4096, `data run ${i} starts at its 4 KiB piece`);
          assert.ok(b >= e.offset + e.bytes.length && b <= Math.ceil((e.offset + e.bytes.length) / 4096) * 4096, `data run ${i} ends within its last piece`);
        }

        // a window of the image, holes as zero data
        const part = await readBack(image2, { offset: 100 * MiB, length: 8 * MiB, sparse: false });
        const h = createHash('sha256');
        const want = Buffer.alloc(8 * MiB);
        layout[2]!.bytes.copy(want, 777);
        h.update(want);
        assert.equal(part.sha, h.digest('hex'));
        assert.equal(part.holes, 0);
      } finally {
        await image2.close();
      }
    } finally {
      await pool.remove(name);
    }
  });
});

test('rbd: holes written over old data read as zeros and free their objects', async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  const size = 64 * MiB;
  const K = 1024;
  // aligned and unaligned holes, within and across objects (4 MiB), discard granularity 64 KiB
  const layout: Layout = [
    { offset: 0, bytes: randomData(MiB) },
    // hole [1M, 20M+100): unaligned end -> write-zeroes
    { offset: 20 * MiB + 100, bytes: randomData(4096) },
    // hole [20M+4196, 32M+64K): unaligned start
    { offset: 32 * MiB + 64 * K, bytes: randomData(64 * K) },
    // hole [32M+128K, 32M+256K): aligned, inside an object -> discard
    { offset: 32 * MiB + 256 * K, bytes: randomData(MiB - 256 * K) },
    // hole [33M, 64M): aligned -> discard
  ];
  await withPool(ceph, async (pool) => {
    assert.equal(pool.discardGranularity, 64 * K);
    const name = imageName('holes');
    await pool.create(name, size);
    try {
      const image = await pool.open(name);
      try {
        const old = Buffer.alloc(size, 0xab);
        await rbdWriteChunks(image, layoutChunks([{ offset: 0, bytes: old }], size, 4 * MiB), { zeroed: true });
        assert.equal(await rbdDuUsed(ceph, name), size);
        const res = await rbdWriteChunks(image, layoutChunks(layout, size));
        assert.equal(res.dataBytes + res.holeBytes, size);
        const back = await readBack(image);
        assert.equal(back.sha, layoutSha256(layout, size));
      } finally {
        await image.close();
      }
      assert.equal(await rbdExportSha256(ceph, name), layoutSha256(layout, size));
      // objects 0, 5 and 8 hold data; every other one was covered by a hole and is gone
      assert.ok(await rbdDuUsed(ceph, name) <= 3 * 4 * MiB, `rbd du: ${await rbdDuUsed(ceph, name)}`);
    } finally {
      await pool.remove(name);
    }
  });
});

test('rbd: scattered 4 KiB writes keep hundreds of requests in flight; holes count the objects they span', async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  await withPool(ceph, async (pool) => {
    // 4,000 pieces of 4 KiB, one every 64 KiB: each its own write (an OSD round trip)
    const size = 256 * MiB;
    const layout: Layout = [];
    for (let i = 0; i < 4000; i++) layout.push({ offset: i * 64 * 1024 + 8192, bytes: randomData(4096) });
    const name = imageName('scatter');
    await pool.create(name, size);
    try {
      const image = await pool.open(name);
      try {
        await rbdWriteChunks(image, layoutChunks(layout, size), { zeroed: true });
        // (with 32 in flight, as reads have, such an upload left a third of the machine idle)
        assert.ok(image.maxInFlight > 64 && image.maxInFlight <= 512, `writes in flight: ${image.maxInFlight}`);
      } finally {
        await image.close();
      }
      assert.equal(await rbdExportSha256(ceph, name), layoutSha256(layout, size));
    } finally {
      await pool.remove(name);
    }

    // a 4 GiB hole over data: 16 discards of 64 objects each, at most 512 objects' requests in
    // flight, so at most 8 discards at once
    const big = 4 * GiB;
    const name2 = imageName('bighole');
    await pool.create(name2, big);
    try {
      const spots: Layout = [0, 1, 2, 3].map((i) => ({ offset: i * GiB + 5 * MiB, bytes: randomData(MiB) }));
      const image = await pool.open(name2);
      try {
        await rbdWriteChunks(image, layoutChunks(spots, big), { zeroed: true });
      } finally {
        await image.close();
      }
      const image2 = await pool.open(name2);
      try {
        const res = await rbdWriteChunks(image2, (async function* (): AsyncGenerator<Chunk> {
          yield { kind: 'hole', length: big };
        })());
        assert.equal(res.holeBytes, big);
        assert.ok(image2.maxInFlight >= 2 && image2.maxInFlight <= 8, `discards in flight: ${image2.maxInFlight}`);
      } finally {
        await image2.close();
      }
      assert.deepEqual((await rbdDiff(ceph, name2)).filter((d) => d.exists), [], 'the hole freed every object');
    } finally {
      await pool.remove(name2);
    }
  });
});

test('rbd: writes past the end of the image are refused before anything is written', async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  await withPool(ceph, async (pool) => {
    const name = imageName('end');
    await pool.create(name, 8 * MiB);
    try {
      const image = await pool.open(name);
      try {
        let closed = false;
        async function* src(): AsyncGenerator<Chunk> {
          try {
            yield { kind: 'hole', length: 8 * MiB - 4096 };
            yield { kind: 'data', bytes: randomData(8192) };
          } finally {
            closed = true;
          }
        }
        await assert.rejects(rbdWriteChunks(image, src()), (err: unknown) => { assertCode(err, 'ERR_INVALID_ARG', /past the end/); return true; });
        assert.ok(closed, 'the source is closed');
        await assert.rejects(image.write(8 * MiB - 10, Buffer.alloc(20)), (err: unknown) => { assertCode(err, 'ERR_INVALID_ARG'); return true; });
      } finally {
        await image.close();
      }
      assert.deepEqual((await rbdDiff(ceph, name)).filter((d) => d.exists), []);
    } finally {
      await pool.remove(name);
    }
  });
});

test('rbd: clone as libvirt does (snapshot, protect, clone2), reads through to the parent; copy', async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  const size = 32 * MiB;
  const layout: Layout = [{ offset: 5 * MiB, bytes: randomData(2 * MiB) }];
  await withPool(ceph, async (pool) => {
    const parent = imageName('parent');
    const c1 = imageName('clone1');
    const c2 = imageName('clone2');
    const cp = imageName('copy');
    await pool.create(parent, size);
    try {
      const image = await pool.open(parent);
      try {
        await rbdWriteChunks(image, layoutChunks(layout, size), { zeroed: true });
      } finally {
        await image.close();
      }
      const snap = await pool.clone(parent, c1);
      assert.match(snap, /^libvirt-\d+$/);
      // unchanged since: the same snapshot serves the next clone
      assert.equal(await pool.clone(parent, c2), snap);
      const clone = await pool.open(c1, { readOnly: true });
      try {
        const back = await readBack(clone, { detectZeroes: true });
        assert.equal(back.sha, layoutSha256(layout, size));
        assert.deepEqual(back.data, [[5 * MiB, 7 * MiB]]);
      } finally {
        await clone.close();
      }
      const cli = JSON.parse(await rbdCli(ceph, ['info', '--format', 'json', `${ceph.pool}/${c1}`])) as { parent?: { image: string; snapshot: string } };
      assert.equal(cli.parent?.image, parent);
      assert.equal(cli.parent?.snapshot, snap);

      await pool.copy(parent, cp);
      assert.equal(await rbdExportSha256(ceph, cp), layoutSha256(layout, size));
      assert.ok(await rbdDuUsed(ceph, cp) <= 4 * MiB * 2, 'the copy allocates only the objects with data');
    } finally {
      await pool.remove(c1).catch(() => undefined);
      await pool.remove(c2).catch(() => undefined);
      await pool.remove(cp).catch(() => undefined);
      await pool.remove(parent, { withSnapshots: true });
    }
  });
});

test('rbd: wrong key, unknown user, missing pool, unreachable monitors fail clearly within bounded time; the event loop stays responsive', async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  // the same key with its secret altered: well-formed, wrong
  const raw = Buffer.from(ceph.libvirt.key, 'base64');
  raw[raw.length - 1]! ^= 0xff;
  raw[raw.length - 2]! ^= 0xff;
  const cases: Array<{ what: string; over: Partial<RbdPoolSource>; code: string; re: RegExp; maxMs: number }> = [
    { what: 'wrong key', over: { auth: { username: ceph.libvirt.user, key: raw.toString('base64') } }, code: 'ERR_ACCESS_DENIED', re: /refused cephx authentication as client\.libvirt/, maxMs: 5_000 },
    { what: 'unknown user', over: { auth: { username: 'svtest-nobody', key: ceph.libvirt.key } }, code: 'ERR_ACCESS_DENIED', re: /client\.svtest-nobody/, maxMs: 5_000 },
    { what: 'missing pool', over: { pool: 'svtest-no-such-pool' }, code: 'ERR_NOT_FOUND', re: /Ceph pool 'svtest-no-such-pool' does not exist/, maxMs: 5_000 },
    { what: 'unreachable monitor', over: { monitors: [{ host: '127.0.0.1', port: 1 }], timeout: 3 }, code: 'ERR_TIMEOUT', re: /127\.0\.0\.1:1: no monitor answered within 3 s/, maxMs: 3_000 + 4_000 },
  ];
  for (const c of cases) {
    const r = await measureLag(() => RbdPool.connect(source(ceph, c.over)));
    assert.ok(r.error, `${c.what}: the connect fails`);
    assertCode(r.error, c.code, c.re);
    assert.ok(r.ms < c.maxMs, `${c.what}: failed after ${Math.round(r.ms)} ms (bound ${c.maxMs})`);
    assert.ok(r.maxLagMs < 250, `${c.what}: timer lag ${Math.round(r.maxLagMs)} ms during the connect`);
    t.diagnostic(`${c.what}: ${(r.error as Error).message} (${Math.round(r.ms)} ms, lag ${Math.round(r.maxLagMs)} ms)`);
  }
  // a bad option is refused up front
  await assert.rejects(RbdPool.connect(source(ceph, { configOpts: [['svtest_no_such_option', '1']] })), (err: unknown) => { assertCode(err, 'ERR_INVALID_ARG', /svtest_no_such_option/); return true; });
  // and the good settings still connect
  await withPool(ceph, async (pool) => assert.ok(Array.isArray(await pool.list())));
});

test('rbd: an OSD that stops answering fails writes and reads within the timeout; the event loop stays responsive', async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  await withPool(ceph, async (pool) => {
    const name = imageName('osd');
    await pool.create(name, 64 * MiB);
    try {
      const image = await pool.open(name);
      try {
        // the first write takes the image's exclusive lock while the OSD answers
        await rbdWriteChunks(image, layoutChunks([{ offset: 0, bytes: randomData(MiB) }], 8 * MiB));
        await withOsdPaused(ceph, async () => {
          const w = await measureLag(() => rbdWriteChunks(image, layoutChunks([{ offset: 8 * MiB, bytes: randomData(4 * MiB) }], 16 * MiB), { offset: 0 }));
          assert.ok(w.error, 'the write fails');
          assert.ok(w.error instanceof SparsevirtError && (w.error.code === 'ERR_TIMEOUT' || w.error.code === 'ERR_IO'), String(w.error));
          assert.match((w.error as Error).message, /timed out|no completion|within/i);
          assert.ok(w.ms < 3_000 + 8_000, `write failed after ${Math.round(w.ms)} ms`);
          assert.ok(w.maxLagMs < 250, `timer lag ${Math.round(w.maxLagMs)} ms`);
          t.diagnostic(`write: ${(w.error as Error).message} (${Math.round(w.ms)} ms, lag ${Math.round(w.maxLagMs)} ms)`);

          const r = await measureLag(async () => {
            for await (const c of rbdReadChunks(image)) void c;
          });
          assert.ok(r.error, 'the read fails');
          assert.ok(r.error instanceof SparsevirtError && (r.error.code === 'ERR_TIMEOUT' || r.error.code === 'ERR_IO'), String(r.error));
          assert.ok(r.ms < 3_000 + 8_000, `read failed after ${Math.round(r.ms)} ms`);
          assert.ok(r.maxLagMs < 250, `timer lag ${Math.round(r.maxLagMs)} ms`);
          t.diagnostic(`read: ${(r.error as Error).message} (${Math.round(r.ms)} ms, lag ${Math.round(r.maxLagMs)} ms)`);
        });
      } finally {
        await image.close();
      }
    } finally {
      await pool.remove(name);
    }
  }, { timeout: 3 });
});

test('rbd: a process whose only pending work is aio completions waits for them (koffi does not keep the loop alive; the deadlines do)', async (t) => {
  const ceph = await requireCeph(t);
  if (!ceph) return;
  const name = imageName('alive');
  const mod = new URL('../src/daemon/rbd/index.js', import.meta.url).href;
  const script = `
    import { RbdPool } from ${JSON.stringify(mod)};
    const s = JSON.parse(process.env.SV_SOURCE);
    const pool = await RbdPool.connect(s);
    await pool.create(process.env.SV_IMAGE, 8 << 20);
    const image = await pool.open(process.env.SV_IMAGE);
    await image.write(0, Buffer.alloc(1 << 20, 1));
    const back = Buffer.alloc(1 << 20);
    await image.read(0, back);
    await image.flush();
    await image.close();
    await pool.remove(process.env.SV_IMAGE);
    await pool.close();
    console.log('done', back[0], back[back.length - 1]);
  `;
  const r = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    execFile(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, SV_SOURCE: JSON.stringify(source(ceph)), SV_IMAGE: name }, timeout: 60_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr }),
    );
  });
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), 'done 1 1');
});
