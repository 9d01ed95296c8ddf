"""Encoder and decoder of the configurable transformer, over continuous multivariate series.

    TransformerEncoder: src (B, S, input_size) -> memory (B, S, D)
    TransformerDecoder: tgt (B, T, output_size), memory -> (B, T, output_size), causal in T
        forward_one_step(tgt (B, 1, output_size), memory, incremental_state) -> (B, 1, output_size), state

Each layer is the seed's BaseTransformerLayer: sublayers (self-attention; for the decoder also
cross-attention; then the feed-forward, dense or MoE) each wrapped as

    pre-norm  (norm_first):  x + dropout(f(norm(x)))
    post-norm:               norm(x + dropout(f(x)))

A pre-norm stack ends with a final norm (use_final_norm); a post-norm one is normed already.
Time steps enter as a linear projection plus fixed sinusoidal position codes (no table, so any
length works; the decoder's steps count from 0 at the first predicted step).

share_layers keeps one layer per stack and applies it num_*_layers times; incremental decoding still
keeps one cache per depth, as the seed's state: {"layers": [{"self_attn": {"key", "value"},
"cross_attn": {"key", "value"}}, ...]}.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.transformer.attention import Attention
from modeling.transformer.config import TransformerConfig
from modeling.transformer.feedforward import make_feed_forward
from modeling.transformer.norms import make_norm


def sinusoidal_positions(first: int, length: int, d_model: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(length, d_model) codes of positions first .. first + length - 1 (Vaswani et al.: sin on even
    dimensions, cos on odd ones, wavelengths 2 pi .. 10000 * 2 pi)."""
    positions = torch.arange(first, first + length, device=device, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    angles = positions * inv_freq  # (T, ceil(D / 2))
    codes = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :d_model]  # sin, cos interleaved
    return codes.to(dtype)


def residual(x: torch.Tensor, norm: nn.Module, sublayer: Callable[[torch.Tensor], torch.Tensor], dropout: nn.Module,
             norm_first: bool) -> torch.Tensor:
    if norm_first:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


def _attention(config: TransformerConfig, is_causal: bool, is_cross: bool) -> Attention:
    return Attention(config.d_model, config.nhead, config.att_type, config.dropout, is_causal=is_causal, is_cross=is_cross,
                     chunk_size=config.xformer_chunk_size, num_modes=config.frequency_modes)


class EncoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig, is_moe: bool):
        super().__init__()
        self.norm_first = config.norm_first
        self.self_attn = _attention(config, is_causal=False, is_cross=False)
        self.self_attn_norm = make_norm(config.norm_type, config.d_model)
        self.feed_forward = make_feed_forward(config, is_moe)
        self.feed_forward_norm = make_norm(config.norm_type, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def output_projections(self) -> list[nn.Module]:
        """The layers that write into the residual stream (depth-scaled init shrinks them)."""
        return [self.self_attn.out_proj, self.feed_forward]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = residual(x, self.self_attn_norm, self.self_attn, self.dropout, self.norm_first)
        return residual(x, self.feed_forward_norm, self.feed_forward, self.dropout, self.norm_first)


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig, is_moe: bool):
        super().__init__()
        self.norm_first = config.norm_first
        self.self_attn = _attention(config, is_causal=True, is_cross=False)
        self.self_attn_norm = make_norm(config.norm_type, config.d_model)
        self.cross_attn = _attention(config, is_causal=False, is_cross=True)
        self.cross_attn_norm = make_norm(config.norm_type, config.d_model)
        self.feed_forward = make_feed_forward(config, is_moe)
        self.feed_forward_norm = make_norm(config.norm_type, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def output_projections(self) -> list[nn.Module]:
        return [self.self_attn.out_proj, self.cross_attn.out_proj, self.feed_forward]

    def forward(self, x: torch.Tensor, memory: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """x (B, T, D), memory (B, S, D); state: this depth's caches {"self_attn": {}, "cross_attn": {}}."""
        self_cache, cross_cache = (None, None) if state is None else (state["self_attn"], state["cross_attn"])
        x = residual(x, self.self_attn_norm, lambda h: self.self_attn(h, cache=self_cache), self.dropout, self.norm_first)
        x = residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, memory, cache=cross_cache), self.dropout,
                     self.norm_first)
        return residual(x, self.feed_forward_norm, self.feed_forward, self.dropout, self.norm_first)


