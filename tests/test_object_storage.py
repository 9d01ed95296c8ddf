"""Datasets on a real S3 server (Ceph radosgw): prepare -> inspect -> train, credentials kept secret.

`tokfleet prepare` writes shards + manifest to s3:// (credentials from the config's storage
options), `tokfleet inspect` verifies them (credentials from the AWS environment variables), and
`python -m trainer` reads them, consuming the same sample keys as the same run on a local copy.
MEG: FIF recordings on s3:// -> `tokfleet prepare` (s3 -> s3) -> a debug TOTEM trained from s3
-> `tokfleet pretokenize` (s3 -> s3) -> `tokfleet inspect`, run in this process on the session's
Ray (one Ray start for the three commands). No credential may appear in anything written or printed; bad credentials and missing buckets end
a command with exit code 2 and one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

BUCKET = "tokfleet-text"
TIMEOUT_S = 300


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command with the AWS variables cleared unless given: credentials come only from where the test says."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base["AWS_CONFIG_FILE"] = base["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull  # no ~/.aws either
    return subprocess.run(argv, capture_output=True, text=True, env={**base, **(env or {})}, timeout=TIMEOUT_S)


def tokfleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "launch.cli", *args, env=env)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def train_config(tmp_path: Path, name: str, dataset: str, storage_options: dict) -> Path:
    return write_yaml(tmp_path / f"{name}.yaml", {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": 3, "seed": 7, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {"dataset": dataset, "num_streams": 8, "log_sample_keys": True, "storage_options": storage_options},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "micro_batch_size": 4},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 0, "save_final": True},
        "logging": {"every_steps": 1, "progress": False, "wandb": True, "wandb_mode": "offline"},
        "eval": {"every_steps": 0, "num_batches": 1},
    })


def consumed_keys(run_dir: Path) -> list[str]:
    lines = (run_dir / "logs" / "sample_keys-rank0.jsonl").read_text().splitlines()
    return [key for line in lines for key in json.loads(line)["keys"]]


def assert_no_secret(server, where: str, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    for secret in (server.access_key, server.secret_key):
        assert secret.encode() not in data, f"a credential appears in {where}"


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tmp_path_factory):
    """`tokfleet prepare` of ~600 KB of stdlib code straight to s3://tokfleet-text/stdlib-small."""
    tmp = tmp_path_factory.mktemp("s3-prepare")
    s3_server.make_bucket(BUCKET)
    url = f"s3://{BUCKET}/stdlib-small"
    config = write_yaml(tmp / "prepare.yaml", {
        "source": {"paths": ["{stdlib}/json/*.py", "{stdlib}/email/*.py", "{stdlib}/http/*.py"]},
        "tokenizer": {"kind": "bpe", "vocab_size": 512},
        "shards": {"output": url, "name": "stdlib", "seq_len": 64, "source_bytes_per_shard": 60_000, "val_fraction": 0.2,
                   "storage_options": s3_server.storage_options()},
        "ray": {"num_cpus": 2, "object_store_mb": 300},
    })
    result = tokfleet("prepare", str(config), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_secret(s3_server, "prepare's output", result.stdout + result.stderr)
    return url, tmp, [result.stdout + result.stderr]


def test_prepare_writes_shards_and_manifest_to_s3(s3_server, s3_dataset):
    import s3fs

    url, _, _ = s3_dataset
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    names = [p.rsplit("/", 1)[1] for p in fs.find(url)]
    assert "manifest.json" in names and any(n.startswith("stdlib-") and n.endswith(".tar") for n in names)
    assert not [n for n in names if ".tmp-" in n], "a temporary upload was left behind"
    manifest = json.loads(fs.cat_file(f"{url}/manifest.json"))
    assert manifest["shards"] and manifest["vocab_size"] == 512
    for path in fs.find(url):  # manifest, sidecars, tokenizer, shards
        assert_no_secret(s3_server, path, fs.cat_file(path))


def test_inspect_verifies_s3_dataset_with_environment_credentials(s3_server, s3_dataset):
    url, _, _ = s3_dataset
    result = tokfleet("inspect", url, env=s3_server.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all shards verified" in result.stdout
    assert_no_secret(s3_server, "inspect's output", result.stdout + result.stderr)


def test_training_reads_s3_like_a_local_copy(s3_server, s3_dataset, tmp_path):
    import s3fs

    url, _, _ = s3_dataset
    local = tmp_path / "local-copy"
    s3fs.S3FileSystem(**s3_server.storage_options()).get(f"{url}/", str(local), recursive=True)
    remote_run = train(train_config(tmp_path, "s3-run", url, s3_server.storage_options()))
    local_run = train(train_config(tmp_path, "local-run", str(local), {}))
    keys = consumed_keys(remote_run)
    assert len(keys) == 3 * 4 and keys == consumed_keys(local_run)

    config = yaml.safe_load((remote_run / "config.yaml").read_text())
    assert config["data"]["storage_options"] == {"client_kwargs": {"endpoint_url": s3_server.endpoint}}
    for path in remote_run.rglob("*"):  # config.yaml, metrics.jsonl, logs, checkpoint, wandb offline files
        if path.is_file():
            assert_no_secret(s3_server, str(path), path.read_bytes())


def train(config: Path) -> Path:
    result = run(sys.executable, "-m", "trainer", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(yaml.safe_load(config.read_text())["run"]["output_dir"])
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "logs" / "captured.txt").write_text(result.stdout + result.stderr)  # scanned for secrets with the rest
    return run_dir


def test_print_config_hides_credentials(s3_server, s3_dataset):
    _, tmp, _ = s3_dataset
    result = tokfleet("prepare", str(tmp / "prepare.yaml"), "--print-config")
    assert result.returncode == 0, result.stderr
    assert s3_server.endpoint in result.stdout
    assert_no_secret(s3_server, "--print-config", result.stdout)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("tokfleet: error: "), result.stderr
    assert all(w in errors[0] for w in words), result.stderr


def test_wrong_secret_exits_2_with_one_line(s3_server, s3_dataset, tmp_path):
    url, _, _ = s3_dataset
    wrong = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    assert_one_line_error(tokfleet("inspect", url, env=wrong), url, "access denied")
    options = {**s3_server.storage_options(), "secret": "not-the-secret"}
    result = run(sys.executable, "-m", "trainer", str(train_config(tmp_path, "wrong", url, options)))
    assert_one_line_error(result, "data.dataset", "access denied")


def test_missing_bucket_exits_2_with_one_line(s3_server, s3_dataset, tmp_path):
    import s3fs

    _, tmp, _ = s3_dataset
    assert_one_line_error(tokfleet("inspect", "s3://no-such-bucket/data", env=s3_server.env()), "no-such-bucket", "does not exist")
    config = yaml.safe_load((tmp / "prepare.yaml").read_text())
    config["shards"]["output"] = "s3://no-such-bucket/stdlib"
    result = tokfleet("prepare", str(write_yaml(tmp_path / "prepare.yaml", config)), "--quiet")
    assert_one_line_error(result, "no-such-bucket", "does not exist")
    assert not s3fs.S3FileSystem(**s3_server.storage_options()).exists("no-such-bucket"), "prepare created the bucket"


# ------------------------------------------------------------------ MEG: prepare -> train -> pretokenize on s3://

MEG_BUCKET = "tokfleet-meg"


def cli(capsys, *argv: str) -> str:
    """`tokfleet ARGV` in this process (on the session's Ray, no start-up per command); its stdout + stderr."""
    from launch.cli import main

    main(list(argv))
    captured = capsys.readouterr()
    return captured.out + captured.err


def cli_error(capsys, *argv: str) -> str:
    """The one error line of a `tokfleet ARGV` that must exit with code 2."""
    from launch.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("tokfleet: error: "), errors
    return errors[0]


def s3_samples(url: str, options: dict) -> dict[str, list[dict]]:
    """shard name -> decoded samples of every shard of the dataset at `url`."""
    from sharding.manifest import Manifest
    from sharding.shards import read_shard

    return {shard.name: read_shard(f"{url}/{shard.name}", options) for shard in Manifest.read(url, options).shards}


def test_meg_pipeline_on_s3(s3_server, ray_session, meg_corpus, tmp_path, capsys):
    """Synthetic FIF recordings on s3:// -> `tokfleet prepare` (s3 -> s3) -> a debug TOTEM trained 2 steps
    reading the raw shards from s3 -> `tokfleet pretokenize` (s3 -> s3) -> `tokfleet inspect`: the
    same windows, keys and counts at every stage, and no credential in anything written or printed."""
    import s3fs

    from sharding.manifest import Manifest
    from sharding.shards import source_sample_key
    from conftest import MEG_OPTIONS
    from test_prepare_signals import expected_windows

    from conftest import GOOD_FIF

    options = s3_server.storage_options()
    fs = s3fs.S3FileSystem(**options)
    s3_server.make_bucket(MEG_BUCKET)
    for name in [*GOOD_FIF, "garbage_raw.fif"]:  # three recordings and one corrupt file
        fs.put_file(os.path.join(meg_corpus, name), f"{MEG_BUCKET}/recordings/{name}")
    raw_url, tokens_url = f"s3://{MEG_BUCKET}/windows", f"s3://{MEG_BUCKET}/tokens"
    prepare = write_yaml(tmp_path / "prepare.yaml", {
        "source": {"kind": "meg", "paths": [f"s3://{MEG_BUCKET}/recordings/*.fif"], "storage_options": options},
        "meg": {**MEG_OPTIONS, "channel_types": ["mag"]},  # 8 magnetometers in every recording: batches of 4 windows
        "shards": {"output": raw_url, "name": "meg", "source_bytes_per_shard": 1, "val_fraction": 0.34, "storage_options": options},
    })
    printed = [cli(capsys, "prepare", str(prepare), "--quiet")]
    raw = Manifest.read(raw_url, options)
    recordings = {f"s3://{MEG_BUCKET}/recordings/{name}": expected_windows(seconds) for name, seconds in GOOD_FIF.items()}
    assert sorted(s for shard in raw.shards for s in shard.sources) == sorted(recordings)
    (skipped,) = raw.skipped
    assert skipped.path == f"s3://{MEG_BUCKET}/recordings/garbage_raw.fif" and "unreadable recording" in skipped.reason
    assert tempfile.gettempdir() not in skipped.reason, "the reason names the temporary download, not the source"
    assert "storage_options" not in raw.created_by["config"]["source"]
    raw_samples = s3_samples(raw_url, options)
    for shard in raw.shards:  # one recording per shard (the corrupt file's is empty), windows keyed by s3 URL + position
        if not shard.sources:
            assert shard.num_samples == 0
            continue
        (source,) = shard.sources
        keys = [sample["__key__"] for sample in raw_samples[shard.name]]
        assert keys == [source_sample_key(source, i) for i in range(recordings[source])] and shard.num_samples == len(keys)
        assert all(sample["signal"].shape == (8, 500) for sample in raw_samples[shard.name])
    assert {shard.split for shard in raw.shards} == {"train", "val"}

    run_dir = tmp_path / "totem"
    train = write_yaml(tmp_path / "train.yaml", {
        "run": {"name": "totem", "output_dir": str(run_dir), "max_steps": 2, "seed": 3, "device": "cpu"},
        "model": {"name": "totem", "flavor": "debug"},
        "data": {"dataset": raw_url, "num_streams": 4, "log_sample_keys": True, "storage_options": options},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "micro_batch_size": 4},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 0},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 2, "num_batches": 1},
    })
    printed.append(cli(capsys, "train", str(train)))
    train_keys = set(consumed_keys(run_dir))
    assert len(train_keys) == 2 * 4 and train_keys <= {s["__key__"] for shard in raw.shards_of("train") for s in raw_samples[shard.name]}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["storage_options"] == {
        "client_kwargs": {"endpoint_url": s3_server.endpoint}}

    pretokenize = write_yaml(tmp_path / "pretokenize.yaml", {
        "input": {"dataset": raw_url, "storage_options": options},
        "tokenizer": {"checkpoint": str(run_dir), "device": "cpu"},
        "shards": {"output": tokens_url, "name": "tok", "storage_options": options},
        "actors": {"num_actors": 1, "num_cpus": 1.0, "batch_size": 4},
    })
    printed.append(cli(capsys, "pretokenize", str(pretokenize), "--quiet"))
    tokens = Manifest.read(tokens_url, options)
    assert [(s.split, s.num_samples, s.sources) for s in tokens.shards] == [(s.split, s.num_samples, s.sources) for s in raw.shards]
    token_samples = s3_samples(tokens_url, options)
    for raw_shard, token_shard in zip(raw.shards, tokens.shards):
        assert [t["__key__"] for t in token_samples[token_shard.name]] == [r["__key__"] for r in raw_samples[raw_shard.name]]
        assert all(t["origin"] == {"shard": raw_shard.name, "key": t["__key__"]} and t["tokens"].shape == (8, 125)
                   for t in token_samples[token_shard.name])
    assert tokens.stats["num_tokens"] == sum(recordings.values()) * 8 * 125
    assert tokens.tokenizer["checkpoint"].startswith(str(run_dir)) and tokens.sources["manifest_sha256"] == raw.fingerprint()

    result = tokfleet("inspect", tokens_url, env=s3_server.env())
    assert result.returncode == 0, result.stdout + result.stderr
    for split in ("train", "val"):
        shards = tokens.shards_of(split)
        assert f"  {split}: {len(shards)} shards, {sum(s.num_samples for s in shards)} samples" in result.stdout
    assert "all shards verified" in result.stdout
    printed += [result.stdout + result.stderr, cli(capsys, "prepare", str(prepare), "--print-config")]
    assert s3_server.endpoint in printed[-1]

    for index, text in enumerate(printed):
        assert_no_secret(s3_server, f"printed output {index}", text)
    for path in fs.find(f"{MEG_BUCKET}/windows") + fs.find(f"{MEG_BUCKET}/tokens"):  # manifests, sidecars, shards
        assert_no_secret(s3_server, path, fs.cat_file(path))
    for path in run_dir.rglob("*"):  # config.yaml, trainer_state.json, metrics, logs
        if path.is_file():
            assert_no_secret(s3_server, str(path), path.read_bytes())


