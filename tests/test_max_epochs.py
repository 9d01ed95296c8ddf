"""run.max_epochs: a run's length in passes over the train split, turned into optimizer steps from the
manifest's sample count and the global batch, recomputed from the samples left on an elastic resume.

The datasets are equal shards with data.num_streams = number of shards (conftest.write_token_dataset),
so every rank reads the same number of samples per epoch and each sample's count can be checked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from conftest import write_token_dataset
from core.config import OptimConfig, RunConfig, TrainConfig, load_config
from core.schema import ConfigError
from test_distributed import all_keys, env, epoch_keys, keys_by_rank, run, write_config
from trainer.metrics import read_metrics
from trainer.optim import lr_factor, schedule_span


def seen(run_dir) -> Counter:
    """How often each sample key was trained on, over every rank's key log."""
    return Counter(key for entries in keys_by_rank(run_dir).values() for _, _, key in entries)


@pytest.mark.parametrize("epochs, samples, micro, accum, world", [
    (2, 96, 8, 1, 1), (2, 96, 4, 1, 2), (3, 96, 4, 2, 4), (1, 100, 8, 1, 3), (5, 7, 2, 3, 2), (1, 96, 96, 1, 1), (2, 96, 128, 1, 1),
])
def test_steps_are_the_samples_over_the_global_batch(epochs, samples, micro, accum, world):
    run_cfg, optim = RunConfig(max_epochs=epochs), OptimConfig(micro_batch_size=micro, grad_accum_steps=accum)
    span = schedule_span(run_cfg, optim, samples, world)
    assert span.max_steps == -(-epochs * samples // (micro * accum * world)) and span.offset == 0
    # resumed at another world size after 3 steps of the first: the rest of the samples in the new batches
    done = 3 * micro * accum * world
    for new_world in (1, 2, 5):
        batch = micro * accum * new_world
        resumed = schedule_span(run_cfg, optim, samples, new_world, step=3, samples_seen=done)
        assert resumed.max_steps == 3 + max(0, math.ceil((epochs * samples - done) / batch))
        # the resumed step sits where the samples seen put it on a schedule of this batch size
        assert resumed.offset == pytest.approx(done / batch - 3)


def test_max_steps_runs_keep_their_length_and_schedule():
    optim = OptimConfig(micro_batch_size=4)
    assert RunConfig().max_steps == 1000 and RunConfig().max_epochs is None  # neither set: the old default
    span = schedule_span(RunConfig(max_steps=50), optim, 96, 2, step=10, samples_seen=10 * 4)  # resumed at 2 ranks after 1
    assert (span.max_steps, span.offset) == (50, 0.0)


def test_both_lengths_in_one_config_is_an_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "d"}, "run": {"max_steps": 100}}))
    with pytest.raises(ConfigError, match=r"run\.max_steps \(100\) and run\.max_epochs \(2\) are both set") as error:
        load_config(path, TrainConfig, ["run.max_epochs=2"])
    assert "--set run.max_epochs=2" in str(error.value)
    assert load_config(path, TrainConfig, ["run.max_epochs=2", "run.max_steps=null"]).run.max_epochs == 2

    # through the CLI: exit 2, one line, before anything is written
    run_dir = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "trainer", str(path), "--set", f"run.output_dir={run_dir}",
                             "--set", "run.max_epochs=2"], capture_output=True, text=True, env=env(), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "run.max_steps" in lines[0] and "run.max_epochs" in lines[0], result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("micro, accum, steps, extra", [(4, 2, 6, 0), (5, 1, 10, 2)])
def test_one_rank_trains_each_sample_max_epochs_times(tmp_path, micro, accum, steps, extra):
    """24 samples x 2 epochs: 48 / 8 = 6 steps exactly; in batches of 5, ceil(48 / 5) = 10 steps, whose
    last batch ends with the first 2 samples of epoch 2 (the loader fills a batch across an epoch's end)."""
    from trainer.loop import Trainer

    dataset = write_token_dataset(tmp_path / "data", num_shards=4, samples_per_shard=6, val_samples=4)
    config = write_config(tmp_path, dataset, "one", {"kind": "single"}, micro=micro, run={"max_steps": None, "max_epochs": 2},
                          optim={"grad_accum_steps": accum}, checkpoint={"every_steps": 0})
    summary = Trainer(load_config(config, TrainConfig)).train()
    run_dir = tmp_path / "one"
    assert summary["finished"] and summary["step"] == summary["max_steps"] == steps
    assert summary["epochs"] == pytest.approx((48 + extra) / 24)
    state = json.loads((run_dir / "checkpoints" / f"step-{steps:08d}" / "trainer_state.json").read_text())
    assert state["max_steps"] == steps and state["samples"] == 48 + extra
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, steps + 1))
    assert epoch_keys(run_dir, 0) == epoch_keys(run_dir, 1) == all_keys(dataset)
    assert sum(epoch_keys(run_dir, 2).values()) == extra
    if not extra:
        assert seen(run_dir) == Counter({key: 2 for key in all_keys(dataset)})


def test_elastic_resume_ends_after_the_same_epochs(tmp_path):
    """2 ranks x 4 (8 steps for 2 epochs of 32) stopped after step 3, resumed on 1 rank x 4: the 40 samples
    left take 10 steps (max_steps 13), every sample is trained on twice, and the LR follows the fraction
    of samples seen across the change of batch size."""
    dataset = write_token_dataset(tmp_path / "data", num_shards=4, samples_per_shard=8, val_samples=4)
    ddp = {"kind": "accelerate", "strategy": "ddp"}
    sections = dict(run={"max_steps": None, "max_epochs": 2}, checkpoint={"every_steps": 0},
                    optim={"schedule": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.1})
    run("torchrun", 2, write_config(tmp_path, dataset, "elastic", ddp, micro=4, **sections), "--stop-at-step", "3")
    run_dir = tmp_path / "elastic"
    state = json.loads((run_dir / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert (state["max_steps"], state["samples"], state["world_size"], state["epochs"]) == (8, 24, 2, 0.75)

    result = run("python", 1, write_config(tmp_path, dataset, "elastic", ddp, micro=4, **sections), "--resume", "auto")
    summary = next(json.loads(line) for line in reversed(result.stderr.splitlines()) if line.startswith('{"step"'))
    assert "max_steps 13" in result.stderr and (summary["step"], summary["max_steps"], summary["epochs"]) == (13, 13, 2.0)
    state = json.loads((run_dir / "checkpoints" / "step-00000013" / "trainer_state.json").read_text())
    assert (state["max_steps"], state["samples"], state["world_size"], state["epochs"]) == (13, 64, 1, 2.0)
    assert seen(run_dir) == Counter({key: 2 for key in all_keys(dataset)})
    assert epoch_keys(run_dir, 0) == epoch_keys(run_dir, 1) == all_keys(dataset)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 14)) and records[-1]["epochs"] == 2.0
    optim = OptimConfig(schedule="cosine", warmup_steps=0, min_lr_ratio=0.1, lr=3e-3)
    for record in records:  # the LR of a step: the cosine at the fraction of the 64 samples seen before it
        before = record["samples"] - 4 * record["world_size"]
        assert record["lr"] == pytest.approx(3e-3 * lr_factor(before, optim, 64), rel=1e-6), record["step"]
