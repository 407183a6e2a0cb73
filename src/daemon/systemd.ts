/**
 * What sparsevirtd needs of systemd, without a library:
 *
 * - socket activation (sd_listen_fds(3)): listening sockets passed from fd 3 on, LISTEN_FDS of
 *   them, meant for us when LISTEN_PID is our pid, named by LISTEN_FDNAMES (a socket unit's
 *   FileDescriptorName=, by default the unit's name);
 * - readiness (sd_notify(3)): `READY=1` and friends as datagrams to NOTIFY_SOCKET. Node cannot
 *   send on a unix datagram socket, so systemd-notify(1) sends them for us: it sends with its
 *   parent's pid (ours) as the sender when it may (root), and waits until the manager has
 *   processed the message (a barrier) before it exits; the units also set NotifyAccess=all;
 * - installing the units shipped in the package's systemd/ folder.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { SparsevirtError } from '../errors.js';

export interface ActivatedSocket {
  fd: number;
  /** From LISTEN_FDNAMES; 'unknown' when not named (systemd's word for it). */
  name: string;
}

export type ListenerRole = 'rw' | 'ro' | 'tcp' | 'tls';

/** The first fd systemd passes (SD_LISTEN_FDS_START). */
const LISTEN_FDS_START = 3;

/**
 * The listening sockets systemd passed to this process, and the variables removed from the
 * environment (so that children do not take them for theirs). Empty when none are for us.
 */
export function listenFdsFromEnv(env: NodeJS.ProcessEnv = process.env, pid = process.pid): ActivatedSocket[] {
  const fds = env.LISTEN_FDS;
  const forPid = env.LISTEN_PID;
  const names = env.LISTEN_FDNAMES;
  delete env.LISTEN_FDS;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDNAMES;
  if (!fds || !forPid || !/^\d+$/.test(fds) || Number(forPid) !== pid) return [];
  const n = Number(fds);
  const nameList = names ? names.split(':') : [];
  const out: ActivatedSocket[] = [];
  for (let i = 0; i < n; i++) out.push({ fd: LISTEN_FDS_START + i, name: nameList[i] || 'unknown' });
  return out;
}

/**
 * What a socket from systemd is for, by its name: `sparsevirtd-ro.socket` (or any name ending
 * in `-ro`) is read-only, `…-tls` TLS, `…-tcp` plain TCP, `sparsevirtd.socket` the read-write
 * unix socket; null for a name that says nothing (a unix socket is then read-write).
 */
export function listenerRole(name: string): ListenerRole | null {
  const base = name.replace(/\.socket$/, '');
  if (/(^|-)ro$/.test(base)) return 'ro';
  if (/(^|-)tls$/.test(base)) return 'tls';
  if (/(^|-)tcp$/.test(base)) return 'tcp';
  if (/(^|-)rw$/.test(base) || base === 'sparsevirtd' || base === 'sparsevirt-sock') return 'rw';
  return null;
}

/**
 * The path a unix socket fd is bound to (Node has no getsockname for it): its inode from
 * /proc/self/fd, then its line in /proc/net/unix. null when it cannot be told.
 */
