#!/usr/bin/env -S -u NODE_EXTRA_CA_CERTS node
/**
 * `sparsevirt`: virsh's storage commands over libvirt's remote protocol, with sparse streams.
 * `sparsevirt -c URI CMD ...` takes the same arguments as `virsh -c URI CMD ...` and prints the
 * same output, errors and exit status. See src/cli/run.ts.
 */
import { isatty } from 'node:tty';
import { ABANDONED_MESSAGE, abandonAll, statusSignal } from './exit.js';
import { run } from './run.js';

// The process streams are made when first used: a command that prints nothing (a quiet transfer)
// does not pay for them (stdin from /dev/null or a pipe, stdout on a pipe: a few ms of start-up).
// A closed pipe (`sparsevirt pool-list | head -1`) is not an error worth a stack trace.
let stdoutReady = false;
let stderrReady = false;
function stdout(): NodeJS.WriteStream {
  if (!stdoutReady) {
    stdoutReady = true;
    process.stdout.on('error', () => undefined);
  }
  return process.stdout;
}
function stderr(): NodeJS.WriteStream {
  if (!stderrReady) {
    stderrReady = true;
    process.stderr.on('error', () => undefined);
  }
  return process.stderr;
}

let settled = false;

// Node exits with status 0 once nothing is left to wait for, even if a promise never settled
// (a reply that never comes, on a socket no longer read). Such a run did not complete its
// command: it fails, and leaves no partial download behind.
process.on('beforeExit', () => {
  if (settled) return;
  abandonAll();
  stderr().write(ABANDONED_MESSAGE);
  process.exit(1);
});

/** Exit with `code`; a transfer stopped by a signal ends by that signal, once cleaned up. */
function finish(code: number): void {
  const signal = statusSignal(code);
  if (signal) {
    process.removeAllListeners(signal);
    process.kill(process.pid, signal);
  }
  process.exit(code);
}

// (no top-level await: the bundle is CommonJS, run from V8's code cache; see scripts/bundle.mjs)
run(process.argv.slice(2), {
  out: (s) => void stdout().write(s),
  err: (s) => void stderr().write(s),
  stderrTTY: isatty(2) ? stderr() : null,
  // only the interactive mode (no command) reads it
  get stdin() {
    return process.stdin;
  },
}).then(
  (code) => {
    settled = true;
    finish(code);
  },
  (err: unknown) => {
    settled = true;
    abandonAll();
    stderr().write(`sparsevirt: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);
