/**
 * The `sparsevirtd` executable: options, help and version, JSON logs, socket permissions, a
 * clean stop on SIGTERM/SIGINT with a stream in flight, and a second daemon on the same socket.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import vm from 'node:vm';
import Module from 'node:module';
import { connect } from '../src/client/index.js';
import { RemoteError } from '../src/errors.js';
import { defaultStateDir, parseDaemonArgs, packageVersion } from '../src/daemon/options.js';
import { defaultDaemonSocket } from '../src/transport/uri.js';
import { makeFilledFile, scratchDir } from './helpers/images.js';
import { run } from './helpers/run.js';

const MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../bin/sparsevirtd.mjs');
const PKG = JSON.parse(fs.readFileSync(path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../package.json'), 'utf8')) as { version: string };

interface Running {
  child: ChildProcess;
  stderr: () => string;
  exited: Promise<number | null>;
}

function startMain(args: string[]): Running {
  const child = spawn(process.execPath, [MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  child.stdout!.resume();
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, stderr: () => err, exited };
}

async function waitForSocket(p: string, r: Running): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (r.child.exitCode !== null) throw new Error(`sparsevirtd exited: ${r.stderr()}`);
    if (fs.existsSync(p) && r.stderr().includes('sparsevirtd started')) return;
    await new Promise((res) => setTimeout(res, 20));
  }
  throw new Error(`no socket at ${p}: ${r.stderr()}`);
}

test('--help, --version, and bad options', async () => {
  const help = await run(process.execPath, [MAIN, '--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^Usage: sparsevirtd \[OPTIONS\]/);
  for (const opt of ['--listen unix:PATH', '--listen tcp:HOST:PORT', '--listen tls:HOST:PORT', '--state-dir', '--tls-cert', '--tls-key', '--tls-ca', '--pkipath', '--tls-allow', '--log-level', '--socket-mode']) {
    assert.ok(help.stdout.includes(opt), `help mentions ${opt}`);
  }
  const version = await run(process.execPath, [MAIN, '--version']);
  assert.deepEqual([version.code, version.stdout], [0, `sparsevirtd ${PKG.version}\n`]);
  assert.equal(packageVersion(), PKG.version);
  for (const bad of [['--bogus'], ['--listen', 'ftp:x'], ['--socket-mode', '999'], ['--log-level', 'loud'], ['extra']]) {
    const r = await run(process.execPath, [MAIN, ...bad]);
    assert.equal(r.code, 2, bad.join(' '));
    assert.match(r.stderr, /^sparsevirtd: .*see sparsevirtd --help/);
  }
  assert.ok(fs.readFileSync(MAIN, 'utf8').startsWith('#!/usr/bin/env -S -u NODE_EXTRA_CA_CERTS node\n'), 'shebang');
});

test('both programs run as installed (their #! line) without NODE_EXTRA_CA_CERTS, which Node 20 parses at start-up and they never use', async () => {
  const CLI = path.join(path.dirname(MAIN), 'sparsevirt.cjs');
  // node itself warns about a CA file it cannot load, before any script runs
  const env = { ...process.env, NODE_EXTRA_CA_CERTS: '/nonexistent-sv-ca.pem' };
  const direct = await run(process.execPath, [CLI, '--version'], { env });
  // Node 20 reads the variable at start-up (and warns about a file it cannot load); Node 24 only
  // when TLS first needs it, so there the programs must simply run.
  const readAtStart = /extra certs/i.test(direct.stderr);
  if (process.versions.node.startsWith('20.')) assert.ok(readAtStart, 'Node 20 reads the variable at start-up');
  for (const prog of [CLI, MAIN]) {
    const r = await run(prog, ['--version'], { env });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^(sparsevirtd )?\d+\.\d+\.\d+\n/);
    if (readAtStart) assert.doesNotMatch(r.stderr, /extra certs/i, `${path.basename(prog)}: the variable is dropped before node starts`);
  }
});

test('the CLI starts from the V8 code cache its build made (this Node accepts it, and it covers a transfer), and starts without one or with a broken one', async () => {
  const bin = path.dirname(MAIN);
  const file = path.join(bin, 'sparsevirt-main.cjs');
  const cache = fs.readFileSync(`${file}.cache`);
  const script = new vm.Script(Module.wrap(fs.readFileSync(file, 'utf8')), { filename: file, cachedData: cache });
  assert.equal(script.cachedDataRejected, false, 'V8 takes the cache');
  // the training run compiled what a transfer uses, not just the start: far more than --version's
  assert.ok(cache.length > 200_000, `${cache.length} bytes of cache`);
  const dir = await scratchDir(tmpdir(), 'sv-cache-');
  try {
    for (const f of ['sparsevirt.cjs', 'sparsevirt-main.cjs']) fs.copyFileSync(path.join(bin, f), path.join(dir, f));
    fs.symlinkSync(path.resolve(bin, '../../node_modules'), path.join(dir, 'node_modules'));
    const launcher = path.join(dir, 'sparsevirt.cjs');
    const want = (await run(process.execPath, [path.join(bin, 'sparsevirt.cjs'), '--version'])).stdout;
    assert.match(want, /^\d+\.\d+\.\d+\n$/);
    for (const state of ['missing', 'broken']) {
      if (state === 'broken') fs.writeFileSync(path.join(dir, 'sparsevirt-main.cjs.cache'), Buffer.from(cache.subarray(0, 5000)).fill(7, 100, 200));
      const r = await run(process.execPath, [launcher, '--version']);
      assert.equal(r.code, 0, `${state}: ${r.stderr}`);
      assert.equal(r.stdout, want, state);
    }
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

test('defaults: the per-user state directory and the socket sparsevirt looks for', () => {
  const cmd = parseDaemonArgs([]);
  assert.equal(cmd.action, 'run');
  if (cmd.action !== 'run') return;
  assert.deepEqual(cmd.options.listen, [{ kind: 'unix', path: defaultDaemonSocket() }]);
  assert.equal(cmd.options.stateDir, defaultStateDir());
  assert.equal(cmd.options.socketMode, undefined); // 0600 in startDaemon
  if (process.getuid?.() === 0) assert.equal(defaultStateDir(), '/var/lib/sparsevirt');
  else assert.match(defaultStateDir(), /(\/\.local\/state|XDG)?.*\/sparsevirt$/);
  const full = parseDaemonArgs(['--listen', 'unix:/tmp/a.sock', '--listen', 'tcp:127.0.0.1:16509', '--listen', 'tls:[::1]:16514',
    '--state-dir', '/tmp/s', '--pkipath', '/p', '--tls-allow', 'a', '--tls-allow', 'b', '--log-level', 'debug', '--socket-mode', '0660']);
  assert.equal(full.action, 'run');
  if (full.action !== 'run') return;
  assert.deepEqual(full.options.listen, [
    { kind: 'unix', path: '/tmp/a.sock' }, { kind: 'tcp', host: '127.0.0.1', port: 16509 }, { kind: 'tls', host: '::1', port: 16514 },
  ]);
  assert.equal(full.options.socketMode, 0o660);
  assert.deepEqual(full.options.tls?.allow, ['a', 'b']);
  assert.equal(full.options.tls?.pkipath, '/p');
  assert.equal(full.options.logLevel, 'debug');
});

test('runs in the foreground: owner-only socket, default pool, JSON logs; SIGTERM aborts a stream in flight and cleans up', async () => {
  const dir = await scratchDir();
  const sock = path.join(dir, 'run', 'sparsevirtd.sock');
  const stateDir = path.join(dir, 'state');
  const r = startMain(['--listen', `unix:${sock}`, '--state-dir', stateDir]);
  try {
    await waitForSocket(sock, r);
    assert.equal(fs.statSync(sock).mode & 0o777, 0o600);
    const conn = await connect(`sparsevirt+unix:///system?socket=${sock}`);
    const pool = await conn.storagePoolLookupByName('default');
    assert.equal(await pool.isActive(), true);
    assert.equal(await pool.autostart(), true);
    const vol = await pool.createVol({ name: 'big.img', capacity: 64 << 20, allocation: 0 });
    await makeFilledFile(path.join(stateDir, 'images', 'big.img'), 64 << 20);
    const stream = await vol.download({ sparse: true, highWaterMark: 1 << 20 });
    const it = stream[Symbol.asyncIterator]();
    await it.next(); // in flight, and we stop reading
    r.child.kill('SIGTERM');
    let failure: unknown;
    try {
      for (let x = await it.next(); !x.done; x = await it.next());
    } catch (err) {
      failure = err;
    }
    assert.ok(failure instanceof RemoteError, `the stream failed with the daemon's error: ${String(failure)}`);
    assert.match((failure as Error).message, /shutting down/);
    assert.equal(await r.exited, 0);
    assert.ok(!fs.existsSync(sock), 'socket file removed');
    const lines = r.stderr().trim().split('\n');
    for (const l of lines) {
      const rec = JSON.parse(l) as { time: string; level: string; msg: string };
      assert.ok(rec.time && rec.level && rec.msg, l);
    }
    assert.ok(lines.some((l) => /"sparsevirtd stopped"/.test(l)));
    await conn.close();
  } finally {
    r.child.kill('SIGKILL');
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

test('--socket-mode, SIGINT, a stale socket is replaced, a live one is refused', async () => {
  const dir = await scratchDir();
  const sock = path.join(dir, 's.sock');
  // a stale socket file left by a crash: bound, never unlinked, nobody listening
  const py = await run('python3', ['-c', 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])', sock]);
  assert.equal(py.code, 0, py.stderr);
  assert.ok(fs.statSync(sock).isSocket());
  const r = startMain(['--listen', `unix:${sock}`, '--state-dir', path.join(dir, 'state'), '--socket-mode', '0660', '--log-level', 'warn']);
  try {
    await waitForSocketQuiet(sock, r);
    assert.equal(fs.statSync(sock).mode & 0o777, 0o660);
    const second = await run(process.execPath, [MAIN, '--listen', `unix:${sock}`, '--state-dir', path.join(dir, 'state2')]);
    assert.equal(second.code, 1);
    assert.match(second.stderr, /already listening/);
    r.child.kill('SIGINT');
    assert.equal(await r.exited, 0);
    assert.ok(!fs.existsSync(sock));
  } finally {
    r.child.kill('SIGKILL');
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

/** With --log-level warn there is no "started" line: wait until a connection succeeds. */
async function waitForSocketQuiet(p: string, r: Running): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (r.child.exitCode !== null) throw new Error(`sparsevirtd exited: ${r.stderr()}`);
    const up = await new Promise<boolean>((res) => {
      const c = net.createConnection({ path: p });
      c.once('connect', () => {
        c.destroy();
        res(true);
      });
      c.once('error', () => res(false));
    });
    if (up) return;
    await new Promise((res) => setTimeout(res, 20));
  }
  throw new Error(`no socket at ${p}`);
}
