"""Resumable shard building, shared by the prepare pipelines (text, MEG/EEG, video).

A pipeline plans every shard up front from its sorted inputs (same inputs -> same shard indexes
and build ids), then:

- keeps each shard whose sidecar `{name}-{index:06d}.json` names the same build id and whose tar
  still has the size and sha256 the sidecar records (`complete_sidecar`);
- builds the others as Ray Data tasks, one per shard (`build_on_ray`); a task writes its tar
  atomically, then its sidecar, so a crash (of a task or of the driver) never leaves a shard that
  looks complete, and a re-run builds exactly the shards that are missing, stale or damaged;
- writes manifest.json last, and only when it changed (`finish_manifest`).

`verify_dataset` checks a finished dataset against its manifest (`tokfleet inspect`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from core.config import RayConfig
from core.errors import UserError, os_error_line
from sharding import storage
from sharding.manifest import FORMAT_VERSION, Manifest, SkippedInput
from sharding.shards import read_shard
from sharding.text_corpus import Document

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


class SkipInput(Exception):
    """A reader's verdict that an input gives no sample; the message (why) goes to the manifest's skipped list."""


def first_line(error: BaseException) -> str:
    """A library error as one short line for a skip reason (FFmpeg errors without their errno and path)."""
    text = getattr(error, "strerror", None) or str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:200]


def sidecar_name(shard: str) -> str:
    return shard.removesuffix(".tar") + ".json"


def build_id(identity: dict[str, Any]) -> str:
    """sha256 naming the inputs of one shard (JSON-serializable `identity`): same id -> same bytes."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def check_shard_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise UserError(f"shards.name: {name!r} may hold only letters, digits, '_' and '-'")


# ------------------------------------------------------------------ planning


def group_documents(documents: list[Document], source_bytes_per_shard: int) -> list[list[Document]]:
    """Consecutive documents in groups of at least `source_bytes_per_shard` bytes (the last may be smaller)."""
    groups: list[list[Document]] = []
    current: list[Document] = []
    current_bytes = 0
    for document in documents:
        current.append(document)
        current_bytes += document.num_bytes
        if current_bytes >= source_bytes_per_shard:
            groups.append(current)
            current, current_bytes = [], 0
    if current:
        groups.append(current)
    return groups


def val_group_indexes(num_groups: int, val_fraction: float) -> set[int]:
    """Evenly spaced groups making ~val_fraction of all; at least one when possible, never all."""
    if val_fraction <= 0 or num_groups < 2:
        return set()
    num_val = min(num_groups - 1, max(1, round(num_groups * val_fraction)))
    return {int((j + 0.5) * num_groups / num_val) for j in range(num_val)}


# ------------------------------------------------------------------ resuming


def shard_sidecar(spec, written, **fields: Any) -> dict[str, Any]:
    """The sidecar of a shard just written: what `complete_sidecar` checks, plus the builder's `fields`."""
    return {"format_version": FORMAT_VERSION, "shard": spec.shard, "build_id": spec.build_id,
            "num_samples": written.num_samples, "num_bytes": written.num_bytes, "sha256": written.sha256, **fields}


