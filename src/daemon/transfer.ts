/**
 * vol-upload / vol-download on the daemon side: libvirt's semantics around the transfer module
 * (`transfer/`), which moves the data between the stream and the volume's side.
 *
 * The volume's side is its backend's reader or writer (backend.ts); for a dir pool, these are the
 * file's: `fileSendBatches` and `writeChunks`; for an rbd pool, librbd's.
 *
 * Download: the reader's batches (dir: SEEK_DATA/SEEK_HOLE; from a file in memory, ranges that the
 * socket takes by sendfile or reads into its batch) → `sendFrom` → `WireStream`: one hole packet
 * per hole region (trailing hole included), data in packets ≤ 262120 bytes, EOF as an empty
 * STREAM/CONTINUE; an offset at or past the end is an empty stream (libvirt 9.0 fails there: libvirt-quirks download-past-end-fails).
 * Backpressure: each batch waits for the socket. Small packets to a libvirt client are paced (`Pacer`).
 *
 * Upload: `receiveTo` → the writer at `offset` (dir: `writeChunks`): holes read back as zeros even over old
 * data and the volume is never truncated (libvirt 9.0 does both wrong: libvirt-quirks upload-holes-truncate). Bytes past `length`
 * fail the stream with libvirt's ENOSPC error. Data or a hole past the volume's end grows it, as
 * libvirt does (up to 2^53 bytes). A packet that fails the stream (past `length`, or one the rpc
 * layer refuses) never costs what came before it: all of that is written first. The client's
 * finish is confirmed only once every byte is written and the file closed; a failure there is
 * reported instead of the OK.
 */
import { RemoteError, type SparsevirtError } from '../errors.js';
import { bufferStats } from '../io/pools.js';
import { releaseFreeMemory } from '../io/sys.js';
import type { WireStream } from '../rpc/peer.js';
import { kDeliver, kDeliverEnd, kDeliverError, kDirectTarget, type DirectTarget, type StreamInbound } from '../channel.js';
import { Stream } from '../stream/index.js';
import { Pacer, receiveTo, sendFrom, type TransferLimit } from '../transfer/index.js';
import { CODE, DOMAIN, streamNoSpace, systemError, virError } from './errors.js';
import type { Logger } from './log.js';
import type { Volume, VolumeReader, VolumeWriter } from './backend.js';

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
/** Incoming data queued per upload before the socket is paused. */
const UPLOAD_WINDOW = 4 << 20;

export interface TransferSpec {
  /** The volume's side: what a download reads, or what an upload writes into (opened by its backend at `offset`). */
  end: { kind: 'download'; reader: VolumeReader } | { kind: 'upload'; writer: VolumeWriter };
  vol: Volume;
  wire: WireStream;
  offset: number;
  /** Bytes to move; null = no limit (length 0, or ≥ 2^53). */
  length: number | null;
  sparse: boolean;
  log: Logger;
}

/** `length` as libvirt reads it: 0 means no limit; so does anything past 2^53 (virsh sends 2^64−1 for -1). */
export function transferLength(length: bigint): number | null {
  return length === 0n || length > MAX_SAFE ? null : Number(length);
}

/** How long a paced download waits per small packet (see `Pacer`). */
export { PACE_US } from '../transfer/index.js';

/** Transfers running in this process. */
let running = 0;

/** One stream in flight on a connection. */
export class Transfer {
  readonly stream: Stream;
  private stopped: RemoteError | null = null;
  private readonly started = Date.now();
  dataBytes = 0;
  holeBytes = 0;
  private pacer: Pacer | null = null;
  private readonly batchesAtStart: number;
  /**
   * Upload: the error of a packet the rpc layer refused, held back until every chunk that came
   * before it is written (the stream itself would drop what it still queues).
   */
  private refused: Error | null = null;
  /** The error of the upload's limit that ended it (length, 2^53), if one did. */
  private limitHit: RemoteError | null = null;
  /** The volume's reader or writer closing (once). */
  private closing: Promise<void> | null = null;

