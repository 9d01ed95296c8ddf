"""brain-gen's classifiers: one class label per window of MEG/EEG, read raw or as tokenizer codes.

    model                      input                                     output
    ClassifierContinuous       signal (B, C, T) float: raw windows       logits (B, num_classes)
    ClassifierQuantized        tokens (B, C, T) ids: a series per channel
    ClassifierQuantizedImage   tokens (B, H, W, T) ids: a grid of sites

Each is a stack of strided temporal convolutions (residual, pre-norm), averaged over time, then a
head: ClassifierContinuous mixes the channels in its first convolution; the quantized ones embed each
code, run the stack per channel (1D) or over the site grid (3D, spatial kernel 3), reduce each
channel's (site's) feature to `reduce_dim` and classify the concatenation, so channel identity is kept.

forward(x) -> logits; forward(x, label) -> mean cross-entropy against `label` (B,) int64, with the
batch's accuracy in `last_report`. The trainer fills num_classes from the dataset's classes and the
input sizes (channels, grid, vocabulary) from its shapes (trainer/classification.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modeling.registry import ModelSpec, register_model
from modeling.layers.stages import run_stages
from modeling.tokenizers.base import TokenizerModel, check_positive


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ClassifierContinuousConfig:
    num_channels: int = field(default=8, metadata=_help("input channels C (taken from the dataset)"))
    sequence_len: int = field(default=500, metadata=_help("samples per window T (taken from the dataset; only the FLOP count's nominal input)"))
    num_classes: int = field(default=2, metadata=_help("classes (taken from the dataset's manifest)"))
    d_model: int = field(default=64, metadata=_help("feature width of the convolution stack"))
    num_layers: int = field(default=4, metadata=_help("strided residual conv blocks"))
    kernel_size: int = field(default=7, metadata=_help("temporal kernel of every convolution (odd)"))
    stride: int = field(default=2, metadata=_help("temporal downsampling of each block"))
    dropout: float = field(default=0.0, metadata=_help("dropout before the class head"))

    def __post_init__(self):
        _check(self)


@dataclass
class ClassifierQuantizedConfig:
    vocab_size: int = field(default=256, metadata=_help("codebook size of the tokens (taken from the dataset)"))
    num_channels: int = field(default=8, metadata=_help("channels C of the (C, T) token windows (taken from the dataset)"))
    sequence_len: int = field(default=128, metadata=_help("codes per channel T (taken from the dataset; only the FLOP count's nominal input)"))
    num_classes: int = field(default=2, metadata=_help("classes (taken from the dataset's manifest)"))
    d_model: int = field(default=64, metadata=_help("code embedding and feature width"))
    reduce_dim: int = field(default=8, metadata=_help("per-channel feature width before the channels are concatenated"))
    num_layers: int = field(default=3, metadata=_help("strided residual conv blocks over time"))
    kernel_size: int = field(default=5, metadata=_help("temporal kernel of every convolution (odd)"))
    stride: int = field(default=2, metadata=_help("temporal downsampling of each block"))
    dropout: float = field(default=0.0, metadata=_help("dropout before the class head"))

    def __post_init__(self):
        _check(self)


@dataclass
class ClassifierQuantizedImageConfig:
    vocab_size: int = field(default=256, metadata=_help("codebook size of the tokens (taken from the dataset)"))
    height: int = field(default=4, metadata=_help("grid height H (taken from the dataset)"))
    width: int = field(default=4, metadata=_help("grid width W (taken from the dataset)"))
    sequence_len: int = field(default=128, metadata=_help("codes per site T (taken from the dataset; only the FLOP count's nominal input)"))
    num_classes: int = field(default=2, metadata=_help("classes (taken from the dataset's manifest)"))
    d_model: int = field(default=32, metadata=_help("code embedding and feature width"))
    reduce_dim: int = field(default=4, metadata=_help("per-site feature width before the sites are concatenated"))
    num_layers: int = field(default=3, metadata=_help("strided residual 3D conv blocks (time x height x width)"))
    kernel_size: int = field(default=5, metadata=_help("temporal kernel of every convolution (odd); the spatial kernel is 3"))
    stride: int = field(default=2, metadata=_help("temporal downsampling of each block"))
    dropout: float = field(default=0.0, metadata=_help("dropout before the class head"))

    def __post_init__(self):
        _check(self)


def _check(config) -> None:
    names = [name for name in ("vocab_size", "num_channels", "height", "width", "sequence_len", "num_classes", "d_model",
                               "reduce_dim", "num_layers", "kernel_size", "stride") if hasattr(config, name)]
    check_positive(config, *names)
    if config.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {config.kernel_size}")
    if config.num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {config.num_classes}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")


# ------------------------------------------------------------------ layers


class DownBlock(nn.Module):
    """x + conv(gelu(norm(x))), the conv strided in time, the skip average-pooled to match: (B, D, T, ...)
    -> (B, D, ceil(T / stride), ...). `dims` 1: (B, D, T); 3: (B, D, T, H, W), spatial kernel 3, no stride."""

    def __init__(self, width: int, kernel_size: int, stride: int, dims: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, width)  # over every feature of a sample: independent of the batch
        if dims == 1:
            self.conv = nn.Conv1d(width, width, kernel_size, stride=stride, padding=kernel_size // 2)
            self.skip = nn.AvgPool1d(stride, ceil_mode=True) if stride > 1 else nn.Identity()
        else:
            self.conv = nn.Conv3d(width, width, (kernel_size, 3, 3), stride=(stride, 1, 1), padding=(kernel_size // 2, 1, 1))
            self.skip = nn.AvgPool3d((stride, 1, 1), ceil_mode=True) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv(F.gelu(self.norm(x)))


POWER_EPS = 1e-4


class TemporalStack(nn.Module):
    """num_layers DownBlocks, then the log mean power of each normalised feature over time: (B, D, T, ...) -> (B, D, ...)."""

    def __init__(self, width: int, num_layers: int, kernel_size: int, stride: int, dims: int):
        super().__init__()
        self.blocks = nn.ModuleList(DownBlock(width, kernel_size, stride, dims) for _ in range(num_layers))
        self.norm = nn.GroupNorm(1, width)
        self.use_gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_stages(self.blocks, x, self.use_gradient_checkpointing and self.training)
        # log of each feature's mean power over time: oscillations show as power in the features that
        # filter their band (ShallowConvNet's square-mean-log), whatever their phase
        return torch.log(self.norm(x).pow(2).mean(dim=2) + POWER_EPS)


class Classifier(TokenizerModel):
    """What the three share: the loss against `label`, its accuracy report, init, params and FLOPs
    (TokenizerModel: per input element, counted on a meta copy)."""

    def classify(self, x: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        logits = self.logits(x)  # (B, num_classes)
        if label is None:
            return logits
        label = label.long()
        loss = F.cross_entropy(logits.float(), label)
        accuracy = (logits.argmax(dim=-1) == label).float().mean()
        self.keep_parts({"accuracy": accuracy.detach()}, label.shape[0])
        return loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClassifierContinuous(Classifier):
    """Raw windows (B, C, T) float -> logits (B, num_classes)."""

    input_name = "signal"

    def __init__(self, config: ClassifierContinuousConfig):
        super().__init__()
        self.config = config
        self.stem = nn.Conv1d(config.num_channels, config.d_model, config.kernel_size, padding=config.kernel_size // 2)
        self.stack = TemporalStack(config.d_model, config.num_layers, config.kernel_size, config.stride, dims=1)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.d_model, config.num_classes)

    def logits(self, signal: torch.Tensor) -> torch.Tensor:
        if signal.dim() != 3 or signal.shape[1] != self.config.num_channels:
            raise ValueError(f"signal must be (B, {self.config.num_channels}, T), got {tuple(signal.shape)}")
        features = self.stack(self.stem(signal))  # (B, D)
        return self.head(self.dropout(features))

    def forward(self, signal: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(signal, label)

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        return {"signal": torch.zeros(batch_size, self.config.num_channels, self.config.sequence_len, device=device)}


class ClassifierQuantized(Classifier):
    """Token windows (B, C, T) ids -> logits (B, num_classes)."""

    input_name = "tokens"

    def __init__(self, config: ClassifierQuantizedConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.stack = TemporalStack(config.d_model, config.num_layers, config.kernel_size, config.stride, dims=1)
        self.reduce = nn.Linear(config.d_model, config.reduce_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.num_channels * config.reduce_dim, config.num_classes)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        B, C, T = tokens.shape
        if C != self.config.num_channels:
            raise ValueError(f"tokens must be (B, {self.config.num_channels}, T), got {tuple(tokens.shape)}")
        x = self.embedding(tokens.long()).reshape(B * C, T, -1).transpose(1, 2)  # (B C, D, T)
        features = self.reduce(self.stack(x)).reshape(B, -1)  # (B, C R)
        return self.head(self.dropout(F.gelu(features)))

    def forward(self, tokens: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(tokens, label)

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        shape = (batch_size, self.config.num_channels, self.config.sequence_len)
        return {"tokens": torch.zeros(shape, dtype=torch.long, device=device)}


class ClassifierQuantizedImage(Classifier):
    """Token grids (B, H, W, T) ids -> logits (B, num_classes)."""

    input_name = "tokens"

    def __init__(self, config: ClassifierQuantizedImageConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.stack = TemporalStack(config.d_model, config.num_layers, config.kernel_size, config.stride, dims=3)
        self.reduce = nn.Linear(config.d_model, config.reduce_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.height * config.width * config.reduce_dim, config.num_classes)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        B, H, W, T = tokens.shape
        if (H, W) != (self.config.height, self.config.width):
            raise ValueError(f"tokens must be (B, {self.config.height}, {self.config.width}, T), got {tuple(tokens.shape)}")
        x = self.embedding(tokens.long()).permute(0, 4, 3, 1, 2)  # (B, D, T, H, W)
        features = self.stack(x).permute(0, 2, 3, 1)  # (B, H, W, D)
        features = self.reduce(features).reshape(B, -1)  # (B, H W R)
        return self.head(self.dropout(F.gelu(features)))

    def forward(self, tokens: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(tokens, label)

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
        shape = (batch_size, self.config.height, self.config.width, self.config.sequence_len)
        return {"tokens": torch.zeros(shape, dtype=torch.long, device=device)}


# ------------------------------------------------------------------ registry

register_model(ModelSpec(
    name="ClassifierContinuous", config_cls=ClassifierContinuousConfig, builder=ClassifierContinuous, task="classification",
    flavors={"debug": {"d_model": 16, "num_layers": 3, "kernel_size": 7},
             "small": {"d_model": 64, "num_layers": 5, "kernel_size": 7},
             "full": {"d_model": 256, "num_layers": 8, "kernel_size": 9, "dropout": 0.1}}))
register_model(ModelSpec(
    name="ClassifierQuantized", config_cls=ClassifierQuantizedConfig, builder=ClassifierQuantized, task="classification",
    flavors={"debug": {"d_model": 16, "reduce_dim": 4, "num_layers": 2, "kernel_size": 3},
             "small": {"d_model": 64, "reduce_dim": 8, "num_layers": 4, "kernel_size": 5},
             "full": {"d_model": 256, "reduce_dim": 16, "num_layers": 6, "kernel_size": 5, "dropout": 0.1}}))
register_model(ModelSpec(
    name="ClassifierQuantizedImage", config_cls=ClassifierQuantizedImageConfig, builder=ClassifierQuantizedImage,
    task="classification",
    flavors={"debug": {"d_model": 8, "reduce_dim": 2, "num_layers": 2, "kernel_size": 3},
             "small": {"d_model": 32, "reduce_dim": 4, "num_layers": 3, "kernel_size": 5},
             "full": {"d_model": 128, "reduce_dim": 8, "num_layers": 5, "kernel_size": 5, "dropout": 0.1}}))
