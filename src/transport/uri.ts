/**
 * libvirt connection URIs: `driver[+transport]://[user@][host][:port]/path[?params]`.
 * What is consumed locally (transport, host, port, socket=, pkipath=, no_verify=…) is stripped
 * from the name sent in CONNECT_OPEN, as libvirt's remote driver does.
 */
import os from 'node:os';
import path from 'node:path';
import { existsSync } from 'node:fs';
import { SparsevirtError } from '../errors.js';

export type TransportKind = 'unix' | 'tcp' | 'tls' | 'ssh';

export interface ParsedUri {
  /** The URI as given. */
  uri: string;
  driver: string;
  transport: TransportKind;
  /** The user named before '@' (ssh logs in as it), or null. */
  user: string | null;
  host: string;
  /** tcp and tls: the port, or libvirt's default; ssh: the port given, or 0 (ssh's own default). */
  port: number;
  /** The URI's path: '/system', '/session'. */
  path: string;
  /** unix socket path (unix transport); '' when the URI says `socket=` with no path. */
  socket: string;
  /** Name sent in CONNECT_OPEN. */
  name: string;
  pkipath: string | null;
  noVerify: boolean;
  readonly: boolean;
  params: URLSearchParams;
}

export const DEFAULT_TCP_PORT = 16509;
export const DEFAULT_TLS_PORT = 16514;
export const LIBVIRT_SYSTEM_SOCKET = '/var/run/libvirt/libvirt-sock';

/** Parameters the remote driver consumes locally (not forwarded in the name). */
const LOCAL_PARAMS = new Set(['socket', 'pkipath', 'no_verify', 'no_tty', 'name', 'command', 'netcat', 'keyfile', 'sshauth', 'known_hosts', 'known_hosts_verify', 'mode', 'proxy', 'tls_priority', 'tls_trust', 'tls_priority']);

function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

function runtimeDir(): string {
  return process.env.XDG_RUNTIME_DIR || path.join(os.homedir(), '.cache');
}

/** The unix socket sparsevirtd listens on by default (root: system path; others: per user). */
export function defaultDaemonSocket(): string {
  return isRoot() ? '/run/sparsevirt/sparsevirt-sock' : path.join(runtimeDir(), 'sparsevirt', 'sparsevirt-sock');
}

/** The URI a client uses when none is given: LIBVIRT_DEFAULT_URI, then a running sparsevirtd, then libvirtd. */
export function defaultUri(): string {
  const env = process.env.LIBVIRT_DEFAULT_URI;
  if (env) return env;
  const sock = defaultDaemonSocket();
  if (existsSync(sock)) return `sparsevirt+unix:///system?socket=${sock}`;
  return 'qemu:///system';
}

/** %XX escapes of a URI's user or host, as libvirt unescapes them; a bad escape is an invalid URI. */
function unescapeUri(s: string, uri: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new SparsevirtError('ERR_INVALID_ARG', `invalid connection URI '${uri}': bad %-escape in '${s}'`);
  }
}

export function parseUri(uri: string): ParsedUri {
  const m = /^([A-Za-z][A-Za-z0-9_.-]*)(?:\+([A-Za-z0-9_]+))?:\/\/([^/?#]*)(\/[^?#]*)?(?:\?([^#]*))?$/.exec(uri);
  if (!m) throw new SparsevirtError('ERR_INVALID_ARG', `invalid connection URI '${uri}'`);
  const [, driver, transportRaw, authority, p = '', query = ''] = m;
  const params = new URLSearchParams(query);
  let host = authority;
  const at = host.lastIndexOf('@');
  let user: string | null = null;
  if (at >= 0) {
    user = unescapeUri(host.slice(0, at), uri);
    host = host.slice(at + 1);
  }
  let port = 0;
  const pm = /^(\[[^\]]+\]|[^:]*)(?::(\d+))?$/.exec(host);
  if (pm) {
    host = unescapeUri(pm[1].replace(/^\[|\]$/g, ''), uri);
    port = pm[2] ? Number(pm[2]) : 0;
  }
  let transport: TransportKind;
  if (transportRaw) {
    const t = transportRaw.toLowerCase();
    if (t !== 'unix' && t !== 'tcp' && t !== 'tls' && t !== 'ssh') {
      throw new SparsevirtError('ERR_UNSUPPORTED', `transport '${transportRaw}' is not supported (use unix, tcp, tls or ssh)`);
    }
    transport = t;
  } else {
    // libvirt: a host without a transport means TLS; no host means the local socket.
    transport = host ? 'tls' : 'unix';
  }
  if (transport === 'unix' && host) throw new SparsevirtError('ERR_INVALID_ARG', `a unix URI cannot name a host: '${uri}'`);
  if (transport !== 'unix' && !host) host = 'localhost';
  if (!port && (transport === 'tcp' || transport === 'tls')) port = transport === 'tcp' ? DEFAULT_TCP_PORT : DEFAULT_TLS_PORT;
  // `socket=` with no value names the empty path, as libvirt takes it (the connection then fails);
  // only a URI without the parameter gets the default socket.
  let socket = params.get('socket') ?? '';
  if (transport === 'unix' && !params.has('socket')) {
    socket = p === '/session' && !isRoot() ? path.join(runtimeDir(), 'libvirt', 'libvirt-sock') : LIBVIRT_SYSTEM_SOCKET;
  }
  const forwarded = new URLSearchParams();
  for (const [k, v] of params) if (!LOCAL_PARAMS.has(k)) forwarded.append(k, v);
  const fq = forwarded.toString();
  const name = params.get('name') ?? `${driver}://${p}${fq ? `?${fq}` : ''}`;
  return {
    uri, driver, transport, user, host, port, path: p, socket, name,
    pkipath: params.get('pkipath'),
    noVerify: params.get('no_verify') === '1',
    readonly: false,
    params,
  };
}

export interface TlsFiles {
  ca: string;
  cert: string;
  key: string;
}

/** Client certificate paths as libvirt looks for them (pkipath=, per-user ~/.pki/libvirt, then system). */
export function clientTlsFiles(pkipath: string | null): TlsFiles {
  if (pkipath) return { ca: path.join(pkipath, 'cacert.pem'), cert: path.join(pkipath, 'clientcert.pem'), key: path.join(pkipath, 'clientkey.pem') };
  if (!isRoot()) {
    const dir = path.join(os.homedir(), '.pki', 'libvirt');
    if (existsSync(path.join(dir, 'clientcert.pem'))) {
      return { ca: existsSync(path.join(dir, 'cacert.pem')) ? path.join(dir, 'cacert.pem') : '/etc/pki/CA/cacert.pem', cert: path.join(dir, 'clientcert.pem'), key: path.join(dir, 'clientkey.pem') };
    }
  }
  return { ca: '/etc/pki/CA/cacert.pem', cert: '/etc/pki/libvirt/clientcert.pem', key: '/etc/pki/libvirt/private/clientkey.pem' };
}

/** Server certificate paths, libvirt's defaults. */
export function serverTlsFiles(pkipath?: string | null): TlsFiles {
  if (pkipath) return { ca: path.join(pkipath, 'cacert.pem'), cert: path.join(pkipath, 'servercert.pem'), key: path.join(pkipath, 'serverkey.pem') };
  return { ca: '/etc/pki/CA/cacert.pem', cert: '/etc/pki/libvirt/servercert.pem', key: '/etc/pki/libvirt/private/serverkey.pem' };
}
