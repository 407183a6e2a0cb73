/**
 * vol-upload and vol-download: virsh 9.0's steps and messages, phase by phase (open the local
 * file, open the stream, move the data, close the file, finish), on the client library's
 * streams; the data moves through the transfer module (`transfer/`), as it does for the client
 * and the daemon. Plus, beyond virsh: a progress bar on
 * a terminal, a --verbose summary, --json, --length honoured on upload, --sparse-fallback, and
 * SIGINT, SIGTERM and SIGHUP stopping a transfer cleanly (the stream aborted on the wire, a
 * file the download created removed).
 *
 * No call is made while a stream is open: everything the command needs from the server (the
 * volume's size for the progress bar) is asked before the stream is opened, as virsh makes all
 * its calls before it. A reply queued behind a stream's data would wait for the data to be read.
 */
import fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { LEGACY_PAYLOAD_MAX, type Chunk, type WrittenRange } from '../chunk.js';
import type { StorageVol } from '../client/index.js';
import type { Stream } from '../stream/index.js';
import { receiveTo, sendFrom, type TransferBaseOptions } from '../transfer/index.js';
import { errorText, type Ctl } from './ctl.js';
import { catchInterrupts, onAbandon } from './exit.js';
import { strerror } from './format.js';
import { lookupVol, requiredOpt } from './lookup.js';
import { parseULongLong } from './numbers.js';
import { ProgressBar, summaryLine, type ProgressCounts } from './progress.js';
import { optBool, type ParsedCmd } from './vsh.js';

type Handler = (ctl: Ctl, cmd: ParsedCmd) => Promise<void>;

const CHUNK = LEGACY_PAYLOAD_MAX;

/** vshCommandOptULongLong(Wrap): absent = 0. */
function numberOpt(ctl: Ctl, cmd: ParsedCmd, name: string, wrap: boolean): bigint {
  const v = cmd.opts.get(name);
  if (v === undefined || v === true) return 0n;
  const n = parseULongLong(v, wrap);
  if (n === null) ctl.fail(`Numeric value '${v}' for <${name}> option is malformed or out of range`);
  return n!;
}

/** Byte counts for the library: offsets as they are; a length past 2^53 is "no limit" (0). */
function toOffset(n: bigint): number {
  return Number(n); // values past 2^53 are refused by the library with a clear error
}
function toLength(n: bigint): number {
  return n > BigInt(Number.MAX_SAFE_INTEGER) ? 0 : Number(n);
}

/** What virsh prints after "cannot upload to / download from volume X". */
function openStreamDetail(err: unknown, verb: 'upload' | 'download'): unknown {
  if ((err as { code?: string }).code === 'ERR_SPARSE_UNSUPPORTED') {
    const why = (err as { cause?: unknown }).cause;
    return new Error(`the server refused the sparse flag${why ? ` (${errorText(why)})` : ''}: it does not support sparse ${verb}s; ` +
      'run without --sparse, or add --sparse-fallback to fall back to a plain transfer');
  }
  return err;
}

/** A local I/O failure in the data phase, as libvirt's stream helpers word it. */
function handlerDetail(err: unknown, which: 'send' | 'recv'): unknown {
  if (err instanceof HandlerError) return err;
  const code = (err as { code?: string }).code;
  const errno = typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) && !code.startsWith('ERR_');
  if (code === 'ERR_IO' || errno) return new Error(`${which} handler failed: ${strerror(err)}`);
  return err;
}

interface Meter {
  counts: ProgressCounts;
  bar: ProgressBar | null;
  start: number;
}

/** What the transfer module is told of the meter: its counters, redrawn as they grow. */
function meterOptions(m: Meter, signal: AbortSignal): TransferBaseOptions {
  return { signal, counts: m.counts, onProgress: m.bar ? (c) => m.bar!.update(c) : undefined };
}

function makeMeter(ctl: Ctl, verb: string, total: number | null): Meter {
  const tty = ctl.io.stderrTTY;
  const start = performance.now();
  const bar = total !== null && tty ? new ProgressBar(tty, { verb, total }) : null;
  ctl.statusLine = bar;
  return { counts: { dataBytes: 0, holeBytes: 0 }, bar, start };
}

