/**
 * sparsevirtd at the frame level.
 *
 * 1. Replays: the client bytes of the libvirt 9.0 captures (virsh and a raw client talking to
 *    libvirtd) are sent to our daemon, in causal order, and our answers are compared with
 *    libvirtd's: byte for byte where nothing but paths can differ, structurally where sizes or
 *    timestamps differ, by stream content where only packetization differs, and as documented
 *    where we deliberately fix a libvirt bug (docs/libvirt-quirks.md: download-past-end-fails, hole-errors-as-reply,
 *    hole-on-plain-stream-drops-connection).
 * 2. Hand-written frames for protocol misuse: bad lengths, orphan stream packets, undecodable
 *    arguments, malformed holes, names that try to leave their pool.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { KEEPALIVE_PROGRAM, MessageType, REMOTE_PROGRAM, Status, buildFrame, type Message } from '../src/rpc/message.js';
import { FrameParser } from '../src/rpc/parser.js';
import { remoteErrorCodec } from '../src/rpc/structs.js';
import { P, PROCEDURES_BY_NUM } from '../src/protocol/remote.js';
import { XdrReader, XdrWriter, encode, type Codec } from '../src/xdr/index.js';
import { startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { CAPTURE_LAYOUT, layoutOf, sha256File } from './helpers/images.js';
import { RawClient, describe as describeFrame, errorOf, type Frame } from './helpers/raw-client.js';

const FIXTURES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures/libvirt-9.0');
const ANCHOR_UUID = 'f2e3f50a-b527-4232-a2ca-999fc53420f8';
const PROTOPOOL_UUID = '7e7df71c-1001-4f89-9cc2-b950fe1c8c48';
const CAPTURE_SHA = 'b1f246aa3f09de4156e4cfb1a633de5ffe2d65f23da771e17b432db22c62bdf6';
const MiB = 1 << 20;

// ------------------------------------------------------------------ capture source image

/** The capture's sparse-source.img: generator bytes in data extents, explicit zeros at 1572864, holes. */
async function makeCaptureSource(file: string): Promise<void> {
  const fh = await fsp.open(file, 'w');
  try {
    let pos = 0;
    for (const e of CAPTURE_LAYOUT) {
      if (e.kind === 'data') {
        const buf = Buffer.alloc(e.length);
        if (pos !== 1572864) {
          for (let o = pos; o < pos + e.length; o += 32) {
            const word = Buffer.alloc(8);
            word.writeBigUInt64BE(BigInt(Math.floor(o / 32)));
            createHash('sha256').update('proto-sparse-v1:').update(word).digest().copy(buf, o - pos);
          }
        }
        await fh.write(buf, 0, buf.length, pos);
      }
      pos += e.length;
    }
    await fh.truncate(pos);
  } finally {
    await fh.close();
  }
}

// ------------------------------------------------------------------ replay machinery

function parseBin(file: string): Message[] {
  const out: Message[] = [];
  new FrameParser().push(fs.readFileSync(file), (m) => out.push({ ...m, payload: Buffer.from(m.payload) }));
  return out;
}

const isKeepalive = (m: { prog: number }) => (m.prog >>> 0) === KEEPALIVE_PROGRAM;
const isEof = (m: Message) => m.type === MessageType.STREAM && m.status === Status.CONTINUE && m.payload.length === 0;

/** Deep-map every string of a decoded value. */
function mapStrings(v: unknown, f: (s: string) => string): unknown {
  if (typeof v === 'string') return f(v);
  if (Buffer.isBuffer(v) || v === null || typeof v !== 'object') return v;
  if (Array.isArray(v)) return v.map((x) => mapStrings(x, f));
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, mapStrings(x, f)]));
}

function reencode<T>(codec: Codec<T>, payload: Buffer, f: (s: string) => string): Buffer {
  const w = new XdrWriter(256);
  codec.enc(w, mapStrings(codec.dec(new XdrReader(payload)), f) as T);
  return Buffer.from(w.view());
}

/** The codec of a frame's payload, when it has one we know. */
function codecOf(m: Message, dir: 'c2s' | 's2c'): Codec<any> | null {
  if ((m.prog >>> 0) !== REMOTE_PROGRAM) return null;
  const proc = PROCEDURES_BY_NUM.get(m.proc);
  if (m.type === MessageType.CALL) return proc && dir === 'c2s' ? proc.args : null;
  if (m.type === MessageType.REPLY) return m.status === Status.ERROR ? remoteErrorCodec : proc?.ret ?? null;
  if (m.type === MessageType.STREAM && m.status === Status.ERROR && m.payload.length > 0) return remoteErrorCodec;
  return null;
}

