/**
 * The state of one sparsevirt invocation (virsh's vshControl): output streams, global flags, the
 * connection (opened lazily, or eagerly with -c as virsh does), and virsh's error reporting:
 * `error()` prints an `error: …` line at once; a failed command ends with the library error
 * that caused it, as virsh's vshReportError prints libvirt's last error.
 */
import type { Connection } from '../client/index.js';
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
  constructor(readonly detail?: unknown) {
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
  /** Aborted on SIGINT while a transfer runs. */
  readonly abort = new AbortController();

  constructor(io: Io, opts: GlobalOptions) {
    this.io = io;
    this.opts = opts;
  }

  get quiet(): boolean {
    return this.opts.quiet;
  }

  /** vshPrint: always. */
  print(s: string): void {
    this.io.out(s);
  }

  /** vshPrintExtra: not with -q. */
  printExtra(s: string): void {
    if (!this.opts.quiet) this.io.out(s);
  }

  /** vshError: `error: msg` on stderr. */
  error(msg: string): void {
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
    try {
      this.conn = await connect(this.uri, {
        readonly: this.opts.readonly,
        keepaliveInterval: this.opts.keepaliveInterval,
        keepaliveCount: this.opts.keepaliveCount,
      });
    } catch (err) {
      this.error('failed to connect to the hypervisor');
      throw new CommandFailed(new Error(await connectErrorText(err, this.uri)));
    }
    return this.conn;
  }

  async close(): Promise<void> {
    const c = this.conn;
    this.conn = null;
    if (c) await c.close().catch(() => undefined);
  }
}

/** libvirt's wording for a failed connect, from our transport's error. */
async function connectErrorText(err: unknown, uri: string | undefined): Promise<string> {
  const code = errnoCode(err);
  const { defaultUri, parseUri } = await import('../transport/uri.js');
  const target = uri || defaultUri();
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
