/**
 * sparsevirtd.conf: the keys, their types, defaults and documentation (one table: the loader
 * checks against it, `sparsevirtd.conf(5)` is generated from it), and `loadConfig`, which turns a
 * file into a `DaemonConfig` or refuses it with `FILE:LINE: reason`.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { defaultDaemonSocket } from '../transport/uri.js';
import { ConfigError, parseConf, type ConfValue } from './conf-syntax.js';
import { isLogLevel, type LogLevel } from './log.js';
import { parseLogOutputs, type OutputSpec } from './log-outputs.js';

export { ConfigError } from './conf-syntax.js';

/** The socket names in `unix_sock_dir`, as libvirtd's libvirt-sock and libvirt-sock-ro. */
export const RW_SOCKET_NAME = 'sparsevirt-sock';
export const RO_SOCKET_NAME = 'sparsevirt-sock-ro';

export interface DaemonConfig {
  /** The file read; null when none was (defaults). */
  file: string | null;
  listenTcp: boolean;
  listenTls: boolean;
  listenAddr: string;
  tcpPort: number;
  tlsPort: number;
  unixSockDir: string;
  /** gid owning the unix sockets; null: the daemon's own group. */
  unixSockGroup: number | null;
  unixSockRwPerms: number;
  unixSockRoPerms: number;
  unixSockRo: boolean;
  keyFile: string | null;
  certFile: string | null;
  caFile: string | null;
  /** null: no DN check. */
  tlsAllowedDnList: string[] | null;
  /** null: no CN check. */
  tlsAllowedCnList: string[] | null;
  stateDir: string;
  logLevel: LogLevel;
  /** null: stderr, at log_level. */
  logOutputs: OutputSpec[] | null;
  maxClients: number;
  maxClientTransfers: number;
  keepaliveInterval: number;
  keepaliveCount: number;
  /** The keys the file set, with their lines. */
  lines: Map<string, number>;
}

function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

/** root: /var/lib/sparsevirt; others: $XDG_STATE_HOME/sparsevirt or ~/.local/state/sparsevirt. */
export function defaultStateDir(): string {
  if (isRoot()) return '/var/lib/sparsevirt';
  const base = process.env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state');
  return path.join(base, 'sparsevirt');
}

/** root: /etc/sparsevirt/sparsevirtd.conf; others: $XDG_CONFIG_HOME/sparsevirt/sparsevirtd.conf (~/.config). */
export function defaultConfigFile(): string {
  if (isRoot()) return '/etc/sparsevirt/sparsevirtd.conf';
  const base = process.env.XDG_CONFIG_HOME || path.join(os.homedir(), '.config');
  return path.join(base, 'sparsevirt', 'sparsevirtd.conf');
}

export function defaultConfig(): DaemonConfig {
  return {
    file: null,
    listenTcp: false,
    listenTls: false,
    listenAddr: '0.0.0.0',
    tcpPort: 16509,
    tlsPort: 16514,
    unixSockDir: path.dirname(defaultDaemonSocket()),
    unixSockGroup: null,
    unixSockRwPerms: 0o600,
    unixSockRoPerms: 0o660,
    unixSockRo: false,
    keyFile: null,
    certFile: null,
    caFile: null,
    tlsAllowedDnList: null,
    tlsAllowedCnList: null,
    stateDir: defaultStateDir(),
    logLevel: 'info',
    logOutputs: null,
    maxClients: 5000,
    maxClientTransfers: 16,
    keepaliveInterval: 5,
    keepaliveCount: 5,
    lines: new Map(),
  };
}

// ------------------------------------------------------------------ the keys

export interface ConfigKey {
  name: string;
  /** The field of DaemonConfig it sets (the name in camelCase). */
  field: keyof DaemonConfig;
  /** For the manual: boolean, integer, string, list of strings… */
  type: string;
  /** For the manual. */
  default: string;
  /** SIGHUP applies a new value; otherwise it needs a restart. */
  reload: boolean;
  /** For the manual: one paragraph. */
  doc: string;
  /** Store the value in `c`; throws an Error whose message is the reason. */
  set(c: DaemonConfig, v: ConfValue): void;
}

