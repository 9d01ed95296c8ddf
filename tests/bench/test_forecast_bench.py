"""Benchmark: forecasting on token grids: KV-cached generation, and the forecaster's training step.

1. Generation after a 1,024-token context, 64 new tokens, greedy, fp32: the KV-cached path against
   recomputing the whole window at every step (`use_cache=False`, the reference each model keeps),
   on the real generation paths: `GPT.generate`, the forecaster's `SeriesLayout.forecast` (the
   (B C, T) series of a channels x time grid, as `tokfleet forecast` runs gpt), and
   `FlatGPT.forecast` (a (68, 4, 4) code grid: 64 timesteps of context, 4 forecast). Rounds
   alternate the order (cached first, then recompute first) so machine noise hits both alike; the
   median of the per-round ratios is the speedup. Greedy outputs of both paths must be identical.
2. The forecaster's training step: `gpt` trained by `trainer.loop.Trainer` on MEG-like codes
   (a meg_tokens dataset of (channel, time) grids), so each step reads the shards, collates, goes
   through `GridTask` (canonical grid -> (B C, T) series -> next-step pairs), logs metrics.jsonl
   every 10 steps; against a bare loop over the same model, the same tensors (the batches the
   trainer's own loader gives), the same AdamW, schedule and clipping. The two run in lockstep,
   one step each in turn (the host's load here swings 10-20% over seconds, more than the few per
   cent measured, so runs back to back did not cancel it); each round is a fresh Trainer and bare
   model, rounds alternate which steps first, the first steps of each are not timed, and the
   median of the per-round throughput ratios is the trainer's efficiency. Both reach the same losses.

One torch thread throughout: the machine's 2 cores are shared with other jobs, and a second
OpenMP thread that loses its core stalls every op (a training step ran 20x slower so here, under load).

Numbers: tests/bench/results/forecast.json, and the tables printed at the end.

    make bench   (or: python -m core.netns -- python -m pytest -s tests/bench/test_forecast_bench.py)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
import torch

from lockstep import BareLoop, run_round
from test_distributed_bench import format_table

RESULTS = Path(__file__).parent / "results"
NUM_THREADS = 1

CONTEXT_LEN = 1024
NUM_NEW_TOKENS = 64
GENERATION_ROUNDS = 4
VOCAB_SIZE = 512  # a code book's size, e.g. TOTEM's
# gpt small's shape (4 layers, width 256) with a window that holds the context and the new tokens
GPT_ARGS = {"n_layer": 4, "n_head": 4, "n_kv_head": 4, "n_embd": 256, "vocab_size": VOCAB_SIZE,
            "sequence_len": CONTEXT_LEN + 128}
LAYOUT_CHANNELS = 2  # series of the grid the forecaster path runs: B C rows of generation
LAYOUT_ROUNDS = 2  # recomputing 2 rows costs ~20 s a round
FLATGPT_GRID = [68, 4, 4]  # (T, H, W) codes: 1,088 positions, 16 a timestep = 64 context + 4 new timesteps

TRAIN_STEPS = 50
TRAIN_WARMUP_STEPS = 5  # not timed: the first steps allocate AdamW's state and the allocator's pools
TRAIN_ROUNDS = 6
GRID_SHAPE = (4, 129)  # (channel, time) codes of a window: 4 series of 128 inputs
TRAIN_BATCH = 2  # windows per step: 8 series, 1,024 positions
TRAIN_MODEL_ARGS = {"n_layer": 4, "n_head": 4, "n_kv_head": 4, "n_embd": 128}
TOTEM = {"model": "totem", "flavor": "debug", "args": {}, "checkpoint": "", "sha256": "1" * 64}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def summary():
    found: dict[str, dict] = {}
    yield found
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "forecast.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}  # keep the other benchmark's part under -k
    path.write_text(json.dumps({**saved, **{name: part["data"] for name, part in found.items()}}, indent=1))
    print("\n\n" + "\n\n".join(part["table"] for part in found.values()))
    print(f"\n(written to {path})")


# ------------------------------------------------------------------------------ 1. generation


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every matrix drawn at unit-scale activations: the init's zero output projections and HF's
    std 0.02 make greedy decoding repeat one token, which would make the equality check empty."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, param.size(-1) ** -0.5)
    return model.eval()


def time_generation(generate, num_rounds: int) -> dict:
    """generate(use_cache) -> the generated tokens; paired rounds in alternating order."""
    generate(True)  # warm-up: allocator, kernels
    seconds: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, torch.Tensor] = {}
    for round_index in range(num_rounds):
        for use_cache in (True, False) if round_index % 2 == 0 else (False, True):
            start = time.perf_counter()
            tokens = generate(use_cache)
            seconds[use_cache].append(time.perf_counter() - start)
            assert use_cache not in outputs or torch.equal(outputs[use_cache], tokens), "greedy generation is not repeatable"
            outputs[use_cache] = tokens
    return {"cached_s": seconds[True], "recompute_s": seconds[False],
            "paired_ratios": [r / c for c, r in zip(seconds[True], seconds[False])],
            "is_identical": torch.equal(outputs[True], outputs[False]), "tokens": outputs[True]}


def test_kv_cached_generation_vs_recompute(summary):
    from modeling.registry import build_model
    from trainer.token_tasks import SeriesLayout

    torch.manual_seed(0)
    gpt = randomized(build_model("gpt", "small", GPT_ARGS))
    flatgpt = randomized(build_model("FlatGPT", "debug", {"input_shape": FLATGPT_GRID, "vocab_size": VOCAB_SIZE}))
    assert flatgpt.max_positions == CONTEXT_LEN + NUM_NEW_TOKENS and flatgpt.positions_per_step == 16
    layout = SeriesLayout(gpt)
    prompt = torch.randint(0, VOCAB_SIZE, (1, CONTEXT_LEN))  # (B, T)
    grid = torch.randint(0, VOCAB_SIZE, (1, CONTEXT_LEN, LAYOUT_CHANNELS, 1, 1))  # canonical (B, T, H, W, Q)

    def through_layout(use_cache: bool) -> torch.Tensor:
        extended = layout.forecast(gpt, layout.to_sequence(grid), NUM_NEW_TOKENS, temperature=0.0, use_cache=use_cache)
        return layout.to_grid(extended, like=grid)[:, CONTEXT_LEN:]  # (B, new, H, W, Q)

    cases = {  # name -> (generate(use_cache) -> new tokens, rows generated, rounds, model)
        "gpt GPT.generate": (lambda use_cache: gpt.generate(prompt, NUM_NEW_TOKENS, temperature=0.0, use_cache=use_cache)[:, CONTEXT_LEN:],
                             1, GENERATION_ROUNDS, f"gpt {GPT_ARGS}"),
        f"gpt SeriesLayout.forecast, {LAYOUT_CHANNELS} channels": (through_layout, LAYOUT_CHANNELS, LAYOUT_ROUNDS, f"gpt {GPT_ARGS}"),
        "FlatGPT debug .forecast": (lambda use_cache: flatgpt.forecast(prompt, NUM_NEW_TOKENS // 16, temperature=0.0,
                                                                        use_cache=use_cache)[:, CONTEXT_LEN:],
                                    1, GENERATION_ROUNDS, f"FlatGPT debug, input_shape {FLATGPT_GRID}, vocab {VOCAB_SIZE}"),
    }
    data, rows = {}, []
    for name, (generate, num_rows, num_rounds, model) in cases.items():
        timed = time_generation(generate, num_rounds)
        tokens = timed.pop("tokens")
        assert tokens.numel() == num_rows * NUM_NEW_TOKENS, tokens.shape
        new_tokens = num_rows * NUM_NEW_TOKENS
        cached_s, recompute_s = statistics.median(timed["cached_s"]), statistics.median(timed["recompute_s"])
        result = {**timed, "model": model, "rows": num_rows, "context": CONTEXT_LEN, "new_tokens_per_row": NUM_NEW_TOKENS,
                  "rounds": num_rounds, "speedup": statistics.median(timed["paired_ratios"]),
                  "cached_tokens_per_s": new_tokens / cached_s, "recompute_tokens_per_s": new_tokens / recompute_s,
                  "distinct_new_tokens": len(set(tokens.flatten().tolist()))}
        data[name] = result
        rows.append([name, num_rows, num_rounds, cached_s, recompute_s, result["cached_tokens_per_s"],
                     result["recompute_tokens_per_s"], " ".join(f"{r:.1f}" for r in result["paired_ratios"]),
                     f"{result['speedup']:.1f}x", result["is_identical"], result["distinct_new_tokens"]])
    title = (f"KV-cached generation vs recomputing the window every step: {CONTEXT_LEN}-token context, {NUM_NEW_TOKENS} new "
             f"tokens a row, greedy, fp32, {NUM_THREADS} torch thread (goal >= 5x)")
    table = format_table(["path", "rows", "rounds", "cached s", "recompute s", "cached tok/s", "recompute tok/s",
                          "paired ratios", "speedup", "identical", "distinct"], rows)
    summary["generation"] = {"table": title + "\n" + table, "data": data}
    for name, result in data.items():
        assert result["is_identical"], f"{name}: cached and recomputed greedy generations differ"
        assert result["distinct_new_tokens"] > 4, f"{name}: degenerate generation, the equality check says little"
        assert result["speedup"] >= 5.0, f"{name}: KV cache speedup {result['speedup']:.2f}x < 5x"


# ------------------------------------------------------------------------------ 2. training step


@pytest.fixture(scope="module")
def grid_dataset(tmp_path_factory) -> str:
    from conftest import write_grid_dataset

    # enough windows that no timed run reaches the end of an epoch
    return write_grid_dataset(tmp_path_factory.mktemp("datasets") / "meg-codes", axes=("channel", "time"), shape=GRID_SHAPE,
                              vocab_size=VOCAB_SIZE, tokenizer=TOTEM, num_train=2 * TRAIN_STEPS * TRAIN_BATCH, num_val=0)


def trainer_config(dataset: str, run_dir: Path):
    from core.config import (CheckpointConfig, DataConfig, EngineConfig, EvalConfig, LoggingConfig, ModelConfig,
                               OptimConfig, RunConfig, TrainConfig)

    return TrainConfig(
        data=DataConfig(dataset=dataset, val_split=""),  # the bare loop validates nothing either
        run=RunConfig(name="bench", output_dir=str(run_dir), max_steps=TRAIN_STEPS, device="cpu", seed=0),
        model=ModelConfig(name="gpt", flavor="small", args=dict(TRAIN_MODEL_ARGS)),
        optim=OptimConfig(micro_batch_size=TRAIN_BATCH, warmup_steps=5),
        engine=EngineConfig(peak_flops=1e11),  # not measured: MFU is not what this compares
        checkpoint=CheckpointConfig(every_steps=0, save_final=False),
        logging=LoggingConfig(every_steps=10, progress=False, wandb=False),
        eval=EvalConfig(every_steps=0),
    )


def test_forecaster_training_step_vs_bare_loop(grid_dataset, tmp_path, summary):
    from trainer.loop import Trainer

    cfg = trainer_config(grid_dataset, tmp_path / "probe")
    probe = Trainer(cfg)
    # the batches a fresh trainer of this seed trains on, in its order, as GridTask makes them
    batches = [probe.to_batch(probe.train_batches.next_batch(step + 1), probe.device) for step in range(TRAIN_STEPS)]
    model_args, num_params = probe.model_args, probe.num_params
    del probe
    idx = batches[0]["idx"]
    assert idx.shape == (TRAIN_BATCH * GRID_SHAPE[0], GRID_SHAPE[1] - 1), idx.shape  # (B C, T)
    positions_per_step = idx.numel()

    warm_up = BareLoop(cfg, model_args, batches, TRAIN_STEPS)  # allocator, kernels
    for _ in range(TRAIN_WARMUP_STEPS):
        warm_up.step()
    del warm_up
    # rounds alternate which of the pair steps first
    rounds = [run_round(trainer_config(grid_dataset, tmp_path / f"run-{index}"), BareLoop(cfg, model_args, batches, TRAIN_STEPS),
                        is_trainer_first=index % 2 == 0, num_steps=TRAIN_STEPS, warmup_steps=TRAIN_WARMUP_STEPS)
              for index in range(TRAIN_ROUNDS)]

    paired_ratios = [r["ratio"] for r in rounds]  # trainer throughput / bare throughput, per round
    ratio = statistics.median(paired_ratios)
    step_ratio = statistics.median(x for r in rounds for x in r["step_ratios"])
    trainer_step = statistics.median(r["trainer_step_s"] for r in rounds)
    bare_step = statistics.median(r["bare_step_s"] for r in rounds)
    data_s, layout_s = statistics.median(r["data_s"] for r in rounds), statistics.median(r["layout_s"] for r in rounds)
    compute_s = statistics.median(r["compute_s"] for r in rounds)
    rest_s = statistics.median(r["trainer_step_s"] - r["data_s"] - r["layout_s"] - r["compute_s"] for r in rounds)
    result = {
        "model": f"gpt {model_args['n_layer']} layers x {model_args['n_embd']}, vocab {model_args['vocab_size']}, "
                 f"{num_params:,} params, fp32 CPU, {NUM_THREADS} torch thread",
        "data": f"meg_tokens (channel, time) {GRID_SHAPE} uint16 codes, micro-batch {TRAIN_BATCH} windows -> "
                f"{tuple(idx.shape)} series",
        "steps_per_run": TRAIN_STEPS, "timed_steps_per_run": TRAIN_STEPS - TRAIN_WARMUP_STEPS, "rounds": TRAIN_ROUNDS,
        "trainer_step_s": [r["trainer_step_s"] for r in rounds], "bare_step_s": [r["bare_step_s"] for r in rounds],
        "paired_ratios": paired_ratios, "ratio": ratio, "median_step_pair_ratio": step_ratio,
        "trainer_tokens_per_s": positions_per_step / trainer_step, "bare_tokens_per_s": positions_per_step / bare_step,
        "trainer_data_s_per_step": data_s, "trainer_layout_s_per_step": layout_s, "trainer_compute_s_per_step": compute_s,
        "trainer_rest_s_per_step": rest_s,
        "trainer_losses": rounds[0]["trainer_losses"], "bare_losses": rounds[0]["bare_losses"],
    }
    title = (f"forecaster training step: Trainer (shards -> collate -> GridTask) vs a bare loop, {result['model']}, "
             f"{result['data']}, {TRAIN_STEPS - TRAIN_WARMUP_STEPS} timed step pairs in lockstep x {TRAIN_ROUNDS} rounds "
             "(goal >= 0.97x)")
    rows = [["trainer", 1000 * trainer_step, positions_per_step / trainer_step, 1000 * data_s, 1000 * layout_s,
             1000 * compute_s, 1000 * rest_s, " ".join(f"{1000 * r['trainer_step_s']:.1f}" for r in rounds)],
            ["bare loop", 1000 * bare_step, positions_per_step / bare_step, "-", "-", "-", "-",
             " ".join(f"{1000 * r['bare_step_s']:.1f}" for r in rounds)],
            ["trainer / bare", "", f"{ratio:.3f}x", "", "", "", "",
             " ".join(f"{r:.3f}" for r in paired_ratios) + f"; step pairs' median {step_ratio:.3f}"]]
    table = format_table(["", "ms/step", "tokens/s", "data ms", "layout ms", "fwd+bwd+opt ms", "rest ms", "per round"], rows)
    summary["training"] = {"table": title + "\n" + table, "data": result}
    # the same computation: every round's logged losses are its bare loop's
    for r in rounds:
        for step, loss in r["trainer_losses"].items():
            assert loss == pytest.approx(r["bare_losses"][step], rel=1e-4), (step, loss, r["bare_losses"][step])
    assert ratio >= 0.97, f"trainer reaches {ratio:.3f}x of the bare loop's throughput (goal >= 0.97x)"
