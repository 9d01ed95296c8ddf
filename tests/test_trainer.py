"""The single-device trainer: exact resume, crash safety, precision modes, bad inputs, generation.

Every run here is a real `python -m trainer` / `tokfleet` process on the session's text dataset
(built once with the real Ray pipeline in conftest), on CPU in fp32 unless said otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from trainer.metrics import read_metrics

STEPS = 6  # 2N with N = 3


def write_config(tmp_path: Path, dataset: str, name: str = "run", **sections) -> Path:
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": STEPS, "seed": 7, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {"dataset": dataset, "num_streams": 8, "log_sample_keys": True},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "micro_batch_size": 4, "grad_accum_steps": 1},
        "checkpoint": {"every_steps": 3, "keep_last": 3},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 3, "num_batches": 2},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trainer", str(config), *args], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def consumed_keys(run_dir: Path) -> list[str]:
    lines = (run_dir / "logs" / "sample_keys-rank0.jsonl").read_text().splitlines()
    return [key for line in lines for key in json.loads(line)["keys"]]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, text_dataset):
    """The reference: 2N steps without interruption."""
    tmp = tmp_path_factory.mktemp("straight")
    config = write_config(tmp, text_dataset, "straight")
    train(config)
    return tmp / "straight"


def test_metrics_and_run_dir(straight_run):
    records = read_metrics(straight_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        for key in ("step", "loss", "lr", "tokens", "samples", "tokens_per_s", "world_size", "mfu", "grad_norm"):
            assert key in record
        assert record["world_size"] == 1 and 0 < record["mfu"] < 1 and record["tokens_per_s"] > 0
    assert records[-1]["samples"] == STEPS * 4
    assert records[-1]["tokens"] == STEPS * 4 * 64  # the session dataset has seq_len 64
    assert records[0]["lr"] == pytest.approx(3e-3 / 2)  # warmup step 1 of 2
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert (straight_run / "config.yaml").is_file() and (straight_run / "plots" / "loss.png").stat().st_size > 0
    assert (straight_run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    state = json.loads((straight_run / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 1 and state["model"]["args"]["n_layer"] == 2
    assert state["rank_states"]["num_ranks"] == 1 and "rng" not in state  # each rank's state is in ranks/
    own = json.loads((straight_run / "checkpoints" / "step-00000006" / "ranks" / "state-rank00000.json").read_text())
    assert own["step"] == STEPS and own["data"]["loader"]["positions"]


def test_resume_is_exact(tmp_path, text_dataset, straight_run):
    config = write_config(tmp_path, text_dataset, "resumed")
    train(config, "--stop-at-step", "3")
    run_dir = tmp_path / "resumed"
    assert sorted(losses(run_dir)) == [1, 2, 3]
    train(config, "--resume", "auto")
    # fp32 on CPU, same process layout: the continued run is bitwise the uninterrupted one
    assert losses(run_dir) == losses(straight_run)
    assert consumed_keys(run_dir) == consumed_keys(straight_run)
    assert len(set(consumed_keys(run_dir))) == STEPS * 4


def to_single_file_format(checkpoint: Path) -> None:
    """Rewrite a checkpoint as tokfleet wrote them before the per-rank files: every rank's loader state,
    RNG and step losses inside trainer_state.json (its COMPLETE marker updated to match)."""
    import shutil

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    ranks = range(state.pop("rank_states")["num_ranks"])
    parts = [json.loads((checkpoint / "ranks" / f"state-rank{r:05d}.json").read_text()) for r in ranks]
    state["data"] = {**state["data"], "rank_states": [part["data"] for part in parts]}
    state["rng"] = [json.loads((checkpoint / "ranks" / f"rng-rank{r:05d}.json").read_text())["rng"] for r in ranks]
    state["loss_window"] = [part["loss_window"] for part in parts]
    shutil.rmtree(checkpoint / "ranks")
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["files"] = {name: size for name, size in marker["files"].items() if not name.startswith("ranks/")}
    marker["files"]["trainer_state.json"] = (checkpoint / "trainer_state.json").stat().st_size
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


def test_a_checkpoint_of_the_single_file_format_resumes_exactly(tmp_path, text_dataset, straight_run):
    config = write_config(tmp_path, text_dataset, "single")
    train(config, "--stop-at-step", "3")
    to_single_file_format(tmp_path / "single" / "checkpoints" / "step-00000003")
    train(config, "--resume", "auto")
    assert losses(tmp_path / "single") == losses(straight_run)
    assert consumed_keys(tmp_path / "single") == consumed_keys(straight_run)


def test_resume_with_another_num_streams_is_one_line(tmp_path, text_dataset, straight_run):
    config = write_config(tmp_path, text_dataset, "other", data={"num_streams": 4})
    result = train(config, "--resume", str(straight_run / "checkpoints" / "latest"), check=False)
    assert result.returncode == 2 and "written with data.num_streams 8, this run has 4" in result.stderr.strip().splitlines()[-1]


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from trainer.engines import single
    original = single.SingleDeviceEngine.save_checkpoint
    def save_then_die(self, directory):
        original(self, directory)
        if directory.name.startswith(".step-00000006"):
            os.kill(os.getpid(), signal.SIGKILL)  # model and optimizer written, no marker yet
    single.SingleDeviceEngine.save_checkpoint = save_then_die
    from trainer.entry import main
    main(sys.argv[1:])
""")


