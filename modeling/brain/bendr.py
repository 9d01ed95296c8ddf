"""BENDRForecast: a causal convolutional encoder and a causal transformer contextualiser that forecast
continuous MEG/EEG samples, registered as "BENDRForecast" (brain-gen's spelling).

After BENDR (Kostas et al. 2021), turned into a forecaster as brain-gen does:
1. The encoder is a stack of causal strided convs (left padding kernel - stride), each followed by a
   LayerNorm over features at each step and GELU: (B, C, T) -> (B, H, T / S), S = prod(strides).
   Step j sees samples < (j + 1) S only. (BENDR's GroupNorm pools over time, which would leak
   later samples into earlier steps; a per-step LayerNorm keeps the encoder causal.)
2. The contextualiser adds a causal convolutional position encoding, projects H -> D and runs
   pre-norm transformer blocks with causal self-attention.
3. A linear head reads each step j and predicts the output_samples (T_out) samples that follow it:
   samples (j + 1) S .. (j + 1) S + T_out - 1, for every channel.

Training on a window (B, C, T): the encoder reads its first T - T_out samples and every step is
trained on the T_out samples after it (all inside the window), so one window gives (T - T_out) / S
forecasts; the last one is the forecast of the window's last T_out samples from all before them,
`predict`'s output. loss_name: "MSE" (brain-gen's MSE) or "SpectralLoss" (MSE plus spectral_weight
x the squared difference of the log periodograms of forecast and target; brain-gen's SpectralLoss
compares log band powers, which needs the sampling rate).

Shapes: B batch, C channels, T samples per window, S encoder stride, N = (T - T_out) / S steps,
H encoder width, D transformer width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.brain.signal_metrics import periodogram, signal_metrics
from modeling.brain.signal_model import SignalModel, SignalPair
from modeling.registry import ModelSpec, register_model
from modeling.tokenizers.base import check_positive

LOSS_NAMES = ("MSE", "SpectralLoss")
LOG_POWER_FLOOR = 1e-6


@dataclass(frozen=True, kw_only=True)
class BENDRConfig:
    num_channels: int = field(metadata={"help": "signal channels C; set by the trainer from the dataset's windows"})
    signal_length: int = field(metadata={"help": "samples per window T; set by the trainer from the dataset's windows"})
    output_samples: int = field(metadata={"help": "samples T_out forecast after the context; a multiple of prod(encoder_strides)"})
    encoder_hidden: int = field(metadata={"help": "width H of the convolutional encoder (BENDR: 512)"})
    encoder_kernel_sizes: list[int] = field(metadata={"help": "kernel width of each causal encoder conv (each >= its stride)"})
    encoder_strides: list[int] = field(metadata={"help": "stride of each encoder conv; their product S is samples per encoded step"})
    transformer_dim: int = field(metadata={"help": "width D of the contextualiser (BENDR: 3 x encoder_hidden)"})
    num_layers: int = field(metadata={"help": "transformer blocks of the contextualiser (BENDR: 8)"})
    num_heads: int = field(metadata={"help": "attention heads; divides transformer_dim"})
    mlp_ratio: int = field(default=4, metadata={"help": "hidden width of a block's MLP, in multiples of transformer_dim"})
    position_kernel_size: int = field(default=25, metadata={"help": "kernel of the causal convolutional position encoding (BENDR: 25); 0: none"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in encoder, attention and MLPs while training (brain-gen: 0.15)"})
    loss_name: str = field(default="MSE", metadata={"help": "training loss: MSE | SpectralLoss (MSE + spectral_weight x log-spectrum MSE)"})
    spectral_weight: float = field(default=1.0, metadata={"help": "weight of the log-spectrum term of SpectralLoss"})
    use_gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each transformer block in the backward pass"})

    def __post_init__(self):
        check_positive(self, "num_channels", "signal_length", "output_samples", "encoder_hidden", "encoder_kernel_sizes",
                       "encoder_strides", "transformer_dim", "num_layers", "num_heads", "mlp_ratio")
        if len(self.encoder_kernel_sizes) != len(self.encoder_strides):
            raise ValueError(f"encoder_kernel_sizes ({self.encoder_kernel_sizes}) and encoder_strides ({self.encoder_strides}) "
                             "must have the same length")
        if any(k < s for k, s in zip(self.encoder_kernel_sizes, self.encoder_strides)):
            raise ValueError(f"each of encoder_kernel_sizes {self.encoder_kernel_sizes} must be >= its stride {self.encoder_strides}")
        stride = math.prod(self.encoder_strides)
        if self.output_samples % stride:
            raise ValueError(f"output_samples ({self.output_samples}) must be a multiple of prod(encoder_strides) ({stride})")
        if self.signal_length % stride or self.signal_length <= self.output_samples:
            raise ValueError(f"signal_length ({self.signal_length}) must be a multiple of prod(encoder_strides) ({stride}) "
                             f"and longer than output_samples ({self.output_samples})")
        if self.transformer_dim % self.num_heads:
            raise ValueError(f"transformer_dim ({self.transformer_dim}) must be a multiple of num_heads ({self.num_heads})")
        if self.loss_name not in LOSS_NAMES:
            raise ValueError(f"loss_name must be one of {LOSS_NAMES}, got {self.loss_name!r}")
        if self.position_kernel_size < 0 or self.spectral_weight < 0:
            raise ValueError("position_kernel_size and spectral_weight must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def stride(self) -> int:
        return math.prod(self.encoder_strides)


class FeatureNorm(nn.LayerNorm):
    """LayerNorm over the features of each time step of (B, F, T): no statistics across time. The output
    is made contiguous again: left transposed, the next elementwise backward (GELU's) runs on mismatched
    strides, which made the factorized autoencoder's training step ~2x slower on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2).contiguous()


class CausalConv1d(nn.Conv1d):
    """Conv1d with left padding kernel - stride: output step j sees inputs < (j + 1) stride."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.dilation[0] * (self.kernel_size[0] - 1) + 1 - self.stride[0]
        return super().forward(F.pad(x, (left, 0)))


class ConvEncoder(nn.Module):
    """(B, C, T) -> (B, H, T / S), causal."""

    def __init__(self, config: BENDRConfig):
        super().__init__()
        widths = [config.num_channels] + [config.encoder_hidden] * len(config.encoder_strides)
        self.layers = nn.Sequential(*(
            nn.Sequential(CausalConv1d(width_in, width_out, kernel, stride=stride), nn.Dropout(config.dropout),
                          FeatureNorm(width_out), nn.GELU())
            for width_in, width_out, kernel, stride in zip(widths[:-1], widths[1:], config.encoder_kernel_sizes, config.encoder_strides)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CausalSelfAttentionBlock(nn.Module):
    """Pre-norm transformer block with causal multi-head self-attention: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.out(attended.transpose(1, 2).reshape(B, N, D)), self.dropout, self.training)
        return x + self.mlp(self.mlp_norm(x))


