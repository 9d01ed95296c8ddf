"""A trained tokenizer model (TOTEM, BrainOmni/BrainTokMix, Vidtok/VidtokRVQ) run on raw samples.

Used by `tokfleet pretokenize` (token arrays per raw sample, inside Ray Data actors) and by
`tokfleet eval` (the seed's quality targets). One place knows, per model family, which raw
dataset kind it reads, what its codes look like and how to decode them:

    family                       reads         tokens per sample          codes
    totem                        meg_windows   (C, W)                     codebook_size, 1 level
    BrainOmniCausalTokenizer*    meg_windows   (n_neuro, W, Q)            codebook_size per level, Q levels
    Vidtok                       video_clips   (T', H', W')               FSQ: prod(fsq_levels), 1 level
    VidtokRVQ                    video_clips   (T', H', W', Q)            codebook_size per level, Q levels

W = T / samples per token; T', H', W' = the clip divided by the temporal / spatial factors.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import UserError
from modeling.registry import build_model, get_model_spec
from sharding.manifest import Manifest
from sharding.pretokenize_signals import same_shape_batches
from sharding.token_grid import AXES_OF_TOKENIZER
from trainer.checkpoint import read_trainer_state
from trainer.data import TASK_BATCHES, collate
from trainer.engines.single import MODEL_FILE
from trainer.inference import load_model, resolve_checkpoint

INPUT_KINDS = {  # model name -> the raw dataset kind it tokenizes
    "totem": "meg_windows",
    "BrainOmniCausalTokenizer": "meg_windows",
    "BrainOmniCausalTokenizerSEANetChannelMix": "meg_windows",
    "Vidtok": "video_clips",
    "VidtokRVQ": "video_clips",
}
# the seed's goals (TOTEM): (metric, comparison, goal)
TARGETS = {"codebook_utilization": (">", 0.8), "perplexity": (">", 50.0), "token_entropy_bits": (">", 5.0),
           "reconstruction_mse": ("<", 0.05), "scale_error": ("<", 0.01)}
VARIANCE_FLOOR = 1e-5  # as TOTEM's revin_eps: a flat series does not blow up the normalised MSE
# TOTEM on a CPU encodes its series in chunks whose widest activation takes about this many bytes (32
# series of 500 samples for `small`). Measured on the 2-core CI machine (1 MiB L2 per core), `small`, one
# thread, 32 windows of 104 x 500: 31 ms a window vs 93 in one pass (~400 MB of activations); 1-4 MiB best.
CPU_CHUNK_BYTES = 2 << 20
# Vidtok on a CPU encodes its clips in chunks whose widest activation takes about this many bytes (4 clips
# of 8 x 64 x 64 for `small`, 1 clip for `full`). Measured on the 2-core CI machine (32 MiB shared L3), one
# thread, same codes: `small` 144 ms a clip in chunks of 4 vs 204 in one pass of 32 clips; `full` (16 x
# 128 x 128, 64 MiB per clip) 6.6 s a clip one at a time vs 8.4 in pairs or fours.
CPU_VIDEO_CHUNK_BYTES = 16 << 20


def file_sha256(path: Path, chunk_bytes: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TokenizerInfo:
    """What a tokenizer checkpoint is, read without loading its weights (the model is on the meta device)."""

    name: str
    flavor: str
    args: dict[str, Any]
    directory: Path
    step: int
    weights_sha256: str
    model: nn.Module  # meta device: config and shapes only

    @property
    def input_kind(self) -> str:
        return INPUT_KINDS[self.name]

    @property
    def codebook_size(self) -> int:
        return int(getattr(self.model, "codebook_size", None) or self.model.config.codebook_size)

    @property
    def num_levels(self) -> int:
        return int(getattr(self.model.config, "num_quantizers", 1))

    @property
    def token_axes(self) -> tuple[str, ...]:
        """The axes of one sample's codes (sharding.token_grid)."""
        return AXES_OF_TOKENIZER[self.name]

    def runner(self, device: torch.device | str = "cpu") -> TokenizerRunner:
        """The tokenizer loaded from this checkpoint on `device`, ready to tokenize."""
        return TokenizerRunner(self, device)

    def provenance(self) -> dict[str, Any]:
        """The token manifest's `tokenizer` record."""
        return {
            "kind": "model",
            "model": self.name,
            "flavor": self.flavor,
            "args": self.args,
            "checkpoint": str(self.directory),
            "weights_file": MODEL_FILE,
            "sha256": self.weights_sha256,
            "step": self.step,
            "codebook_size": self.codebook_size,
            "num_levels": self.num_levels,
            "input_kind": self.input_kind,
        }

    def check_dataset(self, manifest: Manifest, url: str) -> None:
        """UserError unless the raw dataset at `url` is of a kind and shape this tokenizer reads."""
        if manifest.kind != self.input_kind:
            raise UserError(f"{url}: a {manifest.kind!r} dataset; tokenizer {self.name} ({self.directory}) reads {self.input_kind!r}")
        config = self.model.config
        if self.input_kind == "meg_windows":
            num_channels, length = manifest.fields["signal.npy"]["shape"]
            step = config.compression_factor if self.name == "totem" else config.window_length
            if length is None or length % step:
                raise UserError(f"{url}: windows of {length} samples; {self.name} needs a multiple of {step}")
            if self.name == "BrainOmniCausalTokenizerSEANetChannelMix" and num_channels != config.num_sensors:
                seen = "a varying number of" if num_channels is None else str(num_channels)
                raise UserError(f"{url}: windows have {seen} channels; this BrainTokMix reads exactly num_sensors="
                                f"{config.num_sensors} (prepare with one channel set, meg.channel_types)")
        else:
            frames, height, width, colours = manifest.fields["video.npy"]["shape"]
            factor = config.spatial_factor
            if height is None or width is None or height % factor or width % factor or colours != config.in_channels:
                raise UserError(f"{url}: clips of {height}x{width}x{colours}; {self.name} needs frames a multiple of "
                                f"{factor} with {config.in_channels} colour channels")


