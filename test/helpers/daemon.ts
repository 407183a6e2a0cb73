/**
 * The daemon for the tests: sparsevirtd in-process on a temporary unix socket and state
 * directory, started and stopped; and the same with a dir pool on tmpfs and a client on it.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startDaemon, type DaemonHandle, type DaemonOptions } from '../../src/daemon/index.js';
import { connect, type Connection, type StoragePool } from '../../src/client/index.js';
import { scratchDir } from './images.js';

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
  const dir = opts.dir ?? (await scratchDir(os.tmpdir(), 'svd-test-'));
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

/** Defines, builds and starts a dir pool `name` on `dir` at the daemon behind `uri`. */
export async function addDirPool(uri: string, name: string, dir: string): Promise<void> {
  const c = await connect(uri);
  try {
    const pool = await c.storagePoolDefineDir(name, dir);
    await pool.build();
    await pool.create();
  } finally {
    await c.close();
  }
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
