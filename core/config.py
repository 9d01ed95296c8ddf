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

from core.schema import ConfigError, apply_overrides, check_bounds, from_dict, load_yaml, option

# ---------------------------------------------------------------- train config

DEFAULT_MAX_STEPS = 1000  # a run's length when neither run.max_steps nor run.max_epochs is set


@dataclass
class RunConfig:
    name: str = option("run", "run name, used for logging")
    output_dir: str = option("runs/default", "run directory: config, metrics, checkpoints, plots, logs")
    seed: int = option(1234, "seed for model init, data order and sampling", bound="[0, 2**63)")
    max_steps: int | None = option(None, f"optimizer steps to train for (sets the LR schedule length); empty: {DEFAULT_MAX_STEPS}, "
                                         "or what run.max_epochs comes to", bound=">= 1")
    max_epochs: int | None = option(None, "train for this many passes over the train split instead of run.max_steps: "
                                          "ceil(epochs x train samples / global batch) steps, recomputed on resume", bound=">= 1")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "single-device engine device; auto picks cuda > mps > cpu")

    def __post_init__(self):
        check_bounds(self, "run")
        if self.max_steps is not None and self.max_epochs is not None:
            raise ConfigError(f"run.max_steps ({self.max_steps}) and run.max_epochs ({self.max_epochs}) are both set: a run's length "
                              "is one of them (unset the other, e.g. --set run.max_steps=null)", key="run.max_epochs")
        if self.max_steps is None and self.max_epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS


@dataclass
class ModelConfig:
    name: str = option("gpt", "registered model name (see `tokfleet models`)")
    flavor: str = option("debug", "named size of the model: debug, small or full")
    args: dict[str, Any] = option(help="overrides of the flavor's fields, e.g. {n_layer: 4}", factory=dict)
    init_from: str | None = option(None, "start from the weights of this run dir or checkpoint (fine-tuning): every tensor "
                                         "must fit; optimizer, schedule and data position start fresh")


@dataclass
class DataConfig:
    dataset: str = option(help="dataset root URL holding manifest.json and the shards")
    train_split: str = option("train", "manifest split used for training")
    val_split: str = option("val", "manifest split used for validation ('' disables validation)")
    num_streams: int | None = option(None, "logical data streams, at least ranks x data workers; fixed for a run so resume works at "
                                           "any world size; empty: one per train shard, at least 1 and at most 64 per reader", bound=">= 1")
    shuffle: bool = option(True, "shuffle shard order and samples within a shard per epoch")
    num_workers: int = option(0, "DataLoader worker processes per rank", bound=">= 0")
    log_sample_keys: bool = option(False, "write each consumed sample key to logs/sample_keys-rank*.jsonl")
    verify: bool = option(True, "check each shard's size and sha256 against the manifest when a process first reads it")
    on_corrupt: Literal["error", "skip"] = option("error", "corrupt shard/sample or out-of-vocabulary token id: stop, or skip it "
                                                           "(counted in metrics, listed in logs/skipped-rank*.jsonl)")
    storage_options: dict[str, Any] = option(help="fsspec storage options for the dataset URL", factory=dict)

    def __post_init__(self):
        check_bounds(self, "data")


@dataclass
class OptimConfig:
    lr: float = option(3e-4, "peak learning rate of AdamW", bound="> 0")
    min_lr_ratio: float = option(0.1, "final LR as a fraction of the peak (cosine schedule)", bound="[0, 1]")
    warmup_steps: int = option(100, "linear warmup steps", bound=">= 0")
    schedule: Literal["cosine", "constant"] = option("cosine", "LR schedule after warmup")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not on norms/embeddings)", bound=">= 0")
    beta1: float = option(0.9, "AdamW beta1", bound="[0, 1)")
    beta2: float = option(0.95, "AdamW beta2", bound="[0, 1)")
    eps: float = option(1e-8, "AdamW epsilon", bound="> 0")
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables clipping", bound=">= 0")
    micro_batch_size: int = option(8, "sequences per forward/backward on one rank", bound=">= 1")
    grad_accum_steps: int = option(1, "micro-batches accumulated per optimizer step", bound=">= 1")

    def __post_init__(self):
        check_bounds(self, "optim")


