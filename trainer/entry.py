"""`python -m trainer CONFIG` / `tokfleet train CONFIG`: parse, build, train, close."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from launch.config import TrainConfig, dump_config, load_config
from launch.errors import exit_on_user_error

DESCRIPTION = """Train a model from a YAML run config (see configs/). The same command runs on one
device and, unchanged, under torchrun / deepspeed / accelerate launch / srun."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML train config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto': continue from the newest complete checkpoint of the run dir (fresh start if none); "
                             "PATH: a checkpoint folder or a run dir")
    parser.add_argument("--stop-at-step", type=int, metavar="N",
                        help="checkpoint and stop after step N (as a preemption would); resume later with --resume auto")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    # the deepspeed launcher (without --no_local_rank) passes this; the rank is read from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> dict | None:
    with exit_on_user_error(args.debug):
        cfg = load_config(args.config, TrainConfig, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return None
        summary = train(cfg, resume=args.resume, stop_at_step=args.stop_at_step)
    if summary.get("plot") is not None:  # rank 0 only
        print(json.dumps({k: summary[k] for k in ("step", "finished", "checkpoint", "run_dir")}), file=sys.stderr)
    return summary


def train(cfg: TrainConfig, resume: str | None = None, stop_at_step: int | None = None) -> dict:
    """Train `cfg` as this process's rank: what `python -m trainer` does, and each Ray Train worker
    (trainer/ray_train.py). Rank 0's summary has the loss plot's path under "plot"."""
    from trainer import distributed
    from trainer.loop import Trainer  # heavy imports after the config is known good

    try:
        trainer = Trainer(cfg, resume=resume, stop_at_step=stop_at_step)
        if not trainer.is_main:
            logging.getLogger("tokfleet").setLevel(logging.WARNING)
        if trainer.resumed_from:
            logging.getLogger("tokfleet").info("resumed from %s at step %d", trainer.resumed_from, trainer.step)
        summary = trainer.train()
    finally:
        distributed.shutdown()
    if trainer.is_main:
        summary["plot"] = str(trainer.plot() or "")
    return summary


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m trainer", description=DESCRIPTION)
    add_arguments(parser)
    run(parser.parse_args(argv))
