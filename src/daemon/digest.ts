/**
 * SPARSEVIRT_VOL_CONTENT_DIGEST on the daemon: the content digest (`../digest.ts`) of a volume
 * range, read through the pool backend's sparse reader, so that holes cost nothing and data is
 * read once. The hashing runs on the process's digest workers (`../digest-workers.ts`), whole
 * 1 MiB blocks at a time: the data of a file in memory (a dir pool's) is read by the workers
 * themselves from its fd, any other reader's (RBD) is handed to them in buffers. This thread only
 * walks the reader's extents, so it keeps serving the daemon's other calls and streams (a download
 * of the volume being digested, say) while the workers hash. Asked while the caller's connection has
 * transfers running, the digest runs on the background workers (nice 10): it takes the CPU the
 * transfers leave instead of slowing them.
 */
import { DIGEST_NAME } from '../digest.js';
import { ParallelContentDigest, digestWorkers, type DigestWorkers } from '../digest-workers.js';
import { fdOf } from '../io/file.js';
import type { VolumeReader } from './backend.js';
import { CODE, storageError } from './errors.js';

/** The largest piece of a file without an fd read at once to be hashed. */
const READ_PIECE = 1 << 20;

/** Checks a range against the volume's size (`length` 0: to the end); the range's byte count. */
export function digestRange(size: bigint, offset: bigint, length: bigint): number {
  if (offset > size) throw storageError(CODE.INVALID_ARG, `offset ${offset} is past the end of the volume (${size} bytes)`);
  if (length === 0n) return Number(size - offset);
  if (length > size - offset) throw storageError(CODE.INVALID_ARG, `range ${offset}+${length} runs past the end of the volume (${size} bytes)`);
  return Number(length);
}

/**
 * The digest of what `reader` yields: `length` bytes from `offset`. Closes the reader (once the
 * workers are done with its file). `workers`: the process's pool (its background one with
 * `background`) unless given.
 */
export async function readerContentDigest(
  reader: VolumeReader, offset: number, length: number, opts: { workers?: DigestWorkers; background?: boolean } = {},
): Promise<{ algorithm: string; digest: string }> {
  const d = new ParallelContentDigest(offset, length, { workers: opts.workers ?? digestWorkers({ background: opts.background }) });
  let piece: Buffer | null = null;
  let pos = offset;
  try {
    for await (const batch of reader.batches()) {
      for (const c of batch) {
        if (c.kind === 'hole') {
          d.zeros(c.length);
          pos += c.length;
        } else if (c.kind === 'data') {
          await d.addBytes(pos, c.bytes);
          pos += c.bytes.length;
        } else {
          const fd = fdOf(c.file);
          if (fd >= 0) {
            await d.addFile(pos, c.length, fd, c.offset);
          } else {
            piece ??= Buffer.allocUnsafe(READ_PIECE);
            for (let at = 0; at < c.length; at += READ_PIECE) {
              const n = Math.min(READ_PIECE, c.length - at);
              const view = piece.subarray(0, n);
              c.file.readInto(c.offset + at, view);
              await d.addBytes(pos + at, view);
            }
          }
          pos += c.length;
        }
      }
    }
    return { algorithm: DIGEST_NAME, digest: await d.digest() };
  } finally {
    // the workers may still read the reader's fd
    await d.settle();
    await reader.close();
  }
}
