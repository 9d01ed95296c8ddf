"""Bad input, table-driven: every row runs the real CLI and must end with exit code 2, exactly one stderr
line `tokfleet: error: ...` naming the culprit (key, path or value), no traceback, and no change to
anything written before (a dataset and a run dir with a checkpoint, compared by sha256 after each row).

To add a row, append a `Case(name, argv, fragment, setup=...)` to CASES (or a group builder below).
In `argv` and `fragment`, `{dataset}`, `{run}`, `{checkpoint}` name the module's dataset root, run dir and
its checkpoint folder, and `{tmp}` the row's own empty folder, which already holds valid configs
`train.yaml` (output_dir `{tmp}/run`), `prepare.yaml` and `pretokenize.yaml`. `setup(env)` writes or
breaks what the row needs (see `Env`); `is_subprocess=True` runs `python -m ...` in a real process.
Rows fail before any Ray instance starts or any step trains, so the whole table takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import write_token_dataset


@dataclass
class Env:
    """What a row's setup may use: the row's folder, the module's fixture paths, and pytest's monkeypatch."""
    tmp: Path
    dataset: Path
    run: Path
    checkpoint: Path
    monkeypatch: pytest.MonkeyPatch

    def fill(self, text: str) -> str:
        for name in ("tmp", "dataset", "run", "checkpoint"):
            text = text.replace("{" + name + "}", str(getattr(self, name)))
        return text


@dataclass
class Case:
    name: str
    argv: list[str]  # tokfleet's arguments (or, with is_subprocess, a module's after `python -m`)
    fragment: str  # must appear in the error line
    setup: Callable[[Env], None] | None = None
    is_subprocess: bool = False


def write(name: str, content: str | bytes, mode: int | None = None) -> Callable[[Env], None]:
    """A setup writing `content` (placeholders filled when text) to {tmp}/name."""
    def setup(env: Env) -> None:
        path = env.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(env.fill(content))
        if mode is not None:
            path.chmod(mode)
    return setup


def make_dir(name: str) -> Callable[[Env], None]:
    return lambda env: (env.tmp / name).mkdir(parents=True)


def unreadable(name: str) -> Callable[[Env], None]:
    """{tmp}/name without read permission; root reads anything, so there the read itself is made to fail so."""
    def setup(env: Env) -> None:
        path = env.tmp / name
        path.write_text("data:\n  dataset: x\n")
        path.chmod(0)
        if os.geteuid() == 0:
            original = Path.read_bytes

            def read_bytes(self):
                if self == path:
                    raise PermissionError(13, "Permission denied", str(self))
                return original(self)
            env.monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return setup


def copy_checkpoint_torn(name: str) -> Callable[[Env], None]:
    """{tmp}/step-00000002: a copy of the module's checkpoint with file `name` cut to half its length."""
    def setup(env: Env) -> None:
        target = env.tmp / env.checkpoint.name
        shutil.copytree(env.checkpoint, target)
        data = (target / name).read_bytes()
        (target / name).write_bytes(data[: len(data) // 2])
    return setup


def copy_checkpoint_without(name: str) -> Callable[[Env], None]:
    """{tmp}/step-00000002: a copy of the module's checkpoint with file `name` removed."""
    def setup(env: Env) -> None:
        target = env.tmp / env.checkpoint.name
        shutil.copytree(env.checkpoint, target)
        (target / name).unlink()
    return setup


# ----------------------------------------------------------------------------- the table

VALID_TRAIN = """\
run:
  name: bad
  output_dir: {tmp}/run
  max_steps: 2
  device: cpu
data:
  dataset: {dataset}
  num_streams: 2
"""


def config_file_cases() -> list[Case]:
    return [
        Case("config missing", ["train", "{tmp}/nope.yaml"], "config file not found: {tmp}/nope.yaml"),
        Case("config is a directory", ["train", "{tmp}"], "config {tmp} is a directory"),
        Case("config is binary", ["train", "{tmp}/bin.yaml"], "{tmp}/bin.yaml is not a text file (UTF-8)",
             write("bin.yaml", bytes(range(256)) * 4)),
        Case("config has NUL bytes", ["train", "{tmp}/nul.yaml"], "{tmp}/nul.yaml is not a text file (UTF-8)",
             write("nul.yaml", b"data:\n  dataset: x\x00\x00\n")),
        Case("config unreadable", ["train", "{tmp}/locked.yaml"], "{tmp}/locked.yaml is not readable (permission denied)",
             unreadable("locked.yaml")),
        Case("prepare config is a directory", ["prepare", "{tmp}"], "config {tmp} is a directory"),
        Case("pretokenize config missing", ["pretokenize", "{tmp}/nope.yaml"], "config file not found"),
        Case("duplicate top-level key", ["train", "{tmp}/dup.yaml"], "{tmp}/dup.yaml: duplicate key 'run' at lines 1 and 9",
             write("dup.yaml", VALID_TRAIN + "run:\n  name: again\n")),
        Case("duplicate nested key", ["train", "{tmp}/dup.yaml"], "duplicate key 'optim.lr' at lines 10 and 12",
             write("dup.yaml", VALID_TRAIN + "optim:\n  lr: 0.1\n  warmup_steps: 1\n  lr: 0.2\n")),
        Case("duplicate key in a flow mapping", ["train", "{tmp}/dup.yaml"], "duplicate key 'model.args.n_layer' twice on line 9",
             write("dup.yaml", VALID_TRAIN + "model: {name: gpt, args: {n_layer: 2, n_layer: 3}}\n")),
        Case("duplicate key in a prepare config", ["prepare", "{tmp}/dup.yaml"], "duplicate key 'shards' at lines 3 and 5",
             write("dup.yaml", "source:\n  paths: [a]\nshards:\n  output: o\nshards:\n  output: p\n")),
        Case("YAML bad indentation", ["train", "{tmp}/syntax.yaml"], "{tmp}/syntax.yaml: not valid YAML at line 4, column 10: mapping values are not allowed here",
             write("syntax.yaml", "run:\n  name: x\n  max_steps: 3\n   device: cpu\n")),
        Case("YAML unclosed bracket", ["train", "{tmp}/syntax.yaml"], "not valid YAML at line 3, column 1",
             write("syntax.yaml", "data:\n  dataset: [x\n")),
        Case("YAML tab indentation", ["train", "{tmp}/syntax.yaml"], "not valid YAML at line 2, column 1: found character '\\t'",
             write("syntax.yaml", "data:\n\tdataset: x\n")),
        Case("top level is a list", ["train", "{tmp}/list.yaml"], "top level must be a mapping of sections, got a list",
             write("list.yaml", "- run\n- data\n")),
        Case("unknown section", ["train", "{tmp}/c.yaml"], "unknown key 'optm' (did you mean 'optim'?)",
             write("c.yaml", VALID_TRAIN + "optm:\n  lr: 0.1\n")),
        Case("unknown key", ["train", "{tmp}/c.yaml"], "unknown key 'optim.warmup' (did you mean 'warmup_steps'?)",
             write("c.yaml", VALID_TRAIN + "optim:\n  warmup: 3\n")),
        Case("wrong type: integer", ["train", "{tmp}/c.yaml"], "'optim.micro_batch_size' = 'eight' must be an integer",
             write("c.yaml", VALID_TRAIN + "optim:\n  micro_batch_size: eight\n")),
        Case("wrong type: boolean", ["train", "{tmp}/c.yaml"], "'data.shuffle' = 'sometimes' must be true or false",
             write("c.yaml", VALID_TRAIN.replace("  num_streams: 2", "  shuffle: sometimes"))),
        Case("wrong type: section", ["train", "{tmp}/c.yaml"], "'run' must be a mapping of RunConfig fields",
             write("c.yaml", "run: 3\ndata:\n  dataset: x\n")),
        Case("missing required section", ["train", "{tmp}/c.yaml"], "missing required key 'data'", write("c.yaml", "run:\n  name: x\n")),
        Case("choice out of its list", ["train", "{tmp}/train.yaml", "--set", "engine.precision=fp8"], "'engine.precision' = 'fp8' must be one of"),
        Case("prepare section in a train config", ["prepare", "{tmp}/train.yaml"], "unknown key 'run'"),
    ]


def override_cases() -> list[Case]:
    train = ["train", "{tmp}/train.yaml", "--set"]
    return [
        Case("--set without =", [*train, "optim.lr"], "--set optim.lr: must look like key.path=value"),
        Case("--set empty key", [*train, "=3"], "--set =3: the key before '=' is empty"),
        Case("--set unknown key", [*train, "optim.learning_rate=1"], "--set optim.learning_rate=1: unknown key 'optim.learning_rate'"),
        Case("--set unknown section", [*train, "optimizer.lr=1"], "--set optimizer.lr=1: unknown key 'optimizer'"),
        Case("--set bad YAML value", [*train, "optim.lr=[1,"], "--set optim.lr=[1,: 'optim.lr' = '[1,' must be a number"),
        Case("--set wrong type", [*train, "run.max_steps=ten"], "--set run.max_steps=ten: 'run.max_steps' = 'ten' must be an integer"),
        Case("--set into a value", [*train, "run.name.first=1"], "--set run.name.first=1: 'run.name' is not a section"),
        Case("--set duplicate key in its value", [*train, "model.args={n_layer: 1, n_layer: 2}"], "duplicate key 'n_layer'"),
        Case("--set NaN", [*train, "optim.lr=.nan"], "--set optim.lr=.nan: optim.lr must be > 0, got nan"),
        Case("--set infinity", [*train, "engine.timeout_s=.inf"], "engine.timeout_s must be > 0, got inf"),
        Case("--set across fields", [*train, "engine.zero_stage=2"], "--set engine.zero_stage=2: engine.zero_stage/offload_*/deepspeed_config need DeepSpeed"),
        Case("--set the last of two", ["train", "{tmp}/train.yaml", "--set", "optim.lr=0.1", "--set", "optim.lr=-1"],
             "--set optim.lr=-1: optim.lr must be > 0, got -1"),
    ]


# (dotted key, a value out of range, the message's "must be ..." part)
TRAIN_RANGES = [
    ("run.seed", "-1", "in [0, 2**63)"), ("run.max_steps", "0", ">= 1"),
    ("data.num_streams", "0", ">= 1"), ("data.num_workers", "-1", ">= 0"),
    ("optim.lr", "0", "> 0"), ("optim.min_lr_ratio", "1.5", "in [0, 1]"), ("optim.warmup_steps", "-1", ">= 0"),
    ("optim.weight_decay", "-0.1", ">= 0"), ("optim.beta1", "1", "in [0, 1)"), ("optim.beta2", "-0.1", "in [0, 1)"),
    ("optim.eps", "0", "> 0"), ("optim.grad_clip", "-1", ">= 0"), ("optim.micro_batch_size", "0", ">= 1"),
    ("optim.grad_accum_steps", "0", ">= 1"),
    ("engine.peak_flops", "-1", ">= 0"), ("engine.timeout_s", "0", "> 0"), ("engine.expert_parallel_size", "0", ">= 1"),
    ("engine.zero_stage", "5", "in [0, 3]"),
    ("checkpoint.every_steps", "-5", ">= 0"), ("checkpoint.keep_last", "0", ">= 1"),
    ("logging.every_steps", "0", ">= 1"),
    ("eval.every_steps", "-1", ">= 0"), ("eval.num_batches", "0", ">= 1"),
    ("launch.nodes", "0", ">= 1"), ("launch.nproc_per_node", "0", ">= 1"), ("launch.gpus_per_node", "-1", ">= 0"),
    ("launch.slurm.cpus_per_task", "-1", ">= 0"), ("launch.slurm.signal_seconds", "0", ">= 1"),
    ("launch.ray.cpus_per_worker", "-1", ">= 0"), ("launch.ray.gpus_per_worker", "-0.5", ">= 0"),
    ("launch.ray.entrypoint_num_cpus", "-1", ">= 0"),
]
PREPARE_RANGES = [
    ("source.max_files", "-1", ">= 0"),
    ("tokenizer.vocab_size", "100", "in [257, 2**31]"), ("tokenizer.min_frequency", "-1", ">= 0"),
    ("shards.seq_len", "1", ">= 2"), ("shards.source_bytes_per_shard", "0", ">= 1"), ("shards.val_fraction", "1", "in [0, 1)"),
    ("meg.sfreq", "0", "> 0"), ("meg.h_freq", "200", "in (0, 125)"), ("meg.l_freq", "150", "in (0, 100)"),
    ("meg.notch_freqs", "[50, 500]", "in (0, 125)"), ("meg.window_s", "0", "> 0"), ("meg.overlap_s", "-1", ">= 0"),
    ("video.height", "0", ">= 1"), ("video.width", "0", ">= 1"), ("video.fps", "-1", ">= 0"), ("video.clip_frames", "0", ">= 1"),
    ("video.stride_frames", "0", ">= 1"), ("video.max_clips_per_file", "-1", ">= 0"),
    ("token_ids.vocab_size", "-1", "in [0, 2**31]"),
    ("ray.num_cpus", "-1", ">= 0"), ("ray.object_store_mb", "10", ">= 75"), ("ray.max_tasks", "-1", ">= 0"),
]
PRETOKENIZE_RANGES = [
    ("shards.raw_shards_per_shard", "0", ">= 1"), ("actors.num_actors", "0", ">= 1"), ("actors.num_cpus", "-1", ">= 0"),
    ("actors.num_gpus", "-1", ">= 0"), ("actors.batch_size", "0", ">= 1"),
]


def range_cases() -> list[Case]:
    cases = []
    for command, table in (("train", TRAIN_RANGES), ("prepare", PREPARE_RANGES), ("pretokenize", PRETOKENIZE_RANGES)):
        for key, value, bound in table:
            fragment = f"--set {key}={value}: {key} must be {bound}, got "
            cases.append(Case(f"{command} {key}={value}", [command, f"{{tmp}}/{command}.yaml", "--set", f"{key}={value}"], fragment))
    cases.append(Case("config file value out of range", ["train", "{tmp}/c.yaml"], "{tmp}/c.yaml: checkpoint.keep_last must be >= 1, got 0",
                      write("c.yaml", VALID_TRAIN + "checkpoint:\n  keep_last: 0\n")))
    cases.append(Case("pretokenize split unknown", ["pretokenize", "{tmp}/pretokenize.yaml", "--set", "input.splits=[test]"],
                      "input.splits must list 'train' and/or 'val'"))
    return cases


def argument_cases() -> list[Case]:
    generate = ["generate", "--checkpoint", "{run}"]
    forecast = ["forecast", "{run}", "--data", "{dataset}"]
    return [
        Case("train --stop-at-step negative", ["train", "{tmp}/train.yaml", "--stop-at-step", "-1"],
             "argument --stop-at-step: must be an integer >= 1, got '-1'"),
        Case("train --stop-at-step 0", ["train", "{tmp}/train.yaml", "--stop-at-step", "0"], "--stop-at-step: must be an integer >= 1"),
        Case("train --stop-at-step text", ["train", "{tmp}/train.yaml", "--stop-at-step", "ten"], "got 'ten'"),
        Case("train without a config", ["train"], "the following arguments are required: config"),
        Case("train unknown flag", ["train", "{tmp}/train.yaml", "--resmue", "auto"], "unrecognized arguments: --resmue"),
        Case("no command", [], "the following arguments are required: COMMAND"),
        Case("unknown command", ["trian"], "invalid choice: 'trian'"),
        Case("generate --num-samples 0", [*generate, "--num-samples", "0"], "argument --num-samples: must be an integer >= 1, got '0'"),
        Case("generate --max-new-tokens negative", [*generate, "--max-new-tokens", "-5"], "argument --max-new-tokens: must be an integer >= 1"),
        Case("generate --temperature negative", [*generate, "--temperature", "-1"], "argument --temperature: must be a number >= 0"),
        Case("generate --temperature NaN", [*generate, "--temperature", "nan"], "argument --temperature: must be a number >= 0, got 'nan'"),
        Case("generate --top-k 0", [*generate, "--top-k", "0"], "argument --top-k: must be an integer >= 1"),
        Case("generate --seed negative", [*generate, "--seed", "-3"], "argument --seed: must be an integer >= 0"),
        Case("generate --num-chunks 0", [*generate, "--num-chunks", "0"], "argument --num_chunks/--num-chunks: must be an integer >= 1"),
        Case("generate --mode unknown", [*generate, "--mode", "dream"], "argument --mode: invalid choice: 'dream'"),
        Case("generate without --checkpoint", ["generate", "--prompt", "x"], "the following arguments are required: --checkpoint"),
        Case("generate prompt and prompt tokens", [*generate, "--prompt", "x", "--prompt-tokens", "1 2"], "--prompt (text) and --prompt-tokens"),
        Case("generate prompt token out of vocabulary", [*generate, "--prompt-tokens", "1 99999"], "id 99999 (index 1) is outside"),
        Case("generate prompt token not a number", [*generate, "--prompt-tokens", "1 two"], "'two' (index 1) is not an integer"),
        Case("eval --num-batches 0", ["eval", "{run}", "--data", "{dataset}", "--num-batches", "0"], "argument --num-batches: must be an integer >= 1"),
        Case("eval --batch-size 0", ["eval", "{run}", "--data", "{dataset}", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        Case("eval without --data", ["eval", "{run}"], "the following arguments are required: --data"),
        Case("forecast --num-windows 0", [*forecast, "--num-windows", "0"], "argument --num-windows: must be an integer >= 1"),
        Case("forecast --num-samples 0", [*forecast, "--num-samples", "0"], "argument --num-samples: must be an integer >= 1"),
        Case("forecast --context 0", [*forecast, "--context", "0"], "argument --context: must be an integer >= 1"),
        Case("forecast --horizon negative", [*forecast, "--horizon", "-3"], "argument --horizon: must be an integer >= 1, got '-3'"),
        Case("forecast --top-k 0", [*forecast, "--top-k", "0"], "argument --top-k: must be an integer >= 1"),
        Case("forecast --temperature negative", [*forecast, "--temperature", "-0.5"], "argument --temperature: must be a number >= 0"),
        Case("export without --out", ["export", "{run}"], "the following arguments are required: --out"),
        Case("inspect without a path", ["inspect"], "the following arguments are required: path"),
        Case("submit local --nproc 0", ["submit", "local", "{tmp}/train.yaml", "--nproc", "0", "--dry-run"],
             "launch.nproc_per_node must be >= 1, got 0"),
        Case("submit slurm --nodes 0", ["submit", "slurm", "{tmp}/train.yaml", "--nodes", "0", "--dry-run"], "launch.nodes must be >= 1, got 0"),
        Case("submit slurm --nodes text", ["submit", "slurm", "{tmp}/train.yaml", "--nodes", "two"], "argument --nodes: invalid int value: 'two'"),
        Case("submit slurm --signal-seconds 0", ["submit", "slurm", "{tmp}/train.yaml", "--requeue", "--signal-seconds", "0", "--dry-run"],
             "launch.slurm.signal_seconds must be >= 1, got 0"),
        Case("submit unknown backend", ["submit", "k8s", "{tmp}/train.yaml"], "invalid choice: 'k8s'"),
        Case("submit config of no stage", ["submit", "local", "{tmp}/c.yaml", "--dry-run"], "cannot tell the stage",
             write("c.yaml", "optim:\n  lr: 0.1\n")),
        Case("submit config with a duplicate key", ["submit", "local", "{tmp}/dup.yaml", "--dry-run"], "duplicate key 'data' at lines 6 and 9",
             write("dup.yaml", VALID_TRAIN + "data:\n  dataset: other\n")),
        Case("submit missing config", ["submit", "slurm", "{tmp}/nope.yaml", "--dry-run"], "config file not found: {tmp}/nope.yaml"),
        Case("jobs of no job", ["jobs", "status", "{tmp}/nowhere"], "job '{tmp}/nowhere': not a job dir"),
    ]


def path_cases() -> list[Case]:
    train = ["train", "{tmp}/train.yaml"]
    return [
        Case("--resume a dataset root", [*train, "--resume", "{dataset}"], "--resume: {dataset} is a dataset root (it holds manifest.json)"),
        Case("--resume an empty folder", [*train, "--resume", "{tmp}/empty"], "--resume: {tmp}/empty is an empty folder", make_dir("empty")),
        Case("--resume a file", [*train, "--resume", "{tmp}/notes.txt"], "--resume: {tmp}/notes.txt is a file", write("notes.txt", "hi\n")),
        Case("--resume nothing", [*train, "--resume", "{tmp}/nowhere"], "checkpoint not found: {tmp}/nowhere"),
        Case("--resume a run dir without checkpoints", [*train, "--resume", "{tmp}/old"],
             "--resume {tmp}/old: run directory has no complete checkpoint (checkpoints/ holds none)", make_dir("old/checkpoints")),
        Case("--resume a run dir of no checkpoints/", [*train, "--resume", "{tmp}/old"], "{tmp}/old is a run dir without a complete checkpoint",
             write("old/config.yaml", "run: {}\n")),
        Case("--resume a checkpoint without state", [*train, "--resume", "{tmp}/step-00000002"],
             "its COMPLETE marker is there but trainer_state.json is missing", copy_checkpoint_without("trainer_state.json")),
        Case("--resume a checkpoint without marker", [*train, "--resume", "{tmp}/step-00000002"],
             "{tmp}/step-00000002 is incomplete (no COMPLETE marker)", copy_checkpoint_without("COMPLETE")),
        Case("--resume a folder of other files", [*train, "--resume", "{tmp}/misc"], "{tmp}/misc is a folder without trainer_state.json",
             write("misc/readme.txt", "x\n")),
        Case("--resume a checkpoint with torn weights", [*train, "--resume", "{tmp}/step-00000002"],
             "--resume {tmp}/step-00000002: the checkpoint fails its checks (model.safetensors holds", copy_checkpoint_torn("model.safetensors")),
        Case("--resume a checkpoint with a torn optimizer", [*train, "--resume", "{tmp}/step-00000002"],
             "the checkpoint fails its checks (optimizer.pt holds", copy_checkpoint_torn("optimizer.pt")),
        Case("--resume a checkpoint with a torn trainer state", [*train, "--resume", "{tmp}/step-00000002"],
             "{tmp}/step-00000002/trainer_state.json", copy_checkpoint_torn("trainer_state.json")),
        Case("generate from a checkpoint with torn weights", ["generate", "--checkpoint", "{tmp}/step-00000002", "--prompt-tokens", "1 2"],
             "{tmp}/step-00000002", copy_checkpoint_torn("model.safetensors")),
        Case("export a checkpoint with torn weights", ["export", "{tmp}/step-00000002", "--out", "{tmp}/out"],
             "{tmp}/step-00000002", copy_checkpoint_torn("model.safetensors")),
        Case("train fp16 on CPU", [*train, "--set", "engine.precision=fp16"], "engine.precision fp16 needs a GPU (CUDA); on CPU use bf16 or fp32"),
        Case("train fp16 on CPU, accelerate", [*train, "--set", "engine.precision=fp16", "--set", "engine.kind=accelerate",
                                               "--set", "engine.strategy=ddp"], "engine.precision fp16 needs a GPU (CUDA)"),
        Case("train into a run dir that holds a run", [*train, "--set", "run.output_dir={run}"], "{run}"),
        Case("train on a missing dataset", [*train, "--set", "data.dataset={tmp}/nowhere"], "{tmp}/nowhere"),
        Case("train on a file as dataset", [*train, "--set", "data.dataset={tmp}/notes.txt"], "{tmp}/notes.txt", write("notes.txt", "hi\n")),
        Case("generate from a dataset root", ["generate", "--checkpoint", "{dataset}"], "{dataset} is a dataset root"),
        Case("generate from an empty folder", ["generate", "--checkpoint", "{tmp}/empty"], "{tmp}/empty is an empty folder", make_dir("empty")),
        Case("generate from a file", ["generate", "--checkpoint", "{tmp}/notes.txt"], "{tmp}/notes.txt is a file", write("notes.txt", "hi\n")),
        Case("inspect a file", ["inspect", "{tmp}/notes.txt"], "{tmp}/notes.txt is a file: inspect takes", write("notes.txt", "hi\n")),
        Case("inspect an empty folder", ["inspect", "{tmp}/empty"], "{tmp}/empty is an empty folder", make_dir("empty")),
        Case("inspect nothing", ["inspect", "{tmp}/nowhere"], "{tmp}/nowhere"),
        Case("export a dataset root", ["export", "{dataset}", "--out", "{tmp}/out"], "{dataset} is a dataset root"),
        Case("export over the dataset", ["export", "{run}", "--out", "{dataset}"], "--out {dataset}: folder exists and is not empty"),
        Case("eval a dataset root", ["eval", "{dataset}", "--data", "{dataset}"], "{dataset} is a dataset root"),
        Case("eval on a missing dataset", ["eval", "{run}", "--data", "{tmp}/nowhere"], "{tmp}/nowhere"),
        Case("forecast with a dataset root", ["forecast", "{dataset}", "--data", "{dataset}"], "{dataset} is a dataset root"),
        Case("pretokenize with a dataset root as tokenizer", ["pretokenize", "{tmp}/pretokenize.yaml", "--set", "tokenizer.checkpoint={dataset}"],
             "{dataset} is a dataset root"),
    ]


def process_cases() -> list[Case]:
    """A few rows in a real process: the entry points' own logging and argument parsing."""
    return [
        Case("python -m trainer: binary config", ["trainer", "{tmp}/bin.yaml"], "{tmp}/bin.yaml is not a text file (UTF-8)",
             write("bin.yaml", bytes(range(128, 256))), is_subprocess=True),
        Case("python -m trainer: --stop-at-step -1", ["trainer", "{tmp}/train.yaml", "--stop-at-step", "-1"],
             "argument --stop-at-step: must be an integer >= 1", is_subprocess=True),
        Case("tokfleet: duplicate key", ["launch.cli", "train", "{tmp}/dup.yaml"], "duplicate key 'run' at lines 1 and 9",
             write("dup.yaml", VALID_TRAIN + "run:\n  name: again\n"), is_subprocess=True),
    ]


def damaged_dataset(damage: Callable[[Path], object]) -> Callable[[Env], None]:
    """{tmp}/data: a copy of the module's dataset, then `damage(root)` (see test_data_verification)."""
    def setup(env: Env) -> None:
        shutil.copytree(env.dataset, env.tmp / "data")
        damage(env.tmp / "data")
    return setup


def truncate_shard(root: Path) -> None:
    path = root / "toy-000001.tar"
    path.write_bytes(path.read_bytes()[:3000])


def data_cases() -> list[Case]:
    """Data verified where it is read (the first batch reads every shard and sample: one batch of 16)."""
    from test_data_verification import damage_header, flip_payload_bit, put_bad_token_id

    train = ["train", "{tmp}/train.yaml", "--set", "data.dataset={tmp}/data", "--set", "optim.micro_batch_size=16",
             "--set", "logging.progress=false"]  # the bar would start on stderr before the first batch fails
    return [
        Case("train on a shard with a flipped bit", train, "shard toy-000000.tar of {tmp}/data: sha256 differs from the manifest",
             damaged_dataset(lambda root: flip_payload_bit(root, 0))),
        Case("train on a truncated shard", train, "shard toy-000001.tar of {tmp}/data: 3000 bytes, the manifest records",
             damaged_dataset(truncate_shard)),
        Case("train on a damaged .npy header", train,
             "shard toy-000000.tar of {tmp}/data: sample toy-000000-000005, field tokens.npy: does not decode",
             damaged_dataset(lambda root: damage_header(root, 0, 5))),
        Case("train on a token id outside the vocabulary", train,
             "sample toy-000001-000002, field tokens: token id 200 outside the model's vocabulary [0, 64)",
             damaged_dataset(lambda root: put_bad_token_id(root, 1, 2))),
        Case("data.on_corrupt not a choice", ["train", "{tmp}/train.yaml", "--set", "data.on_corrupt=ignore"],
             "'data.on_corrupt' = 'ignore' must be one of 'error', 'skip'"),
    ]


CASES = [*config_file_cases(), *override_cases(), *range_cases(), *argument_cases(), *path_cases(), *process_cases(),
         *data_cases()]


# ----------------------------------------------------------------------------- fixtures and the runner


def checksums(*roots: Path) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for root in roots for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(dataset root, run dir, its checkpoint, their files' sha256): what no row may change."""
    from core.config import TrainConfig, load_config
    from trainer.loop import Trainer

    root = tmp_path_factory.mktemp("written")
    dataset = Path(write_token_dataset(root / "dataset", num_shards=2, samples_per_shard=8, val_samples=4, seq_len=16, vocab_size=64))
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "written", "output_dir": str(root / "run"), "max_steps": 2, "seed": 1, "device": "cpu"},
        "model": {"name": "gpt", "flavor": "debug", "args": {"n_layer": 1, "n_embd": 32}},
        "data": {"dataset": str(dataset), "num_streams": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "micro_batch_size": 2},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 2},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": 0, "num_batches": 1},
    }))
    Trainer(load_config(config, TrainConfig)).train()
    run = root / "run"
    checkpoint = run / "checkpoints" / "step-00000002"
    assert (checkpoint / "COMPLETE").is_file()
    return dataset, run, checkpoint, checksums(dataset, run)


