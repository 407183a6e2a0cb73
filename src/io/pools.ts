/**
 * The data path's buffers, pooled process-wide: frame buffers that come back once their payload
 * is written (`releaseFramePayloads`), buffers a sender lends to the wire that come back once
 * their bytes are sent (`lendToWire`, `payloadSent`), a slab small frames are carved from, and the
 * output batches a connection packs small frames into.
 */

import { LEGACY_PAYLOAD_MAX } from '../chunk.js';

/** A whole data packet of libvirt's size with its 28-byte frame header. */
export const FRAME_BUFFER_SIZE = 28 + LEGACY_PAYLOAD_MAX;

/** A frame this big is stream data: it gets a buffer of its own, from the pool. */
export const BIG_FRAME = 64 * 1024;

/**
 * Frame buffers that held exactly one frame come back once the consumer is done with its
 * payload (`recycleFramePayload`, called by the file writer once the bytes landed): a long
 * download reuses the ~40 it holds at once (the stream's 4 MiB window, the writer's batch and
 * writes in flight) instead of leaving one 256 KiB buffer per packet to the GC, which keeps a
 * long download's peak memory about a quarter lower. At most 64 wait here (16 MiB), process-wide.
 */
const FRAME_POOL_MAX = 64;
const framePool: Buffer[] = [];
/** Buffers handed out whose single frame's payload may come back (keyed by ArrayBuffer). */
const recyclable = new WeakMap<ArrayBufferLike, Buffer>();

/** A buffer of `FRAME_BUFFER_SIZE` bytes for the next read, from the pool when it has one. */
export function takeFrameBuffer(): Buffer {
  const buf = framePool.pop();
  if (buf !== undefined) return buf;
  bufferStats.frameBuffers++;
  return Buffer.allocUnsafeSlow(FRAME_BUFFER_SIZE);
}

/** A frame buffer that holds nothing any more (its frames were copied out): back to the pool. */
export function returnFrameBuffer(buf: Buffer): void {
  if (framePool.length < FRAME_POOL_MAX) framePool.push(buf);
}

/** `buf` holds one frame alone: once its payload comes back (`recycleFramePayload`), so does `buf`. */
export function recyclableOnce(buf: Buffer): void {
  recyclable.set(buf.buffer, buf);
}

/** Whether `payload` is a view of a frame buffer that `recycleFramePayload` would take back. */
export function isRecyclable(payload: Uint8Array): boolean {
  return recyclable.has(payload.buffer);
}

/** `payload`'s frame buffer is never to be reused (part of it has another holder): out of recycling. */
export function forgetRecyclable(payload: Uint8Array): void {
  recyclable.delete(payload.buffer);
}

/**
 * The payload of a received stream packet is written and will not be touched again: its frame
 * buffer may be reused. Anything else (other buffers, a payload that shares its buffer with
 * other frames, one already returned) is ignored.
 */
export function recycleFramePayload(payload: Buffer): void {
  const whole = recyclable.get(payload.buffer);
  if (whole === undefined) return;
  recyclable.delete(payload.buffer);
  returnFrameBuffer(whole);
}

/** `SparseWriterOptions.release` for chunks that came from a `Stream` over a connection. */
export function releaseFramePayloads(buffers: Buffer[]): void {
  for (const b of buffers) recycleFramePayload(b);
}

/**
 * The reverse direction: a sender whose data chunks are views of buffers of its own (a volume
 * reader's read buffers) lends each buffer to the wire for the bytes of it that go out as data
 * (`lendToWire`). A connection hands back every payload it is done with (`payloadSent`): written
 * to the socket (the socket's write completed, or failed and dropped it), or copied into an output
 * batch. Once all the bytes lent are back, the owner gets the buffer again (`back`) and may fill
 * it: a long download reuses the buffers it has in flight instead of leaving one per read to the
 * garbage collector. Bytes that never reach a connection (a stream aborted with data still in its
 * batch) never come back: the buffer is then left to the garbage collector, never reused. A
 * consumer of such chunks other than a connection keeps them as long as it likes (nothing is given
 * back). Keyed by ArrayBuffer: a lent buffer must have one of its own (`Buffer.allocUnsafeSlow`).
 */
