"""The trainer against a minimal bare loop, in lockstep (benches: forecast, compile).

A Trainer and a BareLoop of the same model, optimizer, schedule and clipping train on the same
batches, one step each in turn: the host's load here swings 10-20% over seconds, more than the few
per cent measured, so runs back to back did not cancel it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


class BareLoop:
    """The same model, optimizer, schedule and clipping as plain PyTorch, one step per call, over the
    batches ({"idx", "targets"}) the trainer trains on, made beforehand; `compile_blocks`: torch compiles
    each block itself (`block.compile()`)."""

    def __init__(self, cfg, model_args: dict, batches: list[dict[str, torch.Tensor]], num_steps: int,
                 compile_blocks: bool = False):
        from modeling.registry import build_model
        from trainer.optim import build_optimizer, build_scheduler

        torch.manual_seed(cfg.run.seed)  # the trainer's seed_everything: the same initial weights
        self.model = build_model(cfg.model.name, cfg.model.flavor, model_args)
        if compile_blocks:
            for block in self.model.blocks:
                block.compile()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, num_steps)
        self.grad_clip = cfg.optim.grad_clip
        self.batches = batches
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.model.train()

    def step(self) -> None:
        start = time.perf_counter()
        batch = self.batches[len(self.losses)]
        loss = self.model(batch["idx"], batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.losses.append(loss.item())
        self.seconds.append(time.perf_counter() - start)

    def window_losses(self, every: int) -> dict[int, float]:
        """What the trainer logs every `every` steps: the mean loss of the steps since the last record."""
        return {step: statistics.mean(self.losses[step - every:step]) for step in range(every, len(self.losses) + 1, every)}


def run_round(cfg, bare: BareLoop, *, is_trainer_first: bool, num_steps: int, warmup_steps: int) -> dict:
    """One Trainer run in lockstep with a bare loop: after each trainer step (at the end of its
    optimizer step) one bare step runs, outside the trainer's time. The trainer's step k is the
    time from the end of bare step k - 1 to the end of its optimizer step k: loader, collate, the
    task's batch layout, forward, backward, step, and the previous step's metrics record; its phases
    (data, layout, the engine's compute) are timed on their own too. Steps ~0.1 s apart see the same
    host load. The first `warmup_steps` are not timed."""
    from trainer.loop import Trainer

    trainer = Trainer(cfg)
    if not is_trainer_first:
        bare.step()
    trainer_s, data_s, layout_s, forward_backward_s, optimizer_s = [], [], [], [], []
    engine, next_batch, to_batch = trainer.engine, trainer.train_batches.next_batch, trainer.to_batch
    forward_backward, optimizer_step = engine.forward_backward, engine.optimizer_step
    resumed = time.perf_counter()

    def paired_step():
        nonlocal resumed
        start = time.perf_counter()
        grad_norm = optimizer_step()
        end = time.perf_counter()
        optimizer_s.append(end - start)
        trainer_s.append(end - resumed)
        if len(bare.losses) < num_steps:
            bare.step()
        resumed = time.perf_counter()
        return grad_norm

    def timed(phase: list[float], call):
        def wrapper(*args):
            start = time.perf_counter()
            value = call(*args)
            phase.append(time.perf_counter() - start)
            return value
        return wrapper

    engine.optimizer_step = paired_step
    engine.forward_backward = timed(forward_backward_s, forward_backward)
    trainer.train_batches.next_batch = timed(data_s, next_batch)  # shard loader + collate
    trainer.to_batch = timed(layout_s, to_batch)  # the task's layout: tokens -> idx / targets
    trainer.train()
    assert len(trainer_s) == len(bare.seconds) == num_steps, (len(trainer_s), len(bare.seconds))
    records = [json.loads(line) for line in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed_steps = slice(warmup_steps, None)
    trainer_step, bare_step = statistics.mean(trainer_s[timed_steps]), statistics.mean(bare.seconds[timed_steps])
    compute_s = [f + o for f, o in zip(forward_backward_s, optimizer_s)]
    return {"trainer_step_s": trainer_step, "bare_step_s": bare_step, "ratio": bare_step / trainer_step,
            "step_ratios": [b / t for t, b in zip(trainer_s[timed_steps], bare.seconds[timed_steps])],
            "data_s": statistics.mean(data_s[timed_steps]), "layout_s": statistics.mean(layout_s[timed_steps]),
            "compute_s": statistics.mean(compute_s[timed_steps]),
            "trainer_losses": {r["step"]: r["loss"] for r in records},
            "bare_losses": bare.window_losses(cfg.logging.every_steps)}
