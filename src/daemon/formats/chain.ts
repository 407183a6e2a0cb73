/**
 * Backing chains: follow an image's backing files with a bound, and describe a volume for its XML.
 *
 * `followChain` walks image → backing → … reading at most MAX_HEADER bytes of each, at most
 * `maxDepth` images (200, libvirt's and qemu's depth for chains), and never opens a file twice
 * (files are told apart by device and inode, so `a/../a/x`, symlinks and hard links are one
 * file). What stops the walk or is wrong with a link is listed in `problems` with a stable code;
 * `assertChain` turns problems into a SparsevirtError('ERR_IMAGE_CHAIN').
 *
 * A backing file whose format the image does not record is probed (libvirt does the same), but,
 * as libvirt does for a domain's chain, a probed image may not have a backing file of its own:
 * that stops the walk with UNSPECIFIED_FORMAT unless `allowProbedBacking` is set.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { SparsevirtError } from '../../errors.js';
import { probeImage, type BackingStore, type ImageFormat, type ProbeResult } from './probe.js';
import { statForXml, type BackingStoreXmlInput } from './volxml.js';

/** libvirt (virt-aa-helper) and qemu bound backing chains to 200 images. */
export const MAX_CHAIN_DEPTH = 200;

export type ChainProblemCode =
  /** a backing file is an image already in the chain */
  | 'LOOP'
  /** more than maxDepth images */
  | 'TOO_DEEP'
  /** a backing file outside the pool directory */
  | 'OUTSIDE_POOL'
  /** a backing file that does not exist */
  | 'MISSING'
  /** a backing source that is not a local file (nbd:, http://, json: …): not followed */
  | 'NETWORK'
  /** a backing file named relative to nothing (a relative file inside json:) */
  | 'UNRESOLVABLE'
  /** a backing file whose format was probed has a backing file itself */
  | 'UNSPECIFIED_FORMAT'
  /** a backing file could not be opened or read (permissions, not a regular file, …) */
  | 'UNREADABLE'
  /** the image above records a format (other than raw) that the file's header does not have */
  | 'FORMAT_MISMATCH'
  /** a header libvirt refuses (issue QCOW2_V3_TRUNCATED) */
  | 'CORRUPT';

export interface ChainProblem {
  code: ChainProblemCode;
  /** Index in `links` of the image whose backing reference has the problem. */
  at: number;
  /** The backing path concerned. */
  path: string;
  message: string;
}

export interface ChainLink {
  /** The path as reached (top: as given; below: libvirt's resolved backing path). */
  path: string;
  /** The format used for this image: recorded by the image above, or probed. */
  format: ImageFormat;
  /** True when no image recorded this one's format and it was probed. */
  formatProbed: boolean;
  /** The header as read (its `format` is what probing says, which may differ from `format`). */
  probe: ProbeResult;
  /** The canonical path (realpath) of the file. */
  realPath: string;
}

export interface ChainResult {
  links: ChainLink[];
  problems: ChainProblem[];
  /** True when the walk reached an image without a backing file and found no problem. */
  complete: boolean;
}

export interface FollowChainOptions {
  /** At most this many images, the top included (default 200). */
  maxDepth?: number;
  /** The pool directory: a backing file whose real path is outside it is OUTSIDE_POOL. */
  poolDir?: string;
  /** With poolDir: also read backing files outside the pool (default false: the walk stops there). */
  followOutsidePool?: boolean;
  /** Follow a probed image's own backing file (default false, as libvirt for domains). */
  allowProbedBacking?: boolean;
  /** The format of the top image; probed when not given. */
  format?: ImageFormat;
}