/** Whether a progress bar is drawn: on a terminal, not with -q. */
function wantsBar(ctl: Ctl): boolean {
  return !!ctl.io.stderrTTY && !ctl.quiet;
}

function finishMeter(ctl: Ctl, cmd: ParsedCmd, m: Meter, verb: string, ok: boolean, result: Omit<TransferJson, 'bytes' | 'data' | 'holes' | 'seconds' | 'rate'>): void {
  if (m.bar) {
    if (ok) m.bar.draw();
    m.bar.clear();
    if (ctl.statusLine === m.bar) ctl.statusLine = null;
  }
  if (!ok) return;
  const seconds = (performance.now() - m.start) / 1000;
  if (optBool(cmd, 'verbose')) ctl.io.err(summaryLine(verb, m.counts, seconds));
  if (optBool(cmd, 'json')) {
    const { dataBytes, holeBytes } = m.counts;
    const json: TransferJson = {
      ...result, bytes: dataBytes + holeBytes, data: dataBytes, holes: holeBytes,
      seconds: Math.round(seconds * 1e6) / 1e6, rate: seconds > 0 ? Math.round(dataBytes / seconds) : 0,
    };
    ctl.print(`${JSON.stringify(json, null, 2)}\n`);
  }
}

/** --json of vol-upload and vol-download (key names shared with the other commands: README). */
interface TransferJson {
  name: string;
  pool: string;
  file: string;
  sparse: boolean;
  offset: number;
  /** Bytes the transfer covered: data + holes. */
  bytes: number;
  /** Bytes that travelled as data. */
  data: number;
  /** Bytes that travelled as holes. */
  holes: number;
  seconds: number;
  /** Data bytes per second. */
  rate: number;
}

/**
 * SIGINT, SIGTERM and SIGHUP abort the transfer (its stream is aborted, a created file removed).
 * The first one is remembered on the Ctl, which ends the run by it once the command cleaned up.
 */
function onInterrupt(ctl: Ctl, ac: AbortController): () => void {
  return catchInterrupts(ac, (signal) => {
    ctl.interrupted ??= signal;
  });
}

/** The failure to report for an error of the data phase: the signal's, when one stopped it. */
function dataDetail(err: unknown, signal: AbortSignal, which: 'send' | 'recv'): unknown {
  if (signal.aborted && signal.reason instanceof Error) return signal.reason;
  return handlerDetail(err, which);
}

/** `cannot read FILE: No such file or directory`: virsh's words, then the system's reason. */
function withReason(msg: string, err: unknown): string {
  return `${msg}: ${strerror(err)}`;
}

async function* readSequential(fh: FileHandle, length: number, signal: AbortSignal): AsyncGenerator<Chunk> {
  let left = length > 0 ? length : Infinity;
  while (left > 0 && !signal.aborted) {
    const buf = Buffer.allocUnsafe(Math.min(CHUNK, left));
    const { bytesRead } = await fh.read(buf, 0, buf.length, null);
    if (bytesRead === 0) return;
    left -= bytesRead;
    yield { kind: 'data', bytes: buf.subarray(0, bytesRead) };
  }
}

/** A failure virsh words itself (the message is final). */
class HandlerError extends Error {}

/**
 * Data to a pipe, a terminal or a character device, written in order. virsh makes a hole with
 * lseek + ftruncate, which such targets refuse: a hole fails the same way here (a sparse
 * download to a pipe fails with virsh too; without --sparse there are no holes).
 */
async function writeSequential(fh: FileHandle, st: fs.Stats, batches: AsyncIterable<ReadonlyArray<Chunk | WrittenRange>>, signal: AbortSignal): Promise<void> {
  const { isatty } = await import('node:tty');
  for await (const batch of batches) {
    for (const c of batch) {
      signal.throwIfAborted();
      // (no written ranges: this sink never asks for in-place receiving)
      if (c.kind === 'data') {
        await writeFully(fh, c.bytes);
      } else {
        const espipe = st.isFIFO() || st.isSocket() || isatty(fh.fd);
        throw new HandlerError(`recv holeHandler failed: ${espipe ? 'Illegal seek' : 'Invalid argument'}`);
      }
    }
  }
}

