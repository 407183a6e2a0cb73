/**
 * A `Peer` owns one connection (unix, tcp, tls or an in-memory duplex): it parses frames,
 * matches replies to calls by serial, multiplexes streams by (proc, serial), runs keepalive
 * and carries backpressure between the socket and the streams. The client and the daemon
 * use the same class, with `role` telling which side of libvirt's protocol it speaks.
 */
import { EventEmitter } from 'node:events';
import fs, { readFileSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import { debuglog } from 'node:util';
import diagnostics from 'node:diagnostics_channel';
import { readFileInto, readFileRange, type Chunk, type FileRange, type WrittenRange } from '../chunk.js';
import { RemoteError, SparsevirtError, remoteErrorFields, VIR_DOMAIN, VIR_ERR_CODE, type RemoteErrorFields } from '../errors.js';
import type { DirectTarget, StreamChannel, StreamInbound } from '../stream/channel.js';
import { XdrReader, XdrWriter, type Codec } from '../xdr/index.js';
import {
  buildFrameHead, describeHeader, FRAME_MAX, FRAME_OVERHEAD, readHeader, writeFrameHead, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM,
  KEEPALIVE_VERSION, MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, STREAM_PAYLOAD_MAX,
  type Header, type Message,
} from './message.js';
import { FrameParser } from './parser.js';
import * as sys from '../sparse/sys.js';
import { decodeRemoteError, encodeRemoteError, streamHoleCodec } from './structs.js';

const debug = debuglog('sparsevirt:rpc');
const chFrame = diagnostics.channel('sparsevirt:rpc:frame');

export interface PeerOptions {
  role: 'client' | 'server';
  /** Seconds of silence before a keepalive PING (libvirt: 5). */
  keepaliveInterval?: number;
  /** Unanswered PINGs before giving up (libvirt: 5 on the daemon, virsh: 6). */
  keepaliveCount?: number;
  maxFrame?: number;
  /** Largest data payload to send in one STREAM packet. */
  streamPacketMax?: number;
  /** How long an abort waits for the peer's confirmation, in ms. */
  abortTimeout?: number;
  /** Bytes of stream data queued in user space before a sender waits (default 1 MiB). */
  sendWindow?: number;
  /**
   * Milliseconds to keep the event loop polling after each read while a stream is open (0, the
   * default: never). See `keepPolling`.
   */
  busyPoll?: number;
}

interface PendingCall {
  ret: Codec<unknown>;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  cleanup?: () => void;
}

const ONE_HOLE = 12;
const EIO = 5;
/**
 * Sockets we open ourselves (net.connect) read through `onread`: the Peer picks where each read
 * lands, so the rest of a large frame is read straight into that frame's buffer instead of
 * arriving in 64 KiB pieces that are then copied together. The transport creates the hook
 * with the socket (reads that come before the Peer exists are kept and replayed).
 */
export const kReadHook = Symbol('sparsevirt.readHook');

export class ReadHook {
  private target: (scratch: number) => Buffer = (n) => Buffer.allocUnsafe(n);
  private sink: ((n: number, buf: Buffer) => void) | null = null;
  private early: Buffer[] = [];
  static readonly SCRATCH = 64 * 1024;

  /** For net.connect's `onread` option. */
  readonly onread = {
    buffer: (): Buffer => this.target(ReadHook.SCRATCH),
    callback: (n: number, buf: Buffer): void => {
      if (this.sink) this.sink(n, buf);
      else this.early.push(Buffer.from(buf.subarray(0, n)));
    },
  };

  attach(target: (scratch: number) => Buffer, sink: (n: number, buf: Buffer) => void): void {
    this.target = target;
    this.sink = sink;
    const early = this.early;
    this.early = [];
    for (const b of early) sink(b.length, b);
  }
}

/** Payloads up to this size are copied into the output batch; larger ones are written beside. */
const SMALL_PAYLOAD = 16 * 1024;
/** How far a client reads past full stream queues while calls wait for their replies. */
const READ_PAST_FULL_MAX = 64 << 20;
const OUT_BATCH = 256 * 1024;

/** A frame this big means stream data is flowing (see `readTarget`). */
const BIG_FRAME = 64 * 1024;
/**
 * Reads of small frames go into slabs of this size, one after the other, while at least
 * READ_SLAB_MIN of it is left (see `onRead`).
 */
const READ_SLAB = 128 * 1024;
const READ_SLAB_MIN = 32 * 1024;

/** A whole data packet of libvirt's size with its header. */
const FRESH_READ = FRAME_OVERHEAD + STREAM_PAYLOAD_MAX;

/**
 * Frame buffers that held exactly one frame come back once the consumer is done with its
 * payload (`recycleFramePayload`, called by the file writer once the bytes landed): a long
 * download reuses the ~40 it holds at once (the stream's 4 MiB window, the writer's batch and
 * writes in flight) instead of leaving one 256 KiB buffer per packet to the GC (measured on a
 * 2 GiB download: peak RSS 100 → 72 MiB). At most 64 wait here (16 MiB), process-wide.
 */
const FRAME_POOL_MAX = 64;
const framePool: Buffer[] = [];
/** Buffers handed out whose single frame's payload may come back (keyed by ArrayBuffer). */
const recyclable = new WeakMap<ArrayBufferLike, Buffer>();

function takeFrameBuffer(): Buffer {
  return framePool.pop() ?? Buffer.allocUnsafeSlow(FRESH_READ);
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
  if (framePool.length < FRAME_POOL_MAX) framePool.push(whole);
}

/**
 * A buffer for one frame of `len` bytes, alone in it (assembled across reads, or copied out of a
 * shared read): a data packet's (64 KiB and more) comes from the pool and may come back.
 */
function allocFrame(len: number): Buffer {
  if (len < BIG_FRAME) return slabFrame(len);
  if (len > FRESH_READ) return Buffer.allocUnsafe(len);
  const buf = takeFrameBuffer();
  recyclable.set(buf.buffer, buf);
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

/** `SparseWriterOptions.release` for chunks that came from a `Stream` over a Peer. */
export function releaseFramePayloads(buffers: Buffer[]): void {
  for (const b of buffers) recycleFramePayload(b);
}

/** Buffers allocated by the data path, process-wide (tests check that pools are reused). */
export const bufferStats = { outputBatches: 0 };

/** Output batch buffers whose every write completed, for the next batch (process-wide). */
const BATCH_POOL_MAX = 8;
const batchPool: Buffer[] = [];
function recycleBatch(buf: Buffer): void {
  if (batchPool.length < BATCH_POOL_MAX) batchPool.push(buf);
}

/** SO_SNDBUF for unix sockets while file data goes out by sendfile (the kernel doubles it). */
const SOCKET_SEND_BUFFER = 1 << 20;

let wmemDefault = 0;
/** net.core.wmem_default: what a new socket gets. */
function defaultSendBuffer(): number {
  if (wmemDefault === 0) {
    try {
      wmemDefault = Number.parseInt(readFileSync('/proc/sys/net/core/wmem_default', 'latin1'), 10) || 212992;
    } catch {
      wmemDefault = 212992;
    }
  }
  return wmemDefault;
}

/** File data below this size is read into a buffer rather than passed by sendfile. */
const DIRECT_MIN = 64 * 1024;

/** What goes through Node's queue when a direct frame stalls: its completion means "writable". */
const STALL_PIECE = 16 * 1024;

const readRange = (fd: number, offset: number, length: number): Buffer => readFileRange({ kind: 'file', fd, offset, length });

/**
 * Receiving in place (see `Peer.readTarget`): one pipe for the process, empty between two
 * calls (both of its ends are used within one synchronous step), or null where there is none.
 */
let inPlacePipe: [number, number] | null | undefined;
function splicePipe(): [number, number] | null {
  if (inPlacePipe === undefined) {
    const p = sys.makePipe(1 << 20);
    inPlacePipe = typeof p === 'number' ? null : p;
  }
  return inPlacePipe;
}
/**
 * The rest of an in-place packet that was not in the socket yet arrives by an ordinary read of
 * at most this much (libuv tells us the socket is readable by reading it), is written at its
 * place, and splicing goes on. Larger when the socket cannot splice, or the bytes are dropped.
 */
const TAIL_READ = 16 * 1024;
const TAIL_MAX = 256 * 1024;
let tailBuffer: Buffer | null = null;

/** A data packet being written into its stream's file as it arrives (`Peer.onInHead`). */
interface InPlace {
  stream: WireStream;
  /** The target's identity (`DirectTarget.key`): checked before every write. */
  key: object;
  /** The stream's duplicate of the consumer's file (`WireStream.receiveDirect`): written through. */
  fd: number;
  /** The consumer's own fd, for the range delivered. */
  rangeFd: number;
  offset: number;
  length: number;
  /** Payload bytes consumed from the socket so far (written, or dropped after `error`). */
  done: number;
  error: Error | null;
}

/**
 * Busy polling. libvirtd sends a stream one packet per write, and its main thread waits for its
 * fd-stream thread between two packets. When our process then sleeps in epoll too, the CPUs go
 * idle, and every one of those hand-overs pays a wake-up from idle (in this guest, `haltpoll`):
 * 100,000 small extents took 16 s to download where virsh, busy with its own work per packet,
 * took 6-9 s. Keeping the event loop turning (an immediate, so that libuv polls with a zero
 * timeout) for a short while after each read while a stream is open keeps one CPU busy for the
 * length of such a transfer; it stops by itself once reads stop coming. One loop serves every
 * Peer. Large packets too: the dense image came in 3.67-4.00 s with it, 4.80-5.88 s without.
 * The client turns it on for libvirtd only (`ConnectOptions.busyPoll`).
 */
let pollUntil = 0;
let polling = false;
let pollTurns = 0;
function keepPolling(ms: number): void {
  const until = performance.now() + ms;
  if (until > pollUntil) pollUntil = until;
  if (!polling) {
    polling = true;
    setImmediate(pollTurn);
  }
}
function pollTurn(): void {
  pollTurns++;
  if (performance.now() < pollUntil) setImmediate(pollTurn);
  else polling = false;
}
/** @internal How many turns busy polling has made in this process, and whether it is on now. */
export function busyPollState(): { turns: number; polling: boolean } {
  return { turns: pollTurns, polling };
}

export class Peer extends EventEmitter {
  readonly role: 'client' | 'server';
  readonly socket: Duplex;
  private readonly parser: FrameParser;
  private readonly pending = new Map<number, PendingCall>();
  private readonly streams = new Map<number, WireStream>();
  /** Streams that ended recently: late packets for them are dropped silently. */
  private readonly ended = new Set<number>();
  private serial = 0;
  private closedErr: Error | null = null;
  private drainWaiters: Array<() => void> = [];
  private hookTarget: Buffer | null = null;
  /** The last frame was big (stream data): the next read goes into a fresh frame-sized buffer. */
  private bigFrames = false;
  private smallRun = 0;
  private freshTarget: Buffer | null = null;
  /** The fresh buffer the frame being assembled lives in. */
  private adopted: Buffer | null = null;
  /** Where reads that are neither big frames nor the rest of one land (see `onRead`). */
  private readSlab: Buffer | null = null;
  private readSlabUsed = 0;
  private slabTarget: Buffer | null = null;
  private outBuf: Buffer | null = null;
  /** The current batch: writes of it not yet completed, and whether a newer batch replaced it. */
  private outState: { buf: Buffer; pending: number; retired: boolean } | null = null;
  private outStart = 0;
  private outEnd = 0;
  private flushScheduled = false;
  private directFdCache: number | undefined;
  private sendBufferBig = false;
  /** While a direct frame waits for the socket: what was written after it, in order. */
  private held: Buffer[] | null = null;
  private heldBytes = 0;
  private directDone: Promise<void> | null = null;
  private directAbort: (() => void) | null = null;
  private readonly directHead = Buffer.allocUnsafe(FRAME_OVERHEAD);
  /** Streams whose queue is full (each asked once to stop reading). */
  private pausedBy = 0;
  /** The socket is not being read: streams' queues are full and no call waits for a reply. */
  private readingStopped = false;
  /** Bytes read past full stream queues so that the replies to calls could arrive. */
  private overshoot = 0;
  private lastRecv = Date.now();
  private pingsOut = 0;
  private kaTimer: NodeJS.Timeout | null = null;
  /** Serials of calls given up locally (timeout, abort): their late replies are dropped quietly. */
  private readonly abandoned = new Set<number>();
  /** Abandoned stream-opening calls whose stream must be aborted if the server opens it. */
  private readonly abortWhenOpened = new Set<number>();
  /** Bytes handed to socket.write so far, and what keepalive saw at its last tick (see keepaliveTick). */
  private bytesQueued = 0;
  private kaPending = 0;
  private kaAccepted = 0;
  private kaQueued = 0;
  private kaOutq = -1;
  private kaLastPausedPing = 0;
  readonly keepaliveInterval: number;
  readonly keepaliveCount: number;
  readonly streamPacketMax: number;
  readonly abortTimeout: number;
  /** Bytes a stream may leave in the socket's user-space buffer before it waits for 'drain'. */
  readonly sendWindow: number;
  /**
   * Data-path counters: payload bytes the kernel took straight from files (`sendfile`); direct
   * frames that found the socket or Node's queue full (later frames held back meanwhile); payload
   * bytes of those that went through Node's queue instead (the 16 KiB pieces whose completion
   * says the socket has room again); and large file frames read into a buffer whole, because
   * another frame was held or the socket was not ours to write. Received in place: payload bytes
   * spliced from the socket into files, and the packets that went so (see `onInHead`).
   */
  readonly stats = { directBytes: 0, directStalls: 0, copiedBytes: 0, bufferedFrames: 0, splicedBytes: 0, splicedFrames: 0 };
  private readonly maxFrame: number;
  /** Receiving streams whose consumer takes data packets in place (`Stream.receiveInto`). */
  private inPlaceReceivers = 0;
  /** A frame's header read alone, to see whether its payload goes in place (`readTarget`). */
  private readonly inHead = Buffer.allocUnsafe(FRAME_OVERHEAD);
  private inHeadHave = 0;
  private inHeadTarget: Buffer | null = null;
  private inPlace: InPlace | null = null;
  private tailTarget: Buffer | null = null;
  /** splice(2) failed on this socket: no new packet goes in place. */
  private spliceOff = false;
  /**
   * Whether data packets may be received in place on this connection at all (on by default, from
   * libvirtd too: downloading 2 GiB from it took 1.50–1.97 s in place against 2.19–5.03 s read
   * whole, and virsh 1.71–1.91 s, in interleaved runs).
   */
  receiveInPlace = true;
  /** Busy polling after each read while a stream is open, in ms (0: off). See `keepPolling`. */
  busyPoll: number;

  constructor(socket: Duplex, opts: PeerOptions) {
    super();
    this.role = opts.role;
    this.socket = socket;
    this.maxFrame = opts.maxFrame ?? FRAME_MAX;
    this.parser = new FrameParser({ maxFrame: this.maxFrame, alloc: allocFrame });
    this.keepaliveInterval = opts.keepaliveInterval ?? 5;
    this.keepaliveCount = opts.keepaliveCount ?? 5;
    this.streamPacketMax = opts.streamPacketMax ?? STREAM_PAYLOAD_MAX;
    this.abortTimeout = opts.abortTimeout ?? 30000;
    this.busyPoll = opts.busyPoll ?? 0;
    this.sendWindow = opts.sendWindow ?? 1 << 20;
    const hook = (socket as { [kReadHook]?: ReadHook })[kReadHook];
    if (hook) hook.attach(() => this.readTarget(), (n, buf) => this.onRead(n, buf));
    else socket.on('data', (buf: Buffer) => this.onData(buf));
    socket.on('drain', () => this.flushDrain());
    socket.on('error', (err) => this.destroy(new SparsevirtError('ERR_CONNECTION_CLOSED', `connection error: ${err.message}`, { cause: err })));
    socket.on('close', () => this.destroy(new SparsevirtError('ERR_CONNECTION_CLOSED', 'connection closed by peer')));
    socket.on('end', () => {
      // half-close from the peer: nothing more will arrive, so nothing pending can complete.
      this.destroy(new SparsevirtError('ERR_CONNECTION_CLOSED', 'connection closed by peer'));
    });
  }

  get closed(): boolean {
    return this.closedErr !== null;
  }

  // ---------------------------------------------------------------- sending

  /**
   * Queue a frame for the socket. Small frames (replies, holes, small data) are packed into one
   * output batch that is written once per tick: a file of 100,000 small extents becomes a few
   * thousand socket writes instead of 400,000. Large payloads are written beside their header,
   * never copied. Order is preserved across both paths.
   */
  sendFrame(h: Header, payload?: Uint8Array): void {
    if (this.closedErr) return;
    const n = payload ? payload.length : 0;
    if (chFrame.hasSubscribers) chFrame.publish({ dir: 'out', header: h, length: n });
    const total = FRAME_OVERHEAD + n;
    if (n > SMALL_PAYLOAD) {
      this.flushOut();
      const head = buildFrameHead(h, n);
      if (this.held) {
        this.held.push(head, payload as Buffer);
        this.heldBytes += total;
      } else {
        this.socket.cork();
        this.socket.write(head);
        this.socket.write(payload);
        this.socket.uncork();
        this.bytesQueued += total;
      }
      return;
    }
    const out = this.reserve(total);
    writeFrameHead(out, this.outEnd, total, h);
    if (payload) out.set(payload, this.outEnd + FRAME_OVERHEAD);
    this.commit(total);
  }

  /**
   * A STREAM_HOLE frame (virStreamSendHole's payload: the length as a hyper, flags 0), built in
   * the output batch: one for each of 100,000 holes, without an encoder or a buffer each.
   */
  sendHoleFrame(h: Header, length: number): void {
    if (this.closedErr) return;
    if (chFrame.hasSubscribers) chFrame.publish({ dir: 'out', header: h, length: ONE_HOLE });
    const total = FRAME_OVERHEAD + ONE_HOLE;
    const out = this.reserve(total);
    const at = this.outEnd;
    writeFrameHead(out, at, total, h);
    out.writeUInt32BE(Math.floor(length / 2 ** 32), at + FRAME_OVERHEAD);
    out.writeUInt32BE(length >>> 0, at + FRAME_OVERHEAD + 4);
    out.writeUInt32BE(0, at + FRAME_OVERHEAD + 8);
    this.commit(total);
  }

  /** The output batch, with room for `total` more bytes at `outEnd`. */
  private reserve(total: number): Buffer {
    if (this.outBuf === null || this.outEnd + total > this.outBuf.length) this.newBatch();
    return this.outBuf!;
  }

  /** The `total` bytes at `outEnd` are a frame: it leaves with the batch, flushed on the next tick. */
  private commit(total: number): void {
    this.outEnd += total;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(this.flushOutTick);
    }
  }

  /**
   * The socket's fd when frames may be written to it directly (a plain unix or TCP socket, the
   * native syscalls loaded), else -1. Direct writes happen only while Node's own write queue is
   * empty, so they never overtake bytes handed to `socket.write` before them.
   */
  private directFd(): number {
    // a destroyed socket's fd number may already belong to another file: never touch it again
    if (this.socket.destroyed) return -1;
    if (this.directFdCache !== undefined) return this.directFdCache;
    const handle = (this.socket as { _handle?: { fd?: number } })._handle;
    const fd = typeof handle?.fd === 'number' && handle.fd >= 0 && !(this.socket as { encrypted?: boolean }).encrypted ? handle.fd : -1;
    this.directFdCache = fd >= 0 && sys.nativeSyscallsAvailable() ? fd : -1;
    return this.directFdCache;
  }

  /**
   * On a unix socket, let the kernel hold a few large packets while file data goes out by
   * sendfile (see `sys.setSendBuffer`), and go back to the default for everything else: with
   * small packets in a big buffer the daemon outpaces virsh, whose client queues every packet
   * it reads on a list it walks to the end for each new one (libvirt 9.0), and slows down
   * quadratically (measured: 4 min instead of 3 s for 100,000 extents). A client sends to a
   * daemon, which reads no faster than it writes: it keeps the big buffer for the whole upload.
   * TCP keeps its own autotuning.
   */
  /**
   * Server side: the client said it takes a deep queue of small packets
   * (`Feature.SPARSEVIRT_DEEP_QUEUE`), so the big send buffer stays for them too. For 100,000
   * 4 KiB extents, our client's download went from 1.37 to 1.05 s: with the default buffer the
   * daemon is woken only once the queue fell below a quarter of ~208 KiB, and the client
   * drains that faster than the daemon refills it.
   */
  deepQueue = false;

  get sendBufferIsBig(): boolean {
    return this.sendBufferBig;
  }

  bigSendBuffer(big: boolean): void {
    if (this.sendBufferBig === big) return;
    this.sendBufferBig = big;
    const handle = (this.socket as { _handle?: { constructor?: { name?: string } } })._handle;
    const fd = this.directFd();
    if (fd < 0 || handle?.constructor?.name !== 'Pipe') return;
    // the kernel doubles what it is given; the default is net.core.wmem_default, undoubled
    sys.setSendBuffer(fd, big ? SOCKET_SEND_BUFFER : defaultSendBuffer() >> 1);
  }

  /**
   * Queue a frame whose payload is `length` bytes of the file `fd` at `offset` (a file in memory:
   * reading it never waits for a disk). When the socket can take it, the header is written and
   * the payload handed over by `sendfile(2)`: the kernel passes the file's pages to the socket
   * without a copy through user space. If the socket fills up mid-frame, a small piece goes
   * through Node's queue (its completion says the socket has room again) and `sendfile` goes
   * on; frames queued meanwhile are held back so that nothing overtakes the frame. Returns null
   * when the frame is on its way, or a promise of that; the file's bytes are read by then.
   */
  sendFileFrame(h: Header, fd: number, offset: number, length: number): Promise<void> | null {
    if (this.closedErr) return null;
    if (length < DIRECT_MIN) {
      // two syscalls per packet cost more than a copy: small data is read into the batch
      if (length <= SMALL_PAYLOAD) this.sendSmallFromFile(h, fd, offset, length);
      else this.sendFrame(h, readRange(fd, offset, length));
      return null;
    }
    if (chFrame.hasSubscribers) chFrame.publish({ dir: 'out', header: h, length });
    this.flushOut();
    const total = FRAME_OVERHEAD + length;
    const sfd = this.held === null && !this.socket.destroyed ? this.directFd() : -1;
    if (sfd < 0) {
      this.sendFrame(h, readRange(fd, offset, length));
      this.stats.bufferedFrames++;
      return null;
    }
    this.bigSendBuffer(true);
    sys.tuneMallocForStreaming();
    const head = this.directHead;
    writeFrameHead(head, 0, total, h);
    // Node's queue still holds earlier bytes: nothing may pass them, so the head joins them and
    // the payload follows by sendfile once they are out (below), not through a copy (2–4 % of a
    // 2 GiB upload to libvirtd went as 256 KiB copies, and the client's RSS reached 86 MiB)
    const w = this.socket.writableLength > 0 ? -sys.EAGAIN : sys.writeRaw(sfd, head);
    if (w < 0 && w !== -sys.EAGAIN) {
      // not ours to write (never again): queue it as usual
      this.directFdCache = -1;
      this.stats.bufferedFrames++;
      this.sendFrame(h, readRange(fd, offset, length));
      return null;
    }
    this.bytesQueued += total;
    let sent = 0;
    // The socket or Node's queue was full before the head was all in: the rest of the head goes
    // through Node's queue, whose completion says there is room again, and the payload by
    // sendfile after it.
    const headRest = w < 0 ? Buffer.from(head) : w < FRAME_OVERHEAD ? Buffer.from(head.subarray(w)) : null;
    if (headRest === null) {
      sent = this.pump(sfd, fd, offset, length);
      if (sent === length) return null;
    }
    // Mid-frame and the socket is full: hold every other write until this frame is out. The
    // caller may close its fd before the frame is out (the stream died meanwhile): the rest is
    // read through a duplicate of it, never through a number that may name another file by then.
    // A file that shrinks under a frame already announced cannot take the frame back: the rest
    // goes out as zeros (the length on the wire holds), and the stream fails with the reason
    // right after it, so the receiver drops it; the connection and its other streams go on.
    let shrunk: Error | null = null;
    const readOrZeros = (at: number, n: number): Buffer => {
      if (shrunk === null) {
        try {
          return readRange(fd, at, n);
        } catch (err) {
          shrunk = err as Error;
        }
      }
      return Buffer.alloc(n);
    };
    const own = sys.dupFd(fd);
    if (own < 0) {
      // no duplicate: finish the frame through Node's queue now, as a buffered frame would
      if (headRest !== null) this.socket.write(headRest);
      this.socket.write(readOrZeros(offset + sent, length - sent));
      this.stats.copiedBytes += length - sent;
      return shrunk === null ? null : Promise.reject(shrunk);
    }
    fd = own;
    this.held = [];
    this.stats.directStalls++;
    let resolve!: () => void;
    const frameOut = new Promise<void>((r) => (resolve = r));
    this.directDone = frameOut;
    // the frame is out (or the connection gone); its stream fails if the file shrank under it
    const finished = frameOut.then(() => {
      if (shrunk !== null) throw shrunk;
    });
    let ended = false;
    const done = (): void => {
      // once only: destroy() ends it, and the socket's last write callback may try again
      if (ended) return;
      ended = true;
      this.directAbort = null;
      const held = this.held ?? [];
      this.held = null;
      this.heldBytes = 0;
      this.directDone = null;
      fs.close(own, () => undefined);
      if (!this.closedErr) {
        for (const b of held) {
          this.socket.write(b);
          this.bytesQueued += b.length;
        }
      }
      resolve();
    };
    const step = (): void => {
      if (this.closedErr || this.socket.destroyed) return done();
      if (sent < length && shrunk === null && this.socket.writableLength === 0) sent += this.pump(sfd, fd, offset + sent, length - sent);
      if (sent === length) return done();
      const piece = readOrZeros(offset + sent, Math.min(STALL_PIECE, length - sent));
      sent += piece.length;
      this.stats.copiedBytes += piece.length;
      this.socket.write(piece, stepAfter);
    };
    // a failed write (EPIPE) comes before the socket is destroyed: read no further pieces
    const stepAfter = (err?: Error | null): void => (err ? done() : step());
    this.directAbort = done;
    if (headRest !== null) this.socket.write(headRest, stepAfter);
    else step(); // (may finish at once: directDone is set first)
    return finished;
  }

  /** `sendfile` until the socket is full or `length` bytes are out: the bytes sent. */
  private pump(sfd: number, fd: number, offset: number, length: number): number {
    let sent = 0;
    while (sent < length) {
      const r = sys.sendfile(sfd, fd, offset + sent, length - sent);
      if (r <= 0) {
        if (r < 0 && r !== -sys.EAGAIN) this.directFdCache = -1; // e.g. EINVAL: not for this pair of fds
        break;
      }
      sent += r;
    }
    this.stats.directBytes += sent;
    return sent;
  }

  /** A small frame whose payload is read from the file straight into the output batch. */
  private sendSmallFromFile(h: Header, fd: number, offset: number, length: number): void {
    if (chFrame.hasSubscribers) chFrame.publish({ dir: 'out', header: h, length });
    const total = FRAME_OVERHEAD + length;
    const out = this.reserve(total);
    // the payload first: a failed read leaves nothing half-made in the batch
    const at = this.outEnd + FRAME_OVERHEAD;
    readFileInto(fd, offset, out.subarray(at, at + length));
    writeFrameHead(out, this.outEnd, total, h);
    this.commit(total);
  }

  private readonly flushOutTick = (): void => {
    this.flushScheduled = false;
    this.flushOut();
  };

  /**
   * Flush and start a new output batch. The old one goes back to the pool once every write of it
   * completed (an upload of 100,000 small extents otherwise leaves 1,600 of them to the GC).
   */
  private newBatch(): void {
    this.flushOut();
    const old = this.outState;
    if (old) {
      old.retired = true;
      if (old.pending === 0) recycleBatch(old.buf);
    }
    let buf = batchPool.pop();
    if (buf === undefined) {
      buf = Buffer.allocUnsafeSlow(OUT_BATCH);
      bufferStats.outputBatches++;
    }
    this.outBuf = buf;
    this.outState = { buf: this.outBuf, pending: 0, retired: false };
    this.outStart = this.outEnd = 0;
  }

  /** Hand the batched frames to the socket (the bytes already handed over are never reused). */
  private flushOut(): void {
    if (this.outBuf === null || this.outEnd === this.outStart || this.closedErr) return;
    const batch = this.outBuf.subarray(this.outStart, this.outEnd);
    const state = this.outState!;
    if (this.held) {
      this.held.push(batch);
      this.heldBytes += batch.length;
      state.pending = Infinity; // written later without a callback: never reused
    } else {
      if (this.role === 'server' && this.sendBufferBig !== this.deepQueue) this.bigSendBuffer(this.deepQueue);
      state.pending++;
      let settled = false;
      const written = (): void => {
        if (settled) return;
        settled = true;
        if (--state.pending === 0 && state.retired) recycleBatch(state.buf);
      };
      this.socket.write(batch, written);
      // Nothing left in Node's queue: the kernel took the bytes during write(). The callback
      // comes on a later tick, and a sender that never waits (small packets into a deep
      // socket buffer) runs on microtasks, before any tick: without this, 1,255 of 1,613
      // batches of a 100,000-extent download were new allocations (daemon RSS 200+ MiB).
      if (this.socket.writableLength === 0) written();
      // (held bytes count once written: keepalive reads progress from this counter)
      this.bytesQueued += batch.length;
    }
    this.outStart = this.outEnd;
  }

  /** Bytes written but not yet taken by the kernel, plus the batch. */
  get outgoingBytes(): number {
    return this.socket.writableLength + (this.outEnd - this.outStart) + this.heldBytes;
  }

  /** Resolves when the socket can take more (immediately if it can). */
  drained(): Promise<void> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    this.flushOut();
    if (this.directDone) return this.directDone.then(() => this.drained());
    if (!(this.socket as any).writableNeedDrain) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  private flushDrain(): void {
    const w = this.drainWaiters;
    this.drainWaiters = [];
    for (const f of w) f();
  }

  nextSerial(): number {
    const s = this.serial;
    this.serial = (this.serial + 1) >>> 0;
    return s;
  }

  /** Client: call a procedure of the REMOTE program and decode its reply. */
  call<A, R>(proc: { num: number; args: Codec<A>; ret: Codec<R> }, args: A, opts: { serial?: number; signal?: AbortSignal; timeout?: number } = {}): Promise<R> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    const serial = opts.serial ?? this.nextSerial();
    const w = new XdrWriter(128);
    proc.args.enc(w, args);
    return new Promise<R>((resolve, reject) => {
      const entry: PendingCall = { ret: proc.ret as Codec<unknown>, resolve: resolve as (v: unknown) => void, reject };
      let timer: NodeJS.Timeout | undefined;
      const onAbort = () => {
        this.abandon(serial);
        entry.cleanup?.();
        reject(new SparsevirtError('ERR_ABORTED', 'call aborted', { cause: opts.signal?.reason }));
      };
      if (opts.signal) {
        if (opts.signal.aborted) return onAbort();
        opts.signal.addEventListener('abort', onAbort, { once: true });
      }
      if (opts.timeout) {
        timer = setTimeout(() => {
          this.abandon(serial);
          entry.cleanup?.();
          reject(new SparsevirtError('ERR_TIMEOUT', `no reply to procedure ${proc.num} within ${opts.timeout} ms`));
        }, opts.timeout);
      }
      entry.cleanup = () => {
        if (timer) clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
      };
      this.pending.set(serial, entry);
      if (this.readingStopped) this.updateReading();
      this.sendFrame({ prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: proc.num, type: MessageType.CALL, serial, status: Status.OK }, w.view());
    });
  }

  /**
   * The stream-opening call on `serial` was given up (aborted, timed out): if the server still
   * accepts it, abort the stream it opened instead of leaving it running.
   */
  abortStreamIfOpened(serial: number): void {
    if (!this.abandoned.has(serial)) return;
    this.abortWhenOpened.add(serial);
    if (this.abortWhenOpened.size > 1024) this.abortWhenOpened.delete(this.abortWhenOpened.values().next().value as number);
  }

  /** A call we stopped waiting for: its reply may still come and must not look like a stray one. */
  private abandon(serial: number): void {
    if (!this.pending.delete(serial)) return;
    if (this.pausedBy > 0) this.updateReading();
    this.abandoned.add(serial);
    if (this.abandoned.size > 1024) this.abandoned.delete(this.abandoned.values().next().value as number);
  }

  /** Server: answer a CALL with a return value. */
  reply<R>(call: Header, ret: Codec<R>, value: R): void {
    const w = new XdrWriter(128);
    ret.enc(w, value);
    this.sendFrame({ ...call, type: MessageType.REPLY, status: Status.OK }, w.view());
  }

  /** Server: answer a CALL with an error. */
  replyError(call: Header, err: RemoteErrorFields): void {
    this.sendFrame({ ...call, type: MessageType.REPLY, status: Status.ERROR }, encodeRemoteError(err));
  }

  // ---------------------------------------------------------------- streams

  /**
   * Register a stream on (proc, serial). The client registers before sending the CALL so that
   * packets arriving early are not lost; the daemon after it accepted the CALL.
   * `sending` is true for the side that produces data (client upload, daemon download).
   */
  openStream(proc: number, serial: number, opts: { sparse: boolean; sending: boolean }): WireStream {
    const key = streamKey(proc, serial);
    if (this.streams.has(key)) throw new SparsevirtError('ERR_STREAM_STATE', `a stream is already open on serial ${serial}`);
    this.ended.delete(key);
    const s = new WireStream(this, proc, serial, opts.sparse, opts.sending);
    this.streams.set(key, s);
    return s;
  }

  hasStream(proc: number, serial: number): boolean {
    return this.streams.has(streamKey(proc, serial));
  }

  /** @internal */
  streamClosed(s: WireStream): void {
    const key = streamKey(s.proc, s.serial);
    if (this.streams.get(key) === s) this.streams.delete(key);
    this.ended.add(key);
    if (this.ended.size > 256) this.ended.delete(this.ended.values().next().value as number);
    if (s.pausing) {
      // release this stream's hold once: its Stream may call resumeIncoming() again when it ends.
      s.pausing = false;
      this.resumeReading();
    }
  }

  get openStreams(): number {
    return this.streams.size;
  }

  /**
   * @internal Incoming flow control: pause the socket while any stream's queue is full, unless a
   * call waits for its reply. The reply comes on the same socket, behind stream packets nobody
   * reads yet (`vol.info()` right after `vol.download()`); so while calls wait, reading goes on
   * past the full queues, up to `READ_PAST_FULL_MAX` bytes. A server sends its reply after at
   * most what its socket buffers held: libvirtd queues one stream packet at a time, sparsevirtd
   * at most its send window.
   */
  pauseReading(): void {
    if (this.pausedBy++ === 0) this.updateReading();
  }
  resumeReading(): void {
    if (this.pausedBy > 0 && --this.pausedBy === 0) {
      this.overshoot = 0;
      this.updateReading();
    }
  }

  private updateReading(): void {
    const stop = this.pausedBy > 0 && (this.pending.size === 0 || this.overshoot >= READ_PAST_FULL_MAX) && this.closedErr === null;
    if (stop === this.readingStopped) return;
    this.readingStopped = stop;
    if (stop) {
      this.socket.pause();
    } else {
      this.lastRecv = Date.now();
      this.socket.resume();
    }
  }

  /** Bytes read while streams' queues are full (only calls waiting keep the socket read then). */
  private readPastFull(n: number): void {
    this.overshoot += n;
    if (this.overshoot >= READ_PAST_FULL_MAX) this.updateReading();
  }

  // ---------------------------------------------------------------- keepalive

  /** Start pinging after `keepaliveInterval` s of silence (once the peer agreed to feature 10). */
  startKeepalive(): void {
    if (this.kaTimer || this.keepaliveInterval <= 0 || this.closedErr) return;
    const ms = this.keepaliveInterval * 1000;
    this.kaTimer = setInterval(() => this.keepaliveTick(ms), Math.max(50, Math.floor(ms / 5)));
    this.kaTimer.unref();
  }

  private keepaliveTick(ms: number): void {
    const now = Date.now();
    if (this.readingStopped) {
      // We stopped reading on purpose: silence is ours, not the peer's. The peer's PINGs wait
      // unread in the socket meanwhile, so tell it we are alive with a PING of our own every
      // interval (its PONG is read when we resume); otherwise a slow consumer is declared dead.
      this.lastRecv = now;
      if (now - this.kaLastPausedPing >= ms) {
        this.kaLastPausedPing = now;
        this.sendFrame({ prog: KEEPALIVE_PROGRAM, vers: KEEPALIVE_VERSION, proc: KEEPALIVE_PING, type: MessageType.MESSAGE, serial: 0, status: Status.OK });
      }
      return;
    }
    // Bytes the kernel took from a backlog we had (the socket could not take them at the last
    // tick) were read by the peer: it is alive, only slow. A stopped peer takes nothing. A write
    // completes only once all of it is in the kernel; libuv's queue size shows partial progress.
    const pendingOut = this.socket.writableLength;
    const accepted = this.bytesQueued - pendingOut;
    const handle = (this.socket as { _handle?: { writeQueueSize?: unknown } })._handle;
    const queued = typeof handle?.writeQueueSize === 'number' ? handle.writeQueueSize : 0;
    // Past Node's queue: what the kernel holds unread shrinks while the peer reads (a unix
    // socket holds up to 2 MiB: at a slow reader's pace that is longer than a keepalive window).
    const fd = this.directFd();
    const outq = fd >= 0 ? sys.socketOutq(fd) : -1;
    const drained = (this.kaPending > 0 && (accepted > this.kaAccepted || queued < this.kaQueued)) || (this.kaOutq > 0 && outq >= 0 && outq < this.kaOutq);
    this.kaOutq = outq;
    this.kaPending = pendingOut;
    this.kaAccepted = accepted;
    this.kaQueued = queued;
    if (drained) {
      this.lastRecv = now;
      this.pingsOut = 0;
      return;
    }
    const silent = now - this.lastRecv;
    if (silent < ms * (this.pingsOut + 1)) return;
    if (this.pingsOut >= this.keepaliveCount) {
      this.destroy(new SparsevirtError('ERR_KEEPALIVE_TIMEOUT',
        `no answer from the peer for ${Math.round(silent / 1000)} s (${this.pingsOut} keepalive pings unanswered)`));
      return;
    }
    this.pingsOut++;
    this.sendFrame({ prog: KEEPALIVE_PROGRAM, vers: KEEPALIVE_VERSION, proc: KEEPALIVE_PING, type: MessageType.MESSAGE, serial: 0, status: Status.OK });
  }

  // ---------------------------------------------------------------- receiving

  private readonly onMessageBound = (m: Message): void => this.onMessage(m);

  private onData(buf: Buffer): void {
    if (this.busyPoll > 0 && this.streams.size > 0) keepPolling(this.busyPoll);
    if (this.pausedBy > 0) this.readPastFull(buf.length);
    this.lastRecv = Date.now();
    this.pingsOut = 0;
    try {
      this.parser.push(buf, this.onMessageBound);
    } catch (err) {
      this.destroy(err as Error);
    }
  }

  /** The buffer the next socket read lands in (sockets opened with a ReadHook). */
  private readTarget(): Buffer {
    if (this.inPlace !== null) {
      const p = this.inPlace;
      tailBuffer ??= Buffer.allocUnsafeSlow(TAIL_MAX);
      const max = this.spliceOff || p.error !== null ? TAIL_MAX : TAIL_READ;
      this.tailTarget = tailBuffer.subarray(0, Math.min(p.length - p.done, max));
      return this.tailTarget;
    }
    if (this.inHeadHave > 0 || (this.inPlaceReceivers > 0 && this.bigFrames && this.receiveInPlace && !this.spliceOff && this.parser.idle && this.directFd() >= 0)) {
      // Data packets flowing to a consumer that takes them in place: read the next header
      // alone; a data packet's payload then goes from the socket to the file by splice.
      this.inHeadTarget = this.inHead.subarray(this.inHeadHave);
      return this.inHeadTarget;
    }
    const t = this.parser.readTarget();
    this.hookTarget = t;
    if (t) return t;
    if (this.bigFrames) {
      // Stream data is flowing: read the next frame straight into a buffer of its likely size.
      this.freshTarget = takeFrameBuffer();
      return this.freshTarget;
    }
    // the rest of the read slab, if it can take a read of the usual size
    if (this.readSlab === null || this.readSlab.length - this.readSlabUsed < READ_SLAB_MIN) {
      this.readSlab = Buffer.allocUnsafeSlow(READ_SLAB);
      this.readSlabUsed = 0;
    }
    this.slabTarget = this.readSlab.subarray(this.readSlabUsed);
    return this.slabTarget;
  }

  private onRead(n: number, buf: Buffer): void {
    if (this.busyPoll > 0 && this.streams.size > 0) keepPolling(this.busyPoll);
    if (this.pausedBy > 0) this.readPastFull(n);
    if (buf === this.tailTarget) {
      this.tailTarget = null;
      this.lastRecv = Date.now();
      this.pingsOut = 0;
      try {
        this.inPlaceTail(n, buf);
      } catch (err) {
        this.destroy(err as Error);
      }
      return;
    }
    if (buf === this.inHeadTarget) {
      this.inHeadTarget = null;
      this.lastRecv = Date.now();
      this.pingsOut = 0;
      this.onInHead(n);
      return;
    }
    // Three kinds of read target: a fresh frame-sized buffer while big packets flow (a frame
    // alone in it keeps it), the rest of a frame being assembled, and the rest of the read slab
    // for every other read. Frames read into the slab stay there (views, no copy: 100,000 4 KiB
    // extents were 400 MiB of copies out of a reused scratch buffer), and the next read goes
    // after them, so a peer that sends one small frame per read (libvirtd: 200,000 frames for
    // 100,000 extents) uses up only the bytes it sent.
    if (buf === this.freshTarget) {
      this.freshTarget = null;
      this.lastRecv = Date.now();
      this.pingsOut = 0;
      try {
        // one whole frame, alone in the buffer: its payload may bring the buffer back
        if (this.parser.idle && n >= 4 && buf.readUInt32BE(0) === n) recyclable.set(buf.buffer, buf);
        if (this.parser.pushOwned(buf, n, this.onMessageBound) === 'free') {
          if (framePool.length < FRAME_POOL_MAX) framePool.push(buf);
        } else if (this.parser.assemblingIn(buf)) {
          this.adopted = buf;
        }
      } catch (err) {
        this.destroy(err as Error);
      }
      return;
    }
    if (buf === this.slabTarget) {
      this.slabTarget = null;
      this.readSlabUsed += (n + 7) & ~7;
      this.lastRecv = Date.now();
      this.pingsOut = 0;
      try {
        // whole frames stay views of the slab; a frame cut by the read's end is assembled apart
        this.parser.push(buf.subarray(0, n), this.onMessageBound);
      } catch (err) {
        this.destroy(err as Error);
      }
      return;
    }
    if (buf !== this.hookTarget) {
      // bytes read before this Peer existed, replayed in copies of their own
      this.lastRecv = Date.now();
      try {
        this.parser.push(buf.subarray(0, n), this.onMessageBound);
      } catch (err) {
        this.destroy(err as Error);
      }
      return;
    }
    this.hookTarget = null;
    this.lastRecv = Date.now();
    this.pingsOut = 0;
    try {
      const adopted = this.adopted;
      if (adopted !== null && !this.parser.assemblingIn(adopted)) this.adopted = null;
      else if (adopted !== null && this.parser.completes(n)) {
        // the frame assembled in place fills the buffer's head alone: its payload may bring it back
        this.adopted = null;
        recyclable.set(adopted.buffer, adopted);
      }
      this.parser.filled(n, this.onMessageBound);
    } catch (err) {
      this.destroy(err as Error);
    }
  }

  // ---------------------------------------------------------------- receiving in place

  /** @internal A receiving stream's consumer takes data packets in place from now on (+1), or no more (-1). */
  inPlaceReceiver(delta: number): void {
    this.inPlaceReceivers += delta;
  }

  /** A header read alone (see `readTarget`): a data packet for a stream that takes it in place, or anything else. */
  private onInHead(n: number): void {
    this.inHeadHave += n;
    if (this.inHeadHave < FRAME_OVERHEAD) return;
    this.inHeadHave = 0;
    const head = this.inHead;
    try {
      const len = head.readUInt32BE(0);
      const payload = len - FRAME_OVERHEAD;
      if (payload >= BIG_FRAME && len <= this.maxFrame) {
        const h = readHeader(head, 4);
        if (h.type === MessageType.STREAM && h.status === Status.CONTINUE && h.prog === REMOTE_PROGRAM) {
          const s = this.streams.get(streamKey(h.proc, h.serial));
          const t = s?.directTarget(payload);
          if (s && t && s.inPlaceFd >= 0) {
            if (chFrame.hasSubscribers) chFrame.publish({ dir: 'in', header: h, length: payload });
            this.smallRun = 0;
            this.inPlace = { stream: s, key: t.key, fd: s.inPlaceFd, rangeFd: t.fd, offset: t.offset, length: payload, done: 0, error: null };
            this.pumpInPlace();
            return;
          }
        }
      }
      // anything else: the parser takes the header and assembles the rest as usual
      this.parser.pushCopy(head, FRAME_OVERHEAD, this.onMessageBound);
    } catch (err) {
      this.destroy(err as Error);
    }
  }

  /**
   * Move the payload of the in-place packet from the socket to its file: socket → pipe (the
   * kernel passes the received pages along) → file at its offset (one copy, in the kernel). Stops
   * when the socket has nothing more for now: the next read brings the rest (`inPlaceTail`).
   */
  private pumpInPlace(): void {
    const p = this.inPlace!;
    const sock = this.directFd();
    const pipe = splicePipe();
    while (p.done < p.length && p.error === null && !this.spliceOff) {
      if (pipe === null || sock < 0) {
        this.spliceOff = true;
        break;
      }
      if (!this.inPlaceLive(p)) break;
      const r = sys.splice(sock, pipe[1], -1, p.length - p.done, sys.SPLICE_F_MOVE | sys.SPLICE_F_NONBLOCK);
      if (r === -sys.EAGAIN || r === 0) return; // (0: the peer closed; the read that follows sees it)
      if (r < 0) {
        // this socket cannot splice: the rest of the packet comes by reads, later ones as usual
        debug('splice from the socket failed (%s): packets are read', sys.errnoException(r, 'splice').code);
        this.spliceOff = true;
        break;
      }
      let left = r;
      while (left > 0) {
        const w = p.error === null ? sys.splice(pipe[0], p.fd, p.offset + p.done, left, sys.SPLICE_F_MOVE) : -1;
        if (w > 0) {
          left -= w;
          p.done += w;
          this.stats.splicedBytes += w;
          continue;
        }
        // the file refused (ENOSPC, EIO…): these bytes are lost; the stream's consumer hears it
        p.error ??= sys.errnoException(w === 0 ? -5 : w, 'splice');
        drainPipe(pipe, left);
        p.done += left;
        left = 0;
      }
    }
    if (p.done === p.length) this.endInPlace();
  }

  /** Payload bytes of the in-place packet that came by a read: written at their place, or dropped after an error. */
  private inPlaceTail(n: number, buf: Buffer): void {
    const p = this.inPlace!;
    if (p.error === null && this.inPlaceLive(p)) {
      try {
        let have = 0;
        while (have < n) have += fs.writeSync(p.fd, buf, have, n - have, p.offset + p.done + have);
      } catch (err) {
        p.error = err as Error;
      }
    }
    p.done += n;
    if (p.done === p.length) this.endInPlace();
    else this.pumpInPlace();
  }

  /** Whether the consumer still takes this packet (it stops, or the stream ends, in between reads). */
  private inPlaceLive(p: InPlace): boolean {
    if (p.error !== null) return false;
    if (p.stream.directTarget(0)?.key === p.key) return true;
    p.error = new SparsevirtError('ERR_STREAM_STATE', 'the stream stopped taking data in place in the middle of a packet');
    return false;
  }

  private endInPlace(): void {
    const p = this.inPlace!;
    this.inPlace = null;
    this.stats.splicedFrames++;
    const range: WrittenRange = { kind: 'written', fd: p.rangeFd, offset: p.offset, length: p.length };
    if (p.error !== null) range.error = p.error;
    p.stream.onWritten(range);
  }

  private onMessage(m: Message): void {
    // Big data packets flowing: read the next frame into a fresh frame-sized buffer. A hole
    // packet between two data extents does not end that; small data or anything else does.
    // (libvirtd sends each 256 KiB it reads as a 262,120-byte packet and a 24-byte one: a few
    // small packets in a row end it.)
    if (m.payload.length >= BIG_FRAME) {
      this.bigFrames = true;
      this.smallRun = 0;
    } else if (m.type !== MessageType.STREAM_HOLE && ++this.smallRun >= 4) {
      this.bigFrames = false;
    }
    // many large buffers will come and go: keep their memory mapped (loads koffi: not before)
    if (this.bigFrames) sys.tuneMallocForStreaming();
    if (chFrame.hasSubscribers) chFrame.publish({ dir: 'in', header: m, length: m.payload.length });
    if (m.prog === KEEPALIVE_PROGRAM) {
      if (m.type === MessageType.MESSAGE && m.proc === KEEPALIVE_PING) {
        this.sendFrame({ prog: KEEPALIVE_PROGRAM, vers: KEEPALIVE_VERSION, proc: KEEPALIVE_PONG, type: MessageType.MESSAGE, serial: 0, status: Status.OK });
      }
      return;
    }
    switch (m.type) {
      case MessageType.CALL:
      case MessageType.CALL_WITH_FDS:
        if (this.role === 'server') this.emit('call', m);
        else debug('client ignores a CALL: %s', describeHeader(m));
        return;
      case MessageType.REPLY:
      case MessageType.REPLY_WITH_FDS:
        if (this.role === 'client') this.onReply(m);
        else this.emit('unexpected', m);
        return;
      case MessageType.STREAM:
      case MessageType.STREAM_HOLE: {
        const key = streamKey(m.proc, m.serial);
        const s = this.streams.get(key);
        if (s) s.onPacket(m);
        else if (!this.ended.has(key)) this.emit('orphanStreamPacket', m);
        return;
      }
      case MessageType.MESSAGE:
        debug('event message ignored: %s', describeHeader(m));
        return;
      default:
        this.emit('unexpected', m);
    }
  }

  private onReply(m: Message): void {
    const p = this.pending.get(m.serial);
    if (!p) {
      // libvirt 9.0 reports a failed STREAM_HOLE as a REPLY/ERROR on the stream's serial (B3).
      const s = this.streams.get(streamKey(m.proc, m.serial));
      if (s && m.status === Status.ERROR) s.onPacket({ ...m, type: MessageType.STREAM });
      else if (m.status === Status.ERROR && this.ended.has(streamKey(m.proc, m.serial))) {
        // libvirtd may answer an abort (or a packet it failed to write) of a stream we already
        // closed with a REPLY/ERROR: late news of a stream that is gone, not a lost conversation
        debug('late error reply for an ended stream: %s', describeHeader(m));
      } else if (this.abandoned.delete(m.serial)) {
        debug('late reply to an abandoned call: %s', describeHeader(m));
        // a stream the caller gave up while it was being opened: the server opened it anyway,
        // so abort it on the wire (its confirmation is dropped as a late packet).
        if (this.abortWhenOpened.delete(m.serial) && m.status === Status.OK) {
          this.sendFrame({ ...m, type: MessageType.STREAM, status: Status.ERROR });
        }
      }
      else {
        // As libvirt's client: a reply nobody asked for means the two sides disagree about the
        // conversation (a lost or forged serial), and a call may wait forever: give up now.
        this.destroy(new SparsevirtError('ERR_PROTOCOL', `reply without a pending call (${describeHeader(m)})`));
      }
      return;
    }
    this.pending.delete(m.serial);
    if (this.pausedBy > 0) this.updateReading();
    p.cleanup?.();
    try {
      if (m.status === Status.OK) p.resolve(p.ret.dec(new XdrReader(m.payload)));
      else if (m.status === Status.ERROR) p.reject(decodeRemoteError(m.payload));
      else p.reject(new SparsevirtError('ERR_PROTOCOL', `reply with unexpected status ${m.status}`));
    } catch (err) {
      p.reject(err as Error);
    }
  }

  // ---------------------------------------------------------------- teardown

  /** Close gracefully: stop keepalive and end the socket once written. */
  close(): void {
    if (this.kaTimer) clearInterval(this.kaTimer);
    this.kaTimer = null;
    if (this.directDone) {
      // a frame is half out and others wait behind it: end once they are all written
      void this.directDone.then(() => this.close());
      return;
    }
    this.flushOut();
    this.socket.end();
  }

  /** Tear down: every pending call and stream fails with `err`. */
  destroy(err: Error): void {
    if (this.closedErr) return;
    this.closedErr = err;
    if (this.kaTimer) clearInterval(this.kaTimer);
    this.kaTimer = null;
    for (const p of this.pending.values()) {
      p.cleanup?.();
      p.reject(err);
    }
    this.pending.clear();
    for (const s of [...this.streams.values()]) s.fail(err);
    this.streams.clear();
    this.flushDrain();
    this.directAbort?.();
    this.inPlace = null;
    this.outBuf = null;
    this.outState = null;
    this.socket.destroy();
    this.emit('close', err);
  }
}

