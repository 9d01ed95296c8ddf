"""`python -m trainer CONFIG` / `tokfleet train CONFIG`: parse, build, train, close."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys

from core.arguments import CommandLineParser, positive_int
from core.config import TrainConfig, dump_config, load_config
from core.errors import exit_on_missing_package, exit_on_user_error

DESCRIPTION = """Train a model from a YAML run config (see configs/). The same command runs on one
device and, unchanged, under torchrun / deepspeed / accelerate launch / srun."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML train config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--resume", metavar="auto|best|PATH",
                        help="'auto': continue from the newest complete checkpoint of the run dir (fresh start if none); "
                             "'best': from the one checkpoints/best names (checkpoint.keep_best); PATH: a checkpoint folder or a run dir")
    parser.add_argument("--stop-at-step", type=positive_int, metavar="N",
                        help="checkpoint and stop after step N (as a preemption would); resume later with --resume auto")
    parser.add_argument("--overwrite", action="store_true",
                        help="start fresh in a run dir that holds another run: that run is moved aside to RUN_DIR.old-N, not deleted")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    # the deepspeed launcher (without --no_local_rank) passes this; the rank is read from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> dict | None:
    from trainer.preemption import PreemptionWatcher

    # before anything loads: a Ctrl-C from here on is a flag the loop acts on (a second one stops at once)
    watcher = PreemptionWatcher(announce=distributed_rank() == 0)
    try:
        with exit_on_user_error(args.debug):
            cfg = load_config(args.config, TrainConfig, args.overrides)
            if args.print_config:
                print(dump_config(cfg), end="")
                return None
            summary = train(cfg, resume=args.resume, stop_at_step=args.stop_at_step, overwrite=args.overwrite, preemption=watcher)
    finally:
        watcher.close()
    is_main = summary.get("plot") is not None  # rank 0 only
    if is_main:
        print(json.dumps({k: summary[k] for k in ("step", "max_steps", "epochs", "finished", "checkpoint", "run_dir")}), file=sys.stderr)
    if summary.get("interrupted"):  # Ctrl-C: the loop checkpointed after the step it was in
        if is_main:
            saved = f"checkpointed step {summary['step']} in {summary['run_dir']}" if summary.get("saved_at_stop") else \
                f"stopped before training step {summary['step'] + 1}, nothing new to save"
            print(f"tokfleet: interrupted: {saved}; continue with --resume auto", file=sys.stderr)
        sys.exit(130)
    return summary


def distributed_rank() -> int:
    """This process's rank as its launcher set it (the process group does not exist yet)."""
    import os

    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def train(cfg: TrainConfig, resume: str | None = None, stop_at_step: int | None = None, overwrite: bool = False,
          preemption=None) -> dict:
    """Train `cfg` as this process's rank: what `python -m trainer` does, and each Ray Train worker
    (trainer/ray_train.py). Rank 0's summary has the loss plot's path under "plot"."""
    from trainer import distributed
    from trainer.loop import Trainer  # heavy imports after the config is known good

    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, stop_at_step=stop_at_step, overwrite=overwrite)
        if not trainer.is_main:
            logging.getLogger("tokfleet").setLevel(logging.WARNING)
        if trainer.resumed_from:
            logging.getLogger("tokfleet").info("resumed from %s at step %d", trainer.resumed_from, trainer.step)
        summary = trainer.train(preemption)
        if trainer.is_main:
            summary["plot"] = str(trainer.plot() or "")
    finally:
        # the engine (DDP's reducer, DeepSpeed) holds the process group and gloo's pending work: free them
        # while the interpreter is whole, not during its shutdown (a gloo thread then aborts the process)
        del trainer
        gc.collect()
        distributed.shutdown()
    return summary


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = CommandLineParser(prog="python -m trainer", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    with exit_on_missing_package("python -m trainer", args.debug):  # e.g. engine.kind deepspeed without deepspeed
        run(args)
