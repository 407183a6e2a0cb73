/**
 * virshDumpXML: the XML as the daemon sent it, or with --xpath the nodes an XPath expression
 * selects, each printed as libxml2 prints a node (re-indented by two spaces a level, double
 * quotes, `<empty/>`), one per line; --wrap puts them under a `<nodes>` root.
 *
 * The XPath here is the part scripts use on libvirt's XML: absolute and relative location paths,
 * `//`, `.` and `..`, `*`, `@attr`, `@*`, `text()`, `node()`, `axis::` for child, descendant,
 * descendant-or-self, self, parent and attribute, predicates (positions, `last()`,
 * `position()`, comparisons of paths, strings and numbers with = != < <= > >=, `and`, `or`,
 * `not()`), unions with `|` and `( … )[n]`. Other expressions are refused as virsh refuses
 * expressions that do not give a node set.
 */
import { escapeNodeAttribute, escapeNodeText, parseXml as readXml, type XmlAttribute, type XmlElement, type XmlText } from '../xml.js';
import type { Ctl } from './ctl.js';

type Elem = XmlElement;
type Text = XmlText;
type Attr = XmlAttribute;
export type XNode = Elem | Text | Attr;

/** The name given to the document node (what `/` selects). */
const DOCUMENT = '#document';

/** A document as virsh reads it for --xpath: white space between elements dropped, as libxml2 with keepBlanks off. */
export function parseXml(src: string): Elem {
  return readXml(src, { dropBlankText: true });
}

// ------------------------------------------------------------------ serialising like libxml2

/** xmlNodeDump(…, level, format = 1): children indented two spaces a level unless text is mixed in. */
export function serialize(n: XNode, level = 0, format = true): string {
  if (n.type === 'text') return escapeNodeText(n.value);
  if (n.type === 'attribute') return ` ${n.name}="${escapeNodeAttribute(n.value)}"`;
  if (n.name === DOCUMENT) return `<?xml version="1.0" encoding="UTF-8"?>\n${n.children.map((c) => `${serialize(c)}\n`).join('')}`;
  let s = `<${n.name}${n.attributes.map((a) => serialize(a)).join('')}`;
  if (n.children.length === 0) return `${s}/>`;
  s += '>';
  const fmt = format && n.children.every((c) => c.type === 'element');
  for (const c of n.children) {
    if (fmt) s += c.type === 'element' && c.name === DOCUMENT ? '\n' : `\n${'  '.repeat(level + 1)}`;
    s += serialize(c, level + 1, fmt);
  }
  if (fmt) s += `\n${'  '.repeat(level)}`;
  return `${s}</${n.name}>`;
}

// ------------------------------------------------------------------ XPath (a useful subset)

type Tok = { t: 'name' | 'str' | 'num' | 'op'; v: string };

class XPathSyntax extends Error {}
class NotNodeSet extends Error {}

function tokenize(s: string): Tok[] {
  const out: Tok[] = [];
  let i = 0;
  while (i < s.length) {
    const c = s[i]!;
    if (/\s/.test(c)) {
      i++;
      continue;
    }
    const two = s.slice(i, i + 2);
    if (['//', '..', '::', '!=', '<=', '>='].includes(two)) {
      out.push({ t: 'op', v: two });
      i += 2;
      continue;
    }
    if ('/[]()@|=<>,*.'.includes(c) && !(c === '.' && /\d/.test(s[i + 1] ?? ''))) {
      out.push({ t: 'op', v: c });
      i++;
      continue;
    }
    if (c === '"' || c === "'") {
      const end = s.indexOf(c, i + 1);
      if (end < 0) throw new XPathSyntax('unterminated string');
      out.push({ t: 'str', v: s.slice(i + 1, end) });
      i = end + 1;
      continue;
    }
    const num = /^(\d+(\.\d*)?|\.\d+)/.exec(s.slice(i));
    if (num) {
      out.push({ t: 'num', v: num[0] });
      i += num[0].length;
      continue;
    }
    const nm = /^[A-Za-z_][\w.-]*(:[A-Za-z_][\w.-]*)?/.exec(s.slice(i));
    if (nm) {
      out.push({ t: 'name', v: nm[0] });
      i += nm[0].length;
      continue;
    }
    throw new XPathSyntax(`unexpected '${c}'`);
  }
  return out;
}

type Value = XNode[] | string | number | boolean;

type Expr = (ctx: { node: XNode; pos: number; size: number }) => Value;

const AXES = new Set(['child', 'descendant', 'descendant-or-self', 'self', 'parent', 'attribute', 'ancestor', 'ancestor-or-self', 'following-sibling', 'preceding-sibling']);

function stringValue(n: XNode): string {
  if (n.type === 'element') return n.children.map(stringValue).join('');
  return n.value;
}

