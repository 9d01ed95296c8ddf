"""What a model reports besides its loss: loss parts and model-health figures, declared by the model.

Any module of a model may keep `self.last_report: dict[str, Reported]`, the figures of its latest
forward (set in `forward`, detached, no host sync). The trainer finds those modules once
(`reporting_modules`), reads them after every training micro-batch (`collect`) and reduces them over
micro-batches, steps and ranks before it logs them (trainer/reports.py). Three kinds, each with the
reduction that keeps it exact when the batch is split over micro-batches and ranks:

- "mean": a mean over `weight` elements (a loss part over its tokens): sum(value * weight) / sum(weight);
- "count": summed (tokens dropped at an expert's capacity, dead codes revived);
- "usage": a histogram (codes per codebook entry, tokens per expert), summed; the trainer logs the
  summed histogram's perplexity and active fraction, or its normalised load, never a per-batch average.

Figures of the same name from several modules (one MoE layer per block) combine the same way, so a
model reports `moe/load` once, summed over its layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

KINDS = ("mean", "count", "usage")


@dataclass(frozen=True)
class Reported:
    value: torch.Tensor  # scalar ("mean", "count") or 1-D counts ("usage"); detached
    kind: str = "mean"
    weight: float | torch.Tensor = 1.0  # "mean" only: the number of elements the value averages

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"report kind {self.kind!r} is not one of {KINDS}")


def mean(value: torch.Tensor, weight: float | int | torch.Tensor) -> Reported:
    return Reported(value.detach().float(), "mean", weight)


def count(value: torch.Tensor | int) -> Reported:
    return Reported(torch.as_tensor(value).detach().float(), "count")


def usage(histogram: torch.Tensor) -> Reported:
    return Reported(histogram.detach().float(), "usage")


def reporting_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that keep a `last_report`."""
    return [module for module in model.modules() if isinstance(getattr(module, "last_report", None), dict)]


def collect(modules: Iterable[nn.Module]) -> dict[str, Reported]:
    """The latest forward's figures of `modules`, same-named ones combined by their kind."""
    merged: dict[str, Reported] = {}
    for module in modules:
        for name, reported in module.last_report.items():
            seen = merged.get(name)
            if seen is None:
                merged[name] = reported
            elif reported.kind == "mean":
                weight = seen.weight + reported.weight
                merged[name] = Reported((seen.value * seen.weight + reported.value * reported.weight) / weight, "mean", weight)
            else:
                merged[name] = Reported(seen.value + reported.value, reported.kind)
    return merged
