// Bundles the two programs into one file each. One file instead of ~40 ES modules saves resolving,
// reading and compiling each of them at every start (an all-hole transfer: 0.11 → 0.09 s, 54 → 47
// MiB). koffi stays outside (native).
//
// - sparsevirtd: dist/bin/sparsevirtd.mjs (ES module; it starts once).
// - sparsevirt: dist/bin/sparsevirt-main.cjs (CommonJS), started by dist/bin/sparsevirt.cjs
//   (scripts/cli-launcher.cjs) from a V8 code cache, dist/bin/sparsevirt-main.cjs.cache. The cache
//   is made here by a training run: the CLI defines a pool on a throw-away sparsevirtd, uploads and
//   downloads a small sparse volume and lists it, so the functions a transfer uses are compiled
//   in it too (a cache of `--version` alone saved 3 ms of an all-hole download, this one 8-11 ms).
//   If the training run fails, the build goes on without a cache.
import { build } from 'esbuild';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, closeSync, copyFileSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const bin = path.join(root, 'dist/bin');
const common = { bundle: true, platform: 'node', target: 'node20', external: ['koffi'], legalComments: 'none', logLevel: 'warning' };

await build({ ...common, entryPoints: [path.join(root, 'dist/src/daemon/main.js')], outfile: path.join(bin, 'sparsevirtd.mjs'), format: 'esm' });
chmodSync(path.join(bin, 'sparsevirtd.mjs'), 0o755);

/**
 * Node built-ins the CLI needs for some commands only, loaded on first use rather than at every
 * start (a bundle runs the imports of all its modules at once): node:crypto for content digests
 * (vol-copy --verify) and node:child_process for the ssh transport, ~5-8 ms of a run that uses
 * neither. Each becomes a module of wrappers of the names the sources import; importing another
 * name fails the build.
 */
const LAZY_BUILTINS = { 'node:crypto': ['createHash'], 'node:child_process': ['spawn'] };
const lazyBuiltins = {
  name: 'lazy-builtins',
  setup(b) {
    const filter = new RegExp(`^(${Object.keys(LAZY_BUILTINS).join('|')})$`);
    b.onResolve({ filter }, (args) => (args.namespace === 'lazy-builtin' ? { path: args.path, external: true } : { path: args.path, namespace: 'lazy-builtin' }));
    b.onLoad({ filter: /.*/, namespace: 'lazy-builtin' }, (args) => ({
      loader: 'js',
      contents: `let m;\nconst load = () => (m ??= require(${JSON.stringify(args.path)}));\n${LAZY_BUILTINS[args.path].map((n) => `export function ${n}(...a) {\n  return load().${n}(...a);\n}\n`).join('')}`,
    }));
  },
};

const mainCjs = path.join(bin, 'sparsevirt-main.cjs');
await build({
  ...common,
  plugins: [lazyBuiltins],
  entryPoints: [path.join(root, 'dist/src/cli/main.js')],
  outfile: mainCjs,
  format: 'cjs',
  // import() of Node's own modules (tls, tty, readline: loaded when needed) becomes require(): a
  // script compiled by vm has no loader for dynamic imports
  supported: { 'dynamic-import': false },
  // the sources are ES modules: import.meta.url is the bundle's own URL
  define: { 'import.meta.url': '__bundleUrl' },
  banner: { js: "const __bundleUrl = require('node:url').pathToFileURL(__filename).href;" },
});
// the entry's #! line stays in the launcher: the bundle is read as a function body
writeFileSync(mainCjs, readFileSync(mainCjs, 'utf8').replace(/^#![^\n]*\n/, ''));
const launcher = path.join(bin, 'sparsevirt.cjs');
copyFileSync(path.join(root, 'scripts/cli-launcher.cjs'), launcher);
chmodSync(launcher, 0o755);
rmSync(path.join(bin, 'sparsevirt.mjs'), { force: true }); // the ES module of earlier builds
rmSync(`${mainCjs}.cache`, { force: true });

/** The training run that makes the CLI's code cache (see the top). */
async function train() {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'sv-build-'));
  const sock = path.join(dir, 'sock');
  const daemon = spawn(process.execPath, [path.join(bin, 'sparsevirtd.mjs'), '--listen', `unix:${sock}`, '--state-dir', path.join(dir, 'state')], { stdio: 'ignore' });
  try {
    for (let i = 0; i < 100 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
    if (!existsSync(sock)) throw new Error('the daemon did not start');
    // a small sparse image: data, a hole, data
    const img = path.join(dir, 'src.img');
    const fd = openSync(img, 'w');
    writeSync(fd, Buffer.alloc(300_000, 7), 0, 300_000, 0);
    writeSync(fd, Buffer.alloc(70_000, 9), 0, 70_000, 4 << 20);
    closeSync(fd);
    const pool = path.join(dir, 'pool');
    const cmds = [
      `pool-define-as train dir --target ${pool}`, 'pool-build train', 'pool-start train',
      'vol-create-as train v.img 8M --allocation 0 --format raw',
      `vol-upload --pool train v.img ${img} --sparse`, `vol-download --pool train v.img ${path.join(dir, 'out.img')} --sparse`,
      'pool-list --all', 'vol-list train --details', 'vol-info --pool train v.img', 'pool-info train',
    ].join(' ; ');
    const r = spawnSync(launcher, ['-q', '-c', `sparsevirt+unix:///system?socket=${sock}`, cmds], {
      env: { ...process.env, SPARSEVIRT_CODE_CACHE_OUT: `${mainCjs}.cache` }, encoding: 'utf8', timeout: 60_000,
    });
    if (r.status !== 0) throw new Error(`the CLI failed (${r.status}): ${r.stderr || r.error}`);
  } finally {
    daemon.kill();
    rmSync(dir, { recursive: true, force: true });
  }
}
try {
  await train();
} catch (err) {
  rmSync(`${mainCjs}.cache`, { force: true });
  console.warn(`bundle: no code cache for the CLI (${err.message}); it starts ~10 ms slower`);
}
