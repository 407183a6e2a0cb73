/**
 * sparsevirtd under systemd, with systemd's own tools (Debian's systemd package; none of them
 * needs systemd as PID 1): the units `--install-units` writes pass `systemd-analyze verify`
 * (their man: references resolved against our pages); socket activation by
 * `systemd-socket-activate` with the read-write and read-only sockets, real virsh connecting
 * through both (the read-only one lists and refuses writes with virsh's error); Type=notify
 * readiness seen by a fake NOTIFY_SOCKET, itself a datagram socket made by
 * systemd-socket-activate (Node cannot make one), sent only once every listener is up.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { after, before, test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { scratchDir } from './helpers/images.js';
import { run } from './helpers/run.js';
import { virsh } from './helpers/libvirt.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MAIN = path.join(ROOT, 'dist/bin/sparsevirtd.mjs');

function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

/** Missing tools fail the test in CI (setup-libvirt.sh installs them) and skip it elsewhere. */
function need(t: TestContext, ...cmds: string[]): boolean {
  const missing = cmds.filter((c) => !have(c));
  if (missing.length === 0) return true;
  if (process.env.CI) assert.fail(`missing ${missing.join(', ')} (scripts/setup-libvirt.sh installs them)`);
  t.skip(`missing ${missing.join(', ')}`);
  return false;
}

