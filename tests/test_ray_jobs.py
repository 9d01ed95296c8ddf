"""`tokfleet submit ray` and `tokfleet jobs` on a real Ray cluster (the session's head, conftest `ray_head`):
a prepare job on Ray Data, a 2-worker Ray Train job that matches torchrun step for step, jobs
status / logs / stop, and the errors of a dead address or an unknown job.

Configs use relative paths and are submitted from a directory other than the head's: the job
runs in an uploaded copy of the checkout, so the outputs landing where the submitter meant them
is the check that paths were resolved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml

from launch import ray_jobs
from core.errors import UserError
from launch.jobs import JobRecord
from trainer.metrics import read_metrics

BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 300  # generous: the machine these run on may be shared and loaded
STEPS = 4


def tokfleet_process(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "tokfleet"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def finish(process: subprocess.Popen, timeout: float = 60) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def tokfleet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return finish(tokfleet_process(*args, cwd=cwd))


def submitted(result: subprocess.CompletedProcess, job_dir: Path) -> JobRecord:
    assert result.returncode == 0, result.stderr[-3000:]
    record = JobRecord.load(str(job_dir))
    assert record.backend == "ray" and record.job_id in result.stdout
    return record


def wait_until_done(record: JobRecord, timeout_s: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while (state := ray_jobs.status(record)) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, f"job {record.job_id} still {state}:\n{ray_jobs.logs(record)[-3000:]}"
        time.sleep(1.0)
    assert state == "SUCCEEDED", ray_jobs.logs(record)[-5000:]
    return state


def train_config(work: Path, dataset: str, name: str, **run) -> Path:
    """2 ranks of DDP (Accelerate) on the toy token dataset; relative output_dir."""
    config = {
        "run": {"name": name, "output_dir": f"runs/{name}", "max_steps": STEPS, "seed": 3, "device": "cpu", **run},
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {"dataset": dataset, "num_streams": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 4},
        "engine": {"kind": "accelerate", "strategy": "ddp", "peak_flops": 1e11},
        "checkpoint": {"every_steps": 0, "keep_last": 2},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 0, "num_batches": 1},
        # half a logical CPU per worker: 2 workers leave the 2-CPU cluster room for other tasks
        "launch": {"nproc_per_node": 2, "env": {"OMP_NUM_THREADS": "1"}, "ray": {"cpus_per_worker": 0.5}},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


PREPARE = {
    "source": {"paths": ["{stdlib}/json/*.py"]},
    "tokenizer": {"kind": "bpe", "vocab_size": 400},
    "shards": {"output": "data/json-bpe", "name": "json", "seq_len": 32, "source_bytes_per_shard": 20_000, "val_fraction": 0.25},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("submitter")


@pytest.fixture(scope="module")
def finished(ray_head, work, token_dataset):
    """A prepare job, a 2-rank training job (both through `submit ray`) and the same training under
    torchrun, run at once so that their start-up waits overlap; (prepare record, train record)."""
    from test_distributed import launcher_command

    (work / "prepare.yaml").write_text(yaml.safe_dump(PREPARE))
    config = train_config(work, token_dataset, "ray-ddp")
    submits = [tokfleet_process("submit", "ray", name, "--address", ray_head.address, cwd=work)
               for name in ("prepare.yaml", config.name)]
    reference = train_config(work, token_dataset, "torchrun-ddp")
    torchrun = subprocess.Popen([*launcher_command("torchrun", 2), str(reference)], cwd=work, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    prepare = submitted(finish(submits[0]), work / "jobs" / "prepare")
    train = submitted(finish(submits[1]), work / "runs" / "ray-ddp")
    output, _ = torchrun.communicate(timeout=JOB_TIMEOUT_S)
    assert torchrun.returncode == 0, output[-3000:]
    wait_until_done(prepare)
    wait_until_done(train)
    return prepare, train


def test_prepare_job_builds_the_dataset(finished, work):
    prepare, _ = finished
    assert prepare.stage == "prepare"
    from sharding.manifest import Manifest

    root = work / "data" / "json-bpe"  # relative to where it was submitted
    manifest = Manifest.read(str(root))
    names = [shard.name for shard in manifest.shards]
    assert names == [f"json-{i:06d}.tar" for i in range(len(names))]
    assert {shard.split for shard in manifest.shards} == {"train", "val"}
    assert all((root / name).stat().st_size > 0 for name in names)
    assert manifest.vocab_size == 400 and manifest.seq_len == 32 and (root / "tokenizer").is_dir()
    # the job read the resolved copy of the config, with the output made absolute and Ray joined, not started
    resolved = yaml.safe_load((work / "jobs" / "prepare" / ray_jobs.RESOLVED_CONFIG).read_text())
    assert resolved["shards"]["output"] == str(root) and resolved["ray"]["address"] == "auto"


def test_prepare_job_status_and_logs(finished, work, ray_head):
    prepare, _ = finished
    status = tokfleet("jobs", "status", str(work / "jobs" / "prepare"))
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED"
    logs = tokfleet("jobs", "logs", f"ray:{prepare.job_id}", "--address", ray_head.address)
    assert logs.returncode == 0 and f"dataset {work / 'data' / 'json-bpe'}: 2 shards" in logs.stdout


def test_ray_train_job_matches_torchrun(finished, work):
    ray_run, torchrun_run = work / "runs" / "ray-ddp", work / "runs" / "torchrun-ddp"
    ray_records, reference = read_metrics(ray_run / "metrics.jsonl"), read_metrics(torchrun_run / "metrics.jsonl")
    assert [r["step"] for r in ray_records] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert {r["world_size"] for r in ray_records} == {2}
    for ours, theirs in zip(ray_records, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5), ours["step"]
        assert ours["samples"] == theirs["samples"]
    # the same checkpoint format, loadable, with the same weights
    from trainer.inference import load_model

    model, state, _ = load_model(ray_run)
    reference_model, _, _ = load_model(torchrun_run)
    assert state["step"] == STEPS and state["world_size"] == 2
    torch.testing.assert_close(model.state_dict(), reference_model.state_dict(), rtol=1e-5, atol=1e-6)


def test_ray_train_job_status_and_logs(finished, work):
    ray_run = work / "runs" / "ray-ddp"
    status = tokfleet("jobs", "status", str(ray_run))
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED"
    logs = tokfleet("jobs", "logs", str(ray_run / "job.json"))
    assert logs.returncode == 0 and "Ray Train: 2 workers" in logs.stdout
    summary = json.loads(next(line for line in logs.stdout.splitlines() if line.startswith('{"run_dir"')))
    assert summary["num_workers"] == 2 and summary["last"] == read_metrics(ray_run / "metrics.jsonl")[-1]


def test_stop_ends_a_running_training_job(ray_head, work, token_dataset, monkeypatch):
    from launch.submit import build_spec

    # one worker of the single-device engine: the quickest Ray Train job to get going
    config = train_config(work, token_dataset, "ray-long", max_steps=1_000_000)
    monkeypatch.chdir(work)  # where a user would submit from: the config's paths are relative to it
    spec = build_spec(Namespace(config=str(config), stage=None, overrides=["engine.kind=single", "engine.strategy=auto"],
                                job_dir=None, address=ray_head.address, nproc_per_node=1))
    record = ray_jobs.submit(spec)
    metrics = work / "runs" / "ray-long" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.is_file() and metrics.stat().st_size > 0):  # the Ray Train worker is training
        assert ray_jobs.status(record) in ("PENDING", "RUNNING") and time.monotonic() < deadline, ray_jobs.logs(record)[-3000:]
        time.sleep(0.5)
    start = time.monotonic()
    result = tokfleet("jobs", "stop", str(work / "runs" / "ray-long"))
    assert result.returncode == 0 and f"stopped ray job {record.job_id}" in result.stdout, result.stderr
    assert time.monotonic() - start < 30 and ray_jobs.status(record) == "STOPPED"
    # the worker went with the driver: no more steps get logged
    time.sleep(1.0)
    size = metrics.stat().st_size
    time.sleep(2.0)
    assert metrics.stat().st_size == size


def test_unreachable_address_exits_2_fast(work, token_dataset):
    from launch.launchers import free_port

    config = train_config(work, token_dataset, "nowhere")
    address = f"http://127.0.0.1:{free_port()}"
    for args in (["submit", "ray", str(config), "--address", address],
                 ["jobs", "status", "ray:raysubmit_x", "--address", address]):
        start = time.monotonic()
        result = tokfleet(*args, cwd=work)
        assert result.returncode == 2 and time.monotonic() - start < 15, result.stderr
        assert result.stderr.count("\n") == 1 and f"Ray cluster at {address} is not reachable" in result.stderr
    assert not (work / "runs" / "nowhere").exists()  # nothing written for a job that was never submitted


def test_unknown_job_is_a_user_error(ray_head):
    record = JobRecord.load("ray:raysubmit_nosuchjob", ray_head.address)
    with pytest.raises(UserError, match=f"no Ray job 'raysubmit_nosuchjob' at {ray_head.address}"):
        ray_jobs.status(record)


def test_config_paths_resolve_against_the_submitting_dir(tmp_path):
    from core.config import DataConfig, PrepareConfig, ShardsConfig, SourceConfig, TokenizerConfig, TrainConfig
    from core.config_paths import absolute_paths

    (tmp_path / "corpus").mkdir()
    prepare = PrepareConfig(
        source=SourceConfig(paths=["corpus/*.txt", "{stdlib}/json/*.py", "s3://bucket/x/*.txt", "/abs/*.txt"],
                            hf_dataset="corpus"),
        tokenizer=TokenizerConfig(kind="pretrained", path="~/tokenizer"),
        shards=ShardsConfig(output="data/../data/out"),
    )
    resolved = absolute_paths(prepare, tmp_path)
    assert resolved.source.paths == [f"{tmp_path}/corpus/*.txt", "{stdlib}/json/*.py", "s3://bucket/x/*.txt", "/abs/*.txt"]
    assert resolved.source.hf_dataset == f"{tmp_path}/corpus"  # a local folder; a hub id stays as it is
    assert absolute_paths(PrepareConfig(source=SourceConfig(hf_dataset="wikitext"), shards=ShardsConfig(output="o")),
                          tmp_path).source.hf_dataset == "wikitext"
    assert resolved.tokenizer.path == "~/tokenizer" and resolved.shards.output == f"{tmp_path}/data/out"
    assert prepare.shards.output == "data/../data/out"  # a copy: the caller's config is left alone
    train = absolute_paths(TrainConfig(data=DataConfig(dataset="s3://bucket/ds")), tmp_path)
    assert train.run.output_dir == f"{tmp_path}/runs/default" and train.data.dataset == "s3://bucket/ds"


def test_uploaded_code_leaves_out_data_and_environments(tmp_path):
    from core.config import DataConfig, TrainConfig
    from core.config_paths import absolute_paths

    root = ray_jobs.code_root()
    config = absolute_paths(TrainConfig(data=DataConfig(dataset="toy/ds")), root)
    config.launch.env = {"OMP_NUM_THREADS": "1"}
    config.launch.ray.runtime_env = {"env_vars": {"A": "b"}}
    job_env = ray_jobs.runtime_env(config, root / "runs" / "default")
    assert job_env["working_dir"] == str(root)
    assert {"/.venv", "/.git", "/data", "/runs", "/toy/ds"} <= set(job_env["excludes"])
    assert job_env["env_vars"] == {"OMP_NUM_THREADS": "1", "A": "b", "PYTHONUNBUFFERED": "1"}
    config.launch.ray.runtime_env = {"working_dir": ""}  # no upload: the cluster's installed tokfleet
    assert "working_dir" not in ray_jobs.runtime_env(config, tmp_path)
