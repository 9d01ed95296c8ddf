"""`tokfleet eval` of a continuous-signal model (BENDRForecast, NTD, MEGFactorizedAutoencoder) on raw
MEG/EEG windows: its forecast or reconstruction of each window (the model's `evaluation_pair`) scored
with modeling/brain/signal_metrics.py (MSE, correlation, PSD distance in dB), next to a naive baseline
the model names (the last context sample repeated, the noised windows the sampler starts from, zeros).
Batches are the split's first windows, shards in manifest order.
"""

from __future__ import annotations

from typing import Any

import torch

from core.errors import UserError
from modeling.brain.signal_metrics import signal_metrics
from modeling.registry import get_model_spec
from sharding.manifest import Manifest
from trainer.data import collate
from trainer.inference import load_model, resolve_checkpoint
from trainer.tokenizer_runner import same_shape_batches


def is_signal_model(name: str) -> bool:
    """Whether model `name` is scored by this module (it has an evaluation_pair)."""
    return callable(getattr(get_model_spec(name).builder, "evaluation_pair", None))


class MetricMeans:
    """Sample-weighted means of per-batch metrics."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.num_samples = 0

    def add(self, metrics: dict[str, torch.Tensor], num_samples: int) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * num_samples
        self.num_samples += num_samples

    def means(self) -> dict[str, float]:
        return {name: total / max(1, self.num_samples) for name, total in self.sums.items()}


def evaluate_signal(checkpoint: str, dataset: str, *, split: str = "val", num_batches: int = 8, batch_size: int = 8,
                    device: torch.device | str = "cpu", storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's and the baseline's metrics on the first num_batches batches of `split`: a JSON-ready report."""
    from sharding import storage
    from sharding.shards import read_shard

    directory = resolve_checkpoint(checkpoint)
    model, state, _ = load_model(directory, device)
    manifest = Manifest.read(dataset, storage_options)
    if manifest.kind != "meg_windows":
        raise UserError(f"{dataset}: a {manifest.kind!r} dataset; {state['model']['name']} reads 'meg_windows'")
    shape = manifest.fields.get("signal.npy", {}).get("shape") or [None, None]
    expected = [model.config.num_channels, model.config.signal_length]
    if list(shape) != expected:
        raise UserError(f"{dataset}: windows of shape {shape} (channels, samples); {state['model']['name']} ({directory}) reads {expected}")
    records = manifest.shards_of(split)
    if not records:
        raise UserError(f"--split: {dataset} has no {split!r} shards (splits: {sorted({s.split for s in manifest.shards})})")
    model_means, baseline_means, done = MetricMeans(), MetricMeans(), 0
    generator = torch.Generator(device=device).manual_seed(0)  # NTD's noise: the same report every time
    for record in records:
        samples = read_shard(storage.join(dataset, record.name), storage_options)
        for batch in same_shape_batches(samples, "signal", batch_size):
            signal = collate(batch)["signal"].to(device)
            pair = model.evaluation_pair(signal, generator)
            model_means.add(signal_metrics(pair.prediction, pair.target), signal.shape[0])
            baseline_means.add(signal_metrics(pair.baseline, pair.target), signal.shape[0])
            done += 1
            if done == num_batches:
                break
        if done == num_batches:
            break
    spec = state["model"]
    return {
        "checkpoint": str(directory), "model": spec["name"], "flavor": spec["flavor"], "step": int(state["step"]),
        "task": get_model_spec(spec["name"]).task, "dataset": dataset, "split": split, "num_batches": done,
        "num_samples": model_means.num_samples, "metrics": model_means.means(),
        "baseline": {"name": model.baseline_name, "metrics": baseline_means.means()},
    }


def format_signal_report(report: dict[str, Any]) -> str:
    """The report as a table: metric, the model's value, the baseline's."""
    kind = "forecast" if report["task"] == "signal_forecast" else "reconstruction"
    lines = [f"eval {report['model']} ({report['flavor']}, step {report['step']}) on {report['dataset']} [{report['split']}]: "
             f"{report['num_samples']} windows in {report['num_batches']} batches, {kind} vs baseline "
             f"({report['baseline']['name']})",
             f"  {'metric':18s} {'model':>10s} {'baseline':>10s}"]
    for name, value in report["metrics"].items():
        lines.append(f"  {name:18s} {value:10.4f} {report['baseline']['metrics'][name]:10.4f}")
    return "\n".join(lines)
