/**
 * Log outputs in libvirt's notation (`log_outputs`, virLogParseOutputs): `LEVEL:stderr`,
 * `LEVEL:file:PATH`, `LEVEL:journald`, several separated by blanks, LEVEL being libvirt's
 * 1 (debug), 2 (info), 3 (warning) or 4 (error).
 *
 * - stderr: JSON lines, or sd-daemon `<N>` lines when stderr is the journal (JOURNAL_STREAM
 *   names stderr's device and inode, as systemd sets it for a service's stdout/stderr).
 * - file: JSON lines appended (mode 0600); reopened at every reconfiguration, so SIGHUP after
 *   logrotate moved the file starts a new one.
 * - journald: a stream connection to journald's stdout socket (`/run/systemd/journal/stdout`),
 *   the protocol of sd_journal_stream_fd(3): a header, then `<N>` lines.
 */
import fs from 'node:fs';
import net from 'node:net';
import { SparsevirtError } from '../errors.js';
import type { LogFormat, LogLevel, LogOutput } from './log.js';

export type OutputSpec =
  | { level: LogLevel; kind: 'stderr' }
  | { level: LogLevel; kind: 'journald' }
  | { level: LogLevel; kind: 'file'; path: string };

/** libvirt's numeric levels. */
const LIBVIRT_LEVELS: Record<string, LogLevel> = { 1: 'debug', 2: 'info', 3: 'warn', 4: 'error' };
export const LIBVIRT_LEVEL_OF: Record<Exclude<LogLevel, 'silent'>, number> = { debug: 1, info: 2, warn: 3, error: 4 };

/** journald's socket for stream connections. */
export const JOURNAL_STDOUT_SOCKET = '/run/systemd/journal/stdout';

/** Parse `log_outputs`; throws an Error whose message is the reason (no file or line: the caller adds them). */
export function parseLogOutputs(text: string): OutputSpec[] {
  const specs: OutputSpec[] = [];
  for (const item of text.trim().split(/\s+/).filter(Boolean)) {
    const m = /^(\d+):([a-z]+)(?::(.*))?$/.exec(item);
    if (!m) throw new Error(`'${item}' is not LEVEL:OUTPUT (e.g. 3:stderr, 1:file:/var/log/sparsevirtd.log, 3:journald)`);
    const level = LIBVIRT_LEVELS[m[1]!];
    if (!level) throw new Error(`'${item}': level ${m[1]} is not 1 (debug), 2 (info), 3 (warning) or 4 (error)`);
    const kind = m[2]!;
    const arg = m[3];
    if (kind === 'stderr' || kind === 'journald') {
      if (arg !== undefined) throw new Error(`'${item}': ${kind} takes no argument`);
      specs.push({ level, kind });
    } else if (kind === 'file') {
      if (!arg?.startsWith('/')) throw new Error(`'${item}': file needs an absolute path (LEVEL:file:/PATH)`);
      specs.push({ level, kind, path: arg });
    } else {
      throw new Error(`'${item}': output '${kind}' is not supported (stderr, file, journald)`);
    }
  }
  if (specs.length === 0) throw new Error('no output given');
  return specs;
}

/** How a spec is written in the configuration. */
export function outputName(spec: OutputSpec): string {
  const n = LIBVIRT_LEVEL_OF[spec.level as Exclude<LogLevel, 'silent'>] ?? 1;
  return spec.kind === 'file' ? `${n}:file:${spec.path}` : `${n}:${spec.kind}`;
}

/**
 * Whether stderr is the journal: JOURNAL_STREAM is `DEVICE:INODE` of the stream systemd
 * connected, and it still names fd 2 (a child whose stderr was redirected inherits the variable).
 */
export function stderrIsJournal(env: NodeJS.ProcessEnv = process.env): boolean {
  const js = env.JOURNAL_STREAM;
  if (!js) return false;
  const m = /^(\d+):(\d+)$/.exec(js);
  if (!m) return false;
  try {
    const st = fs.fstatSync(2, { bigint: true });
    return st.dev === BigInt(m[1]!) && st.ino === BigInt(m[2]!);
  } catch {
    return false;
  }
}

export interface OpenOptions {
  env?: NodeJS.ProcessEnv;
  /** journald's stream socket (tests point it elsewhere). */
  journalSocket?: string;
  /** Where stderr lines go (default process.stderr). */
  stderr?: (line: string) => void;
  /** The identifier journald files records under. */
  identifier?: string;
}

export function stderrOutput(level: LogLevel = 'debug', o: OpenOptions = {}): LogOutput {
  const format: LogFormat = stderrIsJournal(o.env) ? 'journal' : 'json';
  const write = o.stderr ?? ((line: string) => void process.stderr.write(line));
  return { level, format, name: `${LIBVIRT_LEVEL_OF[level as Exclude<LogLevel, 'silent'>] ?? 1}:stderr`, write };
}

/**
 * Open the outputs of `specs`. Throws a SparsevirtError (ERR_IO) naming the output that cannot
 * be opened (a file in a missing directory, no journald).
 */
export function openOutputs(specs: OutputSpec[], o: OpenOptions = {}): LogOutput[] {
  const opened: LogOutput[] = [];
  try {
    for (const spec of specs) {
      const name = outputName(spec);
      if (spec.kind === 'stderr') opened.push({ ...stderrOutput(spec.level, o), name });
      else if (spec.kind === 'file') opened.push(fileOutput(spec.level, spec.path, name));
      else opened.push(journaldOutput(spec.level, name, o.journalSocket ?? JOURNAL_STDOUT_SOCKET, o.identifier ?? 'sparsevirtd'));
    }
  } catch (err) {
    for (const out of opened) out.close?.();
    throw err;
  }
  return opened;
}

function fileOutput(level: LogLevel, file: string, name: string): LogOutput {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT, 0o600);
  } catch (err) {
    throw new SparsevirtError('ERR_IO', `log output ${name}: cannot open '${file}': ${(err as Error).message}`, { cause: err });
  }
  let closed = false;
  return {
    level, format: 'json', name,
    write(line) {
      if (!closed) fs.writeSync(fd, line);
    },
    close() {
      if (closed) return;
      closed = true;
      fs.closeSync(fd);
    },
  };
}

function journaldOutput(level: LogLevel, name: string, socketPath: string, identifier: string): LogOutput {
  let st: fs.Stats;
  try {
    st = fs.statSync(socketPath);
  } catch (err) {
    throw new SparsevirtError('ERR_IO', `log output ${name}: journald is not running here (${socketPath}: ${(err as Error).message})`, { cause: err });
  }
  if (!st.isSocket()) throw new SparsevirtError('ERR_IO', `log output ${name}: ${socketPath} is not a socket`);
  const sock = net.createConnection({ path: socketPath });
  let broken = false;
  sock.on('error', (err) => {
    if (!broken) process.stderr.write(`sparsevirtd: log output ${name}: ${err.message}\n`);
    broken = true;
  });
  sock.unref();
  // identifier, unit id, default priority, level prefix, forward to syslog, kmsg, console
  sock.write(`${identifier}\n\n6\n1\n0\n0\n0\n`);
  return {
    level, format: 'journal', name,
    write(line) {
      if (!broken) sock.write(line);
    },
    close() {
      sock.end();
    },
  };
}
