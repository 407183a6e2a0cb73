/**
 * Two `Peer`s on the two ends of a real unix socket in `dir`: a server and a client.
 */
import net from 'node:net';
import path from 'node:path';
import { Peer, type PeerOptions } from '../../src/rpc/peer.js';

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
