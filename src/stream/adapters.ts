import { Readable, Writable } from 'node:stream';
import type { Chunk } from '../chunk.js';
import { SparsevirtError } from '../errors.js';
import type { Stream } from './stream.js';
import { ZERO_CHUNK_SIZE, zeroBytes } from './zeros.js';

export interface ReadableOptions {
  /** 'zeros' (default): a byte-mode Readable, holes as zeros. 'chunks': objectMode, Chunks. */
  holes?: 'zeros' | 'chunks';
  /** The Readable's own buffer (Node's default if omitted); the stream's window comes on top. */
  highWaterMark?: number;
}

export interface WritableOptions {
  /** Accept Chunks as well as Buffers. Default false (Buffers only, byte mode). */
  objectMode?: boolean;
  highWaterMark?: number;
}

/**
 * Readable over a receiving stream, built on its chunk iterator: EOF acknowledges (finish)
 * before `end`; destroying the Readable early aborts the stream with the destroy error.
 *
 * Pulling is driven by `read()`: the pump runs while `push()` accepts more and stops when it
 * returns false, so nothing is taken from the stream's queue that the consumer did not ask
 * for — and the stream's own window then pauses the channel.
 */
export function streamToReadable(stream: Stream, options: ReadableOptions = {}): Readable {
  const holes = options.holes ?? 'zeros';
  if (holes !== 'zeros' && holes !== 'chunks') {
    throw new SparsevirtError('ERR_INVALID_ARG', `holes must be 'zeros' or 'chunks', got ${String(holes)}`);
  }
  const objectMode = holes === 'chunks';
  const chunks = stream[Symbol.asyncIterator](); // claims the read side now, or throws
  /** Zeros still to push for the current hole (byte mode): pushed in slices, with backpressure. */
  let holeLeft = 0;
  let pumping = false;

  const readable = new Readable({
    objectMode,
    highWaterMark: options.highWaterMark,
    read() {
      if (!pumping) void pump();
    },
    destroy(err, callback) {
      // With an error (pipeline failure): abort with it as the reason. Without: the iterator's
      // return() aborts, or acknowledges if EOF was already read; a no-op once it ended.
      const done = err !== null && stream.state === 'open' ? stream.abort(err) : chunks.return!();
      done.then(() => callback(err), (e: Error) => callback(err ?? e));
    },
  });

  async function pump(): Promise<void> {
    pumping = true;
    try {
      for (;;) {
        if (holeLeft !== 0) {
          const n = Math.min(holeLeft, ZERO_CHUNK_SIZE);
          holeLeft -= n;
          if (!readable.push(zeroBytes(n))) return;
          continue;
        }
        const r = await chunks.next();
        if (readable.destroyed) return;
        if (r.done === true) {
          readable.push(null);
          return;
        }
        const chunk = r.value;
        if (objectMode) {
          if (!readable.push(chunk)) return;
        } else if (chunk.kind === 'data') {
          if (!readable.push(chunk.bytes)) return;
        } else {
          holeLeft = chunk.length;
        }
      }
    } catch (err) {
      readable.destroy(err as Error);
    } finally {
      pumping = false;
    }
  }

  return readable;
}

/**
 * Writable over a sending stream. Each write is one `sendChunk` (data passed through, holes
 * merged or materialised as zeros on a non-sparse stream) and completes when the channel
 * took it: the Writable's buffering plus the channel's backpressure bound memory. `final`
 * finishes the stream; destroying the Writable before that aborts it.
 */
export function streamToWritable(stream: Stream, options: WritableOptions = {}): Writable {
  const objectMode = options.objectMode === true;
  return new Writable({
    objectMode,
    highWaterMark: options.highWaterMark,
    write(value: unknown, _encoding, callback) {
      const chunk = (Buffer.isBuffer(value) ? { kind: 'data', bytes: value } : value) as Chunk;
      stream.sendChunk(chunk).then(callback as () => void, callback);
    },
    final(callback) {
      stream.finish().then(callback as () => void, callback);
    },
    destroy(err, callback) {
      if (stream.state !== 'open' && stream.state !== 'finishing') {
        callback(err);
        return;
      }
      const reason = err ?? new SparsevirtError('ERR_ABORTED', 'the Writable was destroyed before it finished');
      stream.abort(reason).then(() => callback(err));
    },
  });
}
