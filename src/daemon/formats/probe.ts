/**
 * Volume file format probing with libvirt 9.0's rules (its storage file probe and the dir
 * backend's volume refresh), reading at most MAX_HEADER bytes of a file.
 *
 * `probeBuffer` is a pure function of the header bytes and the file size; `probeImage` opens a
 * path (or takes a FileHandle), reads the header and calls it. Header contents never make either
 * throw: what libvirt would report is returned, and whatever is wrong with the header is listed in
 * `issues` (stable codes). Only I/O fails with a SparsevirtError.
 *
 * The rules, as libvirt 9.0 applies them:
 * - the format is the first of none, raw, dir, bochs, cloop, dmg, iso, vpc, vdi, fat, vhd, ploop,
 *   cow, qcow, qcow2, qed, vmdk whose magic matches and whose version is known; anything else is
 *   raw (a known magic with an unknown version is raw too);
 * - the capacity is the header's virtual size when the header has one and it is not zero, else
 *   the file size; a raw LUKS file's capacity is its size less the LUKS payload offset;
 * - a qcow2 header with a backing name that cannot be read (offset past the bytes read, length
 *   over 1023, a backing-format extension naming no format libvirt knows) loses its backing name
 *   or format, and then also its compat level and features;
 * - a qcow2 v3 header of 32..99 bytes without a backing file makes libvirt fail the refresh of
 *   the whole pool ("An error occurred, but the cause is unknown"); here it is issue
 *   QCOW2_V3_TRUNCATED and no features;
 * - a relative backing name is joined to the image's directory as `dir + '/' + name`, without
 *   normalising `..` or `.`; a name with a ':' before any '/' is a network source (json: with a
 *   plain file inside is a file, kept as written), which libvirt shows as written, format raw.
 */
import fsp, { type FileHandle } from 'node:fs/promises';
import { constants as FS } from 'node:fs';
import path from 'node:path';
import { SparsevirtError } from '../../errors.js';

/** libvirt's VIR_STORAGE_MAX_HEADER: bytes read from a file to probe it (ISO's magic is at 32769). */
export const MAX_HEADER = 0x8200;

/** libvirt 9.0's virStorageFileFormat names, in its probing order. */
export const IMAGE_FORMATS = [
  'none', 'raw', 'dir', 'bochs', 'cloop', 'dmg', 'iso', 'vpc', 'vdi', 'fat', 'vhd', 'ploop',
  'cow', 'qcow', 'qcow2', 'qed', 'vmdk',
] as const;
export type ImageFormat = (typeof IMAGE_FORMATS)[number];

export function isImageFormat(s: string): s is ImageFormat {
  return (IMAGE_FORMATS as readonly string[]).includes(s);
}

/** Stable codes for what is wrong with a header. */
export type ProbeIssueCode =
  /** a known magic with a version libvirt does not know: probed as raw */
  | 'UNKNOWN_VERSION'
  /** the header ends before a field libvirt needs (capacity, backing name) */
  | 'HEADER_TRUNCATED'
  /** a qcow2 v3 header of 32..99 bytes: libvirt 9.0 fails the whole pool refresh on it */
  | 'QCOW2_V3_TRUNCATED'
  /** virtual size times the format's multiplier overflows 64 bits */
  | 'CAPACITY_OVERFLOW'
  /** qcow2 cluster bits outside qemu's 9..21 */
  | 'CLUSTER_BITS_INVALID'
  /** the backing name's offset or length is past the bytes read, or longer than allowed */
  | 'BACKING_NAME_INVALID'
  /** the backing-format header extension names no format libvirt knows */
  | 'BACKING_FORMAT_INVALID'
  /** a backing name with a NUL before its recorded end (cut there, as C does) */
  | 'BACKING_NAME_NUL'
  /** the VMDK descriptor has an unterminated parentFileNameHint */
  | 'DESCRIPTOR_INVALID';

export interface ProbeIssue {
  code: ProbeIssueCode;
  message: string;
}

