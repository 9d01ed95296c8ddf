"""Ctrl-C, Ctrl-C twice and SIGKILL at random (seeded) moments of `tokfleet train` and `tokfleet
prepare`, 20 rounds each, every round followed by `--resume auto` or a re-run: the end result equals
the uninterrupted run's (final weights bit for bit, the metrics at every logged step; every shard's
sha256), a Ctrl-C exits 130 with one line and no traceback, and nothing half-written is left.

The processes run in their own session with SIGINT at its default, as a terminal's foreground job
(a background job of a shell would ignore SIGINT). A round's signal lands either during start-up or
right after a chosen training step's metrics line (some of those during a checkpoint write: a
checkpoint falls every 7 steps), or for prepare after a random delay. The three kinds of chain run
side by side, each in its own thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from trainer.metrics import read_metrics

ROUNDS = 20
KINDS = {"sigint": [signal.SIGINT], "sigint-twice": [signal.SIGINT, signal.SIGINT], "sigkill": [signal.SIGKILL]}
LOGGED = ("step", "loss", "lr", "grad_norm", "tokens", "samples", "epoch")


def start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def send(process: subprocess.Popen, signals: list[int]) -> None:
    for sig in signals:
        if process.poll() is None:
            os.kill(process.pid, sig)
            time.sleep(0.02)


def check_exit(process: subprocess.Popen, kind: str) -> str:
    """Wait; a Ctrl-C'd command ends with 130 (or 0: it finished first) and at most one error line."""
    _, err = process.communicate(timeout=300)
    if kind == "sigkill":
        assert process.returncode in (0, -signal.SIGKILL), err[-2000:]
        return err
    assert process.returncode in (0, 130), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    if process.returncode == 130:
        final = [line for line in err.splitlines() if line.startswith("tokfleet: interrupted")]
        assert len(final) == 1, err[-2000:]
    return err


def last_logged_step(run_dir: Path) -> int:
    records = read_metrics(run_dir / "metrics.jsonl")
    return records[-1]["step"] if records else 0


# ------------------------------------------------------------------ train


def train_config(tmp_path: Path, dataset: str, name: str) -> str:
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": 150, "seed": 7, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {"dataset": dataset, "num_streams": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "micro_batch_size": 4},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 7, "keep_last": 2},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 0, "num_batches": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def interrupt_training(tmp_path: Path, dataset: str, kind: str, seed: int) -> dict:
    rng = random.Random(seed)
    config = train_config(tmp_path, dataset, kind)
    run_dir = tmp_path / kind
    exits = []
    for round_index in range(ROUNDS):
        process = start(["train", config, *(["--resume", "auto"] if round_index else [])])
        if rng.random() < 0.25:  # during start-up: imports, model build, resume
            time.sleep(rng.uniform(0.6, 2.5))
        else:  # just after a step a few steps ahead (every 7th: while its checkpoint is written)
            target = last_logged_step(run_dir) + rng.randint(1, 6)
            while process.poll() is None and last_logged_step(run_dir) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.03))
        send(process, KINDS[kind])
        check_exit(process, kind)
        exits.append(process.returncode)
        if kind == "sigint":  # (stopping at once may leave a partial checkpoint: the next start removes it)
            assert not list((run_dir / "checkpoints").glob(".step-*"))
    process = start(["train", config, "--resume", "auto"])
    assert process.wait(timeout=600) == 0, process.stderr.read()[-2000:]
    return {"exits": exits, "run_dir": run_dir}


def final_weights(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "checkpoints" / "step-00000150" / "model.safetensors").read_bytes()).hexdigest()


def test_training_interrupted_20_times_ends_as_the_uninterrupted_run(tmp_path, token_dataset):
    reference = start(["train", train_config(tmp_path, token_dataset, "reference")])
    assert reference.wait(timeout=600) == 0
    with ThreadPoolExecutor(len(KINDS)) as pool:
        chains = dict(zip(KINDS, pool.map(lambda item: interrupt_training(tmp_path, token_dataset, item[1], seed=item[0]),
                                          enumerate(KINDS))))
    expected = [{k: r[k] for k in LOGGED} for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")]
    for kind, chain in chains.items():
        assert final_weights(chain["run_dir"]) == final_weights(tmp_path / "reference"), kind
        assert [{k: r[k] for k in LOGGED} for r in read_metrics(chain["run_dir"] / "metrics.jsonl")] == expected, kind
        assert not list((chain["run_dir"] / "checkpoints").glob(".*tmp*")), kind
        if kind != "sigkill":
            assert chain["exits"].count(130) >= ROUNDS // 2, (kind, chain["exits"])  # most rounds were really interrupted
    assert chains["sigkill"]["exits"].count(-signal.SIGKILL) >= ROUNDS // 2


# ------------------------------------------------------------------ prepare


def prepare_config(tmp_path: Path, sources: Path, name: str, ray_address: str) -> str:
    config = {
        "source": {"kind": "tokens", "paths": [f"{sources}/*.txt"]},
        "shards": {"output": str(tmp_path / name), "name": "ids", "seq_len": 64, "source_bytes_per_shard": 1,
                   "val_fraction": 0.2},
        "ray": {"address": ray_address},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def shard_digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


def interrupt_prepare(tmp_path: Path, sources: Path, kind: str, seed: int, ray_address: str) -> dict:
    rng = random.Random(100 + seed)
    config = prepare_config(tmp_path, sources, kind, ray_address)
    exits = []
    for _ in range(ROUNDS):
        process = start(["prepare", config, "--quiet"])
        time.sleep(rng.uniform(0.5, 6.0))
        send(process, KINDS[kind])
        check_exit(process, kind)
        exits.append(process.returncode)
    process = start(["prepare", config, "--quiet"])
    assert process.wait(timeout=600) == 0, process.stderr.read()[-2000:]
    return {"exits": exits, "output": tmp_path / kind}


@pytest.fixture(scope="module")
def token_sources(tmp_path_factory) -> Path:
    """24 files of token ids: 24 + 24 shards to build (a group per file, train and val)."""
    root = tmp_path_factory.mktemp("token-sources")
    rng = random.Random(0)
    for index in range(24):
        (root / f"part-{index:02d}.txt").write_text(" ".join(str(rng.randrange(500)) for _ in range(3000)))
    return root


def test_prepare_interrupted_20_times_builds_the_same_shards(tmp_path, token_sources, ray_head):
    reference = start(["prepare", prepare_config(tmp_path, token_sources, "reference", ray_head.gcs_address), "--quiet"])
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    with ThreadPoolExecutor(len(KINDS)) as pool:
        chains = dict(zip(KINDS, pool.map(
            lambda item: interrupt_prepare(tmp_path, token_sources, item[1], item[0], ray_head.gcs_address), enumerate(KINDS))))
    expected = shard_digests(tmp_path / "reference")
    manifest = json.loads((tmp_path / "reference" / "manifest.json").read_text())
    for kind, chain in chains.items():
        assert shard_digests(chain["output"]) == expected, kind
        built = json.loads((chain["output"] / "manifest.json").read_text())
        assert [(s["name"], s["sha256"], s["num_samples"]) for s in built["shards"]] == \
            [(s["name"], s["sha256"], s["num_samples"]) for s in manifest["shards"]], kind
        assert not [p for p in chain["output"].iterdir() if ".tmp" in p.name], kind  # no partial files left
        if kind != "sigkill":
            assert 130 in chain["exits"], (kind, chain["exits"])
