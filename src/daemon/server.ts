/**
 * sparsevirtd's listeners and client bookkeeping: unix sockets (owner-only by default), plain
 * TCP (only when asked for), TLS with mandatory, CA-verified client certificates and an
 * optional allow-list of certificate CNs. `startDaemon` is the programmatic entry point used by
 * `main.ts`, the tests and the bench.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import type { Duplex } from 'node:stream';
import { SparsevirtError } from '../errors.js';
import { Peer } from '../rpc/peer.js';
import { adoptWithReadHook } from '../transport/connect.js';
import { serverTlsFiles } from '../transport/uri.js';
import { Logger, type LogLevel } from './log.js';
import { Session, type SessionTransport } from './session.js';
import { StateDirLock } from './state.js';
import { StorageDriver } from './storage.js';

const TLS_CONFIRMATION = Buffer.from([1]);

export type ListenSpec =
  | { kind: 'unix'; path: string }
  | { kind: 'tcp' | 'tls'; host: string; port: number };

export type DaemonAddress =
  | { kind: 'unix'; path: string; uri: string }
  | { kind: 'tcp' | 'tls'; host: string; port: number; uri: string };

export interface TlsOptions {
  /** Server certificate, key and the CA that signs client certificates (PEM files). */
  cert?: string;
  key?: string;
  ca?: string;
  /** A directory in libvirt's layout (servercert.pem, serverkey.pem, cacert.pem). */
  pkipath?: string;
  /** Client certificate subject CNs allowed in; empty/absent = any certificate the CA signed. */
  allow?: string[];
}

export interface DaemonOptions {
  /** Where pool definitions live (and the `default` pool's images, in a fresh state directory). */
  stateDir: string;
  /** Listeners: specs or strings `unix:PATH`, `tcp:HOST:PORT`, `tls:HOST:PORT` (port 0 = any). */
  listen: Array<ListenSpec | string>;
  /** Mode of unix sockets (default 0o600). */
  socketMode?: number;
  tls?: TlsOptions;
  logLevel?: LogLevel;
  /** Where log lines go (default stderr). */
  logSink?: (line: string) => void;
  /** Create, build, start and autostart a `default` pool in a fresh state directory (default true). */
  defaultPool?: boolean;
  /** Seconds of client silence before a keepalive PING (libvirt: 5), and unanswered PINGs before giving up (5). */
  keepaliveInterval?: number;
  keepaliveCount?: number;
  /** sparsevirt's version for CONNECT_GET_VERSION (default 0.1.0). */
  version?: string;
}

export interface DaemonHandle {
  /** Where it listens, with a URI for each (`sparsevirt+unix:///system?socket=…`, …). */
  readonly addresses: DaemonAddress[];
  readonly driver: StorageDriver;
  /** Connected clients right now. */
  readonly clientCount: number;
  /** Stops: streams in flight get a STREAM/ERROR, connections and listeners close, socket files are removed. */
  close(): Promise<void>;
}

/** Parse `unix:PATH`, `tcp:HOST:PORT`, `tls:HOST:PORT` (IPv6 hosts in brackets). */
export function parseListen(s: string): ListenSpec {
  const m = /^(unix|tcp|tls):(.+)$/.exec(s);
  if (!m) throw new SparsevirtError('ERR_INVALID_ARG', `invalid --listen '${s}': use unix:PATH, tcp:HOST:PORT or tls:HOST:PORT`);
  const kind = m[1] as 'unix' | 'tcp' | 'tls';
  const rest = m[2]!;
  if (kind === 'unix') return { kind, path: path.resolve(rest) };
  const hp = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(rest);
  if (!hp) throw new SparsevirtError('ERR_INVALID_ARG', `invalid --listen '${s}': expected ${kind}:HOST:PORT`);
  const port = Number(hp[3]);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new SparsevirtError('ERR_INVALID_ARG', `invalid port in --listen '${s}'`);
  return { kind, host: hp[1] ?? (hp[2] || '0.0.0.0'), port };
}

/** libvirt's encoding of a version: major·10⁶ + minor·10³ + micro. */
export function encodeVersion(v: string): bigint {
  const [maj = 0, min = 0, mic = 0] = v.split(/[.-]/).slice(0, 3).map((x) => Number.parseInt(x, 10) || 0);
  return BigInt(maj * 1_000_000 + min * 1_000 + mic);
}

