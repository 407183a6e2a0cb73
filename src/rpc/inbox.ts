/**
 * What a connection reads: where each socket read lands, frames out of the parser, and data
 * packets received in place (their payload spliced from the socket into the consumer's file).
 *
 * Sockets opened with a `ReadHook` let us pick each read's buffer, of one of five kinds:
 * - a fresh frame-sized buffer while big packets flow (a frame alone in it keeps it, and it comes
 *   back to the pool once its payload is written);
 * - the rest of a large frame being assembled (the kernel writes straight into it);
 * - the rest of a shared read slab for every other read: frames read into it stay there (views,
 *   no copy: 100,000 4 KiB extents were 400 MiB of copies out of a reused scratch buffer), and
 *   the next read goes after them, so a peer that sends one small frame per read (libvirtd:
 *   200,000 frames for 100,000 extents) uses up only the bytes it sent; a small frame the read
 *   cut stays in the slab and the next read lands behind it, with the frames that follow;
 * - a frame's 28-byte header alone, while data flows to a consumer that takes it in place;
 * - the part of an in-place packet that was not in the socket yet.
 * Other sockets (TLS, ssh's pipes, in-memory duplexes) are read through 'data' events.
 */
import type { Duplex } from 'node:stream';
import type { DirectTarget } from '../channel.js';
import type { WrittenRange } from '../chunk.js';
import { SparsevirtError } from '../errors.js';
import type { OwnedFd } from '../io/file.js';
import { allocFrame, BIG_FRAME, recyclableOnce, returnFrameBuffer, takeFrameBuffer } from '../io/pools.js';
import { readHookOf } from '../io/read-hook.js';
import type { DataPathStats, RawSocket } from '../io/socket.js';
import { InPlaceWrite } from '../io/splice.js';
import * as sys from '../io/sys.js';
import { debug, frameChannel } from '../diagnostics.js';
import { FRAME_OVERHEAD, MessageType, readHeader, REMOTE_PROGRAM, Status, type Header, type Message } from './message.js';
import { FrameParser } from './parser.js';

/** Reads that are not big frames go into slabs of this size, one after the other, while at least READ_SLAB_MIN of it is left. */
const READ_SLAB = 128 * 1024;
const READ_SLAB_MIN = 32 * 1024;
/**
 * A frame up to this size cut by the end of a slab read stays where it is: the next read lands
 * behind it (a new slab starts with a copy of it), instead of a read for its rest alone.
 */
const KEEP_TAIL_MAX = READ_SLAB_MIN;

/** A receiving stream whose consumer may take data packets in place (`WireStream`). */
export interface InPlaceReceiver {
  /** The stream's duplicate of the consumer's file, while it takes packets in place. */
  readonly inPlaceFile: OwnedFd | null;
  /** Where a data packet of `length` bytes arriving now goes, if the consumer takes it in place. */
  directTarget(length: number): DirectTarget | null;
  /** A data packet written in place (or that failed to be). */
  onWritten(range: WrittenRange): void;
  readonly stats: { splicedBytes: number };
}

export interface InboxHost {
  /** A whole frame arrived. */
  message(m: Message): void;
  /** The byte stream is broken (a framing error): the connection cannot go on. */
  fail(err: Error): void;
  /** `n` bytes were read from the socket. */
  received(n: number): void;
  /** The stream a data packet with this header belongs to, if it may take it in place. */
  receiver(h: Header): InPlaceReceiver | undefined;
}

/** A data packet being written into its stream's file as it arrives. */
interface InPlace {
  write: InPlaceWrite;
  stream: InPlaceReceiver;
  target: DirectTarget;
}

export class Inbox {
  readonly #parser: FrameParser;
  #hookTarget: Buffer | null = null;
  /** The last frame was big (stream data): the next read goes into a fresh frame-sized buffer. */
  #bigFrames = false;
  #smallRun = 0;
  #freshTarget: Buffer | null = null;
  /** The fresh buffer the frame being assembled lives in. */
  #adopted: Buffer | null = null;
  #readSlab: Buffer | null = null;
  #readSlabUsed = 0;
  /** Where the bytes of a small frame cut by the last slab read start (they end at `#readSlabUsed`), or -1. */
  #slabKept = -1;
  #slabTarget: Buffer | null = null;
  /** Receiving streams whose consumer takes data packets in place. */
  #inPlaceReceivers = 0;
  /** A frame's header read alone, to see whether its payload goes in place. */
  readonly #inHead = Buffer.allocUnsafe(FRAME_OVERHEAD);
  #inHeadHave = 0;
  #inHeadTarget: Buffer | null = null;
  #inPlace: InPlace | null = null;
  #tailTarget: Buffer | null = null;
  /** splice(2) failed on this socket: no new packet goes in place. */
  #spliceOff = false;
  /**
   * Whether data packets may be received in place on this connection at all (on by default, from
   * libvirtd too: a dense download from it is faster in place than read whole, and than virsh's).
   */
  receiveInPlace = true;

