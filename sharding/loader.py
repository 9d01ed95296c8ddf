"""The resumable, elastic per-rank shard loader.

The shards of a split are dealt, per (seed, epoch), into `num_streams` logical streams that do
not depend on the world size: in the epoch's shuffled shard order, stream s gets the shards at
positions i with i % num_streams == s. Reader (rank r, worker w) of W ranks x w workers owns
the streams i with i % (W*w) == r*w + worker. Within a shard, samples are visited in a
per-(seed, epoch, shard) permutation.

A reader interleaves its streams by a rule of the positions alone: the next sample comes from
the unfinished stream with the fewest consumed samples (ties: lowest stream index). The state
is therefore just the per-stream positions, `{stream: [shard_in_stream, offset]}` plus epoch
and seed, and:
- the same readers resume from it exactly (same order as if never interrupted);
- states of all readers merged (`merge_states`) resume at any other world size or worker
  count, every remaining sample read exactly once.

Readers finish an epoch at different times (their shares differ by up to a shard), so a
reader that is done starts the next epoch while others are still in the current one. A merged
state then has streams in two epochs: `epoch` is the earliest, and `stream_epochs` names the
streams whose position lies in a later epoch; in the earlier epochs those streams count as
read to the end. Nothing of either epoch is lost or read twice.

    loader = ShardLoader(manifest, url, "train", rank=r, world_size=W, num_streams=64, seed=s)
    loader.set_epoch(epoch)
    for sample in loader:                 # {"__key__": str, "tokens": (seq_len + 1,) array}
        ...
    state = loader.state_dict()           # samples yielded so far

With a torch DataLoader and worker processes, use `ShardIterableDataset`: its samples carry
`__stream__` and `__position__`, which a `LoaderState` in the main process applies as batches
are consumed, so the authoritative state never depends on what workers prefetched.

Data is verified where it is read: with `verify` (the default) the bytes of each shard are
checked against the manifest's size and sha256 when the process first reads that shard (the
whole shard is in memory anyway; hashing runs at ~1 GB/s, decoding at tens of MB/s), and every
sample is checked against the manifest's fields (dtype, shape) as it is decoded. A corrupt shard
or sample is a UserError naming the dataset, the shard and the sample key; with
`on_corrupt="skip"` it is skipped instead: the stream moves past it exactly as if it had been
read (a shard: to the next shard; a sample: one on), so fresh runs and resumes agree, and
`iter_with_positions` yields a marker `{"__skipped__": {"shard", "key", "reason"}}` in its place
(`__iter__` logs it) for the consumer to count and list. A state may carry such counts as
`skipped` ({"shards": n, "samples": m}): `merge_states` sums them.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from core.errors import UserError
from sharding import storage
from sharding.manifest import Manifest, ShardRecord
from sharding.shards import CorruptSample, decode_sample, field_specs, split_samples

log = logging.getLogger("tokfleet.data")

_SHARD_ORDER, _SAMPLE_ORDER = 0, 1  # keep the two kinds of permutation independent


ON_CORRUPT = ("error", "skip")
SKIPPED = "__skipped__"  # the key of a skip marker in place of a sample
_verified: set[tuple[str, str, str, int]] = set()  # (dataset, shard, sha256, bytes) checked in this process


def forget_verified_shards() -> None:
    """Check every shard again on its next read (benchmarks; a test that rewrites shards in place)."""
    _verified.clear()


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([value % (1 << 63) for value in entropy])


STREAMS_PER_READER = 64  # the default's cap: a reader interleaves its streams, holding one shard of each in memory


def default_num_streams(num_shards: int, num_readers: int) -> int:
    """One stream per shard, at least one per reader and at most STREAMS_PER_READER per reader: every
    reader's share of an epoch is then within one shard of the others' (each stream holds one shard, or
    the readers divide the streams), and a reader holds at most STREAMS_PER_READER shards in memory. With
    fewer shards than readers the extra readers' streams are empty (they idle; a rank with no data at all
    stops at its first read, naming the shard count)."""
    return max(1, num_readers, min(num_shards, STREAMS_PER_READER * num_readers))


def streams_of_reader(num_streams: int, reader: int, num_readers: int) -> list[int]:
    return list(range(reader, num_streams, num_readers))


def streams_of_rank(num_streams: int, rank: int, world_size: int, readers_per_rank: int) -> list[int]:
    """The streams the `readers_per_rank` readers (data workers) of `rank` own, sorted."""
    num_readers = world_size * readers_per_rank
    return sorted(stream for reader in range(rank * readers_per_rank, (rank + 1) * readers_per_rank)
                  for stream in streams_of_reader(num_streams, reader, num_readers))


def ranks_holding(streams: Iterable[int], world_size: int, readers_per_rank: int) -> list[int]:
    """The ranks of a `world_size` x `readers_per_rank` layout whose readers own `streams`, sorted."""
    num_readers = world_size * readers_per_rank
    return sorted({(stream % num_readers) // readers_per_rank for stream in streams})


def _checked_header(state: dict[str, Any], num_streams: int, seed: int) -> None:
    if state.get("num_streams") != num_streams:
        raise ValueError(f"loader state has num_streams={state.get('num_streams')}, this loader {num_streams}: keep data.num_streams fixed for a dataset")
    if state.get("seed") != seed:
        raise ValueError(f"loader state has seed={state.get('seed')}, this loader {seed}")


def _own_positions(state: dict[str, Any], streams: list[int]) -> dict[int, list[int]]:
    """This reader's positions out of `state`."""
    positions = _positions(state)
    missing = [stream for stream in streams if stream not in positions]
    if missing:
        raise ValueError(
            f"loader state has no position for streams {missing[:8]}{'...' if len(missing) > 8 else ''}: "
            "to resume at another world size, load the merge_states() of every rank's state"
        )
    return {stream: positions[stream] for stream in streams}


