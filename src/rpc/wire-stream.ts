/**
 * One stream on the wire: the `StreamChannel` a `Stream` talks to, turning its calls into
 * STREAM / STREAM_HOLE packets, and incoming packets into `StreamInbound` calls.
 *
 * Who says what (libvirt 9.0):
 *  - the producer sends data/holes; the daemon ends a download with an empty CONTINUE (EOF),
 *    the client ends an upload with STREAM/OK (finish);
 *  - the client acknowledges a download's EOF with STREAM/OK; the daemon confirms a client's
 *    finish or abort with STREAM/OK, or reports failure with STREAM/ERROR;
 *  - the client aborts with an empty STREAM/ERROR.
 *
 * What an incoming packet does is one lookup: `ON_PACKET[end][phase][packet]` (see below).
 */
import { kDeliver, kDeliverEnd, kDeliverError, kDirectTarget, type DirectTarget, type StreamChannel, type StreamInbound } from '../channel.js';
import type { Chunk, FileRange, FileRef, WrittenRange } from '../chunk.js';
import { SparsevirtError } from '../errors.js';
import { OwnedFd } from '../io/file.js';
import type { SendfileCounter } from '../io/socket-writer.js';
import { XdrReader } from '../xdr/index.js';
import { i32, MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, u32, type Header, type Message } from './message.js';
import { decodeRemoteError, encodeRemoteError, STREAM_HOLE_SIZE, streamHoleCodec, toRemoteFields } from './structs.js';

/** What a stream needs of its connection (the `Peer`). */
export interface StreamHost {
  readonly role: 'client' | 'server';
  readonly closed: boolean;
  readonly streamPacketMax: number;
  /** Bytes a stream may leave queued for the socket before it waits for room. */
  readonly sendWindow: number;
  readonly abortTimeout: number;
  /** Server: the client takes a deep queue of small packets (`Feature.SPARSEVIRT_DEEP_QUEUE`). */
  readonly deepQueue: boolean;
  readonly sendBufferIsBig: boolean;
  readonly outgoingBytes: number;
  sendFrame(h: Header, payload?: Uint8Array): void;
  sendHoleFrame(h: Header, length: number): void;
  sendFileFrame(h: Header, file: FileRef, offset: number, length: number, counter: SendfileCounter): Promise<void> | null;
  bigSendBuffer(big: boolean): void;
  drained(): Promise<void>;
  pauseReading(): void;
  resumeReading(): void;
  inPlaceReceiver(delta: number): void;
  streamClosed(s: WireStream): void;
}

/**
 * - open: data flows.
 * - ended: the peer's end of data arrived (a download's EOF at the client, the client's finish
 *   at the daemon): our finish (the acknowledgement) or abort comes next.
 * - finishing: our finish (or the daemon's EOF) is sent; the peer's confirmation is awaited.
 * - aborting: the client's abort is sent; its confirmation is awaited.
 * - closed: done cleanly. failed: done with an error (ours or the peer's).
 */
type State = 'open' | 'ended' | 'finishing' | 'aborting' | 'closed' | 'failed';

/** Which end of the stream this side is: the role in libvirt's protocol, and who sends the data. */
type End = 'client-sends' | 'client-receives' | 'server-sends' | 'server-receives';

/** What the table is read by: ended reads as open; closed and failed take no packets. */
type Phase = 'open' | 'finishing' | 'aborting';

/** An incoming packet: data (CONTINUE with a payload), EOF (an empty CONTINUE), a hole, OK, ERROR. */
type Packet = 'data' | 'eof' | 'hole' | 'ok' | 'error';

type Action =
  /** Data or a hole for the consumer. */
  | 'deliver'
  /** The peer's end of data. */
  | 'end'
  /** Nothing to do: data to the side that sends it, or still in flight after our finish/abort. */
  | 'drop'
  /** A packet this side never takes: the daemon reports it with STREAM/ERROR, the client aborts. */
  | 'refuse'
  /** The confirmation of our finish or abort (the daemon confirms the client's finish in turn). */
  | 'confirmed'
  /** The client finished a download before its end: stop, and confirm. */
  | 'finished-early'
  /** The client aborted: stop, and confirm. */
  | 'aborted-by-client'
  /** The daemon reports an error: the stream fails with it. */
  | 'failed'
  /** A confirmation nobody asked for. */
  | 'unexpected';

type Row = Record<Packet, Action>;

const SENDER_OPEN: Row = { data: 'drop', eof: 'drop', hole: 'refuse', ok: 'unexpected', error: 'failed' };

