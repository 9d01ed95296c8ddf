"""`tokfleet prepare` for tables of time series (source.kind timeseries): CSV / Parquet files ->
forecasting windows (context, target) in shards + manifest, on Ray Data.

    files (sorted) -> the driver reads each once (pandas): every configured column must be there
      and numeric, the time column (when set) sortable and without repeats; empty cells are an
      error or interpolated (timeseries.missing). A bad file is a one-line error naming it, the
      column and the row, before anything is written
    -> split: "time" holds out the last shards.val_fraction of every file's rows, "file" whole files
      (evenly spaced, as val_group_indexes picks shards)
    -> normalisation: one center and scale per column over the train rows of every file (stored in
      the manifest's stats; x = normalised * scale + center)
    -> windows of context_length + pred_length rows every `stride` rows: a train window lies in the
      train rows; a val window's target lies in the val rows and its context may reach back into the
      train rows (the known past), so no val target is ever a train input or target
    -> shards: files in groups of ~shards.source_bytes_per_shard, each group a train shard and a val
      shard; or (timeseries.windows_per_shard) each split's windows in order, that many a shard, so
      one long series makes several. Each is built by a Ray task (sharding.shard_build: tar, then
      sidecar; a re-run builds only the shards that are missing or stale, and starts Ray only then)
    -> manifest.json last (kind "timeseries_windows").

Each window is one sample, keyed source_sample_key(file, window index in the file: train windows
first, then val):

    context.npy     float32 (context_length, input_size)  normalised input columns
    target.npy      float32 (pred_length, output_size)    normalised target columns of the next rows
    last_value.npy  float32 (output_size,)                target columns at the context's last row
                                                           (the naive last-value forecast)
    meta.json       {"source", "window", "start_row", "split", "start_time" (with a time column)}

A file shorter than one train window is skipped (listed in the manifest; --strict: an error).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.config import PrepareConfig, TimeseriesConfig
from core.errors import UserError
from sharding import storage
from sharding.manifest import FORMAT_VERSION, Manifest, ShardRecord, SkippedInput
from sharding.prepare_signals import fields_of
from sharding.shard_build import (
    BuildReport,
    build_id,
    build_missing_shards,
    check_shard_name,
    claim_output,
    created_by,
    finish_manifest,
    first_line,
    group_documents,
    shard_sidecar,
    sidecar_name,
    val_group_indexes,
)
from sharding.shards import shard_name, source_sample_key, write_shard
from sharding.text_corpus import Document, corpus_fingerprint, list_files

log = logging.getLogger(__name__)

PROGRAM = "tokfleet prepare (sharding.timeseries)"
MANIFEST_KIND = "timeseries_windows"
READER_VERSION = 1  # bump when the same inputs and options give other samples: every shard is rebuilt
ROBUST_SCALE = 1.349  # IQR / 1.349 is the standard deviation of a normal distribution
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz", ".csv.zst")
TSV_SUFFIXES = (".tsv", ".tsv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


def target_columns(cfg: TimeseriesConfig) -> list[str]:
    return list(cfg.target_columns or cfg.input_columns)


def used_columns(cfg: TimeseriesConfig) -> list[str]:
    """Input, target and time columns, each once, in that order."""
    names = [*cfg.input_columns, *target_columns(cfg), *([cfg.time_column] if cfg.time_column else [])]
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------ reading one table


@dataclass
class Table:
    """The used columns of one file, rows in time order, empty cells filled (or none)."""

    values: dict[str, np.ndarray]  # column -> (num_rows,) float64
    times: list[Any] | None  # the time column's values (ISO text or numbers), or None
    num_filled: dict[str, int]  # column -> cells interpolated

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.values.values())))


def _read_frame(source: str, path: str, columns: list[str]):
    """The `columns` of the table at local `path` as a pandas DataFrame; UserError when it cannot be read or lacks one."""
    import pandas as pd

    name = source.rstrip("/").rsplit("/", 1)[-1].lower()
    try:
        if name.endswith(PARQUET_SUFFIXES):
            import pyarrow.parquet as pq

            present = pq.read_schema(path).names
            _check_columns(source, present, columns)
            return pd.read_parquet(path, columns=columns)
        if name.endswith(CSV_SUFFIXES + TSV_SUFFIXES):
            separator = "\t" if name.endswith(TSV_SUFFIXES) else ","
            present = list(pd.read_csv(path, sep=separator, nrows=0).columns)
            _check_columns(source, present, columns)
            # text, not pandas' guesses: numbers and dates are parsed below, where a bad cell can be named
            return pd.read_csv(path, sep=separator, usecols=columns, dtype=str, keep_default_na=False)
    except UserError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise UserError(f"{source}: not a readable table ({first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, ...) for a corrupt Parquet file
        raise UserError(f"{source}: not a readable table ({type(error).__name__}: {first_line(error)})") from None
    raise UserError(f"{source}: not a table: source.kind timeseries reads .csv, .tsv and .parquet files; "
                    "leave others out with source.exclude")


def _check_columns(source: str, present: list[str], wanted: list[str]) -> None:
    missing = [column for column in wanted if column not in present]
    if missing:
        shown = ", ".join(repr(c) for c in present[:12]) + (", ..." if len(present) > 12 else "")
        raise UserError(f"{source}: no column {', '.join(repr(c) for c in missing)} (the file has {shown})")


NA_TEXT = {"", "nan", "NaN", "NA", "N/A", "n/a", "null", "NULL", "None", "-"}  # empty cells of a CSV


def _numeric(source: str, column: str, series) -> np.ndarray:
    """(num_rows,) float64 of a column; NaN for empty cells; UserError naming the first cell that is no number."""
    import pandas as pd

    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        text = series.astype(str).str.strip()
        empty = text.isin(NA_TEXT)
        values = pd.to_numeric(text.where(~empty), errors="coerce")
        bad = values.isna() & ~empty
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{source}: column {column!r} is not numeric: data row {row + 1} holds {text.iloc[row]!r}")
        return values.to_numpy(dtype=np.float64)
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    raise UserError(f"{source}: column {column!r} is not numeric (its type is {series.dtype})")


def _time_order(source: str, column: str, series) -> tuple[np.ndarray, list[Any]]:
    """(row order sorting the table by time, the sorted times as ISO text or numbers) of the time column."""
    import pandas as pd

    text = series.astype(str).str.strip() if series.dtype == object or pd.api.types.is_string_dtype(series.dtype) else None
    if text is not None:
        numbers = pd.to_numeric(text, errors="coerce")
        if numbers.notna().all():
            series = numbers
        else:
            parsed = pd.to_datetime(text, errors="coerce", format="mixed")
            bad = parsed.isna().to_numpy()
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                if text.iloc[row] in NA_TEXT:
                    raise UserError(f"{source}: time column {column!r} is empty at data row {row + 1}")
                raise UserError(f"{source}: time column {column!r}: data row {row + 1} holds {text.iloc[row]!r}, "
                                "not a date or number")
            series = parsed
    if not (pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_datetime64_any_dtype(series.dtype)):
        raise UserError(f"{source}: time column {column!r} holds {series.dtype} values, not dates or numbers")
    if series.isna().any():
        row = int(np.flatnonzero(series.isna().to_numpy())[0])
        raise UserError(f"{source}: time column {column!r} is empty at data row {row + 1}")
    order = np.argsort(series.to_numpy(), kind="stable")
    ordered = series.iloc[order]
    repeated = np.flatnonzero(ordered.duplicated().to_numpy())
    if len(repeated):
        value = ordered.iloc[repeated[0]]
        raise UserError(f"{source}: time column {column!r} holds {value} more than once: one row per time step "
                        "(one series per file)")
    times = [t.isoformat() for t in ordered] if pd.api.types.is_datetime64_any_dtype(ordered.dtype) else ordered.tolist()
    return order, times


def _fill(source: str, column: str, values: np.ndarray, missing: str) -> int:
    """Interpolate the NaN of `values` in place (linear in row order, the nearest value at the ends); how many."""
    empty = np.isnan(values)
    if not empty.any():
        return 0
    row = int(np.flatnonzero(empty)[0])
    if missing == "error":
        raise UserError(f"{source}: column {column!r} is empty at row {row + 1} in time order ({int(empty.sum())} empty cells): "
                        "fill them, or set timeseries.missing: interpolate")
    if empty.all():
        raise UserError(f"{source}: column {column!r} has no value at all")
    rows = np.arange(len(values))
    values[empty] = np.interp(rows[empty], rows[~empty], values[~empty])
    return int(empty.sum())


def read_table(source: str, path: str, cfg: TimeseriesConfig) -> Table:
    """The used columns of the file at local `path` (read from `source`), checked, sorted and filled."""
    frame = _read_frame(source, path, used_columns(cfg))
    if len(frame) == 0:
        raise UserError(f"{source}: no rows")
    order, times = (_time_order(source, cfg.time_column, frame[cfg.time_column]) if cfg.time_column
                    else (np.arange(len(frame)), None))
    values, num_filled = {}, {}
    for column in dict.fromkeys([*cfg.input_columns, *target_columns(cfg)]):
        column_values = _numeric(source, column, frame[column])[order]
        if np.isinf(column_values).any():
            row = int(np.flatnonzero(np.isinf(column_values))[0])
            raise UserError(f"{source}: column {column!r} is infinite at row {row + 1} in time order")
        num_filled[column] = _fill(source, column, column_values, cfg.missing)
        values[column] = column_values
    return Table(values, times, num_filled)


# ------------------------------------------------------------------ windows and normalisation


def window_starts(num_rows: int, num_val_rows: int, cfg: TimeseriesConfig) -> tuple[range, range]:
    """(train, val) first rows of a file's windows: train windows in the first num_rows - num_val_rows rows,
    val windows with their target in the last num_val_rows (their context may reach back)."""
    length, boundary = cfg.context_length + cfg.pred_length, num_rows - num_val_rows
    train = range(0, max(0, boundary - length + 1), cfg.stride)
    val = range(max(0, boundary - cfg.context_length), max(0, num_rows - length + 1), cfg.stride) if num_val_rows else range(0)
    return train, val


def normalization_stats(columns: dict[str, np.ndarray], method: str) -> dict[str, dict[str, float]]:
    """column -> {"center", "scale"} of the train rows `columns` (x = normalised * scale + center);
    a column without spread keeps scale 1 (and a warning)."""
    stats = {}
    for column, values in columns.items():
        if method == "robust":
            q25, center, q75 = np.percentile(values, [25, 50, 75])
            scale = (q75 - q25) / ROBUST_SCALE
        elif method == "zscore":
            center, scale = values.mean(), values.std()
        else:
            center, scale = 0.0, 1.0
        if not scale > 0:
            log.warning("column %r does not vary over the train rows (%s scale 0): its scale is kept at 1", column, method)
            scale = 1.0
        stats[column] = {"center": float(center), "scale": float(scale)}
    return stats


def normalized(table: Table, columns: list[str], stats: dict[str, dict[str, float]]) -> np.ndarray:
    """(num_rows, len(columns)) float32 of `columns`, normalised."""
    return np.stack([(table.values[c] - stats[c]["center"]) / stats[c]["scale"] for c in columns], axis=1).astype(np.float32)


def table_windows(source: str, table: Table, cfg: TimeseriesConfig, stats: dict[str, dict[str, float]],
                  split: str, num_val_rows: int, first: int = 0, count: int | None = None) -> list[dict[str, Any]]:
    """The samples of one file's `split` windows [first, first + count) (all from `first` when count is None)."""
    inputs, targets = normalized(table, cfg.input_columns, stats), normalized(table, target_columns(cfg), stats)
    train, val = window_starts(table.num_rows, num_val_rows, cfg)
    before, starts = (0, train) if split == "train" else (len(train), val)  # a file's windows: train first, then val
    starts = starts[first:] if count is None else starts[first:first + count]
    context, samples = cfg.context_length, []
    for offset, start in enumerate(starts):
        end, window = start + context, before + first + offset
        meta = {"source": source, "window": window, "start_row": start, "split": split}
        if table.times is not None:
            meta["start_time"] = table.times[start]
        samples.append({
            "__key__": source_sample_key(source, window),
            "context.npy": np.ascontiguousarray(inputs[start:end]),
            "target.npy": np.ascontiguousarray(targets[end:end + cfg.pred_length]),
            "last_value.npy": np.ascontiguousarray(targets[end - 1]),
            "meta.json": meta,
        })
    return samples


