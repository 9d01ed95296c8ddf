"""`tokfleet submit local|slurm|ray CONFIG` and `tokfleet jobs status|logs|stop JOB`.

One config drives every backend: the stage (train, prepare, pretokenize) is read from the
config's sections, the backend's settings from its `launch:` section, and the command
line's flags override those. Each backend module (launch/local_jobs.py, launch/slurm.py,
launch/ray_jobs.py) has `submit(JobSpec) -> JobRecord`, `status(record) -> str` (one of
launch.jobs.STATES), `logs(record) -> str` and `stop(record)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import replace
from pathlib import Path

from core.errors import UserError, exit_on_user_error
from launch.jobs import JobRecord, JobSpec

_BACKEND_MODULES = {"local": "launch.local_jobs", "slurm": "launch.slurm", "ray": "launch.ray_jobs"}


def backend_module(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def detect_stage(data: dict) -> str:
    """train / prepare / pretokenize from a config's top-level sections."""
    if "source" in data:
        return "prepare"
    if "input" in data and "tokenizer" in data:
        return "pretokenize"
    if "data" in data:
        return "train"
    raise UserError("cannot tell the stage from the config's sections (train has data:, prepare source:, "
                    "pretokenize input: + tokenizer:); pass --stage")


def _config_class(stage: str):
    from core.config import PrepareConfig, PretokenizeConfig, TrainConfig

    return {"train": TrainConfig, "prepare": PrepareConfig, "pretokenize": PretokenizeConfig}[stage]


# flag -> (attribute path under cfg.launch); None values are not given on the command line
_FLAG_FIELDS = {
    "nodes": "nodes", "nproc_per_node": "nproc_per_node", "launcher": "launcher",
    "partition": "slurm.partition", "time": "slurm.time", "account": "slurm.account", "qos": "slurm.qos",
    "constraint": "slurm.constraint", "mem": "slurm.mem", "cpus_per_task": "slurm.cpus_per_task",
    "job_name": "slurm.job_name", "requeue": "slurm.requeue", "signal_seconds": "slurm.signal_seconds",
    "template": "slurm.template", "address": "ray.address",
}


def _apply_flags(launch, args: argparse.Namespace) -> None:
    for flag, dotted in _FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        target = launch
        *parents, leaf = dotted.split(".")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, leaf, value)
    if getattr(args, "gpus_per_node", None):
        launch.gpus_per_node = args.gpus_per_node
        launch.nproc_per_node = args.gpus_per_node  # one rank per GPU
    if getattr(args, "extra_sbatch", None):
        launch.slurm.extra_sbatch = [*launch.slurm.extra_sbatch, *args.extra_sbatch]
    # re-run the sections' validation on the merged values
    launch.slurm = replace(launch.slurm)
    launch.ray = replace(launch.ray)
    replace(launch)


def build_spec(args: argparse.Namespace) -> JobSpec:
    from core.config import load_config, read_yaml

    config_path = Path(args.config).resolve()
    stage = args.stage or detect_stage(read_yaml(config_path))
    cfg = load_config(config_path, _config_class(stage), args.overrides)
    try:
        _apply_flags(cfg.launch, args)
    except ValueError as error:
        raise UserError(str(error)) from None
    if stage == "train":
        job_name = cfg.launch.slurm.job_name or cfg.run.name
        job_dir = Path(cfg.run.output_dir)
    else:
        job_name = cfg.launch.slurm.job_name or config_path.stem
        job_dir = Path("jobs") / job_name
    if args.job_dir:
        job_dir = Path(args.job_dir)
    stage_args = ["--resume", "auto"] if stage == "train" else []
    return JobSpec(stage=stage, config_path=config_path, overrides=list(args.overrides), config=cfg,
                   job_dir=job_dir.resolve(), job_name=job_name, dry_run=getattr(args, "dry_run", False),
                   stage_args=stage_args)


