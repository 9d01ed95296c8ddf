"""Multi-process training on CPU (gloo, 2 ranks) under the real launchers: torchrun, the deepspeed
launcher and `accelerate launch`. Exact resume, 1 vs 2 ranks, elastic resume, a killed rank,
and export of sharded checkpoints.

The data is a synthetic token dataset of 4 equal shards with data.num_streams = 4, so every
stream is one shard and the samples of a global batch do not depend on the world size (see
conftest.write_token_dataset): runs at different world sizes can be compared step by step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from launch.launchers import free_port
from sharding.manifest import Manifest
from trainer.metrics import read_metrics

BIN = Path(sys.executable).parent
EPOCH_STEPS = 12  # 4 shards x 24 samples / global batch 8
TIMEOUT = 300


def write_config(tmp_path: Path, dataset: str, name: str, engine: dict, *, micro: int, steps: int = 6, **sections) -> Path:
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": steps, "seed": 3, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {"dataset": dataset, "num_streams": 4, "log_sample_keys": True},
        # constant LR: the 1-rank/2-rank comparison is about the same updates, not the schedule
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": micro, "grad_accum_steps": 1},
        "engine": {"peak_flops": 1e11, **engine},
        "checkpoint": {"every_steps": 3, "keep_last": 5},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 0, "num_batches": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launcher_command(launcher: str, nproc: int, script: str | None = None, port: int | None = None) -> list[str]:
    """The launcher's command line up to the program: `-m trainer`, or `script` when given."""
    port = str(port or free_port())
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, *([script] if script else ["-m", "trainer"])]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
                *([script] if script else ["-m", "trainer"])]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port,
                *([script] if script else ["--module", "trainer"])]
    program = [script] if script else ["-m", "trainer"]
    if launcher == "accelerate":
        multi = ["--multi_gpu"] if nproc > 1 else []
        return [str(BIN / "accelerate"), "launch", *multi, "--num_processes", str(nproc), "--num_machines", "1",
                "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", *program]
    if launcher.startswith("accelerate:"):  # one of the shipped accelerate configs
        config_file = ACCELERATE_CONFIGS / launcher.split(":", 1)[1]
        return [str(BIN / "accelerate"), "launch", "--config_file", str(config_file), "--num_processes", str(nproc),
                "--main_process_port", port, *program]
    raise ValueError(launcher)


