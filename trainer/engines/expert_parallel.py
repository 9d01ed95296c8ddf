"""Expert parallelism under the DeepSpeed engine (`engine.expert_parallel_size` = P > 1).

Each MoE layer's E experts are split over P ranks (an expert-parallel group; tokens travel
all-to-all inside it, `modeling/layers/moe_dispatch.py`); with W ranks there are W / P such groups, and the
ranks that hold the same experts form an expert-data-parallel group that averages their gradients.
Every rank builds the whole model from the same seed, then keeps its 1/P of the experts, so the
weights are those of the single-device model.

DeepSpeed does the gradient reduction, ZeRO-1/2 partitioning and optimizer state of the experts
itself once it knows which parameters are experts: the DeepSpeed MoE conventions are followed
(process groups `ep_size_P` from `deepspeed.utils.groups`, expert parameters marked `allreduce=False`
+ `group_name`, optimizer groups split by `split_params_into_different_moe_groups_for_optimizer`).
DeepSpeed only switches that on for a model holding a `deepspeed.moe.layer.MoE`, which ours (plain
torch) does not: a parameterless stand-in is attached while `deepspeed.initialize` runs.
DeepSpeed's own per-expert files need its module names (`deepspeed_moe.experts.deepspeed_experts.N`),
so the experts are checkpointed here, next to DeepSpeed's shards:

    <checkpoint>/deepspeed/           DeepSpeed's files: model states WITHOUT expert weights; optimizer
                                      state per expert-parallel rank (expp_rank_*, ZeRO-0) or per rank
                                      (zero_pp_rank_*, ZeRO-1/2), experts' Adam moments included
    <checkpoint>/experts/index.json   P, W, and per MoE layer: number of experts, per-expert tensor shapes
    <checkpoint>/experts/<layer>.expert-<e>.safetensors
                                      expert e of that layer (global index), whole tensors, written once
                                      by the rank holding it (expert-data-parallel rank 0)

Resume checks that the index covers every MoE layer of the model with the right experts and
shapes and that every expert file is there, then each rank loads its own experts. The experts'
optimizer state is cut for P and W: a run with another expert-parallel size P' (1 included) or
world size re-partitions the experts, their fp32 master weights and Adam moments from DeepSpeed's
per-rank optimizer files (`expert_reshard.py`, ZeRO-1/2; a ZeRO-0 checkpoint resumes with its own P
and W only). `tokfleet export` builds the single-device model from DeepSpeed's model states and the
expert files (`consolidated_state`).

Also DeepSpeed's: the gradient norm that is clipped and logged is computed its way for MoE models
(under ZeRO-0, the mean over ranks of each rank's norm over the parameters it holds), not as the
norm of the whole model's gradient.
The expert files hold the parameters as trained (bf16 under engine.precision bf16: an export then
has bf16-rounded experts; fp32 master copies live in the optimizer state only).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import UserError, missing_optional_module
from modeling.layers.moe import MoEMLP
from modeling.layers.moe_dispatch import shard_experts
from trainer import distributed

EXPERTS_DIR = "experts"
INDEX_FILE = "index.json"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's, under <checkpoint>/<tag>/, for ZeRO 0-2


def expert_file(layer: str, expert: int) -> str:
    return f"{layer}.expert-{expert:04d}.safetensors"


def moe_layers(model: nn.Module) -> dict[str, MoEMLP]:
    """Qualified name -> MoE layer, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoEMLP)}


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per MoE layer: its number of experts and the shape of one expert's tensors (the index format)."""
    return {name: {"num_experts": layer.num_experts,
                   "params": {p: list(t.shape[1:]) for p, t in layer.experts.named_parameters()}}
            for name, layer in moe_layers(model).items()}


def setup_expert_parallel(model: nn.Module, ep_size: int, world_size: int, zero_stage: int) -> "ExpertParallel | None":
    """Shard the model's experts over groups of `ep_size` ranks (None: ep_size 1, nothing to do). Collective."""
    if ep_size == 1:
        return None
    layers = moe_layers(model)
    if not layers:
        raise UserError(f"engine.expert_parallel_size={ep_size} needs a model with MoE layers (e.g. model.args.moe_num_experts)")
    if world_size % ep_size != 0:
        raise UserError(f"engine.expert_parallel_size={ep_size} must divide the number of ranks ({world_size})")
    for name, layer in layers.items():
        if layer.num_experts % ep_size != 0:
            raise UserError(f"engine.expert_parallel_size={ep_size} must divide the {layer.num_experts} experts of {name}")
    if zero_stage == 3:
        raise UserError("engine.expert_parallel_size > 1 needs ZeRO stage 0, 1 or 2: DeepSpeed does not support MoE experts under ZeRO-3")
    return ExpertParallel(model, ep_size)


