"""`tokfleet forecast`: a forecaster run + its tokenizer run + held-out raw data -> forecasts in
physical units, scored against the true continuation and against naive baselines. (A time-series
model, task series_forecast, needs no tokenizer: trainer/series_forecast.py.)

    raw windows (a split of a prepared MEG/EEG or video dataset, or a recording read with the
    dataset's own preprocessing)
    -> context: the first `context` samples (frames) of each window; truth: the next `horizon`
    -> tokenizer: context -> codes (TOTEM keeps the context's RevIN statistics)
    -> forecaster (trainer/token_tasks.py layout): generate the next ceil(horizon / step) time
       steps of codes on a KV cache (greedy, temperature, top-k; several samples)
    -> tokenizer: context + forecast codes -> signal, RevIN undone; the horizon is cut out
    -> prepare's per-channel normalisation undone (x = signal * norm_scale + norm_center): physical units
    -> MSE / MAE (normalised and physical), correlation and scale error of the model and of the
       baselines: persistence (repeat the last value), context mean, last period (repeat the
       context's last period, estimated by autocorrelation)
    -> forecast.json and plots (trainer/forecast_plots.py)

Units: MEG/EEG "normalised" is prepare's per-channel normalisation, "physical" the recording's
SI units per sensor type (T, T/m, V); video "normalised" is the tokenizer's [-1, 1], "physical"
pixel values 0-255.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from modeling.registry import get_model_spec
from sharding import storage
from sharding.manifest import Manifest
from sharding.shards import read_shard
from sharding.token_grid import TokenGrid
from trainer.inference import load_model, resolve_checkpoint
from trainer.token_tasks import layout_class
from trainer.tokenizer_runner import TokenizerRunner, describe_checkpoint

BASELINES = ("persistence", "context_mean", "last_period")


@dataclass
class ForecastRequest:
    forecaster: str
    tokenizer: str | None = None  # default: the tokenizer the forecaster's codes came from
    data: str | None = None  # raw dataset root
    recording: str | None = None  # one MEG/EEG recording, preprocessed as `data` (or the tokenizer's dataset)
    split: str = "val"
    num_windows: int = 4
    context: int | None = None  # samples (MEG/EEG) or frames (video); default: the window minus the horizon
    horizon: int | None = None  # default: a quarter of the window, in whole code steps
    num_samples: int = 1
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    out: str = "forecast"
    device: str = "cpu"


def _step_of(info: Any) -> tuple[int, int]:
    """(samples or frames per code step, the unit a context must be a multiple of) of a tokenizer."""
    config = info.model.config
    if info.name == "totem":
        return config.compression_factor, config.compression_factor
    if info.name.startswith("BrainOmni"):
        return math.prod(config.ratios), config.window_length
    return config.temporal_factor, config.temporal_factor


# ------------------------------------------------------------------ baselines and metrics


def estimate_period(context: np.ndarray, min_lag: int = 2) -> int:
    """The lag (samples) of the highest autocorrelation after its first dip below zero, averaged over
    the series of context (S, N); N // 2 when there is none."""
    centered = context - context.mean(axis=-1, keepdims=True)
    num = centered.shape[-1]
    spectrum = np.fft.rfft(centered, n=2 * num, axis=-1)
    autocorrelation = np.fft.irfft(np.abs(spectrum) ** 2, axis=-1)[..., :num].mean(axis=0)
    autocorrelation = autocorrelation / max(autocorrelation[0], 1e-30)
    below = np.flatnonzero(autocorrelation[min_lag:num // 2] < 0)
    if not len(below):
        return max(min_lag, num // 2)
    start = min_lag + int(below[0])
    return start + int(np.argmax(autocorrelation[start:num // 2 + 1])) if start < num // 2 else max(min_lag, num // 2)


def baselines(context: np.ndarray, horizon: int) -> dict[str, np.ndarray]:
    """The naive forecasts of context (..., N) over `horizon` values: (..., horizon) each."""
    flat = context.reshape(-1, context.shape[-1])
    series = []
    for row in flat:  # each series its own period
        period = estimate_period(row[None])
        last = row[-period:]
        series.append(np.resize(last, horizon) if period else np.full(horizon, row[-1]))
    shape = context.shape[:-1] + (horizon,)
    return {
        "persistence": np.broadcast_to(context[..., -1:], shape).copy(),
        "context_mean": np.broadcast_to(context.mean(axis=-1, keepdims=True), shape).copy(),
        "last_period": np.stack(series).reshape(shape),
    }


def scores(forecast: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """MSE, MAE, mean Pearson correlation and scale error over series of (S, N) arrays.

    correlation is None when a forecast series is constant (persistence, context mean);
    scale_error is |std(forecast) - std(truth)| / std(truth), averaged over series."""
    forecast, truth = forecast.astype(np.float64), truth.astype(np.float64)
    error = forecast - truth
    f_std, t_std = forecast.std(axis=-1), truth.std(axis=-1)
    valid = (f_std > 1e-12 * (np.abs(forecast).max() + 1e-30)) & (t_std > 0)
    correlation = None
    if valid.any():
        f_c = forecast - forecast.mean(axis=-1, keepdims=True)
        t_c = truth - truth.mean(axis=-1, keepdims=True)
        r = (f_c * t_c).mean(axis=-1)[valid] / (f_std[valid] * t_std[valid])
        correlation = float(r.mean())
    scale = np.abs(f_std - t_std)[t_std > 0] / t_std[t_std > 0]
    return {"mse": float((error ** 2).mean()), "mae": float(np.abs(error).mean()), "correlation": correlation,
            "scale_error": float(scale.mean()) if scale.size else None}


# ------------------------------------------------------------------ inputs


class Windows:
    """The raw windows (or clips) a forecast runs on, with what turns them into physical units."""

    def __init__(self, samples: list[dict[str, Any]], kind: str, source: str):
        if not samples:
            raise UserError(f"{source}: no windows to forecast")
        self.samples, self.kind, self.source = samples, kind, source
        field = "signal" if kind == "meg_windows" else "video"
        shapes = {s[field].shape for s in samples}
        if len(shapes) > 1:  # keep the windows shaped like the first (one channel set)
            self.samples = [s for s in samples if s[field].shape == samples[0][field].shape]
        self.length = samples[0][field].shape[-1] if kind == "meg_windows" else samples[0][field].shape[0]


def read_windows(request: ForecastRequest, info: Any) -> Windows:
    if request.recording:
        return _recording_windows(request, info)
    if not request.data:
        raise UserError("forecast needs --data (a raw dataset) or --recording (a recording file)")
    manifest = Manifest.read(request.data)
    info.check_dataset(manifest, request.data)
    records = manifest.shards_of(request.split)
    if not records or not any(r.num_samples for r in records):
        raise UserError(f"--split: {request.data} has no {request.split!r} windows (splits: "
                        f"{sorted({s.split for s in manifest.shards if s.num_samples})})")
    samples: list[dict[str, Any]] = []
    for record in records:
        samples += read_shard(storage.join(request.data, record.name))
        if len(samples) >= request.num_windows:
            break
    return Windows(samples[:request.num_windows], manifest.kind, f"{request.data} [{request.split}]")


def _recording_windows(request: ForecastRequest, info: Any) -> Windows:
    """Windows of context + horizon samples of one recording, preprocessed as the raw dataset was."""
    from core.config import MegConfig
    from core.schema import from_dict
    from sharding.prepare_signals import reader_module

    if info.input_kind != "meg_windows":
        raise UserError(f"--recording is for MEG/EEG recordings; tokenizer {info.name} reads {info.input_kind}")
    dataset = request.data or _tokenizer_dataset(info)
    manifest = Manifest.read(dataset)
    options = from_dict(MegConfig, manifest.created_by.get("config", {}).get("meg", {}))
    if not request.context or not request.horizon:
        raise UserError("--recording needs --context and --horizon (samples): the recording is cut into windows of their sum")
    length = request.context + request.horizon
    options = MegConfig(**{**options.__dict__, "window_s": length / options.sfreq, "overlap_s": 0.0})
    if not Path(request.recording).is_file():
        raise UserError(f"--recording: not found: {request.recording}")
    meg = reader_module("meg")  # imports mne: a missing one is named with its extra, not taken for an unusable file
    try:
        samples = list(meg.read_samples(request.recording, request.recording, options))
    except Exception as error:  # SkipInput and mne's reader errors: the file is not usable
        raise UserError(f"--recording {request.recording}: {str(error).splitlines()[0]}") from None
    for sample in samples:  # as a shard's samples read back: field names without their extension
        for name in list(sample):
            if name != "__key__":
                sample[name.rsplit(".", 1)[0]] = sample.pop(name)
    return Windows(samples[:request.num_windows], "meg_windows", request.recording)


def _tokenizer_dataset(info: Any) -> str:
    from trainer.checkpoint import read_trainer_state

    return read_trainer_state(info.directory)["config"]["data"]["dataset"]


# ------------------------------------------------------------------ the forecast


def _check_tokenizer(state: dict[str, Any], info: Any, path: str) -> None:
    recorded = state["token_grid"]["tokenizer"]
    if recorded.get("model") and recorded["model"] != info.name:
        raise UserError(f"--tokenizer {path} is a {info.name} run; the forecaster's codes come from a {recorded['model']} "
                        f"tokenizer ({recorded.get('checkpoint')})")
    if recorded.get("sha256") and recorded["sha256"] != info.weights_sha256:
        raise UserError(f"--tokenizer {path}: its weights (sha256 {info.weights_sha256[:12]}) are not those the forecaster's codes "
                        f"came from ({recorded['sha256'][:12]}, {recorded.get('checkpoint')})")


def forecast(request: ForecastRequest) -> dict[str, Any]:
    """Run the forecast of `request`; writes OUT/forecast.json and plots, returns the report."""
    if request.num_samples < 1 or request.num_windows < 1:
        raise UserError(f"--num-samples and --num-windows must be >= 1, got {request.num_samples}, {request.num_windows}")
    if request.temperature < 0 or (request.top_k is not None and request.top_k < 1):
        raise UserError(f"--temperature must be >= 0 and --top-k >= 1, got {request.temperature}, {request.top_k}")
    device = torch.device(request.device)
    if not Path(request.forecaster).exists():
        raise UserError(f"forecaster not found: {request.forecaster}")
    model, state, _ = load_model(request.forecaster, device)
    if get_model_spec(state["model"]["name"]).task == "series_forecast":  # real-valued windows, no tokenizer
        from trainer.series_forecast import forecast_series

        return forecast_series(request, model, state, resolve_checkpoint(request.forecaster))
    if not state.get("token_grid"):
        raise UserError(f"{request.forecaster}: model {state['model']['name']} was not trained on a token grid (MEG/EEG or "
                        "video codes): nothing to forecast with")
    grid = TokenGrid.from_json(state["token_grid"])
    tokenizer_path = request.tokenizer or state["token_grid"]["tokenizer"].get("checkpoint")
    if not tokenizer_path:
        raise UserError(f"{request.forecaster}: no tokenizer recorded; pass --tokenizer RUN")
    info = describe_checkpoint(tokenizer_path)
    _check_tokenizer(state, info, tokenizer_path)
    runner = TokenizerRunner(info, device)
    layout = layout_class(state["model"]["name"])(model)
    step, unit = _step_of(info)
    windows = read_windows(request, info)

    horizon = request.horizon or max(step, (windows.length // 4) // step * step)
    context = request.context or windows.length - horizon
    what = "samples" if windows.kind == "meg_windows" else "frames"
    if context < unit or context % unit:
        raise UserError(f"--context {context} {what}: must be a non-zero multiple of {unit} (one {info.name} "
                        f"{'window' if unit != step else 'token'})")
    if horizon < 1:
        raise UserError(f"--horizon must be >= 1 {what}, got {horizon}")
    if context + horizon > windows.length:
        raise UserError(f"--context {context} + --horizon {horizon} = {context + horizon} {what}: longer than the "
                        f"windows of {windows.source} ({windows.length} {what})")
    context_steps, horizon_steps = context // step, math.ceil(horizon / step)
    # a non-causal tokenizer's last codes of the context depend on what follows it: generate them again
    lookahead = int(getattr(runner.model, "num_lookahead_tokens", 0))
    if context_steps <= lookahead:
        raise UserError(f"--context {context} {what} = {context_steps} code steps: {info.name}'s last {lookahead} codes depend on "
                        f"samples after the context, so it needs more than {lookahead} steps ({(lookahead + 1) * step} {what})")
    if context_steps > layout.max_context_steps():
        raise UserError(f"--context {context} {what} = {context_steps} code steps: longer than the forecaster's window "
                        f"of {layout.max_context_steps()} steps ({layout.max_context_steps() * step} {what})")

    generator = torch.Generator(device=device).manual_seed(request.seed)
    sampling = dict(temperature=request.temperature, top_k=request.top_k, generator=generator)
    result = _forecast_signal(windows, runner, model, layout, grid, context, horizon, context_steps, horizon_steps, lookahead,
                              request.num_samples, sampling, device)
    report = {
        "forecaster": str(resolve_checkpoint(request.forecaster)), "model": state["model"]["name"],
        "tokenizer": str(info.directory), "tokenizer_model": info.name, "data": windows.source, "kind": windows.kind,
        "num_windows": len(windows.samples), "num_samples": request.num_samples,
        "context": {what: context, "code_steps": context_steps, "code_steps_regenerated": lookahead},
        "horizon": {what: horizon, "code_steps": horizon_steps},
        "sampling": {"temperature": request.temperature, "top_k": request.top_k, "seed": request.seed},
        **result.report,
    }
    out = Path(request.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out}: cannot create the folder: {error.strerror}") from None
    from trainer.forecast_plots import write_outputs

    report["outputs"] = write_outputs(out, result, windows, report)
    (out / "forecast.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


@dataclass
class ForecastResult:
    context: np.ndarray  # (B, S, context) normalised units (MEG: (B, C, N); video: (B, 3, H, W, frames) flattened to S)
    truth: np.ndarray  # (B, S, horizon)
    forecasts: np.ndarray  # (num_samples, B, S, horizon)
    baselines: dict[str, np.ndarray]  # name -> (B, S, horizon)
    to_physical: Any  # array (B, S, N) -> physical units
    report: dict[str, Any]
    series_shape: tuple[int, ...]  # S as (C,) or (3, H, W)


def _forecast_signal(windows: Windows, runner: TokenizerRunner, model: torch.nn.Module, layout: Any, grid: TokenGrid,
                     context: int, horizon: int, context_steps: int, horizon_steps: int, lookahead: int,
                     num_samples: int, sampling: dict[str, Any], device: torch.device) -> ForecastResult:
    from trainer.data import TASK_BATCHES, collate

    fields = collate(windows.samples)
    is_meg = windows.kind == "meg_windows"
    if is_meg:
        signal = fields["signal"]  # (B, C, T) normalised
        inputs = TASK_BATCHES[runner.task]({**fields, "signal": signal[..., :context]}, device)
        full = signal.numpy()
    else:
        video = fields["video"]  # (B, T, H, W, 3) uint8
        inputs = {"video": video[:, :context].to(device)}
        from modeling.tokenizers.vidtok import video_to_model_input

        full = video_to_model_input(video).numpy()  # (B, 3, T, H, W) in [-1, 1]
    codes, stats = runner.encode(inputs)  # (B, *axes), context steps
    if codes.shape[1 + list(grid.axes).index("time")] != context_steps:
        raise UserError(f"the tokenizer gave {codes.shape} codes for a context of {context_steps} steps")
    canonical = grid.to_canonical(codes)[:, :context_steps - lookahead]  # (B, Tc - lookahead, H, W, Q)
    batch = canonical.shape[0]
    repeated = canonical.repeat(num_samples, 1, 1, 1, 1)  # samples are batch rows: (S B, Tc - lookahead, H, W, Q)
    sequence = layout.to_sequence(repeated)
    extended = layout.forecast(model, sequence, lookahead + horizon_steps, **sampling)
    generated = layout.to_grid(extended, like=repeated)  # (S B, Tc + h, H, W, Q)
    decode_context = {**{k: v.repeat(num_samples, *([1] * (v.dim() - 1))) for k, v in {**inputs, **stats}.items()
                         if k != "video"}}
    if is_meg:
        decode_context["num_channels"] = signal.shape[1]
    decoded = runner.decode(grid.from_canonical(generated), decode_context).float().cpu().numpy()
    if is_meg:
        forecasts = decoded[..., context:context + horizon]  # (S B, C, horizon)
        truth, past = full[..., context:context + horizon], full[..., :context]
        series_shape = truth.shape[1:2]
    else:
        # decoded: (S B, 3, (Tc + h) * tf, H, W); the context is a whole number of code steps, so its
        # frames come first, unpadded
        forecasts = np.moveaxis(decoded[:, :, context:context + horizon], 2, -1)  # (S B, 3, H, W, horizon)
        truth = np.moveaxis(full[:, :, context:context + horizon], 2, -1)
        past = np.moveaxis(full[:, :, :context], 2, -1)
        series_shape = truth.shape[1:-1]
    B = batch
    forecasts = forecasts.reshape(num_samples, B, -1, horizon)
    truth = truth.reshape(B, -1, horizon)
    past = past.reshape(B, -1, context)
    naive = baselines(past, horizon)
    to_physical = _physical(windows, fields, is_meg)
    report = _report(forecasts, truth, naive, to_physical, windows, fields, is_meg)
    return ForecastResult(past, truth, forecasts, naive, to_physical, report, series_shape)


def _physical(windows: Windows, fields: dict[str, torch.Tensor], is_meg: bool):
    if is_meg:
        scale = fields["norm_scale"].numpy().astype(np.float64)[..., None]  # (B, C, 1)
        center = fields["norm_center"].numpy().astype(np.float64)[..., None]
        return lambda x: x * scale + center
    return lambda x: np.clip((x + 1.0) * 127.5, 0, 255)  # [-1, 1] -> pixel values


def _report(forecasts: np.ndarray, truth: np.ndarray, naive: dict[str, np.ndarray], to_physical: Any,
            windows: Windows, fields: dict[str, torch.Tensor], is_meg: bool) -> dict[str, Any]:
    """Metrics of the model (mean over its samples; and of their mean when there are several) and the baselines."""
    methods = {f"sample_{i}": f for i, f in enumerate(forecasts)}
    if len(forecasts) > 1:
        methods["mean_of_samples"] = forecasts.mean(axis=0)
    methods.update(naive)
    if is_meg:
        from sharding.meg import SENSOR_TYPES

        types = fields["sensor_type"].numpy()  # (B, C)
        groups = {SENSOR_TYPES[t]: types == t for t in np.unique(types)}
    else:
        groups = {"pixel": np.ones(truth.shape[:2], dtype=bool)}
    truth_physical = to_physical(truth)
    metrics: dict[str, Any] = {}
    for name, forecast in methods.items():
        normalized = scores(forecast.reshape(-1, forecast.shape[-1]), truth.reshape(-1, truth.shape[-1]))
        physical = to_physical(forecast)
        per_group = {group: scores(physical[mask], truth_physical[mask]) for group, mask in groups.items()}
        metrics[name] = {"normalized": normalized, "physical": per_group}
    samples = [metrics.pop(f"sample_{i}") for i in range(len(forecasts))]
    metrics = {"model": _mean_metrics(samples), **metrics}
    model_mse = metrics["model"]["normalized"]["mse"]
    summary = {name: {"mse": value["normalized"]["mse"], "mse_ratio_to_model": value["normalized"]["mse"] / max(model_mse, 1e-30)}
               for name, value in metrics.items() if name in BASELINES}
    return {"metrics": metrics, "baselines_vs_model": summary, "finite": bool(np.isfinite(forecasts).all()),
            "unit": {"normalized": "prepare's per-channel normalisation" if is_meg else "tokenizer input, [-1, 1]",
                     "physical": "SI units per sensor type (T, T/m, V)" if is_meg else "pixel values 0-255"}}


def _mean_metrics(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The element-wise mean of nested metric dicts (None where any is None)."""
    first = items[0]
    if isinstance(first, dict):
        return {key: _mean_metrics([item[key] for item in items]) for key in first}
    if any(item is None for item in items):
        return None
    return float(np.mean(items))
