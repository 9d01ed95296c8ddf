"""`tokfleet prepare` for integer token data (source.kind tokens): id files -> packed token shards + manifest, on Ray Data.

For corpora that already are token ids (a VQ-VAE's codes of price series, another tokenizer's
output): no text tokenizer runs, and the ids are packed exactly as the text pipeline packs its
BPE ids (same `tokens.npy` samples, dtype and manifest fields), so `tokfleet train` with a token
model (gpt) reads the shards unchanged. Inputs (source.paths): `.txt` files of whitespace-separated
non-negative integer ids (one document each) and integer `.npy` arrays (1-D: one document; 2-D:
one document per row).

    files (sorted) -> the driver reads each once: every id must be an integer >= 0 and below
      token_ids.vocab_size (0: the vocabulary is the largest id + 1); a bad file is an error of one
      line naming it and where, before anything is written
    -> each file's documents, each followed by token_ids.separator_id when set, form the file's
      stream, packed on its own into samples of seq_len + 1 ids at stride seq_len (as
      sharding.pretokenize_text.pack_tokens packs: every id but the first is a target exactly
      once; the tail is dropped; a file shorter than one sample is skipped)
    -> split: the LAST val_fraction of each file's samples are val (at least one when it has two,
      never all: the count val_group_indexes gives shards). One file gives both splits, every file
      is held out at its end (for a time series, val comes after train), and since consecutive
      samples share only their boundary id, no val target is ever a train target
    -> files in groups of ~shards.source_bytes_per_shard; each group makes one train shard and one
      val shard, each built by a Ray task (sharding.shard_build: tar, then sidecar; a re-run
      builds only missing or stale shards, and starts Ray only then)
    -> manifest.json last (kind "token_ids").

Sample keys are `source_sample_key(file, sample index in that file)`: unique, and stable across
re-runs and regroupings. The driver reads every input to check it and to count its samples, and
the Ray tasks read theirs again to pack them: token files are small next to the text or signals
they came from, and bad input fails before Ray starts.
"""

from __future__ import annotations

import codecs
import functools
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.config import PrepareConfig
from core.errors import UserError
from sharding import storage
from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord, SkippedInput
from sharding.pretokenize_text import TOKENS_FIELD, unigram_entropy, pack_tokens
from sharding.shard_build import (
    BuildReport,
    build_id,
    build_missing_shards,
    claim_output,
    check_shard_name,
    created_by,
    finish_manifest,
    first_line,
    group_documents,
    shard_sidecar,
    sidecar_name,
    val_group_indexes,
)
from sharding.shards import shard_name, source_sample_key, token_dtype, write_shard
from sharding.text_corpus import Document, corpus_fingerprint, list_files

log = logging.getLogger(__name__)

PROGRAM = "tokfleet prepare (sharding.token_ids)"
MANIFEST_KIND = "token_ids"
READER_VERSION = 1  # bump when the same inputs and options give other samples: every shard is rebuilt
ID_LIMIT = 2**31  # ids are stored as int32 when they do not fit uint16

# .txt: the fast path checks the whole file with one regex; the others find what to report
_NOT_ID_BYTE = re.compile(rb"[^0-9\s]")
_BAD_WORD = re.compile(rb"\S*[^0-9\s]\S*")
_NEGATIVE = re.compile(rb"-[0-9]+")
_TOO_MANY_DIGITS = re.compile(rb"[0-9]{11,}")  # above ID_LIMIT (leading zeros aside), and int64 parsing could overflow


# ------------------------------------------------------------------ reading one input


def _where(num_documents: int, document: int, position: int) -> str:
    """An id's place in a file: `index 17`, or `row 3, column 5` in a file of several documents (a 2-D .npy)."""
    return f"index {position}" if num_documents == 1 else f"row {document}, column {position}"


def _text_ids(source: str, data: bytes) -> np.ndarray:
    """The ids of a .txt input: (num_ids,) int64."""
    data = data.removeprefix(codecs.BOM_UTF8)
    if _NOT_ID_BYTE.search(data):
        bad = _BAD_WORD.search(data)
        word, position = bad.group(), len(data[: bad.start()].split())
        if _NEGATIVE.fullmatch(word):
            raise UserError(f"{source}: negative id {word.decode()} at index {position}: token ids must be >= 0")
        raise UserError(f"{source}: token {word.decode('utf-8', 'replace')!r} at index {position} is not an integer id")
    too_long = _TOO_MANY_DIGITS.search(data)
    if too_long:
        raise UserError(f"{source}: id {too_long.group().decode()} at index {len(data[: too_long.start()].split())} "
                        f"is too large (ids must be below 2**31)")
    ids = np.array(data.split(), dtype=np.int64)
    too_large = np.flatnonzero(ids >= ID_LIMIT)
    if len(too_large):
        raise UserError(f"{source}: id {ids[too_large[0]]} at index {too_large[0]} is too large (ids must be below 2**31)")
    return ids


