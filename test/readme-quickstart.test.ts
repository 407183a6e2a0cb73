/**
 * README.md's Quick start, run as written (its code blocks, parsed from the README) as root and
 * as a plain user (nobody, with a HOME of its own and no XDG_RUNTIME_DIR), against the
 * sparsevirtd its `npm start` starts. The checkout is a copy of this one's package.json with its
 * dist and node_modules linked in (`npm ci` made them: that line is checked, not run). Root runs
 * in a mount namespace with /run and /var/lib on tmpfs, so its sparsevirtd's default socket and
 * state never meet the machine's.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { requireLibvirt } from './helpers/libvirt.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TIMEOUT = 180_000;

/** The ```sh blocks of the README's "Quick start" section, as lists of lines. */
async function quickStartBlocks(): Promise<string[][]> {
  const readme = await fs.readFile(path.join(ROOT, 'README.md'), 'utf8');
  const start = readme.indexOf('\n## Quick start\n');
  assert.ok(start >= 0, 'README.md has a Quick start section');
  const end = readme.indexOf('\n## ', start + 1);
  const section = readme.slice(start, end < 0 ? undefined : end);
  return [...section.matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1]!.split('\n').filter((l) => l.trim() !== ''));
}

const command = (line: string) => line.replace(/\s+#.*$/, '').trim();

function sh(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { env, timeout: TIMEOUT - 10_000, maxBuffer: 16 << 20, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ code, out: `${stdout}\n--- stderr\n${stderr}${code === -1 ? `\n--- ${String(err)}` : ''}` });
    });
  });
}

/**
 * The script a person runs: block 1's `npm start` (in the background, in its own process group,
 * stopped at the end), block 2's commands once the daemon's socket is there, then `extra`.
 */
async function script(blocks: string[][], socket: string, work: string, extra: string[]): Promise<string> {
  const [setup, commands] = blocks;
  assert.ok(setup && commands, 'two blocks: the setup and the commands');
  assert.deepEqual(setup.map(command), ['npm ci', 'npm start'], 'block 1: install, then the daemon');
  return [
    'set -ex',
    `setsid npm start > ${work}/daemon.log 2>&1 &`,
    'DAEMON=$!',
    `echo $DAEMON > ${work}/daemon.pgid`,
    // at the end: SIGTERM to its process group (npm, sh, node), SIGKILL after 5 s
    // (its processes are gone when none but zombies are left in its session; once they are reaped
    // the group is gone too and kill fails, which `set -e` would make the script's status)
    "trap 'kill -TERM -$DAEMON 2>/dev/null || true; for i in $(seq 1 50); do ps -o stat= -s $DAEMON | grep -q \"^[^Z]\" || break; sleep 0.1; done; kill -KILL -$DAEMON 2>/dev/null || true' EXIT",
    `for i in $(seq 1 150); do [ -S ${socket} ] && break; sleep 0.1; done`,
    `[ -S ${socket} ] || { cat ${work}/daemon.log; exit 99; }`,
    ...commands,
    ...extra,
  ].join('\n');
}

/** A checkout for `user`: package.json, with dist and node_modules linked to this one's. */
async function checkout(base: string, uid: number): Promise<string> {
  const dir = path.join(base, 'sparsevirt');
  await fs.mkdir(dir);
  await fs.copyFile(path.join(ROOT, 'package.json'), path.join(dir, 'package.json'));
  await fs.symlink(path.join(ROOT, 'dist'), path.join(dir, 'dist'));
  await fs.symlink(await fs.realpath(path.join(ROOT, 'node_modules')), path.join(dir, 'node_modules'));
  for (const p of [base, dir, path.join(dir, 'package.json')]) await fs.chown(p, uid, uid);
  for (const p of ['dist', 'node_modules']) await fs.lchown(path.join(dir, p), uid, uid);
  return dir;
}

const baseEnv = (home: string): NodeJS.ProcessEnv => ({
  PATH: '/usr/local/bin:/usr/bin:/bin', HOME: home, LANG: 'C.UTF-8', NO_UPDATE_NOTIFIER: '1',
  npm_config_update_notifier: 'false', npm_config_fund: 'false', npm_config_audit: 'false',
});