function toStr(v: Value): string {
  if (Array.isArray(v)) return v.length ? stringValue(v[0]!) : '';
  if (typeof v === 'number') return Number.isInteger(v) ? String(v) : String(v);
  return String(v);
}
const toBool = (v: Value): boolean => (Array.isArray(v) ? v.length > 0 : typeof v === 'number' ? v !== 0 && !Number.isNaN(v) : typeof v === 'string' ? v.length > 0 : v);

function compare(op: string, a: Value, b: Value): boolean {
  const cmp = (x: string | number, y: string | number): boolean => {
    if (op === '=' || op === '!=') {
      const eq = typeof x === 'number' || typeof y === 'number' ? Number(x) === Number(y) : x === y;
      return op === '=' ? eq : !eq;
    }
    const nx = Number(x);
    const ny = Number(y);
    return op === '<' ? nx < ny : op === '<=' ? nx <= ny : op === '>' ? nx > ny : nx >= ny;
  };
  const items = (v: Value): (string | number)[] => (Array.isArray(v) ? v.map(stringValue) : [typeof v === 'number' ? v : typeof v === 'boolean' ? Number(v) : v]);
  const asNum = typeof a === 'number' || typeof b === 'number';
  for (const x of items(a)) for (const y of items(b)) if (cmp(asNum ? Number(x) : x, asNum ? Number(y) : y)) return true;
  return false;
}

function uniqueSorted(nodes: XNode[]): XNode[] {
  return [...new Set(nodes)].sort((a, b) => a.order - b.order);
}

function axisNodes(axis: string, n: XNode): XNode[] {
  const kids = (x: XNode): XNode[] => (x.type === 'element' ? x.children : []);
  const desc = (x: XNode): XNode[] => kids(x).flatMap((k) => [k, ...desc(k)]);
  switch (axis) {
    case 'child': return kids(n);
    case 'attribute': return n.type === 'element' ? n.attributes : [];
    case 'self': return [n];
    case 'parent': return n.parent ? [n.parent] : [];
    case 'descendant': return desc(n);
    case 'descendant-or-self': return [n, ...desc(n)];
    case 'ancestor': {
      const out: XNode[] = [];
      for (let p = n.parent; p; p = p.parent) out.push(p);
      return out;
    }
    case 'ancestor-or-self': return [n, ...axisNodes('ancestor', n)];
    case 'following-sibling':
    case 'preceding-sibling': {
      if (n.type === 'attribute' || !n.parent) return [];
      const sib = n.parent.children;
      const i = sib.indexOf(n as Elem | Text);
      return axis === 'following-sibling' ? sib.slice(i + 1) : sib.slice(0, i).reverse();
    }
  }
  return [];
}

