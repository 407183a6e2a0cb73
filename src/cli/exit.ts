/**
 * How a sparsevirt process ends: the signals that interrupt a transfer, the exit status they
 * give, and the undo work a command leaves registered while it runs (a partly written download
 * that must not outlive a process ending before the command did).
 */

/** Signals that stop a transfer cleanly: the stream is aborted, a file it created removed. */
export const INTERRUPTS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
export type Interrupt = (typeof INTERRUPTS)[number];

const SIGNAL_NUMBERS: Record<Interrupt, number> = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 };

/** The abort reason of a transfer stopped by a signal. */
export class Interrupted extends Error {
  constructor(readonly signal: Interrupt) {
    super(`interrupted by ${signal}`);
  }
}

/** The exit status a shell reports for a process that `signal` ended: 128 + its number. */
export function signalStatus(signal: Interrupt): number {
  return 128 + SIGNAL_NUMBERS[signal];
}

/** The signal behind an exit status made by `signalStatus`, if any. */
export function statusSignal(status: number): Interrupt | null {
  return INTERRUPTS.find((s) => signalStatus(s) === status) ?? null;
}

/**
 * While a transfer runs, each of INTERRUPTS aborts `ac` with an `Interrupted` reason and tells
 * `onSignal`. A second signal does not wait for the clean end any longer: the undo work runs
 * and the process ends by that signal. Returns the function that removes the handlers again.
 */
export function catchInterrupts(ac: AbortController, onSignal: (signal: Interrupt) => void): () => void {
  const remove = () => {
    for (const [signal, h] of handlers) process.removeListener(signal, h);
  };
  const handlers = INTERRUPTS.map((signal) => {
    const h = () => {
      if (ac.signal.aborted) {
        remove();
        abandonAll();
        process.kill(process.pid, signal);
        return;
      }
      onSignal(signal);
      ac.abort(new Interrupted(signal));
    };
    process.on(signal, h);
    return [signal, h] as const;
  });
  return remove;
}

const undoWork = new Set<() => void>();

/**
 * Registers synchronous undo work for a command in progress (removing a file it created); the
 * returned function unregisters it once the command has cleaned up by itself.
 */
export function onAbandon(fn: () => void): () => void {
  undoWork.add(fn);
  return () => void undoWork.delete(fn);
}

/** Runs the undo work of every command still in progress (the process is about to exit). */
export function abandonAll(): void {
  for (const fn of [...undoWork]) {
    undoWork.delete(fn);
    try {
      fn();
    } catch {
      // exiting anyway
    }
  }
}

export const ABANDONED_MESSAGE = 'sparsevirt: internal error: the command ended without completing\n';
