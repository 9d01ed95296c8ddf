"""Embeddings, heads and corruption for the FlatGPT variants (modeling/brain/flatgpt.py).

Every embedding maps a variant's token layout to the backbone's input (B', S, D) and every head
maps hidden states back to logits in that layout. `start` is the sequence index of the first
position (non-zero when decoding on top of a KV cache): the per-channel / per-level variants
pick their table from it.

Shapes: B batch, S sequence positions, D hidden size, V vocabulary (per RVQ level), C channels,
Q RVQ levels, P tables of a ListEmbedding, d = per-channel or per-level width.
Heads are tied to the embedding tables they read unless said otherwise. The table stays registered
in the embedding only (the head reads it through a reference that is not a submodule), so a state
dict holds it once (safetensors refuses shared tensors) and a meta build's `to_empty` cannot untie
it; ZeRO-3 gathers it on that access (its automatic external-parameter registration).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MIX_METHODS = ("mix", "none")


class TokenEmbedding(nn.Module):
    """(B, S) ids -> (B, S, D)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        return F.embedding(idx, self.weight)


class TiedToEmbedding(nn.Module):
    """A head whose `weight` is its embedding's `weight` Parameter."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not a submodule, so the table is registered once

    @property
    def weight(self) -> nn.Parameter:
        return self._embedding[0].weight


class TiedHead(TiedToEmbedding):
    """(B, S, D) -> (B, S, V) with the embedding table as the output matrix."""

    def forward(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def num_matmul_params(self) -> int:
        return self.weight.numel()


class ListEmbedding(nn.Module):
    """P tables (P, V, D); the token at sequence index s reads table s % P.

    FlatGPTEmbeds: one table per channel of a (T, C, 1) grid (P = C); FlatGPTEmbedsRVQ: one per
    RVQ level of a (T, C, Q) grid (P = Q). (B, S) -> (B, S, D).
    """

    def __init__(self, num_tables: int, vocab_size: int, hidden_size: int):
        super().__init__()
        self.num_tables, self.vocab_size = num_tables, vocab_size
        self.weight = nn.Parameter(torch.empty(num_tables, vocab_size, hidden_size))

    def table_ids(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(start, start + length, device=device) % self.num_tables  # (S,)

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        rows = idx + self.table_ids(start, idx.size(1), idx.device) * self.vocab_size  # row of the stacked tables
        return F.embedding(rows, self.weight.flatten(0, 1))


class ChannelHead(TiedToEmbedding):
    """Channel-aware tied head: position s predicts token s + 1, which belongs to table (s + 1) % P,
    so it scores with that table. (B, S, D) -> (B, S, V)."""

    def forward(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        weight = self.weight  # (P, V, D)
        P = weight.size(0)
        B, S, D = hidden.shape
        # Pad the sequence to whole periods of P so that phase p always uses table (p + 1) % P.
        front = start % P
        back = (-(front + S)) % P
        padded = F.pad(hidden, (0, 0, front, back)).view(B, -1, P, D)  # (B, n, P, D)
        logits = torch.einsum("bnpd,pvd->bnpv", padded, weight.roll(-1, dims=0))  # (B, n, P, V)
        return logits.flatten(1, 2)[:, front : front + S]

    def num_matmul_params(self) -> int:
        return self.weight[0].numel()


class MixEmbedding(nn.Module):
    """Channel mixing: (B, S, C) ids of C channels per timestep -> one position per timestep.

    Each channel's token gets a d-wide embedding (one table shared by all channels) plus a
    channel embedding. mix: the C embeddings are concatenated, d = D / C -> (B, S, D);
    none: every channel is its own sequence, d = D -> (B * C, S, D).
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_channels: int, mix_method: str = "mix"):
        super().__init__()
        if mix_method not in MIX_METHODS:
            raise ValueError(f"mix_method must be one of {MIX_METHODS}, got {mix_method!r}")
        if mix_method == "mix" and hidden_size % num_channels != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by the {num_channels} channels for mix_method 'mix'")
        self.mix_method, self.num_channels = mix_method, num_channels
        width = hidden_size // num_channels if mix_method == "mix" else hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, width))
        self.channel_weight = nn.Parameter(torch.empty(num_channels, width))

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        embeds = F.embedding(idx, self.weight) + self.channel_weight  # (B, S, C, d)
        return mix_channels(embeds, self.mix_method)


