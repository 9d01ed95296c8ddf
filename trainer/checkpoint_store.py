"""Checkpoints mirrored to object storage (`checkpoint.url: s3://bucket/run/checkpoints`).

Design: the engines keep writing a checkpoint into the local run directory as always (their
writers - DeepSpeed, DCP, safetensors - want a filesystem, and the local copy is what `--resume`
reads back fastest); once it is complete there, rank 0 uploads it with one batched fsspec `put`
and the object store becomes the copy that survives the machine. Object stores have no rename, so
completeness is said by order of writes, not by an atomic move:

1. the files go under `URL/step-NNNNNNNN/` (an earlier, incomplete upload of that step is deleted first,
   a complete one loses its `COMPLETE` marker first), which is a temporary prefix until step 2;
2. `URL/step-NNNNNNNN/COMPLETE` (the local marker: every file with its size) is written after every file;
3. `URL/latest` is written last.

Readers trust only a prefix with a marker whose files are all there with their sizes, so a save killed
at any point leaves the previous complete checkpoint the newest one; `keep_last` deletes only complete,
older checkpoints (never `best`). `--resume auto` downloads the newest remote checkpoint into the local
`checkpoints/` folder (unless the same step is there already) and loads it like a local one, at any
world size. Every remote operation is retried on transient errors (sharding.storage.retrying).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from core.errors import UserError
from sharding import storage

log = logging.getLogger("tokfleet.trainer")

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
BEST_FILE = "best"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class RemoteCheckpoints:
    """The checkpoints under one object-store prefix. Rank 0 alone calls the writing methods."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, retry_s: float | None = None):
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.retry_s = retry_s
        self.fs, self.root = storage.filesystem(self.url, self.storage_options)
        self.root = self.root.rstrip("/")

    def _retrying(self, what: str, operation):
        return storage.retrying(self.url, what, operation, self.retry_s)

    def _step_prefixes(self) -> dict[str, dict[str, int]]:
        """{step-NNNNNNNN: {relative file name: size}} of everything under the prefix (one listing)."""
        def listing():
            self.fs.invalidate_cache(self.root)
            return self.fs.find(self.root, detail=True)

        listed = self._retrying("listing checkpoints", listing)
        bucket = self.root.split("/", 1)[0]
        if not listed and not self._retrying("looking up the bucket", lambda: self.fs.exists(bucket)):
            raise UserError(f"checkpoint.url {self.url}: bucket {bucket!r} does not exist (create it first; tokfleet never creates buckets)")
        found: dict[str, dict[str, int]] = {}
        for path, info in listed.items():
            relative = path[len(self.root) + 1:]
            name, _, rest = relative.partition("/")
            if _STEP_DIR.match(name) and rest:
                found.setdefault(name, {})[rest] = int(info.get("size") or 0)
        return found

    def complete_checkpoints(self) -> list[str]:
        """Names of complete checkpoints (marker there, every file it lists there with its size), oldest first."""
        complete = []
        for name, files in sorted(self._step_prefixes().items()):
            if COMPLETE_MARKER not in files:
                continue
            marker = json.loads(self._retrying("reading a COMPLETE marker", lambda: self.fs.cat_file(f"{self.root}/{name}/{COMPLETE_MARKER}")))
            missing = [f for f, size in marker.get("files", {}).items() if files.get(f) != size]
            if missing:
                log.warning("%s/%s has a %s marker but %s is missing or short: passing over it", self.url, name, COMPLETE_MARKER, missing[0])
            else:
                complete.append(name)
        return complete

    def remove_leftovers(self) -> None:
        """Delete step prefixes without a marker (uploads that were killed; never loaded)."""
        for name, files in self._step_prefixes().items():
            if COMPLETE_MARKER not in files:
                log.info("removing the unfinished upload %s/%s", self.url, name)
                self._retrying(f"deleting {name}", lambda name=name: self.fs.rm(f"{self.root}/{name}", recursive=True))

    def upload(self, local: Path, best: str | None = None, keep_last: int = 1) -> None:
        """Upload complete local checkpoint `local` (files, then marker, then `latest`), point `best`,
        and delete complete checkpoints older than the newest `keep_last` (not `best`)."""
        name = local.name
        prefix = f"{self.root}/{name}"
        existing = self._step_prefixes().get(name)
        if existing:  # a re-save of this step (resumed from an older checkpoint), or an unfinished upload
            if COMPLETE_MARKER in existing:
                self._retrying(f"un-marking {name}", lambda: self.fs.rm_file(f"{prefix}/{COMPLETE_MARKER}"))
            self._retrying(f"clearing {name}", lambda: self.fs.rm(prefix, recursive=True))
        files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
        self._retrying(f"uploading {name} ({len(files)} files)",
                       lambda: self.fs.put([str(local / f) for f in files], [f"{prefix}/{f}" for f in files]))
        self._retrying(f"writing {name}/{COMPLETE_MARKER}", lambda: self.fs.put_file(str(local / COMPLETE_MARKER), f"{prefix}/{COMPLETE_MARKER}"))
        self._retrying(f"writing {LATEST_FILE}", lambda: self.fs.pipe_file(f"{self.root}/{LATEST_FILE}", f"{name}\n".encode()))
        if best is not None:
            self._retrying(f"writing {BEST_FILE}", lambda: self.fs.pipe_file(f"{self.root}/{BEST_FILE}", f"{best}\n".encode()))
        self.prune(keep_last, best)

    def prune(self, keep_last: int, best: str | None) -> None:
        for name in self.complete_checkpoints()[:-keep_last]:
            if name != best:
                self._retrying(f"deleting {name}", lambda name=name: self.fs.rm(f"{self.root}/{name}", recursive=True))

    def download(self, name: str, local_root: Path) -> Path:
        """Complete remote checkpoint `name` as `local_root/name` (a local copy of the same step is
        replaced); fetched into a temporary folder and renamed, so a killed download is never loaded."""
        final = local_root / name
        tmp = local_root / f".{name}.tmp-download-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info("downloading checkpoint %s/%s to %s", self.url, name, local_root)  # then checked against its marker, as local ones are
        self._retrying(f"downloading {name}", lambda: self.fs.get(f"{self.root}/{name}/", str(tmp), recursive=True))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final

    def move_aside(self) -> str:
        return storage.move_aside(self.url, self.storage_options)

