"""STGPT2MEG: a quantised autoregressive transformer with spatiotemporal blocks (brain-gen seed 004).

Ids (B, C, T): C channels (sites of the token grid), each a series of T codes of a vocabulary of V.
Each code is embedded (a token table) plus its channel's vector, then `num_layers` blocks, each
(block_type "sequential", brain-gen's STGPTBlock):

    x = x + time_attn(norm(x))       causal, over T within each channel (rotary positions = time)
    x = x + time_mlp(norm(x))
    x = x + channel_attn(norm(x))    over the C channels of each time step (rotary positions = channel)
    x = x + channel_mlp(norm(x))

or ("parallel", brain-gen's STGPTBlockParallel) both attentions read the same normed input and one
MLP follows: x = x + time_attn(h) + channel_attn(h), h = norm(x); x = x + mlp(norm(x)).

then a final norm and a linear head -> logits (B, C, T, V) of each channel's next code. Only the time
attention crosses time steps, and it is causal: logits at t see inputs at times <= t (any channel).
Decoding keeps a KV cache of the time attention (one row per channel), so each new time step costs
one position; the channel attention needs nothing from earlier steps.

Shapes: B batch, C channels, T time steps, d = d_model, H heads, Dh = d / H, V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.brain.token_model import TokenGridModel, TokenLossFields
from modeling.brain.brainomni_forecast import RotarySelfAttention
from modeling.layers.transformer import KVCache
from modeling.layers.transformer import RMSNorm, RotaryEmbedding
from modeling.registry import ModelSpec, register_model

BLOCK_TYPES = ("sequential", "parallel")


@dataclass(frozen=True, kw_only=True)
class STGPT2MEGConfig(TokenLossFields):
    num_channels: int = field(metadata={"help": "channels (C) per time step; the trainer sets it from the token grid's sites"})
    vocab_size: int = field(metadata={"help": "codes per position (V); the trainer sets it from the token manifest"})
    sequence_len: int = field(metadata={"help": "max time steps the model reads at once (rotary table, KV cache size)"})
    d_model: int = field(metadata={"help": "width of the residual stream (d)"})
    num_heads: int = field(metadata={"help": "attention heads of the time and channel attentions; head_dim = d_model / num_heads"})
    num_layers: int = field(metadata={"help": "number of spatiotemporal blocks"})
    block_type: str = field(default="sequential", metadata={
        "help": "sequential: time attention + MLP, then channel attention + MLP (brain-gen's STGPTBlock); parallel: "
                "both attentions on the same input, summed, then one MLP (STGPTBlockParallel)"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP width = mlp_ratio x d_model"})
    dropout: float = field(default=0.0, metadata={"help": "training-time dropout on attention weights and MLP outputs"})
    use_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each block in the backward pass to save activation memory"})

    def __post_init__(self):
        for name in ("num_channels", "vocab_size", "sequence_len", "d_model", "num_heads", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(f"d_model ({self.d_model}) must be num_heads ({self.num_heads}) times an even head_dim (rotary pairs)")
        if self.mlp_ratio * self.d_model < 1:
            raise ValueError(f"mlp_ratio x d_model must be >= 1, got {self.mlp_ratio} x {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {self.block_type!r}")
        self.check_loss()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


class GELUMLP(nn.Module):
    """d -> mlp_ratio d -> GELU -> d, dropout on the output."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(nn.functional.gelu(self.fc(x))))


