/**
 * The volume XML libvirtd 9.0 gives (`vol-dumpxml`) for a file in a dir pool, from a probe result
 * and the file's stat: the `<target>` part (format, permissions, timestamps, encryption, compat,
 * clusterSize, features) and the volume-level `<backingStore>` (one level only, as libvirt).
 *
 * Shapes recorded from libvirtd 9.0:
 * - qcow2 v3: `<compat>1.1</compat>`, `<clusterSize unit='B'>65536</clusterSize>`, then
 *   `<features/>` when no feature is set, else `<features>` with `<lazy_refcounts/>` and/or
 *   `<extended_l2/>`; qcow2 v2: `<clusterSize>` only; raw and the rest: neither.
 * - encryption: `<encryption format='qcow'>` (or 'luks') and `</encryption>` on the next line,
 *   between `</timestamps>` and `<compat>`.
 * - `<physical>` is left out when the file size is 0.
 * - `<mode>` is `0` followed by the octal of st_mode & 0777 ("0644", "00", "07").
 * - a timestamp is `sec.nnnnnnnnn`, or `sec` alone when the nanoseconds are 0; `<btime>0</btime>`.
 * - `<backingStore>` holds `<path>` and `<format>`, then `<permissions>` and `<timestamps>` only when
 *   the backing file could be stat'ed (a missing one has neither).
 * - text is escaped as libvirt does: & < > ' " as entities, control characters other than tab,
 *   newline and carriage return dropped.
 */
import { escapeXml } from '../../xml.js';
import type { BigIntStats } from 'node:fs';
import type { ImageFormat, ProbeResult } from './probe.js';

/** What `<permissions>` and `<timestamps>` need from a stat. */
export interface FileStatXml {
  mode: bigint | number;
  uid: bigint | number;
  gid: bigint | number;
  atimeNs: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
}

export function statForXml(st: BigIntStats): FileStatXml {
  return { mode: st.mode, uid: st.uid, gid: st.gid, atimeNs: st.atimeNs, mtimeNs: st.mtimeNs, ctimeNs: st.ctimeNs };
}

function ts(tag: string, ns: bigint, indent: string): string {
  const sec = ns / 1_000_000_000n;
  const frac = ns % 1_000_000_000n;
  return `${indent}<${tag}>${sec}${frac !== 0n ? `.${frac.toString().padStart(9, '0')}` : ''}</${tag}>\n`;
}

/** `<permissions>` and `<timestamps>` at the given indent (4 spaces inside `<target>`). */
export function formatPermsAndTimes(st: FileStatXml, indent = '    '): string {
  const i2 = `${indent}  `;
  const mode = Number(BigInt(st.mode) & 0o777n);
  let s = `${indent}<permissions>\n`;
  s += `${i2}<mode>0${mode.toString(8)}</mode>\n`;
  s += `${i2}<owner>${st.uid}</owner>\n`;
  s += `${i2}<group>${st.gid}</group>\n`;
  s += `${indent}</permissions>\n`;
  s += `${indent}<timestamps>\n`;
  s += ts('atime', st.atimeNs, i2);
  s += ts('mtime', st.mtimeNs, i2);
  s += ts('ctime', st.ctimeNs, i2);
  s += `${i2}<btime>0</btime>\n`;
  s += `${indent}</timestamps>\n`;
  return s;
}

export interface TargetXmlInput {
  path: string;
  probe: ProbeResult;
  stat: FileStatXml;
}

/** The `<target>…</target>` block (2-space indent, as inside `<volume>`), with a trailing newline. */
export function formatTargetXml({ path, probe, stat }: TargetXmlInput): string {
  let s = `  <target>\n`;
  s += `    <path>${escapeXml(path)}</path>\n`;
  s += `    <format type='${probe.format}'/>\n`;
  s += formatPermsAndTimes(stat, '    ');
  if (probe.encryption) {
    s += `    <encryption format='${probe.encryption.format}'>\n    </encryption>\n`;
  }
  if (probe.compat) s += `    <compat>${probe.compat}</compat>\n`;
  if (probe.clusterSize !== null && probe.clusterSize !== 0n) {
    s += `    <clusterSize unit='B'>${probe.clusterSize}</clusterSize>\n`;
  }
  if (probe.features) {
    const list: string[] = [];
    if (probe.features.lazyRefcounts) list.push('lazy_refcounts');
    if (probe.features.extendedL2) list.push('extended_l2');
    if (list.length === 0) s += `    <features/>\n`;
    else s += `    <features>\n${list.map((f) => `      <${f}/>\n`).join('')}    </features>\n`;
  }
  s += `  </target>\n`;
  return s;
}

export interface BackingStoreXmlInput {
  /** The backing path as libvirt shows it (probe.backing.path). */
  path: string;
  /** The recorded format, or the probed one when the image records none. */
  format: ImageFormat;
  /** The backing file's stat; null when it could not be stat'ed (missing, network, relative). */
  stat: FileStatXml | null;
}

/** The volume-level `<backingStore>…</backingStore>` block, with a trailing newline. */
export function formatBackingStoreXml({ path, format, stat }: BackingStoreXmlInput): string {
  let s = `  <backingStore>\n`;
  s += `    <path>${escapeXml(path)}</path>\n`;
  s += `    <format type='${format}'/>\n`;
  if (stat) s += formatPermsAndTimes(stat, '    ');
  s += `  </backingStore>\n`;
  return s;
}

export interface VolumeXmlInput {
  name: string;
  /** The volume's path (also its key in a dir pool). */
  path: string;
  probe: ProbeResult;
  /** The volume file's stat (size, blocks, mode, owner, times). */
  stat: BigIntStats;
  backing?: BackingStoreXmlInput | null;
}

/** The whole `<volume>` document of a file volume in a dir pool, as `virsh vol-dumpxml` prints it. */
export function formatVolumeXml(v: VolumeXmlInput): string {
  const type = v.probe.format === 'ploop' ? 'ploop' : v.probe.format === 'dir' ? 'dir' : 'file';
  // libvirt 9.0 shows a ploop image file's size as its capacity (observed), not the header's.
  const capacity = v.probe.format === 'ploop' ? v.stat.size : v.probe.capacity;
  const physical = v.stat.size;
  let s = `<volume type='${type}'>\n`;
  s += `  <name>${escapeXml(v.name)}</name>\n`;
  s += `  <key>${escapeXml(v.path)}</key>\n`;
  s += `  <capacity unit='bytes'>${capacity}</capacity>\n`;
  s += `  <allocation unit='bytes'>${v.stat.blocks * 512n}</allocation>\n`;
  if (physical !== 0n) s += `  <physical unit='bytes'>${physical}</physical>\n`;
  s += formatTargetXml({ path: v.path, probe: v.probe, stat: statForXml(v.stat) });
  if (v.backing) s += formatBackingStoreXml(v.backing);
  s += `</volume>\n`;
  return s;
}
