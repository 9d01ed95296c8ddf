"""The plots of a run dir (`runs/NAME/plots/`), redrawn by rank 0 at each eval and at the end of a run:

- `metrics.png`: every numeric series of metrics.jsonl (loss and its parts, val loss, lr, grad norm,
  throughput, MFU, the model's own figures), one panel each, grouped by name;
- `codebook.png` (tokenizers): per codebook (RVQ level) the code usage of the latest record, sorted,
  and the active-code fraction and perplexity over steps;
- `moe_load.png` (MoE models): the experts' share of tokens over steps as a heatmap, and the latest share.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sharding.analysis_plots import new_figure
from trainer.metrics import read_metrics

NOT_SERIES = {"step", "world_size", "epoch"}  # bookkeeping, not curves


def numeric_series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values) for every scalar number a record holds, in first-seen order."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for name, value in record.items():
            if name in NOT_SERIES or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return series


def draw_run_plots(run_dir: Path, latest_usage: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Redraw the run's plots from its metrics.jsonl (and the latest usage histograms); the paths written."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not records:
        return []
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = [_metrics(records, out / "metrics.png")]
    codebooks = sorted(name for name in (latest_usage or {}) if name.startswith("codebook/"))
    if codebooks:
        paths.append(_codebooks(records, {name: latest_usage[name] for name in codebooks}, out / "codebook.png"))
    if any("moe/load" in record for record in records):
        paths.append(_moe_load(records, out / "moe_load.png"))
    return paths


def metric_panels(series: dict[str, tuple[list[int], list[float]]]) -> list[tuple[str, list[str]]]:
    """(title, names) per panel of metrics.png: the loss with val loss and the loss parts, lr, grad norm,
    throughput, MFU, then one panel per group of the model's figures (`codebook/...`, `moe/...`); the
    running counters (tokens, samples) and skip counts that never left 0 are left out."""
    fixed = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens", "samples", "epochs")
    parts = [n for n in series if n not in fixed and "/" not in n and not n.startswith("skipped_")]
    panels = [("loss (and its parts)", [n for n in ("loss", "val_loss", *parts) if n in series])]
    panels += [(n, [n]) for n in ("lr", "grad_norm", "tokens_per_s", "mfu") if n in series]
    skipped = [n for n in series if n.startswith("skipped_") and any(series[n][1])]
    if skipped:
        panels.append(("skipped", skipped))
    groups: dict[str, list[str]] = {}
    for name in series:
        if "/" in name:
            groups.setdefault(name.split("/", 1)[0], []).append(name)
    panels += [(f"{group}/ (log scale)", names) for group, names in groups.items()]
    return [(title, names) for title, names in panels if names]


def _metrics(records: list[dict[str, Any]], path: Path) -> Path:
    series = numeric_series(records)
    panels = metric_panels(series)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = new_figure(rows, columns, figsize=(4.4 * columns, 2.8 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, "o-" if len(steps) < 30 else "-", markersize=3, linewidth=1, label=name)
        if title.endswith("(log scale)") and all(v > 0 for name in names for v in series[name][1]):
            ax.set_yscale("log")
        if len(names) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.1, hspace=0.55, wspace=0.3)
    fig.savefig(path, dpi=80)
    return path


def _codebooks(records: list[dict[str, Any]], usage: dict[str, np.ndarray], path: Path) -> Path:
    fig, axes = new_figure(len(usage), 2, figsize=(11, 2.8 * len(usage)), squeeze=False)
    for (histogram_ax, time_ax), (name, histogram) in zip(axes, usage.items()):
        share = np.sort(histogram)[::-1] / max(histogram.sum(), 1)
        histogram_ax.bar(np.arange(len(share)), share, width=1.0, color="tab:blue")
        used = int((histogram > 0).sum())
        histogram_ax.set(title=f"{name}: usage at the latest record ({used} of {len(histogram)} codes)", xlabel="code (by use)",
                         ylabel="share of vectors")
        steps = [r["step"] for r in records if f"{name}_active" in r]
        time_ax.plot(steps, [r[f"{name}_active"] for r in records if f"{name}_active" in r], color="tab:blue", label="active fraction")
        time_ax.set(ylim=(0, 1.05), xlabel="step", ylabel="active fraction", title=f"{name} over training")
        perplexity_ax = time_ax.twinx()
        perplexity_ax.plot(steps, [r[f"{name}_perplexity"] for r in records if f"{name}_active" in r], color="tab:orange")
        perplexity_ax.set_ylabel("perplexity", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def _moe_load(records: list[dict[str, Any]], path: Path) -> Path:
    loads = [(r["step"], r["moe/load"]) for r in records if isinstance(r.get("moe/load"), list)]
    steps = [step for step, _ in loads]
    matrix = np.array([load for _, load in loads])  # (records, E)
    fig, (heat_ax, last_ax) = new_figure(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    image = heat_ax.imshow(matrix.T, aspect="auto", cmap="viridis", interpolation="nearest",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, matrix.shape[1] - 0.5, -0.5))
    fig.colorbar(image, ax=heat_ax, label="share of tokens")
    heat_ax.set(xlabel="step", ylabel="expert", title="MoE expert load (all layers)")
    last_ax.bar(np.arange(matrix.shape[1]), matrix[-1])
    last_ax.axhline(1 / matrix.shape[1], color="gray", linestyle="--", linewidth=0.8, label="balanced")
    last_ax.set(xlabel="expert", title=f"step {steps[-1]}")
    last_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def draw_reconstruction(target, reconstruction, path: Path, video_shape: tuple[int, int, int] | None = None,
                        step: int = 0, num_channels: int = 4, num_frames: int = 6) -> Path:
    """A tokenizer's input vs reconstruction for one sample: signals (S, N) as a few channels over time;
    video (3, T*H*W) with video_shape (T, H, W) as rows of frames (input above, reconstruction below)."""
    target, reconstruction = target.detach().float().cpu().numpy(), reconstruction.detach().float().cpu().numpy()
    if video_shape is None:
        shown = min(num_channels, target.shape[0])
        fig, axes = new_figure(shown, 1, figsize=(10, 1.8 * shown), squeeze=False, sharex=True)
        for channel, ax in enumerate(axes[:, 0]):
            ax.plot(target[channel], color="black", linewidth=0.9, label="input")
            ax.plot(reconstruction[channel], color="tab:orange", linewidth=0.9, label="reconstruction")
            ax.set_ylabel(f"ch {channel}")
        axes[0, 0].legend(loc="upper right", fontsize=8)
        axes[0, 0].set_title(f"step {step}: a validation window and its reconstruction")
        axes[-1, 0].set_xlabel("sample")
    else:
        frames, height, width = video_shape
        picks = np.linspace(0, frames - 1, min(num_frames, frames)).round().astype(int)
        fig, axes = new_figure(2, len(picks), figsize=(1.8 * len(picks), 4), squeeze=False)
        for row, clip in enumerate((target, reconstruction)):
            images = np.clip((clip.reshape(3, frames, height, width).transpose(1, 2, 3, 0) + 1) / 2, 0, 1)
            for column, frame in enumerate(picks):
                axes[row, column].imshow(images[frame])
                axes[row, column].set_xticks([]), axes[row, column].set_yticks([])
                axes[0, column].set_title(f"frame {frame}", fontsize=8)
            axes[row, 0].set_ylabel(("input", "reconstruction")[row])
        fig.suptitle(f"step {step}: a validation clip and its reconstruction")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
