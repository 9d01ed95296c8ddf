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

Bounded memory: shards are streamed one at a time (each process holds one shard, its counts and the
running totals). Counts that grow with the data are kept sparse: transitions and n-grams as sorted
(code, count) arrays, n-gram patterns pruned to the `max_patterns` most frequent after each merge (the
report says whether pruning happened: below the cap every count is exact), distinct-n from a
k-minimum-values sketch (exact up to `SKETCH_SIZE` distinct n-grams, an estimate within ~1% above).
Outliers need the whole-data model, so they take a second pass over the shards.

Distributed: with `--ray` the per-shard work runs as Ray tasks on the existing Ray runtime (a local
instance or `ray.address`); the counts merge the same way, so the result is the same.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
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
PENDING_ENTRIES = 1 << 23  # sparse table entries gathered from shards before they are merged in one sort
CACHE_BYTES = 256 << 20  # decoded samples kept from pass 1 for pass 2 (in-process runs)


# ----------------------------------------------------------------------------------------------------
# sparse counts: sorted unique uint64 codes with int64 counts


def _runs(sorted_codes: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array."""
    return np.concatenate([[0], np.flatnonzero(sorted_codes[1:] != sorted_codes[:-1]) + 1]) if len(sorted_codes) else np.zeros(0, np.int64)


def _count(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct codes, how often each occurs); a sort, not np.unique's hash table (several times slower here)."""
    codes = np.sort(codes.astype(np.uint64, copy=False))
    starts = _runs(codes)
    return codes[starts], np.diff(np.append(starts, len(codes))).astype(np.int64)



def _prune(table: tuple[np.ndarray, np.ndarray], cap: int) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
    """The `cap` most frequent entries (ties broken by code), and whether anything was dropped."""
    if len(table[0]) <= cap:
        return table, False
    keep = np.sort(np.lexsort((table[0], -table[1]))[:cap])
    return (table[0][keep], table[1][keep]), True


def _merge_many(tables: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several sparse count tables as one (one sort over all of them)."""
    tables = [table for table in tables if len(table[0])]
    if len(tables) <= 1:
        return tables[0] if tables else (np.zeros(0, np.uint64), np.zeros(0, np.int64))
    codes = np.concatenate([t[0] for t in tables])
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    starts = _runs(codes)
    return codes[starts], np.add.reduceat(np.concatenate([t[1] for t in tables])[order], starts).astype(np.int64)


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


def _smallest(distinct_hashes: np.ndarray, size: int = SKETCH_SIZE) -> np.ndarray:
    """The sketch of values already distinct (hashes of unique codes): no sort beyond the `size` smallest."""
    if len(distinct_hashes) > size:
        distinct_hashes = np.partition(distinct_hashes, size - 1)[:size]
    return np.sort(distinct_hashes)


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
    transitions: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.uint64), np.zeros(0, np.int64))  # prev * V + next
    patterns: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # n -> base-V codes
    sketches: dict[int, np.ndarray] = field(default_factory=dict)  # n -> KMV sketch of n-gram hashes
    ngram_totals: dict[int, int] = field(default_factory=dict)  # n -> number of n-grams
    is_pruned: bool = False
    by_height: np.ndarray | None = None  # (H, V) int64 for code grids
    by_level: np.ndarray | None = None  # (Q, V) int64

    def __post_init__(self):
        if self.unigram is None:
            self.unigram = np.zeros(self.vocab_size, np.int64)
        self._pending: dict[Any, list[tuple[np.ndarray, np.ndarray]]] = {}  # tables merged at the next consolidate
        self._pending_entries = 0

    def merge(self, other: Counts, max_patterns: int) -> Counts:
        """Add `other` (its sparse tables join once PENDING_ENTRIES have gathered: one sort for many shards)."""
        self.num_samples += other.num_samples
        self.num_tokens += other.num_tokens
        self.unigram += other.unigram
        self.is_pruned |= other.is_pruned
        for key, table in [("transitions", other.transitions), *other.patterns.items()]:
            self._pending.setdefault(key, []).append(table)
            self._pending_entries += len(table[0])
        if self._pending_entries > PENDING_ENTRIES:
            self.consolidate(max_patterns)
        for n, sketch in other.sketches.items():
            self.sketches[n] = _sketch(np.concatenate([self.sketches[n], sketch])) if n in self.sketches else sketch
        for n, total in other.ngram_totals.items():
            self.ngram_totals[n] = self.ngram_totals.get(n, 0) + total
        for name in ("by_height", "by_level"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.copy() if mine is None else mine + theirs)
        return self

    def consolidate(self, max_patterns: int) -> Counts:
        """Merge the pending tables (patterns pruned to `max_patterns`); call before reading the tables."""
        for key, tables in self._pending.items():
            if key == "transitions":
                self.transitions = _merge_many([self.transitions, *tables])
            else:
                merged = _merge_many([self.patterns[key], *tables] if key in self.patterns else tables)
                self.patterns[key], pruned = _prune(merged, max_patterns)
                self.is_pruned |= pruned
        self._pending, self._pending_entries = {}, 0
        return self


@dataclass(frozen=True)
class Layout:
    """How a dataset's token samples turn into sequences (see the module docstring)."""

    vocab_size: int
    grid: TokenGrid | None  # None: packed sequences
    specs: Any  # field specs, to check every decoded sample

    def sequences(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """samples (B, *stored) -> (sequences (S, L) for transitions and n-grams, the ids counted once)."""
        if self.grid is None:
            return tokens, tokens[:, 1:]
        grid = self.canonical(tokens)  # (B, T, H, W, Q)
        sequences = np.moveaxis(grid, 1, -1).reshape(-1, grid.shape[1])
        return sequences, sequences

    def canonical(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        return self.grid.to_canonical(torch.from_numpy(tokens)).numpy()


def ngram_codes(sequences: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
    """(S, L - n + 1): every n-gram within each row of `sequences` (S, L) as a base-V uint64 code (first
    id most significant)."""
    length = max(sequences.shape[1] - n + 1, 0)
    ids = sequences.astype(np.uint64)
    codes = np.zeros((sequences.shape[0], length), np.uint64)
    for k in range(n):
        codes = codes * np.uint64(vocab_size) + ids[:, k : k + length]
    return codes


def max_order(vocab_size: int) -> int:
    """The longest n-gram whose base-V code fits in 63 bits."""
    return max(n for n in (1, *NGRAM_ORDERS) if vocab_size**n < 2**63)


# ----------------------------------------------------------------------------------------------------
# reading


def read_samples(manifest_root: str, shard: ShardRecord, layout: Layout, storage_options: dict | None = None
                 ) -> tuple[list[str], np.ndarray]:
    """(keys, tokens (B, *stored)) of one shard, its sha256 and every sample checked against the manifest."""
    url = storage.join(manifest_root, shard.name)
    data = storage.read_bytes(url, storage_options)
    if shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise UserError(f"shard {url}: sha256 differs from the manifest's (the file changed or is damaged); "
                        "re-run `tokfleet prepare`/`pretokenize` for it")
    keys, arrays = [], []
    for key, fields in split_samples(data):
        try:
            sample = decode_sample(key, fields, layout.specs)
        except CorruptSample as error:
            raise UserError(f"shard {url}: {error}") from None
        keys.append(key)
        arrays.append(sample[TOKENS_FIELD.rsplit(".", 1)[0]])
    if not arrays:
        return keys, np.zeros((0,), np.int64)
    tokens = np.stack(arrays)
    if tokens.size and int(tokens.max()) >= layout.vocab_size:
        raise UserError(f"shard {url}: token id {int(tokens.max())} is outside the manifest's vocab_size {layout.vocab_size}")
    return keys, tokens.astype(np.int64)


def count_tokens(tokens: np.ndarray, layout: Layout, max_patterns: int) -> Counts:
    """Pass 1 over one shard's samples (B, *stored)."""
    vocab = layout.vocab_size
    counts = Counts(vocab)
    if not len(tokens):
        return counts
    sequences, once = layout.sequences(tokens)
    counts.num_samples = len(tokens)
    counts.num_tokens = int(once.size)
    counts.unigram = np.bincount(once.reshape(-1), minlength=vocab).astype(np.int64)
    counts.transitions = _count(ngram_codes(sequences, 2, vocab).reshape(-1))
    counts.ngram_totals[1] = int(once.size)
    counts.sketches[1] = _smallest(_mix(np.flatnonzero(counts.unigram).astype(np.uint64)))
    for n in NGRAM_ORDERS:
        if n > max_order(vocab):
            break
        table = counts.transitions if n == 2 else _count(ngram_codes(sequences, n, vocab).reshape(-1))
        counts.ngram_totals[n] = int(table[1].sum())
        counts.sketches[n] = _smallest(_mix(table[0]))  # codes are unique, so are their hashes
        counts.patterns[n], pruned = _prune(table, max_patterns)
        counts.is_pruned |= pruned
    if layout.grid is not None:
        grid = layout.canonical(tokens)  # (B, T, H, W, Q)
        _, _, height, _, levels = grid.shape
        by_height = np.moveaxis(grid, 2, 0).reshape(height, -1)
        by_level = np.moveaxis(grid, 4, 0).reshape(levels, -1)
        counts.by_height = np.stack([np.bincount(row, minlength=vocab) for row in by_height]).astype(np.int64)
        counts.by_level = np.stack([np.bincount(row, minlength=vocab) for row in by_level]).astype(np.int64)
    return counts


@dataclass(frozen=True)
class Model:
    """The dataset's own unigram and bigram models (maximum likelihood), for scoring samples."""

    unigram_nll: np.ndarray  # (V,) -log p(id); inf for unused ids
    transition_codes: np.ndarray  # sorted prev * V + next
    transition_nll: np.ndarray  # -log p(next | prev)

    @classmethod
    def from_counts(cls, counts: Counts) -> Model:
        vocab = counts.vocab_size
        with np.errstate(divide="ignore"):
            unigram_nll = -np.log(counts.unigram / max(counts.unigram.sum(), 1))
        codes, values = counts.transitions
        previous = (codes // np.uint64(vocab)).astype(np.int64)
        from_previous = np.bincount(previous, weights=values, minlength=vocab)
        return cls(unigram_nll, codes, -np.log(values / from_previous[previous]))


def score_tokens(keys: list[str], tokens: np.ndarray, layout: Layout, model: Model) -> list[tuple[float, float, str]]:
    """Pass 2 over one shard's samples: (bigram NLL, unigram NLL, key) per sample."""
    if not keys:
        return []
    sequences, once = layout.sequences(tokens)  # rows sample by sample
    codes = ngram_codes(sequences, 2, layout.vocab_size).reshape(len(keys), -1)
    bigram = model.transition_nll[np.searchsorted(model.transition_codes, codes)].mean(axis=1)
    unigram = model.unigram_nll[once.reshape(len(keys), -1)].mean(axis=1)
    return [(float(b), float(u), key) for b, u, key in zip(bigram, unigram, keys)]


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


def summarize(counts: Counts, layout: Layout, names: Callable[[list[int]], str] | None) -> dict[str, Any]:
    vocab = counts.vocab_size
    unigram = counts.unigram
    total = max(int(unigram.sum()), 1)
    order = np.argsort(-unigram, kind="stable")
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
                          for i in order[:TOP] if unigram[i] > 0],
        "least_frequent_used": [_named({"ids": [int(i)], "count": int(unigram[i])}, names)
                                for i in order[::-1] if unigram[i] > 0][:TOP],
    }
    codes, values = counts.transitions
    previous = (codes // np.uint64(vocab)).astype(np.int64)
    from_previous = np.bincount(previous, weights=values, minlength=vocab)
    top = np.argsort(-values, kind="stable")[:TOP * 2]
    report["top_transitions"] = [
        _named({"ids": decode_code(int(codes[i]), 2, vocab), "count": int(values[i]),
                "p_next_given_previous": float(values[i] / from_previous[previous[i]])}, names) for i in top]
    report["num_distinct_transitions"] = int(len(codes))
    report["patterns"] = {
        str(n): [_named({"ids": decode_code(int(table[0][i]), n, vocab), "count": int(table[1][i])}, names)
                 for i in np.argsort(-table[1], kind="stable")[:TOP]]
        for n, table in sorted(counts.patterns.items())}
    report["patterns_exact"] = not counts.is_pruned
    distinct = {}
    for n, sketch in sorted(counts.sketches.items()):
        number, exact = _sketch_estimate(sketch)
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
    max_patterns: int = 1 << 18
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


def _map(function: Callable, shards: list[ShardRecord], args: tuple, options: AnalyzeOptions) -> Iterator[Any]:
    """function(root, shard, *args) for every shard, in shard order: here, or as Ray tasks."""
    if not options.use_ray:
        for shard in shards:
            yield function(shard, *args)
        return
    import ray

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
    cache: dict[str, tuple[list[str], np.ndarray]] = {}
    cached_bytes = 0

    def counted(shard, layout, max_patterns, so):
        nonlocal cached_bytes
        keys, tokens = read_samples(root, shard, layout, so)
        if not options.use_ray and cached_bytes + tokens.nbytes <= CACHE_BYTES:
            cache[shard.name] = keys, tokens
            cached_bytes += tokens.nbytes
        return count_tokens(tokens, layout, max_patterns)

    total = Counts(layout.vocab_size)
    for index, counts in enumerate(_map(counted, shards, (layout, options.max_patterns, so), options)):
        total.merge(counts, options.max_patterns)
        if progress:
            progress(f"counted shard {index + 1}/{len(shards)}")
    total.consolidate(options.max_patterns)
    model = Model.from_counts(total)

    def scored(shard, layout, model, so):
        keys, tokens = cache.pop(shard.name, None) or read_samples(root, shard, layout, so)
        return [(b, u, key, shard.name) for b, u, key in score_tokens(keys, tokens, layout, model)]

    ranked = {"least_likely": [], "most_likely": [], "rarest_ids": []}
    orders = {"least_likely": lambda s: s[0], "most_likely": lambda s: -s[0], "rarest_ids": lambda s: s[1]}
    # a per-token NLL under the data's own MLE bigram model is at most log(number of transitions)
    distribution = Distribution(high=math.log(max(int(total.transitions[1].sum()), 2)) + 1e-9)
    for index, scores in enumerate(_map(scored, shards, (layout, model, so), options)):
        distribution.add(np.asarray([score[0] for score in scores], dtype=np.float64))
        for name, order in orders.items():
            ranked[name] = heapq.nlargest(options.num_outliers, [*ranked[name], *scores], key=order)
        if progress:
            progress(f"scored shard {index + 1}/{len(shards)}")
    report = {"dataset": url, "name": manifest.name, "kind": manifest.kind, "split": options.split,
              "num_shards": len(shards), **summarize(total, layout, text_names(root, manifest, so))}
    report["sample_nll"] = {"bigram_mean": distribution.mean, "bigram_std": distribution.std,
                            "bigram_p50": distribution.percentile(50), "bigram_p99": distribution.percentile(99)}
    std = max(distribution.std, 1e-12)
    # least likely: odd or noisy samples; most likely: repetitive ones (boilerplate, a stuck sensor);
    # rarest ids: samples made of ids the rest of the data hardly uses
    report["outliers"] = {name: [{"key": key, "shard": shard, "bigram_nll": b, "unigram_nll": u,
                                  "bigram_z": (b - distribution.mean) / std} for b, u, key, shard in entries]
                          for name, entries in ranked.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from sharding.analysis_plots import draw_analysis

    report["plots"] = [str(p) for p in draw_analysis(total, report, distribution, out)] if options.plots else []
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
