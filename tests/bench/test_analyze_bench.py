"""`tokfleet analyze` throughput next to the shard loader reading the same shards, in one run.

The data are the demo's text shards (`tokfleet prepare configs/text/stdlib_prepare.yaml`: the Python
standard library, BPE, packed sequences). In paired rounds (order rotated each round, so machine
noise hits both alike) the ShardLoader reads and decodes every train sample once, and `analyze`
makes its two passes (counts, then per-sample likelihoods) and writes its report and plots.
Goal: analyze >= 0.5x the loader's tokens/s (the analysis is not the slow part); also timed without the
PNGs, whose cost does not grow with the data. Both read every shard the same way (tarfile, sha256,
fields): that alone is ~0.7 of the loader's time. The loader reads in this process; analyze reads in a
forked reader process while this one counts (a pipeline), and draws pass 1's PNGs in another, so its CPU
seconds (all its processes) are reported beside the wall-clock ratio.

    make bench     # or: pytest -s tests/bench/test_analyze_bench.py
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "text" / "stdlib_prepare.yaml"
NUM_ROUNDS = 5


def test_analyze_throughput(tmp_path):
    from sharding.analysis import AnalyzeOptions, analyze
    from sharding.loader import ShardLoader, forget_verified_shards
    from sharding.manifest import Manifest

    dataset = tmp_path / "stdlib"
    result = subprocess.run([sys.executable, "-m", "launch.cli", "prepare", str(CONFIG), "--set", f"shards.output={dataset}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = Manifest.read(str(dataset))
    num_tokens = manifest.num_samples("train") * manifest.seq_len

    def loader() -> int:
        forget_verified_shards()  # verification included, as analyze checks every shard's sha256 too
        return sum(1 for _ in ShardLoader(manifest, str(dataset), "train", num_streams=1, seed=0, shuffle=True))

    def analysis() -> int:
        return analyze(str(dataset), tmp_path / "analysis")["num_samples"]

    def passes() -> int:  # the two streaming passes and the report, without the PNGs (a fixed cost)
        return analyze(str(dataset), tmp_path / "analysis-json", AnalyzeOptions(plots=False))["num_samples"]

    def cpu_seconds() -> float:  # this process and its reaped children (analyze joins its helpers)
        return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    times = {"loader": [], "analyze": [], "passes": []}
    cpu = {"loader": [], "analyze": [], "passes": []}
    for round_index in range(NUM_ROUNDS):
        order = [("loader", loader), ("analyze", analysis), ("passes", passes)][:: 1 if round_index % 2 == 0 else -1]
        for name, fn in order:
            start, start_cpu = time.perf_counter(), cpu_seconds()
            assert fn() == manifest.num_samples("train")
            times[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - start_cpu)
    ratios = [l / a for l, a in zip(times["loader"], times["analyze"])]
    pass_ratios = [l / a for l, a in zip(times["loader"], times["passes"])]
    row = {"num_tokens": num_tokens, "vocab_size": manifest.vocab_size, "num_shards": len(manifest.shards_of("train")),
           "loader_tokens_per_s": num_tokens / statistics.median(times["loader"]),
           "analyze_tokens_per_s": num_tokens / statistics.median(times["analyze"]),
           "analyze_over_loader": statistics.median(ratios),
           "passes_tokens_per_s": num_tokens / statistics.median(times["passes"]),
           "passes_over_loader": statistics.median(pass_ratios),
           "plots_s": statistics.median(a - p for a, p in zip(times["analyze"], times["passes"])),
           "cpu_s": {name: statistics.median(values) for name, values in cpu.items()}}
    print(f"\n{'tokens':>10s} {'loader tok/s':>13s} {'analyze tok/s':>14s} {'analyze/loader':>15s} {'no PNGs/loader':>15s} {'PNGs s':>7s}"
          f" {'CPU s: loader':>14s} {'analyze':>8s} {'no PNGs':>8s}")
    print(f"{num_tokens:10d} {row['loader_tokens_per_s']:13.0f} {row['analyze_tokens_per_s']:14.0f} {row['analyze_over_loader']:15.2f} "
          f"{row['passes_over_loader']:15.2f} {row['plots_s']:7.2f} {row['cpu_s']['loader']:14.2f} {row['cpu_s']['analyze']:8.2f} "
          f"{row['cpu_s']['passes']:8.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "analyze.json").write_text(json.dumps(row, indent=1) + "\n")
    assert row["analyze_over_loader"] >= 0.5, row  # the goal
