"""Shard-loader throughput from local disk and from a real S3 server (radosgw), side by side.

For each place the same token shards are read twice in one run: raw (the tar bytes read
sequentially, `open().read()` locally, `fs.cat_file` on S3) and through the ShardLoader
(read + split + decode every sample in its epoch order). The ratio loader / raw says what the
loader costs beyond moving the bytes; the local / S3 rows say what the object store costs.
Local reads come from the page cache after the first pass (the best case for local).

`test_verification_cost` (local disk) measures what `data.verify` costs: the ShardLoader with
verification on (size + sha256 of every shard, as on its first read in a process) and off, next
to plain `webdataset.WebDataset(urls).decode()` and the raw read, in paired rounds (each round
runs all four, in rotated order) so machine noise hits them alike; ratios are medians over rounds.

`test_loader_vs_webdataset` is the loader's goal (>= 0.9x plain WebDataset's samples/s, verification
on) checked everywhere the trainer reads: local and S3, in the main process and with 1 / 2 DataLoader
workers, paired rounds per place and worker count.

    make bench     # or: pytest -s tests/bench/test_storage_bench.py
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

from conftest import write_token_dataset

RESULTS = Path(__file__).parent / "results"
NUM_SHARDS, SAMPLES_PER_SHARD, SEQ_LEN = 8, 2000, 256  # ~8 MB of uint16 tokens
NUM_REPEATS = 3  # best of: the machine is shared
NUM_ROUNDS = 15  # paired rounds of the verification-cost benchmark


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
    from sharding.loader import ShardLoader, forget_verified_shards
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
            forget_verified_shards()  # every pass pays for verification, as a fresh process does
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


def test_verification_cost(tmp_path):
    """data.verify on vs off, plain WebDataset and the raw read on local disk, in paired rounds."""
    import webdataset

    from sharding.loader import ShardLoader, forget_verified_shards
    from sharding.manifest import Manifest

    root = write_token_dataset(tmp_path / "tokens", num_shards=NUM_SHARDS, samples_per_shard=SAMPLES_PER_SHARD,
                               seq_len=SEQ_LEN, vocab_size=1024)
    manifest = Manifest.read(root)
    shards = manifest.shards_of("train")
    paths = [f"{root}/{s.name}" for s in shards]
    num_bytes, num_samples = sum(s.num_bytes for s in shards), NUM_SHARDS * SAMPLES_PER_SHARD

    def loader(verify: bool):
        def run():
            forget_verified_shards()  # verification on every pass, as in a fresh process
            return sum(1 for _ in ShardLoader(manifest, root, "train", num_streams=1, seed=0, verify=verify))
        return run

    def plain_webdataset():
        return sum(1 for _ in webdataset.WebDataset(paths, shardshuffle=False).decode())

    def raw():
        return sum(len(open(path, "rb").read()) for path in paths)

    def sha256_only():
        return sum(len(data) for data in (open(path, "rb").read() for path in paths) if hashlib.sha256(data).digest())

    readers = {"raw read": raw, "raw read + sha256": sha256_only, "webdataset .decode()": plain_webdataset,
               "loader verify off": loader(False), "loader verify on": loader(True)}
    expected = {name: num_bytes if name.startswith("raw") else num_samples for name in readers}
    for name, run in readers.items():  # warm the page cache and the imports
        assert run() == expected[name], name
    seconds: dict[str, list[float]] = {name: [] for name in readers}
    names = list(readers)
    for round_index in range(NUM_ROUNDS):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            start = time.perf_counter()
            assert readers[name]() == expected[name]
            seconds[name].append(time.perf_counter() - start)

    def ratio(faster: str, slower: str) -> float:
        """Median over rounds of samples/s of `faster` over `slower` (= slower's time over faster's)."""
        return statistics.median(b / a for a, b in zip(seconds[faster], seconds[slower]))

    rows = {name: {"median_s": statistics.median(times), "samples_per_s": num_samples / statistics.median(times),
                   "mb_per_s": num_bytes / statistics.median(times) / 1e6} for name, times in seconds.items()}
    ratios = {"verify_on_over_off": ratio("loader verify on", "loader verify off"),
              "verify_on_over_off_best": min(seconds["loader verify off"]) / min(seconds["loader verify on"]),
              "verify_on_over_webdataset": ratio("loader verify on", "webdataset .decode()"),
              "verify_off_over_webdataset": ratio("loader verify off", "webdataset .decode()")}
    print(f"\n{'reader':22s} {'MB/s':>8s} {'samples/s':>10s}")
    for name, row in rows.items():
        print(f"{name:22s} {row['mb_per_s']:8.1f} {row['samples_per_s']:10.0f}")
    print(f"loader throughput, verify on / off: {ratios['verify_on_over_off']:.3f} (median of rounds), "
          f"{ratios['verify_on_over_off_best']:.3f} (best of each); verify on / plain webdataset: "
          f"{ratios['verify_on_over_webdataset']:.2f} (goal >= 0.9); verify off / webdataset: {ratios['verify_off_over_webdataset']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verification.json").write_text(json.dumps(
        {"dataset": {"num_shards": NUM_SHARDS, "samples_per_shard": SAMPLES_PER_SHARD, "seq_len": SEQ_LEN, "num_bytes": num_bytes},
         "rounds": NUM_ROUNDS, "rows": rows, "ratios": ratios, "seconds": seconds}, indent=1) + "\n")


NUM_WORKERS = (0, 1, 2)  # DataLoader worker processes of the loader comparison
NUM_LOADER_ROUNDS = 5  # paired rounds of the loader comparison, per place and worker count


def _identity(sample):
    return sample  # one sample per item, as the trainer's Batches reads them (batch_size=None)


def _open_s3(options):
    """A webdataset opener for s3:// URLs (webdataset 1.0.2 has none), reading through fsspec/s3fs."""
    import fsspec

    return lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode, **options).open()


