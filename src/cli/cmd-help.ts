/** help, quit, exit. */
import type { Ctl } from './ctl.js';
import { findCommand, findGroup, GROUPS } from './commands.js';
import { commandHelp, groupHelp, type ParsedCmd } from './vsh.js';

async function help(ctl: Ctl, cmd: ParsedCmd): Promise<void> {
  const name = cmd.opts.get('command');
  if (typeof name !== 'string' || name === '') {
    ctl.print('Grouped commands:\n\n');
    for (const g of GROUPS) ctl.print(`${groupHelp(g)}\n`);
    return;
  }
  const grp = findGroup(name);
  if (grp) {
    ctl.print(groupHelp(grp));
    return;
  }
  const def = findCommand(name);
  if (def) {
    ctl.print(commandHelp(def));
    return;
  }
  ctl.fail(`command or command group '${name}' doesn't exist`);
}

async function quit(): Promise<void> {}

export const handlers: Record<string, (ctl: Ctl, cmd: ParsedCmd) => Promise<void>> = { help, quit, exit: quit };
