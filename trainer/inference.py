"""Load a trained model (and its tokenizer folder) from a checkpoint or run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from modeling.registry import build_model, get_model_spec
from trainer.checkpoint import CheckpointManager, is_complete, read_pointer, read_trainer_state, verify_checkpoint
from trainer.engines.single import load_model_state


def resolve_checkpoint(path: str | Path, verify: bool = True) -> Path:
    """A checkpoint folder, a run dir (its newest complete checkpoint whose files check out) or a
    run's `checkpoints/latest` / `checkpoints/best` pointer (the checkpoint it names). With `verify`, a
    checkpoint folder whose files do not (trainer/checkpoint.py verify_checkpoint) is a UserError
    naming the first problem."""
    path = read_pointer(Path(path)) or Path(path)
    if (path / "checkpoints").is_dir():
        latest = CheckpointManager(path, keep_last=1).latest(verify=verify)
        if latest is None:
            raise UserError(f"run directory {path} has no complete checkpoint")
        return latest
    if verify and is_complete(path):
        problems = verify_checkpoint(path)
        if problems:
            raise UserError(f"checkpoint {path} fails its checks ({problems[0]}); see `tokfleet inspect {path}`")
    return path


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any], Path | None]:
    """(model in eval mode, trainer_state, tokenizer folder or None)."""
    directory = resolve_checkpoint(path)
    state = read_trainer_state(directory)
    spec = state["model"]
    # the checkpoint holds every weight: files that init_weights would read (a frozen stage-1 model) are not needed
    args = {**spec["args"], **dict.fromkeys(get_model_spec(spec["name"]).weight_file_fields)}
    model = build_model(spec["name"], spec["flavor"], args, device=device)
    try:
        model.load_state_dict(load_model_state(directory, device))
    except RuntimeError as error:
        raise UserError(f"checkpoint {directory} does not match its recorded model: {str(error).splitlines()[0]}") from None
    model.eval()
    return model, state, tokenizer_folder(directory, state)


def tokenizer_folder(directory: Path, state: dict[str, Any]) -> Path | None:
    """The tokenizer a checkpoint names: inside it (exports) or in its run dir (training checkpoints)."""
    name = state.get("tokenizer")
    if not name:
        return None
    for candidate in (directory / name, directory.parent.parent / name):
        if candidate.is_dir():
            return candidate
    return None
