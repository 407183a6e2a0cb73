/**
 * A `Peer` owns one connection (unix, tcp, tls or an in-memory duplex) and speaks libvirt's RPC
 * protocol on it: the client and the daemon use the same class, with `role` telling which side
 * they are. It puts together
 * - the outbox (`outbox.ts`): frames out, small ones batched, file data by sendfile;
 * - the inbox (`inbox.ts`): where reads land, frames in, data packets received in place;
 * - keepalive (`keepalive.ts`), and the calls waiting for replies (`calls.ts`);
 * - the streams of the connection, keyed by (proc, serial) (`wire-stream.ts`);
 * and carries backpressure between the socket and the streams.
 */
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import type { FileRef } from '../chunk.js';
import { SparsevirtError, type RemoteErrorFields } from '../errors.js';
import { keepPolling } from '../io/busy-poll.js';
import { newDataPathStats, RawSocket, type DataPathStats } from '../io/socket.js';
import { SocketWriter, type SendfileCounter } from '../io/socket-writer.js';
import { XdrWriter, type Codec } from '../xdr/index.js';
import { Calls, type CallOptions } from './calls.js';
import { debug } from '../diagnostics.js';
import { Inbox } from './inbox.js';
import { Keepalive } from './keepalive.js';
import {
  describeHeader, FRAME_MAX, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM, KEEPALIVE_VERSION, MessageType, Status,
  STREAM_PAYLOAD_MAX, type Header, type Message,
} from './message.js';
import { Outbox } from './outbox.js';
import { encodeRemoteError } from './structs.js';
import { WireStream, type StreamHost } from './wire-stream.js';

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
   * default: never). See `io/busy-poll.ts`.
   */
  busyPoll?: number;
}

/** How far a client reads past full stream queues while calls wait for their replies. */
const READ_PAST_FULL_MAX = 64 << 20;

const PING: Header = { prog: KEEPALIVE_PROGRAM, vers: KEEPALIVE_VERSION, proc: KEEPALIVE_PING, type: MessageType.MESSAGE, serial: 0, status: Status.OK };
const PONG: Header = { ...PING, proc: KEEPALIVE_PONG };

/** Streams that ended and are remembered, so that late packets for them are dropped silently. */
const ENDED_MAX = 256;

export class Peer extends EventEmitter implements StreamHost {
  readonly role: 'client' | 'server';
  readonly socket: Duplex;
  readonly keepaliveInterval: number;
  readonly keepaliveCount: number;
  readonly streamPacketMax: number;
  readonly abortTimeout: number;
  /** Bytes a stream may leave in the socket's user-space buffer before it waits for 'drain'. */
  readonly sendWindow: number;
  /** The connection's data path: see `DataPathStats` (each stream counts its own too: `WireStream.stats`). */
  readonly stats: DataPathStats = newDataPathStats();
  /** Busy polling after each read while a stream is open, in ms (0: off). See `io/busy-poll.ts`. */
  busyPoll: number;
  /**
   * Server side: the client said it takes a deep queue of small packets
   * (`Feature.SPARSEVIRT_DEEP_QUEUE`), so the big send buffer stays for them too: with the
   * default buffer the daemon is woken only once its queue fell below a quarter of ~208 KiB, and
   * our client drains that faster than the daemon refills it. (A client sends to a daemon, which
   * reads no faster than it writes: it keeps the big buffer for the whole upload.)
   */
  deepQueue = false;

  readonly #raw: RawSocket;
  readonly #outbox: Outbox;
  readonly #inbox: Inbox;
  readonly #keepalive: Keepalive;
  readonly #calls: Calls;
  readonly #streams = new Map<number, WireStream>();
  readonly #ended = new Set<number>();
  #closedErr: Error | null = null;
  /** Streams whose queue is full (each asked once to stop reading). */
  #pausedBy = 0;
  /** The socket is not being read: streams' queues are full and no call waits for a reply. */
  #readingStopped = false;
  /** Bytes read past full stream queues so that the replies to calls could arrive. */
  #overshoot = 0;

