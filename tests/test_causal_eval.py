"""`tokfleet eval` of causal sequence models (trainer/causal_eval.py): next-token loss, perplexity,
accuracy and top-5 accuracy, overall and per RVQ level, next to the unigram baseline, checked against
hand counts on tiny models trained 1-2 steps by the real Trainer (packed tokens and token grids).

The hand counts lay the codes out themselves (FlatGPTEmbedsRVQ: the (t, c, q) grid flattened, the
target at sequence index j + 1 of level (j + 1) % Q), so they check the layouts eval reuses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cli_error, relabel_checkpoint, write_grid_dataset as conftest_grid_dataset, write_token_dataset

BRAINTOKMIX = "BrainOmniCausalTokenizerSEANetChannelMix"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on two busy cores run slower with two threads
    yield
    torch.set_num_threads(previous)


def train(run_dir: Path, dataset: str, name: str, args: dict | None = None, steps: int = 2) -> str:
    """A real run of `steps` optimizer steps (batch 4) ending in a checkpoint; its run dir."""
    from core.config import (CheckpointConfig, DataConfig, EngineConfig, EvalConfig, LoggingConfig, ModelConfig,
                               OptimConfig, RunConfig, TrainConfig)
    from trainer.loop import Trainer

    cfg = TrainConfig(
        data=DataConfig(dataset=dataset, num_streams=2, val_split=""),
        run=RunConfig(name=run_dir.name, output_dir=str(run_dir), max_steps=steps, seed=0, device="cpu"),
        model=ModelConfig(name=name, flavor="debug", args=args or {}),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, micro_batch_size=4, schedule="constant"),
        engine=EngineConfig(peak_flops=1e12), checkpoint=CheckpointConfig(every_steps=0),
        logging=LoggingConfig(every_steps=1, progress=False, wandb=False), eval=EvalConfig(every_steps=0, num_batches=1),
    )
    assert Trainer(cfg).train()["finished"]
    return str(run_dir)


def write_grid_dataset(root: Path, *, num_channels: int, num_steps: int, num_levels: int, vocab_size: int,
                       tokenizer: dict, num_train: int = 8, num_val: int = 6, seed: int = 0) -> str:
    """A meg_tokens dataset of (channel, time, level) codes written by hand (conftest.write_grid_dataset)."""
    return conftest_grid_dataset(root, axes=("channel", "time", "level"), shape=(num_channels, num_steps, num_levels),
                                 vocab_size=vocab_size, tokenizer=tokenizer, num_train=num_train, num_val=num_val, seed=seed)


def val_tokens(dataset: str) -> torch.Tensor:
    """Every val sample's tokens, in manifest order, stacked (int64)."""
    from sharding.manifest import Manifest
    from sharding.shards import read_shard

    manifest = Manifest.read(dataset)
    samples = [s for record in manifest.shards_of("val") for s in read_shard(f"{dataset}/{record.name}")]
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


