"""`checkpoint.keep_best`: which checkpoint holds the best value of a logged metric so far.

A checkpoint is a candidate when the metric was logged at its step (its metrics.jsonl record);
core/config.py check_keep_best makes sure every periodic checkpoint step logs it. The best value
and its step travel in trainer_state.json, so a resumed run (at any world size) compares against
the same best. Every rank decides on rank 0's record (the one metrics.jsonl holds; its losses are
all-reduced), so all ranks take the same decision.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from core.errors import UserError
from trainer import distributed

log = logging.getLogger("tokfleet.trainer")


class BestCheckpoint:
    def __init__(self, metric: str, mode: str):
        assert mode in ("min", "max"), mode
        self.metric, self.mode = metric, mode
        self.step: int | None = None  # of the best checkpoint so far
        self.value: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "step": self.step, "value": self.value}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's best (None: saved without keep_best); another metric or mode starts over."""
        if not state or state.get("step") is None:
            return
        if (state["metric"], state["mode"]) != (self.metric, self.mode):
            log.info("checkpoint.keep_best is %s (%s), the checkpoint's best was by %s (%s): the best starts over",
                     self.metric, self.mode, state["metric"], state["mode"])
            return
        self.step, self.value = state["step"], state["value"]

    def offer(self, step: int, record: dict[str, Any], is_scheduled: bool) -> bool:
        """Whether the checkpoint of `step` is the new best; `record`: the last metrics record logged
        (a candidate when it holds the metric and is of `step`); `is_scheduled`: a periodic or final
        checkpoint, whose step logs the metric (a stop or preemption between them need not).
        Collective: every rank calls it at every checkpoint."""
        is_logged = record.get("step") == step
        value, logged_keys = distributed.broadcast_object((record.get(self.metric), sorted(record)) if is_logged else (None, None))
        if logged_keys is None:  # a checkpoint between logging steps (a stop or preemption): no candidate
            return False
        if value is None:
            if is_scheduled and self.step is None:  # never logged so far: a name metrics.jsonl does not have
                why = "; a rank read no validation batch: give the val split more samples" if self.metric == "val_loss" else ""
                raise UserError(f"checkpoint.keep_best: {self.metric!r} was not logged at step {step} "
                                f"(metrics.jsonl records hold: {', '.join(logged_keys)}){why}")
            return False
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"checkpoint.keep_best: {self.metric!r} is not a number (step {step} logged {value!r})")
        if not math.isfinite(value):  # a diverged step is never the best
            return False
        if self.value is not None and not (value < self.value if self.mode == "min" else value > self.value):
            return False
        self.step, self.value = step, float(value)
        return True
