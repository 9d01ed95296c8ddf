"""The documents of a text corpus, in a stable order: files matched by glob patterns, or rows of a
`datasets` dataset.

The order matters: documents are grouped into shards in this order, so the same corpus always
gives the same shards, shard indexes and sample keys. Files are listed (path + size) without
being read; their text is read where it is tokenized (`read_document`), which records
undecodable or empty inputs as skipped rather than failing the run.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Any, Iterator

from core.config import SourceConfig
from core.errors import UserError, missing_optional_module
from sharding import storage
from sharding.manifest import SkippedInput

STDLIB_PLACEHOLDER = "{stdlib}"


@dataclass(frozen=True)
class Document:
    """One input: a file (read on demand) or a dataset row (text held inline)."""

    source: str  # absolute path / URL of a file, or `{dataset}#{split}/{row}`
    num_bytes: int
    version: str = ""  # changes when the file changes (its mtime); part of the shard build id
    text: str | None = None  # inline text of a dataset row; None for files


def expand_pattern(pattern: str) -> str:
    return pattern.replace(STDLIB_PLACEHOLDER, sysconfig.get_paths()["stdlib"])


def _glob_files(pattern: str, storage_options: dict[str, Any] | None = None) -> list[Document]:
    if storage.is_local(pattern):
        documents = []
        for path in glob.glob(storage.local_path(pattern), recursive=True):
            if os.path.isfile(path):
                stat = os.stat(path)
                documents.append(Document(os.path.abspath(path), stat.st_size, str(stat.st_mtime_ns)))
        return documents
    documents = []
    for url, info in storage.glob(pattern, storage_options):
        version = str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")
        documents.append(Document(url, int(info.get("size") or 0), version))
    return documents


def list_files(cfg: SourceConfig) -> list[Document]:
    """Files matching `cfg.paths` minus `cfg.exclude`, sorted by path, at most `cfg.max_files`."""
    patterns = [expand_pattern(p) for p in cfg.paths]
    excludes = [expand_pattern(p) for p in cfg.exclude]
    by_source = {}
    for pattern in patterns:
        for document in _glob_files(pattern, cfg.storage_options):
            by_source[document.source] = document
    documents = [
        document for source, document in sorted(by_source.items())
        if not any(fnmatch.fnmatch(source, exclude) for exclude in excludes)
    ]
    if cfg.max_files > 0:
        documents = documents[: cfg.max_files]
    if not documents:
        excluded = f" (minus exclude {excludes})" if excludes else ""
        raise UserError(f"source.paths: no files match {patterns}{excluded}")
    return documents


def _load_hf_dataset(cfg: SourceConfig) -> Any:
    import datasets

    path = cfg.hf_dataset
    try:
        is_saved = storage.is_local(path) and any(
            os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")
        )
        if is_saved:
            dataset = datasets.load_from_disk(path)
            if isinstance(dataset, datasets.DatasetDict):
                if cfg.hf_split not in dataset:
                    raise UserError(f"source.hf_split: {path} has no split {cfg.hf_split!r} (has {sorted(dataset)})")
                dataset = dataset[cfg.hf_split]
            return dataset
        return datasets.load_dataset(path, cfg.hf_config, split=cfg.hf_split)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any loading failure is a bad source, reported in one line
        if missing_optional_module(error):  # e.g. s3fs: the command names the package and its extra
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"source.hf_dataset: cannot load {path!r} (split {cfg.hf_split!r}): {first_line}") from None


def list_dataset_rows(cfg: SourceConfig) -> list[Document]:
    """Rows of `cfg.hf_dataset` as documents with inline text, in row order."""
    dataset = _load_hf_dataset(cfg)
    if cfg.hf_text_field not in dataset.column_names:
        raise UserError(f"source.hf_text_field: {cfg.hf_dataset!r} has no column {cfg.hf_text_field!r} (columns: {dataset.column_names})")
    num_rows = len(dataset) if cfg.max_files <= 0 else min(len(dataset), cfg.max_files)
    prefix = f"{cfg.hf_dataset}#{cfg.hf_split}"
    documents = []
    for row, text in enumerate(dataset.select_columns([cfg.hf_text_field])[:num_rows][cfg.hf_text_field]):
        text = text if isinstance(text, str) else ""
        documents.append(Document(f"{prefix}/{row}", len(text.encode("utf-8")), text=text))
    if not documents:
        raise UserError(f"source.hf_dataset: {cfg.hf_dataset!r} split {cfg.hf_split!r} has no rows")
    return documents


def list_documents(cfg: SourceConfig) -> list[Document]:
    """All documents of the corpus in their stable order; UserError when there are none."""
    if cfg.hf_dataset:
        return list_dataset_rows(cfg)
    if not cfg.paths:
        raise UserError("source: set either source.paths (glob patterns) or source.hf_dataset")
    return list_files(cfg)


def read_document(document: Document, storage_options: dict[str, Any] | None = None) -> str | SkippedInput:
    """The document's text, or why it is skipped (not UTF-8, unreadable, empty); `storage_options`: source.storage_options."""
    if document.text is not None:
        text = document.text
    else:
        try:
            data = storage.read_bytes(document.source, storage_options)
        except OSError as error:
            return SkippedInput(document.source, f"unreadable: {error.strerror or error}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            return SkippedInput(document.source, f"not UTF-8: byte {error.object[error.start]:#04x} at offset {error.start}")
    if not text.strip():
        return SkippedInput(document.source, "empty")
    return text


def iter_texts(documents: list[Document], storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Texts of the readable documents (for tokenizer training)."""
    for document in documents:
        text = read_document(document, storage_options)
        if isinstance(text, str):
            yield text


def corpus_fingerprint(documents: list[Document]) -> str:
    """sha256 naming this exact list of documents (sources, sizes, versions; inline texts)."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(json.dumps([document.source, document.num_bytes, document.version]).encode())
        if document.text is not None:
            digest.update(hashlib.sha256(document.text.encode("utf-8")).digest())
    return digest.hexdigest()
