"""TASA3D: temporal attention with a spatial autoencoder over token grids (brain-gen seed 004).

Ids (B, H, W, T) -> embedded (B, D, T, H, W), then `depth` blocks, each:

    h = down^n(x)        n stages of a (1, 3, 3) conv, stride (1, 2, 2): the grid halves, channels x grow
    z = flatten(h)       per time step: (B, T, D_b) with D_b = D grow^n (H / 2^n) (W / 2^n)
    z = z + attn(norm z) causal attention over time (rotary positions), then z + mlp(norm z)
    h = up^n(z)          transposed (1, 4, 4) convs, stride (1, 2, 2), back to (B, D, T, H, W)
    h = h + mlp(norm h); x = x + out(h)

then a final norm and a linear head -> logits (B, H, W, T, V). Only the attention mixes time steps,
and it is causal; every conv has a temporal kernel of 1 and the GroupNorms normalise each time step
on its own, so logits at t see inputs at times <= t. H and W must be divisible by 2^num_down.
Decoding re-runs the window (the last sequence_len steps) for each new step.

Shapes: B batch, H x W grid, T time steps, D emb_dim, V vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.brain.token_model import TokenGridModel, TokenLossFields
from modeling.brain.brainomni_forecast import RotarySelfAttention
from modeling.layers.transformer import RMSNorm, RotaryEmbedding
from modeling.registry import ModelSpec, register_model


@dataclass(frozen=True, kw_only=True)
class TASA3DConfig(TokenLossFields):
    height: int = field(metadata={"help": "grid height (H); the trainer sets it from the token grid"})
    width: int = field(metadata={"help": "grid width (W); the trainer sets it from the token grid"})
    vocab_size: int = field(metadata={"help": "codes per position (V); the trainer sets it from the token manifest"})
    sequence_len: int = field(metadata={"help": "max time steps the model reads at once (rotary table size)"})
    emb_dim: int = field(metadata={"help": "code embedding width, the full-resolution channels (D)"})
    depth: int = field(metadata={"help": "number of TASA-3D blocks"})
    num_down: int = field(default=1, metadata={"help": "spatial halvings before the temporal attention; H, W divisible by 2^num_down"})
    channel_grow: int = field(default=2, metadata={"help": "channel multiplier of each halving"})
    num_heads: int = field(default=4, metadata={"help": "heads of the temporal attention; head_dim = D_b / num_heads, even"})
    token_mlp_ratio: float = field(default=4.0, metadata={"help": "width of the bottleneck MLP = ratio x D_b"})
    dropout: float = field(default=0.0, metadata={"help": "training-time dropout on attention weights and MLP outputs"})
    use_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each block in the backward pass to save activation memory"})

    def __post_init__(self):
        for name in ("height", "width", "vocab_size", "sequence_len", "emb_dim", "depth", "channel_grow", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_down < 0:
            raise ValueError(f"num_down must be >= 0, got {self.num_down}")
        scale = 2**self.num_down
        if self.height % scale or self.width % scale:
            raise ValueError(f"height ({self.height}) and width ({self.width}) must be divisible by 2^num_down = {scale}")
        if self.bottleneck_dim % self.num_heads or (self.bottleneck_dim // self.num_heads) % 2:
            raise ValueError(f"the bottleneck width {self.bottleneck_dim} (emb_dim x channel_grow^num_down x grid / 4^num_down) "
                             f"must be num_heads ({self.num_heads}) times an even head_dim")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.check_loss()

    @property
    def bottleneck_dim(self) -> int:
        scale = 2**self.num_down
        return self.emb_dim * self.channel_grow**self.num_down * (self.height // scale) * (self.width // scale)


def step_group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of (B, C, T, H, W) over each time step alone (over (C, H, W)), so time is not mixed."""
    B, C, T, H, W = x.shape
    y = norm(x.transpose(1, 2).reshape(B * T, C, H, W))
    return y.view(B, T, C, H, W).transpose(1, 2)


