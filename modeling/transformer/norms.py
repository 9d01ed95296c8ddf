"""The norms of the configurable transformer: LayerNorm, RMSNorm, and an adaptive norm that learns
how much of each it is.

`adaptive` (the seed's "learnable normalization"): per token, over the feature dimension,

    y = (x - a * mean(x)) / sqrt(mean((x - a * mean(x))^2) + eps) * gain + bias,   a = sigmoid(alpha)

a = 1 is LayerNorm, a = 0 is RMSNorm (plus a bias). `alpha` is one learned scalar per norm, starting
at 0 (a = 0.5), so each layer picks whether re-centring helps it. Per token, so it is causal and a
decoder step normalises the same in the full forward and in incremental decoding.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-5


class AdaptiveNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.empty(()))
        self.weight = nn.Parameter(torch.empty(d_model))
        self.bias = nn.Parameter(torch.empty(d_model))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.alpha)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - torch.sigmoid(self.alpha) * x.mean(dim=-1, keepdim=True)  # (..., D)
        scaled = centred * torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + self.eps)
        return scaled * self.weight + self.bias


def make_norm(norm_type: str, d_model: int) -> nn.Module:
    """A norm over the last dimension (d_model) with a learned gain: "layer", "rms" or "adaptive"."""
    if norm_type == "layer":
        return nn.LayerNorm(d_model, eps=EPS)
    if norm_type == "rms":
        return nn.RMSNorm(d_model, eps=EPS)
    if norm_type == "adaptive":
        return AdaptiveNorm(d_model)
    raise ValueError(f"norm_type must be layer, rms or adaptive, got {norm_type!r}")