interface Loan {
  /** Bytes lent and not back yet. */
  left: number;
  buf: Buffer;
  back: (buf: Buffer) => void;
}
const loans = new WeakMap<ArrayBufferLike, Loan>();
/** Loans made and not given back (a fast skip for connections that never see one). */
let loansOut = 0;

/**
 * `bytes` bytes of `buf` go to the wire as views of it (each byte once): `back(buf)` once they all
 * came back through `payloadSent`. `buf` must not be lent already.
 */
export function lendToWire(buf: Buffer, bytes: number, back: (buf: Buffer) => void): void {
  if (bytes <= 0) {
    back(buf);
    return;
  }
  if (loans.has(buf.buffer)) throw new Error('lendToWire: the buffer is lent already');
  loans.set(buf.buffer, { left: bytes, buf, back });
  loansOut++;
}

/** Whether `payload` is (a view of) a buffer lent to the wire: `payloadSent` is owed for it. */
export function isLent(payload: Uint8Array): boolean {
  return loansOut > 0 && loans.has(payload.buffer);
}

/**
 * The connection does not reference `payload` any more (written, copied, or dropped with its
 * connection): if it is a view of a lent buffer, its bytes are back. Anything else is ignored.
 */
export function payloadSent(payload: Uint8Array): void {
  if (loansOut === 0) return;
  const loan = loans.get(payload.buffer);
  if (loan === undefined) return;
  loan.left -= payload.length;
  if (loan.left > 0) return;
  loans.delete(payload.buffer);
  loansOut--;
  // more bytes back than were lent: the accounting is off, so the buffer is never reused
  if (loan.left === 0) loan.back(loan.buf);
}

/**
 * A buffer for one frame of `len` bytes, alone in it (assembled across reads, or copied out of a
 * shared read): a data packet's (64 KiB and more) comes from the pool and may come back.
 */
export function allocFrame(len: number): Buffer {
  if (len < BIG_FRAME) return slabFrame(len);
  if (len > FRAME_BUFFER_SIZE) return Buffer.allocUnsafe(len);
  const buf = takeFrameBuffer();
  recyclableOnce(buf);
  return buf.subarray(0, len);
}

/**
 * Small frames are carved out of a shared slab, as Node's own pool does for buffers under 4 KiB:
 * a 4 KiB data packet (4,124 bytes with its header) would otherwise be an ArrayBuffer of its
 * own, and 100,000 extents cost 100,000 allocations and their collection on the receiving side.
 * A slab lives as long as any frame in it is referenced.
 */
const SLAB = 128 * 1024;
let slab: Buffer | null = null;
let slabUsed = 0;

function slabFrame(len: number): Buffer {
  if (len > SLAB >>> 3) return Buffer.allocUnsafe(len);
  if (slab === null || slabUsed + len > SLAB) {
    slab = Buffer.allocUnsafeSlow(SLAB);
    slabUsed = 0;
  }
  const b = slab.subarray(slabUsed, slabUsed + len);
  slabUsed = (slabUsed + len + 7) & ~7;
  return b;
}

/** Buffers allocated by the data path, process-wide (tests check that pools are reused). */
export const bufferStats = { outputBatches: 0, frameBuffers: 0 };

/** Size of an output batch: small frames packed into one socket write. */
export const OUT_BATCH = 256 * 1024;

/** Output batch buffers whose every write completed, for the next batch (process-wide). */
const BATCH_POOL_MAX = 8;
const batchPool: Buffer[] = [];

/** An output batch of `OUT_BATCH` bytes, from the pool when it has one. */
export function takeBatch(): Buffer {
  const buf = batchPool.pop();
  if (buf !== undefined) return buf;
  bufferStats.outputBatches++;
  return Buffer.allocUnsafeSlow(OUT_BATCH);
}

/** A batch whose every write completed: it may be filled again. */
export function recycleBatch(buf: Buffer): void {
  if (batchPool.length < BATCH_POOL_MAX) batchPool.push(buf);
}