def env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(launcher: str, nproc: int, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [*launcher_command(launcher, nproc), str(config), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    if check:
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def keys_by_rank(run_dir: Path) -> dict[int, list[tuple[int, int, str]]]:
    """rank -> [(step, epoch, key)] from the per-rank audit logs."""
    found = {}
    for path in sorted((run_dir / "logs").glob("sample_keys-rank*.jsonl")):
        rank = int(path.stem.rsplit("rank", 1)[1])
        found[rank] = [(r["step"], r["epoch"], key) for line in path.read_text().splitlines() if line
                       for r in [json.loads(line)] for key in r["keys"]]
    return found


def epoch_keys(run_dir: Path, epoch: int) -> Counter:
    return Counter(key for entries in keys_by_rank(run_dir).values() for _, e, key in entries if e == epoch)


def all_keys(dataset: str) -> Counter:
    manifest = Manifest.read(dataset)
    return Counter(f"toy-{int(s.name[4:10]):06d}-{i:06d}" for s in manifest.shards_of("train") for i in range(s.num_samples))


ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
ENGINES = {  # engine -> (launcher of its 2-rank runs, engine config); each launcher gets used
    "ddp": ("accelerate", {"kind": "accelerate", "strategy": "ddp"}),
    "zero2": ("deepspeed", {"kind": "deepspeed", "zero_stage": 2}),
    "zero3": ("torchrun", {"kind": "deepspeed", "zero_stage": 3}),
    # strategy auto: taken from the accelerate config file the launcher was given
    "fsdp": ("accelerate:fsdp.yaml", {"kind": "accelerate"}),
    "accelerate-zero2": ("accelerate:deepspeed_zero2.yaml", {"kind": "accelerate"}),
}
CORE = ["ddp", "zero2", "zero3"]  # what exact and elastic resume are required for
# 1 rank vs 2 ranks: the same samples per step, only the order of float sums differs (the global
# mean loss is a mean of 2 rank means, gradients are averaged by all-reduce instead of in one
# backward); fp32 rounding of ~1e-7 grows through 12 Adam steps to ~1e-6 relative.
RANKS_RTOL = 1e-4


class Runs:
    """An engine's reference runs: one epoch (12 steps) on 2 ranks and on 1 rank, same global batch."""

    def __init__(self, root: Path, dataset: str, engine: str):
        self.root, self.dataset, self.engine = root, dataset, engine
        self.launcher, self.engine_cfg = ENGINES[engine]

    def config(self, name: str, ranks: int, engine: dict | None = None, **sections) -> Path:
        engine_cfg = {**self.engine_cfg, **(engine or {})}
        return write_config(self.root, self.dataset, name, engine_cfg, micro=8 // ranks, steps=EPOCH_STEPS, **sections)

    def run(self, ranks: int, config: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return run(self.launcher, ranks, config, *args, **kwargs)

    def from_checkpoint(self, source: str, step: int, name: str) -> Path:
        """A run dir holding `source`'s logs and its checkpoint of `step` (as if it had stopped there)."""
        target = self.root / name
        shutil.copytree(self.root / source / "logs", target / "logs")
        shutil.copy(self.root / source / "metrics.jsonl", target / "metrics.jsonl")
        checkpoint = f"step-{step:08d}"
        shutil.copytree(self.root / source / "checkpoints" / checkpoint, target / "checkpoints" / checkpoint)
        (target / "checkpoints" / "latest").write_text(checkpoint + "\n")
        return target


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, token_dataset) -> Runs:
    runs = Runs(tmp_path_factory.mktemp(request.param), token_dataset, request.param)
    runs.run(2, runs.config("two", 2))
    runs.run(1, runs.config("one", 1))
    return runs


@pytest.mark.parametrize("runs", list(ENGINES), indirect=True)
def test_two_ranks_match_one_rank(runs):
    two, one = losses(runs.root / "two"), losses(runs.root / "one")
    assert sorted(two) == sorted(one) == list(range(1, EPOCH_STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=RANKS_RTOL), f"step {step}"
    assert two[EPOCH_STEPS] < two[1] - 0.3  # and it learns
    # each rank read a disjoint half; together, the whole epoch exactly once, as 1 rank did
    ranks = keys_by_rank(runs.root / "two")
    halves = [{key for _, _, key in ranks[r]} for r in (0, 1)]
    assert not halves[0] & halves[1]
    assert epoch_keys(runs.root / "two", 0) == epoch_keys(runs.root / "one", 0) == all_keys(runs.dataset)
    records = read_metrics(runs.root / "two" / "metrics.jsonl")
    assert {r["world_size"] for r in records} == {2} and records[-1]["samples"] == 8 * EPOCH_STEPS


@pytest.mark.parametrize("runs", CORE, indirect=True)
def test_resume_is_exact(runs):
    """2N steps straight == N steps, stop, resume, N steps: same losses, same samples on every rank."""
    config = runs.config("resumed", 2)
    runs.run(2, config, "--stop-at-step", "6")
    assert sorted(losses(runs.root / "resumed")) == list(range(1, 7))
    runs.run(2, config, "--resume", "auto")
    # fixed reduction order (2 ranks: a + b == b + a) and deterministic CPU kernels: bit-identical
    assert losses(runs.root / "resumed") == losses(runs.root / "two")
    assert keys_by_rank(runs.root / "resumed") == keys_by_rank(runs.root / "two")
    state = json.loads((runs.root / "resumed" / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["rank_states"]["num_ranks"] == 2 and "rng" not in state
    parts = sorted(p.name for p in (runs.root / "resumed" / "checkpoints" / "step-00000012" / "ranks").iterdir())
    assert parts == ["rng-rank00000.json", "rng-rank00001.json", "state-rank00000.json", "state-rank00001.json"]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
@pytest.mark.parametrize("runs", [*CORE, "fsdp"], indirect=True)
def test_elastic_resume(runs, before, after):
    """A checkpoint of `before` ranks resumes on `after` ranks: model and optimizer resharded, the
    epoch finishes with every sample read exactly once, and the losses follow the uninterrupted run."""
    source = {2: "two", 1: "one"}[before]
    name = f"elastic{before}{after}"
    runs.from_checkpoint(source, 3, name)
    runs.run(after, runs.config(name, after), "--resume", "auto")
    got, reference = losses(runs.root / name), losses(runs.root / source)
    assert sorted(got) == list(range(1, EPOCH_STEPS + 1))
    for step in range(4, EPOCH_STEPS + 1):
        assert got[step] == pytest.approx(reference[step], rel=RANKS_RTOL), f"step {step}"
    assert epoch_keys(runs.root / name, 0) == all_keys(runs.dataset)
    assert len(keys_by_rank(runs.root / name)) == max(before, after)
    state = json.loads((runs.root / name / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert state["world_size"] == after


ENGINE_HELD = """
import gc, sys, torch
from core.config import TrainConfig, load_config
from trainer import distributed
from trainer.loop import Trainer

trainer = Trainer(load_config(sys.argv[1], TrainConfig), resume="auto")  # at max_steps: loads, trains nothing
held = trainer.engine.full_state_dict()  # collective (ZeRO-3 / FSDP gather)
if trainer.is_main:
    torch.save({"step": trainer.step, "params": held}, sys.argv[2])
# as trainer/entry.py does: free the engine (and gloo's pending work) before the process group
del trainer, held
gc.collect()
distributed.shutdown()
"""


def tokfleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tokfleet"), *args], capture_output=True, text=True, env=env(), timeout=TIMEOUT)


@pytest.mark.parametrize("runs", ["zero3", "fsdp"], indirect=True)
def test_export_equals_the_parameters_the_engine_held(runs, tmp_path):
    from safetensors.torch import load_file

    from trainer.inference import load_model

    script = tmp_path / "held.py"
    script.write_text(ENGINE_HELD)
    command = [*launcher_command(runs.launcher, 2, script=str(script)), str(runs.root / "two.yaml"), str(tmp_path / "held.pt")]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    held = torch.load(tmp_path / "held.pt", weights_only=True)
    assert held["step"] == EPOCH_STEPS

    checkpoint = runs.root / "two" / "checkpoints" / f"step-{EPOCH_STEPS:08d}"
    result = tokfleet("export", str(checkpoint), "--out", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert exported.keys() == held["params"].keys()
    for name, tensor in held["params"].items():
        assert torch.equal(exported[name], tensor), name
    # the export is a single-device checkpoint: it loads and runs on one process
    model, state, _ = load_model(tmp_path / "export")
    assert state["exported_from"]["world_size"] == 2
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape[-1] == 128
    # exporting over existing files is refused, and leaves them alone
    again = tokfleet("export", str(checkpoint), "--out", str(tmp_path / "export"))
    assert again.returncode == 2 and "not empty" in again.stderr
    assert load_file(tmp_path / "export" / "model.safetensors").keys() == exported.keys()


@pytest.mark.parametrize("runs", ["zero3"], indirect=True)
def test_inspect_sharded_checkpoint(runs):
    result = tokfleet("inspect", str(runs.root / "two" / "checkpoints" / "step-00000006"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "step 6," in out and "world size 2" in out and "ZeRO stage 3" in out and "deepspeed" in out
    assert "data position: epoch 0" in out and "48 of 96 samples of the epoch read" in out
    assert " MB in " in out


@pytest.mark.parametrize("runs", ["ddp"], indirect=True)
def test_two_node_accelerate_launch(runs):
    """Two `accelerate launch` processes as two machines of one process each, over 127.0.0.1."""
    config = runs.config("two_nodes", 2)
    port = free_port()
    nodes = [subprocess.Popen(
        [str(BIN / "accelerate"), "launch", "--config_file", str(ACCELERATE_CONFIGS / "multi_node.yaml"),
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), "-m", "trainer", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env()) for rank in (0, 1)]
    outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert losses(runs.root / "two_nodes") == losses(runs.root / "two")  # the same 2-rank DDP job
    assert keys_by_rank(runs.root / "two_nodes") == keys_by_rank(runs.root / "two")


def rank_pid(config: Path, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            if str(config) in (proc / "cmdline").read_text() and f"\0RANK={rank}\0" in "\0" + (proc / "environ").read_text():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_killed_rank_fails_fast_and_resume_continues(tmp_path, token_dataset):
    steps = 400
    config = write_config(tmp_path, token_dataset, "killed", {"kind": "accelerate", "strategy": "ddp", "timeout_s": 30},
                          micro=4, steps=steps, checkpoint={"every_steps": 5, "keep_last": 2}, data={"log_sample_keys": False})
    run_dir = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    job = subprocess.Popen([*launcher_command("torchrun", 2), str(config)], stdout=log, stderr=subprocess.STDOUT, env=env())
    deadline = time.monotonic() + TIMEOUT
    while not (run_dir / "checkpoints" / "latest").exists():
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.1)
    victim = rank_pid(config, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    code = job.wait(timeout=120)
    failed_after = time.monotonic() - killed_at
    assert code != 0 and failed_after < 60, f"exit {code} after {failed_after:.0f}s"
    last = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 0 < last < steps

    run("torchrun", 2, config, "--resume", "auto")
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # nothing lost, nothing twice
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{steps:08d}"


@pytest.mark.parametrize("engine, setting, message", [
    ({"kind": "deepspeed", "precision": "fp16"}, {}, "engine.precision fp16 needs a GPU (CUDA)"),
    ({"kind": "deepspeed", "deepspeed_config": "/nonexistent/zero9.json"}, {}, "no such file: /nonexistent/zero9.json"),
    ({"kind": "accelerate", "strategy": "ddp", "precision": "fp16"}, {}, "engine.precision fp16 needs a GPU (CUDA)"),
])
def test_bad_engine_settings_exit_2(tmp_path, token_dataset, engine, setting, message):
    config = write_config(tmp_path, token_dataset, "bad", engine, micro=4)
    result = run("python", 1, config, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("runs", ["zero2"], indirect=True)
def test_checkpoint_mismatches_exit_2(runs, tmp_path):
    # a DeepSpeed checkpoint resumed by the DDP engine
    runs.from_checkpoint("two", 3, "other_engine")
    config = write_config(runs.root, runs.dataset, "other_engine", ENGINES["ddp"][1], micro=4, steps=EPOCH_STEPS)
    result = run("accelerate", 2, config, "--resume", "auto", check=False)
    assert result.returncode != 0 and "holds 'deepspeed' shards" in result.stderr
    # a damaged ZeRO shard
    damaged = runs.from_checkpoint("two", 3, "damaged")
    shard = next((damaged / "checkpoints" / "step-00000003" / "deepspeed").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    config = runs.config("damaged", 1)
    result = run("python", 1, config, "--resume", "auto", check=False)
    assert result.returncode == 2 and "step-00000003" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    # the single-device engine under a 2-process launcher
    config = write_config(tmp_path, runs.dataset, "single2", {"kind": "single"}, micro=4)
    result = run("torchrun", 2, config, check=False)
    assert result.returncode != 0 and "engine.kind 'single' runs one process" in result.stderr


@pytest.mark.parametrize("runs", ["zero3"], indirect=True)
def test_zero3_offload_and_gradient_checkpointing_train_the_same(runs):
    """Optimizer + parameter offload and per-block activation recomputation change where and when
    things are computed, not the result."""
    config = runs.config("offload", 2, engine={"offload_optimizer": True, "offload_params": True},
                         model={"args": {"use_gradient_checkpointing": True}}, checkpoint={"every_steps": 0})
    runs.run(2, config)
    got, reference = losses(runs.root / "offload"), losses(runs.root / "two")
    assert sorted(got) == sorted(reference)
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}"
    state = json.loads((runs.root / "offload" / "checkpoints" / f"step-{EPOCH_STEPS:08d}" / "trainer_state.json").read_text())
    assert state["engine_info"]["offload_optimizer"] and state["engine_info"]["offload_params"]
    assert state["engine_info"]["optimizer"] == "DeepSpeedCPUAdam"  # the two-rank reference runs torch's "AdamW fused"


def test_uneven_shares_then_elastic_resume_across_epochs(tmp_path):
    """5 shards over 2 ranks: rank 0 reads 72 samples an epoch, rank 1 48. Rank 1 starts epoch 1
    while rank 0 finishes epoch 0 (no hang, nothing dropped); a checkpoint taken then resumes on
    1 rank, and both epochs hold every sample exactly once."""
    from conftest import write_token_dataset

    dataset = write_token_dataset(tmp_path / "uneven", num_shards=5, samples_per_shard=24)
    ddp = ENGINES["ddp"][1]
    config = write_config(tmp_path, dataset, "uneven", ddp, micro=4, steps=30, checkpoint={"every_steps": 0})
    run("accelerate", 2, config, "--stop-at-step", "15")
    ranks = keys_by_rank(tmp_path / "uneven")
    assert {e for _, e, _ in ranks[1]} == {0, 1} and {e for _, e, _ in ranks[0]} == {0}  # rank 1 moved on
    config = write_config(tmp_path, dataset, "uneven", ddp, micro=8, steps=30, checkpoint={"every_steps": 0})
    run("python", 1, config, "--resume", "auto")
    for epoch in (0, 1):
        assert epoch_keys(tmp_path / "uneven", epoch) == all_keys(dataset), f"epoch {epoch}"
    assert [r["step"] for r in read_metrics(tmp_path / "uneven" / "metrics.jsonl")] == list(range(1, 31))
