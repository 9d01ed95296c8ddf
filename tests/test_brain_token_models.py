"""brain-gen's token-grid sequence models (modeling/brain: STGPT2MEG, TASA3D, Wavenet3D,
WavenetFullChannel): the shapes the seed states, a short overfit, causal gradients, incremental
decoding == the full forward, the loss choices, FLOPs counted from the layers, training / eval /
forecasting on token grids, and 2-rank ZeRO-2 training that resumes with identical losses."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import write_grid_dataset
from core.errors import UserError
from modeling.registry import build_model

V = 32  # the debug flavors' vocabulary
SHAPES = {  # model -> debug idx shape (time last)
    "STGPT2MEG": (2, 4, 12),
    "WavenetFullChannel": (2, 4, 12),
    "Wavenet3D": (2, 3, 2, 12),
    "TASA3D": (2, 4, 4, 12),
}
EMBEDDINGS = {"STGPT2MEG": "token_embedding", "WavenetFullChannel": "embedding", "Wavenet3D": "embedding",
              "TASA3D": "token_embedding"}
TOTEM = {"model": "totem", "flavor": "debug", "args": {}, "checkpoint": "", "sha256": "1" * 64}
VIDTOK = {"model": "Vidtok", "flavor": "debug", "args": {}, "checkpoint": "", "sha256": "2" * 64}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (more only contend on a shared CPU, ~20x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built(name: str, std: float | None = None, **args) -> torch.nn.Module:
    """The debug model; with std, every parameter redrawn at that scale (no zero-initialised outputs)."""
    torch.manual_seed(0)
    model = build_model(name, "debug", args)
    if std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, std)
    return model


def ids(name: str, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, SHAPES[name], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SHAPES)
def test_forward_shapes_and_uniform_start(name):
    model = built(name)
    idx = ids(name)
    assert model(idx).shape == (*SHAPES[name], V)  # (B, C, T, V) or (B, H, W, T, V)
    loss = model(idx[..., :-1], idx[..., 1:])
    assert loss.item() == pytest.approx(math.log(V), abs=1e-5)  # zero head: uniform first prediction
    assert model.last_report["cross_entropy"].value.item() == pytest.approx(loss.item())


@pytest.mark.parametrize("name", SHAPES)
def test_short_overfit_lowers_the_loss(name):
    model = built(name)
    idx = ids(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(idx[..., :-1], idx[..., 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # one batch of random codes, memorised


@pytest.mark.parametrize("name, args", [*((name, {}) for name in SHAPES), ("STGPT2MEG", {"block_type": "parallel"})])
def test_gradients_are_causal(name, args):
    """The logits at time t get gradient from the embedded inputs at times <= t only."""
    model = built(name, std=0.2, **args)
    embedded = {}

    def keep(module, inputs, output):
        output.retain_grad()
        embedded["x"] = output

    getattr(model, EMBEDDINGS[name]).register_forward_hook(keep)
    idx = ids(name)
    t = 5
    model(idx)[..., t, :].sum().backward()
    grad = embedded["x"].grad.abs().movedim(-2, 0)  # (T, ...): the embedding's time axis first
    grad = grad.reshape(grad.size(0), -1).sum(dim=1)
    assert torch.all(grad[t + 1:] == 0) and torch.all(grad[: t + 1] > 0), grad


@pytest.mark.parametrize("name, args", [("STGPT2MEG", {}), ("STGPT2MEG", {"block_type": "parallel"}),
                                        ("WavenetFullChannel", {}), ("Wavenet3D", {})])
def test_incremental_decoding_equals_the_full_forward(name, args):
    """A context prefilled (longer than the WaveNets' receptive field of 8), then one step at a time
    on the KV cache / conv queues: the logits of the full forward at every step."""
    model = built(name, std=0.3, **args).eval()
    idx = torch.randint(0, V, (*SHAPES[name][:-1], 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        state, logits = model.start_decoding(idx[..., :10])
        torch.testing.assert_close(logits, full[..., 9, :])
        for t in range(10, 30):
            state, logits = model.decode_step(state, idx[..., t:t + 1])
            torch.testing.assert_close(logits, full[..., t, :], rtol=1e-5, atol=1e-5)
    # greedy forecasting on the cache / queues == re-running the whole window for each new step
    # (STGPT2MEG: past its 32 steps the window restarts from the last 16)
    context, forecast = idx[:1, ..., :20], model.forecast(idx[:1, ..., :20], 16, temperature=0)
    window, start, expected = model.max_context_steps() or 10**9, 0, context
    with torch.no_grad():
        for _ in range(16):
            if expected.size(-1) - start > window:
                start = expected.size(-1) - window // 2
            step = model(expected[..., start:])[..., -1, :].argmax(-1, keepdim=True)
            expected = torch.cat([expected, step], dim=-1)
    assert forecast.shape == (*context.shape[:-1], 36) and torch.equal(forecast[..., :20], context)
    assert torch.equal(forecast, expected)


def test_loss_names_and_their_parts():
    """CrossEntropySpectral = cross-entropy + spectral_weight x the band-power term, both reported;
    label smoothing mixes in the uniform target's cross-entropy; a bad name is refused, naming the field."""
    idx = ids("WavenetFullChannel")
    plain = built("WavenetFullChannel", std=0.2)
    spectral = built("WavenetFullChannel", std=0.2, loss_name="CrossEntropySpectral", spectral_weight=0.5,
                     code_rate_hz=100.0, spectral_low_hz=0.0, spectral_high_hz=20.0, spectral_n_fft=16)
    ce = plain(idx[..., :-1], idx[..., 1:])
    total = spectral(idx[..., :-1], idx[..., 1:])
    parts = {name: reported.value.item() for name, reported in spectral.last_report.items()}
    assert set(parts) == {"cross_entropy", "spectral"} and parts["spectral"] > 0
    assert parts["cross_entropy"] == pytest.approx(ce.item(), rel=1e-6)
    assert total.item() == pytest.approx(ce.item() + 0.5 * parts["spectral"], rel=1e-6)
    smoothed = built("WavenetFullChannel", std=0.2, label_smoothing=0.3)(idx[..., :-1], idx[..., 1:])
    log_probs = plain(idx[..., :-1]).log_softmax(dim=-1)  # the same weights (same seed)
    uniform_part = -log_probs.mean(dim=-1).mean()
    assert smoothed.item() == pytest.approx(0.7 * ce.item() + 0.3 * uniform_part.item(), rel=1e-5)
    with pytest.raises(ValueError, match="loss_name must be one of"):
        built("STGPT2MEG", loss_name="MSE")


def test_flops_are_counted_from_the_layers():
    """Convs: FlopCounterMode's count is 2 x the conv weights per position (x3 for training), which a
    WaveNet is made of; STGPT2MEG: 6 x its matmul weights + the attention scores over sequence_len."""
    for name in ("WavenetFullChannel", "Wavenet3D"):
        model = built(name)
        conv_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv3d)))
        assert model.num_flops_per_token() == 6 * conv_weights
    model = built("STGPT2MEG")
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * config.num_layers * config.d_model * (config.sequence_len + config.num_channels)  # QK^T and AV, both attentions
    assert model.num_flops_per_token() == 6 * linear + attention
    assert built("TASA3D").num_flops_per_token() > 0


