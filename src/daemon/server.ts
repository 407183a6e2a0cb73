/**
 * sparsevirtd's listeners and client bookkeeping: unix sockets (owner-only by default; a
 * read-only one whose connections are all read-only), plain TCP (only when asked for), TLS with
 * mandatory, CA-verified client certificates and optional allow-lists (DN patterns, CNs), and
 * listening sockets handed over by systemd. `startDaemon` is the programmatic entry point used
 * by `main.ts`, the tests and the bench; `reload` applies what can change without a restart.
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
import { CODE, DOMAIN, virError } from './errors.js';
import { Logger, type LogLevel } from './log.js';
import { Session, type SessionTransport } from './session.js';
import { StateDirLock } from './state.js';
import { StorageDriver } from './storage.js';
import { listenerRole, unixSocketPath, type ActivatedSocket, type ListenerRole } from './systemd.js';

const TLS_CONFIRMATION = Buffer.from([1]);
/** Anything but 0x01 in its place tells a libvirt client that the server refused it. */
const TLS_REFUSAL = Buffer.from([0]);

export type ListenSpec =
  | { kind: 'unix'; path: string; readonly?: boolean }
  | { kind: 'tcp' | 'tls'; host: string; port: number };

export type DaemonAddress =
  | { kind: 'unix'; path: string; uri: string; readonly?: boolean; activated?: boolean }
  | { kind: 'tcp' | 'tls'; host: string; port: number; uri: string; activated?: boolean };

export interface TlsOptions {
  /** Server certificate, key and the CA that signs client certificates (PEM files). */
  cert?: string;
  key?: string;
  ca?: string;
  /** A directory in libvirt's layout (servercert.pem, serverkey.pem, cacert.pem). */
  pkipath?: string;
  /** Client certificate subject CNs allowed in; empty/absent = any certificate the CA signed. */
  allow?: string[];
  /**
   * Client certificate subject DN patterns (libvirt's tls_allowed_dn_list: `*` and `?`, the DN
   * as `C=…,O=…,CN=…` in certificate order); absent = no check, empty = nobody.
   */
  allowDn?: string[] | null;
}

export interface DaemonOptions {
  /** Where pool definitions live (and the `default` pool's images, in a fresh state directory). */
  stateDir: string;
  /**
   * Listeners: specs or strings `unix:PATH`, `unix-ro:PATH`, `tcp:HOST:PORT`, `tls:HOST:PORT`
   * (port 0 = any). A kind of listener systemd handed over (`activated`) replaces the
   * configured ones of that kind.
   */
  listen: Array<ListenSpec | string>;
  /** Mode of read-write unix sockets (default 0o600). */
  socketMode?: number;
  /** Mode of read-only unix sockets (default 0o660). */
  socketModeRo?: number;
  /** Group (gid) of the unix sockets; absent: the daemon's. */
  socketGroup?: number | null;
  tls?: TlsOptions;
  logLevel?: LogLevel;
  /** Where log lines go (default stderr). */
  logSink?: (line: string) => void;
  /** The logger to use; `logLevel` and `logSink` are then unused. */
  log?: Logger;
  /** Create, build, start and autostart a `default` pool in a fresh state directory (default true). */
  defaultPool?: boolean;
  /** Seconds of client silence before a keepalive PING (libvirt: 5; ≤ 0: none), and unanswered PINGs before giving up (5). */
  keepaliveInterval?: number;
  keepaliveCount?: number;
  /** Client connections at once (default 5000); one more is closed. */
  maxClients?: number;
  /** Transfers one connection may have open at once (default 16); one more is refused. */
  maxClientTransfers?: number;
  /** Listening sockets from systemd (`listenFdsFromEnv`). */
  activated?: ActivatedSocket[];
  /** sparsevirt's version for CONNECT_GET_VERSION (default 0.1.0). */
  version?: string;
}

export interface ReloadReport {
  /** What changed and now applies (option names). */
  applied: string[];
  /** What could not be applied, with why. */
  failed: Array<{ what: string; error: string }>;
}

