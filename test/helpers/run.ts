/**
 * Running a program the way the tests do: no shell, a timeout, output collected, never a throw.
 */
import { execFile } from 'node:child_process';

export interface RunOptions {
  /** Kill the program after this many ms (default 60 s). */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
}

export interface RunResult<T> {
  /** The exit status; -1 when the program could not be run or was killed. */
  code: number;
  stdout: T;
  stderr: T;
}

function exec<T extends string | Buffer>(encoding: 'utf8' | 'buffer', cmd: string, args: string[], opts: RunOptions): Promise<RunResult<T>> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: opts.timeoutMs ?? 60_000, maxBuffer: 256 << 20, encoding, env: opts.env ?? process.env }, (err, stdout, stderr) => {
      let code = 0;
      if (err) {
        const c = (err as { code?: unknown }).code;
        code = typeof c === 'number' ? c : -1;
        // a program that did not run says nothing: the reason goes where its message would be
        if (code === -1 && stderr.length === 0) stderr = encoding === 'utf8' ? err.message : Buffer.from(err.message);
      }
      resolve({ code, stdout: stdout as T, stderr: stderr as T });
    });
  });
}

/** `cmd ARGS` with its output as text. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult<string>> {
  return exec<string>('utf8', cmd, args, opts);
}

/** `cmd ARGS` with its output as bytes (to compare two programs' output exactly). */
export function runBytes(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult<Buffer>> {
  return exec<Buffer>('buffer', cmd, args, opts);
}
