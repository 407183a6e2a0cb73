/** hostname, uri, version. */
import type { Ctl } from './ctl.js';
import { VIRSH_VERSION } from './globals.js';
import type { ParsedCmd } from './vsh.js';

const versionText = (v: number): string => `${Math.floor(v / 1000000)}.${Math.floor((v % 1000000) / 1000)}.${v % 1000}`;

async function hostname(ctl: Ctl): Promise<void> {
  const conn = await ctl.connection();
  let name: string;
  try {
    name = await conn.getHostname();
  } catch (err) {
    return ctl.fail('failed to get hostname', err);
  }
  ctl.print(`${name}\n`);
}

async function uri(ctl: Ctl): Promise<void> {
  const conn = await ctl.connection();
  // libvirt answers with the URI it was opened with; it asks the daemon only when auto-probing.
  let text = ctl.explicitUri;
  if (text === undefined) {
    try {
      text = await conn.getUri();
    } catch (err) {
      return ctl.fail('failed to get URI', err);
    }
  }
  ctl.print(`${text}\n`);
}

async function version(ctl: Ctl, cmd: ParsedCmd): Promise<void> {
  const conn = await ctl.connection();
  let hvType: string;
  try {
    hvType = await conn.getType();
  } catch (err) {
    return ctl.fail('failed to get hypervisor type', err);
  }
  ctl.print(`Compiled against library: libvirt ${VIRSH_VERSION}\n`);
  ctl.print(`Using library: libvirt ${VIRSH_VERSION}\n`);
  ctl.print(`Using API: ${hvType} ${VIRSH_VERSION}\n`);
  let hv: number;
  try {
    hv = await conn.getVersion();
  } catch (err) {
    return ctl.fail('failed to get the hypervisor version', err);
  }
  if (hv === 0) ctl.print(`Cannot extract running ${hvType} hypervisor version\n`);
  else ctl.print(`Running hypervisor: ${hvType} ${versionText(hv)}\n`);
  if (cmd.opts.has('daemon')) {
    try {
      ctl.print(`Running against daemon: ${versionText(await conn.getLibVersion())}\n`);
    } catch {
      ctl.error('failed to get the daemon version');
    }
  }
}

export const handlers: Record<string, (ctl: Ctl, cmd: ParsedCmd) => Promise<void>> = { hostname, uri, version };