export interface DaemonHandle {
  /** Where it listens, with a URI for each (`sparsevirt+unix:///system?socket=…`, …). */
  readonly addresses: DaemonAddress[];
  readonly driver: StorageDriver;
  /** Connected clients right now. */
  readonly clientCount: number;
  readonly log: Logger;
  /**
   * Apply what can change while running: TLS files and allow-lists, client limits, keepalive
   * (for new connections). Listeners and the state directory stay as they are.
   */
  reload(opts: DaemonOptions): ReloadReport;
  /** Stops: streams in flight get a STREAM/ERROR, connections and listeners close, socket files are removed. */
  close(): Promise<void>;
}

/** Parse `unix:PATH`, `unix-ro:PATH`, `tcp:HOST:PORT`, `tls:HOST:PORT` (IPv6 hosts in brackets). */
export function parseListen(s: string): ListenSpec {
  const m = /^(unix|unix-ro|tcp|tls):(.+)$/.exec(s);
  if (!m) throw new SparsevirtError('ERR_INVALID_ARG', `invalid --listen '${s}': use unix:PATH, unix-ro:PATH, tcp:HOST:PORT or tls:HOST:PORT`);
  const kind = m[1] as 'unix' | 'unix-ro' | 'tcp' | 'tls';
  const rest = m[2]!;
  if (kind === 'unix') return { kind, path: path.resolve(rest) };
  if (kind === 'unix-ro') return { kind: 'unix', path: path.resolve(rest), readonly: true };
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

function roleOf(spec: ListenSpec): ListenerRole {
  if (spec.kind === 'unix') return spec.readonly ? 'ro' : 'rw';
  return spec.kind;
}

/** libvirt's DN patterns (g_pattern_match_simple): `*` any run, `?` one character. */
export function dnMatches(pattern: string, dn: string): boolean {
  const re = pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^]*').replace(/\?/g, '[^]');
  return new RegExp(`^${re}$`).test(dn);
}

/** The subject DN as libvirt matches it: attributes in certificate order, `C=…,O=…,CN=…`. */
/**
 * Refuse a client whose handshake completed: a byte other than the confirmation, then the end
 * (a bare close can reach the client before its own handshake has finished, and look like a
 * broken connection instead of a refusal).
 */
function refuseTls(sock: tls.TLSSocket): void {
  sock.end(TLS_REFUSAL);
  setTimeout(() => sock.destroy(), 1000).unref();
}

