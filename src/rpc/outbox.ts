/**
 * What a connection sends, in order. Small frames (replies, holes, small data) are packed into
 * one output batch that is written once per tick: a file of 100,000 small extents becomes a few
 * thousand socket writes instead of 400,000. Large payloads are written beside their header,
 * never copied, and a payload that is a range of a file in memory goes by sendfile
 * (`SocketWriter.sendFile`).
 */
import type { FileRef } from '../chunk.js';
import { readFileRange } from '../chunk.js';
import { isLent, OUT_BATCH, payloadSent, recycleBatch, takeBatch } from '../io/pools.js';
import type { DataPathStats } from '../io/socket.js';
import type { SendfileCounter, SocketWriter } from '../io/socket-writer.js';
import { frameChannel } from '../diagnostics.js';
import { buildFrameHead, FRAME_OVERHEAD, writeFrameHead, type Header } from './message.js';
import { STREAM_HOLE_SIZE } from './structs.js';

/** Payloads up to this size are copied into the output batch; larger ones are written beside. */
const SMALL_PAYLOAD = 16 * 1024;
/** File data below this size is read into a buffer rather than passed by sendfile. */
const DIRECT_MIN = 64 * 1024;

/** An output batch: its writes not yet completed, and whether a newer batch replaced it. */
interface Batch {
  buf: Buffer;
  /** The same bytes, for frame heads: a DataView's stores compile to single instructions. */
  view: DataView;
  pending: number;
  retired: boolean;
}

export class Outbox {
  #batch: Batch | null = null;
  /** The batch's bytes from `start` to `end` are frames not yet handed to the socket. */
  #start = 0;
  #end = 0;
  #flushScheduled = false;
  readonly #head = Buffer.allocUnsafe(FRAME_OVERHEAD);
  #closed: Error | null = null;
  /** Called before each batch goes to the socket (a server sizes its send buffer there). */
  beforeBatch: (() => void) | null = null;

  constructor(
    private readonly writer: SocketWriter,
    private readonly stats: DataPathStats,
  ) {}

