/**
 * Pool and volume XML: a small, strict XML reader for what clients send (pool-define-as,
 * vol-create-as), and formatters that print byte for byte what libvirt 9.0 prints for a pool
 * (two-space indentation, single-quoted attributes, trailing newline). A dir volume's XML is the
 * format layer's (formats/volxml.ts).
 *
 * The reader knows elements, attributes, text, CDATA, comments, processing instructions and
 * the five predefined entities plus character references. A DOCTYPE is refused: no entity
 * expansion, no external anything.
 */
import { escapeXml } from '../xml.js';
import type { PoolAuth, PoolBackend, PoolDef, PoolSource, PoolSourceHost, VolDef } from './backend.js';
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

export { escapeXml };

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

/** libvirt's pool types, in its order. */
export const POOL_TYPES: readonly string[] = ['dir', 'fs', 'netfs', 'logical', 'disk', 'iscsi', 'iscsi-direct', 'scsi', 'mpath', 'rbd', 'sheepdog', 'gluster', 'zfs', 'vstorage'];

/** Pool types without a local target (libvirt prints no `<target>` for them). */
const NO_TARGET_TYPES = new Set(['rbd', 'sheepdog', 'gluster', 'iscsi-direct']);

/** The namespace of `<rbd:config_opts>` (libvirt's storage_backend_rbd.c). */
export const RBD_NAMESPACE = 'http://libvirt.org/schemas/storagepool/rbd/1.0';

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

