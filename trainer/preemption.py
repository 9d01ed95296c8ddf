"""Checkpoint and stop on the cluster's warning (SIGUSR1) or on Ctrl-C (SIGINT).

SLURM sends the warning before a time limit or a preemption (`sbatch --signal`, see
slurm/train.sbatch); `kill -USR1` on a rank does the same by hand. A terminal's Ctrl-C sends SIGINT.
The handlers only set a flag (nothing else is safe there: the loop may be inside a collective or a
checkpoint write, and a flag set during a write is acted on right after it, never lost). The loop
asks `should_stop()` after every step on one process; with several ranks, at each logging step
(`logging.every_steps`), a step boundary where the ranks already synchronise to average the loss,
so the other steps gain no collective and no host-device sync. Ranks may see a signal at different
steps (or only some of them see it), so with several ranks the flag is all-reduced (MAX): one int64
collective, and every rank stops after the same step. The loop then saves a checkpoint exactly as
`--stop-at-step` does and returns; after SIGUSR1 the job script requeues the job, which resumes with
`--resume auto`; after SIGINT the command exits 130 with one line. `tokfleet train` installs the
watcher before it loads anything, so a Ctrl-C during start-up is a flag too (the loop then stops
before its first step). A second SIGINT stops at once: one line and `os._exit(130)`, from wherever the
process is (an exception raised into arbitrary library code, e.g. half-way through an import, cannot
promise a clean exit); a checkpoint being written is left as a temporary folder, which the next start
removes, and the previous complete checkpoint stays.
"""

from __future__ import annotations

import signal
import sys
import threading

from core.errors import stop_at_once
from trainer import distributed

STOP_SIGNAL = signal.SIGUSR1


class PreemptionWatcher:
    """Installs the SIGUSR1 and SIGINT handlers for the life of a training loop; `close()` restores the previous ones."""

    def __init__(self, announce: bool = True):
        self._is_requested = False
        self.is_interrupted = False  # SIGINT (as opposed to the cluster's warning)
        self._announce = announce
        # Python sets handlers from the main thread only; a Ray Train worker runs the loop in another
        # thread (and gets no cluster signal: Ray stops its workers itself)
        self._is_installed = threading.current_thread() is threading.main_thread()
        self._previous = {}
        if self._is_installed:
            self._previous[STOP_SIGNAL] = signal.signal(STOP_SIGNAL, self._on_warning)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_warning(self, signum, frame) -> None:
        self._is_requested = True

    def _on_interrupt(self, signum, frame) -> None:
        if self.is_interrupted:  # the second Ctrl-C: stop now
            stop_at_once("tokfleet: interrupted: stopped at once; the newest complete checkpoint (if any) resumes with --resume auto")
        self.is_interrupted = self._is_requested = True
        if self._announce:
            print("tokfleet: interrupt: checkpointing after this step (Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (collective: every rank calls it at the same steps)."""
        if distributed.world_size() > 1:
            flags = distributed.all_reduce_max(int(self._is_requested) + 2 * int(self.is_interrupted))
            self._is_requested, self.is_interrupted = bool(flags), bool(flags & 2) or self.is_interrupted
        return self._is_requested

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