const TYPE_NAMES = { int: 'an integer', string: 'a "string"', list: 'a [ list ]' } as const;

function wrongType(v: ConfValue, want: string): Error {
  return new Error(`expected ${want}, found ${TYPE_NAMES[v.type]}`);
}

function bool(v: ConfValue): boolean {
  if (v.type !== 'int') throw wrongType(v, '0 or 1');
  if (v.value !== 0 && v.value !== 1) throw new Error(`expected 0 or 1, found ${v.value}`);
  return v.value === 1;
}

function int(v: ConfValue, min: number, max: number): number {
  if (v.type !== 'int') throw wrongType(v, 'an integer');
  if (v.value < min || v.value > max) throw new Error(`${v.value} is out of range (${min} to ${max})`);
  return v.value;
}

function str(v: ConfValue): string {
  if (v.type !== 'string') throw wrongType(v, 'a "string"');
  return v.value;
}

function absPath(v: ConfValue): string {
  const s = str(v);
  if (!path.isAbsolute(s)) throw new Error(`'${s}' is not an absolute path`);
  return path.normalize(s);
}

function strList(v: ConfValue): string[] {
  if (v.type !== 'list') throw wrongType(v, 'a [ list ] of strings');
  return v.items.map((item) => {
    if (item.type !== 'string') throw new Error(`list items must be strings, found ${TYPE_NAMES[item.type]}`);
    return item.value;
  });
}

/** libvirtd takes ports as strings ("16509"); integers are accepted too. */
function port(v: ConfValue): number {
  let n: number;
  if (v.type === 'int') n = v.value;
  else if (v.type === 'string' && /^\d{1,5}$/.test(v.value)) n = Number(v.value);
  else if (v.type === 'string') throw new Error(`'${v.value}' is not a port number`);
  else throw wrongType(v, 'a port number');
  if (n > 65535) throw new Error(`port ${n} is out of range (0 to 65535)`);
  return n;
}

/** An octal mode as a string, as libvirtd's unix_sock_*_perms ("0770"). */
function mode(v: ConfValue): number {
  if (v.type === 'int') throw new Error(`expected an octal mode as a string, such as "0660" (an integer is read as decimal)`);
  const s = str(v);
  if (!/^0?[0-7]{3}$/.test(s)) throw new Error(`'${s}' is not an octal mode such as "0660"`);
  return Number.parseInt(s, 8);
}

/** A group name or number → gid: /etc/group, then NSS through getent(1). */
export function resolveGroup(name: string): number {
  if (/^\d+$/.test(name)) return Number(name);
  try {
    for (const line of fs.readFileSync('/etc/group', 'utf8').split('\n')) {
      const f = line.split(':');
      if (f[0] === name && f[2] !== undefined && /^\d+$/.test(f[2])) return Number(f[2]);
    }
  } catch {
    // no /etc/group: ask NSS
  }
  try {
    const out = execFileSync('getent', ['group', name], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 5000 });
    const gid = out.split(':')[2];
    if (gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  } catch {
    // not found
  }
  throw new Error(`no group '${name}'`);
}

function logLevel(v: ConfValue): LogLevel {
  if (v.type === 'int') {
    const l = ({ 1: 'debug', 2: 'info', 3: 'warn', 4: 'error' } as Record<number, LogLevel>)[v.value];
    if (!l) throw new Error(`${v.value} is not a level: 1 (debug), 2 (info), 3 (warning) or 4 (error)`);
    return l;
  }
  const s = str(v);
  if (!isLogLevel(s)) throw new Error(`'${s}' is not a level: 1-4, or debug, info, warn, error, silent`);
  return s;
}

