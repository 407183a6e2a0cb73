/**
 * The layering of docs/ARCHITECTURE.md, enforced: every import of every file under src/ (static,
 * dynamic, type-only) must be allowed by the document's table "Who may import whom"; koffi is
 * loaded by `io/sys.ts` and `io/librbd.ts` alone; and nothing the stream core imports at run time (followed through
 * the compiled modules, where type-only imports are gone) reaches that module.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';

/** The checkout (this file runs as dist/test/layering.test.js). */
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const src = path.join(root, 'src');
const built = path.join(root, 'dist', 'src');

/** Every `.ts` file under src/, as a path relative to it (`rpc/peer.ts`). */
function sourceFiles(dir = src): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...sourceFiles(p));
    else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) out.push(path.relative(src, p));
  }
  return out.sort();
}

/** The relative module specifiers a file imports: `import … from`, `export … from`, `import '…'`, `import('…')`. */
function importsOf(text: string): string[] {
  // comments out first: a doc comment may quote an import
  const code = text.replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '');
  const specs = new Set<string>();
  for (const re of [/\bfrom\s+['"]([^'"]+)['"]/g, /\bimport\s+['"]([^'"]+)['"]/g, /\bimport\(\s*['"]([^'"]+)['"]\s*\)/g, /\brequire\(\s*['"]([^'"]+)['"]\s*\)/g]) {
    for (const m of code.matchAll(re)) specs.add(m[1]!);
  }
  return [...specs];
}

/** `spec` imported by `from` (both relative to src/), as a path relative to src/ ending in .ts; null for a package. */
function resolve(from: string, spec: string): string | null {
  if (!spec.startsWith('.')) return null;
  return path.normalize(path.join(path.dirname(from), spec)).replace(/\.js$/, '.ts');
}

interface Floor {
  name: string;
  /** Folders (`rpc/`) and files (`chunk.ts`) of the floor. */
  files: string[];
  mayImport: Set<string>;
}