def hand_count(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """logits (N, V), targets (N,): the counts and mean loss, by hand."""
    logits = logits.double()
    top5 = logits.topk(5, dim=-1).indices
    return {"num_targets": targets.numel(), "correct": int((logits.argmax(-1) == targets).sum()),
            "top5": int((top5 == targets[:, None]).any(-1).sum()), "loss": float(F.cross_entropy(logits, targets))}


def unigram_by_hand(targets: np.ndarray) -> dict:
    counts = np.bincount(targets)
    p = counts[counts > 0] / targets.size
    shares = np.sort(counts)[::-1] / targets.size
    return {"loss": float(-(p * np.log(p)).sum()), "accuracy": float(shares[0]), "top5_accuracy": float(shares[:5].sum())}


def assert_matches(metrics: dict, counts: dict) -> None:
    n = counts["num_targets"]
    assert metrics["num_targets"] == n
    assert metrics["accuracy"] == counts["correct"] / n and metrics["top5_accuracy"] == counts["top5"] / n
    assert metrics["loss"] == pytest.approx(counts["loss"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(counts["loss"]), rel=1e-5)


def assert_unigram(metrics: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert metrics["perplexity"] == pytest.approx(math.exp(expected["loss"]), rel=1e-9)


def test_statistics_skip_ignored_targets_and_do_not_depend_on_chunking(monkeypatch):
    import trainer.causal_eval as causal_eval

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 2, 10, generator=generator)  # (B, S, Q, V)
    targets = torch.randint(0, 10, (4, 9, 2), generator=generator)
    targets[0, :3] = -1  # ignored
    levels = torch.arange(2).expand(4, 9, 2)
    reports = []
    for rows_budget in (1 << 24, 3 * 10):  # one chunk; chunks of 3 rows
        monkeypatch.setattr(causal_eval, "ROWS_BUDGET", rows_budget)
        statistics = causal_eval.NextTokenStatistics(num_levels=2, vocab_size=10)
        statistics.add(logits, targets, levels)
        reports.append(statistics.report())
    kept = targets >= 0
    for report in reports:
        assert_matches(report["metrics"]["model"], hand_count(logits[kept], targets[kept]))
        for q in range(2):
            is_level = kept & (levels == q)
            assert_matches(report["levels"][q]["model"], hand_count(logits[is_level], targets[is_level]))
            assert_unigram(report["levels"][q]["unigram"], unigram_by_hand(targets[is_level].numpy()))


# ------------------------------------------------------------------ fixtures: tiny runs


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A gpt trained 2 steps on packed tokens (vocab 64, 16 inputs per sample; 6 val samples)."""
    root = tmp_path_factory.mktemp("causal-eval")
    dataset = write_token_dataset(root / "tokens", num_shards=2, samples_per_shard=8, val_samples=6, seq_len=16, vocab_size=64)
    return train(root / "gpt", dataset, "gpt"), dataset


@pytest.fixture(scope="module")
def grid_dataset(tmp_path_factory):
    """(2 channels, 6 steps, 3 levels) codes of vocabulary 24."""
    tokenizer = {"kind": "model", "model": BRAINTOKMIX, "flavor": "small", "args": {}, "checkpoint": None, "sha256": None}
    return write_grid_dataset(tmp_path_factory.mktemp("grid") / "codes", num_channels=2, num_steps=6, num_levels=3,
                              vocab_size=24, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def flat_rvq_run(grid_dataset, tmp_path_factory):
    return train(tmp_path_factory.mktemp("runs") / "flat-rvq", grid_dataset, "FlatGPTEmbedsRVQ")


# ------------------------------------------------------------------ packed tokens


def test_gpt_metrics_equal_a_hand_count(gpt_run):
    from trainer.causal_eval import evaluate_causal
    from trainer.inference import load_model

    run, dataset = gpt_run
    report = evaluate_causal(run, dataset, num_batches=2, batch_size=4)  # 4 + the last 2 of 6 val samples
    assert report["num_batches"] == 2 and report["num_samples"] == 6 and report["data"] == "packed"
    assert report["levels"] == [] and report["num_levels"] == 1 and report["is_training_dataset"]

    tokens = val_tokens(dataset)  # (6, 17)
    model, _, _ = load_model(run)
    with torch.no_grad():
        logits = model(tokens[:, :-1])  # (6, 16, 64)
        loss = model(tokens[:, :-1], tokens[:, 1:])
    targets = tokens[:, 1:].reshape(-1)
    counts = hand_count(logits.reshape(-1, 64), targets)
    assert_matches(report["metrics"]["model"], counts)
    assert report["metrics"]["model"]["loss"] == pytest.approx(float(loss), rel=1e-5)  # the trainer's eval loss
    assert_unigram(report["metrics"]["unigram"], unigram_by_hand(targets.numpy()))

    first = evaluate_causal(run, dataset, num_batches=1, batch_size=4)
    assert first["num_samples"] == 4 and first["metrics"]["model"]["num_targets"] == 4 * 16


# ------------------------------------------------------------------ token grids with RVQ levels


def test_flatgpt_embeds_rvq_per_level_metrics_equal_a_hand_count(flat_rvq_run, grid_dataset):
    from trainer.causal_eval import evaluate_causal
    from trainer.inference import load_model

    report = evaluate_causal(flat_rvq_run, grid_dataset, num_batches=3, batch_size=2)
    assert report["data"] == "grid" and report["num_levels"] == 3 and report["num_samples"] == 6
    assert report["token_grid"] == {"axes": ["channel", "time", "level"], "shape": [2, 6, 3], "vocab_size": 24}

    codes = val_tokens(grid_dataset)  # (6, C, T, Q)
    B, C, T, Q = codes.shape
    sequence = codes.permute(0, 2, 1, 3).reshape(B, T * C * Q)  # (t, c, q) order, levels interleaved
    model, _, _ = load_model(flat_rvq_run)
    with torch.no_grad():
        logits = model(sequence[:, :-1])  # (B, S - 1, V)
    level_of_target = (torch.arange(1, T * C * Q) % Q).expand(B, -1)
    levels = report["levels"]
    assert [entry["level"] for entry in levels] == [0, 1, 2]
    for q, entry in enumerate(levels):
        is_level = level_of_target == q
        targets = sequence[:, 1:][is_level]
        assert_matches(entry["model"], hand_count(logits[is_level], targets))
        assert_unigram(entry["unigram"], unigram_by_hand(targets.numpy()))
    assert_matches(report["metrics"]["model"], hand_count(logits.reshape(-1, 24), sequence[:, 1:].reshape(-1)))
    # overall = the target-weighted mean of the levels, for the model and the per-level unigram alike
    total = report["metrics"]["model"]["num_targets"]
    assert total == sum(entry["model"]["num_targets"] for entry in levels) == B * (T * C * Q - 1)
    for who in ("model", "unigram"):
        for key in ("loss", "accuracy", "top5_accuracy"):
            mean = sum(entry[who][key] * entry[who]["num_targets"] for entry in levels) / total
            assert report["metrics"][who][key] == pytest.approx(mean, rel=1e-9), (who, key)


def test_brainomni_forecast_scores_only_its_predicted_levels(tmp_path):
    from trainer.causal_eval import evaluate_causal
    from trainer.inference import load_model

    tokenizer = {"kind": "model", "model": BRAINTOKMIX, "flavor": "debug", "args": {}, "checkpoint": None, "sha256": None}
    dataset = write_grid_dataset(tmp_path / "codes", num_channels=2, num_steps=5, num_levels=2, vocab_size=32,
                                 tokenizer=tokenizer, num_train=4, num_val=3)
    run = train(tmp_path / "forecast", dataset, "BrainOmniCausalForecast", {"num_quantizers_used": 1}, steps=1)
    report = evaluate_causal(run, dataset, num_batches=8, batch_size=2)
    assert report["num_samples"] == 3 and report["num_batches"] == 2 and report["num_levels"] == 2

    codes = val_tokens(dataset)  # (3, C, W, Q): the forecaster's own layout
    model, _, _ = load_model(run)
    with torch.no_grad():
        logits = model(codes[:, :, :-1])  # (3, C, W - 1, 1, 32): level 0 only
    targets = codes[:, :, 1:, :1]
    counts = hand_count(logits.reshape(-1, 32), targets.reshape(-1))
    assert_matches(report["metrics"]["model"], counts)
    assert [entry["level"] for entry in report["levels"]] == [0]
    assert_matches(report["levels"][0]["model"], counts)
    assert_unigram(report["metrics"]["unigram"], unigram_by_hand(targets.reshape(-1).numpy()))


# ------------------------------------------------------------------ the CLI


def error_of(argv: list[str], capsys) -> str:
    return cli_error(capsys, argv)


def test_cli_prints_the_table_and_writes_the_json(flat_rvq_run, grid_dataset, tmp_path, capsys):
    from launch.cli import main

    out = tmp_path / "eval.json"
    main(["eval", flat_rvq_run, "--data", grid_dataset, "--batch-size", "4", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report) == {"checkpoint", "model", "flavor", "step", "task", "dataset", "split", "is_training_dataset", "data",
                           "token_grid", "num_batches", "num_samples", "vocab_size", "num_levels", "metrics", "levels"}
    assert set(report["metrics"]) == {"model", "unigram"} and len(report["levels"]) == 3
    assert set(report["metrics"]["model"]) == {"loss", "perplexity", "accuracy", "top5_accuracy", "num_targets"}
    assert report["model"] == "FlatGPTEmbedsRVQ" and report["step"] == 2 and report["num_samples"] == 6
    assert "eval FlatGPTEmbedsRVQ" in printed and "unigram" in printed
    assert len(printed.strip().splitlines()) == 2 + 2 * 4  # header, column names, (model, unigram) x (all + 3 levels)


def test_cli_refuses_bad_input_with_one_line(gpt_run, flat_rvq_run, grid_dataset, tmp_path, capsys):
    run, dataset = gpt_run
    other = write_token_dataset(tmp_path / "vocab-100", num_shards=1, samples_per_shard=4, val_samples=2, seq_len=16, vocab_size=100)
    assert "vocabulary of 100 tokens; gpt was trained on a vocabulary of 64" in error_of(["eval", run, "--data", other], capsys)
    assert "gpt was trained on packed token sequences" in error_of(["eval", run, "--data", grid_dataset], capsys)
    assert "FlatGPTEmbedsRVQ was trained on codes (channel 2, time 6, level 3)" in error_of(
        ["eval", flat_rvq_run, "--data", dataset], capsys)
    tokenizer = {"kind": "model", "model": BRAINTOKMIX, "flavor": "small", "args": {}, "checkpoint": None, "sha256": None}
    smaller = write_grid_dataset(tmp_path / "codes-16", num_channels=2, num_steps=6, num_levels=3, vocab_size=16,
                                 tokenizer=tokenizer, num_train=1, num_val=1)
    assert "codes (channel 2, time 6, level 3) of vocabulary 16" in error_of(["eval", flat_rvq_run, "--data", smaller], capsys)
    assert "has no 'test' shards" in error_of(["eval", run, "--data", dataset, "--split", "test"], capsys)
    assert "--num-batches: must be an integer >= 1" in error_of(["eval", run, "--data", dataset, "--num-batches", "0"], capsys)
    assert "--batch-size: must be an integer >= 1" in error_of(["eval", run, "--data", dataset, "--batch-size", "0"], capsys)
    assert "checkpoint not found" in error_of(["eval", str(tmp_path / "nope"), "--data", dataset], capsys)


def write_meg_windows(root: Path, *, num_channels: int = 3, num_samples: int = 64, num_windows: int = 4) -> str:
    """A raw meg_windows dataset written by hand: sinusoids plus noise, one train and one val shard."""
    from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord
    from sharding.shards import sample_key, shard_name, write_shard

    rng = np.random.default_rng(0)
    time = np.arange(num_samples) / 100.0

    def window():
        phases = rng.uniform(0, 2 * np.pi, (num_channels, 1))
        return (np.sin(2 * np.pi * 5 * time + phases) + 0.1 * rng.standard_normal((num_channels, num_samples))).astype(np.float32)

    records = []
    for index, split in enumerate(("train", "val")):
        name = shard_name("meg", index)
        written = write_shard(str(root / name), ({"__key__": sample_key("meg", index, i), "signal.npy": window()} for i in range(num_windows)))
        records.append(ShardRecord(name, split, written.num_samples, written.num_bytes, written.sha256, [f"synthetic{index}"]))
    Manifest(
        format_version=FORMAT_VERSION, name="meg", kind="meg_windows", seq_len=num_samples, vocab_size=0,
        fields={"signal.npy": {"dtype": "float32", "shape": [num_channels, num_samples]}}, shards=records, tokenizer={},
        sources={}, skipped=[], stats={}, created_by={"program": "tests"},
    ).write(str(root))
    return str(root)


def test_cli_still_evaluates_tokenizer_checkpoints(gpt_run, tmp_path, capsys):
    """A tokenizer checkpoint goes the tokenizer path unchanged (tests/test_pretokenize_signals.py checks its
    metrics); a causal model given raw windows is told it is no tokenizer."""
    from launch.cli import main

    raw = write_meg_windows(tmp_path / "meg")
    totem = train(tmp_path / "totem", raw, "totem", steps=1)
    out = tmp_path / "totem-eval.json"
    main(["eval", totem, "--data", raw, "--num-batches", "1", "--batch-size", "4", "--out", str(out)])
    assert "eval totem (debug, step 1)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"codebook_utilization", "perplexity", "token_entropy_bits", "reconstruction_mse", "scale_error"}
    assert "model 'gpt' is not a tokenizer model" in error_of(["eval", gpt_run[0], "--data", raw], capsys)
    # as tests/test_pretokenize_signals.py does: the tokenizer's checkpoint relabelled as a gpt
    (source,) = (Path(totem) / "checkpoints").glob("step-*")
    relabelled = tmp_path / "gpt-checkpoint"
    relabel_checkpoint(source, relabelled, {"name": "gpt", "flavor": "debug", "args": {}})
    assert "model 'gpt' is not a tokenizer model" in error_of(["eval", str(relabelled), "--data", raw], capsys)
