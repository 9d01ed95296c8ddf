"""Engines wrap a plain model with its optimizer, schedule, precision and parallelism.

Every engine offers: `model` (the plain module), `rank`, `world_size`, `format` (the checkpoint
layout: "torch", "deepspeed" or "dcp"), `forward_backward(batch, loss_scale)`, `optimizer_step()`,
`eval_loss(batch)`, `lr`, `describe()`, `save_checkpoint(dir)`, `load_checkpoint(dir, saved_world_size)`
and `full_state_dict()`. Checkpoint methods are collective: every rank calls them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from core.config import TrainConfig
from core.errors import UserError
from trainer.distributed import DistEnv
from trainer.engines.single import pick_device
from trainer.optim import ScheduleSpan


def engine_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    """single: run.device (auto: cuda > mps > cpu); multi-process engines: cuda:LOCAL_RANK, else cpu.
    fp16 on a CPU is refused for every engine, as documented: fp16 with loss scaling is a GPU mode (DeepSpeed and
    Accelerate cannot run it on CPU at all), and this check comes before any process group or run dir exists."""
    device = _pick_engine_device(cfg, env)
    if cfg.engine.precision == "fp16" and device.type == "cpu":
        raise UserError("engine.precision fp16 needs a GPU (CUDA); on CPU use bf16 or fp32")
    return device


def _pick_engine_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    if cfg.engine.kind == "single":
        if env.world_size > 1:
            raise UserError(f"engine.kind 'single' runs one process, but the launcher started {env.world_size}: "
                            "set engine.kind to accelerate or deepspeed")
        return pick_device(cfg.run.device)
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"run.device {cfg.run.device!r} is not supported by engine.kind {cfg.engine.kind!r} (use auto, cpu or cuda)")
    if cfg.run.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    if cfg.run.device == "cuda":
        raise UserError("run.device is 'cuda' but no CUDA device is available")
    if cfg.engine.kind == "deepspeed" or cfg.engine.kind == "accelerate":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise look for a GPU
        # DeepSpeed JIT-builds a CPU comm op; one cache per environment, so two checkouts do not
        # keep rebuilding it over each other
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return torch.device("cpu")


def build_engine(cfg: TrainConfig, model: nn.Module, device: torch.device, world_size: int, schedule: ScheduleSpan):
    """The engine of cfg.engine; `schedule` (the run's resolved length, see trainer/optim.py) is what
    each engine's `max_steps` receives and hands to build_scheduler."""
    if cfg.engine.kind == "single":
        from trainer.engines.single import SingleDeviceEngine

        return SingleDeviceEngine(model, cfg.optim, cfg.engine, schedule, device)
    if cfg.engine.kind == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg.optim, cfg.engine, schedule, device, world_size)
    if cfg.engine.kind == "accelerate":
        return _build_accelerate_engine(cfg, model, device, world_size, schedule)
    raise AssertionError(f"unknown engine kind {cfg.engine.kind!r}")  # the config schema admits no other


def _build_accelerate_engine(cfg: TrainConfig, model: nn.Module, device: torch.device, world_size: int, schedule: ScheduleSpan):
    """Accelerate's strategy (DDP, FSDP or DeepSpeed), from engine.strategy or `accelerate launch`'s environment.
    Chosen here, so that accelerate.py and fsdp.py (which builds on it) do not import each other."""
    from trainer.engines import accelerate

    strategy = accelerate.resolve_strategy(cfg.engine)
    if cfg.engine.precision == "fp16" and device.type != "cuda":
        raise UserError(f"engine.precision fp16 under accelerate needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
    if strategy == "ddp":
        return accelerate.AccelerateDDPEngine(model, cfg.optim, cfg.engine, schedule, device)
    if strategy == "fsdp":
        from trainer.engines.fsdp import AccelerateFSDPEngine

        return AccelerateFSDPEngine(model, cfg.optim, cfg.engine, schedule, device)
    return accelerate.AccelerateDeepSpeedEngine(model, cfg.optim, accelerate.with_launcher_deepspeed_settings(cfg.engine),
                                                schedule, device, world_size)
