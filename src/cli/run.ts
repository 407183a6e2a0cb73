/**
 * One sparsevirt invocation, as virsh 9.0 runs one: global options, then the command(s), then
 * (with -c) the connection, then each command with virsh's error reporting, a blank line after
 * each command (not with -q), exit status 0 when the last command succeeded, else 1. A transfer
 * stopped by SIGINT, SIGTERM or SIGHUP ends the run with 128 + the signal's number (main.ts
 * then ends the process by that signal); in the interactive shell, SIGINT only ends the command.
 */
import { Ctl, CommandFailed, errorText, INFO, type Io } from './ctl.js';
import { findCommand } from './commands.js';
import { signalStatus } from './exit.js';
import { parseGlobals } from './globals.js';
import { parseInt32 } from './numbers.js';
import { argvTokens, parseCommands, stringTokens, CommandSyntaxError, type ParsedCmd } from './vsh.js';

type Handler = (ctl: Ctl, cmd: ParsedCmd) => Promise<void>;

/** Which module implements a command: loaded on demand, so start-up stays small. */
async function handlerFor(name: string): Promise<Handler> {
  if (name === 'help' || name === 'quit' || name === 'exit') return (await import('./cmd-help.js')).handlers[name]!;
  if (name === 'vol-upload' || name === 'vol-download') return (await import('./cmd-transfer.js')).handlers[name]!;
  if (name === 'vol-copy') return (await import('./cmd-copy.js')).handlers[name]!;
  if (name.startsWith('vol-')) return (await import('./cmd-vol.js')).handlers[name]!;
  if (name.startsWith('pool-')) return (await import('./cmd-pool.js')).handlers[name]!;
  return (await import('./cmd-host.js')).handlers[name]!;
}

/**
 * vshInitDebug: VIRSH_DEBUG and VIRSH_LOG_FILE when -d and -l are not given. virsh reads them
 * twice (at start and after the options), and so says twice that a bad VIRSH_DEBUG is bad.
 */
function debugFromEnv(opts: { debug?: number; logFile?: string }, io: Io): void {
  const env = process.env.VIRSH_DEBUG;
  if (opts.debug === undefined && env !== undefined) {
    const n = parseInt32(env);
    if (n === null || n < 0 || n > 4) io.err('error: VIRSH_DEBUG not set with a valid numeric value\n'.repeat(2));
    else opts.debug = n;
  }
  if (opts.logFile === undefined && process.env.VIRSH_LOG_FILE) opts.logFile = process.env.VIRSH_LOG_FILE;
}

/** vshCommandParse's debug lines: each option of each command as parsed, `vol-info: pool(optdata): p`. */
function traceParsed(ctl: Ctl, cmds: ParsedCmd[]): void {
  for (const cmd of cmds) {
    for (const [name, value] of cmd.opts) {
      const type = cmd.def.opts.find((o) => o.name === name)?.type === 'bool' ? 'bool' : 'optdata';
      ctl.debug(INFO, `${cmd.def.name}: ${name}(${type}): ${value === true ? '(none)' : value}\n`);
    }
  }
}

export async function run(argv: readonly string[], io: Io): Promise<number> {
  const g = parseGlobals(argv);
  if (g.kind === 'exit') {
    if (g.out) io.out(g.out);
    if (g.err) io.err(g.err);
    return g.code;
  }
  if (g.warnings) io.err(g.warnings);
  debugFromEnv(g.opts, io);
  if (g.rest[0] === 'complete') return (await import('./cmd-complete.js')).complete(new Ctl(io, g.opts), g.rest.slice(1));
  const ctl = new Ctl(io, g.opts);
  if (g.opts.logFile !== undefined && !ctl.openLog(g.opts.logFile)) {
    io.err('error: failed to open the log file. check the log file path\n');
    return 1;
  }
  const onError = (msg: string) => ctl.error(msg);
  try {
    if (g.rest.length === 0) return await interactive(io, ctl, onError);
    let cmds: ParsedCmd[];
    try {
      if (g.rest.length === 1) {
        if (g.rest[0] === '') return 1; // virsh: an empty command string fails silently
        ctl.debug(INFO, `commands: "${g.rest[0]}"\n`);
        cmds = parseCommands(stringTokens(g.rest[0]!, onError), findCommand, onError);
      } else {
        cmds = parseCommands(argvTokens(g.rest), findCommand, onError);
      }
    } catch (err) {
      if (err instanceof CommandSyntaxError) return 1;
      throw err;
    }
    traceParsed(ctl, cmds);
    // virsh connects right away to a URI given with -c, even for `help`.
    if (g.opts.connect !== undefined) {
      try {
        await ctl.connection();
      } catch (err) {
        report(ctl, err);
        return 1;
      }
    }
    const r = await runCommands(ctl, cmds, false);
    if (ctl.interrupted) return signalStatus(ctl.interrupted);
    return r.ok ? 0 : 1;
  } finally {
    await ctl.close();
  }
}

/**
 * vshCommandRun: each command, its errors, then a blank line (or the timing); stops at quit,
 * and after a transfer a signal stopped (in the shell, SIGINT ends only that command).
 */
