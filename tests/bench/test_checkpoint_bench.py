"""What checkpoints cost the training loop, and what object storage adds to moving their bytes.

`test_async_blocking`: 2 ranks (DeepSpeed ZeRO-3 under torchrun, FSDP2 under accelerate launch), a
GPT of ~100 MB of training state (weights + AdamW), a save every 2 steps; the time the loop is blocked
per save (rank 0's "training blocked" log line: with async saves the host copy plus any wait for the
previous write) with `checkpoint.async_save` on and off, in one run each, side by side. Goal: async
<= 0.2x sync.

`test_s3_transfer`: a checkpoint folder of ~96 MB (2 ranks' shards + small files) uploaded and
downloaded through RemoteCheckpoints (files, marker, latest, listing, pruning) vs a plain fsspec
`put`/`get` of the same folder, on the real S3 server; medians of ratios over paired rounds. Goal: <= 1.3x.

    make bench     # or: pytest -s tests/bench/test_checkpoint_bench.py
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path

import pytest

from test_distributed import ENGINES, run, write_config

RESULTS = Path(__file__).parent / "results"
BLOCKED = re.compile(r"checkpoint (step-\d+): training blocked ([\d.]+) s")
MODEL = {"args": {"n_layer": 4, "n_embd": 512, "n_head": 8, "n_kv_head": 8}}  # ~8.6M parameters: ~100 MB with AdamW
NUM_ROUNDS = 7


def blocked_per_save(stderr: str) -> list[float]:
    return [float(seconds) for _, seconds in BLOCKED.findall(stderr)]


@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_async_blocking(tmp_path, token_dataset, engine):
    launcher, engine_cfg = ENGINES[engine]
    results = {}
    for mode in ("sync", "async"):
        config = write_config(tmp_path, token_dataset, mode, engine_cfg, micro=4, steps=8, model=MODEL,
                              checkpoint={"every_steps": 2, "keep_last": 2, "async_save": mode == "async"})
        results[mode] = blocked_per_save(run(launcher, 2, config).stderr)
        assert len(results[mode]) == 4, results[mode]
    sync, background = statistics.median(results["sync"]), statistics.median(results["async"])
    print(f"\n{engine}: training blocked per save: sync {sync:.3f} s, async {background:.3f} s "
          f"-> {background / sync:.2f}x (per save: sync {results['sync']}, async {results['async']})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"checkpoint_async_{engine}.json").write_text(json.dumps(
        {"engine": engine, "sync_s": results["sync"], "async_s": results["async"], "ratio": background / sync}, indent=1))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fake_checkpoint(folder: Path) -> Path:
    """2 ranks' optimizer shards of 40 MB, a model file of 16 MB and the small files, like ZeRO's layout."""
    (folder / "deepspeed" / "tag").mkdir(parents=True)
    for rank in range(2):
        (folder / "deepspeed" / "tag" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(40 << 20))
    (folder / "deepspeed" / "tag" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(16 << 20))
    (folder / "trainer_state.json").write_text(json.dumps({"step": 2}))
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / "COMPLETE").write_text(json.dumps({"step": 2, "files": files}))
    return folder


def test_s3_transfer(s3_server, tmp_path):
    import s3fs

    from trainer.checkpoint_store import RemoteCheckpoints

    local = fake_checkpoint(tmp_path / "step-00000002")
    num_mb = sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) / 2**20
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    bucket = s3_server.make_bucket("tokfleet-checkpoint-bench").removeprefix("s3://")
    store = RemoteCheckpoints(f"s3://{bucket}/store", s3_server.storage_options())

    rounds = []  # paired rounds: machine noise hits both ways of moving the bytes alike
    for number in range(NUM_ROUNDS):
        rounds.append({
            "plain_put": timed(lambda: fs.put(str(local) + "/", f"{bucket}/plain/step-00000002", recursive=True)),
            "save": timed(lambda: store.upload(local, keep_last=1)),
            "plain_get": timed(lambda: fs.get(f"{bucket}/plain/step-00000002/", str(tmp_path / f"plain-{number}"), recursive=True)),
            "load": timed(lambda: store.download("step-00000002", tmp_path / f"store-{number}")),
        })
    save_ratio = statistics.median(r["save"] / r["plain_put"] for r in rounds)
    load_ratio = statistics.median(r["load"] / r["plain_get"] for r in rounds)
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"\ncheckpoint of {num_mb:.0f} MB on S3 (medians of {NUM_ROUNDS} paired rounds): save {median['save']:.2f} s vs plain put "
          f"{median['plain_put']:.2f} s -> {save_ratio:.2f}x; load {median['load']:.2f} s vs plain get {median['plain_get']:.2f} s "
          f"-> {load_ratio:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_s3.json").write_text(json.dumps(
        {"mb": num_mb, "rounds": rounds, "save_ratio": save_ratio, "load_ratio": load_ratio}, indent=1))
