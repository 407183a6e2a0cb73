/**
 * Helpers for the daemon tests: an in-process sparsevirtd on a temporary unix socket and state
 * directory, a raw-frame client for protocol-level tests, and small sparse-image utilities.
 */
import { createHash, randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { startDaemon, type DaemonHandle, type DaemonOptions } from '../../src/daemon/index.js';
import { buildFrame, MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, type Header, type Message } from '../../src/rpc/message.js';
import { FrameParser } from '../../src/rpc/parser.js';
import { decodeRemoteError } from '../../src/rpc/structs.js';
import { encode, XdrReader, type Codec } from '../../src/xdr/index.js';
import type { RemoteError } from '../../src/errors.js';
import { connect, type Connection, type StoragePool } from '../../src/client/index.js';
import { scratchDir } from './images.js';

// ------------------------------------------------------------------ temp dirs

/** A fresh directory under the OS temp dir (ext4/tmpfs: both do SEEK_HOLE and punching). */
export async function tempDir(prefix = 'svd-test-'): Promise<string> {
  return fsp.mkdtemp(path.join(os.tmpdir(), prefix));
}

// ------------------------------------------------------------------ an in-process daemon

export interface TestDaemon {
  daemon: DaemonHandle;
  dir: string;
  socket: string;
  stateDir: string;
  /** `sparsevirt+unix:///system?socket=…` */
  uri: string;
  /** `qemu+unix:///system?socket=…` for virsh. */
  virshUri: string;
  /** Log lines the daemon wrote. */
  logs: string[];
  stop(): Promise<void>;
}

/**
 * Start sparsevirtd in-process on `<dir>/sock` with state in `<dir>/state`. `dir` defaults to
 * a new temp directory (removed by `stop()` only if it was created here).
 */
export async function startTestDaemon(opts: Partial<DaemonOptions> & { dir?: string } = {}): Promise<TestDaemon> {
  const own = opts.dir === undefined;
  const dir = opts.dir ?? (await tempDir());
  const socket = path.join(dir, 'sock');
  const stateDir = opts.stateDir ?? path.join(dir, 'state');
  const logs: string[] = [];
  const daemon = await startDaemon({
    stateDir,
    listen: [`unix:${socket}`],
    logLevel: process.env.SPARSEVIRT_TEST_LOG ? 'debug' : 'info',
    logSink: (line) => {
      logs.push(line);
      if (process.env.SPARSEVIRT_TEST_LOG) process.stderr.write(line);
    },
    defaultPool: false,
    ...opts,
  });
  return {
    daemon, dir, socket, stateDir, logs,
    uri: `sparsevirt+unix:///system?socket=${socket}`,
    virshUri: `qemu+unix:///system?socket=${socket}`,
    async stop() {
      await daemon.close();
      if (own) await fsp.rm(dir, { recursive: true, force: true });
    },
  };
}

/** A daemon on tmpfs with a dir pool `shm`, and our client connected to it, for `fn`. */
export async function withShmDaemon(prefix: string, fn: (ctx: { dir: string; poolDir: string; d: TestDaemon; conn: Connection; pool: StoragePool }) => Promise<void>): Promise<void> {
  const dir = await scratchDir('/dev/shm', prefix);
  const d = await startTestDaemon({ dir });
  try {
    const poolDir = path.join(dir, 'pool');
    const conn = await connect(d.uri);
    try {
      const pool = await conn.storagePoolDefineDir('shm', poolDir);
      await pool.build();
      await pool.create();
      await fn({ dir, poolDir, d, conn, pool });
    } finally {
      await conn.close();
    }
  } finally {
    await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------ raw frames

export interface Frame extends Message {}

/**
 * A client that speaks frames by hand: send any header and payload, wait for frames matching
 * a predicate. Never answers keepalive on its own.
 */
export class RawClient {
  readonly sock: net.Socket;
  readonly frames: Frame[] = [];
  private readonly parser = new FrameParser();
  private waiters: Array<{ pred: (f: Frame) => boolean; resolve: (f: Frame) => void }> = [];
  closed: Promise<void>;
  isClosed = false;
  private serial = 100;

  private constructor(sock: net.Socket) {
    this.sock = sock;
    this.closed = new Promise((resolve) => sock.once('close', () => {
      this.isClosed = true;
      resolve();
    }));
    sock.on('error', () => undefined);
    sock.on('data', (b: Buffer) => {
      this.parser.push(b, (m) => {
        const f: Frame = { ...m, payload: Buffer.from(m.payload) };
        this.frames.push(f);
        const w = this.waiters.findIndex((x) => x.pred(f));
        if (w >= 0) {
          const [x] = this.waiters.splice(w, 1);
          x!.resolve(f);
        }
      });
    });
  }

  static async connect(socketPath: string): Promise<RawClient> {
    const sock = net.createConnection({ path: socketPath });
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    return new RawClient(sock);
  }

  nextSerial(): number {
    return this.serial++;
  }

  write(buf: Buffer): void {
    this.sock.write(buf);
  }

  send(h: Partial<Header> & { proc: number }, payload?: Buffer): void {
    this.write(buildFrame({
      prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, type: MessageType.CALL, serial: 0, status: Status.OK, ...h,
    }, payload));
  }

  /** The first frame (already received or coming) matching `pred`. */
  waitFor(pred: (f: Frame) => boolean, timeoutMs = 5000): Promise<Frame> {
    const have = this.frames.find(pred);
    if (have) return Promise.resolve(have);
    return new Promise((resolve, reject) => {
      const entry = { pred, resolve: (f: Frame) => { clearTimeout(t); resolve(f); } };
      const t = setTimeout(() => {
        this.waiters = this.waiters.filter((x) => x !== entry);
        reject(new Error(`no matching frame within ${timeoutMs} ms; got: ${this.frames.map(describe).join(' | ')}`));
      }, timeoutMs);
      this.waiters.push(entry);
    });
  }

  /** Send a CALL and wait for its REPLY (by serial). */
  async call<A>(proc: { num: number; args: Codec<A> }, args: A, serial = this.nextSerial()): Promise<Frame> {
    this.send({ proc: proc.num, serial }, encode(proc.args, args));
    return this.waitFor((f) => f.type === MessageType.REPLY && f.serial === serial);
  }

  /** AUTH_LIST, SUPPORTS_FEATURE(10) is skipped (no keepalive), CONNECT_OPEN(name, flags). */
  async handshake(flags = 0): Promise<void> {
    const auth = await this.call({ num: 66, args: { enc() {}, dec() {}, min: 0 } as Codec<void> }, undefined);
    if (auth.status !== Status.OK) throw new Error('AUTH_LIST failed');
    const open = await this.call({ num: 1, args: openArgs }, { name: 'sparsevirt:///system', flags });
    if (open.status !== Status.OK) throw new Error(`CONNECT_OPEN failed: ${decodeRemoteError(open.payload).message}`);
  }

  close(): void {
    this.sock.destroy();
  }
}

const openArgs: Codec<{ name: string; flags: number }> = {
  enc: (w, v) => {
    w.uint(1).string(v.name).uint(v.flags);
  },
  dec: () => {
    throw new Error('unused');
  },
  min: 8,
};

export function describe(f: Header & { payload: Buffer }): string {
  const t = ['CALL', 'REPLY', 'MESSAGE', 'STREAM', 'CALL_FDS', 'REPLY_FDS', 'HOLE'][f.type] ?? f.type;
  const s = ['OK', 'ERROR', 'CONTINUE'][f.status] ?? f.status;
  return `${f.proc}/${t}/${f.serial}/${s}/${f.payload.length}`;
}

export function errorOf(f: Frame): RemoteError {
  return decodeRemoteError(f.payload);
}

export function decodeWith<T>(c: Codec<T>, f: Frame): T {
  return c.dec(new XdrReader(f.payload));
}

// ------------------------------------------------------------------ sparse images

export type Layout = Array<{ kind: 'data' | 'hole'; length: number }>;

/** The layout of libvirt's capture source `sparse-source.img` (4 MiB, 424 KiB of data). */
export const CAPTURE_LAYOUT: Layout = [
  { kind: 'data', length: 4096 }, { kind: 'hole', length: 61440 },
  { kind: 'data', length: 16384 }, { kind: 'hole', length: 966656 },
  { kind: 'data', length: 65536 }, { kind: 'hole', length: 458752 },
  { kind: 'data', length: 8192 }, { kind: 'hole', length: 524288 },
  { kind: 'data', length: 12288 }, { kind: 'hole', length: 1028096 },
  { kind: 'data', length: 327680 }, { kind: 'hole', length: 720896 },
];

/** Write a sparse file: data extents of deterministic pseudo-random bytes (seeded), holes left unallocated. */
export async function makeImage(file: string, layout: Layout, seed = 'svd'): Promise<void> {
  const fh = await fsp.open(file, 'w', 0o644);
  try {
    let pos = 0;
    let n = 0;
    for (const e of layout) {
      if (e.kind === 'data') {
        for (let off = 0; off < e.length; off += 1 << 20) {
          const len = Math.min(1 << 20, e.length - off);
          await fh.write(pseudoRandom(`${seed}:${n++}`, len), 0, len, pos + off);
        }
      }
      pos += e.length;
    }
    await fh.truncate(pos);
  } finally {
    await fh.close();
  }
}

function pseudoRandom(seed: string, n: number): Buffer {
  const out = Buffer.allocUnsafe(n);
  let block = createHash('sha256').update(seed).digest();
  for (let off = 0; off < n; off += 32) {
    block.copy(out, off, 0, Math.min(32, n - off));
    block = createHash('sha256').update(block).digest();
  }
  return out;
}

export async function fillRandom(file: string, size: number): Promise<void> {
  const fh = await fsp.open(file, 'w');
  try {
    for (let off = 0; off < size; off += 1 << 20) {
      const len = Math.min(1 << 20, size - off);
      await fh.write(randomBytes(len), 0, len, off);
    }
  } finally {
    await fh.close();
  }
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const b of fs.createReadStream(file)) h.update(b as Buffer);
  return h.digest('hex');
}

export function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

/** The SEEK_DATA/SEEK_HOLE map of a file, via python3 (independent of our own sparse module). */
export function extentMap(file: string): Promise<Layout> {
  const script = `
import os,sys,json
fd=os.open(sys.argv[1],os.O_RDONLY); end=os.fstat(fd).st_size; pos=0; out=[]
while pos<end:
    try: d=os.lseek(fd,pos,os.SEEK_DATA)
    except OSError: out.append(['hole',end-pos]); break
    if d>pos: out.append(['hole',d-pos])
    h=os.lseek(fd,d,os.SEEK_HOLE); out.append(['data',h-d]); pos=h
print(json.dumps(out))`;
  return new Promise((resolve, reject) => {
    execFile('python3', ['-c', script, file], (err, stdout) => {
      if (err) return reject(err);
      resolve((JSON.parse(stdout) as Array<['data' | 'hole', number]>).map(([kind, length]) => ({ kind, length })));
    });
  });
}

/** The byte range [offset, offset+length) of a file. */
export async function readRange(file: string, offset: number, length: number): Promise<Buffer> {
  const fh = await fsp.open(file, 'r');
  try {
    const b = Buffer.alloc(length);
    const { bytesRead } = await fh.read(b, 0, length, offset);
    return b.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** Run a command without a shell; never throws. */
export function run(cmd: string, args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: opts.timeoutMs ?? 60_000, maxBuffer: 64 << 20, encoding: 'utf8', env: opts.env }, (err, stdout, stderr) => {
      let code = 0;
      if (err) {
        const c = (err as { code?: unknown }).code;
        code = typeof c === 'number' ? c : -1;
        if (code === -1 && !stderr) stderr = String(err.message);
      }
      resolve({ code, stdout, stderr });
    });
  });
}