/**
 * A stream's key in a connection: its procedure and serial as one number, exact for every
 * procedure there is (< 2^21). A forged larger one lands at 2^53 or above: no stream's key.
 */
function streamKey(proc: number, serial: number): number {
  return proc * 2 ** 32 + serial;
}

type Waiter = { resolve: () => void; reject: (e: Error) => void };

/**
 * One stream on the wire: implements `StreamChannel` for a `Stream` and turns its calls into
 * STREAM / STREAM_HOLE packets, and incoming packets into `StreamInbound` calls.
 *
 * Who says what (libvirt 9.0):
 *  - the producer sends data/holes; the daemon ends a download with an empty CONTINUE (EOF),
 *    the client ends an upload with STREAM/OK (finish);
 *  - the client acknowledges a download's EOF with STREAM/OK; the daemon confirms a client's
 *    finish or abort with STREAM/OK, or reports failure with STREAM/ERROR;
 *  - the client aborts with an empty STREAM/ERROR.
 */
export class WireStream implements StreamChannel {
  private inbound: StreamInbound | null = null;
  private early: Array<() => void> = [];
  private confirm: Waiter | null = null;
  private aborting = false;
  private done = false;
  private gotEnd = false;
  private err: Error | null = null;
  pausing = false;
  /** Our duplicate of the file the consumer takes packets in place into (`receiveDirect`), or -1. */
  inPlaceFd = -1;
  private readonly head: Header;
  private readonly holeHead: Header;

