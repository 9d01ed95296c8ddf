"""Class labels of MEG/EEG windows (`labels` section of a prepare config), for the classifiers.

A label comes from one of two places:

- `labels.files`: the class of the whole recording, by a glob pattern (or file name) of its path;
- `labels.annotations`: the recording's annotations (events with a description, onset and duration,
  as mne reads them from FIF, EDF, BrainVision, ...): a window takes the class whose annotations
  overlap it most (an annotation of duration 0 counts when its onset lies in the window); a window
  that no mapped annotation touches is left out;
- `labels.events`: the event ids of the recording's stim channel (mne.find_events), which become
  annotations `event ID` of duration 0 and label windows as above.

Every window sample then stores `label.npy` (int64, shape ()): the index of its class. The manifest
names the classes in index order (`fields["label.npy"]["classes"]`) and counts them per split
(`stats["label_counts"]`); a class that a split lacks is named in a warning.

Everything that can be wrong with the labels is found by `plan_labels` on the driver, before
anything is written: a file no pattern maps (or two patterns map to different classes), a pattern
that matches no file, an annotation description that is neither mapped nor ignored, recordings
without a single mapped annotation. Each is a one-line UserError.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from typing import Any, Callable

import numpy as np

from core.config import LabelsConfig
from core.errors import UserError

log = logging.getLogger(__name__)

LABEL_FIELD = "label.npy"


EVENT_PREFIX = "event "  # the description of a stim channel event's annotation: "event 3"


def has_labels(cfg: LabelsConfig) -> bool:
    return bool(cfg.files or cfg.annotations or cfg.events)


def class_names(cfg: LabelsConfig) -> list[str]:
    """Class names in index order: labels.classes, else in the order the mapping first names them."""
    return list(cfg.classes) or list(dict.fromkeys([*cfg.files.values(), *cfg.annotations.values(), *cfg.events.values()]))


def read_events(raw: Any, stim_channel: str | None) -> Any:
    """The (N, 3) events of `raw`'s stim channel; ValueError when it has none."""
    import mne

    return mne.find_events(raw, stim_channel=stim_channel, shortest_event=1, consecutive=True, verbose="error")


def add_event_annotations(raw: Any, stim_channel: str | None) -> None:
    """Each stim channel event of `raw` as an annotation `event ID` of duration 0 (before its channels are picked)."""
    import mne

    events = read_events(raw, stim_channel)
    if len(events):
        descriptions = {int(i): f"{EVENT_PREFIX}{int(i)}" for i in set(events[:, 2])}
        marks = mne.annotations_from_events(events, raw.info["sfreq"], event_desc=descriptions, first_samp=raw.first_samp,
                                            orig_time=raw.annotations.orig_time, verbose="error")
        raw.set_annotations(raw.annotations + marks)


