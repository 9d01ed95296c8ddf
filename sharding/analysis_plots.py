"""The PNGs of `tokfleet analyze` (sharding/analysis.py): id usage, the transition matrix, per-channel and
per-level usage of code grids, and the distribution of per-sample likelihoods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sharding.analysis import DENSE_HEATMAP_VOCAB, Counts, Distribution

HEATMAP_TOP = 64  # beyond DENSE_HEATMAP_VOCAB: the transitions among the most used ids


def new_figure(rows: int = 1, columns: int = 1, figsize=None, **kwargs):
    """(figure, axes) on matplotlib's object API: no pyplot state to close, no GUI backend lookup."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns, **kwargs)


def draw_analysis(counts: Counts, report: dict[str, Any], distribution: Distribution, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [_usage(counts, report, out / "usage.png"), _transitions(counts, out / "transitions.png"),
             _sample_nll(distribution, report, out / "sample_nll.png")]
    if counts.by_height is not None:
        paths.append(_grid_usage(report, out / "channels.png"))
    return paths


def _usage(counts: Counts, report: dict[str, Any], path: Path) -> Path:
    unigram = counts.unigram
    fig, (by_rank, by_id) = new_figure(1, 2, figsize=(11, 4))
    ranked = np.sort(unigram[unigram > 0])[::-1]
    by_rank.loglog(np.arange(1, len(ranked) + 1), ranked / max(ranked.sum(), 1))
    by_rank.set(xlabel="rank", ylabel="frequency", title=f"rank-frequency ({report['used_ids']} of {report['vocab_size']} ids used)")
    by_id.plot(np.arange(len(unigram)), unigram + 1, linewidth=0.6)
    by_id.set(xlabel="id", ylabel="count + 1", yscale="log",
              title=f"usage by id: H1 {report['unigram_entropy_nats']:.2f} nats, H(next|prev) {report['bigram_conditional_entropy_nats']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _transitions(counts: Counts, path: Path) -> Path:
    vocab = counts.vocab_size
    codes, values = counts.transitions
    if vocab <= DENSE_HEATMAP_VOCAB:
        ids = np.arange(vocab)
        title = "transition counts (log10 1+n): previous id (rows) -> next id"
    else:
        ids = np.sort(np.argsort(-counts.unigram, kind="stable")[:HEATMAP_TOP])
        title = f"transitions among the {HEATMAP_TOP} most used ids (log10 1+n)"
    position = np.full(vocab, -1, np.int64)
    position[ids] = np.arange(len(ids))
    previous = position[(codes // np.uint64(vocab)).astype(np.int64)]
    following = position[(codes % np.uint64(vocab)).astype(np.int64)]
    kept = (previous >= 0) & (following >= 0)
    matrix = np.zeros((len(ids), len(ids)), np.float32)
    matrix[previous[kept], following[kept]] = values[kept]
    fig, ax = new_figure(figsize=(6.5, 5.5))
    image = ax.imshow(np.log10(1 + matrix), cmap="magma", interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set(title=title, xlabel="next", ylabel="previous")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _sample_nll(distribution: Distribution, report: dict[str, Any], path: Path) -> Path:
    edges = np.linspace(0, distribution.high, distribution.bins + 1)
    used = np.flatnonzero(distribution.histogram)
    low, high = (used[0], used[-1] + 1) if len(used) else (0, distribution.bins)
    fig, ax = new_figure(figsize=(7, 3.5))
    ax.stairs(distribution.histogram[low:high], edges[low : high + 1], fill=True)
    for name, color in (("least_likely", "tab:red"), ("most_likely", "tab:green")):
        for outlier in report["outliers"][name][:3]:
            ax.axvline(outlier["bigram_nll"], color=color, linewidth=0.8)
    ax.set(xlabel="per-sample bigram NLL (nats/token)", ylabel="samples",
           title=f"sample likelihood under the data's bigram model ({distribution.count} samples; red: least, green: most likely)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _grid_usage(report: dict[str, Any], path: Path) -> Path:
    fig, (by_channel, by_level) = new_figure(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    for ax, rows, label in ((by_channel, report["by_channel"], "channel / height"), (by_level, report["by_level"], "RVQ level")):
        entropies = [row["unigram_entropy_nats"] for row in rows]
        ax.bar(np.arange(len(rows)), entropies, color="tab:blue")
        ax.axhline(report["max_entropy_nats"], color="gray", linestyle="--", linewidth=0.8, label="log V")
        ax.set(xlabel=label, ylabel="unigram entropy (nats)", title=f"per {label.split(' /')[0]}: entropy")
    by_channel.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
