"""`tokfleet demo` / `make demo`: the main job end to end on this machine.

stdlib sources -> byte-level BPE -> Ray Data shards -> GPT trained on CPU -> stopped at half
way (as a preemption would) -> resumed from its checkpoint -> a generated sample.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "text"
PREPARE_CONFIG = CONFIGS / "stdlib_prepare.yaml"
TRAIN_CONFIG = CONFIGS / "stdlib_gpt_small.yaml"


def _tokfleet(*args: str) -> None:
    """Each stage runs as its own process, exactly as a user would type it."""
    command = [sys.executable, "-m", "launch.cli", *args]
    Console(stderr=True).print(f"[bold cyan]$ tokfleet {' '.join(args)}")
    result = subprocess.run(command)
    if result.returncode != 0:
        sys.exit(result.returncode)


def run(args: argparse.Namespace) -> None:
    from core.config import TrainConfig, load_config
    from core.netns import ensure_confined

    ensure_confined()  # the prepare stage starts Ray: keep it on loopback
    console = Console()
    workdir = Path(args.workdir).resolve()
    dataset = workdir / "data" / "stdlib-bpe8k"
    run_dir = workdir / "runs" / "stdlib-gpt-small"
    train_sets = ["--set", f"data.dataset={dataset}", "--set", f"run.output_dir={run_dir}"]
    for override in args.overrides:
        train_sets += ["--set", override]
    debug = ["--debug"] if args.debug else []
    cfg = load_config(TRAIN_CONFIG, TrainConfig, train_sets[1::2])
    half = cfg.run.max_steps // 2
    start = time.perf_counter()

    _tokfleet("prepare", str(PREPARE_CONFIG), "--set", f"shards.output={dataset}", *debug)
    _tokfleet("train", str(TRAIN_CONFIG), *train_sets, "--stop-at-step", str(half), *debug)
    _tokfleet("train", str(TRAIN_CONFIG), *train_sets, "--resume", "auto", *debug)
    prompt = "def fibonacci(n):\n"
    sample = subprocess.run(
        [sys.executable, "-m", "launch.cli", "generate", "--checkpoint", str(run_dir), "--prompt", prompt,
         "--max-new-tokens", "120", "--temperature", "0.7", "--top-k", "40"],
        capture_output=True, text=True,
    )
    if sample.returncode != 0:
        console.print(sample.stderr)
        sys.exit(sample.returncode)
    sample_path = run_dir / "sample.txt"
    sample_path.write_text(sample.stdout)
    _summary(console, dataset, run_dir, sample_path, sample.stdout, time.perf_counter() - start)


def _summary(console: Console, dataset: Path, run_dir: Path, sample_path: Path, sample: str, seconds: float) -> None:
    from sharding.manifest import Manifest
    from trainer.checkpoint import CheckpointManager
    from trainer.metrics import read_metrics

    manifest = Manifest.read(str(dataset), {})
    records = read_metrics(run_dir / "metrics.jsonl")
    val = [r for r in records if "val_loss" in r]
    entropy = manifest.stats["unigram_entropy_nats"]
    final_val = val[-1]["val_loss"] if val else math.nan
    last = records[-1]

    console.rule("generated sample")
    console.print(sample, markup=False, highlight=False)
    table = Table(title=f"tokfleet demo finished in {seconds / 60:.1f} min", show_header=False)
    table.add_row("shards", f"{dataset} ({len(manifest.shards)} shards, manifest.json)")
    table.add_row("run dir", str(run_dir))
    table.add_row("checkpoint", str(CheckpointManager(run_dir, 1).latest()))
    table.add_row("plot", str(run_dir / "plots" / "loss.png"))
    table.add_row("sample", str(sample_path))
    table.add_row("steps / tokens", f"{last['step']} / {last['tokens']:,}")
    table.add_row("throughput", f"{last['tokens_per_s']:.0f} tokens/s, MFU {100 * last['mfu']:.1f}%")
    table.add_row("unigram entropy", f"{entropy:.3f} nats/token (a model that ignores context)")
    table.add_row("val loss", f"{final_val:.3f} nats/token ({entropy - final_val:.3f} below the unigram entropy)")
    console.print(table)
    if not final_val < entropy - 0.5:
        console.print("[bold red]validation loss is not clearly below the unigram entropy")
        sys.exit(1)
