"""Benchmark: tokens/s and MFU of brain-gen's token-grid models (modeling/brain), `small` flavors.

One process (`python -m trainer`, engine single, fp32, one thread) trains each family on a synthetic
token grid of its small flavor's shape: STGPT2MEG and WavenetFullChannel on 32 channels x 257 codes
of 256 (TOTEM's MEG grid), TASA3D and Wavenet3D on 65 steps of 16 x 16 codes of 1024 (Vidtok's
grid of 128 x 128 frames). Reported: the median of metrics.jsonl's tokens_per_s (a token = one code
of one site at one time step) and MFU over the steps after warm-up, MFU against the fp32 matmul peak
this machine measures at the start (num_flops_per_token counted from the layers by FlopCounterMode).

Numbers: tests/bench/results/brain_models.json, and the table printed at the end.

    python -m core.netns -- python -m pytest -s tests/bench/test_brain_models_bench.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"
STEPS = 10
WARMUP_STEPS = 3
TOTEM = {"model": "totem", "flavor": "small", "args": {}, "checkpoint": "", "sha256": "1" * 64}
VIDTOK = {"model": "Vidtok", "flavor": "small", "args": {}, "checkpoint": "", "sha256": "2" * 64}
GRIDS = {  # name -> write_grid_dataset arguments
    "meg": dict(axes=("channel", "time"), shape=(32, 257), vocab_size=256, tokenizer=TOTEM),
    "video": dict(axes=("time", "height", "width"), shape=(65, 16, 16), vocab_size=1024, tokenizer=VIDTOK, kind="video_tokens"),
}
MODELS = {  # name -> (grid, micro-batch)
    "STGPT2MEG": ("meg", 1),
    "WavenetFullChannel": ("meg", 1),
    "TASA3D": ("video", 1),
    "Wavenet3D": ("video", 1),
}


def test_brain_token_models_small_tokens_per_second(tmp_path):
    import torch

    from conftest import write_grid_dataset
    from test_distributed_bench import format_table, rank_env
    from trainer.metrics import measure_peak_flops, read_metrics

    torch.set_num_threads(1)  # the trainer below runs one thread (rank_env)
    peak_flops = measure_peak_flops(torch.device("cpu"), seconds=2.0)
    datasets = {name: write_grid_dataset(tmp_path / name, num_train=16, num_val=0, num_train_shards=4, **args)
                for name, args in GRIDS.items()}
    rows, data = [], {}
    for name, (grid, micro) in MODELS.items():
        run_dir = tmp_path / name
        config = {
            "run": {"name": name, "output_dir": str(run_dir), "max_steps": STEPS, "seed": 0, "device": "cpu"},
            "model": {"name": name, "flavor": "small"},
            "data": {"dataset": datasets[grid], "num_streams": 4, "val_split": ""},
            "optim": {"micro_batch_size": micro, "grad_accum_steps": 1, "warmup_steps": 1},
            "engine": {"kind": "single", "peak_flops": peak_flops},
            "checkpoint": {"every_steps": 0, "save_final": False},
            "logging": {"every_steps": 1, "progress": False, "wandb": False},
            "eval": {"every_steps": 0},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run([sys.executable, "-m", "trainer", str(path)], capture_output=True, text=True, env=rank_env(),
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        records = read_metrics(run_dir / "metrics.jsonl")[WARMUP_STEPS:]
        d = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
             "mfu": statistics.median(r["mfu"] for r in records), "micro_batch": micro, "grid": GRIDS[grid]["shape"],
             "loss_first": read_metrics(run_dir / "metrics.jsonl")[0]["loss"], "loss_last": records[-1]["loss"],
             "peak_flops": peak_flops}
        data[name] = d
        rows.append([name, d["tokens_per_s"], f"{d['mfu']:.1%}"])
        assert d["tokens_per_s"] > 0 and d["mfu"] > 0
    table = format_table(["model", "tokens/s", "MFU"], rows)
    title = (f"brain-gen token-grid models, small flavors, one process, one thread, fp32 CPU, micro-batch 1; "
             f"median of steps {WARMUP_STEPS + 1}-{STEPS}; MFU vs {peak_flops / 1e9:.0f} GFLOP/s (measured fp32 matmul)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "brain_models.json").write_text(json.dumps(data, indent=1))
    print("\n\n" + title + "\n" + table)
