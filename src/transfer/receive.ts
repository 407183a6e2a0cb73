/** The receiving direction: a stream → a file (or a writer). */
import { chunkLength, MAX_SAFE_BYTES, type Chunk, type FileRef, type WrittenRange } from '../chunk.js';
import { SparsevirtError } from '../errors.js';
import { releaseFramePayloads } from '../io/pools.js';
import { writeChunks, type FileTarget } from '../sparse/index.js';
import type { Stream } from '../stream/index.js';
import { abortStreamOn, countChunk, type TransferCounts, type TransferBaseOptions } from './shared.js';

export type ReceivedItem = Chunk | WrittenRange;

/** What a sink gets besides the chunks. */
export interface SinkHooks {
  /** Gives the rpc layer's frame buffers back for reuse, once their bytes landed. */
  release: (buffers: Buffer[]) => void;
  /**
   * The stream's in-place receiving (`Stream.receiveInto`, held to the transfer's limits): a
   * sink whose file lives in memory calls it with the file and the offset of stream position 0
   * (large packets then arrive as `WrittenRange`s, already in the file), and with null before
   * closing. A sink that cannot take it never calls it. Absent with `inPlace: false`.
   */
  receiveInto?: (target: { file: FileRef; base: number } | null) => unknown;
  signal?: AbortSignal;
}

/**
 * Where a transfer writes, besides a file: a pool backend's volume writer. `write` consumes the
 * batches in order (holes read back as zeros afterwards) and rejects on the first failure.
 */
export interface TransferSink {
  write(source: AsyncIterable<ReceivedItem[]>, hooks: SinkHooks): Promise<void>;
}

/** A file (a path, created or replaced; or an fd the caller owns), or a sink. */
export type TransferTarget = FileTarget | TransferSink;

/** Which limit a transfer would pass (`limitError`). */
export type TransferLimit = 'length' | 'max-offset';

export interface ReceiveOptions extends TransferBaseOptions {
  /**
   * Where stream position 0 lands: a file is written from there (default 0). A sink opened at
   * its own offset names that offset here, for the limits.
   */
  offset?: number;
  /**
   * Bytes to take at most (null or absent: no limit). Holes past it are cut off; data past it
   * fails the transfer with `limitError('length')`, once what fits was passed on.
   */
  length?: number | null;
  /**
   * The error for data that would pass `length`, or land past 2^53 bytes (`max-offset`); by
   * default ERR_IO and ERR_INVALID_ARG.
   */
  limitError?: (limit: TransferLimit) => Error;
  /** A file: make it end where the stream ends (default false: never shrunk). */
  truncate?: boolean;
  /** Offer the sink the stream's in-place receiving (default true). */
  inPlace?: boolean;
  /**
   * Asked at the end of the data: an error to fail with instead of ending (after every chunk
   * before it was passed on), or null.
   */
  endError?: () => Error | null;
}

/**
 * Writes everything `stream` (opened for receiving) brings into `target`, batches with one
 * promise each, held to the limits and counted as they pass. Holes are left unallocated where
 * the target allows, frame buffers go back to their pool once written, and large packets are
 * written in place where the file lives in memory. Resolves with the counts once the target
 * has all of it.
 */
export async function receiveTo(stream: Stream, target: TransferTarget, opts: ReceiveOptions = {}): Promise<TransferCounts> {
  const counts = opts.counts ?? { dataBytes: 0, holeBytes: 0 };
  const offset = opts.offset ?? 0;
  const limit = Math.min(offset + (opts.length ?? MAX_SAFE_BYTES), MAX_SAFE_BYTES);
  const hooks: SinkHooks = { release: releaseFramePayloads, signal: opts.signal };
  if (opts.inPlace !== false) {
    // large packets go into the file in place, up to where the limits stop them
    hooks.receiveInto = (t) => stream.receiveInto(t && { ...t, limit });
  }
  const state = new Received(stream, counts, offset, opts);
  const stopWatching = abortStreamOn(stream, opts.signal);
  try {
    if (isFileTarget(target)) {
      await writeChunks(target, state.batches(), { offset, truncate: opts.truncate, signal: opts.signal, release: hooks.release, receiveInto: hooks.receiveInto });
    } else {
      await target.write(state.batches(), hooks);
    }
    if (opts.finish && !state.ended && stream.state === 'open') {
      throw new SparsevirtError('ERR_ABORTED', 'the sink stopped before the end of the stream');
    }
  } catch (err) {
    if (opts.finish) await stream.abort(err);
    throw err;
  } finally {
    stopWatching();
  }
  return counts;
}

function isFileTarget(t: TransferTarget): t is FileTarget {
  return typeof t === 'string' || typeof (t as { fd?: unknown }).fd === 'number';
}

/** The received batches, counted and held to the limits. */
class Received {
  /** The end of the data came (and, with `finish`, was acknowledged). */
  ended = false;
  private readonly holesAsData: boolean;

  constructor(
    private readonly stream: Stream,
    private readonly counts: TransferCounts,
    private readonly offset: number,
    private readonly opts: ReceiveOptions,
  ) {
    this.holesAsData = !stream.sparse;
  }

  /**
   * One generator for the counts, the limits and the end, in batches (`recvBatch`): a layer per
   * check, or a promise per packet, costs more than the checks. Nothing past 2^53 bytes.
   */
  async *batches(): AsyncGenerator<ReceivedItem[]> {
    const { stream, counts, holesAsData, opts } = this;
    const limitError = opts.limitError ?? defaultLimitError;
    let left = opts.length ?? Number.POSITIVE_INFINITY;
    let at = this.offset;
    for (;;) {
      const batch = await stream.recvBatch();
      if (batch === null) {
        const err = opts.endError?.();
        if (err) throw err;
        if (opts.finish && stream.state === 'open') await stream.finish(); // acknowledge the end
        this.ended = true;
        return;
      }
      // null: the batch goes on as it came (nothing cut so far)
      let out: ReceivedItem[] | null = null;
      for (let i = 0; i < batch.length; i++) {
        const came = batch[i]!;
        let chunk = came;
        countChunk(counts, chunk, holesAsData);
        let n = chunkLength(chunk);
        // (a range written in place never passes the limits: the stream stops short of them)
        let overLength = false;
        if (n > left) {
          if (chunk.kind !== 'hole') overLength = true;
          n = left;
          chunk = cut(chunk, n);
        }
        left -= n;
        if (at + n > MAX_SAFE_BYTES) {
          const fits = out ?? batch.slice(0, i);
          if (MAX_SAFE_BYTES > at) fits.push(cut(chunk, MAX_SAFE_BYTES - at));
          opts.onProgress?.(counts);
          yield fits;
          throw limitError('max-offset');
        }
        at += n;
        if (out === null && chunk !== came) out = batch.slice(0, i);
        if (out !== null && n > 0) out.push(chunk);
        if (overLength) {
          opts.onProgress?.(counts);
          yield out!;
          throw limitError('length');
        }
      }
      opts.onProgress?.(counts);
      yield out ?? batch;
    }
  }
}

/** The first `n` bytes of a chunk. */
function cut(chunk: ReceivedItem, n: number): ReceivedItem {
  if (chunk.kind === 'data') return { kind: 'data', bytes: chunk.bytes.subarray(0, n) };
  return { ...chunk, length: n };
}

function defaultLimitError(limit: TransferLimit): SparsevirtError {
  return limit === 'length'
    ? new SparsevirtError('ERR_IO', 'the stream brings data past the length of the transfer')
    : new SparsevirtError('ERR_INVALID_ARG', 'the stream would write past 2^53 bytes');
}