function within(dir: string, p: string): boolean {
  const rel = path.relative(dir, p);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/** Follow the backing chain of `top`. Never throws for what the images contain; see `problems`. */
export async function followChain(top: string, opts: FollowChainOptions = {}): Promise<ChainResult> {
  const maxDepth = opts.maxDepth ?? MAX_CHAIN_DEPTH;
  if (!Number.isInteger(maxDepth) || maxDepth < 1) {
    throw new SparsevirtError('ERR_INVALID_ARG', `maxDepth must be a positive integer, got ${maxDepth}`);
  }
  let poolReal: string | undefined;
  if (opts.poolDir !== undefined) {
    try {
      poolReal = await fsp.realpath(opts.poolDir);
    } catch (err) {
      throw toIo(err, opts.poolDir);
    }
  }
  const links: ChainLink[] = [];
  const problems: ChainProblem[] = [];
  const seen = new Set<string>();

  // The top image: I/O errors here are the caller's (the file it named cannot be read).
  let current = top;
  let recordedFormat: ImageFormat | null = opts.format ?? null;
  let probedFormat = opts.format === undefined;

  for (let depth = 0; ; depth++) {
    const at = links.length - 1;
    let st;
    try {
      st = await fsp.stat(current, { bigint: true });
    } catch (err) {
      if (depth === 0) throw toIo(err, current);
      const code = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'MISSING' : 'UNREADABLE';
      problems.push({ code, at, path: current, message: `backing file ${current}: ${(err as Error).message}` });
      break;
    }
    const id = `${st.dev}:${st.ino}`;
    if (seen.has(id)) {
      problems.push({ code: 'LOOP', at, path: current, message: `backing file ${current} is already in the chain (a loop)` });
      break;
    }
    if (depth >= maxDepth) {
      problems.push({ code: 'TOO_DEEP', at, path: current, message: `backing chain of ${top} is deeper than ${maxDepth} images` });
      break;
    }
    const realPath = await fsp.realpath(current).catch(() => current);
    if (depth > 0 && poolReal !== undefined && !within(poolReal, realPath)) {
      problems.push({ code: 'OUTSIDE_POOL', at, path: current, message: `backing file ${current} is outside the pool directory ${opts.poolDir}` });
      if (!opts.followOutsidePool) break;
    }
    seen.add(id);
    let probe: ProbeResult;
    try {
      probe = await probeImage(current);
    } catch (err) {
      if (depth === 0) throw err;
      problems.push({ code: 'UNREADABLE', at, path: current, message: `backing file ${current}: ${(err as Error).message}` });
      break;
    }
    const format = recordedFormat ?? probe.format;
    links.push({ path: current, format, formatProbed: probedFormat, probe, realPath });
    const here = links.length - 1;
    if (format !== probe.format) {
      // The image above says what this file is and qemu reads it so: a header of another format
      // inside a raw file is data. Any other disagreement is a broken chain.
      if (format !== 'raw') {
        problems.push({ code: 'FORMAT_MISMATCH', at: here, path: current, message: `${current} is recorded as ${format} but its header says ${probe.format}` });
      }
      break;
    }
    if (probe.issues.some((i) => i.code === 'QCOW2_V3_TRUNCATED')) {
      problems.push({ code: 'CORRUPT', at: here, path: current, message: `${current}: ${probe.issues.map((i) => i.message).join('; ')}` });
      break;
    }
    const backing: BackingStore | null = probe.backing;
    if (!backing) break;
    if (probedFormat && depth > 0 && !opts.allowProbedBacking) {
      problems.push({
        code: 'UNSPECIFIED_FORMAT', at: here - 1, path: current,
        message: `format of backing image '${current}' was not recorded in the image above it, and it has a backing file of its own`,
      });
      break;
    }
    if (backing.type === 'network') {
      problems.push({ code: 'NETWORK', at: here, path: backing.path, message: `backing source ${backing.path} is not a local file` });
      break;
    }
    if (!path.isAbsolute(backing.path)) {
      problems.push({ code: 'UNRESOLVABLE', at: here, path: backing.path, message: `backing file ${backing.path} is relative to nothing` });
      break;
    }
    current = backing.path;
    recordedFormat = backing.format;
    probedFormat = backing.format === null;
  }
  return { links, problems, complete: problems.length === 0 };
}

function toIo(err: unknown, p: string): SparsevirtError {
  const e = err as NodeJS.ErrnoException;
  if (e?.code === 'ENOENT') return new SparsevirtError('ERR_NOT_FOUND', `${p}: no such file`, { cause: err });
  if (e?.code === 'EACCES' || e?.code === 'EPERM') return new SparsevirtError('ERR_ACCESS_DENIED', `${p}: permission denied`, { cause: err });
  return new SparsevirtError('ERR_IO', `${p}: ${e?.message ?? String(err)}`, { cause: err });
}

/** Throws SparsevirtError('ERR_IMAGE_CHAIN') listing the problems, if any. */
export function assertChain(result: ChainResult): void {
  if (result.problems.length === 0) return;
  const err = new SparsevirtError('ERR_IMAGE_CHAIN', result.problems.map((p) => `${p.code}: ${p.message}`).join('; '));
  (err as SparsevirtError & { problems: ChainProblem[] }).problems = result.problems;
  throw err;
}

/**
 * The format libvirt shows for a backing store: the recorded one, else the backing file probed
 * (raw when it cannot be read), as the dir backend does for the volume XML.
 */
export async function backingFormatForXml(backing: BackingStore): Promise<ImageFormat> {
  if (backing.format !== null) return backing.format;
  if (backing.type !== 'file' || !path.isAbsolute(backing.path)) return 'raw';
  try {
    return (await probeImage(backing.path)).format;
  } catch {
    return 'raw';
  }
}

export interface VolumeDescription {
  probe: ProbeResult;
  stat: import('node:fs').BigIntStats;
  /** What formatBackingStoreXml needs, or null without a backing file. */
  backing: BackingStoreXmlInput | null;
}

/**
 * Everything the volume XML of `volPath` needs: its probe, stat, and its backing store (format
 * recorded or probed, the backing file's stat when it has one). Bounded: two header reads.
 */
export async function describeVolume(volPath: string): Promise<VolumeDescription> {
  let stat;
  try {
    stat = await fsp.stat(volPath, { bigint: true });
  } catch (err) {
    throw toIo(err, volPath);
  }
  const probe = await probeImage(volPath);
  let backing: BackingStoreXmlInput | null = null;
  if (probe.backing) {
    const format = await backingFormatForXml(probe.backing);
    let bst = null;
    if (probe.backing.type === 'file' && path.isAbsolute(probe.backing.path)) {
      // libvirt opens a backing file as a volume: only a regular file or a block device counts.
      const st = await fsp.stat(probe.backing.path, { bigint: true }).catch(() => null);
      if (st && (st.isFile() || st.isBlockDevice())) bst = statForXml(st);
    }
    backing = { path: probe.backing.path, format, stat: bst };
  }
  return { probe, stat, backing };
}
