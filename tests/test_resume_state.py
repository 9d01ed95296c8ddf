"""Per-rank resume state (trainer/resume_state.py), the default number of loader streams, and a Batches
state read right after a resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from core.config import DataConfig
from core.errors import UserError
from sharding.loader import ShardLoader, default_num_streams, merge_states
from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord
from test_loader import all_train_keys, take, write_dataset
from trainer.data import Batches, resolve_num_streams
from trainer.resume_state import (RANKS_DIR, parts_problems, parts_summary, rank_parts, read_rank_resume, rng_file,
                                  state_file)
from trainer.rng import rng_state

SEED = 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return write_dataset(root), str(root)


def readers(dataset, world_size: int, readers_per_rank: int, num_streams: int) -> list[list[ShardLoader]]:
    """Every rank's readers (one ShardLoader per data worker), as the DataLoader workers build them."""
    manifest, url = dataset
    return [[ShardLoader(manifest, url, "train", rank=rank, world_size=world_size, num_workers=readers_per_rank,
                         worker_id=worker, num_streams=num_streams, seed=SEED) for worker in range(readers_per_rank)]
            for rank in range(world_size)]


def save(directory: Path, ranks: list[list[ShardLoader]], step: int = 5) -> dict:
    """Every rank's parts written as a checkpoint holds them; the trainer state rank 0 writes."""
    directory.mkdir(exist_ok=True)
    digests = []
    for rank, loaders in enumerate(ranks):
        loader_state = json.loads(json.dumps(merge_states(loader.state_dict() for loader in loaders)))
        parts = rank_parts(rank, len(ranks), step, {"epoch": loader_state["epoch"], "loader": loader_state}, [1.0 + rank], rng_state())
        parts.write(directory)
        digests.append(parts.sha256)
    return {"step": step, "data": {"skipped": {"shards": 0, "samples": 0}}, "loss_window": [2.5],
            "rank_states": parts_summary(digests, len(ranks[0]), ranks[0][0].num_streams)}


def test_a_same_size_resume_opens_only_the_ranks_own_files(dataset, tmp_path):
    ranks = readers(dataset, 4, 1, num_streams=8)
    for loaders in ranks:
        take(loaders[0], 3)
    state = save(tmp_path, ranks)
    expected = ranks[2][0].state_dict()
    for path in (tmp_path / RANKS_DIR).iterdir():  # only rank 2's files are left: it reads nothing else
        if "rank00002" not in path.name:
            path.unlink()
    resume = read_rank_resume(tmp_path, state, rank=2, world_size=4, readers_per_rank=1, streams=ranks[2][0].streams)
    assert resume.paths == [tmp_path / state_file(2), tmp_path / rng_file(2)]
    assert json.loads(json.dumps(resume.data["loader"]["positions"])) == json.loads(json.dumps(expected["positions"]))
    assert resume.loss_window == [3.0] and resume.rng["torch"] == rng_state()["torch"]


def test_another_world_size_reads_the_parts_holding_its_streams_and_reads_every_sample_once(dataset, tmp_path):
    """4 ranks x 2 workers -> 3 ranks x 1 -> 2 ranks x 3: nothing lost or repeated; each rank reads the
    state files of the old ranks owning its streams, the RNG file of its own number."""
    manifest, _ = dataset
    seen: list[str] = []
    layout = readers(dataset, 4, 2, num_streams=24)
    for loaders in layout:
        for loader in loaders:
            seen += take(loader, 2)
    directory = tmp_path / "first"
    state = save(directory, layout)
    for world_size, readers_per_rank, count in ((3, 1, 3), (2, 3, None)):
        layout = readers(dataset, world_size, readers_per_rank, num_streams=24)
        for rank, loaders in enumerate(layout):
            streams = sorted(s for loader in loaders for s in loader.streams)
            resume = read_rank_resume(directory, state, rank, world_size, readers_per_rank, streams)
            old_world = state["rank_states"]["num_ranks"]
            holders = {directory / state_file(old) for old in range(old_world)
                       if set(streams) & set(map(int, json.loads((directory / state_file(old)).read_text())["data"]["loader"]["positions"]))}
            rng = [directory / rng_file(rank)] if rank < old_world else []
            assert sorted(resume.paths[:len(holders)]) == sorted(holders) and resume.paths[len(holders):] == rng
            assert resume.loss_window == [2.5]  # the saved mean over the old ranks
            for loader in loaders:
                loader.load_state_dict(resume.data["loader"])
                seen += take(loader, count) if count else [s["__key__"] for s in loader]
        directory = tmp_path / f"at{world_size}"
        state = save(directory, layout)
    assert Counter(seen) == Counter(all_train_keys(manifest))


