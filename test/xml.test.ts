/**
 * The one XML reader (src/xml.ts): what it reads from well-formed documents, and a clear error
 * with line and column, quickly and in bounded memory, for every kind of malformed input.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  XML_MAX_DEPTH, XmlSyntaxError, attributeOf, childElement, childElements, escapeNodeAttribute, escapeNodeText, escapeXml,
  ownText, parseXml, textAt, type XmlElement, type XmlReadOptions,
} from '../src/xml.js';

/** Asserts that `src` is refused with a reason matching `reason`, at `line`:`column` when given. */
function refused(src: string, reason: RegExp, at?: [number, number], opts?: XmlReadOptions): XmlSyntaxError {
  let caught: unknown;
  try {
    parseXml(src, opts);
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof XmlSyntaxError, `${JSON.stringify(src.slice(0, 80))}: expected an XmlSyntaxError, got ${String(caught)}`);
  assert.equal(caught.code, 'ERR_XML');
  assert.match(caught.reason, reason, JSON.stringify(src.slice(0, 80)));
  assert.ok(caught.message.startsWith(caught.reason) && caught.message.includes(`line ${caught.line}, column ${caught.column}`), caught.message);
  if (at) assert.deepEqual([caught.line, caught.column], at, `${caught.message} for ${JSON.stringify(src.slice(0, 80))}`);
  return caught;
}

describe('reading well-formed documents', () => {
  test('elements, attributes, text, entities, character references, CDATA', () => {
    const root = parseXml(
      "<?xml version='1.0'?>\n<!-- a pool -->\n<pool type='dir' x=\"a&amp;b&lt;&gt;&apos;&quot;\">\n" +
      '  <name>p&#49;&#x32;&#x1F600;</name>\n  <empty/>\n  <source><![CDATA[<not> & markup]]></source>\n' +
      '  <?pi skipped?><t>a<!-- c -->b</t>\n</pool>\n<!-- after -->\n',
    );
    assert.equal(root.name, 'pool');
    assert.equal(attributeOf(root, 'type'), 'dir');
    assert.equal(attributeOf(root, 'x'), `a&b<>'"`);
    assert.equal(attributeOf(root, 'missing'), undefined);
    assert.equal(textAt(root, 'name'), 'p12\u{1F600}');
    assert.equal(ownText(childElement(root, 'source')!), '<not> & markup');
    assert.deepEqual(childElements(root).map((e) => e.name), ['name', 'empty', 'source', 't']);
    assert.deepEqual(childElement(root, 't')!.children.map((c) => (c.type === 'text' ? c.value : c.name)), ['a', 'b'], 'a comment is left out');
    assert.equal(textAt(root, 'nothing', 'here'), undefined);
    assert.equal(childElement(root, 'empty')!.children.length, 0);
    assert.equal(childElement(root, 'name')!.parent, root);
  });

  test('document order, parents, and the order of attributes', () => {
    const root = parseXml('<a p="1" q="2"><b r="3">t</b><c/></a>');
    const b = childElement(root, 'b')!;
    const orders = [root.order, ...root.attributes.map((x) => x.order), b.order, b.attributes[0]!.order, b.children[0]!.order, childElement(root, 'c')!.order];
    assert.deepEqual(orders, [0, 1, 2, 3, 4, 5, 6]);
    assert.deepEqual(root.attributes.map((x) => [x.name, x.value, x.parent === root]), [['p', '1', true], ['q', '2', true]]);
  });

  test('line ends become \\n; tab and newline in an attribute value become spaces, references to them stay', () => {
    const root = parseXml('<a v="x\r\ny\tz&#10;&#9;">l1\r\nl2\rl3</a>');
    assert.equal(attributeOf(root, 'v'), 'x y z\n\t');
    assert.equal(ownText(root), 'l1\nl2\nl3');
  });

  test('white space: kept by default; dropped between elements with dropBlankText, as libxml2 with keepBlanks off', () => {
    const src = '<a>\n  <b>  </b>\n  <c>x <d/> </c>\n</a>';
    const kept = parseXml(src);
    assert.equal(kept.children.length, 5, 'text, b, text, c, text');
    const dropped = parseXml(src, { dropBlankText: true });
    assert.deepEqual(dropped.children.map((c) => c.type), ['element', 'element']);
    assert.equal(ownText(childElement(dropped, 'b')!), '  ', "an element's only content is kept");
    assert.deepEqual(childElement(dropped, 'c')!.children.map((c) => c.type), ['text', 'element', 'text'], 'next to other text it is kept');
  });

  test('names: namespaces prefixes and non-ASCII letters', () => {
    const root = parseXml("<pool xmlns:rbd='http://libvirt.org/schemas/storagepool/rbd/1.0'><rbd:config_opts/><état/></pool>");
    assert.deepEqual(childElements(root).map((e) => e.name), ['rbd:config_opts', 'état']);
  });

  test('a byte-order mark before the declaration', () => {
    assert.equal(parseXml("\ufeff<?xml version='1.0'?><a/>").name, 'a');
  });

  test('the escapers: libvirt\'s for documents, libxml2\'s for dumped nodes; what they write reads back', () => {
    const s = `a&b<c>d'e"f\tg\nh\ri\x01j`;
    assert.equal(escapeXml(s), 'a&amp;b&lt;c&gt;d&apos;e&quot;f\tg\nh\rij');
    assert.equal(escapeNodeText(s), `a&amp;b&lt;c&gt;d'e"f\tg\nh&#13;i\x01j`);
    assert.equal(escapeNodeAttribute(s), "a&amp;b&lt;c&gt;d'e&quot;f&#9;g&#10;h&#13;i\x01j");
    const clean = s.replace('\x01', '');
    assert.equal(ownText(parseXml(`<a>${escapeXml(clean)}</a>`)), clean.replace('\r', '\n'));
    assert.equal(attributeOf(parseXml(`<a v="${escapeNodeAttribute(clean)}"/>`), 'v'), clean);
  });
});

