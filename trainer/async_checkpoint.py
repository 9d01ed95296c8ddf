"""Checkpoints written in the background (`checkpoint.async_save: true`).

A save copies the training state to host memory (the only part that blocks the loop) and hands the
copy to a writer thread; training goes on while the files are written. Each engine does the copy
its own way: FSDP2 with torch.distributed.checkpoint's `async_save` (it stages to CPU and writes
from a thread), DeepSpeed with a checkpoint engine that snapshots what `save_checkpoint` hands
it (DeepSpeed's own decoupled engine needs its NVMe/aio writer, absent on CPU hosts), the whole-tensor
formats with `to_host` below. After every rank's files are written (a barrier on a process group
of its own, so the writer threads never mix collectives with the training loop's), rank 0 finishes
the checkpoint: marker, rename, `latest`, pruning, upload. A crash before that leaves the previous
complete checkpoint the newest; the next save waits for this one first.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch

log = logging.getLogger("tokfleet.trainer")

Writer = Callable[[], None]  # writes a snapshot's files; runs on the writer thread


def to_host(obj: Any) -> Any:
    """A copy of `obj` (nested dicts, lists, tuples) whose tensors are new CPU tensors: training can
    change the originals in place while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((key, to_host(value)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_host(value) for value in obj)
    return obj  # numbers, strings, configs: not changed by training


class BackgroundSave:
    """One checkpoint being written by a daemon thread; `wait()` joins it and re-raises its error."""

    def __init__(self, name: str, work: Callable[[], None]):
        self.name = name
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"checkpoint-{name}", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - handed to the training thread at wait()
            self.error = error

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error

    @property
    def is_done(self) -> bool:
        return not self._thread.is_alive()
