/**
 * Support for the reliability tests (test/reliability-*.test.ts) and the long-form scripts
 * (fuzz.ts, soak.ts): sparsevirtd as a child process (so that it can be killed, stopped,
 * sandboxed and measured through /proc), /proc readings, tmpfs mounts, and a client worker
 * process (`node dist/test/long/harness.js --worker JOB`) that runs transfers with the client
 * library and reports JSON lines on stdout.
 *
 * Note: `node --test dist/test/` runs every .js file under a directory named `test`, this one
 * included. Without `--worker` this module does nothing when run, so that is harmless.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Chunk } from '../../src/chunk.js';
import { connect, type StorageVol } from '../../src/client/index.js';
import { fileChunks, writeChunks } from '../../src/sparse/index.js';

export const MiB = 1 << 20;
/** The repository root (this file runs as dist/test/long/harness.js). */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const DAEMON_MAIN = path.join(ROOT, 'dist/bin/sparsevirtd.mjs');
export const HARNESS = fileURLToPath(import.meta.url);
export const FIXTURES = path.join(ROOT, 'test/fixtures/libvirt-9.0');
export const NOBODY = { uid: 65534, gid: 65534 };

export function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` every `everyMs` until it is truthy; throws with `what` after `timeoutMs`. */
export async function waitUntil<T>(cond: () => T | Promise<T>, timeoutMs: number, what: string, everyMs = 20): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** An environment for child processes without the test runner's marker (see the note above). */
export function childEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra };
  delete env.NODE_TEST_CONTEXT;
  return env;
}

// ------------------------------------------------------------------ /proc

export interface MemStatus {
  /** Resident set size now, bytes. */
  rss: number;
  /** Peak resident set size over the process's life, bytes. */
  hwm: number;
}

export function memStatus(pid: number): MemStatus {
  const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0) * 1024;
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

/** What each open file descriptor of `pid` points at (`/path`, `socket:[…]`, `pipe:[…]`…). */
export function openFds(pid: number): string[] {
  const out: string[] = [];
  let names: string[];
  try {
    names = fs.readdirSync(`/proc/${pid}/fd`);
  } catch {
    return out;
  }
  for (const n of names) {
    try {
      out.push(fs.readlinkSync(`/proc/${pid}/fd/${n}`));
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

/** Inodes of the listening TCP sockets in this network namespace. */
export function listeningTcpInodes(): Set<string> {
  const out = new Set<string>();
  for (const f of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text = '';
    try {
      text = fs.readFileSync(f, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length > 9 && cols[3] === '0A') out.add(cols[9]!);
    }
  }
  return out;
}

// ------------------------------------------------------------------ tmpfs

/** Mounts a tmpfs of `size` (e.g. '8m') at `dir` (root only). */
export function mountTmpfs(dir: string, size: string, mode = '0777'): void {
  fs.mkdirSync(dir, { recursive: true });
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=${mode}`, 'tmpfs', dir]);
}

export function umount(dir: string): void {
  try {
    execFileSync('umount', [dir], { stdio: 'ignore' });
  } catch {
    try {
      execFileSync('umount', ['-l', dir], { stdio: 'ignore' });
    } catch {
      // not mounted
    }
  }
}

// ------------------------------------------------------------------ sparsevirtd as a child

export interface SpawnDaemonOptions {
  /** Working directory: the socket is `<dir>/sock`, the state `<dir>/state` unless given. */
  dir: string;
  stateDir?: string;
  /** Extra listeners beyond the unix socket (`tcp:…`, `tls:…`); `listen: null` = none at all (defaults). */
  listen?: string[] | null;
  /** Run as `nobody` (root only): a sandbox for fuzzing; the directories are chowned. */
  asNobody?: boolean;
  /** RLIMIT_FSIZE in bytes (via prlimit): no file the daemon writes can grow past it. */
  fileSizeLimit?: number;
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
  args?: string[];
  env?: NodeJS.ProcessEnv;
  /** Wait for the unix socket to accept connections (default true). */
  waitReady?: boolean;
}

