/**
 * The package as a user gets it: `npm pack` (of the build this test runs from), the tarball
 * unpacked into the node_modules of a scratch project, its dependencies linked from this
 * checkout's node_modules (no registry), and every entry of `exports` imported by a separate node
 * from that project. The root entry exports the public API and none of the internals.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { nativeSyscallsAvailable } from '../src/io/sys.js';

/** The checkout (this file runs as dist/test/package-exports.test.js). */
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

const PUBLIC = ['connect', 'Connection', 'StoragePool', 'StorageVol', 'Stream', 'SparsevirtError', 'RemoteError'];
const INTERNAL = ['escapeXml', 'newUuid', 'checkByteCount', 'bigToSafe', 'remoteErrorFields', 'kPeer', 'uuidToBytes', 'volumeXml', 'Peer'];

test('every exports entry of the packed package imports from a project that installed it', { timeout: 120_000 }, () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as {
    name: string; exports: Record<string, string>; dependencies: Record<string, string>; bin: Record<string, string>;
  };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sv-pack-'));
  try {
    // (the build is this test's own: pack it as it is, without running `prepare` again)
    const out = execFileSync('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', dir], { cwd: root, encoding: 'utf8' });
    const [{ filename }] = JSON.parse(out) as Array<{ filename: string }>;
    const modules = path.join(dir, 'project', 'node_modules');
    const installed = path.join(modules, pkg.name);
    fs.mkdirSync(installed, { recursive: true });
    execFileSync('tar', ['-xzf', path.join(dir, filename), '-C', installed, '--strip-components=1']);
    for (const dep of Object.keys(pkg.dependencies)) {
      fs.symlinkSync(fs.realpathSync(path.join(root, 'node_modules', dep)), path.join(modules, dep));
    }
    for (const [name, file] of Object.entries(pkg.bin)) assert.ok(fs.existsSync(path.join(installed, file)), `bin ${name}: ${file} is in the package`);

    const names = (entry: string): string[] => {
      const spec = entry === '.' ? pkg.name : `${pkg.name}/${entry.slice(2)}`;
      const probe = `import(${JSON.stringify(spec)}).then((m) => console.log(JSON.stringify(Object.keys(m))))`;
      const r = execFileSync(process.execPath, ['-e', probe], { cwd: path.join(dir, 'project'), encoding: 'utf8' });
      return JSON.parse(r) as string[];
    };
    const entries = Object.keys(pkg.exports);
    assert.ok(entries.includes('.'), 'the root entry');
    for (const entry of entries) {
      const keys = names(entry);
      assert.ok(keys.length > 0, `${entry} exports something`);
      if (entry === '.') {
        for (const name of PUBLIC) assert.ok(keys.includes(name), `the root exports ${name}`);
        for (const name of INTERNAL) assert.ok(!keys.includes(name), `the root does not export ${name}`);
      }
    }

    // the native bindings resolve from the installed package as they do here
    const probe = `import('${pkg.name}/sparse').then((m) => console.log(m.nativeSyscallsAvailable()))`;
    const native = execFileSync(process.execPath, ['-e', probe], { cwd: path.join(dir, 'project'), encoding: 'utf8' }).trim();
    assert.equal(native, String(nativeSyscallsAvailable()));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
