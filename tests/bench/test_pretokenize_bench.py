"""Pretokenize throughput: a plain single-process loop vs Ray Data actor pools of 1 and 2 actors.

The same raw MEG dataset (NUM_RECORDINGS synthetic recordings of Neuromag sensor triplets + EEG,
one raw shard each, made by `prepare_signals`) is tokenized by a `small` TOTEM (the shipped
pretokenize config's model; trained one step: the weights do not change the cost) four ways, in
interleaved rounds (odd rounds in reverse order) so that a change in the machine's load or speed
hits every way alike:

    plain   this process calls ShardTokenizer, the actors' own builder, shard after shard: read the
            raw shard, check its sha256, tokenize in batches of BATCH_SIZE, write the token shard and
            its sidecar. The same code as an actor, without Ray; torch is already imported here
            (an actor imports it, which counts against Ray).
    plain-2 two spawned processes (concurrent.futures), each importing torch and building a
            ShardTokenizer, then taking the next shard: the most 2 workers gain on this machine
            without Ray (the ceiling ray-2 / ray-1 is measured against).
    ray-1   `pretokenize_signals` with actors.num_actors 1
    ray-2   `pretokenize_signals` with actors.num_actors 2

Every way runs torch with ONE thread: actors.num_cpus is 1, so ShardTokenizer calls
torch.set_num_threads(1) in each actor, and the plain loop builds the same ShardTokenizer in this
process (in a thread at the Ray workers' niceness, see run_plain). Windows/s is wall time from
building the tokenizer (plain) or from after Ray is up (ray-N: the report's build_seconds, which
includes starting the actors) to the last shard written; best of NUM_ROUNDS, and the ratios of the
runs paired within a round (run back to back; their median), because this host's speed drifts
~20% from minute to minute. Ratios: ray-2 /
ray-1 with every actor at work (all_busy_rate: the throughput of a running pipeline; the goal,
>= 1.8 on 2 idle cores), from the first shard started to the last written (steady: adds the
stagger of the actors' starts and the tail where one actor has finished), and end to end (with the
fixed ~3-5 s before the first shard: Ray Data starting, each new actor process importing torch
and ray.data; a job of hours amortises it), and ray-1 / plain (what Ray costs one worker). Each run
starts once the CPUs are idle (settle): on 2 cores, the previous run's processes exiting would
otherwise land in the next one.
Cores at work (windows/s x CPU s per window while all workers are busy) cancels the host's speed and
leaves the share of the machine the workers had. Where the time went comes from the token
sidecars' per-shard records (describe_run): start-up,
not busy (wall - build seconds per worker: start-up, Ray Data dispatch, a tail where one actor
waits for the other), CPU ms per window and the CPU share (below 1: the workers waited for a
core, so the machine was not idle and the ratios say little), and the driver's CPU seconds
(Ray Data's executor; on 2 cores taken from the actors). Every way must write byte-identical
token shards.

    make bench     # or: pytest -s tests/bench/test_pretokenize_bench.py (inside `python -m core.netns --`)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import statistics
import threading
import time
from pathlib import Path

import pytest
import yaml

RESULTS = Path(__file__).parent / "results"
# 48 raw shards of 20 windows of 104 channels x 500 samples: ~35 s of work for one worker (TOTEM on
# a CPU encodes in cache-sized chunks: ~30 ms a window), so the fixed ~3-5 s before a Ray run's first
# shard (Ray Data start, the actors importing torch) still weighs ~10% of a 1-actor run
NUM_RECORDINGS, SECONDS, NUM_TRIPLETS = 48, 40.0, 32
SFREQ, WINDOW_S = 250.0, 2.0
BATCH_SIZE = 32
NUM_ROUNDS = 5
SETTLE_CPU_PERCENT, SETTLE_MAX_S = 10.0, 20.0


def settle() -> None:
    """Wait (up to SETTLE_MAX_S) until the machine's CPUs are idle for half a second: the previous run's
    processes exiting (and Ray starting spare workers after its actors die) must not land in this run,
    least of all on a 2-worker run that needs both cores."""
    import psutil

    deadline = time.perf_counter() + SETTLE_MAX_S
    while psutil.cpu_percent(interval=0.5) > SETTLE_CPU_PERCENT and time.perf_counter() < deadline:
        pass


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def process_cpu_s() -> float:
    """CPU seconds of this process, every thread (in a Ray run: the driver, i.e. Ray Data's executor)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_dataset(root: Path) -> str:
    """The raw dataset: recordings made at SFREQ and windowed without filters (the bench is about pretokenize)."""
    from core.config import MegConfig, PrepareConfig, ShardsConfig, SourceConfig
    from sharding.prepare_signals import prepare_signals
    from sharding.synthetic_meg import make_raw

    corpus = root / "recordings"
    corpus.mkdir()
    for index in range(NUM_RECORDINGS):
        raw = make_raw(seconds=SECONDS, sfreq=SFREQ, seed=index, num_triplets=NUM_TRIPLETS)
        raw.save(corpus / f"rec-{index:02d}_raw.fif", verbose="error")
    output = str(root / "windows")
    prepare_signals(PrepareConfig(
        source=SourceConfig(kind="meg", paths=[f"{corpus}/*.fif"]),
        meg=MegConfig(sfreq=SFREQ, l_freq=None, h_freq=None, window_s=WINDOW_S),
        shards=ShardsConfig(output=output, name="meg", source_bytes_per_shard=1, val_fraction=0.0),
    ), progress=False)
    return output


def train_tokenizer(dataset: str, root: Path) -> str:
    from core.config import TrainConfig, load_config
    from trainer.loop import Trainer

    run_dir = root / "totem"
    config = {
        "run": {"name": "totem", "output_dir": str(run_dir), "max_steps": 1, "seed": 3, "device": "cpu"},
        "model": {"name": "totem", "flavor": "small"},
        "data": {"dataset": dataset, "num_streams": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "micro_batch_size": 4},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 0},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 0, "num_batches": 1},
    }
    (root / "totem.yaml").write_text(yaml.safe_dump(config))
    Trainer(load_config(str(root / "totem.yaml"), TrainConfig, [])).train()
    return str(run_dir)