function rewrite(m: Message, dir: 'c2s' | 's2c', f: (s: string) => string): Message {
  const c = codecOf(m, dir);
  if (!c || m.payload.length === 0) return m;
  try {
    return { ...m, payload: reencode(c, m.payload, f) };
  } catch {
    return m; // e.g. the raw client's deliberately bad payloads
  }
}

interface Replay {
  expected: Message[];
  actual: Frame[];
  client: RawClient;
}

/**
 * Send the capture's client frames to `socket` in causal order: each one only after we got as
 * many server frames as libvirtd had sent before it (a finish after EOF waits for our EOF).
 */
async function replay(name: string, socket: string, subst: (s: string) => string, opts: { settleMs?: number; done?: (ours: Frame[], expected: Message[]) => boolean } = {}): Promise<Replay> {
  const c2s = parseBin(path.join(FIXTURES, `${name}.client-to-server.bin`));
  const s2c = parseBin(path.join(FIXTURES, `${name}.server-to-client.bin`));
  const order = (JSON.parse(fs.readFileSync(path.join(FIXTURES, `${name}.frames.json`), 'utf8')) as { frames: Array<{ direction: string }> }).frames;
  assert.equal(order.filter((f) => f.direction === 'client-to-server').length, c2s.length, `${name}: frame index`);
  const client = await RawClient.connect(socket);
  const ours = () => client.frames.filter((f) => !isKeepalive(f));
  let ci = 0;
  let si = 0;
  const seen: Message[] = [];
  for (const entry of order) {
    if (entry.direction !== 'client-to-server') {
      seen.push(s2c[si++]!);
      continue;
    }
    const m = c2s[ci++]!;
    if (isKeepalive(m)) continue;
    // Progress: as many replies as libvirtd had sent; per stream, an end (EOF, OK or ERROR) if
    // libvirtd had sent one, else as many data/hole packets (packet counts differ after the
    // first big extent: we send no 24-byte runts).
    const need = seen.filter((x) => !isKeepalive(x));
    const replies = (f: Message[]) => f.filter((x) => x.type === MessageType.REPLY).length;
    const isData = (x: Message) => x.type === MessageType.STREAM_HOLE || (x.type === MessageType.STREAM && x.status === Status.CONTINUE && x.payload.length > 0);
    const isEnd = (x: Message) => x.type === MessageType.STREAM && !isData(x);
    const serials = [...new Set(need.filter((x) => x.type === MessageType.STREAM || x.type === MessageType.STREAM_HOLE).map((x) => x.serial))];
    const ready = (have: Frame[]): boolean => replies(have) >= replies(need) && serials.every((sn) => {
      const mine = have.filter((x) => x.serial === sn);
      const theirs = need.filter((x) => x.serial === sn);
      return theirs.some(isEnd) ? mine.some(isEnd) : mine.filter(isData).length >= theirs.filter(isData).length;
    });
    const deadline = Date.now() + 5000;
    while (!client.isClosed && Date.now() < deadline && !ready(ours())) await new Promise((r) => setTimeout(r, 2));
    if (client.isClosed) break;
    const out = rewrite(m, 'c2s', subst);
    client.write(buildFrame(out, out.payload));
  }
  const expected = s2c.filter((x) => !isKeepalive(x)).map((x) => rewrite(x, 's2c', subst));
  const deadline = Date.now() + 5000;
  const done = opts.done ?? ((f: Frame[]) => f.length >= expected.length);
  while (!client.isClosed && !done(ours(), expected) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 2));
  await new Promise((r) => setTimeout(r, opts.settleMs ?? 30));
  return { expected, actual: ours(), client };
}

/** A download is over once the daemon confirmed the client's finish or abort (and what follows it). */
const streamConfirmed = (f: Frame[], expected: Message[]): boolean => f.some((x) => x.proc === 209 && x.type === MessageType.STREAM && x.status === Status.OK)
  && (!expected.some((x) => x.proc === 2) || f.some((x) => x.proc === 2 && x.type === MessageType.REPLY));

function frameBytes(m: Message): string {
  return buildFrame(m, m.payload).toString('hex');
}

