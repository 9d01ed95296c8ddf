"""The time-series forecasting task (a model of task "series_forecast" on `tokfleet prepare`'s
source.kind timeseries windows, sharding/timeseries.py): the model's window sizes from the dataset,
and `tokfleet forecast` of held-out windows.

    held-out windows of --data (default: the dataset the model trained on), split --split
    -> model.predict(context (B, context_length, input_size), horizon) -> (B, horizon, output_size)
    -> scored against the true next rows and the naive forecasts: persistence (the target columns'
       last context value), and when every target column is an input, the context mean and the
       context's last period (trainer/forecast.py baselines)
    -> MSE / MAE in normalised units (prepare's per-column normalisation) and per column in the
       table's own units -> forecast.json and plots (trainer/forecast_plots.py)

A model of this task has `forward(context, target) -> loss` and `predict(context, pred_length)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from sharding import storage
from sharding.manifest import Manifest
from sharding.shards import read_shard

TASK = "series_forecast"
SERIES_KIND = "timeseries_windows"  # sharding.timeseries.MANIFEST_KIND (not imported: it loads pandas' readers' module)
# model config field -> (manifest field, axis of its shape) it must equal
WINDOW_SIZES = {"context_length": ("context.npy", 0), "input_size": ("context.npy", 1),
                "pred_length": ("target.npy", 0), "output_size": ("target.npy", 1)}
PREDICT_BATCH = 256  # windows per predict call


def window_sizes(manifest: Manifest) -> dict[str, int]:
    """{context_length, input_size, pred_length, output_size} of a time-series dataset's windows."""
    return {name: int(manifest.fields[field]["shape"][axis]) for name, (field, axis) in WINDOW_SIZES.items()}


def series_model_args(model_name: str, task: str, config_fields: set[str], args: dict[str, Any], manifest: Manifest,
                      dataset: str) -> dict[str, Any]:
    """`args` with the window sizes of a time-series dataset filled in; a UserError when the model and the
    data do not go together, or when model.args sets a size the windows do not have."""
    is_series = manifest.kind == SERIES_KIND
    if task == TASK and not is_series:
        raise UserError(f"model {model_name} forecasts time-series windows (task {TASK}): data.dataset {dataset} holds "
                        f"{manifest.kind}; prepare one with source.kind timeseries")
    if is_series and task != TASK:
        raise UserError(f"data.dataset {dataset} holds time-series windows: train a {TASK} model on it (e.g. "
                        f"TransformerForecaster), not {model_name} (task {task})")
    if not is_series:
        return args
    args = dict(args)
    for name, value in window_sizes(manifest).items():
        if name not in config_fields:
            continue
        given = args.setdefault(name, value)
        if str(given) != str(value):
            field, axis = WINDOW_SIZES[name]
            raise UserError(f"model.args.{name}={given} does not match the windows of data.dataset {dataset} ({name} {value}, "
                            f"{field} shape {manifest.fields[field]['shape']}): leave it out, it comes from the data")
    return args


# ------------------------------------------------------------------ tokfleet forecast


def read_windows(data: str, split: str, num_windows: int) -> tuple[Manifest, list[dict[str, Any]]]:
    """The first `num_windows` windows of `split` of the time-series dataset `data`, in shard order."""
    manifest = Manifest.read(data)
    if manifest.kind != SERIES_KIND:
        raise UserError(f"--data {data} holds {manifest.kind}, not time-series windows (source.kind timeseries)")
    records = [record for record in manifest.shards_of(split) if record.num_samples]
    if not records:
        raise UserError(f"--split: {data} has no {split!r} windows (splits: {sorted({s.split for s in manifest.shards if s.num_samples})})")
    samples: list[dict[str, Any]] = []
    for record in records:
        samples += read_shard(storage.join(data, record.name))
        if len(samples) >= num_windows:
            break
    return manifest, samples[:num_windows]


def _check_request(request: Any, state: dict[str, Any]) -> None:
    name = state["model"]["name"]
    for option, value in (("--tokenizer", request.tokenizer), ("--recording", request.recording)):
        if value:
            raise UserError(f"{option}: {name} forecasts time-series windows of --data; it takes no {option}")
    if request.num_samples != 1 or request.temperature or request.top_k:
        raise UserError(f"--num-samples/--temperature/--top-k: {name} forecasts one value per step (nothing to sample)")


def _check_same_series(manifest: Manifest, data: str, trained_on: str) -> None:
    """A UserError when --data holds other columns, or normalises them otherwise, than the dataset the model
    trained on (when that one is still there to compare with)."""
    from sharding.manifest import manifest_url

    if not storage.exists(manifest_url(trained_on)):
        return
    trained = Manifest.read(trained_on)
    for field, what in (("context.npy", "input"), ("target.npy", "target")):
        now, then = manifest.fields[field].get("columns"), trained.fields[field].get("columns")
        if now != then:
            raise UserError(f"--data {data}: {what} columns {now}, but the model trained on {then} ({trained_on})")
    now, then = manifest.stats["normalization"], trained.stats["normalization"]
    if now != then:
        raise UserError(f"--data {data}: normalised with other statistics ({now['method']}) than the windows the model "
                        f"trained on ({then['method']}, {trained_on})")