export interface BackingStore {
  /** The name as the header stores it (up to its first NUL). */
  name: string;
  /** 'file' for a local path, 'network' for a protocol source (nbd:, http://, json: …). */
  type: 'file' | 'network';
  /**
   * For a file: the name joined to the image's directory as libvirt does (`dir + '/' + name`,
   * not normalised), or the name itself when absolute (or a file inside `json:`). For a network
   * source: the name.
   */
  path: string;
  /**
   * The backing format the image records: a qcow2 backing-format extension, QED's "no probe"
   * flag (raw); 'raw' for a network source (what libvirt shows); null when the image records none
   * (libvirt then probes the backing file for the volume XML).
   */
  format: ImageFormat | null;
  /** True for QED without the "no probe" flag: libvirt's AUTO_SAFE (only a probe without backing is acceptable). */
  probeSafeOnly: boolean;
}

export interface ProbeResult {
  format: ImageFormat;
  /** The volume's capacity as libvirt reports it (virtual size, or the file size, see above). */
  capacity: bigint;
  /** The virtual size read from the header (after the format's multiplier), null if none was read. */
  headerCapacity: bigint | null;
  /** qcow2's cluster size, null when not known (libvirt then prints no <clusterSize>). */
  clusterSize: bigint | null;
  /** qcow2 header version (2 or 3) or other formats' version field where they have one. */
  version: number | null;
  /** '1.1' for a qcow2 v3 whose features were read; null otherwise (libvirt prints no <compat>). */
  compat: '1.1' | null;
  /** Set exactly when libvirt has a features bitmap (qcow2 v3): <features/> even when empty. */
  features: { lazyRefcounts: boolean; extendedL2: boolean } | null;
  encryption: { format: 'qcow' | 'luks'; payloadOffset: bigint | null } | null;
  backing: BackingStore | null;
  issues: ProbeIssue[];
  /** Bytes of header read. */
  headerLength: number;
  fileSize: bigint;
}

export interface ProbeContext {
  /** The file size (st_size). */
  fileSize: bigint;
  /** The image's path: relative backing names are resolved against its directory. */
  path?: string;
}

// ------------------------------------------------------------------ the format table

interface FormatInfo {
  format: ImageFormat;
  magicOffset: number;
  magic: Uint8Array;
  littleEndian: boolean;
  /** -2: no version to check; else the offset of a 4-byte version */
  versionOffset: number;
  versions: number[];
  /** -1: the capacity is the file size */
  sizeOffset: number;
  sizeMultiplier: bigint;
}

const bytes = (s: string): Uint8Array => Uint8Array.from(s, (c) => c.charCodeAt(0));

/** Formats with a magic, in libvirt's enum order (the others never match). */
const TABLE: FormatInfo[] = [
  { format: 'iso', magicOffset: 32769, magic: bytes('CD001'), littleEndian: true, versionOffset: -2, versions: [], sizeOffset: -1, sizeMultiplier: 1n },
  { format: 'vpc', magicOffset: 0, magic: bytes('conectix'), littleEndian: false, versionOffset: 12, versions: [0x10000], sizeOffset: 40, sizeMultiplier: 1n },
  { format: 'vdi', magicOffset: 64, magic: bytes('\x7f\x10\xda\xbe'), littleEndian: true, versionOffset: 68, versions: [0x00010001], sizeOffset: 368, sizeMultiplier: 1n },
  { format: 'ploop', magicOffset: 0, magic: bytes('WithouFreSpacExt'), littleEndian: true, versionOffset: -2, versions: [], sizeOffset: 36, sizeMultiplier: 512n },
  { format: 'cow', magicOffset: 0, magic: bytes('OOOM'), littleEndian: false, versionOffset: 4, versions: [2], sizeOffset: 1036, sizeMultiplier: 1n },
  { format: 'qcow', magicOffset: 0, magic: bytes('QFI'), littleEndian: false, versionOffset: 4, versions: [1], sizeOffset: 24, sizeMultiplier: 1n },
  { format: 'qcow2', magicOffset: 0, magic: bytes('QFI'), littleEndian: false, versionOffset: 4, versions: [2, 3], sizeOffset: 24, sizeMultiplier: 1n },
  { format: 'qed', magicOffset: 0, magic: bytes('QED'), littleEndian: true, versionOffset: -2, versions: [], sizeOffset: 48, sizeMultiplier: 1n },
  { format: 'vmdk', magicOffset: 0, magic: bytes('KDMV'), littleEndian: true, versionOffset: 4, versions: [1, 2, 3], sizeOffset: 12, sizeMultiplier: 512n },
];