/** The parser: returns a compiled expression; `isPath` tells whether the top is a node-set expression. */
function compile(src: string, root: Elem): { expr: Expr; isPath: boolean } {
  const toks = tokenize(src);
  let i = 0;
  const peek = (k = 0) => toks[i + k];
  const isOp = (v: string, k = 0) => peek(k)?.t === 'op' && peek(k)!.v === v;
  const expectOp = (v: string) => {
    if (!isOp(v)) throw new XPathSyntax(`'${v}' expected`);
    i++;
  };
  // the document node above the root element, for absolute paths and `..`
  const docNode: Elem = { type: 'element', name: DOCUMENT, attributes: [], children: [root], parent: null, order: -1 };
  root.parent = docNode;

  type Step = (nodes: XNode[]) => XNode[];

  const predicateFilter = (nodes: XNode[], preds: Expr[]): XNode[] => {
    for (const pr of preds) {
      nodes = nodes.filter((node, k) => {
        const v = pr({ node, pos: k + 1, size: nodes.length });
        return typeof v === 'number' ? v === k + 1 : toBool(v);
      });
    }
    return nodes;
  };

  const parsePredicates = (): Expr[] => {
    const preds: Expr[] = [];
    while (isOp('[')) {
      i++;
      preds.push(parseOr().expr);
      expectOp(']');
    }
    return preds;
  };

  const parseStep = (): Step => {
    if (isOp('.')) {
      i++;
      return (nodes) => nodes;
    }
    if (isOp('..')) {
      i++;
      return (nodes) => uniqueSorted(nodes.flatMap((n) => axisNodes('parent', n)));
    }
    let axis = 'child';
    if (isOp('@')) {
      i++;
      axis = 'attribute';
    } else if (peek()?.t === 'name' && isOp('::', 1)) {
      axis = peek()!.v;
      if (!AXES.has(axis)) throw new XPathSyntax(`unknown axis ${axis}`);
      i += 2;
    }
    let test: (n: XNode) => boolean;
    if (isOp('*')) {
      i++;
      test = (n) => n.type === (axis === 'attribute' ? 'attribute' : 'element') && n.name !== DOCUMENT;
    } else if (peek()?.t === 'name') {
      const nm = peek()!.v;
      i++;
      if (isOp('(')) {
        i++;
        expectOp(')');
        if (nm === 'text') test = (n) => n.type === 'text';
        else if (nm === 'node') test = (n) => n.type !== 'element' || n.name !== DOCUMENT;
        else throw new XPathSyntax(`unsupported node test ${nm}()`);
      } else {
        test = (n) => n.type !== 'text' && n.name === nm && (axis === 'attribute' ? n.type === 'attribute' : n.type === 'element');
      }
    } else {
      throw new XPathSyntax('node test expected');
    }
    const preds = parsePredicates();
    return (nodes) => uniqueSorted(nodes.flatMap((n) => predicateFilter(axisNodes(axis, n).filter(test), preds)));
  };

  const startsStep = () => {
    const tk = peek();
    if (!tk) return false;
    if (tk.t === 'name') return !isOp('(', 1) || ['text', 'node'].includes(tk.v);
    return tk.t === 'op' && ['.', '..', '@', '*'].includes(tk.v);
  };

  const parseRelative = (first: Step[]): Step[] => {
    const steps = first;
    steps.push(parseStep());
    while (isOp('/') || isOp('//')) {
      if (isOp('//')) steps.push((nodes) => uniqueSorted(nodes.flatMap((n) => axisNodes('descendant-or-self', n))));
      i++;
      steps.push(parseStep());
    }
    return steps;
  };

  const run = (steps: Step[], start: XNode[]) => steps.reduce((acc, s) => s(acc), start);

  const parsePath = (): { expr: Expr; isPath: boolean } => {
    if (isOp('/') || isOp('//')) {
      const dbl = isOp('//');
      i++;
      const steps: Step[] = dbl ? [(nodes) => uniqueSorted(nodes.flatMap((n) => axisNodes('descendant-or-self', n)))] : [];
      if (!dbl && !startsStep()) return { expr: () => [docNode], isPath: true };
      const all = parseRelative(steps);
      return { expr: () => run(all, [docNode]), isPath: true };
    }
    if (isOp('(')) {
      i++;
      const inner = parseUnion();
      expectOp(')');
      const preds = parsePredicates();
      let steps: Step[] | null = null;
      if (isOp('/') || isOp('//')) {
        const dbl = isOp('//');
        i++;
        steps = parseRelative(dbl ? [(nodes) => uniqueSorted(nodes.flatMap((n) => axisNodes('descendant-or-self', n)))] : []);
      }
      return {
        expr: (ctx) => {
          const v = inner.expr(ctx);
          if (!Array.isArray(v)) {
            if (preds.length || steps) throw new NotNodeSet();
            return v;
          }
          const filtered = predicateFilter(v, preds);
          return steps ? run(steps, filtered) : filtered;
        },
        isPath: inner.isPath,
      };
    }
    const tk = peek();
    if (!tk) throw new XPathSyntax('expression expected');
    if (tk.t === 'str') {
      i++;
      return { expr: () => tk.v, isPath: false };
    }
    if (tk.t === 'num') {
      i++;
      return { expr: () => Number(tk.v), isPath: false };
    }
    if (tk.t === 'name' && isOp('(', 1) && !['text', 'node'].includes(tk.v)) {
      i += 2;
      const args: Expr[] = [];
      if (!isOp(')')) {
        args.push(parseOr().expr);
        while (isOp(',')) {
          i++;
          args.push(parseOr().expr);
        }
      }
      expectOp(')');
      const fn = tk.v;
      const known: Record<string, (ctx: { node: XNode; pos: number; size: number }) => Value> = {
        last: (ctx) => ctx.size,
        position: (ctx) => ctx.pos,
        not: (ctx) => !toBool(args[0]!(ctx)),
        count: (ctx) => (args[0]!(ctx) as XNode[]).length,
        string: (ctx) => toStr(args.length ? args[0]!(ctx) : [ctx.node]),
        'normalize-space': (ctx) => toStr(args.length ? args[0]!(ctx) : [ctx.node]).trim().replace(/\s+/g, ' '),
        contains: (ctx) => toStr(args[0]!(ctx)).includes(toStr(args[1]!(ctx))),
        'starts-with': (ctx) => toStr(args[0]!(ctx)).startsWith(toStr(args[1]!(ctx))),
        name: (ctx) => {
          const n = args.length ? (args[0]!(ctx) as XNode[])[0] : ctx.node;
          return n && n.type !== 'text' ? n.name : '';
        },
        true: () => true,
        false: () => false,
      };
      if (!known[fn]) throw new XPathSyntax(`unknown function ${fn}()`);
      return { expr: known[fn]!, isPath: false };
    }
    if (!startsStep()) throw new XPathSyntax('step expected');
    const all = parseRelative([]);
    return { expr: (ctx) => run(all, [ctx.node]), isPath: true };
  };

  const parseUnion = (): { expr: Expr; isPath: boolean } => {
    const first = parsePath();
    if (!isOp('|')) return first;
    const parts = [first];
    while (isOp('|')) {
      i++;
      parts.push(parsePath());
    }
    return {
      expr: (ctx) => uniqueSorted(parts.flatMap((p) => {
        const v = p.expr(ctx);
        if (!Array.isArray(v)) throw new NotNodeSet();
        return v;
      })),
      isPath: parts.every((p) => p.isPath),
    };
  };

  const parseCmp = (): { expr: Expr; isPath: boolean } => {
    let left = parseUnion();
    while (peek()?.t === 'op' && ['=', '!=', '<', '<=', '>', '>='].includes(peek()!.v)) {
      const op = peek()!.v;
      i++;
      const l = left.expr;
      const r = parseUnion().expr;
      left = { expr: (ctx) => compare(op, l(ctx), r(ctx)), isPath: false };
    }
    return left;
  };

  const parseAnd = (): { expr: Expr; isPath: boolean } => {
    let left = parseCmp();
    while (peek()?.t === 'name' && peek()!.v === 'and') {
      i++;
      const l = left.expr;
      const r = parseCmp().expr;
      left = { expr: (ctx) => toBool(l(ctx)) && toBool(r(ctx)), isPath: false };
    }
    return left;
  };

  function parseOr(): { expr: Expr; isPath: boolean } {
    let left = parseAnd();
    while (peek()?.t === 'name' && peek()!.v === 'or') {
      i++;
      const l = left.expr;
      const r = parseAnd().expr;
      left = { expr: (ctx) => toBool(l(ctx)) || toBool(r(ctx)), isPath: false };
    }
    return left;
  }

  const top = parseOr();
  if (i < toks.length) throw new XPathSyntax('trailing tokens');
  return top;
}

