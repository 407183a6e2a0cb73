/**
 * Pool and volume XML: a small, strict XML reader for what clients send (pool-define-as,
 * vol-create-as), and formatters that print byte for byte what libvirt 9.0 prints for a dir
 * pool and a raw file volume (two-space indentation, single-quoted attributes, trailing newline).
 *
 * The reader knows elements, attributes, text, CDATA, comments, processing instructions and
 * the five predefined entities plus character references. A DOCTYPE is refused: no entity
 * expansion, no external anything.
 */
import { CODE, DOMAIN, storageError, virError } from './errors.js';

export interface XmlElement {
  name: string;
  attrs: Record<string, string>;
  children: XmlElement[];
  /** Concatenated text content directly inside this element. */
  text: string;
}

/** Parse a document; throws libvirt's XML_DETAIL error (code 35) with `(context):line: reason`. */
export function parseXml(src: string, context: string): XmlElement {
  let pos = 0;
  const fail = (reason: string): never => {
    const line = src.slice(0, pos).split('\n').length;
    throw virError(CODE.XML_DETAIL, DOMAIN.STORAGE, `(${context}):${line}: ${reason}`);
  };
  const skipMisc = (): void => {
    for (;;) {
      while (pos < src.length && /\s/.test(src[pos]!)) pos++;
      if (src.startsWith('<?', pos)) {
        const end = src.indexOf('?>', pos + 2);
        if (end < 0) fail('unterminated processing instruction');
        pos = end + 2;
      } else if (src.startsWith('<!--', pos)) {
        const end = src.indexOf('-->', pos + 4);
        if (end < 0) fail('unterminated comment');
        pos = end + 3;
      } else if (src.startsWith('<!', pos)) {
        fail('DOCTYPE and entity declarations are not accepted');
      } else return;
    }
  };
  const NAME = /[A-Za-z_:][-A-Za-z0-9_.:]*/y;
  const readName = (): string => {
    NAME.lastIndex = pos;
    const m = NAME.exec(src);
    if (!m) return fail('expected a name');
    pos += m[0].length;
    return m[0];
  };
  const decode = (s: string): string =>
    s.replace(/&(#x[0-9a-fA-F]+|#[0-9]+|[a-z]+);|&/g, (whole, ent?: string) => {
      if (ent === undefined) return fail("unescaped '&'");
      if (ent === 'lt') return '<';
      if (ent === 'gt') return '>';
      if (ent === 'amp') return '&';
      if (ent === 'apos') return "'";
      if (ent === 'quot') return '"';
      if (ent.startsWith('#')) {
        const n = ent[1] === 'x' ? Number.parseInt(ent.slice(2), 16) : Number.parseInt(ent.slice(1), 10);
        if (!Number.isFinite(n) || n <= 0 || n > 0x10ffff) return fail(`invalid character reference ${whole}`);
        return String.fromCodePoint(n);
      }
      return fail(`unknown entity ${whole}`);
    });
  const readElement = (depth: number): XmlElement => {
    if (depth > 64) fail('elements nested too deeply');
    if (src[pos] !== '<') fail("expected '<'");
    pos++;
    const name = readName();
    const el: XmlElement = { name, attrs: {}, children: [], text: '' };
    for (;;) {
      const before = pos;
      while (pos < src.length && /\s/.test(src[pos]!)) pos++;
      if (src.startsWith('/>', pos)) {
        pos += 2;
        return el;
      }
      if (src[pos] === '>') {
        pos++;
        break;
      }
      if (pos >= src.length) fail(`Premature end of data in tag ${name}`);
      if (pos === before) fail("expected '>'");
      const attr = readName();
      while (pos < src.length && /\s/.test(src[pos]!)) pos++;
      if (src[pos] !== '=') fail(`Specification mandates value for attribute ${attr}`);
      pos++;
      while (pos < src.length && /\s/.test(src[pos]!)) pos++;
      const q = src[pos];
      if (q !== '"' && q !== "'") fail('AttValue: " or \' expected');
      const end = src.indexOf(q!, pos + 1);
      if (end < 0) fail('AttValue: unterminated');
      const raw = src.slice(pos + 1, end);
      if (raw.includes('<')) fail("Unescaped '<' not allowed in attributes values");
      if (Object.hasOwn(el.attrs, attr)) fail(`Attribute ${attr} redefined`);
      el.attrs[attr] = decode(raw);
      pos = end + 1;
    }
    for (;;) {
      if (pos >= src.length) fail(`Premature end of data in tag ${name}`);
      if (src.startsWith('</', pos)) {
        pos += 2;
        const close = readName();
        if (close !== name) fail(`Opening and ending tag mismatch: ${name} and ${close}`);
        while (pos < src.length && /\s/.test(src[pos]!)) pos++;
        if (src[pos] !== '>') fail("expected '>'");
        pos++;
        return el;
      }
      if (src.startsWith('<!--', pos)) {
        const end = src.indexOf('-->', pos + 4);
        if (end < 0) fail('unterminated comment');
        pos = end + 3;
      } else if (src.startsWith('<![CDATA[', pos)) {
        const end = src.indexOf(']]>', pos + 9);
        if (end < 0) fail('unterminated CDATA section');
        el.text += src.slice(pos + 9, end);
        pos = end + 3;
      } else if (src.startsWith('<?', pos)) {
        const end = src.indexOf('?>', pos + 2);
        if (end < 0) fail('unterminated processing instruction');
        pos = end + 2;
      } else if (src[pos] === '<') {
        el.children.push(readElement(depth + 1));
      } else {
        const next = src.indexOf('<', pos);
        const end = next < 0 ? src.length : next;
        el.text += decode(src.slice(pos, end));
        pos = end;
      }
    }
  };
  skipMisc();
  if (pos >= src.length) fail('Document is empty');
  const root = readElement(0);
  skipMisc();
  if (pos < src.length) fail('Extra content at the end of the document');
  return root;
}