  constructor(
    readonly peer: Peer,
    readonly proc: number,
    readonly serial: number,
    readonly sparse: boolean,
    readonly sending: boolean,
  ) {
    this.head = { prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc, type: MessageType.STREAM, serial, status: Status.CONTINUE };
    this.holeHead = { ...this.head, type: MessageType.STREAM_HOLE };
  }

  private get isClient(): boolean {
    return this.peer.role === 'client';
  }

  /** Connect the stream that consumes incoming chunks; packets that came first are replayed. */
  attach(inbound: StreamInbound): void {
    this.inbound = inbound;
    const q = this.early;
    this.early = [];
    for (const f of q) f();
  }

  private toInbound(f: (i: StreamInbound) => void): void {
    if (this.inbound) f(this.inbound);
    else if (this.early.length < 64) this.early.push(() => f(this.inbound!));
    else this.fail(new SparsevirtError('ERR_PROTOCOL', 'too many stream packets before the stream was attached'));
  }

  // ---- StreamChannel: outgoing

  async write(chunk: Chunk): Promise<void> {
    const p = this.send(chunk);
    if (p !== null) await p;
  }

  /** Data from a file in memory, `length` bytes at `offset`: see `Peer.sendFileFrame`. */
  async writeFile(fd: number, offset: number, length: number): Promise<void> {
    const p = this.send({ kind: 'file', fd, offset, length });
    if (p !== null) await p;
  }