def test_kill_during_checkpoint_write_resumes_from_previous(tmp_path, text_dataset, straight_run):
    config = write_config(tmp_path, text_dataset, "killed")
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(config)], capture_output=True, text=True)
    assert result.returncode == -9
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000003"
    assert any(p.name.startswith(".step-00000006") for p in checkpoints.iterdir())  # the torn write
    train(config, "--resume", "auto")
    assert losses(tmp_path / "killed") == losses(straight_run)
    assert consumed_keys(tmp_path / "killed") == consumed_keys(straight_run)
    assert not any(p.name.startswith(".") for p in checkpoints.iterdir() if p.name != ".")


def test_retention_keeps_last(tmp_path, text_dataset):
    config = write_config(tmp_path, text_dataset, "keep", checkpoint={"every_steps": 1, "keep_last": 2})
    train(config, "--set", "run.max_steps=4", "--set", "eval.every_steps=0")
    names = sorted(p.name for p in (tmp_path / "keep" / "checkpoints").iterdir())
    assert names == ["latest", "step-00000003", "step-00000004"]


def test_grad_accumulation_matches_bigger_batch(tmp_path, text_dataset):
    big = write_config(tmp_path, text_dataset, "big", optim={"micro_batch_size": 4, "grad_accum_steps": 1})
    accum = write_config(tmp_path, text_dataset, "accum", optim={"micro_batch_size": 2, "grad_accum_steps": 2})
    for config in (big, accum):
        train(config, "--set", "run.max_steps=3", "--set", "eval.every_steps=0")
    a, b = losses(tmp_path / "big"), losses(tmp_path / "accum")
    # same samples in the same order, summed in a different grouping: float rounding only
    assert list(a) == list(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    assert consumed_keys(tmp_path / "big") == consumed_keys(tmp_path / "accum")


def test_bf16_trains_and_resumes(tmp_path, text_dataset):
    config = write_config(tmp_path, text_dataset, "bf16", engine={"precision": "bf16"},
                          model={"name": "gpt", "flavor": "debug", "args": {"n_layer": 1, "n_embd": 32}},
                          optim={"micro_batch_size": 2})
    train(config, "--set", "run.max_steps=4", "--set", "eval.every_steps=0", "--set", "checkpoint.every_steps=2")
    run_dir = tmp_path / "bf16"
    values = losses(run_dir)
    assert len(values) == 4 and all(0 < v < 20 for v in values.values())
    train(config, "--set", "run.max_steps=5", "--set", "eval.every_steps=0", "--resume", "auto")
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5]


