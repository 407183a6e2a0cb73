/**
 * The dir backend: a pool is a directory, its volumes the regular files directly inside it, read
 * from the directory at every list and lookup. A file's format is probed from its header at every
 * look (raw, qcow2, …: formats/), as libvirtd re-reads a volume before showing it. Raw volumes are
 * made, resized and copied here (sparse); images of other formats with qemu-img, with libvirtd's
 * arguments. Uploads and downloads move a file's bytes whatever its format.
 *
 * Containment: a volume name never contains '/', NUL, or is '.'/'..'; every open uses O_NOFOLLOW
 * and checks the result is a regular file, so nothing outside the directory is read, written,
 * created, resized or removed through a volume. Symbolic links, directories and special files in
 * the target are not volumes. A backing chain is followed with a bound and loops are refused.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { readFileRange, type Chunk, type FileRange } from '../../chunk.js';
import type { RemoteError, SparsevirtError } from '../../errors.js';
import { VolCreateFlags, VolResizeFlags, VolType, WipeAlgorithm } from '../../protocol/remote.js';
import { fileSendBatches, writeChunks } from '../../sparse/index.js';
import type {
  BackendOp, Pool, PoolBackend, PoolDef, ReadOptions, VolDef, VolInfo, Volume, VolumeReader, VolumeSource, VolumeWriter, WriteOptions,
} from '../backend.js';
import { CODE, DOMAIN, checkFlags, exclusiveFlags, storageError, systemError } from '../errors.js';
import {
  convertImage, createImage, describeVolume, formatVolumeXml, isImageFormat, probeImage, resizeImage, type ImageFormat, type ProbeResult,
} from '../formats/index.js';
import { checkBacking, formatError, qcowOptions, refuseBadChain, writable } from './dir-images.js';
import { allocate, copyData, isErrno, randomizeFile, reflinkInto, zeroFile } from './dir-files.js';

const { O_WRONLY, O_RDONLY, O_RDWR, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;

/** libvirt's default mode for a dir pool target it creates (VIR_STORAGE_DEFAULT_POOL_PERM_MODE). */
const DEFAULT_POOL_MODE = 0o711;
/** libvirt's mode for new volumes in a dir pool. */
const VOLUME_MODE = 0o600;
const BUILD_NO_OVERWRITE = 4;
const BUILD_OVERWRITE = 8;

/** The formats a dir pool creates, in libvirt's order (the capabilities list them). */
const CREATABLE: readonly string[] = ['raw', 'vpc', 'vdi', 'qcow', 'qcow2', 'qed', 'vmdk'];

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

const isRemote = (err: unknown): err is RemoteError => (err as RemoteError | undefined)?.virCode !== undefined;

function symlinkRefused(vol: { name: string; pool: Pool }): RemoteError {
  return storageError(CODE.INVALID_ARG, `volume '${vol.name}' in pool '${vol.pool.name}' is a symbolic link; sparsevirtd does not follow links out of a pool`);
}