  constructor(
    socket: Duplex,
    private readonly raw: RawSocket,
    private readonly stats: DataPathStats,
    private readonly host: InboxHost,
    private readonly maxFrame: number,
  ) {
    this.#parser = new FrameParser({ maxFrame, alloc: allocFrame });
    const hook = readHookOf(socket);
    if (hook) hook.attach(() => this.#readTarget(), (n, buf) => this.#onRead(n, buf));
    else socket.on('data', (buf: Buffer) => this.#onData(buf));
  }

  /** A receiving stream's consumer takes data packets in place from now on (+1), or no more (-1). */
  inPlaceReceiver(delta: number): void {
    this.#inPlaceReceivers += delta;
  }

  /** The connection is gone: a packet half in place is dropped. */
  destroy(): void {
    this.#inPlace = null;
  }

  readonly #onMessage = (m: Message): void => {
    // Big data packets flowing: read the next frame into a fresh frame-sized buffer. A hole
    // packet between two data extents does not end that; small data or anything else does.
    // (libvirtd sends each 256 KiB it reads as a 262,120-byte packet and a 24-byte one: a few
    // small packets in a row end it.)
    if (m.payload.length >= BIG_FRAME) {
      this.#bigFrames = true;
      this.#smallRun = 0;
    } else if (m.type !== MessageType.STREAM_HOLE && ++this.#smallRun >= 4) {
      this.#bigFrames = false;
    }
    // many large buffers will come and go: keep their memory mapped (loads koffi: not before)
    if (this.#bigFrames) sys.tuneMallocForStreaming();
    if (frameChannel.hasSubscribers) frameChannel.publish({ dir: 'in', header: m, length: m.payload.length });
    this.host.message(m);
  };

  #onData(buf: Buffer): void {
    this.stats.reads++;
    this.host.received(buf.length);
    try {
      this.#parser.push(buf, this.#onMessage);
    } catch (err) {
      this.host.fail(err as Error);
    }
  }

  /** The buffer the next socket read lands in. */
  #readTarget(): Buffer {
    const p = this.#inPlace;
    if (p !== null) {
      this.#tailTarget = p.write.readTarget(!this.#spliceOff);
      return this.#tailTarget;
    }
    const kept = this.#slabKept >= 0;
    if (!kept) {
      if (this.#inHeadHave > 0 || (this.#inPlaceReceivers > 0 && this.#bigFrames && this.receiveInPlace && !this.#spliceOff && this.#parser.idle && this.raw.fd >= 0)) {
        // Data packets flowing to a consumer that takes them in place: read the next header
        // alone; a data packet's payload then goes from the socket to the file by splice.
        this.#inHeadTarget = this.#inHead.subarray(this.#inHeadHave);
        return this.#inHeadTarget;
      }
      const t = this.#parser.readTarget();
      this.#hookTarget = t;
      if (t) return t;
      if (this.#bigFrames) {
        // Stream data is flowing: read the next frame straight into a buffer of its likely size.
        this.#freshTarget = takeFrameBuffer();
        return this.#freshTarget;
      }
    }
    // the rest of the read slab, behind a frame the last read cut, if it can take a read of the
    // usual size; else a new slab, starting with that frame's bytes
    const slab = this.#readSlab;
    if (slab === null || slab.length - this.#readSlabUsed < READ_SLAB_MIN) {
      const next = Buffer.allocUnsafeSlow(READ_SLAB);
      this.#readSlabUsed = kept ? slab!.copy(next, 0, this.#slabKept, this.#readSlabUsed) : 0;
      if (kept) this.#slabKept = 0;
      this.#readSlab = next;
    }
    this.#slabTarget = this.#readSlab!.subarray(this.#readSlabUsed);
    return this.#slabTarget;
  }