function assertExact(r: Replay, name: string): void {
  assert.deepEqual(r.actual.map(describeFrame), r.expected.map(describeFrame), `${name}: frame sequence`);
  for (const [i, e] of r.expected.entries()) assert.equal(frameBytes(r.actual[i]!), frameBytes(e), `${name}: frame ${i} (${describeFrame(e)}) bytes`);
}

/** Same frames and the same decoded values, numbers and digits in XML masked (sizes, timestamps). */
function assertShape(r: Replay, name: string): void {
  assert.deepEqual(r.actual.map(describeFrame).map(maskLen), r.expected.map(describeFrame).map(maskLen), `${name}: frame sequence`);
  const mask = (m: Message) => {
    const c = codecOf(m, 's2c');
    if (!c) return m.payload.toString('hex');
    return JSON.stringify(c.dec(new XdrReader(m.payload)), (_k, v: unknown) =>
      typeof v === 'bigint' || typeof v === 'number' ? 'N' : typeof v === 'string' ? v.replace(/\d+(\.\d+)?/g, 'N') : v);
  };
  for (const [i, e] of r.expected.entries()) assert.equal(mask(r.actual[i]!), mask(e), `${name}: frame ${i} (${describeFrame(e)})`);
}

function maskLen(s: string): string {
  return s.replace(/\/\d+$/, '/L');
}

/** The stream part of a download: data runs merged (packetization may differ), holes as they are. */
function streamShape(frames: Message[], serial: number): Array<[string, number]> {
  const out: Array<[string, number]> = [];
  for (const f of frames) {
    if (f.serial !== serial || (f.type !== MessageType.STREAM && f.type !== MessageType.STREAM_HOLE)) continue;
    if (f.type === MessageType.STREAM_HOLE) out.push(['hole', Number(f.payload.readBigInt64BE(0))]);
    else if (f.status === Status.CONTINUE && f.payload.length > 0) {
      const last = out[out.length - 1];
      if (last?.[0] === 'data') last[1] += f.payload.length;
      else out.push(['data', f.payload.length]);
    } else out.push([['OK', 'ERROR', 'EOF'][f.status]!, f.payload.length]);
  }
  return out;
}

function streamBytes(frames: Message[], serial: number): Buffer {
  const parts: Buffer[] = [];
  for (const f of frames) {
    if (f.serial !== serial) continue;
    if (f.type === MessageType.STREAM_HOLE) parts.push(Buffer.alloc(Number(f.payload.readBigInt64BE(0))));
    else if (f.type === MessageType.STREAM && f.status === Status.CONTINUE) parts.push(f.payload);
  }
  return Buffer.concat(parts);
}

// ------------------------------------------------------------------ the suite

