/**
 * Calls in flight on a client connection: serials, the reply each waits for, and the calls given
 * up locally (timeout, abort) whose late replies must not look like stray ones.
 */
import { SparsevirtError } from '../errors.js';
import { XdrReader, XdrWriter, type Codec } from '../xdr/index.js';
import { MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, type Header, type Message } from './message.js';
import { decodeRemoteError } from './structs.js';

interface PendingCall {
  ret: Codec<unknown>;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  cleanup?: () => void;
}

export interface CallOptions {
  /** The serial to use (a stream-opening call registers its stream on it first). */
  serial?: number;
  signal?: AbortSignal;
  /** ms to wait for the reply. */
  timeout?: number;
}

export interface CallsHost {
  send(h: Header, payload: Uint8Array): void;
  /** How many calls wait changed (reading the socket may have to go on, or may stop). */
  waitingChanged(): void;
}

/** Most serials remembered as abandoned (oldest forgotten first). */
const ABANDONED_MAX = 1024;

export class Calls {
  #serial = 0;
  readonly #pending = new Map<number, PendingCall>();
  /** Serials of calls given up locally: their late replies are dropped quietly. */
  readonly #abandoned = new Set<number>();
  /** Abandoned stream-opening calls whose stream must be aborted if the server opens it. */
  readonly #abortWhenOpened = new Set<number>();

  constructor(private readonly host: CallsHost) {}

  /** Calls waiting for their reply. */
  get waiting(): number {
    return this.#pending.size;
  }

  nextSerial(): number {
    const s = this.#serial;
    this.#serial = (this.#serial + 1) >>> 0;
    return s;
  }

  /** Call a procedure of the REMOTE program and decode its reply. */
  call<A, R>(proc: { num: number; args: Codec<A>; ret: Codec<R> }, args: A, opts: CallOptions = {}): Promise<R> {
    const serial = opts.serial ?? this.nextSerial();
    const w = new XdrWriter(128);
    proc.args.enc(w, args);
    return new Promise<R>((resolve, reject) => {
      const entry: PendingCall = { ret: proc.ret as Codec<unknown>, resolve: resolve as (v: unknown) => void, reject };
      let timer: NodeJS.Timeout | undefined;
      const onAbort = (): void => {
        this.#abandon(serial);
        entry.cleanup?.();
        reject(new SparsevirtError('ERR_ABORTED', 'call aborted', { cause: opts.signal?.reason }));
      };
      if (opts.signal) {
        if (opts.signal.aborted) return onAbort();
        opts.signal.addEventListener('abort', onAbort, { once: true });
      }
      if (opts.timeout) {
        timer = setTimeout(() => {
          this.#abandon(serial);
          entry.cleanup?.();
          reject(new SparsevirtError('ERR_TIMEOUT', `no reply to procedure ${proc.num} within ${opts.timeout} ms`));
        }, opts.timeout);
      }
      entry.cleanup = () => {
        if (timer) clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
      };
      this.#pending.set(serial, entry);
      this.host.waitingChanged();
      this.host.send({ prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: proc.num, type: MessageType.CALL, serial, status: Status.OK }, w.view());
    });
  }

  /** A call we stopped waiting for: its reply may still come and must not look like a stray one. */
  #abandon(serial: number): void {
    if (!this.#pending.delete(serial)) return;
    this.host.waitingChanged();
    remember(this.#abandoned, serial);
  }

  /**
   * The stream-opening call on `serial` was given up (aborted, timed out): if the server still
   * accepts it, abort the stream it opened instead of leaving it running.
   */
  abortStreamIfOpened(serial: number): void {
    if (!this.#abandoned.has(serial)) return;
    remember(this.#abortWhenOpened, serial);
  }

  /** A REPLY: its call settles; false when no call waits for it. */
  settle(m: Message): boolean {
    const p = this.#pending.get(m.serial);
    if (!p) return false;
    this.#pending.delete(m.serial);
    this.host.waitingChanged();
    p.cleanup?.();
    try {
      if (m.status === Status.OK) p.resolve(p.ret.dec(new XdrReader(m.payload)));
      else if (m.status === Status.ERROR) p.reject(decodeRemoteError(m.payload));
      else p.reject(new SparsevirtError('ERR_PROTOCOL', `reply with unexpected status ${m.status}`));
    } catch (err) {
      p.reject(err as Error);
    }
    return true;
  }

  /**
   * A reply no call waits for: 'abandoned' when it is the late reply to a call given up ('abort'
   * if that call opened a stream that must now be aborted), null when nobody ever asked for it.
   */
  late(m: Message): 'abandoned' | 'abort' | null {
    if (!this.#abandoned.delete(m.serial)) return null;
    return this.#abortWhenOpened.delete(m.serial) ? 'abort' : 'abandoned';
  }

  /** Every pending call fails with `err`. */
  failAll(err: Error): void {
    for (const p of this.#pending.values()) {
      p.cleanup?.();
      p.reject(err);
    }
    this.#pending.clear();
  }
}

function remember(set: Set<number>, serial: number): void {
  set.add(serial);
  if (set.size > ABANDONED_MAX) set.delete(set.values().next().value as number);
}