  #onRead(n: number, buf: Buffer): void {
    this.stats.reads++;
    this.host.received(n);
    try {
      if (buf === this.#tailTarget) {
        this.#tailTarget = null;
        this.#inPlaceTail(n, buf);
      } else if (buf === this.#inHeadTarget) {
        this.#inHeadTarget = null;
        this.#onInHead(n);
      } else if (buf === this.#freshTarget) {
        this.#freshTarget = null;
        // one whole frame, alone in the buffer: its payload may bring the buffer back
        if (this.#parser.idle && n >= 4 && buf.readUInt32BE(0) === n) recyclableOnce(buf);
        if (this.#parser.pushOwned(buf, n, this.#onMessage) === 'free') returnFrameBuffer(buf);
        else if (this.#parser.assemblingIn(buf)) this.#adopted = buf;
      } else if (buf === this.#slabTarget) {
        this.#slabTarget = null;
        // whole frames stay views of the slab; a small frame cut by the read's end stays in it,
        // for the next read to complete (a large one is assembled apart)
        const slab = this.#readSlab!;
        const from = this.#slabKept >= 0 ? this.#slabKept : this.#readSlabUsed;
        const end = this.#readSlabUsed + n;
        this.#slabKept = -1;
        this.#readSlabUsed = (end + 7) & ~7;
        const used = this.#parser.pushKeepingTail(slab.subarray(from, end), this.#onMessage, KEEP_TAIL_MAX);
        if (from + used < end) {
          this.#slabKept = from + used;
          this.#readSlabUsed = end;
        }
      } else if (buf !== this.#hookTarget) {
        // bytes read before this connection existed, replayed in copies of their own
        this.#parser.push(buf.subarray(0, n), this.#onMessage);
      } else {
        this.#hookTarget = null;
        const adopted = this.#adopted;
        if (adopted !== null && !this.#parser.assemblingIn(adopted)) this.#adopted = null;
        else if (adopted !== null && this.#parser.completes(n)) {
          // the frame assembled in place fills the buffer's head alone: its payload may bring it back
          this.#adopted = null;
          recyclableOnce(adopted);
        }
        this.#parser.filled(n, this.#onMessage);
      }
    } catch (err) {
      this.host.fail(err as Error);
    }
  }

  // ---------------------------------------------------------------- receiving in place

  /** A header read alone (see `#readTarget`): a data packet for a stream that takes it in place, or anything else. */
  #onInHead(n: number): void {
    this.#inHeadHave += n;
    if (this.#inHeadHave < FRAME_OVERHEAD) return;
    this.#inHeadHave = 0;
    const head = this.#inHead;
    const len = head.readUInt32BE(0);
    const payload = len - FRAME_OVERHEAD;
    if (payload >= BIG_FRAME && len <= this.maxFrame) {
      const h = readHeader(head, 4);
      if (h.type === MessageType.STREAM && h.status === Status.CONTINUE && h.prog === REMOTE_PROGRAM) {
        const s = this.host.receiver(h);
        const t = s?.directTarget(payload);
        const file = s?.inPlaceFile;
        if (s && t && file) {
          if (frameChannel.hasSubscribers) frameChannel.publish({ dir: 'in', header: h, length: payload });
          this.#smallRun = 0;
          const key = t.key;
          const check = (): Error | null => (s.directTarget(0)?.key === key ? null
            : new SparsevirtError('ERR_STREAM_STATE', 'the stream stopped taking data in place in the middle of a packet'));
          const spliced = (w: number): void => {
            this.stats.splicedBytes += w;
            s.stats.splicedBytes += w;
          };
          this.#inPlace = { write: new InPlaceWrite(file, t.offset, payload, check, spliced), stream: s, target: t };
          this.#pumpInPlace();
          return;
        }
      }
    }
    // anything else: the parser takes the header and assembles the rest as usual
    this.#parser.pushCopy(head, FRAME_OVERHEAD, this.#onMessage);
  }

  /** Splice what the socket holds of the in-place packet; the next read brings the rest. */
  #pumpInPlace(): void {
    const p = this.#inPlace!;
    if (!this.#spliceOff) {
      const r = p.write.pump(this.raw.fd);
      if (typeof r === 'object') {
        // this socket cannot splice: the rest of the packet comes by reads, later ones as usual
        if (r.off) debug('splice from the socket failed (%s): packets are read', (r.off as NodeJS.ErrnoException).code);
        this.#spliceOff = true;
      }
    }
    if (p.write.complete) this.#endInPlace();
  }

  /** Payload bytes of the in-place packet that came by a read. */
  #inPlaceTail(n: number, buf: Buffer): void {
    const p = this.#inPlace!;
    p.write.tail(n, buf);
    if (p.write.complete) this.#endInPlace();
    else this.#pumpInPlace();
  }

  #endInPlace(): void {
    const p = this.#inPlace!;
    this.#inPlace = null;
    this.stats.splicedFrames++;
    const range: WrittenRange = { kind: 'written', file: p.target.file, offset: p.target.offset, length: p.write.length };
    if (p.write.error !== null) range.error = p.write.error;
    p.stream.onWritten(range);
  }
}