/** Open a volume's file without following a symlink; must be a regular file. */
async function openVol(vol: Volume, flags: number): Promise<fsp.FileHandle> {
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(vol.path, flags | O_NOFOLLOW);
  } catch (err) {
    if (isErrno(err, 'ELOOP')) throw symlinkRefused(vol);
    if (isErrno(err, 'ENOENT')) throw storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching name '${vol.name}'`);
    throw systemError(`cannot open volume '${vol.path}'`, err);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw storageError(CODE.INVALID_ARG, `volume '${vol.path}' is not a regular file`);
  } catch (err) {
    await fh.close().catch(() => undefined);
    if (isRemote(err)) throw err;
    throw systemError(`cannot stat file '${vol.path}'`, err);
  }
  return fh;
}

/** Probe an open volume: its format, virtual size, backing store. */
async function probeOpen(vol: Volume, fh: fsp.FileHandle): Promise<ProbeResult> {
  try {
    return await probeImage(fh, { path: vol.path });
  } catch (err) {
    throw formatError(`cannot probe volume '${vol.path}'`, err);
  }
}

async function probeVol(vol: Volume): Promise<ProbeResult> {
  const fh = await openVol(vol, O_RDONLY);
  try {
    return await probeOpen(vol, fh);
  } finally {
    await fh.close().catch(() => undefined);
  }
}

class DirReader implements VolumeReader {
  constructor(private readonly fh: fsp.FileHandle, private readonly o: ReadOptions) {}
  batches() {
    return fileSendBatches({ fd: this.fh.fd }, { offset: this.o.offset, length: this.o.length ?? undefined, sparse: this.o.sparse });
  }
  close(): Promise<void> {
    return this.fh.close();
  }
}

class DirWriter implements VolumeWriter {
  constructor(private readonly fh: fsp.FileHandle, private readonly o: WriteOptions) {}
  async write(source: Parameters<VolumeWriter['write']>[0], hooks: Parameters<VolumeWriter['write']>[1]): Promise<void> {
    await writeChunks({ fd: this.fh.fd }, source, {
      offset: this.o.offset,
      ...(hooks.release ? { release: hooks.release } : {}),
      ...(hooks.receiveInto ? { receiveInto: hooks.receiveInto } : {}),
    });
  }
  close(): Promise<void> {
    return this.fh.close();
  }
}

/** A reader's batches with every FileRange read into a data chunk. */
async function* asChunks(batches: AsyncIterable<Array<Chunk | FileRange>>): AsyncGenerator<Chunk[]> {
  for await (const batch of batches) yield batch.map((c) => (c.kind === 'file' ? { kind: 'data' as const, bytes: readFileRange(c) } : c));
}

export class DirBackend implements PoolBackend {
  readonly type = 'dir';
  readonly supports: ReadonlySet<BackendOp> = new Set<BackendOp>([
    'build', 'deletePool', 'createVol', 'createVolFrom', 'deleteVol', 'resizeVol', 'wipeVol', 'upload', 'download',
  ]);
  readonly volFormats = { defaultFormat: 'raw', formats: CREATABLE };

  checkDefinition(def: PoolDef): void {
    if (!def.target) throw storageError(CODE.XML_ERROR, 'missing storage pool target path');
  }

  sameSource(a: PoolDef, b: PoolDef): boolean {
    return a.target === b.target;
  }

  // ================================================================= pools

  /** libvirt's virStorageBackendFileSystemBuild for a dir pool: make the directory. */
  async build(pool: Pool, flags: number): Promise<void> {
    checkFlags(flags, BUILD_OVERWRITE | BUILD_NO_OVERWRITE, 'virStorageBackendFileSystemBuild');
    if (flags & BUILD_OVERWRITE && flags & BUILD_NO_OVERWRITE) {
      throw exclusiveFlags('VIR_STORAGE_POOL_BUILD_OVERWRITE', 'VIR_STORAGE_POOL_BUILD_NO_OVERWRITE', 'virStorageBackendFileSystemBuild');
    }
    const mode = pool.mode ?? DEFAULT_POOL_MODE;
    let exists = false;
    try {
      const st = await fsp.stat(pool.target);
      if (!st.isDirectory()) throw storageError(CODE.OPERATION_FAILED, `'${pool.target}' is not a directory`);
      exists = true;
    } catch (err) {
      if (isRemote(err)) throw err;
      if (!isErrno(err, 'ENOENT')) throw systemError(`cannot access '${pool.target}'`, err);
    }
    if (exists) {
      if (pool.mode !== null) await fsp.chmod(pool.target, mode).catch((err) => { throw systemError(`cannot set mode of '${pool.target}'`, err); });
    } else {
      try {
        await fsp.mkdir(path.dirname(pool.target), { recursive: true, mode: DEFAULT_POOL_MODE });
        await fsp.mkdir(pool.target, { mode });
        await fsp.chmod(pool.target, mode);
      } catch (err) {
        if (!isErrno(err, 'EEXIST')) throw systemError(`cannot create path '${pool.target}'`, err);
      }
    }
    // libvirt then takes (no-)overwrite as a request to format the source device, which a dir pool has none of
    if (flags & (BUILD_NO_OVERWRITE | BUILD_OVERWRITE)) {
      throw storageError(CODE.OPERATION_INVALID, `No source device specified when formatting pool '${pool.name}'`);
    }
  }

  start(pool: Pool): Promise<void> {
    return this.refresh(pool);
  }

  async stop(): Promise<void> {}

  /** What libvirt's refresh of a dir pool finds out: the target is a readable directory; its filesystem's sizes. */
  async refresh(pool: Pool): Promise<void> {
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

  async updateStats(pool: Pool): Promise<void> {
    try {
      const s = await fsp.statfs(pool.target, { bigint: true });
      const capacity = s.bsize * s.blocks;
      const available = s.bsize * s.bfree;
      pool.stats = { capacity, allocation: capacity - available, available };
    } catch (err) {
      throw systemError(`cannot statvfs path '${pool.target}'`, err);
    }
  }

  /** Remove the (empty) target directory. */
  async deletePool(pool: Pool, flags: number): Promise<void> {
    checkFlags(flags, 0, 'virStorageBackendFileSystemDelete');
    try {
      await fsp.rmdir(pool.target);
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw systemError(`failed to remove pool '${pool.target}'`, err);
    }
  }

  // ================================================================= volumes

  async listVolumes(pool: Pool): Promise<string[]> {
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

  async lookupVolume(pool: Pool, name: string): Promise<Volume> {
    const notFound = () => storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching name '${name}'`);
    if (!isValidVolName(name)) throw notFound();
    const p = pool.volPath(name);
    let st: fs.Stats;
    try {
      st = await fsp.lstat(p);
    } catch {
      throw notFound();
    }
    if (st.isSymbolicLink()) throw symlinkRefused({ name, pool });
    if (!st.isFile()) throw notFound();
    return { pool, name, key: p, path: p };
  }

  async findVolume(pool: Pool, p: string): Promise<Volume | null> {
    const dir = path.posix.dirname(p);
    const name = path.posix.basename(p);
    if (dir !== pool.target || !isValidVolName(name) || p !== pool.volPath(name)) return null;
    try {
      return await this.lookupVolume(pool, name);
    } catch (err) {
      if ((err as RemoteError).virCode === CODE.NO_STORAGE_VOL) return null;
      throw err;
    }
  }

  async volumeInfo(vol: Volume): Promise<VolInfo> {
    const fh = await openVol(vol, O_RDONLY);
    try {
      let st: fs.BigIntStats;
      try {
        st = await fh.stat({ bigint: true });
      } catch (err) {
        throw systemError(`cannot stat file '${vol.path}'`, err);
      }
      const probe = await probeOpen(vol, fh);
      const capacity = probe.format === 'ploop' ? st.size : probe.capacity;
      return {
        type: probe.format === 'ploop' ? VolType.PLOOP : VolType.FILE,
        capacity, allocation: st.blocks * 512n, physical: st.size, format: probe.format,
      };
    } finally {
      await fh.close().catch(() => undefined);
    }
  }

  async volumeXml(vol: Volume): Promise<string> {
    // (checks it is still a regular file in the pool, not a link)
    await (await openVol(vol, O_RDONLY)).close();
    try {
      const d = await describeVolume(vol.path);
      return formatVolumeXml({ name: vol.name, path: vol.path, probe: d.probe, stat: d.stat, backing: d.backing });
    } catch (err) {
      if ((err as SparsevirtError).code === 'ERR_NOT_FOUND') throw storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching name '${vol.name}'`);
      throw formatError(`cannot read volume '${vol.path}'`, err);
    }
  }

  /** Refused unless the name is free: libvirt's message for a volume that exists. */
  private async requireFree(pool: Pool, name: string, code: number = CODE.STORAGE_VOL_EXIST): Promise<string> {
    checkVolNameForCreate(name);
    const p = pool.volPath(name);
    if (await fsp.lstat(p).then(() => true, () => false)) {
      throw code === CODE.STORAGE_VOL_EXIST ? storageError(code, `'${name}'`) : storageError(code, `storage volume name '${name}' already in use.`);
    }
    return p;
  }

  /**
   * A raw volume: sparse unless `<allocation>` asks for bytes: then that many bytes (at most the
   * capacity) are allocated with fallocate. (libvirt preallocates the whole capacity when
   * `<allocation>` is absent; sparsevirtd keeps such volumes sparse.) Other formats: qemu-img
   * create as libvirtd runs it (compat 0.10 unless asked, preallocation with the metadata flag).
   */
  async createVolume(pool: Pool, def: VolDef, flags: number): Promise<Volume> {
    const format = def.format === null || def.format === 'none' ? 'raw' : def.format;
    if (format === 'raw') return this.createRaw(pool, def, flags);
    const fmt = writable(format);
    const p = await this.requireFree(pool, def.name);
    const opts = qcowOptions(def, fmt);
    let backing: { path: string; format: ImageFormat } | undefined;
    if (def.backingStore) backing = await checkBacking(pool.target, def.backingStore);
    const capacity = def.capacity ?? 0;
    let preallocation: 'metadata' | 'falloc' | undefined;
    if (flags & VolCreateFlags.PREALLOC_METADATA) {
      if (fmt !== 'qcow2') throw storageError(CODE.CONFIG_UNSUPPORTED, 'metadata preallocation is only available with qcow2');
      if (backing) throw storageError(CODE.CONFIG_UNSUPPORTED, 'metadata preallocation conflicts with backing store');
      preallocation = (def.allocation ?? capacity) < capacity ? 'metadata' : 'falloc';
    }
    try {
      await createImage({
        path: p, format: fmt, capacity, ...opts,
        ...(backing ? { backing } : {}), ...(preallocation ? { preallocation } : {}),
      });
      await fsp.chmod(p, def.mode ?? VOLUME_MODE);
    } catch (err) {
      if ((err as SparsevirtError).code !== 'ERR_EXISTS') await fsp.unlink(p).catch(() => undefined);
      else throw storageError(CODE.STORAGE_VOL_EXIST, `'${def.name}'`);
      throw formatError(`cannot create volume '${p}'`, err);
    }
    return { pool, name: def.name, key: p, path: p };
  }

  private async createRaw(pool: Pool, def: VolDef, flags: number): Promise<Volume> {
    if (flags & VolCreateFlags.PREALLOC_METADATA) throw storageError(CODE.CONFIG_UNSUPPORTED, 'metadata preallocation is only available with qcow2');
    if (def.backingStore) throw storageError(CODE.CONFIG_UNSUPPORTED, 'backing storage not supported for raw volumes');
    qcowOptions(def, 'raw');
    checkVolNameForCreate(def.name);
    const capacity = def.capacity ?? 0;
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
      await fh.chmod(def.mode ?? VOLUME_MODE);
    } catch (err) {
      await fh.close().catch(() => undefined);
      await fsp.unlink(p).catch(() => undefined);
      if (isRemote(err)) throw err;
      throw systemError(`cannot create volume '${p}'`, err);
    }
    await fh.close();
    return { pool, name: def.name, key: p, path: p };
  }

  /**
   * vol-clone, vol-create-from. raw → raw: the capacity is at least the source's (the XML may
   * omit it); an `<allocation>` below the source's capacity makes a sparse clone, where the
   * source's holes and its all-zero blocks stay unallocated; otherwise (also when `<allocation>`
   * is absent) that many bytes are allocated first. Between other formats: qemu-img convert as
   * libvirtd runs it (a chain is read through: the copy has no backing file; qcow2 → qcow2 keeps
   * the cluster size). From a pool of another type: its content, read as a download, into raw.
   */
  async createVolumeFrom(pool: Pool, def: VolDef, src: VolumeSource, flags: number): Promise<Volume> {
    const p = await this.requireFree(pool, def.name, CODE.INTERNAL_ERROR);
    const to = def.format === null || def.format === 'none' ? 'raw' : def.format;
    const from = src.info.format;
    const local = src.vol.pool.type === this.type;
    if (to === 'raw' && (from === 'raw' || !local)) {
      if (flags & VolCreateFlags.PREALLOC_METADATA) throw storageError(CODE.CONFIG_UNSUPPORTED, 'metadata preallocation is not supported for raw volumes');
      return local ? this.cloneRaw(pool, def, src.vol, p, flags) : this.copyIn(pool, def, src, p);
    }
    if (!local) throw storageError(CODE.NO_SUPPORT, `storage pool doesn't support creating a ${to} volume from a ${src.vol.pool.type} volume`);
    if (flags & VolCreateFlags.REFLINK) throw storageError(CODE.OPERATION_UNSUPPORTED, 'reflink is only supported between raw volumes');
    const fmt = writable(to);
    if (!isImageFormat(from)) throw storageError(CODE.CONFIG_UNSUPPORTED, `cannot read a volume of format '${from}'`);
    const opts = qcowOptions(def, fmt);
    if (fmt === 'qcow2' && from === 'qcow2' && opts.clusterSize === undefined) {
      const probe = await probeVol(src.vol);
      if (probe.clusterSize !== null) opts.clusterSize = Number(probe.clusterSize);
    }
    await refuseBadChain(src.vol.path, from, src.vol.pool.target);
    let preallocation: 'metadata' | undefined;
    if (flags & VolCreateFlags.PREALLOC_METADATA) {
      if (fmt !== 'qcow2') throw storageError(CODE.CONFIG_UNSUPPORTED, 'metadata preallocation is only available with qcow2');
      preallocation = 'metadata';
    }
    try {
      await convertImage(src.vol.path, from, p, fmt, { ...opts, ...(preallocation ? { preallocation } : {}) });
      if (def.capacity !== null && BigInt(def.capacity) > src.info.capacity) await resizeImage(p, fmt, def.capacity);
      await fsp.chmod(p, def.mode ?? VOLUME_MODE);
    } catch (err) {
      if ((err as SparsevirtError).code === 'ERR_EXISTS') throw storageError(CODE.INTERNAL_ERROR, `storage volume name '${def.name}' already in use.`);
      await fsp.unlink(p).catch(() => undefined);
      throw formatError(`cannot clone volume '${src.vol.path}' to '${p}'`, err);
    }
    return { pool, name: def.name, key: p, path: p };
  }

  private async cloneRaw(pool: Pool, def: VolDef, src: Volume, p: string, flags: number): Promise<Volume> {
    const input = await openVol(src, O_RDONLY);
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
        await fh.chmod(def.mode ?? VOLUME_MODE);
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
        if (isRemote(err)) throw err;
        throw systemError(`cannot clone volume '${src.path}' to '${p}'`, err);
      }
    } finally {
      await input.close().catch(() => undefined);
      await fh?.close();
    }
    return { pool, name: def.name, key: p, path: p };
  }

  /** A raw copy of a volume of another backend, read as its download reads it (sparse). */
  private async copyIn(pool: Pool, def: VolDef, src: VolumeSource, p: string): Promise<Volume> {
    const capacity = Math.max(def.capacity ?? 0, Number(src.info.capacity));
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(p, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, VOLUME_MODE);
    } catch (err) {
      if (isErrno(err, 'EEXIST')) throw storageError(CODE.INTERNAL_ERROR, `storage volume name '${def.name}' already in use.`);
      throw systemError(`cannot create volume '${p}'`, err);
    }
    let reader: VolumeReader | undefined;
    try {
      await fh.chmod(def.mode ?? VOLUME_MODE);
      reader = await src.openRead({ offset: 0, length: null, sparse: true });
      await writeChunks({ fd: fh.fd }, asChunks(reader.batches()), { offset: 0 });
      if ((await fh.stat()).size < capacity) await fh.truncate(capacity);
    } catch (err) {
      await fsp.unlink(p).catch(() => undefined);
      if (isRemote(err)) throw err;
      throw systemError(`cannot clone volume '${src.vol.path}' to '${p}'`, (err as { cause?: unknown }).cause ?? err);
    } finally {
      await reader?.close().catch(() => undefined);
      await fh.close().catch(() => undefined);
    }
    return { pool, name: def.name, key: p, path: p };
  }

  async deleteVolume(vol: Volume): Promise<void> {
    try {
      await fsp.unlink(vol.path);
    } catch (err) {
      throw systemError(`cannot unlink file '${vol.path}'`, err);
    }
  }

  /** raw: truncate (and fallocate with ALLOCATE); other formats: qemu-img resize, as libvirtd. */
  async resizeVolume(vol: Volume, capacity: bigint, flags: number): Promise<void> {
    const fh = await openVol(vol, O_RDWR);
    try {
      const probe = await probeOpen(vol, fh);
      if (probe.format !== 'raw') {
        if (flags & VolResizeFlags.ALLOCATE) throw storageError(CODE.OPERATION_UNSUPPORTED, 'preallocate is only supported for raw type volume');
        try {
          await resizeImage(vol.path, probe.format, capacity, { shrink: capacity < probe.capacity });
        } catch (err) {
          throw formatError(`cannot resize volume '${vol.path}'`, err);
        }
        return;
      }
      const cur = (await fh.stat({ bigint: true })).size;
      if (flags & VolResizeFlags.ALLOCATE && capacity > cur) await allocate(fh.fd, Number(cur), Number(capacity - cur), vol.path);
      try {
        await fh.truncate(Number(capacity));
      } catch (err) {
        throw systemError(`Failed to truncate file '${vol.path}'`, err);
      }
    } finally {
      await fh.close();
    }
  }

  /**
   * ZERO makes the whole file read as zeros keeping its size (holes punched where the
   * filesystem can, else zeroed); RANDOM overwrites it with random bytes. Whatever the format:
   * libvirtd 9.0 wipes an image file's bytes too (a wiped qcow2 then shows as raw).
   */
  async wipeVolume(vol: Volume, algorithm: number): Promise<void> {
    const fh = await openVol(vol, O_WRONLY);
    try {
      const size = (await fh.stat()).size;
      if (algorithm === WipeAlgorithm.ZERO) await zeroFile(fh, size);
      else await randomizeFile(fh, size);
    } catch (err) {
      if (isRemote(err)) throw err;
      throw systemError(`Failed to wipe vol ${vol.name}`, (err as { cause?: unknown }).cause ?? err);
    } finally {
      await fh.close();
    }
  }

  async openRead(vol: Volume, o: ReadOptions): Promise<VolumeReader> {
    return new DirReader(await openVol(vol, O_RDONLY), o);
  }

  /** Writes into the file as it is (never creates or truncates it). */
  async openWrite(vol: Volume, o: WriteOptions): Promise<VolumeWriter> {
    return new DirWriter(await openVol(vol, O_WRONLY), o);
  }
}

export const dirBackend = new DirBackend();
