"""Resharding DeepSpeed ZeRO checkpoints for another world size (elastic resume).

ZeRO-1/2/3 optimizer (and ZeRO-3 parameter) partitions are cut for the world size that wrote
them, and DeepSpeed refuses to load them at another one. Its universal checkpoint format
stores every parameter whole, with its fp32 master copy and Adam moments, so any world size
can cut its own partitions from it. Rank 0 converts a checkpoint once (in one process, no
process group), next to the original shards, atomically; every rank then loads it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Callable

from core.errors import UserError
from trainer import distributed

UNIVERSAL_SUFFIX = "_universal"


def convert_to_universal(directory: Path, tag: str) -> str:
    """Write `directory/<tag>_universal/` from `directory/<tag>/` (if not there yet); returns its tag."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    universal = directory / f"{tag}{UNIVERSAL_SUFFIX}"
    if universal.is_dir():
        return universal.name
    tmp = directory / f".{universal.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(directory / tag), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                     # ZeRO-1/2 checkpoints lack the parameter-pattern info the converter wants; it can fill it in
                     inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal(args)
    except (AssertionError, FileNotFoundError, KeyError, RuntimeError, ValueError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"checkpoint {directory}: DeepSpeed could not convert it for another world size: "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    (directory / f"latest{UNIVERSAL_SUFFIX}").unlink(missing_ok=True)  # the converter's pointer; ours is `latest`
    tmp.rename(universal)
    return universal.name


def universal_checkpoint(directory: Path, tag: str, convert: Callable[[], str] | None = None) -> str:
    """Collective: rank 0 converts (`convert`, by default DeepSpeed's converter), everyone waits; returns
    the universal tag."""
    convert = convert or (lambda: convert_to_universal(directory, tag))
    universal, error = None, None
    if distributed.rank() == 0:
        try:
            universal = convert()
        except UserError as raised:
            error = str(raised)
    universal, error = distributed.broadcast_object((universal, error))
    if error:
        raise UserError(error)
    return universal
