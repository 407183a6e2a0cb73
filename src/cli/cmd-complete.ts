/**
 * `sparsevirt complete -- WORDS…`: the candidates for the last of WORDS, a partial command line
 * after the program's global options, one per line; as virsh's `complete`, which the bash and zsh
 * completion scripts (`completion-scripts.ts`) call. Command names, option names and fixed
 * values come from the command table; pool and volume names from the connection, opened only
 * when they are asked for. A word that wants a file name gets no candidate, so the shell
 * completes files itself.
 *
 * The words follow virsh's grammar (`vsh.ts`): `--opt value`, `--opt=value`, values by position
 * in the order of the definition, `--` making the rest data.
 */
import { POOL_TYPES, WIPE_ALGORITHM_NAMES } from '../protocol/remote.js';
import type { Ctl, CommandFailed } from './ctl.js';
import { findCommand, GROUPS } from './commands.js';
import type { CmdDef, OptDef } from './vsh.js';

/** vol-create-as --format (its help text's list). */
export const VOL_FORMATS = ['raw', 'bochs', 'qcow', 'qcow2', 'qed', 'vmdk'];

/** The values an option takes: names from the connection, a fixed list, a file, or anything. */
export type ValueKind = 'pool' | 'vol' | 'file' | 'command' | { list: string[] } | null;

export function valueKind(cmd: CmdDef, opt: OptDef): ValueKind {
  if (cmd.name === 'help' && opt.name === 'command') return 'command';
  if (opt.type === 'bool') return null;
  switch (opt.name) {
    case 'pool': return cmd.name === 'pool-define-as' ? null : 'pool';
    case 'vol': return 'vol';
    case 'file': return 'file';
    case 'type': return { list: [...POOL_TYPES] };
    case 'format': case 'backing-vol-format': return { list: VOL_FORMATS };
    case 'algorithm': return { list: [...WIPE_ALGORITHM_NAMES] };
    default: return null;
  }
}

/** Every command, in the order of `help`. */
export function commandNames(): string[] {
  return GROUPS.flatMap((g) => g.commands.map((c) => c.name));
}

/** What the last word wants. */
export type Completion =
  | { want: 'commands'; prefix: string }
  | { want: 'options'; prefix: string; names: string[] }
  | { want: 'values'; prefix: string; kind: ValueKind; cmd: CmdDef; pool?: string; emitPrefix: string }
  | { want: 'nothing' };

/**
 * Merge bash's `=` words (COMP_WORDBREAKS splits `--pool=de` into `--pool`, `=`, `de`) back
 * into one.
 */
export function joinEquals(words: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < words.length; i++) {
    const w = words[i]!;
    if (w === '=' && out.length > 0 && /^--[A-Za-z0-9][\w-]*$/.test(out[out.length - 1]!)) {
      out[out.length - 1] += `=${words[i + 1] ?? ''}`;
      i++;
    } else {
      out.push(w);
    }
  }
  return out;
}

/** A command line given as one string: blanks separate words; a trailing blank starts a new, empty one. */
export function splitLine(line: string): string[] {
  const words = line.split(/[ \t]+/).filter((w, i, all) => w !== '' || i === all.length - 1);
  return words.length === 0 ? [''] : words;
}

