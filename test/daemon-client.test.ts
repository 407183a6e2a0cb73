/**
 * sparsevirtd in-process, driven by our own client library: pools, volumes, sparse and plain
 * transfers (bytes, extent maps, allocation), read-only connections, many clients at once,
 * unix/tcp/tls transports and persistence across a restart.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { connect, type Connection, type StoragePool } from '../src/client/index.js';
import { RemoteError } from '../src/errors.js';
import { PoolState } from '../src/protocol/remote.js';
import { startDaemon } from '../src/daemon/index.js';
import { fileChunks } from '../src/sparse/index.js';
import { startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import {
  CAPTURE_LAYOUT, allocatedBytes, layoutOf, makeFilledFile, makeImage, readRange, scratchDir, sha256File, type Layout,
} from './helpers/images.js';
import { run } from './helpers/run.js';

const MiB = 1 << 20;

async function rejectsWith(p: Promise<unknown>, code: number, domain: number, message?: RegExp | string): Promise<RemoteError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof RemoteError, `expected a RemoteError, got ${(err as Error).stack}`);
    assert.equal(err.virCode, code, `code of: ${err.message}`);
    assert.equal(err.domain, domain, `domain of: ${err.message}`);
    if (typeof message === 'string') assert.equal(err.message, message);
    else if (message) assert.match(err.message, message);
    return err;
  }
  assert.fail('expected a rejection');
}

/** Allocation of a file that holds `dataBytes` of data: within a few filesystem blocks of it. */
async function assertAllocationNear(file: string, dataBytes: number): Promise<void> {
  const alloc = await allocatedBytes(file);
  assert.ok(alloc >= dataBytes && alloc <= dataBytes + 64 * 1024, `${file}: allocated ${alloc}, expected about ${dataBytes}`);
}

function dataOf(layout: Layout): number {
  return layout.filter((e) => e.kind === 'data').reduce((n, e) => n + e.length, 0);
}

async function definePool(conn: Connection, name: string, dir: string): Promise<StoragePool> {
  const pool = await conn.storagePoolDefineDir(name, dir);
  await pool.build();
  await pool.create();
  return pool;
}

