"""The Ray pretokenization pipeline end to end: shards + manifest, idempotent re-runs, repair."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sysconfig

import numpy as np
import pytest

from core.config import PrepareConfig, ShardsConfig, SourceConfig, TokenizerConfig
from sharding.loader import ShardLoader
from sharding.manifest import Manifest
from sharding.pretokenize_text import group_documents, prepare_text, val_group_indexes, verify_dataset
from sharding.shards import read_shard
from sharding.text_corpus import Document
from sharding.text_tokenizer import load_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]
PATTERNS = ["json/*.py", "wsgiref/*.py", "dbm/*.py", "encodings/utf*.py", "collections/*.py"]  # 27 files, ~195 KB
SEQ_LEN = 64


def make_config(corpus: str, output: str) -> PrepareConfig:
    return PrepareConfig(
        source=SourceConfig(paths=[f"{corpus}/**/*.py"]),
        shards=ShardsConfig(output=output, seq_len=SEQ_LEN, source_bytes_per_shard=25_000, val_fraction=0.25),
        tokenizer=TokenizerConfig(vocab_size=1000),
    )


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory):  # ray_session: one Ray instance for the test session (conftest.py)
    corpus = tmp_path_factory.mktemp("corpus")
    for pattern in PATTERNS:
        for path in glob.glob(os.path.join(STDLIB, pattern)):
            target = corpus / os.path.relpath(path, STDLIB)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    (corpus / "latin1.py").write_bytes(b"caf\xe9 = 1\n")
    output = str(tmp_path_factory.mktemp("dataset"))
    cfg = make_config(str(corpus), output)
    manifest = prepare_text(cfg, progress=False)
    return cfg, manifest, manifest.to_json(), str(corpus), output


def file_ids(root: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file under `root`: changes when a file is rewritten (atomic rename)."""
    ids = {}
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(path):
            stat = os.stat(path)
            ids[os.path.relpath(path, root)] = (stat.st_ino, stat.st_mtime_ns)
    return ids


def test_grouping_and_val_split_are_deterministic():
    documents = [Document(f"/d/{i}", size) for i, size in enumerate([5, 5, 20, 1, 1, 1, 30, 2])]
    groups = group_documents(documents, 10)
    assert [[d.source for d in group] for group in groups] == [["/d/0", "/d/1"], ["/d/2"], ["/d/3", "/d/4", "/d/5", "/d/6"], ["/d/7"]]
    assert val_group_indexes(4, 0.25) == {2}
    assert val_group_indexes(2, 0.01) == {1} and val_group_indexes(1, 0.5) == set() and val_group_indexes(9, 0.0) == set()
    assert len(val_group_indexes(100, 0.05)) == 5


def test_manifest_matches_the_shards(built):
    cfg, manifest, _, corpus, output = built
    assert manifest.kind == "text_tokens" and manifest.seq_len == SEQ_LEN and manifest.vocab_size == 1000
    assert manifest.fields == {"tokens.npy": {"dtype": "uint16", "shape": [SEQ_LEN + 1]}}
    assert len(manifest.shards) >= 6 and 1 <= len(manifest.shards_of("val")) < len(manifest.shards)
    assert [s.name for s in manifest.shards] == [f"text-{i:06d}.tar" for i in range(len(manifest.shards))]
    keys = set()
    for shard in manifest.shards:
        samples = read_shard(os.path.join(output, shard.name))
        assert len(samples) == shard.num_samples > 0
        assert shard.num_bytes == os.path.getsize(os.path.join(output, shard.name))
        for sample in samples:
            assert sample["tokens"].dtype == np.uint16 and sample["tokens"].shape == (SEQ_LEN + 1,)
            keys.add(sample["__key__"])
        assert all(source.startswith(corpus) for source in shard.sources)
    assert len(keys) == sum(s.num_samples for s in manifest.shards)
    assert [(os.path.basename(s.path), s.reason.split(":")[0]) for s in manifest.skipped] == [("latin1.py", "not UTF-8")]
    stats = manifest.stats
    assert stats["num_samples"] == {"train": manifest.num_samples("train"), "val": manifest.num_samples("val")}
    assert stats["num_tokens"]["train"] == SEQ_LEN * manifest.num_samples("train")
    assert 2.0 < stats["unigram_entropy_nats"] < math.log(manifest.vocab_size)
    assert manifest.sources["num_documents"] == 28 and stats["num_documents"] == 27
    assert "storage_options" not in manifest.created_by["config"]["shards"]
    assert Manifest.read(output).to_json() == manifest.to_json()