async function writeFully(fh: FileHandle, b: Buffer): Promise<void> {
  for (let off = 0; off < b.length;) {
    const { bytesWritten } = await fh.write(b, off, b.length - off, null);
    off += bytesWritten;
  }
}

const volUpload: Handler = async (ctl, cmd) => {
  const offset = numberOpt(ctl, cmd, 'offset', false);
  const length = toLength(numberOpt(ctl, cmd, 'length', true));
  const { vol, name } = await lookupVol(ctl, cmd);
  const file = requiredOpt(ctl, cmd, 'file');
  let fh: FileHandle;
  try {
    fh = await fs.promises.open(file, fs.constants.O_RDONLY);
  } catch (err) {
    return ctl.fail(withReason(`cannot read ${file}`, err));
  }
  let fileOpen = true;
  const ac = new AbortController();
  const signal = ac.signal;
  const stopInterrupt = onInterrupt(ctl, ac);
  let meter: Meter | null = null;
  /** Whether the stream is sparse (not when --sparse-fallback fell back to a plain one). */
  let sparse = false;
  let ok = false;
  try {
    let st: fs.Stats;
    try {
      st = await fh.stat();
    } catch (err) {
      return ctl.fail(withReason(`unable to stat ${file}`, err));
    }
    const seekable = st.isFile() || st.isBlockDevice();
    const size = st.isFile() ? st.size : 0;
    let stream: Stream;
    try {
      stream = await vol.upload({ offset: toOffset(offset), length, sparse: optBool(cmd, 'sparse'), fallbackToPlain: optBool(cmd, 'sparse-fallback'), signal });
    } catch (err) {
      return ctl.fail(`cannot upload to volume ${name}`, signal.aborted ? signal.reason : openStreamDetail(err, 'upload'));
    }
    sparse = stream.sparse;
    meter = makeMeter(ctl, 'upload', wantsBar(ctl) ? (length > 0 && (size === 0 || length < size) ? length : size) : null);
    try {
      // a file or a block device is read sparse (a plain stream sends its holes as zeros); a
      // pipe or a terminal in order
      await sendFrom(stream, seekable ? { fd: fh.fd } : readSequential(fh, length, signal), { ...meterOptions(meter, signal), length: length || undefined });
    } catch (err) {
      await stream.abort(err).catch(() => undefined);
      return ctl.fail(`cannot send data to volume ${name}`, dataDetail(err, signal, 'send'));
    }
    fileOpen = false;
    try {
      await fh.close();
    } catch (err) {
      await stream.abort().catch(() => undefined);
      return ctl.fail(withReason(`cannot close file ${file}`, err));
    }
    try {
      await stream.finish();
    } catch (err) {
      return ctl.fail(`cannot close volume ${name}`, err);
    }
    ok = true;
  } finally {
    stopInterrupt();
    if (meter) finishMeter(ctl, cmd, meter, 'upload', ok, { name: vol.name, pool: vol.pool, file, sparse, offset: Number(offset) });
    if (fileOpen) await fh.close().catch(() => undefined);
  }
};

