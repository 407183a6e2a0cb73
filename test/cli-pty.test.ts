/**
 * `sparsevirt` on a pseudo-terminal, as a person runs it: progress bar on, stdin, stdout and
 * stderr a terminal. The main commands against sparsevirtd and against libvirtd (content and hole
 * map of every transfer checked); the bar at 80 and 40 columns; SIGINT, SIGTERM and SIGHUP in the
 * middle of a download (the stream aborted on the wire, the file the download created removed,
 * an existing target left truncated to what arrived); a run whose command never completes; the
 * interactive shell (a download typed at its prompt, Ctrl-C, Tab completion).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { MessageType, Status, type Message } from '../src/rpc/message.js';
import { FrameParser } from '../src/rpc/parser.js';
import { P } from '../src/protocol/remote.js';
import { CLI_MAIN } from './cli-support.js';
import { startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { extentMap, makeImage, scratchDir, sha256File, type Layout } from './helpers/images.js';
import { LIBVIRTD_SOCKET, LIBVIRTD_URI, requireLibvirt, virshOk, withScratchPool } from './helpers/libvirt.js';
import { barLines, plain, spawnPty, type PtyExit, type PtyProcess } from './helpers/pty.js';

const MiB = 1024 * 1024;
const TIMEOUT = 60_000;

/** A server the tests run against: a URI, a started dir pool, and the socket a proxy can front. */
interface Target {
  kind: 'sparsevirtd' | 'libvirtd';
  uri: string;
  pool: string;
  poolDir: string;
  socket: string;
  /** For a URI through a proxy on `sock`. */
  uriVia(sock: string): string;
  /** sparsevirtd's log lines (none for libvirtd). */
  logs: string[];
  /** A scratch directory on tmpfs for local files. */
  dir: string;
}

async function withSparsevirtd(fn: (t: Target) => Promise<void>): Promise<void> {
  const dir = await scratchDir('/dev/shm', 'sv-pty-');
  let d: TestDaemon | null = null;
  try {
    d = await startTestDaemon({ dir: path.join(dir, 'daemon') });
    const poolDir = path.join(dir, 'pool');
    await virshOk(['pool-define-as', 'pty', 'dir', '--target', poolDir], { uri: d.uri });
    await virshOk(['pool-build', 'pty'], { uri: d.uri });
    await virshOk(['pool-start', 'pty'], { uri: d.uri });
    await fn({
      kind: 'sparsevirtd', uri: d.uri, pool: 'pty', poolDir, socket: d.socket, logs: d.logs, dir,
      uriVia: (sock) => `sparsevirt+unix:///system?socket=${sock}`,
    });
  } finally {
    await d?.stop();
    await fs.rm(dir, { recursive: true, force: true });
  }
}

