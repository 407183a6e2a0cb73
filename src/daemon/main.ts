#!/usr/bin/env -S -u NODE_EXTRA_CA_CERTS node
/**
 * `sparsevirtd`: the daemon executable. Reads its configuration file, runs in the foreground,
 * logs to its outputs, re-reads the file on SIGHUP, stops cleanly on SIGINT/SIGTERM (a second
 * signal exits at once). Under systemd it takes the sockets systemd made and reports readiness.
 *
 * Exit status: 0 stopped cleanly, 1 failed to start or stopped on an error, 2 bad command line,
 * 78 (EX_CONFIG) configuration refused.
 */
import path from 'node:path';
import { CONFIG_KEYS, ConfigError, defaultConfigFile, loadConfig, type DaemonConfig } from './config.js';
import { Logger, type LogOutput } from './log.js';
import { openOutputs, stderrOutput } from './log-outputs.js';
import { helpText, overriddenKeys, packageVersion, parseDaemonFlags, resolveOptions, type DaemonFlags } from './options.js';
import { startDaemon, type DaemonHandle } from './server.js';
import { installUnits, listenFdsFromEnv, Notifier } from './systemd.js';

const EX_CONFIG = 78;

function errorMessage(err: unknown): string {
  return (err as Error)?.message ?? String(err);
}

/** The outputs `c` asks for; throws ConfigError naming log_outputs' line. */
function outputsOf(c: DaemonConfig): LogOutput[] {
  if (!c.logOutputs) return [stderrOutput()];
  try {
    return openOutputs(c.logOutputs);
  } catch (err) {
    throw new ConfigError(c.file ?? '(defaults)', c.lines.get('log_outputs') ?? null, errorMessage(err), { cause: err });
  }
}