def _npy_ids(source: str, data: bytes) -> np.ndarray:
    """The array of a .npy input: (num_ids,) or (num_documents, num_ids) int64."""
    if not data.startswith(b"\x93NUMPY"):
        raise UserError(f"{source}: not a .npy file (no NumPy header)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"{source}: not a readable .npy file ({first_line(error)})") from None
    if array.dtype.kind in "fc":
        raise UserError(f"{source}: a float array ({array.dtype}): token ids must be integers")
    if array.dtype.kind not in "iu":
        raise UserError(f"{source}: a {array.dtype} array: token ids must be integers")
    if array.ndim not in (1, 2):
        raise UserError(f"{source}: shape {array.shape}: expected 1-D (one document) or 2-D (one document per row)")
    if array.size and array.max() >= ID_LIMIT:
        raise UserError(f"{source}: id {array.max()} is too large (ids must be below 2**31)")
    return array.astype(np.int64)


def read_documents(source: str, data: bytes) -> list[np.ndarray]:
    """The documents of input `source` (its bytes `data`): int64 id arrays, each non-empty and >= 0.

    Content that is not token ids is a UserError naming the file and, for a bad id, where it is.
    """
    name = source.rstrip("/").rsplit("/", 1)[-1].lower()
    if name.endswith(".txt"):
        documents = [_text_ids(source, data)]
    elif name.endswith(".npy"):
        array = _npy_ids(source, data)
        documents = [array] if array.ndim == 1 else list(array)
    else:
        raise UserError(f"{source}: not a token file: source.kind tokens reads .txt (whitespace-separated ids) "
                        f"and .npy (integer arrays); leave others out with source.exclude")
    if not documents or any(len(document) == 0 for document in documents):
        raise UserError(f"{source}: empty: no token ids")
    for index, document in enumerate(documents):
        negative = np.flatnonzero(document < 0)
        if len(negative):
            position = int(negative[0])
            raise UserError(f"{source}: negative id {document[position]} at {_where(len(documents), index, position)}: "
                            f"token ids must be >= 0")
    return documents


def check_vocabulary(source: str, documents: list[np.ndarray], vocab_size: int) -> None:
    """UserError naming the first id of `documents` that is >= `vocab_size`."""
    for index, document in enumerate(documents):
        outside = np.flatnonzero(document >= vocab_size)
        if len(outside):
            position = int(outside[0])
            raise UserError(f"{source}: id {document[position]} at {_where(len(documents), index, position)} "
                            f"is not below token_ids.vocab_size {vocab_size}")


def file_stream(documents: list[np.ndarray], separator_id: int | None, dtype: np.dtype) -> np.ndarray:
    """The file's documents one after another, each followed by `separator_id` when set: (num_stream_ids,)."""
    pieces = []
    for document in documents:
        pieces.append(document)
        if separator_id is not None:
            pieces.append(np.array([separator_id]))
    return np.concatenate(pieces).astype(dtype)


def num_val_samples(num_samples: int, val_fraction: float) -> int:
    """How many of a file's last samples are val: the count of val shards the other kinds hold out."""
    return len(val_group_indexes(num_samples, val_fraction))


# ------------------------------------------------------------------ planning (driver)


@dataclass
class ScannedFile:
    """What the driver learnt from reading one input."""

    document: Document
    num_documents: int
    num_ids: int
    num_stream_ids: int  # with separators
    max_id: int
    num_samples: int


def scan_file(document: Document, cfg: PrepareConfig) -> ScannedFile:
    source = document.source
    try:
        data = storage.read_bytes(source, cfg.source.storage_options)
    except OSError as error:
        raise UserError(f"{source}: unreadable: {error.strerror or error}") from None
    documents = read_documents(source, data)
    if cfg.token_ids.vocab_size:
        check_vocabulary(source, documents, cfg.token_ids.vocab_size)
    stream = file_stream(documents, cfg.token_ids.separator_id, np.dtype(np.int64))
    return ScannedFile(document, len(documents), sum(len(d) for d in documents), len(stream), int(stream.max()),
                       len(pack_tokens(stream, cfg.shards.seq_len)))


@dataclass
class TokenShardSpec:
    """Everything a Ray task needs to build one shard (JSON-serializable)."""

    index: int
    shard: str
    url: str
    sidecar_url: str
    build_id: str
    split: str
    seq_len: int
    dtype: str
    separator_id: int | None
    pieces: list[dict[str, Any]]  # {"source", "first", "count"}: samples [first, first + count) of one file


def _shard_specs(cfg: PrepareConfig, files: list[ScannedFile], dtype: str) -> list[TokenShardSpec]:
    """A train shard and (when it holds samples) a val shard per group of files, in file order."""
    shards_cfg, separator_id = cfg.shards, cfg.token_ids.separator_id
    by_source = {scanned.document.source: scanned for scanned in files}
    specs: list[TokenShardSpec] = []
    for group in group_documents([scanned.document for scanned in files], shards_cfg.source_bytes_per_shard):
        pieces: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
        for document in group:
            num_samples = by_source[document.source].num_samples
            num_val = num_val_samples(num_samples, shards_cfg.val_fraction)
            pieces["train"].append({"source": document.source, "first": 0, "count": num_samples - num_val})
            if num_val:
                pieces["val"].append({"source": document.source, "first": num_samples - num_val, "count": num_val})
        for split, split_pieces in pieces.items():
            if not split_pieces:
                continue
            index = len(specs)
            name = shard_name(shards_cfg.name, index)
            identity = {
                "format_version": FORMAT_VERSION,
                "reader_version": READER_VERSION,
                "name": shards_cfg.name,
                "index": index,
                "split": split,
                "seq_len": shards_cfg.seq_len,
                "dtype": dtype,
                "separator_id": separator_id,
                "pieces": split_pieces,
                "documents": corpus_fingerprint(group),
            }
            specs.append(TokenShardSpec(
                index=index,
                shard=name,
                url=storage.join(shards_cfg.output, name),
                sidecar_url=storage.join(shards_cfg.output, sidecar_name(name)),
                build_id=build_id(identity),
                split=split,
                seq_len=shards_cfg.seq_len,
                dtype=dtype,
                separator_id=separator_id,
                pieces=split_pieces,
            ))
    return specs


# ------------------------------------------------------------------ building (Ray task)


def build_token_shard(fields: dict[str, Any], storage_options: dict[str, Any] | None = None,
                      source_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, pack and write one shard, then its sidecar; returns the sidecar.

    `storage_options` are the output's (shards.storage_options), `source_options` the inputs' (source.storage_options).
    """
    spec = TokenShardSpec(**fields)
    dtype, seq_len = np.dtype(spec.dtype), spec.seq_len
    samples, targets = [], []
    for piece in spec.pieces:
        source, first, count = piece["source"], piece["first"], piece["count"]
        stream = file_stream(read_documents(source, storage.read_bytes(source, source_options)), spec.separator_id, dtype)
        windows = pack_tokens(stream, seq_len)[first : first + count]
        if len(windows) != count:
            raise UserError(f"{source}: changed while being prepared (run tokfleet prepare again)")
        samples.extend({"__key__": source_sample_key(source, first + j), TOKENS_FIELD: np.ascontiguousarray(window)}
                       for j, window in enumerate(windows))
        targets.append(stream[first * seq_len + 1 : (first + count) * seq_len + 1])  # each id predicted, once
    written = write_shard(spec.url, samples, storage_options)
    counts = np.bincount(np.concatenate(targets).astype(np.int64))
    ids = np.flatnonzero(counts)
    sidecar = shard_sidecar(
        spec, written,
        split=spec.split,
        sources=[piece["source"] for piece in spec.pieces],
        samples_per_source=[piece["count"] for piece in spec.pieces],
        token_counts={"ids": ids.tolist(), "counts": counts[ids].tolist()},
    )
    storage.write_text_atomic(spec.sidecar_url, json.dumps(sidecar, separators=(",", ":")), storage_options)
    return sidecar


# ------------------------------------------------------------------- driver


class TokenIdsReport(BuildReport):
    def contents(self) -> str:
        manifest = self.manifest
        train, val, num_bytes = self.totals()
        return (f"dataset {self.output}: {manifest.stats['num_files']} files -> {train} train + {val} val sequences of "
                f"{manifest.seq_len + 1} tokens in {len(manifest.shards)} shards, vocab {manifest.vocab_size}, "
                f"{num_bytes / 1e6:.1f} MB, {len(manifest.skipped)} inputs skipped")


def prepare_token_ids(cfg: PrepareConfig, progress: bool = True, strict: bool = False, overwrite: bool = False) -> TokenIdsReport:
    """Build (or complete) the token-id dataset of `cfg` at `cfg.shards.output`.

    `strict`: a file shorter than one sample is an error (UserError) instead of a skipped input.
    `overwrite`: a dataset made there with other settings is moved aside (else: UserError).
    """
    shards_cfg, options = cfg.shards, cfg.token_ids
    output, storage_options = shards_cfg.output, shards_cfg.storage_options
    check_shard_name(shards_cfg.name)
    if cfg.source.hf_dataset:
        raise UserError("source.hf_dataset: only source.kind text reads datasets; tokens reads .txt / .npy files from source.paths")
    if not cfg.source.paths:
        raise UserError("source.paths: list the token files to read (glob patterns of .txt / .npy files)")
    if shards_cfg.source_bytes_per_shard < 1:
        raise UserError(f"shards.source_bytes_per_shard must be >= 1, got {shards_cfg.source_bytes_per_shard}")

    files = list_files(cfg.source)
    scanned = [scan_file(document, cfg) for document in files]  # bad input stops here: nothing is written yet
    vocab_size = options.vocab_size or max(s.max_id for s in scanned) + 1
    dtype = token_dtype(vocab_size).name
    usable = [s for s in scanned if s.num_samples > 0]
    skipped = [SkippedInput(s.document.source, f"shorter than one sample: {s.num_stream_ids} ids, "
                                               f"shards.seq_len + 1 = {shards_cfg.seq_len + 1} needed")
               for s in scanned if s.num_samples == 0]
    log.info("%d token files, %d ids, vocab %d (%s)", len(files), sum(s.num_ids for s in scanned), vocab_size,
             "given" if options.vocab_size else "largest id + 1")

    claim_output(output, storage_options, created_by(cfg, PROGRAM), overwrite)
    specs = _shard_specs(cfg, usable, dtype)
    build = functools.partial(build_token_shard, storage_options=storage_options, source_options=cfg.source.storage_options)
    sidecars, built, build_seconds = build_missing_shards(specs, lambda _: build, cfg.ray, output=output, name=shards_cfg.name,
                                                          storage_options=storage_options, progress=progress, desc="pack token ids")

    manifest = _assemble_manifest(cfg, files, usable, skipped, specs, sidecars, vocab_size, dtype)
    if manifest.num_samples("train") == 0 and not (strict and manifest.skipped):
        raise UserError(f"source.paths: no file holds one sample of shards.seq_len + 1 = {shards_cfg.seq_len + 1} ids "
                        f"({len(skipped)} of {len(files)} files too short)")
    finish_manifest(manifest, output, storage_options, strict=strict)
    return TokenIdsReport(manifest, output, "sequences", len(built), sum(s["num_samples"] for s in built),
                          sum(s["num_bytes"] for s in built), build_seconds)


def _assemble_manifest(
    cfg: PrepareConfig,
    files: list[Document],
    usable: list[ScannedFile],
    skipped: list[SkippedInput],
    specs: list[TokenShardSpec],
    sidecars: dict[int, dict[str, Any]],
    vocab_size: int,
    dtype: str,
) -> Manifest:
    seq_len, options = cfg.shards.seq_len, cfg.token_ids
    shards = [ShardRecord(spec.shard, spec.split, sidecars[spec.index]["num_samples"], sidecars[spec.index]["num_bytes"],
                          sidecars[spec.index]["sha256"], sidecars[spec.index]["sources"]) for spec in specs]
    num_samples = {split: sum(s.num_samples for s in shards if s.split == split) for split in ("train", "val")}
    train_sidecars = [sidecars[spec.index] for spec in specs if spec.split == "train"]
    stats = {
        "num_files": len(usable),
        "num_documents": sum(s.num_documents for s in usable),
        "num_samples": num_samples,
        "num_tokens": {split: count * seq_len for split, count in num_samples.items()},
        "num_stream_tokens": sum(s.num_stream_ids for s in usable),
        "unigram_entropy_nats": round(unigram_entropy(train_sidecars, vocab_size), 6),
    }
    provenance = {
        "kind": "given",
        "note": "token ids read as given from the inputs: no text tokenizer",
        "vocab_size": vocab_size,
        "vocab_size_from": "token_ids.vocab_size" if options.vocab_size else "largest id in the inputs + 1",
        "separator_id": options.separator_id,
    }
    return Manifest(
        format_version=FORMAT_VERSION,
        name=cfg.shards.name,
        kind=MANIFEST_KIND,
        seq_len=seq_len,
        vocab_size=vocab_size,
        fields={TOKENS_FIELD: {"dtype": dtype, "shape": [seq_len + 1]}},
        shards=shards,
        tokenizer=provenance,
        sources={"num_files": len(files), "num_bytes": sum(f.num_bytes for f in files)},
        skipped=sorted(skipped, key=lambda entry: entry.path),
        stats=stats,
        created_by=created_by(cfg, PROGRAM),
    )
