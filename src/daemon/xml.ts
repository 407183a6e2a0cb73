/**
 * Pool and volume XML: what the daemon reads from what clients send (pool-define-as,
 * vol-create-as), on the one XML reader (../xml.ts), and formatters that print byte for byte
 * what libvirt 9.0 prints for a pool (two-space indentation, single-quoted attributes, trailing
 * newline). A dir volume's XML is the format layer's (formats/volxml.ts).
 */
import { attributeOf, childElement, childElements, escapeXml, ownText, parseXml, textAt, XmlSyntaxError, type XmlElement } from '../xml.js';
import { POOL_TYPES } from '../protocol/remote.js';
import type { PoolAuth, PoolBackend, PoolDef, PoolSource, PoolSourceHost, VolDef } from './backend.js';
import { CODE, DOMAIN, storageError, virError } from './errors.js';

/**
 * Reads a document a client sent; malformed XML is libvirt's XML_DETAIL error (code 35, domain
 * STORAGE) with `(context):line: reason`, as libvirt reports what libxml2 refused.
 */
export function readClientXml(src: string, context: string): XmlElement {
  try {
    return parseXml(src);
  } catch (err) {
    if (err instanceof XmlSyntaxError) throw virError(CODE.XML_DETAIL, DOMAIN.STORAGE, `(${context}):${err.line}: ${err.reason}`);
    throw err;
  }
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
  for (const h of childElements(el, 'host')) {
    const name = attributeOf(h, 'name');
    if (!name) throw storageError(CODE.XML_ERROR, 'missing storage pool host name');
    let port: number | null = null;
    const portText = attributeOf(h, 'port');
    if (portText !== undefined) {
      if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) > 65535) {
        throw storageError(CODE.XML_ERROR, `Invalid port number: ${portText}`);
      }
      port = Number(portText);
    }
    hosts.push({ name, port });
  }
  const nameText = textAt(el, 'name');
  let auth: PoolAuth | null = null;
  const authEl = childElement(el, 'auth');
  if (authEl) {
    const type = attributeOf(authEl, 'type');
    if (type !== 'ceph' && type !== 'chap') throw storageError(CODE.XML_ERROR, `unknown auth type '${type ?? ''}'`);
    const username = attributeOf(authEl, 'username');
    if (!username) throw storageError(CODE.XML_ERROR, 'missing username for auth');
    const secretEl = childElement(authEl, 'secret');
    if (!secretEl) throw storageError(CODE.XML_ERROR, 'Missing <secret> element in auth');
    const uuid = parseUuid(attributeOf(secretEl, 'uuid'), 'auth secret uuid');
    const usage = attributeOf(secretEl, 'usage');
    if (uuid !== null && usage !== undefined) throw storageError(CODE.XML_ERROR, 'either secret uuid or usage expected');
    if (uuid === null && !usage) throw storageError(CODE.XML_ERROR, 'either secret uuid or usage expected');
    auth = { type, username, secret: uuid !== null ? { uuid } : { usage: usage! } };
  }
  return { hosts, name: nameText ? nameText : null, auth };
}

/** `<rbd:config_opts>` under whatever prefix the document binds to libvirt's rbd namespace. */
function parseConfigOpts(root: XmlElement): Array<{ name: string; value: string }> {
  const prefixes = root.attributes.filter((a) => a.name.startsWith('xmlns:') && a.value === RBD_NAMESPACE).map((a) => a.name.slice(6));
  const out: Array<{ name: string; value: string }> = [];
  for (const prefix of prefixes) {
    for (const opts of childElements(root, `${prefix}:config_opts`)) {
      for (const o of childElements(opts, `${prefix}:option`)) {
        const name = attributeOf(o, 'name');
        const value = attributeOf(o, 'value');
        if (name === undefined || value === undefined) throw storageError(CODE.XML_ERROR, 'Missing option name or value');
        out.push({ name, value });
      }
    }
  }
  return out;
}

/** A `<pool>` definition of any type; the type's own refusals are its backend's (checkDefinition). */
export function parsePoolXml(xml: string): PoolDef {
  const root = readClientXml(xml, 'storage_pool_definition');
  if (root.name !== 'pool') {
    throw storageError(CODE.XML_ERROR, `unknown root element for storage pool`);
  }
  const type = attributeOf(root, 'type');
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
  return { type, name, uuid, target, mode, source: parsePoolSource(childElement(root, 'source')), configOpts: parseConfigOpts(root) };
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
  const root = readClientXml(xml, 'storage_volume_definition');
  if (root.name !== 'volume') throw storageError(CODE.XML_ERROR, 'unknown root element for storage volume');
  const nameEl = childElement(root, 'name');
  // Not trimmed: a name is used as a file name as it is.
  const name = nameEl ? ownText(nameEl) : '';
  if (name === '') throw storageError(CODE.XML_ERROR, 'missing volume name element');
  const capEl = childElement(root, 'capacity');
  if (!capEl && !opts.capacityOptional) throw storageError(CODE.XML_ERROR, 'missing capacity element');
  const capacity = capEl ? scaledBytes(ownText(capEl), attributeOf(capEl, 'unit'), 'capacity') : null;
  const allocEl = childElement(root, 'allocation');
  const allocation = allocEl ? scaledBytes(ownText(allocEl), attributeOf(allocEl, 'unit'), 'allocation') : undefined;
  const target = childElement(root, 'target');
  const format = attributeOf(childElement(target, 'format'), 'type') ?? null;
  if (format !== null && !VOL_FORMATS.includes(format)) throw storageError(CODE.CONFIG_UNSUPPORTED, `unknown volume format type ${format}`);
  const type = attributeOf(root, 'type');
  if (type !== undefined && type !== 'file' && type !== 'network') {
    throw storageError(CODE.CONFIG_UNSUPPORTED, `sparsevirtd supports only file and network volumes, not '${type}'`);
  }
  const compat = textAt(target, 'compat') || null;
  if (compat !== null && !/^[0-9]+\.[0-9]+$/.test(compat)) throw storageError(CODE.XML_ERROR, `forbidden characters in 'compat' attribute`);
  const features: string[] = [];
  for (const f of childElements(childElement(target, 'features'))) {
    if (!VOL_FEATURES.has(f.name)) throw storageError(CODE.XML_ERROR, `unsupported feature ${f.name}`);
    if (!features.includes(f.name)) features.push(f.name);
  }
  const clusterEl = childElement(target, 'clusterSize');
  const clusterSize = clusterEl ? scaledBytes(ownText(clusterEl), attributeOf(clusterEl, 'unit'), 'clusterSize') : null;
  const modeText = textAt(target, 'permissions', 'mode');
  let mode: number | null = null;
  if (modeText) {
    if (!/^[0-7]{1,4}$/.test(modeText)) throw storageError(CODE.XML_ERROR, 'malformed octal mode');
    mode = Number.parseInt(modeText, 8);
  }
  const backingEl = childElement(root, 'backingStore');
  let backingStore: VolDef['backingStore'] = null;
  if (backingEl) {
    const bpath = textAt(backingEl, 'path');
    if (!bpath) throw storageError(CODE.XML_ERROR, 'missing path in backing store');
    const bfmt = attributeOf(childElement(backingEl, 'format'), 'type') ?? null;
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
