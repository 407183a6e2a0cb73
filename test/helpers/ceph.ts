/**
 * Helpers for tests that talk to the one-node Ceph cluster of `scripts/setup-ceph.sh`.
 *
 * - The cluster is found through `$SPARSEVIRT_CEPH_DIR/cluster.json` (default
 *   /var/lib/sparsevirt-ceph/cluster.json), which the script writes.
 * - Locally, a missing or silent cluster skips such tests with a message.
 * - In CI (`process.env.CI` set), it FAILS them: CI promised a cluster.
 *
 * The `rbd` and `ceph` command-line tools run through `execFile` (no shell), as client.admin.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { run } from './run.js';

export const CEPH_DIR = process.env.SPARSEVIRT_CEPH_DIR ?? '/var/lib/sparsevirt-ceph';

export interface CephCluster {
  conf: string;
  dir: string;
  fsid: string;
  monitors: Array<{ host: string; port: number }>;
  pool: string;
  admin: { user: string; keyring: string; key: string };
  libvirt: { user: string; keyring: string; key: string };
}

let probed: Promise<{ cluster: CephCluster | null; reason: string }> | undefined;

function probe(): Promise<{ cluster: CephCluster | null; reason: string }> {
  probed ??= (async () => {
    let cluster: CephCluster;
    try {
      cluster = JSON.parse(readFileSync(join(CEPH_DIR, 'cluster.json'), 'utf8')) as CephCluster;
    } catch (err) {
      return { cluster: null, reason: `no ${join(CEPH_DIR, 'cluster.json')} (${(err as Error).message})` };
    }
    const r = await run('rbd', ['-c', cluster.conf, '--id', 'admin', '--keyring', cluster.admin.keyring, 'ls', cluster.pool], { timeoutMs: 20_000 });
    if (r.code !== 0) return { cluster: null, reason: `rbd ls ${cluster.pool} failed: ${(r.stderr || r.stdout).trim()}` };
    const full = await fullness(cluster);
    if (full) return { cluster: null, reason: full };
    return { cluster, reason: '' };
  })();
  return probed;
}

/** Why the cluster takes no writes (an OSD or pool marked full), or '' if it does. */
export async function fullness(ceph: CephCluster): Promise<string> {
  const h = await run('ceph', ['-c', ceph.conf, 'health', 'detail', '--format', 'json'], { timeoutMs: 20_000 });
  if (h.code !== 0) return `ceph health failed: ${h.stderr.trim()}`;
  const checks = (JSON.parse(h.stdout) as { checks?: Record<string, { summary?: { message?: string } }> }).checks ?? {};
  const full = Object.entries(checks).filter(([k]) => /FULL/.test(k) && !/NEARFULL|BACKFILLFULL/.test(k));
  if (full.length === 0) return '';
  const df = await run('ceph', ['-c', ceph.conf, 'osd', 'df'], { timeoutMs: 20_000 });
  return `the cluster takes no writes: ${full.map(([k, v]) => `${k}: ${v.summary?.message ?? ''}`).join('; ')}\n${df.stdout.trim()}`;
}

/**
 * Call first in a test that needs Ceph: `const ceph = await requireCeph(t); if (!ceph) return;`
 * In CI a missing cluster throws (the test fails); locally the test is skipped.
 */
export async function requireCeph(t: TestContext): Promise<CephCluster | null> {
  const { cluster, reason } = await probe();
  if (cluster) return cluster;
  const hint = `${reason} (run: sudo scripts/setup-ceph.sh)`;
  if (process.env.CI) throw new Error(`the Ceph cluster of scripts/setup-ceph.sh is required in CI: ${hint}`);
  t.skip(`Ceph not available: ${hint}`);
  return null;
}