  /**
   * Queue a frame for the socket (see the top). A payload lent to the wire (`lendToWire`) is handed
   * back (`payloadSent`) once its bytes are copied into the batch, or once the socket's write of
   * it completed.
   */
  sendFrame(h: Header, payload?: Uint8Array): void {
    if (this.#closed) {
      if (payload) payloadSent(payload);
      return;
    }
    const n = payload ? payload.length : 0;
    if (frameChannel.hasSubscribers) frameChannel.publish({ dir: 'out', header: h, length: n });
    if (n > SMALL_PAYLOAD) {
      this.flush();
      this.writer.writeFrame(buildFrameHead(h, n), payload!, isLent(payload!) ? () => payloadSent(payload!) : undefined);
      return;
    }
    const total = FRAME_OVERHEAD + n;
    const batch = this.#reserve(total);
    putFrameHead(batch.view, this.#end, total, h);
    if (payload) {
      batch.buf.set(payload, this.#end + FRAME_OVERHEAD);
      payloadSent(payload);
    }
    this.#commit(total);
  }

  /**
   * A STREAM_HOLE frame (virStreamSendHole's payload: the length as a hyper, flags 0), built in
   * the output batch: one for each of 100,000 holes, without an encoder or a buffer each.
   */
  sendHoleFrame(h: Header, length: number): void {
    if (this.#closed) return;
    if (frameChannel.hasSubscribers) frameChannel.publish({ dir: 'out', header: h, length: STREAM_HOLE_SIZE });
    const total = FRAME_OVERHEAD + STREAM_HOLE_SIZE;
    const view = this.#reserve(total).view;
    const at = this.#end;
    putFrameHead(view, at, total, h);
    view.setUint32(at + FRAME_OVERHEAD, Math.floor(length / 2 ** 32));
    view.setUint32(at + FRAME_OVERHEAD + 4, length >>> 0);
    view.setUint32(at + FRAME_OVERHEAD + 8, 0);
    this.#commit(total);
  }

  /**
   * A frame whose payload is `length` bytes of `file` at `offset` (a file in memory: reading it
   * never waits for a disk). Small ones are read into the batch (two syscalls per packet cost
   * more than a copy), large ones handed to the kernel by sendfile where the socket allows it.
   * Returns null when the frame is on its way, or a promise of that (it stalled mid-payload; it
   * rejects if the file shrank under it); the file's bytes are read by then.
   */
  sendFileFrame(h: Header, file: FileRef, offset: number, length: number, counter: SendfileCounter): Promise<void> | null {
    if (this.#closed) return null;
    if (length < DIRECT_MIN) {
      if (length <= SMALL_PAYLOAD) this.#sendSmallFromFile(h, file, offset, length);
      else this.sendFrame(h, readFileRange({ kind: 'file', file, offset, length }));
      return null;
    }
    if (frameChannel.hasSubscribers) frameChannel.publish({ dir: 'out', header: h, length });
    this.flush();
    writeFrameHead(this.#head, 0, FRAME_OVERHEAD + length, h);
    const sent = this.writer.sendFile(this.#head, file, offset, length, counter);
    if (sent !== false) return sent;
    // (published above: the frame goes out once, read into a buffer)
    this.writer.writeFrame(buildFrameHead(h, length), readFileRange({ kind: 'file', file, offset, length }));
    this.stats.bufferedFrames++;
    return null;
  }

  /** A small frame whose payload is read from the file straight into the output batch. */
  #sendSmallFromFile(h: Header, file: FileRef, offset: number, length: number): void {
    if (frameChannel.hasSubscribers) frameChannel.publish({ dir: 'out', header: h, length });
    const total = FRAME_OVERHEAD + length;
    const batch = this.#reserve(total);
    // the payload first: a failed read leaves nothing half-made in the batch
    const at = this.#end + FRAME_OVERHEAD;
    file.readInto(offset, batch.buf.subarray(at, at + length));
    putFrameHead(batch.view, this.#end, total, h);
    this.#commit(total);
  }

  /** The output batch, with room for `total` more bytes at `end`. */
  #reserve(total: number): Batch {
    if (this.#batch === null || this.#end + total > OUT_BATCH) this.#newBatch();
    return this.#batch!;
  }

  /** The `total` bytes at `end` are a frame: it leaves with the batch, flushed on the next tick. */
  #commit(total: number): void {
    this.#end += total;
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      process.nextTick(this.#flushTick);
    }
  }

  readonly #flushTick = (): void => {
    this.#flushScheduled = false;
    this.flush();
  };

  /**
   * Flush and start a new output batch. The old one goes back to the pool once every write of it
   * completed (an upload of 100,000 small extents otherwise leaves 1,600 of them to the GC).
   */
  #newBatch(): void {
    this.flush();
    const old = this.#batch;
    if (old) {
      old.retired = true;
      if (old.pending === 0) recycleBatch(old.buf);
    }
    const buf = takeBatch();
    this.#batch = { buf, view: new DataView(buf.buffer, buf.byteOffset, buf.length), pending: 0, retired: false };
    this.#start = this.#end = 0;
  }

  /** Hand the batched frames to the socket (the bytes already handed over are never reused). */
  flush(): void {
    const batch = this.#batch;
    if (batch === null || this.#end === this.#start || this.#closed) return;
    const bytes = batch.buf.subarray(this.#start, this.#end);
    this.#start = this.#end;
    if (this.writer.holding) {
      // written later without a callback: never reused
      batch.pending = Infinity;
      this.writer.write(bytes);
      return;
    }
    this.beforeBatch?.();
    batch.pending++;
    let settled = false;
    const written = (): void => {
      if (settled) return;
      settled = true;
      if (--batch.pending === 0 && batch.retired) recycleBatch(batch.buf);
    };
    this.writer.write(bytes, written);
    // Nothing left in Node's queue: the kernel took the bytes during write(). The callback
    // comes on a later tick, and a sender that never waits (small packets into a deep socket
    // buffer) runs on microtasks, before any tick: without this, most batches of a download of
    // many small extents would be new allocations.
    if (this.writer.raw.socket.writableLength === 0) written();
  }

  /** Bytes written but not yet taken by the kernel, plus the batch. */
  get pendingBytes(): number {
    return this.writer.pendingBytes + (this.#end - this.#start);
  }

  /** Resolves when the socket can take more (immediately if it can); rejects once the connection is gone. */
  drained(): Promise<void> {
    if (this.#closed) return Promise.reject(this.#closed);
    this.flush();
    const frame = this.writer.frameOut;
    if (frame !== null) return frame.then(() => this.drained());
    return this.writer.drained();
  }

  /** While a frame is half out by sendfile (later frames held behind it): a promise of it being out. */
  get frameOut(): Promise<void> | null {
    return this.writer.frameOut;
  }

  /** The connection is gone: nothing more is sent, and a batch is not reused. */
  destroy(err: Error): void {
    this.#closed = err;
    this.#batch = null;
    this.writer.destroy();
  }
}

/** The length word and header of a frame at `off` of an output batch (which has room for them). */
function putFrameHead(view: DataView, off: number, frameLength: number, h: Header): void {
  view.setUint32(off, frameLength);
  view.setUint32(off + 4, h.prog);
  view.setUint32(off + 8, h.vers);
  view.setInt32(off + 12, h.proc);
  view.setInt32(off + 16, h.type);
  view.setUint32(off + 20, h.serial);
  view.setInt32(off + 24, h.status);
}
