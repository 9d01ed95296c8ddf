"""Datasets on a real S3 server (Ceph radosgw): prepare -> inspect -> train, credentials kept secret.

`tokfleet prepare` writes shards + manifest to s3:// (credentials from the config's storage
options), `tokfleet inspect` verifies them (credentials from the AWS environment variables), and
`python -m trainer` reads them, consuming the same sample keys as the same run on a local copy.
No credential may appear in anything written or printed; bad credentials and missing buckets end
a command with exit code 2 and one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
