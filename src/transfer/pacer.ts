/**
 * Pacing of small packets, for a receiver that cannot take them as fast as they come.
 *
 * Small packets (holes, data up to `PACED_DATA_MAX`) leave at most one per `PACE_US` on average,
 * checked every `PACE_EVERY`. libvirt 9.0's client reads packets on its event-loop thread into a
 * list that it walks to the end for each one it adds, while the program takes them off in
 * another thread. Sent faster than virsh writes them out (~15 µs per packet here), the list
 * grows, every read gets slower, and it never catches up: virsh downloading 100,000 4 KiB
 * extents from an unpaced daemon took 3 s four times in six and over 15 s (once 257 s) the
 * other times. Paced at 10 µs, one run in six still got stuck; at 20 µs, none did, in 4.1 s.
 * libvirtd itself sends such packets ~40 µs apart. The daemon paces every client that did not
 * say it takes a deep queue (`Peer.deepQueue`: virsh, or any libvirt client).
 */
export const PACE_US = 20;
const PACE_EVERY = 64;
/** Data packets up to this size count as small. */
export const PACED_DATA_MAX = 64 * 1024;

/** Holds back a sender of small packets to `PACE_US` each (no credit carried over, debt is). */
export class Pacer {
  private count = 0;
  private since = performance.now();
  /** Times this sender waited (for a log). */
  waits = 0;

  /** Call before each small packet; null at once unless this block went too fast. */
  next(): Promise<void> | null {
    if (++this.count < PACE_EVERY) return null;
    this.count = 0;
    const due = this.since + (PACE_EVERY * PACE_US) / 1000;
    const now = performance.now();
    if (now >= due) {
      this.since = now; // a slow block: no credit for the next one
      return null;
    }
    this.since = due; // a fast one: the next block starts where this one was due
    if (due - now < 0.5) return null; // (its debt carries over: not worth a timer yet)
    this.waits++;
    return new Promise((resolve) => setTimeout(resolve, due - now));
  }
}
