"""Sequence models on token grids: where the pipeline's two halves meet.

A token dataset (`tokfleet pretokenize` of MEG/EEG windows or video clips) holds one grid of codes
per sample (sharding.token_grid: canonical (T, H, W, Q)). A sequence model reads that grid in the
layout of its family, always with time as the axis it predicts along:

    family                      sequence                                   the grid sets (model.args)
    gpt                         (B H W, T): each channel (site) a series   vocab_size, sequence_len = T
    FlatGPT, ...Embeds, ...RVQ  (B, S, *token_shape): the (t, h, w) grid   vocab_size, input_shape = grid x reductions,
                                flattened, S = positions of the grid       tok_class none (codes arrive tokenized)
    BrainOmniCausalForecast     (B, C, T, Q): channels x time x levels     vocab_size, num_channels, num_quantizers,
                                                                           sequence_len, tokenizer_* (provenance)
    STGPT2MEG,                  (B, C, T): C = H W Q sites, each a series   vocab_size, num_channels = H W Q,
    WavenetFullChannel                                                     sequence_len (STGPT2MEG)
    TASA3D, Wavenet3D           (B, H, W, T): FlatGPT's (T, H, W) grid,    vocab_size, height, width (TASA3D),
                                time last                                  sequence_len (TASA3D)

FlatGPT's 3-axis grid is (T, H, W) for one-level codes, (T, C, Q) for RVQ codes of channels (the
RVQ levels on its W axis, as brain-gen lays them out), and (T, H W, Q) for video RVQ codes (sites
of a frame on its H axis). Values the user gives in model.args are kept and checked: a model whose
grid, reductions or vocabulary cannot hold the dataset's is refused before training, in one line
naming both shapes.

Training batches shift the sequence by one time position: idx = sequence[..., :-1, ...] and
targets = sequence[..., 1:, ...] along the family's time axis. A raw dataset (MEG/EEG windows,
video clips) with `model.args.tokenizer_path` naming a tokenizer run or checkpoint is tokenized on
the fly by that frozen tokenizer, on the trainer's device, before the same layout.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from modeling.registry import get_model_spec, model_config
from sharding.manifest import Manifest
from sharding.token_grid import TokenGrid

RAW_KINDS = ("meg_windows", "video_clips")
FLATGPT_NAMES = ("FlatGPT", "FlatGPTEmbeds", "FlatGPTRVQ", "FlatGPTMix", "FlatGPTMixRVQ", "FlatGPTEmbedsRVQ")
BRAINOMNI_TOKENIZERS = ("BrainOmniCausalTokenizer", "BrainOmniCausalTokenizerSEANetChannelMix")


def _at_least(args: dict[str, Any], key: str, needed: int, what: str, grid: TokenGrid) -> None:
    """args[key] defaults to `needed`; a smaller given value cannot hold the grid."""
    args.setdefault(key, needed)
    if args[key] < needed:
        raise UserError(f"model.args.{key}={args[key]} cannot hold the dataset's {what} {needed} (codes {grid.describe()})")


# ------------------------------------------------------------------ layouts


class SeriesLayout:
    """gpt: every (h, w) site of the grid a series of T codes; one code per position."""

    time_axis = 1

    @staticmethod
    def resolve_args(name: str, flavor: str, args: dict[str, Any], grid: TokenGrid, tokenizer: dict[str, Any]) -> dict[str, Any]:
        T, H, W, Q = grid.canonical_shape
        if Q != 1:
            raise UserError(f"model {name} reads one code per position; the dataset's codes {grid.describe()} hold {Q} RVQ "
                            "levels per site: use FlatGPTRVQ, FlatGPTEmbedsRVQ, FlatGPTMixRVQ or BrainOmniCausalForecast")
        _at_least(args, "vocab_size", grid.vocab_size, "vocabulary of", grid)
        args.setdefault("sequence_len", T)
        if args["sequence_len"] < T - 1:
            raise UserError(f"model.args.sequence_len={args['sequence_len']} cannot hold the dataset's series of {T} codes "
                            f"(codes {grid.describe()}, {T - 1} inputs per sample)")
        return args

    def __init__(self, model: nn.Module):
        self.window = model.config.sequence_len

    def to_sequence(self, grid: torch.Tensor) -> torch.Tensor:
        B, T, H, W, _ = grid.shape
        return grid[..., 0].permute(0, 2, 3, 1).reshape(B * H * W, T)  # (B H W, T)

    def to_grid(self, sequence: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        B, _, H, W, _ = like.shape
        return sequence.reshape(B, H, W, -1).permute(0, 3, 1, 2)[..., None]  # (B, T', H, W, 1)

    def num_positions(self, idx: torch.Tensor) -> int:
        return idx.numel()

    def max_context_steps(self) -> int:
        return self.window

    def forecast(self, model: nn.Module, sequence: torch.Tensor, num_steps: int, **sampling) -> torch.Tensor:
        return model.generate(sequence, num_steps, **sampling)


def flat_grid_shape(grid_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Canonical (T, H, W, Q) -> FlatGPT's (T, H, W): levels on W for channel codes (W = 1), sites
    folded into H for video RVQ codes."""
    T, H, W, Q = grid_shape
    if Q == 1:
        return (T, H, W)
    if W == 1:
        return (T, H, Q)
    return (T, H * W, Q)