  /**
   * `write` and `writeFile` without a promise while the socket takes more (see
   * `StreamChannel.send`): data and holes become frames in the Peer's output batch at once.
   */
  send(item: Chunk | FileRange): Promise<void> | null {
    if (this.err) throw this.err;
    if (this.done) throw new SparsevirtError('ERR_STREAM_STATE', 'stream is closed');
    const peer = this.peer;
    // an upload with data: let the socket hold a few packets (see Peer.bigSendBuffer). Small
    // ranges of a file too: with 100,000 4 KiB extents and the default buffer (~208 KiB, half
    // a millisecond of the daemon's work) sparsevirtd waited for us between batches, and the
    // upload took 1.03-1.10 s instead of 0.67-0.80 s (with net.core.wmem_max of 4 MiB; it caps
    // the buffer, and some kernels default it to 208 KiB). Neutral against libvirtd.
    if (item.kind !== 'hole' && peer.role === 'client' && !peer.sendBufferIsBig) peer.bigSendBuffer(true);
    if (item.kind === 'file') return this.sendFile(item.fd, item.offset, item.length, 0);
    if (item.kind === 'data') {
      const b = item.bytes;
      const max = peer.streamPacketMax;
      if (b.length <= max) peer.sendFrame(this.head, b);
      else for (let off = 0; off < b.length; off += max) peer.sendFrame(this.head, b.subarray(off, Math.min(off + max, b.length)));
    } else {
      if (!this.sparse) throw new SparsevirtError('ERR_STREAM_NOT_SPARSE', 'cannot send a hole: the stream was not opened with the sparse flag');
      if (!(item.length > 0) || !Number.isSafeInteger(item.length)) throw new SparsevirtError('ERR_INVALID_ARG', `hole length must be a positive integer, got ${item.length}`);
      peer.sendHoleFrame(this.holeHead, item.length);
    }
    return this.backpressure();
  }