def pretokenize_config(dataset: str, checkpoint: str, output: str, num_actors: int):
    from core.config import (ActorPoolConfig, PretokenizeConfig, PretokenizeInputConfig, PretokenizeModelConfig,
                               TokenShardsConfig)

    return PretokenizeConfig(
        input=PretokenizeInputConfig(dataset=dataset),
        tokenizer=PretokenizeModelConfig(checkpoint=checkpoint, device="cpu"),
        shards=TokenShardsConfig(output=output, name="tok"),
        actors=ActorPoolConfig(num_actors=num_actors, num_cpus=1.0, batch_size=BATCH_SIZE),
    )


def ray_worker_niceness() -> int:
    """The niceness Ray gives its worker processes (the raylet's worker_niceness, 15 unless changed)."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote())


def run_plain(cfg, niceness: int) -> tuple[float, list[dict]]:
    """(seconds, sidecars) of the plain loop: the actors' builder, called shard after shard in a
    thread running at the Ray workers' niceness (Linux niceness is per thread; with one torch
    thread the tokenizer runs on the calling thread). On an idle machine niceness changes little;
    on a shared one a nice-0 loop would beat nice-15 actors just by outranking other jobs."""
    from sharding.pretokenize_signals import ShardTokenizer, plan_pretokenize, shard_tokenizer_kwargs
    from trainer.tokenizer_runner import describe_checkpoint

    info, _, specs = plan_pretokenize(cfg, describe_checkpoint)
    result: dict = {}

    def loop() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        start = time.perf_counter()
        builder = ShardTokenizer(**shard_tokenizer_kwargs(cfg, info, describe_checkpoint))  # torch.set_num_threads(1), as in an actor
        result["sidecars"] = [builder(dataclasses.asdict(spec)) for spec in specs]
        result["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    assert "seconds" in result, "the plain loop failed (its traceback is above)"
    return result["seconds"], result["sidecars"]


_process_builder = None  # plain-2: each process's ShardTokenizer


def _start_process(kwargs: dict, niceness: int) -> None:
    global _process_builder
    from sharding.pretokenize_signals import ShardTokenizer

    os.nice(niceness - os.nice(0))
    _process_builder = ShardTokenizer(**kwargs)


def _build_in_process(spec: dict) -> dict:
    return _process_builder(spec)


def run_plain_processes(cfg, niceness: int, num_workers: int = 2) -> tuple[float, list[dict]]:
    """(seconds, sidecars) of NUM_WORKERS plain processes (spawned like Ray's workers, each importing
    torch and building the tokenizer, then taking the next shard when done): what 2 workers can
    gain on this machine without Ray, so ray-2 / plain-2 is Ray's own cost at 2 workers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from sharding.pretokenize_signals import plan_pretokenize, shard_tokenizer_kwargs
    from trainer.tokenizer_runner import describe_checkpoint

    info, _, specs = plan_pretokenize(cfg, describe_checkpoint)
    start = time.perf_counter()
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_process,
                             initargs=(shard_tokenizer_kwargs(cfg, info, describe_checkpoint), niceness)) as pool:
        sidecars = list(pool.map(_build_in_process, [dataclasses.asdict(spec) for spec in specs]))
    return time.perf_counter() - start, sidecars