const volDownload: Handler = async (ctl, cmd) => {
  const offset = numberOpt(ctl, cmd, 'offset', false);
  const length = toLength(numberOpt(ctl, cmd, 'length', true));
  const { vol, name } = await lookupVol(ctl, cmd);
  const file = requiredOpt(ctl, cmd, 'file');
  // The progress bar's total, asked before the stream opens (see the top).
  let total: number | null = null;
  if (wantsBar(ctl)) total = await downloadTotal(vol, Number(offset), length).catch(() => 0);
  const { O_WRONLY, O_CREAT, O_EXCL, O_TRUNC } = fs.constants;
  let fh: FileHandle;
  let created = false;
  try {
    fh = await fs.promises.open(file, O_WRONLY | O_CREAT | O_EXCL, 0o666);
    created = true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') return ctl.fail(withReason(`cannot create ${file}`, err));
    try {
      fh = await fs.promises.open(file, O_WRONLY | O_TRUNC, 0o666);
    } catch (err2) {
      return ctl.fail(withReason(`cannot create ${file}`, err2));
    }
  }
  // A process that ends before this command does still removes the file it created.
  const keepFile = created ? onAbandon(() => fs.rmSync(file, { force: true })) : () => undefined;
  let fileOpen = true;
  const ac = new AbortController();
  const signal = ac.signal;
  const stopInterrupt = onInterrupt(ctl, ac);
  let meter: Meter | null = null;
  /** Whether the stream is sparse (not when --sparse-fallback fell back to a plain one). */
  let sparse = false;
  let ok = false;
  try {
    let st: fs.Stats;
    try {
      st = await fh.stat();
    } catch (err) {
      return ctl.fail(withReason(`unable to stat ${file}`, err));
    }
    let stream: Stream;
    try {
      stream = await vol.download({ offset: toOffset(offset), length, sparse: optBool(cmd, 'sparse'), fallbackToPlain: optBool(cmd, 'sparse-fallback'), signal });
    } catch (err) {
      return ctl.fail(`cannot download from volume ${name}`, signal.aborted ? signal.reason : openStreamDetail(err, 'download'));
    }
    sparse = stream.sparse;
    meter = makeMeter(ctl, 'download', total);
    const hook = process.env.SPARSEVIRT_TEST_HOOK;
    if (hook === 'stall-download' || hook === 'hang-download') await stallForTest(vol, hook === 'stall-download');
    try {
      // A file or a block device: the file is empty (created or truncated), so holes are simply
      // skipped; a trailing one sets the size, as virsh's lseek + ftruncate. Large packets go
      // into it in place. A pipe, a terminal or a character device: written in order.
      const target = st.isFile() || st.isBlockDevice() ? { fd: fh.fd } : { write: (src: AsyncIterable<Array<Chunk | WrittenRange>>) => writeSequential(fh, st, src, signal) };
      // (the end of the data is acknowledged as it comes, before the file is closed)
      await receiveTo(stream, target, { ...meterOptions(meter, signal), finish: true });
    } catch (err) {
      await stream.abort(err).catch(() => undefined);
      return ctl.fail(`cannot receive data from volume ${name}`, dataDetail(err, signal, 'recv'));
    }
    fileOpen = false;
    try {
      await fh.close();
    } catch (err) {
      await stream.abort().catch(() => undefined);
      return ctl.fail(withReason(`cannot close file ${file}`, err));
    }
    try {
      // (receiving to the end already acknowledged the end of the stream)
      if (stream.state !== 'finished') await stream.finish();
    } catch (err) {
      return ctl.fail(`cannot close volume ${name}`, err);
    }
    ok = true;
  } finally {
    stopInterrupt();
    if (meter) finishMeter(ctl, cmd, meter, 'download', ok, { name: vol.name, pool: vol.pool, file, sparse, offset: Number(offset) });
    if (fileOpen) await fh.close().catch(() => undefined);
    if (!ok && created) await fs.promises.unlink(file).catch(() => undefined);
    keepFile();
  }
};

/**
 * Test hooks (SPARSEVIRT_TEST_HOOK): the download waits forever for something that never comes.
 * `stall-download`: with the connection no longer read, as when a reply is stuck behind unread
 * stream data; nothing is left for the event loop, and the run must end as an error, not as a
 * success. `hang-download`: with the connection still read; the process waits, and a signal
 * stops it.
 */
async function stallForTest(vol: StorageVol, pause: boolean): Promise<never> {
  if (pause) {
    const client = await import('../client/connection.js');
    vol.conn[client.kPeer].pauseReading();
  }
  return new Promise<never>(() => undefined);
}

/** Bytes a download will cover: capacity − offset, or `length` when smaller (progress only). */
async function downloadTotal(vol: StorageVol, offset: number, length: number): Promise<number> {
  const { capacity } = await vol.info();
  const rest = Math.max(0, capacity - offset);
  return length > 0 ? Math.min(length, rest) : rest;
}

export const handlers: Record<string, Handler> = { 'vol-upload': volUpload, 'vol-download': volDownload };
