#!/usr/bin/env -S -u NODE_EXTRA_CA_CERTS node
/**
 * `sparsevirt`: virsh's storage commands over libvirt's remote protocol, with sparse streams.
 * `sparsevirt -c URI CMD ...` takes the same arguments as `virsh -c URI CMD ...` and prints the
 * same output, errors and exit status. See src/cli/run.ts.
 */
import { run } from './run.js';

// A closed pipe (`sparsevirt pool-list | head -1`) is not an error worth a stack trace.
for (const s of [process.stdout, process.stderr]) s.on('error', () => undefined);

// (no top-level await: the bundle is CommonJS, run from V8's code cache; see scripts/bundle.mjs)
void run(process.argv.slice(2), {
  out: (s) => void process.stdout.write(s),
  err: (s) => void process.stderr.write(s),
  stderrTTY: process.stderr.isTTY ? process.stderr : null,
  stdin: process.stdin,
}).then((code) => process.exit(code));
