/** Small assertion helpers shared by the stream tests. */
import assert from 'node:assert/strict';
import { SparsevirtError } from '../../src/errors.js';

/** For assert.rejects/throws: a SparsevirtError with this stable `code`. */
export function code(expected: string) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof SparsevirtError, `expected a SparsevirtError, got ${String(err)}`);
    assert.equal(err.code, expected, err.message);
    return true;
  };
}

/** True if `p` settled once everything already queued has run (used to assert "still pending"). */
export async function hasSettled(p: Promise<unknown>): Promise<boolean> {
  let settled = false;
  p.then(() => { settled = true; }, () => { settled = true; });
  await new Promise(setImmediate);
  return settled;
}
