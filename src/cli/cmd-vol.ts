/** Storage volume commands (all but upload/download), with virsh 9.0's calls, output and messages. */
import type { StorageVol, VolInfo } from '../client/index.js';
import { WIPE_ALGORITHM_NAMES } from '../protocol/remote.js';
import type { Ctl } from './ctl.js';
import { asciiCaseCompare } from './cmd-pool.js';
import { labelLine, prettyCapacity, renderTable, volTypeName } from './format.js';
import { lookupPool, lookupVol, quietOpt, requiredOpt, stringOpt } from './lookup.js';
import { parseSize } from './numbers.js';
import { optBool, type ParsedCmd } from './vsh.js';
import { dumpXml } from './xml.js';

type Handler = (ctl: Ctl, cmd: ParsedCmd) => Promise<void>;

/**
 * The --json form of a volume, the same in vol-info, vol-list and vol-create-as: sizes in bytes,
 * null where the server did not say. `physical` replaces `allocation` for vol-info --physical.
 */
async function volJson(vol: StorageVol, info: VolInfo | null, physical = false): Promise<Record<string, string | number | null>> {
  let path: string | null;
  try {
    path = await vol.path();
  } catch {
    path = null;
  }
  return {
    name: vol.name, pool: vol.pool, key: vol.key, path,
    type: info ? volTypeName(info.type) : null,
    capacity: info?.capacity ?? null,
    [physical ? 'physical' : 'allocation']: info?.allocation ?? null,
  };
}

/** `{…}` or `[…]` as JSON, on its own lines. */
export function printJson(ctl: Ctl, value: unknown): void {
  ctl.print(`${JSON.stringify(value, null, 2)}\n`);
}

/** virshVolSize, or virsh's "Malformed size X" (plus libvirt's reason when it gave one). */
function size(ctl: Ctl, s: string): bigint {
  const r = parseSize(s);
  if (!r.ok) ctl.fail(`Malformed size ${s}`, r.detail ?? undefined);
  return (r as { value: bigint }).value;
}

const volCreateAs: Handler = async (ctl, cmd) => {
  const flags = optBool(cmd, 'prealloc-metadata') ? 1 : 0;
  const { pool } = await lookupPool(ctl, cmd);
  const name = requiredOpt(ctl, cmd, 'name');
  const capacityStr = requiredOpt(ctl, cmd, 'capacity');
  const capacity = size(ctl, capacityStr);
  const allocationRaw = cmd.opts.get('allocation');
  const allocationStr = typeof allocationRaw === 'string' && allocationRaw !== '' ? allocationRaw : undefined;
  const allocation = allocationStr !== undefined ? size(ctl, allocationStr) : 0n;
  const format = stringOpt(ctl, cmd, 'format');
  const backingVol = stringOpt(ctl, cmd, 'backing-vol');
  const backingFormat = stringOpt(ctl, cmd, 'backing-vol-format');

  // The XML exactly as virsh writes it (no escaping, as virsh).
  let xml = `<volume>\n  <name>${name}</name>\n  <capacity>${capacity}</capacity>\n`;
  if (allocationStr !== undefined) xml += `  <allocation>${allocation}</allocation>\n`;
  if (format) xml += `  <target>\n    <format type='${format}'/>\n  </target>\n`;
  if (backingVol) {
    const conn = await ctl.connection();
    let snap: StorageVol | undefined;
    let last: unknown;
    for (const find of [() => pool.volLookupByName(backingVol), () => conn.storageVolLookupByKey(backingVol), () => conn.storageVolLookupByPath(backingVol)]) {
      try {
        snap = await find();
        break;
      } catch (err) {
        last = err;
      }
    }
    if (!snap) ctl.fail(`failed to get vol '${backingVol}'`, last);
    let path: string;
    try {
      path = await snap!.path();
    } catch (err) {
      return ctl.failWith(err);
    }
    xml += `  <backingStore>\n    <path>${path}</path>\n`;
    if (backingFormat) xml += `    <format type='${backingFormat}'/>\n`;
    xml += '  </backingStore>\n';
  }
  xml += '</volume>\n';
  if (optBool(cmd, 'print-xml')) {
    ctl.print(xml);
    return;
  }
  let vol: StorageVol;
  try {
    vol = await pool.createVolXML(xml, flags);
  } catch (err) {
    return ctl.fail(`Failed to create vol ${name}`, err);
  }
  if (optBool(cmd, 'json')) {
    printJson(ctl, await volJson(vol, await vol.info().catch(() => null)));
    return;
  }
  ctl.printExtra(`Vol ${name} created\n`);
};

const volDelete: Handler = async (ctl, cmd) => {
  const { vol, name } = await lookupVol(ctl, cmd);
  try {
    await vol.delete(optBool(cmd, 'delete-snapshots') ? 2 : 0);
  } catch (err) {
    return ctl.fail(`Failed to delete vol ${name}`, err);
  }
  ctl.printExtra(`Vol ${name} deleted\n`);
};

const volWipe: Handler = async (ctl, cmd) => {
  const { vol, name } = await lookupVol(ctl, cmd);
  const algStr = stringOpt(ctl, cmd, 'algorithm');
  let algorithm = 0;
  if (algStr !== undefined) {
    algorithm = WIPE_ALGORITHM_NAMES.indexOf(algStr);
    if (algorithm < 0) ctl.fail(`Unsupported algorithm '${algStr}'`);
  }
  try {
    await vol.wipe(algorithm, 0);
  } catch (err) {
    // virsh falls back to the old WIPE call when the pattern call is unknown (VIR_ERR_NO_SUPPORT)
    let failure: unknown = err;
    if ((err as { virCode?: number }).virCode === 3 && algorithm === 0) {
      const { P } = await import('../protocol/remote.js');
      try {
        await vol.conn.call(P.STORAGE_VOL_WIPE, { vol: vol.ref, flags: 0 });
        failure = undefined;
      } catch (err2) {
        failure = err2;
      }
    }
    if (failure !== undefined) return ctl.fail(`Failed to wipe vol ${name}`, failure);
  }
  ctl.printExtra(`Vol ${name} wiped\n`);
};

