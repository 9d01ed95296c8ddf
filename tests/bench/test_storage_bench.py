"""Shard-loader throughput from local disk and from a real S3 server (radosgw), side by side.

For each place the same token shards are read twice in one run: raw (the tar bytes read
sequentially, `open().read()` locally, `fs.cat_file` on S3) and through the ShardLoader
(read + split + decode every sample in its epoch order). The ratio loader / raw says what the
loader costs beyond moving the bytes; the local / S3 rows say what the object store costs.
Local reads come from the page cache after the first pass (the best case for local).

    make bench     # or: pytest -s tests/bench/test_storage_bench.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import write_token_dataset

RESULTS = Path(__file__).parent / "results"
NUM_SHARDS, SAMPLES_PER_SHARD, SEQ_LEN = 8, 2000, 256  # ~8 MB of uint16 tokens
NUM_REPEATS = 3  # best of: the machine is shared


def best_of(fn) -> tuple[float, int]:
    """(fastest seconds, what fn returned) over NUM_REPEATS runs."""
    times, result = [], None
    for _ in range(NUM_REPEATS):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def test_storage_throughput(s3_server, tmp_path):
    import s3fs

    from sharding import storage
    from sharding.loader import ShardLoader
    from sharding.manifest import Manifest

    local = write_token_dataset(tmp_path / "tokens", num_shards=NUM_SHARDS, samples_per_shard=SAMPLES_PER_SHARD,
                                seq_len=SEQ_LEN, vocab_size=1024)
    options = s3_server.storage_options()
    fs = s3fs.S3FileSystem(**options)
    remote = s3_server.make_bucket("tokfleet-bench") + "/tokens"
    fs.put(local + "/", remote, recursive=True)
    manifest = Manifest.read(local)
    shards = manifest.shards_of("train")
    num_bytes = sum(s.num_bytes for s in shards)

    def raw(root: str, read):
        return lambda: sum(len(read(storage.join(root, s.name))) for s in shards)

    def loader(root: str, storage_options):
        def run():
            samples = ShardLoader(manifest, root, "train", num_streams=1, seed=0, shuffle=True, storage_options=storage_options)
            return sum(1 for _ in samples)
        return run

    rows = []
    for place, root, read, storage_options in (("local", local, lambda p: open(p, "rb").read(), None),
                                               ("s3 (radosgw)", remote, lambda u: fs.cat_file(u), options)):
        raw_s, raw_bytes = best_of(raw(root, read))
        loader_s, num_samples = best_of(loader(root, storage_options))
        assert raw_bytes == num_bytes and num_samples == NUM_SHARDS * SAMPLES_PER_SHARD
        rows.append({"place": place, "num_bytes": num_bytes, "num_samples": num_samples,
                     "raw_mb_per_s": num_bytes / raw_s / 1e6, "loader_mb_per_s": num_bytes / loader_s / 1e6,
                     "loader_samples_per_s": num_samples / loader_s, "loader_over_raw": raw_s / loader_s})

    print(f"\n{'place':14s} {'raw MB/s':>9s} {'loader MB/s':>12s} {'samples/s':>10s} {'loader/raw':>11s}")
    for r in rows:
        print(f"{r['place']:14s} {r['raw_mb_per_s']:9.1f} {r['loader_mb_per_s']:12.1f} {r['loader_samples_per_s']:10.0f} "
              f"{r['loader_over_raw']:11.2f}")
    s3_over_local = rows[1]["loader_samples_per_s"] / rows[0]["loader_samples_per_s"]
    print(f"loader throughput s3 / local: {s3_over_local:.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storage.json").write_text(json.dumps(
        {"dataset": {"num_shards": NUM_SHARDS, "samples_per_shard": SAMPLES_PER_SHARD, "seq_len": SEQ_LEN, "num_bytes": num_bytes},
         "repeats": NUM_REPEATS, "rows": rows, "loader_s3_over_local": s3_over_local}, indent=1) + "\n")
