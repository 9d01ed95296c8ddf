"""Training metrics: `metrics.jsonl`, wandb, throughput and MFU, and the loss plot.

MFU = achieved model FLOP/s / peak FLOP/s of the device. Model FLOPs per token come from
the model's own count (`num_flops_per_token`, checked against torch's FlopCounterMode in
the tests). The peak (`PeakFlops`) is the one of the training precision: configured
(`engine.peak_flops`), else the datasheet's dense tensor-core number of a known GPU, else a
matmul measured in that precision. A measured peak is a lower bound of what the device can do
(the machine may be busier at the start than later): it is measured again every
REMEASURE_INTERVAL_S and raised to any achieved rate above it, so a reported MFU never exceeds 1.
Each metrics record names the peak it used (`peak_flops`, `peak_source`).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from core.config import LoggingConfig


# Dense (no sparsity) peak FLOP/s per GPU from NVIDIA's datasheets, by training precision; "tf32" is fp32
# training with tensor-core matmuls allowed. Names are matched in DATASHEET_NAMES' order (first match wins).
DATASHEET_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "H100-SXM": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100-PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12},
    "H100-NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "H200-SXM": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H200-NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "B200": {"bf16": 2.25e15, "fp16": 2.25e15},
    "L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183.2e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}
DATASHEET_NAMES: list[tuple[str, str]] = [  # regex on torch.cuda.get_device_name(), lower case -> table row
    (r"h200.*nvl", "H200-NVL"), (r"h200", "H200-SXM"), (r"h100.*nvl", "H100-NVL"), (r"h100.*pcie", "H100-PCIe"),
    (r"h100", "H100-SXM"), (r"a100", "A100"), (r"b200", "B200"), (r"l40s", "L40S"), (r"\bl4\b", "L4"),
    (r"\ba10\b", "A10"), (r"v100", "V100"),
]
REMEASURE_INTERVAL_S = 300.0  # a measured peak is measured again this often (0.5 s of a logging step)
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_precision(precision: str, device: torch.device) -> str:
    """The precision the model's matmuls run in: `precision` (engine.precision), except fp32 on a CUDA
    device that allows TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32, or float32 matmul
    precision "high"/"medium"), which is "tf32"."""
    if precision == "fp32" and device.type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        return "tf32"
    return precision


def datasheet_peak(device_name: str, precision: str) -> tuple[float, str] | None:
    """(peak FLOP/s, table row) of a GPU named `device_name` (as torch.cuda.get_device_name says) in
    matmul precision `precision`; None for a GPU or precision the table does not hold."""
    name = device_name.lower()
    for pattern, row in DATASHEET_NAMES:
        if re.search(pattern, name):
            peak = DATASHEET_PEAK_FLOPS[row].get(precision)
            return (peak, row) if peak else None
    return None


def measure_peak_flops(device: torch.device, precision: str = "fp32", seconds: float = 0.5) -> float:
    """Achieved matmul FLOP/s on `device` in `precision` (fp32/tf32/bf16/fp16): the practical peak MFU is
    measured against. The matrices grow from 256 to 2048 while three products of the next size fit in
    `seconds` (a bf16 matmul on a CPU without bf16 instructions is 100x slower than fp32: it stays small)."""
    dtype = _DTYPES[precision]
    size = 256
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        seconds_one = _time_matmuls(a, b, device, 1)  # also warms up kernels and caches
        if size >= 2048 or 3 * 8 * seconds_one > seconds:
            break
        size *= 2
    count = max(3, int(seconds / max(seconds_one, 1e-9)))
    return 2.0 * size**3 * count / _time_matmuls(a, b, device, count)


def _time_matmuls(a: torch.Tensor, b: torch.Tensor, device: torch.device, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        torch.matmul(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class PeakFlops:
    """The peak FLOP/s of one device that MFU divides by, and where it came from (`source`):
    "config" (engine.peak_flops), "datasheet:<GPU> <precision>" or "measured:<device> <precision>".
    A measured peak is refreshed by `observe` (see the module docstring); the others are fixed."""

    def __init__(self, device: torch.device, precision: str, configured: float = 0.0):
        self.device, self.precision = device, matmul_precision(precision, device)
        self.is_measured = False
        if configured:
            self.value, self.source = float(configured), "config"
            return
        sheet = datasheet_peak(torch.cuda.get_device_name(device), self.precision) if device.type == "cuda" else None
        if sheet is not None:
            self.value, self.source = sheet[0], f"datasheet:{sheet[1]} {self.precision}"
            return
        self.is_measured, self.source = True, f"measured:{device.type} {self.precision}"
        self.value, self.measured_at = measure_peak_flops(device, self.precision), time.monotonic()

    def observe(self, achieved_flops: float) -> None:
        """Refresh a measured peak with the FLOP/s one device just achieved: measured again when
        REMEASURE_INTERVAL_S have passed, and never below what was achieved (the best of all)."""
        if not self.is_measured:
            return
        if time.monotonic() - self.measured_at >= REMEASURE_INTERVAL_S:
            self.value = max(self.value, measure_peak_flops(self.device, self.precision))
            self.measured_at = time.monotonic()
        self.value = max(self.value, achieved_flops)

    def mfu(self, achieved_flops: float) -> float:
        """Model FLOP/s utilization of one device achieving `achieved_flops`, after `observe`."""
        self.observe(achieved_flops)
        return achieved_flops / self.value


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
