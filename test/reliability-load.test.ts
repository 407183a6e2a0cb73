/**
 * Load (CI short form of test/long/soak.ts):
 *  - 64 concurrent transfers (32 sparse uploads, 32 sparse downloads, 64 volumes) through one
 *    daemon from 4 client processes: every result byte-identical, the daemon's RSS bounded, no
 *    stream starved (when the first transfer ends, every other one is well under way);
 *  - one slow reader (64 KiB/s) does not slow the others and does not grow the daemon's memory;
 *  - a slow reader is not mistaken for a dead one by keepalive: neither our client (which pings
 *    while it holds the socket paused) nor a raw reader that never pings (its reading is seen).
 */
import assert from 'node:assert/strict';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { connect, type StoragePool } from '../src/client/index.js';
import { MessageType, REMOTE_PROGRAM, Status, buildFrame, KEEPALIVE_PROGRAM } from '../src/rpc/message.js';
import { FrameParser } from '../src/rpc/parser.js';
import { P } from '../src/protocol/remote.js';
import { encode } from '../src/xdr/index.js';
import { startTestDaemon } from './helpers/daemon.js';
import { makeFilledFile, makeImage, scratchDir } from './helpers/images.js';
import { MiB, sleep, spawnDaemon, startWorker, waitUntil, type ChildDaemon, type TransferReport, type WorkerTransfer } from './long/harness.js';
import { layoutFor, prepareLoad, runRound } from './long/soak.js';

const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;

