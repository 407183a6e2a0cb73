/**
 * sparsevirt(1), made at build time from what `-h` and `help` print: the global options of the
 * usage text and the command table. A page is a small document model; scripts/gen-docs.mjs
 * writes it as roff (the daemon's pages use the same model).
 *
 * Inline markup in texts: `**bold**` and `__italic__`.
 */
import type { ManBlock, ManItem, ManPage } from '../man.js';
import { GROUPS } from './commands.js';
import { globalOptions } from './completion-scripts.js';
import { SPARSEVIRT_VERSION, VIRSH_VERSION } from './globals.js';
import type { CmdDef, OptDef } from './vsh.js';

export type { ManBlock, ManItem, ManPage };

/** The synopsis `help CMD` prints. */
function synopsis(def: CmdDef): string {
  let out = `**${def.name}**`;
  for (const o of def.opts) {
    switch (o.type) {
      case 'bool': out += ` [**--${o.name}**]`; break;
      case 'int': out += o.required ? ` __${o.name}__` : ` [**--${o.name}** __number__]`; break;
      case 'string': out += ` [**--${o.name}** __string__]`; break;
      case 'data': out += ` [**--${o.name}**] __${o.name}__`; break;
    }
  }
  return out;
}

function optionTerm(o: OptDef): string {
  switch (o.type) {
    case 'bool': return `**--${o.name}**`;
    case 'int': return `**--${o.name}** __number__`;
    case 'string': return `**--${o.name}** __string__`;
    case 'data': return `[**--${o.name}**] __${o.name}__`;
  }
}

function commandItem(def: CmdDef): ManItem {
  const desc = def.desc ? def.desc.replace(/\s+/g, ' ').trim() : '';
  const text = desc && desc.toLowerCase() !== def.help.toLowerCase() ? `${capital(def.help)}. ${desc}` : `${capital(def.help)}.`;
  const items = def.opts.map((o) => ({ term: optionTerm(o), text: `${o.help || o.name}${o.required && o.type !== 'data' ? ' (required)' : ''}` }));
  return { term: synopsis(def), text, ...(items.length ? { items } : {}) };
}

function capital(s: string): string {
  return s ? s[0]!.toUpperCase() + s.slice(1) : s;
}

export function sparsevirtManual(): ManPage {
  const options: ManItem[] = globalOptions().map((o) => {
    const names = [o.short, o.long].filter(Boolean).map((n) => `**${n}**`);
    const arg = o.arg ? (o.optionalArg ? `[=__${o.arg}__]` : ` __${o.arg}__`) : '';
    return { term: `${names.join(', ')}${arg}`, text: capital(o.help) };
  });
  const commands: ManBlock[] = [];
  for (const g of GROUPS) {
    commands.push({ sub: `${g.name} (help keyword ${g.keyword})` });
    commands.push({ items: g.commands.map(commandItem) });
  }
  return {
    name: 'sparsevirt',
    section: 1,
    title: "virsh's storage commands over libvirt's remote protocol, with sparse streams",
    source: `sparsevirt ${SPARSEVIRT_VERSION}`,
    manual: 'sparsevirt',
    sections: [
      {
        heading: 'SYNOPSIS',
        blocks: [{ para: '**sparsevirt** [__OPTION__]... [__COMMAND_STRING__]' }, { para: '**sparsevirt** [__OPTION__]... __COMMAND__ [__ARG__]...' }],
      },
      {
        heading: 'DESCRIPTION',
        blocks: [
          { para: `**sparsevirt** takes the arguments of **virsh** ${VIRSH_VERSION} for its storage, host and help commands and prints the same output, errors and exit status, against a libvirtd or a **sparsevirtd**(8). Volume transfers (**vol-upload**, **vol-download**) move sparse images as data and holes with **--sparse**.` },
          { para: 'One argument is a command string: several commands separated by **;**, quoted as in the shell. With no command, commands are read from standard input, one line each (the interactive shell).' },
          { para: 'Without **-c**, sparsevirt connects to **LIBVIRT_DEFAULT_URI**, else to a running sparsevirtd\'s default socket, else to **qemu:///system**. URIs are libvirt\'s: **qemu:///system**, **qemu+unix:///system?socket=**__PATH__, **qemu+tcp://**__HOST__**/system**, **qemu+tls://**__HOST__**/system?pkipath=**__DIR__, **qemu+ssh://**__USER__**@**__HOST__**/system**; **sparsevirt+unix:///system?socket=**__PATH__ for a sparsevirtd.' },
        ],
      },
      { heading: 'OPTIONS', blocks: [{ items: options }] },
      { heading: 'COMMANDS', blocks: commands },
      {
        heading: 'COMPLETION',
        blocks: [
          { para: '**sparsevirt complete --** __WORD__... prints the candidates for the last __WORD__ of a partial command line (the words after the global options), one per line, as **virsh complete** does: command names, option names, fixed values, and pool and volume names from the connection, which it opens only when they are asked for (with the global options given before **complete**, such as **-c** and **-r**). A word that wants a file name gets no candidate.' },
          { para: 'The package ships completion scripts that use it, generated from the same command table: __dist/completion/sparsevirt.bash__ for bash (copy it to __/usr/share/bash-completion/completions/sparsevirt__, or source it) and __dist/completion/_sparsevirt__ for zsh (copy it to a directory of **$fpath**).' },
          { pre: 'sparsevirt complete -- vol-download --pool de\nsparsevirt -c qemu:///system complete -- vol-info --pool default ""' },
        ],
      },
      {
        heading: 'ENVIRONMENT',
        blocks: [{
          items: [
            { term: '**VIRSH_DEFAULT_CONNECT_URI**', text: 'The URI when **-c** is not given, before **LIBVIRT_DEFAULT_URI**.' },
            { term: '**LIBVIRT_DEFAULT_URI**', text: 'The URI when neither **-c** nor **VIRSH_DEFAULT_CONNECT_URI** is given.' },
          ],
        }],
      },
      { heading: 'EXIT STATUS', blocks: [{ para: '0 when the last command succeeded, 1 otherwise (as virsh).' }] },
      { heading: 'SEE ALSO', blocks: [{ para: '**virsh**(1), **sparsevirtd**(8), **sparsevirtd.conf**(5)' }] },
    ],
  };
}
