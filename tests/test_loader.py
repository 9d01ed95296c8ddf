"""The elastic shard loader: exact resume, world-size changes without loss or repeats, determinism."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from core.errors import UserError
from sharding.loader import LoaderState, ShardIterableDataset, ShardLoader, merge_states
from sharding import storage
from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord
from sharding.shards import sample_key, shard_name, write_shard

SEQ_LEN = 8
# samples per shard: uneven, one empty shard; shard 3 and 7 are val
SHARD_SIZES = [5, 9, 3, 4, 12, 0, 7, 6, 1, 10, 8, 2]
VAL_SHARDS = {3, 7}


def write_dataset(root) -> Manifest:
    """Shards whose sample i of shard s holds tokens [s, i, 0, 1, ...], written like the pipeline does.

    `root` is a local folder or any fsspec URL.
    """
    records = []
    for index, num_samples in enumerate(SHARD_SIZES):
        name = shard_name("toy", index)
        samples = [
            {"__key__": sample_key("toy", index, i), "tokens.npy": np.array([index, i, *range(SEQ_LEN - 1)], dtype=np.uint16)}
            for i in range(num_samples)
        ]
        written = write_shard(storage.join(str(root), name), samples)
        split = "val" if index in VAL_SHARDS else "train"
        records.append(ShardRecord(name, split, written.num_samples, written.num_bytes, written.sha256, [f"doc{index}.txt"]))
    manifest = Manifest(
        format_version=FORMAT_VERSION, name="toy", kind="text_tokens", seq_len=SEQ_LEN, vocab_size=1000,
        fields={"tokens.npy": {"dtype": "uint16", "shape": [SEQ_LEN + 1]}}, shards=records,
        tokenizer={}, sources={}, skipped=[], stats={}, created_by={},
    )
    manifest.write(str(root))
    return manifest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return write_dataset(root), str(root)


def all_train_keys(manifest: Manifest) -> set[str]:
    return {sample_key("toy", int(s.name[4:10]), i) for s in manifest.shards_of("train") for i in range(s.num_samples)}


def make(dataset, **kwargs) -> ShardLoader:
    manifest, url = dataset
    kwargs.setdefault("num_streams", 4)
    kwargs.setdefault("seed", 7)
    return ShardLoader(manifest, url, "train", **kwargs)


def keys(samples) -> list[str]:
    return [sample["__key__"] for sample in samples]


def take(loader: ShardLoader, count: int) -> list[str]:
    taken = []
    for sample in loader:
        taken.append(sample["__key__"])
        if len(taken) == count:
            break
    return taken


def roundtrip(state: dict) -> dict:
    """Through JSON, as checkpoints store it (stream keys become strings)."""
    return json.loads(json.dumps(state))


def test_samples_match_the_manifest(dataset):
    manifest, _ = dataset
    samples = list(make(dataset))
    assert len(samples) == manifest.num_samples("train") == len(make(dataset))
    assert set(keys(samples)) == all_train_keys(manifest)
    for sample in samples:
        shard, position = int(sample["__key__"][4:10]), int(sample["__key__"][11:])
        assert sample["tokens"].dtype == np.uint16 and sample["tokens"].shape == (SEQ_LEN + 1,)
        assert sample["tokens"][:2].tolist() == [shard, position]


@pytest.mark.parametrize("num_streams", [4, 64])
@pytest.mark.parametrize("stop", [0, 1, 17, 43, 77])
def test_exact_resume(dataset, num_streams, stop):
    full = keys(make(dataset, num_streams=num_streams))
    first = make(dataset, num_streams=num_streams)
    head = take(first, stop)
    resumed = make(dataset, num_streams=num_streams)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert head + keys(resumed) == full
    assert resumed.num_remaining() == 0


def test_determinism_and_epochs(dataset):
    assert keys(make(dataset)) == keys(make(dataset))
    epoch1 = make(dataset)
    epoch1.set_epoch(1)
    order1 = keys(epoch1)
    assert order1 != keys(make(dataset))
    assert sorted(order1) == sorted(keys(make(dataset)))
    assert keys(epoch1) == []  # the epoch is over until set_epoch moves on
    epoch1.rewind()
    assert keys(epoch1) == order1
    assert keys(make(dataset, seed=8)) != keys(make(dataset))
    in_order = keys(make(dataset, shuffle=False, num_streams=1))
    assert in_order == sorted(in_order)


def test_readers_are_disjoint_and_cover_the_split(dataset):
    manifest, _ = dataset
    seen = Counter()
    for rank in range(3):
        for worker in range(2):
            seen.update(keys(make(dataset, rank=rank, world_size=3, num_workers=2, worker_id=worker, num_streams=16)))
    assert set(seen) == all_train_keys(manifest)
    assert max(seen.values()) == 1


@pytest.mark.parametrize("consumed", [(0, 0), (3, 11), (20, 1), (40, 40)])
def test_elastic_two_ranks_to_one(dataset, consumed):
    manifest, _ = dataset
    ranks = [make(dataset, rank=rank, world_size=2) for rank in range(2)]
    seen = [key for rank, count in zip(ranks, consumed) for key in take(rank, count)]
    merged = merge_states([roundtrip(rank.state_dict()) for rank in ranks])
    single = make(dataset)
    single.load_state_dict(roundtrip(merged))
    seen += keys(single)
    assert sorted(seen) == sorted(all_train_keys(manifest))


@pytest.mark.parametrize("consumed", [0, 13, 50])
def test_elastic_one_rank_to_two(dataset, consumed):
    manifest, _ = dataset
    single = make(dataset)
    seen = take(single, consumed)
    state = roundtrip(single.state_dict())
    for rank in range(2):
        loader = make(dataset, rank=rank, world_size=2)
        loader.load_state_dict(state)
        seen += keys(loader)
    assert sorted(seen) == sorted(all_train_keys(manifest))


def test_state_mismatches_are_errors(dataset):
    state = make(dataset).state_dict()
    with pytest.raises(ValueError, match="num_streams"):
        make(dataset, num_streams=8).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make(dataset, seed=1).load_state_dict(state)
    one_rank = make(dataset, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="merge_states"):
        make(dataset).load_state_dict(one_rank)
    further = make(dataset)
    take(further, 9)
    with pytest.raises(ValueError, match="two different positions"):
        merge_states([one_rank, further.state_dict()])


def read_epoch(loader: ShardLoader, epoch: int) -> list[str]:
    loader.set_epoch(epoch)
    return keys(loader)


@pytest.mark.parametrize("new_world", [1, 3])
@pytest.mark.parametrize("ahead_taken", [0, 4])
def test_elastic_resume_with_ranks_in_different_epochs(dataset, new_world, ahead_taken):
    """The rank with the smaller share finishes epoch 0 first and starts epoch 1; a checkpoint
    taken then resumes at another world size with both epochs exact."""
    manifest, _ = dataset
    ranks = [make(dataset, rank=rank, world_size=2) for rank in range(2)]
    short, long = sorted(ranks, key=len)
    assert len(short) < len(long)
    seen = {0: keys(short) + take(long, len(short)), 1: []}
    short.set_epoch(1)
    seen[1] += take(short, ahead_taken)
    merged = merge_states([roundtrip(rank.state_dict()) for rank in ranks])
    assert merged["epoch"] == 0 and set(merged["stream_epochs"].values()) == {1}

    for rank in range(new_world):
        loader = make(dataset, rank=rank, world_size=new_world)
        loader.load_state_dict(roundtrip(merged))
        seen[0] += keys(loader)
        seen[1] += read_epoch(loader, 1)
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == sorted(all_train_keys(manifest)), f"epoch {epoch}"
    # and the resumed loaders go on into epoch 2 from its start
    loader = make(dataset)
    loader.load_state_dict(roundtrip(merged))
    read_epoch(loader, 1)
    assert sorted(read_epoch(loader, 2)) == sorted(all_train_keys(manifest))


def test_state_of_a_rank_waiting_in_a_later_epoch_round_trips(dataset):
    """Resumed at the same world size, a rank whose streams are partly in a later epoch saves them unchanged."""
    manifest, _ = dataset
    ranks = [make(dataset, rank=rank, world_size=2) for rank in range(2)]
    short = min(ranks, key=len)
    keys(short)
    short.set_epoch(1)
    take(short, 3)
    merged = merge_states([roundtrip(rank.state_dict()) for rank in ranks])
    single = make(dataset)
    single.load_state_dict(roundtrip(merged))
    assert merge_states([single.state_dict()]) == merged
    tracker = LoaderState(num_streams=4, seed=7)
    tracker.load_state_dict(roundtrip(merged))
    assert tracker.state_dict() == merged


def test_workers_resume_a_state_with_streams_in_two_epochs(dataset):
    manifest, url = dataset
    ranks = [make(dataset, rank=rank, world_size=2) for rank in range(2)]
    short, long = sorted(ranks, key=len)
    seen = {0: keys(short) + take(long, 2), 1: []}
    short.set_epoch(1)
    seen[1] += take(short, 5)
    merged = roundtrip(merge_states([roundtrip(rank.state_dict()) for rank in ranks]))

    data = ShardIterableDataset(manifest, url, "train", num_workers=2, num_streams=4, seed=7)
    data.load_state_dict(merged)
    for epoch in (0, 1):
        data.set_epoch(epoch)
        tracker = data.new_state()
        for batch in torch.utils.data.DataLoader(data, batch_size=3, num_workers=2):
            tracker.update_batch(batch)
            seen[epoch] += batch["__key__"]
        assert sorted(seen[epoch]) == sorted(all_train_keys(manifest)), f"epoch {epoch}"


def test_damaged_shard_is_a_user_error(tmp_path):
    manifest = write_dataset(tmp_path)
    victim = tmp_path / manifest.shards[0].name
    victim.write_bytes(victim.read_bytes()[:3000])
    loader = ShardLoader(manifest, str(tmp_path), "train", num_streams=1, shuffle=False)
    with pytest.raises(UserError, match=manifest.shards[0].name):
        list(loader)


def test_loader_state_tracks_the_main_process_reader(dataset):
    manifest, url = dataset
    loader = make(dataset)
    tracker = LoaderState(num_streams=4, seed=7)
    for _, (stream, position, _) in zip(range(23), loader.iter_with_positions()):
        tracker.update(stream, position)
    assert tracker.state_dict() == loader.state_dict()


def test_iterable_dataset_with_workers_resumes_exactly_once(dataset):
    manifest, url = dataset
    options = dict(rank=0, world_size=1, num_workers=2, num_streams=4, seed=7)
    first = ShardIterableDataset(manifest, url, "train", **options)
    tracker = first.new_state()
    seen = []
    batches = torch.utils.data.DataLoader(first, batch_size=4, num_workers=2)
    for _, batch in zip(range(5), batches):
        tracker.update_batch(batch)
        seen += batch["__key__"]
    del batches  # stops the workers, dropping whatever they prefetched
    state = roundtrip(tracker.state_dict())

    resumed = ShardIterableDataset(manifest, url, "train", **options)
    resumed.load_state_dict(state)
    for batch in torch.utils.data.DataLoader(resumed, batch_size=4, num_workers=2):
        seen += batch["__key__"]
    assert sorted(seen) == sorted(all_train_keys(manifest))


def test_dataset_at_an_fsspec_url(dataset):
    url = "memory://tokfleet-test/toy"
    written = write_dataset(url)
    assert storage.ls(url)[-1] == "toy-000011.tar" and "manifest.json" in storage.ls(url)
    remote = ShardLoader(Manifest.read(url), url, "train", num_streams=4, seed=7)
    assert keys(remote) == keys(make(dataset))
    assert written.to_json() == dataset[0].to_json()
