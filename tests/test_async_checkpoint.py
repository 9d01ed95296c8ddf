"""Async checkpoints (`checkpoint.async_save`): the state is copied to host memory and written in the
background while training goes on.

With 2 ranks (DeepSpeed ZeRO-3 under torchrun, FSDP2 under accelerate launch): the losses of a run
with async saves equal those of the same run with synchronous saves; with FSDP2 a resume from a
checkpoint written in the background continues exactly as the run did (so DCP's staged copy was the
state of its step, not of a later one; DeepSpeed's and the whole-tensor copies are `to_host` clones,
and the SIGKILL test below resumes from one). A SIGKILL while the writer thread writes leaves the previous complete
checkpoint the one `--resume auto` takes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_distributed import ENGINES, env, launcher_command, losses, run, write_config
from trainer.checkpoint import CheckpointManager

STEPS = 6


@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_async_saves_train_and_resume_like_sync(tmp_path, token_dataset, engine):
    launcher, engine_cfg = ENGINES[engine]
    sync = write_config(tmp_path, token_dataset, "sync", engine_cfg, micro=4, steps=STEPS, checkpoint={"every_steps": 2})
    background = write_config(tmp_path, token_dataset, "async", engine_cfg, micro=4, steps=STEPS,
                              checkpoint={"every_steps": 2, "async_save": True})
    run(launcher, 2, sync)
    run(launcher, 2, background)
    assert losses(tmp_path / "async") == losses(tmp_path / "sync")
    assert [p.name for p in CheckpointManager(tmp_path / "async", 5).complete_checkpoints()] == \
        ["step-00000002", "step-00000004", "step-00000006"]

    if engine == "fsdp":  # DCP stages its own copy: the resume checks it was the state of step 4
        run(launcher, 2, background, "--resume", str(tmp_path / "async" / "checkpoints" / "step-00000004"))
        assert losses(tmp_path / "async") == losses(tmp_path / "sync")


def test_sigkill_during_a_background_write_keeps_the_previous_checkpoint(tmp_path, token_dataset):
    """A model of ~50 MB of state, so the writer thread is caught writing: the kill comes when the
    temporary folder of the second checkpoint holds its first file."""
    config = write_config(tmp_path, token_dataset, "killed", {"kind": "single"}, micro=4, steps=8,
                          checkpoint={"every_steps": 2, "async_save": True}, model={"args": {"n_layer": 2, "n_embd": 512}})
    run_dir = tmp_path / "killed"
    process = subprocess.Popen([*launcher_command("python", 1), str(config)], env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        partial = wait_for(lambda: next((p for p in (run_dir / "checkpoints").glob(".step-00000004.tmp-*")
                                         if any(p.iterdir())), None), process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (partial / "COMPLETE").exists(), "the kill came after the write: make the state bigger"
    manager = CheckpointManager(run_dir, 5)
    assert manager.latest().name == "step-00000002"
    run("python", 1, config, "--resume", "auto")
    assert sorted(losses(run_dir)) == list(range(1, 9))  # metrics cut back to step 2, then steps 3-8
    assert manager.latest().name == "step-00000008"
    assert not list((run_dir / "checkpoints").glob(".step-*")), "the killed save's temporary folder was left"


def wait_for(found, process: subprocess.Popen, timeout_s: float = 120.0):
    """Poll `found()` every 2 ms until it returns something; the run must not end first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = found()
        except FileNotFoundError:
            value = None
        if value is not None:
            return value
        assert process.poll() is None, "the run ended before the moment to kill it"
        time.sleep(0.002)
    raise AssertionError("timed out waiting for the moment to kill the run")
