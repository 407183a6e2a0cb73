/**
 * Helpers for tests that talk to a real libvirtd (set up by `scripts/setup-libvirt.sh`).
 *
 * - Locally, a missing libvirtd skips such tests with a message.
 * - In CI (`process.env.CI` set), a missing libvirtd FAILS them: CI promised one.
 *
 * Everything runs through `execFile` (no shell). Scratch pools live on tmpfs (/dev/shm):
 * never fully allocate large volumes there; `createVolume` always passes `--allocation 0`.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { run } from './run.js';

/** The system instance over its default unix socket. */
export const LIBVIRTD_URI = process.env.SPARSEVIRT_LIBVIRT_URI ?? 'qemu:///system';
export const LIBVIRTD_SOCKET = process.env.SPARSEVIRT_LIBVIRT_SOCKET ?? '/var/run/libvirt/libvirt-sock';
/** Test PKI written by `scripts/setup-tls.sh` (via `setup-libvirt.sh --tcp-tls`), libvirt layout. */
export const LIBVIRTD_PKI_DIR = process.env.SPARSEVIRT_PKI_DIR ?? '/etc/pki/sparsevirt-test';
/** Plain TCP listener (auth none, bound to 127.0.0.1) — only with `setup-libvirt.sh --tcp-tls`. */
export const LIBVIRTD_TCP_URI = 'qemu+tcp://127.0.0.1:16509/system';
/** TLS listener with client certificates from LIBVIRTD_PKI_DIR — only with `--tcp-tls`. */
export const LIBVIRTD_TLS_URI = `qemu+tls://127.0.0.1:16514/system?pkipath=${LIBVIRTD_PKI_DIR}`;
/** Where scratch pools put their target directories (tmpfs). */
export const SCRATCH_ROOT = process.env.SPARSEVIRT_SCRATCH_ROOT ?? '/dev/shm';

export interface VirshResult {
  stdout: string;
  stderr: string;
  /** Exit status; -1 when virsh could not be run at all (ENOENT) or was killed. */
  code: number;
}

export interface VirshOptions {
  /** Connection URI; default LIBVIRTD_URI. */
  uri?: string;
  /** Kill virsh after this many ms (default 60 s). */
  timeoutMs?: number;
}

/** Runs `virsh -q -c URI ...args` without a shell. Never throws; look at `code`. */
export function virsh(args: string[], opts: VirshOptions = {}): Promise<VirshResult> {
  return run('virsh', ['-q', '-c', opts.uri ?? LIBVIRTD_URI, ...args], { timeoutMs: opts.timeoutMs });
}