  /** The frames of a file range from packet offset `from` on (see `Peer.sendFileFrame`). */
  private sendFile(fd: number, offset: number, length: number, from: number): Promise<void> | null {
    const peer = this.peer;
    const max = peer.streamPacketMax;
    for (let off = from; off < length; off += max) {
      // (after our abort the rest of a range that waited is not sent: its fd may be closed by now)
      if (this.done || this.aborting) throw new SparsevirtError('ERR_STREAM_STATE', 'stream is closed');
      let pending: Promise<void> | null;
      try {
        pending = peer.sendFileFrame(this.head, fd, offset + off, Math.min(max, length - off));
      } catch (err) {
        throw this.sourceFailed(err as Error);
      }
      if (pending !== null) return this.afterStall(pending, fd, offset, length, off + max);
      if (this.err) throw this.err;
    }
    return this.backpressure();
  }

  /** A frame stalled mid-payload: the rest of the range once it is out. */
  private async afterStall(pending: Promise<void>, fd: number, offset: number, length: number, next: number): Promise<void> {
    try {
      await pending;
    } catch (err) {
      throw this.sourceFailed(err as Error);
    }
    if (this.err) throw this.err;
    const p = this.sendFile(fd, offset, length, next);
    if (p !== null) await p;
  }

  /** Null while the socket takes more, else a promise of room (rejecting if the stream failed meanwhile). */
  private backpressure(): Promise<void> | null {
    const peer = this.peer;
    if (peer.outgoingBytes <= peer.sendWindow) return null;
    return peer.drained().then(this.checkFailed);
  }

