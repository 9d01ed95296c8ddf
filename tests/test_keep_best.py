"""checkpoint.keep_best: `checkpoints/best` names the checkpoint with the best logged metric so far,
keep_last never deletes it, the best survives a resume (same and other world size), `--resume best`
loads it, generate / export / inspect take `RUN/checkpoints/best`, and bad settings exit 2 with one line.

Runs use mode `max` of a falling loss, so the best is the oldest checkpoint and keep_last 1 would
delete it: what the pointer must prevent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from core.config import TrainConfig, load_config
from trainer.checkpoint import is_complete, verify_checkpoint
from trainer.engines.single import load_model_state
from trainer.metrics import read_metrics

from test_distributed import env, launcher_command

STEPS = 8


def write_config(tmp_path: Path, dataset: str, name: str = "run", **sections) -> Path:
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": STEPS, "seed": 3, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {"dataset": dataset, "num_streams": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "micro_batch_size": 4},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 2, "keep_last": 1, "keep_best": "val_loss", "keep_best_mode": "max"},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 2, "num_batches": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, *overrides: str, **kwargs) -> dict:
    from trainer.loop import Trainer

    return Trainer(load_config(config, TrainConfig, list(overrides)), **kwargs).train()


def listing(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def pointer(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "best").read_text().strip()


def expected_best(run_dir: Path, metric: str, checkpoint_steps: list[int], mode: str = "max") -> tuple[int, float]:
    """(step, value): the best `metric` metrics.jsonl logged at a checkpoint step."""
    logged = {r["step"]: r[metric] for r in read_metrics(run_dir / "metrics.jsonl") if metric in r}
    return (max if mode == "max" else min)(((step, logged[step]) for step in checkpoint_steps), key=lambda item: item[1])


def best_state(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "checkpoints" / name / "trainer_state.json").read_text())["best"]


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, token_dataset) -> Path:
    """4 steps (checkpoints 2, 4), then a resume to 8 (checkpoints 6, 8), keep_last 1; the listing after
    the first part is kept in `first_listing`."""
    tmp = tmp_path_factory.mktemp("best")
    config = write_config(tmp, token_dataset)
    train(config, stop_at_step=4)
    run_dir = tmp / "run"
    (tmp / "first_listing.json").write_text(json.dumps([listing(run_dir), pointer(run_dir)]))
    train(config, resume="auto")
    return run_dir


def test_best_survives_keep_last_and_resume(best_run):
    first_listing, first_pointer = json.loads((best_run.parent / "first_listing.json").read_text())
    step, value = expected_best(best_run, "val_loss", [2, 4, 6, 8])
    assert step == 2  # the loss falls: the oldest checkpoint is the best by max
    assert first_pointer == "step-00000002" and first_listing == ["best", "latest", "step-00000002", "step-00000004"]
    # resumed: 4 and 6 were pruned (keep_last 1), the best was not, and the resumed run compared against it
    assert listing(best_run) == ["best", "latest", "step-00000002", "step-00000008"]
    assert pointer(best_run) == "step-00000002"
    best = best_run / "checkpoints" / "step-00000002"
    assert is_complete(best) and verify_checkpoint(best) == []
    assert best_state(best_run, "step-00000008") == {"metric": "val_loss", "mode": "max", "step": 2, "value": value}
    assert best_state(best_run, "step-00000002") == {"metric": "val_loss", "mode": "max", "step": 2, "value": value}


def test_resume_best_loads_the_best_checkpoint(best_run, tmp_path):
    from trainer.loop import Trainer

    copy = tmp_path / "copy"
    shutil.copytree(best_run, copy)  # --resume best continues from step 2: metrics after it are dropped
    config = best_run.parent / "run.yaml"
    trainer = Trainer(load_config(config, TrainConfig, [f"run.output_dir={copy}"]), resume="best")
    assert trainer.resumed_from == copy / "checkpoints" / "step-00000002" and trainer.step == 2
    saved = load_model_state(copy / "checkpoints" / "step-00000002")
    held = trainer.engine.full_state_dict()
    assert set(held) == set(saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(held[name], tensor.float(), rtol=0, atol=0)
    latest = load_model_state(copy / "checkpoints" / "step-00000008")
    assert any(not torch.equal(latest[name], tensor) for name, tensor in saved.items())  # not the latest's weights
    assert trainer.best.step == 2 and trainer.best.value == best_state(copy, "step-00000002")["value"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from launch.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_export_inspect_through_the_pointer(best_run, tmp_path, capsys):
    pointer_path = str(best_run / "checkpoints" / "best")
    step_path = str(best_run / "checkpoints" / "step-00000002")
    generate = ["generate", "--prompt-tokens", "5 6 7", "--max-new-tokens", "6", "--seed", "1"]
    code, via_pointer, err = cli(capsys, *generate, "--checkpoint", pointer_path)
    assert code == 0, err
    code, via_folder, err = cli(capsys, *generate, "--checkpoint", step_path)
    assert code == 0, err
    assert via_pointer == via_folder and via_pointer.split()[:3] == ["5", "6", "7"] and len(via_pointer.split()) == 9

    code, out, err = cli(capsys, "export", pointer_path, "--out", str(tmp_path / "exported"))
    assert code == 0, err
    exported = json.loads((tmp_path / "exported" / "trainer_state.json").read_text())
    assert exported["step"] == 2 and exported["exported_from"]["checkpoint"] == str(Path(step_path).resolve())

    _, value = expected_best(best_run, "val_loss", [2])
    code, out, err = cli(capsys, "inspect", str(best_run))
    assert code == 0, err
    assert "checkpoint " + str(best_run / "checkpoints" / "step-00000008") in out
    assert f"best checkpoint: step-00000002 (val_loss {value:.6g}, max)" in out
    code, out, err = cli(capsys, "inspect", str(best_run / "checkpoints" / "latest"))
    assert code == 0 and "step 8," in out
    code, out, err = cli(capsys, "inspect", pointer_path)
    assert code == 0 and out.startswith(f"checkpoint {step_path}\n") and "step 2," in out


def test_two_ranks_write_one_best_and_it_survives_an_elastic_resume(tmp_path, token_dataset):
    """torchrun, 2 ranks, Accelerate DDP: checkpoints 2 and 4 (best by max loss: 2); then 1 rank (DDP's
    whole-tensor checkpoint, resumed by the single-device engine) continues to 8."""
    config = write_config(tmp_path, token_dataset, "two", engine={"kind": "accelerate", "strategy": "ddp"},
                          optim={"micro_batch_size": 2}, checkpoint={"keep_best": "loss"}, eval={"every_steps": 0})
    run_dir = tmp_path / "two"
    command = [*launcher_command("torchrun", 2), str(config), "--stop-at-step", "4"]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(run_dir) == ["best", "latest", "step-00000002", "step-00000004"] and pointer(run_dir) == "step-00000002"
    step, value = expected_best(run_dir, "loss", [2, 4])
    assert step == 2 and best_state(run_dir, "step-00000004") == {"metric": "loss", "mode": "max", "step": 2, "value": value}
    assert json.loads((run_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["world_size"] == 2

    train(config, "engine.kind=single", "engine.strategy=auto", "optim.micro_batch_size=4", resume="auto")
    assert expected_best(run_dir, "loss", [2, 4, 6, 8]) == (step, value)
    assert listing(run_dir) == ["best", "latest", "step-00000002", "step-00000008"] and pointer(run_dir) == "step-00000002"
    assert best_state(run_dir, "step-00000008") == {"metric": "loss", "mode": "max", "step": 2, "value": value}
    assert [r["world_size"] for r in read_metrics(run_dir / "metrics.jsonl")] == [2] * 4 + [1] * 4


@pytest.mark.parametrize("settings, message", [
    ({"data": {"val_split": ""}}, "data.val_split is '' (no validation)"),
    ({"eval": {"every_steps": 0}}, "eval.every_steps is 0 (validation only at the end)"),
    ({"eval": {"every_steps": 3}}, "checkpoint.every_steps 2 is not a multiple of eval.every_steps 3"),
    ({"checkpoint": {"keep_best": "loss"}, "logging": {"every_steps": 4}},
     "checkpoint.every_steps 2 is not a multiple of logging.every_steps 4"),
    ({"checkpoint": {"keep_best_mode": "lowest"}}, "'checkpoint.keep_best_mode' = 'lowest' must be one of 'min', 'max'"),
])
def test_bad_settings_exit_2_with_one_line_before_writing(tmp_path, token_dataset, capsys, settings, message):
    from trainer.entry import main

    config = write_config(tmp_path, token_dataset, **settings)
    with pytest.raises(SystemExit) as exit:
        main([str(config)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"tokfleet: error: {config}: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_unknown_metric_exits_2_at_the_first_checkpoint(tmp_path, token_dataset, capsys):
    from trainer.entry import main

    config = write_config(tmp_path, token_dataset, checkpoint={"keep_best": "val_los"})
    with pytest.raises(SystemExit) as exit:
        main([str(config)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("tokfleet: error: checkpoint.keep_best: 'val_los' was not logged at step 2 "
                               "(metrics.jsonl records hold: epoch, epochs, grad_norm, loss, lr") and "val_loss" in lines[0], lines[0]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]  # what was logged is kept
    assert listing(tmp_path / "run") == []


def test_a_stop_between_evaluations_is_no_candidate(tmp_path, token_dataset):
    config = write_config(tmp_path, token_dataset, checkpoint={"keep_best_mode": "min"})
    train(config, stop_at_step=1)  # logged step 1 without val_loss: checkpointed, not compared
    assert listing(tmp_path / "run") == ["latest", "step-00000001"]
    assert best_state(tmp_path / "run", "step-00000001") == {"metric": "val_loss", "mode": "min", "step": None, "value": None}
    train(config, "run.max_steps=4", resume="auto")
    step, value = expected_best(tmp_path / "run", "val_loss", [2, 4], mode="min")
    assert step == 4 and pointer(tmp_path / "run") == "step-00000004"  # min of a falling loss: the newest
    assert listing(tmp_path / "run") == ["best", "latest", "step-00000004"]
    assert best_state(tmp_path / "run", "step-00000004") == {"metric": "val_loss", "mode": "min", "step": 4, "value": value}


def test_resume_best_without_a_pointer_is_one_line(tmp_path, token_dataset, capsys):
    from trainer.entry import main

    config = write_config(tmp_path, token_dataset, checkpoint={"keep_best": None})
    train(config, "run.max_steps=2")
    for argv, message in (([str(config), "--resume", "best"], f"--resume best: {tmp_path / 'run' / 'checkpoints'} has no best pointer"),
                          ([str(config), "--resume", str(tmp_path / "run" / "checkpoints" / "best")],
                           f"{tmp_path / 'run' / 'checkpoints' / 'best'} does not exist: the run has no best checkpoint yet")):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert listing(tmp_path / "run") == ["latest", "step-00000002"]  # nothing lost
