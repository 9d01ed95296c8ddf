"""What models report besides their loss (modeling/reports.py, trainer/reports.py): each figure checked
against a hand computation on inputs with known results, on 1 rank and summed over 2 real ranks
(torchrun, gloo); then in real training runs: the figures in metrics.jsonl and the plots, and a resume
in the middle of a logging window that logs what the uninterrupted run logs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from launch.launchers import free_port
from modeling import reports
from modeling.layers.moe import MoEConfig, MoEMLP
from modeling.tokenizers.quantizers import VectorQuantizer
from trainer.metrics import read_metrics
from trainer.reports import ReportWindow

CODES = {(0, 0): [0, 0, 1], (0, 1): [0], (1, 0): [1, 2], (1, 1): [2, 2, 2]}  # (rank, micro-batch) -> codes hit
EXPERTS = {(0, 0): [0, 0, 0, 1], (0, 1): [1, 1, 2, 0], (1, 0): [3, 3, 3, 3], (1, 1): [0, 2, 2, 1]}  # top-1 choices
PARTS = {(0, 0): (2.0, 3), (0, 1): (4.0, 1), (1, 0): (1.0, 4), (1, 1): (7.0, 2)}  # (value, weight)
NUM_EXPERTS, CAPACITY_FACTOR = 4, 1.0  # 4 tokens over 4 experts: capacity 1 per expert per micro-batch


class Part(nn.Module):
    """Reports one loss part as a mean over `weight` elements (as a model's loss parts do)."""

    def __init__(self):
        super().__init__()
        self.last_report = {}


def build_cases() -> nn.Module:
    torch.manual_seed(0)
    cases = nn.Module()
    cases.vq = VectorQuantizer(2, 4).eval()  # eval: no codebook update, the histogram is the inputs'
    cases.vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    cases.moe = MoEMLP(NUM_EXPERTS, 8, MoEConfig(num_experts=NUM_EXPERTS, top_k=1, capacity_factor=CAPACITY_FACTOR)).train()
    with torch.no_grad():
        cases.moe.router.weight.copy_(10 * torch.eye(NUM_EXPERTS))  # token e_i goes to expert i
    cases.part = Part()
    return cases


def feed(cases: nn.Module, rank: int, micro_batch: int) -> None:
    cases.vq(cases.vq.codebook[CODES[rank, micro_batch]] + 0.1)
    cases.moe(torch.eye(NUM_EXPERTS)[EXPERTS[rank, micro_batch]])
    value, weight = PARTS[rank, micro_batch]
    cases.part.last_report = {"part": reports.mean(torch.tensor(value), weight)}


def expected(keys: list[tuple[int, int]]) -> dict:
    histogram = np.bincount([c for key in keys for c in CODES[key]], minlength=4)
    p = histogram / histogram.sum()
    load = np.bincount([e for key in keys for e in EXPERTS[key]], minlength=NUM_EXPERTS)
    capacity = math.ceil(CAPACITY_FACTOR * 4 / NUM_EXPERTS)
    dropped = sum(max(0, n - capacity) for key in keys for n in np.bincount(EXPERTS[key], minlength=NUM_EXPERTS))
    return {
        "codebook/l0_perplexity": math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()),
        "codebook/l0_active": float((histogram > 0).mean()),
        "codebook/l0_max_over_mean": float(p.max() * 4),
        "codebook/l0_revived": 0.0,
        "moe/load": list(load / load.sum()),
        "moe/load_active": float((load > 0).mean()),
        "moe/dropped": float(dropped),
        "moe/dropped_fraction": dropped / load.sum(),
        "part": sum(PARTS[key][0] * PARTS[key][1] for key in keys) / sum(PARTS[key][1] for key in keys),
    }


def check(record: dict, keys: list[tuple[int, int]]) -> None:
    for name, value in expected(keys).items():
        assert record[name] == pytest.approx(value, abs=1e-6), name
    assert set(record) >= {"moe/aux_loss", "moe/load_perplexity", "moe/load_max_over_mean"}