describe('load', () => {
  let dir: string;
  let d: ChildDaemon;
  let pool: StoragePool;
  let poolDir: string;

  before(async () => {
    dir = await scratchDir();
    d = await spawnDaemon({ dir, logLevel: 'warn' });
    poolDir = path.join(dir, 'pool');
    const conn = await connect(d.uri);
    pool = await conn.storagePoolDefineDir('load', poolDir);
    await pool.build();
    await pool.create();
  });
  after(async () => {
    await pool?.conn.close();
    await d?.stop();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('64 concurrent transfers from 4 client processes: byte-identical results, bounded daemon memory, no stream starved', async (t) => {
    const N = 64;
    const set = await prepareLoad(pool, poolDir, dir, N);
    const base = d.mem();
    const r = await runRound(d, set, 4);
    const mem = d.mem();
    t.diagnostic(`${N} transfers, ${mib(set.dataBytes)} of data in ${r.ms} ms (${mib(set.dataBytes / (r.ms / 1000))}/s); ` +
      `slowest stream at ${(r.minRateRatio * 100).toFixed(0)}% of the median rate; first done after ${r.firstEndMs} ms, when the least advanced had ${(r.slowestAtFirstEnd * 100).toFixed(0)}% done; ` +
      `time to first byte max ${r.maxTimeToFirstByte} ms; daemon rss ${mib(base.rss)} before, peak ${mib(Math.max(mem.hwm, r.peakRss))}, after ${mib(mem.rss)}`);
    assert.deepEqual(r.failures, []);
    assert.equal(r.reports.length, N);
    assert.deepEqual(r.mismatches, [], 'byte-identical');
    assert.deepEqual(r.notSparse, [], 'holes stayed holes');
    // no stream starved: every one moved at a fair share of the median rate once it started, and started at once
    assert.ok(r.minRateRatio >= 0.1, `a stream was starved: its rate was ${(r.minRateRatio * 100).toFixed(1)}% of the median`);
    assert.ok(r.maxTimeToFirstByte < 3000, 'every stream started moving at once');
    // bounded: per stream at most the upload window (4 MiB) or the send window (1 MiB) plus a read-ahead
    assert.ok(mem.hwm < base.rss + N * 5 * MiB, `daemon peak rss ${mib(mem.hwm)}`);
    assert.ok(d.alive());
    assert.deepEqual(d.errors(), []);
    for (const tr of set.transfers) await fsp.rm(tr.file, { force: true });
  });

  test('one slow reader (64 KiB/s) does not slow the others and does not grow the daemon\'s memory', async (t) => {
    // 128 MiB: a daemon that buffered what the reader does not take would grow by far more than
    // the 32 MiB allowed below, which only leaves room for the other transfers' garbage
    const slowVol = await pool.createVol({ name: 'slow.img', capacity: 128 * MiB, allocation: 0 });
    await makeFilledFile(path.join(poolDir, 'slow.img'), 128 * MiB, 7);
    const work = path.join(dir, 'slow');
    await fsp.mkdir(work);
    const transfers: WorkerTransfer[] = [];
    for (let i = 0; i < 8; i++) {
      const name = `o${i}.img`;
      const layout = layoutFor(i);
      await pool.createVol({ name, capacity: layout.reduce((n, p) => n + p.length, 0), allocation: 0 });
      if (i % 2 === 0) {
        await makeImage(path.join(work, name), layout, 300 + i);
        transfers.push({ kind: 'upload', pool: 'load', vol: name, file: path.join(work, name) });
      } else {
        await makeImage(path.join(poolDir, name), layout, 300 + i);
        transfers.push({ kind: 'download', pool: 'load', vol: name, file: path.join(work, `${name}.out`) });
      }
    }
    const batch = async (): Promise<number> => {
      const w = startWorker({ op: 'batch', uri: d.uri, connections: 2, transfers, startAt: Date.now() + 600 });
      const l = await w.waitLine((x) => x.event === 'done' || x.event === 'error', 30000);
      const rs = l.reports as TransferReport[];
      for (const r of rs) assert.ok(r.ok, `${r.vol}: ${r.error}`);
      await w.exited;
      return Math.max(...rs.map((r) => r.end)) - Math.min(...rs.map((r) => r.start));
    };
    await batch(); // warm up
    const alone = Math.min(await batch(), await batch());

    const slow = startWorker({ op: 'slow-download', uri: d.uri, pool: 'load', vol: 'slow.img', rate: 64 * 1024, sparse: false });
    await slow.waitLine((l) => l.event === 'progress' && Number(l.bytes) > 0, 10000);
    await sleep(1000); // its socket buffers and the daemon's window are full by now
    const rssStart = d.mem().rss;
    let rssMax = rssStart;
    const sampler = setInterval(() => {
      rssMax = Math.max(rssMax, d.mem().rss);
    }, 50);
    const withSlow = Math.max(await batch(), await batch());
    await sleep(1000);
    clearInterval(sampler);
    const last = slow.lines.filter((l) => l.event === 'progress').at(-1)!;
    const rate = Number(last.bytes) / (Number(last.ms) / 1000);
    t.diagnostic(`8 transfers alone ${alone} ms, beside a 64 KiB/s reader ${withSlow} ms; slow reader at ${(rate / 1024).toFixed(0)} KiB/s; ` +
      `daemon rss while it read: ${mib(rssStart)} -> max ${mib(rssMax)}`);
    assert.ok(withSlow <= alone * 1.5 + 400, `the others slowed down: ${alone} ms -> ${withSlow} ms`);
    assert.ok(rssMax - rssStart < 32 * MiB, `the daemon grew by ${mib(rssMax - rssStart)} while the slow reader read`);
    assert.ok(!slow.lines.some((l) => l.event === 'error'), `the slow reader failed: ${JSON.stringify(slow.lines.at(-1))}`);
    assert.ok(rate > 40 * 1024 && rate < 90 * 1024, `the slow reader read at ${rate} B/s`);
    slow.proc.kill('SIGKILL');
    await slow.exited;
    await waitUntil(() => !d.fds().includes(path.join(poolDir, 'slow.img')), 5000, 'the slow download to end');
    await slowVol.delete();
  });
});

describe('keepalive and slow readers', () => {
  test('a slow reader is not declared dead: our client pings while its socket is paused; a raw reader that never pings is seen reading', async (t) => {
    // Short keepalive on the daemon: a peer silent for interval × (count + 1) = 3 s is dropped.
    // (A raw reader at 64 KiB/s frees the kernel's buffer in bursts every ~2 s; libvirt's
    // default window is 30 s.)
    const d = await startTestDaemon({ keepaliveInterval: 0.75, keepaliveCount: 3 });
    const dropped = () => d.logs.filter((l) => /client disconnected/.test(l) && /no answer from the peer/.test(l));
    try {
      const poolDir = path.join(d.dir, 'pool');
      const conn = await connect(d.uri);
      const pool = await conn.storagePoolDefineDir('ka', poolDir);
      await pool.build();
      await pool.create();
      await pool.createVol({ name: 'big.img', capacity: 12 * MiB, allocation: 0 });
      await makeFilledFile(path.join(poolDir, 'big.img'), 12 * MiB, 8);

      // 1. our client, default window (2 MiB): at 64 KiB/s its socket stays paused ~15 s at a
      //    time; it pings every keepaliveInterval meanwhile (0.5 s here, under the daemon's 3 s)
      const slow = startWorker({ op: 'slow-download', uri: d.uri, pool: 'ka', vol: 'big.img', rate: 64 * 1024, sparse: false, keepaliveInterval: 0.5 });
      // 2. a raw client: asks for keepalive (feature 10), downloads, reads 64 KiB/s and never pings
      const raw = net.createConnection({ path: d.socket });
      await new Promise((r) => raw.once('connect', r));
      let rawBytes = 0;
      let rawClosed = false;
      raw.on('close', () => {
        rawClosed = true;
      });
      const parser = new FrameParser();
      raw.on('data', (b: Buffer) => {
        rawBytes += b.length;
        parser.push(b, (m) => {
          if ((m.prog >>> 0) === KEEPALIVE_PROGRAM && m.proc === 1) raw.write(buildFrame({ prog: KEEPALIVE_PROGRAM, vers: 1, proc: 2, type: MessageType.MESSAGE, serial: 0, status: Status.OK }));
        });
        raw.pause();
        setTimeout(() => raw.resume(), (b.length / (64 * 1024)) * 1000);
      });
      const call = (proc: { num: number; args: any }, args: unknown, serial: number) =>
        raw.write(buildFrame({ prog: REMOTE_PROGRAM, vers: 1, proc: proc.num, type: MessageType.CALL, serial, status: Status.OK }, encode(proc.args, args)));
      call(P.AUTH_LIST, undefined, 0);
      call(P.CONNECT_SUPPORTS_FEATURE, { feature: 10 }, 1);
      call(P.CONNECT_OPEN, { name: 'sparsevirt:///system', flags: 0 }, 2);
      call(P.STORAGE_VOL_DOWNLOAD, { vol: { pool: 'ka', name: 'big.img', key: '' }, offset: 0n, length: 0n, flags: 0 }, 3);

      await sleep(6000); // 2 keepalive windows
      const progress = slow.lines.filter((l) => l.event === 'progress');
      t.diagnostic(`after 6 s: client reader ${progress.at(-1)?.bytes} bytes, raw reader ${rawBytes} bytes; dropped: ${dropped().length}`);
      assert.deepEqual(dropped(), [], 'the daemon dropped nobody');
      assert.ok(!slow.lines.some((l) => l.event === 'error'), JSON.stringify(slow.lines.at(-1)));
      assert.ok(Number(progress.at(-1)?.bytes) > 250 * 1024, 'the client reader kept reading');
      assert.ok(!rawClosed, 'the raw reader is still connected');
      assert.ok(rawBytes > 250 * 1024, 'the raw reader kept reading');

      // and a reader that really is gone (stopped reading altogether) is still found out
      raw.removeAllListeners('data');
      raw.pause();
      const t0 = Date.now();
      await waitUntil(() => rawClosed, 15000, 'the daemon to drop a reader that stopped');
      t.diagnostic(`a reader that stopped reading was dropped after ${Date.now() - t0} ms`);
      slow.proc.kill('SIGKILL');
      await slow.exited;
      await conn.close();
    } finally {
      await d.stop();
    }
  });
});
