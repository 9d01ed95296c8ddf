"""brain-gen's continuous-signal models (modeling/brain): BENDRForecast, NTD, MEGFactorizedAutoencoder.

Shapes, losses that fall when overfitting, BENDR's causality, the NTD noise process and sampler, the
signal metrics on known cases, and NTD trained on MEG windows on 2 ranks under DeepSpeed ZeRO-2 with an
exact resume, then scored by `tokfleet eval`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.errors import UserError
from modeling.brain.signal_metrics import signal_metrics
from modeling.registry import build_model, get_model_spec, model_config

NAMES = ("BENDRForecast", "NTD", "MEGFactorizedAutoencoder")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def rhythms(batch: int, channels: int = 8, length: int = 128, seed: int = 0) -> torch.Tensor:
    """(B, C, T): per channel a 6-12 Hz sinusoid at 100 Hz with random phase plus a little noise, unit scale."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 100.0
    frequency = 6 + 6 * torch.rand(1, channels, 1, generator=g)
    phase = 2 * math.pi * torch.rand(batch, channels, 1, generator=g)
    return math.sqrt(2) * torch.sin(2 * math.pi * frequency * t + phase) + 0.1 * torch.randn(batch, channels, length, generator=g)


# ------------------------------------------------------------------------------ shapes, registry


@pytest.mark.parametrize("name", NAMES)
def test_registered_forward_shapes_and_flops(name):
    spec = get_model_spec(name)
    assert set(spec.flavors) == {"debug", "small", "full"}
    assert spec.task == ("signal_forecast" if name == "BENDRForecast" else "signal_reconstruction")
    torch.manual_seed(0)
    model = build_model(name, "debug")
    x = rhythms(2)
    loss = model(signal=x)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.last_report and all(torch.isfinite(r.value) for r in model.last_report.values())
    pair = model.eval().evaluation_pair(x)
    target_length = 16 if name == "BENDRForecast" else 128
    for tensor in (pair.prediction, pair.target, pair.baseline):
        assert tensor.shape == (2, 8, target_length) and torch.isfinite(tensor).all()
    flops = model.num_flops_per_token()
    params = sum(p.numel() for p in model.parameters())
    assert flops > 0
    bigger = {"BENDRForecast": {"num_layers": 4}, "NTD": {"num_blocks": 4}, "MEGFactorizedAutoencoder": {"latent_dim": 64}}[name]
    bigger_model = build_model(name, "debug", bigger, device="meta")  # counted from the layers: more layers, more FLOPs
    assert bigger_model.num_flops_per_token() > flops and sum(p.numel() for p in bigger_model.parameters()) > params


def test_bendr_shapes_and_its_forecasts_see_only_the_past():
    torch.manual_seed(0)
    model = build_model("BENDRForecast", "debug").eval()  # S = 4, T_out = 16
    context = rhythms(1, length=64).requires_grad_(True)
    steps = model.forecast_steps(context)
    assert steps.shape == (1, 16, 8, 16)
    assert model.predict(rhythms(3, length=67)).shape == (3, 8, 16)
    for j in (0, 5, 15):
        (grad,) = torch.autograd.grad(steps[0, j].sum(), context, retain_graph=True)
        seen = grad.abs().sum(dim=(0, 1))  # (T,)
        assert seen[(j + 1) * 4:].sum() == 0, f"step {j} sees samples >= {(j + 1) * 4}"
        assert seen[:(j + 1) * 4].abs().max() > 0 and seen[(j + 1) * 4 - 1] > 0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="loss_name"):
        model_config("BENDRForecast", "debug", {"loss_name": "L2"})
    with pytest.raises(ValueError, match="output_samples"):
        model_config("BENDRForecast", "debug", {"output_samples": 6})
    with pytest.raises(ValueError, match="noise_process"):
        model_config("NTD", "debug", {"noise_process": "pink"})
    with pytest.raises(ValueError, match="channel_factors"):
        model_config("MEGFactorizedAutoencoder", "debug", {"num_channels": 6})
    model = build_model("NTD", "debug")
    with pytest.raises(ValueError, match="num_channels=8"):
        model(signal=torch.randn(1, 7, 128))


@pytest.mark.parametrize("name, args, num_steps, lr, max_ratio", [
    ("BENDRForecast", {}, 40, 3e-3, 0.5),
    ("BENDRForecast", {"loss_name": "SpectralLoss"}, 40, 3e-3, 0.6),
    ("NTD", {}, 60, 1e-2, 0.6),
    ("MEGFactorizedAutoencoder", {"loss_name": "huber"}, 40, 1e-2, 0.5),
])
def test_short_overfit_lowers_the_loss(name, args, num_steps, lr, max_ratio):
    torch.manual_seed(0)
    model = build_model(name, "debug", args)
    batch = rhythms(4)
    with torch.no_grad():  # eval mode: NTD draws its steps and noise from a fixed generator, so the losses compare
        before = model.eval()(signal=batch).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(num_steps):
        optimizer.zero_grad()
        model(signal=batch).backward()
        optimizer.step()
    with torch.no_grad():
        after = model.eval()(signal=batch).item()
    assert after < max_ratio * before, (before, after)


