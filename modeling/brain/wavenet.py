"""brain-gen's WaveNets over token ids (seed 004): WavenetFullChannel and Wavenet3D.

Both are a stack of gated causal dilated convolutions over time (van den Oord et al. 2016):

    h = tanh(W_f * x) . sigmoid(W_g * x)        one conv gives both halves, left-padded in time
    skip_l = W_s h;   x <- x + W_r h            (1 x 1 convs; the first layer, kernel 1, maps the
                                                 embedding width to the residual width)
    logits = W_2 LeakyReLU(W_1 LeakyReLU(sum_l skip_l))

- WavenetFullChannel: ids (B, C, T), C quantised input channels (MEG sensors or token-grid sites),
  each code a class of Q = vocab_size (brain-gen's quant_levels). Every channel has its own embedding
  table; the conv stack is shared and runs over each channel's series alone (B C rows of Conv1d).
  brain-gen's head gives (B C, Q, T) per channel, returned as logits (B, C, T, Q): the class axis
  last, as every sequence model here.
- Wavenet3D: ids (B, H, W, T) of a token grid, one embedding table; Conv3d with kernels (kh, kw, k):
  causal in time, `same`-padded over the grid -> logits (B, H, W, T, V).

Decoding (fast WaveNet, Paine et al. 2016): each layer keeps a queue of the last (k - 1) d inputs it
saw; a new time step is convolved with its queue alone, so one step costs one position per layer and
the result equals the full forward.

Shapes: B batch, E embedding width, R residual, G gate (dilation_channels), S skip, K head width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.brain.token_model import TokenGridModel, TokenLossFields
from modeling.registry import ModelSpec, register_model


@dataclass(frozen=True, kw_only=True)
class WavenetFields(TokenLossFields):
    """What both WaveNets share."""

    vocab_size: int = field(metadata={"help": "codes per position (Q, brain-gen's quant_levels); the trainer sets it from the data"})
    embedding_dim: int = field(metadata={"help": "code embedding width (brain-gen's quant_emb)"})
    residual_channels: int = field(metadata={"help": "width of the residual stream (R)"})
    dilation_channels: int = field(metadata={"help": "width of the gated activation (G)"})
    skip_channels: int = field(metadata={"help": "width of each layer's skip output (S)"})
    head_channels: int = field(metadata={"help": "hidden width of the logits head (K)"})
    kernel_size: int = field(default=2, metadata={"help": "temporal kernel of the dilated convolutions"})
    dilations: list = field(default_factory=lambda: [1, 2, 4, 8], metadata={
        "help": "dilation of each dilated layer (receptive field: 1 + (kernel_size - 1) x sum)"})
    dropout: float = field(default=0.0, metadata={"help": "training-time dropout on each layer's residual output and in the head"})
    use_bias: bool = field(default=True, metadata={"help": "convolutions with biases"})
    use_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each layer in the backward pass to save activation memory"})
    example_steps: int = field(default=256, metadata={"help": "time steps of the nominal input the FLOP count runs on"})

    def check_wavenet(self) -> None:
        for name in ("vocab_size", "embedding_dim", "residual_channels", "dilation_channels", "skip_channels",
                     "head_channels", "kernel_size", "example_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.dilations or any(not isinstance(d, int) or d < 1 for d in self.dilations):
            raise ValueError(f"dilations must be a non-empty list of ints >= 1, got {self.dilations!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.check_loss()

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * sum(self.dilations)


@dataclass(frozen=True, kw_only=True)
class WavenetFullChannelConfig(WavenetFields):
    num_channels: int = field(metadata={"help": "input channels (C), each with its own embedding; set by the trainer from the grid"})

    def __post_init__(self):
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {self.num_channels}")
        self.check_wavenet()


@dataclass(frozen=True, kw_only=True)
class Wavenet3DConfig(WavenetFields):
    spatial_kernel_size: int = field(default=1, metadata={"help": "odd kernel over the grid's H and W (1: sites apart)"})
    spatial_dilation: int = field(default=1, metadata={"help": "dilation over H and W"})

    def __post_init__(self):
        if self.spatial_kernel_size < 1 or self.spatial_kernel_size % 2 == 0 or self.spatial_dilation < 1:
            raise ValueError(f"spatial_kernel_size must be odd >= 1 and spatial_dilation >= 1, got "
                             f"{self.spatial_kernel_size}, {self.spatial_dilation}")
        self.check_wavenet()


class GatedCausalLayer(nn.Module):
    """x (N, in, *grid, T) -> (residual (N, R, *grid, T) or None (last layer), skip (N, S, *grid, T), queue); causal in T.

    grid is () for Conv1d or (H, W) for Conv3d (`same` padding there). With `queue` (the last (k - 1) d
    inputs, (N, in, *grid, span)) the input continues it instead of being zero-padded."""

    def __init__(self, in_channels: int, config: WavenetFields, kernel_size: int, dilation: int, spatial: tuple[int, int] | None,
                 is_last: bool = False):
        super().__init__()
        G = config.dilation_channels
        self.span = (kernel_size - 1) * dilation
        if spatial is None:
            self.conv = nn.Conv1d(in_channels, 2 * G, kernel_size, dilation=dilation, bias=config.use_bias)
            conv_1x1 = nn.Conv1d
        else:
            kernel, spatial_dilation = spatial
            padding = (kernel - 1) * spatial_dilation // 2
            self.conv = nn.Conv3d(in_channels, 2 * G, (kernel, kernel, kernel_size), dilation=(spatial_dilation, spatial_dilation, dilation),
                                  padding=(padding, padding, 0), bias=config.use_bias)
            conv_1x1 = nn.Conv3d
        self.skip = conv_1x1(G, config.skip_channels, 1, bias=config.use_bias)
        # the last layer's residual output feeds nothing: it has none (no parameters without gradients)
        self.is_last = is_last
        if not is_last:
            self.residual = conv_1x1(G, config.residual_channels, 1, bias=config.use_bias)
            self.input = conv_1x1(in_channels, config.residual_channels, 1, bias=config.use_bias) \
                if in_channels != config.residual_channels else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, queue: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        padded = F.pad(x, (self.span, 0)) if queue is None else torch.cat([queue, x], dim=-1)  # (N, in, *grid, span + T)
        filter_gate = self.conv(padded)  # (N, 2G, *grid, T)
        filter_, gate = filter_gate.chunk(2, dim=1)
        h = torch.tanh(filter_) * torch.sigmoid(gate)
        residual = None if self.is_last else self.dropout(self.input(x) + self.residual(h))
        return residual, self.skip(h), padded[..., padded.size(-1) - self.span:]


class LogitsHead(nn.Module):
    """Sum of skips (N, S, ..., T) -> LeakyReLU -> 1x1 -> LeakyReLU -> 1x1 -> logits (N, V, ..., T)."""

    def __init__(self, config: WavenetFields, conv_1x1: type):
        super().__init__()
        self.hidden = conv_1x1(config.skip_channels, config.head_channels, 1, bias=config.use_bias)
        self.out = conv_1x1(config.head_channels, config.vocab_size, 1, bias=config.use_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, skip_sum: torch.Tensor) -> torch.Tensor:
        h = self.hidden(self.dropout(F.leaky_relu(skip_sum)))
        return self.out(self.dropout(F.leaky_relu(h)))


class WavenetBase(TokenGridModel):
    """The conv stack and its decoding; subclasses embed ids to (N, E, *grid, T) and lay logits out."""

    def __init__(self, config: WavenetFields, spatial: tuple[int, int] | None):
        super().__init__()
        self.config = config
        conv_1x1 = nn.Conv1d if spatial is None else nn.Conv3d
        layers = [GatedCausalLayer(config.embedding_dim, config, 1, 1, None if spatial is None else (1, 1))]
        layers += [GatedCausalLayer(config.residual_channels, config, config.kernel_size, d, spatial, is_last=i == len(config.dilations) - 1)
                   for i, d in enumerate(config.dilations)]
        self.layers = nn.ModuleList(layers)
        self.head = LogitsHead(config, conv_1x1)
        self.use_gradient_checkpointing = config.use_gradient_checkpointing

    def reset_extra(self) -> None:
        """Xavier-uniform conv weights and zero biases (brain-gen's wave_init_weights, biases at 0),
        the last head conv zero (a uniform first prediction: loss ln V), embeddings at std 1."""
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv3d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight)
        nn.init.zeros_(self.head.out.weight)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_logits(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, idx: torch.Tensor, queues: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """idx -> (logits idx.shape + (V,), each layer's queue after it)."""
        x = self.embed(idx)  # (N, E, *grid, T)
        skip_sum, new_queues = 0, []
        is_checkpointing = self.is_checkpointing() and queues is None
        for i, layer in enumerate(self.layers):
            queue = None if queues is None else queues[i]
            if is_checkpointing:
                x, skip, queue = checkpoint(layer, x, use_reentrant=False)
            else:
                x, skip, queue = layer(x, queue)
            skip_sum = skip_sum + skip
            new_queues.append(queue)
        return self.to_logits(self.head(skip_sum), idx), new_queues

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.run(idx)[0]

    def start_decoding(self, context: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Only the receptive field matters: the queues are filled from the last steps of the context."""
        logits, queues = self.run(context[..., -self.config.receptive_field:])
        return queues, logits[..., -1, :]

    def decode_step(self, queues: list[torch.Tensor], new: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        logits, queues = self.run(new, queues)
        return queues, logits[..., -1, :]


class WavenetFullChannel(WavenetBase):
    """Ids (B, C, T) -> logits (B, C, T, Q): one conv stack over every channel's series; see the module docstring."""

    time_axis = 2

    def __init__(self, config: WavenetFullChannelConfig):
        super().__init__(config, spatial=None)
        # every channel its own table of vocab_size rows: row c V + q is code q of channel c
        self.embedding = nn.Embedding(config.num_channels * config.vocab_size, config.embedding_dim)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        config = self.config
        if idx.dim() != 3 or idx.size(1) != config.num_channels:
            raise ValueError(f"idx must be (B, C={config.num_channels}, T) ids, got {tuple(idx.shape)}")
        B, C, T = idx.shape
        offsets = torch.arange(C, device=idx.device)[None, :, None] * config.vocab_size
        x = self.embedding(idx + offsets)  # (B, C, T, E)
        return x.reshape(B * C, T, -1).transpose(1, 2)  # (B C, E, T)

    def to_logits(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        B, C, T = idx.shape
        return out.view(B, C, -1, T).transpose(2, 3)  # (B C, V, T) -> (B, C, T, V)

    def example_idx(self, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(1, self.config.num_channels, self.config.example_steps, dtype=torch.long, device=device)


class Wavenet3D(WavenetBase):
    """Ids (B, H, W, T) -> logits (B, H, W, T, V): causal in T, `same` over the grid; see the module docstring."""

    time_axis = 3

    def __init__(self, config: Wavenet3DConfig):
        super().__init__(config, spatial=(config.spatial_kernel_size, config.spatial_dilation))
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 4:
            raise ValueError(f"idx must be (B, H, W, T) ids, got {tuple(idx.shape)}")
        return self.embedding(idx).permute(0, 4, 1, 2, 3)  # (B, E, H, W, T)

    def to_logits(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return out.permute(0, 2, 3, 4, 1)  # (B, V, H, W, T) -> (B, H, W, T, V)

    def example_idx(self, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(1, 8, 8, self.config.example_steps, dtype=torch.long, device=device)  # per position: any grid


WAVENET_COMMON = {
    "debug": dict(vocab_size=32, embedding_dim=16, residual_channels=16, dilation_channels=16, skip_channels=16,
                  head_channels=32, kernel_size=2, dilations=[1, 2, 4]),
    # brain-gen's MEG WaveNet widths, 2 cycles of dilations 1..16 (receptive field 63 steps)
    "small": dict(vocab_size=256, embedding_dim=32, residual_channels=64, dilation_channels=64, skip_channels=64,
                  head_channels=128, kernel_size=2, dilations=[1, 2, 4, 8, 16] * 2),
    # 3 cycles of 1..256 (receptive field 1534 steps), wide as brain-gen's full-channel runs
    "full": dict(vocab_size=256, embedding_dim=128, residual_channels=256, dilation_channels=256, skip_channels=256,
                 head_channels=512, kernel_size=2, dilations=[2**i for i in range(9)] * 3),
}
FULL_CHANNEL_FLAVORS = {"debug": {**WAVENET_COMMON["debug"], "num_channels": 4},
                        "small": {**WAVENET_COMMON["small"], "num_channels": 32},
                        "full": {**WAVENET_COMMON["full"], "num_channels": 306}}
WAVENET3D_FLAVORS = {"debug": {**WAVENET_COMMON["debug"], "spatial_kernel_size": 3},
                     "small": {**WAVENET_COMMON["small"], "spatial_kernel_size": 3},
                     "full": {**WAVENET_COMMON["full"], "spatial_kernel_size": 3}}

register_model(ModelSpec(name="WavenetFullChannel", config_cls=WavenetFullChannelConfig, builder=WavenetFullChannel,
                         flavors=FULL_CHANNEL_FLAVORS, task="causal_lm"))
register_model(ModelSpec(name="Wavenet3D", config_cls=Wavenet3DConfig, builder=Wavenet3D, flavors=WAVENET3D_FLAVORS,
                         task="causal_lm"))
