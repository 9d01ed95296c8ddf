"""`tokfleet analyze`: token statistics checked against counts made by hand (plain Python, no numpy
tricks) on small datasets, outliers, pruning, the sketch, bounded memory, Ray, the CLI and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sharding.analysis import AnalyzeOptions, analyze
from sharding.token_counts import mix, sketch, sketch_estimate
from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord
from sharding.shards import sample_key, shard_name, write_shard
from sharding.token_grid import TokenGrid


def tokfleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True)


def write_dataset(root: Path, shards: list[list[np.ndarray]], vocab_size: int, *, kind: str = "text_tokens",
                  axes: list[str] | None = None, tokenizer: dict | None = None) -> str:
    """A dataset of the given samples, one list per train shard (written by hand, no Ray)."""
    records = []
    for index, samples in enumerate(shards):
        name = shard_name("hand", index)
        written = write_shard(f"{root}/{name}", ({"__key__": sample_key("hand", index, i), "tokens.npy": s.astype(np.uint16)}
                                                  for i, s in enumerate(samples)))
        records.append(ShardRecord(name, "train", written.num_samples, written.num_bytes, written.sha256, []))
    shape = list(shards[0][0].shape)
    spec = {"dtype": "uint16", "shape": shape, **({"axes": axes} if axes else {})}
    Manifest(format_version=FORMAT_VERSION, name="hand", kind=kind, seq_len=shape[-1] - 1 if not axes else 0,
             vocab_size=vocab_size, fields={"tokens.npy": spec}, shards=records, tokenizer=tokenizer or {},
             sources={}, skipped=[], stats={}, created_by={}).write(str(root))
    return str(root)


def entropy(counter: Counter) -> float:
    total = sum(counter.values())
    return -sum(c / total * math.log(c / total) for c in counter.values())


def by_hand(sequences: list[list[int]], once: list[int], vocab: int) -> dict:
    """The statistics analyze reports, from plain Python counts."""
    unigram = Counter(once)
    grams = {n: Counter(tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)) for n in (2, 3, 4)}
    previous = Counter()
    for (a, _), c in grams[2].items():
        previous[a] += c
    return {
        "num_tokens": len(once), "used_ids": len(unigram), "used_fraction": len(unigram) / vocab,
        "unigram_entropy_nats": entropy(unigram),
        "bigram_conditional_entropy_nats": entropy(grams[2]) - entropy(previous),
        "distinct": {1: (len(unigram), len(once)), **{n: (len(g), sum(g.values())) for n, g in grams.items()}},
        "grams": grams, "unigram": unigram,
    }


def check(report: dict, expected: dict) -> None:
    for key in ("num_tokens", "used_ids"):
        assert report[key] == expected[key], key
    for key in ("used_fraction", "unigram_entropy_nats", "bigram_conditional_entropy_nats"):
        assert report[key] == pytest.approx(expected[key], abs=1e-12), key
    for n, (distinct, total) in expected["distinct"].items():
        entry = report["distinct_n"][str(n)]
        assert (entry["distinct"], entry["total"], entry["exact"]) == (distinct, total, True), n
        assert entry["distinct_fraction"] == pytest.approx(distinct / total)
    for n in (2, 3, 4):
        top = expected["grams"][n].most_common()
        reported = report["patterns"][str(n)]
        assert len(reported) == min(20, len(top))
        assert reported[0]["count"] == top[0][1]  # the most frequent first (ties in any order)
        for pattern in reported:  # every reported count is the true count
            assert pattern["count"] == expected["grams"][n][tuple(pattern["ids"])]
    transitions = expected["grams"][2]
    for entry in report["top_transitions"]:
        a, b = entry["ids"]
        assert entry["count"] == transitions[(a, b)]
        assert entry["p_next_given_previous"] == pytest.approx(transitions[(a, b)] / sum(c for (x, _), c in transitions.items() if x == a))


def test_packed_sequences_match_hand_counts(tmp_path):
    rng = np.random.default_rng(0)
    vocab, seq_len = 12, 16

    def cycle():  # 0 -> 1 -> ... -> 9 -> 0, with an occasional slip
        ids = [int(rng.integers(10))]
        for _ in range(seq_len):
            ids.append((ids[-1] + (1 if rng.random() < 0.9 else 2)) % 10)
        return np.array(ids)

    shards = [[cycle() for _ in range(7)] for _ in range(3)]
    shards[1][3] = np.array([vocab - 1, vocab - 2] * ((seq_len + 2) // 2))[: seq_len + 1]  # repetitive, with ids used nowhere else
    shards[2][5] = rng.permutation(np.arange(seq_len + 1) % 10)  # no cycle: unlikely transitions
    root = write_dataset(tmp_path / "data", shards, vocab)
    report = analyze(root, tmp_path / "out", AnalyzeOptions(num_outliers=3))

    samples = [[int(t) for t in s] for shard in shards for s in shard]
    expected = by_hand(samples, [t for s in samples for t in s[1:]], vocab)  # a packed sample's first id belongs to its neighbour
    check(report, expected)
    assert report["num_samples"] == 21 and report["num_shards"] == 3 and report["patterns_exact"]
    assert report["most_frequent"][0]["count"] == expected["unigram"].most_common(1)[0][1]
    outliers = report["outliers"]
    assert [len(entries) for entries in outliers.values()] == [3, 3, 3]
    assert outliers["least_likely"][0]["key"] == sample_key("hand", 2, 5) and outliers["least_likely"][0]["bigram_z"] > 3
    assert outliers["most_likely"][0]["key"] == sample_key("hand", 1, 3) and outliers["most_likely"][0]["bigram_nll"] == 0
    assert outliers["rarest_ids"][0]["key"] == sample_key("hand", 1, 3) and outliers["rarest_ids"][0]["shard"] == shard_name("hand", 1)
    # a sample's score is its mean -log p(next | previous) under the data's own counts
    grams, previous = expected["grams"][2], Counter()
    for (a, _), c in grams.items():
        previous[a] += c
    odd = samples[14 + 5]
    nll = np.mean([-math.log(grams[(a, b)] / previous[a]) for a, b in zip(odd, odd[1:])])
    assert outliers["least_likely"][0]["bigram_nll"] == pytest.approx(nll)
    written = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert written["unigram_entropy_nats"] == report["unigram_entropy_nats"]
    assert {Path(p).name for p in report["plots"]} == {"usage.png", "transitions.png", "sample_nll.png"}
    assert all(Path(p).stat().st_size > 5000 for p in report["plots"])


def test_code_grid_runs_along_time_per_channel_and_level(tmp_path):
    rng = np.random.default_rng(1)
    vocab = 9
    grid = TokenGrid(("channel", "time", "level"), (3, 10, 2), vocab)
    shards = [[rng.integers(0, vocab, (3, 10, 2)) for _ in range(5)] for _ in range(2)]
    root = write_dataset(tmp_path / "data", shards, vocab, kind="meg_tokens", axes=list(grid.axes),
                         tokenizer={"model": "BrainOmniCausalTokenizer"})
    report = analyze(root, tmp_path / "out")

    sequences, by_channel, by_level = [], [Counter() for _ in range(3)], [Counter() for _ in range(2)]
    for sample in (s for shard in shards for s in shard):
        for c in range(3):
            for q in range(2):
                series = [int(t) for t in sample[c, :, q]]  # one channel's codes of one level, in time order
                sequences.append(series)
                by_channel[c].update(series)
                by_level[q].update(series)
    check(report, by_hand(sequences, [t for s in sequences for t in s], vocab))
    assert report["grid"]["canonical"] == {"time": 10, "height": 3, "width": 1, "level": 2}
    for reported, counter in zip(report["by_channel"] + report["by_level"], by_channel + by_level):
        assert reported["num_tokens"] == sum(counter.values()) and reported["used_ids"] == len(counter)
        assert reported["unigram_entropy_nats"] == pytest.approx(entropy(counter), abs=1e-12)
    assert (tmp_path / "out" / "channels.png").stat().st_size > 5000
    # the canonical view the models read agrees with the hand-made series
    canonical = grid.to_canonical(torch.from_numpy(shards[0][0].astype(np.int64))[None])[0]
    assert canonical[:, 2, 0, 1].tolist() == [int(t) for t in shards[0][0][2, :, 1]]


def test_pruned_patterns_say_so_and_keep_dominant_counts(tmp_path):
    rng = np.random.default_rng(2)
    vocab = 50
    samples = [np.concatenate([[1, 2, 3, 4] * 8, rng.integers(5, vocab, 32)])[:64] for _ in range(12)]
    root = write_dataset(tmp_path / "data", [samples[:6], samples[6:]], vocab)
    report = analyze(root, tmp_path / "out", AnalyzeOptions(max_patterns=40))
    assert not report["patterns_exact"] and report["pattern_unlisted_max_count"]["4"] > 0
    assert report["patterns"]["4"][0]["ids"] in ([1, 2, 3, 4], [2, 3, 4, 1], [3, 4, 1, 2], [4, 1, 2, 3])
    exact = analyze(root, tmp_path / "exact")
    assert exact["patterns_exact"] and all(exact["pattern_unlisted_max_count"][n] <= exact["patterns"][n][-1]["count"] for n in "234")
    assert exact["patterns"]["4"][:3] == report["patterns"]["4"][:3]


def test_pattern_counts_are_exact_and_the_unlisted_bounded(tmp_path):
    """Fewer candidates a shard than distinct n-grams (max_patterns 32 of ~300): listed counts are still
    exact (recounted), no unlisted n-gram occurs more often than the reported bound, and the bound proves
    the list the true top 20."""
    rng = np.random.default_rng(7)
    vocab, phrases = 40, [rng.integers(0, 40, 5) for _ in range(8)]
    weights = 1 / np.arange(1, 9) ** 1.2

    def sample():  # phrases of Zipf-like frequency with noise ids between them
        ids = []
        while len(ids) < 49:
            ids.extend(phrases[rng.choice(8, p=weights / weights.sum())])
            ids.extend(rng.integers(0, vocab, rng.integers(0, 3)))
        return np.array(ids[:49])

    shards = [[sample() for _ in range(25)] for _ in range(6)]
    root = write_dataset(tmp_path / "data", shards, vocab)
    report = analyze(root, tmp_path / "out", AnalyzeOptions(max_patterns=32, plots=False))
    samples = [[int(t) for t in s] for shard in shards for s in shard]
    expected = by_hand(samples, [t for s in samples for t in s[1:]], vocab)
    grams = expected["grams"]
    for n in (3, 4):
        listed, bound = report["patterns"][str(n)], report["pattern_unlisted_max_count"][str(n)]
        assert len(listed) == 20 and bound > 0
        assert all(pattern["count"] == grams[n][tuple(pattern["ids"])] for pattern in listed)
        unlisted = [count for gram, count in grams[n].items() if list(gram) not in [p["ids"] for p in listed]]
        assert max(unlisted) <= bound
        truth = sorted(grams[n].values(), reverse=True)[:20]
        assert [p["count"] for p in listed][:5] == truth[:5]  # the phrases: far above the bound
        assert bound <= listed[-1]["count"] and [p["count"] for p in listed] == truth
    assert report["patterns_exact"]
    check(report, expected)  # and everything else is exact


def test_distinct_count_sketch():
    values = np.random.default_rng(3).choice(2**40, size=300_000, replace=False).astype(np.uint64)
    merged = sketch(np.concatenate([sketch(mix(values[:150_000])), sketch(mix(values[150_000:]))]))
    estimate, exact = sketch_estimate(merged)
    assert not exact and abs(estimate / 300_000 - 1) < 0.02
    assert sketch_estimate(sketch(mix(values[:1000])))[0] == 1000


def test_memory_does_not_grow_with_the_number_of_shards(tmp_path, monkeypatch):
    """Memory is bounded by two constants, not by the data: decoded samples kept between the passes
    (CACHE_BYTES) and sparse tables gathered before a merge (PENDING_ENTRIES); both made small here."""
    from sharding import analysis, token_counts

    monkeypatch.setattr(analysis, "CACHE_BYTES", 0)
    monkeypatch.setattr(token_counts, "PENDING_ENTRIES", 20_000)
    rng = np.random.default_rng(4)

    def peak(num_shards: int) -> int:
        shards = [[rng.integers(0, 256, 129) for _ in range(200)] for _ in range(num_shards)]
        root = write_dataset(tmp_path / f"d{num_shards}", shards, 256)
        tracemalloc.start()
        analyze(root, tmp_path / f"o{num_shards}", AnalyzeOptions(max_patterns=5000))
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size

    small, large = peak(3), peak(24)
    assert large < 1.3 * small, (small, large)


def test_ray_tasks_give_the_same_report(tmp_path, ray_session):
    rng = np.random.default_rng(5)
    shards = [[rng.integers(0, 30, 33) for _ in range(9)] for _ in range(5)]
    root = write_dataset(tmp_path / "data", shards, 30)
    here = analyze(root, tmp_path / "here")
    on_ray = analyze(root, tmp_path / "ray", AnalyzeOptions(use_ray=True))
    here.pop("plots"), on_ray.pop("plots")
    assert on_ray == here


def test_cli_writes_the_report_and_refuses_bad_input(tmp_path):
    rng = np.random.default_rng(6)
    root = write_dataset(tmp_path / "data", [[rng.integers(0, 20, 17) for _ in range(4)]], 20)
    result = tokfleet("analyze", root, "--out", str(tmp_path / "out"), "--outliers", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert report["num_samples"] == 4 and len(report["outliers"]["least_likely"]) == 2
    assert "unigram entropy" in result.stdout
    # default output: beside the manifest
    assert tokfleet("analyze", root).returncode == 0 and (Path(root) / "analysis" / "analysis.json").exists()

    raw = tmp_path / "raw"
    raw.mkdir()
    Manifest(format_version=FORMAT_VERSION, name="raw", kind="meg_windows", seq_len=0, vocab_size=0,
             fields={"signal.npy": {"dtype": "float32", "shape": [4, 100]}}, shards=[], tokenizer={}, sources={}, skipped=[],
             stats={}, created_by={}).write(str(raw))
    for args, message in (([str(raw)], "not a token dataset"), ([str(tmp_path / "missing")], "manifest not found"),
                          ([root, "--split", "val"], "no val shards to analyze")):
        result = tokfleet("analyze", *args, "--out", str(tmp_path / "bad"))
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    # a damaged shard is named, and nothing is written
    shard = Path(root) / shard_name("hand", 0)
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = tokfleet("analyze", root, "--out", str(tmp_path / "damaged"))
    assert result.returncode == 2 and "hand-000000.tar: sha256 differs" in result.stderr
    assert not (tmp_path / "damaged").exists()
