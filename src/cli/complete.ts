/**
 * Tab completion for the interactive shell, as virsh's: command names first (also after `;`),
 * then the options of that command not given yet (`--sparse`, `--pool`), the command names for
 * `help`, and the server's pool (and, once the pool is known, volume) names for the options that
 * name them.
 */
import { findCommand, GROUPS } from './commands.js';
import type { CmdDef } from './vsh.js';

/** What completion may ask the server; each may fail (then nothing is offered). */
export interface CompletionSource {
  poolNames(): Promise<string[]>;
  volNames(pool: string): Promise<string[]>;
}

/** The words of the command being typed: split on blanks, a new command after `;`. */
function currentWords(line: string): { words: string[]; partial: string } {
  const segment = line.slice(line.lastIndexOf(';') + 1);
  const words = segment.split(/[ \t]+/);
  const partial = words.pop() ?? '';
  return { words: words.filter((w) => w !== ''), partial };
}

function commandNames(): string[] {
  return GROUPS.flatMap((g) => g.commands.map((c) => c.name));
}

/** The option (given so far) that the word after `words` is the value of, if any. */
function pendingValueOption(def: CmdDef, words: string[]): string | null {
  const last = words.at(-1);
  if (words.length < 2 || !last?.startsWith('--') || last.includes('=')) return null;
  const opt = def.opts.find((o) => o.name === last.slice(2));
  return opt && opt.type !== 'bool' ? opt.name : null;
}

/** The data (positional) option the next word fills, virsh's positional order. */
function positionalOption(def: CmdDef, words: string[]): string | null {
  const given = new Set<string>();
  let positional = 0;
  for (let i = 1; i < words.length; i++) {
    const w = words[i]!;
    if (w.startsWith('--')) {
      const name = w.slice(2).split('=')[0]!;
      given.add(name);
      const opt = def.opts.find((o) => o.name === name);
      if (opt && opt.type !== 'bool' && !w.includes('=')) i++;
    } else {
      positional++;
    }
  }
  const order = def.opts.filter((o) => o.type !== 'bool' && !o.namedOnly && !given.has(o.name));
  return order[positional]?.name ?? null;
}

/** The value of `--name` among `words`, if given. */
function optionValue(words: string[], name: string): string | undefined {
  for (let i = 1; i < words.length; i++) {
    if (words[i] === `--${name}`) return words[i + 1];
    if (words[i]!.startsWith(`--${name}=`)) return words[i]!.slice(name.length + 3);
  }
  return undefined;
}

async function names(list: () => Promise<string[]>): Promise<string[]> {
  try {
    return await list();
  } catch {
    return [];
  }
}

/**
 * Completions for `line` (the text before the cursor): the candidates, and the word they
 * complete (readline's completer result).
 */
export async function complete(line: string, source: CompletionSource | null): Promise<[string[], string]> {
  const [list, partial] = await candidates(line, source);
  // a single candidate is completed with the blank after it, as GNU readline does
  return [list.length === 1 ? [`${list[0]} `] : list, partial];
}

async function candidates(line: string, source: CompletionSource | null): Promise<[string[], string]> {
  const { words, partial } = currentWords(line);
  const match = (list: Iterable<string>) => [...new Set(list)].filter((c) => c.startsWith(partial)).sort();
  if (words.length === 0) return [match(commandNames()), partial];
  const def = findCommand(words[0]!);
  if (!def) return [[], partial];
  if (def.name === 'help') {
    return [words.length === 1 ? match([...commandNames(), ...GROUPS.map((g) => g.keyword)]) : [], partial];
  }
  const pending = pendingValueOption(def, words);
  if (pending !== null) return [await valueCandidates(def, pending, words, source, match), partial];
  const given = new Set(words.slice(1).filter((w) => w.startsWith('--')).map((w) => w.slice(2).split('=')[0]!));
  const options = match(def.opts.filter((o) => !given.has(o.name)).map((o) => `--${o.name}`));
  if (partial.startsWith('-')) return [options, partial];
  const positional = positionalOption(def, words);
  const values = positional !== null ? await valueCandidates(def, positional, words, source, match) : [];
  return [[...values, ...options], partial];
}

async function valueCandidates(def: CmdDef, opt: string, words: string[], source: CompletionSource | null, match: (l: Iterable<string>) => string[]): Promise<string[]> {
  if (!source) return [];
  if (opt === 'pool') return match(await names(() => source.poolNames()));
  if (opt === 'vol' && def.opts.some((o) => o.name === 'pool')) {
    const pool = optionValue(words, 'pool');
    return pool ? match(await names(() => source.volNames(pool))) : [];
  }
  return [];
}