export function child(el: XmlElement | undefined, name: string): XmlElement | undefined {
  return el?.children.find((c) => c.name === name);
}

/** Text of the element at a path of child names, trimmed; undefined when absent. */
export function textAt(el: XmlElement | undefined, ...path: string[]): string | undefined {
  let cur = el;
  for (const p of path) cur = child(cur, p);
  return cur === undefined ? undefined : cur.text.trim();
}

export function escapeXml(s: string): string {
  return s.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);
}

// ------------------------------------------------------------------ scaled integers

const SCALE: Record<string, number> = { k: 1, m: 2, g: 3, t: 4, p: 5, e: 6 };

/**
 * libvirt's virScaleInteger for `<capacity unit='…'>`: b/byte/bytes, K/KiB (1024), KB (1000),
 * up to E/EiB/EB. The result must fit 2^53 (sparsevirt's byte counts).
 */
export function scaledBytes(value: string, unit: string | undefined, what: string): number {
  if (!/^\s*[0-9]+\s*$/.test(value)) throw storageError(CODE.XML_ERROR, `malformed ${what} element`);
  let n = BigInt(value.trim());
  const u = (unit ?? '').trim();
  if (u !== '' && !/^(b|bytes?)$/i.test(u)) {
    const power = SCALE[u[0]!.toLowerCase()];
    const rest = u.slice(1).toLowerCase();
    let base: bigint;
    if (power === undefined) throw storageError(CODE.INVALID_ARG, `unknown suffix '${u}'`);
    if (rest === '' || rest === 'ib') base = 1024n;
    else if (rest === 'b') base = 1000n;
    else throw storageError(CODE.INVALID_ARG, `unknown suffix '${u}'`);
    n *= base ** BigInt(power);
  }
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw storageError(CODE.OPERATION_UNSUPPORTED, `${what} ${n} is larger than sparsevirtd supports (2^53 bytes)`);
  }
  return Number(n);
}

// ------------------------------------------------------------------ pools

export interface PoolXmlDef {
  name: string;
  uuid: string | null;
  type: string;
  target: string;
  /** `<target><permissions><mode>` if given (applied by build). */
  mode: number | null;
}

/** libvirt's pool types, in its order. */
export const POOL_TYPES: readonly string[] = ['dir', 'fs', 'netfs', 'logical', 'disk', 'iscsi', 'iscsi-direct', 'scsi', 'mpath', 'rbd', 'sheepdog', 'gluster', 'zfs', 'vstorage'];

/**
 * Collapse repeated slashes and drop a trailing one, as libvirt's virFileSanitizePath; a path
 * that starts with exactly two slashes keeps them (POSIX gives `//` a meaning of its own).
 */
export function sanitizePath(p: string): string {
  const lead = /^\/\/(?!\/)/.test(p) ? '/' : '';
  let s = p.replace(/\/{2,}/g, '/');
  if (s.length > 1 && s.endsWith('/')) s = s.slice(0, -1);
  return lead + s;
}