describe('malformed input: a clear error with its position', () => {
  test('unclosed and mismatched tags', () => {
    refused('<pool type="dir"><name>x</name>', /unterminated element <pool>/, [1, 32]);
    refused('<pool><name>x</pool>', /<\/pool> closes <name>/, [1, 14]);
    refused('<a>\n  <b>\n</a>', /<\/a> closes <b>/, [3, 1]);
    refused('<a', /unterminated start tag <a>/);
    refused('<a><b', /unterminated start tag <b>/);
    refused('<a></a', /'>' expected to end <\/a>/);
    refused('<a></ a>', /element name expected/);
    refused('<a/><b/>', /content after the root element/, [1, 5]);
    refused('<a/>text', /content after the root element/);
    refused('', /no root element/);
    refused('  \n <!-- only a comment -->', /no root element/);
    refused('text<a/>', /text before the root element/);
    refused('<1a/>', /element name expected/);
  });

  test('bad entities and character references', () => {
    refused('<a>&foo;</a>', /unknown entity &foo;/, [1, 4]);
    refused('<a>\n x &nbsp;</a>', /unknown entity &nbsp;/, [2, 4]);
    refused('<a>fish & chips</a>', /'&' must start an entity/);
    refused('<a>&amp</a>', /reference &amp is missing its ';'/);
    refused('<a v="&lt"/>', /reference &lt is missing its ';'/);
    refused('<a>&#0;</a>', /invalid character reference &#0;/);
    refused('<a>&#x1;</a>', /invalid character reference &#x1;/);
    refused('<a>&#xD800;</a>', /invalid character reference/);
    refused('<a>&#x110000;</a>', /invalid character reference/);
    refused('<a>&#12a;</a>', /invalid character reference/);
    refused('<a>&#;</a>', /invalid character reference/);
    refused('<a>&;</a>', /unknown entity &;/);
    refused('<a>\x01</a>', /invalid character U\+0001/, [1, 4]);
    refused('<a v="\x1f"/>', /invalid character U\+001F/);
    refused('<a>\ud800</a>', /invalid character U\+D800/);
  });

  test('attributes: duplicates, missing values and quotes, < in values', () => {
    refused('<a x="1" x="2"/>', /attribute x given twice/, [1, 10]);
    refused("<a x='1' y='2' x='1'/>", /attribute x given twice/);
    refused(`<a ${Array.from({ length: 20 }, (_, i) => `a${i}="${i}"`).join(' ')} a3="again"/>`, /attribute a3 given twice/);
    assert.equal(parseXml(`<a ${Array.from({ length: 20 }, (_, i) => `a${i}="${i}"`).join(' ')}/>`).attributes.length, 20);
    refused('<a x/>', /attribute x has no value/);
    refused('<a x=1/>', /attribute x: a quoted value expected/);
    refused('<a x="1/>', /unterminated value of attribute x/);
    refused('<a x="<"/>', /'<' in the value of attribute x/);
    refused('<a x="1"y="2"/>', /white space, '>' or '\/>' expected in <a>/);
  });

  test('a billion-laughs document is refused at its DOCTYPE, without expanding anything', () => {
    const lol = '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n' +
      Array.from({ length: 9 }, (_, i) => ` <!ENTITY lol${i + 1} "${`&lol${i || ''};`.repeat(10)}">\n`).join('') +
      ']>\n<lolz>&lol9;</lolz>\n';
    const before = process.memoryUsage().heapUsed;
    const started = performance.now();
    refused(lol, /DOCTYPE is not accepted/, [2, 1]);
    assert.ok(performance.now() - started < 1000, 'refused at once');
    assert.ok(process.memoryUsage().heapUsed - before < 64 << 20, 'nothing expanded');
    refused('<!DOCTYPE pool SYSTEM "file:///etc/passwd"><pool>&xxe;</pool>', /DOCTYPE is not accepted/);
    refused('<pool><!DOCTYPE x></pool>', /DOCTYPE is not accepted/);
    refused('<pool><!ENTITY x "y"></pool>', /'<!' starts no comment or CDATA section/);
    // without the declarations, the references are unknown entities
    refused('<lolz>&lol9;</lolz>', /unknown entity &lol9;/);
  });

  test('huge depth: refused past the limit, without recursion', () => {
    const deep = (n: number) => `${'<a>'.repeat(n)}${'</a>'.repeat(n)}`;
    let el: XmlElement | undefined = parseXml(deep(XML_MAX_DEPTH));
    let depth = 0;
    for (; el; el = childElement(el, 'a')) depth++;
    assert.equal(depth, XML_MAX_DEPTH, 'the limit itself is fine');
    refused(deep(XML_MAX_DEPTH + 1), new RegExp(`nested deeper than ${XML_MAX_DEPTH}`), [1, 3 * XML_MAX_DEPTH + 1]);
    refused(deep(500_000), /nested deeper than/);
    refused('<a>'.repeat(1_000_000), /nested deeper than/);
    refused(deep(10), /nested deeper than 5/, undefined, { maxDepth: 5 });
  });

  test('size and node count are bounded', () => {
    refused(`<a>${'x'.repeat(100)}</a>`, /document longer than 64 characters/, [1, 1], { maxLength: 64 });
    refused(`<a>${'<b/>'.repeat(1000)}</a>`, /more than 100 nodes/, undefined, { maxNodes: 100 });
    refused(`<a ${Array.from({ length: 200 }, (_, i) => `x${i}="1"`).join(' ')}/>`, /more than 100 nodes/, undefined, { maxNodes: 100 });
    // the defaults: a 4 MiB document of empty elements stops at the node limit, not at memory
    const before = process.memoryUsage().heapUsed;
    refused(`<a>${'<b/>'.repeat((1 << 20) - 2)}</a>`, /more than 100000 nodes/);
    assert.ok(process.memoryUsage().heapUsed - before < 256 << 20);
    refused(`<a>${'x'.repeat(4 << 20)}</a>`, /document longer than 4194304 characters/);
  });

  test('comments, CDATA, processing instructions: unterminated or malformed', () => {
    refused('<a><!-- never ends</a>', /unterminated comment/, [1, 4]);
    refused('<a><!-- a -- b --></a>', /'--' inside a comment/);
    refused('<a><!-- a ---></a>', /'--' inside a comment/, [1, 11]);
    refused('<a><![CDATA[ never ends</a>', /unterminated CDATA section/);
    refused('<a><? never ends</a>', /processing instruction target expected/);
    refused('<a><?pi never ends</a>', /unterminated processing instruction/);
    refused('<a/><?xml version="1.0"?>', /XML declaration allowed only at the start/);
    refused(' <?xml version="1.0"?><a/>', /XML declaration allowed only at the start/);
    refused('<a>]]></a>', /']]>' in text/);
    assert.equal(parseXml('<a><!----><![CDATA[]]></a>').children.length, 1, 'an empty comment and an empty CDATA section');
  });

  test('the position counts lines and columns from 1', () => {
    const e = refused('<a>\n\n   <b>\n   </c>\n</a>', /<\/c> closes <b>/);
    assert.deepEqual([e.line, e.column, e.offset], [4, 4, 15]);
  });
});

describe('the readers built on it', () => {
  test("the daemon: malformed XML from a client is libvirt's XML_DETAIL error, with the line and the reason", async () => {
    const { parsePoolXml, parseVolXml } = await import('../src/daemon/xml.js');
    const { parseSecretXml } = await import('../src/daemon/secrets.js');
    const { RemoteError } = await import('../src/errors.js');
    const detail = (fn: () => unknown): [number, number, string] => {
      try {
        fn();
      } catch (err) {
        assert.ok(err instanceof RemoteError, String(err));
        return [err.virCode, err.domain, err.message];
      }
      assert.fail('accepted');
    };
    assert.deepEqual(detail(() => parsePoolXml("<pool type='dir'>\n  <name>x</pool>")), [35, 18, '(storage_pool_definition):2: </pool> closes <name>']);
    assert.deepEqual(detail(() => parseVolXml('<volume><name>a&b</name></volume>')), [35, 18, "(storage_volume_definition):1: reference &b is missing its ';'"]);
    assert.deepEqual(detail(() => parseSecretXml('<secret x="1" x="2"/>')), [35, 30, '(definition_of_secret):1: attribute x given twice']);
    const def = parsePoolXml("<pool type='dir'><name> p&amp;q </name><target><path>/a//b/</path></target><source><host name='h' port='1'/></source></pool>");
    assert.deepEqual([def.name, def.target, def.source.hosts], ['p&q', '/a/b', [{ name: 'h', port: 1 }]]);
    assert.equal(parseVolXml('<volume><name> v </name><capacity unit="KiB">2</capacity></volume>').name, ' v ', 'a volume name is not trimmed');
  });

  test('the CLI: --xpath reads with libxml2\'s blanks; a malformed document gives no nodes', async () => {
    const { evalXPath, renderNodes } = await import('../src/cli/xml.js');
    const r = evalXPath('<a>\n  <b> </b>\n  <c>x</c>\n</a>', '/a/node()');
    assert.ok(r.ok);
    assert.equal(renderNodes(r.nodes, false), '<b> </b>\n<c>x</c>\n');
    assert.deepEqual(evalXPath('<a><b></a>', '/a'), { ok: false, kind: 'syntax' });
  });
});