# ------------------------------------------------------------------ planning (driver)


@dataclass
class ScannedTable:
    document: Document
    num_rows: int
    num_val_rows: int  # the last rows held out: split time, val_fraction of them; split file, all of a val file
    num_windows: dict[str, int]
    num_filled: dict[str, int]


def _val_rows(num_rows: int, cfg: PrepareConfig, is_val_file: bool) -> int:
    if cfg.timeseries.split == "file":
        return num_rows if is_val_file else 0
    return int(round(num_rows * cfg.shards.val_fraction))


def scan_tables(cfg: PrepareConfig, files: list[Document]) -> tuple[list[ScannedTable], dict[str, list[np.ndarray]]]:
    """Read every file once: (what each holds, column -> its train rows of every file)."""
    options = cfg.timeseries
    val_files = val_group_indexes(len(files), cfg.shards.val_fraction) if options.split == "file" else set()
    scanned, train_rows = [], {}
    for index, document in enumerate(files):
        try:
            with storage.local_file(document.source, cfg.source.storage_options) as path:
                table = read_table(document.source, path, options)
        except FileNotFoundError:
            raise UserError(f"{document.source}: not found (deleted after listing?)") from None
        num_val = _val_rows(table.num_rows, cfg, index in val_files)
        train, val = window_starts(table.num_rows, num_val, options)
        scanned.append(ScannedTable(document, table.num_rows, num_val, {"train": len(train), "val": len(val)}, table.num_filled))
        if (len(train) or len(val)) and table.num_rows > num_val:  # a usable file's rows before its held-out ones
            for column, values in table.values.items():
                train_rows.setdefault(column, []).append(values[:table.num_rows - num_val])
    return scanned, train_rows


