/**
 * The rpc layer's debuglog section and diagnostics channel, defined once.
 *
 * - `NODE_DEBUG=sparsevirt:rpc`: what the connection drops or works around (late replies,
 *   ignored messages, a socket that cannot splice).
 * - `sparsevirt:rpc:frame`: every frame, `{ dir: 'in' | 'out', header, length }` (the payload's
 *   length; the payload itself is not published).
 */
import diagnostics from 'node:diagnostics_channel';
import { debuglog } from 'node:util';

export const debug = debuglog('sparsevirt:rpc');

export const frameChannel = diagnostics.channel('sparsevirt:rpc:frame');
