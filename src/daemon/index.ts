/**
 * sparsevirtd as a library: `startDaemon(opts)` → `{ addresses, close() }`. Used by the
 * `sparsevirtd` executable (main.ts), by in-process tests and by the bench.
 */
export {
  startDaemon, parseListen, encodeVersion,
  type DaemonOptions, type DaemonHandle, type DaemonAddress, type ListenSpec, type TlsOptions,
} from './server.js';
export { Logger, LOG_LEVELS, type LogLevel } from './log.js';
export { defaultStateDir } from './options.js';
