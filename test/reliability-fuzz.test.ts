/**
 * Bad input (CI short form of test/long/fuzz.ts):
 *  - sparsevirtd under frame and XDR fuzzing (random bytes; the libvirt 9.0 captures and one
 *    call of every procedure, mutated in lengths, counts, string sizes, types, statuses,
 *    serials, hole lengths and flags): it answers or drops that one connection, never dies,
 *    stays within its memory bound, and serves a normal `virsh vol-download --sparse` right after;
 *  - the client against a hostile server that mutates its replies and stream packets: clear
 *    (coded) errors, every wait bounded by keepalive or the caller's timeout, no crash.
 *
 * Reproduce a failure with its seed: SPARSEVIRT_FUZZ_SEED=N (also the long form's --seed).
 */
import assert from 'node:assert/strict';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { connect } from '../src/client/index.js';
import { kPeer } from '../src/client/connection.js';
import { SparsevirtError } from '../src/errors.js';
import { FRAME_MAX, KEEPALIVE_PROGRAM, MessageType, Status, buildFrame } from '../src/rpc/message.js';
import { FrameParser } from '../src/rpc/parser.js';
import { P } from '../src/protocol/remote.js';
import { encode, type Codec } from '../src/xdr/index.js';
import { fuzzClient, fuzzDaemon, virshAvailable } from './long/fuzz.js';
import { scratchDir } from './helpers/images.js';
import { MiB } from './long/harness.js';

const SEED = Number(process.env.SPARSEVIRT_FUZZ_SEED ?? 6001);
const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;

test('daemon fuzz: 20,000 mutated frames, every connection answered or dropped alone, bounded memory, then virsh vol-download --sparse works', async (t) => {
  const hasVirsh = await virshAvailable();
  if (!hasVirsh && process.env.CI) throw new Error('virsh is required in CI');
  const connections = 4;
  const r = await fuzzDaemon({ mutatedFrames: 20000, connections, seed: SEED, virsh: hasVirsh });
  const s = r.stats;
  t.diagnostic(`seed ${r.seed}: ${s.frames} frames (${s.mutated} mutated) in ${s.ms} ms = ${r.framesPerSecond} frames/s; ` +
    `${s.connections} batches (${s.sentinelOk} answered, ${s.droppedAsExpected} dropped on framing, ${s.abandoned} abandoned), ${s.junkConnections} random-byte connections; ` +
    `daemon rss ${mib(r.rssBefore.rss)} -> ${r.rssAfter ? mib(r.rssAfter.rss) : 'n/a'}, peak ${r.rssAfter ? mib(r.rssAfter.hwm) : 'n/a'}; virsh: ${r.virsh ? r.virsh.detail : 'skipped'}`);
  for (const x of s.samples.slice(0, 5)) t.diagnostic(x);
  assert.ok(r.daemonAlive, 'the daemon is alive');
  assert.deepEqual(r.daemonErrors, [], 'no error or stray rejection in the daemon log');
  assert.ok(s.mutated >= 20000);
  assert.equal(s.unexpectedDrops, 0, `connections with intact framing dropped: ${s.samples.join('\n')}`);
  assert.equal(s.stalls, 0, `batches never answered: ${s.samples.join('\n')}`);
  assert.equal(s.notDropped, 0, 'a connection whose framing broke must be dropped');
  assert.equal(s.daemonGarbage, 0, 'every frame the daemon sends parses');
  // both oracles were exercised, and every kind of mutation ran
  assert.ok(s.sentinelOk > 10 && s.droppedAsExpected > 10 && s.junkConnections > 0, JSON.stringify(s));
  for (const m of ['xdr-len', 'xdr-count', 'xdr-string', 'type', 'status', 'serial', 'hole', 'len-lie', 'len-break', 'random-frame', 'repeat-call', 'inject-stream']) {
    assert.ok((s.byMutation[m] ?? 0) > 0, `mutation ${m} ran`);
  }
  // one message never costs more than the frame limit: even with every connection holding a
  // frame of the largest size at once, the daemon stays under that bound
  assert.ok(r.rssAfter, 'rss measured');
  assert.ok(r.rssAfter!.hwm < r.rssBefore.rss + connections * FRAME_MAX + 96 * MiB, `peak rss ${mib(r.rssAfter!.hwm)}`);
  if (hasVirsh) assert.ok(r.virsh?.ok, `virsh vol-download --sparse after the fuzz: ${r.virsh?.detail}`);
});

