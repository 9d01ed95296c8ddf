"""The `tokfleet` CLI end to end for the data stage: prepare, inspect, and its bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml


def tokfleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True)


def prepare_config(tmp_path: Path, paths: list[str], output: Path) -> Path:
    config = {
        "source": {"paths": paths},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "shards": {"output": str(output), "name": "mini", "seq_len": 32, "source_bytes_per_shard": 20_000, "val_fraction": 0.3},
        "ray": {"num_cpus": 2, "object_store_mb": 200},
    }
    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_empty_corpus_exits_2(tmp_path):
    (tmp_path / "corpus").mkdir()
    config = prepare_config(tmp_path, [str(tmp_path / "corpus" / "*.txt")], tmp_path / "out")
    result = tokfleet("prepare", str(config), "--quiet")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "corpus" in result.stderr and "*.txt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_then_inspect_detects_damage(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sys.modules["os"].__file__).parent
    for name in ("json/decoder.py", "json/encoder.py", "json/scanner.py", "json/__init__.py", "csv.py", "textwrap.py"):
        (corpus / name.replace("/", "_")).write_text((stdlib / name).read_text())
    output = tmp_path / "dataset"
    config = prepare_config(tmp_path, [str(corpus / "*.py")], output)
    result = tokfleet("prepare", str(config), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shards" in result.stdout and (output / "manifest.json").is_file()

    result = tokfleet("inspect", str(output))
    assert result.returncode == 0, result.stderr
    assert "all shards verified" in result.stdout and "train:" in result.stdout and "val:" in result.stdout

    shard = sorted(output.glob("mini-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    result = tokfleet("inspect", str(output))
    assert result.returncode == 1 and "PROBLEM" in result.stdout and shard.name in result.stdout
