"""The feed-forward block of the configurable transformer: a dense MLP, gated (SwiGLU) or not, or a
top-k mixture of such MLPs (modeling/moe.py's MoEMLP, so expert parallelism shards it as the GPT's).

Dense: y = W_out act(x W_in), or with use_swiglu y = W_out (act(x W_gate) * x W_in) (SwiGLU when act
is swish). Shapes: (..., D) -> hidden H = dim_feedforward -> (..., D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modeling.moe import MoEMLP
from modeling.transformer.config import TransformerConfig

ACTIVATION_FNS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, activation: str, use_swiglu: bool):
        super().__init__()
        self.act = ACTIVATION_FNS[activation]
        self.w_in = nn.Linear(d_model, hidden)
        self.w_gate = nn.Linear(d_model, hidden) if use_swiglu else None
        self.w_out = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)  # (..., H)
        h = self.act(self.w_gate(x)) * h if self.w_gate is not None else self.act(h)
        return self.w_out(h)


def make_feed_forward(config: TransformerConfig, is_moe: bool) -> nn.Module:
    """A dense FeedForward, or (is_moe) an MoEMLP whose experts are as wide as the dense one."""
    if is_moe:
        return MoEMLP(config.d_model, config.dim_feedforward, config.moe_config(config.moe_activation))
    return FeedForward(config.d_model, config.dim_feedforward, config.activation, config.use_swiglu)