const LUKS_MAGIC = bytes('LUKS\xba\xbe');
const QCOW2_EXT_END = 0;
const QCOW2_EXT_BACKING_FORMAT = 0xe2792aca;
/** qcow2 v3: where the header length is stored; the features come before it. */
const QCOW2_V3_HEADER_LENGTH_OFFSET = 100;
const QCOW2_V2_HEADER_SIZE = 72;
const U64_MAX = (1n << 64n) - 1n;

// ------------------------------------------------------------------ reading the header

/**
 * The header as libvirt holds it: MAX_HEADER zeroed bytes with the `length` bytes read at the
 * start. Reads past `length` see zeros, reads past MAX_HEADER too (libvirt never makes those).
 */
class Header {
  readonly buf: Uint8Array;
  readonly length: number;
  private readonly view: DataView;
  constructor(data: Uint8Array) {
    this.length = Math.min(data.length, MAX_HEADER);
    this.buf = new Uint8Array(MAX_HEADER);
    this.buf.set(data.subarray(0, this.length));
    this.view = new DataView(this.buf.buffer);
  }
  private ok(off: number, n: number): boolean {
    return Number.isSafeInteger(off) && off >= 0 && off + n <= MAX_HEADER;
  }
  u16(off: number, le: boolean): number {
    return this.ok(off, 2) ? this.view.getUint16(off, le) : 0;
  }
  u32(off: number, le: boolean): number {
    return this.ok(off, 4) ? this.view.getUint32(off, le) : 0;
  }
  u64(off: number, le: boolean): bigint {
    return this.ok(off, 8) ? this.view.getBigUint64(off, le) : 0n;
  }
  matches(off: number, magic: Uint8Array): boolean {
    if (off + magic.length > this.length) return false;
    for (let i = 0; i < magic.length; i++) if (this.buf[off + i] !== magic[i]) return false;
    return true;
  }
  /** A C string of at most `max` bytes starting at `off`: [text, whether a NUL cut it]. */
  cstring(off: number, max: number): [string, boolean] {
    const end = Math.min(off + max, MAX_HEADER);
    let i = off;
    while (i < end && this.buf[i] !== 0) i++;
    return [decodeName(this.buf.subarray(off, i)), i < end];
  }
}

/** Header names are bytes; UTF-8 when they are valid UTF-8, else each byte as one code point. */
function decodeName(b: Uint8Array): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(b);
  } catch {
    return Buffer.from(b).toString('latin1');
  }
}

function versionMatches(h: Header, info: FormatInfo): { ok: boolean; version: number | null } {
  if (info.versionOffset === -2) return { ok: true, version: null };
  if (info.versionOffset + 4 > h.length) return { ok: false, version: null };
  const v = h.u32(info.versionOffset, info.littleEndian);
  return { ok: info.versions.includes(v), version: v };
}

// ------------------------------------------------------------------ backing names

/** libvirt's virStorageIsFile: a ':' before any '/' marks a protocol (nbd:, rbd:, json:, http://). */
export function isNetworkName(name: string): boolean {
  const colon = name.indexOf(':');
  if (colon < 0) return false;
  const slash = name.indexOf('/');
  return slash < 0 || colon < slash;
}

/**
 * A `json:` pseudo-protocol name that describes a plain local file ({"file": {"driver": "file",
 * "filename": …}}, the dotted form, or that wrapped in a "raw" driver): its filename, else null.
 */
