"""Benchmark: single-process training throughput of brain-gen's continuous-signal models and classifiers
(modeling/brain).

BENDRForecast, NTD and MEGFactorizedAutoencoder at their `small` flavor (64 channels x 512 samples per
window), and the three classifiers at theirs (random windows / codes of their default sizes, random labels),
fp32, one thread, micro-batch 4: forward, backward and an AdamW step, timed over
STEPS steps after WARMUP. Reported: windows (samples) per second and MFU, i.e. the model's training FLOPs
per input value (counted from its layers, `num_flops_per_token`) x input values per second / the fp32
matmul peak this machine measures at the start, as the trainer computes it.

Numbers: tests/bench/results/brain_signal_models.json, and the table printed at the end.

    make bench   (or: pytest -s tests/bench/test_brain_signal_bench.py)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
NAMES = ("BENDRForecast", "NTD", "MEGFactorizedAutoencoder", "ClassifierContinuous", "ClassifierQuantized",
         "ClassifierQuantizedImage")
BATCH = 4
WARMUP = 2
STEPS = 6


def batch_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A micro-batch of the model's input: random windows, or random codes; a random label for a classifier."""
    inputs = model.example_inputs(batch_size=BATCH, device="cpu")
    for name, value in inputs.items():
        inputs[name] = (torch.randn_like(value) if value.is_floating_point()
                        else torch.randint(0, model.config.vocab_size, value.shape))
    if hasattr(model.config, "num_classes"):
        inputs["label"] = torch.randint(0, model.config.num_classes, (BATCH,))
    return inputs


def test_small_flavors_samples_per_second_and_mfu():
    from modeling.registry import build_model
    from test_distributed_bench import format_table
    from trainer.metrics import measure_peak_flops

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak_flops = measure_peak_flops(torch.device("cpu"), seconds=2.0)
        rows, data = [], {}
        for name in NAMES:
            torch.manual_seed(0)
            model = build_model(name, "small").train()
            inputs = batch_of(model)
            signal = inputs[model.input_name]
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for step in range(WARMUP + STEPS):
                if step == WARMUP:
                    start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss = model(**inputs)
                loss.backward()
                optimizer.step()
            seconds = (time.perf_counter() - start) / STEPS
            assert torch.isfinite(loss)
            values_per_s = signal.numel() / seconds
            d = {"samples_per_s": BATCH / seconds, "mfu": model.num_flops_per_token() * values_per_s / peak_flops,
                 "flops_per_value": model.num_flops_per_token(), "num_params": sum(p.numel() for p in model.parameters()),
                 "window": list(signal.shape[1:]), "batch": BATCH, "peak_flops": peak_flops}
            data[name] = d
            rows.append([f"{name} small", f"{d['num_params'] / 1e6:.2f}M", d["samples_per_s"], f"{d['mfu']:.1%}"])
    finally:
        torch.set_num_threads(num_threads)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "brain_signal_models.json").write_text(json.dumps(data, indent=1))
    print(f"\n\nContinuous-signal models and classifiers, small flavors, one process, one thread, fp32 CPU, micro-batch {BATCH} windows; "
          f"MFU vs {peak_flops / 1e9:.0f} GFLOP/s (measured fp32 matmul)\n"
          + format_table(["model", "params", "windows/s", "MFU"], rows))