describe('sparsevirtd with the sparsevirt client (unix socket)', () => {
  let d: TestDaemon;
  let conn: Connection;
  let pool: StoragePool;
  let poolDir: string;
  let work: string;

  before(async () => {
    d = await startTestDaemon();
    work = path.join(d.dir, 'work');
    await fsp.mkdir(work);
    poolDir = path.join(d.dir, 'pools', 'main');
    conn = await connect(d.uri);
    pool = await definePool(conn, 'main', poolDir);
  });
  after(async () => {
    await conn?.close();
    await d?.stop();
  });

  test('handshake answers: uri, type, versions, hostname', async () => {
    assert.equal(await conn.getUri(), 'sparsevirt:///system');
    assert.equal(await conn.getType(), 'sparsevirt');
    assert.equal(await conn.getLibVersion(), 9000000);
    assert.equal(await conn.getVersion(), 1000); // 0.1.0
    assert.ok((await conn.getHostname()).length > 0);
  });

  test('pool lifecycle: define, build, start, info, xml, autostart, refresh, destroy, undefine', async () => {
    const dir = path.join(d.dir, 'pools', 'p1', 'nested');
    const p = await conn.storagePoolDefineDir('p1', dir);
    assert.equal(p.name, 'p1');
    assert.match(p.uuidString, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    assert.equal(await p.isActive(), false);
    assert.equal(await p.isPersistent(), true);
    assert.deepEqual(await p.info(), { state: PoolState.INACTIVE, capacity: 0, allocation: 0, available: 0 });
    // inactive and never refreshed: no <permissions>, zero sizes (as libvirt)
    assert.equal(await p.xmlDesc(), `<pool type='dir'>\n  <name>p1</name>\n  <uuid>${p.uuidString}</uuid>\n  <capacity unit='bytes'>0</capacity>\n  <allocation unit='bytes'>0</allocation>\n  <available unit='bytes'>0</available>\n  <source>\n  </source>\n  <target>\n    <path>${dir}</path>\n  </target>\n</pool>\n`);
    // (libvirt reports this one from its file utilities: domain 0, as libvirtd 9.0 sends it)
    await rejectsWith(p.create(), 38, 0, `cannot open directory '${dir}': No such file or directory`);
    await p.build();
    assert.equal(fs.statSync(dir).mode & 0o777, 0o711);
    await p.create();
    await rejectsWith(p.create(), 55, 18, "Requested operation is not valid: storage pool 'p1' is already active");
    await rejectsWith(p.undefine(), 55, 18, "Requested operation is not valid: storage pool 'p1' is still active");
    const info = await p.info();
    assert.equal(info.state, PoolState.RUNNING);
    assert.ok(info.capacity > 0 && info.available > 0 && info.allocation === info.capacity - info.available);
    const xml = await p.xmlDesc();
    assert.match(xml, new RegExp(`^<pool type='dir'>\\n  <name>p1</name>\\n  <uuid>${p.uuidString}</uuid>\\n  <capacity unit='bytes'>\\d+</capacity>\\n  <allocation unit='bytes'>\\d+</allocation>\\n  <available unit='bytes'>\\d+</available>\\n  <source>\\n  </source>\\n  <target>\\n    <path>${dir}</path>\\n    <permissions>\\n      <mode>0711</mode>\\n      <owner>${process.getuid!()}</owner>\\n      <group>${process.getgid!()}</group>\\n    </permissions>\\n  </target>\\n</pool>\\n$`));
    assert.equal(await p.autostart(), false);
    await p.setAutostart(true);
    assert.equal(await p.autostart(), true);
    await p.refresh();
    const names = async (flags: number) => (await conn.listAllStoragePools(flags)).map((x) => x.name);
    assert.deepEqual(await names(0), ['main', 'p1']);
    assert.deepEqual(await names(16), ['p1']); // AUTOSTART
    assert.deepEqual(await names(32), ['main']); // NO_AUTOSTART
    assert.deepEqual(await names(64), ['main', 'p1']); // DIR
    assert.deepEqual(await names(128), []); // FS
    await p.destroy();
    await rejectsWith(p.destroy(), 55, 18, "Requested operation is not valid: storage pool 'p1' is not active");
    assert.deepEqual(await names(1), ['p1']); // INACTIVE
    assert.deepEqual(await names(2), ['main']); // ACTIVE
    assert.equal((await p.info()).state, PoolState.INACTIVE);
    await p.undefine();
    await rejectsWith(conn.storagePoolLookupByName('p1'), 49, 18, "Storage pool not found: no storage pool with matching name 'p1'");
    assert.ok(fs.existsSync(dir), 'undefine leaves the directory');
  });

  test('pool define errors: duplicates, conflicts, bad XML, non-dir types', async () => {
    await rejectsWith(conn.storagePoolDefineDir('main', '/somewhere/else'), 9, 18, /^operation failed: pool 'main' already exists with uuid [0-9a-f-]{36}$/);
    await rejectsWith(conn.storagePoolDefineDir('other', poolDir), 9, 18, "operation failed: Storage source conflict with pool: 'main'");
    await rejectsWith(conn.storagePoolDefineDir('a/b', '/x'), 27, 18, "XML error: name a/b cannot contain '/'");
    await rejectsWith(conn.storagePoolDefineXML('<pool type="dir"><name>x</name>'), 35, 18, /storage_pool_definition/);
    await rejectsWith(conn.storagePoolDefineXML("<pool><name>x</name><target><path>/x</path></target></pool>"), 27, 5, "XML error: Missing required attribute 'type' in element 'pool'");
    await rejectsWith(conn.storagePoolDefineXML("<pool type='logical'><name>x</name><target><path>/x</path></target></pool>"), 67, 18, /only 'dir'/);
    await rejectsWith(conn.storagePoolDefineXML("<pool type='dir'><name>x</name></pool>"), 27, 18, 'XML error: missing storage pool target path');
    await rejectsWith(conn.storagePoolDefineXML('<!DOCTYPE x [<!ENTITY a "b">]><pool/>'), 35, 18, /DOCTYPE/);
  });

  test('volume lifecycle: create, list, info, xml, lookups, resize, wipe, delete', async () => {
    const sparse = await pool.createVol({ name: 'v-sparse.img', capacity: 4 * MiB, allocation: 0, format: 'raw' });
    const noAlloc = await pool.createVol({ name: 'v-noalloc.img', capacity: 2 * MiB });
    const alloc = await pool.createVol({ name: 'v-alloc.img', capacity: 2 * MiB, allocation: MiB });
    const p = path.join(poolDir, 'v-sparse.img');
    assert.equal(sparse.key, p);
    assert.equal(await sparse.path(), p);
    assert.equal(fs.statSync(p).mode & 0o777, 0o600);
    assert.deepEqual(await sparse.info(), { type: 0, capacity: 4 * MiB, allocation: 0 });
    assert.equal(await allocatedBytes(path.join(poolDir, 'v-noalloc.img')), 0, 'no <allocation>: kept sparse');
    assert.ok((await alloc.info()).allocation >= MiB, 'allocation 1M is allocated');
    assert.deepEqual(await sparse.infoFlags(1), { type: 0, capacity: 4 * MiB, allocation: 4 * MiB });
    const names = (await pool.listAllVolumes()).map((v) => v.name);
    assert.deepEqual(names, ['v-alloc.img', 'v-noalloc.img', 'v-sparse.img']);
    const xml = await sparse.xmlDesc();
    assert.match(xml, new RegExp(`^<volume type='file'>\\n  <name>v-sparse.img</name>\\n  <key>${p}</key>\\n  <capacity unit='bytes'>4194304</capacity>\\n  <allocation unit='bytes'>0</allocation>\\n  <physical unit='bytes'>4194304</physical>\\n  <target>\\n    <path>${p}</path>\\n    <format type='raw'/>\\n    <permissions>\\n      <mode>0600</mode>\\n      <owner>\\d+</owner>\\n      <group>\\d+</group>\\n    </permissions>\\n    <timestamps>\\n      <atime>\\d+(\\.\\d{9})?</atime>\\n      <mtime>\\d+(\\.\\d{9})?</mtime>\\n      <ctime>\\d+(\\.\\d{9})?</ctime>\\n      <btime>0</btime>\\n    </timestamps>\\n  </target>\\n</volume>\\n$`));
    assert.equal((await conn.storageVolLookupByKey(p)).name, 'v-sparse.img');
    assert.equal((await conn.storageVolLookupByPath(`${poolDir}//v-sparse.img`)).name, 'v-sparse.img');
    assert.equal((await sparse.lookupPool()).name, 'main');
    await rejectsWith(pool.volLookupByName('nope.img'), 50, 18, "Storage volume not found: no storage vol with matching name 'nope.img'");
    await rejectsWith(conn.storageVolLookupByKey('nope.img'), 50, 18, 'Storage volume not found: no storage vol with matching key nope.img');
    await rejectsWith(conn.storageVolLookupByPath('/nope/x'), 50, 18, "Storage volume not found: no storage vol with matching path '/nope/x'");
    await rejectsWith(pool.createVol({ name: 'v-sparse.img', capacity: 1 }), 90, 18, "storage volume 'v-sparse.img' exists already");
    await rejectsWith(pool.createVolXML('<volume><name>q</name><capacity>1</capacity><target><format type="dmg"/></target></volume>'), 67, 18, /format 'dmg' is not supported for creation/);
    await rejectsWith(pool.createVolXML('<volume><name>q</name></volume>'), 27, 18, 'XML error: missing capacity element');
    await rejectsWith(pool.createVolXML('<volume><name>q</name><capacity>1</capacity></volume>', 8), 8, 18, 'unsupported flags (0x8) in function storageVolCreateXML');
    // units
    const units = await pool.createVolXML("<volume><name>u.img</name><capacity unit='KiB'>3</capacity><allocation unit='bytes'>0</allocation></volume>");
    assert.equal((await units.info()).capacity, 3072);
    await units.delete();

    // resize: grow, shrink needs the flag, delta, allocate
    await sparse.resize(8 * MiB);
    assert.equal((await sparse.info()).capacity, 8 * MiB);
    await rejectsWith(sparse.resize(MiB), 8, 18, "invalid argument: Can't shrink capacity below current capacity unless shrink flag explicitly specified");
    await sparse.resize(MiB, 4);
    assert.equal((await sparse.info()).capacity, MiB);
    await sparse.resize(MiB, 2); // delta +1M
    assert.equal((await sparse.info()).capacity, 2 * MiB);
    await sparse.resize(512 * 1024, 2 | 4); // delta −512K
    assert.equal((await sparse.info()).capacity, 1536 * 1024);
    await sparse.resize(3 * MiB, 1); // allocate the grown range
    const grown = await sparse.info();
    assert.equal(grown.capacity, 3 * MiB);
    assert.ok(grown.allocation >= 3 * MiB - 1536 * 1024, `allocated after --allocate: ${grown.allocation}`);
    await rejectsWith(sparse.resize(0, 4), 8, 18, "invalid argument: can't shrink capacity below existing allocation");
    await rejectsWith(sparse.resize(1, 8), 8, 18, 'unsupported flags (0x8) in function storageVolResize');

    // wipe: zero keeps the size and reads back zeros; random overwrites
    const w = path.join(poolDir, 'v-noalloc.img');
    await makeFilledFile(w, 2 * MiB);
    await noAlloc.wipe(0);
    assert.equal(fs.statSync(w).size, 2 * MiB);
    assert.ok((await readRange(w, 0, 2 * MiB)).every((b) => b === 0));
    assert.ok((await allocatedBytes(w)) < 2 * MiB, 'zero wipe deallocates');
    await noAlloc.wipe(8); // random
    assert.equal(fs.statSync(w).size, 2 * MiB);
    assert.ok(!(await readRange(w, 0, 65536)).every((b) => b === 0));
    await rejectsWith(noAlloc.wipe(2), 74, 18, "argument unsupported: 'dod' algorithm not supported");
    await rejectsWith(noAlloc.wipe(99), 8, 18, 'invalid argument: wiping algorithm 99 not supported');
    await rejectsWith(noAlloc.wipe(0, 1), 8, 18, 'unsupported flags (0x1) in function storageVolWipePattern');

    for (const v of [sparse, noAlloc, alloc]) await v.delete();
    assert.deepEqual(await pool.listAllVolumes(), []);
    await rejectsWith(sparse.info(), 50, 18);
  });

  test('sparse upload and download keep bytes, extent map and allocation', async () => {
    const src = path.join(work, 'capture.img');
    await makeImage(src, CAPTURE_LAYOUT);
    const srcSha = await sha256File(src);
    const vol = await pool.createVol({ name: 'cap.img', capacity: 4 * MiB, allocation: 0 });
    const r = await vol.uploadFile(src, { sparse: true });
    assert.equal(r.sparse, true);
    const target = path.join(poolDir, 'cap.img');
    assert.equal(await sha256File(target), srcSha);
    assert.deepEqual(await layoutOf(target), CAPTURE_LAYOUT);
    await assertAllocationNear(target, dataOf(CAPTURE_LAYOUT));
    const info = await vol.info();
    assert.equal(info.capacity, 4 * MiB);
    assert.equal(info.allocation, await allocatedBytes(target), 'allocation refreshed after the upload');

    const out = path.join(work, 'cap.out');
    const dl = await vol.downloadFile(out, { sparse: true });
    assert.equal(dl.dataBytes, dataOf(CAPTURE_LAYOUT));
    assert.equal(await sha256File(out), srcSha);
    assert.deepEqual(await layoutOf(out), CAPTURE_LAYOUT);
    await assertAllocationNear(out, dataOf(CAPTURE_LAYOUT));

    const plain = path.join(work, 'cap.plain');
    const pdl = await vol.downloadFile(plain, { sparse: false });
    assert.equal(pdl.holeBytes, 0);
    assert.equal(pdl.dataBytes, 4 * MiB);
    assert.equal(await sha256File(plain), srcSha);

    const vol2 = await pool.createVol({ name: 'cap-plain.img', capacity: 4 * MiB, allocation: 0 });
    await vol2.uploadFile(src, { sparse: false });
    assert.equal(await sha256File(path.join(poolDir, 'cap-plain.img')), srcSha);
    assert.ok((await allocatedBytes(path.join(poolDir, 'cap-plain.img'))) >= 4 * MiB, 'a plain upload writes the zeros');
    await vol2.delete();
    await vol.delete();
  });

  test('sparse upload over a volume full of random bytes reads back exactly as the source', async () => {
    const src = path.join(work, 'over.img');
    await makeImage(src, CAPTURE_LAYOUT, 21);
    const vol = await pool.createVol({ name: 'over.img', capacity: 4 * MiB, allocation: 0 });
    const target = path.join(poolDir, 'over.img');
    await makeFilledFile(target, 4 * MiB);
    await vol.uploadFile(src, { sparse: true });
    assert.equal(fs.statSync(target).size, 4 * MiB);
    assert.equal(await sha256File(target), await sha256File(src));
    assert.deepEqual(await layoutOf(target), CAPTURE_LAYOUT, 'the holes are holes again');
    await vol.delete();
  });

  test('upload at an offset leaves the rest untouched and the size unchanged', async () => {
    const src = path.join(work, 'holefirst.img');
    const layout: Layout = [{ kind: 'hole', length: 65536 }, { kind: 'data', length: 65536 }, { kind: 'hole', length: 8192 }];
    await makeImage(src, layout, 22);
    const vol = await pool.createVol({ name: 'off.img', capacity: 4 * MiB, allocation: 0 });
    const target = path.join(poolDir, 'off.img');
    await makeFilledFile(target, 4 * MiB);
    const before = await fsp.readFile(target);
    for (const sparse of [true, false]) {
      await vol.uploadFile(src, { sparse, offset: MiB });
      const after = await fsp.readFile(target);
      assert.equal(after.length, 4 * MiB, `size unchanged (sparse=${sparse})`);
      assert.ok(after.subarray(0, MiB).equals(before.subarray(0, MiB)), 'bytes before the offset untouched');
      assert.ok(after.subarray(MiB, MiB + 139264).equals(await fsp.readFile(src)), 'the range reads as the source');
      assert.ok(after.subarray(MiB + 139264).equals(before.subarray(MiB + 139264)), 'bytes after the range untouched');
    }
    // an upload past the end grows the volume, as libvirt's does: a hole up to the offset, then the range
    await vol.uploadFile(src, { sparse: true, offset: 5 * MiB });
    const grown = await fsp.readFile(target);
    assert.equal(grown.length, 5 * MiB + 139264);
    assert.ok(grown.subarray(4 * MiB, 5 * MiB).equals(Buffer.alloc(MiB)), 'the gap reads as zeros');
    assert.ok(grown.subarray(5 * MiB).equals(await fsp.readFile(src)));
    assert.equal((await vol.info()).capacity, 5 * MiB + 139264);
    await vol.delete();
  });

  test('download windows: offset/length, past the end, beyond EOF', async () => {
    const src = path.join(work, 'win.img');
    await makeImage(src, CAPTURE_LAYOUT, 23);
    const vol = await pool.createVol({ name: 'win.img', capacity: 4 * MiB, allocation: 0 });
    await vol.uploadFile(src, { sparse: true });
    const whole = await fsp.readFile(src);
    const out = path.join(work, 'win.out');
    for (const [offset, length, sparse] of [[61440, 1200000, true], [983040, 1000000, false], [3400000, 2000000, true], [3400000, 0, false]] as const) {
      await vol.downloadFile(out, { offset, length, sparse });
      const want = whole.subarray(offset, length ? Math.min(whole.length, offset + length) : whole.length);
      const got = await fsp.readFile(out);
      assert.ok(got.equals(want), `window ${offset}+${length} sparse=${sparse}`);
    }
    for (const sparse of [true, false]) {
      const r = await vol.downloadFile(out, { offset: 5_000_000, sparse });
      assert.deepEqual([r.dataBytes, r.holeBytes, fs.statSync(out).size], [0, 0, 0], 'offset beyond EOF: empty stream, no error');
      await vol.downloadFile(out, { offset: 4 * MiB, sparse });
      assert.equal(fs.statSync(out).size, 0);
    }
    await vol.delete();
  });

  test('an upload longer than its length fails with libvirt ENOSPC error and the volume survives', async () => {
    const src = path.join(work, 'c64.bin');
    await makeFilledFile(src, 65536);
    const vol = await pool.createVol({ name: 'len.img', capacity: MiB, allocation: 0 });
    // our client's uploadFile stops at `length`; virsh sends the whole file: do as virsh does
    const sendAll = async (file: string, length: number, sparse: boolean) => {
      const stream = await vol.upload({ length, sparse });
      await stream.sendChunks(fileChunks(file, { sparse }));
    };
    const err = await rejectsWith(sendAll(src, 8192, false), 38, 38, 'cannot write to stream: No space left on device');
    assert.equal(err.int1, 28);
    assert.equal(err.str1, '%s');
    const sp = path.join(work, 'len-sparse.img');
    await makeImage(sp, CAPTURE_LAYOUT, 24);
    await rejectsWith(sendAll(sp, 100000, true), 38, 38, 'cannot write to stream: No space left on device');
    assert.equal(fs.statSync(path.join(poolDir, 'len.img')).size, MiB, 'never truncated');
    // the connection is still fine
    assert.equal((await vol.info()).capacity, MiB);
    await vol.delete();
  });

  test('a client abort ends the stream and closes the file', async () => {
    const src = path.join(work, 'ab.img');
    await makeImage(src, [{ kind: 'data', length: 8 * MiB }], 25);
    const vol = await pool.createVol({ name: 'ab.img', capacity: 8 * MiB, allocation: 0 });
    await vol.uploadFile(src, { sparse: true });
    const stream = await vol.download({ sparse: true });
    const it = stream[Symbol.asyncIterator]();
    await it.next();
    await stream.abort(new Error('enough'));
    const up = await vol.upload({ sparse: true });
    await up.sendChunk({ kind: 'data', bytes: Buffer.alloc(4096, 7) });
    await up.abort(new Error('changed my mind'));
    // both streams are gone on the daemon and the file is closed: it can be deleted and recreated
    for (let i = 0; i < 50 && d.logs.filter((l) => /aborted by the client/.test(l)).length < 2; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(d.logs.filter((l) => /aborted by the client/.test(l)).length >= 2, true, d.logs.join(''));
    await vol.delete();
  });

  test('many clients and streams at once', async () => {
    const N = 6;
    const jobs = Array.from({ length: N }, async (_, i) => {
      const c = await connect(d.uri);
      try {
        const p = await c.storagePoolLookupByName('main');
        const layout: Layout = [{ kind: 'data', length: 300000 + i * 4096 }, { kind: 'hole', length: 2 * MiB }, { kind: 'data', length: 1000 + i }];
        const src = path.join(work, `many-${i}.img`);
        await makeImage(src, layout, 100 + i);
        const size = layout.reduce((n, e) => n + e.length, 0);
        const v = await p.createVol({ name: `many-${i}.img`, capacity: size, allocation: 0 });
        await v.uploadFile(src, { sparse: i % 2 === 0 });
        const out = path.join(work, `many-${i}.out`);
        await v.downloadFile(out, { sparse: i % 3 === 0 });
        assert.equal(await sha256File(out), await sha256File(src));
        await v.delete();
      } finally {
        await c.close();
      }
    });
    await Promise.all(jobs);
  });

  test('a client that stops reading pauses only its own stream; memory stays bounded', async () => {
    const big = 96 * MiB;
    const vol = await pool.createVol({ name: 'big.img', capacity: big, allocation: 0 });
    await makeFilledFile(path.join(poolDir, 'big.img'), big);
    const slow = await connect(d.uri);
    try {
      const sp = await slow.storagePoolLookupByName('main');
      const sv = await sp.volLookupByName('big.img');
      const rssBefore = process.memoryUsage().rss;
      const stream = await sv.download({ sparse: true, highWaterMark: 1 * MiB });
      const it = stream[Symbol.asyncIterator]();
      await it.next(); // data is flowing; now stop reading
      await new Promise((r) => setTimeout(r, 300));
      // meanwhile another client is served normally
      const src = path.join(work, 'side.img');
      await makeImage(src, [{ kind: 'data', length: 2 * MiB }], 26);
      const side = await pool.createVol({ name: 'side.img', capacity: 2 * MiB, allocation: 0 });
      await side.uploadFile(src);
      const out = path.join(work, 'side.out');
      await side.downloadFile(out);
      assert.equal(await sha256File(out), await sha256File(src));
      const grown = process.memoryUsage().rss - rssBefore;
      assert.ok(grown < 48 * MiB, `rss grew by ${Math.round(grown / MiB)} MiB while a ${big / MiB} MiB download was stalled`);
      // drain the rest: it still completes correctly
      let n = 0;
      for (let r = await it.next(); !r.done; r = await it.next()) n += r.value.kind === 'data' ? r.value.bytes.length : r.value.length;
      assert.ok(n > 0);
      await side.delete();
    } finally {
      await slow.close();
    }
    await vol.delete();
  });

  test('volume names cannot escape the pool', async () => {
    const outside = path.join(d.dir, 'outside');
    await fsp.mkdir(outside);
    await fsp.writeFile(path.join(outside, 'secret'), 'secret');
    await rejectsWith(pool.createVol({ name: '../x.img', capacity: 1 }), 55, 18, "Requested operation is not valid: volume name '../x.img' cannot contain '/'");
    await rejectsWith(pool.createVol({ name: 'a/b', capacity: 1 }), 55, 18);
    await rejectsWith(pool.createVol({ name: '..', capacity: 1 }), 8, 18, "invalid argument: volume name '..' is not allowed");
    await rejectsWith(pool.createVol({ name: '.', capacity: 1 }), 8, 18);
    await rejectsWith(pool.createVolXML('<volume><name></name><capacity>1</capacity></volume>'), 27, 18, 'XML error: missing volume name element');
    await rejectsWith(pool.createVolXML('<volume><name>a&#0;b</name><capacity>1</capacity></volume>'), 35, 18);
    await fsp.symlink(path.join(outside, 'secret'), path.join(poolDir, 'link.img'));
    await fsp.symlink(path.join(outside, 'new.img'), path.join(poolDir, 'dangling.img'));
    assert.ok(!(await pool.listAllVolumes()).some((v) => v.name === 'link.img'), 'symlinks are not volumes');
    await rejectsWith(pool.volLookupByName('link.img'), 8, 18, /symbolic link/);
    await rejectsWith(conn.storageVolLookupByPath(path.join(poolDir, 'link.img')), 8, 18, /symbolic link/);
    const forged = conn.vol({ pool: 'main', name: 'link.img', key: path.join(poolDir, 'link.img') });
    await rejectsWith(forged.download(), 8, 18, /symbolic link/);
    await rejectsWith(forged.upload(), 8, 18, /symbolic link/);
    await rejectsWith(forged.resize(1 << 20), 8, 18, /symbolic link/);
    await rejectsWith(forged.wipe(), 8, 18, /symbolic link/);
    await rejectsWith(forged.delete(), 8, 18, /symbolic link/);
    await rejectsWith(pool.createVol({ name: 'dangling.img', capacity: MiB }), 90, 18, "storage volume 'dangling.img' exists already");
    // a name that leads from the pool's directory to the real file outside it
    const escaping = path.relative(poolDir, path.join(outside, 'secret'));
    assert.equal(escaping, '../../outside/secret');
    assert.equal(await fsp.readFile(path.join(poolDir, escaping), 'utf8'), 'secret', 'the name leads to an existing file');
    await rejectsWith(pool.volLookupByName(escaping), 50, 18, `Storage volume not found: no storage vol with matching name '${escaping}'`);
    const traversal = conn.vol({ pool: 'main', name: escaping, key: '' });
    await rejectsWith(traversal.info(), 50, 18);
    await rejectsWith(traversal.download(), 50, 18);
    await rejectsWith(traversal.upload(), 50, 18);
    await rejectsWith(traversal.wipe(), 50, 18);
    await rejectsWith(traversal.delete(), 50, 18);
    await rejectsWith(conn.storageVolLookupByPath(path.join(poolDir, escaping)), 50, 18);
    assert.equal(await fsp.readFile(path.join(outside, 'secret'), 'utf8'), 'secret');
    assert.ok(!fs.existsSync(path.join(outside, 'new.img')), 'nothing created outside the pool');
    assert.deepEqual((await fsp.readdir(outside)).sort(), ['secret']);
    await fsp.unlink(path.join(poolDir, 'link.img'));
    await fsp.unlink(path.join(poolDir, 'dangling.img'));
  });

  test('a read-only connection can list, look and download but not change anything', async () => {
    const src = path.join(work, 'ro.img');
    await makeImage(src, CAPTURE_LAYOUT, 27);
    const vol = await pool.createVol({ name: 'ro.img', capacity: 4 * MiB, allocation: 0 });
    await vol.uploadFile(src, { sparse: true });
    const ro = await connect(d.uri, { readonly: true });
    try {
      const rp = await ro.storagePoolLookupByName('main');
      assert.ok((await ro.listAllStoragePools()).length >= 1);
      const rv = await rp.volLookupByName('ro.img');
      assert.equal((await rv.info()).capacity, 4 * MiB);
      await rv.xmlDesc();
      await rp.info();
      const out = path.join(work, 'ro.out');
      await rv.downloadFile(out, { sparse: true });
      assert.equal(await sha256File(out), await sha256File(src));
      const denied = (api: string) => `operation forbidden: read only access prevents ${api}`;
      await rejectsWith(rp.createVol({ name: 'x.img', capacity: 1 }), 29, 18, denied('virStorageVolCreateXML'));
      await rejectsWith(rv.delete(), 29, 18, denied('virStorageVolDelete'));
      await rejectsWith(rv.resize(8 * MiB), 29, 18, denied('virStorageVolResize'));
      await rejectsWith(rv.wipe(), 29, 18, denied('virStorageVolWipePattern'));
      await rejectsWith(rv.uploadFile(src), 29, 18, denied('virStorageVolUpload'));
      await rejectsWith(ro.storagePoolDefineDir('ro-pool', '/tmp/x'), 29, 18, denied('virStoragePoolDefineXML'));
      await rejectsWith(rp.destroy(), 29, 18, denied('virStoragePoolDestroy'));
      await rejectsWith(rp.setAutostart(true), 29, 18, denied('virStoragePoolSetAutostart'));
      await rejectsWith(rp.refresh(), 29, 18, denied('virStoragePoolRefresh'));
      assert.equal(await sha256File(path.join(poolDir, 'ro.img')), await sha256File(src), 'nothing changed');
    } finally {
      await ro.close();
    }
    await vol.delete();
  });
});

describe('sparsevirtd over tcp and tls', () => {
  let dir: string;
  let pki: string;
  before(async () => {
    dir = await scratchDir();
    pki = path.join(dir, 'pki');
    const script = path.resolve('scripts', 'setup-tls.sh');
    const r = await run('bash', [script, pki]);
    assert.equal(r.code, 0, `setup-tls.sh: ${r.stderr}`);
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  async function roundTrip(uri: string, poolDir: string, name: string): Promise<void> {
    const conn = await connect(uri);
    try {
      const p = await conn.storagePoolLookupByName('net');
      const src = path.join(dir, `${name}.src`);
      await makeImage(src, CAPTURE_LAYOUT, 28);
      const v = await p.createVol({ name: `${name}.img`, capacity: 4 * MiB, allocation: 0 });
      await v.uploadFile(src, { sparse: true });
      assert.deepEqual(await layoutOf(path.join(poolDir, `${name}.img`)), CAPTURE_LAYOUT);
      const out = path.join(dir, `${name}.out`);
      await v.downloadFile(out, { sparse: true });
      assert.equal(await sha256File(out), await sha256File(src));
      await v.delete();
    } finally {
      await conn.close();
    }
  }

  test('the same transfers over plain tcp and over tls with client certificates', async () => {
    const poolDir = path.join(dir, 'net-pool');
    const logs: string[] = [];
    const daemon = await startDaemon({
      stateDir: path.join(dir, 'state'),
      listen: ['tcp:127.0.0.1:0', 'tls:127.0.0.1:0'],
      tls: { pkipath: pki },
      defaultPool: false,
      logSink: (l) => logs.push(l),
    });
    try {
      const tcp = daemon.addresses.find((a) => a.kind === 'tcp')!;
      const tlsA = daemon.addresses.find((a) => a.kind === 'tls')!;
      const setup = await connect(tcp.uri);
      await definePool(setup, 'net', poolDir);
      await setup.close();
      await roundTrip(tcp.uri, poolDir, 'tcp');
      await roundTrip(`${tlsA.uri}?pkipath=${pki}`, poolDir, 'tls');
    } finally {
      await daemon.close();
    }
  });

  test('tls: the CN allow-list refuses other certificates before any procedure runs', async () => {
    const logs: string[] = [];
    const daemon = await startDaemon({
      stateDir: path.join(dir, 'state2'),
      listen: ['tls:127.0.0.1:0'],
      tls: { pkipath: pki, allow: ['somebody-else'] },
      defaultPool: false,
      logSink: (l) => logs.push(l),
    });
    try {
      const a = daemon.addresses[0]!;
      await assert.rejects(connect(`${a.uri}?pkipath=${pki}`, { timeout: 5000 }), (err: Error & { code?: string }) => err.code === 'ERR_ACCESS_DENIED');
      assert.ok(logs.some((l) => /not in the allow-list/.test(l) && /sparsevirt-test-client/.test(l)), logs.join(''));
    } finally {
      await daemon.close();
    }
    const ok = await startDaemon({
      stateDir: path.join(dir, 'state3'),
      listen: ['tls:127.0.0.1:0'],
      tls: { pkipath: pki, allow: ['sparsevirt-test-client'] },
      defaultPool: false,
      logSink: () => undefined,
    });
    try {
      const conn = await connect(`${ok.addresses[0]!.uri}?pkipath=${pki}`);
      assert.equal(await conn.getType(), 'sparsevirt');
      await conn.close();
    } finally {
      await ok.close();
    }
  });

  test('tls: a client without a certificate is refused', async () => {
    const tls = await import('node:tls');
    const daemon = await startDaemon({
      stateDir: path.join(dir, 'state4'), listen: ['tls:127.0.0.1:0'], tls: { pkipath: pki }, defaultPool: false, logSink: () => undefined,
    });
    try {
      const a = daemon.addresses[0] as { port: number };
      const ended = await new Promise<string>((resolve) => {
        const s = tls.connect({ host: '127.0.0.1', port: a.port, ca: fs.readFileSync(path.join(pki, 'cacert.pem')), servername: 'localhost' });
        s.on('error', (e) => resolve(`error: ${e.message}`));
        s.on('close', () => resolve('closed'));
        s.on('secureConnect', () => s.write(Buffer.from('0000001c20008086000000010000004200000000000000000000000000', 'hex').subarray(0, 28)));
        s.on('data', () => resolve('got data'));
      });
      assert.notEqual(ended, 'got data');
      assert.equal(daemon.clientCount, 0);
    } finally {
      await daemon.close();
    }
  });
});

describe('sparsevirtd state', () => {
  test('a restart finds every pool and volume again, running pools running', async () => {
    const dir = await scratchDir();
    try {
      const d1 = await startTestDaemon({ dir });
      let c = await connect(d1.uri);
      const a = await definePool(c, 'alpha', path.join(dir, 'alpha'));
      await a.setAutostart(true);
      const b = await definePool(c, 'beta', path.join(dir, 'beta'));
      const g = await c.storagePoolDefineDir('gamma', path.join(dir, 'gamma'));
      await (await a.createVol({ name: 'a1.img', capacity: MiB, allocation: 0 })).uploadFile(await (async () => {
        const f = path.join(dir, 'a1.src');
        await makeImage(f, [{ kind: 'data', length: 4096 }, { kind: 'hole', length: MiB - 4096 }]);
        return f;
      })(), { sparse: true });
      await b.createVol({ name: 'b1.img', capacity: 2 * MiB });
      const uuids = { alpha: a.uuidString, beta: b.uuidString, gamma: g.uuidString };
      await c.close();
      await d1.daemon.close();
      // no stray temp files, one file per pool
      assert.deepEqual((await fsp.readdir(path.join(d1.stateDir, 'pools'))).sort(), ['alpha.json', 'beta.json', 'gamma.json']);

      const d2 = await startTestDaemon({ dir });
      c = await connect(d2.uri);
      const pools = await c.listAllStoragePools();
      assert.deepEqual(pools.map((p) => [p.name, p.uuidString]), Object.entries(uuids));
      const state = async (n: string) => {
        const p = await c.storagePoolLookupByName(n);
        return [await p.isActive(), await p.autostart()];
      };
      assert.deepEqual(await state('alpha'), [true, true]);
      assert.deepEqual(await state('beta'), [true, false]);
      assert.deepEqual(await state('gamma'), [false, false]);
      const a2 = await c.storagePoolLookupByName('alpha');
      assert.deepEqual((await a2.listAllVolumes()).map((v) => v.name), ['a1.img']);
      assert.equal(await sha256File(path.join(dir, 'alpha', 'a1.img')), await sha256File(path.join(dir, 'a1.src')));
      assert.deepEqual((await (await c.storagePoolLookupByName('beta')).listAllVolumes()).map((v) => v.name), ['b1.img']);
      // a destroyed pool stays down over a restart; an undefined one is gone
      await (await c.storagePoolLookupByName('beta')).destroy();
      await c.close();
      await d2.daemon.close();
      const d3 = await startTestDaemon({ dir });
      c = await connect(d3.uri);
      assert.equal(await (await c.storagePoolLookupByName('beta')).isActive(), false);
      await c.close();
      await d3.daemon.close();
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });

  test('a fresh state directory gets a running, autostarted default pool; an unreadable pool file is skipped', async () => {
    const dir = await scratchDir();
    try {
      const d = await startTestDaemon({ dir, defaultPool: true });
      const c = await connect(d.uri);
      const p = await c.storagePoolLookupByName('default');
      assert.equal(await p.isActive(), true);
      assert.equal(await p.autostart(), true);
      assert.match(await p.xmlDesc(), new RegExp(`<path>${path.join(d.stateDir, 'images')}</path>`));
      await c.close();
      await d.daemon.close();
      await fsp.writeFile(path.join(d.stateDir, 'pools', 'broken.json'), '{"version":1,"na');
      await fsp.writeFile(path.join(d.stateDir, 'pools', 'default.json.tmp-1-abcd'), 'half written');
      const d2 = await startTestDaemon({ dir, defaultPool: true });
      const c2 = await connect(d2.uri);
      assert.deepEqual((await c2.listAllStoragePools()).map((x) => x.name), ['default']);
      assert.ok(d2.logs.some((l) => /unreadable/.test(l)));
      assert.ok(!fs.existsSync(path.join(d.stateDir, 'pools', 'default.json.tmp-1-abcd')));
      await c2.close();
      await d2.daemon.close();
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});
