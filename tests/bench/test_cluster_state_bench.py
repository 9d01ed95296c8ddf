"""Benchmark: the resume state of a cluster-sized run, by simulation in one process with tokfleet's own
loader, loader state, RNG state and per-rank state files; shard reading is replaced by integer keys.

1. Size and cost of a checkpoint's resume state at 256 / 1,024 / 4,096 ranks x 8 data workers on a
   dataset of 200,000 shards x 1,000 samples (`data.num_streams` unset: its default for the world).
   Each rank's state is a real `LoaderState` (the main-process tracker of a rank with workers) whose
   streams have read a few samples, plus the process's real `rng_state()`. Before (the single-file
   layout of the main branch, rebuilt here from the same states): `trainer_state.json` holds every
   rank's loader state, RNG and losses, every rank all_gathers every rank's state (pickled) at every
   save and parses the whole file on resume; its save is json.dumps(indent=1) + write on rank 0. After:
   each rank serializes and writes its own two files (trainer/resume_state.py); rank 0 gathers a digest
   per rank and writes a small trainer_state.json. "save" is what rank 0 does (its own parts, the digest
   over W digests, trainer_state.json; its own parts are timed as the median rank's); the other ranks write
   theirs at the same time. "reads on
   resume" is what `read_rank_resume` opens (plus trainer_state.json), measured on ranks 0, W/2 and W-1
   for a same-size resume and on 3W/4 ranks x 4 workers for an elastic one (largest of the ranks tried).
   Not counted on either side: the engine's files and the COMPLETE marker (CheckpointManager's).
2. Exactly once: a 2M-sample epoch (40,000 shards x 50 samples) read by 4,096 ranks x 8 workers, then
   3,072 x 4, then 5,000 x 6 until its end, with a checkpoint (per-rank files on disk) and a resume
   between the phases: every rank resumes through `read_rank_resume`, its readers are real
   `ShardLoader`s whose shard reads return integer keys, and a `LoaderState` per rank tracks what was
   consumed, as `Batches` does with workers. Every sample must be read exactly once.

Numbers: tests/bench/results/cluster_state.json, and the tables printed at the end.

    make bench   (or: python -m pytest -s tests/bench/test_cluster_state_bench.py)
"""

from __future__ import annotations

import json
import pickle
import statistics
import time
from functools import cached_property
from pathlib import Path

import numpy as np

from sharding.loader import LoaderState, ShardLoader, default_num_streams
from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord
from trainer.resume_state import parts_summary, rank_parts, read_rank_resume
from trainer.rng import rng_state

RESULTS = Path(__file__).parent / "results"
SEED = 3
WORKERS = 8
TABLE_WORLDS = (256, 1024, 4096)
TABLE_SHARDS, TABLE_SAMPLES = 200_000, 1_000
EPOCH_SHARDS, EPOCH_SAMPLES = 40_000, 50  # 2M samples
PHASES = ((4096, 8, 20), (3072, 4, 40), (5000, 6, None))  # ranks, workers, samples per reader (None: to the end)
STEP = 100
LOSS_WINDOW = [2.5] * 10  # a rank's step losses since the last metrics record (logging every 10 steps)


class KeyManifest(Manifest):
    """A manifest of equal shards that are never read: their samples are integer keys."""

    @cached_property
    def _train(self) -> list[ShardRecord]:
        return [shard for shard in self.shards if shard.split == "train"]

    def shards_of(self, split: str) -> list[ShardRecord]:
        return self._train if split == "train" else []


def key_manifest(num_shards: int, num_samples: int) -> KeyManifest:
    shards = [ShardRecord(f"sim-{i:06d}.tar", "train", num_samples, 1, "0") for i in range(num_shards)]
    return KeyManifest(format_version=FORMAT_VERSION, name="sim", kind="text_tokens", seq_len=8, vocab_size=10, fields={},
                       shards=shards, tokenizer={}, sources={}, skipped=[], stats={}, created_by={})


class KeyLoader(ShardLoader):
    """ShardLoader whose shard i holds the samples i * num_samples + j (the keys), in its usual visiting order."""

    def _load(self, shard_id: int):
        if shard_id not in self._loaded:
            size = self.shards[shard_id].num_samples
            self._loaded[shard_id] = ([(shard_id * size + j, {}) for j in range(size)], self._sample_order(shard_id))
        return self._loaded[shard_id]