class ExpertParallel:
    def __init__(self, model: nn.Module, ep_size: int):
        import deepspeed
        from deepspeed.utils import groups

        self.model, self.ep_size = model, ep_size
        self.group_name = f"ep_size_{ep_size}"  # DeepSpeed's name for these groups (deepspeed.moe.layer.MoE)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)  # wraps our group
        if self.group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(ep_size)
        self.group = groups._get_expert_parallel_group(self.group_name)
        self.is_writer = groups._get_expert_data_parallel_rank(self.group_name) == 0
        self.specs = layer_specs(model)  # before sharding: whole layers
        shard_experts(model, self.group)
        self.layers = moe_layers(model)
        for layer in self.layers.values():
            for param in layer.experts.parameters():
                param.allreduce, param.group_name = False, self.group_name  # DeepSpeed's mark of an expert parameter

    def expert_keys(self) -> dict[str, tuple[MoEMLP, str]]:
        """State-dict key -> (layer, parameter name) of every expert tensor."""
        return {f"{name}.experts.{param}": (layer, param)
                for name, layer in self.layers.items() for param, _ in layer.experts.named_parameters()}

    def param_groups(self, groups: list[dict]) -> list[dict]:
        """The optimizer groups with the experts moved to groups of their own (reduced over expert-data-parallel ranks)."""
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        named = [{"name": group.get("name", f"dense_{index}"), **group} for index, group in enumerate(groups)]
        return split_params_into_different_moe_groups_for_optimizer(named)

    @contextlib.contextmanager
    def recognized_by_deepspeed(self):
        """While `deepspeed.initialize` runs: a parameterless `deepspeed.moe.layer.MoE` in the model, so
        that DeepSpeed sets up its MoE gradient reduction, ZeRO partitioning and checkpoint layout."""
        from deepspeed.moe.layer import MoE

        class ExpertParallelMarker(MoE):
            def __init__(self, num_experts: int, ep_size: int, group_name: str):
                nn.Module.__init__(self)  # none of MoE's gate and experts: ours are elsewhere in the model
                self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name
                self.num_local_experts = 0  # DeepSpeed's expert files would be written for these: none

            def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
                pass  # the groups exist already (ExpertParallel.__init__)

        num_experts = max(layer.num_experts for layer in self.layers.values())
        self.model.add_module("_deepspeed_moe_marker", ExpertParallelMarker(num_experts, self.ep_size, self.group_name))
        try:
            yield
        finally:
            delattr(self.model, "_deepspeed_moe_marker")

    # -------------------------------------------------------------- checkpoint

    @contextlib.contextmanager
    def saving(self, directory: Path):
        """Around DeepSpeed's save_checkpoint: its model states leave the experts out; then each
        expert goes to its own file, once."""
        keys = self.expert_keys()

        def drop_experts(module, state_dict, prefix, local_metadata):
            for key in keys:
                state_dict.pop(prefix + key, None)

        handle = self.model.register_state_dict_post_hook(drop_experts)
        try:
            yield
        finally:
            handle.remove()
        folder = Path(directory) / EXPERTS_DIR
        folder.mkdir(exist_ok=True)
        if self.is_writer:
            for name, layer in self.layers.items():
                first = layer.experts.first_expert
                params = dict(layer.experts.named_parameters())
                for local in range(layer.experts.num_experts):
                    tensors = {p: t.detach()[local].cpu().contiguous() for p, t in params.items()}
                    save_file(tensors, folder / expert_file(name, first + local))
        if distributed.rank() == 0:
            index = {"format_version": 1, "expert_parallel_size": self.ep_size, "world_size": distributed.world_size(),
                     "layers": self.specs}
            (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))

    def local_experts(self, directory: Path) -> dict[str, torch.Tensor]:
        """Collective: this rank's experts from a checked checkpoint, stacked as the model holds them."""
        error, state = None, {}
        try:
            for name, layer in self.layers.items():
                first = layer.experts.first_expert
                files = [_read_expert(directory, name, first + local, self.specs[name])
                         for local in range(layer.experts.num_experts)]
                for param, _ in layer.experts.named_parameters():
                    state[f"{name}.experts.{param}"] = torch.stack([tensors[param] for tensors in files])
        except UserError as raised:
            error = str(raised)
        errors = [e for e in distributed.all_gather_object(error) if e]  # every rank stops, or none does
        if errors:
            raise UserError(errors[0])
        return state

    def module_loader(self, experts: dict[str, torch.Tensor]):
        """A DeepSpeed `custom_load_fn`: its model states plus this rank's experts, loaded strictly."""

        def load(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
            dst.load_state_dict({**src, **experts}, strict=True)

        return load

    def full_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Collective: `state` (this rank's parameters) with every expert tensor gathered whole."""
        for key, (layer, param) in self.expert_keys().items():
            local = getattr(layer.experts, param).detach().float().cpu().contiguous()
            pieces = [torch.empty_like(local) for _ in range(self.ep_size)]
            dist.all_gather(pieces, local, group=self.group)
            state[key] = torch.cat(pieces)
        return state


def read_index(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / EXPERTS_DIR / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"checkpoint file {path} is unreadable or corrupt: {error}") from None


def check_resume(directory: Path, model: nn.Module, experts: ExpertParallel | None, saved_world_size: int,
                 world_size: int) -> int | None:
    """Refuse a checkpoint whose experts do not cover the model's MoE layers (every rank reaches the same
    verdict). Returns the expert-parallel size that wrote it when its experts must be re-partitioned for
    this run (another expert-parallel size or world size, `expert_reshard.py`), else None."""
    index = read_index(directory)
    if index is not None:
        check_experts(directory, index, experts.specs if experts is not None else layer_specs(model))
    if index is None and experts is None:
        return None  # no experts split on either side: DeepSpeed's own layout (and resharding)
    saved_ep_size = index["expert_parallel_size"] if index is not None else 1
    ep_size = experts.ep_size if experts is not None else 1
    return saved_ep_size if (saved_ep_size, saved_world_size) != (ep_size, world_size) else None


def expert_tensors(model: nn.Module, experts: ExpertParallel | None) -> dict[str, int]:
    """State-dict key of every expert tensor -> the number of experts it stacks (whole layers)."""
    specs = experts.specs if experts is not None else layer_specs(model)
    return {f"{name}.experts.{param}": spec["num_experts"] for name, spec in specs.items() for param in spec["params"]}


def check_experts(directory: Path, index: dict[str, Any], specs: dict[str, dict[str, Any]]) -> None:
    """The index describes exactly the model's MoE layers (`layer_specs`) and every expert file is there."""
    saved = index.get("layers", {})
    for name, spec in specs.items():
        if name not in saved:
            raise UserError(f"checkpoint {directory} has no experts for MoE layer {name} (its layers: {', '.join(saved) or 'none'})")
        if saved[name] != spec:
            raise UserError(f"checkpoint {directory}: the experts of {name} do not match the model: "
                            f"{saved[name]['num_experts']} experts of {saved[name]['params']} saved, "
                            f"the model has {spec['num_experts']} of {spec['params']}")
    unexpected = sorted(set(saved) - set(specs))
    if unexpected:
        raise UserError(f"checkpoint {directory} holds experts of {unexpected[0]}, which is no MoE layer of this model")
    for name, spec in specs.items():
        for expert in range(spec["num_experts"]):
            path = Path(directory) / EXPERTS_DIR / expert_file(name, expert)
            if not path.is_file():
                raise UserError(f"checkpoint {directory}: expert {expert} of {name} is missing ({EXPERTS_DIR}/{path.name})")


def _read_expert(directory: Path, layer: str, expert: int, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = Path(directory) / EXPERTS_DIR / expert_file(layer, expert)
    try:
        tensors = load_file(path)
    except Exception as error:  # torn or foreign file
        raise UserError(f"checkpoint file {path} is unreadable or corrupt: {str(error).splitlines()[0]}") from None
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    if shapes != spec["params"]:
        raise UserError(f"checkpoint file {path} holds {shapes}, expected {spec['params']}")
    return tensors


def consolidated_state(directory: Path, tag: str) -> dict[str, torch.Tensor] | None:
    """The single-device model's fp32 tensors from an expert-parallel checkpoint (None: not one).
    One process, no process group: DeepSpeed's model states hold the rest of the model whole."""
    index = read_index(directory)
    if index is None:
        return None
    check_experts(directory, index, index["layers"])
    path = Path(directory) / tag / MODEL_STATES_FILE
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    except Exception as error:
        if missing_optional_module(error):  # DeepSpeed's states unpickle deepspeed objects
            raise
        raise UserError(f"checkpoint file {path} is unreadable or corrupt: {str(error).splitlines()[0]}") from None
    state = {name: tensor.float() for name, tensor in module.items()}
    for name, spec in index["layers"].items():
        experts = [_read_expert(directory, name, expert, spec) for expert in range(spec["num_experts"])]
        for param in spec["params"]:
            state[f"{name}.experts.{param}"] = torch.stack([tensors[param] for tensors in experts]).float()
    return state
