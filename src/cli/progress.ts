/**
 * The transfer progress bar (stderr, terminals only) and the --verbose summary line. Not in
 * virsh: nothing here ever writes to stdout, and nothing is drawn unless stderr is a TTY.
 */
import { clock, humanBytes, humanDuration } from './format.js';

export interface ProgressCounts {
  /** Bytes that travelled as data. */
  dataBytes: number;
  /** Bytes skipped as holes. */
  holeBytes: number;
}

export interface TtyLike {
  write(s: string): unknown;
  columns?: number;
}

export interface ProgressOptions {
  /** 'upload' or 'download'. */
  verb: string;
  /** Bytes the transfer will cover (0 = unknown: no percentage, bar or ETA). */
  total: number;
  /** Clock in ms (tests inject one). */
  now?: () => number;
  /** Least time between redraws, in ms (default 100: at most ~10 redraws a second). */
  interval?: number;
}

/**
 * One progress line: percentage and bar, bytes done of the total, holes skipped, data rate and
 * ETA. Pure: `elapsed` in seconds, `columns` the terminal width.
 */
export function renderProgress(c: ProgressCounts, total: number, elapsed: number, columns = 80, verb = 'transfer'): string {
  const done = c.dataBytes + c.holeBytes;
  const rate = elapsed > 0 ? c.dataBytes / elapsed : 0;
  const parts: string[] = [];
  parts.push(total > 0 ? `${humanBytes(done)} / ${humanBytes(total)}` : humanBytes(done));
  parts.push(`holes ${humanBytes(c.holeBytes)}`);
  parts.push(`${humanBytes(rate)}/s`);
  if (total > 0) {
    const speed = elapsed > 0 ? done / elapsed : 0;
    parts.push(done >= total ? 'ETA 0:00' : speed > 0 ? `ETA ${clock((total - done) / speed)}` : 'ETA --:--');
  }
  const tail = parts.join('  ');
  if (total <= 0) return `${verb} ${tail}`.slice(0, Math.max(1, columns - 1));
  const frac = Math.min(1, done / total);
  const pct = `${Math.floor(frac * 100)}%`.padStart(4);
  // verb, percentage, bar, details; the bar takes what is left (10..40 cells).
  const fixed = verb.length + 1 + pct.length + 1 + 2 + 1 + tail.length;
  const barWidth = Math.max(10, Math.min(40, columns - 1 - fixed));
  const filled = Math.round(frac * barWidth);
  const line = `${verb} ${pct} [${'#'.repeat(filled)}${'.'.repeat(barWidth - filled)}] ${tail}`;
  return line.length >= columns ? line.slice(0, Math.max(1, columns - 1)) : line;
}

/** The --verbose summary: `uploaded 1.08 GiB data + 14.9 GiB holes in 0.52 s (2.08 GiB/s)`. */
export function summaryLine(verb: string, c: ProgressCounts, seconds: number): string {
  const rate = seconds > 0 ? c.dataBytes / seconds : 0;
  return `${verb}ed ${humanBytes(c.dataBytes)} data + ${humanBytes(c.holeBytes)} holes in ${humanDuration(seconds)} (${humanBytes(rate)}/s)\n`;
}

/** Redraws a progress line on a terminal, at most every `interval` ms. */
export class ProgressBar {
  readonly #out: TtyLike;
  readonly #opts: Required<ProgressOptions>;
  readonly #start: number;
  #last = -Infinity;
  #drawn = false;
  #counts: ProgressCounts = { dataBytes: 0, holeBytes: 0 };

  constructor(out: TtyLike, opts: ProgressOptions) {
    this.#out = out;
    this.#opts = { now: () => performance.now(), interval: 100, ...opts };
    this.#start = this.#opts.now();
  }

  /** Latest counts; draws if the last redraw is old enough. */
  update(c: ProgressCounts): void {
    this.#counts = c;
    const t = this.#opts.now();
    if (t - this.#last < this.#opts.interval) return;
    this.#last = t;
    this.draw(t);
  }

  draw(t = this.#opts.now()): void {
    const line = renderProgress(this.#counts, this.#opts.total, (t - this.#start) / 1000, this.#out.columns || 80, this.#opts.verb);
    this.#out.write(`\r${line}\x1b[K`);
    this.#drawn = true;
  }

  /** Erases the line (the terminal is left as it was). */
  clear(): void {
    if (this.#drawn) this.#out.write('\r\x1b[K');
    this.#drawn = false;
  }
}