export function jsonBackingFile(name: string): string | null {
  if (!name.startsWith('json:')) return null;
  let obj: unknown;
  try {
    obj = JSON.parse(name.slice(5));
  } catch {
    return null;
  }
  const unflatten = (o: unknown): unknown => {
    if (!o || typeof o !== 'object' || Array.isArray(o)) return o;
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(o as Record<string, unknown>)) {
      const parts = k.split('.');
      let cur = out;
      for (let i = 0; i < parts.length - 1; i++) {
        const p = parts[i]!;
        const next = cur[p];
        if (!next || typeof next !== 'object') cur[p] = {};
        cur = cur[p] as Record<string, unknown>;
      }
      cur[parts[parts.length - 1]!] = unflatten(v);
    }
    return out;
  };
  let node = unflatten(obj) as Record<string, unknown> | null;
  for (let hop = 0; hop < 3 && node && typeof node === 'object'; hop++) {
    if (node.driver === 'file') return typeof node.filename === 'string' ? node.filename : null;
    const inner = node.file;
    if ((node.driver === undefined || node.driver === 'raw') && inner && typeof inner === 'object') {
      node = inner as Record<string, unknown>;
      continue;
    }
    return null;
  }
  return null;
}

/** Where libvirt puts a relative backing name: the image's directory + '/' + name, as strings. */
export function resolveBackingName(imagePath: string, name: string): string {
  if (path.isAbsolute(name)) return name;
  const dir = path.dirname(imagePath);
  return dir === '/' ? `/${name}` : `${dir}/${name}`;
}

function makeBacking(name: string, format: ImageFormat | null, probeSafeOnly: boolean, imagePath: string | undefined): BackingStore {
  if (isNetworkName(name)) {
    const file = jsonBackingFile(name);
    if (file !== null) return { name, type: 'file', path: file, format, probeSafeOnly };
    return { name, type: 'network', path: name, format: 'raw', probeSafeOnly: false };
  }
  return {
    name,
    type: 'file',
    path: imagePath === undefined ? name : resolveBackingName(imagePath, name),
    format,
    probeSafeOnly,
  };
}

// ------------------------------------------------------------------ per format

type BackingOutcome =
  | { kind: 'ok'; name: string | null; format: ImageFormat | null; safeOnly?: boolean; note?: ProbeIssue }
  /** libvirt's BACKING_STORE_INVALID: stop reading the header; a name found before stays */
  | { kind: 'invalid'; name: string | null; format: ImageFormat | null; issue: ProbeIssue };

function invalid(code: ProbeIssueCode, message: string, name: string | null = null, format: ImageFormat | null = null): BackingOutcome {
  return { kind: 'invalid', name, format, issue: { code, message } };
}

/** qcow2 header extensions between the header and the backing name, walked as libvirt walks them. */
function qcow2BackingFormat(h: Header): { ok: true; format: ImageFormat | null } | { ok: false; format: ImageFormat | null; text: string } {
  const version = h.u32(4, false);
  if (version < 2) return { ok: true, format: null };
  const start = version === 2 ? QCOW2_V2_HEADER_SIZE : h.u32(QCOW2_V3_HEADER_LENGTH_OFFSET, false);
  const end = Number(h.u64(8, false)); // checked ≤ length by the caller
  const limitBuf = h.length - 8;
  const limitExt = end < 8 ? Infinity : end - 8; // size_t arithmetic in libvirt: wraps to huge
  let offset = start;
  let format: ImageFormat | null = null;
  // Each step moves forward by at least 8 bytes and stays below the header length: bounded.
  while (offset < limitBuf && offset < limitExt) {
    const magic = h.u32(offset, false);
    const len = h.u32(offset + 4, false);
    offset += 8;
    if (offset + len > h.length) break;
    if (magic === QCOW2_EXT_BACKING_FORMAT) {
      const [text] = h.cstring(offset, len);
      const idx = (IMAGE_FORMATS as readonly string[]).indexOf(text);
      if (idx <= 0) {
        // libvirt keeps what it parsed: 'none' stays the backing format, anything unknown is "probe"
        return { ok: false, format: idx === 0 ? 'none' : null, text };
      }
      format = IMAGE_FORMATS[idx]!;
    } else if (magic === QCOW2_EXT_END) {
      return { ok: true, format };
    }
    offset += len;
  }
  return { ok: true, format };
}

