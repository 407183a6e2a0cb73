/**
 * sparsevirtd's command line: the options (one table: `--help` and `sparsevirtd(8)` are made
 * from it), their parsing, and how they combine with the configuration file: an option given on
 * the command line overrides the file's key. Kept apart from main.ts so that tests can parse
 * arguments without starting anything.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { SparsevirtError } from '../errors.js';
import { defaultDaemonSocket } from '../transport/uri.js';
import { defaultConfig, defaultConfigFile, defaultStateDir, RO_SOCKET_NAME, RW_SOCKET_NAME, type DaemonConfig } from './config.js';
import { isLogLevel, LOG_LEVELS, type LogLevel } from './log.js';
import { parseListen, type DaemonOptions, type ListenSpec } from './server.js';

export { defaultStateDir } from './config.js';

export interface DaemonOption {
  /** As shown: `--listen unix:PATH`. Options with several forms have one row each, same `name`. */
  usage: string;
  name: string;
  short?: string;
  type: 'string' | 'boolean';
  multiple?: boolean;
  /** The configuration key it overrides, if any. */
  key?: string;
  help: string;
}

export const DAEMON_OPTIONS: readonly DaemonOption[] = [
  { usage: '--config FILE', name: 'config', type: 'string', help: 'the configuration file (default ${CONFIG}; a missing default file is no error, a missing FILE is)' },
  { usage: '--listen unix:PATH', name: 'listen', type: 'string', multiple: true, help: 'listen on a unix socket (repeatable); --listen replaces the listeners of the configuration file' },
  { usage: '--listen unix-ro:PATH', name: 'listen', type: 'string', multiple: true, help: 'a unix socket whose connections are all read-only' },
  { usage: '--listen tcp:HOST:PORT', name: 'listen', type: 'string', multiple: true, help: 'plain TCP, no encryption and no authentication: only when asked for' },
  { usage: '--listen tls:HOST:PORT', name: 'listen', type: 'string', multiple: true, help: 'TLS; clients need a certificate signed by the CA' },
  { usage: '--state-dir DIR', name: 'state-dir', type: 'string', key: 'state_dir', help: 'pool definitions and the default pool\'s images; one daemon per directory (it holds DIR/sparsevirtd.pid locked while it runs)' },
  { usage: '--socket-mode MODE', name: 'socket-mode', type: 'string', key: 'unix_sock_rw_perms', help: 'octal mode of read-write unix sockets (default 0600: owner only)' },
  { usage: '--tls-cert FILE', name: 'tls-cert', type: 'string', key: 'cert_file', help: 'server certificate (default /etc/pki/libvirt/servercert.pem)' },
  { usage: '--tls-key FILE', name: 'tls-key', type: 'string', key: 'key_file', help: 'server key (default /etc/pki/libvirt/private/serverkey.pem)' },
  { usage: '--tls-ca FILE', name: 'tls-ca', type: 'string', key: 'ca_file', help: 'CA for client certificates (default /etc/pki/CA/cacert.pem)' },
  { usage: '--pkipath DIR', name: 'pkipath', type: 'string', help: 'take servercert.pem, serverkey.pem and cacert.pem from DIR (over the file\'s cert_file, key_file, ca_file)' },
  { usage: '--tls-allow CN', name: 'tls-allow', type: 'string', multiple: true, key: 'tls_allowed_cn_list', help: 'accept only client certificates with this subject CN (repeatable)' },
  { usage: '--log-level LEVEL', name: 'log-level', type: 'string', key: 'log_level', help: `${LOG_LEVELS.join(', ')} (default info); JSON lines on stderr, or <N> lines when stderr is the journal` },
  { usage: '--check-config', name: 'check-config', type: 'boolean', help: 'read the configuration file and the options, report the first error (FILE:LINE: reason) or nothing, and exit' },
  { usage: '--install-units', name: 'install-units', type: 'boolean', help: 'install the systemd units (sparsevirtd.service, sparsevirtd.socket, sparsevirtd-ro.socket) into PREFIX/lib/systemd/system, running this sparsevirtd, and exit' },
  { usage: '--prefix DIR', name: 'prefix', type: 'string', help: 'PREFIX for --install-units (default /usr/local)' },
  { usage: '-h, --help', name: 'help', short: 'h', type: 'boolean', help: 'show this help' },
  { usage: '-V, --version', name: 'version', short: 'V', type: 'boolean', help: 'show the version' },
];

export const HELP_INTRO = `Serve dir storage pools and raw volumes over libvirt's remote protocol (virsh and sparsevirt
connect to it), with sparse vol-upload / vol-download.`;

