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
(ShardIndex) and looked up, not sorted again, in pass 2; no per-sample Python beyond the tar reader;
pass 1's PNGs are drawn by a forked process while pass 2 runs (matplotlib holds the GIL).

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
from sharding.manifest import Manifest, ShardRecord, manifest_url
from sharding.shards import CorruptSample, decode_sample, field_specs, split_samples
from sharding.token_grid import CANONICAL_AXES, TOKENS_FIELD, TokenGrid

log = logging.getLogger(__name__)

NGRAM_ORDERS = (2, 3, 4)  # patterns; distinct-n also for n = 1
SKETCH_SIZE = 1 << 16  # k of the k-minimum-values sketch behind distinct-n
DENSE_HEATMAP_VOCAB = 4096  # a full transition heatmap up to this vocabulary; the most used ids beyond
TOP = 20
MAX_PATTERNS = 2048  # candidate 3/4-grams kept per shard and in the running merge, per order
RECOUNT = 1024  # candidates recounted exactly in pass 2, per order (at most)
PENDING_ENTRIES = 1 << 23  # sparse table entries gathered from shards before they are merged in one sort
CACHE_BYTES = 256 << 20  # decoded samples kept from pass 1 for pass 2 (in-process runs)

Table = tuple[np.ndarray, np.ndarray]  # (sorted distinct uint64 codes, int64 counts)


# ----------------------------------------------------------------------------------------------------
# sparse counts: sorted unique uint64 codes with int64 counts. Only plain np.sort is used on big arrays
# (a SIMD sort here: ~10x faster than argsort, ~8x faster than a stable sort of the same uint64s)


