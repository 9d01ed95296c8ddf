"""Benchmark: what the multi-process engines cost on CPU (gloo, 2 ranks): memory per rank, step
throughput of 2 ranks against 1, and checkpoint save/load time against plain torch.save/torch.load.

1. Memory. The same 97.5M-parameter GPT (fp32, sequence 64, micro-batch 1) trains 3 steps under DDP
   (accelerate), ZeRO-2 and ZeRO-3 (deepspeed), and ZeRO-3 once more with DeepSpeed's big default reduce bucket. Each
   rank is this file run as a driver under torchrun: it builds `trainer.loop.Trainer` and calls
   `train()` (the loop `python -m trainer` runs) and reads its own /proc/self/status: VmRSS right
   after importing torch, deepspeed, accelerate and the trainer (the baseline), VmHWM of the build
   (model + engine), VmRSS as each optimizer step begins (backward done, activations freed, gradients
   reduced, Adam states there from the second step on: parameters + gradients + optimizer states held
   at once, plus the engine's buffers), and VmHWM of training (reset after the build with
   `clear_refs` 5). Everything is reported above the baseline, so imports, the interpreter and the
   libraries' code pages drop out. The ranks run with a fixed glibc mmap threshold, so a freed tensor
   leaves the resident set at once and RSS tracks live bytes rather than what malloc keeps. The
   reference is the textbook fp32 count of parameters + gradients + Adam states per rank: DDP 16 B per
   parameter, ZeRO-2 4 + 12/W, ZeRO-3 16/W.
2. Throughput. A 7.3M GPT under DDP with the same micro-batch per rank on 1 rank and on 2 ranks, one
   thread per rank (`python -m trainer` under torchrun), in alternating rounds. Tokens/s is
   metrics.jsonl's global `tokens_per_s`, the median of the steps after warm-up; on 2 cores perfect
   scaling would be 2x, less the gradient all-reduce and whatever else runs on the machine.
3. Checkpoints. The drivers of the first three engines, after training, time `Trainer.save_checkpoint()`
   (the atomic, fsynced CheckpointManager save) and `engine.load_checkpoint()` against torch.save (+
   fsync) and torch.load of fp32 tensors of the same byte counts, written and read by the same ranks
   as the engine's files (a file every rank reads written by rank 0 and read by all, a rank's ZeRO
   shard by that rank alone). Rounds interleave both; the ratio is the median of the rounds' ratios.
   Reads come from the page cache: the files were just written.

Numbers: tests/bench/results/distributed.json, and the tables printed at the end.

    make bench   (or: python -m core.netns -- python -m pytest -s tests/bench/test_distributed_bench.py)
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

RESULTS = Path(__file__).parent / "results"
TIMEOUT = 300  # seconds per launcher run
NUM_RANKS = 2
ENGINES = {  # name -> engine config; each also gets its checkpoints timed
    "ddp": {"kind": "accelerate", "strategy": "ddp"},
    "zero2": {"kind": "deepspeed", "zero_stage": 2},
    "zero3": {"kind": "deepspeed", "zero_stage": 3},
}
# Memory only: ZeRO-3 with DeepSpeed's default 5e8-element reduce bucket (a 2 GB fp32 buffer that every
# gradient passes through, so ~4 B/param of it become resident) instead of tokfleet's 2e7 default:
# how much of ZeRO-3's footprint is that one setting.
MEMORY_VARIANTS = {"zero3 bucket 5e8": ("zero3", {"zero_optimization": {"stage": 3, "reduce_bucket_size": 500_000_000}})}
SEQ_LEN = 64
VOCAB_SIZE = 8192
# 12 x 12 x 768^2 in the blocks + 2 x 8192 x 768 (embedding, lm_head): 97.5M parameters
BIG_MODEL = {"n_layer": 12, "n_head": 12, "n_kv_head": 12, "n_embd": 768}
MEMORY_STEPS = 3
CHECKPOINT_ROUNDS = 3
# 4 x 4 x 12 x 256^2 + 2 x 8192 x 256: 7.3M parameters
THROUGHPUT_MODEL = {"n_layer": 4, "n_head": 4, "n_kv_head": 4, "n_embd": 256}
THROUGHPUT_MICRO_BATCH = 8
THROUGHPUT_STEPS = 16
THROUGHPUT_ROUNDS = 2
WARMUP_STEPS = 4  # records before these are dropped: first-step allocations, gloo's first buffers
# glibc: allocations above 128 KiB always go to mmap and back to the kernel on free (a fixed
# threshold also stops glibc from raising it, which would park freed tensors in the heap)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
MIB = 2**20


# ---------------------------------------------------------------------------------- rank driver


def memory_status() -> dict[str, int]:
    """This process's resident set now (rss) and its peak since start or the last reset (peak), in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak": int(fields["VmHWM"].split()[0]) * 1024}


