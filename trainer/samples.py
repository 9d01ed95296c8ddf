"""Samples during training (`eval.sample_every`): what the model writes now, next to its loss.

Every `eval.sample_every` steps (and at the last step) the model, in eval mode and without gradients,
- continues each of `eval.sample_prompts` (a causal model: gpt, FlatGPT on text ids) by
  `eval.sample_max_new_tokens` tokens, sampled at `eval.sample_temperature` / `eval.sample_top_k`;
- or, a latent text model (TokCom): reconstructs each prompt (with its token accuracy) and, from the
  diffusion stage, generates `len(sample_prompts)` sequences from noise (`eval.sample_num_steps` Euler steps).
The lines go to `runs/NAME/samples.jsonl` ({"step", "kind", "prompt", "text", ...}) and to a wandb table.

Sampling draws from its own generator seeded with (run.seed, step): the training RNG stream is not
touched, so a resumed run trains exactly as an uninterrupted one, and both write the same samples.
Every rank samples in lockstep (ZeRO-3 gathers parameters in every forward, on every rank, so every
rank must run the same forwards); rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn



class TrainingSampler:
    def __init__(self, model: nn.Module, cfg, run_dir: Path, tokenizer_url: str, storage_options: dict[str, Any] | None,
                 device: torch.device, is_main: bool):
        from sharding.text_tokenizer import load_tokenizer

        self.model, self.cfg, self.device, self.is_main = model, cfg, device, is_main
        self.path = Path(run_dir) / "samples.jsonl"
        self.tokenizer, self.eos_id = load_tokenizer(tokenizer_url, storage_options)

    def is_due(self, step: int, last_step: int) -> bool:
        every = self.cfg.eval.sample_every
        return every > 0 and (step % every == 0 or step == last_step)

    @torch.no_grad()
    def sample(self, step: int) -> list[dict[str, Any]]:
        """This step's samples (every rank computes them; rank 0 writes them)."""
        model, was_training = self.model, self.model.training
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.run.seed * 1_000_003 + step)
        model.eval()
        try:
            if getattr(model, "inference_modes", None):
                lines = self._latent(generator)
            else:
                lines = self._continue(generator)
        finally:
            model.train(was_training)
        lines = [{"step": step, **line} for line in lines]
        if self.is_main:
            with open(self.path, "a") as handle:
                handle.writelines(json.dumps(line) + "\n" for line in lines)
        return lines

    def _continue(self, generator: torch.Generator) -> list[dict[str, Any]]:
        evaluation = self.cfg.eval
        limit = self.model.config.sequence_len
        lines = []
        for prompt in evaluation.sample_prompts:
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)[-(limit - 1):] or [self.eos_id]
            max_new = min(evaluation.sample_max_new_tokens, limit - len(ids))
            out = self.model.generate(torch.tensor([ids], device=self.device), max_new, temperature=evaluation.sample_temperature,
                                      top_k=evaluation.sample_top_k or None, generator=generator)
            text = self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=False)
            lines.append({"kind": "continuation", "prompt": prompt, "text": text})
        return lines

    def _latent(self, generator: torch.Generator) -> list[dict[str, Any]]:
        config = self.model.config
        length = config.num_chunks * config.chunk_size
        lines = []
        for prompt in self.cfg.eval.sample_prompts:
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)[:length]
            padded = torch.tensor([ids + [self.eos_id] * (length - len(ids))], device=self.device)
            rebuilt = self.model.reconstruct(padded)[0]
            accuracy = (rebuilt[: len(ids)] == padded[0, : len(ids)]).float().mean().item() if ids else 1.0
            lines.append({"kind": "reconstruction", "prompt": prompt, "accuracy": accuracy,
                          "text": self.tokenizer.decode(rebuilt.tolist(), skip_special_tokens=True)})
        if "generate" in self.model.inference_modes:
            ids = self.model.generate(None, self.cfg.eval.sample_num_steps, len(self.cfg.eval.sample_prompts), generator)
            lines += [{"kind": "generation", "prompt": "", "text": self.tokenizer.decode(row, skip_special_tokens=True)}
                      for row in ids.tolist()]
        return lines


def wandb_table(lines: list[dict[str, Any]]):
    """The samples of one step as a wandb table."""
    import wandb

    columns = ["step", "kind", "prompt", "text"]
    return wandb.Table(columns=columns, data=[[line.get(c, "") for c in columns] for line in lines])
