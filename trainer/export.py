"""`tokfleet export CHECKPOINT --out DIR`: any checkpoint (ZeRO shards included) -> one safetensors model.

The output folder is a checkpoint of the single-device format (model.safetensors,
trainer_state.json with the model spec, the tokenizer, the COMPLETE marker), so
`tokfleet generate --checkpoint DIR` and `tokfleet inspect DIR` read it like any other.
Runs in one process with no GPU and no process group.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.errors import UserError, disk_fault
from modeling.registry import build_model
from trainer.checkpoint import COMPLETE_MARKER, STATE_FILE, read_trainer_state
from trainer.engines.single import MODEL_FILE, load_model_state
from trainer.inference import resolve_checkpoint, tokenizer_folder


def consolidated_state(directory: Path, state: dict) -> dict[str, torch.Tensor]:
    """The whole model's fp32 tensors from a checkpoint of any engine format."""
    fmt = state.get("format", "torch")
    if fmt == "torch":
        return load_model_state(directory)
    if fmt == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from trainer.engines.deepspeed import TAG
        from trainer.engines.expert_parallel import consolidated_state as expert_parallel_state

        experts_split = expert_parallel_state(directory, TAG)  # MoE experts split over ranks: not ZeRO's layout
        if experts_split is not None:
            return experts_split
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG))
        except (FileNotFoundError, ValueError, RuntimeError, KeyError, EOFError) as error:
            raise UserError(f"checkpoint {directory}: its DeepSpeed shards are unreadable: {str(error).splitlines()[0]}") from None
    if fmt == "dcp":
        from trainer.engines.fsdp import load_dcp_model_state

        return load_dcp_model_state(directory)
    raise UserError(f"checkpoint {directory}: unknown format {fmt!r}")


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    directory = resolve_checkpoint(checkpoint)
    state = read_trainer_state(directory)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: folder exists and is not empty (nothing was written)")
    tensors = {name: tensor.float().contiguous() for name, tensor in consolidated_state(directory, state).items()}

    spec = state["model"]  # check the tensors against the recorded architecture before writing anything
    expected = build_model(spec["name"], spec["flavor"], spec["args"], device="meta").state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise UserError(f"checkpoint {directory} does not match its model {spec['name']}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, tmp / MODEL_FILE)
        tokenizer = tokenizer_folder(directory, state)
        if tokenizer is not None:
            shutil.copytree(tokenizer, tmp / "tokenizer")
    except Exception as error:  # safetensors and shutil report a full disk in their own ways
        shutil.rmtree(tmp, ignore_errors=True)
        fault = disk_fault(error, str(tmp.parent))
        if fault is None:
            raise
        raise UserError(f"{fault} writing {out}: nothing was written; {directory} is intact") from None
    exported = {key: state.get(key) for key in ("step", "tokens", "samples", "model", "config", "token_grid")}
    exported.update({
        "format": "torch", "engine": "single", "world_size": 1,
        "tokenizer": "tokenizer" if tokenizer is not None else None,
        "exported_from": {"checkpoint": str(directory.resolve()), "format": state.get("format", "torch"),
                          "engine": state.get("engine"), "world_size": state.get("world_size"),
                          "engine_info": state.get("engine_info", {})},
    })
    (tmp / STATE_FILE).write_text(json.dumps(exported, indent=1))
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": state.get("step"), "exported": True}))
    if out.exists():
        out.rmdir()  # empty, checked above
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out
