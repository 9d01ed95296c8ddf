"""DeepSpeed engine: ZeRO stages 0-3, optimizer/parameter offload, bf16/fp16, on CUDA or CPU.

The DeepSpeed config is assembled from the run config (batch sizes, accumulation, clipping,
AdamW, precision, ZeRO stage and offload) on top of an optional DeepSpeed JSON
(`engine.deepspeed_config`, e.g. configs/deepspeed/zero3.json) for everything else; the run
config's values win. The LR schedule is tokfleet's (warmup + cosine), handed to DeepSpeed,
which steps it once per optimizer step.

Checkpoints are DeepSpeed's own: under `<checkpoint>/deepspeed/`, the module states of rank 0
and one `zero_pp_rank_<r>_*optim_states.pt` per rank (ZeRO partitions stay partitioned). A
checkpoint written by W ranks resumes on W' != W ranks through DeepSpeed's universal checkpoint
format (`reshard.py`), converted once next to the checkpoint. An MoE checkpoint whose experts are
split otherwise than this run's (another `engine.expert_parallel_size` or world size) is converted by
`expert_reshard.py`, which knows the experts' layout.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import EngineConfig, OptimConfig
from core.errors import UserError
from trainer.async_checkpoint import Writer, to_host
from trainer.engines import expert_parallel
from trainer.optim import adamw_implementation, build_scheduler, optimizer_name, param_groups

TAG = "deepspeed"  # the folder DeepSpeed writes its shards to inside our checkpoint folder
log = logging.getLogger("tokfleet.deepspeed")


def _base_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path) as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"engine.deepspeed_config: no such file: {path}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"engine.deepspeed_config {path}: not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"engine.deepspeed_config {path}: expected a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UserError(f"engine.deepspeed_config {path}: remove {key!r}; tokfleet sets the optimizer and LR "
                            "schedule from the run config's optim section")
    return config


def zero_stage(engine_cfg: EngineConfig) -> int:
    if engine_cfg.zero_stage is not None:
        return engine_cfg.zero_stage
    return int(_base_config(engine_cfg.deepspeed_config).get("zero_optimization", {}).get("stage", 0))


def deepspeed_config(engine_cfg: EngineConfig, optim_cfg: OptimConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: JSON file (if any) overlaid with the run config."""
    config = copy.deepcopy(_base_config(engine_cfg.deepspeed_config))
    config.update({
        "train_micro_batch_size_per_gpu": optim_cfg.micro_batch_size,
        "gradient_accumulation_steps": optim_cfg.grad_accum_steps,
        "train_batch_size": optim_cfg.micro_batch_size * optim_cfg.grad_accum_steps * world_size,
        "gradient_clipping": optim_cfg.grad_clip,
    })
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = zero_stage(engine_cfg)
    if zero["stage"] > 0:
        # DeepSpeed's default buckets (5e8 elements: 2 GB in fp32) stay resident and ate most of what
        # ZeRO-3 saves at this scale (tests/bench); 2e7 elements (80 MB fp32) still batch the collectives
        zero.setdefault("reduce_bucket_size", 20_000_000)
        if zero["stage"] < 3:
            zero.setdefault("allgather_bucket_size", 20_000_000)
    if zero["stage"] == 3 and device.type == "cpu":
        # DeepSpeed keeps up to 1e9 gathered parameters live and does not release those it will reuse
        # within 1e9 elements, which with gradient checkpointing means every layer gathered at once: whole
        # unpartitioned layers in host RAM that the ranks of a node share. 5e7 (200 MB fp32) lowered the peak
        # of tokcom_diffusion at 8 layers from 4.8 to 3.8 GB per rank (tests/bench/test_models_bench.py)
        zero.setdefault("stage3_max_live_parameters", 50_000_000)
        zero.setdefault("stage3_max_reuse_distance", 50_000_000)
        zero.setdefault("stage3_prefetch_bucket_size", 20_000_000)
    if engine_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if engine_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    config["optimizer"] = {"type": "AdamW", "params": {
        "lr": optim_cfg.lr, "betas": [optim_cfg.beta1, optim_cfg.beta2], "eps": optim_cfg.eps,
        "weight_decay": optim_cfg.weight_decay, **adam_implementation(zero, device),
    }}
    if zero.get("offload_param") and zero["stage"] != 3:
        raise UserError(f"parameter offload needs ZeRO stage 3, this run uses stage {zero['stage']}")
    if engine_cfg.precision == "fp16" and device.type != "cuda":
        raise UserError(f"engine.precision fp16 needs a CUDA device under DeepSpeed (this run is on {device.type}); use bf16 or fp32")
    config.pop("bf16", None), config.pop("fp16", None)
    if engine_cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif engine_cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def adam_implementation(zero: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The optimizer params choosing DeepSpeed's AdamW: its CPU Adam (DeepSpeedCPUAdam, vectorised C++)
    when ZeRO offloads the optimizer states to the host and the op builds, else torch's AdamW (fused
    where torch has the kernel, see trainer/optim.py). DeepSpeed's GPU FusedAdam is not used: it needs
    a CUDA op build, and torch's fused AdamW does the same in one kernel."""
    if zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme"):
        problem = cpu_adam_problem()
        if problem is None:
            return {"torch_adam": False}
        log.warning("DeepSpeedCPUAdam does not build here (%s): the offloaded optimizer runs torch's AdamW", problem)
    return {"torch_adam": True, **adamw_implementation(device)}


