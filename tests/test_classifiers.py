"""brain-gen's classifiers on labelled windows: labels from a per-file mapping and from mne annotations,
prepare -> train -> `tokfleet eval` (accuracy, balanced accuracy, confusion matrix), labels carried
through pretokenize to the quantized classifiers, bad labels as one-line errors, and a 2-rank
DeepSpeed ZeRO-2 run resumed with identical losses.

The recordings (sharding.synthetic_meg.write_labelled_recordings) are of two kinds: with alpha (10 Hz)
bursts and without; 8 files of 20 s, 8 magnetometers each at 100 Hz after resampling, windows of 2 s.
One shard per file, val_fraction 0.25: the val split is alpha-02 and rest-02 (10 windows each).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import cli_error, train_on
from launch.cli import main
from sharding.manifest import Manifest
from sharding.shards import read_shard

MEG = {"channel_types": ["mag"], "sfreq": 100.0, "l_freq": 1.0, "h_freq": 40.0, "window_s": 2.0, "overlap_s": 0.0}
FILE_LABELS = {"alpha-*": "alpha", "rest-*": "rest"}


def prepare_config(tmp_path: Path, name: str, paths: list[str], labels: dict, val_fraction: float = 0.25) -> Path:
    config = {"source": {"kind": "meg", "paths": paths}, "meg": MEG, "labels": labels,
              "shards": {"output": str(tmp_path / name), "name": "meg", "source_bytes_per_shard": 1, "val_fraction": val_fraction}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_config(tmp_path: Path, name: str, dataset: str, model_name: str, *, steps: int, micro: int = 16, **sections) -> Path:
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": steps, "seed": 3, "device": "cpu"},
        "model": {"name": model_name, "flavor": "debug"},
        "data": {"dataset": dataset, "num_streams": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "micro_batch_size": micro},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 0},
        "logging": {"every_steps": 5, "progress": False, "wandb": False},
        "eval": {"every_steps": 0, "num_batches": 2},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    from sharding.synthetic_meg import write_labelled_recordings

    folder = tmp_path_factory.mktemp("alpha-rest")
    write_labelled_recordings(str(folder / "files"), num_per_class=4, seconds=20.0)
    write_labelled_recordings(str(folder / "annotated"), num_per_class=2, seconds=20.0, segment_s=2.0)
    write_labelled_recordings(str(folder / "events"), num_per_class=1, seconds=12.0, segment_s=2.0, marks="events")
    return folder


@pytest.fixture(scope="module")
def labelled(ray_session, recordings, tmp_path_factory) -> str:
    """The 8 recordings labelled by file name: 60 train + 20 val windows."""
    tmp = tmp_path_factory.mktemp("labelled")
    main(["prepare", str(prepare_config(tmp, "windows", [f"{recordings}/files/*.fif"], {"files": FILE_LABELS})), "--quiet"])
    return str(tmp / "windows")


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("name, inputs", [
    ("ClassifierContinuous", {"signal": torch.randn(6, 8, 200)}),
    ("ClassifierQuantized", {"tokens": torch.randint(0, 256, (6, 8, 50))}),
    ("ClassifierQuantizedImage", {"tokens": torch.randint(0, 256, (6, 4, 4, 50))}),
])
def test_shapes_flops_and_overfit(name, inputs):
    """(B, ...) -> logits (B, num_classes); with labels a loss that 30 Adam steps drive down on one batch;
    FLOPs counted from the layers (a wider stack costs more per input element)."""
    from modeling.registry import build_model

    torch.manual_seed(0)
    model = build_model(name, "debug", {"num_classes": 3})
    assert model(**inputs).shape == (6, 3)
    label = torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(**inputs, label=label)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first
    assert model.last_report["accuracy"].value == 1.0 and model.last_report["accuracy"].weight == 6
    # gradient checkpointing recomputes the blocks: the same loss and gradients
    model.zero_grad()
    model(**inputs, label=label).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.set_gradient_checkpointing(True)
    model.zero_grad()
    model(**inputs, label=label).backward()
    for before, parameter in zip(plain, model.parameters()):
        torch.testing.assert_close(parameter.grad, before)
    wider = build_model(name, "debug", {"num_classes": 3, "d_model": 2 * model.config.d_model}, device="meta")
    assert 0 < model.num_flops_per_token() < wider.num_flops_per_token()


def test_metrics_hand_case():
    """3 classes, 10 samples: 6 right. Recalls 3/4, 2/3, 1/3 -> balanced accuracy 0.5833."""
    from trainer.classification import classification_metrics, confusion_matrix

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predictions = np.array([0, 0, 0, 1, 1, 1, 2, 0, 1, 2])
    matrix = confusion_matrix(labels, predictions, 4)  # class 3 absent: not in the balanced mean
    assert matrix[:3, :3].tolist() == [[3, 1, 0], [0, 2, 1], [1, 1, 1]] and matrix[3].sum() == matrix[:, 3].sum() == 0
    metrics = classification_metrics(matrix)
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 3) / 3)
    assert metrics["recall"][3] is None and metrics["support"] == [4, 3, 3, 0]


# ------------------------------------------------------------------ prepare -> train -> eval


def test_file_labels_train_and_eval(labelled, tmp_path, capsys):
    manifest = Manifest.read(labelled)
    assert manifest.fields["label.npy"]["classes"] == ["alpha", "rest"]
    assert manifest.stats["label_counts"] == {"train": {"alpha": 30, "rest": 30}, "val": {"alpha": 10, "rest": 10}}
    for record in manifest.shards:
        samples = read_shard(f"{labelled}/{record.name}")
        expected = 0 if Path(record.sources[0]).name.startswith("alpha") else 1
        assert {int(s["label"]) for s in samples} == {expected} and samples[0]["label"].dtype == np.int64
    capsys.readouterr()
    main(["inspect", labelled])
    inspected = capsys.readouterr().out
    assert "classes: alpha (30 train / 10 val), rest (30 train / 10 val)" in inspected and "all shards verified" in inspected

    main(["train", str(train_config(tmp_path, "cls", labelled, "ClassifierContinuous", steps=60))])
    records = [json.loads(line) for line in (tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["mfu"] > 0 and records[-1]["accuracy"] > 0.5
    assert records[-1]["val_accuracy"] >= 0.75  # the trainer's validation: the first full batch of 16 val windows
    out = tmp_path / "eval.json"
    capsys.readouterr()
    main(["eval", str(tmp_path / "cls"), "--data", labelled, "--out", str(out)])
    assert "balanced accuracy" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["classes"] == ["alpha", "rest"] and report["num_samples"] == 20
    assert sum(map(sum, report["confusion_matrix"])) == 20 and report["support"] == [10, 10]
    assert report["accuracy"] >= 0.8 and report["balanced_accuracy"] >= 0.8, report
    assert Path(report["confusion_matrix_png"]) == out.with_suffix(".png") and out.with_suffix(".png").stat().st_size > 5000


def test_annotation_labels(ray_session, recordings, tmp_path):
    """Windows aligned with 2-s segments annotated alpha / rest take their segment's class."""
    config = prepare_config(tmp_path, "annotated", [f"{recordings}/annotated/*.fif"],
                            {"annotations": {"rest": "rest", "alpha": "alpha"}, "classes": ["alpha", "rest"]})
    main(["prepare", str(config), "--quiet"])
    manifest = Manifest.read(str(tmp_path / "annotated"))
    assert manifest.fields["label.npy"]["classes"] == ["alpha", "rest"]
    num_checked = 0
    for record in manifest.shards:
        recording = int(Path(record.sources[0]).name[4:6])
        for sample in read_shard(f"{tmp_path}/annotated/{record.name}"):
            window = sample["meta"]["window"]
            assert int(sample["label"]) == (0 if (window + recording) % 2 == 1 else 1), (recording, window)
            num_checked += 1
    assert num_checked == 40
    assert manifest.stats["label_counts"] == {"train": {"alpha": 15, "rest": 15}, "val": {"alpha": 5, "rest": 5}}
    main(["train", str(train_config(tmp_path, "cls", str(tmp_path / "annotated"), "ClassifierContinuous", steps=60))])
    main(["eval", str(tmp_path / "cls"), "--data", str(tmp_path / "annotated"), "--out", str(tmp_path / "eval.json")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_samples"] == 10 and report["balanced_accuracy"] >= 0.8, report


def test_event_labels(ray_session, recordings, tmp_path, capsys):
    """Stim channel events (1: alpha, 2: rest) at each 2-s segment's start label the window holding them;
    an event id the mapping lacks is a one-line error."""
    config = prepare_config(tmp_path, "events", [f"{recordings}/events/*.fif"], {"events": {1: "alpha", 2: "rest"}},
                            val_fraction=0.5)
    main(["prepare", str(config), "--quiet"])
    manifest = Manifest.read(str(tmp_path / "events"))
    assert manifest.stats["label_counts"] == {"train": {"alpha": 3, "rest": 3}, "val": {"alpha": 3, "rest": 3}}
    for record in manifest.shards:
        recording = int(Path(record.sources[0]).name[4:6])
        labels = [int(s["label"]) for s in read_shard(f"{tmp_path}/events/{record.name}")]
        assert labels == [0 if (window + recording) % 2 == 1 else 1 for window in range(6)]
    unmapped = prepare_config(tmp_path, "unmapped", [f"{recordings}/events/*.fif"], {"events": {1: "alpha"}})
    assert "has event id '2', which is not in the mapping ['1']" in cli_error(capsys, ["prepare", str(unmapped), "--quiet"])
    no_stim = prepare_config(tmp_path, "nostim", [f"{recordings}/annotated/rec-00_raw.fif"], {"events": {1: "alpha"}})
    assert "labels.events: " in cli_error(capsys, ["prepare", str(no_stim), "--quiet"])


# ------------------------------------------------------------------ bad labels


def test_bad_labels_are_one_line_errors(labelled, recordings, tmp_path, capsys):
    files = [f"{recordings}/files/*.fif"]
    cases = [
        (prepare_config(tmp_path, "unmapped", files, {"files": {"alpha-*": "alpha"}}), "has no label: no pattern of ['alpha-*'] matches it"),
        (prepare_config(tmp_path, "missing", files, {"files": {**FILE_LABELS, "gamma-00_raw.fif": "gamma"}}),
         "'gamma-00_raw.fif' matches none of the 8 input files"),
        (prepare_config(tmp_path, "annotation", [f"{recordings}/annotated/*.fif"], {"annotations": {"alpha": "alpha"}}),
         "has annotation 'rest', which is not in the mapping ['alpha']"),
    ]
    config = prepare_config(tmp_path, "video", files, {"files": FILE_LABELS})
    config.write_text(config.read_text().replace("kind: meg", "kind: video"))
    assert "labels: class labels are read for source.kind meg, not video" in cli_error(capsys, ["prepare", str(config)])
    for config, message in cases:
        assert message in cli_error(capsys, ["prepare", str(config), "--quiet"])
        assert not (tmp_path / config.stem).exists()  # checked before anything is written
    unlabelled = prepare_config(tmp_path, "unlabelled", [f"{recordings}/files/alpha-00_raw.fif", f"{recordings}/files/rest-00_raw.fif"],
                                {}, val_fraction=0.5)
    main(["prepare", str(unlabelled), "--quiet"])
    error = cli_error(capsys, ["train", str(train_config(tmp_path, "nolabels", str(tmp_path / "unlabelled"), "ClassifierContinuous", steps=1))])
    assert "has no class labels" in error
    error = cli_error(capsys, ["train", str(train_config(tmp_path, "tokens", labelled, "ClassifierQuantized", steps=1))])
    assert "make its codes with `tokfleet pretokenize`" in error
    error = cli_error(capsys, ["train", str(train_config(tmp_path, "classes", labelled, "ClassifierContinuous", steps=1,
                                                         model={"args": {"num_classes": 3}}))])
    assert "model.args.num_classes=3 does not fit the dataset's classes: it must be 2" in error


def test_class_missing_from_val_is_named(ray_session, recordings, tmp_path, caplog):
    """6 files, one val shard (alpha-03): the val split has no 'rest' window."""
    files = [f"{recordings}/files/alpha-*.fif", f"{recordings}/files/rest-00_raw.fif", f"{recordings}/files/rest-01_raw.fif"]
    with caplog.at_level(logging.WARNING, logger="sharding.labels"):
        main(["prepare", str(prepare_config(tmp_path, "missing-val", files, {"files": FILE_LABELS}, val_fraction=0.17)), "--quiet"])
    assert "labels: the val split has no windows of class 'rest' (10 windows of the others)" in caplog.text
    assert Manifest.read(str(tmp_path / "missing-val")).stats["label_counts"]["val"] == {"alpha": 10, "rest": 0}


# ------------------------------------------------------------------ labels through pretokenize


def test_quantized_classifiers_on_pretokenized_labels(labelled, tmp_path):
    """A TOTEM tokenizer's codes of the labelled windows keep every window's label; both quantized
    classifiers train on them (channels: (B, 8, 50) codes; image: a (8 x 1) grid of 50 codes)."""
    train_on(labelled, tmp_path, "totem", {}, micro=8, steps=2)
    config = {"input": {"dataset": labelled}, "tokenizer": {"checkpoint": str(tmp_path / "totem"), "device": "cpu"},
              "shards": {"output": str(tmp_path / "tokens"), "name": "tok"}}
    (tmp_path / "pretokenize.yaml").write_text(yaml.safe_dump(config))
    main(["pretokenize", str(tmp_path / "pretokenize.yaml"), "--quiet"])
    tokens, raw = Manifest.read(str(tmp_path / "tokens")), Manifest.read(labelled)
    assert tokens.fields["label.npy"]["classes"] == ["alpha", "rest"] and tokens.stats["label_counts"] == raw.stats["label_counts"]
    raw_labels = {s["__key__"]: int(s["label"]) for r in raw.shards for s in read_shard(f"{labelled}/{r.name}")}
    token_labels = {s["__key__"]: int(s["label"]) for r in tokens.shards for s in read_shard(f"{tmp_path}/tokens/{r.name}")}
    assert token_labels == raw_labels
    for model in ("ClassifierQuantized", "ClassifierQuantizedImage"):
        main(["train", str(train_config(tmp_path, model, str(tmp_path / "tokens"), model, steps=6, logging={"every_steps": 3}))])
        state = json.loads(next((tmp_path / model / "checkpoints").glob("step-*/trainer_state.json")).read_text())
        args = state["model"]["args"]
        assert args["num_classes"] == 2 and args["sequence_len"] == tokens.fields["tokens.npy"]["shape"][1]
        assert args.get("num_channels", args.get("height")) == 8
        main(["eval", str(tmp_path / model), "--data", str(tmp_path / "tokens"), "--out", str(tmp_path / f"{model}.json")])
        report = json.loads((tmp_path / f"{model}.json").read_text())
        assert report["num_samples"] == 20 and report["model"] == model


# ------------------------------------------------------------------ distributed


def test_zero2_two_ranks_resume_identical(labelled, tmp_path):
    """ClassifierContinuous, 2 ranks under the deepspeed launcher (ZeRO-2): the run's step-3 checkpoint
    resumed (a copy of the run without its later checkpoint) gives the uninterrupted run's losses."""
    from test_distributed import losses, run

    def config(name: str) -> Path:
        return train_config(tmp_path, name, labelled, "ClassifierContinuous", steps=6, micro=4,
                            engine={"kind": "deepspeed", "zero_stage": 2, "peak_flops": 1e11},
                            checkpoint={"every_steps": 3, "keep_last": 3}, logging={"every_steps": 1})

    run("deepspeed", 2, config("two"))
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000006")
    result = run("deepspeed", 2, config("resumed"), "--resume", "auto")
    assert "step-00000003" in result.stdout + result.stderr
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["engine"] == "deepspeed" and state["model"]["args"]["num_classes"] == 2
    assert sorted(losses(tmp_path / "two")) == list(range(1, 7))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "two")