  constructor(socket: Duplex, opts: PeerOptions) {
    super();
    this.role = opts.role;
    this.socket = socket;
    this.keepaliveInterval = opts.keepaliveInterval ?? 5;
    this.keepaliveCount = opts.keepaliveCount ?? 5;
    this.streamPacketMax = opts.streamPacketMax ?? STREAM_PAYLOAD_MAX;
    this.abortTimeout = opts.abortTimeout ?? 30000;
    this.busyPoll = opts.busyPoll ?? 0;
    this.sendWindow = opts.sendWindow ?? 1 << 20;
    this.#raw = new RawSocket(socket);
    const writer = new SocketWriter(this.#raw, this.stats);
    this.#outbox = new Outbox(writer, this.stats);
    // the default send buffer for small packets, unless the client takes a deep queue (see RawSocket.bigSendBuffer)
    if (this.role === 'server') this.#outbox.beforeBatch = () => this.bigSendBuffer(this.deepQueue);
    const peer = this;
    this.#keepalive = new Keepalive({
      get readingStopped() {
        return peer.#readingStopped;
      },
      ping: () => this.sendFrame(PING),
      dead: (err) => this.destroy(err),
    }, writer, this.keepaliveInterval, this.keepaliveCount);
    this.#calls = new Calls({
      send: (h, payload) => this.sendFrame(h, payload),
      waitingChanged: () => {
        if (this.#pausedBy > 0) this.#updateReading();
      },
    });
    socket.on('error', (err) => this.destroy(new SparsevirtError('ERR_CONNECTION_CLOSED', `connection error: ${err.message}`, { cause: err })));
    socket.on('close', () => this.destroy(new SparsevirtError('ERR_CONNECTION_CLOSED', 'connection closed by peer')));
    // half-close from the peer: nothing more will arrive, so nothing pending can complete.
    socket.on('end', () => this.destroy(new SparsevirtError('ERR_CONNECTION_CLOSED', 'connection closed by peer')));
    // last: a socket's early reads are replayed at once
    this.#inbox = new Inbox(socket, this.#raw, this.stats, {
      message: (m) => this.#onMessage(m),
      fail: (err) => this.destroy(err),
      received: (n) => this.#received(n),
      receiver: (h) => this.#streams.get(streamKey(h.proc, h.serial)),
    }, opts.maxFrame ?? FRAME_MAX);
  }

  get closed(): boolean {
    return this.#closedErr !== null;
  }

  // ---------------------------------------------------------------- sending (see Outbox)

  /** Queue a frame: small ones leave with the output batch on the next tick, large ones beside their header. */
  sendFrame(h: Header, payload?: Uint8Array): void {
    this.#outbox.sendFrame(h, payload);
  }

  /** A STREAM_HOLE frame of `length`, built in the output batch. */
  sendHoleFrame(h: Header, length: number): void {
    this.#outbox.sendHoleFrame(h, length);
  }

  /** A frame whose payload is a range of a file in memory, by sendfile where the socket allows it. */
  sendFileFrame(h: Header, file: FileRef, offset: number, length: number, counter: SendfileCounter): Promise<void> | null {
    return this.#outbox.sendFileFrame(h, file, offset, length, counter);
  }

  /** Bytes written but not yet taken by the kernel, plus the batch. */
  get outgoingBytes(): number {
    return this.#outbox.pendingBytes;
  }

  /** Resolves when the socket can take more (immediately if it can). */
  drained(): Promise<void> {
    return this.#outbox.drained();
  }

  get sendBufferIsBig(): boolean {
    return this.#raw.sendBufferIsBig;
  }

  /** See `RawSocket.bigSendBuffer`. */
  bigSendBuffer(big: boolean): void {
    this.#raw.bigSendBuffer(big);
  }

  /**
   * Whether data packets may be received in place on this connection at all (on by default, from
   * libvirtd too).
   */
  get receiveInPlace(): boolean {
    return this.#inbox.receiveInPlace;
  }

  set receiveInPlace(on: boolean) {
    this.#inbox.receiveInPlace = on;
  }

  // ---------------------------------------------------------------- calls

  nextSerial(): number {
    return this.#calls.nextSerial();
  }

  /** Client: call a procedure of the REMOTE program and decode its reply. */
  call<A, R>(proc: { num: number; args: Codec<A>; ret: Codec<R> }, args: A, opts: CallOptions = {}): Promise<R> {
    if (this.#closedErr) return Promise.reject(this.#closedErr);
    return this.#calls.call(proc, args, opts);
  }

  /** See `Calls.abortStreamIfOpened`. */
  abortStreamIfOpened(serial: number): void {
    this.#calls.abortStreamIfOpened(serial);
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
    if (this.#streams.has(key)) throw new SparsevirtError('ERR_STREAM_STATE', `a stream is already open on serial ${serial}`);
    this.#ended.delete(key);
    const s = new WireStream(this, proc, serial, opts.sparse, opts.sending);
    this.#streams.set(key, s);
    return s;
  }

  hasStream(proc: number, serial: number): boolean {
    return this.#streams.has(streamKey(proc, serial));
  }

  get openStreams(): number {
    return this.#streams.size;
  }

  /** @internal A stream reached its end: it leaves the connection. */
  streamClosed(s: WireStream): void {
    const key = streamKey(s.proc, s.serial);
    if (this.#streams.get(key) === s) this.#streams.delete(key);
    this.#ended.add(key);
    if (this.#ended.size > ENDED_MAX) this.#ended.delete(this.#ended.values().next().value as number);
  }

  /** @internal A receiving stream's consumer takes data packets in place from now on (+1), or no more (-1). */
  inPlaceReceiver(delta: number): void {
    this.#inbox.inPlaceReceiver(delta);
  }

  // ---------------------------------------------------------------- incoming flow control

  /**
   * @internal Pause the socket while any stream's queue is full, unless a call waits for its
   * reply. The reply comes on the same socket, behind stream packets nobody reads yet
   * (`vol.info()` right after `vol.download()`); so while calls wait, reading goes on past the
   * full queues, up to `READ_PAST_FULL_MAX` bytes. A server sends its reply after at most what
   * its socket buffers held: libvirtd queues one stream packet at a time, sparsevirtd at most its
   * send window.
   */
  pauseReading(): void {
    if (this.#pausedBy++ === 0) this.#updateReading();
  }

  /** @internal */
  resumeReading(): void {
    if (this.#pausedBy > 0 && --this.#pausedBy === 0) {
      this.#overshoot = 0;
      this.#updateReading();
    }
  }

  #updateReading(): void {
    const stop = this.#pausedBy > 0 && (this.#calls.waiting === 0 || this.#overshoot >= READ_PAST_FULL_MAX) && this.#closedErr === null;
    if (stop === this.#readingStopped) return;
    this.#readingStopped = stop;
    if (stop) {
      this.socket.pause();
    } else {
      this.#keepalive.resumed();
      this.socket.resume();
    }
  }

  /** `n` bytes were read from the socket. */
  #received(n: number): void {
    if (this.busyPoll > 0 && this.#streams.size > 0) keepPolling(this.busyPoll);
    if (this.#pausedBy > 0) {
      // only calls waiting keep the socket read while streams' queues are full
      this.#overshoot += n;
      if (this.#overshoot >= READ_PAST_FULL_MAX) this.#updateReading();
    }
    this.#keepalive.heard();
  }

  // ---------------------------------------------------------------- keepalive

  /** Start pinging after `keepaliveInterval` s of silence (once the peer agreed to feature 10). */
  startKeepalive(): void {
    if (this.#closedErr) return;
    this.#keepalive.start();
  }

  /** Stop pinging (and giving up on a silent peer). */
  stopKeepalive(): void {
    this.#keepalive.stop();
  }

  // ---------------------------------------------------------------- receiving

  #onMessage(m: Message): void {
    if (m.prog === KEEPALIVE_PROGRAM) {
      if (m.type === MessageType.MESSAGE && m.proc === KEEPALIVE_PING) this.sendFrame(PONG);
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
        if (this.role === 'client') this.#onReply(m);
        else this.emit('unexpected', m);
        return;
      case MessageType.STREAM:
      case MessageType.STREAM_HOLE: {
        const key = streamKey(m.proc, m.serial);
        const s = this.#streams.get(key);
        if (s) s.onPacket(m);
        else if (!this.#ended.has(key)) this.emit('orphanStreamPacket', m);
        return;
      }
      case MessageType.MESSAGE:
        debug('event message ignored: %s', describeHeader(m));
        return;
      default:
        this.emit('unexpected', m);
    }
  }

  #onReply(m: Message): void {
    if (this.#calls.settle(m)) return;
    const key = streamKey(m.proc, m.serial);
    const s = this.#streams.get(key);
    if (s && m.status === Status.ERROR) {
      // libvirt 9.0 reports a failed STREAM_HOLE as a REPLY/ERROR on the stream's serial (libvirt-quirks hole-errors-as-reply).
      s.onPacket({ ...m, type: MessageType.STREAM });
    } else if (m.status === Status.ERROR && this.#ended.has(key)) {
      // libvirtd may answer an abort (or a packet it failed to write) of a stream we already
      // closed with a REPLY/ERROR: late news of a stream that is gone, not a lost conversation
      debug('late error reply for an ended stream: %s', describeHeader(m));
    } else {
      const late = this.#calls.late(m);
      if (late === null) {
        // As libvirt's client: a reply nobody asked for means the two sides disagree about the
        // conversation (a lost or forged serial), and a call may wait forever: give up now.
        this.destroy(new SparsevirtError('ERR_PROTOCOL', `reply without a pending call (${describeHeader(m)})`));
        return;
      }
      debug('late reply to an abandoned call: %s', describeHeader(m));
      // a stream the caller gave up while it was being opened: the server opened it anyway,
      // so abort it on the wire (its confirmation is dropped as a late packet).
      if (late === 'abort' && m.status === Status.OK) this.sendFrame({ ...m, type: MessageType.STREAM, status: Status.ERROR });
    }
  }

  // ---------------------------------------------------------------- teardown

  /** Close gracefully: stop keepalive and end the socket once written. */
  close(): void {
    this.#keepalive.stop();
    const frame = this.#outbox.frameOut;
    if (frame !== null) {
      // a frame is half out and others wait behind it: end once they are all written
      void frame.then(() => this.close());
      return;
    }
    this.#outbox.flush();
    this.socket.end();
  }

  /** Tear down: every pending call and stream fails with `err`. */
  destroy(err: Error): void {
    if (this.#closedErr) return;
    this.#closedErr = err;
    this.#keepalive.stop();
    this.#calls.failAll(err);
    for (const s of [...this.#streams.values()]) s.fail(err);
    this.#streams.clear();
    this.#outbox.destroy(err);
    this.#inbox.destroy();
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

export type { WireStream } from './wire-stream.js';