async function withLibvirtd(fn: (t: Target) => Promise<void>): Promise<void> {
  await withScratchPool('clipty', async (pool) => {
    const dir = await scratchDir('/dev/shm', 'sv-pty-');
    try {
      await fn({
        kind: 'libvirtd', uri: LIBVIRTD_URI, pool: pool.name, poolDir: pool.path, socket: LIBVIRTD_SOCKET, logs: [], dir,
        uriVia: (sock) => `qemu+unix:///system?socket=${sock}`,
      });
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
}

/** `sparsevirt ARGS` on a terminal `cols` wide. */
function sparsevirt(args: string[], opts: { cols?: number; env?: NodeJS.ProcessEnv } = {}): PtyProcess {
  return spawnPty([process.execPath, CLI_MAIN, ...args], { cols: opts.cols ?? 100, env: opts.env, timeoutMs: TIMEOUT });
}

/** Runs to the end; fails with the transcript unless it exits 0. Returns the plain transcript. */
async function ok(args: string[], opts: { cols?: number } = {}): Promise<{ text: string; raw: string }> {
  const p = sparsevirt(args, opts);
  const end = await p.exited;
  assert.deepEqual(end, { code: 0, signal: null }, `sparsevirt ${args.join(' ')}:\n${plain(p.output())}`);
  return { text: plain(p.output()), raw: p.output() };
}

/** A sparse source image: data at the start, in the middle (unaligned) and at the end, holes between. */
const LAYOUT: Layout = [
  { kind: 'data', length: 3 * MiB }, { kind: 'hole', length: 20 * MiB }, { kind: 'data', length: MiB + 5000 },
  { kind: 'hole', length: 30 * MiB - 5000 }, { kind: 'data', length: 2 * MiB }, { kind: 'hole', length: 8 * MiB },
];

async function mainCommands(t: Target): Promise<void> {
  const src = path.join(t.dir, 'src.img');
  const size = await makeImage(src, LAYOUT, 5);
  const c = ['-c', t.uri];
  const vol = path.join(t.poolDir, 'disk.img');

  const pools = await ok([...c, 'pool-list']);
  assert.match(pools.text, new RegExp(`^ ${t.pool} +active `, 'm'));
  assert.equal(barLines(pools.raw).length, 0, 'no bar outside transfers');

  assert.match((await ok([...c, 'vol-create-as', t.pool, 'disk.img', String(size), '--allocation', '0', '--format', 'raw'])).text, /^Vol disk\.img created\n\n$/);

  const up = await ok([...c, 'vol-upload', '--pool', t.pool, 'disk.img', src, '--sparse']);
  const upBars = barLines(up.raw);
  assert.match(upBars.at(-1)!, /^upload 100% \[#+\] 64\.0 MiB \/ 64\.0 MiB {2}holes 58\.0 MiB {2}[\d.]+ [KMG]?i?B\/s {2}ETA 0:00$/, up.raw);
  assert.match(up.raw, /\r\x1b\[K\r?\n/, 'the bar is erased before the blank line');
  assert.equal(up.text.replace(/\r[^\n]*/g, ''), '\n', 'nothing else printed');
  assert.equal(await sha256File(vol), await sha256File(src), 'uploaded bytes');
  assert.deepEqual(await extentMap(vol), await extentMap(src), 'uploaded hole map');

  const info = await ok([...c, 'vol-info', '--pool', t.pool, 'disk.img']);
  assert.match(info.text, /^Name: +disk\.img\nType: +file\nCapacity: +64\.00 MiB\nAllocation: +6\.\d\d MiB\n\n$/);
  const list = await ok([...c, 'vol-list', t.pool]);
  assert.match(list.text, new RegExp(`^ disk\\.img +${vol.replace(/[.]/g, '\\.')}\n`, 'm'));

  const out = path.join(t.dir, 'copy.img');
  const down = await ok([...c, 'vol-download', '--pool', t.pool, 'disk.img', out, '--sparse']);
  assert.match(barLines(down.raw).at(-1)!, /^download 100% \[#+\] 64\.0 MiB \/ 64\.0 MiB {2}holes 58\.0 MiB {2}[\d.]+ [KMG]?i?B\/s {2}ETA 0:00$/);
  assert.equal((await fs.stat(out)).size, size);
  assert.equal(await sha256File(out), await sha256File(src), 'downloaded bytes');
  assert.deepEqual(await extentMap(out), await extentMap(src), 'downloaded hole map');

  // a window that starts in a hole and ends inside the unaligned data
  const offset = 20 * MiB;
  const length = 3 * MiB + 1000;
  const win = path.join(t.dir, 'window.img');
  const w = await ok([...c, 'vol-download', '--pool', t.pool, 'disk.img', win, '--sparse', '--offset', String(offset), '--length', String(length)]);
  assert.match(barLines(w.raw).at(-1)!, /^download 100% \[#+\] 3\.00 MiB \/ 3\.00 MiB {2}holes 3\.00 MiB /);
  assert.equal((await fs.stat(win)).size, length);
  assert.equal(await sha256File(win), await sha256File(src, offset, length), 'window bytes');
  const theirs = path.join(t.dir, 'window-virsh.img');
  await virshOk(['vol-download', '--pool', t.pool, 'disk.img', theirs, '--sparse', '--offset', String(offset), '--length', String(length)], { uri: t.uri });
  assert.deepEqual(await extentMap(win), await extentMap(theirs), "the window's hole map is virsh's");

  assert.match((await ok([...c, 'vol-delete', '--pool', t.pool, 'disk.img'])).text, /^Vol disk\.img deleted\n\n$/);
  await assert.rejects(fs.stat(vol));
}

test('on a terminal, against sparsevirtd: pool-list, vol-create-as, vol-upload, vol-info, vol-list, vol-download (whole, window), vol-delete', { timeout: 2 * TIMEOUT }, async () => {
  await withSparsevirtd(mainCommands);
});

test('on a terminal, against libvirtd: the same commands', { timeout: 2 * TIMEOUT }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  await withLibvirtd(mainCommands);
});

// ------------------------------------------------------------------ a proxy on the wire

interface Proxy {
  /** Frames the client sent, in order. */
  clientFrames: Message[];
  /** Stop holding the server's bytes back. */
  release(): void;
  close(): Promise<void>;
}

/**
 * A unix-socket proxy to `target` that records the client's frames and, once `holdAfter` bytes
 * of the server's have passed, holds the rest back until `release()` (the server is left
 * waiting, the client in the middle of a transfer).
 */
async function proxy(listen: string, target: string, holdAfter = Infinity): Promise<Proxy> {
  const clientFrames: Message[] = [];
  const releases: Array<() => void> = [];
  let released = false;
  const conns = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.createConnection(target);
    conns.add(client);
    conns.add(upstream);
    let passed = 0;
    let held: Buffer[] = [];
    let holding = false;
    const flush = () => {
      holding = false;
      for (const b of held) client.write(b);
      held = [];
      upstream.resume();
    };
    releases.push(flush);
    upstream.on('data', (b: Buffer) => {
      if (holding) {
        held.push(b);
        return;
      }
      const room = holdAfter - passed;
      if (!released && room < b.length) {
        client.write(b.subarray(0, Math.max(0, room)));
        held.push(b.subarray(Math.max(0, room)));
        passed = holdAfter;
        holding = true;
        upstream.pause();
        return;
      }
      passed += b.length;
      client.write(b);
    });
    const parser = new FrameParser();
    client.on('data', (b: Buffer) => {
      upstream.write(b);
      parser.push(b, (m) => void clientFrames.push({ ...m, payload: Buffer.from(m.payload) }));
    });
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on('close', end);
      s.on('error', end);
    }
  });
  await new Promise<void>((resolve) => server.listen(listen, resolve));
  return {
    clientFrames,
    release() {
      released = true;
      for (const r of releases) r();
    },
    close: () => new Promise<void>((resolve) => {
      for (const s of conns) s.destroy();
      server.close(() => resolve());
    }),
  };
}

const isAbort = (m: Message) => m.type === MessageType.STREAM && m.status === Status.ERROR && m.proc === P.STORAGE_VOL_DOWNLOAD.num;

test('a download on a terminal asks for the volume\'s size before it opens the stream, and calls nothing while it is open', { timeout: TIMEOUT }, async () => {
  await withSparsevirtd(async (t) => {
    const src = path.join(t.dir, 'src.img');
    await makeImage(src, [{ kind: 'data', length: 40 * MiB }, { kind: 'hole', length: 24 * MiB }], 9);
    await virshOk(['vol-create-as', t.pool, 'big.img', String(64 * MiB), '--allocation', '0', '--format', 'raw'], { uri: t.uri });
    await virshOk(['vol-upload', '--pool', t.pool, 'big.img', src, '--sparse'], { uri: t.uri });
    const sock = path.join(t.dir, 'proxy.sock');
    const p = await proxy(sock, t.socket);
    try {
      const out = path.join(t.dir, 'out.img');
      await ok(['-c', t.uriVia(sock), 'vol-download', '--pool', t.pool, 'big.img', out, '--sparse']);
      assert.equal(await sha256File(out), await sha256File(src));
      const calls = p.clientFrames.filter((m) => m.type === MessageType.CALL).map((m) => m.proc);
      const open = calls.indexOf(P.STORAGE_VOL_DOWNLOAD.num);
      assert.ok(open > 0, `the download was opened: ${calls}`);
      assert.ok(calls.slice(0, open).includes(P.STORAGE_VOL_GET_INFO.num), `GET_INFO before the stream: ${calls}`);
      assert.deepEqual(calls.slice(open + 1), [P.CONNECT_CLOSE.num], 'after the stream opened, only the close');
    } finally {
      await p.close();
    }
  });
});

// ------------------------------------------------------------------ signals

const STATUS: Record<string, number> = { SIGHUP: 129, SIGINT: 130, SIGTERM: 143 };

/**
 * Starts a download of a 64 MiB volume of data through a proxy that holds the server's bytes
 * after 6 MiB, and waits until the terminal shows it under way.
 */
async function stuckDownload(t: Target, sock: string, file: string, shell: PtyProcess | null): Promise<{ p: PtyProcess; proxy: Proxy }> {
  const px = await proxy(sock, t.socket, 6 * MiB);
  const args = ['vol-download', '--pool', t.pool, 'data.img', file, '--sparse'];
  let p: PtyProcess;
  const from = shell?.output().length ?? 0;
  if (shell) {
    shell.type(`${args.join(' ')}\r`);
    p = shell;
  } else {
    p = sparsevirt(['-c', t.uriVia(sock), ...args]);
  }
  await p.waitFor(/download +[0-9]+% \[#*\.+\] [1-9][\d.]* MiB \/ 64\.0 MiB/, 20_000, from);
  return { p, proxy: px };
}

async function dataVolume(t: Target): Promise<string> {
  const src = path.join(t.dir, 'data-src.img');
  await makeImage(src, [{ kind: 'data', length: 64 * MiB }], 3);
  await virshOk(['vol-create-as', t.pool, 'data.img', String(64 * MiB), '--allocation', '0', '--format', 'raw'], { uri: t.uri });
  await virshOk(['vol-upload', '--pool', t.pool, 'data.img', src], { uri: t.uri });
  return src;
}

/**
 * Whether the client's abort reached the proxy within 5 s: the proxy reads the client's bytes on
 * this process's event loop, which may see the terminal's output first.
 */
async function abortSeen(px: Proxy): Promise<boolean> {
  for (let i = 0; i < 100 && !px.clientFrames.some(isAbort); i++) await new Promise((r) => setTimeout(r, 50));
  return px.clientFrames.some(isAbort);
}

/** The daemon saw the client's abort: on the wire (the proxy) and, for sparsevirtd, in its log. */
async function assertAborted(t: Target, px: Proxy, what: string): Promise<void> {
  assert.ok(await abortSeen(px), `${what}: the client sent STREAM/ERROR (an abort) for the download`);
  if (t.kind !== 'sparsevirtd') return;
  for (let i = 0; i < 100 && !t.logs.some((l) => l.includes('"download aborted by the client"')); i++) await new Promise((r) => setTimeout(r, 50));
  assert.ok(t.logs.some((l) => l.includes('"download aborted by the client"')), `${what}: sparsevirtd logged the abort:\n${t.logs.join('')}`);
  t.logs.length = 0;
}

async function interrupt(p: PtyProcess, signal: 'SIGINT' | 'SIGTERM' | 'SIGHUP'): Promise<void> {
  if (signal === 'SIGINT') p.type('\x03'); // Ctrl-C: the terminal sends SIGINT
  else await p.kill(signal);
}

async function signalsMidDownload(t: Target): Promise<void> {
  const src = await dataVolume(t);
  // a failed assertion must not leave a proxy (or the process under test) holding the test runner
  const open: Array<{ p: PtyProcess; proxy: Proxy }> = [];
  try {
    await signalsMidDownloadOf(t, src, open);
  } finally {
    for (const o of open) {
      await o.p.kill('SIGKILL').catch(() => undefined);
      await o.proxy.close();
    }
  }
}

async function signalsMidDownloadOf(t: Target, src: string, open: Array<{ p: PtyProcess; proxy: Proxy }>): Promise<void> {
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    // a new file: removed
    const sock = path.join(t.dir, `p-${signal}.sock`);
    const fresh = path.join(t.dir, `fresh-${signal}.img`);
    const a = await stuckDownload(t, sock, fresh, null);
    open.push(a);
    await interrupt(a.p, signal);
    await a.p.waitFor(`error: interrupted by ${signal}`, 10_000);
    a.proxy.release();
    const end: PtyExit = await a.p.exited;
    assert.deepEqual(end, { code: null, signal }, `${signal}: the process ends by the signal (status ${STATUS[signal]} in a shell)`);
    // the bar is erased first: the messages start on a line of their own
    assert.match(a.p.output(), /\r\x1b\[Kerror: cannot receive data from volume data\.img\r\n/);
    assert.match(plain(a.p.output()), new RegExp(`\\rerror: cannot receive data from volume data\\.img\\nerror: interrupted by ${signal}\\n\\n$`));
    await assert.rejects(fs.stat(fresh), `${signal}: the file the download created is removed`);
    await assertAborted(t, a.proxy, signal);

    // an existing file: truncated when the download started, left with what arrived
    const existing = path.join(t.dir, `existing-${signal}.img`);
    await fs.writeFile(existing, Buffer.alloc(100 * MiB / 10, 0xee));
    const b = await stuckDownload(t, `${sock}2`, existing, null);
    open.push(b);
    await interrupt(b.p, signal);
    await b.p.waitFor(`error: interrupted by ${signal}`, 10_000);
    b.proxy.release();
    assert.deepEqual(await b.p.exited, { code: null, signal });
    const st = await fs.stat(existing);
    assert.ok(st.size > 0 && st.size < 64 * MiB, `${signal}: the existing file holds part of the volume (${st.size} bytes)`);
    // what arrived is in place, every byte of it: no run of zeros where data waited to be
    // written while the data after it was already in place
    assert.equal(await sha256File(existing, 0, st.size), await sha256File(src, 0, st.size), `${signal}: its ${st.size} bytes are the volume's first`);
    await assertAborted(t, b.proxy, `${signal}, existing target`);
  }
}

test('SIGINT, SIGTERM, SIGHUP mid-download (sparsevirtd): aborted on the wire, new file removed, existing one left with what arrived', { timeout: 3 * TIMEOUT }, async () => {
  await withSparsevirtd(signalsMidDownload);
});

test('SIGINT, SIGTERM, SIGHUP mid-download (libvirtd): the same', { timeout: 3 * TIMEOUT }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  await withLibvirtd(signalsMidDownload);
});

// ------------------------------------------------------------------ a command that never completes

test('a run whose command can no longer complete fails (exit 1, a message) and removes the file it created', { timeout: TIMEOUT }, async () => {
  await withSparsevirtd(async (t) => {
    await dataVolume(t);
    const out = path.join(t.dir, 'stalled.img');
    const env = { ...process.env, SPARSEVIRT_TEST_HOOK: 'stall-download' };
    const p = sparsevirt(['-c', t.uri, 'vol-download', '--pool', t.pool, 'data.img', out, '--sparse'], { env });
    assert.deepEqual(await p.exited, { code: 1, signal: null }, plain(p.output()));
    assert.match(plain(p.output()), /sparsevirt: internal error: the command ended without completing\n$/);
    await assert.rejects(fs.stat(out), 'no partial file left');
    // the same in the shell: it ends with the error instead of hanging at a dead command
    const sh = sparsevirt(['-c', t.uri], { env });
    await sh.waitFor('virsh # ');
    sh.type(`vol-download --pool ${t.pool} data.img ${out} --sparse\r`);
    assert.deepEqual(await sh.exited, { code: 1, signal: null }, plain(sh.output()));
    assert.match(plain(sh.output()), /sparsevirt: internal error: the command ended without completing\n$/);
    await assert.rejects(fs.stat(out));
  });
});

test('a second signal does not wait for the first one\'s clean end: the process ends by it, the file is removed', { timeout: TIMEOUT }, async () => {
  await withSparsevirtd(async (t) => {
    // (an all-hole volume: what the server sends fits the client's queue, which keeps reading)
    await virshOk(['vol-create-as', t.pool, 'empty.img', String(64 * MiB), '--allocation', '0', '--format', 'raw'], { uri: t.uri });
    const out = path.join(t.dir, 'hung.img');
    const env = { ...process.env, SPARSEVIRT_TEST_HOOK: 'hang-download' };
    const p = sparsevirt(['-c', t.uri, 'vol-download', '--pool', t.pool, 'empty.img', out, '--sparse'], { env });
    for (let i = 0; i < 200 && !(await fs.stat(out).then(() => true, () => false)); i++) await new Promise((r) => setTimeout(r, 25));
    await new Promise((r) => setTimeout(r, 300)); // (at the hook: the download's stream is open)
    await p.kill('SIGTERM');
    const early = await Promise.race([p.exited, new Promise((r) => setTimeout(() => r('still running'), 500))]);
    assert.equal(early, 'still running', 'the first signal waits for the command (here: forever)');
    await p.kill('SIGTERM');
    assert.deepEqual(await p.exited, { code: null, signal: 'SIGTERM' });
    await assert.rejects(fs.stat(out), 'the file the download created is removed');
  });
});

// ------------------------------------------------------------------ the progress bar's width

test('the progress bar fits 80 and 40 columns and shows the rate and the ETA', { timeout: TIMEOUT }, async () => {
  await withSparsevirtd(async (t) => {
    const src = await dataVolume(t);
    for (const cols of [80, 40]) {
      const out = path.join(t.dir, `w${cols}.img`);
      const r = await ok(['-c', t.uri, 'vol-download', '--pool', t.pool, 'data.img', out, '--sparse'], { cols });
      const bars = barLines(r.raw);
      assert.ok(bars.length >= 1, r.raw);
      for (const l of bars) {
        assert.ok(l.length <= cols - 1, `${cols} columns: ${JSON.stringify(l)} is ${l.length} wide`);
        assert.match(l, /[\d.]+ [KMGT]?i?B\/s {2}ETA (\d+:)?\d+:\d\d|ETA --:--/, `${cols} columns: rate and ETA in ${JSON.stringify(l)}`);
      }
      assert.equal(await sha256File(out), await sha256File(src));
      const up = await ok(['-c', t.uri, 'vol-upload', '--pool', t.pool, 'data.img', out], { cols });
      for (const l of barLines(up.raw)) assert.ok(l.length <= cols - 1 && / ETA /.test(l), `${cols} columns, upload: ${JSON.stringify(l)}`);
    }
  });
});

// ------------------------------------------------------------------ the interactive shell

test('the shell: a download typed at the prompt completes; Ctrl-C stops one and returns to the prompt', { timeout: 2 * TIMEOUT }, async () => {
  await withSparsevirtd(async (t) => {
    const src = await dataVolume(t);
    const sh = sparsevirt(['-c', t.uri]);
    await sh.waitFor('virsh # ');
    const out = path.join(t.dir, 'v1.img');
    let from = sh.output().length;
    sh.type(`vol-download --pool ${t.pool} data.img ${out} --sparse\r`);
    await sh.waitFor(/download 100%[^\r]*\x1b\[K\r\x1b\[K\r?\n[\s\S]*virsh # /, 20_000, from);
    assert.equal(await sha256File(out), await sha256File(src), 'downloaded at the prompt');

    sh.type('quit\r');
    assert.deepEqual(await sh.exited, { code: 0, signal: null });

    // Ctrl-C in the middle of a download in the shell (through a proxy that holds the server's
    // bytes after 6 MiB): the command fails, the file goes, the shell goes on
    const fresh = path.join(t.dir, 'fresh.img');
    const sh3sock = path.join(t.dir, 'shell.sock');
    const held = await proxy(sh3sock, t.socket, 6 * MiB);
    const sh3 = sparsevirt(['-c', t.uriVia(sh3sock)]);
    try {
      await sh3.waitFor('virsh # ');
      from = sh3.output().length;
      sh3.type(`vol-download --pool ${t.pool} data.img ${fresh} --sparse\r`);
      await sh3.waitFor(/download +[0-9]+% /, 20_000, from);
      sh3.type('\x03');
      await sh3.waitFor('error: interrupted by SIGINT', 10_000, from);
      held.release();
      await sh3.waitFor(/error: interrupted by SIGINT\r?\n\r?\n[\s\S]*virsh # /, 10_000, from);
      await assert.rejects(fs.stat(fresh), 'the file is removed');
      assert.ok(await abortSeen(held), 'the stream was aborted on the wire');
      sh3.type('uri\r');
      await sh3.waitFor(`${t.uriVia(sh3sock)}\r\n`, 10_000, from);
      // Ctrl-C at the prompt ends the shell by SIGINT, as virsh's
      sh3.type('\x03');
      assert.deepEqual(await sh3.exited, { code: null, signal: 'SIGINT' });
    } finally {
      // a failed assertion must not leave the shell or the proxy holding the test runner
      await sh3.kill('SIGKILL').catch(() => undefined);
      await held.close();
    }
  });
});

test('the shell completes command names and options with Tab, as virsh\'s', { timeout: TIMEOUT }, async () => {
  await withSparsevirtd(async (t) => {
    const sh = sparsevirt(['-c', t.uri], { cols: 100 });
    await sh.waitFor('virsh # ');
    const keys = async (k: string) => {
      for (const c of k) {
        sh.type(c);
        await new Promise((r) => setTimeout(r, 30));
      }
    };
    let from = sh.output().length;
    await keys('vol-d\t\t');
    const listed = plain((await sh.waitFor(/vol-dumpxml/, 5000, from)).slice(from));
    assert.match(listed, /vol-delete +vol-download +vol-dumpxml/, 'the three candidates');
    await keys('o\t'); // vol-do → vol-download
    await sh.waitFor('vol-download ', 5000, from);
    from = sh.output().length;
    await keys('--sp\t\t');
    assert.match(plain((await sh.waitFor(/--sparse-fallback/, 5000, from)).slice(from)), /--sparse +--sparse-fallback/);
    // option values: pool names from the server
    sh.type('\x15'); // Ctrl-U: clear the line
    from = sh.output().length;
    await keys('vol-list pt\t');
    await sh.waitFor('vol-list pty ', 5000, from);
    sh.type('\x15');
    await keys('quit\r');
    assert.deepEqual(await sh.exited, { code: 0, signal: null });
  });
});