def complete_sidecar(url: str, sidecar_url: str, expected_build_id: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The sidecar of the shard at `url` when that shard is complete and built from the expected inputs, else None."""
    try:
        sidecar = json.loads(storage.read_text(sidecar_url, storage_options))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(sidecar, dict) or sidecar.get("build_id") != expected_build_id:
        return None
    if storage.size(url, storage_options) != sidecar.get("num_bytes"):
        return None
    if storage.sha256_of(url, storage_options) != sidecar.get("sha256"):
        return None
    return sidecar


def complete_sidecars(specs, storage_options: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """spec.index -> sidecar for each planned shard (url, sidecar_url, build_id, index) already complete."""
    sidecars = {}
    for spec in specs:
        sidecar = complete_sidecar(spec.url, spec.sidecar_url, spec.build_id, storage_options)
        if sidecar is not None:
            sidecars[spec.index] = sidecar
    return sidecars


def tidy_output(output: str, name: str, num_shards: int, storage_options: dict[str, Any] | None) -> None:
    """Delete temporaries a killed run left behind; warn about shards beyond this corpus's count."""
    pattern = re.compile(rf"^{re.escape(name)}-(\d{{6}})\.(tar|json)({re.escape(storage.TMP_MARKER)}[0-9a-f]+)?$")
    stale = []
    for entry in storage.ls(output, storage_options):
        match = pattern.match(entry)
        if match is None:
            continue
        if match.group(3):
            storage.remove(storage.join(output, entry), storage_options)
        elif int(match.group(1)) >= num_shards and match.group(2) == "tar":
            stale.append(entry)
    if stale:
        log.warning("%s holds %d shards beyond the %d of this corpus (not in the manifest): %s", output, len(stale), num_shards, ", ".join(stale[:5]))


# ------------------------------------------------------------------ building


def _build_row(row: dict[str, Any], *, build: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Ray Data map function: a shard spec (as JSON) in, its sidecar (as JSON) out."""
    return {"sidecar": json.dumps(build(json.loads(row["spec"])))}


@dataclass
class ActorPool:
    """Build shards in a fixed pool of Ray Data actors: each makes `builder_cls(**builder_kwargs)` once
    (e.g. loads a model onto its GPU), then calls it with one shard spec after another."""

    builder_cls: type
    builder_kwargs: dict[str, Any]
    num_actors: int
    num_cpus: float
    num_gpus: float


class _ActorBuild:
    """Ray Data callable class behind ActorPool."""

    def __init__(self, builder_cls: type, builder_kwargs: dict[str, Any]):
        self.build = builder_cls(**builder_kwargs)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return _build_row(row, build=self.build)


def build_on_ray(
    specs: list[dict[str, Any]],
    build: Callable[[dict[str, Any]], dict[str, Any]] | ActorPool,
    ray_cfg: RayConfig,
    *,
    progress: bool,
    desc: str,
) -> list[dict[str, Any]]:
    """Run `build(spec) -> sidecar` for every spec as one Ray task each (1 CPU), or on an ActorPool;
    the sidecars, in completion order.

    Specs travel as JSON strings so Ray Data never infers a schema from them; `build` (a
    module-level function or a functools.partial of one) is pickled to the workers.
    """
    import ray
    from tqdm import tqdm

    from sharding.ray_runtime import init_ray

    init_ray(ray_cfg)
    # a failing task's error reaches the caller (and becomes one line when it is the user's: a full disk,
    # a bad input); Ray Data would also log its stack trace on stderr
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)
    items = [{"spec": json.dumps(spec)} for spec in specs]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    if isinstance(build, ActorPool):
        # Two shards in flight per actor: each actor has the next spec queued when it finishes a shard,
        # so it never waits for the driver's round trip (with one in flight, 2 actors on 2 cores built
        # ~13% fewer windows/s in 4 paired runs on tests/bench/test_pretokenize_bench.py's data). At the
        # end one actor may still hold a queued shard while the other has none: at most one shard's time.
        strategy = ray.data.ActorPoolStrategy(size=build.num_actors, max_tasks_in_flight_per_actor=2)
        dataset = dataset.map(_ActorBuild, fn_constructor_kwargs={"builder_cls": build.builder_cls, "builder_kwargs": build.builder_kwargs},
                              compute=strategy, num_cpus=build.num_cpus, num_gpus=build.num_gpus or None)
    else:
        dataset = dataset.map(_build_row, fn_kwargs={"build": build}, num_cpus=1, concurrency=ray_cfg.max_tasks or None)
    sidecars = []
    num_samples = 0
    with tqdm(total=len(specs), desc=desc, unit="shard", disable=not progress) as bar:
        for row in dataset.iter_rows():
            sidecars.append(json.loads(row["sidecar"]))
            num_samples += sidecars[-1]["num_samples"]
            bar.set_postfix(samples=num_samples, refresh=False)
            bar.update()
    return sidecars


def build_missing_shards(
    specs: list[Any],
    make_build: Callable[[int], Callable[[dict[str, Any]], dict[str, Any]] | ActorPool],
    ray_cfg: RayConfig,
    *,
    output: str,
    name: str,
    storage_options: dict[str, Any] | None,
    progress: bool,
    desc: str,
) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]], float]:
    """What every pipeline does with its shard specs: tidy the output, keep the shards whose sidecars
    say they are complete and current, and build the others on Ray, `make_build(num_to_build)` giving
    the task function or ActorPool. Returns every spec's sidecar by index, the sidecars built now, and
    the seconds spent building (Ray's start excluded)."""
    import time

    tidy_output(output, name, len(specs), storage_options)
    sidecars = complete_sidecars(specs, storage_options)
    to_build = [spec for spec in specs if spec.index not in sidecars]
    log.info("%d of %d shards complete, building %d", len(sidecars), len(specs), len(to_build))
    built: list[dict[str, Any]] = []
    seconds = 0.0
    if to_build:
        from sharding.ray_runtime import init_ray

        init_ray(ray_cfg)  # before the clock starts: throughput counts building, not Ray's start
        start = time.perf_counter()
        by_shard = {spec.shard: spec.index for spec in to_build}
        try:
            for sidecar in build_on_ray([asdict(spec) for spec in to_build], make_build(len(to_build)), ray_cfg,
                                        progress=progress, desc=desc):
                sidecars[by_shard[sidecar["shard"]]] = sidecar
                built.append(sidecar)
        except Exception as error:  # a worker's OSError arrives wrapped in Ray's exceptions
            cause = _os_error_in(error)
            if cause is None:
                raise
            raise UserError(f"{os_error_line(cause)}: building shards in {output} stopped; the {len(sidecars)} complete "
                            "shards are kept and a re-run builds the rest") from None
        seconds = time.perf_counter() - start
    return sidecars, built, seconds


_OS_ERROR_TEXT = re.compile(r"(?:OSError|\w+Error): \[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]+)')?")


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError a Ray task raised: found through the exceptions Ray and Ray Data wrap it in, or, as
    those do not always keep it as an object across processes, read back from their text."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    match = _OS_ERROR_TEXT.search(str(error))
    return OSError(int(match.group(1)), match.group(2), match.group(3)) if match else None


# ------------------------------------------------------------------ finishing


@dataclass
class BuildReport:
    """What a pipeline run made: the manifest, and what this run itself built (for the summary line)."""

    manifest: Manifest
    output: str  # the dataset root
    unit: str  # "windows", "clips"
    num_built_shards: int
    num_built_samples: int
    num_built_bytes: int
    build_seconds: float

    def contents(self) -> str:
        """The summary line's first part: what the whole dataset holds (`totals()` and the pipeline's own counts)."""
        raise NotImplementedError

    def totals(self) -> tuple[int, int, int]:
        """(train samples, val samples, bytes) of the whole dataset."""
        manifest = self.manifest
        return manifest.num_samples("train"), manifest.num_samples("val"), sum(shard.num_bytes for shard in manifest.shards)

    def summary(self) -> str:
        line = self.contents() + "; "
        if self.num_built_shards == 0:
            return line + "nothing to build (all shards complete)"
        seconds = max(self.build_seconds, 1e-9)
        return line + (f"built {self.num_built_shards} shards in {self.build_seconds:.1f} s "
                       f"({self.num_built_samples / seconds:.1f} {self.unit}/s, {self.num_built_bytes / 1e6 / seconds:.2f} MB/s)")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def claim_output(output: str, storage_options: dict[str, Any] | None, made_from: dict[str, Any], overwrite: bool,
                 identity: Callable[[Manifest], dict[str, Any]] = lambda manifest: manifest.created_by) -> None:
    """A build never replaces a complete dataset made from other settings: when `output` holds a manifest
    whose identity (its `created_by`, by default) differs from `made_from`, this is a UserError naming the
    differences; with `overwrite` that dataset is moved aside to OUTPUT.old-N first, never deleted. The
    same settings (a re-run, new or changed input files) build on what is there."""
    from sharding.manifest import manifest_url

    if not storage.exists(manifest_url(output), storage_options):
        return
    try:
        before = _flat(identity(Manifest.read(output, storage_options)))
        now = _flat(made_from)
        differences = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
                       if before.get(key) != now.get(key)]
    except UserError:
        differences = ["its manifest is unreadable"]
    if not differences:
        return
    if not overwrite:
        raise UserError(f"{output} holds a dataset made with other settings ({'; '.join(differences[:3])}"
                        f"{'; ...' if len(differences) > 3 else ''}): choose another output, or pass --overwrite to move "
                        "it aside (nothing is deleted)")
    moved = storage.move_aside(output, storage_options)
    log.warning("--overwrite: moved the dataset that was in %s to %s", output, moved)


def created_by(cfg: Any, program: str, how_it_ran: tuple[str, ...] = ("ray", "launch")) -> dict[str, Any]:
    """The manifest's `created_by`: the program and what it was asked to make (no credentials, not how it ran).

    Every section's `storage_options` goes (source, input, shards: they may hold credentials, and
    say where the bytes were, not what they are), and so do the `how_it_ran` sections (Ray,
    cluster submission: `launch.env` may hold credentials too).
    """
    config = asdict(cfg)
    for name in how_it_ran:
        config.pop(name, None)
    labels = config.get("labels")
    if isinstance(labels, dict) and not (labels.get("files") or labels.get("annotations")):
        config.pop("labels")  # none: a dataset made before labels existed keeps its identity (claim_output)
    for section in config.values():
        if isinstance(section, dict):
            section.pop("storage_options", None)
    return {"program": program, "config": config}


def skipped_summary(skipped: list[SkippedInput], limit: int = 3) -> str:
    """One line: how many inputs were skipped, and the first few with their reasons."""
    shown = "; ".join(f"{entry.path} ({entry.reason})" for entry in skipped[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"{len(skipped)} input(s) skipped: {shown}{more}"


def finish_manifest(manifest: Manifest, output: str, storage_options: dict[str, Any] | None, *, strict: bool = False) -> None:
    """Write `manifest` at `output` unless it is already there; with `strict`, a skipped input is an error instead.

    The shards already built stay (a re-run without the bad inputs reuses them); only the
    manifest, which marks the dataset as ready, is held back.
    """
    if manifest.skipped:
        if strict:
            first = manifest.skipped[0]
            more = f" (and {len(manifest.skipped) - 1} more skipped inputs)" if len(manifest.skipped) > 1 else ""
            raise UserError(f"--strict: {first.path}: {first.reason}{more}")
        log.warning(skipped_summary(manifest.skipped))
    try:
        previous = Manifest.read(output, storage_options)
    except ValueError:
        previous = None
    if previous is None or previous.to_json() != manifest.to_json():
        manifest.write(output, storage_options)


# ------------------------------------------------------------------- verify


def _shape_matches(shape: tuple[int, ...], expected: list[int | None]) -> bool:
    """`expected` dims of None (JSON null) match any size: e.g. the channel count of MEG windows."""
    return len(shape) == len(expected) and all(want is None or want == got for got, want in zip(shape, expected))


def _check_samples(shard: str, samples: list[dict[str, Any]], fields: dict[str, dict[str, Any]]) -> list[str]:
    field_names = {field.rsplit(".", 1)[0] for field in fields}
    problems = []
    for sample in samples:
        names = set(sample) - {"__key__"}
        if names != field_names:
            return [f"{shard}: sample {sample['__key__']} has fields {sorted(names)}, manifest records {sorted(field_names)}"]
        for field, spec in fields.items():
            if not field.endswith(".npy"):
                continue
            value = sample[field.rsplit(".", 1)[0]]
            if value.dtype != np.dtype(spec["dtype"]) or not _shape_matches(value.shape, spec["shape"]):
                problems.append(f"{shard}: sample {sample['__key__']} {field} is {value.dtype}{list(value.shape)}, "
                                f"manifest records {spec['dtype']}{spec['shape']}")
                return problems
    return problems


def verify_dataset(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Problems with the dataset at `url` (missing/changed/truncated shards, wrong counts, fields,
    dtypes or shapes, repeated keys, bad manifest); [] if sound."""
    try:
        manifest = Manifest.read(url, storage_options)
    except ValueError as error:
        return [str(error)]
    problems = []
    keys: set[str] = set()
    num_repeated = 0
    for shard in manifest.shards:
        shard_url = storage.join(url, shard.name)
        num_bytes = storage.size(shard_url, storage_options)
        if num_bytes is None:
            problems.append(f"{shard.name}: missing")
            continue
        if num_bytes != shard.num_bytes:
            problems.append(f"{shard.name}: {num_bytes} bytes, manifest records {shard.num_bytes}")
            continue
        if storage.sha256_of(shard_url, storage_options) != shard.sha256:
            problems.append(f"{shard.name}: sha256 differs from the manifest")
            continue
        try:
            samples = read_shard(shard_url, storage_options)
        except ValueError as error:
            problems.append(f"{shard.name}: {error}")
            continue
        if len(samples) != shard.num_samples:
            problems.append(f"{shard.name}: {len(samples)} samples, manifest records {shard.num_samples}")
            continue
        problems.extend(_check_samples(shard.name, samples, manifest.fields))
        shard_keys = [sample["__key__"] for sample in samples]
        num_repeated += len(shard_keys) - len(set(shard_keys) - keys)
        keys.update(shard_keys)
    if num_repeated:
        problems.append(f"{num_repeated} sample keys occur more than once")
    if manifest.kind == "text_tokens":  # the BPE the dataset was made with lives inside it
        tokenizer_url = storage.join(url, manifest.tokenizer.get("path", "tokenizer"), "tokenizer.json")
        if not storage.exists(tokenizer_url, storage_options):
            problems.append(f"{tokenizer_url}: missing")
        elif storage.sha256_of(tokenizer_url, storage_options) != manifest.tokenizer.get("sha256"):
            problems.append(f"{tokenizer_url}: sha256 differs from the manifest")
    return problems
