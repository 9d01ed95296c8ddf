"""`tokfleet submit slurm|local` and `tokfleet jobs` on a real SLURM cluster (tests/slurm_cluster.py:
slurmctld + two fake nodes n1, n2 on this machine), no mocks.

Training runs are 2 ranks of the debug GPT under `accelerate launch` (DDP, gloo) on the synthetic
token dataset (conftest.write_token_dataset); the reference is the same config under
`submit local --nproc 2`. A fixed reduction order over 2 ranks and deterministic CPU kernels make
the runs bit-identical, so losses are compared exactly. Fake node names do not resolve:
TOKFLEET_MASTER_ADDR=127.0.0.1 stands in for the first node's address.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer.metrics import read_metrics

BIN = Path(sys.executable).parent
# long enough for a warning signal sent at step SIGNAL_AFTER to land mid-run: ~10 s of steps on an idle
# machine (with 120 steps a CI run once had no checkpoint between the regular ones)
STEPS, EVERY = 300, 100
SIGNAL_AFTER = 5
TIMEOUT = 240


def train_config(tmp_path: Path, dataset: str, name: str, **sections) -> Path:
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": STEPS, "seed": 3, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {"dataset": dataset, "num_streams": 4},
        # constant LR: the first N steps do not depend on max_steps, so shorter runs compare too
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 4, "grad_accum_steps": 1},
        "engine": {"kind": "accelerate", "strategy": "ddp", "peak_flops": 1e11},
        "checkpoint": {"every_steps": EVERY, "keep_last": 5},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 0},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tokfleet(*args: str, env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tokfleet"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**(env or os.environ), "TOKFLEET_MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"})


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{' '.join(result.args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def submit_slurm(cluster, config: Path, *args: str) -> str:
    """sbatch the config; returns the job id."""
    out = check(tokfleet("submit", "slurm", str(config), *args, env=cluster.env(), timeout=60))
    return out.split("slurm job ")[1].split()[0]


def wait_for(cluster, job_dir: Path, states: set[str], timeout: float = TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = check(tokfleet("jobs", "status", str(job_dir), env=cluster.env(), timeout=60)).strip()
        if state in states:
            return state
        if time.monotonic() > deadline:
            logs = tokfleet("jobs", "logs", str(job_dir), env=cluster.env()).stdout
            pytest.fail(f"job in {job_dir} still {state} after {timeout:.0f} s\n{logs[-3000:]}")
        time.sleep(1.0)


class TrainingRuns:
    """2-rank runs started together (the machine's two cores are shared by many processes anyway;
    overlapping their start-ups saves a minute of wall time): `submit local --nproc 2` (the
    reference), a plain 2-node SLURM job of its first 40 steps, a 2-node SLURM job with --requeue
    that gets SLURM's warning signal mid-run, and 4 steps of ZeRO-2 under the deepspeed launcher."""

    def __init__(self, cluster, root: Path, dataset: str):
        self.root = root
        self.plain_config = train_config(root, dataset, "two_nodes")
        self.plain_id = submit_slurm(cluster, self.plain_config, "--nodes", "2", "--nproc-per-node", "1",
                                     "--time", "00:10:00", "--set", "run.max_steps=40")
        self.preempted_id = submit_slurm(cluster, train_config(root, dataset, "preempted"), "--nodes", "2",
                                         "--nproc-per-node", "1", "--requeue", "--signal-seconds", "60")
        # the deepspeed launcher over two nodes (--no_ssh, a hostfile of the allocation); after the
        # short plain job, so that at most three runs hold memory at once
        zero2 = train_config(root, dataset, "zero2", engine={"kind": "deepspeed", "zero_stage": 2, "strategy": "auto"})
        submit_slurm(cluster, zero2, "--nodes", "2", "--set", "run.max_steps=4", f"--extra-sbatch=--dependency=afterany:{self.plain_id}")
        local = subprocess.Popen([str(BIN / "tokfleet"), "submit", "local", str(train_config(root, dataset, "local")), "--nproc", "2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        # SLURM's warning (what it sends --signal-seconds before the time limit) once SIGNAL_AFTER steps are done
        metrics = root / "preempted" / "metrics.jsonl"
        deadline = time.monotonic() + TIMEOUT
        while not metrics.exists() or len(read_metrics(metrics)) < SIGNAL_AFTER:
            assert time.monotonic() < deadline, tokfleet("jobs", "logs", str(root / "preempted"), env=cluster.env()).stdout[-3000:]
            time.sleep(0.2)
        cluster.run("scancel", "--signal=USR1", "--batch", self.preempted_id)
        self.local_out, self.local_err = local.communicate(timeout=TIMEOUT)
        self.local_code = local.returncode
        self.states = {name: wait_for(cluster, root / name, {"SUCCEEDED", "FAILED", "STOPPED"})
                       for name in ("two_nodes", "preempted", "zero2")}


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory, token_dataset) -> TrainingRuns:
    return TrainingRuns(slurm_cluster, tmp_path_factory.mktemp("train"), token_dataset)


def test_local_job(runs):
    assert runs.local_code == 0, runs.local_err[-3000:]
    assert "local job" in runs.local_err and "finished" in runs.local_err
    assert check(tokfleet("jobs", "status", str(runs.root / "local"))).strip() == "SUCCEEDED"
    assert '"finished": true' in check(tokfleet("jobs", "logs", str(runs.root / "local")))
    assert sorted(losses(runs.root / "local")) == list(range(1, STEPS + 1))


def test_two_node_job_matches_local(slurm_cluster, runs):
    run_dir = runs.root / "two_nodes"
    assert runs.states["two_nodes"] == "SUCCEEDED"
    reference = losses(runs.root / "local")
    assert losses(run_dir) == {step: reference[step] for step in range(1, 41)}
    assert {r["world_size"] for r in read_metrics(run_dir / "metrics.jsonl")} == {2}
    log = check(tokfleet("jobs", "logs", str(run_dir), env=slurm_cluster.env()))
    assert "on n1 n2, rendezvous 127.0.0.1:" in log
    record = json.loads((run_dir / "job.json").read_text())
    assert record["backend"] == "slurm" and record["job_id"] == runs.plain_id and (run_dir / "job.sbatch").is_file()


def test_two_node_deepspeed_launcher(slurm_cluster, runs):
    log = check(tokfleet("jobs", "logs", str(runs.root / "zero2"), env=slurm_cluster.env()))
    assert runs.states["zero2"] == "SUCCEEDED", log[-3000:]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in log  # one deepspeed runner per node
    records = read_metrics(runs.root / "zero2" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and {r["world_size"] for r in records} == {2}


def test_warning_signal_checkpoints_requeues_and_resumes_exactly(runs):
    run_dir = runs.root / "preempted"
    assert runs.states["preempted"] == "SUCCEEDED"
    log = (run_dir / "logs" / f"slurm-{runs.preempted_id}.out").read_text()
    assert "requeueing job" in log and "(restart 1)" in log, log[-3000:]
    # a checkpoint where the signal landed, between the regular ones, and the requeued job resumed from it
    stops = [int(step) for step in re.findall(r"stop signal: checkpointed step (\d+) and stopped", log)]
    assert len(stops) == 1 and SIGNAL_AFTER <= stops[0] < STEPS, log[-3000:]
    saved = {int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")}
    assert saved == {stops[0], *range(EVERY, STEPS + 1, EVERY)}
    assert f"step-{stops[0]:08d} at step {stops[0]}" in log
    # nothing trained before the signal is lost or done twice: the uninterrupted run's losses
    assert losses(run_dir) == losses(runs.root / "local")
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_prepare_job_runs_on_a_ray_cluster_in_the_allocation(slurm_cluster, tmp_path):
    output = tmp_path / "shards"
    config = {
        "source": {"paths": ["{stdlib}/json/*.py"]},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "shards": {"output": str(output), "name": "json", "seq_len": 32, "source_bytes_per_shard": 20_000, "val_fraction": 0.2},
        "ray": {"num_cpus": 1, "object_store_mb": 100},
    }
    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump(config))
    job_dir = tmp_path / "job"
    out = check(tokfleet("submit", "slurm", str(path), "--nodes", "2", "--job-dir", str(job_dir), env=slurm_cluster.env()))
    assert "(prepare)" in out
    state = wait_for(slurm_cluster, job_dir, {"SUCCEEDED", "FAILED", "STOPPED"})
    log = check(tokfleet("jobs", "logs", str(job_dir), env=slurm_cluster.env()))
    assert state == "SUCCEEDED", log[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["vocab_size"] <= 300 and len(manifest["shards"]) >= 2
    assert "Ray head 127.0.0.1:" in log and "dataset " in log
    # the job's Ray processes ended with it (their temp dir names the job)
    job_id = json.loads((job_dir / "job.json").read_text())["job_id"]
    time.sleep(1.0)
    leftover = subprocess.run(["pgrep", "-f", f"tokfleet-ray-{job_id}/"], capture_output=True, text=True).stdout.split()
    assert not leftover, leftover


def test_dry_run_prints_the_script(tmp_path, token_dataset):
    config = train_config(tmp_path, token_dataset, "dry", engine={"kind": "deepspeed", "zero_stage": 2, "strategy": "auto"})
    out = check(tokfleet("submit", "slurm", str(config), "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                         "--time", "02:00:00", "--account", "lab", "--mem", "64G", "--requeue", "--signal-seconds", "120",
                         "--extra-sbatch=--exclusive", "--dry-run"))
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=02:00:00", "#SBATCH --account=lab", "#SBATCH --mem=64G", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --exclusive", "#SBATCH --job-name=dry",
                 f"#SBATCH --output={tmp_path}/dry/logs/slurm-%j.out"):
        assert line + "\n" in out, line
    assert "srun --nodes=4 --ntasks=4 --ntasks-per-node=1" in out
    # the engine's own launcher, one per node, with the node's rank and the first node's address
    assert ('deepspeed --num_gpus 8 --master_port "${MASTER_PORT}" --num_nodes 4 --hostfile "${HOSTFILE}" --no_ssh '
            '--node_rank "${SLURM_NODEID}" --master_addr "${MASTER_ADDR}" --module trainer ' + str(config)) in out
    assert not (tmp_path / "dry" / "job.json").exists()  # nothing submitted
    out = check(tokfleet("submit", "slurm", str(config), "--nodes", "2", "--launcher", "torchrun", "--dry-run"))
    assert ("-m torch.distributed.run --nnodes=2 --nproc_per_node=1 --node_rank \"${SLURM_NODEID}\" --master_addr "
            "\"${MASTER_ADDR}\" --master_port \"${MASTER_PORT}\" -m trainer " + str(config) + " --resume auto") in out
    assert "#SBATCH --requeue" not in out and "#SBATCH --signal" not in out and "#SBATCH --gres" not in out


def test_errors_exit_2_with_one_line(slurm_cluster, tmp_path, token_dataset):
    config = train_config(tmp_path, token_dataset, "bad")
    # no SLURM client on PATH
    result = tokfleet("submit", "slurm", str(config), env={**slurm_cluster.env(), "PATH": str(BIN)}, timeout=60)
    assert result.returncode == 2 and "sbatch not found on PATH" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # a partition the cluster does not have
    result = tokfleet("submit", "slurm", str(config), "--partition", "nosuch", env=slurm_cluster.env(), timeout=60)
    assert result.returncode == 2 and "Invalid partition name specified" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # single-device engine on several ranks
    single = train_config(tmp_path, token_dataset, "single", engine={"kind": "single", "strategy": "auto"})
    result = tokfleet("submit", "local", str(single), "--nproc", "2")
    assert result.returncode == 2 and "engine.kind 'single' runs one process" in result.stderr
    # a job SLURM never had
    result = tokfleet("jobs", "status", "slurm:999999", env=slurm_cluster.env())
    assert result.returncode == 2 and "unknown to scontrol" in result.stderr


def test_jobs_stop_cancels_a_pending_job(slurm_cluster, tmp_path, token_dataset):
    config = train_config(tmp_path, token_dataset, "held")
    submit_slurm(slurm_cluster, config, "--extra-sbatch=--begin=now+1hour")
    job_dir = tmp_path / "held"
    assert check(tokfleet("jobs", "status", str(job_dir), env=slurm_cluster.env())).strip() == "PENDING"
    assert "stopped slurm job" in check(tokfleet("jobs", "stop", str(job_dir), env=slurm_cluster.env()))
    assert wait_for(slurm_cluster, job_dir, {"STOPPED", "SUCCEEDED", "FAILED"}, timeout=30) == "STOPPED"