def test_parts_problems_find_a_changed_part(dataset, tmp_path):
    state = save(tmp_path, readers(dataset, 2, 1, num_streams=4))
    assert parts_problems(tmp_path, state) == []
    (tmp_path / rng_file(1)).write_text((tmp_path / rng_file(1)).read_text().replace('"step": 5', '"step": 5 '))
    assert "do not match the digest" in parts_problems(tmp_path, state)[0]


def test_a_part_of_another_step_is_refused(dataset, tmp_path):
    state = save(tmp_path, readers(dataset, 2, 1, num_streams=4), step=5)
    with pytest.raises(UserError, match="belongs to step 5, not to this checkpoint's step 6"):
        read_rank_resume(tmp_path, {**state, "step": 6}, 0, 2, 1, [0, 2])


def test_the_single_file_format_still_loads(dataset):
    """Checkpoints of the earlier format: every rank's state inside trainer_state.json."""
    ranks = readers(dataset, 2, 1, num_streams=4)
    for loaders in ranks:
        take(loaders[0], 2)
    state = {"step": 3, "data": {"rank_states": [{"epoch": 0, "loader": loaders[0].state_dict()} for loaders in ranks]},
             "rng": [rng_state(), rng_state()], "loss_window": [[1.0, 3.0], [2.0, 5.0]]}
    same = read_rank_resume(Path("/nonexistent"), state, 1, 2, 1, ranks[1][0].streams)
    assert same.loss_window == [2.0, 5.0] and same.data["loader"]["positions"] == ranks[1][0].state_dict()["positions"]
    one = read_rank_resume(Path("/nonexistent"), state, 0, 1, 1, [0, 1, 2, 3])
    assert one.loss_window == [1.5, 4.0] and sorted(one.data["loader"]["positions"]) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="format 7"):
        read_rank_resume(Path("/x"), {"step": 3, "data": {}, "rank_states": {"format": 7}}, 0, 1, 1, [0])


def equal_shards(num_shards: int, num_samples: int = 10) -> Manifest:
    records = [ShardRecord(f"toy-{i:06d}.tar", "train", num_samples, 1, "0") for i in range(num_shards)]
    return Manifest(format_version=FORMAT_VERSION, name="toy", kind="text_tokens", seq_len=8, vocab_size=10, fields={},
                    shards=records, tokenizer={}, sources={}, skipped=[], stats={}, created_by={})


@pytest.mark.parametrize("num_shards, num_readers", [(40, 1), (40, 3), (40, 7), (40, 40), (1000, 3), (1000, 24), (5000, 96)])
def test_default_streams_keep_shares_within_one_shard(num_shards, num_readers):
    manifest = equal_shards(num_shards)
    num_streams = default_num_streams(num_shards, num_readers)
    assert num_readers <= num_streams <= max(num_readers, min(num_shards, 64 * num_readers))
    shares = [len(ShardLoader(manifest, "mem://", "train", rank=r, world_size=num_readers, num_streams=num_streams))
              for r in range(num_readers)]
    assert sum(shares) == 10 * num_shards and max(shares) - min(shares) <= 10  # one shard of 10 samples


def test_too_few_streams_for_ranks_x_workers_is_one_line():
    manifest = equal_shards(100)
    with pytest.raises(UserError) as error:
        resolve_num_streams(DataConfig(dataset="d", num_streams=64, num_workers=8), manifest, world_size=16, num_workers=8)
    assert str(error.value) == ("data.num_streams 64 < 16 ranks x 8 data readers per rank (data.num_workers 8) = 128: "
                                "set data.num_streams >= 128 (the train split has 100 shards: write more, smaller shards) "
                                "or use fewer ranks / data.num_workers")
    # unset: at least one stream per reader (28 of the 128 readers idle), as a small dataset needs
    assert resolve_num_streams(DataConfig(dataset="d"), manifest, world_size=32, num_workers=4) == 128
    assert resolve_num_streams(DataConfig(dataset="d"), manifest, world_size=4, num_workers=8) == 100
    assert resolve_num_streams(DataConfig(dataset="d"), manifest, world_size=1, num_workers=0) == 64


def test_batches_state_right_after_a_resume_is_the_resumed_one(dataset):
    """With DataLoader workers, a save right after load_state_dict (before any read) keeps the position."""
    manifest, url = dataset
    cfg = DataConfig(dataset=url, num_streams=4, num_workers=1, val_split="")

    def make() -> Batches:
        return Batches(manifest, cfg, "train", batch_size=4, rank=0, world_size=1, seed=SEED, shuffle=True)

    first = make()
    for step in range(1, 4):
        first.next_batch(step)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert json.loads(json.dumps(resumed.state_dict())) == state
    again = make()
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    assert np.array_equal(again.next_batch(4)["tokens"], first.next_batch(4)["tokens"])
