"""Training metrics: `metrics.jsonl`, wandb, throughput and MFU, and the loss plot.

MFU = achieved model FLOP/s / peak FLOP/s of the device. Model FLOPs per token come from
the model's own count (`num_flops_per_token`, checked against torch's FlopCounterMode in
the tests); the peak is configured (`engine.peak_flops`) or measured with an fp32 matmul.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from core.config import LoggingConfig


def measure_peak_flops(device: torch.device, size: int = 2048, seconds: float = 0.5) -> float:
    """Achieved fp32 matmul FLOP/s on `device`: the practical peak MFU is measured against."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.matmul(a, b)  # warm up kernels and caches
    count, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= 3:
            return 2.0 * size**3 * count / elapsed


class MetricsLogger:
    """Writes one JSON object per logged step to metrics.jsonl (rank 0) and mirrors it to wandb."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config_dict: dict, is_main: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.is_main = is_main
        self.wandb_run = None
        if is_main and cfg.wandb and cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.wandb_project, name=run_name, dir=str(run_dir), config=config_dict,
                mode=cfg.wandb_mode, resume="allow", id=_wandb_id(run_dir),
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:  # a full disk names no file
            raise OSError(error.errno, error.strerror, error.filename or str(self.path)) from None
        if self.wandb_run is not None:
            step = record["step"]
            self.wandb_run.log({k: _wandb_value(v) for k, v in record.items() if k != "step"}, step=step)

    def log_samples(self, step: int, lines: list[dict[str, Any]]) -> None:
        """Samples of `step` (already in samples.jsonl) as a wandb table."""
        if self.wandb_run is not None and lines:
            from trainer.samples import wandb_table

            self.wandb_run.log({"samples": wandb_table(lines)}, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_value(value: Any) -> Any:
    """A list (e.g. the MoE experts' load) as a wandb bar histogram over its entries; anything else as it is."""
    if not isinstance(value, list):
        return value
    import numpy as np
    import wandb

    return wandb.Histogram(np_histogram=(np.asarray(value), np.arange(len(value) + 1)))


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run dir, so a resumed run continues the same wandb run."""
    path = Path(run_dir) / "logs" / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a line that does not parse (torn by a kill mid-write, or being
    written now) is left out."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records



def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the records of steps after `max_step` from a JSON-lines log (they belong to a run that did
    not checkpoint them), and any torn line."""
    path = Path(path)
    if path.is_file():
        kept = [record for record in read_metrics(path) if (record.get("step") or 0) <= max_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def plot_losses(metrics_path: Path, out_path: Path, references: dict[str, float] | None = None) -> Path | None:
    """Train (and validation) loss over steps as a PNG, with horizontal reference levels."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    for label, level in (references or {}).items():
        ax.axhline(level, linestyle="--", color="gray", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