class FlatLayout:
    """The FlatGPT family: the (t, h, w) grid flattened; each variant folds its trailing axes into one position."""

    time_axis = 1

    @staticmethod
    def resolve_args(name: str, flavor: str, args: dict[str, Any], grid: TokenGrid, tokenizer: dict[str, Any]) -> dict[str, Any]:
        from modeling.brain.flatgpt import reduce_grid

        shape = grid.canonical_shape
        if None in shape:
            raise UserError(f"model {name} needs one grid shape, but the dataset's codes {grid.describe()} vary between "
                            "samples (recordings with different channel sets: prepare with one channel set)")
        T, H, W = flat_grid_shape(shape)
        _at_least(args, "vocab_size", grid.vocab_size, "vocabulary of", grid)
        args.setdefault("tok_class", None)  # the codes arrive tokenized
        values = {**get_model_spec(name).flavors[flavor], **args}
        temporal = values.get("temporal_reduction", 1)
        spatial = values.get("spatial_reduction", 1)
        spatial_hw = tuple(spatial) if isinstance(spatial, list) else (spatial, spatial)
        if "input_shape" not in args:
            args["input_shape"] = [T * temporal, H * spatial_hw[0], W * spatial_hw[1]]
        reduced = reduce_grid(list(args["input_shape"]), temporal, spatial_hw)
        if tuple(reduced[1:]) != (H, W) or reduced[0] < T:
            raise UserError(f"model.args.input_shape {list(args['input_shape'])} with temporal_reduction {temporal} and "
                            f"spatial_reduction {list(spatial_hw)} gives a code grid {tuple(reduced)} that cannot hold the "
                            f"dataset's grid {(T, H, W)} (codes {grid.describe()}): leave input_shape out to take it from the data")
        return args

    def __init__(self, model: nn.Module):
        self.token_shape = tuple(model.token_shape)
        self.max_steps = model.rope_shape[0]

    def to_sequence(self, grid: torch.Tensor) -> torch.Tensor:
        B = grid.shape[0]
        T, H, W = flat_grid_shape(tuple(grid.shape[1:]))
        return grid.reshape(B, T, H, W).reshape(B, -1, *self.token_shape)  # (B, S, *token_shape)

    def to_grid(self, sequence: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        B, _, H, W, Q = like.shape
        return sequence.reshape(B, -1, H, W, Q)

    def num_positions(self, idx: torch.Tensor) -> int:
        return idx.shape[0] * idx.shape[1]

    def max_context_steps(self) -> int:
        return self.max_steps

    def forecast(self, model: nn.Module, sequence: torch.Tensor, num_steps: int, **sampling) -> torch.Tensor:
        return model.forecast(sequence, num_steps, **sampling)


class ChannelLayout:
    """BrainOmniCausalForecast: (B, C, T, Q) codes of a BrainOmni / BrainTokMix tokenizer."""

    time_axis = 2

    @staticmethod
    def resolve_args(name: str, flavor: str, args: dict[str, Any], grid: TokenGrid, tokenizer: dict[str, Any]) -> dict[str, Any]:
        T, C, W, Q = grid.canonical_shape
        tokenizer_name = tokenizer.get("model")
        if W != 1 or tokenizer_name not in BRAINOMNI_TOKENIZERS:
            raise UserError(f"model {name} reads the (channel, time, level) codes of {' or '.join(BRAINOMNI_TOKENIZERS)}; "
                            f"the dataset holds codes {grid.describe()} of {tokenizer_name or 'an unknown tokenizer'}")
        if None in (T, C):
            raise UserError(f"model {name} needs one grid shape, but the dataset's codes {grid.describe()} vary between samples")
        for key, value in (("vocab_size", grid.vocab_size), ("num_quantizers", Q), ("num_channels", C)):
            args.setdefault(key, value)
            if args[key] != value:
                raise UserError(f"model.args.{key}={args[key]} does not fit the dataset's codes {grid.describe()} "
                                f"of vocabulary {grid.vocab_size}: it must be {value}")
        _at_least(args, "sequence_len", T, "series of", grid)
        args.setdefault("tokenizer_name", tokenizer_name)
        args.setdefault("tokenizer_flavor", tokenizer["flavor"])
        args.setdefault("tokenizer_args", tokenizer["args"])
        args.setdefault("tokenizer_path", tokenizer["checkpoint"])
        return args

    def __init__(self, model: nn.Module):
        self.window = model.config.sequence_len

    def to_sequence(self, grid: torch.Tensor) -> torch.Tensor:
        return grid[:, :, :, 0].permute(0, 2, 1, 3)  # (B, C, T, Q)

    def to_grid(self, sequence: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sequence.permute(0, 2, 1, 3)[:, :, :, None]  # (B, T', C, 1, Q)

    def num_positions(self, idx: torch.Tensor) -> int:
        return idx.shape[0] * idx.shape[1] * idx.shape[2]  # (channel, time) sites: the unit of num_flops_per_token

    def max_context_steps(self) -> int:
        return self.window

    def forecast(self, model: nn.Module, sequence: torch.Tensor, num_steps: int, **sampling) -> torch.Tensor:
        return model.forecast(sequence, num_steps, **sampling)


def _set_from_grid(name: str, args: dict[str, Any], key: str, value: int, grid: TokenGrid) -> None:
    """args[key] (a field the model has) defaults to `value`, the grid's; another given value cannot read it."""
    if key not in {f.name for f in fields(get_model_spec(name).config_cls)}:
        return
    args.setdefault(key, value)
    if args[key] != value:
        raise UserError(f"model.args.{key}={args[key]} does not fit the dataset's codes {grid.describe()}: it must be {value}")


class NextStepLayout:
    """brain-gen's token-grid models (STGPT2MEG, WavenetFullChannel: (B, C, T); TASA3D, Wavenet3D:
    (B, H, W, T)): ids with time last, logits of the next code at every position. The sites are the
    grid's: C = H W Q (each RVQ level of a site its own series), and (H, W) as FlatGPT lays the grid
    out (flat_grid_shape: levels on W for channel codes). The model decodes itself (`forecast`)."""

    time_axis = -1
    is_volume = False  # (B, H, W, T) rather than (B, C, T)

    @classmethod
    def sites(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        _, H, W = flat_grid_shape(shape)
        return (H, W) if cls.is_volume else (H * W,)

    @classmethod
    def resolve_args(cls, name: str, flavor: str, args: dict[str, Any], grid: TokenGrid, tokenizer: dict[str, Any]) -> dict[str, Any]:
        shape = grid.canonical_shape
        if None in shape:
            raise UserError(f"model {name} needs one grid shape, but the dataset's codes {grid.describe()} vary between "
                            "samples (recordings with different channel sets: prepare with one channel set)")
        _at_least(args, "vocab_size", grid.vocab_size, "vocabulary of", grid)
        sites = cls.sites(shape)
        for key, value in zip(("height", "width") if cls.is_volume else ("num_channels",), sites):
            _set_from_grid(name, args, key, value, grid)
        if "sequence_len" in {f.name for f in fields(get_model_spec(name).config_cls)}:
            args.setdefault("sequence_len", shape[0])
            if args["sequence_len"] < shape[0] - 1:
                raise UserError(f"model.args.sequence_len={args['sequence_len']} cannot hold the dataset's series of "
                                f"{shape[0]} steps (codes {grid.describe()}, {shape[0] - 1} inputs per sample)")
        return args

    def __init__(self, model: nn.Module):
        self.model = model

    def to_sequence(self, grid: torch.Tensor) -> torch.Tensor:
        B, T = grid.shape[:2]
        return grid.reshape(B, T, *self.sites(tuple(grid.shape[1:]))).movedim(1, -1)  # (B, *sites, T)

    def to_grid(self, sequence: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        B, _, H, W, Q = like.shape
        return sequence.movedim(-1, 1).reshape(B, -1, H, W, Q)  # (B, T', H, W, Q)

    def num_positions(self, idx: torch.Tensor) -> int:
        return idx.numel()

    def max_context_steps(self) -> int:
        steps = self.model.max_context_steps()
        return sys.maxsize if steps is None else steps

    def forecast(self, model: nn.Module, sequence: torch.Tensor, num_steps: int, **sampling) -> torch.Tensor:
        return model.forecast(sequence, num_steps, **sampling)


class VolumeLayout(NextStepLayout):
    is_volume = True


LAYOUTS: dict[str, type] = {"gpt": SeriesLayout, **dict.fromkeys(FLATGPT_NAMES, FlatLayout),
                            "BrainOmniCausalForecast": ChannelLayout,
                            **dict.fromkeys(("STGPT2MEG", "WavenetFullChannel"), NextStepLayout),
                            **dict.fromkeys(("TASA3D", "Wavenet3D"), VolumeLayout)}


def layout_class(name: str) -> type:
    if name not in LAYOUTS:
        raise UserError(f"model.name {name!r} does not train on token grids (MEG/EEG or video codes); models that do: "
                        f"{', '.join(LAYOUTS)}")
    return LAYOUTS[name]


# ------------------------------------------------------------------ what a run trains on


def learned_tokenizer(args: dict[str, Any]) -> str | None:
    """model.args.tokenizer_path when it names a tokfleet tokenizer run or checkpoint (not a flat tokenizer folder)."""
    path = args.get("tokenizer_path")
    if not path:
        return None
    path = Path(path)
    return str(path) if (path / "checkpoints").is_dir() or (path / "trainer_state.json").is_file() else None


class GridSource:
    """The token grid a run trains on, and (raw data) the frozen tokenizer that makes it on the fly."""

    def __init__(self, manifest: Manifest, args: dict[str, Any], url: str):
        from trainer.tokenizer_runner import describe_checkpoint

        self.manifest = manifest
        self.tokenizer_path = None
        if manifest.kind in RAW_KINDS:
            self.tokenizer_path = learned_tokenizer(args)
            if self.tokenizer_path is None:
                raise UserError(f"data.dataset {url} holds raw {manifest.kind}: a sequence model trains on their codes, from "
                                "`tokfleet pretokenize`, or (FlatGPT*, BrainOmniCausalForecast) tokenized on the fly by the "
                                "tokenizer run that model.args.tokenizer_path names")
            self.info = describe_checkpoint(self.tokenizer_path)
            self.info.check_dataset(manifest, url)
            self.provenance = self.info.provenance()
            self.grid = self._grid_of_first_sample(url)
        else:
            self.info = None
            self.provenance = dict(manifest.tokenizer)
            self.grid = TokenGrid.from_manifest(manifest, url)
            assert self.grid is not None, manifest.kind

    def _grid_of_first_sample(self, url: str) -> TokenGrid:
        """The raw dataset's grid, as the tokenizer lays out the codes of its first train sample."""
        from sharding import storage
        from sharding.shards import read_shard
        from trainer.tokenizer_runner import TokenizerRunner

        record = next(shard for shard in self.manifest.shards if shard.num_samples)
        sample = read_shard(storage.join(url, record.name))[0]
        tokens = TokenizerRunner(self.info, "cpu").tokenize([sample])[0]["tokens"]
        shape: list[int | None] = [int(n) for n in tokens.shape]
        if self.info.name == "totem" and self.manifest.fields["signal.npy"]["shape"][0] is None:
            shape[0] = None  # TOTEM's channels are the recording's, whose count varies here
        return TokenGrid(self.info.token_axes, tuple(shape), self.info.codebook_size)

    def describe(self) -> dict[str, Any]:
        """What trainer_state.json records (forecasting checks its tokenizer against it)."""
        return {**self.grid.to_json(), "tokenizer": {k: self.provenance.get(k) for k in ("model", "flavor", "checkpoint", "sha256")},
                "on_the_fly": self.tokenizer_path is not None}


def is_grid_data(manifest: Manifest, args: dict[str, Any]) -> bool:
    """Does a run of this dataset (and model args) train on a token grid?"""
    return TokenGrid.from_manifest(manifest) is not None or (manifest.kind in RAW_KINDS and learned_tokenizer(args) is not None)


def resolve_grid_args(name: str, flavor: str, args: dict[str, Any], source: GridSource) -> dict[str, Any]:
    """model.args completed from the grid (what the user gave is checked), validated by building on meta."""
    args = layout_class(name).resolve_args(name, flavor, dict(args), source.grid, source.provenance)
    try:
        config = model_config(name, flavor, args)
        with torch.device("meta"):
            get_model_spec(name).builder(config)  # a variant's own checks (e.g. FlatGPTEmbeds needs a (T, C, 1) grid)
    except ValueError as error:
        raise UserError(f"model: {error} (dataset codes {source.grid.describe()})") from None
    return asdict(config)


class GridTask:
    """Batches of a token grid for a built model: fields of the shard loader -> {"idx", "targets"}."""

    def __init__(self, model: nn.Module, name: str, source: GridSource, device: torch.device):
        self.layout = layout_class(name)(model)
        self.grid = source.grid
        self.runner = None
        if source.tokenizer_path is not None:
            from trainer.tokenizer_runner import TokenizerRunner

            self.runner = TokenizerRunner(source.info, device)  # frozen, eval mode: a data transform

    def grid_of(self, fields: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """(B, T, H, W, Q) codes of a micro-batch: stored codes, or raw samples through the tokenizer."""
        if self.runner is None:
            return self.grid.to_canonical(fields["tokens"].to(device, non_blocking=True))
        from trainer.data import TASK_BATCHES

        inputs = TASK_BATCHES[self.runner.task](fields, device)
        codes, _ = self.runner.encode(inputs)
        return self.grid.to_canonical(codes)

    def pairs(self, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """A canonical (B, T, H, W, Q) grid in the family's layout, cut into idx / targets one time step apart."""
        sequence = self.layout.to_sequence(grid)
        axis, length = self.layout.time_axis, sequence.shape[self.layout.time_axis]
        return {"idx": sequence.narrow(axis, 0, length - 1), "targets": sequence.narrow(axis, 1, length - 1)}

    def __call__(self, fields: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return self.pairs(self.grid_of(fields, device))

    def num_positions(self, batch: dict[str, torch.Tensor]) -> int:
        """Positions a micro-batch trains (the unit of the model's num_flops_per_token)."""
        return self.layout.num_positions(batch["idx"])
