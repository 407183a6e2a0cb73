/**
 * SPARSEVIRT_VOL_CONTENT_DIGEST on the daemon: the content digest (`../digest.ts`) of a volume
 * range, read through the pool backend's sparse reader, so that holes cost nothing and data is
 * read once, the event loop turning between batches.
 */
import { ContentDigest, DIGEST_NAME } from '../digest.js';
import type { VolumeReader } from './backend.js';
import { CODE, storageError } from './errors.js';

/** The largest piece of a file range read at once to be hashed. */
const READ_PIECE = 1 << 20;

/** Checks a range against the volume's size (`length` 0: to the end); the range's byte count. */
export function digestRange(size: bigint, offset: bigint, length: bigint): number {
  if (offset > size) throw storageError(CODE.INVALID_ARG, `offset ${offset} is past the end of the volume (${size} bytes)`);
  if (length === 0n) return Number(size - offset);
  if (length > size - offset) throw storageError(CODE.INVALID_ARG, `range ${offset}+${length} runs past the end of the volume (${size} bytes)`);
  return Number(length);
}

/** The digest of what `reader` yields: `length` bytes from `offset`. Closes the reader. */
export async function readerContentDigest(reader: VolumeReader, offset: number, length: number): Promise<{ algorithm: string; digest: string }> {
  const d = new ContentDigest(offset, length);
  let piece: Buffer | null = null;
  try {
    for await (const batch of reader.batches()) {
      for (const c of batch) {
        if (c.kind !== 'file') {
          d.update(c);
          continue;
        }
        piece ??= Buffer.allocUnsafe(READ_PIECE);
        for (let at = 0; at < c.length; at += READ_PIECE) {
          const n = Math.min(READ_PIECE, c.length - at);
          const view = piece.subarray(0, n);
          c.file.readInto(c.offset + at, view);
          d.data(view);
        }
      }
    }
  } finally {
    await reader.close();
  }
  return { algorithm: DIGEST_NAME, digest: d.digest() };
}
