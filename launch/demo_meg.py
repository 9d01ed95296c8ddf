"""`tokfleet demo meg`: the MEG forecasting chain end to end on this machine (~10 minutes on 2 cores).

synthetic MEG + EEG recordings (sharding.synthetic_meg: real sensor geometry, 1/f background, alpha
bursts, line noise) -> `tokfleet prepare` (Ray Data: filters, windows, normalisation) -> TOTEM
VQ-VAE -> `tokfleet pretokenize` (Ray Data actors) -> a GPT forecaster on the codes, each channel a
series -> next-token eval -> `tokfleet forecast` on held-out windows: MSE of the forecast next to
the naive baselines, and a plot.

Every stage runs as its own `tokfleet` process with the shipped configs under configs/meg/, as a
user would type it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "meg"
NUM_RECORDINGS, SECONDS = 12, 60.0
CONTEXT, HORIZON = 750, 50  # samples at 250 Hz: 3 s of context, 0.2 s ahead


def _tokfleet(*args: str) -> None:
    command = [sys.executable, "-m", "launch.cli", *args]
    Console(stderr=True).print(f"[bold cyan]$ tokfleet {' '.join(args)}")
    if subprocess.run(command).returncode != 0:
        sys.exit(1)


def run(args: argparse.Namespace) -> None:
    from launch.netns import ensure_confined

    ensure_confined()  # prepare and pretokenize start Ray: keep it on loopback
    console = Console()
    work = Path(args.workdir).resolve()
    recordings, windows, tokens = work / "data" / "meg-synthetic", work / "data" / "meg-synthetic-windows", work / "data" / "meg-totem-tokens"
    totem, forecaster, out = work / "runs" / "totem-meg", work / "runs" / "gpt-meg", work / "runs" / "gpt-meg" / "forecast"
    debug = ["--debug"] if args.debug else []
    extra = [item for override in args.overrides for item in ("--set", override)]
    start = time.perf_counter()

    Console(stderr=True).print(f"[bold cyan]$ python -m sharding.synthetic_meg {recordings}")
    subprocess.run([sys.executable, "-m", "sharding.synthetic_meg", str(recordings), "--num-recordings", str(NUM_RECORDINGS),
                    "--seconds", str(SECONDS)], check=True)
    _tokfleet("prepare", str(CONFIGS / "prepare_synthetic.yaml"), "--quiet", "--set", f"source.paths=['{recordings}/*.fif']",
              "--set", f"shards.output={windows}", *debug)
    _tokfleet("train", str(CONFIGS / "train_totem.yaml"), "--set", f"data.dataset={windows}", "--set", f"run.output_dir={totem}",
              "--set", "logging.progress=false", *debug)
    _tokfleet("eval", str(totem), "--data", str(windows), "--out", str(totem / "eval.json"), *debug)
    _tokfleet("pretokenize", str(CONFIGS / "pretokenize_totem.yaml"), "--quiet", "--set", f"input.dataset={windows}",
              "--set", f"tokenizer.checkpoint={totem}", "--set", f"shards.output={tokens}", *debug)
    _tokfleet("train", str(CONFIGS / "train_forecaster_meg.yaml"), "--set", f"data.dataset={tokens}",
              "--set", f"run.output_dir={forecaster}", "--set", "logging.progress=false", *extra, *debug)
    _tokfleet("eval", str(forecaster), "--data", str(tokens), "--out", str(forecaster / "eval.json"), *debug)
    _tokfleet("forecast", str(forecaster), "--data", str(windows), "--context", str(CONTEXT), "--horizon", str(HORIZON),
              "--num-windows", "16", "--out", str(out), *debug)
    _summary(console, totem, forecaster, out, time.perf_counter() - start)


def _summary(console: Console, totem: Path, forecaster: Path, out: Path, seconds: float) -> None:
    report = json.loads((out / "forecast.json").read_text())
    tokenizer = json.loads((totem / "eval.json").read_text())["metrics"]
    next_token = json.loads((forecaster / "eval.json").read_text())["metrics"]
    table = Table(title=f"tokfleet demo meg finished in {seconds / 60:.1f} min")
    for column in ("forecast of 0.2 s", "MSE (normalised)", "MAE", "correlation"):
        table.add_column(column)
    for name in ("model", "persistence", "context_mean", "last_period"):
        m = report["metrics"][name]["normalized"]
        correlation = "-" if m["correlation"] is None else f"{m['correlation']:.3f}"
        table.add_row(name, f"{m['mse']:.4f}", f"{m['mae']:.4f}", correlation)
    console.print(table)
    console.print(f"TOTEM: codebook use {tokenizer['codebook_utilization']:.2f}, reconstruction MSE "
                  f"{tokenizer['reconstruction_mse']:.4f} (normalised); forecaster next-token loss "
                  f"{next_token['model']['loss']:.3f} vs unigram {next_token['unigram']['loss']:.3f} nats")
    console.print(f"plots: {', '.join(report['outputs'])}\nreport: {out / 'forecast.json'}")
