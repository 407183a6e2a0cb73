/**
 * The one currency of sparsevirt: everything that moves volume contents speaks `Chunk`,
 * from the disk to the wire and back. A source is an `AsyncIterable<Chunk>`.
 *
 * - `data`: bytes at the current position (never empty on the data path).
 * - `hole`: `length` bytes (> 0) that read as zero and need not be stored.
 */
export type Chunk =
  | { kind: 'data'; bytes: Buffer }
  | { kind: 'hole'; length: number };

export type ChunkSource = AsyncIterable<Chunk>;

/**
 * A file opened below the streams, as the stream core sees it: an opaque handle, never an fd.
 * Only `io/` makes these (`fileRef`, exported by `sparsevirt/sparse`); a socket channel resolves
 * one to the kernel's file and hands its pages over (sendfile, splice) without the bytes passing
 * through a buffer. Anything else reads a range of it with `readInto`.
 */
export interface FileRef {
  /**
   * Fill all of `target` with the file's bytes at `offset` (the file is in memory: this never
   * waits for a disk). Throws a system error, or ERR_IO when the file ends first (it shrank).
   */
  readInto(offset: number, target: Buffer): void;
}

/**
 * Data that is still in a file in memory (tmpfs, ramfs): `length` bytes of `file` at `offset`.
 * Only `fileSendChunks`/`fileSendBatches` make these, for `Stream.sendFileRange`/`sendChunks`/
 * `sendBatch`: a socket can then take the file's pages by `sendfile(2)` instead of a read into a
 * buffer and a copy back out. Anything else reads it as the data chunk it stands for
 * (`readFileRange`).
 */
export interface FileRange {
  kind: 'file';
  file: FileRef;
  offset: number;
  length: number;
}

/**
 * The receiving side's counterpart: data the channel wrote into its consumer's file itself, where
 * the consumer asked for it (`Stream.receiveInto`): `length` bytes at `offset` of `file` now hold
 * it. Large packets from a socket go there by `splice(2)`, never through a buffer. With `error`,
 * writing them failed (the bytes are lost: the consumer reports the error as a failed write).
 * Only consumers that called `receiveInto` see these; `file` is the one they gave.
 */
export interface WrittenRange {
  kind: 'written';
  file: FileRef;
  offset: number;
  length: number;
  error?: Error;
}

/**
 * A batch: an array of chunks (or ranges) moved with one promise (`fileSendBatches`,
 * `Stream.sendBatch`, `Stream.recvBatch`, `SparseWriter.writeBatch`), where a source may also give
 * single chunks.
 */
export function isBatch<C>(v: C | readonly C[]): v is readonly C[] {
  return Array.isArray(v);
}

/** Largest stream data payload libvirt ever sends (256 KiB − 24-byte header). */
export const LEGACY_PAYLOAD_MAX = 262120;

/** Largest zero slice a hole is materialised as at once (1 MiB, what virsh zeroes devices with). */
export const ZERO_CHUNK_SIZE = 1 << 20;

let zeroBuffer: Buffer | undefined;

/**
 * A read-only view of `n` zero bytes: one buffer shared process-wide (1 MiB, grown if a larger
 * `n` is asked), so a hole read as zeros costs no memory of its own. Never write into it.
 */
export function zeroBytes(n: number): Buffer {
  if (zeroBuffer === undefined || n > zeroBuffer.length) zeroBuffer = Buffer.alloc(Math.max(n, ZERO_CHUNK_SIZE));
  return n === zeroBuffer.length ? zeroBuffer : zeroBuffer.subarray(0, n);
}

/** Whether every byte of `b` is zero (compared with the shared zero buffer, at most 1 MiB at a time). */
export function isAllZero(b: Uint8Array): boolean {
  zeroBuffer ??= Buffer.alloc(ZERO_CHUNK_SIZE);
  // compare(target, targetStart, targetEnd, sourceStart, sourceEnd): ranges, no views made
  for (let at = 0; at < b.length; at += ZERO_CHUNK_SIZE) {
    const n = Math.min(ZERO_CHUNK_SIZE, b.length - at);
    if (zeroBuffer.compare(b, at, at + n, 0, n) !== 0) return false;
  }
  return true;
}

/** Byte counts are `number`: exact up to 2^53. */
export const MAX_SAFE_BYTES = Number.MAX_SAFE_INTEGER;

/** The bytes a chunk (or a file range) covers in the stream. */
export function chunkLength(c: Chunk | FileRange | WrittenRange): number {
  return c.kind === 'data' ? c.bytes.length : c.length;
}

/** The bytes a `FileRange` (or a `WrittenRange`) stands for, read now (the file is in memory: this never waits on a disk). */
export function readFileRange(r: FileRange | WrittenRange): Buffer {
  const buf = Buffer.allocUnsafe(r.length);
  r.file.readInto(r.offset, buf);
  return buf;
}
