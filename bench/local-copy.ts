/**
 * HOOK: our own local chunk copy, run by the bench as a separate process so that its wall time
 * and peak RSS are measured like every other contender's:
 *
 *   node dist/bench/local-copy.js SRC DST   ≡   writeChunks(DST, fileChunks(SRC))
 *
 * It loads dist/src/sparse/index.js at run time, so the bench compiles before that layer exists.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const SPARSE_MODULE = fileURLToPath(new URL('../src/sparse/index.js', import.meta.url));

export interface SparseApi {
  fileChunks: (path: string) => AsyncIterable<unknown>;
  writeChunks: (path: string, chunks: AsyncIterable<unknown>) => Promise<unknown>;
}

/** The sparse layer's API, or why it cannot be used (not built yet / missing exports). */
export async function loadSparseApi(): Promise<SparseApi | { skip: string }> {
  if (!existsSync(SPARSE_MODULE)) return { skip: 'not built yet (dist/src/sparse/index.js missing)' };
  try {
    const m = (await import(pathToFileURL(SPARSE_MODULE).href)) as Partial<SparseApi>;
    if (typeof m.fileChunks !== 'function' || typeof m.writeChunks !== 'function') {
      return { skip: 'not built yet (dist/src/sparse/index.js lacks fileChunks/writeChunks)' };
    }
    return m as SparseApi;
  } catch (err) {
    return { skip: `dist/src/sparse/index.js fails to load: ${(err as Error).message}` };
  }
}

async function main(): Promise<void> {
  const [src, dst] = process.argv.slice(2);
  if (!src || !dst) {
    console.error('usage: node dist/bench/local-copy.js SRC DST');
    process.exit(2);
  }
  const api = await loadSparseApi();
  if ('skip' in api) {
    console.error(api.skip);
    process.exit(3);
  }
  await api.writeChunks(dst, api.fileChunks(src));
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}
