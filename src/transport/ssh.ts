/**
 * The ssh transport, `driver+ssh://[user@]host[:port]/path[?params]`, as libvirt's remote driver
 * has it: run `ssh` and speak the protocol over its stdin and stdout. On the remote side
 * `virt-ssh-helper` (libvirt 8.5 and later) connects to the daemon, or else netcat to its unix
 * socket. The parameters are libvirt's: `keyfile=`, `no_verify=1` (accept an unknown host key),
 * `no_tty=1` (never ask for a password), `known_hosts=`, `command=` (the ssh program),
 * `netcat=`, `socket=` (the remote socket; it implies netcat) and `proxy=auto|netcat|native`.
 *
 * Nothing goes through a local shell: ssh gets an argument vector. The remote command is run by
 * the remote user's shell, so every value in it is quoted, and a host or user that ssh could take
 * for an option is refused.
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

/** The ssh command line for an ssh URI (exported for tests). */
export function sshCommand(u: ParsedUri): SshCommand {
  const p = u.params;
  const host = u.host;
  if (!host || host.startsWith('-')) throw new SparsevirtError('ERR_INVALID_ARG', `invalid ssh host '${host}'`);
  if (u.user !== null && (u.user === '' || u.user.startsWith('-'))) throw new SparsevirtError('ERR_INVALID_ARG', `invalid ssh user '${u.user}'`);
  const proxyParam = p.get('proxy') ?? 'auto';
  if (!PROXIES.has(proxyParam)) throw new SparsevirtError('ERR_INVALID_ARG', `proxy must be auto, netcat or native, got '${proxyParam}'`);
  const socketParam = p.get('socket');
  // virt-ssh-helper cannot be told a socket: a socket= means netcat, as in libvirt
  const proxy = socketParam && proxyParam === 'auto' ? 'netcat' : proxyParam;
  if (socketParam && proxy === 'native') throw new SparsevirtError('ERR_INVALID_ARG', 'socket= needs proxy=netcat or auto: virt-ssh-helper finds the socket itself');

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

  const nc = shellQuote(p.get('netcat') || 'nc');
  const sock = socketParam
    ? shellQuote(socketParam)
    : u.path === '/session'
      ? '"${XDG_RUNTIME_DIR:-$HOME/.cache}/libvirt/libvirt-sock"'
      : shellQuote(LIBVIRT_SYSTEM_SOCKET);
  // netcat must end when our side closes its input: OpenBSD's needs -q0 for that, others lack -q
  const netcat = `if ${nc} -q 2>&1 | grep 'requires an argument' >/dev/null 2>&1; then exec ${nc} -q0 -U ${sock}; fi; exec ${nc} -U ${sock}`;
  const helper = `exec virt-ssh-helper ${shellQuote(`${u.driver}://${u.path}`)}`;
  const script = proxy === 'native' ? helper
    : proxy === 'netcat' ? netcat
    : `if command -v virt-ssh-helper >/dev/null 2>&1; then ${helper}; fi; ${netcat}`;
  // the remote login shell may not be a POSIX one: the script goes to sh as one quoted word
  args.push(`sh -c ${shellQuote(script)}`);
  return { file: p.get('command') || 'ssh', args };
}

/** What ssh said last on stderr: the reason of a failure. */
const STDERR_KEEP = 2048;

/**
 * ssh's stdin and stdout as one byte stream. Its end waits for ssh's exit status: an ssh that
 * failed (refused, unknown host, bad key) ends it with an error that quotes ssh's last words, not
 * with a plain end of stream. Destroying it ends ssh.
 */
class SshStream extends Duplex {
  private stderr = '';

  constructor(private readonly child: ChildProcessWithoutNullStreams, private readonly where: string) {
    super();
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => {
      this.stderr = (this.stderr + s).slice(-STDERR_KEEP);
    });
    child.stdout.on('data', (b: Buffer) => {
      if (!this.push(b)) child.stdout.pause();
    });
    child.stdin.on('error', () => {}); // a broken pipe: ssh is gone, and 'close' says why
    // after ssh exited and its pipes closed: the whole of stdout was pushed by then
    child.on('close', (code: number | null, sig: NodeJS.Signals | null) => {
      if (this.destroyed) return;
      if (code === 0) {
        this.push(null);
        return;
      }
      const said = this.stderr.split('\n').map((l) => l.trim()).filter((l) => l !== '').slice(-3).join('; ');
      const how = code !== null ? `exited with code ${code}` : `was killed by ${sig}`;
      this.destroy(new SparsevirtError('ERR_CONNECTION_CLOSED', `ssh to ${this.where} ${how}${said ? `: ${said}` : ''}`));
    });
  }

  override _read(): void {
    this.child.stdout.resume();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.child.stdin.write(chunk, cb);
  }

  override _writev(chunks: Array<{ chunk: Buffer }>, cb: (err?: Error | null) => void): void {
    this.child.stdin.write(chunks.length === 1 ? chunks[0]!.chunk : Buffer.concat(chunks.map((c) => c.chunk)), cb);
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.child.stdin.end(cb);
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
    cb(err);
  }
}

/** Run ssh for the URI: resolves with its byte stream once the program runs. */
export function openSsh(u: ParsedUri, signal?: AbortSignal): Promise<Duplex> {
  const { file, args } = sshCommand(u);
  const where = `${u.user !== null ? `${u.user}@` : ''}${u.host}${u.port ? `:${u.port}` : ''}`;
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'], signal });
    const failed = (e: NodeJS.ErrnoException): void => {
      reject(e.name === 'AbortError'
        ? new SparsevirtError('ERR_ABORTED', 'connect aborted', { cause: e })
        : new SparsevirtError('ERR_CONNECTION_CLOSED', `cannot run '${file}' for the ssh transport: ${e.message}`, { cause: e }));
    };
    child.once('error', failed);
    child.once('spawn', () => {
      child.off('error', failed);
      child.on('error', () => {}); // later errors (a kill that fails) end the stream through 'close'
      resolve(new SshStream(child, where));
    });
  });
}
