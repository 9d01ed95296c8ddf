"""Quantisers shared by the tokenizer models: VQ with an EMA codebook, residual VQ, and FSQ.

- `VectorQuantizer`: nearest-neighbour codebook lookup (VQ-VAE). The codebook is learned by
  exponential moving averages of the vectors assigned to each code (SoundStream / EnCodec), not by
  gradients, so it lives in buffers. The encoder is pulled towards its codes by the commitment
  loss; gradients pass the lookup straight through (or with the rotation trick).
- `ResidualVectorQuantizer`: Q VQ levels, each quantising what the previous ones left over.
- `FiniteScalarQuantizer`: FSQ (Mentzer et al. 2023): each latent dimension is bounded and rounded
  to one of a few levels; the codebook is implicit, the index is a mixed-radix number.

Dead-code policy (VectorQuantizer, training mode only): the EMA of how many vectors each code
received per batch is tracked (`ema_cluster_size`). After every update, a code is dead when it
received no vector in this batch and its EMA is below `dead_code_threshold` times the uniform
rate (vectors in the batch / codebook_size). A dead code is replaced by an encoder output drawn
from the current batch (without replacement where the batch holds enough vectors), and its EMA
is set to exactly the threshold: unless the next batch uses it, it is replaced again, so revived
codes keep following the encoder's outputs until they are used. The draw uses torch's global RNG
of the batch's device, so training is deterministic given the seed. The EMA starts at zero, so
the first training batch revives every unused code: the codebook is initialised from data (like
k-means++ without the distances).

Data parallelism: EMA statistics and revived vectors come from the local batch. A trainer that
runs several ranks can make them identical everywhere with `set_quantizer_all_reduce(model, fn)`,
where `fn(tensor) -> tensor` sums over ranks (e.g. a wrapper around torch.distributed.all_reduce);
model code never talks to torch.distributed itself. Without it, DDP's buffer broadcast keeps the
ranks in sync with rank 0.

Shapes: vectors of width D in any leading shape (...), flattened to N rows inside; K codes of
width Dc (`codebook_dim`, projected to and from D when it differs); Q levels of a residual VQ.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modeling import reports
from modeling.reports import Reported

# Rows of the (N, K) distance matrix computed at once: bounds memory for big codebooks and batches.
_MAX_DISTANCE_ELEMENTS = 1 << 24


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (..., D) the codes' vectors in the forward, gradients pass to the input
    indices: torch.Tensor  # (...) int64; (..., Q) for a residual VQ
    loss: torch.Tensor  # scalar: the weighted auxiliary loss (commitment), 0 where there is none
    perplexity: torch.Tensor  # scalar: exp(entropy) of this batch's code histogram (mean over levels)
    utilization: torch.Tensor  # scalar: fraction of the codebook used at least once in this batch


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def code_histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """indices (any shape, int) -> counts (K,) float. scatter_add, not bincount: works on meta tensors."""
    flat = indices.reshape(-1)
    counts = torch.zeros(codebook_size, device=flat.device, dtype=torch.float32)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distribution counts / counts.sum(); empty bins contribute nothing."""
    probs = counts / counts.sum().clamp_min(1.0)
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum()


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy): the effective number of codes used, between 1 and K."""
    return torch.exp(entropy_from_counts(counts))


def round_ste(z: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return z + (z.round() - z).detach()


def rotate_to(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): equals `target` in the forward pass; the gradient
    reaching `source` is the output gradient rotated (and scaled) by the fixed map that takes
    `source` onto `target`, instead of being copied unchanged as in the straight-through estimator.

    source, target: (N, D). With u = source/|source|, q = target/|target|, w = (u + q)/|u + q|
    (all detached): R = I - 2 w w^T + 2 q u^T sends u to q, and the output is |target|/|source| R source.
    """
    source_norm = source.norm(dim=-1, keepdim=True).clamp_min(eps)
    target_norm = target.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (source / source_norm).detach()
    q = (target / target_norm).detach()
    w = F.normalize(u + q, dim=-1, eps=eps).detach()
    rotated = (
        source
        - 2 * (source * w).sum(dim=-1, keepdim=True) * w
        + 2 * (source * u).sum(dim=-1, keepdim=True) * q
    )
    return rotated * (target_norm / source_norm).detach()


