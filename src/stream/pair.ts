import { kDeliver, kDeliverEnd, kDeliverError, type StreamChannel } from '../channel.js';
import type { Chunk } from '../chunk.js';
import { SparsevirtError } from '../errors.js';
import { Stream } from './stream.js';

export interface StreamPairOptions {
  sparse: boolean;
  /** The receiver's window (data bytes queued before the sender's writes wait). Default 2 MiB. */
  highWaterMark?: number;
  /** Aborts both ends. */
  signal?: AbortSignal;
}

export interface StreamPair {
  sender: Stream;
  receiver: Stream;
}

const RESOLVED: Promise<void> = Promise.resolve();

/**
 * The wire between the two ends of an in-memory pair, playing the peer for each side the way
 * libvirt does:
 * - a write is delivered at once (the chunk object itself, no copy) and resolves when the
 *   receiver is below its window — so at most one chunk past the window is ever queued;
 * - the sender's finish delivers EOF and resolves when the receiver acknowledged (finish);
 * - the receiver's finish before EOF stops the sender (it sees `finishedByPeer`);
 * - an abort on either side fails the other with ERR_ABORTED.
 */
class PairLink {
  sender!: Stream;
  receiver!: Stream;
  /** Either end aborted, or the receiver finished: the sender's calls need no answer any more. */
  private closed = false;
  private receiverPaused = false;
  private eofDelivered = false;
  private resumeWriter: (() => void) | undefined;
  private ackResolve: (() => void) | undefined;
  private ackReject: ((err: Error) => void) | undefined;

  // ---- the sender's channel

  senderWrite(chunk: Chunk): Promise<void> {
    if (this.closed) return RESOLVED; // the sender's stream was already told why
    this.receiver[kDeliver](chunk);
    if (!this.receiverPaused) return RESOLVED;
    return new Promise<void>((resolve) => {
      this.resumeWriter = resolve;
    });
  }

  senderFinish(): Promise<void> {
    if (this.closed) return RESOLVED;
    this.eofDelivered = true;
    const ack = new Promise<void>((resolve, reject) => {
      this.ackResolve = resolve;
      this.ackReject = reject;
    });
    this.receiver[kDeliverEnd]();
    return ack;
  }

  senderAbort(reason: Error): Promise<void> {
    if (this.closed) return RESOLVED;
    this.close();
    this.receiver[kDeliverError](new SparsevirtError('ERR_ABORTED', 'the sending side aborted the stream', { cause: reason }));
    return RESOLVED;
  }

  // ---- the receiver's channel

  receiverFinish(): Promise<void> {
    if (this.closed) return RESOLVED;
    this.close();
    if (this.eofDelivered) {
      const resolve = this.ackResolve;
      this.ackResolve = this.ackReject = undefined;
      resolve?.(); // the acknowledgement the sender's finish waits for
    } else {
      this.sender[kDeliverEnd](); // finished early: the sender stops
    }
    return RESOLVED;
  }

  receiverAbort(reason: Error): Promise<void> {
    if (this.closed) return RESOLVED;
    this.close();
    const err = new SparsevirtError('ERR_ABORTED', 'the receiving side aborted the stream', { cause: reason });
    this.sender?.[kDeliverError](err); // undefined only while createStreamPair() runs
    const reject = this.ackReject;
    this.ackResolve = this.ackReject = undefined;
    reject?.(err);
    return RESOLVED;
  }

  pauseReceiver(): void {
    this.receiverPaused = true;
  }

  resumeReceiver(): void {
    this.receiverPaused = false;
    this.releaseWriter();
  }

  private close(): void {
    this.closed = true;
    this.releaseWriter();
  }

  private releaseWriter(): void {
    const resume = this.resumeWriter;
    this.resumeWriter = undefined;
    resume?.();
  }
}

class SenderChannel implements StreamChannel {
  constructor(private readonly link: PairLink) {}
  write(chunk: Chunk): Promise<void> {
    return this.link.senderWrite(chunk);
  }
  finish(): Promise<void> {
    return this.link.senderFinish();
  }
  abort(reason: Error): Promise<void> {
    return this.link.senderAbort(reason);
  }
  pauseIncoming(): void {} // nothing flows towards the sender
  resumeIncoming(): void {}
}

class ReceiverChannel implements StreamChannel {
  constructor(private readonly link: PairLink) {}
  write(): Promise<void> {
    return Promise.reject(new SparsevirtError('ERR_STREAM_STATE', 'the receiving end of a stream pair cannot write'));
  }
  finish(): Promise<void> {
    return this.link.receiverFinish();
  }
  abort(reason: Error): Promise<void> {
    return this.link.receiverAbort(reason);
  }
  pauseIncoming(): void {
    this.link.pauseReceiver();
  }
  resumeIncoming(): void {
    this.link.resumeReceiver();
  }
}

/**
 * Two connected streams in memory: what `sender` sends, `receiver` receives, with libvirt's
 * finish/abort handshakes and a bounded window. For tests and local copies.
 */
export function createStreamPair(options: StreamPairOptions): StreamPair {
  const link = new PairLink();
  const sparse = options.sparse;
  // With an already-aborted signal each end aborts in its constructor; the link tolerates
  // the other end not existing yet (see `sender?.`).
  link.receiver = new Stream(new ReceiverChannel(link), {
    sparse, highWaterMark: options.highWaterMark, signal: options.signal, direction: 'recv',
  });
  link.sender = new Stream(new SenderChannel(link), { sparse, signal: options.signal, direction: 'send' });
  return { sender: link.sender, receiver: link.receiver };
}

export interface CopyChunksOptions {
  /** Let holes travel as holes (default true); false materialises them as zeros. */
  sparse?: boolean;
  highWaterMark?: number;
  signal?: AbortSignal;
}

/**
 * Copy `source` into `sink` through a stream pair: the sink gets the receiving stream as an
 * `AsyncIterable<Chunk>` and its result is returned. Backpressure flows from the sink to the
 * source. If the sink returns before the end, the stream is finished early and the source
 * stops; if either side fails, the other is aborted and the original error is thrown.
 */
export async function copyChunks<T>(
  source: AsyncIterable<Chunk>,
  sink: (chunks: AsyncIterable<Chunk>) => Promise<T>,
  options: CopyChunksOptions = {},
): Promise<T> {
  const { sender, receiver } = createStreamPair({
    sparse: options.sparse ?? true, highWaterMark: options.highWaterMark, signal: options.signal,
  });
  const consume = async (): Promise<T> => {
    try {
      const result = await sink(receiver);
      if (receiver.state === 'open') await receiver.finish(); // returned early: stop the source
      return result;
    } catch (err) {
      await receiver.abort(err);
      throw err;
    }
  };
  const [sent, got] = await Promise.allSettled([sender.sendChunks(source), consume()]);
  // Both may fail, one because of the other: report the side that failed first. The side that
  // caused it aborted its own stream; the other one only 'failed' (it was told by the peer).
  if (got.status === 'rejected' && (sent.status === 'fulfilled' || receiver.state === 'aborted')) throw got.reason;
  if (sent.status === 'rejected') throw sent.reason;
  if (got.status === 'rejected') throw got.reason;
  return got.value;
}
