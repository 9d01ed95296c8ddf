"""Layers shared by the model families: parameter-free RMSNorm, rotary position embeddings and the
preallocated key/value cache of incremental decoding.

Everything here is plain torch and holds no learnable parameters, so a family can use these
layers without changing its parameter count or its initialisation.
"""

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMS-normalise the last dimension, without a learnable gain (nanochat's `norm`)."""
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm as a module, so that the norms show up in `print(model)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x)


def precompute_rotary(
    max_seq_len: int, head_dim: int, base: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin), each (max_seq_len, head_dim // 2) in fp32.

    Row t holds the angles t * base^(-2i / head_dim) for the frequency pairs i = 0 .. head_dim/2 - 1.
    Kept in fp32: the angles of late positions lose their low bits in bf16.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim // 2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, head_dim) by the angles of its positions; cos, sin: (T, head_dim // 2).

    Uses the "rotate half" layout of HF Llama (dimension i pairs with i + head_dim/2), so the result
    equals `transformers`' `apply_rotary_pos_emb` and checkpoints can be compared with it.
    """
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, T, H, head_dim // 2) each
    cos = cos[None, :, None, :].to(x.dtype)  # (1, T, 1, head_dim // 2), broadcast over batch and heads
    sin = sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables for positions 0 .. max_seq_len - 1 as non-persistent buffers.

    The tables are derived data, so they are not saved in checkpoints. A model built on the meta
    device and moved with `to_empty` has garbage in them: call `reset_buffers()` (models do it in
    `init_weights()`).
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.base = base
        cos, sin = precompute_rotary(max_seq_len, head_dim, base)
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, head_dim // 2)
        self.register_buffer("sin", sin, persistent=False)

    def reset_buffers(self) -> None:
        cos, sin = precompute_rotary(self.max_seq_len, self.head_dim, self.base, device=self.cos.device)
        # Keep the dtype the module was cast to (e.g. by `model.to(torch.bfloat16)`).
        self.cos = cos.to(self.cos.dtype)
        self.sin = sin.to(self.sin.dtype)

    def forward(self, start_pos: int, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start_pos .. start_pos + num_positions - 1, each (T, head_dim // 2)."""
        end_pos = start_pos + num_positions
        if end_pos > self.max_seq_len:
            raise ValueError(
                f"positions up to {end_pos} requested but rotary tables cover {self.max_seq_len} "
                f"(the config's sequence_len)"
            )
        return self.cos[start_pos:end_pos], self.sin[start_pos:end_pos]


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1): greedy at temperature 0, else sampled from the top_k (None: all)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class KVCache:
    """Keys and values of the positions seen so far, for every layer, preallocated.

    k, v: (n_layer, B, K, max_len, Dh). `pos` counts the positions filled; layers write at
    [pos, pos + T) during a forward and the model advances `pos` once all layers are done.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def insert(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, Dh) at [pos, pos + T); return this layer's (B, K, pos + T, Dh) views."""
        end = self.pos + k.size(2)
        self.k[layer_idx, :, :, self.pos : end] = k
        self.v[layer_idx, :, :, self.pos : end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens

    def reset(self) -> None:
        self.pos = 0