@dataclass
class EngineConfig:
    kind: Literal["single", "accelerate", "deepspeed"] = option(
        "single", "single: one device, plain PyTorch; accelerate: DDP / FSDP / DeepSpeed through HF Accelerate; "
                  "deepspeed: DeepSpeed ZeRO directly. Ranks come from the launcher (torchrun, deepspeed, accelerate launch, srun)")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "fp32; bf16 (autocast, or bf16 weights with fp32 master copies under DeepSpeed); fp16 with loss scaling (GPU)")
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = option(
        "auto", "accelerate only: auto takes what `accelerate launch --config_file` set, else ddp")
    peak_flops: float = option(0.0, "peak FLOP/s of one device for MFU; 0: the datasheet's for a known GPU in the training "
                                    "precision, else a matmul measured in it (refreshed: MFU never exceeds 1)", bound=">= 0")
    zero_stage: int | None = option(None, "DeepSpeed ZeRO stage 0-3; empty: the deepspeed_config's stage, else 0", bound="[0, 3]")
    offload_optimizer: bool = option(False, "DeepSpeed: keep optimizer states in CPU memory (ZeRO 1-3)")
    offload_params: bool = option(False, "DeepSpeed: keep parameters in CPU memory (ZeRO 3 only)")
    deepspeed_config: str | None = option(None, "DeepSpeed JSON (e.g. configs/deepspeed/zero2.json); this config's values win")
    timeout_s: float = option(300.0, "seconds a collective waits for a missing rank before the job fails", bound="> 0")
    compile: bool | None = option(
        None, "compile each repeated block of the model (torch.compile per layer, as torchtitan); empty: on for CUDA, "
              "off on CPU (compile time). A block class that cannot compile runs eager, with a log line naming it")
    expert_parallel_size: int = option(
        1, "DeepSpeed + MoE model: ranks that split each MoE layer's experts (tokens go all-to-all between them); "
           "divides the world size and the experts per layer. 1: every rank holds every expert", bound=">= 1")

    def __post_init__(self):
        check_bounds(self, "engine")
        uses_deepspeed = self.kind == "deepspeed" or (self.kind == "accelerate" and self.strategy in ("auto", "deepspeed"))
        if not uses_deepspeed and (self.zero_stage is not None or self.offload_optimizer or self.offload_params or self.deepspeed_config):
            raise ValueError(f"engine.zero_stage/offload_*/deepspeed_config need DeepSpeed (engine.kind deepspeed, or "
                             f"accelerate with strategy deepspeed), not kind {self.kind!r} strategy {self.strategy!r}")
        if self.kind != "accelerate" and self.strategy != "auto":
            raise ValueError(f"engine.strategy is for engine.kind accelerate, not {self.kind!r}")
        if self.offload_params and self.zero_stage not in (None, 3):
            raise ValueError(f"engine.offload_params needs ZeRO stage 3, not {self.zero_stage}")
        if self.expert_parallel_size > 1 and self.kind != "deepspeed":
            raise ValueError(f"engine.expert_parallel_size > 1 needs engine.kind deepspeed, not {self.kind!r}")


@dataclass
class CheckpointConfig:
    every_steps: int = option(100, "save a checkpoint every N optimizer steps (0: only at the end)", bound=">= 0")
    keep_last: int = option(3, "complete checkpoints to keep; older ones are deleted", bound=">= 1")
    save_final: bool = option(True, "save a checkpoint when training finishes")
    keep_best: str | None = option(None, "a metric of metrics.jsonl (val_loss, loss, ...): checkpoints/best names the checkpoint "
                                         "with its best value so far, and keep_last never deletes it; empty: no best")
    keep_best_mode: Literal["min", "max"] = option("min", "keep_best: min (a loss) or max is best")
    async_save: bool = option(False, "copy the state to host memory and write the checkpoint in the background while "
                                     "training goes on (the next save waits for it)")
    url: str | None = option(None, "object-store URL (s3://bucket/prefix) every complete checkpoint is uploaded to; "
                                   "--resume auto downloads the newest from there")
    storage_options: dict[str, Any] = option(help="fsspec storage options for checkpoint.url", factory=dict)
    retry_s: float = option(120.0, "how long transient object-store errors (5xx, reset connections) are retried before a "
                                   "save or download gives up", bound="> 0")

    def __post_init__(self):
        check_bounds(self, "checkpoint")
        if self.url is not None and "://" not in self.url:
            raise ConfigError(f"checkpoint.url {self.url!r} is a local path: give an object-store URL (s3://bucket/prefix); "
                              "local checkpoints are in run.output_dir/checkpoints already", key="checkpoint.url")


