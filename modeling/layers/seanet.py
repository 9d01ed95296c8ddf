"""Causal SEANet encoder and decoder (EnCodec's conv stack), used by the BrainOmni tokenizers.

Encoder: conv(channels -> n_filters) -> per ratio r (in reverse order): residual blocks, ELU,
strided conv (width x2, kernel 2r, stride r) -> LSTM with a skip -> ELU -> conv(-> dimension).
Decoder mirrors it with transposed convs. Every conv is causal (modeling.layers.causal_conv) and the
LSTM is unidirectional, so latent frame j depends on input samples < (j + 1) * hop_length only,
and decoded sample t on latent frames <= t // hop_length only.

Differences from EnCodec/BrainOmni: no weight norm (BrainOmni's copy disables it too), and
lengths must be multiples of hop_length (no right padding exists in a causal stack).

Shapes: (B, channels, T) <-> (B, dimension, T / hop_length), hop_length = prod(ratios).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from modeling.layers.causal_conv import CausalConv1d, CausalConvTranspose1d
from modeling.layers.stages import run_stages


class SEANetResnetBlock(nn.Module):
    """x + conv1(ELU(conv_k(ELU(x)))) with a dim // compress bottleneck; kernel_size dilated."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int = 2):
        super().__init__()
        hidden = max(dim // compress, 1)
        self.block = nn.Sequential(
            nn.ELU(),
            CausalConv1d(dim, hidden, kernel_size, dilation=dilation),
            nn.ELU(),
            CausalConv1d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class SLSTM(nn.Module):
    """Unidirectional LSTM over time with a skip connection: (B, C, T) -> (B, C, T)."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TBC = x.permute(2, 0, 1)
        self.lstm.flatten_parameters()  # weights may be non-contiguous after to_empty / FSDP; cuDNN wants one block
        y_TBC, _ = self.lstm(x_TBC)
        return (y_TBC + x_TBC).permute(1, 2, 0)


@dataclass(frozen=True)
class SEANetShape:
    """The shape shared by an encoder and its decoder."""

    channels: int  # signal channels (1 for one series at a time)
    dimension: int  # latent width per frame
    n_filters: int  # width after the first conv; doubles at each ratio
    ratios: tuple[int, ...]  # decoder order (upsampling); the encoder downsamples in reverse
    kernel_size: int = 7
    last_kernel_size: int = 7
    n_residual_layers: int = 1
    lstm_layers: int = 2
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2

    def __post_init__(self):
        if not self.ratios or any(r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be a non-empty list of ints >= 1, got {self.ratios}")
        if self.n_filters < 1 or self.dimension < 1:
            raise ValueError(f"n_filters and dimension must be >= 1, got {self.n_filters}, {self.dimension}")

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    def residual_blocks(self, width: int) -> list[nn.Module]:
        return [SEANetResnetBlock(width, self.residual_kernel_size, self.dilation_base**j, self.compress)
                for j in range(self.n_residual_layers)]


class SEANetEncoder(nn.Module):
    """(B, channels, T) -> (B, dimension, T / hop_length); T must be a multiple of hop_length."""

    def __init__(self, shape: SEANetShape):
        super().__init__()
        self.hop_length = shape.hop_length
        self.use_gradient_checkpointing = False
        width = shape.n_filters
        stages: list[nn.Module] = [CausalConv1d(shape.channels, width, shape.kernel_size)]
        for ratio in reversed(shape.ratios):
            downsample = [nn.ELU(), CausalConv1d(width, 2 * width, kernel_size=2 * ratio, stride=ratio)]
            stages.append(nn.Sequential(*shape.residual_blocks(width), *downsample))
            width *= 2
        if shape.lstm_layers:
            stages.append(SLSTM(width, shape.lstm_layers))
        stages.append(nn.Sequential(nn.ELU(), CausalConv1d(width, shape.dimension, shape.last_kernel_size)))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages, x, self.use_gradient_checkpointing and self.training)


class SEANetDecoder(nn.Module):
    """(B, dimension, L) -> (B, channels, L * hop_length); mirrors SEANetEncoder."""

    def __init__(self, shape: SEANetShape):
        super().__init__()
        self.hop_length = shape.hop_length
        self.use_gradient_checkpointing = False
        width = shape.n_filters * 2 ** len(shape.ratios)
        stages: list[nn.Module] = [CausalConv1d(shape.dimension, width, shape.kernel_size)]
        if shape.lstm_layers:
            stages.append(SLSTM(width, shape.lstm_layers))
        for ratio in shape.ratios:
            upsample = [nn.ELU(), CausalConvTranspose1d(width, width // 2, kernel_size=2 * ratio, stride=ratio)]
            width //= 2
            stages.append(nn.Sequential(*upsample, *shape.residual_blocks(width)))
        stages.append(nn.Sequential(nn.ELU(), CausalConv1d(width, shape.channels, shape.last_kernel_size)))
        self.stages = nn.ModuleList(stages)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages, z, self.use_gradient_checkpointing and self.training)