def cmd_submit(args: argparse.Namespace) -> None:
    with exit_on_user_error(args.debug):
        spec = build_spec(args)
        record = backend_module(args.backend).submit(spec)
    if record is None:  # --dry-run
        return
    if record.backend == "local":  # it ran in the foreground: its exit code is ours
        code = backend_module("local").exit_code(record)
        outcome = "finished" if code == 0 else f"failed with exit code {code}"
        print(f"local job {record.job_id} ({spec.stage}) {outcome}; log: {record.log_path}", file=sys.stderr)
        sys.exit(code)
    print(f"submitted {record.backend} job {record.job_id} ({spec.stage}); record: {record.path}")


def cmd_jobs(args: argparse.Namespace) -> None:
    with exit_on_user_error(args.debug):
        record = JobRecord.load(args.job, args.address)
        module = backend_module(record.backend)
        if args.action == "status":
            print(module.status(record))
        elif args.action == "logs":
            print(module.logs(record), end="")
        else:
            module.stop(record)
            print(f"stopped {record.backend} job {record.job_id}")


def add_parsers(sub) -> None:
    submit = sub.add_parser("submit", help="run a stage's config as a job: on this machine, on SLURM, or on a Ray cluster",
                            description="Submit a train / prepare / pretokenize config. The stage is read from the config's "
                                        "sections; the `launch:` section holds backend settings, and these flags override it.")
    backends = submit.add_subparsers(dest="backend", required=True, metavar="BACKEND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("config", help="YAML config of a train, prepare or pretokenize stage")
    common.add_argument("--stage", choices=("train", "prepare", "pretokenize"), help="the config's stage (default: from its sections)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable); passed on to the job")
    common.add_argument("--job-dir", help="where the script, job.json and logs go (default: run.output_dir, or jobs/NAME)")
    common.add_argument("--debug", action="store_true", help="show tracebacks for input errors")

    local = backends.add_parser("local", parents=[common], help="run on this machine (the debugging path)")
    local.add_argument("--nproc", dest="nproc_per_node", type=int, help="training processes (ranks) on this machine")
    local.add_argument("--launcher", choices=("auto", "torchrun", "deepspeed", "accelerate"))
    local.add_argument("--dry-run", action="store_true", help="print the command instead of running it")

    slurm = backends.add_parser("slurm", parents=[common], help="render slurm/'s template into the job dir and sbatch it")
    slurm.add_argument("--nodes", type=int)
    slurm.add_argument("--gpus-per-node", type=int, help="GPUs per node (one rank each; --gres=gpu:G)")
    slurm.add_argument("--nproc-per-node", type=int, help="ranks per node without GPUs (CPU processes)")
    slurm.add_argument("--launcher", choices=("auto", "torchrun", "deepspeed", "accelerate"))
    for flag in ("partition", "time", "account", "qos", "constraint", "mem", "job-name", "template"):
        slurm.add_argument(f"--{flag}")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--extra-sbatch", action="append", metavar="OPTION", help="another #SBATCH option (repeatable)")
    slurm.add_argument("--requeue", action="store_true", default=None,
                       help="checkpoint on SLURM's warning signal before the time limit / preemption and requeue")
    slurm.add_argument("--signal-seconds", type=int, help="with --requeue: seconds before the time limit for the warning")
    slurm.add_argument("--dry-run", action="store_true", help="print the rendered script instead of submitting it")

    ray = backends.add_parser("ray", parents=[common], help="submit through the Ray Jobs API (training as Ray Train)")
    ray.add_argument("--address", help="Ray Jobs API address, e.g. http://HEAD:8265 (default: launch.ray.address)")
    ray.add_argument("--nproc", dest="nproc_per_node", type=int, help="training: Ray Train workers (one per rank)")
    for parser in (local, slurm, ray):
        parser.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="status, logs or stop of a submitted job",
                          description="JOB: a job dir (a train run dir), its job.json, or BACKEND:ID (slurm:42, ray:ID --address URL).")
    jobs.add_argument("action", choices=("status", "logs", "stop"))
    jobs.add_argument("job", metavar="JOB")
    jobs.add_argument("--address", help="Ray Jobs API address (for ray:ID, or to override the record's)")
    jobs.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    jobs.set_defaults(func=cmd_jobs)