@dataclass
class SeriesShardSpec:
    """Everything a Ray task needs to build one shard (JSON-serializable)."""

    index: int
    shard: str
    url: str
    sidecar_url: str
    build_id: str
    split: str
    options: dict[str, Any]  # TimeseriesConfig fields
    stats: dict[str, dict[str, float]]  # normalisation, column -> center and scale
    # {"source", "num_rows", "num_val_rows", "first", "count"}: windows [first, first + count) of one file's windows of this split
    pieces: list[dict[str, Any]]


def _piece(scanned: ScannedTable, first: int, count: int) -> dict[str, Any]:
    return {"source": scanned.document.source, "num_rows": scanned.num_rows, "num_val_rows": scanned.num_val_rows,
            "first": first, "count": count}


def _split_pieces(usable: list[ScannedTable], cfg: PrepareConfig) -> list[tuple[str, list[dict[str, Any]], list[Document]]]:
    """(split, pieces, their files) of each shard to build: whole files grouped by source bytes (a train and a
    val shard per group), or each split's windows in order, windows_per_shard at a time."""
    per_shard = cfg.timeseries.windows_per_shard
    shards = []
    if not per_shard:
        by_source = {scanned.document.source: scanned for scanned in usable}
        for group in group_documents([scanned.document for scanned in usable], cfg.shards.source_bytes_per_shard):
            for split in ("train", "val"):
                files = [by_source[d.source] for d in group if by_source[d.source].num_windows[split]]
                if files:
                    shards.append((split, [_piece(s, 0, s.num_windows[split]) for s in files], [s.document for s in files]))
        return shards
    for split in ("train", "val"):
        pieces, files, room = [], [], per_shard
        for scanned in usable:
            first, left = 0, scanned.num_windows[split]
            while left:
                count = min(left, room)
                pieces.append(_piece(scanned, first, count))
                files.append(scanned.document)
                first, left, room = first + count, left - count, room - count
                if room == 0:
                    shards.append((split, pieces, files))
                    pieces, files, room = [], [], per_shard
        if pieces:
            shards.append((split, pieces, files))
    return shards