def run_ray(cfg) -> tuple[float, list[dict]]:
    from sharding import storage
    from sharding.pretokenize_signals import pretokenize_signals
    from trainer.tokenizer_runner import describe_checkpoint
    from sharding.shard_build import sidecar_name

    report = pretokenize_signals(cfg, describe_checkpoint, progress=False)
    sidecars = [json.loads(storage.read_text(storage.join(cfg.shards.output, sidecar_name(shard.name))))
                for shard in report.manifest.shards]
    return report.build_seconds, sidecars


def all_busy_rate(sidecars: list[dict]) -> float:
    """Windows/s while every worker was at work: from the last worker's first shard started to the
    first worker's last shard written (each worker's span from the sidecars' `worker` and times), each
    shard counting its windows pro rata to its time inside that interval. One worker: windows / its
    span. It leaves out the stagger of the workers' starts and the tail where one worker has finished
    and the other builds its last shard: both fixed per run, like the start-up."""
    spans: dict[str, tuple[float, float]] = {}
    for sidecar in sidecars:
        start, end = sidecar["started_at"], sidecar["started_at"] + sidecar["seconds"]
        first, last = spans.get(sidecar["worker"], (start, end))
        spans[sidecar["worker"]] = (min(first, start), max(last, end))
    begin, finish = max(first for first, _ in spans.values()), min(last for _, last in spans.values())
    if finish - begin < 1.0:
        return float("nan")  # no stretch with every worker busy (a worker built one short shard)
    windows = 0.0
    for sidecar in sidecars:
        start, end = sidecar["started_at"], sidecar["started_at"] + sidecar["seconds"]
        inside = min(end, finish) - max(start, begin)
        if inside > 0:
            windows += sidecar["num_samples"] * inside / max(end - start, 1e-9)
    return windows / (finish - begin)


def describe_run(seconds: float, sidecars: list[dict], num_workers: int, started_at: float) -> dict:
    """Throughput of one run, and where its wall time went (from the sidecars' per-shard records).

    busy: the shards' build seconds / workers; startup: run start -> first shard started (actors
    importing torch and loading the model); steady: first shard started -> last shard written,
    so windows / steady is the throughput once the workers are up; all busy: all_busy_rate (the
    goal's measure); cpu_share: the shards' CPU seconds / their wall seconds (below 1: the workers
    waited for a core, e.g. other jobs or Ray's own processes).
    """
    num_windows = sum(sidecar["num_samples"] for sidecar in sidecars)
    first = min(sidecar["started_at"] for sidecar in sidecars)
    steady = max(sidecar["started_at"] + sidecar["seconds"] for sidecar in sidecars) - first
    busy = sum(sidecar["seconds"] for sidecar in sidecars) / num_workers
    cpu = sum(sidecar["cpu_seconds"] for sidecar in sidecars)
    workers = {sidecar["worker"] for sidecar in sidecars}
    assert len(workers) == num_workers, f"{num_workers} workers expected, the sidecars name {sorted(workers)}"
    return {"num_windows": num_windows, "seconds": round(seconds, 3), "windows_per_s": round(num_windows / seconds, 2),
            "startup_s": round(first - started_at, 3), "steady_windows_per_s": round(num_windows / steady, 2),
            "all_busy_windows_per_s": round(all_busy_rate(sidecars), 2),
            "busy_s": round(busy, 3), "not_busy_s": round(seconds - busy, 3),
            "cpu_ms_per_window": round(1000 * cpu / num_windows, 1),
            "cpu_share": round(cpu / sum(sidecar["seconds"] for sidecar in sidecars), 3)}


