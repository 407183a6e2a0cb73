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

/** Parts of a progress line, in the order they are shown. */
type Part = 'verb' | 'pct' | 'bar' | 'sizes' | 'holes' | 'rate' | 'eta';

/**
 * What a line shows, best first: the first layout that fits the terminal is drawn. Rate and ETA
 * are in every one; the holes, then the bar, then the byte counts, then the verb give way.
 */
const LAYOUTS: Part[][] = [
  ['verb', 'pct', 'bar', 'sizes', 'holes', 'rate', 'eta'],
  ['verb', 'pct', 'bar', 'sizes', 'rate', 'eta'],
  ['verb', 'pct', 'sizes', 'holes', 'rate', 'eta'],
  ['verb', 'pct', 'sizes', 'rate', 'eta'],
  ['verb', 'pct', 'bar', 'rate', 'eta'],
  ['verb', 'pct', 'rate', 'eta'],
  ['pct', 'rate', 'eta'],
  ['rate', 'eta'],
];
/** Bar cells: at least MIN_BAR (else the layout does not fit), at most MAX_BAR. */
const MIN_BAR = 10;
const MAX_BAR = 40;
/** The widest `humanBytes` gives: `1023 MiB`. */
const BYTES_WIDTH = 8;

/**
 * One progress line: verb, percentage and bar, bytes done of the total, holes skipped, data
 * rate and ETA, as many of them as fit in `columns` − 1 cells (the last column is left free, so
 * that no terminal wraps the line). Pure: `elapsed` in seconds.
 */
export function renderProgress(c: ProgressCounts, total: number, elapsed: number, columns = 80, verb = 'transfer'): string {
  const done = c.dataBytes + c.holeBytes;
  const rate = elapsed > 0 ? c.dataBytes / elapsed : 0;
  const known = total > 0;
  const frac = known ? Math.min(1, done / total) : 0;
  const speed = elapsed > 0 ? done / elapsed : 0;
  const text: Record<Exclude<Part, 'bar'>, string> = {
    verb,
    pct: `${Math.floor(frac * 100)}%`.padStart(4),
    sizes: known ? `${humanBytes(done)} / ${humanBytes(total)}` : humanBytes(done),
    holes: `holes ${humanBytes(c.holeBytes)}`,
    rate: `${humanBytes(rate)}/s`,
    eta: !known ? '' : done >= total ? 'ETA 0:00' : speed > 0 ? `ETA ${clock((total - done) / speed)}` : 'ETA --:--',
  };
  // Layouts are chosen by the widest each part can be, so that the line keeps its layout and
  // its bar keeps its length while the numbers change.
  const widest: Record<Exclude<Part, 'bar'>, number> = {
    verb: verb.length, pct: 4, sizes: known ? 2 * BYTES_WIDTH + 3 : BYTES_WIDTH, holes: 6 + BYTES_WIDTH, rate: BYTES_WIDTH + 2, eta: 12,
  };
  const width = Math.max(1, columns - 1);
  for (const layout of LAYOUTS) {
    // without a total there is no percentage, bar or ETA to show
    const parts = layout.filter((p) => known || (p !== 'pct' && p !== 'bar' && p !== 'eta'));
    const sep = (p: Part, i: number) => (i === 0 ? '' : p === 'pct' || p === 'bar' || parts[i - 1] === 'verb' || parts[i - 1] === 'bar' ? ' ' : '  ');
    const fixed = parts.reduce((n, p, i) => n + sep(p, i).length + (p === 'bar' ? 2 : widest[p]), 0);
    let cells = 0;
    if (parts.includes('bar')) {
      cells = Math.min(MAX_BAR, width - fixed);
      if (cells < MIN_BAR) continue;
    } else if (fixed > width) {
      continue;
    }
    const filled = Math.round(frac * cells);
    return parts.map((p, i) => sep(p, i) + (p === 'bar' ? `[${'#'.repeat(filled)}${'.'.repeat(cells - filled)}]` : text[p])).join('').trimStart();
  }
  // narrower than any layout: the rate, cut to the width
  return text.rate.slice(0, width);
}

/** The --verbose summary: `uploaded 1.08 GiB data + 14.9 GiB holes in 0.52 s (2.08 GiB/s)`. */
export function summaryLine(verb: string, c: ProgressCounts, seconds: number): string {
  const rate = seconds > 0 ? c.dataBytes / seconds : 0;
  return `${verb}ed ${humanBytes(c.dataBytes)} data + ${humanBytes(c.holeBytes)} holes in ${humanDuration(seconds)} (${humanBytes(rate)}/s)\n`;
}

/**
 * Redraws a progress line on a terminal, at most every `interval` ms; an update that comes too
 * soon is drawn when the interval is over, so that the line never shows old numbers while the
 * transfer waits (the timer does not keep the process alive).
 */
export class ProgressBar {
  readonly #out: TtyLike;
  readonly #opts: Required<ProgressOptions>;
  readonly #start: number;
  #last = -Infinity;
  #drawn = false;
  #pending: NodeJS.Timeout | null = null;
  #counts: ProgressCounts = { dataBytes: 0, holeBytes: 0 };

  constructor(out: TtyLike, opts: ProgressOptions) {
    this.#out = out;
    this.#opts = { now: () => performance.now(), interval: 100, ...opts };
    this.#start = this.#opts.now();
  }

  /** Latest counts; draws if the last redraw is old enough, else once it is. */
  update(c: ProgressCounts): void {
    this.#counts = c;
    const t = this.#opts.now();
    const wait = this.#last + this.#opts.interval - t;
    if (wait <= 0) {
      this.draw(t);
      return;
    }
    if (this.#pending) return;
    this.#pending = setTimeout(() => {
      this.#pending = null;
      this.draw();
    }, wait);
    this.#pending.unref();
  }

  draw(t = this.#opts.now()): void {
    this.#cancel();
    this.#last = t;
    const line = renderProgress(this.#counts, this.#opts.total, (t - this.#start) / 1000, this.#out.columns || 80, this.#opts.verb);
    this.#out.write(`\r${line}\x1b[K`);
    this.#drawn = true;
  }

  /** Erases the line (the terminal is left as it was). */
  clear(): void {
    this.#cancel();
    if (this.#drawn) this.#out.write('\r\x1b[K');
    this.#drawn = false;
  }

  #cancel(): void {
    if (this.#pending) clearTimeout(this.#pending);
    this.#pending = null;
  }
}
