/**
 * virsh's global options, parsed like virsh 9.0 does with getopt_long("+:c:d:e:hk:K:l:qrtvV"):
 * stops at the first non-option (the command), clusters of short options (`-qrc URI`), `-cURI`,
 * `--connect=URI`, unique prefixes of long options (`--conn`).
 */
import { GROUPS } from './commands.js';
import { parseInt32 } from './numbers.js';
import type { GlobalOptions } from './ctl.js';

export type GlobalsResult =
  | { kind: 'run'; opts: GlobalOptions; rest: string[]; warnings: string }
  | { kind: 'exit'; code: number; out?: string; err?: string };

interface LongOpt {
  name: string;
  arg: 'none' | 'required' | 'optional';
  short: string;
}

const LONG: LongOpt[] = [
  { name: 'connect', arg: 'required', short: 'c' },
  { name: 'debug', arg: 'required', short: 'd' },
  { name: 'escape', arg: 'required', short: 'e' },
  { name: 'help', arg: 'none', short: 'h' },
  { name: 'keepalive-interval', arg: 'required', short: 'k' },
  { name: 'keepalive-count', arg: 'required', short: 'K' },
  { name: 'log', arg: 'required', short: 'l' },
  { name: 'quiet', arg: 'none', short: 'q' },
  { name: 'readonly', arg: 'none', short: 'r' },
  { name: 'timing', arg: 'none', short: 't' },
  { name: 'version', arg: 'optional', short: 'v' },
];
const SHORT_WITH_ARG = new Set(['c', 'd', 'e', 'k', 'K', 'l']);
const SHORT_NO_ARG = new Set(['h', 'q', 'r', 't', 'v', 'V']);

/** The version of virsh whose behaviour sparsevirt reproduces (`sparsevirt --version`). */
export const VIRSH_VERSION = '9.0.0';
export const SPARSEVIRT_VERSION = '0.1.0';

export const USAGE = `
sparsevirt [options]... [<command_string>]
sparsevirt [options]... <command> [args...]

  options:
    -c | --connect=URI      hypervisor connection URI
    -d | --debug=NUM        debug level [0-4]
    -e | --escape <char>    set escape sequence for console
    -h | --help             this help
    -k | --keepalive-interval=NUM
                            keepalive interval in seconds, 0 for disable
    -K | --keepalive-count=NUM
                            number of possible missed keepalive messages
    -l | --log=FILE         output logging to file
    -q | --quiet            quiet mode
    -r | --readonly         connect readonly
    -t | --timing           print timing information
    -v                      short version
    -V                      long version
         --version[=TYPE]   version, TYPE is short or long (default short)
  commands (non interactive mode):

`;

/** `-h`: the options, then every command by group (virsh's vshUsage). */
export function usage(): string {
  let out = USAGE;
  for (const g of GROUPS) {
    out += ` ${g.name} (help keyword '${g.keyword}')\n`;
    for (const c of g.commands) out += `    ${c.name.padEnd(30)} ${c.help}\n`;
    out += '\n';
  }
  return `${out}\n  (specify help <group> for details about the commands in the group)\n\n  (specify help <command> for details about the command)\n\n`;
}

export const LONG_VERSION = `sparsevirt ${SPARSEVIRT_VERSION}: virsh-compatible storage commands (virsh ${VIRSH_VERSION} syntax and output)
over libvirt's remote protocol, with sparse streams.
See https://libvirt.org/ for virsh.
`;

export function parseGlobals(argv: readonly string[]): GlobalsResult {
  const opts: GlobalOptions = { readonly: false, quiet: false, timing: false };
  let warnings = '';
  const err = (msg: string): GlobalsResult => ({ kind: 'exit', code: 1, err: `error: ${msg}\n` });
  const missing = (short: string): GlobalsResult => {
    const long = LONG.find((l) => l.short === short);
    return err(long ? `option '-${short}'/'--${long.name}' requires an argument` : `option '-${short}' requires an argument`);
  };
  let i = 0;
  for (; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      i++;
      break;
    }
    if (a.length < 2 || a[0] !== '-') break;
    const applied: Array<[string, string | undefined]> = [];
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq >= 0 ? a.slice(2, eq) : a.slice(2);
      const exact = LONG.find((l) => l.name === name);
      const prefixed = LONG.filter((l) => l.name.startsWith(name));
      const opt = exact ?? (prefixed.length === 1 ? prefixed[0] : undefined);
      if (!opt) return err(`unsupported option '${a}'. See --help.`);
      let value: string | undefined = eq >= 0 ? a.slice(eq + 1) : undefined;
      if (opt.arg === 'none' && value !== undefined) return err(`unsupported option '-${opt.short}'. See --help.`);
      if (opt.arg === 'required' && value === undefined) {
        if (i + 1 >= argv.length) return missing(opt.short);
        value = argv[++i]!;
      }
      applied.push([opt.short, value]);
    } else {
      for (let j = 1; j < a.length; j++) {
        const c = a[j]!;
        if (SHORT_WITH_ARG.has(c)) {
          let value = a.slice(j + 1);
          if (!value) {
            if (i + 1 >= argv.length) return missing(c);
            value = argv[++i]!;
          }
          applied.push([c, value]);
          break;
        }
        if (!SHORT_NO_ARG.has(c)) return err(`unsupported option '-${c}'. See --help.`);
        applied.push([c, undefined]);
      }
    }
    for (const [c, value] of applied) {
      switch (c) {
        case 'c':
          opts.connect = value;
          break;
        case 'd': {
          const n = parseInt32(value!);
          if (n === null) return err(`option -d takes a numeric argument`);
          if (n < 0 || n > 4) warnings += `error: ignoring debug level ${n} out of range [0-4]\n`;
          else opts.debug = n;
          break;
        }
        case 'l':
          opts.logFile = value!;
          break;
        case 'e':
          break; // the console's escape character: no console here
        case 'h':
          return { kind: 'exit', code: 0, out: usage() };
        case 'k':
        case 'K': {
          const n = parseInt32(value!);
          if (n === null) return err(`Invalid value for option -${c}`);
          if (n < 0) return err(`option -${c} requires a positive integer argument`);
          if (c === 'k') opts.keepaliveInterval = n;
          else opts.keepaliveCount = n;
          break;
        }
        case 'q':
          opts.quiet = true;
          break;
        case 'r':
          opts.readonly = true;
          break;
        case 't':
          opts.timing = true;
          break;
        case 'v':
          if (value !== 'long') return { kind: 'exit', code: 0, out: `${VIRSH_VERSION}\n` };
          return { kind: 'exit', code: 0, out: LONG_VERSION };
        case 'V':
          return { kind: 'exit', code: 0, out: LONG_VERSION };
      }
    }
  }
  return { kind: 'run', opts, rest: argv.slice(i), warnings };
}
