/**
 * The secret driver: libvirt's secrets (`virsh secret-*`), kept in `<stateDir>/secrets/` as
 * libvirt keeps them in /etc/libvirt/secrets: `<uuid>.xml` for the definition and `<uuid>.base64`
 * for the value, each written atomically (temp file + fsync + rename), mode 0600. Ephemeral
 * secrets live in memory only.
 *
 * Rules as libvirt 9.0's secret driver has them: the value of a private secret is never returned
 * to a client (only the daemon's own users, such as the RBD backend, read it); a read-only
 * connection may list and look up but not define, set, read a value, or undefine; errors carry
 * domain SECRET with libvirt's codes and messages. Secret events as libvirtd sends them: lifecycle
 * (DEFINED at every define, UNDEFINED) and value-changed, to the callbacks a client registered,
 * read-only clients included.
 *
 * Each daemon has its own store; the storage backends reach it through the driver's
 * `BackendContext` (`lookupValue`), never through anything shared by the process.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { RemoteError } from '../errors.js';
import { ListSecretsFlags, P, SECRET_LIST_MAX, SecretEventId, SecretLifecycle, SecretUsage, type SecretRef } from '../protocol/index.js';
import { MessageType, REMOTE_PROGRAM, REMOTE_VERSION, Status, type Header } from '../rpc/message.js';
import { encode } from '../xdr/index.js';
import { CODE, rpcError, virError } from './errors.js';
import { TMP_MARK, writeFileAtomic } from './state.js';
import { attributeOf, childElement, escapeXml, ownText, type XmlElement } from '../xml.js';
import { readClientXml } from './xml.js';

/** VIR_FROM_SECRET */
export const DOMAIN_SECRET = 30;
const INVALID_SECRET = 65;
const NO_SECRET = 66;

const USAGE_NAMES = ['none', 'volume', 'ceph', 'iscsi', 'tls', 'vtpm'] as const;
/** The element under `<usage>` that names what the secret is for, by usage type. */
const USAGE_ELEMENT: Record<number, string> = {
  [SecretUsage.VOLUME]: 'volume', [SecretUsage.CEPH]: 'name', [SecretUsage.ISCSI]: 'target',
  [SecretUsage.TLS]: 'name', [SecretUsage.VTPM]: 'name',
};
/** libvirt's complaint when that element is missing. */
const USAGE_MISSING: Record<number, string> = {
  [SecretUsage.VOLUME]: 'volume usage specified, but volume path is missing',
  [SecretUsage.CEPH]: 'Ceph usage specified, but name is missing',
  [SecretUsage.ISCSI]: 'iSCSI usage specified, but target is missing',
  [SecretUsage.TLS]: 'TLS usage specified, but name is missing',
  [SecretUsage.VTPM]: 'vTPM usage specified, but name is missing',
};

const MESSAGES: Record<number, string> = {
  [INVALID_SECRET]: 'Invalid secret: %s',
  [NO_SECRET]: 'Secret not found: %s',
};

/** An error of the secret driver (domain SECRET). */
export function secretError(code: number, detail: string): RemoteError {
  const fmt = MESSAGES[code];
  if (fmt === undefined) return virError(code, DOMAIN_SECRET, detail);
  return new RemoteError({
    code, domain: DOMAIN_SECRET, message: fmt.replace('%s', detail), level: 2,
    str1: fmt, str2: detail, str3: null, int1: -1, int2: -1,
  });
}

function unsupportedFlags(flags: number, fn: string): RemoteError {
  return new RemoteError({
    code: CODE.INVALID_ARG, domain: DOMAIN_SECRET,
    message: `unsupported flags (0x${(flags >>> 0).toString(16)}) in function ${fn}`, level: 2,
    str1: fn, str2: 'flags', str3: null, int1: 0, int2: 0,
  });
}

function checkFlags(flags: number, allowed: number, fn: string): void {
  const extra = (flags & ~allowed) >>> 0;
  if (extra !== 0) throw unsupportedFlags(extra, fn);
}