export interface ChildDaemon {
  readonly pid: number;
  readonly proc: ChildProcess;
  readonly socket: string;
  readonly stateDir: string;
  /** `sparsevirt+unix:///system?socket=…` */
  readonly uri: string;
  /** `qemu+unix:///system?socket=…` for virsh. */
  readonly virshUri: string;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** True until the process exits. */
  alive(): boolean;
  /** Everything it wrote on stderr (JSON log lines). */
  stderr(): string;
  /** Log records at `error` level and stray rejections/exceptions it printed. */
  errors(): string[];
  mem(): MemStatus;
  fds(): string[];
  signal(sig: NodeJS.Signals): void;
  /** SIGTERM (SIGCONT first, in case it is stopped), then SIGKILL after `graceMs`; resolves once it exited. */
  stop(graceMs?: number): Promise<void>;
}

export async function spawnDaemon(o: SpawnDaemonOptions): Promise<ChildDaemon> {
  const socket = path.join(o.dir, 'sock');
  const stateDir = o.stateDir ?? path.join(o.dir, 'state');
  const listen = o.listen === null ? [] : [`unix:${socket}`, ...(o.listen ?? [])];
  const args = [DAEMON_MAIN, ...listen.flatMap((l) => ['--listen', l]), '--state-dir', stateDir, '--log-level', o.logLevel ?? 'info', ...(o.args ?? [])];
  let cmd = process.execPath;
  let argv = args;
  if (o.fileSizeLimit !== undefined) {
    cmd = 'prlimit';
    argv = [`--fsize=${o.fileSizeLimit}:${o.fileSizeLimit}`, '--', process.execPath, ...args];
  }
  const sandbox = o.asNobody && isRoot();
  if (sandbox) {
    await fsp.mkdir(stateDir, { recursive: true });
    chownTree(o.dir, NOBODY.uid, NOBODY.gid);
    if (!stateDir.startsWith(o.dir)) chownTree(stateDir, NOBODY.uid, NOBODY.gid);
  }
  const proc = spawn(cmd, argv, {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: childEnv(o.env),
    ...(sandbox ? { uid: NOBODY.uid, gid: NOBODY.gid } : {}),
  });
  let err = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (s: string) => {
    err += s;
    if (err.length > 64 * MiB) err = err.slice(-32 * MiB);
  });
  let alive = true;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.once('exit', (code, signal) => {
      alive = false;
      resolve({ code, signal });
    });
  });
  const d: ChildDaemon = {
    pid: proc.pid!,
    proc,
    socket,
    stateDir,
    uri: `sparsevirt+unix:///system?socket=${socket}`,
    virshUri: `qemu+unix:///system?socket=${socket}`,
    exited,
    alive: () => alive,
    stderr: () => err,
    errors: () => err.split('\n').filter((l) => /"level":"error"|unhandled|Uncaught|TypeError|RangeError|FATAL|out of memory/i.test(l)),
    mem: () => memStatus(proc.pid!),
    fds: () => openFds(proc.pid!),
    signal: (sig) => {
      if (alive) proc.kill(sig);
    },
    async stop(graceMs = 5000) {
      if (!alive) return;
      proc.kill('SIGCONT');
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(t);
    },
  };
  if (o.waitReady !== false && listen.length > 0) {
    try {
      await waitUntil(async () => {
        if (!alive) throw new Error(`sparsevirtd exited at start: ${err}`);
        return canConnect(socket);
      }, 15000, `sparsevirtd on ${socket}`);
    } catch (e) {
      await d.stop(100);
      throw e;
    }
  }
  return d;
}