def _matches(source: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(source, pattern) or fnmatch.fnmatchcase(os.path.basename(source.rstrip("/")), pattern)


def _file_classes(cfg: LabelsConfig, sources: list[str], classes: list[str]) -> dict[str, int]:
    unused = [pattern for pattern in cfg.files if not any(_matches(source, pattern) for source in sources)]
    if unused:
        raise UserError(f"labels.files: {unused[0]!r} matches none of the {len(sources)} input files (source.paths)")
    by_source = {}
    for source in sources:
        named = {cfg.files[pattern] for pattern in cfg.files if _matches(source, pattern)}
        if not named:
            raise UserError(f"labels.files: {source} has no label: no pattern of {list(cfg.files)} matches it")
        if len(named) > 1:
            raise UserError(f"labels.files: {source} matches patterns of different classes {sorted(named)}")
        by_source[source] = classes.index(named.pop())
    return by_source


def _is_ignored(description: str, ignore: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(description, pattern) for pattern in ignore)


def _marks(path: str, cfg: LabelsConfig) -> list[str]:
    """The distinct annotation descriptions (labels.annotations) or event ids (labels.events) of the recording at `path`."""
    import mne

    if cfg.annotations:
        return list(dict.fromkeys(mne.read_annotations(path).description))
    raw = mne.io.read_raw(path, preload=False, verbose="error")
    try:
        events = read_events(raw, cfg.stim_channel)
    except ValueError as error:  # no stim channel
        raise UserError(f"labels.events: {path}: {str(error).splitlines()[0]}") from None
    return [str(i) for i in sorted(set(events[:, 2].tolist()))]


def _check_marks(cfg: LabelsConfig, sources: list[str], source_options: dict[str, Any] | None) -> None:
    """Every annotation description (event id) of every recording is mapped or ignored, and some recording has a mapped one."""
    from sharding import storage

    section = "annotations" if cfg.annotations else "events"
    mapping = getattr(cfg, section)
    what = "annotation" if cfg.annotations else "event id"
    num_mapped = 0
    for source in sources:
        try:
            with storage.local_file(source, source_options) as path:
                marks = _marks(path, cfg)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - no annotations, or a file the reader skips later with its reason
            continue
        for mark in marks:
            if mark in mapping:
                num_mapped += 1
            elif not _is_ignored(mark, cfg.ignore):
                raise UserError(f"labels.{section}: {source} has {what} {mark!r}, which is not in the mapping "
                                f"{list(mapping)} (map it, or add it to labels.ignore)")
    if num_mapped == 0:
        raise UserError(f"labels.{section}: none of the {len(sources)} recordings has an {what} of {list(mapping)}")


def plan_labels(cfg: LabelsConfig, sources: list[str], source_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What a shard task needs to label its windows (JSON), after checking the labels against the inputs;
    None without labels."""
    if not has_labels(cfg):
        return None
    classes = class_names(cfg)
    if cfg.files:
        return {"classes": classes, "files": _file_classes(cfg, sources, classes)}
    _check_marks(cfg, sources, source_options)
    if cfg.events:
        return {"classes": classes, "annotations": {f"{EVENT_PREFIX}{key}": classes.index(name) for key, name in cfg.events.items()},
                "events": True, "stim_channel": cfg.stim_channel}
    return {"classes": classes, "annotations": {key: classes.index(name) for key, name in cfg.annotations.items()}}


def shard_plan(plan: dict[str, Any] | None, sources: list[str]) -> dict[str, Any] | None:
    """The part of `plan` a shard of `sources` needs (its build id covers it: a file added elsewhere
    changes no other shard's)."""
    if plan is None or "files" not in plan:
        return plan
    return {**plan, "files": {source: plan["files"][source] for source in sources}}


def window_labeller(plan: dict[str, Any], source: str, raw: Any) -> Callable[[int, int], int | None]:
    """label(start, stop) of a window of samples [start, stop) of `raw` (the recording as windowed:
    filtered and resampled, time 0 at its first sample): the class index, or None (no label)."""
    if "files" in plan:
        index = plan["files"][source]
        return lambda start, stop: index
    mapping = plan["annotations"]
    annotations = raw.annotations
    spans: list[tuple[int, int, int]] = []  # (first sample, end sample, class)
    if len(annotations):
        starts = raw.time_as_index(annotations.onset, use_rounding=True, origin=annotations.orig_time)
        lengths = np.round(np.asarray(annotations.duration) * raw.info["sfreq"]).astype(int)
        for description, first, length in zip(annotations.description, starts, lengths):
            if description in mapping:
                spans.append((int(first), int(first) + max(int(length), 0), mapping[description]))
    num_classes = len(plan["classes"])

    def label(start: int, stop: int) -> int | None:
        overlap = np.zeros(num_classes)
        touched = False
        for first, end, index in spans:
            if end == first:  # an event: its onset in the window
                if start <= first < stop:
                    overlap[index] += 1e-9
                    touched = True
            elif first < stop and end > start:
                overlap[index] += min(end, stop) - max(first, start)
                touched = True
        return int(overlap.argmax()) if touched else None

    return label


def label_counts(samples: list[dict[str, Any]]) -> dict[int, int]:
    """{class index: windows} of samples that carry a label."""
    counts: dict[int, int] = {}
    for sample in samples:
        value = sample.get(LABEL_FIELD, sample.get("label"))
        if value is not None:
            counts[int(value)] = counts.get(int(value), 0) + 1
    return counts


def split_counts(classes: list[str], shard_counts: list[tuple[str, dict]]) -> dict[str, dict[str, int]]:
    """{split: {class name: windows}} from (split, sidecar label_counts) pairs; warns of a class a split lacks."""
    totals = {split: dict.fromkeys(classes, 0) for split in ("train", "val")}
    for split, counts in shard_counts:
        for index, count in (counts or {}).items():
            totals[split][classes[int(index)]] += count
    for split, counts in totals.items():
        if not sum(counts.values()):
            continue
        missing = [name for name, count in counts.items() if count == 0]
        if missing:
            log.warning("labels: the %s split has no windows of class%s %s (%d windows of the others)", split,
                        "es" if len(missing) > 1 else "", ", ".join(repr(name) for name in missing), sum(counts.values()))
    return totals
