/**
 * The storage driver: dir pools of raw file volumes, with libvirt's semantics and error codes.
 *
 * Pools are kept in memory and persisted one JSON file each (state.ts). Volumes are not: a
 * pool's volumes are the regular files directly inside its target directory, read from the
 * directory on every list and lookup (so the view is always fresh; `refresh` only re-checks the
 * target). Symbolic links, directories and other special files in the target are not volumes.
 *
 * Containment: a volume name never contains '/', NUL, or is '.'/'..'; every open uses
 * O_NOFOLLOW and checks the result is a regular file, so nothing outside a pool's directory is
 * ever read, written, created, resized or removed through a volume.
 */
import { randomFill, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { RemoteError } from '../errors.js';
import {
  ListPoolsFlags, PoolCreateFlags, PoolLifecycle, PoolState, VolCreateFlags, VolResizeFlags, VolType, WipeAlgorithm,
} from '../protocol/remote.js';
import { ExtentWalker } from '../sparse/extents.js';
import { readFully, zeroes } from '../sparse/file.js';
import { writeChunks } from '../sparse/index.js';
import * as sys from '../io/sys.js';
import { CODE, DOMAIN, checkFlags, exclusiveFlags, storageError, systemError } from './errors.js';
import type { Logger } from './log.js';
import { PoolStore, type PoolRecord } from './state.js';
import { openSecretStore, type SecretStore } from './secrets.js';
import { POOL_TYPES, formatPoolXml, formatVolXml, parsePoolXml, parseVolXml, sanitizePath, type PoolXmlDef } from './xml.js';

const { O_WRONLY, O_RDONLY, O_RDWR, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;

/** libvirt's default mode for a dir pool target it creates (VIR_STORAGE_DEFAULT_POOL_PERM_MODE). */
const DEFAULT_POOL_MODE = 0o711;
/** libvirt's mode for new volumes in a dir pool. */
const VOLUME_MODE = 0o600;
const ZERO_WRITE = 1 << 20;

export interface PoolStats {
  capacity: bigint;
  allocation: bigint;
  available: bigint;
}

export class Pool {
  name: string;
  uuid: string;
  target: string;
  mode: number | null;
  autostart = false;
  active = false;
  /** False for a pool made by STORAGE_POOL_CREATE_XML: never saved, gone once stopped. */
  persistent = true;
  /** Last values seen while running: libvirt keeps showing them after a destroy. */
  stats: PoolStats = { capacity: 0n, allocation: 0n, available: 0n };
  perms: { mode: number; owner: number; group: number } | null = null;
  /** Saves of this pool's record, in order. */
  saving: Promise<void> = Promise.resolve();

  constructor(rec: Pick<PoolRecord, 'name' | 'uuid' | 'target' | 'mode'>) {
    this.name = rec.name;
    this.uuid = rec.uuid;
    this.target = rec.target;
    this.mode = rec.mode;
  }

  get uuidBytes(): Buffer {
    return Buffer.from(this.uuid.replace(/-/g, ''), 'hex');
  }

  volPath(name: string): string {
    return this.target === '/' ? `/${name}` : `${this.target}/${name}`;
  }
}

/** A volume found by a lookup: its pool, name and path (= key). */
export interface Volume {
  pool: Pool;
  name: string;
  path: string;
}

export interface VolInfo {
  type: number;
  capacity: bigint;
  allocation: bigint;
}

/** True for a name that can be a volume in a pool: one path component, no NUL. */
export function isValidVolName(name: string): boolean {
  return name.length > 0 && name !== '.' && name !== '..' && !name.includes('/') && !name.includes('\0') && Buffer.byteLength(name) <= 255;
}

/** The refusal for a volume name that would escape its pool (create). */
function checkVolNameForCreate(name: string): void {
  if (name.includes('/')) throw storageError(CODE.OPERATION_INVALID, `volume name '${name}' cannot contain '/'`);
  if (name.includes('\0')) throw storageError(CODE.INVALID_ARG, 'volume name cannot contain a NUL byte');
  if (name === '.' || name === '..') throw storageError(CODE.INVALID_ARG, `volume name '${name}' is not allowed`);
  if (Buffer.byteLength(name) > 255) throw storageError(CODE.INVALID_ARG, `volume name '${name.slice(0, 32)}…' is longer than 255 bytes`);
}

function uuidString(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function isErrno(err: unknown, code: string): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === code;
}

/** What the driver tells its listeners (the sessions' storage pool event callbacks). */
export type PoolEvent =
  | { kind: 'lifecycle'; pool: Pool; event: number; detail: number }
  | { kind: 'refresh'; pool: Pool };

export interface StorageDriverOptions {
  stateDir: string;
  log: Logger;
}

export class StorageDriver {
  readonly store: PoolStore;
  readonly secrets: SecretStore;
  private readonly log: Logger;
  private readonly pools = new Map<string, Pool>();
  private readonly listeners = new Set<(e: PoolEvent) => void>();

  constructor(opts: StorageDriverOptions) {
    this.store = new PoolStore(opts.stateDir);
    this.log = opts.log;
    this.secrets = openSecretStore(opts.stateDir, (file, err) => this.log.error('secret file unreadable, skipped', { file, error: (err as Error).message }));
  }

  /**
   * Load the persisted pools, create the `default` pool in a fresh state directory (if
   * `defaultPoolTarget` is given), and start the pools that were running or are autostart.
   */
  async init(opts: { defaultPoolTarget?: string } = {}): Promise<void> {
    const fresh = await this.store.init();
    const records = await this.store.load((file, err) => {
      this.log.error('pool state file unreadable, skipped', { file, error: (err as Error).message });
    });
    for (const rec of records) {
      if (this.pools.has(rec.name)) continue;
      const pool = new Pool(rec);
      pool.autostart = rec.autostart;
      pool.active = false;
      this.pools.set(pool.name, pool);
      if (rec.active || rec.autostart) {
        try {
          await this.start(pool, 0, { save: false });
          this.log.info('pool started', { pool: pool.name, reason: rec.active ? 'was running' : 'autostart' });
        } catch (err) {
          this.log.warn('pool could not be started', { pool: pool.name, error: (err as Error).message });
        }
      }
    }
    if (fresh && opts.defaultPoolTarget && !this.pools.has('default')) {
      await this.createDefaultPool(opts.defaultPoolTarget);
    }
  }

  private async createDefaultPool(target: string): Promise<void> {
    const xml = `<pool type='dir'>\n  <name>default</name>\n  <target>\n    <path>${target}</path>\n  </target>\n</pool>\n`;
    const pool = await this.define(xml, 0);
    await this.build(pool, 0);
    await this.start(pool, 0);
    await this.setAutostart(pool, true);
    this.log.info('default pool created', { pool: 'default', target });
  }

  /** Listen to pool events; returns the function that stops listening. */
  onPoolEvent(fn: (e: PoolEvent) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  private lifecycle(pool: Pool, event: number): void {
    this.emit({ kind: 'lifecycle', pool, event, detail: 0 });
  }

  private emit(e: PoolEvent): void {
    for (const fn of this.listeners) {
      try {
        fn(e);
      } catch (err) {
        this.log.error('pool event listener failed', { pool: e.pool.name, error: (err as Error).message });
      }
    }
  }

  /**
   * An upload into a volume of `pool` ended (either way): libvirt refreshes the pool then and
   * tells the pool's refresh listeners.
   */
  uploadEnded(pool: Pool): void {
    if (this.pools.get(pool.name) !== pool || !pool.active) return;
    this.emit({ kind: 'refresh', pool });
  }

  private record(pool: Pool): PoolRecord {
    return { version: 1, name: pool.name, uuid: pool.uuid, type: 'dir', target: pool.target, mode: pool.mode, autostart: pool.autostart, active: pool.active };
  }

  /** Persist the pool's current state; saves of one pool run in order. A transient pool has nothing to save. */
  private persist(pool: Pool): Promise<void> {
    if (!pool.persistent) return Promise.resolve();
    const next = pool.saving.catch(() => undefined).then(async () => {
      if (this.pools.get(pool.name) !== pool) return; // undefined meanwhile
      try {
        await this.store.save(this.record(pool));
      } catch (err) {
        throw systemError(`cannot save the state of pool '${pool.name}' in '${this.store.dir}'`, err);
      }
    });
    pool.saving = next;
    return next;
  }

  // ================================================================= pools

  listPools(flags: number): Pool[] {
    checkFlags(flags, (1 << 20) - 1, 'storageConnectListAllStoragePools');
    const F = ListPoolsFlags;
    return [...this.pools.values()]
      .filter((p) => {
        if (flags & (F.ACTIVE | F.INACTIVE)) {
          if (!((flags & F.ACTIVE && p.active) || (flags & F.INACTIVE && !p.active))) return false;
        }
        if (flags & (F.PERSISTENT | F.TRANSIENT)) {
          if (!((flags & F.PERSISTENT && p.persistent) || (flags & F.TRANSIENT && !p.persistent))) return false;
        }
        if (flags & (F.AUTOSTART | F.NO_AUTOSTART)) {
          if (!((flags & F.AUTOSTART && p.autostart) || (flags & F.NO_AUTOSTART && !p.autostart))) return false;
        }
        const typeBits = flags & ~((1 << 6) - 1);
        if (typeBits !== 0 && !(typeBits & F.DIR)) return false;
        return true;
      })
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  poolByName(name: string): Pool {
    const p = this.pools.get(name);
    if (!p) throw storageError(CODE.NO_STORAGE_POOL, `no storage pool with matching name '${name}'`);
    return p;
  }

  poolByUuid(uuid: Buffer): Pool {
    const want = uuidString(uuid);
    for (const p of this.pools.values()) if (p.uuid === want) return p;
    throw storageError(CODE.NO_STORAGE_POOL, `no storage pool with matching uuid '${want}'`);
  }

  /** STORAGE_POOL_LOOKUP_BY_TARGET_PATH: the running pool whose target is `p` (sanitized). */
  poolByTargetPath(p: string): Pool {
    const clean = sanitizePath(p);
    for (const pool of this.pools.values()) if (pool.active && pool.target === clean) return pool;
    throw storageError(CODE.NO_STORAGE_POOL, clean === p
      ? `no storage pool with matching target path '${p}'`
      : `no storage pool with matching target path '${p}' (${clean})`);
  }

  /**
   * CONNECT_FIND_STORAGE_POOL_SOURCES: libvirt's dir pools have nothing to discover, and sparsevirtd
   * has no other kind.
   */
  findPoolSources(type: string, flags: number): never {
    checkFlags(flags, 0, 'storageConnectFindStoragePoolSources');
    if (!POOL_TYPES.includes(type)) throw storageError(CODE.INTERNAL_ERROR, `unknown storage pool type ${type}`);
    throw storageError(CODE.NO_SUPPORT, `pool type '${type}' does not support source discovery`);
  }

  /** Names of the running (`active`) or inactive pools, sorted (CONNECT_LIST_(DEFINED_)STORAGE_POOLS). */
  poolNames(active: boolean): string[] {
    return this.listPools(active ? ListPoolsFlags.ACTIVE : ListPoolsFlags.INACTIVE).map((p) => p.name);
  }

  /** A pool reference from the wire: libvirt resolves it by UUID. */
  poolByRef(ref: { name: string; uuid: Buffer }): Pool {
    const want = uuidString(ref.uuid);
    for (const p of this.pools.values()) if (p.uuid === want) return p;
    throw storageError(CODE.NO_STORAGE_POOL, `no storage pool with matching uuid '${want}' (${ref.name})`);
  }

  private requireActive(pool: Pool): void {
    if (!pool.active) throw storageError(CODE.OPERATION_INVALID, `storage pool '${pool.name}' is not active`);
  }

  private requireInactive(pool: Pool, word: 'already' | 'still'): void {
    if (pool.active) throw storageError(CODE.OPERATION_INVALID, `storage pool '${pool.name}' is ${word} active`);
  }

  /**
   * libvirt's duplicate checks for a new definition: the same uuid under another name, the same
   * name with another uuid (a definition without a uuid gets a new one), another pool on the
   * same target. Returns the pool of the same name and uuid, if there is one.
   */
  private checkDuplicate(def: PoolXmlDef): Pool | undefined {
    const existing = this.pools.get(def.name);
    if (existing) {
      if (def.uuid === null || def.uuid !== existing.uuid) {
        throw storageError(CODE.OPERATION_FAILED, `pool '${def.name}' already exists with uuid ${existing.uuid}`);
      }
    }
    if (def.uuid !== null) {
      for (const p of this.pools.values()) {
        if (p.uuid === def.uuid && p.name !== def.name) {
          throw storageError(CODE.OPERATION_FAILED, `pool '${p.name}' is already defined with uuid ${p.uuid}`);
        }
      }
    }
    for (const p of this.pools.values()) {
      if (p.name !== def.name && p.target === def.target) {
        throw storageError(CODE.OPERATION_FAILED, `Storage source conflict with pool: '${p.name}'`);
      }
    }
    return existing;
  }

  async define(xml: string, flags: number): Promise<Pool> {
    checkFlags(flags, 1 /* VALIDATE */, 'storagePoolDefineXML');
    const def = parsePoolXml(xml);
    const existing = this.checkDuplicate(def);
    if (existing) {
      // Redefinition of the same pool (same name and uuid): takes effect now if inactive; a
      // running transient pool becomes persistent.
      const was = { target: existing.target, mode: existing.mode, persistent: existing.persistent };
      if (!existing.active) {
        existing.target = def.target;
        existing.mode = def.mode;
      }
      existing.persistent = true;
      try {
        await this.persist(existing);
      } catch (err) {
        Object.assign(existing, was);
        throw err;
      }
      this.lifecycle(existing, PoolLifecycle.DEFINED);
      return existing;
    }
    const pool = new Pool({ name: def.name, uuid: def.uuid ?? randomUUID(), target: def.target, mode: def.mode });
    this.pools.set(pool.name, pool);
    try {
      await this.persist(pool);
    } catch (err) {
      this.pools.delete(pool.name);
      throw err;
    }
    this.log.info('pool defined', { pool: pool.name, target: pool.target });
    this.lifecycle(pool, PoolLifecycle.DEFINED);
    return pool;
  }

  /**
   * STORAGE_POOL_CREATE_XML: a transient pool, started at once (built first if asked), never
   * saved; it is gone once stopped.
   */
  async createTransient(xml: string, flags: number): Promise<Pool> {
    const F = PoolCreateFlags;
    checkFlags(flags, F.WITH_BUILD | F.WITH_BUILD_OVERWRITE | F.WITH_BUILD_NO_OVERWRITE, 'storagePoolCreateXML');
    const def = parsePoolXml(xml);
    const existing = this.checkDuplicate(def);
    if (existing) {
      // the same name and uuid as a defined pool: that pool is started
      if (existing.active) throw storageError(CODE.OPERATION_INVALID, `pool is already active as '${existing.name}'`);
      await this.start(existing, flags);
      return existing;
    }
    const pool = new Pool({ name: def.name, uuid: def.uuid ?? randomUUID(), target: def.target, mode: def.mode });
    pool.persistent = false;
    this.pools.set(pool.name, pool);
    try {
      if (flags) await this.buildTarget(pool, buildFlagsOf(flags));
      await this.scanTarget(pool);
    } catch (err) {
      if (this.pools.get(pool.name) === pool) this.pools.delete(pool.name);
      throw err;
    }
    pool.active = true;
    this.log.info('transient pool started', { pool: pool.name, target: pool.target });
    this.lifecycle(pool, PoolLifecycle.STARTED);
    return pool;
  }

  /** STORAGE_POOL_BUILD: make the target directory. */
  async build(pool: Pool, flags: number): Promise<void> {
    await this.buildTarget(pool, flags);
    this.lifecycle(pool, PoolLifecycle.CREATED);
  }

  private async buildTarget(pool: Pool, flags: number): Promise<void> {
    const OVERWRITE = 8;
    const NO_OVERWRITE = 4;
    checkFlags(flags, OVERWRITE | NO_OVERWRITE, 'virStorageBackendFileSystemBuild');
    this.requireInactive(pool, 'already');
    if (flags & OVERWRITE && flags & NO_OVERWRITE) {
      throw exclusiveFlags('VIR_STORAGE_POOL_BUILD_OVERWRITE', 'VIR_STORAGE_POOL_BUILD_NO_OVERWRITE', 'virStorageBackendFileSystemBuild');
    }
    const mode = pool.mode ?? DEFAULT_POOL_MODE;
    let exists = false;
    try {
      const st = await fsp.stat(pool.target);
      if (!st.isDirectory()) throw storageError(CODE.OPERATION_FAILED, `'${pool.target}' is not a directory`);
      exists = true;
    } catch (err) {
      if ((err as RemoteError).virCode !== undefined) throw err;
      if (!isErrno(err, 'ENOENT')) throw systemError(`cannot access '${pool.target}'`, err);
    }
    if (exists) {
      if (pool.mode !== null) await fsp.chmod(pool.target, mode).catch((err) => { throw systemError(`cannot set mode of '${pool.target}'`, err); });
      formatRefused(pool, flags);
      return;
    }
    try {
      await fsp.mkdir(path.dirname(pool.target), { recursive: true, mode: DEFAULT_POOL_MODE });
      await fsp.mkdir(pool.target, { mode });
      await fsp.chmod(pool.target, mode);
    } catch (err) {
      if (!isErrno(err, 'EEXIST')) throw systemError(`cannot create path '${pool.target}'`, err);
    }
    this.log.info('pool built', { pool: pool.name, target: pool.target });
    formatRefused(pool, flags);
  }

  async start(pool: Pool, flags: number, opts: { save?: boolean } = {}): Promise<void> {
    const F = PoolCreateFlags;
    checkFlags(flags, F.WITH_BUILD | F.WITH_BUILD_OVERWRITE | F.WITH_BUILD_NO_OVERWRITE, 'storagePoolCreate');
    this.requireInactive(pool, 'already');
    if (flags) await this.buildTarget(pool, buildFlagsOf(flags));
    await this.scanTarget(pool);
    pool.active = true;
    if (opts.save !== false) {
      try {
        await this.persist(pool);
      } catch (err) {
        pool.active = false;
        throw err;
      }
    }
    this.lifecycle(pool, PoolLifecycle.STARTED);
  }

  /** What libvirt's refresh of a dir pool finds out: the target is a readable directory; its filesystem's sizes. */
  private async scanTarget(pool: Pool): Promise<void> {
    let st: fs.Stats;
    try {
      st = await fsp.stat(pool.target);
      if (!st.isDirectory()) throw Object.assign(new Error('not a directory'), { code: 'ENOTDIR', errno: -20 });
      await fsp.access(pool.target, fs.constants.R_OK | fs.constants.X_OK);
    } catch (err) {
      // (libvirt reports this from its file utilities: no error domain)
      throw systemError(`cannot open directory '${pool.target}'`, err, DOMAIN.NONE);
    }
    pool.perms = { mode: st.mode & 0o7777, owner: st.uid, group: st.gid };
    await this.updateStats(pool);
  }

  private async updateStats(pool: Pool): Promise<PoolStats> {
    try {
      const s = await fsp.statfs(pool.target, { bigint: true });
      const capacity = s.bsize * s.blocks;
      const available = s.bsize * s.bfree;
      pool.stats = { capacity, allocation: capacity - available, available };
    } catch (err) {
      throw systemError(`cannot statvfs path '${pool.target}'`, err);
    }
    return pool.stats;
  }

  async destroy(pool: Pool): Promise<void> {
    this.requireActive(pool);
    pool.active = false;
    try {
      await this.persist(pool);
    } catch (err) {
      pool.active = true;
      throw err;
    }
    this.stopped(pool);
  }

  /** A pool just stopped: tell the listeners; a transient pool is gone with it. */
  private stopped(pool: Pool): void {
    this.lifecycle(pool, PoolLifecycle.STOPPED);
    if (!pool.persistent && this.pools.get(pool.name) === pool) {
      this.pools.delete(pool.name);
      this.log.info('transient pool removed', { pool: pool.name });
    }
  }

  /** STORAGE_POOL_DELETE: remove the (empty) target directory of an inactive pool. */
  async deletePool(pool: Pool, flags: number): Promise<void> {
    checkFlags(flags, 0, 'virStorageBackendFileSystemDelete');
    this.requireInactive(pool, 'still');
    try {
      await fsp.rmdir(pool.target);
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw systemError(`failed to remove pool '${pool.target}'`, err);
    }
    this.lifecycle(pool, PoolLifecycle.DELETED);
  }

  async undefine(pool: Pool): Promise<void> {
    this.requireInactive(pool, 'still');
    if (this.pools.get(pool.name) !== pool) return;
    this.pools.delete(pool.name);
    await pool.saving.catch(() => undefined);
    try {
      await this.store.remove(pool.name);
    } catch (err) {
      this.pools.set(pool.name, pool);
      throw systemError(`cannot remove config file for pool '${pool.name}'`, err);
    }
    this.log.info('pool undefined', { pool: pool.name });
    this.lifecycle(pool, PoolLifecycle.UNDEFINED);
  }

  async refresh(pool: Pool, flags: number): Promise<void> {
    checkFlags(flags, 0, 'storagePoolRefresh');
    this.requireActive(pool);
    try {
      await this.scanTarget(pool);
    } catch (err) {
      // libvirt stops a pool whose refresh fails.
      pool.active = false;
      await this.persist(pool).catch(() => undefined);
      this.stopped(pool);
      throw err;
    }
    this.emit({ kind: 'refresh', pool });
  }

  async setAutostart(pool: Pool, on: boolean): Promise<void> {
    if (!pool.persistent) throw storageError(CODE.INTERNAL_ERROR, 'pool has no config file');
    if (pool.autostart === on) return;
    pool.autostart = on;
    try {
      await this.persist(pool);
    } catch (err) {
      pool.autostart = !on;
      throw err;
    }
  }

  async poolInfo(pool: Pool): Promise<{ state: number; capacity: bigint; allocation: bigint; available: bigint }> {
    if (!pool.active) return { state: PoolState.INACTIVE, ...pool.stats };
    const s = await this.updateStats(pool);
    return { state: PoolState.RUNNING, ...s };
  }

  async poolXml(pool: Pool, flags: number): Promise<string> {
    checkFlags(flags, 1 /* INACTIVE */, 'storagePoolGetXMLDesc');
    if (pool.active) await this.updateStats(pool).catch(() => undefined);
    return formatPoolXml({ name: pool.name, uuid: pool.uuid, target: pool.target, ...pool.stats, perms: pool.perms });
  }

  // ================================================================= volumes

  /** Names of the volumes (regular files) of an active pool, sorted. */
  async listVolumes(pool: Pool, flags = 0): Promise<string[]> {
    checkFlags(flags, 0, 'storagePoolListAllVolumes');
    this.requireActive(pool);
    let entries: fs.Dirent[];
    try {
      entries = await fsp.readdir(pool.target, { withFileTypes: true });
    } catch (err) {
      throw systemError(`cannot open directory '${pool.target}'`, err);
    }
    const names: string[] = [];
    for (const e of entries) {
      if (!isValidVolName(e.name) || e.isSymbolicLink()) continue; // symlinks are never volumes
      if (e.isFile()) {
        names.push(e.name);
      } else if (!(e.isDirectory() || e.isBlockDevice() || e.isCharacterDevice() || e.isFIFO() || e.isSocket())) {
        // DT_UNKNOWN (some filesystems): ask lstat
        if (await fsp.lstat(path.join(pool.target, e.name)).then((st) => st.isFile(), () => false)) names.push(e.name);
      }
    }
    return names.sort();
  }

  /** A volume of an active pool by name; code 50 when there is none. Symlinks are refused. */
  async volByName(pool: Pool, name: string): Promise<Volume> {
    this.requireActive(pool);
    const notFound = () => storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching name '${name}'`);
    if (!isValidVolName(name)) throw notFound();
    const p = pool.volPath(name);
    let st: fs.Stats;
    try {
      st = await fsp.lstat(p);
    } catch {
      throw notFound();
    }
    if (st.isSymbolicLink()) {
      throw storageError(CODE.INVALID_ARG, `volume '${name}' in pool '${pool.name}' is a symbolic link; sparsevirtd does not follow links out of a pool`);
    }
    if (!st.isFile()) throw notFound();
    return { pool, name, path: p };
  }

  /** A volume reference from the wire: pool by name (must be active), then the volume by name. */
  async volByRef(ref: { pool: string; name: string; key: string }): Promise<Volume> {
    return this.volByName(this.poolByName(ref.pool), ref.name);
  }

  /** The pool of a volume reference (STORAGE_POOL_LOOKUP_BY_VOLUME). */
  poolOfVol(ref: { pool: string }): Pool {
    const pool = this.poolByName(ref.pool);
    this.requireActive(pool);
    return pool;
  }

  private async volByFullPath(p: string): Promise<Volume | null> {
    const dir = path.posix.dirname(p);
    const name = path.posix.basename(p);
    if (!isValidVolName(name) || p !== (dir === '/' ? `/${name}` : `${dir}/${name}`)) return null;
    for (const pool of this.listPools(0)) {
      if (!pool.active || pool.target !== dir) continue;
      try {
        return await this.volByName(pool, name);
      } catch (err) {
        if ((err as RemoteError).virCode === CODE.NO_STORAGE_VOL) return null;
        throw err;
      }
    }
    return null;
  }

  async volByKey(key: string): Promise<Volume> {
    const v = await this.volByFullPath(key);
    if (!v) throw storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching key ${key}`);
    return v;
  }

  async volByPath(p: string): Promise<Volume> {
    const v = await this.volByFullPath(sanitizePath(p));
    if (!v) throw storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching path '${p}'`);
    return v;
  }

  /**
   * Create a raw volume. Sparse unless `<allocation>` asks for bytes: then that many bytes
   * (at most the capacity) are allocated with fallocate. (libvirt preallocates the whole
   * capacity when `<allocation>` is absent; we keep such volumes sparse.)
   */
  async createVol(pool: Pool, xml: string, flags: number): Promise<Volume> {
    checkFlags(flags, 1 | 2 | 4 /* PREALLOC_METADATA | REFLINK | VALIDATE */, 'storageVolCreateXML');
    this.requireActive(pool);
    const def = parseVolXml(xml);
    const capacity = def.capacity ?? 0;
    checkVolNameForCreate(def.name);
    if (flags & 1) throw storageError(CODE.CONFIG_UNSUPPORTED, 'metadata preallocation is only available with qcow2');
    const p = pool.volPath(def.name);
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(p, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, VOLUME_MODE);
    } catch (err) {
      if (isErrno(err, 'EEXIST')) throw storageError(CODE.STORAGE_VOL_EXIST, `'${def.name}'`);
      throw systemError(`cannot create volume '${p}'`, err);
    }
    try {
      await fh.truncate(capacity);
      const alloc = Math.min(def.allocation ?? 0, capacity);
      if (alloc > 0) await allocate(fh.fd, 0, alloc, p);
      await fh.chmod(VOLUME_MODE);
    } catch (err) {
      await fh.close().catch(() => undefined);
      await fsp.unlink(p).catch(() => undefined);
      if ((err as RemoteError).virCode !== undefined) throw err;
      throw systemError(`cannot create volume '${p}'`, err);
    }
    await fh.close();
    this.log.info('volume created', { pool: pool.name, vol: def.name, capacity: def.capacity, allocation: def.allocation ?? null });
    return { pool, name: def.name, path: p };
  }

  /**
   * STORAGE_VOL_CREATE_XML_FROM (vol-clone, vol-create-from): a new raw volume with the content
   * of `src`, which may be in another pool. As libvirt: the capacity is at least the source's (the
   * XML may omit it); an `<allocation>` below the source's capacity makes a sparse clone, where
   * the source's holes and its all-zero blocks stay unallocated; otherwise (also when
   * `<allocation>` is absent) that many bytes are allocated first. The copy walks the source's
   * data extents through one 1 MiB buffer.
   */
  async createVolFrom(pool: Pool, xml: string, srcRef: { pool: string; name: string }, flags: number): Promise<Volume> {
    checkFlags(flags, VolCreateFlags.PREALLOC_METADATA | VolCreateFlags.REFLINK, 'storageVolCreateXMLFrom');
    let srcPool = pool;
    if (srcRef.pool !== pool.name) {
      const other = this.pools.get(srcRef.pool);
      if (!other) throw storageError(CODE.NO_STORAGE_POOL, `no storage pool with matching name '${srcRef.pool}'`);
      srcPool = other;
    }
    this.requireActive(pool);
    this.requireActive(srcPool);
    const src = await this.volByName(srcPool, srcRef.name);
    const def = parseVolXml(xml, { capacityOptional: true });
    checkVolNameForCreate(def.name);
    const p = pool.volPath(def.name);
    if (await fsp.lstat(p).then(() => true, () => false)) {
      throw storageError(CODE.INTERNAL_ERROR, `storage volume name '${def.name}' already in use.`);
    }
    if (flags & VolCreateFlags.PREALLOC_METADATA) {
      throw storageError(CODE.CONFIG_UNSUPPORTED, 'metadata preallocation is not supported for raw volumes');
    }
    const input = await this.openVol(src, O_RDONLY);
    let fh: fsp.FileHandle | undefined;
    try {
      const size = (await input.stat()).size;
      const capacity = Math.max(def.capacity ?? 0, size);
      const allocation = def.allocation ?? capacity;
      try {
        fh = await fsp.open(p, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, VOLUME_MODE);
      } catch (err) {
        if (isErrno(err, 'EEXIST')) throw storageError(CODE.INTERNAL_ERROR, `storage volume name '${def.name}' already in use.`);
        throw systemError(`cannot create volume '${p}'`, err);
      }
      try {
        await fh.chmod(VOLUME_MODE);
        if (flags & VolCreateFlags.REFLINK) {
          await reflinkInto(src.path, p);
        } else {
          await fh.truncate(capacity).catch((err) => { throw systemError(`cannot extend file '${p}'`, err); });
          // libvirt: an allocation below the source's capacity asks for a sparse clone
          const sparse = allocation < size;
          if (!sparse) await allocate(fh.fd, 0, Math.min(allocation, capacity), p);
          await copyData(input.fd, src.path, fh, p, size);
        }
        if ((await fh.stat()).size < capacity) await fh.truncate(capacity);
      } catch (err) {
        await fh.close().catch(() => undefined);
        fh = undefined;
        await fsp.unlink(p).catch(() => undefined);
        if ((err as RemoteError).virCode !== undefined) throw err;
        throw systemError(`cannot clone volume '${src.path}' to '${p}'`, err);
      }
    } finally {
      await input.close().catch(() => undefined);
      await fh?.close();
    }
    this.log.info('volume cloned', { pool: pool.name, vol: def.name, from: `${srcPool.name}/${src.name}` });
    return { pool, name: def.name, path: p };
  }

  async deleteVol(vol: Volume, flags: number): Promise<void> {
    const ZEROED = 1;
    const WITH_SNAPSHOTS = 2;
    checkFlags(flags, ZEROED | WITH_SNAPSHOTS, 'virStorageBackendVolDeleteLocal');
    if (flags & ZEROED) await this.wipe(vol, WipeAlgorithm.ZERO, 0);
    try {
      await fsp.unlink(vol.path);
    } catch (err) {
      throw systemError(`cannot unlink file '${vol.path}'`, err);
    }
    this.log.info('volume deleted', { pool: vol.pool.name, vol: vol.name });
  }

  /** Open a volume's file without following a symlink; must be a regular file. */
  async openVol(vol: Volume, flags: number): Promise<fsp.FileHandle> {
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(vol.path, flags | O_NOFOLLOW);
    } catch (err) {
      if (isErrno(err, 'ELOOP')) {
        throw storageError(CODE.INVALID_ARG, `volume '${vol.name}' in pool '${vol.pool.name}' is a symbolic link; sparsevirtd does not follow links out of a pool`);
      }
      if (isErrno(err, 'ENOENT')) throw storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching name '${vol.name}'`);
      throw systemError(`cannot open volume '${vol.path}'`, err);
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw storageError(CODE.INVALID_ARG, `volume '${vol.path}' is not a regular file`);
    } catch (err) {
      await fh.close().catch(() => undefined);
      if ((err as RemoteError).virCode !== undefined) throw err;
      throw systemError(`cannot stat file '${vol.path}'`, err);
    }
    return fh;
  }

  async volInfo(vol: Volume, flags = 0): Promise<VolInfo> {
    checkFlags(flags, 1 /* GET_PHYSICAL */, 'storageVolGetInfoFlags');
    const st = await this.statVol(vol);
    const capacity = st.size;
    return { type: VolType.FILE, capacity, allocation: flags & 1 ? capacity : st.blocks * 512n };
  }

  private async statVol(vol: Volume): Promise<fs.BigIntStats> {
    let st: fs.BigIntStats;
    try {
      st = await fsp.lstat(vol.path, { bigint: true });
    } catch (err) {
      if (isErrno(err, 'ENOENT')) throw storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching name '${vol.name}'`);
      throw systemError(`cannot stat file '${vol.path}'`, err);
    }
    if (!st.isFile()) throw storageError(CODE.INVALID_ARG, `volume '${vol.path}' is not a regular file`);
    return st;
  }

  async volXml(vol: Volume, flags: number): Promise<string> {
    checkFlags(flags, 0, 'storageVolGetXMLDesc');
    const st = await this.statVol(vol);
    const ts = (ns: bigint): [bigint, bigint] => [ns / 1_000_000_000n, ns % 1_000_000_000n];
    return formatVolXml({
      name: vol.name, path: vol.path, capacity: Number(st.size), allocation: Number(st.blocks * 512n),
      mode: Number(st.mode), owner: Number(st.uid), group: Number(st.gid),
      atime: ts(st.atimeNs), mtime: ts(st.mtimeNs), ctime: ts(st.ctimeNs),
    });
  }

  /** STORAGE_VOL_RESIZE with libvirt's checks and messages (storageVolResize). */
  async resizeVol(vol: Volume, capacity: bigint, flags: number): Promise<void> {
    checkFlags(flags, VolResizeFlags.ALLOCATE | VolResizeFlags.DELTA | VolResizeFlags.SHRINK, 'storageVolResize');
    const fh = await this.openVol(vol, O_RDWR);
    try {
      const st = await fh.stat({ bigint: true });
      const cur = st.size;
      const alloc = st.blocks * 512n;
      let abs: bigint;
      if (flags & VolResizeFlags.DELTA) {
        abs = flags & VolResizeFlags.SHRINK ? cur - (capacity < cur ? capacity : cur) : cur + capacity;
      } else {
        abs = capacity;
      }
      if (abs < alloc) throw storageError(CODE.INVALID_ARG, "can't shrink capacity below existing allocation");
      if (abs < cur && !(flags & VolResizeFlags.SHRINK)) {
        throw storageError(CODE.INVALID_ARG, "Can't shrink capacity below current capacity unless shrink flag explicitly specified");
      }
      if (abs > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw storageError(CODE.OPERATION_UNSUPPORTED, `capacity ${abs} is larger than sparsevirtd supports (2^53 bytes)`);
      }
      if (flags & VolResizeFlags.ALLOCATE && abs > cur) {
        const stats = await this.updateStats(vol.pool);
        if (abs - alloc > stats.available) throw storageError(CODE.OPERATION_FAILED, 'Not enough space left in storage pool');
        await allocate(fh.fd, Number(cur), Number(abs - cur), vol.path);
      }
      try {
        await fh.truncate(Number(abs));
      } catch (err) {
        throw systemError(`Failed to truncate file '${vol.path}'`, err);
      }
    } finally {
      await fh.close();
    }
  }

  /**
   * STORAGE_VOL_WIPE(_PATTERN): ZERO makes the whole file read as zeros keeping its size
   * (holes punched where the filesystem can, else zeroed); RANDOM overwrites it with random
   * bytes. The scrub(1) patterns and TRIM are refused, as libvirt does without scrub.
   */
  async wipe(vol: Volume, algorithm: number, flags: number): Promise<void> {
    checkFlags(flags, 0, 'storageVolWipePattern');
    const names = ['zero', 'nnsa', 'dod', 'bsi', 'gutmann', 'schneier', 'pfitzner7', 'pfitzner33', 'random', 'trim'];
    if (algorithm >= names.length) throw storageError(CODE.INVALID_ARG, `wiping algorithm ${algorithm} not supported`);
    if (algorithm !== WipeAlgorithm.ZERO && algorithm !== WipeAlgorithm.RANDOM) {
      throw storageError(CODE.ARGUMENT_UNSUPPORTED, `'${names[algorithm]}' algorithm not supported`);
    }
    const fh = await this.openVol(vol, O_WRONLY);
    try {
      const size = (await fh.stat()).size;
      if (size === 0) return;
      if (algorithm === WipeAlgorithm.ZERO) {
        async function* oneHole() {
          yield { kind: 'hole' as const, length: size };
        }
        await writeChunks({ fd: fh.fd }, oneHole(), { offset: 0 });
      } else {
        const buf = Buffer.allocUnsafe(Math.min(ZERO_WRITE, size));
        for (let at = 0; at < size; at += buf.length) {
          const n = Math.min(buf.length, size - at);
          await new Promise<void>((resolve, reject) => randomFill(buf, 0, n, (err) => (err ? reject(err) : resolve())));
          await fh.write(buf, 0, n, at);
        }
      }
    } catch (err) {
      if ((err as RemoteError).virCode !== undefined) throw err;
      throw systemError(`Failed to wipe vol ${vol.name}`, (err as { cause?: unknown }).cause ?? err);
    } finally {
      await fh.close();
    }
    this.log.info('volume wiped', { pool: vol.pool.name, vol: vol.name, algorithm: names[algorithm] });
  }

  /** Open for a stream: upload writes (never creates or truncates), download reads. */
  openForTransfer(vol: Volume, upload: boolean): Promise<fsp.FileHandle> {
    return this.openVol(vol, upload ? O_WRONLY : O_RDONLY);
  }
}

/** Read and write size for copying a volume. */
const COPY_BUFFER = 1 << 20;

/**
 * Copy the data of [0, size) of `fromFd` into `to` at the same offsets, as libvirt's sparse
 * copy does: holes are skipped, and so is each all-zero block (the target's block size,
 * aligned to the file) of the data, so that they stay unallocated where nothing else put blocks.
 */
async function copyData(fromFd: number, fromName: string, to: fsp.FileHandle, toName: string, size: number): Promise<void> {
  const block = Math.max(512, Number((await to.stat()).blksize) || 4096);
  const buf = Buffer.allocUnsafe(COPY_BUFFER);
  const walker = new ExtentWalker(fromFd, fromName, 0, size, true);
  for (let e = walker.next(); e; e = walker.next()) {
    if (e.kind === 'hole') continue;
    for (let at = e.offset; at < e.offset + e.length;) {
      const want = Math.min(buf.length, e.offset + e.length - at);
      const n = await readFully(fromFd, buf.subarray(0, want), at);
      if (n === 0) return; // the source shrank meanwhile
      // write the runs of blocks that are not all zero
      let runStart = -1;
      const flush = async (end: number): Promise<void> => {
        if (runStart < 0) return;
        await writeAll(to, buf.subarray(runStart, end), at + runStart, toName);
        runStart = -1;
      };
      for (let off = 0; off < n;) {
        const next = Math.min(n, (Math.floor((at + off) / block) + 1) * block - at);
        if (isZero(buf, off, next)) await flush(off);
        else if (runStart < 0) runStart = off;
        off = next;
      }
      await flush(n);
      at += n;
    }
  }
}

function isZero(buf: Buffer, from: number, to: number): boolean {
  return buf.subarray(from, to).equals(zeroes(to - from));
}

async function writeAll(fh: fsp.FileHandle, data: Buffer, at: number, name: string): Promise<void> {
  for (let done = 0; done < data.length;) {
    let n: number;
    try {
      n = (await fh.write(data, done, data.length - done, at + done)).bytesWritten;
    } catch (err) {
      throw systemError(`cannot write to '${name}'`, err);
    }
    if (n === 0) throw systemError(`cannot write to '${name}'`, Object.assign(new Error('short write'), { code: 'EIO', errno: -5 }));
    done += n;
  }
}

/** libvirt's reflink clone (FICLONE): the filesystem shares the source's blocks, or it fails. */
async function reflinkInto(from: string, to: string): Promise<void> {
  try {
    await fsp.copyFile(from, to, fs.constants.COPYFILE_FICLONE_FORCE);
  } catch (err) {
    throw systemError(`failed to clone files from '${from}'`, err);
  }
}

/** STORAGE_POOL_CREATE(_XML)'s build flags as STORAGE_POOL_BUILD's: overwrite wins, as in libvirt. */
function buildFlagsOf(createFlags: number): number {
  if (createFlags & PoolCreateFlags.WITH_BUILD_OVERWRITE) return 8;
  return createFlags & PoolCreateFlags.WITH_BUILD_NO_OVERWRITE ? 4 : 0;
}

/**
 * libvirt builds a dir pool's directory, then takes (no-)overwrite as a request to format its
 * source device, which a dir pool has none of.
 */
function formatRefused(pool: Pool, buildFlags: number): void {
  if (buildFlags & (4 | 8)) throw storageError(CODE.OPERATION_INVALID, `No source device specified when formatting pool '${pool.name}'`);
}

/** Allocate [offset, offset + length) (fallocate mode 0), or write zeros where that is unsupported. */
async function allocate(fd: number, offset: number, length: number, name: string): Promise<void> {
  if (length <= 0) return;
  const r = sys.fallocate(fd, 0, offset, length);
  if (r === 0) return;
  if (r !== -sys.EOPNOTSUPP && r !== -sys.ENOSYS) {
    throw systemError(`cannot allocate ${length} bytes in file '${name}'`, sys.errnoException(r, 'fallocate'));
  }
  const zeros = Buffer.alloc(Math.min(ZERO_WRITE, length));
  for (let at = offset; at < offset + length; at += zeros.length) {
    const n = Math.min(zeros.length, offset + length - at);
    await new Promise<void>((resolve, reject) => fs.write(fd, zeros, 0, n, at, (err) => (err ? reject(err) : resolve())));
  }
}