@pytest.fixture
def local_ray():
    """The Ray instance `tokfleet pretokenize` starts on its own (init_ray without an address: no
    dashboard, all CPUs), not the test session's head, whose dashboard and Jobs API take CPU."""
    import ray

    from core.config import RayConfig
    from sharding.ray_runtime import init_ray

    assert not ray.is_initialized(), "run this bench before anything that joins the session's Ray head"
    init_ray(RayConfig())
    yield
    ray.shutdown()


def test_pretokenize_throughput(local_ray, tmp_path):
    import torch

    threads_before = torch.get_num_threads()
    started = time.perf_counter()
    dataset = make_dataset(tmp_path)
    checkpoint = train_tokenizer(dataset, tmp_path)
    setup_s = time.perf_counter() - started
    niceness = ray_worker_niceness()
    ways = {"plain": (1, functools.partial(run_plain, niceness=niceness)),
            "plain-2": (2, functools.partial(run_plain_processes, niceness=niceness)),
            "ray-1": (1, run_ray), "ray-2": (2, run_ray)}
    runs: dict[str, list[dict]] = {name: [] for name in ways}
    reference_hashes: list[str] = []
    for round_index in range(NUM_ROUNDS):
        # ABBA: odd rounds run the ways in reverse, so a drift in the host's speed does not favour one side of a pair
        order = list(ways) if round_index % 2 == 0 else list(reversed(ways))
        for name in order:
            num_workers, run = ways[name]
            output = str(tmp_path / f"tokens-{name}-{round_index}")
            settle()
            load_before, started_at, cpu_before = load_average(), time.time(), process_cpu_s()
            seconds, sidecars = run(pretokenize_config(dataset, checkpoint, output, num_workers))
            driver_cpu = None if name.startswith("plain") else round(process_cpu_s() - cpu_before, 3)  # plain: the loop itself
            runs[name].append(describe_run(seconds, sidecars, num_workers, started_at) | {
                "driver_cpu_s": driver_cpu, "load_before": load_before, "load_after": load_average()})
            hashes = [sidecar["sha256"] for sidecar in sidecars]
            reference_hashes = reference_hashes or hashes
            assert hashes == reference_hashes, f"{name} (round {round_index}) wrote other token shards than the first run"
    torch.set_num_threads(threads_before)

    best = {name: max(rows, key=lambda row: row["windows_per_s"]) for name, rows in runs.items()}

    def best_of(name: str, measure: str) -> float:
        return max(row[measure] for row in runs[name])

    ratios = {"busy_ray2_over_ray1": best_of("ray-2", "all_busy_windows_per_s") / best_of("ray-1", "all_busy_windows_per_s"),
              "steady_ray2_over_ray1": best_of("ray-2", "steady_windows_per_s") / best_of("ray-1", "steady_windows_per_s"),
              "ray2_over_ray1": best["ray-2"]["windows_per_s"] / best["ray-1"]["windows_per_s"],
              "ray1_over_plain": best["ray-1"]["windows_per_s"] / best["plain"]["windows_per_s"],
              "busy_plain2_over_plain": best_of("plain-2", "all_busy_windows_per_s") / best_of("plain", "all_busy_windows_per_s"),
              "plain2_over_plain": best["plain-2"]["windows_per_s"] / best["plain"]["windows_per_s"],
              "busy_ray2_over_plain2": best_of("ray-2", "all_busy_windows_per_s") / best_of("plain-2", "all_busy_windows_per_s"),
              "ray2_over_plain2": best["ray-2"]["windows_per_s"] / best["plain-2"]["windows_per_s"]}

    def paired(two: str, one: str) -> list[float]:
        """Per round: the 2-worker way's all-busy windows/s over the 1-worker way's, the two run back to back."""
        return [round(a["all_busy_windows_per_s"] / b["all_busy_windows_per_s"], 3) for a, b in zip(runs[two], runs[one])]

    def cores_at_work(row: dict) -> float:
        """Windows/s x CPU s per window: the cores' worth of tokenizing a way got while all its workers were at
        work. The host's speed cancels out (it scales both factors inversely); what remains is how much of the
        machine the workers had (1 - what Ray's own processes and other jobs took)."""
        return row["all_busy_windows_per_s"] * row["cpu_ms_per_window"] / 1000

    pairs = {"ray2_over_ray1": paired("ray-2", "ray-1"), "plain2_over_plain": paired("plain-2", "plain")}
    ratios["median_paired_ray2_over_ray1"] = statistics.median(pairs["ray2_over_ray1"])
    ratios["median_paired_plain2_over_plain"] = statistics.median(pairs["plain2_over_plain"])
    cores = {name: [round(cores_at_work(row), 3) for row in rows] for name, rows in runs.items()}
    num_windows = best["plain"]["num_windows"]
    print(f"\npretokenize {num_windows} windows ({NUM_RECORDINGS} raw shards, {3 * NUM_TRIPLETS + 8} channels "
          f"x {int(SFREQ * WINDOW_S)} samples), TOTEM small, batch {BATCH_SIZE}, torch 1 thread per worker; "
          f"niceness {niceness}; best of {NUM_ROUNDS} (* end to end); setup {setup_s:.0f} s")
    print(f"{'way':7s} {'windows/s':>10s} {'wall s':>7s} {'startup s':>9s} {'steady w/s':>10s} {'all busy w/s':>12s} "
          f"{'not busy s':>10s} {'cpu ms/w':>8s} {'cpu share':>9s} {'driver cpu s':>12s}  load average before -> after")
    for name, rows in runs.items():
        for row in rows:
            mark = "*" if row is best[name] else " "
            print(f"{name:7s}{mark}{row['windows_per_s']:9.1f} {row['seconds']:7.1f} {row['startup_s']:9.1f} "
                  f"{row['steady_windows_per_s']:10.1f} {row['all_busy_windows_per_s']:12.1f} {row['not_busy_s']:10.1f} "
                  f"{row['cpu_ms_per_window']:8.0f} {row['cpu_share']:9.2f} "
                  f"{'-' if row['driver_cpu_s'] is None else round(row['driver_cpu_s'], 1):>12}  {row['load_before']} -> {row['load_after']}")
    print(f"ray 2 actors / 1 actor: {ratios['busy_ray2_over_ray1']:.2f}x with every actor at work (goal >= 1.8 on 2 idle "
          f"cores), {ratios['steady_ray2_over_ray1']:.2f}x from the first shard to the last, {ratios['ray2_over_ray1']:.2f}x end "
          f"to end; ray 1 actor / plain loop: {ratios['ray1_over_plain']:.2f}")
    print(f"paired by round (run back to back): ray 2 / 1 actor {pairs['ray2_over_ray1']} (median "
          f"{ratios['median_paired_ray2_over_ray1']:.2f}x); 2 plain processes / plain loop {pairs['plain2_over_plain']} "
          f"(median {ratios['median_paired_plain2_over_plain']:.2f}x)")
    print("cores at work while all workers were busy (windows/s x CPU s per window; host speed cancels): "
          + ", ".join(f"{name} {statistics.median(values):.2f}" for name, values in cores.items()))
    print(f"without Ray: 2 plain processes / the plain loop {ratios['busy_plain2_over_plain']:.2f}x with both at work, "
          f"{ratios['plain2_over_plain']:.2f}x end to end (what 2 workers can gain here); ray 2 actors / 2 plain processes: "
          f"{ratios['busy_ray2_over_plain2']:.2f} with all at work, {ratios['ray2_over_plain2']:.2f} end to end")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pretokenize.json").write_text(json.dumps({
        "dataset": {"num_raw_shards": NUM_RECORDINGS, "num_windows": num_windows, "num_channels": 3 * NUM_TRIPLETS + 8,
                    "window_samples": int(SFREQ * WINDOW_S)},
        "tokenizer": {"model": "totem", "flavor": "small"}, "batch_size": BATCH_SIZE, "torch_threads_per_worker": 1,
        "worker_niceness": niceness,
        "rounds": NUM_ROUNDS, "cpu_count": os.cpu_count(), "runs": runs,
        "best_windows_per_s": {name: row["windows_per_s"] for name, row in best.items()},
        "paired_all_busy_ratios": pairs, "cores_at_work": cores,
        **{name: round(value, 3) for name, value in ratios.items()},
    }, indent=1) + "\n")
