"""Checkpoint and stop when the cluster warns that the job is about to end (SIGUSR1).

SLURM sends the warning before a time limit or a preemption (`sbatch --signal`, see
slurm/train.sbatch); `kill -USR1` on a rank does the same by hand. The handler only sets a
flag: the loop asks `should_stop()` at each logging step (`logging.every_steps`), a step
boundary where a checkpoint is consistent and the ranks already synchronise to average the loss,
so the other steps gain no collective and no host-device sync. Ranks may see the signal at
different steps (or only some of them see it), so with several ranks the flag is all-reduced
(MAX): one int64 collective, and every rank stops after the same step. The loop then saves a checkpoint exactly as `--stop-at-step` does and
returns; the job script requeues the job, which resumes with `--resume auto`.
"""

from __future__ import annotations

import signal
import threading

from trainer import distributed

STOP_SIGNAL = signal.SIGUSR1


class PreemptionWatcher:
    """Installs the SIGUSR1 handler for the life of a training loop; `close()` restores the previous one."""

    def __init__(self):
        self._is_requested = False
        # Python sets handlers from the main thread only; a Ray Train worker runs the loop in another
        # thread (and gets no cluster signal: Ray stops its workers itself)
        self._is_installed = threading.current_thread() is threading.main_thread()
        self._previous = signal.signal(STOP_SIGNAL, self._on_signal) if self._is_installed else None

    def _on_signal(self, signum, frame) -> None:
        # nothing else is safe here: we may be inside a collective or a checkpoint write
        self._is_requested = True

    def should_stop(self) -> bool:
        """True on every rank once any rank got the signal (collective: every rank calls it at the same steps)."""
        self._is_requested = bool(distributed.all_reduce_max(int(self._is_requested)))
        return self._is_requested

    def close(self) -> None:
        if self._is_installed:
            signal.signal(STOP_SIGNAL, self._previous)
