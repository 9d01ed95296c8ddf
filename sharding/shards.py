"""WebDataset shard files: writing token samples to a tar, reading a tar's samples back.

One function writes shards (the pretokenize pipeline and the tests use it) and one reads them
(the loader and `verify_dataset` use it), so the format lives in one place:

- a shard is an uncompressed tar named `{name}-{index:06d}.tar`;
- a sample is the tar members `{key}.{field}` sharing a `__key__` (WebDataset grouping: the key
  is the member name up to its first dot, so keys hold no dots);
- arrays are stored as `.npy` members; tar mtimes are fixed, so the same samples give the
  same bytes and the same sha256 on every run;
- a sample that does not decode, or whose arrays differ from the manifest's fields (dtype,
  shape), raises `CorruptSample` naming its key and field.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import webdataset

from sharding import storage

SHARD_MTIME = 0  # fixed member mtime (an int: a float adds a PAX header per member): same samples, same bytes


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def sample_key(name: str, index: int, sample: int) -> str:
    return f"{name}-{index:06d}-{sample:06d}"


def source_sample_key(source: str, position: int) -> str:
    """`{stem}-{hash8}-{position:06d}`: the key of sample `position` (window, clip) of input file `source`.

    Stable across re-runs and regroupings (it depends on nothing but the source URL); the hash of
    the whole URL tells apart equal file names in different folders; no dots (WebDataset grouping).
    """
    stem = os.path.basename(source.rstrip("/")).split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:48] or "file"
    return f"{stem}-{hashlib.sha256(source.encode('utf-8')).hexdigest()[:8]}-{position:06d}"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype storing every id below `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


@dataclass
class WrittenShard:
    num_samples: int
    num_bytes: int
    sha256: str


def encode_shard(samples: Iterable[dict[str, Any]]) -> tuple[bytes, int]:
    """(tar bytes, sample count) of WebDataset samples `{"__key__": ..., "tokens.npy": array, ...}`."""
    buffer = io.BytesIO()
    num_samples = 0
    with webdataset.TarWriter(buffer, mtime=SHARD_MTIME) as writer:
        for sample in samples:
            writer.write(sample)
            num_samples += 1
    return buffer.getvalue(), num_samples


def write_shard(url: str, samples: Iterable[dict[str, Any]], storage_options: dict[str, Any] | None = None) -> WrittenShard:
    """Write `samples` as one tar at `url` atomically (shards are a few MB: built in memory)."""
    data, num_samples = encode_shard(samples)
    storage.write_bytes_atomic(url, data, storage_options)
    return WrittenShard(num_samples, len(data), hashlib.sha256(data).hexdigest())


def _members(data: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of the regular files of tar `data`; a damaged tar raises ValueError."""
    members = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    if member.offset_data + member.size > len(data):
                        raise ValueError(f"member {member.name} runs past the end of the tar (truncated?)")
                    members.append((member.name, member.offset_data, member.offset_data + member.size))
    except tarfile.TarError as error:
        raise ValueError(f"not a readable tar: {error}") from None
    return members


def split_samples(data: bytes) -> list[tuple[str, dict[str, memoryview]]]:
    """The samples of tar bytes `data` in file order: (key, {field: member bytes}).

    Member bytes are views into `data` (no copy); a damaged tar raises ValueError.
    """
    members = _members(data)
    view = memoryview(data)
    samples: list[tuple[str, dict[str, memoryview]]] = []
    for name, start, end in members:
        directory, _, base = name.rpartition("/")
        stem, dot, field = base.partition(".")
        if not dot:
            continue
        key = f"{directory}/{stem}" if directory else stem
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][field] = view[start:end]
    return samples


_NPY_MAGIC = b"\x93NUMPY\x01"  # format 1.0: 2-byte header length
_NPY_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...], str]] = {}  # header bytes -> (dtype, shape, order)