def test_loader_vs_webdataset(s3_server, tmp_path):
    """ShardLoader (sha256 verification on) vs plain `webdataset.WebDataset(urls).decode()` vs a raw
    read of the same shards, local and on S3, with 0 / 1 / 2 DataLoader workers (goal: loader >= 0.9x
    WebDataset's samples/s everywhere). Workers are fed as the trainer feeds them: one sample per item
    (batch_size=None), the loader through ShardIterableDataset as in trainer/data.py's Batches."""
    import s3fs
    import webdataset
    from torch.utils.data import DataLoader
    from webdataset.gopen import gopen_schemes

    from sharding import storage
    from sharding.loader import ShardIterableDataset, ShardLoader, forget_verified_shards
    from sharding.manifest import Manifest

    local = write_token_dataset(tmp_path / "tokens", num_shards=NUM_SHARDS, samples_per_shard=SAMPLES_PER_SHARD,
                                seq_len=SEQ_LEN, vocab_size=1024)
    options = s3_server.storage_options()
    fs = s3fs.S3FileSystem(**options)
    remote = s3_server.make_bucket("tokfleet-loader-bench") + "/tokens"
    fs.put(local + "/", remote, recursive=True)
    gopen_schemes["s3"] = _open_s3(options)
    manifest = Manifest.read(local)
    shards = manifest.shards_of("train")
    num_bytes, num_samples = sum(s.num_bytes for s in shards), NUM_SHARDS * SAMPLES_PER_SHARD

    def raw(root, storage_options):
        return lambda num_workers: sum(len(storage.read_bytes(storage.join(root, s.name), storage_options)) for s in shards)

    def plain_webdataset(root, storage_options):
        urls = [storage.join(root, s.name) for s in shards]

        def run(num_workers):
            dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
            if num_workers == 0:
                return sum(1 for _ in dataset)
            return sum(1 for _ in DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity))
        return run

    def shard_loader(root, storage_options):
        common = dict(num_streams=NUM_SHARDS, seed=0, storage_options=storage_options, verify=True)

        def run(num_workers):
            forget_verified_shards()  # every pass verifies every shard, as a fresh process does
            if num_workers == 0:
                return sum(1 for _ in ShardLoader(manifest, root, "train", **common))
            dataset = ShardIterableDataset(manifest, root, "train", num_workers=num_workers, **common)
            return sum(1 for _ in DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                                             prefetch_factor=16))  # Batches: 2 x the micro-batch
        return run

    rows = []
    for place, root, storage_options in (("local", local, None), ("s3 (radosgw)", remote, options)):
        readers = {"raw read": raw(root, storage_options), "webdataset .decode()": plain_webdataset(root, storage_options),
                   "loader (verify on)": shard_loader(root, storage_options)}
        for num_workers in NUM_WORKERS:
            expected = {name: num_bytes if name == "raw read" else num_samples for name in readers}
            for name, run in readers.items():  # warm the page cache, the imports, the connections
                assert run(num_workers) == expected[name], (place, num_workers, name)
            seconds: dict[str, list[float]] = {name: [] for name in readers}
            names = list(readers)
            for round_index in range(NUM_LOADER_ROUNDS):
                for name in names[round_index % len(names):] + names[:round_index % len(names)]:
                    start = time.perf_counter()
                    assert readers[name](num_workers) == expected[name]
                    seconds[name].append(time.perf_counter() - start)
            ratio = statistics.median(w / l for l, w in zip(seconds["loader (verify on)"], seconds["webdataset .decode()"]))
            rows.append({"place": place, "num_workers": num_workers, "loader_over_webdataset": ratio,
                         **{f"{name} samples/s": num_samples / statistics.median(times) for name, times in seconds.items()},
                         "raw MB/s": num_bytes / statistics.median(seconds["raw read"]) / 1e6, "seconds": seconds})

    print(f"\n{'place':14s} {'workers':>7s} {'raw MB/s':>9s} {'webdataset/s':>13s} {'loader/s':>9s} {'loader/wds':>11s}")
    for r in rows:
        print(f"{r['place']:14s} {r['num_workers']:7d} {r['raw MB/s']:9.1f} {r['webdataset .decode() samples/s']:13.0f} "
              f"{r['loader (verify on) samples/s']:9.0f} {r['loader_over_webdataset']:11.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loader_vs_webdataset.json").write_text(json.dumps(
        {"dataset": {"num_shards": NUM_SHARDS, "samples_per_shard": SAMPLES_PER_SHARD, "seq_len": SEQ_LEN, "num_bytes": num_bytes},
         "rounds": NUM_LOADER_ROUNDS, "rows": rows}, indent=1) + "\n")
    assert all(r["loader_over_webdataset"] >= 0.9 for r in rows), "the loader reads < 0.9x plain WebDataset's samples/s somewhere"