function qcowBacking(h: Header): BackingOutcome {
  if (h.length < 20) return invalid('HEADER_TRUNCATED', 'header too short for the backing file fields');
  const offset = h.u64(8, false);
  if (offset > BigInt(h.length)) {
    return invalid('BACKING_NAME_INVALID', `backing file name offset ${offset} is past the ${h.length} header bytes read`);
  }
  if (offset === 0n) return { kind: 'ok', name: null, format: null };
  const size = h.u32(16, false);
  if (size === 0) return { kind: 'ok', name: null, format: null };
  if (size > 1023) return invalid('BACKING_NAME_INVALID', `backing file name length ${size} is over 1023`);
  const off = Number(offset);
  if (off + size > h.length) {
    return invalid('BACKING_NAME_INVALID', `backing file name (${size} bytes at ${off}) ends past the ${h.length} header bytes read`);
  }
  const [name, cut] = h.cstring(off, size);
  const ext = qcow2BackingFormat(h);
  if (!ext.ok) {
    return invalid('BACKING_FORMAT_INVALID', `backing format extension names '${ext.text}', not a format`, name, ext.format);
  }
  if (cut) return { kind: 'ok', name, format: ext.format, note: { code: 'BACKING_NAME_NUL', message: 'backing file name holds a NUL before its recorded end' } };
  return { kind: 'ok', name, format: ext.format };
}

function cowBacking(h: Header): BackingOutcome {
  if (h.length < 8 + 1024) return invalid('HEADER_TRUNCATED', 'header too short for the COW backing file name');
  if (h.buf[8] === 0) return { kind: 'ok', name: null, format: null };
  const [name] = h.cstring(8, 1024);
  return { kind: 'ok', name, format: null };
}

function vmdkBacking(h: Header): BackingOutcome {
  if (h.length <= 0x200) return invalid('HEADER_TRUNCATED', 'header too short for the VMDK descriptor');
  const [desc] = h.cstring(0x200, Math.min(h.length - 0x200, MAX_HEADER - 1));
  const prefix = 'parentFileNameHint="';
  const at = desc.indexOf(prefix);
  if (at < 0) return { kind: 'ok', name: null, format: null };
  const start = at + prefix.length;
  const end = desc.indexOf('"', start);
  if (end < 0) return invalid('DESCRIPTOR_INVALID', 'unterminated parentFileNameHint in the VMDK descriptor');
  if (end === start) return { kind: 'ok', name: null, format: null };
  return { kind: 'ok', name: desc.slice(start, end), format: null };
}

function qedBacking(h: Header): BackingOutcome {
  if (h.length < 24) return invalid('HEADER_TRUNCATED', 'header too short for the QED feature flags');
  const flags = h.u64(16, true);
  if (!(flags & 1n)) return { kind: 'ok', name: null, format: null };
  if (h.length < 64) return invalid('HEADER_TRUNCATED', 'header too short for the QED backing file fields');
  const offset = h.u32(56, true);
  if (offset > h.length) return invalid('BACKING_NAME_INVALID', `backing file name offset ${offset} is past the ${h.length} header bytes read`);
  const size = h.u32(60, true);
  if (size === 0) return { kind: 'ok', name: null, format: null };
  if (offset + size > h.length) {
    return invalid('BACKING_NAME_INVALID', `backing file name (${size} bytes at ${offset}) ends past the ${h.length} header bytes read`);
  }
  const [name] = h.cstring(offset, size);
  return flags & 4n ? { kind: 'ok', name, format: 'raw' } : { kind: 'ok', name, format: null, safeOnly: true };
}

// ------------------------------------------------------------------ the probe

/** The format alone, as libvirt's virStorageFileProbeFormat (no stat: a directory is for the caller). */
export function probeFormatFromBuffer(data: Uint8Array): ImageFormat {
  const h = new Header(data);
  for (const info of TABLE) {
    if (h.matches(info.magicOffset, info.magic) && versionMatches(h, info).ok) return info.format;
  }
  return 'raw';
}

