"""`tokfleet analyze DATASET`: what the tokens of a token dataset look like.

For any token dataset (text or token ids packed into sequences, MEG/EEG codes, video codes):
vocabulary usage, unigram entropy and the bigram conditional entropy H(next | previous), the
transition matrix, the most frequent n-gram patterns, distinct-n, outlier samples by their
likelihood under the dataset's own unigram / bigram model, and for code grids the same per channel
(height) and per RVQ level. Writes `analysis.json` and PNGs.

What a "sequence" is:
- a packed sequence sample (`seq_len + 1` ids at stride `seq_len`, so neighbours share one id) is one
  sequence; its unigram counts skip the first id, so every id of the stream is counted once (the same
  counts as the manifest's `unigram_entropy_nats`); its seq_len transitions are every adjacent pair once.
- a code grid sample (T, H, W, Q) holds H*W*Q sequences, one per position and level, each along time:
  transitions and n-grams run along time, where the forecasters predict.

Bounded memory: shards are streamed (a process holds a few shards, their counts and the running
totals; pass 1's samples and ShardIndex stay for pass 2 up to CACHE_BYTES). Counts that grow with the
data are kept sparse, as sorted (code, count) arrays: transitions exactly; distinct-1 and -2 from
those (exact), distinct-3 and -4 from a k-minimum-values sketch (exact up to `SKETCH_SIZE` distinct
n-grams, an estimate within ~1% above).

3/4-gram patterns (heavy hitters, bounded memory, exact counts): each shard keeps its `max_patterns`
(at least TOP) most frequent n-grams with their counts; any other n-gram occurs in that shard at most
`slack` times (the largest count it dropped). Merging sums the kept counts and the slacks, and cutting
the running table back to `max_patterns` adds the largest count it dropped to the slack. So for every
n-gram, partial <= true count <= partial + slack (partial = 0 for one not kept). Pass 2 recounts exactly every
candidate whose upper bound reaches the TOP-th largest partial count (at most RECOUNT of them), so:
- every listed count is exact;
- `pattern_unlisted_max_count[n]` bounds the count of any n-gram not listed (the larger of the
  largest recounted count below the list and slack + the largest partial count not recounted);
- `patterns_exact` is true when that bound is at most the TOP-th listed count: the list is then the
  true top TOP (ties in any order). Below `max_patterns` distinct n-grams a shard the slack is 0,
  every n-gram is a candidate and the list is exact (small data).

Speed (tests/bench/test_analyze_bench.py): counting is sorts (numpy's SIMD sort of uint64; an argsort is
done as a sort of code and position packed in one uint64), each shard sorted once per order in pass 1
(ShardIndex) and looked up, not sorted again, in pass 2; no per-sample Python beyond the tar reader.
Reading the tars is Python that holds the GIL, so a forked reader process reads one shard ahead while
this one counts (a two-stage pipeline), and pass 1's PNGs are drawn by another forked process while
pass 2 runs.

Distributed: with `--ray` the per-shard work runs as Ray tasks on the existing Ray runtime (a local
instance or `ray.address`); the counts merge the same way, so the result is the same.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import multiprocessing
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from core.errors import UserError
from sharding import storage
from sharding.analysis_report import summarize, text_names
from sharding.manifest import Manifest, ShardRecord, manifest_url
from sharding.shards import CorruptSample, decode_sample, field_specs, split_samples
from sharding.token_counts import (TOP, Counts, Table, kth_largest, largest, max_order, mix, ngram_codes, run_lengths, runs, smallest,
                                   sort_with_order, top)
from sharding.token_grid import TOKENS_FIELD, TokenGrid

log = logging.getLogger(__name__)

MAX_PATTERNS = 2048  # candidate 3/4-grams kept per shard and in the running merge, per order
RECOUNT = 1024  # candidates recounted exactly in pass 2, per order (at most)
CACHE_BYTES = 256 << 20  # decoded samples kept from pass 1 for pass 2 (in-process runs)


@dataclass(frozen=True)
class Layout:
    """How a dataset's token samples turn into sequences (see the module docstring)."""

    vocab_size: int
    grid: TokenGrid | None  # None: packed sequences
    specs: Any  # field specs, to check every decoded sample

    def sequences(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """samples (B, *stored) -> (sequences (S, L) for transitions and n-grams, the ids counted once);
        S is sample-major (a sample's rows are adjacent)."""
        if self.grid is None:
            return tokens, tokens[:, 1:]
        grid = self.canonical(tokens)  # (B, T, H, W, Q)
        sequences = np.moveaxis(grid, 1, -1).reshape(-1, grid.shape[1])
        return sequences, sequences

    def canonical(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        return self.grid.to_canonical(torch.from_numpy(tokens.astype(np.int64))).numpy()


# ----------------------------------------------------------------------------------------------------
# reading


def read_samples(manifest_root: str, shard: ShardRecord, layout: Layout, storage_options: dict | None = None
                 ) -> tuple[list[str], np.ndarray]:
    """(keys, tokens (B, *stored) in the stored dtype) of one shard, its sha256 and every sample checked
    against the manifest."""
    url = storage.join(manifest_root, shard.name)
    data = storage.read_bytes(url, storage_options)
    if shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise UserError(f"shard {url}: sha256 differs from the manifest's (the file changed or is damaged); "
                        "re-run `tokfleet prepare`/`pretokenize` for it")
    samples = split_samples(data)
    keys = [key for key, _ in samples]
    if not samples:
        return keys, np.zeros((0,), np.int64)
    tokens = _decode_tokens(url, samples, layout)
    if tokens.size and int(tokens.max()) >= layout.vocab_size:
        raise UserError(f"shard {url}: token id {int(tokens.max())} is outside the manifest's vocab_size {layout.vocab_size}")
    return keys, tokens


def _decode_tokens(url: str, samples: list[tuple[str, dict]], layout: Layout) -> np.ndarray:
    """The tokens of every sample (B, *stored), checked as `decode_sample` checks them.

    A shard's token members share one .npy header (same dtype and shape); the first is decoded and
    checked in full, and every other member with that exact header and length is one row of a single
    buffer: one copy for the shard instead of one decode per sample (a third of a read otherwise). Any
    other member goes through `decode_sample`, which names what is wrong with it.
    """
    name = TOKENS_FIELD.rsplit(".", 1)[0]

    def decoded(key: str, fields: dict) -> np.ndarray:
        try:
            return decode_sample(key, fields, layout.specs)[name]
        except CorruptSample as error:
            raise UserError(f"shard {url}: {error}") from None

    first = decoded(*samples[0])
    values = [fields.get(TOKENS_FIELD) for _, fields in samples]
    size = len(values[0])
    header = bytes(values[0][: size - first.nbytes])
    if b"'fortran_order': False" in header and all(
            value is not None and len(value) == size and value[: len(header)] == header for value in values):
        rows = np.frombuffer(b"".join(values), np.uint8).reshape(len(values), size)[:, len(header):]
        return np.ascontiguousarray(rows).view(first.dtype).reshape(len(values), *first.shape)
    return np.stack([first, *(decoded(key, fields) for key, fields in samples[1:])])


@dataclass(frozen=True)
class ShardIndex:
    """One shard's n-grams, sorted once: pass 1 counts from it and pass 2 scores from it (kept with the
    samples between the passes when they fit CACHE_BYTES)."""

    tables: dict[int, Table]  # n -> the shard's distinct n-grams (base-V codes) and their counts
    bigram_order: np.ndarray  # int32: the positions (sample-major) of the shard's transitions, sorted by code

    @property
    def nbytes(self) -> int:
        return self.bigram_order.nbytes + sum(codes.nbytes + counts.nbytes for codes, counts in self.tables.values())


def index_tokens(tokens: np.ndarray, layout: Layout) -> ShardIndex:
    """The ShardIndex of one shard's samples (B, *stored)."""
    vocab = layout.vocab_size
    if not len(tokens):
        return ShardIndex({}, np.zeros(0, np.int32))
    codes = {n: grams.reshape(-1) for n, grams in ngram_codes(layout.sequences(tokens)[0], vocab, max_order(vocab))}
    sorted_codes, order = sort_with_order(codes.pop(2), vocab**2)  # the transitions with their positions
    starts = runs(sorted_codes)
    tables = {2: (sorted_codes[starts], run_lengths(starts, len(sorted_codes)))}
    for n, grams in codes.items():  # each order is built from the one before: sorted in place once all are
        grams.sort()
        starts = runs(grams)
        tables[n] = grams[starts], run_lengths(starts, len(grams))
    return ShardIndex(tables, order.astype(np.int32))


def count_tokens(tokens: np.ndarray, index: ShardIndex, layout: Layout, max_patterns: int) -> Counts:
    """Pass 1 over one shard's samples (B, *stored) and their index."""
    vocab = layout.vocab_size
    counts = Counts(vocab)
    if not len(tokens):
        return counts
    _, once = layout.sequences(tokens)
    counts.num_samples = len(tokens)
    counts.num_tokens = int(once.size)
    counts.unigram = np.bincount(once.reshape(-1), minlength=vocab).astype(np.int64)
    counts.ngram_totals[1] = int(once.size)
    for n, table in index.tables.items():
        counts.ngram_totals[n] = int(table[1].sum())
        if n == 2:  # kept whole: distinct-2 is exact, no sketch
            counts.transitions = table
        else:
            counts.sketches[n] = smallest(mix(table[0]))  # codes are unique, so are their hashes
            # this shard's most frequent n-grams; any other occurs here at most `slack` times
            counts.patterns[n], counts.pattern_slack[n] = top(table, max(max_patterns, TOP))
    if layout.grid is not None:
        grid = layout.canonical(tokens)  # (B, T, H, W, Q)
        _, _, height, _, levels = grid.shape
        by_height = np.moveaxis(grid, 2, 0).reshape(height, -1)
        by_level = np.moveaxis(grid, 4, 0).reshape(levels, -1)
        counts.by_height = np.stack([np.bincount(row, minlength=vocab) for row in by_height]).astype(np.int64)
        counts.by_level = np.stack([np.bincount(row, minlength=vocab) for row in by_level]).astype(np.int64)
    return counts


def pattern_candidates(counts: Counts) -> dict[int, np.ndarray]:
    """n -> the candidate n-grams (sorted codes) pass 2 recounts: every one that can be among the TOP most
    frequent (partial + slack reaches the TOP-th largest partial count), the RECOUNT likeliest at most."""
    candidates = {}
    for n, (codes, partial) in counts.patterns.items():
        floor = kth_largest(partial, TOP) if len(partial) > TOP else 0
        possible = partial + counts.pattern_slack.get(n, 0) >= floor
        (candidates[n], _), _ = top((codes[possible], partial[possible]), RECOUNT)
    return candidates


def exact_patterns(counts: Counts, candidates: dict[int, np.ndarray], recounts: dict[int, np.ndarray]
                   ) -> dict[int, tuple[Table, int]]:
    """n -> (the candidates with their exact counts, at most how often any other n-gram occurs)."""
    result = {}
    for n, (codes, partial) in counts.patterns.items():
        left_out = partial[~np.isin(codes, candidates[n], assume_unique=True)]
        bound = counts.pattern_slack.get(n, 0) + (int(left_out.max()) if len(left_out) else 0)
        result[n] = ((candidates[n], recounts.get(n, np.zeros(len(candidates[n]), np.int64))), bound)
    return result


@dataclass(frozen=True)
class Model:
    """The dataset's own unigram and bigram models (maximum likelihood), for scoring samples, and the
    candidate n-grams to recount."""

    unigram_nll: np.ndarray  # (V,) -log p(id); inf for unused ids
    transition_codes: np.ndarray  # sorted prev * V + next
    transition_nll: np.ndarray  # -log p(next | prev)
    candidates: dict[int, np.ndarray]  # n -> sorted n-gram codes, see pattern_candidates

    @classmethod
    def from_counts(cls, counts: Counts) -> Model:
        vocab = counts.vocab_size
        with np.errstate(divide="ignore"):
            unigram_nll = -np.log(counts.unigram / max(counts.unigram.sum(), 1))
        codes, values = counts.transitions
        previous = (codes // np.uint64(vocab)).astype(np.int64)
        from_previous = np.bincount(previous, weights=values, minlength=vocab)
        return cls(unigram_nll, codes, -np.log(values / from_previous[previous]), pattern_candidates(counts))


def score_tokens(tokens: np.ndarray, index: ShardIndex, layout: Layout, model: Model
                 ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Pass 2 over one shard's samples (B, *stored) and their index: (mean bigram NLL (B,), mean unigram
    NLL (B,), n -> how often each candidate n-gram occurs here)."""
    recounts = {}
    for n, targets in model.candidates.items():
        codes, counts = index.tables.get(n, (np.zeros(0, np.uint64), np.zeros(0, np.int64)))
        rows = np.minimum(np.searchsorted(codes, targets), max(len(codes) - 1, 0))
        recounts[n] = np.where(codes[rows] == targets, counts[rows], 0) if len(codes) else np.zeros(len(targets), np.int64)
    if not len(tokens):
        return np.zeros(0), np.zeros(0), recounts
    _, once = layout.sequences(tokens)
    bigram = np.zeros(len(tokens))
    if index.bigram_order.size:  # each distinct transition of the shard looked up once
        codes, counts = index.tables[2]
        nll = np.repeat(model.transition_nll[np.searchsorted(model.transition_codes, codes)], counts)
        per_sample = len(index.bigram_order) // len(tokens)
        bigram = np.bincount(index.bigram_order // per_sample, weights=nll, minlength=len(tokens)) / per_sample
    unigram = model.unigram_nll[once.reshape(len(tokens), -1)].mean(axis=1)
    return bigram, unigram, recounts


# least likely: odd or noisy samples; most likely: repetitive ones (boilerplate, a stuck sensor);
# rarest ids: samples made of ids the rest of the data hardly uses. (name, which score, sign: larger first)
OUTLIER_KINDS = (("least_likely", 0, 1.0), ("most_likely", 0, -1.0), ("rarest_ids", 1, 1.0))


def outlier_candidates(keys: list[str], shard: str, bigram: np.ndarray, unigram: np.ndarray, number: int
                       ) -> dict[str, list[tuple[float, float, str, str]]]:
    """Each outlier kind's `number` most extreme samples of one shard: (bigram NLL, unigram NLL, key, shard),
    the most extreme first (ties: the earlier sample)."""
    scores = (bigram, unigram)
    return {name: [(float(bigram[i]), float(unigram[i]), keys[i], shard) for i in largest(sign * scores[which], number)]
            for name, which, sign in OUTLIER_KINDS}


@dataclass
class Distribution:
    """Mean, spread and a histogram of per-sample scores in constant memory."""

    high: float
    bins: int = 2000
    count: int = 0
    total: float = 0.0
    total_squares: float = 0.0
    histogram: np.ndarray = field(default=None)

    def __post_init__(self):
        self.histogram = np.zeros(self.bins, np.int64)

    def add(self, values: np.ndarray) -> None:
        self.count += len(values)
        self.total += float(values.sum())
        self.total_squares += float((values**2).sum())
        index = np.clip((values / self.high * self.bins).astype(np.int64), 0, self.bins - 1)
        self.histogram += np.bincount(index, minlength=self.bins)

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def std(self) -> float:
        return math.sqrt(max(self.total_squares / max(self.count, 1) - self.mean**2, 0.0))

    def percentile(self, q: float) -> float:
        """Upper edge of the bin holding the q-th percentile (resolution high / bins)."""
        rank = np.searchsorted(np.cumsum(self.histogram), q / 100 * self.count)
        return float((min(rank, self.bins - 1) + 1) * self.high / self.bins)


# ----------------------------------------------------------------------------------------------------
# the command


@dataclass
class AnalyzeOptions:
    split: str = "train"  # train | val | all
    max_patterns: int = MAX_PATTERNS
    num_outliers: int = 10
    use_ray: bool = False
    ray_address: str | None = None
    plots: bool = True  # False: analysis.json only
    storage_options: dict[str, Any] | None = None


def layout_of(manifest: Manifest, url: str) -> Layout:
    spec = manifest.fields.get(TOKENS_FIELD)
    if spec is None or not manifest.vocab_size:
        raise UserError(f"{url}: not a token dataset (kind {manifest.kind!r}, no {TOKENS_FIELD} with a vocab_size); "
                        "analyze reads the shards of `tokfleet prepare` (text, tokens) or `tokfleet pretokenize`")
    grid = TokenGrid.from_manifest(manifest, url)
    if grid is None and len(spec.get("shape", [])) != 1:
        raise UserError(f"{url}: {TOKENS_FIELD} of shape {spec.get('shape')} names no grid axes; re-run `tokfleet pretokenize`")
    return Layout(int(manifest.vocab_size), grid, field_specs({TOKENS_FIELD: spec}))


def _map(load: Callable, work: Callable, shards: list[ShardRecord], args: tuple, options: AnalyzeOptions,
         kept: dict[str, tuple] | None = None) -> Iterator[Any]:
    """work(shard, *loaded, *args) for every shard, in shard order, where `loaded` is `kept.pop(shard.name)`
    for a shard in `kept`, else load(shard): here, or as Ray tasks.

    Here, the shards not kept are loaded by a forked reader process one shard ahead (_forked_map): reading
    is the tar reader's Python, which holds the GIL, and the work beside it is numpy, so the two run on two
    cores as a pipeline (pass 1 on the demo's text: 0.57 s -> 0.41 s). Only the tokens cross the pipe.
    """
    kept = {} if kept is None else kept
    if not options.use_ray:
        loads = _forked_map(load, [shard for shard in shards if shard.name not in kept])
        try:
            for shard in shards:
                loaded = kept.pop(shard.name) if shard.name in kept else next(loads)
                yield work(shard, *loaded, *args)
        finally:
            loads.close()  # a forked reader still running (an error here) is stopped
        return
    import ray

    def function(shard, *args):
        return work(shard, *load(shard), *args)

    task = ray.remote(function)
    args = tuple(ray.put(arg) for arg in args)  # once, not once per task
    ready_limit = max(int(ray.available_resources().get("CPU", 1)) * 2, 2)
    pending, results, next_out = {}, {}, 0
    for index, shard in enumerate(shards):
        pending[task.remote(shard, *args)] = index
        while len(pending) >= ready_limit or (index == len(shards) - 1 and pending):
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
            while next_out in results:  # hand results on in shard order (the merge is exact in any order)
                yield results.pop(next_out)
                next_out += 1
    while next_out in results:
        yield results.pop(next_out)
        next_out += 1


def _can_fork() -> bool:
    """Whether a forked helper process is safe here: Linux, and no Ray driver threads in this process."""
    ray = sys.modules.get("ray")
    return sys.platform == "linux" and not (ray is not None and ray.is_initialized())


def _forked_map(function: Callable, items: list) -> Iterator[Any]:
    """function(item) for each item, in order, as an iterator with close(). Where _can_fork, a forked process
    started now computes them ahead of the caller (the pipe holds it back: at most about one item ahead);
    else they are computed here as the caller asks. For reading shards and drawing PNGs: both are Python
    that holds the GIL, so only a process runs them beside this one's work (a thread slowed the work about
    as much as it helped)."""
    if not items or not _can_fork():
        return (function(item) for item in items)
    return _Forked(function, items)


def _send_all(function: Callable, items: list, send) -> None:
    """The forked process of _Forked: each result, or the first error, down the pipe."""
    for item in items:
        try:
            result = True, function(item)
        except BaseException as error:  # noqa: BLE001 - handed to the parent, which raises it
            send.send((False, error))
            return
        send.send(result)


class _Forked:
    """The results of a forked _send_all, in order; close() (also after the last or an error) stops and
    reaps the process, whether or not it was ever read."""

    def __init__(self, function: Callable, items: list):
        context = multiprocessing.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)
        self._left = len(items)
        self._process = context.Process(target=_send_all, args=(function, items, send), daemon=True)
        self._process.start()
        send.close()

    def __iter__(self) -> _Forked:
        return self

    def __next__(self) -> Any:
        if not self._left:
            self.close()
            raise StopIteration
        try:
            is_done, value = self._receive.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"analyze's helper process ended early (exit code {self._process.exitcode})") from None
        self._left -= 1
        if not is_done:
            self.close()
            raise value
        return value

    def close(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._receive.close()


def analyze(url: str, out: str | Path, options: AnalyzeOptions | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Analyze the token dataset at `url`; write `analysis.json` and PNGs under `out`; returns the report."""
    options = options or AnalyzeOptions()
    manifest = Manifest.read(url, options.storage_options)
    root = manifest_url(url).rsplit("/", 1)[0]
    layout = layout_of(manifest, url)
    splits = ("train", "val") if options.split == "all" else (options.split,)
    shards = [shard for shard in manifest.shards if shard.split in splits]
    if not shards:
        raise UserError(f"{url}: no {options.split} shards to analyze")
    if options.use_ray:
        from core.config import RayConfig
        from sharding.ray_runtime import init_ray

        init_ray(RayConfig(address=options.ray_address))
    so = options.storage_options

    # in this process, the samples of pass 1 stay for pass 2 while they fit CACHE_BYTES (one read each);
    # Ray tasks read each shard twice
    cache: dict[str, tuple[list[str], np.ndarray, ShardIndex]] = {}
    cached_bytes = 0

    def read(shard):
        return read_samples(root, shard, layout, so)

    def counted(shard, keys, tokens, layout, max_patterns):
        nonlocal cached_bytes
        index = index_tokens(tokens, layout)
        if not options.use_ray and cached_bytes + tokens.nbytes + index.nbytes <= CACHE_BYTES:
            cache[shard.name] = keys, tokens, index
            cached_bytes += tokens.nbytes + index.nbytes
        return count_tokens(tokens, index, layout, max_patterns)

    total = Counts(layout.vocab_size)
    for index, counts in enumerate(_map(read, counted, shards, (layout, options.max_patterns), options)):
        total.merge(counts, options.max_patterns)
        if progress:
            progress(f"counted shard {index + 1}/{len(shards)}")
    total.consolidate(options.max_patterns)
    model = Model.from_counts(total)

    def read_again(shard):
        return (*read(shard), None)

    def scored(shard, keys, tokens, index, layout, model, num_outliers):
        bigram, unigram, recounts = score_tokens(tokens, index or index_tokens(tokens, layout), layout, model)
        return bigram, outlier_candidates(keys, shard.name, bigram, unigram, num_outliers), recounts

    out = Path(out)
    drawn = None
    if options.plots:  # pass 1's PNGs are drawn while pass 2 runs
        from sharding.analysis_plots import draw_counts, draw_sample_nll

        out.mkdir(parents=True, exist_ok=True)
        drawn = _forked_map(lambda counts: draw_counts(counts, out), [total])  # drawn while pass 2 runs
    ranked = {name: [] for name, _, _ in OUTLIER_KINDS}
    # a per-token NLL under the data's own MLE bigram model is at most log(number of transitions)
    distribution = Distribution(high=math.log(max(int(total.transitions[1].sum()), 2)) + 1e-9)
    recounts = {n: np.zeros(len(codes), np.int64) for n, codes in model.candidates.items()}
    try:
        for index, (bigram, candidates, shard_recounts) in enumerate(
                _map(read_again, scored, shards, (layout, model, options.num_outliers), options, kept=cache)):
            for n, found in shard_recounts.items():
                recounts[n] += found
            distribution.add(bigram)
            for name, which, sign in OUTLIER_KINDS:
                ranked[name] = heapq.nlargest(options.num_outliers, [*ranked[name], *candidates[name]],
                                              key=lambda entry: sign * entry[which])
            if progress:
                progress(f"scored shard {index + 1}/{len(shards)}")
    except BaseException:
        if drawn is not None:
            drawn.close()  # the PNG process, drawing or done
        raise
    report = {"dataset": url, "name": manifest.name, "kind": manifest.kind, "split": options.split,
              "num_shards": len(shards), **summarize(total, layout.grid, text_names(root, manifest, so),
                                                     exact_patterns(total, model.candidates, recounts))}
    report["sample_nll"] = {"bigram_mean": distribution.mean, "bigram_std": distribution.std,
                            "bigram_p50": distribution.percentile(50), "bigram_p99": distribution.percentile(99)}
    std = max(distribution.std, 1e-12)
    report["outliers"] = {name: [{"key": key, "shard": shard, "bigram_nll": b, "unigram_nll": u,
                                  "bigram_z": (b - distribution.mean) / std} for b, u, key, shard in entries]
                          for name, entries in ranked.items()}
    plots = []
    if drawn is not None:
        sample_nll = draw_sample_nll(distribution, report["outliers"], out / "sample_nll.png")  # the rest still drawing
        plots = [*next(drawn), sample_nll]
        drawn.close()
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [str(path) for path in plots]
    storage.write_text_atomic(str(out / "analysis.json"), json.dumps(report, indent=1) + "\n")
    return report
