/**
 * The test environment itself: a real libvirtd 9.x answers, scratch pools work on tmpfs, and the
 * anchor tools exist. In CI these fail (not skip) when scripts/setup-libvirt.sh did not do its job.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import {
  LIBVIRTD_PKI_DIR,
  LIBVIRTD_TCP_URI,
  LIBVIRTD_TLS_URI,
  createVolume,
  requireLibvirt,
  requireLibvirtListeners,
  virsh,
  virshOk,
  volumeInfo,
  withScratchPool,
} from './helpers/libvirt.js';

const run = promisify(execFile);

test('libvirtd answers on qemu:///system', async (t) => {
  if (!(await requireLibvirt(t))) return;
  const r = await virsh(['uri']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), 'qemu:///system');
  const pools = await virsh(['pool-list', '--all']);
  assert.equal(pools.code, 0, pools.stderr);
});

test('virsh and libvirtd are version 9.x', async (t) => {
  if (!(await requireLibvirt(t))) return;
  const client = (await run('virsh', ['--version'])).stdout.trim();
  assert.match(client, /^9\.\d+\.\d+/, `virsh --version: ${client}`);
  const daemon = (await run('libvirtd', ['--version'])).stdout.trim();
  assert.match(daemon, /\b9\.\d+\.\d+\b/, `libvirtd --version: ${daemon}`);
  // The library the daemon speaks through: "Using library: libvirt 9.x". (`virsh version` exits
  // non-zero here because no qemu-system emulator is installed; the library lines come first.)
  const v = await virsh(['version']);
  assert.match(v.stdout, /Using library: libvirt 9\.\d+\.\d+/, v.stdout + v.stderr);
});

test('a scratch dir pool on /dev/shm holds a sparse raw volume', async (t) => {
  if (!(await requireLibvirt(t))) return;
  let seenPath = '';
  await withScratchPool('envtest', async (pool) => {
    seenPath = pool.path;
    assert.ok(pool.path.startsWith('/dev/shm/'), pool.path);
    const list = await virshOk(['pool-list', '--all']);
    assert.match(list, new RegExp(`\\b${pool.name}\\s+active\\b`));
    const cap = 1024 ** 3;
    const path = await createVolume(pool, 'v.raw', cap);
    assert.equal(path, join(pool.path, 'v.raw'));
    const st = statSync(path);
    assert.equal(st.size, cap);
    assert.equal(st.blocks, 0, 'created with --allocation 0: nothing allocated');
    const info = await volumeInfo(pool, 'v.raw');
    assert.equal(info.capacity, cap);
    assert.equal(info.allocation, 0);
  });
  assert.ok(seenPath);
  assert.equal(existsSync(seenPath), false, 'scratch dir removed');
  const list = await virshOk(['pool-list', '--all', '--name']);
  assert.doesNotMatch(list, /envtest-/);
});

test('a scratch pool is removed when the body throws', async (t) => {
  if (!(await requireLibvirt(t))) return;
  let name = '';
  await assert.rejects(
    withScratchPool('envfail', async (pool) => {
      name = pool.name;
      throw new Error('boom');
    }),
    /boom/,
  );
  const r = await virsh(['pool-info', name]);
  assert.notEqual(r.code, 0, `pool ${name} should be gone`);
});

test('libvirtd TCP and TLS listeners answer (setup-libvirt.sh --tcp-tls)', async (t) => {
  if (!(await requireLibvirtListeners(t))) return;
  for (const f of ['cacert.pem', 'clientcert.pem', 'clientkey.pem', 'servercert.pem', 'serverkey.pem']) {
    assert.ok(existsSync(join(LIBVIRTD_PKI_DIR, f)), `${LIBVIRTD_PKI_DIR}/${f}`);
  }
  for (const uri of [LIBVIRTD_TCP_URI, LIBVIRTD_TLS_URI]) {
    const r = await virsh(['uri'], { uri });
    assert.equal(r.code, 0, `${uri}: ${r.stderr}`);
  }
});

test('anchor tools for interop tests and the bench are installed', async (t) => {
  const tools: Array<[string, string[]]> = [
    ['nbdkit', ['--version']],
    ['nbdcopy', ['--version']],
    ['qemu-img', ['--version']],
  ];
  for (const [cmd, args] of tools) {
    try {
      await run(cmd, args);
    } catch (err) {
      const msg = `${cmd} not usable: ${(err as Error).message} (run: sudo scripts/setup-libvirt.sh)`;
      if (process.env.CI) assert.fail(msg);
      t.diagnostic(msg);
    }
  }
});
