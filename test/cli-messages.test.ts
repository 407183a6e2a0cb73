/**
 * What the CLI says when something is missing, as a plain user sees it: no server to connect to
 * (no sparsevirtd running, no access to libvirtd), and local files it may not read or create
 * (the system's reason after virsh's words). Runs as `nobody` (needs root to become it).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { CLI_MAIN } from './cli-support.js';
import { startTestDaemon } from './helpers/daemon.js';
import { LIBVIRTD_SOCKET } from './helpers/libvirt.js';

const NOBODY = 65534;
const TIMEOUT = 60_000;

/** `sparsevirt ARGS` as nobody, with `home` as HOME and no XDG_RUNTIME_DIR. */
function asNobody(home: string, args: string[], extraEnv: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  const env = { PATH: '/usr/local/bin:/usr/bin:/bin', HOME: home, LANG: 'C.UTF-8', ...extraEnv };
  return new Promise((resolve) => {
    execFile('/usr/sbin/runuser', ['-u', 'nobody', '--', 'env', '-i', ...Object.entries(env).map(([k, v]) => `${k}=${v}`), process.execPath, CLI_MAIN, ...args],
      { timeout: TIMEOUT - 5000, encoding: 'utf8' }, (err, stdout, stderr) => {
        const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
        resolve({ code, stdout, stderr });
      });
  });
}

function needRoot(t: TestContext): boolean {
  if (process.getuid?.() === 0) return true;
  t.skip('needs root (to become nobody)');
  return false;
}

async function nobodyHome(): Promise<string> {
  const base = await fs.mkdtemp('/dev/shm/sv-msg-');
  await fs.chmod(base, 0o755);
  const home = path.join(base, 'home');
  await fs.mkdir(home);
  await fs.chown(home, NOBODY, NOBODY);
  return home;
}

/** A unix socket file nothing listens on (a daemon that did not remove its socket). */
function staleSocket(file: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('/usr/bin/python3', ['-c', 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])', file], (err) => (err ? reject(err) : resolve()));
  });
}

test('no -c, no sparsevirtd, no access to libvirtd: libvirtd\'s error, then that no sparsevirtd runs and how to start one', { timeout: TIMEOUT }, async (t) => {
  if (!needRoot(t)) return;
  const home = await nobodyHome();
  try {
    const daemonSocket = path.join(home, '.cache', 'sparsevirt', 'sparsevirt-sock');
    const hint = "start one with 'sparsevirtd' ('npm start' in a checkout of sparsevirt), or name a server with -c URI";
    const r = await asNobody(home, ['pool-list']);
    assert.equal(r.code, 1);
    const libvirtdError = (await fs.stat(LIBVIRTD_SOCKET).then(() => true, () => false)) ? 'Permission denied' : 'No such file or directory';
    assert.equal(r.stderr,
      'error: failed to connect to the hypervisor\n' +
      `error: Failed to connect socket to '/var/run/libvirt/libvirt-sock': ${libvirtdError}\n` +
      `error: no sparsevirtd is running (no socket at ${daemonSocket}): ${hint}\n`);
    // a socket left behind by a daemon that is gone
    await fs.mkdir(path.dirname(daemonSocket), { recursive: true });
    await staleSocket(daemonSocket);
    await fs.chown(daemonSocket, NOBODY, NOBODY);
    const stale = await asNobody(home, ['vol-list', 'default']);
    assert.equal(stale.stderr,
      'error: failed to connect to the hypervisor\n' +
      `error: Failed to connect socket to '${daemonSocket}': Connection refused\n` +
      `error: no sparsevirtd is running (nothing listens on ${daemonSocket}): ${hint}\n`);
    // a URI the user chose is not second-guessed
    const chosen = await asNobody(home, ['pool-list'], { LIBVIRT_DEFAULT_URI: `qemu+unix:///system?socket=${daemonSocket}` });
    assert.equal(chosen.stderr, `error: failed to connect to the hypervisor\nerror: Failed to connect socket to '${daemonSocket}': Connection refused\n`);
    const c = await asNobody(home, ['-c', 'qemu:///system', 'pool-list']);
    assert.equal(c.stderr.split('\n').length, 3, 'two lines, no hint');
  } finally {
    await fs.rm(path.dirname(home), { recursive: true, force: true });
  }
});

test('files a plain user may not read or create: virsh\'s words, then the system\'s reason', { timeout: TIMEOUT }, async (t) => {
  if (!needRoot(t)) return;
  const home = await nobodyHome();
  const d = await startTestDaemon({ socketMode: 0o666 });
  try {
    const poolDir = path.join(d.dir, 'pool');
    const c = ['-c', d.uri];
    const run = (args: string[]) => asNobody(home, [...c, ...args]);
    await fs.chmod(d.dir, 0o755);
    for (const args of [['pool-define-as', 'p', 'dir', '--target', poolDir], ['pool-build', 'p'], ['pool-start', 'p'], ['vol-create-as', 'p', 'v.img', '1M']]) {
      const r = await run(args);
      assert.equal(r.code, 0, r.stderr);
    }
    const secret = path.join(path.dirname(home), 'secret.img');
    await fs.writeFile(secret, 'x', { mode: 0o600 });
    const up = await run(['vol-upload', '--pool', 'p', 'v.img', secret]);
    assert.deepEqual([up.code, up.stderr], [1, `error: cannot read ${secret}: Permission denied\n`]);
    const rootDir = path.join(path.dirname(home), 'root-only');
    await fs.mkdir(rootDir, { mode: 0o755 });
    const down = await run(['vol-download', '--pool', 'p', 'v.img', path.join(rootDir, 'out.img')]);
    assert.deepEqual([down.code, down.stderr], [1, `error: cannot create ${path.join(rootDir, 'out.img')}: Permission denied\n`]);
    const dir = await run(['vol-download', '--pool', 'p', 'v.img', home]);
    assert.deepEqual([dir.code, dir.stderr], [1, `error: cannot create ${home}: Is a directory\n`]);
    const loop = path.join(home, 'loop');
    await fs.symlink(loop, loop);
    const l = await run(['vol-upload', '--pool', 'p', 'v.img', loop]);
    assert.deepEqual([l.code, l.stderr], [1, `error: cannot read ${loop}: Too many levels of symbolic links\n`]);
  } finally {
    await d.stop();
    await fs.rm(path.dirname(home), { recursive: true, force: true });
  }
});
