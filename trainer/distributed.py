"""The process group: rank and world size from the launcher's environment, and a few collectives.

Every launcher we support sets RANK / WORLD_SIZE / LOCAL_RANK (torchrun, the deepspeed
launcher, `accelerate launch`); under `srun` without a wrapper only SLURM_PROCID /
SLURM_NTASKS / SLURM_LOCALID exist, so those are the fallback. Ray Train (trainer/ray_train.py)
sets the same variables and has joined the group before our code runs: a group already
initialised is kept as it is. With one process and no engine that needs a group, nothing here
touches torch.distributed and the helpers are no-ops.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from core.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise UserError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def read_env() -> DistEnv:
    """Rank, world size and local rank as the launcher set them (1 process when none did)."""
    env = DistEnv(
        rank=_env_int("RANK", "SLURM_PROCID", default=0),
        world_size=_env_int("WORLD_SIZE", "SLURM_NTASKS", default=1),
        local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID", default=0),
    )
    if not 0 <= env.rank < env.world_size:
        raise UserError(f"launcher environment has rank {env.rank} outside world size {env.world_size}")
    return env


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float) -> None:
    """Join the job's process group; a peer that is gone makes collectives fail after `timeout_s`.

    gloo on CPU, nccl on CUDA. One process without a launcher (e.g. `engine.kind: deepspeed`
    run as `python -m trainer`) gets a group of one on an in-memory store: no address or port.
    """
    if dist.is_initialized():
        return
    # frameworks (DeepSpeed, Accelerate) read these themselves; srun or a bare process sets none
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(name, str(value))
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    # srun sets no rendezvous address: the job script exports the first node's
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout)


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the initialized group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the initialized group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one without a group)."""
    if not is_active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank `dst` (None on the others): W objects to one rank, where
    all_gather_object would move W to every rank."""
    if not is_active():
        return [obj]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (a new tensor; the input is left alone)."""
    if not is_active():
        return tensor
    reduced = tensor.detach().float().to(_collective_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over ranks (a new tensor on the collective's device; the input is left alone)."""
    if not is_active():
        return tensor.detach().clone()
    reduced = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def _all_reduce_int(value: int, op) -> int:
    if not is_active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


def all_reduce_min(value: int) -> int:
    return _all_reduce_int(value, dist.ReduceOp.MIN)


def all_reduce_max(value: int) -> int:
    return _all_reduce_int(value, dist.ReduceOp.MAX)


def shutdown() -> None:
    global _background_group
    _background_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_background_group = None


def background_group():
    """A gloo group of every rank for threads beside the training loop (background checkpoint writers):
    collectives on a group of their own never interleave with the loop's. The first call creates it
    and is collective; None without a group of several ranks."""
    global _background_group
    if not is_active():
        return None
    if _background_group is None:
        _background_group = dist.new_group(backend="gloo")
    return _background_group


def background_barrier() -> None:
    """A barrier on `background_group()` (which an earlier call on every rank created)."""
    if _background_group is not None:
        dist.barrier(group=_background_group)