/** The table "Who may import whom" of docs/ARCHITECTURE.md. */
function floorsFromDoc(): Floor[] {
  const doc = fs.readFileSync(path.join(root, 'docs', 'ARCHITECTURE.md'), 'utf8');
  const at = doc.indexOf('## Who may import whom');
  assert.ok(at >= 0, 'docs/ARCHITECTURE.md has the section "Who may import whom"');
  const section = doc.slice(at, doc.indexOf('\n## ', at + 1) >>> 0);
  const floors: Floor[] = [];
  for (const line of section.split('\n')) {
    const cells = line.split('|').slice(1, -1).map((c) => c.trim());
    if (cells.length !== 3 || cells[0] === 'floor' || /^-+$/.test(cells[0]!)) continue;
    const files = [...cells[1]!.matchAll(/`([^`]+)`/g)].map((m) => m[1]!);
    const mayImport = new Set(cells[2] === '—' ? [] : cells[2]!.split(',').map((s) => s.trim()));
    floors.push({ name: cells[0]!, files, mayImport });
  }
  assert.ok(floors.length >= 10, `the table lists the floors (${floors.length} read)`);
  const names = new Set(floors.map((f) => f.name));
  for (const f of floors) for (const n of f.mayImport) assert.ok(names.has(n), `floor ${f.name} may import '${n}', a floor the table names`);
  return floors;
}

function floorOf(floors: Floor[], file: string): Floor | undefined {
  return floors.find((f) => f.files.some((p) => (p.endsWith('/') ? file.startsWith(p) : file === p)));
}

const floors = floorsFromDoc();
const files = sourceFiles();
const imports = new Map(files.map((f) => [f, importsOf(fs.readFileSync(path.join(src, f), 'utf8'))]));

test('every file under src/ belongs to a floor of docs/ARCHITECTURE.md', () => {
  const homeless = files.filter((f) => floorOf(floors, f) === undefined);
  assert.deepEqual(homeless, [], 'files no floor of the table holds');
});

test('every import is allowed by the table of docs/ARCHITECTURE.md', () => {
  const bad: string[] = [];
  for (const [file, specs] of imports) {
    const from = floorOf(floors, file)!;
    for (const spec of specs) {
      const target = resolve(file, spec);
      if (target === null) continue;
      assert.ok(fs.existsSync(path.join(src, target)), `${file} imports ${spec}, which exists`);
      const to = floorOf(floors, target)!;
      if (to !== from && !from.mayImport.has(to.name)) bad.push(`${file} (${from.name}) → ${target} (${to.name})`);
    }
  }
  assert.deepEqual(bad, [], 'imports the table forbids');
});

test('the arrows the design forbids outright: rpc/ ↛ stream/, client/; cli/ ↛ rpc/; stream/ and the base ↛ io/', () => {
  const forbidden: Array<[string, RegExp]> = [['rpc/', /^(stream|client)\//], ['cli/', /^rpc\//], ['stream/', /^io\//], ['chunk.ts', /^io\//], ['channel.ts', /^io\//]];
  const bad: string[] = [];
  for (const [file, specs] of imports) {
    for (const spec of specs) {
      const target = resolve(file, spec);
      if (target === null) continue;
      for (const [prefix, re] of forbidden) if ((prefix.endsWith('/') ? file.startsWith(prefix) : file === prefix) && re.test(target)) bad.push(`${file} → ${target}`);
    }
  }
  assert.deepEqual(bad, []);
});

test('koffi is loaded by the native bindings of io/ alone (sys.ts, librbd.ts)', () => {
  const loaders = files.filter((f) => imports.get(f)!.includes('koffi'));
  assert.deepEqual(loaders.sort(), ['io/librbd.ts', 'io/sys.ts']);
});

test('the stream core loads no koffi: nothing stream/ or the base imports at run time reaches io/sys or io/librbd', () => {
  // the compiled modules: type-only imports are gone there, what is left runs
  const runtimeImports = (file: string): string[] => {
    const js = path.join(built, file.replace(/\.ts$/, '.js'));
    return importsOf(fs.readFileSync(js, 'utf8')).map((s) => resolve(file, s)).filter((t): t is string => t !== null);
  };
  const starts = files.filter((f) => ['base', 'stream'].includes(floorOf(floors, f)!.name));
  for (const start of starts) {
    const seen = new Set<string>([start]);
    const path_: Record<string, string> = {};
    const queue = [start];
    while (queue.length > 0) {
      const f = queue.shift()!;
      for (const t of runtimeImports(f)) {
        if (seen.has(t)) continue;
        seen.add(t);
        path_[t] = f;
        queue.push(t);
      }
    }
    for (const native of ['io/sys.ts', 'io/librbd.ts']) {
      if (!seen.has(native)) continue;
      const chain = [native];
      while (chain[0] !== start) chain.unshift(path_[chain[0]!]!);
      assert.fail(`${start} reaches a native binding: ${chain.join(' → ')}`);
    }
  }
});

test('a process that moves chunks through a stream pair has not loaded koffi; one that asks the syscall module has', () => {
  const stream = pathToFileURL(path.join(built, 'stream', 'index.js')).href;
  const sparse = pathToFileURL(path.join(built, 'sparse', 'index.js')).href;
  const koffiLoaded = "Object.keys(require('node:module')._cache).some((k) => k.includes('koffi'))";
  const pair = `import(${JSON.stringify(stream)}).then(async (m) => {
    const { sender, receiver } = m.createStreamPair({ sparse: true });
    const got = (async () => { for await (const c of receiver) void c; })();
    await sender.sendChunks((async function* () { yield { kind: 'data', bytes: Buffer.alloc(10) }; yield { kind: 'hole', length: 100 }; })());
    await got;
    console.log(${koffiLoaded});
  })`;
  const run = (code: string): string => execFileSync(process.execPath, ['-e', code], { encoding: 'utf8', env: { ...process.env, SPARSEVIRT_NO_KOFFI: '' } }).trim();
  assert.equal(run(pair), 'false', 'the stream core ran without koffi');
  const control = `import(${JSON.stringify(sparse)}).then((m) => { if (m.nativeSyscallsAvailable()) console.log(${koffiLoaded}); else console.log('no koffi here'); })`;
  assert.match(run(control), /^(true|no koffi here)$/, 'the check sees koffi once it is loaded');
});
