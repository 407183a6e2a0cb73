/**
 * Helpers for the image format tests: crafted headers (qcow2 and the other formats probed),
 * a qemu-img gate (skips locally, fails in CI when qemu-img is missing), and XML normalisation
 * for comparing with libvirtd.
 */
import { execFileSync } from 'node:child_process';
import fsp from 'node:fs/promises';
import type { TestContext } from 'node:test';

export interface Qcow2Spec {
  version?: 2 | 3;
  size?: bigint;
  clusterBits?: number;
  crypt?: number;
  l1Size?: number;
  incompatible?: bigint;
  compatible?: bigint;
  /** v3 header length (default 104). */
  headerLength?: number;
  /** Backing file name and where to put it (default right after the extensions). */
  backing?: string | Uint8Array;
  backingOffset?: bigint;
  /** Recorded length of the backing name (default its byte length). */
  backingLength?: number;
  /** Backing-format extension text (none when undefined). */
  backingFormat?: string | Uint8Array;
  /** Extra raw extension bytes after the backing-format extension. */
  extraExtensions?: Uint8Array;
  /** Where extensions start (default: 72 for v2, headerLength for v3). */
  extensionOffset?: number;
  /** Total bytes written (default 4096). */
  fileLength?: number;
}

const enc = (s: string | Uint8Array): Uint8Array => (typeof s === 'string' ? Buffer.from(s, 'utf8') : s);

/** A qcow2 header as qemu lays it out (big-endian), with only what probing reads. */
export function qcow2Header(spec: Qcow2Spec = {}): Buffer {
  const version = spec.version ?? 3;
  const len = spec.fileLength ?? 4096;
  const b = Buffer.alloc(Math.max(len, 512));
  b.write('QFI\xfb', 0, 'latin1');
  b.writeUInt32BE(version, 4);
  b.writeUInt32BE(spec.clusterBits ?? 16, 20);
  b.writeBigUInt64BE(spec.size ?? 8n << 20n, 24);
  b.writeUInt32BE(spec.crypt ?? 0, 32);
  b.writeUInt32BE(spec.l1Size ?? 0, 36);
  const hdrLen = spec.headerLength ?? 104;
  if (version === 3) {
    b.writeBigUInt64BE(spec.incompatible ?? 0n, 72);
    b.writeBigUInt64BE(spec.compatible ?? 0n, 80);
    b.writeUInt32BE(4, 96);
    b.writeUInt32BE(hdrLen, 100);
  }
  let off = spec.extensionOffset ?? (version === 2 ? 72 : Math.max(hdrLen, 104));
  const exts: Buffer[] = [];
  if (spec.backingFormat !== undefined) {
    const d = enc(spec.backingFormat);
    const h = Buffer.alloc(8);
    h.writeUInt32BE(0xe2792aca, 0);
    h.writeUInt32BE(d.length, 4);
    exts.push(h, Buffer.from(d), Buffer.alloc((8 - (d.length % 8)) % 8));
  }
  if (spec.extraExtensions) exts.push(Buffer.from(spec.extraExtensions));
  exts.push(Buffer.alloc(8));
  const ext = Buffer.concat(exts);
  if (off + ext.length <= b.length) ext.copy(b, off);
  off += ext.length;
  if (spec.backing !== undefined) {
    const name = enc(spec.backing);
    const at = spec.backingOffset ?? BigInt(off);
    b.writeBigUInt64BE(at, 8);
    b.writeUInt32BE(spec.backingLength ?? name.length, 16);
    if (at + BigInt(name.length) <= BigInt(b.length)) Buffer.from(name).copy(b, Number(at));
  }
  return b.subarray(0, len);
}

/** A QED header (little-endian) with an optional backing file. */
export function qedHeader(o: { size?: bigint; backing?: string; noProbe?: boolean; fileLength?: number } = {}): Buffer {
  const b = Buffer.alloc(o.fileLength ?? 4096);
  b.write('QED\0', 0, 'latin1');
  b.writeUInt32LE(65536, 4); // cluster size
  b.writeUInt32LE(16, 8); // table size
  b.writeUInt32LE(1, 12); // header size in clusters
  let features = 0n;
  if (o.backing !== undefined) features |= 1n;
  if (o.noProbe) features |= 4n;
  b.writeBigUInt64LE(features, 16);
  b.writeBigUInt64LE(o.size ?? 8n << 20n, 48);
  if (o.backing !== undefined) {
    const name = Buffer.from(o.backing);
    b.writeUInt32LE(68, 56);
    b.writeUInt32LE(name.length, 60);
    name.copy(b, 68);
  }
  return b;
}

