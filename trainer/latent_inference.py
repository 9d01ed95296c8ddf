"""`tokfleet generate --mode generate|reconstruct|encode` for latent chunk models (TokCom).

A model offers this by declaring `inference_modes` (the modes it supports) and `stage`, and the methods
`generate(num_chunks, num_steps, batch_size, generator)`, `reconstruct(ids)` and `encode(ids)`
(modeling/text/tokcom.py). Input text is tokenized with the checkpoint's tokenizer folder and, as in the
seed, padded with EOS (or truncated) to num_chunks * chunk_size tokens (default: the model's
sequence_len, the seed's max_length).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError


@dataclass
class LatentRequest:
    mode: str  # one of the model's inference_modes
    input_text: str | None = None  # reconstruct / encode
    num_chunks: int | None = None  # None: sequence_len // chunk_size
    num_steps: int = 50  # Euler steps (generate)
    batch_size: int = 1  # sequences to generate
    output_file: str | None = None  # generate/reconstruct: text; encode: latents (torch.save)
    seed: int = 0  # noise seed (generate)


def seed_config(model: nn.Module, state: dict[str, Any], tokenizer_dir: Path | None) -> dict[str, Any]:
    """The seed's checkpoint `config` block (stage, tokenizer_path, max_length, chunk_size, noise_std),
    recovered from a tokfleet checkpoint's trainer_state.json (see modeling/text/tokcom.py)."""
    args = state["model"]["args"]
    config = {"stage": model.stage, "tokenizer_path": str(tokenizer_dir) if tokenizer_dir else None,
              "max_length": args["sequence_len"], "chunk_size": args["chunk_size"]}
    if "noise_std" in args:
        config["noise_std"] = args["noise_std"]
    return config


def _text_ids(model: nn.Module, tokenizer: Any, eos_id: int, request: LatentRequest, device: torch.device) -> tuple[torch.Tensor, int]:
    """The input text as (1, num_chunks * C) ids, EOS-padded or truncated, and its unpadded length."""
    if not request.input_text:
        raise UserError(f"--input_text is required for --mode {request.mode}")
    config = model.config
    length = (request.num_chunks or config.num_chunks) * config.chunk_size
    ids = tokenizer.encode(request.input_text, add_special_tokens=False)[:length]
    if ids and max(ids) >= config.vocab_size:
        raise UserError(f"the checkpoint's tokenizer gives id {max(ids)}, outside the model's vocabulary of {config.vocab_size}")
    num_text = len(ids)
    ids = ids + [eos_id] * (length - num_text)
    return torch.tensor([ids], device=device), num_text


def _generate(model, tokenizer, eos_id, request: LatentRequest, device) -> list[str]:
    generator = torch.Generator(device=device).manual_seed(request.seed)
    try:
        ids = model.generate(request.num_chunks, request.num_steps, request.batch_size, generator)
    except ValueError as error:
        raise UserError(f"--num_chunks/--num_steps/--batch_size: {error}") from None
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids.tolist()]
    if request.output_file:
        Path(request.output_file).write_text("".join(f"[Sequence {i + 1}]\n{text}\n\n" for i, text in enumerate(texts)))
    lines = [f"[Sequence {i + 1}]\n{text}" for i, text in enumerate(texts)]
    return lines + ([f"saved to {request.output_file}"] if request.output_file else [])


def _reconstruct(model, tokenizer, eos_id, request: LatentRequest, device) -> list[str]:
    ids, num_text = _text_ids(model, tokenizer, eos_id, request, device)
    reconstructed = model.reconstruct(ids)  # (1, L)
    # accuracy over the text's own tokens (the EOS padding is filler)
    matches = (reconstructed[0, :num_text] == ids[0, :num_text]).float()
    accuracy = 100 * matches.mean().item() if num_text else 100.0
    text = tokenizer.decode(reconstructed[0].tolist(), skip_special_tokens=True)
    if request.output_file:
        Path(request.output_file).write_text(text)
    return ["Original:", tokenizer.decode(ids[0, :num_text].tolist(), skip_special_tokens=True),
            "Reconstructed:", text, f"Token accuracy: {accuracy:.2f}% ({num_text} tokens)"]


def _encode(model, tokenizer, eos_id, request: LatentRequest, device) -> list[str]:
    ids, _ = _text_ids(model, tokenizer, eos_id, request, device)
    latents = model.encode(ids).float().cpu()  # (1, N, D)
    lines = [f"Latent vectors shape: {tuple(latents.shape)}",
             f"mean {latents.mean().item():.6f}, std {latents.std().item():.6f}, "
             f"min {latents.min().item():.6f}, max {latents.max().item():.6f}"]
    if request.output_file:
        torch.save(latents, request.output_file)
        lines.append(f"Latent vectors saved to {request.output_file}")
    return lines


MODES = {"generate": _generate, "reconstruct": _reconstruct, "encode": _encode}


def run_latent_mode(model: nn.Module, tokenizer: Any, eos_id: int, request: LatentRequest,
                    device: torch.device) -> list[str]:
    """Run one mode; returns the lines to print."""
    if request.mode not in model.inference_modes:
        raise UserError(f"--mode {request.mode}: a {model.stage} checkpoint supports {', '.join(model.inference_modes)}"
                        + (" (generating needs the stage-2 diffusion checkpoint)" if request.mode == "generate" else ""))
    return MODES[request.mode](model, tokenizer, eos_id, request, device)