export function unixSocketPath(fd: number): string | null {
  try {
    const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/self/fd/${fd}`));
    if (!m) return null;
    for (const line of fs.readFileSync('/proc/net/unix', 'utf8').split('\n').slice(1)) {
      // Num RefCount Protocol Flags Type St Inode Path
      const f = line.trim().split(/\s+/);
      if (f[6] === m[1] && f[7]) return f.slice(7).join(' ');
    }
  } catch {
    // no /proc
  }
  return null;
}

export interface NotifierOptions {
  env?: NodeJS.ProcessEnv;
  /** The helper program (default systemd-notify, found on PATH). */
  program?: string;
  /** Told when a notification could not be sent. */
  onError?: (message: string) => void;
}

/**
 * Sends sd_notify states in order, one systemd-notify at a time. Does nothing without
 * NOTIFY_SOCKET (not started by systemd as Type=notify).
 */
export class Notifier {
  readonly socket: string | undefined;
  private chain: Promise<boolean> = Promise.resolve(true);
  private readonly program: string;
  private readonly onError: (message: string) => void;
  private readonly env: NodeJS.ProcessEnv;

  constructor(o: NotifierOptions = {}) {
    this.env = o.env ?? process.env;
    this.socket = this.env.NOTIFY_SOCKET || undefined;
    this.program = o.program ?? 'systemd-notify';
    this.onError = o.onError ?? (() => undefined);
  }

  get enabled(): boolean {
    return this.socket !== undefined;
  }

  /** Send `VAR=value` assignments (`READY=1`, `STATUS=…`); resolves true once sent. */
  notify(...assignments: string[]): Promise<boolean> {
    if (!this.socket) return Promise.resolve(false);
    const next = this.chain.then(() => this.send(assignments));
    this.chain = next;
    return next;
  }

  private send(assignments: string[]): Promise<boolean> {
    return new Promise((resolve) => {
      let err = '';
      let child;
      try {
        child = spawn(this.program, assignments, { stdio: ['ignore', 'ignore', 'pipe'], env: this.env });
      } catch (e) {
        this.onError(`cannot run ${this.program}: ${(e as Error).message}`);
        resolve(false);
        return;
      }
      child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
      child.once('error', (e: NodeJS.ErrnoException) => {
        this.onError(e.code === 'ENOENT' ? `${this.program} not found: systemd cannot be told ${assignments.join(' ')}` : `${this.program}: ${e.message}`);
        resolve(false);
      });
      child.once('close', (code) => {
        if (code === 0) return resolve(true);
        if (code !== null || err) this.onError(`${this.program} ${assignments.join(' ')} failed (${code}): ${err.trim()}`);
        resolve(false);
      });
    });
  }
}

// ------------------------------------------------------------------ units

export const UNIT_FILES = ['sparsevirtd.service', 'sparsevirtd.socket', 'sparsevirtd-ro.socket'] as const;

/** The package's systemd/ folder, from the bundle (dist/bin) or the compiled module (dist/src/daemon). */
export function unitSourceDir(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (const rel of ['../../systemd', '../../../systemd']) {
    const dir = path.resolve(here, rel);
    if (fs.existsSync(path.join(dir, 'sparsevirtd.service'))) return dir;
  }
  throw new SparsevirtError('ERR_NOT_FOUND', `the systemd units are not in this package (looked beside ${here})`);
}

/** systemd's quoting of one ExecStart= word. */
function execWord(w: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(w) ? w : `"${w.replace(/\\/g, '\\\\').replace(/"/g, '\\"')}"`;
}

/**
 * The unit text with ExecStart= running this very installation: `node` by its absolute path
 * (the unit does not depend on PATH) and the program as it was started.
 */
export function renderUnit(text: string, exec: { node: string; script: string }): string {
  return text.replace(/^ExecStart=\S+/m, `ExecStart=${execWord(exec.node)} ${execWord(exec.script)}`);
}

export interface InstallResult {
  dir: string;
  files: string[];
}

/**
 * Write the units to PREFIX/lib/systemd/system (PREFIX default /usr/local, a directory systemd
 * reads units from), ExecStart= pointing at this installation.
 */
export function installUnits(prefix: string, exec: { node: string; script: string }, from = unitSourceDir()): InstallResult {
  const dir = path.join(prefix, 'lib', 'systemd', 'system');
  fs.mkdirSync(dir, { recursive: true, mode: 0o755 });
  const files: string[] = [];
  for (const name of UNIT_FILES) {
    const text = fs.readFileSync(path.join(from, name), 'utf8');
    const dest = path.join(dir, name);
    const tmp = `${dest}.tmp-${process.pid}`;
    fs.writeFileSync(tmp, name.endsWith('.service') ? renderUnit(text, exec) : text, { mode: 0o644 });
    fs.renameSync(tmp, dest);
    files.push(dest);
  }
  return { dir, files };
}
