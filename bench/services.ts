/**
 * The servers the bench talks to: libvirtd (running already; the bench defines a dir pool on
 * the image directory), sparsevirtd (started by the bench when built), nbdkit (one per run).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface ExecResult {
  stdout: string;
  stderr: string;
  code: number;
}

export function exec(cmd: string, args: string[], timeoutMs = 60_000): Promise<ExecResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024, encoding: 'utf8' }, (err, stdout, stderr) => {
      let code = 0;
      if (err) {
        const c = (err as { code?: unknown }).code;
        code = typeof c === 'number' ? c : 127;
        if (!stderr) stderr = err.message;
      }
      resolve({ stdout, stderr, code });
    });
  });
}

export async function virsh(uri: string, args: string[], timeoutMs = 60_000): Promise<ExecResult> {
  return exec('virsh', ['-q', '-c', uri, ...args], timeoutMs);
}

export async function virshOk(uri: string, args: string[]): Promise<string> {
  const r = await virsh(uri, args);
  if (r.code !== 0) throw new Error(`virsh -c ${uri} ${args.join(' ')}: ${(r.stderr || r.stdout).trim()}`);
  return r.stdout;
}

export async function which(cmd: string): Promise<boolean> {
  const r = await exec('sh', ['-c', `command -v "$1" >/dev/null 2>&1`, 'sh', cmd]);
  return r.code === 0;
}

/** First line of `cmd --version` (or null when it does not run). */
export async function toolVersion(cmd: string, args = ['--version']): Promise<string | null> {
  const r = await exec(cmd, args, 10_000);
  if (r.code !== 0) return null;
  return (r.stdout || r.stderr).trim().split('\n')[0] ?? null;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

// ------------------------------------------------------------------------------------ libvirt

/** A dir pool on `dir` defined on a libvirt(-compatible) daemon at `uri`. */
export class DirPool {
  constructor(
    readonly uri: string,
    readonly name: string,
    readonly dir: string,
  ) {}

  /** (Re)defines and starts the pool; a stale pool of the same name is replaced. */
  async up(): Promise<void> {
    const info = await virsh(this.uri, ['pool-info', this.name]);
    if (info.code === 0) await this.down();
    mkdirSync(this.dir, { recursive: true });
    await virshOk(this.uri, ['pool-define-as', this.name, 'dir', '--target', this.dir]);
    await virshOk(this.uri, ['pool-start', this.name]);
  }

  async refresh(): Promise<void> {
    await virshOk(this.uri, ['pool-refresh', this.name]);
  }

  async down(): Promise<void> {
    await virsh(this.uri, ['pool-destroy', this.name]);
    await virsh(this.uri, ['pool-undefine', this.name]);
  }

  /** An empty raw volume of `capacity` bytes, nothing allocated; returns its path. */
  async createEmpty(vol: string, capacity: number): Promise<string> {
    await virsh(this.uri, ['vol-delete', '--pool', this.name, vol]); // leftover of a failed run
    await virshOk(this.uri, ['vol-create-as', this.name, vol, `${capacity}b`, '--allocation', '0', '--format', 'raw']);
    return join(this.dir, vol);
  }

  async delete(vol: string): Promise<void> {
    await virsh(this.uri, ['vol-delete', '--pool', this.name, vol]);
  }
}

/** libvirtd's pid (for its RSS), when it runs on this host. */
export async function libvirtdPid(): Promise<number | null> {
  for (const f of ['/run/libvirtd.pid', '/var/run/libvirtd.pid']) {
    try {
      const pid = Number(readFileSync(f, 'utf8').trim());
      if (pid > 0 && existsSync(`/proc/${pid}`)) return pid;
    } catch {
      /* next */
    }
  }
  const r = await exec('pidof', ['libvirtd']);
  const pid = Number(r.stdout.trim().split(/\s+/)[0]);
  return r.code === 0 && pid > 0 ? pid : null;
}

// ------------------------------------------------------------------------------------ sparsevirtd

/**
 * HOOK (sparsevirtd): `node dist/bin/sparsevirtd.mjs --listen unix:SOCK --state-dir DIR`.
 * The bench then defines its dir pool through virsh on `qemu+unix:///system?socket=SOCK`.
 */
export class OurDaemon {
  readonly uri: string;
  private child: ChildProcess | null = null;
  private log = '';

  constructor(
    readonly mainJs: string,
    readonly socket: string,
    readonly stateDir: string,
  ) {
    this.uri = `qemu+unix:///system?socket=${socket}`;
  }

  get pid(): number | null {
    return this.child?.pid ?? null;
  }

  async start(): Promise<void> {
    mkdirSync(this.stateDir, { recursive: true });
    const child = spawn(process.execPath, [this.mainJs, '--listen', `unix:${this.socket}`, '--state-dir', this.stateDir], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    const keep = (d: Buffer): void => {
      this.log = (this.log + d.toString('utf8')).slice(-8192);
    };
    child.stdout!.on('data', keep);
    child.stderr!.on('data', keep);
    let exited = false;
    child.on('exit', () => {
      exited = true;
    });
    try {
      await waitFor(
        async () => {
          if (exited) throw new Error(`sparsevirtd exited at start: ${this.log.trim().slice(-2000)}`);
          if (!existsSync(this.socket)) return false;
          return (await virsh(this.uri, ['pool-list', '--all'], 5_000)).code === 0;
        },
        15_000,
        `sparsevirtd on ${this.socket}`,
      );
    } catch (err) {
      await this.stop();
      throw err;
    }
  }

  async stop(): Promise<void> {
    const c = this.child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const done = new Promise<void>((r) => c.once('exit', () => r()));
    c.kill('SIGTERM');
    const t = setTimeout(() => c.kill('SIGKILL'), 5_000);
    await done;
    clearTimeout(t);
  }
}

// ------------------------------------------------------------------------------------ nbdkit

/** `nbdkit -U SOCK -f [-r] --exit-with-parent file file=PATH`, started and stopped untimed. */
export class NbdkitFile {
  private child: ChildProcess | null = null;
  private log = '';

  constructor(
    readonly file: string,
    readonly socket: string,
    readonly readonly: boolean,
  ) {}

  get uri(): string {
    return `nbd+unix:///?socket=${this.socket}`;
  }

  get pid(): number | null {
    return this.child?.pid ?? null;
  }

  async start(): Promise<void> {
    const args = ['-U', this.socket, '-f', '--exit-with-parent'];
    if (this.readonly) args.push('-r');
    args.push('file', `file=${this.file}`);
    const child = spawn('nbdkit', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    this.child = child;
    child.stderr!.on('data', (d: Buffer) => {
      this.log = (this.log + d.toString('utf8')).slice(-4096);
    });
    let exited = false;
    child.on('exit', () => {
      exited = true;
    });
    await waitFor(
      () => {
        if (exited) throw new Error(`nbdkit exited: ${this.log.trim()}`);
        return existsSync(this.socket);
      },
      10_000,
      `nbdkit socket ${this.socket}`,
    );
  }

  async stop(): Promise<void> {
    const c = this.child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const done = new Promise<void>((r) => c.once('exit', () => r()));
    c.kill('SIGTERM');
    const t = setTimeout(() => c.kill('SIGKILL'), 5_000);
    await done;
    clearTimeout(t);
  }
}

// ------------------------------------------------------------------------------------ Ceph RBD

/**
 * An RBD pool on a sparsevirtd of its own, on the cluster of scripts/setup-ceph.sh
 * (`/var/lib/sparsevirt-ceph/cluster.json`): the cephx user `client.libvirt` through a secret
 * defined with virsh. `rbd` and `qemu-img` run as client.admin. Images the bench makes are named
 * `svbench-…` and removed by `down()`; one download source at a time is kept (the cluster keeps
 * its data in memory).
 */
export class RbdBench {
  readonly pool = 'svbench-rbd';
  readonly cephPool: string;
  private readonly conf: string;
  private readonly keyring: string;
  private readonly key: string;
  private readonly monitors: Array<{ host: string; port: number }>;
  /** The download source imported last: image id and RBD image name. */
  private current: { id: string; name: string } | null = null;
  /** Why the qemu-img contender cannot run (set by `up`), or null. */
  qemuImgRbdMissing: string | null = 'not probed';

  constructor(readonly daemon: OurDaemon, clusterJson: string) {
    const c = JSON.parse(readFileSync(clusterJson, 'utf8')) as {
      conf: string; pool: string; monitors: Array<{ host: string; port: number }>;
      admin: { keyring: string }; libvirt: { key: string };
    };
    this.conf = c.conf;
    this.cephPool = c.pool;
    this.keyring = c.admin.keyring;
    this.key = c.libvirt.key;
    this.monitors = c.monitors;
  }

  /** `rbd` with the cluster's conf as client.admin, then `args`. */
  rbdArgs(...args: string[]): string[] {
    return ['-c', this.conf, '--id', 'admin', '--keyring', this.keyring, ...args];
  }

  /** qemu's name of an image of the pool, as client.admin (`rbd:POOL/IMAGE:id=…:keyring=…:conf=…`). */
  qemuSpec(image: string): string {
    return `rbd:${this.cephPool}/${image}:id=admin:keyring=${this.keyring}:conf=${this.conf}`;
  }

  async rbd(...args: string[]): Promise<string> {
    const r = await exec('rbd', this.rbdArgs(...args), 600_000);
    if (r.code !== 0) throw new Error(`rbd ${args.join(' ')}: ${r.stderr.trim()}`);
    return r.stdout;
  }

  async up(dir: string): Promise<void> {
    await this.rbd('ls', this.cephPool);
    this.qemuImgRbdMissing = await qemuImgRbdMissing();
    const uuid = '5b5b5b5b-0000-4000-8000-000000b3e4c4';
    const secretXml = join(dir, 'rbd-secret.xml');
    const keyFile = join(dir, 'rbd-secret.key');
    const poolXml = join(dir, 'rbd-pool.xml');
    writeFileSync(secretXml, `<secret ephemeral='no' private='yes'><uuid>${uuid}</uuid><usage type='ceph'><name>svbench</name></usage></secret>`);
    writeFileSync(keyFile, this.key, { mode: 0o600 });
    const hosts = this.monitors.map((m) => `<host name='${m.host}' port='${m.port}'/>`).join('');
    writeFileSync(poolXml, `<pool type='rbd'><name>${this.pool}</name><source>${hosts}<name>${this.cephPool}</name>`
      + `<auth type='ceph' username='libvirt'><secret uuid='${uuid}'/></auth></source></pool>`);
    const uri = this.daemon.uri;
    await virshOk(uri, ['secret-define', secretXml]);
    await virshOk(uri, ['secret-set-value', uuid, '--file', keyFile]);
    // a --keep run left the pool defined (and autostarted with the daemon): both are fine
    await virsh(uri, ['pool-define', poolXml]);
    await virsh(uri, ['pool-start', this.pool]);
    const info = await virshOk(uri, ['pool-info', this.pool]);
    if (!/State:\s+running/.test(info)) throw new Error(`RBD pool ${this.pool} did not start: ${info.trim()}`);
  }

  /** Bytes the Ceph pool can still take (`ceph df`'s max_avail), or null when unknown. */
  async available(): Promise<number | null> {
    const r = await exec('ceph', ['-c', this.conf, '--id', 'admin', '--keyring', this.keyring, 'df', '--format', 'json'], 30_000);
    if (r.code !== 0) return null;
    try {
      const df = JSON.parse(r.stdout) as { pools: Array<{ name: string; stats: { max_avail: number } }> };
      return df.pools.find((p) => p.name === this.cephPool)?.stats.max_avail ?? null;
    } catch {
      return null;
    }
  }

  /** Throws, with the figures, when the pool has no room for `bytes` of data and a margin. */
  async checkRoom(bytes: number): Promise<void> {
    const avail = await this.available();
    const need = bytes + 256 * 1024 ** 2;
    if (avail !== null && avail < need) {
      throw new Error(`Ceph pool ${this.cephPool} has ${(avail / 1024 ** 3).toFixed(2)} GiB free, the image needs ${(need / 1024 ** 3).toFixed(2)} GiB`
        + ' (memstore: SPARSEVIRT_CEPH_STORE_BYTES for scripts/setup-ceph.sh --reset)');
    }
  }

  /**
   * The download source for an image: imported (untimed) as `svbench-src-<id>` when it is not the
   * one imported last, which is removed first.
   */
  async source(id: string, file: string, dataBytes: number): Promise<string> {
    if (this.current?.id === id) return this.current.name;
    if (this.current) await this.remove(this.current.name);
    this.current = null;
    const name = `svbench-src-${id}`;
    await this.remove(name);
    await this.checkRoom(dataBytes);
    await this.rbd('import', '--no-progress', file, `${this.cephPool}/${name}`);
    this.current = { id, name };
    return name;
  }

  /** Removes the download source imported last, if any. */
  async dropSource(): Promise<void> {
    if (this.current) await this.remove(this.current.name);
    this.current = null;
  }

  async remove(name: string): Promise<void> {
    await exec('rbd', this.rbdArgs('rm', '--no-progress', `${this.cephPool}/${name}`), 600_000);
  }

  async down(): Promise<void> {
    const names = (await exec('rbd', this.rbdArgs('ls', this.cephPool))).stdout.split('\n').filter((n) => n.startsWith('svbench-'));
    for (const n of names) await this.remove(n);
    this.current = null;
  }
}

/** Why `qemu-img` cannot reach RBD images here (with the package that fixes it), or null. */
async function qemuImgRbdMissing(): Promise<string | null> {
  const r = await exec('qemu-img', ['--help'], 10_000);
  if (r.code !== 0) return 'qemu-img not installed (apt-get install qemu-utils qemu-block-extra)';
  // the formats line lists the block drivers, the modules of qemu-block-extra included
  if (!/Supported formats:.*\brbd\b/s.test(r.stdout)) return "qemu-img has no rbd driver (apt-get install qemu-block-extra)";
  return null;
}
