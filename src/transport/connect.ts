/** Open the byte stream a libvirt URI names: a unix socket, plain tcp, TLS, or ssh's stdio. */
import net from 'node:net';
import type tls from 'node:tls';
import fs, { existsSync, readFileSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import { SparsevirtError } from '../errors.js';
import { ReadHook, setReadHook } from '../io/read-hook.js';
import * as sys from '../io/sys.js';
import { clientTlsFiles, type ParsedUri } from './uri.js';
import { openSsh } from './ssh.js';

function readPem(file: string, what: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw new SparsevirtError('ERR_IO', `cannot read TLS ${what} '${file}': ${(err as Error).message}`, { cause: err });
  }
}

/** A client certificate is optional (the server decides whether it needs one). */
function readOptionalPem(file: string, what: string): Buffer | undefined {
  return existsSync(file) ? readPem(file, what) : undefined;
}

/**
 * libvirt's server sends one byte, 0x01, after the TLS handshake once it has accepted the
 * client's certificate; anything else (or nothing) means it refused us.
 */
function readTlsConfirmation(sock: tls.TLSSocket, where: string, timeout: number): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => done(new SparsevirtError('ERR_TIMEOUT', `no TLS confirmation from ${where}`)), timeout);
    const refused = () => done(new SparsevirtError('ERR_ACCESS_DENIED',
      `${where} refused the TLS session (server verification of our certificate or address failed)`));
    const onError = (e: Error) => done(new SparsevirtError('ERR_CONNECTION_CLOSED', `TLS connection to ${where} failed: ${e.message}`, { cause: e }));
    const tryRead = () => {
      const b = sock.read(1) as Buffer | null;
      if (b === null) return;
      if (b[0] === 1) done();
      else refused();
    };
    function done(err?: Error) {
      clearTimeout(timer);
      sock.off('readable', tryRead);
      sock.off('end', refused);
      sock.off('close', refused);
      sock.off('error', onError);
      if (err) {
        sock.destroy();
        reject(err);
      } else resolve();
    }
    sock.on('readable', tryRead);
    sock.once('end', refused);
    sock.once('close', refused);
    sock.once('error', onError);
  });
}

/**
 * An accepted plain socket (unix or tcp, created with `pauseOnConnect` so that it never read)
 * re-created on a duplicate of its fd with a `ReadHook`: net's `onread` exists only for sockets
 * made by `net.connect` or `new net.Socket`, and it lets large frames be read straight into
 * their buffers. Without the native syscalls (no dup), the socket is returned as it is.
 */
export function adoptWithReadHook(sock: net.Socket): net.Socket {
  const handle = (sock as { _handle?: { fd?: number } })._handle;
  const fd = typeof handle?.fd === 'number' ? handle.fd : -1;
  const copy = fd >= 0 ? sys.dupFd(fd) : -1;
  if (copy < 0) {
    sock.resume();
    return sock;
  }
  const hook = new ReadHook();
  let adopted: net.Socket;
  try {
    adopted = new net.Socket({ fd: copy, readable: true, writable: true, onread: hook.onread } as unknown as net.SocketConstructorOpts);
  } catch {
    fs.closeSync(copy);
    sock.resume();
    return sock;
  }
  setReadHook(adopted, hook);
  sock.destroy(); // closes the original fd; it was never polled
  return adopted;
}

export async function openTransport(u: ParsedUri, opts: { signal?: AbortSignal; timeout?: number; readonly?: boolean } = {}): Promise<Duplex> {
  // ssh: the byte stream is ssh's stdin/stdout (the handshake's calls are bounded by the timeout)
  if (u.transport === 'ssh') return openSsh(u, { signal: opts.signal, readonly: opts.readonly });
  const timeout = opts.timeout ?? 30000;
  let sock: net.Socket;
  let ready: string;
  if (u.transport === 'unix' && u.socket === '') {
    // (Node would take an empty path for a tcp connection to localhost; libvirt refuses it)
    throw Object.assign(new SparsevirtError('ERR_CONNECTION_CLOSED', "Failed to connect socket to '': Connection refused"), { errno: -111, syscall: 'connect' });
  }
  if (u.transport === 'unix' || u.transport === 'tcp') {
    const hook = new ReadHook();
    const where = u.transport === 'unix' ? { path: u.socket } : { host: u.host, port: u.port };
    // `onread` is accepted by net.connect at run time; @types/node types it on the Socket options only.
    sock = net.createConnection({ ...where, onread: hook.onread } as unknown as net.NetConnectOpts);
    setReadHook(sock, hook);
    ready = 'connect';
  } else {
    const f = clientTlsFiles(u.pkipath);
    const ca = readPem(f.ca, 'CA certificate');
    const cert = readOptionalPem(f.cert, 'client certificate');
    const key = cert ? readPem(f.key, 'client key') : undefined;
    // loaded only for TLS: node:tls costs ~4 MiB of memory and start-up time otherwise
    const tls = await import('node:tls');
    sock = tls.connect({
      host: u.host, port: u.port, ca, cert, key,
      servername: net.isIP(u.host) ? undefined : u.host,
      rejectUnauthorized: !u.noVerify,
      // libvirt checks the server name against the certificate unless no_verify=1.
      checkServerIdentity: u.noVerify ? () => undefined : tls.checkServerIdentity,
    });
    ready = 'secureConnect';
  }
  sock.setNoDelay?.(true);
  const where = u.transport === 'unix' ? u.socket : `${u.host}:${u.port}`;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => fail(new SparsevirtError('ERR_TIMEOUT', `timed out connecting to ${where}`)), timeout);
    const onAbort = () => fail(new SparsevirtError('ERR_ABORTED', 'connect aborted', { cause: opts.signal?.reason }));
    const cleanup = () => {
      clearTimeout(timer);
      sock.off(ready, ok);
      sock.off('error', onErr);
      opts.signal?.removeEventListener('abort', onAbort);
    };
    function ok() {
      cleanup();
      resolve();
    }
    function fail(e: Error) {
      cleanup();
      sock.destroy();
      reject(e);
    }
    function onErr(e: NodeJS.ErrnoException) {
      fail(new SparsevirtError('ERR_CONNECTION_CLOSED', `failed to connect to ${u.transport} ${where}: ${e.message}`, { cause: e }));
    }
    sock.once(ready, ok);
    sock.once('error', onErr);
    if (opts.signal) {
      if (opts.signal.aborted) onAbort();
      else opts.signal.addEventListener('abort', onAbort, { once: true });
    }
  });
  if (u.transport === 'tls') await readTlsConfirmation(sock as tls.TLSSocket, where, timeout);
  return sock;
}
