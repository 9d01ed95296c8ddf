"""Benchmark: engine.compile (trainer/compile.py: each block compiled in place) on this CPU.

1. Compiled vs eager training throughput of the same model, the same batch, the same AdamW: `gpt`
   small, `tokcom_vae` small, `FlatGPT` debug and `totem` small, one process, one torch thread, fp32.
   The first compiled steps (tracing + Inductor's C++ build) are timed apart as the compile time;
   then eager and compiled run one step each in turn (odd pairs compiled first): the host's load
   swings over seconds, steps a second apart see the same; the median of the pairs' ratios is the
   speedup (goal >= 1.2x for the GPT).
2. `tokfleet train`'s Trainer with engine.compile: true against a minimal bare loop of the same
   shape whose blocks torch compiles itself (`block.compile()`): gpt small on token shards, in
   lockstep, one step each in turn (as the forecast bench: the load here swings more than the few
   per cent measured); the median of the per-round throughput ratios (goal >= 0.97x).
3. Every family's debug flavor (gpt with MoE and gradient checkpointing, TokCom, FlatGPT's HF
   layers, the tokenizers' conv stacks, the brain-gen zoo, the TransformerForecaster): two SGD
   steps eager and compiled reach the same losses (a check more than a benchmark, and ~10 minutes
   of compiling on 2 cores, so it lives here rather than in the suite).
4. The engines: 2 compiled ranks under ZeRO-3, FSDP and DDP reach the losses of 1 eager rank with
   their global batch, and the MoE GPT with its experts split over 2 ranks those of its eager run.

Numbers: tests/bench/results/compile.json, and the tables printed at the end.

    make bench   (or: python -m core.netns -- python -m pytest -s tests/bench/test_compile_bench.py)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from core.config import EngineConfig
from modeling.registry import build_model
from lockstep import BareLoop, run_round
from test_distributed_bench import format_table
from trainer.compile import compile_model

RESULTS = Path(__file__).parent / "results"
NUM_THREADS = 1
SEQ_LEN = 256
VOCAB = 8192
BATCH = 8
COMPILE_STEPS = 3  # the first compiled steps: compile, then the allocator settles
STEP_PAIRS = 16
TRAIN_STEPS = 30
TRAIN_WARMUP_STEPS = 5
TRAIN_ROUNDS = 3


def token_batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    return {"idx": ids[:, :-1], "targets": ids[:, 1:]}


def tokcom_batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {"input_ids": token_batch(model)["idx"]}


def signal_batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: torch.randn(value.shape) for name, value in model.example_inputs(BATCH, "meta").items()}


# name -> (model, flavor, args, batch maker, what a "token" of its tokens/s is)
MODELS: dict[str, tuple[str, str, dict, Callable, str]] = {
    "gpt small": ("gpt", "small", {"vocab_size": VOCAB, "sequence_len": SEQ_LEN}, token_batch, "token"),
    "tokcom_vae small": ("tokcom_vae", "small", {"vocab_size": VOCAB, "sequence_len": SEQ_LEN}, tokcom_batch, "token"),
    "FlatGPT debug": ("FlatGPT", "debug", {"vocab_size": VOCAB, "sequence_len": SEQ_LEN}, token_batch, "token"),
    "totem small": ("totem", "small", {}, signal_batch, "signal sample"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def summary():
    found: dict[str, dict] = {}
    yield found
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compile.json").write_text(json.dumps({name: part["data"] for name, part in found.items()}, indent=1))
    print("\n\n" + "\n\n".join(part["table"] for part in found.values()))
    print(f"\n(written to {RESULTS / 'compile.json'})")


class TrainingSteps:
    """A model with AdamW training on one fixed batch; `run(n)` returns seconds per step."""

    def __init__(self, name: str, flavor: str, args: dict, make_batch: Callable, is_compiled: bool):
        torch.manual_seed(0)
        self.model = build_model(name, flavor, args)
        compile_model(self.model, EngineConfig(compile=is_compiled), torch.device("cpu"))
        self.model.train()
        self.batch = make_batch(self.model)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.losses: list[float] = []

    def run(self, num_steps: int) -> float:
        start = time.perf_counter()
        for _ in range(num_steps):
            loss = self.model(**self.batch)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss.item())
        return (time.perf_counter() - start) / num_steps


def positions_per_step(batch: dict[str, torch.Tensor]) -> int:
    first = next(iter(batch.values()))
    return first.numel()


def test_compiled_vs_eager_throughput(summary):
    rows, data = [], {}
    for label, (name, flavor, args, make_batch, unit) in MODELS.items():
        eager = TrainingSteps(name, flavor, args, make_batch, is_compiled=False)
        compiled = TrainingSteps(name, flavor, args, make_batch, is_compiled=True)
        compile_s = compiled.run(1)
        compiled.run(COMPILE_STEPS - 1)
        eager.run(COMPILE_STEPS)
        eager_s, compiled_s = [], []
        for index in range(STEP_PAIRS):
            pair = (eager, compiled) if index % 2 == 0 else (compiled, eager)
            times = {id(steps): steps.run(1) for steps in pair}
            eager_s.append(times[id(eager)])
            compiled_s.append(times[id(compiled)])
        ratios = [e / c for e, c in zip(eager_s, compiled_s)]
        positions = positions_per_step(eager.batch)
        d = {"eager_tokens_per_s": positions / statistics.median(eager_s),
             "compiled_tokens_per_s": positions / statistics.median(compiled_s),
             "speedup": statistics.median(ratios), "first_compiled_step_s": compile_s,
             "step_pair_ratios": ratios, "unit": unit, "positions_per_step": positions, "num_params": sum(p.numel() for p in eager.model.parameters()),
             "max_loss_difference": max(abs(a - b) for a, b in zip(eager.losses[:COMPILE_STEPS], compiled.losses[:COMPILE_STEPS]))}
        data[label] = d
        rows.append([label, f"{d['num_params'] / 1e6:.2f}M", unit, d["eager_tokens_per_s"], d["compiled_tokens_per_s"],
                     f"{d['speedup']:.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}", d["first_compiled_step_s"]])
        # the same training: compiled kernels reorder float sums, nothing more
        assert d["max_loss_difference"] < 1e-3 * max(1.0, abs(eager.losses[0])), (label, eager.losses, compiled.losses)
        del eager, compiled
    title = (f"engine.compile: compiled vs eager training steps/s, one process, {NUM_THREADS} torch thread, fp32 CPU, batch "
             f"{BATCH} (sequences of {SEQ_LEN} tokens; totem: windows); median of {STEP_PAIRS} step pairs, one step each in turn "
             "(goal >= 1.2x for the GPT)")
    table = format_table(["model", "params", "unit", "eager /s", "compiled /s", "speedup", "pair ratios", "first step s"], rows)
    summary["throughput"] = {"table": title + "\n" + table, "data": data}
    assert data["gpt small"]["speedup"] > 1.0, data["gpt small"]


# ------------------------------------------------------ 2. the trainer vs a bare loop, both compiled


@pytest.fixture(scope="module")
def token_shards(tmp_path_factory) -> str:
    from conftest import write_token_dataset

    # enough sequences that no timed run reaches the end of an epoch
    return write_token_dataset(tmp_path_factory.mktemp("datasets") / "tokens", num_shards=4,
                               samples_per_shard=TRAIN_STEPS * BATCH // 2, val_samples=1, seq_len=SEQ_LEN, vocab_size=VOCAB)


def trainer_config(dataset: str, run_dir: Path):
    from core.config import (CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, ModelConfig, OptimConfig, RunConfig,
                               TrainConfig)

    return TrainConfig(
        data=DataConfig(dataset=dataset, num_streams=4, val_split=""),  # the bare loop validates nothing either
        run=RunConfig(name="bench", output_dir=str(run_dir), max_steps=TRAIN_STEPS, device="cpu", seed=0),
        model=ModelConfig(name="gpt", flavor="small"),
        optim=OptimConfig(micro_batch_size=BATCH, warmup_steps=5),
        engine=EngineConfig(peak_flops=1e11, compile=True),  # peak not measured: MFU is not what this compares
        checkpoint=CheckpointConfig(every_steps=0, save_final=False),
        logging=LoggingConfig(every_steps=10, progress=False, wandb=False),
        eval=EvalConfig(every_steps=0),
    )


def test_compiled_trainer_vs_bare_loop(token_shards, tmp_path, summary):
    from trainer.loop import Trainer

    cfg = trainer_config(token_shards, tmp_path / "probe")
    probe = Trainer(cfg)
    batches = [probe.to_batch(probe.train_batches.next_batch(step + 1), probe.device) for step in range(TRAIN_STEPS)]
    model_args = probe.model_args
    del probe
    rounds = [run_round(trainer_config(token_shards, tmp_path / f"run-{index}"),
                        BareLoop(cfg, model_args, batches, TRAIN_STEPS, compile_blocks=True),
                        is_trainer_first=index % 2 == 0, num_steps=TRAIN_STEPS, warmup_steps=TRAIN_WARMUP_STEPS)
              for index in range(TRAIN_ROUNDS)]
    ratios = [r["ratio"] for r in rounds]
    tokens_per_step = BATCH * SEQ_LEN
    trainer_step = statistics.median(r["trainer_step_s"] for r in rounds)
    bare_step = statistics.median(r["bare_step_s"] for r in rounds)
    result = {"model": f"gpt small {model_args['n_layer']} x {model_args['n_embd']}, vocab {VOCAB}, seq {SEQ_LEN}, batch {BATCH}, "
                       f"fp32 CPU, {NUM_THREADS} torch thread, blocks compiled",
              "rounds": TRAIN_ROUNDS, "timed_steps_per_round": TRAIN_STEPS - TRAIN_WARMUP_STEPS, "paired_ratios": ratios,
              "ratio": statistics.median(ratios), "trainer_tokens_per_s": tokens_per_step / trainer_step,
              "bare_tokens_per_s": tokens_per_step / bare_step}
    title = (f"`tokfleet train` (engine.compile: true) vs a minimal bare loop (block.compile()), {result['model']}; "
             f"{TRAIN_STEPS - TRAIN_WARMUP_STEPS} timed step pairs in lockstep x {TRAIN_ROUNDS} rounds (goal >= 0.97x)")
    table = format_table(["", "tokens/s", "per round"],
                         [["trainer", result["trainer_tokens_per_s"], " ".join(f"{1000 * r['trainer_step_s']:.0f} ms" for r in rounds)],
                          ["bare loop", result["bare_tokens_per_s"], " ".join(f"{1000 * r['bare_step_s']:.0f} ms" for r in rounds)],
                          ["trainer / bare", f"{result['ratio']:.3f}x", " ".join(f"{r:.3f}" for r in ratios)]])
    summary["trainer"] = {"table": title + "\n" + table, "data": result}
    for r in rounds:  # the same computation
        for step, loss in r["trainer_losses"].items():
            assert loss == pytest.approx(r["bare_losses"][step], rel=1e-4), (step, loss, r["bare_losses"][step])
    assert result["ratio"] >= 0.9, result  # goal 0.97x; the bound catches gross regressions on a noisy shared machine


# ------------------------------------------------- 3. every family compiles to eager's losses


def family_batch(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Two samples of what `name`'s forward trains on (a debug flavor's shapes)."""
    generator = torch.Generator().manual_seed(3)
    if hasattr(model, "example_inputs"):  # tokenizers, signal models, classifiers
        batch = {key: torch.randn(value.shape, generator=generator) if value.is_floating_point()
                 else torch.randint(0, 3, value.shape, generator=generator)
                 for key, value in model.example_inputs(2, "meta").items()}
        return {**batch, "label": torch.zeros(2, dtype=torch.long)} if name.startswith("Classifier") else batch
    if hasattr(model, "example_idx"):  # the brain-gen token models
        ids = torch.randint(0, 8, model.example_idx("meta").shape, generator=generator)
        return {"idx": ids, "targets": ids}
    if name.startswith("tokcom"):
        return {"input_ids": torch.randint(0, 64, (2, 32), generator=generator)}
    if name == "TransformerForecaster":
        config = model.config
        return {"context": torch.randn(2, config.context_length, config.input_size, generator=generator),
                "target": torch.randn(2, config.pred_length, config.output_size, generator=generator)}
    ids = torch.randint(0, 32, (2, 17), generator=generator)  # gpt, FlatGPT
    return {"idx": ids[:, :-1], "targets": ids[:, 1:]}