def test_one_rank_sums_micro_batches_not_their_figures():
    cases = build_cases()
    window = ReportWindow(cases)
    assert {type(m).__name__ for m in window.modules} == {"VectorQuantizer", "MoEMLP", "Part"}
    for micro_batch in range(2):
        feed(cases, 0, micro_batch)
        window.add()
    record = window.reduce()
    check(record, [(0, 0), (0, 1)])
    # the perplexity of the summed histogram ([3, 1, 0, 0]), not the mean of the batches' perplexities
    per_batch = [math.exp(-(q * np.log(q)).sum()) for q in (np.array([2, 1]) / 3, np.array([1.0]))]
    assert record["codebook/l0_perplexity"] != pytest.approx(np.mean(per_batch))
    assert window.reduce() == {}  # the window starts over after a record


def test_two_ranks_reduce_to_the_union(tmp_path):
    out = tmp_path / "record.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                             str(Path(__file__).parent / "reports_worker.py"), str(out)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    check(json.loads(out.read_text()), list(CODES))


def run_config(tmp_path: Path, dataset: str, name: str, model: str, model_args: dict, *, steps: int, **sections) -> Path:
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": steps, "seed": 3, "device": "cpu"},
        "model": {"name": model, "flavor": "debug", "args": model_args},
        "data": {"dataset": dataset, "num_streams": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "micro_batch_size": 4, "grad_accum_steps": 2},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "logging": {"every_steps": 4, "progress": False, "wandb": False},
        "eval": {"every_steps": 4, "num_batches": 1},
    }
    for section, values in sections.items():
        config[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "trainer", str(config), *args], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_moe_run_logs_expert_load_and_resumes_mid_window(tmp_path, token_dataset):
    args = {"moe_num_experts": 4, "moe_top_k": 2, "moe_capacity_factor": 1.0}
    config = run_config(tmp_path, token_dataset, "moe", "gpt", args, steps=8)
    train(config)
    records = read_metrics(tmp_path / "moe" / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 8]
    for record in records:
        assert len(record["moe/load"]) == 4 and sum(record["moe/load"]) == pytest.approx(1, abs=1e-5)
        assert 0 < record["moe/dropped_fraction"] < 1 and record["moe/dropped"] > 0  # capacity 1.0 drops some
        assert 1 <= record["moe/load_perplexity"] <= 4 and record["moe/aux_loss"] > 0
    plots = tmp_path / "moe" / "plots"
    assert (plots / "moe_load.png").stat().st_size > 5000 and (plots / "metrics.png").stat().st_size > 5000
    # stopped at step 2, half-way through the first logging window: the resumed run logs the same figures
    resumed = run_config(tmp_path, token_dataset, "moe-resumed", "gpt", args, steps=8)
    train(resumed, "--stop-at-step", "2")
    train(resumed, "--resume", "auto")
    again = read_metrics(tmp_path / "moe-resumed" / "metrics.jsonl")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}  # noqa: E731
    assert [strip(r) for r in again] == [strip(r) for r in records]


def test_tokenizer_run_logs_loss_parts_and_codebook_use(tmp_path):
    from test_causal_eval import write_meg_windows

    dataset = write_meg_windows(tmp_path / "meg", num_windows=16)
    config = run_config(tmp_path, dataset, "totem", "totem", {}, steps=4, optim={"micro_batch_size": 4, "grad_accum_steps": 1},
                        logging={"every_steps": 2}, eval={"every_steps": 2})
    train(config)
    records = read_metrics(tmp_path / "totem" / "metrics.jsonl")
    for record in records:
        # the parts add up to the loss: reconstruction + commitment, each a batch mean
        assert record["reconstruction_mse"] + record["commitment"] == pytest.approx(record["loss"], rel=1e-4)
        assert 0 < record["codebook/l0_active"] <= 1 and record["codebook/l0_perplexity"] >= 1
        assert record["codebook/l0_revived"] >= 0
    assert records[0]["codebook/l0_revived"] > 0  # the first batch revives the unused codes of a fresh codebook
    plots = tmp_path / "totem" / "plots"
    assert {p.name for p in plots.iterdir()} >= {"metrics.png", "codebook.png", "loss.png", "reconstruction.png"}
    assert (plots / "reconstruction.png").stat().st_size > 10000


# ------------------------------------------------------------------ samples during training