def test_tokens_decode_back_to_corpus_text(built):
    _, manifest, _, corpus, output = built
    tokenizer, eos = load_tokenizer(output)
    assert eos == manifest.tokenizer["eos_id"]
    text = "".join(open(path, encoding="utf-8").read() for path in glob.glob(f"{corpus}/**/*.py", recursive=True) if "latin1" not in path)
    checked = 0
    for shard in manifest.shards[:3]:
        for sample in read_shard(os.path.join(output, shard.name))[::7]:
            tokens = sample["tokens"].tolist()
            pieces = [tokens[i:j] for i, j in zip([0] + [k + 1 for k, t in enumerate(tokens) if t == eos], [k for k, t in enumerate(tokens) if t == eos] + [len(tokens)])]
            for piece in pieces:
                decoded = tokenizer.decode(piece[1:-1])  # ends may be cut inside a multi-byte character
                if len(decoded) > 20 and "\ufffd" not in decoded:
                    assert decoded in text
                    checked += 1
    assert checked > 20


def test_the_loader_reads_the_pipeline_output(built):
    _, manifest, _, _, output = built
    loader = ShardLoader(manifest, output, "val", num_streams=8, seed=3)
    assert len({sample["__key__"] for sample in loader}) == manifest.num_samples("val")


def test_rerun_is_a_noop(built):
    cfg, _, original, _, output = built
    before = file_ids(output)
    assert prepare_text(cfg, progress=False).to_json() == original
    assert file_ids(output) == before


def test_truncated_shard_is_reported_and_only_it_rebuilt(built):
    cfg, manifest, original, _, output = built
    victim = manifest.shards[2].name
    path = os.path.join(output, victim)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    problems = verify_dataset(output)
    assert len(problems) == 1 and victim in problems[0]
    before = file_ids(output)
    assert prepare_text(cfg, progress=False).to_json() == original
    after = file_ids(output)
    changed = sorted(name for name in after if after[name] != before.get(name))
    assert changed == sorted([victim, victim.replace(".tar", ".json")])
    assert verify_dataset(output) == []


def test_missing_shard_and_manifest_are_rebuilt(built):
    cfg, manifest, original, _, output = built
    victim = manifest.shards[-1].name
    for name in (victim, victim.replace(".tar", ".json"), "manifest.json"):
        os.remove(os.path.join(output, name))
    leftover = os.path.join(output, victim + ".tmp-0123abcd")  # as a killed task leaves it
    with open(leftover, "wb") as handle:
        handle.write(b"partial")
    before = file_ids(output)
    assert prepare_text(cfg, progress=False).to_json() == original
    after = file_ids(output)
    assert sorted(name for name in after if after[name] != before.get(name)) == sorted(["manifest.json", victim, victim.replace(".tar", ".json")])
    assert not os.path.exists(leftover)
    assert verify_dataset(output) == []


def test_dataset_rows_with_a_pretrained_tokenizer(built, tmp_path):
    import datasets

    _, manifest, _, _, output = built
    rows = [json.dumps({"row": i, "text": "x" * (i % 17)}) + "\n" + "def f():\n    pass\n" * (i % 5) for i in range(300)]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "rows"))
    cfg = PrepareConfig(
        source=SourceConfig(hf_dataset=str(tmp_path / "rows")),
        shards=ShardsConfig(output=str(tmp_path / "out"), name="rows", seq_len=16, source_bytes_per_shard=4000, val_fraction=0.2),
        tokenizer=TokenizerConfig(kind="pretrained", path=os.path.join(output, "tokenizer")),
    )
    rows_manifest = prepare_text(cfg, progress=False)
    assert rows_manifest.tokenizer["sha256"] == manifest.tokenizer["sha256"]
    assert rows_manifest.shards[0].sources == [f"{tmp_path / 'rows'}#train/0..{rows_manifest.shards[0].sources[0].rsplit('..')[1]}"]
    assert rows_manifest.stats["num_documents"] == 300
    assert verify_dataset(str(tmp_path / "out")) == []