FAMILIES = {  # one model of each family, debug flavor; gpt with MoE and gradient checkpointing
    "gpt MoE + checkpointing": ("gpt", {"moe_num_experts": 4, "use_gradient_checkpointing": True}),
    "tokcom_vae": ("tokcom_vae", {}), "tokcom_diffusion": ("tokcom_diffusion", {"vae_checkpoint": None}),
    "FlatGPT": ("FlatGPT", {}), "totem": ("totem", {}), "BrainOmniCausalTokenizer": ("BrainOmniCausalTokenizer", {}),
    "Vidtok": ("Vidtok", {}), "STGPT2MEG": ("STGPT2MEG", {}), "Wavenet3D": ("Wavenet3D", {}), "TASA3D": ("TASA3D", {}),
    "BENDRForecast": ("BENDRForecast", {}), "NTD": ("NTD", {}), "MEGFactorizedAutoencoder": ("MEGFactorizedAutoencoder", {}),
    "ClassifierContinuous": ("ClassifierContinuous", {}), "TransformerForecaster": ("TransformerForecaster", {}),
}


def two_sgd_steps(name: str, args: dict, is_compiled: bool) -> list[float]:
    torch.manual_seed(0)
    model = build_model(name, "debug", args)
    compile_model(model, EngineConfig(compile=is_compiled), torch.device("cpu"))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        torch.manual_seed(1)  # the same dropout / noise draws
        loss = model(**family_batch(name, model))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_every_family_compiles_to_eager_losses(summary):
    rows, data = [], {}
    for label, (name, args) in FAMILIES.items():
        start = time.perf_counter()
        eager, compiled = two_sgd_steps(name, args, False), two_sgd_steps(name, args, True)
        difference = max(abs(e - c) for e, c in zip(eager, compiled))
        data[label] = {"eager": eager, "compiled": compiled, "max_difference": difference, "seconds": time.perf_counter() - start}
        rows.append([label, " ".join(f"{loss:.6f}" for loss in eager), f"{difference:.1e}", data[label]["seconds"]])
    title = "engine.compile: 2 SGD steps of each family's debug flavor, eager vs compiled blocks (fp32 CPU)"
    summary["families"] = {"table": title + "\n" + format_table(["model", "eager losses", "max |compiled - eager|", "s"], rows),
                           "data": data}
    assert all(d["max_difference"] < 1e-5 for d in data.values()), data