const KEY_TABLE: ReadonlyArray<Omit<ConfigKey, 'field'>> = [
  {
    name: 'listen_tcp', type: 'boolean: 0 or 1', default: '0', reload: false,
    doc: 'Listen for plain TCP connections on listen_addr and tcp_port. TCP has no encryption and no authentication: whoever reaches the port has read-write access. Use it on a trusted network only, or prefer listen_tls.',
    set: (c, v) => void (c.listenTcp = bool(v)),
  },
  {
    name: 'listen_tls', type: 'boolean: 0 or 1', default: '0', reload: false,
    doc: 'Listen for TLS connections on listen_addr and tls_port. Clients need a certificate signed by ca_file (and, when set, allowed by tls_allowed_dn_list and tls_allowed_cn_list).',
    set: (c, v) => void (c.listenTls = bool(v)),
  },
  {
    name: 'listen_addr', type: 'string', default: '"0.0.0.0"', reload: false,
    doc: 'The address the TCP and TLS listeners bind to: an IPv4 or IPv6 address (without brackets) or a host name.',
    set: (c, v) => {
      const s = str(v);
      if (s === '' || /[\s[\]]/.test(s)) throw new Error(`'${s}' is not an address`);
      c.listenAddr = s;
    },
  },
  {
    name: 'tcp_port', type: 'port: string or integer', default: '"16509"', reload: false,
    doc: 'The TCP listener\'s port. 0 picks a free port (the log says which).',
    set: (c, v) => void (c.tcpPort = port(v)),
  },
  {
    name: 'tls_port', type: 'port: string or integer', default: '"16514"', reload: false,
    doc: 'The TLS listener\'s port. 0 picks a free port (the log says which).',
    set: (c, v) => void (c.tlsPort = port(v)),
  },
  {
    name: 'unix_sock_dir', type: 'absolute path', default: '"/run/sparsevirt"', reload: false,
    doc: `The directory of the unix sockets: ${RW_SOCKET_NAME} (read-write) and ${RO_SOCKET_NAME} (read-only, see unix_sock_ro). It is created (mode 0755) if missing. For users other than root the default is $XDG_RUNTIME_DIR/sparsevirt.`,
    set: (c, v) => void (c.unixSockDir = absPath(v)),
  },
  {
    name: 'unix_sock_group', type: 'string: group name or number', default: 'the daemon\'s group', reload: false,
    doc: 'The group that owns the unix sockets, so that unix_sock_rw_perms and unix_sock_ro_perms can open them to its members.',
    set: (c, v) => void (c.unixSockGroup = resolveGroup(str(v))),
  },
  {
    name: 'unix_sock_rw_perms', type: 'octal mode: string', default: '"0600"', reload: false,
    doc: `The mode of ${RW_SOCKET_NAME}. Whoever may connect has read-write access to every pool.`,
    set: (c, v) => void (c.unixSockRwPerms = mode(v)),
  },
  {
    name: 'unix_sock_ro_perms', type: 'octal mode: string', default: '"0660"', reload: false,
    doc: `The mode of ${RO_SOCKET_NAME}. Read-only connections can download volumes, so the default keeps it to the owner and unix_sock_group, not to everyone as libvirtd's "0777".`,
    set: (c, v) => void (c.unixSockRoPerms = mode(v)),
  },
  {
    name: 'unix_sock_ro', type: 'boolean: 0 or 1', default: '0', reload: false,
    doc: `Also listen on ${RO_SOCKET_NAME} beside ${RW_SOCKET_NAME}, as libvirtd's libvirt-sock-ro: every connection on it is read-only, whatever the client asks. It lists pools and volumes, reads their XML and information, and downloads volumes; everything that writes is refused with libvirt's "operation forbidden: read only access prevents …". For monitoring.`,
    set: (c, v) => void (c.unixSockRo = bool(v)),
  },
  {
    name: 'key_file', type: 'absolute path', default: '"/etc/pki/libvirt/private/serverkey.pem"', reload: true,
    doc: 'The TLS server\'s private key (PEM). SIGHUP reads key_file, cert_file and ca_file again: new TLS connections use the new files, connections already open keep theirs.',
    set: (c, v) => void (c.keyFile = absPath(v)),
  },
  {
    name: 'cert_file', type: 'absolute path', default: '"/etc/pki/libvirt/servercert.pem"', reload: true,
    doc: 'The TLS server\'s certificate (PEM), signed by a CA the clients trust, for the host name they connect to.',
    set: (c, v) => void (c.certFile = absPath(v)),
  },
  {
    name: 'ca_file', type: 'absolute path', default: '"/etc/pki/CA/cacert.pem"', reload: true,
    doc: 'The CA certificate(s) (PEM) that sign the clients\' certificates. A client without a certificate signed by it is refused.',
    set: (c, v) => void (c.caFile = absPath(v)),
  },
  {
    name: 'tls_allowed_dn_list', type: 'list of strings', default: 'unset (no check)', reload: true,
    doc: 'The client certificate subject DNs allowed in, as libvirtd\'s: patterns where * matches any run of characters and ? one character, matched against the DN written with its attributes in certificate order, e.g. "C=GB,O=Example,CN=client1" (pattern "C=GB,O=Example,CN=*"). A certificate matching no pattern is refused. An empty list lets no client in; leave the key out for no check.',
    set: (c, v) => void (c.tlsAllowedDnList = strList(v)),
  },
  {
    name: 'tls_allowed_cn_list', type: 'list of strings', default: 'unset (no check)', reload: true,
    doc: 'sparsevirtd\'s own: the client certificate subject CNs allowed in, compared exactly. An empty list, or no key, checks nothing. With tls_allowed_dn_list too, a client must pass both. sparsevirtd --tls-allow replaces this list.',
    set: (c, v) => void (c.tlsAllowedCnList = strList(v)),
  },
  {
    name: 'state_dir', type: 'absolute path', default: '"/var/lib/sparsevirt"', reload: false,
    doc: 'Pool definitions, and the default pool\'s images in a fresh directory. One daemon per directory: it holds STATE_DIR/sparsevirtd.pid locked. For users other than root the default is $XDG_STATE_HOME/sparsevirt (~/.local/state/sparsevirt).',
    set: (c, v) => void (c.stateDir = absPath(v)),
  },
  {
    name: 'log_level', type: 'integer 1 to 4, or string', default: '2 (info)', reload: true,
    doc: 'The least level logged, as libvirtd\'s: 1 debug, 2 info, 3 warning, 4 error; or "debug", "info", "warn", "error", "silent". Each output of log_outputs may ask for a higher level, never a lower one.',
    set: (c, v) => void (c.logLevel = logLevel(v)),
  },
  {
    name: 'log_outputs', type: 'string', default: 'stderr, at log_level', reload: true,
    doc: 'Where the log goes, in libvirtd\'s notation: outputs separated by blanks, each LEVEL:stderr, LEVEL:file:PATH or LEVEL:journald, LEVEL being 1 to 4 as in log_level, e.g. "3:journald 1:file:/var/log/sparsevirt/debug.log". stderr gets JSON lines, or lines with an sd-daemon <N> priority prefix and no timestamp when stderr is the journal (JOURNAL_STREAM names it: the daemon runs under systemd). A file gets JSON lines; SIGHUP reopens it (for logrotate). journald gets <N> lines through its stream socket.',
    set: (c, v) => {
      const s = str(v);
      try {
        c.logOutputs = parseLogOutputs(s);
      } catch (err) {
        throw new Error(`log_outputs: ${(err as Error).message}`);
      }
    },
  },
  {
    name: 'max_clients', type: 'integer', default: '5000', reload: true,
    doc: 'The most client connections at once, over all listeners. One more is closed as soon as it is accepted, and the log says so.',
    set: (c, v) => void (c.maxClients = int(v, 1, 1_000_000)),
  },
  {
    name: 'max_client_transfers', type: 'integer', default: '16', reload: true,
    doc: 'The most volume transfers (vol-upload, vol-download streams) one connection may have open at once. One more is refused with "operation failed: too many transfers on this connection". A lower value applies to transfers started after it.',
    set: (c, v) => void (c.maxClientTransfers = int(v, 1, 1_000_000)),
  },
  {
    name: 'keepalive_interval', type: 'integer: seconds', default: '5', reload: true,
    doc: 'Seconds of silence from a client before sparsevirtd sends it a keepalive PING (once the client agreed to keepalive, as virsh does). -1 or 0 sends none. Applies to connections made after a change.',
    set: (c, v) => void (c.keepaliveInterval = int(v, -1, 86_400)),
  },
  {
    name: 'keepalive_count', type: 'integer', default: '5', reload: true,
    doc: 'Unanswered PINGs after which the connection is closed: a client gone silent is dropped after about keepalive_interval × (keepalive_count + 1) seconds. Applies to connections made after a change.',
    set: (c, v) => void (c.keepaliveCount = int(v, 0, 1000)),
  },
];

