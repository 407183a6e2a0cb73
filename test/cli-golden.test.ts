/**
 * Golden tests: real `virsh -c URI …` and `sparsevirt -c URI …` run with the same arguments
 * against the same server and scratch pool must print the same stdout and stderr, byte for byte,
 * and exit with the same status. Commands that change state run twice, with the state restored
 * in between, so both see the same world.
 */
import assert from 'node:assert/strict';
import { mkdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import {
  LIBVIRTD_TCP_URI, LIBVIRTD_TLS_URI, LIBVIRTD_URI, SCRATCH_ROOT, requireLibvirtListeners, virsh, virshOk, withScratchPool, type ScratchPool,
} from './helpers/libvirt.js';
import {
  CLI_URI, assertSame, cli, cliRaw, cliWithInput, requireServer, same, sameAll, text, virshC, virshRaw, withStdin,
} from './cli-support.js';

const C = ['-c', CLI_URI];

/** Help text minus the options sparsevirt adds (marked "(sparsevirt extension)"). */
function withoutExtensions(help: string): string {
  return help
    .replace(/ \[--(json|sparse-fallback|verbose)\]/g, '')
    .split('\n').filter((l) => !l.includes('(sparsevirt extension)')).join('\n')
    .replace(/\n {2}OPTIONS\n\n/, '\n'); // an OPTIONS section that had only extensions
}

/** virsh as the helpers run it (with -q), on the server under test. */
const v = (args: string[]) => virshOk(args, { uri: CLI_URI });

test('golden: parse errors, help, host commands, global options', async (t) => {
  if (!(await requireServer(t))) return;
  const cases: string[][] = [
    ['uri'],
    ['hostname'],
    ['version'],
    ['version', '--daemon'],
    ['-q', 'uri'],
    ['--connect', CLI_URI, 'uri'],
    ['help', 'vol-resize'],
    ['help', 'pool-define-as'],
    ['help', 'pool-build'],
    ['help', 'pool-start'],
    ['help', 'pool-autostart'],
    ['help', 'vol-wipe'],
    ['help', 'vol-delete'],
    ['help', 'vol-dumpxml'],
    ['help', 'pool-dumpxml'],
    ['help', 'help'],
    ['help', 'quit'],
    ['-q', 'help', 'pool-refresh'],
    ['pool-destroy', '--help'],
    ['help', '--command', 'pool-undefine'],
    ['help', 'nosuchcommand'],
    ['pool-info'],
    ['pool-info', 'a', 'b'],
    ['pool-info', '--bogus', 'x'],
    ['pool-info', '--help', '--bogus'],
    ['nosuch-command'],
    ['pool-info', '--bytes=1', 'x'],
    ['pool-info', '--pool='],
    ['pool-info', ''],
    ['vol-info', '--vol', 'a', '--vol', 'b'],
    ['vol-info', 'a', '--vol', 'b'],
    ['vol-info', '--pool'],
    ['vol-upload', '--pool', 'p', 'v'],
    ['pool-list', '--all', '--inactive'],
    ['pool-list', '--details', '--name'],
    ['pool-list', '--details', '--uuid'],
    ['pool-list', '--type', 'bogus'],
    ['pool-list', '--type', ''],
    ['vol-create-as'],
    ['uri', '--bogus'],
    ['uri; pool-info nosuch-pool-x'],
    ['pool-info nosuch-pool-x; uri'],
    ['uri # a comment'],
    ['uri; quit; hostname'],
    ['pool-info "nosuch"x'],
    ["pool-info 'nosuch"],
    ['pool-info sv\\'],
    ['pool-info "sv'],
    [' '],
    [''],
  ];
  await sameAll(cases.map((args) => [...C, ...args]));
  // Commands with sparsevirt extensions document them: the rest of the help is virsh's.
  for (const cmd of ['pool-info', 'pool-list', 'vol-list', 'vol-info', 'vol-upload', 'vol-download', 'vol-create-as', 'vol-key', 'vol-path', 'uri', 'hostname', 'version']) {
    const theirs = await virshRaw([...C, 'help', cmd]);
    const ours = await cliRaw([...C, 'help', cmd]);
    assert.equal(ours.code, 0);
    assert.equal(withoutExtensions(text(ours.stdout)), text(theirs.stdout), `help ${cmd}`);
    assert.match(text(ours.stdout), /\(sparsevirt extension\)/);
  }
  // global options before the command
  for (const args of [['-q', '-c', CLI_URI, 'uri'], ['-qc', CLI_URI, 'uri'], [`-c${CLI_URI}`, 'uri'], [`--connect=${CLI_URI}`, 'uri'],
    ['--conn', CLI_URI, 'uri'], ['-r', '-c', CLI_URI, 'hostname'], ['--readonly', '-c', CLI_URI, 'uri'],
    ['-z'], ['--bogus'], ['-c'], ['--connect'], ['--version'], ['-v'], ['-v', 'uri'], ['--version=short'],
    ['-k', 'abc', 'uri'], ['-k', '-1', 'uri'], ['-K', 'x', 'uri'], ['-d', 'x', 'uri'], ['--help=1'],
    ['-d', '9', '-c', CLI_URI, 'uri'], ['-k', '0', '-c', CLI_URI, 'uri'], ['--', '-c', CLI_URI]]) {
    await same(args);
  }
});

test('golden: the interactive shell reading commands from a pipe', async (t) => {
  if (!(await requireServer(t))) return;
  const script = 'uri\n\npool-info nosuch-pool;uri\n  \nbogus\npool-info "x\nhelp pool-refresh\nquit\nuri\n';
  for (const g of [['-q'], ['-q', '-r']]) {
    const theirs = await withStdin(['virsh', ...g, ...C], script);
    const ours = await cliWithInput([...g, ...C], script);
    assertSame(ours, theirs, `${g.join(' ')} <<< ${JSON.stringify(script)}`);
  }
  const theirs = await withStdin(['virsh', '-q', ...C], 'hostname'); // EOF without a newline
  assertSame(await cliWithInput(['-q', ...C], 'hostname'), theirs, 'hostname at EOF');
  // the banner names the program
  const banner = await cliWithInput([...C], 'uri\n');
  const vb = await withStdin(['virsh', ...C], 'uri\n');
  assert.equal(text(banner.stdout), text(vb.stdout).replace('Welcome to virsh,', 'Welcome to sparsevirt,'));
});

test('golden: connection failures', async (t) => {
  if (!(await requireServer(t))) return;
  const missing = path.join(SCRATCH_ROOT, `sparsevirt-no-such-socket-${process.pid}`);
  const bad = `qemu+unix:///system?socket=${missing}`;
  await same(['-c', bad, 'pool-list']);
  await same(['-c', bad, 'help', 'pool-info']);
  await same(['-c', bad, 'nosuch']);
  await same(['-c', 'qemu+tcp://127.0.0.1:1/system', 'pool-list']);
  // lazily, from LIBVIRT_DEFAULT_URI: every command that needs one fails, help still works
  const env = { ...process.env, LIBVIRT_DEFAULT_URI: bad };
  await same(['pool-list'], { env });
  await same(['help pool-build; uri; hostname'], { env });
  await same(['help', 'vol-wipe'], { env });
  // and the URI printed by `uri` is the one given
  await same(['uri'], { env: { ...process.env, LIBVIRT_DEFAULT_URI: CLI_URI } });
  // virsh's own VIRSH_DEFAULT_CONNECT_URI wins over LIBVIRT_DEFAULT_URI, and -c over both
  await same(['uri'], { env: { ...process.env, VIRSH_DEFAULT_CONNECT_URI: CLI_URI, LIBVIRT_DEFAULT_URI: bad } });
  await same(['pool-list'], { env: { ...process.env, VIRSH_DEFAULT_CONNECT_URI: bad } });
  await same(['-c', CLI_URI, 'uri'], { env: { ...process.env, VIRSH_DEFAULT_CONNECT_URI: bad } });
});

test('golden: over libvirtd\'s TCP listener', async (t) => {
  if (CLI_URI !== LIBVIRTD_URI || !(await requireLibvirtListeners(t))) return;
  const U = ['-c', LIBVIRTD_TCP_URI];
  await sameAll([['uri'], ['hostname'], ['pool-list', '--all'], ['pool-info', 'nosuch-pool']].map((a) => [...U, ...a]), { retries: 5 });
});

test('golden: over libvirtd\'s TLS listener', async (t) => {
  if (CLI_URI !== LIBVIRTD_URI || !(await requireLibvirtListeners(t))) return;
  const U = ['-c', LIBVIRTD_TLS_URI];
  for (const a of [['uri'], ['hostname'], ['pool-info', 'nosuch-pool']]) await same([...U, ...a], { timeoutMs: 15_000 });
  const missing = ['-c', 'qemu+tls://127.0.0.1:16514/system?pkipath=/nonexistent-pki'];
  await same([...missing, 'uri']);
});

test('golden: pools', async (t) => {
  if (!(await requireServer(t))) return;
  await withScratchPool('cligold', async (pool) => {
    const P = pool.name;
    const uuid = (await v(['pool-uuid', P])).trim();
    // Listings include every pool of the host: others may come and go between the two runs.
    const list = (args: string[]) => same([...C, ...args], { retries: 5 });
    for (const args of [['pool-list'], ['pool-list', '--all'], ['pool-list', '--inactive'], ['pool-list', '--details'],
      ['pool-list', '--all', '--details'], ['pool-list', '--name'], ['pool-list', '--uuid'], ['pool-list', '--uuid', '--name'],
      ['pool-list', '--type', 'dir'], ['pool-list', '--type', 'dir,fs'], ['pool-list', '--type', 'netfs'], ['pool-list', '--persistent'],
      ['pool-list', '--transient'], ['pool-list', '--autostart'], ['pool-list', '--no-autostart', '--all'], ['-q', 'pool-list', '--all'],
      ['-q', 'pool-list', '--all', '--details'], ['pool-list --all --details']]) {
      await list(args);
    }
    // pool-info: the free space of /dev/shm may move between the runs
    for (const args of [['pool-info', P], ['pool-info', P, '--bytes'], ['pool-info', uuid], ['pool-info', '--pool', P], ['-q', 'pool-info', P]]) {
      await same([...C, ...args], { retries: 5 });
    }
    await same([...C, 'pool-info', 'nosuch-pool']);
    await same([...C, 'pool-info', '00000000-0000-0000-0000-000000000000']);
    await same([...C, 'pool-dumpxml', P], { retries: 5 });
    await same([...C, 'pool-dumpxml', '--inactive', P]);
    await same([...C, 'pool-dumpxml', uuid], { retries: 5 });
    await same([...C, 'pool-dumpxml', 'nosuch-pool']);
    await same([...C, 'pool-refresh', P]);
    await same([...C, '-q', 'pool-refresh', P]);
    await same([...C, 'pool-refresh', 'nosuch-pool']);
    await same([...C, 'pool-build', P]);
    await same([...C, 'pool-start', P]); // already active
    await same([...C, 'pool-start', P, '--overwrite', '--no-overwrite']);
    await same([...C, 'pool-undefine', P]); // still active
  });
});

test('golden: pool life cycle (define-as, build, start, autostart, destroy, undefine)', async (t) => {
  if (!(await requireServer(t))) return;
  const name = `cligold-life-${process.pid}`;
  const dir = path.join(SCRATCH_ROOT, `sparsevirt-test-${name}`);
  await mkdir(dir, { recursive: true });
  const cleanup = async () => {
    await virsh(['pool-destroy', name], { uri: CLI_URI });
    await virsh(['pool-undefine', name], { uri: CLI_URI });
  };
  await cleanup();
  try {
    const define = [...C, 'pool-define-as', name, 'dir', '--target', dir];
    // each state-changing command: virsh, undo, sparsevirt
    const theirs = await virshRaw(define);
    await v(['pool-undefine', name]);
    const ours = await cliRaw(define);
    assertSame(ours, theirs, define.join(' '));
    await same(define); // exists already
    await same([...C, 'pool-define-as', '--print-xml', name, 'dir', '--target', dir, '--source-host', 'h', '--source-path', '/p',
      '--source-dev', '/dev/x', '--source-name', 'n', '--source-format', 'f', '--auth-type', 'chap', '--auth-username', 'u',
      '--secret-usage', 'su', '--adapter-wwnn', '1', '--adapter-wwpn', '2', '--adapter-parent', 'p', '--source-protocol-ver', '3',
      '--source-initiator', 'iqn']);
    await same([...C, 'pool-define-as', '--print-xml', name, 'dir', '--adapter-name', 'host0', '--secret-usage', 'a', '--secret-uuid', 'b']);
    await same([...C, 'pool-define-as', '--print-xml', '--name', name, '--type', 'dir']);
    await same([...C, 'pool-define-as', name]);
    await same([...C, 'pool-define-as', '', 'dir']);
    await same([...C, '-q', 'pool-define-as', '--print-xml', name, 'dir', '--target', dir]);

    const pair = async (args: string[], undo: () => Promise<unknown>) => {
      const a = await virshRaw([...C, ...args]);
      await undo();
      const b = await cliRaw([...C, ...args]);
      assertSame(b, a, args.join(' '));
    };
    await same([...C, 'pool-info', name]); // inactive: no sizes
    await same([...C, 'pool-list', '--all', '--details'], { retries: 5 });
    await same([...C, 'pool-list', '--inactive', '--uuid'], { retries: 5 });
    await same([...C, 'vol-list', name]); // not active
    await same([...C, 'vol-info', '--pool', name, 'x']); // pool not active
    await same([...C, 'pool-build', name]);
    await same([...C, '-q', 'pool-build', name, '--no-overwrite']);
    await pair(['pool-start', name], () => v(['pool-destroy', name]));
    await same([...C, 'pool-start', name]);
    await pair(['pool-autostart', name], () => v(['pool-autostart', name, '--disable']));
    await same([...C, 'pool-info', name], { retries: 5 });
    await same([...C, 'pool-list', '--autostart', '--details'], { retries: 5 });
    await pair(['pool-autostart', '--disable', name], () => v(['pool-autostart', name]));
    await same([...C, '-q', 'pool-autostart', name, '--disable']);
    await pair(['pool-destroy', name], () => v(['pool-start', name]));
    await same([...C, 'pool-destroy', name]);
    await pair(['pool-start', name, '--build'], () => v(['pool-destroy', name]));
    await v(['pool-destroy', name]);
    await pair(['pool-undefine', name], () => v(['pool-define-as', name, 'dir', '--target', dir]));
    await same([...C, 'pool-undefine', name]);
    await v(['pool-define-as', name, 'dir', '--target', dir]);
    await pair(['-q', 'pool-undefine', name], () => v(['pool-define-as', name, 'dir', '--target', dir]));
    await v(['pool-define-as', name, 'dir', '--target', dir]);
    await same([...C, '-r', 'pool-undefine', name]); // read-only connection
  } finally {
    await cleanup();
    await rm(dir, { recursive: true, force: true });
  }
});

async function volumeCases(pool: ScratchPool): Promise<void> {
  const P = pool.name;
  const path0 = await createVol(pool, 'a.img', '1M');
  await createVol(pool, 'B.img', '3000000');
  await createVol(pool, 'c.img', '0');
  const pair = async (args: string[], undo: () => Promise<unknown>) => {
    const a = await virshRaw([...C, ...args]);
    await undo();
    const b = await cliRaw([...C, ...args]);
    assertSame(b, a, args.join(' '));
  };
  await sameAll([
    ['vol-list', P], ['vol-list', P, '--details'], ['vol-list', '--pool', P, '--details'], ['-q', 'vol-list', P],
    ['-q', 'vol-list', P, '--details'], ['vol-list', 'nosuch-pool'],
    ['vol-info', '--pool', P, 'a.img'], ['vol-info', 'a.img', P], ['vol-info', path0], ['vol-info', '--vol', path0, '--bytes'],
    ['vol-info', '--pool', P, 'a.img', '--physical'], ['vol-info', '--pool', P, 'a.img', '--physical', '--bytes'],
    ['vol-info', 'a.img'], ['vol-info', '--pool', P, 'nosuch.img'], ['vol-info', '--pool', 'nosuch-pool', 'a.img'],
    ['vol-info', '--pool', P, ''], ['vol-info', '--pool', '', 'a.img'],
    ['vol-path', '--pool', P, 'a.img'], ['vol-path', path0], ['vol-path', 'a.img'],
    ['vol-key', '--pool', P, 'B.img'], ['vol-key', path0], ['vol-key', 'nosuch'],
    ['vol-dumpxml', '--pool', P, 'a.img'], ['vol-dumpxml', path0], ['vol-dumpxml', '--pool', P, 'nosuch.img'],
    ['vol-create-as', P, 'a.img', '1M', '--allocation', '0', '--format', 'raw'], // exists
    ['vol-create-as', P, 'x.img', '1Q'], ['vol-create-as', P, 'x.img', '-1'], ['vol-create-as', P, 'x.img', '1.5G'],
    ['vol-create-as', P, 'x.img', '99999999999T'], ['vol-create-as', P, 'x.img', '18446744073709551616'],
    ['vol-create-as', P, 'x.img', '1M', '--allocation', 'x'], ['vol-create-as', P, 'x.img', ''],
    ['vol-create-as', 'nosuch-pool', 'x.img', '1M'],
    ['vol-create-as', P, 'x.img', '1M', '--print-xml'], ['vol-create-as', P, 'x.img', ' 5', '--print-xml'],
    ['vol-create-as', P, 'x.img', '+5kb', '--allocation', '1KiB', '--print-xml', '--format', 'qcow2'],
    ['vol-create-as', P, 'x.img', '1m', '--allocation', '', '--print-xml'],
    ['vol-create-as', P, 'x.img', '1G', '--backing-vol', 'a.img', '--backing-vol-format', 'raw', '--print-xml'],
    ['vol-create-as', P, 'x.img', '1G', '--backing-vol', 'nosuch.img', '--print-xml'],
    ['vol-resize', '--pool', P, 'a.img', '512K'], ['vol-resize', '--pool', P, 'a.img', '--', '-512K'],
    ['vol-resize', '--pool', P, 'a.img', 'x'], ['vol-resize', '--pool', P, 'a.img', '1Q'],
    ['vol-wipe', '--pool', P, 'a.img', '--algorithm', 'foo'], ['vol-wipe', '--pool', P, 'a.img', '--algorithm', ''],
    ['vol-delete', '--pool', P, 'nosuch.img'], ['vol-delete', 'nosuch.img'],
    ['vol-download', '--pool', P, 'a.img', '/tmp/x', '--offset', '-5'],
    ['vol-download', '--pool', P, 'a.img', '/tmp/x', '--offset', 'abc'],
    ['vol-download', '--pool', P, 'a.img', '/tmp/x', '--length', '1.5'],
    ['vol-upload', '--pool', P, 'nosuch.img', '/etc/hostname'],
    ['vol-upload', 'nosuch.img', '/etc/hostname'],
    ['vol-download', 'nosuch.img', '/tmp/x'],
  ].map((args) => [...C, ...args]));
  // local files: virsh's words, then the system's reason
  for (const [args, words, reason] of [
    [['vol-upload', '--pool', P, 'a.img', '/nonexistent/file'], 'cannot read /nonexistent/file', 'No such file or directory'],
    [['vol-upload', '--pool', P, 'a.img', '/etc/hostname/x'], 'cannot read /etc/hostname/x', 'Not a directory'],
    [['vol-download', '--pool', P, 'a.img', '/nonexistent/dir/file'], 'cannot create /nonexistent/dir/file', 'No such file or directory'],
  ] as const) {
    const theirs = await virshRaw([...C, ...args]);
    assert.equal(text(theirs.stderr), `error: ${words}\n`, `virsh: ${args.join(' ')}`);
    assertSame(await cliRaw([...C, ...args]), { ...theirs, stderr: Buffer.from(`error: ${words}: ${reason}\n`) }, args.join(' '));
  }
  await same([...C, 'vol-dumpxml', '--pool', P, 'a.img']);
  // --xpath / --wrap: libxml2's node dumps, errors and odd cases
  const xpaths = ['/volume/target', '//capacity', '//capacity/@unit', '/volume/name/text()', '/volume/target/*', '//path[1]',
    "/volume/capacity[@unit='bytes']", '/volume/*[2]', '(//path)[2]', '//target/path | //key', '/', '..', '//@*', 'target/path',
    '//permissions/*[last()]', '//timestamps/*[position() < 3]/text()', "//*[starts-with(name(), 'c')]", '/nosuch',
    'string(/volume/name)', 'count(//path)', '///', '//name | 5'];
  await sameAll(xpaths.flatMap((x) => [[...C, 'vol-dumpxml', '--pool', P, 'a.img', '--xpath', x], [...C, 'vol-dumpxml', '--pool', P, 'a.img', '--xpath', x, '--wrap']]));
  await same([...C, 'vol-dumpxml', '--pool', P, 'a.img', '--xpath', '']);
  for (const x of ['//source', '/pool/target/path/text()', '//permissions', '/pool/@type']) {
    await same([...C, 'pool-dumpxml', P, '--xpath', x], { retries: 5 });
    await same([...C, 'pool-dumpxml', P, `--xpath=${x}`, '--wrap'], { retries: 5 });
  }
  await pair(['vol-create-as', P, 'n.img', '1M', '--allocation', '0', '--format', 'raw'], () => v(['vol-delete', '--pool', P, 'n.img']));
  await pair(['vol-delete', '--pool', P, 'n.img'], () => createVol(pool, 'n.img', '1M'));
  await pair(['-q', 'vol-create-as', P, 'n.img', '2M', '--allocation', '0'], () => v(['vol-delete', '--pool', P, 'n.img']));
  await pair(['vol-delete', path.join(pool.path, 'n.img')], () => createVol(pool, 'n.img', '1M'));
  await pair(['vol-create-as', '--pool', P, '--name', 'n.img', '--capacity', '1KiB', '--allocation=0'], () => v(['vol-delete', '--pool', P, 'n.img']));
  await pair(['vol-resize', '--pool', P, 'n.img', '2M'], () => v(['vol-resize', '--pool', P, 'n.img', '1K', '--shrink']));
  await pair(['vol-resize', '--pool', P, 'n.img', '1M', '--delta'], () => v(['vol-resize', '--pool', P, 'n.img', '2M', '--shrink']));
  await pair(['vol-resize', '--pool', P, 'n.img', '--shrink', '--', '-1M'], () => v(['vol-resize', '--pool', P, 'n.img', '3M']));
  await pair(['vol-resize', 'n.img', '1000', P, '--shrink'], () => v(['vol-resize', '--pool', P, 'n.img', '2M']));
  await pair(['vol-resize', '--pool', P, 'n.img', '2M', '--allocate'], async () => {
    await v(['vol-delete', '--pool', P, 'n.img']);
    await createVol(pool, 'n.img', '1000');
  });
  const uuid = (await v(['pool-uuid', P])).trim();
  await sameAll([['vol-info', '--pool', uuid, 'n.img', '--bytes'], ['vol-list', uuid], ['vol-path', 'n.img', uuid]].map((a) => [...C, ...a]));
  await same([...C, 'vol-info', '--pool', P, 'n.img', '--bytes']);
  await same([...C, 'vol-wipe', '--pool', P, 'n.img']);
  await same([...C, 'vol-wipe', '--pool', P, 'n.img', '--algorithm', 'zero']);
  await same([...C, '-q', 'vol-wipe', '--pool', P, 'n.img']);
  await same([...C, 'vol-list', P, '--details']);
  await pair(['vol-delete', 'n.img', P], () => createVol(pool, 'n.img', '1M'));
}

async function createVol(pool: ScratchPool, name: string, capacity: string): Promise<string> {
  await v(['vol-create-as', pool.name, name, capacity, '--allocation', '0', '--format', 'raw']);
  return path.join(pool.path, name);
}

test('golden: volumes', async (t) => {
  if (!(await requireServer(t))) return;
  await withScratchPool('cligoldvol', volumeCases, { uri: CLI_URI });
});

test('golden: -d debug lines and -l log files, as virsh\'s; socket= with no path', async (t) => {
  if (!(await requireServer(t))) return;
  await same(['-c', 'qemu+unix:///system?socket=', 'pool-list']);
  await same(['-c', 'qemu:///system?socket=', 'pool-list', '--all']);
  await withScratchPool('cligolddebug', async (pool) => {
    const P = pool.name;
    await createVol(pool, 'd.img', '1M');
    const uuid = (await v(['pool-uuid', P])).trim();
    await sameAll([
      ['-d', '0', 'pool-info', P],
      ['-d', '0', 'pool-info', uuid],
      ['-d', '1', 'pool-info', P, '--bytes'],
      ['-d', '0', 'vol-info', '--pool', P, 'd.img'],
      ['-d', '0', 'vol-info', 'd.img', '--pool', P],
      ['-d', '1', 'vol-info', 'nosuch', '--pool', P],
      ['-d', '0', 'vol-info', path.join(pool.path, 'nosuch')],
      ['-d', '0', 'vol-info', path.join(pool.path, 'd.img')],
      ['-d', '2', 'vol-info', '--pool', P, 'd.img'],
      ['-d', '0', `vol-list ${P} --details; pool-list --name --all`],
      ['-d', '1', 'vol-create-as', P, 'x.img', '1M', '--print-xml'],
      ['-q', '-d', '0', 'vol-path', '--pool', P, 'd.img'],
    ].map((a) => [...C, ...a]), { retries: 2 });
    const dir = path.join(pool.path, '..', `sparsevirt-test-clidebug-${process.pid}`);
    await mkdir(dir, { recursive: true });
    try {
      // transfers, each to its own file
      for (const extra of [[], ['--sparse', '--offset', '0']]) {
        const a = await virshRaw([...C, '-d', '0', 'vol-download', '--pool', P, 'd.img', path.join(dir, 'a'), ...extra]);
        const b = await cliRaw([...C, '-d', '0', 'vol-download', '--pool', P, 'd.img', path.join(dir, 'a'), ...extra]);
        assertSame(b, a, `-d 0 vol-download ${extra.join(' ')}`);
        await same([...C, '-d', '0', 'vol-upload', '--pool', P, 'd.img', path.join(dir, 'a'), ...extra]);
      }
      // -l: the same lines, each as `[date time program pid] LEVEL message`
      const logs = async (prog: 'virsh' | 'sparsevirt', args: string[]) => {
        const file = path.join(dir, `${prog}.log`);
        await rm(file, { force: true });
        const r = prog === 'virsh' ? await virshRaw([...C, '-l', file, ...args]) : await cliRaw([...C, '-l', file, ...args]);
        const textOf = (await readFile(file, 'utf8')).replace(/^\[\d{4}\.\d\d\.\d\d \d\d:\d\d:\d\d (virsh|sparsevirt) \d+\] /gm, '[T P N] ');
        return { r, log: textOf };
      };
      for (const args of [['vol-info', 'nosuch', '--pool', P], ['-d', '0', 'vol-info', '--pool', P, 'd.img'], ['-d', '1', `pool-info ${P}; vol-info nosuch`], ['-q', 'pool-info', 'nosuch']]) {
        const a = await logs('virsh', args);
        const b = await logs('sparsevirt', args);
        assertSame(b.r, a.r, args.join(' '));
        assert.equal(b.log, a.log, `-l ${args.join(' ')}`);
        assert.match(b.log, /^\[T P N\] (DEBUG|INFO|ERROR) /);
      }
      await same([...C, '-l', path.join(dir, 'no', 'such', 'dir.log'), 'uri']);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, { uri: CLI_URI });
});

test('golden: vol-upload and vol-download (output and errors)', async (t) => {
  if (!(await requireServer(t))) return;
  await withScratchPool('cligoldxfer', async (pool) => {
    const P = pool.name;
    await createVol(pool, 'x.img', '1M');
    const dir = path.join(pool.path, '..', `sparsevirt-test-clixfer-${process.pid}`);
    await mkdir(dir, { recursive: true });
    try {
      const src = path.join(dir, 'src.bin');
      await writeFile(src, Buffer.alloc(65536, 0x5a));
      const pairFiles = async (args: (f: string) => string[]) => {
        const a = await virshRaw([...C, ...args(path.join(dir, 'v.out'))]);
        const b = await cliRaw([...C, ...args(path.join(dir, 'v.out'))]);
        assertSame(b, a, args('FILE').join(' '));
      };
      await same([...C, 'vol-upload', '--pool', P, 'x.img', src]);
      await same([...C, 'vol-upload', '--pool', P, 'x.img', src, '--sparse']);
      await same([...C, 'vol-upload', '--pool', P, 'x.img', src, '--offset', '4096']);
      await same([...C, 'vol-upload', '--pool', P, 'x.img', dir]); // a directory: read fails after the stream opened
      await same([...C, 'vol-upload', 'x.img', src, P, '0', '0']);
      await same([...C, 'vol-upload', '--vol', 'x.img', '--file', src, '--pool', P]);
      await same([...C, 'vol-upload', '--vol=x.img', `--file=${src}`, `--pool=${P}`, '--offset=0']);
      await pairFiles((f) => ['vol-download', '--pool', P, 'x.img', f]);
      await pairFiles((f) => ['vol-download', '--pool', P, 'x.img', f, '--sparse']);
      await pairFiles((f) => ['vol-download', '--pool', P, 'x.img', f, '--offset', '1000', '--length', '5000']);
      await pairFiles((f) => ['vol-download', '--pool', P, 'x.img', f, '--offset', '5000000']);
      await pairFiles((f) => ['vol-download', '--pool', P, 'x.img', f, '--length', '-1']);
      await pairFiles((f) => ['-q', 'vol-download', f, '--vol', path.join(pool.path, 'x.img')]);
      await same([...C, 'vol-download', '--pool', P, 'x.img', '/dev/full']);
      await same([...C, 'vol-download', '--pool', P, 'x.img', '/dev/full', '--sparse']);
      await same([...C, 'vol-download', '--pool', P, 'x.img', '/dev/null', '--sparse']);
      // virsh's words, then the system's reason
      const theirs = await virshRaw([...C, 'vol-download', '--pool', P, 'x.img', dir]);
      const ours = await cliRaw([...C, 'vol-download', '--pool', P, 'x.img', dir]);
      assert.equal(text(theirs.stderr), `error: cannot create ${dir}\n`);
      assertSame(ours, { ...theirs, stderr: Buffer.from(`error: cannot create ${dir}: Is a directory\n`) }, 'download to a directory');
      await same([...C, '-r', 'vol-upload', '--pool', P, 'x.img', src]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, { uri: CLI_URI });
});

test('sparsevirt --json output parses and carries the same numbers', async (t) => {
  if (!(await requireServer(t))) return;
  await withScratchPool('clijson', async (pool) => {
    const P = pool.name;
    await createVol(pool, 'j.img', '5M');
    const file = path.join(pool.path, 'j.img');
    const vol = { name: 'j.img', pool: P, key: file, path: file, type: 'file', capacity: 5 * 1048576, allocation: 0 };
    const info = JSON.parse(text((await cli(['vol-info', '--pool', P, 'j.img', '--json'])).stdout));
    assert.deepEqual(info, vol);
    const phys = JSON.parse(text((await cli(['vol-info', '--pool', P, 'j.img', '--json', '--physical'])).stdout));
    assert.equal(phys.physical, 5 * 1048576);
    assert.equal('allocation' in phys, false);
    const vols = JSON.parse(text((await cli(['vol-list', P, '--json'])).stdout));
    assert.deepEqual(vols, [vol], 'a volume has the same keys in vol-list, vol-info and vol-create-as');
    const created = JSON.parse(text((await cli(['vol-create-as', P, 'k.img', '1M', '--allocation', '0', '--format', 'raw', '--json'])).stdout));
    assert.deepEqual(created, { ...vol, name: 'k.img', key: path.join(pool.path, 'k.img'), path: path.join(pool.path, 'k.img'), capacity: 1048576 });
    assert.deepEqual(JSON.parse(text((await cli(['vol-key', '--pool', P, 'k.img', '--json'])).stdout)), { name: 'k.img', pool: P, key: created.key });
    assert.deepEqual(JSON.parse(text((await cli(['vol-path', '--pool', P, 'k.img', '--json'])).stdout)), { name: 'k.img', pool: P, path: created.path });
    // transfers: what went as data and as holes, in how long
    const src = path.join(pool.path, '..', `sv-json-src-${process.pid}.img`);
    await writeFile(src, Buffer.alloc(8192, 7));
    await truncate(src, 1048576);
    try {
      const up = await cli(['vol-upload', '--pool', P, 'k.img', src, '--sparse', '--json']);
      assert.equal(up.code, 0, text(up.stderr));
      const u = JSON.parse(text(up.stdout));
      assert.deepEqual(Object.keys(u), ['name', 'pool', 'file', 'sparse', 'offset', 'bytes', 'data', 'holes', 'seconds', 'rate']);
      assert.deepEqual({ ...u, seconds: 0, rate: 0 }, { name: 'k.img', pool: P, file: src, sparse: true, offset: 0, bytes: 1048576, data: 8192, holes: 1048576 - 8192, seconds: 0, rate: 0 });
      assert.ok(u.seconds > 0 && Math.abs(u.rate - 8192 / u.seconds) <= 8192 / u.seconds / 1000 + 1, JSON.stringify(u));
      const dl = await cli(['-q', 'vol-download', '--pool', P, 'k.img', `${src}.down`, '--sparse', '--json', '--offset', '4096']);
      assert.equal(dl.code, 0, text(dl.stderr));
      const d = JSON.parse(text(dl.stdout));
      assert.deepEqual({ ...d, seconds: 0, rate: 0 }, { name: 'k.img', pool: P, file: `${src}.down`, sparse: true, offset: 4096, bytes: 1048576 - 4096, data: 4096, holes: 1048576 - 8192, seconds: 0, rate: 0 });
    } finally {
      await rm(src, { force: true });
      await rm(`${src}.down`, { force: true });
    }
    await v(['vol-delete', '--pool', P, 'k.img']);
    assert.deepEqual(JSON.parse(text((await cli(['uri', '--json'])).stdout)), { uri: CLI_URI });
    assert.deepEqual(Object.keys(JSON.parse(text((await cli(['hostname', '--json'])).stdout))), ['hostname']);
    const vj = await cli(['version', '--daemon', '--json']);
    if (vj.code === 0) {
      const ver = JSON.parse(text(vj.stdout));
      assert.deepEqual(Object.keys(ver), ['library', 'type', 'hypervisor', 'daemon']);
      assert.equal(ver.library, '9.0.0');
    } else {
      // (a libvirtd without an emulator cannot say its version: the error is the same as without --json)
      assert.equal(text(vj.stderr), text((await cli(['version', '--daemon'])).stderr));
    }
    const pinfo = JSON.parse(text((await cli(['pool-info', P, '--json'])).stdout));
    assert.deepEqual(Object.keys(pinfo), ['name', 'uuid', 'state', 'persistent', 'autostart', 'capacity', 'allocation', 'available']);
    assert.equal(pinfo.name, P);
    assert.equal(pinfo.state, 'running');
    assert.equal(pinfo.persistent, true);
    assert.equal(pinfo.autostart, false);
    assert.equal(pinfo.uuid, (await v(['pool-uuid', P])).trim());
    assert.equal(typeof pinfo.capacity, 'number');
    const pools = JSON.parse(text((await cli(['pool-list', '--all', '--json'])).stdout));
    const mine = pools.find((p: { name: string }) => p.name === P);
    assert.ok(mine, 'scratch pool listed');
    assert.deepEqual(Object.keys(mine), ['name', 'uuid', 'state', 'active', 'persistent', 'autostart', 'capacity', 'allocation', 'available']);
    assert.equal(mine.active, true);
    // -q drops the blank line, the JSON stays
    const q = await cli(['-q', 'vol-list', P, '--json']);
    assert.equal(text(q.stdout), `${JSON.stringify(vols, null, 2)}\n`);
    const theirs = await virshC(['vol-list', P, '--json']);
    assert.equal(theirs.code, 1, 'virsh has no --json');
  }, { uri: CLI_URI });
});
