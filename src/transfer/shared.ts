/** What both directions of a transfer share: the counters, the common options, the abort. */
import { chunkLength, type Chunk, type FileRange, type WrittenRange } from '../chunk.js';
import { SparsevirtError } from '../errors.js';
import type { Stream } from '../stream/index.js';

/** Bytes a transfer moved so far. */
export interface TransferCounts {
  /** Bytes that travelled as data (on a stream without the sparse flag, holes too: they go as zeros). */
  dataBytes: number;
  /** Bytes that travelled as holes. */
  holeBytes: number;
}

export interface TransferBaseOptions {
  /**
   * Stops the transfer: the stream is aborted (the peer is told) and a step that waits (a read
   * of the source, a packet, a write) rejects at once with ERR_ABORTED, the reason as `cause`.
   */
  signal?: AbortSignal;
  /**
   * The counters to add to as chunks pass (default: new ones); the transfer returns them, and a
   * caller that passed its own sees them grow, also when the transfer fails.
   */
  counts?: TransferCounts;
  /** Called as chunks pass, once per batch of them, with the counters. */
  onProgress?: (counts: TransferCounts) => void;
  /**
   * Bring the stream to its end: a sender finishes it (resolving once the receiver confirmed), a
   * receiver acknowledges the end of the data before its sink sees it. On a failure the stream
   * is aborted with the error, which is rethrown (a sender whose receiver finished early
   * resolves). Default false: the stream is left as it is, for the caller to finish or abort.
   */
  finish?: boolean;
}

/** Adds `c` to `counts`: holes as holes on a sparse stream, as data (zeros) on a plain one. */
export function countChunk(counts: TransferCounts, c: Chunk | FileRange | WrittenRange, holesAsData: boolean): void {
  if (c.kind === 'hole' && !holesAsData) counts.holeBytes += c.length;
  else counts.dataBytes += chunkLength(c);
}

export function abortedError(signal: AbortSignal): SparsevirtError {
  return new SparsevirtError('ERR_ABORTED', 'the transfer was aborted', { cause: signal.reason });
}

/**
 * `it.next()`, rejected as soon as `signal` aborts, also while the source still waits (a pipe
 * or a peer that sends nothing). One listener per step, removed when the step settles: racing
 * every step against one long-lived promise would keep each step (and the batch it brought)
 * reachable from it until the end.
 */
export function nextUnlessAborted<T>(it: AsyncIterator<T>, signal: AbortSignal): Promise<IteratorResult<T>> {
  if (signal.aborted) return Promise.reject(abortedError(signal));
  return new Promise<IteratorResult<T>>((resolve, reject) => {
    const onAbort = (): void => reject(abortedError(signal));
    signal.addEventListener('abort', onAbort, { once: true });
    it.next().then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}

/** Aborts `stream` when `signal` aborts, until the returned function is called. */
export function abortStreamOn(stream: Stream, signal: AbortSignal | undefined): () => void {
  if (signal === undefined) return () => undefined;
  const onAbort = (): void => void stream.abort(signal.reason);
  if (signal.aborted) {
    onAbort();
    return () => undefined;
  }
  signal.addEventListener('abort', onAbort, { once: true });
  return () => signal.removeEventListener('abort', onAbort);
}
