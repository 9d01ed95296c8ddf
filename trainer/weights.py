"""`model.init_from`: a run that starts from another run's weights (fine-tuning, as TOTEM's seed
fine-tunes its VQ-VAE), with a fresh optimizer, schedule, step count and data position.

Any checkpoint format works (single-device / DDP files, ZeRO shards, FSDP's DCP): the weights
are consolidated first (trainer/export.py). Every tensor of the model must be in the checkpoint
with the same shape; otherwise the run stops before training with one line naming the tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from trainer.checkpoint import read_trainer_state
from trainer.inference import resolve_checkpoint

log = logging.getLogger("tokfleet.trainer")


def init_from_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Copy the weights of the checkpoint at `path` (a checkpoint folder or a run dir: its newest
    complete checkpoint) into `model`; returns the checkpoint folder."""
    from trainer.export import consolidated_state

    if not Path(path).exists():
        raise UserError(f"model.init_from: not found: {path}")
    directory = resolve_checkpoint(path)
    state = read_trainer_state(directory)
    tensors = consolidated_state(directory, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{name} {tuple(tensors[name].shape)} (model: {tuple(value.shape)})"
             for name, value in expected.items() if name in tensors and tensors[name].shape != value.shape]
    if missing or unexpected or wrong:
        parts = [f"shapes differ: {', '.join(wrong[:4])}" if wrong else "",
                 f"missing in the checkpoint: {', '.join(missing[:4])}" if missing else "",
                 f"not in the model: {', '.join(unexpected[:4])}" if unexpected else ""]
        source = state["model"]
        raise UserError(f"model.init_from {directory} ({source['name']} {source['flavor']}) does not fit this model: "
                        + "; ".join(part for part in parts if part))
    with torch.no_grad():
        for name, value in expected.items():
            value.copy_(tensors[name].to(dtype=value.dtype, device=value.device))
    log.info("initialised the weights from %s (step %d); optimizer and schedule start fresh", directory, state["step"])
    return directory