def test_meg_source_on_s3_errors_exit_2_with_one_line(s3_server, tmp_path, capsys):
    """A missing bucket or a refused secret in source.paths: one line, exit 2, nothing written."""
    options = s3_server.storage_options()
    output = tmp_path / "windows"

    def prepare(source_url: str, source_options: dict) -> str:
        config = write_yaml(tmp_path / "prepare.yaml", {
            "source": {"kind": "meg", "paths": [source_url], "storage_options": source_options},
            "shards": {"output": str(output), "name": "meg"},
        })
        return cli_error(capsys, "prepare", str(config), "--quiet")

    assert "bucket 'no-such-meg-bucket' does not exist" in prepare("s3://no-such-meg-bucket/recordings/*.fif", options)
    s3_server.make_bucket("tokfleet-meg-denied")
    error = prepare("s3://tokfleet-meg-denied/recordings/*.fif", {**options, "secret": "not-the-secret"})
    assert "access denied" in error and "s3://tokfleet-meg-denied" in error
    assert not output.exists()


def test_text_source_on_s3(s3_server, ray_session, tmp_path, capsys):
    """Text files read from s3:// with source.storage_options (listing, BPE training, tokenizing in the
    Ray tasks): the same shards as from the local files, the s3 URLs as sources."""
    import glob
    import sysconfig

    import s3fs

    from sharding.manifest import Manifest

    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    bucket = s3_server.make_bucket("tokfleet-text-source")
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/json/*.py"))
    for path in files:
        fs.put_file(path, f"{bucket[5:]}/json/{os.path.basename(path)}")

    def prepare(name: str, paths: str, options: dict) -> Manifest:
        config = write_yaml(tmp_path / f"{name}.yaml", {
            "source": {"paths": [paths], "storage_options": options},
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "shards": {"output": str(tmp_path / name), "name": "json", "seq_len": 32, "source_bytes_per_shard": 30_000},
        })
        assert_no_secret(s3_server, "prepare's output", cli(capsys, "prepare", str(config), "--quiet"))
        return Manifest.read(str(tmp_path / name))

    remote = prepare("remote", f"{bucket}/json/*.py", s3_server.storage_options())
    local = prepare("local", f"{os.path.dirname(files[0])}/*.py", {})
    assert [s.sources for s in remote.shards] == [[f"{bucket}/json/{os.path.basename(p)}" for p in s.sources] for s in local.shards]
    assert [(s.num_samples, s.sha256) for s in remote.shards] == [(s.num_samples, s.sha256) for s in local.shards]
    assert remote.tokenizer["sha256"] == local.tokenizer["sha256"]
    assert_no_secret(s3_server, "the manifest", remote.to_json())