const volInfo: Handler = async (ctl, cmd) => {
  const { vol } = await lookupVol(ctl, cmd);
  const physical = optBool(cmd, 'physical');
  const json = optBool(cmd, 'json');
  if (!json) ctl.print(labelLine('Name:', vol.name));
  let info: VolInfo;
  try {
    info = physical ? await vol.infoFlags(1) : await vol.info();
  } catch (err) {
    return ctl.failWith(err);
  }
  if (json) {
    printJson(ctl, await volJson(vol, info, physical));
    return;
  }
  ctl.print(labelLine('Type:', volTypeName(info.type)));
  const second = physical ? 'Physical:' : 'Allocation:';
  if (optBool(cmd, 'bytes')) {
    ctl.print(labelLine('Capacity:', `${info.capacity} bytes`));
    ctl.print(labelLine(second, `${info.allocation} bytes`));
  } else {
    ctl.print(labelLine('Capacity:', prettyCapacity(info.capacity)));
    ctl.print(labelLine(second, prettyCapacity(info.allocation)));
  }
};

const volResize: Handler = async (ctl, cmd) => {
  let delta = optBool(cmd, 'delta');
  let flags = 0;
  if (optBool(cmd, 'allocate')) flags |= 1;
  if (optBool(cmd, 'shrink')) flags |= 4;
  const { vol } = await lookupVol(ctl, cmd);
  let capacityStr = requiredOpt(ctl, cmd, 'capacity').replace(/^[ \t\n\v\f\r]+/, '');
  if (capacityStr.startsWith('-')) {
    if (!optBool(cmd, 'shrink')) ctl.fail('negative size requires --shrink');
    capacityStr = capacityStr.slice(1);
    delta = true;
  }
  if (delta) flags |= 2;
  const capacity = size(ctl, capacityStr);
  try {
    await vol.resize(capacity, flags);
  } catch (err) {
    return ctl.fail(delta ? `Failed to change size of volume '${vol.name}' by ${capacityStr}` : `Failed to change size of volume '${vol.name}' to ${capacityStr}`, err);
  }
  ctl.printExtra(delta
    ? `Size of volume '${vol.name}' successfully changed by ${capacityStr}\n`
    : `Size of volume '${vol.name}' successfully changed to ${capacityStr}\n`);
};

const volDumpxml: Handler = async (ctl, cmd) => {
  const { vol } = await lookupVol(ctl, cmd);
  const xpath = quietOpt(cmd, 'xpath');
  let xml: string;
  try {
    xml = await vol.xmlDesc(0);
  } catch (err) {
    return ctl.failWith(err);
  }
  dumpXml(ctl, xml, xpath, optBool(cmd, 'wrap'));
};

const volKey: Handler = async (ctl, cmd) => {
  const { vol } = await lookupVol(ctl, cmd);
  if (optBool(cmd, 'json')) printJson(ctl, { name: vol.name, pool: vol.pool, key: vol.key });
  else ctl.print(`${vol.key}\n`);
};

const volPath: Handler = async (ctl, cmd) => {
  const { vol } = await lookupVol(ctl, cmd);
  let path: string;
  try {
    path = await vol.path();
  } catch (err) {
    return ctl.failWith(err);
  }
  if (optBool(cmd, 'json')) printJson(ctl, { name: vol.name, pool: vol.pool, path });
  else ctl.print(`${path}\n`);
};

const volList: Handler = async (ctl, cmd) => {
  const details = optBool(cmd, 'details');
  const { pool } = await lookupPool(ctl, cmd);
  let vols: StorageVol[];
  try {
    vols = await pool.listAllVolumes(0);
  } catch (err) {
    return ctl.fail('Failed to list volumes', err);
  }
  vols.sort((a, b) => asciiCaseCompare(a.name, b.name));
  const json = optBool(cmd, 'json');
  if (json) {
    const objs = [];
    for (const v of vols) objs.push(await volJson(v, await v.info().catch(() => null)));
    printJson(ctl, objs);
    return;
  }
  const rows: string[][] = [];
  for (const v of vols) {
    let path: string;
    try {
      path = await v.path();
    } catch {
      path = 'unknown';
    }
    if (!details) {
      rows.push([v.name, path]);
      continue;
    }
    let info: VolInfo | null = null;
    try {
      info = await v.info();
    } catch {
      info = null;
    }
    if (info) {
      rows.push([v.name, path, volTypeName(info.type), prettyCapacity(info.capacity), prettyCapacity(info.allocation)]);
    } else {
      rows.push([v.name, path, 'unknown', 'unknown', 'unknown']);
    }
  }
  const headers = details ? ['Name', 'Path', 'Type', 'Capacity', 'Allocation'] : ['Name', 'Path'];
  ctl.print(renderTable(headers, rows, !ctl.quiet));
};

export const handlers: Record<string, Handler> = {
  'vol-create-as': volCreateAs,
  'vol-delete': volDelete,
  'vol-wipe': volWipe,
  'vol-info': volInfo,
  'vol-resize': volResize,
  'vol-dumpxml': volDumpxml,
  'vol-key': volKey,
  'vol-path': volPath,
  'vol-list': volList,
};
