"""The config fields that name local files and folders, made absolute.

Relative paths in a config mean "relative to the directory the command runs in". A job that
runs somewhere else (a Ray job's working directory is an uploaded copy of the checkout) must
still read and write what they meant where it was submitted, so its config is resolved against
the submitting directory first. URLs (`s3://...`), `{stdlib}` patterns, `~` paths (fsspec
expands them where the job runs) and hub dataset ids stay as they are.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")

# dotted field -> "path", "glob" (a list of patterns) or "maybe" (a local path only if it exists,
# else e.g. a hub id); a field a config class does not have is skipped
PATH_FIELDS = {
    "run.output_dir": "path",
    "data.dataset": "path",
    "engine.deepspeed_config": "path",
    "launch.slurm.template": "path",
    "source.paths": "glob",
    "source.hf_dataset": "maybe",
    "tokenizer.path": "path",
    "tokenizer.checkpoint": "path",
    "input.dataset": "path",
    "shards.output": "path",
}


def _is_relative_local(value: Any) -> bool:
    return (isinstance(value, str) and value != "" and "://" not in value
            and not value.startswith(("{", "~")) and not os.path.isabs(value))


def _owner(config: Any, dotted: str) -> tuple[Any, str] | None:
    """(the object holding the field, the field's name), or None when `config` has no such field."""
    *parents, leaf = dotted.split(".")
    owner = config
    for name in parents:
        owner = getattr(owner, name, None)
        if owner is None:
            return None
    return (owner, leaf) if hasattr(owner, leaf) else None


def absolute_paths(config: ConfigT, base: str | Path) -> ConfigT:
    """A copy of `config` whose relative local paths are joined onto `base`."""
    config = copy.deepcopy(config)
    base = Path(base).absolute()

    def resolve(value: str) -> str:
        return os.path.normpath(base / value) if _is_relative_local(value) else value

    for dotted, kind in PATH_FIELDS.items():
        found = _owner(config, dotted)
        if found is None:
            continue
        owner, leaf = found
        value = getattr(owner, leaf)
        if kind == "glob":
            setattr(owner, leaf, [resolve(pattern) for pattern in value])
        elif kind == "maybe":
            if _is_relative_local(value) and (base / value).exists():
                setattr(owner, leaf, resolve(value))
        else:
            setattr(owner, leaf, resolve(value))
    return config


def local_paths(config: Any) -> list[Path]:
    """The absolute local paths `config` names (patterns left out): the data a job reads and writes."""
    found = []
    for dotted, kind in PATH_FIELDS.items():
        owner_leaf = _owner(config, dotted)
        if owner_leaf is None or kind == "glob":
            continue
        value = getattr(*owner_leaf)
        if isinstance(value, str) and os.path.isabs(value):
            found.append(Path(value))
    return found