/** A monolithic sparse VMDK: the binary header and a descriptor at 0x200. */
export function vmdkHeader(o: { sectors?: bigint; descriptor?: string; version?: number } = {}): Buffer {
  const b = Buffer.alloc(4096);
  b.write('KDMV', 0, 'latin1');
  b.writeUInt32LE(o.version ?? 1, 4);
  b.writeBigUInt64LE(o.sectors ?? 16384n, 12);
  const desc = o.descriptor ?? '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicSparse"\n';
  b.write(desc, 0x200, 'latin1');
  return b;
}

export function vpcFooter(size: bigint): Buffer {
  const b = Buffer.alloc(512);
  b.write('conectix', 0, 'latin1');
  b.writeUInt32BE(0x10000, 12);
  b.writeBigUInt64BE(size, 40);
  b.writeBigUInt64BE(size, 48);
  return b;
}

export function vdiHeader(size: bigint): Buffer {
  const b = Buffer.alloc(1024);
  b.write('<<< QEMU VM Virtual Disk Image >>>\n', 0, 'latin1');
  b.writeUInt32LE(0xbeda107f, 64);
  b.writeUInt32LE(0x00010001, 68);
  b.writeBigUInt64LE(size, 368);
  return b;
}

export function isoImage(): Buffer {
  const b = Buffer.alloc(65536);
  b.write('CD001', 32769, 'latin1');
  return b;
}

export function luksHeader(payloadSectors: number, fileLength = 1 << 20): Buffer {
  const b = Buffer.alloc(fileLength);
  b.write('LUKS\xba\xbe', 0, 'latin1');
  b.writeUInt16BE(1, 6);
  b.writeUInt32BE(payloadSectors, 104);
  return b;
}

export function cowHeader(o: { size?: bigint; backing?: string } = {}): Buffer {
  const b = Buffer.alloc(2048);
  b.write('OOOM', 0, 'latin1');
  b.writeUInt32BE(2, 4);
  if (o.backing) b.write(o.backing, 8, 'latin1');
  b.writeBigUInt64BE(o.size ?? 8n << 20n, 1036);
  return b;
}

// ------------------------------------------------------------------ qemu-img

let qemuImgPath: string | null | undefined;

export function qemuImgOnPath(): string | null {
  if (qemuImgPath === undefined) {
    try {
      qemuImgPath = execFileSync('sh', ['-c', 'command -v qemu-img'], { encoding: 'utf8' }).trim() || null;
    } catch {
      qemuImgPath = null;
    }
  }
  return qemuImgPath;
}

/** Call first in a test that runs qemu-img: skips locally without it, fails in CI. */
export function requireQemuImg(t: TestContext): boolean {
  if (qemuImgOnPath()) return true;
  const hint = 'qemu-img is not installed (Debian package qemu-utils; scripts/setup-libvirt.sh installs it)';
  if (process.env.CI) throw new Error(`qemu-img is required in CI: ${hint}`);
  t.skip(hint);
  return false;
}

/**
 * Run qemu-img directly (test setup), throwing with its stderr. qemu 7.2 (Debian 12) times its
 * LUKS key derivation on the thread's CPU clock and gives up with "Unable to get accurate CPU
 * usage" when a round measures 0 ms (fixed in qemu 9.2.1): it depends on the machine's load, so
 * that one message is retried.
 */
export function qemuImg(...args: string[]): string {
  for (let attempt = 1; ; attempt++) {
    try {
      return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      const stderr = String((e as { stderr?: unknown }).stderr ?? '');
      if (attempt >= 8 || !stderr.includes('Unable to get accurate CPU usage')) throw e;
    }
  }
}

// ------------------------------------------------------------------ XML

/**
 * Normalise a volume XML for comparison: access times (reading a file moves them) and the given
 * directory (replaced by DIR).
 */
export function normaliseVolXml(xml: string, dir?: string): string {
  let s = xml.replace(/<atime>[^<]*<\/atime>/g, '<atime>T</atime>');
  if (dir) s = s.split(dir).join('DIR');
  return s;
}

export async function writeFile(p: string, data: Uint8Array): Promise<string> {
  await fsp.writeFile(p, data);
  return p;
}
