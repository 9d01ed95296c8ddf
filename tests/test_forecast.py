"""Forecasting on tokens end to end, through the shipped configs and the CLI: recordings -> prepare ->
tokenizer -> pretokenize -> forecaster -> `tokfleet forecast` (trainer/forecast.py).

A predictable signal proves the chain is aligned in time and scale: per-channel sinusoids ->
TOTEM -> GPT forecaster must beat the context mean and persistence by a wide margin. The same
chain with BrainTokMix -> FlatGPTEmbedsRVQ / BrainOmniCausalForecast (synthetic MEG) and with
Vidtok -> FlatGPT (real video clips) runs and gives forecasts of the right shape in physical units.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import BRAINTOKMIX, cli_error
from launch.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUIET = ["logging.progress=false", "logging.wandb=false"]



def train(config: str, *overrides: str) -> dict:
    from core.config import TrainConfig, load_config
    from trainer.loop import Trainer

    return Trainer(load_config(config, TrainConfig, [*QUIET, *overrides])).train()


def pretokenize(dataset: str, checkpoint: str, output: str) -> None:
    from core.config import PretokenizeConfig, load_config
    from sharding.pretokenize_signals import pretokenize_signals
    from trainer.tokenizer_runner import describe_checkpoint

    cfg = load_config(CONFIGS / "meg/pretokenize_totem_sinusoids.yaml", PretokenizeConfig,
                      [f"input.dataset={dataset}", f"tokenizer.checkpoint={checkpoint}", f"shards.output={output}",
                       "tokenizer.device=cpu", "actors.batch_size=8"])
    pretokenize_signals(cfg, describe_checkpoint, progress=False)


# ------------------------------------------------------------------ sinusoids: TOTEM -> GPT


@pytest.fixture(scope="module")
def sinusoids(ray_session, tmp_path_factory) -> dict[str, str]:
    """The shipped sinusoid configs (8 recordings of 60 s, TOTEM 300 steps) with a smaller GPT: 2 x 64, 300 steps."""
    from core.config import PrepareConfig, load_config
    from sharding.prepare_signals import prepare_signals
    from sharding.synthetic_meg import write_recordings

    root = tmp_path_factory.mktemp("sinusoids")
    write_recordings(str(root / "recordings"), num_recordings=8, seconds=60.0, kind="sinusoids")
    raw, tokens = str(root / "windows"), str(root / "tokens")
    cfg = load_config(CONFIGS / "meg/prepare_sinusoids.yaml", PrepareConfig,
                      [f"source.paths=['{root}/recordings/*.fif']", f"shards.output={raw}"])
    prepare_signals(cfg, progress=False)
    totem, gpt = str(root / "totem"), str(root / "gpt")
    train(str(CONFIGS / "meg/train_totem_sinusoids.yaml"), f"run.output_dir={totem}", f"data.dataset={raw}")
    pretokenize(raw, totem, tokens)
    train(str(CONFIGS / "meg/train_forecaster_sinusoids.yaml"), f"run.output_dir={gpt}", f"data.dataset={tokens}",
          "model.args.n_layer=2", "model.args.n_embd=64", "run.max_steps=300", "eval.every_steps=300")
    return {"root": str(root), "raw": raw, "tokens": tokens, "totem": totem, "gpt": gpt,
            "recording": str(root / "recordings" / "rec-07_raw.fif")}


def test_gpt_on_totem_codes_forecasts_sinusoids_far_better_than_the_baselines(sinusoids, capsys):
    out = Path(sinusoids["root"]) / "forecast"
    main(["forecast", sinusoids["gpt"], "--data", sinusoids["raw"], "--num-windows", "16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "context 192 samples, horizon 64 samples" in printed and "context_mean" in printed
    report = json.loads((out / "forecast.json").read_text())
    metrics = report["metrics"]
    model, mean, persistence = (metrics[name]["normalized"] for name in ("model", "context_mean", "persistence"))
    # aligned in time and scale: a forecast off by a quarter period or by a scale factor would lose these
    assert model["mse"] < 0.5 * mean["mse"] and model["mse"] < persistence["mse"], (model, mean, persistence)
    assert model["correlation"] > 0.7 and model["scale_error"] < 0.2
    assert mean["correlation"] is None and 0.3 < mean["mse"] < 0.7  # a sinusoid's variance: the context mean knows nothing
    assert report["context"] == {"samples": 192, "code_steps": 48, "code_steps_regenerated": 4}  # TOTEM small looks 4 tokens ahead
    assert report["tokenizer"].startswith(sinusoids["totem"]) and report["tokenizer_model"] == "totem" and report["finite"]
    # physical units: the magnetometers' tesla, the normalised MSE times each channel's squared scale
    physical = metrics["model"]["physical"]
    assert set(physical) == {"mag"} and 1e-28 < physical["mag"]["mse"] < 1e-24
    assert physical["mag"]["mse"] < 0.5 * metrics["context_mean"]["physical"]["mag"]["mse"]
    assert [Path(p).name for p in report["outputs"]] == ["forecast-window0.png", "forecast-window1.png"]
    assert all(Path(p).stat().st_size > 10_000 for p in report["outputs"])


def test_forecast_of_a_recording_with_several_samples(sinusoids):
    """A recording file (preprocessed as the dataset was) and sampled forecasts: the mean of samples scored too."""
    from trainer.forecast import ForecastRequest, forecast

    report = forecast(ForecastRequest(forecaster=sinusoids["gpt"], recording=sinusoids["recording"], data=sinusoids["raw"],
                                      context=128, horizon=48, num_windows=3, num_samples=3, temperature=0.7, top_k=8,
                                      out=str(Path(sinusoids["root"]) / "forecast-recording")))
    assert report["num_windows"] == 3 and report["horizon"] == {"samples": 48, "code_steps": 12}
    assert {"model", "mean_of_samples", "persistence", "context_mean", "last_period"} <= set(report["metrics"])
    assert report["metrics"]["model"]["normalized"]["mse"] < report["metrics"]["context_mean"]["normalized"]["mse"]


def test_forecast_bad_inputs_exit_2_with_one_line(sinusoids, checkpoints, capsys, tmp_path):
    gpt, raw, out = sinusoids["gpt"], sinusoids["raw"], str(tmp_path / "out")
    common = ["--data", raw, "--out", out]
    assert "longer than the forecaster's window of 64 steps" in cli_error(
        capsys, ["forecast", gpt, "--recording", sinusoids["recording"], "--context", "320", "--horizon", "16", *common])
    assert "must be a non-zero multiple of 4" in cli_error(capsys, ["forecast", gpt, "--context", "2", *common])
    assert "so it needs more than 4 steps" in cli_error(capsys, ["forecast", gpt, "--context", "16", *common])
    assert "longer than the windows" in cli_error(capsys, ["forecast", gpt, "--context", "240", "--horizon", "32", *common])
    assert "is a BrainOmniCausalTokenizerSEANetChannelMix run; the forecaster's codes come from a totem tokenizer" in cli_error(
        capsys, ["forecast", gpt, "--tokenizer", checkpoints[BRAINTOKMIX], *common])
    assert "are not those the forecaster's codes came from" in cli_error(
        capsys, ["forecast", gpt, "--tokenizer", checkpoints["totem"], *common])
    assert "was not trained on a token grid" in cli_error(capsys, ["forecast", sinusoids["totem"], *common])
    assert "has no 'test' windows" in cli_error(capsys, ["forecast", gpt, "--split", "test", *common])
    assert "forecaster not found" in cli_error(capsys, ["forecast", str(tmp_path / "nope"), *common])
    assert not Path(out).exists()


# ------------------------------------------------------------------ BrainTokMix -> FlatGPTEmbedsRVQ, BrainOmniCausalForecast


@pytest.fixture(scope="module")
def braintokmix_tokens(meg_mag, checkpoints, tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("braintokmix-tokens"))
    pretokenize(meg_mag, checkpoints[BRAINTOKMIX], output)
    return output


def forecaster_config(tmp_path: Path, name: str, dataset: str, args: dict | None = None, steps: int = 3) -> str:
    import yaml

    config = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "max_steps": steps, "seed": 5, "device": "cpu"},
        "model": {"name": name, "flavor": "debug", "args": args or {}},
        "data": {"dataset": dataset, "num_streams": 4, "log_sample_keys": True},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "micro_batch_size": 2},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 0},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": steps, "num_batches": 1},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("name", ["FlatGPTEmbedsRVQ", "BrainOmniCausalForecast"])
def test_braintokmix_forecasters_give_finite_forecasts_in_physical_units(meg_mag, braintokmix_tokens, checkpoints, tmp_path, name):
    """BrainTokMix codes (2 latent channels x 125 steps x 2 levels) -> a forecaster -> decoded 8-channel MEG in tesla."""
    from trainer.forecast import ForecastRequest, forecast

    train(forecaster_config(tmp_path, name, braintokmix_tokens))
    report = forecast(ForecastRequest(forecaster=str(tmp_path / name), data=meg_mag, context=400, horizon=100,
                                      num_windows=2, out=str(tmp_path / "forecast")))
    assert report["finite"] and report["tokenizer_model"] == BRAINTOKMIX
    assert report["context"] == {"samples": 400, "code_steps": 100, "code_steps_regenerated": 0}  # causal: nothing to redo
    assert report["horizon"] == {"samples": 100, "code_steps": 25}
    physical = report["metrics"]["model"]["physical"]["mag"]
    assert math.isfinite(physical["mse"]) and 1e-30 < physical["mse"] < 1e-20  # tesla squared, not normalised units
    assert [Path(p).name for p in report["outputs"]] == ["forecast-window0.png", "forecast-window1.png"]


def test_flatgpt_tokenizes_raw_windows_on_the_fly_as_pretokenize_does(meg_mag, braintokmix_tokens, checkpoints, tmp_path):
    """model.args.tokenizer_path = a BrainTokMix run: the raw windows are tokenized on the fly by the frozen
    tokenizer and train exactly as its pretokenized shards do (same keys, same order, same codes)."""
    from trainer.metrics import read_metrics

    on_the_fly = forecaster_config(tmp_path / "raw", "FlatGPTEmbedsRVQ", meg_mag, {"tokenizer_path": checkpoints[BRAINTOKMIX]})
    train(on_the_fly)
    pretokenized = forecaster_config(tmp_path / "tokens", "FlatGPTEmbedsRVQ", braintokmix_tokens)
    train(pretokenized)
    raw_run, token_run = tmp_path / "raw" / "FlatGPTEmbedsRVQ", tmp_path / "tokens" / "FlatGPTEmbedsRVQ"
    got = [r["loss"] for r in read_metrics(raw_run / "metrics.jsonl")]
    expected = [r["loss"] for r in read_metrics(token_run / "metrics.jsonl")]
    assert len(got) == 3 and got == pytest.approx(expected, rel=1e-5)
    state = json.loads(next((raw_run / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["token_grid"]["on_the_fly"] and state["token_grid"]["shape"] == [2, 125, 2]
    assert state["model"]["args"]["tokenizer_path"] == checkpoints[BRAINTOKMIX]


def test_train_refuses_what_the_grid_does_not_fit_in_one_line(meg_mag, braintokmix_tokens, checkpoints, tmp_path, capsys):
    """Through `tokfleet train`: exit 2 and one line for a vocabulary or grid the model cannot hold, a
    tokenizer run of another kind, and a token dataset without a val split."""
    from conftest import write_grid_dataset

    config = forecaster_config(tmp_path, "FlatGPTEmbedsRVQ", braintokmix_tokens)
    assert "model.args.vocab_size=16 cannot hold the dataset's vocabulary of 32 (codes (channel 2, time 125, level 2))" in cli_error(
        capsys, ["train", config, "--set", "model.args.vocab_size=16"])
    assert ("model.args.input_shape [100, 2, 2] with temporal_reduction 1 and spatial_reduction [1, 1] gives a code grid "
            "(100, 2, 2) that cannot hold the dataset's grid (125, 2, 2)") in cli_error(
        capsys, ["train", config, "--set", "model.args.input_shape=[100, 2, 2]"])
    assert "a 'meg_windows' dataset; tokenizer Vidtok" in cli_error(
        capsys, ["train", config, "--set", f"data.dataset={meg_mag}", "--set", f"model.args.tokenizer_path={checkpoints['Vidtok']}"])
    no_val = write_grid_dataset(tmp_path / "no-val", axes=("channel", "time", "level"), shape=(2, 125, 2), vocab_size=32,
                                tokenizer={"model": BRAINTOKMIX, "flavor": "debug", "args": {}, "checkpoint": "", "sha256": ""},
                                num_val=0)
    assert "data.val_split 'val'" in cli_error(capsys, ["train", config, "--set", f"data.dataset={no_val}"])
    assert not list((tmp_path / "FlatGPTEmbedsRVQ").glob("checkpoints/step-*"))


# ------------------------------------------------------------------ video: Vidtok -> FlatGPT (Qwen2.5-Video positions)


def test_vidtok_flatgpt_forecast_writes_an_mp4_and_a_frame_strip(video_built, checkpoints, tmp_path):
    import av

    from trainer.forecast import ForecastRequest, forecast

    tokens = str(tmp_path / "video-tokens")
    pretokenize(video_built[3], checkpoints["Vidtok"], tokens)
    train(forecaster_config(tmp_path, "FlatGPT", tokens, steps=2))
    state = json.loads(next((tmp_path / "FlatGPT" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["model"]["args"]["trf_class"] == "Qwen2_5_Video"  # 3-axis positions over the (T', H', W') grid
    assert state["model"]["args"]["input_shape"] == state["token_grid"]["shape"] == [4, 16, 24]  # 8 frames of 32 x 48, 2x
    out = tmp_path / "forecast"
    report = forecast(ForecastRequest(forecaster=str(tmp_path / "FlatGPT"), data=video_built[3], context=4, horizon=4,
                                      num_windows=2, out=str(out)))
    assert report["finite"] and report["context"]["frames"] == 4 and report["horizon"] == {"frames": 4, "code_steps": 2}
    pixels = report["metrics"]["model"]["physical"]["pixel"]
    assert 0 <= pixels["mae"] <= 255 and set(report["metrics"]) >= {"persistence", "context_mean", "last_period"}
    assert [Path(p).name for p in report["outputs"]] == ["forecast-strip.png", "forecast.mp4"]
    with av.open(str(out / "forecast.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (32, 48, 3)  # the 4 context frames, then the 4 forecast ones


# ------------------------------------------------------------------ distributed: ZeRO-2 on BrainTokMix tokens


def test_flatgpt_on_braintokmix_tokens_zero2_resumes_exactly_and_elastically(meg_mag, braintokmix_tokens, tmp_path):
    """2 ranks under the deepspeed launcher (ZeRO-2): stop at step 4 and resume gives the uninterrupted
    run's losses bit for bit; the step-4 checkpoint resumed on 1 rank reads every train sample of the
    epoch exactly once (the 13 windows of 2 recordings: 8 on 2 ranks, the other 5 on 1); its export forecasts."""
    import shutil
    from collections import Counter

    import yaml

    from sharding.manifest import Manifest
    from sharding.shards import read_shard
    from test_distributed import epoch_keys, keys_by_rank, losses, run

    def config(name: str, steps: int = 8) -> Path:
        path = Path(forecaster_config(tmp_path, "FlatGPTEmbedsRVQ", braintokmix_tokens, steps=steps))
        data = yaml.safe_load(path.read_text())
        data["run"]["output_dir"] = str(tmp_path / name)
        data["data"]["num_streams"] = 2
        data["optim"]["micro_batch_size"] = 1
        data["engine"] = {"kind": "deepspeed", "zero_stage": 2, "peak_flops": 1e11}
        data["checkpoint"] = {"every_steps": 4, "keep_last": 3}
        data["eval"] = {"every_steps": 0, "num_batches": 1}
        target = tmp_path / f"{name}.yaml"
        target.write_text(yaml.safe_dump(data))
        return target

    run("deepspeed", 2, config("two"))
    run("deepspeed", 2, config("resumed"), "--stop-at-step", "4")
    shutil.copytree(tmp_path / "resumed", tmp_path / "elastic")  # the step-4 checkpoint, before the run goes on
    run("deepspeed", 2, config("resumed"), "--resume", "auto")
    assert sorted(losses(tmp_path / "two")) == list(range(1, 9))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "two")
    assert keys_by_rank(tmp_path / "resumed") == keys_by_rank(tmp_path / "two")

    # 1 rank reads 1 sample a step where 2 read 2: 8 more steps finish the epoch's 13 train windows
    run("deepspeed", 1, config("elastic", steps=12), "--resume", "auto")
    manifest = Manifest.read(braintokmix_tokens)
    train_keys = Counter(s["__key__"] for record in manifest.shards_of("train")
                         for s in read_shard(f"{braintokmix_tokens}/{record.name}"))
    assert epoch_keys(tmp_path / "elastic", 0) == train_keys  # every sample of the epoch once, across 2 then 1 rank
    state = json.loads((tmp_path / "elastic" / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["engine"] == "deepspeed" and state["token_grid"]["shape"] == [2, 125, 2]
    # the ZeRO checkpoint exported to one safetensors model forecasts like any single-device run
    main(["export", str(tmp_path / "elastic"), "--out", str(tmp_path / "exported")])
    from trainer.forecast import ForecastRequest, forecast

    report = forecast(ForecastRequest(forecaster=str(tmp_path / "exported"), data=meg_mag, context=400, horizon=100,
                                      num_windows=1, out=str(tmp_path / "forecast")))
    assert report["finite"] and report["horizon"] == {"samples": 100, "code_steps": 25}