@dataclass
class LoggingConfig:
    every_steps: int = option(10, "write a metrics.jsonl line every N steps", bound=">= 1")
    progress: bool = option(True, "show a progress bar")
    wandb: bool = option(True, "log to Weights & Biases")
    wandb_mode: Literal["offline", "online", "disabled"] = option("offline", "wandb mode; offline needs no account")
    wandb_project: str = option("tokfleet", "wandb project")

    def __post_init__(self):
        check_bounds(self, "logging")


@dataclass
class EvalConfig:
    every_steps: int = option(100, "validate every N steps (0: only at the end)", bound=">= 0")
    num_batches: int = option(8, "validation micro-batches per evaluation", bound=">= 1")
    sample_every: int = option(0, "write samples every N steps (and at the last) to samples.jsonl and wandb (0: never)", bound=">= 0")
    sample_prompts: list[str] = option(help="text prompts the samples continue (a latent model: reconstructs, and "
                                            "generates as many from noise)", factory=list)
    sample_max_new_tokens: int = option(64, "tokens a sample continues its prompt by", bound=">= 1")
    sample_temperature: float = option(1.0, "sampling temperature of the samples", bound="> 0")
    sample_top_k: int = option(50, "sample among the k most likely tokens (0: all)", bound=">= 0")
    sample_num_steps: int = option(20, "Euler steps of a latent diffusion model's generated samples", bound=">= 1")

    def __post_init__(self):
        check_bounds(self, "eval")
        if self.sample_every and not self.sample_prompts:
            raise ConfigError("eval.sample_every is set but eval.sample_prompts is empty: give the prompts to continue")


# ------------------------------------------------------------------- launch (cluster jobs)


@dataclass
class SlurmLaunchConfig:
    partition: str | None = option(None, "sbatch --partition; empty: the cluster's default")
    time: str | None = option(None, "sbatch --time limit, e.g. 04:00:00 or 2-00:00:00; empty: the partition's")
    account: str | None = option(None, "sbatch --account")
    qos: str | None = option(None, "sbatch --qos")
    constraint: str | None = option(None, "sbatch --constraint (node features)")
    mem: str | None = option(None, "sbatch --mem per node, e.g. 64G; empty: the cluster's default")
    cpus_per_task: int = option(0, "sbatch --cpus-per-task (one task = one node's launcher); 0: the cluster's default", bound=">= 0")
    job_name: str | None = option(None, "sbatch --job-name; empty: run.name (train) or the config's file name")
    extra_sbatch: list[str] = option(help="more #SBATCH options, e.g. ['--exclusive', '--mail-type=END']", factory=list)
    requeue: bool = option(False, "ask for a warning signal before the time limit / preemption, checkpoint on it and requeue")
    signal_seconds: int = option(300, "with requeue: seconds before the time limit that SLURM sends the warning signal", bound=">= 1")
    template: str | None = option(None, "an sbatch template of your own (Python string.Template, see slurm/); empty: slurm/'s")
    setup: list[str] = option(help="shell lines run on every node before the launcher (module load, source venv/bin/activate)", factory=list)

    def __post_init__(self):
        check_bounds(self, "launch.slurm")


