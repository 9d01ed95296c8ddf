"""Expert parallelism for `modeling.layers.moe.MoEMLP`: each of P ranks holds 1/P of every MoE layer's
experts, and tokens travel to their experts and back with two all-to-alls per layer.

The one module of modeling/ that uses torch.distributed. It creates no process group: the engine
passes the expert-parallel group in (under DeepSpeed, DeepSpeed's own `ep_size_P` group).

    from modeling.layers.moe_dispatch import shard_experts
    layers = shard_experts(model, group)   # after init, before the optimizer sees the parameters

Rank p of the group keeps experts p * L .. p * L + L - 1 (L = E / P) of every layer. Routing,
capacity and the combine stay in `MoEMLP.forward` on each rank's own tokens; only the expert-sorted
tokens move, so a rank's outputs equal one device's `MoEMLP` with the same weights on the same tokens.
The backward of an all-to-all is the all-to-all the other way: an expert's gradient sums the
contributions of every rank's tokens, as one device's would over all of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from modeling.layers.moe import GroupedExperts, MoEMLP


class _AllToAll(torch.autograd.Function):
    """Rows of x, in_splits[p] of them for rank p, -> out_splits[p] rows from each rank p (differentiable)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return _AllToAll.apply(grad_out, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatcher:
    """A `MoEMLP.dispatcher`: sends the tokens of expert e to the rank holding it, runs the local
    experts on what arrives, and sends the results back in the order the tokens left."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        self.num_local_experts = num_experts // self.num_ranks

    def __call__(self, x_MD: torch.Tensor, counts_E: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
        P, L = self.num_ranks, self.num_local_experts
        send_PL = counts_E.view(P, L).contiguous()  # tokens of mine for rank p's local expert l
        recv_PL = torch.empty_like(send_PL)  # tokens of rank p's for my local expert l
        dist.all_to_all_single(recv_PL, send_PL, group=self.group)
        send_splits, recv_splits = send_PL.sum(dim=1).tolist(), recv_PL.sum(dim=1).tolist()

        x_recv = all_to_all(x_MD, recv_splits, send_splits, self.group)  # rows grouped by (source rank, local expert)
        local_expert = torch.repeat_interleave(torch.arange(L, device=recv_PL.device).repeat(P), recv_PL.flatten())
        by_expert = torch.argsort(local_expert, stable=True)
        y_by_expert = experts(x_recv[by_expert], recv_PL.sum(dim=0).tolist())
        y_recv = torch.empty_like(y_by_expert).index_copy(0, by_expert, y_by_expert)
        return all_to_all(y_recv, send_splits, recv_splits, self.group)


def shard_experts(model: nn.Module, group) -> list[MoEMLP]:
    """Keep this rank's 1/P of the experts of every MoEMLP in `model` and route through `group`.

    Every rank must call it on the same model (same weights). Returns the MoE layers. Raises
    ValueError if a layer's experts do not split evenly over the group.
    """
    num_ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = [module for module in model.modules() if isinstance(module, MoEMLP)]
    for layer in layers:
        if layer.num_experts % num_ranks != 0:
            raise ValueError(f"{layer.num_experts} experts do not split evenly over {num_ranks} expert-parallel ranks")
        assert layer.experts.num_experts == layer.num_experts, "experts are already sharded"
        num_local = layer.num_experts // num_ranks
        layer.experts.keep_experts(rank * num_local, num_local)
        layer.dispatcher = AllToAllDispatcher(group, layer.num_experts)
    return layers