class Contextualiser(nn.Module):
    """(B, H, N) encoded steps -> (B, N, D) contextual vectors, step j attending to steps <= j."""

    def __init__(self, config: BENDRConfig):
        super().__init__()
        hidden = config.encoder_hidden
        self.position = None
        if config.position_kernel_size:  # grouped as BENDR's (16 groups), causal here
            self.position = CausalConv1d(hidden, hidden, config.position_kernel_size, groups=math.gcd(16, hidden))
        self.input_norm = nn.LayerNorm(hidden)
        self.input_projection = nn.Linear(hidden, config.transformer_dim)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(config.transformer_dim, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(config.transformer_dim)
        self.dropout = config.dropout
        self.use_gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.position is not None:
            z = z + F.gelu(self.position(z))
        x = self.input_projection(F.dropout(self.input_norm(z.transpose(1, 2)), self.dropout, self.training))  # (B, N, D)
        is_checkpointing = self.use_gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if is_checkpointing else block(x)
        return self.final_norm(x)


class BENDRForecast(SignalModel):
    """forward(signal (B, C, T)) -> scalar loss; predict(context (B, C, L)) -> forecast (B, C, T_out)."""

    baseline_name = "last context sample repeated"
    _no_split_modules = ["CausalSelfAttentionBlock"]

    def __init__(self, config: BENDRConfig):
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config)
        self.contextualiser = Contextualiser(config)
        self.head = nn.Linear(config.transformer_dim, config.num_channels * config.output_samples)
        self.set_gradient_checkpointing(config.use_gradient_checkpointing)

    def forecast_steps(self, context: torch.Tensor) -> torch.Tensor:
        """context (B, C, L), L a multiple of S -> (B, N, C, T_out), N = L / S: at step j the T_out samples
        after sample (j + 1) S - 1, from samples < (j + 1) S."""
        B, C, L = context.shape
        if L == 0 or L % self.config.stride:
            raise ValueError(f"context length {L} must be a non-zero multiple of prod(encoder_strides)={self.config.stride}")
        x = self.contextualiser(self.encoder(context.float()))  # (B, N, D)
        return self.head(x).view(B, x.shape[1], C, self.config.output_samples)

    def forward(self, signal: torch.Tensor, pos: torch.Tensor | None = None,
                sensor_type: torch.Tensor | None = None) -> torch.Tensor:
        """signal (B, C, T) -> scalar loss over every step's forecast. pos and sensor_type are accepted
        and unused, so the model takes the same batches as the signal tokenizers."""
        del pos, sensor_type
        x = self.check_signal(signal)
        T_out, S = self.config.output_samples, self.config.stride
        forecasts = self.forecast_steps(x[..., :-T_out])  # (B, N, C, T_out)
        targets = x[..., S:].unfold(-1, T_out, S).transpose(1, 2)  # (B, N, C, T_out): windows starting at S, 2S, ...
        mse = F.mse_loss(forecasts, targets)
        parts = {"forecast_mse": mse}
        loss = mse
        if self.config.loss_name == "SpectralLoss":
            spectral = F.mse_loss(torch.log(periodogram(forecasts) + LOG_POWER_FLOOR), torch.log(periodogram(targets) + LOG_POWER_FLOOR))
            parts["log_spectrum_mse"] = spectral
            loss = mse + self.config.spectral_weight * spectral
        last = signal_metrics(forecasts[:, -1], targets[:, -1])  # the window's last T_out samples
        parts.update({f"horizon_{name}": value for name, value in last.items()})
        self.keep_parts(parts, x.shape[0])
        self.last_metrics = {name: value.detach() for name, value in parts.items()}
        return loss

    @torch.no_grad()
    def predict(self, context: torch.Tensor) -> torch.Tensor:
        """context (B, C, L) -> the T_out samples after it (B, C, T_out); the first L % S samples are not read."""
        usable = context.shape[-1] - context.shape[-1] % self.config.stride
        return self.forecast_steps(context[..., context.shape[-1] - usable:])[:, -1]

    @torch.no_grad()
    def evaluation_pair(self, signal: torch.Tensor, generator: torch.Generator | None = None) -> SignalPair:
        """The forecast of each window's last T_out samples from the samples before them."""
        x = signal.float()
        T_out = self.config.output_samples
        context, target = x[..., :-T_out], x[..., -T_out:]
        return SignalPair(self.predict(context), target, context[..., -1:].expand_as(target))


