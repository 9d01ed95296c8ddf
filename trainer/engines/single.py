"""Single-device engine: plain PyTorch on one CUDA, MPS or CPU device.

An engine owns the wrapped model, the optimizer, the LR schedule and mixed precision,
and saves/loads its own part of a checkpoint. The training loop only calls
`forward_backward`, `optimizer_step`, `eval_loss` and the checkpoint methods, so the
DeepSpeed and Accelerate engines can replace this one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.config import EngineConfig, OptimConfig
from core.errors import UserError
from trainer.async_checkpoint import Writer, to_host
from trainer.optim import build_optimizer, build_scheduler

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def pick_device(requested: str) -> torch.device:
    """cuda > mps > cpu for "auto"; an explicit device must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device is 'cuda' but no CUDA device is available")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("run.device is 'mps' but MPS is not available")
    return torch.device(requested)


class SingleDeviceEngine:
    world_size = 1
    rank = 0
    format = "torch"  # model.safetensors + optimizer.pt: whole tensors, loadable at any world size

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, engine_cfg: EngineConfig,
                 max_steps: int, device: torch.device):
        self.device = device
        self.model = model.to(device)
        self.optim_cfg = optim_cfg
        self.optimizer = build_optimizer(self.model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)
        self.precision = engine_cfg.precision
        self.autocast_dtype = PRECISION_DTYPES[engine_cfg.precision]
        # fp16 has a narrow range: scale the loss so small gradients do not underflow
        self.scaler = torch.amp.GradScaler(device.type) if engine_cfg.precision == "fp16" else None

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, batch: dict[str, torch.Tensor], loss_scale: float) -> torch.Tensor:
        """One micro-batch; gradients accumulate. Returns the unscaled loss (detached)."""
        self.model.train()
        with self._autocast():
            loss = self.model(**batch)
        scaled = loss * loss_scale
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        return loss.detach()

    def optimizer_step(self) -> torch.Tensor:
        """Clip, step, advance the schedule, clear gradients. Returns the pre-clip grad norm."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm.detach()

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.eval()
        with self._autocast():
            return self.model(**batch).detach()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def loss_scale(self) -> float | None:
        """fp16: the grad scaler's current scale (it halves on an overflow, the step skipped); else None."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def describe(self) -> dict:
        return {"precision": self.precision}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().float().cpu().clone() for name, param in self.model.named_parameters()}

    # -------------------------------------------------------------- checkpoint

    def save_checkpoint(self, directory: Path) -> None:
        save_whole(directory, self.model, self.optimizer, self.scheduler, self.scaler)

    def snapshot_checkpoint(self, directory: Path) -> Writer:
        """The state copied to host memory; the returned writer writes it to `directory` (async saves)."""
        return snapshot_whole(directory, self.model, self.optimizer, self.scheduler, self.scaler)

    def load_checkpoint(self, directory: Path, saved_world_size: int = 1) -> None:
        """Whole tensors: the same files load at any world size."""
        load_whole(directory, self.model, self.optimizer, self.scheduler, self.scaler, self.device)


def save_whole(directory: Path, model: nn.Module, optimizer, scheduler, scaler) -> None:
    """The "torch" checkpoint format: model.safetensors + optimizer.pt (whole tensors)."""
    write_whole(directory, whole_state(model, optimizer, scheduler, scaler))


def snapshot_whole(directory: Path, model: nn.Module, optimizer, scheduler, scaler) -> Writer:
    """`save_whole` in two parts: a host-memory copy now, the files when the returned writer runs."""
    state = to_host(whole_state(model, optimizer, scheduler, scaler))
    return lambda: write_whole(directory, state)


def whole_state(model: nn.Module, optimizer, scheduler, scaler) -> dict:
    """What the "torch" format holds: the model's tensors, and optimizer, schedule and grad-scaler states."""
    return {
        "model": {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        "training": {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
    }


def write_whole(directory: Path, state: dict) -> None:
    save_file(state["model"], directory / MODEL_FILE)
    torch.save(state["training"], directory / OPTIMIZER_FILE)


def load_whole(directory: Path, model: nn.Module, optimizer, scheduler, scaler, device: torch.device) -> None:
    model.load_state_dict(load_model_state(directory, device))
    path = directory / OPTIMIZER_FILE
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as error:  # a torn or foreign file: name it, do not train on garbage
        raise UserError(f"checkpoint file {path} is unreadable or corrupt: {error}") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def load_model_state(directory: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(directory) / MODEL_FILE
    try:
        return load_file(path, device=str(device))
    except Exception as error:
        raise UserError(f"checkpoint file {path} is unreadable or corrupt: {error}") from None
