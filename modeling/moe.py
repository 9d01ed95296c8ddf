"""Top-k routed mixture-of-experts MLP: a drop-in replacement for a transformer block's MLP.

Any model family can swap its MLP for one (the GPT does it for the blocks its config names):

    from modeling.moe import MoEConfig, MoEMLP, moe_aux_loss

    mlp = MoEMLP(d_model, hidden, MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25,
                                            activation="swiglu", aux_loss_weight=0.01))
    y = mlp(x)                                       # x (..., D) -> y (..., D), like the MLP it replaces
    loss = task_loss + moe_aux_loss(model.modules()) # while training: the weighted load-balancing loss
    mlp.init_weights(in_std=..., out_std=0.0)        # the family's init for the expert matrices

Each expert is an MLP of width `hidden` (as wide as the dense MLP it replaces, as in Switch/GShard).
The router is a bias-free linear layer (an `nn.Linear`, so a family's Linear init reaches it); the
expert weights are stacked per layer, `experts.w_in` (E, D, H), `experts.w_out` (E, H, D) and for
SwiGLU `experts.w_gate` (E, D, H), so a checkpoint holds one tensor per matrix with experts on dim 0.

Routing, for the N tokens of one call (this rank's tokens under expert parallelism):
- softmax over the E router logits in fp32; each token picks its top k experts. Gates: the k
  probabilities renormalized to sum to 1 when k > 1 (GShard, Mixtral); the raw probability when k == 1
  (Switch), so the router still learns from the task loss.
- capacity (training only): an expert takes at most ceil(capacity_factor * k * N / E) tokens. First
  choices are served before second choices, then tokens in order (GShard); an assignment past
  capacity is dropped (gate 0: the token keeps only its residual). capacity_factor <= 0 drops none.
  Evaluation and generation never drop, so a token's output does not depend on the rest of the batch
  (a KV-cache decode equals the full forward).
- load-balancing loss (Switch Transformer eq. 4): E * sum_e f_e * P_e, with f_e the fraction of the
  N * k assignments that chose expert e (before capacity) and P_e the mean router probability of e.
  1.0 when routing is uniform, E when every token goes to one expert.

Where the experts run is the dispatcher's business: by default here, on this device; under expert
parallelism `modeling.moe_dispatch` (the one module of modeling/ that talks to torch.distributed)
keeps 1/P of the experts per rank and exchanges tokens all-to-all. Both see the same routed,
expert-sorted tokens, so both give the same outputs for the same weights and tokens.

Shapes: N tokens of this call, D = d_model, H = hidden, E experts (L held here), k = top_k,
M = kept (token, expert) assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from modeling import reports
from modeling.reports import Reported

ACTIVATIONS = ("relu2", "relu", "gelu", "silu", "swiglu")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = field(metadata={"help": "experts per MoE layer (E)"})
    top_k: int = field(default=2, metadata={"help": "experts each token is sent to (k <= E)"})
    capacity_factor: float = field(default=1.25, metadata={
        "help": "training: an expert takes at most ceil(factor * k * tokens / E) tokens, the rest are dropped; <= 0: no limit"})
    activation: Literal["relu2", "relu", "gelu", "silu", "swiglu"] = field(default="relu2", metadata={
        "help": "expert MLP: relu2 (nanochat), relu, gelu, silu, or swiglu (silu(x W_gate) * x W_in, as Llama/Qwen)"})
    aux_loss_weight: float = field(default=0.01, metadata={"help": "weight of this layer's load-balancing loss in the training loss"})

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts = {self.num_experts}], got {self.top_k}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")


@dataclass(frozen=True, kw_only=True)
class MoEFields:
    """The MoE knobs of a model family's config: inherit them (fields are keyword-only, so they
    follow the family's own fields), call `check_moe(num_layers)` in `__post_init__`, and build an
    `MoEMLP(d_model, hidden, config.moe_config(activation))` in the blocks `moe_block_indices` names."""

    moe_num_experts: int = field(default=0, metadata={"help": "experts per MoE block; 0: every MLP is dense"})
    moe_top_k: int = field(default=2, metadata={"help": "experts each token is routed to"})
    moe_capacity_factor: float = field(default=1.25, metadata={
        "help": "training: an expert takes at most ceil(factor * top_k * tokens / experts) tokens of a rank's batch; <= 0: no drops"})
    moe_layers: str = field(default="all", metadata={"help": "blocks with an MoE MLP: 'all' or block indices, e.g. '1,3'"})
    moe_aux_loss_weight: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss (mean over MoE blocks)"})

    def check_moe(self, num_layers: int) -> None:
        if self.moe_num_experts < 0:
            raise ValueError(f"moe_num_experts must be >= 0, got {self.moe_num_experts}")
        if self.moe_num_experts > 0:
            if not 1 <= self.moe_top_k <= self.moe_num_experts:
                raise ValueError(f"moe_top_k must be in [1, moe_num_experts = {self.moe_num_experts}], got {self.moe_top_k}")
            if self.moe_aux_loss_weight < 0:
                raise ValueError(f"moe_aux_loss_weight must be >= 0, got {self.moe_aux_loss_weight}")
            self.moe_block_indices(num_layers)

    def moe_block_indices(self, num_layers: int) -> frozenset[int]:
        """Indices of the blocks whose MLP is a mixture of experts (none when moe_num_experts is 0)."""
        if self.moe_num_experts == 0:
            return frozenset()
        if self.moe_layers.strip() == "all":
            return frozenset(range(num_layers))
        try:
            indices = frozenset(int(part) for part in self.moe_layers.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"moe_layers must be 'all' or comma-separated block indices, got {self.moe_layers!r}") from None
        if not indices or not all(0 <= i < num_layers for i in indices):
            raise ValueError(f"moe_layers must name blocks in [0, {num_layers}), got {self.moe_layers!r}")
        return indices

    def moe_config(self, activation: str) -> MoEConfig:
        return MoEConfig(num_experts=self.moe_num_experts, top_k=self.moe_top_k, capacity_factor=self.moe_capacity_factor,
                         activation=activation, aux_loss_weight=self.moe_aux_loss_weight)


@dataclass
class Routing:
    expert_index: torch.Tensor  # (N, k) int64: the experts each token chose, best first
    gates: torch.Tensor  # (N, k) fp32 combine weights; 0 where the assignment was dropped
    is_kept: torch.Tensor  # (N, k) bool: the assignment fit in its expert's capacity
    aux_loss: torch.Tensor  # () fp32 load-balancing loss (unweighted)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int | None:
    """Most tokens one expert takes from `num_tokens` tokens; None: no limit."""
    if capacity_factor <= 0:
        return None
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def route(logits_NE: torch.Tensor, top_k: int, capacity: int | None) -> Routing:
    """Top-k routing of N tokens over E experts from their router logits (N, E)."""
    num_tokens, num_experts = logits_NE.shape
    probs_NE = logits_NE.float().softmax(dim=-1)
    top_probs_Nk, expert_index_Nk = probs_NE.topk(top_k, dim=-1)
    gates_Nk = top_probs_Nk / top_probs_Nk.sum(dim=-1, keepdim=True) if top_k > 1 else top_probs_Nk

    chosen_NkE = F.one_hot(expert_index_Nk, num_experts)  # (N, k, E) int64
    fraction_routed_E = chosen_NkE.sum(dim=(0, 1)).float() / max(num_tokens * top_k, 1)
    mean_prob_E = probs_NE.sum(dim=0) / max(num_tokens, 1)
    aux_loss = num_experts * (fraction_routed_E * mean_prob_E).sum()

    if capacity is None:
        is_kept_Nk = torch.ones_like(expert_index_Nk, dtype=torch.bool)
    else:
        # each assignment's slot in its expert, counting all first choices before any second choice
        choice_major_E = chosen_NkE.transpose(0, 1).reshape(top_k * num_tokens, num_experts)  # (k * N, E)
        slot = (choice_major_E.cumsum(dim=0) * choice_major_E).sum(dim=-1) - 1  # (k * N,)
        is_kept_Nk = (slot < capacity).view(top_k, num_tokens).T
        gates_Nk = gates_Nk * is_kept_Nk
    return Routing(expert_index_Nk, gates_Nk, is_kept_Nk, aux_loss)


class GroupedExperts(nn.Module):
    """L expert MLPs with stacked weights, run on tokens already grouped by expert.

    Holds experts first_expert .. first_expert + L - 1 of the layer: all of them on one device, a
    slice under expert parallelism (`keep_experts`).
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str):
        super().__init__()
        self.first_expert = 0
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        if activation == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    @property
    def num_experts(self) -> int:
        """Experts held here (L)."""
        return self.w_in.size(0)

    @torch.no_grad()
    def init_weights(self, in_std: float, out_std: float) -> None:
        """Normal init: in_std for the input matrices (w_in, w_gate), out_std for w_out (0: zeros)."""
        for name, param in self.named_parameters():
            std = out_std if name == "w_out" else in_std
            if std > 0:
                nn.init.normal_(param, std=std)
            else:
                nn.init.zeros_(param)

    def keep_experts(self, first: int, count: int) -> None:
        """Drop every expert but first .. first + count - 1 (expert parallelism: this rank's share)."""
        assert 0 <= first and first + count <= self.num_experts, (first, count, self.num_experts)
        for name, param in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(param.detach()[first : first + count].clone(), requires_grad=param.requires_grad))
        self.first_expert += first

    def _expert(self, index: int, x_nD: torch.Tensor) -> torch.Tensor:
        h_nH = x_nD @ self.w_in[index]
        if self.activation == "relu2":
            h_nH = F.relu(h_nH).square()
        elif self.activation == "relu":
            h_nH = F.relu(h_nH)
        elif self.activation == "gelu":
            h_nH = F.gelu(h_nH)
        elif self.activation == "silu":
            h_nH = F.silu(h_nH)
        else:  # swiglu
            h_nH = F.silu(x_nD @ self.w_gate[index]) * h_nH
        return h_nH @ self.w_out[index]

    def forward(self, x_MD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (M, D) sorted by expert, counts[l] rows for local expert l -> (M, D) in the same order.

        Every expert runs, on zero rows if it got no token: its parameters stay in the autograd graph,
        so DDP and DeepSpeed see a (zero) gradient for each of them on every step.
        """
        assert len(counts) == self.num_experts and sum(counts) == x_MD.size(0), (counts, x_MD.shape)
        pieces = torch.split(x_MD, counts)
        return torch.cat([self._expert(index, piece) for index, piece in enumerate(pieces)])


# (tokens sorted by expert (M, D), tokens per expert (E,) int64, the layer's experts) -> expert outputs (M, D)
Dispatcher = Callable[[torch.Tensor, torch.Tensor, GroupedExperts], torch.Tensor]


def run_local(x_MD: torch.Tensor, counts_E: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
    """The default dispatcher: every expert is on this device."""
    return experts(x_MD, counts_E.tolist())


class MoEMLP(nn.Module):
    """Router + experts; see the module docstring. forward: x (..., D) -> (..., D)."""

    def __init__(self, d_model: int, hidden: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts  # E, whatever share of them this rank holds
        self.router = nn.Linear(d_model, config.num_experts, bias=False)
        self.experts = GroupedExperts(config.num_experts, d_model, hidden, config.activation)
        self.dispatcher: Dispatcher = run_local  # expert parallelism installs its own (moe_dispatch)
        self.aux_loss: torch.Tensor | None = None  # of the last forward, unweighted
        self.last_load: torch.Tensor | None = None  # (E,) assignments per expert of the last forward, before capacity
        self.last_dropped: torch.Tensor | None = None  # () assignments dropped at capacity

    @torch.no_grad()
    def init_weights(self, in_std: float, out_std: float, router_std: float | None = None) -> None:
        """Experts as `GroupedExperts.init_weights`; the router too when router_std is given."""
        self.experts.init_weights(in_std, out_std)
        if router_std is not None:
            nn.init.normal_(self.router.weight, std=router_std)

    @property
    def last_report(self) -> dict[str, Reported]:
        """The expert load (tokens per expert), assignments dropped at capacity and the load-balancing
        loss of the last forward (modeling/reports.py; summed over the model's MoE layers)."""
        if self.last_load is None:
            return {}
        assignments = self.last_load.sum()
        return {"moe/load": reports.usage(self.last_load), "moe/dropped": reports.count(self.last_dropped),
                "moe/dropped_fraction": reports.mean(self.last_dropped / assignments.clamp(min=1), assignments),
                "moe/aux_loss": reports.mean(self.aux_loss, 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_ND = x.reshape(-1, x.size(-1))
        num_tokens, top_k = x_ND.size(0), self.config.top_k
        capacity = expert_capacity(num_tokens, self.num_experts, top_k, self.config.capacity_factor) if self.training else None
        routing = route(self.router(x_ND), top_k, capacity)
        self.aux_loss = routing.aux_loss
        self.last_load = torch.bincount(routing.expert_index.reshape(-1), minlength=self.num_experts)
        self.last_dropped = (~routing.is_kept).sum()

        # kept assignments (token n, choice j) -> flat index n * k + j, grouped by expert (stable: token order within)
        flat_expert = routing.expert_index.reshape(-1)  # (N * k,)
        kept = routing.is_kept.reshape(-1).nonzero().squeeze(1)
        order_M = kept[torch.argsort(flat_expert[kept], stable=True)]
        counts_E = torch.bincount(flat_expert[order_M], minlength=self.num_experts)
        y_MD = self.dispatcher(x_ND[order_M // top_k], counts_E, self.experts)

        y_NkD = x_ND.new_zeros(num_tokens * top_k, x_ND.size(1)).index_copy(0, order_M, y_MD).view(num_tokens, top_k, -1)
        y_ND = (y_NkD * routing.gates.to(y_NkD.dtype).unsqueeze(-1)).sum(dim=1)
        return y_ND.view_as(x)


def num_idle_expert_params(modules: Iterable[nn.Module]) -> int:
    """Expert parameters a token does not run through (E - k of each MoE layer's E experts): FLOP
    counts subtract them, since a token costs only its top_k experts."""
    return sum(sum(p.numel() for p in m.experts.parameters()) * (m.num_experts - m.config.top_k) // m.num_experts
               for m in modules if isinstance(m, MoEMLP))


def moe_aux_loss(modules: Iterable[nn.Module]) -> torch.Tensor | None:
    """Mean over the MoE layers among `modules` of weight * their last load-balancing loss (None: no layer).

    The mean, not the sum, so a weight means the same whatever number of layers are MoE.
    """
    losses = [m.config.aux_loss_weight * m.aux_loss for m in modules if isinstance(m, MoEMLP) and m.aux_loss is not None]
    return torch.stack(losses).mean() if losses else None
