"""Atomic checkpoints in the run directory, with retention and `--resume auto`.

Layout: `checkpoints/step-00000123/` holds the engine's files, `trainer_state.json` and,
written last, the `COMPLETE` marker; `checkpoints/latest` names the newest complete one and, with
`checkpoint.keep_best`, `checkpoints/best` the one with the best metric so far (never pruned).
A checkpoint is assembled in a hidden temporary folder and renamed into place, so a
crash mid-write leaves at worst a temporary folder that is never loaded and is cleaned
up by the next save.

With several ranks (the run directory on a shared filesystem), every rank writes its own
engine files into the one temporary folder; after a barrier rank 0 alone writes the trainer
state (which holds every rank's loader and RNG state), the marker, the rename, `latest` and `best`.

With `checkpoint.async_save` the engine files are written by a background thread from a copy in host
memory (trainer/async_checkpoint.py) and rank 0 finishes the checkpoint there; with `checkpoint.url`
rank 0 then uploads the complete checkpoint to object storage (trainer/checkpoint_store.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from core.errors import UserError, disk_fault
from trainer import distributed
from trainer.async_checkpoint import BackgroundSave, Writer
from trainer.checkpoint_store import RemoteCheckpoints

log = logging.getLogger("tokfleet.trainer")

STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
BEST_FILE = "best"
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
    """A complete checkpoint's trainer state; a UserError saying what `directory` is when it is not one."""
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"checkpoint not found: {directory}")
    expected = f"a checkpoint is a step-NNNNNNNN folder holding {STATE_FILE} and {COMPLETE_MARKER}, or give its run dir"
    if not directory.is_dir():
        raise UserError(f"{directory} is a file, not a checkpoint: {expected}")
    if not is_complete(directory):
        if (directory / COMPLETE_MARKER).is_file():
            raise UserError(f"checkpoint {directory} is damaged: its {COMPLETE_MARKER} marker is there but {STATE_FILE} is missing")
        if (directory / STATE_FILE).is_file() or _STEP_DIR.match(directory.name) or directory.name.startswith(".step-"):
            raise UserError(f"checkpoint {directory} is incomplete (no {COMPLETE_MARKER} marker): it was never finished")
        if (directory / "manifest.json").is_file():
            raise UserError(f"{directory} is a dataset root (it holds manifest.json), not a checkpoint: {expected}")
        if any((directory / name).exists() for name in ("checkpoints", "config.yaml", "metrics.jsonl")):
            raise UserError(f"{directory} is a run dir without a complete checkpoint (nothing to load in checkpoints/)")
        what = "an empty folder" if not any(directory.iterdir()) else f"a folder without {STATE_FILE}"
        raise UserError(f"{directory} is {what}, not a checkpoint: {expected}")
    path = directory / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"checkpoint file {path} is unreadable or corrupt: {error}") from None


def read_pointer(path: Path) -> Path | None:
    """The checkpoint folder a `checkpoints/latest` or `checkpoints/best` file names (None: `path` is no such
    file); a UserError when it names nothing that is there."""
    path = Path(path)
    if path.name not in (LATEST_FILE, BEST_FILE):
        return None
    if not path.exists() and path.parent.name == "checkpoints" and path.parent.is_dir():
        unset = " (a run writes it with checkpoint.keep_best set)" if path.name == BEST_FILE else ""
        raise UserError(f"{path} does not exist: the run has no {path.name} checkpoint yet{unset}")
    if not path.is_file():
        return None
    try:
        name = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"checkpoint pointer {path} is unreadable: {error}") from None
    if not _STEP_DIR.match(name):
        raise UserError(f"checkpoint pointer {path} holds {name[:40]!r}, not a step-NNNNNNNN checkpoint name")
    if not (path.parent / name).is_dir():
        raise UserError(f"checkpoint pointer {path} names {name}, which is not in {path.parent}")
    return path.parent / name


