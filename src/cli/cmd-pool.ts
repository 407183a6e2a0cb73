/** Storage pool commands, with virsh 9.0's calls, output and messages. */
import type { StoragePool } from '../client/index.js';
import { ListPoolsTypeFlags } from '../protocol/remote.js';
import { DEBUG, type Ctl } from './ctl.js';
import { labelLine, poolStateName, prettyCapacity, renderTable } from './format.js';
import { lookupPool, quietOpt, requiredOpt, stringOpt } from './lookup.js';
import { dumpXml } from './xml.js';
import { optBool, type ParsedCmd } from './vsh.js';

type Handler = (ctl: Ctl, cmd: ParsedCmd) => Promise<void>;

const RUNNING = 2;
const DEGRADED = 3;

/** vshStringToArray: split on ',', with ',,' a literal comma. */
export function splitCommaList(s: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    if (s[i] === ',') {
      if (s[i + 1] === ',') {
        cur += ',';
        i++;
      } else {
        out.push(cur);
        cur = '';
      }
    } else cur += s[i];
  }
  out.push(cur);
  return out;
}

/** g_ascii_strcasecmp, virsh's sort order for names. */
export function asciiCaseCompare(a: string, b: string): number {
  const la = a.replace(/[A-Z]/g, (c) => c.toLowerCase());
  const lb = b.replace(/[A-Z]/g, (c) => c.toLowerCase());
  return la < lb ? -1 : la > lb ? 1 : 0;
}

const exclusive = (ctl: Ctl, cmd: ParsedCmd, a: string, b: string): void => {
  if (optBool(cmd, a) && optBool(cmd, b)) ctl.fail(`Options --${a} and --${b} are mutually exclusive`);
};

async function settle<T>(p: Promise<T>): Promise<{ ok: true; value: T } | { ok: false; error: unknown }> {
  try {
    return { ok: true, value: await p };
  } catch (error) {
    return { ok: false, error };
  }
}

const poolList: Handler = async (ctl, cmd) => {
  const details = optBool(cmd, 'details');
  exclusive(ctl, cmd, 'all', 'inactive');
  let flags = 2; // ACTIVE
  if (optBool(cmd, 'inactive')) flags = 1;
  if (optBool(cmd, 'all')) flags = 3;
  if (optBool(cmd, 'autostart')) flags |= 16;
  if (optBool(cmd, 'no-autostart')) flags |= 32;
  if (optBool(cmd, 'persistent')) flags |= 4;
  if (optBool(cmd, 'transient')) flags |= 8;
  const uuid = optBool(cmd, 'uuid');
  const name = optBool(cmd, 'name');
  const type = stringOpt(ctl, cmd, 'type');
  exclusive(ctl, cmd, 'details', 'uuid');
  exclusive(ctl, cmd, 'details', 'name');
  if (type !== undefined) {
    for (const t of splitCommaList(type)) {
      const bit = Object.hasOwn(ListPoolsTypeFlags, t) ? ListPoolsTypeFlags[t] : undefined;
      if (bit === undefined) ctl.fail(`Invalid pool type '${t}'`);
      flags |= bit!;
    }
  }
  const conn = await ctl.connection();
  let pools: StoragePool[];
  try {
    pools = await conn.listAllStoragePools(flags);
  } catch (err) {
    return ctl.fail('Failed to list pools', err);
  }
  pools.sort((a, b) => asciiCaseCompare(a.name, b.name));

  if (optBool(cmd, 'json')) {
    const out = [];
    for (const p of pools) out.push(await poolJson(p));
    ctl.print(`${JSON.stringify(out, null, 2)}\n`);
    return;
  }

  const rows: string[][] = [];
  for (const p of pools) {
    const auto = await settle(p.autostart());
    const autostart = auto.ok ? (auto.value ? 'yes' : 'no') : 'no autostart';
    let persistent = '';
    if (details) {
      const pers = await settle(p.isPersistent());
      persistent = pers.ok ? (pers.value ? 'yes' : 'no') : 'unknown';
    }
    let state: string;
    let sizes = ['', '', ''];
    const info = await settle(p.info());
    if (!info.ok) {
      ctl.error('Could not retrieve pool information');
      state = 'unknown';
      if (details) sizes = ['unknown', 'unknown', 'unknown'];
    } else if (details) {
      state = poolStateName(info.value.state);
      if (info.value.state === RUNNING || info.value.state === DEGRADED) {
        sizes = [prettyCapacity(info.value.capacity), prettyCapacity(info.value.allocation), prettyCapacity(info.value.available)];
      } else {
        sizes = ['-', '-', '-'];
      }
    } else {
      // virStoragePoolIsActive's -1 is "true" to virsh
      const active = await settle(p.isActive());
      state = !active.ok || active.value ? 'active' : 'inactive';
    }
    rows.push(details ? [p.name, state, autostart, persistent, ...sizes] : [p.name, state, autostart]);
  }

  if (!details) {
    if (uuid || name) {
      for (const p of pools) {
        if (uuid) ctl.print(`${p.uuidString.padEnd(36)}${name ? ' ' : '\n'}`);
        if (name) ctl.print(`${p.name.padEnd(20)}\n`);
      }
      return;
    }
    ctl.print(renderTable(['Name', 'State', 'Autostart'], rows, !ctl.quiet));
    return;
  }
  ctl.print(renderTable(['Name', 'State', 'Autostart', 'Persistent', 'Capacity', 'Allocation', 'Available'], rows, !ctl.quiet));
};

