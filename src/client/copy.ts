/**
 * A volume from one connection to another, straight through: the source's download stream feeds
 * the destination's upload stream batch by batch. Holes stay holes, nothing touches a local disk,
 * and memory is bounded by the two streams' windows: a slow destination stops reading the
 * source's socket, and so the source. The frame buffers packets arrive in are lent to the
 * destination's wire (`lendToWire`) and go back to the pool once its socket wrote their bytes,
 * however far behind the destination is, so a long copy reuses a few dozen of them.
 *
 * With `verify`, the content digest (`src/digest.ts`) of the range is taken on each side: by the
 * daemon where it offers it (sparsevirtd, without reading holes, on its digest workers), else
 * from the chunks on their way (a source) or by a sparse download of the stored range (a
 * destination), hashed here on the digest workers (`src/digest-workers.ts`) so that this thread
 * keeps moving the copy. The two daemons' digests run at once, after the copy: asked while the
 * copy runs, the source's took CPU from the copy's three processes, the source then outran the
 * destination, and the frames this process held for the destination stopped going back to the
 * pool (measured on 2 CPUs: ~180 MiB more memory and ~1 CPU second more here for a 2 GiB dense
 * copy, and no wall time saved). A mismatch names the first 1 MiB block that differs.
 *
 * A failure names its side (`source: …`, `destination: …`, and `side` on the error) and aborts
 * both streams: the destination never takes a partial copy for a whole one.
 */
import type { Chunk } from '../chunk.js';
import { ContentDigest, firstDifferingBlock } from '../digest.js';
import { ParallelContentDigest } from '../digest-workers.js';
import { RemoteError, SparsevirtError } from '../errors.js';
import { forgetRecyclable, isLent, isRecyclable, lendToWire, recycleFramePayload } from '../io/pools.js';
import type { Stream } from '../stream/index.js';
import { kPeer } from './connection.js';
import type { StorageVol } from './storage.js';

export interface CopyProgress {
  dataBytes: number;
  holeBytes: number;
  /** Bytes the copy covers in all (data and holes). */
  totalBytes: number;
}

export interface CopyOptions {
  /** Holes travel as holes (both sides must support sparse streams). */
  sparse?: boolean;
  /** Where the copy starts in both volumes. */
  offset?: number;
  /** Bytes to copy; 0 or absent: to the end of the source. */
  length?: number;
  /** Compare the content digests of the two ranges after the copy. */
  verify?: boolean;
  signal?: AbortSignal;
  onProgress?: (p: CopyProgress) => void;
}

export interface CopyResult extends CopyProgress {
  sparse: boolean;
  seconds: number;
  /** The range's content digest (hex), with `verify`. */
  digest?: string;
}

type Side = 'source' | 'destination';

/** An error of one side of the copy, named as such. */
function sideError(side: Side, err: unknown): SparsevirtError {
  if (err instanceof SparsevirtError && (err as { side?: Side }).side) return err;
  const e = err as Error;
  const code = err instanceof SparsevirtError ? err.code : 'ERR_COPY';
  const wrapped = new SparsevirtError(code, `${side}: ${e?.message ?? String(err)}`, { cause: err });
  (wrapped as { side?: Side }).side = side;
  if (err instanceof RemoteError) Object.assign(wrapped, { virCode: err.virCode, domain: err.domain });
  return wrapped;
}

async function onSide<T>(side: Side, p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (err) {
    throw sideError(side, err);
  }
}

/** Feeds `c`, at volume position `pos`, to `d`; the position after it. */
async function feed(d: ParallelContentDigest, pos: number, c: Chunk): Promise<number> {
  if (c.kind === 'hole') {
    d.zeros(c.length);
    return pos + c.length;
  }
  await d.addBytes(pos, c.bytes);
  return pos + c.bytes.length;
}

/**
 * The content digest of `length` bytes of `vol` from `offset`: asked of the daemon when it
 * offers it, else computed here from a sparse download (holes cost nothing).
 */
export async function volumeDigest(vol: StorageVol, offset: number, length: number, opts: { signal?: AbortSignal } = {}): Promise<string> {
  const asked = await vol.contentDigest(offset, length);
  if (typeof asked === 'string') return asked;
  if (length === 0) return new ContentDigest(offset, 0).digest();
  const d = new ParallelContentDigest(offset, length);
  const stream = await vol.download({ offset, length, sparse: true, fallbackToPlain: true, signal: opts.signal });
  let pos = offset;
  try {
    for (;;) {
      const batch = await stream.recvBatch();
      if (batch === null) break;
      for (const c of batch) pos = await feed(d, pos, c as Chunk);
    }
    await stream.finish();
  } catch (err) {
    await d.settle();
    await stream.abort(err).catch(() => undefined);
    throw err;
  }
  return d.digest();
}

/**
 * The received frame buffers of `batch` that go on to the destination are lent to its wire: each
 * comes back to the frame pool once the destination's socket wrote (or copied) all its bytes, and
 * the source's next packets are read into it. A frame buffer holds one packet's payload; should
 * one be handed over in parts across batches, it is taken out of recycling instead.
 */
function lendReceived(batch: ReadonlyArray<Chunk>): void {
  let parts: Map<ArrayBufferLike, { view: Buffer; bytes: number }> | null = null;
  for (const c of batch) {
    if (c.kind !== 'data') continue;
    if (isLent(c.bytes)) forgetRecyclable(c.bytes);
    else if (isRecyclable(c.bytes)) {
      parts ??= new Map();
      const p = parts.get(c.bytes.buffer);
      if (p) p.bytes += c.bytes.length;
      else parts.set(c.bytes.buffer, { view: c.bytes, bytes: c.bytes.length });
    }
  }
  if (parts) for (const { view, bytes } of parts.values()) lendToWire(view, bytes, recycleFramePayload);
}

