/**
 * copyVolume: sparsevirtd → sparsevirtd and libvirtd → sparsevirtd, straight through; content and
 * hole maps identical, the digest verified; a range; a mismatch named by its 1 MiB block; a
 * destination killed mid-copy fails the copy with its side named, and the source's stream ends.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { connect, type Connection, type StoragePool } from '../src/index.js';
import { compareVolumes, copyVolume } from '../src/client/copy.js';
import { digestWorkers } from '../src/digest-workers.js';
import { LEGACY_PAYLOAD_MAX } from '../src/chunk.js';
import { bufferStats } from '../src/io/pools.js';
import { startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { createVolume, requireLibvirt, withScratchPool } from './helpers/libvirt.js';
import { extentMap, fileContentDigest, makeImage, scratchDir, sha256File, type Layout } from './helpers/images.js';

const MiB = 1 << 20;
const LAYOUT: Layout = [
  { kind: 'hole', length: 3 * MiB },
  { kind: 'data', length: 5 * MiB + 4096 },
  { kind: 'hole', length: 40 * MiB },
  { kind: 'data', length: 12 * MiB },
  { kind: 'hole', length: 196 * MiB - 4096 },
];
const SIZE = 256 * MiB;

interface Side {
  d: TestDaemon;
  conn: Connection;
  pool: StoragePool;
  poolDir: string;
}

async function side(dir: string, name: string): Promise<Side> {
  const d = await startTestDaemon({ dir: path.join(dir, name) });
  const conn = await connect(d.uri);
  const poolDir = path.join(dir, name, 'pool');
  const pool = await conn.storagePoolDefineDir(name, poolDir);
  await pool.build();
  await pool.create();
  return { d, conn, pool, poolDir };
}

async function closeSide(s: Side): Promise<void> {
  await s.conn.close().catch(() => undefined);
  await s.d.stop();
}

/** Two sparsevirtds (a and b), each with a dir pool on tmpfs, for the length of `body`. */
async function withTwoSides(body: (a: Side, b: Side) => Promise<void>): Promise<void> {
  const dir = await scratchDir('/dev/shm', 'svd-copy-');
  fs.mkdirSync(path.join(dir, 'a'));
  fs.mkdirSync(path.join(dir, 'b'));
  const a = await side(dir, 'a');
  const b = await side(dir, 'b');
  try {
    await body(a, b);
  } finally {
    await closeSide(a);
    await closeSide(b);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('sparsevirtd → sparsevirtd: identical bytes and holes, the digest verified, a range too', { timeout: 120_000 }, async () => {
  await withTwoSides(async (a, b) => {
    const srcFile = path.join(a.poolDir, 'disk.img');
    await makeImage(srcFile, LAYOUT);
    await a.pool.refresh();
    const src = await a.pool.volLookupByName('disk.img');
    const dst = await b.pool.createVol({ name: 'disk.img', capacity: SIZE, allocation: 0, format: 'raw' });
    const seen: number[] = [];
    const tasks = () => [digestWorkers().tasks, digestWorkers({ background: true }).tasks];
    const [fg0, bg0] = tasks();
    const r = await copyVolume(src, dst, { sparse: true, verify: true, onProgress: (p) => seen.push(p.dataBytes + p.holeBytes) });
    // (both daemons run in this process) the two digests, asked after the copy, ran on the
    // digest workers, not on the background ones
    const [fg1, bg1] = tasks();
    assert.ok(bg1 === bg0 && fg1 >= fg0 + 2, `digest tasks: background ${bg0} → ${bg1}, foreground ${fg0} → ${fg1}`);
    const dstFile = path.join(b.poolDir, 'disk.img');
    assert.equal(await sha256File(dstFile), await sha256File(srcFile));
    assert.deepEqual(await extentMap(dstFile), await extentMap(srcFile));
    assert.equal(r.dataBytes, 17 * MiB + 4096);
    assert.equal(r.holeBytes, SIZE - r.dataBytes);
    assert.equal(r.digest, fileContentDigest(srcFile, 0, SIZE));
    assert.ok(seen.length > 1 && seen.at(-1) === SIZE, 'progress went up to the whole size');

    // the daemon's own digest, without reading holes, equals the definition's
    assert.equal(await src.contentDigestOffered(), true);
    assert.equal(await src.contentDigest(0, SIZE), fileContentDigest(srcFile, 0, SIZE));
    assert.equal(tasks()[1], bg1, 'a digest asked with no transfer running is not a background one');
    // asked beside a transfer of its connection, the daemon digests on the background workers
    const busy = await src.download({ offset: 0, length: SIZE, sparse: true });
    assert.equal(await src.contentDigest(0, SIZE), fileContentDigest(srcFile, 0, SIZE));
    assert.ok(tasks()[1] > bg1, 'background digest tasks beside a download');
    await busy.abort(new Error('enough')).catch(() => undefined);
    assert.equal(await src.contentDigest(3 * MiB + 5, 47 * MiB), fileContentDigest(srcFile, 3 * MiB + 5, 47 * MiB));
    await assert.rejects(src.contentDigest(SIZE - 10, 11), /runs past the end/);

    // a range: only it is written
    const part = await b.pool.createVol({ name: 'part.img', capacity: SIZE, allocation: 0, format: 'raw' });
    const r2 = await copyVolume(src, part, { sparse: true, verify: true, offset: 4 * MiB, length: 50 * MiB });
    const partFile = path.join(b.poolDir, 'part.img');
    assert.equal(r2.dataBytes + r2.holeBytes, 50 * MiB);
    const got = fs.readFileSync(partFile);
    const want = fs.readFileSync(srcFile);
    assert.ok(got.subarray(4 * MiB, 54 * MiB).equals(want.subarray(4 * MiB, 54 * MiB)));
    assert.ok(got.subarray(0, 4 * MiB).every((x) => x === 0) && got.subarray(54 * MiB).every((x) => x === 0));
    assert.equal(r2.digest, fileContentDigest(srcFile, 4 * MiB, 50 * MiB));

    // plain (non-sparse): same bytes
    const plain = await b.pool.createVol({ name: 'plain.img', capacity: SIZE, allocation: 0, format: 'raw' });
    await copyVolume(src, plain, { sparse: false });
    assert.equal(await sha256File(path.join(b.poolDir, 'plain.img')), await sha256File(srcFile));
  });
});

test('a dense copy reads the source\'s packets into the frame buffers the destination\'s wire gave back: a few dozen, not one per packet', { timeout: 120_000 }, async () => {
  await withTwoSides(async (a, b) => {
    const size = 96 * MiB;
    const srcFile = path.join(a.poolDir, 'dense.img');
    await makeImage(srcFile, [{ kind: 'data', length: size }], 17);
    await a.pool.refresh();
    const src = await a.pool.volLookupByName('dense.img');
    const dst = await b.pool.createVol({ name: 'dense.img', capacity: size, allocation: 0, format: 'raw' });
    const before = bufferStats.frameBuffers;
    const r = await copyVolume(src, dst, { sparse: true });
    // both daemons run in this process: the count takes this client's buffers and the destination
    // daemon's (its writer gives each back once written)
    const fresh = bufferStats.frameBuffers - before;
    const packets = Math.ceil(size / LEGACY_PAYLOAD_MAX);
    assert.equal(r.dataBytes, size);
    assert.equal(await sha256File(path.join(b.poolDir, 'dense.img')), await sha256File(srcFile));
    assert.ok(fresh < packets / 3, `${fresh} frame buffers allocated for ${packets} packets`);
  });
});

test('compareVolumes names the first differing 1 MiB block', { timeout: 60_000 }, async () => {
  const dir = await scratchDir('/dev/shm', 'svd-copy-cmp-');
  fs.mkdirSync(path.join(dir, 'a'));
  const a = await side(dir, 'a');
  try {
    const one = path.join(a.poolDir, 'one.img');
    await makeImage(one, LAYOUT);
    fs.copyFileSync(one, path.join(a.poolDir, 'two.img'));
    const fd = fs.openSync(path.join(a.poolDir, 'two.img'), 'r+');
    fs.writeSync(fd, Buffer.from([0x5a]), 0, 1, 45 * MiB + 77); // in a hole of the source
    fs.writeSync(fd, Buffer.from([0x5b]), 0, 1, 50 * MiB + 1); // and later, in data
    fs.closeSync(fd);
    await a.pool.refresh();
    const v1 = await a.pool.volLookupByName('one.img');
    const v2 = await a.pool.volLookupByName('two.img');
    await assert.rejects(compareVolumes(v1, v2, { offset: 0, length: SIZE }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'ERR_VERIFY_MISMATCH');
      assert.match(err.message, new RegExp(`1 MiB block at byte ${45 * MiB}\\b`));
      return true;
    });
    assert.equal(await compareVolumes(v1, v2, { offset: 0, length: 45 * MiB }), fileContentDigest(one, 0, 45 * MiB));
  } finally {
    await closeSide(a);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('libvirtd → sparsevirtd: identical bytes and holes, verified', { timeout: 120_000 }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  const dir = await scratchDir('/dev/shm', 'svd-copy-lv-');
  fs.mkdirSync(path.join(dir, 'b'));
  const b = await side(dir, 'b');
  try {
    await withScratchPool('copy', async (sp) => {
      const srcFile = await createVolume(sp, 'disk.img', SIZE);
      await makeImage(path.join(dir, 'src.img'), LAYOUT);
      // fill the libvirtd volume's file in place (same size, same holes)
      fs.copyFileSync(path.join(dir, 'src.img'), srcFile);
      const lv = await connect(sp.uri);
      try {
        const src = await (await lv.storagePoolLookupByName(sp.name)).volLookupByName('disk.img');
        const dst = await b.pool.createVol({ name: 'disk.img', capacity: SIZE, allocation: 0, format: 'raw' });
        assert.equal(await src.contentDigestOffered(), false, 'libvirtd does not offer content digests');
        assert.equal(await src.contentDigest(0, SIZE), null);
        const r = await copyVolume(src, dst, { sparse: true, verify: true });
        const dstFile = path.join(b.poolDir, 'disk.img');
        assert.equal(await sha256File(dstFile), await sha256File(srcFile));
        assert.deepEqual(await extentMap(dstFile), await extentMap(srcFile));
        assert.equal(r.digest, fileContentDigest(srcFile, 0, SIZE));
      } finally {
        await lv.close();
      }
    });
  } finally {
    await closeSide(b);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the destination killed mid-copy: the copy fails at once naming the destination, and the source stream ends', { timeout: 60_000 }, async () => {
  const dir = await scratchDir('/dev/shm', 'svd-copy-kill-');
  fs.mkdirSync(path.join(dir, 'a'));
  const a = await side(dir, 'a');
  const sock = path.join(dir, 'b.sock');
  const child = spawn(process.execPath, [path.resolve('dist/bin/sparsevirtd.mjs'), '--listen', `unix:${sock}`, '--state-dir', path.join(dir, 'b-state')], { stdio: 'ignore' });
  try {
    for (let i = 0; i < 200 && !fs.existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
    const bc = await connect(`sparsevirt+unix:///system?socket=${sock}`);
    const bPool = await bc.storagePoolDefineDir('b', path.join(dir, 'b-pool'));
    await bPool.build();
    await bPool.create();
    const srcFile = path.join(a.poolDir, 'big.img');
    await makeImage(srcFile, [{ kind: 'data', length: 256 * MiB }]);
    await a.pool.refresh();
    const src = await a.pool.volLookupByName('big.img');
    const dst = await bPool.createVol({ name: 'big.img', capacity: 256 * MiB, allocation: 0, format: 'raw' });
    let killed = false;
    const t0 = Date.now();
    await assert.rejects(copyVolume(src, dst, {
      sparse: true,
      onProgress: (p) => {
        if (!killed && p.dataBytes > 16 * MiB) {
          killed = true;
          child.kill('SIGKILL');
        }
      },
    }), (err: Error & { code?: string }) => {
      assert.match(err.message, /^destination: /);
      return true;
    });
    assert.ok(killed);
    assert.ok(Date.now() - t0 < 20_000, 'no hang');
    // the source daemon saw its download end early (aborted), and it goes on serving
    const until = Date.now() + 5000;
    while (!a.d.logs.some((l) => /"msg":"download (aborted|failed|ended)/.test(l) && l.includes('big.img')) && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    assert.ok(a.d.logs.some((l) => /"msg":"download (aborted|failed|ended)/.test(l) && l.includes('big.img')), a.d.logs.filter((l) => l.includes('download')).join('\n'));
    assert.equal((await src.info()).capacity, 256 * MiB);
  } finally {
    child.kill('SIGKILL');
    await closeSide(a);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