def verify_checkpoint(directory: Path) -> list[str]:
    """What is wrong with a complete checkpoint's files ([] when nothing): every file its COMPLETE marker
    lists is there with the size it was written with (so every rank's engine shard), trainer_state.json
    parses, and every safetensors file's header reads."""
    from safetensors import safe_open

    directory = Path(directory)
    problems = []
    try:
        marker = json.loads((directory / COMPLETE_MARKER).read_text())
    except (OSError, ValueError) as error:
        return [f"{COMPLETE_MARKER} unreadable: {str(error).splitlines()[0]}"]
    for name, size in (marker.get("files") or {}).items() if isinstance(marker, dict) else ():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} holds {path.stat().st_size} bytes, {size} were written")
    try:
        json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        problems.append(f"{STATE_FILE} is not readable JSON")
    for path in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001 - any reader failure: the file is damaged
            problems.append(f"{path.relative_to(directory)} is not a readable safetensors file ({str(error).splitlines()[0][:80]})")
    return problems


def move_aside(path: Path) -> Path:
    """Rename `path` to the first free `PATH.old-N` (N = 1, 2, ...) next to it; nothing is deleted."""
    for number in range(1, 10_000):
        target = path.with_name(f"{path.name}.old-{number}")
        if not target.exists():
            path.rename(target)
            return target
    raise UserError(f"{path}: 9999 older copies sit next to it already; remove some")


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int, remote: RemoteCheckpoints | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)
        self.remote = remote  # checkpoint.url: the object store every complete checkpoint is uploaded to
        self.pending: BackgroundSave | None = None  # the background save in flight (checkpoint.async_save)

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self, verify: bool = True) -> Path | None:
        """The newest complete checkpoint whose files check out (`verify_checkpoint`); a newer one that
        fails the checks (a torn copy, a damaged disk) is passed over with one warning line. (`latest`
        names the newest for people and scripts; a scan decides, so a stale pointer cannot mislead.)"""
        for candidate in reversed(self.complete_checkpoints()):
            problems = verify_checkpoint(candidate) if verify else []
            if not problems:
                return candidate
            log.warning("checkpoint %s fails its checks (%s): passing over it", candidate, problems[0])
        return None

    def remove_leftovers(self) -> None:
        """Temporary files of saves that were killed or failed (rank 0, before a run writes any), and
        unfinished uploads to checkpoint.url."""
        if self.remote is not None:
            self.remote.remove_leftovers()
        self._remove_local_leftovers()

    def _remove_local_leftovers(self) -> None:
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name.startswith(".step-"):
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith((f".{LATEST_FILE}.tmp-", f".{BEST_FILE}.tmp-")):
                path.unlink(missing_ok=True)

    def save(self, step: int, write_files: Callable[[Path], None], trainer_state: dict[str, Any], best_step: int | None = None) -> Path:
        """Write a checkpoint for `step` atomically and return its folder.

        Every rank calls this (collectively); `write_files(tmp)` runs on every rank,
        `trainer_state` and `best_step` (the step of the best checkpoint so far, this one included;
        None: no `best` to keep) are used on rank 0 only.
        """
        self.wait()  # a background save still in flight finishes first
        final, tmp = self._begin(step)
        with self._dropping_on_failure(step, tmp):
            write_files(tmp)
            distributed.barrier()  # every rank's files are written
            if distributed.rank() == 0:
                self._finish(step, final, tmp, trainer_state, best_step)
        distributed.barrier()  # no rank goes on before the checkpoint is in place
        return final

    def save_in_background(self, step: int, snapshot_files: Callable[[Path], Writer], trainer_state: dict[str, Any],
                           best_step: int | None = None) -> Path:
        """Like `save`, but `snapshot_files(tmp)` (collective) only copies the state to host memory and
        returns the writer of its files, which runs on a background thread with the rest of the save;
        returns the folder the checkpoint will have. The previous background save is waited for first."""
        self.wait()
        distributed.background_group()  # created by every rank here, before a writer thread needs it
        final, tmp = self._begin(step)
        with self._dropping_on_failure(step, tmp):
            write = snapshot_files(tmp)
        is_main = distributed.rank() == 0

        def finish_in_background() -> None:
            with self._dropping_on_failure(step, tmp):
                write()
                distributed.background_barrier()  # every rank's files are written
                if is_main:
                    self._finish(step, final, tmp, trainer_state, best_step)

        self.pending = BackgroundSave(final.name, finish_in_background)
        return final

    def wait(self) -> None:
        """Block until the background save in flight (if any) is complete; its error is raised here."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.wait()

    def _begin(self, step: int) -> tuple[Path, Path]:
        """(final folder, temporary folder) of the checkpoint of `step`; rank 0 creates the temporary one."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".{final.name}.tmp-{distributed.broadcast_object(os.getpid())}"  # rank 0's pid names it
        if distributed.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        distributed.barrier()
        return final, tmp

    @contextlib.contextmanager
    def _dropping_on_failure(self, step: int, tmp: Path):
        """A save that fails drops its temporary folder and keeps the previous checkpoint; a full disk
        is one UserError line naming the checkpoint left intact."""
        try:
            yield
        except KeyboardInterrupt:  # a second Ctrl-C: drop the partial checkpoint, keep the previous one
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (OSError, RuntimeError) as error:  # torch's zip writer reports a full disk as a RuntimeError
            fault = disk_fault(error, str(self.root))
            if fault is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            intact = self.latest()
            raise UserError(f"{fault} writing checkpoint step {step} in {self.root}; "
                            + (f"{intact.name} is intact" if intact else "no earlier checkpoint to keep")) from None

    def _finish(self, step: int, final: Path, tmp: Path, trainer_state: dict[str, Any], best_step: int | None) -> None:
        """Rank 0, once every rank's files are in `tmp`: trainer state, marker, rename, pointers, pruning, upload."""
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
        if best_step is not None:
            self._point_best(step_dir_name(best_step))
        self._prune()
        if self.remote is not None:
            self.remote.upload(final, step_dir_name(best_step) if best_step is not None else None, self.keep_last)

    def _point_best(self, name: str) -> None:
        """`best` names checkpoint `name`. Rewritten at every save, so it agrees with the trainer state even
        after a resume from an older checkpoint; when `name` is gone (pruned in a run resumed from before
        it), a `best` naming another checkpoint would mislead and is removed."""
        pointer = self.root / BEST_FILE
        if is_complete(self.root / name):
            if not pointer.is_file() or pointer.read_text().strip() != name:
                _write_atomic(pointer, name + "\n")
        elif pointer.is_file():
            log.warning("the best checkpoint so far, %s, is no longer in %s: removing the %s pointer", name, self.root, BEST_FILE)
            pointer.unlink()

    def best(self) -> Path | None:
        """The checkpoint `best` names (None when there is no pointer); a UserError when it names nothing."""
        return read_pointer(self.root / BEST_FILE)

    def _prune(self) -> None:
        try:
            best = self.best()
        except UserError:
            best = None
        for path in self.complete_checkpoints()[: -self.keep_last]:
            if path != best:  # keep_last never deletes the best checkpoint
                shutil.rmtree(path, ignore_errors=True)
        self._remove_local_leftovers()  # of crashed saves (ours was renamed)

    def claim(self, resume: str | None, overwrite: bool) -> Path | None:
        """Make sure a run that starts fresh (no --resume) writes over nothing: a run dir that already
        holds complete checkpoints is a UserError offering the ways on, or with `overwrite` is moved
        aside to RUN_DIR.old-N (by rank 0, never deleted). Collective. Returns where the old run went."""
        if resume and overwrite:
            raise UserError("--overwrite starts a new run in place of the old one; it does not go with --resume")
        complete = self.complete_checkpoints()  # every rank looks before any rank moves anything
        run_dir = self.root.parent
        if resume:
            return None
        remote = distributed.broadcast_object(self.remote.complete_checkpoints() if self.remote and distributed.rank() == 0 else [])
        if remote and not overwrite:
            raise UserError(f"checkpoint.url {self.remote.url} already holds a run's checkpoints (up to {remote[-1]}): continue it "
                            "with --resume auto, choose another checkpoint.url, or pass --overwrite to move them aside (nothing is deleted)")
        if not complete and not remote:
            return None
        if not overwrite:
            raise UserError(f"run.output_dir {run_dir} already holds a run (checkpoints up to step "
                            f"{int(_STEP_DIR.match(complete[-1].name).group(1))}): continue it with --resume auto, "
                            "choose another run.output_dir, or pass --overwrite to move it aside (nothing is deleted)")
        distributed.barrier()
        moved = None
        if distributed.rank() == 0:
            if remote:
                log.info("--overwrite: moved the checkpoints that were in %s to %s", self.remote.url, self.remote.move_aside())
            if complete:
                moved = move_aside(run_dir)
        distributed.barrier()
        return distributed.broadcast_object(moved)

    def _fetch_remote_latest(self) -> None:
        """Collective: rank 0 downloads the newest complete checkpoint of checkpoint.url into checkpoints/
        unless that step (or a newer one) is complete here already, as after a restart on the same machine."""
        if distributed.rank() == 0:
            remote = self.remote.complete_checkpoints()
            local = self.latest()
            if remote and (local is None or remote[-1] > local.name):
                self.remote.download(remote[-1], self.root)
        distributed.barrier()

    def resolve(self, resume: str | None) -> Path | None:
        """`--resume auto|best|PATH` -> a complete checkpoint folder (None: start fresh). Collective: rank 0
        alone reads the checkpoints' markers and checks their files (a marker lists every rank's files, so
        it grows with the world size) and broadcasts the answer, or its one-line error."""
        if not resume:
            return None
        if resume == "auto" and self.remote is not None:
            self._fetch_remote_latest()
        answer = None
        if distributed.rank() == 0:
            try:
                answer = (self._resolve(resume), None)
            except UserError as error:
                answer = (None, str(error))
        path, error = distributed.broadcast_object(answer)
        if error is not None:
            raise UserError(error)
        return path

    def _resolve(self, resume: str) -> Path | None:
        if resume == "best":
            if not (self.root / BEST_FILE).is_file():
                raise UserError(f"--resume best: {self.root} has no {BEST_FILE} pointer (a run with checkpoint.keep_best "
                                "writes it at its first checkpoint)")
            try:
                resume = str(self.best())
            except UserError as error:
                raise UserError(f"--resume best: {error}") from None
        if resume == "auto":
            latest = self.latest()
            complete = self.complete_checkpoints()
            if latest is None and complete:  # not a fresh start over damaged checkpoints: say so
                raise UserError(f"--resume auto: every checkpoint in {self.root} fails its checks (newest {complete[-1].name}: "
                                f"{verify_checkpoint(complete[-1])[0]}); see `tokfleet inspect`")
            return latest
        path = Path(resume)
        try:
            path = read_pointer(path) or path  # RUN/checkpoints/latest or best: the checkpoint it names
        except UserError as error:
            raise UserError(f"--resume: {error}") from None
        if path.is_dir() and not _STEP_DIR.match(path.name) and (path / "checkpoints").is_dir():
            latest = CheckpointManager(path, self.keep_last).latest()  # a run dir was given
            if latest is None:
                found = sorted(p.name for p in (path / "checkpoints").iterdir() if _STEP_DIR.match(p.name))
                holds = f"only incomplete or damaged ones: {', '.join(found[-3:])}" if found else "none"
                raise UserError(f"--resume {resume}: run directory has no complete checkpoint (checkpoints/ holds {holds})")
            return latest
        try:
            read_trainer_state(path)  # says what the path is when it is no complete checkpoint
        except UserError as error:
            raise UserError(f"--resume: {error}") from None
        problems = verify_checkpoint(path)
        if problems:
            raise UserError(f"--resume {resume}: the checkpoint fails its checks ({problems[0]}); see `tokfleet inspect`")
        return path