/** Like `virsh` but throws (with virsh's stderr) on a non-zero exit; returns stdout. */
export async function virshOk(args: string[], opts: VirshOptions = {}): Promise<string> {
  const r = await virsh(args, opts);
  if (r.code !== 0) {
    throw new Error(`virsh ${args.join(' ')} failed (exit ${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
  }
  return r.stdout;
}

let availability: Promise<{ ok: boolean; reason: string }> | undefined;

/**
 * Whether a libvirtd answers: its socket exists and `virsh -c qemu:///system pool-list --all`
 * succeeds. (Not `virsh version`: with no qemu-system binary installed it fails on the
 * hypervisor version although the daemon is fine.) Cached for the process.
 */
export async function libvirtdAvailable(): Promise<boolean> {
  return (await probe()).ok;
}

function probe(): Promise<{ ok: boolean; reason: string }> {
  availability ??= (async () => {
    if (!LIBVIRTD_URI.includes('+') && !existsSync(LIBVIRTD_SOCKET)) {
      return { ok: false, reason: `no libvirtd socket at ${LIBVIRTD_SOCKET}` };
    }
    const r = await virsh(['pool-list', '--all'], { timeoutMs: 15_000 });
    if (r.code === 0) return { ok: true, reason: '' };
    return { ok: false, reason: `virsh -c ${LIBVIRTD_URI} pool-list failed: ${(r.stderr || r.stdout).trim()}` };
  })();
  return availability;
}

/**
 * Call first in a test that needs libvirtd: `if (!(await requireLibvirt(t))) return;`
 * Returns true when libvirtd answers. Otherwise, in CI it throws (the test fails); locally it
 * marks the test skipped and returns false.
 */
export async function requireLibvirt(t: TestContext): Promise<boolean> {
  const { ok, reason } = await probe();
  if (ok) return true;
  const hint = `${reason} (run: sudo scripts/setup-libvirt.sh)`;
  if (process.env.CI) throw new Error(`libvirtd is required in CI: ${hint}`);
  t.skip(`libvirtd not available: ${hint}`);
  return false;
}

let listenersCache: Promise<boolean> | undefined;

/** Whether libvirtd's TCP and TLS listeners (setup-libvirt.sh --tcp-tls) answer. Cached. */
export function libvirtdListenersAvailable(): Promise<boolean> {
  listenersCache ??= (async () => {
    if (!existsSync(join(LIBVIRTD_PKI_DIR, 'cacert.pem'))) return false;
    const [tcp, tls] = await Promise.all([
      virsh(['pool-list', '--all'], { uri: LIBVIRTD_TCP_URI, timeoutMs: 15_000 }),
      virsh(['pool-list', '--all'], { uri: LIBVIRTD_TLS_URI, timeoutMs: 15_000 }),
    ]);
    return tcp.code === 0 && tls.code === 0;
  })();
  return listenersCache;
}

/**
 * Like requireLibvirt, for the TCP/TLS listeners. Fails in CI only when CI said it set them up
 * (`SPARSEVIRT_EXPECT_TLS=1`, exported by .ci/run); skips otherwise.
 */
export async function requireLibvirtListeners(t: TestContext): Promise<boolean> {
  if (!(await requireLibvirt(t))) return false;
  if (await libvirtdListenersAvailable()) return true;
  const hint = `libvirtd TCP/TLS listeners do not answer on ${LIBVIRTD_TCP_URI} / ${LIBVIRTD_TLS_URI} (run: sudo scripts/setup-libvirt.sh --tcp-tls)`;
  if (process.env.CI && process.env.SPARSEVIRT_EXPECT_TLS === '1') throw new Error(hint);
  t.skip(hint);
  return false;
}

export interface ScratchPool {
  /** The libvirt pool name (the requested name plus a unique suffix). */
  name: string;
  /** Its target directory, under SCRATCH_ROOT. */
  path: string;
  /** The URI it was defined on. */
  uri: string;
}

let poolCounter = 0;

/**
 * Defines, builds and starts a dir pool whose target is a fresh directory under /dev/shm, runs
 * `fn`, then destroys and undefines the pool and removes the directory — also when `fn` throws.
 *
 * The pool is named `${name}-${pid}-${n}` so that parallel or crashed runs never collide; use
 * `pool.name`.
 */
export async function withScratchPool<T>(
  name: string,
  fn: (pool: ScratchPool) => Promise<T> | T,
  opts: { uri?: string } = {},
): Promise<T> {
  const uri = opts.uri ?? LIBVIRTD_URI;
  const unique = `${name}-${process.pid}-${++poolCounter}`;
  const path = join(SCRATCH_ROOT, `sparsevirt-test-${unique}-${randomBytes(3).toString('hex')}`);
  const pool: ScratchPool = { name: unique, path, uri };
  await mkdir(path, { recursive: true });
  let defined = false;
  try {
    await virshOk(['pool-define-as', unique, 'dir', '--target', path], { uri });
    defined = true;
    await virshOk(['pool-build', unique], { uri });
    await virshOk(['pool-start', unique], { uri });
    return await fn(pool);
  } finally {
    if (defined) {
      await virsh(['pool-destroy', unique], { uri }); // may be inactive already
      await virsh(['pool-undefine', unique], { uri });
    }
    await rm(path, { recursive: true, force: true });
  }
}

/**
 * Creates a raw volume with `--allocation 0` (nothing is allocated on tmpfs) and returns its
 * path. `capacity` is a byte count or a virsh scaled size such as '1G' / '512M'.
 */
export async function createVolume(
  pool: ScratchPool | string,
  name: string,
  capacity: number | bigint | string,
  opts: { uri?: string } = {},
): Promise<string> {
  const poolName = typeof pool === 'string' ? pool : pool.name;
  const uri = opts.uri ?? (typeof pool === 'string' ? LIBVIRTD_URI : pool.uri);
  const cap = typeof capacity === 'string' ? capacity : `${capacity.toString()}b`;
  await virshOk(['vol-create-as', poolName, name, cap, '--allocation', '0', '--format', 'raw'], { uri });
  return (await virshOk(['vol-path', '--pool', poolName, name], { uri })).trim();
}

/** Parses `virsh vol-info --bytes`: capacity and allocation in bytes. */
export async function volumeInfo(
  pool: ScratchPool | string,
  name: string,
  opts: { uri?: string } = {},
): Promise<{ type: string; capacity: number; allocation: number }> {
  const poolName = typeof pool === 'string' ? pool : pool.name;
  const uri = opts.uri ?? (typeof pool === 'string' ? LIBVIRTD_URI : pool.uri);
  const out = await virshOk(['vol-info', '--bytes', '--pool', poolName, name], { uri });
  const field = (k: string): string => {
    const m = new RegExp(`^${k}:\\s+(.*)$`, 'm').exec(out);
    if (!m) throw new Error(`vol-info: no ${k} in ${JSON.stringify(out)}`);
    return m[1]!.trim();
  };
  return {
    type: field('Type'),
    capacity: Number.parseInt(field('Capacity'), 10),
    allocation: Number.parseInt(field('Allocation'), 10),
  };
}

// ------------------------------------------------------------------ python3-libvirt

/** libvirt's Python bindings live under Debian's interpreter (the default python3 is another). */
export const PYTHON = '/usr/bin/python3';

let pythonProbe: Promise<string | null> | undefined;

/** Null when /usr/bin/python3 imports libvirt, else why not. */
function pythonLibvirtMissing(): Promise<string | null> {
  pythonProbe ??= run(PYTHON, ['-c', 'import libvirt; print(libvirt.getVersion())'], { timeoutMs: 30_000 }).then((r) =>
    r.code === 0 ? null : `${PYTHON} cannot import libvirt: ${(r.stderr || r.stdout).trim().split('\n').pop() ?? ''}`);
  return pythonProbe;
}

/** Call first: true when python3-libvirt is there; in CI its absence fails the test, locally it skips. */
export async function requirePython(t: TestContext): Promise<boolean> {
  const why = await pythonLibvirtMissing();
  if (why === null) return true;
  const hint = `${why} (apt-get install python3-libvirt; scripts/setup-libvirt.sh installs it)`;
  if (process.env.CI) throw new Error(`python3-libvirt is required in CI: ${hint}`);
  t.skip(hint);
  return false;
}
