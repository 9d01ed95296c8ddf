"""`tokfleet demo meg`: the MEG forecasting chain end to end on this machine (~5 minutes on 2 cores).

synthetic MEG recordings with a predictable signal (sharding.synthetic_meg --kind sinusoids: FIF
files of 8 magnetometers with real Neuromag geometry, each channel a sinusoid of its own period,
phase and amplitude plus noise) -> `tokfleet prepare` (Ray Data, mne: windows, per-channel
normalisation) -> TOTEM VQ-VAE -> `tokfleet pretokenize` (Ray Data actors) -> the seed's NanoGPT
forecaster (gpt + dropout) on the codes, each channel a series -> next-token eval -> `tokfleet
forecast` on held-out windows: the forecast's error next to the naive baselines, and a plot.

A predictable signal, because it shows whether the chain is aligned in time and scale: a forecast
off by a fraction of a period or by a scale factor would lose to the context mean. (The realistic
synthetic MEG of `python -m sharding.synthetic_meg` is mostly broadband noise: configs/meg/
train_forecaster_meg.yaml trains on it, and the README reports what it reaches.)

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
NUM_RECORDINGS, SECONDS = 8, 60.0


def _tokfleet(*args: str) -> None:
    command = [sys.executable, "-m", "launch.cli", *args]
    Console(stderr=True).print(f"[bold cyan]$ tokfleet {' '.join(args)}")
    if subprocess.run(command).returncode != 0:
        sys.exit(1)


def run(args: argparse.Namespace) -> None:
    from core.netns import ensure_confined

    ensure_confined()  # prepare and pretokenize start Ray: keep it on loopback
    console = Console()
    work = Path(args.workdir).resolve()
    data, runs = work / "data", work / "runs"
    recordings, windows, tokens = data / "meg-sinusoids", data / "meg-sinusoids-windows", data / "meg-sinusoids-tokens"
    totem, forecaster = runs / "totem-sinusoids", runs / "gpt-sinusoids"
    out = forecaster / "forecast"
    debug = ["--debug"] if args.debug else []
    extra = [item for override in args.overrides for item in ("--set", override)]
    quiet = ["--set", "logging.progress=false"]
    start = time.perf_counter()

    Console(stderr=True).print(f"[bold cyan]$ python -m sharding.synthetic_meg {recordings} --kind sinusoids")
    subprocess.run([sys.executable, "-m", "sharding.synthetic_meg", str(recordings), "--kind", "sinusoids",
                    "--num-recordings", str(NUM_RECORDINGS), "--seconds", str(SECONDS)], check=True)
    _tokfleet("prepare", str(CONFIGS / "prepare_sinusoids.yaml"), "--quiet", "--set", f"source.paths=['{recordings}/*.fif']",
              "--set", f"shards.output={windows}", *debug)
    _tokfleet("train", str(CONFIGS / "train_totem_sinusoids.yaml"), "--set", f"data.dataset={windows}",
              "--set", f"run.output_dir={totem}", *quiet, *debug)
    _tokfleet("eval", str(totem), "--data", str(windows), "--out", str(totem / "eval.json"), *debug)
    _tokfleet("pretokenize", str(CONFIGS / "pretokenize_totem_sinusoids.yaml"), "--quiet", "--set", f"input.dataset={windows}",
              "--set", f"tokenizer.checkpoint={totem}", "--set", f"shards.output={tokens}", *debug)
    _tokfleet("train", str(CONFIGS / "train_forecaster_sinusoids.yaml"), "--set", f"data.dataset={tokens}",
              "--set", f"run.output_dir={forecaster}", *quiet, *extra, *debug)
    _tokfleet("eval", str(forecaster), "--data", str(tokens), "--out", str(forecaster / "eval.json"), *debug)
    _tokfleet("forecast", str(forecaster), "--data", str(windows), "--num-windows", "16", "--out", str(out), *debug)
    _summary(console, totem, forecaster, out, time.perf_counter() - start)


def _summary(console: Console, totem: Path, forecaster: Path, out: Path, seconds: float) -> None:
    report = json.loads((out / "forecast.json").read_text())
    tokenizer = json.loads((totem / "eval.json").read_text())["metrics"]
    next_token = json.loads((forecaster / "eval.json").read_text())["metrics"]
    table = Table(title=f"tokfleet demo meg finished in {seconds / 60:.1f} min")
    horizon = report["horizon"]["samples"]
    for column in (f"forecast of {horizon} samples", "MSE (normalised)", "MAE", "correlation"):
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
    model, mean = (report["metrics"][name]["normalized"]["mse"] for name in ("model", "context_mean"))
    if not model < 0.5 * mean:
        console.print("[bold red]the forecast is not clearly better than the context mean")
        sys.exit(1)
