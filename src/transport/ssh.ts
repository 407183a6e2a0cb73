/**
 * The ssh transport, `driver+ssh://[user@]host[:port]/path[?params]`, as libvirt's remote driver
 * has it: run `ssh` and speak the protocol over its stdin and stdout. On the remote side
 * `virt-ssh-helper` (libvirt 8.5 and later) connects to the daemon, or else netcat to its unix
 * socket. The parameters are libvirt's: `keyfile=`, `no_verify=1` (accept an unknown host key),
 * `no_tty=1` (never ask for a password), `known_hosts=`, `command=` (the ssh program),
 * `netcat=` (the netcat program; it means netcat), `socket=` (the remote socket; it means netcat
 * too) and `proxy=auto|netcat|native`.
 *
 * Nothing goes through a local shell: ssh gets an argument vector, with `--` before the host. The
 * remote command is run by the remote user's shell, so every value in it is quoted; a user or host
 * with characters no account or host name has (an older ssh hands them to a shell in
 * `ProxyCommand` and `Match exec`) is refused.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { Duplex } from 'node:stream';
import { SparsevirtError } from '../errors.js';
import { LIBVIRT_SYSTEM_SOCKET, type ParsedUri } from './uri.js';

export interface SshCommand {
  file: string;
  args: string[];
}

/** One word for a POSIX shell, whatever it contains. */
export function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