class STGPTBlock(nn.Module):
    """(B, C, T, d) -> (B, C, T, d): causal time attention and channel attention, each followed by an
    MLP (sequential) or side by side with one MLP after them (parallel); pre-norm residuals."""

    def __init__(self, config: STGPT2MEGConfig, layer_idx: int):
        super().__init__()
        d, hidden = config.d_model, round(config.mlp_ratio * config.d_model)
        self.is_parallel = config.block_type == "parallel"
        self.time_norm, self.time_mlp_norm = RMSNorm(), RMSNorm()
        self.time_attn = RotarySelfAttention(d, config.num_heads, config.dropout, is_causal=True, layer_idx=layer_idx)
        self.time_mlp = GELUMLP(d, hidden, config.dropout)
        self.channel_attn = RotarySelfAttention(d, config.num_heads, config.dropout, is_causal=False)
        if not self.is_parallel:
            self.channel_norm, self.channel_mlp_norm = RMSNorm(), RMSNorm()
            self.channel_mlp = GELUMLP(d, hidden, config.dropout)

    def forward(self, x: torch.Tensor, time_rope: tuple[torch.Tensor, torch.Tensor],
                channel_rope: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache | None = None) -> torch.Tensor:
        B, C, T, d = x.shape
        h = self.time_norm(x)
        y_time = self.time_attn(h.reshape(B * C, T, d), *time_rope, kv_cache).view(B, C, T, d)
        if self.is_parallel:
            x = x + y_time + self.channel_attention(h, channel_rope)
            return x + self.time_mlp(self.time_mlp_norm(x))
        x = x + y_time
        x = x + self.time_mlp(self.time_mlp_norm(x))
        x = x + self.channel_attention(self.channel_norm(x), channel_rope)
        return x + self.channel_mlp(self.channel_mlp_norm(x))

    def channel_attention(self, h: torch.Tensor, channel_rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, C, T, d = h.shape
        y = self.channel_attn(h.transpose(1, 2).reshape(B * T, C, d), *channel_rope)  # each time step's channels
        return y.view(B, T, C, d).transpose(1, 2)


class STGPT2MEG(TokenGridModel):
    """Ids (B, C, T) -> next-code logits (B, C, T, V); see the module docstring."""

    _no_split_modules = ["STGPTBlock"]  # the unit engines shard or wrap one by one (FSDP)
    time_axis = 2

    def __init__(self, config: STGPT2MEGConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.channel_embedding = nn.Embedding(config.num_channels, config.d_model)
        self.blocks = nn.ModuleList(STGPTBlock(config, layer_idx) for layer_idx in range(config.num_layers))
        self.final_norm = RMSNorm()
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.time_rotary = RotaryEmbedding(config.head_dim, config.sequence_len)
        self.channel_rotary = RotaryEmbedding(config.head_dim, config.num_channels)
        self.use_gradient_checkpointing = config.use_gradient_checkpointing

    def reset_extra(self) -> None:
        """nanochat's init: linear layers at std 1/sqrt(fan_in) (shrunk where they narrow), zero biases,
        zero output projections and head (each block starts as the identity, the first prediction is
        uniform: loss ln V); embeddings at std 1 (the first norm rescales them)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                nn.init.normal_(module.weight, std=fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in)))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            outputs = [block.time_attn.proj, block.time_mlp.proj, block.channel_attn.proj]
            for output in outputs + ([] if block.is_parallel else [block.channel_mlp.proj]):
                nn.init.zeros_(output.weight)
        nn.init.zeros_(self.head.weight)
        nn.init.normal_(self.token_embedding.weight)
        nn.init.normal_(self.channel_embedding.weight)
        self.time_rotary.reset_buffers()
        self.channel_rotary.reset_buffers()

    def example_idx(self, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(1, self.config.num_channels, self.config.sequence_len, dtype=torch.long, device=device)

    def max_context_steps(self) -> int:
        return self.config.sequence_len

    def make_kv_cache(self, batch_size: int) -> KVCache:
        """An empty cache of the time attention: one row per (sample, channel), sequence_len steps."""
        weight = self.head.weight
        config = self.config
        return KVCache(num_layers=config.num_layers, batch_size=batch_size * config.num_channels, num_kv_heads=config.num_heads,
                       max_len=config.sequence_len, head_dim=config.head_dim, device=weight.device, dtype=weight.dtype)

    def logits(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, C, T) -> (B, C, T, V); with a cache, idx continues the steps it holds (and is added to it)."""
        config = self.config
        if idx.dim() != 3 or idx.size(1) != config.num_channels:
            raise ValueError(f"idx must be (B, C={config.num_channels}, T) ids, got {tuple(idx.shape)}")
        B, C, T = idx.shape
        start = cache.pos if cache is not None else 0
        time_rope = self.time_rotary(start, T)  # raises past sequence_len
        channel_rope = self.channel_rotary(0, C)
        x = self.token_embedding(idx) + self.channel_embedding.weight[None, :, None, :]  # (B, C, T, d)
        is_checkpointing = self.is_checkpointing() and cache is None
        for block in self.blocks:
            if is_checkpointing:
                x = checkpoint(block, x, time_rope, channel_rope, use_reentrant=False)
            else:
                x = block(x, time_rope, channel_rope, cache)
        if cache is not None:
            cache.advance(T)
        return self.head(self.final_norm(x))

    def start_decoding(self, context: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        """Prefill a fresh cache with the context's last sequence_len steps (half of them once the
        window is full, so that decoding goes on for a while before the next prefill)."""
        window = self.config.sequence_len
        keep = context.size(-1) if context.size(-1) <= window else max(1, window // 2)
        cache = self.make_kv_cache(context.size(0))
        return cache, self.logits(context[..., -keep:], cache)[:, :, -1]

    def decode_step(self, cache: KVCache, new: torch.Tensor) -> tuple[KVCache | None, torch.Tensor | None]:
        if cache.pos + new.size(-1) > cache.max_len:
            return None, None  # the window is full: prefill again
        return cache, self.logits(new, cache)[:, :, -1]


STGPT2MEG_FLAVORS = {
    # seconds on a CPU: 4 channels of 32 codes
    "debug": dict(num_channels=4, vocab_size=32, sequence_len=32, d_model=32, num_heads=4, num_layers=2),
    # the TOTEM codes of 32 MEG/EEG channels (configs/meg/pretokenize_totem.yaml): 250 steps of 256 codes
    "small": dict(num_channels=32, vocab_size=256, sequence_len=256, d_model=128, num_heads=4, num_layers=4),
    # brain-gen's MEG setup: 306 sensors, 256 mu-law levels, 1024 steps per window
    "full": dict(num_channels=306, vocab_size=256, sequence_len=1024, d_model=512, num_heads=8, num_layers=8),
}

register_model(ModelSpec(name="STGPT2MEG", config_cls=STGPT2MEGConfig, builder=STGPT2MEG, flavors=STGPT2MEG_FLAVORS,
                         task="causal_lm"))
