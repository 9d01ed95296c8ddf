"""The training loop: build model, data and engine from a TrainConfig, train, checkpoint, resume."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import fsspec
import torch
from tqdm import tqdm

from core.config import TrainConfig, save_config
from core.errors import UserError
from core.redact import public_dict
from modeling.registry import build_model, get_model_spec, model_config
from trainer.best_checkpoint import BestCheckpoint
from trainer.compile import compile_model
from trainer.classification import ClassificationTask, resolve_classifier_args
from trainer.checkpoint import CheckpointManager, read_trainer_state, step_dir_name
from trainer.checkpoint_store import RemoteCheckpoints
from trainer.data import TASK_BATCHES, Batches, num_tokens, read_manifest, resolve_num_streams, split_has_samples
from trainer import distributed
from trainer.engines import build_engine, engine_device
from trainer.host_memory import release_freed_memory, shards_parameters
from trainer.metrics import MetricsLogger, PeakFlops, plot_losses, truncate_jsonl
from trainer.optim import schedule_span
from trainer.preemption import PreemptionWatcher
from trainer.reports import ReportWindow
from trainer.run_plots import draw_reconstruction, draw_run_plots
from trainer.samples import TrainingSampler
from trainer.series_forecast import series_model_args
from trainer.resume_state import parts_summary, rank_parts, read_rank_resume, saved_num_streams
from trainer.rng import rng_state, seed_everything, set_rng_state
from trainer.token_tasks import RAW_KINDS, GridSource, GridTask, resolve_grid_args
from trainer.weights import init_from_checkpoint
from sharding import storage
from sharding.token_grid import TokenGrid

RECONSTRUCTION_TASKS = ("signal_reconstruction", "video_reconstruction", "signal_forecast")  # plotted at evals
PLOT_INTERVAL_S = 60.0
log = logging.getLogger("tokfleet.trainer")


def grid_source(cfg: TrainConfig, manifest) -> GridSource | None:
    """The token grid a run trains on: a token dataset's, or raw windows/clips tokenized on the fly
    for a sequence model; None for packed token sequences and tokenizer training."""
    try:
        task = get_model_spec(cfg.model.name).task
    except ValueError as error:
        raise UserError(f"model.name: {error}") from None
    if task == "classification":  # classifiers read token windows whole (trainer.classification)
        return None
    if TokenGrid.from_manifest(manifest, cfg.data.dataset) is not None or (manifest.kind in RAW_KINDS and task == "causal_lm"):
        return GridSource(manifest, cfg.model.args, cfg.data.dataset)
    return None


def resolve_model_args(cfg: TrainConfig, manifest, source: GridSource | None = None) -> dict[str, Any]:
    """Flavor + overrides, with vocabulary and sequence length (or the code grid) taken from the dataset."""
    if source is not None:
        return resolve_grid_args(cfg.model.name, cfg.model.flavor, cfg.model.args, source)
    args = dict(cfg.model.args)
    try:
        spec = get_model_spec(cfg.model.name)
    except ValueError as error:
        raise UserError(f"model.name: {error}") from None
    if spec.task == "classification":
        return resolve_classifier_args(cfg.model.name, cfg.model.flavor, args, manifest, cfg.data.dataset)
    fields = {field.name for field in dataclasses.fields(spec.config_cls)}
    # a time-series model takes its window sizes (context_length, input_size, ...) from the data
    args = series_model_args(cfg.model.name, spec.task, fields, args, manifest, cfg.data.dataset)
    # token models take their vocabulary and context from the data; signal models have neither field
    if "vocab_size" in fields and manifest.vocab_size:
        args.setdefault("vocab_size", manifest.vocab_size)
        if args["vocab_size"] < manifest.vocab_size:
            raise UserError(f"model.args.vocab_size={args['vocab_size']} is smaller than the dataset's vocabulary ({manifest.vocab_size})")
    if "sequence_len" in fields and manifest.vocab_size:
        args.setdefault("sequence_len", manifest.seq_len)
        if args["sequence_len"] < manifest.seq_len:
            raise UserError(f"model.args.sequence_len={args['sequence_len']} is shorter than the dataset's sequences ({manifest.seq_len})")
    set_window_shape(cfg.model.name, args, fields, manifest)
    try:
        return asdict(model_config(cfg.model.name, cfg.model.flavor, args))
    except ValueError as error:
        raise UserError(f"model: {error}") from None


def set_window_shape(name: str, args: dict[str, Any], fields: set[str], manifest) -> None:
    """A continuous-signal model (modeling/brain) reads windows of one shape: its num_channels and
    signal_length come from the dataset's windows (C, T), like a token model's vocabulary."""
    shape = (manifest.fields or {}).get("signal.npy", {}).get("shape") or []
    for field_name, value in zip(("num_channels", "signal_length"), shape):
        if field_name not in fields:
            continue
        if value is None:
            raise UserError(f"{name} reads windows of one shape; the dataset's windows have a varying {field_name} "
                            "(prepare it with one channel set, meg.channel_types)")
        args.setdefault(field_name, value)
        if args[field_name] != value:
            raise UserError(f"model.args.{field_name}={args[field_name]} does not match the dataset's windows ({value})")


def saved_model_args(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model args with the fields added to the config since then at their defaults."""
    try:
        return asdict(model_config(saved["name"], saved["flavor"], saved["args"]))
    except ValueError:
        return saved["args"]  # the comparison below names the differences


