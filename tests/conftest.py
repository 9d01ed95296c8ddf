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