function canConnect(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.createConnection({ path: socket });
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

export function chownTree(p: string, uid: number, gid: number): void {
  fs.chownSync(p, uid, gid);
  const st = fs.lstatSync(p);
  if (!st.isDirectory()) return;
  for (const e of fs.readdirSync(p)) chownTree(path.join(p, e), uid, gid);
}

// ------------------------------------------------------------------ client worker processes

/** One transfer a worker runs: a local file to/from a volume, sparse. */
export interface WorkerTransfer {
  kind: 'upload' | 'download';
  pool: string;
  vol: string;
  /** Local source (upload) or destination (download). */
  file: string;
  sparse?: boolean;
  offset?: number;
}

export type WorkerJob =
  /** Run the transfers concurrently on `connections` connections, all starting at `startAt` (ms epoch). */
  | { op: 'batch'; uri: string; transfers: WorkerTransfer[]; connections?: number; startAt?: number }
  /** Upload endless data at `rate` bytes/s into a volume (offset `offset`), reporting progress; runs until killed. */
  | { op: 'trickle-upload'; uri: string; pool: string; vol: string; rate: number; offset?: number; sparse?: boolean }
  /** Download a volume reading `rate` bytes/s (highWaterMark `hwm`), reporting progress; runs until the end or killed. */
  | { op: 'slow-download'; uri: string; pool: string; vol: string; rate: number; hwm?: number; sparse?: boolean; keepaliveInterval?: number; keepaliveCount?: number };

export interface TransferReport {
  kind: 'upload' | 'download';
  vol: string;
  ok: boolean;
  error?: string;
  start: number;
  firstByte: number;
  end: number;
  dataBytes: number;
  holeBytes: number;
  /** [ms epoch, data bytes so far] every ≥ 20 ms. */
  samples: Array<[number, number]>;
}

export interface RunningWorker {
  proc: ChildProcess;
  /** Parsed JSON lines so far. */
  lines: Array<Record<string, unknown>>;
  stderr(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Resolves with the first line matching `pred`. */
  waitLine(pred: (l: Record<string, unknown>) => boolean, timeoutMs: number): Promise<Record<string, unknown>>;
}

export function startWorker(job: WorkerJob): RunningWorker {
  const proc = spawn(process.execPath, [HARNESS, '--worker', JSON.stringify(job)], { stdio: ['ignore', 'pipe', 'pipe'], env: childEnv() });
  const lines: Array<Record<string, unknown>> = [];
  let buf = '';
  let err = '';
  const waiters: Array<{ pred: (l: Record<string, unknown>) => boolean; resolve: (l: Record<string, unknown>) => void }> = [];
  proc.stdout!.setEncoding('utf8');
  proc.stdout!.on('data', (s: string) => {
    buf += s;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (!line.trim()) continue;
      let rec: Record<string, unknown>;
      try {
        rec = JSON.parse(line) as Record<string, unknown>;
      } catch {
        rec = { event: 'garbage', line };
      }
      lines.push(rec);
      for (let w = waiters.length - 1; w >= 0; w--) {
        if (waiters[w]!.pred(rec)) waiters.splice(w, 1)[0]!.resolve(rec);
      }
    }
  });
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (s: string) => {
    err += s;
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  return {
    proc,
    lines,
    stderr: () => err,
    exited,
    waitLine(pred, timeoutMs) {
      const have = lines.find(pred);
      if (have) return Promise.resolve(have);
      return new Promise((resolve, reject) => {
        const entry = {
          pred,
          resolve: (l: Record<string, unknown>) => {
            clearTimeout(t);
            resolve(l);
          },
        };
        const t = setTimeout(() => {
          const i = waiters.indexOf(entry);
          if (i >= 0) waiters.splice(i, 1);
          reject(new Error(`worker: no matching line within ${timeoutMs} ms; lines: ${JSON.stringify(lines.slice(-5))}; stderr: ${err.slice(-2000)}`));
        }, timeoutMs);
        waiters.push(entry);
        void exited.then(() => setTimeout(() => {
          if (waiters.includes(entry)) {
            waiters.splice(waiters.indexOf(entry), 1);
            clearTimeout(t);
            reject(new Error(`worker exited without a matching line; lines: ${JSON.stringify(lines.slice(-5))}; stderr: ${err.slice(-2000)}`));
          }
        }, 50));
      });
    },
  };
}

function emit(rec: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify(rec)}\n`);
}

async function lookup(conn: Awaited<ReturnType<typeof connect>>, pool: string, vol: string): Promise<StorageVol> {
  return (await conn.storagePoolLookupByName(pool)).volLookupByName(vol);
}

async function runBatch(job: Extract<WorkerJob, { op: 'batch' }>): Promise<void> {
  const n = Math.max(1, job.connections ?? 1);
  const conns = await Promise.all(Array.from({ length: n }, () => connect(job.uri)));
  const vols = await Promise.all(job.transfers.map((t, i) => lookup(conns[i % n]!, t.pool, t.vol)));
  if (job.startAt) await sleep(Math.max(0, job.startAt - Date.now()));
  const reports = await Promise.all(job.transfers.map(async (t, i): Promise<TransferReport> => {
    const r: TransferReport = { kind: t.kind, vol: t.vol, ok: false, start: Date.now(), firstByte: 0, end: 0, dataBytes: 0, holeBytes: 0, samples: [] };
    let last = 0;
    const onProgress = (p: { dataBytes: number; holeBytes: number }) => {
      const now = Date.now();
      if (!r.firstByte) r.firstByte = now;
      r.dataBytes = p.dataBytes;
      r.holeBytes = p.holeBytes;
      if (now - last >= 20) {
        last = now;
        r.samples.push([now, p.dataBytes]);
      }
    };
    try {
      if (t.kind === 'upload') await vols[i]!.uploadFile(t.file, { sparse: t.sparse ?? true, offset: t.offset, onProgress });
      else await vols[i]!.downloadFile(t.file, { sparse: t.sparse ?? true, onProgress });
      r.ok = true;
    } catch (err) {
      r.error = `${(err as { code?: string }).code ?? ''} ${(err as Error).message}`;
    }
    r.end = Date.now();
    r.samples.push([r.end, r.dataBytes]);
    return r;
  }));
  emit({ event: 'done', reports });
  await Promise.all(conns.map((c) => c.close()));
}

async function runTrickleUpload(job: Extract<WorkerJob, { op: 'trickle-upload' }>): Promise<void> {
  const conn = await connect(job.uri);
  const vol = await lookup(conn, job.pool, job.vol);
  const stream = await vol.upload({ sparse: job.sparse ?? true, offset: job.offset ?? 0 });
  let sent = 0;
  const piece = Math.max(4096, Math.floor(job.rate / 20));
  async function* source(): AsyncGenerator<Chunk> {
    for (let i = 0; ; i++) {
      yield { kind: 'data', bytes: Buffer.alloc(piece, (i % 250) + 1) };
      sent += piece;
      emit({ event: 'progress', bytes: sent });
      await sleep(Math.floor((piece / job.rate) * 1000));
    }
  }
  await stream.sendChunks(source());
}

async function runSlowDownload(job: Extract<WorkerJob, { op: 'slow-download' }>): Promise<void> {
  const conn = await connect(job.uri, { keepaliveInterval: job.keepaliveInterval, keepaliveCount: job.keepaliveCount });
  const vol = await lookup(conn, job.pool, job.vol);
  const stream = await vol.download({ sparse: job.sparse ?? false, highWaterMark: job.hwm });
  let got = 0;
  const started = Date.now();
  let lastReport = 0;
  try {
    for await (const c of stream) {
      const n = c.kind === 'data' ? c.bytes.length : 0;
      got += n;
      // hold the pace: never ahead of rate × elapsed
      const ahead = got / job.rate * 1000 - (Date.now() - started);
      if (ahead > 0) await sleep(ahead);
      if (Date.now() - lastReport >= 250) {
        lastReport = Date.now();
        emit({ event: 'progress', bytes: got, ms: Date.now() - started });
      }
    }
    emit({ event: 'done', bytes: got, ms: Date.now() - started });
  } catch (err) {
    emit({ event: 'error', code: (err as { code?: string }).code, message: (err as Error).message, bytes: got, ms: Date.now() - started });
  }
  await conn.close();
}

/** Reads a local file into chunks (helper for tests that upload by hand). */
export function localChunks(file: string, sparse = true): AsyncIterable<Chunk> {
  return fileChunks(file, { sparse });
}

export { writeChunks };

async function workerMain(jobText: string): Promise<void> {
  const job = JSON.parse(jobText) as WorkerJob;
  try {
    if (job.op === 'batch') await runBatch(job);
    else if (job.op === 'trickle-upload') await runTrickleUpload(job);
    else await runSlowDownload(job);
  } catch (err) {
    emit({ event: 'error', code: (err as { code?: string }).code, message: (err as Error).message });
    process.exitCode = 1;
  }
}

if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url && process.argv[2] === '--worker') {
  void workerMain(process.argv[3] ?? '{}');
}