async function runCommands(ctl: Ctl, cmds: ParsedCmd[], shell: boolean): Promise<{ ok: boolean; quit: boolean }> {
  let ok = true;
  for (const cmd of cmds) {
    const start = performance.now();
    ok = true;
    try {
      if (!cmd.def.noConnect) await ctl.connection();
      await (await handlerFor(cmd.def.name))(ctl, cmd);
    } catch (err) {
      ok = false;
      report(ctl, err);
    }
    if (cmd.def.name === 'quit' || cmd.def.name === 'exit') return { ok, quit: true };
    if (ctl.opts.timing) ctl.print(`\n(Time: ${(performance.now() - start).toFixed(3)} ms)\n\n`);
    else ctl.printExtra('\n');
    if (ctl.interrupted) {
      if (!shell || ctl.interrupted !== 'SIGINT') return { ok: false, quit: true };
      ctl.interrupted = null;
      return { ok: false, quit: false };
    }
  }
  return { ok, quit: false };
}

/**
 * No command: virsh's shell. Lines are read from stdin, each one a command string. A terminal
 * gets readline's editing, history and Tab completion, only while the prompt is shown: during a
 * command the terminal is back in its normal mode, so Ctrl-C sends SIGINT (it stops a transfer)
 * and nothing typed meanwhile is drawn over a progress bar. From a pipe each line is echoed after
 * the prompt, as readline does. Ends at EOF or `quit` with status 0, as virsh; Ctrl-C at the
 * prompt ends it by SIGINT, as virsh's.
 */
async function interactive(io: Io, ctl: Ctl, onError: (msg: string) => void): Promise<number> {
  const input = io.stdin;
  if (!input) {
    io.err('error: no commands and no input\n');
    return 1;
  }
  if (ctl.opts.connect !== undefined) {
    try {
      await ctl.connection();
    } catch (err) {
      report(ctl, err);
      return 1;
    }
  }
  ctl.printExtra('Welcome to sparsevirt, the virtualization interactive terminal.\n\n');
  ctl.printExtra("Type:  'help' for help with commands\n       'quit' to quit\n\n");
  const prompt = ctl.opts.readonly ? 'virsh > ' : 'virsh # ';
  const readline = await import('node:readline');
  const tty = input.isTTY === true;
  let next: () => Promise<string | null>;
  let stop = (): void => undefined;
  if (tty) {
    const reader = new TtyLineReader(readline, input as NodeJS.ReadStream, prompt, ctl);
    next = () => reader.read();
  } else {
    const rl = readline.createInterface({ input, terminal: false });
    const lines = rl[Symbol.asyncIterator]();
    next = async () => {
      const r = await lines.next();
      return r.done ? null : r.value;
    };
    stop = () => rl.close();
  }
  try {
    for (;;) {
      const line = await next();
      if (line === null) {
        if (ctl.interrupted) return signalStatus(ctl.interrupted);
        if (!tty) io.out(prompt);
        break;
      }
      if (!tty) io.out(`${prompt}${line}\n`);
      if (!line) continue;
      let cmds: ParsedCmd[];
      try {
        cmds = parseCommands(stringTokens(line, onError), findCommand, onError);
      } catch (err) {
        if (err instanceof CommandSyntaxError) continue;
        throw err;
      }
      traceParsed(ctl, cmds);
      const r = await runCommands(ctl, cmds, true);
      if (ctl.interrupted) return signalStatus(ctl.interrupted);
      if (r.quit) break;
    }
  } finally {
    stop();
  }
  io.out('\n');
  return 0;
}

/** One readline interface per prompt on a terminal (see `interactive`), sharing the history. */
class TtyLineReader {
  #history: string[] = [];

  constructor(
    private readonly readline: typeof import('node:readline'),
    private readonly input: NodeJS.ReadStream,
    private readonly prompt: string,
    private readonly ctl: Ctl,
  ) {}

  /** The next line; null at EOF (Ctrl-D) or Ctrl-C (then `ctl.interrupted` is SIGINT). */
  read(): Promise<string | null> {
    return new Promise((resolve) => {
      const rl = this.readline.createInterface({
        input: this.input,
        output: process.stdout,
        terminal: true,
        history: this.#history,
        historySize: 1000,
        removeHistoryDuplicates: false,
        completer: (line: string, cb: (err: Error | null, result: [string[], string]) => void) => {
          void this.completions(line).then((r) => cb(null, r), () => cb(null, [[], line]));
        },
      });
      let line: string | null = null;
      rl.once('line', (l) => {
        line = l;
        rl.close();
      });
      rl.once('SIGINT', () => {
        this.ctl.interrupted = 'SIGINT';
        process.stdout.write('^C\n');
        rl.close();
      });
      rl.once('close', () => {
        this.#history = (rl as unknown as { history: string[] }).history;
        resolve(line);
      });
      rl.setPrompt(this.prompt);
      rl.prompt();
    });
  }

  private async completions(line: string): Promise<[string[], string]> {
    const { complete } = await import('./complete.js');
    const ctl = this.ctl;
    // names from the server only once connected: a Tab never waits for a connection to open
    return complete(line, ctl.conn ? {
      poolNames: async () => (await ctl.conn!.listAllStoragePools(0)).map((p) => p.name),
      volNames: async (pool) => (await (await ctl.conn!.storagePoolLookupByName(pool)).listAllVolumes(0)).map((v) => v.name),
    } : null);
  }
}

/** vshReportError: the underlying error of a failed command, as `error: …`. */
function report(ctl: Ctl, err: unknown): void {
  if (err instanceof CommandFailed) {
    if (err.detail !== undefined && err.detail !== null) ctl.error(errorText(err.detail));
    if (err.hint !== undefined) ctl.error(err.hint);
    return;
  }
  ctl.error(errorText(err));
}