def describe_checkpoint(path: str | Path) -> TokenizerInfo:
    """TokenizerInfo of the checkpoint at `path`; UserError when it is missing or not a tokenizer model."""
    if not Path(path).exists():
        raise UserError(f"checkpoint not found: {path}")
    directory = resolve_checkpoint(path)
    state = read_trainer_state(directory)
    spec = state["model"]
    if spec["name"] not in INPUT_KINDS:
        raise UserError(f"{directory}: model {spec['name']!r} is not a tokenizer model ({', '.join(INPUT_KINDS)})")
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise UserError(f"{directory}: no {MODEL_FILE} (a sharded checkpoint? `tokfleet export` it first)")
    args = {**spec["args"], **dict.fromkeys(get_model_spec(spec["name"]).weight_file_fields)}
    model = build_model(spec["name"], spec["flavor"], args, device="meta")
    return TokenizerInfo(spec["name"], spec["flavor"], spec["args"], directory, int(state["step"]), file_sha256(weights), model)


@dataclass
class Decoded:
    """A batch through the tokenizer: codes (B, ..., Q) and reconstruction vs. target series (B, S, N)."""

    codes: torch.Tensor  # (B, ..., Q) int64
    reconstruction: torch.Tensor  # (B, S, N): S series of N values each, in the raw samples' units
    target: torch.Tensor  # (B, S, N)
    extra: list[dict[str, np.ndarray]] = field(default_factory=list)  # per sample: fields a decoder needs


