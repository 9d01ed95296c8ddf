"""Checkpoints on object storage (`checkpoint.url`) on the real S3 server (Ceph radosgw).

A run whose S3 endpoint goes away mid-upload (radosgw killed and started again) retries, logs it
and goes on; a run killed while its upload is failing resumes on a fresh machine (empty run dir)
from the previous complete checkpoint on S3 with the losses of the uninterrupted run, and at another
world size; prefixes without a COMPLETE marker (or with files missing) are never trusted, and
keep_last deletes only complete, older checkpoints; a missing bucket is one line, exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from test_async_checkpoint import wait_for
from test_distributed import env, launcher_command, losses, run, write_config
from trainer.checkpoint_store import RemoteCheckpoints

BUCKET = "tokfleet-checkpoints"
STEPS = 12


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.make_bucket(BUCKET)


def s3_config(tmp_path: Path, dataset: str, name: str, url: str, s3_server, **engine) -> Path:
    return write_config(tmp_path, dataset, name, engine or {"kind": "single"}, micro=8 if not engine else 4, steps=STEPS,
                        checkpoint={"every_steps": 2, "keep_last": 3, "url": url, "storage_options": s3_server.storage_options(),
                                    "retry_s": 60})


def start(config: Path, log: Path, *args: str) -> subprocess.Popen:
    handle = open(log, "w")
    try:
        return subprocess.Popen([*launcher_command("python", 1), str(config), *args], env=env(), stdout=handle, stderr=subprocess.STDOUT)
    finally:
        handle.close()


def remote(url: str, s3_server) -> RemoteCheckpoints:
    return RemoteCheckpoints(url, s3_server.storage_options())


def break_upload_of_step_4(tmp_path, name: str, process, s3_server) -> None:
    """Stop the S3 gateway once run `name`'s local checkpoint of step 4 is complete (so while it
    uploads), and wait until the run logs a retried upload."""
    wait_for(lambda: (tmp_path / name / "checkpoints/step-00000004/COMPLETE").is_file() or None, process)
    s3_server.stop_gateway()
    wait_for(lambda: "failed transiently" in (tmp_path / f"{name}.log").read_text() or None, process)


def test_gateway_restart_and_kill_mid_upload(s3_server, bucket, token_dataset, tmp_path):
    # the endpoint goes away when the local checkpoint of step 4 is complete, i.e. while it uploads
    url = f"{bucket}/restarted"
    config = s3_config(tmp_path, token_dataset, "restarted", url, s3_server)
    process = start(config, tmp_path / "restarted.log")
    try:
        break_upload_of_step_4(tmp_path, "restarted", process, s3_server)
        s3_server.start_gateway()
        assert process.wait(timeout=300) == 0, (tmp_path / "restarted.log").read_text()[-3000:]
    finally:
        ensure_gateway(s3_server)
        process.kill()
    assert remote(url, s3_server).complete_checkpoints() == ["step-00000008", "step-00000010", "step-00000012"]
    uninterrupted = losses(tmp_path / "restarted")

    # killed while its upload of step 4 fails: step 2 is the newest complete checkpoint on S3
    url = f"{bucket}/killed"
    config = s3_config(tmp_path, token_dataset, "killed", url, s3_server)
    process = start(config, tmp_path / "killed.log")
    try:
        break_upload_of_step_4(tmp_path, "killed", process, s3_server)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        ensure_gateway(s3_server)
        process.kill()
    assert remote(url, s3_server).complete_checkpoints() == ["step-00000002"]

    shutil.rmtree(tmp_path / "killed")  # another machine: nothing local
    result = run("python", 1, config, "--resume", "auto")
    assert "downloading checkpoint" in result.stderr and "step-00000002" in result.stderr
    assert losses(tmp_path / "killed") == {step: loss for step, loss in uninterrupted.items() if step > 2}
    assert remote(url, s3_server).complete_checkpoints() == ["step-00000008", "step-00000010", "step-00000012"]

    # the same checkpoints at another world size: 2 ranks (DDP reads the single engine's whole tensors)
    shutil.rmtree(tmp_path / "killed")
    two = s3_config(tmp_path, token_dataset, "killed", url, s3_server, kind="accelerate", strategy="ddp")
    two.write_text(yaml.safe_dump({**yaml.safe_load(two.read_text()), "run": {**yaml.safe_load(two.read_text())["run"], "max_steps": 14}}))
    result = run("torchrun", 2, two, "--resume", "auto")
    assert "elastic resume: 1 rank(s) -> 2" in result.stderr
    assert sorted(losses(tmp_path / "killed")) == [13, 14]
    assert remote(url, s3_server).complete_checkpoints() == ["step-00000010", "step-00000012", "step-00000014"]


def ensure_gateway(s3_server) -> None:
    if not any(os.path.basename(p.args[0]) == "radosgw" for p in s3_server.processes):
        s3_server.start_gateway()


def local_checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    """A complete checkpoint folder as CheckpointManager writes it (files, then the marker listing them)."""
    folder = root / f"step-{step:08d}"
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "deepspeed" / "shard.pt").write_bytes(payload * step)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / "COMPLETE").write_text(json.dumps({"step": step, "files": files}))
    return folder


def test_only_complete_checkpoints_are_trusted_and_pruned(s3_server, bucket, tmp_path):
    import s3fs

    url = f"{bucket}/unit"
    store, fs = remote(url, s3_server), s3fs.S3FileSystem(**s3_server.storage_options())
    root = url.removeprefix("s3://")
    store.upload(local_checkpoint(tmp_path, 2), best="step-00000002", keep_last=2)
    fs.pipe_file(f"{root}/step-00000004/deepspeed/shard.pt", b"half")  # an upload killed before its marker
    damaged = local_checkpoint(tmp_path, 6)
    fs.put_file(str(damaged / "COMPLETE"), f"{root}/step-00000006/COMPLETE")  # a marker whose files are missing
    assert store.complete_checkpoints() == ["step-00000002"]
    assert fs.cat_file(f"{root}/latest").decode().strip() == "step-00000002"

    store.remove_leftovers()
    assert not fs.exists(f"{root}/step-00000004")
    for step in (8, 10, 12):
        store.upload(local_checkpoint(tmp_path, step), best="step-00000002", keep_last=2)
    # keep_last 2 of the complete ones; best kept; the damaged one is not complete, so never pruned as one
    assert store.complete_checkpoints() == ["step-00000002", "step-00000010", "step-00000012"]
    assert fs.exists(f"{root}/step-00000006/COMPLETE")
    assert fs.cat_file(f"{root}/latest").decode().strip() == "step-00000012"

    downloaded = store.download("step-00000012", tmp_path / "cache")
    assert (downloaded / "deepspeed" / "shard.pt").read_bytes() == b"weights" * 12
    assert not list((tmp_path / "cache").glob(".step-*"))


def test_missing_bucket_is_one_line(s3_server, token_dataset, tmp_path):
    config = s3_config(tmp_path, token_dataset, "nobucket", "s3://no-such-bucket/run", s3_server)
    result = run("python", 1, config, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "no-such-bucket" in lines[-1] and "does not exist" in lines[-1] and "Traceback" not in result.stderr


def test_reads_wait_for_a_restarting_gateway(s3_server, bucket, caplog):
    """A shard read (storage.read_bytes, what the loader calls) while radosgw is down is retried until
    it is back; an object that is not there stays a FileNotFoundError (the loader's "missing" shard)."""
    import threading

    import s3fs

    from sharding import storage

    url = f"{bucket}/reads/shard-000000.tar"
    s3fs.S3FileSystem(**s3_server.storage_options()).pipe_file(url.removeprefix("s3://"), b"tar bytes")
    # botocore retries a refused connection itself for ~10 s first; one attempt there keeps the test short
    options = {**s3_server.storage_options(), "config_kwargs": {"retries": {"max_attempts": 1}}}
    s3_server.stop_gateway()
    restart = threading.Timer(3.0, s3_server.start_gateway)
    restart.start()
    try:
        with caplog.at_level("WARNING", logger="tokfleet.storage"):
            assert storage.read_bytes(url, options) == b"tar bytes"
    finally:
        restart.join()
        ensure_gateway(s3_server)
    assert any("failed transiently" in record.getMessage() for record in caplog.records)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{bucket}/reads/absent.tar", s3_server.storage_options())
