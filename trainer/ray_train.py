"""Training as Ray Train: `python -m trainer.ray_train CONFIG [--set ...] [--num-workers N] [--resume auto]`.

This is the driver `tokfleet submit ray` runs on the cluster (it joins the cluster at RAY_ADDRESS,
which a Ray job has set). It starts a `ray.train.torch.TorchTrainer` with one worker per rank
(`--num-workers`, else launch.nodes x launch.nproc_per_node), each reserving
launch.ray.cpus_per_worker CPUs and gpus_per_worker GPUs, and every worker runs the trainer of
`python -m trainer` (trainer/entry.py `train`): same model code, same run directory, same
checkpoints, so `--resume auto` and `tokfleet inspect` work as after any other launcher.

Ray Train exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT on each worker and
joins the torch process group (gloo on CPU, nccl with GPUs) before the worker function runs;
trainer/distributed.py reads the former and keeps the group it finds, so nothing below the
entry point knows it runs under Ray. Metrics go to RUN_DIR/metrics.jsonl (and wandb) as always,
not to `ray.train.report`: Ray Train 2.x keeps only the metrics reported with a checkpoint, and a
report blocks the training thread until the controller's next poll (every 2 s), so reporting each
logged step would slow training down for nothing. Ray Train's own bookkeeping goes to
RUN_DIR/logs/ray_train; the checkpoints are ours, not Ray's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from core.config import TrainConfig, load_config
from core.config_paths import absolute_paths
from core.errors import UserError, exit_on_user_error

log = logging.getLogger("tokfleet")


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One rank, inside a Ray Train worker (the process group is already up)."""
    import ray.train

    from trainer import distributed
    from trainer.entry import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    context = ray.train.get_context()
    env = distributed.read_env()
    assert (env.rank, env.world_size) == (context.get_world_rank(), context.get_world_size()), (env, context)
    train(loop_config["config"], resume=loop_config["resume"], stop_at_step=loop_config["stop_at_step"])


def _worker_user_error(error: Exception) -> UserError | None:
    """The first rank's input error (a ValueError) inside a Ray Train failure, as one line for the driver."""
    for rank, failure in sorted(getattr(error, "worker_failures", {}).items()):
        cause = getattr(failure, "cause", None) or failure  # a RayTaskError wraps the worker's exception
        if isinstance(cause, ValueError):
            message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            return UserError(f"rank {rank}: {message}")
    return None


def fit(cfg: TrainConfig, num_workers: int, resume: str | None = None, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train `cfg` on `num_workers` Ray Train workers of the cluster this process joins; the last metrics record."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.metrics import read_metrics

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")  # a Ray job's driver has it
        # Ray Train's helper actors find the cluster by scanning this machine's processes unless
        # RAY_ADDRESS names it, which fails where several clusters share a machine
        runtime_env = {"env_vars": {"RAY_ADDRESS": address}} if address else None
        try:
            ray.init(address="auto", runtime_env=runtime_env, logging_level=logging.WARNING)
        except ConnectionError as error:
            raise UserError(f"no Ray cluster to join ({error}): run this as a Ray job (tokfleet submit ray) "
                            "or set RAY_ADDRESS") from None
    ray_cfg = cfg.launch.ray
    use_gpu = ray_cfg.gpus_per_worker > 0
    resources = {"CPU": ray_cfg.cpus_per_worker, **({"GPU": ray_cfg.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": cfg, "resume": resume, "stop_at_step": stop_at_step},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.engine.timeout_s)),
        run_config=RunConfig(
            name=re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.run.name) or "run",
            storage_path=str(Path(cfg.run.output_dir) / "logs" / "ray_train"),
            failure_config=FailureConfig(max_failures=0),  # a failed rank fails the job; resume is --resume auto
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as error:  # a worker (or the controller) failed
        user_error = _worker_user_error(error)
        if user_error is not None:
            raise user_error from None
        raise
    assert result.error is None, result.error
    records = read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl")
    return records[-1] if records else {}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m trainer.ray_train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML train config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--num-workers", type=int,
                        help="Ray Train workers, one per rank (default: launch.nodes x launch.nproc_per_node)")
    parser.add_argument("--resume", metavar="auto|PATH", help="as `python -m trainer --resume`")
    parser.add_argument("--stop-at-step", type=int, metavar="N", help="checkpoint and stop after step N")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    args = parser.parse_args(argv)
    with exit_on_user_error(args.debug):
        # relative paths mean the driver's directory, not the workers' (they may run elsewhere)
        cfg = absolute_paths(load_config(args.config, TrainConfig, args.overrides), Path.cwd())
        num_workers = args.num_workers or cfg.launch.nodes * cfg.launch.nproc_per_node
        if num_workers < 1:
            raise UserError(f"--num-workers must be >= 1, got {num_workers}")
        log.info("Ray Train: %d workers x %s", num_workers,
                 {"CPU": cfg.launch.ray.cpus_per_worker, "GPU": cfg.launch.ray.gpus_per_worker})
        last = fit(cfg, num_workers, resume=args.resume, stop_at_step=args.stop_at_step)
    print(json.dumps({"run_dir": cfg.run.output_dir, "num_workers": num_workers, "last": last}), file=sys.stderr)


if __name__ == "__main__":
    main()
