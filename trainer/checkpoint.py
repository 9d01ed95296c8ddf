"""Atomic checkpoints in the run directory, with retention and `--resume auto`.

Layout: `checkpoints/step-00000123/` holds the engine's files, `trainer_state.json` and,
written last, the `COMPLETE` marker; `checkpoints/latest` names the newest complete one.
A checkpoint is assembled in a hidden temporary folder and renamed into place, so a
crash mid-write leaves at worst a temporary folder that is never loaded and is cleaned
up by the next save.

With several ranks (the run directory on a shared filesystem), every rank writes its own
engine files into the one temporary folder; after a barrier rank 0 alone writes the trainer
state (which holds every rank's loader and RNG state), the marker, the rename and `latest`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from launch.errors import UserError
from trainer import distributed

STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_dir():
            _fsync_tree(path)  # engines with per-rank shards write a sub-folder
        elif path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file() and (directory / STATE_FILE).is_file()


def read_trainer_state(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"checkpoint not found: {directory}")
    if not is_complete(directory):
        raise UserError(f"checkpoint {directory} is incomplete (no {COMPLETE_MARKER} marker): it was never finished")
    path = directory / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"checkpoint file {path} is unreadable or corrupt: {error}") from None


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: `latest` when it names one, else a scan."""
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if is_complete(candidate):
                newer = [p for p in self.complete_checkpoints() if p.name > candidate.name]
                return newer[-1] if newer else candidate
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def save(self, step: int, write_files: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
        """Write a checkpoint for `step` atomically and return its folder.

        Every rank calls this (collectively); `write_files(tmp)` runs on every rank,
        `trainer_state` is used on rank 0 only.
        """
        is_main = distributed.rank() == 0
        final = self.root / step_dir_name(step)
        tmp = self.root / f".{final.name}.tmp-{distributed.broadcast_object(os.getpid())}"  # rank 0's pid names it
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        distributed.barrier()
        write_files(tmp)
        distributed.barrier()  # every rank's files are written
        if is_main:
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "files": files}))
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step after resuming from an older checkpoint
                stale = self.root / f".{final.name}.stale-{os.getpid()}"
                final.rename(stale)
                shutil.rmtree(stale)
            tmp.rename(final)
            _write_atomic(self.root / LATEST_FILE, final.name + "\n")
            self._prune()
        distributed.barrier()  # no rank goes on before the checkpoint is in place
        return final

    def _prune(self) -> None:
        for path in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.iterdir():  # leftovers of crashed saves (ours was renamed)
            if path.name.startswith(".step-"):
                shutil.rmtree(path, ignore_errors=True)

    def resolve(self, resume: str | None) -> Path | None:
        """`--resume auto|PATH` -> a complete checkpoint folder (None: start fresh)."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if path.is_dir() and not _STEP_DIR.match(path.name) and (path / "checkpoints").is_dir():
            latest = CheckpointManager(path, self.keep_last).latest()  # a run dir was given
            if latest is None:
                raise UserError(f"--resume {resume}: run directory has no complete checkpoint")
            return latest
        read_trainer_state(path)  # raises a clear error for missing/incomplete/corrupt
        return path