/** `rbd -c CONF --id admin … args` (stdout); throws with stderr on failure. */
export async function rbdCli(ceph: CephCluster, args: string[], timeoutMs = 120_000): Promise<string> {
  const r = await run('rbd', ['-c', ceph.conf, '--id', 'admin', '--keyring', ceph.admin.keyring, ...args], { timeoutMs });
  if (r.code !== 0) throw new Error(`rbd ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
  return r.stdout;
}

/** sha256 (hex) of `rbd export POOL/IMAGE -`. */
export function rbdExportSha256(ceph: CephCluster, image: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('rbd', ['-c', ceph.conf, '--id', 'admin', '--keyring', ceph.admin.keyring, 'export', '--no-progress', `${ceph.pool}/${image}`, '-'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const hash = createHash('sha256');
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => hash.update(b));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(hash.digest('hex')) : reject(new Error(`rbd export failed (${code}): ${stderr.trim()}`))));
  });
}

/** `rbd diff --format json`: the extents Ceph reports as allocated. */
export async function rbdDiff(ceph: CephCluster, image: string): Promise<Array<{ offset: number; length: number; exists: boolean }>> {
  const out = await rbdCli(ceph, ['diff', '--format', 'json', `${ceph.pool}/${image}`]);
  return (JSON.parse(out) as Array<{ offset: number; length: number; exists: string | boolean }>).map((e) => ({
    offset: e.offset,
    length: e.length,
    exists: e.exists === true || e.exists === 'true',
  }));
}

/** `rbd du --format json`: used bytes of the image (its head, not its snapshots). */
export async function rbdDuUsed(ceph: CephCluster, image: string): Promise<number> {
  const out = await rbdCli(ceph, ['du', '--format', 'json', `${ceph.pool}/${image}`]);
  const j = JSON.parse(out) as { images: Array<{ name: string; snapshot?: string; used_size: number }> };
  return j.images.filter((i) => i.name === image && !i.snapshot).reduce((n, i) => n + i.used_size, 0);
}

/** A fresh image name for one test. */
export function imageName(prefix: string): string {
  return `svtest-${prefix}-${randomBytes(4).toString('hex')}`;
}

/** The OSD's pid (from its pid file), for pausing it. */
export function osdPid(ceph: CephCluster): number {
  return Number(readFileSync(join(ceph.dir, 'run', 'ceph-osd.0.pid'), 'utf8').trim());
}

/**
 * Runs `fn` with the OSD stopped (SIGSTOP), and always continues it (SIGCONT) afterwards, then
 * waits until the cluster serves again (clusterServes): the cluster stays as it was, the OSD just
 * did not answer for a while, and what runs next finds it answering.
 */
export async function withOsdPaused<T>(ceph: CephCluster, fn: () => Promise<T>): Promise<T> {
  const pid = osdPid(ceph);
  process.kill(pid, 'SIGSTOP');
  try {
    return await fn();
  } finally {
    process.kill(pid, 'SIGCONT');
    await clusterServes(ceph);
  }
}

/**
 * Waits until the cluster serves again after one of its daemons was stopped: every placement
 * group active (`ceph pg stat`) and an image created and removed (the monitor, the OSD and the
 * pool's objects all answer). Marks the OSD down once if it does not come back by itself (it
 * re-peers then); throws after 120 s.
 */
export async function clusterServes(ceph: CephCluster): Promise<void> {
  const until = performance.now() + 120_000;
  let kicked = false;
  let why = '';
  for (;;) {
    const pg = await run('ceph', ['-c', ceph.conf, 'pg', 'stat', '--format', 'json'], { timeoutMs: 15_000 });
    if (pg.code !== 0) why = `ceph pg stat: ${pg.stderr.trim()}`;
    else {
      const s = JSON.parse(pg.stdout) as { pg_summary?: { num_pgs: number; num_pg_by_state: Array<{ name: string; num: number }> } };
      const sum = s.pg_summary;
      const active = sum ? sum.num_pg_by_state.filter((x) => x.name.split('+').includes('active')).reduce((n, x) => n + x.num, 0) : 0;
      if (!sum || active < sum.num_pgs) why = `placement groups: ${JSON.stringify(sum?.num_pg_by_state ?? s)}`;
      else {
        const probe = imageName('probe');
        const made = await run('rbd', ['-c', ceph.conf, '--id', 'admin', '--keyring', ceph.admin.keyring, 'create', '--size', '4M', `${ceph.pool}/${probe}`], { timeoutMs: 15_000 });
        const gone = await run('rbd', ['-c', ceph.conf, '--id', 'admin', '--keyring', ceph.admin.keyring, 'rm', '--no-progress', `${ceph.pool}/${probe}`], { timeoutMs: 15_000 });
        if (made.code === 0 && gone.code === 0) return;
        why = `rbd create/rm: ${made.stderr.trim()} ${gone.stderr.trim()}`;
      }
    }
    if (performance.now() > until) throw new Error(`the cluster does not serve again: ${why} ${await fullness(ceph)}`);
    if (!kicked && performance.now() > until - 90_000) {
      kicked = true;
      await run('ceph', ['-c', ceph.conf, 'osd', 'down', '0'], { timeoutMs: 20_000 });
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

/**
 * The largest lag of a 10 ms timer while `p` runs: the event loop's responsiveness. Resolves
 * with `p`'s outcome (`value` or `error`), how long it took, and the lag.
 */
export async function measureLag<T>(p: () => Promise<T>): Promise<{ value?: T; error?: unknown; ms: number; maxLagMs: number }> {
  let maxLag = 0;
  let last = performance.now();
  const iv = setInterval(() => {
    const now = performance.now();
    maxLag = Math.max(maxLag, now - last - 10);
    last = now;
  }, 10);
  const t0 = performance.now();
  try {
    const value = await p();
    return { value, ms: performance.now() - t0, maxLagMs: maxLag };
  } catch (error) {
    return { error, ms: performance.now() - t0, maxLagMs: maxLag };
  } finally {
    clearInterval(iv);
  }
}
