/**
 * The state of one sparsevirt invocation (virsh's vshControl): output streams, global flags, the
 * connection (opened lazily, or eagerly with -c as virsh does), and virsh's error reporting:
 * `error()` prints an `error: …` line at once; a failed command ends with the library error
 * that caused it, as virsh's vshReportError prints libvirt's last error.
 */
import { closeSync, constants, openSync, writeSync } from 'node:fs';
import type { Connection } from '../client/index.js';
import type { Interrupt } from './exit.js';
import { errnoCode, strerror } from './format.js';

/** Where output goes; the real process streams, or buffers in tests. */
export interface Io {
  out(s: string): void;
  err(s: string): void;
  /** For progress bars: a terminal on stderr. */
  stderrTTY?: { columns?: number; write(s: string): unknown } | null;
  /** For the interactive mode (no command given): commands are read from here. */
  stdin?: NodeJS.ReadableStream & { isTTY?: boolean };
}

/** A command failed; `detail` (if any) is the underlying error virsh would print last. */
export class CommandFailed extends Error {
  /** `hint`: one more `error:` line after the detail (what to do about it). */
  constructor(readonly detail?: unknown, readonly hint?: string) {
    super('command failed');
  }
}

export interface GlobalOptions {
  connect?: string;
  readonly: boolean;
  quiet: boolean;
  timing: boolean;
  keepaliveInterval?: number;
  keepaliveCount?: number;
  /** -d: messages of this level and above go to stderr and the log file (virsh's 0-4). */
  debug?: number;
  /** -l: the log file. */
  logFile?: string;
}

/** virsh's message levels (vshErrorLevel). */
export const DEBUG = 0;
export const INFO = 1;
export const NOTICE = 2;
export const WARNING = 3;
export const ERROR = 4;
const LEVEL_NAMES = ['DEBUG', 'INFO', 'NOTICE', 'WARNING', 'ERROR'];