def mix_channels(embeds_BSCd: torch.Tensor, mix_method: str) -> torch.Tensor:
    """(B, S, C, d) -> (B, S, C * d) (mix) or (B * C, S, d) (none)."""
    B, S, C, d = embeds_BSCd.shape
    if mix_method == "mix":
        return embeds_BSCd.reshape(B, S, C * d)
    return embeds_BSCd.permute(0, 2, 1, 3).reshape(B * C, S, d)


def unmix_channels(hidden: torch.Tensor, num_channels: int, mix_method: str) -> torch.Tensor:
    """The inverse of mix_channels: (B, S, C * d) or (B * C, S, d) -> (B, S, C, d)."""
    if mix_method == "mix":
        B, S, D = hidden.shape
        return hidden.view(B, S, num_channels, D // num_channels)
    BC, S, d = hidden.shape
    return hidden.view(BC // num_channels, num_channels, S, d).transpose(1, 2)


class MixHead(TiedToEmbedding):
    """Unmix the hidden state per channel and score with the shared token table: -> (B, S, C, V)."""

    def forward(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        embedding = self._embedding[0]
        return F.linear(unmix_channels(hidden, embedding.num_channels, embedding.mix_method), self.weight)

    def num_matmul_params(self) -> int:
        """Per backbone position: C channels (mix) or one (none)."""
        embedding = self._embedding[0]
        return self.weight.numel() * (embedding.num_channels if embedding.mix_method == "mix" else 1)


class QuantizerEmbedding(nn.Module):
    """Per-level tables (Q, V, d); a position's Q codes -> the concatenation of their embeddings.
    (..., Q) -> (..., Q * d)."""

    def __init__(self, num_levels: int, vocab_size: int, level_dim: int):
        super().__init__()
        self.num_levels, self.vocab_size = num_levels, vocab_size
        self.weight = nn.Parameter(torch.empty(num_levels, vocab_size, level_dim))

    def forward(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        offsets = torch.arange(self.num_levels, device=codes.device) * self.vocab_size
        embeds = F.embedding(codes + offsets, self.weight.flatten(0, 1))  # (..., Q, d)
        return embeds.flatten(-2)


class JointRVQHead(nn.Module):
    """One linear map from a position's hidden state to the logits of all Q levels (untied):
    (..., D) -> (..., Q, V)."""

    def __init__(self, hidden_size: int, num_levels: int, vocab_size: int):
        super().__init__()
        self.num_levels, self.vocab_size = num_levels, vocab_size
        self.proj = nn.Linear(hidden_size, num_levels * vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.proj(hidden).unflatten(-1, (self.num_levels, self.vocab_size))

    def num_matmul_params(self) -> int:
        return self.proj.weight.numel()


class TiedRVQHead(TiedToEmbedding):
    """Split the hidden state into Q slices of d and score slice q with level q's table:
    (..., Q * d) -> (..., Q, V)."""

    def forward(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        weight = self.weight  # (Q, V, d)
        return torch.einsum("...qd,qvd->...qv", hidden.unflatten(-1, (weight.size(0), -1)), weight)

    def num_matmul_params(self) -> int:
        return self.weight.numel()


class MixQuantizerEmbedding(nn.Module):
    """RVQ codes of C channels per timestep: (B, S, C, Q) -> per-channel Q * d embeddings plus a
    channel embedding, mixed as MixEmbedding: (B, S, C * Q * d) or (B * C, S, Q * d)."""

    def __init__(self, num_levels: int, vocab_size: int, level_dim: int, num_channels: int, mix_method: str = "mix"):
        super().__init__()
        if mix_method not in MIX_METHODS:
            raise ValueError(f"mix_method must be one of {MIX_METHODS}, got {mix_method!r}")
        self.mix_method, self.num_channels = mix_method, num_channels
        self.quantizer = QuantizerEmbedding(num_levels, vocab_size, level_dim)
        self.channel_weight = nn.Parameter(torch.empty(num_channels, num_levels * level_dim))

    def forward(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        return mix_channels(self.quantizer(codes) + self.channel_weight, self.mix_method)


class MixRVQHead(nn.Module):
    """Unmix per channel, then an RVQ head on each channel's Q * d slice: -> (B, S, C, Q, V)."""

    def __init__(self, head: nn.Module, num_channels: int, mix_method: str = "mix"):
        super().__init__()
        self.head, self.num_channels, self.mix_method = head, num_channels, mix_method

    def forward(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.head(unmix_channels(hidden, self.num_channels, self.mix_method))

    def num_matmul_params(self) -> int:
        return self.head.num_matmul_params() * (self.num_channels if self.mix_method == "mix" else 1)


class EmbeddingCorruptor(ListEmbedding):
    """A ListEmbedding over RVQ levels that corrupts its input while training (FlatGPTEmbedsRVQ).

    Each token of level q is corrupted with probability p_levels[q]; on top, max(1, steps // 64)
    bursts of 2-8 timesteps hit a random half of the levels at every site. A corrupted token's
    embedding becomes its level's learned null vector (70%) or a random code's embedding (30%).
    The targets stay clean: the model learns to predict through damaged context.
    """

    def __init__(self, num_levels: int, vocab_size: int, hidden_size: int, tokens_per_step: int,
                 p_levels: list[float]):
        super().__init__(num_levels, vocab_size, hidden_size)
        if len(p_levels) not in (1, num_levels) or not all(0.0 <= p <= 1.0 for p in p_levels):
            raise ValueError(f"embedding_corruption_p_levels {p_levels} must hold 1 or {num_levels} probabilities in [0, 1]")
        self.tokens_per_step = tokens_per_step
        self.p_levels = list(p_levels)
        self.null_weight = nn.Parameter(torch.empty(num_levels, hidden_size))

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        if not self.training:
            return super().forward(idx, start)
        B, S = idx.shape
        device = idx.device
        levels = self.table_ids(start, S, device)  # (S,)
        p = torch.tensor(self.p_levels, device=device).expand(self.num_tables)[levels]
        corrupt = torch.rand(B, S, device=device) < p  # (B, S)
        steps = torch.div(torch.arange(start, start + S, device=device), self.tokens_per_step, rounding_mode="floor")
        num_steps = int(steps[-1] - steps[0]) + 1
        for _ in range(max(1, num_steps // 64)):
            first = int(steps[0]) + int(torch.randint(0, num_steps, ()))
            length = int(torch.randint(2, 9, ()))
            hit_levels = torch.rand(self.num_tables, device=device) < 0.5
            corrupt |= ((steps >= first) & (steps < first + length) & hit_levels[levels])[None]
        use_null = corrupt & (torch.rand(B, S, device=device) < 0.7)
        use_random = corrupt & ~use_null
        idx = torch.where(use_random, torch.randint_like(idx, self.vocab_size), idx)
        embeds = super().forward(idx, start)
        return torch.where(use_null[..., None], self.null_weight[levels].to(embeds.dtype), embeds)


def corruption_schedule(num_steps: int, p_start: float, p_end: float, device: torch.device) -> torch.Tensor:
    """Per-timestep corruption probability, interpolated log-linearly from p_start to p_end: (num_steps,)."""
    if num_steps == 1:
        return torch.tensor([max(p_start, p_end)], device=device)
    fraction = torch.linspace(0.0, 1.0, num_steps, device=device)
    log_start, log_end = math.log(max(p_start, 1e-12)), math.log(max(p_end, 1e-12))
    probs = torch.exp(log_start + (log_end - log_start) * fraction)
    if p_start == 0.0:
        probs[0] = 0.0
    if p_end == 0.0:
        probs[-1] = 0.0
    return probs.clamp(0.0, 1.0)


def corrupt_tokens(codes: torch.Tensor, vocab_size: int, tokens_per_step: int, p_start: float, p_end: float,
                   block_len_steps: int) -> torch.Tensor:
    """Replace whole timesteps of `codes` (B, ...) by random other tokens, in contiguous blocks.

    The non-batch axes are flattened in order; every tokens_per_step consecutive tokens form one
    timestep. Blocks of block_len_steps timesteps start with a probability chosen so that a
    timestep t is covered with probability schedule[t] (1 - (1 - p_block) ** block_len = p).
    """
    B = codes.size(0)
    flat = codes.reshape(B, -1)
    L = flat.size(1)
    num_steps = math.ceil(L / tokens_per_step)
    p_cover = corruption_schedule(num_steps, p_start, p_end, codes.device)  # (steps,)
    p_block = 1.0 - (1.0 - p_cover).pow(1.0 / block_len_steps)
    starts = (torch.rand(B, num_steps, device=codes.device) < p_block).float()  # (B, steps)
    covered = F.conv1d(F.pad(starts[:, None], (block_len_steps - 1, 0)), starts.new_ones(1, 1, block_len_steps))[:, 0] > 0
    mask = covered.repeat_interleave(tokens_per_step, dim=1)[:, :L]  # (B, L)
    replacement = torch.randint_like(flat, vocab_size - 1)
    replacement = replacement + (replacement >= flat).long()  # uniform over the other tokens
    return torch.where(mask, replacement, flat).view_as(codes)
