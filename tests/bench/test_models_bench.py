"""Benchmark: the mission's models at full size under ZeRO-3, and the throughput of the small ones.

1. One training step of the `full` TokCom denoiser (`tokcom_diffusion`: the 24-layer adaLN-Zero
   denoiser trained through the frozen 24+24-layer VAE, 1,254M parameters of which 481M train) and
   of a `full` FlatGPT (24 layers, Qwen2.5-0.5B-shaped, 415M) under DeepSpeed ZeRO-3 on 2 CPU ranks
   (gloo, fp32, micro-batch 1, sequence 1024). Each rank is this file run as a driver under
   torchrun: it builds `trainer.loop.Trainer` and trains 2 steps. Reported per rank: peak resident
   memory of training (VmHWM, reset after the build, which materialises the whole model before
   ZeRO-3 partitions it; absolute and above the RSS after imports), the build's peak, and the RSS
   as the second optimizer step begins; seconds per step and MFU of the second step from metrics.jsonl (MFU against the fp32
   matmul peak this machine measures at the start).
2. Tokens/s of the `debug`/`small` flavors on one process (`python -m trainer`, fp32, CPU): the
   median of metrics.jsonl's tokens_per_s over the steps after warm-up.

Numbers: tests/bench/results/models.json, and the tables printed at the end.

    make bench   (or: python -m core.netns -- python -m pytest -s tests/bench/test_models_bench.py)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import yaml

RESULTS = Path(__file__).parent / "results"
NUM_RANKS = 2
FULL_SEQ_LEN = 1024
FULL_VOCAB = 32016  # the CodeLlama tokenizer TokCom's seed uses
FULL_STEPS = 2
FULL_MODELS = {  # name -> (model, flavor, args); activations recomputed per block, as such models train
    "tokcom_diffusion full": ("tokcom_diffusion", "full", {"vae_checkpoint": None, "use_gradient_checkpointing": True}),  # a random frozen VAE
    "FlatGPT full": ("FlatGPT", "full", {"use_gradient_checkpointing": True}),
}
SMALL_SEQ_LEN = 256
SMALL_VOCAB = 8192
SMALL_STEPS = 12
WARMUP_STEPS = 4
SMALL_MODELS = {
    "gpt small": ("gpt", "small", {}),
    "tokcom_vae small": ("tokcom_vae", "small", {}),
    "tokcom_diffusion small": ("tokcom_diffusion", "small", {"vae_checkpoint": None}),
    "FlatGPT debug": ("FlatGPT", "debug", {}),
    "FlatGPTEmbeds debug": ("FlatGPTEmbeds", "debug", {}),
}
MIB = 2**20


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def rank_main(config_path: str, out_dir: str) -> None:
    """One rank: train the config's steps; report memory (build, each optimizer step, peak)."""
    import deepspeed  # noqa: F401  imported before the baseline, as the engine needs it

    from core.config import TrainConfig, load_config
    from test_distributed_bench import memory_status, record_at_optimizer_steps, reset_peak
    from trainer import distributed
    from trainer.loop import Trainer

    after_imports = memory_status()
    start = time.perf_counter()
    trainer = Trainer(load_config(config_path, TrainConfig, []))
    built, build_s = memory_status(), time.perf_counter() - start
    is_peak_reset = reset_peak()  # the build materialises the whole model before ZeRO-3 partitions it
    at_steps = record_at_optimizer_steps(trainer.engine)
    summary = trainer.train()
    report = {"rank": trainer.engine.rank, "num_params": trainer.num_params, "after_imports": after_imports,
              "built": built, "at_steps": at_steps, "trained": memory_status(), "build_s": build_s,
              "is_peak_reset": is_peak_reset, "loss": summary["last"].get("loss")}
    (Path(out_dir) / f"rank{trainer.engine.rank}.json").write_text(json.dumps(report))
    distributed.shutdown()


def write_config(root: Path, name: str, dataset: str, model: tuple, *, engine: dict, steps: int, peak_flops: float) -> Path:
    model_name, flavor, args = model
    config = {
        "run": {"name": name, "output_dir": str(root / name.replace(" ", "-")), "max_steps": steps, "seed": 0, "device": "cpu"},
        "model": {"name": model_name, "flavor": flavor, "args": args},
        "data": {"dataset": dataset, "num_streams": 4, "val_split": ""},
        "optim": {"micro_batch_size": 1, "grad_accum_steps": 1, "warmup_steps": 1},
        "engine": {"peak_flops": peak_flops, **engine},
        "checkpoint": {"every_steps": 0, "save_final": False},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 0},
    }
    path = root / f"{name.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def peak_flops() -> float:
    import torch

    from trainer.metrics import measure_peak_flops

    torch.set_num_threads(1)  # one rank's share: each rank runs one thread
    return measure_peak_flops(torch.device("cpu"), seconds=2.0)