@pytest.mark.parametrize("name", SHAPES)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    idx = ids(name)
    grads = []
    for enabled in (False, True):
        model = built(name, std=0.1)
        model.set_gradient_checkpointing(enabled)
        model(idx[..., :-1], idx[..., 1:]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------ on token grids, with the trainer


@pytest.fixture(scope="module")
def grids(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("brain-grids")
    return {"meg": write_grid_dataset(root / "meg", axes=("channel", "time"), shape=(4, 17), vocab_size=V, tokenizer=TOTEM,
                                      num_train_shards=2),
            "video": write_grid_dataset(root / "video", axes=("time", "height", "width"), shape=(9, 4, 4), vocab_size=V,
                                        tokenizer=VIDTOK, kind="video_tokens", num_train_shards=2)}


@pytest.mark.parametrize("name, data", [("WavenetFullChannel", "meg"), ("TASA3D", "video")])
def test_train_eval_and_forecast_on_a_token_grid(grids, tmp_path, capsys, name, data):
    """The trainer takes the sites from the grid, reports MFU; eval scores the run; its checkpoint
    forecasts through the family's layout (what `tokfleet forecast` drives) to a grid of codes;
    `tokfleet generate` (one sequence of ids) points to forecast."""
    from conftest import cli_error, train_on
    from trainer.causal_eval import evaluate_causal
    from trainer.inference import load_model
    from trainer.token_tasks import layout_class

    summary = train_on(grids[data], tmp_path, name, {}, micro=4, steps=6)
    assert summary["last"]["mfu"] > 0 and summary["last"]["loss"] < math.log(V)
    report = evaluate_causal(str(tmp_path / name), grids[data], split="val", num_batches=1, batch_size=4)
    assert report["metrics"]["model"]["loss"] < report["metrics"]["unigram"]["loss"] + 1.0
    assert report["metrics"]["model"]["num_targets"] == 4 * (4 * 16 if data == "meg" else 16 * 8)  # samples x sites x steps
    model, state, _ = load_model(tmp_path / name)
    layout = layout_class(name)(model)
    grid = torch.randint(0, V, (2, 5, 4, 4, 1) if data == "video" else (2, 5, 4, 1, 1))  # (B, T, H, W, Q)
    forecast = layout.to_grid(layout.forecast(model, layout.to_sequence(grid), 3, temperature=0.8, top_k=5), like=grid)
    assert forecast.shape == (2, 8, *grid.shape[2:]) and torch.equal(forecast[:, :5], grid)
    assert int(forecast.min()) >= 0 and int(forecast.max()) < V
    error = cli_error(capsys, ["generate", "--checkpoint", str(tmp_path / name), "--prompt-tokens", "1 2 3"])
    assert f"{name} continues grids of codes (channels x time), not one sequence: use `tokfleet forecast" in error


def test_grids_a_model_cannot_read_are_refused_in_one_line(grids, tmp_path):
    from conftest import train_on

    with pytest.raises(UserError, match=r"model.args.num_channels=5 does not fit .* it must be 4"):
        train_on(grids["meg"], tmp_path, "STGPT2MEG", {"num_channels": 5}, micro=2, steps=1)
    with pytest.raises(UserError, match="height .4. and width .1. must be divisible by 2\\^num_down = 2"):
        train_on(grids["meg"], tmp_path, "TASA3D", {}, micro=2, steps=1)


# ------------------------------------------------------------------ 2 ranks, ZeRO-2, exact resume


@pytest.mark.parametrize("name, data", [("STGPT2MEG", "meg"), ("Wavenet3D", "video")])
def test_zero2_two_ranks_resume_with_identical_losses(grids, tmp_path, name, data):
    """6 steps of the DeepSpeed engine (ZeRO-2) on 2 ranks, checkpoints at 3 and 6; the step-3
    checkpoint resumed gives steps 4-6 bit for bit. Launched by torchrun: ~10 s less per run than the
    deepspeed launcher, which imports deepspeed once more (test_forecast covers that launcher)."""
    import shutil

    import yaml

    from test_distributed import losses, run

    def config(run_name: str) -> str:
        values = {
            "run": {"name": run_name, "output_dir": str(tmp_path / run_name), "max_steps": 6, "seed": 3, "device": "cpu"},
            "model": {"name": name, "flavor": "debug"},
            "data": {"dataset": grids[data], "num_streams": 2},
            "optim": {"lr": 3e-3, "warmup_steps": 1, "micro_batch_size": 2},
            "engine": {"kind": "deepspeed", "zero_stage": 2, "peak_flops": 1e11},
            "checkpoint": {"every_steps": 3, "keep_last": 2},
            "logging": {"every_steps": 1, "progress": False, "wandb": False},
            "eval": {"every_steps": 0, "num_batches": 1},
        }
        path = tmp_path / f"{run_name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    run("torchrun", 2, config("two"))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    shutil.copytree(tmp_path / "two" / "logs", resumed / "logs")
    shutil.copy(tmp_path / "two" / "metrics.jsonl", resumed / "metrics.jsonl")
    (resumed / "checkpoints" / "latest").write_text("step-00000003\n")
    run("torchrun", 2, config("resumed"), "--resume", "auto")
    straight = losses(tmp_path / "two")
    assert sorted(straight) == list(range(1, 7)) and straight[6] < straight[1]
    assert losses(resumed) == straight