def _runs(sorted_codes: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array."""
    if not len(sorted_codes):
        return np.zeros(0, np.intp)
    is_start = np.empty(len(sorted_codes), bool)
    is_start[0] = True
    np.not_equal(sorted_codes[1:], sorted_codes[:-1], out=is_start[1:])
    return np.flatnonzero(is_start)


def _run_lengths(starts: np.ndarray, size: int) -> np.ndarray:
    return np.diff(starts, append=size).astype(np.int64)


def _sort_with_order(codes: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes sorted, the permutation that sorts them) for uint64 codes below `bound`: the position is
    packed into the low bits and one plain sort does the work of an argsort where the bits allow."""
    bits = max(len(codes) - 1, 1).bit_length()
    if bound <= 1 << (64 - bits):
        packed = codes << np.uint64(bits)
        packed |= np.arange(len(codes), dtype=np.uint64)
        packed.sort()
        order = (packed & np.uint64((1 << bits) - 1)).view(np.int64)
        packed >>= np.uint64(bits)
        return packed, order
    order = np.argsort(codes)
    return codes[order], order


def _count(codes: np.ndarray) -> Table:
    """(sorted distinct codes, how often each occurs)."""
    codes = np.sort(codes)
    starts = _runs(codes)
    return codes[starts], _run_lengths(starts, len(codes))


def _merge_many(tables: list[Table], bound: int) -> Table:
    """Several sparse count tables of codes below `bound` as one (one sort over all of them)."""
    tables = [table for table in tables if len(table[0])]
    if len(tables) <= 1:
        return tables[0] if tables else (np.zeros(0, np.uint64), np.zeros(0, np.int64))
    codes, order = _sort_with_order(np.concatenate([t[0] for t in tables]), bound)
    starts = _runs(codes)
    return codes[starts], np.add.reduceat(np.concatenate([t[1] for t in tables])[order], starts).astype(np.int64)


def _kth_largest(values: np.ndarray, k: int):
    """The k-th largest of `values` (k <= len): a sort, ~20x faster here than np.partition on counts,
    which are full of ties."""
    return np.sort(values)[len(values) - k]


def _top(table: Table, cap: int) -> tuple[Table, int]:
    """The `cap` most frequent entries (ties: smaller codes first; still sorted by code) and the largest
    count dropped (0: nothing dropped)."""
    codes, counts = table
    if len(codes) <= cap:
        return table, 0
    kth = _kth_largest(counts, cap)
    keep = counts > kth
    keep[np.flatnonzero(counts == kth)[: cap - int(keep.sum())]] = True
    return (codes[keep], counts[keep]), int(counts[~keep].max())


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first, ties by index: a stable argsort's first k, with
    only the candidates lexsorted."""
    if len(values) > k:
        kth = _kth_largest(values, k)
        candidates = np.flatnonzero(values >= kth)
    else:
        candidates = np.arange(len(values))
    return candidates[np.lexsort((candidates, -values[candidates]))][:k]


def _mix(codes: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: n-gram codes -> well-spread 64-bit hashes for the sketch."""
    with np.errstate(over="ignore"):
        z = codes.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _sketch(hashes: np.ndarray, size: int = SKETCH_SIZE) -> np.ndarray:
    """The `size` smallest distinct hashes (sorted)."""
    hashes = np.sort(hashes)
    return hashes[_runs(hashes)][:size]


def _merge_sketches(sketches: list[np.ndarray], size: int = SKETCH_SIZE) -> np.ndarray:
    """The sketch of the union of several sketches (each the `size` smallest of its distinct hashes, in
    any order); sorted. Values above a full sketch's largest cannot enter: they are cut before the sort."""
    cut = min((sketch.max() for sketch in sketches if len(sketch) >= size), default=None)
    if cut is not None:
        sketches = [sketch[sketch <= cut] for sketch in sketches]
    return _sketch(np.concatenate(sketches), size)


def _smallest(distinct_hashes: np.ndarray, size: int = SKETCH_SIZE) -> np.ndarray:
    """The sketch of values already distinct (hashes of unique codes), unsorted: a partition, no sort."""
    if len(distinct_hashes) > size:
        return np.partition(distinct_hashes, size - 1)[:size]
    return distinct_hashes


def _sketch_estimate(sketch: np.ndarray, size: int = SKETCH_SIZE) -> tuple[int, bool]:
    """(number of distinct values, exact?) from a k-minimum-values sketch."""
    if len(sketch) < size:
        return len(sketch), True
    kth = float(sketch[size - 1]) / 2.0**64
    return int(round((size - 1) / kth)), False


# ----------------------------------------------------------------------------------------------------
# what one shard (or several, merged) holds


@dataclass
class Counts:
    vocab_size: int
    num_samples: int = 0
    num_tokens: int = 0
    unigram: np.ndarray | None = None  # (V,) int64
    transitions: Table = (np.zeros(0, np.uint64), np.zeros(0, np.int64))  # prev * V + next, exact
    # n (3, 4) -> candidate n-grams (base-V codes) with partial counts: every n-gram occurs at least its
    # partial count and at most its partial count (0 if absent) + pattern_slack[n] times (module docstring)
    patterns: dict[int, Table] = field(default_factory=dict)
    pattern_slack: dict[int, int] = field(default_factory=dict)
    sketches: dict[int, np.ndarray] = field(default_factory=dict)  # n (3, 4) -> KMV sketch of hashes (sorted once merged)
    ngram_totals: dict[int, int] = field(default_factory=dict)  # n -> number of n-grams
    by_height: np.ndarray | None = None  # (H, V) int64 for code grids
    by_level: np.ndarray | None = None  # (Q, V) int64

    def __post_init__(self):
        if self.unigram is None:
            self.unigram = np.zeros(self.vocab_size, np.int64)
        self._pending: dict[Any, list[Table]] = {}  # tables merged at the next consolidate
        self._pending_entries = 0
        self._pending_sketches: dict[int, list[np.ndarray]] = {}  # merged 4 shards' worth at a time

    def merge(self, other: Counts, max_patterns: int) -> Counts:
        """Add `other` (its sparse tables join once PENDING_ENTRIES have gathered: one sort for many shards)."""
        self.num_samples += other.num_samples
        self.num_tokens += other.num_tokens
        self.unigram += other.unigram
        for key, table in [(2, other.transitions), *other.patterns.items()]:
            self._pending.setdefault(key, []).append(table)
            self._pending_entries += len(table[0])
        if self._pending_entries > PENDING_ENTRIES:
            self.consolidate(max_patterns)
        for n, slack in other.pattern_slack.items():
            self.pattern_slack[n] = self.pattern_slack.get(n, 0) + slack
        for n, sketch in other.sketches.items():
            pending = self._pending_sketches.setdefault(n, [self.sketches.get(n, sketch[:0])])
            pending.append(sketch[sketch <= pending[0][-1]] if len(pending[0]) >= SKETCH_SIZE else sketch)
            if sum(map(len, pending)) > 4 * SKETCH_SIZE:
                self._merge_pending_sketches()
        for n, total in other.ngram_totals.items():
            self.ngram_totals[n] = self.ngram_totals.get(n, 0) + total
        for name in ("by_height", "by_level"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.copy() if mine is None else mine + theirs)
        return self

    def consolidate(self, max_patterns: int) -> Counts:
        """Merge the pending tables (candidates cut to `max_patterns`); call before reading the tables."""
        for n, tables in self._pending.items():
            bound = self.vocab_size**n
            if n == 2:
                self.transitions = _merge_many([self.transitions, *tables], bound)
            else:
                merged = _merge_many([self.patterns[n], *tables] if n in self.patterns else tables, bound)
                self.patterns[n], dropped = _top(merged, max(max_patterns, TOP))
                self.pattern_slack[n] = self.pattern_slack.get(n, 0) + dropped
        self._pending, self._pending_entries = {}, 0
        self._merge_pending_sketches()
        return self

    def _merge_pending_sketches(self) -> None:
        for n, sketches in self._pending_sketches.items():
            self.sketches[n] = _merge_sketches(sketches, SKETCH_SIZE)
        self._pending_sketches = {}


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


def ngram_codes(sequences: np.ndarray, vocab_size: int, max_n: int) -> Iterator[tuple[int, np.ndarray]]:
    """(n, codes (S, L - n + 1)) for n = 2..max_n: every n-gram within each row of `sequences` (S, L) as a
    base-V uint64 code (first id most significant), each order built from the one before."""
    ids = sequences.astype(np.uint64)
    codes = ids
    for n in range(2, max_n + 1):
        length = max(ids.shape[1] - n + 1, 0)
        codes = codes[:, :length] * np.uint64(vocab_size) + ids[:, n - 1 : n - 1 + length]
        yield n, codes


def max_order(vocab_size: int) -> int:
    """The longest n-gram whose base-V code fits in 63 bits."""
    return max(n for n in (1, *NGRAM_ORDERS) if vocab_size**n < 2**63)


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
    sorted_codes, order = _sort_with_order(codes.pop(2), vocab**2)  # the transitions with their positions
    starts = _runs(sorted_codes)
    tables = {2: (sorted_codes[starts], _run_lengths(starts, len(sorted_codes)))}
    for n, grams in codes.items():  # each order is built from the one before: sorted in place once all are
        grams.sort()
        starts = _runs(grams)
        tables[n] = grams[starts], _run_lengths(starts, len(grams))
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
            counts.sketches[n] = _smallest(_mix(table[0]))  # codes are unique, so are their hashes
            # this shard's most frequent n-grams; any other occurs here at most `slack` times
            counts.patterns[n], counts.pattern_slack[n] = _top(table, max(max_patterns, TOP))
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
        floor = _kth_largest(partial, TOP) if len(partial) > TOP else 0
        possible = partial + counts.pattern_slack.get(n, 0) >= floor
        (candidates[n], _), _ = _top((codes[possible], partial[possible]), RECOUNT)
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
    return {name: [(float(bigram[i]), float(unigram[i]), keys[i], shard) for i in _largest(sign * scores[which], number)]
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
# statistics


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of the distribution `counts` describes."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts / total
    return float(-(p * np.log(p)).sum())


def conditional_entropy(transitions: tuple[np.ndarray, np.ndarray], vocab_size: int) -> float:
    """H(next | previous) = H(previous, next) - H(previous), nats, from transition counts."""
    codes, values = transitions
    previous = (codes // np.uint64(vocab_size)).astype(np.int64)
    return entropy(values) - entropy(np.bincount(previous, weights=values, minlength=vocab_size))


def decode_code(code: int, n: int, vocab_size: int) -> list[int]:
    ids = []
    for _ in range(n):
        code, last = divmod(code, vocab_size)
        ids.append(int(last))
    return ids[::-1]


def _usage(unigram: np.ndarray) -> dict[str, Any]:
    total = int(unigram.sum())
    used = int((unigram > 0).sum())
    return {"num_tokens": total, "used_ids": used, "used_fraction": used / len(unigram),
            "unigram_entropy_nats": entropy(unigram), "perplexity": math.exp(entropy(unigram))}


def summarize(counts: Counts, layout: Layout, names: Callable[[list[int]], str] | None,
              patterns: dict[int, tuple[Table, int]] | None = None) -> dict[str, Any]:
    """The report's statistics; `patterns`: n -> (exact counts of candidate n-grams, at most how often any
    other n-gram occurs), see exact_patterns."""
    vocab = counts.vocab_size
    unigram = counts.unigram
    total = max(int(unigram.sum()), 1)
    used = np.flatnonzero(unigram)
    rarest = used[np.lexsort((-used, unigram[used]))][:TOP]  # the least used first, ties by larger id
    bigram_h = conditional_entropy(counts.transitions, vocab)
    report: dict[str, Any] = {
        "vocab_size": vocab,
        "num_samples": counts.num_samples,
        **_usage(unigram),
        "unigram_entropy_bits": entropy(unigram) / math.log(2),
        "max_entropy_nats": math.log(vocab),
        "bigram_conditional_entropy_nats": bigram_h,
        "bigram_perplexity": math.exp(bigram_h),
        "most_frequent": [_named({"ids": [int(i)], "count": int(unigram[i]), "fraction": float(unigram[i] / total)}, names)
                          for i in _largest(unigram, TOP) if unigram[i] > 0],
        "least_frequent_used": [_named({"ids": [int(i)], "count": int(unigram[i])}, names)
                                for i in rarest],
    }
    codes, values = counts.transitions
    previous = (codes // np.uint64(vocab)).astype(np.int64)
    from_previous = np.bincount(previous, weights=values, minlength=vocab)
    top = _largest(values, TOP * 2)
    report["top_transitions"] = [
        _named({"ids": decode_code(int(codes[i]), 2, vocab), "count": int(values[i]),
                "p_next_given_previous": float(values[i] / from_previous[previous[i]])}, names) for i in top]
    report["num_distinct_transitions"] = int(len(codes))
    # 2-grams straight from the exact transitions; 3/4-grams: the candidates pass 2 recounted
    patterns = {2: ((codes, values), 0), **(patterns or {})}
    report["patterns"], report["pattern_unlisted_max_count"], exact = {}, {}, True
    for n, ((pattern_codes, pattern_counts), bound) in sorted(patterns.items()):
        listed = _largest(pattern_counts, TOP)  # ties: smaller code first (codes are sorted)
        report["patterns"][str(n)] = [
            _named({"ids": decode_code(int(pattern_codes[i]), n, vocab), "count": int(pattern_counts[i])}, names) for i in listed]
        # an n-gram not listed: counted exactly below the list, or not a candidate (at most `bound`)
        unlisted = max(bound, int(np.delete(pattern_counts, listed).max(initial=0)))
        report["pattern_unlisted_max_count"][str(n)] = unlisted
        exact &= unlisted == 0 or (len(listed) == TOP and unlisted <= int(pattern_counts[listed[-1]]))
    report["patterns_exact"] = bool(exact)
    distinct = {}
    exactly = {1: (int((unigram > 0).sum()), True), 2: (len(counts.transitions[0]), True)}
    for n in sorted({*exactly, *counts.sketches} & set(counts.ngram_totals)):
        number, exact = exactly[n] if n in exactly else _sketch_estimate(counts.sketches[n])
        ngrams = counts.ngram_totals.get(n, 0)
        distinct[str(n)] = {"distinct": number, "total": ngrams, "distinct_fraction": number / max(ngrams, 1), "exact": exact}
    report["distinct_n"] = distinct
    if counts.by_height is not None:
        axes = {AXIS: size for AXIS, size in zip(CANONICAL_AXES, layout.grid.canonical_shape)}
        report["grid"] = {"axes": list(layout.grid.axes), "shape": list(layout.grid.shape), "canonical": axes}
        report["by_channel"] = [_usage(row) for row in counts.by_height]
        report["by_level"] = [_usage(row) for row in counts.by_level]
    return report


def _named(entry: dict[str, Any], names: Callable[[list[int]], str] | None) -> dict[str, Any]:
    if names is not None:
        entry["text"] = names(entry["ids"])
    return entry


def text_names(root: str, manifest: Manifest, storage_options: dict | None) -> Callable[[list[int]], str] | None:
    """ids -> text, for a dataset that ships its BPE tokenizer."""
    if manifest.tokenizer.get("kind") != "bpe" or not manifest.tokenizer.get("path"):
        return None
    from tokenizers import Tokenizer  # the tokenizer file alone: no transformers import

    try:
        tokenizer = Tokenizer.from_str(storage.read_text(storage.join(root, manifest.tokenizer["path"], "tokenizer.json"), storage_options))
    except Exception:  # noqa: BLE001 - the names are a nicety; the report stands without them
        return None
    return lambda ids: tokenizer.decode(ids)


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


def _map(load: Callable, work: Callable, shards: list[ShardRecord], args: tuple, options: AnalyzeOptions) -> Iterator[Any]:
    """work(shard, *load(shard), *args) for every shard, in shard order: here, or as Ray tasks.

    (Loading ahead here, in a thread or a forked process, was slower or no faster: a thread because
    loading is Python that holds the GIL, a process for the copy-on-write faults it costs this one.)
    """
    if not options.use_ray:
        for shard in shards:
            yield work(shard, *load(shard), *args)
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
    """function(item) for each item, in order. Where _can_fork, a forked process started now computes them
    ahead of the caller (the pipe holds it back: at most about one item ahead); else they are computed here
    as the caller asks. Drawing PNGs is Python that holds the GIL: only a process runs it beside this
    one's work (a thread slowed pass 2 about as much as it helped)."""
    if not _can_fork():
        return map(function, items)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child():
        for item in items:
            try:
                result = True, function(item)
            except BaseException as error:  # noqa: BLE001 - handed to the parent, which raises it
                send.send((False, error))
                return
            send.send(result)

    process = context.Process(target=child, daemon=True)
    process.start()
    send.close()

    def results() -> Iterator[Any]:
        try:
            for _ in items:
                try:
                    is_done, value = receive.recv()
                except EOFError:
                    process.join()
                    raise RuntimeError(f"analyze's helper process ended early (exit code {process.exitcode})") from None
                if not is_done:
                    raise value
                yield value
        finally:
            if process.is_alive():
                process.terminate()
            process.join()
            receive.close()

    return results()


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

    def cached_or_read(shard):
        return cache.pop(shard.name, None) or (*read(shard), None)

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
    for index, (bigram, candidates, shard_recounts) in enumerate(
            _map(cached_or_read, scored, shards, (layout, model, options.num_outliers), options)):
        for n, found in shard_recounts.items():
            recounts[n] += found
        distribution.add(bigram)
        for name, which, sign in OUTLIER_KINDS:
            ranked[name] = heapq.nlargest(options.num_outliers, [*ranked[name], *candidates[name]],
                                          key=lambda entry: sign * entry[which])
        if progress:
            progress(f"scored shard {index + 1}/{len(shards)}")
    report = {"dataset": url, "name": manifest.name, "kind": manifest.kind, "split": options.split,
              "num_shards": len(shards), **summarize(total, layout, text_names(root, manifest, so),
                                                     exact_patterns(total, model.candidates, recounts))}
    report["sample_nll"] = {"bigram_mean": distribution.mean, "bigram_std": distribution.std,
                            "bigram_p50": distribution.percentile(50), "bigram_p99": distribution.percentile(99)}
    std = max(distribution.std, 1e-12)
    report["outliers"] = {name: [{"key": key, "shard": shard, "bigram_nll": b, "unigram_nll": u,
                                  "bigram_z": (b - distribution.mean) / std} for b, u, key, shard in entries]
                          for name, entries in ranked.items()}
    plots = []
    if drawn:
        sample_nll = draw_sample_nll(distribution, report["outliers"], out / "sample_nll.png")  # the rest still drawing
        plots = [*next(drawn), sample_nll]
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [str(path) for path in plots]
    storage.write_text_atomic(str(out / "analysis.json"), json.dumps(report, indent=1) + "\n")
    return report


def format_report(report: dict[str, Any], out: str | Path) -> str:
    """The few lines `tokfleet analyze` prints."""
    distinct = report["distinct_n"]
    lines = [
        f"{report['dataset']} ({report['kind']}, {report['split']}): {report['num_samples']} samples, {report['num_tokens']} tokens, "
        f"{report['used_ids']} of {report['vocab_size']} ids used ({report['used_fraction']:.1%})",
        f"unigram entropy {report['unigram_entropy_nats']:.3f} nats ({report['unigram_entropy_bits']:.2f} bits, perplexity "
        f"{report['perplexity']:.1f}); H(next | previous) {report['bigram_conditional_entropy_nats']:.3f} nats "
        f"(perplexity {report['bigram_perplexity']:.1f}); log V {report['max_entropy_nats']:.3f}",
        "distinct-n: " + ", ".join(f"{n}: {entry['distinct_fraction']:.3f}{'' if entry['exact'] else ' (est.)'}" for n, entry in distinct.items()),
    ]
    for name, entries in report["outliers"].items():
        if entries:
            top = entries[0]
            lines.append(f"{name.replace('_', ' ')}: {top['key']} ({top['shard']}), bigram NLL {top['bigram_nll']:.3f} "
                         f"(z {top['bigram_z']:+.1f}), unigram NLL {top['unigram_nll']:.3f}")
    plots = ", ".join(Path(p).name for p in report["plots"]) or "none"
    lines.append(f"report: {Path(out) / 'analysis.json'}; plots: {plots}")
    return "\n".join(lines)