def trainer_state(world_size: int, summary: dict | None, legacy: dict | None = None) -> dict:
    """Rank 0's trainer_state.json of a gpt run: after (the parts summary) or before (`legacy`: every rank's state)."""
    from core.config import TrainConfig
    from core.redact import public_dict
    from core.schema import from_dict

    cfg = from_dict(TrainConfig, {"run": {"output_dir": "runs/sim"}, "model": {"name": "gpt", "flavor": "small"},
                                  "data": {"dataset": "s3://bucket/sim", "num_workers": WORKERS}})
    state = {"step": STEP, "max_steps": 10_000, "epochs": 0.1, "tokens": 1 << 30, "samples": 1 << 20, "world_size": world_size,
             "engine": "deepspeed", "format": "deepspeed", "engine_info": {"zero_stage": 3},
             "data": {"manifest_id": "0123456789abcdef", "dataset": "s3://bucket/sim", "skipped": {"shards": 0, "samples": 0}},
             "rank_states": summary, "loss_window": LOSS_WINDOW, "report_window": {}, "best": None,
             "model": {"name": "gpt", "flavor": "small", "args": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304}},
             "token_grid": None, "tokenizer": None, "config": public_dict(cfg)}
    if legacy is not None:
        del state["rank_states"]
        state.update(legacy)
    return state


def rank_tracker(num_streams: int, rank: int, world_size: int) -> LoaderState:
    """A rank's tracker after its workers' streams read a few samples each (different per stream)."""
    tracker = LoaderState(num_streams, SEED, rank, world_size, WORKERS)
    for stream in tracker.streams:
        tracker.update(stream, [0, 1 + stream % 997])
    return tracker


