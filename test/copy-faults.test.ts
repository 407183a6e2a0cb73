/**
 * vol-copy when a side fails mid-copy: the source's sparsevirtd killed (SIGKILL), the source's
 * connection dropped (a proxy closes it), the destination's sparsevirtd killed, the destination
 * full (its pool on a 16 MiB tmpfs: ENOSPC). Each time the copy fails within seconds with an
 * error that names the side and its reason, the CLI exits 1, the other side's stream is aborted
 * (its daemon logs it and goes on serving), `--create` removes the volume it made, and a
 * destination volume that existed stays.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { connect, type StorageVol } from '../src/index.js';
import { copyVolume } from '../src/client/copy.js';
import { cliRaw, text } from './cli-support.js';
import { addDirPool, startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { makeFilledFile, scratchDir } from './helpers/images.js';

const MiB = 1 << 20;
const SIZE = 256 * MiB;
const DAEMON_MAIN = fileURLToPath(new URL('../bin/sparsevirtd.mjs', import.meta.url));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** sparsevirtd as a process of its own (to be killed), with a dir pool `p` on `poolDir`. */
interface ChildDaemon {
  child: ChildProcess;
  uri: string;
  poolDir: string;
  kill(): void;
}

async function childDaemon(dir: string, name: string): Promise<ChildDaemon> {
  const base = path.join(dir, name);
  fs.mkdirSync(base, { recursive: true });
  const sock = path.join(base, 'sock');
  const child = spawn(process.execPath, [DAEMON_MAIN, '--listen', `unix:${sock}`, '--state-dir', path.join(base, 'state')], { stdio: 'ignore' });
  const uri = `sparsevirt+unix:///system?socket=${sock}`;
  for (let i = 0; i < 400 && !fs.existsSync(sock); i++) await sleep(25);
  const poolDir = path.join(base, 'pool');
  await addDirPool(uri, 'p', poolDir);
  return { child, uri, poolDir, kill: () => child.kill('SIGKILL') };
}

/** An in-process sparsevirtd (its log lines are read) with a dir pool `p` on `poolDir` (made here unless given). */
async function inProcessDaemon(dir: string, name: string, poolDir = path.join(dir, name, 'pool')): Promise<{ d: TestDaemon; poolDir: string }> {
  fs.mkdirSync(path.join(dir, name), { recursive: true });
  const d = await startTestDaemon({ dir: path.join(dir, name) });
  await addDirPool(d.uri, 'p', poolDir);
  return { d, poolDir };
}

const allocated = (file: string): number => {
  try {
    return fs.statSync(file).blocks * 512;
  } catch {
    return 0;
  }
};

/** Waits until `file` holds more than `bytes` allocated, then calls `then` (a copy in progress). */
async function whenAllocated(file: string, bytes: number, then: () => void): Promise<void> {
  const until = Date.now() + 30_000;
  while (allocated(file) <= bytes) {
    if (Date.now() > until) throw new Error(`${file} never reached ${bytes} bytes`);
    await sleep(2);
  }
  then();
}

async function waitForLog(d: TestDaemon, re: RegExp, what: string): Promise<void> {
  const until = Date.now() + 10_000;
  while (!d.logs.some((l) => re.test(l))) {
    if (Date.now() > until) assert.fail(`${what}: no log line ${re}; got:\n${d.logs.filter((l) => /load|transfer|stream/.test(l)).join('')}`);
    await sleep(20);
  }
}

async function volumeNames(uri: string): Promise<string[]> {
  const c = await connect(uri);
  try {
    return (await (await c.storagePoolLookupByName('p')).listAllVolumes()).map((v) => v.name);
  } finally {
    await c.close();
  }
}

async function createVol(uri: string, name: string, capacity: number): Promise<void> {
  const c = await connect(uri);
  try {
    await (await c.storagePoolLookupByName('p')).createVol({ name, capacity, allocation: 0, format: 'raw' });
  } finally {
    await c.close();
  }
}

/** `sparsevirt -c SRC vol-copy --pool p disk.img --desturi DST ...` (bounded: no hang). */
function volCopy(src: string, dst: string, ...extra: string[]) {
  return cliRaw(['-c', src, 'vol-copy', '--pool', 'p', 'disk.img', '--desturi', dst, '--sparse', ...extra], { timeoutMs: 60_000 });
}

