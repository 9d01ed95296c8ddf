"""What `tokfleet forecast` draws: per-channel plots of MEG/EEG forecasts, and for video a PNG strip
of context | truth | forecast frames plus the continued clip as an mp4 (PyAV)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MAX_CHANNELS = 4  # channels drawn per window
MAX_WINDOWS = 2  # windows drawn
STRIP_FRAMES = 4  # frames of each row of the video strip
BASELINE_STYLES = {"persistence": ":", "context_mean": "--", "last_period": "-."}


def write_outputs(out: Path, result: Any, windows: Any, report: dict[str, Any]) -> list[str]:
    """The plots (and video) of a forecast under `out`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    if windows.kind == "meg_windows":
        return [str(path) for path in _signal_plots(out, result, windows, report)]
    return [str(path) for path in _video_outputs(out, result, windows, report)]


def _signal_plots(out: Path, result: Any, windows: Any, report: dict[str, Any]) -> list[Path]:
    import matplotlib.pyplot as plt

    sfreq = float(windows.samples[0].get("meta", {}).get("sfreq", 1.0) or 1.0)
    context, horizon = result.context.shape[-1], result.truth.shape[-1]
    t_past = np.arange(context) / sfreq
    t_future = np.arange(context, context + horizon) / sfreq
    paths = []
    for window in range(min(MAX_WINDOWS, result.truth.shape[0])):
        names = windows.samples[window].get("meta", {}).get("ch_names") or []
        channels = list(range(min(MAX_CHANNELS, result.truth.shape[1])))
        fig, axes = plt.subplots(len(channels), 1, figsize=(9, 2.2 * len(channels)), sharex=True, squeeze=False)
        past = result.to_physical(result.context)[window]
        truth = result.to_physical(result.truth)[window]
        for ax, channel in zip(axes[:, 0], channels):
            ax.plot(t_past, past[channel], color="black", lw=1, label="context")
            ax.plot(t_future, truth[channel], color="black", lw=1.5, alpha=0.5, label="truth")
            for sample, forecast in enumerate(result.forecasts):
                ax.plot(t_future, result.to_physical(forecast)[window, channel], color="tab:red", lw=1.2,
                        alpha=1.0 if sample == 0 else 0.35, label="forecast" if sample == 0 else None)
            for name, style in BASELINE_STYLES.items():
                ax.plot(t_future, result.to_physical(result.baselines[name])[window, channel], style, lw=1, label=name)
            ax.axvline(t_past[-1], color="gray", lw=0.5)
            ax.set_ylabel(names[channel] if channel < len(names) else f"channel {channel}")
            ax.grid(alpha=0.3)
        axes[0, 0].legend(loc="upper left", fontsize=7, ncol=3)
        axes[-1, 0].set_xlabel("time (s)")
        mse = report["metrics"]["model"]["normalized"]["mse"]
        fig.suptitle(f"{report['model']} on {report['tokenizer_model']} codes: window {window}, normalised MSE {mse:.3g} "
                     f"(context mean {report['metrics']['context_mean']['normalized']['mse']:.3g})", fontsize=9)
        fig.tight_layout()
        path = out / f"forecast-window{window}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _frames(result: Any, array: np.ndarray, window: int) -> np.ndarray:
    """(B, S, N) flattened video series -> uint8 frames (N, H, W, 3) of one window."""
    C, H, W = result.series_shape
    pixels = result.to_physical(array)[window].reshape(C, H, W, -1)
    return np.moveaxis(pixels, -1, 0).transpose(0, 2, 3, 1).round().astype(np.uint8)


def _video_outputs(out: Path, result: Any, windows: Any, report: dict[str, Any]) -> list[Path]:
    import matplotlib.pyplot as plt

    past, truth, forecast = (_frames(result, array, 0) for array in (result.context, result.truth, result.forecasts[0]))
    rows = {"context": past[-STRIP_FRAMES:], "truth": truth[:STRIP_FRAMES], "forecast": forecast[:STRIP_FRAMES]}
    columns = max(len(frames) for frames in rows.values())
    fig, axes = plt.subplots(3, columns, figsize=(1.6 * columns, 1.6 * 3 + 0.4), squeeze=False)
    for row, (label, frames) in enumerate(rows.items()):
        for column in range(columns):
            ax = axes[row, column]
            ax.axis("off")
            if column < len(frames):
                ax.imshow(frames[column])
        axes[row, 0].set_title(label, fontsize=8, loc="left")
    fig.suptitle(f"{report['model']} on {report['tokenizer_model']} codes: last context frames | truth | forecast", fontsize=8)
    fig.tight_layout()
    strip = out / "forecast-strip.png"
    fig.savefig(strip, dpi=90)
    plt.close(fig)
    video = out / "forecast.mp4"
    fps = float(windows.samples[0].get("meta", {}).get("fps") or 10.0)
    write_mp4(video, np.concatenate([past, forecast]), fps)
    return [strip, video]


def write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    """uint8 frames (N, H, W, 3) -> an H.264 mp4 (odd sizes are padded by one pixel: yuv420p needs even ones)."""
    from fractions import Fraction

    import av

    height, width = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, height - frames.shape[1]), (0, width - frames.shape[2]), (0, 0)), mode="edge")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def series_plots(out: Path, series: dict[str, Any], columns: list[str], samples: list[dict[str, Any]],
                 report: dict[str, Any]) -> list[Path]:
    """One PNG per drawn window of a time-series forecast: each target column's context (when it is an
    input), truth, the model's forecast and the naive ones, in the table's units. `series`: "past"
    (B, context, C) or None, "truth", "model" and each baseline (B, horizon, C)."""
    from sharding.analysis_plots import new_figure

    horizon = series["truth"].shape[1]
    context = 0 if series["past"] is None else series["past"].shape[1]
    paths = []
    for window in range(min(MAX_WINDOWS, len(samples))):
        drawn = list(range(min(MAX_CHANNELS, len(columns))))
        fig, axes = new_figure(len(drawn), 1, figsize=(9, 2.2 * len(drawn)), sharex=True, squeeze=False)
        steps = np.arange(context, context + horizon)
        for ax, column in zip(axes[:, 0], drawn):
            if series["past"] is not None:
                ax.plot(np.arange(context), series["past"][window, :, column], color="black", lw=1, label="context")
            ax.plot(steps, series["truth"][window, :, column], color="black", lw=1.5, alpha=0.5, label="truth")
            ax.plot(steps, series["model"][window, :, column], color="tab:red", lw=1.2, label="forecast")
            for name, style in BASELINE_STYLES.items():
                if name in series:
                    ax.plot(steps, series[name][window, :, column], style, lw=1, label=name)
            ax.axvline(context - 0.5, color="gray", lw=0.5)
            ax.set_ylabel(columns[column])
            ax.grid(alpha=0.3)
        axes[0, 0].legend(loc="upper left", fontsize=7, ncol=3)
        meta = samples[window].get("meta", {})
        start = f" from {meta['start_time']}" if "start_time" in meta else f" from row {meta.get('start_row', '?')}"
        axes[-1, 0].set_xlabel(f"step of the window{start}")
        metrics = report["metrics"]
        fig.suptitle(f"{report['model']}: window {window}, normalised MSE {metrics['model']['normalized']['mse']:.3g} "
                     f"(last value {metrics['persistence']['normalized']['mse']:.3g})", fontsize=9)
        fig.tight_layout()
        path = out / f"forecast-window{window}.png"
        fig.savefig(path, dpi=90)
        paths.append(path)
    return paths