def decode_npy(value: memoryview) -> np.ndarray:
    """`np.load` of .npy bytes, parsing each distinct header once (every sample of a shard shares one).

    The loader decodes every sample on the training hot path; np.load spends most of its
    time in `ast.literal_eval` of the header.
    """
    if bytes(value[:7]) == _NPY_MAGIC:
        start = 10 + int.from_bytes(value[8:10], "little")
        header = bytes(value[:start])
        layout = _NPY_LAYOUTS.get(header)
        if layout is None and len(_NPY_LAYOUTS) < 1024:
            stream = io.BytesIO(header)
            np.lib.format.read_magic(stream)
            shape, is_fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            if not dtype.hasobject:
                layout = _NPY_LAYOUTS[header] = (dtype, shape, "F" if is_fortran else "C")
        if layout is not None:
            dtype, shape, order = layout
            count = int(np.prod(shape, dtype=np.int64))
            return np.frombuffer(value, dtype=dtype, count=count, offset=start).reshape(shape, order=order).copy()
    return np.load(io.BytesIO(value), allow_pickle=False)


def decode_field(field: str, value: memoryview) -> Any:
    """Decode one member by its extension: .npy -> ndarray, .json -> object, .txt -> str, else bytes."""
    extension = field.rsplit(".", 1)[-1]
    if extension == "npy":
        return decode_npy(value)
    if extension == "json":
        return json.loads(bytes(value))
    if extension in ("txt", "text"):
        return bytes(value).decode("utf-8")
    return bytes(value)


class CorruptSample(ValueError):
    """A sample that does not decode, or does not match the manifest's fields: names the key and the field."""

    def __init__(self, key: str, field: str, reason: str):
        super().__init__(f"sample {key}, field {field}: {reason}")
        self.key, self.field, self.reason = key, field, reason


# member name -> (dtype, shape with None for any size): the checkable part of a manifest's "fields"
FieldSpecs = dict[str, tuple[np.dtype, tuple[int | None, ...]]]


def field_specs(fields: dict[str, dict[str, Any]]) -> FieldSpecs:
    """The dtype and shape of every `.npy` field a manifest records (a shape dim of None matches any size)."""
    return {name: (np.dtype(spec["dtype"]), tuple(spec["shape"])) for name, spec in fields.items()
            if name.endswith(".npy") and "dtype" in spec and "shape" in spec}


def _layout_problem(value: Any, dtype: np.dtype, shape: tuple[int | None, ...]) -> str | None:
    if not isinstance(value, np.ndarray):
        return f"is {type(value).__name__}, the manifest records an array"
    if value.dtype == dtype and (value.shape == shape or (len(value.shape) == len(shape) and all(
            want is None or want == got for got, want in zip(value.shape, shape)))):
        return None
    recorded = [None if d is None else int(d) for d in shape]
    return f"is {value.dtype}{list(value.shape)}, the manifest records {dtype}{recorded}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def decode_sample(key: str, fields: dict[str, memoryview], expected: FieldSpecs | None = None) -> dict[str, Any]:
    """`{"__key__": key, "tokens": array, ...}`: field names lose their extension.

    A member that does not decode, or (with `expected`, see `field_specs`) an array field that is
    missing or of another dtype or shape, raises CorruptSample naming the key and the field.
    """
    sample: dict[str, Any] = {"__key__": key}
    for field, value in fields.items():
        try:
            sample[field.rsplit(".", 1)[0]] = decode_field(field, value)
        except Exception as error:  # the bytes are untrusted: any decoder failure is a damaged sample
            raise CorruptSample(key, field, f"does not decode ({_one_line(error)})") from None
    if expected is not None:
        for field, (dtype, shape) in expected.items():
            name = field.rsplit(".", 1)[0]
            if name not in sample:
                raise CorruptSample(key, field, "missing from the sample")
            problem = _layout_problem(sample[name], dtype, shape)
            if problem is not None:
                raise CorruptSample(key, field, problem)
    return sample


def read_shard(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every decoded sample of the shard at `url`, in file order."""
    return [decode_sample(key, fields) for key, fields in split_samples(storage.read_bytes(url, storage_options))]