export function subjectDn(sock: tls.TLSSocket): string | null {
  const x = sock.getPeerX509Certificate();
  if (!x) return null;
  return x.subject.split('\n').filter(Boolean).join(',');
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

interface Listener {
  server: net.Server;
  role: ListenerRole;
  /** A unix socket file we made (and remove at the end); null for adopted sockets and TCP. */
  ownPath: string | null;
}

class Daemon implements DaemonHandle {
  readonly log: Logger;
  readonly driver: StorageDriver;
  readonly addresses: DaemonAddress[] = [];
  private opts: DaemonOptions;
  private readonly listeners: Listener[] = [];
  private readonly sessions = new Set<Session>();
  private readonly sockets = new Set<Duplex>();
  private closing: Promise<void> | null = null;
  private readonly hvVersion: bigint;
  private lock: StateDirLock | null = null;

  constructor(opts: DaemonOptions) {
    this.opts = opts;
    this.log = opts.log ?? new Logger(opts.logLevel ?? 'info', opts.logSink);
    this.driver = new StorageDriver({ stateDir: opts.stateDir, log: this.log });
    this.hvVersion = encodeVersion(opts.version ?? '0.1.0');
  }

  get clientCount(): number {
    return this.sessions.size;
  }

  async start(): Promise<void> {
    const specs = this.opts.listen.map((l) => (typeof l === 'string' ? parseListen(l) : l));
    const activated = this.opts.activated ?? [];
    if (specs.length === 0 && activated.length === 0) throw new SparsevirtError('ERR_INVALID_ARG', 'no listener configured');
    await fsp.mkdir(this.opts.stateDir, { recursive: true, mode: 0o700 });
    // before anything in the state directory is read or written
    this.lock = StateDirLock.acquire(this.opts.stateDir);
    await this.driver.init({ defaultPoolTarget: this.opts.defaultPool === false ? undefined : path.join(this.opts.stateDir, 'images') });
    const adoptedRoles = new Set<ListenerRole>();
    for (const a of activated) adoptedRoles.add(await this.adopt(a));
    for (const spec of specs) {
      if (adoptedRoles.has(roleOf(spec))) {
        this.log.debug('listener replaced by a socket from systemd', { listen: spec.kind === 'unix' ? spec.path : `${spec.host}:${spec.port}` });
        continue;
      }
      await this.listen(spec);
    }
    this.log.info('sparsevirtd started', { pid: process.pid, stateDir: this.opts.stateDir, listen: this.addresses.map((a) => a.uri) });
  }

  private tlsOptions(t: TlsOptions = this.opts.tls ?? {}): tls.SecureContextOptions {
    const def = serverTlsFiles(t.pkipath ?? null);
    const files = { cert: t.cert ?? def.cert, key: t.key ?? def.key, ca: t.ca ?? def.ca };
    const read = (what: string, f: string): Buffer => {
      try {
        return fs.readFileSync(f);
      } catch (err) {
        throw new SparsevirtError('ERR_IO', `cannot read TLS ${what} '${f}': ${(err as Error).message}`, { cause: err });
      }
    };
    return { cert: read('server certificate', files.cert), key: read('server key', files.key), ca: read('CA certificate', files.ca) };
  }

  private makeServer(role: ListenerRole): net.Server {
    let server: net.Server;
    if (role === 'tls') {
      // TLS 1.2 at most: libvirt 9.0's client reads its one confirmation byte once, and fails with
      // EAGAIN when a TLS 1.3 session ticket arrives apart from it (docs/libvirt-quirks.md
      // tls13-ticket-before-confirmation).
      const t = tls.createServer({ ...this.tlsOptions(), maxVersion: 'TLSv1.2', requestCert: true, rejectUnauthorized: true }, (sock) => this.onTlsConnection(sock));
      t.on('tlsClientError', (err, sock) => {
        this.log.warn('TLS handshake refused', { remote: `${sock.remoteAddress}:${sock.remotePort}`, error: err.message });
      });
      server = t;
    } else {
      // Paused: the socket is re-created with a read hook before anything is read from it.
      server = net.createServer({ pauseOnConnect: true }, (sock) => {
        const info = role === 'tcp' ? { transport: 'tcp', remote: `${sock.remoteAddress}:${sock.remotePort}` } : { transport: role === 'ro' ? 'unix-ro' : 'unix' };
        if (this.closing || !this.admit(info)) {
          sock.destroy();
          return;
        }
        this.accept(adoptWithReadHook(sock), info, role === 'ro');
      });
    }
    server.on('error', (err) => this.log.error('listener error', { error: err.message }));
    return server;
  }

  /** A listening socket from systemd: its role by name (or, unnamed, a unix socket is read-write). */
  private async adopt(a: ActivatedSocket): Promise<ListenerRole> {
    const named = listenerRole(a.name);
    const server = this.makeServer(named ?? 'rw');
    await listenOn(server, { fd: a.fd });
    const addr = server.address();
    // a unix socket has no address in Node (null); TCP has one
    const isUnix = addr === null || typeof addr === 'string';
    const role = named ?? 'rw';
    if (named === null && !isUnix) {
      server.close();
      throw new SparsevirtError('ERR_INVALID_ARG', `cannot tell what the socket from systemd on fd ${a.fd} ('${a.name}') is for: name a TCP socket sparsevirtd-tcp.socket or sparsevirtd-tls.socket (FileDescriptorName=)`);
    }
    if ((role === 'rw' || role === 'ro') !== isUnix) {
      server.close();
      throw new SparsevirtError('ERR_INVALID_ARG', `the socket from systemd on fd ${a.fd} ('${a.name}') is ${isUnix ? 'a unix socket' : 'not a unix socket'}, which does not fit its name`);
    }
    this.listeners.push({ server, role, ownPath: null });
    let where: string;
    if (isUnix) {
      where = (typeof addr === 'string' ? addr : unixSocketPath(a.fd)) ?? `fd:${a.fd}`;
      this.addresses.push({ kind: 'unix', path: where, uri: `sparsevirt+unix:///system?socket=${where}`, readonly: role === 'ro', activated: true });
    } else {
      const ai = addr as net.AddressInfo;
      where = `${ai.address}:${ai.port}`;
      this.addresses.push({ kind: role as 'tcp' | 'tls', host: ai.address, port: ai.port, uri: `sparsevirt+${role}://${hostForUri(ai.address)}:${ai.port}/system`, activated: true });
    }
    this.log.info('listening on a socket from systemd', { fd: a.fd, name: a.name, role, address: where });
    return role;
  }

  private async listen(spec: ListenSpec): Promise<void> {
    const role = roleOf(spec);
    const server = this.makeServer(role);
    if (spec.kind === 'unix') {
      await prepareUnixPath(spec.path);
      const mode = spec.readonly ? this.opts.socketModeRo ?? 0o660 : this.opts.socketMode ?? 0o600;
      // Bind with a tight umask so the socket is never reachable with looser permissions, then
      // give it its group, then its mode.
      await listenOn(server, { path: spec.path }, 0o177);
      this.listeners.push({ server, role, ownPath: spec.path });
      if (this.opts.socketGroup !== undefined && this.opts.socketGroup !== null) await fsp.chown(spec.path, -1, this.opts.socketGroup);
      await fsp.chmod(spec.path, mode);
      this.addresses.push({ kind: 'unix', path: spec.path, uri: `sparsevirt+unix:///system?socket=${spec.path}`, ...(spec.readonly ? { readonly: true } : {}) });
    } else {
      await listenOn(server, { host: spec.host, port: spec.port });
      this.listeners.push({ server, role, ownPath: null });
      const a = server.address() as net.AddressInfo;
      this.addresses.push({ kind: spec.kind, host: a.address, port: a.port, uri: `sparsevirt+${spec.kind}://${hostForUri(a.address)}:${a.port}/system` });
    }
  }

  /** max_clients: one more connection is refused (and logged). */
  private admit(info: { transport: string; remote?: string }): boolean {
    const max = this.opts.maxClients ?? 5000;
    if (this.sessions.size < max) return true;
    this.log.warn('client refused: max_clients reached', { ...info, maxClients: max });
    return false;
  }

  private onTlsConnection(sock: tls.TLSSocket): void {
    const remote = `${sock.remoteAddress}:${sock.remotePort}`;
    const cert = sock.getPeerCertificate();
    const cn = cert?.subject ? (Array.isArray(cert.subject.CN) ? cert.subject.CN[0] : cert.subject.CN) : undefined;
    const t = this.opts.tls ?? {};
    const allow = t.allow ?? [];
    if (!sock.authorized) {
      this.log.warn('TLS client refused: certificate not verified', { remote, error: String(sock.authorizationError) });
      sock.destroy();
      return;
    }
    if (allow.length > 0 && (cn === undefined || !allow.includes(cn))) {
      this.log.warn('TLS client refused: certificate CN not in the allow-list', { remote, cn: cn ?? null });
      refuseTls(sock);
      return;
    }
    if (t.allowDn !== undefined && t.allowDn !== null) {
      const dn = subjectDn(sock);
      if (dn === null || !t.allowDn.some((p) => dnMatches(p, dn))) {
        this.log.warn('TLS client refused: certificate DN not in tls_allowed_dn_list', { remote, dn });
        refuseTls(sock);
        return;
      }
    }
    if (this.closing || !this.admit({ transport: 'tls', remote })) {
      refuseTls(sock);
      return;
    }
    // libvirt's TLS confirmation: one byte 0x01 once the client's certificate passed our checks;
    // libvirt clients (virsh) wait for it before their first call.
    sock.write(TLS_CONFIRMATION);
    this.accept(sock, { transport: 'tls', remote, cn }, false);
  }

  private accept(sock: net.Socket, info: { transport: string; remote?: string; cn?: string }, readonly: boolean): void {
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
    const ctx = {
      driver: this.driver, log: this.log, hvVersion: this.hvVersion,
      admitTransfer: (active: number) => this.admitTransfer(active),
    };
    const transport: SessionTransport = info.transport === 'tls' ? 'tls' : info.transport === 'tcp' ? 'tcp' : 'unix';
    const session = new Session(peer, ctx, this.log, readonly, transport);
    this.sessions.add(session);
    this.sockets.add(sock);
    session.log.info('client connected', readonly ? { ...info, readonly } : info);
    peer.on('close', (err: Error) => {
      this.sessions.delete(session);
      this.sockets.delete(sock);
      const reason = (err as SparsevirtError).code === 'ERR_PROTOCOL' ? 'warn' : 'info';
      session.log[reason]('client disconnected', { reason: err.message });
    });
  }

  /** max_client_transfers, read when a transfer opens (so a reload applies to the next one). */
  private admitTransfer(active: number): void {
    const max = this.opts.maxClientTransfers ?? 16;
    if (active >= max) throw virError(CODE.OPERATION_FAILED, DOMAIN.STORAGE, `too many transfers on this connection (max_client_transfers is ${max})`);
  }

  reload(next: DaemonOptions): ReloadReport {
    const report: ReloadReport = { applied: [], failed: [] };
    const prev = this.opts;
    const same = (a: unknown, b: unknown) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
    const updated: DaemonOptions = { ...prev };
    for (const k of ['maxClients', 'maxClientTransfers', 'keepaliveInterval', 'keepaliveCount'] as const) {
      if (!same(prev[k], next[k])) {
        updated[k] = next[k];
        report.applied.push(k);
      }
    }
    const pt = prev.tls ?? {};
    const nt = next.tls ?? {};
    const tlsNext: TlsOptions = { ...pt };
    if (!same(pt.allow, nt.allow)) {
      tlsNext.allow = nt.allow;
      report.applied.push('tls.allow');
    }
    if (!same(pt.allowDn, nt.allowDn)) {
      tlsNext.allowDn = nt.allowDn;
      report.applied.push('tls.allowDn');
    }
    const tlsServers = this.listeners.filter((l) => l.role === 'tls');
    const filesChanged = !same([pt.cert, pt.key, pt.ca, pt.pkipath], [nt.cert, nt.key, nt.ca, nt.pkipath]);
    if (tlsServers.length > 0) {
      // read again even if the names are the same: certificates are renewed in place
      try {
        const ctx = this.tlsOptions(nt);
        for (const l of tlsServers) (l.server as tls.Server).setSecureContext({ ...ctx });
        Object.assign(tlsNext, { cert: nt.cert, key: nt.key, ca: nt.ca, pkipath: nt.pkipath });
        report.applied.push('tls.files');
      } catch (err) {
        report.failed.push({ what: 'tls.files', error: `${(err as Error).message}; TLS goes on with the files it had` });
      }
    } else if (filesChanged) {
      Object.assign(tlsNext, { cert: nt.cert, key: nt.key, ca: nt.ca, pkipath: nt.pkipath });
    }
    updated.tls = tlsNext;
    this.opts = updated;
    return report;
  }

  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    const started = this.lock !== null;
    if (started) this.log.info('sparsevirtd stopping', { clients: this.sessions.size });
    const closed = this.listeners.map(({ server }) => new Promise<void>((r) => server.close(() => r())));
    await Promise.all([...this.sessions].map((s) => s.stopTransfers()));
    for (const s of this.sessions) s.peer.close();
    // Give clients a moment to see their errors, then cut what is left.
    const deadline = Date.now() + 2000;
    while (this.sockets.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    for (const sock of this.sockets) sock.destroy();
    await Promise.all(closed);
    // sockets systemd handed over stay: they are systemd's (RemoveOnStop= removes them)
    for (const { ownPath } of this.listeners) {
      if (ownPath !== null) await fsp.rm(ownPath, { force: true }).catch(() => undefined);
    }
    this.lock?.release();
    if (started) this.log.info('sparsevirtd stopped');
  }
}

/** `listen`, with `umask` in force only while it binds (synchronously, so nothing else sees it). */
function listenOn(server: net.Server, opts: net.ListenOptions & { fd?: number }, umask?: number): Promise<void> {
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
