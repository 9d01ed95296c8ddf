"""Benchmark: resuming an MoE checkpoint at another expert-parallel size, against reading its bytes.

A GPT `small` with 8 experts in every block (4 x 256, 22.0M parameters, 16.8M of them experts) trains
one ZeRO-2 step on 2 ranks with `expert_parallel_size` 2 and checkpoints. Then 1 rank, holding every
expert, loads it: the first load re-partitions (`trainer/engines/expert_reshard.py`: every parameter
whole, with its fp32 master and Adam moments, into `deepspeed_universal_ep1/`) and lets DeepSpeed's
universal load cut it; the next finds the conversion there. The reference is torch.load (memory-mapped
off, like the engine's optimizer files) of the checkpoint's own files: the least a resume has to read.
Rounds interleave the engine's load (conversion removed first) and the plain read; ratios are the
median over rounds. Reads come from the page cache. Last, the conversion against DeepSpeed's own
`ds_to_universal` (what a dense model's resize uses, `reshard.py`) on the same bytes: a 1-rank checkpoint
of the same model, which both can read, converted in alternating rounds.

    python -m core.netns -- python -m pytest -s tests/bench/test_moe_bench.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROUNDS = 3

DRIVER = r"""
import gc, json, shutil, statistics, sys, time
from pathlib import Path

import torch, torch.distributed as dist
from safetensors.torch import load_file

from core.config import EngineConfig, OptimConfig
from modeling.registry import build_model
from trainer.engines.deepspeed import DeepSpeedEngine

dist.init_process_group("gloo")
rank, ranks = dist.get_rank(), dist.get_world_size()
checkpoint, rounds = Path(sys.argv[1]), int(sys.argv[2])

def engine():
    torch.manual_seed(0)
    model = build_model("gpt", "small", {"moe_num_experts": 8, "moe_top_k": 2, "moe_layers": "all"})
    optim = OptimConfig(lr=1e-3, micro_batch_size=2, warmup_steps=0, schedule="constant")
    return DeepSpeedEngine(model, optim, EngineConfig(kind="deepspeed", zero_stage=2, expert_parallel_size=ranks),
                           10, torch.device("cpu"), ranks)

trained = engine()
if ranks == 2:
    idx = torch.randint(0, 8192, (2, 65))
    trained.forward_backward({"idx": idx[:, :-1], "targets": idx[:, 1:]}, 1.0)
    trained.optimizer_step()
    trained.save_checkpoint(checkpoint)
else:
    files = [p for p in checkpoint.rglob("*") if p.is_file() and p.suffix in (".pt", ".safetensors")
             and "universal" not in str(p)]
    results = {"params": sum(p.numel() for p in trained.model.parameters()),
               "checkpoint_bytes": sum(p.stat().st_size for p in files), "convert_and_load_s": [], "load_s": [], "read_s": []}
    for _ in range(rounds):
        for universal in checkpoint.glob("deepspeed_universal*"):
            shutil.rmtree(universal)
        start = time.perf_counter()
        trained.load_checkpoint(checkpoint, 2)  # converts, then loads
        results["convert_and_load_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        trained.load_checkpoint(checkpoint, 2)  # the conversion is there
        results["load_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for path in files:
            if path.suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=False)
            else:
                load_file(path)
        results["read_s"].append(time.perf_counter() - start)
    # both converters on the same bytes: this rank's own checkpoint (every expert on it, ZeRO-2, 1 rank), ours
    # re-partitioning it for expert_parallel_size 2, DeepSpeed's ds_to_universal (what a dense resize uses)
    from trainer.engines import expert_parallel, expert_reshard
    from trainer.engines.reshard import convert_to_universal

    own = checkpoint.parent / "one-rank"
    trained.save_checkpoint(own)
    experts = expert_parallel.expert_tensors(trained.model, None)
    groups = [{"name": "dense_0"}, {"name": "dense_1"}, {"name": "ep_size_2", "moe": True}]
    results.update({"ours_s": [], "ds_to_universal_s": []})
    for _ in range(rounds):
        for key, convert in (("ours_s", lambda: expert_reshard.convert(own, "deepspeed", experts, 1, 1, 2, groups)),
                             ("ds_to_universal_s", lambda: convert_to_universal(own, "deepspeed"))):
            for universal in own.glob("deepspeed_universal*"):
                shutil.rmtree(universal)
            start = time.perf_counter()
            convert()
            results[key].append(time.perf_counter() - start)
    print("RESULTS " + json.dumps(results))
del trained
gc.collect()
dist.destroy_process_group()
"""


def _torchrun(ranks: int, script: Path, *args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29631",
               str(script), *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_resume_at_another_expert_parallel_size_vs_reading_the_bytes(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    _torchrun(2, script, str(tmp_path / "checkpoint"), "0")
    out = _torchrun(1, script, str(tmp_path / "checkpoint"), str(ROUNDS))
    results = json.loads(out.split("RESULTS ", 1)[1].splitlines()[0])
    ratios = {key: statistics.median(t / r for t, r in zip(results[key], results["read_s"]))
              for key in ("convert_and_load_s", "load_s")}
    ratios["ours_vs_ds_to_universal"] = statistics.median(a / b for a, b in zip(results["ours_s"], results["ds_to_universal_s"]))
    results["ratios_to_read"] = ratios
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe.json").write_text(json.dumps(results, indent=1))
    print(f"\nMoE checkpoint of {results['params'] / 1e6:.1f}M params, {results['checkpoint_bytes'] / 2**20:.0f} MiB, "
          f"EP 2 on 2 ranks -> 1 rank: re-partition + load {statistics.median(results['convert_and_load_s']):.2f} s "
          f"({ratios['convert_and_load_s']:.2f}x reading the bytes), load of the converted form "
          f"{statistics.median(results['load_s']):.2f} s ({ratios['load_s']:.2f}x), torch.load of the files "
          f"{statistics.median(results['read_s']):.2f} s; converting a 1-rank checkpoint of it: ours "
          f"{statistics.median(results['ours_s']):.2f} s, DeepSpeed's ds_to_universal {statistics.median(results['ds_to_universal_s']):.2f} s "
          f"({ratios['ours_vs_ds_to_universal']:.2f}x)")
    assert ratios["convert_and_load_s"] > 0