test('client against a hostile server: coded errors, every wait bounded by keepalive or the caller\'s timeout, no crash', async (t) => {
  const dir = await scratchDir();
  try {
    const opTimeoutMs = 1000;
    const ka = { keepaliveInterval: 0.2, keepaliveCount: 2 };
    const s = await fuzzClient({ runs: 48, seed: SEED, dir, opTimeoutMs, ...ka });
    t.diagnostic(`${s.runs} client runs, ${s.ops} operations in ${s.ms} ms: ${s.ok} ok, errors ${JSON.stringify(s.errorsByCode)}; ` +
      `server sent ${s.server.framesOut} frames, ${s.server.mutatedOut} mutated; slowest ${JSON.stringify(s.maxMs)}`);
    assert.deepEqual(s.unhandled, [], 'no unhandled rejection or uncaught exception');
    assert.deepEqual(s.hangs, [], 'every operation settled within its bound');
    assert.deepEqual(s.unclear, [], 'every failure is a coded error with a message');
    // A server that stops answering (silent, or no longer reading) is detected by keepalive:
    // interval × (count + 1) = 600 ms, whatever the operation was waiting for. (connect is
    // bounded by its signal: keepalive starts once the handshake is done.)
    const window = ka.keepaliveInterval * 1000 * (ka.keepaliveCount + 1);
    for (const mode of ['silent', 'stop-reading']) {
      for (const op of ['call', 'download', 'upload']) {
        const ms = s.maxMs[`${mode}:${op}`] ?? 0;
        assert.ok(ms <= window + 400, `${mode} ${op}: settled after ${ms} ms (keepalive window ${window} ms)`);
      }
    }
    for (const op of ['call', 'download', 'upload']) assert.ok((s.maxMs[`close:${op}`] ?? 0) < 500, `close ${op}`);
    assert.ok((s.errorsByCode.ERR_KEEPALIVE_TIMEOUT ?? 0) > 0 && (s.errorsByCode.ERR_PROTOCOL ?? 0) > 0 && s.ok > 0, JSON.stringify(s.errorsByCode));
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

test('a reply with a serial nobody asked for ends the connection, as libvirt\'s client does, instead of leaving a call waiting forever; a late reply to a call given up is ignored', { timeout: 20000 }, async () => {
  const dir = await scratchDir();
  const socket = path.join(dir, 'odd.sock');
  let lateMs = 0;
  let wrongSerial = false;
  const server = net.createServer((sock) => {
    const parser = new FrameParser();
    sock.on('error', () => undefined);
    sock.on('data', (b: Buffer) => parser.push(b, (m) => {
      if ((m.prog >>> 0) === KEEPALIVE_PROGRAM) {
        if (m.proc === 1) sock.write(buildFrame({ prog: KEEPALIVE_PROGRAM, vers: 1, proc: 2, type: MessageType.MESSAGE, serial: 0, status: Status.OK }));
        return;
      }
      const reply = <R>(ret: Codec<R>, v: R, serial = m.serial) => sock.write(buildFrame({ ...m, serial, type: MessageType.REPLY, status: Status.OK }, encode(ret, v)));
      if (m.proc === P.AUTH_LIST.num) reply(P.AUTH_LIST.ret, { types: [0] });
      else if (m.proc === P.CONNECT_SUPPORTS_FEATURE.num) reply(P.CONNECT_SUPPORTS_FEATURE.ret, { supported: 1 });
      else if (m.proc === P.CONNECT_GET_LIB_VERSION.num) {
        const send = () => reply(P.CONNECT_GET_LIB_VERSION.ret, { libVer: 9000000n }, wrongSerial ? m.serial + 1000 : m.serial);
        if (lateMs) setTimeout(send, lateMs);
        else send();
      } else reply(P.CONNECT_CLOSE.ret, undefined);
    }));
  });
  await new Promise<void>((r) => server.listen(socket, r));
  try {
    const uri = `sparsevirt+unix:///system?socket=${socket}`;
    // a stray serial: the pending call fails at once with a protocol error, although the server
    // answers keepalive and would never answer that call
    wrongSerial = true;
    const c1 = await connect(uri, { keepaliveInterval: 0.2, keepaliveCount: 2 });
    const t0 = Date.now();
    const err = await c1.getLibVersion().then(() => null, (e: unknown) => e);
    assert.ok(err instanceof SparsevirtError && err.code === 'ERR_PROTOCOL', String(err));
    assert.match(err.message, /reply without a pending call/);
    assert.ok(Date.now() - t0 < 500);
    assert.ok(c1[kPeer].closed);
    // a call given up by its caller: the late reply is dropped, the connection lives on
    wrongSerial = false;
    lateMs = 300;
    const c2 = await connect(uri);
    const late = await c2[kPeer].call(P.CONNECT_GET_LIB_VERSION, undefined, { timeout: 100 }).then(() => null, (e: unknown) => e);
    assert.ok(late instanceof SparsevirtError && late.code === 'ERR_TIMEOUT', String(late));
    await new Promise((r) => setTimeout(r, 400));
    assert.ok(!c2[kPeer].closed, 'the late reply did not end the connection');
    lateMs = 0;
    assert.equal(await c2.getLibVersion(), 9000000);
    await c2.close();
  } finally {
    await new Promise((r) => server.close(r));
    await fsp.rm(dir, { recursive: true, force: true });
  }
});