def test_gradient_checkpointing_gives_the_same_gradients():
    for name in NAMES:
        grads = []
        for is_checkpointing in (False, True):
            torch.manual_seed(0)
            model = build_model(name, "debug", {"use_gradient_checkpointing": is_checkpointing})
            torch.manual_seed(1)
            model(signal=rhythms(2)).backward()
            grads.append([p.grad for p in model.parameters()])
        for plain, recomputed in zip(*grads):
            torch.testing.assert_close(plain, recomputed)


# ------------------------------------------------------------------------------ NTD


def test_ou_noise_and_ntd_loss_are_the_mahalanobis_norm():
    """Samples have the OU covariance sigma2 rho^|i-j|; the NTDLoss of a difference d is d' Sigma^-1 d / n."""
    model = build_model("NTD", "debug", {"signal_length": 32, "ou_sigma2": 2.0, "ou_ell": 4.0})
    rho = math.exp(-1 / 4.0)
    lags = torch.arange(32)[:, None] - torch.arange(32)[None, :]
    covariance = 2.0 * rho ** lags.abs().double()
    factor = model.noise.factor.double()
    torch.testing.assert_close(factor @ factor.T, covariance, rtol=1e-5, atol=1e-6)
    samples = model.noise.sample((4000, 1, 32), torch.device("cpu"), torch.Generator().manual_seed(0))[:, 0].double()
    empirical = samples.T @ samples / samples.shape[0]
    assert (empirical - covariance).abs().max() < 0.15
    d = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(1))
    expected = torch.einsum("bct,ts,bcs->", d.double(), torch.linalg.inv(covariance), d.double()) / d.numel()
    torch.testing.assert_close(model.noise_loss(torch.zeros_like(d), d).double(), expected, rtol=1e-4, atol=0)