const ON_PACKET: Record<End, Record<Phase, Row>> = {
  'client-receives': {
    open: { data: 'deliver', eof: 'end', hole: 'deliver', ok: 'unexpected', error: 'failed' },
    finishing: { data: 'drop', eof: 'drop', hole: 'drop', ok: 'confirmed', error: 'failed' },
    aborting: { data: 'drop', eof: 'drop', hole: 'drop', ok: 'confirmed', error: 'confirmed' },
  },
  'client-sends': {
    open: SENDER_OPEN,
    finishing: { ...SENDER_OPEN, ok: 'confirmed' },
    // a daemon that cannot abort cleanly answers with an error: the abort is done anyway
    aborting: { ...SENDER_OPEN, ok: 'confirmed', error: 'confirmed' },
  },
  'server-sends': {
    open: { data: 'drop', eof: 'drop', hole: 'refuse', ok: 'finished-early', error: 'aborted-by-client' },
    // (the daemon aborts at once, without waiting for a confirmation: it is never aborting)
    finishing: { data: 'drop', eof: 'drop', hole: 'refuse', ok: 'confirmed', error: 'aborted-by-client' },
    aborting: { data: 'drop', eof: 'drop', hole: 'refuse', ok: 'confirmed', error: 'aborted-by-client' },
  },
  'server-receives': {
    // an empty data packet to the daemon is ignored, as libvirt does; the client's OK is its finish
    // (the daemon confirms an upload as soon as it finishes: it is never finishing nor aborting)
    open: { data: 'deliver', eof: 'drop', hole: 'deliver', ok: 'end', error: 'aborted-by-client' },
    finishing: { data: 'deliver', eof: 'drop', hole: 'deliver', ok: 'end', error: 'aborted-by-client' },
    aborting: { data: 'deliver', eof: 'drop', hole: 'deliver', ok: 'end', error: 'aborted-by-client' },
  },
};

type Waiter = { resolve: () => void; reject: (e: Error) => void };

export class WireStream implements StreamChannel {
  #state: State = 'open';
  #err: Error | null = null;
  /** The waiter of our finish or abort (finishing, aborting). */
  #confirm: Waiter | null = null;
  #inbound: StreamInbound | null = null;
  /** Deliveries before a stream was attached, replayed by `attach`. */
  #early: Array<() => void> = [];
  /** This stream asked the connection to stop reading (its consumer's queue is full). */
  #pausing = false;
  #inPlaceFile: OwnedFd | null = null;
  readonly #end: End;
  /** `ON_PACKET[end]`: what each packet does in each phase, for this end. */
  readonly #rows: Record<Phase, Row>;
  readonly #head: Header;
  readonly #holeHead: Header;
  /** This stream's own data path: payload bytes sent by sendfile, and received by splice. */
  readonly stats = { sendfileBytes: 0, splicedBytes: 0 };

  constructor(
    private readonly host: StreamHost,
    readonly proc: number,
    readonly serial: number,
    readonly sparse: boolean,
    readonly sending: boolean,
  ) {
    this.#end = `${host.role}-${sending ? 'sends' : 'receives'}`;
    this.#rows = ON_PACKET[this.#end];
    this.#head = { prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc, type: MessageType.STREAM, serial, status: Status.CONTINUE };
    this.#holeHead = { ...this.#head, type: MessageType.STREAM_HOLE };
  }