def reset_peak() -> bool:
    """Start VmHWM over from the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def record_at_optimizer_steps(engine) -> list[dict[str, int]]:
    """Memory as each optimizer step begins: backward done (activations freed), gradients reduced,
    the optimizer's states there since the first step: the moment parameters, gradients and optimizer
    states are all held at once."""
    samples = []
    optimizer_step = engine.optimizer_step

    def recording_optimizer_step():
        samples.append(memory_status())
        return optimizer_step()

    engine.optimizer_step = recording_optimizer_step  # this instance only; the loop calls engine.optimizer_step()
    return samples


def timed(function) -> tuple[float, object]:
    """Seconds of a collective step, barrier to barrier: the time the slowest rank needed."""
    from trainer import distributed

    distributed.barrier()
    start = time.perf_counter()
    result = function()
    distributed.barrier()
    return time.perf_counter() - start, result


def owner_rank(name: str) -> int | None:
    """The rank that alone writes and reads a checkpoint file; None for a file rank 0 writes and every rank reads."""
    match = re.search(r"zero_pp_rank_(\d+)_", name)
    return int(match.group(1)) if match else None


def checkpoint_bytes(directory: Path, world_size: int) -> dict[str, int]:
    """Bytes of the engine's files: "shared" (written by rank 0, read by every rank) and "rank<r>" (rank r's own)."""
    from trainer.checkpoint import COMPLETE_MARKER, STATE_FILE

    sizes = {"shared": 0, **{f"rank{r}": 0 for r in range(world_size)}}
    for path in directory.rglob("*"):
        if path.is_file() and path.name not in (STATE_FILE, COMPLETE_MARKER):
            owner = owner_rank(path.name)
            sizes["shared" if owner is None else f"rank{owner}"] += path.stat().st_size
    return sizes


def plain_state(num_bytes: int) -> dict:
    """fp32 tensors of num_bytes in all, 64 MiB each at most: a stand-in state dict."""
    import torch

    num_elements, chunk = num_bytes // 4, 16 * MIB
    return {f"tensor{i}": torch.full((min(chunk, num_elements - start),), 0.5) for i, start in enumerate(range(0, num_elements, chunk))}


def time_plain_files(scratch: Path, sizes: dict[str, int], rank: int) -> tuple[float, float]:
    """torch.save + fsync, then torch.load, of the files this rank writes and reads in the engine's checkpoint."""
    import torch

    writes = {name: size for name, size in sizes.items() if size and (name == f"rank{rank}" or (name == "shared" and rank == 0))}
    reads = [name for name, size in sizes.items() if size and name in ("shared", f"rank{rank}")]
    states = {name: plain_state(size) for name, size in writes.items()}

    def save():
        for name, state in states.items():
            with open(scratch / f"{name}.pt", "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())

    save_s, _ = timed(save)
    states.clear()
    load_s, _ = timed(lambda: [torch.load(scratch / f"{name}.pt", weights_only=True) for name in reads])
    return save_s, load_s


def time_checkpoints(trainer, num_rounds: int, scratch: Path) -> list[dict]:
    import shutil

    from trainer import distributed

    rank, world_size = trainer.engine.rank, trainer.engine.world_size
    rounds = []
    for _ in range(num_rounds):
        trainer.step += 1  # a new step folder each round: the timed save replaces and prunes nothing
        save_s, path = timed(trainer.save_checkpoint)
        load_s, _ = timed(lambda: trainer.engine.load_checkpoint(path, world_size))
        sizes = checkpoint_bytes(path, world_size)
        plain_save_s, plain_load_s = time_plain_files(scratch, sizes, rank)
        rounds.append({"save_s": save_s, "load_s": load_s, "plain_save_s": plain_save_s, "plain_load_s": plain_load_s,
                       "bytes": sizes})
        distributed.barrier()
        if rank == 0:
            shutil.rmtree(path)
            for stale in scratch.glob("*.pt"):
                stale.unlink()
        distributed.barrier()
    return rounds


def rank_main(config_path: str, out_dir: str, num_rounds: int) -> None:
    """One rank: train the config's steps, report memory at each phase, then time checkpoints."""
    import accelerate  # noqa: F401  the engines import these lazily; every engine's baseline holds both
    import deepspeed  # noqa: F401

    from core.config import TrainConfig, load_config
    from trainer import distributed
    from trainer.loop import Trainer

    after_imports = memory_status()
    start = time.perf_counter()
    trainer = Trainer(load_config(config_path, TrainConfig, []))
    built, build_s = memory_status(), time.perf_counter() - start
    is_peak_reset = reset_peak()
    at_steps = record_at_optimizer_steps(trainer.engine)
    start = time.perf_counter()
    summary = trainer.train()
    trained, train_s = memory_status(), time.perf_counter() - start
    report = {"rank": trainer.engine.rank, "num_params": trainer.num_params, "after_imports": after_imports, "built": built,
              "trained": trained, "is_peak_reset": is_peak_reset, "loss": summary["last"].get("loss"),
              "at_steps": at_steps, "build_s": build_s, "train_s": train_s}
    scratch = Path(out_dir) / "plain"
    scratch.mkdir(parents=True, exist_ok=True)
    report["checkpoint_rounds"] = time_checkpoints(trainer, num_rounds, scratch)
    (Path(out_dir) / f"rank{trainer.engine.rank}.json").write_text(json.dumps(report))
    distributed.shutdown()


# ------------------------------------------------------------------------------------ launching


def rank_env(**extra: str) -> dict[str, str]:
    """test_distributed's launcher environment (DS_ACCELERATOR=cpu, one thread per rank), plus `extra`."""
    from test_distributed import env  # tests/ is on the path under pytest, not in the rank driver

    return {**env(), **extra}


def run_checked(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return time.perf_counter() - start


def write_config(root: Path, dataset: str, name: str, engine: dict, model_args: dict, *, micro: int, steps: int) -> Path:
    config = {
        "run": {"name": name, "output_dir": str(root / name), "max_steps": steps, "seed": 0, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "small", "args": {**model_args, "vocab_size": VOCAB_SIZE, "sequence_len": SEQ_LEN}},
        "data": {"dataset": dataset, "num_streams": 4, "val_split": ""},
        "optim": {"micro_batch_size": micro, "grad_accum_steps": 1, "warmup_steps": 1},
        "engine": {"peak_flops": 1e11, **engine},  # a fixed peak: measuring it would take seconds per run
        "checkpoint": {"every_steps": 0, "save_final": False, "keep_last": 100},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 0},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(num_ranks: int, *target: str) -> list[str]:
    from launch.launchers import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_ranks}", f"--master_port={free_port()}", *target]


def format_table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value)

    cells = [headers] + [[cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ------------------------------------------------------------------------------------- the bench


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from conftest import write_token_dataset

    return write_token_dataset(tmp_path_factory.mktemp("datasets") / "bench-tokens", samples_per_shard=64, seq_len=SEQ_LEN,
                               vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def summary():
    """Each test's table and numbers; all printed together, and written as JSON, when the module ends."""
    found: dict[str, dict] = {}
    load_before = os.getloadavg()
    yield found
    # other work on the machine skews every number here: say how busy it was
    machine = {"num_cpus": os.cpu_count(), "load_average_1min_before": load_before[0], "load_average_1min_after": os.getloadavg()[0]}
    RESULTS.mkdir(exist_ok=True)
    results = {**{name: part["data"] for name, part in found.items()}, "machine": machine}
    (RESULTS / "distributed.json").write_text(json.dumps(results, indent=1))
    print("\n\n" + "\n\n".join(part["table"] for part in found.values()))
    print(f"\nmachine: {machine['num_cpus']} CPUs, 1-min load average {machine['load_average_1min_before']:.1f} before, "
          f"{machine['load_average_1min_after']:.1f} after")
    print(f"\n(written to {RESULTS / 'distributed.json'})")


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, dataset) -> dict[str, list[dict]]:
    """engine -> the rank reports of its 2-rank driver run (memory, then checkpoint rounds)."""
    root = tmp_path_factory.mktemp("engines")
    runs = {name: (engine, CHECKPOINT_ROUNDS) for name, engine in ENGINES.items()}
    for index, (name, (base, deepspeed_json)) in enumerate(MEMORY_VARIANTS.items()):
        json_path = root / f"variant{index}.json"
        json_path.write_text(json.dumps(deepspeed_json))
        runs[name] = ({**ENGINES[base], "deepspeed_config": str(json_path)}, 0)
    reports = {}
    for index, (name, (engine, num_rounds)) in enumerate(runs.items()):
        config = write_config(root, dataset, f"run{index}", engine, BIG_MODEL, micro=1, steps=MEMORY_STEPS)
        out_dir = root / f"run{index}-reports"
        run_checked(torchrun(NUM_RANKS, __file__, "--rank-driver", str(config), str(out_dir), str(num_rounds)), rank_env(**MALLOC_ENV))
        reports[name] = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(NUM_RANKS)]
    return reports


def textbook_bytes_per_param(engine: str, world_size: int) -> float:
    """Parameters + gradients + Adam's two states, fp32, per rank and parameter."""
    base = MEMORY_VARIANTS[engine][0] if engine in MEMORY_VARIANTS else engine
    return {"ddp": 16, "zero2": 4 + 12 / world_size, "zero3": 16 / world_size}[base]


def test_memory_per_rank(engine_runs, summary):
    data = {}
    for engine, reports in engine_runs.items():
        num_params = reports[0]["num_params"]

        def above_base(measure) -> int:  # the worse rank
            return max(measure(r) - r["after_imports"]["rss"] for r in reports)

        data[engine] = {
            "num_params": num_params, "baseline_rss": max(r["after_imports"]["rss"] for r in reports),
            "init_peak": above_base(lambda r: r["built"]["peak"]),
            "at_step": above_base(lambda r: r["at_steps"][-1]["rss"]),  # the last step's: Adam states exist
            "train_peak": above_base(lambda r: r["trained"]["peak"]),
            "after_train": above_base(lambda r: r["trained"]["rss"]),
            "textbook": textbook_bytes_per_param(engine, NUM_RANKS) * num_params,
            "is_peak_reset": all(r["is_peak_reset"] for r in reports), "ranks": reports,
        }
    rows = []
    for engine, d in data.items():
        ddp = data["ddp"]
        for key in ("at_step", "train_peak", "textbook"):
            d[f"{key}_vs_ddp"] = d[key] / ddp[key]
        rows.append([engine, f"{d['num_params'] / 1e6:.1f}M", d["baseline_rss"] / MIB, d["init_peak"] / MIB, d["at_step"] / MIB,
                     d["train_peak"] / MIB, d["after_train"] / MIB, d["at_step"] / d["num_params"], d["textbook"] / d["num_params"],
                     d["at_step_vs_ddp"], d["train_peak_vs_ddp"], d["textbook_vs_ddp"]])
    table = format_table(["engine", "params", "base MiB", "init pk", "at step", "train pk", "after", "step B/p", "book B/p",
                          "step/ddp", "pk/ddp", "book/ddp"], rows)
    title = (f"Memory per rank, {NUM_RANKS} ranks, fp32, seq {SEQ_LEN}, micro-batch 1, {MEMORY_STEPS} steps: MiB above 'base' "
             "(RSS after imports), worse rank.\n'at step': RSS as the last optimizer step begins (params + grads + Adam states held); "
             "'book': textbook params + grads + Adam. Goal: ZeRO-3 <= 0.55x DDP (book 0.5)")
    summary["memory"] = {"table": title + "\n" + table, "data": data}
    for d in data.values():
        assert 0 < d["at_step"] <= d["train_peak"] and all(r["loss"] == r["loss"] for r in d["ranks"])  # loss not NaN
    assert data["zero3"]["at_step"] < data["ddp"]["at_step"]  # partitioning must save something


def test_checkpoint_time_vs_torch_save(engine_runs, summary):
    rows, data = [], {}
    for engine in ENGINES:
        rounds = engine_runs[engine][0]["checkpoint_rounds"]  # barrier to barrier: rank 0's time is the collective's
        save_ratios = [r["save_s"] / r["plain_save_s"] for r in rounds]
        load_ratios = [r["load_s"] / r["plain_load_s"] for r in rounds]
        total_bytes = sum(rounds[0]["bytes"].values())
        d = {key: statistics.median(r[key] for r in rounds) for key in ("save_s", "plain_save_s", "load_s", "plain_load_s")}
        d.update({"rounds": rounds, "total_bytes": total_bytes,
                  "save_ratio": statistics.median(save_ratios), "load_ratio": statistics.median(load_ratios)})
        data[engine] = d
        rows.append([engine, total_bytes / MIB, d["save_s"], d["plain_save_s"], d["save_ratio"], d["load_s"], d["plain_load_s"],
                     d["load_ratio"], " ".join(f"{k}={v / MIB:.0f}" for k, v in rounds[0]["bytes"].items())])
    table = format_table(["engine", "MiB", "save s", "torch.save s", "ratio", "load s", "torch.load s", "ratio", "MiB by writer"], rows)
    title = (f"Checkpoint save/load, {NUM_RANKS} ranks, {CHECKPOINT_ROUNDS} rounds (median); plain = torch.save + fsync / torch.load "
             "of the same bytes by the same ranks. Goal: ratio <= 1.5")
    summary["checkpoint"] = {"table": title + "\n" + table, "data": data}
    for d in data.values():
        assert d["save_s"] > 0 and d["load_s"] > 0 and d["total_bytes"] > 0


def test_two_ranks_vs_one_throughput(tmp_path, dataset, summary):
    from trainer.metrics import read_metrics

    def tokens_per_s(num_ranks: int, num_threads: int, round_index: int) -> tuple[float, float]:
        name = f"ddp-{num_ranks}rank-{num_threads}thread-{round_index}"
        config = write_config(tmp_path, dataset, name, ENGINES["ddp"], THROUGHPUT_MODEL, micro=THROUGHPUT_MICRO_BATCH,
                              steps=THROUGHPUT_STEPS)
        wall_s = run_checked(torchrun(num_ranks, "-m", "trainer", str(config)), rank_env(OMP_NUM_THREADS=str(num_threads)))
        records = read_metrics(tmp_path / name / "metrics.jsonl")
        assert [r["world_size"] for r in records] == [num_ranks] * THROUGHPUT_STEPS
        return statistics.median(r["tokens_per_s"] for r in records[WARMUP_STEPS:]), wall_s

    # (ranks, threads per rank), the same micro-batch per rank. Rounds run every setup back to back, so
    # a load change on the machine hits a round's runs alike. (1 rank with 2 threads is left out: with
    # other work on the 2 cores, OpenMP's spinning threads fell to 1/15 of the 1-thread speed.)
    setups = [(1, 1), (2, 1)]
    measured = {setup: [] for setup in setups}
    for round_index in range(THROUGHPUT_ROUNDS):
        for setup in setups:
            measured[setup].append(tokens_per_s(*setup, round_index))
    two = [tps for tps, _ in measured[2, 1]]
    rows, runs = [], []
    for (ranks, threads), results in measured.items():
        ratio = statistics.median(t / tps for t, (tps, _) in zip(two, results))
        median_tps = statistics.median(tps for tps, _ in results)
        rows.append([ranks, threads, median_tps, ratio, " ".join(f"{tps:.0f}" for tps, _ in results)])
        runs.append({"ranks": ranks, "threads_per_rank": threads, "tokens_per_s": median_tps, "two_ranks_vs_this": ratio,
                     "rounds": [{"tokens_per_s": tps, "wall_s": wall_s} for tps, wall_s in results]})
    data = {"model": THROUGHPUT_MODEL, "vocab_size": VOCAB_SIZE, "seq_len": SEQ_LEN, "micro_batch_per_rank": THROUGHPUT_MICRO_BATCH,
            "steps": THROUGHPUT_STEPS, "warmup_steps_dropped": WARMUP_STEPS, "num_cpus": os.cpu_count(), "runs": runs}
    table = format_table(["ranks", "threads/rank", "tokens/s", "2 ranks / this", "tokens/s by round"], rows)
    title = (f"Throughput, DDP, GPT {THROUGHPUT_MODEL} vocab {VOCAB_SIZE} seq {SEQ_LEN}, micro-batch {THROUGHPUT_MICRO_BATCH} per "
             f"rank, {os.cpu_count()} CPUs; global tokens/s from metrics.jsonl, median of steps {WARMUP_STEPS + 1}-{THROUGHPUT_STEPS}, "
             f"median of {THROUGHPUT_ROUNDS} rounds")
    summary["throughput"] = {"table": title + "\n" + table, "data": data}
    assert all(tps > 0 for results in measured.values() for tps, _ in results)


if __name__ == "__main__" and sys.argv[1:2] == ["--rank-driver"]:
    rank_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
