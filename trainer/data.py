"""Micro-batches for one rank from the shard loader, across epochs, with resumable state.

The shard loader yields one epoch of samples; this wraps it into an endless stream of
micro-batches, rolls over to the next epoch, turns samples into the model's inputs for
its task, and (optionally) records every consumed sample key for auditing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from launch.config import DataConfig
from launch.errors import UserError
from sharding.loader import ShardLoader
from sharding.manifest import Manifest


def read_manifest(cfg: DataConfig) -> Manifest:
    try:
        return Manifest.read(cfg.dataset, cfg.storage_options)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"data.dataset: {error}") from None


def split_has_samples(manifest: Manifest, split: str) -> bool:
    return any(shard.split == split and shard.num_samples > 0 for shard in manifest.shards)


def causal_lm_batch(tokens_BT1: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """(B, T+1) packed tokens -> inputs and next-token targets, each (B, T)."""
    tokens_BT1 = tokens_BT1.to(device, non_blocking=True)
    return {"idx": tokens_BT1[:, :-1], "targets": tokens_BT1[:, 1:]}


TASK_BATCHES = {"causal_lm": causal_lm_batch}


class Batches:
    """Endless micro-batches of `batch_size` samples for rank `rank` of `world_size`."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, split: str, *, batch_size: int,
                 rank: int, world_size: int, seed: int, shuffle: bool, key_log: Path | None = None):
        self.batch_size = batch_size
        self.loader = ShardLoader(
            manifest, cfg.dataset, split, rank=rank, world_size=world_size, num_workers=1, worker_id=0,
            num_streams=cfg.num_streams, seed=seed, shuffle=shuffle, storage_options=cfg.storage_options,
        )
        if not split_has_samples(manifest, split):
            raise UserError(f"data.dataset {cfg.dataset}: split '{split}' has no samples")
        self.epoch = 0
        self._iterator: Iterator[dict[str, Any]] = iter(self.loader)
        self.key_log = key_log

    def _next_sample(self) -> dict[str, Any]:
        try:
            return next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                raise UserError("this rank's part of the dataset is empty: fewer shards than ranks") from None

    def next_batch(self, step: int | None = None) -> torch.Tensor:
        samples = [self._next_sample() for _ in range(self.batch_size)]
        if self.key_log is not None:
            with open(self.key_log, "a") as handle:
                handle.write(json.dumps({"step": step, "epoch": self.epoch,
                                         "keys": [s["__key__"] for s in samples]}) + "\n")
        return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))

    def take(self, num_batches: int) -> list[torch.Tensor]:
        """The first `num_batches` of one pass (for validation: a fixed set every time)."""
        batches, buffer = [], []
        for sample in self.loader:
            buffer.append(sample["tokens"])
            if len(buffer) == self.batch_size:
                batches.append(torch.from_numpy(np.stack(buffer).astype(np.int64)))
                buffer = []
                if len(batches) == num_batches:
                    break
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._iterator = iter(self.loader)
