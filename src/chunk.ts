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

/** Largest stream data payload libvirt ever sends (256 KiB − 24-byte header). */
export const LEGACY_PAYLOAD_MAX = 262120;

/** Byte counts are `number`: exact up to 2^53. */
export const MAX_SAFE_BYTES = Number.MAX_SAFE_INTEGER;

export function chunkLength(c: Chunk): number {
  return c.kind === 'data' ? c.bytes.length : c.length;
}
