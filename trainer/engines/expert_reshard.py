"""Re-partitioning an MoE checkpoint for another expert-parallel size or world size.

A checkpoint written with `engine.expert_parallel_size` P on W ranks holds, under ZeRO-1/2, one
`zero_pp_rank_<r>_*optim_states.pt` per rank: the fp32 master weights and Adam moments of that rank's
ZeRO partition of every optimizer group. The dense groups are partitioned over all W ranks; an expert
group (`moe: True`, `expert_parallel.py`) holds on expert-parallel rank p the experts p*L .. p*L+L-1
(L = E / P), partitioned over that rank's expert-data-parallel group, ranks p, p+P, p+2P, ... in that
order (DeepSpeed's layout, `deepspeed.utils.groups._create_expert_and_data_parallel`).

DeepSpeed's converter to its universal format (`ds_to_universal`) cannot read that: it knows MoE
experts only as its own modules (deepspeedai/DeepSpeed#5716; 0.19 adds its AutoEP layers), and would
join the experts of different expert-parallel ranks, which share a name, as ZeRO fragments of one
tensor. Its universal *load* does handle stacked experts, though: a parameter whose universal files
say `is_expert_param` is cut along dim 0 for the loading rank's expert-parallel rank, then into the
new ZeRO partitions (`deepspeed/checkpoint/universal_checkpoint.py`, ZeRO-1/2). So this module writes
the universal layout itself, every parameter whole, experts stacked in their global order:

    <checkpoint>/deepspeed_universal_ep<P'>/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt
    <checkpoint>/deepspeed_universal_ep<P'>/zero/optimizer_state.pt     global state, P' runs' groups
    <checkpoint>/deepspeed_universal_ep<P'>/mp_rank_00_model_states.pt  step counters, LR schedule

and DeepSpeed loads it at any expert-parallel size and world size. The folder depends on the loading
run only through its optimizer groups, which are the same for every run with expert-parallel size
P', hence the suffix. ZeRO-0 keeps the experts' optimizer state in torch's own layout, per
expert-parallel rank, which DeepSpeed's universal load does not take: refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError
from trainer.engines.expert_parallel import MODEL_STATES_FILE

STATES = ("fp32", "exp_avg", "exp_avg_sq")  # DeepSpeed's names: fp32 master weights, Adam's two moments


def universal_name(tag: str, ep_size: int) -> str:
    return f"{tag}_universal_ep{ep_size}"


def _optimizer_states(source: Path, rank: int) -> dict[str, Any]:
    """Rank `rank`'s ZeRO-1/2 optimizer partition (memory-mapped: only the fragments read are paged in)."""
    matches = sorted(source.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    if not matches:
        stage0 = any(source.glob("expp_rank_*_optim_states.pt")) or not any(source.glob("*zero_pp_rank_*"))
        if stage0:
            raise UserError(f"checkpoint {source.parent} was written under ZeRO stage 0, whose experts' optimizer "
                            "state DeepSpeed cannot re-partition: resume it with the expert_parallel_size and number "
                            "of ranks that wrote it, or write checkpoints under ZeRO stage 1 or 2")
        raise UserError(f"checkpoint {source.parent}: the optimizer partition of rank {rank} is missing from {source}")
    try:
        return torch.load(matches[0], map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
    except Exception as error:
        raise UserError(f"checkpoint file {matches[0]} is unreadable or corrupt: {str(error).splitlines()[0]}") from None


def _whole(ranks: list[dict], owners: list[int], group: int, name: str, key: str) -> torch.Tensor:
    """Parameter `name` of optimizer group `group` (flat), joined from the fragments of the ranks `owners`
    that partition the group, in partition order."""
    pieces = []
    for rank in owners:
        address = ranks[rank]["param_slice_mappings"][group].get(name)
        if address is None:  # this rank's partition holds none of it
            continue
        flat = (ranks[rank]["single_partition_of_fp32_groups"][group] if key == "fp32"
                else ranks[rank]["base_optimizer_state"]["state"][group][key])
        pieces.append(flat.narrow(0, address.start, address.numel))
    return torch.cat(pieces)


def _partitions(ranks: list[dict], group: int, ep_size: int, world_size: int) -> list[list[int]]:
    """The ranks partitioning `group`: all ranks in one partition group for a dense group; for an expert
    group, one partition group per expert-parallel rank p (ranks p, p + P, ...), in expert order."""
    if not ranks[0]["base_optimizer_state"]["param_groups"][group].get("moe", False):
        return [list(range(world_size))]
    return [list(range(p, world_size, ep_size)) for p in range(ep_size)]


def _write_group(zero: Path, ranks: list[dict], group: int, shapes: dict[str, tuple], experts: dict[str, int],
                 ep_size: int, world_size: int) -> None:
    """Optimizer group `group`'s parameters whole, one folder each under `zero`, as DeepSpeed's universal
    load reads them: {fp32, exp_avg, exp_avg_sq}.pt holding {"param": tensor, ...} and step.pt."""
    step = ranks[0]["base_optimizer_state"]["state"][group]["step"]
    partitions = _partitions(ranks, group, ep_size, world_size)
    for param, shape in shapes.items():
        folder = zero / param
        folder.mkdir()
        for key in STATES:
            whole = torch.cat([_whole(ranks, owners, group, param, key).view(shape) for owners in partitions])
            entry = {"param": whole.clone()}
            if param in experts:  # DeepSpeed's universal load cuts it along dim 0 for the loading rank's experts
                if whole.shape[0] != experts[param]:
                    raise ValueError(f"{param} stacks {whole.shape[0]} experts, the model {experts[param]}")
                entry.update({"is_expert_param": True, "ep_num_experts": experts[param]})
            torch.save(entry, folder / f"{key}.pt")
        torch.save(step, folder / "step.pt")


def convert(directory: Path, tag: str, experts: dict[str, int], ep_size: int, world_size: int,
            target_ep_size: int, target_groups: list[dict[str, Any]]) -> str:
    """Write the universal form of `directory/<tag>/` for runs of expert-parallel size `target_ep_size`
    (if not there yet); returns its tag. `experts`: the name of every expert tensor -> its number of
    experts; `ep_size`, `world_size`: the layout that wrote the checkpoint; `target_groups`: the loading
    run's optimizer groups (hyperparameters only)."""
    name = universal_name(tag, target_ep_size)
    universal = directory / name
    if universal.is_dir():
        return name
    source = directory / tag
    try:
        model_states = torch.load(source / MODEL_STATES_FILE, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        raise UserError(f"checkpoint file {source / MODEL_STATES_FILE} is unreadable or corrupt: "
                        f"{str(error).splitlines()[0]}") from None
    ranks = [_optimizer_states(source, rank) for rank in range(world_size)]
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "zero").mkdir(parents=True)
    try:
        for group, shapes in enumerate(model_states["param_shapes"]):
            _write_group(tmp / "zero", ranks, group, shapes, experts, ep_size, world_size)
    except (KeyError, IndexError, RuntimeError, ValueError) as error:  # fragments that do not join into the parameters
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"checkpoint {directory}: its optimizer partitions do not make whole parameters for "
                        f"{world_size} rank(s) with expert_parallel_size {ep_size}: {str(error).splitlines()[0]}") from None
    saved_groups = ranks[0]["base_optimizer_state"]["param_groups"]
    names = [group.get("name") for group in saved_groups]
    like = [names.index(group.get("name")) if group.get("name") in names else 0 for group in target_groups]
    torch.save(_global_state(ranks[0], target_groups, like), tmp / "zero" / "optimizer_state.pt")
    torch.save(_for_groups(model_states, like), tmp / MODEL_STATES_FILE)
    tmp.rename(universal)
    return name


def _global_state(rank0: dict[str, Any], target_groups: list[dict[str, Any]], like: list[int]) -> dict[str, Any]:
    """What DeepSpeed's universal load reads besides the parameters: the optimizer's global state and
    one entry per optimizer group *of the loading run* (it loads the groups it finds there, pairwise),
    with the learning rate of the saved group `like[i]` (the run's own hyperparameters are put back
    after the load: `DeepSpeedEngine._repair_universal_load`)."""
    sharded = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")
    saved = rank0["base_optimizer_state"]["param_groups"]
    groups = [{**group, "lr": saved[j]["lr"], "initial_lr": saved[j].get("initial_lr", saved[j]["lr"])}
              for group, j in zip(target_groups, like)]
    return {**{k: v for k, v in rank0.items() if k not in sharded}, "param_groups": groups}


def _for_groups(model_states: dict[str, Any], like: list[int]) -> dict[str, Any]:
    """DeepSpeed's model states (step counters, LR schedule) with the schedule's per-group lists
    (`base_lrs`, `_last_lr`, ...) for the loading run's optimizer groups: group i as saved group `like[i]`.
    The module's tensors stay out: a universal load takes the parameters from `zero/`."""
    states = {k: v for k, v in model_states.items() if k != "module"}
    states["module"] = {}
    schedule = dict(states.get("lr_scheduler") or {})
    saved_count = len(schedule.get("base_lrs", []))
    for key, value in schedule.items():
        if isinstance(value, list) and len(value) == saved_count:
            schedule[key] = [value[j] for j in like]
    states["lr_scheduler"] = schedule
    return states