function readOnly(api: string): RemoteError {
  return virError(CODE.OPERATION_DENIED, DOMAIN_SECRET, `read only access prevents ${api}`);
}

export interface SecretDef {
  uuid: string;
  ephemeral: boolean;
  isPrivate: boolean;
  description: string | null;
  usageType: number;
  /** What the usage names ('' for none). */
  usageID: string;
}

export interface Secret {
  def: SecretDef;
  value: Buffer | null;
}

/** What a store tells its listeners (the sessions' secret event callbacks). */
export type SecretEvent =
  | { kind: 'lifecycle'; secret: Secret; event: number }
  | { kind: 'value'; secret: Secret };

const UUID_RE = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i;

function normUuid(s: string): string | null {
  const t = s.trim();
  if (!UUID_RE.test(t)) return null;
  const h = t.replace(/-/g, '').toLowerCase();
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function uuidFromBytes(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function uuidBytes(u: string): Buffer {
  return Buffer.from(u.replace(/-/g, ''), 'hex');
}

function yesNo(el: XmlElement, attr: string): boolean {
  const v = attributeOf(el, attr);
  if (v === undefined || v === 'no') return false;
  if (v === 'yes') return true;
  throw virError(CODE.XML_ERROR, DOMAIN_SECRET, `invalid value of '${attr}'`);
}

/** Parse a `<secret>` definition with libvirt's refusals (virSecretDefParse). */
export function parseSecretXml(xml: string): SecretDef {
  let root: XmlElement;
  try {
    root = readClientXml(xml, 'definition_of_secret');
  } catch (err) {
    if (err instanceof RemoteError) {
      const f = err.toFields();
      throw new RemoteError({ ...f, domain: DOMAIN_SECRET });
    }
    throw err;
  }
  if (root.name !== 'secret') throw virError(CODE.XML_ERROR, 5, `expecting root element of 'secret', not '${root.name}'`);
  const ephemeral = yesNo(root, 'ephemeral');
  const isPrivate = yesNo(root, 'private');
  let uuid: string;
  const u = childElement(root, 'uuid');
  if (u) {
    const n = normUuid(ownText(u));
    if (n === null) throw virError(CODE.INTERNAL_ERROR, DOMAIN_SECRET, 'malformed uuid element');
    uuid = n;
  } else {
    uuid = randomUUID();
  }
  const d = childElement(root, 'description');
  let usageType: number = SecretUsage.NONE;
  let usageID = '';
  const usage = childElement(root, 'usage');
  if (usage) {
    const type = attributeOf(usage, 'type');
    if (type === undefined) throw virError(CODE.XML_ERROR, DOMAIN_SECRET, 'unknown secret usage type');
    const idx = (USAGE_NAMES as readonly string[]).indexOf(type);
    if (idx <= 0) throw virError(CODE.CONFIG_UNSUPPORTED, DOMAIN_SECRET, `unknown secret usage type ${type}`);
    usageType = idx;
    const idEl = childElement(usage, USAGE_ELEMENT[idx]!);
    const id = idEl ? ownText(idEl).trim() : undefined;
    if (!id) throw virError(CODE.INTERNAL_ERROR, DOMAIN_SECRET, USAGE_MISSING[idx]!);
    usageID = id;
  }
  return { uuid, ephemeral, isPrivate, description: d ? ownText(d) : null, usageType, usageID };
}

/** The secret's XML as libvirt prints it (virSecretDefFormat). */
export function formatSecretXml(def: SecretDef): string {
  let s = `<secret ephemeral='${def.ephemeral ? 'yes' : 'no'}' private='${def.isPrivate ? 'yes' : 'no'}'>\n`;
  s += `  <uuid>${def.uuid}</uuid>\n`;
  if (def.description !== null) s += `  <description>${escapeXml(def.description)}</description>\n`;
  if (def.usageType !== SecretUsage.NONE) {
    const el = USAGE_ELEMENT[def.usageType]!;
    s += `  <usage type='${USAGE_NAMES[def.usageType]}'>\n    <${el}>${escapeXml(def.usageID)}</${el}>\n  </usage>\n`;
  }
  return `${s}</secret>\n`;
}

/** The secrets of one state directory. */
export class SecretStore {
  readonly dir: string;
  private readonly secrets = new Map<string, Secret>();
  private readonly listeners = new Set<(e: SecretEvent) => void>();

  private loaded = false;

  /** `<stateDir>/secrets/` is read at the first use (after the daemon holds its state directory). */
  constructor(stateDir: string, private readonly onBad: (file: string, err: unknown) => void = () => undefined) {
    this.dir = path.join(stateDir, 'secrets');
  }

  /** Listen to this store's secret events; returns the function that stops listening. */
  onEvent(fn: (e: SecretEvent) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  private emit(e: SecretEvent): void {
    for (const fn of this.listeners) {
      try {
        fn(e);
      } catch {
        // (a listener's failure is its own: the change is made)
      }
    }
  }

  /** Loads the directory synchronously (it is small); unreadable entries go to `onBad`. */
  private load(): void {
    if (this.loaded) return;
    this.loaded = true;
    let entries: string[];
    try {
      entries = fs.readdirSync(this.dir);
    } catch {
      return;
    }
    for (const e of entries) {
      const full = path.join(this.dir, e);
      if (e.includes(TMP_MARK)) {
        fs.rmSync(full, { force: true });
        continue;
      }
      if (!e.endsWith('.xml')) continue;
      try {
        const def = parseSecretXml(fs.readFileSync(full, 'utf8'));
        if (`${def.uuid}.xml` !== e) throw new Error(`the file's name is not its secret's uuid ${def.uuid}`);
        let value: Buffer | null = null;
        try {
          value = Buffer.from(fs.readFileSync(path.join(this.dir, `${def.uuid}.base64`), 'latin1').trim(), 'base64');
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
        }
        this.secrets.set(def.uuid, { def, value });
      } catch (err) {
        this.onBad(full, err);
      }
    }
  }

  private async ensureDir(): Promise<void> {
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
  }

  list(flags = 0): Secret[] {
    this.load();
    const F = ListSecretsFlags;
    return [...this.secrets.values()]
      .filter(({ def }) => {
        if (flags & (F.EPHEMERAL | F.NO_EPHEMERAL)) {
          if (!((flags & F.EPHEMERAL && def.ephemeral) || (flags & F.NO_EPHEMERAL && !def.ephemeral))) return false;
        }
        if (flags & (F.PRIVATE | F.NO_PRIVATE)) {
          if (!((flags & F.PRIVATE && def.isPrivate) || (flags & F.NO_PRIVATE && !def.isPrivate))) return false;
        }
        return true;
      })
      .sort((a, b) => (a.def.uuid < b.def.uuid ? -1 : a.def.uuid > b.def.uuid ? 1 : 0));
  }

  byUuid(uuid: string): Secret {
    this.load();
    const s = this.secrets.get(uuid);
    if (!s) throw secretError(NO_SECRET, `no secret with matching uuid '${uuid}'`);
    return s;
  }

  byUsage(usageType: number, usageID: string): Secret {
    this.load();
    for (const s of this.secrets.values()) if (s.def.usageType === usageType && s.def.usageID === usageID) return s;
    throw secretError(NO_SECRET, `no secret with matching usage '${usageID}'`);
  }

  /** A secret named by the wire: libvirt looks it up by uuid. */
  byRef(ref: SecretRef): Secret {
    return this.byUuid(uuidFromBytes(ref.uuid));
  }

  /** virSecretDefineXML: a new secret, or a new definition of an existing one (its value kept). */
  async define(xml: string): Promise<Secret> {
    const def = parseSecretXml(xml);
    this.load();
    const existing = this.secrets.get(def.uuid);
    if (existing) {
      const old = existing.def;
      if (old.usageType !== def.usageType || old.usageID !== def.usageID) {
        throw virError(CODE.INTERNAL_ERROR, DOMAIN_SECRET, `a secret with UUID ${def.uuid} is already defined for use with ${old.usageID}`);
      }
      if (old.isPrivate && !def.isPrivate) throw virError(CODE.INTERNAL_ERROR, DOMAIN_SECRET, 'cannot change private flag on existing secret');
    } else if (def.usageType !== SecretUsage.NONE) {
      for (const s of this.secrets.values()) {
        if (s.def.usageType === def.usageType && s.def.usageID === def.usageID) {
          throw virError(CODE.INTERNAL_ERROR, DOMAIN_SECRET, `a secret with UUID ${s.def.uuid} already defined for use with ${def.usageID}`);
        }
      }
    }
    const secret: Secret = { def, value: existing?.value ?? null };
    if (!def.ephemeral) {
      await this.ensureDir();
      await writeFileAtomic(this.file(def.uuid, 'xml'), formatSecretXml(def));
      if (secret.value && (!existing || existing.def.ephemeral)) await this.saveValue(def.uuid, secret.value);
    } else if (existing && !existing.def.ephemeral) {
      await this.removeFiles(def.uuid);
    }
    this.secrets.set(def.uuid, secret);
    this.emit({ kind: 'lifecycle', secret, event: SecretLifecycle.DEFINED });
    return secret;
  }

  async setValue(secret: Secret, value: Buffer): Promise<void> {
    this.current(secret);
    if (!secret.def.ephemeral) await this.saveValue(secret.def.uuid, value);
    secret.value = Buffer.from(value);
    this.emit({ kind: 'value', secret });
  }

  /** The value as a client may read it: never a private secret's. */
  clientValue(secret: Secret): Buffer {
    this.current(secret);
    if (secret.def.isPrivate) throw secretError(INVALID_SECRET, 'secret is private');
    return this.value(secret);
  }

  /** The value for the daemon's own use (a pool's cephx key). */
  value(secret: Secret): Buffer {
    if (secret.value === null) throw secretError(NO_SECRET, `secret '${secret.def.uuid}' does not have a value`);
    return secret.value;
  }

  /**
   * The value of the secret a pool's `<auth><secret uuid=…|usage=…/>` names, for the daemon's
   * own use (private or not), as libvirt's virSecretGetSecretString finds it: by uuid, or by
   * usage of `usageType`. NO_SECRET for a missing secret or value; INVALID_ARG for a secret of
   * another usage type.
   */
  lookupValue(ref: { uuid: string } | { usage: string }, usageType: number): Buffer {
    let secret: Secret;
    if ('uuid' in ref) {
      const uuid = normUuid(ref.uuid) ?? ref.uuid;
      secret = this.byUuid(uuid);
      const type = secret.def.usageType;
      if (type !== SecretUsage.NONE && type !== usageType) {
        // (libvirt reports this one from its secret utilities, without an error domain)
        throw virError(CODE.INVALID_ARG, 0,
          `secret with uuid ${uuid} is of type '${USAGE_NAMES[type]}' not expected '${USAGE_NAMES[usageType]}' type`);
      }
    } else {
      secret = this.byUsage(usageType, ref.usage);
    }
    return this.value(secret);
  }

  async undefine(secret: Secret): Promise<void> {
    this.current(secret);
    if (!secret.def.ephemeral) await this.removeFiles(secret.def.uuid);
    this.secrets.delete(secret.def.uuid);
    this.emit({ kind: 'lifecycle', secret, event: SecretLifecycle.UNDEFINED });
  }

  /** A secret still defined (not replaced or undefined meanwhile). */
  private current(secret: Secret): void {
    if (this.secrets.get(secret.def.uuid) !== secret) {
      throw secretError(NO_SECRET, `no secret with matching uuid '${secret.def.uuid}'`);
    }
  }

  private file(uuid: string, ext: 'xml' | 'base64'): string {
    return path.join(this.dir, `${uuid}.${ext}`);
  }

  private async saveValue(uuid: string, value: Buffer): Promise<void> {
    await this.ensureDir();
    await writeFileAtomic(this.file(uuid, 'base64'), value.toString('base64'));
  }

  private async removeFiles(uuid: string): Promise<void> {
    await fsp.rm(this.file(uuid, 'base64'), { force: true });
    await fsp.rm(this.file(uuid, 'xml'), { force: true });
  }
}

// ------------------------------------------------------------------ the procedures

/** The client's connection, as far as secret events need it. */
interface EventPeer {
  readonly closed: boolean;
  sendFrame(h: Header, payload?: Uint8Array): void;
  once(event: 'close', fn: () => void): unknown;
}

/** What a secret handler needs of its session. */
interface SecretCall {
  session: { readonly readonly: boolean; readonly driver: { readonly secrets: SecretStore }; readonly peer: EventPeer };
}

/** libvirtd's serial on the event messages it sends. */
const EVENT_SERIAL = 1;
/** Secret event callback ids, unique in the process as libvirt's are in its daemon. */
let nextCallbackId = 1;

/** One client's secret event callbacks: id → event id and the uuid it is limited to. */
class SecretCallbacks {
  private readonly callbacks = new Map<number, { eventID: number; uuid: string | null }>();
  private stop: (() => void) | null = null;

  constructor(private readonly peer: EventPeer, private readonly store: SecretStore) {
    peer.once('close', () => this.clear());
  }

  /** CONNECT_SECRET_EVENT_REGISTER_ANY: events of one kind, of every secret or of `secret` (by uuid). */
  register(eventID: number, secret: SecretRef | null): number {
    if (eventID !== SecretEventId.LIFECYCLE && eventID !== SecretEventId.VALUE_CHANGED) {
      throw rpcError(CODE.INTERNAL_ERROR, `unsupported secret event ID ${eventID}`);
    }
    const id = nextCallbackId++;
    this.callbacks.set(id, { eventID, uuid: secret ? uuidFromBytes(secret.uuid) : null });
    this.stop ??= this.store.onEvent((e) => this.onEvent(e));
    return id;
  }

  deregister(callbackID: number): void {
    if (!this.callbacks.delete(callbackID)) throw rpcError(CODE.INTERNAL_ERROR, `secret event callback ${callbackID} not registered`);
    if (this.callbacks.size === 0) this.clear();
  }

  private clear(): void {
    this.callbacks.clear();
    this.stop?.();
    this.stop = null;
  }

  /**
   * An event for each matching callback, as a MESSAGE, sent on the next turn of the event loop:
   * after the reply to the call that caused it, as libvirtd queues its events.
   */
  private onEvent(e: SecretEvent): void {
    const eventID = e.kind === 'lifecycle' ? SecretEventId.LIFECYCLE : SecretEventId.VALUE_CHANGED;
    const uuid = e.secret.def.uuid;
    const ids: number[] = [];
    for (const [id, cb] of this.callbacks) if (cb.eventID === eventID && (cb.uuid === null || cb.uuid === uuid)) ids.push(id);
    if (ids.length === 0) return;
    const secret = ref(e.secret);
    setImmediate(() => {
      for (const callbackID of ids) {
        if (this.peer.closed || !this.callbacks.has(callbackID)) continue;
        const proc = e.kind === 'lifecycle' ? P.SECRET_EVENT_LIFECYCLE : P.SECRET_EVENT_VALUE_CHANGED;
        const payload = e.kind === 'lifecycle'
          ? encode(P.SECRET_EVENT_LIFECYCLE.args, { callbackID, secret, event: e.event, detail: 0 })
          : encode(P.SECRET_EVENT_VALUE_CHANGED.args, { callbackID, secret });
        this.peer.sendFrame({ prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc: proc.num, type: MessageType.MESSAGE, serial: EVENT_SERIAL, status: Status.OK }, payload);
      }
    });
  }
}

const callbacksByPeer = new WeakMap<EventPeer, SecretCallbacks>();

function callbacksOf(session: SecretCall['session']): SecretCallbacks {
  let c = callbacksByPeer.get(session.peer);
  if (!c) {
    c = new SecretCallbacks(session.peer, session.driver.secrets);
    callbacksByPeer.set(session.peer, c);
  }
  return c;
}

interface SecretHandler {
  run(call: SecretCall, args: any): unknown;
}

function ref(s: Secret): SecretRef {
  return { uuid: uuidBytes(s.def.uuid), usageType: s.def.usageType, usageID: s.def.usageID };
}

function writable(call: SecretCall, api: string): SecretStore {
  if (call.session.readonly) throw readOnly(api);
  return call.session.driver.secrets;
}

/** The REMOTE secret procedures, by number, for the session's dispatch table. */
export const SECRET_HANDLERS = new Map<number, SecretHandler>([
  [139, { run: ({ session }) => ({ num: session.driver.secrets.list().length }) }],
  [140, {
    run: ({ session }, a: { maxuuids: number }) => {
      if (a.maxuuids > SECRET_LIST_MAX) throw rpcError(CODE.RPC, 'maxuuids > REMOTE_SECRET_LIST_MAX');
      if (a.maxuuids < 0) throw rpcError(CODE.RPC, 'maxuuids must be non-negative');
      return { uuids: session.driver.secrets.list().slice(0, a.maxuuids).map((s) => s.def.uuid) };
    },
  }],
  [141, { run: ({ session }, a: { uuid: Buffer }) => ({ secret: ref(session.driver.secrets.byUuid(uuidFromBytes(a.uuid))) }) }],
  [142, {
    run: async (call, a: { xml: string; flags: number }) => {
      const store = writable(call, 'virSecretDefineXML');
      checkFlags(a.flags, 1 /* VALIDATE */, 'secretDefineXML');
      return { secret: ref(await store.define(a.xml)) };
    },
  }],
  [143, {
    run: ({ session }, a: { secret: SecretRef; flags: number }) => {
      checkFlags(a.flags, 0, 'secretGetXMLDesc');
      return { xml: formatSecretXml(session.driver.secrets.byRef(a.secret).def) };
    },
  }],
  [144, {
    run: async (call, a: { secret: SecretRef; value: Buffer; flags: number }) => {
      const store = writable(call, 'virSecretSetValue');
      checkFlags(a.flags, 0, 'secretSetValue');
      await store.setValue(store.byRef(a.secret), a.value);
    },
  }],
  [145, {
    run: (call, a: { secret: SecretRef; flags: number }) => {
      const store = writable(call, 'virSecretGetValue');
      checkFlags(a.flags, 0, 'secretGetValue');
      return { value: store.clientValue(store.byRef(a.secret)) };
    },
  }],
  [146, {
    run: async (call, a: { secret: SecretRef }) => {
      const store = writable(call, 'virSecretUndefine');
      await store.undefine(store.byRef(a.secret));
    },
  }],
  [147, { run: ({ session }, a: { usageType: number; usageID: string }) => ({ secret: ref(session.driver.secrets.byUsage(a.usageType, a.usageID)) }) }],
  [287, {
    run: ({ session }, a: { needResults: number; flags: number }) => {
      checkFlags(a.flags, 15, 'secretConnectListAllSecrets');
      const all = session.driver.secrets.list(a.flags);
      return { secrets: a.needResults ? all.map(ref) : [], ret: all.length };
    },
  }],
  [380, {
    run: ({ session }, a: { eventID: number; secret: SecretRef | null }) => ({ callbackID: callbacksOf(session).register(a.eventID, a.secret) }),
  }],
  [381, { run: ({ session }, a: { callbackID: number }) => callbacksOf(session).deregister(a.callbackID) }],
]);