  private readonly checkFailed = (): void => {
    if (this.err) throw this.err;
  };

  /**
   * The file failed under a frame (it shrank, EIO): not the connection. The peer is told here,
   * since a stream whose channel rejected never calls it again: the daemon reports the error
   * with STREAM/ERROR, the client aborts. The connection goes on.
   */
  private sourceFailed(err: Error): Error {
    if (this.err) return this.err;
    if (this.done || this.peer.closed) return err;
    if (this.aborting) {
      // our abort is already on the wire: nothing more to say
      this.fail(err);
      return err;
    }
    // as libvirtd reports a failed read of the volume: "cannot read from stream: <reason>"
    const report = this.isClient ? undefined : encodeRemoteError(toRemoteFields(new SparsevirtError('ERR_IO', `cannot read from stream: ${err.message}`, { cause: err })));
    this.peer.sendFrame({ ...this.head, status: Status.ERROR }, report);
    this.fail(err);
    return err;
  }

  finish(): Promise<void> {
    if (this.err) return Promise.reject(this.err);
    if (this.done) return Promise.resolve();
    if (!this.isClient && !this.sending) {
      // daemon, upload: the client finished and everything is written: confirm.
      this.peer.sendFrame({ ...this.head, status: Status.OK });
      this.close();
      return Promise.resolve();
    }
    const p = this.waitConfirm();
    if (this.isClient) this.peer.sendFrame({ ...this.head, status: Status.OK }); // finish
    else this.peer.sendFrame(this.head); // daemon download: empty CONTINUE = EOF
    return p;
  }

