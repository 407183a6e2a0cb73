/**
 * The daemon's log: one JSON object per line on stderr (or any sink), e.g.
 * `{"time":"2026-01-01T00:00:00.000Z","level":"info","msg":"listening","address":"unix:/run/…"}`.
 * Small on purpose: no dependency, no buffering beyond the stream's own.
 */
export const LOG_LEVELS = ['debug', 'info', 'warn', 'error', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 };

export type LogFields = Record<string, unknown>;

export class Logger {
  private readonly min: number;
  constructor(
    readonly level: LogLevel = 'info',
    private readonly sink: (line: string) => void = (line) => process.stderr.write(line),
    private readonly base: LogFields = {},
  ) {
    this.min = RANK[level];
  }

  /** A logger that adds `fields` to every line (e.g. the client id). */
  child(fields: LogFields): Logger {
    return new Logger(this.level, this.sink, { ...this.base, ...fields });
  }

  enabled(level: LogLevel): boolean {
    return RANK[level] >= this.min;
  }

  debug(msg: string, fields?: LogFields): void {
    if (this.min <= 10) this.write('debug', msg, fields);
  }
  info(msg: string, fields?: LogFields): void {
    if (this.min <= 20) this.write('info', msg, fields);
  }
  warn(msg: string, fields?: LogFields): void {
    if (this.min <= 30) this.write('warn', msg, fields);
  }
  error(msg: string, fields?: LogFields): void {
    if (this.min <= 40) this.write('error', msg, fields);
  }

  private write(level: LogLevel, msg: string, fields?: LogFields): void {
    const rec = { time: new Date().toISOString(), level, msg, ...this.base, ...fields };
    let line: string;
    try {
      line = JSON.stringify(rec, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));
    } catch {
      line = JSON.stringify({ time: rec.time, level, msg });
    }
    try {
      this.sink(`${line}\n`);
    } catch {
      // a broken log sink must not take the daemon down
    }
  }
}

export function isLogLevel(s: string): s is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(s);
}
