/**
 * Persistent daemon state: one JSON file per pool in `<stateDir>/pools/`, written atomically
 * (temp file + fsync + rename + fsync of the directory), so a crash at any point leaves either
 * the old or the new file, never a torn one. Stray temp files of an interrupted write are
 * removed at load.
 *
 * One daemon per state directory: `StateDirLock` holds `<stateDir>/sparsevirtd.pid` locked for
 * the daemon's life, as libvirtd holds its pid file.
 */
import { randomBytes } from 'node:crypto';
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { SparsevirtError } from '../errors.js';
import * as sys from '../io/sys.js';

export interface PoolRecord {
  /** Format version of this file. */
  version: 1;
  name: string;
  uuid: string;
  /** The pool type ('dir' in records written before there were other types). */
  type: string;
  /** The target directory ('' for pools without one). */
  target: string;
  /** `<source>` of a network pool (hosts, source name, auth); absent for dir pools. */
  source?: { hosts: Array<{ name: string; port: number | null }>; name: string | null; auth: { type: string; username: string; secret: { uuid: string } | { usage: string } } | null };
  /** libvirt's `rbd:config_opts`, in order; absent when none. */
  configOpts?: Array<{ name: string; value: string }>;
  /** Mode for the target directory when built (null: libvirt's default 0711). */
  mode: number | null;
  autostart: boolean;
  /** Running when last saved: restarted with the daemon, as libvirt keeps its pools' status. */
  active: boolean;
}

/** In the name of a file being written (writeFileAtomic): one left behind by a crash is removed at start. */
export const TMP_MARK = '.tmp-';

export class PoolStore {
  readonly dir: string;
  constructor(stateDir: string) {
    this.dir = path.join(stateDir, 'pools');
  }

  /** Creates the directory; returns true if it did not exist (a fresh state directory). */
  async init(): Promise<boolean> {
    let fresh = false;
    try {
      await fs.access(this.dir);
    } catch {
      fresh = true;
    }
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    return fresh;
  }

  private file(name: string): string {
    // Pool names cannot contain '/' (refused at define); encode anything else unusual.
    return path.join(this.dir, `${encodeURIComponent(name)}.json`);
  }

  /** Every readable record; unreadable ones are reported through `onBad` and skipped. */
  async load(onBad: (file: string, err: unknown) => void): Promise<PoolRecord[]> {
    const out: PoolRecord[] = [];
    for (const entry of await fs.readdir(this.dir)) {
      const full = path.join(this.dir, entry);
      if (entry.includes(TMP_MARK)) {
        await fs.rm(full, { force: true }).catch(() => undefined);
        continue;
      }
      if (!entry.endsWith('.json')) continue;
      try {
        const rec = JSON.parse(await fs.readFile(full, 'utf8')) as PoolRecord;
        if (rec.version !== 1 || typeof rec.name !== 'string' || typeof rec.uuid !== 'string' || typeof rec.target !== 'string') {
          throw new Error('not a sparsevirtd pool record');
        }
        out.push({ ...rec, mode: typeof rec.mode === 'number' ? rec.mode : null, autostart: !!rec.autostart, active: !!rec.active, type: typeof rec.type === 'string' ? rec.type : 'dir' });
      } catch (err) {
        onBad(full, err);
      }
    }
    return out;
  }

  async save(rec: PoolRecord): Promise<void> {
    await writeFileAtomic(this.file(rec.name), `${JSON.stringify(rec, null, 2)}\n`);
  }

  async remove(name: string): Promise<void> {
    await fs.rm(this.file(name), { force: true });
    await syncDir(this.dir);
  }
}

