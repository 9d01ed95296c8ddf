"""Data verified where it is read: corrupt shards and samples, token ids outside the vocabulary,
`data.verify` and `data.on_corrupt: skip` (counted, listed, resumed exactly).

Datasets are written with conftest's `write_token_dataset` into tmp dirs and then damaged on
purpose: a flipped payload bit (the manifest's sha256 no longer matches), a truncated shard, and
"resealed" damage (the manifest updated to the damaged bytes, as a buggy writer would leave it)
that only decoding or the vocabulary check can catch. Training runs are real `tokfleet train` /
`python -m trainer` processes on CPU.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import write_token_dataset
from core.config import DataConfig
from core.errors import UserError
from sharding import loader as loader_module
from sharding.loader import ShardLoader, merge_states
from sharding.manifest import Manifest
from sharding.shards import sample_key, shard_name
from trainer.data import Batches
from trainer.metrics import read_metrics

VOCAB, SEQ_LEN, PER_SHARD = 128, 32, 24
BAD_ID = 200


def make_dataset(root: Path) -> Path:
    """4 train shards of 24 samples (ids < 128, 33 tokens each) and a val shard."""
    write_token_dataset(root, num_shards=4, samples_per_shard=PER_SHARD, val_samples=8, seq_len=SEQ_LEN, vocab_size=VOCAB)
    return root


def shard_file(root: Path, index: int) -> Path:
    return root / shard_name("toy", index)


def member(path: Path, sample: int) -> tuple[int, int]:
    """(offset of the .npy member's bytes, offset of its array data) of sample `sample` of a shard."""
    with tarfile.open(path) as archive:
        info = [m for m in archive.getmembers() if m.isfile()][sample]
    data = path.read_bytes()
    header_len = int.from_bytes(data[info.offset_data + 8:info.offset_data + 10], "little")
    return info.offset_data, info.offset_data + 10 + header_len


def patch(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + len(new)] = new
    path.write_bytes(bytes(data))


def flip_payload_bit(root: Path, index: int) -> None:
    path = shard_file(root, index)
    _, payload = member(path, 3)
    data = bytearray(path.read_bytes())
    data[payload + 5] ^= 0x01  # a token id changes by one: decodes fine, trains silently without the sha256
    path.write_bytes(bytes(data))


def reseal(root: Path, index: int) -> None:
    """Make the manifest agree with shard `index`'s bytes again: only decoding can catch its damage now."""
    manifest = json.loads((root / "manifest.json").read_text())
    data = shard_file(root, index).read_bytes()
    record = next(s for s in manifest["shards"] if s["name"] == shard_name("toy", index))
    record["num_bytes"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def damage_header(root: Path, index: int, sample: int) -> str:
    """Break the .npy header of `sample` of shard `index` (resealed); its key."""
    path = shard_file(root, index)
    start, _ = member(path, sample)
    header = path.read_bytes()[start:start + 64]
    patch(path, start + header.index(b"'descr'"), b"'dXscr'")
    reseal(root, index)
    return sample_key("toy", index, sample)


def put_bad_token_id(root: Path, index: int, sample: int) -> str:
    """Token 7 of `sample` of shard `index` becomes BAD_ID (>= the vocabulary; resealed); its key."""
    path = shard_file(root, index)
    _, payload = member(path, sample)
    patch(path, payload + 2 * 7, BAD_ID.to_bytes(2, "little"))
    reseal(root, index)
    return sample_key("toy", index, sample)


def loader(root: Path, **kwargs) -> ShardLoader:
    return ShardLoader(Manifest.read(str(root)), str(root), "train", num_streams=4, seed=1, **kwargs)


@pytest.fixture(autouse=True)
def fresh_verification():
    """Shards are rewritten in place under the same names: each test checks them anew."""
    loader_module.forget_verified_shards()
    yield
    loader_module.forget_verified_shards()


# ------------------------------------------------------------------------------------ the loader


def test_flipped_bit_is_an_error_naming_the_shard_and_skip_moves_on(tmp_path):
    root = make_dataset(tmp_path / "data")
    flip_payload_bit(root, 1)
    with pytest.raises(UserError) as error:
        list(loader(root))
    assert str(error.value).startswith(f"shard toy-000001.tar of {root}: sha256 differs from the manifest")
    assert "\n" not in str(error.value)

    items = [item for _, _, item in loader(root, on_corrupt="skip").iter_with_positions()]
    skipped = [item["__skipped__"] for item in items if "__skipped__" in item]
    assert skipped == [{"shard": "toy-000001.tar", "key": None,
                        "reason": "sha256 differs from the manifest (corrupt or changed since `tokfleet prepare`)"}]
    keys = [item["__key__"] for item in items if "__key__" in item]
    assert len(keys) == 3 * PER_SHARD and not any(key.startswith("toy-000001") for key in keys)


def test_verify_false_trains_on_the_corrupt_shard(tmp_path):
    """The documented trade-off: without verification a payload bit flip is not seen (it decodes fine)."""
    root = make_dataset(tmp_path / "data")
    flip_payload_bit(root, 1)
    samples = list(loader(root, verify=False))
    assert len(samples) == 4 * PER_SHARD


def test_truncated_shard_is_an_error_naming_the_shard(tmp_path):
    root = make_dataset(tmp_path / "data")
    path = shard_file(root, 2)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:size // 2 + 100])
    with pytest.raises(UserError, match=rf"^shard toy-000002.tar of .*: {size // 2 + 100} bytes, the manifest records {size} \(truncated"):
        list(loader(root))
    with pytest.raises(UserError, match=r"^shard toy-000002.tar of .*: (member .* runs past the end|15 samples, the manifest records 24)"):
        list(loader(root, verify=False))  # without the size check the tar reader or the sample count still catch it
    skipping = loader(root, on_corrupt="skip")
    assert len(list(skipping)) == 3 * PER_SHARD


def test_missing_shard_is_an_error_naming_it(tmp_path):
    root = make_dataset(tmp_path / "data")
    shard_file(root, 0).unlink()
    with pytest.raises(UserError, match=r"^shard toy-000000.tar of .*: missing; rebuild it with `tokfleet prepare`"):
        list(loader(root))


@pytest.mark.parametrize("verify", [True, False])
def test_damaged_npy_header_names_shard_key_and_field(tmp_path, verify):
    root = make_dataset(tmp_path / "data")
    key = damage_header(root, 2, 5)
    with pytest.raises(UserError) as error:
        list(loader(root, verify=verify))
    message = str(error.value)
    assert message.startswith(f"shard toy-000002.tar of {root}: sample {key}, field tokens.npy: does not decode (")
    assert "dXscr" in message and "\n" not in message

    skipping = loader(root, verify=verify, on_corrupt="skip")
    items = [item for _, _, item in skipping.iter_with_positions()]
    skipped = [item["__skipped__"] for item in items if "__skipped__" in item]
    assert [(s["shard"], s["key"]) for s in skipped] == [("toy-000002.tar", key)]
    assert skipped[0]["reason"].startswith("field tokens.npy: does not decode")
    assert len(items) == 4 * PER_SHARD and skipping.num_remaining() == 0  # the skipped sample counts as read


def test_wrong_dtype_or_shape_against_the_manifest(tmp_path):
    root = make_dataset(tmp_path / "data")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["fields"]["tokens.npy"] = {"dtype": "int32", "shape": [SEQ_LEN + 1]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"sample toy-00000\d-\d{6}, field tokens.npy: is uint16\[33\], the manifest records int32\[33\]"):
        list(loader(root))
    manifest["fields"]["tokens.npy"] = {"dtype": "uint16", "shape": [None]}  # None: any size
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert len(list(loader(root))) == 4 * PER_SHARD
    manifest["fields"]["signal.npy"] = {"dtype": "float32", "shape": [4, None]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"field signal.npy: missing from the sample"):
        list(loader(root))


def test_a_skip_moves_the_stream_state_the_same_way_on_a_fresh_run_and_a_resume(tmp_path):
    """2 streams of 2 shards, unshuffled: stream 1 is [shard 1 (flipped: skipped whole), shard 3 (one bad sample)].
    Stopping after any item and resuming from the state gives the uninterrupted sequence."""
    root = make_dataset(tmp_path / "data")
    flip_payload_bit(root, 1)
    damage_header(root, 3, 4)
    options = dict(num_streams=2, shuffle=False, on_corrupt="skip")

    def items(reader) -> list[str]:
        return [item.get("__key__") or json.dumps(item["__skipped__"]) for _, _, item in reader.iter_with_positions()]

    full = items(ShardLoader(Manifest.read(str(root)), str(root), "train", **options))
    assert len(full) == 3 * PER_SHARD + 1 and sum(item.startswith("{") for item in full) == 2
    for stop in range(len(full)):
        first = ShardLoader(Manifest.read(str(root)), str(root), "train", **options)
        reader = first.iter_with_positions()
        head = [item.get("__key__") or json.dumps(item["__skipped__"]) for _, (_, _, item) in zip(range(stop), reader)]
        resumed = ShardLoader(Manifest.read(str(root)), str(root), "train", **options)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + items(resumed) == full, stop


def test_each_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(loader_module.hashlib, "sha256", lambda data: calls.append(len(data)) or real(data))
    first = loader(root)
    list(first)
    first.set_epoch(1)
    list(first)  # read again: not hashed again
    list(loader(root))
    assert len(calls) == 4


def test_merged_states_sum_the_skip_counts():
    state = {"epoch": 0, "seed": 1, "num_streams": 2}
    merged = merge_states([{**state, "positions": {0: [1, 0]}, "skipped": {"shards": 1, "samples": 2}},
                           {**state, "positions": {1: [0, 3]}, "skipped": {"shards": 0, "samples": 3}}])
    assert merged["skipped"] == {"shards": 1, "samples": 5}
    assert "skipped" not in merge_states([{**state, "positions": {0: [1, 0]}}])


# ------------------------------------------------------------------------------ batches (in-process)


def batches(root: Path, *, rank: int = 0, world_size: int = 1, num_workers: int = 0, tmp: Path | None = None,
            **data) -> Batches:
    cfg = DataConfig(dataset=str(root), num_streams=4, num_workers=num_workers, **data)
    logs = {"key_log": tmp / f"keys-{rank}.jsonl", "skip_log": tmp / f"skipped-rank{rank}.jsonl"} if tmp else {}
    return Batches(Manifest.read(str(root)), cfg, "train", batch_size=4, rank=rank, world_size=world_size, seed=1,
                   shuffle=True, vocab_size=VOCAB, **logs)


def test_token_id_outside_the_vocabulary_names_shard_key_and_id(tmp_path):
    root = make_dataset(tmp_path / "data")
    key = put_bad_token_id(root, 3, 10)
    data = batches(root)
    with pytest.raises(UserError) as error:
        for step in range(1, 25):
            data.next_batch(step)
    assert str(error.value).startswith(f"shard toy-000003.tar of {root}: sample {key}, field tokens: token id {BAD_ID} "
                                       f"outside the model's vocabulary [0, {VOCAB})")


def test_an_error_in_a_dataloader_worker_is_one_line(tmp_path):
    root = make_dataset(tmp_path / "data")
    flip_payload_bit(root, 2)
    with pytest.raises(UserError) as error:
        batches(root, num_workers=1).next_batch(1)
    assert str(error.value).startswith("shard toy-000002.tar of ") and "\n" not in str(error.value)


def corrupted(root: Path) -> dict[str, str]:
    """Every kind of damage in one dataset: shard 1 flipped (skipped whole), a bad header in shard 2 and an
    out-of-vocabulary id in shard 3 (skipped alone); the two bad samples' keys."""
    make_dataset(root)
    flip_payload_bit(root, 1)
    return {"header": damage_header(root, 2, 5), "token": put_bad_token_id(root, 3, 10)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def epoch_keys(paths: list[Path], epoch: int) -> list[str]:
    return [key for path in paths for line in read_jsonl(path) if line["epoch"] == epoch for key in line["keys"]]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_skip_counts_and_resumes_exactly(tmp_path, num_workers):
    root = tmp_path / "data"
    bad = corrupted(root)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir(), resumed_dir.mkdir()
    straight = batches(root, num_workers=num_workers, tmp=straight_dir, on_corrupt="skip")
    expected = [straight.next_batch(step)["tokens"] for step in range(1, 25)]  # 96 samples: into epoch 1

    first = batches(root, num_workers=num_workers, tmp=resumed_dir, on_corrupt="skip")
    got = [first.next_batch(step)["tokens"] for step in range(1, 11)]
    state = json.loads(json.dumps(first.state_dict()))
    (resumed_dir / "skipped-rank0.jsonl").open("a").write(json.dumps({"step": 11, "note": "stale"}) + "\n")
    resumed = batches(root, num_workers=num_workers, tmp=resumed_dir, on_corrupt="skip")
    resumed.load_state_dict(state)
    got += [resumed.next_batch(step)["tokens"] for step in range(11, 25)]

    assert all((a == b).all() for a, b in zip(got, expected))
    assert resumed.num_skipped() == straight.num_skipped()
    assert read_jsonl(resumed_dir / "skipped-rank0.jsonl") == read_jsonl(straight_dir / "skipped-rank0.jsonl")
    skipped = read_jsonl(straight_dir / "skipped-rank0.jsonl")
    in_epoch0 = [(s["shard"], s["key"]) for s in skipped if s["epoch"] == 0]
    assert sorted(in_epoch0, key=str) == sorted([("toy-000001.tar", None), ("toy-000002.tar", bad["header"]),
                                                 ("toy-000003.tar", bad["token"])], key=str)
    assert straight.num_skipped()["skipped_shards"] == 2  # shard 1 again in epoch 1
    # every good sample of epoch 0 exactly once, nothing corrupt
    keys = epoch_keys([straight_dir / "keys-0.jsonl"], 0)
    assert len(keys) == len(set(keys)) == 3 * PER_SHARD - 2 and not {bad["header"], bad["token"]} & set(keys)


def test_skip_elastic_two_ranks_to_one_reads_every_good_sample_once(tmp_path):
    root = tmp_path / "data"
    bad = corrupted(root)
    ranks = [batches(root, rank=r, world_size=2, tmp=tmp_path, on_corrupt="skip") for r in range(2)]
    for step in range(1, 5):
        for rank in ranks:
            rank.next_batch(step)
    merged = merge_states(rank.state_dict()["loader"] for rank in ranks)
    assert sum(r.num_skipped_shards for r in ranks) == merged["skipped"]["shards"] == 1
    one = batches(root, rank=0, world_size=1, tmp=tmp_path, on_corrupt="skip")
    one.load_state_dict({"epoch": merged["epoch"], "loader": merged})
    step = 5
    while one.epoch == 0:
        one.next_batch(step)
        step += 1
    keys = epoch_keys([tmp_path / "keys-0.jsonl", tmp_path / "keys-1.jsonl"], 0)
    assert len(keys) == len(set(keys)) == 3 * PER_SHARD - 2 and not {bad["header"], bad["token"]} & set(keys)
    assert one.num_skipped()["skipped_samples"] + sum(r.num_skipped_samples for r in ranks) >= 2


def test_every_shard_corrupt_under_skip_is_an_error_not_a_hang(tmp_path):
    root = make_dataset(tmp_path / "data")
    for index in range(4):
        flip_payload_bit(root, index)
    with pytest.raises(UserError, match="every shard and sample of this rank's part of the dataset was skipped"):
        batches(root, on_corrupt="skip").next_batch(1)


# ------------------------------------------------------------------------------ tokfleet train


def write_config(tmp_path: Path, dataset: Path, name: str, sections: dict | None = None, **data) -> Path:
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": 24, "seed": 7, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {"dataset": str(dataset), "num_streams": 4, "log_sample_keys": True, **data},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "micro_batch_size": 4},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 0},
        "logging": {"every_steps": 2, "progress": False, "wandb": False},
        "eval": {"every_steps": 12, "num_batches": 1},
    }
    for section, values in (sections or {}).items():
        config[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tokfleet_train(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "train", str(config), *args], capture_output=True, text=True)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tokfleet: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0].removeprefix("tokfleet: error: ")


def test_train_on_a_flipped_bit_exits_2_naming_the_shard(tmp_path):
    root = make_dataset(tmp_path / "data")
    flip_payload_bit(root, 1)
    line = error_line(tokfleet_train(write_config(tmp_path, root, "flipped")))
    assert line.startswith(f"shard toy-000001.tar of {root}: sha256 differs from the manifest (corrupt or changed since "
                           "`tokfleet prepare`)")


def test_train_on_a_token_id_outside_the_vocabulary_exits_2(tmp_path):
    root = make_dataset(tmp_path / "data")
    key = put_bad_token_id(root, 3, 10)
    line = error_line(tokfleet_train(write_config(tmp_path, root, "vocab")))
    assert line.startswith(f"shard toy-000003.tar of {root}: sample {key}, field tokens: token id {BAD_ID} outside")


def test_train_with_skip_counts_lists_and_resumes_exactly(tmp_path):
    root = tmp_path / "data"
    bad = corrupted(root)
    straight = write_config(tmp_path, root, "straight", on_corrupt="skip")
    resumed = write_config(tmp_path, root, "resumed", on_corrupt="skip")
    for config, args in ((straight, ()), (resumed, ("--stop-at-step", "10")), (resumed, ("--resume", "auto"))):
        result = tokfleet_train(config, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        if not args:
            assert f"skipped shard toy-000001.tar of {root}: sha256 differs" in result.stderr  # a warning line per skip

    records = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(2, 25, 2))
    assert records[0]["skipped_shards"] == 1 and records[-1]["skipped_shards"] == 2
    assert records[-1]["skipped_samples"] >= 2
    skipped = read_jsonl(tmp_path / "straight" / "logs" / "skipped-rank0.jsonl")
    assert {(s["shard"], s["key"]) for s in skipped if s["epoch"] == 0} == {
        ("toy-000001.tar", None), ("toy-000002.tar", bad["header"]), ("toy-000003.tar", bad["token"])}
    assert all(set(s) == {"shard", "key", "reason", "step", "epoch"} and s["step"] >= 1 for s in skipped)
    assert len(skipped) == records[-1]["skipped_shards"] + records[-1]["skipped_samples"]

    resumed_records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    for name in ("loss", "skipped_shards", "skipped_samples", "samples", "epoch"):
        assert [r[name] for r in resumed_records] == [r[name] for r in records], name
    assert read_jsonl(tmp_path / "resumed" / "logs" / "skipped-rank0.jsonl") == skipped
    keys = [read_jsonl(tmp_path / run / "logs" / "sample_keys-rank0.jsonl") for run in ("straight", "resumed")]
    assert keys[0] == keys[1] and not {bad["header"], bad["token"]} & {k for line in keys[0] for k in line["keys"]}


def test_two_ranks_sum_the_skip_counts_and_an_elastic_resume_keeps_them(tmp_path):
    """2 DDP ranks skip what their streams hold and metrics sum both; resumed on 1 rank, the counts go on
    from the total, the log of the rank that is gone keeps only its lines up to the checkpoint, and
    epoch 0 holds every good sample exactly once."""
    from test_distributed import ENGINES, run

    root = tmp_path / "data"
    bad = corrupted(root)
    launcher, ddp = ENGINES["ddp"]
    two = write_config(tmp_path, root, "elastic", {"engine": ddp, "optim": {"micro_batch_size": 2}, "logging": {"every_steps": 1},
                                                   "eval": {"every_steps": 0}}, on_corrupt="skip")
    run(launcher, 2, two, "--stop-at-step", "8")
    logs = tmp_path / "elastic" / "logs"

    def logged() -> list[dict]:
        return [line for rank in (0, 1) for line in read_jsonl(logs / f"skipped-rank{rank}.jsonl")]

    record = read_metrics(tmp_path / "elastic" / "metrics.jsonl")[-1]
    assert record["step"] == 8 and record["skipped_shards"] == 1
    assert record["skipped_samples"] == sum(line["key"] is not None for line in logged())
    one = write_config(tmp_path, root, "elastic", {"optim": {"micro_batch_size": 4}, "logging": {"every_steps": 1},
                                                   "eval": {"every_steps": 0}}, on_corrupt="skip")
    run("python", 1, one, "--resume", "auto")
    record = read_metrics(tmp_path / "elastic" / "metrics.jsonl")[-1]
    assert record["step"] == 24 and record["epoch"] == 1 and record["skipped_shards"] == 2
    assert (record["skipped_shards"], record["skipped_samples"]) == (
        sum(line["key"] is None for line in logged()), sum(line["key"] is not None for line in logged()))
    assert all(line["step"] <= 8 for line in read_jsonl(logs / "skipped-rank1.jsonl"))
    keys = [key for rank in (0, 1) for line in read_jsonl(logs / f"sample_keys-rank{rank}.jsonl") if line["epoch"] == 0
            for key in line["keys"]]
    assert len(keys) == len(set(keys)) == 3 * PER_SHARD - 2 and not {bad["header"], bad["token"]} & set(keys)
