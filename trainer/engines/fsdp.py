"""FSDP through Accelerate: FSDP2 full sharding, checkpoints in torch.distributed.checkpoint (DCP).

Every rank holds 1/W of each parameter, gradient and optimizer state. In bf16 / fp16 the blocks compute
with parameters in that precision and gradients are reduced in fp32, and the model's output (its
loss) keeps the dtype it was computed in, as torchtitan does (Accelerate's default policy reduces in
bf16 and casts the loss to bf16: on an H200 the logged loss came out in steps of 1/16). Checkpoints are DCP
folders (`<checkpoint>/dcp/`, one file per rank plus metadata) holding the model and AdamW
states; DCP reshards on load, so a checkpoint of W ranks resumes on any W'. The LR schedule's
state is small and identical on every rank: rank 0 writes it next to them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from core.config import EngineConfig, OptimConfig
from core.errors import UserError
from trainer import distributed
from trainer.async_checkpoint import Writer
from trainer.engines.accelerate import MIXED_PRECISION, AccelerateEngine, process_group_kwargs
from trainer.optim import build_optimizer, build_scheduler

DCP_DIR = "dcp"
SCHEDULE_FILE = "schedule.pt"


def _block_classes(model: nn.Module) -> list[str]:
    """The classes to shard one by one: the model's `_no_split_modules` (HF convention), else its largest repeated child."""
    names = getattr(model, "_no_split_modules", None)
    if names:
        return list(names)
    counts: dict[str, int] = {}
    for module in model.modules():
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    repeated = [name for name, count in counts.items() if count > 1 and name not in ("Linear", "Embedding", "ModuleList")]
    return repeated[:1]


class AccelerateFSDPEngine(AccelerateEngine):
    format = "dcp"

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, engine_cfg: EngineConfig,
                 max_steps: int, device: torch.device):
        from accelerate import Accelerator
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from torch.distributed.tensor import DTensor

        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine_cfg.precision)
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=_block_classes(model), state_dict_type="SHARDED_STATE_DICT",
            cpu_ram_efficient_loading=False, sync_module_states=False,
            mixed_precision_policy=None if compute_dtype is None else
            MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32),
        )
        self.accelerator = Accelerator(fsdp_plugin=plugin, kwargs_handlers=process_group_kwargs(device),
                                       mixed_precision=MIXED_PRECISION[engine_cfg.precision], step_scheduler_with_optimizer=False)
        if device.type == "cpu" and self.accelerator.distributed_type != DistributedType.FSDP:
            # Accelerate only picks FSDP for GPU-like devices; on CPU the gloo group shards just as well
            self.accelerator.state.fsdp_plugin = plugin
            self.accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self._setup(optim_cfg, engine_cfg, device)
        optimizer = build_optimizer(model.to(device), optim_cfg)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)  # FSDP2: both in one call
        self.train_model = self.model  # FSDP2 shards the module in place
        if not all(isinstance(p, DTensor) for p in self.model.parameters()):
            raise RuntimeError("accelerate did not shard the model with FSDP: refusing to train unsharded")
        self.scheduler = build_scheduler(self.optimizer.optimizer, optim_cfg, max_steps)

    def describe(self) -> dict:
        return {"strategy": "fsdp", "fsdp_version": 2, "precision": self.precision}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: whole fp32 tensors on every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return {name: tensor.detach().float().cpu().clone() for name, tensor in state.items()}

    # -------------------------------------------------------------- checkpoint

    def save_checkpoint(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / DCP_DIR))
        if self.rank == 0:
            torch.save(self.scheduler.state_dict(), directory / SCHEDULE_FILE)

    def snapshot_checkpoint(self, directory: Path) -> Writer:
        """Collective: DCP's async_save stages the shards to host memory and writes them from its own thread,
        coordinating the ranks on the background group (never the training loop's); the returned writer
        waits for that write."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer.optimizer)
        written = dcp.async_save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / DCP_DIR),
                                 process_group=distributed.background_group())
        if self.rank == 0:
            torch.save(self.scheduler.state_dict(), directory / SCHEDULE_FILE)
        return written.result

    def load_checkpoint(self, directory: Path, saved_world_size: int) -> None:
        """Collective; DCP reshards a checkpoint of any world size onto this one."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer.optimizer)  # the target layout
        try:
            dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / DCP_DIR))
            schedule = torch.load(directory / SCHEDULE_FILE, weights_only=True)
        except Exception as error:
            raise UserError(f"checkpoint {directory}: its FSDP (DCP) shards are unreadable: {str(error).splitlines()[0]}") from None
        set_state_dict(self.model, self.optimizer.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        self.scheduler.load_state_dict(schedule)
        dist.barrier()


def load_dcp_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """Whole model tensors from a DCP checkpoint, in one process without a process group (for export)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "whole.pt"
        try:
            dcp_to_torch_save(str(Path(directory) / DCP_DIR), str(target))
            return dict(torch.load(target, weights_only=True)["model"])
        except Exception as error:
            raise UserError(f"checkpoint {directory}: its FSDP (DCP) shards are unreadable: {str(error).splitlines()[0]}") from None
