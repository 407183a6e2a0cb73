/**
 * A client that speaks libvirt's frames by hand, for protocol-level tests of the daemon: any
 * header and payload out, frames in, waiting for one that matches.
 */
import net from 'node:net';
import { buildFrame, MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, type Header, type Message } from '../../src/rpc/message.js';
import { FrameParser } from '../../src/rpc/parser.js';
import { decodeRemoteError } from '../../src/rpc/structs.js';
import { encode, XdrReader, type Codec } from '../../src/xdr/index.js';
import type { RemoteError } from '../../src/errors.js';

export interface Frame extends Message {}

/**
 * A client that speaks frames by hand: send any header and payload, wait for frames matching
 * a predicate. Never answers keepalive on its own.
 */
export class RawClient {
  readonly sock: net.Socket;
  readonly frames: Frame[] = [];
  private readonly parser = new FrameParser();
  private waiters: Array<{ pred: (f: Frame) => boolean; resolve: (f: Frame) => void }> = [];
  closed: Promise<void>;
  isClosed = false;
  private serial = 100;

  private constructor(sock: net.Socket) {
    this.sock = sock;
    this.closed = new Promise((resolve) => sock.once('close', () => {
      this.isClosed = true;
      resolve();
    }));
    sock.on('error', () => undefined);
    sock.on('data', (b: Buffer) => {
      this.parser.push(b, (m) => {
        const f: Frame = { ...m, payload: Buffer.from(m.payload) };
        this.frames.push(f);
        const w = this.waiters.findIndex((x) => x.pred(f));
        if (w >= 0) {
          const [x] = this.waiters.splice(w, 1);
          x!.resolve(f);
        }
      });
    });
  }

  static async connect(socketPath: string): Promise<RawClient> {
    const sock = net.createConnection({ path: socketPath });
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    return new RawClient(sock);
  }

  nextSerial(): number {
    return this.serial++;
  }

  write(buf: Buffer): void {
    this.sock.write(buf);
  }

  send(h: Partial<Header> & { proc: number }, payload?: Buffer): void {
    this.write(buildFrame({
      prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, type: MessageType.CALL, serial: 0, status: Status.OK, ...h,
    }, payload));
  }

  /** The first frame (already received or coming) matching `pred`. */
  waitFor(pred: (f: Frame) => boolean, timeoutMs = 5000): Promise<Frame> {
    const have = this.frames.find(pred);
    if (have) return Promise.resolve(have);
    return new Promise((resolve, reject) => {
      const entry = { pred, resolve: (f: Frame) => { clearTimeout(t); resolve(f); } };
      const t = setTimeout(() => {
        this.waiters = this.waiters.filter((x) => x !== entry);
        reject(new Error(`no matching frame within ${timeoutMs} ms; got: ${this.frames.map(describe).join(' | ')}`));
      }, timeoutMs);
      this.waiters.push(entry);
    });
  }

  /** Send a CALL and wait for its REPLY (by serial). */
  async call<A>(proc: { num: number; args: Codec<A> }, args: A, serial = this.nextSerial()): Promise<Frame> {
    this.send({ proc: proc.num, serial }, encode(proc.args, args));
    return this.waitFor((f) => f.type === MessageType.REPLY && f.serial === serial);
  }

  /** AUTH_LIST, SUPPORTS_FEATURE(10) is skipped (no keepalive), CONNECT_OPEN(name, flags). */
  async handshake(flags = 0): Promise<void> {
    const auth = await this.call({ num: 66, args: { enc() {}, dec() {}, min: 0 } as Codec<void> }, undefined);
    if (auth.status !== Status.OK) throw new Error('AUTH_LIST failed');
    const open = await this.call({ num: 1, args: openArgs }, { name: 'sparsevirt:///system', flags });
    if (open.status !== Status.OK) throw new Error(`CONNECT_OPEN failed: ${decodeRemoteError(open.payload).message}`);
  }

  close(): void {
    this.sock.destroy();
  }
}

const openArgs: Codec<{ name: string; flags: number }> = {
  enc: (w, v) => {
    w.uint(1).string(v.name).uint(v.flags);
  },
  dec: () => {
    throw new Error('unused');
  },
  min: 8,
};

export function describe(f: Header & { payload: Buffer }): string {
  const t = ['CALL', 'REPLY', 'MESSAGE', 'STREAM', 'CALL_FDS', 'REPLY_FDS', 'HOLE'][f.type] ?? f.type;
  const s = ['OK', 'ERROR', 'CONTINUE'][f.status] ?? f.status;
  return `${f.proc}/${t}/${f.serial}/${s}/${f.payload.length}`;
}

export function errorOf(f: Frame): RemoteError {
  return decodeRemoteError(f.payload);
}

export function decodeWith<T>(c: Codec<T>, f: Frame): T {
  return c.dec(new XdrReader(f.payload));
}