function parseUuid(text: string | undefined, what: string): string | null {
  if (!text) return null;
  const hex = text.replace(/[-\s]/g, '').toLowerCase();
  if (!/^[0-9a-f]{32}$/.test(hex)) throw storageError(CODE.XML_ERROR, `malformed ${what}`);
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function parsePoolSource(el: XmlElement | undefined): PoolSource {
  const hosts: PoolSourceHost[] = [];
  for (const h of el?.children ?? []) {
    if (h.name !== 'host') continue;
    const name = h.attrs.name;
    if (!name) throw storageError(CODE.XML_ERROR, 'missing storage pool host name');
    let port: number | null = null;
    if (h.attrs.port !== undefined) {
      if (!/^[0-9]{1,5}$/.test(h.attrs.port) || Number(h.attrs.port) > 65535) {
        throw storageError(CODE.XML_ERROR, `Invalid port number: ${h.attrs.port}`);
      }
      port = Number(h.attrs.port);
    }
    hosts.push({ name, port });
  }
  const nameText = textAt(el, 'name');
  let auth: PoolAuth | null = null;
  const authEl = child(el, 'auth');
  if (authEl) {
    const type = authEl.attrs.type;
    if (type !== 'ceph' && type !== 'chap') throw storageError(CODE.XML_ERROR, `unknown auth type '${type ?? ''}'`);
    const username = authEl.attrs.username;
    if (!username) throw storageError(CODE.XML_ERROR, 'missing username for auth');
    const secretEl = child(authEl, 'secret');
    if (!secretEl) throw storageError(CODE.XML_ERROR, 'Missing <secret> element in auth');
    const uuid = parseUuid(secretEl.attrs.uuid, 'auth secret uuid');
    const usage = secretEl.attrs.usage;
    if (uuid !== null && usage !== undefined) throw storageError(CODE.XML_ERROR, 'either secret uuid or usage expected');
    if (uuid === null && !usage) throw storageError(CODE.XML_ERROR, 'either secret uuid or usage expected');
    auth = { type, username, secret: uuid !== null ? { uuid } : { usage: usage! } };
  }
  return { hosts, name: nameText ? nameText : null, auth };
}

/** `<rbd:config_opts>` under whatever prefix the document binds to libvirt's rbd namespace. */
function parseConfigOpts(root: XmlElement): Array<{ name: string; value: string }> {
  const prefixes = Object.entries(root.attrs).filter(([k, v]) => k.startsWith('xmlns:') && v === RBD_NAMESPACE).map(([k]) => k.slice(6));
  const out: Array<{ name: string; value: string }> = [];
  for (const prefix of prefixes) {
    for (const opts of root.children.filter((c) => c.name === `${prefix}:config_opts`)) {
      for (const o of opts.children) {
        if (o.name !== `${prefix}:option`) continue;
        if (o.attrs.name === undefined || o.attrs.value === undefined) throw storageError(CODE.XML_ERROR, 'Missing option name or value');
        out.push({ name: o.attrs.name, value: o.attrs.value });
      }
    }
  }
  return out;
}

/** A `<pool>` definition of any type; the type's own refusals are its backend's (checkDefinition). */
export function parsePoolXml(xml: string): PoolDef {
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
  const uuid = parseUuid(textAt(root, 'uuid'), 'uuid element');
  const targetText = textAt(root, 'target', 'path');
  let target: string | null = null;
  if (targetText) {
    if (!targetText.startsWith('/')) throw storageError(CODE.XML_ERROR, `storage pool target path '${targetText}' must be absolute`);
    if (targetText.includes('\0')) throw storageError(CODE.XML_ERROR, 'storage pool target path cannot contain a NUL byte');
    target = sanitizePath(targetText);
  }
  const modeText = textAt(root, 'target', 'permissions', 'mode');
  let mode: number | null = null;
  if (modeText) {
    if (!/^[0-7]{1,4}$/.test(modeText)) throw storageError(CODE.XML_ERROR, `malformed octal mode '${modeText}'`);
    mode = Number.parseInt(modeText, 8);
  }
  return { type, name, uuid, target, mode, source: parsePoolSource(child(root, 'source')), configOpts: parseConfigOpts(root) };
}

export interface PoolXmlState {
  def: PoolDef;
  uuid: string;
  capacity: number | bigint;
  allocation: number | bigint;
  available: number | bigint;
  /** Permissions of the target as last seen by a refresh (libvirt omits them before that). */
  perms: { mode: number; owner: number; group: number } | null;
}

function formatPoolSource(src: PoolSource): string {
  let s = `  <source>\n`;
  for (const h of src.hosts) {
    s += `    <host name='${escapeXml(h.name)}'${h.port !== null ? ` port='${h.port}'` : ''}/>\n`;
  }
  if (src.name !== null) s += `    <name>${escapeXml(src.name)}</name>\n`;
  if (src.auth) {
    s += `    <auth type='${src.auth.type}' username='${escapeXml(src.auth.username)}'>\n`;
    s += 'uuid' in src.auth.secret
      ? `      <secret uuid='${src.auth.secret.uuid}'/>\n`
      : `      <secret usage='${escapeXml(src.auth.secret.usage)}'/>\n`;
    s += `    </auth>\n`;
  }
  return `${s}  </source>\n`;
}

/** The pool XML as libvirt 9.0 prints it (virStoragePoolDefFormat) for the types sparsevirtd has. */
export function formatPoolXml(p: PoolXmlState): string {
  const { def } = p;
  const ns = def.configOpts.length > 0 ? ` xmlns:rbd='${RBD_NAMESPACE}'` : '';
  let s = `<pool type='${def.type}'${ns}>\n`;
  s += `  <name>${escapeXml(def.name)}</name>\n`;
  s += `  <uuid>${p.uuid}</uuid>\n`;
  s += `  <capacity unit='bytes'>${p.capacity}</capacity>\n`;
  s += `  <allocation unit='bytes'>${p.allocation}</allocation>\n`;
  s += `  <available unit='bytes'>${p.available}</available>\n`;
  s += formatPoolSource(def.source);
  if (!NO_TARGET_TYPES.has(def.type)) {
    s += `  <target>\n    <path>${escapeXml(def.target ?? '')}</path>\n`;
    if (p.perms) {
      s += `    <permissions>\n`;
      s += `      <mode>${octal(p.perms.mode)}</mode>\n`;
      s += `      <owner>${p.perms.owner}</owner>\n`;
      s += `      <group>${p.perms.group}</group>\n`;
      s += `    </permissions>\n`;
    }
    s += `  </target>\n`;
  }
  if (def.configOpts.length > 0) {
    s += `  <rbd:config_opts>\n`;
    for (const o of def.configOpts) s += `    <rbd:option name='${escapeXml(o.name)}' value='${escapeXml(o.value)}'/>\n`;
    s += `  </rbd:config_opts>\n`;
  }
  return `${s}</pool>\n`;
}

function octal(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, '0');
}

