/**
 * libvirt's keepalive: after `interval` seconds of silence from the peer, PING it; after `count`
 * unanswered PINGs, give up on it. A peer that is only slow is not silent: bytes it takes from
 * our queue or from the kernel's buffer count as signs of life, and so does our own decision to
 * stop reading it.
 */
import type { SocketWriter } from '../io/socket-writer.js';
import { SparsevirtError } from '../errors.js';

export interface KeepaliveHost {
  /** We stopped reading the socket on purpose (streams' queues are full). */
  readonly readingStopped: boolean;
  /** Send a PING. */
  ping(): void;
  /** The peer is dead. */
  dead(err: Error): void;
}

export class Keepalive {
  #timer: NodeJS.Timeout | null = null;
  #lastRecv = Date.now();
  #pingsOut = 0;
  /** What the last tick saw (see `tick`). */
  #pending = 0;
  #accepted = 0;
  #queued = 0;
  #outq = -1;
  #lastPausedPing = 0;

  constructor(
    private readonly host: KeepaliveHost,
    private readonly writer: SocketWriter,
    /** Seconds of silence before a PING (0: never). */
    readonly interval: number,
    /** Unanswered PINGs before giving up. */
    readonly count: number,
  ) {}

  /** Bytes came from the peer: it is alive. */
  heard(): void {
    this.#lastRecv = Date.now();
    this.#pingsOut = 0;
  }

  /** We read the socket again after a pause: the silence starts now. */
  resumed(): void {
    this.#lastRecv = Date.now();
  }

  start(): void {
    if (this.#timer || this.interval <= 0) return;
    const ms = this.interval * 1000;
    this.#timer = setInterval(() => this.#tick(ms), Math.max(50, Math.floor(ms / 5)));
    this.#timer.unref();
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }

  #tick(ms: number): void {
    const now = Date.now();
    if (this.host.readingStopped) {
      // We stopped reading on purpose: silence is ours, not the peer's. The peer's PINGs wait
      // unread in the socket meanwhile, so tell it we are alive with a PING of our own every
      // interval (its PONG is read when we resume); otherwise a slow consumer is declared dead.
      this.#lastRecv = now;
      if (now - this.#lastPausedPing >= ms) {
        this.#lastPausedPing = now;
        this.host.ping();
      }
      return;
    }
    // Bytes the kernel took from a backlog we had (the socket could not take them at the last
    // tick) were read by the peer: it is alive, only slow. A stopped peer takes nothing. A write
    // completes only once all of it is in the kernel; libuv's queue size shows partial progress.
    const socket = this.writer.raw.socket;
    const pendingOut = socket.writableLength;
    const accepted = this.writer.bytesQueued - pendingOut;
    const handle = (socket as { _handle?: { writeQueueSize?: unknown } })._handle;
    const queued = typeof handle?.writeQueueSize === 'number' ? handle.writeQueueSize : 0;
    // Past Node's queue: what the kernel holds unread shrinks while the peer reads (a unix
    // socket holds up to 2 MiB: at a slow reader's pace that is longer than a keepalive window).
    const outq = this.writer.raw.outq();
    const drained = (this.#pending > 0 && (accepted > this.#accepted || queued < this.#queued)) || (this.#outq > 0 && outq >= 0 && outq < this.#outq);
    this.#outq = outq;
    this.#pending = pendingOut;
    this.#accepted = accepted;
    this.#queued = queued;
    if (drained) {
      this.#lastRecv = now;
      this.#pingsOut = 0;
      return;
    }
    const silent = now - this.#lastRecv;
    if (silent < ms * (this.#pingsOut + 1)) return;
    if (this.#pingsOut >= this.count) {
      this.host.dead(new SparsevirtError('ERR_KEEPALIVE_TIMEOUT',
        `no answer from the peer for ${Math.round(silent / 1000)} s (${this.#pingsOut} keepalive pings unanswered)`));
      return;
    }
    this.#pingsOut++;
    this.host.ping();
  }
}