describe('sparsevirtd answers the libvirt 9.0 captures as libvirtd does', () => {
  let d: TestDaemon;
  let anchor: string;
  let proto: string;
  let subst: (s: string) => string;

  before(async () => {
    d = await startTestDaemon();
    anchor = path.join(d.dir, 'vpools');
    proto = path.join(d.dir, 'pooldir');
    subst = (s) => s.replaceAll('/srv/vpools', anchor).replaceAll('/var/lib/sv-capture/pooldir', proto);
    const c = await RawClient.connect(d.socket);
    await c.handshake();
    for (const [name, uuid, dir] of [['anchor', ANCHOR_UUID, anchor], ['protopool', PROTOPOOL_UUID, proto]] as const) {
      const xml = `<pool type='dir'><name>${name}</name><uuid>${uuid}</uuid><target><path>${dir}</path></target></pool>`;
      const r = await c.call(P.STORAGE_POOL_DEFINE_XML, { xml, flags: 0 });
      assert.equal(r.status, Status.OK, describeFrame(r));
    }
    const anchorRef = { name: 'anchor', uuid: Buffer.from(ANCHOR_UUID.replace(/-/g, ''), 'hex') };
    assert.equal((await c.call(P.STORAGE_POOL_CREATE, { pool: anchorRef, flags: 1 })).status, Status.OK);
    c.close();
  });
  after(async () => {
    await d?.stop();
  });

  async function resetVolume(name: string, size: number, capture = false): Promise<string> {
    const p = path.join(anchor, name);
    await fsp.rm(p, { force: true });
    if (capture) await makeCaptureSource(p);
    else {
      await fsp.writeFile(p, '');
      await fsp.truncate(p, size);
    }
    await fsp.chmod(p, 0o600);
    return p;
  }

  for (const name of ['handshake', 'hostname', 'raw-unknown-proc', 'raw-before-open', 'raw-bad-prog', 'raw-bad-vers', 'error-missing-pool', 'error-missing-vol', 'vol-info-noname']) {
    test(`${name}: byte-identical`, async () => {
      let s = subst;
      if (name === 'hostname') {
        const os = await import('node:os');
        s = (x) => (x === 'vm' ? os.hostname() : subst(x));
      }
      const r = await replay(name, d.socket, s);
      assertExact(r, name);
      r.client.close();
    });
  }

  test('raw-bad-flags and vol-info-physical: byte-identical', async () => {
    await resetVolume('proto-up2.img', MiB);
    await resetVolume('proto-sparse.img', 0, true);
    for (const name of ['raw-bad-flags', 'vol-info-physical']) {
      const r = await replay(name, d.socket, subst);
      assertExact(r, name);
      r.client.close();
    }
  });

  test('uploads (sparse, plain, zero-length packet, abort, past length, past the end): byte-identical, and the volume is right', async () => {
    let vol = await resetVolume('proto-sparse.img', 4 * MiB);
    let r = await replay('upload-sparse', d.socket, subst);
    assertExact(r, 'upload-sparse');
    r.client.close();
    assert.equal(await sha256File(vol), CAPTURE_SHA);
    assert.deepEqual(await layoutOf(vol), CAPTURE_LAYOUT);

    vol = await resetVolume('proto-up2.img', MiB);
    r = await replay('upload-plain', d.socket, subst);
    assertExact(r, 'upload-plain');
    r.client.close();
    const sent = Buffer.concat(parseBin(path.join(FIXTURES, 'upload-plain.client-to-server.bin')).filter((m) => m.type === MessageType.STREAM && m.status === Status.CONTINUE).map((m) => m.payload));
    assert.equal(sent.length, 700000);
    const onDisk = await fsp.readFile(vol);
    assert.equal(onDisk.length, MiB, 'not truncated to the upload');
    assert.ok(onDisk.subarray(0, 700000).equals(sent));

    for (const name of ['raw-zero-data', 'upload-abort-readerr', 'upload-length-exceeded', 'upload-sparse-length-exceeded']) {
      await resetVolume('proto-up2.img', MiB);
      r = await replay(name, d.socket, subst);
      assertExact(r, name);
      r.client.close();
      assert.equal(fs.statSync(vol).size, MiB, `${name}: volume size unchanged`);
    }

    // an upload that starts past the end grows the file, as libvirt's: the same wire, 64 KiB at 2 MiB
    await resetVolume('proto-up2.img', MiB);
    r = await replay('upload-beyond-capacity', d.socket, subst);
    assertExact(r, 'upload-beyond-capacity');
    r.client.close();
    assert.equal(fs.statSync(vol).size, 2 * MiB + 65536, 'grown to the end of the upload (libvirtd: 2162688)');
    const grown = await fsp.readFile(vol);
    assert.ok(grown.subarray(MiB, 2 * MiB).equals(Buffer.alloc(MiB)), 'the gap reads as zeros');
  });

  test('upload-sparse-offset-truncates: same wire, but the volume is not truncated and the hole reads as zeros (libvirt-quirks upload-holes-truncate)', async () => {
    const vol = await resetVolume('proto-up3.img', 4 * MiB);
    await fsp.writeFile(vol, Buffer.alloc(4 * MiB, 0xaa));
    const r = await replay('upload-sparse-offset-truncates', d.socket, subst);
    assertExact(r, 'upload-sparse-offset-truncates');
    r.client.close();
    const data = await fsp.readFile(vol);
    assert.equal(data.length, 4 * MiB);
    const sentData = parseBin(path.join(FIXTURES, 'upload-sparse-offset-truncates.client-to-server.bin')).find((m) => m.type === MessageType.STREAM && m.status === Status.CONTINUE)!.payload;
    assert.ok(data.subarray(0, MiB).every((b) => b === 0xaa), 'before the offset: untouched');
    assert.ok(data.subarray(MiB, MiB + 65536).every((b) => b === 0), 'the hole reads as zeros');
    assert.ok(data.subarray(MiB + 65536, MiB + 131072).equals(sentData));
    assert.ok(data.subarray(MiB + 131072).every((b) => b === 0xaa), 'after the range: untouched');
  });

  test('downloads: same data and holes as libvirtd (data packets ≤ 262120, no 24-byte runts)', async () => {
    await resetVolume('proto-sparse.img', 0, true);
    const source = await fsp.readFile(path.join(anchor, 'proto-sparse.img'));
    for (const name of ['download-sparse', 'download-sparse-offset', 'download-plain-offset', 'download-past-end-sparse', 'download-beyond-eof-plain']) {
      const r = await replay(name, d.socket, subst, { done: streamConfirmed });
      const serial = r.expected.find((m) => m.proc === 209)!.serial;
      assert.deepEqual(streamShape(r.actual, serial), streamShape(r.expected, serial), `${name}: stream shape`);
      assert.ok(streamBytes(r.actual, serial).equals(streamBytes(r.expected, serial)), `${name}: stream bytes`);
      const holeFrames = (frames: Message[]) => frames.filter((f) => f.serial === serial && f.type === MessageType.STREAM_HOLE).map(frameBytes);
      assert.deepEqual(holeFrames(r.actual), holeFrames(r.expected), `${name}: hole frames, byte for byte`);
      for (const f of r.actual) if (f.type === MessageType.STREAM) assert.ok(f.payload.length <= 262120);
      assert.deepEqual(r.actual.filter((f) => f.proc !== 209).map(frameBytes), r.expected.filter((f) => f.proc !== 209).map(frameBytes), `${name}: the other frames`);
      r.client.close();
    }
    assert.equal(createHash('sha256').update(source).digest('hex'), CAPTURE_SHA);
  });

  test('download-beyond-eof-sparse: an empty stream instead of two STREAM/ERRORs (libvirt-quirks download-past-end-fails)', async () => {
    await resetVolume('proto-sparse.img', 0, true);
    const r = await replay('download-beyond-eof-sparse', d.socket, subst, { done: (f) => f.some(isEof) });
    const serial = r.expected.find((m) => m.proc === 209)!.serial;
    assert.deepEqual(streamShape(r.expected, serial), [['ERROR', 104], ['ERROR', 108]], 'what libvirtd did');
    assert.deepEqual(streamShape(r.actual, serial), [['EOF', 0]]);
    // finish like virsh would after EOF: confirmed
    r.client.send({ proc: 209, type: MessageType.STREAM, serial, status: Status.OK });
    await r.client.waitFor((f) => f.proc === 209 && f.type === MessageType.STREAM && f.status === Status.OK);
    r.client.close();
  });

  test('client finish and abort during a download are confirmed with STREAM/OK', async () => {
    await resetVolume('proto-sparse.img', 0, true);
    for (const name of ['raw-finish-early-download', 'download-abort-devfull']) {
      const r = await replay(name, d.socket, subst, { done: streamConfirmed });
      const serial = r.expected.find((m) => m.proc === 209)!.serial;
      const last = r.actual.filter((f) => f.serial === serial && f.proc === 209).at(-1)!;
      assert.equal(describeFrame(last), `209/STREAM/${serial}/OK/0`, `${name}: ends with the confirmation`);
      const sent = streamBytes(r.actual, serial);
      const source = await fsp.readFile(path.join(anchor, 'proto-sparse.img'));
      assert.ok(source.subarray(0, sent.length).equals(sent), `${name}: what was sent is a prefix of the volume`);
      r.client.close();
    }
  });

  test('invalid holes get a STREAM/ERROR with a real message, and the connection stays usable (libvirt-quirks hole-errors-as-reply, hole-on-plain-stream-drops-connection)', async () => {
    for (const [name, pattern] of [['raw-hole-flags', /flags/], ['raw-hole-negative', /invalid length/], ['raw-hole-nonsparse', /not opened with the sparse flag/]] as const) {
      await resetVolume('proto-up2.img', MiB);
      const r = await replay(name, d.socket, subst);
      const upload = r.actual.filter((f) => f.proc === 208);
      assert.deepEqual(upload.map(describeFrame).map(maskLen), ['208/REPLY/2/OK/L', '208/STREAM/2/ERROR/L'], name);
      const err = errorOf(upload[1]!);
      assert.match(err.message, pattern);
      assert.notEqual(err.message, 'Library function returned error but did not set virError');
      assert.equal(r.client.isClosed, false, `${name}: connection still open`);
      const again = await r.client.call(P.CONNECT_GET_LIB_VERSION, undefined);
      assert.equal(again.status, Status.OK);
      r.client.close();
    }
  });

  test('protopool and proto-a.img commands: same answers as libvirtd', async () => {
    // (pool-define-as is replaced by defining protopool with the capture's UUID in before())
    const steps: Array<[string, 'exact' | 'shape']> = [
      ['pool-build', 'exact'], ['pool-start', 'exact'], ['pool-info', 'shape'], ['pool-dumpxml', 'shape'], ['pool-refresh', 'exact'],
      ['vol-create-as', 'exact'], ['vol-list-details', 'shape'], ['vol-info', 'shape'], ['vol-path', 'exact'], ['vol-info-bypath', 'shape'],
      ['vol-dumpxml', 'shape'], ['vol-resize', 'exact'], ['vol-wipe', 'exact'], ['vol-delete', 'exact'], ['pool-destroy', 'exact'], ['pool-undefine', 'exact'],
    ];
    for (const [name, how] of steps) {
      const r = await replay(name, d.socket, subst);
      if (how === 'exact') assertExact(r, name);
      else assertShape(r, name);
      r.client.close();
    }
  });
});

