/** The sending direction: a file (or a reader of batches) → a stream. */
import { chunkLength, isBatch, type Chunk, type FileRange } from '../chunk.js';
import { fileSendBatches, type FileTarget } from '../sparse/index.js';
import type { Stream } from '../stream/index.js';
import { PACED_DATA_MAX, type Pacer } from './pacer.js';
import { abortedError, abortStreamOn, countChunk, nextUnlessAborted, type TransferCounts, type TransferBaseOptions } from './shared.js';

export type SendItem = Chunk | FileRange;

/** Something that reads its content as batches when asked: a pool backend's volume reader. */
export interface BatchReader {
  batches(): AsyncIterable<ReadonlyArray<SendItem>>;
}

/**
 * What a transfer sends: a file (a path, or an fd the caller owns: a regular file or a block
 * device, read sparse, its ranges handed to the socket by sendfile where it lives in memory), a
 * reader of batches, or any source of chunks or batches of them (a pipe read in order).
 */
export type TransferSource = FileTarget | BatchReader | AsyncIterable<SendItem | ReadonlyArray<SendItem>>;

export interface SendOptions extends TransferBaseOptions {
  /** A file source: where reading starts (default 0). */
  offset?: number;
  /** A file source: bytes to send at most (default: to the end of the file). */
  length?: number;
  /** A file source: allocated runs of zeros go as holes too (reads every data byte: costs CPU). */
  detectZeroes?: boolean;
  /** Holds small packets back (see `Pacer`); its `waits` count the times it did. */
  pacer?: Pacer;
}

/**
 * Sends everything `source` holds on `stream` (opened for sending), batches with one promise
 * each, counting as they pass. Holes go as hole packets on a sparse stream, as zeros on a plain
 * one. Resolves with the counts once all is handed to the stream (with `finish`, once the
 * receiver confirmed); the source is closed on every way out.
 */
export async function sendFrom(stream: Stream, source: TransferSource, opts: SendOptions = {}): Promise<TransferCounts> {
  const counts = opts.counts ?? { dataBytes: 0, holeBytes: 0 };
  const { signal, onProgress, pacer } = opts;
  const holesAsData = !stream.sparse;
  const stopWatching = abortStreamOn(stream, signal);
  let it: AsyncIterator<SendItem | ReadonlyArray<SendItem>> | undefined;
  let sourceDone = false;
  try {
    it = items(source, opts)[Symbol.asyncIterator]();
    for (;;) {
      const r = signal ? await nextUnlessAborted(it, signal) : await it.next();
      if (r.done) {
        sourceDone = true;
        break;
      }
      const item = r.value;
      if (isBatch(item)) {
        for (let i = 0; i < item.length; i++) countChunk(counts, item[i]!, holesAsData);
        onProgress?.(counts);
        if (pacer === undefined) await stream.sendBatch(item);
        else for (let i = 0; i < item.length; i++) await sendPaced(stream, item[i]!, pacer);
      } else {
        countChunk(counts, item, holesAsData);
        onProgress?.(counts);
        if (pacer !== undefined) await sendPaced(stream, item, pacer);
        else if (item.kind === 'file') await stream.sendFileRange(item.file, item.offset, item.length);
        else await stream.sendChunk(item);
      }
    }
    if (signal?.aborted) throw abortedError(signal);
    if (opts.finish) await stream.finish();
  } catch (err) {
    if (!sourceDone && it?.return) {
      // (not awaited after an abort: a source stuck in a read ends once that read returns)
      const closing = it.return().catch(() => undefined);
      if (!signal?.aborted) await closing;
    }
    if (opts.finish) {
      if (stream.finishedByPeer) return counts; // the receiver needs no more: a normal end
      await stream.abort(err);
    }
    throw err;
  } finally {
    stopWatching();
  }
  return counts;
}

/** One item, after the pacer's wait when it is a small packet. */
async function sendPaced(stream: Stream, c: SendItem, pacer: Pacer): Promise<void> {
  if (c.kind === 'hole' || chunkLength(c) <= PACED_DATA_MAX) {
    const wait = pacer.next();
    if (wait !== null) await wait;
  }
  if (c.kind === 'file') await stream.sendFileRange(c.file, c.offset, c.length);
  else await stream.sendChunk(c);
}

function isFileTarget(s: TransferSource): s is FileTarget {
  return typeof s === 'string' || typeof (s as { fd?: unknown }).fd === 'number';
}

function items(source: TransferSource, opts: SendOptions): AsyncIterable<SendItem | ReadonlyArray<SendItem>> {
  if (isFileTarget(source)) {
    // holes are read as holes whatever the stream: a plain one sends them as zeros
    return fileSendBatches(source, { offset: opts.offset, length: opts.length, sparse: true, detectZeroes: opts.detectZeroes, signal: opts.signal });
  }
  if (typeof (source as BatchReader).batches === 'function') return (source as BatchReader).batches();
  return source as AsyncIterable<SendItem | ReadonlyArray<SendItem>>;
}
