"""`tokfleet prepare` for integer token data (source.kind tokens) on Ray, and `tokfleet generate --prompt-tokens`:
.txt and .npy round trips, the one-file train/val split, re-runs, bad inputs, and prepare -> train -> generate.

The ids are a first-order Markov chain over 128 ids (each id has 4 likely successors), 3,050 of them
in one all_tokens.txt like seed 002's, so the model trained at the end has something to learn.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch.cli import main
from core.config import PrepareConfig, ShardsConfig, SourceConfig, TokenIdsConfig
from core.errors import UserError
from sharding.shard_build import verify_dataset
from sharding.shards import read_shard, source_sample_key
from sharding.token_ids import prepare_token_ids

REPO = Path(__file__).resolve().parents[1]
PREPARE_YAML = REPO / "configs" / "tokens" / "prepare_tokens.yaml"
TRAIN_YAML = REPO / "configs" / "tokens" / "train_gpt_tokens.yaml"
PROMPT = [80, 81, 83, 89, 66]


def markov_ids(num_ids: int, vocab_size: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab_size, size=(vocab_size, 4))
    ids = [int(rng.integers(vocab_size))]
    for _ in range(num_ids - 1):
        ids.append(int(successors[ids[-1], rng.integers(4)]))
    return np.array(ids)


def write_txt(path: Path, ids: np.ndarray) -> str:
    """Ids 10 to a line, tab-separated on odd lines: any whitespace separates."""
    lines = [("\t" if i % 2 else " ").join(map(str, ids[j:j + 10])) for i, j in enumerate(range(0, len(ids), 10))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def windows(stream: list[int], seq_len: int) -> list[list[int]]:
    """The text pipeline's packing, written out: samples of seq_len + 1 ids at stride seq_len."""
    return [stream[i * seq_len:(i + 1) * seq_len + 1] for i in range((len(stream) - 1) // seq_len)]


def read_dataset(manifest, output: str) -> dict[str, list[dict]]:
    """split -> samples, in shard order."""
    samples: dict[str, list[dict]] = {"train": [], "val": []}
    for shard in manifest.shards:
        samples[shard.split].extend(read_shard(os.path.join(output, shard.name)))
    return samples


def file_ids(root: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file under `root`: changes when a file is rewritten (atomic rename)."""
    return {os.path.relpath(p, root): (os.stat(p).st_ino, os.stat(p).st_mtime_ns)
            for p in glob.glob(os.path.join(root, "*")) if os.path.isfile(p)}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `tokfleet ARGV` run in this process."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def txt_dataset(ray_session, tmp_path_factory):  # ray_session: the test session's Ray (conftest.py)
    """(config, report, ids, source) of one all_tokens.txt, vocabulary inferred, 80/20."""
    corpus = tmp_path_factory.mktemp("token-corpus")
    ids = markov_ids(3050)
    source = write_txt(corpus / "all_tokens.txt", ids)
    cfg = PrepareConfig(
        source=SourceConfig(kind="tokens", paths=[f"{corpus}/*.txt"]),
        shards=ShardsConfig(output=str(tmp_path_factory.mktemp("token-dataset")), name="tokens", seq_len=64, val_fraction=0.2),
    )
    return cfg, prepare_token_ids(cfg, progress=False), ids, source


def test_txt_round_trip_with_one_file_split_80_20(txt_dataset):
    cfg, report, ids, source = txt_dataset
    manifest, output = report.manifest, cfg.shards.output
    assert manifest.kind == "token_ids" and manifest.seq_len == 64 and manifest.vocab_size == ids.max() + 1
    assert manifest.fields == {"tokens.npy": {"dtype": "uint16", "shape": [65]}}
    assert manifest.tokenizer["kind"] == "given" and manifest.tokenizer["vocab_size_from"].startswith("largest id")
    expected = windows(ids.tolist(), 64)  # 47 samples: the last round(47 * 0.2) = 9 are val
    assert len(expected) == 47 and manifest.num_samples("train") == 38 and manifest.num_samples("val") == 9
    samples = read_dataset(manifest, output)
    for split, wanted in (("train", range(38)), ("val", range(38, 47))):
        assert [s["tokens"].tolist() for s in samples[split]] == [expected[i] for i in wanted]
        assert [s["__key__"] for s in samples[split]] == [source_sample_key(source, i) for i in wanted]
        assert all(s["tokens"].dtype == np.uint16 for s in samples[split])
    assert manifest.shards[0].sources == [source] and [s.split for s in manifest.shards] == ["train", "val"]
    targets = ids[1:38 * 64 + 1]  # every train target once
    counts = np.bincount(targets)
    probabilities = counts[counts > 0] / len(targets)
    assert manifest.stats["unigram_entropy_nats"] == pytest.approx(-(probabilities * np.log(probabilities)).sum(), abs=1e-6)
    assert manifest.stats["num_tokens"] == {"train": 38 * 64, "val": 9 * 64} and manifest.stats["num_stream_tokens"] == 3050
    assert verify_dataset(output) == []
    assert report.summary().startswith(
        f"dataset {output}: 1 files -> 38 train + 9 val sequences of 65 tokens in 2 shards, vocab {ids.max() + 1}")


def test_rerun_is_a_noop(txt_dataset):
    cfg, report, _, _ = txt_dataset
    before = file_ids(cfg.shards.output)
    again = prepare_token_ids(cfg, progress=False)
    assert again.num_built_shards == 0 and again.summary().endswith("nothing to build (all shards complete)")
    assert again.manifest.to_json() == report.manifest.to_json() and file_ids(cfg.shards.output) == before


def test_npy_documents_separator_given_vocab_and_short_files(ray_session, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    ids = markov_ids(700, vocab_size=127, seed=1)  # 127 is the separator
    one_document, rows, text = ids[:150], ids[150:350].reshape(4, 50).astype(np.int32), ids[350:650]
    np.save(corpus / "a.npy", one_document)
    np.save(corpus / "b.npy", rows)
    write_txt(corpus / "c.txt", text)
    write_txt(corpus / "short.txt", ids[650:660])
    np.save(corpus / "skip_me.npy", np.array([1.5]))  # left out by source.exclude
    output = str(tmp_path / "dataset")
    cfg = PrepareConfig(
        source=SourceConfig(kind="tokens", paths=[f"{corpus}/*"], exclude=["*/skip_*"]),
        token_ids=TokenIdsConfig(vocab_size=128, separator_id=127),
        shards=ShardsConfig(output=output, name="ids", seq_len=32, source_bytes_per_shard=1, val_fraction=0.25),  # a group per file
    )
    manifest = prepare_token_ids(cfg, progress=False).manifest
    assert manifest.vocab_size == 128 and manifest.fields["tokens.npy"]["dtype"] == "uint16"
    assert manifest.tokenizer["separator_id"] == 127 and manifest.tokenizer["vocab_size_from"] == "token_ids.vocab_size"
    streams = {  # each document followed by the separator
        "a.npy": one_document.tolist() + [127],
        "b.npy": [i for row in rows.tolist() for i in row + [127]],
        "c.txt": text.tolist() + [127],
    }
    num_val = {"a.npy": 1, "b.npy": 2, "c.txt": 2}  # of 4, 6 and 9 samples: round(n / 4), at least one
    assert [(s.split, [os.path.basename(p) for p in s.sources]) for s in manifest.shards] == [
        ("train", ["a.npy"]), ("val", ["a.npy"]), ("train", ["b.npy"]), ("val", ["b.npy"]), ("train", ["c.txt"]), ("val", ["c.txt"])]
    keys = []
    for shard in manifest.shards:
        name = os.path.basename(shard.sources[0])
        expected = windows(streams[name], 32)
        wanted = range(len(expected) - num_val[name]) if shard.split == "train" else range(len(expected) - num_val[name], len(expected))
        samples = read_shard(os.path.join(output, shard.name))
        assert [s["tokens"].tolist() for s in samples] == [expected[i] for i in wanted]
        assert [s["__key__"] for s in samples] == [source_sample_key(shard.sources[0], i) for i in wanted]
        keys.extend(s["__key__"] for s in samples)
    assert len(keys) == len(set(keys)) == 4 + 6 + 9
    assert manifest.stats["num_documents"] == 1 + 4 + 1 and manifest.stats["num_files"] == 3
    assert [(os.path.basename(e.path), e.reason) for e in manifest.skipped] == [
        ("short.txt", "shorter than one sample: 11 ids, shards.seq_len + 1 = 33 needed")]
    assert verify_dataset(output) == []
    with pytest.raises(UserError, match=r"--strict: .*short.txt: shorter than one sample"):
        prepare_token_ids(cfg, progress=False, strict=True)


def test_vocabulary_beyond_uint16_is_stored_as_int32(ray_session, tmp_path):
    ids = markov_ids(200, seed=2) * 547
    ids[7] = 69_999
    np.save(tmp_path / "big.npy", ids)
    cfg = PrepareConfig(
        source=SourceConfig(kind="tokens", paths=[str(tmp_path / "big.npy")]),
        shards=ShardsConfig(output=str(tmp_path / "dataset"), name="big", seq_len=16, val_fraction=0.2),
    )
    manifest = prepare_token_ids(cfg, progress=False).manifest
    assert manifest.vocab_size == 70_000 and manifest.fields["tokens.npy"]["dtype"] == "int32"
    samples = read_dataset(manifest, cfg.shards.output)
    assert [s["tokens"].tolist() for s in samples["train"] + samples["val"]] == windows(ids.tolist(), 16)
    assert samples["train"][0]["tokens"].dtype == np.int32 and verify_dataset(cfg.shards.output) == []


BAD_INPUTS = {  # file -> (content, what the one line must say)
    "word.txt": (b"1 2 3\n4 x5 6\n", ["word.txt", "token 'x5' at index 4 is not an integer id"]),
    "float.txt": (b"1 2.5 3", ["float.txt", "token '2.5' at index 1 is not an integer id"]),
    "negative.txt": (b"1 2\n-3 4", ["negative.txt", "negative id -3 at index 2"]),
    "too_large.txt": (b"1 2 128 3", ["too_large.txt", "id 128 at index 2 is not below token_ids.vocab_size 128"]),
    "empty.txt": (b" \n\t\n", ["empty.txt", "empty: no token ids"]),
    "float.npy": (npy_bytes(np.array([1.0, 2.0], dtype=np.float32)), ["float.npy", "a float array (float32)"]),
    "negative.npy": (npy_bytes(np.array([[1, 2, 3], [4, -5, 6]])), ["negative.npy", "negative id -5 at row 1, column 1"]),
    "too_large.npy": (npy_bytes(np.array([5, 300], dtype=np.uint16)), ["too_large.npy", "id 300 at index 1 is not below"]),
    "empty.npy": (npy_bytes(np.zeros(0, dtype=np.int64)), ["empty.npy", "empty: no token ids"]),
    "garbage.npy": (b"not an array", ["garbage.npy", "not a .npy file"]),
    "tokens.csv": (b"1,2,3", ["tokens.csv", "not a token file"]),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_loses_nothing(txt_dataset, tmp_path, capsys, name):
    cfg, _, _, source = txt_dataset
    corpus, output = tmp_path / "corpus", str(tmp_path / "dataset")
    corpus.mkdir()
    shutil.copy(source, corpus / "all_tokens.txt")
    (corpus / name).write_bytes(BAD_INPUTS[name][0])
    shutil.copytree(cfg.shards.output, output)  # a finished dataset the failed run must leave alone
    before = file_ids(output)
    code, out, err = run_cli(capsys, "prepare", str(PREPARE_YAML), "--quiet", "--set", f"source.paths=['{corpus}/*']",
                             "--set", f"shards.output={output}")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("tokfleet: error: ") and "Traceback" not in err
    assert all(part in err for part in BAD_INPUTS[name][1]), err
    assert file_ids(output) == before


def test_bad_source_and_options_exit_2(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("1 2 3")
    for overrides, message in (
        ([f"source.paths=['{tmp_path}/none/*.txt']"], "no files match"),
        ([f"source.paths=['{tmp_path}/a.txt']", "token_ids.separator_id=128"], "token_ids.separator_id must be >= 0 and below"),
        ([f"source.paths=['{tmp_path}/a.txt']", "token_ids.vocab_size=-1"], "token_ids.vocab_size must be in [0, 2**31]"),
        ([f"source.paths=['{tmp_path}/a.txt']", "source.hf_dataset=imdb"], "source.hf_dataset: only source.kind text"),
        ([f"source.paths=['{tmp_path}/a.txt']"], "no file holds one sample of shards.seq_len + 1 = 65 ids (1 of 1 files too short)"),
    ):
        argv = [arg for override in overrides for arg in ("--set", override)]
        code, _, err = run_cli(capsys, "prepare", str(PREPARE_YAML), "--quiet", "--set", f"shards.output={tmp_path}/out", *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_train_generate_with_prompt_tokens(ray_session, tmp_path, capsys):
    """The CLI end to end on the example configs: ids -> shards -> a tiny GPT -> ids out, no text tokenizer anywhere."""
    write_txt(tmp_path / "all_tokens.txt", markov_ids(3050))
    dataset, run_dir = str(tmp_path / "dataset"), tmp_path / "run"
    code, out, err = run_cli(capsys, "prepare", str(PREPARE_YAML), "--quiet", "--set", f"source.paths=['{tmp_path}/*.txt']",
                             "--set", f"shards.output={dataset}")
    assert code == 0, err
    assert f"dataset {dataset}: 1 files -> 38 train + 9 val sequences of 65 tokens in 2 shards, vocab 128" in out
    overrides = {"data.dataset": dataset, "run.output_dir": run_dir, "run.max_steps": 4, "run.device": "cpu",
                 "model.args": "{n_layer: 1, n_head: 2, n_kv_head: 2, n_embd: 32}", "logging.wandb": "false",
                 "logging.progress": "false", "checkpoint.every_steps": 0, "eval.every_steps": 0, "engine.peak_flops": "1e11"}
    code, _, err = run_cli(capsys, "train", str(TRAIN_YAML), *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")])
    assert code == 0, err
    assert (run_dir / "checkpoints" / "latest").exists() and not (run_dir / "tokenizer").exists()

    generate = ["generate", "--checkpoint", str(run_dir), "--device", "cpu"]
    code, out, err = run_cli(capsys, *generate, "--prompt-tokens", " ".join(map(str, PROMPT)), "--num-samples", "3",
                             "--max-new-tokens", "10")
    assert code == 0, err
    rows = [list(map(int, line.split())) for line in out.splitlines()]
    assert len(rows) == 3 and all(len(row) == 15 and row[:5] == PROMPT and max(row) < 128 and min(row) >= 0 for row in rows)
    for args, message in (
        (["--prompt-tokens", "80 128"], "--prompt-tokens: id 128 (index 1) is outside the model's vocabulary [0, 128)"),
        (["--prompt-tokens", "80 -1"], "outside the model's vocabulary"),
        (["--prompt-tokens", "80 8.5"], "--prompt-tokens: '8.5' (index 1) is not an integer token id"),
        (["--prompt-tokens", " "], "--prompt-tokens: no ids given"),
        (["--prompt-tokens", " ".join(["1"] * 64)], "--prompt-tokens is 64 tokens: no room left in the model's context of 64"),
        (["--prompt", "x", "--prompt-tokens", "80"], "--prompt (text) and --prompt-tokens (ids) exclude each other"),
        (["--prompt", "x"], "no tokenizer folder next to the checkpoint's run dir (a model trained on token ids continues "
                            "--prompt-tokens)"),
    ):
        code, out, err = run_cli(capsys, *generate, *args)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["dataset"] == dataset