/** Word-wrap `text` to `width` columns. */
function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  let line = '';
  for (const w of text.split(/\s+/).filter(Boolean)) {
    if (line && line.length + 1 + w.length > width) {
      lines.push(line);
      line = w;
    } else {
      line = line ? `${line} ${w}` : w;
    }
  }
  if (line) lines.push(line);
  return lines;
}

/** Placeholders in help texts: the defaults of this user. */
export function fillDefaults(text: string): string {
  return text.replace('${CONFIG}', defaultConfigFile()).replace('${STATE}', defaultStateDir()).replace('${SOCKET}', defaultDaemonSocket());
}

export function helpText(): string {
  let out = `Usage: sparsevirtd [OPTIONS]

${HELP_INTRO}

With no options it reads ${defaultConfigFile()} if it exists, keeps its state in
${defaultStateDir()} (a 'default' pool is created there the first time) and
listens on the unix socket ${defaultDaemonSocket()}, which 'sparsevirt' finds without -c.
Options override the configuration file (see sparsevirtd.conf(5)).

Options:
`;
  for (const o of DAEMON_OPTIONS) {
    const help = wrap(fillDefaults(o.help), 50);
    const first = `  ${o.usage}`;
    out += first.length <= 28 ? `${first.padEnd(29)}${help[0] ?? ''}\n` : `${first}\n${' '.repeat(29)}${help[0] ?? ''}\n`;
    for (const l of help.slice(1)) out += `${' '.repeat(29)}${l}\n`;
  }
  out += `
Stops cleanly on SIGINT or SIGTERM. SIGHUP reads the configuration file again and applies what
can change while running (allow-lists, TLS files, log level and outputs, client limits); it
logs what needs a restart. Started by systemd, it takes the sockets systemd made for it
(socket activation) and tells systemd when it is ready (Type=notify).
`;
  return out;
}

/** The version in package.json (dist/src/daemon → the package root). */
export function packageVersion(): string {
  for (const rel of ['../../../package.json', '../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'sparsevirt' && pkg.version) return pkg.version;
    } catch {
      // try the next candidate
    }
  }
  return '0.0.0';
}

/** The options as given (undefined: not given). */
export interface DaemonFlags {
  config?: string;
  listen?: ListenSpec[];
  stateDir?: string;
  socketMode?: number;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  pkipath?: string;
  tlsAllow?: string[];
  logLevel?: LogLevel;
}

export type ParsedCommand =
  | { action: 'help' }
  | { action: 'version' }
  | { action: 'install-units'; prefix: string }
  | { action: 'check-config'; flags: DaemonFlags }
  | { action: 'run'; options: DaemonOptions; flags: DaemonFlags };

function usageError(message: string): SparsevirtError {
  return new SparsevirtError('ERR_INVALID_ARG', `${message} (see sparsevirtd --help)`);
}

type ParseOptions = Record<string, { type: 'string' | 'boolean'; multiple?: boolean; short?: string }>;

function parseOptionsTable(): ParseOptions {
  const t: ParseOptions = {};
  for (const o of DAEMON_OPTIONS) t[o.name] = { type: o.type, ...(o.multiple ? { multiple: true } : {}), ...(o.short ? { short: o.short } : {}) };
  return t;
}

/** The options alone; throws ERR_INVALID_ARG with a usage message. */
export function parseDaemonFlags(argv: string[]): ParsedCommand | { action: 'flags'; flags: DaemonFlags; check: boolean } {
  let values: Record<string, string | boolean | string[] | boolean[] | undefined>;
  try {
    values = parseArgs({ args: argv, strict: true, allowPositionals: false, options: parseOptionsTable() }).values as typeof values;
  } catch (err) {
    throw usageError((err as Error).message);
  }
  const s = (k: string) => values[k] as string | undefined;
  if (values.help) return { action: 'help' };
  if (values.version) return { action: 'version' };
  if (values.prefix !== undefined && !values['install-units']) throw usageError('--prefix goes with --install-units');
  if (values['install-units']) return { action: 'install-units', prefix: path.resolve(s('prefix') ?? '/usr/local') };
  const flags: DaemonFlags = {};
  if (s('config') !== undefined) flags.config = path.resolve(s('config')!);
  const listen = values.listen as string[] | undefined;
  if (listen) {
    flags.listen = listen.map((l) => {
      try {
        return parseListen(l);
      } catch (err) {
        throw usageError((err as Error).message);
      }
    });
  }
  if (s('state-dir') !== undefined) flags.stateDir = path.resolve(s('state-dir')!);
  const mode = s('socket-mode');
  if (mode !== undefined) {
    if (!/^0?[0-7]{3}$/.test(mode)) throw usageError(`invalid --socket-mode '${mode}': an octal mode such as 0600`);
    flags.socketMode = Number.parseInt(mode, 8);
  }
  for (const [opt, key] of [['tls-cert', 'tlsCert'], ['tls-key', 'tlsKey'], ['tls-ca', 'tlsCa'], ['pkipath', 'pkipath']] as const) {
    if (s(opt) !== undefined) flags[key] = s(opt);
  }
  if (values['tls-allow']) flags.tlsAllow = values['tls-allow'] as string[];
  const level = s('log-level');
  if (level !== undefined) {
    if (!isLogLevel(level)) throw usageError(`invalid --log-level '${level}': one of ${LOG_LEVELS.join(', ')}`);
    flags.logLevel = level;
  }
  return { action: 'flags', flags, check: values['check-config'] === true };
}