/** The --json form of one pool: stable keys, sizes in bytes. */
async function poolJson(p: StoragePool) {
  const info = await p.info();
  return {
    name: p.name,
    uuid: p.uuidString,
    state: poolStateName(info.state),
    active: await p.isActive(),
    persistent: await p.isPersistent(),
    autostart: await p.autostart(),
    capacity: info.capacity,
    allocation: info.allocation,
    available: info.available,
  };
}

const poolInfo: Handler = async (ctl, cmd) => {
  const { pool } = await lookupPool(ctl, cmd);
  if (optBool(cmd, 'json')) {
    let j;
    try {
      j = await poolJson(pool);
    } catch (err) {
      return ctl.fail('Could not retrieve pool information', err);
    }
    const { active: _active, ...rest } = j;
    ctl.print(`${JSON.stringify(rest, null, 2)}\n`);
    return;
  }
  const bytes = optBool(cmd, 'bytes');
  ctl.print(labelLine('Name:', pool.name));
  ctl.print(labelLine('UUID:', pool.uuidString));
  const info = await settle(pool.info());
  if (!info.ok) ctl.failWith(info.error);
  const i = (info as { value: Awaited<ReturnType<StoragePool['info']>> }).value;
  ctl.print(labelLine('State:', poolStateName(i.state)));
  const pers = await settle(pool.isPersistent());
  ctl.debug(DEBUG, `Pool persistent flag value: ${pers.ok ? (pers.value ? 1 : 0) : -1}\n`);
  ctl.print(labelLine('Persistent:', pers.ok ? (pers.value ? 'yes' : 'no') : 'unknown'));
  const auto = await settle(pool.autostart());
  ctl.print(labelLine('Autostart:', auto.ok ? (auto.value ? 'yes' : 'no') : 'no autostart'));
  if (i.state === RUNNING || i.state === DEGRADED) {
    const fmt = (n: number) => (bytes ? String(n) : prettyCapacity(n));
    ctl.print(labelLine('Capacity:', fmt(i.capacity)));
    ctl.print(labelLine('Allocation:', fmt(i.allocation)));
    ctl.print(labelLine('Available:', fmt(i.available)));
  }
};

const poolDumpxml: Handler = async (ctl, cmd) => {
  const flags = optBool(cmd, 'inactive') ? 1 : 0;
  const { pool } = await lookupPool(ctl, cmd);
  const xpath = quietOpt(cmd, 'xpath');
  let xml: string;
  try {
    xml = await pool.xmlDesc(flags);
  } catch (err) {
    return ctl.failWith(err);
  }
  dumpXml(ctl, xml, xpath, optBool(cmd, 'wrap'));
};

/** virshBuildPoolXML: exactly the XML virsh sends (values are not escaped, as in virsh). */
export function buildPoolXml(o: Record<string, string | undefined>): string {
  const name = o['name']!;
  const type = o['type']!;
  let xml = `<pool type='${type}'>\n  <name>${name}</name>\n`;
  const wwn = o['adapter-wwnn'] !== undefined && o['adapter-wwpn'] !== undefined;
  if (o['source-host'] || o['source-path'] || o['source-dev'] || o['source-initiator'] || o['source-format'] ||
      o['source-name'] || wwn || o['adapter-name']) {
    xml += '  <source>\n';
    if (o['source-host']) xml += `    <host name='${o['source-host']}'/>\n`;
    if (o['source-path']) xml += `    <dir path='${o['source-path']}'/>\n`;
    if (o['source-dev']) xml += `    <device path='${o['source-dev']}'/>\n`;
    if (o['source-initiator']) xml += `    <initiator>\n      <iqn name='${o['source-initiator']}'/>\n    </initiator>\n`;
    if (wwn) {
      xml += "    <adapter type='fc_host'";
      if (o['adapter-parent']) xml += ` parent='${o['adapter-parent']}'`;
      else if (o['adapter-parent-wwnn'] && o['adapter-parent-wwpn']) xml += ` parent_wwnn='${o['adapter-parent-wwnn']}' parent_wwpn='${o['adapter-parent-wwpn']}'`;
      else if (o['adapter-parent-fabric-wwn']) xml += ` parent_fabric_wwn='${o['adapter-parent-fabric-wwn']}'`;
      xml += ` wwnn='${o['adapter-wwnn']}' wwpn='${o['adapter-wwpn']}'/>\n`;
    } else if (o['adapter-name']) {
      xml += `    <adapter type='scsi_host' name='${o['adapter-name']}'/>\n`;
    }
    if (o['auth-type'] && o['auth-username'] && (o['secret-usage'] || o['secret-uuid'])) {
      xml += `    <auth type='${o['auth-type']}' username='${o['auth-username']}'>\n`;
      xml += o['secret-usage'] ? `      <secret usage='${o['secret-usage']}'/>\n` : `      <secret uuid='${o['secret-uuid']}'/>\n`;
      xml += '    </auth>\n';
    }
    if (o['source-format']) xml += `    <format type='${o['source-format']}'/>\n`;
    if (o['source-name']) xml += `    <name>${o['source-name']}</name>\n`;
    if (o['source-protocol-ver']) xml += `    <protocol ver='${o['source-protocol-ver']}'/>\n`;
    xml += '  </source>\n';
  }
  if (o['target']) xml += `  <target>\n    <path>${o['target']}</path>\n  </target>\n`;
  return `${xml}</pool>\n`;
}