class Trainer:
    """One rank's trainer. Under a launcher every rank builds one; collectives keep them in step,
    and rank 0 alone writes the run directory's shared files (config, metrics, plots, trainer state)."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, stop_at_step: int | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.stop_at_step = stop_at_step
        self.dist_env = distributed.read_env()
        self.device = engine_device(cfg, self.dist_env)
        if self.dist_env.world_size > 1 or cfg.engine.kind == "deepspeed":
            distributed.init_process_group(self.dist_env, self.device, cfg.engine.timeout_s)
        self.is_main = self.dist_env.is_main
        self.run_dir = Path(cfg.run.output_dir)
        remote = RemoteCheckpoints(cfg.checkpoint.url, cfg.checkpoint.storage_options, cfg.checkpoint.retry_s) if cfg.checkpoint.url else None
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, remote)
        moved = self.checkpoints.claim(resume, overwrite)  # a fresh run never writes over another's checkpoints
        if moved is not None:
            log.info("--overwrite: moved the run that was in %s to %s", self.run_dir, moved)
        for sub in ("checkpoints", "plots", "logs"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.is_main:
            self.checkpoints.remove_leftovers()
        resume_from = self.checkpoints.resolve(resume)

        self.manifest = read_manifest(cfg.data)
        self.manifest_id = self.manifest.fingerprint()[:16]
        # the streams are fixed for a run: a resumed one keeps the checkpoint's (a config that names
        # another number is refused at the load); a run with too few for its ranks x workers stops here
        resumed = read_trainer_state(resume_from) if resume_from is not None else {"step": 0, "samples": 0}
        if cfg.data.num_streams is None:
            cfg.data.num_streams = saved_num_streams(resumed)
        cfg.data.num_streams = resolve_num_streams(cfg.data, self.manifest, self.dist_env.world_size, cfg.data.num_workers)
        self.grid_source = grid_source(cfg, self.manifest)
        self.model_args = resolve_model_args(cfg, self.manifest, self.grid_source)
        self.spec = get_model_spec(cfg.model.name)

        if cfg.engine.precision == "fp16" and self.device.type == "mps":
            raise UserError("engine.precision fp16 with a grad scaler is not supported on MPS; use bf16 or fp32")
        if self.device.type == "cpu" and shards_parameters(cfg.engine):
            release_freed_memory()  # before the build: every rank materialises the whole model once
        seed_everything(cfg.run.seed)  # the same initial weights on every rank
        model = build_model(cfg.model.name, cfg.model.flavor, self.model_args, device=self.device)
        if cfg.model.init_from and resume_from is None:  # a resumed run has the fine-tuned weights already
            init_from_checkpoint(model, cfg.model.init_from)
        if self.grid_source is not None:
            grid_task = GridTask(model, cfg.model.name, self.grid_source, self.device)
            self.to_batch, self.count_positions = grid_task, lambda fields, batch: grid_task.num_positions(batch)
        elif self.spec.task == "classification":
            classification = ClassificationTask(cfg.model.name, self.manifest, cfg.data.dataset)
            self.to_batch, self.count_positions = classification, lambda fields, batch: classification.num_positions(batch)
        else:
            self.to_batch, self.count_positions = TASK_BATCHES[self.spec.task], lambda fields, batch: num_tokens(fields)
        self.flops_per_token = model.num_flops_per_token()  # before ZeRO-3 partitions the parameters
        self.num_params = model.num_params()
        # run.max_epochs: the steps left are counted from the samples left, at this run's global batch
        self.num_train_samples = self.manifest.num_samples(cfg.data.train_split)
        self.schedule = schedule_span(cfg.run, cfg.optim, self.num_train_samples, self.dist_env.world_size,
                                      resumed["step"], resumed["samples"])
        self.max_steps = self.schedule.max_steps
        if self.is_main and cfg.run.max_epochs is not None:
            at = f"; LR schedule at step {resumed['step'] + self.schedule.offset:g} of {self.max_steps + self.schedule.offset:g}"
            log.info("run.max_epochs %d x %d train samples (%d seen) in global batches of %d x %d x %d ranks -> max_steps %d%s",
                     cfg.run.max_epochs, self.num_train_samples, resumed["samples"], cfg.optim.micro_batch_size,
                     cfg.optim.grad_accum_steps, self.dist_env.world_size, self.max_steps, at if self.schedule.offset else "")
        self.reports = ReportWindow(model)  # what the model reports besides its loss (modeling/reports.py)
        self.model = model  # the module itself (the engine may wrap it): reconstructions and samples
        self._last_plot = -math.inf
        self.sampler = self._sampler(model) if cfg.eval.sample_every else None
        compile_model(model, cfg.engine, self.device)  # engine.compile: its blocks, in place, before the engine wraps it
        self.engine = build_engine(cfg, model, self.device, self.dist_env.world_size, self.schedule)
        assert self.engine.world_size == self.dist_env.world_size, (self.engine.world_size, self.dist_env.world_size)

        key_log = self.run_dir / "logs" / f"sample_keys-rank{self.engine.rank}.jsonl" if cfg.data.log_sample_keys else None
        self.train_batches = Batches(
            self.manifest, cfg.data, cfg.data.train_split, batch_size=cfg.optim.micro_batch_size,
            rank=self.engine.rank, world_size=self.engine.world_size, seed=cfg.run.seed,
            shuffle=cfg.data.shuffle, key_log=key_log, vocab_size=self.model_args.get("vocab_size"),
            skip_log=self.run_dir / "logs" / f"skipped-rank{self.engine.rank}.jsonl",
        )
        if cfg.data.val_split and not split_has_samples(self.manifest, cfg.data.val_split):
            raise UserError(f"data.val_split '{cfg.data.val_split}': {cfg.data.dataset} has no '{cfg.data.val_split}' samples "
                            "(set data.val_split: '' to train without validation)")
        self.has_val = bool(cfg.data.val_split)
        self.val_accuracy: float | None = None  # a classifier's, at the last evaluation
        self.step, self.tokens_seen, self.samples_seen = 0, 0, 0
        # this rank's step losses since the last metrics record: a checkpoint keeps them, so a resumed
        # run logs the same mean at the next logging step as the uninterrupted run
        self.window_losses: list[torch.Tensor] = []
        self.best = BestCheckpoint(cfg.checkpoint.keep_best, cfg.checkpoint.keep_best_mode) if cfg.checkpoint.keep_best else None
        if resume_from is not None:
            self._load(resume_from, resumed)
        # records after the checkpoint (all of them on a fresh start) belong to a run that did not save
        # them: each rank empties its own key log (another rank may already be writing its next steps),
        # rank 0 the metrics and the logs of ranks this run does not have (resumed on fewer ranks)
        stale = [key_log] if key_log is not None else []
        if self.is_main:
            stale += [self.run_dir / "metrics.jsonl", self.run_dir / "samples.jsonl"]
            stale += [p for p in (self.run_dir / "logs").glob("sample_keys-rank*.jsonl")
                      if int(p.stem.rsplit("rank", 1)[1]) >= self.engine.world_size]
        for path in stale:
            truncate_jsonl(path, self.step)
        self.resumed_from = resume_from
        if self.is_main:
            self._copy_tokenizer()
            save_config(cfg, self.run_dir / "config.yaml")

    # ------------------------------------------------------------ checkpoint

    def _sampler(self, model) -> TrainingSampler:
        if self.spec.task not in ("causal_lm", "token_chunks") or self.grid_source is not None:
            raise UserError(f"eval.sample_every: {self.cfg.model.name} on {self.cfg.data.dataset} writes no text samples "
                            "(samples are for text models: gpt, TokCom)")
        tokenizer = self.manifest.tokenizer.get("path")
        if not tokenizer:
            raise UserError(f"eval.sample_every: {self.cfg.data.dataset} ships no text tokenizer, so samples cannot be written as text")
        return TrainingSampler(model, self.cfg, self.run_dir, storage.join(self.cfg.data.dataset, tokenizer),
                               self.cfg.data.storage_options, self.device, self.is_main)

    def trainer_state(self, digests: list[str] | None) -> dict[str, Any]:
        """Rank 0's small trainer state; `digests`: every rank's parts digest (rank 0; None on the others).
        Collective (the sums below): every rank calls it."""
        window = [float(loss) for loss in self.window_losses]
        if window:  # float64, summed in rank order: the mean a resume at another world size starts from
            window = (distributed.all_reduce_sum(torch.tensor(window, dtype=torch.float64)) / self.engine.world_size).tolist()
        skipped = self.train_batches.num_skipped()
        return {
            "step": self.step,
            "max_steps": self.max_steps,  # resolved: run.max_steps, or what run.max_epochs comes to
            "epochs": self.epochs_seen(),
            "tokens": self.tokens_seen,
            "samples": self.samples_seen,
            "world_size": self.engine.world_size,
            "engine": self.cfg.engine.kind,
            "format": self.engine.format,
            "engine_info": self.engine.describe(),
            "data": {"manifest_id": self.manifest_id, "dataset": self.cfg.data.dataset,
                     "skipped": {"shards": skipped["skipped_shards"], "samples": skipped["skipped_samples"]}},
            # each rank's loader position and RNG are in its own files (trainer/resume_state.py)
            "rank_states": digests and parts_summary(digests, self.train_batches.readers_per_rank, self.train_batches.num_streams),
            "loss_window": window,  # the mean over ranks of each step's loss since the last record
            "report_window": self.reports.state_dict(),
            "best": self.best.state_dict() if self.best else None,  # checkpoint.keep_best: its metric, value and step
            "model": {"name": self.cfg.model.name, "flavor": self.cfg.model.flavor, "args": self.model_args},
            "token_grid": self.grid_source.describe() if self.grid_source is not None else None,
            "tokenizer": "tokenizer" if (self.run_dir / "tokenizer").is_dir() else None,
            "config": public_dict(self.cfg),  # no credentials in checkpoints
        }

    def save_checkpoint(self, record: dict[str, Any] | None = None) -> Path:
        """`record`: the last metrics record; of this step, it makes the checkpoint a checkpoint.keep_best candidate."""
        if self.best is not None:
            self.best.offer(self.step, record or {}, is_scheduled=self._is_due(self.cfg.checkpoint.every_steps))
        best_step = self.best.step if self.best else None
        started = time.perf_counter()
        parts = rank_parts(self.engine.rank, self.engine.world_size, self.step, self.train_batches.state_dict(),
                           [float(loss) for loss in self.window_losses], rng_state())
        state = self.trainer_state(distributed.gather_object(parts.sha256))  # digests to rank 0 alone
        if self.cfg.checkpoint.async_save:
            def snapshot_files(directory: Path):
                write = self.engine.snapshot_checkpoint(directory)  # the state in host memory; written later
                parts.write(directory)  # this rank's small resume-state files, now
                return write

            saved = self.checkpoints.save_in_background(self.step, snapshot_files, state, best_step)
        else:
            def write_files(directory: Path) -> None:
                self.engine.save_checkpoint(directory)
                parts.write(directory)

            saved = self.checkpoints.save(self.step, write_files, state, best_step)
        if self.is_main:  # what a save costs the training loop (with async saves: the copy, and waiting for the previous write)
            log.info("checkpoint %s: training blocked %.3f s%s", saved.name, time.perf_counter() - started,
                     " (written in the background)" if self.cfg.checkpoint.async_save else "")
        return saved

    def _load(self, directory: Path, state: dict[str, Any]) -> None:
        """Resume from checkpoint `directory`, whose trainer state is `state`."""
        saved = state["model"]
        if saved["name"] == self.cfg.model.name:  # fields added since it was saved take their defaults
            saved = {**saved, "args": saved_model_args(saved)}
        if saved["name"] != self.cfg.model.name or saved["args"] != self.model_args:
            diff = [f"{k}={saved['args'].get(k)!r} (config: {v!r})" for k, v in self.model_args.items() if saved["args"].get(k) != v]
            raise UserError(f"checkpoint {directory} holds a different architecture: model {saved['name']!r}"
                            + (f", {', '.join(diff)}" if diff else f" (config: {self.cfg.model.name!r})"))
        saved_format = state.get("format", "torch")
        if saved_format != self.engine.format:
            raise UserError(f"checkpoint {directory} holds {saved_format!r} shards (engine {state['engine']!r}); this run's "
                            f"engine {self.cfg.engine.kind!r} reads {self.engine.format!r}: resume with the same engine, "
                            "or `tokfleet export` it and start from the exported weights")
        if state["data"]["manifest_id"] != self.manifest_id:
            raise UserError(f"checkpoint {directory} was trained on a different dataset (manifest {state['data']['manifest_id']}, "
                            f"now {self.manifest_id}): its data position does not apply")
        saved_world = state["world_size"]
        self.engine.load_checkpoint(directory, saved_world)
        self.step, self.tokens_seen, self.samples_seen = state["step"], state["tokens"], state["samples"]
        # this rank's own stream positions when nothing changed; a re-split of the streams it now owns when
        # the world size or data.num_workers did (elastic resume)
        batches = self.train_batches
        if saved_num_streams(state) != batches.num_streams:
            raise UserError(f"checkpoint {directory} was written with data.num_streams {saved_num_streams(state)}, this run has "
                            f"{batches.num_streams}: the streams are fixed for a run (leave data.num_streams unset to take the checkpoint's)")
        try:
            resume = read_rank_resume(directory, state, self.engine.rank, self.engine.world_size, batches.readers_per_rank, batches.streams)
            batches.load_state_dict(resume.data)
        except ValueError as error:
            raise UserError(f"checkpoint {directory}: its data position does not apply to this run: {error}") from None
        if saved_world != self.engine.world_size:
            log.info("elastic resume: %d rank(s) -> %d; data position re-split over the new ranks (rank %d read %d "
                     "state file(s), %d bytes)", saved_world, self.engine.world_size, self.engine.rank, len(resume.paths), resume.num_bytes)
        if resume.rng is not None:
            set_rng_state(resume.rng)
        else:
            seed_everything(self.cfg.run.seed + self.engine.rank)
        self.window_losses = [torch.tensor(loss, device=self.device) for loss in resume.loss_window]
        self.reports.load_state_dict(state.get("report_window"), self.device)
        if self.best is not None:
            self.best.load_state_dict(state.get("best"))

    def _copy_tokenizer(self) -> None:
        target = self.run_dir / "tokenizer"
        if target.is_dir():
            return
        fs, root = fsspec.core.url_to_fs(self.cfg.data.dataset, **self.cfg.data.storage_options)
        source = f"{root.rstrip('/')}/tokenizer"
        if fs.isdir(source):
            fs.get(source + "/", str(target), recursive=True)

    # ------------------------------------------------------------------ loop

    def evaluate(self) -> float | None:
        if not self.has_val:
            return None
        val = Batches(self.manifest, self.cfg.data, self.cfg.data.val_split, batch_size=self.cfg.optim.micro_batch_size,
                      rank=self.engine.rank, world_size=self.engine.world_size, seed=self.cfg.run.seed, shuffle=False,
                      num_workers=0, vocab_size=self.model_args.get("vocab_size"))
        batches = val.take(self.cfg.eval.num_batches)
        # every rank must run the same number of forwards (ZeRO-3 gathers parameters in each)
        batches = batches[:distributed.all_reduce_min(len(batches))]
        if not batches:
            return None
        losses, accuracies = [], []
        for batch in batches:
            losses.append(self.engine.eval_loss(self.to_batch(batch, self.device)))
            if self.spec.task == "classification":  # the batch's accuracy, which the classifier reports
                accuracies.append(self.model.last_report["accuracy"].value)
        self.val_accuracy = distributed.all_reduce_mean(torch.stack(accuracies).mean()).item() if accuracies else None
        if self.spec.task in RECONSTRUCTION_TASKS and self.grid_source is None:
            self._plot_reconstruction(self.to_batch(batches[0], self.device))
        return distributed.all_reduce_mean(torch.stack(losses).mean()).item()

    def _plot_reconstruction(self, inputs: dict[str, torch.Tensor]) -> None:
        """plots/reconstruction.png: a tokenizer's input vs its reconstruction for one validation sample (a
        continuous-signal model's forecast or reconstruction: its evaluation_pair). Every rank runs the model
        (ZeRO-3 / FSDP gather parameters in each forward); rank 0 draws."""
        from trainer.tokenizer_runner import TokenizerRunner

        was_training = self.model.training
        self.model.eval()
        try:
            if hasattr(self.model, "evaluation_pair"):
                pair = self.model.evaluation_pair(inputs["signal"])
                target, reconstruction = pair.target, pair.prediction
            else:
                decoded = TokenizerRunner.for_model(self.model, self.cfg.model.name, self.device).reconstruct(inputs)
                target, reconstruction = decoded.target, decoded.reconstruction
        finally:
            self.model.train(was_training)
        if self._is_plot_due(mark=False):
            shape = inputs["video"].shape if "video" in inputs else None  # (B, T, H, W, 3)
            draw_reconstruction(target[0], reconstruction[0], self.run_dir / "plots" / "reconstruction.png",
                                video_shape=None if shape is None else tuple(shape[1:4]), step=self.step)

    def plot(self) -> Path | None:
        """plots/loss.png from metrics.jsonl, with the data's unigram entropy as a reference level."""
        if self.engine.rank != 0:
            return None
        entropy = self.manifest.stats.get("unigram_entropy_nats")
        references = {"unigram entropy of the data": entropy} if entropy else None
        draw_run_plots(self.run_dir, self.reports.latest_usage)
        return plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "plots" / "loss.png", references)

    def epochs_seen(self) -> float:
        """Passes over the train split trained on: samples seen / train samples."""
        return round(self.samples_seen / max(1, self.num_train_samples), 6)

    def _is_plot_due(self, mark: bool = True) -> bool:
        """Rank 0 redraws plots/ at an eval at most every PLOT_INTERVAL_S (and always at the end): drawing
        takes ~0.3-1 s of a 2-core machine, too much when evals are seconds apart."""
        if not self.is_main or time.monotonic() - self._last_plot < PLOT_INTERVAL_S:
            return False
        if mark:
            self._last_plot = time.monotonic()
        return True

    def _is_due(self, every: int) -> bool:
        return self.step == self.max_steps or (every > 0 and self.step % every == 0)

    def train(self, preemption: PreemptionWatcher | None = None) -> dict[str, Any]:
        """Train to max_steps (or --stop-at-step, or a stop signal); `preemption`: a watcher installed
        by the caller (`tokfleet train` installs one before anything loads), else one for this loop."""
        cfg = self.cfg
        is_main = self.is_main
        peak = PeakFlops(self.device, cfg.engine.precision, cfg.engine.peak_flops)
        metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.run.name, public_dict(cfg), is_main)
        accum = cfg.optim.grad_accum_steps
        last_stop = self.stop_at_step if self.stop_at_step is not None else self.max_steps
        last_stop = min(last_stop, self.max_steps)
        progress = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step",
                        disable=True if not (cfg.logging.progress and is_main) else None,  # None: only on a terminal
                        dynamic_ncols=True)
        window_time, window_tokens = 0.0, 0
        last_record: dict[str, Any] = {}
        last_checkpoint = None
        owns_watcher = preemption is None
        if owns_watcher:  # SIGUSR1 (the cluster's warning), SIGINT: checkpoint after the step, stop
            preemption = PreemptionWatcher(announce=is_main)
        is_preempted = False
        if self.engine.world_size == 1 and preemption.is_interrupted:  # Ctrl-C during start-up: nothing new to save
            last_stop = self.step
        try:
            while self.step < last_stop:
                start = time.perf_counter()
                lr = self.engine.lr
                losses, step_tokens = [], 0
                for _ in range(accum):
                    fields = self.train_batches.next_batch(self.step + 1)
                    batch = self.to_batch(fields, self.device)
                    step_tokens += self.count_positions(fields, batch) * self.engine.world_size  # every rank's micro-batch has this shape
                    losses.append(self.engine.forward_backward(batch, 1.0 / accum))
                    self.reports.add()
                grad_norm = self.engine.optimizer_step()
                self.window_losses.append(torch.stack(losses).mean())
                self.step += 1
                self.tokens_seen += step_tokens
                self.samples_seen += cfg.optim.micro_batch_size * accum * self.engine.world_size
                window_tokens += step_tokens
                window_time += time.perf_counter() - start
                progress.update(1)

                is_eval = self._is_due(cfg.eval.every_steps)
                if self._is_due(cfg.logging.every_steps) or is_eval:
                    tokens_per_s = window_tokens / max(window_time, 1e-9)
                    record = {
                        # mean over the steps since the last record: one step's loss is noisy
                        "step": self.step, "loss": distributed.all_reduce_mean(torch.stack(self.window_losses).mean()).item(), "lr": lr,
                        "grad_norm": grad_norm.item(), "tokens": self.tokens_seen, "samples": self.samples_seen,
                        "tokens_per_s": tokens_per_s, "world_size": self.engine.world_size,
                        "mfu": peak.mfu(self.flops_per_token * tokens_per_s / self.engine.world_size),
                        "peak_flops": peak.value, "peak_source": peak.source,
                        "epoch": self.train_batches.epoch, "epochs": self.epochs_seen(), **self.train_batches.num_skipped(),
                        **self.reports.reduce(),
                    }
                    if (loss_scale := getattr(self.engine, "loss_scale", None)) is not None:  # fp16: the grad scaler's
                        record["loss_scale"] = loss_scale
                    if getattr(self.model, "attention_kernel", None):  # which kernel an att_type really ran
                        record["attention_kernel"] = self.model.attention_kernel
                    if is_eval:
                        val_loss = self.evaluate()
                        if val_loss is not None:
                            record["val_loss"] = val_loss
                        if self.val_accuracy is not None:
                            record["val_accuracy"] = self.val_accuracy
                    metrics.log(record)
                    last_record = record
                    if is_eval and self._is_plot_due():  # plots/ follows the run
                        draw_run_plots(self.run_dir, self.reports.latest_usage)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}")
                    window_time, window_tokens, self.window_losses = 0.0, 0, []
                if self.sampler is not None and self.sampler.is_due(self.step, self.max_steps):
                    metrics.log_samples(self.step, self.sampler.sample(self.step))
                every = cfg.checkpoint.every_steps
                # one process: after every step; several: at logging steps, where the ranks synchronise anyway
                is_checked = self.engine.world_size == 1 or self._is_due(cfg.logging.every_steps)
                is_preempted = self.step < last_stop and is_checked and preemption.should_stop()
                if (every > 0 and self.step % every == 0) or self.step == self.stop_at_step \
                        or (self.step == self.max_steps and cfg.checkpoint.save_final) or is_preempted:
                    last_checkpoint = self.save_checkpoint(last_record)
                if is_preempted:
                    self.checkpoints.wait()  # the checkpoint is complete before the stop is announced
                    if not preemption.is_interrupted:
                        log.info("stop signal: checkpointed step %d and stopped; resume with --resume auto", self.step)
                    break
            self.checkpoints.wait()  # a background save still in flight completes before the run ends
            distributed.barrier()
        finally:
            if owns_watcher:
                preemption.close()
            progress.close()
            metrics.close()
        return {
            "step": self.step, "finished": self.step >= self.max_steps, "preempted": is_preempted, "run_dir": str(self.run_dir),
            "max_steps": self.max_steps, "epoch": self.train_batches.epoch, "epochs": self.epochs_seen(),
            "interrupted": preemption.is_interrupted,  # Ctrl-C (even one that came during the last checkpoint)
            "saved_at_stop": last_checkpoint is not None and last_checkpoint.name == step_dir_name(self.step),
            "checkpoint": str(last_checkpoint or self.checkpoints.latest() or ""),
            "last": last_record, "resumed_from": str(self.resumed_from or ""), "num_params": self.num_params,
            "peak_flops": peak.value, "peak_source": peak.source,
        }
