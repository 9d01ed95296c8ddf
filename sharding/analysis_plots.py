"""The PNGs of `tokfleet analyze` (sharding/analysis.py): id usage, the transition matrix, per-channel and
per-level usage of code grids, and the distribution of per-sample likelihoods.

Drawn for speed (they were most of `analyze`'s time on the demo data): log axes without minor ticks and
with plain tick labels (matplotlib's default 10^k labels go through its mathtext parser, ~0.1 s a
figure), lines of at most USAGE_BINS points, fixed margins instead of tight_layout (a second draw), and
PNGs written with fast zlib settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sharding.analysis import Distribution
from sharding.token_counts import Counts, conditional_entropy, entropy

DENSE_HEATMAP_VOCAB = 4096  # a full transition heatmap up to this vocabulary; the most used ids beyond

HEATMAP_TOP = 64  # beyond DENSE_HEATMAP_VOCAB: the transitions among the most used ids
USAGE_BINS = 1024  # usage by id: ids grouped into at most this many bins (the plot is ~800 pixels wide)


def new_figure(rows: int = 1, columns: int = 1, figsize=None, **kwargs):
    """(figure, axes) on matplotlib's object API: no pyplot state to close, no GUI backend lookup."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns, **kwargs)


def _plain_log(ax, *axes: str) -> None:
    """Log-scale `axes` ("x", "y") of `ax` with major ticks only, labelled without mathtext."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    for name in axes:
        axis = getattr(ax, f"{name}axis")
        axis.set_minor_locator(NullLocator())
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def _steps(ax, values: np.ndarray, edges: np.ndarray, fill: bool = False, **kwargs) -> None:
    """A histogram's steps (values[i] over edges[i]..edges[i+1]): `ax.stairs` computes its data limits
    vertex by vertex in Python (~0.1 s for 2,000 bins); a line or fill_between does it in numpy."""
    heights = np.append(values, values[-1:])
    if fill:
        ax.fill_between(edges, heights, step="post", linewidth=0, **kwargs)
    else:
        ax.plot(edges, heights, drawstyle="steps-post", **kwargs)


def _save(fig, path: Path, **margins) -> Path:
    """Fixed margins, ~4 ticks an axis (each tick is a handful of artists: most of a figure's cost), a fast PNG."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    for ax in fig.axes:
        ax.set_title(ax.get_title(), y=1.0)  # a fixed place: placing it above the tick labels measures them all
        for axis in (ax.xaxis, ax.yaxis):
            locator = axis.get_major_locator()
            if isinstance(locator, MaxNLocator):
                locator.set_params(nbins=4)
            elif isinstance(locator, LogLocator):
                locator.set_params(numticks=5)
    fig.subplots_adjust(**{"left": 0.08, "right": 0.97, "bottom": 0.14, "top": 0.9, "wspace": 0.25, **margins})
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
    return path


def draw_counts(counts: Counts, out: Path) -> list[Path]:
    """The PNGs of pass 1's counts (they can be drawn while pass 2 runs)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [_usage(counts, out / "usage.png"), _transitions(counts, out / "transitions.png")]
    if counts.by_height is not None:
        paths.append(_grid_usage(counts, out / "channels.png"))
    return paths


def _usage(counts: Counts, path: Path) -> Path:
    unigram = counts.unigram
    fig, (by_rank, by_id) = new_figure(1, 2, figsize=(11, 4))
    ranked = np.sort(unigram[unigram > 0])[::-1]
    ranks = np.unique(np.geomspace(1, max(len(ranked), 1), USAGE_BINS).astype(np.int64))  # even on the log axis
    by_rank.plot(ranks, ranked[ranks - 1] / max(ranked.sum(), 1) if len(ranked) else ranks * 0.0)
    by_rank.set(xscale="log", yscale="log", xlabel="rank", ylabel="frequency",
                title=f"rank-frequency ({len(ranked)} of {len(unigram)} ids used)")
    _plain_log(by_rank, "x", "y")
    width = -(-len(unigram) // USAGE_BINS)  # ids per bin
    binned = np.pad(unigram, (0, -len(unigram) % width)).reshape(-1, width)
    edges = np.arange(len(binned) + 1) * width
    _steps(by_id, binned.max(axis=1) + 1, edges, fill=True, alpha=0.35, label="most used id of the bin")
    _steps(by_id, binned.mean(axis=1) + 1, edges, label="bin mean")
    h1, h_next = entropy(unigram), conditional_entropy(counts.transitions, len(unigram))
    by_id.set(xlabel="id" if width == 1 else f"id ({width} per bin)", ylabel="count + 1", yscale="log",
              title=f"usage by id: H1 {h1:.2f} nats, H(next|prev) {h_next:.2f}")
    _plain_log(by_id, "y")
    by_id.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


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
    return _save(fig, path, left=0.12, right=0.98)


def draw_sample_nll(distribution: Distribution, outliers: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """The distribution of per-sample likelihoods (pass 2), the most extreme samples marked."""
    edges = np.linspace(0, distribution.high, distribution.bins + 1)
    used = np.flatnonzero(distribution.histogram)
    low, high = (used[0], used[-1] + 1) if len(used) else (0, distribution.bins)
    fig, ax = new_figure(figsize=(7, 3.5))
    _steps(ax, distribution.histogram[low:high], edges[low : high + 1], fill=True)
    for name, color in (("least_likely", "tab:red"), ("most_likely", "tab:green")):
        for outlier in outliers[name][:3]:
            ax.axvline(outlier["bigram_nll"], color=color, linewidth=0.8)
    ax.set(xlabel="per-sample bigram NLL (nats/token)", ylabel="samples",
           title=f"sample likelihood under the data's bigram model\n({distribution.count} samples; red: least, green: most likely)")
    return _save(fig, path, left=0.1, bottom=0.15, top=0.85)


def _grid_usage(counts: Counts, path: Path) -> Path:
    fig, (by_channel, by_level) = new_figure(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    for ax, rows, label in ((by_channel, counts.by_height, "channel / height"), (by_level, counts.by_level, "RVQ level")):
        ax.bar(np.arange(len(rows)), [entropy(row) for row in rows], color="tab:blue")
        ax.axhline(np.log(counts.vocab_size), color="gray", linestyle="--", linewidth=0.8, label="log V")
        ax.set(xlabel=label, ylabel="unigram entropy (nats)", title=f"per {label.split(' /')[0]}: entropy")
    by_channel.legend(loc="lower right")
    return _save(fig, path, left=0.07)
