/**
 * Images in a dir pool: which formats can be made, the qcow2 options of a definition, and the
 * checks of a backing chain before qemu-img reads it (bounded, no loops).
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { RemoteError } from '../../errors.js';
import type { VolDef } from '../backend.js';
import { CODE, storageError, systemError } from '../errors.js';
import { WRITABLE_FORMATS, followChain, isImageFormat, type Compat, type ImageFormat, type WritableFormat } from '../formats/index.js';

const isRemote = (err: unknown): err is RemoteError => (err as RemoteError | undefined)?.virCode !== undefined;

/** A failure of the format layer (qemu-img, a header read) as libvirt reports a failed helper. */
export function formatError(what: string, err: unknown): RemoteError {
  if (isRemote(err)) return err;
  const cause = (err as { cause?: unknown }).cause;
  if (cause && (cause as NodeJS.ErrnoException).code !== undefined) return systemError(what, cause);
  return storageError(CODE.INTERNAL_ERROR, `${what}: ${(err as Error).message}`);
}

/**
 * Refused: a chain from `file` that loops, runs deeper than qemu follows, or holds a header
 * libvirt refuses. Backing files outside the pool are read (as libvirtd and qemu-img do).
 */
export async function refuseBadChain(file: string, format: ImageFormat, poolDir: string): Promise<void> {
  const chain = await followChain(file, { format, followOutsidePool: true, poolDir }).catch((err) => {
    throw formatError(`cannot read '${file}'`, err);
  });
  const bad = chain.problems.find((x) => x.code === 'LOOP' || x.code === 'TOO_DEEP' || x.code === 'CORRUPT');
  if (bad) throw storageError(CODE.OPERATION_FAILED, `backing chain of '${file}': ${bad.message}`);
}

export function writable(format: string): WritableFormat {
  if (!(WRITABLE_FORMATS as readonly string[]).includes(format)) {
    throw storageError(CODE.CONFIG_UNSUPPORTED, `storage volume format '${format}' is not supported for creation`);
  }
  return format as WritableFormat;
}

function compatOf(def: VolDef): Compat | undefined {
  if (def.compat === null) return undefined;
  if (def.compat !== '0.10' && def.compat !== '1.1') throw storageError(CODE.XML_ERROR, `unsupported compat '${def.compat}'`);
  return def.compat;
}

/** The qcow2 options of a definition, refused for formats without them. */
export function qcowOptions(def: VolDef, format: WritableFormat): { compat?: Compat; lazyRefcounts?: boolean; clusterSize?: number } {
  const o: { compat?: Compat; lazyRefcounts?: boolean; clusterSize?: number } = {};
  if (format !== 'qcow2') {
    if (def.compat !== null || def.features.length > 0) {
      throw storageError(CODE.CONFIG_UNSUPPORTED, `format features are only available with qcow2, not '${format}'`);
    }
    return o;
  }
  const compat = compatOf(def);
  if (compat !== undefined) o.compat = compat;
  if (def.features.includes('extended_l2')) throw storageError(CODE.CONFIG_UNSUPPORTED, 'feature extended_l2 is not supported for volume creation');
  if (def.features.includes('lazy_refcounts')) {
    if (compat === '0.10') throw storageError(CODE.CONFIG_UNSUPPORTED, 'lazy_refcounts not supported with compat level 0.10');
    o.lazyRefcounts = true;
    o.compat = '1.1';
  }
  if (def.clusterSize !== null) o.clusterSize = def.clusterSize;
  return o;
}

/**
 * A backing store for a new image: it must be readable, and its own chain must end (no loop,
 * not deeper than qemu follows). The format is raw when not given, as libvirt takes it.
 */
export async function checkBacking(poolDir: string, b: { path: string; format: string | null }): Promise<{ path: string; format: ImageFormat }> {
  const format = b.format ?? 'raw';
  if (!isImageFormat(format)) throw storageError(CODE.CONFIG_UNSUPPORTED, `unknown backing store format '${format}'`);
  // (qemu-img reads a relative name from the new image's directory: the pool's)
  const file = path.isAbsolute(b.path) ? b.path : path.join(poolDir, b.path);
  try {
    await fsp.access(file, fs.constants.R_OK);
  } catch (err) {
    throw systemError(`inaccessible backing store volume ${b.path}`, err);
  }
  if (format !== 'raw') await refuseBadChain(file, format, poolDir);
  return { path: b.path, format };
}

