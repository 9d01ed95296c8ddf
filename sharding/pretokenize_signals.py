"""`tokfleet pretokenize`: a trained tokenizer over raw MEG/EEG or video shards -> token shards + manifest.

    raw manifest (prepare's) -> groups of shards.raw_shards_per_shard consecutive raw shards of one split
    -> a Ray Data actor pool (actors.num_actors replicas of the tokenizer, each loaded once, with
       actors.num_cpus / num_gpus): per group, read the raw shards, tokenize neighbouring samples of
       one shape in batches of actors.batch_size, write `{name}-{index:06d}.tar` atomically, then its
       sidecar (sharding.shard_build: the same resumable building as `tokfleet prepare`)
    -> manifest.json last, with the tokenizer's provenance (checkpoint, sha256 of its weights, model
       name/flavor/args, codebook size, levels).

A token sample has the raw sample's `__key__` (the key names the source file and position, so
the two datasets line up sample for sample), `tokens.npy` (uint16 when the codebook fits, else
int32), `origin.json` ({"shard": raw shard, "key": raw key}) and what decoding needs: for MEG the
raw `norm_center`/`norm_scale` (prepare's per-channel normalisation), `pos`, `sensor_type` and
`meta.json`, plus TOTEM's RevIN `revin_mean`/`revin_std` (C,); for video the raw `meta.json`.
A token shard's build id covers the tokenizer weights' sha256 and the raw shards' sha256s: a
re-run rebuilds exactly the shards whose inputs changed or that are missing. A raw shard that is
missing or differs from its manifest is skipped and listed (`--strict`: an error).

The data pipeline does not import the trainer: the caller passes `describe`, the function that reads a
trained tokenizer checkpoint (the CLI passes trainer/tokenizer_runner.py's `describe_checkpoint`). Each
actor calls it again on the checkpoint folder and opens the tokenizer with `info.runner(device)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from core.config import PretokenizeConfig
from core.errors import UserError
from sharding import storage
from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord, SkippedInput
from sharding.prepare_signals import fields_of, merge_shapes
from sharding.shard_build import (
    ActorPool,
    BuildReport,
    build_id,
    build_missing_shards,
    claim_output,
    check_shard_name,
    created_by,
    shard_sidecar,
    finish_manifest,
    sidecar_name,
)
from sharding.labels import LABEL_FIELD, label_counts, split_counts
from sharding.shards import decode_sample, shard_name, split_samples, write_shard

log = logging.getLogger(__name__)

PROGRAM = "tokfleet pretokenize (sharding.pretokenize_signals)"
TOKENIZE_VERSION = 1  # bump when the token samples change for the same tokenizer and raw shards
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # this process, as the sidecars name it
TOKEN_KINDS = {"meg_windows": "meg_tokens", "video_clips": "video_tokens"}  # raw kind -> token dataset kind
COPIED_FIELDS = {"meg_windows": ("norm_center.npy", "norm_scale.npy", "pos.npy", "sensor_type.npy", "meta.json"),
                 "video_clips": ("meta.json",)}


def same_shape_batches(samples: list[dict[str, Any]], field_name: str, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Runs of up to batch_size consecutive samples whose `field_name` arrays share one shape (MEG
    recordings may differ in channel count), in order."""
    batch: list[dict[str, Any]] = []
    for sample in samples:
        if batch and (len(batch) == batch_size or sample[field_name].shape != batch[0][field_name].shape):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


@dataclass
class TokenShardSpec:
    """Everything an actor needs to build one token shard (JSON-serializable)."""

    index: int
    shard: str
    url: str
    sidecar_url: str
    build_id: str
    split: str
    raw_shards: list[dict[str, Any]]  # {"name", "url", "sha256", "sources"}