def _positions(state: dict[str, Any]) -> dict[int, list[int]]:
    """`state`'s positions with int keys (JSON turns stream keys into strings)."""
    return {int(stream): [int(p) for p in position] for stream, position in state["positions"].items()}


def stream_epochs(state: dict[str, Any]) -> dict[int, int]:
    """The epoch of every stream's position in `state` (most states: all the same)."""
    epoch = int(state["epoch"])
    later = {int(stream): int(e) for stream, e in state.get("stream_epochs", {}).items()}
    return {int(stream): later.get(int(stream), epoch) for stream in state["positions"]}


def _state(epoch: int, seed: int, num_streams: int, positions: dict[int, list[int]], epochs: dict[int, int]) -> dict[str, Any]:
    state = {"epoch": epoch, "seed": seed, "num_streams": num_streams,
             "positions": {stream: list(positions[stream]) for stream in sorted(positions)}}
    later = {stream: e for stream, e in sorted(epochs.items()) if e != epoch}
    if later:
        state["stream_epochs"] = later
    return state


def advance_state(state: dict[str, Any] | None, epoch: int) -> dict[str, Any] | None:
    """`state` as seen from the start of a later `epoch`: streams whose position is in an earlier
    epoch start afresh; streams already in `epoch` or beyond keep their positions."""
    if state is None or int(state["epoch"]) == epoch:
        return state
    assert epoch > int(state["epoch"]), f"cannot go back from epoch {state['epoch']} to {epoch}"
    epochs = stream_epochs(state)
    positions = {stream: (position if epochs[stream] >= epoch else [0, 0]) for stream, position in _positions(state).items()}
    return _state(epoch, state["seed"], state["num_streams"], positions, {s: max(e, epoch) for s, e in epochs.items()})


def _split_by_epoch(state: dict[str, Any], streams: list[int]) -> tuple[dict[int, list[int]], dict[int, tuple[int, list[int]]]]:
    """`streams`' positions in `state`: (those in its epoch, {stream: (later epoch, position)} for the rest)."""
    positions, epochs, epoch = _own_positions(state, streams), stream_epochs(state), int(state["epoch"])
    now = {stream: position for stream, position in positions.items() if epochs[stream] == epoch}
    later = {stream: (epochs[stream], position) for stream, position in positions.items() if epochs[stream] > epoch}
    return now, later