def test_samples_during_training_leave_training_alone(tmp_path, text_dataset):
    sampling = {"sample_every": 2, "sample_prompts": ["import json\n", "def "], "sample_max_new_tokens": 8}
    base = dict(optim={"grad_accum_steps": 1}, logging={"every_steps": 1}, eval={"every_steps": 2})
    plain = run_config(tmp_path, text_dataset, "plain", "gpt", {}, steps=4, **base)
    sampled = run_config(tmp_path, text_dataset, "sampled", "gpt", {}, steps=4, **{**base, "eval": {"every_steps": 2, **sampling}})
    train(plain)
    train(sampled, "--stop-at-step", "2")
    train(sampled, "--resume", "auto")
    lines = [json.loads(line) for line in (tmp_path / "sampled" / "samples.jsonl").read_text().splitlines()]
    assert [(line["step"], line["kind"], line["prompt"]) for line in lines] == \
        [(step, "continuation", prompt) for step in (2, 4) for prompt in sampling["sample_prompts"]]
    assert all(isinstance(line["text"], str) and line["text"] for line in lines)
    # sampling draws from its own generator and leaves the model as it was: the losses are the plain run's
    strip = lambda r: {k: r[k] for k in ("step", "loss", "val_loss", "grad_norm") if k in r}  # noqa: E731
    assert [strip(r) for r in read_metrics(tmp_path / "sampled" / "metrics.jsonl")] == \
        [strip(r) for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    # the same samples again from a fresh run (seeded by run.seed and the step)
    again = run_config(tmp_path, text_dataset, "again", "gpt", {}, steps=4, **{**base, "eval": {"every_steps": 2, **sampling}})
    train(again)
    assert (tmp_path / "again" / "samples.jsonl").read_text() == (tmp_path / "sampled" / "samples.jsonl").read_text()


def test_latent_model_samples_reconstructions(tmp_path, text_dataset):
    config = run_config(tmp_path, text_dataset, "vae", "tokcom_vae", {"sequence_len": 64}, steps=2,
                        optim={"grad_accum_steps": 1}, logging={"every_steps": 1},
                        eval={"every_steps": 2, "sample_every": 2, "sample_prompts": ["import os\n"]})
    train(config)
    (line,) = [json.loads(line) for line in (tmp_path / "vae" / "samples.jsonl").read_text().splitlines()]
    assert line["kind"] == "reconstruction" and line["step"] == 2 and 0 <= line["accuracy"] <= 1


def test_sample_settings_refused_in_one_line(tmp_path, token_dataset):
    for eval_section, message in (({"sample_every": 2}, "eval.sample_prompts is empty"),
                                  ({"sample_every": 2, "sample_prompts": ["x"]}, "ships no text tokenizer"),
                                  ({"sample_every": 2, "sample_temperature": 0}, "eval.sample_temperature")):
        config = run_config(tmp_path, token_dataset, "bad", "gpt", {}, steps=2, eval=eval_section)
        result = subprocess.run([sys.executable, "-m", "trainer", str(config)], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_diffusion_model_samples_reconstructions_and_generations(tmp_path, text_dataset):
    """TokCom stage 2 (a random VAE and denoiser): each prompt reconstructed, as many sequences generated from noise."""
    from safetensors.torch import save_file

    from core.config import TrainConfig
    from core.schema import from_dict
    from modeling.registry import build_model
    from trainer.samples import TrainingSampler

    args = {"sequence_len": 64, "vocab_size": 512}
    vae = build_model("tokcom_vae", "debug", args, device=torch.device("cpu"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    model = build_model("tokcom_diffusion", "debug", {**args, "vae_checkpoint": str(tmp_path / "vae.safetensors")}, device=torch.device("cpu"))
    prompts = ["import os\n", "def f"]
    cfg = from_dict(TrainConfig, {"run": {"max_steps": 4}, "model": {"name": "tokcom_diffusion"}, "data": {"dataset": text_dataset},
                                  "eval": {"sample_every": 2, "sample_prompts": prompts, "sample_num_steps": 3}})
    sampler = TrainingSampler(model.train(), cfg, tmp_path, f"{text_dataset}/tokenizer", None, torch.device("cpu"), True)
    lines = sampler.sample(2)
    assert [(line["kind"], line["prompt"]) for line in lines] == \
        [("reconstruction", prompts[0]), ("reconstruction", prompts[1]), ("generation", ""), ("generation", "")]
    assert all(0 <= line["accuracy"] <= 1 for line in lines[:2]) and model.training  # left in training mode
    assert [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == lines
    assert sampler.sample(2) == lines  # seeded by the step: the same samples again