class VectorQuantizer(nn.Module):
    """Nearest-code VQ with an EMA codebook, dead-code revival and a commitment loss.

    forward(z (..., D)) -> QuantizerOutput with indices (...). In training mode (or update=True)
    the codebook EMA is updated from this batch and dead codes are revived (module docstring).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        commitment_weight: float = 0.25,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 0.1,
        use_rotation_trick: bool = False,
        epsilon: float = 1e-5,
    ):
        super().__init__()
        codebook_dim = dim if codebook_dim is None else codebook_dim
        if codebook_size < 1 or codebook_dim < 1:
            raise ValueError(f"codebook_size and codebook_dim must be >= 1, got {codebook_size}, {codebook_dim}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.commitment_weight = commitment_weight
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.use_rotation_trick = use_rotation_trick
        self.epsilon = epsilon
        has_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if has_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if has_projection else nn.Identity()
        self.register_buffer("codebook", torch.empty(codebook_size, codebook_dim))  # (K, Dc)
        self.register_buffer("ema_cluster_size", torch.empty(codebook_size))  # (K,) vectors per batch, EMA
        self.register_buffer("ema_embed_sum", torch.empty(codebook_size, codebook_dim))  # (K, Dc) EMA of sums
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # see module docstring
        self.last_num_revived = 0  # codes revived by the latest update, for logging
        self.last_counts: torch.Tensor | None = None  # (K,) vectors per code in the last forward
        self.report_name = "codebook/l0"  # a residual quantiser names its levels

    def reset_parameters(self) -> None:
        nn.init.normal_(self.codebook)  # replaced from data on the first training batch
        nn.init.zeros_(self.ema_cluster_size)
        nn.init.zeros_(self.ema_embed_sum)

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (N, Dc) fp32 -> index of the nearest code (N,), in row chunks to bound memory.

        Always in fp32, also under autocast: bf16 distances would pick wrong codes.
        """
        codebook = self.codebook.float()
        code_norms = codebook.pow(2).sum(dim=1)  # (K,)
        rows_per_chunk = max(1, _MAX_DISTANCE_ELEMENTS // self.codebook_size)
        indices = []
        with _no_autocast(flat.device):
            for chunk in flat.float().split(rows_per_chunk):
                # |x - c|^2 without the |x|^2 term, which does not change the argmin; one fused
                # |c|^2 - 2 x.c (addmm) instead of three passes over (n, K)
                distances = torch.addmm(code_norms, chunk, codebook.t(), alpha=-2)  # (n, K)
                indices.append(distances.argmin(dim=1))
        return torch.cat(indices) if len(indices) != 1 else indices[0]

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> indices (...) int64. No state is changed."""
        z_in = self.project_in(z)
        return self._nearest(z_in.reshape(-1, self.codebook_dim).float()).view(z_in.shape[:-1])

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> vectors (..., D)."""
        return self.project_out(F.embedding(indices, self.codebook))

    def forward(self, z: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        update = self.training if update is None else update
        z_in = self.project_in(z)  # (..., Dc)
        flat = z_in.reshape(-1, self.codebook_dim).float()  # (N, Dc); distances in fp32
        indices = self._nearest(flat.detach())  # (N,)
        codes = F.embedding(indices, self.codebook).float()  # (N, Dc), no gradient (a buffer)
        commitment = F.mse_loss(flat, codes)
        if self.use_rotation_trick:
            quantized = rotate_to(flat, codes)
        else:
            quantized = flat + (codes - flat).detach()  # straight-through
        counts = code_histogram(indices, self.codebook_size)  # (K,)
        self.last_counts = counts
        self.last_num_revived = 0
        if update:
            self._update_codebook(flat.detach(), indices, counts)
        quantized = self.project_out(quantized.to(z_in.dtype).view(z_in.shape))
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.view(z_in.shape[:-1]),
            loss=self.commitment_weight * commitment,
            perplexity=perplexity_from_counts(counts).detach(),
            utilization=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat)  # (K, Dc)
        if self.all_reduce is not None:
            counts, embed_sum = self.all_reduce(counts.clone()), self.all_reduce(embed_sum)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(embed_sum, alpha=1 - decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0; codes never used keep their vector.
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        updated = self.ema_embed_sum / smoothed.clamp_min(self.epsilon)[:, None]
        is_used = (self.ema_cluster_size > self.epsilon)[:, None]
        self.codebook.copy_(torch.where(is_used, updated, self.codebook))
        self._revive_dead_codes(flat, counts)

    @torch.no_grad()
    def _revive_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        """counts (K,): vectors per code in this batch (summed over ranks when all_reduce is set)."""
        self.last_num_revived = 0
        num_vectors = float(counts.sum())
        if self.dead_code_threshold == 0 or flat.shape[0] == 0:
            return
        threshold = self.dead_code_threshold * num_vectors / self.codebook_size
        is_dead = (self.ema_cluster_size < threshold) & (counts == 0)  # (K,)
        num_dead = int(is_dead.sum())
        if num_dead == 0:
            return
        if flat.shape[0] >= num_dead:
            picks = torch.randperm(flat.shape[0], device=flat.device)[:num_dead]
        else:
            picks = torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)
        new_vectors = flat[picks]  # (num_dead, Dc)
        if self.all_reduce is not None:  # the mean of every rank's draw: the same vectors everywhere
            num_ranks = self.all_reduce(torch.ones((), device=flat.device))
            new_vectors = self.all_reduce(new_vectors) / num_ranks
        self.codebook[is_dead] = new_vectors.to(self.codebook.dtype)
        self.ema_embed_sum[is_dead] = new_vectors.to(self.ema_embed_sum.dtype) * threshold
        self.ema_cluster_size[is_dead] = threshold
        self.last_num_revived = num_dead

    @property
    def last_report(self) -> dict[str, Reported]:
        """Code usage of the last forward and the dead codes it revived (modeling/reports.py)."""
        if self.last_counts is None:
            return {}
        return {self.report_name: reports.usage(self.last_counts), f"{self.report_name}_revived": reports.count(self.last_num_revived)}

    def codebook_usage(self) -> torch.Tensor:
        """(K,) share of vectors each code received, from the EMA (sums to 1 once trained)."""
        return self.ema_cluster_size / self.ema_cluster_size.sum().clamp_min(self.epsilon)


class ResidualVectorQuantizer(nn.Module):
    """Q VectorQuantizers in sequence; level q quantises the residual left by levels < q.

    forward(z (..., D)) -> QuantizerOutput with indices (..., Q) and the sum of the levels'
    vectors; loss is the mean of the levels' commitment losses, perplexity and utilization the
    mean over levels.
    """

    def __init__(self, num_quantizers: int, dim: int, codebook_size: int, **quantizer_kwargs):
        super().__init__()
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        self.num_quantizers = num_quantizers
        self.codebook_size = codebook_size
        self.layers = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, **quantizer_kwargs) for _ in range(num_quantizers)
        )
        for level, layer in enumerate(self.layers):
            layer.report_name = f"codebook/l{level}"

    def forward(self, z: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        residual = z
        quantized = torch.zeros_like(z)
        outputs = []
        for layer in self.layers:
            out = layer(residual, update=update)
            residual = residual - out.quantized.detach()
            quantized = quantized + out.quantized
            outputs.append(out)
        return QuantizerOutput(
            quantized=quantized,
            indices=torch.stack([out.indices for out in outputs], dim=-1),
            loss=torch.stack([out.loss for out in outputs]).mean(),
            perplexity=torch.stack([out.perplexity for out in outputs]).mean(),
            utilization=torch.stack([out.utilization for out in outputs]).mean(),
        )

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> indices (..., Q). No state is changed."""
        residual = z
        indices = []
        for layer in self.layers:
            level_indices = layer.encode(residual)
            residual = residual - layer.decode(level_indices)
            indices.append(level_indices)
        return torch.stack(indices, dim=-1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., q) with q <= Q -> (..., D): the sum of the first q levels' vectors."""
        num_levels = indices.shape[-1]
        if not 1 <= num_levels <= self.num_quantizers:
            raise ValueError(f"indices have {num_levels} levels; this RVQ has {self.num_quantizers}")
        quantized = self.layers[0].decode(indices[..., 0])
        for level in range(1, num_levels):
            quantized = quantized + self.layers[level].decode(indices[..., level])
        return quantized


class FiniteScalarQuantizer(nn.Module):
    """FSQ: bound each of len(levels) dimensions with tanh, round it to one of levels[i] values.

    Codes lie on the grid {-L//2, ..., (L-1)//2} / (L//2) per dimension (odd L: symmetric in
    [-1, 1]; even L: one more level below zero). The index of a code is the mixed-radix number
    sum_i digit_i * prod(levels[:i]) with digit_i in [0, L_i), so codebook_size = prod(levels).
    forward(z (..., D)) -> QuantizerOutput with indices (...); D is projected to len(levels) and
    back when it differs. loss = commitment_weight * mse(projected latent, its code), which keeps
    the latents near the [-1, 1] grid (as the reference FSQ regulariser).
    """

    def __init__(self, levels: list[int], dim: int | None = None, commitment_weight: float = 0.0):
        super().__init__()
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of ints >= 2, got {levels}")
        self.levels = list(levels)
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else dim
        self.codebook_size = math.prod(levels)
        self.commitment_weight = commitment_weight
        has_projection = self.dim != self.codebook_dim
        self.project_in = nn.Linear(self.dim, self.codebook_dim) if has_projection else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, self.dim) if has_projection else nn.Identity()
        # Derived from `levels`: not saved, and recomputed by reset_parameters after a meta build.
        self.register_buffer("_levels", torch.empty(self.codebook_dim, dtype=torch.int64), persistent=False)
        self.register_buffer("_basis", torch.empty(self.codebook_dim, dtype=torch.int64), persistent=False)
        self.last_counts: torch.Tensor | None = None  # (K,) vectors per code in the last forward
        self.report_name = "codebook/l0"
        self.reset_parameters()

    @property
    def last_report(self) -> dict[str, Reported]:
        """Code usage of the last forward (modeling/reports.py)."""
        return {} if self.last_counts is None else {self.report_name: reports.usage(self.last_counts)}

    def reset_parameters(self) -> None:
        device = self._levels.device
        if device.type == "meta":
            return
        levels = torch.tensor(self.levels, dtype=torch.int64, device=device)
        self._levels.copy_(levels)
        self._basis.copy_(torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0))

    def _half_width(self) -> torch.Tensor:
        return (self._levels // 2).float()

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """z (..., d) -> values in (-L/2, L/2) that round to the integer digits - L//2."""
        levels = self._levels.float()
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., d) -> codes on the grid (..., d), straight-through gradient."""
        return round_ste(self.bound(z)) / self._half_width()

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., d) on the grid -> indices (...) int64."""
        digits = (codes * self._half_width() + self._half_width()).round().long()
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> codes (..., d) on the grid (before project_out)."""
        digits = (indices[..., None] // self._basis) % self._levels
        return (digits.float() - self._half_width()) / self._half_width()

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> indices (...)."""
        return self.codes_to_indices(self.quantize(self.project_in(z).float()))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> vectors (..., D)."""
        return self.project_out(self.indices_to_codes(indices))

    def forward(self, z: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        del update  # FSQ has no state to update; the argument keeps one interface for all quantisers
        z_in = self.project_in(z).float()  # (..., d)
        codes = self.quantize(z_in)
        indices = self.codes_to_indices(codes.detach())
        loss = z_in.new_zeros(())
        if self.commitment_weight > 0:
            loss = self.commitment_weight * F.mse_loss(z_in, codes.detach())
        counts = code_histogram(indices, self.codebook_size)
        self.last_counts = counts
        return QuantizerOutput(
            quantized=self.project_out(codes.to(z.dtype)),
            indices=indices,
            loss=loss,
            perplexity=perplexity_from_counts(counts).detach(),
            utilization=(counts > 0).float().mean(),
        )


def set_quantizer_all_reduce(model: nn.Module, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Give every VectorQuantizer in `model` a function that sums a tensor over data-parallel ranks."""
    for module in model.modules():
        if isinstance(module, VectorQuantizer):
            module.all_reduce = all_reduce
