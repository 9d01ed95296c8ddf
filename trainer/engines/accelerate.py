"""HF Accelerate engine: DDP, FSDP (full shard) or DeepSpeed, with Accelerate's precision handling.

`engine.strategy: auto` takes what `accelerate launch --config_file configs/accelerate/*.yaml`
set in the environment (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED), else DDP. Under
torchrun or srun, name the strategy in the run config.

- ddp: whole replicas, so checkpoints use the single-device "torch" format (rank 0 writes
  model.safetensors + optimizer.pt; every rank reads them): they resume at any world size and
  under the single-device engine. Gradients are all-reduced once per optimizer step: the
  micro-batches before the last one of an accumulation run under `no_sync`.
- fsdp: FSDP2 (`fully_shard` per transformer block, parameters and optimizer states sharded).
  Checkpoints are torch.distributed.checkpoint ("dcp"): every rank writes its shards, and DCP
  reshards on load at any world size.
- deepspeed: Accelerate's DeepSpeed plugin, with the DeepSpeed engine's config, loop and
  checkpoint format (see deepspeed.py).

Accelerate 1.15 on a machine without GPUs (what we found, and work around here):
- `Accelerator()` sets no backend when `cpu=False` and no GPU exists, and then reports
  `num_processes == 1` / `process_index == 0` on every rank although the process group has 2
  (accelerate/state.py `_prepare_backend` returns None; `PartialState.__init__` then takes the
  single-process branch). Under the DeepSpeed plugin that fails DeepSpeed's batch-size check.
  Fix: `InitProcessGroupKwargs(backend="gloo")`; DDP uses `cpu=True` (MULTI_CPU) instead.
- With an FSDP plugin it silently trains unsharded (the FSDP distributed type is only chosen for
  GPU-like devices), so on CPU we set the FSDP state ourselves and then check that the prepared
  model's parameters really are sharded DTensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import EngineConfig, OptimConfig
from trainer import distributed
from trainer.engines.deepspeed import DeepSpeedEngine
from trainer.async_checkpoint import Writer
from trainer.engines.single import load_whole, save_whole, snapshot_whole
from trainer.optim import build_optimizer, build_scheduler, param_groups

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def resolve_strategy(engine_cfg: EngineConfig) -> str:
    if engine_cfg.strategy != "auto":
        return engine_cfg.strategy
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "ddp"


def with_launcher_deepspeed_settings(engine_cfg: EngineConfig) -> EngineConfig:
    """ZeRO stage / DeepSpeed JSON from `accelerate launch --config_file` where the run config names none."""
    stage, config_file = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    changes = {}
    if engine_cfg.deepspeed_config is None and config_file and config_file.lower() != "none":
        changes["deepspeed_config"] = config_file
    elif engine_cfg.zero_stage is None and engine_cfg.deepspeed_config is None and stage not in (None, "", "None"):
        changes["zero_stage"] = int(stage)
    return dataclasses.replace(engine_cfg, **changes) if changes else engine_cfg


def process_group_kwargs(device: torch.device) -> list:
    """Accelerate's kwargs handlers: name the gloo backend on CPU (see the module docstring)."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")] if device.type == "cpu" else []


def check_world(accelerator) -> None:
    world = distributed.world_size()
    if accelerator.num_processes != world:
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} process(es) in a process group of {world} "
                           f"(distributed type {accelerator.distributed_type}): refusing to train unsynchronised")