def _shard_specs(cfg: PrepareConfig, usable: list[ScannedTable], stats: dict[str, dict[str, float]]) -> list[SeriesShardSpec]:
    shards_cfg = cfg.shards
    options = dict(cfg.timeseries.__dict__)
    specs: list[SeriesShardSpec] = []
    for split, pieces, group in _split_pieces(usable, cfg):
        index = len(specs)
        name = shard_name(shards_cfg.name, index)
        identity = {"format_version": FORMAT_VERSION, "reader_version": READER_VERSION, "name": shards_cfg.name,
                    "index": index, "split": split, "options": options, "stats": stats, "pieces": pieces,
                    "documents": corpus_fingerprint(group)}
        specs.append(SeriesShardSpec(index=index, shard=name, url=storage.join(shards_cfg.output, name),
                                     sidecar_url=storage.join(shards_cfg.output, sidecar_name(name)),
                                     build_id=build_id(identity), split=split, options=options, stats=stats, pieces=pieces))
    return specs


# ------------------------------------------------------------------ building (Ray task)


def build_series_shard(fields: dict[str, Any], storage_options: dict[str, Any] | None = None,
                       source_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read the spec's files again, cut their windows of the spec's split, write the shard, then its sidecar."""
    spec = SeriesShardSpec(**fields)
    options = TimeseriesConfig(**spec.options)
    samples = []
    for piece in spec.pieces:
        source = piece["source"]
        with storage.local_file(source, source_options) as path:
            table = read_table(source, path, options)
        if table.num_rows != piece["num_rows"]:
            raise UserError(f"{source}: changed while being prepared (run tokfleet prepare again)")
        windows = table_windows(source, table, options, spec.stats, spec.split, piece["num_val_rows"], piece["first"], piece["count"])
        assert len(windows) == piece["count"], (source, len(windows), piece)
        samples.extend(windows)
    written = write_shard(spec.url, samples, storage_options)
    sidecar = shard_sidecar(spec, written, split=spec.split, sources=[p["source"] for p in spec.pieces],
                            samples_per_source=[p["count"] for p in spec.pieces], fields=fields_of(samples))
    storage.write_text_atomic(spec.sidecar_url, json.dumps(sidecar, separators=(",", ":")), storage_options)
    return sidecar


# ------------------------------------------------------------------- driver


class TimeseriesReport(BuildReport):
    def contents(self) -> str:
        manifest = self.manifest
        train, val, num_bytes = self.totals()
        return (f"dataset {self.output}: {manifest.stats['num_files']} files -> {train} train + {val} val windows of "
                f"{manifest.seq_len} steps in {len(manifest.shards)} shards, {num_bytes / 1e6:.1f} MB, "
                f"{len(manifest.skipped)} inputs skipped")


def _check_options(cfg: PrepareConfig) -> None:
    options = cfg.timeseries
    if cfg.source.hf_dataset:
        raise UserError("source.hf_dataset: only source.kind text reads datasets; timeseries reads .csv / .parquet files from source.paths")
    if not cfg.source.paths:
        raise UserError("source.paths: list the tables to read (glob patterns of .csv / .parquet files)")
    if not options.input_columns:
        raise UserError("timeseries.input_columns: name the columns the model reads")
    if options.time_column and options.time_column in used_columns(options)[:-1]:
        raise UserError(f"timeseries.time_column {options.time_column!r} is also an input or target column")
    if options.split == "file" and cfg.shards.val_fraction > 0 and cfg.source.max_files == 1:
        raise UserError("timeseries.split file holds out whole files: source.max_files 1 leaves none for training")


def prepare_timeseries(cfg: PrepareConfig, progress: bool = True, strict: bool = False, overwrite: bool = False) -> TimeseriesReport:
    """Build (or complete) the time-series window dataset of `cfg` at `cfg.shards.output`.

    Every input is read and checked before anything is written; `strict`: a file shorter than one
    window is an error instead of a skipped input; `overwrite`: see claim_output.
    """
    shards_cfg, options = cfg.shards, cfg.timeseries
    output, storage_options = shards_cfg.output, shards_cfg.storage_options
    check_shard_name(shards_cfg.name)
    _check_options(cfg)
    length = options.context_length + options.pred_length

    files = list_files(cfg.source)
    scanned, train_rows = scan_tables(cfg, files)
    usable = [s for s in scanned if s.num_windows["train"] or s.num_windows["val"]]
    skipped = [SkippedInput(s.document.source, f"shorter than one window: {s.num_rows} rows ({s.num_rows - s.num_val_rows} "
                                               f"train), context_length + pred_length = {length} needed")
               for s in scanned if not (s.num_windows["train"] or s.num_windows["val"])]
    num_train = sum(s.num_windows["train"] for s in scanned)
    if num_train == 0:
        longest = max(scanned, key=lambda s: s.num_rows)
        held = f", {longest.num_val_rows} of them held out for val" if longest.num_val_rows else ""
        raise UserError(f"source.paths: no train window: the longest series, {longest.document.source}, has {longest.num_rows} rows"
                        f"{held}; a window is timeseries.context_length + pred_length = {length} rows")
    if shards_cfg.val_fraction > 0 and not any(s.num_windows["val"] for s in scanned):
        needs = (f"a held-out file of {length} rows or more" if options.split == "file" else
                 f"timeseries.pred_length = {options.pred_length} held-out rows after {options.context_length} others")
        raise UserError(f"shards.val_fraction {shards_cfg.val_fraction:g} holds out no val window (one needs {needs}): "
                        "raise it, or set it to 0 for no val split")
    if strict and skipped:
        raise UserError(f"--strict: {skipped[0].path}: {skipped[0].reason}")
    stats = normalization_stats({c: np.concatenate(v) for c, v in train_rows.items()}, options.normalization)
    log.info("%d tables, %d rows, %d train windows", len(files), sum(s.num_rows for s in scanned), num_train)

    claim_output(output, storage_options, created_by(cfg, PROGRAM), overwrite)
    specs = _shard_specs(cfg, usable, stats)
    build = functools.partial(build_series_shard, storage_options=storage_options, source_options=cfg.source.storage_options)
    sidecars, built, build_seconds = build_missing_shards(specs, lambda _: build, cfg.ray, output=output, name=shards_cfg.name,
                                                          storage_options=storage_options, progress=progress, desc="cut windows")
    manifest = _assemble_manifest(cfg, files, scanned, usable, skipped, specs, sidecars, stats)
    finish_manifest(manifest, output, storage_options, strict=strict)
    return TimeseriesReport(manifest, output, "windows", len(built), sum(s["num_samples"] for s in built),
                            sum(s["num_bytes"] for s in built), build_seconds)


def _assemble_manifest(cfg: PrepareConfig, files: list[Document], scanned: list[ScannedTable], usable: list[ScannedTable],
                       skipped: list[SkippedInput], specs: list[SeriesShardSpec], sidecars: dict[int, dict[str, Any]],
                       stats: dict[str, dict[str, float]]) -> Manifest:
    options = cfg.timeseries
    shards = [ShardRecord(spec.shard, spec.split, sidecars[spec.index]["num_samples"], sidecars[spec.index]["num_bytes"],
                          sidecars[spec.index]["sha256"], sidecars[spec.index]["sources"]) for spec in specs]
    fields = {}
    for spec in specs:
        for name, field in sidecars[spec.index]["fields"].items():
            fields.setdefault(name, dict(field))
    fields["context.npy"]["columns"] = list(options.input_columns)
    fields["target.npy"]["columns"] = target_columns(options)
    fields["last_value.npy"]["columns"] = target_columns(options)
    num_filled = {column: sum(s.num_filled.get(column, 0) for s in scanned) for column in stats}
    return Manifest(
        format_version=FORMAT_VERSION,
        name=cfg.shards.name,
        kind=MANIFEST_KIND,
        seq_len=options.context_length + options.pred_length,
        vocab_size=0,  # real values: no token ids
        fields=dict(sorted(fields.items())),
        shards=shards,
        tokenizer={},
        sources={"num_files": len(files), "num_bytes": sum(f.num_bytes for f in files)},
        skipped=sorted(skipped, key=lambda entry: entry.path),
        stats={
            "num_files": len(usable),
            "num_samples": {split: sum(s.num_samples for s in shards if s.split == split) for split in ("train", "val")},
            "num_rows": {"train": sum(s.num_rows - s.num_val_rows for s in usable), "val": sum(s.num_val_rows for s in usable)},
            "num_filled": num_filled,
            "normalization": {"method": options.normalization, "fitted_on": "train rows", "columns": stats},
        },
        created_by=created_by(cfg, PROGRAM),
    )