class TokenizerRunner:
    """A loaded tokenizer (eval mode) turning batches of raw samples into codes and reconstructions."""

    def __init__(self, info: TokenizerInfo, device: torch.device | str = "cpu"):
        self.info = info
        self.device = torch.device(device)
        self.model, _, _ = load_model(info.directory, self.device)
        self.task = get_model_spec(info.name).task
        self.field_name = "signal" if info.input_kind == "meg_windows" else "video"

    @classmethod
    def for_model(cls, model: nn.Module, name: str, device: torch.device) -> TokenizerRunner:
        """A runner around a model being trained (plots during training): no checkpoint behind it."""
        runner = cls.__new__(cls)
        runner.info = TokenizerInfo(name, "", {}, Path("."), 0, "", model)
        runner.device, runner.model = torch.device(device), model
        runner.task = get_model_spec(name).task
        runner.field_name = "signal" if runner.info.input_kind == "meg_windows" else "video"
        return runner

    @torch.no_grad()
    def reconstruct(self, inputs: dict[str, torch.Tensor]) -> Decoded:
        """Codes and reconstruction of a batch of model inputs (trainer/data.py TASK_BATCHES)."""
        return self._run_inputs(inputs, decode=True)

    def _inputs(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return TASK_BATCHES[self.task](collate(samples), self.device)

    @torch.no_grad()
    def tokenize(self, samples: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        """Same-shape raw samples -> per sample {"tokens": codes (token_dtype), + fields to decode them}."""
        return self._run(samples, decode=False).extra

    @torch.no_grad()
    def run(self, samples: list[dict[str, Any]]) -> Decoded:
        """Codes and reconstruction of same-shape raw samples (for eval)."""
        return self._run(samples, decode=True)

    @torch.no_grad()
    def encode(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A batch of model inputs (signal (B, C, T) [+ pos, sensor_type], or video (B, T, H, W, 3) uint8)
        -> (codes int64 in the stored layout (B, *info.token_axes), what `decode` needs besides them:
        TOTEM's RevIN statistics {"revin_mean", "revin_std"} (B, C))."""
        model, name = self.model, self.info.name
        if name == "totem":
            signal = inputs["signal"]  # (B, C, T)
            chunk = model.series_per_chunk_for_cache(signal.shape[-1], CPU_CHUNK_BYTES) if self.device.type == "cpu" else None
            stats = model.normalization_stats(signal)  # mean, std (B, C, 1)
            return model.tokenize(signal, chunk), {"revin_mean": stats.mean[..., 0].float(), "revin_std": stats.std[..., 0].float()}
        if name.startswith("BrainOmni"):
            return model.tokenize(**inputs).indices, {}  # (B, n_neuro, W, Q)
        video = inputs["video"]  # uint8 (B, T, H, W, 3)
        chunk = model.clips_per_chunk_for_cache(*video.shape[1:4], CPU_VIDEO_CHUNK_BYTES) if self.device.type == "cpu" else None
        return model.tokenize(video, chunk), {}  # (B, T', H', W'[, Q])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, context: dict[str, torch.Tensor]) -> torch.Tensor:
        """Codes in the stored layout -> MEG/EEG signal (B, C, T) in the raw dataset's normalised units
        (TOTEM undoes RevIN with context's revin_mean / revin_std), or video (B, 3, T, H, W) in about [-1, 1].
        context: what encode returned plus the raw batch's pos / sensor_type (BrainOmni's sensor space)
        and num_channels."""
        model, name = self.model, self.info.name
        if name == "totem":
            from modeling.tokenizers.totem import RevINStats

            stats = RevINStats(context["revin_mean"][..., None], context["revin_std"][..., None])
            return model.decode(codes, stats)
        if name.startswith("BrainOmni"):
            return model.decode(codes, context.get("pos"), context.get("sensor_type"), num_channels=context.get("num_channels"))
        return model.decode(codes)

    def _run(self, samples: list[dict[str, Any]], decode: bool) -> Decoded:
        return self._run_inputs(self._inputs(samples), decode)

    def _run_inputs(self, inputs: dict[str, torch.Tensor], decode: bool) -> Decoded:
        from sharding.shards import token_dtype

        codes, stats = self.encode(inputs)
        extra: list[dict[str, np.ndarray]] = [{} for _ in range(codes.shape[0])]
        for name, values in stats.items():
            for item, value in zip(extra, values.cpu().numpy()):
                item[name] = value
        reconstruction = target = None
        if decode:
            if "signal" in inputs:
                signal = inputs["signal"]
                context = {**inputs, **stats, "num_channels": signal.shape[1]}
                reconstruction, target = self.decode(codes, context), signal
                if self.info.name.startswith("BrainOmni") and self.model.config.normalize:  # it reconstructs z-scored windows
                    B, C, T = signal.shape
                    windows = signal.view(B, C, T // self.model.window_length, self.model.window_length)
                    target = self.model.normalize_target(windows).view(B, C, T)
            else:
                from modeling.tokenizers.vidtok import video_to_model_input

                x = video_to_model_input(inputs["video"])  # (B, 3, T, H, W) in [-1, 1]
                reconstruction, target = self.model.decode(codes, num_frames=x.shape[2]), x
        dtype = token_dtype(self.info.codebook_size)
        for item, sample_codes in zip(extra, codes.cpu().numpy()):
            item["tokens"] = sample_codes.astype(dtype)
        if reconstruction is not None:
            B = reconstruction.shape[0]
            reconstruction = reconstruction.reshape(B, reconstruction.shape[1], -1).float()
            target = target.reshape(B, target.shape[1], -1).float()
        levels = codes if self.info.num_levels > 1 else codes.unsqueeze(-1)  # (B, ..., Q)
        return Decoded(levels, reconstruction, target, extra)


class CodeStatistics:
    """Accumulates the code histogram (per level) and per-series reconstruction errors over batches."""

    def __init__(self, codebook_size: int, num_levels: int):
        self.counts = torch.zeros(num_levels, codebook_size, dtype=torch.float64)
        self.normalized_mse: list[torch.Tensor] = []
        self.scale_error: list[torch.Tensor] = []
        self.num_samples = 0

    def add(self, decoded: Decoded) -> None:
        codes = decoded.codes.reshape(-1, decoded.codes.shape[-1]).cpu()  # (tokens, Q)
        for level in range(codes.shape[1]):
            self.counts[level] += torch.bincount(codes[:, level], minlength=self.counts.shape[1]).double()
        x, y = decoded.target.double().cpu(), decoded.reconstruction.double().cpu()  # (B, S, N)
        variance = x.var(dim=-1, unbiased=False).clamp_min(VARIANCE_FLOOR)
        self.normalized_mse.append(((y - x).pow(2).mean(dim=-1) / variance).flatten())
        x_std = x.std(dim=-1, unbiased=False).clamp_min(math.sqrt(VARIANCE_FLOOR))
        self.scale_error.append(((y.std(dim=-1, unbiased=False) - x_std).abs() / x_std).flatten())
        self.num_samples += x.shape[0]

    def metrics(self) -> dict[str, float]:
        """The seed's five targets (TotemVQVAE.metrics' definitions); levels of an RVQ are averaged.

        - codebook_utilization: share of the K codes used at least once
        - perplexity: exp(entropy) of the code histogram, in [1, K]
        - token_entropy_bits: entropy of the code histogram in bits, <= log2(K)
        - reconstruction_mse: mean over series of MSE / variance of the series (the normalised space)
        - scale_error: mean over series of |std(decoded) - std(target)| / std(target), after the
          tokenizer's own denormalisation (RevIN). Both ratios are unchanged by prepare's per-channel
          affine normalisation, so they are computed in its units (MEG in tesla would meet the floor).
        """
        probs = self.counts / self.counts.sum(dim=1, keepdim=True).clamp_min(1.0)
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(dim=1)  # (Q,) nats
        return {
            "codebook_utilization": float((self.counts > 0).double().mean()),
            "perplexity": float(torch.exp(entropy).mean()),
            "token_entropy_bits": float((entropy / math.log(2)).mean()),
            "reconstruction_mse": float(torch.cat(self.normalized_mse).mean()),
            "scale_error": float(torch.cat(self.scale_error).mean()),
        }


def evaluate(checkpoint: str, dataset: str, *, split: str = "val", num_batches: int = 8, batch_size: int = 8,
             device: torch.device | str = "cpu", storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seed's targets for the tokenizer at `checkpoint` on the first num_batches batches of `split`
    (shards in manifest order, neighbouring samples of one shape batched): a JSON-ready report."""
    from sharding import storage
    from sharding.shards import read_shard

    info = describe_checkpoint(checkpoint)
    manifest = Manifest.read(dataset, storage_options)
    info.check_dataset(manifest, dataset)
    records = manifest.shards_of(split)
    if not records:
        raise UserError(f"--split: {dataset} has no {split!r} shards (splits: {sorted({s.split for s in manifest.shards})})")
    if num_batches < 1 or batch_size < 1:
        raise UserError(f"--num-batches and --batch-size must be >= 1, got {num_batches}, {batch_size}")
    runner = TokenizerRunner(info, device)
    statistics = CodeStatistics(info.codebook_size, info.num_levels)
    done = 0
    for record in records:
        samples = read_shard(storage.join(dataset, record.name), storage_options)
        for batch in same_shape_batches(samples, runner.field_name, batch_size):
            statistics.add(runner.run(batch))
            done += 1
            if done == num_batches:
                break
        if done == num_batches:
            break
    return {
        "checkpoint": str(info.directory), "model": info.name, "flavor": info.flavor, "step": info.step,
        "dataset": dataset, "split": split, "num_batches": done, "num_samples": statistics.num_samples,
        "codebook_size": info.codebook_size, "num_levels": info.num_levels,
        "max_entropy_bits": math.log2(info.codebook_size),
        "metrics": statistics.metrics(),
        "targets": {name: f"{op} {goal:g}" for name, (op, goal) in TARGETS.items()},
    }


def format_report(report: dict[str, Any]) -> str:
    """The eval report as a table: metric, value, the seed's goal, whether it is met."""
    unit = "windows" if INPUT_KINDS[report["model"]] == "meg_windows" else "clips"
    levels = f" x {report['num_levels']} levels" if report["num_levels"] > 1 else ""
    lines = [f"eval {report['model']} ({report['flavor']}, step {report['step']}) on {report['dataset']} [{report['split']}]: "
             f"{report['num_samples']} {unit} in {report['num_batches']} batches, codebook {report['codebook_size']}{levels}",
             f"  {'metric':22s} {'value':>10s}  {'goal':8s} met"]
    for name, value in report["metrics"].items():
        op, goal = TARGETS[name]
        is_met = value > goal if op == ">" else value < goal
        lines.append(f"  {name:22s} {value:10.4f}  {op} {goal:<6g} {'yes' if is_met else 'no'}")
    return "\n".join(lines)
