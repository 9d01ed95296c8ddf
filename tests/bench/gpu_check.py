"""Issue 19's GPU part as one prepared run, for a lent GPU machine (it is not part of `make bench`: no GPU here).

1. `tokfleet train` of the GPT `full` flavor (20 x 1280, vocab 65,536: 561M parameters) on the stdlib
   shards packed at 2,048 tokens: bf16 with `engine.compile` on, then bf16 eager, then fp16 (grad scaler);
   tokens/s and MFU from metrics.jsonl (the peak is the datasheet's, named in `peak_source`).
2. Resume on the GPU: a bf16 run stopped at step 6 and resumed (`--resume auto`) against the same run
   straight through (single-device engine), and the same under Accelerate FSDP2 (`accelerate launch`, one
   process, NCCL): losses step by step.
3. One bf16 training step of each tokenizer and of each FlatGPT variant at its `full` flavor (single-device
   engine, fused AdamW), then the tokenizers encode a batch as a pretokenize actor does (no Ray on that
   machine): step time, encode time, peak memory.

    python tests/bench/gpu_check.py --dataset DIR --out DIR            # on the GPU
    python tests/bench/gpu_check.py --dataset DIR --out DIR --smoke    # here, on the CPU: debug flavors, same code

DIR of --dataset: `tokfleet prepare configs/text/stdlib_prepare.yaml --set shards.seq_len=2048`. Writes
OUT/gpu_check.json, and each run's log and metrics.jsonl beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "text" / "stdlib_gpt_small.yaml"
TOKENIZERS = ("totem", "BrainOmniCausalTokenizer", "BrainOmniCausalTokenizerSEANetChannelMix", "Vidtok", "VidtokRVQ")
FLATGPTS = ("FlatGPT", "FlatGPTEmbeds", "FlatGPTEmbedsRVQ", "FlatGPTMix", "FlatGPTMixRVQ", "FlatGPTRVQ")


def train_run(name: str, dataset: str, out: Path, runs: Path, settings: list[str], timeout_s: float) -> dict:
    """One `tokfleet train` of the GPT under runs/NAME; its logged records (after the first, which holds
    compilation). Its log and metrics.jsonl are copied to out/NAME.log and out/NAME.metrics.jsonl."""
    run_dir = runs / name
    settings = [f"data.dataset={dataset}", f"run.output_dir={run_dir}", f"run.name={name}", "logging.wandb=false",
                "logging.progress=false", "checkpoint.every_steps=0", "checkpoint.save_final=false", "data.val_split=", *settings]
    command = [sys.executable, "-m", "launch.cli", "train", str(CONFIG), *(part for setting in settings for part in ("--set", setting))]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    seconds = time.perf_counter() - start
    (out / f"{name}.log").write_text(result.stdout[-20000:] + result.stderr[-20000:])
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}",
                "seconds": seconds}
    metrics = (run_dir / "metrics.jsonl").read_text()
    (out / f"{name}.metrics.jsonl").write_text(metrics)
    records = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    steady = [record for record in records[1:] if "tokens_per_s" in record] or records
    best = max(steady, key=lambda record: record.get("tokens_per_s", 0))
    return {"seconds": seconds, "steps": records[-1]["step"], "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "tokens_per_s": [round(record["tokens_per_s"]) for record in steady],
            "mfu": [round(record.get("mfu", 0.0), 4) for record in steady], "best_mfu": best.get("mfu"),
            "peak_flops": best.get("peak_flops"), "peak_source": best.get("peak_source"),
            "loss_scale": [record.get("loss_scale") for record in records], "compile": [line for line in result.stderr.splitlines() if "compil" in line][-3:]}


def resume_check(name: str, dataset: str, out: Path, runs: Path, launcher: list[str], settings: list[str], timeout_s: float) -> dict:
    """gpt small, 12 steps straight vs stopped at 6 and resumed: the per-step losses of both."""
    common = [f"data.dataset={dataset}", "logging.wandb=false", "logging.progress=false", "logging.every_steps=1",
              "checkpoint.every_steps=6", "eval.every_steps=0", "data.val_split=", "run.max_steps=12", "optim.micro_batch_size=4",
              "engine.compile=false", *settings]

    def train(run: str, *extra: str) -> subprocess.CompletedProcess:
        values = [*common, f"run.output_dir={runs / run}", f"run.name={run}"]
        command = [*launcher, str(CONFIG), *(part for value in values for part in ("--set", value)), *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        with open(out / f"{name}.log", "a") as log:
            log.write(f"$ {' '.join(command)}\n{result.stdout[-6000:]}{result.stderr[-6000:]}\n")
        if result.returncode != 0:
            raise RuntimeError(f"{run} {' '.join(extra)}: exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
        return result

    def losses(run: str) -> dict[int, float]:
        lines = (runs / run / "metrics.jsonl").read_text().splitlines()
        return {record["step"]: record["loss"] for record in map(json.loads, filter(None, lines))}

    try:
        train(f"{name}-straight")
        train(f"{name}-resumed", "--stop-at-step", "6")
        train(f"{name}-resumed", "--resume", "auto")
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        return {"error": str(error)[:500]}
    straight, resumed = losses(f"{name}-straight"), losses(f"{name}-resumed")
    return {"straight": straight, "resumed": resumed, "steps_equal": sorted(straight) == sorted(resumed),
            "max_abs_diff": max(abs(straight[step] - resumed[step]) for step in straight if step in resumed),
            "bitwise": straight == resumed}


def batch_for(model, batch_size: int, device):
    """Forward keyword arguments that make a training loss: a tokenizer's nominal input, or FlatGPT codes."""
    import torch

    if hasattr(model, "example_inputs"):
        return model.example_inputs(batch_size=batch_size, device=device)
    length = min(model.max_positions, 256)
    idx = torch.randint(0, model.config.vocab_size, (batch_size, length, *model.token_shape), device=device)
    return {"idx": idx, "targets": idx}