@dataclass
class RayLaunchConfig:
    address: str | None = option(None, "Ray Jobs API address of the cluster head, e.g. http://HEAD:8265")
    cpus_per_worker: float = option(1.0, "training: CPUs reserved per Ray Train worker (one worker per rank)", bound=">= 0")
    gpus_per_worker: float = option(0.0, "training: GPUs per Ray Train worker", bound=">= 0")
    runtime_env: dict[str, Any] = option(
        help="extra Ray runtime_env (env_vars, pip, ...); working_dir defaults to this checkout without .venv/data/runs "
             "(working_dir: '' uploads nothing: the cluster's installed tokfleet runs)", factory=dict)
    entrypoint_num_cpus: float = option(0.0, "CPUs reserved for the job's driver", bound=">= 0")
    python: str = option("python", "interpreter that runs the job's driver on the cluster: `python` is the head's PATH's "
                                   "(activate the venv before `ray start`), or an absolute path")

    def __post_init__(self):
        check_bounds(self, "launch.ray")


@dataclass
class LaunchConfig:
    nodes: int = option(1, "nodes (SLURM) ; Ray and local run on what the cluster / machine has", bound=">= 1")
    nproc_per_node: int = option(1, "training processes (ranks) per node: GPUs per node, or CPU processes", bound=">= 1")
    gpus_per_node: int = option(0, "GPUs per node asked of SLURM (--gres=gpu:N); `submit slurm --gpus-per-node N` sets it and nproc_per_node",
                                bound=">= 0")
    launcher: Literal["auto", "torchrun", "deepspeed", "accelerate"] = option(
        "auto", "per-node launcher for training; auto: deepspeed for engine.kind deepspeed, accelerate launch for accelerate, else torchrun")
    env: dict[str, str] = option(help="environment variables set for every process of the job", factory=dict)
    slurm: SlurmLaunchConfig = option(help="SLURM settings (tokfleet submit slurm)", factory=SlurmLaunchConfig)
    ray: RayLaunchConfig = option(help="Ray settings (tokfleet submit ray)", factory=RayLaunchConfig)

    def __post_init__(self):
        check_bounds(self, "launch")


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
    launch: LaunchConfig = option(help="cluster jobs: tokfleet submit slurm|ray|local", factory=LaunchConfig)

    def __post_init__(self):
        check_keep_best(self)


def check_keep_best(cfg: TrainConfig) -> None:
    """checkpoint.keep_best compares checkpoints by a metric logged at their step: every periodic checkpoint
    must have one (the final checkpoint's step always logs, validation included)."""
    metric, every = cfg.checkpoint.keep_best, cfg.checkpoint.every_steps
    if not metric:
        return
    fault = None
    if metric == "val_loss" and not cfg.data.val_split:
        fault = "data.val_split is '' (no validation)"
    elif metric == "val_loss" and cfg.eval.every_steps == 0:
        fault = f"eval.every_steps is 0 (validation only at the end); make it a divisor of checkpoint.every_steps ({every})"
    elif metric == "val_loss" and every % cfg.eval.every_steps:
        fault = f"checkpoint.every_steps {every} is not a multiple of eval.every_steps {cfg.eval.every_steps}"
    elif metric != "val_loss" and every % cfg.logging.every_steps:
        fault = f"checkpoint.every_steps {every} is not a multiple of logging.every_steps {cfg.logging.every_steps}"
    if fault:
        raise ConfigError(f"checkpoint.keep_best {metric!r} needs the metric logged at every checkpoint step: {fault}",
                          key="checkpoint.keep_best")


# -------------------------------------------------------------- prepare config