export function parsePoolXml(xml: string): PoolXmlDef {
  const root = parseXml(xml, 'storage_pool_definition');
  if (root.name !== 'pool') {
    throw storageError(CODE.XML_ERROR, `unknown root element for storage pool`);
  }
  const type = root.attrs.type;
  if (type === undefined) throw virError(CODE.XML_ERROR, DOMAIN.XML, "Missing required attribute 'type' in element 'pool'");
  if (!POOL_TYPES.includes(type)) throw virError(CODE.XML_ERROR, DOMAIN.XML, `Invalid value for attribute 'type' in element 'pool': '${type}'.`);
  const name = textAt(root, 'name');
  if (!name) throw storageError(CODE.XML_ERROR, 'missing pool source name element');
  if (name.includes('/')) throw storageError(CODE.XML_ERROR, `name ${name} cannot contain '/'`);
  if (name.includes('\0')) throw storageError(CODE.XML_ERROR, 'name cannot contain a NUL byte');
  const uuidText = textAt(root, 'uuid');
  let uuid: string | null = null;
  if (uuidText) {
    const hex = uuidText.replace(/[-\s]/g, '').toLowerCase();
    if (!/^[0-9a-f]{32}$/.test(hex)) throw storageError(CODE.XML_ERROR, 'malformed uuid element');
    uuid = `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }
  if (type !== 'dir') {
    throw storageError(CODE.CONFIG_UNSUPPORTED, `sparsevirtd supports only 'dir' storage pools, not '${type}'`);
  }
  const target = textAt(root, 'target', 'path');
  if (!target) throw storageError(CODE.XML_ERROR, 'missing storage pool target path');
  if (!target.startsWith('/')) throw storageError(CODE.XML_ERROR, `storage pool target path '${target}' must be absolute`);
  if (target.includes('\0')) throw storageError(CODE.XML_ERROR, 'storage pool target path cannot contain a NUL byte');
  const modeText = textAt(root, 'target', 'permissions', 'mode');
  let mode: number | null = null;
  if (modeText) {
    if (!/^[0-7]{1,4}$/.test(modeText)) throw storageError(CODE.XML_ERROR, `malformed octal mode '${modeText}'`);
    mode = Number.parseInt(modeText, 8);
  }
  return { name, uuid, type, target: sanitizePath(target), mode };
}

export interface PoolXmlState {
  name: string;
  uuid: string;
  target: string;
  capacity: number | bigint;
  allocation: number | bigint;
  available: number | bigint;
  /** Permissions of the target as last seen by a refresh (libvirt omits them before that). */
  perms: { mode: number; owner: number; group: number } | null;
}

export function formatPoolXml(p: PoolXmlState): string {
  let s = `<pool type='dir'>\n`;
  s += `  <name>${escapeXml(p.name)}</name>\n`;
  s += `  <uuid>${p.uuid}</uuid>\n`;
  s += `  <capacity unit='bytes'>${p.capacity}</capacity>\n`;
  s += `  <allocation unit='bytes'>${p.allocation}</allocation>\n`;
  s += `  <available unit='bytes'>${p.available}</available>\n`;
  s += `  <source>\n  </source>\n`;
  s += `  <target>\n    <path>${escapeXml(p.target)}</path>\n`;
  if (p.perms) {
    s += `    <permissions>\n`;
    s += `      <mode>${octal(p.perms.mode)}</mode>\n`;
    s += `      <owner>${p.perms.owner}</owner>\n`;
    s += `      <group>${p.perms.group}</group>\n`;
    s += `    </permissions>\n`;
  }
  s += `  </target>\n</pool>\n`;
  return s;
}

function octal(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, '0');
}

// ------------------------------------------------------------------ volumes

export interface VolXmlDef {
  name: string;
  /** null only when the caller allowed it to be absent (a clone takes its source's). */
  capacity: number | null;
  /** undefined when `<allocation>` is absent. */
  allocation: number | undefined;
  format: string;
}

const VOL_FORMATS = new Set(['raw', 'dir', 'bochs', 'cloop', 'dmg', 'iso', 'vpc', 'vdi', 'fat', 'vhd', 'ploop', 'cow', 'qcow', 'qcow2', 'qed', 'vmdk']);

export function parseVolXml(xml: string, opts: { capacityOptional?: boolean } = {}): VolXmlDef {
  const root = parseXml(xml, 'storage_volume_definition');
  if (root.name !== 'volume') throw storageError(CODE.XML_ERROR, 'unknown root element for storage volume');
  const nameEl = child(root, 'name');
  // Not trimmed: a name is used as a file name as it is.
  const name = nameEl?.text ?? '';
  if (name === '') throw storageError(CODE.XML_ERROR, 'missing volume name element');
  const capEl = child(root, 'capacity');
  if (!capEl && !opts.capacityOptional) throw storageError(CODE.XML_ERROR, 'missing capacity element');
  const capacity = capEl ? scaledBytes(capEl.text, capEl.attrs.unit, 'capacity') : null;
  const allocEl = child(root, 'allocation');
  const allocation = allocEl ? scaledBytes(allocEl.text, allocEl.attrs.unit, 'allocation') : undefined;
  const formatEl = child(child(root, 'target'), 'format');
  const format = formatEl?.attrs.type ?? 'raw';
  if (!VOL_FORMATS.has(format)) throw storageError(CODE.CONFIG_UNSUPPORTED, `unknown volume format type ${format}`);
  if (format !== 'raw') throw storageError(CODE.CONFIG_UNSUPPORTED, `sparsevirtd supports only raw volumes, not '${format}'`);
  const type = root.attrs.type;
  if (type !== undefined && type !== 'file') throw storageError(CODE.CONFIG_UNSUPPORTED, `sparsevirtd supports only file volumes, not '${type}'`);
  return { name, capacity, allocation, format };
}

export interface VolXmlState {
  name: string;
  path: string;
  capacity: number;
  allocation: number;
  mode: number;
  owner: number;
  group: number;
  /** [seconds, nanoseconds] */
  atime: [bigint, bigint];
  mtime: [bigint, bigint];
  ctime: [bigint, bigint];
}

/** libvirt's virStorageVolTimestampFormat: seconds, then `.%09ld` only if nanoseconds ≠ 0. */
function timestamp(tag: string, [sec, nsec]: [bigint, bigint]): string {
  return `      <${tag}>${sec}${nsec !== 0n ? `.${nsec.toString().padStart(9, '0')}` : ''}</${tag}>\n`;
}

export function formatVolXml(v: VolXmlState): string {
  let s = `<volume type='file'>\n`;
  s += `  <name>${escapeXml(v.name)}</name>\n`;
  s += `  <key>${escapeXml(v.path)}</key>\n`;
  s += `  <capacity unit='bytes'>${v.capacity}</capacity>\n`;
  s += `  <allocation unit='bytes'>${v.allocation}</allocation>\n`;
  s += `  <physical unit='bytes'>${v.capacity}</physical>\n`;
  s += `  <target>\n`;
  s += `    <path>${escapeXml(v.path)}</path>\n`;
  s += `    <format type='raw'/>\n`;
  s += `    <permissions>\n`;
  s += `      <mode>${octal(v.mode)}</mode>\n`;
  s += `      <owner>${v.owner}</owner>\n`;
  s += `      <group>${v.group}</group>\n`;
  s += `    </permissions>\n`;
  s += `    <timestamps>\n`;
  s += timestamp('atime', v.atime);
  s += timestamp('mtime', v.mtime);
  s += timestamp('ctime', v.ctime);
  s += `      <btime>0</btime>\n`;
  s += `    </timestamps>\n`;
  s += `  </target>\n</volume>\n`;
  return s;
}

// ------------------------------------------------------------------ capabilities

/**
 * CONNECT_GET_STORAGE_POOL_CAPABILITIES in libvirt's layout: every pool type libvirt knows, in
 * its order; sparsevirtd supports `dir` pools of raw volumes and nothing else.
 */
export function formatPoolCapabilities(): string {
  let s = '<storagepoolCapabilities>\n';
  for (const type of POOL_TYPES) {
    if (type === 'dir') {
      s += `  <pool type='dir' supported='yes'>\n`;
      s += `    <volOptions>\n`;
      s += `      <defaultFormat type='raw'/>\n`;
      s += `      <enum name='targetFormatType'>\n`;
      s += `        <value>raw</value>\n`;
      s += `      </enum>\n`;
      s += `    </volOptions>\n`;
      s += `  </pool>\n`;
    } else {
      s += `  <pool type='${type}' supported='no'>\n  </pool>\n`;
    }
  }
  return `${s}</storagepoolCapabilities>\n`;
}