def _reached(later: dict[int, tuple[int, list[int]]], epoch: int) -> dict[int, list[int]]:
    """Take the streams of `later` whose epoch is `epoch` out of it (and forget any earlier ones)."""
    reached = {stream: position for stream, (e, position) in later.items() if e == epoch}
    for stream in [stream for stream, (e, _) in later.items() if e <= epoch]:
        del later[stream]
    return reached


def _state_with_later(epoch: int, seed: int, num_streams: int, positions: dict[int, list[int]],
                      later: dict[int, tuple[int, list[int]]]) -> dict[str, Any]:
    positions = {stream: list(position) for stream, position in positions.items()}
    epochs = {stream: epoch for stream in positions}
    for stream, (later_epoch, position) in later.items():
        positions[stream], epochs[stream] = list(position), later_epoch
    return _state(epoch, seed, num_streams, positions, epochs)


def select_streams(state: dict[str, Any], streams: Iterable[int]) -> dict[str, Any]:
    """`state` (a merge_states() of several readers' states) cut down to `streams`: its epoch the earliest of
    theirs, without skip counts (they belong to the readers that wrote them)."""
    positions, epochs = _own_positions(state, sorted(set(streams))), stream_epochs(state)
    kept = {stream: epochs[stream] for stream in positions}
    return _state(min(kept.values(), default=int(state["epoch"])), state["seed"], state["num_streams"], positions, kept)