const POOL_X_AS = [
  'source-host', 'source-path', 'source-dev', 'source-name', 'source-format', 'target', 'auth-type', 'auth-username',
  'secret-usage', 'secret-uuid', 'adapter-name', 'adapter-wwnn', 'adapter-wwpn', 'adapter-parent', 'adapter-parent-wwnn',
  'adapter-parent-wwpn', 'adapter-parent-fabric-wwn', 'source-protocol-ver', 'source-initiator',
];

const poolDefineAs: Handler = async (ctl, cmd) => {
  exclusive(ctl, cmd, 'secret-usage', 'secret-uuid');
  const o: Record<string, string | undefined> = {};
  o['name'] = requiredOpt(ctl, cmd, 'name');
  o['type'] = requiredOpt(ctl, cmd, 'type');
  for (const k of POOL_X_AS) o[k] = stringOpt(ctl, cmd, k);
  const xml = buildPoolXml(o);
  if (optBool(cmd, 'print-xml')) {
    ctl.print(xml);
    return;
  }
  const conn = await ctl.connection();
  try {
    await conn.storagePoolDefineXML(xml, 0);
  } catch (err) {
    return ctl.fail(`Failed to define pool ${o['name']}`, err);
  }
  ctl.printExtra(`Pool ${o['name']} defined\n`);
};

/** The commands that look a pool up, call one thing and say so. */
function simple(action: (pool: StoragePool, cmd: ParsedCmd, ctl: Ctl) => Promise<void>, failed: string, done: string,
  check?: (ctl: Ctl, cmd: ParsedCmd) => void): Handler {
  return async (ctl, cmd) => {
    const { pool, name } = await lookupPool(ctl, cmd);
    check?.(ctl, cmd);
    try {
      await action(pool, cmd, ctl);
    } catch (err) {
      return ctl.fail(failed.replace('%s', name), err);
    }
    ctl.printExtra(done.replace('%s', name));
  };
}

const poolBuild = simple(
  (pool, cmd) => pool.build((optBool(cmd, 'no-overwrite') ? 4 : 0) | (optBool(cmd, 'overwrite') ? 8 : 0)),
  'Failed to build pool %s', 'Pool %s built\n');

const poolStart = simple(
  (pool, cmd) => pool.create((optBool(cmd, 'build') ? 1 : 0) | (optBool(cmd, 'overwrite') ? 2 : 0) | (optBool(cmd, 'no-overwrite') ? 4 : 0)),
  'Failed to start pool %s', 'Pool %s started\n',
  (ctl, cmd) => exclusive(ctl, cmd, 'overwrite', 'no-overwrite'));

const poolRefresh = simple((pool) => pool.refresh(0), 'Failed to refresh pool %s', 'Pool %s refreshed\n');
const poolDestroy = simple((pool) => pool.destroy(), 'Failed to destroy pool %s', 'Pool %s destroyed\n');
const poolUndefine = simple((pool) => pool.undefine(), 'Failed to undefine pool %s', 'Pool %s has been undefined\n');

const poolAutostart: Handler = async (ctl, cmd) => {
  const { pool, name } = await lookupPool(ctl, cmd);
  const on = !optBool(cmd, 'disable');
  try {
    await pool.setAutostart(on);
  } catch (err) {
    return ctl.fail(on ? `failed to mark pool ${name} as autostarted` : `failed to unmark pool ${name} as autostarted`, err);
  }
  ctl.printExtra(on ? `Pool ${name} marked as autostarted\n` : `Pool ${name} unmarked as autostarted\n`);
};

export const handlers: Record<string, Handler> = {
  'pool-list': poolList,
  'pool-info': poolInfo,
  'pool-dumpxml': poolDumpxml,
  'pool-define-as': poolDefineAs,
  'pool-build': poolBuild,
  'pool-start': poolStart,
  'pool-autostart': poolAutostart,
  'pool-refresh': poolRefresh,
  'pool-destroy': poolDestroy,
  'pool-undefine': poolUndefine,
};
