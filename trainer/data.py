"""Micro-batches for one rank from the shard loader, across epochs, with resumable state.

The shard loader yields one epoch of samples; this wraps it into an endless stream of
micro-batches, rolls over to the next epoch, turns samples into the model's inputs for
its task, and (optionally) records every consumed sample key for auditing.

It also keeps the model from seeing bad data: a batch's token ids are checked against the
model's vocabulary (one min/max per batch; the offending sample is looked for only when a
batch fails), and with `data.on_corrupt: skip` what the loader or this check skipped is counted
(`num_skipped()`, checkpointed with the loader state) and listed in `logs/skipped-rank{r}.jsonl`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from core.config import DataConfig
from core.errors import UserError
from torch.utils.data import DataLoader

from sharding.loader import SKIPPED, ShardIterableDataset, ShardLoader, default_num_streams, log_skip, streams_of_rank
from sharding.manifest import Manifest
from trainer import distributed
from trainer.metrics import truncate_jsonl


MAX_EMPTY_EPOCHS = 8  # more than any resumed state can skip (ranks drift apart by at most an epoch or two)


def read_manifest(cfg: DataConfig) -> Manifest:
    try:
        return Manifest.read(cfg.dataset, cfg.storage_options)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"data.dataset: {error}") from None


def split_has_samples(manifest: Manifest, split: str) -> bool:
    return any(shard.split == split and shard.num_samples > 0 for shard in manifest.shards)


def resolve_num_streams(cfg: DataConfig, manifest: Manifest, world_size: int, num_workers: int, is_checked: bool = True) -> int:
    """data.num_streams, or when unset one stream per train shard, at least 1 and at most STREAMS_PER_READER per reader;
    `is_checked` (the train split): a UserError when fewer streams than ranks x readers (some readers would
    get no data at all)."""
    readers_per_rank = max(1, num_workers)  # data.num_workers 0: the main process reads
    num_readers = world_size * readers_per_rank
    num_shards = len(manifest.shards_of(cfg.train_split))
    num_streams = cfg.num_streams or default_num_streams(num_shards, num_readers)
    if is_checked and num_streams < num_readers:  # only when set: the default has a stream per reader
        raise UserError(f"data.num_streams {num_streams} < {world_size} ranks x {readers_per_rank} data readers per rank (data.num_workers {num_workers}) = "
                        f"{num_readers}: set data.num_streams >= {num_readers}"
                        + (f" (the train split has {num_shards} shards: write more, smaller shards)" if num_shards < num_readers else "")
                        + " or use fewer ranks / data.num_workers")
    return num_streams


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


def series_batch(fields: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Time-series windows (sharding/timeseries.py): context (B, context_length, input_size) and the rows after
    it, target (B, pred_length, output_size), both float32 and normalised."""
    return {"context": fields["context"].to(device, non_blocking=True), "target": fields["target"].to(device, non_blocking=True)}


# model spec task -> (sample fields -> the model's keyword arguments)
# (signal_forecast: a forecaster reads whole windows and splits off the samples it forecasts itself)
TASK_BATCHES = {"causal_lm": causal_lm_batch, "token_chunks": token_chunks_batch,
                "signal_reconstruction": signal_batch, "signal_forecast": signal_batch, "video_reconstruction": video_batch,
                "series_forecast": series_batch}


def num_tokens(fields: dict[str, torch.Tensor]) -> int:
    """What throughput and MFU count in a micro-batch: the positions a token model reads (T of the
    T+1 stored per sample), every input value of a signal or video model, or the context steps of a
    time-series window (the unit of its num_flops_per_token)."""
    if "tokens" in fields:
        batch_size, stored = fields["tokens"].shape[:2]
        return batch_size * (stored - 1)
    if "context" in fields and "target" in fields:  # (B, context_length, input_size), (B, pred_length, output_size)
        return fields["context"].shape[0] * fields["context"].shape[1]
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


def out_of_vocabulary(tokens: torch.Tensor, vocab_size: int) -> list[tuple[int, int]]:
    """(row, first bad id) of each sample of `tokens` (B, ...) holding an id outside [0, vocab_size); [] if none.

    One min/max over the batch; the rows are looked for only when it fails."""
    low, high = torch.aminmax(tokens)
    if low >= 0 and high < vocab_size:
        return []
    is_bad = (tokens < 0) | (tokens >= vocab_size)
    return [(row, int(tokens[row][is_bad[row]][0])) for row in is_bad.flatten(1).any(1).nonzero().flatten().tolist()]


def _worker_message(error: UserError) -> str:
    """The UserError a DataLoader worker raised: the DataLoader re-raises it with the worker's traceback
    in front ("Caught UserError in DataLoader worker process 0. Original Traceback ... UserError: MESSAGE")."""
    text = str(error).strip()
    if not text.startswith("Caught "):
        return text
    return text.splitlines()[-1].split(f"{UserError.__name__}: ", 1)[-1]


