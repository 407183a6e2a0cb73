/**
 * virsh's object lookups, call for call (virshCommandOptPoolBy / virshCommandOptVolBy):
 *
 * - a pool argument of 36 characters that parses as a UUID is tried by UUID first, then by name;
 * - a volume with --pool: the pool, IS_ACTIVE, the volume by name, by key, by path, and finally
 *   LOOKUP_BY_VOLUME to check it belongs to that pool; without --pool: by key, then by path.
 */
import type { StoragePool, StorageVol } from '../client/index.js';
import { type Ctl, CommandFailed, DEBUG, INFO } from './ctl.js';
import { parseUuid } from './numbers.js';
import { optString, type ParsedCmd } from './vsh.js';

/** vshCommandOptStringReq: the option's value, or fail on an empty one. */
export function stringOpt(ctl: Ctl, cmd: ParsedCmd, name: string): string | undefined {
  const r = optString(cmd, name);
  if (r.error) ctl.fail(r.error);
  return r.value;
}

/** Like stringOpt for a mandatory option. */
export function requiredOpt(ctl: Ctl, cmd: ParsedCmd, name: string): string {
  const v = stringOpt(ctl, cmd, name);
  if (v === undefined) ctl.fail(`Failed to get option '${name}': Mandatory option not present`);
  return v!;
}

/** vshCommandOptStringQuiet: undefined when absent; an empty value makes the command fail silently. */
export function quietOpt(cmd: ParsedCmd, name: string): string | undefined {
  const v = cmd.opts.get(name);
  if (v === undefined || v === true) return undefined;
  if (v === '') throw new CommandFailed();
  return v;
}

export async function lookupPool(ctl: Ctl, cmd: ParsedCmd, optName = 'pool'): Promise<{ pool: StoragePool; name: string }> {
  const name = requiredOpt(ctl, cmd, optName);
  const pool = await poolByNameOrUuid(ctl, name, cmd.def.name, optName);
  return { pool, name };
}

/** virshCommandOptPoolBy: by UUID (a 36-character UUID), then by name; its -d lines. */
export async function poolByNameOrUuid(ctl: Ctl, n: string, cmdName: string, optName = 'pool'): Promise<StoragePool> {
  ctl.debug(INFO, `${cmdName}: found option <${optName}>: ${n}\n`);
  const conn = await ctl.connection();
  let last: unknown;
  if (n.length === 36) {
    const uuid = parseUuid(n);
    ctl.debug(DEBUG, `${cmdName}: <${optName}> trying as pool UUID\n`);
    if (uuid) {
      try {
        return await conn.storagePoolLookupByUUID(uuid);
      } catch (err) {
        last = err;
      }
    }
  }
  ctl.debug(DEBUG, `${cmdName}: <${optName}> trying as pool NAME\n`);
  try {
    return await conn.storagePoolLookupByName(n);
  } catch (err) {
    last = err;
  }
  return ctl.fail(`failed to get pool '${n}'`, last);
}

export async function lookupVol(ctl: Ctl, cmd: ParsedCmd): Promise<{ vol: StorageVol; name: string }> {
  const n = requiredOpt(ctl, cmd, 'vol');
  const p = stringOpt(ctl, cmd, 'pool');
  const conn = await ctl.connection();
  let pool: StoragePool | undefined;
  if (p !== undefined) {
    pool = await poolByNameOrUuid(ctl, p, cmd.def.name);
    let active = false;
    let detail: unknown;
    try {
      active = await pool.isActive();
    } catch (err) {
      detail = err;
    }
    if (!active) ctl.fail(`pool '${p}' is not active`, detail);
  }
  ctl.debug(DEBUG, `${cmd.def.name}: found option <vol>: ${n}\n`);
  let vol: StorageVol | undefined;
  let last: unknown;
  if (pool) {
    ctl.debug(DEBUG, `${cmd.def.name}: <vol> trying as vol name\n`);
    try {
      vol = await pool.volLookupByName(n);
    } catch (err) {
      last = err;
    }
  }
  if (!vol) {
    ctl.debug(DEBUG, `${cmd.def.name}: <vol> trying as vol key\n`);
    try {
      vol = await conn.storageVolLookupByKey(n);
    } catch (err) {
      last = err;
    }
  }
  if (!vol) {
    ctl.debug(DEBUG, `${cmd.def.name}: <vol> trying as vol path\n`);
    try {
      vol = await conn.storageVolLookupByPath(n);
    } catch (err) {
      last = err;
    }
  }
  if (!vol) ctl.fail(pool ? `failed to get vol '${n}'` : `failed to get vol '${n}', specifying --pool might help`, last);
  if (pool) {
    let owner: StoragePool | undefined;
    try {
      owner = await vol!.lookupPool();
    } catch {
      // virsh keeps the volume when its pool cannot be looked up
    }
    if (owner && owner.name !== pool.name) ctl.fail(`Requested volume '${n}' is not in pool '${pool.name}'`);
  }
  return { vol: vol!, name: n };
}