export const CONFIG_KEYS: readonly ConfigKey[] = KEY_TABLE.map((k) => ({
  ...k,
  field: k.name.replace(/_([a-z])/g, (_m, c: string) => c.toUpperCase()) as keyof DaemonConfig,
}));

const KEYS = new Map(CONFIG_KEYS.map((k) => [k.name, k]));

export function configKey(name: string): ConfigKey | undefined {
  return KEYS.get(name);
}

/** Parse `text` (the contents of `file`) over the defaults; throws ConfigError. */
export function parseConfig(text: string, file: string): DaemonConfig {
  const c = defaultConfig();
  c.file = file;
  for (const e of parseConf(text, file)) {
    const key = KEYS.get(e.name);
    if (!key) throw new ConfigError(file, e.line, `unknown key '${e.name}' (sparsevirtd.conf(5) lists the keys)`);
    const first = c.lines.get(e.name);
    if (first !== undefined) throw new ConfigError(file, e.line, `'${e.name}' is set twice (first on line ${first})`);
    try {
      key.set(c, e.value);
    } catch (err) {
      const reason = (err as Error).message;
      throw new ConfigError(file, lineOf(e.value, reason), reason.startsWith(`${e.name}:`) ? reason : `${e.name}: ${reason}`);
    }
    c.lines.set(e.name, e.line);
  }
  return c;
}

