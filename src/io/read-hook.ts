/**
 * Sockets we open ourselves (net.connect, or an accepted socket adopted with `adoptWithReadHook`)
 * read through net's `onread`: the connection picks where each read lands, so the rest of a large
 * frame is read straight into that frame's buffer instead of arriving in 64 KiB pieces that are
 * then copied together. The transport creates the hook with the socket; reads that come before
 * the connection attaches are kept and replayed.
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

/** The hook a socket was created with, if any. */
export function readHookOf(socket: object): ReadHook | undefined {
  return (socket as { [kReadHook]?: ReadHook })[kReadHook];
}

/** Give `socket` (created with `hook.onread`) its hook, for the connection that will read it. */
export function setReadHook(socket: object, hook: ReadHook): void {
  (socket as { [kReadHook]?: ReadHook })[kReadHook] = hook;
}
