/**
 * sparsevirtd.conf and its neighbours, without starting a daemon: libvirtd.conf's syntax (values,
 * lists over several lines, comments, `;`), refusals with FILE:LINE: reason, every key's checks,
 * how options override the file, log outputs and their formats (JSON, `<N>` for the journal,
 * journald's stream protocol against a fake journald), and what socket activation hands over.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { test } from 'node:test';
import { parseConf } from '../src/daemon/conf-syntax.js';
import { CONFIG_KEYS, ConfigError, defaultConfig, loadConfig, parseConfig } from '../src/daemon/config.js';
import { Logger, sinkOutput } from '../src/daemon/log.js';
import { openOutputs, parseLogOutputs, stderrIsJournal } from '../src/daemon/log-outputs.js';
import { configListeners, parseDaemonArgs, resolveOptions } from '../src/daemon/options.js';
import { dnMatches, parseListen } from '../src/daemon/server.js';
import { listenFdsFromEnv, listenerRole, renderUnit } from '../src/daemon/systemd.js';
import { scratchDir } from './helpers/images.js';

function refused(text: string): ConfigError {
  try {
    parseConfig(text, '/etc/x.conf');
  } catch (err) {
    assert.ok(err instanceof ConfigError, String(err));
    assert.equal(err.code, 'ERR_CONFIG');
    return err;
  }
  assert.fail(`accepted: ${text}`);
}

test('the syntax: integers, strings in three quotings, lists over lines with comments and a trailing comma, `;`', () => {
  const entries = parseConf([
    '# comment',
    '',
    'a = 1',
    'b = -42   # after a value',
    "c = 'single'; d = \"double\"",
    'e = """two',
    'lines"""',
    'f = [ "x", "y",',
    '      # between items',
    '      "z", ]',
    'g = []',
    '  h=+7',
  ].join('\n'), 'f.conf');
  const v = Object.fromEntries(entries.map((e) => [e.name, e.value.type === 'list' ? e.value.items.map((i) => (i as { value: unknown }).value) : e.value.value]));
  assert.deepEqual(v, { a: 1, b: -42, c: 'single', d: 'double', e: 'two\nlines', f: ['x', 'y', 'z'], g: [], h: 7 });
  assert.deepEqual(entries.map((e) => [e.name, e.line]), [['a', 3], ['b', 4], ['c', 5], ['d', 5], ['e', 6], ['f', 8], ['g', 11], ['h', 12]]);
});

test('syntax errors name the file, the line and what is wrong', () => {
  const cases: Array<[string, number, RegExp]> = [
    ['listen_tcp 1', 1, /expecting '=' after 'listen_tcp'/],
    ['\n\nlisten_addr = "0.0.0.0', 3, /unterminated string/],
    ['listen_tcp = ', 1, /expecting a value/],
    ['listen_tcp = yes', 1, /expecting a value .* found 'y'/],
    ['tcp_port = 12ab', 1, /not an integer/],
    ['listen_tcp = 1 2', 1, /expecting the end of the line/],
    ['tls_allowed_dn_list = [ "a"\n  "b" ]', 2, /expecting ',' or '\]'/],
    ['tls_allowed_dn_list = [ "a",\n', 1, /list is not closed/],
    ['= 1', 1, /expecting a name before '='/],
    ['x = """never closed\n\n', 1, /unterminated string/],
  ];
  for (const [text, line, re] of cases) {
    const err = refused(text);
    assert.equal(err.line, line, text);
    assert.match(err.message, new RegExp(`^/etc/x\\.conf:${line}: `), text);
    assert.match(err.reason, re, text);
  }
});

test('keys: unknown, set twice, wrong type, bad value, each refused with its line', () => {
  const cases: Array<[string, number, RegExp]> = [
    ['auth_tcp = "none"', 1, /unknown key 'auth_tcp'/],
    ['listen_tcp = 1\nlisten_tcp = 0', 2, /'listen_tcp' is set twice \(first on line 1\)/],
    ['listen_tcp = "1"', 1, /listen_tcp: expected 0 or 1, found a "string"/],
    ['listen_tls = 2', 1, /listen_tls: expected 0 or 1, found 2/],
    ['tcp_port = "http"', 1, /tcp_port: 'http' is not a port number/],
    ['tls_port = 70000', 1, /port 70000 is out of range/],
    ['unix_sock_rw_perms = 0660', 1, /an integer is read as decimal/],
    ['unix_sock_ro_perms = "rw-rw----"', 1, /not an octal mode/],
    ['unix_sock_group = "no-such-group-sv"', 1, /no group 'no-such-group-sv'/],
    ['unix_sock_dir = "run/sv"', 1, /not an absolute path/],
    ['state_dir = [ "/x" ]', 1, /expected a "string", found a \[ list \]/],
    ['tls_allowed_dn_list = "CN=x"', 1, /expected a \[ list \] of strings/],
    ['tls_allowed_cn_list = [\n "a",\n 3 ]', 3, /list items must be strings/],
    ['log_level = 5', 1, /5 is not a level/],
    ['log_level = "loud"', 1, /'loud' is not a level/],
    ['log_outputs = "3:syslog:sparsevirtd"', 1, /output 'syslog' is not supported/],
    ['log_outputs = "9:stderr"', 1, /level 9 is not 1/],
    ['log_outputs = "1:file:relative.log"', 1, /absolute path/],
    ['max_clients = 0', 1, /0 is out of range \(1 to/],
    ['max_client_transfers = -1', 1, /out of range/],
    ['keepalive_interval = -2', 1, /out of range \(-1 to/],
    ['keepalive_count = "5"', 1, /expected an integer/],
    ['listen_addr = "a b"', 1, /not an address/],
  ];
  for (const [text, line, re] of cases) {
    const err = refused(text);
    assert.equal(err.line, line, text);
    assert.match(err.message, re, text);
  }
});

test('a file with every key is read into the configuration', () => {
  const c = parseConfig([
    'listen_tcp = 1', 'listen_tls = 1', 'listen_addr = "127.0.0.1"', 'tcp_port = "16609"', 'tls_port = 16614',
    'unix_sock_dir = "/run/svt"', 'unix_sock_group = "0"', 'unix_sock_rw_perms = "0660"', 'unix_sock_ro_perms = "0640"',
    'unix_sock_ro = 1', 'key_file = "/p/k.pem"', 'cert_file = "/p/c.pem"', 'ca_file = "/p/ca.pem"',
    'tls_allowed_dn_list = [ "O=x,CN=*" ]', 'tls_allowed_cn_list = [ "a", "b" ]', 'state_dir = "/var/lib/svt"',
    'log_level = 1', 'log_outputs = "3:stderr 1:file:/var/log/svt.log 4:journald"', 'max_clients = 10',
    'max_client_transfers = 3', 'keepalive_interval = -1', 'keepalive_count = 0',
  ].join('\n'), '/etc/x.conf');
  assert.equal(c.lines.size, CONFIG_KEYS.length, 'the test sets every key');
  assert.deepEqual({ ...c, lines: undefined }, {
    file: '/etc/x.conf', listenTcp: true, listenTls: true, listenAddr: '127.0.0.1', tcpPort: 16609, tlsPort: 16614,
    unixSockDir: '/run/svt', unixSockGroup: 0, unixSockRwPerms: 0o660, unixSockRoPerms: 0o640, unixSockRo: true,
    keyFile: '/p/k.pem', certFile: '/p/c.pem', caFile: '/p/ca.pem', tlsAllowedDnList: ['O=x,CN=*'], tlsAllowedCnList: ['a', 'b'],
    stateDir: '/var/lib/svt', logLevel: 'debug',
    logOutputs: [{ level: 'warn', kind: 'stderr' }, { level: 'debug', kind: 'file', path: '/var/log/svt.log' }, { level: 'error', kind: 'journald' }],
    maxClients: 10, maxClientTransfers: 3, keepaliveInterval: -1, keepaliveCount: 0, lines: undefined,
  });
  assert.deepEqual(configListeners(c), [
    { kind: 'unix', path: '/run/svt/sparsevirt-sock' }, { kind: 'unix', path: '/run/svt/sparsevirt-sock-ro', readonly: true },
    { kind: 'tcp', host: '127.0.0.1', port: 16609 }, { kind: 'tls', host: '127.0.0.1', port: 16614 },
  ]);
  const o = resolveOptions({}, c);
  assert.deepEqual([o.socketMode, o.socketModeRo, o.socketGroup, o.maxClients, o.maxClientTransfers, o.keepaliveInterval, o.keepaliveCount, o.logLevel],
    [0o660, 0o640, 0, 10, 3, 0, 0, 'debug']);
  assert.deepEqual(o.tls, { cert: '/p/c.pem', key: '/p/k.pem', ca: '/p/ca.pem', pkipath: undefined, allow: ['a', 'b'], allowDn: ['O=x,CN=*'] });
  // every key has its documentation
  for (const k of CONFIG_KEYS) assert.ok(k.doc.length > 40 && k.type && k.default, k.name);
});

test('options override the file; --listen replaces its listeners; --pkipath its TLS files', () => {
  const c = parseConfig('state_dir = "/var/lib/a"\nlog_level = 4\nunix_sock_ro = 1\nlisten_tcp = 1\ncert_file = "/c.pem"\ntls_allowed_cn_list = [ "x" ]', '/f');
  const cmd = parseDaemonArgs(['--state-dir', '/tmp/b', '--log-level', 'debug', '--listen', 'unix-ro:/tmp/ro.sock', '--pkipath', '/pki', '--tls-allow', 'y'], c);
  assert.equal(cmd.action, 'run');
  if (cmd.action !== 'run') return;
  assert.equal(cmd.options.stateDir, '/tmp/b');
  assert.equal(cmd.options.logLevel, 'debug');
  assert.deepEqual(cmd.options.listen, [{ kind: 'unix', path: '/tmp/ro.sock', readonly: true }]);
  assert.deepEqual(cmd.options.tls, { cert: undefined, key: undefined, ca: undefined, pkipath: '/pki', allow: ['y'] });
  const fromFile = parseDaemonArgs([], c);
  assert.equal(fromFile.action, 'run');
  if (fromFile.action !== 'run') return;
  assert.equal(fromFile.options.logLevel, 'error');
  assert.equal(fromFile.options.listen.length, 3);
  assert.deepEqual(parseListen('unix-ro:/x'), { kind: 'unix', path: '/x', readonly: true });
  assert.deepEqual(parseDaemonArgs(['--check-config', '--config', '/f.conf']), { action: 'check-config', flags: { config: '/f.conf' } });
  assert.deepEqual(parseDaemonArgs(['--install-units', '--prefix', '/opt/x']), { action: 'install-units', prefix: '/opt/x' });
  assert.throws(() => parseDaemonArgs(['--prefix', '/opt/x']), /--prefix goes with --install-units/);
});

test('loading: a missing default file is the defaults, a missing --config file, a directory or an unreadable file is refused', async () => {
  const dir = await scratchDir(tmpdir(), 'sv-conf-');
  try {
    assert.deepEqual(loadConfig(path.join(dir, 'none.conf'), false), defaultConfig());
    assert.throws(() => loadConfig(path.join(dir, 'none.conf'), true), (err: ConfigError) => err.code === 'ERR_CONFIG' && err.line === null && /none\.conf: cannot read the configuration file: .*ENOENT/.test(err.message));
    assert.throws(() => loadConfig(dir, false), /: cannot read the configuration file: it is a directory/);
    const f = path.join(dir, 'ok.conf');
    fs.writeFileSync(f, 'max_clients = 7\n');
    assert.equal(loadConfig(f, true).maxClients, 7);
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

test('log outputs: libvirt notation; JSON and <N> lines; levels per output; reconfigure reaches children', () => {
  assert.deepEqual(parseLogOutputs(' 1:file:/var/log/a.log   3:stderr 2:journald '), [
    { level: 'debug', kind: 'file', path: '/var/log/a.log' }, { level: 'warn', kind: 'stderr' }, { level: 'info', kind: 'journald' },
  ]);
  assert.throws(() => parseLogOutputs(''), /no output/);
  assert.throws(() => parseLogOutputs('stderr'), /not LEVEL:OUTPUT/);
  const json: string[] = [];
  const journal: string[] = [];
  const log = Logger.create('info', [sinkOutput((l) => json.push(l)), sinkOutput((l) => journal.push(l), 'journal', 'warn')]);
  const child = log.child({ client: 3 });
  child.debug('hidden');
  child.info('client connected', { transport: 'unix', path: '/a b', n: 5n });
  child.warn('slow\nclient', { obj: { x: 1 } });
  assert.equal(json.length, 2);
  const rec = JSON.parse(json[0]!) as Record<string, unknown>;
  assert.deepEqual({ ...rec, time: undefined }, { time: undefined, level: 'info', msg: 'client connected', client: 3, transport: 'unix', path: '/a b', n: '5' });
  assert.deepEqual(journal, ['<4>slow client client=3 obj={"x":1}\n']);
  log.reconfigure('debug');
  child.debug('now shown', { path: '/x' });
  assert.match(json[json.length - 1]!, /"level":"debug","msg":"now shown"/);
  const other: string[] = [];
  log.reconfigure('error', [sinkOutput((l) => other.push(l), 'journal')]);
  child.warn('dropped');
  child.error('kept', { code: 'ERR_IO' });
  assert.deepEqual(other, ['<3>kept client=3 code=ERR_IO\n']);
  assert.equal(log.enabled('warn'), false);
});

test('stderr is the journal only when JOURNAL_STREAM names it', () => {
  const st = fs.fstatSync(2, { bigint: true });
  assert.equal(stderrIsJournal({ JOURNAL_STREAM: `${st.dev}:${st.ino}` }), true);
  assert.equal(stderrIsJournal({ JOURNAL_STREAM: `${st.dev}:${st.ino + 1n}` }), false);
  assert.equal(stderrIsJournal({}), false);
  assert.equal(stderrIsJournal({ JOURNAL_STREAM: 'x' }), false);
});

test('journald output: the stream protocol (header, then <N> lines) to a fake journald; a file output appends JSON', async () => {
  const dir = await scratchDir(tmpdir(), 'sv-journal-');
  const sock = path.join(dir, 'stdout');
  let got = '';
  const server = net.createServer((c) => c.on('data', (b) => (got += b.toString())));
  await new Promise<void>((r) => server.listen(sock, r));
  try {
    const file = path.join(dir, 'd.log');
    const outs = openOutputs(parseLogOutputs(`2:journald 1:file:${file}`), { journalSocket: sock });
    const log = Logger.create('debug', outs);
    log.info('started', { pid: 1 });
    log.debug('detail');
    for (let i = 0; i < 100 && !got.includes('started'); i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(got, 'sparsevirtd\n\n6\n1\n0\n0\n0\n<6>started pid=1\n');
    log.reconfigure('debug', []); // closes both
    const lines = fs.readFileSync(file, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { msg: string });
    assert.deepEqual(lines.map((l) => l.msg), ['started', 'detail']);
    assert.throws(() => openOutputs(parseLogOutputs('3:journald'), { journalSocket: path.join(dir, 'none') }), /journald is not running here/);
    assert.throws(() => openOutputs(parseLogOutputs(`3:file:${dir}/no/such/dir.log`)), /log output 3:file:.*cannot open/);
  } finally {
    server.close();
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

test('socket activation: fds from 3 for our pid only, by name; the variables are removed', () => {
  const env: NodeJS.ProcessEnv = { LISTEN_FDS: '2', LISTEN_PID: '4242', LISTEN_FDNAMES: 'sparsevirtd.socket:sparsevirtd-ro.socket' };
  assert.deepEqual(listenFdsFromEnv(env, 4242), [{ fd: 3, name: 'sparsevirtd.socket' }, { fd: 4, name: 'sparsevirtd-ro.socket' }]);
  assert.deepEqual(env, {});
  assert.deepEqual(listenFdsFromEnv({ LISTEN_FDS: '1', LISTEN_PID: '1' }, 4242), []);
  assert.deepEqual(listenFdsFromEnv({ LISTEN_FDS: '1', LISTEN_PID: '7' }, 7), [{ fd: 3, name: 'unknown' }]);
  assert.deepEqual(['sparsevirtd.socket', 'sparsevirtd-ro.socket', 'sparsevirtd-tcp.socket', 'sparsevirtd-tls.socket', 'unknown', 'ro'].map(listenerRole),
    ['rw', 'ro', 'tcp', 'tls', null, 'ro']);
  assert.equal(renderUnit('[Service]\nExecStart=/usr/local/bin/sparsevirtd\n', { node: '/opt/node 24/bin/node', script: '/x/sparsevirtd.mjs' }),
    '[Service]\nExecStart="/opt/node 24/bin/node" /x/sparsevirtd.mjs\n');
});

test('tls_allowed_dn_list patterns: * and ?, anchored, no other special characters', () => {
  assert.equal(dnMatches('C=GB,O=Example,CN=*', 'C=GB,O=Example,CN=client1'), true);
  assert.equal(dnMatches('C=GB,O=Example,CN=*', 'C=FR,O=Example,CN=client1'), false);
  assert.equal(dnMatches('*CN=client?', 'O=x,CN=client7'), true);
  assert.equal(dnMatches('*CN=client?', 'O=x,CN=client77'), false);
  assert.equal(dnMatches('O=a.b,CN=(x)', 'O=a.b,CN=(x)'), true);
  assert.equal(dnMatches('O=a.b,CN=x', 'O=aXb,CN=x'), false);
});
