/**
 * Semantic abuse: well-formed frames that ask for something they must not get.
 * Each gets a clear error (a libvirt code other than "internal error", with a message) and
 * changes nothing it should not: files outside the pool, the volume beyond the written range,
 * other streams on the same connection. (An upload past the volume's end grows it, as libvirt's.)
 *
 * (Already covered elsewhere and not repeated here: a hole past an upload's `length` is clipped
 * and data past it gets ENOSPC, raw-hole-negative/flags/nonsparse captures, the basic orphan
 * packet answer — see test/daemon-raw.test.ts and test/daemon-client.test.ts.)
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { connect } from '../src/client/index.js';
import type { RemoteError } from '../src/errors.js';
import { MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, buildFrame, type Header } from '../src/rpc/message.js';
import { P } from '../src/protocol/remote.js';
import { XdrReader, XdrWriter, encode } from '../src/xdr/index.js';
import { startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { RawClient, errorOf, type Frame } from './helpers/raw-client.js';
import { run } from './helpers/run.js';
import { makeFilledFile, makeImage, sha256File } from './helpers/images.js';

const MiB = 1 << 20;
const UP = 208;
const DOWN = 209;

function hole(length: bigint, flags = 0): Buffer {
  return Buffer.from(new XdrWriter(12).hyper(length).uint(flags).view());
}

/** One frame of the REMOTE program, for writing many at once. */
function frame(h: Pick<Header, 'proc' | 'serial' | 'type' | 'status'>, payload?: Buffer): Buffer {
  return buildFrame({ prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, ...h }, payload);
}

/** A clear refusal: an error reply that is not libvirt's catch-all "internal error", with a message. */
function assertClearError(f: Frame, what: string, codes?: number[]): RemoteError {
  assert.equal(f.status, Status.ERROR, `${what}: expected an error, got ${f.type}/${f.status}`);
  const e = errorOf(f);
  assert.notEqual(e.virCode, 1, `${what}: internal error instead of a clear one: ${e.message}`);
  assert.ok(e.message && e.message.length > 5, `${what}: message`);
  if (codes) assert.ok(codes.includes(e.virCode), `${what}: code ${e.virCode} (${e.message})`);
  return e;
}

/** File descriptors of this process (the daemon runs in it) open on `file`. */
function fdsOn(file: string): number {
  let n = 0;
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    try {
      if (fs.readlinkSync(`/proc/self/fd/${fd}`) === file) n++;
    } catch {
      // gone
    }
  }
  return n;
}