/** Write temp + fsync + rename + fsync(dir). */
export async function writeFileAtomic(file: string, content: string): Promise<void> {
  const dir = path.dirname(file);
  const tmp = path.join(dir, `${path.basename(file)}${TMP_MARK}${process.pid}-${randomBytes(4).toString('hex')}`);
  const fh = await fs.open(tmp, 'wx', 0o600);
  try {
    await fh.writeFile(content, 'utf8');
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
  await fh.close();
  try {
    await fs.rename(tmp, file);
  } catch (err) {
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
  await syncDir(dir);
}

async function syncDir(dir: string): Promise<void> {
  const fh = await fs.open(dir, 'r');
  try {
    await fh.sync();
  } catch {
    // some filesystems refuse fsync on a directory; the rename is still atomic there
  } finally {
    await fh.close();
  }
}

/** The lock file in a state directory: the holder's pid, as libvirtd's pid file. */
export const PID_FILE = 'sparsevirtd.pid';

/** Lock files this process holds (a second daemon in the same process is refused too). */
const heldHere = new Set<string>();

/**
 * The state directory's lock. With the native syscalls: the pid file stays open with an
 * exclusive `flock`, which the kernel drops when the process ends however it ends, so a killed
 * daemon never blocks a restart. Without them: the pid file is created exclusively (O_EXCL), and
 * one whose pid no longer runs, or is a process that does not hold the file open, is stale and
 * replaced.
 */
export class StateDirLock {
  private constructor(readonly file: string, private fd: number) {}

  /** Lock `stateDir` (which must exist) or throw ERR_EXISTS naming the pid that holds it. */
  static acquire(stateDir: string): StateDirLock {
    const file = path.join(fsSync.realpathSync(stateDir), PID_FILE);
    if (heldHere.has(file)) throw inUse(stateDir, file, process.pid);
    if (!sys.nativeSyscallsAvailable()) return StateDirLock.acquireExclusive(stateDir, file);
    for (let attempt = 0; attempt < 20; attempt++) {
      const fd = openLockFile(file, false);
      const r = sys.flock(fd, sys.LOCK_EX | sys.LOCK_NB);
      if (r < 0) {
        fsSync.closeSync(fd);
        if (r === -sys.EAGAIN) throw inUse(stateDir, file, readPid(file));
        throw ioError(`cannot lock '${file}'`, sys.errnoException(r, 'flock'));
      }
      // The previous holder removes the file before it lets go: a lock on a removed file is no lock.
      if (!sameFile(fd, file)) {
        fsSync.closeSync(fd);
        continue;
      }
      return StateDirLock.own(file, fd);
    }
    throw new SparsevirtError('ERR_IO', `cannot lock '${file}': it keeps being replaced`);
  }

  private static acquireExclusive(stateDir: string, file: string): StateDirLock {
    for (let attempt = 0; attempt < 20; attempt++) {
      let fd: number;
      try {
        fd = openLockFile(file, true);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        const pid = readPid(file);
        if (pid === null) {
          // being written by a daemon starting right now, or left empty by one that died then
          if (Date.now() - mtimeOf(file) < 2000) throw inUse(stateDir, file, null);
        } else if (holdsFile(pid, file)) {
          throw inUse(stateDir, file, pid);
        }
        try {
          fsSync.unlinkSync(file);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw ioError(`cannot remove the stale lock '${file}'`, e);
        }
        continue;
      }
      return StateDirLock.own(file, fd);
    }
    throw new SparsevirtError('ERR_IO', `cannot lock '${file}': it keeps being replaced`);
  }

  private static own(file: string, fd: number): StateDirLock {
    try {
      fsSync.ftruncateSync(fd, 0);
      fsSync.writeSync(fd, `${process.pid}\n`, 0);
    } catch (err) {
      // ours (locked, or created here): an empty pid file must not stand in the next daemon's way
      fsSync.rmSync(file, { force: true });
      fsSync.closeSync(fd);
      throw ioError(`cannot write '${file}'`, err);
    }
    heldHere.add(file);
    return new StateDirLock(file, fd);
  }

  /** Remove the pid file, then let go of the lock (in this order, as libvirt does). */
  release(): void {
    if (this.fd < 0) return;
    try {
      fsSync.unlinkSync(this.file);
    } catch {
      // already gone; the lock goes with the fd
    }
    fsSync.closeSync(this.fd);
    this.fd = -1;
    heldHere.delete(this.file);
  }
}

function openLockFile(file: string, exclusive: boolean): number {
  const { O_RDWR, O_CREAT, O_EXCL, O_NOFOLLOW } = fsSync.constants;
  try {
    return fsSync.openSync(file, O_RDWR | O_CREAT | O_NOFOLLOW | (exclusive ? O_EXCL : 0), 0o644);
  } catch (err) {
    if (exclusive && (err as NodeJS.ErrnoException).code === 'EEXIST') throw err;
    throw ioError(`cannot open the lock file '${file}'`, err);
  }
}

function inUse(stateDir: string, file: string, pid: number | null): SparsevirtError {
  const who = pid === null ? 'another sparsevirtd' : `another sparsevirtd (pid ${pid})`;
  return new SparsevirtError('ERR_EXISTS', `state directory '${stateDir}' is in use by ${who}: '${file}' is locked`);
}

function ioError(message: string, err: unknown): SparsevirtError {
  return new SparsevirtError('ERR_IO', `${message}: ${(err as Error).message}`, { cause: err });
}

function readPid(file: string): number | null {
  try {
    const m = /^(\d+)\n/.exec(fsSync.readFileSync(file, 'latin1'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

function mtimeOf(file: string): number {
  try {
    return fsSync.statSync(file).mtimeMs;
  } catch {
    return 0;
  }
}

function sameFile(fd: number, file: string): boolean {
  try {
    const a = fsSync.fstatSync(fd);
    const b = fsSync.lstatSync(file);
    return a.ino === b.ino && a.dev === b.dev;
  } catch {
    return false;
  }
}

/**
 * Whether `pid` is a running process that has `file` open (a holder keeps it open for its life;
 * a recycled pid does not). When that cannot be seen, a running `pid` counts as the holder.
 */
function holdsFile(pid: number, file: string): boolean {
  if (pid === process.pid) return heldHere.has(file);
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ESRCH') return false;
  }
  let fds: string[];
  try {
    fds = fsSync.readdirSync(`/proc/${pid}/fd`);
  } catch (err) {
    // ENOENT with a /proc of our own: it has exited
    return !((err as NodeJS.ErrnoException).code === 'ENOENT' && fsSync.existsSync('/proc/self/fd'));
  }
  for (const fd of fds) {
    try {
      if (fsSync.readlinkSync(`/proc/${pid}/fd/${fd}`) === file) return true;
    } catch {
      // closed meanwhile
    }
  }
  return false;
}