class _Stack(nn.Module):
    """What the encoder and decoder share: layers (one if shared), input projection, final norm."""

    def __init__(self, config: TransformerConfig, layer_cls: type, num_layers: int, input_size: int):
        super().__init__()
        self.config = config
        self.num_layers = num_layers
        moe_blocks = config.moe_block_indices(num_layers) if not config.share_layers else config.moe_block_indices(1)
        self.layers = nn.ModuleList(layer_cls(config, depth in moe_blocks) for depth in range(1 if config.share_layers else num_layers))
        self.input_proj = nn.Linear(input_size, config.d_model)
        self.input_dropout = nn.Dropout(config.dropout)
        self.final_norm = make_norm(config.norm_type, config.d_model) if config.use_final_norm and config.norm_first else nn.Identity()
        self.use_gradient_checkpointing = config.use_gradient_checkpointing

    def layer_at(self, depth: int) -> nn.Module:
        return self.layers[0 if self.config.share_layers else depth]

    def embed(self, x: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        """(B, T, input_size) -> (B, T, D): projection plus the position codes."""
        h = self.input_proj(x)
        h = h + sinusoidal_positions(first_position, x.size(1), self.config.d_model, h.device, h.dtype)
        return self.input_dropout(h)

    def _is_checkpointing(self) -> bool:
        return self.use_gradient_checkpointing and self.training and torch.is_grad_enabled()


class TransformerEncoder(_Stack):
    def __init__(self, config: TransformerConfig):
        super().__init__(config, EncoderLayer, config.num_encoder_layers, config.input_size)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        """src (B, S, input_size) -> memory (B, S, D)."""
        x = self.embed(src)
        is_checkpointing = self._is_checkpointing()
        for depth in range(self.num_layers):
            layer = self.layer_at(depth)
            x = checkpoint(layer, x, use_reentrant=False) if is_checkpointing else layer(x)
        return self.final_norm(x)


class TransformerDecoder(_Stack):
    """Decoder over the target series: its input at step t is the value of step t - 1 (teacher forcing
    in training, its own prediction in generation), so its input size is output_size."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config, DecoderLayer, config.num_decoder_layers, config.output_size)
        self.output_proj = nn.Linear(config.d_model, config.output_size)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """tgt (B, T, output_size), memory (B, S, D) -> (B, T, output_size); step t sees tgt[:, :t + 1]."""
        x = self.embed(tgt)
        is_checkpointing = self._is_checkpointing()
        for depth in range(self.num_layers):
            layer = self.layer_at(depth)
            x = checkpoint(layer, x, memory, use_reentrant=False) if is_checkpointing else layer(x, memory)
        return self.output_proj(self.final_norm(x))

    def forward_one_step(self, tgt: torch.Tensor, memory: torch.Tensor,
                         incremental_state: dict | None = None) -> tuple[torch.Tensor, dict]:
        """One more step: tgt (B, 1, output_size) -> (B, 1, output_size), and the state with this step's
        keys and values appended (an empty or None state starts at step 0). Equals the last row of
        forward() over all the steps so far."""
        if incremental_state is None or not incremental_state:
            incremental_state = {"layers": [{"self_attn": {}, "cross_attn": {}} for _ in range(self.num_layers)]}
        first_cache = incremental_state["layers"][0]["self_attn"]
        num_done = first_cache["key"].size(2) if "key" in first_cache else 0
        x = self.embed(tgt, first_position=num_done)
        for depth in range(self.num_layers):
            x = self.layer_at(depth)(x, memory, incremental_state["layers"][depth])
        return self.output_proj(self.final_norm(x)), incremental_state
