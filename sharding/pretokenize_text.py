"""`tokfleet prepare` for text: corpus -> BPE -> packed token shards + manifest, on Ray Data.

    documents (sorted) -> groups of ~source_bytes_per_shard -> one Ray task per group:
      read + tokenize the group's documents, join them with EOS, pack the token stream into
      samples of seq_len + 1 tokens (stride seq_len: every token is a target exactly once,
      the tail is dropped), write `{name}-{index:06d}.tar` atomically, then its sidecar
      `{name}-{index:06d}.json` (stats + token histogram)
    -> the driver gathers the sidecars and writes manifest.json last.

Resumable and idempotent (sharding.shard_build): a shard is rebuilt only when its sidecar is
missing, was built from other inputs (the sidecar's build id covers sources, tokenizer, seq_len),
or the tar does not match the sidecar's size and sha256. A re-run with nothing to do rewrites
nothing. Sample keys `{name}-{index:06d}-{sample:06d}` are stable because groups are formed in
sorted source order; the manifest lists each shard's sources, so sample j of shard i
is tokens [j*seq_len, (j+1)*seq_len] of the EOS-joined stream of those sources.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.config import PrepareConfig
from core.errors import UserError
from sharding import storage
from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord, SkippedInput
from sharding.shard_build import (  # verify_dataset: re-exported, callers import it from here too
    build_id,
    build_missing_shards,
    claim_output,
    check_shard_name,
    created_by,
    finish_manifest,
    group_documents,
    shard_sidecar,
    sidecar_name,
    val_group_indexes,
    verify_dataset,  # noqa: F401
)
from sharding.shards import sample_key, shard_name, token_dtype, write_shard
from sharding.text_corpus import Document, corpus_fingerprint, iter_texts, list_documents, read_document
from sharding.text_tokenizer import ensure_tokenizer

log = logging.getLogger(__name__)

PROGRAM = "tokfleet prepare (sharding.pretokenize_text)"
TOKENS_FIELD = "tokens.npy"


# ------------------------------------------------------------------ planning


@dataclass
class ShardSpec:
    """Everything a Ray task needs to build one shard (JSON-serializable)."""

    index: int
    shard: str  # file name
    url: str
    sidecar_url: str
    build_id: str
    name: str
    seq_len: int
    dtype: str
    vocab_size: int
    eos_id: int
    documents: list[dict[str, Any]]  # Document fields


def _build_id(index: int, name: str, documents: list[Document], tokenizer_sha256: str, seq_len: int, dtype: str) -> str:
    """Names the inputs of one shard: same id -> same bytes."""
    identity = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "index": index,
        "tokenizer_sha256": tokenizer_sha256,
        "seq_len": seq_len,
        "dtype": dtype,
        "documents": corpus_fingerprint(documents),
    }
    return build_id(identity)


# ------------------------------------------------------------- building (Ray task)

_TOKENIZERS: dict[str, Any] = {}  # per worker process: parsed tokenizers by sha256 of their JSON


def _backend_tokenizer(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    digest = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if digest not in _TOKENIZERS:
        _TOKENIZERS[digest] = Tokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[digest]


def pack_tokens(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(num_samples, seq_len + 1) windows of `stream` at stride seq_len; the tail is dropped."""
    num_samples = max(0, (len(stream) - 1) // seq_len)
    if num_samples == 0:
        return np.zeros((0, seq_len + 1), dtype=stream.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
    return windows[::seq_len][:num_samples]


def _describe_sources(documents: list[Document], used: list[Document]) -> list[str]:
    """Files used, by path; dataset rows as one `{dataset}#{split}/{first}..{last}` range."""
    if documents and documents[0].text is not None:
        prefix, _, first = documents[0].source.rpartition("/")
        return [f"{prefix}/{first}..{documents[-1].source.rpartition('/')[2]}"]
    return [document.source for document in used]


def build_shard(spec: ShardSpec, tokenizer_json: str, storage_options: dict[str, Any] | None = None,
                source_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize, pack and write one shard, then its sidecar; returns the sidecar.

    `storage_options` are the output's (shards.storage_options), `source_options` the inputs' (source.storage_options).
    """
    tokenizer = _backend_tokenizer(tokenizer_json)
    documents = [Document(**fields) for fields in spec.documents]
    texts, used, skipped = [], [], []
    for document in documents:
        text = read_document(document, source_options)
        if isinstance(text, SkippedInput):
            skipped.append(asdict(text))
        else:
            texts.append(text)
            used.append(document)
    dtype = np.dtype(spec.dtype)
    pieces = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray(encoding.ids, dtype=dtype))
        pieces.append(np.array([spec.eos_id], dtype=dtype))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    samples = pack_tokens(stream, spec.seq_len)
    written = write_shard(
        spec.url,
        ({"__key__": sample_key(spec.name, spec.index, j), TOKENS_FIELD: np.ascontiguousarray(sample)} for j, sample in enumerate(samples)),
        storage_options,
    )
    targets = stream[1 : len(samples) * spec.seq_len + 1]  # every token that is predicted, once
    counts = np.bincount(targets.astype(np.int64), minlength=spec.vocab_size)
    ids = np.flatnonzero(counts)
    sidecar = shard_sidecar(
        spec, written,
        num_documents=len(used),
        num_stream_tokens=int(len(stream)),
        sources=_describe_sources(documents, used),
        skipped=skipped,
        token_counts={"ids": ids.tolist(), "counts": counts[ids].tolist()},
    )
    storage.write_text_atomic(spec.sidecar_url, json.dumps(sidecar, separators=(",", ":")), storage_options)
    return sidecar


def _build_from_fields(fields: dict[str, Any], *, tokenizer_json: str, storage_options: dict[str, Any] | None,
                       source_options: dict[str, Any] | None) -> dict[str, Any]:
    return build_shard(ShardSpec(**fields), tokenizer_json, storage_options, source_options)


# ------------------------------------------------------------------- driver


def unigram_entropy(sidecars: list[dict[str, Any]], vocab_size: int) -> float:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for sidecar in sidecars:
        np.add.at(counts, np.asarray(sidecar["token_counts"]["ids"], dtype=np.int64), sidecar["token_counts"]["counts"])
    total = counts.sum()
    if total == 0:
        return 0.0
    probabilities = counts[counts > 0] / total
    return float(-(probabilities * np.log(probabilities)).sum())


def _shard_specs(cfg: PrepareConfig, groups: list[list[Document]], provenance: dict[str, Any], vocab_size: int, dtype: str) -> list[ShardSpec]:
    shards_cfg = cfg.shards
    specs = []
    for index, group in enumerate(groups):
        name = shard_name(shards_cfg.name, index)
        specs.append(ShardSpec(
            index=index,
            shard=name,
            url=storage.join(shards_cfg.output, name),
            sidecar_url=storage.join(shards_cfg.output, sidecar_name(name)),
            build_id=_build_id(index, shards_cfg.name, group, provenance["sha256"], shards_cfg.seq_len, dtype),
            name=shards_cfg.name,
            seq_len=shards_cfg.seq_len,
            dtype=dtype,
            vocab_size=vocab_size,
            eos_id=int(provenance["eos_id"]),
            documents=[asdict(document) for document in group],
        ))
    return specs


def prepare_text(cfg: PrepareConfig, progress: bool = True, strict: bool = False, overwrite: bool = False) -> Manifest:
    """Build (or complete) the text token dataset of `cfg` at `cfg.shards.output`; its manifest.

    `strict`: an undecodable or empty input is an error (UserError) instead of a skipped input.
    `overwrite`: a dataset made there with other settings is moved aside (else: UserError).
    """
    shards_cfg = cfg.shards
    output, storage_options = shards_cfg.output, shards_cfg.storage_options
    check_shard_name(shards_cfg.name)
    if shards_cfg.source_bytes_per_shard < 1:
        raise UserError(f"shards.source_bytes_per_shard must be >= 1, got {shards_cfg.source_bytes_per_shard}")

    documents = list_documents(cfg.source)
    groups = group_documents(documents, shards_cfg.source_bytes_per_shard)
    val_groups = val_group_indexes(len(groups), shards_cfg.val_fraction)
    if shards_cfg.val_fraction > 0 and not val_groups:
        log.warning("one shard only: no val split (lower shards.source_bytes_per_shard to get one)")
    log.info("%d documents, %.1f MB, in %d groups", len(documents), sum(d.num_bytes for d in documents) / 1e6, len(groups))

    claim_output(output, storage_options, created_by(cfg, PROGRAM), overwrite)
    start = time.perf_counter()
    tokenizer, provenance = ensure_tokenizer(
        cfg.tokenizer, iter_texts(documents, cfg.source.storage_options), corpus_fingerprint(documents), output, storage_options,
        num_texts=len(documents),
    )
    log.info("tokenizer ready in %.1f s (vocab %d)", time.perf_counter() - start, provenance["vocab_size"])
    vocab_size = int(provenance["vocab_size"])
    dtype = token_dtype(vocab_size).name

    specs = _shard_specs(cfg, groups, provenance, vocab_size, dtype)
    build = functools.partial(_build_from_fields, tokenizer_json=tokenizer.backend_tokenizer.to_str(), storage_options=storage_options,
                              source_options=cfg.source.storage_options)
    sidecars, built, seconds = build_missing_shards(specs, lambda _: build, cfg.ray, output=output, name=shards_cfg.name,
                                                    storage_options=storage_options, progress=progress, desc="pretokenize")
    if built:
        log.info("pretokenized %d shards in %.1f s", len(built), seconds)

    manifest = _assemble_manifest(cfg, documents, specs, sidecars, val_groups, provenance, vocab_size, dtype)
    if manifest.num_samples("train") == 0:
        raise UserError(f"source: the corpus is too small to make one training sample of shards.seq_len={shards_cfg.seq_len} tokens")
    finish_manifest(manifest, output, storage_options, strict=strict)
    return manifest


def _assemble_manifest(
    cfg: PrepareConfig,
    documents: list[Document],
    specs: list[ShardSpec],
    sidecars: dict[int, dict[str, Any]],
    val_groups: set[int],
    provenance: dict[str, Any],
    vocab_size: int,
    dtype: str,
) -> Manifest:
    seq_len = cfg.shards.seq_len
    shards, skipped = [], []
    for spec in specs:
        sidecar = sidecars[spec.index]
        split = "val" if spec.index in val_groups else "train"
        shards.append(ShardRecord(spec.shard, split, sidecar["num_samples"], sidecar["num_bytes"], sidecar["sha256"], sidecar["sources"]))
        skipped.extend(SkippedInput(**entry) for entry in sidecar["skipped"])
    num_samples = {split: sum(s.num_samples for s in shards if s.split == split) for split in ("train", "val")}
    train_sidecars = [sidecars[spec.index] for spec in specs if spec.index not in val_groups]
    stats = {
        "num_documents": sum(sidecar["num_documents"] for sidecar in sidecars.values()),
        "num_samples": num_samples,
        "num_tokens": {split: count * seq_len for split, count in num_samples.items()},
        "num_stream_tokens": sum(sidecar["num_stream_tokens"] for sidecar in sidecars.values()),
        "unigram_entropy_nats": round(unigram_entropy(train_sidecars, vocab_size), 6),
    }
    return Manifest(
        format_version=FORMAT_VERSION,
        name=cfg.shards.name,
        kind="text_tokens",
        seq_len=seq_len,
        vocab_size=vocab_size,
        fields={TOKENS_FIELD: {"dtype": dtype, "shape": [seq_len + 1]}},
        shards=shards,
        tokenizer=provenance,
        sources={"num_documents": len(documents), "num_bytes": sum(d.num_bytes for d in documents)},
        skipped=sorted(skipped, key=lambda entry: entry.path),
        stats=stats,
        created_by=created_by(cfg, PROGRAM),
    )
