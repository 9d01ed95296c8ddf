"""att_type "xformer": memory-efficient exact attention in pure torch (any device, CPU included).

The FlashAttention algorithm (Dao et al. 2022) without a fused kernel: queries and keys go in blocks
of C; each (C, C) block of scores is computed, folded into a running softmax (online max and sum)
and dropped, so the (Tq, Tk) score matrix never exists. The forward keeps only the output and each
query's log-sum-exp; the backward recomputes the blocks from them (a torch.autograd.Function, so
autograd stores nothing per block). Memory beyond q, k, v and the output: O(C x C) per step,
independent of the sequence; a causal call skips the blocks above the diagonal.

Dropout on the attention weights is applied block by block with masks drawn from a generator seeded
once per call (from torch's global RNG, so seeded runs and activation checkpointing replay it); the
backward draws the same masks in the same order.

Shapes: B batch, H heads, Tq queries, Tk keys, Dh head_dim, C block.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch


def _blocks(num_queries: int, num_keys: int, block: int, is_causal: bool) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """(query start, query end, [(key start, key end), ...]) in the order both passes walk them."""
    for q_start in range(0, num_queries, block):
        q_end = min(q_start + block, num_queries)
        last_key = q_end if is_causal else num_keys  # a causal query sees keys up to its own position
        yield q_start, q_end, [(k_start, min(k_start + block, last_key)) for k_start in range(0, last_key, block)]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the softmax statistics and sums of fp16 / bf16 / fp32 inputs; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q_c: torch.Tensor, k_b: torch.Tensor, q_start: int, k_start: int, is_causal: bool) -> torch.Tensor:
    """(B, H, Cq, Ck) scaled scores of one block (fp32 or wider), -inf above the diagonal when causal."""
    scores = (q_c @ k_b.transpose(-2, -1)).to(_accumulation_dtype(q_c.dtype)) * (1.0 / math.sqrt(q_c.size(-1)))
    if is_causal and k_start + k_b.size(2) - 1 > q_start:  # the block reaches past some query's position
        query_pos = q_start + torch.arange(q_c.size(2), device=q_c.device)
        key_pos = k_start + torch.arange(k_b.size(2), device=q_c.device)
        scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
    return scores


def _keep_mask(generator: torch.Generator | None, like: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """Dropout's scaled keep mask (0 or 1 / (1 - p)) for one block, or None without dropout."""
    if generator is None:
        return None
    keep = torch.rand(like.shape, generator=generator, device=like.device) >= dropout_p
    return keep.to(like.dtype) / (1.0 - dropout_p)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def chunked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, block: int,
                    dropout_p: float = 0.0, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> output (B, H, Tq, Dh) in q's dtype and the log-sum-exp of each query's scores (B, H, Tq), fp32
    (fp64 for fp64 inputs)."""
    B, H, num_queries, head_dim = q.shape
    dtype = _accumulation_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, num_queries, device=q.device, dtype=dtype)
    generator = _generator(seed, q.device)
    for q_start, q_end, key_blocks in _blocks(num_queries, k.size(2), block, is_causal):
        q_c = q[:, :, q_start:q_end]
        running_max = torch.full((B, H, q_end - q_start, 1), float("-inf"), device=q.device, dtype=dtype)
        running_sum = torch.zeros_like(running_max)
        acc = torch.zeros(B, H, q_end - q_start, v.size(-1), device=q.device, dtype=dtype)  # (B, H, Cq, Dh)
        for k_start, k_end in key_blocks:
            scores = _scores(q_c, k[:, :, k_start:k_end], q_start, k_start, is_causal)  # (B, H, Cq, Ck)
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
            probs = torch.exp(scores - new_max)
            correction = torch.exp(running_max - new_max)
            running_sum = running_sum * correction + probs.sum(dim=-1, keepdim=True)
            keep = _keep_mask(generator, probs, dropout_p)
            weights = probs if keep is None else probs * keep
            acc = acc * correction + weights.to(v.dtype) @ v[:, :, k_start:k_end]
            running_max = new_max
        out[:, :, q_start:q_end] = (acc / running_sum).to(q.dtype)
        lse[:, :, q_start:q_end] = (running_max + running_sum.log()).squeeze(-1)
    return out, lse


class ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, is_causal: bool, block: int, dropout_p: float, seed: int | None):
        out, lse = chunked_forward(q, k, v, is_causal, block, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (is_causal, block, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        is_causal, block, dropout_p, seed = ctx.options
        scale = 1.0 / math.sqrt(q.size(-1))
        dtype = _accumulation_dtype(q.dtype)
        grad_out = grad_out.to(dtype)
        # rowsum(dO * O) = rowsum(dP * P): the softmax backward's per-query term, from the outputs
        delta = (grad_out * out.to(dtype)).sum(dim=-1, keepdim=True)  # (B, H, Tq, 1)
        grad_q, grad_k, grad_v = (torch.zeros_like(t, dtype=dtype) for t in (q, k, v))
        generator = _generator(seed, q.device)
        for q_start, q_end, key_blocks in _blocks(q.size(2), k.size(2), block, is_causal):
            q_c, grad_out_c = q[:, :, q_start:q_end], grad_out[:, :, q_start:q_end]
            lse_c, delta_c = lse[:, :, q_start:q_end, None], delta[:, :, q_start:q_end]
            for k_start, k_end in key_blocks:
                k_b, v_b = k[:, :, k_start:k_end], v[:, :, k_start:k_end]
                probs = torch.exp(_scores(q_c, k_b, q_start, k_start, is_causal) - lse_c)  # (B, H, Cq, Ck), normalised
                keep = _keep_mask(generator, probs, dropout_p)
                weights = probs if keep is None else probs * keep
                grad_v[:, :, k_start:k_end] += weights.transpose(-2, -1) @ grad_out_c
                grad_weights = grad_out_c @ v_b.to(dtype).transpose(-2, -1)
                grad_probs = grad_weights if keep is None else grad_weights * keep
                grad_scores = probs * (grad_probs - delta_c) * scale
                grad_q[:, :, q_start:q_end] += grad_scores @ k_b.to(dtype)
                grad_k[:, :, k_start:k_end] += grad_scores.transpose(-2, -1) @ q_c.to(dtype)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, chunk_size: int,
                      dropout_p: float = 0.0) -> torch.Tensor:
    """q (B, H, Tq, Dh), k and v (B, H, Tk, Dh) -> (B, H, Tq, Dh): softmax(q k^T / sqrt(Dh)) v (masked
    above the diagonal when causal, which needs Tq == Tk), in blocks of chunk_size."""
    if is_causal and q.size(2) != k.size(2):
        raise ValueError(f"causal chunked attention needs as many queries as keys, got {q.size(2)} and {k.size(2)}")
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return ChunkedAttention.apply(q, k, v, is_causal, chunk_size, dropout_p, seed)
    return chunked_forward(q, k, v, is_causal, chunk_size, dropout_p, seed)[0]
