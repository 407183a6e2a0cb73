/**
 * A program on a pseudo-terminal, as a person runs it: Python's `pty` module (/usr/bin/python3,
 * stdlib only) forks the program with the terminal as its stdin, stdout, stderr and controlling
 * terminal, of a given size; what we write is typed on it (Ctrl-C sends SIGINT through the
 * terminal's line discipline), what it prints is read back.
 *
 * ```ts
 * const p = spawnPty(['sparsevirt', 'pool-list'], { cols: 80 });
 * await p.waitFor(/default/);
 * const { code, signal } = await p.exited;
 * ```
 */
import { spawn } from 'node:child_process';

/**
 * The bridge: argv = rows cols program args…. Reports on its stderr, one JSON line each, the
 * child's pid first and its end last ({"code": n} or {"signal": n}).
 */
const BRIDGE = String.raw`
import os, sys, pty, fcntl, termios, struct, select, json, errno, signal
rows, cols = int(sys.argv[1]), int(sys.argv[2])
argv = sys.argv[3:]
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack('HHHH', rows, cols, 0, 0))
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
sys.stderr.write(json.dumps({'pid': pid}) + '\n'); sys.stderr.flush()
inp = sys.stdin.fileno()
out = sys.stdout.fileno()
reading = True
while True:
    fds = [fd] + ([inp] if reading else [])
    r, _, _ = select.select(fds, [], [], 0.2)
    if inp in r:
        data = os.read(inp, 4096)
        if data:
            os.write(fd, data)
        else:
            reading = False
    if fd in r:
        try:
            data = os.read(fd, 65536)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            data = b''
        if not data:
            break
        os.write(out, data)
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    sys.stderr.write(json.dumps({'signal': os.WTERMSIG(status)}) + '\n')
else:
    sys.stderr.write(json.dumps({'code': os.WEXITSTATUS(status)}) + '\n')
`;

const SIGNAL_NAMES: Record<number, NodeJS.Signals> = { 1: 'SIGHUP', 2: 'SIGINT', 9: 'SIGKILL', 15: 'SIGTERM' };

export interface PtyExit {
  /** Exit status, or null when a signal ended the program. */
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface PtyProcess {
  /** The program's pid (not the bridge's). */
  pid: Promise<number>;
  /** Everything it printed so far, as the terminal got it (with `\r\n` and escape sequences). */
  output(): string;
  /** Resolves with the output once `pattern` occurs in it (searched from `from`); rejects after `timeoutMs`. */
  waitFor(pattern: RegExp | string, timeoutMs?: number, from?: number): Promise<string>;
  /** Types `keys` on the terminal. */
  type(keys: string): void;
  /** Sends `signal` to the program itself. */
  kill(signal: NodeJS.Signals): Promise<void>;
  exited: Promise<PtyExit>;
}

export interface PtyOptions {
  cols?: number;
  rows?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** The bridge (and so the program) is killed after this long (default 60 s). */
  timeoutMs?: number;
}

export function spawnPty(argv: string[], opts: PtyOptions = {}): PtyProcess {
  const bridge = spawn('/usr/bin/python3', ['-c', BRIDGE, String(opts.rows ?? 24), String(opts.cols ?? 80), ...argv], {
    env: { TERM: 'xterm', ...(opts.env ?? process.env) },
    cwd: opts.cwd,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let out = '';
  let status = '';
  const listeners = new Set<() => void>();
  bridge.stdout.setEncoding('utf8');
  bridge.stdout.on('data', (s: string) => {
    out += s;
    for (const l of [...listeners]) l();
  });
  let resolvePid!: (pid: number) => void;
  const pid = new Promise<number>((resolve) => {
    resolvePid = resolve;
  });
  bridge.stderr.setEncoding('utf8');
  bridge.stderr.on('data', (s: string) => {
    status += s;
    const m = /\{"pid": (\d+)\}/.exec(status);
    if (m) resolvePid(Number(m[1]));
  });
  const timer = setTimeout(() => bridge.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
  const exited = new Promise<PtyExit>((resolve, reject) => {
    bridge.on('error', reject);
    bridge.on('close', () => {
      clearTimeout(timer);
      const end = /\{"(code|signal)": (\d+)\}\s*$/.exec(status);
      if (!end) return reject(new Error(`the pty bridge ended without the program's status: ${status}\n--- output\n${out}`));
      const n = Number(end[2]);
      resolve(end[1] === 'code' ? { code: n, signal: null } : { code: null, signal: SIGNAL_NAMES[n] ?? (`SIG${n}` as NodeJS.Signals) });
    });
  });
  exited.catch(() => undefined);
  bridge.stdin.on('error', () => undefined);
  return {
    pid,
    output: () => out,
    waitFor(pattern, timeoutMs = 20_000, from = 0) {
      const found = () => (typeof pattern === 'string' ? out.indexOf(pattern, from) >= 0 : pattern.test(out.slice(from)));
      if (found()) return Promise.resolve(out);
      return new Promise((resolve, reject) => {
        const check = () => {
          if (!found()) return;
          done();
          resolve(out);
        };
        const t = setTimeout(() => {
          done();
          reject(new Error(`no ${String(pattern)} on the terminal within ${timeoutMs} ms; it shows:\n${JSON.stringify(out)}`));
        }, timeoutMs);
        const onClose = () => {
          // the program ended: one last look, then give up at once
          setImmediate(() => {
            if (found()) return check();
            done();
            reject(new Error(`the program ended without ${String(pattern)} on the terminal; it shows:\n${JSON.stringify(out)}\n${status}`));
          });
        };
        const done = () => {
          clearTimeout(t);
          listeners.delete(check);
          bridge.off('close', onClose);
        };
        listeners.add(check);
        bridge.once('close', onClose);
      });
    },
    type(keys) {
      bridge.stdin.write(keys);
    },
    async kill(signal) {
      process.kill(await pid, signal);
    },
    exited,
  };
}

/** The text of a terminal transcript: escape sequences removed, `\r\n` as `\n`. */
export function plain(s: string): string {
  // eslint-disable-next-line no-control-regex
  return s.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').replace(/\r+\n/g, '\n');
}

/** Every progress line drawn (`\r…\x1b[K`), escape sequences removed. */
export function barLines(s: string): string[] {
  // eslint-disable-next-line no-control-regex
  return s.split('\r').filter((l) => l.endsWith('\x1b[K')).map((l) => l.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '')).filter((l) => l !== '');
}
