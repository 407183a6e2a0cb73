/** hostname, uri, version. */
import type { Ctl } from './ctl.js';
import { VIRSH_VERSION } from './globals.js';
import { optBool, type ParsedCmd } from './vsh.js';

/** `{…}` as JSON, on its own lines. */
function printJson(ctl: Ctl, value: unknown): void {
  ctl.print(`${JSON.stringify(value, null, 2)}\n`);
}

const versionText = (v: number): string => `${Math.floor(v / 1000000)}.${Math.floor((v % 1000000) / 1000)}.${v % 1000}`;

async function hostname(ctl: Ctl, cmd: ParsedCmd): Promise<void> {
  const conn = await ctl.connection();
  let name: string;
  try {
    name = await conn.getHostname();
  } catch (err) {
    return ctl.fail('failed to get hostname', err);
  }
  if (optBool(cmd, 'json')) printJson(ctl, { hostname: name });
  else ctl.print(`${name}\n`);
}

async function uri(ctl: Ctl, cmd: ParsedCmd): Promise<void> {
  const conn = await ctl.connection();
  // libvirt answers with the URI it was opened with; it asks the daemon only when auto-probing.
  // A running sparsevirtd found by its default socket is reached by the URI naming that socket
  // (which virsh takes as it is: `virsh -c "$(sparsevirt uri)"`).
  let text = ctl.explicitUri;
  if (text === undefined) {
    const { defaultDaemonSocket } = await import('../transport/uri.js');
    if (conn.uri.transport === 'unix' && conn.uri.socket === defaultDaemonSocket()) text = conn.uri.uri;
  }
  if (text === undefined) {
    try {
      text = await conn.getUri();
    } catch (err) {
      return ctl.fail('failed to get URI', err);
    }
  }
  if (optBool(cmd, 'json')) printJson(ctl, { uri: text });
  else ctl.print(`${text}\n`);
}

async function version(ctl: Ctl, cmd: ParsedCmd): Promise<void> {
  const conn = await ctl.connection();
  let hvType: string;
  try {
    hvType = await conn.getType();
  } catch (err) {
    return ctl.fail('failed to get hypervisor type', err);
  }
  let hv: number | undefined;
  let hvError: unknown;
  try {
    hv = await conn.getVersion();
  } catch (err) {
    hvError = err;
  }
  let daemon: number | undefined;
  let daemonFailed = false;
  if (cmd.opts.has('daemon') && hv !== undefined) {
    try {
      daemon = await conn.getLibVersion();
    } catch {
      daemonFailed = true;
    }
  }
  if (optBool(cmd, 'json')) {
    if (hv === undefined) return ctl.fail('failed to get the hypervisor version', hvError);
    printJson(ctl, {
      library: VIRSH_VERSION, type: hvType, hypervisor: hv === 0 ? null : versionText(hv),
      ...(cmd.opts.has('daemon') ? { daemon: daemon === undefined ? null : versionText(daemon) } : {}),
    });
    return;
  }
  ctl.print(`Compiled against library: libvirt ${VIRSH_VERSION}\n`);
  ctl.print(`Using library: libvirt ${VIRSH_VERSION}\n`);
  ctl.print(`Using API: ${hvType} ${VIRSH_VERSION}\n`);
  if (hv === undefined) return ctl.fail('failed to get the hypervisor version', hvError);
  if (hv === 0) ctl.print(`Cannot extract running ${hvType} hypervisor version\n`);
  else ctl.print(`Running hypervisor: ${hvType} ${versionText(hv)}\n`);
  if (cmd.opts.has('daemon')) {
    if (daemon !== undefined) ctl.print(`Running against daemon: ${versionText(daemon)}\n`);
    else if (daemonFailed) ctl.error('failed to get the daemon version');
  }
}

export const handlers: Record<string, (ctl: Ctl, cmd: ParsedCmd) => Promise<void>> = { hostname, uri, version };