class AccelerateDeepSpeedEngine(DeepSpeedEngine):
    """The DeepSpeed engine with Accelerate's DeepSpeed plugin doing the initialisation."""

    def _initialize(self, max_steps: int):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler

        # The launcher's accelerate-config DeepSpeed fields (zero_stage) are folded into self.config
        # already; Accelerate refuses a full config dict while it still sees them listed.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        self.accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=self.config), kwargs_handlers=process_group_kwargs(self.device),
            mixed_precision="bf16" if "bf16" in self.config else "fp16" if "fp16" in self.config else "no",
        )
        check_world(self.accelerator)
        # the optimizer and schedule are DeepSpeed's (from self.config) and ours, built inside prepare()
        optimizer = DummyOptim(param_groups(self.model, self.optim_cfg), lr=self.optim_cfg.lr)
        scheduler = DummyScheduler(optimizer, lr_scheduler_callable=lambda opt: build_scheduler(opt, self.optim_cfg, max_steps))
        ds, optimizer, scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)
        return ds, optimizer, scheduler

    def describe(self) -> dict:
        return {"strategy": "deepspeed", **super().describe()}


class AccelerateEngine:
    """The loop shared by Accelerate's DDP and FSDP: subclasses build `accelerator`, `model` (plain
    module), `train_model` (the wrapped one), `optimizer` (prepared) and `scheduler` (ours, stepped
    once per optimizer step: a prepared one would step once per process)."""

    accelerator: Any
    model: nn.Module
    train_model: nn.Module
    optim_cfg: OptimConfig

    def _setup(self, optim_cfg: OptimConfig, engine_cfg: EngineConfig, device: torch.device) -> None:
        self.device, self.optim_cfg, self.precision = device, optim_cfg, engine_cfg.precision
        check_world(self.accelerator)
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.num_micro_batches = optim_cfg.grad_accum_steps
        self._micro_batch = 0

    def forward_backward(self, batch: dict[str, torch.Tensor], loss_scale: float) -> torch.Tensor:
        self.train_model.train()
        self._micro_batch += 1
        is_last = self._micro_batch == self.num_micro_batches
        with contextlib.nullcontext() if is_last else self.accelerator.no_sync(self.train_model):
            with self.accelerator.autocast():
                loss = self.train_model(**batch)
            self.accelerator.backward(loss * loss_scale)
        return loss.detach().float()

    def optimizer_step(self) -> torch.Tensor:
        assert self._micro_batch == self.num_micro_batches, (
            f"optimizer_step after {self._micro_batch} micro-batches; expected {self.num_micro_batches}")
        self._micro_batch = 0
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.train_model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        return torch.as_tensor(grad_norm).detach().float()

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.train_model.eval()  # FSDP: collective, every rank runs the same forwards
        with self.accelerator.autocast():
            return self.train_model(**batch).detach().float()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def loss_scale(self) -> float | None:
        """fp16: the grad scaler's current scale; else None."""
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else None


class AccelerateDDPEngine(AccelerateEngine):
    format = "torch"

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, engine_cfg: EngineConfig,
                 max_steps: int, device: torch.device):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=MIXED_PRECISION[engine_cfg.precision],
                                       step_scheduler_with_optimizer=False)
        self._setup(optim_cfg, engine_cfg, device)
        self.model = model.to(device)
        self.train_model, self.optimizer = self.accelerator.prepare(self.model, build_optimizer(self.model, optim_cfg))
        self.scheduler = build_scheduler(self.optimizer.optimizer, optim_cfg, max_steps)

    def describe(self) -> dict:
        return {"strategy": "ddp", "precision": self.precision}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().float().cpu().clone() for name, param in self.model.named_parameters()}

    def save_checkpoint(self, directory: Path) -> None:
        if self.rank == 0:  # replicas are identical
            save_whole(directory, self.model, self.optimizer.optimizer, self.scheduler, self.accelerator.scaler)

    def snapshot_checkpoint(self, directory: Path) -> Writer:
        if self.rank != 0:
            return lambda: None
        return snapshot_whole(directory, self.model, self.optimizer.optimizer, self.scheduler, self.accelerator.scaler)

    def load_checkpoint(self, directory: Path, saved_world_size: int) -> None:
        load_whole(directory, self.model, self.optimizer.optimizer, self.scheduler, self.accelerator.scaler, self.device)
        distributed.barrier()