def merge_states(states: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One state covering the streams of all `states` (e.g. every rank's): loadable at any world size.

    The states may be in different epochs (a reader that finished its share early has moved on).
    """
    states = list(states)
    if not states:
        raise ValueError("merge_states needs at least one state")
    first = states[0]
    positions: dict[int, list[int]] = {}
    epochs: dict[int, int] = {}
    for state in states:
        for key in ("seed", "num_streams"):
            if state.get(key) != first.get(key):
                raise ValueError(f"cannot merge loader states with different {key}: {first.get(key)} and {state.get(key)}")
        state_epochs = stream_epochs(state)
        for stream, position in _positions(state).items():
            epoch = state_epochs[stream]
            if stream in positions and (positions[stream], epochs[stream]) != (position, epoch):
                raise ValueError(f"stream {stream} has two different positions: {positions[stream]} (epoch {epochs[stream]}) "
                                 f"and {position} (epoch {epoch})")
            positions[stream], epochs[stream] = position, epoch
    merged = _state(min(epochs.values()), first["seed"], first["num_streams"], positions, epochs)
    skipped = {kind: sum(state.get("skipped", {}).get(kind, 0) for state in states) for kind in ("shards", "samples")}
    if any(skipped.values()):
        merged["skipped"] = skipped
    return merged


class ShardLoader:
    """One epoch of one reader's samples, in an order fixed by (seed, epoch) and resumable from `state_dict()`."""

    def __init__(
        self,
        manifest: Manifest,
        dataset_url: str,
        split: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        worker_id: int = 0,
        num_streams: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        storage_options: dict[str, Any] | None = None,
        verify: bool = True,
        on_corrupt: str = "error",
    ):
        if not 0 <= rank < world_size or not 0 <= worker_id < num_workers:
            raise ValueError(f"need 0 <= rank < world_size and 0 <= worker_id < num_workers, got rank {rank}/{world_size}, worker {worker_id}/{num_workers}")
        if num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {num_streams}")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.shards: list[ShardRecord] = manifest.shards_of(split)
        if not self.shards:
            raise UserError(f"{dataset_url}: the manifest has no shards in split {split!r}")
        self.dataset_url = dataset_url
        self.num_streams = num_streams
        self.seed = seed
        self.shuffle = shuffle
        self.storage_options = storage_options
        self.verify, self.on_corrupt = verify, on_corrupt
        self.fields = field_specs(manifest.fields)
        self.streams = streams_of_reader(num_streams, rank * num_workers + worker_id, world_size * num_workers)
        self._loaded: dict[int, tuple[list, np.ndarray] | dict] = {}  # shard id -> (samples in file order, visiting order) or a skip report
        self._later: dict[int, tuple[int, list[int]]] = {}  # loaded streams already in a later epoch: (epoch, position)
        self._start_epoch(0)

    # ----------------------------------------------------------- order

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        num_shards = len(self.shards)
        order = _rng(self.seed, epoch, _SHARD_ORDER).permutation(num_shards) if self.shuffle else np.arange(num_shards)
        # stream -> shard ids (positions in self.shards), in reading order
        self._stream_shards = {stream: order[stream :: self.num_streams].tolist() for stream in self.streams}
        self._positions = {stream: [0, 0] for stream in self.streams}
        self._loaded.clear()
        for stream, position in _reached(self._later, epoch).items():
            self._positions[stream] = self._checked(stream, position)
        for stream in self._later:  # its reader had read it to the end of this epoch and moved on
            self._positions[stream] = [len(self._stream_shards[stream]), 0]

    def _checked(self, stream: int, position: list[int]) -> list[int]:
        shard_ids = self._stream_shards[stream]
        shard_in_stream, offset = position
        is_end = shard_in_stream == len(shard_ids) and offset == 0
        if not is_end and not (0 <= shard_in_stream < len(shard_ids) and 0 <= offset <= self.shards[shard_ids[shard_in_stream]].num_samples):
            raise ValueError(f"loader state position {position} of stream {stream} does not fit this dataset")
        return [shard_in_stream, offset]

    def _sample_order(self, shard_id: int) -> np.ndarray:
        num_samples = self.shards[shard_id].num_samples
        if not self.shuffle:
            return np.arange(num_samples)
        return _rng(self.seed, self.epoch, _SAMPLE_ORDER, shard_id).permutation(num_samples)

    def _consumed(self, stream: int) -> int:
        shard_in_stream, offset = self._positions[stream]
        return sum(self.shards[i].num_samples for i in self._stream_shards[stream][:shard_in_stream]) + offset

    def _skip_finished_shards(self, stream: int) -> None:
        """Move past shards fully read (or empty) so a position always points at a sample or the end."""
        shard_ids = self._stream_shards[stream]
        shard_in_stream, offset = self._positions[stream]
        while shard_in_stream < len(shard_ids) and offset >= self.shards[shard_ids[shard_in_stream]].num_samples:
            self._loaded.pop(shard_ids[shard_in_stream], None)
            shard_in_stream, offset = shard_in_stream + 1, 0
        self._positions[stream] = [shard_in_stream, offset]

    def _is_finished(self, stream: int) -> bool:
        return self._positions[stream][0] >= len(self._stream_shards[stream])

    def _corrupt(self, shard: ShardRecord, reason: str, key: str | None = None, field: str | None = None) -> dict[str, Any]:
        """Under on_corrupt "error", the UserError naming the shard (and sample); else the skip report."""
        where = f"shard {shard.name} of {self.dataset_url}" + (f": sample {key}" if key is not None else "")
        where += f", field {field}" if field is not None else ""
        if self.on_corrupt == "error":
            raise UserError(f"{where}: {reason}; rebuild it with `tokfleet prepare`, or set data.on_corrupt: skip to train without it")
        return {"shard": shard.name, "key": key, "reason": f"field {field}: {reason}" if field is not None else reason}

    def _shard_problem(self, shard: ShardRecord, data: bytes) -> str | None:
        """What is wrong with `data` as the manifest's `shard` (size, sha256; once per shard and process)."""
        checked = (self.dataset_url, shard.name, shard.sha256, shard.num_bytes)
        if checked in _verified:
            return None
        if len(data) != shard.num_bytes:
            return f"{len(data)} bytes, the manifest records {shard.num_bytes} (truncated or changed since `tokfleet prepare`)"
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            return "sha256 differs from the manifest (corrupt or changed since `tokfleet prepare`)"
        _verified.add(checked)
        return None

    def _load(self, shard_id: int) -> tuple[list, np.ndarray] | dict[str, Any]:
        """(samples in file order, visiting order) of a shard, or (on_corrupt "skip") the report of why it is skipped."""
        if shard_id not in self._loaded:
            shard = self.shards[shard_id]
            url = storage.join(self.dataset_url, shard.name)
            try:
                data = storage.read_bytes(url, self.storage_options)
            except FileNotFoundError:
                self._loaded[shard_id] = self._corrupt(shard, "missing")
                return self._loaded[shard_id]
            # storage's UserErrors (credentials, bucket) are no fault of the shard: they propagate
            problem = self._shard_problem(shard, data) if self.verify else None
            if problem is None:
                try:
                    samples = split_samples(data)
                except ValueError as error:
                    problem = str(error)
                else:
                    if len(samples) != shard.num_samples:
                        problem = f"{len(samples)} samples, the manifest records {shard.num_samples}"
            self._loaded[shard_id] = self._corrupt(shard, problem) if problem else (samples, self._sample_order(shard_id))
        return self._loaded[shard_id]

    # -------------------------------------------------------- iterate

    def iter_with_positions(self) -> Iterator[tuple[int, list[int], dict[str, Any]]]:
        """(stream, position after this sample, sample) for the rest of the epoch; a skipped shard or
        sample (on_corrupt "skip") comes as (stream, position after it, {"__skipped__": report})."""
        for stream in self.streams:
            self._skip_finished_shards(stream)
        heap = [(self._consumed(stream), stream) for stream in self.streams if not self._is_finished(stream)]
        heapq.heapify(heap)
        while heap:
            consumed, stream = heapq.heappop(heap)
            shard_in_stream, offset = self._positions[stream]
            shard_id = self._stream_shards[stream][shard_in_stream]
            loaded = self._load(shard_id)
            if isinstance(loaded, dict):  # skipped whole: the rest of the shard counts as read
                self._positions[stream] = [shard_in_stream, self.shards[shard_id].num_samples]
                self._skip_finished_shards(stream)
                if not self._is_finished(stream):
                    heapq.heappush(heap, (self._consumed(stream), stream))
                yield stream, list(self._positions[stream]), {SKIPPED: loaded}
                continue
            samples, order = loaded
            key, fields = samples[order[offset]]
            self._positions[stream] = [shard_in_stream, offset + 1]
            self._skip_finished_shards(stream)
            if not self._is_finished(stream):
                heapq.heappush(heap, (consumed + 1, stream))
            try:
                sample = decode_sample(key, fields, self.fields)
            except CorruptSample as error:
                sample = {SKIPPED: self._corrupt(self.shards[shard_id], error.reason, key, error.field)}
            else:
                sample["__shard__"] = self.shards[shard_id].name
            yield stream, list(self._positions[stream]), sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The samples alone; skipped shards and samples (on_corrupt "skip") are logged."""
        for _, _, sample in self.iter_with_positions():
            if SKIPPED in sample:
                log_skip(sample[SKIPPED], self.dataset_url)
            else:
                yield sample

    def __len__(self) -> int:
        """Samples this reader yields in a whole epoch."""
        return sum(self.shards[i].num_samples for shard_ids in self._stream_shards.values() for i in shard_ids)

    def num_remaining(self) -> int:
        return len(self) - sum(self._consumed(stream) for stream in self.streams)

    # ----------------------------------------------------------- state

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning; the current epoch (e.g. just loaded) is kept as is."""
        if epoch != self.epoch:
            self._start_epoch(epoch)

    def rewind(self) -> None:
        """Back to the start of the current epoch (e.g. to validate on the same samples every time)."""
        self._later = {}
        self._start_epoch(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        return _state_with_later(self.epoch, self.seed, self.num_streams, self._positions, self._later)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state`: this reader's own state, or a merge_states() of several readers'."""
        _checked_header(state, self.num_streams, self.seed)
        now, self._later = _split_by_epoch(state, self.streams)
        self._start_epoch(int(state["epoch"]))
        for stream, position in now.items():
            self._positions[stream] = self._checked(stream, position)


def log_skip(report: dict[str, Any], dataset_url: str) -> None:
    what = f"sample {report['key']} of shard {report['shard']}" if report["key"] is not None else f"shard {report['shard']}"
    log.warning("skipped %s of %s: %s", what, dataset_url, report["reason"])


class LoaderState:
    """The state of a rank whose samples come from DataLoader workers; same format as ShardLoader's.

    Apply each consumed sample's (`__stream__`, `__position__`) with `update` / `update_batch`.
    """

    def __init__(self, num_streams: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 1):
        self.num_streams = num_streams
        self.seed = seed
        self.streams = streams_of_rank(num_streams, rank, world_size, num_workers)
        self.later: dict[int, tuple[int, list[int]]] = {}  # loaded streams already in a later epoch: (epoch, position)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; streams of a loaded state that are already in it keep their positions."""
        self.epoch = epoch
        self.positions = {stream: [0, 0] for stream in self.streams}
        self.positions.update(_reached(self.later, epoch))

    def update(self, stream: int, position: Iterable[int]) -> None:
        self.positions[int(stream)] = [int(p) for p in position]

    def update_batch(self, batch: dict[str, Any]) -> None:
        """Apply a collated batch: `__stream__` (B,), `__position__` (B, 2), in sample order."""
        streams = np.asarray(batch["__stream__"]).reshape(-1)
        positions = np.asarray(batch["__position__"]).reshape(-1, 2)
        for stream, position in zip(streams.tolist(), positions.tolist()):
            self.update(stream, position)

    def state_dict(self) -> dict[str, Any]:
        return _state_with_later(self.epoch, self.seed, self.num_streams, self.positions, self.later)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checked_header(state, self.num_streams, self.seed)
        now, self.later = _split_by_epoch(state, self.streams)
        self.set_epoch(int(state["epoch"]))
        self.positions.update(now)


class ShardIterableDataset(torch.utils.data.IterableDataset):
    """ShardLoader for a torch DataLoader: each worker process reads its own streams.

    Samples carry `__stream__` (int) and `__position__` ((2,) int64 array) for the main
    process's `LoaderState`; so do the skip markers of on_corrupt "skip", which the consumer must
    apply like samples (the position moves past what was skipped) and not train on. Call `set_epoch` / `load_state_dict` before creating the
    DataLoader iterator (workers copy the dataset then; don't use persistent_workers).
    """

    def __init__(
        self,
        manifest: Manifest,
        dataset_url: str,
        split: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        num_streams: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        storage_options: dict[str, Any] | None = None,
        verify: bool = True,
        on_corrupt: str = "error",
    ):
        self.manifest = manifest
        self.dataset_url = dataset_url
        self.split = split
        self.rank, self.world_size = rank, world_size
        self.num_readers_per_rank = max(1, num_workers)  # the DataLoader's num_workers (0: the main process reads)
        self.num_streams, self.seed, self.shuffle = num_streams, seed, shuffle
        self.storage_options = storage_options
        self.verify, self.on_corrupt = verify, on_corrupt
        self.epoch = 0
        self.state: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.state = epoch, advance_state(self.state, epoch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.state = int(state["epoch"]), state

    def new_state(self) -> LoaderState:
        """A LoaderState for this rank, starting where the next iteration starts."""
        tracker = LoaderState(self.num_streams, self.seed, self.rank, self.world_size, self.num_readers_per_rank)
        tracker.set_epoch(self.epoch)
        if self.state is not None:
            tracker.load_state_dict(self.state)
        return tracker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_readers_per_rank:
            raise ValueError(f"ShardIterableDataset was built for {self.num_readers_per_rank} readers per rank, the DataLoader runs {num_workers}")
        loader = ShardLoader(
            self.manifest, self.dataset_url, self.split, rank=self.rank, world_size=self.world_size,
            num_workers=num_workers, worker_id=worker_id, num_streams=self.num_streams, seed=self.seed,
            shuffle=self.shuffle, storage_options=self.storage_options, verify=self.verify, on_corrupt=self.on_corrupt,
        )
        loader.set_epoch(self.epoch)
        if self.state is not None:
            loader.load_state_dict(self.state)
        for stream, position, sample in loader.iter_with_positions():
            sample["__stream__"] = stream
            sample["__position__"] = np.asarray(position, dtype=np.int64)
            yield sample