BENDR_FLAVORS = {
    "debug": dict(num_channels=8, signal_length=128, output_samples=16, encoder_hidden=32, encoder_kernel_sizes=[3, 2, 2],
                  encoder_strides=[2, 2, 1], transformer_dim=48, num_layers=2, num_heads=2, position_kernel_size=5),
    "small": dict(num_channels=64, signal_length=512, output_samples=64, encoder_hidden=128, encoder_kernel_sizes=[3, 2, 2, 2],
                  encoder_strides=[2, 2, 2, 1], transformer_dim=256, num_layers=4, num_heads=4, dropout=0.1),
    # BENDR's published sizes: 512-wide encoder of 6 convs (strides 2, 2, 2, 1, 1, 1), 8 blocks of 3 x 512
    "full": dict(num_channels=306, signal_length=1024, output_samples=128, encoder_hidden=512,
                 encoder_kernel_sizes=[3, 2, 2, 2, 2, 2], encoder_strides=[2, 2, 2, 1, 1, 1], transformer_dim=1536,
                 num_layers=8, num_heads=8, dropout=0.15),
}

register_model(ModelSpec(name="BENDRForecast", config_cls=BENDRConfig, builder=BENDRForecast, flavors=BENDR_FLAVORS,
                         task="signal_forecast"))