def measure_world(world_size: int, directory: Path) -> dict:
    num_streams = default_num_streams(TABLE_SHARDS, world_size * WORKERS)
    rng = rng_state()
    datas = [{"epoch": 0, "loader": rank_tracker(num_streams, rank, world_size).state_dict()} for rank in range(world_size)]

    # after: every rank's parts (serialized, hashed, written); rank 0's digest over all and trainer_state.json
    trainer_state(1, None)  # imports the config modules: not part of a save
    directory.mkdir(parents=True)
    part_times, digests = [], []
    for rank, data in enumerate(datas):
        start = time.perf_counter()
        parts = rank_parts(rank, world_size, STEP, data, LOSS_WINDOW, rng)
        digests.append(parts.sha256)
        parts.write(directory)
        part_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    state = trainer_state(world_size, parts_summary(digests, WORKERS, num_streams))
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=1))
    rank0_save = statistics.median(part_times) + time.perf_counter() - start  # a typical rank's own parts, then rank 0's
    state_bytes = (directory / "trainer_state.json").stat().st_size

    def reads(rank: int, new_world: int, new_workers: int) -> int:
        tracker = LoaderState(num_streams, SEED, rank, new_world, new_workers)
        parsed = json.loads((directory / "trainer_state.json").read_text())
        resume = read_rank_resume(directory, parsed, rank, new_world, new_workers, tracker.streams)
        tracker.load_state_dict(resume.data["loader"])
        return state_bytes + resume.num_bytes

    same = max(reads(rank, world_size, WORKERS) for rank in (0, world_size // 2, world_size - 1))
    sampled = range(0, world_size, world_size // 64)  # 64 ranks' reads, times W: the cluster's
    elastic_world = world_size * 3 // 4
    elastic = max(reads(rank, elastic_world, 4) for rank in (0, elastic_world // 2, elastic_world - 1))

    # before: every rank's state in one trainer_state.json, all_gathered by every rank
    legacy = {"rng": [rng] * world_size, "loss_window": [LOSS_WINDOW] * world_size}
    legacy_data = {"manifest_id": "0123456789abcdef", "dataset": "s3://bucket/sim", "rank_states": datas}
    # all_gather_object pickles each rank's object on its own: every rank receives all W of them
    gathered = sum(len(pickle.dumps(data)) for data in datas) + world_size * (len(pickle.dumps(rng)) + len(pickle.dumps(LOSS_WINDOW)))
    start = time.perf_counter()
    old = trainer_state(world_size, None, {**legacy, "data": legacy_data})
    text = json.dumps(old, indent=1)
    (directory / "trainer_state.old.json").write_text(text)
    old_save = time.perf_counter() - start
    old_bytes = len(text.encode())
    own = sum((directory / name).stat().st_size for name in ("ranks/state-rank00000.json", "ranks/rng-rank00000.json"))
    return {
        "ranks": world_size, "num_streams": num_streams,
        "before": {"trainer_state_bytes": old_bytes, "read_per_rank_bytes": old_bytes, "gathered_per_rank_bytes": gathered,
                   "cluster_read_bytes": old_bytes * world_size, "cluster_gathered_bytes": gathered * world_size,
                   "save_s": old_save},
        "after": {"trainer_state_bytes": state_bytes, "own_parts_bytes": own, "read_per_rank_bytes": same,
                  "elastic_read_per_rank_bytes": elastic, "gathered_per_rank_bytes": len(pickle.dumps(digests[0])),
                  "gathered_at_rank0_bytes": len(pickle.dumps(digests[0])) * world_size,
                  "cluster_read_bytes": round(statistics.mean(reads(rank, world_size, WORKERS) for rank in sampled) * world_size),
                  "save_s": rank0_save, "part_save_s_median": statistics.median(part_times), "part_save_s_max": max(part_times)},
    }


def run_phases(directory: Path) -> dict:
    """The 2M-sample epoch over three layouts; per key the times it was read."""
    manifest = key_manifest(EPOCH_SHARDS, EPOCH_SAMPLES)
    counts = np.zeros(EPOCH_SHARDS * EPOCH_SAMPLES, dtype=np.int32)
    num_streams = default_num_streams(EPOCH_SHARDS, PHASES[0][0] * PHASES[0][1])
    state, previous = None, None
    phases, rng = [], rng_state()
    for number, (world_size, workers, per_reader) in enumerate(PHASES):
        start = time.perf_counter()
        folder = directory / f"phase{number}"
        folder.mkdir(parents=True)
        digests, max_read = [], 0
        for rank in range(world_size):
            tracker = LoaderState(num_streams, SEED, rank, world_size, workers)
            if state is not None:
                resume = read_rank_resume(previous, state, rank, world_size, workers, tracker.streams)
                max_read = max(max_read, resume.num_bytes)
                tracker.load_state_dict(resume.data["loader"])
            for worker in range(workers):
                loader = KeyLoader(manifest, "sim://", "train", rank=rank, world_size=world_size, num_workers=workers,
                                   worker_id=worker, num_streams=num_streams, seed=SEED)
                if state is not None:
                    loader.load_state_dict(resume.data["loader"])
                for taken, (stream, position, sample) in enumerate(loader.iter_with_positions(), 1):
                    counts[sample["__key__"]] += 1
                    tracker.update(stream, position)
                    if taken == per_reader:
                        break
            parts = rank_parts(rank, world_size, STEP + number, {"epoch": tracker.epoch, "loader": tracker.state_dict()},
                               LOSS_WINDOW, rng)
            parts.write(folder)
            digests.append(parts.sha256)
        state = {"step": STEP + number, "data": {"skipped": {"shards": 0, "samples": 0}}, "loss_window": LOSS_WINDOW,
                 "rank_states": parts_summary(digests, workers, num_streams)}
        previous = folder
        phases.append({"ranks": world_size, "workers": workers, "samples_read_so_far": int(counts.sum()),
                       "max_state_bytes_read_by_a_rank": max_read, "seconds": round(time.perf_counter() - start, 1)})
    return {"samples": int(counts.size), "read_once": int((counts == 1).sum()), "never": int((counts == 0).sum()),
            "twice_or_more": int((counts > 1).sum()), "num_streams": num_streams, "phases": phases}


def mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.2f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.1f} KB"


def test_cluster_resume_state(tmp_path):
    rows = [measure_world(world_size, tmp_path / f"w{world_size}") for world_size in TABLE_WORLDS]
    once = run_phases(tmp_path / "epoch")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster_state.json").write_text(json.dumps({"table": rows, "exactly_once": once}, indent=1))

    print(f"\nresume state, {TABLE_SHARDS:,} shards x {TABLE_SAMPLES:,} samples, {WORKERS} workers per rank (before -> after)")
    print("| ranks | streams | trainer_state.json | one rank reads on a same-size resume | on a resume at 3/4 ranks, 4 workers "
          "| gathered per checkpoint, per rank | cluster-wide gathered | cluster-wide read on resume | save (rank 0) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        before, after = row["before"], row["after"]
        print(f"| {row['ranks']:,} | {row['num_streams']:,} | {mb(before['trainer_state_bytes'])} -> {mb(after['trainer_state_bytes'])} "
              f"| {mb(before['read_per_rank_bytes'])} -> {mb(after['read_per_rank_bytes'])} "
              f"| {mb(before['read_per_rank_bytes'])} -> {mb(after['elastic_read_per_rank_bytes'])} "
              f"| {mb(before['gathered_per_rank_bytes'])} -> {after['gathered_per_rank_bytes']} B (to rank 0 alone) "
              f"| {mb(before['cluster_gathered_bytes'])} -> {mb(after['gathered_at_rank0_bytes'])} "
              f"| {mb(before['cluster_read_bytes'])} -> {mb(after['cluster_read_bytes'])} "
              f"| {before['save_s']:.2f} s -> {after['save_s']:.3f} s |")
    layouts = " -> ".join(f"{phase['ranks']:,} x {phase['workers']}" for phase in once["phases"])
    print(f"exactly once: {once['samples']:,} samples, {layouts}: "
          f"{once['read_once']:,} read once, {once['never']} never, {once['twice_or_more']} twice or more "
          f"(largest state read by a rank on resume: {', '.join(mb(p['max_state_bytes_read_by_a_rank']) for p in once['phases'][1:])})")

    largest = rows[-1]["after"]
    assert once["read_once"] == once["samples"]
    assert largest["read_per_rank_bytes"] <= 100_000 and largest["save_s"] <= 1.0
    per_rank = [row["after"]["cluster_read_bytes"] / row["ranks"] for row in rows]
    assert max(per_rank) <= 1.5 * min(per_rank)  # cluster-wide bytes O(W)