@dataclass
class SourceConfig:
    kind: Literal["text", "meg", "video", "tokens", "timeseries"] = option(
        "text", "corpus kind: text/code files, MEG/EEG recordings (mne), videos (PyAV), integer token ids (.txt, .npy) "
                "or tables of time series (.csv, .parquet)")
    paths: list[str] = option(help="glob patterns of input files (any fsspec URL); '{stdlib}' is this Python's standard library", factory=list)
    exclude: list[str] = option(help="glob patterns (fnmatch on the full path) of files to leave out", factory=list)
    hf_dataset: str | None = option(None, "a `datasets` dataset: local path or hub id (instead of paths)")
    hf_config: str | None = option(None, "dataset configuration name")
    hf_split: str = option("train", "dataset split to read")
    hf_text_field: str = option("text", "column holding the text")
    max_files: int = option(0, "use at most this many files/documents (0: all)", bound=">= 0")
    storage_options: dict[str, Any] = option(help="fsspec storage options for the source paths (s3://...)", factory=dict)

    def __post_init__(self):
        check_bounds(self, "source")


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "pretrained"] = option("bpe", "train a byte-level BPE, or load a local HF tokenizer folder")
    vocab_size: int = option(8192, "BPE vocabulary size (bpe only): 256 bytes + <|endoftext|> + merges", bound="[257, 2**31]")
    min_frequency: int = option(2, "minimum pair frequency for a BPE merge", bound=">= 0")
    path: str | None = option(None, "local HF tokenizer folder (pretrained only)")

    def __post_init__(self):
        check_bounds(self, "tokenizer")


@dataclass
class ShardsConfig:
    output: str = option(help="dataset root URL: shards, manifest.json and tokenizer/ go here")
    name: str = option("text", "shard name prefix: {name}-{index:06d}.tar")
    seq_len: int = option(256, "tokens per training sequence (samples store seq_len + 1 tokens)", bound=">= 2")
    source_bytes_per_shard: int = option(1_000_000, "source bytes grouped into one shard (a Ray task each)", bound=">= 1")
    val_fraction: float = option(0.05, "fraction of shards held out as the val split", bound="[0, 1)")
    storage_options: dict[str, Any] = option(help="fsspec storage options for the output URL", factory=dict)

    def __post_init__(self):
        check_bounds(self, "shards")


@dataclass
class MegConfig:
    channel_types: list[str] = option(help="mne channel types to keep (mag, grad, eeg, seeg, ecog, ...)",
                                      factory=lambda: ["mag", "grad", "eeg"])
    exclude_bads: bool = option(True, "leave out the channels a recording marks as bad")
    sfreq: float = option(250.0, "resample every recording to this rate (Hz), so all windows have one length", bound="> 0")
    l_freq: float | None = option(0.5, "high-pass edge of the band-pass filter (Hz), below h_freq; empty: no high-pass", bound="> 0")
    h_freq: float | None = option(100.0, "low-pass edge (Hz), below sfreq / 2; empty: no low-pass", bound="> 0")
    notch_freqs: list[float] = option(help="line-noise frequencies notched out before band-passing (Hz), below sfreq / 2, e.g. [50, 100]",
                                      factory=list, bound="> 0")
    window_s: float = option(2.0, "window length (s); window_s * sfreq samples", bound="> 0")
    overlap_s: float = option(0.0, "overlap of consecutive windows (s), below window_s", bound=">= 0")
    normalization: Literal["robust", "zscore", "none"] = option(
        "robust", "per-channel, per-recording: robust (median, IQR / 1.349), zscore (mean, std) or none; stats stored per window")

    def __post_init__(self):
        check_bounds(self, "meg")  # sfreq first: the frequencies' bounds depend on it (and l_freq's on h_freq)
        nyquist = f"(0, {self.sfreq / 2:.12g})"  # sfreq / 2
        check_bounds(self, "meg", h_freq=nyquist, notch_freqs=nyquist)
        check_bounds(self, "meg", l_freq=f"(0, {self.h_freq or self.sfreq / 2:.12g})")  # below h_freq
        for name, seconds in (("window_s", self.window_s), ("overlap_s", self.overlap_s)):
            if abs(seconds * self.sfreq - round(seconds * self.sfreq)) > 1e-6:
                raise ValueError(f"meg.{name} * meg.sfreq must be a whole number of samples, got {seconds} * {self.sfreq:g}")
        if round(self.window_s * self.sfreq) < 2:
            raise ValueError(f"meg.window_s must hold >= 2 samples at sfreq {self.sfreq:g}, got {self.window_s}")
        if not 0 <= self.overlap_s < self.window_s:
            raise ValueError(f"meg.overlap_s must be in [0, window_s), got {self.overlap_s}")
        if not self.channel_types:
            raise ValueError("meg.channel_types must name at least one channel type")