  get #isClient(): boolean {
    return this.host.role === 'client';
  }

  get #done(): boolean {
    return this.#state === 'closed' || this.#state === 'failed';
  }

  /** Server: the client takes a deep queue of small packets, so they need no pacing. */
  get deepQueue(): boolean {
    return this.host.deepQueue;
  }

  /** Connect the stream that consumes incoming chunks; packets that came first are replayed. */
  attach(inbound: StreamInbound): void {
    this.#inbound = inbound;
    const q = this.#early;
    this.#early = [];
    for (const f of q) f();
  }

  #toInbound(f: (i: StreamInbound) => void): void {
    if (this.#inbound) f(this.#inbound);
    else if (this.#early.length < 64) this.#early.push(() => f(this.#inbound!));
    else this.fail(new SparsevirtError('ERR_PROTOCOL', 'too many stream packets before the stream was attached'));
  }

  // ---------------------------------------------------------------- outgoing

  async write(chunk: Chunk): Promise<void> {
    const p = this.send(chunk);
    if (p !== null) await p;
  }

  /** Data and holes become frames in the connection's output batch at once; see `StreamChannel.send`. */
  send(item: Chunk | FileRange): Promise<void> | null {
    if (this.#err) throw this.#err;
    if (this.#done) throw new SparsevirtError('ERR_STREAM_STATE', 'stream is closed');
    const host = this.host;
    // an upload with data: let the socket hold a few packets (see RawSocket.bigSendBuffer). Small
    // ranges of a file too: with the default buffer (~208 KiB, half a millisecond of the
    // daemon's work) sparsevirtd waits for us between batches of small extents (net.core.wmem_max
    // caps the buffer, and some kernels default it to 208 KiB). Neutral against libvirtd.
    if (item.kind !== 'hole' && this.#isClient && !host.sendBufferIsBig) host.bigSendBuffer(true);
    if (item.kind === 'file') return this.#sendFile(item.file, item.offset, item.length, 0);
    if (item.kind === 'data') {
      const b = item.bytes;
      const max = host.streamPacketMax;
      if (b.length <= max) host.sendFrame(this.#head, b);
      else for (let off = 0; off < b.length; off += max) host.sendFrame(this.#head, b.subarray(off, Math.min(off + max, b.length)));
    } else {
      if (!this.sparse) throw new SparsevirtError('ERR_STREAM_NOT_SPARSE', 'cannot send a hole: the stream was not opened with the sparse flag');
      if (!(item.length > 0) || !Number.isSafeInteger(item.length)) throw new SparsevirtError('ERR_INVALID_ARG', `hole length must be a positive integer, got ${item.length}`);
      host.sendHoleFrame(this.#holeHead, item.length);
    }
    return this.#backpressure();
  }

  /** The frames of a file range from packet offset `from` on (see `Outbox.sendFileFrame`). */
  #sendFile(file: FileRef, offset: number, length: number, from: number): Promise<void> | null {
    const host = this.host;
    const max = host.streamPacketMax;
    for (let off = from; off < length; off += max) {
      // (after our abort the rest of a range that waited is not sent: its file may be closed by now)
      if (this.#done || this.#state === 'aborting') throw new SparsevirtError('ERR_STREAM_STATE', 'stream is closed');
      let pending: Promise<void> | null;
      try {
        pending = host.sendFileFrame(this.#head, file, offset + off, Math.min(max, length - off), this.stats);
      } catch (err) {
        throw this.#sourceFailed(err as Error);
      }
      if (pending !== null) return this.#afterStall(pending, file, offset, length, off + max);
      if (this.#err) throw this.#err;
    }
    return this.#backpressure();
  }

  /** A frame stalled mid-payload: the rest of the range once it is out. */
  async #afterStall(pending: Promise<void>, file: FileRef, offset: number, length: number, next: number): Promise<void> {
    try {
      await pending;
    } catch (err) {
      throw this.#sourceFailed(err as Error);
    }
    if (this.#err) throw this.#err;
    const p = this.#sendFile(file, offset, length, next);
    if (p !== null) await p;
  }

  /** Null while the socket takes more, else a promise of room (rejecting if the stream failed meanwhile). */
  #backpressure(): Promise<void> | null {
    const host = this.host;
    if (host.outgoingBytes <= host.sendWindow) return null;
    return host.drained().then(this.#checkFailed);
  }

  readonly #checkFailed = (): void => {
    if (this.#err) throw this.#err;
  };

  /**
   * The file failed under a frame (it shrank, EIO): not the connection. The peer is told here,
   * since a stream whose channel rejected never calls it again: the daemon reports the error
   * with STREAM/ERROR, the client aborts. The connection goes on.
   */
  #sourceFailed(err: Error): Error {
    if (this.#err) return this.#err;
    if (this.#done || this.host.closed) return err;
    if (this.#state === 'aborting') {
      // our abort is already on the wire: nothing more to say
      this.fail(err);
      return err;
    }
    // as libvirtd reports a failed read of the volume: "cannot read from stream: <reason>"
    const report = this.#isClient ? undefined : encodeRemoteError(toRemoteFields(new SparsevirtError('ERR_IO', `cannot read from stream: ${err.message}`, { cause: err })));
    this.host.sendFrame({ ...this.#head, status: Status.ERROR }, report);
    this.fail(err);
    return err;
  }

  finish(): Promise<void> {
    if (this.#err) return Promise.reject(this.#err);
    if (this.#done) return Promise.resolve();
    if (this.#end === 'server-receives') {
      // the client finished and everything is written: confirm.
      this.host.sendFrame({ ...this.#head, status: Status.OK });
      this.#close();
      return Promise.resolve();
    }
    const p = this.#waitConfirm('finishing');
    if (this.#isClient) this.host.sendFrame({ ...this.#head, status: Status.OK }); // finish
    else this.host.sendFrame(this.#head); // daemon download: empty CONTINUE = EOF
    return p;
  }

  abort(reason: Error): Promise<void> {
    if (this.#done) return Promise.resolve();
    if (!this.#isClient) {
      // daemon: report the failure to the client; no confirmation follows.
      this.host.sendFrame({ ...this.#head, status: Status.ERROR }, encodeRemoteError(toRemoteFields(reason)));
      this.#close();
      return Promise.resolve();
    }
    const p = this.#waitConfirm('aborting');
    this.host.sendFrame({ ...this.#head, status: Status.ERROR });
    const t = setTimeout(() => {
      // no confirmation in time: the abort is done on our side anyway; never leave the caller waiting.
      const c = this.#confirm;
      this.#confirm = null;
      this.#close();
      c?.resolve();
    }, this.host.abortTimeout);
    t.unref();
    return p.then(() => clearTimeout(t), () => clearTimeout(t));
  }

  #waitConfirm(state: 'finishing' | 'aborting'): Promise<void> {
    this.#state = state;
    return new Promise<void>((resolve, reject) => {
      this.#confirm = { resolve, reject };
    });
  }

  // ---------------------------------------------------------------- flow control, in place

  pauseIncoming(): void {
    if (this.#pausing || this.#done) return;
    this.#pausing = true;
    this.host.pauseReading();
  }

  resumeIncoming(): void {
    if (!this.#pausing) return;
    this.#pausing = false;
    this.host.resumeReading();
  }

  receiveDirect(file: FileRef | null): boolean {
    if (file === null) {
      const dup = this.#inPlaceFile;
      if (dup === null) return false;
      // The connection checks the stream's target before every write (it is gone now): nothing
      // is written through this file again, also in the middle of a packet.
      this.#inPlaceFile = null;
      this.host.inPlaceReceiver(-1);
      // only files in memory are written in place: closed at once, before the stream can end
      dup.closeNow();
      return false;
    }
    if (this.#done || this.#inPlaceFile !== null) return false;
    const dup = OwnedFd.of(file);
    if (dup === null) return false;
    this.#inPlaceFile = dup;
    this.host.inPlaceReceiver(1);
    return true;
  }

  /** The duplicate of the consumer's file that packets are written in place through, while it takes them so. */
  get inPlaceFile(): OwnedFd | null {
    return this.#inPlaceFile;
  }

  /** Where a data packet arriving now goes in place, if its consumer takes it so. */
  directTarget(length: number): DirectTarget | null {
    if (this.sending || this.#state === 'finishing' || this.#state === 'aborting' || this.#done || this.#inbound === null) return null;
    return this.#inbound[kDirectTarget]?.(length) ?? null;
  }

  /** A data packet the connection wrote in place. */
  onWritten(range: WrittenRange): void {
    if (this.#done) return;
    this.#deliver(range);
  }

  // ---------------------------------------------------------------- incoming

  /** Each STREAM / STREAM_HOLE packet on this stream (and a REPLY/ERROR libvirt sends for one). */
  onPacket(m: Message): void {
    if (this.#done) return;
    let packet: Packet;
    if (m.type === MessageType.STREAM_HOLE) {
      if (m.status !== Status.CONTINUE) return this.#refuse(new SparsevirtError('ERR_PROTOCOL', `unexpected stream hole (status ${m.status})`));
      packet = 'hole';
    } else if (m.status === Status.CONTINUE) {
      packet = m.payload.length > 0 ? 'data' : 'eof';
    } else if (m.status === Status.OK) {
      packet = 'ok';
    } else if (m.status === Status.ERROR) {
      packet = 'error';
    } else {
      return this.fail(new SparsevirtError('ERR_PROTOCOL', `stream packet with unknown status ${m.status}`));
    }
    const state = this.#state;
    const action = (state === 'finishing' || state === 'aborting' ? this.#rows[state] : this.#rows.open)[packet];
    if (packet === 'hole') return this.#onHole(m, action);
    switch (action) {
      case 'deliver':
        return this.#deliver({ kind: 'data', bytes: m.payload });
      case 'end':
        this.#state = 'ended';
        return this.#toInbound((i) => i[kDeliverEnd]());
      case 'drop':
        return;
      case 'confirmed': {
        const c = this.#confirm;
        this.#confirm = null;
        // daemon, download: the client acknowledged our EOF with its finish; libvirtd confirms
        // that finish with STREAM/OK (capture download-sparse), virsh waits for it.
        if (this.#end === 'server-sends') this.host.sendFrame({ ...this.#head, status: Status.OK });
        this.#close();
        c?.resolve();
        return;
      }
      case 'finished-early':
        this.host.sendFrame({ ...this.#head, status: Status.OK });
        return this.fail(new SparsevirtError('ERR_ABORTED', 'the client finished the stream early'));
      case 'aborted-by-client':
        this.host.sendFrame({ ...this.#head, status: Status.OK });
        return this.fail(new SparsevirtError('ERR_ABORTED', 'the client aborted the stream'));
      case 'failed': {
        let err: Error;
        try {
          err = decodeRemoteError(m.payload);
        } catch (e) {
          err = new SparsevirtError('ERR_PROTOCOL', `malformed stream error: ${(e as Error).message}`);
        }
        return this.fail(err);
      }
      case 'unexpected':
        return this.fail(new SparsevirtError('ERR_PROTOCOL', 'unexpected stream confirmation'));
      case 'refuse':
        return this.#refuse(new SparsevirtError('ERR_PROTOCOL', `unexpected stream ${packet} packet`));
    }
  }

  /** A STREAM_HOLE packet: `action` is the table's (deliver, drop, or refuse). */
  #onHole(m: Message, action: Action): void {
    if (action === 'refuse') return this.#refuse(new SparsevirtError('ERR_PROTOCOL', `unexpected stream hole (status ${m.status})`));
    if (!this.sparse) {
      return this.#refuse(new SparsevirtError('ERR_STREAM_NOT_SPARSE', 'unexpected stream hole: the stream was not opened with the sparse flag'));
    }
    if (action !== 'deliver') return;
    const p = m.payload;
    if (p.length < STREAM_HOLE_SIZE) {
      // (the decoder words what is missing)
      try {
        streamHoleCodec.dec(new XdrReader(p));
      } catch (e) {
        return this.#refuse(new SparsevirtError('ERR_PROTOCOL', `malformed stream hole: ${(e as Error).message}`));
      }
    }
    // length (hyper), flags (unsigned int), read in place: one for each of 100,000 holes
    const high = i32(p, 0);
    const length = high * 2 ** 32 + u32(p, 4);
    const flags = u32(p, 8);
    if (flags !== 0) return this.#refuse(new SparsevirtError('ERR_PROTOCOL', `stream hole with unsupported flags 0x${flags.toString(16)}`));
    if (high < 0 || length > Number.MAX_SAFE_INTEGER) {
      return this.#refuse(new SparsevirtError('ERR_PROTOCOL', `stream hole with invalid length ${p.readBigInt64BE(0)}`));
    }
    if (length === 0) return; // an empty hole (libvirt's API allows one): nothing to do
    this.#deliver({ kind: 'hole', length });
  }

  /** Data or a hole for the consumer (kept until a stream is attached). */
  #deliver(chunk: Chunk | WrittenRange): void {
    const inbound = this.#inbound;
    if (inbound !== null) inbound[kDeliver](chunk);
    else this.#toInbound((i) => i[kDeliver](chunk));
  }

  /** A packet we cannot accept: the daemon reports it with STREAM/ERROR, the client aborts. */
  #refuse(err: SparsevirtError): void {
    const report = this.#isClient ? undefined : encodeRemoteError(toRemoteFields(err));
    this.host.sendFrame({ ...this.#head, status: Status.ERROR }, report);
    this.fail(err);
  }

  // ---------------------------------------------------------------- the end

  /** The stream is dead: tell the consumer, reject the waiter, unregister. */
  fail(err: Error): void {
    if (this.#done) return;
    this.#err = err;
    const c = this.#confirm;
    this.#confirm = null;
    this.#release('failed');
    if (this.#inbound) this.#inbound[kDeliverError](err);
    else this.#early.push(() => this.#inbound![kDeliverError](err));
    c?.reject(err);
  }

  #close(): void {
    if (this.#done) return;
    this.#release('closed');
  }

  /** Reach a final state: the in-place file goes, the stream leaves the connection, which reads again if it waited for this stream. */
  #release(state: 'closed' | 'failed'): void {
    this.#state = state;
    this.receiveDirect(null);
    this.host.streamClosed(this);
    // release this stream's hold once: its Stream may call resumeIncoming() again when it ends.
    if (this.#pausing) {
      this.#pausing = false;
      this.host.resumeReading();
    }
  }
}