async function main(argv: string[]): Promise<number> {
  let cmd;
  try {
    cmd = parseDaemonFlags(argv);
  } catch (err) {
    process.stderr.write(`sparsevirtd: ${errorMessage(err)}\n`);
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
  if (cmd.action === 'install-units') {
    try {
      const r = installUnits(cmd.prefix, { node: process.execPath, script: path.resolve(process.argv[1]!) });
      process.stdout.write(`${r.files.join('\n')}\n\nThen: systemctl daemon-reload; systemctl enable --now sparsevirtd.socket sparsevirtd-ro.socket\n`);
      return 0;
    } catch (err) {
      process.stderr.write(`sparsevirtd: cannot install the units: ${errorMessage(err)}\n`);
      return 1;
    }
  }
  if (cmd.action !== 'flags') return 2;
  const { flags } = cmd;
  const configFile = flags.config ?? defaultConfigFile();
  const required = flags.config !== undefined;

  if (cmd.check) {
    try {
      const c = loadConfig(configFile, required);
      resolveOptions(flags, c);
      for (const o of outputsOf(c)) o.close?.();
      process.stdout.write(c.file ? `${c.file}: OK\n` : `${configFile}: no such file (the defaults apply)\n`);
      return 0;
    } catch (err) {
      process.stderr.write(`${errorMessage(err)}\n`);
      return err instanceof ConfigError ? EX_CONFIG : 1;
    }
  }

  const bootLog = Logger.create('info', [stderrOutput()]);
  let config: DaemonConfig;
  let log: Logger;
  try {
    config = loadConfig(configFile, required);
    const options = resolveOptions(flags, config);
    log = Logger.create(options.logLevel ?? 'info', outputsOf(config));
  } catch (err) {
    bootLog.error('configuration refused', { error: errorMessage(err) });
    return err instanceof ConfigError ? EX_CONFIG : 1;
  }

  const notifier = new Notifier({ onError: (m) => log.warn('cannot notify systemd', { error: m }) });
  let daemon: DaemonHandle | null = null;
  // SIGHUP's default action ends the process: take it over before anything else
  process.on('SIGHUP', () => {
    if (!daemon) {
      log.warn('SIGHUP while starting: ignored');
      return;
    }
    try {
      config = reload(daemon, log, flags, configFile, required, config, notifier);
    } catch (err) {
      log.error('reload failed; the daemon goes on as it was', { error: errorMessage(err) });
    }
  });

  const options = resolveOptions(flags, config);
  options.log = log;
  options.activated = listenFdsFromEnv();
  try {
    daemon = await startDaemon(options);
  } catch (err) {
    log.error('sparsevirtd failed to start', { error: errorMessage(err) });
    return 1;
  }
  if (config.file) log.debug('configuration file', { file: config.file });
  const started = daemon;
  void notifier.notify('READY=1', `STATUS=listening on ${started.addresses.map((a) => (a.kind === 'unix' ? a.path : `${a.kind}:${a.host}:${a.port}`)).join(', ')}`);
  // A daemon logs a stray rejection rather than dying on it (handlers are wrapped; this is the net under them).
  process.on('unhandledRejection', (reason) => {
    log.error('unhandled rejection', { error: String((reason as Error)?.stack ?? reason) });
  });
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = () => {
      if (stopping) process.exit(1);
      stopping = true;
      void notifier.notify('STOPPING=1');
      void started.close().then(() => resolve(0), () => resolve(1));
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}

/**
 * SIGHUP: read the file again; apply what can change while running; log what was applied, what
 * needs a restart, what the command line holds. A refused file changes nothing. Returns the
 * configuration now in force (keys needing a restart keep their running values).
 */
function reload(daemon: DaemonHandle, log: Logger, flags: DaemonFlags, file: string, required: boolean, running: DaemonConfig, notifier: Notifier): DaemonConfig {
  void notifier.notify('RELOADING=1');
  try {
    let next: DaemonConfig;
    try {
      next = loadConfig(file, required);
    } catch (err) {
      log.error('configuration not reloaded: the file is refused; nothing changed', { error: errorMessage(err) });
      return running;
    }
    const overridden = new Set(overriddenKeys(flags));
    const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);
    const changed = CONFIG_KEYS.filter((k) => !same(running[k.field], next[k.field]));
    const failed: Array<{ key: string; error: string }> = [];
    let outputs: LogOutput[] | undefined;
    if (changed.some((k) => k.name === 'log_outputs') || next.logOutputs?.some((o) => o.kind === 'file')) {
      // files are reopened at every reload (logrotate); a new output that cannot open keeps the old ones
      try {
        outputs = outputsOf(next);
      } catch (err) {
        failed.push({ key: 'log_outputs', error: errorMessage(err) });
        next = { ...next, logOutputs: running.logOutputs };
      }
    }
    const options = resolveOptions(flags, next);
    log.reconfigure(options.logLevel ?? 'info', outputs);
    const report = daemon.reload(options);
    for (const f of report.failed) failed.push({ key: f.what === 'tls.files' ? 'key_file, cert_file, ca_file' : f.what, error: f.error });
    const applied = changed.filter((k) => k.reload && !overridden.has(k.name) && !failed.some((f) => f.key === k.name)).map((k) => k.name);
    const needRestart = changed.filter((k) => !k.reload && !overridden.has(k.name)).map((k) => k.name);
    const fromCommandLine = changed.filter((k) => overridden.has(k.name)).map((k) => k.name);
    log.info('configuration reloaded', { file: next.file ?? file, applied, ...(fromCommandLine.length ? { commandLine: fromCommandLine } : {}) });
    if (needRestart.length) log.warn('configuration changes not applied: they need a restart', { keys: needRestart });
    for (const f of failed) log.error('configuration change not applied', { key: f.key, error: f.error });
    // what needs a restart keeps running as it is, and is reported again at the next reload
    const inForce: DaemonConfig = { ...next, lines: next.lines };
    for (const k of CONFIG_KEYS) if (!k.reload) (inForce as unknown as Record<string, unknown>)[k.field] = running[k.field];
    return inForce;
  } finally {
    void notifier.notify('READY=1');
  }
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