@dataclass
class LabelsConfig:
    files: dict[str, str] = option(help="class of each input file: glob pattern (matched on the path or the file name) or file name "
                                        "-> class name; every file must match exactly one class (source.kind meg)", factory=dict)
    annotations: dict[str, str] = option(help="class of each annotation (event) description of the recordings -> class name; a window "
                                              "takes the class it overlaps most, windows without one are left out (source.kind meg)",
                                         factory=dict)
    events: dict[str, str] = option(help="class of each event id of the recordings' stim channel -> class name; a window takes the "
                                         "class of the events whose onsets it holds, windows without one are left out (source.kind meg)",
                                    factory=dict)
    stim_channel: str | None = option(None, "labels.events: the stim channel to read events from; empty: mne's default (STI 014, ...)")
    ignore: list[str] = option(help="annotation descriptions or event ids (glob patterns) that are not labels, e.g. mne's BAD_ segments",
                               factory=lambda: ["BAD*", "bad*", "EDGE*"])
    classes: list[str] = option(help="class names in index order; empty: in the order the mapping first names them", factory=list)

    def __post_init__(self):
        sources = [name for name in ("files", "annotations", "events") if getattr(self, name)]
        if len(sources) > 1:
            raise ConfigError(f"labels.{sources[0]} and labels.{sources[1]} are both set: a dataset's labels come from one of them",
                              key=f"labels.{sources[1]}")
        bad_ids = [key for key in self.events if not key.lstrip("-").isdigit()]
        if bad_ids:
            raise ConfigError(f"labels.events: event ids are integers, got {bad_ids[0]!r}", key="labels.events")
        named = list(dict.fromkeys([*self.files.values(), *self.annotations.values(), *self.events.values()]))
        if self.classes:
            if len(set(self.classes)) != len(self.classes):
                raise ConfigError(f"labels.classes names a class twice: {self.classes}", key="labels.classes")
            missing = [name for name in named if name not in self.classes]
            if missing:
                raise ConfigError(f"labels: class {missing[0]!r} is not in labels.classes {self.classes}", key="labels.classes")


@dataclass
class VideoConfig:
    height: int = option(64, "frame height of the clips (pixels)", bound=">= 1")
    width: int = option(64, "frame width of the clips (pixels)", bound=">= 1")
    resize: Literal["crop", "stretch"] = option("crop", "crop: scale to cover height x width, then center-crop; stretch: scale to it")
    fps: float = option(0.0, "frame rate of the clips (nearest source frame per tick); 0 keeps each video's own rate", bound=">= 0")
    clip_frames: int = option(16, "frames per clip", bound=">= 1")
    stride_frames: int = option(16, "frames between the starts of consecutive clips (< clip_frames: overlapping clips)", bound=">= 1")
    max_clips_per_file: int = option(0, "keep at most this many clips of each video (0: all)", bound=">= 0")

    def __post_init__(self):
        check_bounds(self, "video")


@dataclass
class TokenIdsConfig:
    vocab_size: int = option(0, "vocabulary size: every id must be below it; 0: the largest id in the inputs (or separator_id) + 1",
                             bound="[0, 2**31]")  # ids beyond 2**16 are stored as int32
    separator_id: int | None = option(
        None, "id appended after every document (a .txt or 1-D .npy file, a row of a 2-D .npy), e.g. an end-of-document id; empty: none")

    def __post_init__(self):
        check_bounds(self, "token_ids")
        if self.separator_id is not None and not 0 <= self.separator_id < (self.vocab_size or 2**31):
            raise ValueError(f"token_ids.separator_id must be >= 0 and below token_ids.vocab_size ({self.vocab_size or 2**31}), "
                             f"got {self.separator_id}")