function hostForUri(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

export async function startDaemon(opts: DaemonOptions): Promise<DaemonHandle> {
  const daemon = new Daemon(opts);
  try {
    await daemon.start();
  } catch (err) {
    await daemon.close().catch(() => undefined);
    throw err;
  }
  return daemon;
}

class Daemon implements DaemonHandle {
  readonly log: Logger;
  readonly driver: StorageDriver;
  readonly addresses: DaemonAddress[] = [];
  private readonly servers: Array<{ server: net.Server; spec: ListenSpec }> = [];
  private readonly sessions = new Set<Session>();
  private readonly sockets = new Set<Duplex>();
  private closing: Promise<void> | null = null;
  private readonly hvVersion: bigint;
  private lock: StateDirLock | null = null;

  constructor(readonly opts: DaemonOptions) {
    this.log = new Logger(opts.logLevel ?? 'info', opts.logSink);
    this.driver = new StorageDriver({ stateDir: opts.stateDir, log: this.log });
    this.hvVersion = encodeVersion(opts.version ?? '0.1.0');
  }

  get clientCount(): number {
    return this.sessions.size;
  }

  async start(): Promise<void> {
    const specs = this.opts.listen.map((l) => (typeof l === 'string' ? parseListen(l) : l));
    if (specs.length === 0) throw new SparsevirtError('ERR_INVALID_ARG', 'no listener configured');
    await fsp.mkdir(this.opts.stateDir, { recursive: true, mode: 0o700 });
    // before anything in the state directory is read or written
    this.lock = StateDirLock.acquire(this.opts.stateDir);
    await this.driver.init({ defaultPoolTarget: this.opts.defaultPool === false ? undefined : path.join(this.opts.stateDir, 'images') });
    let tlsContext: tls.TlsOptions | null = null;
    for (const spec of specs) {
      if (spec.kind === 'tls' && !tlsContext) tlsContext = this.tlsOptions();
      await this.listen(spec, tlsContext);
    }
    this.log.info('sparsevirtd started', { pid: process.pid, stateDir: this.opts.stateDir, listen: this.addresses.map((a) => a.uri) });
  }

  private tlsOptions(): tls.TlsOptions {
    const t = this.opts.tls ?? {};
    const def = serverTlsFiles(t.pkipath ?? null);
    const files = { cert: t.cert ?? def.cert, key: t.key ?? def.key, ca: t.ca ?? def.ca };
    const read = (what: string, f: string): Buffer => {
      try {
        return fs.readFileSync(f);
      } catch (err) {
        throw new SparsevirtError('ERR_IO', `cannot read TLS ${what} '${f}': ${(err as Error).message}`, { cause: err });
      }
    };
    return {
      cert: read('server certificate', files.cert),
      key: read('server key', files.key),
      ca: read('CA certificate', files.ca),
      requestCert: true,
      rejectUnauthorized: true,
    };
  }

  private async listen(spec: ListenSpec, tlsOpts: tls.TlsOptions | null): Promise<void> {
    let server: net.Server;
    if (spec.kind === 'tls') {
      server = tls.createServer(tlsOpts!, (sock) => this.onTlsConnection(sock));
      server.on('tlsClientError', (err, sock) => {
        this.log.warn('TLS handshake refused', { remote: `${sock.remoteAddress}:${sock.remotePort}`, error: err.message });
      });
    } else {
      // Paused: the socket is re-created with a read hook before anything is read from it.
      server = net.createServer({ pauseOnConnect: true }, (sock) => {
        const info = spec.kind === 'unix' ? { transport: 'unix' as const } : { transport: 'tcp' as const, remote: `${sock.remoteAddress}:${sock.remotePort}` };
        this.accept(this.closing ? sock : adoptWithReadHook(sock), info);
      });
    }
    server.on('error', (err) => this.log.error('listener error', { error: err.message }));
    if (spec.kind === 'unix') {
      await prepareUnixPath(spec.path);
      const mode = this.opts.socketMode ?? 0o600;
      // Bind with a tight umask so the socket is never reachable with looser permissions, then set the mode.
      await listenOn(server, { path: spec.path }, 0o177);
      await fsp.chmod(spec.path, mode);
      this.addresses.push({ kind: 'unix', path: spec.path, uri: `sparsevirt+unix:///system?socket=${spec.path}` });
    } else {
      await listenOn(server, { host: spec.host, port: spec.port });
      const a = server.address() as net.AddressInfo;
      this.addresses.push({ kind: spec.kind, host: a.address, port: a.port, uri: `sparsevirt+${spec.kind}://${hostForUri(a.address)}:${a.port}/system` });
    }
    this.servers.push({ server, spec });
  }

  private onTlsConnection(sock: tls.TLSSocket): void {
    const remote = `${sock.remoteAddress}:${sock.remotePort}`;
    const cert = sock.getPeerCertificate();
    const cn = cert && cert.subject ? (Array.isArray(cert.subject.CN) ? cert.subject.CN[0] : cert.subject.CN) : undefined;
    const allow = this.opts.tls?.allow ?? [];
    if (!sock.authorized) {
      this.log.warn('TLS client refused: certificate not verified', { remote, error: String(sock.authorizationError) });
      sock.destroy();
      return;
    }
    if (allow.length > 0 && (cn === undefined || !allow.includes(cn))) {
      this.log.warn('TLS client refused: certificate CN not in the allow-list', { remote, cn: cn ?? null });
      sock.destroy();
      return;
    }
    // libvirt's TLS confirmation: one byte 0x01 once the client's certificate passed our checks;
    // libvirt clients (virsh) wait for it before their first call.
    sock.write(TLS_CONFIRMATION);
    this.accept(sock, { transport: 'tls', remote, cn });
  }

  private accept(sock: net.Socket, info: { transport: SessionTransport; remote?: string; cn?: string }): void {
    if (this.closing) {
      sock.destroy();
      return;
    }
    sock.setNoDelay?.(true);
    const peer = new Peer(sock, {
      role: 'server',
      keepaliveInterval: this.opts.keepaliveInterval ?? 5,
      keepaliveCount: this.opts.keepaliveCount ?? 5,
    });
    const session = new Session(peer, { driver: this.driver, log: this.log, hvVersion: this.hvVersion }, this.log, false, info.transport);
    this.sessions.add(session);
    this.sockets.add(sock);
    session.log.info('client connected', info);
    peer.on('close', (err: Error) => {
      this.sessions.delete(session);
      this.sockets.delete(sock);
      const reason = (err as SparsevirtError).code === 'ERR_PROTOCOL' ? 'warn' : 'info';
      session.log[reason]('client disconnected', { reason: err.message });
    });
  }

  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    const started = this.lock !== null;
    if (started) this.log.info('sparsevirtd stopping', { clients: this.sessions.size });
    const closed = this.servers.map(({ server }) => new Promise<void>((r) => server.close(() => r())));
    await Promise.all([...this.sessions].map((s) => s.stopTransfers()));
    for (const s of this.sessions) s.peer.close();
    // Give clients a moment to see their errors, then cut what is left.
    const deadline = Date.now() + 2000;
    while (this.sockets.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    for (const sock of this.sockets) sock.destroy();
    await Promise.all(closed);
    for (const { spec } of this.servers) {
      if (spec.kind === 'unix') await fsp.rm(spec.path, { force: true }).catch(() => undefined);
    }
    this.lock?.release();
    if (started) this.log.info('sparsevirtd stopped');
  }
}

/** `listen`, with `umask` in force only while it binds (synchronously, so nothing else sees it). */
function listenOn(server: net.Server, opts: net.ListenOptions, umask?: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error) => reject(err);
    server.once('error', onError);
    const old = umask === undefined ? undefined : process.umask(umask);
    try {
      server.listen(opts, () => {
        server.off('error', onError);
        resolve();
      });
    } finally {
      if (old !== undefined) process.umask(old);
    }
  });
}

/**
 * Make the socket's directory (0755 as libvirt's /run/libvirt, created if missing) and clear a
 * stale socket left by a crash; refuse to start if another daemon answers on it.
 */
async function prepareUnixPath(p: string): Promise<void> {
  await fsp.mkdir(path.dirname(p), { recursive: true, mode: 0o755 });
  let st: fs.Stats;
  try {
    st = await fsp.lstat(p);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new SparsevirtError('ERR_EXISTS', `'${p}' exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const c = net.createConnection({ path: p });
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
  if (alive) throw new SparsevirtError('ERR_EXISTS', `another daemon is already listening on '${p}'`);
  await fsp.rm(p, { force: true });
}