  abort(reason: Error): Promise<void> {
    if (this.done || this.err) {
      this.close();
      return Promise.resolve();
    }
    if (!this.isClient) {
      // daemon: report the failure to the client; no confirmation follows.
      this.peer.sendFrame({ ...this.head, status: Status.ERROR }, encodeRemoteError(toRemoteFields(reason)));
      this.close();
      return Promise.resolve();
    }
    this.aborting = true;
    const p = this.waitConfirm();
    this.peer.sendFrame({ ...this.head, status: Status.ERROR });
    const t = setTimeout(() => {
      // no confirmation in time: the abort is done on our side anyway; never leave the caller waiting.
      const c = this.confirm;
      this.confirm = null;
      this.close();
      c?.resolve();
    }, this.peer.abortTimeout);
    t.unref();
    return p.then(() => clearTimeout(t), () => clearTimeout(t));
  }

  receiveDirect(fd: number | null): boolean {
    if (fd === null) {
      const dup = this.inPlaceFd;
      if (dup < 0) return false;
      // The Peer checks the stream's target before every write (it is gone now): nothing is
      // written through this fd again, also in the middle of a packet.
      this.inPlaceFd = -1;
      this.peer.inPlaceReceiver(-1);
      fs.close(dup, () => undefined);
      return false;
    }
    if (this.done || this.inPlaceFd >= 0) return false;
    const dup = sys.dupFd(fd);
    if (dup < 0) return false;
    this.inPlaceFd = dup;
    this.peer.inPlaceReceiver(1);
    return true;
  }