@pytest.fixture(scope="module")
def summary():
    found: dict[str, dict] = {}
    yield found
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "models.json").write_text(json.dumps({name: part["data"] for name, part in found.items()}, indent=1))
    print("\n\n" + "\n\n".join(part["table"] for part in found.values()))
    print(f"\n(written to {RESULTS / 'models.json'})")


def test_full_models_one_zero3_step_on_two_ranks(tmp_path, peak_flops, summary):
    from conftest import write_token_dataset
    from test_distributed_bench import format_table, rank_env, run_checked, torchrun

    dataset = write_token_dataset(tmp_path / "tokens", num_shards=4, samples_per_shard=2, val_samples=1,
                                  seq_len=FULL_SEQ_LEN, vocab_size=FULL_VOCAB)
    rows, data, failures = [], {}, {}
    for name, model in FULL_MODELS.items():
        config = write_config(tmp_path, name, dataset, model, engine={"kind": "deepspeed", "zero_stage": 3},
                              steps=FULL_STEPS, peak_flops=peak_flops)
        out_dir = tmp_path / f"{name.replace(' ', '-')}-reports"
        out_dir.mkdir()
        try:
            run_checked(torchrun(NUM_RANKS, __file__, "--rank-driver", str(config), str(out_dir)), rank_env())
        except AssertionError as error:  # e.g. a rank killed for memory: say so, measure the others
            failures[name] = str(error).splitlines()[-1][:300]
            rows.append([name, "failed", "", "", "", "", "", "", ""])
            continue
        reports = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(NUM_RANKS)]
        last = read_metrics(Path(yaml.safe_load(config.read_text())["run"]["output_dir"]))[-1]
        tokens_per_step = NUM_RANKS * FULL_SEQ_LEN
        worst = max(reports, key=lambda r: r["trained"]["peak"])
        d = {
            "num_params": reports[0]["num_params"], "peak_rss": worst["trained"]["peak"],
            "peak_above_imports": worst["trained"]["peak"] - worst["after_imports"]["rss"],
            "at_step": max(r["at_steps"][-1]["rss"] - r["after_imports"]["rss"] for r in reports),
            "seconds_per_step": tokens_per_step / last["tokens_per_s"], "mfu": last["mfu"], "loss": last["loss"],
            "build_peak": max(r["built"]["peak"] for r in reports),
            "build_s": max(r["build_s"] for r in reports), "peak_flops_per_rank": peak_flops, "ranks": reports,
        }
        data[name] = d
        rows.append([name, f"{d['num_params'] / 1e6:,.0f}M", d["peak_rss"] / MIB, d["peak_above_imports"] / MIB,
                     d["at_step"] / MIB, d["seconds_per_step"], f"{d['mfu']:.1%}", d["build_peak"] / MIB, d["build_s"]])
        assert last["step"] == FULL_STEPS and last["loss"] == last["loss"]
    table = format_table(["model", "params", "peak RSS MiB", "peak above imports", "RSS at step 2", "s/step", "MFU", "build peak", "build s"], rows)
    title = (f"Full flavors, one ZeRO-3 step on {NUM_RANKS} CPU ranks (gloo, fp32, micro-batch 1, sequence {FULL_SEQ_LEN}); "
             f"memory of the worse rank; MFU vs {peak_flops / 1e9:.0f} GFLOP/s per rank (measured fp32 matmul)")
    summary["full"] = {"table": title + "\n" + table, "data": {**data, "failures": failures}}
    assert not failures, failures


def test_small_flavors_tokens_per_second(tmp_path, peak_flops, summary):
    import subprocess

    from conftest import write_token_dataset
    from test_distributed_bench import format_table, rank_env

    dataset = write_token_dataset(tmp_path / "tokens", num_shards=4, samples_per_shard=16, seq_len=SMALL_SEQ_LEN,
                                  vocab_size=SMALL_VOCAB)
    rows, data = [], {}
    for name, model in SMALL_MODELS.items():
        config = write_config(tmp_path, name, dataset, model, engine={"kind": "single"}, steps=SMALL_STEPS, peak_flops=peak_flops)
        result = subprocess.run([sys.executable, "-m", "trainer", str(config)], capture_output=True, text=True, env=rank_env(),
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        records = read_metrics(Path(yaml.safe_load(config.read_text())["run"]["output_dir"]))[WARMUP_STEPS:]
        d = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
             "mfu": statistics.median(r["mfu"] for r in records), "micro_batch": 1, "seq_len": SMALL_SEQ_LEN}
        data[name] = d
        rows.append([name, d["tokens_per_s"], f"{d['mfu']:.1%}"])
    table = format_table(["model", "tokens/s", "MFU"], rows)
    title = (f"Small flavors, one process, one thread, fp32 CPU, micro-batch 1 x {SMALL_SEQ_LEN} tokens; "
             f"median of steps {WARMUP_STEPS + 1}-{SMALL_STEPS}")
    summary["small"] = {"table": title + "\n" + table, "data": data}


if __name__ == "__main__" and sys.argv[1:2] == ["--rank-driver"]:
    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # test_distributed_bench, conftest
    rank_main(sys.argv[2], sys.argv[3])