/** Copy `src` into `dst` (which must exist): see the module's comment. */
export async function copyVolume(src: StorageVol, dst: StorageVol, opts: CopyOptions = {}): Promise<CopyResult> {
  const started = performance.now();
  const offset = opts.offset ?? 0;
  if (!Number.isSafeInteger(offset) || offset < 0) throw new SparsevirtError('ERR_INVALID_ARG', `offset must be a byte count, got ${offset}`);
  if (opts.length !== undefined && (!Number.isSafeInteger(opts.length) || opts.length < 0)) {
    throw new SparsevirtError('ERR_INVALID_ARG', `length must be a byte count, got ${opts.length}`);
  }
  opts.signal?.throwIfAborted();
  const srcInfo = await onSide('source', src.info());
  if (offset > srcInfo.capacity) {
    throw sideError('source', new SparsevirtError('ERR_INVALID_ARG', `offset ${offset} is past the end of the volume (${srcInfo.capacity} bytes)`));
  }
  const available = srcInfo.capacity - offset;
  const length = opts.length ? Math.min(opts.length, available) : available;
  const sparse = opts.sparse ?? false;
  const progress: CopyProgress = { dataBytes: 0, holeBytes: 0, totalBytes: length };
  const srcOffersDigest = opts.verify ? await onSide('source', src.contentDigestOffered()) : false;

  let up: Stream | null = null;
  let down: Stream | null = null;
  const abortBoth = async (err: unknown) => {
    await Promise.all([up?.abort(err).catch(() => undefined), down?.abort(err).catch(() => undefined)]);
  };
  // The destination first: a refusal there starts nothing at the source.
  up = await onSide('destination', dst.upload({ offset, length, sparse, signal: opts.signal }));
  try {
    down = await onSide('source', src.download({ offset, length, sparse, signal: opts.signal }));
  } catch (err) {
    await abortBoth(err);
    throw err;
  }

  // The source's digest: asked of its daemon after the copy, with the destination's (see the top),
  // else taken here from the chunks on their way (copied to the workers).
  const srcDigest = opts.verify && !srcOffersDigest ? new ParallelContentDigest(offset, length) : null;
  let srcPos = offset;

  const out = dst.conn[kPeer];
  // Busy polling after the source's reads (on for libvirtd: see io/busy-poll.ts) is for a client
  // that would otherwise sleep between packets; here the upload keeps this process busy, and a
  // polling loop would take a CPU from the two daemons (on 2 CPUs, libvirtd → sparsevirtd copies
  // took about twice as long with it).
  const inPeer = src.conn[kPeer];
  const busyPoll = [inPeer.busyPoll, out.busyPoll];
  inPeer.busyPoll = out.busyPoll = 0;
  try {
    for (;;) {
      const batch = (await onSide('source', down.recvBatch())) as Chunk[] | null;
      if (batch === null) break;
      for (const c of batch) {
        if (c.kind === 'hole') progress.holeBytes += c.length;
        else progress.dataBytes += c.bytes.length;
        if (srcDigest) srcPos = await feed(srcDigest, srcPos, c);
      }
      lendReceived(batch);
      await onSide('destination', up.sendBatch(batch));
      opts.onProgress?.(progress);
    }
    await onSide('source', down.finish());
    // a short source is never finished as a whole copy at the destination
    const copied = progress.dataBytes + progress.holeBytes;
    if (copied !== length) throw sideError('source', new SparsevirtError('ERR_COPY', `the stream ended after ${copied} of ${length} bytes`));
    await onSide('destination', up.finish());
  } catch (err) {
    await Promise.all([abortBoth(err), srcDigest?.settle()]);
    throw err;
  } finally {
    [inPeer.busyPoll, out.busyPoll] = busyPoll;
  }

  const digest = opts.verify
    ? await compareVolumes(src, dst, { offset, length, signal: opts.signal, sourceDigest: srcDigest?.digest() })
    : undefined;
  return { ...progress, sparse, seconds: (performance.now() - started) / 1000, ...(digest ? { digest } : {}) };
}

/**
 * Compare the content of `length` bytes from `offset` in two volumes by their digests; resolves
 * with the digest when they match, rejects with ERR_VERIFY_MISMATCH naming the first differing
 * 1 MiB block when they do not. `sourceDigest`: the source's, when known (or being computed).
 */
export async function compareVolumes(
  src: StorageVol, dst: StorageVol, opts: { offset: number; length: number; signal?: AbortSignal; sourceDigest?: string | Promise<string> },
): Promise<string> {
  const { offset, length } = opts;
  const digestOf = (side: Side, o: number, n: number) =>
    onSide(side, volumeDigest(side === 'source' ? src : dst, o, n, { signal: opts.signal }));
  const [a, b] = await Promise.all([
    opts.sourceDigest !== undefined ? onSide('source', Promise.resolve(opts.sourceDigest)) : digestOf('source', offset, length),
    digestOf('destination', offset, length),
  ]);
  if (a === b) return a;
  const at = await firstDifferingBlock(offset, length, digestOf);
  throw new SparsevirtError('ERR_VERIFY_MISMATCH',
    `verification failed: the destination differs from the source${at === null ? '' : ` from the 1 MiB block at byte ${at}`} (source ${a}, destination ${b})`);
}
