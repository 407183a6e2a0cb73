/**
 * Every diagnostics channel and debuglog section of the library, defined once. The library never
 * prints; the daemon and the CLI log, and anyone may subscribe:
 *
 * - `NODE_DEBUG=sparsevirt:rpc`: what a connection drops or works around (late replies, ignored
 *   messages, a socket that cannot splice).
 * - `sparsevirt:rpc:frame`: every frame, `{ dir: 'in' | 'out', header, length }` (the payload's
 *   length; the payload itself is not published).
 * - `sparsevirt:stream:close`: a stream reached a final state, `{ stream, state, error }`.
 */
import diagnostics from 'node:diagnostics_channel';
import { debuglog } from 'node:util';

export const debug = debuglog('sparsevirt:rpc');

export const frameChannel = diagnostics.channel('sparsevirt:rpc:frame');

export const streamCloseChannel = diagnostics.channel('sparsevirt:stream:close');
