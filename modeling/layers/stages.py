"""Running a stack of stages (conv blocks, down / up samplings) with optional gradient checkpointing."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_stages(stages: Iterable[nn.Module], x: torch.Tensor, use_gradient_checkpointing: bool) -> torch.Tensor:
    """x through each stage in turn; with checkpointing on (and gradients enabled) each stage is
    recomputed in the backward pass instead of keeping its activations. Encoders and decoders hold
    a `use_gradient_checkpointing` flag, which `set_gradient_checkpointing` sets, and pass
    `self.use_gradient_checkpointing and self.training` here."""
    is_checkpointing = use_gradient_checkpointing and torch.is_grad_enabled()
    for stage in stages:
        x = checkpoint(stage, x, use_reentrant=False) if is_checkpointing else stage(x)
    return x
