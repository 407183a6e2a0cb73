/**
 * Two `Peer`s on the two ends of a real unix socket, and the two ends of a volume download
 * between them (what the daemon and the client do around a stream, without the rest).
 */
import net from 'node:net';
import path from 'node:path';
import { Peer, type PeerOptions } from '../../src/rpc/peer.js';
import type { Message } from '../../src/rpc/message.js';
import { P, SPARSE_STREAM } from '../../src/protocol/remote.js';
import { Stream } from '../../src/stream/index.js';
import { XdrReader } from '../../src/xdr/index.js';

export interface PeerPair {
  client: Peer;
  server: Peer;
  /** Destroys both peers and closes the listener (the directory is the caller's). */
  close: () => void;
}

type Opts = Omit<PeerOptions, 'role'>;

export async function peerPair(dir: string, opts: { server?: Opts; client?: Opts } = {}): Promise<PeerPair> {
  const sockPath = path.join(dir, 'peer.sock');
  let server!: Peer;
  const srv = net.createServer();
  const accepted = new Promise<void>((resolve) => srv.once('connection', (s) => {
    server = new Peer(s, { role: 'server', ...opts.server });
    resolve();
  }));
  await new Promise<void>((r) => srv.listen(sockPath, r));
  const sock = net.createConnection(sockPath);
  await new Promise<void>((r) => sock.once('connect', () => r()));
  await accepted;
  const client = new Peer(sock, { role: 'client', abortTimeout: 2000, ...opts.client });
  return {
    client, server,
    close: () => {
      client.destroy(new Error('test done'));
      server.destroy(new Error('test done'));
      srv.close();
    },
  };
}

/**
 * On the server peer, answer every STORAGE_VOL_DOWNLOAD call: open the sending stream, reply OK,
 * and hand the stream to `send` with the volume's name and the sparse flag.
 */
export function serveDownloads(server: Peer, send: (stream: Stream, name: string, sparse: boolean) => void): void {
  server.on('call', (m: Message) => {
    if (m.proc !== P.STORAGE_VOL_DOWNLOAD.num) return;
    const args = P.STORAGE_VOL_DOWNLOAD.args.dec(new XdrReader(m.payload));
    const sparse = (args.flags & SPARSE_STREAM) !== 0;
    const wire = server.openStream(m.proc, m.serial, { sparse, sending: true });
    const stream = new Stream(wire, { sparse });
    wire.attach(stream);
    server.reply(m, P.STORAGE_VOL_DOWNLOAD.ret, undefined);
    send(stream, args.vol.name, sparse);
  });
}

/** On the client peer, open a download of volume `name` of pool `p`: the stream, and the call's reply. */
export function startDownload(client: Peer, name: string, sparse: boolean): { stream: Stream; called: Promise<void> } {
  const serial = client.nextSerial();
  const wire = client.openStream(P.STORAGE_VOL_DOWNLOAD.num, serial, { sparse, sending: false });
  const stream = new Stream(wire, { sparse });
  wire.attach(stream);
  const vol = { pool: 'p', name, key: `/p/${name}` };
  const called = client.call(P.STORAGE_VOL_DOWNLOAD, { vol, offset: 0n, length: 0n, flags: sparse ? SPARSE_STREAM : 0 }, { serial });
  return { stream, called };
}