// ------------------------------------------------------------------ volumes

/** libvirt's volume formats for file volumes (virStorageFileFormat), in its order. */
export const VOL_FORMATS: readonly string[] = ['none', 'raw', 'dir', 'bochs', 'cloop', 'dmg', 'iso', 'vpc', 'vdi', 'fat', 'vhd', 'ploop', 'cow', 'qcow', 'qcow2', 'qed', 'vmdk'];

const VOL_FEATURES = new Set(['lazy_refcounts', 'extended_l2']);

/** A `<volume>` definition; which formats and options a pool takes is its backend's. */
export function parseVolXml(xml: string, opts: { capacityOptional?: boolean } = {}): VolDef {
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
  const target = child(root, 'target');
  const formatEl = child(target, 'format');
  const format = formatEl?.attrs.type ?? null;
  if (format !== null && !VOL_FORMATS.includes(format)) throw storageError(CODE.CONFIG_UNSUPPORTED, `unknown volume format type ${format}`);
  const type = root.attrs.type;
  if (type !== undefined && type !== 'file' && type !== 'network') {
    throw storageError(CODE.CONFIG_UNSUPPORTED, `sparsevirtd supports only file and network volumes, not '${type}'`);
  }
  const compat = textAt(target, 'compat') || null;
  if (compat !== null && !/^[0-9]+\.[0-9]+$/.test(compat)) throw storageError(CODE.XML_ERROR, `forbidden characters in 'compat' attribute`);
  const features: string[] = [];
  for (const f of child(target, 'features')?.children ?? []) {
    if (!VOL_FEATURES.has(f.name)) throw storageError(CODE.XML_ERROR, `unsupported feature ${f.name}`);
    if (!features.includes(f.name)) features.push(f.name);
  }
  const clusterEl = child(target, 'clusterSize');
  const clusterSize = clusterEl ? scaledBytes(clusterEl.text, clusterEl.attrs.unit, 'clusterSize') : null;
  const modeText = textAt(target, 'permissions', 'mode');
  let mode: number | null = null;
  if (modeText) {
    if (!/^[0-7]{1,4}$/.test(modeText)) throw storageError(CODE.XML_ERROR, 'malformed octal mode');
    mode = Number.parseInt(modeText, 8);
  }
  const backingEl = child(root, 'backingStore');
  let backingStore: VolDef['backingStore'] = null;
  if (backingEl) {
    const bpath = textAt(backingEl, 'path');
    if (!bpath) throw storageError(CODE.XML_ERROR, 'missing path in backing store');
    const bfmt = child(backingEl, 'format')?.attrs.type ?? null;
    if (bfmt !== null && !VOL_FORMATS.includes(bfmt)) throw storageError(CODE.XML_ERROR, `unknown volume format type ${bfmt}`);
    backingStore = { path: bpath, format: bfmt };
  }
  return { name, capacity, allocation, format, compat, features, clusterSize, backingStore, mode };
}

// ------------------------------------------------------------------ capabilities

/**
 * CONNECT_GET_STORAGE_POOL_CAPABILITIES in libvirt's layout: every pool type libvirt knows, in
 * its order; supported are the types sparsevirtd has a backend for, with their volume formats.
 */
export function formatPoolCapabilities(backends: ReadonlyArray<Pick<PoolBackend, 'type' | 'volFormats'>>): string {
  let s = '<storagepoolCapabilities>\n';
  for (const type of POOL_TYPES) {
    const b = backends.find((x) => x.type === type);
    if (!b) {
      s += `  <pool type='${type}' supported='no'>\n  </pool>\n`;
      continue;
    }
    s += `  <pool type='${type}' supported='yes'>\n`;
    if (b.volFormats) {
      s += `    <volOptions>\n`;
      s += `      <defaultFormat type='${b.volFormats.defaultFormat}'/>\n`;
      s += `      <enum name='targetFormatType'>\n`;
      for (const f of b.volFormats.formats) s += `        <value>${f}</value>\n`;
      s += `      </enum>\n`;
      s += `    </volOptions>\n`;
    }
    s += `  </pool>\n`;
  }
  return `${s}</storagepoolCapabilities>\n`;
}
