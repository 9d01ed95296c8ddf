"""The model's own figures (modeling/reports.py) summed between two log records and reduced over ranks.

After every training micro-batch the loop calls `add()`: each figure of the latest forward joins a
running sum on the device (no host sync). At a logging step every rank calls `reduce()`: one
all-reduce of one float64 vector (every figure's sums, in name order; every rank runs the same model,
so the same names), then

    mean  -> sum(value * weight) / sum(weight)       (e.g. "ce", "reconstruction_mse")
    count -> the sum since the last record           (e.g. "codebook/l0_revived", "moe/dropped")
    usage -> NAME_perplexity (exp of the entropy of the summed histogram), NAME_active (fraction of
             entries used at least once), NAME_max_over_mean (the busiest entry's load over the
             mean load); a histogram of at most 64 entries (an MoE's experts) is logged as a list
             NAME of fractions. Every histogram stays in `latest_usage` for the plots.

So a figure is the same whether the batch ran on one rank or on several, in one micro-batch or in
many: never one rank's number, never a mean of per-batch perplexities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from modeling.reports import collect, reporting_modules
from sharding.token_counts import entropy
from trainer import distributed

MAX_LISTED_ENTRIES = 64


class ReportWindow:
    def __init__(self, model: nn.Module):
        self.modules = reporting_modules(model)
        self.kinds: dict[str, str] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.latest_usage: dict[str, np.ndarray] = {}  # name -> summed histogram of the last record

    def add(self) -> None:
        """Add the latest forward's figures (after a training micro-batch)."""
        if not self.modules:
            return
        for name, reported in collect(self.modules).items():
            value = reported.value.detach().double()
            if reported.kind == "mean":
                weight = torch.as_tensor(reported.weight, dtype=torch.float64, device=value.device)
                entry = torch.stack([value.reshape(()) * weight, weight])
            else:
                entry = value.reshape(-1)
            self.kinds[name] = reported.kind
            self.sums[name] = entry if name not in self.sums else self.sums[name] + entry

    def _summed(self) -> tuple[list[str], list[int], np.ndarray]:
        """(names, sizes, every rank's sums concatenated): one all-reduce (a collective)."""
        names = sorted(self.sums)
        if not names:
            return [], [], np.zeros(0)
        sizes = [self.sums[name].numel() for name in names]
        flat = torch.cat([self.sums[name].reshape(-1) for name in names])
        return names, sizes, distributed.all_reduce_sum(flat).cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        """The sums since the last record over every rank (a collective), for a checkpoint: a resumed run
        logs at its next record what the uninterrupted run would, at any world size."""
        names, sizes, flat = self._summed()
        offsets = np.cumsum([0, *sizes])
        return {name: [self.kinds[name], flat[offsets[i] : offsets[i + 1]].tolist()] for i, name in enumerate(names)}

    def load_state_dict(self, state: dict[str, Any] | None, device: torch.device) -> None:
        """Rank 0 takes the saved sums, the other ranks start from none (the record sums over ranks)."""
        self.sums = {}
        if not state or distributed.rank() != 0:
            return
        for name, (kind, values) in state.items():
            self.kinds[name] = kind
            self.sums[name] = torch.tensor(values, dtype=torch.float64, device=device)

    def reduce(self) -> dict[str, Any]:
        """The figures since the last call, over every rank: a collective, called by every rank at the same steps."""
        names, sizes, flat = self._summed()
        self.sums = {}
        record: dict[str, Any] = {}
        offset = 0
        for name, size in zip(names, sizes):
            values = flat[offset : offset + size]
            offset += size
            kind = self.kinds[name]
            if kind == "mean":
                record[name] = float(values[0] / values[1]) if values[1] else float("nan")
            elif kind == "count":
                record[name] = float(values[0])
            else:
                record.update(usage_figures(name, values))
                self.latest_usage[name] = values.copy()
        return record


def usage_figures(name: str, histogram: np.ndarray) -> dict[str, Any]:
    total = float(histogram.sum())
    if total <= 0:
        return {f"{name}_perplexity": 0.0, f"{name}_active": 0.0, f"{name}_max_over_mean": 0.0}
    p = histogram / total
    figures = {
        f"{name}_perplexity": math.exp(entropy(histogram)),
        f"{name}_active": float((histogram > 0).mean()),
        f"{name}_max_over_mean": float(p.max() * len(p)),
    }
    if len(histogram) <= MAX_LISTED_ENTRIES:
        figures[name] = [round(float(x), 6) for x in p]
    return figures