/** Probe a header (at most MAX_HEADER bytes are looked at). Pure; never throws on content. */
export function probeBuffer(data: Uint8Array, ctx: ProbeContext): ProbeResult {
  const h = new Header(data);
  const issues: ProbeIssue[] = [];
  const result: ProbeResult = {
    format: 'raw', capacity: ctx.fileSize, headerCapacity: null, clusterSize: null, version: null,
    compat: null, features: null, encryption: null, backing: null, issues, headerLength: h.length,
    fileSize: ctx.fileSize,
  };

  let info: FormatInfo | undefined;
  let wrongVersion: FormatInfo | undefined;
  for (const cand of TABLE) {
    if (!h.matches(cand.magicOffset, cand.magic)) continue;
    const v = versionMatches(h, cand);
    if (!v.ok) {
      wrongVersion = cand;
      continue;
    }
    info = cand;
    result.version = v.version;
    break;
  }
  if (!info && wrongVersion) {
    issues.push({ code: 'UNKNOWN_VERSION', message: `matches the ${wrongVersion.format} magic but not a version libvirt knows: raw` });
  }
  if (info) result.format = info.format;

  // encryption
  if (result.format === 'raw') {
    if (h.matches(0, LUKS_MAGIC) && 8 <= h.length && h.u16(6, false) === 1) {
      result.encryption = { format: 'luks', payloadOffset: BigInt(h.u32(104, false)) };
    }
  } else if (result.format === 'qcow' || result.format === 'qcow2') {
    const mode = result.format === 'qcow' ? 36 : 32;
    if (mode < h.length) {
      const m = h.u32(mode, false);
      if (m === 1) result.encryption = { format: 'qcow', payloadOffset: null };
      else if (m === 2 && result.format === 'qcow2') result.encryption = { format: 'luks', payloadOffset: null };
    }
  }

  finishCapacity(result);
  if (!info) return result;

  // capacity
  if (info.sizeOffset !== -1) {
    if (info.sizeOffset + 8 > h.length) {
      issues.push({ code: 'HEADER_TRUNCATED', message: `header ends before the virtual size (${h.length} bytes read)` });
      return finishCapacity(result);
    }
    const raw = h.u64(info.sizeOffset, info.littleEndian);
    if (raw > U64_MAX / info.sizeMultiplier) {
      result.headerCapacity = raw;
      issues.push({ code: 'CAPACITY_OVERFLOW', message: `virtual size ${raw} × ${info.sizeMultiplier} overflows 64 bits` });
      return finishCapacity(result);
    }
    result.headerCapacity = raw * info.sizeMultiplier;
  }

  // cluster size
  if (info.format === 'qcow2' && 24 <= h.length) {
    const bits = h.u32(20, false) | 0; // libvirt reads it into an int
    if (bits > 0) result.clusterSize = 1n << BigInt(bits & 63); // x86 shift semantics, as libvirt gets
    if (bits < 9 || bits > 21) issues.push({ code: 'CLUSTER_BITS_INVALID', message: `cluster bits ${h.u32(20, false)} outside 9..21` });
  }

  // backing store
  let outcome: BackingOutcome | null = null;
  if (info.format === 'qcow' || info.format === 'qcow2') outcome = qcowBacking(h);
  else if (info.format === 'cow') outcome = cowBacking(h);
  else if (info.format === 'vmdk') outcome = vmdkBacking(h);
  else if (info.format === 'qed') outcome = qedBacking(h);
  if (outcome) {
    if (outcome.name !== null) {
      const safeOnly = outcome.kind === 'ok' && outcome.safeOnly === true;
      result.backing = makeBacking(outcome.name, outcome.format, safeOnly, ctx.path);
    }
    if (outcome.kind === 'ok' && outcome.note) issues.push(outcome.note);
    if (outcome.kind === 'invalid') {
      issues.push(outcome.issue);
      return finishCapacity(result);
    }
  }

  // features (qcow2 v3)
  if (info.format === 'qcow2' && h.u32(4, false) !== 2) {
    if (h.length < QCOW2_V3_HEADER_LENGTH_OFFSET) {
      issues.push({
        code: 'QCOW2_V3_TRUNCATED',
        message: `qcow2 v3 header of ${h.length} bytes ends before its feature fields (libvirt 9.0 fails the pool refresh on it)`,
      });
      return finishCapacity(result);
    }
    const incompatible = h.u64(72, false);
    const compatible = h.u64(80, false);
    result.features = { lazyRefcounts: (compatible & 1n) !== 0n, extendedL2: (incompatible & 16n) !== 0n };
    result.compat = '1.1';
  }
  return finishCapacity(result);
}