@functools.cache
def cpu_adam_problem() -> str | None:
    """Why DeepSpeed's CPU Adam op cannot be loaded here, in one line (None: it loads). The first load
    on a machine JIT-compiles it with g++ (~2.5 min on 2 cores), later ones reuse
    ~/.cache/torch_extensions."""
    try:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("CPUAdamBuilder")
        if builder is None:
            return f"DeepSpeed's {get_accelerator().device_name()} accelerator has no CPUAdamBuilder"
        if not builder.is_compatible(verbose=False):
            return "CPUAdamBuilder is not compatible with this machine"
        builder.load(verbose=False)
    except Exception as error:  # a missing compiler, a failed compile, a missing header: all mean "fall back"
        return _build_failure(error)
    return None


def _build_failure(error: Exception) -> str:
    """One line out of a failed op build: the error's first line without ninja's command, and the
    compiler's or shell's complaint ("fatal error: ...", "g++: not found")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    first = lines[0].split(": [", 1)[0]  # "Error building extension 'cpu_adam'", before ninja's "[1/3] g++ ..."
    cause = next((line for line in lines[1:] if "error" in line.lower() or "not found" in line), None)
    return f"{first}: {cause}" if cause else first


class _MappedModelStates:
    """DeepSpeed's checkpoint engine for one load, with the model-states file memory-mapped.

    DeepSpeed 0.19 reads `mp_rank_00_model_states.pt` whole twice per load (SDLoaderBase.check_ckpt_list
    only wants its `mp_world_size`, then the load proper) before copying it into the module: 1.8x the
    time of a plain torch.load of the same bytes (tests/bench). Mapped, the two reads cost the pickle
    only, and the copy into the module reads the page cache once. Optimizer partitions are read whole:
    their tensors become the optimizer's state, which must not stay backed by a checkpoint file."""

    def __init__(self, engine):
        self.engine = engine

    def load(self, path: str, map_location=None):
        if str(path).endswith("_model_states.pt"):
            return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        return self.engine.load(path, map_location=map_location)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


@contextlib.contextmanager
def _mapped_model_states(ds):
    ds.checkpoint_engine, original = _MappedModelStates(ds.checkpoint_engine), ds.checkpoint_engine
    try:
        yield
    finally:
        ds.checkpoint_engine = original


def _unlink_shm_workspace(rank: int) -> None:
    """Collective. DeepSpeed's CPU shared-memory allreduce (ops/csrc/cpu/comm/shm.cpp) gives every rank a
    69 MB /dev/shm object named after MASTER_ADDR/MASTER_PORT and never removes it: each CPU run left
    69 MB x ranks of RAM behind. Once deepspeed.initialize has returned on every rank, every rank has
    mapped every peer's object, so the names can go; the mappings live on until the processes exit."""
    from trainer import distributed

    distributed.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def _share_master_weights(optimizer) -> None:
    """ZeRO-3 without mixed precision: let the optimizer update the parameter partitions in place.

    When the partitions already have the master weights' dtype and device, DeepSpeed 0.19 means to use
    them as the master weights (stage3.py, _create_fp32_partitions: "we don't need another copy"), but
    it compares a tensor's torch.device with the accelerator's device *name*, a str, which is never
    equal, so every fp32 run holds a second copy: 4/W bytes per parameter, a fifth of ZeRO-3's
    bookkeeping (tests/bench). Done before the first step, while no optimizer state refers to the copies."""
    if getattr(optimizer, "offload_optimizer", False) or getattr(optimizer, "swap_optimizer", False):
        return
    masters = optimizer.fp32_partitioned_groups_flat
    for index, (partition, master) in enumerate(zip(optimizer.fp16_partitioned_groups_flat, masters)):
        if partition is None or partition is master or (partition.dtype, partition.device) != (master.dtype, master.device):
            continue
        assert master not in optimizer.optimizer.state, "master weights shared after the first optimizer step"
        partition.ds_id, partition.requires_grad = master.ds_id, True
        masters[index] = partition