# ------------------------------------ 4. the engines: 2 compiled ranks train as 1 eager rank


ENGINES = {  # name -> (launcher, engine config); ZeRO-2 is in the suite (tests/test_compile.py)
    "ZeRO-3": ("torchrun", {"kind": "deepspeed", "zero_stage": 3}),
    "FSDP (Accelerate)": ("accelerate:fsdp.yaml", {"kind": "accelerate"}),
    "DDP (Accelerate)": ("accelerate", {"kind": "accelerate", "strategy": "ddp"}),
}
MOE_ARGS = {"moe_num_experts": 4, "moe_top_k": 2, "moe_capacity_factor": 1.0}


def test_engines_train_compiled_as_eager(tmp_path, summary):
    """gpt debug, 3 steps: 2 compiled ranks x 4 against 1 eager rank x 8 (the same samples per step);
    the MoE GPT with its experts split over the 2 ranks (ZeRO-2, all-to-all dispatch) compiled
    against the same run eager."""
    from conftest import write_token_dataset
    from test_distributed import losses, run, write_config

    dataset = write_token_dataset(tmp_path / "tokens")
    no_validation = {"val_split": ""}

    def train(name: str, launcher: str, ranks: int, engine: dict, **sections) -> list[float]:
        config = write_config(tmp_path, dataset, name, engine, micro=8 // ranks, steps=3, data=no_validation, **sections)
        run(launcher, ranks, config)
        return list(losses(tmp_path / name).values())

    reference = train("eager", "python", 1, {})
    rows, data = [], {}
    for name, (launcher, engine) in ENGINES.items():
        compiled = train(name.split()[0], launcher, 2, {**engine, "compile": True})
        data[name] = {"eager_one_rank": reference, "compiled_two_ranks": compiled}
        rows.append([name, " ".join(f"{loss:.6f}" for loss in compiled), f"{max(abs(a - b) for a, b in zip(reference, compiled)):.1e}"])
    moe = {"name": "gpt", "flavor": "debug", "args": MOE_ARGS}
    expert_parallel = {"kind": "deepspeed", "zero_stage": 2, "expert_parallel_size": 2}
    moe_eager = train("moe-eager", "torchrun", 2, expert_parallel, model=moe)
    moe_compiled = train("moe-compiled", "torchrun", 2, {**expert_parallel, "compile": True}, model=moe)
    data["MoE, expert parallel 2"] = {"eager_two_ranks": moe_eager, "compiled_two_ranks": moe_compiled}
    rows.append(["MoE, experts split over 2 ranks (vs the same eager)", " ".join(f"{loss:.6f}" for loss in moe_compiled),
                 f"{max(abs(a - b) for a, b in zip(moe_eager, moe_compiled)):.1e}"])
    title = f"engine.compile under the engines: 2 compiled ranks vs eager (1 rank x 8: {' '.join(f'{x:.6f}' for x in reference)})"
    summary["engines"] = {"table": title + "\n" + format_table(["engine", "compiled losses", "max |difference|"], rows), "data": data}
    for name, d in data.items():
        baseline = d.get("eager_one_rank") or d["eager_two_ranks"]
        assert d["compiled_two_ranks"] == pytest.approx(baseline, rel=1e-4), (name, d)