def test_fp16_is_refused_on_cpu(tmp_path, text_dataset):
    config = write_config(tmp_path, text_dataset, "fp16", engine={"precision": "fp16"})
    result = train(config, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "tokfleet: error: engine.precision fp16 needs a GPU (CUDA); on CPU use bf16 or fp32"
    assert not (tmp_path / "fp16").exists()  # refused before the run dir is made


def test_fp16_grad_scaler_is_checkpointed(tmp_path):
    """The single engine's fp16 path (GPU runs) on its own: loss scaling steps, and the scaler's state
    is saved and loaded with the optimizer's."""
    import torch

    from core.config import EngineConfig, OptimConfig
    from modeling.registry import build_model
    from trainer.engines.single import SingleDeviceEngine

    def engine():
        torch.manual_seed(0)
        model = build_model("gpt", "debug", {"n_layer": 1, "n_embd": 32, "vocab_size": 64, "sequence_len": 16}, device="cpu")
        return SingleDeviceEngine(model, OptimConfig(lr=1e-3, warmup_steps=0), EngineConfig(precision="fp16"), 4, torch.device("cpu"))

    first = engine()
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = first.forward_backward({"idx": tokens[:, :-1], "targets": tokens[:, 1:]}, 1.0)
    first.optimizer_step()
    assert torch.isfinite(loss) and first.scaler is not None and first.scaler.get_scale() > 0
    first.save_checkpoint(tmp_path)
    assert torch.load(tmp_path / "optimizer.pt")["scaler"]["scale"] == first.scaler.get_scale()
    second = engine()
    second.load_checkpoint(tmp_path)
    assert second.scaler.get_scale() == first.scaler.get_scale()


def test_wandb_offline_run(tmp_path, text_dataset):
    config = write_config(tmp_path, text_dataset, "wb", logging={"every_steps": 1, "progress": False, "wandb": True})
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, "-m", "trainer", str(config), "--set", "run.max_steps=2"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


# ----------------------------------------------------------------- bad inputs


def test_checkpoint_of_other_architecture_exits_2(tmp_path, text_dataset, straight_run):
    config = write_config(tmp_path, text_dataset, "other", model={"name": "gpt", "flavor": "debug", "args": {"n_layer": 3}})
    result = train(config, "--resume", str(straight_run / "checkpoints" / "step-00000006"), check=False)
    assert result.returncode == 2
    assert "different architecture" in result.stderr and "n_layer=2" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_checkpoint_files_exit_2(tmp_path, text_dataset, straight_run):
    import shutil

    for victim in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        copy = tmp_path / victim / "step-00000006"
        shutil.copytree(straight_run / "checkpoints" / "step-00000006", copy)
        data = (copy / victim).read_bytes()
        (copy / victim).write_bytes(data[: len(data) // 2])
        config = write_config(tmp_path, text_dataset, f"c-{victim}")
        result = train(config, "--resume", str(copy), check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "corrupt" in result.stderr and victim in result.stderr
        assert (copy / victim).stat().st_size == len(data) // 2  # nothing rewritten


def test_incomplete_or_missing_checkpoint_exit_2(tmp_path, text_dataset, straight_run):
    import shutil

    copy = tmp_path / "step-00000006"
    shutil.copytree(straight_run / "checkpoints" / "step-00000006", copy)
    (copy / "COMPLETE").unlink()
    config = write_config(tmp_path, text_dataset, "inc")
    result = train(config, "--resume", str(copy), check=False)
    assert result.returncode == 2 and "incomplete" in result.stderr
    result = train(config, "--resume", str(tmp_path / "nowhere"), check=False)
    assert result.returncode == 2 and "checkpoint not found" in result.stderr


def test_missing_dataset_exits_2(tmp_path):
    config = write_config(tmp_path, str(tmp_path / "no-such-dataset"), "nodata")
    result = train(config, check=False)
    assert result.returncode == 2 and "manifest not found" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------- generate / inspect


def tokfleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True)


def test_generate_from_run_dir(straight_run):
    result = tokfleet("generate", "--checkpoint", str(straight_run), "--prompt", "def main(", "--max-new-tokens", "10",
                      "--temperature", "0", "--num-samples", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    samples = result.stdout.split("--- sample 1 ---")
    assert len(samples) == 2 and all("def main(" in s for s in samples)
    assert samples[0].replace("--- sample 0 ---", "").strip() == samples[1].strip()  # greedy: identical


def test_inspect_checkpoint(straight_run):
    result = tokfleet("inspect", str(straight_run))
    assert result.returncode == 0, result.stderr
    assert "step 6" in result.stdout and "world size 1" in result.stdout and "engine single" in result.stdout


def test_dataloader_workers_resume_exactly(tmp_path, text_dataset, straight_run):
    # one worker process reads exactly what the in-process loader reads
    one = write_config(tmp_path, text_dataset, "w1", data={"dataset": text_dataset, "num_streams": 8,
                                                          "log_sample_keys": True, "num_workers": 1})
    train(one, "--set", "eval.every_steps=0")
    assert consumed_keys(tmp_path / "w1") == consumed_keys(straight_run)
    # two workers: a different interleaving, but a stop + resume continues it sample for sample
    two = {"dataset": text_dataset, "num_streams": 8, "log_sample_keys": True, "num_workers": 2}
    straight = write_config(tmp_path, text_dataset, "w2", data=two)
    resumed = write_config(tmp_path, text_dataset, "w2r", data=two)
    train(straight, "--set", "eval.every_steps=0")
    train(resumed, "--set", "eval.every_steps=0", "--stop-at-step", "3")
    train(resumed, "--set", "eval.every_steps=0", "--resume", "auto")
    keys = consumed_keys(tmp_path / "w2r")
    assert keys == consumed_keys(tmp_path / "w2") and len(set(keys)) == STEPS * 4
    assert losses(tmp_path / "w2r") == losses(tmp_path / "w2")