@contextlib.contextmanager
def _quiet():
    """DeepSpeed logs every init/save/load step at INFO on every rank."""
    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _host_snapshots(inner):
    """A checkpoint engine standing in for DeepSpeed's `inner` during an async save (the class is
    defined here: DeepSpeed is imported only by runs that use it)."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class HostSnapshots(CheckpointEngine):
        """A DeepSpeed checkpoint engine that copies each state DeepSpeed saves to host memory and
        queues it; `write()` (the writer thread) saves the queue with the engine it stands in for."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.name, self.queued = inner, "tokfleet-host-snapshots", []

        def create(self, info):
            self.inner.create(info)

        def save(self, state_dict, path: str):
            self.queued.append((to_host(state_dict), path))

        def load(self, path: str, map_location=None):
            return self.inner.load(path, map_location)

        def commit(self, info):
            return True  # the files are not written yet; the checkpoint's COMPLETE marker says when they are

        def write(self) -> None:
            queued, self.queued = self.queued, []
            for state_dict, path in queued:
                self.inner.save(state_dict, path)

    return HostSnapshots(inner)


class DeepSpeedEngine:
    format = "deepspeed"

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, engine_cfg: EngineConfig,
                 max_steps: int, device: torch.device, world_size: int):
        self.device = device
        self.model = model.to(device)
        self.optim_cfg = optim_cfg
        self.config = deepspeed_config(engine_cfg, optim_cfg, world_size, device)
        self.zero_stage = self.config["zero_optimization"]["stage"]
        # MoE experts split over engine.expert_parallel_size ranks (None: every rank holds all experts)
        self.experts = expert_parallel.setup_expert_parallel(self.model, engine_cfg.expert_parallel_size, world_size, self.zero_stage)
        with _quiet():
            self.ds, self.optimizer, self.scheduler = self._initialize(max_steps)
        if self.zero_stage == 3:
            _share_master_weights(self.ds.optimizer)
        if device.type == "cpu":
            _unlink_shm_workspace(self.ds.global_rank)
        self.rank, self.world_size = self.ds.global_rank, self.ds.world_size
        self.num_micro_batches = optim_cfg.grad_accum_steps
        self._micro_batch = 0

    def _initialize(self, max_steps: int):
        """(DeepSpeed engine, its optimizer, its LR scheduler)."""
        import deepspeed  # heavy; only runs that use it pay for the import

        parameters = param_groups(self.model, self.optim_cfg)
        moe = contextlib.nullcontext()
        if self.experts is not None:
            parameters, moe = self.experts.param_groups(parameters), self.experts.recognized_by_deepspeed()
        with moe:
            ds, optimizer, _, scheduler = deepspeed.initialize(
                model=self.model, model_parameters=parameters, config=self.config,
                lr_scheduler=lambda optimizer: build_scheduler(optimizer, self.optim_cfg, max_steps),
                dist_init_required=False,
            )
        return ds, optimizer, scheduler

    def describe(self) -> dict[str, Any]:
        return {"zero_stage": self.zero_stage, "precision": "bf16" if "bf16" in self.config else "fp16" if "fp16" in self.config else "fp32",
                "offload_optimizer": bool(self.config["zero_optimization"].get("offload_optimizer")),
                "offload_params": bool(self.config["zero_optimization"].get("offload_param")),
                "optimizer": optimizer_name(self.ds.basic_optimizer),
                "expert_parallel_size": self.experts.ep_size if self.experts is not None else 1}

    def forward_backward(self, batch: dict[str, torch.Tensor], loss_scale: float) -> torch.Tensor:
        """One micro-batch. DeepSpeed divides the loss by the accumulation steps itself (`loss_scale`
        is that same 1/accum) and counts micro-batches in `step()`, which only steps the optimizer
        at the accumulation boundary."""
        self.ds.train()
        loss = self.ds(**batch)
        self.ds.backward(loss)
        self._micro_batch += 1
        if self._micro_batch < self.num_micro_batches:
            self.ds.step()  # not a boundary: bookkeeping only
        return loss.detach().float()

    def optimizer_step(self) -> torch.Tensor:
        assert self._micro_batch == self.num_micro_batches, (
            f"optimizer_step after {self._micro_batch} micro-batches; expected {self.num_micro_batches}")
        self._micro_batch = 0
        self.ds.step()  # clip, step, schedule, zero grads
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32).detach()

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.ds.eval()
        return self.ds(**batch).detach().float()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def loss_scale(self) -> float | None:
        """fp16: DeepSpeed's dynamic loss scale (its optimizers' `loss_scale`); else None."""
        scale = getattr(self.ds.optimizer, "loss_scale", None) if "fp16" in self.config else None
        return float(scale) if scale is not None else None

    # -------------------------------------------------------------- checkpoint

    def save_checkpoint(self, directory: Path) -> None:
        """Collective: every rank writes its ZeRO partition under directory/deepspeed/."""
        experts = self.experts.saving(directory) if self.experts is not None else contextlib.nullcontext()
        with _quiet(), contextlib.redirect_stdout(io.StringIO()), experts:  # experts: their own files (expert_parallel.py)
            self.ds.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def snapshot_checkpoint(self, directory: Path) -> Writer:
        """Collective: DeepSpeed's save with its files held in host memory (`_host_snapshots`); the returned
        writer writes them with DeepSpeed's own checkpoint engine (async saves)."""
        original = self.ds.checkpoint_engine
        snapshots = _host_snapshots(original)
        self.ds.checkpoint_engine = snapshots
        try:
            self.save_checkpoint(directory)
        finally:
            self.ds.checkpoint_engine = original
        return snapshots.write

    def load_checkpoint(self, directory: Path, saved_world_size: int) -> None:
        """Collective. At another world size, loads the universal (resharded) form of the checkpoint."""
        from trainer.engines.reshard import universal_checkpoint

        tag, load_module = TAG, None
        saved_ep_size = expert_parallel.check_resume(directory, self.model, self.experts, saved_world_size, self.world_size)
        elastic = saved_world_size != self.world_size and self.zero_stage > 0
        if saved_ep_size is not None:  # experts split otherwise than here: re-partitioned
            tag, elastic = self._experts_universal(directory, saved_ep_size, saved_world_size), True
        elif self.experts is not None:
            load_module = self.experts.module_loader(self.experts.local_experts(directory))
        if elastic and saved_ep_size is None:
            tag = universal_checkpoint(directory, TAG)
        # DeepSpeed reads "universal or not" from its config at load time; this run decides per checkpoint
        self.ds._config.load_universal_checkpoint = elastic
        hyperparameters = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                           for g in self.optimizer.param_groups]
        try:
            with _quiet(), contextlib.redirect_stdout(io.StringIO()), _mapped_model_states(self.ds):
                path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True,
                                                  custom_load_fn=load_module)
        except (AssertionError, RuntimeError, FileNotFoundError, KeyError, ValueError, EOFError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"checkpoint {directory}: DeepSpeed could not load it: {first_line}") from None
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise UserError(f"checkpoint {directory}: no DeepSpeed shards under {directory / tag}")
        if elastic:
            self._repair_universal_load(hyperparameters)

    def _experts_universal(self, directory: Path, saved_ep_size: int, saved_world_size: int) -> str:
        """Collective: the tag of the checkpoint's universal form with the experts re-partitioned for
        this run's expert-parallel size (written once, by rank 0; `expert_reshard.py`)."""
        from trainer.engines import expert_reshard
        from trainer.engines.reshard import universal_checkpoint

        ep_size = self.experts.ep_size if self.experts is not None else 1
        if self.zero_stage == 0:
            raise UserError(f"checkpoint {directory}: its experts were split over {saved_ep_size} of {saved_world_size} "
                            f"rank(s), this run splits them over {ep_size} of {self.world_size}: re-partitioning them "
                            "needs ZeRO stage 1 or 2 (engine.zero_stage), this run uses 0")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        experts = expert_parallel.expert_tensors(self.model, self.experts)
        log.info("experts re-partitioned: expert_parallel_size %d on %d rank(s) -> %d on %d",
                 saved_ep_size, saved_world_size, ep_size, self.world_size)
        return universal_checkpoint(directory, TAG, lambda: expert_reshard.convert(
            directory, TAG, experts, saved_ep_size, saved_world_size, ep_size, groups))

    def _repair_universal_load(self, hyperparameters: list[dict[str, Any]]) -> None:
        """Undo two things DeepSpeed 0.19's ZeRO-3 universal load gets wrong
        (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3):
        - it copies group 0's hyperparameters onto every group (weight decay on embeddings):
          the run config's, taken before the load, are put back;
        - it puts one `step` tensor object into every sub-group's Adam state, which torch's AdamW
          increments in place once per sub-group, so bias correction would run ahead: every
          state gets its own counter."""
        for group, values in zip(self.optimizer.param_groups, hyperparameters):
            group.update(values)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model's parameters (ZeRO-3 gathers them), on every rank, in fp32 on the CPU."""
        import deepspeed

        params = dict(self.model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=self.zero_stage == 3):
            state = {name: param.detach().float().cpu().clone() for name, param in params.items()}
        return state if self.experts is None else self.experts.full_state_dict(state)