/** The daemon's process group, if the script left it running (it should not). */
async function stopLeftovers(work: string): Promise<void> {
  const pgid = Number(await fs.readFile(path.join(work, 'daemon.pgid'), 'utf8').catch(() => ''));
  if (!(pgid > 1)) return;
  let alive = false;
  for (const pid of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
    // pid (comm) state ppid pgrp …: the fields after the command's closing parenthesis
    const [state, , pgrp] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(pgrp) === pgid && state !== 'Z') alive = true;
  }
  if (alive) {
    process.kill(-pgid, 'SIGKILL');
    assert.fail(`sparsevirtd (process group ${pgid}) was still running after the Quick start`);
  }
}

function checkRun(r: { code: number; out: string }, who: string): void {
  assert.equal(r.code, 0, `${who}: the Quick start failed:\n${r.out}`);
  assert.match(r.out, /^ disk\.img +\S+\/disk\.img\s*$/m, `${who}: virsh lists the uploaded volume:\n${r.out}`);
  assert.match(r.out, /^16M\s+disk\.img\n16M\s+copy\.img$/m, `${who}: both files hold 16 MiB:\n${r.out}`);
}

test('README Quick start, as written, as root (own mount namespace)', { timeout: TIMEOUT }, async (t) => {
  if (process.getuid?.() !== 0) {
    t.skip('needs root');
    return;
  }
  const blocks = await quickStartBlocks();
  const base = await fs.mkdtemp('/dev/shm/sv-readme-root-');
  try {
    const dir = await checkout(base, 0);
    const home = path.join(base, 'home');
    await fs.mkdir(home);
    // and the line against libvirtd, where there is one (/run is hidden from the rest)
    const libvirtd = blocks[2]?.map(command) ?? [];
    assert.deepEqual(libvirtd, ['sparsevirt -c qemu:///system pool-list --all'], 'block 3: the CLI against libvirtd');
    const withLibvirtd = await requireLibvirt(t);
    const body = await script(blocks, '/run/sparsevirt/sparsevirt-sock', base, []);
    await fs.writeFile(path.join(base, 'quickstart.sh'), body);
    const r = await sh('/usr/bin/unshare', ['-m', '--propagation', 'private', 'sh', '-c',
      `mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /var/lib && cd ${dir} && exec sh ${base}/quickstart.sh`], baseEnv(home));
    await stopLeftovers(base);
    checkRun(r, 'root');
    if (withLibvirtd) {
      // (the alias from block 2 first)
      await fs.writeFile(path.join(base, 'libvirtd.sh'), [blocks[1]![0]!, libvirtd[0]!].join('\n'));
      const l = await sh('sh', ['-ec', `cd ${dir} && . ${base}/libvirtd.sh`], baseEnv(home));
      assert.equal(l.code, 0, l.out);
      assert.match(l.out, /^ Name +State +Autostart/m);
    }
  } finally {
    await stopLeftovers(base).catch(() => undefined);
    await fs.rm(base, { recursive: true, force: true });
  }
});

test('README Quick start, as written, as a plain user without XDG_RUNTIME_DIR', { timeout: TIMEOUT }, async (t) => {
  if (process.getuid?.() !== 0) {
    t.skip('needs root (to become nobody)');
    return;
  }
  const blocks = await quickStartBlocks();
  const base = await fs.mkdtemp('/dev/shm/sv-readme-user-');
  try {
    await fs.chmod(base, 0o755);
    const nobody = 65534;
    const dir = await checkout(base, nobody);
    const home = path.join(base, 'home');
    await fs.mkdir(home);
    await fs.chown(home, nobody, nobody);
    const body = await script(blocks, `${home}/.cache/sparsevirt/sparsevirt-sock`, home, []);
    await fs.writeFile(path.join(home, 'quickstart.sh'), body);
    const env = baseEnv(home);
    const r = await sh('/usr/sbin/runuser', ['-u', 'nobody', '--', 'env', '-i', ...Object.entries(env).map(([k, v]) => `${k}=${v}`),
      'sh', '-c', `cd ${dir} && exec sh ${home}/quickstart.sh`], env);
    await stopLeftovers(home);
    checkRun(r, 'nobody');
    assert.doesNotMatch(r.out, /XDG_RUNTIME_DIR/);
  } finally {
    await stopLeftovers(path.join(base, 'home')).catch(() => undefined);
    await fs.rm(base, { recursive: true, force: true });
  }
});
