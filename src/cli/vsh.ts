/**
 * virsh's command-line grammar (libvirt 9.0 tools/vsh.c), rebuilt faithfully:
 *
 * - a command is `name [--opt [value] | --opt=value | value]...`; `--` makes the rest data;
 * - every non-boolean option (data, string, int) can also be given by position, in the order of
 *   the definition (`vol-upload VOL FILE POOL OFFSET LENGTH` works, as in virsh 9.0);
 * - a single command-line argument is a command *string*: quotes, `\` escapes, `;` between
 *   commands and `#` comments, as in virsh's interactive shell;
 * - `--help` anywhere turns the command into `help CMD`.
 *
 * Error texts are virsh's, word for word.
 */

export type OptType = 'bool' | 'string' | 'int' | 'data';

export interface OptDef {
  name: string;
  type: OptType;
  help: string;
  /** Mandatory (data options always are). */
  required?: boolean;
  /** Only by name, never by position (virsh's VSH_OFLAG_REQ_OPT, e.g. --xpath). */
  namedOnly?: boolean;
  /** Not in virsh: shown in help after a marker, so scripts can tell. */
  extension?: boolean;
}

export interface CmdDef {
  name: string;
  help: string;
  desc: string;
  opts: OptDef[];
  /** Runs without a connection (help). */
  noConnect?: boolean;
}

export interface CmdGroup {
  name: string;
  keyword: string;
  commands: CmdDef[];
}

/** A parsed command: its definition and the options given (bools map to `true`). */
export interface ParsedCmd {
  def: CmdDef;
  opts: Map<string, string | true>;
}

export class CommandSyntaxError extends Error {}

type Token = { tk: 'arg'; data: string } | { tk: 'end' } | { tk: 'subcmd_end' } | { tk: 'error' };

interface TokenSource {
  next(report: boolean): Token;
}

/** Tokens from an argv array (no quoting, no command separators). */
export function argvTokens(argv: readonly string[]): TokenSource {
  let i = 0;
  return { next: () => (i < argv.length ? { tk: 'arg', data: argv[i++]! } : { tk: 'end' }) };
}

/**
 * Tokens from a command string (vshCommandStringGetArg): blanks separate, `;` or a newline ends a
 * command, `#` at a token start comments to the end of the line, '…' is literal, "…" allows `\`
 * escapes, `\` escapes outside single quotes, backslash-newline is elided.
 */
export function stringTokens(input: string, onError: (msg: string) => void): TokenSource {
  let p = 0;
  const s = input;
  return {
    next(report: boolean): Token {
      while (p < s.length && (s[p] === ' ' || s[p] === '\t' || (s[p] === '\\' && s[p + 1] === '\n'))) p += s[p] === '\\' ? 2 : 1;
      if (p >= s.length) return { tk: 'end' };
      if (s[p] === ';' || s[p] === '\n') {
        p++;
        return { tk: 'subcmd_end' };
      }
      if (s[p] === '#') {
        while (p < s.length && s[p] !== '\n') p++;
        if (p < s.length) p++;
        return { tk: 'subcmd_end' };
      }
      let single = false;
      let double = false;
      let out = '';
      while (p < s.length) {
        const c = s[p]!;
        if (!double && !single && (c === ' ' || c === '\t' || c === ';' || c === '\n')) break;
        if (!double && c === "'") {
          single = !single;
          p++;
          continue;
        } else if (!single && c === '\\') {
          p++;
          if (p >= s.length) {
            if (report) onError('dangling \\');
            return { tk: 'error' };
          }
          if (s[p] === '\n') {
            p++;
            continue;
          }
        } else if (!single && c === '"') {
          double = !double;
          p++;
          continue;
        }
        out += s[p];
        p++;
      }
      if (double) {
        if (report) onError('missing "');
        return { tk: 'error' };
      }
      return { tk: 'arg', data: out };
    },
  };
}

const isAlnum = (c: string | undefined): boolean => c !== undefined && /^[A-Za-z0-9]$/.test(c);

/**
 * vshCommandParse: the commands of `source`, or a CommandSyntaxError after `onError` reported why.
 * `lookup` finds a command by name (null = unknown).
 */
