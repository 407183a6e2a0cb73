/**
 * sparsevirtd's command line: options, defaults and help. Kept apart from main.ts so that
 * tests can parse arguments without starting anything.
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { SparsevirtError } from '../errors.js';
import { defaultDaemonSocket } from '../transport/uri.js';
import { isLogLevel, LOG_LEVELS, type LogLevel } from './log.js';
import { parseListen, type DaemonOptions } from './server.js';

export const HELP = `Usage: sparsevirtd [OPTIONS]

Serve dir storage pools and raw volumes over libvirt's remote protocol (virsh and sparsevirt
connect to it), with sparse vol-upload / vol-download.

With no options it keeps its state in ${'${STATE}'} (a 'default' pool is created there the
first time) and listens on the unix socket ${'${SOCKET}'}, which
'sparsevirt' finds without -c.

Options:
  --listen unix:PATH         listen on a unix socket (repeatable)
  --listen tcp:HOST:PORT     plain TCP, no encryption and no authentication: only when asked
  --listen tls:HOST:PORT     TLS; clients need a certificate signed by the CA
  --state-dir DIR            pool definitions and the default pool's images; one daemon per
                             directory (it holds DIR/sparsevirtd.pid locked while it runs)
  --socket-mode MODE         octal mode of unix sockets (default 0600: owner only)
  --tls-cert FILE            server certificate (default /etc/pki/libvirt/servercert.pem)
  --tls-key FILE             server key (default /etc/pki/libvirt/private/serverkey.pem)
  --tls-ca FILE              CA for client certificates (default /etc/pki/CA/cacert.pem)
  --pkipath DIR              take servercert.pem, serverkey.pem and cacert.pem from DIR
  --tls-allow CN             accept only client certificates with this subject CN (repeatable)
  --log-level LEVEL          ${LOG_LEVELS.join(', ')} (default info); JSON lines on stderr
  -h, --help                 show this help
  -V, --version              show the version

Stops cleanly on SIGINT or SIGTERM.
`;

function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

/** root: /var/lib/sparsevirt; others: $XDG_STATE_HOME/sparsevirt or ~/.local/state/sparsevirt. */
export function defaultStateDir(): string {
  if (isRoot()) return '/var/lib/sparsevirt';
  const base = process.env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state');
  return path.join(base, 'sparsevirt');
}

export function helpText(): string {
  return HELP.replace('${STATE}', defaultStateDir()).replace('${SOCKET}', defaultDaemonSocket());
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

export type ParsedCommand = { action: 'help' } | { action: 'version' } | { action: 'run'; options: DaemonOptions };

function usageError(message: string): SparsevirtError {
  return new SparsevirtError('ERR_INVALID_ARG', `${message} (see sparsevirtd --help)`);
}

export function parseDaemonArgs(argv: string[]): ParsedCommand {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        listen: { type: 'string', multiple: true },
        'state-dir': { type: 'string' },
        'socket-mode': { type: 'string' },
        'tls-cert': { type: 'string' },
        'tls-key': { type: 'string' },
        'tls-ca': { type: 'string' },
        pkipath: { type: 'string' },
        'tls-allow': { type: 'string', multiple: true },
        'log-level': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean', short: 'V' },
      },
    }));
  } catch (err) {
    throw usageError((err as Error).message);
  }
  if (values.help) return { action: 'help' };
  if (values.version) return { action: 'version' };
  const listen = (values.listen ?? [`unix:${defaultDaemonSocket()}`]).map((l) => {
    try {
      return parseListen(l);
    } catch (err) {
      throw usageError((err as Error).message);
    }
  });
  let socketMode: number | undefined;
  if (values['socket-mode'] !== undefined) {
    if (!/^0?[0-7]{3}$/.test(values['socket-mode'])) throw usageError(`invalid --socket-mode '${values['socket-mode']}': an octal mode such as 0600`);
    socketMode = Number.parseInt(values['socket-mode'], 8);
  }
  const level = values['log-level'] ?? 'info';
  if (!isLogLevel(level)) throw usageError(`invalid --log-level '${level}': one of ${LOG_LEVELS.join(', ')}`);
  const options: DaemonOptions = {
    stateDir: path.resolve(values['state-dir'] ?? defaultStateDir()),
    listen,
    socketMode,
    logLevel: level as LogLevel,
    tls: {
      cert: values['tls-cert'],
      key: values['tls-key'],
      ca: values['tls-ca'],
      pkipath: values.pkipath,
      allow: values['tls-allow'],
    },
    version: packageVersion(),
  };
  return { action: 'run', options };
}