class SpatialStage(nn.Module):
    """A spatial halving (conv) or doubling (transposed conv), then per-step GroupNorm and GELU."""

    def __init__(self, in_channels: int, out_channels: int, is_up: bool):
        super().__init__()
        if is_up:
            self.conv = nn.ConvTranspose3d(in_channels, out_channels, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1))
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(1, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(step_group_norm(self.norm, self.conv(x)))


class TASA3DBlock(nn.Module):
    """(B, D, T, H, W) -> same: spatial encoder, causal temporal attention on the bottleneck, decoder."""

    def __init__(self, config: TASA3DConfig):
        super().__init__()
        channels = [config.emb_dim * config.channel_grow**i for i in range(config.num_down + 1)]
        self.downs = nn.ModuleList(SpatialStage(channels[i], channels[i + 1], is_up=False) for i in range(config.num_down))
        self.ups = nn.ModuleList(SpatialStage(channels[i], channels[i - 1], is_up=True) for i in range(config.num_down, 0, -1))
        dim = config.bottleneck_dim
        hidden = round(config.token_mlp_ratio * dim)
        self.attn_norm, self.mlp_norm = RMSNorm(), RMSNorm()
        self.attn = RotarySelfAttention(dim, config.num_heads, config.dropout, is_causal=True)
        self.token_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(config.dropout))
        D = config.emb_dim
        self.full_norm = nn.GroupNorm(1, D)
        self.full_mlp = nn.Sequential(nn.Conv3d(D, 4 * D, 1), nn.GELU(), nn.Conv3d(4 * D, D, 1), nn.Dropout(config.dropout))
        self.out = nn.Conv3d(D, D, 1, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = x
        for down in self.downs:
            h = down(h)
        B, Cb, T, Hb, Wb = h.shape
        z = h.transpose(1, 2).reshape(B, T, Cb * Hb * Wb)  # (B, T, D_b): a token per time step
        z = z + self.attn(self.attn_norm(z), *rope)
        z = z + self.token_mlp(self.mlp_norm(z))
        h = z.view(B, T, Cb, Hb, Wb).transpose(1, 2)
        for up in self.ups:
            h = up(h)
        h = h + self.full_mlp(step_group_norm(self.full_norm, h))
        return x + self.out(h)


class TASA3D(TokenGridModel):
    """Ids (B, H, W, T) -> next-code logits (B, H, W, T, V); see the module docstring."""

    _no_split_modules = ["TASA3DBlock"]
    time_axis = 3

    def __init__(self, config: TASA3DConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.emb_dim)
        self.blocks = nn.ModuleList(TASA3DBlock(config) for _ in range(config.depth))
        self.final_norm = nn.GroupNorm(1, config.emb_dim)
        self.head = nn.Linear(config.emb_dim, config.vocab_size)
        self.rotary = RotaryEmbedding(config.bottleneck_dim // config.num_heads, config.sequence_len)
        self.use_gradient_checkpointing = config.use_gradient_checkpointing

    def reset_extra(self) -> None:
        """Embeddings at std 1; each block's output conv and the head at zero (blocks start as the
        identity, the first prediction is uniform: loss ln V); the other layers at torch's defaults."""
        nn.init.normal_(self.token_embedding.weight)
        for block in self.blocks:
            nn.init.zeros_(block.out.weight)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.rotary.reset_buffers()

    def example_idx(self, device: torch.device | str) -> torch.Tensor:
        config = self.config
        return torch.zeros(1, config.height, config.width, config.sequence_len, dtype=torch.long, device=device)

    def max_context_steps(self) -> int:
        return self.config.sequence_len

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        config = self.config
        if idx.dim() != 4 or idx.shape[1:3] != (config.height, config.width):
            raise ValueError(f"idx must be (B, H={config.height}, W={config.width}, T) ids, got {tuple(idx.shape)}")
        rope = self.rotary(0, idx.size(-1))  # raises past sequence_len
        x = self.token_embedding(idx).permute(0, 4, 3, 1, 2)  # (B, D, T, H, W)
        for block in self.blocks:
            x = checkpoint(block, x, rope, use_reentrant=False) if self.is_checkpointing() else block(x, rope)
        x = step_group_norm(self.final_norm, x)
        return self.head(x.permute(0, 3, 4, 2, 1))  # (B, H, W, T, D) -> (B, H, W, T, V)

    def start_decoding(self, context: torch.Tensor) -> tuple[None, torch.Tensor]:
        """No state: each step re-runs the window of the last sequence_len steps."""
        return None, self.logits(context[..., -self.config.sequence_len:])[..., -1, :]


TASA3D_FLAVORS = {
    # seconds on a CPU: a 4 x 4 grid of 32 codes, 16 steps
    "debug": dict(height=4, width=4, vocab_size=32, sequence_len=32, emb_dim=8, depth=2, num_down=1, num_heads=4),
    # Vidtok's codes of 128 x 128 frames (a 16 x 16 grid per 4 frames); bottleneck 32 x 4 x 4 = 512 wide
    "small": dict(height=16, width=16, vocab_size=1024, sequence_len=64, emb_dim=8, depth=4, num_down=2, num_heads=8),
    # brain-gen's defaults on a 32 x 32 grid of 256 levels: emb_dim 16, 3 halvings, bottleneck 128 x 4 x 4 = 2048 wide
    "full": dict(height=32, width=32, vocab_size=256, sequence_len=256, emb_dim=16, depth=4, num_down=3, num_heads=16),
}

register_model(ModelSpec(name="TASA3D", config_cls=TASA3DConfig, builder=TASA3D, flavors=TASA3D_FLAVORS, task="causal_lm"))