def test_ntd_sampler_gives_finite_windows_and_the_trained_model_denoises_better_than_noise():
    torch.manual_seed(0)
    model = build_model("NTD", "debug", {"diffusion_steps": 50})
    windows = rhythms(16, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        optimizer.zero_grad()
        model.train()(signal=windows[(step % 4) * 4:(step % 4) * 4 + 4]).backward()
        optimizer.step()
    model.eval()
    samples = model.sample(3, num_steps=10)
    assert samples.shape == (3, 8, 128) and torch.isfinite(samples).all()
    torch.testing.assert_close(model.sample(3, num_steps=10), samples)  # seeded: the same draw again
    assert not torch.equal(model.sample(3, num_steps=10, seed=5), samples)
    stochastic = model.sample(2, num_steps=10, eta=1.0)
    assert torch.isfinite(stochastic).all()
    pair = model.evaluation_pair(windows[:4])
    reconstruction, noised = signal_metrics(pair.prediction, pair.target), signal_metrics(pair.baseline, pair.target)
    noise = model.noise.sample(windows[:4].shape, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert reconstruction["mse"] < 0.5 * noised["mse"] and reconstruction["mse"] < 0.5 * ((noise - pair.target) ** 2).mean()
    assert reconstruction["correlation"] > 0.8, reconstruction


# ------------------------------------------------------------------------------ metrics


def test_signal_metrics_on_known_cases():
    t = torch.arange(256, dtype=torch.float64) / 256.0
    x = torch.stack([torch.sin(2 * math.pi * 5 * t) + 0.3 * torch.randn(256, dtype=torch.float64), torch.randn(256, dtype=torch.float64)])[None]
    doubled = signal_metrics(2 * x, x)
    assert doubled["mse"].item() == pytest.approx(x.square().mean().item(), rel=1e-6)  # (2x - x)^2 = x^2
    assert doubled["correlation"].item() == pytest.approx(1.0, abs=1e-6)
    assert doubled["psd_distance_db"].item() == pytest.approx(20 * math.log10(2), rel=1e-5)  # 4x the power at every bin
    assert signal_metrics(-x, x)["correlation"].item() == pytest.approx(-1.0, abs=1e-6)
    # against numpy: Hann-windowed periodograms, |dB difference| averaged over series and bins
    g = np.random.default_rng(0)
    a, b = g.standard_normal((3, 4, 100)), g.standard_normal((3, 4, 100))
    window = np.hanning(100)

    def decibels(values):
        return 10 * np.log10(np.abs(np.fft.rfft(values * window)) ** 2 / np.sum(window ** 2) + 1e-12)

    centred_a, centred_b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    correlation = ((centred_a * centred_b).sum(-1) / np.linalg.norm(centred_a, axis=-1) / np.linalg.norm(centred_b, axis=-1)).mean()
    metrics = signal_metrics(torch.tensor(a), torch.tensor(b))
    assert metrics["mse"].item() == pytest.approx(((a - b) ** 2).mean(), rel=1e-5)
    assert metrics["correlation"].item() == pytest.approx(correlation, rel=1e-4)
    assert metrics["psd_distance_db"].item() == pytest.approx(np.abs(decibels(a) - decibels(b)).mean(), rel=1e-4)


# ------------------------------------------------------------------------------ trainer, 2 ranks, eval


def test_window_shape_comes_from_the_dataset_and_must_match():
    from types import SimpleNamespace

    from trainer.loop import set_window_shape

    manifest = SimpleNamespace(fields={"signal.npy": {"dtype": "float32", "shape": [8, 500]}})
    args: dict = {}
    set_window_shape("NTD", args, {"num_channels", "signal_length"}, manifest)
    assert args == {"num_channels": 8, "signal_length": 500}
    with pytest.raises(UserError, match=r"model.args.num_channels=6 does not match the dataset's windows \(8\)"):
        set_window_shape("NTD", {"num_channels": 6}, {"num_channels", "signal_length"}, manifest)
    varying = SimpleNamespace(fields={"signal.npy": {"shape": [None, 500]}})
    with pytest.raises(UserError, match="varying num_channels"):
        set_window_shape("NTD", {}, {"num_channels", "signal_length"}, varying)


def test_ntd_zero2_two_ranks_resume_exactly_and_eval_reports_metrics(meg_mag, token_dataset, tmp_path, capsys):
    """NTD on the magnetometer windows (8 x 500), 2 ranks under DeepSpeed ZeRO-2: stopped at step
    3 and resumed, the losses equal the uninterrupted run's bit for bit (the diffusion steps and noise come from the
    checkpointed RNG). `tokfleet eval` then scores its reconstructions next to the noised windows."""
    from conftest import cli_error
    from launch.cli import main
    from test_distributed import losses, run

    def config(name: str) -> Path:
        data = {
            "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": 6, "seed": 3, "device": "cpu"},
            "model": {"name": "NTD", "flavor": "debug", "args": {"num_sampling_steps": 4}},
            "data": {"dataset": meg_mag, "num_streams": 2},
            "optim": {"lr": 3e-3, "warmup_steps": 1, "micro_batch_size": 1},
            "engine": {"kind": "deepspeed", "zero_stage": 2, "peak_flops": 1e11},
            "checkpoint": {"every_steps": 3, "keep_last": 2},
            "logging": {"every_steps": 1, "progress": False, "wandb": False},
            "eval": {"every_steps": 0, "num_batches": 1},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    # torchrun starts the 2 ranks faster than the deepspeed launcher; the engine is DeepSpeed's either way
    run("torchrun", 2, config("two"))
    run("torchrun", 2, config("resumed"), "--stop-at-step", "3")
    run("torchrun", 2, config("resumed"), "--resume", "auto")
    assert sorted(losses(tmp_path / "two")) == list(range(1, 7))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "two")
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["mfu"] > 0 and "ntd_loss" in records[-1] and "noise_mse" in records[-1]
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["model"]["args"]["num_channels"] == 8 and state["model"]["args"]["signal_length"] == 500

    main(["export", str(tmp_path / "two"), "--out", str(tmp_path / "exported")])
    capsys.readouterr()
    main(["eval", str(tmp_path / "exported"), "--data", meg_mag, "--num-batches", "1", "--batch-size", "2",
          "--out", str(tmp_path / "eval.json")])
    out = capsys.readouterr().out
    assert "eval NTD (debug, step 6)" in out and "reconstruction vs baseline (noised windows" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_samples"] == 2 and set(report["metrics"]) == {"mse", "correlation", "psd_distance_db"}
    assert all(math.isfinite(v) for v in [*report["metrics"].values(), *report["baseline"]["metrics"].values()])
    assert "NTD reads 'meg_windows'" in cli_error(capsys, ["eval", str(tmp_path / "exported"), "--data", token_dataset])


def test_bendr_trains_on_meg_windows_and_eval_reports_its_forecast(meg_mag, tmp_path, capsys):
    from conftest import cli_error, train_on
    from launch.cli import main

    summary = train_on(meg_mag, tmp_path, "BENDRForecast", {"output_samples": 100}, micro=2, steps=2)
    assert summary["step"] == 2 and (tmp_path / "BENDRForecast" / "plots" / "reconstruction.png").is_file()
    capsys.readouterr()
    main(["eval", str(tmp_path / "BENDRForecast"), "--data", meg_mag, "--num-batches", "1", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "eval BENDRForecast (debug, step 2)" in out and "forecast vs baseline (last context sample repeated)" in out
    assert out.count("\n") == 5  # header, column names, 3 metrics
    message = cli_error(capsys, ["train", str(tmp_path / "BENDRForecast.yaml"), "--set", "model.args.num_channels=6",
                                 "--set", f"run.output_dir={tmp_path / 'other'}"])
    assert "model.args.num_channels=6 does not match the dataset's windows (8)" in message