describe('semantic abuse of sparsevirtd', () => {
  let d: TestDaemon;
  let poolDir: string;
  let outside: string;
  let poolRef: { name: string; uuid: Buffer };
  const vol = (name: string) => ({ pool: 'abuse', name, key: path.join(poolDir, name) });

  before(async () => {
    d = await startTestDaemon();
    poolDir = path.join(d.dir, 'pool');
    outside = path.join(d.dir, 'outside');
    await fsp.mkdir(outside);
    await fsp.writeFile(path.join(outside, 'secret'), 'do not touch');
    const c = await RawClient.connect(d.socket);
    await c.handshake();
    const r = await c.call(P.STORAGE_POOL_DEFINE_XML, { xml: `<pool type='dir'><name>abuse</name><target><path>${poolDir}</path></target></pool>`, flags: 0 });
    poolRef = P.STORAGE_POOL_DEFINE_XML.ret.dec(new XdrReader(r.payload)).pool;
    assert.equal((await c.call(P.STORAGE_POOL_CREATE, { pool: poolRef, flags: 1 })).status, Status.OK);
    c.close();
  });
  after(async () => {
    await d?.stop();
  });

  async function client(): Promise<RawClient> {
    const c = await RawClient.connect(d.socket);
    await c.handshake();
    return c;
  }

  const streamEnd = (c: RawClient, serial: number, proc = UP) =>
    c.waitFor((f) => f.serial === serial && f.proc === proc && f.type === MessageType.STREAM && f.status !== Status.CONTINUE);

  async function openUpload(c: RawClient, name: string, offset: number, opts: { sparse?: boolean; length?: number } = {}): Promise<number> {
    const s = c.nextSerial();
    const r = await c.call(P.STORAGE_VOL_UPLOAD, { vol: vol(name), offset: BigInt(offset), length: BigInt(opts.length ?? 0), flags: opts.sparse === false ? 0 : 1 }, s);
    assert.equal(r.status, Status.OK, `upload ${name}@${offset}: ${r.status === Status.ERROR ? errorOf(r).message : ''}`);
    return s;
  }

  test('uploads past the end grow the volume, as libvirt\'s do (data, a hole, an offset past it, exactly one byte past it); --length and 2^53 still limit', async () => {
    const name = 'cap.img';
    const file = path.join(poolDir, name);
    await makeFilledFile(file, MiB, 11);
    const original = await fsp.readFile(file);
    const c = await client();
    const finish = async (s: number): Promise<Frame> => {
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.OK });
      return streamEnd(c, s);
    };
    try {
      // data that crosses the end: all of it lands, the volume grows to its end
      let s = await openUpload(c, name, MiB - 4096);
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(8192, 0x5a));
      assert.equal((await finish(s)).status, Status.OK, 'data past the end');
      let now = await fsp.readFile(file);
      assert.equal(now.length, MiB + 4096);
      assert.ok(now.subarray(0, MiB - 4096).equals(original.subarray(0, MiB - 4096)), 'bytes before the offset untouched');
      assert.ok(now.subarray(MiB - 4096).equals(Buffer.alloc(8192, 0x5a)));

      // exactly one byte past the capacity (the boundary): the volume is one byte longer
      await makeFilledFile(file, MiB, 11);
      s = await openUpload(c, name, 0, { sparse: false });
      const oneMore = Buffer.alloc(MiB + 1, 0x3c);
      for (let at = 0; at < oneMore.length; at += 262120) {
        c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, oneMore.subarray(at, Math.min(at + 262120, oneMore.length)));
      }
      assert.equal((await finish(s)).status, Status.OK, 'one byte past the end');
      now = await fsp.readFile(file);
      assert.equal(now.length, MiB + 1);
      assert.ok(now.equals(oneMore));

      // a hole that crosses the end (sparse upload at 0: data, then a 2 MiB hole): zeros, grown to its end
      await makeFilledFile(file, MiB, 11);
      s = await openUpload(c, name, 0);
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(4096, 1));
      c.send({ proc: UP, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, hole(2n * BigInt(MiB)));
      assert.equal((await finish(s)).status, Status.OK, 'a hole past the end');
      now = await fsp.readFile(file);
      assert.equal(now.length, 2 * MiB + 4096);
      assert.ok(now.subarray(0, 4096).equals(Buffer.alloc(4096, 1)));
      assert.ok(now.subarray(4096).equals(Buffer.alloc(2 * MiB)), 'the hole reads as zeros, over the old data too');

      // an offset past the end: accepted; the gap reads as zeros
      await makeFilledFile(file, MiB, 11);
      s = await openUpload(c, name, MiB + 1);
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.from([0x77]));
      assert.equal((await finish(s)).status, Status.OK, 'an offset past the end');
      now = await fsp.readFile(file);
      assert.equal(now.length, MiB + 2);
      assert.ok(now.subarray(0, MiB).equals(original));
      assert.equal(now[MiB], 0);
      assert.equal(now[MiB + 1], 0x77);

      // --length still limits: up to the end of the volume, and not one byte more
      await makeFilledFile(file, MiB, 11);
      s = await openUpload(c, name, MiB - 4096, { length: 4096 });
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(4097, 0x5a));
      const e = assertClearError(await streamEnd(c, s), 'data past --length', [38]);
      assert.match(e.message, /No space left on device/);
      now = await fsp.readFile(file);
      assert.equal(now.length, MiB, 'not grown past --length');
      assert.ok(now.subarray(MiB - 4096).equals(Buffer.alloc(4096, 0x5a)), 'what fits in --length is written');

      // and so does 2^53, the largest offset sparsevirtd handles
      await makeFilledFile(file, MiB, 11);
      s = await openUpload(c, name, Number.MAX_SAFE_INTEGER - 4095);
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(8192, 0x5a));
      assertClearError(await streamEnd(c, s), 'data past 2^53', [38, 84]);
      assert.equal(fdsOn(file), 0, 'every stream closed its file');
    } finally {
      c.close();
    }

    // the client library, sparse and not, and virsh: the volume takes the whole image
    const src = path.join(d.dir, 'big.src');
    await makeImage(src, [{ kind: 'data', length: 700000 }, { kind: 'hole', length: MiB }, { kind: 'data', length: 5 }], 3);
    const want = await sha256File(src);
    const size = fs.statSync(src).size;
    const conn = await connect(d.uri);
    try {
      const v = await (await conn.storagePoolLookupByName('abuse')).volLookupByName(name);
      for (const sparse of [true, false]) {
        await makeFilledFile(file, MiB, 11);
        await v.uploadFile(src, { sparse });
        assert.equal(await sha256File(file), want, `sparse=${sparse}: the image`);
        assert.equal((await v.info()).capacity, size);
      }
    } finally {
      await conn.close();
    }
    await makeFilledFile(file, MiB, 11);
    const vr = await run('virsh', ['-q', '-c', d.virshUri, 'vol-upload', '--pool', 'abuse', name, src, '--sparse'], { timeoutMs: 30000 });
    if (vr.code !== -1 || process.env.CI) {
      assert.equal(vr.code, 0, vr.stderr);
      assert.equal(await sha256File(file), want, 'virsh: the image');
    }
  });

  test('a packet refused mid-upload (past --length, a bad hole, a hole on a plain stream): every byte sent before it is written, always, then the stream fails', async () => {
    const name = 'refused.img';
    const file = path.join(poolDir, name);
    const PACKETS = 300;
    const SIZE = 4096;
    const packet = (i: number) => Buffer.alloc(SIZE, (i % 250) + 1);
    const cases: Array<{ what: string; sparse: boolean; length: number; bad: (s: number) => Buffer; pattern: RegExp }> = [
      { what: 'data past --length', sparse: true, length: PACKETS * SIZE, pattern: /No space left on device/,
        bad: (s) => frame({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(SIZE, 0xfe)) },
      { what: 'a hole with flags', sparse: true, length: 0, pattern: /flags 0x1/,
        bad: (s) => frame({ proc: UP, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, hole(4096n, 1)) },
      { what: 'a hole of negative length', sparse: true, length: 0, pattern: /invalid length -4096/,
        bad: (s) => frame({ proc: UP, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, hole(-4096n)) },
      { what: 'a hole on a plain stream', sparse: false, length: 0, pattern: /not opened with the sparse flag/,
        bad: (s) => frame({ proc: UP, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, hole(4096n)) },
    ];
    const c = await client();
    try {
      for (const k of cases) {
        for (let round = 0; round < 4; round++) {
          await makeFilledFile(file, 2 * PACKETS * SIZE, 17);
          const original = await fsp.readFile(file);
          const failed = d.logs.filter((l) => /"upload failed"/.test(l)).length;
          const s = await openUpload(c, name, 0, { sparse: k.sparse, length: k.length });
          // all of it in one write: the daemon has packets queued, not yet written, when the bad one comes
          const frames: Buffer[] = [];
          for (let i = 0; i < PACKETS; i++) frames.push(frame({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, packet(i)));
          frames.push(k.bad(s));
          c.write(Buffer.concat(frames));
          const e = assertClearError(await streamEnd(c, s), `${k.what}, round ${round}`);
          assert.match(e.message, k.pattern);
          // the transfer's end (its log line) comes once the file is written and closed
          for (let i = 0; i < 250 && d.logs.filter((l) => /"upload failed"/.test(l)).length <= failed; i++) await new Promise((r) => setTimeout(r, 20));
          assert.ok(d.logs.filter((l) => /"upload failed"/.test(l)).length > failed, `${k.what}: the daemon logged the failed upload`);
          const now = await fsp.readFile(file);
          let stored = 0;
          while (stored < PACKETS && now.subarray(stored * SIZE, (stored + 1) * SIZE).equals(packet(stored))) stored++;
          assert.equal(stored, PACKETS, `${k.what}, round ${round}: packets before the refused one stored`);
          assert.ok(now.subarray(PACKETS * SIZE).equals(original.subarray(PACKETS * SIZE)), `${k.what}: nothing of or after the refused packet`);
          assert.equal((await c.call(P.CONNECT_GET_LIB_VERSION, undefined)).status, Status.OK, 'the connection goes on');
        }
      }
      assert.equal(fdsOn(file), 0, 'every stream closed its file');
    } finally {
      c.close();
    }
  });

  test('vol-clone: a 1 TiB sparse source clones at once through its data only; names with path tricks and a symlinked source get libvirt errors and create nothing', async () => {
    const TiB = 2 ** 40;
    const huge = path.join(poolDir, 'huge.img');
    const fh = await fsp.open(huge, 'w', 0o600);
    const blocks: Array<[number, Buffer]> = [[0, Buffer.alloc(4096, 0x11)], [TiB / 2, Buffer.alloc(4096, 0x22)], [TiB - 4096, Buffer.alloc(4096, 0x33)]];
    for (const [at, b] of blocks) await fh.write(b, 0, b.length, at);
    await fh.close();
    const c = await client();
    const clone = (name: string, from = vol('huge.img')) => c.call(P.STORAGE_VOL_CREATE_XML_FROM, {
      pool: poolRef, xml: `<volume><name>${name}</name><capacity>0</capacity><allocation>0</allocation></volume>`, clonevol: from, flags: 0,
    });
    const outsideBefore = (await fsp.readdir(outside)).sort();
    try {
      const t0 = Date.now();
      const r = await clone('huge-clone.img');
      assert.equal(r.status, Status.OK, r.status === Status.ERROR ? errorOf(r).message : '');
      const ms = Date.now() - t0;
      assert.ok(ms < 10_000, `took ${ms} ms: the holes were read`);
      const copy = path.join(poolDir, 'huge-clone.img');
      assert.equal(fs.statSync(copy).size, TiB);
      assert.equal(fs.statSync(copy).blocks, fs.statSync(huge).blocks, 'the same allocation: holes stay holes');
      const got = await fsp.open(copy, 'r');
      try {
        for (const [at, b] of blocks) {
          const back = Buffer.alloc(4096);
          await got.read(back, 0, 4096, at);
          assert.ok(back.equals(b), `the data at ${at}`);
        }
      } finally {
        await got.close();
      }
      await fsp.rm(copy);
      await fsp.rm(huge);

      // names that would leave the pool, and a source that is a symlink out of it
      await fsp.writeFile(path.join(poolDir, 'small.img'), Buffer.alloc(4096, 9));
      const poolBefore = (await fsp.readdir(poolDir)).sort();
      for (const [name, code] of [['../escape.img', 55], ['sub/x.img', 55], [`${outside}/x.img`, 55], ['..', 8], ['.', 8]] as const) {
        assertClearError(await clone(name, vol('small.img')), `clone named ${name}`, [code]);
      }
      await fsp.symlink(path.join(outside, 'secret'), path.join(poolDir, 'link.img'));
      const e = assertClearError(await clone('from-link.img', vol('link.img')), 'a symlinked source', [8]);
      assert.match(e.message, /symbolic link/);
      assert.ok(!fs.existsSync(path.join(poolDir, 'from-link.img')), 'no clone of a symlink');
      assertClearError(await clone('x.img', vol('missing.img')), 'a missing source', [50]);
      assertClearError(await clone('y.img', { pool: 'no-such-pool', name: 'small.img', key: '' }), 'a missing source pool', [49]);
      assert.deepEqual((await fsp.readdir(outside)).sort(), outsideBefore, 'nothing made outside the pool');
      assert.equal(await fsp.readFile(path.join(outside, 'secret'), 'utf8'), 'do not touch');
      assert.deepEqual((await fsp.readdir(poolDir)).sort(), [...poolBefore, 'link.img'].sort(), 'no volume was made');
    } finally {
      c.close();
      await fsp.rm(path.join(poolDir, 'link.img'), { force: true });
      await fsp.rm(path.join(poolDir, 'small.img'), { force: true });
    }
  });

  test('an empty hole packet (libvirt\'s API allows one) is a no-op: the data around it lands where it belongs', async () => {
    const name = 'empty-hole.img';
    const file = path.join(poolDir, name);
    await makeFilledFile(file, MiB, 15);
    const c = await client();
    try {
      const s = await openUpload(c, name, 0);
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(4096, 0x31));
      c.send({ proc: UP, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, hole(0n));
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(4096, 0x32));
      c.send({ proc: UP, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, hole(0n));
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.OK });
      assert.equal((await streamEnd(c, s)).status, Status.OK);
      const got = await fsp.readFile(file);
      assert.ok(got.subarray(0, 4096).equals(Buffer.alloc(4096, 0x31)));
      assert.ok(got.subarray(4096, 8192).equals(Buffer.alloc(4096, 0x32)));
    } finally {
      c.close();
    }
  });

  test('hole lengths that are negative or past 2^53, and hole flags: a clear STREAM/ERROR, nothing written, the connection stays', async () => {
    const name = 'holes.img';
    const file = path.join(poolDir, name);
    await makeFilledFile(file, 4 * MiB, 12);
    const sha = await sha256File(file);
    const c = await client();
    try {
      const cases: Array<[bigint, number, RegExp]> = [
        [-1n, 0, /invalid length -1/], [-(1n << 63n), 0, /invalid length/],
        [1n << 53n, 0, /invalid length 9007199254740992/], [(1n << 63n) - 1n, 0, /invalid length/], [4096n, 1, /flags 0x1/],
      ];
      for (const [length, flags, pattern] of cases) {
        const s = await openUpload(c, name, 0);
        c.send({ proc: UP, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, hole(length, flags));
        const e = assertClearError(await streamEnd(c, s), `hole ${length} flags ${flags}`);
        assert.match(e.message, pattern);
        // later packets of the dead stream are ignored, not written
        c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(4096, 0xee));
        assert.equal((await c.call(P.CONNECT_GET_LIB_VERSION, undefined)).status, Status.OK, 'connection usable');
      }
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(await sha256File(file), sha, 'nothing was written');
      assert.equal(fdsOn(file), 0, 'every stream closed its file');
    } finally {
      c.close();
    }
  });

  test('a second CALL on the serial of a stream in flight is refused before anything opens; the first stream goes on undisturbed', async () => {
    const a = path.join(poolDir, 'first.img');
    const b = path.join(poolDir, 'second.img');
    await makeFilledFile(a, MiB, 13);
    await makeFilledFile(b, MiB, 14);
    const shaB = await sha256File(b);
    const c = await client();
    try {
      const s = await openUpload(c, 'first.img', 0);
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(65536, 0x11));
      const before = new Set(c.frames);
      c.send({ proc: UP, serial: s }, encode(P.STORAGE_VOL_UPLOAD.args, { vol: vol('second.img'), offset: 0n, length: 0n, flags: 1 }));
      const again = await c.waitFor((f) => !before.has(f) && f.serial === s && f.type === MessageType.REPLY);
      assert.equal(again.type, MessageType.REPLY);
      const e = assertClearError(again, 'second upload CALL', [39]);
      assert.equal(e.message, `a stream is already open for procedure 208 serial ${s}`);
      assert.equal(fdsOn(b), 0, 'the second volume was never opened');
      // the first stream is intact
      c.send({ proc: UP, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, hole(65536n));
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(100, 0x22));
      c.send({ proc: UP, serial: s, type: MessageType.STREAM, status: Status.OK });
      assert.equal((await streamEnd(c, s)).status, Status.OK);
      const got = await fsp.readFile(a);
      assert.ok(got.subarray(0, 65536).equals(Buffer.alloc(65536, 0x11)));
      assert.ok(got.subarray(65536, 131072).equals(Buffer.alloc(65536)));
      assert.ok(got.subarray(131072, 131172).equals(Buffer.alloc(100, 0x22)));
      assert.equal(got.length, MiB);
      assert.equal(await sha256File(b), shaB, 'the second volume is untouched');

      // the same for a download
      await makeImage(path.join(poolDir, 'src.img'), [{ kind: 'data', length: 300000 }, { kind: 'hole', length: 500000 }, { kind: 'data', length: 1000 }], 9);
      const t = c.nextSerial();
      const dl = await c.call(P.STORAGE_VOL_DOWNLOAD, { vol: vol('src.img'), offset: 0n, length: 0n, flags: 1 }, t);
      assert.equal(dl.status, Status.OK);
      c.send({ proc: DOWN, serial: t }, encode(P.STORAGE_VOL_DOWNLOAD.args, { vol: vol('second.img'), offset: 0n, length: 0n, flags: 1 }));
      const dup = await c.waitFor((f) => f.serial === t && f.type === MessageType.REPLY && f.status === Status.ERROR);
      assert.match(errorOf(dup).message, /a stream is already open for procedure 209/);
      await c.waitFor((f) => f.serial === t && f.type === MessageType.STREAM && f.status === Status.CONTINUE && f.payload.length === 0);
      const bytes = Buffer.concat(c.frames.filter((f) => f.serial === t).map((f) =>
        f.type === MessageType.STREAM_HOLE ? Buffer.alloc(Number(f.payload.readBigInt64BE(0))) : f.type === MessageType.STREAM ? f.payload : Buffer.alloc(0)));
      assert.ok(bytes.equals(await fsp.readFile(path.join(poolDir, 'src.img'))), 'the download is complete and right');
      c.send({ proc: DOWN, serial: t, type: MessageType.STREAM, status: Status.OK });
      assert.equal((await streamEnd(c, t, DOWN)).status, Status.OK);
    } finally {
      c.close();
    }
  });

  test('stream packets for a serial with no stream: one clear STREAM/ERROR per serial, whatever the packet; late packets of an ended stream are ignored', async () => {
    const file = path.join(poolDir, 'orphan.img');
    await makeFilledFile(file, MiB, 15);
    const c = await client();
    try {
      const kinds: Array<[string, number, number, Buffer]> = [
        ['data', MessageType.STREAM, Status.CONTINUE, Buffer.alloc(512, 1)],
        ['hole', MessageType.STREAM_HOLE, Status.CONTINUE, hole(4096n)],
        ['finish', MessageType.STREAM, Status.OK, Buffer.alloc(0)],
        ['abort', MessageType.STREAM, Status.ERROR, Buffer.alloc(0)],
      ];
      let serial = 7000;
      for (const [what, type, status, payload] of kinds) {
        for (const proc of [UP, DOWN]) {
          const s = serial++;
          c.send({ proc, serial: s, type, status }, payload);
          c.send({ proc, serial: s, type, status }, payload);
          const f = await c.waitFor((x) => x.serial === s);
          assert.equal(f.type, MessageType.STREAM, what);
          const e = assertClearError(f, `orphan ${what} on ${proc}`, [39]);
          assert.match(e.message, new RegExp(`no stream is open for procedure ${proc} serial ${s}`));
        }
      }
      assert.equal((await c.call(P.CONNECT_GET_LIB_VERSION, undefined)).status, Status.OK);
      for (let s = 7000; s < serial; s++) assert.equal(c.frames.filter((f) => f.serial === s).length, 1, `one answer for serial ${s}`);

      // a finished upload: its late packets are dropped quietly and write nothing
      const up = await openUpload(c, 'orphan.img', 0);
      c.send({ proc: UP, serial: up, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(100, 3));
      c.send({ proc: UP, serial: up, type: MessageType.STREAM, status: Status.OK });
      assert.equal((await streamEnd(c, up)).status, Status.OK);
      const sha = await sha256File(file);
      const seen = c.frames.length;
      c.send({ proc: UP, serial: up, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(4096, 4));
      c.send({ proc: UP, serial: up, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, hole(8192n));
      assert.equal((await c.call(P.CONNECT_GET_LIB_VERSION, undefined)).status, Status.OK);
      assert.deepEqual(c.frames.slice(seen).filter((f) => f.serial === up), [], 'no answer to late packets');
      assert.equal(await sha256File(file), sha, 'late packets wrote nothing');
    } finally {
      c.close();
    }
  });

  test('names with /, .., NUL, 256 bytes or that are links out of the pool: a clear error from every volume procedure, nothing outside touched', async () => {
    await fsp.symlink(path.join(outside, 'secret'), path.join(poolDir, 'link.img'));
    await fsp.symlink(outside, path.join(poolDir, 'dirlink'));
    await fsp.mkdir(path.join(poolDir, 'subdir'));
    await fsp.writeFile(path.join(poolDir, 'subdir', 'inner.img'), 'inner');
    const names = ['../outside/secret', '..', '.', 'a/b', '/etc/passwd', 'dirlink/secret', 'a\u0000b', '\u0000', 'x'.repeat(256), 'link.img', 'dirlink', 'subdir', 'subdir/inner.img', ''];
    const c = await client();
    try {
      for (const name of names) {
        const v = vol(name);
        const calls: Array<[string, Promise<Frame>]> = [
          ['lookup', c.call(P.STORAGE_VOL_LOOKUP_BY_NAME, { pool: poolRef, name })],
          ['info', c.call(P.STORAGE_VOL_GET_INFO, { vol: v })],
          ['xml', c.call(P.STORAGE_VOL_GET_XML_DESC, { vol: v, flags: 0 })],
          ['path', c.call(P.STORAGE_VOL_GET_PATH, { vol: v })],
          ['resize', c.call(P.STORAGE_VOL_RESIZE, { vol: v, capacity: 1n, flags: 4 })],
          ['wipe', c.call(P.STORAGE_VOL_WIPE, { vol: v, flags: 0 })],
          ['wipe-random', c.call(P.STORAGE_VOL_WIPE_PATTERN, { vol: v, algorithm: 8, flags: 0 })],
          ['delete', c.call(P.STORAGE_VOL_DELETE, { vol: v, flags: 0 })],
          ['upload', c.call(P.STORAGE_VOL_UPLOAD, { vol: v, offset: 0n, length: 0n, flags: 1 })],
          ['download', c.call(P.STORAGE_VOL_DOWNLOAD, { vol: v, offset: 0n, length: 0n, flags: 1 })],
          ['create', c.call(P.STORAGE_VOL_CREATE_XML, { pool: poolRef, xml: `<volume><name>${name.replace(/\0/g, '&#0;').replace(/</g, '&lt;')}</name><capacity>4096</capacity></volume>`, flags: 0 })],
          ['by-path', c.call(P.STORAGE_VOL_LOOKUP_BY_PATH, { path: path.join(poolDir, name) })],
          ['by-key', c.call(P.STORAGE_VOL_LOOKUP_BY_KEY, { key: `${poolDir}/${name}` })],
        ];
        for (const [what, p] of calls) {
          const f = await p;
          assertClearError(f, `${what} '${name.slice(0, 20)}'`, [8, 27, 35, 38, 50, 55, 90]);
        }
      }
    } finally {
      c.close();
    }
    assert.equal(await fsp.readFile(path.join(outside, 'secret'), 'utf8'), 'do not touch');
    assert.deepEqual(await fsp.readdir(outside), ['secret']);
    assert.equal(await fsp.readFile(path.join(poolDir, 'subdir', 'inner.img'), 'utf8'), 'inner');
    assert.ok(fs.lstatSync(path.join(poolDir, 'link.img')).isSymbolicLink(), 'the links are still links');
    assert.ok(fs.lstatSync(path.join(poolDir, 'dirlink')).isSymbolicLink());
  });
});