/** What `words` (the command first, the word being completed last) asks for. Pure. */
export function analyse(input: string[]): Completion {
  const words = joinEquals(input.length === 0 ? [''] : input);
  const cur = words[words.length - 1]!;
  if (words.length === 1) return { want: 'commands', prefix: cur };
  const cmd = findCommand(words[0]!);
  if (!cmd) return { want: 'nothing' };
  const given = new Map<string, string | true>();
  let pending = cmd.opts.filter((o) => o.type !== 'bool' && !o.namedOnly);
  let dataOnly = false;
  let valueFor: OptDef | null = null;
  for (const w of words.slice(1, -1)) {
    if (valueFor) {
      given.set(valueFor.name, w);
      pending = pending.filter((o) => o !== valueFor);
      valueFor = null;
      continue;
    }
    if (!dataOnly && w === '--') {
      dataOnly = true;
      continue;
    }
    if (!dataOnly && w.startsWith('--') && w.length > 2) {
      const eq = w.indexOf('=');
      const opt = cmd.opts.find((o) => o.name === (eq >= 0 ? w.slice(2, eq) : w.slice(2)));
      if (!opt) continue;
      if (opt.type === 'bool') given.set(opt.name, true);
      else if (eq >= 0) {
        given.set(opt.name, w.slice(eq + 1));
        pending = pending.filter((o) => o !== opt);
      } else valueFor = opt;
      continue;
    }
    const next = pending.shift();
    if (next) given.set(next.name, w);
  }
  const pool = typeof given.get('pool') === 'string' ? (given.get('pool') as string) : undefined;
  if (valueFor) return { want: 'values', prefix: cur, kind: valueKind(cmd, valueFor), cmd, pool, emitPrefix: '' };
  if (!dataOnly && cur.startsWith('--') && cur.includes('=')) {
    const eq = cur.indexOf('=');
    const opt = cmd.opts.find((o) => o.name === cur.slice(2, eq));
    if (!opt || opt.type === 'bool') return { want: 'nothing' };
    return { want: 'values', prefix: cur.slice(eq + 1), kind: valueKind(cmd, opt), cmd, pool, emitPrefix: cur.slice(0, eq + 1) };
  }
  const unused = cmd.opts.filter((o) => !given.has(o.name)).map((o) => `--${o.name}`);
  if (!dataOnly && cur.startsWith('-')) return { want: 'options', prefix: cur, names: unused };
  const next = pending[0];
  if (next) return { want: 'values', prefix: cur, kind: valueKind(cmd, next), cmd, pool, emitPrefix: '' };
  if (cur === '' && !dataOnly) return { want: 'options', prefix: cur, names: unused };
  return { want: 'nothing' };
}

/** Where names come from (the connection, or a stand-in in tests). */
export interface NameSource {
  pools(): Promise<string[]>;
  vols(pool: string): Promise<string[]>;
}

export async function candidates(c: Completion, names: NameSource): Promise<string[]> {
  const starting = (list: string[], prefix: string) => list.filter((n) => n.startsWith(prefix));
  switch (c.want) {
    case 'nothing': return [];
    case 'commands': return starting(commandNames(), c.prefix);
    case 'options': return starting(c.names, c.prefix);
    case 'values': {
      let list: string[];
      const k = c.kind;
      if (k === null || k === 'file') return [];
      if (k === 'command') list = [...commandNames(), ...GROUPS.map((g) => g.keyword)];
      else if (k === 'pool') list = await names.pools();
      else if (k === 'vol') list = c.pool === undefined ? [] : await names.vols(c.pool);
      else list = k.list;
      return starting(list, c.prefix).map((v) => c.emitPrefix + v);
    }
  }
}

/** The names behind a `Ctl`'s connection (opened on first use). */
export function connectionNames(ctl: Ctl): NameSource {
  return {
    async pools() {
      const conn = await ctl.connection();
      return (await conn.listAllStoragePools()).map((p) => p.name).sort();
    },
    async vols(pool: string) {
      const conn = await ctl.connection();
      const p = await conn.storagePoolLookupByName(pool);
      return (await p.listAllVolumes()).map((v) => v.name).sort();
    },
  };
}

/**
 * The command: `args` are what follows `complete` (a leading `--` dropped; one argument with
 * blanks is a whole line). Prints the candidates; a connection that fails is reported on stderr
 * and the status is 1.
 */
export async function complete(ctl: Ctl, args: readonly string[]): Promise<number> {
  let words = args[0] === '--' ? args.slice(1) : [...args];
  if (words.length === 1 && /[ \t]/.test(words[0]!)) words = splitLine(words[0]!);
  try {
    for (const c of await candidates(analyse(words), connectionNames(ctl))) ctl.print(`${c}\n`);
    return 0;
  } catch (err) {
    const detail = (err as CommandFailed).detail;
    ctl.error(detail instanceof Error ? detail.message : (err as Error).message);
    return 1;
  } finally {
    await ctl.close();
  }
}
