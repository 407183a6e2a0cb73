#!/usr/bin/env -S -u NODE_EXTRA_CA_CERTS node
/**
 * `sparsevirt`: virsh's storage commands over libvirt's remote protocol, with sparse streams.
 * `sparsevirt -c URI CMD ...` takes the same arguments as `virsh -c URI CMD ...` and prints the
 * same output, errors and exit status. See src/cli/run.ts.
 */
import { ABANDONED_MESSAGE, abandonAll, statusSignal } from './exit.js';
import { run } from './run.js';

// A closed pipe (`sparsevirt pool-list | head -1`) is not an error worth a stack trace.
for (const s of [process.stdout, process.stderr]) s.on('error', () => undefined);

let settled = false;

// Node exits with status 0 once nothing is left to wait for, even if a promise never settled
// (a reply that never comes, on a socket no longer read). Such a run did not complete its
// command: it fails, and leaves no partial download behind.
process.on('beforeExit', () => {
  if (settled) return;
  abandonAll();
  process.stderr.write(ABANDONED_MESSAGE);
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
  out: (s) => void process.stdout.write(s),
  err: (s) => void process.stderr.write(s),
  stderrTTY: process.stderr.isTTY ? process.stderr : null,
  stdin: process.stdin,
}).then(
  (code) => {
    settled = true;
    finish(code);
  },
  (err: unknown) => {
    settled = true;
    abandonAll();
    process.stderr.write(`sparsevirt: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);