/**
 * The command line with the defaults of the configuration (without reading a file). main.ts
 * reads the file and calls `resolveOptions` itself.
 */
export function parseDaemonArgs(argv: string[], config: DaemonConfig = defaultConfig()): ParsedCommand {
  const r = parseDaemonFlags(argv);
  if (r.action !== 'flags') return r;
  if (r.check) return { action: 'check-config', flags: r.flags };
  return { action: 'run', options: resolveOptions(r.flags, config), flags: r.flags };
}

/** The listeners a configuration asks for (when no --listen is given). */
export function configListeners(c: DaemonConfig): ListenSpec[] {
  const specs: ListenSpec[] = [{ kind: 'unix', path: path.join(c.unixSockDir, RW_SOCKET_NAME) }];
  if (c.unixSockRo) specs.push({ kind: 'unix', path: path.join(c.unixSockDir, RO_SOCKET_NAME), readonly: true });
  if (c.listenTcp) specs.push({ kind: 'tcp', host: c.listenAddr, port: c.tcpPort });
  if (c.listenTls) specs.push({ kind: 'tls', host: c.listenAddr, port: c.tlsPort });
  return specs;
}

/** Options over the file: what `startDaemon` (and `reload`) take. */
export function resolveOptions(f: DaemonFlags, c: DaemonConfig): DaemonOptions {
  const set = (key: string) => c.lines.has(key);
  const options: DaemonOptions = {
    stateDir: f.stateDir ?? c.stateDir,
    listen: f.listen ?? configListeners(c),
    socketMode: f.socketMode ?? (set('unix_sock_rw_perms') ? c.unixSockRwPerms : undefined),
    logLevel: f.logLevel ?? c.logLevel,
    tls: {
      cert: f.tlsCert ?? (f.pkipath ? undefined : c.certFile ?? undefined),
      key: f.tlsKey ?? (f.pkipath ? undefined : c.keyFile ?? undefined),
      ca: f.tlsCa ?? (f.pkipath ? undefined : c.caFile ?? undefined),
      pkipath: f.pkipath,
      allow: f.tlsAllow ?? c.tlsAllowedCnList ?? undefined,
    },
    version: packageVersion(),
  };
  if (set('unix_sock_ro_perms')) options.socketModeRo = c.unixSockRoPerms;
  if (c.unixSockGroup !== null) options.socketGroup = c.unixSockGroup;
  if (c.tlsAllowedDnList !== null) options.tls!.allowDn = c.tlsAllowedDnList;
  if (set('max_clients')) options.maxClients = c.maxClients;
  if (set('max_client_transfers')) options.maxClientTransfers = c.maxClientTransfers;
  if (set('keepalive_interval')) options.keepaliveInterval = Math.max(0, c.keepaliveInterval);
  if (set('keepalive_count')) options.keepaliveCount = c.keepaliveCount;
  return options;
}

/** The configuration keys an option on this command line overrides. */
export function overriddenKeys(f: DaemonFlags): string[] {
  const keys: string[] = [];
  if (f.listen) keys.push('listen_tcp', 'listen_tls', 'listen_addr', 'tcp_port', 'tls_port', 'unix_sock_dir', 'unix_sock_ro');
  if (f.stateDir !== undefined) keys.push('state_dir');
  if (f.socketMode !== undefined) keys.push('unix_sock_rw_perms');
  if (f.tlsCert !== undefined || f.pkipath !== undefined) keys.push('cert_file');
  if (f.tlsKey !== undefined || f.pkipath !== undefined) keys.push('key_file');
  if (f.tlsCa !== undefined || f.pkipath !== undefined) keys.push('ca_file');
  if (f.tlsAllow !== undefined) keys.push('tls_allowed_cn_list');
  if (f.logLevel !== undefined) keys.push('log_level');
  return keys;
}