class ShardTokenizer:
    """A Ray Data actor's builder: loads the tokenizer once, then turns one spec's raw shards into a token shard."""

    def __init__(self, describe: Callable[[str], Any], checkpoint: str, device: str, batch_size: int, num_threads: int,
                 input_options: dict[str, Any], output_options: dict[str, Any]):
        import torch

        torch.set_num_threads(max(1, num_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.runner = describe(checkpoint).runner(device)
        self.batch_size = batch_size
        self.input_options, self.output_options = input_options, output_options

    def __call__(self, fields: dict[str, Any]) -> dict[str, Any]:
        spec = TokenShardSpec(**fields)
        kind = self.runner.info.input_kind
        started_at, start, start_cpu = time.time(), time.perf_counter(), time.thread_time()
        token_samples, used, skipped = [], [], []
        for raw in spec.raw_shards:
            try:
                data = storage.read_bytes(raw["url"], self.input_options)
            except FileNotFoundError:
                skipped.append(asdict(SkippedInput(raw["name"], "raw shard missing")))
                continue
            if hashlib.sha256(data).hexdigest() != raw["sha256"]:
                skipped.append(asdict(SkippedInput(raw["name"], "raw shard differs from its manifest (sha256)")))
                continue
            samples = [decode_sample(key, members) for key, members in split_samples(data)]
            for batch in same_shape_batches(samples, self.runner.field_name, self.batch_size):
                for sample, tokens in zip(batch, self.runner.tokenize(batch)):
                    token_sample = {"__key__": sample["__key__"], "origin.json": {"shard": raw["name"], "key": sample["__key__"]}}
                    token_sample.update((f"{name}.npy", value) for name, value in tokens.items())
                    for copied in COPIED_FIELDS[kind]:
                        token_sample[copied] = sample[copied.rsplit(".", 1)[0]]
                    if "label" in sample:  # a labelled window's class, for the quantized classifiers
                        token_sample[LABEL_FIELD] = sample["label"]
                    token_samples.append(token_sample)
            used.append(raw)
        written = write_shard(spec.url, token_samples, self.output_options)
        sidecar = shard_sidecar(
            spec, written,
            raw_shards=[raw["name"] for raw in used],
            sources=[source for raw in used for source in raw["sources"]],
            num_tokens=int(sum(s["tokens.npy"].size for s in token_samples)),
            skipped=skipped,
            fields=fields_of(token_samples),
            label_counts=label_counts(token_samples),
            seconds=round(time.perf_counter() - start, 3),
            # this thread's CPU: all the tokenizer's with one torch thread (actors.num_cpus 1); with seconds, how
            # much of the wall time this shard had a core (a shared or oversubscribed node shows here)
            cpu_seconds=round(time.thread_time() - start_cpu, 3),
            started_at=round(started_at, 3),  # unix time: when each actor was at work (start-up, stragglers)
            worker=WORKER,  # which actor built it: with started_at, each actor's timeline
        )
        storage.write_text_atomic(spec.sidecar_url, json.dumps(sidecar, separators=(",", ":")), self.output_options)
        return sidecar


# ------------------------------------------------------------------- driver


def _shard_specs(cfg: PretokenizeConfig, raw: Manifest, weights_sha256: str) -> list[TokenShardSpec]:
    """Raw shards in manifest order, in runs of up to raw_shards_per_shard of one split: with 1 and
    every split, token shard i is tokenized raw shard i."""
    groups: list[list[ShardRecord]] = []
    for record in raw.shards:
        if record.split not in cfg.input.splits:
            continue
        if groups and groups[-1][0].split == record.split and len(groups[-1]) < cfg.shards.raw_shards_per_shard:
            groups[-1].append(record)
        else:
            groups.append([record])
    specs = []
    for index, group in enumerate(groups):
        split = group[0].split
        name = shard_name(cfg.shards.name, index)
        identity = {
            "format_version": FORMAT_VERSION,
            "tokenize_version": TOKENIZE_VERSION,
            "name": cfg.shards.name,
            "index": index,
            "split": split,
            "tokenizer_sha256": weights_sha256,
            "raw_shards": [[record.name, record.sha256] for record in group],
        }
        specs.append(TokenShardSpec(
            index=index,
            shard=name,
            url=storage.join(cfg.shards.output, name),
            sidecar_url=storage.join(cfg.shards.output, sidecar_name(name)),
            build_id=build_id(identity),
            split=split,
            raw_shards=[{"name": record.name, "url": storage.join(cfg.input.dataset, record.name),
                         "sha256": record.sha256, "sources": record.sources} for record in group],
        ))
    return specs


class PretokenizeReport(BuildReport):
    def contents(self) -> str:
        manifest = self.manifest
        train, val, num_bytes = self.totals()
        return (f"token dataset {self.output}: {manifest.sources['num_raw_shards']} raw shards of {manifest.stats['num_files']} files "
                f"-> {train} train + {val} val {self.unit} ({manifest.stats['num_tokens']} tokens) in {len(manifest.shards)} shards, "
                f"{num_bytes / 1e6:.1f} MB, {len(manifest.skipped)} raw shards skipped")


def plan_pretokenize(cfg: PretokenizeConfig, describe: Callable[[str], Any]) -> tuple[Any, Manifest, list[TokenShardSpec]]:
    """(the tokenizer's description, raw manifest, every token shard's spec) of `cfg`; UserError when they do
    not fit together."""
    check_shard_name(cfg.shards.name)
    info = describe(cfg.tokenizer.checkpoint)
    raw = Manifest.read(cfg.input.dataset, cfg.input.storage_options)
    info.check_dataset(raw, cfg.input.dataset)
    if not any(raw.shards_of(split) for split in cfg.input.splits):
        raise UserError(f"input.splits: {cfg.input.dataset} has no shards in {cfg.input.splits}")
    return info, raw, _shard_specs(cfg, raw, info.weights_sha256)


def shard_tokenizer_kwargs(cfg: PretokenizeConfig, info: Any, describe: Callable[[str], Any]) -> dict[str, Any]:
    """ShardTokenizer's arguments: each actor builds one from them (so can a plain loop, for comparison).

    Torch gets actors.num_cpus threads (at least 1), so actors sharing a node do not oversubscribe its cores.
    """
    return {"describe": describe, "checkpoint": str(info.directory), "device": cfg.tokenizer.device, "batch_size": cfg.actors.batch_size,
            "num_threads": max(1, int(cfg.actors.num_cpus)), "input_options": cfg.input.storage_options,
            "output_options": cfg.shards.storage_options}


def pretokenize_signals(cfg: PretokenizeConfig, describe: Callable[[str], Any], progress: bool = True, strict: bool = False,
                        overwrite: bool = False) -> PretokenizeReport:
    """Build (or complete) the token dataset of `cfg` at `cfg.shards.output`; a token dataset there made
    with other settings or another tokenizer's weights is moved aside with `overwrite` (else: UserError)."""
    output, output_options = cfg.shards.output, cfg.shards.storage_options
    info, raw, specs = plan_pretokenize(cfg, describe)
    claim_output(output, output_options, {"config": _made_by(cfg), "tokenizer_sha256": info.weights_sha256}, overwrite,
                 identity=lambda manifest: {"config": manifest.created_by, "tokenizer_sha256": manifest.tokenizer.get("sha256")})
    actors = cfg.actors
    sidecars, built, build_seconds = build_missing_shards(
        specs,
        lambda num_to_build: ActorPool(ShardTokenizer, shard_tokenizer_kwargs(cfg, info, describe), num_actors=min(actors.num_actors, num_to_build),
                                       num_cpus=actors.num_cpus, num_gpus=actors.num_gpus),
        cfg.ray, output=output, name=cfg.shards.name, storage_options=output_options, progress=progress,
        desc=f"pretokenize {info.name}")

    manifest = _assemble_manifest(cfg, raw, info, specs, sidecars, TOKEN_KINDS[raw.kind])
    finish_manifest(manifest, output, output_options, strict=strict)
    unit = "windows" if raw.kind == "meg_windows" else "clips"
    return PretokenizeReport(manifest, output, unit, len(built), sum(s["num_samples"] for s in built),
                             sum(s["num_bytes"] for s in built), build_seconds)


def _made_by(cfg: PretokenizeConfig) -> dict[str, Any]:
    return created_by(cfg, PROGRAM, how_it_ran=("ray", "actors", "launch"))


def _assemble_manifest(cfg: PretokenizeConfig, raw: Manifest, info: Any, specs: list[TokenShardSpec],
                       sidecars: dict[int, dict[str, Any]], kind: str) -> Manifest:
    shards, skipped = [], []
    fields: dict[str, dict[str, Any]] = {}
    for spec in specs:
        sidecar = sidecars[spec.index]
        shards.append(ShardRecord(spec.shard, spec.split, sidecar["num_samples"], sidecar["num_bytes"], sidecar["sha256"],
                                  sidecar["sources"]))
        skipped.extend(SkippedInput(**entry) for entry in sidecar["skipped"])
        for name, field in sidecar["fields"].items():
            merged = fields.setdefault(name, dict(field))
            if "shape" in field:
                merged["shape"] = merge_shapes(merged["shape"], field["shape"])
    for name, field in raw.fields.items():  # the raw notes (units, sensor type ids) still hold
        if name in fields:
            fields[name].update({key: value for key, value in field.items() if key not in ("dtype", "shape")})
    if "tokens.npy" in fields:
        fields["tokens.npy"]["values"] = f"codes in [0, {info.codebook_size})" + (
            f", last axis: {info.num_levels} RVQ levels" if info.num_levels > 1 else "")
        fields["tokens.npy"]["axes"] = list(info.token_axes)  # sharding.token_grid reads the grid through them
    num_samples = {split: sum(s.num_samples for s in shards if s.split == split) for split in ("train", "val")}
    num_tokens = sum(sidecar["num_tokens"] for sidecar in sidecars.values())
    stats = {}
    classes = fields.get(LABEL_FIELD, {}).get("classes")  # the raw dataset's, copied with its notes above
    if classes:
        stats["label_counts"] = split_counts(classes, [(spec.split, sidecars[spec.index].get("label_counts")) for spec in specs])
    token_shape = fields.get("tokens.npy", {}).get("shape", [])
    return Manifest(
        format_version=FORMAT_VERSION,
        name=cfg.shards.name,
        kind=kind,
        seq_len=int(token_shape[1] if kind == "meg_tokens" else token_shape[0]) if token_shape else 0,
        vocab_size=info.codebook_size,
        fields=dict(sorted(fields.items())),
        shards=shards,
        tokenizer=info.provenance(),
        sources={"dataset": cfg.input.dataset, "kind": raw.kind, "manifest_sha256": raw.fingerprint(),
                 "num_raw_shards": sum(len(spec.raw_shards) for spec in specs)},
        skipped=sorted(skipped, key=lambda entry: entry.path),
        stats={"num_files": len({s for shard in shards for s in shard.sources}), "num_samples": num_samples,
               "num_tokens": num_tokens, "num_bytes": sum(s.num_bytes for s in shards), **stats},
        created_by=_made_by(cfg),
    )
