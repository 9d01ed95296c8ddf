"""Run configs: one typed dataclass per component, loaded from YAML with `--set` overrides.

Two kinds of config file exist: a *prepare* config (corpus -> shards, `tokfleet prepare`)
and a *train* config (`tokfleet train`, `python -m trainer`). Both are validated here;
a bad key or value raises `ConfigError` naming the key and the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from launch.schema import ConfigError, apply_overrides, from_dict, option, to_dict

# ---------------------------------------------------------------- train config


@dataclass
class RunConfig:
    name: str = option("run", "run name, used for logging")
    output_dir: str = option("runs/default", "run directory: config, metrics, checkpoints, plots, logs")
    seed: int = option(1234, "seed for model init, data order and sampling")
    max_steps: int = option(1000, "optimizer steps to train for (sets the LR schedule length)")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "single-device engine device; auto picks cuda > mps > cpu")

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"run.max_steps must be >= 1, got {self.max_steps}")


@dataclass
class ModelConfig:
    name: str = option("gpt", "registered model name (see `tokfleet models`)")
    flavor: str = option("debug", "named size of the model: debug, small or full")
    args: dict[str, Any] = option(help="overrides of the flavor's fields, e.g. {n_layer: 4}", factory=dict)


@dataclass
class DataConfig:
    dataset: str = option(help="dataset root URL holding manifest.json and the shards")
    train_split: str = option("train", "manifest split used for training")
    val_split: str = option("val", "manifest split used for validation ('' disables validation)")
    num_streams: int = option(64, "logical data streams; fixed for a dataset so resume works at any world size")
    shuffle: bool = option(True, "shuffle shard order and samples within a shard per epoch")
    num_workers: int = option(0, "DataLoader worker processes per rank")
    log_sample_keys: bool = option(False, "write each consumed sample key to logs/sample_keys-rank*.jsonl")
    storage_options: dict[str, Any] = option(help="fsspec storage options for the dataset URL", factory=dict)

    def __post_init__(self):
        if self.num_streams < 1:
            raise ValueError(f"data.num_streams must be >= 1, got {self.num_streams}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class OptimConfig:
    lr: float = option(3e-4, "peak learning rate of AdamW")
    min_lr_ratio: float = option(0.1, "final LR as a fraction of the peak (cosine schedule)")
    warmup_steps: int = option(100, "linear warmup steps")
    schedule: Literal["cosine", "constant"] = option("cosine", "LR schedule after warmup")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not on norms/embeddings)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables clipping")
    micro_batch_size: int = option(8, "sequences per forward/backward on one rank")
    grad_accum_steps: int = option(1, "micro-batches accumulated per optimizer step")

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("optim.micro_batch_size and optim.grad_accum_steps must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class EngineConfig:
    kind: Literal["single", "accelerate", "deepspeed"] = option(
        "single", "single: one device, plain PyTorch; accelerate: DDP / FSDP / DeepSpeed through HF Accelerate; "
                  "deepspeed: DeepSpeed ZeRO directly. Ranks come from the launcher (torchrun, deepspeed, accelerate launch, srun)")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "fp32; bf16 (autocast, or bf16 weights with fp32 master copies under DeepSpeed); fp16 with loss scaling (GPU)")
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = option(
        "auto", "accelerate only: auto takes what `accelerate launch --config_file` set, else ddp")
    peak_flops: float = option(0.0, "peak FLOP/s of one device for MFU; 0 measures an fp32 matmul at start")
    zero_stage: int | None = option(None, "DeepSpeed ZeRO stage 0-3; empty: the deepspeed_config's stage, else 0")
    offload_optimizer: bool = option(False, "DeepSpeed: keep optimizer states in CPU memory (ZeRO 1-3)")
    offload_params: bool = option(False, "DeepSpeed: keep parameters in CPU memory (ZeRO 3 only)")
    deepspeed_config: str | None = option(None, "DeepSpeed JSON (e.g. configs/deepspeed/zero2.json); this config's values win")
    timeout_s: float = option(300.0, "seconds a collective waits for a missing rank before the job fails")

    def __post_init__(self):
        if self.zero_stage is not None and not 0 <= self.zero_stage <= 3:
            raise ValueError(f"engine.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        uses_deepspeed = self.kind == "deepspeed" or (self.kind == "accelerate" and self.strategy in ("auto", "deepspeed"))
        if not uses_deepspeed and (self.zero_stage is not None or self.offload_optimizer or self.offload_params or self.deepspeed_config):
            raise ValueError(f"engine.zero_stage/offload_*/deepspeed_config need DeepSpeed (engine.kind deepspeed, or "
                             f"accelerate with strategy deepspeed), not kind {self.kind!r} strategy {self.strategy!r}")
        if self.kind != "accelerate" and self.strategy != "auto":
            raise ValueError(f"engine.strategy is for engine.kind accelerate, not {self.kind!r}")
        if self.offload_params and self.zero_stage not in (None, 3):
            raise ValueError(f"engine.offload_params needs ZeRO stage 3, not {self.zero_stage}")
        if self.timeout_s <= 0:
            raise ValueError(f"engine.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class CheckpointConfig:
    every_steps: int = option(100, "save a checkpoint every N optimizer steps (0: only at the end)")
    keep_last: int = option(3, "complete checkpoints to keep; older ones are deleted")
    save_final: bool = option(True, "save a checkpoint when training finishes")


@dataclass
class LoggingConfig:
    every_steps: int = option(10, "write a metrics.jsonl line every N steps")
    progress: bool = option(True, "show a progress bar")
    wandb: bool = option(True, "log to Weights & Biases")
    wandb_mode: Literal["offline", "online", "disabled"] = option("offline", "wandb mode; offline needs no account")
    wandb_project: str = option("tokfleet", "wandb project")


@dataclass
class EvalConfig:
    every_steps: int = option(100, "validate every N steps (0: only at the end)")
    num_batches: int = option(8, "validation micro-batches per evaluation")


@dataclass
class TrainConfig:
    data: DataConfig
    run: RunConfig = option(help="run identity and length", factory=RunConfig)
    model: ModelConfig = option(help="model from the registry", factory=ModelConfig)
    optim: OptimConfig = option(help="optimizer and schedule", factory=OptimConfig)
    engine: EngineConfig = option(help="engine and precision", factory=EngineConfig)
    checkpoint: CheckpointConfig = option(help="checkpointing", factory=CheckpointConfig)
    logging: LoggingConfig = option(help="metrics and wandb", factory=LoggingConfig)
    eval: EvalConfig = option(help="validation", factory=EvalConfig)


# -------------------------------------------------------------- prepare config


@dataclass
class SourceConfig:
    kind: Literal["text"] = option("text", "corpus kind")
    paths: list[str] = option(help="glob patterns of text/code files; '{stdlib}' is this Python's standard library", factory=list)
    exclude: list[str] = option(help="glob patterns (fnmatch on the full path) of files to leave out", factory=list)
    hf_dataset: str | None = option(None, "a `datasets` dataset: local path or hub id (instead of paths)")
    hf_config: str | None = option(None, "dataset configuration name")
    hf_split: str = option("train", "dataset split to read")
    hf_text_field: str = option("text", "column holding the text")
    max_files: int = option(0, "use at most this many files/documents (0: all)")


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "pretrained"] = option("bpe", "train a byte-level BPE, or load a local HF tokenizer folder")
    vocab_size: int = option(8192, "BPE vocabulary size (bpe only)")
    min_frequency: int = option(2, "minimum pair frequency for a BPE merge")
    path: str | None = option(None, "local HF tokenizer folder (pretrained only)")


@dataclass
class ShardsConfig:
    output: str = option(help="dataset root URL: shards, manifest.json and tokenizer/ go here")
    name: str = option("text", "shard name prefix: {name}-{index:06d}.tar")
    seq_len: int = option(256, "tokens per training sequence (samples store seq_len + 1 tokens)")
    source_bytes_per_shard: int = option(1_000_000, "source bytes grouped into one shard (a Ray task each)")
    val_fraction: float = option(0.05, "fraction of shards held out as the val split")
    storage_options: dict[str, Any] = option(help="fsspec storage options for the output URL", factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"shards.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seq_len < 2:
            raise ValueError(f"shards.seq_len must be >= 2, got {self.seq_len}")


@dataclass
class RayConfig:
    address: str | None = option(None, "Ray cluster address; empty starts a local instance")
    num_cpus: int = option(0, "CPUs of the local instance (0: all)")
    object_store_mb: int = option(512, "object store size of the local instance")


@dataclass
class PrepareConfig:
    source: SourceConfig
    shards: ShardsConfig
    tokenizer: TokenizerConfig = option(help="text tokenizer", factory=TokenizerConfig)
    ray: RayConfig = option(help="Ray runtime", factory=RayConfig)


# ------------------------------------------------------------------- loading

ConfigT = TypeVar("ConfigT")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def load_config(path: str | Path, cls: type[ConfigT], overrides: list[str] | None = None) -> ConfigT:
    """Read YAML `path`, apply `--set` overrides, validate against `cls`."""
    data = read_yaml(path)
    try:
        apply_overrides(data, cls, overrides or [])
        return from_dict(cls, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def dump_config(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_config(config))
    tmp.replace(path)
