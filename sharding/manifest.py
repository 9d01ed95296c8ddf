"""`manifest.json`: what a dataset root holds, so readers never list or open shards to learn it.

Written last (atomically) by the pipelines; read by the loader, the trainer (its sha256 is the
"data manifest id" recorded in checkpoints) and `tokfleet inspect`. A manifest holds no
credentials: `created_by` is the prepare config without storage options.

    {"format_version": 1, "name": "text", "kind": "text_tokens", "seq_len": 256, "vocab_size": 8192,
     "fields": {"tokens.npy": {"dtype": "uint16", "shape": [257]}},
     "shards": [{"name": "text-000000.tar", "split": "train", "num_samples": 1203,
                 "num_bytes": 1848320, "sha256": "...", "sources": ["/.../abc.py", ...]}, ...],
     "tokenizer": {"kind": "bpe", "path": "tokenizer", "sha256": "...", "config": {...}, ...},
     "sources": {"num_documents": 1790, "num_bytes": 31525224},
     "skipped": [{"path": "/.../latin1.py", "reason": "not UTF-8: ..."}],
     "stats": {"num_tokens": {...}, "num_samples": {...}, "unigram_entropy_nats": 5.9, ...},
     "created_by": {"program": "...", "config": {...}}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from core.errors import UserError
from sharding import storage

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")


@dataclass
class SkippedInput:
    """An input left out of the dataset and why (undecodable, empty, ...)."""

    path: str
    reason: str


@dataclass
class ShardRecord:
    name: str  # `{name}-{index:06d}.tar`, relative to the dataset root
    split: str  # "train" or "val"
    num_samples: int
    num_bytes: int
    sha256: str
    sources: list[str] = field(default_factory=list)  # inputs whose tokens this shard holds, in order


@dataclass
class Manifest:
    format_version: int
    name: str
    kind: str  # "text_tokens"
    seq_len: int
    vocab_size: int
    fields: dict[str, dict[str, Any]]  # per-sample entry -> {"dtype", "shape"}
    shards: list[ShardRecord]
    tokenizer: dict[str, Any]  # provenance: kind, path (in the dataset), sha256 of tokenizer.json, config
    sources: dict[str, Any]  # num_documents, num_bytes
    skipped: list[SkippedInput]
    stats: dict[str, Any]  # num_tokens, num_samples, unigram_entropy_nats, ...
    created_by: dict[str, Any]  # program + config, without storage options

    def shards_of(self, split: str) -> list[ShardRecord]:
        return [shard for shard in self.shards if shard.split == split]

    def num_samples(self, split: str) -> int:
        return sum(shard.num_samples for shard in self.shards_of(split))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False) + "\n"

    def fingerprint(self) -> str:
        """sha256 of the manifest text: the id checkpoints record to tie a run to its data."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @classmethod
    def from_json(cls, text: str, url: str = "<manifest>") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{url}: manifest is not valid JSON ({error})") from None
        return cls.from_dict(data, url)

    @classmethod
    def from_dict(cls, data: Any, url: str = "<manifest>") -> Manifest:
        if not isinstance(data, dict):
            raise UserError(f"{url}: manifest must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{url}: unsupported manifest format_version {version!r} (this tokfleet reads {FORMAT_VERSION})")
        names = [f.name for f in dataclasses.fields(cls)]
        _check_keys(data, names, names, url, "manifest")
        for key in ("shards", "skipped"):
            if not isinstance(data[key], list):
                raise UserError(f"{url}: manifest '{key}' must be a list")
        shards = [ShardRecord(**_checked(s, ShardRecord, url, f"shards[{i}]")) for i, s in enumerate(data["shards"])]
        skipped = [SkippedInput(**_checked(s, SkippedInput, url, f"skipped[{i}]")) for i, s in enumerate(data["skipped"])]
        for shard in shards:
            if shard.split not in SPLITS:
                raise UserError(f"{url}: shard {shard.name} has split {shard.split!r}, expected one of {SPLITS}")
        values = {key: data[key] for key in data if key not in ("shards", "skipped")}
        return cls(shards=shards, skipped=skipped, **values)

    @classmethod
    def read(cls, url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
        """Read `url`: a manifest.json file or the dataset root holding one."""
        url = manifest_url(url)
        try:
            text = storage.read_text(url, storage_options)
        except FileNotFoundError:
            raise UserError(f"{url}: manifest not found (run `tokfleet prepare` to build the dataset)") from None
        except UnicodeDecodeError:
            raise UserError(f"{url}: manifest is not UTF-8 text") from None
        return cls.from_json(text, url)

    def write(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        storage.write_text_atomic(manifest_url(url), self.to_json(), storage_options)


def manifest_url(url: str) -> str:
    """The manifest.json URL of a dataset root (or `url` itself when it names the file)."""
    return url if url.rstrip("/").endswith(".json") else storage.join(url, MANIFEST_FILE)


def _check_keys(data: dict, required: list[str], allowed: list[str], url: str, what: str) -> None:
    missing = [key for key in required if key not in data]
    unknown = [key for key in data if key not in allowed]
    if missing:
        raise UserError(f"{url}: {what} is missing {', '.join(repr(k) for k in missing)}")
    if unknown:
        raise UserError(f"{url}: {what} has unknown {', '.join(repr(k) for k in unknown)}")


def _checked(record: Any, cls: type, url: str, what: str) -> dict:
    """`record` after checking it is an object with the fields of dataclass `cls`."""
    if not isinstance(record, dict):
        raise UserError(f"{url}: {what} must be an object")
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _check_keys(record, required, [f.name for f in fields], url, what)
    return record