/** The capacity libvirt reports: a non-zero header size, else the file size; less a LUKS payload. */
function finishCapacity(r: ProbeResult): ProbeResult {
  let cap = r.headerCapacity !== null && r.headerCapacity !== 0n ? r.headerCapacity : r.fileSize;
  if (r.encryption?.payloadOffset != null) cap = BigInt.asUintN(64, cap - r.encryption.payloadOffset * 512n);
  r.capacity = cap;
  return r;
}

/** Read up to MAX_HEADER bytes from the start of an open file. */
export async function readHeader(fh: FileHandle, max = MAX_HEADER): Promise<Uint8Array> {
  const buf = Buffer.alloc(max);
  let got = 0;
  while (got < max) {
    const { bytesRead } = await fh.read(buf, got, max - got, got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return buf.subarray(0, got);
}

function ioError(err: unknown, what: string): SparsevirtError {
  const e = err as NodeJS.ErrnoException;
  if (e?.code === 'ENOENT') return new SparsevirtError('ERR_NOT_FOUND', `${what}: no such file`, { cause: err });
  if (e?.code === 'EACCES' || e?.code === 'EPERM') return new SparsevirtError('ERR_ACCESS_DENIED', `${what}: permission denied`, { cause: err });
  return new SparsevirtError('ERR_IO', `${what}: ${e?.message ?? String(err)}`, { cause: err });
}

export interface ProbeImageOptions {
  /** The path used to resolve relative backing names when `target` is a FileHandle. */
  path?: string;
}

/**
 * Probe a file: a path (opened read-only and non-blocking, so a FIFO can never hang it) or an
 * open FileHandle. A directory is format 'dir'. Anything but a regular file, a block device or a
 * directory is refused with ERR_UNSUPPORTED. I/O errors: ERR_NOT_FOUND, ERR_ACCESS_DENIED, ERR_IO.
 */
export async function probeImage(target: string | FileHandle, opts: ProbeImageOptions = {}): Promise<ProbeResult> {
  const imagePath = typeof target === 'string' ? target : opts.path;
  const what = imagePath ?? 'image';
  let fh: FileHandle;
  const own = typeof target === 'string';
  try {
    fh = own ? await fsp.open(target, FS.O_RDONLY | FS.O_NONBLOCK | FS.O_NOCTTY) : target;
  } catch (err) {
    throw ioError(err, what);
  }
  try {
    let st;
    try {
      st = await fh.stat({ bigint: true });
    } catch (err) {
      throw ioError(err, what);
    }
    if (st.isDirectory()) {
      return {
        format: 'dir', capacity: st.size, headerCapacity: null, clusterSize: null, version: null, compat: null,
        features: null, encryption: null, backing: null, issues: [], headerLength: 0, fileSize: st.size,
      };
    }
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new SparsevirtError('ERR_UNSUPPORTED', `${what}: not a regular file, block device or directory`);
    }
    let header: Uint8Array;
    try {
      header = await readHeader(fh);
    } catch (err) {
      throw ioError(err, what);
    }
    const size = st.isBlockDevice() ? await blockDeviceSize(fh, st.size) : st.size;
    return probeBuffer(header, { fileSize: size, ...(imagePath !== undefined ? { path: imagePath } : {}) });
  } finally {
    if (own) await fh.close().catch(() => undefined);
  }
}

/** Alias with the name the storage backend uses. */
export const probeFormat = probeImage;

async function blockDeviceSize(fh: FileHandle, fallback: bigint): Promise<bigint> {
  // st_size is 0 for block devices; the end of the device is where SEEK_END lands. Node has no
  // lseek, so read one byte at the largest offset a binary search finds to exist.
  if (fallback > 0n) return fallback;
  const one = Buffer.alloc(1);
  const exists = async (off: number): Promise<boolean> => (await fh.read(one, 0, 1, off)).bytesRead === 1;
  if (!(await exists(0))) return 0n;
  let lo = 0;
  let hi = 1;
  while (hi < 2 ** 52 && (await exists(hi))) {
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (await exists(mid)) lo = mid;
    else hi = mid;
  }
  return BigInt(lo + 1);
}
