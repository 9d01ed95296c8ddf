"""`tokfleet prepare` for MEG/EEG recordings and videos: files -> raw sample shards + manifest, on Ray Data.

    files (sorted) -> groups of ~shards.source_bytes_per_shard -> one Ray task per group:
      each file through its reader (sharding.meg: windows; sharding.video: clips), write
      `{name}-{index:06d}.tar` atomically, then its sidecar `{name}-{index:06d}.json`
    -> the driver gathers the sidecars and writes manifest.json last (sharding.shard_build).

A file is never split: one recording or video is read whole by one task, and its samples land in
one shard (a file larger than source_bytes_per_shard makes a shard of its own). Whole groups go
to the val split (val_fraction of the shards), so no recording has windows in both splits.
Sample keys come from the source file and the sample's position in it, not from the shard.
A file a reader cannot use (corrupt, truncated, no usable channels, shorter than one sample)
is recorded in the manifest's skipped list with the reason; `strict` makes that an error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import json
import logging
import time
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np

from core.config import PrepareConfig
from core.errors import UserError
from sharding import storage
from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord, SkippedInput
from sharding.shard_build import (
    BuildReport,
    SkipInput,
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
)
from sharding.labels import LABEL_FIELD, label_counts, plan_labels, shard_plan, split_counts
from sharding.shards import shard_name, write_shard
from sharding.text_corpus import Document, corpus_fingerprint, list_files

log = logging.getLogger(__name__)

PROGRAM = "tokfleet prepare (sharding.prepare_signals)"
# bump when a reader's output changes for the same inputs and options: every shard is rebuilt
READER_VERSION = 1
LIBRARIES = {"meg": ("mne", "numpy", "scipy"), "video": ("av", "numpy")}


def reader_module(kind: str) -> ModuleType:
    """The reader of `source.kind` (imported on use: mne and PyAV are optional extras).

    A reader module has OPTIONS (its config class), MANIFEST_KIND, SAMPLE_UNIT, check_options,
    sequence_length, field_notes and read_samples(source, local_path, options) -> samples.
    """
    if kind not in LIBRARIES:
        raise UserError(f"source.kind: {kind!r} is not a signal kind (meg, video)")
    importlib.import_module(LIBRARIES[kind][0])  # here, not first in a Ray task: missing, the command names its extra
    return importlib.import_module(f"sharding.{kind}")


def reader_options(cfg: PrepareConfig) -> Any:
    return cfg.meg if cfg.source.kind == "meg" else cfg.video


# ------------------------------------------------------------------ building (Ray task)


@dataclass
class SignalShardSpec:
    """Everything a Ray task needs to build one shard (JSON-serializable)."""

    index: int
    shard: str
    url: str
    sidecar_url: str
    build_id: str
    kind: str
    options: dict[str, Any]
    documents: list[dict[str, Any]]  # Document fields
    labels: dict[str, Any] | None = None  # sharding.labels.plan_labels (MEG windows with class labels)


def fields_of(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{field: {"dtype", "shape"}} of `samples`' arrays; a dimension that differs between samples is None."""
    fields: dict[str, dict[str, Any]] = {}
    for sample in samples:
        for name, value in sample.items():
            if name == "__key__":
                continue
            if not isinstance(value, np.ndarray):
                fields.setdefault(name, {})
                continue
            spec = fields.setdefault(name, {"dtype": value.dtype.name, "shape": list(value.shape)})
            spec["shape"] = merge_shapes(spec["shape"], list(value.shape))
    return fields


def merge_shapes(a: list[int | None], b: list[int | None]) -> list[int | None]:
    assert len(a) == len(b), (a, b)
    return [x if x == y else None for x, y in zip(a, b)]