/** `2026.12.07 04:39:01`: the local time as virsh's log lines give it. */
function logTime(d: Date): string {
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}.${p(d.getMonth() + 1)}.${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** The text virsh prints for an error: a remote error's message, a local error's message. */
export function errorText(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

export class Ctl {
  readonly io: Io;
  readonly opts: GlobalOptions;
  conn: Connection | null = null;
  /** The signal that stopped a transfer (SIGINT, SIGTERM, SIGHUP): the run ends by it. */
  interrupted: Interrupt | null = null;
  /** The least level of the messages shown (virsh's default: errors only). */
  readonly debugLevel: number;
  /** The open log file (-l), or null. */
  logFd: number | null = null;

  constructor(io: Io, opts: GlobalOptions) {
    this.io = io;
    this.opts = opts;
    this.debugLevel = opts.debug ?? ERROR;
  }

  /** vshDebug: a message of `level` (ending with a newline), shown (on stdout) from the -d level up. */
  debug(level: number, msg: string): void {
    if (level < this.debugLevel) return;
    this.#clearStatus();
    this.log(level, msg);
    this.io.out(msg);
  }

  /** vshOutputLogFile: `[2026.12.07 04:39:01 sparsevirt 1234] ERROR message` in the -l file. */
  log(level: number, msg: string): void {
    if (this.logFd === null) return;
    const line = `[${logTime(new Date())} sparsevirt ${process.pid}] ${LEVEL_NAMES[level] ?? 'ERROR'} ${msg}${msg.endsWith('\n') ? '' : '\n'}`;
    try {
      writeSync(this.logFd, line);
    } catch {
      // a log that cannot be written does not fail the command
    }
  }

  /** Opens the -l file as virsh does (appending, created 0644); false if it cannot be opened. */
  openLog(file: string): boolean {
    try {
      this.logFd = openSync(file, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT | constants.O_SYNC, 0o644);
      return true;
    } catch {
      return false;
    }
  }

  get quiet(): boolean {
    return this.opts.quiet;
  }

  /**
   * A line being redrawn on the terminal (the progress bar): erased before anything else is
   * printed, so that no message starts in the middle of it.
   */
  statusLine: { clear(): void } | null = null;

  #clearStatus(): void {
    const s = this.statusLine;
    this.statusLine = null;
    s?.clear();
  }

  /** vshPrint: always. */
  print(s: string): void {
    this.#clearStatus();
    this.io.out(s);
  }

  /** vshPrintExtra: not with -q. */
  printExtra(s: string): void {
    this.#clearStatus();
    if (!this.opts.quiet) this.io.out(s);
  }

  /** vshError: `error: msg` on stderr (and in the log file). */
  error(msg: string): void {
    this.#clearStatus();
    this.log(ERROR, msg);
    this.io.err(`error: ${msg}\n`);
  }

  /** Print `error: …` and fail the command, with `detail` reported after it (if any). */
  fail(msg: string, detail?: unknown): never {
    this.error(msg);
    throw new CommandFailed(detail);
  }

  /** Fail the command with only `detail` reported (virsh: an API failed, no message of its own). */
  failWith(detail?: unknown): never {
    throw new CommandFailed(detail);
  }

  /** The URI to open: -c, else virsh's VIRSH_DEFAULT_CONNECT_URI; undefined = the client's default. */
  get uri(): string | undefined {
    return this.opts.connect ?? (process.env.VIRSH_DEFAULT_CONNECT_URI || undefined);
  }

  /** The URI the user chose (also through LIBVIRT_DEFAULT_URI); undefined = auto-probed. */
  get explicitUri(): string | undefined {
    return this.uri ?? (process.env.LIBVIRT_DEFAULT_URI || undefined);
  }

  /** The connection, opened on first use. Failure: virsh's two error lines, command failed. */
  async connection(): Promise<Connection> {
    if (this.conn) return this.conn;
    const { connect } = await import('../client/index.js');
    const { defaultDaemonSocket, defaultUri, parseUri } = await import('../transport/uri.js');
    // No URI from the user: a running sparsevirtd's socket, else libvirtd's (defaultUri).
    const probed = this.explicitUri === undefined;
    const target = this.uri || defaultUri();
    try {
      let unixSocket: string | null = null;
      try {
        const u = parseUri(target);
        if (u.transport === 'unix') unixSocket = u.socket;
      } catch {
        // connect() reports the URI's error
      }
      // libvirt connects to the empty path of `socket=` and is refused
      if (unixSocket === '') throw Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' });
      this.conn = await connect(target, {
        readonly: this.opts.readonly,
        keepaliveInterval: this.opts.keepaliveInterval,
        keepaliveCount: this.opts.keepaliveCount,
      });
    } catch (err) {
      this.error('failed to connect to the hypervisor');
      // Probed, libvirtd's socket was the fallback because sparsevirtd's did not exist; or
      // sparsevirtd's exists and nothing listens on it (a daemon that did not stop cleanly).
      const daemonSocket = defaultDaemonSocket();
      const stale = target.includes(daemonSocket);
      const code = errnoCode(err);
      const hint = probed && (!stale || code === 'ECONNREFUSED' || code === 'ENOENT')
        ? `no sparsevirtd is running (${stale ? 'nothing listens on' : 'no socket at'} ${daemonSocket}): ` +
          "start one with 'sparsevirtd' ('npm start' in a checkout of sparsevirt), or name a server with -c URI"
        : undefined;
      throw new CommandFailed(new Error(await connectErrorText(err, target)), hint);
    }
    return this.conn;
  }

  async close(): Promise<void> {
    const c = this.conn;
    this.conn = null;
    if (c) await c.close().catch(() => undefined);
    if (this.logFd !== null) {
      closeSync(this.logFd);
      this.logFd = null;
    }
  }
}

/** libvirt's wording for a failed connect, from our transport's error. */
async function connectErrorText(err: unknown, target: string): Promise<string> {
  const code = errnoCode(err);
  const { parseUri } = await import('../transport/uri.js');
  if (!/^[A-Za-z][A-Za-z0-9_.+-]*:\/\//.test(target) && (err as { code?: string }).code === 'ERR_INVALID_ARG') {
    return `no connection driver available for URI '${target}' does not include a driver name`;
  }
  const tlsFile = /^cannot read TLS (CA certificate|client certificate|client key) '(.*)': /.exec(errorText(err));
  if (tlsFile && code) {
    const what = { 'CA certificate': 'CA certificate', 'client certificate': 'certificate', 'client key': 'private key' }[tlsFile[1]!];
    return `Cannot read ${what} '${tlsFile[2]}': ${strerror(err)}`;
  }
  if (code && (err as { code?: string }).code !== 'ERR_IO') {
    try {
      const u = parseUri(target);
      if (u.transport === 'unix') return `Failed to connect socket to '${u.socket}': ${strerror(err)}`;
      if (u.transport === 'ssh') return errorText(err); // ssh's own words, or why ssh did not run
      return `unable to connect to server at '${u.host}:${u.port}': ${strerror(err)}`;
    } catch {
      // fall through to the library's message
    }
  }
  return errorText(err);
}
