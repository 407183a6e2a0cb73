/**
 * XML for the client, the CLI and the daemon: one escaper and one reader.
 *
 * The reader is small and strict, for the documents libvirt exchanges (pool, volume, secret
 * XML): elements, attributes, text, the five predefined entities and character references.
 * CDATA sections are text; comments, processing instructions and the XML declaration are
 * skipped, as libvirt's parser leaves them out of what it reads. A DOCTYPE is refused (no
 * entity declarations, so no entity expansion and nothing external). Line ends are normalised
 * to `\n` and whitespace in attribute values to spaces, as XML 1.0 (and libxml2) do. Malformed
 * input throws an `XmlSyntaxError` that names the reason and the line and column; the length,
 * the nesting depth and the number of nodes are bounded, so memory is bounded too.
 */
import { SparsevirtError } from './errors.js';

/**
 * Text for XML documents, as libvirt writes it (virBufferEscapeString): the five markup characters
 * as entities, and the control characters XML 1.0 cannot hold dropped. One escaper for the client,
 * the CLI and the daemon.
 */
export function escapeXml(s: string): string {
  return s
    .replace(/[\x00-\x08\x0b\x0c\x0e-\x1f]/g, '')
    .replace(/[&<>'"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', "'": '&apos;', '"': '&quot;' })[c]!);
}

/**
 * Character data as libxml2 writes a node (xmlNodeDump, what virsh prints for --xpath): `&`, `<`,
 * `>` as entities and a carriage return as `&#13;`; quotes stay.
 */
export function escapeNodeText(s: string): string {
  return s.replace(/[&<>\r]/g, (c) => NODE_ESCAPES[c]!);
}