def _keep_numpy(sample: dict[str, Any]) -> dict[str, Any]:
    return sample  # DataLoader would turn arrays into tensors one by one; we stack a batch at once


class Batches:
    """Endless micro-batches of `batch_size` samples for rank `rank` of `world_size`.

    With `cfg.num_workers > 0` the shards are read by DataLoader worker processes; each sample
    carries its stream position and the main process keeps the authoritative loader state, so
    prefetched but unconsumed samples are never counted as seen.

    `vocab_size` (the model's): a sample holding a token id outside [0, vocab_size) is an error
    naming its shard and key, or (cfg.on_corrupt "skip") skipped like a corrupt sample: counted,
    listed in `skip_log`, and replaced by the next sample (it counts as consumed).
    """

    def __init__(self, manifest: Manifest, cfg: DataConfig, split: str, *, batch_size: int,
                 rank: int, world_size: int, seed: int, shuffle: bool, key_log: Path | None = None,
                 num_workers: int | None = None, vocab_size: int | None = None, skip_log: Path | None = None):
        if not split_has_samples(manifest, split):
            raise UserError(f"data.dataset {cfg.dataset}: split '{split}' has no samples")
        self.batch_size = batch_size
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        self.dataset_url, self.on_corrupt, self.vocab_size = cfg.dataset, cfg.on_corrupt, vocab_size
        self.rank, self.world_size = rank, world_size
        self.skip_log = skip_log
        self.num_skipped_shards, self.num_skipped_samples = 0, 0  # this rank's, since the run began (checkpointed)
        self._is_resumed = False  # the skip log may hold lines of steps after the checkpoint
        self.num_streams = resolve_num_streams(cfg, manifest, world_size, self.num_workers, is_checked=split == cfg.train_split)
        common = dict(rank=rank, world_size=world_size, num_streams=self.num_streams, seed=seed, shuffle=shuffle,
                      storage_options=cfg.storage_options, verify=cfg.verify, on_corrupt=cfg.on_corrupt)
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
            return (item for _, _, item in self.loader.iter_with_positions())
        self.tracker = self.dataset.new_state()
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_keep_numpy,
                            prefetch_factor=2 * self.batch_size)
        return iter(loader)

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        (self.dataset if self.num_workers else self.loader).set_epoch(epoch)
        self._iterator = None

    def _next_item(self) -> dict[str, Any] | None:
        try:
            return next(self._iterator, None)
        except UserError as error:
            if not self.num_workers:
                raise
            raise UserError(_worker_message(error)) from None

    def _next_sample(self, step: int | None) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start_iterator()
        # A resumed state may hold this rank's streams in a later epoch (they were read to the end
        # of this one): such epochs yield nothing here, so move on. A fresh epoch that yields
        # nothing means the rank has no data at all (or, with on_corrupt skip, none that is sound).
        num_empty_epochs, num_skipped = 0, 0
        while True:
            item = self._next_item()
            if item is None:
                num_empty_epochs += 1
                if num_empty_epochs == MAX_EMPTY_EPOCHS:
                    break
                self._set_epoch(self.epoch + 1)
                self._iterator = self._start_iterator()
                continue
            if self.num_workers:
                self.tracker.update(item["__stream__"], item["__position__"])
            if SKIPPED not in item:
                return item
            self._skipped(item[SKIPPED], step)
            num_skipped += 1
        if num_skipped:
            raise UserError(f"{self.dataset_url}: every shard and sample of this rank's part of the dataset was skipped as "
                            f"corrupt (data.on_corrupt: skip), see {self.skip_log or 'the log'}")
        raise UserError(f"this rank's part of the dataset is empty: {self.dataset_url} has fewer shards than the "
                        f"{self.world_size} ranks x {max(1, self.num_workers)} data readers (write more, smaller shards, "
                        "or use fewer ranks / data.num_workers)")

    def _skipped(self, report: dict[str, Any], step: int | None) -> None:
        """Count a skipped shard (report["key"] None) or sample, and list it in the skip log."""
        if report["key"] is None:
            self.num_skipped_shards += 1
        else:
            self.num_skipped_samples += 1
        log_skip(report, self.dataset_url)
        if self.skip_log is not None:
            with open(self.skip_log, "a") as handle:
                handle.write(json.dumps({**report, "step": step, "epoch": self.epoch}) + "\n")

    def _drop_out_of_vocabulary(self, samples: list[dict[str, Any]], fields: dict[str, torch.Tensor],
                                step: int | None) -> list[int]:
        """Rows of `samples` holding token ids the model has no embedding for (skipped), [] if none;
        under on_corrupt "error", a UserError naming the first one's shard, key and id."""
        if self.vocab_size is None or "tokens" not in fields:
            return []
        bad = out_of_vocabulary(fields["tokens"], self.vocab_size)
        for row, token_id in bad:
            sample = samples[row]
            reason = f"token id {token_id} outside the model's vocabulary [0, {self.vocab_size})"
            if self.on_corrupt == "error":
                raise UserError(f"shard {sample.get('__shard__')} of {self.dataset_url}: sample {sample['__key__']}, field tokens: "
                                f"{reason}; rebuild the dataset with `tokfleet prepare`, or set data.on_corrupt: skip to train without it")
            self._skipped({"shard": sample.get("__shard__"), "key": sample["__key__"], "reason": f"field tokens: {reason}"}, step)
        return [row for row, _ in bad]

    def _forget_steps_from(self, step: int | None) -> None:
        """After a resume: drop skip-log lines of steps from `step` on (written by a run that did not checkpoint them)."""
        if not self._is_resumed or step is None or self.skip_log is None:
            return
        self._is_resumed = False
        stale = [self.skip_log]
        if self.rank == 0:  # ranks that no longer exist (resumed on fewer)
            stale += [p for p in self.skip_log.parent.glob("skipped-rank*.jsonl") if int(p.stem.rsplit("rank", 1)[1]) >= self.world_size]
        for path in stale:
            truncate_jsonl(path, step - 1)

    def next_batch(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """The micro-batch's array fields stacked, e.g. {"tokens": (B, T+1) int64}."""
        self._forget_steps_from(step)
        samples, epochs = [], []
        while True:
            while len(samples) < self.batch_size:
                samples.append(self._next_sample(step))
                epochs.append(self.epoch)  # a batch may straddle the end of an epoch
            fields = collate(samples)
            bad = self._drop_out_of_vocabulary(samples, fields, step)
            if not bad:
                break
            samples = [s for row, s in enumerate(samples) if row not in bad]
            epochs = [e for row, e in enumerate(epochs) if row not in bad]
        if self.key_log is not None:
            with open(self.key_log, "a") as handle:
                for epoch in sorted(set(epochs)):
                    keys = [s["__key__"] for s, e in zip(samples, epochs) if e == epoch]
                    handle.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
        return fields

    def take(self, num_batches: int) -> list[dict[str, torch.Tensor]]:
        """The first `num_batches` full batches of a pass, read in-process (validation: the same set every time)."""
        assert self.num_workers == 0, "take() reads in the main process"
        samples, reader, wanted = [], iter(self.loader), num_batches * self.batch_size
        while len(samples) < wanted:
            chunk = list(itertools.islice(reader, wanted - len(samples)))
            if not chunk:
                break
            bad = self._drop_out_of_vocabulary(chunk, collate(chunk), None)
            samples += [s for row, s in enumerate(chunk) if row not in bad]
        size = self.batch_size
        return [collate(samples[i:i + size]) for i in range(0, len(samples) - size + 1, size)]

    def num_skipped(self) -> dict[str, int]:
        """{"skipped_shards", "skipped_samples"}: what every rank skipped since the run began (a collective
        under on_corrupt skip: every rank calls it)."""
        counts = [self.num_skipped_shards, self.num_skipped_samples]
        if self.on_corrupt == "skip":
            total = distributed.all_reduce_mean(torch.tensor(counts, dtype=torch.float64)) * distributed.world_size()
            counts = [int(round(value)) for value in total.tolist()]
        return {"skipped_shards": counts[0], "skipped_samples": counts[1]}

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def streams(self) -> list[int]:
        """The loader streams this rank's readers own."""
        return streams_of_rank(self.num_streams, self.rank, self.world_size, self.readers_per_rank)

    def state_dict(self) -> dict[str, Any]:
        loader_state = self.tracker.state_dict() if self.num_workers else self.loader.state_dict()
        if self.num_skipped_shards or self.num_skipped_samples:  # with the positions: merge_states sums them
            loader_state["skipped"] = {"shards": self.num_skipped_shards, "samples": self.num_skipped_samples}
        return {"epoch": self.epoch, "loader": loader_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state`: this rank's own, or (another world size) one holding at least this rank's
        streams; its skip counts are this rank's to carry on (at another world size: the total on rank 0,
        none on the others, so that the sum over ranks stays right)."""
        self._set_epoch(state["epoch"])
        if self.num_workers:
            self.dataset.load_state_dict(state["loader"])
            self.tracker = self.dataset.new_state()  # state_dict() before the first read says where the state does
        else:
            self.loader.load_state_dict(state["loader"])
        skipped = state["loader"].get("skipped", {})
        self.num_skipped_shards, self.num_skipped_samples = skipped.get("shards", 0), skipped.get("samples", 0)
        self._is_resumed = True