  /** @internal Where a data packet arriving now goes in place, if its consumer takes it so. */
  directTarget(length: number): DirectTarget | null {
    if (this.sending || this.confirm || this.done || this.inbound === null) return null;
    return this.inbound.directTarget?.(length) ?? null;
  }

  /** @internal A data packet the Peer wrote in place. */
  onWritten(range: WrittenRange): void {
    if (this.done) return;
    this.toInbound((i) => i.deliver(range));
  }

  pauseIncoming(): void {
    if (this.pausing || this.done) return;
    this.pausing = true;
    this.peer.pauseReading();
  }

  resumeIncoming(): void {
    if (!this.pausing) return;
    this.pausing = false;
    this.peer.resumeReading();
  }

  // ---- incoming

  private waitConfirm(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.confirm = { resolve, reject };
    });
  }

  /** @internal Called by the Peer for each STREAM / STREAM_HOLE packet on this stream. */
  onPacket(m: Message): void {
    if (this.done) return;
    if (m.type === MessageType.STREAM_HOLE) return this.onHole(m);
    switch (m.status) {
      case Status.CONTINUE:
        if (this.sending) return; // the consumer sends no data; ignore
        if (this.confirm) return; // finishing or aborting: discard data still in flight
        if (m.payload.length > 0) {
          const bytes = m.payload;
          this.toInbound((i) => i.deliver({ kind: 'data', bytes }));
        } else if (this.isClient) {
          this.gotEnd = true;
          this.toInbound((i) => i.deliverEnd()); // download EOF
        } // an empty data packet to the daemon is ignored, as libvirt does
        return;
      case Status.OK:
        if (this.confirm) {
          const c = this.confirm;
          this.confirm = null;
          // daemon, download: the client acknowledged our EOF with its finish; libvirtd
          // confirms that finish with STREAM/OK (capture download-sparse), virsh waits for it.
          if (!this.isClient && this.sending) this.peer.sendFrame({ ...this.head, status: Status.OK });
          this.close();
          c.resolve();
          return;
        }
        if (!this.isClient && !this.sending) {
          this.gotEnd = true;
          this.toInbound((i) => i.deliverEnd()); // the client finished its upload
          return;
        }
        if (!this.isClient && this.sending) {
          // the client finished a download early: stop and confirm.
          this.peer.sendFrame({ ...this.head, status: Status.OK });
          this.fail(new SparsevirtError('ERR_ABORTED', 'the client finished the stream early'));
          return;
        }
        // a confirmation nobody asked for
        this.fail(new SparsevirtError('ERR_PROTOCOL', 'unexpected stream confirmation'));
        return;
      case Status.ERROR: {
        if (!this.isClient) {
          // the client aborted: stop, and confirm.
          this.peer.sendFrame({ ...this.head, status: Status.OK });
          this.fail(new SparsevirtError('ERR_ABORTED', 'the client aborted the stream'));
          return;
        }
        let err: Error;
        try {
          err = decodeRemoteError(m.payload);
        } catch (e) {
          err = new SparsevirtError('ERR_PROTOCOL', `malformed stream error: ${(e as Error).message}`);
        }
        if (this.confirm && this.aborting) {
          // a daemon that cannot abort cleanly answers with an error: the abort is done anyway.
          const c = this.confirm;
          this.confirm = null;
          this.close();
          c.resolve();
          return;
        }
        this.fail(err);
        return;
      }
      default:
        this.fail(new SparsevirtError('ERR_PROTOCOL', `stream packet with unknown status ${m.status}`));
    }
  }

  private onHole(m: Message): void {
    if (this.sending || m.status !== Status.CONTINUE) {
      return this.refuse(new SparsevirtError('ERR_PROTOCOL', `unexpected stream hole (status ${m.status})`));
    }
    if (!this.sparse) {
      return this.refuse(new SparsevirtError('ERR_STREAM_NOT_SPARSE', 'unexpected stream hole: the stream was not opened with the sparse flag'));
    }
    if (this.confirm) return;
    const p = m.payload;
    if (p.length < ONE_HOLE) {
      // (the decoder words what is missing)
      try {
        streamHoleCodec.dec(new XdrReader(p));
      } catch (e) {
        return this.refuse(new SparsevirtError('ERR_PROTOCOL', `malformed stream hole: ${(e as Error).message}`));
      }
    }
    // length (hyper), flags (unsigned int), read in place: one for each of 100,000 holes
    const high = p.readInt32BE(0);
    const length = high * 2 ** 32 + p.readUInt32BE(4);
    const flags = p.readUInt32BE(8);
    if (flags !== 0) return this.refuse(new SparsevirtError('ERR_PROTOCOL', `stream hole with unsupported flags 0x${flags.toString(16)}`));
    if (high < 0 || length > Number.MAX_SAFE_INTEGER) {
      return this.refuse(new SparsevirtError('ERR_PROTOCOL', `stream hole with invalid length ${p.readBigInt64BE(0)}`));
    }
    if (length === 0) return; // an empty hole (libvirt's API allows one): nothing to do
    this.toInbound((i) => i.deliver({ kind: 'hole', length }));
  }

  /** A packet we cannot accept: the daemon reports it with STREAM/ERROR, the client aborts. */
  private refuse(err: SparsevirtError): void {
    if (!this.isClient) {
      this.peer.sendFrame({ ...this.head, status: Status.ERROR }, encodeRemoteError(toRemoteFields(err)));
      this.fail(err);
    } else {
      this.peer.sendFrame({ ...this.head, status: Status.ERROR });
      this.fail(err);
    }
  }

  /** @internal The stream is dead: tell the consumer, reject the waiter, unregister. */
  fail(err: Error): void {
    if (this.done) return;
    this.err = err;
    const c = this.confirm;
    this.confirm = null;
    this.close();
    if (this.inbound) this.inbound.deliverError(err);
    else this.early.push(() => this.inbound!.deliverError(err));
    c?.reject(err);
  }

  private close(): void {
    if (this.done) return;
    this.done = true;
    this.receiveDirect(null);
    this.peer.streamClosed(this);
  }

  get ended(): boolean {
    return this.gotEnd;
  }
}

/** The libvirt error record for a local error sent to the peer on a stream. */
/**
 * Empty the pipe of `n` bytes that could not be written. A pipe that cannot be emptied is
 * closed and replaced: bytes left in it would land in the next packet's place.
 */
function drainPipe(pipe: [number, number], n: number): void {
  tailBuffer ??= Buffer.allocUnsafeSlow(TAIL_MAX);
  while (n > 0) {
    let r = 0;
    try {
      r = fs.readSync(pipe[0], tailBuffer, 0, Math.min(n, tailBuffer.length), null);
    } catch {
      // (r stays 0)
    }
    if (r <= 0) {
      inPlacePipe = undefined;
      fs.close(pipe[0], () => undefined);
      fs.close(pipe[1], () => undefined);
      return;
    }
    n -= r;
  }
}

export function toRemoteFields(err: Error): RemoteErrorFields {
  // a stream aborted because of a local failure carries that failure as its cause: report the cause.
  while ((err as SparsevirtError).code === 'ERR_ABORTED' && (err as { cause?: unknown }).cause instanceof Error) {
    err = (err as { cause: Error }).cause;
  }
  if (err instanceof RemoteError) return err.toFields();
  const cause = (err as { cause?: { errno?: number; code?: string } }).cause;
  // a system error carries its errno (Node's fs errors as a negative number); one of our own
  // I/O errors without one (a file that shrank under a read) is reported as EIO
  const errno = typeof cause?.errno === 'number' ? Math.abs(cause.errno)
    : (cause as { code?: string } | undefined)?.code === 'ERR_IO' ? EIO : -1;
  if (errno > 0) return remoteErrorFields(VIR_ERR_CODE.SYSTEM_ERROR, VIR_DOMAIN.STREAMS, err.message, { int1: errno });
  return remoteErrorFields(VIR_ERR_CODE.RPC, VIR_DOMAIN.STREAMS, err.message);
}