/** An attribute value as libxml2 writes it in double quotes: also `"`, tab and newline as references. */
export function escapeNodeAttribute(s: string): string {
  return s.replace(/[&<>"\n\r\t]/g, (c) => NODE_ESCAPES[c]!);
}

const NODE_ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', '\n': '&#10;', '\r': '&#13;', '\t': '&#9;' };

// ------------------------------------------------------------------ the tree

export interface XmlElement {
  type: 'element';
  name: string;
  /** In document order; names are unique. */
  attributes: XmlAttribute[];
  /** Elements and text, in document order (comments and processing instructions are not kept). */
  children: XmlNode[];
  parent: XmlElement | null;
  /** Position in document order: an element, then its attributes, then its children. */
  order: number;
}

/** A run of character data between two pieces of markup, or one CDATA section. */
export interface XmlText {
  type: 'text';
  value: string;
  parent: XmlElement | null;
  order: number;
}

export interface XmlAttribute {
  type: 'attribute';
  name: string;
  value: string;
  parent: XmlElement | null;
  order: number;
}

export type XmlNode = XmlElement | XmlText;

/** The child elements of `el`, or those named `name`. */
export function childElements(el: XmlElement | undefined, name?: string): XmlElement[] {
  const out: XmlElement[] = [];
  for (const c of el?.children ?? []) if (c.type === 'element' && (name === undefined || c.name === name)) out.push(c);
  return out;
}

/** The first child element of `el` named `name`. */
export function childElement(el: XmlElement | undefined, name: string): XmlElement | undefined {
  for (const c of el?.children ?? []) if (c.type === 'element' && c.name === name) return c;
  return undefined;
}

/** The value of an attribute of `el`; undefined when it has none of that name. */
export function attributeOf(el: XmlElement | undefined, name: string): string | undefined {
  return el?.attributes.find((a) => a.name === name)?.value;
}

/** The text directly inside `el` (its text and CDATA children, joined; not its elements'). */
export function ownText(el: XmlElement): string {
  let s = '';
  for (const c of el.children) if (c.type === 'text') s += c.value;
  return s;
}

/** The text of the element at a path of child names, trimmed; undefined when one is absent. */
export function textAt(el: XmlElement | undefined, ...path: string[]): string | undefined {
  let cur = el;
  for (const p of path) cur = childElement(cur, p);
  return cur === undefined ? undefined : ownText(cur).trim();
}

// ------------------------------------------------------------------ errors and limits

/** Malformed XML: `reason` says what, `line` and `column` (from 1) where. Code `ERR_XML`. */
export class XmlSyntaxError extends SparsevirtError {
  readonly reason: string;
  readonly line: number;
  readonly column: number;
  /** Offset in the document (UTF-16 code units, line ends normalised). */
  readonly offset: number;
  constructor(reason: string, line: number, column: number, offset: number) {
    super('ERR_XML', `${reason} (line ${line}, column ${column})`);
    this.name = 'XmlSyntaxError';
    this.reason = reason;
    this.line = line;
    this.column = column;
    this.offset = offset;
  }
}

export interface XmlReadOptions {
  /**
   * Whitespace-only text between elements, as libxml2 reads with keepBlanks off (what
   * virsh's --xpath output shows): dropped, except where it is an element's only content or
   * stands next to other text. By default every run of text is kept.
   */
  dropBlankText?: boolean;
  /** Longest document, in characters (default `XML_MAX_LENGTH`). */
  maxLength?: number;
  /** Deepest nesting of elements (default `XML_MAX_DEPTH`). */
  maxDepth?: number;
  /** Most elements, attributes and text nodes in all (default `XML_MAX_NODES`). */
  maxNodes?: number;
}

/** The default longest document, 4 Mi characters (what libvirt sends and takes is far shorter). */
export const XML_MAX_LENGTH = 4 * 1024 * 1024;
/** The default deepest nesting: libxml2's limit without XML_PARSE_HUGE. */
export const XML_MAX_DEPTH = 256;
/** The default most nodes; libvirt's documents have tens. */
export const XML_MAX_NODES = 100_000;

// ------------------------------------------------------------------ the reader

const PREDEFINED: Record<string, string> = { lt: '<', gt: '>', amp: '&', apos: "'", quot: '"' };

// XML 1.0 names (NameStartChar, NameChar), sticky so they match where the reader stands.
const NAME_START = ':A-Z_a-z\\u00C0-\\u00D6\\u00D8-\\u00F6\\u00F8-\\u02FF\\u0370-\\u037D\\u037F-\\u1FFF\\u200C\\u200D\\u2070-\\u218F\\u2C00-\\u2FEF\\u3001-\\uD7FF\\uF900-\\uFDCF\\uFDF0-\\uFFFD\\u{10000}-\\u{EFFFF}';
const NAME = new RegExp(`[${NAME_START}][${NAME_START}\\-.0-9\\u00B7\\u0300-\\u036F\\u203F\\u2040]*`, 'uy');
/** Characters XML 1.0 does not allow anywhere (Char), found as raw text. */
const NOT_CHAR = /[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

function isXmlChar(cp: number): boolean {
  return cp === 0x9 || cp === 0xa || cp === 0xd || (cp >= 0x20 && cp <= 0xd7ff) || (cp >= 0xe000 && cp <= 0xfffd) || (cp >= 0x10000 && cp <= 0x10ffff);
}

/**
 * Reads a document and returns its root element. Throws `XmlSyntaxError` for anything that is
 * not well-formed XML, for a DOCTYPE, and past the limits of `opts`.
 */
export function parseXml(text: string, opts: XmlReadOptions = {}): XmlElement {
  const maxLength = opts.maxLength ?? XML_MAX_LENGTH;
  const maxDepth = opts.maxDepth ?? XML_MAX_DEPTH;
  const maxNodes = opts.maxNodes ?? XML_MAX_NODES;
  if (text.length > maxLength) throw new XmlSyntaxError(`document longer than ${maxLength} characters`, 1, 1, 0);
  const src = text.replace(/\r\n?/g, '\n');
  let pos = src.charCodeAt(0) === 0xfeff ? 1 : 0;
  let order = 0;
  let nodes = 0;

  const fail = (reason: string, at = pos): never => {
    let line = 1;
    let lineStart = 0;
    for (let i = src.indexOf('\n'); i >= 0 && i < at; i = src.indexOf('\n', i + 1)) {
      line++;
      lineStart = i + 1;
    }
    throw new XmlSyntaxError(reason, line, at - lineStart + 1, at);
  };
  const count = (): number => {
    if (++nodes > maxNodes) fail(`more than ${maxNodes} nodes`);
    return order++;
  };
  const skipSpace = (): void => {
    for (let c = src.charCodeAt(pos); c === 0x20 || c === 0x09 || c === 0x0a; c = src.charCodeAt(++pos));
  };
  const checkChars = (s: string, at: number): void => {
    const bad = NOT_CHAR.exec(s);
    if (bad) fail(`invalid character U+${bad[0].charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}`, at + bad.index);
  };
  const readName = (what: string): string => {
    NAME.lastIndex = pos;
    const m = NAME.exec(src);
    if (!m) return fail(`${what} expected`);
    pos += m[0].length;
    return m[0];
  };
  /** Markup that ends at `end`: its start stays `pos` for the message, the reader moves past it. */
  const through = (end: string, from: number, what: string): number => {
    const at = src.indexOf(end, from);
    if (at < 0) fail(`unterminated ${what}`);
    return at;
  };
  /** Decodes references in character data or an attribute value found at `at`. */
  const decode = (raw: string, at: number, attribute: boolean): string => {
    checkChars(raw, at);
    let s = attribute ? raw.replace(/[\t\n]/g, ' ') : raw;
    if (!s.includes('&')) return s;
    s = s.replace(/&([^;&<\s]*);?/g, (whole: string, ref: string, i: number) => {
      const where = at + i;
      if (!whole.endsWith(';')) return fail(ref === '' ? "'&' must start an entity or character reference (write &amp;)" : `reference &${ref} is missing its ';'`, where);
      if (ref.startsWith('#')) {
        const digits = ref[1] === 'x' ? ref.slice(2) : ref.slice(1);
        const ok = ref[1] === 'x' ? /^[0-9a-fA-F]{1,6}$/.test(digits) : /^[0-9]{1,7}$/.test(digits);
        const cp = ok ? Number.parseInt(digits, ref[1] === 'x' ? 16 : 10) : Number.NaN;
        if (!ok || !isXmlChar(cp)) return fail(`invalid character reference ${whole}`, where);
        return String.fromCodePoint(cp);
      }
      const v = PREDEFINED[ref];
      if (v === undefined) return fail(`unknown entity ${whole} (only &lt; &gt; &amp; &apos; &quot; and character references are defined)`, where);
      return v;
    });
    return s;
  };
  /** Comments, processing instructions and white space before or after the root element. */
  const skipMisc = (prolog: boolean): void => {
    for (;;) {
      skipSpace();
      if (src.startsWith('<?', pos)) skipPI(prolog);
      else if (src.startsWith('<!--', pos)) skipComment();
      else if (src.startsWith('<!DOCTYPE', pos)) fail('DOCTYPE is not accepted (no entity declarations, no external subset)');
      else return;
    }
  };
  const skipComment = (): void => {
    const end = through('-->', pos + 4, 'comment');
    const dash = src.indexOf('--', pos + 4);
    if (dash < end) fail("'--' inside a comment", dash);
    checkChars(src.slice(pos + 4, end), pos + 4);
    pos = end + 3;
  };
  const skipPI = (prolog: boolean): void => {
    const start = pos;
    pos += 2;
    const target = readName('processing instruction target');
    if (target.toLowerCase() === 'xml' && !(prolog && start === (src.charCodeAt(0) === 0xfeff ? 1 : 0))) {
      fail('XML declaration allowed only at the start of the document', start);
    }
    pos = through('?>', pos, 'processing instruction') + 2;
  };

  const newElement = (name: string, parent: XmlElement | null): XmlElement =>
    ({ type: 'element', name, attributes: [], children: [], parent, order: count() });
  const addText = (parent: XmlElement, value: string): void => {
    parent.children.push({ type: 'text', value, parent, order: count() });
  };

  /** Whether the last start tag read was an empty-element tag (`/>`). */
  let emptyTag = false;
  /** Reads a start tag at `pos` (on its '<'). */
  const startTag = (parent: XmlElement | null): XmlElement => {
    pos++;
    const el = newElement(readName('element name'), parent);
    const attrs = el.attributes;
    // the names seen, once there are enough of them for a lookup to beat a scan
    let seen: Set<string> | null = null;
    for (;;) {
      const before = pos;
      skipSpace();
      if (src.startsWith('/>', pos)) {
        pos += 2;
        emptyTag = true;
        return el;
      }
      if (src[pos] === '>') {
        pos++;
        emptyTag = false;
        return el;
      }
      if (pos >= src.length) fail(`unterminated start tag <${el.name}>`);
      if (pos === before) fail(`white space, '>' or '/>' expected in <${el.name}>`);
      const nameAt = pos;
      const name = readName('attribute name');
      skipSpace();
      if (src[pos] !== '=') fail(`attribute ${name} has no value ('=' expected)`);
      pos++;
      skipSpace();
      const q = src[pos];
      if (q !== '"' && q !== "'") fail(`attribute ${name}: a quoted value expected`);
      const end = through(q!, pos + 1, `value of attribute ${name}`);
      const raw = src.slice(pos + 1, end);
      const lt = raw.indexOf('<');
      if (lt >= 0) fail(`'<' in the value of attribute ${name} (write &lt;)`, pos + 1 + lt);
      if (seen === null && attrs.length >= 8) seen = new Set(attrs.map((a) => a.name));
      if (seen ? seen.has(name) : attrs.some((a) => a.name === name)) fail(`attribute ${name} given twice`, nameAt);
      seen?.add(name);
      attrs.push({ type: 'attribute', name, value: decode(raw, pos + 1, true), parent: el, order: count() });
      pos = end + 1;
    }
  };

  skipMisc(true);
  if (pos >= src.length) fail('no root element');
  if (src[pos] !== '<') fail('markup expected: text before the root element');
  const root = startTag(null);
  const open: XmlElement[] = emptyTag ? [] : [root];
  while (open.length > 0) {
    const el = open[open.length - 1]!;
    if (pos >= src.length) fail(`unterminated element <${el.name}> (end of document)`);
    if (src[pos] !== '<') {
      const next = src.indexOf('<', pos);
      const end = next < 0 ? src.length : next;
      const raw = src.slice(pos, end);
      const cdEnd = raw.indexOf(']]>');
      if (cdEnd >= 0) fail("']]>' in text (write ]]&gt;)", pos + cdEnd);
      const at = pos;
      pos = end;
      // libxml2's blanks: white space is kept when it is an element's only content or stands
      // next to other text; otherwise it is layout and dropped.
      if (opts.dropBlankText && !/[^ \t\n]/.test(raw)) {
        const kids = el.children;
        const keep = (kids.length === 0 && src.startsWith('</', pos)) || (kids.length > 0 && (kids.at(-1)!.type === 'text' || kids[0]!.type === 'text'));
        if (!keep) continue;
      }
      addText(el, decode(raw, at, false));
    } else if (src.startsWith('</', pos)) {
      const at = pos;
      pos += 2;
      const name = readName('element name');
      if (name !== el.name) fail(`</${name}> closes <${el.name}>`, at);
      skipSpace();
      if (src[pos] !== '>') fail(`'>' expected to end </${name}>`);
      pos++;
      open.pop();
    } else if (src.startsWith('<!--', pos)) {
      skipComment();
    } else if (src.startsWith('<![CDATA[', pos)) {
      const end = through(']]>', pos + 9, 'CDATA section');
      const value = src.slice(pos + 9, end);
      checkChars(value, pos + 9);
      addText(el, value);
      pos = end + 3;
    } else if (src.startsWith('<?', pos)) {
      skipPI(false);
    } else if (src.startsWith('<!', pos)) {
      fail(src.startsWith('<!DOCTYPE', pos) ? 'DOCTYPE is not accepted here' : "'<!' starts no comment or CDATA section");
    } else {
      if (open.length >= maxDepth) fail(`elements nested deeper than ${maxDepth}`);
      const child = startTag(el);
      el.children.push(child);
      if (!emptyTag) open.push(child);
    }
  }
  skipMisc(false);
  if (pos < src.length) fail('content after the root element');
  return root;
}