def build_signal_shard(fields: dict[str, Any], storage_options: dict[str, Any] | None = None,
                       source_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read the spec's files with their reader, write the shard, then its sidecar; returns the sidecar.

    `storage_options` are the output's (shards.storage_options), `source_options` the inputs'
    (source.storage_options). mne and FFmpeg open paths: a remote input is downloaded to a
    temporary file inside this task first, one at a time, and deleted once read.
    """
    spec = SignalShardSpec(**fields)
    reader = reader_module(spec.kind)
    options = reader.OPTIONS(**spec.options)
    samples: list[dict[str, Any]] = []
    used, skipped, counts = [], [], []
    start = time.perf_counter()
    for document in spec.documents:
        source = path = document["source"]
        try:
            with storage.local_file(source, source_options) as path:
                extra = {} if spec.labels is None else {"labels": spec.labels}
                file_samples = list(reader.read_samples(source, path, options, **extra))
        except SkipInput as reason:  # a remote input was read from a temporary copy: its reason names the source
            skipped.append(asdict(SkippedInput(source, str(reason).replace(path, source))))
            continue
        except FileNotFoundError:
            skipped.append(asdict(SkippedInput(source, "missing: deleted after listing")))
            continue
        samples.extend(file_samples)
        used.append(source)
        counts.append(len(file_samples))
    written = write_shard(spec.url, samples, storage_options)
    sidecar = shard_sidecar(
        spec, written,
        sources=used,
        samples_per_source=counts,
        skipped=skipped,
        fields=fields_of(samples),
        seconds=round(time.perf_counter() - start, 3),
        **({} if spec.labels is None else {"label_counts": label_counts(samples)}),
    )
    storage.write_text_atomic(spec.sidecar_url, json.dumps(sidecar, separators=(",", ":")), storage_options)
    return sidecar


# ------------------------------------------------------------------- driver


def _library_versions(kind: str) -> dict[str, str]:
    versions = {}
    for name in LIBRARIES[kind]:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _shard_specs(cfg: PrepareConfig, groups: list[list[Document]], labels: dict[str, Any] | None = None) -> list[SignalShardSpec]:
    shards_cfg, kind = cfg.shards, cfg.source.kind
    options = asdict(reader_options(cfg))
    libraries = _library_versions(kind)
    specs = []
    for index, group in enumerate(groups):
        name = shard_name(shards_cfg.name, index)
        identity = {
            "format_version": FORMAT_VERSION,
            "reader_version": READER_VERSION,
            "libraries": libraries,
            "kind": kind,
            "name": shards_cfg.name,
            "index": index,
            "options": options,
            "documents": corpus_fingerprint(group),
        }
        group_labels = shard_plan(labels, [document.source for document in group])
        if group_labels is not None:  # (unlabelled datasets keep their build ids)
            identity["labels"] = group_labels
        specs.append(SignalShardSpec(
            index=index,
            shard=name,
            url=storage.join(shards_cfg.output, name),
            sidecar_url=storage.join(shards_cfg.output, sidecar_name(name)),
            build_id=build_id(identity),
            kind=kind,
            options=options,
            documents=[asdict(document) for document in group],
            labels=group_labels,
        ))
    return specs


class PrepareReport(BuildReport):
    def contents(self) -> str:
        manifest = self.manifest
        train, val, num_bytes = self.totals()
        return (f"dataset {self.output}: {manifest.stats['num_files']} files -> {train} train + {val} val {self.unit} "
                f"in {len(manifest.shards)} shards, {num_bytes / 1e6:.1f} MB, {len(manifest.skipped)} inputs skipped")


def prepare_signals(cfg: PrepareConfig, progress: bool = True, strict: bool = False, overwrite: bool = False) -> PrepareReport:
    """Build (or complete) the MEG/EEG or video dataset of `cfg` at `cfg.shards.output` (`overwrite`: see claim_output)."""
    shards_cfg, kind = cfg.shards, cfg.source.kind
    output, storage_options = shards_cfg.output, shards_cfg.storage_options
    check_shard_name(shards_cfg.name)
    if cfg.source.hf_dataset:
        raise UserError(f"source.hf_dataset: only source.kind text reads datasets; {kind} reads files from source.paths")
    if not cfg.source.paths:
        raise UserError(f"source.paths: list the {kind} files to read (glob patterns)")
    if shards_cfg.source_bytes_per_shard < 1:
        raise UserError(f"shards.source_bytes_per_shard must be >= 1, got {shards_cfg.source_bytes_per_shard}")
    reader = reader_module(kind)
    reader.check_options(reader_options(cfg))

    files = list_files(cfg.source)
    labels = plan_labels(cfg.labels, [f.source for f in files], cfg.source.storage_options)  # before anything is written
    groups = group_documents(files, shards_cfg.source_bytes_per_shard)
    val_groups = val_group_indexes(len(groups), shards_cfg.val_fraction)
    if shards_cfg.val_fraction > 0 and not val_groups:
        log.warning("one shard only: no val split (lower shards.source_bytes_per_shard to get one)")
    log.info("%d %s files, %.1f MB, in %d groups", len(files), kind, sum(f.num_bytes for f in files) / 1e6, len(groups))

    claim_output(output, storage_options, created_by(cfg, PROGRAM), overwrite)
    specs = _shard_specs(cfg, groups, labels)
    build = functools.partial(build_signal_shard, storage_options=storage_options, source_options=cfg.source.storage_options)
    sidecars, built, build_seconds = build_missing_shards(specs, lambda _: build, cfg.ray, output=output, name=shards_cfg.name,
                                                          storage_options=storage_options, progress=progress, desc=f"prepare {kind}")

    manifest = _assemble_manifest(cfg, reader, files, specs, sidecars, val_groups, labels)
    if manifest.num_samples("train") == 0 and not (strict and manifest.skipped):
        first = f": {manifest.skipped[0].path}: {manifest.skipped[0].reason}" if manifest.skipped else ""
        raise UserError(f"source.paths: no {reader.SAMPLE_UNIT} for the train split from {len(files)} files "
                        f"({len(manifest.skipped)} skipped{first})")
    finish_manifest(manifest, output, storage_options, strict=strict)
    return PrepareReport(manifest, output, reader.SAMPLE_UNIT, len(built), sum(s["num_samples"] for s in built),
                         sum(s["num_bytes"] for s in built), build_seconds)


def _assemble_manifest(
    cfg: PrepareConfig,
    reader: ModuleType,
    files: list[Document],
    specs: list[SignalShardSpec],
    sidecars: dict[int, dict[str, Any]],
    val_groups: set[int],
    labels: dict[str, Any] | None = None,
) -> Manifest:
    options = reader_options(cfg)
    shards, skipped = [], []
    fields: dict[str, dict[str, Any]] = {}
    for spec in specs:
        sidecar = sidecars[spec.index]
        split = "val" if spec.index in val_groups else "train"
        shards.append(ShardRecord(spec.shard, split, sidecar["num_samples"], sidecar["num_bytes"], sidecar["sha256"], sidecar["sources"]))
        skipped.extend(SkippedInput(**entry) for entry in sidecar["skipped"])
        for name, field in sidecar["fields"].items():
            merged = fields.setdefault(name, dict(field))
            if "shape" in field:
                merged["shape"] = merge_shapes(merged["shape"], field["shape"])
    for name, notes in reader.field_notes(options).items():
        fields.setdefault(name, {}).update(notes)
    num_samples = {split: sum(s.num_samples for s in shards if s.split == split) for split in ("train", "val")}
    stats = {
        "num_files": sum(len(sidecar["sources"]) for sidecar in sidecars.values()),
        "num_samples": num_samples,
        "num_bytes": sum(s.num_bytes for s in shards),
    }
    if labels is not None:
        fields.setdefault(LABEL_FIELD, {"dtype": "int64", "shape": []})["classes"] = labels["classes"]
        stats["label_counts"] = split_counts(labels["classes"], [(shard.split, sidecars[spec.index].get("label_counts"))
                                                                 for shard, spec in zip(shards, specs)])
    return Manifest(
        format_version=FORMAT_VERSION,
        name=cfg.shards.name,
        kind=reader.MANIFEST_KIND,
        seq_len=reader.sequence_length(options),
        vocab_size=0,  # raw samples: no token ids
        fields=dict(sorted(fields.items())),
        shards=shards,
        tokenizer={},
        sources={"num_files": len(files), "num_bytes": sum(f.num_bytes for f in files)},
        skipped=sorted(skipped, key=lambda entry: entry.path),
        stats=stats,
        created_by=created_by(cfg, PROGRAM),
    )
