/**
 * One sparsevirt invocation, as virsh 9.0 runs one: global options, then the command(s), then
 * (with -c) the connection, then each command with virsh's error reporting, a blank line after
 * each command (not with -q), exit status 0 when the last command succeeded, else 1.
 */
import { Ctl, CommandFailed, errorText, type Io } from './ctl.js';
import { findCommand } from './commands.js';
import { parseGlobals } from './globals.js';
import { argvTokens, parseCommands, stringTokens, SyntaxError, type ParsedCmd } from './vsh.js';

type Handler = (ctl: Ctl, cmd: ParsedCmd) => Promise<void>;

/** Which module implements a command: loaded on demand, so start-up stays small. */
async function handlerFor(name: string): Promise<Handler> {
  if (name === 'help' || name === 'quit' || name === 'exit') return (await import('./cmd-help.js')).handlers[name]!;
  if (name === 'vol-upload' || name === 'vol-download') return (await import('./cmd-transfer.js')).handlers[name]!;
  if (name.startsWith('vol-')) return (await import('./cmd-vol.js')).handlers[name]!;
  if (name.startsWith('pool-')) return (await import('./cmd-pool.js')).handlers[name]!;
  return (await import('./cmd-host.js')).handlers[name]!;
}

export async function run(argv: readonly string[], io: Io): Promise<number> {
  const g = parseGlobals(argv);
  if (g.kind === 'exit') {
    if (g.out) io.out(g.out);
    if (g.err) io.err(g.err);
    return g.code;
  }
  if (g.warnings) io.err(g.warnings);
  if (g.rest[0] === 'complete') return (await import('./cmd-complete.js')).complete(new Ctl(io, g.opts), g.rest.slice(1));
  const onError = (msg: string) => io.err(`error: ${msg}\n`);
  if (g.rest.length === 0) return interactive(io, new Ctl(io, g.opts), onError);
  let cmds: ParsedCmd[];
  try {
    if (g.rest.length === 1) {
      if (g.rest[0] === '') return 1; // virsh: an empty command string fails silently
      cmds = parseCommands(stringTokens(g.rest[0]!, onError), findCommand, onError);
    } else {
      cmds = parseCommands(argvTokens(g.rest), findCommand, onError);
    }
  } catch (err) {
    if (err instanceof SyntaxError) return 1;
    throw err;
  }

  const ctl = new Ctl(io, g.opts);
  try {
    // virsh connects right away to a URI given with -c, even for `help`.
    if (g.opts.connect !== undefined) {
      try {
        await ctl.connection();
      } catch (err) {
        report(ctl, err);
        return 1;
      }
    }
    return (await runCommands(ctl, cmds)).ok ? 0 : 1;
  } finally {
    await ctl.close();
  }
}

/** vshCommandRun: each command, its errors, then a blank line (or the timing); stops at quit. */
async function runCommands(ctl: Ctl, cmds: ParsedCmd[]): Promise<{ ok: boolean; quit: boolean }> {
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
  }
  return { ok, quit: false };
}

/**
 * No command: virsh's shell. Lines are read from stdin (a terminal gets readline's editing; from
 * a pipe each line is echoed after the prompt, as readline does), each one a command string.
 * Ends at EOF or `quit`, with status 0 as virsh.
 */
async function interactive(io: Io, ctl: Ctl, onError: (msg: string) => void): Promise<number> {
  const input = io.stdin;
  if (!input) {
    io.err('error: no commands and no input\n');
    return 1;
  }
  try {
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
    const rl = readline.createInterface({ input, output: tty ? process.stdout : undefined, terminal: tty });
    const lines = rl[Symbol.asyncIterator]();
    try {
      for (;;) {
        if (tty) {
          rl.setPrompt(prompt);
          rl.prompt();
        }
        const next = await lines.next();
        if (next.done) {
          if (!tty) io.out(prompt);
          break;
        }
        const line = next.value;
        if (!tty) io.out(`${prompt}${line}\n`);
        if (!line) continue;
        let cmds: ParsedCmd[];
        try {
          cmds = parseCommands(stringTokens(line, onError), findCommand, onError);
        } catch (err) {
          if (err instanceof SyntaxError) continue;
          throw err;
        }
        if ((await runCommands(ctl, cmds)).quit) break;
      }
    } finally {
      rl.close();
    }
    io.out('\n');
    return 0;
  } finally {
    await ctl.close();
  }
}

/** vshReportError: the underlying error of a failed command, as `error: …`. */
function report(ctl: Ctl, err: unknown): void {
  if (err instanceof CommandFailed) {
    if (err.detail !== undefined && err.detail !== null) ctl.error(errorText(err.detail));
    return;
  }
  ctl.error(errorText(err));
}

