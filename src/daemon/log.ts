/**
 * The daemon's log. A `Logger` writes each record to its outputs (`log-outputs.ts`: stderr, a
 * file, journald), each with its own least level, in one of two formats:
 *
 * - `json`: one object per line, `{"time":"…","level":"info","msg":"listening","address":"unix:/run/…"}`;
 * - `journal`: sd-daemon's `<N>` priority prefix and no timestamp (journald adds its own),
 *   `<6>listening address=unix:/run/…`, for stderr when it is the journal and for journald.
 *
 * A logger and its children share one configuration, so `reconfigure` (SIGHUP) changes the level
 * and the outputs of every child at once. Small on purpose: no dependency, no buffering beyond
 * the outputs' own.
 */
export const LOG_LEVELS = ['debug', 'info', 'warn', 'error', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 };

/** syslog priorities (sd-daemon(3)): debug 7, info 6, warning 4, error 3. */
const PRIORITY: Record<Exclude<LogLevel, 'silent'>, number> = { debug: 7, info: 6, warn: 4, error: 3 };

export type LogFields = Record<string, unknown>;
export type LogFormat = 'json' | 'journal';

/** Where records go. */
export interface LogOutput {
  /** The least level written here (the logger's own level applies first). */
  readonly level: LogLevel;
  readonly format: LogFormat;
  /** How the configuration names it, for messages: `3:stderr`, `1:file:/var/log/x.log`. */
  readonly name: string;
  write(line: string): void;
  /** Called when a reconfiguration drops the output (files and sockets are closed). */
  close?(): void;
}

/** An output around a function, for tests and embedders: every level, JSON lines. */
export function sinkOutput(sink: (line: string) => void, format: LogFormat = 'json', level: LogLevel = 'debug'): LogOutput {
  return { level, format, name: 'sink', write: sink };
}

export function rankOf(level: LogLevel): number {
  return RANK[level];
}

interface LogConfig {
  level: LogLevel;
  min: number;
  outputs: LogOutput[];
}

export class Logger {
  readonly #config: LogConfig;
  readonly #base: LogFields;

  /**
   * `new Logger(level, sink)`: JSON lines through `sink` (default: stderr). `Logger.create` takes
   * outputs instead.
   */
  constructor(level: LogLevel = 'info', sink: (line: string) => void = (line) => process.stderr.write(line), base: LogFields = {}, config?: LogConfig) {
    this.#config = config ?? { level, min: RANK[level], outputs: [sinkOutput(sink)] };
    this.#base = base;
  }

  static create(level: LogLevel, outputs: LogOutput[]): Logger {
    return new Logger(level, undefined, {}, { level, min: RANK[level], outputs: [...outputs] });
  }

  get level(): LogLevel {
    return this.#config.level;
  }

  get outputs(): readonly LogOutput[] {
    return this.#config.outputs;
  }

  /**
   * New level, and new outputs if given, for this logger and all loggers sharing its
   * configuration. Outputs no longer listed are closed.
   */
  reconfigure(level: LogLevel, outputs?: LogOutput[]): void {
    const c = this.#config;
    c.level = level;
    c.min = RANK[level];
    if (outputs) {
      const old = c.outputs;
      c.outputs = [...outputs];
      for (const o of old) {
        if (!outputs.includes(o)) {
          try {
            o.close?.();
          } catch {
            // closing a broken output is not worth a failure
          }
        }
      }
    }
  }

  /** A logger that adds `fields` to every record (e.g. the client id). */
  child(fields: LogFields): Logger {
    return new Logger(this.#config.level, undefined, { ...this.#base, ...fields }, this.#config);
  }

  enabled(level: LogLevel): boolean {
    const r = RANK[level];
    return r >= this.#config.min && this.#config.outputs.some((o) => r >= RANK[o.level]);
  }

  debug(msg: string, fields?: LogFields): void {
    if (this.#config.min <= 10) this.write('debug', msg, fields);
  }
  info(msg: string, fields?: LogFields): void {
    if (this.#config.min <= 20) this.write('info', msg, fields);
  }
  warn(msg: string, fields?: LogFields): void {
    if (this.#config.min <= 30) this.write('warn', msg, fields);
  }
  error(msg: string, fields?: LogFields): void {
    if (this.#config.min <= 40) this.write('error', msg, fields);
  }

  private write(level: Exclude<LogLevel, 'silent'>, msg: string, fields?: LogFields): void {
    const r = RANK[level];
    let json: string | undefined;
    let journal: string | undefined;
    for (const out of this.#config.outputs) {
      if (r < RANK[out.level]) continue;
      let line: string;
      if (out.format === 'json') line = json ??= jsonLine(level, msg, { ...this.#base, ...fields });
      else line = journal ??= journalLine(level, msg, { ...this.#base, ...fields });
      try {
        out.write(line);
      } catch {
        // a broken output must not take the daemon down
      }
    }
  }
}

function jsonLine(level: LogLevel, msg: string, fields: LogFields): string {
  const rec = { time: new Date().toISOString(), level, msg, ...fields };
  try {
    return `${JSON.stringify(rec, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}\n`;
  } catch {
    return `${JSON.stringify({ time: rec.time, level, msg })}\n`;
  }
}

/** `<6>msg key=value key="a value"`: one line whatever the values hold (journald splits at newlines). */
function journalLine(level: Exclude<LogLevel, 'silent'>, msg: string, fields: LogFields): string {
  let line = `<${PRIORITY[level]}>${msg.replace(/\n/g, ' ')}`;
  for (const [k, v] of Object.entries(fields)) {
    if (v === undefined) continue;
    line += ` ${k}=${journalValue(v)}`;
  }
  return `${line}\n`;
}

function journalValue(v: unknown): string {
  if (typeof v === 'string') return /^[^\s"=\\]+$/.test(v) ? v : JSON.stringify(v);
  if (typeof v === 'bigint') return v.toString();
  if (typeof v === 'number' || typeof v === 'boolean' || v === null) return String(v);
  try {
    return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x)) ?? String(v);
  } catch {
    return JSON.stringify(String(v));
  }
}

export function isLogLevel(s: string): s is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(s);
}
