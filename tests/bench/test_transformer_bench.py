"""Benchmark of the configurable transformer (modeling/transformer/): attention memory and throughput.

1. Peak memory of one causal self-attention layer (d_model 256, 4 heads, batch 1) at sequence 4,096,
   forward + backward, for each att_type. Each kernel runs in a fresh process (this file run as a
   script), so one's freed arenas cannot hide the next one's peak. Measured: the resident-set high
   water mark (VmHWM, reset just before the timed call) minus the RSS before it, i.e. what the call
   itself adds: the inputs, weights and the warm-up are all held before. Goal: xformer <= 0.5x standard.
2. Training throughput of the `small` flavor on this CPU (fp32, batch 16 windows of 96 + 24 steps,
   AdamW, after warm-up), per att_type: time steps of context per second (the unit of
   num_flops_per_token) and MFU against the fp32 matmul peak measured here (trainer.metrics), in
   paired rounds (order rotated, peak measured each round; medians), since the machine is shared.
   In-process steps of the plain model, not `python -m trainer` (no series data set here).

Numbers: tests/bench/results/transformer.json, and the tables printed at the end.

    make bench   (or: pytest -s tests/bench/test_transformer_bench.py)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SEQUENCE = 4096
ATT_TYPES = ("standard", "xformer", "flash", "frequency")
MIB = 2**20
NUM_WARMUP_STEPS = 2
NUM_STEPS = 3
NUM_ROUNDS = 4
BATCH_SIZE = 16


def attention_peak(att_type: str) -> dict:
    """In this process: the memory one forward + backward of the attention layer adds at SEQUENCE."""
    from test_distributed_bench import memory_status, reset_peak

    from modeling.transformer.attention import Attention

    torch.manual_seed(0)
    layer = Attention(256, 4, att_type, dropout=0.0, is_causal=att_type != "frequency", is_cross=False)
    x = torch.randn(1, SEQUENCE, 256, requires_grad=True)
    layer(x[:, :512]).sum().backward()  # warm-up: kernels loaded, gradients of the weights allocated
    x.grad = None
    before = memory_status()
    assert reset_peak(), "this kernel cannot reset VmHWM"
    start = time.perf_counter()
    layer(x).sum().backward()
    seconds = time.perf_counter() - start
    return {"att_type": att_type, "kernel": layer.kernel, "added_peak_mib": (memory_status()["peak"] - before["rss"]) / MIB,
            "seconds": seconds}


def training_step(att_type: str):
    """A `small` model of att_type, its optimizer and batch -> a function running one training step."""
    from modeling.registry import build_model

    torch.manual_seed(0)
    model = build_model("TransformerForecaster", "small", {"att_type": att_type}).train()
    config = model.config
    steps = torch.arange(config.context_length + config.pred_length, dtype=torch.float32)
    phases = torch.rand(BATCH_SIZE, 1, config.input_size) * 6.3
    window = torch.sin(0.1 * steps[None, :, None] * (1 + torch.arange(config.input_size)) + phases)
    context, target = window[:, : config.context_length], window[:, config.context_length :, : config.output_size]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> float:
        loss = model(context, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return model, step


def train_throughput() -> tuple[dict, float]:
    """Per att_type: median context steps/s over paired rounds (order rotated each round, the matmul
    peak measured in each round too, so a busy spell of this shared machine hits every kernel alike)."""
    from trainer.metrics import measure_peak_flops

    runs = {att_type: training_step(att_type) for att_type in ATT_TYPES}
    for _, step in runs.values():
        for _ in range(NUM_WARMUP_STEPS):
            step()
    seconds = {att_type: [] for att_type in ATT_TYPES}
    peaks = []
    for round_index in range(NUM_ROUNDS):
        peaks.append(measure_peak_flops(torch.device("cpu"), seconds=0.3))
        order = ATT_TYPES[round_index % len(ATT_TYPES):] + ATT_TYPES[: round_index % len(ATT_TYPES)]
        for att_type in order:
            start = time.perf_counter()
            for _ in range(NUM_STEPS):
                runs[att_type][1]()
            seconds[att_type].append((time.perf_counter() - start) / NUM_STEPS)
    peak_flops = statistics.median(peaks)
    results = {}
    for att_type, (model, _) in runs.items():
        tokens_per_s = BATCH_SIZE * model.config.context_length / statistics.median(seconds[att_type])
        results[att_type] = {"att_type": att_type, "num_params": model.num_params(), "flops_per_token": model.num_flops_per_token(),
                             "tokens_per_s": tokens_per_s, "mfu": model.num_flops_per_token() * tokens_per_s / peak_flops,
                             "kernel": model.attention_kernel}
    return results, peak_flops


def test_transformer_bench():
    memory = {}
    for att_type in ATT_TYPES:
        result = subprocess.run([sys.executable, __file__, "memory", att_type], capture_output=True, text=True,
                                cwd=Path(__file__).parent)
        assert result.returncode == 0, result.stderr[-3000:]
        memory[att_type] = json.loads(result.stdout.strip().splitlines()[-1])
    throughput, peak_flops = train_throughput()

    standard_peak = memory["standard"]["added_peak_mib"]
    lines = [f"causal self-attention, d_model 256, 4 heads, sequence {SEQUENCE}, forward + backward:",
             f"{'att_type':10s} {'kernel':22s} {'peak MiB':>9s} {'x standard':>10s} {'seconds':>8s}"]
    for att_type, row in memory.items():
        row["peak_vs_standard"] = row["added_peak_mib"] / standard_peak
        lines.append(f"{att_type:10s} {row['kernel']:22s} {row['added_peak_mib']:9.1f} {row['peak_vs_standard']:10.3f} {row['seconds']:8.2f}")
    standard_speed = throughput["standard"]["tokens_per_s"]
    lines += ["", f"TransformerForecaster small ({throughput['standard']['num_params'] / 1e6:.2f}M params), training, batch "
                  f"{BATCH_SIZE}, fp32, {torch.get_num_threads()} threads, peak {peak_flops / 1e9:.1f} GFLOP/s:",
              f"{'att_type':10s} {'context steps/s':>15s} {'x standard':>10s} {'MFU':>7s}"]
    for att_type, row in throughput.items():
        row["speed_vs_standard"] = row["tokens_per_s"] / standard_speed
        lines.append(f"{att_type:10s} {row['tokens_per_s']:15.0f} {row['speed_vs_standard']:10.2f} {row['mfu']:7.2%}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transformer.json").write_text(json.dumps({"memory": memory, "throughput": throughput,
                                                          "peak_flops": peak_flops}, indent=1))
    print("\n\n" + "\n".join(lines) + f"\n(written to {RESULTS / 'transformer.json'})")
    assert memory["xformer"]["peak_vs_standard"] <= 0.5, memory
    assert all(0 < row["mfu"] < 1 for row in throughput.values()), throughput


if __name__ == "__main__":
    if sys.argv[1] == "memory":
        print(json.dumps(attention_peak(sys.argv[2])))
