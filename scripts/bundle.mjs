// Bundles the two programs into one file each (dist/bin/sparsevirt.mjs, dist/bin/sparsevirtd.mjs).
// One file instead of ~40 ES modules saves resolving, reading and compiling each of them at every
// start (an all-hole transfer: 0.11 → 0.09 s, 54 → 47 MiB). koffi stays outside (native).
import { build } from 'esbuild';
import { chmodSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const programs = { sparsevirt: 'dist/src/cli/main.js', sparsevirtd: 'dist/src/daemon/main.js' };
for (const [name, entry] of Object.entries(programs)) {
  const outfile = `${root}dist/bin/${name}.mjs`;
  await build({
    entryPoints: [`${root}${entry}`],
    outfile,
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    external: ['koffi'],
    legalComments: 'none',
    logLevel: 'warning',
  });
  chmodSync(outfile, 0o755);
}
