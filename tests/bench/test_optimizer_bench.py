"""Optimizer step time for a ~55M-parameter GPT on this CPU: torch's AdamW per-tensor (its CPU
default), foreach and fused (what trainer/optim.py picks), and DeepSpeed's CPU Adam (what a ZeRO run
with an offloaded optimizer runs, trainer/engines/deepspeed.py). Same parameters, same gradients,
paired rounds in rotated order so machine noise hits every optimizer alike; ratios are medians of
per-round ratios against torch's per-tensor AdamW.

    make bench     # or: DS_ACCELERATOR=cpu pytest -s tests/bench/test_optimizer_bench.py
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from core.config import OptimConfig
from modeling.registry import build_model
from trainer.optim import build_optimizer, param_groups

RESULTS = Path(__file__).parent / "results"
MODEL_ARGS = {"n_layer": 6, "n_head": 6, "n_kv_head": 6, "n_embd": 768, "vocab_size": 8192, "sequence_len": 256}
NUM_ROUNDS, STEPS_PER_ROUND = 7, 2


def test_optimizer_step_time():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from trainer.engines.deepspeed import cpu_adam_problem

    torch.manual_seed(0)
    model = build_model("gpt", "small", dict(MODEL_ARGS))
    num_params = sum(p.numel() for p in model.parameters())
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    cfg = OptimConfig()
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    optimizers = {
        "torch AdamW per-tensor": torch.optim.AdamW(param_groups(model, cfg), foreach=False, **adamw),
        "torch AdamW foreach": torch.optim.AdamW(param_groups(model, cfg), foreach=True, **adamw),
        "torch AdamW fused (build_optimizer)": build_optimizer(model, cfg),
    }
    problem = cpu_adam_problem()  # builds the op on first use (~2.5 min), then loads it
    if problem is None:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizers["DeepSpeedCPUAdam"] = DeepSpeedCPUAdam(param_groups(model, cfg), adamw_mode=True, **adamw)
    else:
        print(f"\nDeepSpeedCPUAdam left out: {problem}")
    for optimizer in optimizers.values():  # allocate the moments
        optimizer.step()
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for round_index in range(NUM_ROUNDS):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            start = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                optimizers[name].step()
            seconds[name].append((time.perf_counter() - start) / STEPS_PER_ROUND)
    baseline = seconds["torch AdamW per-tensor"]
    rows = {name: {"median_step_s": statistics.median(times),
                   "speedup_over_per_tensor": statistics.median(b / t for b, t in zip(baseline, times))}
            for name, times in seconds.items()}
    print(f"\n{num_params / 1e6:.1f}M parameters, {torch.get_num_threads()} torch thread(s)")
    print(f"{'optimizer':38s} {'step s':>8s} {'x per-tensor':>13s}")
    for name, row in rows.items():
        print(f"{name:38s} {row['median_step_s']:8.3f} {row['speedup_over_per_tensor']:13.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "optimizers.json").write_text(json.dumps(
        {"num_params": num_params, "threads": torch.get_num_threads(), "rounds": NUM_ROUNDS, "rows": rows,
         "cpu_adam_problem": problem, "seconds": seconds}, indent=1) + "\n")