  constructor(readonly spec: TransferSpec) {
    this.stream = new Stream(spec.wire, {
      sparse: spec.sparse,
      direction: spec.end.kind === 'upload' ? 'recv' : 'send',
      highWaterMark: UPLOAD_WINDOW,
    });
    spec.wire.attach(spec.end.kind === 'upload' ? this.uploadInbound() : this.stream);
    this.batchesAtStart = bufferStats.outputBatches;
  }

  /**
   * What the wire delivers to, for an upload: the stream, except that a packet the wire refused
   * ends the stream's data like a finish would, and `received()` raises the refusal once the
   * chunks before it are taken. Anything else that ends the wire (the client's abort, a lost
   * connection) still drops what is queued, as libvirt does.
   */
  private uploadInbound(): StreamInbound {
    const stream = this.stream;
    return {
      [kDeliver]: (chunk) => stream[kDeliver](chunk),
      [kDirectTarget]: (length: number): DirectTarget | null => stream[kDirectTarget](length),
      [kDeliverEnd]: () => stream[kDeliverEnd](),
      [kDeliverError]: (err: Error) => {
        const code = (err as SparsevirtError).code;
        if ((code !== 'ERR_PROTOCOL' && code !== 'ERR_STREAM_NOT_SPARSE') || this.refused !== null) {
          stream[kDeliverError](err);
          return;
        }
        this.refused = err;
        stream[kDeliverEnd]();
      },
    };
  }

  /** Runs the transfer to its end; never rejects (outcomes are logged). Closes the volume's reader or writer. */
  async run(): Promise<void> {
    const { spec } = this;
    const { end } = spec;
    let outcome = 'ok';
    let error: string | undefined;
    running++;
    try {
      if (end.kind === 'download') outcome = await this.download(end.reader);
      else outcome = await this.upload(end.writer);
    } catch (err) {
      outcome = 'failed';
      error = (err as Error).message;
    } finally {
      await this.closeEnd();
      // the last transfer of the process: the heap's free memory goes back (see releaseFreeMemory)
      if (--running === 0) releaseFreeMemory();
    }
    const kind = end.kind;
    spec.log.info(`${kind} ${outcome}`, {
      pool: spec.vol.pool.name, vol: spec.vol.name, sparse: spec.sparse, offset: spec.offset, length: spec.length,
      dataBytes: this.dataBytes, holeBytes: this.holeBytes,
      // bytes the kernel passed from the file to the socket (sendfile)
      ...(kind === 'download' ? { sendfileBytes: spec.wire.stats.sendfileBytes } : {}),
      // bytes that went from the socket into the volume by splice, never through a buffer (uploads)
      ...(kind === 'upload' ? { splicedBytes: spec.wire.stats.splicedBytes } : {}),
      // times a download of small packets waited for a client without a deep queue (see Pacer)
      ...(this.pacer !== null ? { pacedWaits: this.pacer.waits } : {}),
      // output batch buffers the process had to allocate meanwhile (the rest came from its pool)
      newBatches: bufferStats.outputBatches - this.batchesAtStart,
      ms: Date.now() - this.started, ...(error ? { error } : {}),
    });
  }

  /** Closes the volume's reader or writer, once (its failure is not the client's: ignored). */
  private closeEnd(): Promise<void> {
    const { end } = this.spec;
    this.closing ??= (end.kind === 'download' ? end.reader : end.writer).close().catch(() => undefined);
    return this.closing;
  }

  /**
   * Stop the transfer (daemon shutdown): the client gets a STREAM/ERROR with `err`; the run
   * loop then ends and closes the file.
   */
  abort(err: RemoteError): void {
    if (this.stopped) return;
    this.stopped = err;
    this.fail(err);
  }