export function parseCommands(source: TokenSource, lookup: (name: string) => CmdDef | null, onError: (msg: string) => void): ParsedCmd[] {
  const cmds: ParsedCmd[] = [];
  const fail = (msg?: string): never => {
    if (msg !== undefined) onError(msg);
    throw new CommandSyntaxError(msg ?? 'syntax error');
  };
  for (;;) {
    let def: CmdDef | null = null;
    let opts = new Map<string, string | true>();
    let dataOnly = false;
    // Positional fill order: every option that takes a value and may be given by position.
    let needArg: OptDef[] = [];
    const seen = new Set<string>();
    let sawHelp = false;
    let tk: Token;
    for (;;) {
      tk = source.next(true);
      if (tk.tk === 'error') fail();
      if (tk.tk !== 'arg') break;
      const data = tk.data;
      if (def === null) {
        if (data.startsWith('#')) {
          // the rest of the line is a comment
          do tk = source.next(false);
          while (tk.tk === 'arg');
          break;
        }
        def = lookup(data);
        if (!def) fail(`unknown command: '${data}'`);
        needArg = def!.opts.filter((o) => o.type !== 'bool' && !o.namedOnly);
        continue;
      }
      const cmd: CmdDef = def;
      if (!dataOnly && data[0] === '-' && data[1] === '-' && isAlnum(data[2])) {
        const eq = data.indexOf('=', 2);
        const name = eq >= 0 ? data.slice(2, eq) : data.slice(2);
        const inline = eq >= 0 ? data.slice(eq + 1) : undefined;
        if (name === 'help') {
          if (inline !== undefined) fail(`invalid '=' after option --help`);
          sawHelp = true;
          continue;
        }
        const opt = cmd.opts.find((o) => o.name === name);
        if (!opt) {
          if (cmd.name === 'help') continue;
          fail(`command '${cmd.name}' doesn't support option --${name}`);
        }
        if (seen.has(opt!.name)) fail(`option --${name} already seen`);
        seen.add(opt!.name);
        if (opt!.type !== 'bool') {
          let value = inline;
          if (value === undefined) {
            const t = source.next(true);
            if (t.tk === 'error') fail();
            if (t.tk !== 'arg') fail(`expected syntax: --${opt!.name} <${opt!.type === 'int' ? 'number' : 'string'}>`);
            value = (t as { data: string }).data;
          }
          needArg = needArg.filter((o) => o !== opt);
          opts.set(opt!.name, value!);
        } else {
          if (inline !== undefined) fail(`invalid '=' after option --${opt!.name}`);
          opts.set(opt!.name, true);
        }
        continue;
      }
      if (!dataOnly && data === '--') {
        dataOnly = true;
        continue;
      }
      const opt = needArg.shift();
      if (!opt) {
        if (cmd.name === 'help') continue;
        fail(`unexpected data '${data}'`);
      }
      seen.add(opt!.name);
      opts.set(opt!.name, data);
    }
    if (def) {
      if (sawHelp) {
        opts = new Map([['command', def.name]]);
        def = lookup('help')!;
      } else {
        const missing = def.opts.filter((o) => o.required && !seen.has(o.name));
        for (const o of missing) {
          onError(o.type === 'data' ? `command '${def.name}' requires <${o.name}> option` : `command '${def.name}' requires --${o.name} option`);
        }
        if (missing.length) fail();
      }
      cmds.push({ def, opts });
    }
    if (tk.tk === 'end') break;
  }
  return cmds;
}

// ------------------------------------------------------------------ help

/** vshCmddefHelp: NAME, SYNOPSIS, DESCRIPTION (if any), OPTIONS (if any), then a newline. */
export function commandHelp(def: CmdDef): string {
  let out = `  NAME\n    ${def.name} - ${def.help}\n\n  SYNOPSIS\n    ${def.name}`;
  for (const o of def.opts) {
    switch (o.type) {
      case 'bool': out += ` [--${o.name}]`; break;
      case 'int': out += o.required ? ` <${o.name}>` : ` [--${o.name} <number>]`; break;
      case 'string': out += ` [--${o.name} <string>]`; break;
      case 'data': out += ` <${o.name}>`; break;
    }
  }
  out += '\n';
  if (def.desc) out += `\n  DESCRIPTION\n    ${def.desc}\n`;
  if (def.opts.length) {
    out += '\n  OPTIONS\n';
    for (const o of def.opts) {
      let left: string;
      switch (o.type) {
        case 'bool': left = `--${o.name}`; break;
        case 'int': left = o.required ? `[--${o.name}] <number>` : `--${o.name} <number>`; break;
        case 'string': left = `--${o.name} <string>`; break;
        case 'data': left = `[--${o.name}] <string>`; break;
      }
      out += `    ${left.padEnd(15)}  ${o.help}\n`;
    }
  }
  return out + '\n';
}

/** vshCmdGrpHelp: the group's commands with their one-line help. */
export function groupHelp(g: CmdGroup): string {
  let out = ` ${g.name} (help keyword '${g.keyword}'):\n`;
  for (const c of g.commands) out += `    ${c.name.padEnd(30)} ${c.help}\n`;
  return out;
}

// ------------------------------------------------------------------ option access

/**
 * vshCommandOptStringReq: the value (undefined when absent), or the virsh error for an empty
 * value, "Failed to get option 'X': Option argument is empty".
 */
export function optString(cmd: ParsedCmd, name: string): { value?: string; error?: string } {
  const v = cmd.opts.get(name);
  if (v === undefined || v === true) return {};
  if (v === '') return { error: `Failed to get option '${name}': Option argument is empty` };
  return { value: v };
}

export function optBool(cmd: ParsedCmd, name: string): boolean {
  return cmd.opts.has(name);
}