const PROXIES = new Set(['auto', 'netcat', 'native']);
/** Host names, IPv4 and IPv6 addresses (with a zone): nothing else. */
const HOST_OK = /^[A-Za-z0-9._:%-]+$/;
/** Account names: no space, control character, quote or shell metacharacter. */
const USER_OK = /^[^\s\x00-\x1f\x7f'"`$;&|<>(){}*?!#\\[\]~^]+$/;
/** libvirt's read-only socket next to the system one. */
const LIBVIRT_SYSTEM_SOCKET_RO = `${LIBVIRT_SYSTEM_SOCKET}-ro`;

/** The ssh command line for an ssh URI (exported for tests). `readonly` as in CONNECT_OPEN. */
export function sshCommand(u: ParsedUri, readonly = false): SshCommand {
  const p = u.params;
  const host = u.host;
  if (!HOST_OK.test(host) || host.startsWith('-')) throw new SparsevirtError('ERR_INVALID_ARG', `invalid ssh host ${JSON.stringify(host)}`);
  if (u.user !== null && (!USER_OK.test(u.user) || u.user.startsWith('-'))) throw new SparsevirtError('ERR_INVALID_ARG', `invalid ssh user ${JSON.stringify(u.user)}`);
  const proxyParam = p.get('proxy') ?? 'auto';
  if (!PROXIES.has(proxyParam)) throw new SparsevirtError('ERR_INVALID_ARG', `proxy must be auto, netcat or native, got '${proxyParam}'`);
  const socketParam = p.get('socket');
  const netcatParam = p.get('netcat');
  // as libvirt: naming a socket or a netcat program means netcat, and a session's socket path
  // is known only to virt-ssh-helper on the remote side
  let proxy = proxyParam;
  if (proxy === 'auto' && (socketParam || netcatParam)) proxy = 'netcat';
  else if (proxy === 'auto' && u.path === '/session') proxy = 'native';
  if (proxy === 'native' && (socketParam || netcatParam)) throw new SparsevirtError('ERR_INVALID_ARG', 'socket= and netcat= need proxy=netcat (or auto): virt-ssh-helper finds the socket itself');
  if (proxy === 'netcat' && !socketParam && u.path === '/session') throw new SparsevirtError('ERR_INVALID_ARG', 'a /session URI over netcat needs socket=: only virt-ssh-helper knows where it is');

  const args: string[] = [];
  if (u.port) args.push('-p', String(u.port));
  if (u.user !== null) args.push('-l', u.user);
  const keyfile = p.get('keyfile');
  if (keyfile) args.push('-i', keyfile);
  args.push('-T', '-e', 'none');
  if (p.get('no_tty') === '1') args.push('-o', 'BatchMode=yes');
  if (u.noVerify) args.push('-o', 'StrictHostKeyChecking=no');
  const knownHosts = p.get('known_hosts');
  if (knownHosts) args.push('-o', `UserKnownHostsFile=${knownHosts}`);
  args.push('--', host);

  let script: string;
  if (proxy === 'native') {
    script = `exec virt-ssh-helper ${readonly ? '-r ' : ''}${shellQuote(u.name)}`;
  } else {
    const nc = shellQuote(netcatParam || 'nc');
    const sock = shellQuote(socketParam || (readonly ? LIBVIRT_SYSTEM_SOCKET_RO : LIBVIRT_SYSTEM_SOCKET));
    // netcat must end when our side closes its input: OpenBSD's needs -q0 for that, others lack -q
    script = `if ${nc} -q 2>&1 | grep 'requires an argument' >/dev/null 2>&1; then exec ${nc} -q0 -U ${sock}; fi; exec ${nc} -U ${sock}`;
    if (proxy === 'auto') script = `if command -v virt-ssh-helper >/dev/null 2>&1; then exec virt-ssh-helper ${readonly ? '-r ' : ''}${shellQuote(u.name)}; fi; ${script}`;
  }
  // the remote login shell may not be a POSIX one: the script goes to sh as one quoted word
  args.push(`sh -c ${shellQuote(script)}`);
  return { file: p.get('command') || 'ssh', args };
}

/** What ssh said last on stderr: the reason of a failure. */
const STDERR_KEEP = 2048;
/** After our side closed ssh's input, how long ssh may take to exit before it is ended. */
const EXIT_GRACE_MS = 3000;

/**
 * ssh's stdin and stdout as one byte stream. Its end waits for ssh's exit status: an ssh that
 * failed (refused, unknown host, bad key) ends it with an error that quotes ssh's last words, not
 * with a plain end of stream, also when a write found the pipe broken first. Destroying it ends
 * ssh; so does closing our side if ssh does not exit within a few seconds.
 */
export class SshStream extends Duplex {
  private stderr = '';
  private exited = false;
  /** The error ssh's exit amounts to (null: it exited with 0, or has not exited). */
  private failure: Error | null = null;

  constructor(private readonly child: ChildProcessWithoutNullStreams, readonly where: string) {
    super();
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => {
      this.stderr = (this.stderr + s).slice(-STDERR_KEEP);
    });
    child.stdout.on('data', (b: Buffer) => {
      if (this.destroyed) return; // nobody reads any more: keep draining the pipe until ssh is gone
      if (!this.push(b)) child.stdout.pause();
    });
    child.stdin.on('error', () => {}); // a broken pipe: ssh is gone, and 'close' says why
    // after ssh exited and its pipes closed: the whole of stdout was pushed by then
    child.on('close', (code: number | null, sig: NodeJS.Signals | null) => {
      this.exited = true;
      if (code !== 0) {
        const said = this.lastWords();
        const how = code !== null ? `exited with code ${code}` : `was killed by ${sig}`;
        this.failure = new SparsevirtError('ERR_CONNECTION_CLOSED', `ssh to ${where} ${how}${said ? `: ${said}` : ''}`);
      }
      if (this.destroyed) return;
      if (this.failure) this.destroy(this.failure);
      else this.push(null);
    });
  }

  /** ssh's last lines on stderr, joined (a prompt it waits at, the reason it failed). */
  lastWords(): string {
    return this.stderr.split('\n').map((l) => l.trim()).filter((l) => l !== '').slice(-3).join('; ');
  }

  /** A write failed: the pipe broke because ssh ended, and ssh's own words say why. */
  private afterExit(err: Error, cb: (err?: Error | null) => void): void {
    if (this.exited) cb(this.failure ?? err);
    else this.child.once('close', () => cb(this.failure ?? err));
  }

  override _read(): void {
    this.child.stdout.resume();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.child.stdin.write(chunk, (err) => (err ? this.afterExit(err, cb) : cb()));
  }

  override _writev(chunks: Array<{ chunk: Buffer }>, cb: (err?: Error | null) => void): void {
    const last = chunks.length - 1;
    for (let i = 0; i < last; i++) this.child.stdin.write(chunks[i]!.chunk);
    this.child.stdin.write(chunks[last]!.chunk, (err) => (err ? this.afterExit(err, cb) : cb()));
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.child.stdin.end(() => {
      // a remote end that never exits (netcat without -q0, a daemon that keeps the connection)
      // must not keep ssh, and with it this process, alive
      const t = setTimeout(() => this.kill(), EXIT_GRACE_MS);
      t.unref();
      this.child.once('close', () => clearTimeout(t));
      cb();
    });
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    this.kill();
    this.child.stdout.resume(); // read to the end: the pipe closes, 'close' comes, nothing is held
    cb(err);
  }

  private kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
  }
}

/** Run ssh for the URI: resolves with its byte stream once the program runs. */
export function openSsh(u: ParsedUri, opts: { signal?: AbortSignal; readonly?: boolean } = {}): Promise<SshStream> {
  const { file, args } = sshCommand(u, opts.readonly);
  const host = u.host.includes(':') ? `[${u.host}]` : u.host;
  const where = `${u.user !== null ? `${u.user}@` : ''}${host}${u.port ? `:${u.port}` : ''}`;
  if (opts.signal?.aborted) return Promise.reject(new SparsevirtError('ERR_ABORTED', 'connect aborted', { cause: opts.signal.reason }));
  return new Promise((resolve, reject) => {
    // (no `signal` for spawn: it would end the connection whenever the signal aborts, long after
    // connect; an abort during the handshake destroys the stream, which ends ssh)
    const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const failed = (e: NodeJS.ErrnoException): void => {
      reject(new SparsevirtError('ERR_CONNECTION_CLOSED', `cannot run '${file}' for the ssh transport: ${e.message}`, { cause: e }));
    };
    child.once('error', failed);
    child.once('spawn', () => {
      child.off('error', failed);
      child.on('error', () => {}); // later errors (a kill that fails) end the stream through 'close'
      resolve(new SshStream(child, where));
    });
  });
}