@dataclass
class TimeseriesConfig:
    input_columns: list[str] = option(help="numeric columns the model reads, in this order (its input_size)", factory=list)
    target_columns: list[str] = option(help="numeric columns it forecasts, in this order (its output_size); empty: the input columns",
                                       factory=list)
    time_column: str | None = option(None, "column the rows are sorted by (dates or numbers); empty: the file's row order")
    context_length: int = option(96, "time steps of a window the model reads (the context)", bound=">= 1")
    pred_length: int = option(24, "time steps after the context it forecasts (the target)", bound=">= 1")
    stride: int = option(1, "time steps between the starts of consecutive windows", bound=">= 1")
    windows_per_shard: int = option(
        0, "cut each split's windows into shards of this many (a long series makes several shards, so several ranks "
           "read it); 0: whole files per shard, grouped by shards.source_bytes_per_shard", bound=">= 0")
    split: Literal["time", "file"] = option(
        "time", "val split: time holds out the last shards.val_fraction of every file's rows (a val window's target lies "
                "in them, its context may reach back); file holds out whole files")
    normalization: Literal["zscore", "robust", "none"] = option(
        "zscore", "per column over the train rows of all files: zscore (mean, std), robust (median, IQR / 1.349) or none; "
                  "stored in the manifest")
    missing: Literal["error", "interpolate"] = option(
        "error", "an empty (NaN) cell: an error naming it, or interpolated linearly between its neighbouring rows (the nearest "
                 "value at the ends)")

    def __post_init__(self):
        check_bounds(self, "timeseries")
        for name in ("input_columns", "target_columns"):
            columns = getattr(self, name)
            repeated = sorted({column for column in columns if columns.count(column) > 1})
            if repeated:
                raise ValueError(f"timeseries.{name} names {repeated} more than once")


@dataclass
class RayConfig:
    address: str | None = option(None, "Ray cluster address; empty starts a local instance")
    num_cpus: int = option(0, "CPUs of the local instance (0: all)", bound=">= 0")
    object_store_mb: int = option(512, "object store size of the local instance (MiB; Ray needs at least 75)", bound=">= 75")
    max_tasks: int = option(0, "prepare: shard-building tasks running at once (0: one per CPU); lower it when one input needs much memory",
                            bound=">= 0")

    def __post_init__(self):
        check_bounds(self, "ray")


@dataclass
class PrepareConfig:
    source: SourceConfig
    shards: ShardsConfig
    tokenizer: TokenizerConfig = option(help="text tokenizer", factory=TokenizerConfig)
    meg: MegConfig = option(help="MEG/EEG preprocessing (source.kind meg)", factory=MegConfig)
    labels: LabelsConfig = option(help="class labels of the windows, for classifiers (source.kind meg); empty: none",
                                  factory=LabelsConfig)
    video: VideoConfig = option(help="video decoding and clipping (source.kind video)", factory=VideoConfig)
    token_ids: TokenIdsConfig = option(help="integer token data (source.kind tokens)", factory=TokenIdsConfig)
    timeseries: TimeseriesConfig = option(help="tables of time series -> forecasting windows (source.kind timeseries)",
                                          factory=TimeseriesConfig)
    ray: RayConfig = option(help="Ray runtime", factory=RayConfig)
    launch: LaunchConfig = option(help="cluster jobs: tokfleet submit slurm|ray|local", factory=LaunchConfig)

    def __post_init__(self):
        labels = self.labels
        if (labels.files or labels.annotations or labels.events) and self.source.kind != "meg":
            raise ConfigError(f"labels: class labels are read for source.kind meg, not {self.source.kind}", key="labels")


# ---------------------------------------------------------- pretokenize config


@dataclass
class PretokenizeInputConfig:
    dataset: str = option(help="raw dataset root URL: a `tokfleet prepare` output of MEG/EEG windows or video clips")
    splits: list[str] = option(help="manifest splits to tokenize", factory=lambda: ["train", "val"])
    storage_options: dict[str, Any] = option(help="fsspec storage options for the input URL", factory=dict)

    def __post_init__(self):
        if not self.splits or any(split not in ("train", "val") for split in self.splits):
            raise ValueError(f"input.splits must list 'train' and/or 'val', got {self.splits}")


