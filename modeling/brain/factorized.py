"""The factorized 1D autoencoder of MEG/EEG windows (brain-gen's research utility
models/tokenizers/factorized.py), registered as "MEGFactorizedAutoencoder".

Time and channels are compressed in interleaved stages, each feature belonging to one channel
(or reduced channel) until a channel-mixing matrix combines channels:
- stem: every channel lifted to hidden_features features by its own causal conv;
- stage s (encoder): causal depthwise conv along time with stride time_strides[s], LayerNorm over
  features, GELU, pointwise conv within each channel's features, LayerNorm, GELU; then a learned
  channel matrix (C_s -> C_s / channel_factors[s]) mixes channels feature by feature;
- projection of each reduced channel's features to latent_dim: latents (B, C_red, T_red, D).
The decoder mirrors it: projection back, then per stage a channel matrix (C_s -> C_s x factor),
nearest-neighbour upsampling by the stride and the same causal conv block, a refining block, and a
pointwise conv per channel to one value.

Loss (loss_name, brain-gen's recon_loss spellings): mse | l1 | huber (delta huber_delta) between the
reconstruction and the window. The reconstruction's MSE, correlation and PSD distance are reported.

Shapes: B batch, C channels, T samples, F hidden_features, C_red = C / prod(channel_factors),
T_red = T / prod(time_strides), D latent_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modeling.brain.bendr import CausalConv1d, FeatureNorm
from modeling.brain.signal_metrics import signal_metrics
from modeling.brain.signal_model import SignalModel, SignalPair
from modeling.registry import ModelSpec, register_model
from modeling.layers.stages import run_stages
from modeling.tokenizers.base import check_positive

LOSS_NAMES = ("mse", "l1", "huber")


@dataclass(frozen=True, kw_only=True)
class FactorizedConfig:
    num_channels: int = field(metadata={"help": "signal channels C; set by the trainer from the dataset's windows"})
    signal_length: int = field(metadata={"help": "samples per window T; set by the trainer from the dataset's windows"})
    time_strides: list[int] = field(metadata={"help": "temporal downsampling of each stage; T_red = T / their product"})
    channel_factors: list[int] = field(metadata={"help": "channel reduction of each stage (1: none), as many as time_strides"})
    hidden_features: int = field(metadata={"help": "features F per channel inside encoder and decoder (brain-gen: 32)"})
    latent_dim: int = field(metadata={"help": "latent features D per reduced channel and step (brain-gen: 128)"})
    stem_kernel_size: int = field(default=7, metadata={"help": "kernel of the causal stem conv"})
    down_kernel_size: int = field(default=5, metadata={"help": "kernel of each encoder stage's causal depthwise conv"})
    up_kernel_size: int = field(default=4, metadata={"help": "kernel of each decoder stage's causal depthwise conv"})
    refine_kernel_size: int = field(default=7, metadata={"help": "kernel of the decoder's refining depthwise conv"})
    dropout: float = field(default=0.0, metadata={"help": "dropout after each stage while training"})
    loss_name: str = field(default="mse", metadata={"help": "reconstruction loss: mse | l1 | huber"})
    huber_delta: float = field(default=1.0, metadata={"help": "delta of the huber loss"})
    use_gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each stage in the backward pass"})

    def __post_init__(self):
        check_positive(self, "num_channels", "signal_length", "time_strides", "channel_factors", "hidden_features", "latent_dim",
                       "stem_kernel_size", "down_kernel_size", "up_kernel_size", "refine_kernel_size", "huber_delta")
        if len(self.time_strides) != len(self.channel_factors):
            raise ValueError(f"time_strides ({self.time_strides}) and channel_factors ({self.channel_factors}) need one entry per stage")
        if self.num_channels % math.prod(self.channel_factors):
            raise ValueError(f"num_channels ({self.num_channels}) must be a multiple of prod(channel_factors) ({math.prod(self.channel_factors)})")
        if self.signal_length % math.prod(self.time_strides):
            raise ValueError(f"signal_length ({self.signal_length}) must be a multiple of prod(time_strides) ({math.prod(self.time_strides)})")
        if self.loss_name not in LOSS_NAMES:
            raise ValueError(f"loss_name must be one of {LOSS_NAMES}, got {self.loss_name!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def stage_channels(self) -> list[int]:
        """Channels before each encoder stage and after the last: [C, C / c_0, ..., C_red]."""
        channels = [self.num_channels]
        for factor in self.channel_factors:
            channels.append(channels[-1] // factor)
        return channels


class ChannelMix(nn.Module):
    """(B, C_in x F, T) -> (B, C_out x F, T): each feature's C_in channel values mixed by one (C_out, C_in) matrix."""

    def __init__(self, channels_in: int, channels_out: int, features: int):
        super().__init__()
        self.features = features
        self.weight = nn.Parameter(torch.empty(channels_out, channels_in))

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, _, T = h.shape
        mixed = torch.einsum("oc,bcft->boft", self.weight, h.view(B, -1, self.features, T))
        return mixed.reshape(B, -1, T)


class ConvBlock(nn.Sequential):
    """(B, C x F, T) -> (B, C x F, T / stride): causal depthwise conv, norm, GELU, pointwise conv
    within each channel's F features, norm, GELU, dropout."""

    def __init__(self, channels: int, features: int, kernel_size: int, stride: int, dropout: float):
        width = channels * features
        super().__init__(CausalConv1d(width, width, kernel_size, stride=stride, groups=width, bias=False), FeatureNorm(width), nn.GELU(),
                         nn.Conv1d(width, width, 1, groups=channels, bias=False), FeatureNorm(width), nn.GELU(), nn.Dropout(dropout))


