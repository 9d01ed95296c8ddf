"""Micro-batches for one rank from the shard loader, across epochs, with resumable state.

The shard loader yields one epoch of samples; this wraps it into an endless stream of
micro-batches, rolls over to the next epoch, turns samples into the model's inputs for
its task, and (optionally) records every consumed sample key for auditing.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from launch.config import DataConfig
from launch.errors import UserError
from torch.utils.data import DataLoader

from sharding.loader import ShardIterableDataset, ShardLoader
from sharding.manifest import Manifest


MAX_EMPTY_EPOCHS = 8  # more than any resumed state can skip (ranks drift apart by at most an epoch or two)


def read_manifest(cfg: DataConfig) -> Manifest:
    try:
        return Manifest.read(cfg.dataset, cfg.storage_options)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"data.dataset: {error}") from None


def split_has_samples(manifest: Manifest, split: str) -> bool:
    return any(shard.split == split and shard.num_samples > 0 for shard in manifest.shards)


def causal_lm_batch(fields: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """(B, T+1) packed tokens -> inputs and next-token targets, each (B, T)."""
    tokens_BT1 = fields["tokens"].to(device, non_blocking=True)
    return {"idx": tokens_BT1[:, :-1], "targets": tokens_BT1[:, 1:]}


def token_chunks_batch(fields: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """(B, T+1) packed tokens -> the first T tokens (B, T) for a chunk model (TokCom), which cuts them
    into chunks of its chunk_size (dropping a tail of T % chunk_size tokens)."""
    return {"input_ids": fields["tokens"][:, :-1].to(device, non_blocking=True)}


def signal_batch(fields: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """MEG/EEG windows: signal (B, C, T) float32 plus the sensors' pos (B, C, 6) and sensor_type (B, C)."""
    return {name: fields[name].to(device, non_blocking=True) for name in ("signal", "pos", "sensor_type") if name in fields}


def video_batch(fields: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Video clips: (B, T, H, W, 3) uint8; the model scales them."""
    return {"video": fields["video"].to(device, non_blocking=True)}


# model spec task -> (sample fields -> the model's keyword arguments)
TASK_BATCHES = {"causal_lm": causal_lm_batch, "token_chunks": token_chunks_batch,
                "signal_reconstruction": signal_batch, "video_reconstruction": video_batch}


def num_tokens(fields: dict[str, torch.Tensor]) -> int:
    """What throughput and MFU count in a micro-batch: the positions a token model reads (T of the
    T+1 stored per sample), or every input value of a signal or video model (the unit of its
    num_flops_per_token)."""
    if "tokens" in fields:
        batch_size, stored = fields["tokens"].shape[:2]
        return batch_size * (stored - 1)
    return sum(fields[name].numel() for name in ("signal", "video") if name in fields)


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack each array field of the samples into one tensor (token ids become int64)."""
    fields = {}
    for name, first in samples[0].items():
        if not isinstance(first, np.ndarray):
            continue  # keys, stream positions, JSON metadata
        shapes = {s[name].shape for s in samples}
        if len(shapes) > 1:
            keys = [s["__key__"] for s in samples[:4]]
            raise UserError(f"field {name!r} has different shapes {sorted(shapes)} within one batch (samples {keys}, ...): "
                            "prepare the dataset with one channel set (e.g. meg.channel_types) or use micro_batch_size 1")
        array = np.stack([s[name] for s in samples])
        if array.dtype in (np.uint16, np.uint32, np.int32):
            array = array.astype(np.int64)
        fields[name] = torch.from_numpy(array)
    return fields


def _keep_numpy(sample: dict[str, Any]) -> dict[str, Any]:
    return sample  # DataLoader would turn arrays into tensors one by one; we stack a batch at once


class Batches:
    """Endless micro-batches of `batch_size` samples for rank `rank` of `world_size`.

    With `cfg.num_workers > 0` the shards are read by DataLoader worker processes; each sample
    carries its stream position and the main process keeps the authoritative loader state, so
    prefetched but unconsumed samples are never counted as seen.
    """

    def __init__(self, manifest: Manifest, cfg: DataConfig, split: str, *, batch_size: int,
                 rank: int, world_size: int, seed: int, shuffle: bool, key_log: Path | None = None,
                 num_workers: int | None = None):
        if not split_has_samples(manifest, split):
            raise UserError(f"data.dataset {cfg.dataset}: split '{split}' has no samples")
        self.batch_size = batch_size
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        common = dict(rank=rank, world_size=world_size, num_streams=cfg.num_streams, seed=seed, shuffle=shuffle,
                      storage_options=cfg.storage_options)
        if self.num_workers > 0:
            self.dataset = ShardIterableDataset(manifest, cfg.dataset, split, num_workers=self.num_workers, **common)
            self.tracker = self.dataset.new_state()
        else:
            self.loader = ShardLoader(manifest, cfg.dataset, split, num_workers=1, worker_id=0, **common)
        self.epoch = 0
        self._iterator: Iterator[dict[str, Any]] | None = None
        self.key_log = key_log

    def _start_iterator(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            return iter(self.loader)
        self.tracker = self.dataset.new_state()
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_keep_numpy,
                            prefetch_factor=2 * self.batch_size)
        return iter(loader)

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        (self.dataset if self.num_workers else self.loader).set_epoch(epoch)
        self._iterator = None

    def _next_sample(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start_iterator()
        # A resumed state may hold this rank's streams in a later epoch (they were read to the end
        # of this one): such epochs yield nothing here, so move on. A fresh epoch that yields
        # nothing means the rank has no data at all.
        for _ in range(MAX_EMPTY_EPOCHS):
            sample = next(self._iterator, None)
            if sample is not None:
                break
            self._set_epoch(self.epoch + 1)
            self._iterator = self._start_iterator()
        else:
            raise UserError("this rank's part of the dataset is empty: fewer shards than ranks x data workers "
                            "(write more, smaller shards, or use fewer ranks)")
        if self.num_workers:
            self.tracker.update(sample["__stream__"], sample["__position__"])
        return sample

    def next_batch(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """The micro-batch's array fields stacked, e.g. {"tokens": (B, T+1) int64}."""
        samples, epochs = [], []
        for _ in range(self.batch_size):
            samples.append(self._next_sample())
            epochs.append(self.epoch)  # a batch may straddle the end of an epoch
        if self.key_log is not None:
            with open(self.key_log, "a") as handle:
                for epoch in sorted(set(epochs)):
                    keys = [s["__key__"] for s, e in zip(samples, epochs) if e == epoch]
                    handle.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
        return collate(samples)

    def take(self, num_batches: int) -> list[dict[str, torch.Tensor]]:
        """The first `num_batches` full batches of a pass, read in-process (validation: the same set every time)."""
        assert self.num_workers == 0, "take() reads in the main process"
        samples = list(itertools.islice(iter(self.loader), num_batches * self.batch_size))
        size = self.batch_size
        return [collate(samples[i:i + size]) for i in range(0, len(samples) - size + 1, size)]

    def state_dict(self) -> dict[str, Any]:
        loader_state = self.tracker.state_dict() if self.num_workers else self.loader.state_dict()
        return {"epoch": self.epoch, "loader": loader_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set_epoch(state["epoch"])
        (self.dataset if self.num_workers else self.loader).load_state_dict(state["loader"])