@dataclass
class PretokenizeModelConfig:
    checkpoint: str = option(help="tokenizer checkpoint folder, or a run dir (its newest complete checkpoint)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "device of each actor's tokenizer; auto: cuda when the actor has a GPU")


@dataclass
class TokenShardsConfig:
    output: str = option(help="token dataset root URL: token shards and manifest.json go here")
    name: str = option("tokens", "shard name prefix: {name}-{index:06d}.tar")
    raw_shards_per_shard: int = option(1, "consecutive raw shards (of one split) tokenized into one token shard", bound=">= 1")
    storage_options: dict[str, Any] = option(help="fsspec storage options for the output URL", factory=dict)

    def __post_init__(self):
        check_bounds(self, "shards")


@dataclass
class ActorPoolConfig:
    num_actors: int = option(1, "tokenizer actors (model replicas) in the Ray Data actor pool", bound=">= 1")
    num_cpus: float = option(1.0, "CPUs reserved per actor", bound=">= 0")
    num_gpus: float = option(0.0, "GPUs per actor (1 on a GPU node; a fraction shares a GPU)", bound=">= 0")
    batch_size: int = option(32, "samples per tokenizer forward pass (neighbouring samples of one shape)", bound=">= 1")

    def __post_init__(self):
        check_bounds(self, "actors")


@dataclass
class PretokenizeConfig:
    input: PretokenizeInputConfig
    tokenizer: PretokenizeModelConfig
    shards: TokenShardsConfig
    actors: ActorPoolConfig = option(help="the Ray Data actor pool running the tokenizer", factory=ActorPoolConfig)
    ray: RayConfig = option(help="Ray runtime", factory=RayConfig)
    launch: LaunchConfig = option(help="cluster jobs: tokfleet submit slurm|ray|local", factory=LaunchConfig)


# ------------------------------------------------------------------- loading

ConfigT = TypeVar("ConfigT")


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of YAML file `path`. Anything else is a one-line ConfigError naming the file:
    missing, a folder, unreadable, not UTF-8 text, a syntax error (line and column), a duplicate key."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    if path.exists() and not path.is_file():
        raise ConfigError(f"config {path} is not a regular file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not a text file (UTF-8): byte 0x{raw[error.start]:02x} at offset {error.start}") from None
    if "\0" in text:
        raise ConfigError(f"config file {path} is not a text file (UTF-8): NUL byte at offset {text.index(chr(0))}")
    try:
        data = load_yaml(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({error.context} at line {error.context_mark.line + 1})" if error.context and error.context_mark else ""
        problem = error.problem or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}{context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    except ConfigError as error:  # a duplicate key
        raise ConfigError(f"{path}: {error}", key=error.key) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got a {type(data).__name__}")
    return data


def load_config(path: str | Path, cls: type[ConfigT], overrides: list[str] | None = None) -> ConfigT:
    """Read YAML `path`, apply `--set` overrides, validate against `cls`. An error a `--set` caused names it."""
    data = read_yaml(path)
    overrides = overrides or []
    try:
        apply_overrides(data, cls, overrides)
        return from_dict(cls, data)
    except ConfigError as error:
        message = str(error)
        culprit = None if message.startswith("--set ") else _override_setting(error.key, overrides)
        raise ConfigError(f"{path}: " + (f"--set {culprit}: " if culprit else "") + message, key=error.key) from None


def _override_setting(key: str | None, overrides: list[str]) -> str | None:
    """The last `--set` that set `key`, a section above it or a key inside it."""
    for text in reversed(overrides):
        setting = text.split("=", 1)[0].strip()
        if key and (setting == key or key.startswith((f"{setting}.", f"{setting}[")) or setting.startswith(f"{key}.")):
            return text
    return None


def dump_config(config: Any) -> str:
    """YAML of `config` without credentials (see core/redact.py): what is printed or saved."""
    from core.redact import public_dict

    return yaml.safe_dump(public_dict(config), sort_keys=False)


def save_config(config: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_config(config))
    tmp.replace(path)