def write_valid_configs(env: Env) -> None:
    (env.tmp / "train.yaml").write_text(env.fill(VALID_TRAIN))
    (env.tmp / "prepare.yaml").write_text(yaml.safe_dump({
        "source": {"paths": [str(env.tmp / "corpus" / "*.txt")]},
        "tokenizer": {"vocab_size": 300},
        "shards": {"output": str(env.tmp / "out"), "seq_len": 16},
        "ray": {"num_cpus": 1, "object_store_mb": 100},
    }))
    (env.tmp / "pretokenize.yaml").write_text(yaml.safe_dump({
        "input": {"dataset": str(env.dataset)},
        "tokenizer": {"checkpoint": str(env.run)},
        "shards": {"output": str(env.tmp / "tokens")},
    }))


def run_case(case: Case, env: Env, capsys) -> tuple[int, list[str]]:
    argv = [env.fill(arg) for arg in case.argv]
    if case.is_subprocess:
        result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=env.tmp, timeout=120)
        return result.returncode, result.stderr.strip().splitlines()
    from launch.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as error:
        code = error.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_exits_2_with_one_line(case, written, tmp_path, capsys, monkeypatch):
    dataset, run, checkpoint, before = written
    env = Env(tmp_path, dataset, run, checkpoint, monkeypatch)
    monkeypatch.chdir(tmp_path)  # anything a row writes by a relative path lands in its own folder
    write_valid_configs(env)
    if case.setup is not None:
        case.setup(env)
    code, lines = run_case(case, env, capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("tokfleet: error: "), lines
    assert "Traceback" not in lines[0]
    assert env.fill(case.fragment) in lines[0]
    assert checksums(dataset, run) == before, "a bad input changed what was written before"


def test_table_is_large_and_names_are_unique():
    assert len(CASES) >= 70
    assert len({case.name for case in CASES}) == len(CASES)