@torch.no_grad()
def predict(model: torch.nn.Module, context: np.ndarray, horizon: int, device: torch.device) -> np.ndarray:
    """(B, horizon, output_size) float64 forecasts of contexts (B, context_length, input_size)."""
    forecasts = []
    for start in range(0, len(context), PREDICT_BATCH):
        batch = torch.from_numpy(context[start:start + PREDICT_BATCH]).to(device)
        forecasts.append(model.predict(batch, horizon).float().cpu().numpy())
    return np.concatenate(forecasts).astype(np.float64)


def forecast_series(request: Any, model: torch.nn.Module, state: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """`tokfleet forecast` of a series_forecast model (trainer.forecast.ForecastRequest `request`): writes
    OUT/forecast.json and plots, returns the report."""
    from trainer.forecast import baselines, scores

    _check_request(request, state)
    trained_on = state["config"]["data"]["dataset"]
    data = request.data or trained_on
    manifest, samples = read_windows(data, request.split, request.num_windows)
    if data != trained_on:
        _check_same_series(manifest, data, trained_on)
    sizes, args = window_sizes(manifest), state["model"]["args"]
    differ = [f"{name} {sizes[name]} (model: {args[name]})" for name in WINDOW_SIZES if name in args and args[name] != sizes[name]]
    if differ:
        raise UserError(f"--data {data}: its windows do not fit {state['model']['name']}: {', '.join(differ)}")
    context_length, pred_length = sizes["context_length"], sizes["pred_length"]
    if request.context not in (None, context_length):
        raise UserError(f"--context {request.context}: {state['model']['name']} reads contexts of {context_length} steps")
    horizon = request.horizon or pred_length
    if horizon > pred_length:
        raise UserError(f"--horizon {horizon}: the windows of {data} hold the true values of {pred_length} steps after the context")

    context = np.stack([s["context"] for s in samples])  # (B, context_length, input_size), normalised
    truth = np.stack([s["target"] for s in samples])[:, :horizon].astype(np.float64)  # (B, horizon, output_size)
    last = np.stack([s["last_value"] for s in samples]).astype(np.float64)  # (B, output_size)
    forecast = predict(model, context, horizon, torch.device(request.device))
    if forecast.shape != truth.shape:
        raise UserError(f"{state['model']['name']}.predict gave shape {list(forecast.shape)}, expected {list(truth.shape)}")

    inputs, targets = manifest.fields["context.npy"]["columns"], manifest.fields["target.npy"]["columns"]
    naive = {"persistence": np.repeat(last[:, None, :], horizon, axis=1)}
    past = None
    if all(column in inputs for column in targets):  # the target columns' own past: the other baselines
        past = context[..., [inputs.index(column) for column in targets]].astype(np.float64)  # (B, context_length, output_size)
        naive.update({name: np.moveaxis(value, -1, 1) for name, value in baselines(np.moveaxis(past, 1, -1), horizon).items()
                      if name != "persistence"})
    norm = manifest.stats["normalization"]["columns"]
    center = np.array([norm[c]["center"] for c in targets])
    scale = np.array([norm[c]["scale"] for c in targets])

    def table_units(x: np.ndarray) -> np.ndarray:  # (..., output_size) normalised -> the table's units
        return x * scale + center

    def metrics(values: np.ndarray) -> dict[str, Any]:
        as_series = lambda x: np.moveaxis(x, -1, 1).reshape(-1, horizon)  # (B * output_size, horizon)
        per_column = {c: scores(table_units(values)[..., i], table_units(truth)[..., i]) for i, c in enumerate(targets)}
        return {"normalized": scores(as_series(values), as_series(truth)), "physical": per_column}

    methods = {"model": forecast, **naive}
    report_metrics = {name: metrics(values) for name, values in methods.items()}
    model_mse = report_metrics["model"]["normalized"]["mse"]
    report = {
        "forecaster": str(checkpoint), "model": state["model"]["name"], "data": f"{data} [{request.split}]", "kind": SERIES_KIND,
        "num_windows": len(samples), "context": {"steps": context_length}, "horizon": {"steps": horizon},
        "columns": {"input": inputs, "target": targets},
        "metrics": report_metrics,
        "baselines_vs_model": {name: {"mse": report_metrics[name]["normalized"]["mse"],
                                      "mse_ratio_to_model": report_metrics[name]["normalized"]["mse"] / max(model_mse, 1e-30)}
                               for name in naive},
        "finite": bool(np.isfinite(forecast).all()),
        "unit": {"normalized": f"prepare's per-column normalisation ({manifest.stats['normalization']['method']})",
                 "physical": "the table's own units, per target column"},
    }
    out = Path(request.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out}: cannot create the folder: {error.strerror}") from None
    from trainer.forecast_plots import series_plots

    series = {"past": None if past is None else table_units(past), "truth": table_units(truth),
              "model": table_units(forecast), **{name: table_units(value) for name, value in naive.items()}}
    report["outputs"] = [str(path) for path in series_plots(out, series, targets, samples, report)]
    (out / "forecast.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