test('the source sparsevirtd killed mid-copy: the copy fails naming the source, the upload is aborted, --create removes its volume, an existing one stays', { timeout: 120_000 }, async () => {
  const dir = await scratchDir('/dev/shm', 'svd-copy-srckill-');
  let a: ChildDaemon | null = null;
  let a2: ChildDaemon | null = null;
  let b: { d: TestDaemon; poolDir: string } | null = null;
  try {
    a = await childDaemon(dir, 'a');
    b = await inProcessDaemon(dir, 'b');
    await makeFilledFile(path.join(a.poolDir, 'disk.img'), SIZE);

    // the library: an existing destination volume
    const sc = await connect(a.uri);
    const bc = await connect(b.d.uri);
    try {
      const sp = await sc.storagePoolLookupByName('p');
      await sp.refresh();
      const src = await sp.volLookupByName('disk.img');
      const dst = await (await bc.storagePoolLookupByName('p')).createVol({ name: 'disk.img', capacity: SIZE, allocation: 0, format: 'raw' });
      let killed = false;
      const t0 = Date.now();
      const srcDaemon = a;
      await assert.rejects(copyVolume(src, dst, {
        sparse: true,
        onProgress: (p) => {
          if (!killed && p.dataBytes > 16 * MiB) {
            killed = true;
            srcDaemon.kill();
          }
        },
      }), (err: Error & { code?: string; side?: string }) => {
        assert.match(err.message, /^source: .*connection (closed|error)/);
        assert.equal(err.side, 'source');
        assert.equal(err.code, 'ERR_CONNECTION_CLOSED');
        return true;
      });
      assert.ok(killed);
      assert.ok(Date.now() - t0 < 20_000, 'no hang');
      // aborted while the connection is still open: not finished (a truncated copy taken as whole)
      await waitForLog(b.d, /"msg":"upload aborted by the client".*"vol":"disk\.img"/, 'the destination stream aborted');
      // the destination goes on serving, and its existing volume stays
      assert.equal((await dst.info()).capacity, SIZE);
    } finally {
      await sc.close().catch(() => undefined);
      await bc.close();
    }

    // the CLI with --create: exit 1, the source named, the new volume removed
    a2 = await childDaemon(dir, 'a2');
    await makeFilledFile(path.join(a2.poolDir, 'disk.img'), SIZE);
    const dstFile = path.join(b.poolDir, 'new.img');
    const srcDaemon2 = a2;
    const [r] = await Promise.all([
      volCopy(a2.uri, b.d.uri, '--dest-vol', 'new.img', '--create'),
      whenAllocated(dstFile, 16 * MiB, () => srcDaemon2.kill()),
    ]);
    assert.equal(r.code, 1, text(r.stderr));
    assert.match(text(r.stderr), /error: cannot copy volume disk\.img/);
    assert.match(text(r.stderr), /source: connection (closed by peer|error)/);
    assert.equal(fs.existsSync(dstFile), false, 'the volume --create made is removed');
    assert.deepEqual((await volumeNames(b.d.uri)).sort(), ['disk.img']);
  } finally {
    a?.kill();
    a2?.kill();
    await b?.d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

/**
 * A unix socket in front of `target`: it forwards both ways, and once more than `dropAfter`
 * bytes came from the target, closes both connections (the server stays up).
 */
async function droppingProxy(sock: string, target: string, dropAfter: number): Promise<{ server: net.Server; dropped: () => boolean }> {
  let dropped = false;
  const server = net.createServer((client) => {
    const upstream = net.createConnection({ path: target });
    let fromTarget = 0;
    const drop = () => {
      dropped = true;
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop);
    upstream.on('error', drop);
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
    client.pipe(upstream);
    upstream.on('data', (b: Buffer) => {
      fromTarget += b.length;
      if (fromTarget > dropAfter) drop();
      else client.write(b);
    });
  });
  await new Promise<void>((resolve) => server.listen(sock, resolve));
  return { server, dropped: () => dropped };
}

test('the source connection dropped mid-copy: the copy fails naming the source, both daemons see their stream end, an existing destination stays', { timeout: 120_000 }, async () => {
  const dir = await scratchDir('/dev/shm', 'svd-copy-srcdrop-');
  const a = await inProcessDaemon(dir, 'a');
  const b = await inProcessDaemon(dir, 'b');
  const proxySock = path.join(dir, 'proxy.sock');
  const proxy = await droppingProxy(proxySock, a.d.socket, 24 * MiB);
  try {
    await makeFilledFile(path.join(a.poolDir, 'disk.img'), SIZE);
    await createVol(b.d.uri, 'disk.img', SIZE);
    const t0 = Date.now();
    const r = await volCopy(`sparsevirt+unix:///system?socket=${proxySock}`, b.d.uri);
    assert.ok(proxy.dropped(), 'the proxy dropped the connection');
    assert.ok(Date.now() - t0 < 30_000, 'no hang');
    assert.equal(r.code, 1, text(r.stderr));
    assert.match(text(r.stderr), /error: cannot copy volume disk\.img/);
    assert.match(text(r.stderr), /source: connection (closed by peer|error)/);
    await waitForLog(a.d, /"msg":"download ended: connection closed".*"vol":"disk\.img"/, 'the source daemon saw its download end');
    await waitForLog(b.d, /"msg":"upload aborted by the client".*"vol":"disk\.img"/, 'the destination stream aborted');
    assert.deepEqual(await volumeNames(b.d.uri), ['disk.img'], 'the existing destination volume stays');
  } finally {
    proxy.server.close();
    await a.d.stop();
    await b.d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the destination sparsevirtd killed mid-copy: the CLI fails naming the destination and the source stream is aborted', { timeout: 120_000 }, async () => {
  const dir = await scratchDir('/dev/shm', 'svd-copy-dstkill-');
  const a = await inProcessDaemon(dir, 'a');
  let b: ChildDaemon | null = null;
  try {
    b = await childDaemon(dir, 'b');
    await makeFilledFile(path.join(a.poolDir, 'disk.img'), SIZE);
    const dstDaemon = b;
    const t0 = Date.now();
    const [r] = await Promise.all([
      volCopy(a.d.uri, b.uri, '--create'),
      whenAllocated(path.join(b.poolDir, 'disk.img'), 16 * MiB, () => dstDaemon.kill()),
    ]);
    assert.ok(Date.now() - t0 < 30_000, 'no hang');
    assert.equal(r.code, 1, text(r.stderr));
    assert.match(text(r.stderr), /error: cannot copy volume disk\.img/);
    assert.match(text(r.stderr), /destination: connection (closed by peer|error)/);
    await waitForLog(a.d, /"msg":"download aborted by the client".*"vol":"disk\.img"/, 'the source stream aborted');
  } finally {
    b?.kill();
    await a.d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

function mountTmpfs(dir: string, size: string): Promise<string | null> {
  return new Promise((resolve) => {
    execFile('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], (err, _out, stderr) => resolve(err ? (stderr || err.message).trim() : null));
  });
}

function requireMount(t: TestContext, why: string | null): boolean {
  if (why === null) return true;
  const hint = `cannot mount a small tmpfs for a full destination: ${why} (needs root)`;
  if (process.env.CI) throw new Error(hint);
  t.skip(hint);
  return false;
}

test('the destination full (ENOSPC): the copy fails naming the destination and its reason, the source stream is aborted, --create removes its volume, an existing one stays', { timeout: 120_000 }, async (t) => {
  const dir = await scratchDir('/dev/shm', 'svd-copy-full-');
  const small = path.join(dir, 'small');
  fs.mkdirSync(small);
  const mounted = await mountTmpfs(small, '16m');
  if (!requireMount(t, mounted)) {
    fs.rmSync(dir, { recursive: true, force: true });
    return;
  }
  let a: { d: TestDaemon; poolDir: string } | null = null;
  let b: { d: TestDaemon; poolDir: string } | null = null;
  try {
    a = await inProcessDaemon(dir, 'a');
    b = await inProcessDaemon(dir, 'b', path.join(small, 'pool'));
    await makeFilledFile(path.join(a.poolDir, 'disk.img'), 64 * MiB);

    // --create: the volume it made is removed
    const t0 = Date.now();
    const r = await volCopy(a.d.uri, b.d.uri, '--create');
    assert.ok(Date.now() - t0 < 30_000, 'no hang');
    assert.equal(r.code, 1, text(r.stderr));
    assert.match(text(r.stderr), /error: cannot copy volume disk\.img/);
    assert.match(text(r.stderr), /destination: .*No space left on device/);
    await waitForLog(a.d, /"msg":"download aborted by the client".*"vol":"disk\.img"/, 'the source stream aborted');
    assert.deepEqual(await volumeNames(b.d.uri), [], 'the volume --create made is removed');
    assert.ok(fs.statfsSync(small).bfree * fs.statfsSync(small).bsize > 15 * MiB, 'and its space is free again');

    // an existing destination volume stays (with what was written)
    await createVol(b.d.uri, 'disk.img', 64 * MiB);
    const r2 = await volCopy(a.d.uri, b.d.uri);
    assert.equal(r2.code, 1, text(r2.stderr));
    assert.match(text(r2.stderr), /destination: .*No space left on device/);
    assert.deepEqual(await volumeNames(b.d.uri), ['disk.img'], 'the existing volume stays');

    // the library: the error names the side, and carries the daemon's code
    const sc = await connect(a.d.uri);
    const bc = await connect(b.d.uri);
    try {
      const src = await (await sc.storagePoolLookupByName('p')).volLookupByName('disk.img');
      const dst: StorageVol = await (await bc.storagePoolLookupByName('p')).volLookupByName('disk.img');
      await assert.rejects(copyVolume(src, dst, { sparse: true }), (err: Error & { side?: string; code?: string }) => {
        assert.equal(err.side, 'destination');
        assert.match(err.message, /^destination: .*No space left on device/);
        return true;
      });
    } finally {
      await sc.close();
      await bc.close();
    }
  } finally {
    await a?.d.stop();
    await b?.d.stop();
    await new Promise((resolve) => execFile('umount', [small], resolve));
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
