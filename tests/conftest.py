"""Shared fixtures: one Ray instance per test session, and a small text dataset built with it.

Ray must stay on loopback on these machines: when the suite runs as root outside a
loopback-only network namespace, it re-runs itself inside one (launch/netns.py).
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_configure(config):
    from launch import netns

    if not netns.is_confined() and netns.can_confine() and not os.environ.get(netns.ENV_NAME):
        # re-run the whole session confined; os._exit, since SystemExit inside a hook is an INTERNALERROR
        code = netns.run_confined([sys.executable, *sys.orig_argv[1:]])
        sys.stdout.flush()
        os._exit(code)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from launch.config import RayConfig
    from sharding.ray_runtime import init_ray

    init_ray(RayConfig(num_cpus=2, object_store_mb=300))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def text_dataset(ray_session, tmp_path_factory) -> str:
    """~600 KB of real stdlib code -> BPE 512 -> shards of 65-token samples (train + val)."""
    from launch.config import PrepareConfig, ShardsConfig, SourceConfig, TokenizerConfig
    from sharding.pretokenize_text import prepare_text

    output = tmp_path_factory.mktemp("datasets") / "stdlib-small"
    cfg = PrepareConfig(
        source=SourceConfig(paths=["{stdlib}/json/*.py", "{stdlib}/email/*.py", "{stdlib}/http/*.py"]),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=512),
        shards=ShardsConfig(output=str(output), name="stdlib", seq_len=64, source_bytes_per_shard=60_000, val_fraction=0.2),
    )
    prepare_text(cfg, progress=False)
    return str(output)


def write_token_dataset(root, *, num_shards: int = 4, samples_per_shard: int = 24, val_samples: int = 8,
                        seq_len: int = 32, vocab_size: int = 128, seed: int = 0) -> str:
    """Token shards written directly (no Ray): a first-order Markov chain, so a model can learn it.

    Equal shards on purpose: with data.num_streams == num_shards every stream is one shard, and
    1 rank with batch 2B reads the same samples per step as 2 ranks with batch B each.
    """
    import numpy as np

    from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord
    from sharding.shards import sample_key, shard_name, write_shard

    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab_size, size=(vocab_size, 4))  # each token has 4 likely successors

    def sequence():
        tokens = [int(rng.integers(vocab_size))]
        for _ in range(seq_len):
            tokens.append(int(successors[tokens[-1], rng.integers(4)]))
        return np.array(tokens, dtype=np.uint16)

    records = []
    sizes = [samples_per_shard] * num_shards + [val_samples]
    for index, size in enumerate(sizes):
        name = shard_name("toy", index)
        written = write_shard(f"{root}/{name}", ({"__key__": sample_key("toy", index, i), "tokens.npy": sequence()} for i in range(size)))
        split = "val" if index == num_shards else "train"
        records.append(ShardRecord(name, split, written.num_samples, written.num_bytes, written.sha256, [f"chain{index}"]))
    Manifest(
        format_version=FORMAT_VERSION, name="toy", kind="text_tokens", seq_len=seq_len, vocab_size=vocab_size,
        fields={"tokens.npy": {"dtype": "uint16", "shape": [seq_len + 1]}}, shards=records, tokenizer={},
        sources={}, skipped=[], stats={"unigram_entropy_nats": float(np.log(vocab_size))}, created_by={"program": "tests"},
    ).write(str(root))
    return str(root)


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory) -> str:
    return write_token_dataset(tmp_path_factory.mktemp("datasets") / "toy-tokens")