class Upsample(nn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.repeat_interleave(self.factor, dim=-1)


class FactorizedEncoder(nn.Module):
    """(B, C, T) -> latents (B, C_red x D, T_red)."""

    def __init__(self, config: FactorizedConfig):
        super().__init__()
        channels, features = config.stage_channels(), config.hidden_features
        stem = nn.Sequential(CausalConv1d(config.num_channels, config.num_channels * features, config.stem_kernel_size,
                                          groups=config.num_channels, bias=False), FeatureNorm(config.num_channels * features), nn.GELU())
        stages = [nn.Sequential(ConvBlock(c_in, features, max(config.down_kernel_size, stride), stride, config.dropout),
                                ChannelMix(c_in, c_out, features) if c_out != c_in else nn.Identity())
                  for c_in, c_out, stride in zip(channels[:-1], channels[1:], config.time_strides)]
        reduced = channels[-1]
        projection = nn.Sequential(nn.Conv1d(reduced * features, reduced * config.latent_dim, 1, groups=reduced, bias=False),
                                   FeatureNorm(reduced * config.latent_dim), nn.GELU())
        self.stages = nn.ModuleList([stem, *stages, projection])
        self.use_gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages, x, self.use_gradient_checkpointing and self.training)


class FactorizedDecoder(nn.Module):
    """latents (B, C_red x D, T_red) -> reconstruction (B, C, T)."""

    def __init__(self, config: FactorizedConfig):
        super().__init__()
        channels, features = config.stage_channels()[::-1], config.hidden_features
        reduced = channels[0]
        projection = nn.Sequential(nn.Conv1d(reduced * config.latent_dim, reduced * features, 1, groups=reduced, bias=False),
                                   FeatureNorm(reduced * features), nn.GELU())
        stages = [nn.Sequential(ChannelMix(c_in, c_out, features) if c_out != c_in else nn.Identity(), Upsample(stride),
                                ConvBlock(c_out, features, config.up_kernel_size, 1, config.dropout))
                  for c_in, c_out, stride in zip(channels[:-1], channels[1:], config.time_strides[::-1])]
        width = config.num_channels * features
        refine = nn.Sequential(ConvBlock(config.num_channels, features, config.refine_kernel_size, 1, 0.0),
                               nn.Conv1d(width, config.num_channels, 1, groups=config.num_channels))
        self.stages = nn.ModuleList([projection, *stages, refine])
        self.use_gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages, z, self.use_gradient_checkpointing and self.training)


class MEGFactorizedAutoencoder(SignalModel):
    """forward(signal (B, C, T)) -> scalar reconstruction loss; encode / decode below."""

    baseline_name = "zeros (each window's normalised mean)"
    _no_split_modules = ["FactorizedEncoder", "FactorizedDecoder"]

    def __init__(self, config: FactorizedConfig):
        super().__init__()
        self.config = config
        self.encoder = FactorizedEncoder(config)
        self.decoder = FactorizedDecoder(config)
        self.set_gradient_checkpointing(config.use_gradient_checkpointing)

    def encode(self, signal: torch.Tensor) -> torch.Tensor:
        """signal (B, C, T) -> latents (B, C_red, T_red, D)."""
        z = self.encoder(self.check_signal(signal))
        B, _, T_red = z.shape
        return z.view(B, -1, self.config.latent_dim, T_red).transpose(2, 3)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C_red, T_red, D) -> reconstruction (B, C, T)."""
        B, C_red, T_red, D = latents.shape
        return self.decoder(latents.transpose(2, 3).reshape(B, C_red * D, T_red))

    def reconstruction_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.config.loss_name == "l1":
            return F.l1_loss(reconstruction, target)
        if self.config.loss_name == "huber":
            return F.huber_loss(reconstruction, target, delta=self.config.huber_delta)
        return F.mse_loss(reconstruction, target)

    def forward(self, signal: torch.Tensor, pos: torch.Tensor | None = None,
                sensor_type: torch.Tensor | None = None) -> torch.Tensor:
        """signal (B, C, T) -> scalar loss (pos and sensor_type accepted and unused)."""
        del pos, sensor_type
        x = self.check_signal(signal)
        reconstruction = self.decode(self.encode(x))
        loss = self.reconstruction_loss(reconstruction, x)
        parts = {"reconstruction_loss": loss, **{f"reconstruction_{k}": v for k, v in signal_metrics(reconstruction, x).items()}}
        self.keep_parts(parts, x.shape[0])
        self.last_metrics = {name: value.detach() for name, value in parts.items()}
        return loss

    @torch.no_grad()
    def evaluation_pair(self, signal: torch.Tensor, generator: torch.Generator | None = None) -> SignalPair:
        x = self.check_signal(signal)
        return SignalPair(self.decode(self.encode(x)), x, torch.zeros_like(x))


FACTORIZED_FLAVORS = {
    "debug": dict(num_channels=8, signal_length=128, time_strides=[2, 2], channel_factors=[2, 2], hidden_features=8, latent_dim=16),
    "small": dict(num_channels=64, signal_length=512, time_strides=[2, 2], channel_factors=[2, 2], hidden_features=16, latent_dim=64),
    # brain-gen's defaults: 68 ROIs reduced 4x in channels and 4x in time, F = 32, D = 128
    "full": dict(num_channels=68, signal_length=1024, time_strides=[2, 2], channel_factors=[2, 2], hidden_features=32, latent_dim=128),
}

register_model(ModelSpec(name="MEGFactorizedAutoencoder", config_cls=FactorizedConfig, builder=MEGFactorizedAutoencoder,
                         flavors=FACTORIZED_FLAVORS, task="signal_reconstruction"))