  /** Report `err` to the client as STREAM/ERROR (libvirt's fields as they are), then drop the stream. */
  private fail(err: RemoteError): Promise<void> {
    return this.stream.abort(err);
  }

  private async download(reader: VolumeReader): Promise<string> {
    const { spec, stream } = this;
    // a client without a deep queue (virsh, any libvirt client) gets its small packets paced
    const pacer = spec.wire.deepQueue ? undefined : new Pacer();
    this.pacer = pacer ?? null;
    try {
      await sendFrom(stream, reader, { counts: this, pacer });
    } catch (err) {
      if (stream.state === 'open') {
        // The file failed us, not the peer: tell the client why.
        const e = systemError('cannot read from stream', (err as { cause?: unknown }).cause ?? err, DOMAIN.STREAMS);
        await this.fail(e);
        throw e;
      }
      return this.endedByPeer(err);
    }
    try {
      await stream.finish(); // EOF; resolves on the client's finish (which the wire confirms)
    } catch (err) {
      return this.endedByPeer(err);
    }
    return 'ok';
  }

  private async upload(writer: VolumeWriter): Promise<string> {
    const { spec, stream } = this;
    try {
      // held to the upload's limits (length, 2^53), large packets written in place up to them;
      // a packet the wire refused ends the data, and fails the upload once what came before is written
      await receiveTo(stream, writer, {
        counts: this, offset: spec.offset, length: spec.length,
        limitError: (limit: TransferLimit) => {
          this.limitHit = limit === 'length' ? streamNoSpace() : uploadPastLimit(spec.vol.name);
          return this.limitHit;
        },
        endError: () => this.refused,
      });
    } catch (err) {
      // The answer that ends the upload (OK or ERROR) goes once the volume is closed: a client
      // that has it may open, check or remove the volume, and nothing here holds it any more.
      // Not when the writer itself failed: its close may wait on what failed it (an RBD pool's
      // on a cluster that stopped answering), and the client hears of the failure first.
      if (err === this.refused) {
        // the wire has told the client already; the stream goes too
        await this.closeEnd();
        await this.fail(toRemote(err));
        throw err;
      }
      if (stream.state !== 'open') return this.endedByPeer(err);
      // past a limit of the upload (length, 2^53) the writer is sound; anything else came from it
      if (err === this.limitHit) await this.closeEnd();
      const e = err instanceof RemoteError ? err : systemError('cannot write to stream', (err as { cause?: unknown }).cause ?? err, DOMAIN.STREAMS);
      await this.fail(e); // STREAM/ERROR to the client, also in place of the OK to its finish
      throw e;
    }
    await this.closeEnd();
    try {
      await stream.finish(); // everything is written and the volume closed: confirm the client's finish
    } catch (err) {
      return this.endedByPeer(err);
    }
    return 'ok';
  }

  /** The stream ended from the other side (abort, early finish, lost connection) or by shutdown. */
  private endedByPeer(err: unknown): string {
    if (this.stopped) return 'stopped by shutdown';
    const e = err as SparsevirtError;
    if (e?.code === 'ERR_ABORTED') return 'aborted by the client';
    if (e?.code === 'ERR_CONNECTION_CLOSED') return 'ended: connection closed';
    if (this.stream.finishedByPeer) return 'finished early by the client';
    throw err;
  }
}

/** The refusal for an upload that would write past 2^53 bytes, the largest offset sparsevirtd handles. */
export function uploadPastLimit(vol: string): RemoteError {
  return virError(CODE.OPERATION_UNSUPPORTED, DOMAIN.STREAMS,
    `upload to volume '${vol}' runs past 2^53 bytes, the largest volume sparsevirtd supports`);
}

/** A refusal from the rpc layer as the libvirt error it was sent as. */
function toRemote(err: unknown): RemoteError {
  return err instanceof RemoteError ? err : virError(CODE.RPC, DOMAIN.STREAMS, (err as Error).message);
}
