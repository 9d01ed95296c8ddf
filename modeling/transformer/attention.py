"""Multi-head attention of the configurable transformer, with the seed's four kernels (`att_type`).

- standard: softmax(Q K^T / sqrt(Dh)) V written out; the (Tq, Tk) score matrix is materialised.
- xformer: memory-efficient exact attention in pure torch (chunked_attention.py): (chunk, chunk)
  blocks of scores folded into an online softmax, recomputed in the backward, never a (Tq, Tk)
  matrix; runs on any device and computes the same attention as standard.
- flash: torch's fused F.scaled_dot_product_attention, with the backend picked through SDPA's backend
  selection (torch.nn.attention.sdpa_kernel): FLASH_ATTENTION first, then EFFICIENT_ATTENTION,
  CUDNN_ATTENTION and MATH; the first that runs these inputs is kept for them. On CUDA that is the
  real flash kernel when dtype and head size allow it; on CPU torch has its own flash kernel
  (_scaled_dot_product_flash_attention_for_cpu, fp32/bf16) and it is the one that runs. Which
  backend ran is logged once per kind of call and kept in `Attention.kernel` (the model reports it).
- frequency: attention against the sequence's Fourier modes. Keys and values are transformed along
  time (rFFT, orthonormal) and the lowest `frequency_modes` modes kept; their real and imaginary parts
  become the tokens the (time-domain) queries attend to, so a step looks at the periodic components
  of the whole sequence rather than at its steps: O(Tq x modes) scores. A Fourier mode mixes every
  step, the future included, so a causal self-attention (the decoder's) cannot use it and stays in
  the time domain (standard); the encoder's self-attention and the decoder's cross-attention (over
  the encoder's memory, which is all past) use it.

Incremental decoding keeps, per attention, `cache = {"key": (B, H, S, Dh), "value": ...}`: a
self-attention appends the new step's key and value; a cross-attention computes the memory's once.

Shapes: B batch, H heads, Dh head_dim, D = H * Dh, Tq queries, Tk keys, C chunk.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from modeling.transformer.chunked_attention import chunked_attention

log = logging.getLogger(__name__)

SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
# (device type, dtype, is_causal, has dropout, needs grad) -> the SDPA backend that ran such a call first
_sdpa_choice: dict[tuple, SDPBackend] = {}


def causal_mask(num_queries: int, num_keys: int, first_query: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool, True = may attend: query i sits at position first_query + i, key j at j."""
    query_pos = first_query + torch.arange(num_queries, device=device)
    return torch.arange(num_keys, device=device)[None, :] <= query_pos[:, None]


def standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, dropout_p: float = 0.0,
                       first_query: int = 0) -> torch.Tensor:
    """q (B, H, Tq, Dh), k and v (B, H, Tk, Dh) -> (B, H, Tq, Dh), with the scores written out."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, Tq, Tk)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.size(2), k.size(2), first_query, q.device), float("-inf"))
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                   dropout_p: float = 0.0) -> tuple[torch.Tensor, SDPBackend]:
    """F.scaled_dot_product_attention on the first backend of SDPA_BACKENDS that runs this kind of call.

    The choice is probed once per (device, dtype, causal, dropout, grad) and reused; a backend that
    later refuses a call (e.g. another head size) is probed again. Returns the output and the backend.
    """
    key = (q.device.type, q.dtype, is_causal, dropout_p > 0, torch.is_grad_enabled() and q.requires_grad)
    chosen = _sdpa_choice.get(key)
    order = SDPA_BACKENDS if chosen is None else (chosen, *[b for b in SDPA_BACKENDS if b != chosen])
    for backend in order:
        try:
            with warnings.catch_warnings():  # a refusing backend warns why; we say what ran instead
                warnings.simplefilter("ignore")
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p)
        except RuntimeError:
            continue
        if chosen != backend:
            _sdpa_choice[key] = backend
            log.info("att_type flash: scaled_dot_product_attention runs the %s backend on %s (%s, causal=%s)%s",
                     backend.name, q.device.type, str(q.dtype).removeprefix("torch."), is_causal,
                     " (torch's CPU flash kernel)" if backend == SDPBackend.FLASH_ATTENTION and q.device.type == "cpu" else "")
        return out, backend
    raise RuntimeError(f"no scaled_dot_product_attention backend runs q {tuple(q.shape)} {q.dtype} on {q.device}")


def spectral_tokens(x: torch.Tensor, num_modes: int) -> torch.Tensor:
    """x (B, H, T, Dh) -> the real and imaginary parts of its lowest Fourier modes along T, as tokens
    (B, H, M, Dh): the modes' real parts, then the imaginary parts of those that have one (not the
    constant mode, nor the Nyquist mode of an even T)."""
    length = x.size(2)
    spectrum = torch.fft.rfft(x.float(), dim=2, norm="ortho")[:, :, :num_modes]  # (B, H, F, Dh) complex
    num_kept = spectrum.size(2)
    last_imaginary = num_kept - 1 if length % 2 == 0 and num_kept == length // 2 + 1 else num_kept
    tokens = torch.cat([spectrum.real, spectrum.imag[:, :, 1:last_imaginary]], dim=2)
    return tokens.to(x.dtype)


class Attention(nn.Module):
    """Multi-head self- or cross-attention. forward(x (B, Tq, D), memory (B, Tk, D) for cross,
    cache for incremental decoding) -> (B, Tq, D)."""

    def __init__(self, d_model: int, nhead: int, att_type: str, dropout: float, is_causal: bool, is_cross: bool,
                 chunk_size: int = 512, num_modes: int = 32):
        super().__init__()
        assert not (is_causal and is_cross), "cross-attention reads the whole memory"
        self.nhead = nhead
        self.is_causal = is_causal
        self.is_cross = is_cross
        # a Fourier mode mixes every step, the future too: causal self-attention stays in time
        self.att_type = "standard" if att_type == "frequency" and is_causal else att_type
        self.dropout_p = dropout
        self.chunk_size = chunk_size
        self.num_modes = num_modes
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.kernel: str | None = None  # what computed the last call, e.g. "sdpa:FLASH_ATTENTION"

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.nhead, D // self.nhead).transpose(1, 2)  # (B, H, T, Dh)

    def _keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._heads(self.k_proj(source)), self._heads(self.v_proj(source))  # (B, H, Tk, Dh)
        if self.att_type == "frequency":
            k, v = spectral_tokens(k, self.num_modes), spectral_tokens(v, self.num_modes)  # (B, H, M, Dh)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q = self._heads(self.q_proj(x))  # (B, H, Tq, Dh)
        if self.is_cross:
            if cache is not None and "key" in cache:
                k, v = cache["key"], cache["value"]  # the memory's, computed at the first step
            else:
                k, v = self._keys_values(memory)
                if cache is not None:
                    cache["key"], cache["value"] = k, v
        else:
            if cache is not None and self.att_type == "frequency":
                raise ValueError("a frequency self-attention reads the whole sequence: it cannot decode incrementally")
            k, v = self._keys_values(x)
            if cache is not None:
                if "key" in cache:
                    if T != 1:
                        raise ValueError(f"incremental decoding takes one step at a time, got {T}")
                    k, v = torch.cat([cache["key"], k], dim=2), torch.cat([cache["value"], v], dim=2)  # (B, H, S, Dh)
                cache["key"], cache["value"] = k, v
        # one new step after cached ones sees every key: no mask; the full forward masks the future
        is_causal = self.is_causal and T > 1
        dropout_p = self.dropout_p if self.training else 0.0
        if self.att_type == "flash":
            y, backend = sdpa_attention(q, k, v, is_causal, dropout_p)
            self.kernel = f"sdpa:{backend.name}"
        elif self.att_type == "xformer":
            y = chunked_attention(q, k, v, is_causal, self.chunk_size, dropout_p)
            self.kernel = "xformer"
        else:
            y = standard_attention(q, k, v, is_causal, dropout_p)
            self.kernel = self.att_type  # standard, or frequency (its scores are standard over spectral tokens)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))