let dir: string;
before(async () => {
  dir = await scratchDir(tmpdir(), 'sv-systemd-');
});
after(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

test('--install-units writes the units with ExecStart= running this installation; systemd-analyze verify finds nothing to say', async (t) => {
  const prefix = path.join(dir, 'prefix');
  const r = await run(process.execPath, [MAIN, '--install-units', '--prefix', prefix]);
  assert.equal(r.code, 0, r.stderr);
  const unitDir = path.join(prefix, 'lib/systemd/system');
  const names = ['sparsevirtd.service', 'sparsevirtd.socket', 'sparsevirtd-ro.socket'];
  assert.deepEqual(fs.readdirSync(unitDir).sort(), [...names].sort());
  const service = fs.readFileSync(path.join(unitDir, 'sparsevirtd.service'), 'utf8');
  assert.match(service, new RegExp(`^ExecStart=${process.execPath.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} ${MAIN.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'));
  for (const line of ['Type=notify', 'ProtectSystem=strict', 'PrivateTmp=yes', 'NoNewPrivileges=yes', 'StateDirectory=sparsevirt', 'RestartPreventExitStatus=78', 'ExecReload=/bin/kill -HUP $MAINPID']) {
    assert.ok(service.split('\n').includes(line), line);
  }
  const ro = fs.readFileSync(path.join(unitDir, 'sparsevirtd-ro.socket'), 'utf8');
  assert.match(ro, /^ListenStream=\/run\/sparsevirt\/sparsevirt-sock-ro$/m);
  assert.match(ro, /^FileDescriptorName=sparsevirtd-ro\.socket$/m);
  // the shipped templates differ from the installed ones in ExecStart= only
  const shipped = fs.readFileSync(path.join(ROOT, 'systemd/sparsevirtd.service'), 'utf8');
  assert.equal(shipped.replace(/^ExecStart=.*$/m, ''), service.replace(/^ExecStart=.*$/m, ''));

  if (!need(t, 'systemd-analyze')) return;
  const env = { ...process.env, SYSTEMD_LOG_TARGET: 'console', SYSTEMD_LOG_COLOR: '0', MANPATH: path.join(ROOT, 'dist/man') };
  const v = spawnSync('systemd-analyze', ['verify', ...names.map((n) => path.join(unitDir, n))], { env, encoding: 'utf8', timeout: 60_000 });
  assert.equal(v.status, 0, v.stderr);
  assert.equal(`${v.stdout}${v.stderr}`.trim(), '', 'no warning');
  // a broken unit is noticed (the check is not silent whatever happens)
  const broken = path.join(dir, 'broken');
  fs.mkdirSync(broken);
  for (const n of names) fs.copyFileSync(path.join(unitDir, n), path.join(broken, n));
  fs.writeFileSync(path.join(broken, 'sparsevirtd.service'), service.replace(/^ProtectSystem=strict$/m, 'ProtectSytem=strict'));
  const b = spawnSync('systemd-analyze', ['verify', path.join(broken, 'sparsevirtd.service')], { env, encoding: 'utf8', timeout: 60_000 });
  assert.match(b.stderr, /Unknown key name 'ProtectSytem'|Unknown key 'ProtectSytem'/);
  // and its exposure is rated
  const sec = spawnSync('systemd-analyze', ['security', '--offline=true', path.join(unitDir, 'sparsevirtd.service')], { env, encoding: 'utf8', timeout: 60_000 });
  const level = /Overall exposure level for sparsevirtd\.service: (\d+\.\d)/.exec(`${sec.stdout}${sec.stderr}`);
  if (level) assert.ok(Number(level[1]) < 5, `exposure ${level[1]}`);
  else t.diagnostic(`systemd-analyze security --offline: ${sec.stderr.trim().slice(0, 200)}`);
});

/** A fake NOTIFY_SOCKET: systemd-socket-activate makes the datagram socket, a reader prints each datagram as a JSON line. */
function fakeNotifySocket(at: string): { proc: ChildProcess; messages: () => string[]; waitFor: (re: RegExp, ms?: number) => Promise<string> } {
  const reader = path.join(dir, 'notify-reader.cjs');
  fs.writeFileSync(reader, [
    "const fs = require('fs');",
    'const b = Buffer.alloc(65536);',
    'for (;;) {',
    '  const n = fs.readSync(3, b, 0, b.length, null);',
    "  process.stdout.write(JSON.stringify(b.subarray(0, n).toString()) + '\\n');",
    '}',
  ].join('\n'));
  const proc = spawn('systemd-socket-activate', ['--datagram', '-l', at, process.execPath, reader], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  proc.stderr!.resume();
  const messages = () => out.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as string);
  return {
    proc, messages,
    async waitFor(re, ms = 15_000) {
      const deadline = Date.now() + ms;
      for (;;) {
        const m = messages().find((x) => re.test(x));
        if (m !== undefined) return m;
        if (Date.now() > deadline) throw new Error(`no notification ${re}: ${JSON.stringify(messages())}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
  };
}

async function waitForPath(p: string): Promise<void> {
  for (let i = 0; i < 250 && !fs.existsSync(p); i++) await new Promise((r) => setTimeout(r, 20));
  assert.ok(fs.existsSync(p), p);
}

test('socket activation with both sockets: virsh connects through them, the read-only one lists and refuses writes; READY=1 then STOPPING=1', async (t) => {
  if (!need(t, 'systemd-socket-activate', 'systemd-notify', 'virsh')) return;
  const base = path.join(dir, 'activation');
  await fsp.mkdir(path.join(base, 'run'), { recursive: true });
  const rw = path.join(base, 'run', 'sparsevirt-sock');
  const ro = path.join(base, 'run', 'sparsevirt-sock-ro');
  const notifyPath = path.join(base, 'notify');
  const conf = path.join(base, 'sparsevirtd.conf');
  fs.writeFileSync(conf, `state_dir = "${base}/state"\nunix_sock_dir = "${base}/unused"\n`);
  const notify = fakeNotifySocket(notifyPath);
  await waitForPath(notifyPath);
  const act = spawn('systemd-socket-activate', [
    '-l', rw, '-l', ro, '--fdname=sparsevirtd.socket:sparsevirtd-ro.socket', '-E', `NOTIFY_SOCKET=${notifyPath}`,
    process.execPath, MAIN, '--config', conf,
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  act.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((resolve) => act.once('exit', (code) => resolve(code)));
  try {
    await waitForPath(ro);
    // the first connection starts the daemon (systemd-socket-activate execs it on first use)
    const list = await virsh(['pool-list', '--all'], { uri: `qemu+unix:///system?socket=${rw}` });
    assert.equal(list.code, 0, `${list.stderr}\n${err}`);
    assert.match(list.stdout, /^\s*default\s+active\s+yes/m);
    const ready = await notify.waitFor(/READY=1/);
    assert.equal(ready, `READY=1\nSTATUS=listening on ${rw}, ${ro}`);
    assert.match(err, /"listening on a socket from systemd","fd":3,"name":"sparsevirtd.socket","role":"rw"/);
    assert.match(err, /"listening on a socket from systemd","fd":4,"name":"sparsevirtd-ro.socket","role":"ro"/);
    assert.ok(!fs.existsSync(path.join(base, 'unused')), 'no socket of its own where systemd gave one');

    const roUri = `qemu+unix:///system?socket=${ro}`;
    const roList = await virsh(['pool-list', '--all'], { uri: roUri });
    assert.equal(roList.code, 0, roList.stderr);
    assert.match(roList.stdout, /default/);
    assert.equal((await virsh(['vol-list', 'default'], { uri: roUri })).code, 0);
    const write = await virsh(['pool-define-as', 'x', 'dir', '--target', path.join(base, 'x')], { uri: roUri });
    assert.equal(write.code, 1);
    assert.match(write.stderr, /error: Failed to define pool x\nerror: operation forbidden: read only access prevents virStoragePoolDefineXML/);
    const create = await virsh(['vol-create-as', 'default', 'v.img', '1M'], { uri: roUri });
    assert.equal(create.code, 1);
    assert.match(create.stderr, /read only access prevents virStorageVolCreateXML/);
    // the same through the read-write socket works
    assert.equal((await virsh(['vol-create-as', 'default', 'v.img', '1M'], { uri: `qemu+unix:///system?socket=${rw}` })).code, 0);

    act.kill('SIGTERM');
    assert.equal(await exited, 0, err);
    await notify.waitFor(/STOPPING=1/);
    assert.ok(fs.existsSync(rw) && fs.existsSync(ro), 'the sockets are systemd\'s: the daemon leaves them');
  } finally {
    act.kill('SIGKILL');
    notify.proc.kill('SIGKILL');
  }
});

test('Type=notify: READY=1 comes once every listener accepts; a daemon that fails to start sends none', async (t) => {
  if (!need(t, 'systemd-socket-activate', 'systemd-notify')) return;
  const base = path.join(dir, 'notify');
  await fsp.mkdir(base, { recursive: true });
  const notifyPath = path.join(base, 'notify');
  const notify = fakeNotifySocket(notifyPath);
  try {
    await waitForPath(notifyPath);
    await readiness(base, notifyPath, notify);
  } finally {
    notify.proc.kill('SIGKILL');
  }
});

/** The checks of the test above, with the fake NOTIFY_SOCKET `notify` listening at `notifyPath`. */
async function readiness(base: string, notifyPath: string, notify: ReturnType<typeof fakeNotifySocket>): Promise<void> {
  const conf = path.join(base, 'c.conf');
  fs.writeFileSync(conf, `unix_sock_dir = "${base}/run"\nunix_sock_ro = 1\nstate_dir = "${base}/state"\nlisten_tcp = 1\nlisten_addr = "127.0.0.1"\ntcp_port = 0\n`);
  const env = { ...process.env, NOTIFY_SOCKET: notifyPath };
  const d = spawn(process.execPath, [MAIN, '--config', conf], { stdio: ['ignore', 'ignore', 'pipe'], env });
  let err = '';
  d.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((resolve) => d.once('exit', (code) => resolve(code)));
  try {
    const ready = await notify.waitFor(/READY=1/);
    // at this moment every listener accepts
    const status = /STATUS=listening on (.*)$/m.exec(ready)![1]!.split(', ');
    assert.equal(status.length, 3);
    for (const s of status) {
      const target = s.startsWith('tcp:') ? { host: '127.0.0.1', port: Number(s.split(':').pop()) } : { path: s };
      await new Promise<void>((resolve, reject) => {
        const c = net.createConnection(target as net.NetConnectOpts, () => {
          c.destroy();
          resolve();
        });
        c.once('error', reject);
      });
    }
    d.kill('SIGHUP');
    await notify.waitFor(/RELOADING=1/);
    for (let i = 0; i < 200 && notify.messages().filter((m) => /READY=1/.test(m)).length < 2; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(notify.messages().filter((m) => /READY=1/.test(m)).length, 2, 'READY=1 again after the reload');
    d.kill('SIGTERM');
    assert.equal(await exited, 0, err);
  } finally {
    d.kill('SIGKILL');
  }
  // TLS asked for, its files missing: no READY=1
  const before = notify.messages().length;
  const failing = await run(process.execPath, [MAIN, '--config', conf, '--listen', `unix:${base}/f.sock`, '--listen', 'tls:127.0.0.1:0', '--tls-cert', `${base}/none.pem`], { env });
  assert.equal(failing.code, 1);
  assert.match(failing.stderr, /sparsevirtd failed to start.*cannot read TLS server certificate/);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(notify.messages().slice(before), []);
}