export type XPathResult = { ok: true; nodes: XNode[] } | { ok: false; kind: 'syntax' | 'type' | 'not-node-set' };

/** Evaluates `xpath` with the root element as the context node (as libvirt sets it up). */
export function evalXPath(xml: string, xpath: string): XPathResult {
  let root: Elem;
  try {
    root = parseXml(xml);
  } catch {
    return { ok: false, kind: 'syntax' };
  }
  try {
    const c = compile(xpath, root);
    const v = c.expr({ node: root, pos: 1, size: 1 });
    if (!Array.isArray(v)) return { ok: false, kind: 'not-node-set' };
    return { ok: true, nodes: v };
  } catch (err) {
    if (err instanceof NotNodeSet) return { ok: false, kind: 'type' };
    return { ok: false, kind: 'syntax' };
  }
}

/** The nodes, each on its own line; with `wrap`, copied under a `<nodes>` element. */
export function renderNodes(nodes: XNode[], wrap: boolean): string {
  if (!wrap) return nodes.map((n) => `${serialize(n)}\n`).join('');
  const wrapper: Elem = { type: 'element', name: 'nodes', attributes: [], children: [], parent: null, order: 0 };
  for (const n of nodes) {
    if (n.type === 'attribute') {
      const existing = wrapper.attributes.findIndex((a) => a.name === n.name);
      if (existing >= 0) wrapper.attributes.splice(existing, 1);
      wrapper.attributes.push(n);
    } else {
      const last = wrapper.children.at(-1);
      // adjacent text nodes merge, as xmlAddChild does
      if (n.type === 'text' && last?.type === 'text') wrapper.children[wrapper.children.length - 1] = { ...last, value: last.value + n.value };
      else wrapper.children.push(n);
    }
  }
  return `${serialize(wrapper)}\n`;
}

export function dumpXml(ctl: Ctl, xml: string, xpath: string | undefined, wrap: boolean): void {
  if (xpath === undefined) {
    ctl.print(xml);
    return;
  }
  const r = evalXPath(xml, xpath);
  if (!r.ok) {
    if (r.kind === 'not-node-set') ctl.fail(`internal error: Incorrect xpath '${xpath}'`);
    // libxml2 reports a bad expression on stderr; virsh then goes on with no nodes
    ctl.io.err(r.kind === 'type' ? 'XPath error : Invalid type\n' : 'XPath error : Invalid expression\n');
  }
  ctl.print(renderNodes(r.ok ? r.nodes : [], wrap));
}
