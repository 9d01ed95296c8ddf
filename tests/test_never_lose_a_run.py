"""Never lose a run (issue 15): a fresh run or build refuses to write over a complete one (or moves it
aside with --overwrite), OS faults (a full or read-only filesystem) end in one line that says what is
intact, a damaged newest checkpoint is passed over on resume and reported by inspect, and the metrics
logged after a resume equal the uninterrupted run's at every logged step.

Full and read-only filesystems are real: small tmpfs mounts (the suite runs as root)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import cli_error
from launch.cli import main
from trainer.metrics import read_metrics



def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real filesystem of `size` at `path` (unmounted afterwards)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def write_config(tmp_path: Path, dataset: str, run_dir: Path, steps: int = 6, **sections) -> str:
    config = {
        "run": {"name": "gpt", "output_dir": str(run_dir), "max_steps": steps, "seed": 3, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {"dataset": dataset, "num_streams": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "micro_batch_size": 4},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 3, "keep_last": 5},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 0, "num_batches": 1},
    }
    for section, values in sections.items():
        config[section].update(values)
    path = tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


# ------------------------------------------------------------------ refusing to overwrite


def test_train_into_a_run_dir_with_checkpoints_is_refused_or_moves_it_aside(tmp_path, token_dataset, capsys):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, token_dataset, run_dir)
    main(["train", config])
    before = digests(run_dir)
    error = cli_error(capsys, ["train", config])
    assert f"run.output_dir {run_dir} already holds a run (checkpoints up to step 6): continue it with --resume auto" in error
    assert "--overwrite" in error and digests(run_dir) == before
    assert "does not go with --resume" in cli_error(capsys, ["train", config, "--resume", "auto", "--overwrite"])
    # --overwrite: the old run is moved aside, whole, and a new one starts
    main(["train", config, "--overwrite", "--set", "run.max_steps=3"])
    assert digests(tmp_path / "run.old-1") == before
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000003"]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]  # no records of the old run
    main(["train", config, "--overwrite", "--set", "run.max_steps=3"])
    assert (tmp_path / "run.old-2").is_dir() and digests(tmp_path / "run.old-1") == before


def test_a_fresh_start_drops_the_records_of_a_run_that_never_checkpointed(tmp_path, token_dataset):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
    main(["train", write_config(tmp_path, token_dataset, run_dir, steps=2)])
    assert [r["loss"] != 99.0 for r in read_metrics(run_dir / "metrics.jsonl")] == [True, True]


def test_prepare_into_a_dataset_made_with_other_settings_is_refused_or_moves_it_aside(ray_session, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i % 97) for i in range(3000)))
    output = tmp_path / "dataset"
    config = {"source": {"kind": "tokens", "paths": [str(ids)]},
              "shards": {"output": str(output), "name": "ids", "seq_len": 32, "val_fraction": 0.2}}
    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["prepare", str(path), "--quiet"])
    before = digests(output)
    main(["prepare", str(path), "--quiet"])  # the same settings: nothing to do
    assert "nothing to build" in capsys.readouterr().out and digests(output) == before
    error = cli_error(capsys, ["prepare", str(path), "--quiet", "--set", "token_ids.vocab_size=300"])
    assert f"{output} holds a dataset made with other settings (config.token_ids.vocab_size: 0 -> 300)" in error
    assert digests(output) == before
    main(["prepare", str(path), "--quiet", "--set", "token_ids.vocab_size=300", "--overwrite"])
    assert digests(tmp_path / "dataset.old-1") == before
    assert json.loads((output / "manifest.json").read_text())["vocab_size"] == 300


# ------------------------------------------------------------------ full and read-only filesystems


def test_a_full_disk_during_a_checkpoint_says_what_is_intact(tmp_path, token_dataset, capsys):
    with tmpfs(tmp_path / "small", "2500k") as disk:
        run_dir = disk / "run"
        config = write_config(tmp_path, token_dataset, run_dir, steps=12, checkpoint={"every_steps": 3, "keep_last": 10})
        error = cli_error(capsys, ["train", config])
        saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
        assert saved and "No space left on device writing checkpoint step " in error
        assert error.endswith(f"; {saved[-1]} is intact"), error
        assert not list((run_dir / "checkpoints").glob(".step-*"))  # the partial checkpoint is gone
        from trainer.checkpoint import verify_checkpoint

        assert all(verify_checkpoint(run_dir / "checkpoints" / name) == [] for name in saved)


def test_a_read_only_filesystem_ends_in_one_line(tmp_path, token_dataset, capsys):
    with tmpfs(tmp_path / "ro", "4m") as disk:
        run_dir = disk / "run"
        config = write_config(tmp_path, token_dataset, run_dir, steps=3)
        main(["train", config])
        before = digests(run_dir)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert "Read-only file system" in cli_error(capsys, ["train", config, "--resume", "auto", "--set", "run.max_steps=6"])
        assert "Read-only file system" in cli_error(capsys, ["export", str(run_dir), "--out", str(disk / "exported")])
        assert digests(run_dir) == before
    assert "Not a directory" in cli_error(capsys, ["train", write_config(tmp_path, token_dataset, Path(token_dataset) / "manifest.json")])
    assert "/proc/no-such-run" in cli_error(capsys, ["train", write_config(tmp_path, token_dataset, Path("/proc/no-such-run"))])


def test_prepare_and_export_on_full_and_read_only_filesystems(ray_session, tmp_path, token_dataset, capsys):
    """prepare into a full or read-only filesystem, export into a full one: exit 2, one line naming the
    path and the fault; complete shards stay, nothing half-written stays."""
    ids = tmp_path / "ids"
    ids.mkdir()
    for index in range(6):  # ~60 KB of shards per file
        (ids / f"part-{index}.txt").write_text(" ".join(str((i * 7 + index) % 500) for i in range(30_000)))
    run_dir = tmp_path / "run"
    main(["train", write_config(tmp_path, token_dataset, run_dir, steps=3)])
    with tmpfs(tmp_path / "full", "200k") as disk:
        config = {"source": {"kind": "tokens", "paths": [f"{ids}/*.txt"]},
                  "shards": {"output": str(disk / "dataset"), "name": "ids", "seq_len": 64, "source_bytes_per_shard": 1,
                             "val_fraction": 0.2}}
        path = tmp_path / "prepare.yaml"
        path.write_text(yaml.safe_dump(config))
        error = cli_error(capsys, ["prepare", str(path), "--quiet"])
        assert "No space left on device" in error and f"building shards in {disk / 'dataset'} stopped" in error
        assert "complete shards are kept" in error
        assert not [p for p in (disk / "dataset").iterdir() if ".tmp" in p.name]
        error = cli_error(capsys, ["export", str(run_dir), "--out", str(disk / "exported")])
        assert error.endswith(f"No space left on device writing {disk / 'exported'}: nothing was written; "
                              f"{run_dir / 'checkpoints' / 'step-00000003'} is intact")
        assert not (disk / "exported").exists() and not list(disk.glob(".exported*"))
    with tmpfs(tmp_path / "ro", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        config["shards"]["output"] = str(disk / "dataset")
        path.write_text(yaml.safe_dump(config))
        assert "Read-only file system" in cli_error(capsys, ["prepare", str(path), "--quiet"])


def test_a_dead_commands_network_namespace_is_removed(tmp_path):
    from core.netns import remove_stale_namespaces

    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"tokfleet-{dead.pid}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    remove_stale_namespaces()
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# ------------------------------------------------------------------ damaged checkpoints


def test_resume_passes_over_a_damaged_newest_checkpoint_and_inspect_reports_it(tmp_path, token_dataset, capsys, caplog):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, token_dataset, run_dir, steps=6)
    main(["train", config, "--stop-at-step", "6"])
    weights = run_dir / "checkpoints" / "step-00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # torn: half the file
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(run_dir / "checkpoints" / "step-00000006")])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "PROBLEM: model.safetensors holds" in out
    main(["inspect", str(run_dir / "checkpoints" / "step-00000003")])
    assert "all files verified" in capsys.readouterr().out
    # --resume auto takes step 3 (one warning line) and trains steps 4-6 again: the same losses
    reference = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}
    with caplog.at_level(logging.INFO, logger="tokfleet"):
        main(["train", config, "--resume", "auto"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step-00000006 fails its checks (model.safetensors holds" in warnings[0]
    assert any("resumed from" in r.getMessage() and "step-00000003" in r.getMessage() for r in caplog.records)
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")} == reference


# ------------------------------------------------------------------ metrics after a resume


def test_metrics_logged_after_a_resume_equal_the_uninterrupted_run(tmp_path, token_dataset):
    """Checkpoints every 3 steps, records every 5: the record of step 5 after resuming at step 3 must
    average steps 1-5, not 4-5 (the checkpoint keeps the steps since the last record)."""
    kept = ("step", "loss", "lr", "grad_norm", "tokens", "samples", "epoch")
    straight = write_config(tmp_path, token_dataset, tmp_path / "straight", steps=10, logging={"every_steps": 5})
    main(["train", straight])
    resumed = write_config(tmp_path, token_dataset, tmp_path / "resumed", steps=10, logging={"every_steps": 5})
    main(["train", resumed, "--stop-at-step", "3"])
    main(["train", resumed, "--resume", "auto"])
    records = [{k: r[k] for k in kept} for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert records == [{k: r[k] for k in kept} for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [5, 10]
