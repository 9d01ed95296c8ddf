"""Config system: typed sections, overrides, unknown keys, and the CLI's exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.config import PrepareConfig, PretokenizeConfig, TrainConfig, load_config
from core.schema import ConfigError, describe

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def tokfleet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_shipped_configs_validate():
    """Every tokfleet run config; configs/accelerate/ holds Accelerate's own launcher configs."""
    paths = [p for p in sorted((REPO / "configs").rglob("*.yaml")) if p.parent.name != "accelerate"]
    assert paths
    for path in paths:
        cls = PretokenizeConfig if "pretokenize" in path.name else PrepareConfig if "prepare" in path.name else TrainConfig
        load_config(path, cls)


def test_shipped_deepspeed_and_accelerate_configs_parse():
    import json

    import torch

    from core.config import EngineConfig, OptimConfig
    from trainer.engines.deepspeed import deepspeed_config

    for path in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        built = deepspeed_config(EngineConfig(kind="deepspeed", deepspeed_config=str(path)), OptimConfig(micro_batch_size=4, grad_accum_steps=2),
                                 world_size=2, device=torch.device("cpu"))
        assert built["train_batch_size"] == 16 and built["zero_optimization"]["stage"] == json.loads(path.read_text())["zero_optimization"]["stage"]
    accelerate = {p.name: yaml.safe_load(p.read_text()) for p in (REPO / "configs" / "accelerate").glob("*.yaml")}
    assert {"single_node.yaml", "multi_node.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"} <= set(accelerate)
    assert accelerate["fsdp.yaml"]["fsdp_config"]["fsdp_version"] == 2


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, {"data": {"dataset": "d"}, "optim": {"lr": "1e-3"}})
    cfg = load_config(path, TrainConfig, ["optim.lr=5e-4", "run.max_steps=7", "model.args.n_layer=3", "data.shuffle=false"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.run.max_steps == 7
    assert cfg.model.args == {"n_layer": 3}
    assert cfg.data.shuffle is False
    assert load_config(path, TrainConfig).optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


@pytest.mark.parametrize("data, overrides, expected", [
    ({"data": {"dataset": "d"}, "optm": {}}, [], ["unknown key 'optm'", "did you mean 'optim'"]),
    ({"data": {"dataset": "d", "num_stream": 4}}, [], ["'data.num_stream'", "did you mean 'num_streams'"]),
    ({"data": {"dataset": "d"}}, ["optim.learning_rate=1"], ["'optim.learning_rate'"]),
    ({"data": {"dataset": "d"}, "optim": {"micro_batch_size": "eight"}}, [], ["'optim.micro_batch_size'", "integer"]),
    ({"data": {"dataset": "d"}}, ["engine.precision=fp8"], ["'engine.precision'", "'fp32'"]),
    ({"data": {"dataset": "d"}}, ["run.max_steps=0"], ["max_steps must be >= 1"]),
    ({"run": {}}, [], ["missing required key 'data'"]),
    ({"data": {"dataset": "d"}, "optim": {"lr": True}}, [], ["'optim.lr'", "number"]),
])
def test_bad_configs_name_the_key_and_file(tmp_path, data, overrides, expected):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as error:
        load_config(path, TrainConfig, overrides)
    message = str(error.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_every_field_is_documented():
    for cls in (TrainConfig, PrepareConfig):
        rows = describe(cls)
        assert len(rows) > 20
        undocumented = [key for key, _, _, doc in rows if not doc]
        assert not undocumented


def test_cli_unknown_key_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, {"data": {"dataset": "d"}, "optim": {"lr": 1e-3, "warmup": 3}})
    result = tokfleet("train", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "optim.warmup" in lines[0] and "warmup_steps" in lines[0] and str(path) in lines[0]


def test_cli_wrong_type_and_missing_file(tmp_path):
    path = write(tmp_path, {"data": {"dataset": "d"}})
    result = tokfleet("train", str(path), "--set", "optim.grad_accum_steps=two")
    assert result.returncode == 2 and "optim.grad_accum_steps" in result.stderr
    assert "Traceback" not in result.stderr
    result = tokfleet("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr
    result = tokfleet("prepare", str(path))
    assert result.returncode == 2 and "unknown key 'data'" in result.stderr


def test_print_config_round_trips(tmp_path):
    path = write(tmp_path, {"data": {"dataset": "d"}})
    result = tokfleet("train", str(path), "--set", "optim.lr=0.01", "--print-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["optim"]["lr"] == 0.01
    assert printed["data"]["dataset"] == "d"
    again = write(tmp_path, printed, "again.yaml")
    assert load_config(again, TrainConfig).optim.lr == 0.01


def test_saved_configs_hold_no_job_credentials(tmp_path):
    """launch.env and the Ray runtime env reach the job's processes, not config.yaml / --print-config / wandb."""
    from core.config import dump_config

    path = write(tmp_path, {"data": {"dataset": "d"}, "launch": {
        "env": {"AWS_SECRET_ACCESS_KEY": "s3cr3t-env", "OMP_NUM_THREADS": "4"},
        "ray": {"runtime_env": {"env_vars": {"WANDB_API_KEY": "s3cr3t-ray", "HF_HOME": "/cache"}}}}})
    cfg = load_config(path, TrainConfig)
    assert cfg.launch.env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-env"  # the job still gets it
    dumped = dump_config(cfg)
    assert "s3cr3t" not in dumped and "AWS_SECRET_ACCESS_KEY" not in dumped and "WANDB_API_KEY" not in dumped
    saved = yaml.safe_load(dumped)["launch"]
    assert saved["env"] == {"OMP_NUM_THREADS": "4"} and saved["ray"]["runtime_env"]["env_vars"] == {"HF_HOME": "/cache"}


def test_help_of_every_subcommand():
    result = tokfleet("--help")
    assert result.returncode == 0
    commands = ["prepare", "pretokenize", "train", "generate", "eval", "forecast", "analyze", "inspect", "models", "config-reference", "demo",
                "submit", "jobs"]
    for command in commands:
        assert command in result.stdout
        sub = tokfleet(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "usage: tokfleet " + command in sub.stdout
    trainer_help = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True)
    assert trainer_help.returncode == 0 and "--resume" in trainer_help.stdout
