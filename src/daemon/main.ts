#!/usr/bin/env -S -u NODE_EXTRA_CA_CERTS node
/**
 * `sparsevirtd`: the daemon executable. Runs in the foreground, logs JSON lines to stderr,
 * stops cleanly on SIGINT/SIGTERM (a second signal exits at once).
 */
import { parseDaemonArgs, helpText, packageVersion } from './options.js';
import { startDaemon } from './server.js';

async function main(argv: string[]): Promise<number> {
  let cmd;
  try {
    cmd = parseDaemonArgs(argv);
  } catch (err) {
    process.stderr.write(`sparsevirtd: ${(err as Error).message}\n`);
    return 2;
  }
  if (cmd.action === 'help') {
    process.stdout.write(helpText());
    return 0;
  }
  if (cmd.action === 'version') {
    process.stdout.write(`sparsevirtd ${packageVersion()}\n`);
    return 0;
  }
  let daemon;
  try {
    daemon = await startDaemon(cmd.options);
  } catch (err) {
    process.stderr.write(`${JSON.stringify({ time: new Date().toISOString(), level: 'error', msg: 'sparsevirtd failed to start', error: (err as Error).message })}\n`);
    return 1;
  }
  // A daemon logs a stray rejection rather than dying on it (handlers are wrapped; this is the net under them).
  process.on('unhandledRejection', (reason) => {
    process.stderr.write(`${JSON.stringify({ time: new Date().toISOString(), level: 'error', msg: 'unhandled rejection', error: String((reason as Error)?.stack ?? reason) })}\n`);
  });
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = () => {
      if (stopping) process.exit(1);
      stopping = true;
      void daemon.close().then(() => resolve(0), () => resolve(1));
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
    // Anything left (a stuck socket) must not keep a stopped daemon alive.
    setTimeout(() => process.exit(code), 1000).unref();
  },
  (err) => {
    process.stderr.write(`sparsevirtd: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  },
);
