"""Classifiers (task "classification") on labelled windows: their inputs from a dataset, and their evaluation.

A labelled dataset (`tokfleet prepare` with a `labels` section; `tokfleet pretokenize` of it carries the
labels through) stores a class index `label` (int64) per sample and names the classes in its manifest.
Each classifier reads one kind of dataset:

    model                      dataset                        batch
    ClassifierContinuous       raw MEG/EEG windows            signal (B, C, T) float, label (B,)
    ClassifierQuantized        token windows (pretokenize)    tokens (B, C, T): each channel (grid site) a series
    ClassifierQuantizedImage   token windows (pretokenize)    tokens (B, H, W, T): the code grid, time last

model.args take num_classes, the input sizes and the vocabulary from the dataset; values the user
gives are checked against it. `evaluate_classifier` (`tokfleet eval` of a classifier run) scores a
split: accuracy, balanced accuracy (the mean of the per-class recalls of the classes present) and
the confusion matrix (rows: true class, columns: predicted), as JSON and a PNG.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from modeling.registry import model_config
from sharding.labels import LABEL_FIELD
from sharding.manifest import Manifest
from sharding.token_grid import TokenGrid

INPUTS = {"ClassifierContinuous": "signal", "ClassifierQuantized": "channels", "ClassifierQuantizedImage": "image"}


def dataset_classes(manifest: Manifest, url: str) -> list[str]:
    """The class names of a labelled dataset, in index order; UserError when it has no labels."""
    classes = manifest.fields.get(LABEL_FIELD, {}).get("classes")
    if not classes:
        raise UserError(f"data.dataset {url} has no class labels: a classifier trains on windows labelled by `tokfleet "
                        "prepare` (a labels section: labels.files or labels.annotations)")
    return list(classes)


def _fixed(args: dict[str, Any], key: str, value: int, what: str) -> None:
    args.setdefault(key, value)
    if args[key] != value:
        raise UserError(f"model.args.{key}={args[key]} does not fit the dataset's {what}: it must be {value}")


def _token_grid(name: str, manifest: Manifest, url: str) -> TokenGrid:
    grid = TokenGrid.from_manifest(manifest, url)
    if grid is None:
        raise UserError(f"model {name} reads token windows: data.dataset {url} holds {manifest.kind}; make its codes with "
                        "`tokfleet pretokenize` (or train ClassifierContinuous on the raw windows)")
    T, H, W, Q = grid.canonical_shape
    if Q != 1:
        raise UserError(f"model {name} reads one code per position; the dataset's codes {grid.describe()} hold {Q} RVQ levels")
    if None in (T, H, W):
        raise UserError(f"model {name} needs one grid shape, but the dataset's codes {grid.describe()} vary between samples")
    return grid


def resolve_classifier_args(name: str, flavor: str, args: dict[str, Any], manifest: Manifest, url: str) -> dict[str, Any]:
    """model.args completed from the dataset (classes, input sizes, vocabulary), what the user gave checked."""
    if name not in INPUTS:
        raise UserError(f"model {name} has task classification but no classification input")
    args = dict(args)
    _fixed(args, "num_classes", len(dataset_classes(manifest, url)), "classes")
    if INPUTS[name] == "signal":
        if manifest.kind != "meg_windows":
            raise UserError(f"model {name} reads raw MEG/EEG windows: data.dataset {url} holds {manifest.kind} "
                            "(ClassifierQuantized / ClassifierQuantizedImage read token windows)")
        num_channels, num_times = manifest.fields["signal.npy"]["shape"]
        if num_channels is None:
            raise UserError(f"model {name} needs one channel set, but the windows of {url} have different channel counts "
                            "(prepare with one channel set, e.g. meg.channel_types)")
        _fixed(args, "num_channels", num_channels, "channels")
        args.setdefault("sequence_len", num_times)
    else:
        grid = _token_grid(name, manifest, url)
        T, H, W, _ = grid.canonical_shape
        if INPUTS[name] == "channels":
            _fixed(args, "num_channels", H * W, f"channels (codes {grid.describe()})")
        else:
            _fixed(args, "height", H, f"grid height (codes {grid.describe()})")
            _fixed(args, "width", W, f"grid width (codes {grid.describe()})")
        args.setdefault("vocab_size", grid.vocab_size)
        if args["vocab_size"] < grid.vocab_size:
            raise UserError(f"model.args.vocab_size={args['vocab_size']} cannot hold the dataset's vocabulary {grid.vocab_size}")
        args.setdefault("sequence_len", T)
    try:
        return asdict(model_config(name, flavor, args))
    except ValueError as error:
        raise UserError(f"model: {error}") from None


class ClassificationTask:
    """Batches of a labelled dataset for a classifier: shard fields -> {input, "label"}."""

    def __init__(self, name: str, manifest: Manifest, url: str):
        self.input = INPUTS[name]
        self.grid = None if self.input == "signal" else _token_grid(name, manifest, url)
        self.input_name = "signal" if self.input == "signal" else "tokens"

    def inputs(self, fields: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        if self.grid is None:
            return fields["signal"].to(device, non_blocking=True)  # (B, C, T)
        grid = self.grid.to_canonical(fields["tokens"].to(device, non_blocking=True))[..., 0]  # (B, T, H, W)
        if self.input == "image":
            return grid.permute(0, 2, 3, 1)  # (B, H, W, T)
        return grid.flatten(2).transpose(1, 2)  # (B, H W, T)

    def __call__(self, fields: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        if "label" not in fields:
            raise UserError("a sample without a label in a labelled dataset: rebuild it with `tokfleet prepare`")
        return {self.input_name: self.inputs(fields, device), "label": fields["label"].to(device, non_blocking=True)}

    def num_positions(self, batch: dict[str, torch.Tensor]) -> int:
        """Input elements of a micro-batch (the unit of the classifiers' num_flops_per_token)."""
        return batch[self.input_name].numel()


# ------------------------------------------------------------------ metrics


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def classification_metrics(matrix: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and per-class recall of a confusion matrix."""
    support = matrix.sum(axis=1)
    total = int(support.sum())
    recall = np.divide(np.diag(matrix), support, out=np.zeros(len(matrix)), where=support > 0)
    present = support > 0
    return {"num_samples": total,
            "accuracy": float(np.trace(matrix) / total) if total else 0.0,
            "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
            "recall": [float(r) if s else None for r, s in zip(recall, present)],
            "support": support.tolist()}


def draw_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    from sharding.analysis_plots import new_figure

    size = 2.5 + 0.6 * len(classes)
    fig, ax = new_figure(figsize=(size + 1, size))
    shown = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(shown, ax=ax)
    ticks = np.arange(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes, xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=10)
    for (row, column), count in np.ndenumerate(matrix):
        ax.text(column, row, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


@torch.inference_mode()
def evaluate_classifier(checkpoint: str, dataset: str, *, split: str = "val", num_batches: int = 8, batch_size: int = 8,
                        device: torch.device | str = "cpu", storage_options: dict[str, Any] | None = None,
                        plot: str | Path | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy and confusion matrix of the classifier at `checkpoint` on the first
    num_batches batches of `split` (shards in manifest order): a JSON-ready report. The confusion matrix
    is drawn to `plot` (default: the run's plots/confusion_matrix.png)."""
    from core.config import DataConfig
    from core.schema import from_dict
    from trainer.causal_eval import _samples
    from trainer.checkpoint import read_trainer_state
    from trainer.data import collate
    from trainer.inference import load_model, resolve_checkpoint
    from trainer.tokenizer_runner import same_shape_batches

    directory = resolve_checkpoint(checkpoint)
    state = read_trainer_state(directory)
    name = state["model"]["name"]
    trained_data = from_dict(DataConfig, state["config"]["data"])
    if storage_options is None and dataset == trained_data.dataset:
        storage_options = trained_data.storage_options
    manifest = Manifest.read(dataset, storage_options)
    if not manifest.shards_of(split):
        raise UserError(f"--split: {dataset} has no {split!r} shards (splits: {sorted({s.split for s in manifest.shards})})")
    classes = dataset_classes(manifest, dataset)
    num_classes = int(state["model"]["args"]["num_classes"])
    if len(classes) != num_classes:
        raise UserError(f"{dataset} has {len(classes)} classes {classes}; the model at {directory} predicts {num_classes}")
    task = ClassificationTask(name, manifest, dataset)
    device = torch.device(device)
    model, state, _ = load_model(directory, device)
    model.float()
    field = "signal" if task.grid is None else "tokens"
    labels, predictions = [], []
    samples = _samples(manifest, dataset, split, storage_options)
    for batch in itertools.islice(same_shape_batches(samples, field, batch_size), num_batches):
        inputs = task(collate(batch), device)
        label = inputs.pop("label")
        predictions.append(model(**inputs).argmax(dim=-1).cpu())
        labels.append(label.cpu())
    if not labels:
        raise UserError(f"{dataset}: split {split!r} has no samples")
    label_array, prediction_array = torch.cat(labels).numpy(), torch.cat(predictions).numpy()
    matrix = confusion_matrix(label_array, prediction_array, num_classes)
    metrics = classification_metrics(matrix)
    plot = Path(plot) if plot else directory.parent.parent / "plots" / "confusion_matrix.png"
    title = f"{name}, step {state['step']}\naccuracy {metrics['accuracy']:.3f}, balanced {metrics['balanced_accuracy']:.3f}"
    draw_confusion_matrix(matrix, classes, plot, title)
    return {"checkpoint": str(directory), "model": name, "flavor": state["model"]["flavor"], "step": int(state["step"]),
            "task": "classification", "dataset": dataset, "split": split,
            "is_training_dataset": manifest.fingerprint()[:16] == state["data"]["manifest_id"],
            "classes": classes, **metrics, "confusion_matrix": matrix.tolist(), "confusion_matrix_png": str(plot)}


def format_classification_report(report: dict[str, Any]) -> str:
    classes = report["classes"]
    width = max(8, *(len(name) for name in classes))
    lines = [f"eval {report['model']} ({report['flavor']}, step {report['step']}) on {report['dataset']} [{report['split']}]: "
             f"{report['num_samples']} samples, accuracy {report['accuracy']:.4f}, balanced accuracy {report['balanced_accuracy']:.4f}",
             f"  confusion matrix (rows: true, columns: predicted), {report['confusion_matrix_png']}",
             "  " + " " * width + " " + " ".join(f"{name:>{width}s}" for name in classes) + f" {'recall':>8s}"]
    for name, row, recall in zip(classes, report["confusion_matrix"], report["recall"]):
        shown = "-" if recall is None else f"{recall:.4f}"
        lines.append(f"  {name:{width}s} " + " ".join(f"{count:{width}d}" for count in row) + f" {shown:>8s}")
    return "\n".join(lines)
