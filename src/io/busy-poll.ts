/**
 * Busy polling. libvirtd sends a stream one packet per write, and its main thread waits for its
 * fd-stream thread between two packets. When our process then sleeps in epoll too, the CPUs go
 * idle, and every one of those hand-overs pays a wake-up from idle (in a guest, `haltpoll`): a
 * download of many small extents is then several times slower than virsh's, whose client stays
 * busy with its own work per packet. Keeping the event loop turning (an immediate, so that libuv
 * polls with a zero timeout) for a short while after each read while a stream is open keeps one
 * CPU busy for the length of such a transfer (large packets gain too); it stops by itself once
 * reads stop coming. One loop serves every connection. The client turns it on for libvirtd only
 * (`ConnectOptions.busyPoll`).
 */
let pollUntil = 0;
let polling = false;
let pollTurns = 0;

/** Keep the event loop turning for `ms` more (from now). */
export function keepPolling(ms: number): void {
  const until = performance.now() + ms;
  if (until > pollUntil) pollUntil = until;
  if (!polling) {
    polling = true;
    setImmediate(pollTurn);
  }
}

function pollTurn(): void {
  pollTurns++;
  if (performance.now() < pollUntil) setImmediate(pollTurn);
  else polling = false;
}

/** How many turns busy polling has made in this process, and whether it is on now. */
export function busyPollState(): { turns: number; polling: boolean } {
  return { turns: pollTurns, polling };
}