/** A list's bad item may be on a later line than the key. */
function lineOf(v: ConfValue, reason: string): number {
  if (v.type === 'list') {
    for (const item of v.items) if (item.type !== 'string' && reason.startsWith('list items')) return item.line;
  }
  return v.line;
}

/** Most a configuration file may hold (libvirt's limit). */
const MAX_CONFIG_BYTES = 10 << 20;

/**
 * Read and parse `file`. A missing file (or one that cannot be looked up) is the defaults unless
 * `required` (a file named with --config must exist); an existing one it cannot read is refused. Throws ConfigError: `FILE: reason` for a file it cannot read,
 * `FILE:LINE: reason` for its contents.
 */
export function loadConfig(file: string, required: boolean): DaemonConfig {
  let text: string;
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (err) {
    // The default file is optional: one that cannot even be looked at (missing, or under a
    // directory this user may not search, such as another user's home) is no file.
    if (!required) return defaultConfig();
    throw new ConfigError(file, null, `cannot read the configuration file: ${(err as Error).message}`, { cause: err });
  }
  try {
    if (st.isDirectory()) throw new ConfigError(file, null, 'cannot read the configuration file: it is a directory');
    if (st.size > MAX_CONFIG_BYTES) throw new ConfigError(file, null, `cannot read the configuration file: larger than ${MAX_CONFIG_BYTES} bytes`);
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !required) return defaultConfig();
    throw new ConfigError(file, null, `cannot read the configuration file: ${(err as Error).message}`, { cause: err });
  }
  return parseConfig(text, file);
}
