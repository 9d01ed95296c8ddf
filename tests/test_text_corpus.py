"""Text corpus listing (globs, `datasets`) and the BPE tokenizer."""

from __future__ import annotations

import os
import sysconfig

import pytest

from core.config import SourceConfig, TokenizerConfig
from core.errors import UserError
from sharding.manifest import SkippedInput
from sharding.text_corpus import corpus_fingerprint, iter_texts, list_documents, read_document
from sharding.text_tokenizer import EOS_TOKEN, ensure_tokenizer, load_pretrained, load_tokenizer, train_bpe

STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    files = {
        "a.py": "def a():\n    return 1\n",
        "b/c.py": "x = 'ünïcode ✓'\n",
        "b/deep/d.py": "class D:\n    pass\n",
        "b/skip_me.py": "nothing\n",
        "notes.txt": "not python\n",
        "latin1.py": None,
        "empty.py": "",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.write_bytes(b"caf\xe9 = 1\n" if text is None else text.encode("utf-8"))
    return tmp_path


def test_glob_exclude_sort_and_cap(corpus):
    cfg = SourceConfig(paths=[f"{corpus}/**/*.py", f"{corpus}/a.py"], exclude=["*/skip_*"])
    sources = [os.path.relpath(d.source, corpus) for d in list_documents(cfg)]
    assert sources == ["a.py", "b/c.py", "b/deep/d.py", "empty.py", "latin1.py"]
    capped = list_documents(SourceConfig(paths=[f"{corpus}/**/*.py"], max_files=2))
    assert [os.path.relpath(d.source, corpus) for d in capped] == ["a.py", "b/c.py"]
    assert list_documents(cfg)[0].num_bytes == len("def a():\n    return 1\n")


def test_undecodable_and_empty_files_are_skipped_with_a_reason(corpus):
    documents = list_documents(SourceConfig(paths=[f"{corpus}/*.py"]))
    results = {os.path.basename(d.source): read_document(d) for d in documents}
    assert results["a.py"] == "def a():\n    return 1\n"
    assert isinstance(results["latin1.py"], SkippedInput) and "not UTF-8" in results["latin1.py"].reason
    assert isinstance(results["empty.py"], SkippedInput) and results["empty.py"].reason == "empty"
    assert list(iter_texts(documents)) == ["def a():\n    return 1\n"]


def test_fsspec_urls_are_globbed_and_read():
    from sharding import storage

    for name, data in {"a.py": b"x = 1\n", "sub/b.py": b"y = 2\n", "c.txt": b"z"}.items():
        storage.write_bytes_atomic(f"memory://corpus-test/{name}", data)
    documents = list_documents(SourceConfig(paths=["memory://corpus-test/**/*.py"]))
    assert [d.source.split("corpus-test/")[1] for d in documents] == ["a.py", "sub/b.py"]
    assert all(d.source.startswith("memory://") for d in documents)
    assert [read_document(d) for d in documents] == ["x = 1\n", "y = 2\n"]


def test_stdlib_placeholder_expands():
    documents = list_documents(SourceConfig(paths=["{stdlib}/json/*.py"]))
    assert {os.path.basename(d.source) for d in documents} >= {"__init__.py", "decoder.py", "encoder.py"}
    assert all(d.source.startswith(STDLIB) for d in documents)


def test_no_match_names_the_patterns(tmp_path):
    with pytest.raises(UserError, match=r"no files match .*nothing_here"):
        list_documents(SourceConfig(paths=[f"{tmp_path}/nothing_here/*.py"]))
    with pytest.raises(UserError, match="source.paths"):
        list_documents(SourceConfig(paths=[]))


def test_saved_datasets_dataset_is_read_in_row_order(tmp_path):
    import datasets

    texts = ["first document", "", "third one ✓"]
    datasets.Dataset.from_dict({"text": texts, "id": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    documents = list_documents(SourceConfig(hf_dataset=str(tmp_path / "ds")))
    assert [d.text for d in documents] == texts
    assert documents[2].source.endswith("#train/2") and documents[2].num_bytes == len("third one ✓".encode())
    assert isinstance(read_document(documents[1]), SkippedInput)
    with pytest.raises(UserError, match="hf_text_field"):
        list_documents(SourceConfig(hf_dataset=str(tmp_path / "ds"), hf_text_field="body"))
    with pytest.raises(UserError, match="cannot load"):
        list_documents(SourceConfig(hf_dataset=str(tmp_path / "missing")))


def test_fingerprint_follows_the_documents(corpus):
    cfg = SourceConfig(paths=[f"{corpus}/*.py"])
    before = corpus_fingerprint(list_documents(cfg))
    assert corpus_fingerprint(list_documents(cfg)) == before
    (corpus / "a.py").write_text("def a():\n    return 22\n")
    assert corpus_fingerprint(list_documents(cfg)) != before


SAMPLE_TEXTS = [
    "def f(x):\n    return x * 2  # double\n",
    "class Thing:\n\tname = 'ünïcode ✓ 日本'\n\n\n",
    "   leading spaces and trailing  \r\n",
]


def test_bpe_round_trips_text_and_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    texts = [open(os.path.join(STDLIB, name), encoding="utf-8").read() for name in ("json/decoder.py", "json/encoder.py", "textwrap.py")]
    tokenizer = train_bpe(texts, vocab_size=600, min_frequency=2)
    assert len(tokenizer) == 600 and tokenizer.eos_token == EOS_TOKEN
    for text in SAMPLE_TEXTS + texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded.encode(SAMPLE_TEXTS[0]) == tokenizer.encode(SAMPLE_TEXTS[0])
    reloaded, eos = load_tokenizer(str(tmp_path / "tok"))
    assert eos == reloaded.convert_tokens_to_ids(EOS_TOKEN) == 0


def test_ensure_tokenizer_reuses_trains_and_copies(tmp_path):
    texts = SAMPLE_TEXTS * 3
    cfg = TokenizerConfig(vocab_size=300)
    first, provenance = ensure_tokenizer(cfg, iter(texts), "corpus-a", str(tmp_path / "out"))
    assert provenance["kind"] == "bpe" and provenance["path"] == "tokenizer" and provenance["eos_id"] == 0
    _, again = ensure_tokenizer(cfg, iter(()), "corpus-a", str(tmp_path / "out"))  # no texts needed: reused
    assert again == provenance
    with pytest.raises(UserError, match="no readable text"):
        ensure_tokenizer(cfg, iter(()), "corpus-b", str(tmp_path / "out"))
    # a dataset root is accepted by load_tokenizer too
    tokenizer, eos = load_tokenizer(str(tmp_path / "out"))
    assert tokenizer.decode(tokenizer.encode(SAMPLE_TEXTS[1])) == SAMPLE_TEXTS[1] and eos == 0

    copied, copy_provenance = ensure_tokenizer(
        TokenizerConfig(kind="pretrained", path=str(tmp_path / "out" / "tokenizer")), iter(()), "", str(tmp_path / "copy")
    )
    assert copy_provenance["sha256"] == provenance["sha256"]
    assert copied.encode(SAMPLE_TEXTS[0]) == first.encode(SAMPLE_TEXTS[0])


def test_a_folder_that_is_no_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "README.md").write_text("not a tokenizer")
    with pytest.raises(UserError, match="not an HF tokenizer folder"):
        load_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="not a folder"):
        load_pretrained(str(tmp_path / "nope"))