def one_step(name: str, flavor: str, batch_size: int, device, precision: str) -> dict:
    """One training step of `name` at `flavor` on the single-device engine, then (tokenizers) one encode."""
    import torch

    from core.config import EngineConfig, OptimConfig
    from modeling.registry import build_model
    from trainer.engines.single import SingleDeviceEngine

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(name, flavor, device=device)
    engine = SingleDeviceEngine(model, OptimConfig(), EngineConfig(precision=precision, compile=False), max_steps=10, device=device)
    batch = batch_for(model, batch_size, device)
    times, losses = [], []
    for _ in range(3):  # the first holds cuDNN's autotuning and the allocator's growth
        start = time.perf_counter()
        losses.append(float(engine.forward_backward(batch, 1.0)))
        engine.optimizer_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = {"parameters": sum(p.numel() for p in model.parameters()), "batch": batch_size,
           "input": {key: list(value.shape) for key, value in batch.items()},
           "step_s": round(min(times[1:]), 4), "first_step_s": round(times[0], 3), "losses": [round(x, 4) for x in losses]}
    if hasattr(model, "tokenize"):
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=engine.autocast_dtype):
            for _ in range(2):
                start = time.perf_counter()
                codes = model.tokenize(**batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            row["encode_s"] = round(time.perf_counter() - start, 4)
            row["codes"] = list(codes.shape) if hasattr(codes, "shape") else type(codes).__name__
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True, help="gpu_check.json and each run's log and metrics.jsonl")
    parser.add_argument("--runs", default=None, help="the runs' directories (default: OUT/runs)")
    parser.add_argument("--smoke", action="store_true", help="debug flavors on the CPU: checks this script, measures nothing")
    parser.add_argument("--only", choices=("train", "resume", "steps"), default=None)
    parser.add_argument("--runs-named", nargs="*", default=None, help="only these train runs")
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    results: dict = {"device": "cpu" if smoke else torch.cuda.get_device_name(0), "torch": torch.__version__}

    def save(name: str):
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
        print(name, json.dumps(results[name])[:1500], flush=True)

    if args.only in (None, "train"):
        flavor = ["model.flavor=debug", "run.max_steps=4", "logging.every_steps=2", "optim.micro_batch_size=2"] if smoke else \
            ["model.flavor=full", "model.args.vocab_size=65536", "optim.micro_batch_size=16", "logging.every_steps=5"]
        device_setting = ["run.device=cpu"] if smoke else ["run.device=cuda"]
        runs = {"bf16_compiled": (["engine.precision=bf16", "engine.compile=true", f"run.max_steps={4 if smoke else 40}"], 300),
                "bf16_eager": (["engine.precision=bf16", "engine.compile=false", f"run.max_steps={4 if smoke else 20}"], 150),
                "fp16_eager": (["engine.precision=fp16", "engine.compile=false", f"run.max_steps={4 if smoke else 20}"], 150),
                # compile with gradient checkpointing (and twice the micro-batch it frees memory for), and in fp16
                "bf16_compiled_ckpt": (["engine.precision=bf16", "engine.compile=true", "model.args.use_gradient_checkpointing=true",
                                        *([] if smoke else ["optim.micro_batch_size=32"]), f"run.max_steps={4 if smoke else 20}"], 240),
                "fp16_compiled": (["engine.precision=fp16", "engine.compile=true", f"run.max_steps={4 if smoke else 20}"], 240)}
        for name, (settings, timeout_s) in runs.items():
            if args.runs_named and name not in args.runs_named:
                continue
            results[name] = train_run(name, args.dataset, out, Path(args.runs or out / "runs"), [*flavor, *device_setting, *settings], timeout_s * (3 if smoke else 1))
            save(name)
    if args.only in (None, "resume"):
        runs_dir = Path(args.runs or out / "runs")
        flavor = ["model.flavor=debug"] if smoke else ["model.flavor=small", "engine.precision=bf16"]
        device_setting = ["run.device=cpu"] if smoke else ["run.device=cuda"]
        results["resume_single"] = resume_check("resume_single", args.dataset, out, runs_dir, [sys.executable, "-m", "trainer"],
                                                [*flavor, *device_setting], 300)
        save("resume_single")
        # FSDP2 under accelerate, one process: NCCL on the GPU (gloo on a CPU)
        accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
                      "--num_processes", "1", "-m", "trainer"]
        results["resume_fsdp"] = resume_check("resume_fsdp", args.dataset, out, runs_dir, accelerate,
                                              [*flavor, "engine.kind=accelerate"], 300)
        save("resume_fsdp")
    if args.only in (None, "steps"):
        flavor = "debug" if smoke else "full"
        for name in (*TOKENIZERS, *FLATGPTS):
            try:
                results[f"step_{name}"] = one_step(name, flavor, 2 if smoke else 8, device, "bf16")
            except Exception as error:  # noqa: BLE001 - one model's failure is a result; the rest still run
                results[f"step_{name}"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            save(f"step_{name}")


if __name__ == "__main__":
    main()
