/**
 * sparsevirtd run as an administrator runs it (the bundled executable): from a configuration
 * file that sets every key (sockets with their modes and group, the read-only socket, TCP, TLS
 * with both allow-lists, a debug log file beside a quieter stderr, the client limits); bad files
 * refused with FILE:LINE: reason and exit status 78; SIGHUP changing the log level and the
 * allow-lists at once, reporting what needs a restart, surviving a bad file; `<N>` lines when
 * stderr is the journal.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { connect, type Connection } from '../src/client/index.js';
import { RemoteError } from '../src/errors.js';
import { scratchDir } from './helpers/images.js';
import { run } from './helpers/run.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MAIN = path.join(ROOT, 'dist/bin/sparsevirtd.mjs');

interface Running {
  child: ChildProcess;
  stderr(): string;
  exited: Promise<number | null>;
  /** Resolves with the first stderr line matching `re` from `from` on (a character offset). */
  line(re: RegExp, from?: number, ms?: number): Promise<string>;
}

function start(args: string[], opts: { env?: NodeJS.ProcessEnv; stderrFd?: number } = {}): Running {
  const child = spawn(process.execPath, [MAIN, ...args], { stdio: ['ignore', 'ignore', opts.stderrFd ?? 'pipe'], env: opts.env ?? process.env });
  let err = '';
  child.stderr?.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const stderr = () => err;
  return {
    child, stderr, exited,
    async line(re, from = 0, ms = 10_000) {
      const deadline = Date.now() + ms;
      for (;;) {
        const found = stderr().slice(from).split('\n').find((l) => re.test(l));
        if (found !== undefined) return found;
        if (child.exitCode !== null) throw new Error(`sparsevirtd exited (${child.exitCode}) before ${re}: ${stderr()}`);
        if (Date.now() > deadline) throw new Error(`no line ${re} within ${ms} ms: ${stderr()}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
  };
}

/** The exit status, killing the process if it has not exited within `ms`. */
async function exitedWithin(r: Running, ms = 15_000): Promise<number | null> {
  const timer = setTimeout(() => r.child.kill('SIGKILL'), ms);
  const code = await r.exited;
  clearTimeout(timer);
  return code;
}

async function stop(r: Running): Promise<number | null> {
  if (r.child.exitCode === null) r.child.kill('SIGTERM');
  const timer = setTimeout(() => r.child.kill('SIGKILL'), 10_000);
  const code = await r.exited;
  clearTimeout(timer);
  return code;
}

/** The URIs of the "sparsevirtd started" line. */
function listening(startedLine: string): string[] {
  return (JSON.parse(startedLine) as { listen: string[] }).listen;
}

/** A group to give the sockets: not the daemon's own, when the system has one. */
function socketGroup(): { name: string; gid: number } {
  for (const line of fs.readFileSync('/etc/group', 'utf8').split('\n')) {
    const [name, , gid] = line.split(':');
    if (name && gid && (name === 'nogroup' || name === 'users') && Number(gid) !== process.getgid?.()) return { name, gid: Number(gid) };
  }
  return { name: String(process.getgid?.() ?? 0), gid: process.getgid?.() ?? 0 };
}

let dir: string;
let pki: string;

before(async () => {
  dir = await scratchDir(tmpdir(), 'sv-service-');
  pki = path.join(dir, 'pki');
  const r = await run(path.join(ROOT, 'scripts/setup-tls.sh'), [pki, '--days', '2']);
  assert.equal(r.code, 0, r.stderr);
});

after(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

const tlsKeys = () => [`key_file = "${pki}/serverkey.pem"`, `cert_file = "${pki}/servercert.pem"`, `ca_file = "${pki}/cacert.pem"`];

test('a configuration file with every key: socket modes and group, the read-only socket, TCP, TLS with both allow-lists, a debug log file, the client limits', async () => {
  const base = path.join(dir, 'every');
  const group = socketGroup();
  const conf = path.join(base, 'sparsevirtd.conf');
  const debugLog = path.join(base, 'log', 'debug.log');
  await fsp.mkdir(path.dirname(debugLog), { recursive: true });
  await fsp.writeFile(conf, [
    '# every key of sparsevirtd.conf(5)',
    'listen_tcp = 1',
    'listen_tls = 1',
    'listen_addr = "127.0.0.1"',
    'tcp_port = 0',
    'tls_port = "0"',
    `unix_sock_dir = "${base}/run"`,
    `unix_sock_group = "${group.name}"`,
    'unix_sock_rw_perms = "0660"',
    'unix_sock_ro_perms = "0666"',
    'unix_sock_ro = 1',
    ...tlsKeys(),
    'tls_allowed_dn_list = [',
    '  "O=other,CN=*",',
    '  "O=sparsevirt test,CN=sparsevirt-test-*",   # the test client',
    ']',
    'tls_allowed_cn_list = [ "sparsevirt-test-client" ]',
    `state_dir = "${base}/state"`,
    'log_level = 1',
    `log_outputs = "2:stderr 1:file:${debugLog}"`,
    'max_clients = 3',
    'max_client_transfers = 1',
    'keepalive_interval = 2; keepalive_count = 3',
  ].join('\n'));
  const d = start(['--config', conf]);
  const conns: Connection[] = [];
  try {
    const uris = listening(await d.line(/"sparsevirtd started"/));
    const rw = path.join(base, 'run', 'sparsevirt-sock');
    const ro = path.join(base, 'run', 'sparsevirt-sock-ro');
    assert.deepEqual(uris.slice(0, 2), [`sparsevirt+unix:///system?socket=${rw}`, `sparsevirt+unix:///system?socket=${ro}`]);
    assert.match(uris[2]!, /^sparsevirt\+tcp:\/\/127\.0\.0\.1:\d+\/system$/);
    assert.match(uris[3]!, /^sparsevirt\+tls:\/\/127\.0\.0\.1:\d+\/system$/);
    for (const [p, mode] of [[rw, 0o660], [ro, 0o666]] as const) {
      const st = fs.statSync(p);
      assert.equal(st.mode & 0o777, mode, p);
      assert.equal(st.gid, group.gid, p);
    }
    assert.ok(fs.existsSync(path.join(base, 'state', 'sparsevirtd.pid')), 'state_dir');

    // read-write unix: a pool and a volume with data
    const w = await connect(uris[0]);
    conns.push(w);
    const pool = await w.storagePoolDefineDir('p', path.join(base, 'pool'));
    await pool.build();
    await pool.create();
    const vol = await pool.createVol({ name: 'v.img', capacity: 4 << 20, allocation: 0 });
    fs.writeFileSync(path.join(base, 'pool', 'v.img'), Buffer.alloc(4 << 20, 1));

    // read-only unix: lists and reads, refuses writes
    const r = await connect(uris[1]);
    conns.push(r);
    assert.deepEqual((await r.listAllStoragePools()).map((p) => p.name).sort(), ['default', 'p']);
    await assert.rejects(r.storagePoolDefineDir('q', path.join(base, 'q')), (err: RemoteError) => err instanceof RemoteError && /read only access prevents virStoragePoolDefineXML/.test(err.message));
    const rvol = await (await r.storagePoolLookupByName('p')).volLookupByName('v.img');
    await assert.rejects(rvol.delete(), /read only access prevents/);

    // max_client_transfers = 1: of three transfers asked for at once on one connection, one opens
    const asked = await Promise.allSettled([vol.download({ sparse: true }), vol.download({ sparse: true }), vol.download({ sparse: true })]);
    const opened = asked.filter((a) => a.status === 'fulfilled');
    assert.equal(opened.length, 1);
    for (const a of asked.filter((x) => x.status === 'rejected')) {
      assert.match(String((a as PromiseRejectedResult).reason), /operation failed: too many transfers on this connection \(max_client_transfers is 1\)/);
    }
    await (opened[0] as PromiseFulfilledResult<Awaited<ReturnType<typeof vol.download>>>).value.abort();

    // max_clients = 3 (two open): TCP is the third, TLS a fourth is closed at once
    const t = await connect(uris[2]);
    conns.push(t);
    assert.equal((await t.listAllStoragePools()).length, 2);
    await assert.rejects(connect(`${uris[3]}?pkipath=${pki}`));
    await d.line(/"client refused: max_clients reached".*"transport":"tls"/);
    await t.close();
    for (let i = 0; i < 100 && d.stderr().split('\n').filter((l) => /"client disconnected"/.test(l)).length < 2; i++) await new Promise((res) => setTimeout(res, 20));
    // TLS: the test client's DN matches the second pattern, its CN the list
    const s = await connect(`${uris[3]}?pkipath=${pki}`);
    conns.push(s);
    assert.equal((await s.listAllStoragePools()).length, 2);

    // log_outputs: stderr at 2 (info), the file at 1 (debug); log_level 1 lets debug through
    assert.doesNotMatch(d.stderr(), /"level":"debug"/);
    const fileLines = fs.readFileSync(debugLog, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { level: string; msg: string });
    assert.ok(fileLines.some((l) => l.level === 'debug' && l.msg === 'connection opened'), 'debug lines in the file');
    assert.ok(fileLines.some((l) => l.msg === 'sparsevirtd started'));
  } finally {
    for (const c of conns) await c.close().catch(() => undefined);
    assert.equal(await stop(d), 0, d.stderr());
  }
  assert.ok(!fs.existsSync(path.join(base, 'run', 'sparsevirt-sock-ro')), 'socket files removed at the stop');
});

test('bad files are refused at start with FILE:LINE: reason and exit status 78; --check-config says the same', async () => {
  const base = path.join(dir, 'bad');
  await fsp.mkdir(base, { recursive: true });
  const cases: Array<{ name: string; text?: string; path?: string; re: (f: string) => RegExp }> = [
    { name: 'unknown key', text: '# x\nlisten_tcp = 0\nauth_unix_rw = "none"\n', re: (f) => new RegExp(`${f}:3: unknown key 'auth_unix_rw'`) },
    { name: 'bad value', text: 'max_clients = 0\n', re: (f) => new RegExp(`${f}:1: max_clients: 0 is out of range`) },
    { name: 'wrong type', text: '\n\nlisten_tls = "yes"\n', re: (f) => new RegExp(`${f}:3: listen_tls: expected 0 or 1, found a "string"`) },
    { name: 'syntax', text: 'tls_allowed_dn_list = [ "a"\n "b" ]\n', re: (f) => new RegExp(`${f}:2: expecting ',' or '\\]' in the list`) },
    { name: 'bad log output', text: 'log_level = 2\nlog_outputs = "3:file:relative"\n', re: (f) => new RegExp(`${f}:2: log_outputs: '3:file:relative': file needs an absolute path`) },
    { name: 'missing', path: path.join(base, 'none.conf'), re: (f) => new RegExp(`${f}: cannot read the configuration file: ENOENT`) },
    { name: 'a directory', path: base, re: (f) => new RegExp(`${f}: cannot read the configuration file: it is a directory`) },
  ];
  for (const c of cases) {
    const f = c.path ?? path.join(base, `${c.name.replace(/ /g, '-')}.conf`);
    if (c.text !== undefined) await fsp.writeFile(f, c.text);
    const esc = f.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    const d = start(['--config', f, '--state-dir', path.join(base, 'state'), '--listen', `unix:${path.join(base, 'sock')}`]);
    assert.equal(await exitedWithin(d), 78, `${c.name}: ${d.stderr()}`);
    const rec = JSON.parse(d.stderr().trim().split('\n').pop()!) as { level: string; msg: string; error: string };
    assert.equal(rec.msg, 'configuration refused', c.name);
    assert.match(rec.error, c.re(esc), c.name);
    const check = await run(process.execPath, [MAIN, '--check-config', '--config', f]);
    assert.equal(check.code, 78, c.name);
    assert.match(check.stderr, c.re(esc), c.name);
  }
  const good = path.join(base, 'good.conf');
  await fsp.writeFile(good, 'max_clients = 10\n');
  const ok = await run(process.execPath, [MAIN, '--check-config', '--config', good]);
  assert.deepEqual([ok.code, ok.stdout], [0, `${good}: OK\n`]);
});

test('a file the daemon\'s user cannot read is refused (run as nobody)', async (t) => {
  if (process.getuid?.() !== 0) return t.skip('needs root to run the daemon as another user');
  const base = path.join(dir, 'perm');
  await fsp.mkdir(base, { recursive: true, mode: 0o755 });
  await fsp.chmod(dir, 0o755);
  const f = path.join(base, 'secret.conf');
  await fsp.writeFile(f, 'max_clients = 10\n', { mode: 0o600 });
  const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, [MAIN, '--check-config', '--config', f], { uid: 65534, gid: 65534, stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
    child.once('error', (e) => resolve({ code: null, stderr: `${e.message}\n` }));
    child.once('exit', (code) => resolve({ code, stderr: err }));
  });
  // node or the checkout may live where nobody cannot go (a home directory)
  if (/Cannot find module|EACCES|permission denied/i.test(r.stderr) && !r.stderr.includes(f)) return t.skip(`nobody cannot run this node or checkout: ${r.stderr.trim()}`);
  assert.equal(r.code, 78, r.stderr);
  assert.match(r.stderr, new RegExp(`${f.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: cannot read the configuration file: EACCES`));
});

test('SIGHUP: the log level and the allow-lists change at once; listeners and state_dir are reported as needing a restart; a bad file changes nothing; the daemon never exits', async () => {
  const base = path.join(dir, 'hup');
  await fsp.mkdir(base, { recursive: true });
  const conf = path.join(base, 'sparsevirtd.conf');
  const common = ['listen_tls = 1', 'listen_addr = "127.0.0.1"', 'tls_port = 0', ...tlsKeys()];
  await fsp.writeFile(conf, [...common, `unix_sock_dir = "${base}/run"`, `state_dir = "${base}/state"`, 'tls_allowed_cn_list = [ "someone-else" ]', 'log_level = 2'].join('\n'));
  const d = start(['--config', conf]);
  const hup = async (lines: string[], expect: RegExp) => {
    const from = d.stderr().length;
    await fsp.writeFile(conf, lines.join('\n'));
    d.child.kill('SIGHUP');
    return d.line(expect, from);
  };
  try {
    const uris = listening(await d.line(/"sparsevirtd started"/));
    const tlsUri = `${uris.find((u) => u.startsWith('sparsevirt+tls:'))}?pkipath=${pki}`;
    await assert.rejects(connect(tlsUri));
    await d.line(/certificate CN not in the allow-list.*"cn":"sparsevirt-test-client"/);
    const u = await connect(uris[0]);
    await u.close();
    assert.doesNotMatch(d.stderr(), /"level":"debug"/);

    // reloadable keys change, and keys that need a restart are named
    const reloaded = await hup([...common, `unix_sock_dir = "${base}/run2"`, `state_dir = "${base}/state2"`, 'tls_allowed_cn_list = [ "sparsevirt-test-client" ]',
      'tls_allowed_dn_list = [ "O=sparsevirt test,CN=*" ]', 'log_level = 1', 'max_client_transfers = 4'], /"configuration reloaded"/);
    const rec = JSON.parse(reloaded) as { applied: string[] };
    assert.deepEqual(rec.applied.sort(), ['log_level', 'max_client_transfers', 'tls_allowed_cn_list', 'tls_allowed_dn_list']);
    const restart = JSON.parse(await d.line(/"configuration changes not applied: they need a restart"/)) as { level: string; keys: string[] };
    assert.deepEqual([restart.level, restart.keys.sort()], ['warn', ['state_dir', 'unix_sock_dir']]);
    const from = d.stderr().length;
    const s = await connect(tlsUri);
    assert.equal((await s.listAllStoragePools()).length, 1);
    await s.close();
    await d.line(/"level":"debug","msg":"connection opened"/, from);
    assert.ok(fs.existsSync(path.join(base, 'run', 'sparsevirt-sock')), 'the socket stays where it was');

    // the DN list now refuses the client
    await hup([...common, 'tls_allowed_cn_list = [ "sparsevirt-test-client" ]', 'tls_allowed_dn_list = [ "O=other,CN=*" ]', 'log_level = 1'], /"configuration reloaded"/);
    const from2 = d.stderr().length;
    await assert.rejects(connect(tlsUri));
    await d.line(/certificate DN not in tls_allowed_dn_list.*"dn":"O=sparsevirt test,CN=sparsevirt-test-client"/, from2);

    // a bad file: logged with its line, nothing changes
    const bad = JSON.parse(await hup(['log_level = 1', '', 'no_such_key = 1'], /"configuration not reloaded/)) as { level: string; error: string };
    assert.equal(bad.level, 'error');
    assert.equal(bad.error, `${conf}:3: unknown key 'no_such_key' (sparsevirtd.conf(5) lists the keys)`);
    await assert.rejects(connect(tlsUri));
    // a burst of signals
    for (let i = 0; i < 5; i++) d.child.kill('SIGHUP');
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(d.child.exitCode, null, 'alive');
    const again = await connect(uris[0]);
    await again.close();
  } finally {
    assert.equal(await stop(d), 0, d.stderr());
  }
});

test('with JOURNAL_STREAM naming stderr, log lines carry a <N> priority and no timestamp', async () => {
  const base = path.join(dir, 'journal');
  await fsp.mkdir(base, { recursive: true });
  const errFile = path.join(base, 'stderr');
  const fd = fs.openSync(errFile, 'w');
  const st = fs.fstatSync(fd, { bigint: true });
  const sock = path.join(base, 'sock');
  const conf = path.join(base, 'empty.conf');
  fs.writeFileSync(conf, '# nothing: the defaults and the options\n');
  const d = start(['--config', conf, '--listen', `unix:${sock}`, '--state-dir', path.join(base, 'state'), '--log-level', 'debug'],
    { env: { ...process.env, JOURNAL_STREAM: `${st.dev}:${st.ino}` }, stderrFd: fd });
  fs.closeSync(fd);
  try {
    for (let i = 0; i < 500 && !fs.readFileSync(errFile, 'utf8').includes('sparsevirtd started'); i++) await new Promise((r) => setTimeout(r, 20));
    const c = await connect(`sparsevirt+unix:///system?socket=${sock}`);
    await c.close();
  } finally {
    assert.equal(await stop(d), 0);
  }
  const lines = fs.readFileSync(errFile, 'utf8').trim().split('\n');
  for (const l of lines) assert.match(l, /^<[3467]>[a-z]/, l);
  assert.ok(lines.some((l) => /^<6>sparsevirtd started pid=\d+ stateDir=\S+ listen=\["sparsevirt\+unix/.test(l)), lines.join('\n'));
  assert.ok(lines.some((l) => l.startsWith('<7>connection opened')));
  assert.ok(!lines.some((l) => /"time"|\d{4}-\d\d-\d\dT/.test(l)), 'no timestamps');
});