describe('sparsevirtd protocol misuse (hand-written frames)', () => {
  let d: TestDaemon;
  let pool: string;
  let poolRef: { name: string; uuid: Buffer };

  before(async () => {
    d = await startTestDaemon();
    pool = path.join(d.dir, 'pool');
    const c = await RawClient.connect(d.socket);
    await c.handshake();
    const r = await c.call(P.STORAGE_POOL_DEFINE_XML, { xml: `<pool type='dir'><name>p</name><target><path>${pool}</path></target></pool>`, flags: 0 });
    poolRef = P.STORAGE_POOL_DEFINE_XML.ret.dec(new XdrReader(r.payload)).pool;
    assert.equal((await c.call(P.STORAGE_POOL_CREATE, { pool: poolRef, flags: 1 })).status, Status.OK);
    c.close();
    await makeCaptureSource(path.join(pool, 'src.img'));
    await fsp.writeFile(path.join(pool, 'up.img'), '');
    await fsp.truncate(path.join(pool, 'up.img'), MiB);
  });
  after(async () => {
    await d?.stop();
  });

  const vol = (name: string) => ({ pool: 'p', name, key: '' });

  async function openClient(): Promise<RawClient> {
    const c = await RawClient.connect(d.socket);
    await c.handshake();
    return c;
  }

  test('a frame shorter than 28 or longer than the limit drops that connection only', async () => {
    for (const len of [27, 0, 33554437, 0xffffffff]) {
      const bad = await RawClient.connect(d.socket);
      const good = await openClient();
      const head = Buffer.alloc(28);
      head.writeUInt32BE(len, 0);
      bad.write(head);
      await bad.closed;
      assert.equal(good.isClosed, false);
      assert.equal((await good.call(P.CONNECT_GET_LIB_VERSION, undefined)).status, Status.OK, `after length ${len}`);
      good.close();
    }
  });

  test('a frame of exactly the limit is accepted (trailing bytes ignored)', async () => {
    const c = await openClient();
    const serial = c.nextSerial();
    c.send({ proc: P.CONNECT_GET_LIB_VERSION.num, serial }, Buffer.alloc(33554436 - 28));
    const r = await c.waitFor((f) => f.serial === serial && f.type === MessageType.REPLY, 15000);
    assert.equal(r.status, Status.OK);
    c.close();
  });

  test('undecodable arguments, a bad status, a REPLY from the client: errors, connection kept', async () => {
    const c = await openClient();
    let s = c.nextSerial();
    c.send({ proc: P.STORAGE_POOL_LOOKUP_BY_NAME.num, serial: s }, Buffer.from([0, 0, 0, 99]));
    let r = await c.waitFor((f) => f.serial === s);
    assert.equal(errorOf(r).message, 'Unable to decode message payload');
    assert.equal(errorOf(r).virCode, 39);
    s = c.nextSerial();
    c.send({ proc: P.CONNECT_GET_URI.num, serial: s, status: Status.CONTINUE });
    r = await c.waitFor((f) => f.serial === s);
    assert.match(errorOf(r).message, /Unexpected message status 2/);
    s = c.nextSerial();
    c.send({ proc: P.CONNECT_GET_URI.num, serial: s, type: MessageType.REPLY });
    r = await c.waitFor((f) => f.serial === s);
    assert.match(errorOf(r).message, /Unexpected message type 1/);
    const ok = await c.call(P.CONNECT_GET_URI, undefined);
    assert.equal(P.CONNECT_GET_URI.ret.dec(new XdrReader(ok.payload)).uri, 'sparsevirt:///system');
    c.close();
  });

  test('a stream packet for a serial with no stream gets a clear STREAM/ERROR, once', async () => {
    const c = await openClient();
    c.send({ proc: 208, serial: 4242, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(100));
    c.send({ proc: 208, serial: 4242, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(100));
    const e = await c.waitFor((f) => f.serial === 4242);
    assert.equal(e.type, MessageType.STREAM);
    assert.equal(e.status, Status.ERROR);
    assert.match(errorOf(e).message, /no stream is open for procedure 208 serial 4242/);
    assert.equal((await c.call(P.CONNECT_GET_LIB_VERSION, undefined)).status, Status.OK);
    assert.equal(c.frames.filter((f) => f.serial === 4242).length, 1);
    c.close();
  });

  test('bad flags on upload and download: libvirt error 8 before anything opens', async () => {
    const c = await openClient();
    for (const [proc, fn] of [[P.STORAGE_VOL_UPLOAD, 'storageVolUpload'], [P.STORAGE_VOL_DOWNLOAD, 'storageVolDownload']] as const) {
      const r = await c.call(proc, { vol: vol('up.img'), offset: 0n, length: 0n, flags: 2 });
      assert.deepEqual(remoteErrorCodec.dec(new XdrReader(r.payload)), {
        code: 8, domain: 18, message: `unsupported flags (0x2) in function ${fn}`, level: 2, str1: fn, str2: 'flags', str3: null, int1: 0, int2: 0,
      });
    }
    c.close();
  });

  test('download with length 2^64−1 (virsh --length -1) is the whole volume; offset 2^64−1 is an empty stream', async () => {
    const c = await openClient();
    for (const [offset, length, want] of [[0n, (1n << 64n) - 1n, 4 * MiB], [(1n << 64n) - 1n, 0n, 0], [1n << 60n, 5n, 0]] as const) {
      const s = c.nextSerial();
      const r = await c.call(P.STORAGE_VOL_DOWNLOAD, { vol: vol('src.img'), offset, length, flags: 1 }, s);
      assert.equal(r.status, Status.OK);
      const eof = await c.waitFor((f) => f.serial === s && isEof(f));
      assert.ok(eof);
      const got = streamBytes(c.frames, s);
      assert.equal(got.length, want);
      c.send({ proc: 209, serial: s, type: MessageType.STREAM, status: Status.OK });
      await c.waitFor((f) => f.serial === s && f.type === MessageType.STREAM && f.status === Status.OK);
    }
    c.close();
  });

  test('a hole frame that is too short or a hole past the length limit', async () => {
    const c = await openClient();
    let s = c.nextSerial();
    assert.equal((await c.call(P.STORAGE_VOL_UPLOAD, { vol: vol('up.img'), offset: 0n, length: 0n, flags: 1 }, s)).status, Status.OK);
    c.send({ proc: 208, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, Buffer.alloc(4));
    let e = await c.waitFor((f) => f.serial === s && f.type === MessageType.STREAM && f.status === Status.ERROR);
    assert.match(errorOf(e).message, /malformed stream hole/);
    // holes are clipped to the length, data past it is refused
    s = c.nextSerial();
    assert.equal((await c.call(P.STORAGE_VOL_UPLOAD, { vol: vol('up.img'), offset: 0n, length: 4096n, flags: 1 }, s)).status, Status.OK);
    const hole = new XdrWriter(12).hyper(1n << 40n).uint(0).view();
    c.send({ proc: 208, serial: s, type: MessageType.STREAM_HOLE, status: Status.CONTINUE }, Buffer.from(hole));
    c.send({ proc: 208, serial: s, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(1, 1));
    e = await c.waitFor((f) => f.serial === s && f.type === MessageType.STREAM && f.status === Status.ERROR);
    assert.equal(errorOf(e).message, 'cannot write to stream: No space left on device');
    assert.equal(fs.statSync(path.join(pool, 'up.img')).size, MiB);
    c.close();
  });

  test('names that try to leave the pool are refused and nothing is created outside', async () => {
    const c = await openClient();
    const outside = path.join(d.dir, 'outside');
    await fsp.mkdir(outside);
    // a real file where the name leads: without the name check, the lookups and transfers would find it
    const target = path.join(outside, 'x.img');
    await fsp.writeFile(target, Buffer.alloc(8192, 0x5a));
    assert.equal(path.join(pool, '../outside/x.img'), target);
    for (const name of ['../outside/x.img', 'a/b', 'a\0b', '', '..', '.']) {
      const lookup = await c.call(P.STORAGE_VOL_LOOKUP_BY_NAME, { pool: poolRef, name });
      assert.equal(lookup.status, Status.ERROR, `lookup '${name}' found a volume`);
      assert.equal(errorOf(lookup).virCode, 50, `lookup '${name}'`);
      for (const proc of [P.STORAGE_VOL_UPLOAD, P.STORAGE_VOL_DOWNLOAD]) {
        const r = await c.call(proc, { vol: vol(name), offset: 0n, length: 0n, flags: 0 });
        assert.equal(r.status, Status.ERROR, `${proc.name} '${name}'`);
        assert.equal(errorOf(r).virCode, 50, `${proc.name} '${name}': ${errorOf(r).message}`);
      }
      const created = name === '../outside/x.img' ? '../outside/new.img' : name;
      const xml = `<volume><name>${created.replace('\0', '&#0;')}</name><capacity>1</capacity></volume>`;
      const cr = await c.call(P.STORAGE_VOL_CREATE_XML, { pool: poolRef, xml, flags: 0 });
      assert.equal(cr.status, Status.ERROR, `create '${created}'`);
    }
    const nul = await c.call(P.STORAGE_VOL_CREATE_XML, { pool: poolRef, xml: '<volume><name>a\u0000b</name><capacity>1</capacity></volume>', flags: 0 });
    assert.equal(nul.status, Status.ERROR);
    assert.equal(errorOf(await c.call(P.STORAGE_VOL_LOOKUP_BY_PATH, { path: `${pool}/../outside/x.img` })).virCode, 50);
    assert.equal(errorOf(await c.call(P.STORAGE_VOL_LOOKUP_BY_KEY, { key: `${outside}/x.img` })).virCode, 50);
    assert.equal(errorOf(await c.call(P.STORAGE_VOL_LOOKUP_BY_KEY, { key: `${pool}/../outside/x.img` })).virCode, 50);
    assert.deepEqual(await fsp.readdir(outside), ['x.img'], 'nothing created outside');
    assert.deepEqual(await fsp.readFile(target), Buffer.alloc(8192, 0x5a), 'the file outside is untouched');
    c.close();
  });

  test('a 4 MiB volume name is answered with an error, not a crash', async () => {
    const c = await openClient();
    const r = await c.call(P.STORAGE_VOL_LOOKUP_BY_NAME, { pool: poolRef, name: 'x'.repeat(4194304) }, undefined);
    assert.equal(r.status, Status.ERROR);
    assert.equal(errorOf(r).virCode, 50);
    assert.ok(errorOf(r).message.length < 70000);
    assert.equal((await c.call(P.CONNECT_GET_LIB_VERSION, undefined)).status, Status.OK);
    c.close();
  });

  test('keepalive: PING answered with PONG; after feature 10 the daemon pings an idle client', async () => {
    const k = await startTestDaemon({ keepaliveInterval: 1 });
    try {
      const c = await RawClient.connect(k.socket);
      const ping = buildFrame({ prog: KEEPALIVE_PROGRAM, vers: 1, proc: 1, type: MessageType.MESSAGE, serial: 0, status: Status.OK });
      c.write(ping);
      await c.waitFor((f) => isKeepalive(f) && f.proc === 2);
      await new Promise((r) => setTimeout(r, 1500));
      assert.ok(!c.frames.some((f) => isKeepalive(f) && f.proc === 1), 'no ping before feature 10');
      const r = await c.call(P.CONNECT_SUPPORTS_FEATURE, { feature: 10 });
      assert.equal(P.CONNECT_SUPPORTS_FEATURE.ret.dec(new XdrReader(r.payload)).supported, 1);
      await c.waitFor((f) => isKeepalive(f) && f.proc === 1, 4000);
      c.close();
    } finally {
      await k.stop();
    }
  });

  test('a client sending garbage after a valid frame is dropped; the daemon keeps serving', async () => {
    const c = await RawClient.connect(d.socket);
    c.write(Buffer.concat([buildFrame({ prog: REMOTE_PROGRAM, vers: 1, proc: 66, type: 0, serial: 0, status: 0 }), Buffer.from('GET / HTTP/1.1\r\n\r\n')]));
    await c.closed;
    const other = await openClient();
    assert.equal((await other.call(P.CONNECT_GET_LIB_VERSION, undefined)).status, Status.OK);
    other.close();
    const sock = net.createConnection({ path: d.socket });
    await new Promise((r) => sock.once('connect', r));
    sock.destroy();
    void encode;
  });
});
